//! The points ledger: grants, holds, and their settlement.
//!
//! Points are money to students, so the rules are few and strict:
//! * entries are append-only (`grant`, `charge`); the balance is their sum, cached on the
//!   account row in the same transaction and checked by `audit`;
//! * a match first *reserves* a hold (only if the available balance — balance minus open holds —
//!   covers it), then settles it exactly once, as a charge or a void. Settlement is a
//!   conditional update from `reserved` (`HoldState::settle`), so a late reply after a void, a
//!   sweep racing a reply, or a duplicate reply changes nothing;
//! * the sweeper voids holds whose deadline passed (after a crash, say).
//!
//! `HoldState::settle` is the pure transition; the functions below apply it inside the caller's
//! transaction. This module never talks to the network.

use crate::db::Cached;
use comatching_protocol::UserId;
use rusqlite::{Connection, OptionalExtension, params};

use crate::db::now_ms;
use crate::error::{ApiError, ErrorCode};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldState {
    Reserved,
    Charged,
    Voided,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Charge this many points (the cost less any refund); 0 charges nothing but closes the hold.
    Charge(u64),
    Void,
}

impl HoldState {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Reserved => "reserved",
            HoldState::Charged => "charged",
            HoldState::Voided => "voided",
        }
    }

    /// A stored state; anything else is a damaged row (the table's CHECK allows only these).
    pub fn parse(s: &str) -> Option<HoldState> {
        match s {
            "reserved" => Some(HoldState::Reserved),
            "charged" => Some(HoldState::Charged),
            "voided" => Some(HoldState::Voided),
            _ => None,
        }
    }

    /// The only transitions: reserved → charged | voided. Anything else is refused, which is
    /// what makes settlement happen at most once.
    pub fn settle(self, s: Settlement) -> Option<HoldState> {
        match (self, s) {
            (HoldState::Reserved, Settlement::Charge(_)) => Some(HoldState::Charged),
            (HoldState::Reserved, Settlement::Void) => Some(HoldState::Voided),
            _ => None,
        }
    }
}

/// Who a grant came from, recorded on its entry.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrantSource<'a> {
    /// The operator who granted it (`None`: tests, tools).
    pub operator: Option<UserId>,
    /// The charge request it pays out (at most one grant per request: a unique index).
    pub charge_id: Option<&'a str>,
}

/// Grants points (operator action). Returns `(entry_id, new balance)`.
pub fn grant(
    conn: &Connection,
    user: UserId,
    amount: u64,
    reason: &str,
) -> Result<(i64, i64), ApiError> {
    grant_from(conn, user, amount, reason, GrantSource::default())
}

/// `grant`, recording the operator and the charge request behind it.
pub fn grant_from(
    conn: &Connection,
    user: UserId,
    amount: u64,
    reason: &str,
    source: GrantSource<'_>,
) -> Result<(i64, i64), ApiError> {
    let amount = i64::try_from(amount).map_err(|_| ApiError::validation("amount", "too large"))?;
    let now = now_ms();
    conn.exec_cached(
        "INSERT INTO ledger_entries(user_id, kind, amount, reason, created_ms, operator_id, charge_id) \
         VALUES (?1, 'grant', ?2, ?3, ?4, ?5, ?6)",
        params![
            user.to_hex(),
            amount,
            reason,
            now,
            source.operator.map(|o| o.to_hex()),
            source.charge_id
        ],
    )?;
    let entry_id = conn.last_insert_rowid();
    conn.exec_cached(
        "UPDATE accounts SET balance = balance + ?2 WHERE user_id = ?1",
        params![user.to_hex(), amount],
    )?;
    Ok((entry_id, balance(conn, user)?))
}

