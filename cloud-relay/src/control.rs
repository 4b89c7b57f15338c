//! The relay's side of replica sync: answering appliances' `Hello`s on `comatching.control`
//! with a replay or a snapshot, tracking each appliance's position, and trimming the outbox.
//!
//! `decide` is the pure rule; `ControlConsumer` is the thin I/O shell around it. A replay sends
//! outbox rows `seq > applied_seq` straight to the appliance's own queue. A snapshot sends every
//! live user stamped with the high-water seq H (read in one transaction with the users), framed
//! begin / chunks / end with count and digest, then the rows after H. Live rows keep flowing
//! through the fanout meanwhile; the appliance drops what it already has by version.

use std::sync::Arc;
use std::time::Duration;

use comatching_protocol::wire::MAX_CHUNK_USERS;
use comatching_protocol::{
    Digest, Envelope, Epoch, Hello, HelloAck, Message, SnapshotBegin, SnapshotChunk, SnapshotEnd,
    SnapshotUser, SyncEvent, WireLimits,
};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::watch;

use crate::broker::{BrokerHandle, Session};
use crate::db::{Db, meta_u64, now_ms};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::{outbox, profiles};
use comatching_protocol::amqp::LinkAuth;
use comatching_protocol::topology::CONTROL_QUEUE;

/// Outbox rows kept below the slowest appliance's position, so a briefly lagging or new
/// appliance can catch up by replay instead of a snapshot.
pub const RETENTION_ROWS: u64 = 50_000;
/// An appliance is reported ready when its last hello is this fresh and it was caught up.
pub const READY_FRESH_MS: i64 = 60_000;

