//! The fault matrix's history checker (issue 5). A round records what clients were told (every
//! match request with its key and every answer) and the checker, once the fault has cleared,
//! reads the relay's truth (its SQLite file, read-only) and each appliance's replica and
//! classifies every outbox seq and every match request:
//!
//! * **lost** — confirmed or accepted, never applied / settled (a 201 whose hold is not charged,
//!   a published seq not in the replica);
//! * **recovered** — caught in the fault (a transport error, a 503, a seq beyond the replica's
//!   cursor when the fault hit) and ended correctly;
//! * **unexpected** — applied but never sent (a replica row whose version the relay never
//!   wrote, a charge without a partner, a resurrected user);
//! * **duplicated** — applied twice with different effect (two charges for one request, two
//!   different answers for one key).
//!
//! [`Checker::check_round`] panics with every violation found; nothing is sampled.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use crate::User;
use crate::world::World;

/// What one client was told for one match request (status 0 = no answer: transport error).
#[derive(Clone, Debug)]
pub struct Answer {
    pub user_id: String,
    pub key: String,
    pub status: u16,
    pub body: Value,
}

/// Counts per class for one round (printed by the rows; violations fail the round).
#[derive(Clone, Debug, Default)]
pub struct Classes {
    pub seqs_checked: u64,
    pub seqs_recovered: u64,
    pub requests_checked: u64,
    pub requests_recovered: u64,
    pub lost: Vec<String>,
    pub unexpected: Vec<String>,
    pub duplicated: Vec<String>,
    pub other: Vec<String>,
}

impl Classes {
    pub fn violations(&self) -> usize {
        self.lost.len() + self.unexpected.len() + self.duplicated.len() + self.other.len()
    }
}

#[derive(Clone, Default)]
pub struct History {
    answers: Arc<Mutex<Vec<Answer>>>,
}

impl History {
    /// `POST /api/v1/matches` that records the answer and never panics on a dropped connection.
    pub async fn post_match(&self, user: &User, key: &str, body: &Value) -> Answer {
        let client = crate::api::http_builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        let r = client
            .request(
                Method::POST,
                format!("{}/api/v1/matches", user.api.base_url()),
            )
            .bearer_auth(&user.token)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await;
        let (status, body) = match r {
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        };
        let a = Answer {
            user_id: user.user_id.clone(),
            key: key.to_owned(),
            status,
            body,
        };
        self.answers.lock().expect("history").push(a.clone());
        a
    }

    /// Adds an answer obtained elsewhere (a restore drill keeps only those its restored truth
    /// knows about).
    pub fn record(&self, a: Answer) {
        self.answers.lock().expect("history").push(a);
    }

    pub fn answers(&self) -> Vec<Answer> {
        self.answers.lock().expect("history").clone()
    }
}

/// Per-appliance memory across rounds: the highest version ever seen per user (versions never go
/// backwards) and the replica's cursor when the last fault hit (for "recovered").
#[derive(Default)]
pub struct Checker {
    pub history: History,
    seen: HashMap<usize, HashMap<String, (u64, bool)>>,
    cursor_at_fault: HashMap<usize, u64>,
}

fn open_ro(path: &Path) -> Connection {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("open {} read-only: {e}", path.display()));
    c.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    c
}

