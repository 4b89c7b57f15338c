//! The durable replica: per user `(version, tombstone, features)` plus the meta row
//! `(epoch, applied_seq, count, digest)`, behind one small trait with two backends.
//!
//! It owns durability and atomicity: a batch of decided changes and the cursor that goes with it
//! commit together or not at all, and a commit has reached the disk when `commit` returns
//! (SQLite: WAL + `synchronous=FULL`; sled: `flush()` at every commit point). It must not decide
//! *what* to write — that is [`crate::sync`] — and it must never panic on bad bytes: a corrupt
//! row is a [`StoreError::Corrupt`] naming the user.

pub mod damage;
mod sled_store;
mod sqlite_store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use comatching_protocol::{Digest, Epoch, Features, SnapshotUser, SyncEvent, UserId};
use serde::{Deserialize, Serialize};

use crate::sync::{self, Change, ReplicaCursor, SyncPlan, UserState};

pub use sled_store::SledStore;
pub use sqlite_store::SqliteStore;

/// Which embedded database holds the replica. Configuration value: `"sqlite"` or `"sled"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// The default: the crash test and the power-loss story are the strongest (see the bench
    /// notes in `docs/bench/`).
    #[default]
    Sqlite,
    Sled,
}

impl std::str::FromStr for StoreBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sqlite" => Ok(StoreBackend::Sqlite),
            "sled" => Ok(StoreBackend::Sled),
            other => Err(format!("unknown store backend {other:?} (sqlite|sled)")),
        }
    }
}

impl StoreBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreBackend::Sqlite => "sqlite",
            StoreBackend::Sled => "sled",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite at {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("sled at {path}: {source}")]
    Sled {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("creating {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt replica row for user {user}: {what}")]
    Corrupt { user: String, what: String },
    #[error("corrupt replica meta {key}: {what}")]
    CorruptMeta { key: &'static str, what: String },
}

impl StoreError {
    /// A stable code for logs and the status page.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Sqlite { .. } => "store_sqlite",
            StoreError::Sled { .. } => "store_sled",
            StoreError::Io { .. } => "store_io",
            StoreError::Corrupt { .. } | StoreError::CorruptMeta { .. } => "store_corrupt",
        }
    }
}

/// The meta row: where the replica stands and a summary of what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplicaMeta {
    pub cursor: ReplicaCursor,
    /// Live (non-tombstoned) users.
    pub count: u64,
    /// `Digest` over live users' `(user_id, version)`.
    pub digest: Digest,
}

/// One stored user row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredUser {
    pub user_id: UserId,
    pub version: u64,
    /// `None` for a tombstone.
    pub features: Option<Features>,
}

/// A live user as the index needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveUser {
    pub user_id: UserId,
    pub version: u64,
    pub features: Features,
}

/// The replica's storage. One writer (the sync consumer); `&mut self` for every write.
pub trait ReplicaStore: Send {
    fn backend(&self) -> StoreBackend;
    fn meta(&self) -> Result<ReplicaMeta, StoreError>;
    /// Stored versions of the given users, tombstones included (absent = never seen).
    fn versions(&self, users: &[UserId]) -> Result<HashMap<UserId, u64>, StoreError>;
    fn get(&self, user: UserId) -> Result<Option<StoredUser>, StoreError>;
    /// Writes `changes` and `cursor` atomically and durably, keeping count and digest in step.
    /// Each change must carry a version newer than the stored one (the sync plan guarantees it).
    fn commit(&mut self, changes: &[Change], cursor: ReplicaCursor) -> Result<(), StoreError>;
    /// Every live user, for an index rebuild.
    fn live_users(&self) -> Result<Vec<LiveUser>, StoreError>;
    /// Every row including tombstones (integrity checks, tests).
    fn all_rows(&self) -> Result<Vec<StoredUser>, StoreError>;
    /// Replaces the whole replica with a snapshot stamped `(epoch, high_water_seq)`. Atomic: if
    /// interrupted, the previous replica is still there when the store is reopened.
    fn replace_all(
        &mut self,
        epoch: Epoch,
        high_water_seq: u64,
        users: &[SnapshotUser],
    ) -> Result<(), StoreError>;
    /// Count and digest recomputed from the rows (compare with [`ReplicaStore::meta`]).
    fn recount(&self) -> Result<(u64, Digest), StoreError> {
        let live = self.live_users()?;
        let digest = Digest::of(live.iter().map(|u| (u.user_id, u.version)));
        Ok((live.len() as u64, digest))
    }
}

