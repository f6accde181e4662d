//! Channel routing: open, ask the callee, join, forward, close.
//!
//! The opener's channel control stream is handled by [`handle_open`]: with
//! the `Open` it was given, it finds the callee, opens a control stream to
//! it with `Incoming`, and waits for `Accept` or `Refuse`. On accept both
//! sides are registered (so data streams can be routed), both get `Ready`
//! (the opener in an `OpenAnswer`), and two forwarders join the control
//! streams end to end. Each forwarder delivers exactly one `Ending` to its
//! destination: the source's `Close` (after the source's data streams were
//! relayed) or `Lost` when the source disappeared.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use qmesh_proto::codec::{read_frame, write_frame};
use qmesh_proto::codes::{ConnCode, OpenFailCode, StreamCode};
use qmesh_proto::limits::clip_reason;
use std::net::SocketAddr;

use qmesh_proto::codec::Read;
use qmesh_proto::msg::{Arrival, Close, Ending, LinkOpen, LinkRequest, Open, OpenAnswer, Ready};
use qmesh_proto::{ChannelId, ClientName, SessionId, StreamId, Untrusted};
use quinn::{RecvStream, SendStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::open::{
    decide, introduce, judge_answer, Answer, Callee, CalleeStream, OpenPlan, Party, Reachable,
    Refusal, Request, CALLEE, OPENER,
};
use crate::session::{ChannelRecord, ChannelSide, Session, Shared, StreamCount};
use crate::wire::fail;
use qmesh_proto::codec::read_within;

/// Open the channel `session` asked for on its stream `(a_send, a_recv)`:
/// the rate limit first (every open counts as a message, denied or not),
/// then the open itself in the channel's span.
pub(crate) async fn handle_open(
    shared: Arc<Shared>,
    session: Arc<Session>,
    (a_send, a_recv): (SendStream, RecvStream),
    open_request: Open,
) {
    if let Err(flood) = session.limiter.pass(0, 1).await {
        session.flooded(&shared.stats, &flood);
        return;
    }
    // The label names the channel's span in every log line of it; the
    // peer and channel are not checked yet.
    let label: Arc<str> = format!(
        "{}>{}!{}",
        Untrusted::name(&session.name),
        Untrusted::name(&open_request.peer),
        Untrusted::name(&open_request.channel)
    )
    .into();
    let span = info_span!("channel", id = %label);
    open(
        shared,
        Opener::here(&session),
        (a_send, a_recv),
        open_request,
        label,
    )
    .instrument(span)
    .await;
}

/// Open, for the member `link` stands for, the channel one of its clients
/// asked for (`LinkRequest::Open`): the open runs here as if that client
/// were connected here, with the link's stream as its control stream.
pub(crate) async fn handle_link_open(
    shared: Arc<Shared>,
    link: Arc<Session>,
    streams: (SendStream, RecvStream),
    offer: LinkOpen,
) {
    let label: Arc<str> = format!(
        "{}>{}!{}",
        Untrusted::name(&offer.opener),
        Untrusted::name(&offer.open.peer),
        Untrusted::name(&offer.open.channel)
    )
    .into();
    let span = info_span!("channel", id = %label, via = %Untrusted::name(&link.name));
    let opener = Opener {
        session: &link,
        name: offer.opener,
        fingerprint: offer.fingerprint,
        observed: offer.observed,
        direct: offer.direct,
        id: offer.session,
    };
    open(shared, opener, streams, offer.open, label)
        .instrument(span)
        .await;
}

/// The side that asked for a channel: a client of this coordinator, or a
/// client of another member, whose open came over that member's link.
struct Opener<'a> {
    /// Its session here: the client's own, or the link's.
    session: &'a Arc<Session>,
    name: ClientName,
    fingerprint: [u8; 32],
    /// Its address as its own coordinator sees it.
    observed: SocketAddr,
    direct: Option<Vec<SocketAddr>>,
    /// Its session at its own coordinator.
    id: SessionId,
}

