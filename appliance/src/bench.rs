//! Measurements behind `comatching-appliance bench`, and the sync drill the crash test kills.
//!
//! Owns timing, the synthetic workloads and the JSON reports; it must not be on any serving
//! path. Reports go to stdout as one JSON object; diagnostics go to stderr.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use comatching_protocol::{Epoch, Features, SnapshotUser, SyncEvent, SyncOp, UserId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::engine::exact::ExactEngine;
use crate::engine::hnsw::{HnswConfig, HnswEngine};
use crate::engine::{EngineKind, MatchEngine, Ranking, filter_violations};
use crate::store::{self, StoreBackend, StoreError};
use crate::synth;

/// `bench engine` result. Field names are the issue's.
#[derive(Clone, Debug, Serialize)]
pub struct EngineReport {
    pub users: usize,
    pub queries: usize,
    pub engine: &'static str,
    pub build_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub qps: f64,
    pub flat_p50_us: f64,
    pub flat_p99_us: f64,
    pub speedup_p50: f64,
    pub score_recall_at_1: f64,
    pub score_recall_at_10: f64,
    pub filter_violations: usize,
    /// Peak resident memory of the whole bench process (it also holds the population, an id
    /// map and the flat engine): not the matcher's own.
    pub rss_mb: f64,
    /// Resident memory added while the engine was built: the matcher's own share (plus
    /// allocator slack).
    pub engine_rss_mb: f64,
}

/// `bench store` result.
#[derive(Clone, Debug, Serialize)]
pub struct StoreReport {
    pub backend: &'static str,
    pub users: usize,
    pub apply_per_s: f64,
    pub reopen_s: f64,
    pub index_rebuild_s: f64,
    pub disk_mb: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn round2(x: f64) -> f64 {
    round_to(x, 2)
}

/// `x` rounded to `decimals` places (so the JSON prints short numbers).
fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// Peak resident set in MiB (VmHWM, else VmRSS), from /proc/self/status.
/// Resident memory now (VmRSS), in MiB.
fn current_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for key in ["VmHWM:", "VmRSS:"] {
        if let Some(kb) = status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
        {
            return round2(kb / 1024.0);
        }
    }
    0.0
}

fn timed_ranks(
    engine: &dyn MatchEngine,
    requests: &[comatching_protocol::MatchRequest],
    seed: u64,
) -> (Vec<Ranking>, Vec<f64>, f64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(requests.len());
    let mut lat = Vec::with_capacity(requests.len());
    let start = Instant::now();
    for r in requests {
        let t = Instant::now();
        let ranking = engine.rank(r, &mut rng);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        out.push(ranking);
    }
    let total = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    (out, lat, total)
}

/// Runs `bench engine`: `queries` requests against `users` synthetic users, the chosen engine
/// and the flat scan on the same requests.
pub fn engine_bench(
    users: usize,
    queries: usize,
    seed: u64,
    kind: EngineKind,
    cfg: HnswConfig,
) -> EngineReport {
    let population = synth::population(users, seed);
    let by_id: HashMap<UserId, &Features> = population.iter().map(|(u, f)| (*u, f)).collect();
    let rss_before = current_rss_mb();
    let t = Instant::now();
    let kind = kind.resolved();
    let engine: Box<dyn MatchEngine> = match kind {
        EngineKind::Exact => Box::new(ExactEngine::from_users(by_id.iter().map(|(u, f)| (*u, *f)))),
        EngineKind::Buckets | EngineKind::Hnsw => {
            let h = HnswEngine::from_users(population.iter().map(|(u, f)| (*u, f)), cfg);
            eprintln!("index: {:?} config: {:?}", h.stats(), h.config());
            Box::new(h)
        }
    };
    let build_s = t.elapsed().as_secs_f64();
    let engine_rss_mb = round2(current_rss_mb() - rss_before);
    let flat = ExactEngine::from_users(population.iter().map(|(u, f)| (*u, f)));
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0051_ee55);
    let requests: Vec<_> = (0..queries)
        .map(|_| synth::request(&mut rng, &population, 10))
        .collect();
    // Warm-up (page in the tables), not measured.
    for r in requests.iter().take(20) {
        let _ = engine.rank(r, &mut rng);
        let _ = flat.rank(r, &mut rng);
    }
    let (got, lat, total) = timed_ranks(&*engine, &requests, seed ^ 1);
    let (want, flat_lat, _) = timed_ranks(&flat, &requests, seed ^ 2);
    let scores = |r: &Ranking, n: usize| {
        r.candidates
            .iter()
            .take(n)
            .map(|c| c.score)
            .collect::<Vec<_>>()
    };
    let mut at1 = 0usize;
    let mut at10 = 0usize;
    let mut violations = 0usize;
    for ((req, g), w) in requests.iter().zip(&got).zip(&want) {
        at1 += usize::from(scores(g, 1) == scores(w, 1));
        at10 += usize::from(scores(g, 10) == scores(w, 10));
        violations += filter_violations(req, g, |u| by_id.get(&u).copied());
    }
    let q = queries.max(1) as f64;
    let p50 = percentile(&lat, 0.5);
    let flat_p50 = percentile(&flat_lat, 0.5);
    EngineReport {
        users,
        queries,
        engine: kind.as_str(),
        build_s: round_to(build_s, 3),
        p50_us: round2(p50),
        p99_us: round2(percentile(&lat, 0.99)),
        qps: round2(q / total.max(1e-9)),
        flat_p50_us: round2(flat_p50),
        flat_p99_us: round2(percentile(&flat_lat, 0.99)),
        speedup_p50: round2(flat_p50 / p50.max(1e-9)),
        score_recall_at_1: at1 as f64 / q,
        score_recall_at_10: at10 as f64 / q,
        filter_violations: violations,
        rss_mb: rss_mb(),
        engine_rss_mb,
    }
}

