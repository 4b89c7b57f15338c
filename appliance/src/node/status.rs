//! The appliance's local HTTP port: `/healthz`, `/status` (JSON for machines, HTML for staff:
//! `status_page`), `/status/view` (the staff page's refresh) and `/metrics` (Prometheus text).
//! Read-only; it never changes the replica.

use comatching_protocol::stages;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::config::Config;
use super::replica::Replica;
use super::status_page::{self, LangParam};

#[derive(Clone)]
pub struct StatusState {
    pub cfg: Arc<Config>,
    pub replica: Arc<Replica>,
    /// The last tailscale probe, refreshed in the background (the CLI can hang).
    pub tailscale: Arc<std::sync::Mutex<Value>>,
}

pub fn router(state: StatusState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/status/view", get(status_view))
        .route("/metrics", get(metrics))
        .merge(super::status_page::asset_routes())
        .with_state(state)
}

/// The status document (also printed by `comatching-appliance status`).
pub async fn status_json(s: &StatusState) -> Result<Value, String> {
    let (meta, (engine_len, engine_digest)) = (s.replica.meta(), s.replica.engine_content());
    let ready = s.replica.ready(&meta);
    let link = s
        .replica
        .link
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let lag = link.relay_seq.saturating_sub(meta.cursor.applied_seq);
    let mut doc = json!({
        "appliance_id": s.cfg.appliance.id.as_str(),
        "store_backend": s.replica.backend().as_str(),
        "count": meta.count,
        "digest": meta.digest.to_string(),
        "epoch": meta.cursor.epoch.map(|e| e.to_string()),
        "applied_seq": meta.cursor.applied_seq,
        "relay_seq": link.relay_seq,
        "lag": lag,
        "ready": ready,
        "broker_connected": link.broker_connected,
        "broker_node": link.broker_node,
        "broker_sessions": link.broker_sessions,
        "index": {
            "engine": s.replica.engine_kind().as_str(),
            "users": engine_len,
            "rebuild_ms": link.index_rebuild_ms,
            "state": if link.snapshot_in_progress.is_some() { "loading_snapshot" } else { "ready" },
        },
        "sync": {
            "hello_acked": link.hello_acked,
            "gap": link.gap.map(|(a, b)| json!({"from": a, "to": b})),
            "snapshot_in_progress": link.snapshot_in_progress,
            "snapshots_loaded": link.snapshots_loaded,
            "events_applied": link.events_applied,
            "dead_lettered": link.dead_lettered,
            "unauthenticated": link.unauthenticated,
            "hellos_sent": link.hellos_sent,
            "apply_failures": link.apply_failures,
            "stuck": link.stuck,
        },
        // The match engine's own view: the users it would rank and the features digest of
        // them (`comatching_protocol::digest::features_hash`). Equal to the store's (see
        // `?recount=1`) whenever every committed change reached the engine.
        "engine": {
            "kind": s.replica.engine_kind().as_str(),
            "users": engine_len,
            "features_digest": engine_digest.to_string(),
        },
        "matches": {
            "answered": link.matches_answered,
            "expired": link.matches_expired,
            "consumer_restarts": link.match_consumer_restarts,
        },
        "tailscale": s.tailscale.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        "uptime_s": s.replica.started.elapsed().as_secs(),
        "last_error": link.last_error,
        "store": {
            "state": "open",
            "error": null,
            "healed": s.replica.healed.as_ref().map(|h| json!({
                "at_unix_ms": h.at_unix_ms,
                "moved_to": h.moved_to,
                "error": h.error,
                "rebuilding": !ready,
            })),
            "heals": u64::from(s.replica.healed.is_some()),
        },
    });
    super::facts::augment(&mut doc, &link, s.replica.started, &s.cfg.store_dir());
    Ok(doc)
}

async fn healthz(State(s): State<StatusState>) -> Response {
    let replica = s.replica.clone();
    match tokio::task::spawn_blocking(move || replica.probe_store_blocking()).await {
        Ok(Ok(_)) => (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "store unavailable"})),
        )
            .into_response(),
    }
}

/// `/status` query: `recount=1` adds `store_recount`, the store's count and digests recomputed
/// from its rows (a full read of the replica; for checks, not for polling).
#[derive(serde::Deserialize, Default)]
struct StatusQuery {
    #[serde(default)]
    recount: Option<u8>,
}

async fn status(
    State(s): State<StatusState>,
    Query(q): Query<StatusQuery>,
    headers: HeaderMap,
    Query(lang): Query<LangParam>,
) -> Response {
    let mut doc = match status_json(&s).await {
        Ok(d) => d,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"error": {"code": "store_unavailable", "message": e}})),
            )
                .into_response();
        }
    };
    if q.recount.unwrap_or(0) != 0 {
        let replica = s.replica.clone();
        doc["store_recount"] =
            match tokio::task::spawn_blocking(move || replica.recount_blocking()).await {
                Ok(Ok(r)) => json!({
                    "count": r.count,
                    "digest": r.digest.to_string(),
                    "features_digest": r.features_digest.to_string(),
                }),
                Ok(Err(e)) => json!({"error": e.to_string()}),
                Err(e) => json!({"error": e.to_string()}),
            };
    }
    if status_page::wants_html(&headers) {
        status_page::page(&doc, &headers, &lang)
    } else {
        axum::Json(doc).into_response()
    }
}

