//! A whole running system for the demo and the load benchmark: a broker vhost, a relay, one or
//! more appliances, an operator, and helpers to fill it with synthetic students.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream;
use reqwest::Method;
use serde_json::Value;

use crate::api::{Api, Operator, User};
use crate::appliance::{ApplianceConfig, ApplianceProcess};
use crate::broker::Vhost;
use crate::population::Population;
use crate::relay::{AuthSection, RelayConfig, RelayProcess};

/// Every synthetic student's password (the demo prints it).
pub const PASSWORD: &str = "festival-password";

pub struct WorldOptions {
    pub appliances: usize,
    pub backend: String,
    /// Cheap password hashing, for registering many thousands of users quickly.
    pub cheap_hashing: bool,
    pub max_picked: u32,
    pub label: String,
    /// A broker of the caller's (a private node); `None` = a fresh vhost on the shared node.
    pub amqp_url: Option<String>,
    /// With an `amqps://` URL: a `comatching-relay pki` directory holding `ca.pem` and client
    /// certificates named `relay` and `box-N` (the appliances' ids).
    pub broker_tls: Option<PathBuf>,
    /// A link key file every service of this world authenticates its messages with.
    pub link_key: Option<PathBuf>,
    /// The appliances' periodic hello (`None`: the harness's 1 s). Rows that test delivery
    /// anomalies use production's 10 s, so a periodic resync cannot hide a sync bug.
    pub hello_interval_ms: Option<u64>,
    /// `broker.quorum_group_size` of every service (a private cluster's rows set 3).
    pub quorum_group_size: Option<u16>,
}

impl WorldOptions {
    pub fn new(label: &str) -> WorldOptions {
        WorldOptions {
            appliances: 1,
            backend: "sqlite".into(),
            cheap_hashing: true,
            max_picked: 5,
            label: label.into(),
            amqp_url: None,
            broker_tls: None,
            link_key: None,
            hello_interval_ms: None,
            quorum_group_size: None,
        }
    }
}

/// Fields drop in order: appliances and relay stop before the vhost is deleted.
pub struct World {
    pub appliances: Vec<ApplianceProcess>,
    pub relay: RelayProcess,
    pub api: Api,
    pub operator: Operator,
    pub vhost: Option<Vhost>,
    pub amqp_url: String,
    broker_tls: Option<PathBuf>,
    link_key: Option<PathBuf>,
    hello_interval_ms: Option<u64>,
    quorum_group_size: Option<u16>,
}

/// The relay's own view of its pool.
#[derive(Clone, Debug, PartialEq)]
pub struct RelayPool {
    pub seq: u64,
    pub count: u64,
    pub digest: String,
}

impl World {
    pub async fn start(opts: &WorldOptions) -> World {
        let vhost = match &opts.amqp_url {
            Some(_) => None,
            None => {
                crate::broker::ensure_shared_node();
                Some(Vhost::create(&opts.label))
            }
        };
        let amqp_url = match (&opts.amqp_url, &vhost) {
            (Some(u), _) => u.clone(),
            (None, Some(v)) => v.amqp_url(),
            (None, None) => unreachable!("a vhost was created"),
        };
        let mut config = RelayConfig::new(amqp_url.clone());
        if let Some(dir) = &opts.broker_tls {
            config.broker.security.tls(dir, "relay");
        }
        config.broker.security.link_key_file = opts.link_key.clone();
        config.broker.security.quorum_group_size = opts.quorum_group_size;
        config.matching.max_picked = opts.max_picked;
        if opts.cheap_hashing {
            config.auth = Some(AuthSection {
                hash_memory_kib: 64,
                hash_iterations: 1,
                session_ttl_h: None,
            });
        }
        let mut relay = RelayProcess::start(config).await;
        relay.wait_ready().await;
        let api = Api::new(relay.base_url());
        let operator = Operator::create(&api, &relay, "operator").await;
        let mut world = World {
            appliances: Vec::new(),
            relay,
            api,
            operator,
            vhost,
            amqp_url,
            broker_tls: opts.broker_tls.clone(),
            link_key: opts.link_key.clone(),
            hello_interval_ms: opts.hello_interval_ms,
            quorum_group_size: opts.quorum_group_size,
        };
        for _ in 0..opts.appliances {
            world.add_appliance(&opts.backend).await;
        }
        world
    }

    /// Starts one more appliance (`box-N`) on this world's broker.
    pub async fn add_appliance(&mut self, backend: &str) -> &mut ApplianceProcess {
        let url = self.amqp_url.clone();
        self.add_appliance_at(backend, &url).await
    }

