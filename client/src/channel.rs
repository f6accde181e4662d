//! Channels: a control stream plus data streams between two clients.
//!
//! A [`Channel`] ends exactly once, with [`ChannelEnd::Closed`] (a graceful
//! close by either side, with its reason) or [`ChannelEnd::Lost`] (the peer
//! or the coordinator disappeared). [`Channel::ended`] reports it.

use std::fmt;
use std::sync::{Arc, Mutex};

use qmesh_proto::codec::{read_frame, write_frame};
use qmesh_proto::codes::StreamCode;
use qmesh_proto::limits::clip_reason;
use qmesh_proto::msg::{
    Close, DirectPipe, Ending, IncomingAnswer, PathMode, PeerIntro, Ready, StreamHeader,
    StreamRequest,
};
use qmesh_proto::{ChannelId, Interface, StreamId, Untrusted};
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tracing::{debug, info, Instrument, Span};

use qmesh_certs::transport::StreamGuard;

use bytes::Bytes;
use qmesh_proto::envelope::Envelope;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use crate::end::{ChannelEnd, Path, Side};

use crate::direct::{Direct, Link, LinkUse};
use crate::end::describe_end;
use crate::error::{AcceptError, CloseError, RequestError, SendError, StreamError};
use crate::events::{self, ChannelRef, Event, Events};
use crate::messages::{read_streams, Inbox, Incoming, OpenOut, Outbox, TimedOut, Waiting};
use crate::pipe::Pipe;
use crate::quota::ChannelSlot;
use crate::routes::{Held, Route, Routes};
use crate::state::{ChannelState, Effects, Life, Report};
use crate::stream::{MessageReceiver, MessageSender};
use crate::sync::lock;
use qmesh_proto::codec::{read_within, Read};

#[derive(Debug)]
struct Shared {
    /// This client's id of the channel's control stream: relayed data
    /// streams name it.
    id: StreamId,
    peer: String,
    name: String,
    label: String,
    conn: Connection,
    /// Why this client closed its session, when it did.
    closed_why: Arc<std::sync::OnceLock<String>>,
    max_message: usize,
    close_timeout: std::time::Duration,
    /// This side of the control stream, until the close or the end of the
    /// control stream takes it (once; never held across an await).
    ctrl: Mutex<Option<SendStream>>,
    /// The channel's life: its one owner.
    life: Arc<Life>,
    /// The coordinator's number for this channel.
    number: ChannelId,
    /// The path the opener asked for.
    mode: PathMode,
    /// The direct link this channel uses, when it may go direct.
    link: Option<LinkUse>,
    /// The channel is held on its direct connection: the coordinator no
    /// longer carries its control (protocol.md §8.9). Its streams and its
    /// close go on the direct connection only.
    held: std::sync::atomic::AtomicBool,
    /// The direct endpoint, to unregister the channel's direct route.
    direct: Option<Arc<Direct>>,
    /// Which path new data streams take.
    path: watch::Sender<Path>,
    span: Span,
    /// The interface the channel is on, and which side offers it.
    offer: Offer,
    /// Where lifecycle and request events go.
    events: Option<Events>,
    /// This side's requests waiting for replies.
    waiting: Arc<Waiting>,
    /// This side's message stream.
    outbox: Arc<Outbox>,
    request_timeout: std::time::Duration,
    max_requests: usize,
    /// The interface's quota, when this side offers it with one: holds the
    /// channel's place under the cap while the channel lives.
    quota: Option<ChannelSlot>,
    /// Counts the control stream against this client's stream allowance
    /// while the channel lives (channels the peer opened).
    _guard: Option<StreamGuard>,
}

/// The interface a channel is on, when the callee declares interfaces.
#[derive(Debug, Clone)]
pub(crate) struct Offer {
    /// The callee's manifest for the channel name.
    pub(crate) interface: Option<Interface>,
    /// Whether this side is the callee (the side that offers it).
    pub(crate) offerer: bool,
}

impl Shared {
    /// Run a transition of the channel's state and report what it says
    /// (before anyone watching sees the new state).
    fn apply(&self, f: impl FnOnce(&mut ChannelState) -> Effects) -> Effects {
        self.life.apply(f, |fx| {
            if let Some(end) = &fx.ended {
                info!(parent: &self.span, how = %Untrusted::reason(&end), "ended");
                // Requests still waiting will get no reply now.
                self.waiting.fail_all();
            }
            for report in &fx.reports {
                events::emit(&self.events, || match report {
                    Report::Ready => Event::Ready {
                        channel: self.channel_ref(),
                    },
                    Report::Ended(end) => Event::ended(self.channel_ref(), end),
                });
            }
        })
    }

    /// Report Ready (once), and the end too if it came first.
    fn report_ready(&self) {
        self.apply(ChannelState::ready);
    }

    /// How the channel ended, if it has.
    fn end(&self) -> Option<ChannelEnd> {
        self.life.now().end().cloned()
    }

    pub(crate) fn channel_ref(&self) -> ChannelRef {
        ChannelRef {
            label: self.label.clone(),
            peer: self.peer.clone(),
            name: self.name.clone(),
        }
    }

    /// Whether this side may send data (streams, one-way messages,
    /// requests) under the interface's direction; the error says why not.
    fn check_direction(&self) -> Result<(), String> {
        match &self.offer.interface {
            Some(i) if !i.direction.may_send(self.offer.offerer) => Err(format!(
                "interface \"{}\" is {} from the offerer's side, so {} may not send on it",
                i.name,
                i.direction,
                if self.offer.offerer {
                    "its offerer"
                } else {
                    "the side that opened it"
                }
            )),
            _ => Ok(()),
        }
    }

