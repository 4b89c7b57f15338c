//! Wire messages and their envelope.
//!
//! Every message on the broker is `MAGIC (2 bytes) | envelope version (1 byte) | MessagePack
//! body`. Bodies are encoded with field names (`rmp_serde::to_vec_named`) so that a newer sender
//! may add fields without breaking an older receiver during a rolling upgrade; anything that
//! changes the meaning of a field bumps the envelope version instead.
//!
//! Decoding is bounded: the whole message is checked against `WireLimits::max_body` before any
//! parsing, nesting depth is capped, every domain value re-validates itself while deserialising,
//! and each message's collection lengths are checked by `Message::validate`. Untrusted bytes
//! produce a `DecodeError`, never a panic and never an allocation larger than the input allows.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::domain::Features;
use crate::ids::{ApplianceId, Epoch, RequestId, UserId};
use crate::options::{Criterion, MatchOptions};

pub const MAGIC: [u8; 2] = *b"CM";
pub const ENVELOPE_VERSION: u8 = 1;

/// Upper bounds on what a receiver accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireLimits {
    /// Largest accepted message, envelope included.
    pub max_body: usize,
    /// Deepest accepted MessagePack nesting.
    pub max_depth: usize,
}

impl Default for WireLimits {
    fn default() -> Self {
        WireLimits {
            max_body: 64 * 1024,
            max_depth: 16,
        }
    }
}

/// Most user ids a match request may exclude (pairs already made with the requester).
pub const MAX_EXCLUSIONS: usize = 1024;
/// Most candidates a request may ask for or a reply may carry.
pub const MAX_K: u16 = 64;
/// Most users in one snapshot chunk.
pub const MAX_CHUNK_USERS: usize = 200;

/// Why bytes from the broker were refused. Each variant maps to a stable code (`code()`), used
/// in logs and dead-letter counters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("message does not start with the COMAtching magic bytes")]
    BadMagic,
    #[error("unknown envelope version {0}")]
    UnknownVersion(u8),
    #[error("malformed body: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the body")]
    TrailingBytes(usize),
    #[error("invalid message: {0}")]
    Invalid(String),
}

impl DecodeError {
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::BadMagic => "bad_magic",
            DecodeError::UnknownVersion(_) => "unknown_version",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::TrailingBytes(_) => "trailing_bytes",
            DecodeError::Invalid(_) => "invalid",
        }
    }
}

/// One change to the matchable pool, in the relay's outbox order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncEvent {
    pub epoch: Epoch,
    /// Gap-free position in the relay's outbox, starting at 1.
    pub seq: u64,
    pub user_id: UserId,
    /// Per-user version, starting at 1; a receiver applies only newer versions.
    pub version: u64,
    pub op: SyncOp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncOp {
    Upsert(Features),
    /// The user left the pool (withdrew, opted out, or reached the pick cap).
    Delete,
}

/// The requester as the matcher needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub user_id: UserId,
    pub features: Features,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchRequest {
    pub request_id: RequestId,
    /// After this instant (Unix ms) the relay no longer waits; the appliance drops it unread.
    pub deadline_unix_ms: u64,
    pub requester: Requester,
    pub options: MatchOptions,
    /// Users already paired with the requester, in either direction.
    pub exclusions: Vec<UserId>,
    /// How many ranked candidates to return.
    pub k: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyStatus {
    Ok,
    NoCandidate,
    Expired,
    Invalid,
    NotReady,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub user_id: UserId,
    /// Weighted preference score in [0, 1].
    pub score: f32,
}

/// Where an appliance's replica stands: which lineage, and how far along it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReplicaPosition {
    pub epoch: Option<Epoch>,
    pub applied_seq: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatchReply {
    pub request_id: RequestId,
    pub status: ReplyStatus,
    /// Best first. Non-empty exactly when `status` is `ok`.
    pub candidates: Vec<Candidate>,
    /// Preferences the matcher had to relax (the important option when nobody met it).
    pub relaxed: Vec<Criterion>,
    pub position: ReplicaPosition,
}

/// Sent by an appliance at start, on reconnect, and when it detects a gap or a new epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub appliance_id: ApplianceId,
    /// `None` when the replica is empty and has never synced.
    pub epoch: Option<Epoch>,
    pub applied_seq: u64,
    pub count: u64,
    pub digest: Digest,
}

/// The relay's answer to a `Hello`, sent to the appliance's own queue *after* whatever replay or
/// snapshot the hello called for (same channel, same queue, so it arrives after them). An
/// appliance that has applied up to `relay_seq` of `epoch` when it reads this is caught up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub appliance_id: ApplianceId,
    pub epoch: Epoch,
    /// The relay's last outbox seq when it answered.
    pub relay_seq: u64,
}

