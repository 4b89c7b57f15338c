//! The relay's connection to RabbitMQ, owned by us rather than by the client's automatic
//! recovery (which has an open report of never reconnecting after a broker restart).
//!
//! `BrokerSupervisor::run` loops: pick a node (`broker.url` may list a cluster's nodes; the
//! [`NodeRotation`] starts after the last one that failed) → connect (with heartbeat and
//! timeout) → declare the topology →
//! open a confirm-mode channel for the outbox and one for match RPCs → publish the `Session` to
//! everyone watching → wait until the connection fails or a user reports it broken → back off
//! and start again. Users read the current session from `BrokerHandle` and never hold a stale
//! one for long: a session is `None` while disconnected.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use comatching_protocol::amqp::{
    DeadLetterLimits, LinkAuth, declare_dead_letter_queues, declare_shared_topology,
    ends_connection, redeclare_match_queue,
};
use comatching_protocol::failover::NodeRotation;
use comatching_protocol::topology::LEGACY_MATCH_QUEUES;
use futures_util::StreamExt;
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::{Notify, watch};

use crate::config;
use comatching_protocol::config::{amqp_url_with_heartbeat, broker_node};

/// One live connection and the channels the relay uses on it.
pub struct Session {
    pub id: u64,
    /// The node this session is on, `host:port` (no credentials): `/readyz`, logs.
    pub node: String,
    pub connection: Connection,
    /// Confirm mode; used only by the outbox publisher (so confirms arrive in seq order).
    pub outbox: Channel,
    /// Confirm mode; publishes match requests and consumes direct replies on the same channel,
    /// as direct reply-to requires.
    pub rpc: Channel,
    /// Confirm mode; consumes hellos and publishes replays and snapshots.
    pub control: Channel,
    broken: Notify,
    is_broken: AtomicBool,
}

impl Session {
    /// Reports that something on this session failed; the supervisor replaces it.
    pub fn mark_broken(&self, why: &str) {
        if !self.is_broken.swap(true, Ordering::SeqCst) {
            tracing::warn!(session = self.id, why, "broker session broken");
        }
        self.broken.notify_one();
    }

    /// Declares the match queue again on this session: it is non-durable, so on a cluster it
    /// disappears with the node that held it while this session's own node lives on. A
    /// `NOT_FOUND` (its old home node is still leaving) leaves the session as it is.
    pub async fn redeclare_match_queue(&self) -> lapin::Result<()> {
        let r = redeclare_match_queue(&self.connection).await;
        if r.is_ok() {
            tracing::info!(session = self.id, node = %self.node, "match queue declared again");
        }
        r
    }
}

#[derive(Clone)]
pub struct BrokerHandle {
    rx: watch::Receiver<Option<Arc<Session>>>,
    /// Tags what the relay publishes and checks what it receives (`broker.link_key_file`).
    pub auth: Arc<LinkAuth>,
}

