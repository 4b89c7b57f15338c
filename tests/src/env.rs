//! One test's whole world: a vhost, a relay on it (ready), and an API client.

use crate::api::{Api, Operator};
use crate::broker::Vhost;
use crate::relay::{RelayConfig, RelayProcess};
use crate::responder::Responder;
use crate::sync_tap::SyncTap;
use comatching_protocol::MatchRequest;

use crate::responder::ResponderAction;

/// A vhost, a relay connected to it, and an API client. Fields drop in order: the relay is
/// killed before its vhost is deleted.
pub struct TestEnv {
    pub relay: RelayProcess,
    pub api: Api,
    pub vhost: Vhost,
}

impl TestEnv {
    /// A relay with the default test config, ready (broker connected).
    pub async fn start(label: &str) -> TestEnv {
        TestEnv::start_with(label, |_| {}).await
    }

    /// A relay whose config `tweak` may change (deadline, pick cap, rate limits...), ready.
    pub async fn start_with(label: &str, tweak: impl FnOnce(&mut RelayConfig)) -> TestEnv {
        let vhost = Vhost::create(label);
        let mut config = RelayConfig::new(vhost.amqp_url());
        tweak(&mut config);
        let mut relay = RelayProcess::start(config).await;
        relay.wait_ready().await;
        let api = Api::new(relay.base_url());
        TestEnv { relay, api, vhost }
    }

    pub fn amqp_url(&self) -> String {
        self.vhost.amqp_url()
    }

    /// An operator account named `operator`.
    pub async fn operator(&self) -> Operator {
        Operator::create(&self.api, &self.relay, "operator").await
    }

    /// A responder on this env's vhost.
    pub async fn responder(
        &self,
        script: impl FnMut(&MatchRequest) -> ResponderAction + Send + 'static,
    ) -> Responder {
        Responder::start(&self.amqp_url(), script).await
    }

    /// A sync tap on this env's vhost.
    pub async fn sync_tap(&self) -> SyncTap {
        SyncTap::bind(&self.amqp_url()).await
    }
}
