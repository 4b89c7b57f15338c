//! Dead letters, counted, and retiring an appliance.
//!
//! Every queue dead-letters to the `comatching.dead` exchange, which fans out to
//! `comatching.dead` (kept for inspection, bounded) and `comatching.dead.tally`. The
//! [`DeadLetterTally`] consumes the tally queue on a connection of its own (so a problem there
//! never breaks the outbox or match sessions) and counts each message by the `reason` and `queue`
//! of its newest `x-death` entry into `comatching_dead_letters_total`. The count starts at zero
//! with each relay process, as Prometheus counters do; dead letters that arrive while the relay is
//! down wait in the (bounded) tally queue and are counted when it is back.
//!
//! [`retire_appliance`] is `comatching-relay admin retire-appliance ID`: it deletes the
//! appliance's sync queue and its tracking row, so the broker stops collecting changes for a box
//! that is gone and the outbox retention stops waiting for it.

use std::sync::Arc;
use std::time::Duration;

use comatching_protocol::ApplianceId;
use comatching_protocol::amqp::is_not_found;
use comatching_protocol::config::amqp_url_with_heartbeat;
use comatching_protocol::failover::NodeRotation;
use comatching_protocol::topology::{DEAD_TALLY_QUEUE, sync_queue};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use tokio::sync::watch;

use crate::config;
use crate::metrics::Metrics;

/// The newest death of a dead-lettered message: (reason, queue) from its first `x-death`
/// entry, or `unknown` for what is missing (a message published to the exchange directly).
pub fn death_of(props: &BasicProperties) -> (String, String) {
    let unknown = || ("unknown".to_owned(), "unknown".to_owned());
    let Some(headers) = props.headers() else {
        return unknown();
    };
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return unknown();
    };
    let Some(AMQPValue::FieldTable(newest)) = deaths.as_slice().first() else {
        return unknown();
    };
    let field = |name: &str| match newest.inner().get(name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        _ => "unknown".to_owned(),
    };
    (field("reason"), field("queue"))
}

/// Counts `comatching.dead.tally` into the relay's metrics; owns its connection and reconnects
/// with a backoff, like the other broker users.
pub struct DeadLetterTally {
    pub cfg: config::Broker,
    pub metrics: Arc<Metrics>,
}

impl DeadLetterTally {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let tls = match comatching_protocol::amqp::tls_config(&self.cfg) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "dead-letter tally disabled");
                return;
            }
        };
        // With a cluster's node list, the same rotation as the broker session: a session that
        // ends (its node went) makes the next attempt go to the next node.
        let urls: Vec<String> = self
            .cfg
            .url
            .as_slice()
            .iter()
            .map(|u| amqp_url_with_heartbeat(u, self.cfg.heartbeat_s))
            .collect();
        let mut rotation = NodeRotation::new(urls.len());
        let max_backoff = Duration::from_millis(self.cfg.max_backoff_ms.max(100));
        let mut backoff = Duration::from_millis(500);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let at = rotation.current();
            let result = tokio::select! {
                r = self.session(&urls[at], &tls) => r,
                _ = shutdown.changed() => return,
            };
            rotation.failed(at);
            if let Err(e) = result {
                tracing::debug!(error = %e, "dead-letter tally session ended");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(max_backoff);
        }
    }

    async fn session(&self, url: &str, tls: &lapin::tcp::OwnedTLSConfig) -> Result<(), String> {
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            comatching_protocol::amqp::connect(url, tls),
        )
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        let result = self.consume(&conn).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
        result
    }

    async fn consume(&self, conn: &Connection) -> Result<(), String> {
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        ch.basic_qos(200, BasicQosOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        // The queue is declared (with its limits) by the broker session's topology; until it
        // exists this fails and is retried after the backoff.
        let mut consumer = ch
            .basic_consume(
                DEAD_TALLY_QUEUE.into(),
                "relay-dead-letter-tally".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        while let Some(d) = consumer.next().await {
            let d = d.map_err(|e| e.to_string())?;
            let (reason, queue) = death_of(&d.properties);
            self.metrics.count_dead_letter(&reason, &queue);
            d.ack(BasicAckOptions::default())
                .await
                .map_err(|e| e.to_string())?;
        }
        Err("tally consumer ended".into())
    }
}

/// What `retire-appliance` found and removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Retired {
    pub appliance_id: String,
    pub queue: String,
    pub queue_deleted: bool,
    /// Messages that were waiting in the queue (dropped with it).
    pub messages_dropped: u64,
    pub tracking_row_deleted: bool,
}

