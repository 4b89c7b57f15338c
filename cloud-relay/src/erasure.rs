//! Personal data has an end (issue 14): what a withdrawal and `admin purge` erase, and how.
//!
//! **Erased** (`erase`, in the caller's transaction): the profile's nickname, major, song,
//! comment and contact handle (set to empty strings); the username (freed: replaced by `~` and the
//! user id, which no valid username can equal) and the password hash; the pool features in the
//! user's outbox rows (their upserts become deletes of the same version, so a replay carries no
//! major and still ends in the tombstone); the partner view stored with every match answer that
//! showed this user to someone (the replayed answer then shows the partner as withdrawn), and
//! the partner views in this user's own stored answers (never replayed again: the account has no
//! session left). `PRAGMA secure_delete` (every relay connection, `db.rs`) zeroes the replaced
//! bytes in the file instead of leaving them in free space; `withdraw` then asks for a
//! truncating WAL checkpoint so the old page images in the WAL go too (not when Litestream
//! replicates the database: it owns the checkpoints then, see `litestream_replicates`).
//!
//! **Kept**, against the pseudonymous user id: the ledger (every amount, so balances and totals
//! still add up), holds, matches (the pair, cost, time: the partner's history keeps the match and
//! shows the contact as withdrawn), the profile's pool features (gender, age, MBTI, hobbies,
//! contact frequency, pick count, version), and the account's timestamps.
//!
//! Withdrawal = end the account (withdrawn, sessions gone, out of the pool) + erase. `purge`
//! does the same to every account not active since a date, with the relay stopped.

use std::time::Duration;

use comatching_protocol::UserId;
use rusqlite::{Connection, params};
use serde::Serialize;
use serde_json::{Value, json};

use crate::db::{Cached, Db, now_ms};
use crate::error::ApiError;
use crate::profiles;

/// Marks usernames that were freed by erasure (never a valid username: `[a-z0-9_]` only).
pub const ERASED_USERNAME_PREFIX: &str = "~";

/// How a matched partner whose personal data was erased appears in match answers and history.
pub fn withdrawn_partner(user_hex: &str) -> Value {
    serde_json::to_value(WithdrawnPartner {
        user_id: user_hex.to_owned(),
        withdrawn: true,
        contact: None,
    })
    .unwrap_or(Value::Null)
}

/// A partner whose personal data was erased: only their id remains.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct WithdrawnPartner {
    #[schema(value_type = comatching_protocol::UserId)]
    pub user_id: String,
    /// Always true.
    pub withdrawn: bool,
    /// Always null.
    #[schema(schema_with = null_schema, required = true)]
    pub contact: Option<String>,
}

fn null_schema() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Null)
        .build()
}

/// Ends `user`'s account and erases its personal data, in the caller's transaction or savepoint.
/// Idempotent.
pub fn withdraw_in(c: &Connection, user: UserId) -> Result<(), ApiError> {
    let now = now_ms();
    c.exec_cached(
        "UPDATE accounts SET withdrawn_ms = ?2 WHERE user_id = ?1 AND withdrawn_ms IS NULL",
        params![user.to_hex(), now],
    )?;
    c.exec_cached("DELETE FROM sessions WHERE user_id = ?1", [user.to_hex()])?;
    profiles::leave_pool(c, user)?;
    erase(c, user, now)?;
    Ok(())
}

