//! A scripted stand-in for the appliance on the match queue.
//!
//! It consumes the match queue in a test's vhost (waiting, with a passive declare, until the
//! relay has declared it), decodes each `MatchRequest`, records it with its AMQP properties, asks
//! the test's script what to do, and answers on the request's `reply_to` with the correlation id
//! copied — or stays silent, or answers late. It never ranks anything itself: the script decides
//! the candidate list, which is what lets a test hand the relay an ineligible candidate on
//! purpose.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comatching_protocol::{
    Candidate, Criterion, Envelope, MatchReply, MatchRequest, Message, ReplicaPosition,
    ReplyStatus, UserId, WireLimits,
};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicRejectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::{PATIENCE, wait_for};

pub use comatching_protocol::topology::MATCH_QUEUE;

/// What the responder does with one request.
pub enum ResponderAction {
    /// Answer at once.
    Reply(MatchReply),
    /// Never answer (the request is still acked, so it is not redelivered).
    Silent,
    /// Answer after a delay — a late reply when the delay outlasts the relay's deadline.
    ReplyAfter(Duration, MatchReply),
    /// Answer when the test opens the gate: lets a test look at the relay while a request is
    /// provably in flight.
    ReplyWhenOpened(Gate, MatchReply),
    /// Answer twice at once (a duplicated reply): the second must change nothing.
    ReplyTwice(MatchReply),
}

/// A one-way gate a test opens to release held replies.
#[derive(Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Self {
        Gate(Arc::new(watch::channel(false).0))
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }
    pub fn open(&self) {
        self.0.send_replace(true);
    }
    async fn opened(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// The test's script: called once per request, in arrival order.
pub type Script = Box<dyn FnMut(&MatchRequest) -> ResponderAction + Send>;

/// One request as the responder saw it, with the AMQP properties the relay set.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub request: MatchRequest,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub expiration: Option<String>,
    pub delivery_mode: Option<u8>,
    pub received_unix_ms: u64,
}

#[derive(Default)]
struct Record {
    seen: Vec<SeenRequest>,
    /// Request ids whose reply was published, in publish order.
    replied: Vec<comatching_protocol::RequestId>,
    /// Deliveries that did not decode as a `MatchRequest` (should stay empty).
    rejected: Vec<String>,
}

struct Shared {
    script: Mutex<Script>,
    /// Replies are tagged with this link key (`None`: untagged).
    key: Mutex<Option<comatching_protocol::mac::LinkKey>>,
    record: Mutex<Record>,
    changed: Notify,
}

/// A running responder. Stops consuming when dropped.
pub struct Responder {
    shared: Arc<Shared>,
    _conn: Connection,
    task: JoinHandle<()>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A reply with status ok, these candidates in order (score 1.0), nothing relaxed.
pub fn ok_reply(req: &MatchRequest, candidates: &[UserId]) -> MatchReply {
    ok_reply_relaxed(req, candidates, &[])
}

/// A reply with status ok, these candidates in order (score 1.0), and `relaxed`.
pub fn ok_reply_relaxed(
    req: &MatchRequest,
    candidates: &[UserId],
    relaxed: &[Criterion],
) -> MatchReply {
    assert!(
        !candidates.is_empty(),
        "an ok reply needs candidates; use status_reply(NoCandidate)"
    );
    MatchReply {
        request_id: req.request_id,
        status: ReplyStatus::Ok,
        candidates: candidates
            .iter()
            .map(|&user_id| Candidate {
                user_id,
                score: 1.0,
            })
            .collect(),
        relaxed: relaxed.to_vec(),
        position: ReplicaPosition::default(),
    }
}

/// A reply with no candidates and the given (non-ok) status.
pub fn status_reply(req: &MatchRequest, status: ReplyStatus) -> MatchReply {
    MatchReply {
        request_id: req.request_id,
        status,
        candidates: Vec::new(),
        relaxed: Vec::new(),
        position: ReplicaPosition::default(),
    }
}

impl Responder {
    /// Connects to `amqp_url`, waits for the relay's match queue to exist, and starts answering
    /// with `script`.
    pub async fn start(
        amqp_url: &str,
        script: impl FnMut(&MatchRequest) -> ResponderAction + Send + 'static,
    ) -> Responder {
        let conn = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("responder cannot connect to {amqp_url}: {e}"));
        // A passive declare of a missing queue closes the channel, so each try gets a new one.
        let channel = wait_for(PATIENCE, "the relay to declare comatching.match", || {
            let conn = &conn;
            async move {
                let ch = conn.create_channel().await.ok()?;
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                match ch
                    .queue_declare(MATCH_QUEUE.into(), passive, FieldTable::default())
                    .await
                {
                    Ok(_) => Some(ch),
                    Err(_) => None,
                }
            }
        })
        .await;
        let consumer = channel
            .basic_consume(
                MATCH_QUEUE.into(),
                "test-responder".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume comatching.match");
        let shared = Arc::new(Shared {
            script: Mutex::new(Box::new(script)),
            key: Mutex::new(None),
            record: Mutex::new(Record::default()),
            changed: Notify::new(),
        });
        let task = tokio::spawn(serve(consumer, channel, shared.clone()));
        Responder {
            shared,
            _conn: conn,
            task,
        }
    }