impl<'a> Opener<'a> {
    fn here(session: &'a Arc<Session>) -> Self {
        Opener {
            session,
            name: session.name.clone(),
            fingerprint: session.fingerprint.0,
            observed: session.conn.remote_address(),
            direct: session.direct.clone(),
            id: SessionId(session.id),
        }
    }

    fn via_link(&self) -> bool {
        self.session.member.is_some()
    }

    fn party(&self) -> Party<'_> {
        Party {
            name: &self.name,
            direct: self.direct.as_deref(),
            // A client of another member counts its channels there.
            channels: if self.via_link() {
                0
            } else {
                self.session.slots.load(Ordering::Acquire)
            },
        }
    }

    fn reachable(&self) -> Reachable<'_> {
        Reachable {
            name: &self.name,
            fingerprint: self.fingerprint,
            observed: self.observed,
            direct: self.direct.as_deref(),
            session: self.id,
        }
    }
}

/// Where the callee is: here, or on the member whose link stands for it.
enum Target {
    Here(Arc<Session>),
    Member(Arc<Session>),
}

/// An offer the callee (or its member) accepted: the callee's side of the
/// control stream, and the `Ready` each side is told.
struct Accepted {
    send: SendStream,
    recv: RecvStream,
    number: ChannelId,
    opener_ready: Ready,
    /// `None` when the callee's member tells the callee itself.
    callee_ready: Option<Ready>,
}

