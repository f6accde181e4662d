//! Envelopes: one-way messages, requests and replies on a channel's
//! message stream.
//!
//! Each side of a channel sends its one-way messages, requests and replies
//! on a data stream of its own that starts with [`crate::msg::StreamHeader::Messages`]
//! (or `DirectMessages`). Every data message on that stream is one
//! envelope: a kind byte, for requests and replies an 8-byte big-endian
//! request id, then the body.
//!
//! | kind | meaning | layout |
//! |---|---|---|
//! | 0 | one-way message | `00` body |
//! | 1 | request | `01` id(8) body |
//! | 2 | reply | `02` id(8) body |
//!
//! Request ids are chosen by the requester, unique among its requests on
//! that channel; a reply carries the id of the request it answers.

use bytes::{Buf, Bytes};

use crate::codec::DecodeError;

/// Bytes an envelope adds in front of the body, at most.
pub const ENVELOPE_HEAD: usize = 9;

const ONE_WAY: u8 = 0;
const REQUEST: u8 = 1;
const REPLY: u8 = 2;

/// One message on a message stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    /// A message that expects no answer.
    OneWay(Bytes),
    /// A request; the other side answers with a [`Envelope::Reply`] that
    /// carries the same id.
    Request {
        /// The requester's id for it.
        id: u64,
        /// The request body.
        body: Bytes,
    },
    /// The answer to request `id`.
    Reply {
        /// The id of the request it answers.
        id: u64,
        /// The reply body.
        body: Bytes,
    },
}

impl Envelope {
    /// The bytes that go in front of the body.
    pub fn head(&self) -> Vec<u8> {
        match self {
            Envelope::OneWay(_) => vec![ONE_WAY],
            Envelope::Request { id, .. } => head(REQUEST, *id),
            Envelope::Reply { id, .. } => head(REPLY, *id),
        }
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        match self {
            Envelope::OneWay(b)
            | Envelope::Request { body: b, .. }
            | Envelope::Reply { body: b, .. } => b,
        }
    }

    /// The whole envelope as one message.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.head();
        out.extend_from_slice(self.body());
        out
    }

    /// Parse one whole message from a message stream.
    pub fn parse(mut msg: Bytes) -> Result<Envelope, DecodeError> {
        if msg.is_empty() {
            return Err(DecodeError::Malformed("an empty envelope".into()));
        }
        let kind = msg.get_u8();
        if kind == ONE_WAY {
            return Ok(Envelope::OneWay(msg));
        }
        if msg.len() < 8 {
            return Err(DecodeError::Malformed(format!(
                "envelope kind {kind} without its 8-byte request id"
            )));
        }
        let id = msg.get_u64();
        match kind {
            REQUEST => Ok(Envelope::Request { id, body: msg }),
            REPLY => Ok(Envelope::Reply { id, body: msg }),
            other => Err(DecodeError::Malformed(format!(
                "unknown envelope kind {other}"
            ))),
        }
    }
}

/// What the coordinator sends a broadcast group member, one per data
/// message on the member's group stream.
///
/// | kind | meaning | layout |
/// |---|---|---|
/// | 0 | a member's broadcast | `00` name-length(1) name body |
/// | 1 | messages this member missed (policy `lag`) | `01` count(8) |
/// | 2 | this member was removed (policy `evict`) | `02` reason (UTF-8) |
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// A broadcast, with the sender's name as the coordinator knows it.
    Message {
        /// Who sent it (stamped by the coordinator, never by the sender).
        from: String,
        /// The body.
        body: Bytes,
    },
    /// This member fell behind and `count` broadcasts were skipped for it
    /// since the last one it got.
    Missed {
        /// Broadcasts skipped.
        count: u64,
    },
    /// This member was removed from the group; the stream ends after this.
    Evicted {
        /// Why.
        reason: String,
    },
}

const G_MESSAGE: u8 = 0;
const G_MISSED: u8 = 1;
const G_EVICTED: u8 = 2;

impl GroupEvent {
    /// The bytes before the body (the whole event for `Missed` and
    /// `Evicted`).
    pub fn head(&self) -> Vec<u8> {
        match self {
            GroupEvent::Message { from, .. } => {
                let name = &from.as_bytes()[..from.len().min(u8::MAX as usize)];
                let mut h = Vec::with_capacity(2 + name.len());
                h.push(G_MESSAGE);
                h.push(name.len() as u8);
                h.extend_from_slice(name);
                h
            }
            GroupEvent::Missed { count } => {
                let mut h = vec![G_MISSED];
                h.extend_from_slice(&count.to_be_bytes());
                h
            }
            GroupEvent::Evicted { reason } => {
                let mut h = vec![G_EVICTED];
                h.extend_from_slice(reason.as_bytes());
                h
            }
        }
    }

