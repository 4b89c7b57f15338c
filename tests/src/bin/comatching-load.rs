//! `comatching-load`: the end-to-end load benchmark (issue 4 §8). Brings up a broker vhost, a
//! relay and one appliance on loopback (release binaries next to this one), registers N users,
//! grants points, drives C concurrent clients requesting matches for D seconds, then measures
//! a sync burst, a resync from an empty data dir and a restart to ready. Prints one JSON object.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use comatching_protocol::stages::{
    APPLIANCE_FAMILY, APPLIANCE_STAGES, RELAY_FAMILY, RELAY_STAGES, StageCounts,
};
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
    /// Print where matches spend their time: the relay's and the appliance's match stage
    /// histograms (`/metrics`), read before and after the match phase (issue 16).
    #[arg(long)]
    breakdown: bool,
    /// Stop after the match phase (skip the sync burst, the resync and the restart).
    #[arg(long)]
    matches_only: bool,
    /// The deployment's shape on two cores: the relay and the broker pinned together on CPU 0
    /// (the 1 vCPU EC2 box), the appliance and this load generator on CPU 1 (`taskset`).
    /// Needs `--private-broker` (the shared node is not ours to pin).
    #[arg(long, requires = "private_broker")]
    pin: bool,
}

type Stages = std::collections::BTreeMap<String, StageCounts>;

async fn scrape(http: &reqwest::Client, url: &str, family: &str) -> Stages {
    let text = http
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    StageCounts::parse(&text, family).expect("stage histograms")
}

/// Per stage: count, mean, p50 and p99 (ms) of what was recorded between two scrapes.
fn stage_table(before: &Stages, after: &Stages, order: &[&str]) -> serde_json::Value {
    let ms = |v: Option<f64>| v.map(|us| (us / 10.0).round() / 100.0);
    let mut out = serde_json::Map::new();
    for stage in order {
        let Some(a) = after.get(*stage) else { continue };
        let d = a.since(before.get(*stage).unwrap_or(&StageCounts::default()));
        out.insert(
            (*stage).to_owned(),
            json!({
                "count": d.total(),
                "mean_ms": ms(d.mean_us()),
                "p50_ms": ms(d.quantile_us(0.50)),
                "p99_ms": ms(d.quantile_us(0.99)),
            }),
        );
    }
    serde_json::Value::Object(out)
}

/// utime + stime of a process (all its threads), in milliseconds.
fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks * 1000.0 / hz)
}

/// `taskset -a -p -c CPU PID`: every thread of `pid` (threads started later inherit it).
fn pin(pid: u32, cpu: &str) {
    let ok = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpu, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset -a -p -c {cpu} {pid} failed");
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
    if args.pin {
        // Relay and broker share CPU 0, as on the 1 vCPU box; the rest runs on CPU 1.
        pin(world.relay.pid().expect("relay pid"), "0");
        pin(broker_pid.expect("broker pid"), "0");
        pin(world.appliances[0].pid().expect("appliance pid"), "1");
        pin(std::process::id(), "1");
        eprintln!("pinned: relay + broker on CPU 0, appliance + load generator on CPU 1");
    }
    let scrape_http = comatching_tests::api::http_builder()
        .build()
        .expect("client");
    let relay_metrics = format!("{}/metrics", world.relay.base_url());
    let app_metrics = format!("{}/metrics", world.appliances[0].base_url());
    let stages_before = if args.breakdown {
        Some((
            scrape(&scrape_http, &relay_metrics, RELAY_FAMILY).await,
            scrape(&scrape_http, &app_metrics, APPLIANCE_FAMILY).await,
        ))
    } else {
        None
    };
    let cpu_pids = [
        ("relay", world.relay.pid()),
        ("appliance", world.appliances[0].pid()),
        ("broker", broker_pid),
    ];
    let cpu_before: Vec<Option<f64>> = cpu_pids.iter().map(|(_, p)| p.and_then(cpu_ms)).collect();
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
    // CPU time each process spent per match answered during the match phase.
    let cpu_per_match: serde_json::Map<String, serde_json::Value> = cpu_pids
        .iter()
        .zip(&cpu_before)
        .filter_map(|((name, pid), before)| {
            let spent = pid.and_then(cpu_ms)? - (*before)?;
            let per = spent / lat.len().max(1) as f64;
            Some(((*name).to_owned(), json!((per * 1000.0).round() / 1000.0)))
        })
        .collect();
    eprintln!("CPU ms per match: {cpu_per_match:?}");
    let breakdown = match &stages_before {
        Some((relay_before, app_before)) => {
            let relay_after = scrape(&scrape_http, &relay_metrics, RELAY_FAMILY).await;
            let app_after = scrape(&scrape_http, &app_metrics, APPLIANCE_FAMILY).await;
            let relay = stage_table(relay_before, &relay_after, &RELAY_STAGES);
            let appliance = stage_table(app_before, &app_after, &APPLIANCE_STAGES);
            // The broker's share of the round trip: what the appliance did not spend itself.
            let broker_ms = relay["round_trip"]["mean_ms"]
                .as_f64()
                .zip(appliance["total"]["mean_ms"].as_f64())
                .map(|(rt, app)| ((rt - app) * 100.0).round() / 100.0);
            let b =
                json!({"relay": relay, "appliance": appliance, "broker_hops_mean_ms": broker_ms});
            eprintln!(
                "breakdown: {}",
                serde_json::to_string_pretty(&b).unwrap_or_default()
            );
            Some(b)
        }
        None => None,
    };
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

    // The phases after the matches (skipped with --matches-only).
    let later = if args.matches_only {
        None
    } else {
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
        Some((burst, put_s, sync_s, pool.count, resync_s, restart_s))
    };
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
        "sync_apply_per_s": later.map(|(burst, _, sync_s, ..)| (burst as f64 / sync_s).round()),
        "sync_changes": later.map(|l| l.0),
        "profile_puts_per_s": later.map(|(burst, put_s, ..)| (burst as f64 / put_s).round()),
        "resync_users": later.map(|l| l.3),
        "resync_s": later.map(|l| (l.4 * 100.0).round() / 100.0),
        "restart_ready_s": later.map(|l| (l.5 * 100.0).round() / 100.0),
        "cpu_ms_per_match": cpu_per_match,
        "pinned": args.pin,
        "breakdown": breakdown,
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
