//! Where a match spends its time: one latency histogram per stage of the match path, shared by
//! the relay and the appliance (each renders its stages on `/metrics`), and the arithmetic the
//! load benchmark does on two scrapes (`comatching-load --breakdown`): the difference of two
//! snapshots, its mean and its quantiles.
//!
//! Buckets are fixed and log-spaced (1–1.5–2–3–5–7.5 per decade) from 10 µs to 5 s, fine enough
//! to tell a 0.3 ms fsync from a 5 ms timer. Recording is two relaxed atomic adds: no lock on
//! the match path. Quantiles interpolate linearly inside a bucket, so they are estimates to
//! within one bucket's width; means are exact.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The relay's stage family on `/metrics` and its stages, in the order a match passes them.
pub const RELAY_FAMILY: &str = "comatching_match_stage_seconds";
pub const RELAY_STAGES: [&str; 9] = [
    "auth",
    "hold",
    "hold_commit",
    "publish",
    "round_trip",
    "reply_wake",
    "settle",
    "respond",
    "total",
];
/// The appliance's stage family and its stages, in order.
pub const APPLIANCE_FAMILY: &str = "comatching_appliance_match_stage_seconds";
pub const APPLIANCE_STAGES: [&str; 4] = ["dispatch", "rank", "reply", "total"];

/// Appends a whole family to Prometheus text: HELP and TYPE once, then every stage.
pub fn render_family(
    out: &mut String,
    family: &str,
    help: &str,
    stages: &[(&str, &StageHistogram)],
) {
    let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} histogram");
    for (stage, h) in stages {
        h.snapshot().render(out, family, stage);
    }
}

/// Upper bounds of the buckets, in microseconds; one more bucket (+Inf) follows.
pub const BOUNDS_US: [u64; 32] = [
    10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500,
    10_000, 15_000, 20_000, 30_000, 50_000, 75_000, 100_000, 150_000, 200_000, 300_000, 500_000,
    1_000_000, 2_000_000, 5_000_000,
];

const SLOTS: usize = BOUNDS_US.len() + 1;

/// A lock-free latency histogram for one stage.
#[derive(Debug)]
pub struct StageHistogram {
    counts: [AtomicU64; SLOTS],
    sum_us: AtomicU64,
}

