//! Online backups of the relay's database, and restoring one (issue 14).
//!
//! **Backup** (`comatching-relay backup --to DIR [--keep N]`), safe while the relay serves:
//! 1. `VACUUM INTO` a temp file named `.relay-….db.partial` in DIR. It reads one consistent
//!    snapshot in a single WAL read transaction, which never blocks the relay's writer (see
//!    `docs/bench/backup.md` for the measured pauses and why not the page-stepping backup API);
//! 2. on the copy: rollback journal (a standalone file), `backup_taken_ms` in its meta,
//!    `PRAGMA integrity_check`, `ledger::audit`, and the summary (epoch, outbox seq, users,
//!    balance total);
//! 3. fsync the file, rename it to `relay-<UTC time>-<epoch>-<outbox seq>.db`, fsync DIR;
//! 4. `--keep N`: delete the oldest files *of that name pattern* beyond N (`beyond_keep`).
//!
//! A failed backup removes its temp file; a killed one leaves a `.partial` name that never
//! looks complete and that the next backup into DIR removes (under DIR's `.backup.lock`).
//!
//! **Restore** (`comatching-relay restore FILE`), with the relay stopped (the data dir's lock):
//! integrity check of FILE, `VACUUM INTO` a temp file in the data dir, schema check (older is
//! migrated, newer refused), audit, a new epoch (`db::renew_epoch`), then the current database
//! (with its WAL) is *renamed* aside and the copy renamed into place. Nothing is deleted.
//! Anything that fails before the rename leaves the data dir as it was.
//!
//! The name, retention and report logic are pure functions; the rest is the file shell.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use time::OffsetDateTime;
use time::macros::format_description;

use crate::datadir::{self, LockError};
use crate::db::{self, SCHEMA_VERSION, meta_get, meta_set, meta_u64, now_ms};
use crate::ledger;

pub const NAME_PREFIX: &str = "relay-";
pub const NAME_SUFFIX: &str = ".db";
const PARTIAL_SUFFIX: &str = ".partial";
const BACKUP_LOCK: &str = ".backup.lock";

/// What a backup file's name says: `relay-<UTC time>-<epoch>-<outbox seq>.db`, e.g.
/// `relay-20261202T145918.123Z-1f2e3d4c5b6a7980-4711.db`. The fixed-width time comes first, so
/// names sort by age.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupName {
    pub taken_ms: i64,
    pub epoch: u64,
    pub outbox_seq: u64,
}

const NAME_TIME: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year][month][day]T[hour][minute][second].[subsecond digits:3]Z");
const HUMAN_TIME: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");

fn utc(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

/// `2026-12-02 14:59:18 UTC` (or the raw number if out of range).
pub fn human_time(ms: i64) -> String {
    utc(ms)
        .and_then(|t| t.format(HUMAN_TIME).ok())
        .unwrap_or_else(|| format!("{ms} ms since 1970"))
}

impl BackupName {
    pub fn file_name(&self) -> String {
        let time = utc(self.taken_ms)
            .and_then(|t| t.format(NAME_TIME).ok())
            .unwrap_or_else(|| "00000000T000000.000Z".into());
        format!(
            "{NAME_PREFIX}{time}-{:016x}-{}{NAME_SUFFIX}",
            self.epoch, self.outbox_seq
        )
    }

    /// The inverse of `file_name`; `None` for any other name (retention never touches those).
    pub fn parse(name: &str) -> Option<BackupName> {
        let rest = name.strip_prefix(NAME_PREFIX)?.strip_suffix(NAME_SUFFIX)?;
        let mut parts = rest.splitn(3, '-');
        let (time, epoch, seq) = (parts.next()?, parts.next()?, parts.next()?);
        let t = time::PrimitiveDateTime::parse(time, NAME_TIME)
            .ok()?
            .assume_utc();
        if epoch.len() != 16 || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let parsed = BackupName {
            taken_ms: i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()?,
            epoch: u64::from_str_radix(epoch, 16).ok()?,
            outbox_seq: seq.parse().ok()?,
        };
        // Only canonical spellings: the name we would write for these values.
        (parsed.file_name() == name).then_some(parsed)
    }
}

/// The backup files to delete so that the newest `keep` remain. Names that are not backups are
/// ignored; order is by the time in the name, then by name.
pub fn beyond_keep(names: &[String], keep: usize) -> Vec<String> {
    let mut backups: Vec<(i64, &String)> = names
        .iter()
        .filter_map(|n| BackupName::parse(n).map(|b| (b.taken_ms, n)))
        .collect();
    backups.sort_by(|a, b| b.cmp(a));
    backups
        .into_iter()
        .skip(keep)
        .map(|(_, n)| n.clone())
        .collect()
}

/// What a relay database holds, in numbers an operator can compare.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// The lineage, as `admin new-epoch` and the appliances' status pages print it (hex).
    pub epoch: String,
    pub outbox_seq: u64,
    /// Accounts not withdrawn.
    pub users: i64,
    /// Sum of every account's balance (withdrawn ones too: the ledger keeps their points).
    pub balance_total: i64,
    pub matches: i64,
    pub schema_version: i64,
    /// The newest timestamp written anywhere (account, profile, ledger entry, hold, match).
    pub last_change_ms: Option<i64>,
}

