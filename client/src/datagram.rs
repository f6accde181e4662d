//! QUIC datagrams of direct pipes (protocol.md §20.4).
//!
//! A pipe on a direct connection can carry datagrams beside its stream:
//! each QUIC DATAGRAM frame starts with the pipe's stream id. One
//! [`Flows`] per direct endpoint reads them ([`Flows::dispatch`], from
//! `Direct::serve`) and hands each to the [`Port`] its pipe registered. A
//! datagram for no port is dropped; one for a port whose queue is full is
//! dropped and counted on that port, as UDP would lose it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use qmesh_proto::datagram::{flow_datagram, flow_prefix, split_flow};
use quinn::Connection;
use tokio::sync::mpsc;
use tracing::debug;

use crate::sync::lock;

/// Datagrams waiting for one port's reader; more are dropped.
const PORT_QUEUE: usize = 256;

/// A port as the dispatcher sees it.
#[derive(Debug)]
struct Slot {
    tx: mpsc::Sender<Bytes>,
    dropped: AtomicU64,
}

/// The ports of every direct connection of one endpoint, by connection and
/// stream id.
#[derive(Debug, Default)]
pub(crate) struct Flows {
    ports: Mutex<HashMap<(usize, u64), Arc<Slot>>>,
}

impl Flows {
    /// Hand one datagram read from `conn` to its port.
    pub(crate) fn dispatch(&self, conn: &Connection, datagram: Bytes) {
        let Some((stream, payload)) = split_flow(datagram) else {
            debug!("dropping a datagram without a stream id");
            return;
        };
        let slot = lock(&self.ports).get(&(conn.stable_id(), stream)).cloned();
        match slot {
            Some(slot) => {
                if slot.tx.try_send(payload).is_err() {
                    slot.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => debug!(stream, "dropping a datagram for no pipe"),
        }
    }

    /// Register the pipe on `stream` of `conn` for datagrams.
    pub(crate) fn port(self: &Arc<Self>, conn: Connection, stream: u64) -> Option<Port> {
        let prefix = flow_prefix(stream)?;
        let (tx, rx) = mpsc::channel(PORT_QUEUE);
        let slot = Arc::new(Slot {
            tx,
            dropped: AtomicU64::new(0),
        });
        let key = (conn.stable_id(), stream);
        lock(&self.ports).insert(key, slot.clone());
        Some(Port {
            conn,
            prefix,
            rx,
            slot,
            key,
            flows: self.clone(),
        })
    }
}

/// What became of a datagram handed to [`Port::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// It left as a QUIC datagram.
    Datagram,
    /// It does not fit in a QUIC datagram on this connection now (or the
    /// peer takes none); send it on the pipe's stream instead.
    TooLarge,
    /// The connection is gone.
    Closed,
}

/// One pipe's datagrams: sending them, and those its peer sent.
/// Unregisters itself when dropped.
#[derive(Debug)]
pub(crate) struct Port {
    conn: Connection,
    prefix: Bytes,
    rx: mpsc::Receiver<Bytes>,
    slot: Arc<Slot>,
    key: (usize, u64),
    flows: Arc<Flows>,
}

impl Port {
    /// Send `payload` as one QUIC datagram when it fits, waiting while
    /// the connection's datagram send buffer is full.
    pub(crate) async fn send(&self, payload: &[u8]) -> Sent {
        let fits = self
            .conn
            .max_datagram_size()
            .is_some_and(|max| self.prefix.len() + payload.len() <= max);
        if !fits {
            return Sent::TooLarge;
        }
        let datagram = flow_datagram(&self.prefix, payload);
        match self.conn.send_datagram_wait(datagram).await {
            Ok(()) => Sent::Datagram,
            // The path's datagram size shrank between the check and the
            // send (an MTU change), or the peer took datagrams back.
            Err(quinn::SendDatagramError::TooLarge)
            | Err(quinn::SendDatagramError::UnsupportedByPeer)
            | Err(quinn::SendDatagramError::Disabled) => Sent::TooLarge,
            Err(quinn::SendDatagramError::ConnectionLost(_)) => Sent::Closed,
        }
    }

    /// The next datagram the peer sent on this pipe.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    /// Datagrams for this pipe dropped because its queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.slot.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        let mut ports = lock(&self.flows.ports);
        if ports
            .get(&self.key)
            .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
        {
            ports.remove(&self.key);
        }
    }
}
