//! The fault matrix's history checker (issue 5). A round records what clients were told (every
//! match request with its key and every answer) and the checker, once the fault has cleared,
//! reads the relay's truth (its SQLite file, read-only) and each appliance's replica and
//! classifies every outbox seq and every match request:
//!
//! * **lost** — confirmed or accepted, never applied / settled (a 201 whose hold is not charged,
//!   a published seq not in the replica);
//! * **recovered** — in flight when the fault hit and ended correctly: a match request whose
//!   hold was open at that moment and is now charged with a partner or voided, a committed seq
//!   that an appliance had not applied at that moment and has applied now;
//! * **unexpected** — applied but never sent (a replica row whose version the relay never
//!   wrote, a charge without a partner, a resurrected user);
//! * **duplicated** — applied twice with different effect (two charges for one request, two
//!   different answers for one key).
//!
//! What users would see is compared, not only versions: each replica's features (row by row for
//! SQLite replicas; count and features digest recomputed from the store for every backend, via
//! `/status?recount=1`) and the match engine's live set (its count and features digest on
//! `/status`) against the relay's pool. A client told 500 is a violation, whatever the truth.
//!
//! [`Checker::check_round`] panics with every violation found; nothing is sampled.
//!
//! A fault row drives a round like this (see `tests/tests/faults.rs`):
//!
//! 1. start traffic ([`Writes`] counts what the clients were told), optionally with the
//!    appliances paused so that work piles up;
//! 2. [`Checker::wait_in_flight`] until a stated amount of work is in flight (open holds,
//!    committed seqs not yet applied), resume, inject the fault;
//! 3. [`Checker::fault_begins`] right at the fault: records the open holds and each appliance's
//!    cursor (from `/status`, or from the replica file of an appliance that is down);
//! 4. [`Checker::check_round`] after the fault cleared; then [`Classes::require_recovered`]
//!    asserts that the fault really caught work, and [`Writes::require_mostly_ok`] that the
//!    round's writes mostly succeeded.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use comatching_protocol::{Age, ContactFrequency, Digest, Features, HobbySet, Major, UserId};

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
    /// (appliance, user) rows compared with the relay's pool.
    pub users_checked: u64,
    /// Committed seqs some appliance had not applied when the fault hit (Σ over appliances).
    pub seqs_in_flight: u64,
    /// Of those, applied by now.
    pub seqs_recovered: u64,
    /// Match requests in the relay's database.
    pub requests_checked: u64,
    /// Holds open when the fault hit.
    pub requests_in_flight: u64,
    /// Of those, ended by now (charged with a partner, or voided).
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

    /// Panics unless the fault caught match requests (`requests`) and/or committed seqs
    /// (`seqs`) in flight and they ended correctly: a fault that hit an idle system proves
    /// nothing.
    pub fn require_recovered(&self, requests: bool, seqs: bool) {
        if requests {
            assert!(
                self.requests_recovered > 0,
                "no match request was in flight at the fault and recovered: {self:?}"
            );
        }
        if seqs {
            assert!(
                self.seqs_recovered > 0,
                "no committed seq was in flight at the fault and recovered: {self:?}"
            );
        }
    }
}

/// What the clients of a round's profile writes were told.
#[must_use = "a round whose writes failed checked nothing: call require_mostly_ok"]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Writes {
    pub ok: u64,
    /// Answers other than 200 after every retry (transport errors included).
    pub failed: u64,
}

impl Writes {
    pub fn add(&mut self, other: Writes) {
        self.ok += other.ok;
        self.failed += other.failed;
    }

    /// Panics unless at least 90 % of the writes succeeded: a round whose traffic mostly
    /// failed checked nothing.
    pub fn require_mostly_ok(&self, what: &str) {
        let total = self.ok + self.failed;
        assert!(
            total > 0 && self.ok * 10 >= total * 9,
            "{what}: only {} of {total} profile writes succeeded",
            self.ok
        );
    }
}

