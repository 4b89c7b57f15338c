//! The API from a browser on another origin (issue 10 §1): CORS preflights and simple requests
//! for allowed and other origins, CORS headers on error answers (404, 405, 401, 413, 429),
//! `nosniff` and `no-store`, bearer-only sessions (a cookie is no credential), and password
//! changes (wrong current password, the rules, other sessions ending, concurrent changes).

use comatching_tests::api::PASSWORD;
use comatching_tests::{Resp, TestEnv};
use reqwest::Method;
use serde_json::json;

const WEB_APP: &str = "https://comatching.web.app";
const OTHER: &str = "https://evil.example";

fn assert_cors_for(r: &Resp, origin: &str, what: &str) {
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some(origin),
        "{what}: no CORS allow-origin for {origin} (status {}, headers {:?})",
        r.status,
        r.headers
    );
    assert_eq!(
        r.header("access-control-allow-credentials"),
        None,
        "{what}: bearer tokens need no credentials mode"
    );
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
}

fn assert_no_cors(r: &Resp, what: &str) {
    let cors: Vec<_> = r
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("access-control-"))
        .collect();
    assert!(cors.is_empty(), "{what}: unexpected CORS headers {cors:?}");
}

async fn preflight(env: &TestEnv, path: &str, origin: &str, method: &str, headers: &str) -> Resp {
    env.api
        .request(
            Method::OPTIONS,
            path,
            None,
            None,
            &[
                ("origin", origin),
                ("access-control-request-method", method),
                ("access-control-request-headers", headers),
            ],
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_for_the_web_app_origin_only_and_on_every_error() {
    let env = TestEnv::start_with("cors", |c| {
        c.http.cors_allowed_origins = vec![WEB_APP.to_owned()];
        c.rate_limit.per_ip_per_minute = 40;
    })
    .await;

    // The preflight the issue found answering 405.
    let r = preflight(&env, "/api/v1/accounts", WEB_APP, "POST", "content-type").await;
    assert_eq!(r.status, 204, "preflight: {:?}", r.headers);
    assert_cors_for(&r, WEB_APP, "preflight");
    let methods = r
        .header("access-control-allow-methods")
        .unwrap_or_default()
        .to_ascii_uppercase();
    for m in ["GET", "POST", "PUT", "DELETE"] {
        assert!(methods.contains(m), "allowed methods {methods:?} lack {m}");
    }
    let headers = r
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for h in [
        "authorization",
        "content-type",
        "idempotency-key",
        "last-event-id",
    ] {
        assert!(headers.contains(h), "allowed headers {headers:?} lack {h}");
    }
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    let r = preflight(
        &env,
        "/api/v1/matches",
        WEB_APP,
        "POST",
        "authorization, idempotency-key, content-type",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_cors_for(&r, WEB_APP, "match preflight");

    // Another origin: no CORS headers at all, on the preflight and on a simple request.
    let r = preflight(&env, "/api/v1/accounts", OTHER, "POST", "content-type").await;
    assert_no_cors(&r, "preflight from another origin");
    let r = env
        .api
        .request(Method::GET, "/healthz", None, None, &[("origin", OTHER)])
        .await;
    assert_eq!(r.status, 200);
    assert_no_cors(&r, "simple request from another origin");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));

    // Simple requests and their errors from the web app carry CORS headers.
    let body = json!({"username": "web_user", "password": PASSWORD});
    let r = env
        .api
        .request(
            Method::POST,
            "/api/v1/accounts",
            None,
            Some(&body),
            &[("origin", WEB_APP)],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_cors_for(&r, WEB_APP, "201");
    let token = r.body["token"].as_str().unwrap().to_owned();
    let r = env
        .api
        .request(
            Method::GET,
            "/api/v1/me",
            Some(&token),
            None,
            &[("origin", WEB_APP)],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_cors_for(&r, WEB_APP, "200");
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "authenticated answers are not cached"
    );

    let r = env
        .api
        .request(
            Method::GET,
            "/api/v1/me",
            None,
            None,
            &[("origin", WEB_APP)],
        )
        .await;
    r.assert_error(401, "unauthorized");
    assert_cors_for(&r, WEB_APP, "401");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = env
        .api
        .request(
            Method::GET,
            "/api/v1/nowhere",
            None,
            None,
            &[("origin", WEB_APP)],
        )
        .await;
    r.assert_error(404, "not_found");
    assert_cors_for(&r, WEB_APP, "404");
    let r = env
        .api
        .request(
            Method::PATCH,
            "/api/v1/me",
            Some(&token),
            None,
            &[("origin", WEB_APP)],
        )
        .await;
    r.assert_error(405, "method_not_allowed");
    assert_cors_for(&r, WEB_APP, "405");
    let r = env
        .api
        .raw(
            Method::POST,
            "/api/v1/accounts",
            None,
            "application/json",
            "x".repeat(40_000),
            &[("origin", WEB_APP)],
        )
        .await;
    r.assert_error(413, "payload_too_large");
    assert_cors_for(&r, WEB_APP, "413");

    // Until the per-IP limit answers 429: that too is readable by the page.
    let mut limited = None;
    for _ in 0..60 {
        let r = env
            .api
            .request(
                Method::GET,
                "/api/v1/me",
                Some(&token),
                None,
                &[("origin", WEB_APP)],
            )
            .await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the per-IP limit of 40 per minute answers 429 within 60 requests");
    r.assert_error(429, "rate_limited");
    assert_cors_for(&r, WEB_APP, "429");
    // Preflights are answered before the limit: a limited page can still learn why.
    let r = preflight(&env, "/api/v1/me", WEB_APP, "GET", "authorization").await;
    assert_eq!(r.status, 204);
    assert_cors_for(&r, WEB_APP, "preflight while limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_origin_is_allowed_by_default() {
    let env = TestEnv::start("cors-default").await;
    let r = preflight(&env, "/api/v1/accounts", WEB_APP, "POST", "content-type").await;
    assert_no_cors(&r, "default preflight");
    let r = env
        .api
        .request(Method::GET, "/healthz", None, None, &[("origin", WEB_APP)])
        .await;
    assert_eq!(r.status, 200);
    assert_no_cors(&r, "default simple request");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cookie_is_no_credential() {
    let env = TestEnv::start("no-cookie").await;
    let user = env.api.signup("cookie_user").await;
    let cookie = format!("__Host-session={}", user.token);
    let r = env
        .api
        .request(
            Method::GET,
            "/api/v1/me",
            None,
            None,
            &[("cookie", &cookie)],
        )
        .await;
    r.assert_error(401, "unauthorized");
    let r = env
        .api
        .request(
            Method::DELETE,
            "/api/v1/me",
            None,
            None,
            &[("cookie", &cookie)],
        )
        .await;
    r.assert_error(401, "unauthorized");
    user.me_ok().await;
}

async fn change(env: &TestEnv, token: &str, current: &str, new: &str) -> Resp {
    env.api
        .request(
            Method::PUT,
            "/api/v1/me/password",
            Some(token),
            Some(&json!({"current": current, "new": new})),
            &[],
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_change_checks_the_current_one_and_ends_other_sessions() {
    let env = TestEnv::start("password").await;
    let user = env.api.signup("pw_user").await;
    let other = env.api.login("pw_user", PASSWORD).await.expect(200);
    let other_token = other["token"].as_str().unwrap().to_owned();
    let bystander = env.api.signup("pw_bystander").await;

    let r = change(
        &env,
        &user.token,
        "not the password",
        "a brand new password",
    )
    .await;
    r.assert_error(403, "wrong_password");
    change(&env, &user.token, PASSWORD, "too short")
        .await
        .assert_invalid("new");
    change(&env, &user.token, PASSWORD, &"x".repeat(129))
        .await
        .assert_invalid("new");
    let r = env
        .api
        .request(
            Method::PUT,
            "/api/v1/me/password",
            Some(&user.token),
            Some(&json!({"current": PASSWORD})),
            &[],
        )
        .await;
    r.assert_invalid("new");
    // Nothing changed so far: both sessions live, the old password logs in.
    env.api
        .get("/api/v1/me", Some(&other_token))
        .await
        .expect(200);
    env.api.login("pw_user", PASSWORD).await.expect(200);

    let r = change(&env, &user.token, PASSWORD, "a brand new password").await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert!(r.text.is_empty());
    user.me_ok().await; // this session stays
    env.api
        .get("/api/v1/me", Some(&other_token))
        .await
        .assert_error(401, "unauthorized");
    env.api
        .login("pw_user", PASSWORD)
        .await
        .assert_error(401, "unauthorized");
    env.api
        .login("pw_user", "a brand new password")
        .await
        .expect(200);
    bystander.me_ok().await; // another account's sessions are untouched
    env.api
        .get("/api/v1/me/password", Some(&user.token))
        .await
        .assert_error(405, "method_not_allowed");
    change(&env, "", PASSWORD, "whatever it is now")
        .await
        .assert_error(401, "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_password_changes_let_exactly_one_win() {
    let env = TestEnv::start("password-race").await;
    let user = env.api.signup("race_user").await;
    let mut current = PASSWORD.to_owned();
    for round in 0..6 {
        let (a, b) = (
            format!("first new password {round}"),
            format!("second new password {round}"),
        );
        let (ra, rb) = tokio::join!(
            change(&env, &user.token, &current, &a),
            change(&env, &user.token, &current, &b)
        );
        let statuses = [ra.status, rb.status];
        let winners: Vec<&String> = [(&ra, &a), (&rb, &b)]
            .into_iter()
            .filter(|(r, _)| r.status == 204)
            .map(|(_, p)| p)
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: statuses {statuses:?}, want one 204"
        );
        for r in [&ra, &rb] {
            if r.status != 204 {
                r.assert_error(403, "wrong_password");
            }
        }
        let winner = winners[0].clone();
        let loser = if winner == a { &b } else { &a };
        env.api.login("race_user", &winner).await.expect(200);
        env.api
            .login("race_user", loser)
            .await
            .assert_error(401, "unauthorized");
        current = winner;
    }
}