    /// Set the channel's path from its link's state (an event when it
    /// changes).
    fn show_path(&self, link: &Link) {
        let path = match link {
            Link::Up(c) => Path::Direct {
                remote: c.remote_address(),
            },
            Link::Connecting | Link::Down(_) => Path::Relay,
        };
        self.path.send_if_modified(|p| {
            if *p != path {
                info!(parent: &self.span, path = %path, "path changed");
                *p = path;
                true
            } else {
                false
            }
        });
    }

    /// Wait until the path is direct, up to `limit`; the reason when it
    /// does not become direct.
    pub(crate) async fn wait_direct(&self, limit: std::time::Duration) -> Result<(), String> {
        let Some(link) = &self.link else {
            return Err("the peer cannot take direct channels".into());
        };
        let mut state = link.peer.watch();
        let up = timeout(limit, state.wait_for(|s| !matches!(s, Link::Connecting))).await;
        let seen = match up {
            Ok(Ok(link)) => link.clone(),
            Ok(Err(_)) => return Err("the client is closing".into()),
            Err(_) => return Err(format!("no direct path within {} s", limit.as_secs())),
        };
        match seen {
            Link::Up(_) => {
                self.show_path(&seen);
                Ok(())
            }
            Link::Down(reason) => Err(reason),
            Link::Connecting => Err("the client is closing".into()),
        }
    }

    /// Whether the channel is held on its direct connection.
    fn is_held(&self) -> bool {
        self.held.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The direct connection the channel could be held on: its link's,
    /// while up.
    fn hold_conn(&self) -> Option<Connection> {
        self.link.as_ref().and_then(|l| l.peer.conn())
    }

    /// Send `header` alone on a new unidirectional stream of the direct
    /// connection (a hold or a held channel's close).
    async fn send_direct(
        &self,
        header: &StreamHeader,
        close: Option<&Close>,
    ) -> Result<(), String> {
        let conn = self
            .hold_conn()
            .ok_or_else(|| "the direct connection is down".to_owned())?;
        let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, header)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(close) = close {
            write_frame(&mut send, close)
                .await
                .map_err(|e| e.to_string())?;
        }
        send.finish().map_err(|e| e.to_string())
    }

    /// The header of a stream through the coordinator.
    fn relay_header(&self, messages: bool) -> StreamHeader {
        let channel = self.id;
        if messages {
            StreamHeader::Messages { channel }
        } else {
            StreamHeader::Data { channel }
        }
    }

    /// Pick the connection and header for a new data stream; `true` when
    /// it goes through the coordinator.
    async fn stream_route(
        &self,
        messages: bool,
    ) -> Result<(Connection, StreamHeader, bool), StreamError> {
        let relay = (self.conn.clone(), self.relay_header(messages), true);
        let direct = |c: Connection| {
            let channel = self.number;
            let header = if messages {
                StreamHeader::DirectMessages { channel }
            } else {
                StreamHeader::Direct { channel }
            };
            (c, header, false)
        };
        if self.is_held() {
            // The coordinator is away: there is no relay to fall back on.
            return self.hold_conn().map(direct).ok_or_else(|| {
                StreamError::DirectUnavailable(
                    "the channel was held on its direct connection, which is down".into(),
                )
            });
        }
        match (&self.link, self.mode) {
            (None, PathMode::Direct) => Err(StreamError::DirectUnavailable(
                "the peer cannot take direct channels".into(),
            )),
            (None, _) | (_, PathMode::Relay) => Ok(relay),
            (Some(link), mode) => match link.peer.conn() {
                Some(c) => Ok(direct(c)),
                None if mode == PathMode::Direct => {
                    let limit = self
                        .direct
                        .as_ref()
                        .map(|d| d.timeout())
                        .unwrap_or_default();
                    self.wait_direct(limit)
                        .await
                        .map_err(StreamError::DirectUnavailable)?;
                    link.peer.conn().map(direct).ok_or_else(|| {
                        StreamError::DirectUnavailable("the direct path went down".into())
                    })
                }
                None => Ok(relay),
            },
        }
    }

    /// Open a data stream (or, with `messages`, this side's message
    /// stream) on the channel's current path, and say which path.
    pub(crate) async fn open_stream(
        &self,
        messages: bool,
    ) -> Result<(MessageSender, Path), StreamError> {
        let ended = |_| StreamError::ChannelEnded;
        self.life.now().may_open().map_err(ended)?;
        let (conn, header, mut relayed) = self.stream_route(messages).await?;
        self.life
            .update(|s| s.stream_opening(relayed))
            .map_err(ended)?;
        let open = |conn: Connection, header: StreamHeader| async move {
            let mut send = conn.open_uni().await.map_err(|e| e.to_string())?;
            write_frame(&mut send, &header)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(send)
        };
        let mut opened = open(conn, header).await;
        if opened.is_err() && !relayed && self.mode == PathMode::Auto && !self.is_held() {
            // The direct connection died under us: this stream goes relayed.
            debug!(parent: &self.span, "direct stream failed; using the relay");
            relayed = true;
            self.life.update(ChannelState::stream_rerouted);
            opened = open(self.conn.clone(), self.relay_header(messages)).await;
        }
        let path = if relayed {
            Path::Relay
        } else {
            *self.path.borrow()
        };
        match opened {
            Ok(send) => Ok((MessageSender::new(send, self.max_message), path)),
            Err(e) => {
                // It never left: do not count it in the close.
                self.life.update(|s| s.stream_failed(relayed));
                Err(StreamError::Session(e))
            }
        }
    }

