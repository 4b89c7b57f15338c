//! Golden tests: the exact bytes of every message kind, and forward compatibility.
//!
//! WIRE COMPATIBILITY: the hex strings below are what a deployed relay and appliance exchange.
//! If one of these tests fails because the encoding changed (a renamed or reordered field, a
//! new enum representation, another integer width, an rmp-serde upgrade that encodes
//! differently, ...), that is a wire-compatibility break: receivers already in the field will
//! misread or reject the new bytes. Do not just paste the new bytes. Either keep the old
//! encoding, or bump `ENVELOPE_VERSION` (and keep decoding the old version during the rolling
//! upgrade) and then update the goldens. Adding a field is the one change that stays compatible
//! (receivers ignore unknown fields, see the forward-compatibility tests below; the exception is
//! `MatchOptions`, which refuses unknown fields) — but it still changes these bytes, so update
//! them consciously.

mod common;

use comatching_protocol::wire::ENVELOPE_VERSION;
use comatching_protocol::{Envelope, Epoch, Message, WireLimits};
use common::*;
use serde::Serialize;
use serde_json::{Value, json};

const SYNC_UPSERT: &str = concat!(
    "434d0181aa73796e635f6576656e7485a565706f6368cf1122334455667788a37365712aa7757365",
    "725f6964d9203031393061316232633364343765356638613662376338643965306631613262a776",
    "657273696f6e03a26f7081a675707365727487a667656e646572a666656d616c65a361676517a46d",
    "627469a4494e4650a7686f626269657392a461727473a674726176656cb1636f6e746163745f6672",
    "657175656e6379a66e6f726d616ca56d616a6f72b0436f6d707574657220536369656e6365ac646f",
    "6e745f7069636b5f6d65c2",
);

const SYNC_DELETE: &str = concat!(
    "434d0181aa73796e635f6576656e7485a565706f6368cf1122334455667788a37365712ba7757365",
    "725f6964d9203031393061316232633364343730303162303030303030303030303030303062a776",
    "657273696f6e07a26f70a664656c657465",
);

const MATCH_REQUEST: &str = concat!(
    "434d0181ad6d617463685f7265717565737486aa726571756573745f6964d9203566306336613165",
    "326233643463356538663730313233343536373839616263b0646561646c696e655f756e69785f6d",
    "73cf000001977420dc00a972657175657374657282a7757365725f6964d920303139306131623263",
    "3364343765356638613662376338643965306631613262a8666561747572657387a667656e646572",
    "a666656d616c65a361676517a46d627469a4494e4650a7686f626269657392a461727473a6747261",
    "76656cb1636f6e746163745f6672657175656e6379a66e6f726d616ca56d616a6f72b0436f6d7075",
    "74657220536369656e6365ac646f6e745f7069636b5f6d65c2a76f7074696f6e7386a3616765a56f",
    "6c646572a46d627469a2454ea5686f626279a673706f727473b1636f6e746163745f667265717565",
    "6e6379a3616e79b26578636c7564655f73616d655f6d616a6f72c3a9696d706f7274616e74a36167",
    "65aa6578636c7573696f6e7392d92030313930613162326333643437303031623030303030303030",
    "30303030303062d92030313930613162326333643437303032393030303030303030303030303030",
    "63a16b08",
);

const MATCH_REPLY_OK: &str = concat!(
    "434d0181ab6d617463685f7265706c7985aa726571756573745f6964d92035663063366131653262",
    "33643463356538663730313233343536373839616263a6737461747573a26f6baa63616e64696461",
    "7465739282a7757365725f6964d92030313930613162326333643437303031623030303030303030",
    "30303030303062a573636f7265ca3f40000082a7757365725f6964d9203031393061316232633364",
    "343730303239303030303030303030303030303063a573636f7265ca3f000000a772656c61786564",
    "91a3616765a8706f736974696f6e82a565706f6368cf1122334455667788ab6170706c6965645f73",
    "65712b",
);

const MATCH_REPLY_NO_CANDIDATE: &str = concat!(
    "434d0181ab6d617463685f7265706c7985aa726571756573745f6964d92035663063366131653262",
    "33643463356538663730313233343536373839616263a6737461747573ac6e6f5f63616e64696461",
    "7465aa63616e6469646174657390a772656c6178656490a8706f736974696f6e82a565706f6368cf",
    "1122334455667788ab6170706c6965645f7365712b",
);

const HELLO_SYNCED: &str = concat!(
    "434d0181a568656c6c6f85ac6170706c69616e63655f6964ae666573746976616c2d626f782d31a5",
    "65706f6368cf1122334455667788ab6170706c6965645f7365712ba5636f756e7402a66469676573",
    "74cfdeadbeef0badf00d",
);

