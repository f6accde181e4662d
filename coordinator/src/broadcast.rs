//! Broadcast groups: every member's message reaches every member.
//!
//! A client joins group `G` by opening a stream with
//! `StreamRequest::Join`. After `JoinAnswer::Joined`, the member's side of the stream carries broadcast
//! bodies (length-prefixed data messages) and the coordinator's side
//! carries `GroupEvent`s.
//!
//! Each member has two tasks, joined in [`serve`]:
//!
//! - a **reader**, which reads the member's bodies (the length checked
//!   against the group's `max_message` before anything is allocated),
//!   stamps them with the member's session name and fans them out to every
//!   member, the sender included;
//! - a **writer**, which drains the member's queue (at most
//!   [`GroupConfig::buffer`] events) onto its stream.
//!
//! When a member's queue is full its group's [`GroupPolicy`] decides:
//! `Block` waits for room (so the sender's reader stops reading and QUIC
//! flow control slows the sender), `Lag` drops the message for that member
//! and counts it (the count is sent as `Missed` before the next event it
//! gets, or as soon as its queue runs empty), `Evict` removes the member:
//! its writer sends `Evicted` and finishes the stream, its reader stops.
//!
//! In a cluster the fan-out also reaches link members, which carry the
//! broadcast to the other coordinators' members (`crate::groupfeed`). A
//! link member is never evicted: under `evict` it lags instead, and the
//! count reaches the members on its side as `Missed`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use qmesh_proto::codec::{check_length, length_prefix, write_frame};
use qmesh_proto::codes::{OpenFailCode, StreamCode};
use qmesh_proto::envelope::GroupEvent;
use qmesh_proto::limits::{clip_reason, LENGTH_PREFIX, MAX_MESSAGE_CEILING};
use qmesh_proto::msg::{GroupPolicy, JoinAnswer, MembersAnswer};
use qmesh_proto::name::validate_channel_name;
use qmesh_proto::{GroupName, Untrusted};
use quinn::{ReadExactError, RecvStream, SendStream};
use tokio::sync::mpsc::{self, error::TryRecvError, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::config::GroupConfig;
use crate::groups::{End, Group, Item, Member};
use crate::session::{Session, Shared};
use crate::wire::fail;

/// Most bytes a `GroupEvent::Message` puts in front of the body: kind,
/// name length, and a name of at most 255 bytes.
pub(crate) const MESSAGE_HEAD: usize = 2 + u8::MAX as usize;

/// Serve a member's group stream: join, relay, leave.
pub(crate) async fn join(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    mut send: SendStream,
    recv: RecvStream,
    group: GroupName,
) {
    if let Err(e) = validate_channel_name(&group) {
        let msg = format!("cannot join group {:?}: {e}", group.as_str());
        return fail(
            &mut send,
            JoinAnswer::Failed,
            OpenFailCode::InvalidAddress,
            msg,
        )
        .await;
    }
    // A join counts as a message against the rate limit, as an open does.
    if let Err(flood) = session.limiter.pass(0, 1).await {
        session.flooded(&shared.stats, &flood);
        return;
    }
    let span = info_span!("group", group = %Untrusted::name(&group), member = %Untrusted::name(&session.name));
    serve(shared, session, send, recv, group.into_string())
        .instrument(span)
        .await;
}

/// A new member of group `group` named `name` (`link`: the member id,
/// for a link member), the group's configuration as this coordinator
/// applies it, and the member's queue to write from.
pub(crate) fn new_member(
    shared: &Shared,
    group: &str,
    name: String,
    link: Option<String>,
) -> (GroupConfig, Arc<Member>, mpsc::Receiver<Item>) {
    let mut config = shared.group_config(group);
    config.buffer = config.buffer.max(1);
    config.max_message = config.max_message.min(MAX_MESSAGE_CEILING - MESSAGE_HEAD);
    let (tx, rx) = mpsc::channel(config.buffer);
    let member = Arc::new(Member {
        id: shared.groups.next_member.fetch_add(1, Ordering::Relaxed),
        name,
        link,
        queue: tx,
        missed: Mutex::new(0),
        end: Mutex::new(None),
        ended: CancellationToken::new(),
    });
    (config, member, rx)
}

async fn serve(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    mut send: SendStream,
    recv: RecvStream,
    name: String,
) {
    let (config, member, rx) = new_member(shared, &name, session.name.clone().into_string(), None);
    // The group keeps the configuration it was made with while it has
    // members.
    let (group, members) = shared.groups.add(&name, config, member.clone());
    let config = group.config;
    let joined = JoinAnswer::Joined {
        members,
        policy: config.policy,
        max_message: config.max_message as u64,
    };
    if write_frame(&mut send, &joined).await.is_err() {
        shared.groups.remove(&group, member.id);
        return;
    }
    info!(members, policy = %config.policy, "joined");
    let drain = shared.config.drain_timeout;
    tokio::join!(read_member(shared, session, &group, &member, recv), async {
        write_member(&member, rx, send, drain).await;
        // The member's side can take no more (it stopped reading it, or
        // its connection ended): it is out of the group.
        if shared.groups.remove(&group, member.id) {
            member.end(End::Left);
        }
    },);
    match member.how_ended() {
        Some(End::Evicted(_)) => info!("evicted"),
        _ => info!("left"),
    }
}

/// Read the member's broadcasts and fan each out, until it leaves, is
/// evicted, or breaks the rules.
async fn read_member(
    shared: &Shared,
    session: &Session,
    group: &Arc<Group>,
    member: &Arc<Member>,
    mut recv: RecvStream,
) {
    let max = group.config.max_message;
    let stop = |recv: &mut RecvStream, c: StreamCode| {
        let _ = recv.stop(c.varint());
    };
    loop {
        let body = tokio::select! {
            biased;
            _ = member.ended.cancelled() => {
                // Evicted (or its side of the stream failed): the member
                // may send no more.
                let c = match member.how_ended() {
                    Some(End::Evicted(_)) => StreamCode::Evicted,
                    _ => StreamCode::PeerLost,
                };
                stop(&mut recv, c);
                break;
            }
            _ = shared.shutdown.cancelled() => break,
            body = read_body(&mut recv, max) => body,
        };
        let body = match body {
            Ok(Some(body)) => body,
            Ok(None) => {
                debug!("member finished its side");
                break;
            }
            Err(BodyError::TooLarge { len }) => {
                stop(&mut recv, StreamCode::MessageTooLarge);
                session.stream_violation(&format!(
                    "a broadcast of {len} bytes, over the group's limit of {max}"
                ));
                break;
            }
            Err(BodyError::Truncated) => {
                session.stream_violation("a group stream that ended inside a broadcast");
                break;
            }
            Err(BodyError::Lost) => break,
        };
        if let Err(flood) = session.limiter.pass(body.len() as u64, 1).await {
            session.flooded(&shared.stats, &flood);
            break;
        }
        let event = GroupEvent::Message {
            from: session.name.clone().into_string(),
            body: Bytes::new(),
        };
        let head = event.head();
        let mut wire = Vec::with_capacity(LENGTH_PREFIX + head.len() + body.len());
        wire.extend_from_slice(&length_prefix(head.len() + body.len()));
        wire.extend_from_slice(&head);
        wire.extend_from_slice(&body);
        fan_out(shared, group, Bytes::from(wire), false).await;
    }
    if shared.groups.remove(group, member.id) {
        member.end(End::Left);
    }
}

pub(crate) enum BodyError {
    TooLarge { len: usize },
    Truncated,
    Lost,
}

/// The next broadcast body, `None` at a clean end of the member's side. The
/// declared length is checked against `max` before anything is allocated.
pub(crate) async fn read_body(
    recv: &mut RecvStream,
    max: usize,
) -> Result<Option<Vec<u8>>, BodyError> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(_)) => return Err(BodyError::Truncated),
        Err(ReadExactError::ReadError(_)) => return Err(BodyError::Lost),
    }
    let len = check_length(prefix, max).map_err(|_| BodyError::TooLarge {
        len: u32::from_be_bytes(prefix) as usize,
    })?;
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => Ok(Some(body)),
        Err(ReadExactError::FinishedEarly(_)) => Err(BodyError::Truncated),
        Err(ReadExactError::ReadError(_)) => Err(BodyError::Lost),
    }
}