    /// Open a pipe on the channel's current path: a bidirectional stream
    /// to the coordinator (which relays it) or on the direct connection.
    /// In auto mode a pipe whose direct connection fails goes relayed.
    pub(crate) async fn open_pipe(&self) -> Result<Pipe, StreamError> {
        self.life
            .now()
            .may_open()
            .map_err(|_| StreamError::ChannelEnded)?;
        let (conn, _, relayed) = self.stream_route(false).await?;
        async fn open<T: serde::Serialize>(
            conn: &Connection,
            first: &T,
        ) -> Result<(SendStream, RecvStream), String> {
            let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(&mut send, first)
                .await
                .map_err(|e| e.to_string())?;
            Ok((send, recv))
        }
        let relay = StreamRequest::Pipe { channel: self.id };
        let opened = if relayed {
            open(&conn, &relay).await.map(|s| (s, Path::Relay))
        } else {
            let direct = DirectPipe {
                channel: self.number,
            };
            let path = Path::Direct {
                remote: conn.remote_address(),
            };
            match open(&conn, &direct).await {
                Ok(s) => Ok((s, path)),
                Err(e) if self.mode == PathMode::Direct || self.is_held() => Err(e),
                Err(_) => {
                    debug!(parent: &self.span, "direct pipe failed; using the relay");
                    open(&self.conn, &relay).await.map(|s| (s, Path::Relay))
                }
            }
        };
        let ((send, recv), path) = opened.map_err(StreamError::Session)?;
        let datagrams = match (path, &self.direct) {
            (Path::Direct { .. }, Some(direct)) => Some((conn, direct.flows())),
            _ => None,
        };
        Ok(Pipe::new(send, recv, path, datagrams, None))
    }

    /// Carry out a transition that may close: finish the message stream
    /// (so everything sent on it is delivered before the close), then send
    /// the close, if the transition decided one, and finish the control
    /// stream.
    async fn send_close(&self, fx: Effects) {
        self.outbox.finish().await;
        let Some(close) = fx.close else { return };
        let msg = Close {
            reason: close.reason,
            streams: close.streams,
            relayed: close.relayed,
        };
        if self.is_held() {
            let header = StreamHeader::DirectClose {
                channel: self.number,
            };
            if let Err(e) = self.send_direct(&header, Some(&msg)).await {
                debug!(parent: &self.span, cause = %e, "the close of a held channel was not sent");
            }
            return;
        }
        let ctrl = lock(&self.ctrl).take();
        if let Some(mut send) = ctrl {
            if write_frame(&mut send, &msg).await.is_ok() {
                let _ = send.finish();
            }
        }
    }
}

/// A ready channel to a peer.
///
/// Dropping a channel that has not ended closes it with the reason
/// "channel dropped".
#[derive(Debug)]
pub struct Channel {
    shared: Arc<Shared>,
    streams: tokio::sync::Mutex<(mpsc::Receiver<(RecvStream, StreamGuard)>, u64)>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
    pipes: tokio::sync::Mutex<mpsc::Receiver<Pipe>>,
    routes: Routes,
}

pub(crate) struct Parts {
    pub(crate) conn: Connection,
    /// Why this client closed its session, when it did.
    pub(crate) closed_why: Arc<std::sync::OnceLock<String>>,
    pub(crate) routes: Routes,
    pub(crate) peer: String,
    pub(crate) name: String,
    pub(crate) label: String,
    pub(crate) max_message: usize,
    pub(crate) close_timeout: std::time::Duration,
    pub(crate) max_streams: usize,
    /// This client's direct endpoint, if it takes direct channels.
    pub(crate) direct: Option<Arc<Direct>>,
    /// The path the opener asked for.
    pub(crate) mode: PathMode,
    pub(crate) events: Option<Events>,
    pub(crate) request_timeout: std::time::Duration,
    pub(crate) max_requests: usize,
    pub(crate) message_backlog: usize,
    /// The offered interface's quota slot (channels this side accepted).
    pub(crate) quota: Option<ChannelSlot>,
    /// Report Ready only when [`Channel::report_ready`] is called (an
    /// open reports it once it returns the channel).
    pub(crate) defer_ready: bool,
}

/// A channel whose route is registered but which is not ready yet.
pub(crate) struct Pending {
    parts: Parts,
    id: StreamId,
    tx: Route,
    rx: mpsc::Receiver<(RecvStream, StreamGuard)>,
    msg_rx: mpsc::Receiver<(RecvStream, StreamGuard)>,
    pipe_rx: mpsc::Receiver<Pipe>,
    held_rx: mpsc::Receiver<Held>,
}

impl Pending {
    /// Register the route for data streams of the channel whose control
    /// stream is `send`, before the channel can receive any.
    pub(crate) fn register(parts: Parts, send: &SendStream) -> Self {
        let id = StreamId(u64::from(send.id()));
        let (data, rx) = mpsc::channel(parts.max_streams.max(1));
        let (messages, msg_rx) = mpsc::channel(4);
        let (pipes, pipe_rx) = mpsc::channel(parts.max_streams.max(1));
        // A hold and a close are all a held channel needs from its peer.
        let (held, held_rx) = mpsc::channel(4);
        let tx = Route {
            data,
            messages,
            pipes,
            life: Arc::default(),
            held,
        };
        lock(&parts.routes).insert(id, tx.clone());
        Self {
            parts,
            id,
            tx,
            rx,
            msg_rx,
            pipe_rx,
            held_rx,
        }
    }

