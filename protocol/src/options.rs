//! Match options (what the requester asks for) and what they cost.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::domain::{ContactFrequency, Hobby, Mbti, parse_mbti_letters};
use crate::error::ValidationError;

/// The candidate's age relative to the requester's.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgePreference {
    Younger,
    Equal,
    Older,
    Any,
}

/// 0..=4 wanted MBTI letters, at most one per axis (the web app sends two, e.g. "EN").
/// `mask` marks the axes asked about, `bits` the wanted side of each.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct MbtiPreference {
    mask: u8,
    bits: u8,
}

impl MbtiPreference {
    pub fn any() -> Self {
        Self::default()
    }
    pub fn is_any(self) -> bool {
        self.mask == 0
    }
    pub fn mask(self) -> u8 {
        self.mask
    }
    pub fn bits(self) -> u8 {
        self.bits
    }
    pub fn letters_wanted(self) -> u32 {
        self.mask.count_ones()
    }
    /// How many of the wanted letters `m` has.
    pub fn letters_met(self, m: Mbti) -> u32 {
        (!(m.bits() ^ self.bits) & self.mask).count_ones()
    }
}

impl FromStr for MbtiPreference {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mask, bits) = parse_mbti_letters("mbti", s, 4)?;
        Ok(MbtiPreference { mask, bits })
    }
}

impl fmt::Display for MbtiPreference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = Mbti::from_bits(self.bits);
        for axis in 0..4 {
            if self.mask & (1 << axis) != 0 {
                write!(f, "{}", full.letter(axis))?;
            }
        }
        Ok(())
    }
}

impl Serialize for MbtiPreference {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MbtiPreference {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One wanted hobby category, or any.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum HobbyPreference {
    Any,
    Category(Hobby),
}

impl Serialize for HobbyPreference {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            HobbyPreference::Any => s.serialize_str("any"),
            HobbyPreference::Category(h) => s.serialize_str(h.as_str()),
        }
    }
}

impl<'de> Deserialize<'de> for HobbyPreference {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s == "any" {
            return Ok(HobbyPreference::Any);
        }
        s.parse::<Hobby>()
            .map(HobbyPreference::Category)
            .map_err(|_| {
                serde::de::Error::custom(
                    "hobby: must be any or one of sports, arts, culture, travel, daily_study, game",
                )
            })
    }
}

/// One wanted contact frequency, or any.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ContactPreference {
    Any,
    Frequency(ContactFrequency),
}

impl Serialize for ContactPreference {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ContactPreference::Any => s.serialize_str("any"),
            ContactPreference::Frequency(c) => s.serialize_str(c.as_str()),
        }
    }
}

impl<'de> Deserialize<'de> for ContactPreference {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        match &*s {
            "any" => Ok(ContactPreference::Any),
            "frequent" => Ok(ContactPreference::Frequency(ContactFrequency::Frequent)),
            "normal" => Ok(ContactPreference::Frequency(ContactFrequency::Normal)),
            "rare" => Ok(ContactPreference::Frequency(ContactFrequency::Rare)),
            _ => Err(serde::de::Error::custom(
                "contact_frequency: must be any, frequent, normal or rare",
            )),
        }
    }
}

/// A soft preference by name; used for the important option and for reporting what was relaxed.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    Age,
    Mbti,
    Hobby,
    ContactFrequency,
}

/// The option the requester marked important, if any.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Important {
    #[default]
    None,
    Age,
    Mbti,
    Hobby,
    ContactFrequency,
}

impl Important {
    pub fn criterion(self) -> Option<Criterion> {
        match self {
            Important::None => None,
            Important::Age => Some(Criterion::Age),
            Important::Mbti => Some(Criterion::Mbti),
            Important::Hobby => Some(Criterion::Hobby),
            Important::ContactFrequency => Some(Criterion::ContactFrequency),
        }
    }
}

/// What a requester asks for. Field names are the HTTP API's.
///
/// Invariant (checked by `validate`, and by deserialisation): an important option names a
/// preference that is actually set — marking "any" as important would charge the surcharge for
/// nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize)]
pub struct MatchOptions {
    pub age: AgePreference,
    pub mbti: MbtiPreference,
    pub hobby: HobbyPreference,
    pub contact_frequency: ContactPreference,
    pub exclude_same_major: bool,
    pub important: Important,
}

