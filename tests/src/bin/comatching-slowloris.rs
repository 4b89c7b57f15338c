//! A slowloris client for measuring the relay's edge (issue 13): opens N connections (over TLS
//! with `--tls-ca`, handshake completed), sends half a request header on each and then one more
//! header byte every few seconds, never finishing it. Prints one JSON line: how many of the
//! connections were still open at each of the `--at-s` times (seconds since the first connect),
//! and how long the longest-lived one was held from its connect (or TLS handshake) on: a server
//! busy with handshakes, or holding the rest in its listen backlog, connects some late, so the
//! counts alone mix "held too long" with "arrived late".
//!
//! ```text
//! comatching-slowloris --addr 127.0.0.1:8080 --connections 3000 --at-s 5,15,35 [--tls-ca ca.pem]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Parser)]
struct Args {
    /// The relay's address, HOST:PORT.
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// When to count open connections, in seconds since the first connect (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "5,15,35")]
    at_s: Vec<u64>,
    /// Speak TLS, trusting this CA (PEM); the handshake completes before the header starts.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The TLS server name (default: the address's IP).
    #[arg(long)]
    server_name: Option<String>,
    /// Seconds between the trickled header bytes of one connection.
    #[arg(long, default_value_t = 5)]
    trickle_s: u64,
}

/// Connection states, counted: connected and not yet closed = open.
#[derive(Default)]
struct Counts {
    connected: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
    /// Longest time from connect to close among the closed ones, in ms.
    longest_closed_ms: AtomicU64,
    /// Connect times (ms since start) of the ones still open, by slot.
    open_since: std::sync::Mutex<std::collections::HashMap<usize, u64>>,
}

impl Counts {
    fn opened(&self, i: usize, start: Instant) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        let at = start.elapsed().as_millis() as u64;
        self.open_since.lock().unwrap().insert(i, at);
    }

    fn closed(&self, i: usize, start: Instant) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = self.open_since.lock().unwrap().remove(&i) {
            let lived = (start.elapsed().as_millis() as u64).saturating_sub(at);
            self.longest_closed_ms.fetch_max(lived, Ordering::Relaxed);
        }
    }
}

async fn hold<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, trickle: Duration) {
    // Half a header: no blank line, ever.
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Slow: ")
        .await
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                // An answer (408, say) is the server talking; the close follows.
                Ok(_) => {}
            },
            _ = tokio::time::sleep(trickle) => {
                if s.write_all(b"a").await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let tls = args.tls_ca.as_deref().map(|ca| {
        let cfg = comatching_tests::api::tls_trusting(ca);
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    });
    let name = args
        .server_name
        .clone()
        .unwrap_or_else(|| args.addr.ip().to_string());
    let counts = Arc::new(Counts::default());
    let start = Instant::now();
    let trickle = Duration::from_secs(args.trickle_s.max(1));
    for i in 0..args.connections {
        let counts = counts.clone();
        let tls = tls.clone();
        let name = name.clone();
        let addr = args.addr;
        tokio::spawn(async move {
            let tcp = match tokio::time::timeout(Duration::from_secs(30), TcpStream::connect(addr))
                .await
            {
                Ok(Ok(t)) => t,
                _ => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            match tls {
                None => {
                    counts.opened(i, start);
                    hold(tcp, trickle).await;
                }
                Some(c) => {
                    let server =
                        rustls::pki_types::ServerName::try_from(name).expect("server name");
                    match tokio::time::timeout(Duration::from_secs(30), c.connect(server, tcp))
                        .await
                    {
                        Ok(Ok(s)) => {
                            counts.opened(i, start);
                            hold(s, trickle).await;
                        }
                        _ => {
                            counts.failed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }
            counts.closed(i, start);
        });
        // A little spacing keeps the client's own SYN queue sane.
        tokio::task::yield_now().await;
    }
    let mut open_at = serde_json::Map::new();
    let mut at = args.at_s.clone();
    at.sort_unstable();
    for t in at {
        tokio::time::sleep_until(start + Duration::from_secs(t)).await;
        let open = counts.connected.load(Ordering::Relaxed) as i64
            - counts.closed.load(Ordering::Relaxed) as i64;
        open_at.insert(format!("{t}"), json!(open));
    }
    let now_ms = start.elapsed().as_millis() as u64;
    let longest_open_ms = counts
        .open_since
        .lock()
        .unwrap()
        .values()
        .map(|at| now_ms.saturating_sub(*at))
        .max()
        .unwrap_or(0);
    let longest_ms = longest_open_ms.max(counts.longest_closed_ms.load(Ordering::Relaxed));
    println!(
        "{}",
        json!({
            "addr": args.addr.to_string(),
            "tls": args.tls_ca.is_some(),
            "connections": args.connections,
            "connected": counts.connected.load(Ordering::Relaxed),
            "connect_failed": counts.failed.load(Ordering::Relaxed),
            "open_at_s": open_at,
            "longest_held_s": (longest_ms as f64 / 100.0).round() / 10.0,
            "longest_held_still_open": longest_open_ms >= longest_ms && longest_open_ms > 0,
        })
    );
}
