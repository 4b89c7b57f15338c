//! `comatching-relay admin report`: the festival's money (issue 10 §3) — approved charge
//! requests per operator per day, grants by reason, points spent on matches, refunds, open
//! holds — and a reconciliation that must hold whatever the period:
//!
//! * `ledger::audit` passes (cached balances = entries, holds covered, charges backed);
//! * all-time grants − all-time match charges = the sum of balances;
//! * every approved request has exactly one grant carrying its id, of its amount, and no other
//!   request has one.
//!
//! The period (`--from`, `--to`) selects the rows of the breakdowns; the reconciliation is over
//! everything. Reads only; safe while the relay serves (one read transaction).

use rusqlite::Connection;
use serde::Serialize;

use crate::error::ApiError;
use crate::ledger;

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct OperatorDay {
    /// UTC, `YYYY-MM-DD`.
    pub day: String,
    pub operator: String,
    pub approved: i64,
    pub points: i64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ByReason {
    pub reason: String,
    pub grants: i64,
    pub points: i64,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Reconciliation {
    /// `None` when the audit passed; otherwise its first finding.
    pub audit_error: Option<String>,
    pub granted_total: i64,
    pub spent_total: i64,
    pub balance_total: i64,
    pub approved_charges_total: i64,
    pub charge_grants_total: i64,
    /// Approved requests without exactly one matching grant, or grants for requests not approved.
    pub charge_mismatches: i64,
    pub reconciled: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Report {
    pub from_unix_ms: Option<i64>,
    pub to_unix_ms: Option<i64>,
    pub approved_by_operator_day: Vec<OperatorDay>,
    pub grants_by_reason: Vec<ByReason>,
    pub rejected_charges: i64,
    pub cancelled_charges: i64,
    pub pending_charges: i64,
    pub matches: i64,
    /// Net points charged for matches (cost less refunds).
    pub points_spent_on_matches: i64,
    /// Points given back on matches whose preferences had to be relaxed.
    pub points_refunded: i64,
    pub open_holds: i64,
    pub open_hold_points: i64,
    pub reconciliation: Reconciliation,
}

/// Builds the report for `[from, to)` (Unix ms; `None`: unbounded).
pub fn build(c: &Connection, from: Option<i64>, to: Option<i64>) -> Result<Report, ApiError> {
    let lo = from.unwrap_or(i64::MIN);
    let hi = to.unwrap_or(i64::MAX);
    let n = |sql: &str, args: &[&dyn rusqlite::ToSql]| -> Result<i64, ApiError> {
        Ok(c.query_row(sql, args, |r| r.get(0))?)
    };
    let approved_by_operator_day = {
        let mut st = c.prepare(
            "SELECT strftime('%Y-%m-%d', c.decided_ms / 1000, 'unixepoch') AS day, \
                    COALESCE(a.username, c.operator_id), COUNT(*), SUM(c.amount) \
             FROM charges c LEFT JOIN accounts a ON a.user_id = c.operator_id \
             WHERE c.status = 'approved' AND c.decided_ms >= ?1 AND c.decided_ms < ?2 \
             GROUP BY day, c.operator_id ORDER BY day, 2",
        )?;
        st.query_map([lo, hi], |r| {
            Ok(OperatorDay {
                day: r.get(0)?,
                operator: r.get(1)?,
                approved: r.get(2)?,
                points: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?
    };
    let grants_by_reason = {
        let mut st = c.prepare(
            "SELECT reason, COUNT(*), SUM(amount) FROM ledger_entries \
             WHERE kind = 'grant' AND created_ms >= ?1 AND created_ms < ?2 GROUP BY reason ORDER BY reason",
        )?;
        st.query_map([lo, hi], |r| {
            Ok(ByReason {
                reason: r.get(0)?,
                grants: r.get(1)?,
                points: r.get(2)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?
    };
    let by_status = |s: &str| -> Result<i64, ApiError> {
        n(
            "SELECT COUNT(*) FROM charges WHERE status = ?1 AND COALESCE(decided_ms, created_ms) >= ?2 \
             AND COALESCE(decided_ms, created_ms) < ?3",
            &[&s, &lo, &hi],
        )
    };
    let granted_total = n(
        "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE kind = 'grant'",
        &[],
    )?;
    let spent_total = n(
        "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE kind = 'charge'",
        &[],
    )?;
    let balance_total = n("SELECT COALESCE(SUM(balance), 0) FROM accounts", &[])?;
    let approved_charges_total = n(
        "SELECT COALESCE(SUM(amount), 0) FROM charges WHERE status = 'approved'",
        &[],
    )?;
    let charge_grants_total = n(
        "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE charge_id IS NOT NULL",
        &[],
    )?;
    let charge_mismatches = n(
        "SELECT (SELECT COUNT(*) FROM charges c WHERE c.status = 'approved' AND \
                   (SELECT COUNT(*) FROM ledger_entries e WHERE e.charge_id = c.charge_id \
                      AND e.kind = 'grant' AND e.amount = c.amount AND e.user_id = c.user_id) != 1) \
              + (SELECT COUNT(*) FROM ledger_entries e WHERE e.charge_id IS NOT NULL AND NOT EXISTS \
                   (SELECT 1 FROM charges c WHERE c.charge_id = e.charge_id AND c.status = 'approved'))",
        &[],
    )?;
    let audit_error = ledger::audit(c).err();
    let reconciled = audit_error.is_none()
        && granted_total - spent_total == balance_total
        && approved_charges_total == charge_grants_total
        && charge_mismatches == 0;
    Ok(Report {
        from_unix_ms: from,
        to_unix_ms: to,
        approved_by_operator_day,
        grants_by_reason,
        rejected_charges: by_status("rejected")?,
        cancelled_charges: by_status("cancelled")?,
        pending_charges: n("SELECT COUNT(*) FROM charges WHERE status = 'pending'", &[])?,
        matches: n(
            "SELECT COUNT(*) FROM matches WHERE created_ms >= ?1 AND created_ms < ?2",
            &[&lo, &hi],
        )?,
        points_spent_on_matches: n(
            "SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE kind = 'charge' \
             AND created_ms >= ?1 AND created_ms < ?2",
            &[&lo, &hi],
        )?,
        points_refunded: n(
            "SELECT COALESCE(SUM(refunded), 0) FROM matches WHERE created_ms >= ?1 AND created_ms < ?2",
            &[&lo, &hi],
        )?,
        open_holds: ledger::open_holds(c)?,
        open_hold_points: n(
            "SELECT COALESCE(SUM(amount), 0) FROM holds WHERE state = 'reserved'",
            &[],
        )?,
        reconciliation: Reconciliation {
            audit_error,
            granted_total,
            spent_total,
            balance_total,
            approved_charges_total,
            charge_grants_total,
            charge_mismatches,
            reconciled,
        },
    })
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// The report as CSV: `section,day,key,count,points`, one row per figure.
pub fn to_csv(r: &Report) -> String {
    let mut out = String::from("section,day,key,count,points\n");
    let mut row = |section: &str, day: &str, key: &str, count: i64, points: i64| {
        out.push_str(&format!(
            "{section},{day},{},{count},{points}\n",
            csv_field(key)
        ));
    };
    for d in &r.approved_by_operator_day {
        row(
            "approved_charges",
            &d.day,
            &d.operator,
            d.approved,
            d.points,
        );
    }
    for g in &r.grants_by_reason {
        row("grants", "", &g.reason, g.grants, g.points);
    }
    row("charges", "", "rejected", r.rejected_charges, 0);
    row("charges", "", "cancelled", r.cancelled_charges, 0);
    row("charges", "", "pending", r.pending_charges, 0);
    row("matches", "", "spent", r.matches, r.points_spent_on_matches);
    row("matches", "", "refunded", r.matches, r.points_refunded);
    row("holds", "", "open", r.open_holds, r.open_hold_points);
    let rec = &r.reconciliation;
    row("totals", "", "granted", 0, rec.granted_total);
    row("totals", "", "spent", 0, rec.spent_total);
    row("totals", "", "balance", 0, rec.balance_total);
    row(
        "totals",
        "",
        "approved_charges",
        0,
        rec.approved_charges_total,
    );
    row("totals", "", "charge_grants", 0, rec.charge_grants_total);
    row(
        "totals",
        "",
        "reconciled",
        i64::from(rec.reconciled),
        rec.charge_mismatches,
    );
    out
}

/// `--to DATE`: a bare date includes that whole day (UTC).
pub fn parse_to(s: &str) -> Result<i64, String> {
    let t = crate::erasure::parse_before(s)?;
    Ok(if s.len() == 10 { t + 86_400_000 } else { t })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::charges::{self, Decision};
    use crate::db::{Db, now_ms};
    use crate::ledger::Settlement;
    use comatching_protocol::UserId;
    use proptest::prelude::*;
    use rusqlite::params;

    fn account(db: &Db, name: &str) -> UserId {
        let u = UserId::new_v7();
        db.run_sync(|c| {
            c.execute(
                "INSERT INTO accounts(user_id, username, password_hash, created_ms) VALUES (?1, ?2, 'x', 0)",
                params![u.to_hex(), name],
            )?;
            Ok(())
        })
        .unwrap();
        u
    }

    #[derive(Clone, Debug)]
    enum Op {
        File(usize, u64),
        Approve(usize, usize),
        Reject(usize),
        Cancel(usize),
        Grant(usize, u64),
        /// A match of `cost` with `refund` given back, or an abandoned one (hold voided).
        Match(usize, u64, u64, bool),
        /// A hold left open (a match in flight when the report runs).
        Hold(usize, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4usize, 2..20u64).prop_map(|(u, a)| Op::File(u, a * 500)),
            (0..4usize, 0..2usize).prop_map(|(u, o)| Op::Approve(u, o)),
            (0..4usize).prop_map(Op::Reject),
            (0..4usize).prop_map(Op::Cancel),
            (0..4usize, 1..3000u64).prop_map(|(u, a)| Op::Grant(u, a)),
            (
                0..4usize,
                prop_oneof![Just(1000u64), Just(1500)],
                prop_oneof![Just(0u64), Just(300)],
                any::<bool>()
            )
                .prop_map(|(u, c, r, v)| Op::Match(u, c, r, v)),
            (0..4usize, 100..900u64).prop_map(|(u, a)| Op::Hold(u, a)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
        /// A randomized booth session — requests filed, approved by two operators, rejected,
        /// cancelled, direct grants, matches with and without refunds, abandoned matches, holds
        /// left open — always reconciles, and the report's figures equal a model's.
        #[test]
        fn the_report_reconciles_after_any_session(ops in proptest::collection::vec(op(), 1..50)) {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open(&dir.path().join("relay.db")).unwrap();
            let users: Vec<UserId> = (0..4).map(|i| account(&db, &format!("s{i}"))).collect();
            let ops_ids = [account(&db, "op_a"), account(&db, "op_b")];
            let partner = account(&db, "partner");
            let mut pending: [Option<(String, u64)>; 4] = Default::default();
            let (mut approved, mut spent, mut refunded, mut held) = ([0i64; 2], 0i64, 0i64, 0i64);
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::File(u, a) => {
                        let r = db.run_sync(|c| charges::create(c, users[u], a, "name"));
                        if let Ok(ch) = r { pending[u] = Some((ch.value.charge_id, a)); }
                    }
                    Op::Approve(u, _) | Op::Reject(u) | Op::Cancel(u) if pending[u].is_some() => {
                        let (id, a) = pending[u].take().unwrap();
                        let (actor, d, reason, by) = match op {
                            Op::Approve(_, o) => (ops_ids[o], Decision::Approve, None, Some(o)),
                            Op::Reject(_) => (ops_ids[0], Decision::Reject, Some("no"), None),
                            _ => (users[u], Decision::Cancel, None, None),
                        };
                        db.run_sync(|c| charges::decide(c, actor, &id, d, reason)).unwrap();
                        if let Some(o) = by { approved[o] += a as i64; }
                    }
                    Op::Grant(u, a) => { db.run_sync(|c| ledger::grant(c, users[u], a, "prize")).unwrap(); }
                    Op::Match(u, cost, refund, abandon) => {
                        let Ok(hold) = db.run_sync(|c| ledger::reserve(c, users[u], cost, i64::MAX)) else { continue };
                        if abandon {
                            db.run_sync(|c| ledger::settle(c, &hold, Settlement::Void)).unwrap();
                        } else {
                            db.run_sync(|c| {
                                let (lo, hi) = if users[u].to_hex() < partner.to_hex() { (users[u], partner) } else { (partner, users[u]) };
                                c.execute(
                                    "INSERT INTO matches(match_id, requester_id, partner_id, pair_lo, pair_hi, request_id, cost, refunded, relaxed, created_ms) \
                                     VALUES (?1, ?2, ?3, ?4, ?5, ?1, ?6, ?7, '[]', ?8)",
                                    params![format!("m{i}"), users[u].to_hex(), partner.to_hex(), lo.to_hex(), format!("{}{i}", hi.to_hex()), cost as i64, refund as i64, now_ms()],
                                )?;
                                ledger::settle(c, &hold, Settlement::Charge(cost - refund))
                            }).unwrap();
                            spent += (cost - refund) as i64;
                            refunded += refund as i64;
                        }
                    }
                    Op::Hold(u, a) => {
                        let reserved = db.run_sync(|c| ledger::reserve(c, users[u], a, i64::MAX)).is_ok();
                        held += if reserved { a as i64 } else { 0 };
                    }
                    _ => {}
                }
            }
            let r = db.run_sync(|c| build(c, None, None)).unwrap();
            prop_assert!(r.reconciliation.reconciled, "{:?}", r.reconciliation);
            prop_assert_eq!(r.points_spent_on_matches, spent);
            prop_assert_eq!(r.points_refunded, refunded);
            prop_assert_eq!(r.open_hold_points, held);
            for (o, name) in ["op_a", "op_b"].iter().enumerate() {
                let got: i64 = r.approved_by_operator_day.iter().filter(|d| d.operator == *name).map(|d| d.points).sum();
                prop_assert_eq!(got, approved[o]);
            }
            let csv = to_csv(&r);
            prop_assert!(csv.lines().any(|l| l == "totals,,reconciled,1,0"), "{}", csv);
            // A period before everything has empty breakdowns and the same reconciliation.
            let early = db.run_sync(|c| build(c, None, Some(1))).unwrap();
            prop_assert!(early.approved_by_operator_day.is_empty() && early.grants_by_reason.is_empty());
            prop_assert_eq!(early.reconciliation, r.reconciliation);
        }
    }

    /// A grant that names a charge request that was not approved is caught.
    #[test]
    fn a_grant_for_an_undecided_request_does_not_reconcile() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("relay.db")).unwrap();
        let u = account(&db, "s");
        let id = db
            .run_sync(|c| charges::create(c, u, 1000, "n"))
            .unwrap()
            .value
            .charge_id;
        db.run_sync(|c| {
            ledger::grant_from(
                c,
                u,
                1000,
                "charge",
                ledger::GrantSource {
                    operator: None,
                    charge_id: Some(&id),
                },
            )
        })
        .unwrap();
        let r = db.run_sync(|c| build(c, None, None)).unwrap();
        assert!(!r.reconciliation.reconciled);
        assert_eq!(r.reconciliation.charge_mismatches, 1);
    }
}
