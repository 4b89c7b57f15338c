//! Real-browser tests: Debian's headless Chromium driven over WebDriver (`chromedriver`) with
//! [`fantoccini`]. Reusable by any page test (the appliance's status page, the relay's booth
//! console).
//!
//! * [`Browser::start`] — a `chromedriver` of the test's own on a free port, in a process group
//!   of its own; dropping the [`Browser`] ends that group (chromedriver and every Chromium it
//!   started), so a failed test leaves no browser behind.
//! * [`Browser::session`] — a fresh Chromium (its own temp profile) with the flags that work on
//!   this machine, a viewport of exactly the asked size (device-metrics emulation, so a phone
//!   width is the page's layout width, as on a phone), a chosen `Accept-Language`.
//! * [`Session`] — navigation, text/attribute/JS helpers, waiting on a condition with a deadline
//!   ([`Session::wait_for_js`]), the browser console ([`Session::console_errors`],
//!   [`Session::close`] fails the test on any console error), the layout check
//!   [`Session::overflow`] (every element wider than or sticking out of the viewport, measured
//!   in the browser), and screenshots ([`Session::screenshot_full_page`]).
//!
//! Chromium and chromedriver come from Debian (`scripts/browser.sh` installs them; NOTES.md:
//! Playwright/puppeteer cannot download browsers here). Override the paths with
//! `COMATCHING_CHROMEDRIVER` / `COMATCHING_CHROMIUM`.
//!
//! WebDriver itself has no console log or viewport emulation; chromedriver's extensions do:
//! `POST /session/{id}/se/log` (the browser log, with `goog:loggingPrefs`) and
//! `POST /session/{id}/goog/cdp/execute` (a DevTools command). They are sent as
//! [`fantoccini::wd::WebDriverCompatibleCommand`]s.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::PATIENCE;
use crate::relay::free_port;

pub const CHROMEDRIVER_ENV: &str = "COMATCHING_CHROMEDRIVER";
pub const CHROMIUM_ENV: &str = "COMATCHING_CHROMIUM";

/// Flags measured to work on this machine (root, no GPU, no network, no D-Bus).
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
];

fn chromedriver_path() -> PathBuf {
    std::env::var_os(CHROMEDRIVER_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"))
}

/// The real binary, not Debian's `/usr/bin/chromium` wrapper script (which only adds flags
/// from /etc/chromium.d that a test does not want).
fn chromium_path() -> PathBuf {
    if let Some(p) = std::env::var_os(CHROMIUM_ENV) {
        return PathBuf::from(p);
    }
    let real = Path::new("/usr/lib/chromium/chromium");
    if real.exists() {
        real.to_path_buf()
    } else {
        PathBuf::from("/usr/bin/chromium")
    }
}

/// A chromedriver of this test's own. Each [`Session`] is a separate Chromium.
pub struct Browser {
    driver: Child,
    url: String,
    dir: tempfile::TempDir,
}

/// How a session's browser looks to the page.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// The viewport (CSS pixels, device scale 1).
    pub width: u32,
    pub height: u32,
    /// Emulate a phone: the page's `<meta name=viewport>` applies, as on a real phone.
    pub mobile: bool,
    /// The browser's language list, e.g. `ko-KR,ko` (sent as `Accept-Language`).
    pub accept_language: String,
}

impl SessionOptions {
    /// A phone `width` wide (360 or 390), 800 tall.
    pub fn phone(width: u32) -> SessionOptions {
        SessionOptions {
            width,
            height: 800,
            mobile: true,
            accept_language: "ko-KR,ko".into(),
        }
    }

    /// A 1366×768 laptop.
    pub fn laptop() -> SessionOptions {
        SessionOptions {
            width: 1366,
            height: 768,
            mobile: false,
            accept_language: "ko-KR,ko".into(),
        }
    }

    pub fn language(mut self, accept_language: &str) -> SessionOptions {
        self.accept_language = accept_language.into();
        self
    }
}

impl Browser {
    /// Starts chromedriver on a free port and waits until it is ready. Panics, naming the
    /// install script, when chromedriver or Chromium is missing.
    pub async fn start() -> Browser {
        let driver_bin = chromedriver_path();
        for bin in [driver_bin.clone(), chromium_path()] {
            assert!(
                bin.exists(),
                "{} is missing: run scripts/browser.sh (installs chromium, chromium-driver, \
                 fonts-noto-cjk)",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("comatching-browser-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let log = dir.path().join("chromedriver.log");
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that Drop can end it with every browser it started.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver_bin.display()));
        let url = format!("http://127.0.0.1:{port}");
        let b = Browser { driver, url, dir };
        let http = crate::api::http_client(None);
        let status = format!("{}/status", b.url);
        crate::wait_until(PATIENCE, "chromedriver to be ready", || {
            let (http, status) = (http.clone(), status.clone());
            async move {
                let Ok(r) = http.get(&status).send().await else {
                    return false;
                };
                r.json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true)
            }
        })
        .await;
        b
    }

