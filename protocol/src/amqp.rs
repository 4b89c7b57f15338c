//! Connecting to the broker, for both binaries (feature `amqp`): plain AMQP, or AMQPS with the
//! broker's certificate checked against our own CA only and, when configured, a client
//! certificate. The files are read once, at start, by [`tls_config`], so a missing or unreadable
//! file stops the service with its name instead of failing every reconnect. Also the one
//! declaration of the shared topology ([`declare_shared_topology`]), so the two services cannot
//! drift apart (RabbitMQ refuses a redeclare with other arguments).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use lapin::{Connection, ConnectionProperties};

use crate::config::{BrokerSettings, ConfigError};
use crate::mac::{LinkKey, MAC_HEADER, MacError};
use crate::topology::{
    CONTROL_DELIVERY_LIMIT, CONTROL_QUEUE, DEAD_EXCHANGE, DEAD_QUEUE, MATCH_QUEUE,
    MATCH_QUEUE_TTL_MS, SYNC_EXCHANGE,
};

/// Reads the link key named by `broker.link_key_file`, if any.
pub fn link_key(settings: &BrokerSettings) -> Result<Option<LinkKey>, ConfigError> {
    let Some(path) = &settings.link_key_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
    LinkKey::from_hex(&text)
        .map(Some)
        .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))
}

/// A service's side of message authentication: its key (if the deployment has one) and how
/// many received messages it refused.
#[derive(Debug, Default)]
pub struct LinkAuth {
    key: Option<LinkKey>,
    refused: std::sync::atomic::AtomicU64,
}

impl LinkAuth {
    pub fn new(key: Option<LinkKey>) -> LinkAuth {
        LinkAuth {
            key,
            refused: Default::default(),
        }
    }

    /// Reads `broker.link_key_file` (none → messages are neither tagged nor checked).
    pub fn from_settings(settings: &BrokerSettings) -> Result<LinkAuth, ConfigError> {
        Ok(LinkAuth::new(link_key(settings)?))
    }

    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// The properties to publish `body` with.
    pub fn sign(&self, props: BasicProperties, body: &[u8]) -> BasicProperties {
        authenticate(props, self.key.as_ref(), body)
    }

    /// May this received message be decoded? A refusal is counted; the caller dead-letters or
    /// drops the message and logs the error's code.
    pub fn admit(&self, props: &BasicProperties, body: &[u8]) -> Result<(), MacError> {
        let r = check(props, self.key.as_ref(), body);
        if r.is_err() {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    /// Messages refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// `props` with the tag of `body` added, when there is a key.
pub fn authenticate(props: BasicProperties, key: Option<&LinkKey>, body: &[u8]) -> BasicProperties {
    let Some(key) = key else {
        return props;
    };
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(MAC_HEADER),
        AMQPValue::ByteArray(ByteArray::from(key.tag(body).to_vec())),
    );
    props.with_headers(headers)
}

/// Whether a received message may be looked at: always without a key; with one, only when its
/// tag matches its body.
pub fn check(props: &BasicProperties, key: Option<&LinkKey>, body: &[u8]) -> Result<(), MacError> {
    let Some(key) = key else {
        return Ok(());
    };
    let tag = props
        .headers()
        .as_ref()
        .and_then(|h: &FieldTable| h.inner().get(MAC_HEADER))
        .and_then(|v| match v {
            AMQPValue::ByteArray(b) => Some(b.as_slice().to_vec()),
            AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
            _ => None,
        });
    key.verify(body, tag.as_deref())
}

/// Reads the TLS files named in `settings` (after [`BrokerSettings::check`]).
pub fn tls_config(settings: &BrokerSettings) -> Result<OwnedTLSConfig, ConfigError> {
    settings.check()?;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ConfigError::Invalid(format!("{}: {e}", p.display())))
    };
    let pem_text = |p: &std::path::Path| {
        let bytes = read(p)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| ConfigError::Invalid(format!("{}: not a PEM file", p.display())))?;
        if !text.contains("-----BEGIN ") {
            return Err(ConfigError::Invalid(format!(
                "{}: not a PEM file",
                p.display()
            )));
        }
        Ok(text)
    };
    let cert_chain = settings.tls_ca.as_deref().map(pem_text).transpose()?;
    let identity = match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: pem_text(cert)?.into_bytes(),
            key: pem_text(key)?.into_bytes(),
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// A queue-arguments table.
pub fn queue_args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

/// An AMQP string value.
pub fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// The arguments of a quorum queue: `x-queue-type = quorum`, `extra`, and the initial group
/// size when `broker.quorum_group_size` sets one.
pub fn quorum_args(extra: &[(&str, AMQPValue)], group_size: Option<u16>) -> FieldTable {
    let mut t = queue_args(extra);
    t.insert(ShortString::from("x-queue-type"), text("quorum"));
    if let Some(n) = group_size {
        t.insert(
            ShortString::from("x-quorum-initial-group-size"),
            AMQPValue::LongLongInt(i64::from(n)),
        );
    }
    t
}