async fn open(
    shared: Arc<Shared>,
    opener: Opener<'_>,
    (mut a_send, mut a_recv): (SendStream, RecvStream),
    Open {
        peer,
        channel,
        path,
    }: Open,
    label: Arc<str>,
) {
    let session = opener.session;
    let max = shared.config.max_channels_per_client;
    if shared.draining.is_cancelled() {
        return refuse(&mut a_send, Refusal::draining()).await;
    }
    let here = shared.registry().lookup(&peer).cloned();
    // An open that came over a link is never passed on again: its member
    // found the callee here.
    let mut unlinked = None;
    let target = match here {
        Some(callee) => Some(Target::Here(callee)),
        None if !opener.via_link() => match shared.route(&peer) {
            Ok(link) => link.map(Target::Member),
            Err(member) => {
                unlinked = Some(member);
                None
            }
        },
        None => None,
    };
    let interfaces = match &target {
        Some(Target::Here(c)) => Some(c.interfaces()),
        _ => None,
    };
    let request = Request {
        peer: &peer,
        channel: &channel,
        path,
    };
    // A callee on another member is decided there (presence, interfaces,
    // its channel limit, direct): here only what is the opener's.
    let callee_view = match (&target, interfaces.as_deref()) {
        (Some(Target::Here(c)), Some(i)) => Some(Callee {
            party: party(c),
            interfaces: i,
        }),
        (Some(Target::Member(_)), _) => Some(Callee {
            party: Party {
                name: &peer,
                direct: Some(&[]),
                channels: 0,
            },
            interfaces: &[],
        }),
        _ => None,
    };
    let decided = decide(opener.party(), request, callee_view, &shared.policy(), max);
    let (plan, target) = match (decided, target) {
        (Ok(plan), Some(target)) => (plan, target),
        (Err(refusal), _) => {
            if refusal.code == OpenFailCode::Denied {
                info!(cause = %Untrusted::reason(&refusal.message), "open denied");
            }
            return refuse(&mut a_send, refusal).await;
        }
        (Ok(_), None) => {
            let refusal = match unlinked {
                Some(member) => Refusal::unlinked(&peer, &member),
                None => Refusal::not_present(&peer),
            };
            return refuse(&mut a_send, refusal).await;
        }
    };
    // The counts `decide` saw may have moved since: the slots are taken
    // atomically, so concurrent opens cannot pass the limit. A side on
    // another member holds its slot there.
    let mut slots = Vec::with_capacity(2);
    let local_opener = (!opener.via_link()).then_some(session);
    let local_callee = match &target {
        Target::Here(c) => Some(c),
        Target::Member(_) => None,
    };
    for (side, who) in [(local_opener, OPENER), (local_callee, CALLEE)] {
        let Some(side) = side else { continue };
        match Slot::take(side, max) {
            Some(slot) => slots.push(slot),
            None => {
                let refusal = Refusal::too_many_channels(who, max);
                return refuse(&mut a_send, refusal).await;
            }
        }
    }
    let _draining = Draining::new(&shared, slots.len());
    let accepted = match &target {
        Target::Here(callee) => {
            offer_here(
                &shared,
                &opener,
                callee,
                &plan,
                &peer,
                &channel,
                &mut a_recv,
            )
            .await
        }
        Target::Member(link) => {
            offer_to_member(&shared, &opener, link, &plan, &peer, &channel, &mut a_recv).await
        }
    };
    let Accepted {
        send: mut b_send,
        recv: b_recv,
        number,
        opener_ready,
        callee_ready,
    } = match accepted {
        Ok(a) => a,
        Err(Some(refusal)) => return refuse(&mut a_send, refusal).await,
        Err(None) => return,
    };
    let callee = match &target {
        Target::Here(c) | Target::Member(c) => c,
    };

    // Join: register both sides before either hears Ready, so that a data
    // stream sent right after Ready always finds its channel.
    let a_id = StreamId(u64::from(a_send.id()));
    let b_id = StreamId(u64::from(b_send.id()));
    let direct = opener_ready.peer.is_some();
    let record = Arc::new(ChannelRecord {
        number: number.0,
        opener: opener.name.clone(),
        callee: peer.clone(),
        name: channel.to_string(),
        direct,
        opened: std::time::Instant::now(),
        bytes: Default::default(),
    });
    let side_a = Arc::new(ChannelSide {
        record: record.clone(),
        label: label.clone(),
        peer_conn: callee.conn.clone(),
        peer: Arc::downgrade(callee),
        peer_channel: b_id,
        streams: watch::Sender::new(StreamCount::default()),
        pipes: Default::default(),
    });
    let side_b = Arc::new(ChannelSide {
        record,
        label: label.clone(),
        peer_conn: session.conn.clone(),
        peer: Arc::downgrade(session),
        peer_channel: a_id,
        streams: watch::Sender::new(StreamCount::default()),
        pipes: Default::default(),
    });
    session.channels().insert(a_id, side_a.clone());
    callee.channels().insert(b_id, side_b.clone());
    shared.stats.channels_joined.fetch_add(1, Ordering::Relaxed);
    // A failed write means that side is gone; its forwarder reports it.
    let _ = write_frame(&mut a_send, &OpenAnswer::Ready(opener_ready)).await;
    if let Some(ready) = callee_ready {
        let _ = write_frame(&mut b_send, &ready).await;
    }
    info!(number = %number, path = ?plan.path, introduced = direct, "joined");

    let drain = shared.config.drain_timeout;
    let ends = Ends {
        left: AtomicU8::new(2),
        sides: [(session, a_id), (callee, b_id)],
        slots: std::sync::Mutex::new(slots),
    };
    tokio::join!(
        forward(session, a_recv, &side_a, b_send, drain, &ends),
        forward(callee, b_recv, &side_b, a_send, drain, &ends),
    );
    ends.release();
    info!("ended");
}