pub fn summarize(c: &Connection) -> rusqlite::Result<Summary> {
    let n = |sql: &str| c.query_row(sql, [], |r| r.get::<_, Option<i64>>(0));
    Ok(Summary {
        epoch: format!("{:016x}", meta_u64(c, "epoch")?),
        outbox_seq: meta_u64(c, "last_seq")?,
        users: n("SELECT COUNT(*) FROM accounts WHERE withdrawn_ms IS NULL")?.unwrap_or(0),
        balance_total: n("SELECT COALESCE(SUM(balance), 0) FROM accounts")?.unwrap_or(0),
        matches: n("SELECT COUNT(*) FROM matches")?.unwrap_or(0),
        schema_version: c.pragma_query_value(None, "user_version", |r| r.get(0))?,
        last_change_ms: n("SELECT MAX(t) FROM (\
                SELECT MAX(created_ms) AS t FROM accounts UNION ALL \
                SELECT MAX(updated_ms) FROM profiles UNION ALL \
                SELECT MAX(created_ms) FROM ledger_entries UNION ALL \
                SELECT MAX(created_ms) FROM holds UNION ALL \
                SELECT MAX(created_ms) FROM matches)")?,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("no relay database at {}", .0.display())]
    NoDatabase(PathBuf),
    #[error("another backup is writing into {}", .0.display())]
    Busy(PathBuf),
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("SQLite ({what}): {source}")]
    Sqlite {
        what: &'static str,
        source: rusqlite::Error,
    },
    #[error("the copy failed its check ({0}); nothing was published")]
    Check(String),
    #[error(transparent)]
    Serving(#[from] LockError),
    #[error("{} is not a relay database: {why}", .path.display())]
    NotRelay { path: PathBuf, why: String },
    #[error(
        "{} has schema version {found}, newer than this relay's {SCHEMA_VERSION}: restore it with the newer relay",
        .path.display()
    )]
    NewerSchema { path: PathBuf, found: i64 },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Io { what, path, source }
}

fn sql(what: &'static str) -> impl FnOnce(rusqlite::Error) -> BackupError {
    move |source| BackupError::Sqlite { what, source }
}

/// The one JSON line `backup` prints.
#[derive(Clone, Debug, Serialize)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub seconds: f64,
    pub taken_ms: i64,
    #[serde(flatten)]
    pub summary: Summary,
    /// Older backups removed by `--keep`.
    pub deleted: Vec<PathBuf>,
}

/// Removes a temp file (and any SQLite side file of it) unless disarmed.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    fn new(path: PathBuf) -> TempFile {
        let t = TempFile { path, armed: true };
        t.remove();
        t
    }

    fn remove(&self) {
        for suffix in ["", "-journal", "-wal", "-shm"] {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            let _ = fs::remove_file(PathBuf::from(p));
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            self.remove();
        }
    }
}

fn fsync_file(path: &Path) -> Result<(), BackupError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("fsync", path))
}

fn fsync_dir(dir: &Path) -> Result<(), BackupError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io("fsync directory", dir))
}

