//! The appliance under test: the real `comatching-appliance run` binary as a child process with
//! its own temp dir (config, replica, logs) and status port. It can be killed with SIGKILL,
//! have its data dir wiped, and be restarted on the same id, which is how the re-image and
//! power-cut tests work.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::PATIENCE;
use crate::process::{ServiceChild, workspace_binary};
use crate::relay::free_port;

pub const APPLIANCE_BIN_ENV: &str = "COMATCHING_APPLIANCE_BIN";

/// The appliance's TOML, as the tests write it (keys are the appliance's own).
#[derive(Clone, Debug, Serialize)]
pub struct ApplianceConfig {
    pub appliance: ApplianceSection,
    pub http: HttpSection,
    pub storage: StorageSection,
    pub broker: BrokerSection,
    pub sync: SyncSection,
    pub matching: MatchingSection,
    pub tailscale: TailscaleSection,
}

#[derive(Clone, Debug, Serialize)]
pub struct ApplianceSection {
    pub id: String,
}
#[derive(Clone, Debug, Serialize)]
pub struct HttpSection {
    pub listen: String,
}
#[derive(Clone, Debug, Serialize)]
pub struct StorageSection {
    pub data_dir: PathBuf,
    pub backend: String,
}
#[derive(Clone, Debug, Serialize)]
pub struct BrokerSection {
    pub url: String,
    pub max_backoff_ms: u64,
    /// The appliance's default (10 s) when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_s: Option<u16>,
    #[serde(flatten)]
    pub security: crate::broker::BrokerSecurity,
}
#[derive(Clone, Debug, Serialize)]
pub struct SyncSection {
    pub hello_interval_ms: u64,
    pub batch_max: usize,
    /// The longest pause between replays while an event cannot be committed (F13).
    pub retry_max_ms: u64,
    /// `sync.queue_expires_h`; the appliance's default (72 h) when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_expires_h: Option<f64>,
}
#[derive(Clone, Debug, Serialize)]
pub struct MatchingSection {
    pub engine: String,
}
#[derive(Clone, Debug, Serialize)]
pub struct TailscaleSection {
    pub cli: PathBuf,
    pub timeout_ms: u64,
}

impl ApplianceConfig {
    pub fn new(id: &str, amqp_url: impl Into<String>) -> ApplianceConfig {
        ApplianceConfig {
            appliance: ApplianceSection { id: id.to_owned() },
            http: HttpSection {
                listen: String::new(),
            },
            storage: StorageSection {
                data_dir: PathBuf::new(),
                backend: "sqlite".into(),
            },
            broker: BrokerSection {
                url: amqp_url.into(),
                max_backoff_ms: 1_000,
                heartbeat_s: None,
                security: Default::default(),
            },
            sync: SyncSection {
                hello_interval_ms: 1_000,
                batch_max: 1_000,
                retry_max_ms: 2_000,
                queue_expires_h: None,
            },
            matching: MatchingSection {
                engine: "buckets".into(),
            },
            tailscale: TailscaleSection {
                cli: PathBuf::from("/nonexistent/tailscale"),
                timeout_ms: 500,
            },
        }
    }
}

pub struct ApplianceProcess {
    _dir: tempfile::TempDir,
    config: ApplianceConfig,
    service: ServiceChild,
    status_url: String,
    http: reqwest::Client,
}

impl ApplianceProcess {
    /// Starts `comatching-appliance run` in a fresh temp dir on a free port; waits for
    /// `/healthz` (not for readiness: see [`ApplianceProcess::wait_ready`]).
    pub async fn start(mut config: ApplianceConfig) -> ApplianceProcess {
        let dir = tempfile::Builder::new()
            .prefix("comatching-appliance-test-")
            .tempdir()
            .expect("temp dir");
        config.http.listen = format!("127.0.0.1:{}", free_port());
        config.storage.data_dir = dir.path().join("data");
        let status_url = format!("http://{}", config.http.listen);
        let service = ServiceChild {
            name: "appliance",
            bin: workspace_binary("comatching-appliance", APPLIANCE_BIN_ENV),
            env_prefix: "COMATCHING_APPLIANCE__",
            dir: dir.path().to_path_buf(),
            child: None,
        };
        let mut a = ApplianceProcess {
            _dir: dir,
            config,
            service,
            status_url,
            http: crate::api::http_client(None),
        };
        a.spawn();
        a.wait_healthy().await;
        a
    }

