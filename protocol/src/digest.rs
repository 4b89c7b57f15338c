//! Order-independent digests of a replica: the wrapping sum of a 64-bit mix of each live user's
//! entry. Two kinds, one type:
//!
//! * the **version digest** ([`Digest::add`]) over `(user_id, version)` — on the wire in `Hello`
//!   and snapshot framing, kept by both sides incrementally; comparing `(count, digest)` at hello
//!   time tells whether two replicas hold the same versions of the same users without shipping
//!   them;
//! * the **features digest** ([`Digest::add_features`]) over `(user_id, features)` — what a
//!   matcher would actually see. Never on the wire: the relay writes one features value per
//!   version, so versions are enough to decide a repair. It exists so that the appliance's
//!   `/status` can show that its store and its match engine hold the same content, and the
//!   fault matrix's checker can compare both with the relay's truth (a bug that keeps versions
//!   right and content wrong — a stale engine, a lost delete — shows up only here).
//!
//! A sum, unlike XOR, does not cancel a pair of equal entries, and it supports removal.

use serde::{Deserialize, Serialize};

use crate::domain::{ContactFrequency, Features, Gender};
use crate::ids::UserId;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Digest(pub u64);

/// splitmix64's finaliser: a cheap, well-distributed 64-bit mix. Fixed forever: it is part of
/// the wire contract.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The contribution of one live user at one version.
pub fn entry_hash(user: UserId, version: u64) -> u64 {
    let id = user.as_u128();
    let hi = (id >> 64) as u64;
    let lo = id as u64;
    mix(mix(mix(hi) ^ lo) ^ version)
}

/// The contribution of one live user's matching features to the features digest. Every field
/// goes in through a fixed encoding of its own (not serde), so a change to a wire format cannot
/// silently change it.
pub fn features_hash(user: UserId, f: &Features) -> u64 {
    let id = user.as_u128();
    let mut h = mix(mix((id >> 64) as u64) ^ id as u64 ^ 0x6665_6174_7572_6573);
    let freq = match f.contact_frequency {
        ContactFrequency::Frequent => 1u64,
        ContactFrequency::Normal => 2,
        ContactFrequency::Rare => 3,
    };
    let gender = match f.gender {
        Gender::Male => 1u64,
        Gender::Female => 2,
    };
    let small = gender
        | u64::from(f.age.years()) << 8
        | u64::from(f.mbti.bits()) << 16
        | u64::from(f.hobbies.bits()) << 24
        | freq << 32
        | u64::from(f.dont_pick_me) << 40;
    h = mix(h ^ small);
    let major = f.major.as_str().as_bytes();
    h = mix(h ^ major.len() as u64);
    for chunk in major.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = mix(h ^ u64::from_le_bytes(word));
    }
    h
}