    /// Give up on the channel.
    pub(crate) fn abandon(self) {
        lock(&self.parts.routes).remove(&self.id);
    }

    /// The channel is ready: start its control task, and bring up (or
    /// join) the direct link when the coordinator introduced the peer.
    pub(crate) fn ready(
        self,
        (send, recv): (SendStream, RecvStream),
        guard: Option<StreamGuard>,
        number: ChannelId,
        intro: Option<PeerIntro>,
        offer: Offer,
    ) -> Channel {
        let Pending {
            parts,
            id,
            tx,
            rx,
            msg_rx,
            pipe_rx,
            held_rx,
        } = self;
        let span = tracing::info_span!("channel", id = %parts.label);
        let life = tx.life.clone();
        let link = match (&parts.direct, intro, parts.mode) {
            (Some(direct), Some(intro), PathMode::Auto | PathMode::Direct) => {
                let link = direct.link(&parts.peer, &intro);
                direct.add_route(number, qmesh_certs::Fingerprint(intro.fingerprint), tx);
                Some(link)
            }
            _ => None,
        };
        let direct = link.as_ref().and(parts.direct.clone());
        let path = watch::Sender::new(Path::Relay);
        let path_rx = path.subscribe();
        let shared = Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| Shared {
            id,
            peer: parts.peer,
            name: parts.name,
            label: parts.label,
            conn: parts.conn,
            closed_why: parts.closed_why,
            max_message: parts.max_message,
            close_timeout: parts.close_timeout,
            ctrl: Mutex::new(Some(send)),
            life,
            number,
            mode: parts.mode,
            link,
            held: false.into(),
            direct,
            path,
            span: span.clone(),
            offer,
            events: parts.events,
            waiting: Arc::default(),
            outbox: Arc::new(Outbox::new(open_messages(weak.clone()), path_rx)),
            request_timeout: parts.request_timeout,
            max_requests: parts.max_requests,
            quota: parts.quota,
            _guard: guard,
        });
        info!(parent: &span, %number, mode = ?parts.mode, direct = shared.link.is_some(), "ready");
        if let Some(link) = &shared.link {
            tokio::spawn(follow_path(shared.clone(), link.peer.watch()).instrument(span.clone()));
        }
        tokio::spawn(control(shared.clone(), recv, held_rx).instrument(span.clone()));
        let (deliver, incoming) = mpsc::channel(parts.message_backlog.max(1));
        let inbox = Arc::new(Inbox {
            label: shared.label.clone(),
            max_message: shared.max_message,
            waiting: shared.waiting.clone(),
            outbox: shared.outbox.clone(),
            peer_may_send: shared
                .offer
                .interface
                .as_ref()
                .is_none_or(|i| i.direction.may_send(!shared.offer.offerer)),
            quota: shared.quota.as_ref().map(|q| q.gate().clone()),
        });
        let weak = Arc::downgrade(&shared);
        let counted = {
            let weak = weak.clone();
            move |delta: i64| {
                if let Some(s) = weak.upgrade() {
                    s.life.update(|st| {
                        if delta > 0 {
                            st.message_stream_arrived();
                        } else {
                            st.message_stream_read();
                        }
                    });
                }
            }
        };
        let over_quota = move |why: String| {
            if let Some(s) = weak.upgrade() {
                info!(parent: &s.span, cause = %why, "closing a channel over its quota");
                tokio::spawn(async move {
                    let fx = s.apply(|st| st.close_local(&why));
                    s.send_close(fx).await;
                });
            }
        };
        tokio::spawn(read_streams(inbox, msg_rx, deliver, counted, over_quota).instrument(span));
        if !parts.defer_ready {
            shared.report_ready();
        }
        Channel {
            shared,
            streams: tokio::sync::Mutex::new((rx, 0)),
            incoming: tokio::sync::Mutex::new(incoming),
            pipes: tokio::sync::Mutex::new(pipe_rx),
            routes: parts.routes,
        }
    }
}

/// What opens a channel's message stream: the channel's own
/// [`Shared::open_stream`], reached through a weak reference (the outbox
/// lives inside the channel).
fn open_messages(weak: std::sync::Weak<Shared>) -> OpenOut {
    Box::new(move || {
        let weak = weak.clone();
        Box::pin(async move {
            let shared = weak
                .upgrade()
                .ok_or_else(|| SendError::Stream("the channel is gone".into()))?;
            shared
                .open_stream(true)
                .await
                .map_err(|e| SendError::Stream(e.to_string()))
        })
    })
}

/// Keep the channel's path in step with its direct link: direct while the
/// link is up, relayed otherwise. A direct-only channel whose link goes
/// down after it was up is lost.
async fn follow_path(shared: Arc<Shared>, mut link: watch::Receiver<Link>) {
    let mut state = shared.life.watch();
    let mut was_up = false;
    loop {
        let now = link.borrow_and_update().clone();
        was_up |= matches!(now, Link::Up(_));
        shared.show_path(&now);
        if let Link::Down(reason) = &now {
            if shared.is_held() {
                let reason = format!(
                    "direct path lost while the coordinator was away (the channel was held on it): {reason}"
                );
                let fx = shared.apply(|s| s.direct_lost(&reason));
                shared.send_close(fx).await;
            } else if shared.mode == PathMode::Direct && was_up {
                let reason = format!("direct path lost: {reason}");
                let fx = shared.apply(|s| s.direct_lost(&reason));
                shared.send_close(fx).await;
            }
            return;
        }
        tokio::select! {
            changed = link.changed() => if changed.is_err() { return },
            _ = state.wait_for(|s| s.end().is_some()) => return,
        }
    }
}

