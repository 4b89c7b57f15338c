//! The booth's charge requests (issue 10 §3): a student asks for points, an operator approves or
//! rejects, the student may cancel while nobody has decided.
//!
//! The rules are sans-IO and property-tested (`ChargeRules`, `ChargeStatus::decide`); the
//! functions below apply them inside the caller's transaction or savepoint:
//!
//! * `pending → approved | rejected | cancelled`, nothing else. Every decision is a conditional
//!   `UPDATE … WHERE status = 'pending'`: of two operators approving at once, exactly one changes
//!   a row and writes the ledger grant (same savepoint); the other gets 409 `charge_decided`.
//!   The grant carries the charge id under a unique index, a second line of defence.
//! * at most one pending request per student: a unique partial index (`charges_one_pending`),
//!   so even two concurrent requests cannot both be pending; the loser gets 409
//!   `charge_pending`.
//! * another student's request is `not_found`, never `forbidden`: its existence is not
//!   confirmed.
//!
//! Every change writes its live events (`events::emit`) in the same transaction; the caller
//! wakes the streams once the write is committed.

use comatching_protocol::UserId;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::json;

use crate::config::Charges as ChargeConfig;
use crate::db::{Cached, now_ms};
use crate::error::{ApiError, ErrorCode};
use crate::events::{self, Audience, Wake};
use crate::ledger;

/// Most characters in a depositor name (after trimming).
pub const DEPOSITOR_MAX: usize = 40;
/// Most characters in a rejection reason (after trimming).
pub const REASON_MAX: usize = 200;
/// The reason written on the ledger grant of an approved request.
pub const GRANT_REASON: &str = "charge";

/// Which amounts a request may ask for (`[charges]`).
#[derive(Clone, Copy, Debug)]
pub struct ChargeRules {
    pub min: u64,
    pub max: u64,
    pub step: u64,
}

impl From<&ChargeConfig> for ChargeRules {
    fn from(c: &ChargeConfig) -> Self {
        ChargeRules {
            min: c.min_amount,
            max: c.max_amount,
            step: c.step,
        }
    }
}

impl ChargeRules {
    pub fn amount(&self, amount: i64) -> Result<u64, ApiError> {
        let ok = u64::try_from(amount)
            .ok()
            .filter(|a| (self.min..=self.max).contains(a) && a % self.step == 0);
        ok.ok_or_else(|| {
            ApiError::validation(
                "amount",
                format!(
                    "must be {} to {} in steps of {}",
                    self.min, self.max, self.step
                ),
            )
        })
    }
}

/// Characters that reorder how text is displayed (bidi embeddings, overrides, isolates and
/// marks): a depositor name must read on the operator's screen as it is stored. Refused in every
/// free-text field someone else reads (depositors, reasons, the profile's display fields).
pub(crate) fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Trimmed text of 1..=`max` characters with no control or bidi-control characters.
fn printable(field: &str, raw: &str, max: usize) -> Result<String, ApiError> {
    let t = raw.trim();
    let n = t.chars().count();
    if n == 0 || n > max || t.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        return Err(ApiError::validation(
            field,
            format!("must be 1 to {max} printable characters"),
        ));
    }
    Ok(t.to_owned())
}

/// The name on the bank transfer or booth receipt.
pub fn depositor(raw: &str) -> Result<String, ApiError> {
    printable("depositor", raw, DEPOSITOR_MAX)
}

/// An operator's reason for rejecting a request.
pub fn reason(raw: &str) -> Result<String, ApiError> {
    printable("reason", raw, REASON_MAX)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChargeStatus {
    Pending,
    Approved,
    Rejected,
    Cancelled,
}

/// What may happen to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Reject,
    Cancel,
}

