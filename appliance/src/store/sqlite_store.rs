//! The SQLite backend: one `users` table (WITHOUT ROWID, keyed by the 16-byte user id) and a
//! one-row `meta` table, in WAL mode with `synchronous=FULL` so a commit survives power loss.
//!
//! Owns the SQL and the mapping of rows to [`StoredUser`]; it must not decide what to write.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use comatching_protocol::{Digest, Epoch, Features, SnapshotUser, UserId};
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    LiveUser, ReplicaMeta, ReplicaStore, StoreBackend, StoreError, StoredUser, fold_summary,
    user_from_key, user_key,
};
use crate::sync::{Change, ReplicaCursor, UserState};

/// A `users` row as read: (version, tombstone, features).
type RawRow = (i64, i64, Option<Vec<u8>>);

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    user_id   BLOB PRIMARY KEY,
    version   INTEGER NOT NULL,
    tombstone INTEGER NOT NULL CHECK (tombstone IN (0, 1)),
    features  BLOB
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    epoch       INTEGER,
    applied_seq INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    digest      INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (id, epoch, applied_seq, count, digest) VALUES (1, NULL, 0, 0, 0);
";

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        // A deleted user's features (their major is personal data) are zeroed in the file, not
        // left readable in free space (issue 14).
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        // A damaged image can open and even answer simple queries; quick_check reads every
        // page (without checking indexes against tables: that is integrity_check's slow part)
        // so damage is found here, at start, where it can be healed (store::damage).
        let check: Vec<String> = conn
            .prepare("PRAGMA quick_check")
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
            .map_err(err)?;
        if check != ["ok"] {
            return Err(StoreError::CorruptMeta {
                key: "quick_check",
                what: check.join("; "),
            });
        }
        Ok(SqliteStore {
            conn,
            path: path.to_owned(),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }
}

fn decode_features(
    user: UserId,
    blob: Option<Vec<u8>>,
    tombstone: i64,
) -> Result<Option<Features>, StoreError> {
    match (tombstone, blob) {
        (1, None) => Ok(None),
        (0, Some(b)) => rmp_serde::from_slice(&b)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                user: user.to_hex(),
                what: format!("features: {e}"),
            }),
        (t, b) => Err(StoreError::Corrupt {
            user: user.to_hex(),
            what: format!("tombstone={t} with features present={}", b.is_some()),
        }),
    }
}

fn read_row(conn: &Connection, user: UserId) -> rusqlite::Result<Option<RawRow>> {
    conn.prepare_cached("SELECT version, tombstone, features FROM users WHERE user_id = ?1")?
        .query_row([&user_key(user)[..]], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()
}

fn to_stored(user: UserId, row: RawRow) -> Result<StoredUser, StoreError> {
    Ok(StoredUser {
        user_id: user,
        version: row.0 as u64,
        features: decode_features(user, row.2, row.1)?,
    })
}

fn write_meta(
    conn: &Connection,
    cursor: ReplicaCursor,
    count: u64,
    digest: Digest,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE meta SET epoch = ?1, applied_seq = ?2, count = ?3, digest = ?4 WHERE id = 1",
        params![
            cursor.epoch.map(|e| e.0 as i64),
            cursor.applied_seq as i64,
            count as i64,
            digest.0 as i64
        ],
    )?;
    Ok(())
}

fn insert_row(
    conn: &Connection,
    user: UserId,
    version: u64,
    state: &UserState,
) -> rusqlite::Result<()> {
    let features = match state {
        UserState::Live(f) => Some(rmp_serde::to_vec_named(f).expect("features always encode")),
        UserState::Tombstone => None,
    };
    conn.prepare_cached(
        "INSERT INTO users (user_id, version, tombstone, features) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (user_id) DO UPDATE SET version = excluded.version,
             tombstone = excluded.tombstone, features = excluded.features",
    )?
    .execute(params![
        &user_key(user)[..],
        version as i64,
        i64::from(features.is_none()),
        features
    ])?;
    Ok(())
}

impl ReplicaStore for SqliteStore {
    fn backend(&self) -> StoreBackend {
        StoreBackend::Sqlite
    }

