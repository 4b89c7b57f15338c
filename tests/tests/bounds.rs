//! A broker that stays bounded (issue 13 §3): appliances' sync queues expire when unused, a
//! gone appliance can be retired, the dead-letter queue is capped and counted, queues of an
//! earlier release with other arguments are replaced, and the broker's message count with a
//! gone appliance stays bounded however many changes the relay publishes.

use comatching_protocol::amqp::{
    declare_queue_replacing, declare_quorum_queue, is_precondition_failed, queue_args, quorum_args,
    sync_queue_args, text,
};
use comatching_protocol::topology::{
    CONTROL_QUEUE, DEAD_EXCHANGE, DEAD_QUEUE, DEAD_TALLY_QUEUE, SYNC_EXCHANGE, sync_queue,
};
use comatching_tests::appliance::{ApplianceConfig, ApplianceProcess};
use comatching_tests::relay::DeadLettersSection;
use comatching_tests::world::{World, WorldOptions};
use comatching_tests::{PATIENCE, ProfileBuilder, wait_for, wait_until};
use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;

/// `rabbitmqctl list_queues` of a vhost (name, messages, consumers, arguments), as JSON.
fn list_queues(vhost: &str) -> Value {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "-n", "rabbit@localhost", "list_queues", "-p", vhost])
        .args([
            "name",
            "messages",
            "consumers",
            "arguments",
            "--formatter",
            "json",
        ])
        .output()
        .expect("rabbitmqctl list_queues");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "list_queues prints JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

async fn queues(vhost: &str) -> Value {
    let v = vhost.to_owned();
    tokio::task::spawn_blocking(move || list_queues(&v))
        .await
        .expect("list_queues task")
}

fn find(queues: &Value, name: &str) -> Option<Value> {
    queues
        .as_array()
        .and_then(|qs| qs.iter().find(|q| q["name"] == name))
        .cloned()
}

/// A queue argument as rabbitmqctl prints it ([name, type, value] triples).
fn arg(queue: &Value, name: &str) -> Option<Value> {
    queue["arguments"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t[0] == name))
        .map(|t| t[2].clone())
}

fn total_messages(queues: &Value) -> u64 {
    queues
        .as_array()
        .map(|qs| qs.iter().filter_map(|q| q["messages"].as_u64()).sum())
        .unwrap_or(0)
}

/// One second, in the hours `sync.queue_expires_h` takes.
const SECOND_H: f64 = 1.0 / 3600.0;

/// An appliance that stays away longer than `sync.queue_expires_h` loses its queue to the
/// broker; changes made meanwhile do not pile up anywhere, and when it returns it redeclares
/// the queue and catches up (here by replay: the relay's outbox still reaches back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_sync_queue_expires_and_the_appliance_catches_up_on_return() {
    let mut opts = WorldOptions::new("bounds-expiry");
    opts.appliances = 0;
    let mut w = World::start(&opts).await;
    let mut cfg = ApplianceConfig::new("box-1", w.amqp_url.clone());
    cfg.sync.queue_expires_h = Some(3.0 * SECOND_H);
    w.appliances.push(ApplianceProcess::start(cfg).await);
    w.register(5, 4, 1).await;
    w.wait_converged(PATIENCE).await;
    let vhost = w.vhost.as_ref().expect("own vhost").name().to_owned();
    let q = find(&queues(&vhost).await, &sync_queue("box-1")).expect("sync queue");
    assert_eq!(arg(&q, "x-expires"), Some(3000.into()), "{q}");

    w.appliances[0].kill_9();
    wait_until(PATIENCE, "the unused sync queue expired", || {
        let v = vhost.clone();
        async move { find(&queues(&v).await, &sync_queue("box-1")).is_none() }
    })
    .await;
    // Changes while it is gone go nowhere on the broker.
    w.register(5, 4, 2).await;
    let after = queues(&vhost).await;
    assert!(find(&after, &sync_queue("box-1")).is_none(), "{after}");

    w.appliances[0].restart().await;
    let pool = w.wait_converged(PATIENCE).await;
    assert_eq!(pool.count, 10, "the returning appliance caught up");
}

