//! The relay's one accept loop, for plain HTTP and HTTPS alike (it replaces `axum::serve`, which
//! has no connection cap and no header or idle timeouts).
//!
//! * **Connection cap** (`http.max_connections`): a slot is taken *before* `accept`, so with the
//!   cap reached further connections wait in the kernel's listen backlog (they are not accepted
//!   and dropped) until one closes. A warning at most every 10 s says so;
//!   `comatching_http_connection_cap_reached_total` counts the waits.
//! * **TLS handshake deadline** (`http.tls_handshake_timeout_ms`).
//! * **Header deadline**: hyper's HTTP/1 `header_read_timeout` (`http.header_read_timeout_ms`)
//!   closes a connection whose request header does not arrive in time — it also runs while a
//!   keep-alive connection waits for its next request, so idle HTTP/1 connections end then too.
//! * **Idle watchdog** (hand-written, see ARCHITECTURE.md): hyper has no idle timeout for
//!   HTTP/2, and none at all before the protocol is known (a client that connects, or finishes a
//!   TLS handshake, and sends nothing). A connection with no request in progress is shut down
//!   gracefully after `http.header_read_timeout_ms` if it never started one, else after
//!   `http.idle_timeout_ms`. Only requests count as activity: bytes trickled into an unfinished
//!   header or PINGs do not keep a connection alive.
//! * **HTTP/2 limits**: concurrent streams and header list size.
//! * **Graceful shutdown**: when `shutdown` flips, accepting stops, every connection is told to
//!   finish (HTTP/1: after the response in progress; HTTP/2: GOAWAY), and the loop waits up to
//!   [`DRAIN_DEADLINE`] for them.
//!
//! Each request sees the peer address as `ConnectInfo<SocketAddr>`, as with `axum::serve`.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::config;

/// In-flight requests get this long to finish at shutdown.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// At most one "cap reached" warning this often.
const CAP_WARN_EVERY: Duration = Duration::from_secs(10);

/// The listener's settings, from `[http]`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_connections: u32,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
}

impl Settings {
    pub fn from_config(h: &config::Http) -> Settings {
        Settings {
            max_connections: h.max_connections,
            header_read_timeout: Duration::from_millis(h.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(h.idle_timeout_ms),
            tls_handshake_timeout: Duration::from_millis(h.tls_handshake_timeout_ms),
            h2_max_concurrent_streams: h.h2_max_concurrent_streams,
            max_header_list_bytes: h.max_header_list_bytes,
        }
    }
}

/// Connection counters for `/metrics`.
#[derive(Default)]
pub struct ConnStats {
    open: AtomicU64,
    accepted: AtomicU64,
    cap_reached: AtomicU64,
    idle_closed: AtomicU64,
    tls_failed: AtomicU64,
}

impl ConnStats {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, kind, help, v) in [
            (
                "comatching_http_connections_open",
                "gauge",
                "Connections being served now (TLS handshakes included).",
                &self.open,
            ),
            (
                "comatching_http_connections_accepted_total",
                "counter",
                "Connections accepted.",
                &self.accepted,
            ),
            (
                "comatching_http_connection_cap_reached_total",
                "counter",
                "Times the accept loop found http.max_connections in use and waited for a slot.",
                &self.cap_reached,
            ),
            (
                "comatching_http_idle_closed_total",
                "counter",
                "Connections closed by the idle watchdog (no request in time).",
                &self.idle_closed,
            ),
            (
                "comatching_http_tls_handshake_failed_total",
                "counter",
                "TLS handshakes that failed or missed http.tls_handshake_timeout_ms.",
                &self.tls_failed,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// Holds a connection's slot; counts it open while alive.
struct Slot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<ConnStats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Requests in progress on one connection, and since when it has had none.
struct Activity {
    in_flight: AtomicUsize,
    served: AtomicU64,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
        })
    }
}

/// Marks one request in progress until dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn enter(a: &Arc<Activity>) -> Busy {
        a.in_flight.fetch_add(1, Ordering::SeqCst);
        a.served.fetch_add(1, Ordering::Relaxed);
        Busy(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            *since = Instant::now();
        }
    }
}

