//! qmesh-proto: the types every qmesh component shares, and nothing that
//! touches a socket.
//!
//! qmesh is a QUIC mesh: one coordinator, many named clients, and named
//! channels between them. This crate holds what goes over the wire and how
//! it is encoded, so that the coordinator, the client library and the tests
//! agree on one definition.
//!
//! # Layout
//!
//! - [`address`]: connpipe addresses (`mesh/bob!chat`, `quic/$4:7447`, …),
//!   parsing, canonical display, conversion to and from named values.
//! - [`name`]: client and channel name rules.
//! - [`msg`]: control messages, one type per stream and direction, and data
//!   stream headers.
//! - [`ids`]: session, channel and stream numbers and client, channel and
//!   group names as their own types.
//! - [`codec`]: the one module that turns messages into bytes and back, with
//!   length-prefixed frames and size limits.
//! - [`codes`]: typed connection and stream close codes and rejection codes.
//! - `datagram` (feature `quic`): how a direct pipe's UDP datagrams travel
//!   as QUIC datagrams.
//! - [`limits`]: protocol constants: ALPN, version, frame and message limits.
//! - [`manifest`]: interfaces a client offers and their manifests.
//! - [`heartbeat`]: pings on the session stream, and when silence means lost.
//! - [`envelope`]: one-way messages, requests and replies on a channel.
//! - [`untrusted`]: text from peers (names, reasons) made safe for a log
//!   line: escaped and clipped.
//! - `logging` (feature `logging`): the connpipe log line format, installed
//!   by the binaries.

#![warn(missing_docs)]

pub mod address;
pub mod codec;
pub mod codes;
#[cfg(feature = "quic")]
pub mod datagram;
pub mod envelope;
pub mod heartbeat;
pub mod ids;
pub mod limits;
#[cfg(feature = "logging")]
pub mod logging;
pub mod manifest;
pub mod msg;
pub mod name;
pub mod untrusted;

pub use address::{Address, AddressError};
pub use codec::DecodeError;
pub use ids::{ChannelId, ChannelName, ClientName, GroupName, SessionId, StreamId};
pub use limits::{ALPN, DIRECT_ALPN, LINK_ALPN, PROTOCOL_VERSION};
pub use manifest::{Direction, ForwardKind, Interface};
pub use untrusted::Untrusted;
