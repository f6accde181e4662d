//! Control messages and data stream headers.
//!
//! Every message is a serde enum encoded by [`crate::codec`]. Bincode
//! encodes an enum variant by its position, so variants are only ever
//! appended, never reordered or removed; the snapshot tests in
//! `codec` freeze the bytes of each one.
//!
//! Three kinds of stream carry them:
//!
//! - the **session control stream**, the first bidirectional stream a
//!   client opens to the coordinator: [`SessionMsg`];
//! - one **channel control stream** per channel, bidirectional, opened by
//!   the opener towards the coordinator and by the coordinator towards the
//!   callee: [`ChannelMsg`];
//! - **data streams**, unidirectional, which start with one
//!   [`StreamHeader`] frame and then carry length-prefixed messages.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::codes::{OpenFailCode, RejectCode};
use crate::manifest::Interface;

/// Messages on the session control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionMsg {
    /// Client → coordinator, first frame: who I am and what I speak.
    Hello {
        /// [`crate::PROTOCOL_VERSION`] of the client.
        version: u32,
        /// The name the client wants to be reachable by.
        name: String,
        /// `None`: this client cannot take direct channels (it shares its
        /// UDP socket with other clients, or has direct channels turned
        /// off). `Some`: it can, and these are addresses it has for itself
        /// (at most [`crate::limits::MAX_REPORTED_ADDRS`]), to be tried
        /// besides the address the coordinator observes.
        #[serde(deserialize_with = "bounded::option_addrs")]
        direct: Option<Vec<SocketAddr>>,
    },
    /// Coordinator → client: the session is up.
    Welcome {
        /// Coordinator-assigned session number, unique while it runs.
        session: u64,
        /// The client's address as the coordinator sees it.
        observed: SocketAddr,
    },
    /// Coordinator → client: the hello was refused; the connection closes.
    Reject {
        /// Why, as a code.
        code: RejectCode,
        /// Why, as a sentence that says what was expected.
        message: String,
    },
    /// Client → coordinator, first frame instead of a hello: issue me a
    /// client certificate for `name`, for the key of the certificate I
    /// presented in this connection's TLS handshake.
    ///
    /// With a `token` (from `qmesh-coordinator token create`) this is
    /// enrollment: the token is used up. Without one it is renewal, and the
    /// connection must present a certificate the coordinator issued for
    /// `name`. Answered with [`SessionMsg::Enrolled`] or
    /// [`SessionMsg::Reject`]; the connection then closes.
    Enroll {
        /// [`crate::PROTOCOL_VERSION`] of the client.
        version: u32,
        /// The name to be issued a certificate for.
        name: String,
        /// The one-use enrollment token, or `None` to renew.
        token: Option<String>,
    },
    /// Coordinator → client: the issued certificate.
    Enrolled {
        /// The certificate, PEM, for the key the client presented.
        cert_pem: String,
        /// When it expires, in seconds since the Unix epoch.
        expires: u64,
    },
    /// Client → coordinator: the interfaces this client offers, replacing
    /// what it declared before. Sent right after the hello (before the
    /// welcome; an empty list declares none) and again whenever they
    /// change. At most [`crate::manifest::MAX_INTERFACES`], distinct valid
    /// channel names, [`crate::manifest::MAX_INTERFACES_BYTES`] encoded.
    Interfaces {
        /// The offered interfaces.
        #[serde(deserialize_with = "bounded::interfaces")]
        list: Vec<Interface>,
    },
    /// Either side → the other, after the welcome: are you there? Answered
    /// with a [`SessionMsg::Pong`] carrying the same number.
    Ping {
        /// The sender's sequence number.
        seq: u64,
    },
    /// The answer to a [`SessionMsg::Ping`].
    Pong {
        /// The number of the ping it answers.
        seq: u64,
    },
}

