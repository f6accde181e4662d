//! Describe and presence: what clients offer, who is online, and changes.
//!
//! Both run on a stream of their own that the client opens; neither
//! involves the other client. `describe` answers from the manifest the
//! offerer declared; `watch` lists every client with its interfaces and,
//! when asked, goes on sending joins, leaves and interface changes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use qmesh_proto::codec::{read_frame, write_frame};
use qmesh_proto::codes::OpenFailCode;
use qmesh_proto::manifest::Interface;
use qmesh_proto::msg::{DescribeAnswer, LinkRequest, PresenceEvent};
use qmesh_proto::{ClientName, Untrusted};
use quinn::{RecvStream, SendStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, Instrument};

use crate::open::Refusal;
use crate::policy::Decision;
use crate::session::{Session, Shared};
use crate::wire::fail;

/// Answer a describe: the manifest of `channel` on `peer`, as declared;
/// asked of the member holding `peer` when another member does.
pub(crate) async fn describe(
    shared: &Arc<Shared>,
    session: &Session,
    mut send: SendStream,
    peer: &str,
    channel: &str,
) {
    // The policy hides what a client may not open, as it does for opens.
    if matches!(
        shared.policy().decide(&session.name, peer, channel),
        Decision::Deny
    ) {
        let msg = format!(
            "denied by the coordinator's policy: \"{}\" may not use channel \"{channel}\" on \
             \"{peer}\"; ask the operator to allow it",
            session.name
        );
        return fail(&mut send, DescribeAnswer::Failed, OpenFailCode::Denied, msg).await;
    }
    if shared.registry().lookup(peer).is_none() {
        match shared.route(peer) {
            Ok(Some(link)) => return describe_over(&link, send, peer, channel).await,
            Err(member) => {
                let r = Refusal::unlinked(peer, &member);
                return fail(&mut send, DescribeAnswer::Failed, r.code, r.message).await;
            }
            Ok(None) => {}
        }
    }
    describe_local(shared, send, peer, channel).await
}

/// Answer a describe of `peer` from this coordinator's own clients.
pub(crate) async fn describe_local(
    shared: &Shared,
    mut send: SendStream,
    peer: &str,
    channel: &str,
) {
    let found = shared.registry().lookup(peer).cloned();
    let Some(offerer) = found else {
        let r = Refusal::not_present(peer);
        return fail(&mut send, DescribeAnswer::Failed, r.code, r.message).await;
    };
    let offered = offerer.interfaces();
    let Some(interface) = offered.iter().find(|i| i.name == channel).cloned() else {
        let r = Refusal::no_such_interface(peer, channel, &offered);
        return fail(&mut send, DescribeAnswer::Failed, r.code, r.message).await;
    };
    if write_frame(&mut send, &DescribeAnswer::Manifest { interface })
        .await
        .is_ok()
    {
        let _ = send.finish();
    }
}

/// Ask the member at the other end of `link` for the describe, and pass
/// its answer on.
async fn describe_over(link: &Session, mut send: SendStream, peer: &str, channel: &str) {
    let asked = async {
        let (mut l_send, mut l_recv) = link.conn.open_bi().await.ok()?;
        let ask = LinkRequest::Describe {
            peer: peer.into(),
            channel: channel.into(),
        };
        write_frame(&mut l_send, &ask).await.ok()?;
        let _ = l_send.finish();
        read_frame::<DescribeAnswer, _>(&mut l_recv).await.ok()?
    };
    let answer = tokio::time::timeout(LINK_ANSWER, asked)
        .await
        .ok()
        .flatten();
    let Some(answer) = answer else {
        let msg = format!(
            "the coordinator holding \"{peer}\" did not answer the describe; try again shortly"
        );
        return fail(
            &mut send,
            DescribeAnswer::Failed,
            OpenFailCode::Timeout,
            msg,
        )
        .await;
    };
    if write_frame(&mut send, &answer).await.is_ok() {
        let _ = send.finish();
    }
}

/// Serve a client's presence watch: on a coordinator on its own, its
/// clients ([`serve_local`]); in a cluster, those of every linked member
/// as well ([`watch_cluster`]).
pub(crate) async fn watch(
    shared: &Arc<Shared>,
    session: &Session,
    send: SendStream,
    recv: RecvStream,
    live: bool,
) {
    debug!(watcher = %Untrusted::name(&session.name), live, "watching presence");
    if shared.link_endpoint.is_some() {
        watch_cluster(shared, send, recv, live).await
    } else {
        serve_local(shared, send, recv, live).await
    }
}