/// The staff page's words as JSON (its script's refresh).
async fn status_view(
    State(s): State<StatusState>,
    headers: HeaderMap,
    Query(lang): Query<LangParam>,
) -> Response {
    match status_json(&s).await {
        Ok(doc) => status_page::view_json(&doc, &headers, &lang),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": {"code": "store_unavailable", "message": e}})),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<StatusState>) -> Response {
    let Ok(doc) = status_json(&s).await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let n = |v: &Value| v.as_f64().unwrap_or(0.0);
    let b = |v: &Value| {
        if v.as_bool().unwrap_or(false) {
            1.0
        } else {
            0.0
        }
    };
    let gauges = [
        (
            "comatching_replica_users",
            "Live users in the replica.",
            n(&doc["count"]),
        ),
        (
            "comatching_replica_applied_seq",
            "Last contiguous outbox seq applied.",
            n(&doc["applied_seq"]),
        ),
        (
            "comatching_replica_lag",
            "Relay seq minus applied seq.",
            n(&doc["lag"]),
        ),
        (
            "comatching_ready",
            "1 while serving matches.",
            b(&doc["ready"]),
        ),
        (
            "comatching_broker_connected",
            "1 while connected to the broker.",
            b(&doc["broker_connected"]),
        ),
        (
            "comatching_sync_events_applied_total",
            "Replica changes applied.",
            n(&doc["sync"]["events_applied"]),
        ),
        (
            "comatching_sync_dead_lettered_total",
            "Messages rejected to the dead-letter queue.",
            n(&doc["sync"]["dead_lettered"]),
        ),
        (
            "comatching_unauthenticated_messages_total",
            "Messages refused for a missing or wrong link-key tag.",
            n(&doc["sync"]["unauthenticated"]),
        ),
        (
            "comatching_sync_apply_failures_total",
            "Sync commits that failed.",
            n(&doc["sync"]["apply_failures"]),
        ),
        (
            "comatching_sync_stuck_seq",
            "The seq the replica is halted at because it cannot commit it; 0 when not.",
            n(&doc["sync"]["stuck"]["seq"]),
        ),
        (
            "comatching_snapshots_loaded_total",
            "Snapshots swapped in.",
            n(&doc["sync"]["snapshots_loaded"]),
        ),
        (
            "comatching_matches_answered_total",
            "Match requests answered.",
            n(&doc["matches"]["answered"]),
        ),
        (
            "comatching_matches_expired_total",
            "Match requests dropped past their deadline.",
            n(&doc["matches"]["expired"]),
        ),
        (
            "comatching_uptime_seconds",
            "Seconds since start.",
            n(&doc["uptime_s"]),
        ),
        (
            "comatching_store_open",
            "1 once the replica store is open; 0 while it cannot be opened (retrying).",
            1.0,
        ),
        (
            "comatching_replica_heals_total",
            "Damaged replicas moved aside and rebuilt by this process.",
            n(&doc["store"]["heals"]),
        ),
    ];
    let mut out = String::new();
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    stages::render_family(
        &mut out,
        stages::APPLIANCE_FAMILY,
        "Time match requests spent in each stage here.",
        &s.replica.stages.all(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// While the store cannot be opened (read-only or full disk, say): the status port still
/// answers, so staff and monitoring see why, and the process keeps retrying instead of exiting
/// into a crash loop.
#[derive(Clone)]
pub struct UnavailableState {
    pub cfg: Arc<Config>,
    /// The last open error.
    pub error: Arc<std::sync::Mutex<String>>,
    pub started: std::time::Instant,
}

/// The status document while the store is unavailable.
pub fn unavailable_json(s: &UnavailableState) -> Value {
    let error = s.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut doc = json!({
        "appliance_id": s.cfg.appliance.id.as_str(),
        "store_backend": s.cfg.storage.backend.as_str(),
        "ready": false,
        "broker_connected": false,
        "lag": 0,
        "sync": {},
        "matches": {},
        "uptime_s": s.started.elapsed().as_secs(),
        "last_error": error.clone(),
        "store": { "state": "unavailable", "error": error, "healed": null, "heals": 0 },
    });
    super::facts::augment(
        &mut doc,
        &super::replica::LinkStatus::default(),
        s.started,
        &s.cfg.store_dir(),
    );
    doc
}

pub fn unavailable_router(state: UnavailableState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(json!({"status": "store unavailable"})),
                )
            }),
        )
        .route(
            "/status",
            get(
                |State(s): State<UnavailableState>,
                 headers: HeaderMap,
                 Query(lang): Query<LangParam>| async move {
                    let doc = unavailable_json(&s);
                    if status_page::wants_html(&headers) {
                        status_page::page(&doc, &headers, &lang)
                    } else {
                        axum::Json(doc).into_response()
                    }
                },
            ),
        )
        .route(
            "/status/view",
            get(
                |State(s): State<UnavailableState>,
                 headers: HeaderMap,
                 Query(lang): Query<LangParam>| async move {
                    status_page::view_json(&unavailable_json(&s), &headers, &lang)
                },
            ),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    "# HELP comatching_store_open 1 once the replica store is open; 0 while it cannot be opened (retrying).\n\
                     # TYPE comatching_store_open gauge\ncomatching_store_open 0\n\
                     # HELP comatching_ready 1 while serving matches.\n# TYPE comatching_ready gauge\ncomatching_ready 0\n",
                )
            }),
        )
        .merge(super::status_page::asset_routes())
        .with_state(state)
}
