//! Issue 13 §5, a security pass against the real relay: every bearer route without a token, with
//! a withdrawn account's token and with a logged-out token; other students' ids (BOLA); students
//! on every admin route; unknown JSON fields; hostile strings; deep nesting and huge strings;
//! hostile `Idempotency-Key`s; and logins that do not tell unknown users from wrong passwords.

use std::time::{Duration, Instant};

use comatching_tests::api::PASSWORD;
use comatching_tests::{Api, Resp, TestEnv};
use reqwest::Method;
use serde_json::{Value, json};

const FAKE_ID: &str = "0190f0f0f0f0700080000000000000aa";

/// Every (method, path) of the OpenAPI document, with path parameters filled in, and whether it
/// needs a bearer token.
fn routes() -> Vec<(Method, String, bool)> {
    let doc: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (m, op) in ops.as_object().unwrap() {
            let bearer = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x.get("bearer").is_some()));
            let method = Method::from_bytes(m.to_ascii_uppercase().as_bytes()).unwrap();
            let mut path = path.replace("{charge_id}", FAKE_ID);
            if path.ends_with("/admin/users") {
                path.push_str("?q=student"); // its one required query parameter
            }
            out.push((method, path, bearer));
        }
    }
    assert!(out.len() > 20, "openapi lists {} routes", out.len());
    out
}

