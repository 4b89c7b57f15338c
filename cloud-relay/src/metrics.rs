//! Prometheus text metrics, hand-rolled: request counts by route and status, a match latency
//! histogram, and gauges read from the database at scrape time (open holds, outbox lag).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use comatching_protocol::stages::{self, StageHistogram};

const BUCKETS_S: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS_S.len()],
    total: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    matches: Mutex<BTreeMap<u16, u64>>,
    latency: Mutex<Histogram>,
    /// The listener's connection counters (rendered with the rest).
    pub connections: std::sync::Arc<crate::listener::ConnStats>,
    dead_letters: Mutex<BTreeMap<(String, String), u64>>,
    /// Where matches spend their time, stage by stage.
    pub stages: MatchStages,
    /// Hello answers the broker returned because the appliance's sync queue did not exist
    /// (deleted, expired, or a wiped broker): the appliance hears nothing until it declares its
    /// queue again and says hello once more.
    pub unroutable_hello_answers: std::sync::atomic::AtomicU64,
}

/// The relay's stages of a match, in the order a request passes them (issue 16). Rendered as
/// `comatching_match_stage_seconds{stage=…}`; `comatching-load --breakdown` reads them.
#[derive(Default)]
pub struct MatchStages {
    /// Request parsed → caller authenticated (the session lookup).
    pub auth: StageHistogram,
    /// → the hold and the pending request written in the writer's open transaction (its
    /// commit, a group commit with an fsync, runs on beside the steps after it).
    pub hold: StageHistogram,
    /// Start of the hold → its commit known (beside `publish` and `round_trip`, not before).
    pub hold_commit: StageHistogram,
    /// → the request handed to the broker client (its confirm is awaited beside the reply).
    pub publish: StageHistogram,
    /// → the appliance's reply received by the reply dispatcher (two broker hops and the
    /// appliance's own stages, which it reports on its `/metrics`).
    pub round_trip: StageHistogram,
    /// → the match task running again with the reply (and the hold's commit known).
    pub reply_wake: StageHistogram,
    /// → the settlement committed (a group commit, an fsync).
    pub settle: StageHistogram,
    /// → the handler has the outcome (the in-flight map's wake-up).
    pub respond: StageHistogram,
    /// Request parsed → outcome, the whole of it.
    pub total: StageHistogram,
}

impl MatchStages {
    /// Each stage with its name (`stages::RELAY_STAGES`, the one list of names).
    pub fn all(&self) -> [(&'static str, &StageHistogram); 9] {
        let h = [
            &self.auth,
            &self.hold,
            &self.hold_commit,
            &self.publish,
            &self.round_trip,
            &self.reply_wake,
            &self.settle,
            &self.respond,
            &self.total,
        ];
        std::array::from_fn(|i| (stages::RELAY_STAGES[i], h[i]))
    }
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn count_request(&self, route: &str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route.to_owned(), status))
            .or_default() += 1;
    }

    pub fn observe_match(&self, took: Duration, status: u16) {
        *self
            .matches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(status)
            .or_default() += 1;
        let s = took.as_secs_f64();
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        for (i, b) in BUCKETS_S.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.total += 1;
        h.sum += s;
    }

    /// One dead letter seen on `comatching.dead.tally`.
    pub fn count_dead_letter(&self, reason: &str, queue: &str) {
        *self
            .dead_letters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((reason.to_owned(), queue.to_owned()))
            .or_default() += 1;
    }

    /// Renders everything; `gauges` are (name, help, value) read by the caller.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP comatching_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE comatching_http_requests_total counter\n");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "comatching_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP comatching_matches_total Match requests by final HTTP status.\n");
        out.push_str("# TYPE comatching_matches_total counter\n");
        for (status, n) in self
            .matches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "comatching_matches_total{{status=\"{status}\"}} {n}");
        }
        let h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str("# HELP comatching_match_duration_seconds Time from request to settlement.\n");
        out.push_str("# TYPE comatching_match_duration_seconds histogram\n");
        for (i, b) in BUCKETS_S.iter().enumerate() {
            let _ = writeln!(
                out,
                "comatching_match_duration_seconds_bucket{{le=\"{b}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "comatching_match_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            h.total
        );
        let _ = writeln!(out, "comatching_match_duration_seconds_sum {}", h.sum);
        let _ = writeln!(out, "comatching_match_duration_seconds_count {}", h.total);
        stages::render_family(
            &mut out,
            stages::RELAY_FAMILY,
            "Time matches spent in each stage of the relay's path.",
            &self.stages.all(),
        );
        out.push_str(&self.connections.render());
        out.push_str(
            "# HELP comatching_dead_letters_total Dead-lettered messages by reason and by the queue they left.\n",
        );
        out.push_str("# TYPE comatching_dead_letters_total counter\n");
        for ((reason, queue), n) in self
            .dead_letters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "comatching_dead_letters_total{{reason=\"{}\",queue=\"{}\"}} {n}",
                label(reason),
                label(queue)
            );
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges() {
        let m = Metrics::default();
        m.count_request("/api/v1/me", 200);
        m.count_request("/api/v1/me", 200);
        m.observe_match(Duration::from_millis(30), 201);
        let text = m.render(&[("comatching_open_holds", "Open holds.", 2.0)]);
        assert!(
            text.contains("comatching_http_requests_total{route=\"/api/v1/me\",status=\"200\"} 2")
        );
        assert!(text.contains("comatching_match_duration_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("comatching_match_duration_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("comatching_open_holds 2"));
        m.count_dead_letter("expired", "comatching.match.requests");
        m.count_dead_letter("expired", "comatching.match.requests");
        m.count_dead_letter("rejected", "q\"x");
        let text = m.render(&[]);
        assert!(text.contains(
            "comatching_dead_letters_total{reason=\"expired\",queue=\"comatching.match.requests\"} 2"
        ));
        assert!(
            text.contains("comatching_dead_letters_total{reason=\"rejected\",queue=\"q\\\"x\"} 1")
        );
    }
}