impl ChargeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeStatus::Pending => "pending",
            ChargeStatus::Approved => "approved",
            ChargeStatus::Rejected => "rejected",
            ChargeStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<ChargeStatus> {
        Some(match s {
            "pending" => ChargeStatus::Pending,
            "approved" => ChargeStatus::Approved,
            "rejected" => ChargeStatus::Rejected,
            "cancelled" => ChargeStatus::Cancelled,
            _ => return None,
        })
    }

    /// The only transitions: pending → approved | rejected | cancelled.
    pub fn decide(self, d: Decision) -> Result<ChargeStatus, ApiError> {
        match (self, d) {
            (ChargeStatus::Pending, Decision::Approve) => Ok(ChargeStatus::Approved),
            (ChargeStatus::Pending, Decision::Reject) => Ok(ChargeStatus::Rejected),
            (ChargeStatus::Pending, Decision::Cancel) => Ok(ChargeStatus::Cancelled),
            (s, _) => Err(decided(s)),
        }
    }
}

fn decided(s: ChargeStatus) -> ApiError {
    ApiError::new(
        ErrorCode::ChargeDecided,
        format!("this charge request is already {}", s.as_str()),
    )
}

fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such charge request")
}

/// A charge request as the API shows it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ChargeView {
    /// 32 hex characters.
    pub charge_id: String,
    #[schema(value_type = comatching_protocol::UserId)]
    pub user_id: String,
    pub username: String,
    pub amount: i64,
    pub depositor: String,
    pub status: ChargeStatus,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub created_at_unix_ms: i64,
    /// Null while pending.
    #[schema(required = true)]
    pub decided_at_unix_ms: Option<i64>,
    /// The operator who approved or rejected (null while pending and when cancelled).
    #[schema(required = true)]
    pub operator_id: Option<String>,
    /// The rejection's reason.
    #[schema(required = true)]
    pub reason: Option<String>,
}

pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

const SELECT: &str = "SELECT c.charge_id, c.user_id, a.username, c.amount, c.depositor, c.status, \
     c.created_ms, c.decided_ms, c.operator_id, c.reason FROM charges c JOIN accounts a ON a.user_id = c.user_id";

fn view(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChargeView> {
    let status: String = r.get(5)?;
    let created: i64 = r.get(6)?;
    Ok(ChargeView {
        charge_id: r.get(0)?,
        user_id: r.get(1)?,
        username: r.get(2)?,
        amount: r.get(3)?,
        depositor: r.get(4)?,
        status: ChargeStatus::parse(&status).unwrap_or(ChargeStatus::Cancelled),
        created_at: rfc3339(created),
        created_at_unix_ms: created,
        decided_at_unix_ms: r.get(7)?,
        operator_id: r.get(8)?,
        reason: r.get(9)?,
    })
}

pub fn get(c: &Connection, charge_id: &str) -> Result<Option<ChargeView>, ApiError> {
    Ok(c.row_cached(
        &format!("{SELECT} WHERE c.charge_id = ?1"),
        [charge_id],
        view,
    )
    .optional()?)
}

/// The student's pending request, if any.
pub fn pending_of(c: &Connection, user: UserId) -> Result<Option<ChargeView>, ApiError> {
    Ok(c.row_cached(
        &format!("{SELECT} WHERE c.user_id = ?1 AND c.status = 'pending'"),
        [user.to_hex()],
        view,
    )
    .optional()?)
}

/// Everything that changed, for the caller to wake the streams with once committed.
pub struct Changed<T> {
    pub value: T,
    pub wakes: Vec<Wake>,
}

/// Files a request for `user`. 409 `charge_pending` if one is already pending.
pub fn create(
    c: &Connection,
    user: UserId,
    amount: u64,
    depositor: &str,
) -> Result<Changed<ChargeView>, ApiError> {
    let pending = || {
        ApiError::new(
            ErrorCode::ChargePending,
            "you already have a pending charge request: cancel it or wait for the booth",
        )
    };
    if pending_of(c, user)?.is_some() {
        return Err(pending());
    }
    let id = uuid::Uuid::now_v7().simple().to_string();
    let amount = i64::try_from(amount).map_err(|_| ApiError::internal("amount overflow"))?;
    match c.exec_cached(
        "INSERT INTO charges(charge_id, user_id, amount, depositor, status, created_ms) \
         VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
        params![id, user.to_hex(), amount, depositor, now_ms()],
    ) {
        Ok(_) => {}
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            return Err(pending());
        }
        Err(e) => return Err(e.into()),
    }
    let v = get(c, &id)?.ok_or_else(|| ApiError::internal("charge just inserted"))?;
    let wake = events::emit(
        c,
        Audience::Operators,
        user,
        "charge.created",
        &json!({ "charge": v }),
    )?;
    Ok(Changed {
        value: v,
        wakes: vec![wake],
    })
}

