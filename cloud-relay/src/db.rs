//! The relay's SQLite database: opening it safely, the schema and its migrations, the one
//! writer through which every change runs, and a small pool of read-only connections.
//!
//! The database is the source of truth for accounts, profiles, the points ledger, match history
//! and the outbox. WAL with `synchronous=FULL`: a commit that returned is on disk. Three ways in,
//! all on blocking threads so async tasks never block the runtime:
//!
//! * `Db::run` — the single writer connection, exclusively: the closure may open its own
//!   transaction (`c.transaction()`). Writes are serialised (one writer).
//! * `Db::write` — the same writer, with **group commit**: calls that arrive while the writer is
//!   busy are run back to back inside one transaction, each in its own savepoint (an `Err` rolls
//!   back only that call's changes), and committed together with one fsync. Every call returns
//!   only after the commit that holds its changes is on disk, so "a 2xx is durable" holds exactly
//!   as with `run`. A lone call is a group of one.
//! * `Db::write_early` — `write`, handing the closure's result over before the commit's fsync
//!   (the commit's outcome follows): the match flow sends its request while the hold commits. The closure must not call
//!   `c.transaction()` (there may be one open already): use `c.savepoint()`, which works both
//!   alone and inside a group.
//! * `Db::read` — a pooled read-only connection (`query_only`), in one read transaction (one
//!   consistent snapshot). WAL readers never wait for the writer and see only committed data.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

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
    r#"
-- Personal data has an end (issue 14): set when an account's personal fields were erased, by
-- withdrawal or by `admin purge`. An erased profile keeps its row (version, pool features, pick
-- count) so versions never go backwards and the report keeps its counts.
ALTER TABLE accounts ADD COLUMN erased_ms INTEGER;
ALTER TABLE profiles ADD COLUMN erased_ms INTEGER;
"#,
    r#"
-- The booth's charge requests (issue 10). A student asks for points (amount + the name on the
-- transfer or receipt); an operator approves (one ledger grant, same transaction) or rejects;
-- the student may cancel while it is pending. A decision is a conditional update from
-- 'pending', so it happens once.
CREATE TABLE charges (
    charge_id   TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES accounts(user_id),
    amount      INTEGER NOT NULL CHECK (amount > 0),
    depositor   TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'cancelled')),
    created_ms  INTEGER NOT NULL,
    decided_ms  INTEGER,
    operator_id TEXT REFERENCES accounts(user_id),
    reason      TEXT
) STRICT;
-- At most one pending request per student, enforced by the database itself.
CREATE UNIQUE INDEX charges_one_pending ON charges(user_id) WHERE status = 'pending';
CREATE INDEX charges_user ON charges(user_id, charge_id);
CREATE INDEX charges_status ON charges(status, charge_id);

-- Who granted, and for which charge request (each request credits at most once).
ALTER TABLE ledger_entries ADD COLUMN operator_id TEXT;
ALTER TABLE ledger_entries ADD COLUMN charge_id TEXT;
CREATE UNIQUE INDEX ledger_charge ON ledger_entries(charge_id) WHERE charge_id IS NOT NULL;

-- The live events' log (SSE): streams replay from here after `Last-Event-ID`. AUTOINCREMENT
-- so that an id is never reused after pruning. `user_id` is the student the event is about
-- (erasure deletes them); `audience` says who may see it.
CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    audience   TEXT NOT NULL CHECK (audience IN ('operators', 'user')),
    user_id    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX events_user ON events(user_id, audience, id);
CREATE INDEX events_audience ON events(audience, id);
"#,
];

/// The schema version this build writes (`PRAGMA user_version` after every migration ran).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Read-only connections, and reads running at once (more would only add threads and page
/// caches on a small box: reads take microseconds).
const READERS: usize = 4;
/// Most calls committed together by one group commit.
const GROUP_MAX: usize = 256;

/// A `Db::write` call waiting for the writer: runs its closure (returning whether it succeeded)
/// and hands back the delivery of its result, which waits for the group's commit.
type GroupJob = Box<dyn FnOnce(&mut Connection) -> (bool, Deliver) + Send>;
/// Delivers a call's result once its group's commit is known (`Some(error)` if it failed).
type Deliver = Box<dyn FnOnce(Option<ApiError>) + Send>;

#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
    queue: Arc<Mutex<WriteQueue>>,
    readers: Arc<ReadPool>,
}

/// Whether the changes of a [`Db::write_early`] call were committed (on disk).
pub struct Committed(oneshot::Receiver<Option<ApiError>>);

impl Committed {
    pub async fn wait(self) -> Result<(), ApiError> {
        match self.0.await {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(e),
            Err(_) => Err(ApiError::internal("database write was dropped")),
        }
    }
}

