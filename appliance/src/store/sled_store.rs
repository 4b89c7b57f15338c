//! The sled backend. The replica lives in one tree per *generation* (`replica-<n>`); the default
//! tree holds only the pointer `active` to the current generation. Inside a generation tree the
//! meta record is key `[0]` and users are `[1] ‖ user_id`. A commit is one `apply_batch` on the
//! generation tree (atomic) followed by `flush()` (durable). A snapshot is written into a fresh
//! generation, flushed, and only then made active by flipping the pointer — so an interrupted
//! snapshot leaves the previous replica in place, and the leftover tree is dropped at next open.
//!
//! Owns the key layout and the flush discipline; it must not decide what to write.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use comatching_protocol::{Digest, Epoch, SnapshotUser, UserId};

use super::{
    LiveUser, ReplicaMeta, ReplicaStore, StoreBackend, StoreError, StoredUser, decode_row,
    encode_row, fold_summary, user_from_key, user_key,
};
use crate::sync::{Change, ReplicaCursor, UserState};

const ACTIVE: &[u8] = b"active";
const META_KEY: &[u8] = &[0];
const USER_PREFIX: u8 = 1;
/// Rows per `apply_batch` while writing a snapshot generation.
const SNAPSHOT_BATCH: usize = 20_000;

pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
    generation: u64,
    path: PathBuf,
}

fn tree_name(generation: u64) -> String {
    format!("replica-{generation}")
}

fn ukey(user: UserId) -> [u8; 17] {
    let mut k = [USER_PREFIX; 17];
    k[1..].copy_from_slice(&user_key(user));
    k
}

fn encode_meta(m: &ReplicaMeta) -> Vec<u8> {
    let mut v = Vec::with_capacity(33);
    v.push(u8::from(m.cursor.epoch.is_some()));
    v.extend_from_slice(&m.cursor.epoch.map_or(0, |e| e.0).to_be_bytes());
    v.extend_from_slice(&m.cursor.applied_seq.to_be_bytes());
    v.extend_from_slice(&m.count.to_be_bytes());
    v.extend_from_slice(&m.digest.0.to_be_bytes());
    v
}

fn decode_meta(b: &[u8]) -> Result<ReplicaMeta, StoreError> {
    if b.len() != 33 || b[0] > 1 {
        return Err(StoreError::CorruptMeta {
            key: "meta",
            what: format!("{} bytes, flag {:?}", b.len(), b.first()),
        });
    }
    let word = |i: usize| u64::from_be_bytes(b[1 + 8 * i..9 + 8 * i].try_into().expect("8 bytes"));
    Ok(ReplicaMeta {
        cursor: ReplicaCursor {
            epoch: (b[0] == 1).then(|| Epoch(word(0))),
            applied_seq: word(1),
        },
        count: word(2),
        digest: Digest(word(3)),
    })
}

/// How long `open` waits for the file lock of a handle that is closing.
pub(super) const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// `sled::open`, waiting a little for the file lock: a dropped `sled::Db` releases it only when
/// its background flusher thread has finished, a moment later, so an immediate reopen in the
/// same process could fail with "could not acquire lock". Another live process holding the
/// directory still fails, after `patience` ([`LOCK_PATIENCE`] for the store).
pub(super) fn open_waiting_for_lock(
    path: &Path,
    patience: std::time::Duration,
) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match sled::open(path) {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

impl SledStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |source| StoreError::Sled {
            path: path.to_owned(),
            source,
        };
        let db = open_waiting_for_lock(path, LOCK_PATIENCE).map_err(err)?;
        let generation = match db.get(ACTIVE).map_err(err)? {
            Some(v) => {
                u64::from_be_bytes(v.as_ref().try_into().map_err(|_| StoreError::CorruptMeta {
                    key: "active",
                    what: format!("{} bytes", v.len()),
                })?)
            }
            None => {
                db.insert(ACTIVE, &0u64.to_be_bytes()).map_err(err)?;
                0
            }
        };
        // Drop leftovers of an interrupted snapshot.
        for name in db.tree_names() {
            if name.starts_with(b"replica-") && name.as_ref() != tree_name(generation).as_bytes() {
                db.drop_tree(&name).map_err(err)?;
            }
        }
        let tree = db.open_tree(tree_name(generation)).map_err(err)?;
        if tree.get(META_KEY).map_err(err)?.is_none() {
            tree.insert(META_KEY, encode_meta(&ReplicaMeta::default()))
                .map_err(err)?;
        }
        db.flush().map_err(err)?;
        Ok(SledStore {
            db,
            tree,
            generation,
            path: path.to_owned(),
        })
    }

    fn err(&self) -> impl Fn(sled::Error) -> StoreError + '_ {
        move |source| StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    fn scan_users(&self) -> impl Iterator<Item = Result<StoredUser, StoreError>> + '_ {
        self.tree.scan_prefix([USER_PREFIX]).map(move |kv| {
            let (k, v) = kv.map_err(self.err())?;
            let user = user_from_key(&k[1..])?;
            decode_row(user, &v)
        })
    }
}

