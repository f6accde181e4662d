//! Pipes: bidirectional byte streams on a channel.
//!
//! A pipe is one QUIC bidirectional stream each way of the channel's path:
//! through the coordinator (which copies it to a bidirectional stream it
//! opens to the peer) or on the direct connection. Either side may open
//! pipes ([`crate::Channel::open_pipe`]); the other takes them with
//! [`crate::Channel::accept_pipe`]. The bytes on a pipe are the
//! application's own: forwarding (`qmesh expose` and `qmesh forward`)
//! carries one TCP or Unix connection, or one UDP flow, on each.
//!
//! Finishing one direction keeps the other open (a TCP half-close); a
//! reset or stop passes through to the other side with its code. Pipes are
//! not counted in a channel's close: each lives until both its directions
//! end, or its connection does.

use std::sync::Arc;

use qmesh_certs::transport::StreamGuard;
use quinn::{Connection, RecvStream, SendStream};

use crate::datagram::{Flows, Port};
use crate::end::Path;

/// A bidirectional byte stream on a channel.
#[derive(Debug)]
pub struct Pipe {
    send: SendStream,
    recv: RecvStream,
    path: Path,
    /// On a direct connection: the connection and its datagram ports.
    datagrams: Option<(Connection, Arc<Flows>)>,
    /// Counts a peer-opened pipe against this client's stream allowance.
    _guard: Option<StreamGuard>,
}

impl Pipe {
    pub(crate) fn new(
        send: SendStream,
        recv: RecvStream,
        path: Path,
        datagrams: Option<(Connection, Arc<Flows>)>,
        guard: Option<StreamGuard>,
    ) -> Self {
        Self {
            send,
            recv,
            path,
            datagrams,
            _guard: guard,
        }
    }

    /// The path the pipe took when it was opened; it keeps it to its end.
    pub fn path(&self) -> Path {
        self.path
    }

    /// This pipe's QUIC datagrams (§20.4), on a direct connection; `None`
    /// on a relayed pipe. Datagrams the peer sends on this pipe before the
    /// port exists are dropped.
    pub(crate) fn datagram_port(&self) -> Option<Port> {
        let (conn, flows) = self.datagrams.as_ref()?;
        flows.port(conn.clone(), self.send.id().into())
    }

    /// The two halves: what this side writes, and what it reads.
    pub fn halves(&mut self) -> (&mut SendStream, &mut RecvStream) {
        (&mut self.send, &mut self.recv)
    }
}