    /// Starts one more appliance (`box-N`) with its own `broker.url` (a cluster's nodes in
    /// another order, say).
    pub async fn add_appliance_at(&mut self, backend: &str, url: &str) -> &mut ApplianceProcess {
        let id = format!("box-{}", self.appliances.len() + 1);
        let mut cfg = ApplianceConfig::new(&id, url);
        cfg.broker.security.quorum_group_size = self.quorum_group_size;
        cfg.broker.security.link_key_file = self.link_key.clone();
        if let Some(dir) = &self.broker_tls {
            cfg.broker.security.tls(dir, &id);
        }
        cfg.storage.backend = backend.to_owned();
        if let Some(ms) = self.hello_interval_ms {
            cfg.sync.hello_interval_ms = ms;
        }
        self.appliances.push(ApplianceProcess::start(cfg).await);
        self.appliances.last_mut().expect("just pushed")
    }

    /// Registers `n` synthetic students (account + profile), `concurrency` at a time.
    pub async fn register(&self, n: usize, concurrency: usize, seed: u64) -> Vec<User> {
        let mut pop = Population::new(seed);
        let profiles: Vec<Value> = (0..n).map(|i| pop.profile(i)).collect();
        let api = self.api.clone();
        stream::iter(profiles.into_iter().enumerate())
            .map(|(i, profile)| {
                let api = api.clone();
                async move {
                    let name = format!("s{seed}_{i}");
                    let body = api.create_account(&name, PASSWORD).await.expect(201);
                    let token = body["token"].as_str().expect("token").to_owned();
                    let user_id = body["user_id"].as_str().expect("user_id").to_owned();
                    api.request(
                        Method::PUT,
                        "/api/v1/me/profile",
                        Some(&token),
                        Some(&profile),
                        &[],
                    )
                    .await
                    .expect(200);
                    User {
                        api: api.clone(),
                        username: name,
                        password: PASSWORD.to_owned(),
                        user_id,
                        token,
                    }
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await
    }

    /// Grants `amount` points to every user.
    pub async fn grant_all(&self, users: &[User], amount: i64, concurrency: usize) {
        let op = &self.operator;
        stream::iter(users)
            .for_each_concurrent(concurrency, |u| async move {
                op.grant_resp(&u.user_id, amount, "booth purchase")
                    .await
                    .expect(201);
            })
            .await;
    }

    /// Gives every user `amount` points the way the booth does: each files a charge request
    /// (`POST /api/v1/me/charges`) and the world's operator approves it. `amount` must be a
    /// valid charge amount (1,000..=100,000 in steps of 500 by default).
    pub async fn charge_all_via_booth(&self, users: &[User], amount: i64, concurrency: usize) {
        let op = &self.operator;
        stream::iter(users)
            .for_each_concurrent(concurrency, |u| async move {
                let id = u.request_charge_ok(amount).await;
                op.approve(&id).await.expect(200);
            })
            .await;
    }

    pub async fn relay_pool(&self) -> RelayPool {
        let v = self
            .operator
            .user
            .get("/api/v1/admin/appliances")
            .await
            .expect(200);
        RelayPool {
            seq: v["relay"]["seq"].as_u64().expect("relay.seq"),
            count: v["relay"]["count"].as_u64().expect("relay.count"),
            digest: v["relay"]["digest"]
                .as_str()
                .expect("relay.digest")
                .to_owned(),
        }
    }

    /// Waits until every appliance holds exactly the relay's pool and is ready. Appliances are
    /// polled every 50 ms; the relay's pool (a full scan of it on the relay) at most once a
    /// second, so that waiting on a large pool does not load the relay being measured.
    /// Pauses every appliance (SIGSTOP): requests and sync events pile up in the broker.
    pub fn pause_appliances(&self) {
        for a in &self.appliances {
            a.pause();
        }
    }

    pub fn resume_appliances(&self) {
        for a in &self.appliances {
            a.resume();
        }
    }

    pub async fn wait_converged(&mut self, timeout: Duration) -> RelayPool {
        let deadline = Instant::now() + timeout;
        loop {
            let pool = self.relay_pool().await;
            let refresh = Instant::now() + Duration::from_secs(1);
            loop {
                let mut all = true;
                for a in &self.appliances {
                    let ok = a.status().await.is_some_and(|s| {
                        s["ready"] == Value::Bool(true)
                            && s["count"].as_u64() == Some(pool.count)
                            && s["digest"].as_str() == Some(pool.digest.as_str())
                            && s["applied_seq"].as_u64() >= Some(pool.seq)
                    });
                    all &= ok;
                }
                if all {
                    return pool;
                }
                if Instant::now() > deadline {
                    let mut detail = String::new();
                    for a in &self.appliances {
                        detail.push_str(&format!("{}\n", a.status().await.unwrap_or_default()));
                    }
                    panic!("appliances did not converge to {pool:?} within {timeout:?}:\n{detail}");
                }
                if Instant::now() > refresh {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Peak resident memory of a process in MiB (VmHWM), if it is still there.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs match requests from `users` with `concurrency` clients for `duration`; returns the
/// latencies (ms) of successful matches and the count of non-201 answers by status.
pub async fn drive_matches(
    users: Arc<Vec<User>>,
    concurrency: usize,
    duration: Duration,
    max_requests: Option<usize>,
    seed: u64,
) -> (Vec<f64>, std::collections::BTreeMap<u16, u64>) {
    let stop = Instant::now() + duration;
    let issued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The first few failures are printed, so a run with errors explains itself.
    let shown = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let users = users.clone();
        let issued = issued.clone();
        let shown = shown.clone();
        tasks.push(tokio::spawn(async move {
            let mut pop =
                Population::new(seed ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut lat = Vec::new();
            let mut errs = std::collections::BTreeMap::new();
            let mut n = 0u64;
            while Instant::now() < stop {
                if let Some(max) = max_requests
                    && issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= max
                {
                    break;
                }
                let u = &users[pop.pick(users.len())];
                let body = pop.match_options();
                let key = format!("load-{c}-{n}");
                n += 1;
                let t = Instant::now();
                let r = u.post_match_json(&key, &body).await;
                if r.status == 201 {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    if shown.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
                        eprintln!("match request answered HTTP {}: {}", r.status, r.text);
                    }
                    *errs.entry(r.status).or_insert(0u64) += 1;
                }
            }
            (lat, errs)
        }));
    }
    let mut lat = Vec::new();
    let mut errs = std::collections::BTreeMap::new();
    for t in tasks {
        let (l, e) = t.await.expect("load task");
        lat.extend(l);
        for (k, v) in e {
            *errs.entry(k).or_insert(0) += v;
        }
    }
    (lat, errs)
}

/// Open loop: match requests *offered* at `rate` per second for `duration`, whatever the
/// answers' latency (a closed loop of N clients can only measure latency at the rate it
/// reaches itself). Latency counts from each request's scheduled send time, so a stalled
/// relay shows up as latency instead of as fewer requests (no coordinated omission). At most
/// `max_in_flight` requests are outstanding; requests that would exceed it are counted as
/// status 0 ("not sent: too many in flight").
pub async fn drive_matches_open(
    users: Arc<Vec<User>>,
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
    seed: u64,
) -> (Vec<f64>, std::collections::BTreeMap<u16, u64>) {
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let gate = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let shown = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let runtime = tokio::runtime::Handle::current();
    // The schedule is kept by a thread of its own sleeping with the OS's high-resolution
    // timer: tokio's timer wheel rounds every deadline up to the next millisecond, which
    // alone added ~0.5-1 ms to each request's latency (issue 16).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let scheduler = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        let mut pop = Population::new(seed);
        let mut skipped = 0u64;
        for n in 0..total {
            let due = start + Duration::from_secs_f64(n as f64 / rate);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            let Ok(permit) = gate.clone().try_acquire_owned() else {
                skipped += 1;
                continue;
            };
            let u = users[pop.pick(users.len())].clone();
            let body = pop.match_options();
            let shown = shown.clone();
            let task = runtime.spawn(async move {
                let r = u.post_match_json(&format!("open-{seed}-{n}"), &body).await;
                drop(permit);
                let ms = due.elapsed().as_secs_f64() * 1000.0;
                if r.status != 201 && shown.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
                    eprintln!("match request answered HTTP {}: {}", r.status, r.text);
                }
                (r.status, ms)
            });
            if tx.send(task).is_err() {
                break;
            }
        }
        skipped
    });
    let mut tasks = Vec::with_capacity(total as usize);
    while let Some(t) = rx.recv().await {
        tasks.push(t);
    }
    let skipped = scheduler.join().expect("scheduler thread");
    let mut lat = Vec::new();
    let mut errs = std::collections::BTreeMap::new();
    if skipped > 0 {
        errs.insert(0, skipped);
    }
    for t in tasks {
        let (status, ms) = t.await.expect("load task");
        if status == 201 {
            lat.push(ms);
        } else {
            *errs.entry(status).or_insert(0) += 1;
        }
    }
    (lat, errs)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
