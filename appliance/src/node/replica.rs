//! The running replica: the durable store, the in-memory match engine mirroring it, and the
//! sync status that decides whether this appliance may answer matches.
//!
//! Writes go store first (durable commit), engine second; the engine is always rebuildable from
//! the store. All store and engine work is blocking and runs on blocking threads; the async
//! link code calls the `*_blocking` methods through `tokio::task::spawn_blocking`.

use std::sync::{Mutex, RwLock};
use std::time::Instant;

use comatching_protocol::stages::{self, StageHistogram};

use comatching_protocol::{
    Digest, Epoch, MatchReply, MatchRequest, ReplicaPosition, SnapshotUser, SyncEvent,
};
use serde::Serialize;

use crate::engine::{self, EngineKind, MatchEngine};
use crate::store::{self, ReplicaMeta, ReplicaStore, StoreBackend, StoreError};
use crate::sync::{Gap, SyncPlan};

/// What the status page and the readiness rule need to know about the link.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkStatus {
    pub broker_connected: bool,
    /// The broker node of the current session, `host:port` (no credentials).
    pub broker_node: Option<String>,
    /// The relay's epoch and seq as of its last `HelloAck` (or the newest event seen).
    pub relay_epoch: Option<Epoch>,
    pub relay_seq: u64,
    /// A HelloAck for the current broker session has arrived.
    pub hello_acked: bool,
    pub gap: Option<(u64, u64)>,
    /// A snapshot is being staged (high-water seq).
    pub snapshot_in_progress: Option<u64>,
    pub snapshots_loaded: u64,
    pub events_applied: u64,
    pub dead_lettered: u64,
    /// Messages refused for a missing or wrong link-key tag (also in `dead_lettered`).
    pub unauthenticated: u64,
    pub matches_answered: u64,
    pub matches_expired: u64,
    pub hellos_sent: u64,
    /// Broker sessions started since the appliance did (each reconnect adds one).
    pub broker_sessions: u64,
    /// Times the broker cancelled the match consumer (its queue deleted, or gone with its
    /// cluster node) and the link consumed again without leaving its session.
    pub match_consumer_restarts: u64,
    pub last_error: Option<String>,
    pub index_rebuild_ms: u64,
    /// Sync commits that failed (each failed delivery of a stuck event counts).
    pub apply_failures: u64,
    /// The event the replica is halted at, while its commit keeps failing (see `node::retry`).
    pub stuck: Option<Stuck>,
    /// When the current broker session came up; `None` while disconnected (status page).
    #[serde(skip)]
    pub connected_at: Option<Instant>,
    /// When a commit last changed the replica (a sync batch or a snapshot swap).
    #[serde(skip)]
    pub last_applied_at: Option<Instant>,
    /// Matches answered over the last minute, by second since [`Replica::started`].
    #[serde(skip)]
    pub answered_recent: super::recent::MinuteWindow,
}

/// What the store holds, recomputed from its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recount {
    pub count: u64,
    pub digest: Digest,
    pub features_digest: Digest,
}

/// A sync event whose commit failed; the replica does not move past it.
#[derive(Clone, Debug, Serialize)]
pub struct Stuck {
    pub seq: u64,
    pub user_id: String,
    /// Failed commits of this seq so far (redeliveries and replays).
    pub failures: u64,
    pub error: String,
    pub since_unix_ms: u64,
}

/// A batch applied event by event after its one-commit apply failed.
#[derive(Debug, Default)]
pub struct Isolated {
    /// Replica changes committed.
    pub changes: usize,
    /// The plan of the last event that committed (its gap, if any, is the batch's).
    pub last: Option<SyncPlan>,
    /// The first event (index into the batch) whose commit failed; later events were not tried.
    pub failed: Option<(usize, StoreError)>,
}

/// The replica was found damaged at start, moved aside, and a fresh one opened (`/status`
/// `store.healed`).
#[derive(Clone, Debug, Serialize)]
pub struct Healed {
    pub at_unix_ms: u64,
    /// Where the damaged store directory went.
    pub moved_to: String,
    /// What was wrong with it (the open error).
    pub error: String,
}