/// Opens (creating if needed) the replica of `backend` in directory `dir`.
pub fn open(backend: StoreBackend, dir: &Path) -> Result<Box<dyn ReplicaStore>, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
        path: dir.to_owned(),
        source,
    })?;
    Ok(match backend {
        StoreBackend::Sqlite => Box::new(SqliteStore::open(&dir.join("replica.sqlite3"))?),
        StoreBackend::Sled => Box::new(SledStore::open(&dir.join("replica.sled"))?),
    })
}

/// The sync shell: reads what the state machine needs, runs it, commits its decision. Returns
/// the plan so the caller can update the index with `plan.changes`, ack, or ask for a replay.
pub fn apply_batch(
    store: &mut dyn ReplicaStore,
    events: &[SyncEvent],
) -> Result<SyncPlan, StoreError> {
    let cursor = store.meta()?.cursor;
    let stored = store.versions(&sync::touched_users(events))?;
    let plan = sync::plan(cursor, &stored, events);
    // Every change advances the cursor, and a plan that asks for a resync leaves it where it
    // was with no changes: a batch that moves nothing writes nothing.
    debug_assert!(plan.cursor != cursor || plan.changes.is_empty());
    debug_assert!(plan.resync.is_none() || (plan.cursor == cursor && plan.changes.is_empty()));
    if plan.cursor != cursor {
        store.commit(&plan.changes, plan.cursor)?;
    }
    Ok(plan)
}

// ---- row encoding shared by both backends ----
//
// value = version (u64 BE) ‖ flag (0 live, 1 tombstone) ‖ features (rmp named map, live only)

pub(crate) fn encode_row(version: u64, state: &UserState) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&version.to_be_bytes());
    match state {
        UserState::Live(f) => {
            out.push(0);
            out.extend(rmp_serde::to_vec_named(f).expect("features always encode"));
        }
        UserState::Tombstone => out.push(1),
    }
    out
}

pub(crate) fn decode_row(user: UserId, bytes: &[u8]) -> Result<StoredUser, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt {
        user: user.to_hex(),
        what,
    };
    if bytes.len() < 9 {
        return Err(corrupt(format!(
            "row is {} bytes, need at least 9",
            bytes.len()
        )));
    }
    let version = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    let features = match bytes[8] {
        0 => Some(
            rmp_serde::from_slice::<Features>(&bytes[9..])
                .map_err(|e| corrupt(format!("features: {e}")))?,
        ),
        1 if bytes.len() == 9 => None,
        flag => return Err(corrupt(format!("bad flag {flag} / length {}", bytes.len()))),
    };
    Ok(StoredUser {
        user_id: user,
        version,
        features,
    })
}

pub(crate) fn user_key(user: UserId) -> [u8; 16] {
    user.as_u128().to_be_bytes()
}

pub(crate) fn user_from_key(key: &[u8]) -> Result<UserId, StoreError> {
    let bytes: [u8; 16] = key.try_into().map_err(|_| StoreError::Corrupt {
        user: format!("{key:02x?}"),
        what: "key is not 16 bytes".into(),
    })?;
    UserId::from_uuid(uuid::Uuid::from_u128(u128::from_be_bytes(bytes))).map_err(|e| {
        StoreError::Corrupt {
            user: format!("{bytes:02x?}"),
            what: e.to_string(),
        }
    })
}

/// Applies `changes` to a running (count, digest), given the rows they replace.
pub(crate) fn fold_summary(
    count: &mut u64,
    digest: &mut Digest,
    old: Option<&StoredUser>,
    change: &Change,
) {
    if let Some(o) = old
        && o.features.is_some()
    {
        *count -= 1;
        digest.remove(o.user_id, o.version);
    }
    if matches!(change.state, UserState::Live(_)) {
        *count += 1;
        digest.add(change.user_id, change.version);
    }
}

#[cfg(test)]
mod conformance;
