//! The indexed engine: users grouped into *score-key buckets*, an `hnsw_rs` graph over the
//! distinct keys, and a planner.
//!
//! Why buckets: a score depends only on `(age, mbti, hobbies, contact)` (see [`crate::score`]),
//! so 1M users fall into at most 67,584 keys per gender. Users of one key are interchangeable for
//! ranking, which makes ties exact and sampling fair. Each gender has its own partition (the
//! gender filter is free). Opted-out users (`dont_pick_me`) are held but never bucketed.
//!
//! The vector of a key is one-hot `age(22) ‖ mbti letters(8) ‖ hobbies(6) ‖ contact(3)` plus one
//! padding coordinate that gives every key the same norm; the query vector puts each
//! preference's weight on the coordinates that meet it, so `query · key` is exactly the integer
//! score and, norms being equal, ascending squared L2 distance is descending score (the standard
//! inner-product-to-L2 reduction). Distance is our own squared L2 (no `DistDot` asserts).
//!
//! Query plan:
//! 1. A pool of at most `graph_above_users` live users of the wanted gender, or no graph:
//!    **exact class enumeration** — score levels in descending order, each expanded to all its
//!    keys, sampled until `k` candidates pass the filters.
//! 2. Otherwise the **graph** is searched for the nearest non-empty keys; the best score among
//!    them is where the walk starts, and levels from there down are enumerated as in (1), each
//!    expanded to *all* its keys (so ties are complete and fair even though the graph saw only
//!    some of them). The answer is approximate only when the graph missed a better level. If
//!    the walk yields fewer than `k` candidates, the plan falls back to (1).
//!
//! Measured (docs/bench/): (1) answers in tens of microseconds with score recall 1.0 at 10k, 100k
//! and 1M users, while (2) costs a graph search (~100–200 µs) and misses a score level in ~1 % of
//! queries — the bounded key space makes enumeration cheaper than any graph walk. So the planner
//! defaults to (1) at every size (`graph_above_users = usize::MAX`) and the graph is built only
//! when a deployment sets a threshold; (2) stays tested for filter safety and is kept for a
//! feature set whose key space outgrows enumeration.
//!
//! Deletes never touch the graph: an emptied bucket is a tombstone skipped at query time. When
//! tombstones pass `rebuild_dead_fraction` a fresh graph is built on a background thread from the
//! non-empty keys and swapped in (keys that appeared meanwhile are inserted on swap). The whole
//! engine is rebuilt from the store at start ([`HnswEngine::from_users`]).
//!
//! It must not read the store or the clock, and must not decide hard-filter semantics on its own
//! (they are the module docs of [`crate::engine`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use anndists::dist::Distance;
use comatching_protocol::{Candidate, Digest, Features, Gender, MatchRequest, UserId};
use hnsw_rs::hnsw::Hnsw;
use rand::RngCore;

use super::{EngineKind, IdFilter, MAX_K, MajorTable, MatchEngine, Ranking, select};
use crate::score::{AGES, CONTACTS, HOBBY_SETS, KEYS, ScoreKey, Scorer};

/// Vector length: age one-hot, two coordinates per MBTI axis, hobbies, contact, padding.
const DIM: usize = AGES + 8 + 6 + CONTACTS + 1;
const PAD: usize = DIM - 1;
/// Largest squared norm of an unpadded key vector (1 + 4 + 6 + 1).
const MAX_NORM2: f32 = 12.0;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HnswConfig {
    pub max_nb_connection: usize,
    pub ef_construction: usize,
    pub ef_search: usize,
    /// Keys asked of the graph per query.
    pub knbn: usize,
    /// Planner: pools of at most this many live users are answered by exact class enumeration;
    /// larger ones use the graph (which is built only then). Default: never use the graph —
    /// measured, enumeration is faster *and* exact at every size up to 1M users, because the
    /// key space is bounded (see `docs/bench/README.md`). Set it to use the graph.
    pub graph_above_users: usize,
    /// Rebuild when tombstoned graph points exceed this fraction of all points...
    pub rebuild_dead_fraction: f32,
    /// ...and at least this many.
    pub rebuild_min_dead: usize,
}

impl Default for HnswConfig {
    fn default() -> Self {
        HnswConfig {
            max_nb_connection: 16,
            ef_construction: 64,
            ef_search: 64,
            knbn: 32,
            graph_above_users: usize::MAX,
            rebuild_dead_fraction: 0.25,
            rebuild_min_dead: 256,
        }
    }
}

