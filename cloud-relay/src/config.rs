//! The relay's one `Config`: a TOML file (optional) overlaid with `COMATCHING_RELAY__SECTION__KEY`
//! environment variables. Every key has a default that works on a laptop; production differs
//! only by a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use comatching_protocol::CostTable;
use comatching_protocol::config::{ConfigError, parse};
use serde::{Deserialize, Serialize};

pub const ENV_PREFIX: &str = "COMATCHING_RELAY";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub http: Http,
    pub storage: Storage,
    pub broker: Broker,
    pub matching: Matching,
    pub ledger: Ledger,
    pub points: CostTable,
    pub rate_limit: RateLimit,
    pub auth: Auth,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    pub listen: SocketAddr,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// With both set, the listener speaks HTTPS only (PEM chain, leaf first, and its key).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            max_body_bytes: 16 * 1024,
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    /// Holds `relay.db` (and its WAL).
    pub data_dir: PathBuf,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            data_dir: PathBuf::from("./var/relay"),
        }
    }
}

impl Storage {
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("relay.db")
    }
}

/// The `[broker]` section, shared with the other binary.
pub use comatching_protocol::config::BrokerSettings as Broker;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Matching {
    /// How long a match request may wait for an appliance's answer.
    pub deadline_ms: u64,
    /// A user picked this many times leaves the pool.
    pub max_picked: u32,
    /// Candidates asked of the appliance per request.
    pub k: u16,
}

impl Default for Matching {
    fn default() -> Self {
        Matching {
            deadline_ms: 5_000,
            max_picked: 5,
            k: 8,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ledger {
    /// How often the sweeper voids holds whose deadline passed (after a crash, say).
    pub sweep_interval_ms: u64,
    /// Extra time past a request's deadline before the sweeper may void its hold.
    pub hold_grace_ms: u64,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            sweep_interval_ms: 2_000,
            hold_grace_ms: 2_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    pub per_ip_per_minute: u32,
    pub per_user_per_minute: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_ip_per_minute: 600,
            per_user_per_minute: 120,
        }
    }
}

/// Password hashing cost (argon2id). The defaults are OWASP's baseline; load tests that create
/// many thousands of accounts may lower them in their own config, never in production.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    pub hash_memory_kib: u32,
    pub hash_iterations: u32,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            hash_memory_kib: 19 * 1024,
            hash_iterations: 2,
        }
    }
}

impl Config {
    /// Reads `path` (if given) and the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| ConfigError::Parse(format!("{}: {e}", p.display())))?,
            None => String::new(),
        };
        Self::from_parts(&text, std::env::vars())
    }

    pub fn from_parts<I>(file: &str, vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let cfg: Config = parse(file, ENV_PREFIX, vars)?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.matching.deadline_ms == 0 || self.matching.deadline_ms > 120_000 {
            return bad("matching.deadline_ms must be within 1..=120000");
        }
        if self.matching.max_picked == 0 {
            return bad("matching.max_picked must be at least 1");
        }
        if self.matching.k == 0 || self.matching.k > comatching_protocol::wire::MAX_K {
            return bad("matching.k must be within 1..=64");
        }
        if self.ledger.sweep_interval_ms == 0 {
            return bad("ledger.sweep_interval_ms must be positive");
        }
        if self.auth.hash_memory_kib < 8 || self.auth.hash_iterations == 0 {
            return bad(
                "auth.hash_memory_kib must be at least 8 and auth.hash_iterations at least 1",
            );
        }
        if self.http.max_body_bytes < 1024 {
            return bad("http.max_body_bytes must be at least 1024");
        }
        self.broker.check()?;
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return bad("http.tls_cert and http.tls_key go together: set both or neither");
        }
        Ok(())
    }

    /// The effective configuration as TOML with secrets masked, for the start-up log.
    pub fn masked(&self) -> String {
        let mut shown = self.clone();
        shown.broker.url = shown.broker.url.masked();
        toml::to_string(&shown).unwrap_or_else(|e| format!("<unprintable: {e}>"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_on_a_laptop() {
        let c = Config::from_parts("", Vec::new()).unwrap();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.matching.deadline_ms, 5000);
        assert_eq!(c.matching.max_picked, 5);
        assert_eq!(c.points.base, 1000);
    }

    #[test]
    fn env_overrides_and_masking() {
        let c = Config::from_parts(
            "[matching]\nmax_picked = 3\n",
            vec![(
                "COMATCHING_RELAY__HTTP__LISTEN".to_owned(),
                "127.0.0.1:9999".to_owned(),
            )],
        )
        .unwrap();
        assert_eq!(c.http.listen.port(), 9999);
        assert_eq!(c.matching.max_picked, 3);
        assert!(c.masked().contains("guest:***@"));
        assert!(!c.masked().contains("guest:guest"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(Config::from_parts("[http]\nlisen = \"x\"\n", Vec::new()).is_err());
        assert!(Config::from_parts("[matching]\nk = 0\n", Vec::new()).is_err());
    }
}
