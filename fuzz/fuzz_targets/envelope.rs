//! What a client parses from a peer's message stream and from the
//! coordinator's group stream: `Envelope::parse`, `GroupEvent::parse`, and
//! `codec::decode_value` for a typed value, all on the same whole message.
//!
//! Checks: no panic; whatever parses gives back the input with `to_bytes`
//! (an envelope is its bytes, nothing is normalised away), except an
//! eviction reason that is not UTF-8, which is read lossily; a parse error
//! happens exactly for the inputs the layout in protocol.md §16.1 and §19.2
//! rules out; a decoded value re-encodes and decodes to the same value; and no single
//! allocation while decoding a value is larger than the bound
//! `decode_value` documents: the read step for the input's size (16 KiB,
//! 256 KiB, 4 MiB or 64 MiB) or serde's 1 MiB cap on what a declared
//! collection length reserves, whichever is larger.
#![no_main]

use std::collections::BTreeMap;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use qmesh_fuzz::check_allocation;
use qmesh_proto::codec::{decode_value, encode_value};
use qmesh_proto::envelope::{Envelope, GroupEvent};
use serde::{Deserialize, Serialize};

/// A typed message of the kind an application sends with `send_value`:
/// strings, nested sequences, a map, an enum and an option.
/// (Not recursive: bincode has no depth limit, and the fuzzer's inputs
/// are too short to say anything about stack depth.)
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Sample {
    name: String,
    tags: Vec<String>,
    data: Vec<u8>,
    grid: Vec<Vec<u32>>,
    map: BTreeMap<u32, String>,
    kind: Kind,
    extra: Option<Kind>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Kind {
    Plain,
    Sized(u64),
    Named { label: String },
}

/// The largest single allocation `decode_value` documents for a body of
/// `len` bytes: the read step for the body, or serde's 1 MiB cap on what a
/// declared collection length can reserve, whichever is larger.
fn bound(len: usize) -> usize {
    let step = [16 << 10, 256 << 10, 4 << 20, 64 << 20]
        .into_iter()
        .find(|s| *s >= len)
        .unwrap_or(64 << 20);
    step.max(1 << 20)
}

fuzz_target!(|data: &[u8]| {
    let msg = Bytes::copy_from_slice(data);

    match Envelope::parse(msg.clone()) {
        Ok(e) => assert_eq!(e.to_bytes(), data, "envelope {e:?} is not its input"),
        Err(_) => assert!(
            data.is_empty() || data[0] > 2 || (data[0] != 0 && data.len() < 9),
            "a valid envelope refused: {data:?}"
        ),
    }

    match GroupEvent::parse(msg) {
        // An eviction reason is read leniently (invalid UTF-8 replaced), so
        // only a valid one gives back its input.
        Ok(GroupEvent::Evicted { reason }) => match std::str::from_utf8(&data[1..]) {
            Ok(text) => assert_eq!(reason, text, "eviction reason changed"),
            Err(_) => assert_eq!(reason, String::from_utf8_lossy(&data[1..])),
        },
        Ok(e) => assert_eq!(e.to_bytes(), data, "group event {e:?} is not its input"),
        Err(_) => {
            let valid = match data.first() {
                Some(0) => {
                    data.len() >= 2
                        && data.len() >= 2 + usize::from(data[1])
                        && std::str::from_utf8(&data[2..2 + usize::from(data[1])]).is_ok()
                }
                Some(1) => data.len() == 9,
                Some(2) => true,
                _ => false,
            };
            assert!(!valid, "a valid group event refused: {data:?}");
        }
    }

    let decoded = check_allocation(
        format_args!("decode_value of {} bytes", data.len()),
        bound(data.len()),
        "decode_value: the read step for the body's size, or serde's 1 MiB cap",
        || decode_value::<Sample>(data),
    );
    if let Ok(value) = decoded {
        let again = encode_value(&value).expect("a decoded value encodes");
        let back = decode_value::<Sample>(&again).expect("a re-encoded value decodes");
        assert_eq!(back, value, "round trip changed the value");
    }
});
