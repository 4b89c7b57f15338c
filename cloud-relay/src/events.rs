//! Live events over Server-Sent Events (issue 10 §3): operators see charge requests arrive and
//! get decided; a student sees their own request decided and their points change.
//!
//! **The database is the log.** Every event is a row of `events`, written in the same transaction
//! as the change it reports (`emit`), so an event exists iff its change committed. Its row id is
//! the SSE `id`. A stream reads rows after its position in batches of at most `BATCH`; a
//! `broadcast` channel only *wakes* streams after a commit (it carries who the event is for, so
//! a student's stream ignores everyone else's; a lagged receiver just reads the table).
//!
//! * A reconnect with `Last-Event-ID: n` replays every row after `n` for that audience. If rows
//!   after `n` may have been pruned (`n` below `meta.events_pruned_upto`), or `n` is beyond the
//!   newest id (a restored database), the stream sends `event: resync` first: the client
//!   reloads its lists, then follows live from there.
//! * The first event of every stream is `event: ready` (`data: {"last_event_id": n}`); keep-alive
//!   comments every `[events] keep_alive_s`.
//! * Each stream has a producer task and a channel of `CHANNEL` events. A client that does not
//!   read for `SLOW_CONSUMER` while the channel is full is dropped (its connection ends): nothing
//!   is buffered without bound, and it loses nothing — it reconnects with `Last-Event-ID`.
//! * A semaphore caps open streams (`[events] max_streams`): one more is 503 `too_many_streams`.
//! * Retention: `prune` deletes events older than `retention_hours` or beyond the newest
//!   `retention_rows`, once a minute.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use comatching_protocol::UserId;
use futures_util::Stream;
use rusqlite::{Connection, params};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch};

use crate::config::Events as EventsConfig;
use crate::db::{Cached, Db, meta_u64, now_ms};
use crate::error::{ApiError, ErrorCode};

/// Rows read per query.
pub const BATCH: usize = 100;
/// Events queued per stream between its producer and the connection.
pub const CHANNEL: usize = 32;
/// How long a full stream may stay full before its client is dropped.
pub const SLOW_CONSUMER: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Every operator's stream.
    Operators,
    /// The stream of the student the event is about.
    User,
}

impl Audience {
    fn as_str(self) -> &'static str {
        match self {
            Audience::Operators => "operators",
            Audience::User => "user",
        }
    }
}

/// Who a committed event is for: what the broadcast carries.
#[derive(Clone, Copy, Debug)]
pub struct Wake {
    pub audience: Audience,
    pub user: UserId,
}

/// Writes one event in the caller's transaction. Returns the wake to send after the commit.
pub fn emit(
    c: &Connection,
    audience: Audience,
    user: UserId,
    kind: &str,
    payload: &Value,
) -> Result<Wake, ApiError> {
    c.exec_cached(
        "INSERT INTO events(audience, user_id, kind, payload, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            audience.as_str(),
            user.to_hex(),
            kind,
            payload.to_string(),
            now_ms()
        ],
    )?;
    Ok(Wake { audience, user })
}

/// Erasure: the events about `user` go (they carry the depositor name and username).
pub fn erase(c: &Connection, user: UserId) -> Result<(), ApiError> {
    c.exec_cached("DELETE FROM events WHERE user_id = ?1", [user.to_hex()])?;
    Ok(())
}

/// Deletes events older than `max_age_ms` or beyond the newest `max_rows`; remembers the
/// highest id deleted, so a `Last-Event-ID` at or below it gets `resync`. Returns rows deleted.
pub fn prune(c: &Connection, now: i64, max_age_ms: i64, max_rows: u64) -> Result<usize, ApiError> {
    let newest: i64 = c.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?;
    let by_rows = newest - max_rows as i64;
    let by_age: i64 = c.query_row(
        "SELECT COALESCE(MAX(id), 0) FROM events WHERE created_ms < ?1",
        [now - max_age_ms],
        |r| r.get(0),
    )?;
    let upto = by_rows.max(by_age);
    if upto <= 0 {
        return Ok(0);
    }
    let n = c.execute("DELETE FROM events WHERE id <= ?1", [upto])?;
    if upto as u64 > meta_u64(c, "events_pruned_upto")? {
        crate::db::meta_set(c, "events_pruned_upto", &upto.to_string())?;
    }
    Ok(n)
}