fn sqlite_string(path: &Path) -> Result<String, BackupError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| BackupError::NotRelay {
            path: path.to_path_buf(),
            why: "the path is not UTF-8".into(),
        })
}

/// `VACUUM INTO dest`: one consistent snapshot of `src` (one read transaction), compacted.
fn vacuum_into(src: &Connection, dest: &Path) -> Result<(), BackupError> {
    src.execute("VACUUM INTO ?1", [sqlite_string(dest)?])
        .map_err(sql("VACUUM INTO"))?;
    Ok(())
}

/// `PRAGMA integrity_check`: Ok only for the single row "ok".
fn integrity(c: &Connection) -> Result<(), String> {
    let mut st = c
        .prepare("PRAGMA integrity_check")
        .map_err(|e| e.to_string())?;
    let rows = st
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if rows == ["ok"] {
        Ok(())
    } else {
        Err(format!("integrity_check: {}", rows.join("; ")))
    }
}

/// Opens an existing database read-write, never creating one.
fn open_existing(path: &Path) -> Result<Connection, BackupError> {
    if !path.is_file() {
        return Err(BackupError::NoDatabase(path.to_path_buf()));
    }
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql("open"))?;
    c.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(sql("busy timeout"))?;
    Ok(c)
}

/// Takes a checked backup of the database at `db_path` into `to` (see the module comment).
pub fn backup(db_path: &Path, to: &Path, keep: Option<usize>) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    // Not `query_only`: SQLite refuses `VACUUM INTO` on such a connection. Nothing here writes
    // to the source.
    let src = open_existing(db_path)?;
    fs::create_dir_all(to).map_err(io("create", to))?;
    let lock_path = to.join(BACKUP_LOCK);
    let lock = File::create(&lock_path).map_err(io("create", &lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Err(BackupError::Busy(to.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => return Err(io("lock", &lock_path)(e)),
    }
    // Leftovers of killed backups: only ours can be running, and we hold the lock.
    for entry in fs::read_dir(to).map_err(io("list", to))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".relay-") && name.contains(PARTIAL_SUFFIX) {
            let _ = fs::remove_file(entry.path());
        }
    }
    let taken_ms = now_ms();
    let mut temp = TempFile::new(to.join(format!(
        ".{NAME_PREFIX}{taken_ms}-{}{NAME_SUFFIX}{PARTIAL_SUFFIX}",
        std::process::id()
    )));
    vacuum_into(&src, &temp.path)?;
    drop(src);
    let summary = {
        let copy = open_existing(&temp.path)?;
        copy.pragma_update(None, "journal_mode", "DELETE")
            .map_err(sql("journal_mode"))?;
        meta_set(&copy, "backup_taken_ms", &taken_ms.to_string()).map_err(sql("meta"))?;
        integrity(&copy).map_err(BackupError::Check)?;
        ledger::audit(&copy).map_err(|e| BackupError::Check(format!("ledger audit: {e}")))?;
        summarize(&copy).map_err(sql("summary"))?
    };
    fsync_file(&temp.path)?;
    let name = BackupName {
        taken_ms,
        epoch: u64::from_str_radix(&summary.epoch, 16).unwrap_or(0),
        outbox_seq: summary.outbox_seq,
    };
    let path = to.join(name.file_name());
    fs::rename(&temp.path, &path).map_err(io("rename into", &path))?;
    temp.armed = false;
    fsync_dir(to)?;
    let bytes = fs::metadata(&path).map_err(io("stat", &path))?.len();
    let mut deleted = Vec::new();
    if let Some(keep) = keep {
        let names: Vec<String> = fs::read_dir(to)
            .map_err(io("list", to))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for old in beyond_keep(&names, keep) {
            let p = to.join(&old);
            fs::remove_file(&p).map_err(io("delete old backup", &p))?;
            deleted.push(p);
        }
        if !deleted.is_empty() {
            fsync_dir(to)?;
        }
    }
    Ok(BackupReport {
        path,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
        taken_ms,
        summary,
        deleted,
    })
}