/// How long a side that holds a channel on its direct connection waits for
/// the peer to hold it too (protocol.md §8.9).
const HOLD_ANSWER: std::time::Duration = std::time::Duration::from_secs(2);

/// Read the channel control stream until it ends, recording the end. When
/// the coordinator's side of it is lost while the direct connection is up,
/// hold the channel there instead (protocol.md §8.9).
async fn control(shared: Arc<Shared>, mut recv: RecvStream, mut held: mpsc::Receiver<Held>) {
    // What the peer said on the direct connection before this side held.
    let mut early: Option<Held> = None;
    let reason = loop {
        let frame = tokio::select! {
            frame = read_frame::<Ending, _>(&mut recv) => frame,
            Some(msg) = held.recv() => {
                early = Some(msg);
                break "the peer holds the channel on the direct connection".to_owned();
            }
        };
        match frame {
            Ok(Some(Ending::Closed(Close {
                reason, streams, ..
            }))) => {
                debug!(streams, "peer closed");
                // Answer with our own close so the closer knows we saw it.
                let fx = shared.apply(|s| s.peer_closed(&reason, streams));
                shared.send_close(fx).await;
            }
            Ok(Some(Ending::Lost { reason })) => break reason,
            Ok(None) => break "the coordinator ended the channel without a close".into(),
            Err(e) => {
                break match shared.conn.close_reason() {
                    Some(c) => format!(
                        "connection to the coordinator ended: {}",
                        describe_end(&c, &shared.closed_why)
                    ),
                    None => format!("channel control stream failed: {e}"),
                }
            }
        }
    };
    let reason = match hold(&shared, recv, &mut held, early, &reason).await {
        Ok(reason) => reason,
        Err(why) => format!("{reason}; {why}"),
    };
    let fx = shared.apply(|s| s.control_ended(reason));
    // Nothing more will be forwarded; release our side too.
    if fx.finish_control {
        if let Some(mut send) = lock(&shared.ctrl).take() {
            let _ = send.finish();
        }
    }
}

/// The coordinator's side of the channel's control is over (`lost` says
/// why): hold the channel on the direct connection, if it is up and the
/// peer holds it too, until it ends there. `Ok` with why the held control
/// ended; `Err` with why the channel could not be held.
async fn hold(
    shared: &Arc<Shared>,
    recv: RecvStream,
    held: &mut mpsc::Receiver<Held>,
    early: Option<Held>,
    lost: &str,
) -> Result<String, String> {
    if shared.end().is_some() {
        return Err("the channel had ended".into());
    }
    let Some(link) = &shared.link else {
        return Err("the channel has no direct path".into());
    };
    if shared.hold_conn().is_none() {
        return Err("no direct connection was up to hold the channel on".into());
    }
    shared
        .held
        .store(true, std::sync::atomic::Ordering::Release);
    link.hold();
    // Release the coordinator's side of the channel.
    if let Some(mut send) = lock(&shared.ctrl).take() {
        let _ = send.finish();
    }
    drop(recv);
    info!(parent: &shared.span, cause = %Untrusted::reason(&lost), "holding the channel on the direct connection");
    let header = StreamHeader::Hold {
        channel: shared.number,
    };
    shared
        .send_direct(&header, None)
        .await
        .map_err(|e| format!("holding it on the direct connection failed: {e}"))?;
    let mut pending = early;
    if pending.is_none() {
        // The peer must hold it too: it answers with its own hold (or its
        // close) unless it is gone.
        pending = match timeout(HOLD_ANSWER, held.recv()).await {
            Ok(Some(msg)) => Some(msg),
            Ok(None) => return Err("the channel is gone".into()),
            Err(_) => {
                return Err(format!(
                    "{} did not hold the channel on the direct connection within {} s",
                    shared.peer,
                    HOLD_ANSWER.as_secs()
                ))
            }
        };
    }
    info!(parent: &shared.span, "held on the direct connection");
    let mut state = shared.life.watch();
    let mut path = link.peer.watch();
    loop {
        match pending.take() {
            Some(Held::Close(Close {
                reason, streams, ..
            })) => {
                debug!(streams, "peer closed (held)");
                let fx = shared.apply(|s| s.peer_closed(&reason, streams));
                shared.send_close(fx).await;
            }
            Some(Held::Hold) | None => {}
        }
        if state.borrow_and_update().end().is_some() && state.borrow().close_answered() {
            return Ok("the channel ended on the direct connection".into());
        }
        tokio::select! {
            msg = held.recv() => match msg {
                Some(msg) => pending = Some(msg),
                None => return Ok("the channel is gone".into()),
            },
            _ = state.changed() => {}
            down = path.wait_for(|l| matches!(l, Link::Down(_))) => {
                let why = match down.as_deref() {
                    Ok(Link::Down(why)) => why.clone(),
                    _ => "the client is closing".into(),
                };
                return Ok(format!(
                    "direct path lost while the coordinator was away (the channel was held on it): {why}"
                ));
            }
        }
    }
}

impl Channel {
    /// The peer's client name.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// The channel name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// `opener>callee!channel`.
    pub fn label(&self) -> &str {
        &self.shared.label
    }

    /// The path the opener asked for.
    pub fn mode(&self) -> PathMode {
        self.shared.mode
    }

