//! A small TCP proxy that sits between a service and the broker, for link faults: pass bytes
//! through, delay them, pause them (held until resumed), blackhole them (swallowed, sockets kept
//! open: a half-open link), or reset every open connection at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with bytes right now (both directions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Delay(Duration),
    Pause,
    Blackhole,
}

pub struct Proxy {
    pub port: u16,
    mode: Arc<watch::Sender<Mode>>,
    resets: Arc<watch::Sender<u64>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let mode = Arc::new(watch::channel(Mode::Pass).0);
        let resets = Arc::new(watch::channel(0u64).0);
        let (m, r) = (mode.clone(), resets.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(target).await else {
                    continue;
                };
                let (m, r) = (m.clone(), r.clone());
                tokio::spawn(async move {
                    let mut reset = r.subscribe();
                    reset.mark_unchanged();
                    let (cr, cw) = client.into_split();
                    let (ur, uw) = upstream.into_split();
                    tokio::select! {
                        _ = pump(cr, uw, m.subscribe()) => {}
                        _ = pump(ur, cw, m.subscribe()) => {}
                        _ = reset.changed() => {}
                    }
                    // Dropping both halves of both sockets closes the connection.
                });
            }
        });
        Proxy {
            port,
            mode,
            resets,
            task,
        }
    }

    /// A proxy in front of the broker of `amqp_url` (`amqp://user:pw@host:port/vhost`), and the
    /// URL that goes through it.
    pub async fn in_front_of(amqp_url: &str) -> (Proxy, String) {
        let after_at = amqp_url
            .rsplit_once('@')
            .expect("amqp url with credentials")
            .1;
        let hostport = after_at.split('/').next().expect("host:port");
        let target: SocketAddr = hostport.parse().expect("host:port is an address");
        let proxy = Proxy::start(target).await;
        let url = amqp_url.replacen(hostport, &format!("127.0.0.1:{}", proxy.port), 1);
        (proxy, url)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes every connection open through the proxy now; new ones are accepted.
    pub fn reset(&self) {
        self.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.reset();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let m = *mode.borrow_and_update();
            match m {
                Mode::Pass => break,
                Mode::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Mode::Blackhole => break,
                Mode::Pause => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if *mode.borrow() == Mode::Blackhole {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
