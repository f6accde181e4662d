//! Manifests and presence: what peers offer, who is online, and changes.
//!
//! ```no_run
//! # async fn demo(client: qmesh_client::Client) -> anyhow::Result<()> {
//! for peer in client.peers().await? {
//!     println!("{} offers {}", peer.name, qmesh_proto::manifest::names(&peer.interfaces));
//! }
//! let manifest = client.describe(&"mesh/bob!web".parse()?).await?;
//! println!("{manifest}");
//! let mut watch = client.watch().await?;
//! while let Some(event) = watch.next().await {
//!     println!("{event:?}");
//! }
//! # Ok(()) }
//! ```

use qmesh_proto::codec::read_frame;
use qmesh_proto::manifest::validate_interfaces;
use qmesh_proto::msg::{ClientSession, DescribeAnswer, PresenceEvent, StreamRequest};
use qmesh_proto::{Address, Interface};
use quinn::{RecvStream, SendStream};

use crate::client::Client;
use crate::error::OpenError;

/// A client online, with what it offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its name.
    pub name: String,
    /// Its interfaces (empty: it declares none).
    pub interfaces: Vec<Interface>,
}

/// A live presence subscription: joins, leaves and interface changes.
/// Dropping it ends the subscription.
#[derive(Debug)]
pub struct Watch {
    send: SendStream,
    recv: RecvStream,
}

impl Watch {
    /// The next presence event, or `None` once the subscription has ended
    /// (the session ended, or the coordinator is shutting down).
    pub async fn next(&mut self) -> Option<PresenceEvent> {
        read_frame::<PresenceEvent, _>(&mut self.recv)
            .await
            .ok()
            .flatten()
    }

    /// End the subscription.
    pub fn stop(mut self) {
        let _ = self.send.finish();
    }
}

impl Client {
    /// The manifest of interface `mesh/peer!channel`, as its offerer
    /// declared it, without opening a channel. Fails with
    /// [`OpenFailCode::NoSuchInterface`](qmesh_proto::codes::OpenFailCode::NoSuchInterface)
    /// (listing what the peer offers) or
    /// [`OpenFailCode::PeerNotPresent`](qmesh_proto::codes::OpenFailCode::PeerNotPresent).
    pub async fn describe(&self, address: &Address) -> Result<Interface, OpenError> {
        let (peer, channel) = address.mesh()?;
        let ask = StreamRequest::Describe {
            peer: peer.into(),
            channel: channel.into(),
        };
        let (mut send, mut recv) = self.request_stream(&ask).await?;
        let _ = send.finish();
        match self.next_answer(&mut recv).await? {
            DescribeAnswer::Manifest { interface } => Ok(interface),
            DescribeAnswer::Failed(failure) => Err(failure.into()),
        }
    }

    /// Who is online now, with what each offers (this client included).
    pub async fn peers(&self) -> Result<Vec<Peer>, OpenError> {
        let (mut send, mut recv) = self
            .request_stream(&StreamRequest::Watch { live: false })
            .await?;
        let _ = send.finish();
        let mut out = Vec::new();
        loop {
            match self.next_answer(&mut recv).await? {
                PresenceEvent::Present { name, interfaces } => {
                    out.push(Peer {
                        name: name.into_string(),
                        interfaces,
                    });
                }
                PresenceEvent::Synced => return Ok(out),
                other => {
                    return Err(OpenError::Protocol(format!(
                        "unexpected {} in the list of peers",
                        other.name()
                    )))
                }
            }
        }
    }

    /// Subscribe to presence: first one [`PresenceEvent::Present`] per
    /// client online and [`PresenceEvent::Synced`], then joins, leaves and
    /// interface changes as they happen.
    pub async fn watch(&self) -> Result<Watch, OpenError> {
        let (send, recv) = self
            .request_stream(&StreamRequest::Watch { live: true })
            .await?;
        Ok(Watch { send, recv })
    }

    /// Replace the interfaces this client offers. Peers see the change at
    /// once (presence reports it); channels already open are not affected.
    pub async fn set_interfaces(&self, list: Vec<Interface>) -> Result<(), OpenError> {
        validate_interfaces(&list).map_err(OpenError::Interfaces)?;
        self.remember_interfaces(&list);
        self.session_send(ClientSession::Interfaces { list })
            .await
            .map_err(OpenError::Session)
    }
}
