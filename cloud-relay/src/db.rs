//! The relay's SQLite database: opening it safely, the schema and its migrations, and the one
//! writer through which every statement runs.
//!
//! The database is the source of truth for accounts, profiles, the points ledger, match history
//! and the outbox. WAL with `synchronous=FULL`: a commit that returned is on disk. All access
//! goes through `Db::run`, which takes the single connection on a blocking thread, so async
//! tasks never block the runtime and writes are serialised (one writer).

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::ApiError;

/// Ordered, append-only. Each entry runs once, in a transaction, and bumps `user_version`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE accounts (
    user_id       TEXT PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'operator')),
    created_ms    INTEGER NOT NULL,
    withdrawn_ms  INTEGER,
    -- Cached sum of the ledger (grants - charges); checked against the entries by tests.
    balance       INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0)
) STRICT;

CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES accounts(user_id),
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX sessions_user ON sessions(user_id);

CREATE TABLE profiles (
    user_id           TEXT PRIMARY KEY REFERENCES accounts(user_id),
    -- Bumped by every change to this user's place in the matchable pool (= outbox version).
    version           INTEGER NOT NULL,
    nickname          TEXT NOT NULL,
    gender            TEXT NOT NULL,
    age               INTEGER NOT NULL,
    mbti              TEXT NOT NULL,
    hobbies           INTEGER NOT NULL,
    contact_frequency TEXT NOT NULL,
    major             TEXT NOT NULL,
    song              TEXT NOT NULL,
    comment           TEXT NOT NULL,
    contact_kind      TEXT NOT NULL,
    contact_handle    TEXT NOT NULL,
    dont_pick_me      INTEGER NOT NULL,
    picked_count      INTEGER NOT NULL DEFAULT 0,
    -- 1 while replicated to appliances: has a profile, not withdrawn, below the pick cap.
    in_pool           INTEGER NOT NULL DEFAULT 1,
    updated_ms        INTEGER NOT NULL
) STRICT;

-- Append-only. A hold is not an entry: only its settlement as a charge is.
CREATE TABLE ledger_entries (
    entry_id   INTEGER PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES accounts(user_id),
    kind       TEXT NOT NULL CHECK (kind IN ('grant', 'charge')),
    amount     INTEGER NOT NULL CHECK (amount > 0),
    reason     TEXT NOT NULL,
    hold_id    TEXT UNIQUE,
    created_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX ledger_user ON ledger_entries(user_id);

CREATE TABLE holds (
    hold_id     TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES accounts(user_id),
    amount      INTEGER NOT NULL CHECK (amount > 0),
    state       TEXT NOT NULL CHECK (state IN ('reserved', 'charged', 'voided')),
    deadline_ms INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL,
    settled_ms  INTEGER
) STRICT;
CREATE INDEX holds_open ON holds(state, deadline_ms);
CREATE INDEX holds_user ON holds(user_id, state);

CREATE TABLE match_requests (
    user_id         TEXT NOT NULL REFERENCES accounts(user_id),
    idempotency_key TEXT NOT NULL,
    body_hash       TEXT NOT NULL,
    request_id      TEXT NOT NULL UNIQUE,
    hold_id         TEXT NOT NULL REFERENCES holds(hold_id),
    state           TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    response_status INTEGER,
    response_body   TEXT,
    created_ms      INTEGER NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
) STRICT;

CREATE TABLE matches (
    match_id     TEXT PRIMARY KEY,
    requester_id TEXT NOT NULL REFERENCES accounts(user_id),
    partner_id   TEXT NOT NULL REFERENCES accounts(user_id),
    -- The unordered pair: B may not draw A after A drew B.
    pair_lo      TEXT NOT NULL,
    pair_hi      TEXT NOT NULL,
    request_id   TEXT NOT NULL UNIQUE,
    cost         INTEGER NOT NULL,
    refunded     INTEGER NOT NULL,
    relaxed      TEXT NOT NULL,
    created_ms   INTEGER NOT NULL,
    UNIQUE (pair_lo, pair_hi),
    CHECK (pair_lo < pair_hi)
) STRICT;
CREATE INDEX matches_requester ON matches(requester_id, created_ms);
CREATE INDEX matches_partner ON matches(partner_id);

-- Every change to the matchable pool, in order. `seq` is gap-free (assigned from
-- meta.last_seq inside the writing transaction).
CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY,
    user_id    TEXT NOT NULL,
    version    INTEGER NOT NULL,
    op         TEXT NOT NULL CHECK (op IN ('upsert', 'delete')),
    features   BLOB,
    created_ms INTEGER NOT NULL
) STRICT;
"#,
    r#"
-- Each appliance's last reported position (from its hellos).
CREATE TABLE appliances (
    appliance_id  TEXT PRIMARY KEY,
    epoch         TEXT,
    applied_seq   INTEGER NOT NULL,
    count         INTEGER NOT NULL,
    digest        TEXT NOT NULL,
    epoch_matches INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    last_action   TEXT NOT NULL
) STRICT;
"#,
];

#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Db {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Db, rusqlite::Error> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on a blocking thread.
    pub async fn run<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, ApiError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| ApiError::internal(format!("database task failed: {e}")))?
    }

    /// Runs `f` synchronously (CLI commands, tests).
    pub fn run_sync<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), rusqlite::Error> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        if i == 0 {
            // A new database starts a new lineage.
            let epoch: u64 = rand::random::<u64>() | 1;
            tx.execute(
                "INSERT INTO meta(key, value) VALUES ('epoch', ?1), ('last_seq', '0'), ('published_upto', '0')",
                params![epoch.to_string()],
            )?;
        }
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// Gives the database a new random lineage id (after a restore from backup). The outbox and its
/// seqs stay; appliances compare epochs first, so they take a snapshot.
pub fn renew_epoch(conn: &mut Connection) -> Result<u64, ApiError> {
    let epoch: u64 = rand::random::<u64>() | 1;
    meta_set(conn, "epoch", &epoch.to_string())?;
    Ok(epoch)
}

pub fn meta_get(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

pub fn meta_u64(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    Ok(meta_get(conn, key)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

pub fn meta_set(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_keeps_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let epoch = |db: &Db| db.run_sync(|c| Ok(meta_get(c, "epoch")?)).unwrap().unwrap();
        let first = epoch(&Db::open(&path).unwrap());
        let second = epoch(&Db::open(&path).unwrap());
        assert_eq!(first, second);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            first,
            epoch(&Db::open(&other.path().join("relay.db")).unwrap())
        );
    }
}
