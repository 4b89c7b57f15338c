//! The end-to-end test harness: everything a black-box test of the relay (and, later, the
//! appliance) needs to run against real processes, a real RabbitMQ broker and real SQLite files.
//!
//! Each test builds its own world and shares nothing with other tests:
//!
//! * [`broker::Vhost`] — a fresh vhost on the shared node started by `scripts/broker.sh`,
//!   deleted when dropped, so no two tests ever see each other's queues;
//! * [`relay::RelayProcess`] — the real `comatching-relay` binary in its own temp dir, on its own
//!   port, with its own database; its logs are printed when a test fails;
//! * [`api::Api`] — a typed HTTP client for the relay's public contract;
//! * [`contract::Contract`] — the OpenAPI document as an oracle for answers (JSON Schema);
//! * [`responder::Responder`] — a scripted stand-in for the appliance on the match queue;
//! * [`sync_tap::SyncTap`] — a queue bound to the sync exchange that records what the relay
//!   publishes;
//! * [`browser::Browser`] — headless Chromium over WebDriver for page tests (console errors,
//!   layout measured in the browser, screenshots).
//!
//! Nothing here sleeps to synchronise: tests wait for a condition with a deadline
//! ([`wait_until`], [`wait_for`]) and fail with a message naming what they waited for.

pub mod api;
pub mod appliance;
pub mod broker;
pub mod browser;
pub mod checker;
pub mod contract;
pub mod env;
pub mod mixed_load;
pub mod population;
pub mod private_broker;
pub mod process;
pub mod profiles;
pub mod proxy;
pub mod relay;
pub mod responder;
pub mod sse;
pub mod sync_tap;
pub mod world;

use std::future::Future;
use std::time::Duration;

pub use api::{Api, Operator, Resp, User};
pub use broker::Vhost;
pub use env::TestEnv;
pub use profiles::{MatchOptionsBuilder, ProfileBuilder};
pub use relay::{RelayConfig, RelayProcess};
pub use responder::{Gate, Responder, ResponderAction, SeenRequest};
pub use sync_tap::SyncTap;

/// How long a test waits for anything that should happen "soon" (a process to come up, an event
/// to arrive). Generous: the suite shares two cores with compilers.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// How often a condition is re-checked while waiting for it.
const POLL: Duration = Duration::from_millis(25);

/// Waits until `check` returns true, re-checking every few milliseconds; panics with `what` when
/// `timeout` passes first.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, what, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Waits until `probe` returns `Some(value)` and returns the value; panics with `what` when
/// `timeout` passes first.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}
