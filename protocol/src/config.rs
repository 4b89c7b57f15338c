//! Layered configuration shared by both binaries: a TOML document overlaid with environment
//! variables named `PREFIX__SECTION__KEY`. Pure: the caller passes the file text and the
//! variables, so the rule is testable without touching the process environment.

use toml::{Table, Value};

/// Why a configuration could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file is not valid TOML: {0}")]
    Parse(String),
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Parses `file` (may be empty) and applies every `PREFIX__SECTION__KEY=value` from `vars`.
/// A value is read as a TOML value when it parses as one (`8080`, `true`, `"x"`), otherwise as
/// a plain string, so `COMATCHING_RELAY__BROKER__URL=amqp://…` needs no quoting.
pub fn overlay<I>(file: &str, prefix: &str, vars: I) -> Result<Table, ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut table: Table = file
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
    let lead = format!("{prefix}__");
    let mut vars: Vec<_> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with(&lead))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var[lead.len()..]
            .split("__")
            .map(|p| p.to_ascii_lowercase())
            .collect();
        if path.len() != 2 || path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Env {
                var,
                message: format!("expected {prefix}__SECTION__KEY"),
            });
        }
        let value = parse_scalar(&raw);
        let section = table
            .entry(path[0].clone())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(section) = section else {
            return Err(ConfigError::Env {
                var,
                message: format!("[{}] is not a section", path[0]),
            });
        };
        section.insert(path[1].clone(), value);
    }
    Ok(table)
}

/// The broker's URLs: one node, or every node of a cluster, tried in order by the connection
/// supervisor ([`crate::failover::NodeRotation`]). Read from one string (`"amqp://…"`), a
/// comma-separated string (`"amqp://a…,amqp://b…"`, how an environment variable gives a list;
/// a comma inside a URL is written `%2C`) or a TOML array of strings. Always written back as
/// an array.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct BrokerUrls(Vec<String>);

impl BrokerUrls {
    /// At most this many nodes (a RabbitMQ cluster has 3, 5 or 7).
    pub const MAX: usize = 16;

    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> BrokerUrls {
        BrokerUrls(urls.into_iter().map(Into::into).collect())
    }

    /// Splits a string on commas, trimming blanks around each URL; empty pieces are kept so
    /// that `check` can name them.
    pub fn parse(text: &str) -> BrokerUrls {
        BrokerUrls(text.split(',').map(|u| u.trim().to_owned()).collect())
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The same list with every password replaced by `***`, for logs.
    pub fn masked(&self) -> BrokerUrls {
        BrokerUrls(self.0.iter().map(|u| mask_url_password(u)).collect())
    }
}

impl<'de> serde::Deserialize<'de> for BrokerUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BrokerUrls, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(d) {
            Ok(OneOrMany::One(s)) => Ok(BrokerUrls::parse(&s)),
            Ok(OneOrMany::Many(v)) => Ok(BrokerUrls(v)),
            Err(_) => Err(serde::de::Error::custom(
                "broker.url must be a URL string, a comma-separated list of URLs or an array of URL strings",
            )),
        }
    }
}

/// A broker node as shown in `/readyz`, `/status` and logs: `host:port`, never credentials,
/// virtual host or query. `None` when `url` is not an AMQP URL with a host.
pub fn broker_node(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    let default_port = match u.scheme() {
        "amqp" => 5672,
        "amqps" => 5671,
        _ => return None,
    };
    let host = match u.host()? {
        url::Host::Domain(d) if !d.is_empty() => d.to_owned(),
        url::Host::Domain(_) => return None,
        url::Host::Ipv4(a) => a.to_string(),
        url::Host::Ipv6(a) => format!("[{a}]"),
    };
    Some(format!("{host}:{}", u.port().unwrap_or(default_port)))
}