/// Squared Euclidean distance. Monotone in L2, never asserts.
#[derive(Clone, Copy, Default, Debug)]
pub struct SquaredL2;

impl Distance<f32> for SquaredL2 {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
    }
}

/// The padded vector of a score key.
pub fn key_vector(key: u32) -> Vec<f32> {
    let k = ScoreKey::from_index(key);
    let mut v = vec![0f32; DIM];
    v[usize::from(k.age)] = 1.0;
    for axis in 0..4 {
        let bit = usize::from((k.mbti >> axis) & 1);
        v[AGES + 2 * axis + bit] = 1.0;
    }
    for h in 0..6 {
        if k.hobbies & (1 << h) != 0 {
            v[AGES + 8 + h] = 1.0;
        }
    }
    v[AGES + 14 + usize::from(k.contact)] = 1.0;
    let norm2: f32 = v.iter().map(|x| x * x).sum();
    v[PAD] = (MAX_NORM2 - norm2).max(0.0).sqrt();
    v
}

/// The query vector: `query_vector(s) · key_vector(k) == s.score(k)` for every valid key.
/// Every key vector has the same norm, so the squared L2 distance from it orders keys by
/// descending score; it is not scaled to the keys' norm, as any positive scale gives the graph
/// the same order.
pub fn query_vector(s: &Scorer) -> Vec<f32> {
    let mut q = vec![0f32; DIM];
    // Hobby "any" is a constant; every key has exactly one age coordinate, so carry it there.
    let hobby_any = (1..HOBBY_SETS).all(|h| s.hobby[h] == s.hobby[1]);
    let hobby_const = if hobby_any {
        f32::from(s.hobby[1])
    } else {
        0.0
    };
    for (qa, &age) in q[..AGES].iter_mut().zip(&s.age) {
        *qa = f32::from(age) + hobby_const;
    }
    // MBTI: table value = Σ over axes of a per-axis contribution; recover it per letter.
    let base = f32::from(s.mbti[0]);
    for axis in 0..4 {
        // Contribution of flipping this axis from letter 0 to letter 1.
        let flipped = f32::from(s.mbti[1 << axis]);
        let delta = flipped - base;
        // Split the base evenly over the four axes' letter-0 coordinates.
        q[AGES + 2 * axis] = base / 4.0;
        q[AGES + 2 * axis + 1] = base / 4.0 + delta;
    }
    if !hobby_any {
        for h in 0..6 {
            q[AGES + 8 + h] = f32::from(s.hobby[1 << h]);
        }
    }
    for (qc, &c) in q[AGES + 14..AGES + 14 + CONTACTS]
        .iter_mut()
        .zip(&s.contact)
    {
        *qc = f32::from(c);
    }
    q
}

#[derive(Clone, Copy, Debug)]
struct Member {
    user: UserId,
    major: u32,
}

#[derive(Clone, Copy, Debug)]
enum Location {
    /// Opted out of being picked: held, never a candidate.
    Hidden,
    Bucketed {
        gender: Gender,
        key: u32,
        pos: u32,
    },
}

type Graph = Hnsw<'static, f32, SquaredL2>;

struct GraphState {
    hnsw: Option<Graph>,
    in_graph: Vec<bool>,
    points: usize,
    /// Points whose bucket is empty now (tombstones).
    dead: usize,
    orphans: usize,
}

impl GraphState {
    fn empty() -> Self {
        GraphState {
            hnsw: None,
            in_graph: vec![false; KEYS],
            points: 0,
            dead: 0,
            orphans: 0,
        }
    }
}

fn build_graph(keys: Vec<u32>, cfg: HnswConfig) -> GraphState {
    let mut g = GraphState::empty();
    if keys.is_empty() {
        return g;
    }
    let hnsw: Graph = Hnsw::new(
        cfg.max_nb_connection,
        keys.len(),
        16,
        cfg.ef_construction,
        SquaredL2,
    );
    let vectors: Vec<Vec<f32>> = keys.iter().map(|&k| key_vector(k)).collect();
    let data: Vec<(&[f32], usize)> = vectors
        .iter()
        .zip(&keys)
        .map(|(v, &k)| (v.as_slice(), k as usize))
        .collect();
    hnsw.parallel_insert_slice(&data);
    for &k in &keys {
        g.in_graph[k as usize] = true;
    }
    g.points = keys.len();
    g.orphans = count_orphans(&hnsw, keys.len());
    g.hnsw = Some(hnsw);
    g
}

