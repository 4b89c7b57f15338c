//! A listener on the relay's sync exchange: records every `SyncEvent` the relay publishes, in
//! arrival order, so tests can check seq order, gaps and contents.
//!
//! It declares `comatching.sync` itself (fanout, durable — the relay's exact declaration, so the
//! two agree) and binds an exclusive server-named queue to it. Bind it before the changes you
//! want to see: a fanout exchange drops what no queue is bound to.

use std::sync::{Arc, Mutex};

use comatching_protocol::{Envelope, Message, SyncEvent, WireLimits};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::PATIENCE;

pub use comatching_protocol::topology::SYNC_EXCHANGE;

/// One delivery from the sync exchange.
#[derive(Clone, Debug)]
pub struct TappedEvent {
    pub event: SyncEvent,
    pub delivery_mode: Option<u8>,
}

#[derive(Default)]
struct Tape {
    events: Vec<TappedEvent>,
    undecodable: Vec<String>,
}

pub struct SyncTap {
    tape: Arc<Mutex<Tape>>,
    changed: Arc<Notify>,
    _conn: Connection,
    task: JoinHandle<()>,
}

impl SyncTap {
    /// Connects to `amqp_url` and starts recording.
    pub async fn bind(amqp_url: &str) -> SyncTap {
        let conn = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("sync tap cannot connect to {amqp_url}: {e}"));
        let ch = conn.create_channel().await.expect("channel");
        ch.exchange_declare(
            SYNC_EXCHANGE.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare comatching.sync (fanout, durable)");
        let queue = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare tap queue");
        ch.queue_bind(
            queue.name().clone(),
            SYNC_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind tap queue");
        let mut consumer = ch
            .basic_consume(
                queue.name().clone(),
                "sync-tap".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume tap queue");
        let tape = Arc::new(Mutex::new(Tape::default()));
        let changed = Arc::new(Notify::new());
        let task = {
            let (tape, changed) = (tape.clone(), changed.clone());
            tokio::spawn(async move {
                while let Some(Ok(d)) = consumer.next().await {
                    let mut t = tape.lock().unwrap();
                    match Envelope::decode(&d.data, &WireLimits::default()) {
                        Ok(Message::SyncEvent(event)) => t.events.push(TappedEvent {
                            event,
                            delivery_mode: *d.properties.delivery_mode(),
                        }),
                        Ok(other) => t.undecodable.push(format!("unexpected {}", other.kind())),
                        Err(e) => t.undecodable.push(e.to_string()),
                    }
                    drop(t);
                    changed.notify_waiters();
                }
            })
        };
        SyncTap {
            tape,
            changed,
            _conn: conn,
            task,
        }
    }

    /// Everything received so far, in arrival order.
    pub fn events(&self) -> Vec<TappedEvent> {
        self.tape.lock().unwrap().events.clone()
    }

    /// Deliveries that were not decodable sync events (should stay empty).
    pub fn undecodable(&self) -> Vec<String> {
        self.tape.lock().unwrap().undecodable.clone()
    }

    /// Waits until at least `n` events have arrived; returns all received so far.
    pub async fn wait_for_count(&self, n: usize) -> Vec<TappedEvent> {
        self.wait_until(|evs| evs.len() >= n, &format!("{n} sync event(s)"))
            .await
    }

    /// Waits until an event with `seq` (or beyond) has arrived; returns all received so far.
    pub async fn wait_for_seq(&self, seq: u64) -> Vec<TappedEvent> {
        self.wait_until(
            |evs| evs.iter().any(|e| e.event.seq >= seq),
            &format!("sync event seq {seq}"),
        )
        .await
    }

    async fn wait_until(
        &self,
        done: impl Fn(&[TappedEvent]) -> bool,
        what: &str,
    ) -> Vec<TappedEvent> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let notified = self.changed.notified();
            {
                let t = self.tape.lock().unwrap();
                if done(&t.events) {
                    return t.events.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let got: Vec<String> = self
                    .events()
                    .iter()
                    .map(|e| format!("seq {} {:?}", e.event.seq, e.event.op))
                    .collect();
                panic!("timed out after {PATIENCE:?} waiting for {what}; received: {got:#?}");
            }
        }
    }
}

impl Drop for SyncTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}
