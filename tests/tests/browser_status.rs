//! The appliance's staff status page in a real browser: Debian's headless Chromium driven over
//! WebDriver (`comatching_tests::browser`), against the real appliance binary.
//!
//! * Ready with the right student count; the broker verdict within 5 s of a (private) broker
//!   stopping, without a reload; Ready again after it comes back.
//! * Nothing wider than a 360 px phone, in Korean and in English, with the technical details
//!   open; the verdict big enough to read from 2 m.
//! * The language switch persists; the first paint needs no script; the security headers.
//! * The page says so when the appliance stops answering.
//! * Screenshots at 390 and 1366 px in both languages (written to `COMATCHING_SCREENSHOTS_DIR`
//!   when set: that is how `docs/screenshots/` is made).
//! * The same verdict from `comatching-appliance status` (people, `--json`, `--watch` as tty1
//!   runs it) and its exit codes.
//!
//! Every browser session ends with [`Session::close`], which fails the test on any console error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use comatching_tests::PATIENCE;
use comatching_tests::appliance::{ApplianceConfig, ApplianceProcess};
use comatching_tests::browser::{Browser, Session, SessionOptions, png_size};
use comatching_tests::private_broker::PrivateBroker;
use comatching_tests::world::{World, WorldOptions, drive_matches};
use serde_json::{Value, json};

/// The bound: the broker verdict shows within 5 s of the broker stopping.
const BROKER_VERDICT_WITHIN: Duration = Duration::from_secs(5);

/// A broker address where nothing listens: the appliance runs, cannot connect, says so.
const NO_BROKER: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

fn in_blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// An appliance alone, its broker unreachable (no relay, no broker: starts in a second).
async fn lonely_appliance(id: &str) -> ApplianceProcess {
    ApplianceProcess::start(ApplianceConfig::new(id, NO_BROKER)).await
}

async fn state(s: &Session) -> String {
    s.attr("#verdict", "data-state").await.unwrap_or_default()
}

/// Waits until the page's verdict is `want` (as the script shows it); returns how long it took.
async fn wait_state(s: &Session, want: &str, timeout: Duration) -> Duration {
    let t = Instant::now();
    s.wait_for_js(
        timeout,
        &format!("verdict {want}"),
        "return document.getElementById('verdict').dataset.state === arguments[0];",
        vec![json!(want)],
    )
    .await;
    t.elapsed()
}

/// Waits until the script has refreshed the page `n` times since it loaded.
async fn wait_refreshes(s: &Session, n: u64) {
    s.wait_for_js(
        PATIENCE,
        &format!("{n} refreshes"),
        "return Number(document.body.dataset.refreshes || 0) >= arguments[0];",
        vec![json!(n)],
    )
    .await;
}

async fn fact(s: &Session, id: &str) -> String {
    s.text(&format!("[data-fact=\"{id}\"] dd"))
        .await
        .unwrap_or_else(|| panic!("no fact {id}"))
        .replace('\u{a0}', " ")
}