/// The newest id ever assigned (AUTOINCREMENT's counter; 0 before the first event).
fn newest_id(c: &Connection) -> Result<i64, ApiError> {
    Ok(c.query_row(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)",
        [],
        |r| r.get(0),
    )
    .unwrap_or(0))
}

/// Where a new stream starts: `(position, resync)`.
fn start_position(c: &Connection, last_event_id: Option<i64>) -> Result<(i64, bool), ApiError> {
    let newest = newest_id(c)?;
    match last_event_id {
        None => Ok((newest, false)),
        Some(n) => {
            let pruned = meta_u64(c, "events_pruned_upto")? as i64;
            if n < pruned || n > newest || n < 0 {
                Ok((newest, true))
            } else {
                Ok((n, false))
            }
        }
    }
}

/// One row of the log as a stream sends it.
struct Row {
    id: i64,
    kind: String,
    payload: String,
}

fn read_after(c: &Connection, who: Who, after: i64, limit: usize) -> Result<Vec<Row>, ApiError> {
    let map = |r: &rusqlite::Row<'_>| {
        Ok(Row {
            id: r.get(0)?,
            kind: r.get(1)?,
            payload: r.get(2)?,
        })
    };
    let rows = match who {
        Who::Operators => {
            let mut st = c.prepare_cached(
                "SELECT id, kind, payload FROM events WHERE audience = 'operators' AND id > ?1 ORDER BY id LIMIT ?2",
            )?;
            st.query_map(params![after, limit as i64], map)?
                .collect::<Result<Vec<_>, _>>()?
        }
        Who::User(u) => {
            let mut st = c.prepare_cached(
                "SELECT id, kind, payload FROM events WHERE user_id = ?1 AND audience = 'user' AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            st.query_map(params![u.to_hex(), after, limit as i64], map)?
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    Ok(rows)
}

/// Whose events a stream follows.
#[derive(Clone, Copy, Debug)]
pub enum Who {
    Operators,
    User(UserId),
}

impl Who {
    fn woken_by(self, w: &Wake) -> bool {
        match self {
            Who::Operators => w.audience == Audience::Operators,
            Who::User(u) => w.audience == Audience::User && w.user == u,
        }
    }
}

/// The relay's live-event hub: wakes streams and caps their number.
pub struct Hub {
    wake: broadcast::Sender<Wake>,
    streams: Arc<Semaphore>,
    keep_alive: Duration,
    shutdown: watch::Receiver<bool>,
    pub cfg: EventsConfig,
}

impl Hub {
    pub fn new(cfg: &EventsConfig, shutdown: watch::Receiver<bool>) -> Hub {
        Hub {
            wake: broadcast::channel(1024).0,
            streams: Arc::new(Semaphore::new(cfg.max_streams)),
            keep_alive: Duration::from_secs(cfg.keep_alive_s),
            shutdown,
            cfg: cfg.clone(),
        }
    }

    /// Call after the transaction holding these events committed.
    pub fn notify(&self, wakes: &[Wake]) {
        for w in wakes {
            // No receiver = no stream open: nothing to wake.
            let _ = self.wake.send(*w);
        }
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.cfg.max_streams - self.streams.available_permits()
    }

    /// Opens a stream for `who`, resuming after `last_event_id` if given.
    pub async fn stream(
        &self,
        db: &Db,
        who: Who,
        last_event_id: Option<i64>,
    ) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>, ApiError> {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                ErrorCode::TooManyStreams,
                "too many live streams are open; retry in a moment",
            )
        })?;
        // Subscribe before reading the position: a wake for anything after it is not missed.
        let wakes = self.wake.subscribe();
        let (position, resync) = db.read(move |c| start_position(c, last_event_id)).await?;
        let (tx, rx) = mpsc::channel::<Event>(CHANNEL);
        let mut first = vec![
            Event::default()
                .event("ready")
                .data(json!({ "last_event_id": position }).to_string()),
        ];
        if resync {
            first.push(
                Event::default()
                    .event("resync")
                    .id(position.to_string())
                    .data(
                        json!({ "reason": "events after your last id are no longer kept; reload" })
                            .to_string(),
                    ),
            );
        }
        for e in first {
            let _ = tx.try_send(e);
        }
        tokio::spawn(produce(
            db.clone(),
            who,
            position,
            wakes,
            tx,
            self.shutdown.clone(),
        ));
        let stream = Held {
            rx,
            _permit: permit,
        };
        Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(self.keep_alive)))
    }
}

