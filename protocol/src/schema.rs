//! JSON Schemas of the domain types the relay's HTTP API carries, for its generated OpenAPI
//! document (feature `utoipa`, switched on by the relay only).
//!
//! The simple enums derive theirs next to their definitions; the types with hand-written serde
//! (validated newtypes, preference strings) get theirs here, stating the same rules their
//! parsers enforce: what a client can send is exactly what the schema admits, modulo messages.

use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::{RefOr, schema};
use utoipa::{PartialSchema, ToSchema};

use crate::domain::{Age, Hobby, HobbySet, Major, Mbti};
use crate::ids::UserId;
use crate::options::{ContactPreference, HobbyPreference, MbtiPreference};

fn string(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
}

macro_rules! schema_for {
    ($ty:ty, $build:expr) => {
        impl PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                RefOr::T(Schema::Object($build.build()))
            }
        }
        impl ToSchema for $ty {}
    };
}

schema_for!(
    UserId,
    string("A user's id: a UUIDv7 as 32 lowercase hexadecimal characters.")
        .pattern(Some("^[0-9a-f]{32}$"))
);

schema_for!(
    Age,
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .description(Some("Age in years."))
        .minimum(Some(Age::MIN))
        .maximum(Some(Age::MAX))
);

schema_for!(
    Mbti,
    string(
        "A full MBTI type: one letter from each of E/I, S/N, T/F, J/P, any case and order \
         (shown canonically, e.g. ISTP).",
    )
    .pattern(Some("^[EeIiSsNnTtFfJjPp]{4}$"))
);

schema_for!(
    MbtiPreference,
    string("0 to 4 wanted MBTI letters, at most one per axis (e.g. \"EN\"); empty = any.")
        .pattern(Some("^[EeIiSsNnTtFfJjPp]{0,4}$"))
);

schema_for!(
    Major,
    string(
        "A department name: trimmed, runs of white space collapsed; 1 to 64 bytes, no control \
         or bidi-control characters.",
    )
    .min_length(Some(1))
);

schema_for!(
    HobbyPreference,
    string("One wanted hobby category, or any.").enum_values(Some(
        std::iter::once("any").chain(Hobby::ALL.iter().map(|h| h.as_str()))
    ))
);

schema_for!(
    ContactPreference,
    string("One wanted contact frequency, or any.")
        .enum_values(Some(["any", "frequent", "normal", "rare"]))
);

impl PartialSchema for HobbySet {
    fn schema() -> RefOr<Schema> {
        ArrayBuilder::new()
            .description(Some(
                "A non-empty set of hobby categories; duplicates collapse (shown in canonical order).",
            ))
            .items(schema::Ref::from_schema_name(Hobby::name()))
            .min_items(Some(1))
            .max_items(Some(Hobby::ALL.len() * 2))
            .into()
    }
}

impl ToSchema for HobbySet {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((Hobby::name().into(), Hobby::schema()));
    }
}
