//! The API contract (issue 10 §2): the OpenAPI document the relay serves, generated from its
//! code, must not drift from what the relay does, from the committed `docs/openapi.json`, or
//! from the README's API table.
//!
//! * every documented operation is served (neither 404 nor 405), every other method on a
//!   documented path is 405, and the README's table lists exactly the documented operations;
//!   that every *served* route is documented holds by construction (`routes!` registers the
//!   route and its operation together; `cloud-relay/clippy.toml` forbids a plain `route`);
//! * the committed copy equals the served one, byte for byte (regenerate with
//!   `cargo run -q -p comatching-relay --bin comatching-relay -- openapi > docs/openapi.json`);
//! * a run of the real API (accounts, login, password, profile, grants, match, history,
//!   withdrawal, and errors along the way) answers only documented statuses, each body valid
//!   against the document's schema for that route and status, and covers every operation.

use std::collections::BTreeSet;

use comatching_protocol::ReplyStatus;
use comatching_tests::api::PASSWORD;
use comatching_tests::broker::workspace_root;
use comatching_tests::contract::{Contract, METHODS, Recorder, committed_path};
use comatching_tests::responder::{ok_reply, status_reply};
use comatching_tests::{
    MatchOptionsBuilder, PATIENCE, ProfileBuilder, Resp, Responder, ResponderAction, TestEnv, sse,
};
use reqwest::Method;
use serde_json::{Value, json};

fn method(m: &str) -> Method {
    Method::from_bytes(m.to_ascii_uppercase().as_bytes()).expect("HTTP method")
}