impl Default for StageHistogram {
    fn default() -> Self {
        StageHistogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl StageHistogram {
    pub fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.counts[slot(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StageCounts {
        StageCounts {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// The bucket a duration of `us` microseconds falls in (`le` semantics, as Prometheus).
fn slot(us: u64) -> usize {
    BOUNDS_US.partition_point(|&b| b < us)
}

/// A snapshot: per-bucket (not cumulative) counts, `BOUNDS_US.len() + 1` of them, and the sum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageCounts {
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl Default for StageCounts {
    fn default() -> Self {
        StageCounts {
            counts: vec![0; SLOTS],
            sum_us: 0,
        }
    }
}

impl StageCounts {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn mean_us(&self) -> Option<f64> {
        let n = self.total();
        (n > 0).then(|| self.sum_us as f64 / n as f64)
    }

    /// What was recorded between `earlier` and `self` (counters only grow; a restart in
    /// between shows as zeros, never as a negative count).
    pub fn since(&self, earlier: &StageCounts) -> StageCounts {
        StageCounts {
            counts: self
                .counts
                .iter()
                .zip(earlier.counts.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_us: self.sum_us.saturating_sub(earlier.sum_us),
        }
    }

    /// The `q`-quantile (0 ≤ q ≤ 1) in microseconds, interpolated inside its bucket; the
    /// +Inf bucket answers its lower bound. `None` when nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let n = self.total();
        if n == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * n as f64;
        let mut below = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 && (below + c) as f64 >= rank {
                let lo = if i == 0 { 0 } else { BOUNDS_US[i - 1] } as f64;
                let Some(&hi) = BOUNDS_US.get(i) else {
                    return Some(lo);
                };
                let within = ((rank - below as f64) / c as f64).clamp(0.0, 1.0);
                return Some(lo + (hi as f64 - lo) * within);
            }
            below += c;
        }
        Some(*BOUNDS_US.last().expect("bounds") as f64)
    }

    /// Appends the Prometheus text of this stage (`metric` is the family name; the HELP and
    /// TYPE lines are the caller's, once per family).
    pub fn render(&self, out: &mut String, metric: &str, stage: &str) {
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            let le = match BOUNDS_US.get(i) {
                Some(b) => format!("{}", *b as f64 / 1e6),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(
                out,
                "{metric}_bucket{{stage=\"{stage}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "{metric}_sum{{stage=\"{stage}\"}} {}",
            self.sum_us as f64 / 1e6
        );
        let _ = writeln!(out, "{metric}_count{{stage=\"{stage}\"}} {cumulative}");
    }

    /// Reads every stage of family `metric` back from Prometheus text as [`render`] wrote it.
    /// Lines of other families are skipped; a stage with a bucket layout other than ours is
    /// an error (the two sides were built from different code).
    ///
    /// [`render`]: StageCounts::render
    pub fn parse(text: &str, metric: &str) -> Result<BTreeMap<String, StageCounts>, String> {
        let bucket = format!("{metric}_bucket{{stage=\"");
        let sum = format!("{metric}_sum{{stage=\"");
        let mut cumulative: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut sums: BTreeMap<String, u64> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&bucket) {
                let (stage, rest) = rest
                    .split_once('"')
                    .ok_or_else(|| format!("bad line: {line}"))?;
                let value = rest
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| format!("bad bucket value: {line}"))?;
                cumulative.entry(stage.to_owned()).or_default().push(value);
            } else if let Some(rest) = line.strip_prefix(&sum) {
                let (stage, rest) = rest
                    .split_once('"')
                    .ok_or_else(|| format!("bad line: {line}"))?;
                let secs = rest
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| format!("bad sum: {line}"))?;
                sums.insert(stage.to_owned(), (secs * 1e6).round() as u64);
            }
        }
        let mut out = BTreeMap::new();
        for (stage, cum) in cumulative {
            if cum.len() != SLOTS {
                return Err(format!(
                    "stage {stage}: {} buckets, expected {SLOTS}",
                    cum.len()
                ));
            }
            let mut counts = Vec::with_capacity(SLOTS);
            let mut prev = 0;
            for c in cum {
                counts.push(c.checked_sub(prev).ok_or("buckets not cumulative")?);
                prev = c;
            }
            let sum_us = sums.get(&stage).copied().unwrap_or(0);
            out.insert(stage, StageCounts { counts, sum_us });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn of(samples_us: &[u64]) -> StageCounts {
        let h = StageHistogram::default();
        for &s in samples_us {
            h.observe(Duration::from_micros(s));
        }
        h.snapshot()
    }

    #[test]
    fn buckets_are_increasing_and_le_inclusive() {
        assert!(BOUNDS_US.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(slot(0), 0);
        assert_eq!(slot(10), 0);
        assert_eq!(slot(11), 1);
        assert_eq!(slot(5_000_000), BOUNDS_US.len() - 1);
        assert_eq!(slot(5_000_001), BOUNDS_US.len());
    }

    #[test]
    fn mean_is_exact_and_quantiles_land_in_the_right_bucket() {
        let c = of(&[100, 100, 100, 4_000]);
        assert_eq!(c.total(), 4);
        assert_eq!(c.mean_us(), Some(1_075.0));
        let p50 = c.quantile_us(0.5).unwrap();
        assert!((75.0..=100.0).contains(&p50), "{p50}");
        let p99 = c.quantile_us(0.99).unwrap();
        assert!((3_000.0..=5_000.0).contains(&p99), "{p99}");
        assert_eq!(StageCounts::default().quantile_us(0.5), None);
        assert_eq!(StageCounts::default().mean_us(), None);
    }

    #[test]
    fn since_subtracts_and_never_goes_negative() {
        let a = of(&[100, 2_000]);
        let b = of(&[100, 2_000, 2_000, 40]);
        let d = b.since(&a);
        assert_eq!(d.total(), 2);
        assert_eq!(d.sum_us, 2_040);
        assert_eq!(
            a.since(&b).total(),
            0,
            "a restarted process reads as nothing new"
        );
    }

    proptest! {
        #[test]
        fn render_then_parse_round_trips(samples in proptest::collection::vec(0u64..10_000_000, 0..200)) {
            let c = of(&samples);
            let mut text = String::from("# HELP x y\nother_metric 3\n");
            c.render(&mut text, "m_stage_seconds", "hold");
            of(&[7]).render(&mut text, "m_stage_seconds", "settle");
            let parsed = StageCounts::parse(&text, "m_stage_seconds").unwrap();
            prop_assert_eq!(parsed.len(), 2);
            prop_assert_eq!(&parsed["hold"].counts, &c.counts);
            prop_assert!(parsed["hold"].sum_us.abs_diff(c.sum_us) <= 1);
        }

        #[test]
        fn quantiles_bracket_the_exact_order_statistic(
            mut samples in proptest::collection::vec(0u64..6_000_000, 1..300),
            q in 0.01f64..=1.0,
        ) {
            let c = of(&samples);
            samples.sort_unstable();
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            let exact = samples[rank - 1];
            let est = c.quantile_us(q).unwrap();
            let i = slot(exact);
            let lo = if i == 0 { 0 } else { BOUNDS_US[i - 1] } as f64;
            let hi = BOUNDS_US.get(i).map_or(f64::INFINITY, |&b| b as f64);
            prop_assert!(est >= lo - 1e-9 && est <= hi + 1e-9, "exact {exact} est {est} bucket {lo}..{hi}");
        }
    }

    #[test]
    fn parse_refuses_a_foreign_bucket_layout() {
        let text = "m_bucket{stage=\"x\",le=\"1\"} 1\nm_bucket{stage=\"x\",le=\"+Inf\"} 1\n";
        assert!(StageCounts::parse(text, "m").is_err());
    }
}