/// Where the relay's truth stands, read in one transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayPosition {
    pub epoch: Epoch,
    pub last_seq: u64,
    /// The smallest seq still in the outbox (None when it is empty).
    pub oldest_retained: Option<u64>,
    pub count: u64,
    pub digest: Digest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatchUp {
    /// Same lineage, same content: nothing to send.
    InSync,
    /// Same lineage, behind: send rows from this seq on.
    Replay { from: u64 },
    /// Anything else: send everything.
    Snapshot { reason: &'static str },
}

/// The rule, in order: another lineage (or none yet) → snapshot; claims to be ahead of us →
/// snapshot; at our position, equal content → in sync, else snapshot; behind and the outbox
/// still reaches back → replay, else snapshot.
pub fn decide(hello: &Hello, relay: &RelayPosition) -> CatchUp {
    if hello.epoch != Some(relay.epoch) {
        return CatchUp::Snapshot {
            reason: if hello.epoch.is_none() {
                "empty replica"
            } else {
                "different epoch"
            },
        };
    }
    if hello.applied_seq > relay.last_seq {
        return CatchUp::Snapshot {
            reason: "replica ahead of the relay",
        };
    }
    if hello.applied_seq == relay.last_seq {
        return if hello.count == relay.count && hello.digest == relay.digest {
            CatchUp::InSync
        } else {
            CatchUp::Snapshot {
                reason: "digest mismatch",
            }
        };
    }
    let from = hello.applied_seq + 1;
    match relay.oldest_retained {
        Some(oldest) if oldest <= from => CatchUp::Replay { from },
        _ => CatchUp::Snapshot {
            reason: "outbox trimmed past the replica",
        },
    }
}

/// Where the relay stands: epoch, last seq, oldest retained seq, and the pool's count and
/// digest computed from `(user_id, version)` alone (cheap: no features are decoded).
fn position(c: &Connection) -> Result<RelayPosition, ApiError> {
    let epoch = outbox::epoch(c)?;
    let last_seq = meta_u64(c, "last_seq")?;
    let oldest: Option<i64> = c.query_row("SELECT MIN(seq) FROM outbox", [], |r| r.get(0))?;
    let mut stmt = c.prepare_cached("SELECT user_id, version FROM profiles WHERE in_pool = 1")?;
    let mut rows = stmt.query([])?;
    let (mut count, mut digest) = (0u64, Digest::default());
    while let Some(r) = rows.next()? {
        let id: String = r.get(0)?;
        let user = id
            .parse()
            .map_err(|_| ApiError::internal(format!("stored user id {id}")))?;
        digest.add(user, r.get::<_, i64>(1)? as u64);
        count += 1;
    }
    Ok(RelayPosition {
        epoch,
        last_seq,
        oldest_retained: oldest.map(|s| s as u64),
        count,
        digest,
    })
}

/// Every live user with features, for a snapshot.
fn snapshot_users(c: &Connection) -> Result<Vec<SnapshotUser>, ApiError> {
    profiles::pool_snapshot(c)
}

/// The relay's live pool digest and position (for tests and the admin view).
pub fn relay_position(c: &Connection) -> Result<RelayPosition, ApiError> {
    position(c)
}

pub fn queue_for(appliance: &str) -> String {
    format!("comatching.sync.{appliance}")
}

pub struct ControlConsumer {
    pub db: Db,
    pub broker: BrokerHandle,
    pub metrics: Arc<Metrics>,
}

impl ControlConsumer {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let session = tokio::select! {
                s = self.broker.wait() => s,
                _ = shutdown.changed() => return,
            };
            if let Err(e) = self.consume(&session, &mut shutdown).await {
                tracing::warn!(error = %e, "control consumer stopped");
                session.mark_broken("control consumer failed");
            }
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn consume(
        &self,
        session: &Session,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let ch = &session.control;
        ch.basic_qos(1, BasicQosOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let mut consumer = ch
            .basic_consume(
                CONTROL_QUEUE.into(),
                "relay-control".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let delivery = tokio::select! {
                d = consumer.next() => d,
                _ = shutdown.changed() => return Ok(()),
            };
            let Some(delivery) = delivery else {
                return Err("control consumer ended".into());
            };
            let delivery = delivery.map_err(|e| e.to_string())?;
            if let Err(e) = self.broker.auth.admit(&delivery.properties, &delivery.data) {
                tracing::warn!(code = e.code(), error = %e, "unauthenticated control message; dead-lettering");
                delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await
                    .map_err(|e| e.to_string())?;
                continue;
            }
            let hello = match Envelope::decode(&delivery.data, &WireLimits::default()) {
                Ok(Message::Hello(h)) => h,
                Ok(other) => {
                    tracing::warn!(
                        kind = other.kind(),
                        "unexpected message on the control queue; dead-lettering"
                    );
                    delivery
                        .reject(BasicRejectOptions { requeue: false })
                        .await
                        .map_err(|e| e.to_string())?;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(code = e.code(), error = %e, "undecodable control message; dead-lettering");
                    delivery
                        .reject(BasicRejectOptions { requeue: false })
                        .await
                        .map_err(|e| e.to_string())?;
                    continue;
                }
            };
            match self.answer(ch, &hello).await {
                Err(e) if e.starts_with(UNROUTABLE) => {
                    // The appliance's queue is gone (deleted, or a wiped broker): it redeclares
                    // it and says hello again, so this hello is done with.
                    tracing::warn!(appliance = %hello.appliance_id, error = %e, "hello answer unroutable");
                    self.metrics
                        .unroutable_hello_answers
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    delivery
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(()) => {
                    delivery
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Err(e) => {
                    // Redelivered (up to the queue's delivery limit) on a fresh session.
                    tracing::warn!(appliance = %hello.appliance_id, error = %e, "answering hello failed");
                    return Err(e);
                }
            }
        }
    }

    async fn answer(&self, ch: &Channel, hello: &Hello) -> Result<(), String> {
        let h = hello.clone();
        let (pos, action, users) = self
            .db
            .run(move |c| {
                // One transaction: the users of a snapshot are exactly the pool at H.
                let tx = c.transaction()?;
                let pos = position(&tx)?;
                let action = decide(&h, &pos);
                let users = match action {
                    CatchUp::Snapshot { .. } => snapshot_users(&tx)?,
                    _ => Vec::new(),
                };
                tx.commit()?;
                Ok((pos, action, users))
            })
            .await
            .map_err(|e| e.to_string())?;
        let queue = queue_for(hello.appliance_id.as_str());
        tracing::info!(appliance = %hello.appliance_id, applied_seq = hello.applied_seq, relay_seq = pos.last_seq, ?action, "hello");
        let action_name = match action {
            CatchUp::InSync => "in_sync".to_owned(),
            CatchUp::Replay { from } => format!("replay from {from}"),
            CatchUp::Snapshot { reason } => format!("snapshot ({reason})"),
        };
        self.track(hello, &pos, &action_name)
            .await
            .map_err(|e| e.to_string())?;
        let relay_seq = match action {
            CatchUp::InSync => pos.last_seq,
            CatchUp::Replay { from } => self.replay(ch, &queue, from).await?,
            CatchUp::Snapshot { .. } => {
                drop_into_snapshot(ch, &self.broker.auth, &queue, &pos, users).await?;
                self.replay(ch, &queue, pos.last_seq + 1)
                    .await?
                    .max(pos.last_seq)
            }
        };
        let ack = Message::HelloAck(HelloAck {
            appliance_id: hello.appliance_id.clone(),
            epoch: pos.epoch,
            relay_seq,
        });
        publish_all(ch, &self.broker.auth, &queue, &[ack]).await
    }

    /// Sends rows from `from` to the end of the outbox; returns the last seq sent (or
    /// `from - 1` when there was nothing).
    async fn replay(&self, ch: &Channel, queue: &str, from: u64) -> Result<u64, String> {
        let mut after = from.saturating_sub(1);
        loop {
            let rows: Vec<SyncEvent> = self
                .db
                .run(move |c| outbox::read_after(c, after, 500))
                .await
                .map_err(|e| e.to_string())?;
            let Some(last) = rows.last() else {
                return Ok(after);
            };
            after = last.seq;
            let msgs: Vec<Message> = rows.into_iter().map(Message::SyncEvent).collect();
            publish_all(ch, &self.broker.auth, queue, &msgs).await?;
        }
    }

    async fn track(
        &self,
        hello: &Hello,
        pos: &RelayPosition,
        action: &str,
    ) -> Result<(), ApiError> {
        let h = hello.clone();
        let relay_epoch = pos.epoch;
        let action = action.to_owned();
        self.db
            .run(move |c| {
                c.execute(
                    "INSERT INTO appliances(appliance_id, epoch, applied_seq, count, digest, epoch_matches, last_seen_ms, last_action) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT(appliance_id) DO UPDATE SET epoch = excluded.epoch, applied_seq = excluded.applied_seq, \
                       count = excluded.count, digest = excluded.digest, epoch_matches = excluded.epoch_matches, \
                       last_seen_ms = excluded.last_seen_ms, last_action = excluded.last_action",
                    params![
                        h.appliance_id.as_str(),
                        h.epoch.map(|e| e.0.to_string()),
                        h.applied_seq as i64,
                        h.count as i64,
                        h.digest.to_string(),
                        h.epoch == Some(relay_epoch),
                        now_ms(),
                        action
                    ],
                )?;
                Ok(())
            })
            .await
    }
}

async fn drop_into_snapshot(
    ch: &Channel,
    auth: &LinkAuth,
    queue: &str,
    pos: &RelayPosition,
    users: Vec<SnapshotUser>,
) -> Result<(), String> {
    let snapshot_id: u64 = rand::random();
    let begin = Message::SnapshotBegin(SnapshotBegin {
        epoch: pos.epoch,
        snapshot_id,
        high_water_seq: pos.last_seq,
    });
    publish_all(ch, auth, queue, &[begin]).await?;
    // A few chunks at a time: the relay has 1 GiB, and a 100k-user snapshot encoded at once
    // would double the pool's footprint.
    let chunks = users.len().div_ceil(MAX_CHUNK_USERS) as u32;
    // Users are moved into their chunk, not copied: each chunk's features are freed once it is
    // published.
    let mut users = users.into_iter();
    let mut index = 0u32;
    while index < chunks {
        let mut msgs = Vec::with_capacity(SNAPSHOT_CHUNKS_IN_FLIGHT);
        while msgs.len() < SNAPSHOT_CHUNKS_IN_FLIGHT && index < chunks {
            msgs.push(Message::SnapshotChunk(SnapshotChunk {
                epoch: pos.epoch,
                snapshot_id,
                index,
                users: users.by_ref().take(MAX_CHUNK_USERS).collect(),
            }));
            index += 1;
        }
        publish_all(ch, auth, queue, &msgs).await?;
    }
    let end = Message::SnapshotEnd(SnapshotEnd {
        epoch: pos.epoch,
        snapshot_id,
        high_water_seq: pos.last_seq,
        chunks,
        count: pos.count,
        digest: pos.digest,
    });
    publish_all(ch, auth, queue, &[end]).await?;
    tracing::info!(
        queue,
        users = pos.count,
        chunks,
        high_water_seq = pos.last_seq,
        "snapshot sent"
    );
    Ok(())
}

const UNROUTABLE: &str = "unroutable";
/// Snapshot chunks encoded and awaiting confirms at once.
const SNAPSHOT_CHUNKS_IN_FLIGHT: usize = 32;

/// Publishes to one queue (default exchange) and waits for every confirm.
async fn publish_all(
    ch: &Channel,
    auth: &LinkAuth,
    queue: &str,
    msgs: &[Message],
) -> Result<(), String> {
    let mut confirms = Vec::with_capacity(msgs.len());
    for m in msgs {
        let body = Envelope::encode(m);
        let c = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                auth.sign(
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_content_type("application/x-comatching".into()),
                    &body,
                ),
            )
            .await
            .map_err(|e| format!("publish to {queue}: {e}"))?;
        confirms.push(c);
    }
    for c in confirms {
        match tokio::time::timeout(outbox::CONFIRM_DEADLINE, c).await {
            Ok(Ok(Confirmation::Ack(None))) => {}
            Ok(Ok(Confirmation::Ack(Some(_)))) => {
                return Err(format!("{UNROUTABLE}: queue {queue} does not exist"));
            }
            Ok(Ok(other)) => return Err(format!("publish to {queue} not confirmed: {other:?}")),
            Ok(Err(e)) => return Err(format!("confirm from {queue}: {e}")),
            Err(_) => return Err(format!("no confirm from {queue} in time")),
        }
    }
    Ok(())
}

/// `GET /api/v1/admin/appliances`.
/// `GET /api/v1/admin/appliances`: the relay's position and each appliance's.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ApplianceList {
    /// The relay's last outbox sequence number.
    pub relay_seq: u64,
    pub relay: RelayView,
    pub appliances: Vec<ApplianceView>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RelayView {
    /// The database lineage, 16 hex characters.
    pub epoch: String,
    pub seq: u64,
    /// Users in the matchable pool.
    pub count: u64,
    /// The pool's order-independent digest, 16 hex characters.
    pub digest: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ApplianceView {
    pub appliance_id: String,
    /// The epoch the appliance last reported (null before its first hello).
    #[schema(required = true)]
    pub epoch: Option<String>,
    pub applied_seq: i64,
    /// Outbox rows the appliance has not applied yet.
    pub lag: u64,
    pub count: i64,
    pub digest: String,
    pub last_seen_unix_ms: i64,
    /// Same epoch as the relay and seen recently.
    pub ready: bool,
    pub last_action: String,
}

pub fn appliances_json(c: &Connection) -> Result<Value, ApiError> {
    let last_seq = meta_u64(c, "last_seq")?;
    let now = now_ms();
    let mut stmt = c.prepare(
        "SELECT appliance_id, epoch, applied_seq, count, digest, epoch_matches, last_seen_ms, last_action \
         FROM appliances ORDER BY appliance_id",
    )?;
    let appliances = stmt
        .query_map([], |r| {
            let applied: i64 = r.get(2)?;
            let epoch: Option<String> = r.get(1)?;
            let seen: i64 = r.get(6)?;
            let epoch_ok: bool = r.get(5)?;
            Ok(ApplianceView {
                appliance_id: r.get(0)?,
                epoch: epoch
                    .and_then(|e| e.parse::<u64>().ok())
                    .map(|e| Epoch(e).to_string()),
                applied_seq: applied,
                lag: last_seq.saturating_sub(applied as u64),
                count: r.get(3)?,
                digest: r.get(4)?,
                last_seen_unix_ms: seen,
                ready: epoch_ok && now - seen <= READY_FRESH_MS,
                last_action: r.get(7)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let relay = relay_position(c)?;
    let list = ApplianceList {
        relay_seq: last_seq,
        relay: RelayView {
            epoch: relay.epoch.to_string(),
            seq: relay.last_seq,
            count: relay.count,
            digest: relay.digest.to_string(),
        },
        appliances,
    };
    serde_json::to_value(list).map_err(|e| ApiError::internal(format!("appliances: {e}")))
}

/// Deletes outbox rows nobody can need: already published, below every recently seen
/// appliance's position, and older than the retention window. An appliance not heard from for
/// `stale_ms` (the sync queues' expiry: its queue is gone, it would need a snapshot anyway) no
/// longer holds the outbox back. Returns rows deleted.
pub fn trim(c: &Connection, stale_ms: i64) -> Result<usize, ApiError> {
    let published = meta_u64(c, "published_upto")?;
    let slowest: Option<i64> = c
        .query_row(
            "SELECT MIN(applied_seq) FROM appliances WHERE epoch_matches = 1 AND last_seen_ms > ?1",
            [now_ms() - stale_ms],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let floor = slowest
        .map(|s| s as u64)
        .unwrap_or(published)
        .min(published);
    let below = floor.saturating_sub(RETENTION_ROWS);
    if below == 0 {
        return Ok(0);
    }
    Ok(c.execute("DELETE FROM outbox WHERE seq <= ?1", [below as i64])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use comatching_protocol::ApplianceId;
    use proptest::prelude::*;

    fn hello(epoch: Option<u64>, applied: u64, count: u64, digest: u64) -> Hello {
        Hello {
            appliance_id: "box-1".parse::<ApplianceId>().unwrap(),
            epoch: epoch.map(Epoch),
            applied_seq: applied,
            count,
            digest: Digest(digest),
        }
    }

    fn relay(last: u64, oldest: Option<u64>) -> RelayPosition {
        RelayPosition {
            epoch: Epoch(7),
            last_seq: last,
            oldest_retained: oldest,
            count: 10,
            digest: Digest(99),
        }
    }

    #[test]
    fn the_rule_table() {
        let r = relay(100, Some(1));
        assert!(matches!(
            decide(&hello(None, 0, 0, 0), &r),
            CatchUp::Snapshot { .. }
        ));
        assert!(matches!(
            decide(&hello(Some(8), 100, 10, 99), &r),
            CatchUp::Snapshot { .. }
        ));
        assert!(matches!(
            decide(&hello(Some(7), 101, 10, 99), &r),
            CatchUp::Snapshot { .. }
        ));
        assert_eq!(decide(&hello(Some(7), 100, 10, 99), &r), CatchUp::InSync);
        assert!(matches!(
            decide(&hello(Some(7), 100, 10, 98), &r),
            CatchUp::Snapshot { .. }
        ));
        assert_eq!(
            decide(&hello(Some(7), 40, 3, 1), &r),
            CatchUp::Replay { from: 41 }
        );
        let trimmed = relay(100, Some(50));
        assert!(matches!(
            decide(&hello(Some(7), 40, 3, 1), &trimmed),
            CatchUp::Snapshot { .. }
        ));
        assert_eq!(
            decide(&hello(Some(7), 49, 3, 1), &trimmed),
            CatchUp::Replay { from: 50 }
        );
    }

    use crate::db::{Db, meta_set};
    use crate::profiles::ProfileInput;
    use comatching_protocol::UserId;

    fn open() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        (dir, db)
    }

    /// A user with a profile in the pool (one outbox row).
    fn member(db: &Db) -> UserId {
        let u = UserId::new_v7();
        let p = serde_json::from_value::<ProfileInput>(serde_json::json!({
            "nickname": "Nick", "gender": "male", "age": 23, "mbti": "ISTP",
            "hobbies": ["arts"], "contact_frequency": "rare", "major": "Math",
            "contact": {"kind": "kakao", "handle": "h"}
        }))
        .unwrap()
        .validate()
        .unwrap();
        db.run_sync(|c| {
            c.execute(
                "INSERT INTO accounts(user_id, username, password_hash, created_ms) VALUES (?1, ?1, 'h', 1)",
                [u.to_hex()],
            )?;
            profiles::upsert(c, u, &p, 5)?;
            Ok(())
        })
        .unwrap();
        u
    }

    #[test]
    fn the_relay_position_is_the_pool_and_the_outbox() {
        let (_d, db) = open();
        let empty = db.run_sync(|c| relay_position(c)).unwrap();
        assert_eq!(
            (
                empty.last_seq,
                empty.oldest_retained,
                empty.count,
                empty.digest
            ),
            (0, None, 0, Digest::default())
        );
        let (a, b, gone) = (member(&db), member(&db), member(&db));
        db.run_sync(|c| profiles::leave_pool(c, gone)).unwrap();
        let pos = db.run_sync(|c| relay_position(c)).unwrap();
        let epoch = db.run_sync(|c| outbox::epoch(c)).unwrap();
        let mut digest = Digest::default();
        digest.add(a, 1);
        digest.add(b, 1);
        assert_eq!(
            pos,
            RelayPosition {
                epoch,
                last_seq: 4,
                oldest_retained: Some(1),
                count: 2,
                digest,
            }
        );
        let mut ids: Vec<UserId> = db
            .run_sync(|c| snapshot_users(c))
            .unwrap()
            .into_iter()
            .map(|u| u.user_id)
            .collect();
        ids.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(ids, want);
        assert_eq!(queue_for("box-1"), "comatching.sync.box-1");
    }

    fn seen(db: &Db, id: &str, epoch_matches: bool, applied: i64, ago_ms: i64) {
        db.run_sync(|c| {
            c.execute(
                "INSERT INTO appliances(appliance_id, epoch, applied_seq, count, digest, epoch_matches, last_seen_ms, last_action) \
                 VALUES (?1, '7', ?2, 3, '00000000000000ab', ?3, ?4, 'in_sync')",
                params![id, applied, epoch_matches, now_ms() - ago_ms],
            )?;
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn appliances_show_lag_and_readiness() {
        let (_d, db) = open();
        member(&db);
        member(&db);
        seen(&db, "fresh", true, 1, 1_000);
        seen(&db, "old", true, 2, READY_FRESH_MS + 60_000);
        seen(&db, "other-lineage", false, 0, 1_000);
        let v = db.run_sync(|c| appliances_json(c)).unwrap();
        let pos = db.run_sync(|c| relay_position(c)).unwrap();
        assert_eq!(v["relay_seq"], 2);
        assert_eq!(v["relay"]["seq"], 2);
        assert_eq!(v["relay"]["count"], 2);
        assert_eq!(v["relay"]["digest"], pos.digest.to_string());
        assert_eq!(v["relay"]["epoch"], pos.epoch.to_string());
        let rows = v["appliances"].as_array().unwrap();
        let row = |id: &str| rows.iter().find(|r| r["appliance_id"] == id).unwrap();
        assert_eq!(row("fresh")["lag"], 1);
        assert_eq!(row("fresh")["ready"], true);
        assert_eq!(row("fresh")["epoch"], Epoch(7).to_string());
        assert_eq!(row("old")["lag"], 0);
        assert_eq!(row("old")["ready"], false);
        assert_eq!(row("other-lineage")["lag"], 2);
        assert_eq!(row("other-lineage")["ready"], false);
    }

    #[test]
    fn trim_keeps_the_retention_window_below_the_slowest_recent_appliance() {
        let (_d, db) = open();
        let rows = |db: &Db| -> Vec<i64> {
            db.run_sync(|c| {
                let mut s = c.prepare("SELECT seq FROM outbox ORDER BY seq")?;
                let v = s
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<Vec<i64>, _>>()?;
                Ok(v)
            })
            .unwrap()
        };
        db.run_sync(|c| {
            for seq in 1..=20i64 {
                c.execute(
                    "INSERT INTO outbox(seq, user_id, version, op, features, created_ms) VALUES (?1, 'u', 1, 'delete', NULL, 0)",
                    [seq],
                )?;
            }
            Ok(())
        })
        .unwrap();
        let stale_ms = 600_000;
        // Published up to the window's size: nothing is below it yet.
        db.run_sync(|c| {
            meta_set(c, "published_upto", &RETENTION_ROWS.to_string())?;
            Ok(())
        })
        .unwrap();
        assert_eq!(db.run_sync(|c| trim(c, stale_ms)).unwrap(), 0);
        assert_eq!(rows(&db).len(), 20);
        db.run_sync(|c| {
            meta_set(c, "published_upto", &(RETENTION_ROWS + 12).to_string())?;
            Ok(())
        })
        .unwrap();
        // A recent appliance of this lineage at 50_005 holds the outbox back to seq 5; a stale
        // one and one of another lineage do not.
        seen(&db, "slow", true, RETENTION_ROWS as i64 + 5, 1_000);
        seen(&db, "stale", true, 1, stale_ms + 1_000);
        seen(&db, "other", false, 0, 1_000);
        assert_eq!(db.run_sync(|c| trim(c, stale_ms)).unwrap(), 5);
        assert_eq!(rows(&db)[0], 6);
        // Without it, the published position is the floor.
        db.run_sync(|c| {
            c.execute("DELETE FROM appliances WHERE appliance_id = 'slow'", [])?;
            Ok(())
        })
        .unwrap();
        assert_eq!(db.run_sync(|c| trim(c, stale_ms)).unwrap(), 7);
        assert_eq!(rows(&db)[0], 13);
    }

    proptest! {
        /// A replay is only ever asked for rows the outbox still holds, and never for a replica
        /// of another lineage.
        #[test]
        fn replay_only_from_retained_rows(epoch in proptest::option::of(0u64..3), applied in 0u64..200,
                                          last in 0u64..200, oldest in proptest::option::of(1u64..200)) {
            let mut r = relay(last, oldest);
            r.epoch = Epoch(1);
            if let CatchUp::Replay { from } = decide(&hello(epoch, applied, 0, 0), &r) {
                prop_assert_eq!(epoch, Some(1));
                prop_assert!(from <= last);
                prop_assert!(oldest.is_some_and(|o| o <= from));
                prop_assert_eq!(from, applied + 1);
            }
        }
    }

    /// Issue 13 §3: the outbox waits for an appliance that was seen recently, not for one whose
    /// sync queue has expired (not seen for `stale_ms`) or that was retired (no row at all).
    #[test]
    fn the_outbox_trim_waits_only_for_appliances_seen_recently() {
        const STALE_MS: i64 = 3_600_000;
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        let total = RETENTION_ROWS + 10_000;
        let outbox_rows = |c: &Connection| -> i64 {
            c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
                .unwrap()
        };
        db.run_sync(|c| {
            c.execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
                 INSERT INTO outbox(seq, user_id, version, op, created_ms) \
                 SELECT i, 'u', 1, 'delete', 0 FROM n",
                [total as i64],
            )?;
            crate::db::meta_set(c, "published_upto", &total.to_string())?;
            // A box far behind (seq 5,000), seen a moment ago.
            c.execute(
                "INSERT INTO appliances(appliance_id, epoch, applied_seq, count, digest, \
                 epoch_matches, last_seen_ms, last_action) \
                 VALUES ('box-1', 'e', 5000, 0, '0', 1, ?1, 'replay')",
                [now_ms()],
            )?;
            Ok(())
        })
        .unwrap();
        // Held back: every row after 5,000 is still needed, and 50,000 below it are kept.
        assert_eq!(db.run_sync(|c| trim(c, STALE_MS)).unwrap(), 0);
        assert_eq!(db.run_sync(|c| Ok(outbox_rows(c))).unwrap(), total as i64);
        // Not seen for longer than its queue lives: it no longer holds the outbox back.
        db.run_sync(|c| {
            c.execute(
                "UPDATE appliances SET last_seen_ms = ?1",
                [now_ms() - STALE_MS - 1_000],
            )?;
            Ok(())
        })
        .unwrap();
        assert_eq!(db.run_sync(|c| trim(c, STALE_MS)).unwrap(), 10_000);
        let left = db.run_sync(|c| Ok(outbox_rows(c))).unwrap();
        assert_eq!(left, RETENTION_ROWS as i64);
        // Retired (its row deleted): the same, and nothing more goes while nothing is published.
        db.run_sync(|c| {
            c.execute("DELETE FROM appliances", [])?;
            Ok(())
        })
        .unwrap();
        assert_eq!(db.run_sync(|c| trim(c, STALE_MS)).unwrap(), 0);
    }
}
