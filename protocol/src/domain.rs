//! Profile features: the part of a profile the matcher needs, replicated to appliances.
//!
//! Every type here is validated on construction and on deserialisation, so a `Features` value
//! can be trusted wherever it appears. Display fields (nickname, song, comment, contact) are not
//! here on purpose: they never leave the relay.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ValidationError;

#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Gender {
    Female,
    Male,
}

impl Gender {
    pub fn opposite(self) -> Gender {
        match self {
            Gender::Female => Gender::Male,
            Gender::Male => Gender::Female,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Gender::Female => "female",
            Gender::Male => "male",
        }
    }
}

impl FromStr for Gender {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "female" => Ok(Gender::Female),
            "male" => Ok(Gender::Male),
            _ => Err(ValidationError::new("gender", "must be female or male")),
        }
    }
}

/// Age in years, 19..=40.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, PartialOrd, Ord)]
#[serde(transparent)]
pub struct Age(u8);

impl Age {
    pub const MIN: u8 = 19;
    pub const MAX: u8 = 40;

    pub fn new(years: i64) -> Result<Self, ValidationError> {
        if (i64::from(Self::MIN)..=i64::from(Self::MAX)).contains(&years) {
            Ok(Age(years as u8))
        } else {
            Err(ValidationError::new(
                "age",
                format!("must be between {} and {}", Self::MIN, Self::MAX),
            ))
        }
    }

    pub fn years(self) -> u8 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Age {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Age::new(i64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The four MBTI axes in their conventional order, each as (letter for bit 0, letter for bit 1).
pub const MBTI_AXES: [(char, char); 4] = [('E', 'I'), ('S', 'N'), ('T', 'F'), ('J', 'P')];

/// Which axis a letter belongs to and which side of it: `(axis, bit)`.
pub fn mbti_letter(c: char) -> Option<(usize, bool)> {
    let c = c.to_ascii_uppercase();
    MBTI_AXES.iter().enumerate().find_map(|(axis, &(a, b))| {
        if c == a {
            Some((axis, false))
        } else if c == b {
            Some((axis, true))
        } else {
            None
        }
    })
}

/// A full MBTI type: one letter on each of the four axes. Stored as four bits (bit `i` set means
/// the second letter of axis `i`). Parsing accepts any case and order, one letter per axis;
/// display is canonical (`ISTP`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Mbti(u8);

impl Mbti {
    pub fn from_bits(bits: u8) -> Self {
        Mbti(bits & 0b1111)
    }
    pub fn bits(self) -> u8 {
        self.0
    }
    /// The letter this type has on `axis` (0..4).
    pub fn letter(self, axis: usize) -> char {
        let (a, b) = MBTI_AXES[axis];
        if self.0 & (1 << axis) != 0 { b } else { a }
    }
}

/// Parses 0..=`max` letters with at most one per axis into (axes mask, bits).
pub(crate) fn parse_mbti_letters(
    field: &'static str,
    s: &str,
    max: usize,
) -> Result<(u8, u8), ValidationError> {
    let mut mask = 0u8;
    let mut bits = 0u8;
    let mut n = 0;
    for c in s.chars() {
        n += 1;
        if n > max {
            return Err(ValidationError::new(
                field,
                format!("at most {max} letters"),
            ));
        }
        let (axis, bit) = mbti_letter(c).ok_or_else(|| {
            ValidationError::new(field, "letters must be from E/I, S/N, T/F, J/P")
        })?;
        if mask & (1 << axis) != 0 {
            return Err(ValidationError::new(field, "at most one letter per axis"));
        }
        mask |= 1 << axis;
        if bit {
            bits |= 1 << axis;
        }
    }
    Ok((mask, bits))
}

impl FromStr for Mbti {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mask, bits) = parse_mbti_letters("mbti", s, 4)?;
        if mask != 0b1111 {
            return Err(ValidationError::new(
                "mbti",
                "must have exactly one letter on each of the four axes",
            ));
        }
        Ok(Mbti(bits))
    }
}

impl fmt::Display for Mbti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for axis in 0..4 {
            write!(f, "{}", self.letter(axis))?;
        }
        Ok(())
    }
}

impl Serialize for Mbti {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mbti {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Hobby {
    Sports,
    Arts,
    Culture,
    Travel,
    DailyStudy,
    Game,
}

impl Hobby {
    pub const ALL: [Hobby; 6] = [
        Hobby::Sports,
        Hobby::Arts,
        Hobby::Culture,
        Hobby::Travel,
        Hobby::DailyStudy,
        Hobby::Game,
    ];
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Hobby::Sports => "sports",
            Hobby::Arts => "arts",
            Hobby::Culture => "culture",
            Hobby::Travel => "travel",
            Hobby::DailyStudy => "daily_study",
            Hobby::Game => "game",
        }
    }
}

impl FromStr for Hobby {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Hobby::ALL
            .into_iter()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| {
                ValidationError::new(
                    "hobbies",
                    "must be one of sports, arts, culture, travel, daily_study, game",
                )
            })
    }
}

/// A non-empty set of hobby categories (bit `i` = `Hobby::ALL[i]`). Serialised as a list of
/// names in canonical order; duplicates in the input collapse.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct HobbySet(u8);

