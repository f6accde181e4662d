//! Control messages and data stream headers, one type per stream and
//! direction.
//!
//! Every message is a serde type encoded by [`crate::codec`]. Bincode
//! encodes an enum variant by its position, so variants are only ever
//! appended, never reordered or removed; the snapshot tests in `codec`
//! freeze the bytes of each one.
//!
//! Each stream has its own small set of types, read in the order the
//! protocol says, so a message that cannot come at some point cannot be
//! decoded there either (a frame of another type is malformed):
//!
//! | stream | client → coordinator | coordinator → client |
//! |---|---|---|
//! | session control stream | [`Greeting`] first, then [`ClientSession`] frames | [`HelloAnswer`] or [`EnrollAnswer`], then [`CoordinatorSession`] frames |
//! | stream a client opens | [`StreamRequest`] first | per request, below |
//! | … for [`StreamRequest::Open`] (the opener's channel control stream) | [`Close`] | [`OpenAnswer`], then [`Ending`] |
//! | … for [`StreamRequest::Describe`] | — | [`DescribeAnswer`] |
//! | … for [`StreamRequest::Watch`] | — | [`PresenceEvent`]s |
//! | … for [`StreamRequest::Join`] | broadcasts (data messages) | [`JoinAnswer`], then group events (data messages) |
//! | … for [`StreamRequest::Members`] | — | [`MembersAnswer`] |
//! | stream the coordinator opens (the callee's channel control stream) | [`IncomingAnswer`], then [`Close`] | [`Incoming`] first, then [`Ready`], then [`Ending`] |
//! | unidirectional data stream | [`StreamHeader`] first, then length-prefixed messages | the same |
//!
//! Each enum derives its variants' names for logs (`name()`), in
//! kebab-case, so no match lists them a second time.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::codes::{OpenFailCode, RejectCode};
use crate::ids::{ChannelId, ChannelName, ClientName, GroupName, SessionId, StreamId};
use crate::manifest::Interface;

/// Gives every message enum a `name()` for logs, derived from its variant
/// names by `strum`.
macro_rules! named {
    ($($ty:ty),* $(,)?) => {$(
        impl $ty {
            /// The variant's name, in kebab-case, for logs and errors.
            pub fn name(&self) -> &'static str {
                self.into()
            }
        }
    )*};
}

named!(
    Greeting,
    HelloAnswer,
    EnrollAnswer,
    ClientSession,
    CoordinatorSession,
    StreamRequest,
    OpenAnswer,
    IncomingAnswer,
    Ending,
    DescribeAnswer,
    JoinAnswer,
    MembersAnswer,
    PresenceEvent,
    StreamHeader,
    LinkAnswer,
    LinkRequest,
);

// ---------------------------------------------------------------------
// The session control stream.

/// Client → coordinator: the first frame of the session control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum Greeting {
    /// Join the mesh. Followed by one [`ClientSession::Interfaces`], then
    /// answered with a [`HelloAnswer`].
    Hello(Hello),
    /// Issue me a client certificate. Answered with an [`EnrollAnswer`];
    /// the connection then closes.
    Enroll(Enroll),
}

/// Who the client is and what it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the client.
    pub version: u32,
    /// The name the client wants to be reachable by.
    pub name: ClientName,
    /// `None`: this client cannot take direct channels (it shares its UDP
    /// socket with other clients, or has direct channels turned off).
    /// `Some`: it can, and these are addresses it has for itself (at most
    /// [`crate::limits::MAX_REPORTED_ADDRS`]), to be tried besides the
    /// address the coordinator observes.
    #[serde(deserialize_with = "bounded::option_addrs")]
    pub direct: Option<Vec<SocketAddr>>,
}

/// Issue me a client certificate for `name`, for the key of the
/// certificate I presented in this connection's TLS handshake.
///
/// With a `token` (from `qmesh-coordinator token create`) this is
/// enrollment: the token is used up. Without one it is renewal, and the
/// connection must present a certificate the coordinator issued for
/// `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enroll {
    /// [`crate::PROTOCOL_VERSION`] of the client.
    pub version: u32,
    /// The name to be issued a certificate for.
    pub name: ClientName,
    /// The one-use enrollment token, or `None` to renew.
    pub token: Option<String>,
}

