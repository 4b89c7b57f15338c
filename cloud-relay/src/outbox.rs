//! The outbox: every change to the matchable pool, written in the same transaction as the change
//! itself, then published in order by one task.
//!
//! `append` runs inside the caller's transaction and assigns the next gap-free `seq` from
//! `meta.last_seq`. `OutboxPublisher` is the only reader: it sends rows with `seq >
//! published_upto` to the fanout exchange on a confirm-mode channel and advances
//! `published_upto` only over a prefix of positively confirmed rows. A crash between commit and
//! publish therefore loses nothing: the row is still there after restart. A crash after publish
//! and before `published_upto` is saved republishes a few rows, which receivers drop by version.

use crate::db::Cached;
use std::sync::Arc;
use std::time::Duration;

use comatching_protocol::{Envelope, Epoch, Features, Message, SyncEvent, SyncOp, UserId};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Confirmation};
use rusqlite::{Connection, params};
use tokio::sync::{Notify, watch};

use crate::broker::BrokerHandle;
use crate::db::{Db, meta_set, meta_u64, now_ms};
use crate::error::ApiError;
use comatching_protocol::topology::SYNC_EXCHANGE;

pub enum OutboxOp {
    Upsert(Features),
    Delete,
}

/// Appends one row in the caller's transaction; returns its seq.
pub fn append(
    conn: &Connection,
    user: UserId,
    version: u64,
    op: OutboxOp,
) -> Result<u64, ApiError> {
    let seq = meta_u64(conn, "last_seq")? + 1;
    let (op_name, features) = match &op {
        OutboxOp::Upsert(f) => (
            "upsert",
            Some(rmp_serde::to_vec_named(f).map_err(|e| ApiError::internal(e.to_string()))?),
        ),
        OutboxOp::Delete => ("delete", None),
    };
    conn.exec_cached(
        "INSERT INTO outbox(seq, user_id, version, op, features, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![seq as i64, user.to_hex(), version as i64, op_name, features, now_ms()],
    )?;
    meta_set(conn, "last_seq", &seq.to_string())?;
    Ok(seq)
}

pub fn epoch(conn: &Connection) -> Result<Epoch, ApiError> {
    Ok(Epoch(meta_u64(conn, "epoch")?))
}

/// Rows after `after`, oldest first, as wire events.
pub fn read_after(conn: &Connection, after: u64, limit: usize) -> Result<Vec<SyncEvent>, ApiError> {
    let epoch = epoch(conn)?;
    let mut stmt = conn.prepare(
        "SELECT seq, user_id, version, op, features FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Option<Vec<u8>>>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, user, version, op, features) = row?;
        let bad = |what: &str| ApiError::internal(format!("outbox row {seq}: {what}"));
        let op = match (op.as_str(), features) {
            ("upsert", Some(bytes)) => SyncOp::Upsert(
                rmp_serde::from_slice(&bytes).map_err(|e| bad(&format!("features: {e}")))?,
            ),
            ("delete", _) => SyncOp::Delete,
            _ => return Err(bad("op/features mismatch")),
        };
        out.push(SyncEvent {
            epoch,
            seq: seq as u64,
            user_id: user.parse().map_err(|_| bad("user id"))?,
            version: version as u64,
            op,
        });
    }
    Ok(out)
}

/// Seqs written but not yet confirmed by the broker.
pub fn lag(conn: &Connection) -> Result<u64, ApiError> {
    Ok(meta_u64(conn, "last_seq")?.saturating_sub(meta_u64(conn, "published_upto")?))
}

/// Sends outbox rows to the broker in seq order; see the module comment.
pub struct OutboxPublisher {
    pub db: Db,
    pub broker: BrokerHandle,
    /// Poked after every commit that appended rows.
    pub wake: Arc<Notify>,
}

const BATCH: usize = 256;
/// Longest wait for a publisher confirm before the session is declared broken.
pub const CONFIRM_DEADLINE: Duration = Duration::from_secs(15);

impl OutboxPublisher {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let session = tokio::select! {
                s = self.broker.wait() => s,
                _ = shutdown.changed() => return,
            };
            match self.drain(&session).await {
                Ok(true) => continue,
                Ok(false) => {
                    // Caught up: wait for new rows, a periodic re-check, or shutdown.
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox publish failed; will retry on a fresh session");
                    session.mark_broken("outbox publish failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    /// Publishes one batch. Ok(true) when there may be more to send.
    async fn drain(&self, session: &crate::broker::Session) -> Result<bool, String> {
        let rows = self
            .db
            .run(|c| {
                let from = meta_u64(c, "published_upto")?;
                read_after(c, from, BATCH)
            })
            .await
            .map_err(|e| e.to_string())?;
        if rows.is_empty() {
            return Ok(false);
        }
        let mut pending = Vec::with_capacity(rows.len());
        for ev in &rows {
            let seq = ev.seq;
            let body = Envelope::encode(&Message::SyncEvent(ev.clone()));
            let props = self.broker.auth.sign(
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/x-comatching".into())
                    .with_message_id(seq.to_string().into()),
                &body,
            );
            let confirm = session
                .outbox
                .basic_publish(
                    SYNC_EXCHANGE.into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await
                .map_err(|e| format!("publish seq {seq}: {e}"))?;
            pending.push((seq, confirm));
        }
        let mut confirmed_upto = None;
        let mut failure = None;
        for (seq, confirm) in pending {
            // A broker can accept a publish and never confirm it (a quorum queue left without
            // a leader after a crash); waiting forever would stall the outbox silently.
            match tokio::time::timeout(CONFIRM_DEADLINE, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => confirmed_upto = Some(seq),
                Ok(Ok(other)) => {
                    failure = Some(format!("seq {seq} not confirmed: {other:?}"));
                    break;
                }
                Ok(Err(e)) => {
                    failure = Some(format!("seq {seq} confirm failed: {e}"));
                    break;
                }
                Err(_) => {
                    failure = Some(format!("seq {seq}: no confirm within {CONFIRM_DEADLINE:?}"));
                    break;
                }
            }
        }
        if let Some(upto) = confirmed_upto {
            self.db
                .run(move |c| {
                    meta_set(c, "published_upto", &upto.to_string())?;
                    Ok(())
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        match failure {
            Some(f) => Err(f),
            None => Ok(rows.len() == BATCH),
        }
    }
}
