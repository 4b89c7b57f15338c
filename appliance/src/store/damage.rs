//! What to do when the replica cannot be opened: heal it or retry.
//!
//! The replica is a cache of the relay's pool: everything in it can be rebuilt by a snapshot.
//! So a store whose bytes are bad (SQLite: not a database, a malformed image, a failed
//! `quick_check`; sled: a corruption found while recovering; either: a row or meta entry that
//! does not decode) is **healed**: its directory is moved aside to
//! `replica.damaged-<UTC time>` (the newest [`KEEP_DAMAGED`] are kept for a post-mortem, older
//! ones deleted), a fresh store is opened and the appliance resyncs. A store that cannot be
//! opened for a reason of the machine (permission denied, disk full, a read-only file system, an
//! I/O error of the device) is **retried** as it is: moving it would not help, and the bytes may
//! be fine once the disk is.
//!
//! [`classify`] and the naming and pruning rules are pure; [`move_aside`] is the small I/O shell.

use std::path::{Path, PathBuf};

use super::StoreError;

/// Damaged copies kept next to the replica.
pub const KEEP_DAMAGED: usize = 2;

/// The remedy for a store that failed to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remedy {
    /// The bytes are bad: move the store aside, start empty, resync.
    Heal,
    /// The machine is at fault (permissions, space, device): keep the store, try again later.
    Retry,
}

/// Heal or retry; see the module comment.
pub fn classify(e: &StoreError) -> Remedy {
    match e {
        StoreError::Corrupt { .. } | StoreError::CorruptMeta { .. } => Remedy::Heal,
        StoreError::Io { .. } => Remedy::Retry,
        StoreError::Sqlite { source, .. } => classify_sqlite(source),
        StoreError::Sled { source, .. } => match source {
            sled::Error::Io(io) => classify_io(io),
            // Corruption, an unsupported (foreign) format, a bug met while recovering: the
            // bytes are not what this version can read.
            _ => Remedy::Heal,
        },
    }
}

fn classify_sqlite(e: &rusqlite::Error) -> Remedy {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::NotADatabase | C::DatabaseCorrupt => Remedy::Heal,
            _ => Remedy::Retry,
        },
        // A value of the wrong type in our own schema's row: the bytes are bad.
        // …or the meta row is missing.
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::QueryReturnedNoRows => Remedy::Heal,
        _ => Remedy::Retry,
    }
}

/// An I/O error from the device or the OS (permission, space, read-only) is the machine's;
/// bytes that end early or do not parse are the store's.
fn classify_io(e: &std::io::Error) -> Remedy {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::UnexpectedEof | K::InvalidData => Remedy::Heal,
        _ => Remedy::Retry,
    }
}

