//! The one module that turns messages into bytes and back.
//!
//! Control frames are a 4-byte big-endian body length followed by a
//! bincode 2 body (serde, standard configuration: little-endian, varint
//! integers). Nothing else in qmesh serialises; replacing bincode means
//! replacing this module.
//!
//! Rules enforced here:
//! - a declared length above the limit is refused before any allocation;
//! - a body must decode to exactly one message: trailing bytes are an error;
//! - decoding never panics, whatever the input (property tests below).

use std::io;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::limits::{LENGTH_PREFIX, MAX_CONTROL_FRAME};

/// Bincode configuration: standard, with a decode limit so that a length
/// inside a body (say a string's) cannot make the decoder allocate more
/// than a whole frame may hold.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_CONTROL_FRAME>()
}

/// Why bytes from the network are not a valid message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A frame declared a body longer than the limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The declared length.
        len: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The body is not a valid encoding of the expected message type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The body held a valid message followed by extra bytes.
    #[error("{extra} trailing bytes after the message")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded body would exceed the frame limit.
    #[error("message of {len} bytes exceeds the frame limit of {limit} bytes")]
    TooLarge {
        /// The encoded length.
        len: usize,
        /// The limit in force.
        limit: usize,
    },
    /// Serialisation failed.
    #[error("cannot encode message: {0}")]
    Serialize(String),
}

/// Reading a frame from a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The stream failed (reset, connection lost, …).
    #[error("stream read failed: {0}")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The reader's budget had no room for a body of this length (see
    /// [`read_frame_reserving`]); the body was not read.
    #[error("no room for a frame of {len} bytes in this peer's budget")]
    OverBudget {
        /// The declared body length.
        len: usize,
    },
}

impl ReadFrameError {
    /// The close code for a frame that could not be read: `None` when the
    /// stream itself failed (nobody broke the protocol).
    pub fn conn_code(&self) -> Option<crate::codes::ConnCode> {
        use crate::codes::ConnCode;
        match self {
            Self::Decode(DecodeError::TooLarge { .. }) => Some(ConnCode::FrameTooLarge),
            Self::Decode(_) | Self::Truncated => Some(ConnCode::Malformed),
            Self::Io(_) | Self::OverBudget { .. } => None,
        }
    }
}

/// Writing a frame to a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteFrameError {
    /// The stream failed.
    #[error("stream write failed: {0}")]
    Io(#[from] io::Error),
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Encode `msg` as a bare body (no length prefix).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    let body = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if body.len() > MAX_CONTROL_FRAME {
        return Err(EncodeError::TooLarge {
            len: body.len(),
            limit: MAX_CONTROL_FRAME,
        });
    }
    Ok(body)
}

/// Encode `msg` as a frame: length prefix, then body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    let body = encode(msg)?;
    let mut frame = Vec::with_capacity(LENGTH_PREFIX + body.len());
    frame.extend_from_slice(&length_prefix(body.len()));
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decode a bare body that must hold exactly one `T`.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    if body.len() > MAX_CONTROL_FRAME {
        return Err(DecodeError::TooLarge {
            len: body.len(),
            limit: MAX_CONTROL_FRAME,
        });
    }
    decode_limited::<T, MAX_CONTROL_FRAME>(body)
}

/// Bytes of the decoder's limit kept for the message around a value that
/// travels inside others (see [`decode_in_carrier`]). The largest carrier
/// of an interface list, `PresenceEvent::Changed`, adds 84 as the decoder
/// counts them: a 4-byte variant, a 64-byte name with its 8-byte length,
/// and the list's 8-byte length.
pub const CARRIER_ROOM: usize = 128;

/// Decode as [`decode`] does, with [`CARRIER_ROOM`] bytes less of the
/// decoder's limit: whether a value sent on its own would also decode
/// inside any message that carries it. The limit counts what decoding
/// takes in memory, not bytes on the wire (a length as 8 bytes, each
/// field at its size), so a body under the frame limit can still pass the
/// decoder's; a sender checks this before sending.
pub fn decode_in_carrier<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    decode_limited::<T, { MAX_CONTROL_FRAME - CARRIER_ROOM }>(body)
}

/// Decode a body that must hold exactly one `T`, with bincode's decode
/// limit at `N` bytes (as bincode counts them).
fn decode_limited<T: DeserializeOwned, const N: usize>(body: &[u8]) -> Result<T, DecodeError> {
    let config = bincode::config::standard().with_limit::<N>();
    let (value, used) = bincode::serde::decode_from_slice(body, config)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(DecodeError::TrailingBytes {
            extra: body.len() - used,
        });
    }
    Ok(value)
}

/// The encoded size of `msg`, whatever its size.
pub fn encoded_len<T: Serialize>(msg: &T) -> Result<usize, EncodeError> {
    bincode::serde::encode_to_vec(msg, bincode::config::standard())
        .map(|v| v.len())
        .map_err(|e| EncodeError::Serialize(e.to_string()))
}