const HELLO_EMPTY: &str = concat!(
    "434d0181a568656c6c6f85ac6170706c69616e63655f6964ae666573746976616c2d626f782d31a5",
    "65706f6368c0ab6170706c6965645f73657100a5636f756e7400a664696765737400",
);

const SNAPSHOT_BEGIN: &str = concat!(
    "434d0181ae736e617073686f745f626567696e83a565706f6368cf1122334455667788ab736e6170",
    "73686f745f696409ae686967685f77617465725f7365712b",
);

const SNAPSHOT_CHUNK: &str = concat!(
    "434d0181ae736e617073686f745f6368756e6b84a565706f6368cf1122334455667788ab736e6170",
    "73686f745f696409a5696e64657800a575736572739283a7757365725f6964d92030313930613162",
    "32633364343765356638613662376338643965306631613262a776657273696f6e03a86665617475",
    "72657387a667656e646572a666656d616c65a361676517a46d627469a4494e4650a7686f62626965",
    "7392a461727473a674726176656cb1636f6e746163745f6672657175656e6379a66e6f726d616ca5",
    "6d616a6f72b0436f6d707574657220536369656e6365ac646f6e745f7069636b5f6d65c283a77573",
    "65725f6964d9203031393061316232633364343730303239303030303030303030303030303063a7",
    "76657273696f6e01a8666561747572657387a667656e646572a46d616c65a361676528a46d627469",
    "a44553544aa7686f626269657393a673706f727473ab6461696c795f7374756479a467616d65b163",
    "6f6e746163745f6672657175656e6379a472617265a56d616a6f72aceab2bdec9881ed9599eab3bc",
    "ac646f6e745f7069636b5f6d65c3",
);

const SNAPSHOT_END: &str = concat!(
    "434d0181ac736e617073686f745f656e6486a565706f6368cf1122334455667788ab736e61707368",
    "6f745f696409ae686967685f77617465725f7365712ba66368756e6b7301a5636f756e7402a66469",
    "67657374cf0123456789abcdef",
);

const HELLO_ACK: &str = concat!(
    "434d0181a968656c6c6f5f61636b83ac6170706c69616e63655f6964ae666573746976616c2d626f",
    "782d31a565706f6368cf1122334455667788a972656c61795f7365712b",
);

fn cases() -> Vec<(&'static str, Message, &'static str)> {
    vec![
        ("sync_upsert", sync_upsert(), SYNC_UPSERT),
        ("sync_delete", sync_delete(), SYNC_DELETE),
        ("match_request", match_request(), MATCH_REQUEST),
        ("match_reply_ok", match_reply_ok(), MATCH_REPLY_OK),
        (
            "match_reply_no_candidate",
            match_reply_no_candidate(),
            MATCH_REPLY_NO_CANDIDATE,
        ),
        ("hello_synced", hello_synced(), HELLO_SYNCED),
        ("hello_empty", hello_empty(), HELLO_EMPTY),
        ("hello_ack", hello_ack(), HELLO_ACK),
        ("snapshot_begin", snapshot_begin(), SNAPSHOT_BEGIN),
        ("snapshot_chunk", snapshot_chunk(), SNAPSHOT_CHUNK),
        ("snapshot_end", snapshot_end(), SNAPSHOT_END),
    ]
}

#[test]
fn envelope_version_is_pinned() {
    // The goldens below are version-1 bytes; bumping the version means revisiting them.
    assert_eq!(ENVELOPE_VERSION, 1);
}