/// Work in flight at one moment, read from the relay's database and the appliances.
#[derive(Clone, Debug, Default)]
pub struct InFlight {
    /// The relay's last committed seq.
    pub relay_seq: u64,
    /// Committed seqs not yet confirmed by the broker.
    pub unpublished: u64,
    /// Hold ids of match requests waiting for an answer.
    pub open_holds: Vec<String>,
    /// Each appliance's applied seq (`None`: neither its status nor its replica file answered).
    pub applied: Vec<Option<u64>>,
}

impl InFlight {
    /// Committed seqs not yet applied, summed over the appliances.
    pub fn unapplied(&self) -> u64 {
        self.applied
            .iter()
            .flatten()
            .map(|a| self.relay_seq.saturating_sub(*a))
            .sum()
    }
}

impl std::fmt::Display for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "relay seq {}, {} unpublished, {} unapplied {:?}, {} open holds",
            self.relay_seq,
            self.unpublished,
            self.unapplied(),
            self.applied,
            self.open_holds.len()
        )
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
/// backwards) and what was in flight when the last fault hit (for "recovered").
#[derive(Default)]
pub struct Checker {
    pub history: History,
    seen: HashMap<usize, HashMap<String, (u64, bool)>>,
    at_fault: Option<InFlight>,
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