/// The `[broker]` section both binaries share.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSettings {
    /// One URL, or every node of a cluster ([`BrokerUrls`]).
    pub url: BrokerUrls,
    /// AMQP heartbeat; a half-open link is noticed within about twice this.
    pub heartbeat_s: u16,
    /// Longest wait between reconnect attempts.
    pub max_backoff_ms: u64,
    /// With an `amqps://` URL: the CA (PEM) the broker's certificate must chain to. Only this
    /// CA is trusted, not the system's roots.
    pub tls_ca: Option<std::path::PathBuf>,
    /// The client certificate (PEM) and its key presented to the broker; set both or neither.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// The link key file (64 hex digits, `comatching-relay pki link-key`): with it, every
    /// message published carries an HMAC and every message received must (see `mac`).
    pub link_key_file: Option<std::path::PathBuf>,
    /// `x-quorum-initial-group-size` of the quorum queues a service declares (the control queue,
    /// an appliance's sync queue): on how many cluster nodes each gets a replica. Unset: the
    /// broker's default. On a cluster of ≥ 3 nodes set 3 (a majority survives one node lost).
    /// RabbitMQ 3.10 refuses a redeclare with another value (PRECONDITION_FAILED), so it must
    /// equal what the existing queues were declared with: set it on a new cluster only.
    pub quorum_group_size: Option<u16>,
}

impl BrokerSettings {
    /// The rules a reader cannot see in the types: every URL an AMQP URL with a host, all of
    /// one scheme, none twice; TLS files only with `amqps://`, a CA with every `amqps://` URL,
    /// certificate and key together; a sane quorum group size.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        let urls = self.url.as_slice();
        if urls.is_empty() {
            return bad("broker.url is empty: give one URL or a list");
        }
        if urls.len() > BrokerUrls::MAX {
            return Err(ConfigError::Invalid(format!(
                "broker.url lists {} URLs; at most {} are allowed",
                urls.len(),
                BrokerUrls::MAX
            )));
        }
        let mut nodes = Vec::new();
        for (i, u) in urls.iter().enumerate() {
            let shown = mask_url_password(u);
            if !u.starts_with("amqp://") && !u.starts_with("amqps://") {
                return Err(ConfigError::Invalid(format!(
                    "broker.url must start with amqp:// or amqps:// (#{}: {shown:?})",
                    i + 1
                )));
            }
            let Some(node) = broker_node(u) else {
                return Err(ConfigError::Invalid(format!(
                    "broker.url #{}: {shown:?} is not a valid URL with a host",
                    i + 1
                )));
            };
            if nodes.contains(&node) {
                return Err(ConfigError::Invalid(format!(
                    "broker.url #{}: node {node} is listed twice",
                    i + 1
                )));
            }
            nodes.push(node);
        }
        let tls = urls[0].starts_with("amqps://");
        if urls.iter().any(|u| u.starts_with("amqps://") != tls) {
            return bad("broker.url mixes amqp:// and amqps://: use one scheme for every node");
        }
        if self.quorum_group_size == Some(0) || self.quorum_group_size > Some(7) {
            return bad("broker.quorum_group_size must be within 1..=7 (or unset)");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("broker.tls_cert and broker.tls_key go together: set both or neither");
        }
        let any_file = self.tls_ca.is_some() || self.tls_cert.is_some();
        if !tls && any_file {
            return bad("broker.tls_* is set but broker.url is not amqps://");
        }
        if tls && self.tls_ca.is_none() {
            return bad(
                "broker.url is amqps:// but broker.tls_ca is not set (the broker's certificate \
                 is checked against that CA only)",
            );
        }
        Ok(())
    }
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            url: BrokerUrls::new(["amqp://guest:guest@127.0.0.1:5672/%2f"]),
            heartbeat_s: 10,
            max_backoff_ms: 5_000,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            link_key_file: None,
            quorum_group_size: None,
        }
    }
}

/// A duration configured in hours (fractions allowed, so a test can ask for seconds) as whole
/// milliseconds, the unit of RabbitMQ's queue arguments: at least one second, at most a year.
pub fn hours_to_ms(key: &str, hours: f64) -> Result<i64, ConfigError> {
    if !hours.is_finite() || !(1.0 / 3600.0..=8760.0).contains(&hours) {
        return Err(ConfigError::Invalid(format!(
            "{key} must be between 0.000278 (one second) and 8760 hours"
        )));
    }
    Ok((hours * 3_600_000.0).round() as i64)
}

