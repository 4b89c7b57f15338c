//! Accounts' credentials and sessions: argon2id password hashes, opaque session tokens stored
//! only as SHA-256 hashes, and the extractor that turns a request's bearer token into an
//! authenticated `Caller`. Bearer only: no cookie is read (ARCHITECTURE.md, "Sessions: bearer
//! tokens, no cookies"), so there is no ambient credential for a cross-site request to ride on.
//!
//! Password hashing is deliberately slow and memory-hungry; on a 1 GiB box only a few may run at
//! once (`HASH_PERMITS`), and they run on blocking threads.

use crate::db::Cached;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use comatching_protocol::UserId;
use rand::RngCore;
use rusqlite::{OptionalExtension, params};
use sha2::{Digest as _, Sha256};

use crate::db::now_ms;
use crate::error::{ApiError, ErrorCode};
use crate::http::AppState;

/// Concurrent argon2 computations allowed (each uses ~19 MiB).
pub const HASH_PERMITS: usize = 2;
/// The default of `auth.session_ttl_h`: sessions last the festival and then some (14 days).
pub const SESSION_TTL_H: f64 = 14.0 * 24.0;

/// The argon2id cost for new hashes. Verification reads the cost from the stored hash, so
/// changing it never locks anyone out.
#[derive(Clone, Copy, Debug)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
}

impl Default for HashCost {
    fn default() -> Self {
        // OWASP's argon2id baseline: 19 MiB, 2 iterations, 1 lane.
        HashCost {
            memory_kib: 19 * 1024,
            iterations: 2,
        }
    }
}

fn argon2(cost: HashCost) -> Result<Argon2<'static>, ApiError> {
    let params = Params::new(cost.memory_kib, cost.iterations, 1, None)
        .map_err(|e| ApiError::internal(format!("argon2 parameters: {e}")))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

pub fn hash_password(password: &str, cost: HashCost) -> Result<String, ApiError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    PasswordHasher::<PasswordHash>::hash_password_with_salt(
        &argon2(cost)?,
        password.as_bytes(),
        &salt,
    )
    .map(|h| h.to_string())
    .map_err(|e| ApiError::internal(format!("hashing: {e}")))
}

pub fn verify_password(password: &str, stored: &str) -> bool {
    // The stored hash carries its own parameters; Argon2::default only supplies the algorithm.
    PasswordHash::new(stored)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A fresh opaque token: 32 random bytes as hex. Only its hash is stored.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new session for `user`, accepted for `ttl_ms` (`auth.session_ttl_h`) from now.
pub fn create_session(
    conn: &rusqlite::Connection,
    user: UserId,
    ttl_ms: i64,
) -> Result<String, ApiError> {
    let token = new_token();
    let now = now_ms();
    conn.exec_cached(
        "INSERT INTO sessions(token_hash, user_id, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4)",
        params![
            token_hash(&token),
            user.to_hex(),
            now,
            now.saturating_add(ttl_ms)
        ],
    )?;
    Ok(token)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    User,
    Operator,
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user_id: UserId,
    pub role: Role,
    pub token_hash: String,
}

impl Caller {
    pub fn require_operator(&self) -> Result<(), ApiError> {
        if self.role == Role::Operator {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                "this route is for operators",
            ))
        }
    }
}

/// A caller with the operator role. Taken before any other extractor of an operator route, so
/// a student is refused (403) before the route looks at the path, query or body: a malformed
/// admin request from a student learns nothing about what the route expects.
pub struct Operator(pub Caller);

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, s).await?;
        caller.require_operator()?;
        Ok(Operator(caller))
    }
}

fn token_from(parts: &Parts) -> Option<String> {
    let v = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let t = v.strip_prefix("Bearer ")?.trim();
    (!t.is_empty() && t.len() <= 128).then(|| t.to_owned())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = token_from(parts).ok_or_else(ApiError::unauthorized)?;
        let hash = token_hash(&token);
        // A pooled read-only connection: session lookups never wait for the writer.
        let caller = state
            .db
            .read(move |c| {
                let row: Option<(String, String)> = c
                    .row_cached(
                        "SELECT a.user_id, a.role FROM sessions s JOIN accounts a ON a.user_id = s.user_id \
                         WHERE s.token_hash = ?1 AND s.expires_ms > ?2 AND a.withdrawn_ms IS NULL",
                        params![hash, now_ms()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((user, role)) = row else {
                    return Err(ApiError::unauthorized());
                };
                Ok(Caller {
                    user_id: user.parse().map_err(|_| ApiError::internal("stored user id"))?,
                    role: if role == "operator" { Role::Operator } else { Role::User },
                    token_hash: hash,
                })
            })
            .await?;
        state.limits.check_user(caller.user_id)?;
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("correct horse battery", HashCost::default()).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse battery!", &h));
        assert!(!verify_password("x", "not a hash"));
        let cheap = HashCost {
            memory_kib: 64,
            iterations: 1,
        };
        let h = hash_password("correct horse battery", cheap).unwrap();
        assert!(h.contains("m=64,t=1"));
        assert!(verify_password("correct horse battery", &h));
    }

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let a = new_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, new_token());
        assert_ne!(token_hash(&a), a);
    }
}
