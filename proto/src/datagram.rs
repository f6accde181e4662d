//! Datagrams of a direct pipe (protocol.md §20.4).
//!
//! On a direct connection, a pipe that carries a UDP flow may send each
//! datagram outside its stream, as a QUIC DATAGRAM frame: the pipe's QUIC
//! stream id as a QUIC variable-length integer, then the UDP payload. The
//! stream id is the same on both sides of the connection, so it names the
//! flow without any message to agree on one.

use bytes::{BufMut, Bytes, BytesMut};
use quinn_proto::coding::Codec;
use quinn_proto::VarInt;

/// The bytes every datagram of the pipe on QUIC stream `stream` starts
/// with; `None` for a number no QUIC stream id can have (2^62 or more).
pub fn flow_prefix(stream: u64) -> Option<Bytes> {
    let id = VarInt::from_u64(stream).ok()?;
    let mut buf = BytesMut::with_capacity(8);
    id.encode(&mut buf);
    Some(buf.freeze())
}

/// One datagram of a flow: `prefix` (from [`flow_prefix`]), then
/// `payload`.
pub fn flow_datagram(prefix: &[u8], payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(prefix.len() + payload.len());
    buf.put_slice(prefix);
    buf.put_slice(payload);
    buf.freeze()
}

/// Split a received datagram into the stream id of its pipe and its
/// payload; `None` when it does not start with a whole variable-length
/// integer.
pub fn split_flow(datagram: Bytes) -> Option<(u64, Bytes)> {
    let mut rest = &datagram[..];
    let id = VarInt::decode(&mut rest).ok()?;
    let used = datagram.len() - rest.len();
    Some((id.into_inner(), datagram.slice(used..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_datagram_is_the_stream_id_as_a_varint_then_the_payload() {
        let short = flow_prefix(4).unwrap();
        assert_eq!(&flow_datagram(&short, b"hi")[..], &[0x04, b'h', b'i']);
        // 16,384 needs the four-byte form (tag 0b10).
        let long = flow_prefix(16_384).unwrap();
        assert_eq!(&long[..], &[0x80, 0x00, 0x40, 0x00]);
        assert!(flow_prefix(1 << 62).is_none());
    }

    #[test]
    fn split_flow_reverses_flow_datagram() {
        for id in [
            0u64,
            1,
            63,
            64,
            16_383,
            16_384,
            (1 << 30) + 5,
            (1 << 62) - 1,
        ] {
            let d = flow_datagram(&flow_prefix(id).unwrap(), b"payload");
            let (got, payload) = split_flow(d).unwrap();
            assert_eq!(got, id);
            assert_eq!(&payload[..], b"payload");
        }
        // An empty payload is a datagram too.
        let (got, payload) = split_flow(flow_prefix(8).unwrap()).unwrap();
        assert_eq!((got, payload.len()), (8, 0));
    }

    #[test]
    fn a_datagram_without_a_whole_varint_is_refused() {
        assert!(split_flow(Bytes::new()).is_none());
        // Tag 0b01 says two bytes; only one is there.
        assert!(split_flow(Bytes::from_static(&[0x40])).is_none());
    }
}