async fn facts(s: &Session) -> Vec<(String, String)> {
    let v = s
        .js(
            "return [...document.querySelectorAll('#facts .fact')].map(f => \
             [f.dataset.fact, f.querySelector('dt').textContent]);",
            vec![],
        )
        .await;
    serde_json::from_value(v).expect("facts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shows_ready_then_the_broker_verdict_within_5s_then_ready_again() {
    let broker = in_blocking(|| PrivateBroker::start("bstatus"));
    let mut opts = WorldOptions::new("browser-status");
    opts.amqp_url = Some(broker.amqp_url());
    let mut w = World::start(&opts).await;
    w.register(12, 6, 1).await;
    w.wait_converged(PATIENCE).await;
    let url = format!("{}/status", w.appliances[0].base_url());

    let browser = Browser::start().await;
    let s = browser.session(SessionOptions::laptop()).await;
    s.goto(&url).await;
    assert_eq!(state(&s).await, "ready");
    assert_eq!(
        s.text("#verdict-title").await.as_deref(),
        Some("정상 — 매칭 처리 중")
    );
    assert_eq!(fact(&s, "students").await, "12명");
    assert_eq!(fact(&s, "broker").await, "연결됨");

    // The script's refresh shows what the server rendered, in place.
    let first_paint = facts(&s).await;
    s.js("window.__sameDocument = true; return null;", vec![])
        .await;
    wait_refreshes(&s, 1).await;
    assert_eq!(
        facts(&s).await,
        first_paint,
        "refresh changed the facts' order or labels"
    );
    assert_eq!(fact(&s, "students").await, "12명");

    in_blocking(|| broker.stop_app());
    let took = wait_state(&s, "broker_unreachable", BROKER_VERDICT_WITHIN).await;
    println!("broker verdict shown {took:?} after the broker stopped");
    assert_eq!(
        s.text("#verdict-title").await.as_deref(),
        Some("브로커에 연결할 수 없음")
    );
    assert!(
        s.text("#verdict-action")
            .await
            .is_some_and(|a| a.contains("네트워크 케이블")),
        "the action names the cable"
    );
    assert_eq!(fact(&s, "broker").await, "끊김");
    assert_eq!(
        s.js("return window.__sameDocument === true;", vec![]).await,
        json!(true),
        "the page reloaded instead of refreshing in place"
    );

    in_blocking(|| broker.start_app());
    wait_state(&s, "ready", PATIENCE).await;
    assert_eq!(fact(&s, "students").await, "12명");
    assert_eq!(fact(&s, "broker").await, "연결됨");
    s.close().await;

    // The CLI says the same, and exits 0 for a box that serves.
    let (code, text) = cli(&w.appliances[0], &["status"]).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("\n Ready - serving matches\n"), "{text}");
    assert!(
        text.contains("Students in the replica        12\n"),
        "{text}"
    );
}