    /// The path new data streams from this side take now.
    pub fn path(&self) -> Path {
        *self.shared.path.borrow()
    }

    /// Watch the path: `changed()` on the receiver fires each time it
    /// changes (relay → direct when the direct path comes up, direct →
    /// relay when it goes away).
    pub fn watch_path(&self) -> watch::Receiver<Path> {
        self.shared.path.subscribe()
    }

    /// Wait until the path is direct, up to `limit`; the reason when it
    /// does not become direct.
    pub(crate) async fn wait_direct(&self, limit: std::time::Duration) -> Result<(), String> {
        self.shared.wait_direct(limit).await
    }

    /// Report the channel ready to the event hub (opens do it as they
    /// return).
    pub(crate) fn report_ready(&self) {
        self.shared.report_ready();
    }

    /// Open a data stream to the peer, on the channel's current path.
    ///
    /// Fails with [`StreamError::WrongDirection`] when the channel's
    /// interface does not let this side send.
    pub async fn open_stream(&self) -> Result<MessageSender, StreamError> {
        self.shared
            .check_direction()
            .map_err(StreamError::WrongDirection)?;
        self.shared.open_stream(false).await.map(|(s, _)| s)
    }

    /// Open a pipe to the peer (a bidirectional byte stream; see
    /// [`crate::pipe`]) on the channel's current path. It keeps that path
    /// to its end.
    pub async fn open_pipe(&self) -> Result<Pipe, StreamError> {
        self.shared.open_pipe().await
    }

    /// The next pipe the peer opened, or `None` once the channel has ended.
    pub async fn accept_pipe(&self) -> Option<Pipe> {
        let mut state = self.shared.life.watch();
        let mut pipes = self.pipes.lock().await;
        tokio::select! {
            pipe = pipes.recv() => pipe,
            _ = state.wait_for(|s| s.end().is_some()) => pipes.try_recv().ok(),
        }
    }

