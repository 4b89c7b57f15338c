//! What staff see, in words: the verdict, the facts and the technical details of a `/status`
//! document in one language. Pure (document + language in, [`View`] out).
//!
//! The one renderer behind every staff view: the page's server-rendered first paint
//! (`status_page`), the page's refresh every 2 s (the script fetches this view as JSON from
//! `/status/view` and only puts its strings into the page, so it holds no words and no
//! formatting of its own), and `comatching-appliance status` / `status --watch`
//! (`status_text`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::i18n::{self, Lang, Strings, fill};
use super::verdict::{self, Action, Reason, State, StatusView, Verdict};

/// The staff view of one status document.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct View {
    pub lang: Lang,
    pub verdict: VerdictText,
    pub facts: Vec<Fact>,
    /// Every other field of the document, flattened to `a.b.c` keys, for the collapsed
    /// technical section (fields added to `/status` later show up here by themselves).
    pub details: Vec<Detail>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VerdictText {
    /// The verdict state (`ready`, `catching_up`, …) or `no_answer`: the page's colour.
    pub state: String,
    pub title: String,
    pub action: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Fact {
    /// Stable id (`students`, `in_step`, …): the page's `data-fact`.
    pub id: &'static str,
    pub label: &'static str,
    pub value: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Detail {
    pub key: String,
    pub value: String,
}

/// The verdict the document carries (computed once on the appliance); computed from the
/// document only when it has none (an appliance older than the field).
pub fn verdict_of(doc: &Value) -> Verdict {
    serde_json::from_value(doc["verdict"].clone())
        .unwrap_or_else(|_| verdict::verdict(&StatusView::from_doc(doc)))
}

/// The words for a verdict.
pub fn verdict_text(s: &Strings, v: &Verdict) -> VerdictText {
    let title = match v.state {
        State::Ready => s.ready.to_owned(),
        State::CatchingUp => match v.behind {
            Some(n) => fill(s.catching_up_n, &[("n", &i18n::count(n))]),
            None => s.catching_up.to_owned(),
        },
        State::NotServing => {
            let reason = match v.reason {
                Some(Reason::StoreUnavailable) => s.reason_store_unavailable,
                Some(Reason::Stuck) => s.reason_stuck,
                Some(Reason::RelaySilent) => s.reason_relay_silent,
                None => s.unknown,
            };
            fill(s.not_serving, &[("reason", reason)])
        }
        State::BrokerUnreachable => s.broker_unreachable.to_owned(),
        State::ReplicaDamaged => s.replica_damaged.to_owned(),
    };
    let action = match v.action {
        Action::SafeToReboot => s.action_safe_to_reboot,
        Action::Wait => s.action_wait,
        Action::CheckNetwork => s.action_check_network,
        Action::CheckDisk => s.action_check_disk,
        Action::TellRelayOperator => s.action_tell_relay_operator,
    };
    let state = serde_json::to_value(v.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    VerdictText {
        state,
        title,
        action: action.to_owned(),
    }
}

/// The verdict shown when the appliance does not answer at all (by the page's script and the
/// CLI: the appliance cannot say it about itself).
pub fn no_answer(s: &Strings) -> VerdictText {
    VerdictText {
        state: "no_answer".into(),
        title: s.no_answer.into(),
        action: s.action_no_answer.into(),
    }
}

/// Builds the view of `doc` in `lang`.
pub fn build(doc: &Value, lang: Lang) -> View {
    let s = lang.strings();
    let v = verdict_of(doc);
    View {
        lang,
        verdict: verdict_text(s, &v),
        facts: facts(doc, s, &v),
        details: details(doc),
    }
}

fn facts(doc: &Value, s: &Strings, v: &Verdict) -> Vec<Fact> {
    let u = |key: &str| doc[key].as_u64();
    let unknown = || s.unknown.to_owned();
    let n_of = |template: &str, n: Option<u64>| {
        n.map(|n| fill(template, &[("n", &i18n::count(n))]))
            .unwrap_or_else(unknown)
    };
    let ago = |secs: Option<u64>| match secs {
        Some(secs) => fill(s.ago, &[("age", &i18n::duration(s, secs))]),
        None => s.none_since_start.to_owned(),
    };
    let sync = &doc["sync"];
    let in_step = match u("lag") {
        _ if v.state == State::Ready => s.yes.to_owned(),
        Some(n) if n > 0 => fill(s.behind_n, &[("n", &i18n::count(n))]),
        Some(_)
            if doc["broker_connected"] == Value::Bool(true)
                && sync["hello_acked"] == Value::Bool(true)
                && sync["gap"].is_null()
                && sync["snapshot_in_progress"].is_null() =>
        {
            s.yes.to_owned()
        }
        _ => unknown(),
    };
    let broker = match doc["broker_connected"].as_bool() {
        Some(true) => s.connected.to_owned(),
        Some(false) => s.disconnected.to_owned(),
        None => unknown(),
    };
    let host = &doc["host"];
    let b = |key: &str| host[key].as_u64().map(i18n::bytes);
    let disk = match (b("disk_free_bytes"), b("disk_total_bytes")) {
        (Some(free), Some(total)) => fill(s.disk_value, &[("free", &free), ("total", &total)]),
        _ => unknown(),
    };
    let memory = match (
        b("rss_bytes"),
        b("mem_available_bytes"),
        b("mem_total_bytes"),
    ) {
        (Some(rss), Some(avail), Some(total)) => fill(
            s.memory_value,
            &[("rss", &rss), ("avail", &avail), ("total", &total)],
        ),
        _ => unknown(),
    };
    let text = |key: &str| doc[key].as_str().map(str::to_owned).unwrap_or_else(unknown);
    vec![
        Fact {
            id: "students",
            label: s.fact_students,
            value: n_of(s.students_n, u("count")),
        },
        Fact {
            id: "in_step",
            label: s.fact_in_step,
            value: in_step,
        },
        Fact {
            id: "last_change",
            label: s.fact_last_change,
            value: ago(sync["last_applied_age_s"].as_u64()),
        },
        Fact {
            id: "matches_minute",
            label: s.fact_matches_minute,
            value: n_of(s.matches_n, doc["matches"]["last_minute"].as_u64()),
        },
        Fact {
            id: "matches_total",
            label: s.fact_matches_total,
            value: n_of(s.matches_n, doc["matches"]["answered"].as_u64()),
        },
        Fact {
            id: "broker",
            label: s.fact_broker,
            value: broker,
        },
        Fact {
            id: "tailscale",
            label: s.fact_tailscale,
            value: tailscale(s, &doc["tailscale"]),
        },
        Fact {
            id: "disk",
            label: s.fact_disk,
            value: disk,
        },
        Fact {
            id: "memory",
            label: s.fact_memory,
            value: memory,
        },
        Fact {
            id: "uptime",
            label: s.fact_uptime,
            value: u("uptime_s")
                .map(|t| i18n::duration(s, t))
                .unwrap_or_else(unknown),
        },
        Fact {
            id: "id",
            label: s.fact_id,
            value: text("appliance_id"),
        },
        Fact {
            id: "version",
            label: s.fact_version,
            value: text("version"),
        },
    ]
}

/// The tailscale probe's JSON (`crate::tailscale::TailscaleReport`) in words.
fn tailscale(s: &Strings, ts: &Value) -> String {
    match ts["state"].as_str() {
        Some("up") => {
            let detail = &ts["detail"];
            let name = detail["hostname"]
                .as_str()
                .filter(|h| !h.is_empty())
                .or_else(|| detail["ips"][0].as_str())
                .unwrap_or("?");
            fill(s.ts_up, &[("name", name)])
        }
        Some("starting") => s.ts_starting.into(),
        Some("needs_login") => s.ts_needs_login.into(),
        Some("needs_approval") => s.ts_needs_approval.into(),
        Some("stopped") => s.ts_stopped.into(),
        Some("daemon_down") => s.ts_daemon_down.into(),
        Some("cli_missing") => s.ts_cli_missing.into(),
        Some("timeout") => s.ts_timeout.into(),
        Some("error") => match ts["detail"].as_str() {
            Some(d) => format!("{}: {d}", s.ts_error),
            None => s.ts_error.into(),
        },
        _ => s.ts_checking.into(),
    }
}

/// The document flattened to `a.b.c = value` lines, in document order, without the verdict
/// (shown above) and the host facts (shown as facts).
fn details(doc: &Value) -> Vec<Detail> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<Detail>) {
        match v {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => out.push(Detail {
                key: prefix.to_owned(),
                value: match other {
                    Value::String(s) => s.clone(),
                    Value::Null => "-".to_owned(),
                    v => v.to_string(),
                },
            }),
        }
    }
    let mut out = Vec::new();
    if let Value::Object(map) = doc {
        for (k, v) in map {
            if k != "verdict" && k != "host" {
                walk(k, v, &mut out);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ready_doc() -> Value {
        json!({
            "appliance_id": "edge-1", "version": "0.1.0", "count": 1234, "lag": 0,
            "ready": true, "broker_connected": true, "applied_seq": 9, "relay_seq": 9,
            "digest": "ab12", "uptime_s": 3725,
            "sync": {"hello_acked": true, "gap": null, "snapshot_in_progress": null,
                     "last_applied_age_s": 75},
            "matches": {"answered": 5678, "expired": 0, "last_minute": 34},
            "tailscale": {"state": "up", "detail": {"ips": ["100.64.0.7"], "hostname": "edge"},
                          "health": []},
            "host": {"disk_free_bytes": 12_300_000_000u64, "disk_total_bytes": 31_000_000_000u64,
                     "mem_total_bytes": 3_800_000_000u64, "mem_available_bytes": 1_200_000_000u64,
                     "rss_bytes": 45_000_000},
            "verdict": {"state": "ready", "behind": null, "reason": null, "action": "safe_to_reboot"},
        })
    }

    fn fact(v: &View, id: &str) -> String {
        v.facts
            .iter()
            .find(|f| f.id == id)
            .unwrap_or_else(|| panic!("no fact {id}"))
            .value
            .replace('\u{a0}', " ")
    }

    #[test]
    fn a_ready_box_in_both_languages() {
        let en = build(&ready_doc(), Lang::En);
        assert_eq!(en.verdict.state, "ready");
        assert_eq!(en.verdict.title, "Ready — serving matches");
        assert_eq!(en.verdict.action, "Nothing to do. Safe to reboot.");
        assert_eq!(fact(&en, "students"), "1,234");
        assert_eq!(fact(&en, "in_step"), "yes");
        assert_eq!(fact(&en, "last_change"), "1 min ago");
        assert_eq!(fact(&en, "matches_minute"), "34");
        assert_eq!(fact(&en, "matches_total"), "5,678");
        assert_eq!(fact(&en, "broker"), "connected");
        assert_eq!(fact(&en, "tailscale"), "connected as edge");
        assert_eq!(fact(&en, "disk"), "12.3 GB free of 31.0 GB");
        assert_eq!(
            fact(&en, "memory"),
            "appliance uses 45.0 MB; 1.20 GB free of 3.80 GB"
        );
        assert_eq!(fact(&en, "uptime"), "1 h 2 min");
        assert_eq!(fact(&en, "id"), "edge-1");
        assert_eq!(fact(&en, "version"), "0.1.0");

        let ko = build(&ready_doc(), Lang::Ko);
        assert_eq!(ko.verdict.title, "정상 — 매칭 처리 중");
        assert_eq!(fact(&ko, "students"), "1,234명");
        assert_eq!(fact(&ko, "last_change"), "1분 전");
        // Same facts, same order, in both.
        let ids = |v: &View| v.facts.iter().map(|f| f.id).collect::<Vec<_>>();
        assert_eq!(ids(&en), ids(&ko));
        for f in en.facts.iter().chain(&ko.facts) {
            assert!(!f.value.contains('{'), "unfilled placeholder in {f:?}");
        }
    }

    #[test]
    fn the_verdict_comes_from_the_document() {
        let mut doc = ready_doc();
        doc["verdict"] = json!({"state": "catching_up", "behind": 1200, "reason": null,
                                "action": "wait"});
        let v = build(&doc, Lang::En);
        assert_eq!(v.verdict.state, "catching_up");
        assert_eq!(v.verdict.title, "Catching up (1,200 changes behind)");
        assert_eq!(
            v.verdict.action,
            "Nothing to do: it heals by itself within a minute."
        );
        // Without a verdict field: computed from the rest (ready here).
        doc.as_object_mut().unwrap().remove("verdict");
        assert_eq!(build(&doc, Lang::En).verdict.state, "ready");
    }

    #[test]
    fn a_disconnected_box() {
        let mut doc = ready_doc();
        doc["ready"] = json!(false);
        doc["broker_connected"] = json!(false);
        doc["sync"]["hello_acked"] = json!(false);
        doc["sync"]["last_applied_age_s"] = Value::Null;
        doc["tailscale"] = json!({"state": "cli_missing", "health": []});
        doc.as_object_mut().unwrap().remove("verdict");
        let v = build(&doc, Lang::En);
        assert_eq!(v.verdict.state, "broker_unreachable");
        assert_eq!(v.verdict.title, "Broker unreachable");
        assert!(v.verdict.action.starts_with("Check the network cable"));
        assert_eq!(fact(&v, "broker"), "disconnected");
        assert_eq!(fact(&v, "in_step"), "unknown");
        assert_eq!(fact(&v, "last_change"), "none since start");
        assert_eq!(fact(&v, "tailscale"), "not installed");
        let ko = build(&doc, Lang::Ko);
        assert_eq!(ko.verdict.title, "브로커에 연결할 수 없음");
    }

    #[test]
    fn every_verdict_has_words_in_both_languages() {
        use crate::node::verdict::verdict;
        let views = [
            StatusView {
                ready: true,
                ..Default::default()
            },
            StatusView::default(),
            StatusView {
                broker_connected: true,
                lag: 3,
                ..Default::default()
            },
            StatusView {
                broker_connected: true,
                ..Default::default()
            },
            StatusView {
                broker_connected: true,
                replica_damaged: true,
                ..Default::default()
            },
            StatusView {
                stuck_seq: Some(1),
                ..Default::default()
            },
            StatusView {
                store_unavailable: true,
                ..Default::default()
            },
            StatusView {
                broker_connected: true,
                relay_silent_s: Some(999),
                ..Default::default()
            },
        ];
        let mut titles = std::collections::BTreeSet::new();
        for lang in [Lang::Ko, Lang::En] {
            for sv in &views {
                let t = verdict_text(lang.strings(), &verdict(sv));
                assert!(!t.title.is_empty() && !t.action.is_empty());
                assert!(!t.title.contains('{'), "{t:?}");
                titles.insert(t.title);
            }
        }
        assert_eq!(
            titles.len(),
            views.len() * 2,
            "each verdict reads differently"
        );
    }

    #[test]
    fn details_flatten_everything_but_verdict_and_host() {
        let v = build(&ready_doc(), Lang::En);
        let keys: Vec<&str> = v.details.iter().map(|d| d.key.as_str()).collect();
        assert!(keys.contains(&"sync.hello_acked"), "{keys:?}");
        assert!(keys.contains(&"tailscale.detail.ips"), "{keys:?}");
        assert!(keys.contains(&"digest"));
        assert!(
            !keys
                .iter()
                .any(|k| k.starts_with("verdict") || k.starts_with("host"))
        );
        let gap = v.details.iter().find(|d| d.key == "sync.gap").unwrap();
        assert_eq!(gap.value, "-");
    }
}