pub struct Replica {
    /// Set when this process healed a damaged replica at start.
    pub healed: Option<Healed>,
    store: Mutex<Box<dyn ReplicaStore>>,
    /// The store's meta row as of its last commit, refreshed under the store lock after every
    /// change; readers (each match request, the link's readiness tick, /status) take it from
    /// here instead of querying the store and waiting behind a sync batch's fsync.
    meta: RwLock<ReplicaMeta>,
    engine: RwLock<Box<dyn MatchEngine>>,
    engine_kind: EngineKind,
    backend: StoreBackend,
    pub link: Mutex<LinkStatus>,
    pub started: Instant,
    /// Where match requests spend their time here (issue 16).
    pub stages: MatchStages,
}

/// The appliance's stages of a match request, in order. Rendered on `/metrics` as
/// `comatching_appliance_match_stage_seconds{stage=…}`; the relay's `round_trip` stage minus
/// `total` here is the time in the broker (two hops).
#[derive(Default)]
pub struct MatchStages {
    /// Delivered by the broker client → a worker has it.
    pub dispatch: StageHistogram,
    /// → checked, decoded and ranked (the engine's query on a blocking thread).
    pub rank: StageHistogram,
    /// → the reply handed to the broker client.
    pub reply: StageHistogram,
    /// Delivered → reply handed over, the whole of it.
    pub total: StageHistogram,
}

impl MatchStages {
    /// Each stage with its name (`stages::APPLIANCE_STAGES`, the one list of names).
    pub fn all(&self) -> [(&'static str, &StageHistogram); 4] {
        let h = [&self.dispatch, &self.rank, &self.reply, &self.total];
        std::array::from_fn(|i| (stages::APPLIANCE_STAGES[i], h[i]))
    }
}

impl Replica {
    /// Opens the store and rebuilds the engine from it.
    pub fn open(
        backend: StoreBackend,
        dir: &std::path::Path,
        kind: EngineKind,
    ) -> Result<Replica, StoreError> {
        let kind = kind.resolved();
        let store = store::open(backend, dir)?;
        let t = Instant::now();
        let live = store.live_users()?;
        let engine = engine::build(kind, live.iter().map(|u| (u.user_id, &u.features)));
        let rebuild_ms = t.elapsed().as_millis() as u64;
        tracing::info!(
            users = live.len(),
            rebuild_ms,
            engine = kind.as_str(),
            "index rebuilt from the store"
        );
        let meta = store.meta()?;
        Ok(Replica {
            healed: None,
            store: Mutex::new(store),
            meta: RwLock::new(meta),
            engine: RwLock::new(engine),
            engine_kind: kind,
            backend,
            link: Mutex::new(LinkStatus {
                index_rebuild_ms: rebuild_ms,
                ..LinkStatus::default()
            }),
            started: Instant::now(),
            stages: MatchStages::default(),
        })
    }

    /// [`Replica::open`], healing a damaged store (see `store::damage`): bad bytes → the
    /// directory is moved aside (the newest two damaged copies are kept), a fresh store is
    /// opened and the link resyncs it from the relay. Errors that are the machine's (permission,
    /// space, device) are returned as they are, for the caller to retry.
    pub fn open_healing(
        backend: StoreBackend,
        dir: &std::path::Path,
        kind: EngineKind,
    ) -> Result<Replica, StoreError> {
        use crate::store::damage::{Remedy, classify, move_aside};
        let e = match Replica::open(backend, dir, kind) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        if classify(&e) != Remedy::Heal {
            return Err(e);
        }
        let at_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let moved_to = move_aside(dir, at_unix_ms).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        tracing::error!(
            code = e.code(),
            error = %e,
            moved_to = %moved_to.display(),
            "the replica is damaged: moved it aside, starting empty and resyncing from the relay"
        );
        let mut fresh = Replica::open(backend, dir, kind)?;
        fresh.healed = Some(Healed {
            at_unix_ms,
            moved_to: moved_to.display().to_string(),
            error: e.to_string(),
        });
        Ok(fresh)
    }

    pub fn backend(&self) -> StoreBackend {
        self.backend
    }

    pub fn engine_kind(&self) -> EngineKind {
        self.engine_kind
    }

