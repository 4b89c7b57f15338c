//! `comatching-sse-bench`: what idle live streams cost the relay (issue 10 §3). Starts a relay
//! on its own vhost, opens N idle operator streams (`GET /api/v1/admin/charges/events`), reads
//! the relay's resident memory before and after, then has a student file one charge request
//! and times its arrival on every stream. Prints one JSON object.

use std::time::{Duration, Instant};

use clap::Parser;
use comatching_tests::api::Operator;
use comatching_tests::sse;
use comatching_tests::{Api, RelayConfig, RelayProcess, Vhost};
use futures_util::StreamExt;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "comatching-sse-bench",
    about = "Relay memory per idle SSE stream"
)]
struct Args {
    #[arg(long, default_value_t = 500)]
    streams: usize,
}

/// Current resident memory of a process in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("relay status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn main() {
    comatching_tests::process::point_at_sibling_binaries();
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let vhost = Vhost::create("sse-bench");
        let mut cfg = RelayConfig::new(vhost.amqp_url());
        // Cheap password hashing: argon2's 19 MiB blocks, freed after the two sign-ups, would
        // stay in the allocator's arenas and absorb the streams' allocations unseen.
        cfg.auth = Some(comatching_tests::relay::AuthSection {
            hash_memory_kib: 64,
            hash_iterations: 1,
            session_ttl_h: None,
        });
        let mut relay = RelayProcess::start(cfg).await;
        relay.wait_ready().await;
        let api = Api::new(relay.base_url());
        let op = Operator::create(&api, &relay, "operator").await;
        let student = api.signup("bench_student").await;
        // Warm up: one stream opened and closed, so one-time allocations are not counted.
        drop(sse::open(api.base_url(), "/api/v1/admin/charges/events", &op.user.token, None).await);
        let pid = relay.pid().expect("relay pid");
        let before = rss_kib(pid);
        let t = Instant::now();
        let base = api.base_url().to_owned();
        let mut streams: Vec<sse::SseStream> = futures_util::stream::iter(0..args.streams)
            .map(|_| {
                let (base, token) = (base.clone(), op.user.token.clone());
                async move {
                    let mut s = sse::open(&base, "/api/v1/admin/charges/events", &token, None)
                        .await
                        .expect("stream opens");
                    let ready = s.next_within(Duration::from_secs(30)).await.expect("ready");
                    assert_eq!(ready.event, "ready");
                    s
                }
            })
            .buffer_unordered(50)
            .collect()
            .await;
        let open_s = t.elapsed().as_secs_f64();
        // Let the relay settle (allocator, idle tasks) before reading its memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(pid);
        let t = Instant::now();
        student.request_charge_ok(1000).await;
        let mut latencies: Vec<f64> = futures_util::stream::iter(streams.iter_mut())
            .map(|s| async move {
                let e = s.next_within(Duration::from_secs(30)).await.expect("event");
                assert_eq!(e.event, "charge.created");
                t.elapsed().as_secs_f64() * 1000.0
            })
            .buffer_unordered(args.streams)
            .collect()
            .await;
        latencies.sort_by(|a, b| a.total_cmp(b));
        let per_stream = (after.saturating_sub(before)) as f64 / args.streams as f64;
        let out = json!({
            "streams": args.streams,
            "relay_build": if cfg!(debug_assertions) { "debug" } else { "release" },
            "relay_rss_before_kib": before,
            "relay_rss_after_kib": after,
            "per_stream_kib": (per_stream * 10.0).round() / 10.0,
            "open_all_s": (open_s * 100.0).round() / 100.0,
            "fanout_first_ms": (latencies[0] * 10.0).round() / 10.0,
            "fanout_last_ms": (latencies[latencies.len() - 1] * 10.0).round() / 10.0,
            "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("").to_owned(),
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        drop(streams);
        drop(relay);
        drop(vhost);
    });
}
