//! Connecting to the broker, for both binaries (feature `amqp`): plain AMQP, or AMQPS with the
//! broker's certificate checked against our own CA only and, when configured, a client
//! certificate. The files are read once, at start, by [`tls_config`], so a missing or unreadable
//! file stops the service with its name instead of failing every reconnect. Also the one
//! declaration of the shared topology ([`declare_shared_topology`]), so the two services cannot
//! drift apart (RabbitMQ refuses a redeclare with other arguments).

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use lapin::{Connection, ConnectionProperties};

use crate::config::{BrokerSettings, ConfigError};
use crate::mac::{LinkKey, MAC_HEADER, MacError};
use crate::topology::{
    CONTROL_DELIVERY_LIMIT, CONTROL_QUEUE, DEAD_EXCHANGE, DEAD_LETTERS_MAX_LENGTH,
    DEAD_LETTERS_TTL_H, DEAD_QUEUE, DEAD_TALLY_QUEUE, MATCH_QUEUE, MATCH_QUEUE_TTL_MS,
    SYNC_EXCHANGE,
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
/// broker cancels its consumer), through [`redeclare_match_queue`].
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

/// [`declare_match_queue`] on a channel of its own (a refusal closes only that channel).
/// `NOT_FOUND` here means the queue still exists in the cluster's metadata but its home node is
/// shutting down ("process is stopped by supervisor") or gone ("home node … is down"): nobody
/// can declare it until that node has left, a second or two later. The caller keeps its
/// session and tries again ([`is_not_found`]).
pub async fn redeclare_match_queue(conn: &Connection) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    declare_match_queue(&ch).await?;
    let _ = ch.close(200, "match queue declared".into()).await;
    Ok(())
}

/// Declares what both services use, identically from either side (idempotent, so it runs on
/// every connect and a wiped broker gets its topology back unattended): the sync and dead-letter
/// exchanges, the control queue and the match queue, each step on a channel of its own. The
/// dead-letter queues are not here: their limits are the relay's configuration, so the relay
/// declares them ([`declare_dead_letter_queues`]) and an appliance only creates the inspection
/// queue when it is missing ([`ensure_dead_queue`]); both skip a `NOT_FOUND` (a cluster node
/// that is their home is down). An appliance then declares its own sync queue.
/// `quorum_group_size` is `broker.quorum_group_size`; a control queue that exists with another
/// initial group size keeps it ([`declare_quorum_queue`]). A match queue whose old home node
/// is still leaving (`NOT_FOUND`) is skipped: the relay declares it on its first unroutable
/// request, an appliance before it consumes.
pub async fn declare_shared_topology(
    conn: &Connection,
    quorum_group_size: Option<u16>,
) -> lapin::Result<()> {
    let durable_x = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let ch = conn.create_channel().await?;
    for exchange in [SYNC_EXCHANGE, DEAD_EXCHANGE] {
        ch.exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            durable_x,
            FieldTable::default(),
        )
        .await?;
    }
    let _ = ch.close(200, "exchanges declared".into()).await;
    declare_quorum_queue(
        conn,
        CONTROL_QUEUE,
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
    match redeclare_match_queue(conn).await {
        Err(e) if is_not_found(&e) => {
            tracing::warn!(error = %e, "match queue's old home node is leaving: declared again later");
            Ok(())
        }
        r => r,
    }
}

/// The argument that sets a quorum queue's initial replica count.
pub const INITIAL_GROUP_SIZE: &str = "x-quorum-initial-group-size";