/// What `restore` did, for the operator.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub from: PathBuf,
    pub installed: PathBuf,
    /// The files of the database that was in place, renamed (never deleted).
    pub moved_aside: Vec<PathBuf>,
    /// When the backup was taken (written by `backup`), if the file says.
    pub taken_ms: Option<i64>,
    pub restored_epoch: String,
    pub schema_migrated_from: i64,
    /// What is in place now (with the new epoch).
    #[serde(flatten)]
    pub summary: Summary,
}

impl RestoreReport {
    /// The operator's text: what was restored, and what to tell students.
    pub fn explain(&self) -> String {
        let s = &self.summary;
        let cutoff = self.taken_ms.or(s.last_change_ms);
        let when = cutoff
            .map(human_time)
            .unwrap_or_else(|| "the time of the backup".into());
        let mut out = format!(
            "restored {} into {}\n",
            self.from.display(),
            self.installed.display()
        );
        match self.taken_ms {
            Some(t) => out.push_str(&format!("  backup taken:   {}\n", human_time(t))),
            None => out.push_str(&format!(
                "  backup taken:   unknown (not made by `comatching-relay backup`); last change recorded {}\n",
                s.last_change_ms.map(human_time).unwrap_or_else(|| "never".into())
            )),
        }
        out.push_str(&format!(
            "  contains:       {} users, {} points in balances, {} matches, outbox seq {}\n",
            s.users, s.balance_total, s.matches, s.outbox_seq
        ));
        if self.schema_migrated_from != s.schema_version {
            out.push_str(&format!(
                "  schema:         migrated from version {} to {}\n",
                self.schema_migrated_from, s.schema_version
            ));
        }
        out.push_str(&format!(
            "  new epoch:      {} (was {}): every appliance reloads a snapshot at its next hello\n",
            s.epoch, self.restored_epoch
        ));
        if self.moved_aside.is_empty() {
            out.push_str("  previous db:    none was in place\n");
        }
        for p in &self.moved_aside {
            out.push_str(&format!("  moved aside:    {} (kept)\n", p.display()));
        }
        out.push_str(&format!(
            "\nTell students: everything done after {when} is gone. Accounts created, profile changes,\n\
             points granted and matches made after that time no longer exist: sign up or edit the\n\
             profile again, show the booth receipt to have points granted again, and ask for a new\n\
             match (points charged for a lost match are back in the balance; nobody is charged twice).\n\
             A match request still open at that time was cancelled without a charge.\n"
        ));
        out
    }
}

/// Renames `db` and its side files to `<db>.replaced-<time>` (+ the same suffixes).
fn move_aside(db: &Path, at_ms: i64) -> Result<Vec<PathBuf>, BackupError> {
    let time = utc(at_ms)
        .and_then(|t| t.format(NAME_TIME).ok())
        .unwrap_or_else(|| at_ms.to_string());
    let mut aside = db.to_path_buf().into_os_string();
    aside.push(format!(".replaced-{time}"));
    let mut moved = Vec::new();
    // The main file last: until it moves, the database in place is still whole.
    for suffix in ["-wal", "-shm", "-journal", ""] {
        let mut from = db.to_path_buf().into_os_string();
        from.push(suffix);
        let from = PathBuf::from(from);
        if from.exists() {
            let mut to = aside.clone();
            to.push(suffix);
            let to = PathBuf::from(to);
            fs::rename(&from, &to).map_err(io("move aside", &from))?;
            moved.push(to);
        }
    }
    moved.reverse();
    Ok(moved)
}

