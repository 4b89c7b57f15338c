//! The matching score of DESIGN.md §4, as small per-query integer tables. Pure.
//!
//! Each soft preference contributes `weight × fraction met`; weights are 0.25 each, or 0.4 for
//! the important option and 0.2 for the other three. Scores are kept as integers in units of
//! 1/240 (weights ×20, fractions ×12 — MBTI fractions are k/1..k/4), so equal scores compare
//! equal exactly and ties are real ties. A preference left at "any" counts as fully met: the
//! requester accepts every value, so every candidate meets it equally and the ranking is
//! decided by the preferences that were set.
//!
//! A candidate's score depends only on `(age, mbti, hobbies, contact)` — its *score key* — which
//! is what the index buckets by. This module must not know about users, ids or filters.

use comatching_protocol::{
    Age, AgePreference, ContactFrequency, ContactPreference, Criterion, Features, HobbyPreference,
    MatchOptions,
};

/// Score units: an integer score `s` means `s / SCALE`.
pub const SCALE: u16 = 240;

pub const AGES: usize = (Age::MAX - Age::MIN + 1) as usize;
pub const MBTIS: usize = 16;
pub const HOBBY_SETS: usize = 64;
pub const CONTACTS: usize = 3;
/// Number of distinct score keys (per gender).
pub const KEYS: usize = AGES * MBTIS * HOBBY_SETS * CONTACTS;

/// The score-relevant attributes of a candidate, as small indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScoreKey {
    pub age: u8,
    pub mbti: u8,
    pub hobbies: u8,
    pub contact: u8,
}

impl ScoreKey {
    pub fn of(f: &Features) -> Self {
        ScoreKey {
            age: f.age.years() - Age::MIN,
            mbti: f.mbti.bits(),
            hobbies: f.hobbies.bits(),
            contact: contact_index(f.contact_frequency),
        }
    }
    /// Dense index in `0..KEYS`.
    pub fn index(self) -> u32 {
        ((u32::from(self.age) * MBTIS as u32 + u32::from(self.mbti)) * HOBBY_SETS as u32
            + u32::from(self.hobbies))
            * CONTACTS as u32
            + u32::from(self.contact)
    }
    pub fn from_index(i: u32) -> Self {
        let contact = (i % CONTACTS as u32) as u8;
        let i = i / CONTACTS as u32;
        let hobbies = (i % HOBBY_SETS as u32) as u8;
        let i = i / HOBBY_SETS as u32;
        ScoreKey {
            age: (i / MBTIS as u32) as u8,
            mbti: (i % MBTIS as u32) as u8,
            hobbies,
            contact,
        }
    }
}

pub fn contact_index(c: ContactFrequency) -> u8 {
    match c {
        ContactFrequency::Frequent => 0,
        ContactFrequency::Normal => 1,
        ContactFrequency::Rare => 2,
    }
}

/// One request's scoring tables. `score(key) = age[a] + mbti[m] + hobby[h] + contact[c]`.
#[derive(Clone, Debug)]
pub struct Scorer {
    pub age: [u16; AGES],
    pub mbti: [u16; MBTIS],
    pub hobby: [u16; HOBBY_SETS],
    pub contact: [u16; CONTACTS],
    /// Weights ×20 per criterion, in the order age, mbti, hobby, contact.
    pub weights: [u16; 4],
    pub important: Option<Criterion>,
}

fn criterion_slot(c: Criterion) -> usize {
    match c {
        Criterion::Age => 0,
        Criterion::Mbti => 1,
        Criterion::Hobby => 2,
        Criterion::ContactFrequency => 3,
    }
}

impl Scorer {
    pub fn new(requester: &Features, o: &MatchOptions) -> Self {
        let important = o.important.criterion();
        let mut weights = [5u16; 4];
        if let Some(c) = important {
            weights = [4; 4];
            weights[criterion_slot(c)] = 8;
        }
        let full = |slot: usize| weights[slot] * 12;
        let my_age = requester.age.years();
        let mut age = [0u16; AGES];
        for (i, v) in age.iter_mut().enumerate() {
            let theirs = Age::MIN + i as u8;
            let met = match o.age {
                AgePreference::Any => true,
                AgePreference::Younger => theirs < my_age,
                AgePreference::Equal => theirs == my_age,
                AgePreference::Older => theirs > my_age,
            };
            *v = if met { full(0) } else { 0 };
        }
        let mut mbti = [0u16; MBTIS];
        for (bits, v) in mbti.iter_mut().enumerate() {
            *v = if o.mbti.is_any() {
                full(1)
            } else {
                let m = comatching_protocol::Mbti::from_bits(bits as u8);
                full(1) / o.mbti.letters_wanted() as u16 * o.mbti.letters_met(m) as u16
            };
        }
        let mut hobby = [0u16; HOBBY_SETS];
        for (bits, v) in hobby.iter_mut().enumerate() {
            let met = match o.hobby {
                HobbyPreference::Any => true,
                HobbyPreference::Category(h) => bits as u8 & h.bit() != 0,
            };
            *v = if met { full(2) } else { 0 };
        }
        let mut contact = [0u16; CONTACTS];
        for c in ContactFrequency::ALL {
            let met = match o.contact_frequency {
                ContactPreference::Any => true,
                ContactPreference::Frequency(want) => want == c,
            };
            contact[contact_index(c) as usize] = if met { full(3) } else { 0 };
        }
        Scorer {
            age,
            mbti,
            hobby,
            contact,
            weights,
            important,
        }
    }

