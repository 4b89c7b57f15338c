//! The tailscale probe behind the status page and `doctor` (DESIGN.md §9).
//!
//! The appliance never talks to `tailscaled` directly: it runs `tailscale status --json` through
//! [`std::process::Command`] with a deadline and classifies what came back. The CLI is the stable
//! interface (the local API is not), and a wedged daemon makes the CLI hang, so every call is
//! bounded: the child is killed when the deadline passes and the probe reports
//! [`TailscaleState::Timeout`].
//!
//! Classification (the facts in NOTES.md "Tailscale CLI"):
//! * the binary cannot be found → [`TailscaleState::CliMissing`];
//! * exit status non-zero with "failed to connect to local tailscaled" on stderr →
//!   [`TailscaleState::DaemonDown`]; any other non-zero exit → [`TailscaleState::Error`];
//! * exit 0 (the daemon answered, whatever its state): read `BackendState`:
//!   `Running` with at least one of `Self.TailscaleIPs` and `Self.Online` not `false` →
//!   [`TailscaleState::Up`]; `Running` without addresses or not yet online, `Starting` and
//!   `NoState` → [`TailscaleState::Starting`]; `NeedsLogin` → [`TailscaleState::NeedsLogin`];
//!   `NeedsMachineAuth` (an admin must approve the device) → [`TailscaleState::NeedsApproval`];
//!   `Stopped` → [`TailscaleState::Stopped`]; anything else, or output that is not the expected
//!   JSON object → [`TailscaleState::Error`].
//!
//! Unknown JSON fields are ignored, so newer CLI versions keep working. `Health[]` does not change
//! the state; it is returned next to it by [`TailscaleProbe::report`] for the status page.

use std::io::{self, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What the tailnet looks like from this box.
///
/// Serialised adjacently tagged with snake_case names, e.g. `{"state":"needs_login"}`,
/// `{"state":"up","detail":{"ips":["100.64.0.7"],"hostname":"edge.tail1234.ts.net"}}` or
/// `{"state":"error","detail":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum TailscaleState {
    /// Logged in, running, with tailnet addresses.
    Up {
        /// `Self.TailscaleIPs` (IPv4 first, as the CLI prints them).
        ips: Vec<String>,
        /// The MagicDNS name without the trailing dot, or `Self.HostName` when there is none.
        hostname: String,
    },
    /// The daemon is starting or connecting (`NoState`, `Starting`, or `Running` but not yet
    /// online or without addresses).
    Starting,
    /// Logged out: the auth key is missing, expired or was already used.
    NeedsLogin,
    /// Registered, waiting for an admin to approve the device (`NeedsMachineAuth`).
    NeedsApproval,
    /// Someone ran `tailscale down`.
    Stopped,
    /// `tailscaled` is not running (the CLI could not reach its socket).
    DaemonDown,
    /// The `tailscale` binary was not found.
    CliMissing,
    /// The CLI did not answer before the deadline and was killed.
    Timeout,
    /// Anything else: unexpected exit status, unreadable output, unknown state.
    Error(String),
}

impl TailscaleState {
    /// A short snake_case label, the same string as the serialised `state` tag.
    pub fn label(&self) -> &'static str {
        match self {
            TailscaleState::Up { .. } => "up",
            TailscaleState::Starting => "starting",
            TailscaleState::NeedsLogin => "needs_login",
            TailscaleState::NeedsApproval => "needs_approval",
            TailscaleState::Stopped => "stopped",
            TailscaleState::DaemonDown => "daemon_down",
            TailscaleState::CliMissing => "cli_missing",
            TailscaleState::Timeout => "timeout",
            TailscaleState::Error(_) => "error",
        }
    }

    /// True only for [`TailscaleState::Up`].
    pub fn is_up(&self) -> bool {
        matches!(self, TailscaleState::Up { .. })
    }
}

/// The state plus the daemon's `Health[]` warnings (empty when the CLI gave none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailscaleReport {
    /// The classification.
    #[serde(flatten)]
    pub state: TailscaleState,
    /// `Health[]` as reported by the daemon, verbatim.
    pub health: Vec<String>,
}

/// The `[tailscale]` section of the appliance configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TailscaleSettings {
    /// Path (or bare name, looked up in `PATH`) of the `tailscale` CLI.
    pub cli: PathBuf,
    /// How long one `tailscale status --json` may take before it is killed.
    pub timeout_ms: u64,
}

