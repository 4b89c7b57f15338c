//! Profiles: validating what a student submits, storing it, and keeping the matchable pool's
//! outbox in step in the same transaction.
//!
//! A user is *in the pool* (replicated to appliances) while they have a profile, have not
//! withdrawn, and have been picked fewer than `max_picked` times. Every change to that — a
//! profile written, a withdrawal, reaching the pick cap — bumps the profile's `version` and
//! appends an outbox row in the caller's transaction, so the replica can never see a change the
//! database rolled back (the original service's CSV could).

use crate::db::Cached;
use comatching_protocol::{
    Age, ContactFrequency, Features, Gender, Hobby, HobbySet, Major, Mbti, SnapshotUser, UserId,
};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::charges::is_bidi_control;
use crate::db::now_ms;
use crate::error::ApiError;
use crate::outbox::{self, OutboxOp};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ContactKind {
    Kakao,
    Instagram,
}

impl ContactKind {
    fn as_str(self) -> &'static str {
        match self {
            ContactKind::Kakao => "kakao",
            ContactKind::Instagram => "instagram",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "kakao" => Some(ContactKind::Kakao),
            "instagram" => Some(ContactKind::Instagram),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    pub kind: ContactKind,
    /// 1 to 64 characters after trimming, no control or bidi-control characters.
    pub handle: String,
}

/// `PUT /api/v1/me/profile`'s body. Domain fields validate while deserialising; display fields
/// are checked by `validate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileInput {
    /// 1 to 20 characters after trimming, no control or bidi-control characters.
    pub nickname: String,
    pub gender: Gender,
    pub age: Age,
    pub mbti: Mbti,
    pub hobbies: HobbySet,
    pub contact_frequency: ContactFrequency,
    pub major: Major,
    /// At most 100 characters after trimming, no control or bidi-control characters.
    #[serde(default)]
    pub song: String,
    /// At most 200 characters after trimming, no control or bidi-control characters.
    #[serde(default)]
    pub comment: String,
    pub contact: Contact,
    /// Stay out of others' results while still being able to request matches.
    #[serde(default)]
    pub dont_pick_me: bool,
}

/// A validated profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub features: Features,
    pub nickname: String,
    pub song: String,
    pub comment: String,
    pub contact: Contact,
}

fn text(field: &'static str, raw: &str, min: usize, max: usize) -> Result<String, ApiError> {
    let t = raw.trim();
    let n = t.chars().count();
    if n < min || n > max {
        return Err(ApiError::validation(
            field,
            if min > 0 {
                format!("must be {min} to {max} characters")
            } else {
                format!("must be at most {max} characters")
            },
        ));
    }
    if t.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        return Err(ApiError::validation(
            field,
            "must not contain control or bidi-control characters",
        ));
    }
    Ok(t.to_owned())
}

impl ProfileInput {
    pub fn validate(self) -> Result<Profile, ApiError> {
        // `Major` refuses control characters itself (it is shared with the appliance, which
        // must keep decoding what the relay stored before); bidi controls stop here.
        if self.major.as_str().chars().any(is_bidi_control) {
            return Err(ApiError::validation(
                "major",
                "must not contain bidi-control characters",
            ));
        }
        Ok(Profile {
            nickname: text("nickname", &self.nickname, 1, 20)?,
            song: text("song", &self.song, 0, 100)?,
            comment: text("comment", &self.comment, 0, 200)?,
            contact: Contact {
                kind: self.contact.kind,
                handle: text("contact.handle", &self.contact.handle, 1, 64)?,
            },
            features: Features {
                gender: self.gender,
                age: self.age,
                mbti: self.mbti,
                hobbies: self.hobbies,
                contact_frequency: self.contact_frequency,
                major: self.major,
                dont_pick_me: self.dont_pick_me,
            },
        })
    }
}

/// How the API shows a profile (to its owner, or to a matched partner without `version` and
/// `dont_pick_me`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ProfileView {
    #[schema(value_type = UserId)]
    pub user_id: String,
    /// Bumped by every change; the replica's version of this profile.
    pub version: i64,
    pub nickname: String,
    pub gender: Gender,
    pub age: Age,
    pub mbti: Mbti,
    pub hobbies: Vec<Hobby>,
    pub contact_frequency: ContactFrequency,
    pub major: String,
    pub song: String,
    pub comment: String,
    pub contact: Contact,
    pub dont_pick_me: bool,
}