/// Coordinator → client: the answer to a [`Greeting::Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum HelloAnswer {
    /// The session is up.
    Welcome(Welcome),
    /// The hello was refused; the connection closes.
    Reject(Reject),
}

/// The session is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Coordinator-assigned session number, unique while it runs.
    pub session: SessionId,
    /// The client's address as the coordinator sees it.
    pub observed: SocketAddr,
}

/// A refused hello or enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// Why, as a code.
    pub code: RejectCode,
    /// Why, as a sentence that says what was expected.
    pub message: String,
}

/// Coordinator → client: the answer to a [`Greeting::Enroll`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum EnrollAnswer {
    /// The issued certificate.
    Enrolled {
        /// The certificate, PEM, for the key the client presented.
        cert_pem: String,
        /// When it expires, in seconds since the Unix epoch.
        expires: u64,
    },
    /// The enrollment was refused; the connection closes.
    Reject(Reject),
}

/// Client → coordinator on the session stream, after the
/// [`Greeting::Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum ClientSession {
    /// The interfaces this client offers, replacing what it declared
    /// before. Sent right after the hello (before the welcome; an empty
    /// list declares none) and again whenever they change. At most
    /// [`crate::manifest::MAX_INTERFACES`], distinct valid channel names,
    /// [`crate::manifest::MAX_INTERFACES_BYTES`] encoded.
    Interfaces {
        /// The offered interfaces.
        #[serde(deserialize_with = "bounded::interfaces")]
        list: Vec<Interface>,
    },
    /// Are you there? Answered with a [`CoordinatorSession::Pong`] carrying
    /// the same number.
    Ping {
        /// The sender's sequence number.
        seq: u64,
    },
    /// The answer to a [`CoordinatorSession::Ping`].
    Pong {
        /// The number of the ping it answers.
        seq: u64,
    },
}

/// Coordinator → client on the session stream, after the
/// [`HelloAnswer::Welcome`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum CoordinatorSession {
    /// Are you there? Answered with a [`ClientSession::Pong`] carrying the
    /// same number.
    Ping {
        /// The sender's sequence number.
        seq: u64,
    },
    /// The answer to a [`ClientSession::Ping`].
    Pong {
        /// The number of the ping it answers.
        seq: u64,
    },
    /// The coordinator is stopping (version 8): it takes no new channels
    /// and no new sessions; the client's live channels may run for up to
    /// `drain_ms` milliseconds, after which the coordinator closes the
    /// connection with [`crate::codes::ConnCode::Shutdown`]. The client
    /// joins again (to another coordinator first, when it knows several).
    GoingAway {
        /// How long live channels may still run, in milliseconds.
        drain_ms: u64,
    },
}

// ---------------------------------------------------------------------
// Streams a client opens.

/// Client → coordinator: the first frame of a bidirectional stream the
/// client opens after the welcome. It says what the stream is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum StreamRequest {
    /// Open channel `channel` on `peer`; the stream becomes the opener's
    /// channel control stream. Answered with an [`OpenAnswer`].
    Open(Open),
    /// The manifest of interface `channel` on `peer`, without opening it
    /// (the control side alone). Answered with a [`DescribeAnswer`]; the
    /// coordinator then finishes the stream.
    Describe {
        /// The offerer's client name.
        peer: ClientName,
        /// The interface's channel name.
        channel: ChannelName,
    },
    /// Who is online and what they offer. The coordinator answers with one
    /// [`PresenceEvent::Present`] per client and then
    /// [`PresenceEvent::Synced`]; with `live`, it goes on sending changes
    /// until either side finishes the stream.
    Watch {
        /// Keep sending changes after the list.
        live: bool,
    },
    /// Join broadcast group `group`. Answered with a [`JoinAnswer`]; after
    /// [`JoinAnswer::Joined`] the stream carries data messages: the
    /// member's broadcasts towards the coordinator, and
    /// [`crate::envelope::GroupEvent`]s towards the member.
    Join {
        /// The group's name (channel-name rules).
        group: GroupName,
    },
    /// How many members group `group` has. Answered with a
    /// [`MembersAnswer`].
    Members {
        /// The group's name.
        group: GroupName,
    },
    /// This stream is a pipe on relayed channel `channel` (the id of the
    /// channel's control stream on this connection): the coordinator opens
    /// a bidirectional stream to the peer, sends it [`Arrival::Pipe`], and
    /// copies bytes both ways, passing finishes, resets and stops across.
    Pipe {
        /// Control stream id of the channel on this connection.
        channel: StreamId,
    },
}