/// Points no other point links to (hnsw_rs issue #37): they can only be reached as the entry
/// point. Reported in [`IndexStats`]; the planner's level expansion reaches their users anyway.
fn count_orphans(hnsw: &Graph, points: usize) -> usize {
    if points <= 1 {
        return 0;
    }
    let idx = hnsw.get_point_indexation();
    let mut linked: HashSet<usize> = HashSet::with_capacity(points);
    let mut all: Vec<usize> = Vec::with_capacity(points);
    for layer in 0..=usize::from(hnsw.get_max_level_observed()) {
        for p in idx.get_layer_iterator(layer) {
            all.push(p.get_origin_id());
            for layer_neighbours in p.get_neighborhood_id() {
                linked.extend(layer_neighbours.iter().map(|n| n.get_origin_id()));
            }
        }
    }
    all.iter()
        .filter(|k| !linked.contains(k))
        .count()
        .saturating_sub(1)
}

struct Partition {
    buckets: Vec<Vec<Member>>,
    live: usize,
    graph: GraphState,
    rebuild: Option<JoinHandle<GraphState>>,
    rebuilds: usize,
}

impl Partition {
    fn new() -> Self {
        Partition {
            buckets: vec![Vec::new(); KEYS],
            live: 0,
            graph: GraphState::empty(),
            rebuild: None,
            rebuilds: 0,
        }
    }

    fn nonempty_keys(&self) -> Vec<u32> {
        (0..KEYS as u32)
            .filter(|&k| !self.buckets[k as usize].is_empty())
            .collect()
    }

    fn on_filled(&mut self, key: u32) {
        let g = &mut self.graph;
        if g.in_graph[key as usize] {
            g.dead -= 1;
        } else if let Some(h) = &g.hnsw {
            h.insert_slice((&key_vector(key), key as usize));
            g.in_graph[key as usize] = true;
            g.points += 1;
        }
    }

    /// After a user joined: a pool that just grew past `graph_above_users` wants a graph,
    /// whether or not that user filled a new key.
    fn on_grown(&mut self, cfg: &HnswConfig) {
        if self.graph.hnsw.is_none() && self.rebuild.is_none() && self.live > cfg.graph_above_users
        {
            self.start_rebuild(*cfg);
        }
    }

    fn on_emptied(&mut self, key: u32, cfg: &HnswConfig) {
        let g = &mut self.graph;
        if g.in_graph[key as usize] {
            g.dead += 1;
            if self.rebuild.is_none()
                && g.dead >= cfg.rebuild_min_dead
                && g.dead as f32 > cfg.rebuild_dead_fraction * g.points as f32
            {
                self.start_rebuild(*cfg);
            }
        }
    }

    fn start_rebuild(&mut self, cfg: HnswConfig) {
        let keys = self.nonempty_keys();
        self.rebuild = Some(std::thread::spawn(move || build_graph(keys, cfg)));
    }

    /// Swaps in a finished background rebuild; with `wait`, waits for it.
    fn poll_rebuild(&mut self, wait: bool) {
        let ready = self
            .rebuild
            .as_ref()
            .is_some_and(|h| wait || h.is_finished());
        if !ready {
            return;
        }
        let handle = self.rebuild.take().expect("checked");
        let Ok(mut g) = handle.join() else {
            return; // a panicked build leaves the old graph in place
        };
        // Keys filled while building: insert; keys emptied meanwhile: count as dead.
        for k in 0..KEYS {
            let filled = !self.buckets[k].is_empty();
            match (filled, g.in_graph[k]) {
                (true, false) => {
                    if let Some(h) = &g.hnsw {
                        h.insert_slice((&key_vector(k as u32), k));
                        g.in_graph[k] = true;
                        g.points += 1;
                    }
                }
                (false, true) => g.dead += 1,
                _ => {}
            }
        }
        self.graph = g;
        self.rebuilds += 1;
    }
}

/// Observability for the status page and the bench.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub graph_points: usize,
    pub tombstones: usize,
    pub orphans: usize,
    pub rebuilds: usize,
    pub nonempty_keys: usize,
    /// Planned queries answered from the graph's levels alone.
    pub graph_answers: usize,
    /// Planned queries whose graph walk fell short of `k` and were enumerated instead.
    pub graph_fallbacks: usize,
}

/// How the planner's graph walks went (counted from `rank`, which takes `&self`).
#[derive(Default)]
struct WalkCounts {
    answers: AtomicUsize,
    fallbacks: AtomicUsize,
}

