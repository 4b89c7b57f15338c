//! Engine semantics, fairness and the original service's regressions, for both engines.

use std::collections::HashMap;

use comatching_protocol::{
    AgePreference, ContactFrequency, ContactPreference, Features, Gender, Hobby, HobbyPreference,
    HobbySet, Important, Major, MatchOptions, MatchRequest, Mbti, ReplicaPosition, ReplyStatus,
    RequestId, Requester, UserId,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::exact::ExactEngine;
use super::hnsw::{HnswConfig, HnswEngine};
use super::*;
use crate::synth;

fn person(gender: Gender, age: i64, mbti: &str, hobby: Hobby, major: &str) -> Features {
    Features {
        gender,
        age: comatching_protocol::Age::new(age).unwrap(),
        mbti: mbti.parse::<Mbti>().unwrap(),
        hobbies: HobbySet::from_hobbies(&[hobby]).unwrap(),
        contact_frequency: ContactFrequency::Normal,
        major: Major::new(major).unwrap(),
        dont_pick_me: false,
    }
}

fn request(me: (UserId, Features), options: MatchOptions, k: u16) -> MatchRequest {
    MatchRequest {
        request_id: RequestId::from_uuid(uuid::Uuid::from_u128(42)).unwrap(),
        deadline_unix_ms: 1_000,
        requester: Requester {
            user_id: me.0,
            features: me.1,
        },
        options,
        exclusions: Vec::new(),
        k,
    }
}

/// Graph path forced even for tiny pools.
fn graph_cfg() -> HnswConfig {
    HnswConfig {
        graph_above_users: 0,
        ..HnswConfig::default()
    }
}

fn engines(users: &[(UserId, Features)]) -> Vec<(&'static str, Box<dyn MatchEngine>)> {
    let it = || users.iter().map(|(u, f)| (*u, f));
    vec![
        (
            "exact",
            Box::new(ExactEngine::from_users(it())) as Box<dyn MatchEngine>,
        ),
        (
            "hnsw-planned",
            Box::new(HnswEngine::from_users(it(), HnswConfig::default())),
        ),
        (
            "hnsw-graph",
            Box::new(HnswEngine::from_users(it(), graph_cfg())),
        ),
    ]
}

fn me() -> (UserId, Features) {
    (
        synth::user_id(1_000_000),
        person(Gender::Male, 22, "ISTJ", Hobby::Sports, "Computer Science"),
    )
}

#[test]
fn two_mbti_letters_raise_candidates_having_them() {
    // The original compared "EN" with four-letter types and scored everyone 0.
    let users: Vec<_> = ["ISTJ", "ESTJ", "INTJ", "ENTJ", "ENFP", "ISFP"]
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                synth::user_id(i as u64),
                person(Gender::Female, 22, m, Hobby::Arts, "Law"),
            )
        })
        .collect();
    let mut o = MatchOptions::any();
    o.mbti = "EN".parse().unwrap();
    for (name, e) in engines(&users) {
        let r = e.rank(&request(me(), o, 6), &mut ChaCha8Rng::seed_from_u64(1));
        let ids: Vec<UserId> = r.candidates.iter().map(|c| c.user_id).collect();
        assert_eq!(r.candidates[0].score, 1.0, "{name}");
        assert_eq!(r.candidates[1].score, 1.0, "{name}");
        let top: Vec<UserId> = ids[..2].to_vec();
        assert!(
            top.contains(&users[3].0) && top.contains(&users[4].0),
            "{name}: {ids:?}"
        );
        assert!(r.candidates[5].score < r.candidates[2].score, "{name}");
    }
}

#[test]
fn same_major_exclusion_excludes_ignoring_case_and_spacing() {
    let users = vec![
        (
            synth::user_id(1),
            person(
                Gender::Female,
                22,
                "ISTJ",
                Hobby::Sports,
                "computer  science",
            ),
        ),
        (
            synth::user_id(2),
            person(Gender::Female, 30, "ENFP", Hobby::Arts, "Law"),
        ),
    ];
    let mut o = MatchOptions::any();
    o.exclude_same_major = true;
    for (name, e) in engines(&users) {
        let r = e.rank(&request(me(), o, 8), &mut ChaCha8Rng::seed_from_u64(1));
        let ids: Vec<UserId> = r.candidates.iter().map(|c| c.user_id).collect();
        assert_eq!(ids, vec![synth::user_id(2)], "{name}");
    }
}

