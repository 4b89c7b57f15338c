//! The shared RabbitMQ node and per-test vhosts.
//!
//! All tests use the one node that `scripts/broker.sh` starts (loopback, port 5672, user
//! `guest`). Isolation comes from vhosts: every test creates its own with `rabbitmqctl` and
//! deletes it on drop, so queues, exchanges and messages never leak between tests. A test that
//! must kill or restart a broker starts its own node instead (see NOTES.md); none does yet.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The shared node's AMQP listener.
pub const AMQP_ADDR: &str = "127.0.0.1:5672";

/// Makes sure the shared node answers, starting it with `scripts/broker.sh` the first time it
/// does not (so `cargo test` alone works too). Runs at most once per test binary.
pub fn ensure_shared_node() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let addr: SocketAddr = AMQP_ADDR.parse().expect("literal address");
        if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
            return;
        }
        let script = workspace_root().join("scripts/broker.sh");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// The repository root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Runs `rabbitmqctl ARGS` against the shared node and panics with its output on failure.
fn rabbitmqctl(args: &[&str]) -> std::process::Output {
    Command::new("rabbitmqctl")
        .args(["-q", "-n", "rabbit@localhost"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl {args:?}: {e}"))
}

fn rabbitmqctl_ok(args: &[&str]) {
    let out = rabbitmqctl(args);
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A vhost of its own on the shared node, for one test. Its name is unique (test label plus
/// random suffix). Created either at once ([`Vhost::create`]) or later ([`Vhost::reserve`] then
/// [`Vhost::materialise`]), for tests that start a relay against a vhost that does not exist
/// yet. Deleted, with everything in it, on drop.
pub struct Vhost {
    name: String,
    created: bool,
}

impl Vhost {
    /// Creates a fresh vhost and grants `guest` full rights on it.
    pub fn create(label: &str) -> Vhost {
        let mut v = Vhost::reserve(label);
        v.materialise();
        v
    }

    /// Picks a unique name without creating the vhost.
    pub fn reserve(label: &str) -> Vhost {
        ensure_shared_node();
        let clean: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let name = format!("ct-{clean}-{:016x}", rand::random::<u64>());
        Vhost {
            name,
            created: false,
        }
    }

    /// Creates the reserved vhost (idempotent).
    pub fn materialise(&mut self) {
        if self.created {
            return;
        }
        rabbitmqctl_ok(&["add_vhost", &self.name]);
        self.created = true;
        rabbitmqctl_ok(&[
            "set_permissions",
            "-p",
            &self.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ]);
    }

    /// Forcibly closes every client connection in this vhost (relay, responders, taps alike),
    /// as a broker-side network failure would.
    pub fn close_all_connections(&self) {
        rabbitmqctl_ok(&[
            "close_all_connections",
            "-p",
            &self.name,
            "--limit",
            "1000",
            "test: simulated connection loss",
        ]);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `amqp://guest:guest@127.0.0.1:5672/<vhost, percent-encoded>`.
    pub fn amqp_url(&self) -> String {
        format!(
            "amqp://guest:guest@{AMQP_ADDR}/{}",
            percent_encode(&self.name)
        )
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        if self.created {
            // Best effort: a failure to clean up must not mask the test's own result.
            let out = rabbitmqctl(&["delete_vhost", &self.name]);
            if !out.status.success() {
                eprintln!(
                    "warning: could not delete vhost {}: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for a vhost in a URL path).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An AMQP URL on which nothing listens: a port that was free a moment ago.
pub fn unreachable_amqp_url() -> String {
    format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        crate::relay::free_port()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_encoding_of_vhosts() {
        assert_eq!(super::percent_encode("/"), "%2F");
        assert_eq!(super::percent_encode("ct-a_b.c~1"), "ct-a_b.c~1");
        assert_eq!(super::percent_encode("a b"), "a%20b");
    }
}

/// The security keys of a `[broker]` section, shared by the relay's and the appliance's test
/// configs (flattened into each): TLS files for `amqps://` and the link key file.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BrokerSecurity {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<std::path::PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<std::path::PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<std::path::PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_key_file: Option<std::path::PathBuf>,
    /// `broker.quorum_group_size` (a cluster's replica count for quorum queues).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quorum_group_size: Option<u16>,
}

impl BrokerSecurity {
    /// TLS with the CA and the client certificate `<name>.pem`/`<name>.key` of a `pki` dir.
    pub fn tls(&mut self, pki: &std::path::Path, name: &str) {
        self.tls_ca = Some(pki.join("ca.pem"));
        self.tls_cert = Some(pki.join(format!("{name}.pem")));
        self.tls_key = Some(pki.join(format!("{name}.key")));
    }
}

/// The number of ready messages in `queue` (a passive declare). Panics when the queue does not
/// exist: the callers look at queues the system under test must have declared.
pub async fn queue_depth(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("queue {queue}: {e}"))
    .message_count()
}
