//! The relay's HTTP contract, route by route: each success and each error code, object-level
//! isolation between users, operator-only routes, and rejected bodies.

use comatching_tests::api::PASSWORD;
use comatching_tests::broker::unreachable_amqp_url;
use comatching_tests::{
    Api, MatchOptionsBuilder, ProfileBuilder, RelayConfig, RelayProcess, Responder, TestEnv, Vhost,
};
use reqwest::Method;
use serde_json::{Value, json};

fn is_hex_id(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_sessions_and_logout() {
    let env = TestEnv::start("accounts").await;
    let created = env
        .api
        .create_account("alice_01", PASSWORD)
        .await
        .expect(201);
    assert!(is_hex_id(&created["user_id"]), "user_id: {created}");
    let first_token = created["token"].as_str().expect("token").to_owned();
    assert!(!first_token.is_empty());

    let login = env.api.login("alice_01", PASSWORD).await.expect(200);
    assert_eq!(login["user_id"], created["user_id"]);
    let second_token = login["token"].as_str().expect("token").to_owned();
    assert_ne!(first_token, second_token, "each login gets its own session");

    for token in [&first_token, &second_token] {
        let me = env.api.get("/api/v1/me", Some(token)).await.expect(200);
        assert_eq!(me["user_id"], created["user_id"]);
        assert_eq!(me["username"], "alice_01");
        assert_eq!(me["points"], 0);
        assert_eq!(me["profile"], Value::Null);
    }

    // Logging out ends only this session.
    let r = env
        .api
        .request(
            Method::DELETE,
            "/api/v1/sessions/current",
            Some(&first_token),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "logout: {}", r.text);
    env.api
        .get("/api/v1/me", Some(&first_token))
        .await
        .assert_error(401, "unauthorized");
    env.api
        .get("/api/v1/me", Some(&second_token))
        .await
        .expect(200);

    // Unknown routes are 404 not_found in the same error shape.
    env.api
        .get("/api/v1/no-such-route", Some(&second_token))
        .await
        .assert_error(404, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_creation_validates_and_rejects_taken_names() {
    let env = TestEnv::start("account-validation").await;
    for bad in ["ab", "Alice", "al ice", "al-ice", "ä_user", &"a".repeat(33)] {
        env.api
            .create_account(bad, PASSWORD)
            .await
            .assert_invalid("username");
    }
    env.api
        .create_account(&"a".repeat(32), PASSWORD)
        .await
        .expect(201);
    env.api.create_account("abc", PASSWORD).await.expect(201);
    for bad in ["short", "123456789", &"p".repeat(129)] {
        env.api
            .create_account("bob_pw", bad)
            .await
            .assert_invalid("password");
    }
    env.api
        .create_account("bob_pw", &"p".repeat(128))
        .await
        .expect(201);

    env.api.create_account("carol", PASSWORD).await.expect(201);
    env.api
        .create_account("carol", "another password")
        .await
        .assert_error(409, "username_taken");

    // Malformed JSON, wrong types and missing fields are validation errors, not 500s.
    let r = env
        .api
        .raw(
            Method::POST,
            "/api/v1/accounts",
            None,
            "application/json",
            "{\"username\":",
            &[],
        )
        .await;
    r.assert_error(400, "validation_failed");
    let body = json!({"username": "dave"});
    env.api
        .request(Method::POST, "/api/v1/accounts", None, Some(&body), &[])
        .await
        .assert_invalid("password");
    let body = json!({"username": 42, "password": PASSWORD});
    env.api
        .request(Method::POST, "/api/v1/accounts", None, Some(&body), &[])
        .await
        .assert_invalid("username");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_refuses_wrong_credentials_and_routes_refuse_bad_tokens() {
    let env = TestEnv::start("login").await;
    env.api.signup("erin").await;
    env.api
        .login("erin", "wrong password!")
        .await
        .assert_error(401, "unauthorized");
    env.api
        .login("nobody_here", PASSWORD)
        .await
        .assert_error(401, "unauthorized");

    let profile = ProfileBuilder::female();
    let opts = MatchOptionsBuilder::new();
    for token in [None, Some("not-a-token"), Some("")] {
        let api = &env.api;
        api.get("/api/v1/me", token)
            .await
            .assert_error(401, "unauthorized");
        api.get("/api/v1/matches", token)
            .await
            .assert_error(401, "unauthorized");
        api.request(
            Method::PUT,
            "/api/v1/me/profile",
            token,
            Some(profile.json()),
            &[],
        )
        .await
        .assert_error(401, "unauthorized");
        api.request(
            Method::POST,
            "/api/v1/matches",
            token,
            Some(opts.json()),
            &[("Idempotency-Key", "k1")],
        )
        .await
        .assert_error(401, "unauthorized");
        api.request(Method::DELETE, "/api/v1/me", token, None, &[])
            .await
            .assert_error(401, "unauthorized");
        api.request(Method::DELETE, "/api/v1/sessions/current", token, None, &[])
            .await
            .assert_error(401, "unauthorized");
        api.get("/api/v1/admin/stats", token)
            .await
            .assert_error(401, "unauthorized");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_put_stores_normalises_and_versions() {
    let env = TestEnv::start("profile").await;
    let user = env.api.signup("fiona").await;
    let sent = ProfileBuilder::female()
        .mbti("pfne")
        .major("  Computer   Science ")
        .hobbies(&["game", "sports", "game"]);
    let stored = user.set_profile(&sent).await;
    assert_eq!(stored["user_id"], json!(user.user_id));
    assert_eq!(stored["version"], 1);
    assert_eq!(stored["nickname"], "sunny");
    assert_eq!(stored["gender"], "female");
    assert_eq!(stored["age"], 22);
    assert_eq!(stored["mbti"], "ENFP");
    assert_eq!(stored["hobbies"], json!(["sports", "game"]));
    assert_eq!(stored["contact_frequency"], "normal");
    assert_eq!(stored["major"], "Computer Science");
    assert_eq!(stored["song"], "Hype Boy");
    assert_eq!(stored["comment"], "let's watch the fireworks");
    assert_eq!(
        stored["contact"],
        json!({"kind": "kakao", "handle": "sunny_22"})
    );
    assert_eq!(stored["dont_pick_me"], false);

    let me = user.me_ok().await;
    assert_eq!(me["profile"], stored);

    let updated = user
        .set_profile(
            &sent
                .clone()
                .age(23)
                .dont_pick_me(true)
                .contact("instagram", "sunny.ig"),
        )
        .await;
    assert_eq!(updated["version"], 2);
    assert_eq!(updated["age"], 23);
    assert_eq!(updated["dont_pick_me"], true);
    assert_eq!(
        updated["contact"],
        json!({"kind": "instagram", "handle": "sunny.ig"})
    );
    assert_eq!(user.me_ok().await["profile"], updated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_validation_names_the_field() {
    let env = TestEnv::start("profile-validation").await;
    let user = env.api.signup("gina").await;
    let base = ProfileBuilder::female();
    let cases: Vec<(ProfileBuilder, &str)> = vec![
        (base.clone().nickname(""), "nickname"),
        (base.clone().nickname(&"n".repeat(21)), "nickname"),
        (base.clone().gender("other"), "gender"),
        (base.clone().age(18), "age"),
        (base.clone().age(41), "age"),
        (base.clone().mbti("ENF"), "mbti"),
        (base.clone().mbti("EINP"), "mbti"),
        (base.clone().hobbies(&[]), "hobbies"),
        (base.clone().hobbies(&["cooking"]), "hobbies"),
        (
            base.clone().contact_frequency("sometimes"),
            "contact_frequency",
        ),
        (base.clone().major("   "), "major"),
        (base.clone().major(&"m".repeat(65)), "major"),
        (base.clone().song(&"s".repeat(101)), "song"),
        (base.clone().comment(&"c".repeat(201)), "comment"),
        (base.clone().contact("line", "x"), "contact.kind"),
        (base.clone().contact("kakao", ""), "contact.handle"),
        (
            base.clone().contact("kakao", &"h".repeat(65)),
            "contact.handle",
        ),
        (base.clone().without("age"), "age"),
        (
            base.clone().set("dont_pick_me", json!("yes")),
            "dont_pick_me",
        ),
    ];
    for (profile, field) in cases {
        let r = user.put_profile(&profile).await;
        assert!(
            r.status == 400 && r.error_code() == Some("validation_failed"),
            "profile with bad {field} should be 400 validation_failed, got {} {}",
            r.status,
            r.text
        );
        // The field, or an element of it ("hobbies[0]").
        let named = r.error_field().unwrap_or_default();
        assert!(
            named == field || named.starts_with(&format!("{field}[")),
            "validation_failed should name {field:?}: {}",
            r.text
        );
    }
    // Limits are inclusive.
    user.set_profile(
        &base
            .clone()
            .nickname(&"n".repeat(20))
            .song(&"s".repeat(100))
            .comment(&"c".repeat(200))
            .contact("kakao", &"h".repeat(64))
            .age(40),
    )
    .await;
    // Nothing invalid was stored.
    assert_eq!(user.me_ok().await["profile"]["version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_bodies_are_rejected() {
    let env = TestEnv::start("bodies").await;
    let user = env.api.signup("hana").await;
    // A valid-looking profile whose comment makes the body larger than 16 KiB.
    let big = ProfileBuilder::female().comment(&"c".repeat(17 * 1024));
    let body = serde_json::to_vec(big.json()).unwrap();
    assert!(body.len() > 16 * 1024);
    let r = env
        .api
        .raw(
            Method::PUT,
            "/api/v1/me/profile",
            Some(&user.token),
            "application/json",
            body,
            &[],
        )
        .await;
    assert_eq!(r.status, 413, "oversized profile: {}", r.text);
    let r = env
        .api
        .raw(
            Method::POST,
            "/api/v1/accounts",
            None,
            "application/json",
            vec![b' '; 17 * 1024],
            &[],
        )
        .await;
    assert_eq!(r.status, 413, "oversized account body: {}", r.text);

    for bad in ["", "{", "[]", "null", "{\"nickname\": }", "\u{0}"] {
        let r = env
            .api
            .raw(
                Method::PUT,
                "/api/v1/me/profile",
                Some(&user.token),
                "application/json",
                bad,
                &[],
            )
            .await;
        r.assert_error(400, "validation_failed");
    }
    assert_eq!(user.me_ok().await["profile"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawal_ends_sessions_and_keeps_the_ledger() {
    let env = TestEnv::start("withdraw").await;
    let op = env.operator().await;
    let user = env.api.signup("ivy").await;
    user.set_profile(&ProfileBuilder::female()).await;
    op.grant(&user, 2500).await;
    let r = user.delete_me().await;
    assert_eq!(r.status, 204, "withdraw: {}", r.text);
    user.me().await.assert_error(401, "unauthorized");
    user.put_profile(&ProfileBuilder::female())
        .await
        .assert_error(401, "unauthorized");
    let r = env.api.login("ivy", PASSWORD).await;
    assert_eq!(
        r.status, 401,
        "a withdrawn account cannot log in: {}",
        r.text
    );
    let stats = op.stats().await;
    assert_eq!(stats["points_granted"], 2500, "the ledger stays: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_grants_points_and_reads_stats() {
    let env = TestEnv::start("admin").await;
    let op = env.operator().await;
    let user = env.api.signup("jade").await;

    let r = op
        .grant_resp(&user.user_id, 1500, "booth")
        .await
        .expect(201);
    assert!(
        r["entry_id"].is_string() || r["entry_id"].is_number(),
        "{r}"
    );
    assert_eq!(r["points"], 1500);
    let r2 = op
        .grant_resp(&user.user_id, 1_000_000, "max")
        .await
        .expect(201);
    assert_eq!(r2["points"], 1_001_500);
    assert_ne!(r["entry_id"], r2["entry_id"]);
    assert_eq!(user.points().await, 1_001_500);

    op.grant_resp(&user.user_id, 0, "zero")
        .await
        .assert_invalid("amount");
    op.grant_resp(&user.user_id, -5, "negative")
        .await
        .assert_invalid("amount");
    op.grant_resp(&user.user_id, 1_000_001, "too much")
        .await
        .assert_invalid("amount");
    op.grant_resp("not-an-id", 100, "bad id")
        .await
        .assert_invalid("user_id");
    let stranger = comatching_protocol::UserId::new_v7().to_hex();
    op.grant_resp(&stranger, 100, "nobody")
        .await
        .assert_error(404, "not_found");
    assert_eq!(user.points().await, 1_001_500);

    let stats = op.stats().await;
    for key in [
        "users",
        "profiles",
        "matches",
        "open_holds",
        "points_granted",
        "points_spent",
    ] {
        assert!(
            stats[key].is_i64() || stats[key].is_u64(),
            "stats.{key}: {stats}"
        );
    }
    assert_eq!(stats["users"], 2);
    assert_eq!(stats["profiles"], 0);
    assert_eq!(stats["matches"], 0);
    assert_eq!(stats["open_holds"], 0);
    assert_eq!(stats["points_granted"], 1_001_500);
    assert_eq!(stats["points_spent"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_users_cannot_call_operator_routes() {
    let env = TestEnv::start("forbidden").await;
    let user = env.api.signup("kate").await;
    user.get("/api/v1/admin/stats")
        .await
        .assert_error(403, "forbidden");
    let body = json!({"user_id": user.user_id, "amount": 1000, "reason": "free money"});
    env.api
        .request(
            Method::POST,
            "/api/v1/admin/points",
            Some(&user.token),
            Some(&body),
            &[],
        )
        .await
        .assert_error(403, "forbidden");
    assert_eq!(user.points().await, 0);
}

/// A second user cannot read or change the first's data: every route acts on the caller only,
/// and idempotency keys are scoped per user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_only_see_and_change_their_own_data() {
    let env = TestEnv::start("isolation").await;
    let op = env.operator().await;
    let a = env
        .api
        .signup_with_profile("lena", &ProfileBuilder::male().nickname("lena"))
        .await;
    let b = env
        .api
        .signup_with_profile("mina", &ProfileBuilder::male().nickname("mina"))
        .await;
    let partner = env
        .api
        .signup_with_profile("nari", &ProfileBuilder::female())
        .await;
    let partner2 = env
        .api
        .signup_with_profile("olga", &ProfileBuilder::female().nickname("olga"))
        .await;
    op.grant(&a, 3000).await;
    op.grant(&b, 3000).await;
    let responder = Responder::offering(&env.amqp_url(), vec![partner.id()]).await;

    let a_match = a
        .post_match("shared-key", &MatchOptionsBuilder::new())
        .await
        .expect(201);

    // B reads only B.
    let b_me = b.me_ok().await;
    assert_eq!(b_me["user_id"], json!(b.user_id));
    assert_eq!(b_me["profile"]["nickname"], "mina");
    assert_eq!(b_me["points"], 3000);
    assert!(b.matches().await.is_empty(), "B must not see A's matches");

    // B changing "its" profile leaves A's alone.
    b.set_profile(&ProfileBuilder::male().nickname("changed"))
        .await;
    assert_eq!(a.me_ok().await["profile"]["nickname"], "lena");

    // B reusing A's idempotency key gets its own match, not A's stored response.
    responder.set_script({
        let p2 = partner2.id();
        move |req| {
            comatching_tests::ResponderAction::Reply(comatching_tests::responder::ok_reply(
                req,
                &[p2],
            ))
        }
    });
    let b_match = b
        .post_match("shared-key", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_ne!(b_match["match_id"], a_match["match_id"]);
    assert_eq!(b_match["partner"]["user_id"], json!(partner2.user_id));
    assert_eq!(a.points().await, 2000);
    assert_eq!(b.points().await, 2000);

    // B logging out leaves A's session alone.
    assert_eq!(b.logout().await.status, 204);
    a.me_ok().await;
    assert_eq!(a.matches().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_requests_are_validated() {
    let env = TestEnv::start("match-validation").await;
    let op = env.operator().await;
    let user = env.api.signup("pia").await;
    op.grant(&user, 10_000).await;
    let opts = MatchOptionsBuilder::new();

    // No profile yet.
    user.post_match("k-profile", &opts)
        .await
        .assert_invalid("profile");
    user.set_profile(&ProfileBuilder::male()).await;

    // Missing, empty and over-long keys.
    let r = env
        .api
        .request(
            Method::POST,
            "/api/v1/matches",
            Some(&user.token),
            Some(opts.json()),
            &[],
        )
        .await;
    r.assert_error(400, "validation_failed");
    user.post_match("", &opts)
        .await
        .assert_error(400, "validation_failed");
    user.post_match(&"k".repeat(65), &opts)
        .await
        .assert_error(400, "validation_failed");

    // Bad options.
    user.post_match("k1", &opts.clone().age("ancient"))
        .await
        .assert_invalid("age");
    user.post_match("k2", &opts.clone().mbti("EI"))
        .await
        .assert_invalid("mbti");
    user.post_match("k3", &opts.clone().mbti("ENTPX"))
        .await
        .assert_invalid("mbti");
    user.post_match("k4", &opts.clone().hobby("cooking"))
        .await
        .assert_invalid("hobby");
    user.post_match("k5", &opts.clone().contact_frequency("hourly"))
        .await
        .assert_invalid("contact_frequency");
    user.post_match("k6", &opts.clone().important("age"))
        .await
        .assert_invalid("important");
    user.post_match("k7", &opts.clone().hobby("game").important("mbti"))
        .await
        .assert_invalid("important");
    user.post_match("k8", &opts.clone().important("looks"))
        .await
        .assert_invalid("important");

    // Nothing was reserved or charged by any of these.
    assert_eq!(user.points().await, 10_000);
    assert_eq!(op.open_holds().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_points_is_402_and_sends_nothing() {
    let env = TestEnv::start("insufficient").await;
    let op = env.operator().await;
    let user = env
        .api
        .signup_with_profile("quinn", &ProfileBuilder::male())
        .await;
    let partner = env
        .api
        .signup_with_profile("rosa", &ProfileBuilder::female())
        .await;
    let responder = Responder::offering(&env.amqp_url(), vec![partner.id()]).await;

    user.post_match("k0", &MatchOptionsBuilder::new())
        .await
        .assert_error(402, "insufficient_points");
    op.grant(&user, 1100).await;
    // 1000 + 200 (exclude same major) > 1100.
    user.post_match("k1", &MatchOptionsBuilder::new().exclude_same_major(true))
        .await
        .assert_error(402, "insufficient_points");
    assert_eq!(user.points().await, 1100);
    assert!(
        responder.requests().is_empty(),
        "no request may reach the matcher"
    );

    // Exactly enough works (and a 64-character key is a valid key).
    let m = user
        .post_match(&"k".repeat(64), &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(m["points"], 100);
    assert_eq!(user.points().await, 100);
}

/// One test for 429: per-user limits count a user's requests, per-IP limits count everyone's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited() {
    let env = TestEnv::start_with("rate-limit", |c| {
        c.rate_limit.per_user_per_minute = 5;
        c.rate_limit.per_ip_per_minute = 1_000;
    })
    .await;
    let user = env.api.signup("sara").await;
    let mut first_limited = None;
    for i in 0..20 {
        let r = user.me().await;
        if r.status == 429 {
            r.assert_error(429, "rate_limited");
            first_limited = Some(i);
            break;
        }
        assert_eq!(r.status, 200, "request {i}: {}", r.text);
    }
    let i = first_limited.expect("a user over 5 requests/minute is limited within 20 requests");
    assert!(i >= 4, "the first 5 requests pass; limited at request {i}");
    // Another user is not affected by sara's limit.
    let other = env.api.signup("tara").await;
    other.me_ok().await;
    drop(env);

    let vhost = Vhost::create("rate-limit-ip");
    let mut config = RelayConfig::new(vhost.amqp_url());
    config.rate_limit.per_ip_per_minute = 8;
    let relay = RelayProcess::start(config).await;
    let api = Api::new(relay.base_url());
    let mut limited = None;
    for i in 0..30 {
        let r = api.login("nobody", PASSWORD).await;
        if r.status == 429 {
            r.assert_error(429, "rate_limited");
            limited = Some(i);
            break;
        }
    }
    assert!(
        limited.is_some(),
        "anonymous requests beyond 8/minute from one IP are limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    // Broker unreachable: alive but not ready, and the API still answers.
    let mut config = RelayConfig::new(unreachable_amqp_url());
    config.rate_limit.per_ip_per_minute = 1_000_000;
    let mut relay = RelayProcess::start(config).await;
    let api = Api::new(relay.base_url());
    relay.wait_not_ready().await;
    assert_eq!(api.get("/healthz", None).await.status, 200);
    let user = api.signup("uma").await;
    user.set_profile(&ProfileBuilder::female()).await;

    // Point it at a real vhost and restart: ready.
    let vhost = Vhost::create("health");
    relay.set_broker_url(vhost.amqp_url());
    relay.restart().await;
    relay.wait_ready().await;
    assert_eq!(api.get("/healthz", None).await.status, 200);

    let r = api.get("/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.text.contains("# TYPE") || r.text.contains("# HELP"),
        "Prometheus text expected: {}",
        &r.text[..r.text.len().min(500)]
    );
}