/// Declares the match queue: classic, non-durable (so that on a cluster it is removed with its
/// node and declared again on a live one, see `topology`), its TTL cap, dead-lettering. Both
/// services call it on every connect (inside [`declare_shared_topology`]) and again when they
/// find it gone while connected (the relay on an unroutable request, an appliance when the
/// broker cancels its consumer).
pub async fn declare_match_queue(ch: &Channel) -> lapin::Result<()> {
    ch.queue_declare(
        MATCH_QUEUE.into(),
        QueueDeclareOptions::default(),
        queue_args(&[
            ("x-queue-type", text("classic")),
            ("x-message-ttl", AMQPValue::LongLongInt(MATCH_QUEUE_TTL_MS)),
            ("x-dead-letter-exchange", text(DEAD_EXCHANGE)),
        ]),
    )
    .await?;
    Ok(())
}

/// Is this the broker's `NOT_FOUND` (a channel error): on a cluster, "home node … of durable
/// queue … is down or inaccessible".
pub fn is_not_found(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(p)
            if matches!(p.kind(), lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND))
    )
}

/// Declares and binds the dead-letter queue on a channel of its own. It is a durable classic
/// queue, so on a cluster it lives on one node; while that node is down the broker answers
/// `NOT_FOUND` and dead letters are dropped (the queue is for inspection only, nobody consumes
/// it). That must not keep a service off the broker: it is logged and skipped, and the next
/// connect declares it again.
pub async fn declare_dead_letter_queue(conn: &Connection) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    let durable_q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let r = async {
        ch.queue_declare(DEAD_QUEUE.into(), durable_q, FieldTable::default())
            .await?;
        ch.queue_bind(
            DEAD_QUEUE.into(),
            DEAD_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }
    .await;
    match r {
        Ok(()) => {
            let _ = ch.close(200, "dead-letter queue declared".into()).await;
            Ok(())
        }
        Err(e) if is_not_found(&e) => {
            tracing::warn!(queue = DEAD_QUEUE, error = %e, "dead-letter queue unavailable (its node is down): skipped until the next connect");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Declares what both services use, identically from either side (idempotent, so it runs on
/// every connect and a wiped broker gets its topology back unattended): the sync and dead-letter
/// exchanges, the dead-letter queue, the control queue and the match queue. An appliance then
/// declares its own sync queue. `quorum_group_size` is `broker.quorum_group_size`.
pub async fn declare_shared_topology(
    conn: &Connection,
    ch: &Channel,
    quorum_group_size: Option<u16>,
) -> lapin::Result<()> {
    let durable_x = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for exchange in [SYNC_EXCHANGE, DEAD_EXCHANGE] {
        ch.exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            durable_x,
            FieldTable::default(),
        )
        .await?;
    }
    declare_dead_letter_queue(conn).await?;
    ch.queue_declare(
        CONTROL_QUEUE.into(),
        durable_q,
        quorum_args(
            &[
                (
                    "x-delivery-limit",
                    AMQPValue::LongLongInt(CONTROL_DELIVERY_LIMIT),
                ),
                ("x-dead-letter-exchange", text(DEAD_EXCHANGE)),
            ],
            quorum_group_size,
        ),
    )
    .await?;
    declare_match_queue(ch).await
}

/// One connection attempt to `url` (which carries the heartbeat) with `tls`. With a list of
/// URLs the caller picks which ([`crate::failover::NodeRotation`]).
pub async fn connect(url: &str, tls: &OwnedTLSConfig) -> lapin::Result<Connection> {
    Connection::connect_with_config(
        url,
        ConnectionProperties::default(),
        tls.clone(),
        lapin::runtime::default_runtime()?,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_non_pem_files_are_named() {
        let dir = std::env::temp_dir().join(format!("comatching-amqp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let settings = |ca: std::path::PathBuf| BrokerSettings {
            url: crate::config::BrokerUrls::new(["amqps://h:5671/%2f"]),
            tls_ca: Some(ca),
            ..BrokerSettings::default()
        };
        let e = tls_config(&settings(dir.join("missing.pem"))).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = tls_config(&settings(junk.clone())).unwrap_err();
        assert!(e.to_string().contains("junk.pem: not a PEM file"), "{e}");
        // Plain AMQP needs no files at all.
        let plain = tls_config(&BrokerSettings::default()).unwrap();
        assert!(plain.cert_chain.is_none() && plain.identity.is_none());
        // A link key file that is not one.
        let key_file = BrokerSettings {
            link_key_file: Some(junk.clone()),
            ..BrokerSettings::default()
        };
        let e = link_key(&key_file).unwrap_err();
        assert!(e.to_string().contains("junk.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod header_tests {
    use super::*;

    #[test]
    fn the_tag_travels_in_a_header_and_is_checked_against_the_body() {
        let key = LinkKey::from_hex(&"0123456789abcdef".repeat(4)).unwrap();
        let other = LinkKey::from_hex(&"fedcba9876543210".repeat(4)).unwrap();
        let props = authenticate(
            BasicProperties::default().with_delivery_mode(2),
            Some(&key),
            b"m",
        );
        assert_eq!(props.delivery_mode(), &Some(2), "other properties are kept");
        assert_eq!(check(&props, Some(&key), b"m"), Ok(()));
        assert_eq!(check(&props, Some(&key), b"n"), Err(MacError::Mismatch));
        assert_eq!(check(&props, Some(&other), b"m"), Err(MacError::Mismatch));
        assert_eq!(
            check(&BasicProperties::default(), Some(&key), b"m"),
            Err(MacError::Missing)
        );
        // Without a key nothing is added and nothing is demanded.
        assert!(
            authenticate(BasicProperties::default(), None, b"m")
                .headers()
                .is_none()
        );
        assert_eq!(check(&BasicProperties::default(), None, b"m"), Ok(()));
    }
}
