//! The relay's one `Config`: a TOML file (optional) overlaid with `COMATCHING_RELAY__SECTION__KEY`
//! environment variables. Every key has a default that works on a laptop; production differs
//! only by a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use comatching_protocol::CostTable;
use comatching_protocol::amqp::DeadLetterLimits;
use comatching_protocol::config::{ConfigError, hours_to_ms, parse};
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
    pub charges: Charges,
    pub events: Events,
    pub sync: Sync,
    pub dead_letters: DeadLetters,
}

/// The appliances' sync queues, as the relay sees them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sync {
    /// The appliances' `sync.queue_expires_h` (keep them equal): an appliance not heard from
    /// for this long has lost its queue to the broker's expiry, so it no longer holds the
    /// outbox back; it catches up by snapshot if it ever returns.
    pub queue_expires_h: f64,
}

impl Default for Sync {
    fn default() -> Self {
        Sync {
            queue_expires_h: comatching_protocol::topology::SYNC_QUEUE_EXPIRES_H as f64,
        }
    }
}

/// The dead-letter queues `comatching.dead` (for inspection) and `comatching.dead.tally` (the
/// relay counts it into `comatching_dead_letters_total`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetters {
    /// Most dead letters kept in each queue; beyond it the oldest is dropped.
    pub max_length: i64,
    /// Longest a dead letter is kept, in hours.
    pub message_ttl_h: f64,
}

impl Default for DeadLetters {
    fn default() -> Self {
        DeadLetters {
            max_length: comatching_protocol::topology::DEAD_LETTERS_MAX_LENGTH,
            message_ttl_h: comatching_protocol::topology::DEAD_LETTERS_TTL_H as f64,
        }
    }
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
    /// Origins (`scheme://host[:port]`, exactly as a browser sends them) whose pages may call
    /// the API cross-origin (CORS). Empty: none may.
    pub cors_allowed_origins: Vec<String>,
    /// Connections served at once; further ones wait in the kernel's listen backlog until one
    /// closes (src/listener.rs). The NixOS unit sizes LimitNOFILE= from it.
    pub max_connections: u32,
    /// A request's header (HTTP/1) — or a new connection's first request, any protocol — must
    /// arrive within this, else the connection is closed.
    pub header_read_timeout_ms: u64,
    /// A request body must arrive completely within this, else 408 `request_timeout`.
    pub body_timeout_ms: u64,
    /// A connection with no request in progress for this long is closed (HTTP/2; HTTP/1
    /// keep-alive connections already end after `header_read_timeout_ms` of silence).
    pub idle_timeout_ms: u64,
    /// A TLS handshake not finished within this is dropped.
    pub tls_handshake_timeout_ms: u64,
    /// HTTP/2: concurrent streams per connection, and the largest header list accepted.
    pub h2_max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    /// Reverse proxies (CIDR or single address) whose `X-Forwarded-For`/`Forwarded` headers name
    /// the client. Empty: the socket peer is the client, whatever the headers say.
    pub trusted_proxies: Vec<String>,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            max_body_bytes: 16 * 1024,
            tls_cert: None,
            tls_key: None,
            cors_allowed_origins: Vec::new(),
            max_connections: 2048,
            header_read_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            tls_handshake_timeout_ms: 10_000,
            h2_max_concurrent_streams: 100,
            max_header_list_bytes: 16 * 1024,
            trusted_proxies: Vec::new(),
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

/// Rate limits (src/limits.rs): GCRA, so a client may spend a full minute's quota at once and
/// then one request per (60 s / quota). Exceeded → 429 `rate_limited` with `Retry-After`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    /// Ceiling per client address (IPv6: per /64) over every /api/ route. High on purpose:
    /// thousands of students share a campus NAT address; it only stops floods.
    pub per_ip_per_minute: u32,
    /// Per authenticated user, every route that needs a session.
    pub per_user_per_minute: u32,
    /// Per client address on the credential routes (`POST /api/v1/accounts`, `POST
    /// /api/v1/sessions`, `PUT /api/v1/me/password`), where each request costs an argon2 hash.
    pub credentials_per_ip_per_minute: u32,
    /// Login attempts per username, from any address (password guessing).
    pub login_per_username_per_minute: u32,
    /// Login attempts per username allowed back to back.
    pub login_burst: u32,
    /// Keys each limiter remembers at most; idle keys are dropped every few seconds, and a
    /// limiter that is still over this starts afresh (logged).
    pub max_tracked_keys: usize,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_ip_per_minute: 6_000,
            per_user_per_minute: 120,
            credentials_per_ip_per_minute: 120,
            login_per_username_per_minute: 5,
            login_burst: 5,
            max_tracked_keys: 100_000,
        }
    }
}