    fn spawn(&mut self) {
        let text = toml::to_string(&self.config).expect("config serialises");
        self.service.spawn("run", &text);
    }

    pub fn config(&self) -> &ApplianceConfig {
        &self.config
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.config.storage.data_dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.service.pid()
    }

    /// `http://127.0.0.1:PORT` of the status port.
    pub fn base_url(&self) -> &str {
        &self.status_url
    }

    /// `comatching-appliance ARGS --config FILE` against this appliance's configuration (the
    /// operator commands: `status`, `doctor`, …), not yet spawned; the caller's
    /// `COMATCHING_APPLIANCE__*` variables removed as for the service itself.
    pub fn cli(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.service.bin);
        cmd.args(args)
            .arg("--config")
            .arg(self.service.config_path())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with(self.service.env_prefix) {
                cmd.env_remove(k);
            }
        }
        cmd
    }

    /// `GET /status` as JSON, or None while the port does not answer.
    pub async fn status(&self) -> Option<Value> {
        self.status_with("").await
    }

    /// `GET /status?QUERY` (e.g. `recount=1`: the store's count and digests recomputed).
    pub async fn status_with(&self, query: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/status?{query}", self.status_url))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    pub async fn wait_healthy(&mut self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            self.service.assert_running();
            let ok = self
                .http
                .get(format!("{}/healthz", self.status_url))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "appliance never became healthy\n{}",
                self.service.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `/status` satisfies `pred`; returns that status. Panics with the logs after
    /// `timeout`.
    pub async fn wait_status(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        loop {
            self.service.assert_running();
            if let Some(s) = self.status().await {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for appliance {what}; last status: {}\n{}",
                last.map(|v| v.to_string()).unwrap_or_default(),
                self.service.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the appliance serves matches.
    pub async fn wait_ready(&mut self) -> Value {
        self.wait_status(PATIENCE, "ready", |s| s["ready"] == Value::Bool(true))
            .await
    }

    /// Waits until the replica holds exactly `count` users with `digest` and is ready.
    pub async fn wait_converged(&mut self, count: u64, digest: &str, timeout: Duration) -> Value {
        let digest = digest.to_owned();
        self.wait_status(
            timeout,
            &format!("count {count} digest {digest}"),
            move |s| {
                s["ready"] == Value::Bool(true)
                    && s["count"].as_u64() == Some(count)
                    && s["digest"].as_str() == Some(digest.as_str())
            },
        )
        .await
    }

    /// SIGSTOP: the process holds its connections but does nothing (work piles up).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`ApplianceProcess::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the child process this harness started.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    pub fn kill_9(&mut self) {
        self.service.kill_9();
    }

    /// A clean stop (SIGTERM, waits for the exit).
    pub fn stop(&mut self) {
        self.service.stop();
    }

    /// Changes `broker.quorum_group_size` for the next restart.
    pub fn set_quorum_group_size(&mut self, n: Option<u16>) {
        self.config.broker.security.quorum_group_size = n;
    }

    /// Starts again on the same id, port and data dir.
    pub async fn restart(&mut self) {
        self.service.kill_9();
        self.spawn();
        self.wait_healthy().await;
    }

    /// Starts again on the same id, port and data dir without waiting for `/healthz`, which
    /// answers 503 while the store cannot be opened.
    pub fn respawn(&mut self) {
        self.service.kill_9();
        self.spawn();
    }

    /// Deletes the replica (a re-image). The process must be stopped.
    pub fn wipe_data(&mut self) {
        assert!(
            self.service.pid().is_none(),
            "stop the appliance before wiping it"
        );
        let _ = std::fs::remove_dir_all(&self.config.storage.data_dir);
    }

    pub fn log_tail(&self) -> String {
        self.service.log_tail()
    }
}