/// When `e` is a PRECONDITION_FAILED about [`INITIAL_GROUP_SIZE`], the value the existing queue
/// has: `Some(None)` when it was declared without one, `Some(Some(n))` otherwise. RabbitMQ
/// names the first inequivalent argument and both values in its reply text ("inequivalent arg
/// 'x-quorum-initial-group-size' for queue 'q' in vhost '/': received '3' but current is '1'",
/// or "… received the value '3' of type 'long' but current is none"), a wording unchanged
/// since RabbitMQ 3.0. Anything else is not recognised (`None`): the refusal stands.
pub fn existing_group_size(e: &lapin::Error) -> Option<Option<i64>> {
    if !is_precondition_failed(e) {
        return None;
    }
    let lapin::ErrorKind::ProtocolError(p) = e.kind() else {
        return None;
    };
    group_size_in_reply(p.get_message().as_str())
}

fn group_size_in_reply(text: &str) -> Option<Option<i64>> {
    if !text.contains(&format!("inequivalent arg '{INITIAL_GROUP_SIZE}'")) {
        return None;
    }
    let current = text.rsplit_once("but current is ")?.1.trim();
    if current == "none" {
        return Some(None);
    }
    // "'3'" (RabbitMQ 3.10 for two values of one type) or "the value '3' of type 'long'".
    let quoted = current.strip_prefix("the value ").unwrap_or(current);
    let value = quoted.strip_prefix('\'')?.split('\'').next()?;
    value.parse().ok().map(Some)
}

/// Declares a durable quorum queue with `args` on a channel of its own. Its initial group size
/// ([`INITIAL_GROUP_SIZE`], `broker.quorum_group_size`) only places the queue's replicas when
/// it is created, yet RabbitMQ holds every redeclare to it: a queue that exists without it or
/// with another value refuses the declare (PRECONDITION_FAILED) and the service could never
/// connect. So when that argument is the one refused, the queue is declared again with the
/// value it already has (from the broker's answer): every other argument is still checked, and
/// the queue keeps its replicas (grown or shrunk with `rabbitmq-queues`, not by a redeclare).
/// Any other refusal is returned.
pub async fn declare_quorum_queue(
    conn: &Connection,
    name: &str,
    mut args: FieldTable,
) -> lapin::Result<()> {
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let ch = conn.create_channel().await?;
    let first = ch.queue_declare(name.into(), opts, args.clone()).await;
    let existing = match first {
        Ok(_) => {
            let _ = ch.close(200, "declared".into()).await;
            return Ok(());
        }
        Err(e) => match existing_group_size(&e) {
            Some(existing) => existing,
            None => return Err(e),
        },
    };
    let key = ShortString::from(INITIAL_GROUP_SIZE);
    let wanted = args.inner().get(&key).cloned();
    let mut inner = args.inner().clone();
    match existing {
        Some(n) => {
            inner.insert(key, AMQPValue::LongLongInt(n));
        }
        None => {
            inner.remove(&key);
        }
    }
    args = FieldTable::from(inner);
    tracing::info!(
        queue = name,
        configured = ?wanted,
        existing = ?existing,
        "queue exists with another initial group size: keeping its own (rabbitmq-queues grow/shrink changes replicas)"
    );
    let ch = conn.create_channel().await?;
    ch.queue_declare(name.into(), opts, args).await?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// How many dead letters the broker keeps, and for how long (the relay's `[dead_letters]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadLetterLimits {
    /// Most messages in each dead-letter queue; the oldest is dropped first beyond it.
    pub max_length: i64,
    /// Longest a dead letter is kept.
    pub message_ttl_ms: i64,
}

impl Default for DeadLetterLimits {
    fn default() -> Self {
        DeadLetterLimits {
            max_length: DEAD_LETTERS_MAX_LENGTH,
            message_ttl_ms: DEAD_LETTERS_TTL_H * 3_600_000,
        }
    }
}

/// The arguments of [`DEAD_QUEUE`] and [`DEAD_TALLY_QUEUE`]: classic, bounded by length (oldest
/// dropped first, so the newest dead letters are the ones kept for inspection) and by age. They
/// dead-letter nowhere, so a dropped dead letter is gone.
pub fn dead_queue_args(limits: &DeadLetterLimits) -> FieldTable {
    queue_args(&[
        ("x-queue-type", text("classic")),
        ("x-max-length", AMQPValue::LongLongInt(limits.max_length)),
        ("x-overflow", text("drop-head")),
        (
            "x-message-ttl",
            AMQPValue::LongLongInt(limits.message_ttl_ms),
        ),
    ])
}

