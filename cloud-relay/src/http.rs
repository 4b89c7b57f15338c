//! The HTTP API: routes, request parsing at the boundary, and the glue from handlers to the
//! ledger, profiles and match flow. Handlers stay thin: parse → one call → respond.
//!
//! Every body is read through `JsonBody`, which enforces the size limit (413) and turns serde's
//! errors into `validation_failed` with the offending field's path.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use comatching_protocol::{
    AgePreference, ContactPreference, HobbyPreference, Important, MatchOptions, MbtiPreference,
    UserId,
};
use rusqlite::{OptionalExtension, params};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{self, Caller, Operator};
use crate::config::Config;
use crate::db::{Db, now_ms};
use crate::error::{ApiError, ErrorCode};
use crate::limits::RateLimits;
use crate::matching::{self, Matcher};
use crate::metrics::Metrics;
use crate::openapi::error_set;
use crate::profiles::{self, ProfileInput, ProfileView};
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
    pub events: Arc<crate::events::Hub>,
}

/// Every route, each with its OpenAPI operation (see `openapi`). Stateless: the document is
/// built from this without a running relay.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(<crate::openapi::ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(create_account))
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(me, withdraw))
        .routes(routes!(change_password))
        .routes(routes!(put_profile))
        .routes(routes!(create_match, list_matches))
        .routes(routes!(grant_points))
        .routes(routes!(stats))
        .routes(routes!(appliances))
        .routes(routes!(openapi_json))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .merge(crate::booth::routes())
}

/// The served router. Layers, outermost first: preflight finishing, `nosniff`, CORS (so every
/// answer below it, 413/429/5xx included, carries CORS headers), `no-store` on the API, then
/// counting and the per-IP limit.
pub fn router(state: AppState) -> Router {
    let (routes, _doc) = api_router().split_for_parts();
    routes
        .merge(crate::console::router())
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorCode::MethodNotAllowed, "this path has no such method")
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_and_limit,
        ))
        .layer(middleware::from_fn(no_store_on_api))
        .layer(cors(&state.cfg.http.cors_allowed_origins))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(middleware::from_fn(finish_preflight))
        .with_state(state)
}

/// Request headers a browser may send cross-origin.
pub const CORS_ALLOWED_HEADERS: [&str; 4] = [
    "authorization",
    "content-type",
    "idempotency-key",
    "last-event-id",
];

/// CORS for exactly the configured origins (checked at config load); no credentials (bearer
/// tokens, no cookies), so no `Access-Control-Allow-Credentials`.
fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers(CORS_ALLOWED_HEADERS.map(HeaderName::from_static))
        .max_age(Duration::from_secs(600))
}

/// `CorsLayer` answers every `OPTIONS` itself with an empty 200 and lists the allowed methods
/// and headers whatever the origin. A preflight answers 204; one from an origin not on the list
/// gets no `access-control-*` header at all (the browser then refuses the call).
async fn finish_preflight(req: Request, next: Next) -> Response {
    let preflight = req.method() == Method::OPTIONS;
    let mut resp = next.run(req).await;
    if preflight {
        let h = resp.headers_mut();
        if !h.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
            let cors: Vec<HeaderName> = h
                .keys()
                .filter(|k| k.as_str().starts_with("access-control-"))
                .cloned()
                .collect();
            for k in cors {
                h.remove(k);
            }
        }
        if resp.status() == StatusCode::OK {
            *resp.status_mut() = StatusCode::NO_CONTENT;
        }
    }
    resp
}