/// `DELETE /api/v1/me`: withdraws and erases in one durable commit, then truncates the WAL (in the
/// background, retried briefly: a reader holding an old snapshot, a backup say, makes one attempt
/// give up rather than wait).
pub async fn withdraw(db: &Db, user: UserId) -> Result<(), ApiError> {
    db.write(move |c| {
        let sp = c.savepoint()?;
        withdraw_in(&sp, user)?;
        sp.commit()?;
        Ok(())
    })
    .await?;
    if litestream_replicates(db.path()) {
        // Litestream checkpoints this WAL itself, and its replica keeps the WAL's history for
        // its own retention anyway; a truncate racing it would only cost it a new generation.
        return Ok(());
    }
    let db = db.clone();
    tokio::spawn(async move {
        for attempt in 1..=20u32 {
            match db.run(truncate_wal).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint after a withdrawal failed"),
            }
            if attempt == 20 {
                tracing::warn!(
                    "the WAL could not be truncated after a withdrawal (a long reader?); the old \
                     page images go when the WAL is next reset and overwritten"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    Ok(())
}

/// Whether Litestream replicates the database at `db_path` (it keeps its shadow WAL in
/// `.<file name>-litestream` beside the file).
pub fn litestream_replicates(db_path: &std::path::Path) -> bool {
    let Some(name) = db_path.file_name() else {
        return false;
    };
    let mut shadow = std::ffi::OsString::from(".");
    shadow.push(name);
    shadow.push("-litestream");
    db_path.with_file_name(shadow).is_dir()
}

/// `PRAGMA wal_checkpoint(TRUNCATE)`, waiting at most 100 ms for readers. True when the WAL was
/// fully checkpointed and truncated to nothing.
pub fn truncate_wal(c: &mut Connection) -> Result<bool, ApiError> {
    c.busy_timeout(Duration::from_millis(100))?;
    let done = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    });
    c.busy_timeout(Duration::from_secs(10))?;
    Ok(done? == 0)
}

/// Rewrites the `partner` of a stored answer body with `f`; `None` when nothing changes.
fn rewrite_partner(body: &str, f: impl Fn(&Value) -> Value) -> Option<String> {
    let mut v: Value = serde_json::from_str(body).ok()?;
    let partner = v.get_mut("partner")?;
    if !partner.is_object() {
        return None;
    }
    let new = f(partner);
    if *partner == new {
        return None;
    }
    *partner = new;
    Some(v.to_string())
}

/// Erases `user`'s personal fields (see the module comment). Returns whether anything was left
/// to erase.
pub fn erase(c: &Connection, user: UserId, now: i64) -> Result<bool, ApiError> {
    let id = user.to_hex();
    let fresh = c.exec_cached(
        "UPDATE accounts SET username = ?3 || user_id, password_hash = '', erased_ms = ?2 \
         WHERE user_id = ?1 AND erased_ms IS NULL",
        params![id, now, ERASED_USERNAME_PREFIX],
    )? == 1;
    c.exec_cached(
        "UPDATE profiles SET nickname = '', major = '', song = '', comment = '', contact_handle = '', \
         erased_ms = COALESCE(erased_ms, ?2) WHERE user_id = ?1",
        params![id, now],
    )?;
    c.exec_cached(
        "UPDATE outbox SET op = 'delete', features = NULL WHERE user_id = ?1 AND op = 'upsert'",
        [&id],
    )?;
    // The booth: a pending charge request is cancelled, the depositor name blanked on all of
    // them (amounts and decisions stay, like the ledger), and the live events about the user go.
    crate::charges::erase(c, user, now)?;
    crate::events::erase(c, user)?;
    // Answers that showed this user as the partner: the partner is now withdrawn.
    let shown: Vec<(String, String)> = {
        let mut st = c.prepare_cached(
            "SELECT r.request_id, r.response_body FROM matches m \
             JOIN match_requests r ON r.request_id = m.request_id \
             WHERE m.partner_id = ?1 AND r.response_body IS NOT NULL",
        )?;
        st.query_map([&id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    for (request, body) in shown {
        if let Some(new) = rewrite_partner(&body, |_| withdrawn_partner(&id)) {
            c.exec_cached(
                "UPDATE match_requests SET response_body = ?2 WHERE request_id = ?1",
                params![request, new],
            )?;
        }
    }
    // This user's own answers: only the partner's id stays.
    let own: Vec<(String, String)> = {
        let mut st = c.prepare_cached(
            "SELECT request_id, response_body FROM match_requests \
             WHERE user_id = ?1 AND response_body IS NOT NULL",
        )?;
        st.query_map([&id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    for (request, body) in own {
        if let Some(new) = rewrite_partner(&body, |p| json!({ "user_id": p["user_id"] })) {
            c.exec_cached(
                "UPDATE match_requests SET response_body = ?2 WHERE request_id = ?1",
                params![request, new],
            )?;
        }
    }
    Ok(fresh)
}

/// Parses `--before`: `YYYY-MM-DD` (midnight UTC) or an RFC 3339 time. Returns Unix ms.
pub fn parse_before(s: &str) -> Result<i64, String> {
    use time::format_description::well_known::Rfc3339;
    let t = if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        t
    } else {
        let d = time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
            .map_err(|_| format!("`{s}` is neither YYYY-MM-DD nor an RFC 3339 time"))?;
        d.midnight().assume_utc()
    };
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("`{s}` is out of range"))
}

/// Totals that must be the same before and after a purge (the festival's report).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReportTotals {
    pub accounts: i64,
    pub points_granted: i64,
    pub points_charged: i64,
    pub balance_total: i64,
    pub matches: i64,
}

pub fn report_totals(c: &Connection) -> Result<ReportTotals, ApiError> {
    let n = |sql: &str| -> Result<i64, ApiError> { Ok(c.query_row(sql, [], |r| r.get(0))?) };
    Ok(ReportTotals {
        accounts: n("SELECT COUNT(*) FROM accounts")?,
        points_granted: n(
            "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE kind = 'grant'",
        )?,
        points_charged: n(
            "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE kind = 'charge'",
        )?,
        balance_total: n("SELECT COALESCE(SUM(balance), 0) FROM accounts")?,
        matches: n("SELECT COUNT(*) FROM matches")?,
    })
}

/// What `admin purge` did (printed as one JSON line).
#[derive(Clone, Debug, Serialize)]
pub struct PurgeReport {
    pub before_ms: i64,
    pub erased: usize,
    pub still_active: i64,
    pub totals: ReportTotals,
}

/// Erases (and ends) every account whose last activity — sign-up, profile change, session,
/// ledger entry, match request, being matched — is before `before_ms`. The totals of the report
/// are checked to be unchanged before the transaction commits.
pub fn purge(c: &mut Connection, before_ms: i64) -> Result<PurgeReport, ApiError> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let before = report_totals(&tx)?;
    let users: Vec<String> = {
        let mut st = tx.prepare(
            "SELECT a.user_id FROM accounts a WHERE a.erased_ms IS NULL AND MAX(a.created_ms, \
               COALESCE((SELECT updated_ms FROM profiles p WHERE p.user_id = a.user_id), 0), \
               COALESCE((SELECT MAX(created_ms) FROM sessions s WHERE s.user_id = a.user_id), 0), \
               COALESCE((SELECT MAX(created_ms) FROM ledger_entries e WHERE e.user_id = a.user_id), 0), \
               COALESCE((SELECT MAX(created_ms) FROM holds h WHERE h.user_id = a.user_id), 0), \
               COALESCE((SELECT MAX(created_ms) FROM matches m WHERE m.partner_id = a.user_id), 0)) < ?1",
        )?;
        st.query_map([before_ms], |r| r.get(0))?
            .collect::<Result<_, _>>()?
    };
    for u in &users {
        let user: UserId = u
            .parse()
            .map_err(|_| ApiError::internal(format!("stored user id {u}")))?;
        withdraw_in(&tx, user)?;
    }
    let after = report_totals(&tx)?;
    if after != before {
        return Err(ApiError::internal(format!(
            "purge would change the report ({before:?} → {after:?}); rolled back"
        )));
    }
    let still_active = tx.query_row(
        "SELECT COUNT(*) FROM accounts WHERE erased_ms IS NULL",
        [],
        |r| r.get(0),
    )?;
    tx.commit()?;
    Ok(PurgeReport {
        before_ms,
        erased: users.len(),
        still_active,
        totals: after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger;
    use crate::profiles::ProfileInput;

    fn profile(handle: &str, major: &str) -> profiles::Profile {
        serde_json::from_value::<ProfileInput>(json!({
            "nickname": "Nick_zq", "gender": "female", "age": 21, "mbti": "ENFP",
            "hobbies": ["game"], "contact_frequency": "normal", "major": major,
            "song": "Song_zq", "comment": "Comment_zq",
            "contact": {"kind": "kakao", "handle": handle}
        }))
        .unwrap()
        .validate()
        .unwrap()
    }

    fn account(db: &Db, name: &str, handle: &str) -> UserId {
        let u = UserId::new_v7();
        let p = profile(handle, "Major_zq");
        db.run_sync(|c| {
            c.execute(
                "INSERT INTO accounts(user_id, username, password_hash, created_ms) VALUES (?1, ?2, 'h', 1000)",
                params![u.to_hex(), name],
            )?;
            profiles::upsert(c, u, &p, 5)?;
            ledger::grant(c, u, 3000, "booth")?;
            Ok(())
        })
        .unwrap();
        u
    }

    /// A stored 201 answer of `requester` that showed `partner`, as the match flow stores it.
    fn matched(db: &Db, requester: UserId, partner: UserId) {
        db.run_sync(|c| {
            let (view, _) = profiles::load(c, partner)?.unwrap();
            let hold = ledger::reserve(c, requester, 1000, i64::MAX)?;
            let rid = uuid::Uuid::now_v7().simple().to_string();
            let body = json!({"match_id": "m", "partner": view.partner_json(), "cost": 1000});
            c.execute(
                "INSERT INTO match_requests(user_id, idempotency_key, body_hash, request_id, hold_id, state, \
                 response_status, response_body, created_ms) VALUES (?1, 'k', 'h', ?2, ?3, 'done', 201, ?4, 1)",
                params![requester.to_hex(), rid, hold, body.to_string()],
            )?;
            let (a, b) = (requester.to_hex(), partner.to_hex());
            let (lo, hi) = if a < b { (&a, &b) } else { (&b, &a) };
            c.execute(
                "INSERT INTO matches(match_id, requester_id, partner_id, pair_lo, pair_hi, request_id, cost, \
                 refunded, relaxed, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1000, 0, '[]', 1)",
                params![rid, a, b, lo, hi, rid],
            )?;
            ledger::settle(c, &hold, ledger::Settlement::Charge(1000))?;
            Ok(())
        })
        .unwrap();
    }

    fn file_bytes(dir: &std::path::Path) -> Vec<u8> {
        let mut all = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            all.extend(std::fs::read(e.path()).unwrap_or_default());
        }
        all
    }

    fn contains(hay: &[u8], needle: &str) -> bool {
        hay.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    #[test]
    fn withdrawal_erases_every_copy_and_keeps_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        let a = account(&db, "alice", "alice_handle_zq");
        let b = account(&db, "bobby", "bob_handle_7f3a9");
        matched(&db, a, b);
        let totals = db.run_sync(|c| report_totals(c)).unwrap();
        db.run_sync(|c| {
            withdraw_in(c, b)?;
            Ok(())
        })
        .unwrap();
        // The partner view: in history and in the replayed answer.
        let history = db.run_sync(|c| crate::matching::list(c, a)).unwrap();
        assert_eq!(
            history["matches"][0]["partner"],
            withdrawn_partner(&b.to_hex())
        );
        let stored: String = db
            .run_sync(|c| {
                Ok(c.query_row(
                    "SELECT response_body FROM match_requests WHERE user_id = ?1",
                    [a.to_hex()],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert!(!stored.contains("bob_handle_7f3a9"), "{stored}");
        assert_eq!(db.run_sync(|c| report_totals(c)).unwrap(), totals);
        db.run_sync(|c| ledger::audit(c).map_err(ApiError::internal))
            .unwrap();
        // The username is free again.
        db.run_sync(|c| {
            c.execute(
                "INSERT INTO accounts(user_id, username, password_hash, created_ms) VALUES ('x', 'bobby', 'h', 1)",
                [],
            )?;
            Ok(())
        })
        .unwrap();
        // And no byte of it is left in any file once the WAL is truncated.
        assert!(db.run_sync(truncate_wal).unwrap());
        let bytes = file_bytes(dir.path());
        assert!(!contains(&bytes, "bob_handle_7f3a9"));
        assert!(
            contains(&bytes, "alice_handle_zq"),
            "the grep must be able to see"
        );
    }

    #[test]
    fn purge_erases_the_inactive_and_keeps_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        let a = account(&db, "alice", "alice_handle_zq");
        let b = account(&db, "bobby", "bob_handle_7f3a9");
        matched(&db, a, b);
        let totals = db.run_sync(|c| report_totals(c)).unwrap();
        assert!(
            contains(&file_bytes(dir.path()), "bob_handle_7f3a9"),
            "the grep must be able to see"
        );
        // Everyone was active "now": a cut-off in 1970 erases nobody.
        let none = db.run_sync(|c| purge(c, 10)).unwrap();
        assert_eq!(none.erased, 0);
        let all = db.run_sync(|c| purge(c, i64::MAX)).unwrap();
        assert_eq!(all.erased, 2);
        assert_eq!(all.still_active, 0);
        assert_eq!(all.totals, totals);
        let left: i64 = db
            .run_sync(|c| {
                Ok(c.query_row(
                    "SELECT COUNT(*) FROM profiles WHERE nickname != '' OR contact_handle != '' OR major != ''",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert_eq!(left, 0);
        assert!(db.run_sync(truncate_wal).unwrap());
        let bytes = file_bytes(dir.path());
        for s in [
            "alice_handle_zq",
            "bob_handle_7f3a9",
            "Major_zq",
            "Song_zq",
            "Comment_zq",
        ] {
            assert!(!contains(&bytes, s), "{s} is still in the files");
        }
    }

    #[test]
    fn litestream_is_seen_by_its_shadow_directory() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("relay.db");
        assert!(!litestream_replicates(&db));
        std::fs::create_dir(dir.path().join(".relay.db-litestream")).unwrap();
        assert!(litestream_replicates(&db));
    }

    #[test]
    fn before_accepts_a_date_or_a_time() {
        assert_eq!(parse_before("1970-01-02").unwrap(), 86_400_000);
        assert_eq!(parse_before("1970-01-01T00:00:01Z").unwrap(), 1000);
        assert!(parse_before("yesterday").is_err());
        assert!(parse_before("2026-13-01").is_err());
    }
}