    /// The meta row as of the last commit: a copy from memory, no store access.
    pub fn meta(&self) -> ReplicaMeta {
        *self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the meta row from the store itself (waiting behind a running commit): whether the
    /// store still answers, for `/healthz`.
    pub fn probe_store_blocking(&self) -> Result<ReplicaMeta, StoreError> {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).meta()
    }

    /// Re-reads the meta row after a change, still under the store lock.
    fn refresh_meta(&self, store: &dyn ReplicaStore) -> Result<(), StoreError> {
        let meta = store.meta()?;
        *self.meta.write().unwrap_or_else(|p| p.into_inner()) = meta;
        Ok(())
    }

    pub fn engine_len(&self) -> usize {
        self.engine.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The engine's live count and features digest, read together.
    pub fn engine_content(&self) -> (usize, Digest) {
        let engine = self.engine.read().unwrap_or_else(|p| p.into_inner());
        (engine.len(), engine.features_digest())
    }

    /// Count, version digest and features digest recomputed from the store's rows (a full read:
    /// `/status?recount=1` and `doctor`, never a hot path).
    pub fn recount_blocking(&self) -> Result<Recount, StoreError> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let live = store.live_users()?;
        Ok(Recount {
            count: live.len() as u64,
            digest: Digest::of(live.iter().map(|u| (u.user_id, u.version))),
            features_digest: Digest::of_features(live.iter().map(|u| (u.user_id, &u.features))),
        })
    }

    /// Applies a batch durably, then mirrors the decided changes into the engine.
    pub fn apply_blocking(&self, events: &[SyncEvent]) -> Result<SyncPlan, StoreError> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let plan = store::apply_batch(store.as_mut(), events)?;
        self.refresh_meta(store.as_ref())?;
        if !plan.changes.is_empty() {
            let mut engine = self.engine.write().unwrap_or_else(|p| p.into_inner());
            engine::apply_changes(engine.as_mut(), &plan.changes);
        }
        Ok(plan)
    }

    /// Applies the batch one event at a time in seq order, each in its own durable commit, and
    /// stops at the first that fails: so a batch with one event the store refuses still commits
    /// everything before it, and the failing event is known.
    pub fn apply_isolating(&self, events: &[SyncEvent]) -> Isolated {
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by_key(|&i| events[i].seq);
        let mut out = Isolated::default();
        for i in order {
            match self.apply_blocking(std::slice::from_ref(&events[i])) {
                Ok(plan) => {
                    out.changes += plan.changes.len();
                    out.last = Some(plan);
                }
                Err(err) => {
                    out.failed = Some((i, err));
                    break;
                }
            }
        }
        out
    }

