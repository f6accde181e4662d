//! Channel routing: open, ask the callee, join, forward, close.
//!
//! The opener's channel control stream is handled by [`handle_open`]: it
//! reads `Open`, finds the callee, opens a control stream to it with
//! `Incoming`, and waits for `Accept` or `Refuse`. On accept both sides are
//! registered (so data streams can be routed), both get `Ready`, and two
//! forwarders join the control streams end to end. Each forwarder delivers
//! exactly one terminal message to its destination: the source's `Close`
//! (after the source's data streams were relayed) or a `Lost` when the
//! source disappeared.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use qmesh_proto::codec::{read_frame, write_frame};
use qmesh_proto::codes::{ConnCode, OpenFailCode, StreamCode};
use qmesh_proto::limits::clip_reason;
use qmesh_proto::msg::{ChannelMsg, PathMode, PeerIntro};
use qmesh_proto::name::{validate_channel_name, validate_client_name};
use quinn::{RecvStream, SendStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::policy::Decision;
use crate::session::{ChannelSide, Session, Shared, StreamCount};
use crate::wire::{code, fail, msg_name, read_error_code};

/// Open the channel `session` asked for on its stream `(a_send, a_recv)`:
/// the rate limit first (every open counts as a message, denied or not),
/// then the open itself in the channel's span.
pub(crate) async fn handle_open(
    shared: Arc<Shared>,
    session: Arc<Session>,
    (a_send, a_recv): (SendStream, RecvStream),
    (peer, channel, path): (String, String, PathMode),
) {
    if let Err(flood) = session.limiter.pass(0, 1).await {
        session.violation(ConnCode::RateExceeded, &flood.to_string());
        return;
    }
    let label: Arc<str> = format!("{}>{}!{}", session.name, peer, channel).into();
    let span = info_span!("channel", id = %label);
    open(
        shared,
        session,
        (a_send, a_recv),
        (peer, channel, path),
        label,
    )
    .instrument(span)
    .await;
}

async fn open(
    shared: Arc<Shared>,
    session: Arc<Session>,
    (mut a_send, mut a_recv): (SendStream, RecvStream),
    (peer, channel, mut path): (String, String, PathMode),
    label: Arc<str>,
) {
    if let Err(e) = validate_client_name(&peer) {
        return fail(&mut a_send, OpenFailCode::InvalidAddress, e.to_string()).await;
    }
    if let Err(e) = validate_channel_name(&channel) {
        return fail(&mut a_send, OpenFailCode::InvalidAddress, e.to_string()).await;
    }
    if peer == session.name {
        let msg =
            format!("\"{peer}\" is this client's own name; a channel joins two different clients");
        return fail(&mut a_send, OpenFailCode::SelfChannel, msg).await;
    }
    // Access control comes before presence: a denied client learns
    // nothing about who is connected.
    match shared.policy().decide(&session.name, &peer, &channel) {
        Decision::Deny => {
            let msg = format!(
                "denied by the coordinator's policy: \"{}\" may not open channel \"{channel}\" \
                 on \"{peer}\"; ask the operator to allow it",
                session.name
            );
            info!(cause = %msg, "open denied");
            return fail(&mut a_send, OpenFailCode::Denied, msg).await;
        }
        Decision::Allow { direct: false } if path == PathMode::Direct => {
            let msg = format!(
                "denied by the coordinator's policy: channel \"{channel}\" from \"{}\" to \
                 \"{peer}\" may not go direct; open with path auto or relay",
                session.name
            );
            info!(cause = %msg, "direct open denied");
            return fail(&mut a_send, OpenFailCode::Denied, msg).await;
        }
        Decision::Allow { direct: false } => path = PathMode::Relay,
        Decision::Allow { direct: true } => {}
    }
    let found = shared.registry().lookup(&peer).cloned();
    let Some(callee) = found else {
        let msg = format!(
            "peer not present: no client named \"{peer}\" is connected to this coordinator"
        );
        return fail(&mut a_send, OpenFailCode::PeerNotPresent, msg).await;
    };
    let offered = callee.interfaces();
    let interface = offered.iter().find(|i| i.name == channel).cloned();
    if interface.is_none() && !offered.is_empty() {
        let msg = format!(
            "no such interface: \"{peer}\" does not offer \"{channel}\"; it offers: {}",
            qmesh_proto::manifest::names(&offered)
        );
        return fail(&mut a_send, OpenFailCode::NoSuchInterface, msg).await;
    }
    let max = shared.config.max_channels_per_client;
    let mut slots = Vec::with_capacity(2);
    for (side, who) in [(&session, "this client is"), (&callee, "the peer is")] {
        match Slot::take(side, max) {
            Some(slot) => slots.push(slot),
            None => {
                let msg = format!(
                    "{who} already in {max} channels, the most this coordinator allows one \
                     client; close some first"
                );
                return fail(&mut a_send, OpenFailCode::TooManyChannels, msg).await;
            }
        }
    }
    if path == PathMode::Direct {
        let unable = [&session, &callee].into_iter().find(|s| s.direct.is_none());
        if let Some(s) = unable {
            let msg = format!(
                "no direct path possible: \"{}\" cannot take direct channels (it shares its \
                 UDP socket or has them turned off); open with path auto or relay instead",
                s.name
            );
            return fail(&mut a_send, OpenFailCode::DirectUnavailable, msg).await;
        }
    }
    let answer_timeout = shared.config.answer_timeout;
    let deadline = tokio::time::Instant::now() + answer_timeout;
    let opened = tokio::time::timeout_at(deadline, async {
        let (mut send, recv) = callee.conn.open_bi().await.ok()?;
        let incoming = ChannelMsg::Incoming {
            from: session.name.clone(),
            channel: channel.clone(),
            path,
        };
        write_frame(&mut send, &incoming).await.ok()?;
        Some((send, recv))
    })
    .await;
    let (mut b_send, mut b_recv) = match opened {
        Ok(Some(s)) => s,
        Ok(None) => {
            let msg = format!("peer \"{peer}\" left before the channel could be offered");
            return fail(&mut a_send, OpenFailCode::PeerLeft, msg).await;
        }
        Err(_) => {
            let msg = format!("peer \"{peer}\" has no room for another channel; try again later");
            return fail(&mut a_send, OpenFailCode::Timeout, msg).await;
        }
    };
    debug!("offered to callee");

    // Wait for the callee's answer; the opener giving up (its stream or
    // connection ending) cancels the offer.
    let answer = tokio::select! {
        answer = tokio::time::timeout_at(deadline, read_frame::<ChannelMsg, _>(&mut b_recv)) => answer,
        _ = read_frame::<ChannelMsg, _>(&mut a_recv) => {
            debug!("opener gave up before the callee answered");
            let _ = b_send.reset(code(StreamCode::Cancelled));
            let _ = b_recv.stop(code(StreamCode::Cancelled));
            return;
        }
    };
    match answer {
        Ok(Ok(Some(ChannelMsg::Accept))) => {}
        Ok(Ok(Some(ChannelMsg::Refuse { reason }))) => {
            let _ = b_send.finish();
            let msg = format!(
                "peer \"{peer}\" refused channel \"{channel}\": {}",
                clip_reason(&reason)
            );
            return fail(&mut a_send, OpenFailCode::Refused, msg).await;
        }
        Ok(Ok(Some(other))) => {
            let what = format!("expected accept or refuse, got {}", msg_name(&other));
            callee.violation(ConnCode::UnexpectedMessage, &what);
            let msg = format!("peer \"{peer}\" broke the protocol and was disconnected");
            return fail(&mut a_send, OpenFailCode::PeerLeft, msg).await;
        }
        Ok(Ok(None)) | Ok(Err(_)) => {
            if let Ok(Err(e)) = &answer {
                if let Some(code) = read_error_code(e) {
                    callee.violation(code, &format!("bad channel answer: {e}"));
                }
            }
            let msg = format!("peer \"{peer}\" left before answering");
            return fail(&mut a_send, OpenFailCode::PeerLeft, msg).await;
        }
        Err(_) => {
            let _ = b_send.reset(code(StreamCode::Cancelled));
            let msg = format!(
                "peer \"{peer}\" did not answer within {} s",
                answer_timeout.as_secs()
            );
            return fail(&mut a_send, OpenFailCode::Timeout, msg).await;
        }
    }

    // Join: register both sides before either hears Ready, so that a data
    // stream sent right after Ready always finds its channel.
    let a_id = u64::from(a_send.id());
    let b_id = u64::from(b_send.id());
    let side_a = Arc::new(ChannelSide {
        label: label.clone(),
        peer_conn: callee.conn.clone(),
        peer_channel: b_id,
        streams: watch::Sender::new(StreamCount::default()),
    });
    let side_b = Arc::new(ChannelSide {
        label: label.clone(),
        peer_conn: session.conn.clone(),
        peer_channel: a_id,
        streams: watch::Sender::new(StreamCount::default()),
    });
    session.channels().insert(a_id, side_a.clone());
    callee.channels().insert(b_id, side_b.clone());
    shared.stats.channels_joined.fetch_add(1, Ordering::Relaxed);
    // A failed write means that side is gone; its forwarder reports it.
    let number = shared.next_channel.fetch_add(1, Ordering::Relaxed);
    let (a_intro, b_intro) = match path {
        PathMode::Relay => (None, None),
        PathMode::Auto | PathMode::Direct => introduce(&session, &callee),
    };
    let direct = a_intro.is_some();
    let ready = |peer| ChannelMsg::Ready {
        channel: number,
        peer,
        interface: interface.clone(),
    };
    let _ = write_frame(&mut a_send, &ready(a_intro)).await;
    let _ = write_frame(&mut b_send, &ready(b_intro)).await;
    info!(number, ?path, introduced = direct, "joined");

    let drain = shared.config.drain_timeout;
    let ends = Ends {
        left: AtomicU8::new(2),
        sides: [(&session, a_id), (&callee, b_id)],
        slots: std::sync::Mutex::new(slots),
    };
    tokio::join!(
        forward(&session, a_recv, &side_a, b_send, drain, &ends),
        forward(&callee, b_recv, &side_b, a_send, drain, &ends),
    );
    ends.release();
    info!("ended");
}

/// The two terminal messages of a channel. Once both are on their way, no
/// more data streams belong to it (each side's `Close` was forwarded only
/// after its relayed streams arrived), so it stops counting against either
/// client's channel limit before the last terminal reaches its client.
struct Ends<'a> {
    left: AtomicU8,
    sides: [(&'a Arc<Session>, u64); 2],
    /// The two clients' channel slots, given back on release.
    slots: std::sync::Mutex<Vec<Slot>>,
}

impl Ends<'_> {
    /// One terminal message is about to be sent.
    fn one_sent(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.release();
        }
    }

    fn release(&self) {
        for (session, id) in self.sides {
            session.channels().remove(&id);
        }
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

/// One of a client's `max_channels_per_client` places, held from the open's
/// check until the channel ends (or the open fails); taken atomically, so
/// concurrent opens cannot pass the limit.
struct Slot(Arc<Session>);

impl Slot {
    fn take(session: &Arc<Session>, max: usize) -> Option<Slot> {
        session
            .slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(session.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.slots.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Forward the control frames `from` sends to the other side until the
/// channel ends, delivering exactly one `Close` or `Lost` to `to`.
async fn forward(
    from: &Session,
    mut from_recv: RecvStream,
    from_side: &ChannelSide,
    mut to: SendStream,
    drain: std::time::Duration,
    ends: &Ends<'_>,
) {
    let mut terminal_sent = false;
    let terminal = loop {
        match read_frame::<ChannelMsg, _>(&mut from_recv).await {
            Ok(Some(ChannelMsg::Close { .. })) if terminal_sent => {
                debug!(side = %from.name, "second close ignored");
            }
            Ok(Some(ChannelMsg::Close {
                reason,
                streams,
                relayed,
            })) => {
                let reason = clip_reason(&reason);
                let mut counts = from_side.streams.subscribe();
                let drained = tokio::select! {
                    r = timeout(drain, counts.wait_for(|c| c.accepted >= relayed && c.active == 0)) => r.is_ok(),
                    _ = from.conn.closed() => break Some(lost_reason(from, None)),
                };
                if !drained {
                    warn!(
                        client = %from.name,
                        relayed,
                        "close forwarded before all of the closer's data streams were relayed"
                    );
                }
                debug!(by = %from.name, "close");
                // Streams the relay refused never reach the other side.
                let dropped = from_side.streams.borrow().dropped;
                let close = ChannelMsg::Close {
                    reason,
                    streams: streams.saturating_sub(dropped),
                    relayed: relayed.saturating_sub(dropped),
                };
                ends.one_sent();
                if write_frame(&mut to, &close).await.is_err() {
                    break None;
                }
                terminal_sent = true;
            }
            Ok(Some(other)) => {
                let what = format!("unexpected {} on a joined channel", msg_name(&other));
                from.violation(ConnCode::UnexpectedMessage, &what);
                break Some(format!(
                    "\"{}\" broke the protocol and was disconnected",
                    from.name
                ));
            }
            Ok(None) => {
                break Some(format!(
                    "\"{}\" ended the channel without closing it",
                    from.name
                ));
            }
            Err(e) => {
                if let Some(code) = read_error_code(&e) {
                    from.violation(code, &format!("bad channel frame: {e}"));
                }
                break Some(lost_reason(from, Some(&e.to_string())));
            }
        }
    };
    if let Some(reason) = terminal.filter(|_| !terminal_sent) {
        debug!(side = %from.name, cause = %reason, "lost");
        let reason = clip_reason(&reason);
        ends.one_sent();
        let _ = write_frame(&mut to, &ChannelMsg::Lost { reason }).await;
    }
    let _ = to.finish();
}

/// Introduce `a` and `b` to each other for a direct path: each learns the
/// other's certificate fingerprint (from the TLS handshake), observed
/// address and reported addresses. The client whose name sorts first
/// dials, so every channel between two clients agrees on one dialer.
/// `(None, None)` when either cannot take direct channels.
fn introduce(a: &Session, b: &Session) -> (Option<PeerIntro>, Option<PeerIntro>) {
    let (Some(a_addrs), Some(b_addrs)) = (&a.direct, &b.direct) else {
        return (None, None);
    };
    let a_dials = a.name < b.name;
    let intro = |other: &Session, addrs: &Vec<std::net::SocketAddr>, dial| PeerIntro {
        fingerprint: other.fingerprint.0,
        observed: other.conn.remote_address(),
        addrs: addrs.clone(),
        dial,
    };
    (
        Some(intro(b, b_addrs, a_dials)),
        Some(intro(a, a_addrs, !a_dials)),
    )
}

/// Why `from` is gone, for a `Lost` message.
fn lost_reason(from: &Session, stream_error: Option<&str>) -> String {
    match from.conn.close_reason() {
        Some(quinn::ConnectionError::LocallyClosed) => match from.closed_why.get() {
            Some(why) => format!(
                "\"{}\" was disconnected by the coordinator: {why}",
                from.name
            ),
            None => format!("\"{}\" was disconnected by the coordinator", from.name),
        },
        Some(e) => format!(
            "\"{}\" disconnected: {}",
            from.name,
            crate::describe_close(&e)
        ),
        None => format!(
            "\"{}\" abandoned the channel: {}",
            from.name,
            stream_error.unwrap_or("stream ended")
        ),
    }
}
