//! The operator subcommands `status`, `resync` and `doctor`: short, blocking, and safe to run on
//! a box whose service is misbehaving. Each prints what it found and returns an exit code.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

use crate::node::config::Config;
use crate::store;
use crate::tailscale::TailscaleProbe;

/// GET `path` from the running appliance's status port; returns (status code, body).
fn http_get(cfg: &Config, path: &str) -> Result<(u16, String), String> {
    let addr = cfg.http.listen;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("nothing answers on {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("malformed HTTP response")?;
    Ok((code, body.to_owned()))
}

pub fn status(cfg: &Config) -> ExitCode {
    match http_get(cfg, "/status") {
        Ok((200, body)) => {
            println!("{body}");
            let ready = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["ready"].as_bool())
                .unwrap_or(false);
            if ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Ok((code, body)) => {
            eprintln!("status answered {code}: {body}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("comatching-appliance is not running? {e}");
            ExitCode::from(3)
        }
    }
}

pub fn resync(cfg: &Config) -> ExitCode {
    if http_get(cfg, "/healthz").is_ok() {
        eprintln!(
            "the appliance is running on {}; stop it first (systemctl stop comatching-appliance)",
            cfg.http.listen
        );
        return ExitCode::from(2);
    }
    let dir = cfg.store_dir();
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {
            println!(
                "replica at {} wiped; the next start loads a snapshot from the relay",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no replica at {}; nothing to wipe", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot wipe {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

pub fn doctor(cfg: &Config) -> ExitCode {
    let mut failed = 0;
    let mut check = |name: &str, result: Result<String, String>| match result {
        Ok(msg) => println!("ok    {name}: {msg}"),
        Err(msg) => {
            failed += 1;
            println!("FAIL  {name}: {msg}");
        }
    };
    let ts = TailscaleProbe::from(&cfg.tailscale).report();
    check(
        "tailscale",
        if ts.state.is_up() {
            Ok(ts.state.label().to_owned())
        } else {
            Err(format!("{} {:?}", ts.state.label(), ts.health))
        },
    );
    check("broker", broker_check(cfg));
    check("data dir", data_dir_check(cfg));
    if http_get(cfg, "/healthz").is_ok() {
        check(
            "replica",
            Ok("in use by the running service (integrity checked by it)".into()),
        );
    } else {
        check("replica", store_check(cfg));
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn broker_check(cfg: &Config) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let tls = comatching_protocol::amqp::tls_config(&cfg.broker).map_err(|e| e.to_string())?;
    rt.block_on(async {
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            comatching_protocol::amqp::connect(&cfg.broker.url, &tls),
        )
        .await
        .map_err(|_| "timed out connecting".to_owned())?
        .map_err(|e| e.to_string())?;
        let _ = conn.close(200, "doctor".into()).await;
        Ok(format!(
            "connected to {}",
            comatching_protocol::config::mask_url_password(&cfg.broker.url)
        ))
    })
}

fn data_dir_check(cfg: &Config) -> Result<String, String> {
    let dir = &cfg.storage.data_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let probe = dir.join(".doctor-probe");
    let mut f = std::fs::File::create(&probe).map_err(|e| format!("not writable: {e}"))?;
    f.write_all(b"ok")
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("write/fsync failed: {e}"))?;
    let _ = std::fs::remove_file(&probe);
    Ok(format!("{} writable", dir.display()))
}

fn store_check(cfg: &Config) -> Result<String, String> {
    let s = store::open(cfg.storage.backend, &cfg.store_dir())
        .map_err(|e| format!("{}: {e}", e.code()))?;
    let meta = s.meta().map_err(|e| e.to_string())?;
    let (count, digest) = s.recount().map_err(|e| e.to_string())?;
    if (count, digest) != (meta.count, meta.digest) {
        return Err(format!(
            "meta says {} users / {} but the rows give {count} / {digest}: run `comatching-appliance resync`",
            meta.count, meta.digest
        ));
    }
    Ok(format!(
        "{} users, applied_seq {}, epoch {}",
        count,
        meta.cursor.applied_seq,
        meta.cursor
            .epoch
            .map(|e| e.to_string())
            .unwrap_or_else(|| "none".into())
    ))
}
