//! The relay under test: the real `comatching-relay` binary as a child process.
//!
//! Each [`RelayProcess`] has its own temp dir (config file, database, logs) and its own port.
//! It can be killed with SIGKILL and restarted on the same database and port, which is how the
//! crash tests work. When a test panics, the tail of the relay's logs is printed so the failure
//! explains itself.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::PATIENCE;
use crate::process::{ServiceChild, workspace_binary};

/// Environment variable naming the relay binary, overriding the lookup next to the tests.
pub const RELAY_BIN_ENV: &str = "COMATCHING_RELAY_BIN";

/// The relay's configuration file, as the tests write it. Field names are the relay's TOML keys;
/// defaults are the relay's own, except rate limits (generous, so only the rate-limit test
/// meets them) and the listen address (a free port).
#[derive(Clone, Debug, Serialize)]
pub struct RelayConfig {
    pub http: HttpSection,
    pub storage: StorageSection,
    pub broker: BrokerSection,
    pub matching: MatchingSection,
    pub ledger: LedgerSection,
    pub points: PointsSection,
    /// Not written at all with [`RateLimitSection::relay_defaults`]: the relay's own defaults.
    #[serde(skip_serializing_if = "RateLimitSection::is_relay_defaults")]
    pub rate_limit: RateLimitSection,
    /// Password hashing cost; `None` keeps the relay's (production) default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSection>,
    /// `[sync]`; `None` keeps the relay's defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncSection>,
    /// `[dead_letters]`; `None` keeps the relay's defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<DeadLettersSection>,
    /// Live streams; `None` keeps the relay's defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsSection>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SyncSection {
    pub queue_expires_h: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeadLettersSection {
    pub max_length: i64,
    pub message_ttl_h: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EventsSection {
    pub keep_alive_s: u64,
    pub max_streams: usize,
    pub retention_hours: u64,
    pub retention_rows: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuthSection {
    pub hash_memory_kib: u32,
    pub hash_iterations: u32,
    /// Session lifetime in hours; `None` keeps the relay's default (14 days).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_ttl_h: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HttpSection {
    pub listen: String,
    pub max_body_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Not the relay's: the CA the test's clients trust when the relay serves HTTPS.
    #[serde(skip)]
    pub trust_ca: Option<PathBuf>,
    /// Origins allowed to call the API cross-origin (CORS); empty = the relay's default (none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cors_allowed_origins: Vec<String>,
    /// The edge's limits (issue 13); `None` keeps the relay's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_read_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_handshake_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StorageSection {
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct BrokerSection {
    pub url: String,
    #[serde(flatten)]
    pub security: crate::broker::BrokerSecurity,
}

#[derive(Clone, Debug, Serialize)]
pub struct MatchingSection {
    pub deadline_ms: u64,
    pub max_picked: u32,
    pub k: u16,
}

#[derive(Clone, Debug, Serialize)]
pub struct LedgerSection {
    pub sweep_interval_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PointsSection {
    pub base: u64,
    pub exclude_same_major: u64,
    pub important: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RateLimitSection {
    pub per_ip_per_minute: u32,
    pub per_user_per_minute: u32,
    pub credentials_per_ip_per_minute: u32,
    pub login_per_username_per_minute: u32,
    pub login_burst: u32,
    /// Set by [`RateLimitSection::relay_defaults`]: write no `[rate_limit]` section at all.
    #[serde(skip)]
    pub relay_defaults: bool,
}

impl RateLimitSection {
    /// Limits no test meets unless it lowers one.
    pub fn generous() -> RateLimitSection {
        RateLimitSection {
            per_ip_per_minute: 1_000_000,
            per_user_per_minute: 1_000_000,
            credentials_per_ip_per_minute: 1_000_000,
            login_per_username_per_minute: 1_000_000,
            login_burst: 1_000_000,
            relay_defaults: false,
        }
    }

    /// The relay's production defaults (the section is left out of the file). The figures
    /// are only a description; the relay decides.
    pub fn relay_defaults() -> RateLimitSection {
        RateLimitSection {
            per_ip_per_minute: 6_000,
            per_user_per_minute: 120,
            credentials_per_ip_per_minute: 120,
            login_per_username_per_minute: 5,
            login_burst: 5,
            relay_defaults: true,
        }
    }

    fn is_relay_defaults(&self) -> bool {
        self.relay_defaults
    }
}

impl RelayConfig {
    /// The relay's defaults, with the broker at `amqp_url` and generous rate limits. The listen
    /// address and data dir are filled in by [`RelayProcess::start`].
    pub fn new(amqp_url: impl Into<String>) -> RelayConfig {
        RelayConfig {
            http: HttpSection {
                listen: String::new(),
                max_body_bytes: 16 * 1024,
                tls_cert: None,
                tls_key: None,
                trust_ca: None,
                cors_allowed_origins: Vec::new(),
                max_connections: None,
                header_read_timeout_ms: None,
                body_timeout_ms: None,
                idle_timeout_ms: None,
                tls_handshake_timeout_ms: None,
                trusted_proxies: Vec::new(),
            },
            storage: StorageSection {
                data_dir: PathBuf::new(),
            },
            broker: BrokerSection {
                url: amqp_url.into(),
                security: Default::default(),
            },
            matching: MatchingSection {
                deadline_ms: 5_000,
                max_picked: 5,
                k: 8,
            },
            ledger: LedgerSection {
                sweep_interval_ms: 2_000,
            },
            points: PointsSection {
                base: 1000,
                exclude_same_major: 200,
                important: 300,
            },
            rate_limit: RateLimitSection::generous(),
            auth: None,
            sync: None,
            dead_letters: None,
            events: None,
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Where the relay binary is: `$COMATCHING_RELAY_BIN`, or next to this executable.
pub fn relay_binary() -> PathBuf {
    workspace_binary("comatching-relay", RELAY_BIN_ENV)
}

/// Copies the files (not subdirectories) of `from` into `to`.
fn copy_files(from: &Path, to: &Path) {
    for f in std::fs::read_dir(from).expect("read dir") {
        let f = f.expect("entry");
        std::fs::copy(f.path(), to.join(f.file_name())).expect("copy");
    }
}

/// Runs `comatching-relay pki ARGS…` (no configuration needed) and returns its output.
pub fn pki(args: &[&str]) -> std::process::Output {
    Command::new(relay_binary())
        .arg("pki")
        .args(args)
        .env_clear()
        .output()
        .expect("run comatching-relay pki")
}

/// A fresh link key in `dir` (`pki link-key`); returns the file's path.
pub fn new_link_key(dir: &Path) -> PathBuf {
    let out = pki(&["link-key", "--dir", dir.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "pki link-key: {out:?}");
    dir.join("link.key")
}

/// One relay process and its private directory. Killed (SIGKILL) on drop.
pub struct RelayProcess {
    /// Declared first so it drops (kills the process) before the directory goes.
    service: ServiceChild,
    _dir: tempfile::TempDir,
    config: RelayConfig,
    base_url: String,
    http: reqwest::Client,
}

impl RelayProcess {
    /// Writes `config` (with a free port and a data dir in a fresh temp dir), spawns
    /// `comatching-relay serve`, and waits for `/healthz`.
    pub async fn start(mut config: RelayConfig) -> RelayProcess {
        let dir = tempfile::Builder::new()
            .prefix("comatching-relay-test-")
            .tempdir()
            .expect("temp dir");
        config.http.listen = format!("127.0.0.1:{}", free_port());
        config.storage.data_dir = dir.path().join("data");
        let scheme = if config.http.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let base_url = format!("{scheme}://{}", config.http.listen);
        let service = ServiceChild {
            name: "relay",
            bin: relay_binary(),
            env_prefix: "COMATCHING_RELAY__",
            dir: dir.path().to_path_buf(),
            child: None,
        };
        let http = crate::api::http_client(config.http.trust_ca.as_deref());
        let mut relay = RelayProcess {
            service,
            _dir: dir,
            config,
            base_url,
            http,
        };
        relay.spawn();
        relay.wait_healthy().await;
        relay
    }

    /// The relay's base URL, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    pub fn config_path(&self) -> PathBuf {
        self.service.config_path()
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.storage.data_dir
    }

    fn write_config(&self) {
        let text = toml::to_string(&self.config).expect("config serialises");
        std::fs::write(self.config_path(), text).expect("write relay config");
    }

    /// A `comatching-relay` command with this relay's directory and a clean environment (no
    /// stray `COMATCHING_RELAY__*` overrides from the caller's shell); it dies with the test.
    pub fn command(&self) -> Command {
        self.service.command()
    }

    fn spawn(&mut self) {
        let text = toml::to_string(&self.config).expect("config serialises");
        self.service.spawn("serve", &text);
    }

    fn assert_running(&mut self) {
        self.service.assert_running();
    }

    async fn probe(&self, path: &str) -> Option<u16> {
        self.http
            .get(format!("{}{path}", self.base_url))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// Waits until `GET /healthz` answers 200.
    pub async fn wait_healthy(&mut self) {
        self.wait_status("/healthz", 200).await;
    }

    /// Waits until `GET /readyz` answers 200 (HTTP up, database and broker connected).
    pub async fn wait_ready(&mut self) {
        self.wait_status("/readyz", 200).await;
    }

    async fn wait_status(&mut self, path: &str, want: u16) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            self.assert_running();
            let got = self.probe(path).await;
            if got == Some(want) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {PATIENCE:?} waiting for GET {path} = {want} (last: {got:?})\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The running process's pid (for RSS measurements and SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.service.pid()
    }

    /// SIGTERM (a clean stop, as systemd does); the exit status if it exited within `within`.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.service.terminate(within).await
    }

    /// SIGKILL: no shutdown hooks, no flushing — a crash.
    pub fn kill_9(&mut self) {
        self.service.kill_9();
    }

    /// Starts the process again on the same database, port and (possibly edited) config, and
    /// waits for `/healthz`. Kills the running process first if there is one.
    pub async fn restart(&mut self) {
        self.kill_9();
        self.spawn();
        // The old socket may linger for a moment; healthz only answers once the new one listens.
        self.wait_healthy().await;
    }

    /// Kills the relay and copies its data directory (a consistent copy: nothing is writing),
    /// then starts it again. The copy lives as long as the returned directory.
    pub async fn backup(&mut self) -> tempfile::TempDir {
        self.kill_9();
        let backup = tempfile::tempdir().expect("backup dir");
        copy_files(self.data_dir(), backup.path());
        self.restart().await;
        self.wait_ready().await;
        backup
    }

    /// An operator's restore: kill the relay, put `backup` in place of its data, run
    /// `admin new-epoch` (a new lineage), start it again.
    pub async fn restore_with_new_epoch(&mut self, backup: &Path) {
        self.kill_9();
        let data = self.data_dir().to_path_buf();
        std::fs::remove_dir_all(&data).expect("remove data");
        std::fs::create_dir_all(&data).expect("data dir");
        copy_files(backup, &data);
        let out = self
            .command()
            .args(["admin", "new-epoch", "--config"])
            .arg(self.config_path())
            .output()
            .expect("admin new-epoch");
        assert!(out.status.success(), "{out:?}");
        self.restart().await;
        self.wait_ready().await;
    }

    /// Runs `comatching-relay ARGS… --config FILE` with this relay's configuration (the command
    /// may run while `serve` does) and returns its output.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.command()
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .output()
            .unwrap_or_else(|e| panic!("run comatching-relay {args:?}: {e}"))
    }

    /// `comatching-relay backup --to DIR [--keep N]`: panics unless it succeeds and printed exactly
    /// one JSON line; returns that line.
    pub fn online_backup(&self, to: &Path, keep: Option<u32>) -> serde_json::Value {
        let to = to.to_str().expect("utf-8 path");
        let keep = keep.map(|k| k.to_string());
        let mut args = vec!["backup", "--to", to];
        if let Some(k) = &keep {
            args.extend(["--keep", k.as_str()]);
        }
        let out = self.run(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.lines().count() == 1,
            "backup failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim()).expect("backup prints one JSON line")
    }

    /// Deletes the relay's whole data directory (the disk was lost). Kill the relay first.
    pub fn destroy_data_dir(&self) {
        assert!(self.pid().is_none(), "the relay is still running");
        std::fs::remove_dir_all(self.data_dir()).expect("remove the data dir");
    }

    /// Changes `broker.quorum_group_size` for the next (re)start.
    pub fn set_quorum_group_size(&mut self, n: Option<u16>) {
        self.config.broker.security.quorum_group_size = n;
        self.write_config();
    }

    /// Changes the broker URL for the next (re)start.
    pub fn set_broker_url(&mut self, url: impl Into<String>) {
        self.config.broker.url = url.into();
        self.write_config();
    }

    /// Runs `comatching-relay admin grant-operator USERNAME --config FILE` (works while `serve`
    /// runs) and panics with its output unless it succeeds.
    pub fn grant_operator(&self, username: &str) {
        let out = self
            .command()
            .args(["admin", "grant-operator", username, "--config"])
            .arg(self.config_path())
            .output()
            .expect("run comatching-relay admin grant-operator");
        assert!(
            out.status.success(),
            "admin grant-operator {username} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until the relay's own readiness says the broker is not connected (`/readyz` 503)
    /// while `/healthz` is 200.
    pub async fn wait_not_ready(&mut self) {
        self.wait_status("/readyz", 503).await;
    }

    /// The last lines of the relay's stdout and stderr, for failure messages.
    pub fn log_tail(&self) -> String {
        self.service.log_tail()
    }
}