/// `comatching-relay admin retire-appliance ID`: refused while the appliance consumes its
/// queue (exit 4), then deletes queue and tracking row; nothing left → exit 3; a bad id →
/// exit 2, nothing touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_appliance_deletes_its_queue_and_its_tracking_row() {
    let mut w = World::start(&WorldOptions::new("bounds-retire")).await;
    w.register(3, 3, 1).await;
    w.wait_converged(PATIENCE).await;
    let vhost = w.vhost.as_ref().expect("own vhost").name().to_owned();
    let retire = |id: &str| {
        w.relay
            .command()
            .args(["admin", "retire-appliance", id, "--config"])
            .arg(w.relay.config_path())
            .output()
            .expect("run retire-appliance")
    };
    let bad = retire("Not An Id");
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid_appliance_id"));

    let connected = retire("box-1");
    assert_eq!(connected.status.code(), Some(4), "{connected:?}");
    assert!(find(&queues(&vhost).await, &sync_queue("box-1")).is_some());

    w.appliances[0].kill_9();
    // The broker notices the consumer is gone at once (the socket closes).
    let out = wait_for(PATIENCE, "retire accepted", || {
        let out = retire("box-1");
        async move { (out.status.code() != Some(4)).then_some(out) }
    })
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(report["queue_deleted"], true, "{report}");
    assert_eq!(report["tracking_row_deleted"], true, "{report}");
    assert!(find(&queues(&vhost).await, &sync_queue("box-1")).is_none());
    let listed = w
        .operator
        .user
        .get("/api/v1/admin/appliances")
        .await
        .expect(200);
    assert_eq!(listed["appliances"], Value::Array(vec![]), "{listed}");

    let again = retire("box-1");
    assert_eq!(again.status.code(), Some(3), "{again:?}");
}

