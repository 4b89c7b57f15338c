//! `comatching-protocol`: the vocabulary both services share.
//!
//! It owns the domain types (validated on construction, so nothing past a boundary is a raw
//! string), the match cost function, the order-independent replica digest, and the wire
//! messages with their bounded MessagePack codec. It performs no I/O — no sockets, no files, no
//! clocks — except in the `amqp` module, behind the feature of that name, which only the two
//! binaries switch on: the one way both connect to the broker (plain or TLS).

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod config;
pub mod digest;
pub mod domain;
pub mod error;
pub mod failover;
pub mod ids;
pub mod mac;
pub mod options;
#[cfg(feature = "utoipa")]
mod schema;
pub mod stages;
pub mod topology;
pub mod wire;

pub use digest::Digest;
pub use domain::{Age, ContactFrequency, Features, Gender, Hobby, HobbySet, Major, Mbti};
pub use error::ValidationError;
pub use ids::{ApplianceId, Epoch, RequestId, UserId};
pub use options::{
    AgePreference, ContactPreference, CostTable, Criterion, HobbyPreference, Important,
    MatchOptions, MbtiPreference,
};
pub use wire::{
    Candidate, DecodeError, Envelope, Hello, HelloAck, MatchReply, MatchRequest, Message,
    ReplicaPosition, ReplyStatus, Requester, SnapshotBegin, SnapshotChunk, SnapshotEnd,
    SnapshotUser, SyncEvent, SyncOp, WireLimits,
};
