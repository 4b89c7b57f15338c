//! Rate limits by route class, on `governor`'s keyed GCRA limiters (no fixed windows: a client
//! spends its minute's quota at once or spread out, never twice around a window edge).
//!
//! * every `/api/` route: a high ceiling per client address (IPv6 by /64) — campus NAT
//!   addresses carry thousands of students, so this only stops floods;
//! * credential routes (`POST /api/v1/accounts`, `POST /api/v1/sessions`, `PUT
//!   /api/v1/me/password`): per client address, each costs an argon2 hash or two;
//! * logins: per username from any address (password guessing from many addresses is slow);
//! * routes with a session: per user (in the `Caller` extractor).
//!
//! The client address is the socket peer, unless the peer is one of `http.trusted_proxies`:
//! then it is the rightmost `X-Forwarded-For` (or `Forwarded: for=`) hop that is not a trusted
//! proxy ([`client_ip`]). Memory is bounded: idle keys are dropped every few seconds and a
//! limiter holding more than `rate_limit.max_tracked_keys` keys after that starts afresh.
//! A refusal is 429 `rate_limited` with `Retry-After` and changes nothing.

use std::fmt::Write as _;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{HeaderMap, Method, header};
use comatching_protocol::UserId;
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;
use tokio::sync::watch;

use crate::config;
use crate::error::{ApiError, ErrorCode};

/// How often idle keys are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The route classes, as named in `comatching_rate_limited_total{limit=…}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Ip,
    Credentials,
    User,
    Login,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Ip => "ip",
            Limit::Credentials => "credentials",
            Limit::User => "user",
            Limit::Login => "login",
        }
    }
}

/// One keyed limiter with its counters. Replaced wholesale (behind the lock) when it holds too
/// many keys even after dropping the idle ones.
struct Tracked<K: Hash + Eq + Clone> {
    limit: Limit,
    quota: Quota,
    max_keys: usize,
    limiter: RwLock<Arc<DefaultKeyedRateLimiter<K>>>,
    refused: AtomicU64,
    resets: AtomicU64,
}

impl<K: Hash + Eq + Clone> Tracked<K> {
    fn new(limit: Limit, quota: Quota, max_keys: usize) -> Self {
        Tracked {
            limit,
            quota,
            max_keys,
            limiter: RwLock::new(Arc::new(DefaultKeyedRateLimiter::keyed(quota))),
            refused: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        }
    }

    fn current(&self) -> Arc<DefaultKeyedRateLimiter<K>> {
        self.limiter
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn check(&self, key: &K) -> Result<(), ApiError> {
        let limiter = self.current();
        match limiter.check_key(key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                let wait = not_until.wait_time_from(limiter.clock().now());
                Err(limited(self.limit, wait))
            }
        }
    }

    fn sweep(&self) {
        let limiter = self.current();
        limiter.retain_recent();
        limiter.shrink_to_fit();
        let held = limiter.len();
        if held > self.max_keys {
            self.resets.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                limit = self.limit.as_str(),
                keys = held,
                max = self.max_keys,
                "rate limiter over rate_limit.max_tracked_keys with every key active; starting afresh"
            );
            *self.limiter.write().unwrap_or_else(|p| p.into_inner()) =
                Arc::new(DefaultKeyedRateLimiter::keyed(self.quota));
        }
    }

    fn keys(&self) -> usize {
        self.current().len()
    }
}

/// 429 `rate_limited`, `Retry-After` in whole seconds (at least 1).
fn limited(limit: Limit, wait: Duration) -> ApiError {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    let what = match limit {
        Limit::Ip => "requests from this address",
        Limit::Credentials => "sign-ups and logins from this address",
        Limit::User => "requests for this account",
        Limit::Login => "login attempts for this username",
    };
    ApiError::new(
        ErrorCode::RateLimited,
        format!("too many {what}; retry in {secs} s"),
    )
    .with_retry_after(Duration::from_secs(secs))
}

fn per_minute(n: u32, burst: u32) -> Quota {
    let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(n).allow_burst(burst)
}

pub struct RateLimits {
    ip: Tracked<IpAddr>,
    credentials: Tracked<IpAddr>,
    user: Tracked<UserId>,
    login: Tracked<String>,
    trusted: Vec<IpNet>,
}