    /// Swaps in a verified snapshot and rebuilds the engine once.
    pub fn replace_blocking(
        &self,
        epoch: Epoch,
        high_water_seq: u64,
        users: &[SnapshotUser],
    ) -> Result<(), StoreError> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.replace_all(epoch, high_water_seq, users)?;
        self.refresh_meta(store.as_ref())?;
        let t = Instant::now();
        let rebuilt = engine::build(
            self.engine_kind,
            users.iter().map(|u| (u.user_id, &u.features)),
        );
        *self.engine.write().unwrap_or_else(|p| p.into_inner()) = rebuilt;
        self.link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .index_rebuild_ms = t.elapsed().as_millis() as u64;
        Ok(())
    }

    /// Answers a match request from the engine (the caller checked readiness). CPU work: call
    /// it off the async runtime.
    pub fn answer_blocking(&self, req: &MatchRequest, now_unix_ms: u64) -> MatchReply {
        let meta = self.meta();
        let position = ReplicaPosition {
            epoch: meta.cursor.epoch,
            applied_seq: meta.cursor.applied_seq,
        };
        let engine = self.engine.read().unwrap_or_else(|p| p.into_inner());
        let mut rng = rand::rng();
        engine::answer(engine.as_ref(), req, now_unix_ms, position, &mut rng)
    }

    /// Count and digest recomputed from the rows, compared with the meta row.
    pub fn integrity_blocking(&self) -> Result<(ReplicaMeta, u64, Digest), StoreError> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let meta = store.meta()?;
        let (count, digest) = store.recount()?;
        Ok((meta, count, digest))
    }

    pub fn note_gap(&self, gap: Option<Gap>) {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).gap = gap.map(|g| (g.from, g.to));
    }

    pub fn set_error(&self, e: impl Into<String>) {
        self.link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error = Some(e.into());
    }

    /// May this appliance answer matches? Connected, acknowledged by the relay in this session,
    /// same lineage, applied everything the relay had when it answered, no gap, no snapshot in
    /// flight, not halted at an event it cannot commit.
    pub fn ready(&self, meta: &ReplicaMeta) -> bool {
        let l = self.link.lock().unwrap_or_else(|p| p.into_inner());
        l.broker_connected
            && l.hello_acked
            && meta.cursor.epoch.is_some()
            && l.relay_epoch == meta.cursor.epoch
            && meta.cursor.applied_seq >= l.relay_seq
            && l.gap.is_none()
            && l.snapshot_in_progress.is_none()
            && l.stuck.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth;

    /// The engine holds exactly the store's live users with the store's features after every
    /// batch (creates, updates, deletes, stale redeliveries), a snapshot swap and a reopen, for
    /// both engines: count and features digest against a recount of the rows.
    #[test]
    fn engine_mirrors_the_store() {
        for kind in [EngineKind::Buckets, EngineKind::Exact] {
            let dir = tempfile::tempdir().unwrap();
            let history = synth::relay_history(Epoch(7), 30, 400, 11);
            let r = Replica::open(StoreBackend::Sqlite, dir.path(), kind).unwrap();
            let same = |r: &Replica, what: &str| {
                let rc = r.recount_blocking().unwrap();
                let (users, digest) = r.engine_content();
                assert_eq!(
                    (users as u64, digest),
                    (rc.count, rc.features_digest),
                    "{kind:?} {what}"
                );
                assert_eq!((rc.count, rc.digest), (r.meta().count, r.meta().digest));
            };
            let mut deletes = 0;
            for batch in history.chunks(16) {
                deletes += batch
                    .iter()
                    .filter(|e| matches!(e.op, comatching_protocol::SyncOp::Delete))
                    .count();
                r.apply_blocking(batch).unwrap();
                same(&r, "after a batch");
            }
            assert!(deletes > 20, "the history deletes users ({deletes})");
            r.apply_blocking(&history[100..140]).unwrap();
            same(&r, "after redeliveries");
            r.replace_blocking(Epoch(8), 3, &synth::snapshot(12, 5))
                .unwrap();
            same(&r, "after a snapshot");
            drop(r);
            let r = Replica::open(StoreBackend::Sqlite, dir.path(), kind).unwrap();
            same(&r, "after a reopen");
            assert_eq!(r.engine_content().0, 12);
        }
    }

    /// The cached meta row is the store's own after every kind of change, on both backends:
    /// batches (some events stale), a snapshot swap, and a reopen.
    #[test]
    fn cached_meta_follows_the_store() {
        for backend in [StoreBackend::Sqlite, StoreBackend::Sled] {
            let dir = tempfile::tempdir().unwrap();
            let epoch = Epoch(41);
            let history = synth::relay_history(epoch, 40, 300, 7);
            let r = Replica::open(backend, dir.path(), EngineKind::Buckets).unwrap();
            let stored = |r: &Replica| r.probe_store_blocking().unwrap();
            assert_eq!(r.meta(), stored(&r));
            for batch in history.chunks(64) {
                r.apply_blocking(batch).unwrap();
                assert_eq!(r.meta(), stored(&r), "{backend:?}");
            }
            // Replaying an old batch changes nothing, the cache included.
            r.apply_blocking(&history[..10]).unwrap();
            assert_eq!(r.meta().cursor.applied_seq, 300);
            assert_eq!(r.meta(), stored(&r));
            let users = synth::snapshot(25, 3);
            r.replace_blocking(Epoch(42), 12, &users).unwrap();
            let after = r.meta();
            assert_eq!(after, stored(&r));
            assert_eq!((after.count, after.cursor.applied_seq), (25, 12));
            drop(r);
            let reopened = Replica::open(backend, dir.path(), EngineKind::Buckets).unwrap();
            assert_eq!(reopened.meta(), after);
        }
    }
}