/// The name a damaged store directory is moved to: `replica.damaged-YYYYMMDDTHHMMSS.mmmZ`
/// (UTC; sorts by time as text).
pub fn damaged_name(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "replica.damaged-{y:04}{mo:02}{d:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// Of the damaged copies `names` (directory entries), those to delete so the newest `keep`
/// remain. Names not of the damaged form are never returned.
pub fn to_prune(names: &[String], keep: usize) -> Vec<String> {
    let mut damaged: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("replica.damaged-"))
        .collect();
    damaged.sort();
    let excess = damaged.len().saturating_sub(keep);
    damaged.into_iter().take(excess).cloned().collect()
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's
/// algorithm), so no date crate is needed for one file name.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Moves the store directory `dir` aside next to itself (see [`damaged_name`]) and deletes the
/// oldest damaged copies beyond [`KEEP_DAMAGED`]. Returns where it went.
pub fn move_aside(dir: &Path, unix_ms: u64) -> std::io::Result<PathBuf> {
    let parent = dir.parent().unwrap_or_else(|| Path::new("."));
    let mut to = parent.join(damaged_name(unix_ms));
    let mut n = 1;
    while to.exists() {
        to = parent.join(format!("{}-{n}", damaged_name(unix_ms)));
        n += 1;
    }
    std::fs::rename(dir, &to)?;
    let names: Vec<String> = std::fs::read_dir(parent)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for old in to_prune(&names, KEEP_DAMAGED) {
        let path = parent.join(&old);
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not delete an old damaged replica");
        }
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind) -> StoreError {
        StoreError::Io {
            path: "x".into(),
            source: std::io::Error::from(kind),
        }
    }

    fn sled_err(source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: "x".into(),
            source,
        }
    }

    fn sled_io(kind: std::io::ErrorKind) -> StoreError {
        sled_err(sled::Error::Io(std::io::Error::from(kind)))
    }

    fn sqlite(code: i32) -> StoreError {
        StoreError::Sqlite {
            path: "x".into(),
            source: rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None),
        }
    }

    #[test]
    fn bad_bytes_heal_and_machine_trouble_retries() {
        use rusqlite::ffi;
        assert_eq!(classify(&sqlite(ffi::SQLITE_NOTADB)), Remedy::Heal);
        assert_eq!(classify(&sqlite(ffi::SQLITE_CORRUPT)), Remedy::Heal);
        for code in [
            ffi::SQLITE_FULL,
            ffi::SQLITE_PERM,
            ffi::SQLITE_READONLY,
            ffi::SQLITE_IOERR,
            ffi::SQLITE_CANTOPEN,
            ffi::SQLITE_BUSY,
        ] {
            assert_eq!(classify(&sqlite(code)), Remedy::Retry, "{code}");
        }
        let corrupt = StoreError::CorruptMeta {
            key: "applied_seq",
            what: "x".into(),
        };
        assert_eq!(classify(&corrupt), Remedy::Heal);
        let row = StoreError::Corrupt {
            user: "u".into(),
            what: "x".into(),
        };
        assert_eq!(classify(&row), Remedy::Heal);
        assert_eq!(
            classify(&io(std::io::ErrorKind::PermissionDenied)),
            Remedy::Retry
        );
        assert_eq!(
            classify(&sled_err(sled::Error::Unsupported("x".into()))),
            Remedy::Heal
        );
        assert_eq!(
            classify(&sled_io(std::io::ErrorKind::PermissionDenied)),
            Remedy::Retry
        );
        assert_eq!(
            classify(&sled_io(std::io::ErrorKind::UnexpectedEof)),
            Remedy::Heal
        );
    }

    #[test]
    fn row_and_meta_read_failures_heal_and_other_library_errors_retry() {
        let sq = |source| StoreError::Sqlite {
            path: "x".into(),
            source,
        };
        use rusqlite::types::Type;
        let bad_bytes = [
            rusqlite::Error::InvalidColumnType(0, "features".into(), Type::Integer),
            rusqlite::Error::FromSqlConversionFailure(0, Type::Blob, "bad".into()),
            rusqlite::Error::QueryReturnedNoRows,
        ];
        for e in bad_bytes {
            let shown = e.to_string();
            assert_eq!(classify(&sq(e)), Remedy::Heal, "{shown}");
        }
        assert_eq!(
            classify(&sq(rusqlite::Error::InvalidPath("x".into()))),
            Remedy::Retry
        );
        // An I/O error of our own file operations is always the machine's.
        assert_eq!(
            classify(&io(std::io::ErrorKind::InvalidData)),
            Remedy::Retry
        );
        assert_eq!(
            classify(&sled_io(std::io::ErrorKind::InvalidData)),
            Remedy::Heal
        );
        assert_eq!(
            classify(&sled_io(std::io::ErrorKind::StorageFull)),
            Remedy::Retry
        );
    }

    /// The date arithmetic against a walk over the calendar, day by day, from 1970 through
    /// 2401 (century years 2100, 2200, 2300 are not leap years; 2000 and 2400 are).
    #[test]
    fn civil_dates_match_a_walk_over_the_calendar() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_len = |y, m| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1970i64, 1u32, 1u32);
        for days in 0..158_000i64 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            d += 1;
            if d > month_len(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
        assert!(y > 2400, "the walk reached {y}");
    }

    #[test]
    fn each_part_of_the_time_is_in_the_name() {
        // 2024-02-29 23:59:58.999: a leap day, the last hour, minute and second of a day.
        assert_eq!(
            damaged_name(1_709_251_198_999),
            "replica.damaged-20240229T235958.999Z"
        );
        assert_eq!(
            damaged_name(1_709_251_200_000),
            "replica.damaged-20240301T000000.000Z"
        );
    }

    #[test]
    fn a_second_move_in_the_same_millisecond_gets_its_own_name() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("replica");
        let mut moved = Vec::new();
        for i in 0..3u8 {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("f"), [i]).unwrap();
            moved.push(move_aside(&dir, 5_000).unwrap());
        }
        let name = damaged_name(5_000);
        assert_eq!(moved[0], root.path().join(&name));
        assert_eq!(moved[1], root.path().join(format!("{name}-1")));
        assert_eq!(moved[2], root.path().join(format!("{name}-2")));
        // The third copy pruned the first (KEEP_DAMAGED = 2); the two newest are intact.
        assert!(!moved[0].exists());
        assert_eq!(std::fs::read(moved[1].join("f")).unwrap(), [1]);
        assert_eq!(std::fs::read(moved[2].join("f")).unwrap(), [2]);
    }

    #[test]
    fn damaged_names_are_utc_and_sort_by_time() {
        assert_eq!(damaged_name(0), "replica.damaged-19700101T000000.000Z");
        assert_eq!(
            damaged_name(1_796_300_000_123),
            "replica.damaged-20261203T121320.123Z"
        );
        assert!(damaged_name(1_000) < damaged_name(2_000));
    }

    #[test]
    fn pruning_keeps_the_newest_and_touches_nothing_else() {
        let names: Vec<String> = [
            "replica",
            "replica.damaged-20261201T000000.000Z",
            "replica.damaged-20261203T000000.000Z",
            "replica.damaged-20261202T000000.000Z",
            "other",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            to_prune(&names, 2),
            vec!["replica.damaged-20261201T000000.000Z".to_owned()]
        );
        assert!(to_prune(&names, 3).is_empty());
    }

    #[test]
    fn move_aside_keeps_two() {
        let root = tempfile::tempdir().unwrap();
        for (i, t) in [1_000u64, 2_000, 3_000].iter().enumerate() {
            let dir = root.path().join("replica");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("f"), [i as u8]).unwrap();
            let to = move_aside(&dir, *t).unwrap();
            assert!(to.join("f").exists());
            assert!(!dir.exists());
        }
        let mut left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![damaged_name(2_000), damaged_name(3_000)],
            "the oldest copy was deleted"
        );
    }
}
