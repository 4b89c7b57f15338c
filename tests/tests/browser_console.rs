//! The relay's booth console (`GET /console/`) in a real browser: Debian's headless Chromium
//! driven over WebDriver (`comatching_tests::browser`), against the real relay binary.
//!
//! * An operator logs in (the token in `sessionStorage`, never in the URL or `localStorage`),
//!   the festival board shows the relay's numbers and its appliance, and the numbers move
//!   without a reload after a grant and a match; logout ends the session.
//! * A student account is refused with a clear message and its new session is ended; a wrong
//!   password says so.
//! * Korean by default, the switch to English persists across reloads.
//! * Pending charge requests, live: a student's request appears without a reload (after the
//!   older one, highlighted), approve shows the result and the balance changes, reject needs a
//!   reason; two consoles: what one decides (or the student cancels) leaves the other within
//!   1 s; a network drop (a proxy cutting every connection while a request is decided and
//!   another made) and the stream resumes with `Last-Event-ID`, the queue right.
//! * Student look-up by username prefix (points, pending charge) and a direct grant that asks
//!   first in a dialog naming the student and the amount (cancel grants nothing).
//! * Nothing wider than a 360 px phone (login and board, both languages); the headers.
//! * Screenshots at 390 and 1366 px in both languages (written to `COMATCHING_SCREENSHOTS_DIR`
//!   when set: that is how `docs/screenshots/console-*.png` are made).
//!
//! Sessions end with [`Session::close`] (fails on any console error) unless a test provokes an
//! error response on purpose: then [`close_expecting`] allows exactly those responses.

use std::time::Duration;

use comatching_tests::PATIENCE;
use comatching_tests::User;
use comatching_tests::browser::{Browser, Session, SessionOptions, png_size};
use comatching_tests::world::{World, WorldOptions};
use fantoccini::Locator;
use serde_json::{Value, json};

/// The board refreshes every 3 s; a change shows within two refreshes and a margin.
const BOARD_CHANGE_WITHIN: Duration = Duration::from_secs(8);

async fn world(label: &str, appliances: usize) -> World {
    let mut opts = WorldOptions::new(label);
    opts.appliances = appliances;
    World::start(&opts).await
}

fn console_url(w: &World) -> String {
    format!("{}/console/", w.relay.base_url())
}

async fn type_into(s: &Session, css: &str, text: &str) {
    let e = s
        .client()
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"));
    e.clear().await.expect("clear");
    e.send_keys(text).await.expect("type");
}