/// The dead-letter queue keeps at most `dead_letters.max_length` messages (the oldest go), and
/// every dead letter is counted on `/metrics` by reason and source queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_capped_and_counted_by_reason() {
    let env = comatching_tests::TestEnv::start_with("bounds-dead", |c| {
        c.dead_letters = Some(DeadLettersSection {
            max_length: 20,
            message_ttl_h: 1.0,
        });
    })
    .await;
    let conn = Connection::connect(&env.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    // The tally queue is capped too: the relay's tally must be consuming before the flood, or
    // the broker drops the oldest copies before they are counted.
    let vhost = env.vhost.name().to_owned();
    wait_until(PATIENCE, "the relay consuming the tally queue", || {
        let vhost = vhost.clone();
        async move {
            find(&queues(&vhost).await, DEAD_TALLY_QUEUE)
                .is_some_and(|q| q["consumers"].as_u64().unwrap_or(0) >= 1)
        }
    })
    .await;
    // Garbage on the control queue: the relay rejects each, the broker dead-letters it.
    for i in 0..50u32 {
        ch.basic_publish(
            "".into(),
            "comatching.control".into(),
            BasicPublishOptions::default(),
            format!("garbage {i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    }
    let metrics_url = format!("{}/metrics", env.relay.base_url());
    let line = "comatching_dead_letters_total{reason=\"rejected\",queue=\"comatching.control\"} 50";
    wait_until(PATIENCE, "50 dead letters counted", || {
        let url = metrics_url.clone();
        async move {
            match reqwest::get(&url).await {
                Ok(r) => r.text().await.is_ok_and(|t| t.contains(line)),
                Err(_) => false,
            }
        }
    })
    .await;
    let qs = queues(env.vhost.name()).await;
    let dead = find(&qs, DEAD_QUEUE).expect("dead-letter queue");
    assert_eq!(dead["messages"], 20, "capped: {dead}");
    assert_eq!(arg(&dead, "x-overflow"), Some("drop-head".into()), "{dead}");
    assert_eq!(
        arg(&dead, "x-message-ttl"),
        Some(3_600_000.into()),
        "{dead}"
    );
    let tally = find(&qs, "comatching.dead.tally").expect("tally queue");
    assert_eq!(
        tally["messages"], 0,
        "the relay consumed the tally: {tally}"
    );
}

/// A broker upgraded from an earlier release: the dead-letter queue exists unbounded (no
/// arguments) and an appliance's sync queue without `x-expires`. The relay and the appliance
/// replace both (RabbitMQ refuses a redeclare with other arguments) and everything converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_of_an_earlier_release_are_replaced() {
    let vhost = comatching_tests::Vhost::create("bounds-upgrade");
    {
        let conn = Connection::connect(&vhost.amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(DEAD_QUEUE.into(), durable, FieldTable::default())
            .await
            .expect("old dead queue");
        let old_sync = queue_args(&[
            ("x-queue-type", text("quorum")),
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
            ("x-delivery-limit", AMQPValue::LongLongInt(5)),
            ("x-dead-letter-exchange", text(DEAD_EXCHANGE)),
        ]);
        ch.queue_declare(sync_queue("box-1").as_str().into(), durable, old_sync)
            .await
            .expect("old sync queue");
        for i in 0..3u8 {
            ch.basic_publish(
                "".into(),
                DEAD_QUEUE.into(),
                BasicPublishOptions::default(),
                &[i],
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        }
        conn.close(200, "old release gone".into())
            .await
            .expect("close");
    }
    let mut opts = WorldOptions::new("bounds-upgrade");
    opts.amqp_url = Some(vhost.amqp_url());
    let mut w = World::start(&opts).await;
    w.register(4, 4, 1).await;
    let pool = w.wait_converged(PATIENCE).await;
    assert_eq!(pool.count, 4);
    let qs = queues(vhost.name()).await;
    let dead = find(&qs, DEAD_QUEUE).expect("dead queue");
    assert_eq!(arg(&dead, "x-max-length"), Some(10_000.into()), "{dead}");
    let own = find(&qs, &sync_queue("box-1")).expect("sync queue");
    assert_eq!(
        arg(&own, "x-expires"),
        Some((72 * 3_600_000).into()),
        "{own}"
    );
    drop(w);
}

/// How many profile changes the gone-appliance test makes (`COMATCHING_BOUNDS_CHANGES`, for
/// the measurement in docs/bench/broker.md; small by default to keep the suite quick).
fn changes() -> usize {
    std::env::var("COMATCHING_BOUNDS_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

/// Two appliances connect once and never return: one declared its queue as earlier releases
/// did (no expiry), one as this release does (a short expiry here). After N profile changes
/// the old-style queue holds all N (what the broker looked like before), the new-style queue is
/// gone, and every other queue on the broker is within its configured limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_appliance_leaves_the_broker_bounded() {
    let n = changes();
    let mut opts = WorldOptions::new("bounds-gone");
    opts.appliances = 1;
    let mut w = World::start(&opts).await;
    let vhost = w.vhost.as_ref().expect("own vhost").name().to_owned();
    let conn = Connection::connect(&w.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect");
    let old = sync_queue("gone-old");
    let new = sync_queue("gone-new");
    let old_args = queue_args(&[
        ("x-queue-type", text("quorum")),
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
        ("x-delivery-limit", AMQPValue::LongLongInt(5)),
        ("x-dead-letter-exchange", text(DEAD_EXCHANGE)),
    ]);
    declare_queue_replacing(&conn, &old, old_args)
        .await
        .expect("old-style queue");
    declare_queue_replacing(&conn, &new, sync_queue_args(5, 2_000, None))
        .await
        .expect("new-style queue");
    let ch = conn.create_channel().await.expect("channel");
    for q in [&old, &new] {
        ch.queue_bind(
            q.as_str().into(),
            SYNC_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    }
    conn.close(200, "gone".into()).await.expect("close");

    let users = w.register(20, 8, 1).await;
    let alt = [
        ProfileBuilder::female().set("age", serde_json::json!(23)),
        ProfileBuilder::female().set("age", serde_json::json!(24)),
    ];
    let start_seq = w.relay_pool().await.seq;
    futures_util::StreamExt::for_each_concurrent(futures_util::stream::iter(0..n), 8, |i| {
        let u = &users[i % users.len()];
        let p = &alt[(i / users.len()) % 2];
        async move {
            u.put_profile(p).await.expect(200);
        }
    })
    .await;
    let end_seq = w.wait_converged(PATIENCE * 4).await.seq;
    let published = end_seq - start_seq;
    assert!(published as usize >= n / 2, "{published} changes of {n}");
    let vh = vhost.clone();
    // The new-style queue expires 2 s after its last use; the changes may converge sooner than
    // that, so its disappearance is waited for, not assumed.
    let before = wait_for(
        PATIENCE,
        "every change in the old-style queue, and the new-style queue expired",
        || {
            let vh = vh.clone();
            let old = old.clone();
            let new = new.clone();
            async move {
                let qs = queues(&vh).await;
                let q = find(&qs, &old)?;
                let all_kept = q["messages"].as_u64()? >= end_seq;
                (all_kept && find(&qs, &new).is_none()).then_some(qs)
            }
        },
    )
    .await;
    let old_count = find(&before, &old).expect("old")["messages"]
        .as_u64()
        .unwrap();
    let bounded: u64 = total_messages(&before) - old_count;
    eprintln!(
        "bounds: {published} changes; old-style gone queue {old_count} messages; \
         all other queues {bounded} messages; total {}",
        total_messages(&before)
    );
    // What is left: the live appliance's queue (drained: it converged) and dead letters (capped).
    assert!(
        bounded <= 10_000,
        "the broker holds {bounded} messages besides the old-style queue: {before}"
    );
    drop(w);
}

/// The broker's memory alarm (a tiny watermark on a node of the test's own): publishers are
/// blocked. Profile writes still succeed (they commit to the relay's outbox, which waits),
/// matches answer 503 within their deadline instead of hanging, and once the alarm clears the
/// outbox drains and the appliance holds every change: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_memory_alarm_writes_wait_and_matches_fail_fast() {
    use comatching_tests::private_broker::PrivateBroker;
    let broker = PrivateBroker::start("memalarm");
    let mut opts = WorldOptions::new("bounds-memalarm");
    opts.amqp_url = Some(broker.amqp_url());
    let mut w = World::start(&opts).await;
    let users = w.register(6, 3, 1).await;
    w.grant_all(&users, 10_000, 3).await;
    let before = w.wait_converged(PATIENCE).await;

    broker.set_memory_watermark(&["absolute", "10000000"]);
    let metrics_url = format!("{}/metrics", w.relay.base_url());
    let lag = |text: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with("comatching_outbox_lag "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
    };
    // Writes are accepted while the broker refuses publishes: they wait in the outbox.
    for (i, u) in users.iter().enumerate() {
        let age = 25 + (i as u64 % 5);
        u.put_profile(&ProfileBuilder::female().set("age", serde_json::json!(age)))
            .await
            .expect(200);
    }
    wait_until(PATIENCE, "the writes waiting in the outbox", || {
        let url = metrics_url.clone();
        async move {
            match reqwest::get(&url).await {
                Ok(r) => r
                    .text()
                    .await
                    .ok()
                    .and_then(|t| lag(&t))
                    .is_some_and(|l| l > 0),
                Err(_) => false,
            }
        }
    })
    .await;
    // A match cannot be sent: 503 within the relay's deadline (5 s) plus slack.
    let started = std::time::Instant::now();
    let r = users[0]
        .post_match("alarm-1", &comatching_tests::MatchOptionsBuilder::new())
        .await;
    let took = started.elapsed();
    r.assert_error(503, "matcher_unavailable");
    assert!(
        took < std::time::Duration::from_secs(8),
        "503 after {took:?}"
    );
    assert_eq!(users[0].points().await, 10_000, "nobody is charged");

    broker.set_memory_watermark(&["0.4"]);
    wait_until(PATIENCE, "the outbox drained", || {
        let url = metrics_url.clone();
        async move {
            match reqwest::get(&url).await {
                Ok(r) => r.text().await.ok().and_then(|t| lag(&t)) == Some(0),
                Err(_) => false,
            }
        }
    })
    .await;
    let after = w.wait_converged(PATIENCE).await;
    assert!(
        after.seq >= before.seq + users.len() as u64,
        "{before:?} → {after:?}"
    );
    drop(w);
    drop(broker);
}

/// `broker.quorum_group_size` only places a quorum queue's replicas when it is created, but
/// RabbitMQ holds every redeclare to it (`x-quorum-initial-group-size` is in its equivalence
/// check). Services restarted with a new or another group size must start on the queues that
/// exist: created with 1, then declared without one and with 3, the relay and the appliance
/// come up each time and the queues keep the size they were created with (the sync queue is
/// not replaced either); queues created without one take declarations with one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_restarted_with_another_quorum_group_size_start_on_existing_queues() {
    let mut opts = WorldOptions::new("bounds-group-size");
    opts.quorum_group_size = Some(1);
    let mut w = World::start(&opts).await;
    let vhost = w.vhost.as_ref().expect("own vhost").name().to_owned();
    w.register(4, 4, 1).await;
    w.wait_converged(PATIENCE).await;
    let own = sync_queue(w.appliances[0].config().appliance.id.as_str());
    for size in [None, Some(3)] {
        w.relay.set_quorum_group_size(size);
        w.relay.restart().await;
        w.relay.wait_ready().await;
        let qs = queues(&vhost).await;
        let control = find(&qs, CONTROL_QUEUE).expect("control queue");
        assert_eq!(
            arg(&control, "x-quorum-initial-group-size"),
            Some(1.into()),
            "the control queue kept its size (relay at {size:?}): {control}"
        );
    }
    w.appliances[0].set_quorum_group_size(Some(3));
    w.appliances[0].restart().await;
    w.appliances[0].wait_ready().await;
    w.register(2, 2, 3).await;
    let pool = w.wait_converged(PATIENCE).await;
    assert_eq!(pool.count, 6, "everything converged after the restarts");
    let sync = find(&queues(&vhost).await, &own).expect("sync queue");
    assert_eq!(
        arg(&sync, "x-quorum-initial-group-size"),
        Some(1.into()),
        "the sync queue kept its size: {sync}"
    );

    // The protocol's declaration directly: a queue created without the argument takes
    // declarations with one, and one created with 2 takes declarations with 3 and without.
    let conn = Connection::connect(&w.amqp_url, ConnectionProperties::default())
        .await
        .expect("connect");
    for (created, then) in [(None, [Some(3), Some(1)]), (Some(2), [Some(3), None])] {
        let q = format!("gs-{created:?}");
        let args = |n| quorum_args(&[("x-delivery-limit", AMQPValue::LongLongInt(5))], n);
        declare_quorum_queue(&conn, &q, args(created))
            .await
            .expect("created");
        for n in then {
            declare_quorum_queue(&conn, &q, args(n))
                .await
                .unwrap_or_else(|e| panic!("{q} declared with {n:?}: {e}"));
        }
        // Any other argument still counts.
        let other = quorum_args(&[("x-delivery-limit", AMQPValue::LongLongInt(9))], Some(3));
        let refused = declare_quorum_queue(&conn, &q, other).await;
        assert!(
            refused.as_ref().is_err_and(is_precondition_failed),
            "{q}: another delivery limit is refused: {refused:?}"
        );
    }
}
