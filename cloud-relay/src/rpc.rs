//! The match RPC client: sends a `MatchRequest` to the shared match queue and waits,
//! until the request's deadline and no longer, for the `MatchReply` on direct reply-to.
//!
//! Direct reply-to ties replies to the channel that published the request, so each broker
//! session gets one reply consumer (no-ack, on the session's `rpc` channel) started before any
//! request goes out on it. Replies are routed by correlation id to the waiting caller; replies
//! nobody waits for any more (late, duplicate, forged) are counted and dropped. When a session
//! ends, every call waiting on it fails at once instead of waiting out its deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comatching_protocol::{Envelope, MatchReply, MatchRequest, Message, WireLimits};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};
use tokio::sync::{oneshot, watch};

use crate::broker::{BrokerHandle, Session};
use comatching_protocol::amqp::is_not_found;
use comatching_protocol::topology::MATCH_QUEUE;

const REPLY_TO: &str = "amq.rabbitmq.reply-to";

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("no broker connection before the deadline")]
    NoBroker,
    #[error("the broker did not accept the request: {0}")]
    NotAccepted(String),
    #[error("no reply before the deadline")]
    Timeout,
    #[error("the broker connection was lost while waiting")]
    ConnectionLost,
}

/// Why a request did not go out, and whether the session is still good.
enum Unsent {
    /// The session is fine (the match queue's old home node is still leaving).
    Kept(String),
    /// The channel or connection failed: the supervisor replaces the session.
    Broken(String),
}

struct Waiter {
    session: u64,
    /// The reply and when the dispatcher took it off the wire.
    tx: oneshot::Sender<(MatchReply, Instant)>,
}

/// When a call passed its stages (for the match stage histograms); unset when it did not get
/// that far.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallStamps {
    /// The request was handed to the broker client (its confirm is awaited beside the reply).
    pub published: Option<Instant>,
    /// The reply dispatcher received the reply.
    pub received: Option<Instant>,
}

pub struct MatchRpc {
    broker: BrokerHandle,
    /// Sessions whose reply consumer is running.
    ready: watch::Receiver<Option<Arc<Session>>>,
    pending: Arc<Mutex<HashMap<String, Waiter>>>,
    pub stray_replies: Arc<AtomicU64>,
}

impl MatchRpc {
    /// Starts the reply dispatcher; it follows the broker's sessions for the process lifetime.
    pub fn start(broker: BrokerHandle) -> Arc<MatchRpc> {
        let (ready_tx, ready_rx) = watch::channel(None);
        let pending: Arc<Mutex<HashMap<String, Waiter>>> = Arc::default();
        let stray = Arc::new(AtomicU64::new(0));
        let rpc = Arc::new(MatchRpc {
            broker: broker.clone(),
            ready: ready_rx,
            pending: pending.clone(),
            stray_replies: stray.clone(),
        });
        tokio::spawn(dispatch(broker, ready_tx, pending, stray));
        rpc
    }

    pub fn connected(&self) -> bool {
        self.broker.connected() && self.ready.borrow().is_some()
    }

    /// The broker node of the current session (`host:port`), if any.
    pub fn broker_node(&self) -> Option<String> {
        self.broker.node()
    }

    /// Broker messages the relay refused for a missing or wrong link-key tag.
    pub fn refused_messages(&self) -> u64 {
        self.broker.auth.refused()
    }

