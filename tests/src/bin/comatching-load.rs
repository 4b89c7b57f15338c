//! `comatching-load`: the end-to-end load benchmark (issue 4 §8). Brings up a broker vhost, a
//! relay and one appliance on loopback (release binaries next to this one), registers N users,
//! grants points, drives C concurrent clients requesting matches for D seconds, then measures
//! a sync burst, a resync from an empty data dir and a restart to ready. Prints one JSON object.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use comatching_tests::world::{
    World, WorldOptions, drive_matches, drive_matches_open, peak_rss_mb, percentile,
};
use futures_util::StreamExt;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "comatching-load",
    about = "COMAtching Edge end-to-end load benchmark"
)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Not supported yet: the benchmark always uses its own vhost on the local broker.
    #[arg(long)]
    amqp: Option<String>,
    #[arg(long, default_value = "sqlite")]
    backend: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Open loop: offer this many match requests per second (latency from each request's
    /// scheduled time) instead of `--concurrency` closed-loop clients.
    #[arg(long)]
    rate: Option<f64>,
    /// Run on a broker node of its own: `small` with the small-box limits of
    /// scripts/broker.sh (raft WAL 64 MiB, absolute watermark 300 MiB), `default` with
    /// RabbitMQ's own defaults. Without it, a vhost on the shared node.
    #[arg(long, value_parser = ["small", "default"])]
    private_broker: Option<String>,
}

/// scripts/broker.sh's and nix/lib/rabbitmq.nix's small-box items.
const SMALL_BOX_CONF: &str =
    "raft.wal_max_size_bytes = 67108864\nvm_memory_high_watermark.absolute = 314572800";

