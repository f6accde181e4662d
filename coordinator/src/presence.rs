//! Describe and presence: what clients offer, who is online, and changes.
//!
//! Both run on a stream of their own that the client opens; neither
//! involves the other client. `describe` answers from the manifest the
//! offerer declared; `watch` lists every client with its interfaces and,
//! when asked, goes on sending joins, leaves and interface changes.

use std::sync::Arc;

use qmesh_proto::codec::{read_frame, write_frame};
use qmesh_proto::codes::OpenFailCode;
use qmesh_proto::msg::{DescribeAnswer, PresenceEvent};
use qmesh_proto::{ClientName, Untrusted};
use quinn::{RecvStream, SendStream};
use tokio::sync::broadcast::error::RecvError;
use tracing::debug;

use crate::open::Refusal;
use crate::policy::Decision;
use crate::session::{Session, Shared};
use crate::wire::fail;

/// Answer a describe: the manifest of `channel` on `peer`, as declared.
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

/// Serve a presence watch: the clients online now with their interfaces,
/// `Synced`, then (when `live`) every change until either side finishes
/// the stream. A watcher that falls more than the presence buffer behind
/// is told how many events it missed.
pub(crate) async fn watch(
    shared: &Arc<Shared>,
    session: &Session,
    mut send: SendStream,
    mut recv: RecvStream,
    live: bool,
) {
    // Subscribe before taking the list, so no change falls in between (a
    // change may be seen twice: in the list and as an event).
    let mut changes = shared.presence.subscribe();
    let online: Vec<(ClientName, Vec<_>)> = shared
        .registry()
        .iter()
        .map(|s| (s.name.clone(), s.interfaces().to_vec()))
        .collect();
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
    debug!(watcher = %Untrusted::name(&session.name), "watching presence");
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