/// Open channel `channel` on `peer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// The callee's client name.
    pub peer: ClientName,
    /// The channel name (the subport of `mesh/peer!channel`).
    pub channel: ChannelName,
    /// Which path the opener wants the channel's data on.
    pub path: PathMode,
}

/// Why the coordinator could not do what a stream asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Why, as a code.
    pub code: OpenFailCode,
    /// Why, as a sentence.
    pub message: String,
}

/// Coordinator → opener: the answer to a [`StreamRequest::Open`].
// One answer per channel open, read once and taken apart at once: the
// size of `Ready` on the stack does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum OpenAnswer {
    /// The channel is joined end to end.
    Ready(Ready),
    /// The channel could not be opened; the coordinator finishes the
    /// stream.
    Failed(Failure),
}

/// Coordinator → both sides: the channel is joined end to end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// The channel's number, the same on both sides: direct data streams
    /// name it.
    pub channel: ChannelId,
    /// The other side, introduced for a direct path; `None` when the
    /// channel is relay-only or the other side cannot take direct channels.
    pub peer: Option<PeerIntro>,
    /// The callee's manifest for this channel name, when the callee
    /// declares interfaces: both sides keep to its direction.
    pub interface: Option<Interface>,
}

/// Coordinator → callee: the first frame of a stream the coordinator
/// opens: `from` wants channel `channel` with you. Answered with an
/// [`IncomingAnswer`]; after [`IncomingAnswer::Accept`] the coordinator
/// sends [`Ready`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The opener's client name.
    pub from: ClientName,
    /// The channel name.
    pub channel: ChannelName,
    /// The path the opener asked for.
    pub path: PathMode,
}

/// Coordinator → client: the first frame of every bidirectional stream
/// the coordinator opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum Arrival {
    /// A channel offer, answered with an [`IncomingAnswer`].
    Channel(Incoming),
    /// A pipe the peer opened on a relayed channel (see
    /// [`StreamRequest::Pipe`]); `channel` is the id of this client's
    /// control stream of that channel. Bytes follow, both ways.
    Pipe {
        /// Control stream id of the channel on this connection.
        channel: StreamId,
    },
}

/// Exposer → opener: the first frame on a pipe of a forwarding interface
/// (`qmesh expose`), once the exposer has tried its target. After
/// [`PipeAnswer::Connected`] the pipe carries the forwarded bytes both
/// ways; after [`PipeAnswer::Failed`] the exposer finishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum PipeAnswer {
    /// The target accepted the connection.
    Connected,
    /// The target could not be reached: why, for the opener's log.
    Failed {
        /// A sentence naming the target and the error.
        reason: String,
    },
}

/// On a direct connection between two clients, the first frame of every
/// bidirectional stream: a pipe on the channel the coordinator numbered
/// `channel` in its [`Ready`]. Bytes follow, both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectPipe {
    /// The coordinator's channel number.
    pub channel: ChannelId,
}

/// Callee → coordinator: the answer to an [`Incoming`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum IncomingAnswer {
    /// Accepted.
    Accept,
    /// Refused.
    Refuse {
        /// The callee's reason, passed on to the opener.
        reason: String,
    },
}

