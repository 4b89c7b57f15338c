//! The booth's HTTP routes (issue 10 §3): charge requests, their live streams, the student's
//! points history and the operators' user look-up. Handlers stay thin: parse and check at the
//! boundary, one database call (`charges`, `events`), wake the streams after the commit.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use comatching_protocol::UserId;
use rusqlite::{OptionalExtension, params};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Caller, Operator};
use crate::charges::{self, ChargeRules, ChargeStatus, ChargeView, Decided, Decision};
use crate::db::Cached;
use crate::error::{ApiError, ErrorCode};
use crate::events::{self, Who};
use crate::http::{AppState, JsonBody};
use crate::ledger;
use crate::openapi::error_set;

/// Default and largest page sizes.
const PAGE_DEFAULT: usize = 50;
const PAGE_MAX: usize = 100;
/// Most users an operator look-up returns.
const LOOKUP_MAX: usize = 20;

/// The booth's routes with their OpenAPI operations (merged into `http::api_router`).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_charge, my_charges))
        .routes(routes!(cancel_charge))
        .routes(routes!(my_ledger))
        .routes(routes!(my_events))
        .routes(routes!(admin_charges))
        .routes(routes!(admin_events))
        .routes(routes!(approve))
        .routes(routes!(reject))
        .routes(routes!(admin_users))
        .routes(routes!(admin_user_ledger))
}

error_set!(CreateChargeErrors: ValidationFailed, Unauthorized, ChargePending, PayloadTooLarge, RateLimited, Internal);
error_set!(PageErrors: ValidationFailed, Unauthorized, RateLimited, Internal);
error_set!(CancelErrors: Unauthorized, NotFound, ChargeDecided, RateLimited, Internal);
error_set!(StudentStreamErrors: ValidationFailed, Unauthorized, RateLimited, TooManyStreams, Internal);
error_set!(OperatorStreamErrors: ValidationFailed, Unauthorized, Forbidden, RateLimited, TooManyStreams, Internal);
error_set!(OperatorPageErrors: ValidationFailed, Unauthorized, Forbidden, RateLimited, Internal);
error_set!(UserLedgerErrors: ValidationFailed, Unauthorized, Forbidden, NotFound, RateLimited, Internal);
error_set!(ApproveErrors: Unauthorized, Forbidden, NotFound, ChargeDecided, RateLimited, Internal);
error_set!(RejectErrors: ValidationFailed, Unauthorized, Forbidden, NotFound, ChargeDecided, PayloadTooLarge, RateLimited, Internal);

/// A query string parsed into `T`; a bad one is 400 `validation_failed`.
pub struct Q<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Q(q.0))
            .map_err(|e| ApiError::validation("query", e.body_text()))
    }
}

/// A `{charge_id}` path segment. Anything that is not a charge id is `not_found`, like an id
/// that does not exist.
pub struct ChargeId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ChargeId {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, s: &S) -> Result<Self, ApiError> {
        let nf = || ApiError::new(ErrorCode::NotFound, "no such charge request");
        let Path(id) = Path::<String>::from_request_parts(parts, s)
            .await
            .map_err(|_| nf())?;
        if id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(ChargeId(id))
        } else {
            Err(nf())
        }
    }
}