/// Password hashing cost (argon2id) and session lifetime. The hashing defaults are OWASP's
/// baseline; load tests that create many thousands of accounts may lower them in their own
/// config, never in production.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    pub hash_memory_kib: u32,
    pub hash_iterations: u32,
    /// How long a session token is accepted after the sign-up or login that made it, in hours
    /// (fractions allowed, one second to a year). Not renewed by use; log out ends it sooner.
    pub session_ttl_h: f64,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            hash_memory_kib: 19 * 1024,
            hash_iterations: 2,
            session_ttl_h: crate::auth::SESSION_TTL_H,
        }
    }
}

/// The booth's charge requests: which amounts a student may ask for.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Charges {
    pub min_amount: u64,
    pub max_amount: u64,
    /// Every amount is a multiple of this.
    pub step: u64,
}

impl Default for Charges {
    fn default() -> Self {
        Charges {
            min_amount: 1_000,
            max_amount: 100_000,
            step: 500,
        }
    }
}

/// Live event streams (SSE) and the event log they replay from.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Events {
    /// A comment line is sent on an idle stream this often (proxies close silent connections).
    pub keep_alive_s: u64,
    /// Streams open at once; one more is refused with 503 `too_many_streams`.
    pub max_streams: usize,
    /// Events older than this are pruned; a `Last-Event-ID` older than the log gets `resync`.
    pub retention_hours: u64,
    /// At most this many events are kept, whatever their age.
    pub retention_rows: u64,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            keep_alive_s: 15,
            max_streams: 2_000,
            retention_hours: 24,
            retention_rows: 20_000,
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
        let ch = &self.charges;
        if ch.step == 0
            || ch.min_amount == 0
            || ch.min_amount > ch.max_amount
            || ch.max_amount > 1_000_000
            || !ch.min_amount.is_multiple_of(ch.step)
            || !ch.max_amount.is_multiple_of(ch.step)
        {
            return bad(
                "charges: need 0 < min_amount <= max_amount <= 1000000, both multiples of step > 0",
            );
        }
        let ev = &self.events;
        if ev.keep_alive_s == 0 || ev.keep_alive_s > 300 {
            return bad("events.keep_alive_s must be within 1..=300");
        }
        if ev.max_streams == 0 || ev.retention_hours == 0 || ev.retention_rows < 100 {
            return bad(
                "events.max_streams and events.retention_hours must be positive, events.retention_rows at least 100",
            );
        }
        self.broker.check()?;
        self.check_edge()?;
        hours_to_ms("sync.queue_expires_h", self.sync.queue_expires_h)?;
        hours_to_ms("auth.session_ttl_h", self.auth.session_ttl_h)?;
        hours_to_ms(
            "dead_letters.message_ttl_h",
            self.dead_letters.message_ttl_h,
        )?;
        if !(1..=10_000_000).contains(&self.dead_letters.max_length) {
            return bad("dead_letters.max_length must be within 1..=10000000");
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return bad("http.tls_cert and http.tls_key go together: set both or neither");
        }
        for o in &self.http.cors_allowed_origins {
            check_origin(o).map_err(|why| {
                ConfigError::Invalid(format!("http.cors_allowed_origins: {o:?} {why}"))
            })?;
        }
        Ok(())
    }

    fn check_edge(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let h = &self.http;
        if h.max_connections == 0 || h.max_connections > 1_000_000 {
            return bad("http.max_connections must be within 1..=1000000".into());
        }
        for (key, ms) in [
            ("header_read_timeout_ms", h.header_read_timeout_ms),
            ("body_timeout_ms", h.body_timeout_ms),
            ("idle_timeout_ms", h.idle_timeout_ms),
            ("tls_handshake_timeout_ms", h.tls_handshake_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&ms) {
                return bad(format!("http.{key} must be within 100..=3600000"));
            }
        }
        if h.h2_max_concurrent_streams == 0 {
            return bad("http.h2_max_concurrent_streams must be at least 1".into());
        }
        if h.max_header_list_bytes < 1024 {
            return bad("http.max_header_list_bytes must be at least 1024".into());
        }
        if let Err(e) = crate::limits::parse_proxies(&h.trusted_proxies) {
            return bad(format!("http.trusted_proxies: {e}"));
        }
        let r = &self.rate_limit;
        for (key, n) in [
            ("per_ip_per_minute", r.per_ip_per_minute),
            ("per_user_per_minute", r.per_user_per_minute),
            (
                "credentials_per_ip_per_minute",
                r.credentials_per_ip_per_minute,
            ),
            (
                "login_per_username_per_minute",
                r.login_per_username_per_minute,
            ),
            ("login_burst", r.login_burst),
        ] {
            if n == 0 {
                return bad(format!("rate_limit.{key} must be at least 1"));
            }
        }
        if r.max_tracked_keys < 100 {
            return bad("rate_limit.max_tracked_keys must be at least 100".into());
        }
        Ok(())
    }

    /// `sync.queue_expires_h` in milliseconds (checked at load).
    pub fn sync_queue_expires_ms(&self) -> i64 {
        hours_to_ms("sync.queue_expires_h", self.sync.queue_expires_h)
            .unwrap_or(comatching_protocol::topology::SYNC_QUEUE_EXPIRES_H * 3_600_000)
    }

    /// `auth.session_ttl_h` in milliseconds (checked at load).
    pub fn session_ttl_ms(&self) -> i64 {
        hours_to_ms("auth.session_ttl_h", self.auth.session_ttl_h)
            .unwrap_or((crate::auth::SESSION_TTL_H * 3_600_000.0) as i64)
    }

    /// The `[dead_letters]` limits as queue arguments take them (checked at load).
    pub fn dead_letter_limits(&self) -> DeadLetterLimits {
        let default = DeadLetterLimits::default();
        DeadLetterLimits {
            max_length: self.dead_letters.max_length,
            message_ttl_ms: hours_to_ms(
                "dead_letters.message_ttl_h",
                self.dead_letters.message_ttl_h,
            )
            .unwrap_or(default.message_ttl_ms),
        }
    }

    /// The effective configuration as TOML with secrets masked, for the start-up log.
    pub fn masked(&self) -> String {
        let mut shown = self.clone();
        shown.broker.url = shown.broker.url.masked();
        toml::to_string(&shown).unwrap_or_else(|e| format!("<unprintable: {e}>"))
    }
}

