//! The appliance's one `Config`: a TOML file (optional) overlaid with
//! `COMATCHING_APPLIANCE__SECTION__KEY` environment variables; defaults work on a laptop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use comatching_protocol::ApplianceId;
use comatching_protocol::config::{ConfigError, parse};
use serde::{Deserialize, Serialize};

use crate::engine::EngineKind;
use crate::store::StoreBackend;
use crate::tailscale::TailscaleSettings;

pub const ENV_PREFIX: &str = "COMATCHING_APPLIANCE";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub appliance: Appliance,
    pub http: Http,
    pub storage: Storage,
    pub broker: Broker,
    pub sync: Sync,
    pub matching: Matching,
    pub tailscale: TailscaleSettings,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Appliance {
    /// Names this appliance's own sync queue, `comatching.sync.<id>`.
    pub id: ApplianceId,
}

impl Default for Appliance {
    fn default() -> Self {
        Appliance {
            id: "appliance-1".parse().expect("literal id"),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    /// The status page, health and metrics (keep it on loopback or the tailnet).
    pub listen: SocketAddr,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: "127.0.0.1:8081".parse().expect("literal address"),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    pub data_dir: PathBuf,
    pub backend: StoreBackend,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            data_dir: PathBuf::from("./var/appliance"),
            backend: StoreBackend::Sqlite,
        }
    }
}

/// The `[broker]` section, shared with the other binary.
pub use comatching_protocol::config::BrokerSettings as Broker;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sync {
    /// Most events applied in one durable commit.
    pub batch_max: usize,
    /// How long a batch waits for more events before committing.
    pub batch_wait_ms: u64,
    /// A hello is sent at least this often, so the relay's view stays fresh and a lost tail
    /// event is noticed.
    pub hello_interval_ms: u64,
    /// Deliveries of one sync message before the broker dead-letters it.
    pub delivery_limit: i64,
    /// While a sync event cannot be committed, the pause between replays doubles from one
    /// second up to this (see `node::retry`).
    pub retry_max_ms: u64,
    /// The broker deletes this appliance's sync queue after it has had no consumer for this
    /// long (hours; `x-expires`), so a box that never returns stops collecting every change.
    /// One that does return later redeclares it and catches up by replay or snapshot. Keep it
    /// equal to the relay's `sync.queue_expires_h`.
    pub queue_expires_h: f64,
}

impl Default for Sync {
    fn default() -> Self {
        Sync {
            batch_max: 1000,
            batch_wait_ms: 5,
            hello_interval_ms: 10_000,
            delivery_limit: 5,
            retry_max_ms: 30_000,
            queue_expires_h: comatching_protocol::topology::SYNC_QUEUE_EXPIRES_H as f64,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Matching {
    pub engine: EngineKind,
    /// Match requests taken from the broker at once.
    pub prefetch: u16,
    /// Match requests computed at once (off the async reactor).
    pub workers: usize,
}

impl Default for Matching {
    fn default() -> Self {
        Matching {
            engine: EngineKind::Buckets,
            prefetch: 32,
            workers: 2,
        }
    }
}

impl Config {
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
        if cfg.sync.batch_max == 0 || cfg.matching.workers == 0 || cfg.matching.prefetch == 0 {
            return Err(ConfigError::Invalid(
                "sync.batch_max, matching.workers and matching.prefetch must be positive".into(),
            ));
        }
        cfg.broker.check()?;
        if cfg.sync.delivery_limit < 1 || cfg.sync.retry_max_ms == 0 {
            return Err(ConfigError::Invalid(
                "sync.delivery_limit and sync.retry_max_ms must be positive".into(),
            ));
        }
        comatching_protocol::config::hours_to_ms("sync.queue_expires_h", cfg.sync.queue_expires_h)?;
        Ok(cfg)
    }

    /// `sync.queue_expires_h` in milliseconds (checked at load).
    pub fn sync_queue_expires_ms(&self) -> i64 {
        comatching_protocol::config::hours_to_ms("sync.queue_expires_h", self.sync.queue_expires_h)
            .unwrap_or(comatching_protocol::topology::SYNC_QUEUE_EXPIRES_H * 3_600_000)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.storage.data_dir.join("replica")
    }

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
    fn defaults_and_overrides() {
        let c = Config::from_parts(
            "[storage]\nbackend = \"sled\"\n",
            vec![
                ("COMATCHING_APPLIANCE__APPLIANCE__ID".into(), "box-7".into()),
                (
                    "COMATCHING_APPLIANCE__HTTP__LISTEN".into(),
                    "127.0.0.1:9".into(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.appliance.id.as_str(), "box-7");
        assert_eq!(c.storage.backend, StoreBackend::Sled);
        assert_eq!(c.http.listen.port(), 9);
        assert!(c.masked().contains("guest:***@"));
        assert!(Config::from_parts("[appliance]\nid = \"Bad Id\"\n", Vec::new()).is_err());
        assert_eq!(c.matching.engine, EngineKind::Buckets);
        assert!(c.matching.engine.deprecation().is_none());
        // The old name still works, selects the same engine, and says it is deprecated.
        let old = Config::from_parts("[matching]\nengine = \"hnsw\"\n", Vec::new()).unwrap();
        assert_eq!(old.matching.engine.resolved(), EngineKind::Buckets);
        assert!(old.matching.engine.deprecation().is_some());
        assert!(Config::from_parts("[matching]\nengine = \"graph\"\n", Vec::new()).is_err());
        assert_eq!(c.sync_queue_expires_ms(), 72 * 3_600_000);
        assert!(Config::from_parts("[sync]\nqueue_expires_h = 0\n", Vec::new()).is_err());
        for bad in ["delivery_limit = 0", "retry_max_ms = 0"] {
            let e = Config::from_parts(&format!("[sync]\n{bad}\n"), Vec::new()).unwrap_err();
            assert!(e.to_string().contains("must be positive"), "{bad}: {e}");
        }
    }
}
