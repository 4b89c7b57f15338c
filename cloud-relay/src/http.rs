//! The HTTP API: routes, request parsing at the boundary, and the glue from handlers to the
//! ledger, profiles and match flow. Handlers stay thin: parse → one call → respond.
//!
//! Every body is read through `JsonBody`, which enforces the size limit (413) and turns serde's
//! errors into `validation_failed` with the offending field's path.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use comatching_protocol::{
    AgePreference, ContactPreference, HobbyPreference, Important, MatchOptions, MbtiPreference,
    UserId,
};
use rusqlite::{OptionalExtension, params};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};

use crate::auth::{self, Caller};
use crate::config::Config;
use crate::db::{Db, now_ms};
use crate::error::{ApiError, ErrorCode};
use crate::limits::RateLimits;
use crate::matching::{self, Matcher};
use crate::metrics::Metrics;
use crate::profiles::{self, ProfileInput};
use crate::rpc::MatchRpc;
use crate::{ledger, outbox};

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub cfg: Arc<Config>,
    pub rpc: Arc<MatchRpc>,
    pub matcher: Arc<Matcher>,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<RateLimits>,
    pub outbox_wake: Arc<Notify>,
    pub hashing: Arc<Semaphore>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/accounts", post(create_account))
        .route("/api/v1/sessions", post(login))
        .route("/api/v1/sessions/current", delete(logout))
        .route("/api/v1/me", get(me).delete(withdraw))
        .route("/api/v1/me/profile", put(put_profile))
        .route("/api/v1/matches", post(create_match).get(list_matches))
        .route("/api/v1/admin/points", post(grant_points))
        .route("/api/v1/admin/stats", get(stats))
        .route("/api/v1/admin/appliances", get(appliances))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_and_limit,
        ))
        .with_state(state)
}

/// Counts every response by route and status, and applies the per-IP limit to API routes.
async fn count_and_limit(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let resp = match ip {
        Some(ip) if route.starts_with("/api/") => match s.limits.check_ip(ip) {
            Ok(()) => next.run(req).await,
            Err(e) => e.into_response(),
        },
        _ => next.run(req).await,
    };
    s.metrics.count_request(&route, resp.status().as_u16());
    resp
}

/// A JSON body, size-limited and parsed with field paths in its errors.
pub struct JsonBody<T>(pub T);

fn tidy_serde_message(msg: &str) -> String {
    let msg = match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    // Our validated types say "field: message"; the field is reported separately.
    match msg.split_once(": ") {
        Some((head, tail)) if !head.contains(' ') => tail.to_owned(),
        _ => msg.to_owned(),
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        let field = if path == "." {
            inner
                .split('`')
                .nth(1)
                .filter(|_| {
                    inner.starts_with("missing field") || inner.starts_with("unknown field")
                })
                .map(str::to_owned)
                .unwrap_or_else(|| "body".to_owned())
        } else {
            path
        };
        ApiError::validation(field, tidy_serde_message(&inner))
    })
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, s: &AppState) -> Result<Self, ApiError> {
        let limit = s.cfg.http.max_body_bytes;
        let too_large = || {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("request bodies are limited to {limit} bytes"),
            )
        };
        if let Some(len) = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            && len > limit
        {
            return Err(too_large());
        }
        let bytes: Bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| too_large())?;
        Ok(JsonBody(parse_json(&bytes)?))
    }
}

fn created(body: Value) -> Response {
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    username: String,
    password: String,
}

fn check_credentials(c: &Credentials) -> Result<(), ApiError> {
    let u = &c.username;
    if u.len() < 3
        || u.len() > 32
        || !u
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
    {
        return Err(ApiError::validation(
            "username",
            "must be 3 to 32 of a-z, 0-9 and _",
        ));
    }
    let n = c.password.chars().count();
    if !(10..=128).contains(&n) {
        return Err(ApiError::validation(
            "password",
            "must be 10 to 128 characters",
        ));
    }
    Ok(())
}

async fn hash_off_runtime<T: Send + 'static>(
    s: &AppState,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = s
        .hashing
        .acquire()
        .await
        .map_err(|_| ApiError::internal("hashing semaphore closed"))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("hashing task: {e}")))
}

fn username_taken() -> ApiError {
    ApiError::field(
        ErrorCode::UsernameTaken,
        "username",
        "this username is taken",
    )
}