    /// The whole event as one message.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.head();
        if let GroupEvent::Message { body, .. } = self {
            out.extend_from_slice(body);
        }
        out
    }

    /// Parse one whole message from a group stream.
    pub fn parse(mut msg: Bytes) -> Result<GroupEvent, DecodeError> {
        if msg.is_empty() {
            return Err(DecodeError::Malformed("an empty group event".into()));
        }
        match msg.get_u8() {
            G_MESSAGE => {
                let Some(&len) = msg.first() else {
                    return Err(DecodeError::Malformed(
                        "a group message without its sender".into(),
                    ));
                };
                let len = len as usize;
                if msg.len() < 1 + len {
                    return Err(DecodeError::Malformed(
                        "a group message cut inside its sender's name".into(),
                    ));
                }
                msg.advance(1);
                let name = msg.split_to(len);
                let from = String::from_utf8(name.to_vec()).map_err(|_| {
                    DecodeError::Malformed("a sender name that is not UTF-8".into())
                })?;
                Ok(GroupEvent::Message { from, body: msg })
            }
            G_MISSED if msg.len() == 8 => Ok(GroupEvent::Missed {
                count: msg.get_u64(),
            }),
            G_EVICTED => Ok(GroupEvent::Evicted {
                reason: String::from_utf8_lossy(&msg).into_owned(),
            }),
            kind => Err(DecodeError::Malformed(format!(
                "bad group event (kind {kind}, {} bytes)",
                msg.len()
            ))),
        }
    }
}

fn head(kind: u8, id: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(ENVELOPE_HEAD);
    h.push(kind);
    h.extend_from_slice(&id.to_be_bytes());
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_with_frozen_heads() {
        let cases = [
            (Envelope::OneWay(Bytes::from_static(b"hi")), "006869"),
            (
                Envelope::Request {
                    id: 258,
                    body: Bytes::from_static(b"q"),
                },
                "01000000000000010271",
            ),
            (
                Envelope::Reply {
                    id: 1,
                    body: Bytes::new(),
                },
                "020000000000000001",
            ),
        ];
        for (env, hex) in cases {
            let bytes = env.to_bytes();
            assert_eq!(hex::encode(&bytes), hex);
            assert_eq!(Envelope::parse(Bytes::from(bytes)).unwrap(), env);
        }
    }

    #[test]
    fn group_events_round_trip_with_frozen_bytes() {
        let cases = [
            (
                GroupEvent::Message {
                    from: "al".into(),
                    body: Bytes::from_static(b"hi"),
                },
                "0002616c6869",
            ),
            (GroupEvent::Missed { count: 3 }, "010000000000000003"),
            (
                GroupEvent::Evicted {
                    reason: "slow".into(),
                },
                "02736c6f77",
            ),
        ];
        for (ev, hex) in cases {
            let bytes = ev.to_bytes();
            assert_eq!(hex::encode(&bytes), hex);
            assert_eq!(GroupEvent::parse(Bytes::from(bytes)).unwrap(), ev);
        }
        for bad in [&b""[..], b"\x00", b"\x00\x05ab", b"\x01\0", b"\x09"] {
            assert!(
                GroupEvent::parse(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_group_message_may_end_with_its_senders_name() {
        // The name fills the rest exactly: an empty body.
        let ev = GroupEvent::parse(Bytes::from_static(b"\x00\x02al")).unwrap();
        assert_eq!(
            ev,
            GroupEvent::Message {
                from: "al".into(),
                body: Bytes::new()
            }
        );
        // One byte of the name missing.
        assert!(GroupEvent::parse(Bytes::from_static(b"\x00\x03al")).is_err());
        assert!(GroupEvent::parse(Bytes::from_static(b"\x00\x02a")).is_err());
    }

    #[test]
    fn bad_envelopes_are_errors() {
        for bad in [&b""[..], b"\x01short", b"\x07\0\0\0\0\0\0\0\0"] {
            assert!(Envelope::parse(Bytes::copy_from_slice(bad)).is_err());
        }
    }
}