/// `overlay`, then deserialised into the binary's config type.
pub fn parse<T, I>(file: &str, prefix: &str, vars: I) -> Result<T, ConfigError>
where
    T: serde::de::DeserializeOwned,
    I: IntoIterator<Item = (String, String)>,
{
    overlay(file, prefix, vars)?
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))
}

/// Adds a heartbeat (and a connect timeout) to an AMQP URL unless it sets one already, so a
/// half-open link is noticed within about two heartbeats.
pub fn amqp_url_with_heartbeat(url: &str, heartbeat_s: u16) -> String {
    if url.contains("heartbeat=") {
        return url.to_owned();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}heartbeat={heartbeat_s}&connection_timeout=5000")
}

fn parse_scalar(raw: &str) -> Value {
    let probe = format!("v = {raw}");
    match probe.parse::<Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(raw.to_owned())),
        Err(_) => Value::String(raw.to_owned()),
    }
}

/// Replaces the password in a URL like `amqp://user:secret@host/` with `***`, for logging.
pub fn mask_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}://{}:***{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_become_milliseconds_within_bounds() {
        assert_eq!(hours_to_ms("k", 72.0).unwrap(), 259_200_000);
        assert_eq!(hours_to_ms("k", 0.001).unwrap(), 3_600);
        for bad in [0.0, -1.0, 0.0001, 9000.0, f64::NAN, f64::INFINITY] {
            let e = hours_to_ms("sync.queue_expires_h", bad).unwrap_err();
            assert!(e.to_string().contains("sync.queue_expires_h"), "{bad}: {e}");
        }
    }

    #[test]
    fn broker_tls_settings_must_be_coherent() {
        let with = |url: &str, ca: bool, cert: bool, key: bool| BrokerSettings {
            url: BrokerUrls::parse(url),
            tls_ca: ca.then(|| "ca.pem".into()),
            tls_cert: cert.then(|| "c.pem".into()),
            tls_key: key.then(|| "c.key".into()),
            ..BrokerSettings::default()
        };
        assert!(BrokerSettings::default().check().is_ok());
        assert!(with("amqps://h:5671/%2f", true, true, true).check().is_ok());
        assert!(
            with("amqps://h:5671/%2f", true, false, false)
                .check()
                .is_ok()
        );
        for (s, why) in [
            (
                with("amqps://h/%2f", false, true, true),
                "tls_ca is not set",
            ),
            (with("amqps://h/%2f", true, true, false), "go together"),
            (with("amqp://h/%2f", true, false, false), "not amqps"),
            (with("http://h/", false, false, false), "must start with"),
            (with("amqp://a/,amqps://b/", false, false, false), "mixes"),
            (with("amqp://a/,", false, false, false), "#2"),
            (
                with("amqp://a:1/,amqp://b:2/,amqp://a:1/x", false, false, false),
                "twice",
            ),
            (with("amqp://:5672/", false, false, false), "with a host"),
        ] {
            let e = s.check().unwrap_err().to_string();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }

    #[test]
    fn env_overrides_file_and_types_values() {
        let t = overlay(
            "[http]\nlisten = \"0.0.0.0:1\"\n",
            "APP",
            vec![
                ("APP__HTTP__LISTEN".into(), "127.0.0.1:9".into()),
                ("APP__MATCHING__DEADLINE_MS".into(), "1500".into()),
                ("APP__BROKER__URL".into(), "amqp://a:b@h/%2f".into()),
                ("OTHER__X__Y".into(), "1".into()),
            ],
        )
        .unwrap();
        assert_eq!(t["http"]["listen"].as_str(), Some("127.0.0.1:9"));
        assert_eq!(t["matching"]["deadline_ms"].as_integer(), Some(1500));
        assert_eq!(t["broker"]["url"].as_str(), Some("amqp://a:b@h/%2f"));
        assert!(!t.contains_key("x"));
    }

    #[derive(Debug, serde::Deserialize)]
    struct Doc {
        broker: BrokerSettings,
    }

    #[test]
    fn broker_url_is_one_url_an_array_or_a_comma_list() {
        let one: Doc = parse("[broker]\nurl = \"amqp://u:p@a:1/%2f\"\n", "APP", vec![]).unwrap();
        assert_eq!(one.broker.url.as_slice(), ["amqp://u:p@a:1/%2f"]);
        let array: Doc = parse(
            "[broker]\nurl = [\"amqp://a:1/\", \"amqp://b:2/\"]\n",
            "APP",
            vec![],
        )
        .unwrap();
        assert_eq!(array.broker.url.as_slice(), ["amqp://a:1/", "amqp://b:2/"]);
        let env: Doc = parse(
            "",
            "APP",
            vec![(
                "APP__BROKER__URL".into(),
                "amqp://a:1/, amqp://b:2/,amqp://c:3/".into(),
            )],
        )
        .unwrap();
        assert_eq!(
            env.broker.url.as_slice(),
            ["amqp://a:1/", "amqp://b:2/", "amqp://c:3/"]
        );
        assert!(env.broker.check().is_ok());
        let e = parse::<Doc, _>("[broker]\nurl = 5\n", "APP", vec![]).unwrap_err();
        assert!(e.to_string().contains("broker.url must be"), "{e}");
        let e = parse::<Doc, _>("[broker]\nurl = []\n", "APP", vec![]).unwrap();
        assert!(e.broker.check().unwrap_err().to_string().contains("empty"));
        // Written back as an array, masked.
        let shown = toml::to_string(&BrokerSettings {
            url: BrokerUrls::parse("amqp://u:secret@a/,amqp://u:secret@b/").masked(),
            ..BrokerSettings::default()
        })
        .unwrap();
        assert!(
            shown.contains("url = [\"amqp://u:***@a/\", \"amqp://u:***@b/\"]"),
            "{shown}"
        );
    }

    #[test]
    fn quorum_group_size_is_bounded() {
        for (n, ok) in [
            (None, true),
            (Some(1), true),
            (Some(3), true),
            (Some(0), false),
            (Some(8), false),
        ] {
            let s = BrokerSettings {
                quorum_group_size: n,
                ..BrokerSettings::default()
            };
            assert_eq!(s.check().is_ok(), ok, "{n:?}");
        }
    }

    #[test]
    fn broker_node_shows_host_and_port_only() {
        assert_eq!(
            broker_node("amqp://guest:secret@10.0.0.5/%2f?heartbeat=5").as_deref(),
            Some("10.0.0.5:5672")
        );
        assert_eq!(
            broker_node("amqps://u:p@rabbit-2.tail:5999/v").as_deref(),
            Some("rabbit-2.tail:5999")
        );
        assert_eq!(broker_node("amqps://[::1]/").as_deref(), Some("[::1]:5671"));
        assert_eq!(broker_node("http://h/"), None);
        assert_eq!(broker_node("amqp://"), None);
        assert_eq!(broker_node("not a url"), None);
    }

    #[test]
    fn malformed_env_names_are_errors() {
        assert!(overlay("", "APP", vec![("APP__X".into(), "1".into())]).is_err());
        assert!(overlay("x = 1", "APP", vec![("APP__X__Y".into(), "1".into())]).is_err());
    }

    #[test]
    fn heartbeat_is_added_once() {
        assert_eq!(
            amqp_url_with_heartbeat("amqp://h/%2f", 10),
            "amqp://h/%2f?heartbeat=10&connection_timeout=5000"
        );
        assert_eq!(
            amqp_url_with_heartbeat("amqp://h/v?heartbeat=3", 10),
            "amqp://h/v?heartbeat=3"
        );
        assert!(amqp_url_with_heartbeat("amqp://h/v?frame_max=9", 10).contains("&heartbeat=10"));
    }

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_url_password("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(mask_url_password("amqp://h/"), "amqp://h/");
    }
}
