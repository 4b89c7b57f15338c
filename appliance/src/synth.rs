//! Seeded synthetic data with the shapes of the original service's export (DOMAIN.md): users,
//! match requests, and relay histories for the sync tests.
//!
//! Owns nothing durable; everything is a pure function of a seed. It must not be used to answer
//! real requests.

use comatching_protocol::{
    Age, AgePreference, ContactFrequency, ContactPreference, Epoch, Features, Gender, Hobby,
    HobbyPreference, HobbySet, Important, Major, MatchOptions, MatchRequest, Mbti, MbtiPreference,
    RequestId, Requester, SnapshotUser, SyncEvent, SyncOp, UserId,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A time-ordered user id for registration number `n` (UUIDv7 layout: `n` in the timestamp
/// bits, so smaller `n` means registered earlier).
pub fn user_id(n: u64) -> UserId {
    let n = u128::from(n);
    let tail = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) & ((1u128 << 62) - 1);
    let raw = (n << 80) | (0x7u128 << 76) | (0b10u128 << 62) | tail;
    UserId::from_uuid(uuid::Uuid::from_u128(raw)).expect("v7 layout")
}

/// Ages 19..=40: mode at 20–21, a long thin tail.
const AGE_WEIGHTS: [u32; 22] = [
    60, 220, 200, 140, 100, 80, 60, 40, 30, 20, 15, 6, 5, 4, 4, 3, 3, 2, 2, 2, 1, 1,
];

/// 39 majors with a skewed distribution (a few big departments, many small ones).
pub const MAJORS: [&str; 39] = [
    "Computer Science",
    "Business Administration",
    "Economics",
    "Psychology",
    "Mechanical Engineering",
    "Electrical Engineering",
    "Nursing",
    "English Literature",
    "Korean Literature",
    "Media and Communication",
    "Law",
    "Chemistry",
    "Physics",
    "Mathematics",
    "Biology",
    "Architecture",
    "Civil Engineering",
    "Chemical Engineering",
    "Industrial Design",
    "Visual Design",
    "Music",
    "Physical Education",
    "History",
    "Philosophy",
    "Sociology",
    "Political Science",
    "International Studies",
    "Chinese Studies",
    "Japanese Studies",
    "Statistics",
    "Pharmacy",
    "Medicine",
    "Food Science",
    "Social Welfare",
    "Education",
    "Early Childhood Education",
    "Theology",
    "Data Science",
    "Materials Engineering",
];

fn weighted<R: Rng + ?Sized>(rng: &mut R, weights: &[u32]) -> usize {
    let total: u32 = weights.iter().sum();
    let mut x = rng.random_range(0..total);
    for (i, &w) in weights.iter().enumerate() {
        if x < w {
            return i;
        }
        x -= w;
    }
    weights.len() - 1
}

fn major<R: Rng + ?Sized>(rng: &mut R) -> Major {
    // Zipf-like: weight 1/(rank+3).
    let weights: Vec<u32> = (0..MAJORS.len() as u32).map(|r| 3000 / (r + 3)).collect();
    Major::new(MAJORS[weighted(rng, &weights)]).expect("valid major")
}

/// One synthetic profile: women/men ≈ 54/46, contact NORMAL/FREQUENT/RARE ≈ 65/26/9 %, 1–4 hobby
/// categories, 3 % opted out of being picked.
pub fn features<R: Rng + ?Sized>(rng: &mut R) -> Features {
    let gender = if rng.random_range(0..100) < 54 {
        Gender::Female
    } else {
        Gender::Male
    };
    let age = Age::new(i64::from(Age::MIN) + weighted(rng, &AGE_WEIGHTS) as i64).expect("age");
    let n_hobbies = 1 + weighted(rng, &[35, 35, 20, 10]);
    let mut bits = 0u8;
    while bits.count_ones() < n_hobbies as u32 {
        bits |= 1 << rng.random_range(0..6);
    }
    let contact_frequency = [
        ContactFrequency::Normal,
        ContactFrequency::Frequent,
        ContactFrequency::Rare,
    ][weighted(rng, &[65, 26, 9])];
    Features {
        gender,
        age,
        mbti: Mbti::from_bits(rng.random_range(0..16)),
        hobbies: HobbySet::from_bits(bits).expect("non-empty"),
        contact_frequency,
        major: major(rng),
        dont_pick_me: rng.random_range(0..100) < 3,
    }
}

/// `n` users with ids `user_id(0..n)` (registration order), seeded.
pub fn population(n: usize, seed: u64) -> Vec<(UserId, Features)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n as u64)
        .map(|i| (user_id(i), features(&mut rng)))
        .collect()
}