async fn call(api: &Api, m: &Method, path: &str, token: Option<&str>) -> Resp {
    // Valid bodies where a route has one, so that only the caller can be what is refused.
    let body = if path.ends_with("/reject") {
        json!({"reason": "x"})
    } else if path.ends_with("/admin/points") {
        json!({"username": "student_a", "amount": 1000, "reason": "x"})
    } else {
        json!({})
    };
    let body = (*m == Method::POST || *m == Method::PUT).then_some(&body);
    api.request(m.clone(), path, token, body, &[("idempotency-key", "k1")])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bearer_route_refuses_missing_withdrawn_and_ended_sessions() {
    let env = TestEnv::start("sec-tokens").await;
    let gone = env.api.signup("gone_user").await;
    gone.delete_me().await.expect(204);
    let out = env.api.signup("out_user").await;
    let r = out.logout().await;
    assert!(r.status < 300, "logout: {}", r.status);
    let bad = [
        None,
        Some(gone.token.as_str()),
        Some(out.token.as_str()),
        Some("not-a-token"),
        Some("' OR 1=1 --"),
    ];
    let mut n = 0;
    for (m, path, bearer) in routes().into_iter().filter(|r| r.2) {
        assert!(bearer);
        for t in bad {
            let r = call(&env.api, &m, &path, t).await;
            assert_eq!(
                (r.status, r.error_code()),
                (401, Some("unauthorized")),
                "{m} {path} with {t:?}: {}",
                r.text
            );
            n += 1;
        }
    }
    assert!(n >= 90, "{n} tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn students_are_refused_on_every_admin_route_and_other_students_objects() {
    let env = TestEnv::start("sec-bola").await;
    let a = env.api.signup("student_a").await;
    let b = env.api.signup("student_b").await;
    for (m, path, _) in routes()
        .into_iter()
        .filter(|r| r.1.starts_with("/api/v1/admin"))
    {
        let r = call(&env.api, &m, &path, Some(&b.token)).await;
        assert_eq!(r.status, 403, "{m} {path} as a student: {}", r.text);
        assert_eq!(r.error_code(), Some("forbidden"), "{m} {path}");
        // A malformed request is refused for the role first: a student learns nothing of the
        // shape an operator route expects (no 400 naming a field, a query or an id).
        let bad_path = path.replace(FAKE_ID, "not-an-id");
        let bad_path = bad_path.split('?').next().unwrap_or_default();
        let body = (m == Method::POST || m == Method::PUT).then_some(json!({"bogus": 1}));
        let r = env
            .api
            .request(m.clone(), bad_path, Some(&b.token), body.as_ref(), &[])
            .await;
        assert_eq!(
            (r.status, r.error_code()),
            (403, Some("forbidden")),
            "{m} {bad_path} malformed, as a student: {}",
            r.text
        );
    }
    // A's charge: invisible and untouchable for B.
    let charge = a.request_charge_ok(5000).await;
    let r = b.cancel_charge(&charge).await;
    assert_eq!(r.status, 404, "B cancels A's charge: {}", r.text);
    for path in ["/api/v1/me/charges", "/api/v1/me/ledger", "/api/v1/matches"] {
        let body = b.get(path).await.expect(200);
        assert!(
            !body.to_string().contains(&charge) && !body.to_string().contains(&a.user_id),
            "{path} of B shows A's data: {body}"
        );
    }
    // A's own charge is still pending and listed.
    let mine = a.get("/api/v1/me/charges").await.expect(200);
    assert!(mine.to_string().contains(&charge), "{mine}");
    // Ids in places where a user id might be smuggled in.
    for q in [
        format!("/api/v1/me/ledger?user_id={}", a.user_id),
        format!("/api/v1/me/charges?user_id={}", a.user_id),
        format!("/api/v1/matches?user_id={}", a.user_id),
    ] {
        let r = b.get(&q).await;
        assert!(
            r.status >= 400 || !r.text.contains(&charge),
            "{q}: {} {}",
            r.status,
            r.text
        );
        assert!(r.status < 500, "{q}: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_refused_everywhere() {
    let env = TestEnv::start("sec-mass").await;
    let u = env.api.signup("mass_user").await;
    let op = env.operator().await;
    let extra = [
        ("points", json!(1_000_000)),
        ("role", json!("operator")),
        ("user_id", json!(FAKE_ID)),
    ];
    let cases: Vec<(Method, &str, Option<&str>, Value)> = vec![
        (
            Method::POST,
            "/api/v1/accounts",
            None,
            json!({"username": "mass_new", "password": PASSWORD}),
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            None,
            json!({"username": "mass_user", "password": PASSWORD}),
        ),
        (
            Method::POST,
            "/api/v1/me/charges",
            Some(u.token.as_str()),
            json!({"amount": 5000, "depositor": "홍길동"}),
        ),
        (
            Method::PUT,
            "/api/v1/me/password",
            Some(u.token.as_str()),
            json!({"current": PASSWORD, "new": "another-Pass-1234"}),
        ),
        (
            Method::POST,
            "/api/v1/admin/points",
            Some(op.user.token.as_str()),
            json!({"username": "mass_user", "amount": 1000, "reason": "x"}),
        ),
        (
            Method::POST,
            "/api/v1/matches",
            Some(u.token.as_str()),
            json!({}),
        ),
    ];
    for (m, path, token, base) in cases {
        for (k, v) in &extra {
            if path.ends_with("/admin/points") && *k == "user_id" {
                continue; // a real field there: the grant names its student by id or name
            }
            let mut body = base.clone();
            body[*k] = v.clone();
            let r = env
                .api
                .request(
                    m.clone(),
                    path,
                    token,
                    Some(&body),
                    &[("idempotency-key", "mass-1")],
                )
                .await;
            assert_eq!(r.status, 400, "{m} {path} with {k}: {}", r.text);
            assert_eq!(
                r.error_code(),
                Some("validation_failed"),
                "{m} {path} {k}: {}",
                r.text
            );
        }
    }
    // Nothing changed: no points, not an operator.
    assert_eq!(u.points().await, 0);
    let r = u.get("/api/v1/admin/stats").await;
    assert_eq!(r.status, 403);
    // Profile: an extra field is refused too.
    let mut p = comatching_tests::ProfileBuilder::default().json().clone();
    p["points"] = json!(99);
    let r = u.put_profile_json(&p).await;
    assert_eq!(r.status, 400, "profile with points: {}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_strings_are_stored_verbatim_or_refused() {
    let env = TestEnv::start("sec-strings").await;
    let hostile = [
        "x'); DROP TABLE accounts;--",
        "a\"b\\c%_*",
        "nul\u{0}byte",
        "rtl\u{202E}txt",
        "emoji😀🎉",
    ];
    for (i, s) in hostile.iter().enumerate() {
        // Usernames.
        let name = format!("u{i}{s}");
        let r = env.api.create_account(&name, PASSWORD).await;
        if r.status == 201 {
            let tok = r.body["token"].as_str().unwrap();
            let me = env.api.get("/api/v1/me", Some(tok)).await.expect(200);
            assert_eq!(me["username"], json!(name), "username {s:?} not verbatim");
        } else {
            r.assert_error(400, "validation_failed");
        }
        let r = env.api.login(&name, PASSWORD).await;
        assert!(
            r.status == 200 || r.status == 401,
            "login {s:?}: {}",
            r.text
        );
    }
    let u = env.api.signup("strings_user").await;
    for s in hostile {
        let r = u.request_charge(5000, s).await;
        if r.status == 201 {
            let id = r.body["charge_id"].as_str().unwrap().to_owned();
            let list = u.get("/api/v1/me/charges").await.expect(200);
            assert!(
                list.to_string().contains(&json!(s).to_string()),
                "depositor {s:?}: {list}"
            );
            u.cancel_charge(&id).await;
        } else {
            r.assert_error(400, "validation_failed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nesting_huge_strings_and_bad_idempotency_keys_are_refused() {
    let env = TestEnv::start("sec-bodies").await;
    let u = env.api.signup("bodies_user").await;
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_obj = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    let huge = format!(
        "{{\"username\":\"{}\",\"password\":\"x\"}}",
        "a".repeat(1 << 20)
    );
    for (m, path, _) in routes()
        .into_iter()
        .filter(|r| r.0 == Method::POST || r.0 == Method::PUT)
    {
        for body in [&deep, &deep_obj, &huge] {
            // Sent directly: the relay may answer 413 before reading a 1 MB body and close the
            // connection, which the client sees as a broken pipe: refused, and no 500.
            let sent = reqwest::Client::new()
                .request(m.clone(), format!("{}{path}", env.api.base_url()))
                .bearer_auth(&u.token)
                .header("content-type", "application/json")
                .header("idempotency-key", "deep-1")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) => assert!(
                    (400..500).contains(&r.status().as_u16()),
                    "{m} {path} ({} bytes): {}",
                    body.len(),
                    r.status()
                ),
                Err(e) => assert!(body.len() > 100_000, "{m} {path}: {e}"),
            }
        }
    }
    for key in [
        "a\tb".to_owned(),
        "k".repeat(1024),
        " ".to_owned(),
        "é".to_owned(),
    ] {
        let r = u
            .api
            .request(
                Method::POST,
                "/api/v1/matches",
                Some(&u.token),
                Some(&json!({})),
                &[("idempotency-key", &key)],
            )
            .await;
        assert_eq!(
            r.status,
            400,
            "key {:?}: {}",
            &key[..key.len().min(10)],
            r.text
        );
        assert_eq!(r.error_code(), Some("validation_failed"));
    }
    assert_eq!(u.points().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_and_wrong_password_look_and_time_the_same() {
    let env = TestEnv::start("sec-login").await;
    env.api.signup("known_user").await;
    let unknown = env.api.login("nobody_here", "wrong-password-1").await;
    let wrong = env.api.login("known_user", "wrong-password-1").await;
    assert_eq!(unknown.status, 401);
    assert_eq!((unknown.status, &unknown.text), (wrong.status, &wrong.text));
    async fn median(api: &Api, user: &str) -> Duration {
        let mut ts = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let r = api.login(user, "wrong-password-1").await;
            ts.push(t.elapsed());
            assert_eq!(r.status, 401);
        }
        ts.sort();
        ts[5]
    }
    let (mu, mw) = (
        median(&env.api, "nobody_here").await,
        median(&env.api, "known_user").await,
    );
    println!("login medians: unknown {mu:?}, wrong password {mw:?}");
    let ratio = mu.as_secs_f64() / mw.as_secs_f64();
    assert!(
        (1.0 / 3.0..3.0).contains(&ratio),
        "unknown {mu:?} vs wrong {mw:?}"
    );
}