/// A `{user_id}` path segment, checked by the handler (after the caller is known to be an
/// operator, so a student learns nothing from the shape of an id).
pub struct UserPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for UserPath {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, s: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, s)
            .await
            .map_err(|_| ApiError::validation("user_id", "must be 32 lowercase hex characters"))?;
        Ok(UserPath(id))
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChargeInput {
    /// Points wanted: within `[charges]` min..=max, a multiple of its step.
    pub amount: i64,
    /// The name on the bank transfer or booth receipt: 1 to 40 printable characters, trimmed.
    pub depositor: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectInput {
    /// Shown to the student: 1 to 200 printable characters after trimming (no control or
    /// bidi-control ones).
    pub reason: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1 to 100 (default 50).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<usize>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AdminChargesQuery {
    /// Default `pending` (oldest first); the others list newest first.
    #[param(value_type = Option<ChargeStatus>)]
    pub status: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1 to 100 (default 50).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<usize>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsersQuery {
    /// The start of a username: 1 to 32 of a-z, 0-9 and _.
    pub q: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChargePage {
    pub charges: Vec<ChargeView>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerEntry {
    pub entry_id: i64,
    /// `grant` (points in) or `match` (points spent on a match, net of its refund).
    #[schema(value_type = String, pattern = "^(grant|match)$")]
    pub kind: &'static str,
    /// Signed: positive for a grant, negative for a match.
    pub amount: i64,
    /// The ledger balance right after this entry.
    pub balance_after: i64,
    pub created_at: String,
    pub created_at_unix_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub charge_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub match_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refunded: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerPage {
    pub entries: Vec<LedgerEntry>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserSummary {
    #[schema(value_type = UserId)]
    pub user_id: String,
    pub username: String,
    pub points: i64,
    #[schema(required = true)]
    pub pending_charge: Option<ChargeView>,
    pub matches: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsersPage {
    pub users: Vec<UserSummary>,
}

fn limit_of(l: Option<usize>) -> Result<usize, ApiError> {
    match l {
        None => Ok(PAGE_DEFAULT),
        Some(n) if (1..=PAGE_MAX).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::validation(
            "limit",
            format!("must be 1 to {PAGE_MAX}"),
        )),
    }
}

fn charge_cursor(c: Option<String>) -> Result<Option<String>, ApiError> {
    match c {
        None => Ok(None),
        Some(c) if c.len() == 32 && c.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(Some(c)),
        Some(_) => Err(ApiError::validation(
            "cursor",
            "not a cursor from this list",
        )),
    }
}

/// File a charge request (at most one pending per student).
#[utoipa::path(post, path = "/api/v1/me/charges", tag = "charges",
    security(("bearer" = [])),
    request_body = ChargeInput,
    responses((status = 201, description = "Filed, pending", body = ChargeView), CreateChargeErrors))]
async fn create_charge(
    State(s): State<AppState>,
    caller: Caller,
    JsonBody(input): JsonBody<ChargeInput>,
) -> Result<Response, ApiError> {
    let amount = ChargeRules::from(&s.cfg.charges).amount(input.amount)?;
    let depositor = charges::depositor(&input.depositor)?;
    let user = caller.user_id;
    let done =
        s.db.write(move |c| {
            let sp = c.savepoint()?;
            let done = charges::create(&sp, user, amount, &depositor)?;
            sp.commit()?;
            Ok(done)
        })
        .await?;
    s.events.notify(&done.wakes);
    Ok((StatusCode::CREATED, axum::Json(done.value)).into_response())
}

/// The caller's charge requests, newest first.
#[utoipa::path(get, path = "/api/v1/me/charges", tag = "charges",
    security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, description = "A page of requests", body = ChargePage), PageErrors))]
async fn my_charges(
    State(s): State<AppState>,
    caller: Caller,
    Q(q): Q<PageQuery>,
) -> Result<axum::Json<ChargePage>, ApiError> {
    let limit = limit_of(q.limit)?;
    let cursor = charge_cursor(q.cursor)?;
    let user = caller.user_id;
    let (charges, next_cursor) =
        s.db.read(move |c| charges::page(c, Some(user), None, cursor.as_deref(), limit))
            .await?;
    Ok(axum::Json(ChargePage {
        charges,
        next_cursor,
    }))
}

async fn decide(
    s: &AppState,
    actor: UserId,
    id: String,
    d: Decision,
    reason: Option<String>,
) -> Result<Decided, ApiError> {
    let done =
        s.db.write(move |c| {
            let sp = c.savepoint()?;
            let done = charges::decide(&sp, actor, &id, d, reason.as_deref())?;
            sp.commit()?;
            Ok(done)
        })
        .await?;
    s.events.notify(&done.wakes);
    Ok(done.value)
}

/// Cancel one's own pending request (another student's id is 404).
#[utoipa::path(delete, path = "/api/v1/me/charges/{charge_id}", tag = "charges",
    security(("bearer" = [])),
    params(("charge_id" = String, Path, description = "32 hex characters")),
    responses((status = 200, description = "Cancelled", body = Decided), CancelErrors))]