/// Messages on a channel control stream.
///
/// Flow of an open: the opener sends [`ChannelMsg::Open`]; the coordinator
/// answers [`ChannelMsg::OpenFailed`] at once when it cannot route, or opens
/// a stream to the callee with [`ChannelMsg::Incoming`]. The callee answers
/// [`ChannelMsg::Accept`] or [`ChannelMsg::Refuse`]. On accept, both sides
/// get [`ChannelMsg::Ready`] and the two streams are joined: later frames are
/// forwarded from one side to the other. A channel ends with exactly one
/// [`ChannelMsg::Close`] or [`ChannelMsg::Lost`] delivered to each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelMsg {
    /// Opener → coordinator: open channel `channel` on `peer`.
    Open {
        /// The callee's client name.
        peer: String,
        /// The channel name (the subport of `mesh/peer!channel`).
        channel: String,
        /// Which path the opener wants the channel's data on.
        path: PathMode,
    },
    /// Coordinator → callee: `from` wants channel `channel` with you.
    Incoming {
        /// The opener's client name.
        from: String,
        /// The channel name.
        channel: String,
        /// The path the opener asked for.
        path: PathMode,
    },
    /// Callee → coordinator: accepted.
    Accept,
    /// Callee → coordinator: refused.
    Refuse {
        /// The callee's reason, passed on to the opener.
        reason: String,
    },
    /// Coordinator → both sides: the channel is joined end to end.
    Ready {
        /// The channel's number, the same on both sides and unique while
        /// the coordinator runs: direct data streams name it.
        channel: u64,
        /// The other side, introduced for a direct path; `None` when the
        /// channel is relay-only or the other side cannot take direct
        /// channels.
        peer: Option<PeerIntro>,
        /// The callee's manifest for this channel name, when the callee
        /// declares interfaces: both sides keep to its direction.
        interface: Option<Interface>,
    },
    /// Coordinator → opener: the channel could not be opened.
    OpenFailed {
        /// Why, as a code.
        code: OpenFailCode,
        /// Why, as a sentence.
        message: String,
    },
    /// Either side → the other, through the coordinator: graceful close.
    ///
    /// `streams` is the number of data streams the sender opened on the
    /// channel, on either path; `relayed` is how many of those went through
    /// the coordinator. The coordinator forwards the close only after it
    /// has relayed `relayed` streams to their end, and the receiver keeps
    /// handing out data streams until it has accepted `streams`, so nothing
    /// sent before a close is lost. A side that receives a close reports the
    /// channel closed at once and answers with its own close.
    Close {
        /// The closer's reason.
        reason: String,
        /// Data streams the sender opened on this channel.
        streams: u64,
        /// Of those, the ones sent through the coordinator.
        relayed: u64,
    },
    /// Coordinator → client: the other side disappeared.
    Lost {
        /// What the coordinator saw.
        reason: String,
    },
    /// Client → coordinator, first frame of a new stream: the manifest of
    /// interface `channel` on `peer`, without opening it (the control side
    /// alone). Answered with [`ChannelMsg::Manifest`] or
    /// [`ChannelMsg::OpenFailed`]; the coordinator then finishes the stream.
    Describe {
        /// The offerer's client name.
        peer: String,
        /// The interface's channel name.
        channel: String,
    },
    /// Coordinator → client: the manifest asked for, as the offerer
    /// declared it.
    Manifest {
        /// The manifest.
        interface: Interface,
    },
    /// Client → coordinator, first frame of a new stream: who is online
    /// and what they offer. The coordinator answers with one
    /// [`PresenceEvent::Present`] per client and then
    /// [`PresenceEvent::Synced`]; with `live`, it goes on sending changes
    /// until either side finishes the stream.
    Watch {
        /// Keep sending changes after the list.
        live: bool,
    },
    /// Coordinator → watcher: one presence event.
    Presence(PresenceEvent),
    /// Client → coordinator, first frame of a new stream: join broadcast
    /// group `group`. Answered with [`ChannelMsg::Joined`] (or
    /// [`ChannelMsg::OpenFailed`]); after that the stream carries data
    /// messages: the member's broadcasts towards the coordinator, and
    /// [`crate::envelope::GroupEvent`]s towards the member.
    Join {
        /// The group's name (channel-name rules).
        group: String,
    },
    /// Coordinator → member: joined.
    Joined {
        /// Members now in the group, this one included.
        members: u64,
        /// What happens when this member falls behind.
        policy: GroupPolicy,
        /// Largest broadcast body the group carries.
        max_message: u64,
    },
    /// Client → coordinator, first frame of a new stream: how many members
    /// group `group` has. Answered with [`ChannelMsg::MemberCount`].
    Members {
        /// The group's name.
        group: String,
    },
    /// Coordinator → client: the member count asked for (0 for a group
    /// nobody is in).
    MemberCount {
        /// The group's name.
        group: String,
        /// Members now.
        members: u64,
    },
}

/// What the coordinator tells a presence watcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PresenceEvent {
    /// `name` is online and offers `interfaces` (the list before
    /// [`PresenceEvent::Synced`]).
    Present {
        /// The client's name.
        name: String,
        /// What it offers.
        #[serde(deserialize_with = "bounded::interfaces")]
        interfaces: Vec<Interface>,
    },
    /// Every client online when the watch began has been listed.
    Synced,
    /// `name` joined, offering `interfaces`.
    Joined {
        /// The client's name.
        name: String,
        /// What it offers.
        #[serde(deserialize_with = "bounded::interfaces")]
        interfaces: Vec<Interface>,
    },
    /// `name` left.
    Left {
        /// The client's name.
        name: String,
    },
    /// `name` changed what it offers; `interfaces` is the new list.
    Changed {
        /// The client's name.
        name: String,
        /// What it offers now.
        #[serde(deserialize_with = "bounded::interfaces")]
        interfaces: Vec<Interface>,
    },
    /// The watcher fell more than the coordinator's buffer behind; `missed`
    /// events were dropped. Watch again for a fresh list.
    Lagged {
        /// Events dropped.
        missed: u64,
    },
}

/// What a broadcast group does with a member that falls behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum GroupPolicy {
    /// The group waits for the slowest member: senders are slowed.
    Block,
    /// The slow member skips messages and is told how many it missed.
    #[default]
    Lag,
    /// The slow member is removed from the group.
    Evict,
}