impl RateLimits {
    /// `trusted_proxies` as validated by the config (an unparsable entry is skipped here).
    pub fn new(cfg: &config::RateLimit, trusted_proxies: &[String]) -> Self {
        let max = cfg.max_tracked_keys;
        RateLimits {
            ip: Tracked::new(
                Limit::Ip,
                per_minute(cfg.per_ip_per_minute, cfg.per_ip_per_minute),
                max,
            ),
            credentials: Tracked::new(
                Limit::Credentials,
                per_minute(
                    cfg.credentials_per_ip_per_minute,
                    cfg.credentials_per_ip_per_minute,
                ),
                max,
            ),
            user: Tracked::new(
                Limit::User,
                per_minute(cfg.per_user_per_minute, cfg.per_user_per_minute),
                max,
            ),
            login: Tracked::new(
                Limit::Login,
                per_minute(cfg.login_per_username_per_minute, cfg.login_burst),
                max,
            ),
            trusted: parse_proxies(trusted_proxies).unwrap_or_default(),
        }
    }

    /// The client's address for this request (see [`client_ip`]).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        client_ip(peer, &forwarded_hops(headers), &self.trusted)
    }

    /// The address limits of one request: the ceiling on every `/api/` route, and the
    /// credential limit on sign-up and login. `route` is the matched route's path.
    pub fn check_request(
        &self,
        client: IpAddr,
        method: &Method,
        route: &str,
    ) -> Result<(), ApiError> {
        if !route.starts_with("/api/") {
            return Ok(());
        }
        let key = ip_key(client);
        self.ip.check(&key)?;
        if is_credential_route(method, route) {
            self.credentials.check(&key)?;
        }
        Ok(())
    }

    pub fn check_user(&self, user: UserId) -> Result<(), ApiError> {
        self.user.check(&user)
    }

    /// Before a login's password is verified. Any string is a key (unknown usernames too, so
    /// the limit does not tell which exist); long ones are cut, as no username is that long.
    pub fn check_login(&self, username: &str) -> Result<(), ApiError> {
        let key: String = username.chars().take(40).collect();
        self.login.check(&key)
    }

    /// Drops idle keys (those whose quota has refilled) and enforces `max_tracked_keys`.
    pub fn sweep(&self) {
        self.ip.sweep();
        self.credentials.sweep();
        self.user.sweep();
        self.login.sweep();
    }

    /// Sweeps every few seconds until shutdown.
    pub async fn run_sweeper(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SWEEP_EVERY) => self.sweep(),
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Prometheus text: refusals, resets and keys held, by limit.
    pub fn render_metrics(&self) -> String {
        let all: [(Limit, u64, u64, usize); 4] = [
            (
                Limit::Ip,
                self.ip.refused.load(Ordering::Relaxed),
                self.ip.resets.load(Ordering::Relaxed),
                self.ip.keys(),
            ),
            (
                Limit::Credentials,
                self.credentials.refused.load(Ordering::Relaxed),
                self.credentials.resets.load(Ordering::Relaxed),
                self.credentials.keys(),
            ),
            (
                Limit::User,
                self.user.refused.load(Ordering::Relaxed),
                self.user.resets.load(Ordering::Relaxed),
                self.user.keys(),
            ),
            (
                Limit::Login,
                self.login.refused.load(Ordering::Relaxed),
                self.login.resets.load(Ordering::Relaxed),
                self.login.keys(),
            ),
        ];
        let mut out = String::new();
        out.push_str("# HELP comatching_rate_limited_total Requests refused with 429, by limit.\n");
        out.push_str("# TYPE comatching_rate_limited_total counter\n");
        for (l, refused, _, _) in &all {
            let _ = writeln!(
                out,
                "comatching_rate_limited_total{{limit=\"{}\"}} {refused}",
                l.as_str()
            );
        }
        out.push_str(
            "# HELP comatching_rate_limit_resets_total Limiters started afresh because every tracked key was active.\n",
        );
        out.push_str("# TYPE comatching_rate_limit_resets_total counter\n");
        for (l, _, resets, _) in &all {
            let _ = writeln!(
                out,
                "comatching_rate_limit_resets_total{{limit=\"{}\"}} {resets}",
                l.as_str()
            );
        }
        out.push_str("# HELP comatching_rate_limit_keys Keys a limiter tracks now.\n");
        out.push_str("# TYPE comatching_rate_limit_keys gauge\n");
        for (l, _, _, keys) in &all {
            let _ = writeln!(
                out,
                "comatching_rate_limit_keys{{limit=\"{}\"}} {keys}",
                l.as_str()
            );
        }
        out
    }
}

/// Routes that hash or verify a password: sign-up, login and password change.
fn is_credential_route(method: &Method, route: &str) -> bool {
    (*method == Method::POST && matches!(route, "/api/v1/accounts" | "/api/v1/sessions"))
        || (*method == Method::PUT && route == "/api/v1/me/password")
}

/// The key an address is limited under: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64 —
/// one subscriber usually holds a whole /64.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

