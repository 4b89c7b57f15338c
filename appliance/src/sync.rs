//! The sync state machine: relay events in, decided replica changes out. Sans-IO.
//!
//! It owns the rules of DESIGN.md §5 on the appliance side — newer versions win, deletes leave
//! versioned tombstones, the cursor advances over the contiguous prefix only, gaps and epoch
//! changes are reported — as plain functions over plain data. It must not touch a disk, a clock
//! or a socket: the store shell ([`crate::store::apply_batch`]) reads the inputs and writes the
//! outputs.
//!
//! Decisions (documented here because the design left them open):
//! * **Events beyond a gap are not applied and not kept.** The cursor stops before the first
//!   missing seq; the plan reports `Gap { from, to }` and the caller asks the relay for a replay
//!   from `applied_seq + 1`, which redelivers them. Holding nothing in memory keeps the machine
//!   stateless across restarts, and it keeps the strongest invariant: the replica content is
//!   always exactly the relay's projection at `applied_seq` (a consistent prefix).
//! * **A replica with no epoch** (empty, never synced) adopts the epoch of a batch only when that
//!   batch starts the stream at seq 1 — the relay's history from its very beginning. Anything
//!   else needs a snapshot ([`crate::store::ReplicaStore::replace_all`]) and is reported as
//!   [`ResyncNeeded::NoBaseline`].
//! * **A batch with any event of another epoch** is refused whole ([`ResyncNeeded::EpochMismatch`]):
//!   mixing two lineages is never safe.
//! * Two different events carrying the same seq are a relay fault; the batch is refused with
//!   [`ResyncNeeded::ConflictingEvents`].

use std::collections::HashMap;

use comatching_protocol::{Epoch, Features, SyncEvent, SyncOp, UserId};

/// How far a replica has applied the relay's stream, and of which lineage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplicaCursor {
    pub epoch: Option<Epoch>,
    pub applied_seq: u64,
}

/// The state a user is left in by a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserState {
    Live(Features),
    /// Deleted at this version; kept so an older upsert can never resurrect the user.
    Tombstone,
}

/// One decided write: the user's new version and state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub user_id: UserId,
    pub version: u64,
    pub state: UserState,
}

/// Seqs `from..=to` are missing; a replay from `from` fills them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
}

/// Why the stream cannot be applied and a full resync (snapshot) is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncNeeded {
    /// The batch belongs to another lineage of the relay database.
    EpochMismatch { ours: Option<Epoch>, theirs: Epoch },
    /// The replica has no epoch and the batch does not start the stream at seq 1.
    NoBaseline { theirs: Epoch },
    /// Two different events with the same seq.
    ConflictingEvents { seq: u64 },
}

/// The decision for one batch.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SyncPlan {
    /// Writes to commit, at most one per user (its final state in this batch).
    pub changes: Vec<Change>,
    /// The cursor to commit together with `changes`.
    pub cursor: ReplicaCursor,
    /// Set when events beyond the contiguous prefix were seen (and held back).
    pub gap: Option<Gap>,
    /// Set when nothing was applied because a snapshot is needed.
    pub resync: Option<ResyncNeeded>,
    /// Events at or below the old cursor (redeliveries).
    pub already_applied: usize,
    /// Events in the prefix whose version was not newer than the stored one.
    pub stale: usize,
    /// Events beyond a gap, not applied.
    pub held_back: usize,
}

impl SyncPlan {
    /// True when the replica is at the end of what this batch showed (no gap, no resync).
    pub fn caught_up(&self) -> bool {
        self.gap.is_none() && self.resync.is_none()
    }

    /// The first seq the relay should replay after this batch.
    pub fn replay_from(&self) -> u64 {
        self.cursor.applied_seq + 1
    }
}

/// The users whose stored versions [`plan`] needs to see.
pub fn touched_users(events: &[SyncEvent]) -> Vec<UserId> {
    let mut users: Vec<UserId> = events.iter().map(|e| e.user_id).collect();
    users.sort_unstable();
    users.dedup();
    users
}

