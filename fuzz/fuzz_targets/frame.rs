//! `decode_frame` on arbitrary bytes, for every message type a qmesh peer
//! reads: every type of the session stream, of the streams a client or the
//! coordinator opens, and data stream headers.
//!
//! Decoding must never panic. Every message that decodes must re-encode
//! with `encode_frame` and decode back to the same value (round trip).
//! Frames are decoded one after the other from the front of the input, as
//! a reader that buffers a stream would.
//!
//! No single allocation made by a `decode_frame` call may be larger than
//! `MAX_CONTROL_FRAME`: the codec refuses a declared frame length above it
//! before allocating, and decodes with bincode's limit set to it, so that
//! "a length inside a body cannot make the decoder allocate more than a
//! whole frame may hold" (proto/src/codec.rs, proto/src/limits.rs).
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use qmesh_fuzz::check_allocation;
use qmesh_proto::codec::{decode_frame, encode_frame, DecodeError};
use qmesh_proto::limits::MAX_CONTROL_FRAME;
use qmesh_proto::msg::{
    ClientSession, Close, CoordinatorSession, DescribeAnswer, Ending, EnrollAnswer, Greeting,
    HelloAnswer, Incoming, IncomingAnswer, JoinAnswer, MembersAnswer, OpenAnswer, PresenceEvent,
    Ready, StreamHeader, StreamRequest,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `decode_frame::<T>`, checked against the frame limit.
fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, DecodeError> {
    check_allocation(
        format_args!("decode_frame::<{}>", std::any::type_name::<T>()),
        MAX_CONTROL_FRAME,
        "MAX_CONTROL_FRAME: no length on the wire makes the codec allocate more than a frame holds",
        || decode_frame::<T>(buf),
    )
}

fn frames<T: Serialize + DeserializeOwned + PartialEq + Debug>(mut buf: &[u8]) {
    while let Ok(Some((msg, used))) = decode::<T>(buf) {
        assert!(
            used >= 4 && used <= buf.len(),
            "used {used} of {}",
            buf.len()
        );
        let frame = encode_frame(&msg)
            .unwrap_or_else(|e| panic!("{msg:?} decoded but does not encode: {e}"));
        match decode::<T>(&frame) {
            Ok(Some((back, back_used))) => {
                assert_eq!(back, msg, "round trip changed the message");
                assert_eq!(back_used, frame.len(), "re-encoded frame not used whole");
            }
            other => panic!("re-encoded {msg:?} does not decode: {other:?}"),
        }
        buf = &buf[used..];
    }
}

fuzz_target!(|data: &[u8]| {
    frames::<Greeting>(data);
    frames::<HelloAnswer>(data);
    frames::<EnrollAnswer>(data);
    frames::<ClientSession>(data);
    frames::<CoordinatorSession>(data);
    frames::<StreamRequest>(data);
    frames::<OpenAnswer>(data);
    frames::<Incoming>(data);
    frames::<IncomingAnswer>(data);
    frames::<Ready>(data);
    frames::<Close>(data);
    frames::<Ending>(data);
    frames::<DescribeAnswer>(data);
    frames::<JoinAnswer>(data);
    frames::<MembersAnswer>(data);
    frames::<PresenceEvent>(data);
    frames::<StreamHeader>(data);
});