impl Default for TailscaleSettings {
    fn default() -> Self {
        TailscaleSettings {
            cli: PathBuf::from(DEFAULT_CLI),
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }
}

/// Default CLI name, looked up in `PATH`.
pub const DEFAULT_CLI: &str = "tailscale";
/// Default deadline for one probe.
pub const DEFAULT_TIMEOUT_MS: u64 = 3_000;

/// Output beyond this many bytes per stream is discarded (the status of a large tailnet with
/// peers is a few hundred KiB; this only protects memory against a runaway child).
const MAX_CAPTURE: u64 = 8 * 1024 * 1024;
/// How often the child is polled while waiting for it.
const POLL: Duration = Duration::from_millis(5);
/// Longest stderr excerpt carried in [`TailscaleState::Error`].
const MAX_DETAIL: usize = 512;
/// ETXTBSY on Linux: the executable is still open for writing somewhere (a freshly written
/// script and a concurrent fork elsewhere in the process). Retried until the deadline.
const ETXTBSY: i32 = 26;

/// Runs `<cli> status --json` with a deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailscaleProbe {
    /// The CLI to run.
    pub cli: PathBuf,
    /// Deadline for the whole call (spawn, run, read output).
    pub timeout: Duration,
}

impl Default for TailscaleProbe {
    fn default() -> Self {
        TailscaleProbe::from(&TailscaleSettings::default())
    }
}

impl From<&TailscaleSettings> for TailscaleProbe {
    fn from(s: &TailscaleSettings) -> Self {
        TailscaleProbe {
            cli: s.cli.clone(),
            timeout: Duration::from_millis(s.timeout_ms),
        }
    }
}

impl TailscaleProbe {
    /// A probe of `cli` with the given deadline.
    pub fn new(cli: impl Into<PathBuf>, timeout: Duration) -> Self {
        TailscaleProbe {
            cli: cli.into(),
            timeout,
        }
    }

    /// Runs the CLI once and classifies the answer. Never blocks much longer than `timeout`.
    pub fn probe(&self) -> TailscaleState {
        self.report().state
    }

    /// Like [`TailscaleProbe::probe`], with the daemon's health warnings.
    pub fn report(&self) -> TailscaleReport {
        let deadline = Instant::now() + self.timeout;
        let child = match self.spawn(deadline) {
            Ok(child) => child,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return TailscaleReport::bare(TailscaleState::CliMissing);
            }
            Err(e) if e.raw_os_error() == Some(ETXTBSY) => {
                return TailscaleReport::bare(TailscaleState::Timeout);
            }
            Err(e) => {
                return TailscaleReport::bare(TailscaleState::Error(format!(
                    "cannot run {}: {e}",
                    self.cli.display()
                )));
            }
        };
        match run_to_completion(child, deadline) {
            Ok(Some((status, stdout, stderr))) => classify(status.code(), &stdout, &stderr),
            Ok(None) => TailscaleReport::bare(TailscaleState::Timeout),
            Err(e) => TailscaleReport::bare(TailscaleState::Error(format!(
                "waiting for {}: {e}",
                self.cli.display()
            ))),
        }
    }

    fn spawn(&self, deadline: Instant) -> io::Result<Child> {
        loop {
            let spawned = Command::new(&self.cli)
                .args(["status", "--json"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn();
            match spawned {
                Err(e) if e.raw_os_error() == Some(ETXTBSY) && Instant::now() < deadline => {
                    thread::sleep(POLL);
                }
                other => return other,
            }
        }
    }
}

impl TailscaleReport {
    fn bare(state: TailscaleState) -> Self {
        TailscaleReport {
            state,
            health: Vec::new(),
        }
    }
}

type Captured = (ExitStatus, Vec<u8>, Vec<u8>);

/// Waits for the child and its output until `deadline`. `Ok(None)` means the deadline passed:
/// the child has been killed and reaped. Reader threads are never joined past the deadline, so a
/// grandchild that keeps a pipe open cannot stall the caller.
fn run_to_completion(mut child: Child, deadline: Instant) -> io::Result<Option<Captured>> {
    let stdout = spawn_reader(child.stdout.take());
    let stderr = spawn_reader(child.stderr.take());
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            // The child may exit between try_wait and kill; both outcomes are fine.
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(POLL);
    };
    let Some(out) = recv_until(&stdout, deadline) else {
        return Ok(None);
    };
    let Some(err) = recv_until(&stderr, deadline) else {
        return Ok(None);
    };
    Ok(Some((status, out, err)))
}