#[test]
fn every_message_kind_encodes_to_its_golden_bytes() {
    let mut mismatches = Vec::new();
    for (name, msg, golden) in cases() {
        let got = to_hex(&Envelope::encode(&msg));
        if got != golden {
            mismatches.push(format!("{name}:\n  expected {golden}\n  got      {got}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "wire encoding changed (a compatibility break, see the module docs):\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn golden_bytes_decode_to_the_fixture_and_re_encode_identically() {
    for (name, msg, golden) in cases() {
        let bytes = from_hex(golden);
        let decoded = Envelope::decode(&bytes, &WireLimits::default())
            .unwrap_or_else(|e| panic!("{name}: golden bytes do not decode: {e}"));
        assert_eq!(decoded, msg, "{name}");
        assert_eq!(Envelope::encode(&decoded), bytes, "{name}");
    }
}

#[test]
fn decode_of_encode_is_identity() {
    for (name, msg, _) in cases() {
        let back = Envelope::decode(&Envelope::encode(&msg), &WireLimits::default());
        assert_eq!(back.as_ref(), Ok(&msg), "{name}");
        assert_eq!(back.unwrap().kind(), msg.kind());
    }
}

// ---- forward compatibility --------------------------------------------------------------------
//
// A newer sender may add fields during a rolling upgrade; an older receiver must ignore them.
// Bodies here are built by hand (from a JSON value or a look-alike struct) with rmp-serde.

/// The object inside the one-key map of an externally tagged `Message`.
fn inner(v: &mut Value) -> &mut serde_json::Map<String, Value> {
    let outer = v.as_object_mut().expect("message is a map");
    assert_eq!(outer.len(), 1);
    outer.values_mut().next().unwrap().as_object_mut().unwrap()
}

fn decode_value(v: &Value) -> Message {
    Envelope::decode(&frame_value(v), &WireLimits::default()).expect("decodes")
}

#[test]
fn unknown_top_level_field_is_ignored_for_every_kind() {
    for (name, msg, _) in cases() {
        let mut v = as_value(&msg);
        inner(&mut v).insert("added_in_v1_1".into(), json!(12345));
        // A structured value too: it must be skipped whole.
        inner(&mut v).insert(
            "zz_extension".into(),
            json!({"nested": [1, "two", {"three": null}], "flag": true}),
        );
        assert_eq!(decode_value(&v), msg, "{name}");
    }
}

#[test]
fn unknown_fields_in_nested_structs_are_ignored() {
    // Features inside an upsert.
    let msg = sync_upsert();
    let mut v = as_value(&msg);
    inner(&mut v)["op"]["upsert"]
        .as_object_mut()
        .unwrap()
        .insert("height_cm".into(), json!(170));
    assert_eq!(decode_value(&v), msg);

    // Requester and its features.
    let msg = match_request();
    let mut v = as_value(&msg);
    let req = inner(&mut v)["requester"].as_object_mut().unwrap();
    req.insert("nickname_hash".into(), json!("ab12"));
    req["features"]
        .as_object_mut()
        .unwrap()
        .insert("smoker".into(), json!(false));
    assert_eq!(decode_value(&v), msg);

    // Candidates and the replica position.
    let msg = match_reply_ok();
    let mut v = as_value(&msg);
    let body = inner(&mut v);
    for c in body["candidates"].as_array_mut().unwrap() {
        c.as_object_mut()
            .unwrap()
            .insert("explain".into(), json!(["age", "mbti"]));
    }
    body["position"]
        .as_object_mut()
        .unwrap()
        .insert("lag_ms".into(), json!(12));
    assert_eq!(decode_value(&v), msg);

    // Snapshot users.
    let msg = snapshot_chunk();
    let mut v = as_value(&msg);
    for u in inner(&mut v)["users"].as_array_mut().unwrap() {
        u.as_object_mut()
            .unwrap()
            .insert("last_seen".into(), json!(1_750_000_000_000u64));
    }
    assert_eq!(decode_value(&v), msg);
}

#[test]
fn field_order_does_not_matter() {
    // serde_json's map is sorted by key, so these bodies list fields alphabetically, not in
    // declaration order as `Envelope::encode` does.
    for (name, msg, golden) in cases() {
        let reordered = frame_value(&as_value(&msg));
        if to_hex(&reordered) == golden {
            // Declared in alphabetical order already (HelloAck): nothing to reorder.
            continue;
        }
        assert_eq!(
            Envelope::decode(&reordered, &WireLimits::default()),
            Ok(msg),
            "{name}"
        );
    }
}

/// What a hypothetical newer sender's `SnapshotBegin` might look like.
#[derive(Serialize)]
struct SnapshotBeginV2 {
    epoch: Epoch,
    snapshot_id: u64,
    high_water_seq: u64,
    compression: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum MessageV2 {
    SnapshotBegin(SnapshotBeginV2),
}

#[test]
fn look_alike_struct_with_an_extra_field_decodes() {
    let newer = MessageV2::SnapshotBegin(SnapshotBeginV2 {
        epoch: EPOCH,
        snapshot_id: 9,
        high_water_seq: 43,
        compression: "zstd",
    });
    let bytes = frame_value(&newer);
    assert_eq!(
        Envelope::decode(&bytes, &WireLimits::default()),
        Ok(snapshot_begin())
    );
}

#[test]
fn unknown_field_inside_match_options_is_the_one_exception() {
    // `MatchOptions` deserialises through a `deny_unknown_fields` struct (it is shared with the
    // HTTP API, where a misspelt option must be a 400). On the wire that means adding a match
    // option is NOT forward compatible: it needs an envelope version bump. This test records
    // the current behaviour; if options are made tolerant on the wire, flip the assertion.
    let mut v = as_value(&match_request());
    inner(&mut v)["options"]
        .as_object_mut()
        .unwrap()
        .insert("new_pref".into(), json!("x"));
    let res = Envelope::decode(&frame_value(&v), &WireLimits::default());
    assert!(
        matches!(&res, Err(comatching_protocol::DecodeError::Malformed(m)) if m.contains("new_pref")),
        "{res:?}"
    );
}
