//! Crash test: a child process (`comatching-appliance sync-drill`) applies a seeded sync history
//! to a real store in small durable batches, printing `committed <seq>` after each commit; the
//! parent kill -9s it at seeded random moments, reopens the store and checks that
//! * the cursor is at least the last seq the child reported (a reported commit is durable),
//! * the content is exactly the relay's projection at the cursor (cursor and content agree),
//! * count and digest equal a recount of the rows,
//! * no user's version went backwards since the previous round,
//!
//! and finally that a catch-up from the cursor converges to the full projection. The seed is
//! printed in every failure; set `CRASH_SEED` to replay one and `CRASH_ROUNDS` for a longer soak.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use comatching_appliance::bench::drill_history;
use comatching_appliance::store::{self, StoreBackend};
use comatching_protocol::{Features, SyncEvent, SyncOp, UserId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BIN: &str = env!("CARGO_BIN_EXE_comatching-appliance");
/// Kill rounds per backend; `CRASH_ROUNDS` raises it for a soak.
fn rounds() -> usize {
    std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24)
}
/// How long to wait for the child's next line before calling it hung.
const DEADLINE: Duration = Duration::from_secs(60);

fn seed() -> u64 {
    std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        })
}

type Rows = HashMap<UserId, (u64, Option<Features>)>;

fn projection(history: &[SyncEvent], upto: u64) -> Rows {
    let mut m = Rows::new();
    for e in history.iter().take_while(|e| e.seq <= upto) {
        let f = match &e.op {
            SyncOp::Upsert(f) => Some(f.clone()),
            SyncOp::Delete => None,
        };
        m.insert(e.user_id, (e.version, f));
    }
    m
}

/// Live rows equal the projection's live users (same versions and features); tombstone rows,
/// when kept, carry the projection's version.
fn assert_matches_projection(rows: &Rows, want: &Rows, ctx: &str) {
    let live = |m: &Rows| -> HashMap<UserId, (u64, Features)> {
        m.iter()
            .filter_map(|(u, (v, f))| f.clone().map(|f| (*u, (*v, f))))
            .collect()
    };
    assert!(
        live(rows) == live(want),
        "{ctx}: live content is not the projection"
    );
    for (u, (v, f)) in rows {
        if f.is_none() {
            assert_eq!(
                want.get(u).map(|w| (w.0, w.1.is_none())),
                Some((*v, true)),
                "{ctx}: tombstone of {u}"
            );
        }
    }
}

/// Runs the drill child until it has reported `kill_after` commits (then kill -9s it after a
/// short random busy-wait), or until it finishes. Returns the last seq it reported.
fn run_child(
    backend: StoreBackend,
    dir: &Path,
    seed: u64,
    kill_after: Option<(usize, u64)>,
) -> u64 {
    let mut child = Command::new(BIN)
        .args(["sync-drill", "--backend", backend.as_str(), "--seed"])
        .arg(seed.to_string())
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the appliance binary");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut last = 0u64;
    let mut seen = 0usize;
    loop {
        if let Some((n, spin_us)) = kill_after
            && seen >= n
        {
            let until = Instant::now() + Duration::from_micros(spin_us);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            child.kill().expect("kill -9 the child");
            break;
        }
        match rx.recv_timeout(DEADLINE) {
            Ok(line) if line == "done" => break,
            Ok(line) => {
                let seq = line
                    .strip_prefix("committed ")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("seed {seed}: unexpected child line {line:?}"));
                assert!(seq >= last, "seed {seed}: reported cursor went back");
                last = seq;
                seen += 1;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("seed {seed}: child silent for {DEADLINE:?}");
            }
        }
    }
    let status = child.wait().expect("reap the child");
    let _ = reader.join();
    if kill_after.is_none() {
        assert!(status.success(), "seed {seed}: drill failed: {status}");
    }
    last
}

fn crash_rounds(backend: StoreBackend) {
    let seed = seed();
    eprintln!(
        "crash test {}: seed {seed} (CRASH_SEED={seed} to replay)",
        backend.as_str()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let history = drill_history(seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut prev_rows = Rows::new();
    let mut prev_seq = 0u64;
    for round in 0..rounds() {
        let kill_after = rng.random_range(0..=25);
        let spin_us = rng.random_range(0..2_000);
        let reported = run_child(backend, dir.path(), seed, Some((kill_after, spin_us)));
        let ctx = format!("seed {seed}, {} round {round}", backend.as_str());
        let s = store::open(backend, dir.path())
            .unwrap_or_else(|e| panic!("{ctx}: reopen after kill -9 failed: {e}"));
        let meta = s.meta().unwrap_or_else(|e| panic!("{ctx}: meta: {e}"));
        let seq = meta.cursor.applied_seq;
        assert!(
            seq >= reported,
            "{ctx}: cursor {seq} behind reported commit {reported}"
        );
        assert!(
            seq >= prev_seq,
            "{ctx}: cursor went back {prev_seq} -> {seq}"
        );
        assert_eq!(
            s.recount()
                .unwrap_or_else(|e| panic!("{ctx}: recount: {e}")),
            (meta.count, meta.digest),
            "{ctx}: meta disagrees with a recount"
        );
        let rows: Rows = s
            .all_rows()
            .unwrap_or_else(|e| panic!("{ctx}: rows: {e}"))
            .into_iter()
            .map(|r| (r.user_id, (r.version, r.features)))
            .collect();
        assert_matches_projection(&rows, &projection(&history, seq), &ctx);
        for (u, (v, _)) in &prev_rows {
            // A snapshot swap drops tombstones (the stream resumes past them); a row that is
            // there must not be older.
            assert!(
                rows.get(u).is_none_or(|r| r.0 >= *v),
                "{ctx}: version of {u} went back"
            );
        }
        eprintln!("{ctx}: killed after {kill_after} commits; reported {reported}, durable {seq}");
        prev_rows = rows;
        prev_seq = seq;
    }
    // Catch-up from wherever the last kill left the cursor.
    run_child(backend, dir.path(), seed, None);
    let s = store::open(backend, dir.path()).expect("reopen");
    let meta = s.meta().expect("meta");
    assert_eq!(meta.cursor.applied_seq, history.len() as u64, "seed {seed}");
    assert_eq!(
        s.recount().expect("recount"),
        (meta.count, meta.digest),
        "seed {seed}"
    );
    let rows: Rows = s
        .all_rows()
        .expect("rows")
        .into_iter()
        .map(|r| (r.user_id, (r.version, r.features)))
        .collect();
    assert_matches_projection(
        &rows,
        &projection(&history, history.len() as u64),
        &format!("seed {seed}: catch-up"),
    );
}

#[test]
fn sqlite_survives_kill_9() {
    crash_rounds(StoreBackend::Sqlite);
}

#[test]
fn sled_survives_kill_9() {
    crash_rounds(StoreBackend::Sled);
}