pub struct HnswEngine {
    cfg: HnswConfig,
    parts: [Partition; 2],
    /// Where each live user is, with its `features_hash` (taken out of `content` on removal).
    at: HashMap<UserId, (Location, u64)>,
    majors: MajorTable,
    /// Features digest of every user in `at`.
    content: Digest,
    walks: WalkCounts,
}

fn part_index(g: Gender) -> usize {
    match g {
        Gender::Female => 0,
        Gender::Male => 1,
    }
}

/// Per-query lists of attribute indices grouped by their table value, for level expansion.
struct Expander {
    age: Vec<(u16, Vec<u8>)>,
    mbti: Vec<(u16, Vec<u8>)>,
    hobby: Vec<(u16, Vec<u8>)>,
    contact: Vec<(u16, Vec<u8>)>,
}

fn group(values: &[u16], skip_zero_index: bool) -> Vec<(u16, Vec<u8>)> {
    let mut out: Vec<(u16, Vec<u8>)> = Vec::new();
    for (i, &v) in values.iter().enumerate() {
        if skip_zero_index && i == 0 {
            continue;
        }
        match out.iter_mut().find(|(x, _)| *x == v) {
            Some((_, list)) => list.push(i as u8),
            None => out.push((v, vec![i as u8])),
        }
    }
    out
}

impl Expander {
    fn new(s: &Scorer) -> Self {
        Expander {
            age: group(&s.age, false),
            mbti: group(&s.mbti, false),
            hobby: group(&s.hobby, true),
            contact: group(&s.contact, false),
        }
    }

    /// Every score level reachable at all, best first.
    fn all_levels(&self) -> Vec<u16> {
        let mut levels = Vec::new();
        for (a, _) in &self.age {
            for (m, _) in &self.mbti {
                for (h, _) in &self.hobby {
                    for (c, _) in &self.contact {
                        levels.push(a + m + h + c);
                    }
                }
            }
        }
        levels.sort_unstable_by(|x, y| y.cmp(x));
        levels.dedup();
        levels
    }