/// `Db::write` calls not yet taken by a group, and whether a blocking task is already taking
/// them (at most one is: it drains the queue group by group, then ends).
#[derive(Default)]
struct WriteQueue {
    jobs: Vec<GroupJob>,
    leader: bool,
}

/// A leader's turn. If the leader unwinds before ending its turn normally, the calls still
/// queued are dropped (their callers get an error instead of waiting for a leader that is gone)
/// and the next call starts a new leader.
struct LeaderTurn {
    queue: Arc<Mutex<WriteQueue>>,
    ended: bool,
}

impl Drop for LeaderTurn {
    fn drop(&mut self) {
        if !self.ended {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.leader = false;
            q.jobs.clear();
        }
    }
}

struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl ReadPool {
    fn take(&self) -> rusqlite::Result<Connection> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(c);
        }
        let c = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        c.busy_timeout(std::time::Duration::from_secs(10))?;
        c.pragma_update(None, "query_only", "ON")?;
        secure_delete(&c)?;
        stable_plans(&c)?;
        Ok(c)
    }

    fn give_back(&self, c: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < READERS {
            idle.push(c);
        }
    }
}

/// `execute` and `query_row` through the connection's statement cache. Parsing a statement
/// costs more than running it on the match path (about 20 statements per match; re-preparing
/// was ~20 % of the relay's CPU in the load profile), so the hot paths use these.
pub trait Cached {
    fn exec_cached<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec_cached<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// Turns on SQLite's query planner stability guarantee. Without it, binding a new value to a
/// parameter of a join (the session lookup on every request, the pair checks of every match)
/// marks the cached statement expired, so every call re-parsed and re-planned it: 7 % of the
/// relay's CPU under load. Plans here never depend on parameter values (no ANALYZE data, no
/// LIKE on parameters), so nothing is lost.
fn stable_plans(c: &Connection) -> rusqlite::Result<()> {
    c.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// Overwrites deleted and replaced content with zeros instead of leaving it readable in free
/// space: an erased contact handle must not survive in the file (issue 14). Per connection;
/// on the read-only ones it changes nothing, and is set so that every relay connection is alike.
pub fn secure_delete(c: &Connection) -> rusqlite::Result<()> {
    c.pragma_update(None, "secure_delete", "ON")
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
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        secure_delete(&conn)?;
        conn.set_prepared_statement_cache_capacity(64);
        stable_plans(&conn)?;
        migrate(&mut conn)?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
            queue: Arc::new(Mutex::new(WriteQueue::default())),
            readers: Arc::new(ReadPool {
                path: path.to_path_buf(),
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(tokio::sync::Semaphore::new(READERS)),
            }),
        })
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.readers.path
    }

    /// Runs `f` with the writer connection, exclusively, on a blocking thread.
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

    /// Runs `f` with the writer connection, possibly grouped with other `write` calls into one
    /// transaction and one fsync (see the module comment). Returns once `f`'s changes are
    /// committed to disk; an `Err` from `f` rolls back `f`'s changes only. `f` must not call
    /// `c.transaction()`; `c.savepoint()` is fine.
    pub async fn write<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, ApiError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, ApiError>>();
        let job: GroupJob = Box::new(move |c: &mut Connection| {
            let result = f(c);
            let ok = result.is_ok();
            let deliver: Deliver = Box::new(move |commit_error: Option<ApiError>| {
                let _ = tx.send(match commit_error {
                    Some(e) if ok => Err(e),
                    _ => result,
                });
            });
            (ok, deliver)
        });
        self.enqueue(job);
        rx.await
            .unwrap_or_else(|_| Err(ApiError::internal("database write was dropped")))
    }

    /// `write`, except that `f`'s result is handed over as soon as `f` has run — its changes
    /// are in the open transaction, not yet committed — and [`Committed`] then tells whether
    /// they reached the disk. For a caller with work to start that needs nothing durable yet:
    /// the match request goes to the broker while its hold commits (issue 16), and nothing is
    /// charged or answered before the commit is known. An `Err` from `f` is returned at once,
    /// with nothing of it committed.
    pub async fn write_early<T, F>(&self, f: F) -> Result<(T, Committed), ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, ApiError> + Send + 'static,
    {
        let (early_tx, early_rx) = oneshot::channel::<Result<T, ApiError>>();
        let (commit_tx, commit_rx) = oneshot::channel::<Option<ApiError>>();
        let job: GroupJob = Box::new(move |c: &mut Connection| {
            let result = f(c);
            let ok = result.is_ok();
            let _ = early_tx.send(result);
            let deliver: Deliver = Box::new(move |commit_error: Option<ApiError>| {
                let _ = commit_tx.send(commit_error);
            });
            (ok, deliver)
        });
        self.enqueue(job);
        let value = early_rx
            .await
            .unwrap_or_else(|_| Err(ApiError::internal("database write was dropped")))?;
        Ok((value, Committed(commit_rx)))
    }

    /// Queues a job for the writer, starting a leader when none is taking jobs.
    fn enqueue(&self, job: GroupJob) {
        let start_leader = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.jobs.push(job);
            !std::mem::replace(&mut q.leader, true)
        };
        if start_leader {
            let conn = self.conn.clone();
            let queue = self.queue.clone();
            tokio::task::spawn_blocking(move || {
                let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
                let mut turn = LeaderTurn {
                    queue,
                    ended: false,
                };
                loop {
                    let jobs: Vec<GroupJob> = {
                        let mut q = turn.queue.lock().unwrap_or_else(|p| p.into_inner());
                        if q.jobs.is_empty() {
                            // Under the queue's lock: a call queued after this starts a leader.
                            q.leader = false;
                            turn.ended = true;
                            return;
                        }
                        let n = q.jobs.len().min(GROUP_MAX);
                        q.jobs.drain(..n).collect()
                    };
                    run_group(&mut guard, jobs);
                }
            });
        }
    }

    /// Runs `f` on a pooled read-only connection inside one read transaction (a consistent
    /// snapshot of committed data), on a blocking thread. Never waits for the writer.
    pub async fn read<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, ApiError> + Send + 'static,
    {
        let readers = self.readers.clone();
        let permit = readers
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("database readers closed"))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut conn = readers.take()?;
            let result = match conn.transaction() {
                Ok(tx) => {
                    let r = f(&tx);
                    // A read transaction: rolling back ends it and changes nothing.
                    drop(tx);
                    r
                }
                Err(e) => Err(e.into()),
            };
            if conn.is_autocommit() {
                readers.give_back(conn);
            }
            result
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