impl Digest {
    /// Adds a live user to a features digest.
    pub fn add_features(&mut self, user: UserId, f: &Features) {
        self.0 = self.0.wrapping_add(features_hash(user, f));
    }
    /// Removes a user (as last added) from a features digest.
    pub fn remove_features(&mut self, user: UserId, f: &Features) {
        self.0 = self.0.wrapping_sub(features_hash(user, f));
    }
    /// The features digest of `entries`.
    pub fn of_features<'a, I: IntoIterator<Item = (UserId, &'a Features)>>(entries: I) -> Digest {
        let mut d = Digest::default();
        for (u, f) in entries {
            d.add_features(u, f);
        }
        d
    }
    pub fn add(&mut self, user: UserId, version: u64) {
        self.0 = self.0.wrapping_add(entry_hash(user, version));
    }
    pub fn remove(&mut self, user: UserId, version: u64) {
        self.0 = self.0.wrapping_sub(entry_hash(user, version));
    }
    pub fn of<I: IntoIterator<Item = (UserId, u64)>>(entries: I) -> Digest {
        let mut d = Digest::default();
        for (u, v) in entries {
            d.add(u, v);
        }
        d
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    const PINNED_DENSE: &str = "acd5f63d6999ab67";

    fn uid(n: u128) -> UserId {
        // Force the version nibble to 7 and the variant bits to RFC 4122.
        let raw = (n & !(0xf << 76) & !(0b11 << 62)) | (0x7 << 76) | (0b10 << 62);
        UserId::from_uuid(Uuid::from_u128(raw)).unwrap()
    }

    #[test]
    fn pinned_value() {
        // Pins the hash: changing it breaks every deployed replica's digest comparison.
        assert_eq!(entry_hash(uid(1), 1), entry_hash(uid(1), 1));
        assert_eq!(
            format!("{:016x}", entry_hash(uid(0), 0)),
            "f3a335ff0989cac6"
        );
    }

    #[test]
    fn pinned_for_a_dense_id_and_displayed_as_16_hex_digits() {
        // An id with bits set everywhere: a mix step that ORs instead of XORing changes it.
        let dense = uid(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(format!("{:016x}", entry_hash(dense, 7)), PINNED_DENSE);
        assert_eq!(Digest(0xab).to_string(), "00000000000000ab");
        assert_eq!(Digest(u64::MAX).to_string(), "ffffffffffffffff");
    }

    fn features(major: &str) -> Features {
        Features {
            gender: Gender::Female,
            age: crate::domain::Age::new(22).unwrap(),
            mbti: "ENFP".parse().unwrap(),
            hobbies: crate::domain::HobbySet::from_bits(0b11).unwrap(),
            contact_frequency: ContactFrequency::Normal,
            major: crate::domain::Major::new(major).unwrap(),
            dont_pick_me: false,
        }
    }

    #[test]
    fn features_hash_is_pinned_and_sees_every_field() {
        let base = features("Computer Science");
        assert_eq!(
            format!("{:016x}", features_hash(uid(0), &base)),
            "e344c015f396ca91",
            "pinned: the checker and /status compare it across processes"
        );
        let mut variants = vec![base.clone()];
        let mut f = base.clone();
        f.gender = Gender::Male;
        variants.push(f);
        let mut f = base.clone();
        f.age = crate::domain::Age::new(23).unwrap();
        variants.push(f);
        let mut f = base.clone();
        f.mbti = "INFP".parse().unwrap();
        variants.push(f);
        let mut f = base.clone();
        f.hobbies = crate::domain::HobbySet::from_bits(0b1).unwrap();
        variants.push(f);
        for freq in [ContactFrequency::Frequent, ContactFrequency::Rare] {
            let mut f = base.clone();
            f.contact_frequency = freq;
            variants.push(f);
        }
        let mut f = base.clone();
        f.dont_pick_me = true;
        variants.push(f);
        // Majors that differ only past the first 8 bytes, or only in length.
        variants.push(features("Computer Sciences"));
        variants.push(features("Computer Sciencf"));
        variants.push(features("Computer"));
        let hashes: std::collections::HashSet<u64> =
            variants.iter().map(|f| features_hash(uid(5), f)).collect();
        assert_eq!(hashes.len(), variants.len(), "a field is not hashed");
        assert_ne!(features_hash(uid(5), &base), features_hash(uid(6), &base));
        // More pins, with majors of other lengths: how the length is mixed in (`^`, not `|`)
        // shows only where the running hash has a bit of the length set.
        let pinned: Vec<String> = ["Art", "Physics", "Law", "Mechanical Engineering"]
            .into_iter()
            .map(|m| format!("{:016x}", features_hash(uid(5), &features(m))))
            .collect();
        assert_eq!(
            pinned,
            [
                "064cd304b12bdf33",
                "66e990366a5c645d",
                "6b10e641b75af27b",
                "9d175615bf06276c"
            ]
        );
    }

    #[test]
    fn features_digest_adds_and_removes() {
        let (a, b) = (features("Physics"), features("Art"));
        let mut d = Digest::of_features([(uid(1), &a), (uid(2), &b)]);
        assert_ne!(d, Digest::default());
        d.remove_features(uid(1), &a);
        assert_eq!(d, Digest::of_features([(uid(2), &b)]));
        d.remove_features(uid(2), &b);
        assert_eq!(d, Digest::default());
    }

    proptest! {
        #[test]
        fn order_independent_and_removable(ids in proptest::collection::vec((any::<u128>(), 1u64..100), 0..50)) {
            let entries: Vec<_> = ids.iter().map(|&(n, v)| (uid(n), v)).collect();
            let forward = Digest::of(entries.iter().copied());
            let backward = Digest::of(entries.iter().rev().copied());
            prop_assert_eq!(forward, backward);
            let mut d = forward;
            for &(u, v) in &entries {
                d.remove(u, v);
            }
            prop_assert_eq!(d, Digest::default());
        }
    }
}