fn rows<T>(c: &Connection, sql: &str, f: impl Fn(&rusqlite::Row) -> rusqlite::Result<T>) -> Vec<T> {
    let mut st = c.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    st.query_map([], f)
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

pub fn relay_db(w: &World) -> PathBuf {
    w.relay.data_dir().join("relay.db")
}

pub fn replica_db(data_dir: &Path) -> PathBuf {
    data_dir.join("replica").join("replica.sqlite3")
}

impl Checker {
    pub fn new() -> Checker {
        Checker::default()
    }

    /// Notes each appliance's cursor as the fault is injected (seqs beyond it are "in flight").
    pub async fn fault_begins(&mut self, w: &World) {
        for (i, a) in w.appliances.iter().enumerate() {
            if let Some(s) = a.status().await {
                self.cursor_at_fault
                    .insert(i, s["applied_seq"].as_u64().unwrap_or(0));
            }
        }
    }

    /// After the fault cleared: waits (within `liveness`) for quiescence — no open holds, every
    /// appliance converged and ready, the outbox fully published — then checks every invariant
    /// of issue 5 and panics listing the violations. Returns the round's classes.
    pub async fn check_round(&mut self, w: &mut World, liveness: Duration) -> Classes {
        let t0 = Instant::now();
        crate::wait_until(liveness, "no open holds (sweeper)", || async {
            w.operator.open_holds().await == 0
        })
        .await;
        let db = relay_db(w);
        crate::wait_until(liveness, "outbox fully published", || {
            let db = db.clone();
            async move {
                let c = open_ro(&db);
                let m: BTreeMap<String, String> = rows(&c, "SELECT key, value FROM meta", |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .into_iter()
                .collect();
                m.get("last_seq") == m.get("published_upto")
            }
        })
        .await;
        let left = liveness
            .saturating_sub(t0.elapsed())
            .max(Duration::from_secs(5));
        converged(w, left).await;
        let mut cl = Classes::default();
        self.check_ledger(&db, &mut cl);
        for i in 0..w.appliances.len() {
            let dir = w.appliances[i].data_dir().to_path_buf();
            let status = w.appliances[i].status().await.unwrap_or_default();
            self.check_replica(i, &db, &dir, &status, &mut cl);
        }
        eprintln!(
            "checked: {} seqs ({} recovered), {} requests ({} recovered), {} violations",
            cl.seqs_checked,
            cl.seqs_recovered,
            cl.requests_checked,
            cl.requests_recovered,
            cl.violations()
        );
        assert_eq!(
            cl.violations(),
            0,
            "invariant violations after the fault: {cl:#?}"
        );
        cl
    }

    /// Forgets what appliance `i` was seen holding (its replica was wiped on purpose).
    pub fn forget_replica(&mut self, i: usize) {
        self.seen.remove(&i);
    }

    fn check_ledger(&self, db: &Path, cl: &mut Classes) {
        let c = open_ro(db);
        // Balance = grants − charges, never negative.
        for (u, bal, sum) in rows(
            &c,
            "SELECT a.user_id, a.balance, (SELECT COALESCE(SUM(CASE kind WHEN 'grant' THEN amount \
             ELSE -amount END), 0) FROM ledger_entries e WHERE e.user_id = a.user_id) FROM accounts a",
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            },
        ) {
            if bal != sum || bal < 0 {
                cl.other
                    .push(format!("balance of {u} is {bal}, entries say {sum}"));
            }
        }
        // Every request ends exactly once; a charge only with a partner; one charge per hold.
        let reqs = rows(
            &c,
            "SELECT r.user_id, r.idempotency_key, r.request_id, r.state, h.state, r.response_status, \
             r.response_body, (SELECT COUNT(*) FROM ledger_entries e WHERE e.hold_id = h.hold_id AND e.kind = 'charge'), \
             (SELECT COUNT(*) FROM matches m WHERE m.request_id = r.request_id) \
             FROM match_requests r LEFT JOIN holds h ON h.hold_id = r.hold_id",
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, i64>(8)?,
                ))
            },
        );
        let mut stored: HashMap<(String, String), (Option<i64>, Value, String)> = HashMap::new();
        for (user, key, rid, rstate, hstate, status, body, charges, matches) in reqs {
            cl.requests_checked += 1;
            let what = format!("request {rid} ({user}/{key})");
            match hstate.as_deref() {
                None => cl.other.push(format!("{what} has no hold")),
                Some("reserved") => cl.lost.push(format!("{what}: hold still reserved")),
                Some("charged") => {
                    if charges != 1 {
                        cl.duplicated.push(format!(
                            "{what}: charged hold with {charges} charge entries"
                        ));
                    }
                    if matches != 1 {
                        cl.unexpected
                            .push(format!("{what}: charged without a delivered partner"));
                    }
                    if status != Some(201) {
                        cl.other
                            .push(format!("{what}: charged but stored answer {status:?}"));
                    }
                }
                Some(_) => {
                    if charges != 0 || matches != 0 {
                        cl.unexpected
                            .push(format!("{what}: voided hold with a charge or a pair"));
                    }
                }
            }
            if rstate != "done" {
                cl.lost.push(format!("{what}: still pending at quiescence"));
            }
            let body: Value = body
                .as_deref()
                .and_then(|b| serde_json::from_str(b).ok())
                .unwrap_or(Value::Null);
            stored.insert((user, key), (status, body, hstate.unwrap_or_default()));
        }
        // What the clients were told agrees with the truth, and one key gives one answer.
        let mut told: HashMap<(String, String), Vec<&Answer>> = HashMap::new();
        let answers = self.history.answers();
        for a in &answers {
            told.entry((a.user_id.clone(), a.key.clone()))
                .or_default()
                .push(a);
        }
        for ((user, key), list) in &told {
            let what = format!("key {user}/{key}");
            let settled: Vec<&&Answer> = list
                .iter()
                .filter(|a| matches!(a.status, 201 | 404 | 503))
                .collect();
            if let Some(first) = settled.first()
                && settled
                    .iter()
                    .any(|a| a.status != first.status || a.body != first.body)
            {
                cl.duplicated.push(format!(
                    "{what}: different answers for one key: {settled:?}"
                ));
            }
            let truth = stored.get(&(user.clone(), key.clone()));
            for a in list {
                match (a.status, truth) {
                    (201, Some((_, _, h))) if h == "charged" => {}
                    (201, _) => cl
                        .lost
                        .push(format!("{what}: told 201 but the hold is not charged")),
                    (404 | 503, Some((_, _, h))) if h == "charged" => cl
                        .unexpected
                        .push(format!("{what}: told {} but charged", a.status)),
                    (0 | 409 | 500..=599, Some(_)) => cl.requests_recovered += 1,
                    _ => {}
                }
                if matches!(a.status, 201 | 404 | 503)
                    && let Some((Some(s), b, _)) = truth
                    && (i64::from(a.status) != *s || &a.body != b)
                {
                    cl.duplicated.push(format!(
                        "{what}: told {} {} but stored {s} {b}",
                        a.status, a.body
                    ));
                }
            }
        }
    }

    fn check_replica(&mut self, i: usize, db: &Path, dir: &Path, status: &Value, cl: &mut Classes) {
        let c = open_ro(db);
        let truth: HashMap<String, (u64, bool)> =
            rows(&c, "SELECT user_id, version, in_pool FROM profiles", |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? == 1,
                ))
            })
            .into_iter()
            .map(|(u, v, live)| (u, (v, live)))
            .collect();
        let last_seq: u64 = c
            .query_row("SELECT value FROM meta WHERE key = 'last_seq'", [], |r| {
                r.get::<_, String>(0)
            })
            .map(|s| s.parse().unwrap_or(0))
            .unwrap_or(0);
        let applied = status["applied_seq"].as_u64().unwrap_or(0);
        cl.seqs_checked += last_seq;
        if applied < last_seq {
            cl.lost.push(format!(
                "appliance {i}: applied_seq {applied} < relay seq {last_seq}"
            ));
        }
        if let Some(at) = self.cursor_at_fault.remove(&i) {
            cl.seqs_recovered += last_seq.saturating_sub(at);
        }
        let path = replica_db(dir);
        if !path.exists() {
            return; // sled: count and digest (checked by convergence) are all we can see
        }
        let rc = open_ro(&path);
        let replica: HashMap<String, (u64, bool)> = rows(
            &rc,
            "SELECT lower(hex(user_id)), version, tombstone FROM users",
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? == 0,
                ))
            },
        )
        .into_iter()
        .map(|(u, v, live)| (u, (v, live)))
        .collect();
        let seen = self.seen.entry(i).or_default();
        for (u, &(v, live)) in &replica {
            match truth.get(u) {
                None => cl.unexpected.push(format!(
                    "appliance {i}: {u} v{v} never written by the relay"
                )),
                Some(&(tv, tlive)) => {
                    if v > tv {
                        cl.duplicated.push(format!(
                            "appliance {i}: {u} at v{v}, relay only reached v{tv}"
                        ));
                    }
                    if live && !tlive {
                        cl.unexpected.push(format!(
                            "appliance {i}: {u} is live but deleted at the relay"
                        ));
                    }
                    if live && v != tv {
                        cl.lost
                            .push(format!("appliance {i}: {u} at v{v}, relay at v{tv}"));
                    }
                }
            }
            if let Some(&(pv, plive)) = seen.get(u) {
                if v < pv {
                    cl.other
                        .push(format!("appliance {i}: {u} went back from v{pv} to v{v}"));
                }
                if live && !plive && v == pv {
                    cl.unexpected
                        .push(format!("appliance {i}: {u} came back at v{v}"));
                }
            }
            seen.insert(u.clone(), (v, live));
        }
        for (u, &(tv, tlive)) in &truth {
            if tlive && !replica.get(u).is_some_and(|&(v, l)| l && v == tv) {
                cl.lost.push(format!(
                    "appliance {i}: live {u} v{tv} missing from the replica"
                ));
            }
        }
    }
}

/// Like `World::wait_converged`, but a failure shows each appliance's log.
async fn converged(w: &mut World, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let pool = w.relay_pool().await;
        let mut all = true;
        for a in &w.appliances {
            all &= a.status().await.is_some_and(|s| {
                s["ready"] == Value::Bool(true)
                    && s["count"].as_u64() == Some(pool.count)
                    && s["digest"].as_str() == Some(pool.digest.as_str())
                    && s["applied_seq"].as_u64() >= Some(pool.seq)
            });
        }
        if all {
            return;
        }
        if Instant::now() > deadline {
            let mut detail = String::new();
            for a in &w.appliances {
                detail.push_str(&format!(
                    "{}\n{}\n",
                    a.status().await.unwrap_or_default(),
                    a.log_tail()
                ));
            }
            panic!("appliances did not converge to {pool:?} within {timeout:?}:\n{detail}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