#[test]
fn hard_filters_hold() {
    let mut users = vec![
        (
            synth::user_id(1),
            person(Gender::Male, 22, "ISTJ", Hobby::Sports, "Law"),
        ),
        (
            synth::user_id(2),
            person(Gender::Female, 22, "ISTJ", Hobby::Sports, "Law"),
        ),
        (
            synth::user_id(3),
            person(Gender::Female, 22, "ISTJ", Hobby::Sports, "Law"),
        ),
        (
            synth::user_id(4),
            person(Gender::Female, 22, "ISTJ", Hobby::Sports, "Law"),
        ),
    ];
    users[3].1.dont_pick_me = true;
    let mut req = request(me(), MatchOptions::any(), 8);
    req.exclusions = vec![synth::user_id(2)];
    for (name, mut e) in engines(&users) {
        e.upsert(me().0, &me().1); // the requester is in the replica too
        let r = e.rank(&req, &mut ChaCha8Rng::seed_from_u64(1));
        let ids: Vec<UserId> = r.candidates.iter().map(|c| c.user_id).collect();
        assert_eq!(ids, vec![synth::user_id(3)], "{name}");
        e.remove(synth::user_id(3));
        assert!(
            e.rank(&req, &mut ChaCha8Rng::seed_from_u64(1))
                .candidates
                .is_empty(),
            "{name}"
        );
    }
}