/// The outcome of a decision: the request after it, and the student's points if they changed.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Decided {
    pub charge: ChargeView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points: Option<i64>,
}

/// Applies `d` to a request. `actor` is the operator (approve, reject) or the student (cancel);
/// a student may only cancel their own request (any other id is `not_found`).
pub fn decide(
    c: &Connection,
    actor: UserId,
    charge_id: &str,
    d: Decision,
    reason: Option<&str>,
) -> Result<Changed<Decided>, ApiError> {
    let Some(before) = get(c, charge_id)? else {
        return Err(not_found());
    };
    if d == Decision::Cancel && before.user_id != actor.to_hex() {
        return Err(not_found());
    }
    let next = before.status.decide(d)?;
    let now = now_ms();
    let operator = (d != Decision::Cancel).then(|| actor.to_hex());
    let changed = c.exec_cached(
        "UPDATE charges SET status = ?2, decided_ms = ?3, operator_id = ?4, reason = ?5 \
         WHERE charge_id = ?1 AND status = 'pending'",
        params![charge_id, next.as_str(), now, operator, reason],
    )?;
    if changed != 1 {
        // Decided between our read and our write (cannot happen with one writer, kept for safety).
        let now_status = get(c, charge_id)?.map_or(next, |v| v.status);
        return Err(decided(now_status));
    }
    let student: UserId = before
        .user_id
        .parse()
        .map_err(|_| ApiError::internal("stored user id"))?;
    let mut points = None;
    if next == ChargeStatus::Approved {
        ledger::grant_from(
            c,
            student,
            before.amount as u64,
            GRANT_REASON,
            ledger::GrantSource {
                operator: Some(actor),
                charge_id: Some(charge_id),
            },
        )?;
        points = Some(ledger::available(c, student)?);
    }
    let after = get(c, charge_id)?.ok_or_else(|| ApiError::internal("charge just decided"))?;
    let kind = if next == ChargeStatus::Cancelled {
        "charge.cancelled"
    } else {
        "charge.decided"
    };
    let mut wakes = vec![events::emit(
        c,
        Audience::Operators,
        student,
        kind,
        &json!({ "charge": after }),
    )?];
    if next != ChargeStatus::Cancelled {
        wakes.push(events::emit(
            c,
            Audience::User,
            student,
            "charge.decided",
            &json!({ "charge": after, "points": points }),
        )?);
    }
    if let Some(p) = points {
        wakes.push(points_changed(c, student, p)?);
    }
    Ok(Changed {
        value: Decided {
            charge: after,
            points,
        },
        wakes,
    })
}

/// The student's `points.changed` event.
pub fn points_changed(c: &Connection, user: UserId, points: i64) -> Result<Wake, ApiError> {
    events::emit(
        c,
        Audience::User,
        user,
        "points.changed",
        &json!({ "points": points }),
    )
}

/// A page of requests: `user` limits it to one student's (newest first); otherwise by
/// `status`, pending oldest first (the booth's queue), the others newest first. The cursor is
/// the last `charge_id` of the previous page (ids are UUIDv7: time-ordered).
pub fn page(
    c: &Connection,
    user: Option<UserId>,
    status: Option<ChargeStatus>,
    cursor: Option<&str>,
    limit: usize,
) -> Result<(Vec<ChargeView>, Option<String>), ApiError> {
    let oldest_first = user.is_none() && status == Some(ChargeStatus::Pending);
    let (cmp, order) = if oldest_first {
        (">", "ASC")
    } else {
        ("<", "DESC")
    };
    let mut sql = format!("{SELECT} WHERE 1 = 1");
    let mut args: Vec<String> = Vec::new();
    if let Some(u) = user {
        args.push(u.to_hex());
        sql.push_str(&format!(" AND c.user_id = ?{}", args.len()));
    }
    if let Some(s) = status {
        args.push(s.as_str().to_owned());
        sql.push_str(&format!(" AND c.status = ?{}", args.len()));
    }
    if let Some(cur) = cursor {
        args.push(cur.to_owned());
        sql.push_str(&format!(" AND c.charge_id {cmp} ?{}", args.len()));
    }
    sql.push_str(&format!(
        " ORDER BY c.charge_id {order} LIMIT {}",
        limit + 1
    ));
    let mut st = c.prepare_cached(&sql)?;
    let mut rows = st
        .query_map(rusqlite::params_from_iter(args.iter()), view)?
        .collect::<Result<Vec<_>, _>>()?;
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| r.charge_id.clone())
    } else {
        None
    };
    Ok((rows, next))
}

