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
        let b = Self::prepare(label, tls, None);
        b.start_node();
        b
    }

    /// Writes the node's files (config, plugins, env, and the Erlang cookie when given) without
    /// starting it.
    fn prepare(label: &str, tls: Option<&Path>, cookie: Option<&str>) -> PrivateBroker {
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
        if let Some(cookie) = cookie {
            // The Erlang cookie lives in HOME (the node's dir); nodes of one cluster and the
            // CLI talking to them must share it. Erlang refuses a cookie file others can read.
            use std::os::unix::fs::PermissionsExt;
            let f = b.path(".erlang.cookie");
            std::fs::write(&f, cookie).expect("write cookie");
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o400))
                .expect("cookie mode");
        }
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

    /// Starts the node again on the same data (after `kill_9` or `stop`).
    pub fn restart(&self) {
        self.start_node();
    }

    /// Stops the whole node cleanly (the Erlang VM exits; its peers see it go) and waits until
    /// it has.
    pub fn stop(&self) {
        let pid = self.path("pid");
        self.ctl_ok(&["stop", pid.to_str().expect("utf-8 path")]);
    }

    /// `rabbitmqctl ARGS` on this node; its standard output when it succeeds.
    pub fn ctl_output(&self, args: &[&str]) -> Result<String, String> {
        let out = self.ctl(args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Wipes the node's state (queues, messages, exchanges) and starts it again.
    pub fn reset(&self) {
        self.ctl_ok(&["stop_app"]);
        self.ctl_ok(&["reset"]);
        self.start_app();
    }
}

impl PrivateBroker {
    fn running(&self) -> bool {
        self.beam_pid()
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        // A node already stopped (a cluster row's victim) is not asked again: the CLI would
        // wait for a node that never answers.
        if self.running() {
            let pid = self.path("pid");
            let _ = self.ctl(&["stop", pid.to_str().unwrap_or("")]);
        }
        self.kill_9();
    }
}

/// A RabbitMQ cluster of a test's own on one machine: `n` private nodes with distinct node
/// names, AMQP and distribution ports and data dirs, one Erlang cookie, clustered with
/// `rabbitmqctl join_cluster` onto the first. For the rows that lose broker nodes (F21).
pub struct PrivateCluster {
    pub nodes: Vec<PrivateBroker>,
}

impl PrivateCluster {
    /// Starts `n` nodes and joins nodes 2..n to node 1 (tens of seconds).
    pub fn start(label: &str, n: usize) -> PrivateCluster {
        let cookie: String = (0..32)
            .map(|_| char::from(b'A' + rand::random::<u8>() % 26))
            .collect();
        let nodes: Vec<PrivateBroker> = (0..n)
            .map(|i| PrivateBroker::prepare(&format!("{label}n{i}"), None, Some(&cookie)))
            .collect();
        for b in &nodes {
            b.start_node();
        }
        for b in &nodes[1..] {
            b.ctl_ok(&["stop_app"]);
            b.ctl_ok(&["join_cluster", &nodes[0].node]);
            b.start_app();
        }
        let c = PrivateCluster { nodes };
        c.wait_running(n, Duration::from_secs(60));
        c
    }

    /// Every node's AMQP URL, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|b| b.amqp_url()).collect()
    }

    /// The index of the node whose AMQP port is `port`.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|b| b.amqp_port == port)
    }

    /// The running nodes as one live node sees them (`rabbitmqctl cluster_status`), or none
    /// when no node answers.
    pub fn running_nodes(&self) -> Vec<String> {
        for b in &self.nodes {
            if let Ok(out) = b.ctl_output(&["cluster_status", "--formatter", "json"])
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&out)
            {
                return v["running_nodes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|n| n.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
            }
        }
        Vec::new()
    }

    /// Waits until `n` nodes run in the cluster (polling, with a deadline).
    pub fn wait_running(&self, n: usize, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let running = self.running_nodes();
            if running.len() == n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cluster: {n} nodes not running within {timeout:?}: {running:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The quorum queues of the default vhost, as `(name, members, online)` counts, read on a
    /// live node.
    pub fn quorum_queues(&self) -> Vec<(String, usize, usize)> {
        for b in &self.nodes {
            let Ok(out) = b.ctl_output(&[
                "list_queues",
                "name",
                "type",
                "members",
                "online",
                "--formatter",
                "json",
            ]) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&out) else {
                continue;
            };
            let count = |x: &serde_json::Value| x.as_array().map_or(0, Vec::len);
            return v
                .as_array()
                .map(|qs| {
                    qs.iter()
                        .filter(|q| q["type"] == "quorum")
                        .map(|q| {
                            (
                                q["name"].as_str().unwrap_or("").to_owned(),
                                count(&q["members"]),
                                count(&q["online"]),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
        }
        Vec::new()
    }

    /// Waits until every quorum queue has all `members` members online.
    pub fn wait_queues_recovered(&self, members: usize, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let qs = self.quorum_queues();
            if !qs.is_empty() && qs.iter().all(|(_, m, o)| *m == members && *o == members) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "quorum queues not back to {members} online members within {timeout:?}: {qs:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