fn spawn_reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    match pipe {
        Some(pipe) => {
            thread::spawn(move || {
                let mut buf = Vec::new();
                // A read error leaves what was read so far; classification copes with truncation.
                let _ = pipe.take(MAX_CAPTURE).read_to_end(&mut buf);
                let _ = tx.send(buf);
            });
        }
        None => {
            let _ = tx.send(Vec::new());
        }
    }
    rx
}

fn recv_until(rx: &mpsc::Receiver<Vec<u8>>, deadline: Instant) -> Option<Vec<u8>> {
    let left = deadline.saturating_duration_since(Instant::now());
    rx.recv_timeout(left).ok()
}

/// The subset of `tailscale status --json` the probe reads. Field names are the CLI's own
/// (PascalCase, `Self`, `TailscaleIPs`); everything else in the document is ignored.
#[derive(Debug, Deserialize)]
struct StatusJson {
    #[serde(rename = "BackendState")]
    backend_state: Option<String>,
    #[serde(rename = "Self")]
    self_node: Option<SelfNode>,
    #[serde(rename = "TailscaleIPs")]
    tailscale_ips: Option<Vec<String>>,
    #[serde(rename = "Health")]
    health: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct SelfNode {
    #[serde(rename = "HostName")]
    host_name: Option<String>,
    #[serde(rename = "DNSName")]
    dns_name: Option<String>,
    #[serde(rename = "Online")]
    online: Option<bool>,
    #[serde(rename = "TailscaleIPs")]
    tailscale_ips: Option<Vec<String>>,
}

/// Classifies one run of `tailscale status --json`: its exit code (`None` when killed by a
/// signal), stdout and stderr. Pure; public so that `doctor` and tests can feed captured output.
pub fn classify(code: Option<i32>, stdout: &[u8], stderr: &[u8]) -> TailscaleReport {
    let err_text = String::from_utf8_lossy(stderr);
    if code != Some(0) {
        if err_text.contains("failed to connect to local tailscaled") {
            return TailscaleReport::bare(TailscaleState::DaemonDown);
        }
        let how = match code {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        };
        return TailscaleReport::bare(TailscaleState::Error(detail(&how, &err_text)));
    }
    let parsed: StatusJson = match serde_json::from_slice(stdout) {
        Ok(p) => p,
        Err(e) => {
            return TailscaleReport::bare(TailscaleState::Error(detail(
                &format!("unreadable status JSON ({e})"),
                &err_text,
            )));
        }
    };
    let health = parsed.health.clone().unwrap_or_default();
    let state = match parsed.backend_state.as_deref() {
        Some("Running") => running_state(&parsed),
        Some("Starting") | Some("NoState") => TailscaleState::Starting,
        Some("NeedsLogin") => TailscaleState::NeedsLogin,
        Some("NeedsMachineAuth") => TailscaleState::NeedsApproval,
        Some("Stopped") => TailscaleState::Stopped,
        Some(other) => TailscaleState::Error(format!("unknown BackendState {other:?}")),
        None => TailscaleState::Error("status JSON has no BackendState".to_string()),
    };
    TailscaleReport { state, health }
}

fn running_state(status: &StatusJson) -> TailscaleState {
    let me = status.self_node.as_ref();
    let ips: Vec<String> = me
        .and_then(|s| s.tailscale_ips.clone())
        .or_else(|| status.tailscale_ips.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|ip| !ip.is_empty())
        .collect();
    let online = me.and_then(|s| s.online).unwrap_or(true);
    if ips.is_empty() || !online {
        return TailscaleState::Starting;
    }
    let dns = me
        .and_then(|s| s.dns_name.as_deref())
        .map(|d| d.trim_end_matches('.'))
        .filter(|d| !d.is_empty());
    let hostname = match dns {
        Some(d) => d.to_string(),
        None => me.and_then(|s| s.host_name.clone()).unwrap_or_default(),
    };
    TailscaleState::Up { ips, hostname }
}

fn detail(what: &str, stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        return what.to_string();
    }
    let mut cut = stderr.len().min(MAX_DETAIL);
    while !stderr.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{what}: {}", &stderr[..cut])
}