/// Opens a snapshot: every live user follows, stamped as of `high_water_seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotBegin {
    pub epoch: Epoch,
    pub snapshot_id: u64,
    pub high_water_seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotUser {
    pub user_id: UserId,
    pub version: u64,
    pub features: Features,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub epoch: Epoch,
    pub snapshot_id: u64,
    /// 0-based, contiguous.
    pub index: u32,
    pub users: Vec<SnapshotUser>,
}

/// Closes a snapshot; the receiver checks its staging copy against `count` and `digest` before
/// swapping it in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEnd {
    pub epoch: Epoch,
    pub snapshot_id: u64,
    pub high_water_seq: u64,
    pub chunks: u32,
    pub count: u64,
    pub digest: Digest,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    SyncEvent(SyncEvent),
    MatchRequest(MatchRequest),
    MatchReply(MatchReply),
    Hello(Hello),
    SnapshotBegin(SnapshotBegin),
    SnapshotChunk(SnapshotChunk),
    SnapshotEnd(SnapshotEnd),
    HelloAck(HelloAck),
}

impl Message {
    /// Checks what types alone cannot: collection sizes, ranges, finite scores, and that the
    /// status and candidate list agree.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let invalid = |m: &str| Err(DecodeError::Invalid(m.to_owned()));
        match self {
            Message::SyncEvent(e) => {
                if e.seq == 0 || e.version == 0 {
                    return invalid("seq and version start at 1");
                }
            }
            Message::MatchRequest(r) => {
                if r.k == 0 || r.k > MAX_K {
                    return invalid("k out of range");
                }
                if r.exclusions.len() > MAX_EXCLUSIONS {
                    return invalid("too many exclusions");
                }
            }
            Message::MatchReply(r) => {
                if r.candidates.len() > usize::from(MAX_K) {
                    return invalid("too many candidates");
                }
                if r.relaxed.len() > 4 {
                    return invalid("too many relaxed criteria");
                }
                if r.candidates
                    .iter()
                    .any(|c| !c.score.is_finite() || !(0.0..=1.0).contains(&c.score))
                {
                    return invalid("scores must be finite and within [0, 1]");
                }
                if (r.status == ReplyStatus::Ok) == r.candidates.is_empty() {
                    return invalid("status ok must come with candidates, and only it");
                }
            }
            Message::Hello(_) | Message::SnapshotBegin(_) => {}
            Message::SnapshotChunk(c) => {
                if c.users.len() > MAX_CHUNK_USERS {
                    return invalid("too many users in a snapshot chunk");
                }
                if c.users.iter().any(|u| u.version == 0) {
                    return invalid("versions start at 1");
                }
            }
            Message::SnapshotEnd(_) | Message::HelloAck(_) => {}
        }
        Ok(())
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::SyncEvent(_) => "sync_event",
            Message::MatchRequest(_) => "match_request",
            Message::MatchReply(_) => "match_reply",
            Message::Hello(_) => "hello",
            Message::SnapshotBegin(_) => "snapshot_begin",
            Message::SnapshotChunk(_) => "snapshot_chunk",
            Message::SnapshotEnd(_) => "snapshot_end",
            Message::HelloAck(_) => "hello_ack",
        }
    }
}

/// The codec: the only way bytes become messages and back.
pub struct Envelope;

impl Envelope {
    pub fn encode(msg: &Message) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&MAGIC);
        out.push(ENVELOPE_VERSION);
        rmp_serde::encode::write_named(&mut out, msg)
            .expect("encoding plain data into a Vec cannot fail");
        out
    }

    pub fn decode(bytes: &[u8], limits: &WireLimits) -> Result<Message, DecodeError> {
        if bytes.len() > limits.max_body {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max: limits.max_body,
            });
        }
        if bytes.len() < 3 || bytes[..2] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if bytes[2] != ENVELOPE_VERSION {
            return Err(DecodeError::UnknownVersion(bytes[2]));
        }
        let mut body = &bytes[3..];
        // `Deserializer::new` over `&mut &[u8]` advances `body` as it reads, so what is left
        // afterwards really is the trailing part. (`from_read_ref(&mut body)` copies the slice
        // and never advances it, which made every well-formed message look like trailing
        // bytes.) Strings and binaries are read through `Read::take`, so their buffers grow
        // only with the bytes actually present, never with a declared length.
        let mut de = rmp_serde::Deserializer::new(&mut body);
        de.set_max_depth(limits.max_depth);
        let msg =
            Message::deserialize(&mut de).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        drop(de);
        if !body.is_empty() {
            return Err(DecodeError::TrailingBytes(body.len()));
        }
        msg.validate()?;
        Ok(msg)
    }
}
