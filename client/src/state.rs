//! A channel's life: what has happened to it so far.

use crate::end::ChannelEnd;

/// What a channel's tasks have seen: its end, the peer's close, and the
/// streams that arrived.
#[derive(Debug, Clone, Default)]
pub(crate) struct State {
    /// How the channel ended, once it has.
    pub(crate) end: Option<ChannelEnd>,
    /// The peer's close arrived, with the number of streams it sent.
    pub(crate) peer_close: Option<u64>,
    /// The control stream is over (lost, or closed both ways).
    pub(crate) done: bool,
    /// The peer's message streams that arrived.
    pub(crate) msg_streams: u64,
    /// The peer's data streams that arrived (accepted or not).
    pub(crate) data_arrived: u64,
    /// Of those, the ones still being read.
    pub(crate) msg_readers: u64,
}
