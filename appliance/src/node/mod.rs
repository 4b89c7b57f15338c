//! The running appliance (`comatching-appliance run`): the replica, the broker link, the status
//! port, the tailscale probe and systemd notification, wired together until shutdown.
//!
//! * [`config`] — the one `Config` (TOML + `COMATCHING_APPLIANCE__SECTION__KEY`).
//! * [`replica`] — store + engine + link status; the readiness rule.
//! * [`link`] — the broker loop: topology, sync batches, snapshots, hellos, match serving.
//! * [`retry`] — what happens when a sync event cannot be committed (halt, retry with a pause).
//! * [`status`] — `/healthz`, `/status`, `/metrics`.
//! * [`facts`], [`host`], [`recent`] — the `/status` fields for staff: version, disk and memory,
//!   matches in the last minute, the computed verdict.
//! * [`verdict`] — the staff verdict (Ready / Catching up / Not serving / Broker unreachable /
//!   Replica damaged) as a pure function of the status document.
//! * [`view`], [`i18n`], [`status_page`], [`status_text`] — the staff views: the words (Korean
//!   and English), the HTML page and its refresh, the plain-text view of `status` and
//!   `status --watch`.
//! * [`notify`] — sd_notify READY/WATCHDOG.

pub mod config;
pub mod facts;
pub mod host;
pub mod i18n;
pub mod link;
pub mod notify;
pub mod recent;
pub mod replica;
pub mod retry;
pub mod status;
pub mod status_page;
pub mod status_text;
pub mod verdict;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use crate::tailscale::TailscaleProbe;
use config::Config;
use replica::Replica;

pub async fn run(cfg: Config) -> Result<(), String> {
    let cfg = Arc::new(cfg);
    let dir = cfg.store_dir();
    let (backend, kind) = (cfg.storage.backend, cfg.matching.engine);
    let replica = tokio::task::spawn_blocking(move || Replica::open(backend, &dir, kind))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("opening the replica: {e}"))?;
    let replica = Arc::new(replica);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let tls =
        comatching_protocol::amqp::tls_config(&cfg.broker).map_err(|e| format!("broker: {e}"))?;
    let auth = std::sync::Arc::new(
        comatching_protocol::amqp::LinkAuth::from_settings(&cfg.broker)
            .map_err(|e| format!("broker: {e}"))?,
    );
    let link = link::Link {
        cfg: cfg.clone(),
        replica: replica.clone(),
        tls,
        auth,
    };
    let link_task = tokio::spawn(link.run(shutdown_rx.clone()));

    let tailscale = Arc::new(std::sync::Mutex::new(json!({"state": "unknown"})));
    let probe_task = tokio::spawn(probe_tailscale(
        TailscaleProbe::from(&cfg.tailscale),
        tailscale.clone(),
        shutdown_rx.clone(),
    ));

    let state = status::StatusState {
        cfg: cfg.clone(),
        replica: replica.clone(),
        tailscale,
    };
    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .map_err(|e| format!("binding {}: {e}", cfg.http.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(address = %local, appliance = %cfg.appliance.id, "status port listening");
    println!(
        "comatching-appliance {} status on http://{local}/status",
        cfg.appliance.id
    );
    notify::ready();
    let watchdog_task = notify::watchdog_interval().map(|every| {
        let mut stop = shutdown_rx.clone();
        tokio::spawn(async move {
            loop {
                notify::watchdog();
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    });

    let mut stop = shutdown_rx.clone();
    let server = axum::serve(listener, status::router(state)).with_graceful_shutdown(async move {
        let _ = stop.changed().await;
    });
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        notify::stopping();
        let _ = shutdown_tx.send(true);
    });
    server.await.map_err(|e| e.to_string())?;
    signals.abort();
    let _ = tokio::join!(link_task, probe_task);
    if let Some(t) = watchdog_task {
        t.abort();
    }
    Ok(())
}

/// Probes the tailscale CLI every 10 s on a blocking thread (it can hang; the probe has its own
/// deadline) and publishes the result for the status page.
async fn probe_tailscale(
    probe: TailscaleProbe,
    out: Arc<std::sync::Mutex<serde_json::Value>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let p = probe.clone();
        if let Ok(report) = tokio::task::spawn_blocking(move || p.report()).await {
            let v = serde_json::to_value(&report)
                .unwrap_or_else(|e| json!({"state": "error", "detail": e.to_string()}));
            *out.lock().unwrap_or_else(|p| p.into_inner()) = v;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
