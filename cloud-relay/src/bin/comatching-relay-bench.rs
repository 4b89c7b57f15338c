//! `comatching-relay-bench backup --users 100000 --dir DIR`: the measurements behind the backup
//! command's design (issue 14), printed as one JSON object (diagnostics on stderr).
//!
//! 1. Builds a festival-day relay database: N accounts with profiles, sessions, a booth grant
//!    each, one outbox row each, and N/2 settled matches with their holds, charges and stored
//!    answers (the biggest table).
//! 2. Runs a writer thread shaped like the relay's (its own connection, WAL, `synchronous=FULL`,
//!    one grant per transaction, as fast as the disk allows) and records every commit's latency:
//!    first alone (baseline), then while each backup method copies the database: `VACUUM INTO`,
//!    the online backup API in one step, and the online backup API in small steps (which restarts
//!    whenever another connection writes).
//! 3. Compresses the `VACUUM INTO` copy with the `zstd` command line tool, if present, at a few
//!    levels (time and bytes) to decide whether compression pays.
//! 4. Times a match-shaped write transaction with `secure_delete` off and on (interleaved blocks).
//!
//! Nothing here is on a serving path.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use comatching_relay::db::Db;
use rusqlite::{Connection, params};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "comatching-relay-bench",
    about = "Relay measurements (JSON on stdout)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Backup methods, their writer pauses, compression, and the cost of secure_delete.
    Backup {
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        /// Working directory (the database and the copies go here; removed afterwards).
        #[arg(long)]
        dir: PathBuf,
        /// Seconds of writer-only baseline before the backups.
        #[arg(long, default_value_t = 3.0)]
        baseline_s: f64,
    },
}

/// splitmix64: deterministic noise, so the synthetic columns that are random in real life
/// (password hashes, token hashes, the random half of ids) compress as badly as real ones.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `n` characters of `alphabet` drawn from `seed`.
fn noise(seed: u64, n: usize, alphabet: &[u8]) -> String {
    (0..n as u64)
        .map(|k| {
            let r = mix(seed ^ k.wrapping_mul(0x1000_0000_01b3));
            alphabet[(r % alphabet.len() as u64) as usize] as char
        })
        .collect()
}

const HEX: &[u8] = b"0123456789abcdef";
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn hex_id(i: usize) -> String {
    // UUIDv7-shaped: a time prefix, then random bits (the relay's 32-hex-digit text ids).
    format!("0190{:08x}7{}", i, noise(i as u64, 19, HEX))
}

