//! Candidate ranking: hard filters, weighted soft preferences, the important option, top-k with
//! fair ties. Two engines behind [`MatchEngine`]: [`exact::ExactEngine`] (a plain filtered scan
//! over every user — the oracle and the flat-scan baseline) and [`hnsw::HnswEngine`], configured
//! as `buckets` (users grouped into score-key buckets, walked best-first by a planner — exact;
//! an `hnsw_rs` graph over the buckets is built only when `graph_above_users` asks for it).
//!
//! Semantics (DESIGN.md §4), shared by both engines:
//! * Hard filters, never relaxed: not the requester; the opposite gender; not `dont_pick_me`;
//!   not in `request.exclusions`; not the same major (`Major::same_as`) when
//!   `exclude_same_major`. The pick cap is the relay's: it sends a Delete when a user reaches it.
//! * Score: see [`crate::score`]. The important option is a hard filter when at least one
//!   eligible candidate meets it fully; otherwise it is dropped and reported in `relaxed`.
//! * Top-k by score; candidates with equal scores come in uniformly random order (from the
//!   caller's seedable RNG), never in insertion order.
//!
//! Engines own in-memory state only; they must not read the store or the clock. [`answer`] adds
//! expiry and validation around [`MatchEngine::rank`].

pub mod exact;
pub mod hnsw;
mod select;

use std::collections::HashSet;

use comatching_protocol::{
    Candidate, Criterion, Digest, Features, MatchReply, MatchRequest, ReplicaPosition, ReplyStatus,
    UserId,
};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::sync::{Change, UserState};

/// Largest `k` an engine will return; larger requests are answered with this many.
pub const MAX_K: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Exact,
    /// The score-key bucket planner ([`hnsw::HnswEngine`] with its default configuration).
    #[default]
    Buckets,
    /// The old name of `Buckets`, still accepted in configuration: it named a graph the default
    /// never builds. [`EngineKind::resolved`] maps it to `Buckets`; the appliance logs a
    /// deprecation line when it sees it.
    Hnsw,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exact" => Ok(EngineKind::Exact),
            "buckets" => Ok(EngineKind::Buckets),
            "hnsw" => Ok(EngineKind::Hnsw),
            other => Err(format!("unknown engine {other:?} (buckets|exact)")),
        }
    }
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Exact => "exact",
            EngineKind::Buckets => "buckets",
            EngineKind::Hnsw => "hnsw",
        }
    }

    /// The engine this value selects (`hnsw` is a deprecated name for `buckets`).
    pub fn resolved(self) -> EngineKind {
        match self {
            EngineKind::Hnsw => EngineKind::Buckets,
            other => other,
        }
    }

    /// The deprecation notice for a configured value, if it has one.
    pub fn deprecation(self) -> Option<&'static str> {
        (self == EngineKind::Hnsw).then_some(
            "matching.engine = \"hnsw\" is deprecated: it always selected the score-bucket \
             planner (no hnsw_rs graph is built by default); write \"buckets\"",
        )
    }
}

/// A ranked answer: best first, and what had to be relaxed.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Ranking {
    pub candidates: Vec<Candidate>,
    pub relaxed: Vec<Criterion>,
}

/// The matcher's view of the replica. Updated as sync applies; queried by the RPC server.
pub trait MatchEngine: Send + Sync {
    fn kind(&self) -> EngineKind;
    /// Inserts or replaces a live user.
    fn upsert(&mut self, user: UserId, features: &Features);
    /// Removes a user (no-op when absent).
    fn remove(&mut self, user: UserId);
    /// Live users held (including those who opted out of being picked).
    fn len(&self) -> usize;
    /// The features digest (`comatching_protocol::digest::features_hash`) of the users held,
    /// kept incrementally: equal to the store's when the engine mirrors it (shown on /status).
    fn features_digest(&self) -> Digest;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Ranks candidates for `request` (assumed valid; see [`answer`]).
    fn rank(&self, request: &MatchRequest, rng: &mut dyn RngCore) -> Ranking;
}

/// Builds an engine of `kind` over `users` (the rebuild at start).
pub fn build<'a>(
    kind: EngineKind,
    users: impl IntoIterator<Item = (UserId, &'a Features)>,
) -> Box<dyn MatchEngine> {
    match kind.resolved() {
        EngineKind::Exact => Box::new(exact::ExactEngine::from_users(users)),
        EngineKind::Buckets | EngineKind::Hnsw => Box::new(hnsw::HnswEngine::from_users(
            users,
            hnsw::HnswConfig::default(),
        )),
    }
}