/// Decides what a batch of events (any order, duplicates allowed) does to a replica at `cursor`
/// whose stored versions for the touched users are `stored` (a tombstone's version included;
/// absent = never seen). Whether a stored row is live does not matter: only a newer version
/// changes anything.
pub fn plan(
    cursor: ReplicaCursor,
    stored: &HashMap<UserId, u64>,
    events: &[SyncEvent],
) -> SyncPlan {
    let mut out = SyncPlan {
        cursor,
        ..SyncPlan::default()
    };
    let Some(first) = events.first() else {
        return out;
    };
    let theirs = first.epoch;
    if let Some(e) = events
        .iter()
        .find(|e| Some(e.epoch) != cursor.epoch.or(Some(theirs)))
    {
        out.resync = Some(ResyncNeeded::EpochMismatch {
            ours: cursor.epoch,
            theirs: e.epoch,
        });
        return out;
    }

    let mut sorted: Vec<&SyncEvent> = events.iter().collect();
    sorted.sort_by_key(|e| e.seq);
    let mut unique: Vec<&SyncEvent> = Vec::with_capacity(sorted.len());
    for e in sorted {
        match unique.last() {
            Some(prev) if prev.seq == e.seq => {
                if *prev != e {
                    out.resync = Some(ResyncNeeded::ConflictingEvents { seq: e.seq });
                    return out;
                }
            }
            _ => unique.push(e),
        }
    }

    if cursor.epoch.is_none() && !unique.iter().any(|e| e.seq == 1) {
        // An empty replica may only start from the very beginning of the stream.
        if unique.iter().any(|e| e.seq > cursor.applied_seq) {
            out.resync = Some(ResyncNeeded::NoBaseline { theirs });
        }
        return out;
    }

    // The version each user has after the events applied so far in this batch.
    let mut working: HashMap<UserId, u64> = HashMap::new();
    let mut change_at: HashMap<UserId, usize> = HashMap::new();
    let mut next = cursor.applied_seq + 1;
    for e in unique {
        if e.seq < next {
            out.already_applied += 1;
            continue;
        }
        if e.seq > next {
            if out.gap.is_none() {
                out.gap = Some(Gap {
                    from: next,
                    to: e.seq - 1,
                });
            }
            out.held_back += 1;
            continue;
        }
        next += 1;
        let current = working
            .get(&e.user_id)
            .copied()
            .or_else(|| stored.get(&e.user_id).copied());
        if current.is_some_and(|v| v >= e.version) {
            out.stale += 1;
            continue;
        }
        let state = match &e.op {
            SyncOp::Upsert(f) => UserState::Live(f.clone()),
            SyncOp::Delete => UserState::Tombstone,
        };
        working.insert(e.user_id, e.version);
        let change = Change {
            user_id: e.user_id,
            version: e.version,
            state,
        };
        match change_at.get(&e.user_id) {
            Some(&i) => out.changes[i] = change,
            None => {
                change_at.insert(e.user_id, out.changes.len());
                out.changes.push(change);
            }
        }
    }
    out.cursor = ReplicaCursor {
        epoch: Some(theirs),
        applied_seq: next - 1,
    };
    if out.cursor.applied_seq == cursor.applied_seq && cursor.epoch.is_none() {
        // Nothing of the stream's start was applied: stay without an epoch.
        out.cursor.epoch = None;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, seq::SliceRandom};
    use rand_chacha::ChaCha8Rng;

    const EPOCH: Epoch = Epoch(7);

    /// An in-memory replica: what a store holds, reduced to plain maps.
    #[derive(Default, Clone, Debug, PartialEq)]
    struct Replica {
        cursor: ReplicaCursor,
        users: HashMap<UserId, (u64, Option<Features>)>,
    }

    impl Replica {
        fn apply(&mut self, events: &[SyncEvent]) -> SyncPlan {
            let stored = self.users.iter().map(|(u, (v, _))| (*u, *v)).collect();
            let p = plan(self.cursor, &stored, events);
            // What `store::apply_batch` relies on to write only when the cursor moves.
            assert!(
                p.changes.is_empty() || p.cursor != self.cursor,
                "changes without the cursor moving"
            );
            assert!(
                p.resync.is_none() || (p.changes.is_empty() && p.cursor == self.cursor),
                "a resync that changes something"
            );
            for c in &p.changes {
                let f = match &c.state {
                    UserState::Live(f) => Some(f.clone()),
                    UserState::Tombstone => None,
                };
                let old = self.users.insert(c.user_id, (c.version, f));
                assert!(
                    old.is_none_or(|o| o.0 < c.version),
                    "version went backwards"
                );
            }
            self.cursor = p.cursor;
            p
        }
        fn live(&self) -> HashMap<UserId, (u64, Features)> {
            self.users
                .iter()
                .filter_map(|(u, (v, f))| f.clone().map(|f| (*u, (*v, f))))
                .collect()
        }
    }

    /// The relay's projection of `history[..upto]`: each user's latest live state.
    fn projection(history: &[SyncEvent], upto: u64) -> HashMap<UserId, (u64, Features)> {
        let mut m: HashMap<UserId, (u64, Option<Features>)> = HashMap::new();
        for e in history.iter().filter(|e| e.seq <= upto) {
            let f = match &e.op {
                SyncOp::Upsert(f) => Some(f.clone()),
                SyncOp::Delete => None,
            };
            m.insert(e.user_id, (e.version, f));
        }
        m.into_iter()
            .filter_map(|(u, (v, f))| f.map(|f| (u, (v, f))))
            .collect()
    }

    fn deliver_with_faults(history: &[SyncEvent], seed: u64) -> Vec<Vec<SyncEvent>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut stream: Vec<SyncEvent> = Vec::new();
        for e in history {
            match rng.random_range(0..10) {
                0 => {}                                         // dropped
                1 | 2 => stream.extend([e.clone(), e.clone()]), // duplicated
                _ => stream.push(e.clone()),
            }
        }
        // Local reorderings, and some old events redelivered late.
        for _ in 0..stream.len() / 3 {
            let i = rng.random_range(0..stream.len().max(1));
            let j = (i + rng.random_range(0..5)).min(stream.len() - 1);
            stream.swap(i, j);
        }
        if !history.is_empty() {
            for _ in 0..rng.random_range(0..4) {
                let late = history[rng.random_range(0..history.len())].clone();
                let at = rng.random_range(0..=stream.len());
                stream.insert(at, late);
            }
        }
        let mut batches = Vec::new();
        while !stream.is_empty() {
            let n = rng.random_range(1..=stream.len().min(6));
            batches.push(stream.drain(..n).collect());
        }
        batches
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn faulty_delivery_then_catch_up_converges(seed in any::<u64>(), users in 1usize..12, len in 0usize..80) {
            let history = synth::relay_history(EPOCH, users, len, seed);
            let mut r = Replica::default();
            for batch in deliver_with_faults(&history, seed ^ 0x5eed) {
                r.apply(&batch);
                // The replica is always exactly the relay's projection at its cursor.
                prop_assert_eq!(r.live(), projection(&history, r.cursor.applied_seq));
            }
            // Catch-up: the replay the machine asks for, in small chunks.
            let mut rounds = 0;
            while r.cursor.applied_seq < history.len() as u64 {
                let from = r.cursor.applied_seq as usize;
                let chunk: Vec<_> = history[from..].iter().take(5).cloned().collect();
                let p = r.apply(&chunk);
                prop_assert!(p.resync.is_none(), "{:?}", p.resync);
                rounds += 1;
                prop_assert!(rounds <= history.len() + 1);
            }
            prop_assert_eq!(r.live(), projection(&history, history.len() as u64));
            if !history.is_empty() {
                prop_assert_eq!(r.cursor.epoch, Some(EPOCH));
            }
        }

        #[test]
        fn shuffled_complete_batch_equals_in_order(seed in any::<u64>(), len in 1usize..60) {
            let history = synth::relay_history(EPOCH, 5, len, seed);
            let mut shuffled = history.clone();
            shuffled.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            let mut a = Replica::default();
            a.apply(&shuffled);
            let mut b = Replica::default();
            for e in &history {
                b.apply(std::slice::from_ref(e));
            }
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn gap_is_reported_and_cursor_held() {
        let h = synth::relay_history(EPOCH, 3, 10, 1);
        let mut r = Replica::default();
        let p = r.apply(&[h[0].clone(), h[1].clone(), h[4].clone(), h[6].clone()]);
        assert_eq!(p.cursor.applied_seq, 2);
        assert_eq!(p.gap, Some(Gap { from: 3, to: 4 }));
        assert_eq!(p.held_back, 2);
        assert!(!p.caught_up());
    }

    #[test]
    fn delete_tombstone_blocks_older_upsert() {
        let h = synth::relay_history(EPOCH, 1, 0, 1);
        assert!(h.is_empty());
        let u = synth::user_id(1);
        let f = synth::features(&mut ChaCha8Rng::seed_from_u64(3));
        let ev = |seq, version, op| SyncEvent {
            epoch: EPOCH,
            seq,
            user_id: u,
            version,
            op,
        };
        let mut r = Replica::default();
        r.apply(&[
            ev(1, 1, SyncOp::Upsert(f.clone())),
            ev(2, 3, SyncOp::Delete),
        ]);
        // A stale upsert (version 2) arriving later under a new seq must not resurrect.
        r.apply(&[ev(3, 2, SyncOp::Upsert(f.clone()))]);
        assert!(r.live().is_empty());
        assert_eq!(r.users[&u].0, 3);
    }

    #[test]
    fn epoch_rules() {
        let h = synth::relay_history(EPOCH, 3, 5, 2);
        // Empty replica, stream not from the start: needs a snapshot.
        let mut r = Replica::default();
        let p = r.apply(&h[2..]);
        assert_eq!(p.resync, Some(ResyncNeeded::NoBaseline { theirs: EPOCH }));
        assert_eq!(r.cursor, ReplicaCursor::default());
        // From seq 1 it adopts the epoch.
        r.apply(&h);
        assert_eq!(r.cursor.epoch, Some(EPOCH));
        // Another lineage: refused whole.
        let mut other = h[0].clone();
        other.epoch = Epoch(8);
        other.seq = 6;
        let p = r.apply(&[other]);
        assert_eq!(
            p.resync,
            Some(ResyncNeeded::EpochMismatch {
                ours: Some(EPOCH),
                theirs: Epoch(8)
            })
        );
        assert_eq!(r.cursor.applied_seq, 5);
    }

    #[test]
    fn duplicates_and_stale_versions_are_counted_not_applied() {
        let h = synth::relay_history(EPOCH, 3, 6, 5);
        let mut r = Replica::default();
        r.apply(&h[..4]);
        // Seqs 1–4 again (below the cursor), seq 5 twice, and seq 6 once.
        let mut batch: Vec<SyncEvent> = h[..4].to_vec();
        batch.extend([h[4].clone(), h[4].clone(), h[5].clone()]);
        let p = r.apply(&batch);
        assert_eq!(p.already_applied, 4, "{p:?}");
        assert_eq!(
            p.changes.len(),
            2 - usize::from(h[4].user_id == h[5].user_id)
        );
        assert_eq!(p.cursor.applied_seq, 6);
        assert_eq!((p.stale, p.held_back), (0, 0));
        // A new seq carrying a version the replica already has is stale: counted, not a change.
        let mut old = h[5].clone();
        old.seq = 7;
        let p = r.apply(&[old]);
        assert_eq!((p.stale, p.already_applied), (1, 0), "{p:?}");
        assert!(p.changes.is_empty());
        assert_eq!(
            p.cursor.applied_seq, 7,
            "a stale event still advances the cursor"
        );
    }

    #[test]
    fn conflicting_duplicate_seq_is_refused() {
        let h = synth::relay_history(EPOCH, 3, 3, 4);
        let mut bad = h[1].clone();
        bad.version += 10;
        let p = plan(
            ReplicaCursor::default(),
            &HashMap::new(),
            &[h[0].clone(), h[1].clone(), bad],
        );
        assert_eq!(p.resync, Some(ResyncNeeded::ConflictingEvents { seq: 2 }));
        assert!(p.changes.is_empty());
    }
}
