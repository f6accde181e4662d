//! Typed close and rejection codes.
//!
//! QUIC carries a numeric application error code when a connection is
//! closed or a stream is reset or stopped. qmesh gives those numbers names:
//! [`ConnCode`] for connections, [`StreamCode`] for streams. [`RejectCode`]
//! and [`OpenFailCode`] travel inside control messages.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! numbered {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $num:expr, $text:expr;)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// The number sent on the wire.
            pub fn code(self) -> u32 {
                match self { $(Self::$variant => $num,)* }
            }

            /// The code for a number received from the wire, if known.
            pub fn from_code(code: u64) -> Option<Self> {
                match code { $(n if n == $num => Some(Self::$variant),)* _ => None }
            }

            /// A short human description.
            pub fn describe(self) -> &'static str {
                match self { $(Self::$variant => $text,)* }
            }
        }

        #[cfg(feature = "quic")]
        impl $name {
            /// The code as the QUIC varint that carries it in a close,
            /// reset or stop.
            pub fn varint(self) -> quinn_proto::VarInt {
                quinn_proto::VarInt::from_u32(self.code())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{} ({})", self.describe(), self.code())
            }
        }
    };
}

numbered! {
    /// Why a QUIC connection was closed (the application error code of
    /// `CONNECTION_CLOSE`). The reason phrase carries a sentence for people.
    ConnCode {
        /// The client left normally.
        Normal = 0, "normal close";
        /// The coordinator is shutting down.
        Shutdown = 1, "coordinator shutting down";
        /// The peer sent bytes that are not a valid message.
        Malformed = 2, "malformed message";
        /// The peer sent a frame longer than the limit.
        FrameTooLarge = 3, "frame too large";
        /// The peer sent a valid message where it is not allowed.
        UnexpectedMessage = 4, "unexpected message";
        /// The hello carried a protocol version this side does not speak.
        VersionMismatch = 5, "protocol version mismatch";
        /// The requested client name is held by another session.
        NameTaken = 6, "name taken";
        /// The requested client name breaks the naming rules.
        InvalidName = 7, "invalid name";
        /// The client did not say hello in time.
        HelloTimeout = 8, "hello timeout";
        /// A local failure on the closing side.
        Internal = 9, "internal error";
        /// The client may not join.
        NotAuthorised = 10, "not authorised";
        /// The coordinator holds as many clients as it is configured for.
        Full = 11, "coordinator full";
        /// A new session with the same credential took over this name.
        Replaced = 12, "replaced by a newer session";
        /// The operator revoked this client's certificate.
        Revoked = 13, "certificate revoked";
        /// An enrollment token was unknown, expired, already used or not
        /// for this name.
        BadToken = 14, "bad enrollment token";
        /// The client sent past its rate limit's flood threshold.
        RateExceeded = 15, "rate limit exceeded";
        /// The peer missed the configured number of heartbeats in a row.
        HeartbeatMissed = 16, "heartbeats missed";
        /// The operator closed this session (`qmesh-coordinator kick`);
        /// the client may join again.
        Kicked = 17, "closed by the operator";
        /// The cluster's shared directory (etcd) cannot be reached, so the
        /// coordinator cannot claim the name without risking a duplicate;
        /// the client may try again.
        Unavailable = 18, "directory unavailable";
    }
}

numbered! {
    /// Why a stream was reset or stopped.
    StreamCode {
        /// The application cancelled the stream.
        Cancelled = 0, "cancelled";
        /// A data stream named a channel that does not exist.
        UnknownChannel = 1, "unknown channel";
        /// A data message was longer than the receiver's limit.
        MessageTooLarge = 2, "message too large";
        /// The channel ended before the stream was delivered.
        ChannelEnded = 3, "channel ended";
        /// The peer on the other side of the relay disappeared.
        PeerLost = 4, "peer lost";
        /// The stream carried bytes that break the protocol.
        Malformed = 5, "malformed stream";
        /// The stream's frame was longer than the limit.
        FrameTooLarge = 6, "frame too large";
        /// The channel already carries as many data streams at once as the
        /// coordinator allows.
        TooManyStreams = 7, "too many streams on the channel";
        /// The stream sends against the direction of the channel's
        /// interface.
        WrongDirection = 8, "sent against the interface's direction";
        /// The member was evicted from a broadcast group for falling
        /// behind.
        Evicted = 9, "evicted from the group";
        /// The sender went over a quota of the interface.
        OverQuota = 10, "over the interface's quota";
        /// A forwarded connection was reset (or aborted) on the other side.
        ConnectionReset = 11, "forwarded connection reset";
        /// A forwarded connection ended without finishing (its route was
        /// removed, or the forwarder is shutting down).
        RouteClosed = 12, "forwarding route closed";
        /// The receiver does not take files: `qmesh listen` without an
        /// `--out` directory stops a file stream with this code.
        FileRefused = 13, "the receiver takes no files (it has no --out directory)";
    }
}

