//! The match flow: reserve → ask an appliance → settle, with idempotency.
//!
//! 1. One transaction checks the requester's profile and balance, reserves a hold and records
//!    the request under `(user, Idempotency-Key)` as `pending`.
//! 2. The `MatchRequest` goes to the shared queue; we wait until the deadline.
//! 3. One transaction takes the first candidate that still passes every hard filter against the
//!    relay's own truth, records the pair (unique unordered pair), counts the pick (the partner
//!    leaves the pool at the cap), and settles the hold as a charge — or voids it when there is
//!    no reply, no candidate, or an error. The response is stored with the request.
//!
//! The same key replays the stored response; the same key with another body is refused
//! (`idempotency_key_reused`). Concurrent requests with one key in this process wait for the
//! first one's outcome (`InFlight`); a pending request left by a crashed process answers
//! `idempotency_in_progress` until the sweeper voids its hold. Requests refused before a hold
//! exists (validation, insufficient points) are not recorded: nothing changed, so a retry with
//! the same key is a fresh attempt.

use crate::db::Cached;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use comatching_protocol::{
    AgePreference, ContactPreference, CostTable, Criterion, Features, HobbyPreference,
    MatchOptions, MatchReply, MatchRequest, ReplyStatus, RequestId, Requester, UserId,
};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::db::{Db, now_ms};
use crate::error::{ApiError, ErrorCode};
use crate::ledger::{self, Settlement};
use crate::metrics::Metrics;
use crate::profiles::{self, PoolEntry};
use crate::rpc::{CallStamps, MatchRpc};

/// A response as first given, replayed byte-for-byte for the same key.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Value,
}

impl StoredResponse {
    fn from_error(e: &ApiError) -> Self {
        StoredResponse {
            status: e.code.status().as_u16(),
            body: e.body(),
        }
    }
}

type Outcome = Result<StoredResponse, ApiError>;

struct InFlight {
    body_hash: String,
    /// The outcome and when the match task handed it over.
    rx: watch::Receiver<Option<(Outcome, Instant)>>,
}

pub struct Matcher {
    db: Db,
    rpc: Arc<MatchRpc>,
    cfg: Config,
    metrics: Arc<Metrics>,
    outbox_wake: Arc<Notify>,
    inflight: Mutex<HashMap<(UserId, String), InFlight>>,
}

/// The canonical hash of a request body: same options, same hash, whatever the JSON spacing.
pub fn body_hash(o: &MatchOptions) -> String {
    let canonical = serde_json::to_vec(o).unwrap_or_default();
    hex::encode(Sha256::digest(&canonical))
}

pub fn validate_key(raw: Option<&str>) -> Result<String, ApiError> {
    let key = raw.ok_or_else(|| {
        ApiError::validation("Idempotency-Key", "the Idempotency-Key header is required")
    })?;
    let n = key.chars().count();
    if n == 0 || n > 64 || key.chars().any(|c| c.is_control() || !c.is_ascii()) {
        return Err(ApiError::validation(
            "Idempotency-Key",
            "must be 1 to 64 printable ASCII characters",
        ));
    }
    Ok(key.to_owned())
}

struct Reserved {
    request_id: RequestId,
    hold_id: String,
    cost: u64,
    requester: Features,
    exclusions: Vec<UserId>,
    deadline_unix_ms: i64,
}

enum Begin {
    Replay(StoredResponse),
    Proceed(Reserved),
}

impl Matcher {
    pub fn new(
        db: Db,
        rpc: Arc<MatchRpc>,
        cfg: Config,
        metrics: Arc<Metrics>,
        outbox_wake: Arc<Notify>,
    ) -> Arc<Self> {
        Arc::new(Matcher {
            db,
            rpc,
            cfg,
            metrics,
            outbox_wake,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    /// `arrived`: when the HTTP request was parsed (the start of the `total` stage).
    pub async fn request(
        self: &Arc<Self>,
        arrived: Instant,
        user: UserId,
        key: String,
        options: MatchOptions,
    ) -> Outcome {
        let hash = body_hash(&options);
        let mut rx = {
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&(user, key.clone())) {
                Some(f) if f.body_hash != hash => return Err(key_reused()),
                Some(f) => f.rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(
                        (user, key.clone()),
                        InFlight {
                            body_hash: hash.clone(),
                            rx: rx.clone(),
                        },
                    );
                    // Run to completion even if this HTTP request is cancelled.
                    let me = self.clone();
                    tokio::spawn(async move {
                        let outcome = me.process(user, key.clone(), options, hash).await;
                        me.inflight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&(user, key));
                        let _ = tx.send(Some((outcome, Instant::now())));
                    });
                    rx
                }
            }
        };
        loop {
            if let Some(outcome) = rx.borrow_and_update().clone() {
                let (outcome, sent) = outcome;
                let stages = &self.metrics.stages;
                stages.respond.observe(sent.elapsed());
                stages.total.observe(arrived.elapsed());
                return outcome;
            }
            if rx.changed().await.is_err() {
                return Err(ApiError::internal("match task ended without an outcome"));
            }
        }
    }