    /// Reads what is in flight now: the relay's seq, unpublished rows and open holds (its
    /// database, read-only, so this works while the relay is down), and each appliance's
    /// cursor (its SQLite replica file, or `/status` for sled).
    pub async fn in_flight(w: &World) -> InFlight {
        let db = relay_db(w);
        let mut out = tokio::task::spawn_blocking(move || {
            let c = open_ro(&db);
            let meta: BTreeMap<String, String> = rows(&c, "SELECT key, value FROM meta", |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .into_iter()
            .collect();
            let num = |k: &str| meta.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            InFlight {
                relay_seq: num("last_seq"),
                unpublished: num("last_seq").saturating_sub(num("published_upto")),
                open_holds: rows(
                    &c,
                    "SELECT hold_id FROM holds WHERE state = 'reserved'",
                    |r| r.get(0),
                ),
                applied: Vec::new(),
            }
        })
        .await
        .expect("read the relay's database");
        for a in &w.appliances {
            // The replica file's committed cursor when there is one (instant, and it answers
            // for a paused or dead appliance); a sled replica's is only on `/status`.
            let applied = match replica_cursor(&replica_db(a.data_dir())) {
                Some(c) => Some(c),
                None => a.status().await.and_then(|s| s["applied_seq"].as_u64()),
            };
            out.applied.push(applied);
        }
        out
    }

    /// Waits (within `timeout`) until at least `holds` match requests hold points and at
    /// least `seqs` committed seqs are not yet applied (summed over appliances); returns what
    /// was in flight. The caller makes that happen (typically by pausing the appliances).
    pub async fn wait_in_flight(w: &World, holds: usize, seqs: u64, timeout: Duration) -> InFlight {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Checker::in_flight(w).await;
            if now.open_holds.len() >= holds && now.unapplied() >= seqs {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "waited {timeout:?} for {holds} open holds and {seqs} unapplied seqs; have {now}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Records what is in flight as the fault hits: those holds and seqs are what the next
    /// [`Checker::check_round`] counts as recovered. Returns it (rows print it).
    pub async fn fault_begins(&mut self, w: &World) -> InFlight {
        let now = Checker::in_flight(w).await;
        self.at_fault = Some(now.clone());
        now
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
        let at_fault = self.at_fault.take();
        self.check_ledger(&db, at_fault.as_ref(), &mut cl);
        let pool = relay_pool(&db);
        for i in 0..w.appliances.len() {
            let dir = w.appliances[i].data_dir().to_path_buf();
            let status = w.appliances[i]
                .status_with("recount=1")
                .await
                .unwrap_or_default();
            let applied_at_fault = at_fault.as_ref().and_then(|f| {
                f.applied
                    .get(i)
                    .copied()
                    .flatten()
                    .map(|a| (a, f.relay_seq))
            });
            self.check_replica(i, &pool, &dir, &status, applied_at_fault, &mut cl);
        }
        eprintln!(
            "checked: {} replica rows, {} requests; in flight at the fault: {} seqs ({} recovered), \
             {} requests ({} recovered); {} violations",
            cl.users_checked,
            cl.requests_checked,
            cl.seqs_in_flight,
            cl.seqs_recovered,
            cl.requests_in_flight,
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

    fn check_ledger(&self, db: &Path, at_fault: Option<&InFlight>, cl: &mut Classes) {
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
             r.response_body, h.hold_id, (SELECT COUNT(*) FROM ledger_entries e WHERE e.hold_id = h.hold_id AND e.kind = 'charge'), \
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
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, i64>(9)?,
                ))
            },
        );
        let open_at_fault: std::collections::HashSet<&str> = at_fault
            .map(|f| f.open_holds.iter().map(String::as_str).collect())
            .unwrap_or_default();
        cl.requests_in_flight = open_at_fault.len() as u64;
        let mut stored: HashMap<(String, String), (Option<i64>, Value, String)> = HashMap::new();
        for (user, key, rid, rstate, hstate, status, body, hold, charges, matches) in reqs {
            cl.requests_checked += 1;
            let caught = hold.as_deref().is_some_and(|h| open_at_fault.contains(h));
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
            } else if caught && matches!(hstate.as_deref(), Some("charged" | "voided")) {
                cl.requests_recovered += 1;
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
                    // A dropped connection (0), "in progress" (409) and "no matcher" (503)
                    // are honest answers in a fault; anything else 5xx is a bug shown to a
                    // user.
                    (0 | 409 | 503, _) => {}
                    (500..=599, _) => cl
                        .other
                        .push(format!("{what}: told {} {}", a.status, a.body)),
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

    fn check_replica(
        &mut self,
        i: usize,
        pool: &RelayTruth,
        dir: &Path,
        status: &Value,
        applied_at_fault: Option<(u64, u64)>,
        cl: &mut Classes,
    ) {
        let applied = status["applied_seq"].as_u64().unwrap_or(0);
        if applied < pool.last_seq {
            cl.lost.push(format!(
                "appliance {i}: applied_seq {applied} < relay seq {}",
                pool.last_seq
            ));
        }
        if let Some((at, relay_then)) = applied_at_fault {
            let in_flight = relay_then.saturating_sub(at);
            cl.seqs_in_flight += in_flight;
            if applied >= relay_then {
                cl.seqs_recovered += in_flight;
            }
        }
        // What a user would see: the store's content and the engine's, against the pool.
        let want_digest = pool.features_digest.to_string();
        let recount = &status["store_recount"];
        if recount["features_digest"].as_str() != Some(&want_digest)
            || recount["count"].as_u64() != Some(pool.live)
        {
            cl.lost.push(format!(
                "appliance {i}: the store holds {} users with features digest {}, the relay's \
                 pool is {} users with {want_digest}",
                recount["count"], recount["features_digest"], pool.live
            ));
        }
        if recount["digest"] != status["digest"] || recount["count"] != status["count"] {
            cl.other.push(format!(
                "appliance {i}: meta says count {} digest {}, the rows say {} {}",
                status["count"], status["digest"], recount["count"], recount["digest"]
            ));
        }
        let engine = &status["engine"];
        if engine["users"].as_u64() != Some(pool.live)
            || engine["features_digest"].as_str() != Some(&want_digest)
        {
            cl.lost.push(format!(
                "appliance {i}: the match engine holds {} users with features digest {}, the \
                 relay's pool is {} users with {want_digest}",
                engine["users"], engine["features_digest"], pool.live
            ));
        }
        let path = replica_db(dir);
        if !path.exists() {
            return; // sled: the recount above is what we can see
        }
        let rc = open_ro(&path);
        let replica: HashMap<String, (u64, bool, Option<Vec<u8>>)> = rows(
            &rc,
            "SELECT lower(hex(user_id)), version, tombstone, features FROM users",
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? == 0,
                    r.get::<_, Option<Vec<u8>>>(3)?,
                ))
            },
        )
        .into_iter()
        .map(|(u, v, live, f)| (u, (v, live, f)))
        .collect();
        let seen = self.seen.entry(i).or_default();
        for (u, (v, live, blob)) in &replica {
            let (v, live) = (*v, *live);
            cl.users_checked += 1;
            match pool.users.get(u) {
                None => cl.unexpected.push(format!(
                    "appliance {i}: {u} v{v} never written by the relay"
                )),
                Some(t) => {
                    if v > t.version {
                        cl.duplicated.push(format!(
                            "appliance {i}: {u} at v{v}, relay only reached v{}",
                            t.version
                        ));
                    }
                    if live && !t.live {
                        cl.unexpected.push(format!(
                            "appliance {i}: {u} is live but deleted at the relay"
                        ));
                    }
                    if live && v != t.version {
                        cl.lost.push(format!(
                            "appliance {i}: {u} at v{v}, relay at v{}",
                            t.version
                        ));
                    }
                    if live && v == t.version {
                        let got: Option<Features> =
                            blob.as_deref().and_then(|b| rmp_serde::from_slice(b).ok());
                        if got.as_ref() != t.features.as_ref() {
                            cl.lost.push(format!(
                                "appliance {i}: {u} v{v} holds {got:?}, the relay {:?}",
                                t.features
                            ));
                        }
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
        for (u, t) in &pool.users {
            if t.live && !replica.get(u).is_some_and(|&(v, l, _)| l && v == t.version) {
                cl.lost.push(format!(
                    "appliance {i}: live {u} v{} missing from the replica",
                    t.version
                ));
            }
        }
    }
}

/// One user as the relay's database has it.
struct TruthUser {
    version: u64,
    live: bool,
    /// The matching features (None only for a row the checker could not read: reported).
    features: Option<Features>,
}

/// The relay's pool, read from its database by the checker's own code (not the relay's: an
/// oracle must not share the code it checks).
struct RelayTruth {
    users: HashMap<String, TruthUser>,
    last_seq: u64,
    live: u64,
    features_digest: Digest,
}

fn relay_pool(db: &Path) -> RelayTruth {
    let c = open_ro(db);
    let users: HashMap<String, TruthUser> = rows(
        &c,
        "SELECT user_id, version, in_pool, gender, age, mbti, hobbies, contact_frequency, major, \
         dont_pick_me FROM profiles",
        |r| {
            let features = (|| {
                Some(Features {
                    gender: r.get::<_, String>(3).ok()?.parse().ok()?,
                    age: Age::new(r.get(4).ok()?).ok()?,
                    mbti: r.get::<_, String>(5).ok()?.parse().ok()?,
                    hobbies: HobbySet::from_bits(r.get::<_, i64>(6).ok()? as u8).ok()?,
                    contact_frequency: {
                        let cf: String = r.get(7).ok()?;
                        ContactFrequency::ALL
                            .into_iter()
                            .find(|c| c.as_str() == cf)?
                    },
                    major: Major::new(&r.get::<_, String>(8).ok()?).ok()?,
                    dont_pick_me: r.get::<_, i64>(9).ok()? != 0,
                })
            })();
            Ok((
                r.get::<_, String>(0)?,
                TruthUser {
                    version: r.get::<_, i64>(1)? as u64,
                    live: r.get::<_, i64>(2)? == 1,
                    features,
                },
            ))
        },
    )
    .into_iter()
    .collect();
    let last_seq: u64 = c
        .query_row("SELECT value FROM meta WHERE key = 'last_seq'", [], |r| {
            r.get::<_, String>(0)
        })
        .map(|s| s.parse().unwrap_or(0))
        .unwrap_or(0);
    let mut features_digest = Digest::default();
    let mut live = 0;
    for (u, t) in &users {
        if !t.live {
            continue;
        }
        live += 1;
        let id: UserId = u.parse().expect("relay user id");
        let f = t
            .features
            .as_ref()
            .expect("the relay's row has valid features");
        features_digest.add_features(id, f);
    }
    RelayTruth {
        users,
        last_seq,
        live,
        features_digest,
    }
}

/// The applied seq in a SQLite replica's meta row (an appliance that is down).
fn replica_cursor(path: &Path) -> Option<u64> {
    if !path.exists() {
        return None;
    }
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    c.query_row("SELECT applied_seq FROM meta WHERE id = 1", [], |r| {
        r.get::<_, i64>(0)
    })
    .ok()
    .map(|s| s as u64)
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