/// Offer the channel to `callee`, a client here, and read its answer.
/// `Err(None)`: the opener gave up (nothing to tell it).
async fn offer_here(
    shared: &Shared,
    opener: &Opener<'_>,
    callee: &Arc<Session>,
    plan: &OpenPlan,
    peer: &str,
    channel: &str,
    a_recv: &mut RecvStream,
) -> Result<Accepted, Option<Refusal>> {
    // Make sure the callee is still there: a client killed without a word
    // is closed within the probe window, and this open fails with it.
    callee.probe.notify_one();
    let answer_timeout = shared.config.answer_timeout;
    let deadline = tokio::time::Instant::now() + answer_timeout;
    let opened = tokio::time::timeout_at(deadline, async {
        let (mut send, recv) = callee.conn.open_bi().await.ok()?;
        write_frame(
            &mut send,
            &Arrival::Channel(plan.incoming(&opener.name, channel)),
        )
        .await
        .ok()?;
        Some((send, recv))
    })
    .await;
    let (mut b_send, mut b_recv) = match opened {
        Ok(Some(s)) => s,
        Ok(None) => return Err(Some(Refusal::left_before_offer(peer))),
        Err(_) => return Err(Some(Refusal::no_room(peer))),
    };
    debug!("offered to callee");

    // Wait for the callee's answer; the opener giving up (its stream or
    // connection ending) cancels the offer.
    let answer = tokio::select! {
        answer = read_within(deadline, &mut b_recv) => answer,
        _ = read_frame::<Close, _>(a_recv) => {
            debug!("opener gave up before the callee answered");
            let _ = b_send.reset(StreamCode::Cancelled.varint());
            let _ = b_recv.stop(StreamCode::Cancelled.varint());
            return Err(None);
        }
    };
    if let Answer::Failed {
        refusal,
        callee_stream,
        violation,
    } = judge_answer(answer, peer, channel, answer_timeout)
    {
        match callee_stream {
            CalleeStream::Finish => {
                let _ = b_send.finish();
            }
            CalleeStream::Reset => {
                let _ = b_send.reset(StreamCode::Cancelled.varint());
            }
            CalleeStream::Leave => {}
        }
        if let Some((c, what)) = violation {
            callee.violation(c, &what);
        }
        return Err(Some(refusal));
    }
    let number = ChannelId(shared.next_channel.fetch_add(1, Ordering::Relaxed));
    let (a_intro, b_intro) = if plan.introduces() {
        introduce(opener.reachable(), reachable(callee))
    } else {
        (None, None)
    };
    Ok(Accepted {
        send: b_send,
        recv: b_recv,
        number,
        opener_ready: plan.ready(number, a_intro),
        callee_ready: Some(plan.ready(number, b_intro)),
    })
}

/// How much longer than a callee's answer time the opener's coordinator
/// waits for the callee's member to answer: the member's own refusal for
/// a late callee comes first.
const LINK_ANSWER_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Pass the open to the member whose `link` stands for the callee, and
/// read that member's answer: its `Ready` (with its channel number and its
/// introduction of the callee) or its refusal, passed on as it is.
async fn offer_to_member(
    shared: &Shared,
    opener: &Opener<'_>,
    link: &Arc<Session>,
    plan: &OpenPlan,
    peer: &str,
    channel: &str,
    a_recv: &mut RecvStream,
) -> Result<Accepted, Option<Refusal>> {
    let answer_timeout = shared.config.answer_timeout;
    let deadline = tokio::time::Instant::now() + answer_timeout + LINK_ANSWER_MARGIN;
    let member = link.member.as_deref().unwrap_or_default();
    let lost = || Refusal {
        code: OpenFailCode::PeerLeft,
        message: format!(
            "the link to coordinator {member}, which holds \"{peer}\", failed before it answered; \
             try again"
        ),
    };
    let offer = LinkRequest::Open(LinkOpen {
        opener: opener.name.clone(),
        fingerprint: opener.fingerprint,
        observed: opener.observed,
        direct: opener.direct.clone(),
        session: opener.id,
        open: Open {
            peer: peer.into(),
            channel: channel.into(),
            path: plan.path,
        },
    });
    let opened = tokio::time::timeout_at(deadline, async {
        let (mut send, recv) = link.conn.open_bi().await.ok()?;
        write_frame(&mut send, &offer).await.ok()?;
        Some((send, recv))
    })
    .await;
    let (mut b_send, mut b_recv) = match opened {
        Ok(Some(s)) => s,
        Ok(None) => return Err(Some(lost())),
        Err(_) => return Err(Some(Refusal::no_room(peer))),
    };
    debug!(member, "offered to the callee's coordinator");
    let answer = tokio::select! {
        answer = read_within::<OpenAnswer, _>(deadline, &mut b_recv) => answer,
        _ = read_frame::<Close, _>(a_recv) => {
            debug!("opener gave up before the callee's coordinator answered");
            let _ = b_send.reset(StreamCode::Cancelled.varint());
            let _ = b_recv.stop(StreamCode::Cancelled.varint());
            return Err(None);
        }
    };
    match answer {
        Read::Frame(OpenAnswer::Ready(ready)) => Ok(Accepted {
            send: b_send,
            recv: b_recv,
            number: ready.channel,
            opener_ready: ready,
            callee_ready: None,
        }),
        Read::Frame(OpenAnswer::Failed(failure)) => {
            let _ = b_send.finish();
            Err(Some(Refusal {
                code: failure.code,
                message: failure.message,
            }))
        }
        Read::Late => {
            let _ = b_send.reset(StreamCode::Cancelled.varint());
            Err(Some(Refusal {
                code: OpenFailCode::Timeout,
                message: format!(
                    "coordinator {member}, which holds \"{peer}\", did not answer within {} s",
                    (answer_timeout + LINK_ANSWER_MARGIN).as_secs()
                ),
            }))
        }
        Read::Finished | Read::Failed(_) => Err(Some(lost())),
    }
}

