//! The relay's connection to RabbitMQ, owned by us rather than by the client's automatic
//! recovery (which has an open report of never reconnecting after a broker restart).
//!
//! `BrokerSupervisor::run` loops: connect (with heartbeat and timeout) → declare the topology →
//! open a confirm-mode channel for the outbox and one for match RPCs → publish the `Session` to
//! everyone watching → wait until the connection fails or a user reports it broken → back off
//! and start again. Users read the current session from `BrokerHandle` and never hold a stale
//! one for long: a session is `None` while disconnected.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use comatching_protocol::amqp::LinkAuth;
use futures_util::StreamExt;
use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use tokio::sync::{Notify, watch};

use crate::config;
use comatching_protocol::config::amqp_url_with_heartbeat;

pub const SYNC_EXCHANGE: &str = "comatching.sync";
pub const MATCH_QUEUE: &str = "comatching.match";
pub const DEAD_EXCHANGE: &str = "comatching.dead";
pub const DEAD_QUEUE: &str = "comatching.dead";
pub const CONTROL_QUEUE: &str = "comatching.control";
/// Deliveries of one match request before it is dead-lettered.
pub const MATCH_DELIVERY_LIMIT: i64 = 5;

/// One live connection and the channels the relay uses on it.
pub struct Session {
    pub id: u64,
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
    tls: OwnedTLSConfig,
    tx: watch::Sender<Option<Arc<Session>>>,
}

/// The supervisor and the handle the rest of the relay uses. Fails when the TLS files named in
/// `[broker]` cannot be read: better to stop at start than to fail every reconnect.
pub fn supervisor(
    cfg: config::Broker,
) -> Result<(BrokerSupervisor, BrokerHandle), comatching_protocol::config::ConfigError> {
    let tls = comatching_protocol::amqp::tls_config(&cfg)?;
    let auth = Arc::new(LinkAuth::from_settings(&cfg)?);
    let (tx, rx) = watch::channel(None);
    Ok((BrokerSupervisor { cfg, tls, tx }, BrokerHandle { rx, auth }))
}

pub fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

pub fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Declares everything the relay publishes to. Idempotent; run on every connect, so a wiped
/// broker gets its topology back without a human.
async fn declare_topology(ch: &Channel) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        SYNC_EXCHANGE.into(),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        DEAD_EXCHANGE.into(),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await?;
    let durable_q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(DEAD_QUEUE.into(), durable_q, FieldTable::default())
        .await?;
    ch.queue_bind(
        DEAD_QUEUE.into(),
        DEAD_EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        MATCH_QUEUE.into(),
        durable_q,
        args(&[
            ("x-queue-type", long_str("quorum")),
            (
                "x-delivery-limit",
                AMQPValue::LongLongInt(MATCH_DELIVERY_LIMIT),
            ),
            ("x-dead-letter-exchange", long_str(DEAD_EXCHANGE)),
        ]),
    )
    .await?;
    ch.queue_declare(CONTROL_QUEUE.into(), durable_q, control_queue_args())
        .await?;
    Ok(())
}

/// The control queue's arguments; the appliance declares it with exactly these too.
pub fn control_queue_args() -> FieldTable {
    args(&[
        ("x-queue-type", long_str("quorum")),
        (
            "x-delivery-limit",
            AMQPValue::LongLongInt(MATCH_DELIVERY_LIMIT),
        ),
        ("x-dead-letter-exchange", long_str(DEAD_EXCHANGE)),
    ])
}

async fn connect(url: &str, tls: &OwnedTLSConfig, id: u64) -> lapin::Result<Session> {
    let connection = comatching_protocol::amqp::connect(url, tls).await?;
    let setup = connection.create_channel().await?;
    declare_topology(&setup).await?;
    let _ = setup.close(200, "topology declared".into()).await;
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
        let url = amqp_url_with_heartbeat(&self.cfg.url, self.cfg.heartbeat_s);
        let mut backoff = Duration::from_millis(100);
        let max_backoff = Duration::from_millis(self.cfg.max_backoff_ms.max(100));
        let mut id = 0u64;
        loop {
            if *shutdown.borrow() {
                break;
            }
            id += 1;
            let attempt =
                tokio::time::timeout(Duration::from_secs(10), connect(&url, &self.tls, id)).await;
            let session = match attempt {
                Ok(Ok(s)) => Arc::new(s),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "broker connect failed");
                    if sleep_or_shutdown(backoff, &mut shutdown).await {
                        break;
                    }
                    backoff = (backoff * 2).min(max_backoff);
                    continue;
                }
                Err(_) => {
                    tracing::warn!("broker connect timed out");
                    if sleep_or_shutdown(backoff, &mut shutdown).await {
                        break;
                    }
                    backoff = (backoff * 2).min(max_backoff);
                    continue;
                }
            };
            tracing::info!(session = id, "broker connected");
            backoff = Duration::from_millis(100);
            let mut events = session.connection.events_listener();
            let _ = self.tx.send(Some(session.clone()));
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = session.broken.notified() => break,
                    ev = events.next() => {
                        if let Some(lapin::Event::Error(e)) = ev {
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
            tracing::info!("broker session ended; reconnecting");
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
