//! The staff status page: `GET /status` for a browser (an `Accept` with `text/html`), the
//! refresh its script fetches (`GET /status/view`), and the page's files.
//!
//! * First paint is rendered here from [`view::build`], so it works without JavaScript.
//! * The script (`assets/status.js`, served as a file: the content-security-policy allows no
//!   inline script) fetches `/status/view` every 2 s: the same [`view::View`] as JSON, in the
//!   page's language, and only swaps its strings in.
//! * Language: [`i18n::choose`]. The switch is a plain link (`?lang=en`), which works without
//!   JavaScript and sets a `lang` cookie for a year, so the choice persists.
//! * Nothing external: the CSS, the script and the icon are compiled into the binary
//!   (`include_str!`); the fonts are the system's.
//!
//! The HTML is small and written with `format!` and [`escape`] (every text that reaches it is
//! escaped, tested below) rather than a template engine: one page does not pay for a
//! proc-macro dependency in the appliance's build.

use std::fmt::Write as _;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use super::i18n::{self, Lang};
use super::view::{self, View};

const SCRIPT: &str = include_str!("assets/status.js");
const STYLE: &str = include_str!("assets/status.css");
const ICON: &str = include_str!("assets/icon.svg");

/// No inline script or style, nothing from elsewhere, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// How long the `lang` cookie keeps the choice.
const LANG_COOKIE_MAX_AGE_S: u64 = 365 * 24 * 3600;

/// The page's files and `/` (a redirect to the page: staff type the bare address), merged into
/// the status router; they need no state.
pub fn asset_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/status") }))
        .route(
            "/assets/status.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/assets/status.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/assets/icon.svg",
            get(|| async { asset("image/svg+xml", ICON) }),
        )
        .route(
            "/favicon.ico",
            get(|| async { asset("image/svg+xml", ICON) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// The `?lang=` parameter of the page and of `/status/view`.
#[derive(Debug, Default, Deserialize)]
pub struct LangParam {
    pub lang: Option<String>,
}

impl LangParam {
    /// The explicit language; a language we do not have is refused.
    pub fn parse(&self) -> Result<Option<Lang>, BadLang> {
        match self.lang.as_deref() {
            None => Ok(None),
            Some(raw) => Lang::parse(raw).map(Some).ok_or(BadLang),
        }
    }
}

/// `?lang=` named a language we do not have: 400 `validation_failed` on the field `lang`.
#[derive(Debug, PartialEq, Eq)]
pub struct BadLang;

impl IntoResponse for BadLang {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": {
                "code": "validation_failed",
                "message": "lang must be \"ko\" or \"en\"",
                "field": "lang",
            }})),
        )
            .into_response()
    }
}

/// Does this request want the page rather than the JSON?
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

fn request_lang(explicit: Option<Lang>, headers: &HeaderMap) -> Lang {
    let h = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    i18n::choose(explicit, h(header::COOKIE), h(header::ACCEPT_LANGUAGE))
}