async fn view(s: &Session) -> String {
    s.js("return document.body.dataset.view || '';", vec![])
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn wait_view(s: &Session, want: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while view(s).await != want {
        if tokio::time::Instant::now() > deadline {
            let error = s.text("#login-error").await;
            let console = s.console().await;
            panic!(
                "timed out waiting for the {want} view; shows {:?}, login error {error:?}, \
                 console {console:#?}",
                view(s).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens the console and logs in through the form.
async fn log_in(s: &Session, url: &str, username: &str, password: &str) {
    s.goto(url).await;
    wait_view(s, "login").await;
    type_into(s, "#username", username).await;
    type_into(s, "#password", password).await;
    s.click("#login-button").await;
}

/// Records every fetch the page makes as `[method, path, status]` in `window.__calls`.
async fn record_fetches(s: &Session) {
    s.js(
        "if (!window.__calls) { window.__calls = []; const f = window.fetch; \
         window.fetch = async (url, init) => { const r = await f(url, init); \
         window.__calls.push([(init && init.method) || 'GET', new URL(url, location.href).pathname, r.status]); \
         return r; }; } return null;",
        vec![],
    )
    .await;
}

async fn calls(s: &Session) -> Vec<(String, String, u16)> {
    serde_json::from_value(s.js("return window.__calls || [];", vec![]).await).expect("calls")
}

/// The number in a board tile, as shown (digits only, so "1,000" is 1000).
async fn tile(s: &Session, stat: &str) -> Option<i64> {
    let t = s.text(&format!("#tiles [data-stat=\"{stat}\"] dd")).await?;
    let digits: String = t.chars().filter(char::is_ascii_digit).collect();
    digits.parse().ok()
}

async fn wait_tile(s: &Session, stat: &str, want: i64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = tile(s, stat).await;
        if v == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tile {stat}: want {want}, shows {v:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Closes the session after checking that its console errors are exactly failed loads of the
/// given `(path, status)` responses (Chromium logs every 4xx a page fetches as an error).
async fn close_expecting(s: Session, allowed: &[(&str, u16)]) {
    let errors = s.console_errors().await;
    for e in &errors {
        let ok = e.source.as_deref() == Some("network")
            && allowed.iter().any(|(path, status)| {
                e.message.contains(path) && e.message.contains(&format!("status of {status}"))
            });
        assert!(ok, "unexpected console error: {e:#?}\nall: {errors:#?}");
    }
    s.close_allowing_errors().await;
}

/// A student (with a profile) who can afford a match; returns the one whose match succeeded.
async fn one_match(users: &[User]) -> User {
    for (i, u) in users.iter().enumerate() {
        let r = u.post_match_json(&format!("console-{i}"), &json!({})).await;
        if r.status == 201 {
            return u.clone();
        }
    }
    panic!("no student could be matched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_logs_in_and_the_board_follows_grants_and_matches() {
    let mut w = world("console-board", 1).await;
    let users = w.register(12, 6, 7).await;
    w.wait_converged(PATIENCE).await;
    let url = console_url(&w);

    let browser = Browser::start().await;
    let s = browser.session(SessionOptions::laptop()).await;
    log_in(&s, &url, "operator", &w.operator.user.password).await;
    wait_view(&s, "board").await;

    // The token: in this tab's sessionStorage only.
    let here = s.client().current_url().await.expect("url");
    assert_eq!(here.path(), "/console/");
    assert_eq!(here.query(), None, "nothing in the URL");
    let token = s
        .js(
            "return sessionStorage.getItem('comatching.console.token');",
            vec![],
        )
        .await;
    let token = token
        .as_str()
        .expect("a token in sessionStorage")
        .to_owned();
    assert!(!here.as_str().contains(&token));
    assert_eq!(
        s.js(
            "return JSON.stringify(localStorage).includes(arguments[0]);",
            vec![json!(token)]
        )
        .await,
        json!(false),
        "the token is not in localStorage"
    );
    assert_eq!(
        s.text("#who").await.as_deref(),
        Some("operator · 운영자"),
        "who is logged in"
    );

    // The relay's numbers: 12 students + the operator, 12 profiles, nothing granted yet.
    wait_tile(&s, "users", 13, PATIENCE).await;
    wait_tile(&s, "profiles", 12, PATIENCE).await;
    wait_tile(&s, "matches_today", 0, PATIENCE).await;
    wait_tile(&s, "points_granted", 0, PATIENCE).await;
    wait_tile(&s, "open_holds", 0, PATIENCE).await;
    s.wait_for_js(
        PATIENCE,
        "box-1 ready on the board",
        "const a = document.querySelector('[data-appliance=\"box-1\"]'); \
         return a && a.dataset.ready === 'true' && a.textContent.includes('최신 상태');",
        vec![],
    )
    .await;
    s.js("window.__sameDocument = true; return null;", vec![])
        .await;

    // A grant and a match move the numbers, without a reload.
    w.grant_all(&users, 2000, 4).await;
    wait_tile(&s, "points_granted", 24_000, BOARD_CHANGE_WITHIN).await;
    let matched = one_match(&users).await;
    wait_tile(&s, "matches_today", 1, BOARD_CHANGE_WITHIN).await;
    let spent = w.operator.stats().await["points_spent"]
        .as_i64()
        .expect("points_spent");
    assert!(spent > 0, "the match cost points");
    wait_tile(&s, "points_spent", spent, BOARD_CHANGE_WITHIN).await;
    assert!(matched.points().await < 2000);
    assert_eq!(
        s.js("return window.__sameDocument === true;", vec![]).await,
        json!(true),
        "the board reloaded the page instead of refreshing in place"
    );

    // Logout ends the session on the relay, and forgets the token.
    s.click("#logout").await;
    wait_view(&s, "login").await;
    assert_eq!(
        s.js(
            "return sessionStorage.getItem('comatching.console.token');",
            vec![]
        )
        .await,
        Value::Null
    );
    w.api
        .get("/api/v1/me", Some(&token))
        .await
        .assert_error(401, "unauthorized");
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_student_account_is_refused_and_its_session_ended() {
    let w = world("console-refuse", 0).await;
    let student = w.api.signup("student_kim").await;
    let url = console_url(&w);
    let browser = Browser::start().await;
    let s = browser.session(SessionOptions::laptop()).await;

    // A wrong password first.
    s.goto(&url).await;
    wait_view(&s, "login").await;
    record_fetches(&s).await;
    type_into(&s, "#username", "operator").await;
    type_into(&s, "#password", "not-the-password").await;
    s.click("#login-button").await;
    s.wait_for_text(PATIENCE, "#login-error", |t| {
        t == "아이디 또는 비밀번호가 틀렸습니다."
    })
    .await;
    assert_eq!(view(&s).await, "login");

    // A student's account: refused, told why, and the new session ended on the relay.
    type_into(&s, "#username", &student.username).await;
    type_into(&s, "#password", &student.password).await;
    s.click("#login-button").await;
    let msg = s
        .wait_for_text(PATIENCE, "#login-error", |t| {
            t.contains("운영자 계정이 아니")
        })
        .await;
    assert!(msg.starts_with("student_kim "), "{msg}");
    assert_eq!(view(&s).await, "login", "no board for a student");
    assert!(
        s.attr("#board-view", "hidden").await.is_some(),
        "the board stays hidden"
    );
    assert_eq!(
        s.js(
            "return sessionStorage.getItem('comatching.console.token');",
            vec![]
        )
        .await,
        Value::Null,
        "the student's token is forgotten"
    );
    let log = calls(&s).await;
    let want: Vec<(String, String, u16)> = vec![
        ("POST".into(), "/api/v1/sessions".into(), 401),
        ("POST".into(), "/api/v1/sessions".into(), 200),
        ("GET".into(), "/api/v1/admin/stats".into(), 403),
        ("DELETE".into(), "/api/v1/sessions/current".into(), 204),
    ];
    assert_eq!(log, want, "the page's requests");
    // The student's own session (from signing up) is untouched.
    student.me().await.expect(200);
    // Made an operator (README: `comatching-relay admin grant-operator`), the same account
    // gets in.
    w.relay.grant_operator(&student.username);
    log_in(&s, &url, &student.username, &student.password).await;
    wait_view(&s, "board").await;
    close_expecting(
        s,
        &[("/api/v1/sessions", 401), ("/api/v1/admin/stats", 403)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn korean_by_default_and_the_language_switch_persists() {
    let w = world("console-lang", 0).await;
    let url = console_url(&w);
    let http = comatching_tests::api::http_client(None);

    // Headers of the page and its files; /console leads to /console/.
    for path in [
        "/console/",
        "/console/console.js",
        "/console/console.css",
        "/console/i18n/en.json",
    ] {
        let r = http
            .get(format!("{}{path}", w.relay.base_url()))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'self'"), "{csp}");
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
    }
    // `since_ms` of the stats: a bad value is refused with the field named.
    let op = &w.operator;
    op.user
        .get("/api/v1/admin/stats?since_ms=yesterday")
        .await
        .assert_invalid("since_ms");
    op.user
        .get("/api/v1/admin/stats?since_ms=-1")
        .await
        .assert_invalid("since_ms");
    let st = op
        .user
        .get("/api/v1/admin/stats?since_ms=0")
        .await
        .expect(200);
    assert_eq!(st["matches_since"], 0);

    // A browser that prefers English still starts in Korean (the booth's language).
    let browser = Browser::start().await;
    let s = browser
        .session(SessionOptions::phone(390).language("en-US,en"))
        .await;
    s.goto(&format!("{}/console", w.relay.base_url())).await;
    wait_view(&s, "login").await;
    assert_eq!(s.client().current_url().await.unwrap().path(), "/console/");
    assert_eq!(s.attr("html", "lang").await.as_deref(), Some("ko"));
    assert_eq!(s.text(".login h1").await.as_deref(), Some("운영자 로그인"));

    s.click("#lang-switch").await;
    s.wait_for_text(PATIENCE, ".login h1", |t| t == "Operator login")
        .await;
    assert_eq!(s.attr("html", "lang").await.as_deref(), Some("en"));
    assert_eq!(s.text("#lang-switch").await.as_deref(), Some("한국어"));

    // It persists: a reload, and a login, stay English.
    s.refresh().await;
    wait_view(&s, "login").await;
    assert_eq!(
        s.attr("html", "lang").await.as_deref(),
        Some("en"),
        "did not persist"
    );
    assert_eq!(s.text(".login h1").await.as_deref(), Some("Operator login"));
    log_in(&s, &url, "operator", &w.operator.user.password).await;
    wait_view(&s, "board").await;
    assert_eq!(
        s.text("#board-view h2").await.as_deref(),
        Some("Festival board")
    );
    assert_eq!(s.text("#who").await.as_deref(), Some("operator · operator"));

    // And back: the board's live text follows at once.
    s.click("#lang-switch").await;
    s.wait_for_text(PATIENCE, "#board-view h2", |t| t == "축제 현황")
        .await;
    s.refresh().await;
    wait_view(&s, "board").await;
    assert_eq!(s.attr("html", "lang").await.as_deref(), Some("ko"));
    assert_eq!(
        s.text("[data-stat=\"users\"] dt").await.as_deref(),
        Some("가입 학생")
    );
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_wider_than_a_360px_phone() {
    let mut w = world("console-360", 2).await;
    let users = w.register(6, 6, 3).await;
    w.grant_all(&users, 1_000_000, 3).await;
    // A request in the queue, with a long depositor name.
    users[0]
        .request_charge(100_000, "홍길동홍길동홍길동홍길동 Hong Gildong-Kim")
        .await
        .expect(201);
    w.wait_converged(PATIENCE).await;
    let url = console_url(&w);
    let browser = Browser::start().await;
    for lang in ["ko", "en"] {
        let s = browser.session(SessionOptions::phone(360)).await;
        s.goto(&url).await;
        wait_view(&s, "login").await;
        if lang == "en" {
            s.click("#lang-switch").await;
            s.wait_for_js(
                PATIENCE,
                "English",
                "return document.documentElement.lang === 'en';",
                vec![],
            )
            .await;
        }
        let o = s.overflow().await;
        assert!(o.fits(360), "{lang}, login: wider than 360 px: {o:#?}");
        log_in(&s, &url, "operator", &w.operator.user.password).await;
        wait_view(&s, "board").await;
        wait_tile(&s, "points_granted", 6_000_000, PATIENCE).await;
        s.wait_for_js(
            PATIENCE,
            "two appliances on the board",
            "return document.querySelectorAll('[data-appliance]').length === 2;",
            vec![],
        )
        .await;
        wait_queue_loaded(&s).await;
        assert_eq!(queue_ids(&s).await.len(), 1);
        let o = s.overflow().await;
        assert!(o.fits(360), "{lang}, board: wider than 360 px: {o:#?}");
        // With the reject form open too.
        s.click("#queue .charge .reject").await;
        let o = s.overflow().await;
        assert!(
            o.fits(360),
            "{lang}, reject form: wider than 360 px: {o:#?}"
        );
        s.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshots_at_390_and_1366_in_both_languages() {
    let out = std::env::var_os("COMATCHING_SCREENSHOTS_DIR").map(std::path::PathBuf::from);
    let mut w = world("console-shots", 2).await;
    let users = w.register(40, 8, 11).await;
    w.grant_all(&users, 5000, 4).await;
    w.wait_converged(PATIENCE).await;
    for (i, u) in users.iter().take(6).enumerate() {
        let _ = u.post_match_json(&format!("shot-{i}"), &json!({})).await;
    }
    for (u, (amount, depositor)) in users[10..]
        .iter()
        .zip([(5000, "김민지"), (10_000, "이준호")])
    {
        u.request_charge(amount, depositor).await.expect(201);
    }
    let url = console_url(&w);
    let browser = Browser::start().await;
    for (lang, width, mobile) in [
        ("ko", 390, true),
        ("en", 390, true),
        ("ko", 1366, false),
        ("en", 1366, false),
    ] {
        let opts = if mobile {
            SessionOptions::phone(width)
        } else {
            SessionOptions::laptop()
        };
        let s = browser.session(opts).await;
        s.goto(&url).await;
        wait_view(&s, "login").await;
        if lang == "en" {
            s.click("#lang-switch").await;
            s.wait_for_js(
                PATIENCE,
                "English",
                "return document.documentElement.lang === 'en';",
                vec![],
            )
            .await;
        }
        log_in(&s, &url, "operator", &w.operator.user.password).await;
        wait_view(&s, "board").await;
        wait_tile(&s, "points_granted", 200_000, PATIENCE).await;
        s.wait_for_js(
            PATIENCE,
            "two appliances on the board",
            "return document.querySelectorAll('[data-appliance]').length === 2;",
            vec![],
        )
        .await;
        wait_queue_loaded(&s).await;
        s.wait_for_js(
            PATIENCE,
            "two requests in the queue",
            "return document.querySelectorAll('#queue .charge').length === 2;",
            vec![],
        )
        .await;
        let png = s.screenshot_full_page(width, mobile).await;
        let (pw, ph) = png_size(&png).expect("a PNG");
        assert_eq!(pw, width, "screenshot width");
        assert!(ph >= 300, "screenshot height {ph}");
        if let Some(dir) = &out {
            std::fs::create_dir_all(dir).expect("screenshot dir");
            std::fs::write(dir.join(format!("console-{lang}-{width}.png")), &png)
                .expect("write screenshot");
        }
        s.close().await;
    }
}

// ---- the pending charge queue ------------------------------------------------------------

/// The bound: a request decided elsewhere leaves every console within 1 s.
const LEAVES_WITHIN: Duration = Duration::from_secs(1);

async fn wait_queue_loaded(s: &Session) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let check = "return document.body.dataset.queueLoaded === 'true' && \
                 document.getElementById('stream-status').dataset.state === 'live';";
    while s.js(check, vec![]).await != json!(true) {
        if tokio::time::Instant::now() > deadline {
            let state = s
                .js(
                    "return [document.body.dataset.queueLoaded, \
                     document.getElementById('stream-status').textContent, \
                     document.getElementById('queue-result').textContent];",
                    vec![],
                )
                .await;
            panic!(
                "the queue did not load with a live stream: {state}; console {:#?}",
                s.console().await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The charge ids in the queue, top to bottom.
async fn queue_ids(s: &Session) -> Vec<String> {
    serde_json::from_value(
        s.js(
            "return [...document.querySelectorAll('#queue .charge')].map(li => li.dataset.charge);",
            vec![],
        )
        .await,
    )
    .expect("ids")
}

async fn wait_queue(s: &Session, want: &[&str], within: Duration) -> Duration {
    let t = tokio::time::Instant::now();
    loop {
        let ids = queue_ids(s).await;
        if ids == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "queue: want {want:?}, shows {ids:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn charge_id(r: comatching_tests::Resp) -> String {
    r.expect(201)["charge_id"]
        .as_str()
        .expect("charge_id")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_students_request_appears_live_and_is_approved_or_rejected() {
    let w = world("console-queue", 0).await;
    let early = w.api.signup("student_early").await;
    let student = w.api.signup("student_park").await;
    let early_id = charge_id(early.request_charge(3000, "박이른").await).await;

    let browser = Browser::start().await;
    let s = browser.session(SessionOptions::laptop()).await;
    log_in(&s, &console_url(&w), "operator", &w.operator.user.password).await;
    wait_view(&s, "board").await;
    wait_queue_loaded(&s).await;
    // Waiting before the console looked: listed, not highlighted as new.
    wait_queue(&s, &[&early_id], PATIENCE).await;
    assert_eq!(
        s.attr(&format!("[data-charge=\"{early_id}\"]"), "class")
            .await
            .as_deref(),
        Some("charge")
    );
    s.js("window.__sameDocument = true; return null;", vec![])
        .await;

    // A new request shows without a reload, after the older one, highlighted.
    let id = charge_id(student.request_charge(5000, "박학생").await).await;
    let took = wait_queue(&s, &[&early_id, &id], PATIENCE).await;
    println!("a new request appeared in the queue {took:?} after it was made");
    let row = format!("[data-charge=\"{id}\"]");
    assert_eq!(
        s.text(&format!("{row} .amount")).await.as_deref(),
        Some("5,000")
    );
    assert_eq!(
        s.text(&format!("{row} .who")).await.as_deref(),
        Some("student_park")
    );
    assert_eq!(
        s.text(&format!("{row} .depositor")).await.as_deref(),
        Some("입금자 박학생")
    );
    assert!(
        s.text(&format!("{row} .age"))
            .await
            .is_some_and(|a| a.ends_with("초 전 요청")),
        "the request's age"
    );
    assert_eq!(s.attr(&row, "class").await.as_deref(), Some("charge new"));

    // Approve: the result is shown, the row leaves, the student's balance changes.
    let before = student.points().await;
    s.click(&format!("{row} .approve")).await;
    let msg = s
        .wait_for_text(PATIENCE, "#queue-result", |t| t.starts_with("승인했습니다"))
        .await;
    assert!(
        msg.contains("student_park") && msg.contains("5,000"),
        "{msg}"
    );
    wait_queue(&s, &[&early_id], PATIENCE).await;
    assert_eq!(student.points().await, before + 5000);

    // Reject asks for a reason; none is refused, one is sent.
    let early_row = format!("[data-charge=\"{early_id}\"]");
    s.click(&format!("{early_row} .reject")).await;
    s.click(&format!("{early_row} .reject-confirm")).await;
    s.wait_for_text(PATIENCE, "#queue-result", |t| {
        t == "거절 사유를 입력하세요."
    })
    .await;
    assert_eq!(queue_ids(&s).await, vec![early_id.clone()], "nothing sent");
    type_into(&s, &format!("{early_row} .reason"), "입금 확인 안 됨").await;
    s.click(&format!("{early_row} .reject-confirm")).await;
    s.wait_for_text(PATIENCE, "#queue-result", |t| t.starts_with("거절했습니다"))
        .await;
    wait_queue(&s, &[], PATIENCE).await;
    assert!(s.text("#queue-empty").await.is_some());
    let mine = early.get("/api/v1/me/charges").await.expect(200);
    assert_eq!(mine["charges"][0]["status"], "rejected");
    assert_eq!(mine["charges"][0]["reason"], "입금 확인 안 됨");
    assert_eq!(early.points().await, 0, "a rejected request grants nothing");
    assert_eq!(
        s.js("return window.__sameDocument === true;", vec![]).await,
        json!(true),
        "the page reloaded"
    );
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decided_on_one_console_it_leaves_the_other_within_1s() {
    let w = world("console-two", 0).await;
    let second = comatching_tests::Operator::create(&w.api, &w.relay, "booth_two").await;
    let student = w.api.signup("student_choi").await;
    let other = w.api.signup("student_jung").await;
    let url = console_url(&w);
    let browser = Browser::start().await;
    let a = browser.session(SessionOptions::laptop()).await;
    let b = browser.session(SessionOptions::phone(390)).await;
    log_in(&a, &url, "operator", &w.operator.user.password).await;
    log_in(&b, &url, "booth_two", &second.user.password).await;
    for s in [&a, &b] {
        wait_view(s, "board").await;
        wait_queue_loaded(s).await;
    }

    let id = charge_id(student.request_charge(2000, "최").await).await;
    let id2 = charge_id(other.request_charge(4000, "정").await).await;
    for s in [&a, &b] {
        wait_queue(s, &[&id, &id2], PATIENCE).await;
    }
    // Console A approves the first: it leaves B within 1 s.
    a.click(&format!("[data-charge=\"{id}\"] .approve")).await;
    let took = wait_queue(&b, &[&id2], LEAVES_WITHIN).await;
    println!("approved on one console, gone from the other after {took:?}");
    wait_queue(&a, &[&id2], LEAVES_WITHIN).await;
    // The student cancels the second: it leaves both within 1 s.
    other.cancel_charge(&id2).await.expect(200);
    let took_a = wait_queue(&a, &[], LEAVES_WITHIN).await;
    let took_b = wait_queue(&b, &[], LEAVES_WITHIN).await;
    println!("cancelled by the student, gone after {took_a:?} / {took_b:?}");
    // B tries to decide one A already decided (stale row): told so, not an error page.
    let id3 = charge_id(student.request_charge(1000, "최").await).await;
    wait_queue(&b, &[&id3], PATIENCE).await;
    w.operator.approve(&id3).await.expect(200);
    wait_queue(&b, &[], LEAVES_WITHIN).await;
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_network_drop_the_stream_resumes_and_the_queue_is_right() {
    use comatching_tests::proxy::{Mode, Proxy};
    let w = world("console-drop", 0).await;
    let s1 = w.api.signup("student_one").await;
    let s2 = w.api.signup("student_two").await;
    let c1 = charge_id(s1.request_charge(1000, "일").await).await;
    // The browser reaches the relay through a proxy the test can cut.
    let target = w
        .relay
        .base_url()
        .trim_start_matches("http://")
        .parse()
        .expect("relay address");
    let proxy = Proxy::start(target).await;
    let url = format!("http://127.0.0.1:{}/console/", proxy.port);
    let browser = Browser::start().await;
    let s = browser.session(SessionOptions::laptop()).await;
    log_in(&s, &url, "operator", &w.operator.user.password).await;
    wait_view(&s, "board").await;
    wait_queue_loaded(&s).await;
    wait_queue(&s, &[&c1], PATIENCE).await;

    // The network drops: every connection closed, nothing gets through.
    proxy.set(Mode::Pause);
    proxy.reset();
    s.wait_for_js(
        PATIENCE,
        "the console to notice the drop",
        "return document.getElementById('stream-status').dataset.state !== 'live';",
        vec![],
    )
    .await;
    // Meanwhile, at the relay: c1 is decided elsewhere and a new request comes in.
    w.operator.approve(&c1).await.expect(200);
    let c2 = charge_id(s2.request_charge(2000, "이").await).await;
    assert_eq!(
        queue_ids(&s).await,
        vec![c1.clone()],
        "nothing can arrive yet"
    );

    // The network is back: the stream resumes (Last-Event-ID) and the queue is right.
    proxy.set(Mode::Pass);
    let took = wait_queue(&s, &[&c2], PATIENCE).await;
    println!("queue right {took:?} after the network came back");
    wait_queue_loaded(&s).await;
    // And it stays live: a new request still arrives.
    let s3 = w.api.signup("student_three").await;
    let c3 = charge_id(s3.request_charge(3000, "삼").await).await;
    wait_queue(&s, &[&c2, &c3], PATIENCE).await;
    // The cut requests show as network failures in the console; nothing else may.
    let errors = s.console_errors().await;
    for e in &errors {
        assert!(
            e.source.as_deref() == Some("network") && e.message.contains("net::ERR_"),
            "unexpected console error: {e:#?}"
        );
    }
    s.close_allowing_errors().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_up_a_student_by_prefix_and_grant_after_a_confirm() {
    let w = world("console-lookup", 0).await;
    let park = w.api.signup("park_minji").await;
    w.api.signup("park_jun").await;
    w.api.signup("lee_sora").await;
    park.request_charge(2000, "박민지").await.expect(201);
    let browser = Browser::start().await;
    let s = browser.session(SessionOptions::laptop()).await;
    log_in(&s, &console_url(&w), "operator", &w.operator.user.password).await;
    wait_view(&s, "board").await;

    // A bad prefix is refused in the page, nothing asked.
    type_into(&s, "#lookup-q", "Park-").await;
    s.click("#lookup-button").await;
    s.wait_for_text(PATIENCE, "#lookup-status", |t| t.starts_with("아이디는"))
        .await;
    // By prefix: both park_ accounts, not lee_; points and the pending charge.
    type_into(&s, "#lookup-q", "park").await;
    s.click("#lookup-button").await;
    s.wait_for_js(
        PATIENCE,
        "two results",
        "return document.querySelectorAll('#lookup-results .user').length === 2;",
        vec![],
    )
    .await;
    let row = "#lookup-results [data-username=\"park_minji\"]";
    assert_eq!(
        s.text(&format!("{row} .points")).await.as_deref(),
        Some("0포인트")
    );
    assert_eq!(
        s.text(&format!("{row} .pending")).await.as_deref(),
        Some("대기 중 충전 2,000")
    );
    assert!(
        s.text("#lookup-results [data-username=\"lee_sora\"]")
            .await
            .is_none()
    );
    // Two results: the points history waits for its button (a pending charge is no entry).
    assert_eq!(
        s.attr(&format!("{row} .history"), "hidden")
            .await
            .as_deref(),
        Some("")
    );
    let jun = "#lookup-results [data-username=\"park_jun\"]";
    s.click(&format!("{jun} .history-toggle")).await;
    s.wait_for_text(PATIENCE, &format!("{jun} .history .status"), |t| {
        t == "포인트 내역이 없습니다."
    })
    .await;

    // A grant asks first, naming the student and the amount; cancel grants nothing.
    type_into(&s, &format!("{row} .amount"), "3000").await;
    type_into(&s, &format!("{row} .reason"), "현장 구매").await;
    s.click(&format!("{row} .grant")).await;
    let text = s
        .wait_for_text(PATIENCE, "#grant-dialog-text", |t| !t.is_empty())
        .await;
    assert_eq!(
        text,
        "park_minji에게 3,000포인트를 지급합니다. 사유: 현장 구매"
    );
    assert_eq!(s.attr("#grant-dialog", "open").await.as_deref(), Some(""));
    s.click("#grant-dialog-cancel").await;
    s.wait_for_js(
        PATIENCE,
        "the dialog closed",
        "return !document.getElementById('grant-dialog').open;",
        vec![],
    )
    .await;
    assert_eq!(park.points().await, 0, "cancelled: nothing granted");
    // Confirmed: granted, the result shown, the row refreshed.
    s.click(&format!("{row} .grant")).await;
    s.wait_for_js(
        PATIENCE,
        "the dialog open",
        "return document.getElementById('grant-dialog').open;",
        vec![],
    )
    .await;
    s.click("#grant-dialog-ok").await;
    let msg = s
        .wait_for_text(PATIENCE, "#lookup-status", |t| {
            t.starts_with("지급했습니다")
        })
        .await;
    assert!(msg.contains("park_minji") && msg.contains("3,000"), "{msg}");
    s.wait_for_text(PATIENCE, &format!("{row} .points"), |t| t == "3,000포인트")
        .await;
    assert_eq!(park.points().await, 3000);
    let history = park.get("/api/v1/me/ledger").await.expect(200);
    assert_eq!(history["entries"][0]["reason"], "현장 구매");
    // The grant opens the student's points history on their line: the entry just written,
    // newest first, with the balance after it.
    let entry = format!("{row} .history .ledger .entry:first-child");
    s.wait_for_text(PATIENCE, &format!("{entry} .what"), |t| {
        t == "지급: 현장 구매"
    })
    .await;
    assert_eq!(
        s.text(&format!("{entry} .amount")).await.as_deref(),
        Some("+3,000")
    );
    assert_eq!(
        s.text(&format!("{entry} .after")).await.as_deref(),
        Some("잔액 3,000")
    );
    assert!(
        s.text(&format!("{entry} .when"))
            .await
            .is_some_and(|t| !t.is_empty())
    );
    // A look-up that finds one student shows their history at once.
    type_into(&s, "#lookup-q", "park_m").await;
    s.click("#lookup-button").await;
    s.wait_for_js(
        PATIENCE,
        "one result, its history shown",
        "const rows = document.querySelectorAll('#lookup-results .user'); \
         const what = document.querySelector(arguments[0]); \
         return rows.length === 1 && what !== null && what.textContent === arguments[1];",
        vec![json!(format!("{entry} .what")), json!("지급: 현장 구매")],
    )
    .await;
    s.close().await;
}