/// Encode an application value (a typed message on a channel) as a bare
/// body, without the control-frame size limit: the data message limit of
/// the stream it goes on applies instead.
pub fn encode_value<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| EncodeError::Serialize(e.to_string()))
}

/// Largest body [`decode_value`] takes: the data message ceiling.
const VALUE_CEILING: usize = 64 * 1024 * 1024;

/// Decode an application value from a whole message body.
///
/// The decoder reads at most the next step of 16 KiB, 256 KiB, 4 MiB or
/// 64 MiB above the body's own size. A length declared for a collection
/// inside the body makes serde reserve room for at most that many
/// elements, and never more than 1 MiB (serde's own cap on preallocation):
/// a short body can make one allocation of up to 1 MiB per nested
/// collection, freed when decoding fails.
pub fn decode_value<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    match body.len() {
        n if n <= 16 * 1024 => decode_limited::<T, { 16 * 1024 }>(body),
        n if n <= 256 * 1024 => decode_limited::<T, { 256 * 1024 }>(body),
        n if n <= 4 * 1024 * 1024 => decode_limited::<T, { 4 * 1024 * 1024 }>(body),
        n if n <= VALUE_CEILING => decode_limited::<T, VALUE_CEILING>(body),
        len => Err(DecodeError::TooLarge {
            len,
            limit: VALUE_CEILING,
        }),
    }
}

/// The 4-byte big-endian prefix for a body of `len` bytes.
///
/// `len` must fit in a `u32`; callers check their limits first.
pub fn length_prefix(len: usize) -> [u8; LENGTH_PREFIX] {
    u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes()
}

/// Check a received length prefix against `limit` and return the length.
pub fn check_length(prefix: [u8; LENGTH_PREFIX], limit: usize) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > limit {
        return Err(DecodeError::TooLarge { len, limit });
    }
    Ok(len)
}

/// Parse one frame from the front of `buf` without I/O.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, or the
/// message and the number of bytes it used.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, DecodeError> {
    let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX>() else {
        return Ok(None);
    };
    let len = check_length(*prefix, MAX_CONTROL_FRAME)?;
    let Some(body) = buf.get(LENGTH_PREFIX..LENGTH_PREFIX + len) else {
        return Ok(None);
    };
    Ok(Some((decode(body)?, LENGTH_PREFIX + len)))
}

/// Read one frame from `r`.
///
/// Returns `Ok(None)` on a clean end of stream before the first byte of a
/// frame. The declared length is checked before the body is allocated.
pub async fn read_frame<T, R>(r: &mut R) -> Result<Option<T>, ReadFrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    read_frame_reserving(r, |_| Some(())).await
}

/// Read one frame as [`read_frame`] does, but first ask `reserve` for room
/// for the declared body length: `None` refuses the frame
/// ([`ReadFrameError::OverBudget`]) before the body is allocated or read.
/// What `reserve` returns is held until the frame is decoded, so a budget
/// of permits bounds the bodies being read at once.
pub async fn read_frame_reserving<T, R, G>(
    r: &mut R,
    reserve: impl FnOnce(usize) -> Option<G>,
) -> Result<Option<T>, ReadFrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut prefix = [0u8; LENGTH_PREFIX];
    let mut got = 0;
    while got < LENGTH_PREFIX {
        let n = r.read(&mut prefix[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ReadFrameError::Truncated)
            };
        }
        got += n;
    }
    let len = check_length(prefix, MAX_CONTROL_FRAME)?;
    let Some(_room) = reserve(len) else {
        return Err(ReadFrameError::OverBudget { len });
    };
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ReadFrameError::Truncated
        } else {
            ReadFrameError::Io(e)
        }
    })?;
    Ok(Some(decode(&body)?))
}

/// What reading one frame within a deadline gave.
#[derive(Debug)]
pub enum Read<T> {
    /// A whole frame.
    Frame(T),
    /// The stream ended cleanly before a frame began.
    Finished,
    /// The stream failed or carried a bad frame.
    Failed(ReadFrameError),
    /// The deadline passed first.
    Late,
}

/// Read one frame from `r` ([`read_frame`]), giving up at `deadline`.
pub async fn read_within<T, R>(deadline: tokio::time::Instant, r: &mut R) -> Read<T>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    read_within_reserving(deadline, r, |_| Some(())).await
}

/// [`read_within`] with a budget: see [`read_frame_reserving`].
pub async fn read_within_reserving<T, R, G>(
    deadline: tokio::time::Instant,
    r: &mut R,
    reserve: impl FnOnce(usize) -> Option<G>,
) -> Read<T>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    match tokio::time::timeout_at(deadline, read_frame_reserving::<T, R, G>(r, reserve)).await {
        Ok(Ok(Some(frame))) => Read::Frame(frame),
        Ok(Ok(None)) => Read::Finished,
        Ok(Err(e)) => Read::Failed(e),
        Err(_) => Read::Late,
    }
}