/// Either side → the coordinator, after [`Ready`], on its channel control
/// stream: graceful close. The coordinator forwards it to the other side
/// as [`Ending::Closed`].
///
/// `streams` is the number of data streams the sender opened on the
/// channel, on either path; `relayed` is how many of those went through the
/// coordinator. The coordinator forwards the close only after it has
/// relayed `relayed` streams to their end, and the receiver keeps handing
/// out data streams until it has accepted `streams`, so nothing sent before
/// a close is lost. A side that receives a close reports the channel closed
/// at once and answers with its own close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Close {
    /// The closer's reason.
    pub reason: String,
    /// Data streams the sender opened on this channel.
    pub streams: u64,
    /// Of those, the ones sent through the coordinator.
    pub relayed: u64,
}

/// Coordinator → a side, after [`Ready`], on its channel control stream:
/// how the other side ended. Exactly one reaches each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum Ending {
    /// The other side closed the channel.
    Closed(Close),
    /// The other side disappeared.
    Lost {
        /// What the coordinator saw.
        reason: String,
    },
}

/// Coordinator → client: the answer to a [`StreamRequest::Describe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum DescribeAnswer {
    /// The manifest asked for, as the offerer declared it.
    Manifest {
        /// The manifest.
        interface: Interface,
    },
    /// No such manifest, or not allowed to see it.
    Failed(Failure),
}

/// Coordinator → member: the answer to a [`StreamRequest::Join`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum JoinAnswer {
    /// Joined.
    Joined {
        /// Members now in the group, this one included.
        members: u64,
        /// What happens when this member falls behind.
        policy: GroupPolicy,
        /// Largest broadcast body the group carries.
        max_message: u64,
    },
    /// Not joined.
    Failed(Failure),
}

/// Coordinator → client: the answer to a [`StreamRequest::Members`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum MembersAnswer {
    /// The member count asked for (0 for a group nobody is in).
    Count {
        /// The group's name.
        group: GroupName,
        /// Members now.
        members: u64,
    },
    /// The group name was not valid.
    Failed(Failure),
}

// ---------------------------------------------------------------------
// Shared parts.

/// What the coordinator tells a presence watcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum PresenceEvent {
    /// `name` is online and offers `interfaces` (the list before
    /// [`PresenceEvent::Synced`]).
    Present {
        /// The client's name.
        name: ClientName,
        /// What it offers.
        #[serde(deserialize_with = "bounded::interfaces")]
        interfaces: Vec<Interface>,
    },
    /// Every client online when the watch began has been listed.
    Synced,
    /// `name` joined, offering `interfaces`.
    Joined {
        /// The client's name.
        name: ClientName,
        /// What it offers.
        #[serde(deserialize_with = "bounded::interfaces")]
        interfaces: Vec<Interface>,
    },
    /// `name` left.
    Left {
        /// The client's name.
        name: ClientName,
    },
    /// `name` changed what it offers; `interfaces` is the new list.
    Changed {
        /// The client's name.
        name: ClientName,
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
    /// The peer's session at the coordinator. A peer with the same
    /// certificate under a new session (it restarted or reconnected) may
    /// be at a new address: a direct link made for an older session is
    /// replaced.
    pub session: SessionId,
}

/// First frame of every unidirectional data stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum StreamHeader {
    /// The stream belongs to a relayed channel: `channel` is the id of that
    /// channel's control stream on the same connection.
    Data {
        /// Control stream id of the channel on this connection.
        channel: StreamId,
    },
    /// On a direct connection between two clients: the stream belongs to
    /// the channel the coordinator numbered `channel` in its [`Ready`].
    Direct {
        /// The coordinator's channel number.
        channel: ChannelId,
    },
    /// As [`StreamHeader::Data`], for the sender's message stream: its data
    /// messages are [`crate::envelope::Envelope`]s.
    Messages {
        /// Control stream id of the channel on this connection.
        channel: StreamId,
    },
    /// As [`StreamHeader::Direct`], for the sender's message stream.
    DirectMessages {
        /// The coordinator's channel number.
        channel: ChannelId,
    },
    /// On a direct connection: the sender holds channel `channel` on this
    /// connection because the coordinator no longer carries its control on
    /// the sender's side (protocol.md §8.9). Nothing follows the header.
    Hold {
        /// The coordinator's channel number.
        channel: ChannelId,
    },
    /// On a direct connection, for a held channel: one [`Close`] frame
    /// follows, the sender's close as it would have gone on the channel
    /// control stream.
    DirectClose {
        /// The coordinator's channel number.
        channel: ChannelId,
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

// ---------------------------------------------------------------------
// The member link between two coordinators of a cluster (protocol.md §23).

/// Dialling member → accepting member: the first frame of the link's first
/// bidirectional stream, which stays open as the link's control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkHello {
    /// [`crate::PROTOCOL_VERSION`] of the dialling member.
    pub version: u32,
    /// The cluster's name.
    pub cluster: String,
    /// The dialling member's id, as registered in the directory.
    pub member: String,
}