/// The arguments of an appliance's own sync queue: quorum, one consumer at a time, dead-letters
/// a message after `delivery_limit` deliveries, and deleted by the broker after `expires_ms`
/// without a consumer (an appliance that never comes back stops collecting every change);
/// `group_size` is `broker.quorum_group_size` ([`quorum_args`]).
pub fn sync_queue_args(
    delivery_limit: i64,
    expires_ms: i64,
    group_size: Option<u16>,
) -> FieldTable {
    quorum_args(
        &[
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
            ("x-delivery-limit", AMQPValue::LongLongInt(delivery_limit)),
            ("x-dead-letter-exchange", text(DEAD_EXCHANGE)),
            ("x-expires", AMQPValue::LongLongInt(expires_ms)),
        ],
        group_size,
    )
}

/// Whether `e` is the broker's PRECONDITION_FAILED (406): a redeclare with other arguments, or
/// a delete the queue's type refuses.
pub fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// Whether `e` is the broker's NOT_FOUND (404); on a cluster also "home node … of durable
/// queue … is down or inaccessible".
pub fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Whether a connection's [`lapin::Event::Error`] ends the connection. lapin reports there a
/// channel the broker closed with a soft error too (a declare answered `NOT_FOUND`, say): that
/// closes one channel and the connection lives on; whoever used the channel sees its own
/// error. A hard error (connection-level), an I/O error or a connection no longer connected
/// ends it.
pub fn ends_connection(conn: &Connection, e: &lapin::Error) -> bool {
    let soft = matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(_)));
    !soft || !conn.status().connected()
}

/// What [`declare_queue_replacing`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declared {
    /// The queue existed with these arguments, or did not exist and now does.
    AsIs,
    /// It existed with other arguments (an earlier release's): it was deleted, with the
    /// messages it held, and declared again.
    Replaced,
}

/// Declares a durable queue with `args`; when the broker refuses because the queue exists with
/// other arguments (they changed between releases), deletes it and declares it again. Only the
/// initial group size of a quorum queue may differ without a replacement
/// ([`declare_quorum_queue`]). The
/// refusal closes the channel, so each step has a channel of its own. Only for queues whose
/// messages may be lost: a sync queue (the appliance catches up by replay or snapshot) or a
/// dead-letter queue.
pub async fn declare_queue_replacing(
    conn: &Connection,
    name: &str,
    args: FieldTable,
) -> lapin::Result<Declared> {
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    // A quorum queue differing only in its initial group size is kept as it is.
    match declare_quorum_queue(conn, name, args.clone()).await {
        Ok(()) => Ok(Declared::AsIs),
        Err(e) if is_precondition_failed(&e) => {
            let ch = conn.create_channel().await?;
            ch.queue_delete(name.into(), QueueDeleteOptions::default())
                .await?;
            ch.queue_declare(name.into(), opts, args).await?;
            let _ = ch.close(200, "replaced".into()).await;
            Ok(Declared::Replaced)
        }
        Err(e) => Err(e),
    }
}

/// Logs a dead-letter queue that could not be declared or bound because the broker answered
/// `NOT_FOUND`: it is a durable classic queue, so on a cluster it lives on one node, and while
/// that node is down nobody can declare it. Dead letters routed to it meanwhile are dropped
/// (they are for inspection and counting only); the next connect declares it again.
fn skip_unavailable_dead_queue(queue: &str, e: &lapin::Error) {
    tracing::warn!(
        queue,
        error = %e,
        "dead-letter queue unavailable (its node is down): skipped until the next connect"
    );
}