/// Why the coordinator refused a hello. Sent in a [`crate::msg::Reject`].
///
/// Bincode encodes the variant position: append, never reorder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectCode {
    /// The client speaks another protocol version.
    VersionMismatch,
    /// Another session holds the name.
    NameTaken,
    /// The name breaks the naming rules.
    InvalidName,
    /// The client may not join.
    NotAuthorised,
    /// The coordinator is shutting down.
    ShuttingDown,
    /// The coordinator holds as many clients as it is configured for.
    Full,
    /// An enrollment token was unknown, expired, already used or not for
    /// this name.
    BadToken,
    /// The cluster's shared directory cannot be reached: the name cannot
    /// be claimed now. Worth trying again.
    Unavailable,
}

impl RejectCode {
    /// The connection close code that accompanies this rejection.
    pub fn conn_code(self) -> ConnCode {
        match self {
            Self::VersionMismatch => ConnCode::VersionMismatch,
            Self::NameTaken => ConnCode::NameTaken,
            Self::InvalidName => ConnCode::InvalidName,
            Self::NotAuthorised => ConnCode::NotAuthorised,
            Self::ShuttingDown => ConnCode::Shutdown,
            Self::Full => ConnCode::Full,
            Self::BadToken => ConnCode::BadToken,
            Self::Unavailable => ConnCode::Unavailable,
        }
    }

    /// The rejection a connection close code stands for, if any (the
    /// inverse of [`RejectCode::conn_code`]).
    pub fn from_conn_code(code: ConnCode) -> Option<Self> {
        [
            Self::VersionMismatch,
            Self::NameTaken,
            Self::InvalidName,
            Self::NotAuthorised,
            Self::ShuttingDown,
            Self::Full,
            Self::BadToken,
            Self::Unavailable,
        ]
        .into_iter()
        .find(|r| r.conn_code() == code)
    }
}

/// Why a channel could not be opened. Sent in a [`crate::msg::Failure`].
///
/// Bincode encodes the variant position: append, never reorder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpenFailCode {
    /// No client of that name is connected.
    PeerNotPresent,
    /// The peer refused the channel (the message carries its reason).
    Refused,
    /// The address is not a valid `mesh/peer!channel`.
    InvalidAddress,
    /// The peer did not answer in time.
    Timeout,
    /// The peer left while the channel was being opened.
    PeerLeft,
    /// A client asked for a channel to itself.
    SelfChannel,
    /// The coordinator is shutting down.
    ShuttingDown,
    /// A direct-only channel was asked for, and no direct path exists or
    /// came up in time.
    DirectUnavailable,
    /// The opener or the peer is part of as many channels as the
    /// coordinator allows one client.
    TooManyChannels,
    /// The coordinator's access policy does not allow this open.
    Denied,
    /// The peer declares interfaces and this channel name is not one of
    /// them; the message lists the ones it offers.
    NoSuchInterface,
    /// The peer's interface takes no more channels at once.
    OverQuota,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_distinct() {
        let all = [
            ConnCode::Normal,
            ConnCode::Shutdown,
            ConnCode::Malformed,
            ConnCode::FrameTooLarge,
            ConnCode::UnexpectedMessage,
            ConnCode::VersionMismatch,
            ConnCode::NameTaken,
            ConnCode::InvalidName,
            ConnCode::HelloTimeout,
            ConnCode::Internal,
            ConnCode::NotAuthorised,
            ConnCode::Full,
            ConnCode::Replaced,
            ConnCode::Revoked,
            ConnCode::BadToken,
            ConnCode::RateExceeded,
            ConnCode::HeartbeatMissed,
            ConnCode::Kicked,
            ConnCode::Unavailable,
        ];
        for (i, c) in all.iter().enumerate() {
            assert_eq!(c.code() as usize, i);
            assert_eq!(ConnCode::from_code(c.code().into()), Some(*c));
        }
        assert_eq!(ConnCode::from_code(999), None);
        assert_eq!(StreamCode::from_code(2), Some(StreamCode::MessageTooLarge));
        assert_eq!(ConnCode::NameTaken.to_string(), "name taken (6)");
        assert_eq!(
            RejectCode::from_conn_code(ConnCode::NameTaken),
            Some(RejectCode::NameTaken)
        );
        assert_eq!(RejectCode::from_conn_code(ConnCode::Malformed), None);
    }
}

#[cfg(all(test, feature = "quic"))]
mod quic_tests {
    use super::*;

    #[test]
    fn codes_keep_their_numbers_as_varints() {
        assert_eq!(ConnCode::Normal.varint().into_inner(), 0);
        for code in [StreamCode::Cancelled, StreamCode::TooManyStreams] {
            assert_eq!(code.varint().into_inner(), u64::from(code.code()));
        }
        assert_eq!(
            ConnCode::Shutdown.varint().into_inner(),
            u64::from(ConnCode::Shutdown.code())
        );
    }
}