impl ReplicaStore for SledStore {
    fn backend(&self) -> StoreBackend {
        StoreBackend::Sled
    }

    fn meta(&self) -> Result<ReplicaMeta, StoreError> {
        match self.tree.get(META_KEY).map_err(self.err())? {
            Some(b) => decode_meta(&b),
            None => Err(StoreError::CorruptMeta {
                key: "meta",
                what: "missing".into(),
            }),
        }
    }

    fn versions(&self, users: &[UserId]) -> Result<HashMap<UserId, u64>, StoreError> {
        let mut out = HashMap::with_capacity(users.len());
        for &u in users {
            if let Some(row) = self.get(u)? {
                out.insert(u, row.version);
            }
        }
        Ok(out)
    }

    fn get(&self, user: UserId) -> Result<Option<StoredUser>, StoreError> {
        self.tree
            .get(ukey(user))
            .map_err(self.err())?
            .map(|v| decode_row(user, &v))
            .transpose()
    }

    fn commit(&mut self, changes: &[Change], cursor: ReplicaCursor) -> Result<(), StoreError> {
        let mut meta = self.meta()?;
        let mut batch = sled::Batch::default();
        // Later changes to the same user in one slice see the earlier ones.
        let mut seen: HashMap<UserId, StoredUser> = HashMap::new();
        for c in changes {
            let old = match seen.get(&c.user_id) {
                Some(s) => Some(s.clone()),
                None => self.get(c.user_id)?,
            };
            if old.as_ref().is_some_and(|o| o.version >= c.version) {
                continue; // never go backwards
            }
            fold_summary(&mut meta.count, &mut meta.digest, old.as_ref(), c);
            batch.insert(&ukey(c.user_id)[..], encode_row(c.version, &c.state));
            seen.insert(
                c.user_id,
                StoredUser {
                    user_id: c.user_id,
                    version: c.version,
                    features: match &c.state {
                        UserState::Live(f) => Some(f.clone()),
                        UserState::Tombstone => None,
                    },
                },
            );
        }
        meta.cursor = cursor;
        batch.insert(META_KEY, encode_meta(&meta));
        self.tree.apply_batch(batch).map_err(self.err())?;
        self.db.flush().map_err(self.err())?;
        Ok(())
    }

    fn live_users(&self) -> Result<Vec<LiveUser>, StoreError> {
        let mut out = Vec::new();
        for row in self.scan_users() {
            let row = row?;
            if let Some(features) = row.features {
                out.push(LiveUser {
                    user_id: row.user_id,
                    version: row.version,
                    features,
                });
            }
        }
        Ok(out)
    }

    fn all_rows(&self) -> Result<Vec<StoredUser>, StoreError> {
        self.scan_users().collect()
    }

    fn replace_all(
        &mut self,
        epoch: Epoch,
        high_water_seq: u64,
        users: &[SnapshotUser],
    ) -> Result<(), StoreError> {
        let next = self.generation + 1;
        let name = tree_name(next);
        self.db.drop_tree(name.as_bytes()).map_err(self.err())?;
        let tree = self.db.open_tree(&name).map_err(self.err())?;
        let mut newest: HashMap<UserId, u64> = HashMap::with_capacity(users.len());
        for u in users {
            let v = newest.entry(u.user_id).or_insert(0);
            *v = (*v).max(u.version);
        }
        let mut meta = ReplicaMeta {
            cursor: ReplicaCursor {
                epoch: Some(epoch),
                applied_seq: high_water_seq,
            },
            ..ReplicaMeta::default()
        };
        for chunk in users.chunks(SNAPSHOT_BATCH) {
            let mut batch = sled::Batch::default();
            for u in chunk {
                if newest.get(&u.user_id) != Some(&u.version) {
                    continue;
                }
                newest.remove(&u.user_id); // a duplicate at the same version counts once
                meta.count += 1;
                meta.digest.add(u.user_id, u.version);
                batch.insert(
                    &ukey(u.user_id)[..],
                    encode_row(u.version, &UserState::Live(u.features.clone())),
                );
            }
            tree.apply_batch(batch).map_err(self.err())?;
        }
        tree.insert(META_KEY, encode_meta(&meta))
            .map_err(self.err())?;
        self.db.flush().map_err(self.err())?;
        // The switch: one key, flushed. Before it the old generation is active; after, the new.
        self.db
            .insert(ACTIVE, &next.to_be_bytes())
            .map_err(self.err())?;
        self.db.flush().map_err(self.err())?;
        let old = tree_name(self.generation);
        self.tree = tree;
        self.generation = next;
        self.db.drop_tree(old.as_bytes()).map_err(self.err())?;
        self.db.flush().map_err(self.err())?;
        Ok(())
    }
}
