//! One conformance suite, run against every backend on real files in temp dirs.

use std::collections::HashMap;
use std::path::Path;

use comatching_protocol::{Digest, Epoch, SnapshotUser, SyncEvent, SyncOp, UserId};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{ReplicaStore, StoreBackend, StoreError, apply_batch, open};
use crate::sync::{Change, ReplicaCursor, UserState};
use crate::synth;

const EPOCH: Epoch = Epoch(0xfeed);

fn live(u: u64, version: u64, seed: u64) -> Change {
    Change {
        user_id: synth::user_id(u),
        version,
        state: UserState::Live(synth::features(&mut ChaCha8Rng::seed_from_u64(seed))),
    }
}

fn cursor(seq: u64) -> ReplicaCursor {
    ReplicaCursor {
        epoch: Some(EPOCH),
        applied_seq: seq,
    }
}

fn assert_consistent(s: &dyn ReplicaStore) {
    let meta = s.meta().unwrap();
    assert_eq!(s.recount().unwrap(), (meta.count, meta.digest));
}

/// Each live user's stored version.
fn live_versions(s: &dyn ReplicaStore) -> HashMap<UserId, u64> {
    s.live_users()
        .unwrap()
        .into_iter()
        .map(|u| (u.user_id, u.version))
        .collect()
}

/// The relay's projection: live users and versions after the whole history.
fn projection(history: &[SyncEvent]) -> HashMap<UserId, u64> {
    let mut m = HashMap::new();
    for e in history {
        match e.op {
            SyncOp::Upsert(_) => m.insert(e.user_id, e.version),
            SyncOp::Delete => m.remove(&e.user_id),
        };
    }
    m
}

fn fresh_store_is_empty(b: StoreBackend) {
    let dir = tempfile::tempdir().unwrap();
    let s = open(b, dir.path()).unwrap();
    assert_eq!(s.backend(), b);
    let m = s.meta().unwrap();
    assert_eq!(m.cursor, ReplicaCursor::default());
    assert_eq!((m.count, m.digest), (0, Digest::default()));
    assert!(s.live_users().unwrap().is_empty());
}

fn commit_survives_reopen(b: StoreBackend) {
    let dir = tempfile::tempdir().unwrap();
    let changes = vec![live(1, 1, 1), live(2, 4, 2), live(3, 1, 3)];
    {
        let mut s = open(b, dir.path()).unwrap();
        s.commit(&changes, cursor(3)).unwrap();
    }
    let s = open(b, dir.path()).unwrap();
    let m = s.meta().unwrap();
    assert_eq!(m.cursor, cursor(3));
    assert_eq!(m.count, 3);
    assert_consistent(&*s);
    let got = s.get(synth::user_id(2)).unwrap().unwrap();
    assert_eq!(got.version, 4);
    let UserState::Live(f) = &changes[1].state else {
        unreachable!()
    };
    assert_eq!(got.features.as_ref(), Some(f));
    assert!(s.get(synth::user_id(9)).unwrap().is_none());
}

fn tombstones_and_versions_never_go_back(b: StoreBackend) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(b, dir.path()).unwrap();
    s.commit(&[live(1, 1, 1), live(2, 1, 2)], cursor(2))
        .unwrap();
    let tomb = Change {
        user_id: synth::user_id(1),
        version: 2,
        state: UserState::Tombstone,
    };
    s.commit(&[tomb], cursor(3)).unwrap();
    assert_eq!(s.meta().unwrap().count, 1);
    // A tombstone keeps its version; a user never seen has none.
    let v = s.versions(&[synth::user_id(1), synth::user_id(5)]).unwrap();
    assert_eq!(v, HashMap::from([(synth::user_id(1), 2)]));
    // An older write is ignored by the store too.
    s.commit(&[live(1, 1, 9), live(2, 1, 9)], cursor(4))
        .unwrap();
    assert!(
        s.get(synth::user_id(1))
            .unwrap()
            .unwrap()
            .features
            .is_none()
    );
    assert_eq!(s.meta().unwrap().count, 1);
    assert_consistent(&*s);
    // Resurrection by a newer version is allowed.
    s.commit(&[live(1, 3, 9)], cursor(5)).unwrap();
    assert_eq!(s.meta().unwrap().count, 2);
    assert_eq!(s.all_rows().unwrap().len(), 2);
    assert_consistent(&*s);
}