/// Parses `http.trusted_proxies`: CIDR blocks or single addresses.
pub fn parse_proxies(list: &[String]) -> Result<Vec<IpNet>, String> {
    list.iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{s:?} is neither an address nor a CIDR block"))
        })
        .collect()
}

/// The forwarding hops a request claims, leftmost (the original client) first: every
/// `X-Forwarded-For` value in order; without one, the `for=` of every `Forwarded` element.
pub fn forwarded_hops(headers: &HeaderMap) -> Vec<String> {
    let split = |name: header::HeaderName| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_owned())
            .collect()
    };
    let xff = split(header::HeaderName::from_static("x-forwarded-for"));
    if !xff.is_empty() {
        return xff;
    }
    split(header::FORWARDED)
        .into_iter()
        .map(|element| {
            element
                .split(';')
                .find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| v.trim().to_owned())
                })
                .unwrap_or_default()
        })
        .collect()
}

/// One hop as an address: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`, `[::1]:80`, optionally in
/// quotes (RFC 7239). Anything else (`unknown`, obfuscated names, garbage) is `None`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let h = hop.trim().trim_matches('"');
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = h.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    h.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// The client's address. A peer that is not a trusted proxy is the client, whatever it claims.
/// Behind trusted proxies, the hops are walked right to left (each proxy appends the address it
/// saw) and the first one that is not a trusted proxy is the client; a hop that is not an
/// address stops the walk at the last trusted one (headers left of it are the client's own
/// words). All hops trusted: the leftmost.
pub fn client_ip(peer: IpAddr, hops: &[String], trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(*ip),
            v4 => *v4,
        };
        trusted.iter().any(|n| n.contains(&ip))
    };
    if !is_trusted(&peer) {
        return peer;
    }
    let mut current = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            return current;
        };
        current = ip;
        if !is_trusted(&ip) {
            return ip;
        }
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(per_ip: u32, creds: u32, user: u32, login: u32, burst: u32) -> config::RateLimit {
        config::RateLimit {
            per_ip_per_minute: per_ip,
            per_user_per_minute: user,
            credentials_per_ip_per_minute: creds,
            login_per_username_per_minute: login,
            login_burst: burst,
            max_tracked_keys: 1000,
        }
    }

    #[test]
    fn each_class_counts_its_own_key() {
        let l = RateLimits::new(&cfg(4, 2, 1, 1, 3), &[]);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let post = Method::POST;
        // Credential routes: 2 per address, then 429 with Retry-After.
        assert!(l.check_request(a, &post, "/api/v1/sessions").is_ok());
        assert!(l.check_request(a, &post, "/api/v1/accounts").is_ok());
        let e = l.check_request(a, &post, "/api/v1/sessions").unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        let retry = e.retry_after.unwrap();
        assert!(
            retry >= Duration::from_secs(1) && retry <= Duration::from_secs(30),
            "{retry:?}"
        );
        // Other routes still pass until the address ceiling (4, three spent above).
        assert!(l.check_request(a, &Method::GET, "/api/v1/me").is_ok());
        assert!(l.check_request(a, &Method::GET, "/api/v1/me").is_err());
        // Non-API routes are never limited; another address is untouched.
        assert!(l.check_request(a, &Method::GET, "/metrics").is_ok());
        assert!(l.check_request(b, &post, "/api/v1/sessions").is_ok());
        // Logins: a burst of 3 per username, wherever they come from.
        for _ in 0..3 {
            assert!(l.check_login("sara").is_ok());
        }
        assert!(l.check_login("sara").is_err());
        assert!(l.check_login("tara").is_ok());
        let u = UserId::new_v7();
        assert!(l.check_user(u).is_ok());
        assert!(l.check_user(u).is_err());
        let text = l.render_metrics();
        assert!(
            text.contains("comatching_rate_limited_total{limit=\"credentials\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("comatching_rate_limited_total{limit=\"login\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("comatching_rate_limited_total{limit=\"ip\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_password_change_spends_the_credential_quota() {
        let l = RateLimits::new(&cfg(100, 2, 100, 100, 100), &[]);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        // Other writes and reads of the same path are not credential requests.
        assert!(
            l.check_request(a, &Method::PUT, "/api/v1/me/profile")
                .is_ok()
        );
        assert!(
            l.check_request(a, &Method::GET, "/api/v1/me/password")
                .is_ok()
        );
        assert!(
            l.check_request(a, &Method::PUT, "/api/v1/me/password")
                .is_ok()
        );
        assert!(
            l.check_request(a, &Method::POST, "/api/v1/sessions")
                .is_ok()
        );
        for (m, route) in [
            (Method::PUT, "/api/v1/me/password"),
            (Method::POST, "/api/v1/accounts"),
        ] {
            let e = l.check_request(a, &m, route).unwrap_err();
            assert_eq!(e.code, ErrorCode::RateLimited, "{m} {route}");
        }
    }

    #[test]
    fn idle_keys_are_dropped_and_the_key_count_is_bounded() {
        let mut c = cfg(6000, 6000, 1, 1, 1);
        c.max_tracked_keys = 100;
        let l = RateLimits::new(&c, &[]);
        // Logins: one attempt each keeps 300 keys busy (refill takes a minute).
        for i in 0..300 {
            l.check_login(&format!("user{i}")).unwrap();
        }
        assert_eq!(l.login.keys(), 300);
        l.sweep();
        assert_eq!(
            l.login.keys(),
            0,
            "over the bound with every key active: afresh"
        );
        assert_eq!(l.login.resets.load(Ordering::Relaxed), 1);
        // Addresses at 6000/min refill in 10 ms: idle soon, dropped without a reset.
        for i in 0..50u8 {
            l.check_request(IpAddr::from([10, 0, 0, i]), &Method::GET, "/api/v1/me")
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(30));
        l.sweep();
        assert_eq!(l.ip.keys(), 0);
        assert_eq!(l.ip.resets.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn ipv6_is_keyed_by_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(ip_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forwarded_headers_are_read_in_order() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "203.0.113.9, 10.0.0.2".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.3".parse().unwrap());
        assert_eq!(forwarded_hops(&h), ["203.0.113.9", "10.0.0.2", "10.0.0.3"]);
        let mut h = HeaderMap::new();
        h.append(
            header::FORWARDED,
            "for=\"[2001:db8::7]:4711\";proto=https, For=198.51.100.4"
                .parse()
                .unwrap(),
        );
        let hops = forwarded_hops(&h);
        assert_eq!(hops, ["\"[2001:db8::7]:4711\"", "198.51.100.4"]);
        assert_eq!(parse_hop(&hops[0]), Some("2001:db8::7".parse().unwrap()));
        let trusted = parse_proxies(&["127.0.0.1".into()]).unwrap();
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(peer, &hops, &trusted),
            "198.51.100.4".parse::<IpAddr>().unwrap()
        );
    }

    fn v4() -> impl Strategy<Value = IpAddr> {
        any::<[u8; 4]>().prop_map(IpAddr::from)
    }

    fn hop_text() -> impl Strategy<Value = String> {
        prop_oneof![
            v4().prop_map(|ip| ip.to_string()),
            v4().prop_map(|ip| format!("{ip}:1234")),
            any::<[u16; 8]>().prop_map(|s| format!("[{}]", Ipv6Addr::from(s))),
            "[a-z_ ]{0,12}",
        ]
    }

    proptest! {
        /// A peer that is not a trusted proxy is the client, whatever it sends.
        #[test]
        fn an_untrusted_peer_is_the_client(
            peer in v4(),
            hops in proptest::collection::vec(hop_text(), 0..6),
        ) {
            let trusted = parse_proxies(&["10.0.0.0/8".into()]).unwrap();
            prop_assume!(!trusted[0].contains(&peer));
            prop_assert_eq!(client_ip(peer, &hops, &trusted), peer);
        }

        /// Behind trusted proxies the client is the address the first proxy saw, whatever the
        /// client put in front of it.
        #[test]
        fn behind_trusted_proxies_the_rightmost_untrusted_hop_wins(
            forged in proptest::collection::vec(hop_text(), 0..6),
            client in v4(),
            proxies in proptest::collection::vec(any::<[u8; 3]>(), 0..4),
            peer in any::<[u8; 3]>(),
        ) {
            let trusted = parse_proxies(&["10.0.0.0/8".into()]).unwrap();
            prop_assume!(!trusted[0].contains(&client));
            let mut hops = forged;
            hops.push(client.to_string());
            hops.extend(proxies.iter().map(|p| IpAddr::from([10, p[0], p[1], p[2]]).to_string()));
            let peer = IpAddr::from([10, peer[0], peer[1], peer[2]]);
            prop_assert_eq!(client_ip(peer, &hops, &trusted), client);
        }

        /// The answer is always the peer or one of the claimed hops, never anything else.
        #[test]
        fn the_client_is_the_peer_or_a_claimed_hop(
            peer in v4(),
            hops in proptest::collection::vec(hop_text(), 0..6),
            open in any::<bool>(),
        ) {
            let trusted = if open { parse_proxies(&["0.0.0.0/0".into(), "::/0".into()]).unwrap() } else { vec![] };
            let got = client_ip(peer, &hops, &trusted);
            prop_assert!(got == peer || hops.iter().any(|h| parse_hop(h) == Some(got)));
        }
    }
}