/// The two terminal messages of a channel. Once both are on their way, no
/// more data streams belong to it (each side's `Close` was forwarded only
/// after its relayed streams arrived), so it stops counting against either
/// client's channel limit before the last terminal reaches its client.
struct Ends<'a> {
    left: AtomicU8,
    sides: [(&'a Arc<Session>, StreamId); 2],
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
            .ok()?;
        Some(Slot(session.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.slots.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A channel's sides here counted in [`Shared::slots`], which a drain
/// waits on, until the channel's task has ended: after its last `Ending`
/// frames were acknowledged (or [`FLUSH`] passed), so a drain that ends
/// with the last channel does not close a connection under a frame still
/// in flight. (The client's own [`Slot`] is given back earlier, as the
/// last `Ending` is sent.)
struct Draining(Arc<Shared>, usize);

impl Draining {
    fn new(shared: &Arc<Shared>, sides: usize) -> Self {
        shared.slots.send_modify(|n| *n += sides);
        Draining(shared.clone(), sides)
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        let sides = self.1;
        self.0.slots.send_modify(|n| *n = n.saturating_sub(sides));
    }
}

/// How long a side's last `Ending` may wait to be acknowledged before the
/// channel's task ends without it.
const FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Forward the `Close` `from` sends to the other side until the channel
/// ends, delivering exactly one `Ending` to `to`.
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
        match hear(from, &mut from_recv).await {
            Ok(Some(Heard::Lost(reason))) if !terminal_sent => break Some(reason),
            Ok(Some(_)) if terminal_sent => {
                debug!(side = %Untrusted::name(&from.name), "second close ignored");
            }
            Ok(Some(Heard::Lost(_))) => {}
            Ok(Some(Heard::Closed(Close {
                reason,
                streams,
                relayed,
            }))) => {
                let reason = clip_reason(&reason);
                let mut counts = from_side.streams.subscribe();
                let drained = tokio::select! {
                    r = timeout(drain, counts.wait_for(|c| c.accepted >= relayed && c.active == 0)) => r.is_ok(),
                    _ = from.conn.closed() => break Some(lost_reason(from, None)),
                };
                if !drained {
                    warn!(
                        client = %Untrusted::name(&from.name),
                        relayed,
                        "close forwarded before all of the closer's data streams were relayed"
                    );
                }
                debug!(by = %Untrusted::name(&from.name), "close");
                // Streams the relay refused never reach the other side.
                let dropped = from_side.streams.borrow().dropped;
                let close = Ending::Closed(Close {
                    reason,
                    streams: streams.saturating_sub(dropped),
                    relayed: relayed.saturating_sub(dropped),
                });
                ends.one_sent();
                if write_frame(&mut to, &close).await.is_err() {
                    break None;
                }
                terminal_sent = true;
            }
            Ok(None) => {
                break Some(format!(
                    "\"{}\" ended the channel without closing it",
                    from.name
                ));
            }
            Err(e) => {
                if let Some(code) = e.conn_code() {
                    from.violation(code, &format!("bad channel frame: {e}"));
                }
                break Some(lost_reason(from, Some(&e.to_string())));
            }
        }
    };
    if let Some(reason) = terminal.filter(|_| !terminal_sent) {
        debug!(side = %Untrusted::name(&from.name), cause = %Untrusted::reason(&reason), "lost");
        let reason = clip_reason(&reason);
        ends.one_sent();
        let _ = write_frame(&mut to, &Ending::Lost { reason }).await;
    }
    if to.finish().is_ok() {
        let _ = timeout(FLUSH, to.stopped()).await;
    }
}

/// What one side's control stream said: a client sends `Close`; a link
/// carries the other member's `Ending`, a close or a loss.
enum Heard {
    Closed(Close),
    Lost(String),
}

async fn hear(
    from: &Session,
    recv: &mut RecvStream,
) -> Result<Option<Heard>, qmesh_proto::codec::ReadFrameError> {
    if from.member.is_some() {
        Ok(read_frame::<Ending, _>(recv).await?.map(|e| match e {
            Ending::Closed(c) => Heard::Closed(c),
            Ending::Lost { reason } => Heard::Lost(reason),
        }))
    } else {
        Ok(read_frame::<Close, _>(recv).await?.map(Heard::Closed))
    }
}

/// `session` as an open's decision sees it.
fn party(session: &Session) -> Party<'_> {
    Party {
        name: &session.name,
        direct: session.direct.as_deref(),
        channels: session.slots.load(Ordering::Acquire),
    }
}

/// `session` as a direct-path introduction describes it.
fn reachable(session: &Session) -> Reachable<'_> {
    Reachable {
        name: &session.name,
        fingerprint: session.fingerprint.0,
        observed: session.conn.remote_address(),
        direct: session.direct.as_deref(),
        session: SessionId(session.id),
    }
}

