//! Issue 13 §5, a security pass against the real relay: every bearer route without a token, with
//! a withdrawn account's token, with a logged-out token and with an expired one; other students'
//! ids (BOLA); students on every admin route; unknown JSON fields; hostile strings in every
//! string field; deep nesting and huge strings; hostile `Idempotency-Key`s; and logins that do
//! not tell unknown users from wrong passwords.

use std::time::{Duration, Instant};

use comatching_tests::api::PASSWORD;
use comatching_tests::relay::{AuthSection, RelayConfig};
use comatching_tests::{Api, PATIENCE, ProfileBuilder, Resp, TestEnv, wait_until};
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

/// Cheap password hashing, and sessions that last `ttl_h` hours when given.
fn cheap_auth(c: &mut RelayConfig, ttl_h: Option<f64>) {
    c.auth = Some(AuthSection {
        hash_memory_kib: 64,
        hash_iterations: 1,
        session_ttl_h: ttl_h,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bearer_route_refuses_an_expired_session() {
    // `auth.session_ttl_h` of a few seconds: long enough to see both tokens work first.
    const TTL: Duration = Duration::from_secs(4);
    let env = TestEnv::start_with("sec-expiry", |c| {
        cheap_auth(c, Some(TTL.as_secs_f64() / 3600.0))
    })
    .await;
    let made = Instant::now();
    // Both ways a session is made: sign-up and login.
    let signed_up = env.api.signup("expiring_user").await.token;
    let logged_in = env.api.login("expiring_user", PASSWORD).await.expect(200)["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let tokens = [signed_up, logged_in];
    for t in &tokens {
        env.api.get("/api/v1/me", Some(t)).await.expect(200);
    }
    wait_until(PATIENCE, "both sessions to expire", || {
        let (api, tokens) = (&env.api, &tokens);
        async move {
            for t in tokens {
                if api.get("/api/v1/me", Some(t)).await.status != 401 {
                    return false;
                }
            }
            true
        }
    })
    .await;
    let lived = made.elapsed();
    // Not before their time (the relay's wall clock against ours: a little slack).
    assert!(
        lived + Duration::from_millis(250) >= TTL,
        "sessions ended after {lived:?}, lifetime {TTL:?}"
    );
    let mut n = 0;
    for (m, path, _) in routes().into_iter().filter(|r| r.2) {
        for t in &tokens {
            let r = call(&env.api, &m, &path, Some(t)).await;
            assert_eq!(
                (r.status, r.error_code()),
                (401, Some("unauthorized")),
                "{m} {path} with an expired token: {}",
                r.text
            );
            n += 1;
        }
    }
    assert!(n >= 36, "{n} tries");
    // A new login works again: expiry ends sessions, not the account.
    let fresh = env.api.login("expiring_user", PASSWORD).await.expect(200);
    let fresh = fresh["token"].as_str().expect("token");
    env.api.get("/api/v1/me", Some(fresh)).await.expect(200);
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
    // A has a match (and so a ledger with a grant and a charge), and a pending charge.
    let op = env.operator().await;
    let partner = env
        .api
        .signup_with_profile("partner_c", &ProfileBuilder::female())
        .await;
    a.set_profile(&ProfileBuilder::male()).await;
    op.grant(&a, 5000).await;
    let responder =
        comatching_tests::Responder::offering(&env.amqp_url(), vec![partner.id()]).await;
    let opts = comatching_tests::MatchOptionsBuilder::new();
    let matched = a.post_match("bola-1", &opts).await.expect(201);
    let match_id = matched["match_id"].as_str().expect("match_id").to_owned();
    // A's charge: invisible and untouchable for B.
    let charge = a.request_charge_ok(5000).await;
    let r = b.cancel_charge(&charge).await;
    assert_eq!(r.status, 404, "B cancels A's charge: {}", r.text);
    for (path, list) in [
        ("/api/v1/me/charges", "charges"),
        ("/api/v1/me/ledger", "entries"),
        ("/api/v1/matches", "matches"),
    ] {
        let body = b.get(path).await.expect(200);
        assert_eq!(body[list], json!([]), "{path} of B shows A's data: {body}");
    }
    // Idempotency keys belong to their user: B sending A's key gets no replay of A's match
    // (B has no points, so B's own request is refused).
    let r = b.post_match("bola-1", &opts).await;
    assert!(
        r.status >= 400 && !r.text.contains(&match_id) && !r.text.contains(&partner.user_id),
        "B replayed A's idempotency key: {} {}",
        r.status,
        r.text
    );
    assert_eq!(
        responder.requests().len(),
        1,
        "B's request reached a matcher"
    );
    // A still sees all of it.
    let mine = a.get("/api/v1/matches").await.expect(200);
    assert!(mine.to_string().contains(&match_id), "{mine}");
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
    let reject = format!("/api/v1/admin/charges/{FAKE_ID}/reject");
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
        (
            Method::POST,
            reject.as_str(),
            Some(op.user.token.as_str()),
            json!({"reason": "x"}),
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
    // Profile: an extra field is refused too, at the top and in the nested contact.
    for at in [None, Some("contact")] {
        let mut p = ProfileBuilder::default().json().clone();
        match at {
            None => p["points"] = json!(99),
            Some(k) => p[k]["user_id"] = json!(FAKE_ID),
        }
        let r = u.put_profile_json(&p).await;
        r.assert_error(400, "validation_failed");
    }
    assert_eq!(
        u.me_ok().await["profile"],
        Value::Null,
        "a refused profile was stored"
    );
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

/// Hostile strings, each short enough for the shortest free-text field (a nickname, 20
/// characters), with whether a display field — text someone else reads — keeps it: SQL
/// metacharacters, quotes, wildcards and 4-byte emoji are text like any other; NUL and the
/// right-to-left override are refused (`validation_failed`, nothing changed).
const HOSTILE: [(&str, bool); 5] = [
    ("x');DROP TABLE p;--", true),
    ("a\"b\\c%_*", true),
    ("nul\u{0}byte", false),
    ("rtl\u{202E}txt", false),
    ("emoji😀🎉", true),
];

/// `s` percent-encoded for a query string.
fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The field at a dotted path of a JSON object (`contact.handle`).
fn at<'a>(v: &'a mut Value, path: &str) -> &'a mut Value {
    path.split('.').fold(v, |v, k| &mut v[k])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_strings_in_every_profile_field_are_verbatim_or_refused() {
    let env = TestEnv::start_with("sec-profile-strings", |c| cheap_auth(c, None)).await;
    let u = env.api.signup("profile_strings").await;
    u.set_profile(&ProfileBuilder::default()).await;
    let profile = async || u.me_ok().await["profile"].clone();
    // The free-text fields: kept verbatim or refused.
    for field in ["nickname", "song", "comment", "major", "contact.handle"] {
        for (s, kept) in HOSTILE {
            let before = profile().await;
            let mut body = ProfileBuilder::default().json().clone();
            *at(&mut body, field) = json!(s);
            let r = u.put_profile_json(&body).await;
            let mut after = profile().await;
            if kept {
                assert_eq!(r.status, 200, "{field} = {s:?}: {}", r.text);
                assert_eq!(
                    *at(&mut after, field),
                    json!(s),
                    "{field} = {s:?} not verbatim"
                );
            } else {
                r.assert_invalid(field);
                assert_eq!(
                    after, before,
                    "a refused {field} = {s:?} changed the profile"
                );
            }
        }
    }
    // The fields with fixed vocabularies (and the hobby list's items): always refused.
    for field in [
        "gender",
        "mbti",
        "contact_frequency",
        "contact.kind",
        "hobbies",
    ] {
        for (s, _) in HOSTILE {
            let before = profile().await;
            let mut body = ProfileBuilder::default().json().clone();
            *at(&mut body, field) = if field == "hobbies" {
                json!(["game", s])
            } else {
                json!(s)
            };
            let r = u.put_profile_json(&body).await;
            r.assert_error(400, "validation_failed");
            assert_eq!(
                profile().await,
                before,
                "a refused {field} = {s:?} changed it"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_strings_in_reasons_searches_and_passwords_are_verbatim_or_refused() {
    let env = TestEnv::start_with("sec-more-strings", |c| cheap_auth(c, None)).await;
    let op = env.operator().await;
    let u = env.api.signup("reasons_user").await;
    let charge_of = async |id: &str| {
        let list = u.get("/api/v1/me/charges").await.expect(200);
        list["charges"]
            .as_array()
            .expect("charges")
            .iter()
            .find(|c| c["charge_id"] == json!(id))
            .cloned()
            .expect("the charge is listed")
    };

    // A charge rejection's reason, which the student reads.
    let mut pending: Option<String> = None;
    for (s, kept) in HOSTILE {
        let id = match pending.take() {
            Some(id) => id,
            None => u.request_charge_ok(5000).await,
        };
        let r = op.reject(&id, s).await;
        let c = charge_of(&id).await;
        if kept {
            assert_eq!(r.status, 200, "reject reason {s:?}: {}", r.text);
            assert_eq!(
                (&c["status"], &c["reason"]),
                (&json!("rejected"), &json!(s)),
                "{c}"
            );
        } else {
            r.assert_invalid("reason");
            assert_eq!(
                (&c["status"], &c["reason"]),
                (&json!("pending"), &Value::Null),
                "a refused reason {s:?} changed the charge: {c}"
            );
            pending = Some(id);
        }
    }

    // An operator's points grant: the reason (the student's ledger shows it) and the username.
    let ledger = async || u.get("/api/v1/me/ledger").await.expect(200)["entries"].clone();
    for (s, kept) in HOSTILE {
        let (points, entries) = (u.points().await, ledger().await);
        let r = op.grant_resp(&u.user_id, 1000, s).await;
        if kept {
            assert_eq!(r.status, 201, "grant reason {s:?}: {}", r.text);
            assert_eq!(u.points().await, points + 1000);
            assert_eq!(ledger().await[0]["reason"], json!(s), "grant reason {s:?}");
        } else {
            r.assert_invalid("reason");
            assert_eq!((u.points().await, ledger().await), (points, entries));
        }
    }
    for (s, _) in HOSTILE {
        // Also a real name with the hostile text after it: nothing may cut it back to the name.
        for name in [s.to_owned(), format!("reasons_user{s}")] {
            let points = u.points().await;
            let body = json!({"username": name, "amount": 1000, "reason": "x"});
            let r = env
                .api
                .request(
                    Method::POST,
                    "/api/v1/admin/points",
                    Some(&op.user.token),
                    Some(&body),
                    &[],
                )
                .await;
            r.assert_invalid("username");
            assert_eq!(u.points().await, points, "grant to {name:?}");
        }
    }

    // A match request's options are all fixed vocabularies: refused, nothing held or spent.
    let points = u.points().await;
    for field in ["age", "mbti", "hobby", "contact_frequency", "important"] {
        for (i, (s, _)) in HOSTILE.iter().enumerate() {
            let r = u
                .post_match_json(&format!("hostile-{field}-{i}"), &json!({ field: s }))
                .await;
            r.assert_error(400, "validation_failed");
        }
    }
    assert_eq!(u.points().await, points);

    // Query strings: the user search, cursors, a status and a time. Refused, not searched.
    let found = op
        .user
        .get("/api/v1/admin/users?q=reasons")
        .await
        .expect(200);
    assert_eq!(
        found["users"][0]["username"],
        json!("reasons_user"),
        "{found}"
    );
    for (s, _) in HOSTILE {
        for q in [s.to_owned(), format!("reasons{s}")] {
            let r = op
                .user
                .get(&format!("/api/v1/admin/users?q={}", enc(&q)))
                .await;
            r.assert_invalid("q");
        }
        for (who, path) in [
            (&u, "/api/v1/me/charges?cursor="),
            (&u, "/api/v1/me/ledger?cursor="),
            (&op.user, "/api/v1/admin/charges?status="),
            (&op.user, "/api/v1/admin/stats?since_ms="),
        ] {
            let r = who.get(&format!("{path}{}", enc(s))).await;
            r.assert_error(400, "validation_failed");
        }
    }

    // Path segments: a charge id that is not one is like a missing one; a user id is checked.
    let pending_now = u.get("/api/v1/me/charges").await.expect(200);
    for (s, _) in HOSTILE {
        let r = u
            .api
            .request(
                Method::DELETE,
                &format!("/api/v1/me/charges/{}", enc(s)),
                Some(&u.token),
                None,
                &[],
            )
            .await;
        r.assert_error(404, "not_found");
        let r = op
            .user
            .get(&format!("/api/v1/admin/users/{}/ledger", enc(s)))
            .await;
        r.assert_invalid("user_id");
    }
    assert_eq!(u.get("/api/v1/me/charges").await.expect(200), pending_now);
    // A resume position (`Last-Event-ID`); a header carries visible ASCII only, so only those.
    for (s, _) in HOSTILE
        .iter()
        .filter(|(s, _)| s.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
    {
        for (who, path) in [
            (&u, "/api/v1/me/events"),
            (&op.user, "/api/v1/admin/charges/events"),
        ] {
            let r = who
                .api
                .request(
                    Method::GET,
                    path,
                    Some(&who.token),
                    None,
                    &[("last-event-id", s)],
                )
                .await;
            r.assert_invalid("Last-Event-ID");
        }
    }

    // Passwords: any text, kept exactly: only the very same string logs in, not one cut at the
    // NUL or stripped of what is not ASCII.
    for (i, (s, _)) in HOSTILE.iter().enumerate() {
        let name = format!("pw_user_{i}");
        let password = format!("pw {s} long enough");
        env.api.create_account(&name, &password).await.expect(201);
        env.api.login(&name, &password).await.expect(200);
        for near in [
            password.split('\0').next().unwrap_or_default().to_owned(),
            password.chars().filter(char::is_ascii).collect(),
            password.chars().filter(|c| !c.is_control()).collect(),
        ] {
            if near != password {
                let r = env.api.login(&name, &near).await;
                r.assert_error(401, "unauthorized");
            }
        }
    }
    // And as a new password.
    let mut current = PASSWORD.to_owned();
    for (s, _) in HOSTILE {
        let new = format!("new {s} password");
        let r = u
            .api
            .request(
                Method::PUT,
                "/api/v1/me/password",
                Some(&u.token),
                Some(&json!({"current": current, "new": new})),
                &[],
            )
            .await;
        assert_eq!(r.status, 204, "new password {s:?}: {}", r.text);
        env.api.login("reasons_user", &new).await.expect(200);
        env.api
            .login("reasons_user", &current)
            .await
            .assert_error(401, "unauthorized");
        current = new;
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