/// The stream handed to axum: the channel's receiving end, holding the stream's permit until
/// the connection goes.
struct Held {
    rx: mpsc::Receiver<Event>,
    _permit: OwnedSemaphorePermit,
}

impl Stream for Held {
    type Item = Result<Event, Infallible>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|o| o.map(Ok))
    }
}

/// Reads the log after `position` and feeds the stream, until the client goes, is too slow, or
/// the relay shuts down.
async fn produce(
    db: Db,
    who: Who,
    mut position: i64,
    mut wakes: broadcast::Receiver<Wake>,
    tx: mpsc::Sender<Event>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let rows = match db.read(move |c| read_after(c, who, position, BATCH)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "event stream read failed; closing the stream");
                return;
            }
        };
        let full = rows.len() == BATCH;
        for r in rows {
            position = r.id;
            let e = Event::default()
                .id(r.id.to_string())
                .event(r.kind)
                .data(r.payload);
            match tokio::time::timeout(SLOW_CONSUMER, tx.send(e)).await {
                Ok(Ok(())) => {}
                // The connection is gone.
                Ok(Err(_)) => return,
                Err(_) => {
                    tracing::info!("dropping a live stream whose client does not read");
                    return;
                }
            }
        }
        if full {
            continue;
        }
        // Caught up: wait for a wake that concerns this stream.
        loop {
            tokio::select! {
                w = wakes.recv() => match w {
                    Ok(w) if who.woken_by(&w) => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Prunes the log once a minute (see `prune`).
pub async fn run_pruner(db: Db, cfg: EventsConfig, mut shutdown: watch::Receiver<bool>) {
    let max_age_ms = (cfg.retention_hours * 3_600_000) as i64;
    loop {
        let rows = cfg.retention_rows;
        match db
            .write(move |c| prune(c, now_ms(), max_age_ms, rows))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "event log pruned"),
            Err(e) => tracing::warn!(error = %e, "event log prune failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Parses a `Last-Event-ID` header: absent or empty → `None`; anything not a number → 400.
pub fn last_event_id(headers: &axum::http::HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let s = v.to_str().unwrap_or("x").trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .map(Some)
        .ok_or_else(|| ApiError::validation("Last-Event-ID", "must be an event id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        (dir, db)
    }

    #[test]
    fn resume_positions_and_resync_after_pruning() {
        let (_d, db) = db();
        let u = UserId::new_v7();
        db.run_sync(|c| {
            assert_eq!(start_position(c, None)?, (0, false));
            for i in 0..10 {
                emit(c, Audience::Operators, u, "k", &json!({ "i": i }))?;
            }
            assert_eq!(start_position(c, None)?, (10, false));
            assert_eq!(start_position(c, Some(3))?, (3, false));
            // Beyond the newest id (a restored database): resync.
            assert_eq!(start_position(c, Some(11))?, (10, true));
            // Keep 4 rows: ids 1..=6 go.
            assert_eq!(prune(c, now_ms(), i64::MAX / 2, 4)?, 6);
            assert_eq!(start_position(c, Some(3))?, (10, true));
            assert_eq!(start_position(c, Some(6))?, (6, false));
            let rows = read_after(c, Who::Operators, 6, BATCH)?;
            assert_eq!(
                rows.iter().map(|r| r.id).collect::<Vec<_>>(),
                vec![7, 8, 9, 10]
            );
            // Ids are never reused after pruning everything.
            prune(c, now_ms() + 1_000, 0, 100)?;
            emit(c, Audience::User, u, "k", &json!({}))?;
            assert_eq!(newest_id(c)?, 11);
            assert!(read_after(c, Who::Operators, 0, BATCH)?.is_empty());
            assert_eq!(read_after(c, Who::User(u), 0, BATCH)?.len(), 1);
            assert!(read_after(c, Who::User(UserId::new_v7()), 0, BATCH)?.is_empty());
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn last_event_id_header() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(last_event_id(&h).unwrap(), None);
        h.insert("last-event-id", "42".parse().unwrap());
        assert_eq!(last_event_id(&h).unwrap(), Some(42));
        h.insert("last-event-id", "x".parse().unwrap());
        assert!(last_event_id(&h).is_err());
    }
}