/// [`population`] as snapshot rows, every user at version 1.
pub fn snapshot(n: usize, seed: u64) -> Vec<SnapshotUser> {
    population(n, seed)
        .into_iter()
        .map(|(user_id, features)| SnapshotUser {
            user_id,
            version: 1,
            features,
        })
        .collect()
}

/// Options shaped like the real front end: two MBTI letters from different axes, usually one
/// hobby category, often an important option, sometimes exclude-same-major.
pub fn options<R: Rng + ?Sized>(rng: &mut R) -> MatchOptions {
    let age = [
        AgePreference::Younger,
        AgePreference::Equal,
        AgePreference::Older,
        AgePreference::Any,
    ][weighted(rng, &[25, 20, 35, 20])];
    let a1 = rng.random_range(0..4usize);
    let a2 = (a1 + rng.random_range(1..4usize)) % 4;
    let letter = |axis: usize, rng: &mut R| Mbti::from_bits(rng.random_range(0..16)).letter(axis);
    let l1 = letter(a1, rng);
    let l2 = letter(a2, rng);
    let mbti: MbtiPreference = format!("{l1}{l2}").parse().expect("two axes");
    let hobby = if rng.random_range(0..100) < 85 {
        HobbyPreference::Category(Hobby::ALL[rng.random_range(0..6)])
    } else {
        HobbyPreference::Any
    };
    let contact_frequency = if rng.random_range(0..100) < 75 {
        ContactPreference::Frequency(ContactFrequency::ALL[rng.random_range(0..3)])
    } else {
        ContactPreference::Any
    };
    let mut o = MatchOptions {
        age,
        mbti,
        hobby,
        contact_frequency,
        exclude_same_major: rng.random_range(0..100) < 30,
        important: Important::None,
    };
    if rng.random_range(0..100) < 60 {
        let choices: Vec<Important> = [
            Important::Age,
            Important::Mbti,
            Important::Hobby,
            Important::ContactFrequency,
        ]
        .into_iter()
        .filter(|i| o.is_set(i.criterion().expect("set")))
        .collect();
        if !choices.is_empty() {
            o.important = choices[rng.random_range(0..choices.len())];
        }
    }
    o.validate().expect("valid options")
}

/// A request from a random member of `population`; 10 % of requesters were already matched
/// with one or two users, who are excluded.
pub fn request<R: Rng + ?Sized>(
    rng: &mut R,
    population: &[(UserId, Features)],
    k: u16,
) -> MatchRequest {
    let (user_id, features) = population[rng.random_range(0..population.len())].clone();
    let mut exclusions = Vec::new();
    if rng.random_range(0..100) < 10 {
        for _ in 0..rng.random_range(1..=2) {
            exclusions.push(population[rng.random_range(0..population.len())].0);
        }
    }
    MatchRequest {
        request_id: RequestId::from_uuid(uuid::Uuid::from_u128(rng.random())).expect("any uuid"),
        deadline_unix_ms: u64::MAX,
        requester: Requester { user_id, features },
        options: options(rng),
        exclusions,
        k,
    }
}

/// A relay outbox history of `len` events over `users` users, seqs 1..=len, per-user versions
/// increasing: creates, updates and deletes (a deleted user may come back with a newer version).
pub fn relay_history(epoch: Epoch, users: usize, len: usize, seed: u64) -> Vec<SyncEvent> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut versions = vec![0u64; users.max(1)];
    let mut live = vec![false; users.max(1)];
    (1..=len as u64)
        .map(|seq| {
            let u = rng.random_range(0..versions.len());
            versions[u] += 1;
            let op = if live[u] && rng.random_range(0..100) < 30 {
                live[u] = false;
                SyncOp::Delete
            } else {
                live[u] = true;
                SyncOp::Upsert(features(&mut rng))
            };
            SyncEvent {
                epoch,
                seq,
                user_id: user_id(u as u64),
                version: versions[u],
                op,
            }
        })
        .collect()
}
