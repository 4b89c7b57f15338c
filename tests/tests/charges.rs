//! Issue 10 §3, the booth's workflow, against the real relay: charge requests and their limits,
//! one pending request per student, decisions that happen exactly once under real concurrency
//! (two operators; a student cancelling while an operator approves), object-level isolation on
//! every new route, the live streams (delivery within a second, resume after a disconnect),
//! the points history and the operator's look-up.

use std::time::Duration;

use comatching_tests::sse::{self, SseStream};
use comatching_tests::{Api, Operator, TestEnv, User};
use reqwest::Method;
use serde_json::{Value, json};

async fn post(api: &Api, path: &str, token: Option<&str>, body: &Value) -> comatching_tests::Resp {
    api.request(Method::POST, path, token, Some(body), &[])
        .await
}

async fn operator_stream(env: &TestEnv, op: &Operator, last: Option<i64>) -> SseStream {
    let mut s = sse::open(
        env.api.base_url(),
        "/api/v1/admin/charges/events",
        &op.user.token,
        last,
    )
    .await
    .expect("operator stream opens");
    let ready = s.expect_within(Duration::from_secs(5)).await;
    assert_eq!(ready.event, "ready", "first event: {ready:?}");
    s
}

async fn student_stream(env: &TestEnv, u: &User, last: Option<i64>) -> SseStream {
    let mut s = sse::open(env.api.base_url(), "/api/v1/me/events", &u.token, last)
        .await
        .expect("student stream opens");
    let ready = s.expect_within(Duration::from_secs(5)).await;
    assert_eq!(ready.event, "ready", "first event: {ready:?}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_validated_and_one_is_pending_at_a_time() {
    let env = TestEnv::start("charges-limits").await;
    let u = env.api.signup("student_a").await;
    for bad in [0, 999, 500, 1250, 100_500, 200_000, -1000] {
        u.request_charge(bad, "홍길동")
            .await
            .assert_invalid("amount");
    }
    for bad in [
        String::new(),
        "   ".to_owned(),
        "가".repeat(41),
        "abc\u{202E}def".to_owned(),
        "a\u{0007}b".to_owned(),
        "line\nbreak".to_owned(),
    ] {
        u.request_charge(5000, &bad)
            .await
            .assert_invalid("depositor");
    }
    // Wrong types and unknown fields are validation errors; nothing was filed.
    let r = post(
        &env.api,
        "/api/v1/me/charges",
        Some(&u.token),
        &json!({"amount": "5000", "depositor": "x"}),
    )
    .await;
    r.assert_invalid("amount");
    let r = post(
        &env.api,
        "/api/v1/me/charges",
        Some(&u.token),
        &json!({"amount": 5000, "depositor": "x", "status": "approved"}),
    )
    .await;
    r.assert_invalid("status");
    let list = u.get("/api/v1/me/charges").await.expect(200);
    assert_eq!(list["charges"], json!([]), "nothing filed by bad requests");

    // Bounds are inclusive; the depositor is trimmed.
    let c = u.request_charge(100_000, "  김민수 ").await.expect(201);
    assert_eq!(c["status"], "pending");
    assert_eq!(c["amount"], 100_000);
    assert_eq!(c["depositor"], "김민수");
    assert!(c["created_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    let id = c["charge_id"].as_str().unwrap().to_owned();
    u.request_charge(1000, "김민수")
        .await
        .assert_error(409, "charge_pending");

    // Cancel, once; then a new request may be filed.
    let r = u.cancel_charge(&id).await.expect(200);
    assert_eq!(r["charge"]["status"], "cancelled");
    u.cancel_charge(&id)
        .await
        .assert_error(409, "charge_decided");
    let second = u.request_charge(1000, "김민수").await.expect(201);
    let list = u.get("/api/v1/me/charges").await.expect(200);
    let ids: Vec<&str> = list["charges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["charge_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![second["charge_id"].as_str().unwrap(), id.as_str()],
        "newest first"
    );
    assert_eq!(u.points().await, 0, "nothing approved yet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_credits_once_and_the_ledger_shows_it() {
    let env = TestEnv::start("charges-approve").await;
    let op = env.operator().await;
    let a = env.api.signup("student_a").await;
    let b = env.api.signup("student_b").await;
    let ca = a.request_charge_ok(5000).await;
    let cb = b.request_charge_ok(1500).await;

    // The booth's queue: pending, oldest first, cursor-paged.
    let page = op
        .user
        .get("/api/v1/admin/charges?status=pending&limit=1")
        .await
        .expect(200);
    assert_eq!(page["charges"][0]["charge_id"], ca.as_str());
    assert_eq!(page["charges"][0]["username"], "student_a");
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let page = op
        .user
        .get(&format!(
            "/api/v1/admin/charges?status=pending&limit=1&cursor={cursor}"
        ))
        .await
        .expect(200);
    assert_eq!(page["charges"][0]["charge_id"], cb.as_str());
    assert_eq!(page["next_cursor"], Value::Null);
    op.user
        .get("/api/v1/admin/charges?status=weird")
        .await
        .assert_invalid("status");
    op.user
        .get("/api/v1/admin/charges?limit=0")
        .await
        .assert_invalid("limit");

    let r = op.approve(&ca).await.expect(200);
    assert_eq!(r["charge"]["status"], "approved");
    assert_eq!(r["charge"]["operator_id"], op.user.user_id.as_str());
    assert_eq!(r["points"], 5000);
    assert_eq!(a.points().await, 5000, "GET /me shows the points at once");
    op.approve(&ca).await.assert_error(409, "charge_decided");
    op.reject(&ca, "duplicate")
        .await
        .assert_error(409, "charge_decided");
    a.cancel_charge(&ca)
        .await
        .assert_error(409, "charge_decided");
    assert_eq!(a.points().await, 5000, "credited once");

    op.reject(&cb, "").await.assert_invalid("reason");
    let r = op.reject(&cb, "no transfer arrived").await.expect(200);
    assert_eq!(r["charge"]["status"], "rejected");
    assert_eq!(r["charge"]["reason"], "no transfer arrived");
    assert_eq!(b.points().await, 0);
    let decided = op
        .user
        .get("/api/v1/admin/charges?status=rejected")
        .await
        .expect(200);
    assert_eq!(decided["charges"][0]["charge_id"], cb.as_str());

    // The ledger: the grant names its charge, with the balance after it.
    op.grant(&a, 700).await;
    let ledger = a.get("/api/v1/me/ledger").await.expect(200);
    let entries = ledger["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{ledger}");
    assert_eq!(entries[0]["amount"], 700);
    assert_eq!(entries[0]["balance_after"], 5700);
    assert_eq!(entries[0]["reason"], "booth purchase");
    assert_eq!(entries[1]["charge_id"], ca.as_str());
    assert_eq!(entries[1]["balance_after"], 5000);
    let page = a.get("/api/v1/me/ledger?limit=1").await.expect(200);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let page = a
        .get(&format!("/api/v1/me/ledger?limit=1&cursor={cursor}"))
        .await
        .expect(200);
    assert_eq!(page["entries"][0]["charge_id"], ca.as_str());
    // The festival's report, beside the serving relay: the approval under its operator, the
    // grants by reason, and totals that reconcile (exit 0).
    let out = env.relay.run(&["admin", "report", "--format", "json"]);
    assert!(out.status.success(), "report: {out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(
        report["approved_by_operator_day"][0]["operator"],
        "operator"
    );
    assert_eq!(report["approved_by_operator_day"][0]["points"], 5000);
    assert_eq!(report["rejected_charges"], 1);
    assert_eq!(report["reconciliation"]["reconciled"], true);
    assert_eq!(report["reconciliation"]["balance_total"], 5700);
    let out = env
        .relay
        .run(&["admin", "report", "--format", "csv", "--from", "2000-01-01"]);
    assert!(out.status.success(), "report: {out:?}");
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.starts_with("section,day,key,count,points\n"), "{csv}");
    assert!(csv.contains(",operator,1,5000\n"), "{csv}");
    assert!(csv.contains("grants,,booth purchase,1,700\n"), "{csv}");
    let out = env.relay.run(&["admin", "report", "--format", "xml"]);
    assert_eq!(out.status.code(), Some(2), "a bad format is a usage error");

    a.get("/api/v1/me/ledger?cursor=abc")
        .await
        .assert_invalid("cursor");
    assert_eq!(
        b.get("/api/v1/me/ledger").await.expect(200)["entries"],
        json!([])
    );

    // The operators' view of a student's ledger is the student's own, page for page.
    let theirs = op
        .user
        .get(&format!("/api/v1/admin/users/{}/ledger", a.user_id))
        .await
        .expect(200);
    assert_eq!(theirs, ledger, "the operator sees what the student sees");
    let page = op
        .user
        .get(&format!("/api/v1/admin/users/{}/ledger?limit=1", a.user_id))
        .await
        .expect(200);
    assert_eq!(page["entries"][0]["reason"], "booth purchase");
    assert_eq!(page["entries"][0]["amount"], 700);
    assert_eq!(page["entries"][0]["balance_after"], 5700);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let page = op
        .user
        .get(&format!(
            "/api/v1/admin/users/{}/ledger?limit=1&cursor={cursor}",
            a.user_id
        ))
        .await
        .expect(200);
    assert_eq!(page["entries"][0]["charge_id"], ca.as_str());
    assert_eq!(page["next_cursor"], Value::Null);
    assert_eq!(
        op.user
            .get(&format!("/api/v1/admin/users/{}/ledger", b.user_id))
            .await
            .expect(200)["entries"],
        json!([])
    );
    for bad in ["limit=0", "limit=101", "cursor=abc", "cursor=0", "other=1"] {
        let field = bad.split('=').next().unwrap();
        let r = op
            .user
            .get(&format!("/api/v1/admin/users/{}/ledger?{bad}", a.user_id))
            .await;
        if field == "other" {
            r.assert_error(400, "validation_failed");
        } else {
            r.assert_invalid(field);
        }
    }
}

/// Two operators approve the same requests at the same moment: one 200, one 409, one grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_approvals_decide_exactly_once() {
    let env = TestEnv::start("charges-race").await;
    let op1 = env.operator().await;
    let op2 = Operator::create(&env.api, &env.relay, "operator2").await;
    let mut students = Vec::new();
    for i in 0..12 {
        let u = env.api.signup(&format!("racer_{i}")).await;
        let id = u.request_charge_ok(1000 + 500 * i).await;
        students.push((u, id, 1000 + 500 * i));
    }
    let races = students.iter().map(|(_, id, _)| {
        let (op1, op2) = (&op1, &op2);
        async move { tokio::join!(op1.approve(id), op2.approve(id)) }
    });
    let results = futures_util::future::join_all(races).await;
    for ((u, _, amount), (r1, r2)) in students.iter().zip(results) {
        let mut statuses = [r1.status, r2.status];
        statuses.sort();
        assert_eq!(statuses, [200, 409], "{} / {}", r1.text, r2.text);
        let loser = if r1.status == 409 { &r1 } else { &r2 };
        loser.assert_error(409, "charge_decided");
        assert_eq!(u.points().await, *amount, "credited exactly once");
    }
    let stats = op1.stats().await;
    let total: i64 = students.iter().map(|s| s.2).sum();
    assert_eq!(stats["points_granted"], total);
}

/// A student cancels while an operator approves: exactly one wins, and the points agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_and_approve_race_to_one_outcome() {
    let env = TestEnv::start("charges-cancel-race").await;
    let op = env.operator().await;
    let mut outcomes = (0, 0);
    for i in 0..12 {
        let u = env.api.signup(&format!("canceller_{i}")).await;
        let id = u.request_charge_ok(2000).await;
        let (approve, cancel) = tokio::join!(op.approve(&id), u.cancel_charge(&id));
        match (approve.status, cancel.status) {
            (200, 409) => {
                cancel.assert_error(409, "charge_decided");
                assert_eq!(u.points().await, 2000);
                outcomes.0 += 1;
            }
            (409, 200) => {
                approve.assert_error(409, "charge_decided");
                assert_eq!(u.points().await, 0);
                outcomes.1 += 1;
            }
            other => panic!(
                "both or neither won: {other:?}: {} / {}",
                approve.text, cancel.text
            ),
        }
        let mine = u.get("/api/v1/me/charges").await.expect(200);
        let status = mine["charges"][0]["status"].as_str().unwrap().to_owned();
        assert!(
            (status == "approved") == (u.points().await == 2000),
            "status {status} disagrees with the points"
        );
    }
    assert_eq!(outcomes.0 + outcomes.1, 12);
}

/// Object-level isolation: another student's request is not found (never forbidden), students
/// cannot reach the operators' routes, and nothing answers without a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_new_route_checks_who_is_asking() {
    let env = TestEnv::start("charges-bola").await;
    let op = env.operator().await;
    let a = env.api.signup("student_a").await;
    let b = env.api.signup("student_b").await;
    let id = a.request_charge_ok(3000).await;

    b.cancel_charge(&id).await.assert_error(404, "not_found");
    b.cancel_charge("0123456789abcdef0123456789abcdef")
        .await
        .assert_error(404, "not_found");
    b.cancel_charge("not-an-id")
        .await
        .assert_error(404, "not_found");
    let theirs = b.get("/api/v1/me/charges").await.expect(200);
    assert_eq!(theirs["charges"], json!([]), "b sees none of a's requests");
    assert_eq!(
        b.get("/api/v1/me/ledger").await.expect(200)["entries"],
        json!([])
    );

    // Students on operator routes: 403, and nothing changes.
    let student_as_op = Operator { user: b.clone() };
    student_as_op
        .approve(&id)
        .await
        .assert_error(403, "forbidden");
    student_as_op
        .reject(&id, "no")
        .await
        .assert_error(403, "forbidden");
    let a_ledger = format!("/api/v1/admin/users/{}/ledger", a.user_id);
    for path in [
        "/api/v1/admin/charges",
        "/api/v1/admin/users?q=stu",
        "/api/v1/admin/charges/events",
        &a_ledger,
        &format!("/api/v1/admin/users/{}/ledger", b.user_id),
        "/api/v1/admin/users/not-an-id/ledger",
    ] {
        b.get(path).await.assert_error(403, "forbidden");
    }
    let by_name = json!({"username": "student_b", "amount": 100, "reason": "x"});
    post(&env.api, "/api/v1/admin/points", Some(&b.token), &by_name)
        .await
        .assert_error(403, "forbidden");
    assert_eq!(b.points().await, 0);
    assert_eq!(
        a.get("/api/v1/me/charges").await.expect(200)["charges"][0]["status"],
        "pending"
    );

    // No session: 401 everywhere.
    for (m, path) in [
        (Method::POST, "/api/v1/me/charges".to_owned()),
        (Method::GET, "/api/v1/me/charges".to_owned()),
        (Method::DELETE, format!("/api/v1/me/charges/{id}")),
        (Method::GET, "/api/v1/me/ledger".to_owned()),
        (Method::GET, "/api/v1/me/events".to_owned()),
        (Method::GET, "/api/v1/admin/charges".to_owned()),
        (Method::GET, "/api/v1/admin/charges/events".to_owned()),
        (Method::POST, format!("/api/v1/admin/charges/{id}/approve")),
        (Method::POST, format!("/api/v1/admin/charges/{id}/reject")),
        (Method::GET, "/api/v1/admin/users?q=a".to_owned()),
        (Method::GET, a_ledger.clone()),
    ] {
        env.api
            .request(m.clone(), &path, None, Some(&json!({})), &[])
            .await
            .assert_error(401, "unauthorized");
    }
    // The operator still sees it pending.
    let q = op.user.get("/api/v1/admin/charges").await.expect(200);
    assert_eq!(q["charges"][0]["charge_id"], id.as_str());

    // An operator asking for a user that does not exist: 404; for something that is not a
    // user id: 400. Neither leaks anything else.
    op.user
        .get("/api/v1/admin/users/0190e0a1b2c37d4e8f90a1b2c3d4e5f6/ledger")
        .await
        .assert_error(404, "not_found");
    for bad in [
        "not-an-id",
        "0190E0A1B2C37D4E8F90A1B2C3D4E5F6",
        "0190e0a1b2c3",
    ] {
        op.user
            .get(&format!("/api/v1/admin/users/{bad}/ledger"))
            .await
            .assert_invalid("user_id");
    }
    assert_eq!(
        op.user.get(&a_ledger).await.expect(200)["entries"],
        json!([]),
        "a's pending request is not a ledger entry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_find_students_and_grant_by_username() {
    let env = TestEnv::start("charges-users").await;
    let op = env.operator().await;
    let mut us = Vec::new();
    for name in ["kim_a", "kim_b", "kimchi", "lee"] {
        us.push(env.api.signup(name).await);
    }
    let pending = us[1].request_charge_ok(2500).await;
    let found = op.user.get("/api/v1/admin/users?q=kim").await.expect(200);
    let names: Vec<&str> = found["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["kim_a", "kim_b", "kimchi"]);
    assert_eq!(
        found["users"][1]["pending_charge"]["charge_id"],
        pending.as_str()
    );
    assert_eq!(found["users"][0]["pending_charge"], Value::Null);
    assert_eq!(found["users"][0]["matches"], 0);
    for bad in ["", "K", "a%25", &"a".repeat(33)] {
        op.user
            .get(&format!("/api/v1/admin/users?q={bad}"))
            .await
            .assert_invalid("q");
    }
    // Grants by username, or by user id; not both, not neither, not unknown.
    let by_name = json!({"username": "lee", "amount": 1200, "reason": "prize"});
    let r = post(
        &env.api,
        "/api/v1/admin/points",
        Some(&op.user.token),
        &by_name,
    )
    .await
    .expect(201);
    assert_eq!(r["points"], 1200);
    assert_eq!(r["user_id"], us[3].user_id.as_str());
    assert_eq!(us[3].points().await, 1200);
    let both = json!({"username": "lee", "user_id": us[3].user_id, "amount": 1, "reason": "x"});
    post(
        &env.api,
        "/api/v1/admin/points",
        Some(&op.user.token),
        &both,
    )
    .await
    .assert_invalid("user_id");
    let unknown = json!({"username": "nobody_here", "amount": 1, "reason": "x"});
    post(
        &env.api,
        "/api/v1/admin/points",
        Some(&op.user.token),
        &unknown,
    )
    .await
    .assert_error(404, "not_found");
    assert_eq!(op.grant(&us[0], 300).await, 300, "by user_id still works");
    let found = op.user.get("/api/v1/admin/users?q=kim_a").await.expect(200);
    assert_eq!(found["users"][0]["points"], 300);
}

/// An operator's stream shows a student's request within a second; a stream that was away
/// gets what it missed after `Last-Event-ID`; a student's stream shows its own decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_deliver_and_resume() {
    let env = TestEnv::start("charges-sse").await;
    let op = env.operator().await;
    let a = env.api.signup("student_a").await;
    let b = env.api.signup("student_b").await;

    let mut ops = operator_stream(&env, &op, None).await;
    let mut mine = student_stream(&env, &a, None).await;
    let theirs = student_stream(&env, &b, None).await;
    let ca = a.request_charge_ok(4000).await;
    let created = ops.expect_within(Duration::from_secs(1)).await;
    assert_eq!(created.event, "charge.created");
    assert_eq!(created.data["charge"]["charge_id"], ca.as_str());
    assert_eq!(created.data["charge"]["depositor"], "홍길동");
    let seen = created.id.expect("events carry ids");

    // The operator's page goes away; meanwhile b files, a's request is approved.
    drop(ops);
    let cb = b.request_charge_ok(1000).await;
    op.approve(&ca).await.expect(200);
    let decided = mine
        .expect_kind("charge.decided", Duration::from_secs(5))
        .await;
    assert_eq!(decided.data["charge"]["status"], "approved");
    assert_eq!(decided.data["points"], 4000);
    let points = mine
        .expect_kind("points.changed", Duration::from_secs(5))
        .await;
    assert_eq!(points.data["points"], 4000);
    let a_last = mine.last_id;
    drop(mine);

    // Reconnecting with Last-Event-ID replays exactly what was missed, in order.
    let mut ops = operator_stream(&env, &op, Some(seen)).await;
    let e1 = ops.expect_within(Duration::from_secs(5)).await;
    assert_eq!(
        (e1.event.as_str(), &e1.data["charge"]["charge_id"]),
        ("charge.created", &json!(cb))
    );
    let e2 = ops.expect_within(Duration::from_secs(5)).await;
    assert_eq!(
        (e2.event.as_str(), &e2.data["charge"]["charge_id"]),
        ("charge.decided", &json!(ca))
    );
    assert!(e1.id < e2.id && e1.id > Some(seen));

    // b cancels while a's stream is away; a's resumed stream has nothing of b's.
    b.cancel_charge(&cb).await.expect(200);
    let e3 = ops.expect_within(Duration::from_secs(1)).await;
    assert_eq!(e3.event, "charge.cancelled");
    let mut mine = student_stream(&env, &a, a_last).await;
    assert!(
        mine.next_within(Duration::from_millis(500)).await.is_none(),
        "a's stream shows nothing that is not a's"
    );
    drop(theirs);

    // A Last-Event-ID beyond the log (a restored database, a forged id) means resync.
    let mut s = sse::open(
        env.api.base_url(),
        "/api/v1/me/events",
        &a.token,
        Some(1_000_000),
    )
    .await
    .expect("opens");
    assert_eq!(s.expect_within(Duration::from_secs(5)).await.event, "ready");
    assert_eq!(
        s.expect_within(Duration::from_secs(5)).await.event,
        "resync"
    );
    let r = env
        .api
        .request(
            Method::GET,
            "/api/v1/me/events",
            Some(&a.token),
            None,
            &[("last-event-id", "abc")],
        )
        .await;
    r.assert_invalid("Last-Event-ID");
}

/// Withdrawing cancels the pending request, and the operators' queue no longer shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawal_cancels_the_pending_request() {
    let env = TestEnv::start("charges-withdraw").await;
    let op = env.operator().await;
    let a = env.api.signup("student_a").await;
    let id = a.request_charge_ok(3000).await;
    assert_eq!(a.delete_me().await.status, 204);
    let q = op.user.get("/api/v1/admin/charges").await.expect(200);
    assert_eq!(q["charges"], json!([]));
    op.approve(&id).await.assert_error(409, "charge_decided");
    let cancelled = op
        .user
        .get("/api/v1/admin/charges?status=cancelled")
        .await
        .expect(200);
    assert_eq!(
        cancelled["charges"][0]["depositor"], "",
        "the name is erased"
    );
}