    /// The next data stream the peer opened, or `None` once the channel has
    /// ended and every stream the peer sent before its close was accepted
    /// (or, should one of those never arrive, the close timeout has passed).
    pub async fn accept_stream(&self) -> Result<Option<MessageReceiver>, StreamError> {
        let mut state = self.shared.life.watch();
        let mut give_up: Option<tokio::time::Instant> = None;
        let mut guard = self.streams.lock().await;
        let (rx, accepted) = &mut *guard;
        loop {
            if let Ok((s, guard)) = rx.try_recv() {
                *accepted += 1;
                return Ok(Some(MessageReceiver::with_guard(
                    s,
                    self.shared.max_message,
                    guard,
                )));
            }
            {
                let st = state.borrow_and_update();
                if st.streams_done(*accepted) {
                    return Ok(None);
                }
                if st.peer_has_closed() {
                    give_up.get_or_insert_with(|| {
                        tokio::time::Instant::now() + self.shared.close_timeout
                    });
                }
            }
            let deadline = async {
                match give_up {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = deadline => return Ok(None),
                s = rx.recv() => match s {
                    Some((s, guard)) => {
                        *accepted += 1;
                        return Ok(Some(MessageReceiver::with_guard(s, self.shared.max_message, guard)));
                    }
                    None => return Ok(None),
                },
                changed = state.changed() => if changed.is_err() { return Ok(None) },
            }
        }
    }

    /// Send a one-way message on this side's message stream. Messages sent
    /// this way arrive in order at the peer's [`Channel::recv_message`]
    /// (across a path change, the first ones on the new path may overtake
    /// the last ones on the old).
    pub async fn send_message(&self, body: &[u8]) -> Result<(), SendError> {
        self.shared
            .check_direction()
            .map_err(SendError::WrongDirection)?;
        self.shared
            .outbox
            .send(Envelope::OneWay(Bytes::copy_from_slice(body)))
            .await
    }

    /// Send a typed one-way message (bincode).
    pub async fn send_value<T: Serialize>(&self, value: &T) -> Result<(), SendError> {
        let body = crate::messages::encode(value)?;
        self.send_message(&body).await
    }

    /// Send a request and wait for its reply, up to the configured request
    /// timeout ([`crate::ClientConfig::request_timeout`], 5 s by default).
    ///
    /// Ends in exactly one of: the reply, or
    /// [`RequestError::ReplyMissing`] (timeout, the channel ended, or the
    /// request could not be sent). The same outcome is reported as
    /// [`Event::Reply`] or [`Event::ReplyMissing`].
    pub async fn request(&self, body: &[u8]) -> Result<Bytes, RequestError> {
        self.request_within(body, self.shared.request_timeout).await
    }

    /// [`Channel::request`] with its own timeout.
    pub async fn request_within(
        &self,
        body: &[u8],
        limit: std::time::Duration,
    ) -> Result<Bytes, RequestError> {
        let mut id = 0;
        let outcome = self.request_inner(body, limit, &mut id).await;
        events::emit(&self.shared.events, || {
            let channel = self.shared.channel_ref();
            match &outcome {
                Ok(body) => Event::Reply {
                    channel,
                    id,
                    body: body.clone(),
                },
                Err(e) => Event::ReplyMissing {
                    channel,
                    id,
                    reason: e.to_string(),
                },
            }
        });
        outcome
    }

    async fn request_inner(
        &self,
        body: &[u8],
        limit: std::time::Duration,
        id_out: &mut u64,
    ) -> Result<Bytes, RequestError> {
        let missing = |reason: String| RequestError::ReplyMissing { reason };
        self.shared
            .check_direction()
            .map_err(|e| missing(format!("sending against the interface's direction: {e}")))?;
        if let Some(end) = self.end() {
            return Err(missing(format!("the channel has ended ({end})")));
        }
        let Some((id, reply)) = self.shared.waiting.register(self.shared.max_requests) else {
            return Err(missing(format!(
                "{} requests are already waiting for replies on this channel, the most allowed",
                self.shared.max_requests
            )));
        };
        *id_out = id;
        // Forget the request however this ends (a dropped future too).
        struct Forget<'a>(&'a Waiting, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.forget(self.1);
            }
        }
        let _forget = Forget(&self.shared.waiting, id);
        let env = Envelope::Request {
            id,
            body: Bytes::copy_from_slice(body),
        };
        // Boxed: the send's future is large, and a request's future is
        // moved about when many are in flight (join_all, FuturesUnordered);
        // unboxed, those moves were a quarter of a requester's CPU.
        Box::pin(self.shared.outbox.send(env))
            .await
            .map_err(|e| missing(format!("the request could not be sent: {e}")))?;
        self.shared.waiting.arm(id, limit);
        match reply.await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(TimedOut)) => Err(missing(format!("no reply within {} ms", limit.as_millis()))),
            Err(_) => Err(missing(match self.end() {
                Some(end) => format!("the channel ended before the reply ({end})"),
                None => "the channel ended before the reply".into(),
            })),
        }
    }

    /// Send a typed request and decode the typed reply.
    pub async fn request_value<Q: Serialize, R: DeserializeOwned>(
        &self,
        request: &Q,
    ) -> Result<R, RequestError> {
        let body = crate::messages::encode(request).map_err(|e| RequestError::ReplyMissing {
            reason: e.to_string(),
        })?;
        let reply = self.request(&body).await?;
        crate::messages::decode(&reply).map_err(|e| RequestError::Decode(e.to_string()))
    }

    /// The next one-way message or request from the peer, or `None` once
    /// the channel has ended and the peer's message streams are read out.
    ///
    /// After a graceful close by the peer, every message it sent before
    /// closing comes first: the close counts the streams the peer opened,
    /// and this waits for all of them to arrive (or, should one never
    /// arrive, for the close timeout).
    pub async fn recv_message(&self) -> Option<Incoming> {
        // A free lock and a waiting message spend none of tokio's per-poll
        // budget (see `messages::BUDGET_EVERY`); one unit here keeps a
        // task that only receives from running without end.
        tokio::task::consume_budget().await;
        let mut incoming = match self.incoming.try_lock() {
            Ok(incoming) => incoming,
            Err(_) => self.incoming.lock().await,
        };
        if let Ok(m) = incoming.try_recv() {
            return Some(m);
        }
        let mut state = self.shared.life.watch();
        let mut give_up: Option<tokio::time::Instant> = None;
        loop {
            if let Ok(m) = incoming.try_recv() {
                return Some(m);
            }
            {
                let st = state.borrow_and_update();
                if st.messages_done() {
                    return incoming.try_recv().ok();
                }
                if st.peer_has_closed() {
                    give_up.get_or_insert_with(|| {
                        tokio::time::Instant::now() + self.shared.close_timeout
                    });
                }
            }
            let deadline = async {
                match give_up {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                m = incoming.recv() => return m,
                changed = state.changed() => if changed.is_err() { return None },
                _ = deadline => return incoming.try_recv().ok(),
            }
        }
    }

    /// Answer the peer until the channel ends: `handler` gets each one-way
    /// message and request body; what it returns is sent back — as the
    /// reply to a request, as a one-way message otherwise. `None` sends
    /// nothing (a request then reaches the peer as reply missing).
    pub async fn serve<F, Fut>(&self, handler: F)
    where
        F: Fn(Bytes) -> Fut,
        Fut: std::future::Future<Output = Option<Bytes>>,
    {
        while let Some(incoming) = self.recv_message().await {
            match incoming {
                Incoming::Message(body) => {
                    if let Some(out) = handler(body).await {
                        if let Err(e) = self.send_message(&out).await {
                            debug!(parent: &self.shared.span, cause = %Untrusted::reason(&e), "answer not sent");
                        }
                    }
                }
                Incoming::Request(req) => {
                    let body = req.body.clone();
                    if let Some(out) = handler(body).await {
                        if let Err(e) = req.reply(&out).await {
                            debug!(parent: &self.shared.span, cause = %Untrusted::reason(&e), "reply not sent");
                        }
                    }
                }
            }
        }
    }

    /// Replies dropped on this channel because no request waited for them
    /// (late, or never asked).
    pub fn dropped_replies(&self) -> u64 {
        self.shared
            .waiting
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The manifest of the interface this channel is on, when the callee
    /// declares interfaces.
    pub fn interface(&self) -> Option<&Interface> {
        self.shared.offer.interface.as_ref()
    }

    /// Send one message on a new data stream and finish it. For many
    /// messages, open one stream with [`open_stream`](Self::open_stream).
    pub async fn send_one(&self, msg: &[u8]) -> Result<(), SendError> {
        let mut s = self
            .open_stream()
            .await
            .map_err(|e| SendError::Stream(e.to_string()))?;
        s.send(msg).await?;
        s.finish().await
    }

    /// Close gracefully with `reason` and wait until the peer confirms.
    /// Data streams sent before the close are delivered first. Closing an
    /// ended channel returns at once. [`CloseError::Lost`] when the channel
    /// was lost (the peer or the coordinator went away) before the peer's
    /// close arrived: then nothing says the peer read what was sent.
    pub async fn close(&self, reason: &str) -> Result<(), CloseError> {
        let fx = self.shared.apply(|s| s.close_local(reason));
        self.shared.send_close(fx).await;
        let mut state = self.shared.life.watch();
        let secs = self.shared.close_timeout.as_secs();
        let answered = timeout(
            self.shared.close_timeout,
            state.wait_for(ChannelState::close_answered),
        )
        .await
        .map_err(|_| CloseError::Timeout { secs })?;
        match answered {
            Ok(s) => s
                .close_outcome()
                .map_err(|reason| CloseError::Lost { reason }),
            Err(_) => Err(CloseError::Lost {
                reason: "the client was dropped".into(),
            }),
        }
    }

    /// How the channel ended, once it has.
    pub async fn ended(&self) -> ChannelEnd {
        let mut state = self.shared.life.watch();
        let end = match state.wait_for(|s| s.end().is_some()).await {
            Ok(s) => s.end().cloned(),
            Err(_) => None,
        };
        end.unwrap_or(ChannelEnd::Lost {
            reason: "the client was dropped".into(),
        })
    }

    /// How the channel ended, if it has.
    pub fn end(&self) -> Option<ChannelEnd> {
        self.shared.end()
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        lock(&self.routes).remove(&self.shared.id);
        if let Some(direct) = &self.shared.direct {
            direct.remove_route(self.shared.number);
        }
        let fx = self.shared.apply(ChannelState::dropped);
        if fx.ended.is_some() {
            let shared = self.shared.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { shared.send_close(fx).await });
            }
        }
    }
}

