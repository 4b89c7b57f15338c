//! The operator subcommands `status`, `resync` and `doctor`: short, blocking, and safe to run on
//! a box whose service is misbehaving. Each prints what it found and returns an exit code.

use std::io::{IsTerminal, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::time::Duration;

use crate::node::config::Config;
use crate::node::i18n::Lang;
use crate::node::status_text::{self, TextOptions};
use crate::node::view;
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

/// How `status` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusMode {
    /// Verdict and facts for people, once.
    Once,
    /// The status document as JSON.
    Json,
    /// Verdict and facts, redrawn every [`WATCH_EVERY`] until interrupted (tty1).
    Watch,
}

/// The `status --watch` redraw period.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// `comatching-appliance status`. Exit codes (README): 0 serving matches, 1 not serving (or the
/// status port answered with an error), 3 nothing answers on the status port. `--watch` runs
/// until interrupted.
pub fn status(cfg: &Config, mode: StatusMode, lang: Option<Lang>) -> ExitCode {
    let lang = lang.unwrap_or_else(lang_from_env);
    match mode {
        StatusMode::Json => status_json(cfg),
        StatusMode::Once => {
            let (lines, code) = status_frame(cfg, lang, None, text_options());
            println!("{}", lines.join("\n"));
            code
        }
        StatusMode::Watch => watch(cfg, lang),
    }
}

fn status_json(cfg: &Config) -> ExitCode {
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

/// One screen of the people's view and the exit code it stands for.
fn status_frame(
    cfg: &Config,
    lang: Lang,
    footer: Option<&str>,
    opts: TextOptions,
) -> (Vec<String>, ExitCode) {
    let s = lang.strings();
    let heading = format!("{} {}", s.page_title, cfg.appliance.id);
    let failed = |error: String, code: u8| {
        let lines =
            status_text::render_no_answer(&view::no_answer(s), &heading, &error, footer, opts);
        (lines, ExitCode::from(code))
    };
    match http_get(cfg, "/status") {
        Ok((200, body)) => match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(doc) => {
                let v = view::build(&doc, lang);
                let code = if doc["ready"].as_bool() == Some(true) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                };
                (status_text::render(&v, &heading, footer, opts), code)
            }
            Err(e) => failed(format!("unreadable status document: {e}"), 1),
        },
        Ok((code, body)) => failed(format!("status answered {code}: {}", body.trim()), 1),
        Err(e) => failed(format!("comatching-appliance is not running? {e}"), 3),
    }
}

fn watch(cfg: &Config, lang: Lang) -> ExitCode {
    let terminal = std::io::stdout().is_terminal();
    let opts = text_options();
    let footer = lang.strings().refresh_note;
    let mut out = std::io::stdout().lock();
    if terminal {
        // Clear once; later frames overwrite in place (no flicker on the console).
        let _ = write!(out, "\x1b[2J");
    }
    loop {
        let (lines, _) = status_frame(cfg, lang, Some(footer), opts);
        let frame = if terminal {
            let mut f = String::from("\x1b[H");
            for l in &lines {
                f.push_str(l);
                f.push_str("\x1b[K\n");
            }
            f.push_str("\x1b[J");
            f
        } else {
            lines.join("\n") + "\n\n"
        };
        if out
            .write_all(frame.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            // Nobody reads any more (the terminal went away).
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(WATCH_EVERY);
    }
}

fn text_options() -> TextOptions {
    let terminal = std::io::stdout().is_terminal();
    TextOptions {
        width: 80,
        color: terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
    }
}

/// Korean when the locale asks for it and the terminal can draw it, English otherwise.
fn lang_from_env() -> Lang {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let locale = ["LC_ALL", "LC_MESSAGES", "LANG"]
        .iter()
        .find_map(|k| var(k));
    lang_for(locale.as_deref(), var("TERM").as_deref())
}

/// The language rule of [`lang_from_env`]: Korean for a `ko*` locale, except on the Linux
/// console (`TERM=linux`, tty1), whose fonts have no Hangul whatever the box's locale.
fn lang_for(locale: Option<&str>, term: Option<&str>) -> Lang {
    match (locale, term) {
        (_, Some("linux")) => Lang::En,
        (Some(l), _) if l.starts_with("ko") => Lang::Ko,
        _ => Lang::En,
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

/// Connects to every node of `broker.url` (a cluster's nodes each): all must answer, so a
/// mistyped or unreachable node is found before the day it would be needed.
fn broker_check(cfg: &Config) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let tls = comatching_protocol::amqp::tls_config(&cfg.broker).map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        for url in cfg.broker.url.as_slice() {
            let node = comatching_protocol::config::broker_node(url).unwrap_or_else(|| "?".into());
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                comatching_protocol::amqp::connect(url, &tls),
            )
            .await;
            match attempt {
                Ok(Ok(conn)) => {
                    let _ = conn.close(200, "doctor".into()).await;
                    ok.push(node);
                }
                Ok(Err(e)) => failed.push(format!("{node}: {e}")),
                Err(_) => failed.push(format!("{node}: timed out connecting")),
            }
        }
        if failed.is_empty() {
            Ok(format!("connected to {}", ok.join(", ")))
        } else {
            Err(format!(
                "{} of {} broker node(s) failed: {}",
                failed.len(),
                cfg.broker.url.len(),
                failed.join("; ")
            ))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn korean_only_where_it_can_be_drawn() {
        assert_eq!(
            lang_for(Some("ko_KR.UTF-8"), Some("xterm-256color")),
            Lang::Ko
        );
        assert_eq!(lang_for(Some("ko_KR.UTF-8"), Some("linux")), Lang::En);
        assert_eq!(lang_for(Some("en_US.UTF-8"), None), Lang::En);
        assert_eq!(lang_for(None, None), Lang::En);
    }
}
