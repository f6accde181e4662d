//! The vocabulary of endings and paths: how a channel ended
//! ([`ChannelEnd`], [`Side`]), the path its data takes ([`Path`]), and how
//! a session's end is put into words.

use std::fmt;
use std::net::SocketAddr;
use std::sync::OnceLock;

use quinn::ConnectionError;

/// Which side ended a channel gracefully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This client closed it.
    Local,
    /// The peer closed it.
    Peer,
}

/// How a channel ended. Every channel ends exactly once, one way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelEnd {
    /// Closed gracefully by one side, with its reason.
    Closed {
        /// Who closed it.
        by: Side,
        /// The closer's reason.
        reason: String,
    },
    /// The peer or the coordinator disappeared.
    Lost {
        /// What was seen.
        reason: String,
    },
}

impl fmt::Display for ChannelEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed {
                by: Side::Local,
                reason,
            } => write!(f, "closed by this side: {reason}"),
            Self::Closed {
                by: Side::Peer,
                reason,
            } => write!(f, "closed by the peer: {reason}"),
            Self::Lost { reason } => write!(f, "lost: {reason}"),
        }
    }
}

/// The path a channel's new data streams take from this side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Through the coordinator.
    Relay,
    /// On a direct connection to the peer at `remote`.
    Direct {
        /// The peer's address on the direct connection.
        remote: SocketAddr,
    },
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Relay => f.write_str("relay"),
            Path::Direct { remote } => write!(f, "direct ({remote})"),
        }
    }
}

/// Why a session ended, for the user: the reason this client gave when it
/// closed the session itself, otherwise the close as QUIC reports it.
pub(crate) fn describe_end(err: &ConnectionError, closed_why: &OnceLock<String>) -> String {
    match (err, closed_why.get()) {
        (ConnectionError::LocallyClosed, Some(why)) => why.clone(),
        _ => qmesh_certs::transport::describe_close(err),
    }
}