/// A stale event (older than what the replica holds, under a new seq) is counted as stale and
/// is not among the plan's changes: the engine applies `plan.changes`, so a stale upsert after
/// a delete would bring the user back into the matcher even though the store ignores it.
fn stale_events_are_not_changes(b: StoreBackend) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(b, dir.path()).unwrap();
    let u = synth::user_id(1);
    let f = synth::features(&mut ChaCha8Rng::seed_from_u64(4));
    let ev = |seq, version, op| SyncEvent {
        epoch: EPOCH,
        seq,
        user_id: u,
        version,
        op,
    };
    apply_batch(
        &mut *s,
        &[
            ev(1, 1, SyncOp::Upsert(f.clone())),
            ev(2, 3, SyncOp::Delete),
        ],
    )
    .unwrap();
    let p = apply_batch(&mut *s, &[ev(3, 2, SyncOp::Upsert(f.clone()))]).unwrap();
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    assert_eq!(p.stale, 1);
    assert_eq!(p.cursor, cursor(3));
    let p = apply_batch(&mut *s, &[ev(4, 4, SyncOp::Upsert(f))]).unwrap();
    assert_eq!(p.changes.len(), 1);
    assert_eq!(p.stale, 0);
    assert_eq!(s.meta().unwrap().count, 1);
}

fn sync_history_matches_projection(b: StoreBackend) {
    let dir = tempfile::tempdir().unwrap();
    let history = synth::relay_history(EPOCH, 20, 200, 11);
    {
        let mut s = open(b, dir.path()).unwrap();
        for chunk in history.chunks(17) {
            let p = apply_batch(&mut *s, chunk).unwrap();
            assert!(p.caught_up());
        }
    }
    let s = open(b, dir.path()).unwrap();
    assert_eq!(s.meta().unwrap().cursor, cursor(200));
    let got = live_versions(&*s);
    assert_eq!(got, projection(&history));
    assert_consistent(&*s);
}

fn replace_all_swaps_everything(b: StoreBackend) {
    let dir = tempfile::tempdir().unwrap();
    let snapshot: Vec<SnapshotUser> = synth::population(50, 5)
        .into_iter()
        .enumerate()
        .map(|(i, (user_id, features))| SnapshotUser {
            user_id,
            version: i as u64 + 1,
            features,
        })
        .collect();
    {
        let mut s = open(b, dir.path()).unwrap();
        s.commit(&[live(1000, 1, 1), live(1001, 1, 2)], cursor(2))
            .unwrap();
        s.replace_all(Epoch(99), 500, &snapshot).unwrap();
        assert_eq!(s.meta().unwrap().count, 50);
    }
    let mut s = open(b, dir.path()).unwrap();
    let m = s.meta().unwrap();
    assert_eq!(m.cursor.epoch, Some(Epoch(99)));
    assert_eq!(m.cursor.applied_seq, 500);
    assert_eq!(m.count, 50);
    assert!(s.get(synth::user_id(1000)).unwrap().is_none());
    assert_eq!(
        m.digest,
        Digest::of(snapshot.iter().map(|u| (u.user_id, u.version)))
    );
    assert_consistent(&*s);
    // And again (the sled backend switches generations each time).
    s.replace_all(Epoch(100), 7, &snapshot[..10]).unwrap();
    drop(s);
    let s = open(b, dir.path()).unwrap();
    assert_eq!(s.meta().unwrap().count, 10);
    assert_consistent(&*s);
}