#[cfg(test)]
mod tests {
    //! Fake `tailscale` executables: shell scripts written into a temp dir at test time that
    //! print fixture JSON in the real CLI's shape (appliance/tests/fixtures/tailscale/) and exit
    //! the way the real CLI does.

    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tailscale")
            .join(name)
    }

    /// Writes an executable `tailscale` script with `body` into a fresh temp dir.
    fn fake_cli(body: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tailscale");
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write fake cli");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        (dir, path)
    }

    /// A fake CLI that insists on the real arguments, prints a fixture and exits with `code`.
    fn fake_printing(name: &str, code: i32) -> (tempfile::TempDir, PathBuf) {
        let f = fixture(name);
        assert!(f.is_file(), "missing fixture {}", f.display());
        fake_cli(&format!(
            "[ \"$1\" = status ] && [ \"$2\" = --json ] || {{ echo \"bad args: $*\" >&2; exit 64; }}\n\
             cat '{}'\nexit {code}",
            f.display()
        ))
    }

    fn probe(cli: &Path) -> TailscaleState {
        TailscaleProbe::new(cli, Duration::from_secs(10)).probe()
    }

    #[test]
    fn running_is_up_with_ips_and_magicdns_name() {
        let (_d, cli) = fake_printing("running.json", 0);
        let report = TailscaleProbe::new(&cli, Duration::from_secs(10)).report();
        assert_eq!(
            report.state,
            TailscaleState::Up {
                ips: vec![
                    "100.101.102.103".to_string(),
                    "fd7a:115c:a1e0::e001:6667".to_string()
                ],
                hostname: "comatching-edge.tail4c2a1.ts.net".to_string(),
            }
        );
        assert!(report.state.is_up());
        assert!(report.health.is_empty());
    }

    #[test]
    fn needs_login() {
        let (_d, cli) = fake_printing("needs-login.json", 0);
        let report = TailscaleProbe::new(&cli, Duration::from_secs(10)).report();
        assert_eq!(report.state, TailscaleState::NeedsLogin);
        assert_eq!(report.health.len(), 1, "health carried through: {report:?}");
    }

    #[test]
    fn needs_machine_auth_is_needs_approval() {
        let (_d, cli) = fake_printing("needs-machine-auth.json", 0);
        assert_eq!(probe(&cli), TailscaleState::NeedsApproval);
    }

    #[test]
    fn stopped() {
        let (_d, cli) = fake_printing("stopped.json", 0);
        assert_eq!(probe(&cli), TailscaleState::Stopped);
    }

    #[test]
    fn starting() {
        let (_d, cli) = fake_printing("starting.json", 0);
        assert_eq!(probe(&cli), TailscaleState::Starting);
    }

    #[test]
    fn running_but_not_yet_online_is_starting() {
        let (_d, cli) = fake_printing("running-offline.json", 0);
        assert_eq!(probe(&cli), TailscaleState::Starting);
    }

    #[test]
    fn daemon_down() {
        let f = fixture("daemon-down.stderr");
        let (_d, cli) = fake_cli(&format!("cat '{}' >&2\nexit 1", f.display()));
        assert_eq!(probe(&cli), TailscaleState::DaemonDown);
    }

    #[test]
    fn cli_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            probe(&dir.path().join("no-such-tailscale")),
            TailscaleState::CliMissing
        );
    }

    #[test]
    fn not_executable_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tailscale");
        fs::write(&path, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(probe(&path), TailscaleState::Error(_)));
    }

    #[test]
    fn hanging_cli_times_out_quickly() {
        let (_d, cli) = fake_cli("exec sleep 30");
        let started = Instant::now();
        let state = TailscaleProbe::new(&cli, Duration::from_millis(300)).probe();
        assert_eq!(state, TailscaleState::Timeout);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn grandchild_holding_the_pipe_does_not_stall_the_probe() {
        // Without `exec`, killing the shell leaves `sleep` with stdout open.
        let (_d, cli) = fake_cli("sleep 30\necho never");
        let started = Instant::now();
        let state = TailscaleProbe::new(&cli, Duration::from_millis(300)).probe();
        assert_eq!(state, TailscaleState::Timeout);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn garbage_output_is_an_error() {
        let (_d, cli) = fake_printing("garbage.txt", 0);
        match probe(&cli) {
            TailscaleState::Error(msg) => assert!(msg.contains("unreadable"), "{msg}"),
            other => panic!("expected Error, got {other:?}"),
        }
    }

    #[test]
    fn other_failure_is_an_error_with_stderr() {
        let (_d, cli) = fake_cli("echo 'permission denied: /run/tailscale' >&2\nexit 2");
        match probe(&cli) {
            TailscaleState::Error(msg) => {
                assert!(msg.contains("exit status 2"), "{msg}");
                assert!(msg.contains("permission denied"), "{msg}");
            }
            other => panic!("expected Error, got {other:?}"),
        }
    }

    #[test]
    fn large_output_is_read_without_deadlock() {
        // Much more than a pipe buffer on stdout before the process exits.
        let (_d, cli) = fake_cli(concat!(
            "printf '{\"BackendState\":\"Stopped\",\"Pad\":\"'\n",
            "i=0; while [ $i -lt 2000 ]; do printf '%0100d' 0; i=$((i+1)); done\n",
            "printf '\"}'\nexit 0"
        ));
        assert_eq!(probe(&cli), TailscaleState::Stopped);
    }

    #[test]
    fn classify_edge_cases() {
        let c = |json: &str| classify(Some(0), json.as_bytes(), b"").state;
        assert_eq!(c(r#"{"BackendState":"NoState"}"#), TailscaleState::Starting);
        assert!(matches!(c("{}"), TailscaleState::Error(_)));
        assert!(matches!(c("[1,2]"), TailscaleState::Error(_)));
        assert!(matches!(
            c(r#"{"BackendState":"Exploded"}"#),
            TailscaleState::Error(m) if m.contains("Exploded")
        ));
        // Running without Self: fall back to the top-level addresses; no name.
        assert_eq!(
            c(
                r#"{"BackendState":"Running","TailscaleIPs":["100.64.0.1"],"Self":null,"Health":null}"#
            ),
            TailscaleState::Up {
                ips: vec!["100.64.0.1".into()],
                hostname: String::new()
            }
        );
        // Running without addresses is not up yet.
        assert_eq!(
            c(
                r#"{"BackendState":"Running","Self":{"HostName":"x","Online":true,"TailscaleIPs":null}}"#
            ),
            TailscaleState::Starting
        );
        // No MagicDNS name: HostName.
        assert_eq!(
            c(
                r#"{"BackendState":"Running","Self":{"HostName":"box","DNSName":"","Online":true,"TailscaleIPs":["100.64.0.2"]}}"#
            ),
            TailscaleState::Up {
                ips: vec!["100.64.0.2".into()],
                hostname: "box".into()
            }
        );
        // Killed by a signal.
        assert!(matches!(
            classify(None, b"", b"").state,
            TailscaleState::Error(m) if m.contains("signal")
        ));
        // Long stderr is cut on a char boundary.
        let long = "é".repeat(1000);
        match classify(Some(3), b"", long.as_bytes()).state {
            TailscaleState::Error(m) => assert!(m.len() < 600, "{}", m.len()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn serialises_snake_case_for_the_status_page() {
        let up = TailscaleState::Up {
            ips: vec!["100.64.0.7".into()],
            hostname: "edge".into(),
        };
        assert_eq!(
            serde_json::to_value(&up).unwrap(),
            serde_json::json!({"state": "up", "detail": {"ips": ["100.64.0.7"], "hostname": "edge"}})
        );
        assert_eq!(
            serde_json::to_value(TailscaleState::NeedsApproval).unwrap(),
            serde_json::json!({"state": "needs_approval"})
        );
        assert_eq!(
            serde_json::to_value(TailscaleState::Error("x".into())).unwrap(),
            serde_json::json!({"state": "error", "detail": "x"})
        );
        let report = TailscaleReport {
            state: TailscaleState::DaemonDown,
            health: vec!["h".into()],
        };
        assert_eq!(
            serde_json::to_value(&report).unwrap(),
            serde_json::json!({"state": "daemon_down", "health": ["h"]})
        );
        for s in [
            TailscaleState::Starting,
            TailscaleState::NeedsLogin,
            TailscaleState::Stopped,
            TailscaleState::CliMissing,
            TailscaleState::Timeout,
            up,
        ] {
            let v = serde_json::to_value(&s).unwrap();
            assert_eq!(v["state"], s.label());
            let back: TailscaleState = serde_json::from_value(v).unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn settings_defaults_and_conversion() {
        let s: TailscaleSettings = serde_json::from_str(r#"{"timeout_ms": 250}"#).unwrap();
        assert_eq!(s.cli, PathBuf::from("tailscale"));
        let p = TailscaleProbe::from(&s);
        assert_eq!(p.timeout, Duration::from_millis(250));
        assert_eq!(
            TailscaleProbe::default().timeout,
            Duration::from_millis(DEFAULT_TIMEOUT_MS)
        );
    }
}
