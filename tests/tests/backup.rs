//! Issue 14: online backups, a tested restore, and personal data that ends — against real
//! processes, a real broker and the real SQLite files.
//!
//! * `restore_drill` — a relay, two appliances and mixed load; `backup` mid-load; more load; the
//!   relay killed and its data directory destroyed; `restore`; everything checked.
//! * `restore_and_purge_refuse_while_the_relay_serves` — the data dir's lock, and the CLI's
//!   errors.
//! * `withdrawal_leaves_no_trace_of_the_contact` — a distinctive contact handle is in the
//!   relay's files, its owner withdraws, and its bytes are in none of them any more.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use comatching_tests::checker::{Answer, Checker};
use comatching_tests::mixed_load::MixedLoad;
use comatching_tests::world::{World, WorldOptions};
use comatching_tests::{MatchOptionsBuilder, PATIENCE, ProfileBuilder, Responder, TestEnv};
use rusqlite::{Connection, OpenFlags};
use serde_json::{Value, json};

fn open_ro(path: &Path) -> Connection {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Every charge request: (status, amount, operator).
fn charges(c: &Connection) -> BTreeMap<String, (String, i64, Option<String>)> {
    let mut st = c
        .prepare("SELECT charge_id, status, amount, operator_id FROM charges")
        .expect("charges");
    st.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

fn balances(c: &Connection) -> BTreeMap<String, i64> {
    let mut st = c
        .prepare("SELECT user_id, balance FROM accounts")
        .expect("balances");
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// (user, key) of every match request the file holds, and whether it was finished.
fn requests(c: &Connection) -> BTreeMap<(String, String), bool> {
    let mut st = c
        .prepare("SELECT user_id, idempotency_key, state = 'done' FROM match_requests")
        .expect("requests");
    st.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_drill() {
    let mut w = World::start(&WorldOptions {
        appliances: 2,
        ..WorldOptions::new("restore-drill")
    })
    .await;
    let users = w.register(40, 8, 14).await;
    // Points the booth's way: charge requests approved by the operator (issue 10).
    w.charge_all_via_booth(&users, 5_000, 8).await;
    w.wait_converged(PATIENCE).await;
    let users = Arc::new(users);
    let backups = tempfile::tempdir().expect("backup dir");

    // Load running; the backup is taken in the middle of it.
    let load = MixedLoad::start(&w.api, &w.operator, users.clone(), 4, 14);
    load.wait_matched(8, PATIENCE).await;
    let relay = &w.relay;
    let report = tokio::task::block_in_place(|| relay.online_backup(backups.path(), Some(2)));
    eprintln!("backup: {report}");
    let at_backup = load.matched();
    load.wait_matched(at_backup + 8, PATIENCE).await;
    let recorded = load.stop().await;
    let registered_during = recorded.registered.lock().expect("registered").len();
    assert!(
        registered_during > 0,
        "the load signed nobody up: the drill would prove less than it says"
    );

    let file = Path::new(report["path"].as_str().expect("path")).to_path_buf();
    let (backup_balances, backup_requests, backup_charges) = {
        let c = open_ro(&file);
        (balances(&c), requests(&c), charges(&c))
    };
    assert_eq!(
        backup_charges
            .values()
            .filter(|c| c.0 == "approved")
            .count(),
        users.len(),
        "every drill student's charge request is in the backup, approved"
    );
    for key in [
        "bytes",
        "seconds",
        "epoch",
        "outbox_seq",
        "users",
        "balance_total",
    ] {
        assert!(
            !report[key].is_null(),
            "backup report lacks {key}: {report}"
        );
    }
    assert_eq!(
        report["balance_total"].as_i64(),
        Some(backup_balances.values().sum::<i64>()),
        "the report's balance total is the file's"
    );
    let lost_timeline: Vec<Answer> = recorded
        .matches
        .answers()
        .into_iter()
        .filter(|a| {
            a.status == 201 && !backup_requests.contains_key(&(a.user_id.clone(), a.key.clone()))
        })
        .collect();
    assert!(
        !lost_timeline.is_empty(),
        "no match was made after the backup: the drill would prove less than it says"
    );

    // The disk is lost.
    w.relay.kill_9();
    w.relay.destroy_data_dir();
    let out = w.relay.run(&["restore", file.to_str().expect("utf-8")]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "restore said:\n{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "restore failed: {out:?}");
    assert!(said.contains("Tell students"), "{said}");
    w.relay.restart().await;
    w.relay.wait_ready().await;

    // Same balances as the backup, account for account; a new epoch.
    let db = w.relay.data_dir().join("relay.db");
    let (after, epoch) = {
        let c = open_ro(&db);
        let epoch: String = c
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .expect("epoch");
        (
            balances(&c),
            format!("{:016x}", epoch.parse::<u64>().expect("epoch")),
        )
    };
    assert_eq!(after, backup_balances, "balances differ from the backup's");
    assert_eq!(
        charges(&open_ro(&db)),
        backup_charges,
        "charge requests differ from the backup's"
    );
    assert_ne!(Some(epoch.as_str()), report["epoch"].as_str());
    assert!(
        said.contains(&epoch),
        "restore did not print the new epoch {epoch}"
    );

    // Both appliances take the new lineage's snapshot and serve again.
    let pool = w.wait_converged(PATIENCE).await;
    for a in &w.appliances {
        let s = a.status().await.expect("status");
        assert_eq!(s["epoch"].as_str(), Some(epoch.as_str()), "{s}");
        assert_eq!(s["ready"], Value::Bool(true), "{s}");
        assert_eq!(s["count"].as_u64(), Some(pool.count));
    }

    // Keys used after the backup are unknown again: the same key starts a fresh attempt
    // instead of replaying an answer from the lost timeline.
    let mut checker = Checker::new();
    let any = MatchOptionsBuilder::new().json().clone();
    for lost in lost_timeline.iter().take(3) {
        let u = users
            .iter()
            .find(|u| u.user_id == lost.user_id)
            .expect("a drill user");
        let again = checker.history.post_match(u, &lost.key, &any).await;
        assert!(
            matches!(again.status, 201 | 402 | 404),
            "key {}: {} {}",
            lost.key,
            again.status,
            again.body
        );
        assert_ne!(
            again.body.get("match_id"),
            lost.body.get("match_id"),
            "key {} replayed the lost timeline's answer",
            lost.key
        );
    }
    // A match works: two newcomers, the one asking for "anyone".
    let newcomers = w.register(2, 2, 99).await;
    for u in &newcomers {
        w.operator.grant(u, 5_000).await;
    }
    w.wait_converged(PATIENCE).await;
    let a = checker
        .history
        .post_match(&newcomers[0], "newcomer", &any)
        .await;
    assert_eq!(
        a.status, 201,
        "a newcomer's match after the restore: {}",
        a.body
    );

    // The history checker: what the restored truth knows agrees with what clients were told;
    // no double charge, no replica divergence.
    for a in recorded.matches.answers() {
        if backup_requests.get(&(a.user_id.clone(), a.key.clone())) == Some(&true) {
            checker.history.record(a);
        }
    }
    checker.check_round(&mut w, PATIENCE).await;
    eprintln!(
        "drill: {} matches before the backup, {} after it (lost), {} sign-ups during the load, \
         {} accounts restored with the backup's balances",
        at_backup,
        lost_timeline.len(),
        registered_during,
        after.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_and_purge_refuse_while_the_relay_serves() {
    let env = TestEnv::start("backup-refusals").await;
    let dir = tempfile::tempdir().expect("dir");
    let report = env.relay.online_backup(dir.path(), Some(1));
    let file = report["path"].as_str().expect("path").to_owned();

    let out = env.relay.run(&["restore", &file]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(err.contains("stop it first"), "{err}");
    let out = env.relay.run(&["admin", "purge", "--before", "2100-01-01"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // A second relay on the same data directory refuses to start.
    let out = env.relay.run(&["serve"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop it first"),
        "{out:?}"
    );
    // Bad input: a clear message and a non-zero exit.
    let out = env.relay.run(&[
        "backup",
        "--to",
        dir.path().to_str().unwrap(),
        "--keep",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = env.relay.run(&["admin", "purge", "--before", "someday"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let missing = env
        .relay
        .command()
        .args(["backup", "--to"])
        .arg(dir.path())
        .env(
            "COMATCHING_RELAY__STORAGE__DATA_DIR",
            dir.path().join("nothing-here"),
        )
        .output()
        .expect("backup");
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no relay database"),
        "{missing:?}"
    );
    // Only the one good backup is there, nothing that looks like a half-written one.
    let names: HashSet<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".db"))
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list data dir")
        .flatten()
        .filter(|e| {
            std::fs::read(e.path())
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawal_leaves_no_trace_of_the_contact() {
    const HANDLE: &str = "zq_withdraw_7f3a9c";
    const NICK: &str = "Nick7f3a9c";
    let env = TestEnv::start("erasure").await;
    let op = env.operator().await;
    let me = env
        .api
        .signup_with_profile("adam", &ProfileBuilder::male().nickname("adam"))
        .await;
    op.grant(&me, 10_000).await;
    let partner = env
        .api
        .signup_with_profile(
            "bora",
            &ProfileBuilder::female()
                .nickname(NICK)
                .contact("kakao", HANDLE),
        )
        .await;
    let _responder = Responder::offering(&env.amqp_url(), vec![partner.id()]).await;
    let opts = MatchOptionsBuilder::new();
    let first = me.post_match("k1", &opts).await.expect(201);
    assert_eq!(first["partner"]["contact"]["handle"], HANDLE);
    let data = env.relay.data_dir().to_path_buf();
    assert!(
        !files_containing(&data, HANDLE.as_bytes()).is_empty(),
        "the handle must be visible before the withdrawal, or this test proves nothing"
    );

    partner.delete_me().await.expect(204);

    // The partner's history keeps the match and shows the contact as withdrawn; the stored
    // answer replays the same way.
    let history = me.matches().await;
    assert_eq!(history.len(), 1);
    assert_eq!(
        history[0]["partner"],
        json!({"user_id": partner.user_id, "withdrawn": true, "contact": null})
    );
    let replay = me.post_match("k1", &opts).await.expect(201);
    assert_eq!(replay["match_id"], first["match_id"]);
    assert_eq!(replay["partner"]["withdrawn"], true);
    // The username is free again.
    env.api.signup("bora").await;
    // No byte of the handle or the nickname is left in the database, its WAL or a journal, once
    // the relay's own checkpoint after the withdrawal ran.
    comatching_tests::wait_until(PATIENCE, "the handle gone from every file", || async {
        files_containing(&data, HANDLE.as_bytes()).is_empty()
            && files_containing(&data, NICK.as_bytes()).is_empty()
    })
    .await;
    // The ledger keeps the amounts and the match count.
    let stats = op.stats().await;
    assert_eq!(stats["matches"].as_i64(), Some(1), "{stats}");
    assert_eq!(stats["points_spent"].as_i64(), Some(1000), "{stats}");
}