/// A snapshot is input from the wire and nothing there stops it from listing a user twice: the
/// newest version is kept, once, and the summary counts it once.
fn a_snapshot_listing_a_user_twice_keeps_the_newest_once(b: StoreBackend) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = open(b, dir.path()).unwrap();
    let pop = synth::population(3, 8);
    let at = |i: usize, version: u64| SnapshotUser {
        user_id: pop[i].0,
        version,
        features: pop[i].1.clone(),
    };
    // User 0 older first, user 1 newer first, user 2 twice at one version.
    let snapshot = [at(0, 3), at(1, 7), at(0, 5), at(2, 2), at(1, 4), at(2, 2)];
    s.replace_all(Epoch(3), 40, &snapshot).unwrap();
    let want = HashMap::from([(pop[0].0, 5), (pop[1].0, 7), (pop[2].0, 2)]);
    let m = s.meta().unwrap();
    assert_eq!(m.count, 3);
    assert_eq!(m.digest, Digest::of(want.clone()));
    assert_eq!(s.all_rows().unwrap().len(), 3);
    assert_eq!(live_versions(&*s), want);
    assert_consistent(&*s);
}

fn corrupt_row_is_an_error(b: StoreBackend, corrupt: fn(&Path, UserId)) {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(b, dir.path()).unwrap();
        s.commit(&[live(1, 1, 1), live(2, 1, 2)], cursor(2))
            .unwrap();
    }
    corrupt(dir.path(), synth::user_id(2));
    let s = open(b, dir.path()).unwrap();
    let e = s.get(synth::user_id(2)).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains(&synth::user_id(2).to_hex()), "{e}");
    assert_eq!(e.code(), "store_corrupt");
    assert!(s.live_users().is_err());
    assert!(s.get(synth::user_id(1)).unwrap().is_some());
}

fn corrupt_sqlite(dir: &Path, user: UserId) {
    let c = rusqlite::Connection::open(dir.join("replica.sqlite3")).unwrap();
    c.execute(
        "UPDATE users SET features = x'c1c1' WHERE user_id = ?1",
        [&super::user_key(user)[..]],
    )
    .unwrap();
}

/// A raw sled handle on a store's files. The store just dropped may still hold the lock for a
/// moment (its flusher thread).
fn sled_handle(path: &Path) -> ::sled::Db {
    super::sled_store::open_waiting_for_lock(path, super::sled_store::LOCK_PATIENCE).unwrap()
}

fn corrupt_sled(dir: &Path, user: UserId) {
    let db = sled_handle(&dir.join("replica.sled"));
    let tree = db.open_tree("replica-0").unwrap();
    let mut key = vec![1u8];
    key.extend_from_slice(&super::user_key(user));
    let mut v = tree.get(&key).unwrap().unwrap().to_vec();
    v.truncate(12);
    tree.insert(key, v).unwrap();
    db.flush().unwrap();
}

fn faulty_delivery_converges(b: StoreBackend, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let history = synth::relay_history(EPOCH, 8, 40, seed);
    let mut s = open(b, dir.path()).unwrap();
    // Deliver every other event shuffled, in batches of 3: gaps everywhere.
    let mut stream: Vec<SyncEvent> = history.iter().step_by(2).cloned().collect();
    stream.reverse();
    for chunk in stream.chunks(3) {
        apply_batch(&mut *s, chunk).unwrap();
    }
    // The replay from the cursor, 7 events at a time: each round must move the cursor, so a
    // store that loses it fails here instead of replaying for ever.
    for _ in 0..history.len() {
        let from = s.meta().unwrap().cursor.applied_seq as usize;
        if from == history.len() {
            break;
        }
        let p = apply_batch(&mut *s, &history[from..(from + 7).min(history.len())]).unwrap();
        assert!(p.resync.is_none());
        assert!(
            p.cursor.applied_seq > from as u64,
            "the replay did not move the cursor"
        );
    }
    assert_eq!(s.meta().unwrap().cursor.applied_seq, history.len() as u64);
    let got = live_versions(&*s);
    assert_eq!(got, projection(&history), "seed {seed}");
    assert_consistent(&*s);
}

