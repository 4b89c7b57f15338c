//! Wires the relay's long-running parts together and runs them until shutdown: the broker
//! supervisor, the match RPC dispatcher, the outbox publisher, the hold sweeper and the HTTP
//! server. Each is a small struct or function with `run(shutdown)`.

use std::sync::Arc;

use tokio::sync::{Notify, Semaphore, watch};

use crate::auth::HASH_PERMITS;
use crate::broker;
use crate::config::Config;
use crate::control::{ControlConsumer, trim};
use crate::db::Db;
use crate::dead_letters::DeadLetterTally;
use crate::http::{AppState, router};
use crate::limits::RateLimits;
use crate::matching::Matcher;
use crate::metrics::Metrics;
use crate::outbox::OutboxPublisher;
use crate::rpc::MatchRpc;

pub async fn serve(cfg: Config) -> anyhow_like::Result<()> {
    // Certificates are read first, so a bad file stops the relay at once, by name.
    let tls = match (&cfg.http.tls_cert, &cfg.http.tls_key) {
        (Some(cert), Some(key)) => Some(
            crate::tls::server_config(cert, key)
                .map_err(|e| anyhow_like::err(format!("HTTPS: {e}")))?,
        ),
        _ => None,
    };
    // Held until the process exits: `restore` and `admin purge` refuse while it is.
    let _data_dir_lock =
        crate::datadir::lock(&cfg.storage.data_dir).map_err(|e| anyhow_like::err(e.to_string()))?;
    let db = Db::open(&cfg.storage.db_path()).map_err(|e| {
        anyhow_like::err(format!("opening {}: {e}", cfg.storage.db_path().display()))
    })?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (supervisor, broker) = broker::supervisor(cfg.broker.clone(), cfg.dead_letter_limits())
        .map_err(|e| anyhow_like::err(format!("broker: {e}")))?;
    let supervisor_task = tokio::spawn(supervisor.run(shutdown_rx.clone()));
    let rpc = MatchRpc::start(broker.clone());
    let outbox_wake = Arc::new(Notify::new());
    let metrics = Arc::new(Metrics::default());
    let publisher = OutboxPublisher {
        db: db.clone(),
        broker: broker.clone(),
        wake: outbox_wake.clone(),
    };
    let publisher_task = tokio::spawn(publisher.run(shutdown_rx.clone()));
    let matcher = Matcher::new(
        db.clone(),
        rpc.clone(),
        cfg.clone(),
        metrics.clone(),
        outbox_wake.clone(),
    );
    let sweeper_task = tokio::spawn(matcher.clone().run_sweeper(shutdown_rx.clone()));
    let control = ControlConsumer {
        db: db.clone(),
        broker: broker.clone(),
        metrics: metrics.clone(),
    };
    let control_task = tokio::spawn(control.run(shutdown_rx.clone()));
    let trimmer_task = tokio::spawn(run_trimmer(
        db.clone(),
        cfg.sync_queue_expires_ms(),
        shutdown_rx.clone(),
    ));
    let tally_task = tokio::spawn(
        DeadLetterTally {
            cfg: cfg.broker.clone(),
            metrics: metrics.clone(),
        }
        .run(shutdown_rx.clone()),
    );
    let events = Arc::new(crate::events::Hub::new(&cfg.events, shutdown_rx.clone()));
    let pruner_task = tokio::spawn(crate::events::run_pruner(
        db.clone(),
        cfg.events.clone(),
        shutdown_rx.clone(),
    ));
    let limits = Arc::new(RateLimits::new(&cfg.rate_limit, &cfg.http.trusted_proxies));
    let sweeper_limits_task = tokio::spawn(limits.clone().run_sweeper(shutdown_rx.clone()));
    let connections = metrics.connections.clone();
    let state = AppState {
        db,
        cfg: Arc::new(cfg.clone()),
        rpc,
        matcher,
        metrics,
        limits: limits.clone(),
        outbox_wake,
        hashing: Arc::new(Semaphore::new(HASH_PERMITS)),
        events,
    };
    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .map_err(|e| anyhow_like::err(format!("binding {}: {e}", cfg.http.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| anyhow_like::err(e.to_string()))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(address = %local, scheme, "comatching-relay listening");
    println!("comatching-relay listening on {scheme}://{local}");
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = shutdown_tx.send(true);
    });
    let mut app = router(state);
    if tls.is_some() {
        // Browsers that once reached us over HTTPS never fall back to plain HTTP.
        app = app.layer(axum::middleware::map_response(
            |mut r: axum::response::Response| async move {
                r.headers_mut().insert(
                    axum::http::header::STRICT_TRANSPORT_SECURITY,
                    axum::http::HeaderValue::from_static("max-age=31536000"),
                );
                r
            },
        ));
    }
    crate::listener::serve(
        listener,
        tls,
        app,
        crate::listener::Settings::from_config(&cfg.http),
        connections,
        shutdown_rx.clone(),
    )
    .await;
    signals.abort();
    let _ = tokio::join!(
        supervisor_task,
        publisher_task,
        sweeper_task,
        control_task,
        trimmer_task,
        pruner_task,
        sweeper_limits_task,
        tally_task
    );
    Ok(())
}

/// Trims the outbox once a minute (see `control::trim`); appliances not heard from for
/// `stale_ms` (the sync queues' expiry) no longer hold it back.
async fn run_trimmer(db: Db, stale_ms: i64, mut shutdown: watch::Receiver<bool>) {
    loop {
        match db.run(move |c| trim(c, stale_ms)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "outbox trimmed"),
            Err(e) => tracing::warn!(error = %e, "outbox trim failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// A tiny boxed error for the binary's top level.
pub mod anyhow_like {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
    pub fn err(msg: String) -> Box<dyn std::error::Error + Send + Sync> {
        msg.into()
    }
}