/// Restores `file` as the relay database of `data_dir` (see the module comment).
pub fn restore(data_dir: &Path, file: &Path) -> Result<RestoreReport, BackupError> {
    let _lock = datadir::lock(data_dir)?;
    let src = {
        if !file.is_file() {
            return Err(BackupError::NoDatabase(file.to_path_buf()));
        }
        let c = Connection::open_with_flags(
            file,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql("open the backup"))?;
        let not_relay = |why: String| BackupError::NotRelay {
            path: file.to_path_buf(),
            why,
        };
        integrity(&c).map_err(not_relay)?;
        c
    };
    let installed = data_dir.join("relay.db");
    let mut temp = TempFile::new(data_dir.join(".relay.db.restoring"));
    vacuum_into(&src, &temp.path)?;
    drop(src);
    let (taken_ms, restored_epoch, schema_from, summary) = {
        let mut c = open_existing(&temp.path)?;
        c.pragma_update(None, "journal_mode", "DELETE")
            .map_err(sql("journal_mode"))?;
        db::secure_delete(&c).map_err(sql("secure_delete"))?;
        let found: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql("user_version"))?;
        let has_meta: Option<String> = c
            .query_row(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND name = 'meta'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("schema"))?;
        if found < 1 || has_meta.is_none() {
            return Err(BackupError::NotRelay {
                path: file.to_path_buf(),
                why: format!("schema version {found}, no meta table"),
            });
        }
        if found > SCHEMA_VERSION {
            return Err(BackupError::NewerSchema {
                path: file.to_path_buf(),
                found,
            });
        }
        db::migrate(&mut c).map_err(sql("migrate"))?;
        ledger::audit(&c).map_err(|e| BackupError::Check(format!("ledger audit: {e}")))?;
        let restored_epoch = format!("{:016x}", meta_u64(&c, "epoch").map_err(sql("meta"))?);
        let taken_ms = meta_get(&c, "backup_taken_ms")
            .map_err(sql("meta"))?
            .and_then(|v| v.parse().ok());
        db::renew_epoch(&mut c).map_err(|e| BackupError::Check(e.to_string()))?;
        meta_set(&c, "restored_from", &file.display().to_string()).map_err(sql("meta"))?;
        meta_set(&c, "restored_at_ms", &now_ms().to_string()).map_err(sql("meta"))?;
        integrity(&c).map_err(BackupError::Check)?;
        (
            taken_ms,
            restored_epoch,
            found,
            summarize(&c).map_err(sql("summary"))?,
        )
    };
    fsync_file(&temp.path)?;
    let moved_aside = move_aside(&installed, now_ms())?;
    fs::rename(&temp.path, &installed).map_err(io("install", &installed))?;
    temp.armed = false;
    fsync_dir(data_dir)?;
    Ok(RestoreReport {
        from: file.to_path_buf(),
        installed,
        moved_aside,
        taken_ms,
        restored_epoch,
        schema_migrated_from: schema_from,
        summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;
    use proptest::prelude::*;

    fn name(ms: i64, seq: u64) -> String {
        BackupName {
            taken_ms: ms,
            epoch: 0xabc,
            outbox_seq: seq,
        }
        .file_name()
    }

    #[test]
    fn names_say_when_which_lineage_and_how_far() {
        let n = BackupName {
            taken_ms: 1_796_223_558_123,
            epoch: 0x1f2e_3d4c_5b6a_7980,
            outbox_seq: 4711,
        };
        assert_eq!(
            n.file_name(),
            "relay-20261202T145918.123Z-1f2e3d4c5b6a7980-4711.db"
        );
        assert_eq!(BackupName::parse(&n.file_name()), Some(n));
        for other in [
            "relay.db",
            "relay-20261202T145918.123Z-1f2e3d4c5b6a7980-4711.db.partial",
            ".relay-1796223558123-77.db.partial",
            "relay-20261202T145918.123Z-1f2e-4711.db",
            "relay-20261202T145918.123Z-1f2e3d4c5b6a7980-+4711.db",
            "notes.txt",
        ] {
            assert_eq!(BackupName::parse(other), None, "{other}");
        }
    }

    proptest! {
        #[test]
        fn names_round_trip(ms in 0i64..4_102_444_800_000, epoch: u64, seq: u64) {
            let n = BackupName { taken_ms: ms, epoch, outbox_seq: seq };
            prop_assert_eq!(BackupName::parse(&n.file_name()), Some(n));
        }

        /// Retention keeps exactly the newest `keep` backups and never names anything else.
        #[test]
        fn retention_keeps_the_newest(times in proptest::collection::btree_set(0i64..4_000_000_000_000, 0..20),
                                       keep in 1usize..8, junk in proptest::collection::vec("[a-z.]{1,12}", 0..4)) {
            let mut names: Vec<String> = times.iter().map(|&t| name(t, 1)).collect();
            names.extend(junk.iter().cloned());
            let gone = beyond_keep(&names, keep);
            prop_assert_eq!(gone.len(), times.len().saturating_sub(keep));
            let newest: Vec<String> = times.iter().rev().take(keep).map(|&t| name(t, 1)).collect();
            for g in &gone {
                prop_assert!(BackupName::parse(g).is_some());
                prop_assert!(!newest.contains(g));
            }
        }
    }

    fn seeded(dir: &Path) -> PathBuf {
        let path = dir.join("data").join("relay.db");
        let db = Db::open(&path).unwrap();
        let user = comatching_protocol::UserId::new_v7();
        db.run_sync(|c| {
            c.execute(
                "INSERT INTO accounts(user_id, username, password_hash, created_ms) VALUES (?1, 'alice', 'x', 1)",
                [user.to_hex()],
            )?;
            ledger::grant(c, user, 5000, "booth")?;
            Ok(())
        })
        .unwrap();
        path
    }

    #[test]
    fn a_backup_is_checked_named_and_restorable() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = seeded(dir.path());
        let to = dir.path().join("backups");
        let first = backup(&db_path, &to, Some(1)).unwrap();
        assert_eq!(first.summary.users, 1);
        assert_eq!(first.summary.balance_total, 5000);
        let parsed = BackupName::parse(first.path.file_name().unwrap().to_str().unwrap()).unwrap();
        assert_eq!(parsed.outbox_seq, first.summary.outbox_seq);
        assert_eq!(format!("{:016x}", parsed.epoch), first.summary.epoch);
        // A standalone file: no WAL beside it, readable on its own.
        assert!(!to.join(format!("{}-wal", parsed.file_name())).exists());
        let second = backup(&db_path, &to, Some(1)).unwrap();
        assert_eq!(second.deleted, vec![first.path.clone()]);
        assert!(!first.path.exists() && second.path.exists());

        // Restore into the same data dir: the old db is moved aside, a new epoch starts.
        let data = db_path.parent().unwrap();
        let r = restore(data, &second.path).unwrap();
        assert_ne!(r.summary.epoch, r.restored_epoch);
        assert_eq!(r.summary.balance_total, 5000);
        assert_eq!(r.taken_ms, Some(second.taken_ms));
        assert!(r.moved_aside.iter().any(|p| p.exists()));
        assert!(r.explain().contains("Tell students"));
        let db = Db::open(&db_path).unwrap();
        db.run_sync(|c| ledger::audit(c).map_err(crate::error::ApiError::internal))
            .unwrap();
    }

    #[test]
    fn restore_refuses_while_served_and_bad_files_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = seeded(dir.path());
        let data = db_path.parent().unwrap().to_path_buf();
        let b = backup(&db_path, &dir.path().join("b"), None).unwrap();
        let held = datadir::lock(&data).unwrap();
        assert!(matches!(
            restore(&data, &b.path),
            Err(BackupError::Serving(LockError::Held { .. }))
        ));
        drop(held);
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, b"this is not a database at all, not even close....").unwrap();
        let before: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(restore(&data, &junk).is_err());
        let newer = dir.path().join("newer.db");
        std::fs::copy(&b.path, &newer).unwrap();
        Connection::open(&newer)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert!(matches!(
            restore(&data, &newer),
            Err(BackupError::NewerSchema { .. })
        ));
        let mut after: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        after.retain(|n| n != "relay.lock");
        let mut before = before;
        before.retain(|n| n != "relay.lock");
        before.sort();
        after.sort();
        assert_eq!(
            before, after,
            "a refused restore leaves the data dir as it was"
        );
    }

    #[test]
    fn a_failed_check_publishes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = seeded(dir.path());
        // Break the ledger: the cached balance no longer equals the entries.
        Connection::open(&db_path)
            .unwrap()
            .execute("UPDATE accounts SET balance = balance + 1", [])
            .unwrap();
        let to = dir.path().join("b");
        let e = backup(&db_path, &to, None).unwrap_err();
        assert!(matches!(e, BackupError::Check(_)), "{e}");
        let left: Vec<_> = std::fs::read_dir(&to)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != BACKUP_LOCK)
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