macro_rules! conformance {
    ($modname:ident, $backend:expr, $corrupt:expr) => {
        mod $modname {
            use super::*;
            #[test]
            fn fresh_store_is_empty() {
                super::fresh_store_is_empty($backend);
            }
            #[test]
            fn commit_survives_reopen() {
                super::commit_survives_reopen($backend);
            }
            #[test]
            fn tombstones_and_versions_never_go_back() {
                super::tombstones_and_versions_never_go_back($backend);
            }
            #[test]
            fn stale_events_are_not_changes() {
                super::stale_events_are_not_changes($backend);
            }
            #[test]
            fn sync_history_matches_projection() {
                super::sync_history_matches_projection($backend);
            }
            #[test]
            fn replace_all_swaps_everything() {
                super::replace_all_swaps_everything($backend);
            }
            #[test]
            fn a_snapshot_listing_a_user_twice_keeps_the_newest_once() {
                super::a_snapshot_listing_a_user_twice_keeps_the_newest_once($backend);
            }
            #[test]
            fn corrupt_row_is_an_error() {
                super::corrupt_row_is_an_error($backend, $corrupt);
            }
            proptest! {
                #![proptest_config(ProptestConfig::with_cases(12))]
                #[test]
                fn faulty_delivery_converges(seed in any::<u64>()) {
                    super::faulty_delivery_converges($backend, seed);
                }
            }
        }
    };
}

conformance!(sqlite, StoreBackend::Sqlite, corrupt_sqlite);
conformance!(sled, StoreBackend::Sled, corrupt_sled);

#[test]
fn backend_names_are_lowercase() {
    assert_eq!(
        serde_json::to_string(&StoreBackend::Sled).unwrap(),
        "\"sled\""
    );
    assert_eq!(
        serde_json::from_str::<StoreBackend>("\"sqlite\"").unwrap(),
        StoreBackend::Sqlite
    );
    assert_eq!("sled".parse::<StoreBackend>().unwrap(), StoreBackend::Sled);
    assert!("rocks".parse::<StoreBackend>().is_err());
    // The name on the status page is the one the configuration takes.
    for b in [StoreBackend::Sqlite, StoreBackend::Sled] {
        assert_eq!(b.as_str().parse::<StoreBackend>().unwrap(), b);
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            format!("\"{}\"", b.as_str())
        );
    }
}

#[test]
fn sled_interrupted_snapshot_leaves_the_old_replica() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(StoreBackend::Sled, dir.path()).unwrap();
        s.commit(&[live(1, 1, 1), live(2, 1, 2)], cursor(2))
            .unwrap();
    }
    {
        // What a kill between writing generation 1 and flipping `active` leaves behind.
        let db = sled_handle(&dir.path().join("replica.sled"));
        let half = db.open_tree("replica-1").unwrap();
        half.insert([1u8; 17], vec![0u8; 3]).unwrap();
        db.flush().unwrap();
    }
    let mut s = open(StoreBackend::Sled, dir.path()).unwrap();
    assert_eq!(s.meta().unwrap().cursor, cursor(2));
    assert_eq!(s.live_users().unwrap().len(), 2);
    assert_consistent(&*s);
    // And the next snapshot still works.
    s.replace_all(Epoch(5), 9, &[]).unwrap();
    assert_eq!(s.meta().unwrap().count, 0);
}

#[test]
fn sqlite_snapshot_is_one_transaction() {
    // A snapshot that fails half-way (a duplicate primary key cannot happen through the API,
    // so force a failure with a trigger) must leave the old replica.
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(StoreBackend::Sqlite, dir.path()).unwrap();
        s.commit(&[live(1, 1, 1), live(2, 1, 2)], cursor(2))
            .unwrap();
    }
    let c = rusqlite::Connection::open(dir.path().join("replica.sqlite3")).unwrap();
    c.execute_batch(
        "CREATE TRIGGER fail_third AFTER INSERT ON users
         WHEN (SELECT count(*) FROM users) >= 3 BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
    )
    .unwrap();
    drop(c);
    let mut s = open(StoreBackend::Sqlite, dir.path()).unwrap();
    let snapshot = synth::snapshot(5, 1);
    assert!(s.replace_all(Epoch(5), 9, &snapshot).is_err());
    drop(s);
    let s = open(StoreBackend::Sqlite, dir.path()).unwrap();
    assert_eq!(s.meta().unwrap().cursor, cursor(2));
    assert_eq!(s.live_users().unwrap().len(), 2);
    assert_consistent(&*s);
}