/// The beam pid of the shared node, from its pid file.
fn shared_broker_pid() -> Option<u32> {
    std::fs::read_to_string("/var/lib/rabbitmq/mnesia/rabbit@localhost.pid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() {
    let args = Args::parse();
    comatching_tests::process::point_at_sibling_binaries();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(run(args));
}

async fn run(args: Args) {
    if args.amqp.is_some() {
        eprintln!("--amqp: this benchmark manages its own vhost on the local broker; ignoring");
    }
    let private = args.private_broker.as_deref().map(|kind| match kind {
        "small" => comatching_tests::private_broker::PrivateBroker::start_with_conf(
            "loadsmall",
            SMALL_BOX_CONF,
        ),
        _ => comatching_tests::private_broker::PrivateBroker::start("loaddefault"),
    });
    // The broker's resident memory, sampled twice a second for the whole run (the peak is
    // reported: the node's own VmHWM would include its life before this run).
    let broker_pid = match &private {
        Some(b) => b.beam_pid(),
        None => shared_broker_pid(),
    };
    let broker_peak = Arc::new(std::sync::Mutex::new(0.0f64));
    let sampler = broker_pid.map(|pid| {
        let peak = broker_peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(mb) = rss_mb(pid) {
                    let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                    *p = p.max(mb);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    });
    let mut opts = WorldOptions::new("load");
    opts.amqp_url = private.as_ref().map(|b| b.amqp_url());
    opts.backend = args.backend.clone();
    opts.max_picked = 1_000_000;
    let mut world = World::start(&opts).await;
    eprintln!("registering {} users", args.users);
    let t = Instant::now();
    let users = world.register(args.users, 64, args.seed).await;
    let register_s = t.elapsed().as_secs_f64();
    eprintln!("registered in {register_s:.1}s; granting points");
    world.grant_all(&users, 1_000_000, 64).await;
    world.wait_converged(Duration::from_secs(600)).await;

    let users = Arc::new(users);
    let t = Instant::now();
    let (mut lat, errs) = match args.rate {
        Some(rate) => {
            eprintln!(
                "offering {rate} matches/s for {}s (open loop)",
                args.seconds
            );
            drive_matches_open(
                users.clone(),
                rate,
                Duration::from_secs(args.seconds),
                4096,
                args.seed,
            )
            .await
        }
        None => {
            eprintln!("driving {} clients for {}s", args.concurrency, args.seconds);
            drive_matches(
                users.clone(),
                args.concurrency,
                Duration::from_secs(args.seconds),
                None,
                args.seed,
            )
            .await
        }
    };
    let elapsed = t.elapsed().as_secs_f64();
    let load_during = loadavg_1m();
    lat.sort_by(|a, b| a.total_cmp(b));
    let errors: u64 = errs.values().sum();
    eprintln!("non-201 answers by status: {errs:?}");
    // Each phase's figures go to stderr as the phase ends, so a run that stalls later still
    // tells what it measured.
    eprintln!(
        "matches: {} in {elapsed:.1}s = {:.1}/s, p50 {:.1} ms, p99 {:.1} ms, load average {load_during:?}",
        lat.len(),
        lat.len() as f64 / elapsed,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    );

    // Sync burst: users rewrite their profiles while the appliance is paused (SIGSTOP), so the
    // changes queue up at the broker; then the time for the resumed appliance to apply them
    // all is its apply rate. (Measured with the appliance running, the figure would only be
    // the rate at which the relay accepts profile changes, reported as `profile_puts_per_s`.)
    let burst = users.len().min(20_000);
    let mut pop = comatching_tests::population::Population::new(args.seed ^ 0xb0b);
    let bodies: Vec<_> = (0..burst).map(|i| pop.profile(i)).collect();
    let app_pid = world.appliances[0].pid().expect("appliance running");
    signal(app_pid, libc::SIGSTOP);
    let t = Instant::now();
    futures_util::stream::iter(users.iter().take(burst).zip(bodies))
        .for_each_concurrent(64, |(u, body)| async move {
            u.put_profile_json(&body).await.expect(200);
        })
        .await;
    let put_s = t.elapsed().as_secs_f64();
    // Every change confirmed by the broker (queued for the appliance) before it resumes.
    let lag_deadline = Instant::now() + Duration::from_secs(600);
    while world.operator.stats().await["outbox_lag"].as_u64() != Some(0) {
        assert!(Instant::now() < lag_deadline, "the outbox never drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    signal(app_pid, libc::SIGCONT);
    world.wait_converged(Duration::from_secs(600)).await;
    let sync_s = t.elapsed().as_secs_f64();
    eprintln!(
        "sync burst: {burst} profile changes accepted in {put_s:.1}s, applied in {sync_s:.2}s"
    );

    // Resync from an empty data dir (a re-image).
    let pool = world.relay_pool().await;
    let app = &mut world.appliances[0];
    app.kill_9();
    app.wipe_data();
    let t = Instant::now();
    app.restart().await;
    world.wait_converged(Duration::from_secs(600)).await;
    let resync_s = t.elapsed().as_secs_f64();
    eprintln!("resync of {} users from empty: {resync_s:.2}s", pool.count);

    // Restart to ready with the replica in place (a power cut).
    let app = &mut world.appliances[0];
    app.kill_9();
    let t = Instant::now();
    app.restart().await;
    app.wait_ready().await;
    let restart_s = t.elapsed().as_secs_f64();
    eprintln!("restart to ready: {restart_s:.2}s");

    let relay_rss = world.relay.pid().and_then(peak_rss_mb);
    if let Some(s) = &sampler {
        s.abort();
    }
    let broker_rss = broker_pid
        .map(|_| *broker_peak.lock().unwrap_or_else(|e| e.into_inner()))
        .filter(|v| *v > 0.0);
    let app_rss = world.appliances[0].pid().and_then(peak_rss_mb);
    let out = json!({
        "users": args.users,
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "offered_rate": args.rate,
        "concurrency": if args.rate.is_some() { None } else { Some(args.concurrency) },
        "seconds": args.seconds,
        "matches": lat.len(),
        "rps": (lat.len() as f64 / elapsed * 10.0).round() / 10.0,
        "p50_ms": (percentile(&lat, 0.50) * 100.0).round() / 100.0,
        "p99_ms": (percentile(&lat, 0.99) * 100.0).round() / 100.0,
        "errors": errors,
        "relay_rss_mb": relay_rss.map(|v| (v * 10.0).round() / 10.0),
        "appliance_rss_mb": app_rss.map(|v| (v * 10.0).round() / 10.0),
        "broker": args.private_broker.as_deref().map(|k| format!("private-{k}")).unwrap_or_else(|| "shared".into()),
        "broker_rss_mb": broker_rss.map(|v| (v * 10.0).round() / 10.0),
        "relay_plus_broker_rss_mb": relay_rss.zip(broker_rss).map(|(r, b)| ((r + b) * 10.0).round() / 10.0),
        "sync_apply_per_s": (burst as f64 / sync_s).round(),
        "sync_changes": burst,
        "profile_puts_per_s": (burst as f64 / put_s).round(),
        "resync_users": pool.count,
        "resync_s": (resync_s * 100.0).round() / 100.0,
        "restart_ready_s": (restart_s * 100.0).round() / 100.0,
        "register_s": (register_s * 10.0).round() / 10.0,
        "loadavg_during_matches": load_during,
    });
    println!("{out}");
    drop(world);
    drop(private);
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid of a child this process started.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// The 1-minute load average (the machine is shared: measurements are only comparable at
/// similar load).
fn loadavg_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