/// Erasure: cancels the student's pending request, blanks the depositor on all of them.
pub fn erase(c: &Connection, user: UserId, now: i64) -> Result<(), ApiError> {
    c.exec_cached(
        "UPDATE charges SET status = 'cancelled', decided_ms = ?2, reason = 'withdrawn' \
         WHERE user_id = ?1 AND status = 'pending'",
        params![user.to_hex(), now],
    )?;
    c.exec_cached(
        "UPDATE charges SET depositor = '' WHERE user_id = ?1",
        [user.to_hex()],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules() -> ChargeRules {
        ChargeRules::from(&ChargeConfig::default())
    }

    proptest! {
        /// An amount is accepted iff it is within the bounds and a multiple of the step.
        #[test]
        fn amounts_follow_the_rules(a in -10_000i64..200_000) {
            let r = rules();
            let ok = (1000..=100_000).contains(&a) && a % 500 == 0;
            prop_assert_eq!(r.amount(a).is_ok(), ok, "{}", a);
            if !ok {
                let e = r.amount(a).unwrap_err();
                prop_assert_eq!(e.code, ErrorCode::ValidationFailed);
                prop_assert_eq!(e.field.as_deref(), Some("amount"));
            }
        }

        /// A depositor is accepted iff, trimmed, it has 1..=40 characters and none that are
        /// control or bidi characters; what is stored is the trimmed text.
        #[test]
        fn depositors_are_trimmed_printable_and_short(s in "\\PC{0,45}|[ \\t]{0,3}[가-힣a-z\\u{202E}\\u{0007}]{0,42}[ \\n]{0,2}") {
            let t = s.trim();
            let n = t.chars().count();
            let ok = (1..=40).contains(&n) && !t.chars().any(|c| c.is_control() || is_bidi_control(c));
            match depositor(&s) {
                Ok(v) => { prop_assert!(ok); prop_assert_eq!(v.as_str(), t); }
                Err(e) => { prop_assert!(!ok, "{:?} refused", s); prop_assert_eq!(e.field.as_deref(), Some("depositor")); }
            }
        }

        /// Only a pending request can be decided, exactly once, whatever the sequence.
        #[test]
        fn a_request_is_decided_at_most_once(ds in proptest::collection::vec(0..3u8, 1..8)) {
            let mut s = ChargeStatus::Pending;
            let mut decided = 0;
            for d in ds {
                let d = [Decision::Approve, Decision::Reject, Decision::Cancel][d as usize];
                match s.decide(d) {
                    Ok(n) => { prop_assert_eq!(s, ChargeStatus::Pending); s = n; decided += 1; }
                    Err(e) => { prop_assert_ne!(s, ChargeStatus::Pending); prop_assert_eq!(e.code, ErrorCode::ChargeDecided); }
                }
            }
            prop_assert_eq!(decided, 1);
        }
    }

    #[test]
    fn examples() {
        assert_eq!(depositor("  김민수 ").unwrap(), "김민수");
        assert!(depositor("").is_err());
        assert!(depositor("   ").is_err());
        assert!(depositor("abc\u{202E}def").is_err());
        assert!(depositor("a\nb").is_err());
        assert!(depositor(&"가".repeat(40)).is_ok());
        assert!(depositor(&"가".repeat(41)).is_err());
        assert!(reason(&"x".repeat(200)).is_ok());
        assert!(reason(&"x".repeat(201)).is_err());
        assert_eq!(rules().amount(1000).unwrap(), 1000);
        assert!(rules().amount(1250).is_err());
        assert!(rules().amount(100_500).is_err());
    }
}
