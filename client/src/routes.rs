//! The routing table: where the streams the coordinator (or a direct
//! peer) opens towards this client are delivered, by channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use qmesh_certs::transport::StreamGuard;
use qmesh_proto::msg::Close;
use qmesh_proto::StreamId;
use quinn::RecvStream;
use tokio::sync::mpsc;

use crate::pipe::Pipe;
use crate::state::Life;

/// Where a channel's incoming data streams are delivered.
pub(crate) type StreamTx = mpsc::Sender<(RecvStream, StreamGuard)>;

/// Where a channel's incoming pipes are delivered.
pub(crate) type PipeTx = mpsc::Sender<Pipe>;

/// Where a channel's incoming streams go: data streams to
/// [`crate::Channel::accept_stream`], the peer's message streams to its
/// readers, pipes to [`crate::Channel::accept_pipe`].
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) data: StreamTx,
    pub(crate) messages: StreamTx,
    pub(crate) pipes: PipeTx,
    /// The channel's life, to count the data streams that arrive.
    pub(crate) life: Arc<Life>,
    /// What the peer says about a channel held on the direct connection
    /// (protocol.md §8.9). A few at most per channel; more are dropped.
    pub(crate) held: mpsc::Sender<Held>,
}

/// A message about a held channel, from the peer on the direct connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Held {
    /// The peer holds the channel on the direct connection.
    Hold,
    /// The peer's close, for a held channel.
    Close(Close),
}

impl Route {
    /// Hand an incoming stream to its channel; the stream back when the
    /// channel is gone.
    pub(crate) async fn deliver(
        &self,
        messages: bool,
        stream: (RecvStream, StreamGuard),
    ) -> Result<(), RecvStream> {
        let tx = if messages { &self.messages } else { &self.data };
        tx.send(stream).await.map_err(|e| (e.0).0)?;
        if !messages {
            // Message streams are counted by their reader.
            self.life.update(|s| s.data_arrived());
        }
        Ok(())
    }

    /// Hand an incoming pipe to its channel; the pipe back when the channel
    /// is gone. A full queue waits: the peer's stream limit bounds it.
    pub(crate) async fn deliver_pipe(&self, pipe: Pipe) -> Result<(), Pipe> {
        self.pipes.send(pipe).await.map_err(|e| e.0)
    }

    /// Hand the peer's word about a held channel to it. A full queue (a
    /// peer repeating itself) drops the message: the channel needs one
    /// hold and one close.
    pub(crate) fn deliver_held(&self, held: Held) -> bool {
        self.held.try_send(held).is_ok()
    }
}

/// Where incoming relayed streams go, by channel control stream id.
pub(crate) type Routes = Arc<Mutex<HashMap<StreamId, Route>>>;