impl HobbySet {
    pub fn from_bits(bits: u8) -> Result<Self, ValidationError> {
        let bits = bits & 0b11_1111;
        if bits == 0 {
            return Err(ValidationError::new("hobbies", "choose at least one hobby"));
        }
        Ok(HobbySet(bits))
    }
    pub fn from_hobbies(hobbies: &[Hobby]) -> Result<Self, ValidationError> {
        Self::from_bits(hobbies.iter().fold(0, |acc, h| acc | h.bit()))
    }
    pub fn bits(self) -> u8 {
        self.0
    }
    pub fn contains(self, h: Hobby) -> bool {
        self.0 & h.bit() != 0
    }
    pub fn iter(self) -> impl Iterator<Item = Hobby> {
        Hobby::ALL.into_iter().filter(move |h| self.contains(*h))
    }
}

impl Serialize for HobbySet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for HobbySet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HobbySet;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of hobby categories")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<HobbySet, A::Error> {
                let mut bits = 0u8;
                let mut n = 0usize;
                while let Some(h) = seq.next_element::<Hobby>()? {
                    n += 1;
                    if n > Hobby::ALL.len() * 2 {
                        return Err(serde::de::Error::custom("hobbies: too many entries"));
                    }
                    bits |= h.bit();
                }
                HobbySet::from_bits(bits).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ContactFrequency {
    Frequent,
    Normal,
    Rare,
}

impl ContactFrequency {
    pub const ALL: [ContactFrequency; 3] = [
        ContactFrequency::Frequent,
        ContactFrequency::Normal,
        ContactFrequency::Rare,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ContactFrequency::Frequent => "frequent",
            ContactFrequency::Normal => "normal",
            ContactFrequency::Rare => "rare",
        }
    }
}

/// A department name: trimmed, runs of white space collapsed to one space, 1..=64 bytes.
/// Two majors are the same when their normalised forms are equal ignoring case; that comparison
/// is `same_as`, used by the exclude-same-major filter on both sides (the original service
/// compared "TRUE" with "True" and never excluded anyone).
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, PartialOrd, Ord)]
#[serde(transparent)]
pub struct Major(String);

impl Major {
    pub const MAX_BYTES: usize = 64;

    pub fn new(raw: &str) -> Result<Self, ValidationError> {
        let normalised = raw.split_whitespace().collect::<Vec<_>>().join(" ");
        if normalised.is_empty() {
            return Err(ValidationError::new("major", "must not be empty"));
        }
        if normalised.len() > Self::MAX_BYTES {
            return Err(ValidationError::new(
                "major",
                format!("must be at most {} bytes", Self::MAX_BYTES),
            ));
        }
        if normalised.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "major",
                "must not contain control characters",
            ));
        }
        Ok(Major(normalised))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The comparison key: the normalised name, lower-cased.
    pub fn key(&self) -> String {
        self.0.to_lowercase()
    }

    pub fn same_as(&self, other: &Major) -> bool {
        self.0 == other.0 || self.key() == other.key()
    }
}

impl<'de> Deserialize<'de> for Major {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Major::new(&s).map_err(serde::de::Error::custom)
    }
}

/// What the matcher knows of a user. Replicated to appliances; contains no names or contacts.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Features {
    pub gender: Gender,
    pub age: Age,
    pub mbti: Mbti,
    pub hobbies: HobbySet,
    pub contact_frequency: ContactFrequency,
    pub major: Major,
    pub dont_pick_me: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbti_parses_any_case_and_order_and_displays_canonically() {
        assert_eq!("istp".parse::<Mbti>().unwrap().to_string(), "ISTP");
        assert_eq!("PTSI".parse::<Mbti>().unwrap().to_string(), "ISTP");
        for bad in ["", "IST", "ISTPX", "IETP", "ABCD", "ISTT"] {
            assert!(bad.parse::<Mbti>().is_err(), "{bad}");
        }
    }

    #[test]
    fn all_sixteen_types_round_trip() {
        for bits in 0..16 {
            let m = Mbti::from_bits(bits);
            assert_eq!(m.to_string().parse::<Mbti>().unwrap(), m);
        }
    }

    #[test]
    fn age_bounds() {
        assert!(Age::new(18).is_err());
        assert!(Age::new(19).is_ok());
        assert!(Age::new(40).is_ok());
        assert!(Age::new(41).is_err());
        assert!(Age::new(-1).is_err());
    }

    #[test]
    fn major_normalises_and_compares_ignoring_case() {
        let a = Major::new("  Computer   Science ").unwrap();
        assert_eq!(a.as_str(), "Computer Science");
        assert!(a.same_as(&Major::new("computer science").unwrap()));
        assert!(!a.same_as(&Major::new("Computer Engineering").unwrap()));
        assert!(Major::new("   ").is_err());
        assert!(Major::new(&"가".repeat(22)).is_err()); // 66 bytes
        assert!(Major::new(&"가".repeat(21)).is_ok()); // 63 bytes
    }

    #[test]
    fn hobby_set_rejects_empty_and_collapses_duplicates() {
        let json = r#"["game","sports","game"]"#;
        let set: HobbySet = serde_json::from_str(json).unwrap();
        assert_eq!(serde_json::to_string(&set).unwrap(), r#"["sports","game"]"#);
        assert!(serde_json::from_str::<HobbySet>("[]").is_err());
        assert!(serde_json::from_str::<HobbySet>(r#"["cooking"]"#).is_err());
    }
}
