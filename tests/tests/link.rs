//! The link end to end (issue 4): the real relay, real appliances and a real broker. Each test
//! builds its own world (vhost or private broker node, relay, appliances, temp dirs).

use comatching_protocol::stages::{self, StageCounts};
use std::sync::Arc;
use std::time::Duration;

use comatching_tests::broker::queue_depth;
use comatching_tests::private_broker::PrivateBroker;
use comatching_tests::world::{World, WorldOptions, drive_matches};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::Method;
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_users_reach_both_replicas_and_updates_deletes_and_matches_follow() {
    let mut opts = WorldOptions::new("link-1k");
    opts.appliances = 2;
    let mut w = World::start(&opts).await;
    let users = w.register(1000, 32, 1).await;
    let pool = w.wait_converged(CONVERGE).await;
    assert_eq!(pool.count, 1000, "every registered profile is in the pool");

    // Updates and withdrawals propagate.
    for (i, u) in users.iter().take(50).enumerate() {
        let body = comatching_tests::population::Population::new(99).profile(i);
        u.put_profile_json(&body).await.expect(200);
    }
    for u in &users[50..70] {
        u.delete_me().await.expect(204);
    }
    let after = w.wait_converged(CONVERGE).await;
    assert_eq!(after.count, 980);
    assert!(after.seq >= pool.seq + 70, "one outbox row per change");
    assert_ne!(after.digest, pool.digest);

    // Matches succeed through the appliances, and each charges once.
    let buyers: Vec<_> = users[100..130].to_vec();
    w.grant_all(&buyers, 5_000, 8).await;
    let mut made = 0;
    for (i, u) in buyers.iter().enumerate() {
        let r = u
            .api
            .request(
                Method::POST,
                "/api/v1/matches",
                Some(&u.token),
                Some(&json!({})),
                &[("Idempotency-Key", &format!("k{i}"))],
            )
            .await;
        match r.status {
            201 => {
                made += 1;
                assert_eq!(r.body["cost"], 1000);
                assert_eq!(u.points().await, 4_000, "charged exactly once");
            }
            404 => assert_eq!(u.points().await, 5_000, "no candidate, no charge"),
            other => panic!("unexpected match answer {other}: {}", r.text),
        }
    }
    assert!(
        made >= 25,
        "most requests find a partner among ~980 users (made {made})"
    );
    let stats = w.operator.stats().await;
    assert_eq!(stats["points_spent"], 1000 * made);
    assert_eq!(stats["open_holds"], 0);

    // Every request answered went through each of the appliances' stages once (issue 16):
    // their `/metrics` stage counts add up to the requests the relay got replies for.
    let mut answered = 0;
    for app in &w.appliances {
        let text = comatching_tests::api::http_client(None)
            .get(format!("{}/metrics", app.base_url()))
            .send()
            .await
            .expect("appliance /metrics")
            .text()
            .await
            .expect("text");
        let seen = StageCounts::parse(&text, stages::APPLIANCE_FAMILY).expect("stage histograms");
        let total = seen["total"].total();
        for stage in stages::APPLIANCE_STAGES {
            assert_eq!(seen[stage].total(), total, "{stage}: {seen:?}");
        }
        answered += total;
    }
    assert_eq!(answered, buyers.len() as u64, "one answer per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_converges_without_help() {
    let broker = PrivateBroker::start("restart");
    let mut opts = WorldOptions::new("link-restart");
    opts.amqp_url = Some(broker.amqp_url());
    let mut w = World::start(&opts).await;
    w.register(100, 16, 1).await;
    w.wait_converged(CONVERGE).await;

    broker.stop_app();
    // The relay keeps taking writes while the broker is away; they wait in the outbox.
    w.register(100, 16, 2).await;
    broker.start_app();
    let pool = w.wait_converged(CONVERGE).await;
    assert_eq!(pool.count, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_appliance_resyncs_from_empty() {
    let mut w = World::start(&WorldOptions::new("link-wipe")).await;
    w.register(300, 16, 1).await;
    let before = w.wait_converged(CONVERGE).await;
    let app = &mut w.appliances[0];
    app.kill_9();
    app.wipe_data();
    app.restart().await;
    let after = w.wait_converged(CONVERGE).await;
    assert_eq!(before, after);
    let status = w.appliances[0].status().await.expect("status");
    assert!(
        status["sync"]["snapshots_loaded"].as_u64() >= Some(1),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restored_from_an_older_copy_with_a_new_epoch_is_taken_whole() {
    let mut w = World::start(&WorldOptions::new("link-restore")).await;
    w.register(100, 16, 1).await;
    let old = w.wait_converged(CONVERGE).await;
    let old_epoch = w.appliances[0].status().await.expect("status")["epoch"].clone();

    // Back up the relay database (stopped, so the copy is consistent).
    let backup = w.relay.backup().await;
    w.register(50, 16, 2).await;
    let newer = w.wait_converged(CONVERGE).await;
    assert_eq!(newer.count, 150);

    // Restore the older copy, start a new lineage, start the relay on it.
    w.relay.restore_with_new_epoch(backup.path()).await;

    let restored = w.wait_converged(CONVERGE).await;
    assert_eq!(
        restored.count, old.count,
        "the appliance holds exactly the restored lineage"
    );
    assert_eq!(restored.digest, old.digest);
    let status = w.appliances[0].status().await.expect("status");
    assert_ne!(status["epoch"], old_epoch, "the new epoch was adopted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_sync_message_is_dead_lettered_and_the_next_one_applies() {
    let mut w = World::start(&WorldOptions::new("link-dlq")).await;
    w.register(10, 8, 1).await;
    w.wait_converged(CONVERGE).await;

    let conn = Connection::connect(&w.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    for garbage in [
        b"not a message".to_vec(),
        vec![b'C', b'M', 1, 0xdd, 0xff, 0xff, 0xff, 0xff],
    ] {
        ch.basic_publish(
            "".into(),
            "comatching.sync.box-1".into(),
            BasicPublishOptions::default(),
            &garbage,
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    w.register(5, 4, 2).await;
    let pool = w.wait_converged(CONVERGE).await;
    assert_eq!(pool.count, 15, "the queue kept flowing");
    let status = w.appliances[0].status().await.expect("status");
    assert_eq!(status["sync"]["dead_lettered"], 2, "{status}");
    assert!(
        queue_depth(&ch, "comatching.dead").await >= 2,
        "both garbage messages were dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_survives_one_appliance_dying_and_it_rejoins() {
    let mut opts = WorldOptions::new("link-two");
    opts.appliances = 2;
    opts.max_picked = 1_000;
    let mut w = World::start(&opts).await;
    let users = w.register(200, 16, 1).await;
    w.grant_all(&users, 100_000, 16).await;
    w.wait_converged(CONVERGE).await;

    w.appliances[0].kill_9();
    let users = Arc::new(users);
    let (lat, errs) = drive_matches(users.clone(), 4, Duration::from_secs(60), Some(40), 3).await;
    assert!(
        !errs.contains_key(&503),
        "matching kept working with one appliance down: {errs:?}"
    );
    assert!(
        lat.len() >= 30,
        "most matches succeed ({} ok, {errs:?})",
        lat.len()
    );

    // Changes made while it was down reach it after the restart.
    w.register(20, 8, 2).await;
    w.appliances[0].restart().await;
    let pool = w.wait_converged(CONVERGE).await;
    assert_eq!(pool.count, 220, "the restarted appliance caught up");
}

/// With a link key (`broker.link_key_file`), every message between relay and appliances is
/// tagged and checked: the system works as usual, and messages published by someone without
/// the key — untagged, or tagged with another key — are refused before they are decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_key_authenticates_every_message_and_forgeries_are_refused() {
    use comatching_protocol::amqp::authenticate;
    use comatching_protocol::mac::LinkKey;
    use comatching_protocol::{Digest, Envelope, Hello, Message};
    use comatching_tests::{SyncTap, wait_until};

    let keys = tempfile::tempdir().expect("key dir");
    let mut opts = WorldOptions::new("link-mac");
    opts.link_key = Some(comatching_tests::relay::new_link_key(keys.path()));
    let mut w = World::start(&opts).await;
    let tap = SyncTap::bind(&w.amqp_url).await;
    let users = w.register(20, 8, 5).await;
    w.grant_all(&users, 10_000, 8).await;
    let pool = w.wait_converged(CONVERGE).await;
    tap.wait_for_seq(pool.seq).await;
    // Sync, hellos, match requests and replies all pass with their tags.
    let r = users[0].post_match_json("mac-1", &json!({})).await;
    assert!(matches!(r.status, 201 | 404), "{r:?}");
    let status = w.appliances[0].status().await.expect("status");
    let snapshots_before = status["sync"]["snapshots_loaded"].clone();

    let conn = Connection::connect(&w.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let publish = |queue: &'static str, body: Vec<u8>, props: BasicProperties| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .expect("publish");
        }
    };
    // A newer version of a real user, as an attacker with broker access would send it.
    let mut forged = tap.events()[0].event.clone();
    forged.version += 100;
    let body = Envelope::encode(&Message::SyncEvent(forged));
    let wrong = LinkKey::from_bytes(std::array::from_fn(|i| i as u8 ^ 0x5a));
    publish(
        "comatching.sync.box-1",
        body.clone(),
        BasicProperties::default(),
    )
    .await;
    publish(
        "comatching.sync.box-1",
        body.clone(),
        authenticate(BasicProperties::default(), Some(&wrong), &body),
    )
    .await;
    // A hello claiming box-1 lost everything (it would make the relay send a snapshot).
    let hello = Envelope::encode(&Message::Hello(Hello {
        appliance_id: "box-1".parse().expect("id"),
        epoch: None,
        applied_seq: 0,
        count: 0,
        digest: Digest::default(),
    }));
    publish("comatching.control", hello, BasicProperties::default()).await;

    let a = &w.appliances[0];
    wait_until(
        CONVERGE,
        "the appliance refuses both forged events",
        || async {
            a.status()
                .await
                .is_some_and(|s| s["sync"]["unauthenticated"] == 2)
        },
    )
    .await;
    let relay_url = w.relay.base_url().to_owned();
    wait_until(CONVERGE, "the relay refuses the forged hello", || {
        let url = relay_url.clone();
        async move {
            let text = comatching_tests::api::http_client(None)
                .get(format!("{url}/metrics"))
                .send()
                .await
                .ok();
            match text {
                Some(r) => r
                    .text()
                    .await
                    .unwrap_or_default()
                    .contains("comatching_unauthenticated_messages 1"),
                None => false,
            }
        }
    })
    .await;
    // Nothing changed: a real update still arrives, the replica equals the relay without a
    // snapshot having been needed (a forged version applied would have forced one).
    users[1]
        .put_profile_json(&comatching_tests::population::Population::new(8).profile(1))
        .await
        .expect(200);
    w.wait_converged(CONVERGE).await;
    let status = w.appliances[0].status().await.expect("status");
    assert_eq!(
        status["sync"]["snapshots_loaded"], snapshots_before,
        "{status}"
    );
}

/// With a link key, a match request published by someone without it is dead-lettered by the
/// appliance unanswered, and a reply tagged with a wrong key is dropped by the relay: the
/// request it claims to answer ends as a 503 with nothing charged. The same reply with the
/// right key is taken (so it is the tag that was refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_match_requests_and_replies_are_refused_with_a_link_key() {
    use comatching_protocol::mac::LinkKey;
    use comatching_protocol::{
        Envelope, MatchOptions, MatchRequest, Message, RequestId, Requester,
    };
    use comatching_tests::responder::ok_reply;
    use comatching_tests::{Responder, ResponderAction, wait_until};

    let keys = tempfile::tempdir().expect("key dir");
    let key_file = comatching_tests::relay::new_link_key(keys.path());
    let key = LinkKey::from_hex(std::fs::read_to_string(&key_file).expect("key").trim())
        .expect("link key");
    let mut opts = WorldOptions::new("link-forged-rpc");
    opts.link_key = Some(key_file);
    let mut w = World::start(&opts).await;
    let users = w.register(6, 6, 3).await;
    w.grant_all(&users, 10_000, 6).await;
    w.wait_converged(CONVERGE).await;

    // A forged request straight onto the match queue, as anyone with broker access could.
    let me = &users[0];
    let profile = me.me_ok().await["profile"].clone();
    let features: comatching_protocol::Features =
        serde_json::from_value(profile).expect("features from the profile");
    let forged = MatchRequest {
        request_id: RequestId::new_v7(),
        deadline_unix_ms: u64::MAX / 2,
        requester: Requester {
            user_id: me.id(),
            features,
        },
        options: MatchOptions::any(),
        exclusions: Vec::new(),
        k: 8,
    };
    let conn = Connection::connect(&w.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let body = Envelope::encode(&Message::MatchRequest(forged));
    ch.basic_publish(
        "".into(),
        comatching_protocol::topology::MATCH_QUEUE.into(),
        BasicPublishOptions::default(),
        &body,
        BasicProperties::default().with_reply_to("forged.replies".into()),
    )
    .await
    .expect("publish");
    let a = &w.appliances[0];
    wait_until(
        CONVERGE,
        "the appliance refuses the forged request",
        || async {
            a.status()
                .await
                .is_some_and(|s| s["sync"]["unauthenticated"] == 1)
        },
    )
    .await;
    let s = a.status().await.expect("status");
    assert_eq!(
        s["matches"]["answered"], 0,
        "a forged request is never answered: {s}"
    );

    // Replies: the real appliance leaves, a stand-in answers with a wrong key, then the right.
    let mut gone = w.appliances.remove(0);
    gone.kill_9();
    let mut partner = None;
    for u in &users[1..] {
        let p = u.me_ok().await["profile"].clone();
        if p["gender"] != features_gender(&me.me_ok().await) && p["dont_pick_me"] == false {
            partner = Some(u.id());
            break;
        }
    }
    let partner = partner.expect("a user of the other gender");
    let responder = Responder::start(&w.amqp_url, move |req| {
        ResponderAction::Reply(ok_reply(req, &[partner]))
    })
    .await;
    responder.set_link_key(Some(LinkKey::from_bytes(std::array::from_fn(|i| i as u8))));
    let r = me.post_match_json("forged-reply", &json!({})).await;
    assert_eq!(r.status, 503, "a reply with a wrong tag was taken: {r:?}");
    assert_eq!(me.points().await, 10_000, "nothing charged");
    responder.set_link_key(Some(key));
    let r = me.post_match_json("true-reply", &json!({})).await;
    assert_eq!(r.status, 201, "the right key is accepted: {r:?}");
    assert_eq!(me.points().await, 9_000);
}

/// A stand-in relay on a vhost of the test's own: it consumes the control queue, counts the
/// hellos (with the instant each arrived) and answers each with a `HelloAck` for `epoch` at
/// `relay_seq` — or, while `answer` is false, stays silent.
struct StandInRelay {
    hellos: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    answer: Arc<std::sync::atomic::AtomicBool>,
    _conn: Connection,
    ch: lapin::Channel,
}

impl StandInRelay {
    async fn start(url: &str, epoch: comatching_protocol::Epoch, relay_seq: u64) -> StandInRelay {
        use comatching_protocol::{Envelope, HelloAck, Message, WireLimits};
        use futures_util::StreamExt;
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = comatching_tests::wait_for(CONVERGE, "the control queue", || {
            let conn = &conn;
            async move {
                let ch = conn.create_channel().await.ok()?;
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                ch.queue_declare(
                    comatching_protocol::topology::CONTROL_QUEUE.into(),
                    passive,
                    FieldTable::default(),
                )
                .await
                .ok()
                .map(|_| ch)
            }
        })
        .await;
        let mut consumer = ch
            .basic_consume(
                comatching_protocol::topology::CONTROL_QUEUE.into(),
                "stand-in-relay".into(),
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume the control queue");
        let hellos = Arc::new(std::sync::Mutex::new(Vec::new()));
        let answer = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (h, a, reply) = (hellos.clone(), answer.clone(), ch.clone());
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let Ok(Message::Hello(hello)) = Envelope::decode(&d.data, &WireLimits::default())
                else {
                    continue;
                };
                h.lock().unwrap().push(std::time::Instant::now());
                if !a.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let ack = Envelope::encode(&Message::HelloAck(HelloAck {
                    appliance_id: hello.appliance_id.clone(),
                    epoch,
                    relay_seq,
                }));
                let _ = reply
                    .basic_publish(
                        "".into(),
                        format!("comatching.sync.{}", hello.appliance_id.as_str())
                            .as_str()
                            .into(),
                        BasicPublishOptions::default(),
                        &ack,
                        BasicProperties::default(),
                    )
                    .await;
            }
        });
        StandInRelay {
            hellos,
            answer,
            _conn: conn,
            ch,
        }
    }

    fn count(&self) -> usize {
        self.hellos.lock().unwrap().len()
    }

    async fn send(&self, queue: &str, msg: comatching_protocol::Message) {
        let body = comatching_protocol::Envelope::encode(&msg);
        self.ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await
            .expect("publish");
    }
}

fn sync_event(epoch: comatching_protocol::Epoch, seq: u64) -> comatching_protocol::Message {
    use comatching_protocol::*;
    Message::SyncEvent(SyncEvent {
        epoch,
        seq,
        user_id: UserId::new_v7(),
        version: 1,
        op: SyncOp::Upsert(Features {
            gender: Gender::Female,
            age: Age::new(22).expect("age"),
            mbti: "ENFP".parse().expect("mbti"),
            hobbies: HobbySet::from_bits(1).expect("hobbies"),
            contact_frequency: ContactFrequency::Normal,
            major: Major::new("Art").expect("major"),
            dont_pick_me: false,
        }),
    })
}

/// Watches `check` for `window` and panics the first time it fails: an observation window for
/// something that must *not* happen (not a wait for something that should).
async fn holds_for(window: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < end {
        assert!(check(), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One outstanding hello: an appliance whose hello is not answered does not ask again, however
/// short its hello interval (each hello makes the relay replay everything after the cursor);
/// the answer frees the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_hello_is_not_repeated_until_answered() {
    use comatching_tests::appliance::{ApplianceConfig, ApplianceProcess};
    let vhost = comatching_tests::Vhost::create("one-hello");
    let epoch = comatching_protocol::Epoch(77);
    let mut cfg = ApplianceConfig::new("box-1", vhost.amqp_url());
    cfg.sync.hello_interval_ms = 100;
    let a = ApplianceProcess::start(cfg).await;
    let relay = StandInRelay::start(&vhost.amqp_url(), epoch, 0).await;
    relay
        .answer
        .store(false, std::sync::atomic::Ordering::SeqCst);
    comatching_tests::wait_until(CONVERGE, "the first hello", || async { relay.count() >= 1 })
        .await;
    // Twenty hello intervals: still the one hello.
    holds_for(
        Duration::from_secs(2),
        "a second hello while one is outstanding",
        || relay.count() == 1,
    )
    .await;
    assert_eq!(a.status().await.expect("status")["sync"]["hellos_sent"], 1);
    // Answered (with an epoch the empty replica lacks, so it has reason to ask again): the
    // next hello follows.
    relay
        .send(
            "comatching.sync.box-1",
            comatching_protocol::Message::HelloAck(comatching_protocol::HelloAck {
                appliance_id: "box-1".parse().expect("id"),
                epoch,
                relay_seq: 0,
            }),
        )
        .await;
    comatching_tests::wait_until(CONVERGE, "the next hello after the answer", || async {
        relay.count() >= 2
    })
    .await;
}

/// Gaps ask for a replay at most once a second: a burst of 40 out-of-order events (seq 2 never
/// comes) over about two seconds, each one a gap, brings at most one hello per second even
/// though every hello is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_hellos_are_rate_limited_to_one_a_second() {
    use comatching_tests::appliance::{ApplianceConfig, ApplianceProcess};
    let vhost = comatching_tests::Vhost::create("gap-hello");
    let epoch = comatching_protocol::Epoch(78);
    let mut cfg = ApplianceConfig::new("box-1", vhost.amqp_url());
    cfg.sync.hello_interval_ms = 600_000; // no periodic hellos in this test
    let mut a = ApplianceProcess::start(cfg).await;
    let relay = StandInRelay::start(&vhost.amqp_url(), epoch, 1).await;
    // Its queue exists once it has said hello; the stream's first event then gives the replica
    // its lineage, and it is caught up.
    comatching_tests::wait_until(CONVERGE, "the first hello", || async { relay.count() >= 1 })
        .await;
    relay
        .send("comatching.sync.box-1", sync_event(epoch, 1))
        .await;
    a.wait_status(CONVERGE, "applied seq 1, acknowledged", |s| {
        s["applied_seq"] == 1 && s["sync"]["hello_acked"] == true && s["sync"]["gap"].is_null()
    })
    .await;
    let before = relay.count();
    let t0 = std::time::Instant::now();
    for seq in 3..43 {
        relay
            .send("comatching.sync.box-1", sync_event(epoch, seq))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await; // pacing the burst, not waiting
    }
    a.wait_status(CONVERGE, "the gap is seen", |s| !s["sync"]["gap"].is_null())
        .await;
    let burst = t0.elapsed().as_secs_f64();
    // Whatever the last gap asked for has had its second to go out.
    tokio::time::sleep(Duration::from_millis(1_100)).await; // observation window
    let hellos = relay.count() - before;
    let allowed = burst.ceil() as usize + 2;
    assert!(
        (1..=allowed).contains(&hellos),
        "{hellos} gap hellos in {burst:.1} s (at most {allowed})"
    );
}

fn features_gender(me: &serde_json::Value) -> serde_json::Value {
    me["profile"]["gender"].clone()
}

/// A match answered by an appliance (201, or 404 when nobody fits): retries 503s with new
/// keys until `within`.
async fn answered_match(user: &comatching_tests::User, tag: &str, within: Duration) -> u16 {
    comatching_tests::wait_for(within, "a match answered by an appliance", || async {
        let r = user
            .post_match_json(&format!("{tag}-{}", rand::random::<u64>()), &json!({}))
            .await;
        matches!(r.status, 201 | 404).then_some(r.status)
    })
    .await
}

/// The consumers count of `queue`, or `None` while it does not exist (a passive declare on a
/// channel of its own: the refusal closes it).
async fn consumers(conn: &Connection, queue: &str) -> Option<u32> {
    let ch = conn.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .ok()?;
    let _ = ch.close(200, "looked".into()).await;
    Some(q.consumer_count())
}

/// The broker cancels a consumer whose queue is deleted (lapin ends its stream). The match
/// queue deleted under a serving appliance: the appliance declares it and consumes again on
/// the same session (no reconnect), the relay's requests reach it. The control queue deleted
/// under the relay: the relay's session is replaced, the queue declared and consumed again,
/// and profile changes still reach the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_deleted_under_their_consumers_are_consumed_again() {
    use comatching_protocol::topology::{CONTROL_QUEUE, MATCH_QUEUE};
    let mut opts = WorldOptions::new("link-cancel");
    opts.max_picked = 1_000;
    let mut w = World::start(&opts).await;
    let users = w.register(20, 8, 1).await;
    w.grant_all(&users, 100_000, 8).await;
    w.wait_converged(CONVERGE).await;
    answered_match(&users[0], "before", Duration::from_secs(30)).await;
    let sessions = |s: serde_json::Value| s["broker_sessions"].as_u64().expect("broker_sessions");
    let before = sessions(w.appliances[0].status().await.expect("status"));
    let conn = Connection::connect(&w.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");

    ch.queue_delete(MATCH_QUEUE.into(), Default::default())
        .await
        .expect("delete the match queue");
    comatching_tests::wait_until(
        Duration::from_secs(10),
        "the match queue declared and consumed again",
        || async { consumers(&conn, MATCH_QUEUE).await == Some(1) },
    )
    .await;
    answered_match(&users[1], "after", Duration::from_secs(10)).await;
    let s = w.appliances[0].status().await.expect("status");
    assert_eq!(sessions(s.clone()), before, "no reconnect: {s}");
    assert_eq!(s["matches"]["consumer_restarts"], 1, "{s}");

    ch.queue_delete(CONTROL_QUEUE.into(), Default::default())
        .await
        .expect("delete the control queue");
    comatching_tests::wait_until(
        Duration::from_secs(10),
        "the control queue declared and consumed again",
        || async { consumers(&conn, CONTROL_QUEUE).await == Some(1) },
    )
    .await;
    w.register(3, 3, 2).await;
    let pool = w.wait_converged(CONVERGE).await;
    assert_eq!(pool.count, 23);
    answered_match(&users[2], "control", Duration::from_secs(10)).await;
}

/// A hello whose answer cannot be delivered — the appliance's sync queue does not exist (it
/// expired, was deleted, or the broker was wiped) — is published `mandatory`, so the broker
/// returns it instead of dropping it: the relay counts it on `/metrics`, stops sending to the
/// missing queue, acknowledges the hello and goes on to the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_answer_to_a_missing_queue_is_returned_and_counted() {
    use comatching_protocol::{Digest, Envelope, Hello, Message};
    use comatching_tests::wait_until;

    let mut opts = WorldOptions::new("link-ghost");
    opts.appliances = 0;
    let w = World::start(&opts).await;
    let conn = Connection::connect(&w.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let relay_url = w.relay.base_url().to_owned();
    let unroutable = || {
        let url = relay_url.clone();
        async move {
            let text = comatching_tests::api::http_client(None)
                .get(format!("{url}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix("comatching_unroutable_hello_answers "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        }
    };
    assert_eq!(unroutable().await, Some(0), "nothing returned yet");
    for n in 1..=2u64 {
        // An appliance that lost its queue: it says hello from scratch, so the answer is a
        // snapshot, then the hello's acknowledgement, all to `comatching.sync.ghost-N`.
        let hello = Envelope::encode(&Message::Hello(Hello {
            appliance_id: format!("ghost-{n}").parse().expect("id"),
            epoch: None,
            applied_seq: 0,
            count: 0,
            digest: Digest::default(),
        }));
        ch.basic_publish(
            "".into(),
            "comatching.control".into(),
            BasicPublishOptions::default(),
            &hello,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
        // The second count proves the first hello was acknowledged: the control queue is
        // consumed one message at a time (prefetch 1).
        wait_until(
            CONVERGE,
            &format!("the relay counts answer {n} as returned"),
            || async { unroutable().await == Some(n) },
        )
        .await;
    }
    assert_eq!(
        queue_depth(&ch, "comatching.control").await,
        0,
        "both hellos were acknowledged"
    );
}
