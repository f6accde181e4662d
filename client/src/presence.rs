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

use std::collections::{BTreeMap, VecDeque};

use crate::client::{Client, WeakClient};
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
///
/// It survives a reconnect: once the client has joined again, the watch
/// subscribes again and reports what changed while it was away, as
/// `Joined`, `Left` and `Changed` events against what it had reported
/// before, so a watcher that keeps the set of peers stays right.
#[derive(Debug)]
pub struct Watch {
    client: WeakClient,
    /// The connection the subscription is on.
    conn: quinn::Connection,
    send: SendStream,
    recv: RecvStream,
    /// Who this watch has reported present, with their interfaces.
    known: BTreeMap<String, Vec<Interface>>,
    /// Events worked out after a resubscription, not handed out yet.
    pending: VecDeque<PresenceEvent>,
}

impl Watch {
    /// The next presence event, or `None` once the subscription has ended
    /// (the coordinator ended it, or the client has ended).
    pub async fn next(&mut self) -> Option<PresenceEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if let Ok(Some(event)) = read_frame::<PresenceEvent, _>(&mut self.recv).await {
                track(&mut self.known, &event);
                return Some(event);
            }
            // Ended. Only the loss of the session's connection is worth a
            // new subscription; the coordinator ending this one is final.
            self.conn.close_reason()?;
            self.resubscribe().await?;
        }
    }

    /// Once the client has joined again, subscribe again and queue what
    /// changed meanwhile. `None` when the client ended instead.
    async fn resubscribe(&mut self) -> Option<()> {
        loop {
            let client = self.client.upgrade()?;
            client.wait_up().await.ok()?;
            let ask = StreamRequest::Watch { live: true };
            let (send, mut recv, conn) = match client.request_stream_on(&ask).await {
                Ok(s) => s,
                // Lost again before it could ask: wait for the next session.
                Err(OpenError::Session(_)) => continue,
                Err(_) => return None,
            };
            let mut now = BTreeMap::new();
            loop {
                match client.next_answer::<PresenceEvent>(&mut recv).await {
                    Ok(PresenceEvent::Present { name, interfaces }) => {
                        now.insert(name.into_string(), interfaces);
                    }
                    Ok(PresenceEvent::Synced) => break,
                    // Live events before the list ends break the protocol.
                    Ok(_) => return None,
                    Err(OpenError::Session(_)) => break,
                    Err(_) => return None,
                }
            }
            if conn.close_reason().is_some() {
                continue;
            }
            self.pending.extend(changes(&self.known, &now));
            self.known = now;
            self.send = send;
            self.recv = recv;
            self.conn = conn;
            return Some(());
        }
    }

    /// End the subscription.
    pub fn stop(mut self) {
        let _ = self.send.finish();
    }
}

/// Keep `known` in step with `event`.
fn track(known: &mut BTreeMap<String, Vec<Interface>>, event: &PresenceEvent) {
    match event {
        PresenceEvent::Present { name, interfaces }
        | PresenceEvent::Joined { name, interfaces }
        | PresenceEvent::Changed { name, interfaces } => {
            known.insert(name.to_string(), interfaces.clone());
        }
        PresenceEvent::Left { name } => {
            known.remove(name.as_str());
        }
        PresenceEvent::Synced | PresenceEvent::Lagged { .. } => {}
    }
}

/// The events that take a watcher from `before` to `now`: `Left` for who
/// is gone, `Joined` for who is new, `Changed` for new interfaces, in name
/// order.
fn changes(
    before: &BTreeMap<String, Vec<Interface>>,
    now: &BTreeMap<String, Vec<Interface>>,
) -> Vec<PresenceEvent> {
    let mut out = Vec::new();
    for name in before.keys().filter(|n| !now.contains_key(*n)) {
        out.push(PresenceEvent::Left {
            name: name.clone().into(),
        });
    }
    for (name, interfaces) in now {
        match before.get(name) {
            None => out.push(PresenceEvent::Joined {
                name: name.clone().into(),
                interfaces: interfaces.clone(),
            }),
            Some(old) if old != interfaces => out.push(PresenceEvent::Changed {
                name: name.clone().into(),
                interfaces: interfaces.clone(),
            }),
            Some(_) => {}
        }
    }
    out
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
        let (send, recv, conn) = self
            .request_stream_on(&StreamRequest::Watch { live: true })
            .await?;
        Ok(Watch {
            client: self.downgrade(),
            conn,
            send,
            recv,
            known: BTreeMap::new(),
            pending: VecDeque::new(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<Interface>> {
        entries
            .iter()
            .map(|(n, ifs)| {
                let list = ifs.iter().map(|i| Interface::new(*i, "x")).collect();
                (n.to_string(), list)
            })
            .collect()
    }

    #[test]
    fn a_resubscription_reports_who_left_joined_and_changed_meanwhile() {
        let before = map(&[("alice", &["chat"]), ("bob", &["web"]), ("carol", &[])]);
        let now = map(&[
            ("alice", &["chat"]),
            ("bob", &["web", "db"]),
            ("dave", &["x"]),
        ]);
        let got = changes(&before, &now);
        let names: Vec<String> = got
            .iter()
            .map(|e| match e {
                PresenceEvent::Left { name } => format!("left {name}"),
                PresenceEvent::Joined { name, .. } => format!("joined {name}"),
                PresenceEvent::Changed { name, interfaces } => {
                    format!("changed {name} {}", interfaces.len())
                }
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["left carol", "changed bob 2", "joined dave"]);
        assert!(changes(&now, &now).is_empty());
    }

    #[test]
    fn tracking_follows_joins_changes_and_leaves() {
        let mut known = BTreeMap::new();
        track(
            &mut known,
            &PresenceEvent::Joined {
                name: "bob".to_string().into(),
                interfaces: vec![Interface::new("web", "x")],
            },
        );
        track(
            &mut known,
            &PresenceEvent::Changed {
                name: "bob".to_string().into(),
                interfaces: vec![],
            },
        );
        assert_eq!(known, map(&[("bob", &[])]));
        track(
            &mut known,
            &PresenceEvent::Left {
                name: "bob".to_string().into(),
            },
        );
        assert!(known.is_empty());
    }
}