/// Resolves once the connection has had no request in progress for its allowance: the header
/// deadline before its first request, the idle timeout after.
async fn idle_expired(a: Arc<Activity>, first: Duration, idle: Duration) {
    loop {
        let allowance = if a.served.load(Ordering::Relaxed) == 0 {
            first
        } else {
            idle
        };
        let deadline = {
            let since = a.idle_since.lock().unwrap_or_else(|p| p.into_inner());
            if a.in_flight.load(Ordering::SeqCst) > 0 {
                // Busy: look again one allowance from now.
                Instant::now() + allowance
            } else {
                *since + allowance
            }
        };
        if deadline <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// The per-connection service: the router, with the peer address and activity tracking.
#[derive(Clone)]
struct ConnService {
    app: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, mut req: hyper::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let busy = Busy::enter(&self.activity);
        let mut app = self.app.clone();
        Box::pin(async move {
            let resp = tower_service::Service::call(&mut app, req).await;
            drop(busy);
            resp
        })
    }
}

fn builder(s: &Settings) -> Builder<TokioExecutor> {
    let mut b = Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_read_timeout)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(s.h2_max_concurrent_streams)
        .max_header_list_size(s.max_header_list_bytes);
    b
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until `shutdown` flips, then drains.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    settings: Settings,
    stats: Arc<ConnStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let max = settings.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max as usize));
    let builder = Arc::new(builder(&settings));
    let acceptor = tls.map(TlsAcceptor::from);
    let mut last_warning: Option<Instant> = None;
    'accept: loop {
        // A slot first: at the cap, new connections stay in the kernel's backlog.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                stats.cap_reached.fetch_add(1, Ordering::Relaxed);
                if last_warning.is_none_or(|t| t.elapsed() >= CAP_WARN_EVERY) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(
                        max_connections = max,
                        "connection cap reached (http.max_connections): new connections wait in the listen backlog"
                    );
                }
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break 'accept,
                    },
                    _ = shutdown.changed() => break 'accept,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, say: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break 'accept,
        };
        let _ = tcp.set_nodelay(true);
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            _permit: permit,
            stats: stats.clone(),
        };
        let conn = Conn {
            app: app.clone(),
            peer,
            builder: builder.clone(),
            settings: settings.clone(),
            stats: stats.clone(),
            shutdown: shutdown.clone(),
        };
        match &acceptor {
            None => {
                tokio::spawn(async move {
                    conn.run(tcp).await;
                    drop(slot);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let deadline = conn.settings.tls_handshake_timeout;
                    match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => conn.run(tls).await,
                        Ok(Err(e)) => {
                            conn.stats.tls_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            conn.stats.tls_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                    drop(slot);
                });
            }
        }
    }
    drop(listener);
    // Every slot back = every connection closed.
    match tokio::time::timeout(DRAIN_DEADLINE, slots.acquire_many(max)).await {
        Ok(_) => {}
        Err(_) => tracing::warn!("connections still open after the drain deadline; closing them"),
    }
}

/// One accepted connection (after TLS, if any).
struct Conn {
    app: Router,
    peer: SocketAddr,
    builder: Arc<Builder<TokioExecutor>>,
    settings: Settings,
    stats: Arc<ConnStats>,
    shutdown: watch::Receiver<bool>,
}

impl Conn {
    async fn run<I>(mut self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let svc = ConnService {
            app: self.app.clone(),
            peer: self.peer,
            activity: activity.clone(),
        };
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let peer = self.peer;
        let first = self.settings.header_read_timeout;
        let idle = self.settings.idle_timeout;
        // Once told to finish, a connection gets this long before it is dropped.
        let mut hard_stop: Option<Instant> = None;
        if *self.shutdown.borrow() {
            conn.as_mut().graceful_shutdown();
            hard_stop = Some(Instant::now() + DRAIN_DEADLINE);
        }
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = self.shutdown.changed(), if hard_stop.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    hard_stop = Some(Instant::now() + DRAIN_DEADLINE);
                }
                _ = idle_expired(activity.clone(), first, idle), if hard_stop.is_none() => {
                    self.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    // Nothing is in progress: a short grace for the goodbye, then drop.
                    hard_stop = Some(Instant::now() + Duration::from_secs(1));
                }
                _ = tokio::time::sleep_until(hard_stop.unwrap_or_else(Instant::now)), if hard_stop.is_some() => {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_counts_requests_not_time_alone() {
        let a = Activity::new();
        let first = Duration::from_secs(10);
        let idle = Duration::from_secs(60);
        // Never served: the header deadline.
        let t0 = Instant::now();
        idle_expired(a.clone(), first, idle).await;
        assert_eq!(t0.elapsed(), first);
        // A request in progress for 100 s keeps the connection; then 60 s of idleness.
        let busy = Busy::enter(&a);
        let watch = tokio::spawn(idle_expired(a.clone(), first, idle));
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!watch.is_finished());
        let t1 = Instant::now();
        drop(busy);
        watch.await.unwrap();
        assert!(t1.elapsed() >= idle && t1.elapsed() < idle + Duration::from_secs(11));
    }
}
