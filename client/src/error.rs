//! Typed errors, one enum per operation.
//!
//! Faults of the peer or the coordinator (refusals, protocol violations,
//! lost connections) are kept apart from local ones (bad address, bad
//! configuration, limits).

use qmesh_proto::codes::{OpenFailCode, RejectCode};
use qmesh_proto::AddressError;
use quinn::VarInt;

/// Connecting to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The coordinator address is not a `quic/host[:port]` address.
    #[error("bad coordinator address: {0}")]
    Address(#[from] AddressError),
    /// The coordinator host name did not resolve.
    #[error("cannot resolve coordinator host {host}: {reason}")]
    Resolve {
        /// The host that did not resolve.
        host: String,
        /// What the resolver said.
        reason: String,
    },
    /// The local configuration is unusable (certificate files, …).
    #[error("client configuration: {0}")]
    Config(#[from] qmesh_certs::CertError),
    /// The local UDP socket could not be opened.
    #[error("cannot open a UDP socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The coordinator's certificate did not verify.
    #[error("{0}; check the trust given (--ca, --fingerprint, or else the system's roots) and the coordinator's host name")]
    Certificate(String),
    /// The coordinator refused this client's certificate in the TLS
    /// handshake (revoked, expired, wrong CA, …).
    #[error("{0}")]
    CertificateRefused(String),
    /// The QUIC or TLS handshake failed for another reason.
    #[error("cannot connect to the coordinator at {addr}: {reason}")]
    Handshake {
        /// The coordinator's address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// Nothing answered in time.
    #[error(
        "no answer from the coordinator at {addr} within {secs} s; is it running and reachable?"
    )]
    Timeout {
        /// The coordinator's address.
        addr: String,
        /// The timeout in seconds.
        secs: u64,
    },
    /// The coordinator refused the hello.
    #[error("the coordinator refused this client ({code:?}): {message}")]
    Rejected {
        /// Why, as a code.
        code: RejectCode,
        /// Why, as the coordinator's sentence.
        message: String,
    },
    /// The coordinator broke the protocol or closed the connection during hello.
    #[error("the coordinator ended the session during hello: {0}")]
    Session(String),
    /// Several coordinator addresses (configured, or the addresses one
    /// name resolved to) were tried and none joined: what each one did,
    /// in the order they were tried.
    #[error("no coordinator could be joined; tried {}: {}", tried.len(), list(tried))]
    NoneJoined {
        /// Each failure, naming the address it tried.
        tried: Vec<ConnectError>,
    },
}

/// `errors` as one line, each in brackets: they are sentences of their own.
fn list(errors: &[ConnectError]) -> String {
    errors
        .iter()
        .map(|e| format!("[{e}]"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opening a channel failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The address is not `mesh/peer!channel`.
    #[error("bad channel address: {0}")]
    Address(#[from] AddressError),
    /// The coordinator could not open the channel (peer not present,
    /// refused, …): `code` says which, `message` says it for people.
    #[error("{message}")]
    Failed {
        /// Why, as a code.
        code: OpenFailCode,
        /// Why, as a sentence.
        message: String,
    },
    /// No answer within the open timeout.
    #[error("no answer to the channel open within {secs} s")]
    Timeout {
        /// The timeout in seconds.
        secs: u64,
    },
    /// The session with the coordinator is gone.
    #[error("session closed: {0}")]
    Session(String),
    /// The coordinator broke the protocol.
    #[error("protocol error from the coordinator: {0}")]
    Protocol(String),
    /// An interface list breaks the rules (names, count, size).
    #[error("bad interface list: {0}")]
    Interfaces(String),
    /// A direct-only channel was asked for and no direct path came up; the
    /// channel was closed. Open it with path `auto` to fall back to the
    /// relay.
    #[error("no direct path to {peer}: {reason}; open with path auto to use the relay instead")]
    DirectUnavailable {
        /// The peer's name.
        peer: String,
        /// What was tried and seen.
        reason: String,
    },
}

impl From<qmesh_proto::msg::Failure> for OpenError {
    /// The coordinator's refusal of a request, as the error it carries.
    fn from(f: qmesh_proto::msg::Failure) -> Self {
        OpenError::Failed {
            code: f.code,
            message: f.message,
        }
    }
}

impl OpenError {
    /// The coordinator's code, when it refused the open.
    pub fn code(&self) -> Option<OpenFailCode> {
        match self {
            Self::Failed { code, .. } => Some(*code),
            Self::DirectUnavailable { .. } => Some(OpenFailCode::DirectUnavailable),
            _ => None,
        }
    }
}

/// Accepting an offered channel failed.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The opener gave up or left before the channel was ready.
    #[error("the channel was withdrawn before it was ready: {0}")]
    Withdrawn(String),
    /// The session with the coordinator is gone.
    #[error("session closed: {0}")]
    Session(String),
}

/// Opening or accepting a data stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The channel has ended; no new streams.
    #[error("the channel has ended")]
    ChannelEnded,
    /// The session with the coordinator is gone.
    #[error("session closed: {0}")]
    Session(String),
    /// The channel is direct-only and its direct path is not up.
    #[error("no direct path for this direct-only channel: {0}")]
    DirectUnavailable(String),
    /// The channel's interface does not let this side send.
    #[error("sending against the interface's direction: {0}")]
    WrongDirection(String),
}

/// Sending a message failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The message is larger than the configured maximum.
    #[error("message of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The message length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The receiver stopped the stream with this code.
    #[error("the receiver stopped the stream: {meaning} (code {0})", meaning = stop_meaning(*.0))]
    Stopped(VarInt),
    /// The stream or session failed.
    #[error("stream failed: {0}")]
    Stream(String),
    /// The channel's interface does not let this side send.
    #[error("sending against the interface's direction: {0}")]
    WrongDirection(String),
    /// A typed value could not be encoded.
    #[error("cannot encode the value: {0}")]
    Encode(String),
}

/// A request ended without a usable reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No reply came: the timeout passed, the channel ended, or the
    /// request could not be sent (the reason says which).
    #[error("reply missing: {reason}")]
    ReplyMissing {
        /// Why.
        reason: String,
    },
    /// A reply came but is not the expected type.
    #[error("the reply does not decode as the expected type: {0}")]
    Decode(String),
}

/// Receiving a message failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The sender announced a message larger than this side's maximum; the
    /// stream has been stopped.
    #[error("incoming message of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The sender (or the relay on its behalf) reset the stream.
    #[error("the stream was reset (code {0})")]
    Reset(VarInt),
    /// The stream ended in the middle of a message.
    #[error("the stream ended in the middle of a message")]
    Truncated,
    /// A message broke the protocol (a group event that does not parse).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The stream or session failed.
    #[error("stream failed: {0}")]
    Stream(String),
    /// A message does not decode as the expected type.
    #[error("the message does not decode as the expected type: {0}")]
    Decode(String),
}

/// A graceful close did not complete.
#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    /// The peer did not confirm the close in time.
    #[error("the peer did not confirm the close within {secs} s")]
    Timeout {
        /// The timeout in seconds.
        secs: u64,
    },
    /// The channel was lost before the peer confirmed the close: what this
    /// side sent may not all have been read.
    #[error("the channel was lost before the peer confirmed the close: {reason}")]
    Lost {
        /// Why the channel was lost.
        reason: String,
    },
}

/// What a stop code means, for the user: the known `StreamCode`'s
/// description, else that the code is the application's own.
fn stop_meaning(code: VarInt) -> &'static str {
    qmesh_proto::codes::StreamCode::from_code(code.into_inner())
        .map_or("a code of the receiving application", |c| c.describe())
}