async fn create_account(
    State(s): State<AppState>,
    JsonBody(c): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    check_credentials(&c)?;
    let name = c.username.clone();
    let exists =
        s.db.read(move |db| {
            Ok(db
                .query_row("SELECT 1 FROM accounts WHERE username = ?1", [name], |_| {
                    Ok(())
                })
                .optional()?
                .is_some())
        })
        .await?;
    if exists {
        return Err(username_taken());
    }
    let password = c.password;
    let cost = auth::HashCost {
        memory_kib: s.cfg.auth.hash_memory_kib,
        iterations: s.cfg.auth.hash_iterations,
    };
    let hash = hash_off_runtime(&s, move || auth::hash_password(&password, cost)).await??;
    let user = UserId::new_v7();
    let username = c.username;
    let token = s
        .db
        .write(move |db| {
            let tx = db.savepoint()?;
            let inserted = tx.execute(
                "INSERT INTO accounts(user_id, username, password_hash, created_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT(username) DO NOTHING",
                params![user.to_hex(), username, hash, now_ms()],
            )?;
            if inserted == 0 {
                return Err(username_taken());
            }
            let token = auth::create_session(&tx, user)?;
            tx.commit()?;
            Ok(token)
        })
        .await?;
    Ok(created(json!({ "user_id": user.to_hex(), "token": token })))
}

/// A valid argon2id hash of a random password, verified against when the username is unknown
/// so that a wrong username costs the same time as a wrong password.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$3p/fMjIUasW5ZKh4hTnazUvUdtLbhAcGaLDzCXfsddw";

