//! The broker topology: the names and limits both services declare (the declaring itself is
//! [`crate::amqp::declare_shared_topology`], feature `amqp`), and that the Nix broker
//! definitions mirror (nix/lib/rabbitmq.nix; its drift test reads this file).
//!
//! | name | kind | from → to |
//! |---|---|---|
//! | `comatching.sync` | fanout exchange | relay → every appliance's sync queue |
//! | `comatching.sync.<id>` | quorum queue, single active consumer | one appliance's events |
//! | `comatching.match.transient` | classic queue, non-durable, transient messages | relay → any appliance (RPC) |
//! | `comatching.control` | quorum queue | appliance hellos → relay |
//! | `comatching.dead` | fanout exchange + classic queue (bounded) | dead letters of all the above |
//! | `comatching.dead.tally` | classic queue (bounded), bound to `comatching.dead` | the relay counts dead letters |
//!
//! Match requests ride a classic queue, not a quorum one: a request is worthless after its
//! deadline (seconds), and a lost one is voided by the relay's timeout anyway, so a replicated,
//! fsynced log bought nothing for them and cost a third of the broker's CPU per match.
//!
//! The match queue is also *non-durable* (issue 15): on a cluster a classic queue lives on one
//! node. A durable one whose node is down stays in the cluster's metadata and every declare,
//! consume or publish elsewhere answers `NOT_FOUND` ("home node … is down or inaccessible")
//! until that node returns — nobody could fail over. A non-durable one is removed when its node
//! goes, so whichever service reconnects first declares it again on a live node. Its
//! messages were transient anyway: what the dead node held times out and the relay voids it.

/// Sync events, fanned out to every appliance's own queue.
pub const SYNC_EXCHANGE: &str = "comatching.sync";
/// Where every queue dead-letters.
pub const DEAD_EXCHANGE: &str = "comatching.dead";
/// Bound to [`DEAD_EXCHANGE`]; kept for inspection, consumed by nobody, bounded by length
/// (oldest dropped first) and message age.
pub const DEAD_QUEUE: &str = "comatching.dead";
/// Bound to [`DEAD_EXCHANGE`] too; the relay consumes it to count dead letters by reason.
pub const DEAD_TALLY_QUEUE: &str = "comatching.dead.tally";
/// Default most dead letters kept in [`DEAD_QUEUE`] (and [`DEAD_TALLY_QUEUE`]).
pub const DEAD_LETTERS_MAX_LENGTH: i64 = 10000;
/// Default longest a dead letter is kept, in hours.
pub const DEAD_LETTERS_TTL_H: i64 = 24;
/// Default time an appliance's sync queue survives without a consumer, in hours.
pub const SYNC_QUEUE_EXPIRES_H: i64 = 72;
/// Appliance hellos to the relay.
pub const CONTROL_QUEUE: &str = "comatching.control";
/// Match requests, relay to whichever appliance takes them (non-durable; see above).
pub const MATCH_QUEUE: &str = "comatching.match.transient";
/// The match queue of the first releases (a quorum queue).
pub const LEGACY_MATCH_QUEUE: &str = "comatching.match";
/// The match queue of the release before issue 15 (a durable classic queue).
pub const DURABLE_MATCH_QUEUE: &str = "comatching.match.requests";
/// The match queues of earlier releases. A queue's type or durability cannot change in place,
/// so each new one has a new name; the relay deletes these once nobody consumes them.
pub const LEGACY_MATCH_QUEUES: [&str; 2] = [LEGACY_MATCH_QUEUE, DURABLE_MATCH_QUEUE];
/// Deliveries of one hello before the broker dead-letters it.
pub const CONTROL_DELIVERY_LIMIT: i64 = 5;
/// The longest a match request may wait in its queue whatever its own expiration says: the
/// longest deadline the relay accepts (`matching.deadline_ms` ≤ 120 s). A request that is
/// requeued forever (an appliance that keeps failing on it) leaves by this at the latest.
pub const MATCH_QUEUE_TTL_MS: i64 = 120000;

/// One appliance's sync queue, bound to [`SYNC_EXCHANGE`].
pub fn sync_queue(appliance_id: &str) -> String {
    format!("{SYNC_EXCHANGE}.{appliance_id}")
}