    #[inline]
    pub fn score(&self, k: ScoreKey) -> u16 {
        self.age[k.age as usize]
            + self.mbti[k.mbti as usize]
            + self.hobby[k.hobbies as usize]
            + self.contact[k.contact as usize]
    }

    /// True when the important option (if any) is fully met by `k`; true when there is none.
    #[inline]
    pub fn meets_important(&self, k: ScoreKey) -> bool {
        match self.important {
            None => true,
            Some(c) => {
                let slot = criterion_slot(c);
                let got = match slot {
                    0 => self.age[k.age as usize],
                    1 => self.mbti[k.mbti as usize],
                    2 => self.hobby[k.hobbies as usize],
                    _ => self.contact[k.contact as usize],
                };
                got == self.weights[slot] * 12
            }
        }
    }

    /// The score of a key as the wire carries it, in [0, 1].
    pub fn to_unit(score: u16) -> f32 {
        f32::from(score) / f32::from(SCALE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth;
    use comatching_protocol::Important;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn key_index_round_trips() {
        for i in (0..KEYS as u32).step_by(7) {
            assert_eq!(ScoreKey::from_index(i).index(), i);
        }
    }

    #[test]
    fn weights_follow_the_design() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let me = synth::features(&mut rng);
        let mut o = MatchOptions::any();
        let s = Scorer::new(&me, &o);
        assert_eq!(s.weights, [5, 5, 5, 5]);
        assert_eq!(s.score(ScoreKey::of(&me)), SCALE);
        o.mbti = "EN".parse().unwrap();
        o.important = Important::Mbti;
        let s = Scorer::new(&me, &o);
        assert_eq!(s.weights, [4, 8, 4, 4]);
        let mut k = ScoreKey::of(&me);
        k.mbti = "ENTP".parse::<comatching_protocol::Mbti>().unwrap().bits();
        assert_eq!(s.score(k), SCALE);
        assert!(s.meets_important(k));
        k.mbti = "ESTP".parse::<comatching_protocol::Mbti>().unwrap().bits();
        assert_eq!(s.score(k), SCALE - 48); // half of 0.4 is missing
        assert!(!s.meets_important(k));
    }

    proptest! {
        #[test]
        fn score_is_weighted_fraction_met(seed in any::<u64>()) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let me = synth::features(&mut rng);
            let them = synth::features(&mut rng);
            let o = synth::options(&mut rng);
            let s = Scorer::new(&me, &o);
            let w = |c: Criterion| match o.important.criterion() {
                None => 0.25,
                Some(i) if i == c => 0.4,
                Some(_) => 0.2,
            };
            let age_met = match o.age {
                AgePreference::Any => 1.0,
                AgePreference::Younger => f64::from(u8::from(them.age < me.age)),
                AgePreference::Equal => f64::from(u8::from(them.age == me.age)),
                AgePreference::Older => f64::from(u8::from(them.age > me.age)),
            };
            let mbti_met = if o.mbti.is_any() { 1.0 } else {
                f64::from(o.mbti.letters_met(them.mbti)) / f64::from(o.mbti.letters_wanted())
            };
            let hobby_met = match o.hobby {
                HobbyPreference::Any => 1.0,
                HobbyPreference::Category(h) => f64::from(u8::from(them.hobbies.contains(h))),
            };
            let contact_met = match o.contact_frequency {
                ContactPreference::Any => 1.0,
                ContactPreference::Frequency(c) => f64::from(u8::from(them.contact_frequency == c)),
            };
            let want = w(Criterion::Age) * age_met + w(Criterion::Mbti) * mbti_met
                + w(Criterion::Hobby) * hobby_met + w(Criterion::ContactFrequency) * contact_met;
            let got = f64::from(s.score(ScoreKey::of(&them))) / f64::from(SCALE);
            prop_assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
    }
}