fn populate(path: &Path, users: usize) -> rusqlite::Result<()> {
    let db = Db::open(path)?;
    drop(db);
    let mut c = Connection::open(path)?;
    c.pragma_update(None, "synchronous", "OFF")?;
    let tx = c.transaction()?;
    {
        let mut acc = tx.prepare(
            "INSERT INTO accounts(user_id, username, password_hash, created_ms, balance) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut prof = tx.prepare(
            "INSERT INTO profiles(user_id, version, nickname, gender, age, mbti, hobbies, contact_frequency, major, \
             song, comment, contact_kind, contact_handle, dont_pick_me, picked_count, in_pool, updated_ms) \
             VALUES (?1, 1, ?2, ?3, ?4, 'ENFP', 5, 'normal', ?5, ?6, ?7, 'kakao', ?8, 0, ?9, 1, ?10)",
        )?;
        let mut sess = tx.prepare(
            "INSERT INTO sessions(token_hash, user_id, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut led = tx.prepare(
            "INSERT INTO ledger_entries(user_id, kind, amount, reason, hold_id, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut out = tx.prepare(
            "INSERT INTO outbox(seq, user_id, version, op, features, created_ms) VALUES (?1, ?2, 1, 'upsert', ?3, ?4)",
        )?;
        for i in 0..users {
            let hash = format!(
                "$argon2id$v=19$m=19456,t=2,p=1${}${}",
                noise(1 << 40 | i as u64, 22, B64),
                noise(2 << 40 | i as u64, 43, B64)
            );
            let features: Vec<u8> = (0..70u64)
                .map(|k| (mix(3 << 40 | (i as u64) << 8 | k) & 0x7f) as u8)
                .collect();
            let u = hex_id(i);
            let t = 1_796_000_000_000i64 + i as i64;
            let matched = i < users / 2 * 2;
            let balance = if matched && i % 2 == 0 { 4000 } else { 5000 };
            acc.execute(params![u, format!("student_{i}"), hash, t, balance])?;
            prof.execute(params![
                u,
                format!("nick{i}"),
                if i % 2 == 0 { "male" } else { "female" },
                20 + (i % 8) as i64,
                format!("Major number {}", i % 60),
                format!("Song title {}", i % 500),
                format!("Hello, I am student {i} and I like festivals"),
                format!("handle_{i}"),
                i64::from(matched && i % 2 == 1),
                t
            ])?;
            sess.execute(params![
                noise(4 << 40 | i as u64, 64, HEX),
                u,
                t,
                t + 86_400_000
            ])?;
            led.execute(params![
                u,
                "grant",
                5000,
                "booth purchase",
                None::<String>,
                t
            ])?;
            out.execute(params![i as i64 + 1, u, features, t])?;
        }
        let mut hold = tx.prepare(
            "INSERT INTO holds(hold_id, user_id, amount, state, deadline_ms, created_ms, settled_ms) VALUES (?1, ?2, 1000, 'charged', ?3, ?3, ?3)",
        )?;
        let mut req = tx.prepare(
            "INSERT INTO match_requests(user_id, idempotency_key, body_hash, request_id, hold_id, state, response_status, response_body, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'done', 201, ?6, ?7)",
        )?;
        let mut mat = tx.prepare(
            "INSERT INTO matches(match_id, requester_id, partner_id, pair_lo, pair_hi, request_id, cost, refunded, relaxed, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1000, 0, '[]', ?7)",
        )?;
        for k in 0..users / 2 {
            let (a, b) = (hex_id(2 * k), hex_id(2 * k + 1));
            let t = 1_796_100_000_000i64 + k as i64;
            let id = noise(5 << 40 | k as u64, 32, HEX);
            let body = json!({
                "match_id": id, "cost": 1000, "refunded": 0, "relaxed": [], "points": 4000,
                "partner": {"user_id": b, "nickname": format!("nick{}", 2 * k + 1), "gender": "female",
                    "age": 21, "mbti": "ENFP", "hobbies": ["game", "arts"], "contact_frequency": "normal",
                    "major": "Major number 7", "song": "Song title 9",
                    "comment": "Hello, I am a student and I like festivals",
                    "contact": {"kind": "kakao", "handle": format!("handle_{}", 2 * k + 1)}}
            });
            hold.execute(params![id, a, t])?;
            req.execute(params![
                a,
                noise(6 << 40 | k as u64, 36, HEX),
                noise(7 << 40 | k as u64, 64, HEX),
                id,
                id,
                body.to_string(),
                t
            ])?;
            let (lo, hi) = if a < b { (&a, &b) } else { (&b, &a) };
            mat.execute(params![id, a, b, lo, hi, id, t])?;
            led.execute(params![a, "charge", 1000, "match", id, t])?;
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key IN ('last_seq', 'published_upto')",
            [users.to_string()],
        )?;
    }
    tx.commit()?;
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    Ok(())
}

/// Commit latencies of a relay-shaped writer, tagged with the phase they ended in.
struct Writer {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicU8>,
    handle: std::thread::JoinHandle<Vec<(u8, f64)>>,
}

fn relay_connection(path: &Path, secure: bool) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(10))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.pragma_update(None, "foreign_keys", "ON")?;
    c.pragma_update(None, "secure_delete", if secure { "ON" } else { "OFF" })?;
    Ok(c)
}

fn start_writer(path: &Path, users: usize) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(AtomicU8::new(0));
    let (s, p, path) = (stop.clone(), phase.clone(), path.to_path_buf());
    let handle = std::thread::spawn(move || {
        let c = relay_connection(&path, true).expect("writer connection");
        let mut lat = Vec::new();
        let mut i = 0usize;
        while !s.load(Ordering::Relaxed) {
            let u = hex_id(i % users);
            i += 1;
            let t = Instant::now();
            let r = (|| -> rusqlite::Result<()> {
                c.execute_batch("BEGIN IMMEDIATE")?;
                c.execute(
                    "INSERT INTO ledger_entries(user_id, kind, amount, reason, created_ms) VALUES (?1, 'grant', 100, 'bench', 0)",
                    [&u],
                )?;
                c.execute(
                    "UPDATE accounts SET balance = balance + 100 WHERE user_id = ?1",
                    [&u],
                )?;
                c.execute_batch("COMMIT")
            })();
            if let Err(e) = r {
                eprintln!("writer: {e}");
                let _ = c.execute_batch("ROLLBACK");
            }
            lat.push((
                p.load(Ordering::Relaxed),
                t.elapsed().as_secs_f64() * 1000.0,
            ));
        }
        lat
    });
    Writer {
        stop,
        phase,
        handle,
    }
}