impl std::fmt::Display for GroupPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GroupPolicy::Block => "block",
            GroupPolicy::Lag => "lag",
            GroupPolicy::Evict => "evict",
        })
    }
}

impl std::str::FromStr for GroupPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "block" => Ok(GroupPolicy::Block),
            "lag" => Ok(GroupPolicy::Lag),
            "evict" => Ok(GroupPolicy::Evict),
            other => Err(format!(
                "unknown group policy {other:?}; use block, lag or evict"
            )),
        }
    }
}

/// Which path a channel's data takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum PathMode {
    /// Relayed at once, and direct as soon as a direct path is up.
    #[default]
    Auto,
    /// Direct only: the open fails when no direct path comes up in time.
    Direct,
    /// Through the coordinator only.
    Relay,
}

/// What a client needs to reach the other side of a channel directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerIntro {
    /// SHA-256 of the certificate the peer presented to the coordinator:
    /// the only certificate a direct connection to it may present.
    pub fingerprint: [u8; 32],
    /// The peer's address as the coordinator sees it.
    pub observed: SocketAddr,
    /// The addresses the peer reported for itself.
    #[serde(deserialize_with = "bounded::addrs")]
    pub addrs: Vec<SocketAddr>,
    /// Whether this side dials (the other side listens). The coordinator
    /// picks the same dialer for every channel between two clients.
    pub dial: bool,
}

/// First frame of every unidirectional data stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamHeader {
    /// The stream belongs to a channel. `channel` is the QUIC stream id of
    /// that channel's control stream on the same connection.
    Data {
        /// Control stream id of the channel on this connection.
        channel: u64,
    },
    /// On a direct connection between two clients: the stream belongs to
    /// the channel the coordinator numbered `channel` in its
    /// [`ChannelMsg::Ready`].
    Direct {
        /// The coordinator's channel number.
        channel: u64,
    },
    /// As [`StreamHeader::Data`], for the sender's message stream: its data
    /// messages are [`crate::envelope::Envelope`]s.
    Messages {
        /// Control stream id of the channel on this connection.
        channel: u64,
    },
    /// As [`StreamHeader::Direct`], for the sender's message stream.
    DirectMessages {
        /// The coordinator's channel number.
        channel: u64,
    },
}

impl StreamHeader {
    /// Whether the stream carries envelopes rather than application data.
    pub fn is_messages(&self) -> bool {
        matches!(
            self,
            StreamHeader::Messages { .. } | StreamHeader::DirectMessages { .. }
        )
    }
}

/// Address lists that decode without trusting their declared length: a
/// list longer than [`MAX_REPORTED_ADDRS`] is an error, and no more room than
/// that is reserved whatever the length prefix claims (serde's own `Vec`
/// reserves up to 1 MiB from the prefix alone).
mod bounded {
    use std::fmt;
    use std::net::SocketAddr;

    use serde::de::{Deserializer, Error, SeqAccess, Visitor};

    use crate::limits::MAX_REPORTED_ADDRS;
    use crate::manifest::MAX_INTERFACES;

    struct Addrs;

    impl<'de> Visitor<'de> for Addrs {
        type Value = Vec<SocketAddr>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most {MAX_REPORTED_ADDRS} socket addresses")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            if seq.size_hint().is_some_and(|n| n > MAX_REPORTED_ADDRS) {
                return Err(A::Error::custom(format!(
                    "more than {MAX_REPORTED_ADDRS} addresses"
                )));
            }
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_REPORTED_ADDRS));
            while let Some(a) = seq.next_element()? {
                if out.len() == MAX_REPORTED_ADDRS {
                    return Err(A::Error::custom(format!(
                        "more than {MAX_REPORTED_ADDRS} addresses"
                    )));
                }
                out.push(a);
            }
            Ok(out)
        }
    }

    pub(super) fn addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
        d.deserialize_seq(Addrs)
    }

    struct OptionAddrs;

    impl<'de> Visitor<'de> for OptionAddrs {
        type Value = Option<Vec<SocketAddr>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "an optional list of at most {MAX_REPORTED_ADDRS} addresses"
            )
        }

        fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            addrs(d).map(Some)
        }
    }

    struct Interfaces;

    impl<'de> Visitor<'de> for Interfaces {
        type Value = Vec<crate::manifest::Interface>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most {MAX_INTERFACES} interfaces")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let too_many = || A::Error::custom(format!("more than {MAX_INTERFACES} interfaces"));
            if seq.size_hint().is_some_and(|n| n > MAX_INTERFACES) {
                return Err(too_many());
            }
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_INTERFACES));
            while let Some(i) = seq.next_element()? {
                if out.len() == MAX_INTERFACES {
                    return Err(too_many());
                }
                out.push(i);
            }
            Ok(out)
        }
    }

    pub(super) fn interfaces<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<crate::manifest::Interface>, D::Error> {
        d.deserialize_seq(Interfaces)
    }

    pub(super) fn option_addrs<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<SocketAddr>>, D::Error> {
        d.deserialize_option(OptionAddrs)
    }
}