impl ProfileView {
    /// What a requester learns of their partner.
    pub fn partner_json(&self) -> serde_json::Value {
        serde_json::to_value(PartnerView {
            user_id: self.user_id.clone(),
            nickname: self.nickname.clone(),
            gender: self.gender,
            age: self.age,
            mbti: self.mbti,
            hobbies: self.hobbies.clone(),
            contact_frequency: self.contact_frequency,
            major: self.major.clone(),
            song: self.song.clone(),
            comment: self.comment.clone(),
            contact: self.contact.clone(),
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

/// A matched partner as the requester sees them: the profile without `version` and
/// `dont_pick_me`.
#[derive(Serialize, ToSchema)]
pub struct PartnerView {
    #[schema(value_type = UserId)]
    pub user_id: String,
    pub nickname: String,
    pub gender: Gender,
    pub age: Age,
    pub mbti: Mbti,
    pub hobbies: Vec<Hobby>,
    pub contact_frequency: ContactFrequency,
    pub major: String,
    pub song: String,
    pub comment: String,
    pub contact: Contact,
}

/// The partner of a match: their profile, or, once their personal data was erased, that they
/// withdrew.
pub fn partner_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{OneOfBuilder, Ref};
    OneOfBuilder::new()
        .item(Ref::from_schema_name("PartnerView"))
        .item(Ref::from_schema_name("WithdrawnPartner"))
        .into()
}

/// A stored profile's row, as the matcher's hard filters need it.
#[derive(Clone, Debug)]
pub struct PoolEntry {
    pub features: Features,
    pub picked_count: u32,
    pub in_pool: bool,
    pub version: u64,
}

const SELECT: &str = "SELECT p.user_id, p.version, p.nickname, p.gender, p.age, p.mbti, p.hobbies, \
    p.contact_frequency, p.major, p.song, p.comment, p.contact_kind, p.contact_handle, p.dont_pick_me, \
    p.picked_count, p.in_pool FROM profiles p";

fn corrupt(user: &str, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("profile {user}: stored {what} is invalid").into(),
    )
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(ProfileView, PoolEntry)> {
    let user: String = r.get(0)?;
    let gender: Gender = r
        .get::<_, String>(3)?
        .parse()
        .map_err(|_| corrupt(&user, "gender"))?;
    let age = Age::new(r.get(4)?).map_err(|_| corrupt(&user, "age"))?;
    let mbti: Mbti = r
        .get::<_, String>(5)?
        .parse()
        .map_err(|_| corrupt(&user, "mbti"))?;
    let hobbies =
        HobbySet::from_bits(r.get::<_, i64>(6)? as u8).map_err(|_| corrupt(&user, "hobbies"))?;
    let cf: String = r.get(7)?;
    let contact_frequency = ContactFrequency::ALL
        .into_iter()
        .find(|c| c.as_str() == cf)
        .ok_or_else(|| corrupt(&user, "contact_frequency"))?;
    let major_raw: String = r.get(8)?;
    let major = Major::new(&major_raw).map_err(|_| corrupt(&user, "major"))?;
    let kind = ContactKind::parse(&r.get::<_, String>(11)?)
        .ok_or_else(|| corrupt(&user, "contact kind"))?;
    let dont_pick_me: bool = r.get(13)?;
    let version: i64 = r.get(1)?;
    let view = ProfileView {
        user_id: user.clone(),
        version,
        nickname: r.get(2)?,
        gender,
        age,
        mbti,
        hobbies: hobbies.iter().collect(),
        contact_frequency,
        major: major.as_str().to_owned(),
        song: r.get(9)?,
        comment: r.get(10)?,
        contact: Contact {
            kind,
            handle: r.get(12)?,
        },
        dont_pick_me,
    };
    let entry = PoolEntry {
        features: Features {
            gender,
            age,
            mbti,
            hobbies,
            contact_frequency,
            major,
            dont_pick_me,
        },
        picked_count: r.get::<_, i64>(14)? as u32,
        in_pool: r.get(15)?,
        version: version as u64,
    };
    Ok((view, entry))
}

/// The user's profile, unless there is none or it was erased (`erasure`).
pub fn load(conn: &Connection, user: UserId) -> Result<Option<(ProfileView, PoolEntry)>, ApiError> {
    Ok(conn
        .row_cached(
            &format!("{SELECT} WHERE p.user_id = ?1 AND p.erased_ms IS NULL"),
            [user.to_hex()],
            read_row,
        )
        .optional()?)
}

/// What a requester's match history shows of `partner`: their profile, or, once their personal
/// data was erased, that they withdrew.
pub fn partner_json(conn: &Connection, partner: UserId) -> Result<serde_json::Value, ApiError> {
    if let Some((view, _)) = load(conn, partner)? {
        return Ok(view.partner_json());
    }
    let erased: bool = conn
        .row_cached(
            "SELECT erased_ms IS NOT NULL FROM accounts WHERE user_id = ?1",
            [partner.to_hex()],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(false);
    Ok(if erased {
        crate::erasure::withdrawn_partner(&partner.to_hex())
    } else {
        serde_json::Value::Null
    })
}

/// Creates or replaces the caller's profile; returns the stored view.
pub fn upsert(
    conn: &Connection,
    user: UserId,
    p: &Profile,
    max_picked: u32,
) -> Result<ProfileView, ApiError> {
    let now = now_ms();
    let existing: Option<(i64, i64, bool)> = conn
        .row_cached(
            "SELECT version, picked_count, in_pool FROM profiles WHERE user_id = ?1",
            [user.to_hex()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let (version, in_pool) = match existing {
        Some((v, picked, _)) => (v + 1, picked < i64::from(max_picked)),
        None => (1, true),
    };
    let f = &p.features;
    conn.exec_cached(
        "INSERT INTO profiles(user_id, version, nickname, gender, age, mbti, hobbies, contact_frequency, major, \
             song, comment, contact_kind, contact_handle, dont_pick_me, picked_count, in_pool, updated_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 0, ?15, ?16) \
         ON CONFLICT(user_id) DO UPDATE SET version = excluded.version, nickname = excluded.nickname, \
             gender = excluded.gender, age = excluded.age, mbti = excluded.mbti, hobbies = excluded.hobbies, \
             contact_frequency = excluded.contact_frequency, major = excluded.major, song = excluded.song, \
             comment = excluded.comment, contact_kind = excluded.contact_kind, \
             contact_handle = excluded.contact_handle, dont_pick_me = excluded.dont_pick_me, \
             in_pool = excluded.in_pool, updated_ms = excluded.updated_ms",
        params![
            user.to_hex(),
            version,
            p.nickname,
            f.gender.as_str(),
            f.age.years(),
            f.mbti.to_string(),
            f.hobbies.bits(),
            f.contact_frequency.as_str(),
            f.major.as_str(),
            p.song,
            p.comment,
            p.contact.kind.as_str(),
            p.contact.handle,
            f.dont_pick_me,
            in_pool,
            now,
        ],
    )?;
    if in_pool {
        outbox::append(conn, user, version as u64, OutboxOp::Upsert(f.clone()))?;
    }
    Ok(load(conn, user)?
        .ok_or_else(|| ApiError::internal("profile vanished after write"))?
        .0)
}

/// Takes a user out of the pool (withdrawal). No-op when already out.
pub fn leave_pool(conn: &Connection, user: UserId) -> Result<(), ApiError> {
    let row: Option<(i64, bool)> = conn
        .row_cached(
            "SELECT version, in_pool FROM profiles WHERE user_id = ?1",
            [user.to_hex()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((version, true)) = row {
        let version = version + 1;
        conn.exec_cached(
            "UPDATE profiles SET version = ?2, in_pool = 0, updated_ms = ?3 WHERE user_id = ?1",
            params![user.to_hex(), version, now_ms()],
        )?;
        outbox::append(conn, user, version as u64, OutboxOp::Delete)?;
    }
    Ok(())
}

/// Counts one more pick of `partner`; at the cap they leave the pool.
pub fn record_pick(conn: &Connection, partner: UserId, max_picked: u32) -> Result<(), ApiError> {
    conn.exec_cached(
        "UPDATE profiles SET picked_count = picked_count + 1 WHERE user_id = ?1",
        [partner.to_hex()],
    )?;
    let picked: i64 = conn.row_cached(
        "SELECT picked_count FROM profiles WHERE user_id = ?1",
        [partner.to_hex()],
        |r| r.get(0),
    )?;
    if picked >= i64::from(max_picked) {
        leave_pool(conn, partner)?;
    }
    Ok(())
}

/// Every user in the pool as a snapshot carries them: id, version, features. Built row by row
/// (each row's display fields are dropped at once), so a 100k-user snapshot holds one copy of
/// the pool's features, not two.
pub fn pool_snapshot(conn: &Connection) -> Result<Vec<SnapshotUser>, ApiError> {
    let mut stmt =
        conn.prepare_cached(&format!("{SELECT} WHERE p.in_pool = 1 ORDER BY p.user_id"))?;
    let rows = stmt.query_map([], read_row)?;
    let mut out = Vec::new();
    for row in rows {
        let (view, entry) = row?;
        let user_id = view
            .user_id
            .parse()
            .map_err(|_| ApiError::internal(format!("stored user id {}", view.user_id)))?;
        out.push(SnapshotUser {
            user_id,
            version: entry.version,
            features: entry.features,
        });
    }
    Ok(out)
}