/// Serve a presence watch of this coordinator's own clients: those online
/// now with their interfaces, `Synced`, then (when `live`) every change
/// until either side finishes the stream. A watcher that falls more than
/// the presence buffer behind is told how many events it missed.
pub(crate) async fn serve_local(
    shared: &Shared,
    mut send: SendStream,
    mut recv: RecvStream,
    live: bool,
) {
    // Subscribe before taking the list, so no change falls in between (a
    // change may be seen twice: in the list and as an event).
    let mut changes = shared.presence.subscribe();
    let online = online(shared);
    for (name, interfaces) in online {
        let present = PresenceEvent::Present { name, interfaces };
        if write_frame(&mut send, &present).await.is_err() {
            return;
        }
    }
    if write_frame(&mut send, &PresenceEvent::Synced)
        .await
        .is_err()
    {
        return;
    }
    if !live {
        let _ = send.finish();
        return;
    }
    // The watcher sends nothing more: its finishing (or anything at all)
    // ends the watch.
    // No frame is expected: whatever arrives, decodable or not, is read as
    // the end.
    let mut ended = std::pin::pin!(read_frame::<(), _>(&mut recv));
    loop {
        let event = tokio::select! {
            _ = &mut ended => break,
            _ = shared.shutdown.cancelled() => break,
            event = changes.recv() => event,
        };
        let event = match event {
            Ok(e) => e,
            Err(RecvError::Lagged(missed)) => PresenceEvent::Lagged { missed },
            Err(RecvError::Closed) => break,
        };
        if write_frame(&mut send, &event).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

/// This coordinator's clients now, with their interfaces.
fn online(shared: &Shared) -> Vec<(ClientName, Vec<Interface>)> {
    shared
        .registry()
        .iter()
        .map(|s| (s.name.clone(), s.interfaces().to_vec()))
        .collect()
}

/// How long a linked member has to answer a describe, or to list its
/// clients before a watcher is told `Synced` without them.
const LINK_ANSWER: Duration = Duration::from_secs(5);

/// Events from the links' presence streams waiting for a watcher.
const LINK_EVENTS: usize = 64;

/// What a link's presence stream said, by the reader's number.
enum FromLink {
    Event(u64, PresenceEvent),
    Ended(u64),
}

/// Who a cluster watch has reported present: each name with its
/// interfaces and the sources that report it (`None`: this coordinator;
/// `Some(n)`: link reader `n`). A name is gone when no source has it, so a
/// client moving between members is not reported gone while it is
/// already back.
#[derive(Default)]
struct Seen(BTreeMap<ClientName, (Vec<Interface>, BTreeSet<Option<u64>>)>);

impl Seen {
    /// Apply `event` from `source`: the event to pass on, if any.
    fn apply(&mut self, source: Option<u64>, event: PresenceEvent) -> Option<PresenceEvent> {
        match event {
            PresenceEvent::Present { name, interfaces }
            | PresenceEvent::Joined { name, interfaces }
            | PresenceEvent::Changed { name, interfaces } => match self.0.get_mut(&name) {
                None => {
                    let sources = BTreeSet::from([source]);
                    self.0.insert(name.clone(), (interfaces.clone(), sources));
                    Some(PresenceEvent::Joined { name, interfaces })
                }
                Some((had, sources)) => {
                    sources.insert(source);
                    (*had != interfaces).then(|| {
                        had.clone_from(&interfaces);
                        PresenceEvent::Changed { name, interfaces }
                    })
                }
            },
            PresenceEvent::Left { name } => {
                let (_, sources) = self.0.get_mut(&name)?;
                sources.remove(&source);
                sources.is_empty().then(|| {
                    self.0.remove(&name);
                    PresenceEvent::Left { name }
                })
            }
            PresenceEvent::Lagged { missed } => Some(PresenceEvent::Lagged { missed }),
            PresenceEvent::Synced => None,
        }
    }

    /// Link reader `reader` ended: the names only it reported, as `Left`.
    fn forget(&mut self, reader: u64) -> Vec<PresenceEvent> {
        let mut gone = Vec::new();
        self.0.retain(|name, (_, sources)| {
            sources.remove(&Some(reader));
            let keep = !sources.is_empty();
            if !keep {
                gone.push(PresenceEvent::Left { name: name.clone() });
            }
            keep
        });
        gone
    }
}

/// Serve a client's presence watch in a cluster: this coordinator's
/// clients and every linked member's (each asked with
/// `LinkRequest::Watch`), listed once every link has listed its own (or
/// [`LINK_ANSWER`] has passed), then (when `live`) the changes of all, a
/// link that goes down taking its names with it and a new link adding
/// its names.
async fn watch_cluster(
    shared: &Arc<Shared>,
    mut send: SendStream,
    mut recv: RecvStream,
    live: bool,
) {
    let mut changes = shared.presence.subscribe();
    let mut link_changes = shared.link_changes.subscribe();
    let (tx, mut from_links) = mpsc::channel(LINK_EVENTS);
    let mut readers = Readers {
        tasks: JoinSet::new(),
        asked: HashMap::new(),
        next: 0,
        tx,
        live,
    };
    link_changes.borrow_and_update();
    let mut syncing = readers.ask_new(shared);
    let mut seen = Seen::default();
    let online = online(shared);
    for (name, interfaces) in online {
        seen.apply(None, PresenceEvent::Present { name, interfaces });
    }
    let deadline = tokio::time::sleep(LINK_ANSWER);
    tokio::pin!(deadline);
    while !syncing.is_empty() {
        tokio::select! {
            got = from_links.recv() => match got {
                Some(FromLink::Event(n, PresenceEvent::Synced)) | Some(FromLink::Ended(n)) => {
                    syncing.remove(&n);
                }
                Some(FromLink::Event(n, event)) => {
                    seen.apply(Some(n), event);
                }
                None => break,
            },
            _ = &mut deadline => break,
        }
    }
    for (name, (interfaces, _)) in &seen.0 {
        let present = PresenceEvent::Present {
            name: name.clone(),
            interfaces: interfaces.clone(),
        };
        if write_frame(&mut send, &present).await.is_err() {
            return;
        }
    }
    if write_frame(&mut send, &PresenceEvent::Synced)
        .await
        .is_err()
        || !live
    {
        let _ = send.finish();
        return;
    }
    let mut ended = std::pin::pin!(read_frame::<(), _>(&mut recv));
    loop {
        let out: Vec<PresenceEvent> = tokio::select! {
            _ = &mut ended => break,
            _ = shared.shutdown.cancelled() => break,
            event = changes.recv() => match event {
                Ok(e) => seen.apply(None, e).into_iter().collect(),
                Err(RecvError::Lagged(missed)) => vec![PresenceEvent::Lagged { missed }],
                Err(RecvError::Closed) => break,
            },
            got = from_links.recv() => match got {
                Some(FromLink::Event(n, event)) => seen.apply(Some(n), event).into_iter().collect(),
                Some(FromLink::Ended(n)) => seen.forget(n),
                None => break,
            },
            _ = link_changes.changed() => {
                readers.ask_new(shared);
                Vec::new()
            }
            Some(_) = readers.tasks.join_next() => Vec::new(),
        };
        for event in out {
            if write_frame(&mut send, &event).await.is_err() {
                return;
            }
        }
    }
    let _ = send.finish();
}

/// The presence streams a cluster watch has open on the links; dropping
/// it ends them.
struct Readers {
    tasks: JoinSet<()>,
    /// The link each was opened on, by member id: only a new link is
    /// asked again.
    asked: HashMap<String, Arc<Session>>,
    next: u64,
    tx: mpsc::Sender<FromLink>,
    live: bool,
}

impl Readers {
    /// Ask every link not asked yet; the numbers of the new readers.
    fn ask_new(&mut self, shared: &Shared) -> HashSet<u64> {
        let links: Vec<(String, Arc<Session>)> = shared
            .links()
            .iter()
            .filter(|(_, l)| l.conn.close_reason().is_none())
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect();
        let mut new = HashSet::new();
        for (member, link) in links {
            if self
                .asked
                .get(&member)
                .is_some_and(|l| Arc::ptr_eq(l, &link))
            {
                continue;
            }
            self.asked.insert(member, link.clone());
            let n = self.next;
            self.next += 1;
            new.insert(n);
            let tx = self.tx.clone();
            self.tasks
                .spawn(read_link(link, n, self.live, tx).in_current_span());
        }
        new
    }
}

/// Reader `n`: ask the member at the other end of `link` for its clients'
/// presence and pass each event on, then say it ended.
async fn read_link(link: Arc<Session>, n: u64, live: bool, tx: mpsc::Sender<FromLink>) {
    if let Ok((mut send, mut recv)) = link.conn.open_bi().await {
        if write_frame(&mut send, &LinkRequest::Watch { live })
            .await
            .is_ok()
        {
            while let Ok(Some(event)) = read_frame::<PresenceEvent, _>(&mut recv).await {
                if tx.send(FromLink::Event(n, event)).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(FromLink::Ended(n)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(name: &str, interface: &str) -> PresenceEvent {
        PresenceEvent::Joined {
            name: name.into(),
            interfaces: vec![Interface::new(interface, "")],
        }
    }

    fn left(name: &str) -> PresenceEvent {
        PresenceEvent::Left { name: name.into() }
    }

    #[test]
    fn a_client_moving_between_members_is_reported_gone_only_when_no_source_has_it() {
        let mut seen = Seen::default();
        assert_eq!(
            seen.apply(Some(1), joined("bob", "a")),
            Some(joined("bob", "a"))
        );
        // Back on this coordinator before its old member said it left.
        assert_eq!(seen.apply(None, joined("bob", "a")), None);
        assert_eq!(seen.apply(Some(1), left("bob")), None);
        // Its interfaces changed: a change, not a join.
        let changed = seen.apply(None, joined("bob", "b"));
        assert!(
            matches!(changed, Some(PresenceEvent::Changed { .. })),
            "{changed:?}"
        );
        assert_eq!(seen.apply(None, left("bob")), Some(left("bob")));
        assert_eq!(seen.apply(None, left("bob")), None);
    }

    #[test]
    fn a_link_that_ends_takes_only_its_own_names() {
        let mut seen = Seen::default();
        seen.apply(Some(1), joined("bob", "a"));
        seen.apply(Some(1), joined("carol", "a"));
        seen.apply(Some(2), joined("carol", "a"));
        seen.apply(None, joined("alice", "a"));
        assert_eq!(seen.forget(1), vec![left("bob")]);
        assert_eq!(seen.forget(1), vec![]);
        let names: Vec<&str> = seen.0.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["alice", "carol"]);
    }
}
