//! The booth console: `GET /console/`, a small single-page app for festival operators, compiled
//! into the relay binary (no CDN, no external fonts: it works offline on the booth laptop).
//!
//! * Plain HTML, CSS and JavaScript, no build step (ARCHITECTURE.md, "Booth console"): the files
//!   here are served as they are, with `include_str!`/`include_bytes!`.
//! * Every string the operator reads is in `i18n/ko.json` or `i18n/en.json` (the same keys,
//!   checked below); the page carries keys only (`data-i18n`) and the script fills them in.
//! * It talks only to the relay's own API (`/api/v1/...`) with the session token in an
//!   `Authorization` header; the token lives in `sessionStorage`, never in a URL.
//! * Strict headers on every file: a content-security-policy that allows nothing inline and
//!   nothing from elsewhere, no framing, no sniffing, no referrer.
//!
//! The router needs no state, so `http::router` merges it with one line.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");
const ICON: &[u8] = include_bytes!("icon.svg");
const KO: &str = include_str!("i18n/ko.json");
const EN: &str = include_str!("i18n/en.json");

/// Only this origin, nothing inline (no `'unsafe-inline'` anywhere), no plugins, no framing,
/// forms post nowhere (the script sends the login itself).
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The console's routes, to be merged into the relay's router. Static files, not API
/// operations: they stay out of the OpenAPI document, so a plain `route` is right here.
#[allow(clippy::disallowed_methods)]
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route(
            "/console/",
            get(|| async { file("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/console/console.js",
            get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/console/console.css",
            get(|| async { file("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/console/icon.svg",
            get(|| async { file("image/svg+xml", ICON) }),
        )
        .route(
            "/console/i18n/ko.json",
            get(|| async { file("application/json", KO) }),
        )
        .route(
            "/console/i18n/en.json",
            get(|| async { file("application/json", EN) }),
        )
}

fn file(content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Small files: always revalidate, so a new relay build is picked up at once.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body.into(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value};
    use std::collections::BTreeSet;

    fn table(text: &str) -> Map<String, Value> {
        match serde_json::from_str(text).expect("a JSON table") {
            Value::Object(m) => m,
            _ => panic!("a table is one JSON object"),
        }
    }

    /// Every `data-i18n*="key"` in the page and every `t("key")` call in the script.
    fn keys_used() -> BTreeSet<String> {
        let mut used = BTreeSet::new();
        for mark in ["data-i18n=\"", "data-i18n-title=\""] {
            for piece in INDEX.split(mark).skip(1) {
                used.insert(piece.split('"').next().unwrap_or_default().to_owned());
            }
        }
        for (i, _) in SCRIPT.match_indices("t(\"") {
            let before = SCRIPT[..i].chars().next_back().unwrap_or(' ');
            if before.is_alphanumeric() || before == '_' || before == '.' {
                continue; // split("…"), Object.assign(…): not the string table
            }
            let rest = &SCRIPT[i + 3..];
            used.insert(rest.split('"').next().unwrap_or_default().to_owned());
        }
        used
    }

    /// ` onclick=`-style attributes: inline handlers the CSP would block.
    fn inline_handlers(html: &str) -> Vec<String> {
        html.match_indices(" on")
            .filter_map(|(i, _)| {
                let name: String = html[i + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase())
                    .collect();
                html[i + 1 + name.len()..].starts_with('=').then_some(name)
            })
            .collect()
    }

    #[test]
    fn both_tables_have_the_same_keys_and_every_used_key() {
        let ko = table(KO);
        let en = table(EN);
        let ko_keys: BTreeSet<_> = ko.keys().cloned().collect();
        let en_keys: BTreeSet<_> = en.keys().cloned().collect();
        assert_eq!(ko_keys, en_keys, "ko.json and en.json differ in keys");
        for (k, v) in ko.iter().chain(en.iter()) {
            assert!(
                v.as_str().is_some_and(|s| !s.trim().is_empty()),
                "{k}: every string is a non-empty string"
            );
        }
        let used = keys_used();
        assert!(used.len() > 20, "the key scan found too little: {used:?}");
        let missing: Vec<_> = used.difference(&ko_keys).collect();
        assert!(
            missing.is_empty(),
            "keys used but not in the tables: {missing:?}"
        );
    }

    #[test]
    fn nothing_inline_and_nothing_external() {
        // The CSP would block these; catch them before a browser does.
        assert!(!INDEX.contains("<script>"), "inline script");
        assert!(!INDEX.contains("<style"), "inline style");
        assert!(!INDEX.contains(" style="), "style attribute");
        assert_eq!(
            inline_handlers(INDEX),
            Vec::<String>::new(),
            "inline handlers"
        );
        assert_eq!(
            inline_handlers("<a onclick=\"x\">"),
            vec!["onclick".to_owned()]
        );
        for text in [INDEX, SCRIPT, STYLE] {
            assert!(!text.contains("http://"), "an external address");
            assert!(!text.contains("https://"), "an external address");
        }
        // The token never goes into a URL or into localStorage.
        assert!(!SCRIPT.contains("?token"), "token in a URL");
        assert!(!SCRIPT.contains("localStorage.setItem(\"token"));
        assert!(!CSP.contains("unsafe"));
    }
}
