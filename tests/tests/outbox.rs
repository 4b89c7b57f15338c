//! The outbox: every change to the matchable pool is committed with a gap-free seq and reaches
//! the sync exchange in seq order — also when the broker was unreachable at the time and the
//! relay crashed before it could publish.

use std::collections::{BTreeMap, HashMap};

use comatching_protocol::{SyncEvent, SyncOp};
use comatching_tests::broker::unreachable_amqp_url;
use comatching_tests::responder::ok_reply;
use comatching_tests::sync_tap::TappedEvent;
use comatching_tests::{
    Api, MatchOptionsBuilder, ProfileBuilder, RelayConfig, RelayProcess, Responder,
    ResponderAction, SyncTap, TestEnv, User, Vhost,
};
use serde_json::Value;

/// What a test expects of one event.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Upsert {
        user: String,
        version: u64,
        profile: Value,
    },
    Delete {
        user: String,
    },
}

fn upsert(user: &User, stored: &Value) -> Expect {
    Expect::Upsert {
        user: user.user_id.clone(),
        version: stored["version"].as_u64().expect("profile version"),
        profile: stored.clone(),
    }
}

fn delete(user: &User) -> Expect {
    Expect::Delete {
        user: user.user_id.clone(),
    }
}

/// Checks `events` (arrival order) against `expected`: seq 1..=n in order, one event per
/// change, right user, op, version and features, one epoch, persistent delivery, and per-user
/// versions increasing.
fn check_stream(events: &[TappedEvent], expected: &[Expect]) {
    let seqs: Vec<u64> = events.iter().map(|e| e.event.seq).collect();
    let want: Vec<u64> = (1..=expected.len() as u64).collect();
    assert_eq!(seqs, want, "seq must be 1..=n in order, no gaps, no extras");
    let epoch = events[0].event.epoch;
    let mut last_version: HashMap<String, u64> = HashMap::new();
    for (e, x) in events.iter().zip(expected) {
        let ev: &SyncEvent = &e.event;
        assert_eq!(ev.epoch, epoch, "one epoch per database: {ev:?}");
        assert_eq!(
            e.delivery_mode,
            Some(2),
            "sync events are persistent: {ev:?}"
        );
        let user = ev.user_id.to_hex();
        if let Some(prev) = last_version.insert(user.clone(), ev.version) {
            assert!(ev.version > prev, "versions per user must increase: {ev:?}");
        }
        match (x, &ev.op) {
            (
                Expect::Upsert {
                    user: u,
                    version,
                    profile,
                },
                SyncOp::Upsert(f),
            ) => {
                assert_eq!(&user, u, "seq {}", ev.seq);
                assert_eq!(ev.version, *version, "seq {}: version", ev.seq);
                assert_eq!(f.gender.as_str(), profile["gender"], "seq {}", ev.seq);
                assert_eq!(u64::from(f.age.years()), profile["age"], "seq {}", ev.seq);
                assert_eq!(f.mbti.to_string(), profile["mbti"], "seq {}", ev.seq);
                assert_eq!(f.major.as_str(), profile["major"], "seq {}", ev.seq);
                assert_eq!(
                    f.contact_frequency.as_str(),
                    profile["contact_frequency"],
                    "seq {}",
                    ev.seq
                );
                let hobbies: Vec<&str> = f.hobbies.iter().map(|h| h.as_str()).collect();
                assert_eq!(
                    serde_json::json!(hobbies),
                    profile["hobbies"],
                    "seq {}",
                    ev.seq
                );
                assert_eq!(f.dont_pick_me, profile["dont_pick_me"], "seq {}", ev.seq);
            }
            (Expect::Delete { user: u }, SyncOp::Delete) => {
                assert_eq!(&user, u, "seq {}", ev.seq);
            }
            (x, op) => panic!("seq {}: expected {x:?}, got {op:?}", ev.seq),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pool_change_is_published_once_in_seq_order() {
    let env = TestEnv::start("outbox-order").await;
    let tap = env.sync_tap().await;
    let op = env.operator().await;
    let mut expected = Vec::new();

    let ann = env.api.signup("ann").await;
    let bo = env.api.signup("bob").await;
    let cy = env.api.signup("cyd").await;
    let di = env.api.signup("dia").await; // never gets a profile: never published

    let s = ann
        .set_profile(&ProfileBuilder::female().major("Law"))
        .await;
    expected.push(upsert(&ann, &s));
    let s = bo
        .set_profile(&ProfileBuilder::male().age(27).mbti("INTJ"))
        .await;
    expected.push(upsert(&bo, &s));
    // Changes outside the pool publish nothing: failed validation, points, sessions.
    assert_eq!(
        bo.put_profile(&ProfileBuilder::male().age(99)).await.status,
        400
    );
    op.grant(&di, 500).await;
    assert_eq!(di.logout().await.status, 204);
    let s = ann
        .set_profile(
            &ProfileBuilder::female()
                .major("Law")
                .hobbies(&["travel", "arts"])
                .contact_frequency("rare"),
        )
        .await;
    assert_eq!(s["version"], 2);
    expected.push(upsert(&ann, &s));
    // dont_pick_me users stay replicated, flagged; the appliance filters them.
    let s = cy
        .set_profile(&ProfileBuilder::female().dont_pick_me(true))
        .await;
    expected.push(upsert(&cy, &s));
    assert_eq!(bo.delete_me().await.status, 204);
    expected.push(delete(&bo));
    // Display-only fields change the profile version too; the event carries the same features.
    let s = ann
        .set_profile(
            &ProfileBuilder::female()
                .major("Law")
                .hobbies(&["travel", "arts"])
                .contact_frequency("rare")
                .comment("new comment"),
        )
        .await;
    expected.push(upsert(&ann, &s));

    let events = tap.wait_for_count(expected.len()).await;
    check_stream(&events[..expected.len()], &expected);
    assert!(tap.undecodable().is_empty(), "{:?}", tap.undecodable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaching_the_pick_cap_publishes_a_delete() {
    let env = TestEnv::start_with("outbox-cap", |c| c.matching.max_picked = 1).await;
    let tap = env.sync_tap().await;
    let op = env.operator().await;
    let man = env.api.signup("eli").await;
    let s1 = man.set_profile(&ProfileBuilder::male()).await;
    let woman = env.api.signup("flo").await;
    let s2 = woman.set_profile(&ProfileBuilder::female()).await;
    op.grant(&man, 5_000).await;
    let _responder = Responder::start(&env.amqp_url(), {
        let w = woman.id();
        move |req| ResponderAction::Reply(ok_reply(req, &[w]))
    })
    .await;
    man.post_match("k", &MatchOptionsBuilder::new())
        .await
        .expect(201);

    let expected = vec![upsert(&man, &s1), upsert(&woman, &s2), delete(&woman)];
    let events = tap.wait_for_count(3).await;
    check_stream(&events[..3], &expected);
}

/// Start the relay with no broker, change the pool, crash it (SIGKILL) before it could publish,
/// restart it with the broker back: every committed row is published, in order, none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_committed_while_the_broker_was_away_are_published_after_a_crash() {
    let vhost = Vhost::create("outbox-crash");
    let tap = SyncTap::bind(&vhost.amqp_url()).await;
    let mut relay = RelayProcess::start(RelayConfig::new(unreachable_amqp_url())).await;
    relay.wait_not_ready().await;
    let api = Api::new(relay.base_url());

    let mut expected = Vec::new();
    let mut users = Vec::new();
    for (i, name) in ["gil", "hugo", "iona", "jojo"].iter().enumerate() {
        let user = api.signup(name).await;
        let profile = if i % 2 == 0 {
            ProfileBuilder::female()
        } else {
            ProfileBuilder::male()
        };
        let s = user.set_profile(&profile.age(20 + i as i64)).await;
        expected.push(upsert(&user, &s));
        users.push(user);
    }
    let s = users[0]
        .set_profile(&ProfileBuilder::female().mbti("ISFJ"))
        .await;
    expected.push(upsert(&users[0], &s));
    assert_eq!(users[1].delete_me().await.status, 204);
    expected.push(delete(&users[1]));
    // A withdrawal erases the user's features from their earlier outbox rows too (issue 14):
    // an upsert not yet published goes out as a delete of the same version.
    for e in expected.iter_mut() {
        if matches!(e, Expect::Upsert { user, .. } if *user == users[1].user_id) {
            *e = delete(&users[1]);
        }
    }
    assert!(
        tap.events().is_empty(),
        "nothing can have been published yet"
    );

    relay.kill_9();
    relay.set_broker_url(vhost.amqp_url());
    relay.restart().await;
    relay.wait_ready().await;

    let events = tap.wait_for_count(expected.len()).await;
    check_stream(&events[..expected.len()], &expected);

    // The publisher carries on from there.
    let s = users[2]
        .set_profile(&ProfileBuilder::female().age(30))
        .await;
    expected.push(upsert(&users[2], &s));
    let events = tap.wait_for_count(expected.len()).await;
    check_stream(&events[..expected.len()], &expected);
}

/// A crash after publishing may resend (at-least-once), but never skips or reorders, keeps the
/// epoch, and continues the seq without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_continues_without_gaps_across_a_crash() {
    let env = TestEnv::start("outbox-restart").await;
    let tap = env.sync_tap().await;
    let mut expected = Vec::new();
    let mut users = Vec::new();
    for name in ["kai", "luz", "mona"] {
        let user = env.api.signup(name).await;
        let s = user.set_profile(&ProfileBuilder::female()).await;
        expected.push(upsert(&user, &s));
        users.push(user);
    }
    tap.wait_for_seq(3).await;

    let TestEnv {
        mut relay, vhost, ..
    } = env;
    relay.kill_9();
    relay.restart().await;
    relay.wait_ready().await;
    for user in &users[..2] {
        let s = user.set_profile(&ProfileBuilder::male()).await;
        expected.push(upsert(user, &s));
    }
    let events = tap.wait_for_seq(expected.len() as u64).await;

    // First occurrence of each seq, in arrival order; duplicates must be identical.
    let mut by_seq: BTreeMap<u64, SyncEvent> = BTreeMap::new();
    let mut first_seen = Vec::new();
    for e in &events {
        match by_seq.get(&e.event.seq) {
            Some(prev) => assert_eq!(prev, &e.event, "a resend differs from the original"),
            None => {
                by_seq.insert(e.event.seq, e.event.clone());
                first_seen.push(e.clone());
            }
        }
    }
    check_stream(&first_seen[..expected.len()], &expected);
    drop(relay);
    drop(vhost);
}

/// The relay starts before its broker vhost exists and connects by itself once it does: its own
/// reconnect loop, no restart. Changes made meanwhile are not lost: the seq carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_connects_on_its_own_when_the_broker_appears() {
    let mut vhost = Vhost::reserve("outbox-late-vhost");
    let mut config = RelayConfig::new(vhost.amqp_url());
    config.rate_limit.per_ip_per_minute = 1_000_000;
    let mut relay = RelayProcess::start(config).await;
    relay.wait_not_ready().await;
    let api = Api::new(relay.base_url());
    let early = api.signup("nina").await;
    early.set_profile(&ProfileBuilder::female()).await;

    vhost.materialise();
    relay.wait_ready().await;
    let tap = SyncTap::bind(&vhost.amqp_url()).await;
    let late = api.signup("omar").await;
    let stored = late.set_profile(&ProfileBuilder::male()).await;
    let events = tap.wait_for_seq(2).await;
    let last = events.last().expect("an event").event.clone();
    assert_eq!(last.seq, 2, "the early change took seq 1: {events:?}");
    assert_eq!(last.user_id, late.id());
    assert_eq!(Some(last.version), stored["version"].as_u64());
}

/// The broker drops the relay's connection: the relay reconnects, redeclares, and publishes
/// the next change with the next seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_survives_a_dropped_connection() {
    let env = TestEnv::start("outbox-conn-loss").await;
    let tap = env.sync_tap().await;
    let a = env.api.signup("pete").await;
    a.set_profile(&ProfileBuilder::male()).await;
    tap.wait_for_seq(1).await;

    env.vhost.close_all_connections(); // the tap's too
    let tap = env.sync_tap().await;
    let b = env.api.signup("rita").await;
    let stored = b.set_profile(&ProfileBuilder::female()).await;
    let events = tap.wait_for_seq(2).await;
    let ev = &events
        .iter()
        .find(|e| e.event.seq == 2)
        .expect("seq 2")
        .event;
    assert_eq!(ev.user_id, b.id());
    assert_eq!(Some(ev.version), stored["version"].as_u64());
    assert!(
        events.iter().all(|e| e.event.seq <= 2),
        "no seq beyond the last change: {events:?}"
    );

    // The match RPC is back too: seq 2 went out on the new connection.
    let op = env.operator().await;
    op.grant(&a, 5_000).await;
    let _responder = Responder::start(&env.amqp_url(), {
        let b = b.id();
        move |req| ResponderAction::Reply(ok_reply(req, &[b]))
    })
    .await;
    let m = a
        .post_match("after-loss", &MatchOptionsBuilder::new())
        .await
        .expect(201);
    assert_eq!(m["partner"]["user_id"], serde_json::json!(b.user_id));
}