async fn cancel_charge(
    State(s): State<AppState>,
    caller: Caller,
    ChargeId(id): ChargeId,
) -> Result<axum::Json<Decided>, ApiError> {
    Ok(axum::Json(
        decide(&s, caller.user_id, id, Decision::Cancel, None).await?,
    ))
}

/// Approve a pending request: credits its points once, in the same transaction (operators).
#[utoipa::path(post, path = "/api/v1/admin/charges/{charge_id}/approve", tag = "admin",
    security(("bearer" = [])),
    params(("charge_id" = String, Path, description = "32 hex characters")),
    responses((status = 200, description = "Approved; `points` is the student's new balance", body = Decided), ApproveErrors))]
async fn approve(
    State(s): State<AppState>,
    Operator(caller): Operator,
    ChargeId(id): ChargeId,
) -> Result<axum::Json<Decided>, ApiError> {
    let done = decide(&s, caller.user_id, id, Decision::Approve, None).await?;
    tracing::info!(operator = %caller.user_id, charge = %done.charge.charge_id, amount = done.charge.amount, "charge approved");
    Ok(axum::Json(done))
}

/// Reject a pending request with a reason (operators).
#[utoipa::path(post, path = "/api/v1/admin/charges/{charge_id}/reject", tag = "admin",
    security(("bearer" = [])),
    params(("charge_id" = String, Path, description = "32 hex characters")),
    request_body = RejectInput,
    responses((status = 200, description = "Rejected", body = Decided), RejectErrors))]
async fn reject(
    State(s): State<AppState>,
    Operator(caller): Operator,
    ChargeId(id): ChargeId,
    JsonBody(input): JsonBody<RejectInput>,
) -> Result<axum::Json<Decided>, ApiError> {
    let reason = charges::reason(&input.reason)?;
    Ok(axum::Json(
        decide(&s, caller.user_id, id, Decision::Reject, Some(reason)).await?,
    ))
}

/// Charge requests by status: pending oldest first, the others newest first (operators).
#[utoipa::path(get, path = "/api/v1/admin/charges", tag = "admin",
    security(("bearer" = [])),
    params(AdminChargesQuery),
    responses((status = 200, description = "A page of requests", body = ChargePage), OperatorPageErrors))]
async fn admin_charges(
    State(s): State<AppState>,
    _: Operator,
    Q(q): Q<AdminChargesQuery>,
) -> Result<axum::Json<ChargePage>, ApiError> {
    let status = match q.status.as_deref() {
        None => ChargeStatus::Pending,
        Some(v) => ChargeStatus::parse(v).ok_or_else(|| {
            ApiError::validation("status", "must be pending, approved, rejected or cancelled")
        })?,
    };
    let limit = limit_of(q.limit)?;
    let cursor = charge_cursor(q.cursor)?;
    let (charges, next_cursor) =
        s.db.read(move |c| charges::page(c, None, Some(status), cursor.as_deref(), limit))
            .await?;
    Ok(axum::Json(ChargePage {
        charges,
        next_cursor,
    }))
}

/// The caller's live events: their requests decided, their points changed.
#[utoipa::path(get, path = "/api/v1/me/events", tag = "charges",
    security(("bearer" = [])),
    params(("Last-Event-ID" = Option<String>, Header, description = "The last event id received, to resume")),
    responses((status = 200, description = "Server-Sent Events. First `event: ready`, `data: {\"last_event_id\": n}`; then events with an `id:` (send the last one back as `Last-Event-ID` on reconnect: nothing missed is lost; `event: resync` means reload the lists, older events were pruned); keep-alive comments. Events: `charge.decided` `{charge, points?}`, `charge.cancelled` `{charge}`, `points.changed` `{points}`.", content_type = "text/event-stream", body = String),
        StudentStreamErrors))]
async fn my_events(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last = events::last_event_id(&headers)?;
    Ok(s.events
        .stream(&s.db, Who::User(caller.user_id), last)
        .await?
        .into_response())
}