    /// Sends `req` and waits for its reply until `deadline`; `stamps` says when it got where.
    pub async fn call(
        &self,
        req: &MatchRequest,
        deadline: Instant,
        stamps: &mut CallStamps,
    ) -> Result<MatchReply, RpcError> {
        let session = {
            let mut ready = self.ready.clone();
            let wait = async {
                loop {
                    if let Some(s) = ready.borrow_and_update().clone() {
                        return Some(s);
                    }
                    if ready.changed().await.is_err() {
                        return None;
                    }
                }
            };
            match tokio::time::timeout_at(deadline.into(), wait).await {
                Ok(Some(s)) => s,
                _ => return Err(RpcError::NoBroker),
            }
        };
        let correlation = req.request_id.to_hex();
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                correlation.clone(),
                Waiter {
                    session: session.id,
                    tx,
                },
            );
        let result = self
            .send_and_wait(&session, req, &correlation, deadline, rx, stamps)
            .await;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&correlation);
        result
    }

    async fn send_and_wait(
        &self,
        session: &Session,
        req: &MatchRequest,
        correlation: &str,
        deadline: Instant,
        rx: oneshot::Receiver<(MatchReply, Instant)>,
        stamps: &mut CallStamps,
    ) -> Result<MatchReply, RpcError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left < Duration::from_millis(1) {
            return Err(RpcError::Timeout);
        }
        let body = Envelope::encode(&Message::MatchRequest(req.clone()));
        let props = self.broker.auth.sign(
            BasicProperties::default()
                .with_correlation_id(correlation.into())
                .with_reply_to(REPLY_TO.into())
                // Gone from the queue when the caller stops waiting for it.
                .with_expiration(left.as_millis().to_string().into())
                // Transient: a request the broker loses in a crash is voided by our deadline,
                // as one that outlives it would be; writing it to disk buys nothing.
                .with_delivery_mode(1)
                .with_content_type("application/x-comatching".into()),
            &body,
        );
        // Mandatory: a request the broker cannot route (the match queue went with its node,
        // on a cluster) comes back instead of vanishing. The queue is then declared again on
        // this session's live node and the request sent once more.
        let send = || {
            session.rpc.basic_publish(
                "".into(),
                MATCH_QUEUE.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                props.clone(),
            )
        };
        let confirm = match tokio::time::timeout_at(deadline.into(), send()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                session.mark_broken("match request publish failed");
                return Err(RpcError::NotAccepted(e.to_string()));
            }
            Err(_) => return Err(RpcError::Timeout),
        };
        stamps.published = Some(Instant::now());
        // The broker's confirm and the appliance's reply are awaited together: a routed
        // request's confirm says nothing the reply does not, and waiting for it first cost a
        // broker round trip on every match (issue 16). Only an unroutable or refused request
        // changes the course.
        let mut confirm = Some(Box::pin(confirm));
        let mut resent = false;
        let mut rx = rx;
        let deadline = tokio::time::Instant::from_std(deadline);
        loop {
            tokio::select! {
                reply = &mut rx => {
                    return match reply {
                        Ok((reply, at)) => {
                            stamps.received = Some(at);
                            Ok(reply)
                        }
                        Err(_) => Err(RpcError::ConnectionLost),
                    };
                }
                confirmed = next_confirm(&mut confirm) => {
                    confirm = None;
                    let failure = match confirmed {
                        Ok(Confirmation::Ack(None)) => continue,
                        Ok(Confirmation::Ack(Some(_))) if !resent => {
                            resent = true;
                            tracing::warn!(node = %session.node, "match request unroutable: declaring the match queue again");
                            let again = tokio::time::timeout_at(deadline, async {
                                match session.redeclare_match_queue().await {
                                    Ok(()) => {}
                                    // Its old home node is still leaving the cluster: this
                                    // session is fine, this request cannot go out (503, the
                                    // hold voided); the next one declares the queue again.
                                    Err(e) if is_not_found(&e) => return Err(Unsent::Kept(e.to_string())),
                                    Err(e) => return Err(Unsent::Broken(e.to_string())),
                                }
                                send().await.map_err(|e| Unsent::Broken(e.to_string()))
                            })
                            .await;
                            match again {
                                Ok(Ok(c)) => {
                                    confirm = Some(Box::pin(c));
                                    continue;
                                }
                                Ok(Err(Unsent::Kept(e))) => return Err(RpcError::NotAccepted(e)),
                                Ok(Err(Unsent::Broken(e))) => e,
                                Err(_) => return Err(RpcError::Timeout),
                            }
                        }
                        Ok(Confirmation::Ack(Some(_))) => {
                            "unroutable after declaring the match queue again".to_owned()
                        }
                        Ok(other) => format!("{other:?}"),
                        Err(e) => e.to_string(),
                    };
                    session.mark_broken("match request publish failed");
                    return Err(RpcError::NotAccepted(failure));
                }
                _ = tokio::time::sleep_until(deadline) => return Err(RpcError::Timeout),
            }
        }
    }
}

/// The pending publisher confirm, if any (never resolves without one).
async fn next_confirm(
    confirm: &mut Option<std::pin::Pin<Box<lapin::PublisherConfirm>>>,
) -> lapin::Result<Confirmation> {
    match confirm {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

async fn dispatch(
    broker: BrokerHandle,
    ready: watch::Sender<Option<Arc<Session>>>,
    pending: Arc<Mutex<HashMap<String, Waiter>>>,
    stray: Arc<AtomicU64>,
) {
    let mut sessions = broker.subscribe();
    let auth = broker.auth.clone();
    loop {
        let Some(session) = sessions.borrow_and_update().clone() else {
            let _ = ready.send(None);
            if sessions.changed().await.is_err() {
                return;
            }
            continue;
        };
        let consumer = session
            .rpc
            .basic_consume(
                REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                session.mark_broken(&format!("reply consumer: {e}"));
                let _ = sessions.changed().await;
                continue;
            }
        };
        let _ = ready.send(Some(session.clone()));
        loop {
            tokio::select! {
                delivery = consumer.next() => {
                    let Some(Ok(delivery)) = delivery else {
                        session.mark_broken("reply consumer ended");
                        break;
                    };
                    let correlation = delivery
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|c| c.to_string())
                        .unwrap_or_default();
                    if let Err(e) = auth.admit(&delivery.properties, &delivery.data) {
                        // Forged or altered: the request it claims to answer times out and its
                        // hold is voided, as if no appliance had answered.
                        tracing::warn!(code = e.code(), error = %e, "unauthenticated match reply dropped");
                        continue;
                    }
                    let received = Instant::now();
                    let reply = match Envelope::decode(&delivery.data, &WireLimits::default()) {
                        Ok(Message::MatchReply(r)) if r.request_id.to_hex() == correlation => r,
                        Ok(other) => {
                            tracing::warn!(kind = other.kind(), "unexpected message on the reply channel");
                            stray.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(code = e.code(), error = %e, "undecodable match reply");
                            stray.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    let waiter = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&correlation);
                    match waiter {
                        Some(w) => { let _ = w.tx.send((reply, received)); }
                        None => { stray.fetch_add(1, Ordering::Relaxed); }
                    }
                }
                changed = sessions.changed() => {
                    if changed.is_err() { return; }
                    let same = sessions.borrow().as_ref().map(|s| s.id) == Some(session.id);
                    if !same { break; }
                }
            }
        }
        let _ = ready.send(None);
        // Calls waiting on the dead session can never get their reply: fail them now.
        pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, w| w.session != session.id);
    }
}
