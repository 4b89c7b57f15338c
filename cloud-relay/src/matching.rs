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
        self.db.run(|c| sweep_expired(c, now_ms())).await
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

/// The sweeper's transaction: voids every hold whose deadline is before `now` and closes its
/// pending request with the "no appliance answered" answer. Returns how many.
fn sweep_expired(c: &mut Connection, now: i64) -> Result<usize, ApiError> {
    let tx = c.transaction()?;
    let expired = ledger::expired_holds(&tx, now)?;
    let n = expired.len();
    let body = ApiError::new(
        ErrorCode::MatcherUnavailable,
        "no appliance answered in time",
    );
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

#[cfg(test)]
mod tests {
    //! The settlement rules against a real SQLite file: which candidate the relay takes, what it
    //! charges, what it stores, and what a retry with the same key sees. The async shell
    //! (`Matcher::request`/`process`, the RPC) is exercised end to end by `tests/tests/matching.rs`
    //! and `idempotency.rs`.
    use super::*;
    use crate::profiles::ProfileInput;
    use comatching_protocol::{
        Candidate, ContactFrequency, Hobby, Important, MbtiPreference, ReplicaPosition,
    };

    /// A profile, in the API's words.
    #[derive(Clone, Copy)]
    struct P {
        gender: &'static str,
        age: u8,
        mbti: &'static str,
        hobby: &'static str,
        freq: &'static str,
        major: &'static str,
        dont_pick_me: bool,
    }

    /// The requester.
    const ME: P = P {
        gender: "female",
        age: 25,
        mbti: "ENFP",
        hobby: "game",
        freq: "normal",
        major: "Physics",
        dont_pick_me: false,
    };
    /// A candidate who meets every preference `strict()` asks for.
    const FIT: P = P {
        gender: "male",
        age: 27,
        mbti: "ENTJ",
        hobby: "game",
        freq: "normal",
        major: "History",
        dont_pick_me: false,
    };

    fn profile(p: P) -> profiles::Profile {
        serde_json::from_value::<ProfileInput>(json!({
            "nickname": "Nick", "gender": p.gender, "age": p.age, "mbti": p.mbti,
            "hobbies": [p.hobby], "contact_frequency": p.freq, "major": p.major,
            "contact": {"kind": "kakao", "handle": "handle"}, "dont_pick_me": p.dont_pick_me
        }))
        .unwrap()
        .validate()
        .unwrap()
    }

    fn features(p: P) -> Features {
        profile(p).features
    }

    fn open() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        (dir, db)
    }

    /// An account with `points`, and a profile unless `p` is None.
    fn account(db: &Db, p: Option<P>, points: u64) -> UserId {
        let u = UserId::new_v7();
        db.run_sync(|c| {
            c.execute(
                "INSERT INTO accounts(user_id, username, password_hash, created_ms) VALUES (?1, ?2, 'h', 1)",
                params![u.to_hex(), u.to_hex()],
            )?;
            if let Some(p) = p {
                profiles::upsert(c, u, &profile(p), 5)?;
            }
            if points > 0 {
                ledger::grant(c, u, points, "test")?;
            }
            Ok(())
        })
        .unwrap();
        u
    }

    fn pair(db: &Db, a: UserId, b: UserId) {
        let (x, y) = (a.to_hex(), b.to_hex());
        let (lo, hi) = if x < y { (&x, &y) } else { (&y, &x) };
        db.run_sync(|c| {
            c.execute(
                "INSERT INTO matches(match_id, requester_id, partner_id, pair_lo, pair_hi, request_id, cost, \
                 refunded, relaxed, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?1, 1000, 0, '[]', 1)",
                params![uuid::Uuid::now_v7().simple().to_string(), x, y, lo, hi],
            )?;
            Ok(())
        })
        .unwrap();
    }

    /// Age older, important; everything else any.
    fn strict() -> MatchOptions {
        MatchOptions {
            age: AgePreference::Older,
            important: Important::Age,
            ..MatchOptions::any()
        }
    }

    /// Every test hold expires after this instant (the sweeper's clock is an argument).
    const HOLD_DEADLINE: i64 = 1_000;

    fn start(db: &Db, user: UserId, key: &str, o: &MatchOptions) -> Result<Begin, ApiError> {
        db.run_sync(|c| {
            begin(
                c,
                user,
                key,
                o,
                &body_hash(o),
                &CostTable::default(),
                10,
                HOLD_DEADLINE,
            )
        })
    }

    fn proceed(db: &Db, user: UserId, key: &str, o: &MatchOptions) -> Reserved {
        match start(db, user, key, o).unwrap() {
            Begin::Proceed(r) => r,
            Begin::Replay(r) => panic!("replayed {r:?}"),
        }
    }

    fn reply(
        r: &Reserved,
        status: ReplyStatus,
        cands: &[UserId],
        relaxed: &[Criterion],
    ) -> MatchReply {
        MatchReply {
            request_id: r.request_id,
            status,
            candidates: cands
                .iter()
                .map(|&user_id| Candidate {
                    user_id,
                    score: 0.5,
                })
                .collect(),
            relaxed: relaxed.to_vec(),
            position: ReplicaPosition::default(),
        }
    }

    fn settle_with(
        db: &Db,
        user: UserId,
        o: &MatchOptions,
        max_picked: u32,
        r: &Reserved,
        reply: Option<MatchReply>,
    ) -> (StoredResponse, bool) {
        db.run_sync(|c| finish(c, user, o, &CostTable::default(), max_picked, r, reply))
            .unwrap()
    }

    fn hold_state(db: &Db, hold: &str) -> String {
        db.run_sync(|c| {
            Ok(
                c.query_row("SELECT state FROM holds WHERE hold_id = ?1", [hold], |r| {
                    r.get(0)
                })?,
            )
        })
        .unwrap()
    }

    fn stored(db: &Db, r: &Reserved) -> (String, Option<i64>, Option<String>) {
        db.run_sync(|c| {
            Ok(c.query_row(
                "SELECT state, response_status, response_body FROM match_requests WHERE request_id = ?1",
                [r.request_id.to_hex()],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )?)
        })
        .unwrap()
    }

    fn code(resp: &StoredResponse) -> &str {
        resp.body["error"]["code"].as_str().unwrap_or("")
    }

    fn picked(db: &Db, u: UserId) -> (i64, bool) {
        db.run_sync(|c| {
            Ok(c.query_row(
                "SELECT picked_count, in_pool FROM profiles WHERE user_id = ?1",
                [u.to_hex()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
        .unwrap()
    }

    #[test]
    fn idempotency_keys_are_1_to_64_printable_ascii() {
        assert_eq!(validate_key(Some("key-1")).unwrap(), "key-1");
        let max = "k".repeat(64);
        assert_eq!(validate_key(Some(&max)).unwrap(), max);
        for bad in [
            None,
            Some(""),
            Some(&*"k".repeat(65)),
            Some("a\nb"),
            Some("ké"),
        ] {
            let e = validate_key(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::ValidationFailed, "{bad:?}");
            assert_eq!(e.field.as_deref(), Some("Idempotency-Key"));
        }
    }

    #[test]
    fn body_hash_is_the_options_not_the_spelling() {
        let a: MatchOptions = serde_json::from_str(
            r#"{"age":"older","mbti":"EN","hobby":"any","contact_frequency":"any","exclude_same_major":false}"#,
        )
        .unwrap();
        let b: MatchOptions = serde_json::from_str(
            r#"{ "exclude_same_major": false, "contact_frequency": "any", "hobby": "any", "mbti": "EN", "age": "older" }"#,
        )
        .unwrap();
        assert_eq!(body_hash(&a), body_hash(&b));
        let h = body_hash(&a);
        assert_eq!(h.len(), 64);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(body_hash(&a), body_hash(&MatchOptions::any()));
    }

    #[test]
    fn each_criterion_is_met_exactly_when_the_candidate_has_it() {
        let me = features(ME);
        let cand = |f: fn(&mut P)| {
            let mut p = FIT;
            f(&mut p);
            features(p)
        };
        let younger = cand(|p| p.age = 24);
        let same = cand(|p| p.age = 25);
        let older = cand(|p| p.age = 26);
        let age = |pref, c: &Features| {
            let o = MatchOptions {
                age: pref,
                ..MatchOptions::any()
            };
            meets(&me, c, &o, Criterion::Age)
        };
        for (pref, want) in [
            (AgePreference::Younger, [true, false, false]),
            (AgePreference::Equal, [false, true, false]),
            (AgePreference::Older, [false, false, true]),
            (AgePreference::Any, [true, true, true]),
        ] {
            let got = [age(pref, &younger), age(pref, &same), age(pref, &older)];
            assert_eq!(got, want, "{pref:?}");
        }

        let mbti = |want: &str, c: &Features| {
            let o = MatchOptions {
                mbti: want.parse::<MbtiPreference>().unwrap(),
                ..MatchOptions::any()
            };
            meets(&me, c, &o, Criterion::Mbti)
        };
        let entj = cand(|p| p.mbti = "ENTJ");
        assert!(mbti("EN", &entj));
        assert!(mbti("ENTJ", &entj));
        assert!(!mbti("ES", &entj), "one letter of two is not met");
        assert!(!mbti("IS", &entj));
        assert!(mbti("", &entj));

        let hobby = |h: Hobby, c: &Features| {
            let o = MatchOptions {
                hobby: HobbyPreference::Category(h),
                ..MatchOptions::any()
            };
            meets(&me, c, &o, Criterion::Hobby)
        };
        let gamer = cand(|p| p.hobby = "game");
        assert!(hobby(Hobby::Game, &gamer));
        assert!(!hobby(Hobby::Sports, &gamer));
        assert!(meets(&me, &gamer, &MatchOptions::any(), Criterion::Hobby));

        let freq = |f: ContactFrequency, c: &Features| {
            let o = MatchOptions {
                contact_frequency: ContactPreference::Frequency(f),
                ..MatchOptions::any()
            };
            meets(&me, c, &o, Criterion::ContactFrequency)
        };
        let rare = cand(|p| p.freq = "rare");
        assert!(freq(ContactFrequency::Rare, &rare));
        assert!(!freq(ContactFrequency::Normal, &rare));
        assert!(meets(
            &me,
            &rare,
            &MatchOptions::any(),
            Criterion::ContactFrequency
        ));
    }

    #[test]
    fn the_relay_refuses_candidates_by_its_own_truth() {
        let (_d, db) = open();
        let me = account(&db, Some(ME), 0);
        let mf = features(ME);
        let why = |o: &MatchOptions, relaxed: bool, max: u32, cand: UserId| {
            db.run_sync(|c| refuse_reason(c, me, &mf, o, relaxed, max, cand))
                .unwrap()
        };
        let any = MatchOptions::any();
        let fit = account(&db, Some(FIT), 0);
        assert_eq!(why(&any, false, 5, fit), None);
        assert_eq!(why(&strict(), false, 5, fit), None);
        assert_eq!(why(&any, false, 5, me), Some("self"));
        assert_eq!(why(&any, false, 5, UserId::new_v7()), Some("no profile"));
        let bare = account(&db, None, 0);
        assert_eq!(why(&any, false, 5, bare), Some("no profile"));

        // The pick cap: picked 1 of at most 1 is out, of at most 2 is in.
        let once = account(&db, Some(FIT), 0);
        db.run_sync(|c| {
            c.execute(
                "UPDATE profiles SET picked_count = 1 WHERE user_id = ?1",
                [once.to_hex()],
            )?;
            Ok(())
        })
        .unwrap();
        assert_eq!(why(&any, false, 2, once), None);
        assert_eq!(why(&any, false, 1, once), Some("not in the pool"));
        let left = account(&db, Some(FIT), 0);
        db.run_sync(|c| profiles::leave_pool(c, left)).unwrap();
        assert_eq!(why(&any, false, 5, left), Some("not in the pool"));

        let gone = account(&db, Some(FIT), 0);
        db.run_sync(|c| {
            c.execute(
                "UPDATE accounts SET withdrawn_ms = 5 WHERE user_id = ?1",
                [gone.to_hex()],
            )?;
            Ok(())
        })
        .unwrap();
        assert_eq!(why(&any, false, 5, gone), Some("withdrawn"));

        let woman = account(
            &db,
            Some(P {
                gender: "female",
                ..FIT
            }),
            0,
        );
        assert_eq!(why(&any, false, 5, woman), Some("same gender"));
        let shy = account(
            &db,
            Some(P {
                dont_pick_me: true,
                ..FIT
            }),
            0,
        );
        assert_eq!(why(&any, false, 5, shy), Some("dont_pick_me"));

        let physicist = account(
            &db,
            Some(P {
                major: "Physics",
                ..FIT
            }),
            0,
        );
        let no_major = MatchOptions {
            exclude_same_major: true,
            ..any
        };
        assert_eq!(why(&any, false, 5, physicist), None);
        assert_eq!(why(&no_major, false, 5, physicist), Some("same major"));
        assert_eq!(why(&no_major, false, 5, fit), None);

        // The important option is a hard filter unless the appliance said it relaxed it; other
        // preferences are soft (the appliance ranks by them).
        let junior = account(&db, Some(P { age: 22, ..FIT }), 0);
        assert_eq!(
            why(&strict(), false, 5, junior),
            Some("misses the important option")
        );
        assert_eq!(why(&strict(), true, 5, junior), None);
        let soft = MatchOptions {
            important: Important::None,
            ..strict()
        };
        assert_eq!(why(&soft, false, 5, junior), None);

        // An earlier pair in either direction.
        let a = account(&db, Some(FIT), 0);
        let b = account(&db, Some(FIT), 0);
        pair(&db, me, a);
        pair(&db, b, me);
        assert_eq!(why(&any, false, 5, a), Some("already paired"));
        assert_eq!(why(&any, false, 5, b), Some("already paired"));
    }

    #[test]
    fn begin_reserves_records_and_lists_exclusions() {
        let (_d, db) = open();
        let me = account(&db, Some(ME), 3000);
        let (x, y) = (account(&db, Some(FIT), 0), account(&db, Some(FIT), 0));
        pair(&db, me, x);
        pair(&db, y, me);
        let o = strict();
        let r = proceed(&db, me, "k1", &o);
        assert_eq!(r.cost, 1300);
        assert_eq!(r.requester, features(ME));
        assert_eq!(r.deadline_unix_ms, 10);
        let mut want = vec![x, y];
        want.sort();
        let mut got = r.exclusions.clone();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(hold_state(&db, &r.hold_id), "reserved");
        assert_eq!(db.run_sync(|c| ledger::available(c, me)).unwrap(), 1700);
        assert_eq!(stored(&db, &r), ("pending".into(), None, None));

        // Same key: in progress while pending, another body is refused.
        let e = start(&db, me, "k1", &o).err().unwrap();
        assert_eq!(e.code, ErrorCode::IdempotencyInProgress);
        let e = start(&db, me, "k1", &MatchOptions::any()).err().unwrap();
        assert_eq!(e.code, ErrorCode::IdempotencyKeyReused);
        // Once done, the stored answer is replayed as it was.
        let (resp, _) = settle_with(&db, me, &o, 5, &r, None);
        match start(&db, me, "k1", &o).unwrap() {
            Begin::Replay(again) => assert_eq!(again, resp),
            Begin::Proceed(_) => panic!("a done request ran again"),
        }
        // The key is per user.
        let other = account(&db, Some(ME), 3000);
        assert!(matches!(
            start(&db, other, "k1", &o).unwrap(),
            Begin::Proceed(_)
        ));
    }

    #[test]
    fn begin_refuses_without_a_profile_or_points_and_records_nothing() {
        let (_d, db) = open();
        let bare = account(&db, None, 3000);
        let e = start(&db, bare, "k", &MatchOptions::any()).err().unwrap();
        assert_eq!(e.code, ErrorCode::ValidationFailed);
        assert_eq!(e.field.as_deref(), Some("profile"));
        let poor = account(&db, Some(ME), 1299);
        let e = start(&db, poor, "k", &strict()).err().unwrap();
        assert_eq!(e.code, ErrorCode::InsufficientPoints);
        let rows: i64 = db
            .run_sync(|c| Ok(c.query_row("SELECT COUNT(*) FROM match_requests", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(rows, 0);
        assert_eq!(db.run_sync(|c| ledger::open_holds(c)).unwrap(), 0);
    }

    #[test]
    fn an_ok_reply_charges_for_the_first_candidate_the_relay_accepts() {
        let (_d, db) = open();
        let me = account(&db, Some(ME), 3000);
        let woman = account(
            &db,
            Some(P {
                gender: "female",
                ..FIT
            }),
            0,
        );
        let junior = account(&db, Some(P { age: 22, ..FIT }), 0);
        let (first, second) = (account(&db, Some(FIT), 1000), account(&db, Some(FIT), 0));
        let o = strict();
        let r = proceed(&db, me, "k", &o);
        let rep = reply(
            &r,
            ReplyStatus::Ok,
            &[me, woman, junior, first, second],
            &[],
        );
        let (resp, pool_changed) = settle_with(&db, me, &o, 1, &r, Some(rep));
        assert_eq!(resp.status, 201, "{}", resp.body);
        assert!(pool_changed);
        assert_eq!(resp.body["partner"]["user_id"], first.to_hex());
        assert_eq!(resp.body["cost"], 1300);
        assert_eq!(resp.body["refunded"], 0);
        assert_eq!(resp.body["relaxed"], json!([]));
        assert_eq!(resp.body["points"], 1700);
        assert_eq!(hold_state(&db, &r.hold_id), "charged");
        assert_eq!(db.run_sync(|c| ledger::balance(c, me)).unwrap(), 1700);
        // The pick is counted; at the cap of 1 the partner leaves the pool.
        assert_eq!(picked(&db, first), (1, false));
        assert_eq!(picked(&db, second), (0, true));
        let (state, status, body) = stored(&db, &r);
        assert_eq!((state.as_str(), status), ("done", Some(201)));
        assert_eq!(
            serde_json::from_str::<Value>(&body.unwrap()).unwrap(),
            resp.body
        );
        // The pair is recorded once, unordered: `first` may not draw `me` now.
        let exclusions = proceed(&db, first, "k", &MatchOptions::any()).exclusions;
        assert_eq!(exclusions, vec![me]);
        let history = db.run_sync(|c| list(c, me)).unwrap();
        assert_eq!(history["matches"][0]["partner"]["user_id"], first.to_hex());
        assert_eq!(history["matches"][0]["cost"], 1300);
        db.run_sync(|c| ledger::audit(c).map_err(ApiError::internal))
            .unwrap();
    }

    #[test]
    fn a_relaxed_important_option_is_refunded() {
        let (_d, db) = open();
        let me = account(&db, Some(ME), 3000);
        let junior = account(&db, Some(P { age: 22, ..FIT }), 0);
        let o = strict();
        let r = proceed(&db, me, "k", &o);
        let rep = reply(&r, ReplyStatus::Ok, &[junior], &[Criterion::Age]);
        let (resp, _) = settle_with(&db, me, &o, 5, &r, Some(rep));
        assert_eq!(resp.status, 201, "{}", resp.body);
        assert_eq!(resp.body["refunded"], 300);
        assert_eq!(resp.body["relaxed"], json!(["age"]));
        assert_eq!(resp.body["points"], 2000);
        assert_eq!(db.run_sync(|c| ledger::balance(c, me)).unwrap(), 2000);
        assert_eq!(picked(&db, junior), (1, true));
        // Relaxing a criterion that is not the important one refunds nothing and lets nobody
        // who misses the important one through.
        let r = proceed(&db, me, "k2", &o);
        let older = account(&db, Some(FIT), 0);
        let rep = reply(&r, ReplyStatus::Ok, &[junior, older], &[Criterion::Mbti]);
        let (resp, _) = settle_with(&db, me, &o, 5, &r, Some(rep));
        assert_eq!(resp.body["partner"]["user_id"], older.to_hex());
        assert_eq!(resp.body["refunded"], 0);
        assert_eq!(resp.body["points"], 700);
    }

    #[test]
    fn no_answer_no_candidate_and_errors_void_the_hold() {
        let (_d, db) = open();
        let me = account(&db, Some(ME), 3000);
        let woman = account(
            &db,
            Some(P {
                gender: "female",
                ..FIT
            }),
            0,
        );
        let o = MatchOptions::any();
        let cases: [(Option<ReplyStatus>, &[UserId], u16, &str); 4] = [
            (None, &[], 503, "matcher_unavailable"),
            (Some(ReplyStatus::NoCandidate), &[], 404, "no_candidate"),
            (Some(ReplyStatus::Ok), &[woman], 404, "no_candidate"),
            (Some(ReplyStatus::NotReady), &[], 503, "matcher_unavailable"),
        ];
        for (i, (status, cands, http, err)) in cases.into_iter().enumerate() {
            let r = proceed(&db, me, &format!("k{i}"), &o);
            let rep = status.map(|s| reply(&r, s, cands, &[]));
            let (resp, pool_changed) = settle_with(&db, me, &o, 5, &r, rep);
            assert_eq!((resp.status, code(&resp)), (http, err), "case {i}");
            assert!(!pool_changed, "case {i}");
            assert_eq!(hold_state(&db, &r.hold_id), "voided", "case {i}");
            let (state, st, _) = stored(&db, &r);
            assert_eq!((state.as_str(), st), ("done", Some(i64::from(http))));
            assert_eq!(db.run_sync(|c| ledger::available(c, me)).unwrap(), 3000);
        }
        assert_eq!(picked(&db, woman), (0, true));
    }

    #[test]
    fn a_reply_after_the_sweeper_changes_nothing() {
        let (_d, db) = open();
        let me = account(&db, Some(ME), 3000);
        let fit = account(&db, Some(FIT), 0);
        let o = MatchOptions::any();
        let r = proceed(&db, me, "k", &o);
        let _other = proceed(&db, me, "k2", &o);
        // Not yet expired: nothing swept.
        assert_eq!(db.run_sync(|c| sweep_expired(c, HOLD_DEADLINE)).unwrap(), 0);
        assert_eq!(
            db.run_sync(|c| sweep_expired(c, HOLD_DEADLINE + 1))
                .unwrap(),
            2
        );
        assert_eq!(hold_state(&db, &r.hold_id), "voided");
        let (state, status, body) = stored(&db, &r);
        assert_eq!((state.as_str(), status), ("done", Some(503)));
        let swept: Value = serde_json::from_str(&body.unwrap()).unwrap();
        let rep = reply(&r, ReplyStatus::Ok, &[fit], &[]);
        let (resp, pool_changed) = settle_with(&db, me, &o, 5, &r, Some(rep));
        assert_eq!(
            resp,
            StoredResponse {
                status: 503,
                body: swept
            }
        );
        assert!(!pool_changed);
        assert_eq!(picked(&db, fit), (0, true));
        assert_eq!(db.run_sync(|c| ledger::balance(c, me)).unwrap(), 3000);
        assert_eq!(db.run_sync(|c| sweep_expired(c, i64::MAX)).unwrap(), 0);
    }

    #[test]
    fn a_void_without_a_stored_answer_still_answers_unavailable() {
        let (_d, db) = open();
        let me = account(&db, Some(ME), 3000);
        let o = MatchOptions::any();
        let r = proceed(&db, me, "k", &o);
        db.run_sync(|c| ledger::settle(c, &r.hold_id, Settlement::Void))
            .unwrap();
        let (resp, pool_changed) = settle_with(&db, me, &o, 5, &r, None);
        assert_eq!((resp.status, code(&resp)), (503, "matcher_unavailable"));
        assert!(!pool_changed);
    }

    #[test]
    fn history_is_newest_first() {
        let (_d, db) = open();
        let me = account(&db, Some(ME), 9000);
        let o = MatchOptions::any();
        let mut partners = Vec::new();
        for i in 0..3 {
            let p = account(&db, Some(FIT), 0);
            let r = proceed(&db, me, &format!("k{i}"), &o);
            let (resp, _) = settle_with(
                &db,
                me,
                &o,
                5,
                &r,
                Some(reply(&r, ReplyStatus::Ok, &[p], &[])),
            );
            assert_eq!(resp.status, 201);
            partners.push(p);
        }
        let history = db.run_sync(|c| list(c, me)).unwrap();
        let got: Vec<String> = history["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["partner"]["user_id"].as_str().unwrap().to_owned())
            .collect();
        let want: Vec<String> = partners.iter().rev().map(|p| p.to_hex()).collect();
        assert_eq!(got, want);
        // The partner sees nothing in their own history (it lists the caller's requests).
        let theirs = db.run_sync(|c| list(c, partners[0])).unwrap();
        assert_eq!(theirs["matches"], json!([]));
    }
}
