//! A service binary under test as a child process: its config file, its logs in a private temp
//! dir, SIGKILL on drop (and when the test process itself dies), and the tail of its logs for
//! failure messages. The relay and appliance harnesses are thin layers over this.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Where a workspace binary is: `$ENV_VAR`, or `target/<profile>/NAME` next to this executable
/// (`target/<profile>/deps/<test>` or `target/<profile>/<bin>`).
pub fn workspace_binary(name: &str, env_var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("executable has a parent").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{name} not found at {}: run `cargo build --bins` first (scripts/test.sh does), or set {env_var}",
        bin.display()
    );
    bin
}

/// One service process with its own directory.
pub struct ServiceChild {
    pub name: &'static str,
    pub bin: PathBuf,
    /// Environment variables with this prefix are removed from the child's environment, so a
    /// caller's shell cannot change what the test configured.
    pub env_prefix: &'static str,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl ServiceChild {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(format!("{}.toml", self.name))
    }

    fn log_path(&self, stream: &str) -> PathBuf {
        self.dir.join(format!("{}.{stream}.log", self.name))
    }

    /// A command for this binary with a clean environment and the parent-death signal set.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with(self.env_prefix) {
                cmd.env_remove(k);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,lapin=warn,amq_protocol=warn");
        }
        cmd.env("NO_COLOR", "1");
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.current_dir(&self.dir);
        cmd
    }

    /// Writes `config_toml` and spawns `BIN <subcommand> --config FILE`, logs appended.
    pub fn spawn(&mut self, subcommand: &str, config_toml: &str) {
        assert!(self.child.is_none(), "{} already running", self.name);
        std::fs::write(self.config_path(), config_toml).expect("write config");
        let append = |p: PathBuf| -> File {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .expect("open log")
        };
        let child = self
            .command()
            .arg(subcommand)
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(append(self.log_path("stdout")))
            .stderr(append(self.log_path("stderr")))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// Panics with the logs if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.child = None;
            panic!(
                "{} exited early with {status}\n{}",
                self.name,
                self.log_tail()
            );
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM, then waits (up to `within`) for the process to exit by itself; returns its
    /// exit status, or `None` if it was still running (it is then killed).
    pub async fn terminate(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM and wait for the exit (a clean stop, as systemd's); SIGKILL after 20 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the child process this harness started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) if std::time::Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                    Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        }
    }

    /// SIGKILL: no shutdown hooks, no flushing — a crash (or a power cut, for the process).
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        format!(
            "--- {name} stdout ---\n{}\n--- {name} stderr ({}) ---\n{}",
            tail(&self.log_path("stdout"), 40),
            self.log_path("stderr").display(),
            tail(&self.log_path("stderr"), 80),
            name = self.name,
        )
    }
}

impl Drop for ServiceChild {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!("{}", self.log_tail());
        }
        self.kill_9();
    }
}

/// The last `lines` lines of a file (reading at most its last 64 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return "(no log)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// For the binaries in this crate (`comatching-load`, `comatching-demo`): use the relay and
/// appliance binaries that sit next to this executable (same profile), unless the caller
/// already chose others.
pub fn point_at_sibling_binaries() {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("executable has a parent");
    for (env, name) in [
        (crate::relay::RELAY_BIN_ENV, "comatching-relay"),
        (crate::appliance::APPLIANCE_BIN_ENV, "comatching-appliance"),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: called at the start of main, before any other thread exists.
            unsafe { std::env::set_var(env, dir.join(name)) };
        }
    }
}