/// Why `from` is gone, for a `Lost` message.
fn lost_reason(from: &Session, stream_error: Option<&str>) -> String {
    if let Some(member) = &from.member {
        let why = match from.conn.close_reason() {
            Some(e) => qmesh_certs::transport::describe_close(&e),
            None => stream_error.unwrap_or("stream ended").to_owned(),
        };
        return format!(
            "the link to coordinator {member}, which carried the channel, failed: {why}"
        );
    }
    match from.conn.close_reason() {
        Some(quinn::ConnectionError::LocallyClosed) => match from.closed_why.get() {
            // The client ended its own session: it left, it was not put out.
            Some((ConnCode::Normal, why)) => format!("\"{}\" left: {why}", from.name),
            Some((_, why)) => format!(
                "\"{}\" was disconnected by the coordinator: {why}",
                from.name
            ),
            None => format!("\"{}\" was disconnected by the coordinator", from.name),
        },
        Some(e) => format!(
            "\"{}\" disconnected: {}",
            from.name,
            qmesh_certs::transport::describe_close(&e)
        ),
        None => format!(
            "\"{}\" abandoned the channel: {}",
            from.name,
            stream_error.unwrap_or("stream ended")
        ),
    }
}

/// Tell the opener its open was refused, and why.
async fn refuse(send: &mut SendStream, refusal: Refusal) {
    fail(send, OpenAnswer::Failed, refusal.code, refusal.message).await;
}