/// `GET /status` for a browser: the page, first paint included.
pub fn page(doc: &Value, headers: &HeaderMap, param: &LangParam) -> Response {
    let explicit = match param.parse() {
        Ok(l) => l,
        Err(bad) => return bad.into_response(),
    };
    let lang = request_lang(explicit, headers);
    let html = render(&view::build(doc, lang), doc);
    let mut resp = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::VARY, "Accept, Accept-Language, Cookie"),
        ],
        html,
    )
        .into_response();
    if let Some(lang) = explicit {
        let cookie = format!(
            "lang={}; Path=/; Max-Age={LANG_COOKIE_MAX_AGE_S}; SameSite=Lax",
            lang.code()
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

/// `GET /status/view`: the page's words as JSON, for its script.
pub fn view_json(doc: &Value, headers: &HeaderMap, param: &LangParam) -> Response {
    let explicit = match param.parse() {
        Ok(l) => l,
        Err(bad) => return bad.into_response(),
    };
    let lang = request_lang(explicit, headers);
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(view::build(doc, lang)),
    )
        .into_response()
}

/// Escapes text for HTML element content and double-quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page for `v` (`doc` gives the appliance id for the header).
pub fn render(v: &View, doc: &Value) -> String {
    let s = v.lang.strings();
    let e = escape;
    let id = doc["appliance_id"].as_str().unwrap_or("");
    let brand = format!("{} {id}", s.page_title);
    let no_answer = view::no_answer(s);
    let other = v.lang.other();

    let mut facts = String::new();
    for f in &v.facts {
        let _ = write!(
            facts,
            "<div class=\"fact\" data-fact=\"{}\"><dt>{}</dt><dd>{}</dd></div>",
            e(f.id),
            e(f.label),
            e(&f.value)
        );
    }
    let mut details = String::new();
    for d in &v.details {
        let _ = write!(
            details,
            "<div><dt>{}</dt><dd>{}</dd></div>",
            e(&d.key),
            e(&d.value)
        );
    }
    format!(
        "<!doctype html>\n<html lang=\"{lang}\">\n<head>\n<meta charset=\"utf-8\">\n\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
<title>{title} · {brand}</title>\n\
<link rel=\"icon\" href=\"/assets/icon.svg\" type=\"image/svg+xml\">\n\
<link rel=\"stylesheet\" href=\"/assets/status.css\">\n\
<script src=\"/assets/status.js\" defer></script>\n</head>\n\
<body data-brand=\"{brand}\">\n\
<header class=\"top\"><span class=\"brand\">{page_title} <span class=\"id\">{id}</span></span>\
<a class=\"lang\" id=\"lang-switch\" href=\"/status?lang={other}\" hreflang=\"{other}\" lang=\"{other}\">{switch_to}</a></header>\n\
<main>\n\
<section id=\"verdict\" class=\"verdict v-{state}\" data-state=\"{state}\" role=\"status\" aria-live=\"polite\" \
data-no-answer-title=\"{na_title}\" data-no-answer-action=\"{na_action}\">\
<h1 id=\"verdict-title\">{title}</h1><p id=\"verdict-action\">{action}</p></section>\n\
<dl id=\"facts\" class=\"facts\">{facts}</dl>\n\
<details id=\"details\"><summary>{details_label}</summary><dl id=\"details-list\" class=\"details\">{details}</dl></details>\n\
<p class=\"note\">{refresh_note} <span id=\"updated\" data-label=\"{last_update}\"></span></p>\n\
</main>\n</body>\n</html>\n",
        lang = v.lang.code(),
        title = e(&v.verdict.title),
        brand = e(&brand),
        page_title = e(s.page_title),
        id = e(id),
        other = other.code(),
        switch_to = e(s.switch_to),
        state = e(&v.verdict.state),
        na_title = e(&no_answer.title),
        na_action = e(&no_answer.action),
        action = e(&v.verdict.action),
        details_label = e(s.details),
        refresh_note = e(s.refresh_note),
        last_update = e(s.last_update),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        json!({"appliance_id": "edge-1", "ready": true, "broker_connected": true, "count": 12,
               "last_error": "<script>alert(1)</script>", "version": "0.1.0",
               "verdict": {"state": "ready", "behind": null, "reason": null,
                           "action": "safe_to_reboot"}})
    }

    #[test]
    fn renders_the_verdict_first_and_escapes_everything() {
        let html = render(&view::build(&doc(), Lang::Ko), &doc());
        assert!(html.starts_with("<!doctype html>\n<html lang=\"ko\">"));
        let verdict = html.find("id=\"verdict\"").unwrap();
        let facts = html.find("id=\"facts\"").unwrap();
        assert!(verdict < facts, "the verdict comes first");
        assert!(html.contains("class=\"verdict v-ready\""));
        assert!(html.contains("<h1 id=\"verdict-title\">정상 — 매칭 처리 중</h1>"));
        assert!(html.contains("<dd>12명</dd>"));
        assert!(
            !html.contains("<script>alert"),
            "unescaped text in the page"
        );
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("href=\"/status?lang=en\""));
        // No inline script or style: the CSP would block them.
        assert_eq!(html.matches("<script").count(), 1);
        assert!(html.contains("<script src=\"/assets/status.js\" defer></script>"));
        assert!(!html.contains("style="));
        assert!(!html.contains("<style"));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "external asset"
        );
    }

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&#39;");
        assert_eq!(escape("한국어"), "한국어");
    }

    #[test]
    fn the_switch_sets_a_cookie_and_bad_languages_are_refused() {
        let headers = HeaderMap::new();
        let resp = page(
            &doc(),
            &headers,
            &LangParam {
                lang: Some("en".into()),
            },
        );
        assert_eq!(resp.status(), StatusCode::OK);
        let cookie = resp.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(cookie.starts_with("lang=en; Path=/; Max-Age="), "{cookie}");
        assert_eq!(resp.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        assert_eq!(resp.headers()[header::X_FRAME_OPTIONS], "DENY");

        let plain = page(&doc(), &headers, &LangParam::default());
        assert!(plain.headers().get(header::SET_COOKIE).is_none());

        let bad = page(
            &doc(),
            &headers,
            &LangParam {
                lang: Some("fr".into()),
            },
        );
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    }
}