/// Rebuilds an engine of `kind` from every live user in `store` (the start-up path).
pub fn from_store(
    kind: EngineKind,
    store: &dyn crate::store::ReplicaStore,
) -> Result<Box<dyn MatchEngine>, crate::store::StoreError> {
    let live = store.live_users()?;
    Ok(build(kind, live.iter().map(|u| (u.user_id, &u.features))))
}

/// Mirrors committed replica changes into the engine.
pub fn apply_changes(engine: &mut dyn MatchEngine, changes: &[Change]) {
    for c in changes {
        match &c.state {
            UserState::Live(f) => engine.upsert(c.user_id, f),
            UserState::Tombstone => engine.remove(c.user_id),
        }
    }
}

/// Answers one match request: expired requests and invalid ones get their status and no
/// candidates; an empty pool is `no_candidate`, never an error.
pub fn answer(
    engine: &dyn MatchEngine,
    request: &MatchRequest,
    now_unix_ms: u64,
    position: ReplicaPosition,
    rng: &mut dyn RngCore,
) -> MatchReply {
    let reply = |status, ranking: Ranking| MatchReply {
        request_id: request.request_id,
        status,
        candidates: ranking.candidates,
        relaxed: ranking.relaxed,
        position,
    };
    if now_unix_ms > request.deadline_unix_ms {
        return reply(ReplyStatus::Expired, Ranking::default());
    }
    if request.k == 0 || request.options.validate().is_err() {
        return reply(ReplyStatus::Invalid, Ranking::default());
    }
    let ranking = engine.rank(request, rng);
    if ranking.candidates.is_empty() {
        reply(ReplyStatus::NoCandidate, ranking)
    } else {
        reply(ReplyStatus::Ok, ranking)
    }
}

/// The per-request hard filter on user id (the gender, opt-out and major parts are applied by
/// each engine with its own interned data).
pub(crate) struct IdFilter {
    requester: UserId,
    exclusions: HashSet<UserId>,
}

impl IdFilter {
    pub(crate) fn new(request: &MatchRequest) -> Self {
        IdFilter {
            requester: request.requester.user_id,
            exclusions: request.exclusions.iter().copied().collect(),
        }
    }
    #[inline]
    pub(crate) fn admits(&self, user: UserId) -> bool {
        user != self.requester && !self.exclusions.contains(&user)
    }
}

/// Interns majors by their comparison key (`Major::key`), so `same_as` becomes `==` on ids.
#[derive(Default, Clone, Debug)]
pub(crate) struct MajorTable {
    ids: std::collections::HashMap<String, u32>,
}

impl MajorTable {
    pub(crate) fn intern(&mut self, m: &comatching_protocol::Major) -> u32 {
        let n = self.ids.len() as u32;
        *self.ids.entry(m.key()).or_insert(n)
    }
    /// The id of `m`, or `u32::MAX` when nobody has that major.
    pub(crate) fn lookup(&self, m: &comatching_protocol::Major) -> u32 {
        self.ids.get(&m.key()).copied().unwrap_or(u32::MAX)
    }
}

/// Counts the ways `ranking` breaks the rules for `request`: a hard filter failed, a user twice,
/// a wrong score, an unreported relaxation of the important option, or not best-first.
/// `lookup` gives the replica's features of a user. Used by the tests and the benchmark.
pub fn filter_violations<'a>(
    request: &MatchRequest,
    ranking: &Ranking,
    lookup: impl Fn(UserId) -> Option<&'a Features>,
) -> usize {
    let me = &request.requester.features;
    let scorer = crate::score::Scorer::new(me, &request.options);
    let mut seen = HashSet::new();
    let mut bad = 0;
    let mut last = f32::INFINITY;
    for c in &ranking.candidates {
        let Some(f) = lookup(c.user_id) else {
            bad += 1;
            continue;
        };
        let key = crate::score::ScoreKey::of(f);
        let broken = c.user_id == request.requester.user_id
            || f.gender != me.gender.opposite()
            || f.dont_pick_me
            || request.exclusions.contains(&c.user_id)
            || (request.options.exclude_same_major && f.major.same_as(&me.major))
            || !seen.insert(c.user_id)
            || crate::score::Scorer::to_unit(scorer.score(key)) != c.score
            || (ranking.relaxed.is_empty() && !scorer.meets_important(key))
            || c.score > last;
        last = c.score;
        bad += usize::from(broken);
    }
    bad
}

#[cfg(test)]
mod tests;
