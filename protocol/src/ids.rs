//! Identifiers: users (UUIDv7), match requests, appliances, and database epochs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::error::ValidationError;

fn parse_hex_uuid(field: &'static str, s: &str) -> Result<Uuid, ValidationError> {
    if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(ValidationError::new(
            field,
            "must be 32 lowercase hexadecimal characters",
        ));
    }
    Uuid::try_parse(s).map_err(|_| ValidationError::new(field, "not a valid id"))
}

macro_rules! hex_uuid_id {
    ($(#[$doc:meta])* $name:ident, $field:literal, $check_v7:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            pub fn new_v7() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn from_uuid(u: Uuid) -> Result<Self, ValidationError> {
                if $check_v7 && u.get_version_num() != 7 {
                    return Err(ValidationError::new($field, "must be a UUIDv7"));
                }
                Ok(Self(u))
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }

            pub fn as_u128(&self) -> u128 {
                self.0.as_u128()
            }

            /// The wire form: 32 lowercase hex characters.
            pub fn to_hex(&self) -> String {
                self.0.simple().to_string()
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::from_uuid(parse_hex_uuid($field, s)?)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0.simple())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.simple())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_uuid_id!(
    /// A user's id: a UUIDv7 (time-ordered), written as 32 lowercase hex characters.
    UserId,
    "user_id",
    true
);

hex_uuid_id!(
    /// One match request; doubles as the AMQP correlation id.
    RequestId,
    "request_id",
    false
);

/// The lineage of a relay database. Chosen at random when the database is created and renewed
/// when it is restored from a backup, so an appliance can tell "same history, further along"
/// from "a different history" and resync instead of mixing the two.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// An appliance's name: 1..=64 of `[a-z0-9-]`, not starting with `-`. It names the
/// appliance's own sync queue, so it must be safe inside an AMQP queue name.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, PartialOrd, Ord)]
#[serde(transparent)]
pub struct ApplianceId(String);

impl ApplianceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ApplianceId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ValidationError::new(
                "appliance_id",
                "must be 1 to 64 of a-z, 0-9 and '-', not starting with '-'",
            ))
        }
    }
}

impl fmt::Display for ApplianceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ApplianceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_round_trips_as_lowercase_hex() {
        let id = UserId::new_v7();
        let hex = id.to_hex();
        assert_eq!(hex.len(), 32);
        assert_eq!(hex.parse::<UserId>().unwrap(), id);
    }

    #[test]
    fn user_id_rejects_uppercase_dashes_and_other_versions() {
        let hex = "0190a1b2c3d47e5f8a6b7c8d9e0f1a2b";
        assert!(hex.parse::<UserId>().is_ok());
        assert!(hex.to_uppercase().parse::<UserId>().is_err());
        assert!(Uuid::now_v7().to_string().parse::<UserId>().is_err());
        let v4 = "0123456789ab4def8123456789abcdef";
        assert!(v4.parse::<UserId>().is_err());
        assert!(v4.parse::<RequestId>().is_ok());
    }

    #[test]
    fn appliance_id_is_queue_safe() {
        assert!("festival-box-1".parse::<ApplianceId>().is_ok());
        for bad in ["", "-a", "A", "a.b", "a b", &"x".repeat(65)] {
            assert!(bad.parse::<ApplianceId>().is_err(), "{bad}");
        }
    }
}