/// Runs one job, containing a panic (the caller then gets an error: its result is dropped).
fn run_job(conn: &mut Connection, job: GroupJob) -> (bool, Option<Deliver>) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn))) {
        Ok((ok, deliver)) => (ok, Some(deliver)),
        Err(_) => (false, None),
    }
}

/// Runs queued `write` jobs in one transaction, each in its own savepoint, then one commit (a
/// lone job too: its result may be handed over early, before the commit, by `write_early`).
/// Results are delivered only after the commit.
fn run_group(conn: &mut Connection, jobs: Vec<GroupJob>) {
    if !conn.is_autocommit() {
        for job in jobs {
            if let (_, Some(deliver)) = run_job(conn, job) {
                deliver(None);
            }
        }
        return;
    }
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        if conn.execute_batch("BEGIN IMMEDIATE").is_err() {
            // The write lock stayed busy (another process): run the rest one by one.
            for job in jobs {
                if let (_, Some(deliver)) = run_job(conn, job) {
                    deliver(None);
                }
            }
            return;
        }
        let mut done: Vec<Deliver> = Vec::new();
        let mut lost = false;
        for job in jobs.by_ref() {
            if conn.exec_cached("SAVEPOINT group_call", []).is_err() {
                // Cannot isolate this call: it is dropped unrun (its caller gets an error).
                lost = true;
                break;
            }
            let (ok, deliver) = run_job(conn, job);
            done.extend(deliver);
            let end = if ok {
                conn.exec_cached("RELEASE group_call", []).map(|_| ())
            } else {
                conn.execute_batch("ROLLBACK TO group_call; RELEASE group_call")
            };
            if end.is_err() || conn.is_autocommit() {
                // SQLite ended the whole transaction (an I/O error, say): everything in it so
                // far is gone. The jobs not yet run start a new one.
                lost = true;
                break;
            }
        }
        let failure = if lost {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            Some(ApiError::internal(
                "a grouped database transaction was rolled back",
            ))
        } else {
            match conn.execute_batch("COMMIT") {
                Ok(()) => None,
                Err(e) => {
                    if !conn.is_autocommit() {
                        let _ = conn.execute_batch("ROLLBACK");
                    }
                    Some(ApiError::from(e))
                }
            }
        };
        for deliver in done {
            deliver(failure.clone());
        }
    }
}