    fn meta(&self) -> Result<ReplicaMeta, StoreError> {
        let (epoch, seq, count, digest): (Option<i64>, i64, i64, i64) = self
            .conn
            .query_row(
                "SELECT epoch, applied_seq, count, digest FROM meta WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .map_err(self.err())?;
        if seq < 0 || count < 0 {
            return Err(StoreError::CorruptMeta {
                key: "meta",
                what: format!("applied_seq={seq} count={count}"),
            });
        }
        Ok(ReplicaMeta {
            cursor: ReplicaCursor {
                epoch: epoch.map(|e| Epoch(e as u64)),
                applied_seq: seq as u64,
            },
            count: count as u64,
            digest: Digest(digest as u64),
        })
    }

    fn versions(&self, users: &[UserId]) -> Result<HashMap<UserId, u64>, StoreError> {
        let mut out = HashMap::with_capacity(users.len());
        let mut stmt = self
            .conn
            .prepare_cached("SELECT version FROM users WHERE user_id = ?1")
            .map_err(self.err())?;
        for &u in users {
            let version: Option<i64> = stmt
                .query_row([&user_key(u)[..]], |r| r.get(0))
                .optional()
                .map_err(self.err())?;
            if let Some(v) = version {
                out.insert(u, v as u64);
            }
        }
        Ok(out)
    }

    fn get(&self, user: UserId) -> Result<Option<StoredUser>, StoreError> {
        read_row(&self.conn, user)
            .map_err(self.err())?
            .map(|r| to_stored(user, r))
            .transpose()
    }

    fn commit(&mut self, changes: &[Change], cursor: ReplicaCursor) -> Result<(), StoreError> {
        let meta = self.meta()?;
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        let (mut count, mut digest) = (meta.count, meta.digest);
        for c in changes {
            let old = read_row(&tx, c.user_id)
                .map_err(err)?
                .map(|r| to_stored(c.user_id, r))
                .transpose()?;
            if old.as_ref().is_some_and(|o| o.version >= c.version) {
                continue; // never go backwards
            }
            fold_summary(&mut count, &mut digest, old.as_ref(), c);
            insert_row(&tx, c.user_id, c.version, &c.state).map_err(err)?;
        }
        write_meta(&tx, cursor, count, digest).map_err(err)?;
        tx.commit().map_err(err)
    }

    fn live_users(&self) -> Result<Vec<LiveUser>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT user_id, version, features FROM users WHERE tombstone = 0")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                ))
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (key, version, blob) = row.map_err(self.err())?;
            let user_id = user_from_key(&key)?;
            let features = decode_features(user_id, blob, 0)?.expect("live row");
            out.push(LiveUser {
                user_id,
                version: version as u64,
                features,
            });
        }
        Ok(out)
    }

    fn all_rows(&self) -> Result<Vec<StoredUser>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT user_id, version, tombstone, features FROM users")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    (
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<Vec<u8>>>(3)?,
                    ),
                ))
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (key, rest) = row.map_err(self.err())?;
            out.push(to_stored(user_from_key(&key)?, rest)?);
        }
        Ok(out)
    }

    fn replace_all(
        &mut self,
        epoch: Epoch,
        high_water_seq: u64,
        users: &[SnapshotUser],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        // One transaction: until it commits, the old replica is what a reopen sees.
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute("DELETE FROM users", []).map_err(err)?;
        let mut digest = Digest::default();
        let mut count = 0u64;
        for u in users {
            let prior = read_row(&tx, u.user_id).map_err(err)?;
            if let Some(p) = prior {
                // A snapshot listing a user twice: keep the newer version only.
                if p.0 as u64 >= u.version {
                    continue;
                }
                digest.remove(u.user_id, p.0 as u64);
                count -= 1;
            }
            insert_row(
                &tx,
                u.user_id,
                u.version,
                &UserState::Live(u.features.clone()),
            )
            .map_err(err)?;
            digest.add(u.user_id, u.version);
            count += 1;
        }
        write_meta(
            &tx,
            ReplicaCursor {
                epoch: Some(epoch),
                applied_seq: high_water_seq,
            },
            count,
            digest,
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }
}