/// Runs the CLI in an English locale; returns its exit code and stdout.
async fn cli(a: &ApplianceProcess, args: &[&str]) -> (Option<i32>, String) {
    let out = a
        .cli(args)
        .env("LANG", "C.UTF-8")
        .env_remove("LC_ALL")
        .env_remove("LC_MESSAGES")
        .env_remove("NO_COLOR")
        .output()
        .await
        .expect("run comatching-appliance");
    (
        out.status.code(),
        String::from_utf8(out.stdout).expect("UTF-8 output"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_cli_for_people_for_machines_and_for_tty1() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let mut a = lonely_appliance("edge-cli").await;
    let (code, text) = cli(&a, &["status"]).await;
    assert_eq!(code, Some(1), "not serving: exit 1\n{text}");
    assert!(
        text.starts_with("COMAtching appliance edge-cli\n"),
        "{text}"
    );
    assert!(
        text.contains("\n Broker unreachable\n Check the network cable"),
        "{text}"
    );
    assert!(
        text.contains("\nBroker connection              disconnected\n"),
        "{text}"
    );
    assert!(
        text.is_ascii(),
        "the English view is plain ASCII for the console"
    );
    assert!(text.lines().all(|l| l.chars().count() <= 80), "{text}");

    let (_, ko) = cli(&a, &["status", "--lang", "ko"]).await;
    assert!(ko.contains(" 브로커에 연결할 수 없음\n"), "{ko}");
    let (code, _) = cli(&a, &["status", "--lang", "fr"]).await;
    assert_eq!(code, Some(2), "a bad --lang is refused");

    let (code, json) = cli(&a, &["status", "--json"]).await;
    assert_eq!(code, Some(1));
    let doc: Value = serde_json::from_str(&json).expect("--json prints the document");
    assert_eq!(doc["verdict"]["state"], "broker_unreachable");
    assert_eq!(doc["appliance_id"], "edge-cli");

    // tty1's exact command line: `status --watch --config FILE`; frames every 2 s.
    let mut watch = a
        .cli(&["status", "--watch"])
        .env("LANG", "C.UTF-8")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn status --watch");
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let mut frames = 0;
    let started = Instant::now();
    while frames < 2 {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .expect("a frame within PATIENCE")
            .expect("read")
            .expect("--watch keeps running");
        if line == " Broker unreachable" {
            frames += 1;
        }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the second frame comes after the refresh period, not at once"
    );
    watch.kill().await.expect("stop --watch");

    // Nothing on the status port: exit 3, and the people's view says what to do.
    a.kill_9();
    let (code, text) = cli(&a, &["status"]).await;
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("\n Appliance not answering\n Power-cycle"),
        "{text}"
    );
    let (code, _) = cli(&a, &["status", "--json"]).await;
    assert_eq!(code, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_wider_than_a_360px_phone() {
    let a = lonely_appliance("edge-narrow-test-with-a-long-name").await;
    let url = format!("{}/status", a.base_url());
    let browser = Browser::start().await;
    for lang in ["ko-KR,ko", "en-US,en"] {
        let s = browser
            .session(SessionOptions::phone(360).language(lang))
            .await;
        s.goto(&url).await;
        assert_eq!(state(&s).await, "broker_unreachable");
        // The technical details hold the longest values (digest, errors): open them too.
        s.click("#details summary").await;
        assert_eq!(s.attr("#details", "open").await.as_deref(), Some(""));
        let o = s.overflow().await;
        assert!(o.fits(360), "{lang}: wider than 360 px: {o:#?}");
        // Readable from 2 m: the verdict's letters are at least 32 px high on a phone.
        let size = s
            .js(
                "return parseFloat(getComputedStyle(document.getElementById('verdict-title')).fontSize);",
                vec![],
            )
            .await;
        assert!(size.as_f64() >= Some(32.0), "{lang}: verdict font {size}px");
        // After a refresh by the script (rows rebuilt) it still fits.
        wait_refreshes(&s, 1).await;
        let o = s.overflow().await;
        assert!(o.fits(360), "{lang}, after a refresh: {o:#?}");
        s.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_paint_needs_no_script_and_the_language_switch_persists() {
    let a = lonely_appliance("edge-lang").await;
    let base = a.base_url().to_owned();
    let http = comatching_tests::api::http_client(None);

    // Without a browser (so without script): the server's page is complete, in Korean.
    let r = http
        .get(format!("{base}/status"))
        .header("accept", "text/html")
        .send()
        .await
        .expect("GET /status");
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(h["x-frame-options"], "DENY");
    let html = r.text().await.unwrap();
    assert!(html.contains("<html lang=\"ko\">"), "{html}");
    assert!(
        html.contains("<h1 id=\"verdict-title\">브로커에 연결할 수 없음</h1>"),
        "{html}"
    );
    assert!(html.contains("data-fact=\"students\""));
    // JSON for machines, unchanged, with the verdict added.
    let doc: Value = http
        .get(format!("{base}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["verdict"]["state"], "broker_unreachable");
    assert_eq!(doc["verdict"]["action"], "check_network");
    assert_eq!(doc["ready"], false);
    // Bad input is refused with a stable code.
    let bad = http
        .get(format!("{base}/status?lang=fr"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["code"], "validation_failed");
    assert_eq!(body["error"]["field"], "lang");

    // A browser that prefers English gets English; the switch turns it Korean and it stays so.
    let browser = Browser::start().await;
    let s = browser
        .session(SessionOptions::phone(390).language("en-US,en"))
        .await;
    // Staff type the bare address.
    s.goto(&format!("{base}/")).await;
    let here = s.client().current_url().await.expect("current url");
    assert_eq!(here.path(), "/status", "/ leads to the page");
    assert_eq!(s.attr("html", "lang").await.as_deref(), Some("en"));
    assert_eq!(
        s.text("#verdict-title").await.as_deref(),
        Some("Broker unreachable")
    );
    s.click("#lang-switch").await;
    s.wait_for_text(PATIENCE, "#verdict-title", |t| {
        t == "브로커에 연결할 수 없음"
    })
    .await;
    s.goto(&format!("{base}/status")).await;
    assert_eq!(
        s.attr("html", "lang").await.as_deref(),
        Some("ko"),
        "the choice did not persist"
    );
    // The script refreshes in the page's language.
    wait_refreshes(&s, 1).await;
    assert_eq!(
        s.text("#verdict-title").await.as_deref(),
        Some("브로커에 연결할 수 없음")
    );
    assert_eq!(fact(&s, "broker").await, "끊김");
    // And back.
    s.click("#lang-switch").await;
    s.wait_for_text(PATIENCE, "#verdict-title", |t| t == "Broker unreachable")
        .await;
    s.goto(&format!("{base}/status")).await;
    assert_eq!(s.attr("html", "lang").await.as_deref(), Some("en"));
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn says_so_when_the_appliance_stops_answering() {
    let mut a = lonely_appliance("edge-gone").await;
    let url = format!("{}/status", a.base_url());
    let browser = Browser::start().await;
    let s = browser.session(SessionOptions::phone(390)).await;
    s.goto(&url).await;
    wait_refreshes(&s, 1).await;
    assert_eq!(state(&s).await, "broker_unreachable");
    a.kill_9();
    wait_state(&s, "no_answer", PATIENCE).await;
    assert_eq!(
        s.text("#verdict-title").await.as_deref(),
        Some("어플라이언스가 응답하지 않음")
    );
    assert!(
        s.text("#verdict-action")
            .await
            .is_some_and(|t| t.contains("전원")),
        "the action says to power-cycle"
    );
    assert_eq!(
        s.js("return document.body.classList.contains('stale');", vec![])
            .await,
        json!(true),
        "the last facts are marked stale"
    );
    // The failed fetches are the only console errors.
    let errors = s.console_errors().await;
    assert!(
        errors
            .iter()
            .all(|e| e.message.contains("ERR_CONNECTION_REFUSED")),
        "{errors:#?}"
    );
    s.close_allowing_errors().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshots_at_390_and_1366_in_both_languages() {
    let out = std::env::var_os("COMATCHING_SCREENSHOTS_DIR").map(std::path::PathBuf::from);
    let mut w = World::start(&WorldOptions::new("browser-shots")).await;
    let users = w.register(48, 8, 7).await;
    w.grant_all(&users, 5_000, 8).await;
    w.wait_converged(PATIENCE).await;
    let (ok, _) = drive_matches(Arc::new(users), 2, Duration::from_secs(20), Some(6), 7).await;
    assert!(!ok.is_empty(), "some matches for the counters");
    let ready_url = format!("{}/status", w.appliances[0].base_url());
    let lonely = lonely_appliance("edge-2").await;
    let down_url = format!("{}/status", lonely.base_url());

    let browser = Browser::start().await;
    let shots = [
        ("status-ready-ko-390", &ready_url, "ko-KR,ko", 390, true),
        ("status-ready-en-390", &ready_url, "en-US,en", 390, true),
        ("status-ready-ko-1366", &ready_url, "ko-KR,ko", 1366, false),
        ("status-ready-en-1366", &ready_url, "en-US,en", 1366, false),
        ("status-broker-ko-390", &down_url, "ko-KR,ko", 390, true),
    ];
    for (name, url, lang, width, mobile) in shots {
        let opts = if mobile {
            SessionOptions::phone(width)
        } else {
            SessionOptions::laptop()
        };
        let s = browser.session(opts.language(lang)).await;
        s.goto(url).await;
        // One refresh by the script, so the shot shows "last update".
        wait_refreshes(&s, 1).await;
        let png = s.screenshot_full_page(width, mobile).await;
        let (pw, ph) = png_size(&png).expect("a PNG");
        assert_eq!(pw, width, "{name}: screenshot width");
        assert!(ph >= 400, "{name}: {ph} px tall");
        if let Some(dir) = &out {
            std::fs::create_dir_all(dir).expect("screenshot dir");
            std::fs::write(dir.join(format!("{name}.png")), &png).expect("write screenshot");
        }
        s.close().await;
    }
}