/// Meta fields that cannot be what a commit wrote are damage, named as such (the node moves
/// the replica aside and resyncs: store::damage), never read as a position.
#[test]
fn sqlite_meta_out_of_range_is_corrupt() {
    for column in ["applied_seq", "count"] {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = open(StoreBackend::Sqlite, dir.path()).unwrap();
            s.commit(&[live(1, 1, 1)], cursor(1)).unwrap();
        }
        let c = rusqlite::Connection::open(dir.path().join("replica.sqlite3")).unwrap();
        c.execute(&format!("UPDATE meta SET {column} = -1"), [])
            .unwrap();
        drop(c);
        let s = open(StoreBackend::Sqlite, dir.path()).unwrap();
        let e = s.meta().unwrap_err();
        assert!(
            matches!(e, StoreError::CorruptMeta { key: "meta", .. }),
            "{column}: {e}"
        );
        assert_eq!(e.code(), "store_corrupt");
    }
}

#[test]
fn sled_meta_of_the_wrong_shape_is_corrupt() {
    let flag_two = {
        let mut v = vec![0u8; 33];
        v[0] = 2;
        v
    };
    for bad in [vec![], vec![0u8; 32], vec![0u8; 34], flag_two] {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = open(StoreBackend::Sled, dir.path()).unwrap();
            s.commit(&[live(1, 1, 1)], cursor(1)).unwrap();
        }
        {
            let db = sled_handle(&dir.path().join("replica.sled"));
            db.open_tree("replica-0")
                .unwrap()
                .insert([0u8], bad.clone())
                .unwrap();
            db.flush().unwrap();
        }
        let s = open(StoreBackend::Sled, dir.path()).unwrap();
        let e = s.meta().unwrap_err();
        assert!(
            matches!(e, StoreError::CorruptMeta { key: "meta", .. }),
            "{bad:?}: {e}"
        );
    }
}

/// The sled row format (`version ‖ flag ‖ features`) is read back exactly and nothing else is
/// taken for a row: a tombstone is exactly nine bytes, a live row has features after its flag.
#[test]
fn rows_decode_exactly_what_was_encoded_and_nothing_else() {
    let u = synth::user_id(7);
    let f = synth::features(&mut ChaCha8Rng::seed_from_u64(7));
    let live_row = super::encode_row(3, &UserState::Live(f.clone()));
    let tomb_row = super::encode_row(u64::MAX, &UserState::Tombstone);
    assert_eq!(
        super::decode_row(u, &live_row).unwrap(),
        super::StoredUser {
            user_id: u,
            version: 3,
            features: Some(f)
        }
    );
    assert_eq!(tomb_row.len(), 9);
    let tomb = super::decode_row(u, &tomb_row).unwrap();
    assert_eq!((tomb.version, tomb.features), (u64::MAX, None));
    let mut flag_two = tomb_row.clone();
    flag_two[8] = 2;
    for bad in [
        vec![],
        tomb_row[..8].to_vec(),
        [&tomb_row[..], &[0]].concat(),
        live_row[..9].to_vec(),
        flag_two,
    ] {
        let e = super::decode_row(u, &bad).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{bad:?}: {e}");
    }
}

/// Opening sled gives up on a lock another handle holds, once its patience is spent and not
/// before. (Waiting for a lock that is let go of — a dropped handle's flusher thread — is what
/// every reopen in this suite does.)
#[test]
fn sled_open_gives_up_on_a_held_lock_after_its_patience() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.sled");
    let _held = sled_handle(&path);
    let started = Instant::now();
    let e = super::sled_store::open_waiting_for_lock(&path, Duration::from_millis(300))
        .expect_err("a held lock is not acquired");
    assert!(e.to_string().contains("could not acquire lock"), "{e}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "gave up before its patience"
    );
}