/// API answers are per-caller: no cache may keep them.
async fn no_store_on_api(req: Request, next: Next) -> Response {
    let api = req.uri().path().starts_with("/api/");
    let mut resp = next.run(req).await;
    if api {
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// Counts every response by route and status, and applies the address limits (src/limits.rs).
async fn count_and_limit(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let limited = peer.and_then(|peer| {
        let client = s.limits.client_ip(peer, req.headers());
        s.limits.check_request(client, req.method(), &route).err()
    });
    let resp = match limited {
        Some(e) => e.into_response(),
        None => next.run(req).await,
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
        // One deadline for the whole body: a client trickling bytes cannot stretch it.
        let deadline = std::time::Duration::from_millis(s.cfg.http.body_timeout_ms);
        let bytes: Bytes =
            tokio::time::timeout(deadline, axum::body::to_bytes(req.into_body(), limit))
                .await
                .map_err(|_| {
                    ApiError::new(
                        ErrorCode::RequestTimeout,
                        format!(
                            "the request body did not arrive within {} ms",
                            deadline.as_millis()
                        ),
                    )
                })?
                .map_err(|_| too_large())?;
        Ok(JsonBody(parse_json(&bytes)?))
    }
}

fn created<T: Serialize>(body: T) -> Response {
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

error_set!(AccountErrors: ValidationFailed, UsernameTaken, PayloadTooLarge, RateLimited, Internal);
error_set!(LoginErrors: ValidationFailed, Unauthorized, PayloadTooLarge, RateLimited, Internal);
error_set!(AuthedErrors: Unauthorized, RateLimited, Internal);
error_set!(AuthedBodyErrors: ValidationFailed, Unauthorized, PayloadTooLarge, RateLimited, Internal);
error_set!(PasswordErrors: ValidationFailed, Unauthorized, WrongPassword, PayloadTooLarge, RateLimited, Internal);
error_set!(MatchErrors: ValidationFailed, Unauthorized, InsufficientPoints, NoCandidate,
    IdempotencyInProgress, IdempotencyKeyReused, PayloadTooLarge, RateLimited, MatcherUnavailable, Internal);
error_set!(AdminErrors: Unauthorized, Forbidden, RateLimited, Internal);
error_set!(StatsErrors: ValidationFailed, Unauthorized, Forbidden, RateLimited, Internal);
error_set!(GrantErrors: ValidationFailed, Unauthorized, Forbidden, NotFound, PayloadTooLarge, RateLimited, Internal);
error_set!(PublicErrors: RateLimited);
error_set!(ServiceErrors: Internal);

/// A username and password: account creation and login.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Credentials {
    #[schema(pattern = "^[a-z0-9_]{3,32}$")]
    username: String,
    /// 10 to 128 characters.
    password: String,
}

/// A new session (account creation, login).
#[derive(Serialize, ToSchema)]
struct Session {
    user_id: UserId,
    /// The bearer token for `Authorization: Bearer TOKEN`; shown once, stored only hashed.
    token: String,
}

fn check_username(u: &str) -> Result<(), ApiError> {
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
    Ok(())
}

/// The one password rule, for new accounts and password changes alike.
fn check_password(field: &str, password: &str) -> Result<(), ApiError> {
    let n = password.chars().count();
    if !(10..=128).contains(&n) {
        return Err(ApiError::validation(field, "must be 10 to 128 characters"));
    }
    Ok(())
}

fn check_credentials(c: &Credentials) -> Result<(), ApiError> {
    check_username(&c.username)?;
    check_password("password", &c.password)
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

fn hash_cost(s: &AppState) -> auth::HashCost {
    auth::HashCost {
        memory_kib: s.cfg.auth.hash_memory_kib,
        iterations: s.cfg.auth.hash_iterations,
    }
}

fn username_taken() -> ApiError {
    ApiError::field(
        ErrorCode::UsernameTaken,
        "username",
        "this username is taken",
    )
}

/// Create an account; answers with a session for it.
#[utoipa::path(post, path = "/api/v1/accounts", tag = "accounts",
    request_body = Credentials,
    responses((status = 201, description = "Created and logged in", body = Session), AccountErrors))]
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
    let cost = hash_cost(&s);
    let hash = hash_off_runtime(&s, move || auth::hash_password(&password, cost)).await??;
    let user = UserId::new_v7();
    let username = c.username;
    let ttl = s.cfg.session_ttl_ms();
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
            let token = auth::create_session(&tx, user, ttl)?;
            tx.commit()?;
            Ok(token)
        })
        .await?;
    Ok(created(Session {
        user_id: user,
        token,
    }))
}

/// A valid argon2id hash of a random password, verified against when the username is unknown
/// so that a wrong username costs the same time as a wrong password.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$3p/fMjIUasW5ZKh4hTnazUvUdtLbhAcGaLDzCXfsddw";

/// Log in: a new session (other sessions stay).
#[utoipa::path(post, path = "/api/v1/sessions", tag = "accounts",
    request_body = Credentials,
    responses((status = 200, description = "Logged in", body = Session), LoginErrors))]
async fn login(
    State(s): State<AppState>,
    JsonBody(c): JsonBody<Credentials>,
) -> Result<Response, ApiError> {
    let wrong = || ApiError::new(ErrorCode::Unauthorized, "wrong username or password");
    s.limits.check_login(&c.username)?;
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
    let ttl = s.cfg.session_ttl_ms();
    let token =
        s.db.write(move |db| auth::create_session(db, user, ttl))
            .await?;
    Ok(axum::Json(Session {
        user_id: user,
        token,
    })
    .into_response())
}