/// Give `event` to every member of `group`, following the group's policy
/// for members whose queue is full; an event that came over a link
/// (`from_link`) goes to this coordinator's members only.
pub(crate) async fn fan_out(shared: &Shared, group: &Group, event: Bytes, from_link: bool) {
    let members = group.members();
    for member in members.iter() {
        if from_link && member.link.is_some() {
            continue;
        }
        let policy = match group.config.policy {
            GroupPolicy::Evict if member.link.is_some() => GroupPolicy::Lag,
            policy => policy,
        };
        match policy {
            GroupPolicy::Block => {
                let item = Item {
                    missed: 0,
                    event: event.clone(),
                };
                // An error means the member is gone: nothing to wait for.
                tokio::select! {
                    _ = member.queue.send(item) => {}
                    _ = member.ended.cancelled() => {}
                    _ = shared.shutdown.cancelled() => return,
                }
            }
            GroupPolicy::Lag => {
                let mut missed = member.missed();
                let item = Item {
                    missed: *missed,
                    event: event.clone(),
                };
                match member.queue.try_send(item) {
                    Ok(()) => *missed = 0,
                    Err(TrySendError::Full(_)) => *missed += 1,
                    Err(TrySendError::Closed(_)) => {}
                }
            }
            GroupPolicy::Evict => {
                let item = Item {
                    missed: 0,
                    event: event.clone(),
                };
                if let Err(TrySendError::Full(_)) = member.queue.try_send(item) {
                    evict(shared, group, member);
                }
            }
        }
    }
}

