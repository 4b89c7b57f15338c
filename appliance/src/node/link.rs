//! The appliance's link to the relay, over the broker only: it dials out, so NAT does not matter.
//!
//! One loop owns the connection (no reliance on the client's automatic recovery): pick a node
//! (`broker.url` may list a cluster's nodes; the [`NodeRotation`] starts after the last one that
//! failed) → connect with a heartbeat → declare the topology → consume this appliance's sync queue → say hello → apply
//! sync batches (durable commit first, then ack) → take match requests only while caught up →
//! on any failure, back off and start again. Malformed messages are rejected without requeue, so
//! the broker dead-letters them and the queue keeps flowing. A batch the store cannot commit is
//! applied event by event: the events before the failing one commit, the failing one is
//! requeued (so a message that always fails is dead-lettered after the delivery limit) and the
//! replica halts before it, retrying through replays spaced out by a [`RetryGate`]
//! (`node::retry` says why it halts rather than skips).

use std::sync::Arc;
use std::time::{Duration, Instant};

use comatching_protocol::{
    Digest, Envelope, Epoch, Hello, HelloAck, Message, SnapshotBegin, SnapshotChunk, SnapshotEnd,
    SnapshotUser, SyncEvent, WireLimits,
};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueBindOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer};
use tokio::sync::{Semaphore, watch};

use super::config::Config;
use super::replica::{Replica, Stuck};
use super::retry::RetryGate;
use crate::sync::SyncPlan;
use comatching_protocol::amqp::{
    Declared, LinkAuth, declare_queue_replacing, declare_shared_topology, ends_connection,
    ensure_dead_queue, is_not_found, redeclare_match_queue, sync_queue_args,
};
use comatching_protocol::config::{amqp_url_with_heartbeat, broker_node};
use comatching_protocol::failover::NodeRotation;
use comatching_protocol::topology::{self, CONTROL_QUEUE, MATCH_QUEUE, SYNC_EXCHANGE};

/// Longest the broker may take to set up a session, or to confirm a hello.
const SETUP_DEADLINE: Duration = Duration::from_secs(15);
/// Longest any one step of a running session may take (a sync batch, a hello, a consumer
/// change, waiting for a match worker). An await on a connection that died mid-call can hang
/// forever in the client; past this the session is torn down and the link reconnects.
const STEP_DEADLINE: Duration = Duration::from_secs(15);

async fn bounded<T>(
    what: &str,
    step: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(STEP_DEADLINE, step)
        .await
        .map_err(|_| format!("{what} took longer than {STEP_DEADLINE:?}"))?
}

/// How long an unanswered hello blocks the next one (a lost hello or answer is retried then).
const ACK_PATIENCE: Duration = Duration::from_secs(30);
/// At most one gap- or error-driven hello per this interval.
const HELLO_MIN_GAP: Duration = Duration::from_secs(1);

pub fn sync_queue(cfg: &Config) -> String {
    topology::sync_queue(cfg.appliance.id.as_str())
}