#[test]
fn important_option_filters_when_met_and_is_reported_when_relaxed() {
    let users = vec![
        (
            synth::user_id(1),
            person(Gender::Female, 25, "ISTJ", Hobby::Sports, "Law"),
        ),
        (
            synth::user_id(2),
            person(Gender::Female, 20, "ENFP", Hobby::Game, "Law"),
        ),
    ];
    let mut o = MatchOptions::any();
    o.age = AgePreference::Older;
    o.mbti = "EN".parse().unwrap();
    o.hobby = HobbyPreference::Category(Hobby::Game);
    o.important = Important::Age;
    // User 2 scores higher overall but is younger: age is important and user 1 meets it.
    for (name, e) in engines(&users) {
        let r = e.rank(&request(me(), o, 8), &mut ChaCha8Rng::seed_from_u64(1));
        let ids: Vec<UserId> = r.candidates.iter().map(|c| c.user_id).collect();
        assert_eq!(ids, vec![synth::user_id(1)], "{name}");
        assert!(r.relaxed.is_empty());
    }
    o.contact_frequency = ContactPreference::Frequency(ContactFrequency::Rare);
    o.important = Important::ContactFrequency; // nobody is Rare
    for (name, e) in engines(&users) {
        let r = e.rank(&request(me(), o, 8), &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(r.candidates.len(), 2, "{name}");
        assert_eq!(r.candidates[0].user_id, synth::user_id(2), "{name}");
        assert_eq!(
            r.relaxed,
            vec![comatching_protocol::Criterion::ContactFrequency]
        );
    }
}

#[test]
fn empty_pool_is_no_candidate_and_late_requests_expire() {
    let users = vec![(
        synth::user_id(1),
        person(Gender::Male, 22, "ISTJ", Hobby::Sports, "Law"),
    )];
    for (name, e) in engines(&users) {
        let req = request(me(), MatchOptions::any(), 8);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let pos = ReplicaPosition::default();
        let r = answer(&*e, &req, 999, pos, &mut rng);
        assert_eq!(r.status, ReplyStatus::NoCandidate, "{name}");
        assert!(r.candidates.is_empty() && r.relaxed.is_empty());
        assert_eq!(
            answer(&*e, &req, 1_001, pos, &mut rng).status,
            ReplyStatus::Expired
        );
        let mut zero = req.clone();
        zero.k = 0;
        assert_eq!(
            answer(&*e, &zero, 0, pos, &mut rng).status,
            ReplyStatus::Invalid
        );
    }
}

/// Pearson chi-square of `counts` against a uniform distribution.
fn chi_square(counts: &[u32]) -> f64 {
    let n: u32 = counts.iter().sum();
    let expected = f64::from(n) / counts.len() as f64;
    counts
        .iter()
        .map(|&c| (f64::from(c) - expected).powi(2) / expected)
        .sum()
}

#[test]
fn ties_are_uniform_not_earliest_registered() {
    // 12 tied best candidates spread over several buckets, plus worse ones; k = 1.
    let mut users = Vec::new();
    let hobbies = [Hobby::Sports, Hobby::Arts, Hobby::Culture];
    for i in 0..12u64 {
        let mut f = person(Gender::Female, 22, "ENFP", Hobby::Game, "Law");
        f.hobbies = HobbySet::from_hobbies(&[Hobby::Game, hobbies[i as usize % 3]]).unwrap();
        users.push((synth::user_id(i), f));
    }
    for i in 12..40u64 {
        users.push((
            synth::user_id(i),
            person(Gender::Female, 22, "ISTJ", Hobby::Arts, "Law"),
        ));
    }
    let mut o = MatchOptions::any();
    o.mbti = "EN".parse().unwrap();
    o.hobby = HobbyPreference::Category(Hobby::Game);
    let req = request(me(), o, 1);
    let draws = 6_000;
    for (name, e) in engines(&users) {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut counts = vec![0u32; 12];
        for _ in 0..draws {
            let r = e.rank(&req, &mut rng);
            let pos = users
                .iter()
                .position(|(u, _)| *u == r.candidates[0].user_id)
                .unwrap();
            assert!(pos < 12, "{name}: picked a worse candidate");
            counts[pos] += 1;
        }
        // df = 11; the 0.999 quantile is 31.26.
        let chi = chi_square(&counts);
        assert!(
            chi < 31.26,
            "{name}: chi-square {chi:.1}, counts {counts:?}"
        );
        // The earliest-registered user gets about 1/12 of the picks, not all of them.
        assert!(counts[0] < draws / 6, "{name}: {counts:?}");
    }
}

#[test]
fn order_within_a_tie_is_uniform_for_k_above_one() {
    let users: Vec<_> = (0..5u64)
        .map(|i| {
            (
                synth::user_id(i),
                person(Gender::Female, 22, "ENFP", Hobby::Game, "Law"),
            )
        })
        .collect();
    let req = request(me(), MatchOptions::any(), 5);
    for (name, e) in engines(&users) {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut first = vec![0u32; 5];
        for _ in 0..3_000 {
            let r = e.rank(&req, &mut rng);
            assert_eq!(r.candidates.len(), 5);
            let pos = users
                .iter()
                .position(|(u, _)| *u == r.candidates[0].user_id)
                .unwrap();
            first[pos] += 1;
        }
        // df = 4; the 0.999 quantile is 18.47.
        assert!(chi_square(&first) < 18.47, "{name}: {first:?}");
    }
}

#[test]
fn hnsw_rebuilds_in_the_background_past_the_tombstone_threshold() {
    let users = synth::population(3_000, 5);
    let cfg = HnswConfig {
        graph_above_users: 0,
        rebuild_min_dead: 16,
        ..HnswConfig::default()
    };
    let mut e = HnswEngine::from_users(users.iter().map(|(u, f)| (*u, f)), cfg);
    let before = e.stats();
    assert!(before.graph_points > 0);
    for (u, _) in users.iter().take(2_500) {
        e.remove(*u);
    }
    e.finish_rebuilds();
    let after = e.stats();
    assert!(after.rebuilds >= 1, "{after:?}");
    assert!(
        after.graph_points < before.graph_points,
        "{before:?} {after:?}"
    );
    // Still answers correctly afterwards.
    let live: HashMap<UserId, &Features> = users[2_500..].iter().map(|(u, f)| (*u, f)).collect();
    let oracle = ExactEngine::from_users(live.iter().map(|(u, f)| (*u, *f)));
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut exact_hits = 0;
    for _ in 0..50 {
        let req = synth::request(&mut rng, &users[2_500..], 8);
        let got = e.rank(&req, &mut rng);
        let want = oracle.rank(&req, &mut rng);
        assert_eq!(filter_violations(&req, &got, |u| live.get(&u).copied()), 0);
        assert!(never_better_than_exact(&got, &want));
        exact_hits += usize::from(scores(&got) == scores(&want));
    }
    // The graph is approximate (and its parallel build is not deterministic): most, not all.
    assert!(exact_hits >= 40, "{exact_hits}/50");
}

fn scores(r: &Ranking) -> Vec<f32> {
    r.candidates.iter().map(|c| c.score).collect()
}

/// An approximate answer has as many candidates as the exact one, none scoring higher at any
/// rank, and the same relaxation.
fn never_better_than_exact(got: &Ranking, want: &Ranking) -> bool {
    got.candidates.len() == want.candidates.len()
        && scores(got).iter().zip(scores(want)).all(|(g, w)| *g <= w)
        && got.relaxed == want.relaxed
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn hnsw_top_k_scores_equal_exact(seed in any::<u64>(), n in 0usize..400, churn in 0usize..100) {
        let mut users = synth::population(n, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 1);
        let mut oracle = ExactEngine::from_users(users.iter().map(|(u, f)| (*u, f)));
        let mut planned = HnswEngine::from_users(users.iter().map(|(u, f)| (*u, f)), HnswConfig::default());
        let mut graph = HnswEngine::from_users(users.iter().map(|(u, f)| (*u, f)), graph_cfg());
        // Live updates after the build: changes and deletes.
        #[allow(clippy::needless_range_loop)] // users[i] is read and written across engines
        for i in 0..churn.min(n) {
            let e: [&mut dyn MatchEngine; 3] = [&mut oracle, &mut planned, &mut graph];
            if i % 3 == 0 {
                for x in e { x.remove(users[i].0); }
                users[i].1.dont_pick_me = true; // keep the requester pool simple: hidden now
                for x in [&mut oracle as &mut dyn MatchEngine, &mut planned, &mut graph] {
                    x.upsert(users[i].0, &users[i].1);
                }
            } else {
                users[i].1 = synth::features(&mut rng);
                for x in e { x.upsert(users[i].0, &users[i].1); }
            }
        }
        prop_assume!(!users.is_empty());
        let live: HashMap<UserId, &Features> = users.iter().map(|(u, f)| (*u, f)).collect();
        for _ in 0..10 {
            let req = synth::request(&mut rng, &users, 8);
            let want = oracle.rank(&req, &mut rng);
            prop_assert_eq!(filter_violations(&req, &want, |u| live.get(&u).copied()), 0);
            // The planner answers small pools exactly: same scores, rank by rank.
            let got = planned.rank(&req, &mut rng);
            prop_assert_eq!(filter_violations(&req, &got, |u| live.get(&u).copied()), 0);
            prop_assert_eq!(scores(&got), scores(&want));
            prop_assert_eq!(&got.relaxed, &want.relaxed);
            // The forced graph path is approximate: never better, never a violation.
            let got = graph.rank(&req, &mut rng);
            prop_assert_eq!(filter_violations(&req, &got, |u| live.get(&u).copied()), 0);
            prop_assert!(never_better_than_exact(&got, &want));
        }
    }
}

#[test]
fn engines_rebuild_from_the_store() {
    use crate::store::{self, StoreBackend};
    let dir = tempfile::tempdir().unwrap();
    let mut s = store::open(StoreBackend::Sqlite, dir.path()).unwrap();
    let history = synth::relay_history(comatching_protocol::Epoch(3), 50, 300, 8);
    let plan = store::apply_batch(&mut *s, &history).unwrap();
    assert_eq!(plan.replay_from(), 301);
    let count = s.meta().unwrap().count as usize;
    for kind in [EngineKind::Exact, EngineKind::Buckets] {
        let e = from_store(kind, &*s).unwrap();
        assert_eq!((e.kind(), e.len()), (kind, count));
    }
}

#[test]
fn large_tied_levels_are_sampled_uniformly_and_respect_exclusions() {
    // 240 tied best candidates over many buckets: large enough for rejection sampling.
    let mut users = Vec::new();
    for i in 0..240u64 {
        let mut f = person(
            Gender::Female,
            19 + (i % 20) as i64,
            "ENFP",
            Hobby::Game,
            "Law",
        );
        f.hobbies = HobbySet::from_bits(0b10_0000 | (i % 32) as u8).unwrap();
        users.push((synth::user_id(i), f));
    }
    let mut o = MatchOptions::any();
    o.mbti = "EN".parse().unwrap();
    o.hobby = HobbyPreference::Category(Hobby::Game);
    let mut req = request(me(), o, 1);
    req.exclusions = users[..40].iter().map(|(u, _)| *u).collect();
    let draws = 20_000;
    for (name, e) in engines(&users) {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut counts = vec![0u32; 240];
        for _ in 0..draws {
            let r = e.rank(&req, &mut rng);
            let pos = users
                .iter()
                .position(|(u, _)| *u == r.candidates[0].user_id)
                .unwrap();
            counts[pos] += 1;
        }
        assert!(
            counts[..40].iter().all(|&c| c == 0),
            "{name}: picked an excluded user"
        );
        // df = 199; the 0.999 quantile is 267.0.
        let chi = chi_square(&counts[40..]);
        assert!(chi < 267.0, "{name}: chi-square {chi:.1}");
    }
}

#[test]
fn partial_ties_at_the_cut_are_included_uniformly() {
    // 2 clear winners, then 10 tied for the last slot of k = 3.
    let mut users = vec![
        (
            synth::user_id(0),
            person(Gender::Female, 22, "ENFP", Hobby::Game, "Law"),
        ),
        (
            synth::user_id(1),
            person(Gender::Female, 22, "ENFP", Hobby::Game, "Law"),
        ),
    ];
    for i in 2..12u64 {
        users.push((
            synth::user_id(i),
            person(Gender::Female, 22, "ESTJ", Hobby::Game, "Law"),
        ));
    }
    let mut o = MatchOptions::any();
    o.mbti = "EN".parse().unwrap();
    let req = request(me(), o, 3);
    for (name, e) in engines(&users) {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut counts = vec![0u32; 10];
        for _ in 0..5_000 {
            let r = e.rank(&req, &mut rng);
            let ids: Vec<UserId> = r.candidates.iter().map(|c| c.user_id).collect();
            assert_eq!(ids.len(), 3);
            assert!(
                ids[..2].contains(&users[0].0) && ids[..2].contains(&users[1].0),
                "{name}"
            );
            let pos = users.iter().position(|(u, _)| *u == ids[2]).unwrap();
            counts[pos - 2] += 1;
        }
        // df = 9; the 0.999 quantile is 27.88.
        assert!(chi_square(&counts) < 27.88, "{name}: {counts:?}");
    }
}

#[test]
fn engine_kinds_are_named_as_they_are_configured() {
    // The names /status shows and the command line takes: each one reads back as itself.
    for kind in [EngineKind::Exact, EngineKind::Buckets, EngineKind::Hnsw] {
        assert_eq!(kind.as_str().parse::<EngineKind>(), Ok(kind));
    }
    assert_eq!(EngineKind::Exact.as_str(), "exact");
    assert_eq!(EngineKind::Buckets.as_str(), "buckets");
    let err = "flat".parse::<EngineKind>().unwrap_err();
    assert!(
        err.contains("\"flat\"") && err.contains("buckets|exact"),
        "{err}"
    );
    assert_eq!(EngineKind::Hnsw.resolved(), EngineKind::Buckets);
    assert!(EngineKind::Hnsw.deprecation().is_some());
    assert!(EngineKind::Buckets.deprecation().is_none());
}

#[test]
fn engines_are_empty_exactly_when_they_hold_nobody() {
    for kind in [EngineKind::Exact, EngineKind::Buckets] {
        let mut e = build(kind, std::iter::empty());
        assert!(e.is_empty(), "{kind:?}");
        let u = synth::user_id(1);
        e.upsert(u, &person(Gender::Female, 22, "ENFP", Hobby::Sports, "Art"));
        assert!(!e.is_empty(), "{kind:?}");
        e.remove(u);
        assert!(e.is_empty(), "{kind:?}");
    }
}

/// `n` women alike but for their age, 19 + i mod 20 (so the first 20 each have a score key of
/// their own), with ids from `first_id` on.
fn women_by_age(n: u64, first_id: u64) -> Vec<(UserId, Features)> {
    (0..n)
        .map(|i| {
            let age = 19 + (i % 20) as i64;
            let f = person(Gender::Female, age, "ENFP", Hobby::Sports, "Art");
            (synth::user_id(first_id + i), f)
        })
        .collect()
}

/// 16 women, each alone in her score key (ages 19..=34), in a graph engine that rebuilds once
/// more than a quarter of its points are dead.
fn sixteen_keys_in_a_graph() -> (Vec<(UserId, Features)>, HnswEngine) {
    let users = women_by_age(16, 1);
    let cfg = HnswConfig {
        graph_above_users: 0,
        rebuild_min_dead: 1,
        rebuild_dead_fraction: 0.25,
        ..HnswConfig::default()
    };
    let e = HnswEngine::from_users(users.iter().map(|(u, f)| (*u, f)), cfg);
    assert_eq!(e.stats().graph_points, 16);
    (users, e)
}

#[test]
fn hnsw_changes_made_during_a_rebuild_reach_the_new_graph() {
    let (users, mut e) = sixteen_keys_in_a_graph();
    for (u, _) in &users[..5] {
        e.remove(*u); // the fifth starts a rebuild over the 11 keys left
    }
    // Before it is swapped in: a key that was not in it fills, and one that was empties.
    let newcomer = person(Gender::Female, 35, "ENFP", Hobby::Sports, "Art");
    e.upsert(synth::user_id(100), &newcomer);
    e.remove(users[5].0);
    e.finish_rebuilds();
    let s = e.stats();
    assert_eq!(s.rebuilds, 1, "{s:?}");
    assert_eq!(
        s.graph_points, 12,
        "the 11 keys built and the new one: {s:?}"
    );
    assert_eq!(s.tombstones, 1, "the key emptied meanwhile is dead: {s:?}");
    assert_eq!(s.nonempty_keys, 11, "{s:?}");
}

#[test]
fn hnsw_rebuild_starts_just_past_the_dead_fraction() {
    // 16 users, each alone in its score key (ages 19..=34): the graph has 16 points, and each
    // removal kills one. With a fraction of 1/4 the fifth dead point (5 > 4) starts a rebuild;
    // the fourth (4 > 4) does not.
    let (users, mut e) = sixteen_keys_in_a_graph();
    for (n, (u, _)) in users.iter().take(5).enumerate() {
        e.remove(*u);
        e.finish_rebuilds();
        let s = e.stats();
        if n < 4 {
            assert_eq!(
                (s.rebuilds, s.tombstones),
                (0, n + 1),
                "after {} removals",
                n + 1
            );
        } else {
            assert_eq!(s.rebuilds, 1, "after {} removals: {s:?}", n + 1);
            assert_eq!((s.graph_points, s.tombstones), (11, 0), "{s:?}");
        }
    }
}

#[test]
fn a_request_is_answered_up_to_its_deadline_and_expired_after_it() {
    let me = (
        synth::user_id(1),
        person(Gender::Male, 25, "ISTJ", Hobby::Sports, "Law"),
    );
    let other = person(Gender::Female, 24, "ENFP", Hobby::Sports, "Art");
    let e = build(EngineKind::Buckets, [(synth::user_id(2), &other)]);
    let req = request(me, MatchOptions::any(), 1);
    let rng = ChaCha8Rng::seed_from_u64(1);
    let at = |now| answer(&*e, &req, now, ReplicaPosition::default(), &mut rng.clone()).status;
    assert_eq!(at(req.deadline_unix_ms), ReplyStatus::Ok);
    assert_eq!(at(req.deadline_unix_ms + 1), ReplyStatus::Expired);
}

/// `filter_violations` is the oracle of the engine tests and the benchmark: each rule it checks
/// must be seen on its own, by a ranking that breaks that rule and nothing else.
#[test]
fn the_violation_checker_sees_each_rule_broken_alone() {
    let me_id = synth::user_id(1);
    let me_f = person(Gender::Male, 22, "ENFP", Hobby::Sports, "Math");
    let mut o = MatchOptions::any();
    o.age = AgePreference::Older;
    o.hobby = HobbyPreference::Category(Hobby::Sports);
    o.important = Important::Age;
    o.exclude_same_major = true;
    let mut req = request((me_id, me_f.clone()), o, 8);
    let excluded = synth::user_id(9);
    req.exclusions = vec![excluded];
    let woman = |age, hobby, major| person(Gender::Female, age, "ISTJ", hobby, major);
    let mut opted_out = woman(25, Hobby::Sports, "Law");
    opted_out.dont_pick_me = true;
    let features: HashMap<UserId, Features> = [
        (2, woman(25, Hobby::Sports, "Law")), // meets everything: the best score
        (3, woman(26, Hobby::Game, "Art")),   // meets age only: a lower score
        (4, person(Gender::Male, 25, "ISTJ", Hobby::Sports, "Law")),
        (5, opted_out),
        (6, woman(25, Hobby::Sports, "Math")), // the requester's major
        (7, woman(20, Hobby::Sports, "Law")),  // younger: misses the important option
        (9, woman(25, Hobby::Sports, "Law")),  // excluded by id
    ]
    .into_iter()
    .map(|(i, f)| (synth::user_id(i), f))
    .chain([(me_id, woman(25, Hobby::Sports, "Law"))]) // "self", looked up as a valid woman
    .collect();
    let scorer = crate::score::Scorer::new(&me_f, &o);
    let c = |i: u64| {
        let user_id = if i == 1 { me_id } else { synth::user_id(i) };
        let f = &features[&user_id];
        Candidate {
            user_id,
            score: crate::score::Scorer::to_unit(scorer.score(crate::score::ScoreKey::of(f))),
        }
    };
    let count = |cands: Vec<Candidate>| {
        let r = Ranking {
            candidates: cands,
            relaxed: Vec::new(),
        };
        filter_violations(&req, &r, |u| features.get(&u))
    };
    assert!(c(2).score > c(3).score);
    assert_eq!(
        count(vec![c(2), c(3)]),
        0,
        "a ranking that keeps every rule"
    );
    let mut wrong_score = c(2);
    wrong_score.score -= 0.01;
    let unknown = |i| Candidate {
        user_id: synth::user_id(i),
        score: 1.0,
    };
    for (rule, cands, want) in [
        ("the requester himself", vec![c(2), c(1)], 1),
        ("the wrong gender", vec![c(2), c(4)], 1),
        ("opted out", vec![c(2), c(5)], 1),
        ("excluded", vec![c(2), c(9)], 1),
        ("the same major", vec![c(2), c(6)], 1),
        ("twice", vec![c(2), c(2)], 1),
        ("a wrong score", vec![wrong_score], 1),
        (
            "the important option missed, not reported",
            vec![c(2), c(7)],
            1,
        ),
        ("not best first", vec![c(3), c(2)], 1),
        (
            "two users the replica does not have",
            vec![unknown(50), unknown(51)],
            2,
        ),
    ] {
        assert_eq!(count(cands), want, "{rule}");
    }
}

/// With a graph (forced on), most planned queries are answered from the levels the graph
/// found; the rest fall back to enumeration, and both are counted. Without one (the default)
/// nothing walks a graph.
#[test]
fn graph_walks_answer_most_queries_and_fallbacks_are_counted() {
    let users = synth::population(3_000, 11);
    let graph_cfg = HnswConfig {
        graph_above_users: 0,
        ..HnswConfig::default()
    };
    let graph = HnswEngine::from_users(users.iter().map(|(u, f)| (*u, f)), graph_cfg);
    let planned = HnswEngine::from_users(users.iter().map(|(u, f)| (*u, f)), HnswConfig::default());
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for _ in 0..100 {
        let req = synth::request(&mut rng, &users, 8);
        graph.rank(&req, &mut rng);
        planned.rank(&req, &mut rng);
    }
    let s = graph.stats();
    let walks = s.graph_answers + s.graph_fallbacks;
    assert!(walks >= 100, "every query plans at least once: {s:?}");
    assert!(
        s.graph_answers * 10 >= walks * 9,
        "at least 90 % from the graph: {s:?}"
    );
    let p = planned.stats();
    assert_eq!((p.graph_answers, p.graph_fallbacks), (0, 0), "{p:?}");
    // Asking for more than the pool holds: the walk falls short and enumeration answers.
    let few = &users[..20];
    let small = HnswEngine::from_users(few.iter().map(|(u, f)| (*u, f)), graph_cfg);
    let mut req = synth::request(&mut rng, few, 64);
    req.options = MatchOptions::any();
    let got = small.rank(&req, &mut rng);
    assert!(got.candidates.len() < 64);
    let s = small.stats();
    assert_eq!((s.graph_answers, s.graph_fallbacks), (0, 1), "{s:?}");

    // An important option nobody meets: the walk for it finds no key and falls back (and the
    // enumeration confirms nobody), then the relaxed walk is answered by the graph.
    let women = women_by_age(30, 1_000);
    let e = HnswEngine::from_users(women.iter().map(|(u, f)| (*u, f)), graph_cfg);
    let mut o = MatchOptions::any();
    o.contact_frequency = ContactPreference::Frequency(ContactFrequency::Rare);
    o.important = Important::ContactFrequency;
    let me = person(Gender::Male, 25, "ISTJ", Hobby::Sports, "Law");
    let got = e.rank(&request((synth::user_id(1), me), o, 8), &mut rng);
    assert_eq!(got.candidates.len(), 8);
    assert_eq!(got.relaxed, vec![Criterion::ContactFrequency]);
    let s = e.stats();
    assert_eq!((s.graph_answers, s.graph_fallbacks), (1, 1), "{s:?}");
}

/// `graph_above_users` is a strict bound: a pool of exactly that many is enumerated and gets
/// no graph; one more builds the graph (at start or as the pool grows) and walks it; back at
/// the bound, the graph is kept but not walked.
#[test]
fn the_graph_is_built_and_walked_only_above_its_threshold() {
    let women = women_by_age(21, 1_000);
    let cfg = HnswConfig {
        graph_above_users: 20,
        ..HnswConfig::default()
    };
    let me = person(Gender::Male, 25, "ISTJ", Hobby::Sports, "Law");
    let req = request((synth::user_id(1), me), MatchOptions::any(), 4);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut e = HnswEngine::from_users(women[..19].iter().map(|(u, f)| (*u, f)), cfg);
    assert_eq!(e.config(), cfg);
    e.upsert(women[19].0, &women[19].1); // 20: at the bound
    e.finish_rebuilds();
    e.rank(&req, &mut rng);
    let s = e.stats();
    assert_eq!(
        (s.graph_points, s.graph_answers),
        (0, 0),
        "at the bound: {s:?}"
    );
    let built = HnswEngine::from_users(women.iter().map(|(u, f)| (*u, f)), cfg);
    assert_eq!(
        built.stats().graph_points,
        20,
        "above it at start (20 distinct keys)"
    );
    // Growing past the bound starts a build in the background, even by a user who joins a
    // key that already has somebody (women[20] is as old as women[0]).
    e.upsert(women[20].0, &women[20].1);
    e.finish_rebuilds();
    e.rank(&req, &mut rng);
    let s = e.stats();
    assert!(s.graph_points > 0 && s.graph_answers == 1, "above: {s:?}");
    e.remove(women[20].0);
    e.rank(&req, &mut rng);
    assert_eq!(e.stats().graph_answers, 1, "back at the bound: not walked");
}

/// A degenerate graph (one link per point, hnsw_rs issue #37 at its worst) leaves most points
/// unlinked: they are reported as orphans, and the planner still answers within the rules,
/// because it expands every level it walks to all of that level's keys.
#[test]
fn orphans_are_reported_and_do_not_hide_users() {
    let users = synth::population(3_000, 5);
    let cfg = HnswConfig {
        graph_above_users: 0,
        max_nb_connection: 1,
        ef_construction: 2,
        ..HnswConfig::default()
    };
    let e = HnswEngine::from_users(users.iter().map(|(u, f)| (*u, f)), cfg);
    let s = e.stats();
    assert!(
        s.orphans > s.graph_points / 2 && s.orphans < s.graph_points,
        "{s:?}"
    );
    let live: HashMap<UserId, &Features> = users.iter().map(|(u, f)| (*u, f)).collect();
    let oracle = ExactEngine::from_users(users.iter().map(|(u, f)| (*u, f)));
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for _ in 0..30 {
        let req = synth::request(&mut rng, &users, 8);
        let got = e.rank(&req, &mut rng);
        let want = oracle.rank(&req, &mut rng);
        assert_eq!(filter_violations(&req, &got, |u| live.get(&u).copied()), 0);
        assert!(never_better_than_exact(&got, &want));
        assert_eq!(got.candidates.len(), want.candidates.len());
    }
}

#[test]
fn top_k_takes_the_best_and_cuts_ties_at_exactly_k() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let items: Vec<(u16, u32)> = vec![(5, 1), (9, 2), (5, 3), (7, 4), (5, 5), (1, 6)];
    assert!(select::top_k_fair(&items, 0, &mut rng).is_empty());
    assert!(select::top_k_fair::<u32>(&[], 3, &mut rng).is_empty());
    let all = select::top_k_fair(&items, 10, &mut rng);
    let scores: Vec<u16> = all.iter().map(|x| x.0).collect();
    assert_eq!(scores, vec![9, 7, 5, 5, 5, 1], "everything, best first");
    for _ in 0..20 {
        let three = select::top_k_fair(&items, 3, &mut rng);
        assert_eq!(three.len(), 3);
        assert_eq!((three[0], three[1]), ((9, 2), (7, 4)));
        assert_eq!(three[2].0, 5, "one of the three tied at 5");
    }
}

