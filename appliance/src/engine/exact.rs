//! The exact engine: every live user in one flat array, scanned in full for every request.
//!
//! It is the oracle the tests and the benchmark compare against, and the "flat scan" baseline.
//! It must stay obviously correct: no index, no shortcuts beyond interning majors.

use std::collections::HashMap;

use comatching_protocol::{Candidate, Digest, Features, Gender, MatchRequest, UserId};
use rand::RngCore;

use super::{EngineKind, IdFilter, MAX_K, MajorTable, MatchEngine, Ranking, select};
use crate::score::{ScoreKey, Scorer};

#[derive(Clone, Debug)]
struct Row {
    user: UserId,
    gender: Gender,
    key: ScoreKey,
    major: u32,
    dont_pick_me: bool,
    /// This user's `features_hash`, so removing the user takes the same value out of `content`.
    fp: u64,
}

#[derive(Default, Clone, Debug)]
pub struct ExactEngine {
    rows: Vec<Row>,
    at: HashMap<UserId, usize>,
    majors: MajorTable,
    /// Features digest of `rows`.
    content: Digest,
}

impl ExactEngine {
    pub fn from_users<'a>(users: impl IntoIterator<Item = (UserId, &'a Features)>) -> Self {
        let mut e = ExactEngine::default();
        for (u, f) in users {
            e.upsert(u, f);
        }
        e
    }
}

impl MatchEngine for ExactEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Exact
    }

    fn upsert(&mut self, user: UserId, f: &Features) {
        let row = Row {
            user,
            gender: f.gender,
            key: ScoreKey::of(f),
            major: self.majors.intern(&f.major),
            dont_pick_me: f.dont_pick_me,
            fp: comatching_protocol::digest::features_hash(user, f),
        };
        self.content.0 = self.content.0.wrapping_add(row.fp);
        match self.at.get(&user) {
            Some(&i) => {
                self.content.0 = self.content.0.wrapping_sub(self.rows[i].fp);
                self.rows[i] = row;
            }
            None => {
                self.at.insert(user, self.rows.len());
                self.rows.push(row);
            }
        }
    }

    fn remove(&mut self, user: UserId) {
        if let Some(i) = self.at.remove(&user) {
            let gone = self.rows.swap_remove(i);
            self.content.0 = self.content.0.wrapping_sub(gone.fp);
            if let Some(moved) = self.rows.get(i) {
                self.at.insert(moved.user, i);
            }
        }
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn features_digest(&self) -> Digest {
        self.content
    }

    fn rank(&self, request: &MatchRequest, rng: &mut dyn RngCore) -> Ranking {
        let me = &request.requester.features;
        let scorer = Scorer::new(me, &request.options);
        let ids = IdFilter::new(request);
        let want = me.gender.opposite();
        let my_major = request
            .options
            .exclude_same_major
            .then(|| self.majors.lookup(&me.major));
        let mut all: Vec<(u16, usize)> = Vec::new();
        let mut important: Vec<(u16, usize)> = Vec::new();
        for (i, r) in self.rows.iter().enumerate() {
            if r.gender != want
                || r.dont_pick_me
                || my_major == Some(r.major)
                || !ids.admits(r.user)
            {
                continue;
            }
            let s = scorer.score(r.key);
            all.push((s, i));
            if scorer.important.is_some() && scorer.meets_important(r.key) {
                important.push((s, i));
            }
        }
        let mut relaxed = Vec::new();
        let pool = match scorer.important {
            Some(c) if important.is_empty() && !all.is_empty() => {
                relaxed.push(c);
                &all
            }
            // Reached with `important` empty only when `all` is empty too: nobody to relax to.
            Some(_) => &important,
            None => &all,
        };
        let k = usize::from(request.k).min(MAX_K);
        let candidates = select::top_k_fair(pool, k, rng)
            .into_iter()
            .map(|(s, i)| Candidate {
                user_id: self.rows[i].user,
                score: Scorer::to_unit(s),
            })
            .collect();
        Ranking {
            candidates,
            relaxed,
        }
    }
}