impl BrokerHandle {
    pub fn current(&self) -> Option<Arc<Session>> {
        self.rx.borrow().clone()
    }
    pub fn connected(&self) -> bool {
        self.rx.borrow().is_some()
    }
    /// The node of the current session (`host:port`), if any.
    pub fn node(&self) -> Option<String> {
        self.rx.borrow().as_ref().map(|s| s.node.clone())
    }
    /// Waits until a session is up (or forever while the broker is away).
    pub async fn wait(&self) -> Arc<Session> {
        let mut rx = self.rx.clone();
        loop {
            if let Some(s) = rx.borrow_and_update().clone() {
                return s;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
    /// A receiver that sees every session change.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Session>>> {
        self.rx.clone()
    }
}

pub struct BrokerSupervisor {
    cfg: config::Broker,
    dead_letters: DeadLetterLimits,
    tls: OwnedTLSConfig,
    tx: watch::Sender<Option<Arc<Session>>>,
}

/// The supervisor and the handle the rest of the relay uses. Fails when the TLS files named in
/// `[broker]` cannot be read: better to stop at start than to fail every reconnect.
pub fn supervisor(
    cfg: config::Broker,
    dead_letters: DeadLetterLimits,
) -> Result<(BrokerSupervisor, BrokerHandle), comatching_protocol::config::ConfigError> {
    let tls = comatching_protocol::amqp::tls_config(&cfg)?;
    let auth = Arc::new(LinkAuth::from_settings(&cfg)?);
    let (tx, rx) = watch::channel(None);
    Ok((
        BrokerSupervisor {
            cfg,
            dead_letters,
            tls,
            tx,
        },
        BrokerHandle { rx, auth },
    ))
}

/// Declares the shared topology and the dead-letter queues with the configured limits
/// (replacing unbounded ones of earlier releases; one whose cluster node is down is skipped),
/// then deletes the match queues of earlier releases once no consumer is left on them (an
/// appliance still running an old release keeps one alive; the next connect looks again).
/// Their requests, if any, are long past their deadlines.
async fn declare_topology(
    connection: &Connection,
    quorum_group_size: Option<u16>,
    dead_letters: &DeadLetterLimits,
) -> lapin::Result<()> {
    declare_shared_topology(connection, quorum_group_size).await?;
    declare_dead_letter_queues(connection, dead_letters).await?;
    for legacy in LEGACY_MATCH_QUEUES {
        delete_legacy_queue(connection, legacy).await?;
    }
    Ok(())
}

/// Deletes `queue` unless it is missing (or out of our permissions) or still consumed.
async fn delete_legacy_queue(connection: &Connection, queue: &str) -> lapin::Result<()> {
    // Quorum queues refuse `if-unused` deletes (with a connection error), so look first. A
    // missing queue, or no permission to see it, fails this channel only.
    let legacy = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let Ok(q) = legacy
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    else {
        return Ok(());
    };
    if q.consumer_count() > 0 {
        tracing::info!(
            queue,
            consumers = q.consumer_count(),
            "old match queue kept while an old appliance consumes it"
        );
    } else {
        match legacy
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
        {
            Ok(_) => tracing::info!(queue, "old match queue deleted"),
            Err(e) => {
                tracing::warn!(queue, error = %e, "could not delete the old match queue")
            }
        }
    }
    let _ = legacy.close(200, "legacy queue checked".into()).await;
    Ok(())
}

async fn connect(
    url: &str,
    node: String,
    tls: &OwnedTLSConfig,
    quorum_group_size: Option<u16>,
    dead_letters: &DeadLetterLimits,
    id: u64,
) -> lapin::Result<Session> {
    let connection = comatching_protocol::amqp::connect(url, tls).await?;
    declare_topology(&connection, quorum_group_size, dead_letters).await?;
    let outbox = connection.create_channel().await?;
    outbox
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let rpc = connection.create_channel().await?;
    rpc.confirm_select(ConfirmSelectOptions::default()).await?;
    let control = connection.create_channel().await?;
    control
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(Session {
        id,
        node,
        connection,
        outbox,
        rpc,
        control,
        broken: Notify::new(),
        is_broken: AtomicBool::new(false),
    })
}

impl BrokerSupervisor {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let urls: Vec<(String, String)> = self
            .cfg
            .url
            .as_slice()
            .iter()
            .map(|u| {
                let node = broker_node(u).unwrap_or_else(|| "?".into());
                (amqp_url_with_heartbeat(u, self.cfg.heartbeat_s), node)
            })
            .collect();
        let mut rotation = NodeRotation::new(urls.len());
        let mut backoff = Duration::from_millis(100);
        let max_backoff = Duration::from_millis(self.cfg.max_backoff_ms.max(100));
        let mut id = 0u64;
        loop {
            if *shutdown.borrow() {
                break;
            }
            id += 1;
            let at = rotation.current();
            let (url, node) = &urls[at];
            let attempt = tokio::time::timeout(
                Duration::from_secs(10),
                connect(
                    url,
                    node.clone(),
                    &self.tls,
                    self.cfg.quorum_group_size,
                    &self.dead_letters,
                    id,
                ),
            )
            .await;
            let session = match attempt {
                Ok(Ok(s)) => Arc::new(s),
                Ok(Err(e)) => {
                    rotation.failed(at);
                    tracing::warn!(node = %node, error = %e, retry_in_ms = backoff.as_millis() as u64, "broker connect failed");
                    if sleep_or_shutdown(backoff, &mut shutdown).await {
                        break;
                    }
                    backoff = (backoff * 2).min(max_backoff);
                    continue;
                }
                Err(_) => {
                    rotation.failed(at);
                    tracing::warn!(node = %node, "broker connect timed out");
                    if sleep_or_shutdown(backoff, &mut shutdown).await {
                        break;
                    }
                    backoff = (backoff * 2).min(max_backoff);
                    continue;
                }
            };
            rotation.connected(at);
            tracing::info!(session = id, node = %node, "broker connected");
            backoff = Duration::from_millis(100);
            let mut events = session.connection.events_listener();
            let _ = self.tx.send(Some(session.clone()));
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = session.broken.notified() => break,
                    ev = events.next() => {
                        if let Some(lapin::Event::Error(e)) = ev {
                            // A channel the broker closed (a refused redeclare of the match
                            // queue) is its user's to handle; the session goes on.
                            if !ends_connection(&session.connection, &e) {
                                tracing::debug!(error = %e, "a channel was closed by the broker");
                                continue;
                            }
                            tracing::warn!(error = %e, "broker connection error");
                            break;
                        }
                        if ev.is_none() { break; }
                    }
                    _ = tick.tick() => {
                        if !session.connection.status().connected() {
                            break;
                        }
                    }
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() { break; }
                    }
                }
            }
            let _ = self.tx.send(None);
            session.is_broken.store(true, Ordering::SeqCst);
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                session.connection.close(200, "reconnecting".into()),
            )
            .await;
            if *shutdown.borrow() {
                break;
            }
            // The session's node is the one that failed: the next attempt starts after it.
            rotation.failed(at);
            tracing::info!(node = %node, "broker session ended; reconnecting");
        }
        let _ = self.tx.send(None);
    }
}

/// Sleeps, or returns true early when shutdown is requested.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}