/// Accepting member → dialling member: the answer to a [`LinkHello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum LinkAnswer {
    /// The link is up; `member` is the accepting member's id.
    Welcome {
        /// The accepting member's id.
        member: String,
    },
    /// The link is refused; the connection closes.
    Refused {
        /// Why.
        reason: String,
    },
}

/// The first frame of every other bidirectional stream a member opens on
/// a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum LinkRequest {
    /// A pipe on a channel that crosses the link; `channel` is the id of
    /// the channel's control stream on the link. Bytes follow, both ways.
    /// (Variant 0, so that an [`Arrival::Pipe`] written to a link by
    /// mistake fails to decode instead of passing for this.)
    Pipe {
        /// Control stream id of the channel on the link.
        channel: StreamId,
    },
    /// A client of the sending member opens a channel on a client of the
    /// receiving one. Answered with an [`OpenAnswer`]; then both ways
    /// carry [`Ending`] frames, exactly one each.
    Open(LinkOpen),
    /// The sending member has members of broadcast group `group` and asks
    /// for the receiving member's broadcasts to it. Nothing more is sent
    /// this way (its end is the end of the subscription); the other way
    /// carries the group's events exactly as a member's group stream
    /// does, the sender's name stamped by the member where it was sent.
    Join {
        /// The group's name (channel-name rules).
        group: GroupName,
    },
    /// The sending member's client watches presence: the receiving member
    /// answers with its own clients only, as [`PresenceEvent`] frames
    /// exactly as on a client's presence stream; with `live` it goes on
    /// with their changes until the asker finishes the stream.
    Watch {
        /// Go on sending changes after the list.
        live: bool,
    },
    /// A describe of `peer`, a client of the receiving member, asked by a
    /// client of the sending member (whose policy allowed it). Answered
    /// with one [`DescribeAnswer`].
    Describe {
        /// The offerer's client name.
        peer: ClientName,
        /// The interface's channel name.
        channel: ChannelName,
    },
}