    /// A responder that answers every request with `candidates` in this order.
    pub async fn offering(amqp_url: &str, candidates: Vec<UserId>) -> Responder {
        Responder::start(amqp_url, move |req| {
            ResponderAction::Reply(ok_reply(req, &candidates))
        })
        .await
    }

    /// Replaces the script for the requests still to come.
    pub fn set_script(
        &self,
        script: impl FnMut(&MatchRequest) -> ResponderAction + Send + 'static,
    ) {
        *self.shared.script.lock().unwrap() = Box::new(script);
    }

    /// Tags the replies still to come with `key` (or with nothing): a stand-in appliance on a
    /// link with a key, or a forger without the right one.
    pub fn set_link_key(&self, key: Option<comatching_protocol::mac::LinkKey>) {
        *self.shared.key.lock().unwrap() = key;
    }

    /// Every request seen so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared.record.lock().unwrap().seen.clone()
    }

    /// Deliveries that failed to decode as a `MatchRequest`.
    pub fn rejected(&self) -> Vec<String> {
        self.shared.record.lock().unwrap().rejected.clone()
    }

    /// Waits until at least `n` requests have arrived; returns them all.
    pub async fn wait_for_requests(&self, n: usize) -> Vec<SeenRequest> {
        self.wait(|r| r.seen.len() >= n, &format!("{n} match request(s)"))
            .await;
        self.requests()
    }

    /// Waits until the reply to `request_id` has been published.
    pub async fn wait_replied(&self, request_id: comatching_protocol::RequestId) {
        self.wait(
            |r| r.replied.contains(&request_id),
            &format!("the reply to {request_id} to be published"),
        )
        .await;
    }

    async fn wait(&self, done: impl Fn(&Record) -> bool, what: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let notified = self.shared.changed.notified();
            if done(&self.shared.record.lock().unwrap()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out after {PATIENCE:?} waiting for {what}");
            }
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut consumer: lapin::Consumer, channel: Channel, shared: Arc<Shared>) {
    while let Some(delivery) = consumer.next().await {
        let Ok(delivery) = delivery else { return };
        let props = &delivery.properties;
        let request = match Envelope::decode(&delivery.data, &WireLimits::default()) {
            Ok(Message::MatchRequest(r)) => r,
            Ok(other) => {
                reject(&shared, &delivery, format!("unexpected {}", other.kind())).await;
                continue;
            }
            Err(e) => {
                reject(&shared, &delivery, format!("undecodable: {e}")).await;
                continue;
            }
        };
        let seen = SeenRequest {
            request: request.clone(),
            correlation_id: props.correlation_id().as_ref().map(|s| s.to_string()),
            reply_to: props.reply_to().as_ref().map(|s| s.to_string()),
            expiration: props.expiration().as_ref().map(|s| s.to_string()),
            delivery_mode: *props.delivery_mode(),
            received_unix_ms: now_unix_ms(),
        };
        let action = (shared.script.lock().unwrap())(&request);
        {
            shared.record.lock().unwrap().seen.push(seen.clone());
            shared.changed.notify_waiters();
        }
        let reply_to = seen.reply_to.clone().unwrap_or_default();
        let correlation = seen.correlation_id.clone().unwrap_or_default();
        match action {
            ResponderAction::Silent => {}
            ResponderAction::Reply(reply) => {
                publish_reply(&channel, &shared, &reply_to, &correlation, reply).await;
            }
            ResponderAction::ReplyTwice(reply) => {
                let again = reply.clone();
                publish_reply(&channel, &shared, &reply_to, &correlation, reply).await;
                publish_reply(&channel, &shared, &reply_to, &correlation, again).await;
            }
            ResponderAction::ReplyAfter(delay, reply) => {
                let (channel, shared) = (channel.clone(), shared.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    publish_reply(&channel, &shared, &reply_to, &correlation, reply).await;
                });
            }
            ResponderAction::ReplyWhenOpened(gate, reply) => {
                let (channel, shared) = (channel.clone(), shared.clone());
                tokio::spawn(async move {
                    gate.opened().await;
                    publish_reply(&channel, &shared, &reply_to, &correlation, reply).await;
                });
            }
        }
        let _ = delivery.ack(BasicAckOptions::default()).await;
    }
}

async fn reject(shared: &Shared, delivery: &lapin::message::Delivery, why: String) {
    shared.record.lock().unwrap().rejected.push(why);
    shared.changed.notify_waiters();
    let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
}

async fn publish_reply(
    channel: &Channel,
    shared: &Shared,
    reply_to: &str,
    correlation_id: &str,
    reply: MatchReply,
) {
    let request_id = reply.request_id;
    let bytes = Envelope::encode(&Message::MatchReply(reply));
    let key = shared.key.lock().unwrap().clone();
    let props = comatching_protocol::amqp::authenticate(
        BasicProperties::default().with_correlation_id(correlation_id.into()),
        key.as_ref(),
        &bytes,
    );
    let published = channel
        .basic_publish(
            "".into(),
            reply_to.into(),
            BasicPublishOptions::default(),
            &bytes,
            props,
        )
        .await;
    if let Ok(confirm) = published {
        let _ = confirm.await;
    }
    shared.record.lock().unwrap().replied.push(request_id);
    shared.changed.notify_waiters();
}