/// Live charge events for operators: new, decided, cancelled.
#[utoipa::path(get, path = "/api/v1/admin/charges/events", tag = "admin",
    security(("bearer" = [])),
    params(("Last-Event-ID" = Option<String>, Header, description = "The last event id received, to resume")),
    responses((status = 200, description = "Server-Sent Events. First `event: ready`, `data: {\"last_event_id\": n}`; then events with an `id:` (send the last one back as `Last-Event-ID` on reconnect: nothing missed is lost; `event: resync` means reload the lists, older events were pruned); keep-alive comments. Events: `charge.created` `{charge}`, `charge.decided` `{charge}`, `charge.cancelled` `{charge}`.", content_type = "text/event-stream", body = String),
        OperatorStreamErrors))]
async fn admin_events(
    State(s): State<AppState>,
    _: Operator,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let last = events::last_event_id(&headers)?;
    Ok(s.events
        .stream(&s.db, Who::Operators, last)
        .await?
        .into_response())
}

/// The caller's points history, newest first, with the balance after each entry.
#[utoipa::path(get, path = "/api/v1/me/ledger", tag = "charges",
    security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, description = "A page of entries", body = LedgerPage), PageErrors))]
async fn my_ledger(
    State(s): State<AppState>,
    caller: Caller,
    Q(q): Q<PageQuery>,
) -> Result<axum::Json<LedgerPage>, ApiError> {
    let (cursor, limit) = ledger_query(q)?;
    let user = caller.user_id;
    let page =
        s.db.read(move |c| ledger_page(c, user, cursor, limit))
            .await?;
    Ok(axum::Json(page))
}

/// A student's points history as `GET /api/v1/me/ledger` shows it to them (operators).
///
/// Newest first, with the balance after each entry; the console's look-up shows the last five.
/// A user id that is no (or a withdrawn) account is 404.
#[utoipa::path(get, path = "/api/v1/admin/users/{user_id}/ledger", tag = "admin",
    security(("bearer" = [])),
    params(("user_id" = String, Path, description = "32 lowercase hex characters"), PageQuery),
    responses((status = 200, description = "A page of entries", body = LedgerPage), UserLedgerErrors))]
async fn admin_user_ledger(
    State(s): State<AppState>,
    _: Operator,
    UserPath(id): UserPath,
    Q(q): Q<PageQuery>,
) -> Result<axum::Json<LedgerPage>, ApiError> {
    let user: UserId = id.parse()?;
    let (cursor, limit) = ledger_query(q)?;
    let page =
        s.db.read(move |c| {
            let user = resolve_user(c, Some(user), None)?;
            ledger_page(c, user, cursor, limit)
        })
        .await?;
    Ok(axum::Json(page))
}

/// A ledger page's `(before, limit)`: the cursor is the last entry id of the previous page.
fn ledger_query(q: PageQuery) -> Result<(i64, usize), ApiError> {
    let limit = limit_of(q.limit)?;
    let cursor = match q.cursor {
        None => i64::MAX,
        Some(c) => c
            .parse::<i64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| ApiError::validation("cursor", "not a cursor from this list"))?,
    };
    Ok((cursor, limit))
}