    async fn process(
        &self,
        user: UserId,
        key: String,
        options: MatchOptions,
        hash: String,
    ) -> Outcome {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.cfg.matching.deadline_ms);
        let deadline_unix_ms = now_ms() + self.cfg.matching.deadline_ms as i64;
        let hold_deadline = deadline_unix_ms + self.cfg.ledger.hold_grace_ms as i64;
        let costs = self.cfg.points;
        // The hold is reserved in the writer's open transaction and the request sent while
        // it commits: the fsync and the broker round trip overlap (issue 16). Nothing waits
        // on the hold being durable before the settlement, which runs only once the commit
        // is known; if it failed, there is no hold to settle and the reply is dropped.
        let (begin, committed) = self
            .db
            .write_early(move |c| {
                begin(
                    c,
                    user,
                    &key,
                    &options,
                    &hash,
                    &costs,
                    deadline_unix_ms,
                    hold_deadline,
                )
            })
            .await?;
        let stages = &self.metrics.stages;
        stages.hold.observe(started.elapsed());
        let reserved = match begin {
            Begin::Replay(r) => {
                committed.wait().await?;
                return Ok(r);
            }
            Begin::Proceed(r) => r,
        };
        let req = MatchRequest {
            request_id: reserved.request_id,
            deadline_unix_ms: reserved.deadline_unix_ms as u64,
            requester: Requester {
                user_id: user,
                features: reserved.requester.clone(),
            },
            options,
            exclusions: reserved.exclusions.clone(),
            k: self.cfg.matching.k,
        };
        let asked = Instant::now();
        let mut stamps = CallStamps::default();
        let hold_commit = async {
            let r = committed.wait().await;
            stages.hold_commit.observe(started.elapsed());
            r
        };
        let (reply, held) = tokio::join!(self.rpc.call(&req, deadline, &mut stamps), hold_commit);
        let resumed = Instant::now();
        if let Err(e) = held {
            tracing::error!(request = %reserved.request_id, error = %e, "the hold did not commit; the match is dropped");
            return Err(e);
        }
        if let (Some(published), Some(received)) = (stamps.published, stamps.received) {
            stages.publish.observe(published - asked);
            stages.round_trip.observe(received - published);
            stages
                .reply_wake
                .observe(resumed.saturating_duration_since(received));
        }
        if let Err(e) = &reply {
            tracing::warn!(request = %reserved.request_id, error = %e, "match request got no reply");
        }
        let max_picked = self.cfg.matching.max_picked;
        let (outcome, pool_changed) = self
            .db
            .write(move |c| finish(c, user, &options, &costs, max_picked, &reserved, reply.ok()))
            .await?;
        stages.settle.observe(resumed.elapsed());
        if pool_changed {
            self.outbox_wake.notify_one();
        }
        self.metrics
            .observe_match(started.elapsed(), outcome.status);
        Ok(outcome)
    }

    /// Voids holds whose deadline passed and closes their requests; returns how many.
    pub async fn sweep(&self) -> Result<usize, ApiError> {
        self.db
            .run(|c| {
                let tx = c.transaction()?;
                let expired = ledger::expired_holds(&tx, now_ms())?;
                let n = expired.len();
                let body = ApiError::new(ErrorCode::MatcherUnavailable, "no appliance answered in time");
                let stored = StoredResponse::from_error(&body);
                for hold in expired {
                    ledger::settle(&tx, &hold, Settlement::Void)?;
                    tx.exec_cached(
                        "UPDATE match_requests SET state = 'done', response_status = ?2, response_body = ?3 \
                         WHERE hold_id = ?1 AND state = 'pending'",
                        params![hold, stored.status, stored.body.to_string()],
                    )?;
                }
                tx.commit()?;
                Ok(n)
            })
            .await
    }

    pub async fn run_sweeper(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let every = Duration::from_millis(self.cfg.ledger.sweep_interval_ms);
        loop {
            match self.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(voided = n, "sweeper voided stale holds"),
                Err(e) => tracing::error!(error = %e, "sweeper failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

fn key_reused() -> ApiError {
    ApiError::new(
        ErrorCode::IdempotencyKeyReused,
        "this Idempotency-Key was used with a different request body",
    )
}

#[allow(clippy::too_many_arguments)]
fn begin(
    c: &mut Connection,
    user: UserId,
    key: &str,
    options: &MatchOptions,
    hash: &str,
    costs: &CostTable,
    deadline_unix_ms: i64,
    hold_deadline: i64,
) -> Result<Begin, ApiError> {
    // A savepoint, not a transaction: `Db::write` may group this with other calls.
    let tx = c.savepoint()?;
    let existing: Option<(String, String, Option<i64>, Option<String>)> = tx
        .row_cached(
            "SELECT body_hash, state, response_status, response_body FROM match_requests \
             WHERE user_id = ?1 AND idempotency_key = ?2",
            params![user.to_hex(), key],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    if let Some((stored_hash, state, status, body)) = existing {
        if stored_hash != hash {
            return Err(key_reused());
        }
        return match (state.as_str(), status, body) {
            ("done", Some(status), Some(body)) => Ok(Begin::Replay(StoredResponse {
                status: status as u16,
                body: serde_json::from_str(&body).map_err(|e| ApiError::internal(e.to_string()))?,
            })),
            _ => Err(ApiError::new(
                ErrorCode::IdempotencyInProgress,
                "a request with this Idempotency-Key is still being processed",
            )),
        };
    }
    let Some((_, me)) = profiles::load(&tx, user)? else {
        return Err(ApiError::validation(
            "profile",
            "create your profile before asking for a match",
        ));
    };
    let cost = costs.cost(options);
    let hold_id = ledger::reserve(&tx, user, cost, hold_deadline)?;
    let request_id = RequestId::new_v7();
    tx.exec_cached(
        "INSERT INTO match_requests(user_id, idempotency_key, body_hash, request_id, hold_id, state, created_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6)",
        params![user.to_hex(), key, hash, request_id.to_hex(), hold_id, now_ms()],
    )?;
    let exclusions = paired_with(&tx, user)?;
    tx.commit()?;
    Ok(Begin::Proceed(Reserved {
        request_id,
        hold_id,
        cost,
        requester: me.features,
        exclusions,
        deadline_unix_ms,
    }))
}

/// Everyone already paired with `user`, in either direction.
fn paired_with(c: &Connection, user: UserId) -> Result<Vec<UserId>, ApiError> {
    let mut stmt = c.prepare_cached(
        "SELECT partner_id FROM matches WHERE requester_id = ?1 \
         UNION SELECT requester_id FROM matches WHERE partner_id = ?1",
    )?;
    let ids = stmt
        .query_map([user.to_hex()], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    ids.iter()
        .map(|s| s.parse().map_err(|_| ApiError::internal("stored user id")))
        .collect()
}

fn ordered_pair(a: UserId, b: UserId) -> (String, String) {
    let (a, b) = (a.to_hex(), b.to_hex());
    if a < b { (a, b) } else { (b, a) }
}

/// Does `c` fully meet criterion `k` of `o` for requester `me`?
fn meets(me: &Features, c: &Features, o: &MatchOptions, k: Criterion) -> bool {
    match k {
        Criterion::Age => match o.age {
            AgePreference::Any => true,
            AgePreference::Younger => c.age < me.age,
            AgePreference::Equal => c.age == me.age,
            AgePreference::Older => c.age > me.age,
        },
        Criterion::Mbti => o.mbti.letters_met(c.mbti) == o.mbti.letters_wanted(),
        Criterion::Hobby => match o.hobby {
            HobbyPreference::Any => true,
            HobbyPreference::Category(h) => c.hobbies.contains(h),
        },
        Criterion::ContactFrequency => match o.contact_frequency {
            ContactPreference::Any => true,
            ContactPreference::Frequency(f) => c.contact_frequency == f,
        },
    }
}

/// The relay's own hard filters, checked against its truth at settlement time (the appliance's
/// replica may lag). Returns why a candidate is refused, for the log.
fn refuse_reason(
    c: &Connection,
    requester: UserId,
    me: &Features,
    o: &MatchOptions,
    important_relaxed: bool,
    max_picked: u32,
    cand: UserId,
) -> Result<Option<&'static str>, ApiError> {
    if cand == requester {
        return Ok(Some("self"));
    }
    let Some((_, entry)) = profiles::load(c, cand)? else {
        return Ok(Some("no profile"));
    };
    let PoolEntry {
        features: f,
        picked_count,
        in_pool,
        ..
    } = entry;
    if !in_pool || picked_count >= max_picked {
        return Ok(Some("not in the pool"));
    }
    let withdrawn: bool = c.row_cached(
        "SELECT withdrawn_ms IS NOT NULL FROM accounts WHERE user_id = ?1",
        [cand.to_hex()],
        |r| r.get(0),
    )?;
    if withdrawn {
        return Ok(Some("withdrawn"));
    }
    if f.gender != me.gender.opposite() {
        return Ok(Some("same gender"));
    }
    if f.dont_pick_me {
        return Ok(Some("dont_pick_me"));
    }
    if o.exclude_same_major && f.major.same_as(&me.major) {
        return Ok(Some("same major"));
    }
    if let Some(k) = o.important.criterion()
        && !important_relaxed
        && !meets(me, &f, o, k)
    {
        return Ok(Some("misses the important option"));
    }
    let (lo, hi) = ordered_pair(requester, cand);
    let paired: bool = c.row_cached(
        "SELECT EXISTS(SELECT 1 FROM matches WHERE pair_lo = ?1 AND pair_hi = ?2)",
        params![lo, hi],
        |r| r.get(0),
    )?;
    if paired {
        return Ok(Some("already paired"));
    }
    Ok(None)
}

/// Settles a request in one transaction. Returns the stored response and whether the pool
/// changed (so the outbox publisher is woken).
fn finish(
    c: &mut Connection,
    user: UserId,
    o: &MatchOptions,
    costs: &CostTable,
    max_picked: u32,
    r: &Reserved,
    reply: Option<MatchReply>,
) -> Result<(StoredResponse, bool), ApiError> {
    // A savepoint, not a transaction: `Db::write` may group this with other calls.
    let tx = c.savepoint()?;
    let still_reserved: bool = tx.row_cached(
        "SELECT state = 'reserved' FROM holds WHERE hold_id = ?1",
        [&r.hold_id],
        |row| row.get(0),
    )?;
    if !still_reserved {
        // The sweeper got here first; its stored answer stands.
        let stored: Option<(i64, String)> = tx
            .row_cached(
                "SELECT response_status, response_body FROM match_requests WHERE request_id = ?1 AND state = 'done'",
                [r.request_id.to_hex()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let resp = match stored {
            Some((s, b)) => StoredResponse {
                status: s as u16,
                body: serde_json::from_str(&b).map_err(|e| ApiError::internal(e.to_string()))?,
            },
            None => StoredResponse::from_error(&ApiError::new(
                ErrorCode::MatcherUnavailable,
                "no appliance answered in time",
            )),
        };
        return Ok((resp, false));
    }
    let mut pool_changed = false;
    let response = match reply {
        None => void_with(
            &tx,
            r,
            ApiError::new(
                ErrorCode::MatcherUnavailable,
                "no appliance answered in time; you were not charged",
            ),
        )?,
        Some(reply) => match reply.status {
            ReplyStatus::Ok => {
                let important_relaxed = o
                    .important
                    .criterion()
                    .is_some_and(|k| reply.relaxed.contains(&k));
                let mut chosen = None;
                for cand in &reply.candidates {
                    match refuse_reason(
                        &tx,
                        user,
                        &r.requester,
                        o,
                        important_relaxed,
                        max_picked,
                        cand.user_id,
                    )? {
                        None => {
                            chosen = Some(cand.user_id);
                            break;
                        }
                        Some(why) => {
                            tracing::info!(request = %r.request_id, candidate = %cand.user_id, why, "candidate refused by the relay");
                        }
                    }
                }
                match chosen {
                    None => void_with(&tx, r, no_candidate())?,
                    Some(partner) => {
                        pool_changed = true;
                        let refund = costs.refund(o, important_relaxed);
                        let match_id = uuid::Uuid::now_v7().simple().to_string();
                        let (lo, hi) = ordered_pair(user, partner);
                        let relaxed: Vec<Criterion> = reply.relaxed.clone();
                        tx.exec_cached(
                            "INSERT INTO matches(match_id, requester_id, partner_id, pair_lo, pair_hi, request_id, cost, refunded, relaxed, created_ms) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                            params![
                                match_id,
                                user.to_hex(),
                                partner.to_hex(),
                                lo,
                                hi,
                                r.request_id.to_hex(),
                                r.cost as i64,
                                refund as i64,
                                serde_json::to_string(&relaxed).unwrap_or_else(|_| "[]".into()),
                                now_ms()
                            ],
                        )?;
                        profiles::record_pick(&tx, partner, max_picked)?;
                        if !ledger::settle(&tx, &r.hold_id, Settlement::Charge(r.cost - refund))? {
                            return Err(ApiError::internal(format!(
                                "hold {} was not reserved at charge",
                                r.hold_id
                            )));
                        }
                        let (view, _) = profiles::load(&tx, partner)?
                            .ok_or_else(|| ApiError::internal("partner vanished"))?;
                        let points = ledger::available(&tx, user)?;
                        let body = serde_json::to_value(MatchCreated {
                            match_id,
                            partner: view.partner_json(),
                            cost: r.cost,
                            refunded: refund,
                            relaxed,
                            points,
                        })
                        .map_err(|e| ApiError::internal(format!("match body: {e}")))?;
                        StoredResponse { status: 201, body }
                    }
                }
            }
            ReplyStatus::NoCandidate => void_with(&tx, r, no_candidate())?,
            other => void_with(
                &tx,
                r,
                ApiError::new(
                    ErrorCode::MatcherUnavailable,
                    format!("the matcher could not answer ({other:?}); you were not charged"),
                ),
            )?,
        },
    };
    tx.exec_cached(
        "UPDATE match_requests SET state = 'done', response_status = ?2, response_body = ?3 WHERE request_id = ?1",
        params![r.request_id.to_hex(), response.status, response.body.to_string()],
    )?;
    tx.commit()?;
    Ok((response, pool_changed))
}

fn no_candidate() -> ApiError {
    ApiError::new(
        ErrorCode::NoCandidate,
        "nobody matches right now; you were not charged",
    )
}

fn void_with(tx: &Connection, r: &Reserved, e: ApiError) -> Result<StoredResponse, ApiError> {
    ledger::settle(tx, &r.hold_id, Settlement::Void)?;
    Ok(StoredResponse::from_error(&e))
}

/// The caller's matches, newest first.
pub fn list(c: &Connection, user: UserId) -> Result<Value, ApiError> {
    let mut stmt = c.prepare(
        "SELECT match_id, partner_id, cost, refunded, relaxed, created_ms FROM matches \
         WHERE requester_id = ?1 ORDER BY created_ms DESC, match_id DESC",
    )?;
    let rows = stmt
        .query_map([user.to_hex()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (match_id, partner, cost, refunded, relaxed, created) in rows {
        let partner: UserId = partner
            .parse()
            .map_err(|_| ApiError::internal("stored user id"))?;
        let view = profiles::partner_json(c, partner)?;
        out.push(MatchEntry {
            match_id,
            partner: view,
            cost,
            refunded,
            relaxed: serde_json::from_str::<Value>(&relaxed).unwrap_or(json!([])),
            created_at_unix_ms: created,
        });
    }
    serde_json::to_value(MatchList { matches: out })
        .map_err(|e| ApiError::internal(format!("match list: {e}")))
}

/// `POST /api/v1/matches`' 201 body (stored and replayed byte for byte for the same key).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MatchCreated {
    /// 32 hex characters.
    pub match_id: String,
    #[schema(schema_with = crate::profiles::partner_schema)]
    pub partner: Value,
    /// Points reserved for the request.
    pub cost: u64,
    /// Points given back (the important option had to be relaxed).
    pub refunded: u64,
    /// Soft preferences the matcher had to relax.
    pub relaxed: Vec<Criterion>,
    /// The requester's balance afterwards.
    pub points: i64,
}

/// `GET /api/v1/matches`: the caller's matches, newest first.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MatchList {
    pub matches: Vec<MatchEntry>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct MatchEntry {
    pub match_id: String,
    /// Null only if the partner's account has no profile any more and was not erased.
    #[schema(schema_with = nullable_partner_schema)]
    pub partner: Value,
    pub cost: i64,
    pub refunded: i64,
    #[schema(value_type = Vec<Criterion>)]
    pub relaxed: Value,
    pub created_at_unix_ms: i64,
}

fn nullable_partner_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Ref, Type};
    OneOfBuilder::new()
        .item(Ref::from_schema_name("PartnerView"))
        .item(Ref::from_schema_name("WithdrawnPartner"))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .into()
}