    /// A fresh Chromium with its own profile, sized and with the language of `opts`.
    pub async fn session(&self, opts: SessionOptions) -> Session {
        let profile = tempfile::Builder::new()
            .prefix("profile-")
            .tempdir_in(self.dir.path())
            .expect("profile dir");
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.push(format!("--window-size={},{}", opts.width, opts.height));
        args.push(format!(
            "--lang={}",
            opts.accept_language.split(',').next().unwrap_or("ko")
        ));
        let caps = json!({
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium_path(),
                "args": args,
                "prefs": {"intl.accept_languages": opts.accept_language},
            },
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!("an object literal"),
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("new WebDriver session: {e}\n{}", self.log_tail()));
        let s = Session {
            client,
            _profile: profile,
            log: Mutex::new(Vec::new()),
        };
        s.set_viewport(opts.width, opts.height, opts.mobile).await;
        s
    }

    /// The end of chromedriver's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group is chromedriver's (process_group(0) above): SIGTERM lets Chromium shut down
        // cleanly (its crash handlers exit with it); SIGKILL whatever is left after a moment.
        let pgid = self.driver.id() as i32;
        // SAFETY: kill(2) on the process group this harness created.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if matches!(self.driver.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; browsers that outlived chromedriver are still in its group.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

/// One entry of the browser console.
#[derive(Clone, Debug, Deserialize)]
pub struct LogEntry {
    pub level: String,
    pub message: String,
    #[serde(default)]
    pub source: Option<String>,
}

/// What [`Session::overflow`] measured.
#[derive(Clone, Debug, Deserialize)]
pub struct Overflow {
    /// `window.innerWidth`: grows past the viewport on a phone when the page is too wide.
    pub inner_width: f64,
    /// The layout viewport (`documentElement.clientWidth`).
    pub client_width: f64,
    /// `documentElement.scrollWidth`: more than `client_width` means a horizontal scroll.
    pub scroll_width: f64,
    /// Visible elements wider than the viewport or sticking out of it.
    pub offenders: Vec<Value>,
}

impl Overflow {
    pub fn fits(&self, width: u32) -> bool {
        let w = f64::from(width);
        self.offenders.is_empty()
            && self.inner_width <= w
            && self.client_width <= w
            && self.scroll_width <= self.client_width
    }
}

/// One browser (one Chromium) in a test.
pub struct Session {
    client: Client,
    _profile: tempfile::TempDir,
    /// Console entries read so far (reading the log drains it in the browser).
    log: Mutex<Vec<LogEntry>>,
}

impl Session {
    /// The fantoccini client, for anything the helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    pub async fn refresh(&self) {
        self.client.refresh().await.expect("reload");
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) and returns its value.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// `textContent` of the first element matching `css` (trimmed), or None when none does.
    pub async fn text(&self, css: &str) -> Option<String> {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]); \
                 return e ? e.textContent.trim() : null;",
                vec![json!(css)],
            )
            .await;
        v.as_str().map(str::to_owned)
    }

    /// An attribute of the first element matching `css`.
    pub async fn attr(&self, css: &str, name: &str) -> Option<String> {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]); \
                 return e ? e.getAttribute(arguments[1]) : null;",
                vec![json!(css), json!(name)],
            )
            .await;
        v.as_str().map(str::to_owned)
    }

    /// Clicks the first element matching `css`.
    pub async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element {css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Waits until `script` (a function body) returns something other than null/false/undefined
    /// and returns it; panics naming `what` after `timeout`.
    pub async fn wait_for_js(
        &self,
        timeout: Duration,
        what: &str,
        script: &str,
        args: Vec<Value>,
    ) -> Value {
        crate::wait_for(timeout, what, || {
            let args = args.clone();
            async move {
                let v = self.js(script, args).await;
                (!matches!(v, Value::Null | Value::Bool(false))).then_some(v)
            }
        })
        .await
    }

    /// Waits until the text of `css` satisfies `pred`; returns it.
    pub async fn wait_for_text(
        &self,
        timeout: Duration,
        css: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let t = self.text(css).await;
            if let Some(t) = t.as_deref().filter(|t| pred(t)) {
                return t.to_owned();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for the text of {css}; last: {t:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sets the viewport to exactly `width`×`height` CSS pixels at device scale 1 (DevTools
    /// device-metrics emulation: window sizes include browser chrome, this does not).
    pub async fn set_viewport(&self, width: u32, height: u32, mobile: bool) {
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }

    /// Sends one DevTools command through chromedriver.
    pub async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.client
            .issue_cmd(Extension::Cdp {
                cmd: cmd.to_owned(),
                params,
            })
            .await
            .unwrap_or_else(|e| panic!("DevTools {cmd}: {e}"))
    }

    /// Every console entry since the session started (warnings included).
    pub async fn console(&self) -> Vec<LogEntry> {
        let fresh = self
            .client
            .issue_cmd(Extension::BrowserLog)
            .await
            .expect("read the browser log");
        let fresh: Vec<LogEntry> = serde_json::from_value(fresh).expect("log entries");
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.extend(fresh);
        log.clone()
    }

    /// Console errors (level SEVERE: script errors, `console.error`, failed loads, CSP
    /// violations) since the session started.
    pub async fn console_errors(&self) -> Vec<LogEntry> {
        self.console()
            .await
            .into_iter()
            .filter(|e| e.level == "SEVERE")
            .collect()
    }

    /// Panics listing the console errors, if there are any.
    pub async fn assert_no_console_errors(&self) {
        let errors = self.console_errors().await;
        assert!(errors.is_empty(), "console errors: {errors:#?}");
    }

    /// Measures, in the browser, whether anything is wider than the viewport or sticks out of
    /// it (elements with no box — hidden — are skipped).
    pub async fn overflow(&self) -> Overflow {
        let v = self
            .js(
                r#"
const de = document.documentElement;
const vw = de.clientWidth;
const offenders = [];
for (const e of document.querySelectorAll("body *")) {
  const r = e.getBoundingClientRect();
  if (r.width === 0 && r.height === 0) continue;
  if (r.width > vw + 0.5 || r.right > vw + 0.5 || r.left < -0.5) {
    offenders.push({tag: e.tagName.toLowerCase(), id: e.id, class: String(e.className),
                    left: r.left, right: r.right, width: r.width,
                    text: (e.textContent || "").trim().slice(0, 60)});
  }
}
return {inner_width: window.innerWidth, client_width: vw, scroll_width: de.scrollWidth,
        offenders};
"#,
                vec![],
            )
            .await;
        serde_json::from_value(v).expect("overflow report")
    }

    /// A PNG of the whole page at the current viewport width: the viewport is stretched to the
    /// page's height for the shot and put back after.
    pub async fn screenshot_full_page(&self, width: u32, mobile: bool) -> Vec<u8> {
        let height = self
            .js(
                "return Math.ceil(Math.max(document.documentElement.scrollHeight, \
                 document.body ? document.body.scrollHeight : 0));",
                vec![],
            )
            .await
            .as_u64()
            .unwrap_or(800)
            .clamp(200, 4000) as u32;
        self.set_viewport(width, height, mobile).await;
        let png = self.client.screenshot().await.expect("screenshot");
        self.set_viewport(width, height.min(800), mobile).await;
        png
    }

    /// Ends the browser after checking the console: panics on any console error.
    pub async fn close(self) {
        self.assert_no_console_errors().await;
        self.close_allowing_errors().await;
    }

    /// Ends the browser without looking at the console.
    pub async fn close_allowing_errors(self) {
        let _ = self.client.close().await;
    }
}

/// Width and height of a PNG (from its IHDR chunk).
pub fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&png[16..20]), be(&png[20..24])))
}

/// chromedriver's non-standard commands.
#[derive(Debug)]
enum Extension {
    /// `POST /session/{id}/se/log {"type": "browser"}`: the console since the last read.
    BrowserLog,
    /// `POST /session/{id}/goog/cdp/execute {cmd, params}`.
    Cdp { cmd: String, params: Value },
}

impl WebDriverCompatibleCommand for Extension {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        let id = session_id.unwrap_or_default();
        match self {
            Extension::BrowserLog => base_url.join(&format!("session/{id}/se/log")),
            Extension::Cdp { .. } => base_url.join(&format!("session/{id}/goog/cdp/execute")),
        }
    }

    fn method_and_body(&self, _url: &url::Url) -> (http::Method, Option<String>) {
        let body = match self {
            Extension::BrowserLog => json!({"type": "browser"}),
            Extension::Cdp { cmd, params } => json!({"cmd": cmd, "params": params}),
        };
        (http::Method::POST, Some(body.to_string()))
    }
}