/// The shared topology (declared exactly as the relay does), the dead-letter queue when it is
/// missing (skipped when its home node is down), then this appliance's own sync queue, bound to
/// the sync exchange. A sync queue left by an earlier release with other arguments is replaced
/// (its events are replayed on hello).
async fn declare_topology(conn: &Connection, cfg: &Config) -> lapin::Result<()> {
    declare_shared_topology(conn, cfg.broker.quorum_group_size).await?;
    ensure_dead_queue(conn).await?;
    let own = sync_queue(cfg);
    let args = sync_queue_args(
        cfg.sync.delivery_limit,
        cfg.sync_queue_expires_ms(),
        cfg.broker.quorum_group_size,
    );
    if declare_queue_replacing(conn, &own, args).await? == Declared::Replaced {
        tracing::warn!(
            queue = own,
            "sync queue had other arguments (an earlier release's); replaced it, catching up by hello"
        );
    }
    let ch = conn.create_channel().await?;
    ch.queue_bind(
        own.as_str().into(),
        SYNC_EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = ch.close(200, "bound".into()).await;
    Ok(())
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A snapshot being received: checked chunk by chunk, swapped in only when complete and equal
/// to the relay's count and digest.
struct Staging {
    epoch: Epoch,
    snapshot_id: u64,
    high_water_seq: u64,
    next_index: u32,
    users: Vec<SnapshotUser>,
}

pub struct Link {
    pub cfg: Arc<Config>,
    pub replica: Arc<Replica>,
    /// Read from `[broker]` at start (`comatching_protocol::amqp::tls_config`).
    pub tls: lapin::tcp::OwnedTLSConfig,
    /// Tags what this appliance publishes, checks what it receives (`broker.link_key_file`).
    pub auth: Arc<LinkAuth>,
}

/// Per-session mutable state of the sync consumer.
struct SessionState {
    staging: Option<Staging>,
    want_hello: bool,
    last_hello: Option<Instant>,
    /// When the hello still unanswered was sent. While one is outstanding no other is sent:
    /// each hello makes the relay replay everything after our cursor, so hellos sent faster
    /// than the relay answers them would pile up duplicate replays (seen at 100k users).
    awaiting_ack: Option<Instant>,
    /// Spaces out replays while a sync event cannot be committed.
    retry: RetryGate,
}

impl Link {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let urls: Vec<(String, String)> = self
            .cfg
            .broker
            .url
            .as_slice()
            .iter()
            .map(|u| {
                let node = broker_node(u).unwrap_or_else(|| "?".into());
                (
                    amqp_url_with_heartbeat(u, self.cfg.broker.heartbeat_s),
                    node,
                )
            })
            .collect();
        let mut rotation = NodeRotation::new(urls.len());
        let tls = self.tls.clone();
        let mut backoff = Duration::from_millis(100);
        let max_backoff = Duration::from_millis(self.cfg.broker.max_backoff_ms.max(100));
        loop {
            if *shutdown.borrow() {
                return;
            }
            let started = Instant::now();
            let at = rotation.current();
            let (url, node) = &urls[at];
            let result = match tokio::time::timeout(
                Duration::from_secs(10),
                comatching_protocol::amqp::connect(url, &tls),
            )
            .await
            {
                Ok(Ok(conn)) => {
                    rotation.connected(at);
                    let r = self.session(&conn, node, &mut shutdown).await;
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into()))
                            .await;
                    r
                }
                Ok(Err(e)) => Err(format!("connect to {node}: {e}")),
                Err(_) => Err(format!("connect to {node} timed out")),
            };
            // Whether the attempt failed or a session on the node ended, the next attempt
            // starts after this node.
            rotation.failed(at);
            {
                let mut l = self.replica.link.lock().unwrap_or_else(|p| p.into_inner());
                l.broker_connected = false;
                l.broker_node = None;
                l.hello_acked = false;
                l.connected_at = None;
                if let Err(e) = &result {
                    l.last_error = Some(e.clone());
                }
            }
            if *shutdown.borrow() {
                return;
            }
            if let Err(e) = result {
                tracing::warn!(node = %node, error = %e, retry_in_ms = backoff.as_millis() as u64, "broker link down");
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(max_backoff);
        }
    }

    async fn session(
        &self,
        conn: &Connection,
        node: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let e = |what: &'static str| move |err: lapin::Error| format!("{what}: {err}");
        // Every step of the set-up has a deadline: a broker can accept a connection and then
        // never answer a declare (a quorum queue without a leader after a crash).
        let setup = async {
            declare_topology(conn, &self.cfg)
                .await
                .map_err(e("declare topology"))?;
            let sync_ch = conn.create_channel().await.map_err(e("channel"))?;
            let prefetch = (self.cfg.sync.batch_max * 2).min(u16::MAX as usize) as u16;
            sync_ch
                .basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(e("qos"))?;
            let sync_consumer = sync_ch
                .basic_consume(
                    sync_queue(&self.cfg).as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(e("consume sync"))?;
            let ctl = conn.create_channel().await.map_err(e("channel"))?;
            ctl.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(e("confirm"))?;
            let match_ch = self.match_channel(conn).await?;
            Ok::<_, String>((sync_consumer, ctl, match_ch))
        };
        let (mut sync_consumer, ctl, mut match_ch) = tokio::time::timeout(SETUP_DEADLINE, setup)
            .await
            .map_err(|_| format!("broker set-up took longer than {SETUP_DEADLINE:?}"))??;
        let queue = sync_queue(&self.cfg);
        let workers = Arc::new(Semaphore::new(self.cfg.matching.workers));
        let mut match_pump: Option<MatchPump> = None;
        // Since when the match queue is missing (the broker cancelled our consumer, or a
        // consume found no queue): declared again before the next consume, retried each tick
        // while its old home node is still leaving, for at most STEP_DEADLINE.
        let mut match_queue_gone: Option<Instant> = None;

        {
            let mut l = self.replica.link.lock().unwrap_or_else(|p| p.into_inner());
            l.broker_connected = true;
            l.broker_node = Some(node.to_owned());
            l.hello_acked = false;
            l.connected_at = Some(Instant::now());
            l.broker_sessions += 1;
        }
        tracing::info!(queue, node, "broker link up");
        let mut st = SessionState {
            staging: None,
            want_hello: true,
            last_hello: None,
            awaiting_ack: None,
            retry: RetryGate::new(
                Duration::from_secs(1),
                Duration::from_millis(self.cfg.sync.retry_max_ms),
            ),
        };
        self.maybe_hello(&ctl, &mut st, true).await?;
        let mut hello_tick = tokio::time::interval(Duration::from_millis(
            self.cfg.sync.hello_interval_ms.max(100),
        ));
        hello_tick.tick().await;
        let mut ready_tick = tokio::time::interval(Duration::from_millis(100));
        let mut events = conn.events_listener();
        loop {
            tokio::select! {
                d = sync_consumer.next() => {
                    let d = d.ok_or("sync consumer ended")?.map_err(e("sync delivery"))?;
                    bounded("a sync batch", async {
                        self.handle_sync_batch(d, &mut sync_consumer, &mut st).await?;
                        self.maybe_hello(&ctl, &mut st, false).await
                    })
                    .await?;
                }
                end = pump_end(&mut match_pump) => {
                    let pump = match_pump.take().expect("a pump was running");
                    end.map_err(|e| format!("match pump: {e}"))??;
                    if !pump.cancelling {
                        // The broker cancelled the consumer (lapin ends the stream): the
                        // queue was deleted — on a cluster the non-durable match queue goes
                        // with its node while ours lives on. The channel and the session are
                        // fine: the next tick declares the queue and consumes again.
                        match_queue_gone.get_or_insert_with(Instant::now);
                        self.replica.link.lock().unwrap_or_else(|p| p.into_inner()).match_consumer_restarts += 1;
                        tracing::warn!(node, "match consumer cancelled by the broker: declaring the match queue again");
                    }
                }
                _ = hello_tick.tick() => {
                    st.want_hello = true;
                    bounded("a hello", self.maybe_hello(&ctl, &mut st, true)).await?;
                }
                _ = ready_tick.tick() => {
                    if !conn.status().connected() {
                        return Err("connection closed".into());
                    }
                    // A hello held back (by the minimum gap or a retry pause) goes out when due,
                    // not only when the next batch or the periodic tick comes.
                    bounded("a hello", self.maybe_hello(&ctl, &mut st, false)).await?;
                    let meta = self.replica.meta();
                    let ready = self.replica.ready(&meta);
                    match (&mut match_pump, ready) {
                        (None, true) => {
                            if let Some(since) = match_queue_gone {
                                let declared = bounded("declaring the match queue", async {
                                    Ok(redeclare_match_queue(conn).await)
                                })
                                .await?;
                                match declared {
                                    Ok(()) => {
                                        tracing::info!(node, "match queue declared again");
                                        match_queue_gone = None;
                                    }
                                    Err(err) if is_not_found(&err) && since.elapsed() < STEP_DEADLINE => {
                                        tracing::debug!(error = %err, "match queue's old home node is still leaving; retrying");
                                        continue;
                                    }
                                    Err(err) => return Err(format!("declare match queue: {err}")),
                                }
                            }
                            let consumed = bounded("consuming the match queue", async {
                                Ok(match_ch
                                    .basic_consume(MATCH_QUEUE.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
                                    .await)
                            })
                            .await?;
                            match consumed {
                                Ok(c) => {
                                    tracing::info!(applied_seq = meta.cursor.applied_seq, "caught up: serving matches");
                                    match_pump = Some(MatchPump::start(
                                        c,
                                        workers.clone(),
                                        self.replica.clone(),
                                        match_ch.clone(),
                                        self.auth.clone(),
                                    ));
                                }
                                // No match queue (skipped at connect while its old home was
                                // leaving, or deleted since): the refusal closed the channel.
                                // A new one, and the queue is declared at the next tick.
                                Err(err) if is_not_found(&err) => {
                                    tracing::warn!(node, error = %err, "no match queue to consume: declaring it again");
                                    match_queue_gone.get_or_insert_with(Instant::now);
                                    match_ch = bounded("a match channel", self.match_channel(conn)).await?;
                                }
                                Err(err) => return Err(format!("consume match: {err}")),
                            }
                        }
                        (Some(pump), false) if !pump.cancelling => {
                            bounded("cancelling the match consumer", async {
                                match_ch
                                    .basic_cancel(pump.tag.as_str().into(), BasicCancelOptions::default())
                                    .await
                                    .map_err(e("cancel match"))
                            })
                            .await?;
                            tracing::info!("behind the relay: stopped serving matches");
                            // The pump hands what was already delivered back to the queue
                            // (`handle_match` sees the replica is behind) and ends.
                            pump.cancelling = true;
                        }
                        _ => {}
                    }
                }
                ev = events.next() => {
                    if let Some(lapin::Event::Error(err)) = ev {
                        if ends_connection(conn, &err) {
                            return Err(format!("connection: {err}"));
                        }
                        // One channel closed by the broker (a refused declare): its user
                        // handles it.
                        tracing::debug!(error = %err, "a channel was closed by the broker");
                    }
                    if !conn.status().connected() {
                        return Err("connection closed".into());
                    }
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    /// The channel match requests are consumed and answered on, with the configured prefetch.
    async fn match_channel(&self, conn: &Connection) -> Result<Channel, String> {
        let ch = conn
            .create_channel()
            .await
            .map_err(|err| format!("channel: {err}"))?;
        ch.basic_qos(self.cfg.matching.prefetch, BasicQosOptions::default())
            .await
            .map_err(|err| format!("qos: {err}"))?;
        Ok(ch)
    }

    /// Sends a hello when one is wanted and the last one is not too recent (or `force`).
    async fn maybe_hello(
        &self,
        ctl: &Channel,
        st: &mut SessionState,
        force: bool,
    ) -> Result<(), String> {
        if !st.want_hello {
            return Ok(());
        }
        if !force && st.last_hello.is_some_and(|t| t.elapsed() < HELLO_MIN_GAP) {
            return Ok(());
        }
        if st.awaiting_ack.is_some_and(|t| t.elapsed() < ACK_PATIENCE) {
            return Ok(());
        }
        if !st.retry.open(Instant::now()) {
            // A commit failed: the replay this hello would bring waits for the pause.
            return Ok(());
        }
        let meta = self.replica.meta();
        let hello = Hello {
            appliance_id: self.cfg.appliance.id.clone(),
            epoch: meta.cursor.epoch,
            applied_seq: meta.cursor.applied_seq,
            count: meta.count,
            digest: meta.digest,
        };
        let body = Envelope::encode(&Message::Hello(hello));
        let confirm = ctl
            .basic_publish(
                "".into(),
                CONTROL_QUEUE.into(),
                BasicPublishOptions::default(),
                &body,
                self.auth
                    .sign(BasicProperties::default().with_delivery_mode(2), &body),
            )
            .await
            .map_err(|e| format!("hello: {e}"))?;
        match tokio::time::timeout(SETUP_DEADLINE, confirm).await {
            Ok(Ok(Confirmation::Ack(_))) => {}
            other => return Err(format!("hello not confirmed: {other:?}")),
        }
        st.want_hello = false;
        st.retry.passed();
        st.last_hello = Some(Instant::now());
        st.awaiting_ack = Some(Instant::now());
        self.replica
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .hellos_sent += 1;
        tracing::debug!(applied_seq = meta.cursor.applied_seq, "hello sent");
        Ok(())
    }

    /// Takes `first` and whatever else is already waiting (up to the batch size), applies the
    /// sync events in one durable commit, handles snapshot frames and acks in order.
    async fn handle_sync_batch(
        &self,
        first: Delivery,
        consumer: &mut Consumer,
        st: &mut SessionState,
    ) -> Result<(), String> {
        let mut deliveries = vec![first];
        let wait = Duration::from_millis(self.cfg.sync.batch_wait_ms);
        while deliveries.len() < self.cfg.sync.batch_max {
            match tokio::time::timeout(wait, consumer.next()).await {
                Ok(Some(Ok(d))) => deliveries.push(d),
                Ok(Some(Err(err))) => return Err(format!("sync delivery: {err}")),
                Ok(None) => return Err("sync consumer ended".into()),
                Err(_) => break,
            }
        }
        let limits = WireLimits::default();
        let mut events: Vec<SyncEvent> = Vec::new();
        let mut held: Vec<Delivery> = Vec::new();
        for d in deliveries {
            if let Err(e) = self.auth.admit(&d.properties, &d.data) {
                tracing::warn!(code = e.code(), error = %e, "unauthenticated sync message: dead-lettering");
                self.replica
                    .link
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .unauthenticated += 1;
                self.dead_letter(&d, &format!("unauthenticated sync message: {e}"))
                    .await?;
                continue;
            }
            match Envelope::decode(&d.data, &limits) {
                Err(err) => {
                    tracing::warn!(code = err.code(), error = %err, "malformed sync message: dead-lettering");
                    self.dead_letter(&d, &format!("malformed sync message: {err}"))
                        .await?;
                }
                Ok(Message::SyncEvent(ev)) => {
                    let relay_epoch = self
                        .replica
                        .link
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .relay_epoch;
                    if relay_epoch.is_some_and(|e| e != ev.epoch) {
                        // Not the lineage the relay answered our last hello with: a stale or
                        // forged event. Dead-letter it; a real lineage change reaches us as a
                        // snapshot after the next hello.
                        let why = format!("sync event of epoch {} (relay is on another)", ev.epoch);
                        self.dead_letter(&d, &why).await?;
                    } else if st.staging.is_some() {
                        // Covered by the replay the relay sends after the snapshot.
                        ack(&d).await?;
                    } else {
                        events.push(ev);
                        held.push(d);
                    }
                }
                Ok(Message::HelloAck(a)) => {
                    self.flush(&mut events, &mut held, st).await?;
                    if a.appliance_id == self.cfg.appliance.id {
                        self.on_hello_ack(&a, st).await?;
                    }
                    ack(&d).await?;
                }
                Ok(Message::SnapshotBegin(b)) => {
                    self.flush(&mut events, &mut held, st).await?;
                    self.on_snapshot_begin(&b, st);
                    ack(&d).await?;
                }
                Ok(Message::SnapshotChunk(c)) => {
                    self.flush(&mut events, &mut held, st).await?;
                    self.on_snapshot_chunk(c, st);
                    ack(&d).await?;
                }
                Ok(Message::SnapshotEnd(end)) => {
                    self.flush(&mut events, &mut held, st).await?;
                    self.on_snapshot_end(&end, st).await?;
                    ack(&d).await?;
                }
                Ok(other) => {
                    let why = format!("unexpected {} on the sync queue", other.kind());
                    tracing::warn!(why, "dead-lettering");
                    self.dead_letter(&d, &why).await?;
                }
            }
        }
        self.flush(&mut events, &mut held, st).await
    }

    async fn dead_letter(&self, d: &Delivery, why: &str) -> Result<(), String> {
        {
            let mut l = self.replica.link.lock().unwrap_or_else(|p| p.into_inner());
            l.dead_lettered += 1;
            l.last_error = Some(why.to_owned());
        }
        d.reject(BasicRejectOptions { requeue: false })
            .await
            .map(|_| ())
            .map_err(|e| format!("reject: {e}"))
    }

    /// Commits the pending events durably, then acks them.
    async fn flush(
        &self,
        events: &mut Vec<SyncEvent>,
        held: &mut Vec<Delivery>,
        st: &mut SessionState,
    ) -> Result<(), String> {
        if events.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(events);
        let deliveries = std::mem::take(held);
        let replica = self.replica.clone();
        let (result, batch) = tokio::task::spawn_blocking(move || {
            let r = replica.apply_blocking(&batch);
            (r, batch)
        })
        .await
        .map_err(|e| e.to_string())?;
        let plan = match result {
            Ok(plan) => plan,
            Err(err) => {
                tracing::warn!(code = err.code(), error = %err, "batch commit failed; applying its events one by one");
                return self.flush_isolating(batch, deliveries, st).await;
            }
        };
        self.after_commit(plan.changes.len(), &plan, &batch, st);
        for d in &deliveries {
            ack(d).await?;
        }
        Ok(())
    }

    /// What a committed batch (or its committed prefix) tells the link: `changes` applied,
    /// `plan` the last commit's decision. Asks for a hello on a gap or a needed resync and
    /// clears a stuck event the cursor has passed.
    fn after_commit(
        &self,
        changes: usize,
        plan: &SyncPlan,
        batch: &[SyncEvent],
        st: &mut SessionState,
    ) {
        let max_seq = batch.iter().map(|e| e.seq).max().unwrap_or(0);
        {
            let mut l = self.replica.link.lock().unwrap_or_else(|p| p.into_inner());
            l.events_applied += changes as u64;
            if changes > 0 {
                l.last_applied_at = Some(Instant::now());
            }
            l.gap = plan.gap.map(|g| (g.from, g.to));
            if plan.resync.is_none() && l.relay_epoch == batch.first().map(|e| e.epoch) {
                l.relay_seq = l.relay_seq.max(max_seq);
            }
        }
        if let Some(r) = plan.resync {
            tracing::warn!(?r, "sync batch needs a resync; asking the relay");
            st.want_hello = true;
        }
        if let Some(g) = plan.gap {
            tracing::info!(
                from = g.from,
                to = g.to,
                "gap in the sync stream; asking for a replay"
            );
            st.want_hello = true;
        }
        let mut l = self.replica.link.lock().unwrap_or_else(|p| p.into_inner());
        if l.stuck
            .as_ref()
            .is_some_and(|s| s.seq <= plan.cursor.applied_seq)
        {
            let s = l.stuck.take().expect("checked");
            tracing::info!(
                seq = s.seq,
                failures = s.failures,
                "the stuck sync event is committed; the replica moves on"
            );
            st.retry.reset();
        }
    }

    /// The batch did not commit as a whole: commit its events one by one up to the first that
    /// fails, ack those, requeue the failing one (the broker dead-letters it after the delivery
    /// limit) and drop the rest (past our cursor, so the replay resends them). The replica halts
    /// at the failing event until a retry commits it; see `node::retry`.
    async fn flush_isolating(
        &self,
        batch: Vec<SyncEvent>,
        deliveries: Vec<Delivery>,
        st: &mut SessionState,
    ) -> Result<(), String> {
        let replica = self.replica.clone();
        let (iso, batch) = tokio::task::spawn_blocking(move || {
            let iso = replica.apply_isolating(&batch);
            (iso, batch)
        })
        .await
        .map_err(|e| e.to_string())?;
        if let Some(plan) = &iso.last {
            self.after_commit(iso.changes, plan, &batch, st);
        }
        let Some((bad, err)) = iso.failed else {
            // It went through this time (a transient failure).
            for d in &deliveries {
                ack(d).await?;
            }
            return Ok(());
        };
        let ev = &batch[bad];
        let why = format!("{}: {err}", err.code());
        tracing::error!(
            seq = ev.seq,
            user = %ev.user_id,
            error = %why,
            "cannot commit this sync event: holding the replica before it and requeueing it"
        );
        {
            let mut l = self.replica.link.lock().unwrap_or_else(|p| p.into_inner());
            l.apply_failures += 1;
            let (failures, since_unix_ms) = match &l.stuck {
                Some(s) if s.seq == ev.seq => (s.failures + 1, s.since_unix_ms),
                _ => (1, now_unix_ms()),
            };
            l.stuck = Some(Stuck {
                seq: ev.seq,
                user_id: ev.user_id.to_hex(),
                failures,
                error: why.clone(),
                since_unix_ms,
            });
            l.last_error = Some(format!("sync seq {} cannot be committed: {why}", ev.seq));
        }
        st.retry.failed(Instant::now());
        st.want_hello = true;
        for (i, d) in deliveries.iter().enumerate() {
            if i == bad {
                d.nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
                .map_err(|e| format!("nack: {e}"))?;
            } else {
                ack(d).await?;
            }
        }
        Ok(())
    }

    async fn on_hello_ack(&self, a: &HelloAck, st: &mut SessionState) -> Result<(), String> {
        let meta = self.replica.meta();
        st.awaiting_ack = None;
        let mut l = self.replica.link.lock().unwrap_or_else(|p| p.into_inner());
        l.relay_epoch = Some(a.epoch);
        l.relay_seq = a.relay_seq;
        l.hello_acked = true;
        if meta.cursor.epoch != Some(a.epoch) || meta.cursor.applied_seq < a.relay_seq {
            // The answer did not bring us there (a lost snapshot, say): ask again.
            st.want_hello = true;
        }
        Ok(())
    }

    fn on_snapshot_begin(&self, b: &SnapshotBegin, st: &mut SessionState) {
        tracing::info!(high_water_seq = b.high_water_seq, "snapshot begins");
        st.staging = Some(Staging {
            epoch: b.epoch,
            snapshot_id: b.snapshot_id,
            high_water_seq: b.high_water_seq,
            next_index: 0,
            users: Vec::new(),
        });
        self.replica
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot_in_progress = Some(b.high_water_seq);
    }

    fn abort_snapshot(&self, st: &mut SessionState, why: &str) {
        tracing::warn!(why, "snapshot abandoned; asking again");
        st.staging = None;
        st.want_hello = true;
        let mut l = self.replica.link.lock().unwrap_or_else(|p| p.into_inner());
        l.snapshot_in_progress = None;
        l.last_error = Some(format!("snapshot abandoned: {why}"));
    }

    fn on_snapshot_chunk(&self, c: SnapshotChunk, st: &mut SessionState) {
        let ok = st.staging.as_ref().is_some_and(|s| {
            s.snapshot_id == c.snapshot_id && s.epoch == c.epoch && s.next_index == c.index
        });
        if !ok {
            if st.staging.is_some() {
                self.abort_snapshot(st, "chunk out of order");
            }
            return;
        }
        if let Some(s) = st.staging.as_mut() {
            s.next_index += 1;
            s.users.extend(c.users);
        }
    }

    async fn on_snapshot_end(
        &self,
        end: &SnapshotEnd,
        st: &mut SessionState,
    ) -> Result<(), String> {
        let Some(staging) = st.staging.take() else {
            return Ok(());
        };
        let digest = Digest::of(staging.users.iter().map(|u| (u.user_id, u.version)));
        let mut ids: Vec<_> = staging.users.iter().map(|u| u.user_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let complete = end.snapshot_id == staging.snapshot_id
            && end.epoch == staging.epoch
            && end.high_water_seq == staging.high_water_seq
            && end.chunks == staging.next_index
            && end.count == staging.users.len() as u64
            && ids.len() == staging.users.len()
            && end.digest == digest;
        if !complete {
            st.staging = None;
            self.abort_snapshot(st, "count, digest or framing does not match");
            return Ok(());
        }
        let replica = self.replica.clone();
        let (epoch, hw) = (staging.epoch, staging.high_water_seq);
        let t = Instant::now();
        let users = staging.users;
        let n = users.len();
        tokio::task::spawn_blocking(move || replica.replace_blocking(epoch, hw, &users))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("snapshot swap: {e}"))?;
        {
            let mut l = self.replica.link.lock().unwrap_or_else(|p| p.into_inner());
            l.snapshot_in_progress = None;
            l.snapshots_loaded += 1;
            l.last_applied_at = Some(Instant::now());
            l.stuck = None;
            st.retry.reset();
            l.relay_epoch = Some(epoch);
            l.relay_seq = hw;
            l.gap = None;
        }
        tracing::info!(
            users = n,
            high_water_seq = hw,
            took_ms = t.elapsed().as_millis() as u64,
            "snapshot loaded"
        );
        Ok(())
    }
}

async fn ack(d: &Delivery) -> Result<(), String> {
    d.ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("ack: {e}"))
}

async fn reject(d: &Delivery, requeue: bool) {
    let _ = d.reject(BasicRejectOptions { requeue }).await;
}

/// Takes match requests off their consumer and gives each to a worker, in a task of its own:
/// the session loop's other work (a sync batch's wait and fsync, a hello) never holds a match
/// request back (issue 16: it did, by up to `sync.batch_wait_ms` plus a commit).
struct MatchPump {
    tag: String,
    /// Set once we cancelled the consumer ourselves (the end is then not the broker's doing).
    cancelling: bool,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl MatchPump {
    fn start(
        mut consumer: Consumer,
        workers: Arc<Semaphore>,
        replica: Arc<Replica>,
        ch: Channel,
        auth: Arc<LinkAuth>,
    ) -> MatchPump {
        let tag = consumer.tag().to_string();
        let task = tokio::spawn(async move {
            while let Some(d) = consumer.next().await {
                let d = d.map_err(|e| format!("match delivery: {e}"))?;
                let delivered = Instant::now();
                let permit = bounded("a free match worker", async {
                    workers
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| "workers closed".to_owned())
                })
                .await?;
                let (replica, ch, auth) = (replica.clone(), ch.clone(), auth.clone());
                tokio::spawn(async move {
                    // A reply or ack on a connection that died mid-call may never resolve;
                    // the worker must come back either way.
                    let _ = tokio::time::timeout(
                        STEP_DEADLINE,
                        handle_match(replica, ch, auth, d, delivered),
                    )
                    .await;
                    drop(permit);
                });
            }
            Ok(())
        });
        MatchPump {
            tag,
            cancelling: false,
            task,
        }
    }
}

impl Drop for MatchPump {
    /// A session that ends takes its pump with it.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits for the running pump to end (never, without one).
async fn pump_end(
    pump: &mut Option<MatchPump>,
) -> Result<Result<(), String>, tokio::task::JoinError> {
    match pump {
        Some(p) => (&mut p.task).await,
        None => std::future::pending().await,
    }
}

/// Answers one match request: expired ones are dropped unread (the relay stopped waiting),
/// malformed ones dead-lettered, and requests that arrive while this appliance is not caught up
/// are handed back to the queue for another appliance.
async fn handle_match(
    replica: Arc<Replica>,
    ch: Channel,
    auth: Arc<LinkAuth>,
    d: Delivery,
    delivered: Instant,
) {
    let started = Instant::now();
    replica.stages.dispatch.observe(started - delivered);
    if let Err(e) = auth.admit(&d.properties, &d.data) {
        tracing::warn!(code = e.code(), error = %e, "unauthenticated match request: dead-lettering");
        {
            let mut l = replica.link.lock().unwrap_or_else(|p| p.into_inner());
            l.dead_lettered += 1;
            l.unauthenticated += 1;
        }
        return reject(&d, false).await;
    }
    let req = match Envelope::decode(&d.data, &WireLimits::default()) {
        Ok(Message::MatchRequest(r)) => r,
        Ok(other) => {
            tracing::warn!(kind = other.kind(), "unexpected message on the match queue");
            replica
                .link
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .dead_lettered += 1;
            return reject(&d, false).await;
        }
        Err(err) => {
            tracing::warn!(code = err.code(), error = %err, "malformed match request");
            replica
                .link
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .dead_lettered += 1;
            return reject(&d, false).await;
        }
    };
    let (Some(reply_to), Some(correlation)) = (
        d.properties.reply_to().clone(),
        d.properties.correlation_id().clone(),
    ) else {
        tracing::warn!("match request without reply_to or correlation_id");
        return reject(&d, false).await;
    };
    if now_unix_ms() > req.deadline_unix_ms {
        replica
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .matches_expired += 1;
        let _ = d.ack(BasicAckOptions::default()).await;
        return;
    }
    let r = replica.clone();
    // Not ready (fell behind since the consumer started): back to the queue for another box.
    if !replica.ready(&replica.meta()) {
        return reject(&d, true).await;
    }
    let Ok(reply) =
        tokio::task::spawn_blocking(move || r.answer_blocking(&req, now_unix_ms())).await
    else {
        return reject(&d, true).await;
    };
    let ranked = Instant::now();
    replica.stages.rank.observe(ranked - started);
    let body = Envelope::encode(&Message::MatchReply(reply));
    let published = ch
        .basic_publish(
            "".into(),
            reply_to,
            BasicPublishOptions::default(),
            &body,
            auth.sign(
                BasicProperties::default().with_correlation_id(correlation),
                &body,
            ),
        )
        .await;
    if let Err(err) = published {
        tracing::warn!(error = %err, "could not publish a match reply");
        return reject(&d, true).await;
    }
    replica.stages.reply.observe(ranked.elapsed());
    replica.stages.total.observe(delivered.elapsed());
    {
        let now_s = replica.started.elapsed().as_secs();
        let mut l = replica.link.lock().unwrap_or_else(|p| p.into_inner());
        l.matches_answered += 1;
        l.answered_recent.record(now_s);
    }
    let _ = d.ack(BasicAckOptions::default()).await;
}