/// A channel open passed to the member that holds the callee: the opener
/// as its own member saw it, and what it asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkOpen {
    /// The opener's client name.
    pub opener: ClientName,
    /// The fingerprint of the certificate the opener presented.
    pub fingerprint: [u8; 32],
    /// The opener's address as its member sees it.
    pub observed: SocketAddr,
    /// The addresses the opener reported, or `None` when it cannot take
    /// direct channels.
    #[serde(deserialize_with = "bounded::option_addrs")]
    pub direct: Option<Vec<SocketAddr>>,
    /// The opener's session at its member.
    pub session: SessionId,
    /// The callee, the channel and the path, as in [`Open`] (the path
    /// after the opener's member applied the policy).
    pub open: Open,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::limits::MAX_REPORTED_ADDRS;
    use crate::manifest::MAX_INTERFACES;

    #[test]
    fn a_group_policy_reads_back_from_its_name() {
        for p in [GroupPolicy::Block, GroupPolicy::Lag, GroupPolicy::Evict] {
            assert_eq!(p.to_string().parse::<GroupPolicy>(), Ok(p));
        }
        assert_eq!("block".parse::<GroupPolicy>(), Ok(GroupPolicy::Block));
        assert_eq!("evict".parse::<GroupPolicy>(), Ok(GroupPolicy::Evict));
        let err = "drop".parse::<GroupPolicy>().unwrap_err();
        assert!(err.contains("block, lag or evict"), "{err}");
    }

    #[test]
    fn only_message_streams_carry_envelopes() {
        let (stream, channel) = (StreamId(1), ChannelId(1));
        assert!(StreamHeader::Messages { channel: stream }.is_messages());
        assert!(StreamHeader::DirectMessages { channel }.is_messages());
        assert!(!StreamHeader::Data { channel: stream }.is_messages());
        assert!(!StreamHeader::Direct { channel }.is_messages());
        assert!(!StreamHeader::Hold { channel }.is_messages());
        assert!(!StreamHeader::DirectClose { channel }.is_messages());
    }

    #[test]
    fn exactly_max_interfaces_decode_and_one_more_does_not() {
        let list = |n: usize| ClientSession::Interfaces {
            list: (0..n)
                .map(|i| Interface::new(format!("i{i}"), ""))
                .collect(),
        };
        let at = list(MAX_INTERFACES);
        assert_eq!(decode::<ClientSession>(&encode(&at).unwrap()).unwrap(), at);
        let over = encode(&list(MAX_INTERFACES + 1)).unwrap();
        let err = decode::<ClientSession>(&over).unwrap_err();
        assert!(err.to_string().contains("more than 64 interfaces"), "{err}");
    }

    #[test]
    fn a_peer_intro_keeps_up_to_max_addresses() {
        let intro = |n: usize| PeerIntro {
            fingerprint: [3; 32],
            observed: "192.0.2.1:5".parse().unwrap(),
            addrs: (0..n)
                .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 7)))
                .collect(),
            dial: true,
            session: SessionId(4),
        };
        for n in [1, MAX_REPORTED_ADDRS] {
            let back = decode::<PeerIntro>(&encode(&intro(n)).unwrap()).unwrap();
            assert_eq!(back, intro(n));
        }
        let over = encode(&intro(MAX_REPORTED_ADDRS + 1)).unwrap();
        let err = decode::<PeerIntro>(&over).unwrap_err();
        assert!(err.to_string().contains("more than 8 addresses"), "{err}");
    }

    /// 64 interfaces whose schemas take `schema` bytes each.
    fn interfaces(schema: usize) -> Vec<Interface> {
        (0..MAX_INTERFACES)
            .map(|i| Interface {
                name: format!("if{i}"),
                purpose: String::new(),
                direction: crate::manifest::Direction::Both,
                schema: "s".repeat(schema),
                json_schema: None,
                version: String::new(),
                forward: None,
            })
            .collect()
    }

    /// Every interface list the rules accept decodes wherever it travels
    /// whole: as the client's update and as a presence change naming the
    /// longest client name. The largest accepted list is found by growing
    /// the schemas; before the carrier check, a list of 64 interfaces
    /// under the byte limit (15,872 bytes) was refused by the decoder.
    #[test]
    fn every_interface_list_the_rules_accept_decodes_where_it_travels() {
        let accepted = |n| crate::manifest::validate_interfaces(&interfaces(n)).is_ok();
        assert!(accepted(0));
        let (mut ok, mut refused) = (0, 16 * 1024);
        assert!(!accepted(refused));
        while refused - ok > 1 {
            let mid = (ok + refused) / 2;
            if accepted(mid) {
                ok = mid;
            } else {
                refused = mid;
            }
        }
        let list = interfaces(ok);
        let update = ClientSession::Interfaces { list: list.clone() };
        assert_eq!(
            decode::<ClientSession>(&encode(&update).unwrap()).unwrap(),
            update
        );
        let change = PresenceEvent::Changed {
            name: ClientName::from("n".repeat(crate::name::MAX_NAME_LEN).as_str()),
            interfaces: list,
        };
        assert_eq!(
            decode::<PresenceEvent>(&encode(&change).unwrap()).unwrap(),
            change
        );
        // And the refusal says what to do.
        let e = crate::manifest::validate_interfaces(&interfaces(refused)).unwrap_err();
        assert!(e.contains("shorten schemas or purposes"), "{e}");
    }
}