    /// The non-empty buckets of all keys scoring exactly `level` (meeting the important option
    /// if `important_only`).
    fn level_buckets<'p>(
        &self,
        part: &'p Partition,
        scorer: &Scorer,
        level: u16,
        important_only: bool,
    ) -> Vec<&'p [Member]> {
        let mut out = Vec::new();
        for (av, ages) in &self.age {
            for (mv, mbtis) in &self.mbti {
                for (hv, hobbies) in &self.hobby {
                    for (cv, contacts) in &self.contact {
                        if av + mv + hv + cv != level {
                            continue;
                        }
                        let probe = ScoreKey {
                            age: ages[0],
                            mbti: mbtis[0],
                            hobbies: hobbies[0],
                            contact: contacts[0],
                        };
                        if important_only && !scorer.meets_important(probe) {
                            continue;
                        }
                        for &age in ages {
                            for &mbti in mbtis {
                                for &h in hobbies {
                                    for &contact in contacts {
                                        let k = ScoreKey {
                                            age,
                                            mbti,
                                            hobbies: h,
                                            contact,
                                        };
                                        let b = &part.buckets[k.index() as usize];
                                        if !b.is_empty() {
                                            out.push(b.as_slice());
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// What one query needs while walking levels.
struct QueryCtx<'a> {
    part: &'a Partition,
    scorer: Scorer,
    exp: Expander,
    ids: IdFilter,
    my_major: Option<u32>,
    k: usize,
    walks: &'a WalkCounts,
}

impl QueryCtx<'_> {
    fn eligible(&self, m: &Member) -> bool {
        self.my_major != Some(m.major) && self.ids.admits(m.user)
    }

    /// Fills up to `k` candidates from `levels` (best first), each level complete.
    fn fill(&self, levels: &[u16], important_only: bool, rng: &mut dyn RngCore) -> Vec<Candidate> {
        let mut out = Vec::with_capacity(self.k);
        for &level in levels {
            if out.len() >= self.k {
                break;
            }
            let buckets = self
                .exp
                .level_buckets(self.part, &self.scorer, level, important_only);
            let picked =
                select::sample_level(&buckets, self.k - out.len(), |m| self.eligible(m), rng);
            out.extend(picked.into_iter().map(|m| Candidate {
                user_id: m.user,
                score: Scorer::to_unit(level),
            }));
        }
        out
    }

    /// The levels of the graph's nearest non-empty keys, best first.
    /// The levels to walk: every reachable level at or below the best one among the graph's
    /// nearest non-empty keys. Empty when the graph found nothing usable.
    fn graph_levels(&self, graph: &Graph, cfg: &HnswConfig, important_only: bool) -> Vec<u16> {
        let q = query_vector(&self.scorer);
        let best = graph
            .search(&q, cfg.knbn, cfg.ef_search.max(cfg.knbn))
            .into_iter()
            .map(|n| n.get_origin_id() as u32)
            .filter(|&k| !self.part.buckets[k as usize].is_empty())
            .map(ScoreKey::from_index)
            .filter(|&k| !important_only || self.scorer.meets_important(k))
            .map(|k| self.scorer.score(k))
            .max();
        match best {
            Some(best) => self
                .exp
                .all_levels()
                .into_iter()
                .filter(|&l| l <= best)
                .collect(),
            None => Vec::new(),
        }
    }

    fn exact(&self, important_only: bool, rng: &mut dyn RngCore) -> Vec<Candidate> {
        self.fill(&self.exp.all_levels(), important_only, rng)
    }

    fn planned(
        &self,
        cfg: &HnswConfig,
        important_only: bool,
        rng: &mut dyn RngCore,
    ) -> Vec<Candidate> {
        match &self.part.graph.hnsw {
            Some(g) if self.part.live > cfg.graph_above_users => {
                let levels = self.graph_levels(g, cfg, important_only);
                let out = self.fill(&levels, important_only, rng);
                if out.len() >= self.k {
                    self.walks.answers.fetch_add(1, Ordering::Relaxed);
                    return out;
                }
                self.walks.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.exact(important_only, rng)
            }
            _ => self.exact(important_only, rng),
        }
    }
}

impl HnswEngine {
    pub fn new(cfg: HnswConfig) -> Self {
        HnswEngine {
            cfg,
            parts: [Partition::new(), Partition::new()],
            at: HashMap::new(),
            majors: MajorTable::default(),
            content: Digest::default(),
            walks: WalkCounts::default(),
        }
    }

    /// Builds buckets and both graphs (in the foreground) from a full list of live users.
    pub fn from_users<'a>(
        users: impl IntoIterator<Item = (UserId, &'a Features)>,
        cfg: HnswConfig,
    ) -> Self {
        let mut e = HnswEngine::new(cfg);
        for (u, f) in users {
            e.place(u, f);
        }
        for p in &mut e.parts {
            if p.live > cfg.graph_above_users {
                p.graph = build_graph(p.nonempty_keys(), cfg);
            }
        }
        e
    }

    pub fn config(&self) -> HnswConfig {
        self.cfg
    }

    pub fn stats(&self) -> IndexStats {
        let mut s = IndexStats::default();
        for p in &self.parts {
            s.graph_points += p.graph.points;
            s.tombstones += p.graph.dead;
            s.orphans += p.graph.orphans;
            s.rebuilds += p.rebuilds;
            s.nonempty_keys += p.buckets.iter().filter(|b| !b.is_empty()).count();
        }
        s.graph_answers = self.walks.answers.load(Ordering::Relaxed);
        s.graph_fallbacks = self.walks.fallbacks.load(Ordering::Relaxed);
        s
    }

    /// Waits for background rebuilds and swaps them in (tests, shutdown).
    pub fn finish_rebuilds(&mut self) {
        for p in &mut self.parts {
            p.poll_rebuild(true);
        }
    }

    /// Inserts without touching graphs (bulk load).
    fn place(&mut self, user: UserId, f: &Features) -> Option<(usize, u32, bool)> {
        let fp = comatching_protocol::digest::features_hash(user, f);
        self.content.0 = self.content.0.wrapping_add(fp);
        let loc = if f.dont_pick_me {
            Location::Hidden
        } else {
            let g = part_index(f.gender);
            let key = ScoreKey::of(f).index();
            let member = Member {
                user,
                major: self.majors.intern(&f.major),
            };
            let p = &mut self.parts[g];
            let bucket = &mut p.buckets[key as usize];
            let was_empty = bucket.is_empty();
            bucket.push(member);
            p.live += 1;
            let pos = bucket.len() as u32 - 1;
            self.at.insert(
                user,
                (
                    Location::Bucketed {
                        gender: f.gender,
                        key,
                        pos,
                    },
                    fp,
                ),
            );
            return Some((g, key, was_empty));
        };
        self.at.insert(user, (loc, fp));
        None
    }

    fn unplace(&mut self, user: UserId) -> Option<(usize, u32, bool)> {
        let (loc, fp) = self.at.remove(&user)?;
        self.content.0 = self.content.0.wrapping_sub(fp);
        match loc {
            Location::Hidden => None,
            Location::Bucketed { gender, key, pos } => {
                let g = part_index(gender);
                let p = &mut self.parts[g];
                let bucket = &mut p.buckets[key as usize];
                bucket.swap_remove(pos as usize);
                p.live -= 1;
                if let Some(moved) = bucket.get(pos as usize)
                    && let Some((Location::Bucketed { pos: mp, .. }, _)) =
                        self.at.get_mut(&moved.user)
                {
                    *mp = pos;
                }
                Some((g, key, bucket.is_empty()))
            }
        }
    }
}

impl MatchEngine for HnswEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Buckets
    }

    fn upsert(&mut self, user: UserId, f: &Features) {
        let cfg = self.cfg;
        if let Some((g, key, now_empty)) = self.unplace(user)
            && now_empty
        {
            self.parts[g].on_emptied(key, &cfg);
        }
        if let Some((g, key, was_empty)) = self.place(user, f) {
            if was_empty {
                self.parts[g].on_filled(key);
            }
            self.parts[g].on_grown(&cfg);
        }
        for p in &mut self.parts {
            p.poll_rebuild(false);
        }
    }

    fn remove(&mut self, user: UserId) {
        let cfg = self.cfg;
        if let Some((g, key, now_empty)) = self.unplace(user)
            && now_empty
        {
            self.parts[g].on_emptied(key, &cfg);
        }
        for p in &mut self.parts {
            p.poll_rebuild(false);
        }
    }

    fn len(&self) -> usize {
        self.at.len()
    }

    fn features_digest(&self) -> Digest {
        self.content
    }

    fn rank(&self, request: &MatchRequest, rng: &mut dyn RngCore) -> Ranking {
        let me = &request.requester.features;
        let scorer = Scorer::new(me, &request.options);
        let ctx = QueryCtx {
            part: &self.parts[part_index(me.gender.opposite())],
            exp: Expander::new(&scorer),
            ids: IdFilter::new(request),
            my_major: request
                .options
                .exclude_same_major
                .then(|| self.majors.lookup(&me.major)),
            k: usize::from(request.k).min(MAX_K),
            scorer,
            walks: &self.walks,
        };
        if let Some(c) = ctx.scorer.important {
            let out = ctx.planned(&self.cfg, true, rng);
            if !out.is_empty() {
                return Ranking {
                    candidates: out,
                    relaxed: Vec::new(),
                };
            }
            // The graph may have missed the keys meeting it: settle it exactly before relaxing.
            let out = ctx.exact(true, rng);
            if !out.is_empty() {
                return Ranking {
                    candidates: out,
                    relaxed: Vec::new(),
                };
            }
            let out = ctx.planned(&self.cfg, false, rng);
            let relaxed = if out.is_empty() { Vec::new() } else { vec![c] };
            return Ranking {
                candidates: out,
                relaxed,
            };
        }
        Ranking {
            candidates: ctx.planned(&self.cfg, false, rng),
            relaxed: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Every coordinate is used by some key: the graph's distance work grows with `DIM`, so
    /// a coordinate no key sets would be pure cost.
    #[test]
    fn every_coordinate_of_the_key_space_is_used() {
        let mut used = vec![false; DIM];
        for key in 0..KEYS as u32 {
            let v = key_vector(key);
            assert_eq!(v.len(), DIM);
            for (u, x) in used.iter_mut().zip(&v) {
                *u |= *x != 0.0;
            }
        }
        assert!(used.iter().all(|&u| u), "unused coordinates: {used:?}");
        assert_eq!(DIM, 40, "age 22, MBTI 8, hobbies 6, contact 3, padding 1");
    }

    proptest! {
        #[test]
        fn query_dot_key_is_the_score(seed in any::<u64>(), key in 0u32..KEYS as u32) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let me = synth::features(&mut rng);
            let o = synth::options(&mut rng);
            let s = Scorer::new(&me, &o);
            let k = ScoreKey::from_index(key);
            prop_assume!(k.hobbies != 0);
            let v = key_vector(key);
            let dot: f32 = query_vector(&s).iter().zip(&v).map(|(a, b)| a * b).sum();
            prop_assert!((dot - f32::from(s.score(k))).abs() < 1e-3, "{} vs {}", dot, s.score(k));
            prop_assert!((v.iter().map(|x| x * x).sum::<f32>() - MAX_NORM2).abs() < 1e-4);
        }
    }
}