/// Why a retirement did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    #[error("invalid_appliance_id: {0}")]
    InvalidId(String),
    #[error("appliance_connected: {queue} has {consumers} consumer(s); stop the appliance first")]
    Connected { queue: String, consumers: u32 },
    #[error("broker: {0}")]
    Broker(String),
}

/// The appliance id given on the command line, checked.
pub fn parse_id(raw: &str) -> Result<ApplianceId, RetireError> {
    raw.parse::<ApplianceId>()
        .map_err(|e| RetireError::InvalidId(format!("{raw:?}: {e}")))
}

/// Deletes the appliance's sync queue unless something consumes it; returns (deleted,
/// messages it held).
pub async fn delete_sync_queue(
    cfg: &config::Broker,
    id: &ApplianceId,
) -> Result<(bool, u64), RetireError> {
    let broker = |e: lapin::Error| RetireError::Broker(e.to_string());
    let tls = comatching_protocol::amqp::tls_config(cfg)
        .map_err(|e| RetireError::Broker(e.to_string()))?;
    // The first node of `broker.url` that answers (a cluster's nodes all see the queue).
    let mut conn = None;
    let mut last = RetireError::Broker("no broker.url".into());
    for u in cfg.url.as_slice() {
        let url = amqp_url_with_heartbeat(u, cfg.heartbeat_s);
        match tokio::time::timeout(
            Duration::from_secs(10),
            comatching_protocol::amqp::connect(&url, &tls),
        )
        .await
        {
            Ok(Ok(c)) => {
                conn = Some(c);
                break;
            }
            Ok(Err(e)) => last = broker(e),
            Err(_) => last = RetireError::Broker("connect timed out".into()),
        }
    }
    let Some(conn) = conn else {
        return Err(last);
    };
    let queue = sync_queue(id.as_str());
    let result = async {
        let ch = conn.create_channel().await.map_err(broker)?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = match ch
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => q,
            Err(e) if is_not_found(&e) => return Ok((false, 0)),
            Err(e) => return Err(broker(e)),
        };
        if q.consumer_count() > 0 {
            return Err(RetireError::Connected {
                queue: queue.clone(),
                consumers: q.consumer_count(),
            });
        }
        // `if-unused` is refused by quorum queues: the consumer check above stands in for it.
        let dropped = ch
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(broker)?;
        let _ = ch.close(200, "retired".into()).await;
        Ok((true, dropped as u64))
    }
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString, ShortString};

    fn with_deaths(deaths: Vec<(&str, &str)>) -> BasicProperties {
        let entries: Vec<AMQPValue> = deaths
            .into_iter()
            .map(|(reason, queue)| {
                let mut t = FieldTable::default();
                t.insert(
                    ShortString::from("reason"),
                    AMQPValue::LongString(LongString::from(reason)),
                );
                t.insert(
                    ShortString::from("queue"),
                    AMQPValue::LongString(LongString::from(queue)),
                );
                AMQPValue::FieldTable(t)
            })
            .collect();
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from("x-death"),
            AMQPValue::FieldArray(FieldArray::from(entries)),
        );
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn the_newest_death_names_reason_and_queue() {
        let p = with_deaths(vec![
            ("expired", "comatching.match.requests"),
            ("rejected", "comatching.control"),
        ]);
        assert_eq!(
            death_of(&p),
            ("expired".into(), "comatching.match.requests".into())
        );
        assert_eq!(
            death_of(&BasicProperties::default()),
            ("unknown".into(), "unknown".into())
        );
        assert_eq!(
            death_of(&with_deaths(vec![])),
            ("unknown".into(), "unknown".into())
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(parse_id("box-1").is_ok());
        for bad in ["", "Box", "-x", "a.b", "a/b"] {
            let e = parse_id(bad).unwrap_err();
            assert!(
                e.to_string().starts_with("invalid_appliance_id"),
                "{bad}: {e}"
            );
        }
    }
}
