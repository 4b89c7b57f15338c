//! Fixtures shared by the protocol's integration tests: fixed ids, fixed features and one fixed
//! value of every message kind, plus small hex and MessagePack helpers.
#![allow(dead_code)] // each test binary uses a different subset

use comatching_protocol::wire::{ENVELOPE_VERSION, MAGIC};
use comatching_protocol::{
    Age, ApplianceId, Candidate, ContactFrequency, Criterion, Digest, Epoch, Features, Gender,
    Hello, HelloAck, Hobby, HobbySet, Major, MatchOptions, MatchReply, MatchRequest, Message,
    ReplicaPosition, ReplyStatus, RequestId, Requester, SnapshotBegin, SnapshotChunk, SnapshotEnd,
    SnapshotUser, SyncEvent, SyncOp, UserId,
};

/// Fixed UUIDv7 user ids (version nibble 7, RFC 4122 variant), as they appear on the wire.
pub const USER_A: &str = "0190a1b2c3d47e5f8a6b7c8d9e0f1a2b";
pub const USER_B: &str = "0190a1b2c3d47001b00000000000000b";
pub const USER_C: &str = "0190a1b2c3d47002900000000000000c";
/// Request ids need not be v7; this one is a v4 on purpose.
pub const REQUEST: &str = "5f0c6a1e2b3d4c5e8f70123456789abc";
pub const EPOCH: Epoch = Epoch(0x1122_3344_5566_7788);

pub fn uid(hex: &str) -> UserId {
    hex.parse().expect("fixture user id")
}

pub fn request_id() -> RequestId {
    REQUEST.parse().expect("fixture request id")
}

pub fn features_a() -> Features {
    Features {
        gender: Gender::Female,
        age: Age::new(23).unwrap(),
        mbti: "INFP".parse().unwrap(),
        hobbies: HobbySet::from_hobbies(&[Hobby::Arts, Hobby::Travel]).unwrap(),
        contact_frequency: ContactFrequency::Normal,
        major: Major::new("Computer Science").unwrap(),
        dont_pick_me: false,
    }
}

pub fn features_b() -> Features {
    Features {
        gender: Gender::Male,
        age: Age::new(40).unwrap(),
        mbti: "ESTJ".parse().unwrap(),
        hobbies: HobbySet::from_hobbies(&[Hobby::Sports, Hobby::DailyStudy, Hobby::Game]).unwrap(),
        contact_frequency: ContactFrequency::Rare,
        major: Major::new("경영학과").unwrap(),
        dont_pick_me: true,
    }
}

pub fn options() -> MatchOptions {
    serde_json::from_str(
        r#"{"age":"older","mbti":"EN","hobby":"sports","contact_frequency":"any",
            "exclude_same_major":true,"important":"age"}"#,
    )
    .unwrap()
}

pub fn sync_upsert() -> Message {
    Message::SyncEvent(SyncEvent {
        epoch: EPOCH,
        seq: 42,
        user_id: uid(USER_A),
        version: 3,
        op: SyncOp::Upsert(features_a()),
    })
}

pub fn sync_delete() -> Message {
    Message::SyncEvent(SyncEvent {
        epoch: EPOCH,
        seq: 43,
        user_id: uid(USER_B),
        version: 7,
        op: SyncOp::Delete,
    })
}

pub fn match_request() -> Message {
    Message::MatchRequest(MatchRequest {
        request_id: request_id(),
        deadline_unix_ms: 1_750_000_000_000,
        requester: Requester {
            user_id: uid(USER_A),
            features: features_a(),
        },
        options: options(),
        exclusions: vec![uid(USER_B), uid(USER_C)],
        k: 8,
    })
}

pub fn match_reply_ok() -> Message {
    Message::MatchReply(MatchReply {
        request_id: request_id(),
        status: ReplyStatus::Ok,
        candidates: vec![
            Candidate {
                user_id: uid(USER_B),
                score: 0.75,
            },
            Candidate {
                user_id: uid(USER_C),
                score: 0.5,
            },
        ],
        relaxed: vec![Criterion::Age],
        position: ReplicaPosition {
            epoch: Some(EPOCH),
            applied_seq: 43,
        },
    })
}

pub fn match_reply_no_candidate() -> Message {
    Message::MatchReply(MatchReply {
        request_id: request_id(),
        status: ReplyStatus::NoCandidate,
        candidates: vec![],
        relaxed: vec![],
        position: ReplicaPosition {
            epoch: Some(EPOCH),
            applied_seq: 43,
        },
    })
}

pub fn appliance() -> ApplianceId {
    "festival-box-1".parse().unwrap()
}

pub fn hello_synced() -> Message {
    Message::Hello(Hello {
        appliance_id: appliance(),
        epoch: Some(EPOCH),
        applied_seq: 43,
        count: 2,
        digest: Digest(0xdead_beef_0bad_f00d),
    })
}

pub fn hello_ack() -> Message {
    Message::HelloAck(HelloAck {
        appliance_id: appliance(),
        epoch: EPOCH,
        relay_seq: 43,
    })
}

pub fn hello_empty() -> Message {
    Message::Hello(Hello {
        appliance_id: appliance(),
        epoch: None,
        applied_seq: 0,
        count: 0,
        digest: Digest(0),
    })
}

pub fn snapshot_begin() -> Message {
    Message::SnapshotBegin(SnapshotBegin {
        epoch: EPOCH,
        snapshot_id: 9,
        high_water_seq: 43,
    })
}

pub fn snapshot_chunk() -> Message {
    Message::SnapshotChunk(SnapshotChunk {
        epoch: EPOCH,
        snapshot_id: 9,
        index: 0,
        users: vec![
            SnapshotUser {
                user_id: uid(USER_A),
                version: 3,
                features: features_a(),
            },
            SnapshotUser {
                user_id: uid(USER_C),
                version: 1,
                features: features_b(),
            },
        ],
    })
}

pub fn snapshot_end() -> Message {
    Message::SnapshotEnd(SnapshotEnd {
        epoch: EPOCH,
        snapshot_id: 9,
        high_water_seq: 43,
        chunks: 1,
        count: 2,
        digest: Digest(0x0123_4567_89ab_cdef),
    })
}

/// Every fixture, named.
pub fn all_messages() -> Vec<(&'static str, Message)> {
    vec![
        ("sync_upsert", sync_upsert()),
        ("sync_delete", sync_delete()),
        ("match_request", match_request()),
        ("match_reply_ok", match_reply_ok()),
        ("match_reply_no_candidate", match_reply_no_candidate()),
        ("hello_synced", hello_synced()),
        ("hello_empty", hello_empty()),
        ("snapshot_begin", snapshot_begin()),
        ("snapshot_chunk", snapshot_chunk()),
        ("snapshot_end", snapshot_end()),
    ]
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// `MAGIC | version | body`: what `Envelope::encode` would produce for a hand-built body.
pub fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 3);
    out.extend_from_slice(&MAGIC);
    out.push(ENVELOPE_VERSION);
    out.extend_from_slice(body);
    out
}

/// Any serde value as a named-field MessagePack body inside a current envelope.
pub fn frame_value<T: serde::Serialize + ?Sized>(v: &T) -> Vec<u8> {
    framed(&rmp_serde::to_vec_named(v).expect("encode"))
}

/// A message as a JSON value (same shape rmp-serde uses: externally tagged enums, named
/// fields), to edit and re-encode with `frame_value`.
pub fn as_value(m: &Message) -> serde_json::Value {
    serde_json::to_value(m).expect("to json value")
}