/// Concrete paths for templates (none have parameters yet; `{id}` gets a made-up id).
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|seg| {
            if seg.starts_with('{') {
                "0190f0f0f0f07000800000000000000a"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The (method, path) rows of README.md's API table.
fn readme_operations() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let start = text
        .find("| method | path | auth | purpose |")
        .expect("README has the API table");
    text[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (
                cells[1].to_ascii_lowercase(),
                cells[2].trim_matches('`').to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_is_served_and_nothing_else_on_its_paths() {
    let env = TestEnv::start("contract-routes").await;
    let served = env.api.get("/api/v1/openapi.json", None).await.expect(200);
    let contract = Contract::new(served);
    let ops = contract.operations();
    assert!(ops.len() >= 16, "suspiciously few operations: {ops:?}");

    for (m, template) in &ops {
        let path = concrete(template);
        let r = env.api.request(method(m), &path, None, None, &[]).await;
        assert_ne!(
            r.status, 405,
            "{m} {template} is documented but not served: {}",
            r.text
        );
        assert!(
            !(r.status == 404 && r.body["error"]["message"] == "no such route"),
            "{m} {template} is documented but not served: {}",
            r.text
        );
        for other in METHODS {
            if ops.contains(&(other.to_owned(), template.clone())) {
                continue;
            }
            let r = env.api.request(method(other), &path, None, None, &[]).await;
            r.assert_error(405, "method_not_allowed");
        }
    }
    env.api
        .get("/api/v1/not-a-route", None)
        .await
        .assert_error(404, "not_found");

    let readme = readme_operations();
    assert_eq!(
        readme, ops,
        "README.md's API table and the OpenAPI document list different operations"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_document_is_the_served_one() {
    let env = TestEnv::start("contract-committed").await;
    let served = env.api.get("/api/v1/openapi.json", None).await;
    assert_eq!(served.status, 200, "{}", served.text);
    assert_eq!(served.header("content-type"), Some("application/json"));
    let committed = std::fs::read_to_string(committed_path()).expect("docs/openapi.json");
    assert!(
        served.text == committed,
        "docs/openapi.json differs from the served document; regenerate it with\n  \
         cargo run -q -p comatching-relay --bin comatching-relay -- openapi > docs/openapi.json"
    );
    // The command the README names prints the same bytes.
    let out = env
        .relay
        .command()
        .arg("openapi")
        .output()
        .expect("run comatching-relay openapi");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout) == committed);
    // It is the OpenAPI version the issue asks for, with the bearer scheme.
    let doc: Value = serde_json::from_str(&committed).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."));
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

/// What a stream's opening answer is, for the recorder (its body never ends).
fn stream_resp() -> Resp {
    Resp {
        status: 200,
        body: Value::Null,
        text: String::new(),
        headers: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_run_fits_the_document() {
    let env = TestEnv::start("contract-run").await;
    let contract = Contract::committed();
    let rec = Recorder::new(&contract, env.api.clone());
    let (post, get, put, delete) = (Method::POST, Method::GET, Method::PUT, Method::DELETE);

    // Service routes.
    rec.call(get.clone(), "/api/v1/openapi.json", None, None, &[])
        .await;
    rec.call(get.clone(), "/healthz", None, None, &[]).await;
    rec.call(get.clone(), "/readyz", None, None, &[]).await;
    rec.call(get.clone(), "/metrics", None, None, &[]).await;

    // Accounts and sessions, with their errors.
    let creds = |u: &str, p: &str| json!({"username": u, "password": p});
    let a = rec
        .call(
            post.clone(),
            "/api/v1/accounts",
            None,
            Some(&creds("cara", PASSWORD)),
            &[],
        )
        .await
        .expect(201);
    let a_token = a["token"].as_str().unwrap().to_owned();
    rec.call(
        post.clone(),
        "/api/v1/accounts",
        None,
        Some(&creds("cara", PASSWORD)),
        &[],
    )
    .await
    .assert_error(409, "username_taken");
    rec.call(
        post.clone(),
        "/api/v1/accounts",
        None,
        Some(&creds("C", "short")),
        &[],
    )
    .await
    .assert_invalid("username");
    rec.call_raw(
        post.clone(),
        "/api/v1/accounts",
        None,
        "application/json",
        "x".repeat(20_000),
    )
    .await
    .assert_error(413, "payload_too_large");
    rec.call(
        post.clone(),
        "/api/v1/sessions",
        None,
        Some(&creds("cara", "wrong password")),
        &[],
    )
    .await
    .assert_error(401, "unauthorized");
    let login = rec
        .call(
            post.clone(),
            "/api/v1/sessions",
            None,
            Some(&creds("cara", PASSWORD)),
            &[],
        )
        .await
        .expect(200);
    let second_token = login["token"].as_str().unwrap().to_owned();
    rec.call(get.clone(), "/api/v1/me", None, None, &[])
        .await
        .assert_error(401, "unauthorized");
    let me = rec
        .call(get.clone(), "/api/v1/me", Some(&a_token), None, &[])
        .await
        .expect(200);
    assert_eq!(me["profile"], Value::Null);

    // Password: wrong current, too short, then a change (the other session ends).
    let change = |cur: &str, new: &str| json!({"current": cur, "new": new});
    rec.call(
        put.clone(),
        "/api/v1/me/password",
        Some(&a_token),
        Some(&change("nope nope nope", "another good one")),
        &[],
    )
    .await
    .assert_error(403, "wrong_password");
    rec.call(
        put.clone(),
        "/api/v1/me/password",
        Some(&a_token),
        Some(&change(PASSWORD, "short")),
        &[],
    )
    .await
    .assert_invalid("new");
    let r = rec
        .call(
            put.clone(),
            "/api/v1/me/password",
            Some(&a_token),
            Some(&change(PASSWORD, "another good one")),
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    rec.call(get.clone(), "/api/v1/me", Some(&second_token), None, &[])
        .await
        .assert_error(401, "unauthorized");

    // Profile.
    let profile = ProfileBuilder::female().nickname("cara");
    rec.call(
        put.clone(),
        "/api/v1/me/profile",
        Some(&a_token),
        Some(&json!({"nickname": "x"})),
        &[],
    )
    .await
    .assert_error(400, "validation_failed");
    rec.call(
        put.clone(),
        "/api/v1/me/profile",
        Some(&a_token),
        Some(profile.json()),
        &[],
    )
    .await
    .expect(200);
    let me = rec
        .call(get.clone(), "/api/v1/me", Some(&a_token), None, &[])
        .await
        .expect(200);
    assert_eq!(me["profile"]["nickname"], "cara");

    // Operators: grants, stats, appliances; a student is refused.
    let op = env.operator().await;
    let op_token = op.user.token.clone();
    let partner = env
        .api
        .signup_with_profile("dami", &ProfileBuilder::male())
        .await;
    let grant =
        |user: &str, amount: i64| json!({"user_id": user, "amount": amount, "reason": "booth"});
    rec.call(
        post.clone(),
        "/api/v1/admin/points",
        Some(&a_token),
        Some(&grant(a["user_id"].as_str().unwrap(), 5)),
        &[],
    )
    .await
    .assert_error(403, "forbidden");
    rec.call(
        post.clone(),
        "/api/v1/admin/points",
        Some(&op_token),
        Some(&grant("0190f0f0f0f07000800000000000000a", 5)),
        &[],
    )
    .await
    .assert_error(404, "not_found");
    // Matches: no points yet.
    let opts = MatchOptionsBuilder::new();
    rec.call(
        post.clone(),
        "/api/v1/matches",
        Some(&a_token),
        Some(opts.json()),
        &[("Idempotency-Key", "k0")],
    )
    .await
    .assert_error(402, "insufficient_points");
    rec.call(
        post.clone(),
        "/api/v1/admin/points",
        Some(&op_token),
        Some(&grant(a["user_id"].as_str().unwrap(), 3000)),
        &[],
    )
    .await
    .expect(201);
    rec.call(
        get.clone(),
        "/api/v1/admin/stats",
        Some(&op_token),
        None,
        &[],
    )
    .await
    .expect(200);
    rec.call(
        get.clone(),
        "/api/v1/admin/stats",
        Some(&a_token),
        None,
        &[],
    )
    .await
    .assert_error(403, "forbidden");
    rec.call(
        get.clone(),
        "/api/v1/admin/appliances",
        Some(&op_token),
        None,
        &[],
    )
    .await
    .expect(200);

    // The booth: live streams open first, then a charge request, decided and cancelled.
    let mut student_stream = sse::open(env.api.base_url(), "/api/v1/me/events", &a_token, None)
        .await
        .expect("student stream");
    rec.record("GET", "/api/v1/me/events", &stream_resp());
    let mut operator_stream = sse::open(
        env.api.base_url(),
        "/api/v1/admin/charges/events",
        &op_token,
        None,
    )
    .await
    .expect("operator stream");
    rec.record("GET", "/api/v1/admin/charges/events", &stream_resp());
    rec.call(
        get.clone(),
        "/api/v1/admin/charges/events",
        Some(&a_token),
        None,
        &[],
    )
    .await
    .assert_error(403, "forbidden");
    rec.call(
        get.clone(),
        "/api/v1/me/events",
        Some(&a_token),
        None,
        &[("Last-Event-ID", "x")],
    )
    .await
    .assert_invalid("Last-Event-ID");
    let charge = |amount: i64| json!({"amount": amount, "depositor": "Cara Kim"});
    rec.call(
        post.clone(),
        "/api/v1/me/charges",
        Some(&a_token),
        Some(&charge(1234)),
        &[],
    )
    .await
    .assert_invalid("amount");
    let c1 = rec
        .call(
            post.clone(),
            "/api/v1/me/charges",
            Some(&a_token),
            Some(&charge(5000)),
            &[],
        )
        .await
        .expect(201);
    let c1_id = c1["charge_id"].as_str().unwrap().to_owned();
    rec.call(
        post.clone(),
        "/api/v1/me/charges",
        Some(&a_token),
        Some(&charge(5000)),
        &[],
    )
    .await
    .assert_error(409, "charge_pending");
    rec.call(get.clone(), "/api/v1/me/charges", Some(&a_token), None, &[])
        .await
        .expect(200);
    rec.call(
        get.clone(),
        "/api/v1/me/charges?limit=0",
        Some(&a_token),
        None,
        &[],
    )
    .await
    .assert_invalid("limit");
    rec.call(
        get.clone(),
        "/api/v1/admin/charges?status=pending",
        Some(&op_token),
        None,
        &[],
    )
    .await
    .expect(200);
    rec.call(
        get.clone(),
        "/api/v1/admin/charges?status=bogus",
        Some(&op_token),
        None,
        &[],
    )
    .await
    .assert_invalid("status");
    rec.call(
        get.clone(),
        "/api/v1/admin/charges",
        Some(&a_token),
        None,
        &[],
    )
    .await
    .assert_error(403, "forbidden");
    let approve = format!("/api/v1/admin/charges/{c1_id}/approve");
    rec.call(post.clone(), &approve, Some(&a_token), None, &[])
        .await
        .assert_error(403, "forbidden");
    let approved = rec
        .call(post.clone(), &approve, Some(&op_token), None, &[])
        .await
        .expect(200);
    assert_eq!(approved["points"], 8000);
    rec.call(post.clone(), &approve, Some(&op_token), None, &[])
        .await
        .assert_error(409, "charge_decided");
    rec.call(
        post.clone(),
        "/api/v1/admin/charges/0190f0f0f0f07000800000000000000a/approve",
        Some(&op_token),
        None,
        &[],
    )
    .await
    .assert_error(404, "not_found");
    let c2 = rec
        .call(
            post.clone(),
            "/api/v1/me/charges",
            Some(&a_token),
            Some(&charge(1000)),
            &[],
        )
        .await
        .expect(201);
    let cancel = format!("/api/v1/me/charges/{}", c2["charge_id"].as_str().unwrap());
    rec.call(delete.clone(), &cancel, Some(&a_token), None, &[])
        .await
        .expect(200);
    rec.call(delete.clone(), &cancel, Some(&a_token), None, &[])
        .await
        .assert_error(409, "charge_decided");
    rec.call(
        delete.clone(),
        "/api/v1/me/charges/0190f0f0f0f07000800000000000000a",
        Some(&a_token),
        None,
        &[],
    )
    .await
    .assert_error(404, "not_found");
    let c3 = rec
        .call(
            post.clone(),
            "/api/v1/me/charges",
            Some(&a_token),
            Some(&charge(1500)),
            &[],
        )
        .await
        .expect(201);
    let reject = format!(
        "/api/v1/admin/charges/{}/reject",
        c3["charge_id"].as_str().unwrap()
    );
    rec.call(
        post.clone(),
        &reject,
        Some(&op_token),
        Some(&json!({})),
        &[],
    )
    .await
    .assert_invalid("reason");
    rec.call(
        post.clone(),
        &reject,
        Some(&op_token),
        Some(&json!({"reason": "no such transfer"})),
        &[],
    )
    .await
    .expect(200);
    rec.call(get.clone(), "/api/v1/me/ledger", Some(&a_token), None, &[])
        .await
        .expect(200);
    rec.call(
        get.clone(),
        "/api/v1/admin/users?q=ca",
        Some(&op_token),
        None,
        &[],
    )
    .await
    .expect(200);
    rec.call(
        get.clone(),
        "/api/v1/admin/users?q=C!",
        Some(&op_token),
        None,
        &[],
    )
    .await
    .assert_invalid("q");
    rec.call(
        post.clone(),
        "/api/v1/admin/points",
        Some(&op_token),
        Some(&json!({"username": "cara", "amount": 1, "reason": "by name"})),
        &[],
    )
    .await
    .expect(201);
    let a_ledger = format!(
        "/api/v1/admin/users/{}/ledger?limit=2",
        a["user_id"].as_str().unwrap()
    );
    let page = rec
        .call(get.clone(), &a_ledger, Some(&op_token), None, &[])
        .await
        .expect(200);
    assert_eq!(page["entries"][0]["reason"], "by name");
    rec.call(
        get.clone(),
        "/api/v1/admin/users/0190e0a1b2c37d4e8f90a1b2c3d4e5f6/ledger",
        Some(&op_token),
        None,
        &[],
    )
    .await
    .assert_error(404, "not_found");
    rec.call(
        get.clone(),
        "/api/v1/admin/users/CARA/ledger",
        Some(&op_token),
        None,
        &[],
    )
    .await
    .assert_invalid("user_id");
    rec.call(get.clone(), &a_ledger, Some(&a_token), None, &[])
        .await
        .assert_error(403, "forbidden");
    // The streams saw it, and what they carried fits the document's schemas.
    let created = operator_stream
        .expect_kind("charge.created", PATIENCE)
        .await;
    contract
        .check_schema("ChargeView", &created.data["charge"])
        .unwrap();
    let decided = student_stream.expect_kind("charge.decided", PATIENCE).await;
    contract
        .check_schema("ChargeView", &decided.data["charge"])
        .unwrap();
    assert_eq!(decided.data["charge"]["charge_id"], json!(c1_id));

    // Matches: a missing key, nobody, a match, a reused key, the history.
    rec.call(
        post.clone(),
        "/api/v1/matches",
        Some(&a_token),
        Some(opts.json()),
        &[],
    )
    .await
    .assert_invalid("Idempotency-Key");
    // Nobody answers (no appliance yet): 503 after the deadline, nothing charged.
    rec.call(
        post.clone(),
        "/api/v1/matches",
        Some(&a_token),
        Some(opts.json()),
        &[("Idempotency-Key", "k1")],
    )
    .await
    .assert_error(503, "matcher_unavailable");
    let responder = Responder::start(&env.amqp_url(), |req| {
        ResponderAction::Reply(status_reply(req, ReplyStatus::NoCandidate))
    })
    .await;
    rec.call(
        post.clone(),
        "/api/v1/matches",
        Some(&a_token),
        Some(opts.json()),
        &[("Idempotency-Key", "k1b")],
    )
    .await
    .assert_error(404, "no_candidate");
    responder.set_script({
        let p = partner.id();
        move |req| ResponderAction::Reply(ok_reply(req, &[p]))
    });
    let m = rec
        .call(
            post.clone(),
            "/api/v1/matches",
            Some(&a_token),
            Some(opts.json()),
            &[("Idempotency-Key", "k2")],
        )
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], json!(partner.user_id));
    rec.call(
        post.clone(),
        "/api/v1/matches",
        Some(&a_token),
        Some(&json!({"age": "older"})),
        &[("Idempotency-Key", "k2")],
    )
    .await
    .assert_error(422, "idempotency_key_reused");
    let list = rec
        .call(get.clone(), "/api/v1/matches", Some(&a_token), None, &[])
        .await
        .expect(200);
    assert_eq!(list["matches"].as_array().unwrap().len(), 1);

    // The partner withdraws: the history and the replayed answer show a withdrawn partner.
    assert_eq!(partner.delete_me().await.status, 204);
    let list = rec
        .call(get.clone(), "/api/v1/matches", Some(&a_token), None, &[])
        .await
        .expect(200);
    assert_eq!(list["matches"][0]["partner"]["withdrawn"], true);
    let replay = rec
        .call(
            post.clone(),
            "/api/v1/matches",
            Some(&a_token),
            Some(opts.json()),
            &[("Idempotency-Key", "k2")],
        )
        .await
        .expect(201);
    assert_eq!(replay["partner"]["withdrawn"], true);

    // Logging out and withdrawing.
    let r = rec
        .call(
            delete.clone(),
            "/api/v1/sessions/current",
            Some(&op_token),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let r = rec
        .call(delete.clone(), "/api/v1/me", Some(&a_token), None, &[])
        .await;
    assert_eq!(r.status, 204, "{}", r.text);

    let failures = rec.failures();
    assert!(
        failures.is_empty(),
        "answers that do not fit the document:\n{}",
        failures.join("\n")
    );
    assert_eq!(
        rec.uncovered(),
        Vec::<(String, String)>::new(),
        "operations the run never called"
    );
    // Errors were validated too, not only successes.
    let error_statuses: BTreeSet<u16> = rec
        .seen()
        .iter()
        .map(|s| s.2)
        .filter(|s| *s >= 400)
        .collect();
    assert!(error_statuses.len() >= 8, "{error_statuses:?}");
}

#[test]
fn the_validator_catches_a_body_that_does_not_fit() {
    // The oracle itself must be able to say no: a session without its token, an error with a
    // code the route does not document, an undocumented status.
    let contract = Contract::committed();
    let resp = |status: u16, body: Value| comatching_tests::Resp {
        status,
        text: body.to_string(),
        body,
        headers: Default::default(),
    };
    let ok = resp(
        200,
        json!({"user_id": "0190f0f0f0f07000800000000000000a", "token": "t"}),
    );
    contract.check("POST", "/api/v1/sessions", &ok).unwrap();
    let missing = resp(200, json!({"user_id": "0190f0f0f0f07000800000000000000a"}));
    assert!(
        contract
            .check("POST", "/api/v1/sessions", &missing)
            .is_err()
    );
    let bad_id = resp(200, json!({"user_id": "XYZ", "token": "t"}));
    assert!(contract.check("POST", "/api/v1/sessions", &bad_id).is_err());
    let wrong_code = resp(
        409,
        json!({"error": {"code": "charge_pending", "message": "m"}}),
    );
    assert!(
        contract
            .check("POST", "/api/v1/accounts", &wrong_code)
            .is_err()
    );
    let right_code = resp(
        409,
        json!({"error": {"code": "username_taken", "message": "m", "field": "username"}}),
    );
    contract
        .check("POST", "/api/v1/accounts", &right_code)
        .unwrap();
    let undocumented = resp(418, json!({}));
    assert!(contract.check("GET", "/api/v1/me", &undocumented).is_err());
}
