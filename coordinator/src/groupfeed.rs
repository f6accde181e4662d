//! Broadcast groups across a cluster: a coordinator with members of a
//! group asks every other member, over the member link, for the
//! broadcasts sent there (protocol.md §23).
//!
//! The asking side ([`run`], and a task per group while the group has
//! members here) opens a `LinkRequest::Join` stream on each link and fans
//! what arrives out to its own members only. The asked side ([`serve`])
//! adds a link member to its group, which gets its own members'
//! broadcasts and nothing that came over a link. So each broadcast crosses
//! each link once and is never passed on, and each member's flow control
//! holds across the hop: under policy `block` a slow member on one
//! coordinator slows the sender on another.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use qmesh_proto::codec::{length_prefix, write_frame};
use qmesh_proto::codes::StreamCode;
use qmesh_proto::envelope::GroupEvent;
use qmesh_proto::limits::{LENGTH_PREFIX, MAX_MESSAGE_CEILING};
use qmesh_proto::msg::LinkRequest;
use qmesh_proto::name::validate_channel_name;
use qmesh_proto::{GroupName, Untrusted};
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinSet;
use tracing::{debug, info_span, warn, Instrument};

use crate::broadcast::{fan_out, new_member, read_body, write_member, BodyError, MESSAGE_HEAD};
use crate::groups::{End, Group, Item};
use crate::session::{Session, Shared};

/// Until the coordinator stops, make sure that for every group with
/// members here the other members are asked for its broadcasts (nothing
/// to do off a cluster).
pub(crate) async fn run(shared: Arc<Shared>) {
    if shared.link_endpoint.is_none() {
        return;
    }
    let mut joined = shared.groups.joined.subscribe();
    loop {
        joined.borrow_and_update();
        for group in shared.groups.all() {
            if group.locals() > 0 {
                start(&shared, &group);
            }
        }
        tokio::select! {
            changed = joined.changed() => if changed.is_err() { return },
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// `group` has members here: make sure the other members are asked for
/// its broadcasts (nothing to do when a task already asks them).
fn start(shared: &Arc<Shared>, group: &Arc<Group>) {
    if group.feeding.swap(true, Ordering::AcqRel) {
        return;
    }
    let span = info_span!("group feed", group = %Untrusted::name(&group.name));
    shared
        .tasks
        .spawn(feed(shared.clone(), group.clone()).instrument(span));
}

/// Ask every linked member for `group`'s broadcasts while the group has
/// members here, again on each new link.
async fn feed(shared: Arc<Shared>, group: Arc<Group>) {
    let mut locals = group.locals.subscribe();
    let mut link_changes = shared.link_changes.subscribe();
    // The link each subscription was made on, by member id; kept after the
    // subscription ends, so that only a new link is asked again.
    let mut asked: HashMap<String, Arc<Session>> = HashMap::new();
    let mut running: JoinSet<()> = JoinSet::new();
    loop {
        if *locals.borrow_and_update() == 0 {
            // Ending the subscriptions tells the other members.
            running.abort_all();
            group.feeding.store(false, Ordering::Release);
            // A member that joined meanwhile found the flag set and left
            // the asking to this task.
            if group.locals() == 0 || group.feeding.swap(true, Ordering::AcqRel) {
                return;
            }
            asked.clear();
            running = JoinSet::new();
            continue;
        }
        link_changes.borrow_and_update();
        let links: Vec<(String, Arc<Session>)> = shared
            .links()
            .iter()
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect();
        for (member, link) in links {
            if asked.get(&member).is_some_and(|l| Arc::ptr_eq(l, &link)) {
                continue;
            }
            asked.insert(member, link.clone());
            running.spawn(subscribe(shared.clone(), group.clone(), link).in_current_span());
        }
        tokio::select! {
            _ = locals.changed() => {}
            _ = link_changes.changed() => {}
            Some(_) = running.join_next() => {}
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// One subscription: ask the member at the other end of `link` for
/// `group`'s broadcasts and give each to the members here.
async fn subscribe(shared: Arc<Shared>, group: Arc<Group>, link: Arc<Session>) {
    let Ok((mut send, mut recv)) = link.conn.open_bi().await else {
        return;
    };
    let ask = LinkRequest::Join {
        group: group.name.as_str().into(),
    };
    if write_frame(&mut send, &ask).await.is_err() {
        return;
    }
    debug!(member = ?link.member, "asked a member for the group's broadcasts");
    let max = (group.config.max_message + MESSAGE_HEAD).min(MAX_MESSAGE_CEILING);
    loop {
        let event = match read_body(&mut recv, max).await {
            Ok(Some(event)) => Bytes::from(event),
            Ok(None) | Err(BodyError::Lost) => return,
            Err(BodyError::TooLarge { len }) => {
                let _ = recv.stop(StreamCode::MessageTooLarge.varint());
                warn!(len, max, "a member sent a group event over the group's limit; no more of its broadcasts reach the members here");
                return;
            }
            Err(BodyError::Truncated) => {
                warn!("a member's group stream ended inside an event");
                return;
            }
        };
        match GroupEvent::parse(event.clone()) {
            Ok(GroupEvent::Message { .. }) => {
                let mut wire = Vec::with_capacity(LENGTH_PREFIX + event.len());
                wire.extend_from_slice(&length_prefix(event.len()));
                wire.extend_from_slice(&event);
                fan_out(&shared, &group, Bytes::from(wire), true).await;
            }
            // The link member there fell behind: the members here missed
            // these.
            Ok(GroupEvent::Missed { count }) => missed(&group, count),
            Ok(GroupEvent::Evicted { .. }) | Err(_) => {
                let _ = recv.stop(StreamCode::Malformed.varint());
                warn!("a member sent a group event a link does not carry");
                return;
            }
        }
    }
}

/// Tell every member here that `count` broadcasts were missed.
fn missed(group: &Group, count: u64) {
    for member in group.members().iter().filter(|m| m.link.is_none()) {
        let mut missed = member.missed();
        let item = Item {
            missed: *missed + count,
            event: Bytes::new(),
        };
        match member.queue.try_send(item) {
            Ok(()) => *missed = 0,
            Err(TrySendError::Full(_)) => *missed += count,
            Err(TrySendError::Closed(_)) => {}
        }
    }
}

/// The member at the other end of `link` asked for `group`'s broadcasts:
/// serve it as a link member until it stops asking.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    link: Arc<Session>,
    send: SendStream,
    mut recv: RecvStream,
    group: GroupName,
) {
    if let Err(e) = validate_channel_name(&group) {
        let _ = recv.stop(StreamCode::Malformed.varint());
        link.stream_violation(&format!("asked for group {:?}: {e}", group.as_str()));
        return;
    }
    let Some(from) = link.member.clone() else {
        return;
    };
    let (config, member, rx) =
        new_member(&shared, &group, link.name.clone().into_string(), Some(from));
    let (group, _) = shared.groups.add(&group, config, member.clone());
    debug!(group = %Untrusted::name(&group.name), "a member asked for this group's broadcasts");
    let leave = |shared: &Shared| {
        if shared.groups.remove(&group, member.id) {
            member.end(End::Left);
        }
    };
    let drain = shared.config.drain_timeout;
    tokio::join!(
        async {
            // Nothing comes this way after the ask: its end, or anything
            // more, ends the subscription.
            tokio::select! {
                _ = recv.read_to_end(0) => {}
                _ = member.ended.cancelled() => {}
                _ = shared.shutdown.cancelled() => {}
            }
            leave(&shared);
        },
        async {
            write_member(&member, rx, send, drain).await;
            leave(&shared);
        },
    );
}
