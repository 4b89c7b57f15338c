//! `Idempotency-Key` on `POST /api/v1/matches`: a key buys at most one hold and one match per
//! user; the same key replays the first response exactly; the same key with another body is
//! refused.

use std::time::Duration;

use comatching_tests::responder::ok_reply;
use comatching_tests::{
    Gate, MatchOptionsBuilder, Operator, ProfileBuilder, Resp, Responder, ResponderAction, TestEnv,
    User,
};

const PASSES: i64 = 50_000;

async fn requester(env: &TestEnv, op: &Operator) -> User {
    let user = env
        .api
        .signup_with_profile("alex", &ProfileBuilder::male())
        .await;
    op.grant(&user, PASSES).await;
    user
}

async fn woman(env: &TestEnv, name: &str) -> User {
    env.api
        .signup_with_profile(name, &ProfileBuilder::female().nickname(name))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_replays_the_first_response() {
    let env = TestEnv::start("idem-replay").await;
    let op = env.operator().await;
    let me = requester(&env, &op).await;
    let p1 = woman(&env, "bea").await;
    let p2 = woman(&env, "cat").await;
    let responder = Responder::offering(&env.amqp_url(), vec![p1.id(), p2.id()]).await;
    let opts = MatchOptionsBuilder::new().mbti("EN");

    let first = me.post_match("once", &opts).await.expect(201);
    let second = me.post_match("once", &opts).await.expect(201);
    assert_eq!(
        first, second,
        "a replay must return the first response exactly"
    );
    assert_eq!(
        responder.requests().len(),
        1,
        "a replay must not ask the matcher again"
    );
    assert_eq!(me.points().await, PASSES - 1000);
    assert_eq!(me.matches().await.len(), 1);

    // A replay survives a crash of the relay.
    let mut relay = env.relay;
    relay.kill_9();
    relay.restart().await;
    relay.wait_ready().await;
    let third = me.post_match("once", &opts).await.expect(201);
    assert_eq!(first, third, "the stored response must survive a restart");
    assert_eq!(responder.requests().len(), 1);
    assert_eq!(me.points().await, PASSES - 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_body_is_422() {
    let env = TestEnv::start("idem-reuse").await;
    let op = env.operator().await;
    let me = requester(&env, &op).await;
    let p1 = woman(&env, "dee").await;
    let responder = Responder::offering(&env.amqp_url(), vec![p1.id()]).await;

    me.post_match("key-1", &MatchOptionsBuilder::new().mbti("EN"))
        .await
        .expect(201);
    me.post_match("key-1", &MatchOptionsBuilder::new().mbti("IS"))
        .await
        .assert_error(422, "idempotency_key_reused");
    me.post_match(
        "key-1",
        &MatchOptionsBuilder::new()
            .mbti("EN")
            .exclude_same_major(true),
    )
    .await
    .assert_error(422, "idempotency_key_reused");
    assert_eq!(responder.requests().len(), 1);
    assert_eq!(me.points().await, PASSES - 1000);
}

/// Ten requests with one key at the same moment: one hold, one request to the matcher, one
/// charge, and every answer is either the one response or "in progress".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_posts_with_one_key_make_one_hold() {
    let env = TestEnv::start("idem-concurrent").await;
    let op = env.operator().await;
    let me = requester(&env, &op).await;
    let partner = woman(&env, "eva").await;
    let gate = Gate::new();
    let responder = Responder::start(&env.amqp_url(), {
        let (gate, p) = (gate.clone(), partner.id());
        move |req| ResponderAction::ReplyWhenOpened(gate.clone(), ok_reply(req, &[p]))
    })
    .await;

    let opts = MatchOptionsBuilder::new().hobby("game");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (me, opts) = (me.clone(), opts.clone());
            tokio::spawn(async move { me.post_match("burst", &opts).await })
        })
        .collect();

    // The first request is provably in flight (its hold is written before it is published).
    responder.wait_for_requests(1).await;
    assert_eq!(
        op.open_holds().await,
        1,
        "exactly one hold while the request is in flight"
    );
    gate.open();

    let mut answers: Vec<Resp> = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("request task"));
    }
    let successes: Vec<&Resp> = answers.iter().filter(|r| r.status == 201).collect();
    assert!(!successes.is_empty(), "no request succeeded");
    for r in &answers {
        if r.status != 201 {
            r.assert_error(409, "idempotency_in_progress");
        }
    }
    for r in &successes {
        assert_eq!(r.body, successes[0].body, "responses to one key differ");
    }
    // After the dust settles the key replays the one response.
    let replay = me.post_match("burst", &opts).await.expect(201);
    assert_eq!(replay, successes[0].body);

    assert_eq!(
        responder.requests().len(),
        1,
        "one key must reach the matcher once"
    );
    assert_eq!(me.points().await, PASSES - 1000);
    assert_eq!(me.matches().await.len(), 1);
    let stats = op.stats().await;
    assert_eq!(stats["open_holds"], 0);
    assert_eq!(stats["matches"], 1);
    assert_eq!(stats["points_spent"], 1000);
}

/// While the first request with a key waits on a matcher that answers only after the deadline,
/// a second request with the same key gets 409 or the first's final answer — never a second
/// hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_while_the_first_waits_is_409_or_the_same_answer() {
    let env = TestEnv::start_with("idem-in-progress", |c| c.matching.deadline_ms = 1_500).await;
    let op = env.operator().await;
    let me = requester(&env, &op).await;
    let partner = woman(&env, "fia").await;
    let responder = Responder::start(&env.amqp_url(), {
        let p = partner.id();
        move |req| ResponderAction::ReplyAfter(Duration::from_millis(2_500), ok_reply(req, &[p]))
    })
    .await;
    let opts = MatchOptionsBuilder::new();

    let first = tokio::spawn({
        let (me, opts) = (me.clone(), opts.clone());
        async move { me.post_match("slow", &opts).await }
    });
    let seen = responder.wait_for_requests(1).await;
    let second = me.post_match("slow", &opts).await;
    assert!(
        op.open_holds().await <= 1,
        "at most one hold for one key at any time"
    );
    let first = first.await.expect("first request task");
    first.assert_error(503, "matcher_unavailable");
    if second.status == 409 {
        second.assert_error(409, "idempotency_in_progress");
    } else {
        assert_eq!(
            (second.status, &second.body),
            (first.status, &first.body),
            "the second request must get 409 or the first's final answer"
        );
    }

    // The late reply arrives and changes nothing.
    responder.wait_replied(seen[0].request.request_id).await;
    assert_eq!(
        responder.requests().len(),
        1,
        "one key must reach the matcher once"
    );
    assert_eq!(me.points().await, PASSES);
    assert!(me.matches().await.is_empty());
    let stats = op.stats().await;
    assert_eq!(stats["open_holds"], 0);
    assert_eq!(stats["points_spent"], 0);
}