/// A channel a peer wants to open with this client; accept or refuse it.
///
/// Dropping it unanswered refuses it.
#[derive(Debug)]
pub struct IncomingChannel {
    /// The client's number of the session the offer came on.
    pub(crate) generation: u64,
    pub(crate) from: String,
    pub(crate) channel: String,
    pub(crate) mode: PathMode,
    pub(crate) streams: Option<(SendStream, RecvStream)>,
    pub(crate) parts: Option<PartsBox>,
    pub(crate) open_timeout: std::time::Duration,
    pub(crate) guard: Option<StreamGuard>,
}

/// Boxed [`Parts`], kept opaque in the public type.
pub(crate) struct PartsBox(pub(crate) Parts);

impl fmt::Debug for PartsBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Parts")
    }
}

impl IncomingChannel {
    /// The opener's client name.
    pub fn peer(&self) -> &str {
        &self.from
    }

    /// The channel name the opener asked for.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The path the opener asked for.
    pub fn mode(&self) -> PathMode {
        self.mode
    }

    /// Accept the channel and wait until it is ready.
    pub async fn accept(mut self) -> Result<Channel, AcceptError> {
        let (send, recv) = self
            .streams
            .take()
            .ok_or_else(|| AcceptError::Withdrawn("already answered".into()))?;
        let PartsBox(parts) = self
            .parts
            .take()
            .ok_or_else(|| AcceptError::Withdrawn("already answered".into()))?;
        let events = parts.events.clone();
        let channel = ChannelRef {
            label: parts.label.clone(),
            peer: parts.peer.clone(),
            name: parts.name.clone(),
        };
        let outcome = self.accept_parts(parts, send, recv).await;
        if let Err(e) = &outcome {
            events::emit(&events, || Event::OpenError {
                channel,
                message: e.to_string(),
            });
        }
        outcome
    }

    async fn accept_parts(
        &mut self,
        parts: Parts,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Result<Channel, AcceptError> {
        let pending = Pending::register(parts, &send);
        if let Err(e) = write_frame(&mut send, &IncomingAnswer::Accept).await {
            pending.abandon();
            return Err(AcceptError::Session(e.to_string()));
        }
        match read_within(tokio::time::Instant::now() + self.open_timeout, &mut recv).await {
            Read::Frame(Ready {
                channel,
                peer,
                interface,
            }) => Ok(pending.ready(
                (send, recv),
                self.guard.take(),
                channel,
                peer,
                Offer {
                    interface,
                    offerer: true,
                },
            )),
            // The opener withdrew (or vanished): the coordinator resets
            // or finishes the stream instead of sending the ready.
            Read::Finished => {
                pending.abandon();
                Err(AcceptError::Withdrawn(
                    "the coordinator finished the offer without an answer".into(),
                ))
            }
            Read::Failed(e) => {
                pending.abandon();
                Err(AcceptError::Withdrawn(e.to_string()))
            }
            Read::Late => {
                pending.abandon();
                let _ = send.reset(StreamCode::Cancelled.varint());
                Err(AcceptError::Withdrawn("no ready in time".into()))
            }
        }
    }

    /// Refuse the channel; the opener's `open` fails with this reason.
    pub async fn refuse(mut self, reason: &str) {
        if let Some((mut send, _recv)) = self.streams.take() {
            refuse(&mut send, reason).await;
        }
    }
}

async fn refuse(send: &mut SendStream, reason: &str) {
    let msg = IncomingAnswer::Refuse {
        reason: clip_reason(reason),
    };
    if write_frame(send, &msg).await.is_ok() {
        let _ = send.finish();
    }
}

impl Drop for IncomingChannel {
    fn drop(&mut self) {
        if let Some((mut send, recv)) = self.streams.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    refuse(&mut send, "not accepted").await;
                    drop(recv);
                });
            }
        }
    }
}