/// A large level with few eligible members: rejection sampling runs out of attempts and the
/// rest is enumerated, skipping what was already drawn. Each eligible member comes once, and
/// never more than asked for.
#[test]
fn sampling_a_level_takes_exactly_what_is_needed_each_member_once() {
    let a: Vec<u32> = (0..600).collect();
    let b: Vec<u32> = (600..1_000).collect();
    let buckets: Vec<&[u32]> = vec![&a, &b];
    let eligible = |m: &u32| m.is_multiple_of(20); // 50 of 1,000
    for seed in 0..20 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for need in [0, 10, 50, 80] {
            let got = select::sample_level(&buckets, need, eligible, &mut rng);
            let distinct: HashSet<u32> = got.iter().map(|m| **m).collect();
            assert_eq!(got.len(), need.min(50), "seed {seed}, need {need}");
            assert_eq!(distinct.len(), got.len(), "seed {seed}: a member twice");
            assert!(got.iter().all(|m| eligible(m)));
        }
    }
    let none: Vec<&[u32]> = Vec::new();
    assert!(select::sample_level(&none, 5, eligible, &mut ChaCha8Rng::seed_from_u64(1)).is_empty());
}

/// Without a rebuild: a key emptied and filled again is live again in the graph, and a key
/// the graph never had is inserted into it.
#[test]
fn hnsw_keys_refilled_or_new_are_live_in_the_graph() {
    let (users, mut e) = sixteen_keys_in_a_graph();
    e.remove(users[0].0);
    assert_eq!(e.stats().tombstones, 1);
    e.upsert(users[0].0, &users[0].1);
    let s = e.stats();
    assert_eq!((s.tombstones, s.graph_points), (0, 16), "{s:?}");
    let newcomer = person(Gender::Female, 35, "ENFP", Hobby::Sports, "Art");
    e.upsert(synth::user_id(100), &newcomer);
    let s = e.stats();
    assert_eq!(
        (s.tombstones, s.graph_points, s.rebuilds),
        (0, 17, 0),
        "{s:?}"
    );
}