fn stats(lat: &[f64]) -> Value {
    if lat.is_empty() {
        return json!({"commits": 0});
    }
    let mut v = lat.to_vec();
    v.sort_by(f64::total_cmp);
    let pick = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    json!({
        "commits": v.len(),
        "p50_ms": round3(pick(0.5)),
        "p99_ms": round3(pick(0.99)),
        "max_ms": round3(*v.last().unwrap_or(&0.0)),
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn wal_len(db: &Path) -> u64 {
    let mut w = db.as_os_str().to_owned();
    w.push("-wal");
    file_len(Path::new(&w))
}

/// One backup method while the writer runs: seconds, bytes, outcome.
fn method(name: &str, src_path: &Path, dest: &Path, secs_cap: f64) -> Value {
    let _ = std::fs::remove_file(dest);
    let src = Connection::open(src_path).expect("source");
    src.busy_timeout(Duration::from_secs(10)).expect("busy");
    let t = Instant::now();
    let mut restarts = 0u64;
    let outcome: Result<(), String> = match name {
        "vacuum_into" => src
            .execute("VACUUM INTO ?1", [dest.to_str().expect("utf-8")])
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "backup_api_one_step" | "backup_api_256_pages" => {
            let mut dst = Connection::open(dest).expect("dest");
            let b = rusqlite::backup::Backup::new(&src, &mut dst).expect("backup");
            let pages: i32 = if name == "backup_api_one_step" {
                -1
            } else {
                256
            };
            let mut last_remaining = i32::MAX;
            loop {
                match b.step(pages) {
                    Ok(rusqlite::backup::StepResult::Done) => break Ok(()),
                    Ok(_) => {
                        let p = b.progress();
                        if p.remaining > last_remaining {
                            restarts += 1;
                        }
                        last_remaining = p.remaining;
                        if t.elapsed().as_secs_f64() > secs_cap {
                            break Err(format!(
                                "gave up after {secs_cap} s: {} of {} pages left, {restarts} restarts",
                                p.remaining, p.pagecount
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => break Err(e.to_string()),
                }
            }
        }
        _ => Err("unknown method".into()),
    };
    let seconds = t.elapsed().as_secs_f64();
    json!({
        "method": name,
        "ok": outcome.is_ok(),
        "error": outcome.err(),
        "seconds": round3(seconds),
        "bytes": file_len(dest),
        "restarts": restarts,
        "source_wal_bytes_after": wal_len(src_path),
    })
}

fn zstd_levels(file: &Path) -> Value {
    let mut out = Vec::new();
    for level in [1, 3, 9] {
        let dest = file.with_extension(format!("zst{level}"));
        let t = Instant::now();
        let status = std::process::Command::new("zstd")
            .args(["-q", "-f", "-T1", &format!("-{level}"), "-o"])
            .arg(&dest)
            .arg(file)
            .status();
        match status {
            Ok(s) if s.success() => {
                let seconds = t.elapsed().as_secs_f64();
                let bytes = file_len(&dest);
                out.push(
                    json!({"level": level, "seconds": round3(seconds), "bytes": bytes,
                    "ratio": round3(file_len(file) as f64 / bytes.max(1) as f64)}),
                );
                let _ = std::fs::remove_file(&dest);
            }
            _ => return json!({"error": "the zstd command is not available"}),
        }
    }
    Value::Array(out)
}

/// A match-shaped transaction (reserve, request row, settle, charge, pair, pick, stored answer).
fn match_txn(c: &Connection, n: usize, users: usize) -> rusqlite::Result<()> {
    let a = hex_id((7 * n) % users);
    let b = hex_id((7 * n + users / 3 + 1) % users);
    let id = format!("b{:031x}", n);
    c.execute_batch("BEGIN IMMEDIATE")?;
    c.execute(
        "INSERT INTO holds(hold_id, user_id, amount, state, deadline_ms, created_ms) VALUES (?1, ?2, 1000, 'reserved', 0, 0)",
        params![id, a],
    )?;
    c.execute(
        "INSERT INTO match_requests(user_id, idempotency_key, body_hash, request_id, hold_id, state, created_ms) \
         VALUES (?1, ?2, 'h', ?3, ?3, 'pending', 0)",
        params![a, id, id],
    )?;
    c.execute_batch("COMMIT; BEGIN IMMEDIATE")?;
    c.execute(
        "UPDATE holds SET state = 'charged', settled_ms = 1 WHERE hold_id = ?1",
        [&id],
    )?;
    c.execute(
        "INSERT INTO ledger_entries(user_id, kind, amount, reason, hold_id, created_ms) VALUES (?1, 'charge', 1000, 'match', ?2, 0)",
        params![a, id],
    )?;
    c.execute(
        "UPDATE accounts SET balance = balance - 1000 + 1000 WHERE user_id = ?1",
        [&a],
    )?;
    let (lo, hi) = if a < b { (&a, &b) } else { (&b, &a) };
    c.execute(
        "INSERT OR IGNORE INTO matches(match_id, requester_id, partner_id, pair_lo, pair_hi, request_id, cost, refunded, relaxed, created_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?1, 1000, 0, '[]', 0)",
        params![id, a, b, lo, hi],
    )?;
    c.execute(
        "UPDATE profiles SET picked_count = picked_count + 0 WHERE user_id = ?1",
        [&b],
    )?;
    c.execute(
        "UPDATE match_requests SET state = 'done', response_status = 201, response_body = ?2 WHERE request_id = ?1",
        params![id, "x".repeat(600)],
    )?;
    c.execute_batch("COMMIT")
}

fn secure_delete_cost(path: &Path, users: usize) -> Value {
    let off = relay_connection(path, false).expect("connection");
    let on = relay_connection(path, true).expect("connection");
    let (mut t_off, mut t_on) = (Vec::new(), Vec::new());
    let mut n = 0usize;
    for _block in 0..6 {
        for (c, sink) in [(&off, &mut t_off), (&on, &mut t_on)] {
            for _ in 0..150 {
                n += 1;
                let t = Instant::now();
                match_txn(c, n, users).expect("match transaction");
                sink.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    json!({"secure_delete_off": stats(&t_off), "secure_delete_on": stats(&t_on),
           "note": "two commits per match (reserve, settle), synchronous=FULL, blocks interleaved"})
}

fn main() {
    let cli = Cli::parse();
    let Cmd::Backup {
        users,
        dir,
        baseline_s,
    } = cli.command;
    std::fs::create_dir_all(&dir).expect("dir");
    let db = dir.join("relay.db");
    for f in ["relay.db", "relay.db-wal", "relay.db-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let t = Instant::now();
    populate(&db, users).expect("populate");
    eprintln!(
        "populated {users} users in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let db_bytes = file_len(&db);

    // The command itself, on a quiet database (what the operator sees).
    let command = comatching_relay::backup::backup(&db, &dir.join("backups"), Some(1))
        .expect("backup command");
    eprintln!("backup command: {:.2}s", command.seconds);

    let writer = start_writer(&db, users);
    std::thread::sleep(Duration::from_secs_f64(baseline_s));
    let mut methods = Vec::new();
    for (i, m) in ["vacuum_into", "backup_api_one_step", "backup_api_256_pages"]
        .iter()
        .enumerate()
    {
        writer.phase.store(i as u8 + 1, Ordering::Relaxed);
        eprintln!("method {m}…");
        methods.push(method(m, &db, &dir.join(format!("copy-{m}.db")), 60.0));
        writer.phase.store(0, Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs_f64(baseline_s / 2.0));
    }
    writer.stop.store(true, Ordering::Relaxed);
    let lat = writer.handle.join().expect("writer");
    let phase = |p: u8| -> Vec<f64> { lat.iter().filter(|l| l.0 == p).map(|l| l.1).collect() };
    for (i, m) in methods.iter_mut().enumerate() {
        m["writer_during"] = stats(&phase(i as u8 + 1));
    }
    let compression = zstd_levels(&dir.join("copy-vacuum_into.db"));
    let secure = secure_delete_cost(&db, users);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let report = json!({
        "users": users,
        "matches": users / 2,
        "db_bytes": db_bytes,
        "backup_command": {
            "seconds": round3(command.seconds),
            "bytes": command.bytes,
            "note": "VACUUM INTO + integrity_check + ledger audit + fsync + rename, no concurrent writer",
        },
        "writer_baseline": stats(&phase(0)),
        "methods": methods,
        "zstd_of_backup": compression,
        "match_path": secure,
        "loadavg": load.trim(),
    });
    println!("{report}");
    for e in std::fs::read_dir(&dir).expect("dir").flatten() {
        let _ = if e.path().is_dir() {
            std::fs::remove_dir_all(e.path())
        } else {
            std::fs::remove_file(e.path())
        };
    }
}
