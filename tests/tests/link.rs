//! The link end to end (issue 4): the real relay, real appliances and a real broker. Each test
//! builds its own world (vhost or private broker node, relay, appliances, temp dirs).

use std::sync::Arc;
use std::time::Duration;

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
    let dead = ch
        .queue_declare(
            "comatching.dead".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("dead-letter queue exists");
    assert!(
        dead.message_count() >= 2,
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
