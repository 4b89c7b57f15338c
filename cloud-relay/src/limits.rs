//! Per-IP and per-user rate limits: fixed one-minute windows kept in memory. Enough for one
//! relay process; an exceeded limit answers 429 `rate_limited` and changes nothing.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use comatching_protocol::UserId;

use crate::error::{ApiError, ErrorCode};

struct Window<K> {
    limit: u32,
    started: Instant,
    counts: HashMap<K, u32>,
}

impl<K: Hash + Eq> Window<K> {
    fn new(limit: u32) -> Self {
        Window {
            limit,
            started: Instant::now(),
            counts: HashMap::new(),
        }
    }

    fn hit(&mut self, k: K) -> bool {
        if self.started.elapsed() >= Duration::from_secs(60) {
            self.started = Instant::now();
            self.counts.clear();
        }
        let n = self.counts.entry(k).or_default();
        *n += 1;
        *n <= self.limit
    }
}

pub struct RateLimits {
    ip: Mutex<Window<IpAddr>>,
    user: Mutex<Window<UserId>>,
}

fn limited() -> ApiError {
    ApiError::new(
        ErrorCode::RateLimited,
        "too many requests; slow down and retry in a minute",
    )
}

impl RateLimits {
    pub fn new(per_ip: u32, per_user: u32) -> Self {
        RateLimits {
            ip: Mutex::new(Window::new(per_ip)),
            user: Mutex::new(Window::new(per_user)),
        }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        if self.ip.lock().unwrap_or_else(|p| p.into_inner()).hit(ip) {
            Ok(())
        } else {
            Err(limited())
        }
    }

    pub fn check_user(&self, user: UserId) -> Result<(), ApiError> {
        if self
            .user
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .hit(user)
        {
            Ok(())
        } else {
            Err(limited())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_limit_per_key() {
        let l = RateLimits::new(2, 1);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(l.check_ip(a).is_ok());
        assert!(l.check_ip(a).is_ok());
        assert_eq!(l.check_ip(a).unwrap_err().code, ErrorCode::RateLimited);
        assert!(l.check_ip(b).is_ok());
        let u = UserId::new_v7();
        assert!(l.check_user(u).is_ok());
        assert!(l.check_user(u).is_err());
    }
}