fn evict(shared: &Shared, group: &Group, member: &Member) {
    if !shared.groups.remove(group, member.id) {
        return;
    }
    let reason = format!(
        "evicted from group \"{}\": fell {} messages behind (policy evict); rejoin to continue",
        group.name, group.config.buffer
    );
    warn!(group = %Untrusted::name(&group.name), member = %Untrusted::name(&member.name), behind = group.config.buffer, "evicting a slow member");
    member.end(End::Evicted(reason));
}

/// Write the member's queue to its stream until it leaves or is evicted.
pub(crate) async fn write_member(
    member: &Member,
    mut queue: mpsc::Receiver<Item>,
    mut send: SendStream,
    drain: Duration,
) {
    loop {
        // A count of missed broadcasts goes out when the queue runs empty
        // too, so a member that caught up learns of the last ones.
        let next = {
            let mut missed = member.missed();
            match queue.try_recv() {
                Ok(item) => Some(item),
                Err(TryRecvError::Empty) if *missed > 0 => Some(Item {
                    missed: std::mem::take(&mut *missed),
                    event: Bytes::new(),
                }),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => break,
            }
        };
        let item = match next {
            Some(item) => item,
            None => tokio::select! {
                biased;
                _ = member.ended.cancelled() => break,
                item = queue.recv() => match item {
                    Some(item) => item,
                    None => break,
                },
            },
        };
        if member.ended.is_cancelled() {
            break;
        }
        if item.missed > 0 {
            let missed = GroupEvent::Missed { count: item.missed }.to_bytes();
            let mut wire = Vec::with_capacity(LENGTH_PREFIX + missed.len());
            wire.extend_from_slice(&length_prefix(missed.len()));
            wire.extend_from_slice(&missed);
            if !write(member, &mut send, Bytes::from(wire), drain).await {
                return;
            }
        }
        if !item.event.is_empty() && !write(member, &mut send, item.event, drain).await {
            return;
        }
    }
    // No more fan-out waits on this member.
    drop(queue);
    if let Some(End::Evicted(reason)) = member.how_ended() {
        let evicted = GroupEvent::Evicted {
            reason: clip_reason(&reason),
        }
        .to_bytes();
        let mut wire = Vec::with_capacity(LENGTH_PREFIX + evicted.len());
        wire.extend_from_slice(&length_prefix(evicted.len()));
        wire.extend_from_slice(&evicted);
        match tokio::time::timeout(drain, send.write_chunk(Bytes::from(wire))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                debug!("evicted member read nothing in time; resetting its stream");
                let _ = send.reset(StreamCode::Evicted.varint());
                return;
            }
        }
    }
    let _ = send.finish();
}

/// Write one whole event. Once the member has ended, a write that cannot
/// complete within `drain` resets the stream. Whether the stream is still
/// usable.
async fn write(member: &Member, send: &mut SendStream, event: Bytes, drain: Duration) -> bool {
    let stalled = async {
        member.ended.cancelled().await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        r = send.write_chunk(event) => r.is_ok(),
        _ = stalled => {
            debug!("member ended and read nothing in time; resetting its stream");
            let code = match member.how_ended() {
                Some(End::Evicted(_)) => StreamCode::Evicted,
                _ => StreamCode::Cancelled,
            };
            let _ = send.reset(code.varint());
            false
        }
    }
}

/// Answer a member count query.
pub(crate) async fn members(shared: &Arc<Shared>, mut send: SendStream, group: GroupName) {
    if let Err(e) = validate_channel_name(&group) {
        let msg = format!("cannot count group {:?}: {e}", group.as_str());
        return fail(
            &mut send,
            MembersAnswer::Failed,
            OpenFailCode::InvalidAddress,
            msg,
        )
        .await;
    }
    let members = shared.groups.count(&group);
    debug!(group = %Untrusted::name(&group), members, "member count");
    if write_frame(&mut send, &MembersAnswer::Count { group, members })
        .await
        .is_ok()
    {
        let _ = send.finish();
    }
}
