//! The fields of the `/status` document that the staff views need beyond the replica's own
//! (all additive: the document is a contract): `version`, `host` (disk, memory),
//! `matches.last_minute`, `sync.last_applied_age_s`, `sync.waiting_for_relay_s`, and last the
//! computed `verdict`, read from the finished document so it sees every other field.

use std::path::Path;
use std::time::Instant;

use serde_json::Value;

use super::host;
use super::replica::LinkStatus;
use super::verdict::{StatusView, verdict};

/// Adds the staff fields to `doc` (an object built by `status::status_json`).
pub fn augment(doc: &mut Value, link: &LinkStatus, started: Instant, data_dir: &Path) {
    let now = Instant::now();
    let secs_since = |t: Instant| now.saturating_duration_since(t).as_secs();
    doc["version"] = env!("CARGO_PKG_VERSION").into();
    doc["matches"]["last_minute"] = link
        .answered_recent
        .total(now.saturating_duration_since(started).as_secs())
        .into();
    doc["sync"]["last_applied_age_s"] = link.last_applied_at.map(secs_since).into();
    doc["sync"]["waiting_for_relay_s"] = match (link.connected_at, link.hello_acked) {
        (Some(t), false) => Some(secs_since(t)),
        _ => None,
    }
    .into();
    doc["host"] = serde_json::to_value(host::read(data_dir)).unwrap_or(Value::Null);
    let v = verdict(&StatusView::from_doc(doc));
    doc["verdict"] = v.to_json();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn adds_the_staff_fields() {
        let started = Instant::now() - Duration::from_secs(100);
        let mut link = LinkStatus {
            broker_connected: true,
            connected_at: Some(Instant::now() - Duration::from_secs(7)),
            last_applied_at: Some(Instant::now() - Duration::from_secs(3)),
            ..LinkStatus::default()
        };
        link.answered_recent.record(99);
        link.answered_recent.record(100);
        link.answered_recent.record(10); // older than a minute
        let mut doc = json!({"ready": false, "broker_connected": true, "lag": 0,
                             "sync": {"gap": null}, "matches": {"answered": 3}});
        let dir = tempfile::tempdir().unwrap();
        augment(&mut doc, &link, started, dir.path());
        assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(doc["matches"]["last_minute"], 2);
        assert_eq!(doc["matches"]["answered"], 3, "existing fields stay");
        assert!((3..5).contains(&doc["sync"]["last_applied_age_s"].as_u64().unwrap()));
        assert!((7..9).contains(&doc["sync"]["waiting_for_relay_s"].as_u64().unwrap()));
        assert!(doc["host"]["disk_free_bytes"].as_u64().is_some(), "{doc}");
        assert_eq!(doc["verdict"]["state"], "catching_up");

        // Once the relay answered there is nothing to wait for.
        link.hello_acked = true;
        augment(&mut doc, &link, started, dir.path());
        assert!(doc["sync"]["waiting_for_relay_s"].is_null());
    }
}