/// Grants minus charges.
pub fn balance(conn: &Connection, user: UserId) -> Result<i64, ApiError> {
    conn.row_cached(
        "SELECT balance FROM accounts WHERE user_id = ?1",
        [user.to_hex()],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such user"))
}

/// Balance less open holds: what the user may still spend, and what the API shows as `points`.
pub fn available(conn: &Connection, user: UserId) -> Result<i64, ApiError> {
    let held: i64 = conn.row_cached(
        "SELECT COALESCE(SUM(amount), 0) FROM holds WHERE user_id = ?1 AND state = 'reserved'",
        [user.to_hex()],
        |r| r.get(0),
    )?;
    Ok(balance(conn, user)? - held)
}

/// Reserves `amount` for a match if the available balance covers it.
pub fn reserve(
    conn: &Connection,
    user: UserId,
    amount: u64,
    deadline_ms: i64,
) -> Result<String, ApiError> {
    let amount_i = i64::try_from(amount).map_err(|_| ApiError::internal("cost overflow"))?;
    let avail = available(conn, user)?;
    if avail < amount_i {
        return Err(ApiError::new(
            ErrorCode::InsufficientPoints,
            format!("this match costs {amount} points; {avail} available"),
        ));
    }
    let hold_id = uuid::Uuid::now_v7().simple().to_string();
    conn.exec_cached(
        "INSERT INTO holds(hold_id, user_id, amount, state, deadline_ms, created_ms) VALUES (?1, ?2, ?3, 'reserved', ?4, ?5)",
        params![hold_id, user.to_hex(), amount_i, deadline_ms, now_ms()],
    )?;
    Ok(hold_id)
}

/// Settles a hold if, and only if, it is still reserved. Returns whether this call settled it.
pub fn settle(conn: &Connection, hold_id: &str, s: Settlement) -> Result<bool, ApiError> {
    let row: Option<(String, String, i64)> = conn
        .row_cached(
            "SELECT user_id, state, amount FROM holds WHERE hold_id = ?1",
            [hold_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((user, state, held)) = row else {
        return Ok(false);
    };
    let state = HoldState::parse(&state).ok_or_else(|| {
        ApiError::internal(format!("hold {hold_id} has the unknown state {state:?}"))
    })?;
    let Some(next) = state.settle(s) else {
        return Ok(false);
    };
    // Checked before anything is written: a refused charge leaves the hold reserved even when
    // the caller runs outside a transaction.
    let charge = match s {
        Settlement::Charge(amount) => {
            let amount =
                i64::try_from(amount).map_err(|_| ApiError::internal("charge overflow"))?;
            if amount > held {
                return Err(ApiError::internal(format!(
                    "charge {amount} exceeds hold {held} ({hold_id})"
                )));
            }
            Some(amount)
        }
        Settlement::Void => None,
    };
    let changed = conn.exec_cached(
        "UPDATE holds SET state = ?2, settled_ms = ?3 WHERE hold_id = ?1 AND state = 'reserved'",
        params![hold_id, next.as_str(), now_ms()],
    )?;
    if changed != 1 {
        return Ok(false);
    }
    if let Some(amount) = charge
        && amount > 0
    {
        conn.exec_cached(
            "INSERT INTO ledger_entries(user_id, kind, amount, reason, hold_id, created_ms) VALUES (?1, 'charge', ?2, 'match', ?3, ?4)",
            params![user, amount, hold_id, now_ms()],
        )?;
        conn.exec_cached(
            "UPDATE accounts SET balance = balance - ?2 WHERE user_id = ?1",
            params![user, amount],
        )?;
    }
    Ok(true)
}

/// Holds still reserved whose deadline is before `now_ms`.
pub fn expired_holds(conn: &Connection, now_ms: i64) -> Result<Vec<String>, ApiError> {
    let mut stmt = conn.prepare(
        "SELECT hold_id FROM holds WHERE state = 'reserved' AND deadline_ms < ?1 ORDER BY deadline_ms",
    )?;
    let ids = stmt
        .query_map([now_ms], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(ids)
}

pub fn open_holds(conn: &Connection) -> Result<i64, ApiError> {
    Ok(conn.row_cached(
        "SELECT COUNT(*) FROM holds WHERE state = 'reserved'",
        [],
        |r| r.get(0),
    )?)
}

/// Checks the ledger's invariants over every account; returns the first violation found.
/// Cached balance = grants − charges ≥ 0; available ≥ 0; every charge belongs to a charged
/// hold and is no larger than it.
pub fn audit(conn: &Connection) -> Result<(), String> {
    let q = |sql: &str| -> Result<Vec<String>, String> {
        let mut stmt = conn.prepare(sql).map_err(|e| e.to_string())?;
        stmt.query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| e.to_string())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    };
    let bad = q("SELECT a.user_id FROM accounts a WHERE a.balance != \
                   (SELECT COALESCE(SUM(CASE kind WHEN 'grant' THEN amount ELSE -amount END), 0) \
                    FROM ledger_entries e WHERE e.user_id = a.user_id) OR a.balance < 0")?;
    if let Some(u) = bad.first() {
        return Err(format!(
            "cached balance of {u} differs from its entries or is negative"
        ));
    }
    let over = q("SELECT a.user_id FROM accounts a WHERE a.balance < \
                    (SELECT COALESCE(SUM(amount), 0) FROM holds h WHERE h.user_id = a.user_id AND h.state = 'reserved')")?;
    if let Some(u) = over.first() {
        return Err(format!("open holds of {u} exceed its balance"));
    }
    let orphan = q(
        "SELECT CAST(e.entry_id AS TEXT) FROM ledger_entries e LEFT JOIN holds h ON h.hold_id = e.hold_id \
                     WHERE e.kind = 'charge' AND (h.hold_id IS NULL OR h.state != 'charged' OR e.amount > h.amount)",
    )?;
    if let Some(e) = orphan.first() {
        return Err(format!("charge entry {e} has no charged hold covering it"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;
    use proptest::prelude::*;

    fn account(db: &Db) -> UserId {
        let u = UserId::new_v7();
        db.run_sync(|c| {
            c.exec_cached(
                "INSERT INTO accounts(user_id, username, password_hash, created_ms) VALUES (?1, ?2, 'x', 0)",
                params![u.to_hex(), u.to_hex()],
            )?;
            Ok(())
        })
        .unwrap();
        u
    }

    #[test]
    fn transitions_happen_once() {
        use HoldState::*;
        assert_eq!(Reserved.settle(Settlement::Void), Some(Voided));
        assert_eq!(Reserved.settle(Settlement::Charge(5)), Some(Charged));
        for s in [Settlement::Void, Settlement::Charge(1)] {
            assert_eq!(Voided.settle(s), None);
            assert_eq!(Charged.settle(s), None);
        }
    }

    #[test]
    fn states_are_read_back_as_stored_and_nothing_else_is_a_state() {
        use HoldState::*;
        for st in [Reserved, Charged, Voided] {
            assert_eq!(HoldState::parse(st.as_str()), Some(st));
        }
        for bad in ["", "Reserved", "charged ", "void", "xyzzy"] {
            assert_eq!(HoldState::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grant_returns_its_entry_and_the_new_balance() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        let u = account(&db);
        let (first, bal) = db.run_sync(|c| grant(c, u, 500, "booth")).unwrap();
        assert_eq!(bal, 500);
        let op = UserId::new_v7();
        let (second, bal) = db
            .run_sync(|c| {
                grant_from(
                    c,
                    u,
                    300,
                    "charge",
                    GrantSource {
                        operator: Some(op),
                        charge_id: Some("c-1"),
                    },
                )
            })
            .unwrap();
        assert_eq!(bal, 800);
        assert!(second > first && first > 0, "{first} {second}");
        let row: (i64, String, Option<String>, Option<String>) = db
            .run_sync(|c| {
                Ok(c.query_row(
                    "SELECT amount, reason, operator_id, charge_id FROM ledger_entries WHERE entry_id = ?1",
                    [second],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )?)
            })
            .unwrap();
        assert_eq!(
            row,
            (300, "charge".into(), Some(op.to_hex()), Some("c-1".into()))
        );
        let e = db.run_sync(|c| balance(c, UserId::new_v7())).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
    }

    #[test]
    fn reserve_takes_exactly_the_available_balance_and_a_zero_charge_books_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        let u = account(&db);
        db.run_sync(|c| grant(c, u, 1300, "booth")).unwrap();
        let h = db.run_sync(|c| reserve(c, u, 1300, 0)).unwrap();
        assert_eq!(h.len(), 32);
        assert_eq!(db.run_sync(|c| available(c, u)).unwrap(), 0);
        assert_eq!(db.run_sync(|c| open_holds(c)).unwrap(), 1);
        let e = db.run_sync(|c| reserve(c, u, 1, 0)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientPoints);
        // A charge of 0 closes the hold and writes no entry.
        assert!(
            db.run_sync(|c| settle(c, &h, Settlement::Charge(0)))
                .unwrap()
        );
        assert_eq!(db.run_sync(|c| balance(c, u)).unwrap(), 1300);
        assert_eq!(db.run_sync(|c| open_holds(c)).unwrap(), 0);
        let entries: i64 = db
            .run_sync(|c| {
                Ok(c.query_row(
                    "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'charge'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert_eq!(entries, 0);
        // A charge of the whole hold is allowed, one point more is refused.
        let h = db.run_sync(|c| reserve(c, u, 1000, 0)).unwrap();
        let e = db
            .run_sync(|c| settle(c, &h, Settlement::Charge(1001)))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(
            db.run_sync(|c| settle(c, &h, Settlement::Charge(1000)))
                .unwrap()
        );
        assert_eq!(db.run_sync(|c| balance(c, u)).unwrap(), 300);
        assert!(
            !db.run_sync(|c| settle(c, "no-such-hold", Settlement::Void))
                .unwrap()
        );
    }

    #[test]
    fn audit_names_each_broken_invariant() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        let u = account(&db);
        db.run_sync(|c| grant(c, u, 1000, "booth")).unwrap();
        let h = db.run_sync(|c| reserve(c, u, 1000, 0)).unwrap();
        db.run_sync(|c| audit(c).map_err(ApiError::internal))
            .unwrap();
        let broken = |sql: &str| {
            let c = db.run_sync(|c| Ok(c.execute_batch(&format!("SAVEPOINT s; {sql}"))?));
            c.unwrap();
            let r = db.run_sync(|c| Ok(audit(c)));
            db.run_sync(|c| Ok(c.execute_batch("ROLLBACK TO s; RELEASE s;")?))
                .unwrap();
            r.unwrap().unwrap_err()
        };
        let e = broken("UPDATE accounts SET balance = balance + 1;");
        assert!(e.contains("cached balance"), "{e}");
        let e = broken("UPDATE holds SET amount = 1001;");
        assert!(e.contains("open holds"), "{e}");
        let e = broken(&format!(
            "INSERT INTO ledger_entries(user_id, kind, amount, reason, hold_id, created_ms) \
             VALUES ('{}', 'charge', 5, 'match', '{h}', 0); \
             UPDATE accounts SET balance = balance - 5; UPDATE holds SET amount = 5;",
            u.to_hex()
        ));
        assert!(e.contains("no charged hold"), "{e}");
        db.run_sync(|c| audit(c).map_err(ApiError::internal))
            .unwrap();
    }

    #[derive(Clone, Debug)]
    enum Op {
        Grant(usize, u64),
        Reserve(usize, u64),
        /// Settle the n-th hold ever made (mod count) with a charge of (cost - refund).
        Charge(usize, bool),
        Void(usize),
        /// The sweeper runs at a moment that expires holds older than this many ops.
        Sweep(usize),
        /// A reply arrives for a hold the sweeper may already have voided.
        LateReply(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3usize, 1..3000u64).prop_map(|(u, a)| Op::Grant(u, a)),
            (
                0..3usize,
                prop_oneof![Just(1000u64), Just(1200), Just(1300), Just(1500)]
            )
                .prop_map(|(u, a)| Op::Reserve(u, a)),
            (any::<usize>(), any::<bool>()).prop_map(|(h, r)| Op::Charge(h, r)),
            any::<usize>().prop_map(Op::Void),
            (0..10usize).prop_map(Op::Sweep),
            any::<usize>().prop_map(Op::LateReply),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
        /// Random interleavings of reserve, settle, void, sweep and late replies against a real
        /// SQLite file: the balance never goes negative, each hold ends exactly once, nothing is
        /// open at quiescence, and balance = grants − charges.
        #[test]
        fn ledger_invariants_hold_under_any_interleaving(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open(&dir.path().join("relay.db")).unwrap();
            let users: Vec<UserId> = (0..3).map(|_| account(&db)).collect();
            // Model: what must be true, computed independently of the SQL.
            let mut granted = [0i64; 3];
            let mut charged = [0i64; 3];
            let mut holds: Vec<(String, usize, u64, usize, Option<HoldState>)> = Vec::new();
            for (step, op) in ops.iter().enumerate() {
                match *op {
                    Op::Grant(u, a) => {
                        db.run_sync(|c| grant(c, users[u], a, "test")).unwrap();
                        granted[u] += a as i64;
                    }
                    Op::Reserve(u, a) => {
                        let avail_model = granted[u] - charged[u]
                            - holds.iter().filter(|h| h.1 == u && h.4.is_none()).map(|h| h.2 as i64).sum::<i64>();
                        let r = db.run_sync(|c| reserve(c, users[u], a, step as i64));
                        match r {
                            Ok(id) => {
                                prop_assert!(avail_model >= a as i64);
                                holds.push((id, u, a, step, None));
                            }
                            Err(e) => {
                                prop_assert_eq!(e.code, ErrorCode::InsufficientPoints);
                                prop_assert!(avail_model < a as i64);
                            }
                        }
                    }
                    Op::Charge(h, _) | Op::LateReply(h) if !holds.is_empty() => {
                        let refund = matches!(*op, Op::Charge(_, true));
                        let i = h % holds.len();
                        let amount = holds[i].2 - if refund { 300 } else { 0 };
                        let did = db.run_sync(|c| settle(c, &holds[i].0, Settlement::Charge(amount))).unwrap();
                        prop_assert_eq!(did, holds[i].4.is_none(), "settled twice or not at all");
                        if did {
                            holds[i].4 = Some(HoldState::Charged);
                            charged[holds[i].1] += amount as i64;
                        }
                    }
                    Op::Void(h) if !holds.is_empty() => {
                        let i = h % holds.len();
                        let did = db.run_sync(|c| settle(c, &holds[i].0, Settlement::Void)).unwrap();
                        prop_assert_eq!(did, holds[i].4.is_none());
                        if did { holds[i].4 = Some(HoldState::Voided); }
                    }
                    Op::Sweep(age) => {
                        let cutoff = step as i64 - age as i64;
                        let expired = db.run_sync(|c| expired_holds(c, cutoff)).unwrap();
                        for id in expired {
                            prop_assert!(db.run_sync(|c| settle(c, &id, Settlement::Void)).unwrap());
                            let h = holds.iter_mut().find(|h| h.0 == id).unwrap();
                            prop_assert!(h.4.is_none() && (h.3 as i64) < cutoff);
                            h.4 = Some(HoldState::Voided);
                        }
                    }
                    _ => {}
                }
                db.run_sync(|c| audit(c).map_err(ApiError::internal)).unwrap();
                for (u, user) in users.iter().enumerate() {
                    let bal = db.run_sync(|c| balance(c, *user)).unwrap();
                    prop_assert_eq!(bal, granted[u] - charged[u]);
                    prop_assert!(db.run_sync(|c| available(c, *user)).unwrap() >= 0);
                }
            }
            // Quiescence: the sweeper at the end of time closes everything still open.
            for id in db.run_sync(|c| expired_holds(c, i64::MAX)).unwrap() {
                db.run_sync(|c| settle(c, &id, Settlement::Void)).unwrap();
            }
            prop_assert_eq!(db.run_sync(|c| open_holds(c)).unwrap(), 0);
            let states: i64 = db.run_sync(|c| Ok(c.row_cached(
                "SELECT COUNT(*) FROM holds WHERE state IN ('charged','voided')", [], |r| r.get(0))?)).unwrap();
            prop_assert_eq!(states as usize, holds.len());
        }
    }
}