/// A student's ledger, newest first, with the balance after each entry (a running sum over
/// their entries in id order: entries are append-only).
fn ledger_page(
    c: &rusqlite::Connection,
    user: UserId,
    before: i64,
    limit: usize,
) -> Result<LedgerPage, ApiError> {
    let mut st = c.prepare_cached(
        "WITH mine AS ( \
           SELECT entry_id, kind, amount, reason, charge_id, hold_id, created_ms, \
                  SUM(CASE kind WHEN 'grant' THEN amount ELSE -amount END) OVER (ORDER BY entry_id) AS after \
           FROM ledger_entries WHERE user_id = ?1) \
         SELECT m.entry_id, m.kind, m.amount, m.reason, m.charge_id, m.created_ms, m.after, \
                x.match_id, x.cost, x.refunded \
         FROM mine m \
         LEFT JOIN match_requests r ON r.user_id = ?1 AND r.hold_id = m.hold_id \
         LEFT JOIN matches x ON x.request_id = r.request_id \
         WHERE m.entry_id < ?2 ORDER BY m.entry_id DESC LIMIT ?3",
    )?;
    let mut entries = st
        .query_map(params![user.to_hex(), before, (limit + 1) as i64], |r| {
            let kind: String = r.get(1)?;
            let amount: i64 = r.get(2)?;
            let created: i64 = r.get(5)?;
            let grant = kind == "grant";
            Ok(LedgerEntry {
                entry_id: r.get(0)?,
                kind: if grant { "grant" } else { "match" },
                amount: if grant { amount } else { -amount },
                balance_after: r.get(6)?,
                created_at: charges::rfc3339(created),
                created_at_unix_ms: created,
                reason: if grant { r.get(3)? } else { None },
                charge_id: r.get(4)?,
                match_id: r.get(7)?,
                cost: r.get(8)?,
                refunded: r.get(9)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|e| e.entry_id.to_string())
    } else {
        None
    };
    Ok(LedgerPage {
        entries,
        next_cursor,
    })
}

/// Users by username prefix (at most 20), with points, pending request and match count (operators).
#[utoipa::path(get, path = "/api/v1/admin/users", tag = "admin",
    security(("bearer" = [])),
    params(UsersQuery),
    responses((status = 200, description = "Matching users", body = UsersPage), OperatorPageErrors))]
async fn admin_users(
    State(s): State<AppState>,
    _: Operator,
    Q(q): Q<UsersQuery>,
) -> Result<axum::Json<UsersPage>, ApiError> {
    let prefix = q.q;
    if prefix.is_empty()
        || prefix.len() > 32
        || !prefix
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
    {
        return Err(ApiError::validation(
            "q",
            "must be 1 to 32 of a-z, 0-9 and _ (the start of a username)",
        ));
    }
    let users = s
        .db
        .read(move |c| {
            // Usernames are [a-z0-9_]; '{' sorts after all of them, so this is a prefix range
            // the username index serves.
            let upper = format!("{prefix}{{");
            let rows: Vec<(String, String, i64)> = {
                let mut st = c.prepare_cached(
                    "SELECT a.user_id, a.username, \
                       (SELECT COUNT(*) FROM matches m WHERE m.requester_id = a.user_id) \
                     FROM accounts a WHERE a.username >= ?1 AND a.username < ?2 AND a.withdrawn_ms IS NULL \
                     ORDER BY a.username LIMIT ?3",
                )?;
                st.query_map(params![prefix, upper, LOOKUP_MAX as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<Result<_, _>>()?
            };
            let mut out = Vec::with_capacity(rows.len());
            for (id, username, matches) in rows {
                let user: UserId = id
                    .parse()
                    .map_err(|_| ApiError::internal("stored user id"))?;
                out.push(UserSummary {
                    points: ledger::available(c, user)?,
                    pending_charge: charges::pending_of(c, user)?,
                    user_id: id,
                    username,
                    matches,
                });
            }
            Ok(out)
        })
        .await?;
    Ok(axum::Json(UsersPage { users }))
}

/// `POST /api/v1/admin/points` names the student by `user_id` or `username`.
pub fn resolve_user(
    c: &rusqlite::Connection,
    user_id: Option<UserId>,
    username: Option<&str>,
) -> Result<UserId, ApiError> {
    let found: Option<String> = match (user_id, username) {
        (Some(u), None) => c
            .row_cached(
                "SELECT user_id FROM accounts WHERE user_id = ?1 AND withdrawn_ms IS NULL",
                [u.to_hex()],
                |r| r.get(0),
            )
            .optional()?,
        (None, Some(n)) => c
            .row_cached(
                "SELECT user_id FROM accounts WHERE username = ?1 AND withdrawn_ms IS NULL",
                [n],
                |r| r.get(0),
            )
            .optional()?,
        _ => {
            return Err(ApiError::validation(
                "user_id",
                "give exactly one of user_id and username",
            ));
        }
    };
    let field = if user_id.is_some() {
        "user_id"
    } else {
        "username"
    };
    found
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| ApiError::field(ErrorCode::NotFound, field, "no such user"))
}