/// An origin as browsers send it in `Origin`: `http` or `https`, `://`, a lowercase host, an
/// optional port; nothing else (no path, not even `/`, no wildcard, no user). CORS compares
/// origins byte for byte, so anything else would silently never match.
fn check_origin(o: &str) -> Result<(), &'static str> {
    let rest = o
        .strip_prefix("https://")
        .or_else(|| o.strip_prefix("http://"))
        .ok_or("must start with https:// or http://")?;
    let (host, port) = match rest.strip_prefix('[') {
        // An IPv6 literal: [addr] then an optional :port.
        Some(v6) => {
            let (addr, after) = v6.split_once(']').ok_or("has an unclosed [")?;
            if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
                return Err("has an invalid IPv6 address");
            }
            match after {
                "" => (&rest[..addr.len() + 2], None),
                _ => (
                    &rest[..addr.len() + 2],
                    Some(after.strip_prefix(':').ok_or("must have no path")?),
                ),
            }
        }
        None => match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        },
    };
    let host_ok = host.starts_with('[')
        || (!host.is_empty()
            && host
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.')));
    if !host_ok {
        return Err(
            "must be scheme://host[:port] with a lowercase host and no path, wildcard or user",
        );
    }
    let port_ok = |p: &str| {
        (1..=5).contains(&p.len())
            && p.bytes().all(|b| b.is_ascii_digit())
            && (1..=65535).contains(&p.parse::<u32>().unwrap_or(0))
    };
    if port.is_some_and(|p| !port_ok(p)) {
        return Err("has an invalid port");
    }
    Ok(())
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
    fn cors_origins_are_exact_origins() {
        let with = |o: &str| {
            Config::from_parts(
                &format!("[http]\ncors_allowed_origins = [{o:?}]\n"),
                Vec::new(),
            )
        };
        for good in [
            "https://comatching.web.app",
            "http://localhost:5173",
            "https://127.0.0.1:8443",
            "http://[::1]:3000",
        ] {
            assert!(with(good).is_ok(), "{good}");
        }
        for bad in [
            "*",
            "https://*.web.app",
            "comatching.web.app",
            "https://comatching.web.app/",
            "https://comatching.web.app/app",
            "https://Comatching.web.app",
            "https://user@comatching.web.app",
            "https://comatching.web.app:99999",
            "https://comatching.web.app:",
            "ftp://comatching.web.app",
            "https://",
            "https://a.b?x=1",
        ] {
            let e = with(bad).expect_err(bad).to_string();
            assert!(e.contains("cors_allowed_origins"), "{bad}: {e}");
        }
        assert!(
            Config::from_parts("", Vec::new())
                .unwrap()
                .http
                .cors_allowed_origins
                .is_empty()
        );
        let env = Config::from_parts(
            "",
            vec![(
                "COMATCHING_RELAY__HTTP__CORS_ALLOWED_ORIGINS".to_owned(),
                r#"["https://comatching.web.app", "http://localhost:5173"]"#.to_owned(),
            )],
        )
        .unwrap();
        assert_eq!(
            env.http.cors_allowed_origins,
            ["https://comatching.web.app", "http://localhost:5173"]
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(Config::from_parts("[http]\nlisen = \"x\"\n", Vec::new()).is_err());
        assert!(Config::from_parts("[matching]\nk = 0\n", Vec::new()).is_err());
        for bad in [
            "[http]\nmax_connections = 0\n",
            "[http]\nheader_read_timeout_ms = 0\n",
            "[http]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
            "[http]\ntrusted_proxies = [\"proxy.example\"]\n",
            "[rate_limit]\nlogin_burst = 0\n",
            "[rate_limit]\nmax_tracked_keys = 5\n",
        ] {
            let e = Config::from_parts(bad, Vec::new()).unwrap_err().to_string();
            let key = bad.lines().nth(1).unwrap().split(' ').next().unwrap();
            assert!(e.contains(key), "{bad:?} → {e}");
        }
        let ok = "[http]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n";
        assert_eq!(
            Config::from_parts(ok, Vec::new())
                .unwrap()
                .http
                .trusted_proxies
                .len(),
            3
        );
        assert!(Config::from_parts("[sync]\nqueue_expires_h = 0\n", Vec::new()).is_err());
        assert!(Config::from_parts("[dead_letters]\nmax_length = 0\n", Vec::new()).is_err());
        for bad in ["0", "-1", "0.0001", "8761", "nan", "inf"] {
            let e = Config::from_parts(&format!("[auth]\nsession_ttl_h = {bad}\n"), Vec::new())
                .expect_err(bad)
                .to_string();
            assert!(e.contains("auth.session_ttl_h"), "{bad}: {e}");
        }
        let short = Config::from_parts("[auth]\nsession_ttl_h = 0.001\n", Vec::new()).unwrap();
        assert_eq!(short.session_ttl_ms(), 3_600);
        assert!(Config::from_parts("[dead_letters]\nmessage_ttl_h = -1\n", Vec::new()).is_err());
        let d = Config::from_parts("", Vec::new()).unwrap();
        assert_eq!(d.sync_queue_expires_ms(), 72 * 3_600_000);
        assert_eq!(d.session_ttl_ms(), 14 * 24 * 3_600_000);
        assert_eq!(d.dead_letter_limits(), DeadLetterLimits::default());
        assert_eq!(d.dead_letter_limits().max_length, 10_000);
        assert_eq!(d.dead_letter_limits().message_ttl_ms, 24 * 3_600_000);
    }
}