/// Log out: ends this session only.
#[utoipa::path(delete, path = "/api/v1/sessions/current", tag = "accounts",
    security(("bearer" = [])),
    responses((status = 204, description = "Logged out"), AuthedErrors))]
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

/// `PUT /api/v1/me/password`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PasswordChange {
    /// The password now in use.
    current: String,
    /// 10 to 128 characters.
    new: String,
}

/// Change the password. Every other session of the account ends; this one stays.
#[utoipa::path(put, path = "/api/v1/me/password", tag = "accounts",
    security(("bearer" = [])),
    request_body = PasswordChange,
    responses((status = 204, description = "Changed; other sessions ended"), PasswordErrors))]
async fn change_password(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(p): JsonBody<PasswordChange>,
) -> Result<StatusCode, ApiError> {
    check_password("new", &p.new)?;
    let user = caller.user_id;
    let stored: String =
        s.db.read(move |db| {
            Ok(db.query_row(
                "SELECT password_hash FROM accounts WHERE user_id = ?1",
                [user.to_hex()],
                |r| r.get(0),
            )?)
        })
        .await?;
    let wrong = || {
        ApiError::field(
            ErrorCode::WrongPassword,
            "current",
            "the current password is wrong",
        )
    };
    let (current, old_hash) = (p.current, stored.clone());
    if !hash_off_runtime(&s, move || auth::verify_password(&current, &old_hash)).await? {
        return Err(wrong());
    }
    let (new, cost) = (p.new, hash_cost(&s));
    let new_hash = hash_off_runtime(&s, move || auth::hash_password(&new, cost)).await??;
    let keep = caller.token_hash;
    s.db.write(move |db| {
        let tx = db.savepoint()?;
        // Compare-and-swap on the hash the current password was checked against: of two
        // concurrent changes one wins, the other finds the hash moved and is refused.
        let swapped = tx.execute(
            "UPDATE accounts SET password_hash = ?3 WHERE user_id = ?1 AND password_hash = ?2",
            params![user.to_hex(), stored, new_hash],
        )?;
        if swapped == 0 {
            return Err(wrong());
        }
        tx.execute(
            "DELETE FROM sessions WHERE user_id = ?1 AND token_hash <> ?2",
            params![user.to_hex(), keep],
        )?;
        tx.commit()?;
        Ok(())
    })
    .await?;
    tracing::info!(user = %user, "password changed; other sessions ended");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/me`.
#[derive(Serialize, ToSchema)]
struct Me {
    user_id: UserId,
    username: String,
    /// Points available (grants minus charges and open holds).
    points: i64,
    /// Null until `PUT /api/v1/me/profile`.
    #[schema(required = true)]
    profile: Option<ProfileView>,
}

/// The caller's account, balance and profile.
#[utoipa::path(get, path = "/api/v1/me", tag = "profile",
    security(("bearer" = [])),
    responses((status = 200, description = "The caller", body = Me), AuthedErrors))]
async fn me(State(s): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let user = caller.user_id;
    let body =
        s.db.read(move |db| {
            let username: String = db.query_row(
                "SELECT username FROM accounts WHERE user_id = ?1",
                [user.to_hex()],
                |r| r.get(0),
            )?;
            Ok(Me {
                user_id: user,
                username,
                points: ledger::available(db, user)?,
                profile: profiles::load(db, user)?.map(|(v, _)| v),
            })
        })
        .await?;
    Ok(axum::Json(body).into_response())
}

/// Withdraw: the account ends and its personal data is erased.
#[utoipa::path(delete, path = "/api/v1/me", tag = "profile",
    security(("bearer" = [])),
    responses((status = 204, description = "Withdrawn"), AuthedErrors))]
async fn withdraw(State(s): State<AppState>, caller: Caller) -> Result<StatusCode, ApiError> {
    crate::erasure::withdraw(&s.db, caller.user_id).await?;
    s.outbox_wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// Create or replace the caller's profile (it joins the matchable pool).
#[utoipa::path(put, path = "/api/v1/me/profile", tag = "profile",
    security(("bearer" = [])),
    request_body = ProfileInput,
    responses((status = 200, description = "The stored profile", body = ProfileView), AuthedBodyErrors))]
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

/// `POST /api/v1/matches`' body; every field defaults to "no preference".
#[derive(Deserialize, ToSchema)]
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
    /// Costs `points.exclude_same_major` more.
    #[serde(default)]
    exclude_same_major: bool,
    /// Must name a preference that is set; costs `points.important` more (refunded if relaxed).
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

/// When the request reached its handler's extractors: the start of a match's stages. Taken
/// first, so the session lookup after it is measured too.
struct Arrived(std::time::Instant);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Arrived {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        _: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Arrived(std::time::Instant::now()))
    }
}

/// Request a match. Idempotent per `Idempotency-Key`: the same key and body replay the first
/// answer (whatever its status); points are reserved, then charged or given back.
#[utoipa::path(post, path = "/api/v1/matches", tag = "matches",
    security(("bearer" = [])),
    params(("Idempotency-Key" = String, Header,
        description = "1 to 64 printable ASCII characters, unique per intended match")),
    request_body = MatchInput,
    responses((status = 201, description = "Matched", body = matching::MatchCreated), MatchErrors))]
async fn create_match(
    arrived: Arrived,
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    s.metrics.stages.auth.observe(arrived.0.elapsed());
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
    let stored = s
        .matcher
        .request(arrived.0, caller.user_id, key, options)
        .await?;
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok((status, axum::Json(stored.body)).into_response())
}

/// The caller's matches, newest first.
#[utoipa::path(get, path = "/api/v1/matches", tag = "matches",
    security(("bearer" = [])),
    responses((status = 200, description = "Match history", body = matching::MatchList), AuthedErrors))]
async fn list_matches(State(s): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    let user = caller.user_id;
    let body = s.db.read(move |db| matching::list(db, user)).await?;
    Ok(axum::Json(body).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct GrantInput {
    /// Exactly one of `user_id` and `username` names the student.
    #[serde(default)]
    user_id: Option<UserId>,
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9_]{3,32}$")]
    username: Option<String>,
    /// 1 to 1,000,000.
    amount: i64,
    /// 1 to 200 printable characters after trimming (no control or bidi-control ones).
    reason: String,
}

#[derive(Serialize, ToSchema)]
struct Granted {
    /// The ledger entry written.
    entry_id: i64,
    /// The student credited (32 hex digits).
    user_id: String,
    /// The user's balance afterwards.
    points: i64,
}

/// Grant points to a user (operators).
#[utoipa::path(post, path = "/api/v1/admin/points", tag = "admin",
    security(("bearer" = [])),
    request_body = GrantInput,
    responses((status = 201, description = "Granted", body = Granted), GrantErrors))]
async fn grant_points(
    State(s): State<AppState>,
    Operator(caller): Operator,
    JsonBody(g): JsonBody<GrantInput>,
) -> Result<Response, ApiError> {
    if !(1..=1_000_000).contains(&g.amount) {
        return Err(ApiError::validation(
            "amount",
            "must be between 1 and 1000000",
        ));
    }
    // The student reads it in their ledger: the charge-rejection rule (1 to 200 characters,
    // no control or bidi-control ones).
    let reason = crate::charges::reason(&g.reason)?;
    // A name no account can have is malformed, not unknown.
    if let Some(name) = &g.username {
        check_username(name)?;
    }
    let operator = caller.user_id;
    let (body, wake) =
        s.db.write(move |db| {
            let tx = db.savepoint()?;
            let user = crate::booth::resolve_user(&tx, g.user_id, g.username.as_deref())?;
            let source = ledger::GrantSource {
                operator: Some(operator),
                charge_id: None,
            };
            let (entry_id, _) = ledger::grant_from(&tx, user, g.amount as u64, &reason, source)?;
            let points = ledger::available(&tx, user)?;
            let wake = crate::charges::points_changed(&tx, user, points)?;
            tx.commit()?;
            tracing::info!(operator = %operator, user = %user, amount = g.amount, "points granted");
            Ok((
                Granted {
                    entry_id,
                    user_id: user.to_hex(),
                    points,
                },
                wake,
            ))
        })
        .await?;
    s.events.notify(&[wake]);
    Ok(created(body))
}

/// `GET /api/v1/admin/stats`.
#[derive(Serialize, ToSchema)]
struct Stats {
    users: i64,
    profiles: i64,
    matches: i64,
    open_holds: i64,
    points_granted: i64,
    points_spent: i64,
    /// Outbox rows not yet confirmed by the broker.
    outbox_lag: u64,
    /// With `?since_ms=`: matches made at or after that time (the booth console asks for its
    /// local midnight: "matches today").
    #[serde(skip_serializing_if = "Option::is_none")]
    matches_since: Option<i64>,
}

/// `?since_ms=` of the stats.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    since_ms: Option<i64>,
}

/// Counts for the festival's operators.
#[utoipa::path(get, path = "/api/v1/admin/stats", tag = "admin",
    security(("bearer" = [])),
    params(("since_ms" = Option<i64>, Query,
        description = "also count `matches_since`: matches made at or after this time (ms since 1970, 0 or more)")),
    responses((status = 200, description = "Counts", body = Stats), StatsErrors))]
async fn stats(
    State(s): State<AppState>,
    _: Operator,
    q: Result<axum::extract::Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let since = q
        .map_err(|_| {
            ApiError::validation("since_ms", "must be milliseconds since 1970, 0 or more")
        })?
        .0
        .since_ms;
    if since.is_some_and(|ms| ms < 0) {
        return Err(ApiError::validation(
            "since_ms",
            "must be milliseconds since 1970, 0 or more",
        ));
    }
    let body = s
        .db
        .read(move |db| {
            let n = |sql: &str| -> Result<i64, ApiError> { Ok(db.query_row(sql, [], |r| r.get(0))?) };
            let matches_since = since
                .map(|ms| {
                    db.query_row(
                        "SELECT COUNT(*) FROM matches WHERE created_ms >= ?1",
                        [ms],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .transpose()?;
            Ok(Stats {
                users: n("SELECT COUNT(*) FROM accounts WHERE withdrawn_ms IS NULL")?,
                profiles: n("SELECT COUNT(*) FROM profiles p JOIN accounts a ON a.user_id = p.user_id WHERE a.withdrawn_ms IS NULL")?,
                matches: n("SELECT COUNT(*) FROM matches")?,
                open_holds: ledger::open_holds(db)?,
                points_granted: n("SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE kind = 'grant'")?,
                points_spent: n("SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE kind = 'charge'")?,
                outbox_lag: outbox::lag(db)?,
                matches_since,
            })
        })
        .await?;
    Ok(axum::Json(body).into_response())
}

/// Each appliance's replica position next to the relay's.
#[utoipa::path(get, path = "/api/v1/admin/appliances", tag = "admin",
    security(("bearer" = [])),
    responses((status = 200, description = "Replica positions", body = crate::control::ApplianceList), AdminErrors))]
async fn appliances(State(s): State<AppState>, _: Operator) -> Result<Response, ApiError> {
    let body = s.db.read(crate::control::appliances_json).await?;
    Ok(axum::Json(body).into_response())
}

/// This document (OpenAPI 3.1), no authentication.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "service",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json",
        body = Object), PublicErrors))]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document_json(),
    )
        .into_response()
}

#[derive(Serialize, ToSchema)]
struct Health {
    /// Always "ok".
    status: String,
}

/// Liveness: the process answers and its database reads.
#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, description = "Alive", body = Health), ServiceErrors))]
async fn healthz(State(s): State<AppState>) -> Result<Response, ApiError> {
    s.db.read(|db| Ok(db.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
        .await?;
    Ok(axum::Json(Health {
        status: "ok".to_owned(),
    })
    .into_response())
}

#[derive(Serialize, ToSchema)]
struct Ready {
    database: bool,
    broker: bool,
    /// The broker node in use (`host:port`, one of `broker.url`); null while disconnected.
    #[schema(example = "rabbit-1.internal:5672")]
    broker_node: Option<String>,
}

/// Readiness: the database reads and the broker session is up.
#[utoipa::path(get, path = "/readyz", tag = "service",
    responses((status = 200, description = "Ready", body = Ready),
        (status = 503, description = "Not ready (which part is down)", body = Ready)))]
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
        axum::Json(Ready {
            database: db_ok,
            broker,
            broker_node: node,
        }),
    )
        .into_response()
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Metrics", content_type = "text/plain", body = String), ServiceErrors))]
async fn metrics(State(s): State<AppState>) -> Result<Response, ApiError> {
    let (holds, lag) =
        s.db.read(|db| Ok((ledger::open_holds(db)?, outbox::lag(db)?)))
            .await?;
    let mut text = s.metrics.render(&[
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
            "comatching_sse_streams",
            "Live event streams (SSE) open now.",
            s.events.open_streams() as f64,
        ),
        (
            "comatching_unauthenticated_messages",
            "Messages refused because their link-key tag was missing or wrong.",
            s.rpc.refused_messages() as f64,
        ),
        (
            "comatching_unroutable_hello_answers",
            "Hello answers returned by the broker: the appliance's sync queue did not exist.",
            s.metrics
                .unroutable_hello_answers
                .load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
    ]);
    text.push_str(&s.limits.render_metrics());
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
