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
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        notify::stopping();
        let _ = shutdown_tx.send(true);
    });
    let Some(replica) = open_replica(&cfg, shutdown_rx.clone()).await? else {
        return Ok(());
    };
    let replica = Arc::new(replica);

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
    server.await.map_err(|e| e.to_string())?;
    signals.abort();
    let _ = tokio::join!(link_task, probe_task);
    if let Some(t) = watchdog_task {
        t.abort();
    }
    Ok(())
}

/// First pause between store open attempts; doubles up to [`OPEN_BACKOFF_MAX`].
const OPEN_BACKOFF_MIN: Duration = Duration::from_millis(500);
const OPEN_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Opens the replica (healing a damaged one, `Replica::open_healing`). While it cannot be
/// opened at all (a read-only or full disk), the status port answers with the error
/// (`store.state = "unavailable"`) and the open is retried with a backoff: the process never
/// exits into a crash loop. `None` when shutdown came first.
async fn open_replica(
    cfg: &Arc<Config>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Option<Replica>, String> {
    let mut backoff = OPEN_BACKOFF_MIN;
    let error = Arc::new(std::sync::Mutex::new(String::new()));
    let started = std::time::Instant::now();
    let mut interim: Option<(tokio::task::JoinHandle<()>, watch::Sender<bool>)> = None;
    let stop_interim = |interim: Option<(tokio::task::JoinHandle<()>, watch::Sender<bool>)>| async {
        if let Some((task, stop)) = interim {
            let _ = stop.send(true);
            let _ = task.await;
        }
    };
    loop {
        let (dir, backend, kind) = (cfg.store_dir(), cfg.storage.backend, cfg.matching.engine);
        let opened =
            tokio::task::spawn_blocking(move || Replica::open_healing(backend, &dir, kind))
                .await
                .map_err(|e| e.to_string())?;
        match opened {
            Ok(r) => {
                stop_interim(interim).await;
                return Ok(Some(r));
            }
            Err(e) => {
                tracing::error!(code = e.code(), error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "cannot open the replica store; retrying");
                *error.lock().unwrap_or_else(|p| p.into_inner()) = format!("{}: {e}", e.code());
            }
        }
        if interim.is_none() {
            let listener = tokio::net::TcpListener::bind(cfg.http.listen)
                .await
                .map_err(|e| format!("binding {}: {e}", cfg.http.listen))?;
            let (stop_tx, mut stop_rx) = watch::channel(false);
            let app = status::unavailable_router(status::UnavailableState {
                cfg: cfg.clone(),
                error: error.clone(),
                started,
            });
            let task = tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop_rx.changed().await;
                    })
                    .await;
            });
            interim = Some((task, stop_tx));
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => {
                stop_interim(interim).await;
                return Ok(None);
            }
        }
        backoff = (backoff * 2).min(OPEN_BACKOFF_MAX);
    }
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
