//! A RabbitMQ node of a test's own, in a temp dir, on free ports — for tests that stop, crash or
//! restart the broker without touching the shared node the other tests use. Started the way
//! NOTES.md describes (the real server script, its environment pointed at the temp dir).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::relay::free_port;

pub struct PrivateBroker {
    dir: tempfile::TempDir,
    pub node: String,
    pub amqp_port: u16,
    dist_port: u16,
}

/// The real scripts, not the /usr/sbin wrappers: those switch to the rabbitmq user (which
/// cannot read a root-owned temp dir) and drop the environment.
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

impl PrivateBroker {
    /// Starts a fresh node and waits until it answers (a few seconds).
    pub fn start(label: &str) -> PrivateBroker {
        Self::start_with(label, None)
    }

    /// A node whose `rabbitmq.conf` also has `extra` (e.g. the small-box limits of
    /// scripts/broker.sh, for a measurement).
    pub fn start_with_conf(label: &str, extra: &str) -> PrivateBroker {
        let b = Self::start_with(label, None);
        let conf = b.path("rabbitmq.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read rabbitmq.conf");
        text.push_str(extra);
        text.push('\n');
        std::fs::write(&conf, text).expect("write rabbitmq.conf");
        b.ctl_ok(&["stop", b.path("pid").to_str().expect("utf-8 path")]);
        b.start_node();
        b
    }

    /// Sets the memory high watermark at run time: `absolute BYTES`, or a fraction of RAM. A
    /// watermark below what the node uses raises the memory alarm: every publisher blocks.
    pub fn set_memory_watermark(&self, args: &[&str]) {
        let mut all = vec!["set_vm_memory_high_watermark"];
        all.extend_from_slice(args);
        self.ctl_ok(&all);
    }

    /// The Erlang VM's pid, for sampling its memory.
    pub fn beam_pid(&self) -> Option<u32> {
        self.beam_pid_i32().map(|p| p as u32)
    }

    /// Resident memory of the node's Erlang VM (VmRSS) in MiB, and its peak (VmHWM).
    pub fn rss_mb(&self) -> Option<(f64, f64)> {
        let pid = self.beam_pid_i32()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<f64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / 1024.0)
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// A node that speaks AMQP over TLS only, with the server certificate `<pki>/broker.pem`
    /// from the CA in `<pki>/ca.pem`, and refuses clients without a certificate from that CA.
    pub fn start_tls(label: &str, pki: &Path) -> PrivateBroker {
        Self::start_with(label, Some(pki))
    }

    fn start_with(label: &str, tls: Option<&Path>) -> PrivateBroker {
        crate::broker::ensure_shared_node(); // installs the packages when missing
        let dir = tempfile::Builder::new()
            .prefix(&format!("comatching-broker-{label}-"))
            .tempdir()
            .expect("temp dir");
        let suffix: u32 = rand::random::<u32>() % 1_000_000;
        let b = PrivateBroker {
            node: format!("ct{label}{suffix}@localhost").replace('-', ""),
            amqp_port: free_port(),
            dist_port: free_port(),
            dir,
        };
        let conf = match tls {
            None => format!(
                "listeners.tcp.default = 127.0.0.1:{}\nloopback_users.guest = true\n",
                b.amqp_port
            ),
            Some(pki) => format!(
                "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{}\n\
                 loopback_users.guest = true\n\
                 ssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\nssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n",
                b.amqp_port,
                pki.join("ca.pem").display(),
                pki.join("broker.pem").display(),
                pki.join("broker.key").display(),
            ),
        };
        std::fs::write(b.path("rabbitmq.conf"), conf).expect("write rabbitmq.conf");
        std::fs::write(b.path("plugins"), "[].\n").expect("write plugins");
        // An empty env file of its own: the system one (written by broker.sh) names the shared
        // node and sets NODE_IP_ADDRESS, which would add a second listener on port 5672.
        std::fs::write(b.path("rabbitmq-env.conf"), "").expect("write env file");
        b.start_node();
        b
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn env(&self, cmd: &mut Command) {
        let d = self.dir.path();
        cmd.env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("plugins"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env(
                "RABBITMQ_CTL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("HOME", d)
            .env_remove("RABBITMQ_NODE_IP_ADDRESS")
            .env_remove("RABBITMQ_NODE_PORT");
    }

    fn ctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(CTL);
        self.env(&mut cmd);
        cmd.args(["-q", "-n", &self.node]).args(args);
        cmd.output().expect("run rabbitmqctl")
    }

    fn ctl_ok(&self, args: &[&str]) {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on {} failed: {}{}",
            self.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start_node(&self) {
        let mut cmd = Command::new(SERVER);
        self.env(&mut cmd);
        let out = cmd
            .arg("-detached")
            .output()
            .expect("start rabbitmq-server");
        assert!(
            out.status.success(),
            "rabbitmq-server -detached failed: {out:?}"
        );
        let pid = self.path("pid");
        self.ctl_ok(&["wait", "--timeout", "60", pid.to_str().expect("utf-8 path")]);
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// The URL of a node started with [`PrivateBroker::start_tls`].
    pub fn amqps_url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// `rabbitmqctl stop_app`: the node stays, AMQP goes away (connections are closed).
    pub fn stop_app(&self) {
        self.ctl_ok(&["stop_app"]);
    }

    pub fn start_app(&self) {
        self.ctl_ok(&["start_app"]);
        self.ctl_ok(&["await_startup", "--timeout", "60"]);
    }

    /// The Erlang VM's pid (from the node's pid file).
    pub fn beam_pid_i32(&self) -> Option<i32> {
        std::fs::read_to_string(self.path("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILL of the Erlang VM: a broker crash.
    pub fn kill_9(&self) {
        if let Some(pid) = self.beam_pid_i32() {
            // SAFETY: plain kill(2) on a pid this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while Path::new(&format!("/proc/{pid}")).exists()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the node again on the same data (after `kill_9`).
    pub fn restart(&self) {
        self.start_node();
    }

    /// Wipes the node's state (queues, messages, exchanges) and starts it again.
    pub fn reset(&self) {
        self.ctl_ok(&["stop_app"]);
        self.ctl_ok(&["reset"]);
        self.start_app();
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let pid = self.path("pid");
        let _ = self.ctl(&["stop", pid.to_str().unwrap_or("")]);
        self.kill_9();
    }
}