/// Brings an older database up to `SCHEMA_VERSION` (restore uses it on a copy).
pub fn migrate(conn: &mut Connection) -> Result<(), rusqlite::Error> {
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

    /// A cached join is planned once: binding new values must not expire it (it did, on every
    /// call, for the session lookup and the match path's pair checks, until QPSG was on).
    #[tokio::test]
    async fn cached_joins_are_not_re_prepared() {
        const JOIN: &str = "SELECT a.user_id FROM sessions s JOIN accounts a ON a.user_id = s.user_id \
                            WHERE s.token_hash = ?1 AND s.expires_ms > ?2";
        fn lookup(c: &Connection, i: i64) -> Result<i32, ApiError> {
            let mut st = c.prepare_cached(JOIN)?;
            let _: Option<String> = st
                .query_row(rusqlite::params![format!("t{i}"), i], |r| r.get(0))
                .optional()?;
            Ok(st.get_status(rusqlite::StatementStatus::RePrepare))
        }
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        for i in 0..5 {
            assert_eq!(
                db.run_sync(|c| lookup(c, i)).unwrap(),
                0,
                "writer, call {i}"
            );
            assert_eq!(
                db.read(move |c| lookup(c, i)).await.unwrap(),
                0,
                "reader, call {i}"
            );
        }
    }

    /// Many concurrent `write` calls (so several groups form): each `Ok` call's row is there,
    /// each `Err` call's row is not (its savepoint rolled back, its group-mates unaffected),
    /// and a read after a write sees it.
    /// `write_early` hands the closure's result over before the commit, and its `Committed`
    /// reports the commit: here a deferred foreign key that only COMMIT checks makes it fail,
    /// and then nothing of the call is in the database.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_early_hands_over_first_and_reports_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        db.run(|c| {
            c.execute_batch(
                "CREATE TABLE parent(id INTEGER PRIMARY KEY);
                 CREATE TABLE child(id INTEGER PRIMARY KEY,
                     parent INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);",
            )?;
            Ok(())
        })
        .await
        .unwrap();
        let insert = |parent: i64, with_parent: bool| {
            move |c: &mut Connection| {
                let sp = c.savepoint()?;
                if with_parent {
                    sp.execute("INSERT INTO parent(id) VALUES (?1)", [parent])?;
                }
                sp.execute("INSERT INTO child(parent) VALUES (?1)", [parent])?;
                sp.commit()?;
                Ok(parent * 10)
            }
        };
        let count = |db: Db| async move {
            db.read(|c| Ok(c.query_row("SELECT COUNT(*) FROM child", [], |r| r.get::<_, i64>(0))?))
                .await
                .unwrap()
        };

        let (v, committed) = db.write_early(insert(1, true)).await.unwrap();
        assert_eq!(v, 10, "the result comes before the commit");
        committed.wait().await.unwrap();
        assert_eq!(
            count(db.clone()).await,
            1,
            "committed once the commit says so"
        );

        // The statement succeeds (the key is deferred); COMMIT refuses it.
        let (v, committed) = db.write_early(insert(2, false)).await.unwrap();
        assert_eq!(v, 20);
        let e = committed.wait().await.expect_err("the commit fails");
        assert!(e.to_string().to_lowercase().contains("foreign key"), "{e}");
        assert_eq!(
            count(db.clone()).await,
            1,
            "nothing of a failed commit remains"
        );

        // An Err from the closure comes back at once, nothing written; the writer goes on.
        let r = db
            .write_early(|_c: &mut Connection| Err::<i64, _>(ApiError::internal("refused")))
            .await;
        assert!(r.is_err());
        db.write(insert(3, true)).await.unwrap();
        assert_eq!(count(db.clone()).await, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn grouped_writes_keep_each_call_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        let tasks: Vec<_> = (0..200i64)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(async move {
                    db.write(move |c| {
                        let sp = c.savepoint()?;
                        sp.execute(
                            "INSERT INTO meta(key, value) VALUES (?1, 'x')",
                            [format!("k{i}")],
                        )?;
                        if i % 7 == 3 {
                            return Err(ApiError::internal("refused"));
                        }
                        sp.commit()?;
                        Ok(i)
                    })
                    .await
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap();
            assert_eq!(r.is_ok(), i % 7 != 3, "call {i}: {r:?}");
        }
        let n: i64 = db
            .read(|c| {
                Ok(
                    c.query_row("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'", [], |r| {
                        r.get(0)
                    })?,
                )
            })
            .await
            .unwrap();
        assert_eq!(n, (0..200).filter(|i| i % 7 != 3).count() as i64);
        db.write(|c| {
            c.execute("INSERT INTO meta(key, value) VALUES ('after', 'y')", [])?;
            Ok(())
        })
        .await
        .unwrap();
        let v = db.read(|c| Ok(meta_get(c, "after")?)).await.unwrap();
        assert_eq!(v.as_deref(), Some("y"));
        // The writer is left outside any transaction: `run` may open its own.
        db.run(|c| {
            let tx = c.transaction()?;
            tx.commit()?;
            Ok(())
        })
        .await
        .unwrap();
    }
}