/// The relay's dead-letter queues, with its limits (replacing older, unbounded ones), each
/// bound to [`DEAD_EXCHANGE`], each on channels of its own: one whose home node is down
/// (`NOT_FOUND`) is logged and skipped, so it cannot keep the relay off the broker.
pub async fn declare_dead_letter_queues(
    conn: &Connection,
    limits: &DeadLetterLimits,
) -> lapin::Result<()> {
    for queue in [DEAD_QUEUE, DEAD_TALLY_QUEUE] {
        match declare_queue_replacing(conn, queue, dead_queue_args(limits)).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {
                skip_unavailable_dead_queue(queue, &e);
                continue;
            }
            Err(e) => return Err(e),
        }
        let ch = conn.create_channel().await?;
        match ch
            .queue_bind(
                queue.into(),
                DEAD_EXCHANGE.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {
                let _ = ch.close(200, "bound".into()).await;
            }
            Err(e) if is_not_found(&e) => skip_unavailable_dead_queue(queue, &e),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An appliance's side: [`DEAD_QUEUE`] is created with the default limits only when it does
/// not exist (skipped, logged, when its home node is down: `NOT_FOUND`), and left alone otherwise (its arguments are the relay's to choose; declaring
/// them from both sides would make two configurations fight over it).
pub async fn ensure_dead_queue(conn: &Connection) -> lapin::Result<()> {
    let ch = conn.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    match ch
        .queue_declare(DEAD_QUEUE.into(), passive, FieldTable::default())
        .await
    {
        Ok(_) => {
            let _ = ch.close(200, "exists".into()).await;
            Ok(())
        }
        Err(e) if is_not_found(&e) => {
            let ch = conn.create_channel().await?;
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            // Another service may have created it meanwhile, with other limits: fine.
            match ch
                .queue_declare(
                    DEAD_QUEUE.into(),
                    durable,
                    dead_queue_args(&DeadLetterLimits::default()),
                )
                .await
            {
                Ok(_) => match ch
                    .queue_bind(
                        DEAD_QUEUE.into(),
                        DEAD_EXCHANGE.into(),
                        "".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                {
                    Ok(()) => {
                        let _ = ch.close(200, "created".into()).await;
                        Ok(())
                    }
                    Err(e) if is_not_found(&e) => {
                        skip_unavailable_dead_queue(DEAD_QUEUE, &e);
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                Err(e) if is_precondition_failed(&e) => Ok(()),
                // The passive declare's NOT_FOUND also means "its home node is down" on a
                // cluster; then this declare is refused the same way.
                Err(e) if is_not_found(&e) => {
                    skip_unavailable_dead_queue(DEAD_QUEUE, &e);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
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

#[cfg(test)]
mod group_size_tests {
    use super::group_size_in_reply;

    #[test]
    fn the_existing_initial_group_size_is_read_from_the_refusal() {
        let q = "PRECONDITION_FAILED - inequivalent arg 'x-quorum-initial-group-size' for queue 'comatching.control' in vhost '/'";
        assert_eq!(
            group_size_in_reply(&format!(
                "{q}: received the value '3' of type 'long' but current is none"
            )),
            Some(None)
        );
        assert_eq!(
            group_size_in_reply(&format!(
                "{q}: received none but current is the value '1' of type 'long'"
            )),
            Some(Some(1))
        );
        assert_eq!(
            group_size_in_reply(&format!(
                "{q}: received the value '5' of type 'long' but current is the value '3' of type 'signedint'"
            )),
            Some(Some(3))
        );
        // As RabbitMQ 3.10 words two values of one type (measured).
        assert_eq!(
            group_size_in_reply(&format!("{q}: received '3' but current is '1'")),
            Some(Some(1))
        );
        // Another argument, or a wording we do not know: not ours to adopt.
        assert_eq!(
            group_size_in_reply(
                "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in vhost '/': received the value '5' of type 'long' but current is none"
            ),
            None
        );
        assert_eq!(group_size_in_reply(&format!("{q}: something else")), None);
    }
}