async fn login(
    State(s): State<AppState>,
    JsonBody(c): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    let wrong = || ApiError::new(ErrorCode::Unauthorized, "wrong username or password");
    let name = c.username.clone();
    let row: Option<(String, String)> = s
        .db
        .read(move |db| {
            Ok(db
                .query_row(
                    "SELECT user_id, password_hash FROM accounts WHERE username = ?1 AND withdrawn_ms IS NULL",
                    [name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?)
        })
        .await?;
    let stored = row
        .as_ref()
        .map(|r| r.1.clone())
        .unwrap_or_else(|| DUMMY_HASH.to_owned());
    let password = c.password;
    let ok = hash_off_runtime(&s, move || auth::verify_password(&password, &stored)).await?;
    let Some((user, _)) = row.filter(|_| ok) else {
        return Err(wrong());
    };
    let user: UserId = user
        .parse()
        .map_err(|_| ApiError::internal("stored user id"))?;
    let token = s.db.write(move |db| auth::create_session(db, user)).await?;
    Ok(axum::Json(json!({ "user_id": user.to_hex(), "token": token })).into_response())
}

async fn logout(State(s): State<AppState>, caller: Caller) -> Result<StatusCode, ApiError> {
    s.db.write(move |db| {
        db.execute(
            "DELETE FROM sessions WHERE token_hash = ?1",
            [caller.token_hash],
        )?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(State(s): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let user = caller.user_id;
    let body =
        s.db.read(move |db| {
            let username: String = db.query_row(
                "SELECT username FROM accounts WHERE user_id = ?1",
                [user.to_hex()],
                |r| r.get(0),
            )?;
            let profile = profiles::load(db, user)?.map(|(v, _)| v);
            Ok(json!({
                "user_id": user.to_hex(),
                "username": username,
                "points": ledger::available(db, user)?,
                "profile": profile,
            }))
        })
        .await?;
    Ok(axum::Json(body).into_response())
}

async fn withdraw(State(s): State<AppState>, caller: Caller) -> Result<StatusCode, ApiError> {
    crate::erasure::withdraw(&s.db, caller.user_id).await?;
    s.outbox_wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

async fn put_profile(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(input): JsonBody<ProfileInput>,
) -> Result<Response, ApiError> {
    let profile = input.validate()?;
    let user = caller.user_id;
    let max_picked = s.cfg.matching.max_picked;
    let view =
        s.db.write(move |db| {
            let tx = db.savepoint()?;
            let view = profiles::upsert(&tx, user, &profile, max_picked)?;
            tx.commit()?;
            Ok(view)
        })
        .await?;
    s.outbox_wake.notify_one();
    Ok(axum::Json(view).into_response())
}

/// `POST /api/v1/matches`'s body; every field defaults to "no preference".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchInput {
    #[serde(default = "any_age")]
    age: AgePreference,
    #[serde(default)]
    mbti: MbtiPreference,
    #[serde(default = "any_hobby")]
    hobby: HobbyPreference,
    #[serde(default = "any_contact")]
    contact_frequency: ContactPreference,
    #[serde(default)]
    exclude_same_major: bool,
    #[serde(default)]
    important: Important,
}

fn any_age() -> AgePreference {
    AgePreference::Any
}
fn any_hobby() -> HobbyPreference {
    HobbyPreference::Any
}
fn any_contact() -> ContactPreference {
    ContactPreference::Any
}

async fn create_match(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = matching::validate_key(
        headers
            .get("idempotency-key")
            .map(|v| v.to_str().unwrap_or("\u{0}")),
    )?;
    if body.len() > s.cfg.http.max_body_bytes {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            "request body too large",
        ));
    }
    let m: MatchInput = parse_json(&body)?;
    let options = MatchOptions {
        age: m.age,
        mbti: m.mbti,
        hobby: m.hobby,
        contact_frequency: m.contact_frequency,
        exclude_same_major: m.exclude_same_major,
        important: m.important,
    }
    .validate()?;
    let stored = s.matcher.request(caller.user_id, key, options).await?;
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok((status, axum::Json(stored.body)).into_response())
}

async fn list_matches(State(s): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let user = caller.user_id;
    let body = s.db.read(move |db| matching::list(db, user)).await?;
    Ok(axum::Json(body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantInput {
    user_id: UserId,
    amount: i64,
    reason: String,
}

async fn grant_points(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(g): JsonBody<GrantInput>,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    if !(1..=1_000_000).contains(&g.amount) {
        return Err(ApiError::validation(
            "amount",
            "must be between 1 and 1000000",
        ));
    }
    let reason = g.reason.trim().to_owned();
    if reason.is_empty() || reason.chars().count() > 200 || reason.chars().any(char::is_control) {
        return Err(ApiError::validation(
            "reason",
            "must be 1 to 200 printable characters",
        ));
    }
    let body = s
        .db
        .write(move |db| {
            let tx = db.savepoint()?;
            let exists: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM accounts WHERE user_id = ?1 AND withdrawn_ms IS NULL)",
                [g.user_id.to_hex()],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(ApiError::field(ErrorCode::NotFound, "user_id", "no such user"));
            }
            let (entry_id, _) = ledger::grant(&tx, g.user_id, g.amount as u64, &reason)?;
            let points = ledger::available(&tx, g.user_id)?;
            tx.commit()?;
            tracing::info!(operator = %caller.user_id, user = %g.user_id, amount = g.amount, "points granted");
            Ok(json!({ "entry_id": entry_id, "points": points }))
        })
        .await?;
    Ok(created(body))
}

async fn stats(State(s): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let body = s
        .db
        .read(|db| {
            let n = |sql: &str| -> Result<i64, ApiError> { Ok(db.query_row(sql, [], |r| r.get(0))?) };
            Ok(json!({
                "users": n("SELECT COUNT(*) FROM accounts WHERE withdrawn_ms IS NULL")?,
                "profiles": n("SELECT COUNT(*) FROM profiles p JOIN accounts a ON a.user_id = p.user_id WHERE a.withdrawn_ms IS NULL")?,
                "matches": n("SELECT COUNT(*) FROM matches")?,
                "open_holds": ledger::open_holds(db)?,
                "points_granted": n("SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE kind = 'grant'")?,
                "points_spent": n("SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE kind = 'charge'")?,
                "outbox_lag": outbox::lag(db)?,
            }))
        })
        .await?;
    Ok(axum::Json(body).into_response())
}

async fn appliances(State(s): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let body = s.db.read(crate::control::appliances_json).await?;
    Ok(axum::Json(body).into_response())
}

async fn healthz(State(s): State<AppState>) -> Result<Response, ApiError> {
    s.db.read(|db| Ok(db.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
        .await?;
    Ok(axum::Json(json!({ "status": "ok" })).into_response())
}

async fn readyz(State(s): State<AppState>) -> Response {
    let db_ok =
        s.db.read(|db| Ok(db.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
            .await
            .is_ok();
    let broker = s.rpc.connected();
    let node = if broker { s.rpc.broker_node() } else { None };
    let status = if db_ok && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({ "database": db_ok, "broker": broker, "broker_node": node })),
    )
        .into_response()
}

async fn metrics(State(s): State<AppState>) -> Result<Response, ApiError> {
    let (holds, lag) =
        s.db.read(|db| Ok((ledger::open_holds(db)?, outbox::lag(db)?)))
            .await?;
    let text = s.metrics.render(&[
        (
            "comatching_open_holds",
            "Holds reserved and not yet settled.",
            holds as f64,
        ),
        (
            "comatching_outbox_lag",
            "Outbox rows not yet confirmed by the broker.",
            lag as f64,
        ),
        (
            "comatching_broker_connected",
            "1 when the relay has a broker session.",
            if s.rpc.connected() { 1.0 } else { 0.0 },
        ),
        (
            "comatching_stray_replies",
            "Match replies nobody was waiting for (late or duplicate).",
            s.rpc
                .stray_replies
                .load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
        (
            "comatching_unauthenticated_messages",
            "Messages refused because their link-key tag was missing or wrong.",
            s.rpc.refused_messages() as f64,
        ),
    ]);
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse_json::<ProfileInput>(br#"{"nickname":"a","gender":"female","age":17}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("age"));
        assert!(e.message.contains("between 19 and 40"), "{}", e.message);
        let e = parse_json::<Credentials>(br#"{"username":"abc"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("password"));
        let e = parse_json::<Credentials>(b"not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationFailed);
    }

    #[test]
    fn the_dummy_hash_is_a_real_hash() {
        assert!(!auth::verify_password("anything at all", DUMMY_HASH));
        assert!(argon2::password_hash::phc::PasswordHash::new(DUMMY_HASH).is_ok());
    }
}
