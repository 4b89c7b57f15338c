//! Matching through the relay with a scripted responder in the appliance's place: the relay's
//! hard filters against its own truth, the points it reserves, charges and refunds, and what it
//! does when the matcher is silent or late.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use comatching_protocol::stages::{self, StageCounts};
use comatching_protocol::{AgePreference, Criterion, Important, ReplyStatus, UserId};
use comatching_tests::responder::{ok_reply, ok_reply_relaxed, status_reply};
use comatching_tests::{
    MatchOptionsBuilder, Operator, ProfileBuilder, Responder, ResponderAction, TestEnv, User,
};
use serde_json::json;

const PASSES: i64 = 100_000;

async fn funded(env: &TestEnv, op: &Operator, name: &str, profile: ProfileBuilder) -> User {
    let user = env
        .api
        .signup_with_profile(name, &profile.nickname(name))
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
async fn a_match_reveals_the_partner_and_charges_the_cost() {
    let env = TestEnv::start("match-ok").await;
    let op = env.operator().await;
    let me = funded(
        &env,
        &op,
        "adam",
        ProfileBuilder::male().age(24).mbti("ISTJ"),
    )
    .await;
    let partner_profile = ProfileBuilder::female()
        .nickname("bora")
        .age(23)
        .mbti("ENFP")
        .hobbies(&["arts", "travel"])
        .contact_frequency("frequent")
        .major("Physics")
        .song("Ditto")
        .comment("hi")
        .contact("instagram", "bora.ig");
    let partner = env.api.signup_with_profile("bora", &partner_profile).await;
    let responder = Responder::offering(&env.amqp_url(), vec![partner.id()]).await;

    let opts = MatchOptionsBuilder::new()
        .age("younger")
        .mbti("EN")
        .hobby("arts")
        .contact_frequency("frequent")
        .important("mbti");
    let m = me.post_match("first", &opts).await.expect(201);
    assert!(
        m["match_id"].is_string() || m["match_id"].is_number(),
        "{m}"
    );
    assert_eq!(
        m["partner"],
        json!({
            "user_id": partner.user_id,
            "nickname": "bora",
            "gender": "female",
            "age": 23,
            "mbti": "ENFP",
            "hobbies": ["arts", "travel"],
            "contact_frequency": "frequent",
            "major": "Physics",
            "song": "Ditto",
            "comment": "hi",
            "contact": {"kind": "instagram", "handle": "bora.ig"},
        })
    );
    assert_eq!(m["cost"], 1300);
    assert_eq!(m["refunded"], 0);
    assert_eq!(m["relaxed"], json!([]));
    assert_eq!(m["points"], PASSES - 1300);
    assert_eq!(me.points().await, PASSES - 1300);

    // What the appliance was asked, and how.
    let seen = responder.wait_for_requests(1).await;
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    let req = &s.request;
    assert_eq!(req.requester.user_id, me.id());
    assert_eq!(req.requester.features.age.years(), 24);
    assert_eq!(req.requester.features.mbti.to_string(), "ISTJ");
    assert_eq!(req.k, 8);
    assert!(req.exclusions.is_empty());
    assert_eq!(req.options.age, AgePreference::Younger);
    assert_eq!(req.options.mbti.to_string(), "EN");
    assert_eq!(req.options.important, Important::Mbti);
    assert!(!req.options.exclude_same_major);
    assert!(
        req.deadline_unix_ms > s.received_unix_ms,
        "the deadline is in the future when the request arrives"
    );
    assert_eq!(s.correlation_id.as_deref(), Some(&*req.request_id.to_hex()));
    // The broker rewrites the pseudo-queue into a per-channel address.
    assert!(
        s.reply_to
            .as_deref()
            .is_some_and(|r| r.starts_with("amq.rabbitmq.reply-to.")),
        "direct reply-to expected: {:?}",
        s.reply_to
    );
    // Transient: a request lost with the broker is voided by the relay's deadline anyway.
    assert_eq!(s.delivery_mode, Some(1), "requests are transient");
    let ttl: u64 = s
        .expiration
        .as_deref()
        .expect("requests carry an expiration")
        .parse()
        .expect("expiration is milliseconds");
    assert!(ttl > 0 && ttl <= 5_000, "expiration {ttl} ms");
    assert!(responder.rejected().is_empty());

    // History and stats.
    let history = me.matches().await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["match_id"], m["match_id"]);
    assert_eq!(history[0]["partner"], m["partner"]);
    assert_eq!(history[0]["cost"], 1300);
    assert_eq!(history[0]["refunded"], 0);
    assert_eq!(history[0]["relaxed"], json!([]));
    assert!(
        history[0]["created_at_unix_ms"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000)
    );
    let stats = op.stats().await;
    assert_eq!(stats["matches"], 1);
    assert_eq!(stats["open_holds"], 0);
    assert_eq!(stats["points_spent"], 1300);
    assert_eq!(stats["profiles"], 2);

    // The match passed each stage of the relay's path once, and /metrics says so (issue 16:
    // `comatching-load --breakdown` reads these).
    let text = env.api.get("/metrics", None).await.text;
    let seen = StageCounts::parse(&text, stages::RELAY_FAMILY).expect("stages");
    for stage in stages::RELAY_STAGES {
        assert_eq!(
            seen.get(stage).map(StageCounts::total),
            Some(1),
            "stage {stage}: {seen:?}"
        );
    }
    let (sum_of_parts, total) = (
        ["hold", "publish", "round_trip", "settle"]
            .iter()
            .map(|s| seen[*s].sum_us)
            .sum::<u64>(),
        seen["total"].sum_us,
    );
    assert!(
        sum_of_parts <= total,
        "the stages are parts of the whole: {sum_of_parts} µs of {total} µs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_important_option_refunds_the_surcharge() {
    let env = TestEnv::start("match-refund").await;
    let op = env.operator().await;
    let me = funded(&env, &op, "ben", ProfileBuilder::male().major("Economics")).await;
    let p1 = woman(&env, "cara").await;
    let p2 = woman(&env, "dana").await;
    let _responder = Responder::start(&env.amqp_url(), {
        let (p1, p2) = (p1.id(), p2.id());
        move |req| {
            if req.options.important == Important::Age {
                ResponderAction::Reply(ok_reply_relaxed(req, &[p1], &[Criterion::Age]))
            } else {
                ResponderAction::Reply(ok_reply_relaxed(req, &[p2], &[Criterion::Mbti]))
            }
        }
    })
    .await;

    let m = me
        .post_match(
            "relaxed",
            &MatchOptionsBuilder::new()
                .age("older")
                .exclude_same_major(true)
                .important("age"),
        )
        .await
        .expect(201);
    assert_eq!(m["cost"], 1500);
    assert_eq!(m["refunded"], 300);
    assert_eq!(m["relaxed"], json!(["age"]));
    assert_eq!(m["points"], PASSES - 1200);
    assert_eq!(me.points().await, PASSES - 1200);

    // A relaxed criterion that is not the important one refunds nothing.
    let m = me
        .post_match("not-important", &MatchOptionsBuilder::new().mbti("IT"))
        .await
        .expect(201);
    assert_eq!(m["cost"], 1000);
    assert_eq!(m["refunded"], 0);
    assert_eq!(me.points().await, PASSES - 2200);
    assert_eq!(op.stats().await["points_spent"], 2200);
}

/// An appliance whose replica lags (or a buggy one) replies ok, *not* relaxed, with a first
/// candidate who misses the important option: the relay re-checks it against its own truth and
/// skips that candidate, so nobody pays the surcharge for a preference that was not met.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrelaxed_reply_that_misses_the_important_option_is_refused() {
    let env = TestEnv::start("match-important").await;
    let op = env.operator().await;
    let me = funded(&env, &op, "ari", ProfileBuilder::male().age(24)).await;
    let younger = env
        .api
        .signup_with_profile("bona", &ProfileBuilder::female().nickname("bona").age(20))
        .await;
    let older = env
        .api
        .signup_with_profile("cyra", &ProfileBuilder::female().nickname("cyra").age(27))
        .await;
    let offer = Arc::new(Mutex::new(vec![younger.id(), older.id()]));
    let _responder = Responder::start(&env.amqp_url(), {
        let offer = offer.clone();
        move |req| ResponderAction::Reply(ok_reply(req, &offer.lock().unwrap()))
    })
    .await;
    let opts = MatchOptionsBuilder::new().age("older").important("age");

    // The younger one is offered first and the reply claims nothing was relaxed.
    let m = me.post_match("imp-1", &opts).await.expect(201);
    assert_eq!(
        m["partner"]["user_id"],
        json!(older.user_id),
        "the relay took a candidate who misses the important option"
    );
    assert_eq!(
        (m["cost"].as_i64(), m["refunded"].as_i64()),
        (Some(1300), Some(0))
    );

    // Offered only candidates who miss it: nobody, and nothing charged.
    *offer.lock().unwrap() = vec![younger.id()];
    me.post_match("imp-2", &opts)
        .await
        .assert_error(404, "no_candidate");
    assert_eq!(me.points().await, PASSES - 1300);
    assert_eq!(op.stats().await["points_spent"], 1300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_matches_the_requester_with_themself() {
    let env = TestEnv::start("never-self").await;
    let op = env.operator().await;
    let me = funded(&env, &op, "carl", ProfileBuilder::male()).await;
    let other = woman(&env, "eun").await;
    let responder = Responder::offering(&env.amqp_url(), vec![me.id(), other.id()]).await;
    let m = me
        .post_match("k", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], json!(other.user_id));

    // Offered only themself: nobody.
    responder.set_script({
        let me = me.id();
        move |req| ResponderAction::Reply(ok_reply(req, &[me]))
    });
    me.post_match("k2", &MatchOptionsBuilder::new())
        .await
        .assert_error(404, "no_candidate");
    assert_eq!(me.points().await, PASSES - 1000);
}

/// The original service prevented repeats in one direction only: B could draw A after A drew B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_repeats_a_pair_in_either_direction() {
    let env = TestEnv::start("no-repeat").await;
    let op = env.operator().await;
    let a = funded(&env, &op, "dan", ProfileBuilder::male()).await;
    let b = funded(&env, &op, "fay", ProfileBuilder::female()).await;
    let c = woman(&env, "gia").await;
    let d = env
        .api
        .signup_with_profile("hal", &ProfileBuilder::male().nickname("hal"))
        .await;
    let (a_id, b_id, c_id, d_id) = (a.id(), b.id(), c.id(), d.id());
    let responder = Responder::start(&env.amqp_url(), move |req| {
        // Always offer the already-paired user first.
        let offer = if req.requester.user_id == a_id {
            vec![b_id, c_id]
        } else {
            vec![a_id, d_id]
        };
        ResponderAction::Reply(ok_reply(req, &offer))
    })
    .await;

    let first = a
        .post_match("a1", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(first["partner"]["user_id"], json!(b.user_id));

    // B is offered A first: the relay must skip A.
    let back = b
        .post_match("b1", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(
        back["partner"]["user_id"],
        json!(d.user_id),
        "B drew A back"
    );

    // A is offered B again first: skipped.
    let again = a
        .post_match("a2", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(
        again["partner"]["user_id"],
        json!(c.user_id),
        "A drew B twice"
    );

    // The relay also told the matcher whom to exclude, both directions.
    let seen = responder.wait_for_requests(3).await;
    assert!(
        seen[1].request.exclusions.contains(&a_id),
        "B's exclusions lack A"
    );
    assert!(
        seen[2].request.exclusions.contains(&b_id),
        "A's exclusions lack B"
    );

    // Offered only the partner again: nobody, and nothing charged.
    responder.set_script(move |req| ResponderAction::Reply(ok_reply(req, &[b_id])));
    a.post_match("a3", &MatchOptionsBuilder::new())
        .await
        .assert_error(404, "no_candidate");
    assert_eq!(a.points().await, PASSES - 2000);
    assert_eq!(b.points().await, PASSES - 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_opposite_gender_is_matched() {
    let env = TestEnv::start("gender").await;
    let op = env.operator().await;
    let me = funded(&env, &op, "ivan", ProfileBuilder::male()).await;
    let same = env
        .api
        .signup_with_profile("jon", &ProfileBuilder::male().nickname("jon"))
        .await;
    let opposite = woman(&env, "kim").await;
    let responder = Responder::offering(&env.amqp_url(), vec![same.id(), opposite.id()]).await;
    let m = me
        .post_match("k", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], json!(opposite.user_id));
    assert_eq!(m["partner"]["gender"], "female");

    // The same for a woman asking.
    let her = funded(&env, &op, "lia", ProfileBuilder::female()).await;
    let other_woman = woman(&env, "mei").await;
    responder.set_script({
        let (w, m) = (other_woman.id(), same.id());
        move |req| ResponderAction::Reply(ok_reply(req, &[w, m]))
    });
    let m = her
        .post_match("k", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], json!(same.user_id));
}

/// The original compared "TRUE" with "True" and never excluded anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_major_exclusion_really_excludes() {
    let env = TestEnv::start("same-major").await;
    let op = env.operator().await;
    let me = funded(
        &env,
        &op,
        "noah",
        ProfileBuilder::male().major("Computer Science"),
    )
    .await;
    // Same major, spelled differently.
    let same_major = env
        .api
        .signup_with_profile(
            "olive",
            &ProfileBuilder::female()
                .nickname("olive")
                .major("computer   SCIENCE"),
        )
        .await;
    let other_major = env
        .api
        .signup_with_profile(
            "pam",
            &ProfileBuilder::female().nickname("pam").major("Physics"),
        )
        .await;
    let responder =
        Responder::offering(&env.amqp_url(), vec![same_major.id(), other_major.id()]).await;

    let m = me
        .post_match(
            "exclude",
            &MatchOptionsBuilder::new().exclude_same_major(true),
        )
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], json!(other_major.user_id));
    assert_eq!(m["cost"], 1200);
    assert!(responder.requests()[0].request.options.exclude_same_major);

    // Without the option, the same major is fine.
    let m = me
        .post_match("no-exclude", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], json!(same_major.user_id));

    // Only same-major candidates left and the option set: nobody, nothing charged.
    let third = env
        .api
        .signup_with_profile(
            "quin",
            &ProfileBuilder::female()
                .nickname("quin")
                .major("Computer Science"),
        )
        .await;
    responder.set_script({
        let t = third.id();
        move |req| ResponderAction::Reply(ok_reply(req, &[t]))
    });
    me.post_match(
        "exclude-2",
        &MatchOptionsBuilder::new().exclude_same_major(true),
    )
    .await
    .assert_error(404, "no_candidate");
    assert_eq!(me.points().await, PASSES - 2200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dont_pick_me_and_withdrawn_users_are_skipped() {
    let env = TestEnv::start("opt-out").await;
    let op = env.operator().await;
    let me = funded(&env, &op, "ravi", ProfileBuilder::male()).await;
    let opted_out = env
        .api
        .signup_with_profile(
            "sue",
            &ProfileBuilder::female().nickname("sue").dont_pick_me(true),
        )
        .await;
    let withdrawn = woman(&env, "tia").await;
    assert_eq!(withdrawn.delete_me().await.status, 204);
    let no_profile = env.api.signup("una").await;
    let fine = woman(&env, "vera").await;
    let unknown = UserId::new_v7();
    let _responder = Responder::offering(
        &env.amqp_url(),
        vec![
            opted_out.id(),
            withdrawn.id(),
            no_profile.id(),
            unknown,
            fine.id(),
        ],
    )
    .await;
    let m = me
        .post_match("k", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], json!(fine.user_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pick_cap_is_honoured() {
    let env = TestEnv::start_with("pick-cap", |c| c.matching.max_picked = 1).await;
    let op = env.operator().await;
    let a1 = funded(&env, &op, "walt", ProfileBuilder::male()).await;
    let a2 = funded(&env, &op, "xavi", ProfileBuilder::male()).await;
    let popular = woman(&env, "yuna").await;
    let fallback = woman(&env, "zoe").await;
    let responder = Responder::offering(&env.amqp_url(), vec![popular.id(), fallback.id()]).await;

    let m = a1
        .post_match("k", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], json!(popular.user_id));
    // Picked once = at the cap: the next requester gets the fallback.
    let m = a2
        .post_match("k", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], json!(fallback.user_id));

    // Offered only capped users: nobody, nothing charged.
    let a3 = funded(&env, &op, "yoon", ProfileBuilder::male()).await;
    responder.set_script({
        let (p, f) = (popular.id(), fallback.id());
        move |req| ResponderAction::Reply(ok_reply(req, &[p, f]))
    });
    a3.post_match("k", &MatchOptionsBuilder::new())
        .await
        .assert_error(404, "no_candidate");
    assert_eq!(a3.points().await, PASSES);
    assert_eq!(op.stats().await["matches"], 2);
}

/// Concurrent requesters offered the same partner (cap 1) cannot both get her: the relay's
/// check-and-record is one transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_respect_the_pick_cap() {
    let env = TestEnv::start_with("concurrent-cap", |c| c.matching.max_picked = 1).await;
    let op = env.operator().await;
    let mut men = Vec::new();
    for i in 0..6 {
        men.push(funded(&env, &op, &format!("man_{i}"), ProfileBuilder::male()).await);
    }
    let mut women = Vec::new();
    for i in 0..6 {
        women.push(woman(&env, &format!("woman_{i}")).await);
    }
    let offer: Vec<UserId> = women.iter().map(|w| w.id()).collect();
    let _responder = Responder::offering(&env.amqp_url(), offer).await;
    let opts = MatchOptionsBuilder::new();
    let results =
        futures_util::future::join_all(men.iter().map(|m| m.post_match("same-time", &opts))).await;
    let mut partners = Vec::new();
    for r in results {
        let body = r.expect(201);
        partners.push(body["partner"]["user_id"].as_str().unwrap().to_owned());
    }
    let mut unique = partners.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        partners.len(),
        "a partner was given twice: {partners:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_candidate_voids_the_hold() {
    let env = TestEnv::start("no-candidate").await;
    let op = env.operator().await;
    let me = funded(&env, &op, "abe", ProfileBuilder::male()).await;
    let _responder = Responder::start(&env.amqp_url(), |req| {
        ResponderAction::Reply(status_reply(req, ReplyStatus::NoCandidate))
    })
    .await;
    me.post_match(
        "k",
        &MatchOptionsBuilder::new().important("none").age("older"),
    )
    .await
    .assert_error(404, "no_candidate");
    assert_eq!(me.points().await, PASSES);
    assert!(me.matches().await.is_empty());
    let stats = op.stats().await;
    assert_eq!(stats["open_holds"], 0);
    assert_eq!(stats["points_spent"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matcher_errors_are_not_mistaken_for_no_match() {
    let env = TestEnv::start("matcher-errors").await;
    let op = env.operator().await;
    let me = funded(&env, &op, "bob", ProfileBuilder::male()).await;
    let responder = Responder::start(&env.amqp_url(), |req| {
        ResponderAction::Reply(status_reply(req, ReplyStatus::NotReady))
    })
    .await;
    let r = me.post_match("k1", &MatchOptionsBuilder::new()).await;
    assert_ne!(r.status, 201, "{}", r.text);
    assert_ne!(
        r.error_code(),
        Some("no_candidate"),
        "a matcher that is not ready did not find 'no candidate': {}",
        r.text
    );
    responder.set_script(|req| ResponderAction::Reply(status_reply(req, ReplyStatus::Invalid)));
    let r = me.post_match("k2", &MatchOptionsBuilder::new()).await;
    assert_ne!(r.status, 201, "{}", r.text);
    assert_ne!(r.error_code(), Some("no_candidate"), "{}", r.text);
    assert_eq!(me.points().await, PASSES);
    assert_eq!(op.open_holds().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_matcher_is_503_and_charges_nothing() {
    let env = TestEnv::start_with("silent", |c| c.matching.deadline_ms = 1_500).await;
    let op = env.operator().await;
    let me = funded(&env, &op, "cody", ProfileBuilder::male()).await;
    let responder = Responder::start(&env.amqp_url(), |_| ResponderAction::Silent).await;
    let started = std::time::Instant::now();
    me.post_match("k", &MatchOptionsBuilder::new())
        .await
        .assert_error(503, "matcher_unavailable");
    assert!(
        started.elapsed() >= Duration::from_millis(1_400),
        "gave up before the deadline: {:?}",
        started.elapsed()
    );
    assert_eq!(responder.requests().len(), 1);
    assert_eq!(me.points().await, PASSES);
    assert!(me.matches().await.is_empty());
    assert_eq!(op.open_holds().await, 0);

    // No matcher consuming at all: also 503.
    drop(responder);
    me.post_match("k2", &MatchOptionsBuilder::new())
        .await
        .assert_error(503, "matcher_unavailable");
    assert_eq!(me.points().await, PASSES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_after_the_deadline_changes_nothing() {
    let env = TestEnv::start_with("late-reply", |c| c.matching.deadline_ms = 1_500).await;
    let op = env.operator().await;
    let me = funded(&env, &op, "dave", ProfileBuilder::male()).await;
    let late_partner = woman(&env, "edda").await;
    let next_partner = woman(&env, "fern").await;
    let responder = Responder::start(&env.amqp_url(), {
        let p = late_partner.id();
        move |req| ResponderAction::ReplyAfter(Duration::from_millis(2_500), ok_reply(req, &[p]))
    })
    .await;
    me.post_match("late", &MatchOptionsBuilder::new())
        .await
        .assert_error(503, "matcher_unavailable");
    let late = responder.wait_for_requests(1).await[0].request.request_id;
    responder.wait_replied(late).await;

    // The next request's reply travels the same path after the late one; once it is answered
    // the late reply has been seen (and must have been ignored).
    responder.set_script({
        let p = next_partner.id();
        move |req| ResponderAction::Reply(ok_reply(req, &[p]))
    });
    let m = me
        .post_match("next", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], json!(next_partner.user_id));

    let history = me.matches().await;
    assert_eq!(
        history.len(),
        1,
        "the late reply recorded a match: {history:?}"
    );
    assert_eq!(me.points().await, PASSES - 1000);
    let stats = op.stats().await;
    assert_eq!(stats["matches"], 1);
    assert_eq!(stats["points_spent"], 1000);
    assert_eq!(stats["open_holds"], 0);

    // The late partner is still unpaired with me: I can draw her now.
    responder.set_script({
        let p = late_partner.id();
        move |req| ResponderAction::Reply(ok_reply(req, &[p]))
    });
    let m = me
        .post_match("again", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], json!(late_partner.user_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lists_my_matches_newest_first() {
    let env = TestEnv::start("history").await;
    let op = env.operator().await;
    let me = funded(&env, &op, "gus", ProfileBuilder::male()).await;
    let mut partners = Vec::new();
    for name in ["hye", "ida", "joy"] {
        partners.push(woman(&env, name).await);
    }
    let ids: Vec<UserId> = partners.iter().map(|p| p.id()).collect();
    let _responder = Responder::start(&env.amqp_url(), {
        let mut next = 0;
        move |req| {
            let reply = ok_reply(req, &ids[next..next + 1]);
            next += 1;
            ResponderAction::Reply(reply)
        }
    })
    .await;
    let mut made = Vec::new();
    for i in 0..3 {
        made.push(
            me.post_match(&format!("k{i}"), &MatchOptionsBuilder::new())
                .await
                .expect(201),
        );
    }
    let history = me.matches().await;
    assert_eq!(history.len(), 3);
    for (h, m) in history.iter().zip(made.iter().rev()) {
        assert_eq!(h["match_id"], m["match_id"]);
        assert_eq!(h["partner"], m["partner"]);
    }
    let times: Vec<u64> = history
        .iter()
        .map(|h| h["created_at_unix_ms"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
}

/// The relay declares the broker topology the appliance relies on: a durable classic match
/// queue with a TTL cap and dead-lettering, and the dead-letter exchange and queue. A request
/// nobody can process leaves the queue by its expiration at the latest (requeued forever by a
/// consumer that keeps failing on it) and lands in `comatching.dead`, as does one a consumer
/// rejects; nothing cycles forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_match_queue_dead_letters_what_expires_or_is_rejected() {
    use futures_util::StreamExt;
    use lapin::options::{
        BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        BasicRejectOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let env = TestEnv::start("topology").await;
    // Waits for the topology (a passive declare inside).
    let responder = Responder::start(&env.amqp_url(), |_| ResponderAction::Silent).await;
    drop(responder);

    let queues = list_queues(&env.vhost);
    let matchq = find_queue(&queues, comatching_protocol::topology::MATCH_QUEUE)
        .unwrap_or_else(|| panic!("match queue not declared: {queues}"));
    assert_eq!(matchq["type"], "classic", "{matchq}");
    // Non-durable: on a cluster it goes with its node and is declared again on a live one.
    assert_eq!(matchq["durable"], false, "{matchq}");
    // rabbitmqctl prints arguments as [name, type, value] triples.
    let arg = |name: &str| {
        matchq["arguments"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t[0] == name))
            .map(|t| t[2].clone())
    };
    assert_eq!(arg("x-message-ttl"), Some(120_000.into()), "{matchq}");
    assert_eq!(
        arg("x-dead-letter-exchange"),
        Some("comatching.dead".into()),
        "{matchq}"
    );
    let dead = find_queue(&queues, "comatching.dead").expect("dead-letter queue");
    assert_eq!(dead["durable"], true, "{dead}");
    assert!(
        find_queue(&queues, "comatching.match").is_none(),
        "no quorum match queue of the old layout: {queues}"
    );

    let conn = Connection::connect(&env.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    for body in [&b"requeued forever"[..], &b"rejected"[..]] {
        ch.basic_publish(
            "".into(),
            comatching_protocol::topology::MATCH_QUEUE.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_expiration("300".into()),
        )
        .await
        .expect("publish");
    }
    let mut consumer = ch
        .basic_consume(
            comatching_protocol::topology::MATCH_QUEUE.into(),
            "poison-handler".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let handler = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            if d.data == b"rejected" {
                let _ = d.reject(BasicRejectOptions { requeue: false }).await;
            } else {
                let _ = d
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            }
        }
    });
    let ch2 = conn.create_channel().await.expect("channel");
    let reasons = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    comatching_tests::wait_for(
        comatching_tests::PATIENCE,
        "both messages in comatching.dead",
        || {
            let (ch2, reasons) = (ch2.clone(), reasons.clone());
            async move {
                let got = ch2
                    .basic_get("comatching.dead".into(), BasicGetOptions { no_ack: true })
                    .await;
                let mut reasons = reasons.lock().unwrap();
                if let Some(m) = got.ok().flatten() {
                    let body = String::from_utf8_lossy(&m.delivery.data).into_owned();
                    reasons.insert(body, death_reason(&m.delivery.properties));
                }
                (reasons.len() == 2).then_some(())
            }
        },
    )
    .await;
    let reasons = reasons.lock().unwrap().clone();
    handler.abort();
    assert_eq!(reasons["requeued forever"], "expired", "{reasons:?}");
    assert_eq!(reasons["rejected"], "rejected", "{reasons:?}");
}

/// The reason of a dead-lettered message's first `x-death` entry ("" when absent).
fn death_reason(props: &lapin::BasicProperties) -> String {
    use lapin::types::AMQPValue;
    let first = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death").cloned());
    let Some(AMQPValue::FieldArray(deaths)) = first else {
        return String::new();
    };
    match deaths.as_slice().first() {
        Some(AMQPValue::FieldTable(t)) => match t.inner().get("reason") {
            Some(AMQPValue::LongString(r)) => String::from_utf8_lossy(r.as_bytes()).into_owned(),
            _ => String::new(),
        },
        _ => String::new(),
    }
}

/// `rabbitmqctl list_queues` of a vhost, as JSON.
fn list_queues(vhost: &comatching_tests::Vhost) -> serde_json::Value {
    list_queues_of(vhost.name())
}

fn list_queues_of(vhost: &str) -> serde_json::Value {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", "rabbit@localhost", "list_queues", "-p"])
        .arg(vhost)
        .args([
            "name",
            "type",
            "durable",
            "arguments",
            "consumers",
            "--formatter",
            "json",
        ])
        .output()
        .expect("rabbitmqctl list_queues");
    serde_json::from_slice(&out.stdout).expect("list_queues prints JSON")
}

fn find_queue(queues: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    queues
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["name"] == name))
        .cloned()
}

/// Upgrading a broker that still has the quorum `comatching.match` of earlier releases: the
/// relay comes up regardless, leaves the old queue alone while an old appliance still consumes
/// it, and deletes it on its next connect once nobody does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_retires_the_old_match_queue() {
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    use lapin::{Connection, ConnectionProperties};

    let vhost = comatching_tests::Vhost::create("legacy-match-queue");
    let old = Connection::connect(&vhost.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = old.create_channel().await.expect("channel");
    let mut legacy_args = FieldTable::default();
    legacy_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    legacy_args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(5));
    ch.queue_declare(
        "comatching.match".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        legacy_args,
    )
    .await
    .expect("declare the old queue");
    // The durable classic match queue of the release before, unused: deleted at once.
    ch.queue_declare(
        "comatching.match.requests".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare the durable classic queue");
    let old_consumer = ch
        .basic_consume(
            "comatching.match".into(),
            "old-appliance".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume the old queue");

    let mut relay =
        comatching_tests::RelayProcess::start(comatching_tests::RelayConfig::new(vhost.amqp_url()))
            .await;
    relay.wait_ready().await;
    let kept = find_queue(&list_queues(&vhost), "comatching.match");
    assert!(kept.is_some(), "an old queue still consumed is kept");
    assert!(
        find_queue(&list_queues(&vhost), "comatching.match.requests").is_none(),
        "an old queue nobody consumes is deleted"
    );

    drop(old_consumer);
    old.close(200, "old appliance gone".into())
        .await
        .expect("close");
    // The relay's next connect retires it.
    vhost.close_all_connections();
    comatching_tests::wait_for(
        comatching_tests::PATIENCE,
        "the old match queue deleted",
        || {
            let name = vhost.name().to_owned();
            async move {
                // rabbitmqctl blocks: off the runtime's workers.
                let queues = tokio::task::spawn_blocking(move || list_queues_of(&name))
                    .await
                    .expect("list_queues task");
                find_queue(&queues, "comatching.match")
                    .is_none()
                    .then_some(())
            }
        },
    )
    .await;
    relay.wait_ready().await;
    assert!(
        find_queue(
            &list_queues(&vhost),
            comatching_protocol::topology::MATCH_QUEUE
        )
        .is_some()
    );
}

/// The relay crashes while a match is in flight: after the restart the hold is voided by the
/// sweeper and nobody is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_match_leaves_no_hold_and_no_charge() {
    let env = TestEnv::start_with("crash-mid-match", |c| {
        c.matching.deadline_ms = 1_500;
        c.ledger.sweep_interval_ms = 200;
    })
    .await;
    let op = env.operator().await;
    let me = funded(&env, &op, "hank", ProfileBuilder::male()).await;
    let partner = woman(&env, "iris").await;
    let gate = comatching_tests::Gate::new();
    let responder = Responder::start(&env.amqp_url(), {
        let (gate, p) = (gate.clone(), partner.id());
        move |req| ResponderAction::ReplyWhenOpened(gate.clone(), ok_reply(req, &[p]))
    })
    .await;
    let in_flight = tokio::spawn({
        let me = me.clone();
        async move { me.post_match("crash", &MatchOptionsBuilder::new()).await }
    });
    responder.wait_for_requests(1).await;
    assert_eq!(op.open_holds().await, 1);

    let TestEnv {
        mut relay, vhost, ..
    } = env;
    relay.kill_9();
    // The request dies with the relay (the client sees the connection drop).
    if let Ok(resp) = in_flight.await {
        assert_ne!(
            resp.status, 201,
            "a crashed relay delivered a match: {}",
            resp.text
        );
    }
    relay.restart().await;
    relay.wait_ready().await;
    // The reply now arrives for a request the new process never sent: ignored.
    gate.open();
    comatching_tests::wait_until(
        comatching_tests::PATIENCE,
        "the sweeper to void the orphaned hold",
        || {
            let op = &op;
            async move { op.open_holds().await == 0 }
        },
    )
    .await;
    assert_eq!(me.points().await, PASSES);
    assert!(me.matches().await.is_empty());
    assert_eq!(op.stats().await["points_spent"], 0);
    drop(relay);
    drop(vhost);
}