impl MatchOptions {
    /// No preferences at all.
    pub fn any() -> Self {
        MatchOptions {
            age: AgePreference::Any,
            mbti: MbtiPreference::any(),
            hobby: HobbyPreference::Any,
            contact_frequency: ContactPreference::Any,
            exclude_same_major: false,
            important: Important::None,
        }
    }

    pub fn is_set(&self, c: Criterion) -> bool {
        match c {
            Criterion::Age => self.age != AgePreference::Any,
            Criterion::Mbti => !self.mbti.is_any(),
            Criterion::Hobby => self.hobby != HobbyPreference::Any,
            Criterion::ContactFrequency => self.contact_frequency != ContactPreference::Any,
        }
    }

    pub fn validate(self) -> Result<Self, ValidationError> {
        if let Some(c) = self.important.criterion()
            && !self.is_set(c)
        {
            return Err(ValidationError::new(
                "important",
                "the important option must name a preference that is set (not any)",
            ));
        }
        Ok(self)
    }
}

impl<'de> Deserialize<'de> for MatchOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            age: AgePreference,
            mbti: MbtiPreference,
            hobby: HobbyPreference,
            contact_frequency: ContactPreference,
            exclude_same_major: bool,
            #[serde(default)]
            important: Important,
        }
        let r = Raw::deserialize(d)?;
        MatchOptions {
            age: r.age,
            mbti: r.mbti,
            hobby: r.hobby,
            contact_frequency: r.contact_frequency,
            exclude_same_major: r.exclude_same_major,
            important: r.important,
        }
        .validate()
        .map_err(serde::de::Error::custom)
    }
}

/// Prices in points. Configuration, not constants: festivals change them.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostTable {
    pub base: u64,
    pub exclude_same_major: u64,
    pub important: u64,
}

impl Default for CostTable {
    fn default() -> Self {
        CostTable {
            base: 1000,
            exclude_same_major: 200,
            important: 300,
        }
    }
}

impl CostTable {
    /// What a request with these options reserves.
    pub fn cost(&self, o: &MatchOptions) -> u64 {
        let mut c = self.base;
        if o.exclude_same_major {
            c += self.exclude_same_major;
        }
        if o.important != Important::None {
            c += self.important;
        }
        c
    }

    /// What is given back when the matcher had to relax the important option.
    pub fn refund(&self, o: &MatchOptions, important_relaxed: bool) -> u64 {
        if important_relaxed && o.important != Important::None {
            self.important
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(json: &str) -> Result<MatchOptions, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn cost_follows_the_table() {
        let t = CostTable::default();
        let mut o = MatchOptions::any();
        assert_eq!(t.cost(&o), 1000);
        o.exclude_same_major = true;
        assert_eq!(t.cost(&o), 1200);
        o.age = AgePreference::Older;
        o.important = Important::Age;
        assert_eq!(t.cost(&o), 1500);
        assert_eq!(t.refund(&o, true), 300);
        assert_eq!(t.refund(&o, false), 0);
    }

    #[test]
    fn mbti_preference_counts_met_letters() {
        let p: MbtiPreference = "EN".parse().unwrap();
        assert_eq!(p.letters_wanted(), 2);
        assert_eq!(p.letters_met("ENTP".parse().unwrap()), 2);
        assert_eq!(p.letters_met("ESTP".parse().unwrap()), 1);
        assert_eq!(p.letters_met("ISTJ".parse().unwrap()), 0);
        assert_eq!(p.to_string(), "EN");
        assert_eq!("ne".parse::<MbtiPreference>().unwrap(), p);
        assert!("EI".parse::<MbtiPreference>().is_err());
        assert!("".parse::<MbtiPreference>().unwrap().is_any());
    }

    #[test]
    fn important_must_name_a_set_option() {
        let ok = r#"{"age":"older","mbti":"EN","hobby":"game","contact_frequency":"any",
                    "exclude_same_major":false,"important":"age"}"#;
        assert!(opts(ok).is_ok());
        let bad = r#"{"age":"any","mbti":"EN","hobby":"game","contact_frequency":"any",
                    "exclude_same_major":false,"important":"age"}"#;
        assert!(opts(bad).unwrap_err().to_string().contains("important"));
    }

    #[test]
    fn options_round_trip_through_json() {
        let o = opts(
            r#"{"age":"younger","mbti":"IT","hobby":"daily_study","contact_frequency":"rare",
                "exclude_same_major":true,"important":"contact_frequency"}"#,
        )
        .unwrap();
        let back: MatchOptions = serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
        assert_eq!(o, back);
    }
}