/// Write `msg` as one frame to `w` (one write call).
pub async fn write_frame<T, W>(w: &mut W, msg: &T) -> Result<(), WriteFrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let frame = encode_frame(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use proptest::prelude::*;

    use super::*;
    use crate::codes::{OpenFailCode, RejectCode};
    use crate::ids::{ChannelId, SessionId, StreamId};
    use crate::manifest::{Direction, Interface};
    use crate::msg::{
        Arrival, ClientSession, Close, CoordinatorSession, DescribeAnswer, DirectPipe, Ending,
        Enroll, EnrollAnswer, Failure, Greeting, GroupPolicy, Hello, HelloAnswer, Incoming,
        IncomingAnswer, JoinAnswer, MembersAnswer, Open, OpenAnswer, PathMode, PeerIntro,
        PipeAnswer, PresenceEvent, Ready, Reject, StreamHeader, StreamRequest, Welcome,
    };

    /// Freeze the wire bytes of a message (iroh `check_expected_bytes`).
    fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: T, hex: &str) {
        let frame = encode_frame(&msg).unwrap();
        assert_eq!(hex::encode(&frame), hex, "wire bytes of {msg:?} changed");
        let (back, used) = decode_frame::<T>(&frame).unwrap().unwrap();
        assert_eq!(back, msg);
        assert_eq!(used, frame.len());
    }

    fn iface() -> Interface {
        Interface::new("web", "pages")
            .with_direction(Direction::Send)
            .with_schema("html")
            .with_version("2")
    }

    fn hello(direct: Option<Vec<SocketAddr>>) -> Greeting {
        Greeting::Hello(Hello {
            version: 5,
            name: "alice".into(),
            direct,
        })
    }

    #[test]
    fn a_frame_too_large_and_a_malformed_one_close_with_different_codes() {
        use crate::codes::ConnCode;
        let big = ReadFrameError::Decode(DecodeError::TooLarge { len: 9, limit: 1 });
        assert_eq!(big.conn_code(), Some(ConnCode::FrameTooLarge));
        assert_eq!(
            ReadFrameError::Truncated.conn_code(),
            Some(ConnCode::Malformed)
        );
        let bad = ReadFrameError::Decode(DecodeError::Malformed("x".into()));
        assert_eq!(bad.conn_code(), Some(ConnCode::Malformed));
        let io = ReadFrameError::Io(std::io::Error::other("reset"));
        assert_eq!(io.conn_code(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn reading_within_a_deadline_tells_frame_end_failure_and_lateness_apart() {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        let frame = encode_frame(&7u32).unwrap();
        let mut bytes: &[u8] = &frame;
        assert!(matches!(
            read_within::<u32, _>(deadline, &mut bytes).await,
            Read::Frame(7)
        ));
        assert!(matches!(
            read_within::<u32, _>(deadline, &mut bytes).await,
            Read::Finished
        ));
        let mut cut: &[u8] = &frame[..frame.len() - 1];
        assert!(matches!(
            read_within::<u32, _>(deadline, &mut cut).await,
            Read::Failed(ReadFrameError::Truncated)
        ));
        let mut junk: &[u8] = &[0xff; 8];
        assert!(matches!(
            read_within::<u32, _>(deadline, &mut junk).await,
            Read::Failed(ReadFrameError::Decode(_))
        ));
        // Nothing is ever written: the deadline passes on the paused clock.
        let (_keep, mut silent) = tokio::io::duplex(64);
        assert!(matches!(
            read_within::<u32, _>(deadline, &mut silent).await,
            Read::Late
        ));
    }

    #[test]
    fn snapshot_session_stream() {
        check(
            hello(Some(vec![SocketAddr::from((
                Ipv4Addr::new(10, 0, 0, 2),
                5000,
            ))])),
            "00000012000505616c6963650101000a000002fb8813",
        );
        check(hello(None), "00000009000505616c69636500");
        check(
            Greeting::Enroll(Enroll {
                version: 5,
                name: "bob".into(),
                token: Some("t1".into()),
            }),
            "0000000a010503626f6201027431",
        );
        check(
            HelloAnswer::Welcome(Welcome {
                session: SessionId(300),
                observed: SocketAddr::from((Ipv4Addr::LOCALHOST, 7447)),
            }),
            "0000000c00fb2c01007f000001fb171d",
        );
        check(
            HelloAnswer::Reject(Reject {
                code: RejectCode::NameTaken,
                message: "taken".into(),
            }),
            "0000000801010574616b656e",
        );
        check(
            EnrollAnswer::Enrolled {
                cert_pem: "PEM".into(),
                expires: 1000,
            },
            "00000008000350454dfbe803",
        );
        check(
            EnrollAnswer::Reject(Reject {
                code: RejectCode::NotAuthorised,
                message: "no".into(),
            }),
            "000000050103026e6f",
        );
        check(
            ClientSession::Interfaces {
                list: vec![iface()],
            },
            "00000016000103776562057061676573000468746d6c00013200",
        );
        check(ClientSession::Ping { seq: 5 }, "000000020105");
        check(ClientSession::Pong { seq: 5 }, "000000020205");
        check(CoordinatorSession::Ping { seq: 5 }, "000000020005");
        check(CoordinatorSession::Pong { seq: 5 }, "000000020105");
        check(
            CoordinatorSession::GoingAway { drain_ms: 10_000 },
            "0000000402fb1027",
        );
    }

    #[test]
    fn snapshot_stream_requests() {
        check(
            StreamRequest::Open(Open {
                peer: "bob".into(),
                channel: "chat".into(),
                path: PathMode::Direct,
            }),
            "0000000b0003626f62046368617401",
        );
        check(
            StreamRequest::Describe {
                peer: "bob".into(),
                channel: "web".into(),
            },
            "000000090103626f6203776562",
        );
        check(StreamRequest::Watch { live: true }, "000000020201");
        check(
            StreamRequest::Join {
                group: "ops".into(),
            },
            "0000000503036f7073",
        );
        check(
            StreamRequest::Members {
                group: "ops".into(),
            },
            "0000000504036f7073",
        );
        check(
            StreamRequest::Pipe {
                channel: StreamId(4),
            },
            "000000020504",
        );
    }

    #[test]
    fn snapshot_pipes() {
        check(
            Arrival::Channel(Incoming {
                from: "alice".into(),
                channel: "web".into(),
                path: PathMode::Relay,
            }),
            "0000000c0005616c6963650377656202",
        );
        check(
            Arrival::Pipe {
                channel: StreamId(3),
            },
            "000000020103",
        );
        check(
            DirectPipe {
                channel: ChannelId(300),
            },
            "00000003fb2c01",
        );
        check(PipeAnswer::Connected, "0000000100");
        check(
            PipeAnswer::Failed {
                reason: "refused".into(),
            },
            "00000009010772656675736564",
        );
        check(
            ClientSession::Interfaces {
                list: vec![Interface::new("web", "w").with_forward(crate::ForwardKind::Datagram)],
            },
            "0000000f000103776562017702000001310101",
        );
    }

    #[test]
    fn snapshot_channel_opening() {
        check(
            OpenAnswer::Ready(Ready {
                channel: ChannelId(7),
                peer: None,
                interface: None,
            }),
            "0000000400070000",
        );
        check(
            OpenAnswer::Ready(Ready {
                channel: ChannelId(300),
                peer: Some(PeerIntro {
                    fingerprint: [0xab; 32],
                    observed: SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 7000)),
                    addrs: vec![SocketAddr::from((Ipv4Addr::new(192, 168, 1, 2), 7000))],
                    dial: true,
                    session: SessionId(5),
                }),
                interface: Some(iface()),
            }),
            "0000004d00fb2c0101abababababababababababababababababababababababababababababababab000a000001fb581b0100c0a80102fb581b01050103776562057061676573000468746d6c00013200",
        );
        check(
            OpenAnswer::Failed(Failure {
                code: OpenFailCode::PeerNotPresent,
                message: "no".into(),
            }),
            "000000050100026e6f",
        );
        check(
            Incoming {
                from: "alice".into(),
                channel: "chat".into(),
                path: PathMode::Auto,
            },
            "0000000c05616c696365046368617400",
        );
        check(IncomingAnswer::Accept, "0000000100");
        check(
            IncomingAnswer::Refuse {
                reason: "busy".into(),
            },
            "00000006010462757379",
        );
        check(
            Ready {
                channel: ChannelId(7),
                peer: None,
                interface: None,
            },
            "00000003070000",
        );
    }

    fn close() -> Close {
        Close {
            reason: "done".into(),
            streams: 2,
            relayed: 1,
        }
    }

    #[test]
    fn snapshot_channel_ending() {
        check(close(), "0000000704646f6e650201");
        check(Ending::Closed(close()), "000000080004646f6e650201");
        check(
            Ending::Lost {
                reason: "gone".into(),
            },
            "000000060104676f6e65",
        );
    }

    #[test]
    fn snapshot_answers_and_presence() {
        check(
            DescribeAnswer::Manifest { interface: iface() },
            "000000150003776562057061676573000468746d6c00013200",
        );
        check(
            DescribeAnswer::Failed(Failure {
                code: OpenFailCode::NoSuchInterface,
                message: "no".into(),
            }),
            "00000005010a026e6f",
        );
        check(
            JoinAnswer::Joined {
                members: 3,
                policy: GroupPolicy::Evict,
                max_message: 65536,
            },
            "00000008000302fc00000100",
        );
        check(
            MembersAnswer::Count {
                group: "ops".into(),
                members: 2,
            },
            "0000000600036f707302",
        );
        check(
            PresenceEvent::Joined {
                name: "bob".into(),
                interfaces: vec![],
            },
            "000000060203626f6200",
        );
        check(PresenceEvent::Synced, "0000000101");
        check(
            PresenceEvent::Left { name: "bob".into() },
            "000000050303626f62",
        );
    }

    #[test]
    fn snapshot_stream_header() {
        check(
            StreamHeader::Data {
                channel: StreamId(4),
            },
            "000000020004",
        );
        check(
            StreamHeader::Direct {
                channel: ChannelId(300),
            },
            "0000000401fb2c01",
        );
        check(
            StreamHeader::Messages {
                channel: StreamId(4),
            },
            "000000020204",
        );
        check(
            StreamHeader::DirectMessages {
                channel: ChannelId(4),
            },
            "000000020304",
        );
    }

    #[test]
    fn message_names_are_derived_in_kebab_case() {
        assert_eq!(hello(None).name(), "hello");
        assert_eq!(
            StreamRequest::Members { group: "g".into() }.name(),
            "members"
        );
        assert_eq!(
            StreamHeader::DirectMessages {
                channel: ChannelId(1)
            }
            .name(),
            "direct-messages"
        );
        assert_eq!(IncomingAnswer::Accept.name(), "accept");
    }

    #[test]
    fn a_message_of_another_stream_does_not_decode_as_this_one() {
        // A callee's answer where an open is expected: variant 1 of
        // `IncomingAnswer` is `Refuse`, whose string is not a valid `Describe`.
        let body = encode(&IncomingAnswer::Refuse {
            reason: "busy".into(),
        })
        .unwrap();
        assert!(decode::<StreamRequest>(&body).is_err());
        // An ending where an open answer is expected: `Ending::Lost` is
        // variant 1 of both, but its body is a string, not a failure code.
        let body = encode(&Ending::Lost {
            reason: "gone".into(),
        })
        .unwrap();
        assert!(decode::<OpenAnswer>(&body).is_err());
        // Tags beyond an enum's variants are malformed.
        assert!(decode::<IncomingAnswer>(&[2]).is_err());
        assert!(decode::<CoordinatorSession>(&[3, 0]).is_err());
    }

    #[tokio::test]
    async fn a_frame_the_budget_has_no_room_for_is_refused_before_its_body_is_read() {
        let frame = encode_frame(&StreamHeader::Data {
            channel: StreamId(7),
        })
        .unwrap();
        let body_len = frame.len() - LENGTH_PREFIX;
        // No room: refused with the declared length, and the body is left
        // unread.
        let mut r = &frame[..];
        let asked = std::cell::Cell::new(0);
        let refused = read_frame_reserving::<StreamHeader, _, ()>(&mut r, |len| {
            asked.set(len);
            None
        })
        .await;
        assert!(
            matches!(refused, Err(ReadFrameError::OverBudget { len }) if len == body_len),
            "{refused:?}"
        );
        assert_eq!(asked.get(), body_len);
        assert_eq!(r.len(), body_len, "the body was read");
        // Room: the frame decodes.
        let mut r = &frame[..];
        let read = read_frame_reserving::<StreamHeader, _, ()>(&mut r, |_| Some(())).await;
        assert_eq!(
            read.unwrap(),
            Some(StreamHeader::Data {
                channel: StreamId(7)
            })
        );
    }

    #[test]
    fn too_many_interfaces_are_refused_before_allocation() {
        // A list that claims a million entries in a few bytes.
        let mut body = vec![0u8]; // ClientSession::Interfaces
        body.extend_from_slice(&[0xfc, 0x40, 0x42, 0x0f, 0x00]); // varint 1_000_000
        let err = decode::<ClientSession>(&body).unwrap_err();
        assert!(err.to_string().contains("interfaces"), "{err}");
    }

    #[test]
    fn values_decode_within_their_body_size() {
        let v: Vec<String> = vec!["a".into(), "bc".into()];
        let body = encode_value(&v).unwrap();
        assert_eq!(decode_value::<Vec<String>>(&body).unwrap(), v);
        // A string that claims 60 MiB in a 6-byte body.
        let lie = [0xfc, 0x00, 0x00, 0xc0, 0x03, b'x'];
        assert!(decode_value::<String>(&lie).is_err());
        assert!(decode_value::<u8>(&[1, 2]).is_err(), "trailing bytes");
    }

    /// A message of exactly 16 KiB on the wire and in the decoder's
    /// accounting: fixed-size arrays carry no length, and each `u8` is one
    /// byte either way. (A string is not: bincode counts its length as 8
    /// bytes against the limit, whatever its varint takes on the wire.)
    type Block = [[[u8; 32]; 32]; 16];

    fn block() -> Block {
        let mut b = [[[0u8; 32]; 32]; 16];
        b[15][31][31] = 9;
        b
    }

    #[test]
    fn the_frame_limit_is_16_kib_and_a_body_of_exactly_it_passes() {
        assert_eq!(MAX_CONTROL_FRAME, 16 * 1024);
        let at = encode(&block()).unwrap();
        assert_eq!(at.len(), 16_384);
        assert_eq!(decode::<Block>(&at).unwrap(), block());
        let frame = encode_frame(&block()).unwrap();
        assert_eq!(frame[..LENGTH_PREFIX], [0, 0, 0x40, 0]);
        let (back, used) = decode_frame::<Block>(&frame).unwrap().unwrap();
        assert_eq!((back, used), (block(), 16_388));
        // One byte more is refused both ways, with the length and limit.
        let over = (block(), 1u8);
        assert!(matches!(
            encode(&over),
            Err(EncodeError::TooLarge {
                len: 16_385,
                limit: 16_384
            })
        ));
        assert!(encode_frame(&over).is_err());
        let mut long = at.clone();
        long.push(1);
        assert!(matches!(
            decode::<(Block, u8)>(&long),
            Err(DecodeError::TooLarge {
                len: 16_385,
                limit: 16_384
            })
        ));
        // Its encoded length is still known, for the error message.
        assert_eq!(encoded_len(&over).unwrap(), 16_385);
    }

    #[test]
    fn a_declared_length_at_the_limit_passes_and_one_more_does_not() {
        assert_eq!(check_length(length_prefix(100), 100).unwrap(), 100);
        assert_eq!(check_length([0, 0, 1, 2], 258).unwrap(), 258);
        assert!(matches!(
            check_length(length_prefix(101), 100),
            Err(DecodeError::TooLarge {
                len: 101,
                limit: 100
            })
        ));
        assert_eq!(length_prefix(0x0102_0304), [1, 2, 3, 4]);
        assert_eq!(length_prefix(usize::MAX), [0xff; 4]);
    }

    #[tokio::test]
    async fn a_frame_written_reads_back_from_a_stream_in_small_pieces() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &IncomingAnswer::Accept)
            .await
            .unwrap();
        write_frame(&mut wire, &block()).await.unwrap();
        assert_eq!(wire[..5], encode_frame(&IncomingAnswer::Accept).unwrap());
        assert!(write_frame(&mut wire, &(block(), 1u8)).await.is_err());
        // A reader that gets one byte at a time.
        let (mut w, mut r) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            w.write_all(&wire).await.unwrap();
        });
        let first = read_frame::<IncomingAnswer, _>(&mut r).await.unwrap();
        assert_eq!(first, Some(IncomingAnswer::Accept));
        let second = read_frame::<Block, _>(&mut r).await.unwrap();
        assert_eq!(second, Some(block()));
        writer.await.unwrap();
        assert!(read_frame::<Block, _>(&mut r).await.unwrap().is_none());
    }

    #[test]
    fn the_end_of_a_stream_is_seen_at_once() {
        // On a thread of its own with a deadline: a reader that missed the
        // end would spin without yielding, and a timeout in the same
        // runtime could never fire.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let (mut empty, mut cut): (&[u8], &[u8]) = (&[], &[0, 0]);
            let _ = tx.send(rt.block_on(async {
                (
                    read_frame::<u32, _>(&mut empty).await,
                    read_frame::<u32, _>(&mut cut).await,
                )
            }));
        });
        let Ok((empty, cut)) = rx.recv_timeout(std::time::Duration::from_secs(5)) else {
            // Every other test that reads to the end spins too, and the
            // harness would wait for them for ever: end the test binary.
            eprintln!("reading at the end of a stream did not finish within 5 s");
            std::process::exit(101);
        };
        assert!(matches!(empty, Ok(None)), "{empty:?}");
        assert!(matches!(cut, Err(ReadFrameError::Truncated)), "{cut:?}");
    }

    /// The steps of [`decode_value`]'s limit.
    const STEPS: [usize; 4] = [16 * 1024, 256 * 1024, 4 * 1024 * 1024, 64 * 1024 * 1024];

    #[test]
    fn values_decode_with_the_limit_of_the_next_step_above_their_size() {
        for step in STEPS {
            // Just inside the step, and just past it (the next step's limit).
            let inside = encode_value(&"a".repeat(step - 16)).unwrap();
            assert!(inside.len() <= step);
            assert_eq!(decode_value::<String>(&inside).unwrap().len(), step - 16);
            if step < VALUE_CEILING {
                let past = encode_value(&"a".repeat(step)).unwrap();
                assert!(past.len() > step);
                assert_eq!(decode_value::<String>(&past).unwrap().len(), step);
            }
            // A body inside the step that declares a string of the whole
            // step is refused by the step's limit, before the decoder looks
            // for the bytes: a larger limit would fail at the end of input
            // instead, having granted the string room.
            let mut lie = encode_value(&"a".repeat(step)).unwrap();
            lie.truncate(step - 100);
            let err = decode_value::<String>(&lie).unwrap_err();
            assert!(err.to_string().contains("LimitExceeded"), "{step}: {err}");
        }
        // Past the ceiling nothing is decoded.
        assert_eq!(VALUE_CEILING, 64 * 1024 * 1024);
        let over = vec![0u8; VALUE_CEILING + 1];
        assert!(matches!(
            decode_value::<String>(&over),
            Err(DecodeError::TooLarge { len, limit: VALUE_CEILING }) if len == VALUE_CEILING + 1
        ));
        let mut trailing = encode_value(&7u32).unwrap();
        trailing.extend([0, 0]);
        assert!(matches!(
            decode_value::<u32>(&trailing),
            Err(DecodeError::TrailingBytes { extra: 2 })
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_reading_body() {
        let prefix = length_prefix(MAX_CONTROL_FRAME + 1);
        let err = decode_frame::<Greeting>(&prefix).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut body = encode(&IncomingAnswer::Accept).unwrap();
        body.push(0);
        let err = decode::<IncomingAnswer>(&body).unwrap_err();
        assert!(
            matches!(err, DecodeError::TrailingBytes { extra: 1 }),
            "{err}"
        );
    }

    #[test]
    fn unknown_variant_is_malformed() {
        let err = decode::<StreamRequest>(&[200]).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{err}");
    }

    #[test]
    fn address_lists_longer_than_the_limit_are_refused_without_reserving_for_them() {
        // Hello v2 "", Some, then a list claiming u32::MAX addresses: the
        // fuzzer's case, which used to reserve 1 MiB before failing.
        let body = [0u8, 2, 0, 1, 0xfc, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode::<Greeting>(&body),
            Err(DecodeError::Malformed(_))
        ));
        // Nine addresses are one too many, eight are fine.
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let nine = encode(&hello(Some(vec![addr; 9]))).unwrap();
        assert!(decode::<Greeting>(&nine).is_err());
        let eight = encode(&hello(Some(vec![addr; 8]))).unwrap();
        assert_eq!(
            decode::<Greeting>(&eight).unwrap(),
            hello(Some(vec![addr; 8]))
        );
    }

    #[test]
    fn string_length_beyond_limit_is_refused() {
        // Variant 0 (Hello), version 1, then a name claiming u32::MAX bytes.
        let body = [0u8, 1, 0xfc, 0xff, 0xff, 0xff, 0xff];
        assert!(decode::<Greeting>(&body).is_err());
    }

    #[tokio::test]
    async fn read_frame_handles_eof_truncation_and_limit() {
        let frame = encode_frame(&IncomingAnswer::Accept).unwrap();
        let mut whole: &[u8] = &frame;
        assert_eq!(
            read_frame::<IncomingAnswer, _>(&mut whole).await.unwrap(),
            Some(IncomingAnswer::Accept)
        );
        assert!(read_frame::<IncomingAnswer, _>(&mut whole)
            .await
            .unwrap()
            .is_none());
        let mut cut: &[u8] = &frame[..frame.len() - 1];
        assert!(matches!(
            read_frame::<IncomingAnswer, _>(&mut cut).await,
            Err(ReadFrameError::Truncated)
        ));
        let big = length_prefix(u32::MAX as usize);
        let mut big: &[u8] = &big;
        assert!(matches!(
            read_frame::<IncomingAnswer, _>(&mut big).await,
            Err(ReadFrameError::Decode(DecodeError::TooLarge { .. }))
        ));
    }

    fn arb_text() -> impl Strategy<Value = String> {
        ".{0,40}"
    }

    fn arb_request() -> impl Strategy<Value = StreamRequest> {
        prop_oneof![
            (arb_text(), arb_text(), arb_mode()).prop_map(|(peer, channel, path)| {
                StreamRequest::Open(Open {
                    peer: peer.into(),
                    channel: channel.into(),
                    path,
                })
            }),
            (arb_text(), arb_text()).prop_map(|(peer, channel)| StreamRequest::Describe {
                peer: peer.into(),
                channel: channel.into(),
            }),
            any::<bool>().prop_map(|live| StreamRequest::Watch { live }),
            arb_text().prop_map(|g| StreamRequest::Join { group: g.into() }),
            arb_text().prop_map(|g| StreamRequest::Members { group: g.into() }),
        ]
    }

    fn arb_ready() -> impl Strategy<Value = Ready> {
        (any::<u64>(), proptest::option::of(arb_intro())).prop_map(|(channel, peer)| Ready {
            channel: ChannelId(channel),
            peer,
            interface: None,
        })
    }

    fn arb_close() -> impl Strategy<Value = Close> {
        (arb_text(), any::<u64>(), any::<u64>()).prop_map(|(reason, streams, relayed)| Close {
            reason,
            streams,
            relayed,
        })
    }

    fn arb_open_answer() -> impl Strategy<Value = OpenAnswer> {
        prop_oneof![
            arb_ready().prop_map(OpenAnswer::Ready),
            arb_text().prop_map(|message| OpenAnswer::Failed(Failure {
                code: OpenFailCode::Refused,
                message
            })),
        ]
    }

    fn arb_ending() -> impl Strategy<Value = Ending> {
        prop_oneof![
            arb_close().prop_map(Ending::Closed),
            arb_text().prop_map(|reason| Ending::Lost { reason }),
        ]
    }

    fn arb_mode() -> impl Strategy<Value = PathMode> {
        prop_oneof![
            Just(PathMode::Auto),
            Just(PathMode::Direct),
            Just(PathMode::Relay)
        ]
    }

    fn arb_intro() -> impl Strategy<Value = PeerIntro> {
        (
            any::<[u8; 32]>(),
            arb_addr(),
            proptest::collection::vec(arb_addr(), 0..4),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(|(fingerprint, observed, addrs, dial, session)| PeerIntro {
                fingerprint,
                observed,
                addrs,
                dial,
                session: SessionId(session),
            })
    }

    /// Socket addresses as the wire carries them: IPv6 flow label and scope
    /// id are not part of the encoding.
    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }

    fn arb_greeting() -> impl Strategy<Value = Greeting> {
        prop_oneof![
            (
                any::<u32>(),
                arb_text(),
                proptest::option::of(proptest::collection::vec(arb_addr(), 0..4))
            )
                .prop_map(|(version, name, direct)| Greeting::Hello(Hello {
                    version,
                    name: name.into(),
                    direct
                })),
            (any::<u32>(), arb_text(), proptest::option::of(arb_text())).prop_map(
                |(version, name, token)| Greeting::Enroll(Enroll {
                    version,
                    name: name.into(),
                    token
                })
            ),
        ]
    }

    fn arb_hello_answer() -> impl Strategy<Value = HelloAnswer> {
        prop_oneof![
            (any::<u64>(), arb_addr()).prop_map(|(session, observed)| HelloAnswer::Welcome(
                Welcome {
                    session: SessionId(session),
                    observed
                }
            )),
            arb_text().prop_map(|message| HelloAnswer::Reject(Reject {
                code: RejectCode::InvalidName,
                message
            })),
        ]
    }

    /// Round trip one value through a frame.
    fn round_trip<T>(msg: &T) -> Result<(), TestCaseError>
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let frame = encode_frame(msg).unwrap();
        let (back, used) = decode_frame::<T>(&frame).unwrap().unwrap();
        prop_assert_eq!(&back, msg);
        prop_assert_eq!(used, frame.len());
        Ok(())
    }

    proptest! {
        #[test]
        fn stream_requests_round_trip(msg in arb_request()) {
            round_trip(&msg)?;
        }

        #[test]
        fn open_answers_and_endings_round_trip(a in arb_open_answer(), e in arb_ending()) {
            round_trip(&a)?;
            round_trip(&e)?;
        }

        #[test]
        fn session_messages_round_trip(g in arb_greeting(), a in arb_hello_answer()) {
            round_trip(&g)?;
            round_trip(&a)?;
        }

        #[test]
        fn header_round_trips(channel in any::<u64>()) {
            round_trip(&StreamHeader::Data { channel: StreamId(channel) })?;
            round_trip(&StreamHeader::Direct { channel: ChannelId(channel) })?;
            round_trip(&StreamHeader::Hold { channel: ChannelId(channel) })?;
            round_trip(&StreamHeader::DirectClose { channel: ChannelId(channel) })?;
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Greeting>(&bytes);
            let _ = decode::<HelloAnswer>(&bytes);
            let _ = decode::<ClientSession>(&bytes);
            let _ = decode::<StreamRequest>(&bytes);
            let _ = decode::<OpenAnswer>(&bytes);
            let _ = decode::<Ending>(&bytes);
            let _ = decode::<Close>(&bytes);
            let _ = decode::<StreamHeader>(&bytes);
            let _ = decode_frame::<StreamRequest>(&bytes);
        }

        #[test]
        fn truncated_frames_never_decode(msg in arb_request(), cut in any::<prop::sample::Index>()) {
            let frame = encode_frame(&msg).unwrap();
            let cut = cut.index(frame.len());
            // A strict prefix is either incomplete or an error, never a message.
            prop_assert!(!matches!(decode_frame::<StreamRequest>(&frame[..cut]), Ok(Some(_))));
        }
    }
}