/// `n` users as the relay's first `n` outbox events (epoch 1).
pub fn creation_events(n: usize, seed: u64) -> Vec<SyncEvent> {
    synth::population(n, seed)
        .into_iter()
        .enumerate()
        .map(|(i, (user_id, f))| SyncEvent {
            epoch: Epoch(1),
            seq: i as u64 + 1,
            user_id,
            version: 1,
            op: SyncOp::Upsert(f),
        })
        .collect()
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Runs `bench store`: applies `users` creations in durable batches of `batch`, reopens, and
/// rebuilds the index from the store, in a fresh directory under `dir`.
pub fn store_bench(
    backend: StoreBackend,
    users: usize,
    batch: usize,
    dir: &Path,
) -> Result<StoreReport, StoreError> {
    let events = creation_events(users, 11);
    let t = Instant::now();
    {
        let mut s = store::open(backend, dir)?;
        for chunk in events.chunks(batch.max(1)) {
            store::apply_batch(&mut *s, chunk)?;
        }
    }
    let apply_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let s = store::open(backend, dir)?;
    let meta = s.meta()?;
    let reopen_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let live = s.live_users()?;
    let engine = HnswEngine::from_users(
        live.iter().map(|u| (u.user_id, &u.features)),
        HnswConfig::default(),
    );
    let index_rebuild_s = t.elapsed().as_secs_f64();
    assert_eq!(engine.len() as u64, meta.count);
    drop(s);
    Ok(StoreReport {
        backend: backend.as_str(),
        users,
        apply_per_s: round2(users as f64 / apply_s.max(1e-9)),
        reopen_s: round_to(reopen_s, 4),
        index_rebuild_s: round_to(index_rebuild_s, 3),
        disk_mb: round2(dir_size(dir) as f64 / (1024.0 * 1024.0)),
    })
}

/// The history the sync drill and the crash test agree on.
pub fn drill_history(seed: u64) -> Vec<SyncEvent> {
    synth::relay_history(Epoch(0xd1), 64, 4_000, seed)
}

/// The live users of the relay's projection of `history` at `upto`, as a snapshot would carry them.
pub fn snapshot_at(history: &[SyncEvent], upto: u64) -> Vec<SnapshotUser> {
    let mut m: HashMap<UserId, (u64, Option<Features>)> = HashMap::new();
    for e in history.iter().take_while(|e| e.seq <= upto) {
        let f = match &e.op {
            SyncOp::Upsert(f) => Some(f.clone()),
            SyncOp::Delete => None,
        };
        m.insert(e.user_id, (e.version, f));
    }
    m.into_iter()
        .filter_map(|(user_id, (version, f))| {
            f.map(|features| SnapshotUser {
                user_id,
                version,
                features,
            })
        })
        .collect()
}

/// The crash test's child: resumes from the store's cursor and applies the drill history in
/// small batches (with some redelivered old events mixed in, and now and then a snapshot swap
/// through `replace_all`), printing `committed <seq>` after
/// each durable commit, until the history ends. Runs until done or killed.
pub fn sync_drill(backend: StoreBackend, dir: &Path, seed: u64) -> Result<(), StoreError> {
    let history = drill_history(seed);
    let mut s = store::open(backend, dir)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ std::process::id() as u64);
    let stdout = std::io::stdout();
    loop {
        let from = s.meta()?.cursor.applied_seq as usize;
        if from >= history.len() {
            break;
        }
        let n = rng.random_range(1..=8);
        if rng.random_range(0..40) == 0 {
            // Now and then a full resync: the snapshot of the projection a few seqs ahead.
            let upto = (from + n).min(history.len()) as u64;
            let users = snapshot_at(&history, upto);
            s.replace_all(history[0].epoch, upto, &users)?;
            let mut out = stdout.lock();
            let _ = writeln!(out, "committed {upto}");
            let _ = out.flush();
            continue;
        }
        let mut batch: Vec<SyncEvent> = history[from..(from + n).min(history.len())].to_vec();
        if from > 0 && rng.random_range(0..4) == 0 {
            batch.push(history[rng.random_range(0..from)].clone()); // a redelivery
        }
        let plan = store::apply_batch(&mut *s, &batch)?;
        let mut out = stdout.lock();
        let _ = writeln!(out, "committed {}", plan.cursor.applied_seq);
        let _ = out.flush();
    }
    let mut out = stdout.lock();
    let _ = writeln!(out, "done");
    let _ = out.flush();
    Ok(())
}