/// At most `events.max_streams` streams: one more is 503 `too_many_streams`; a closed stream's
/// slot is free again (waited for, not timed: the relay notices a closed connection at its next
/// write, a keep-alive here); idle streams get keep-alive comments; `/metrics` counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_capped_and_kept_alive() {
    let env = TestEnv::start_with("charges-cap", |c| {
        c.events = Some(comatching_tests::relay::EventsSection {
            keep_alive_s: 1,
            max_streams: 2,
            retention_hours: 24,
            retention_rows: 20_000,
        })
    })
    .await;
    let op = env.operator().await;
    let a = env.api.signup("student_a").await;
    let first = operator_stream(&env, &op, None).await;
    let mut second = student_stream(&env, &a, None).await;
    let (status, body) = sse::open(env.api.base_url(), "/api/v1/me/events", &a.token, None)
        .await
        .err()
        .expect("a third stream is refused");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too_many_streams"), "{body}");
    let metrics = env.api.get("/metrics", None).await.text;
    assert!(
        metrics.contains("comatching_sse_streams 2"),
        "metrics: {metrics}"
    );

    // Idle: keep-alive comments, no events.
    assert!(
        second
            .next_within(Duration::from_millis(2500))
            .await
            .is_none()
    );
    assert!(second.comments >= 1, "no keep-alive comment in 2.5 s");

    drop(first);
    let base = env.api.base_url().to_owned();
    let third = comatching_tests::wait_for(
        comatching_tests::PATIENCE,
        "the closed stream's slot to be free",
        || {
            let (base, token) = (base.clone(), op.user.token.clone());
            async move {
                sse::open(&base, "/api/v1/admin/charges/events", &token, None)
                    .await
                    .ok()
            }
        },
    )
    .await;
    drop(third);
}
