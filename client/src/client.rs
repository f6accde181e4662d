//! The client: one QUIC connection to the coordinator, one session on it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use qmesh_proto::codec::{write_frame, ReadFrameError};
use qmesh_proto::codes::{ConnCode, StreamCode};
use qmesh_proto::msg::{ClientSession, Failure, Open, OpenAnswer, PathMode, Ready, StreamRequest};
use qmesh_proto::{Address, Interface, Untrusted};
use quinn::{Endpoint, RecvStream, SendStream};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::{info, info_span, Instrument, Span};

use crate::channel::{Channel, IncomingChannel, Offer, Parts, PartsBox, Pending};
use crate::config::ClientConfig;
use crate::connect::{candidates, join, join_session, none_joined, Candidate, Session};
use crate::direct::Direct;
use crate::end::describe_end;
use crate::error::{ConnectError, OpenError};
use crate::events::{self, ChannelRef, Event};
use crate::quota::Gate;
use crate::reconnect::{self, After};
use crate::sync::lock;
use qmesh_proto::codec::{read_within, Read};

/// A connected qmesh client. Cheap to clone; the client leaves when the
/// last clone is dropped or [`Client::close`] is called.
///
/// A lost session is reconnected by itself (see [`crate::Reconnect`]):
/// the client joins again under its name with its interfaces, and
/// [`Client::state`] reports each attempt. Channels of the lost session
/// end [lost](crate::ChannelEnd::Lost); new opens and offers use the new
/// one.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A [`Client`] that does not keep it alive: what a group membership or a
/// presence watch holds to join again after a reconnect.
#[derive(Debug, Clone)]
pub(crate) struct WeakClient(Weak<Inner>);

impl WeakClient {
    /// The client, while it lives.
    pub(crate) fn upgrade(&self) -> Option<Client> {
        self.0.upgrade().map(|inner| Client { inner })
    }
}

/// Where a client's session with the coordinator stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Joined: the coordinator's session number.
    Up {
        /// The session number the coordinator assigned.
        session: u64,
    },
    /// Joined, and the coordinator said it is going away (it is stopping or
    /// restarting): it takes no new channels, live ones may run for
    /// `within`, then the session ends and the client joins again.
    Leaving {
        /// The session number the coordinator assigned.
        session: u64,
        /// How long the coordinator lets live channels run.
        within: std::time::Duration,
    },
    /// The session was lost; attempt `attempt` (1 for the first) to join
    /// again is waiting or under way.
    Reconnecting {
        /// Which attempt.
        attempt: u32,
        /// The coordinator address this attempt tries; for a name, with
        /// the address it resolved to: `quic/coord.example.com:7447
        /// (192.0.2.10:7447)`.
        to: String,
        /// Why the session was lost, or why the last attempt failed.
        cause: String,
    },
    /// Over for good: the client left, was refused, or ran out of attempts.
    Ended {
        /// Why, as [`Client::closed`] reports it.
        reason: String,
    },
}

#[derive(Debug)]
struct Inner {
    name: String,
    /// Where the latest session is (or was).
    current: Mutex<Spot>,
    config: ClientConfig,
    /// A certificate that replaces `config`'s for the sessions still to
    /// come (a renewal while the client runs).
    identity: Mutex<Option<Arc<qmesh_certs::Identity>>>,
    endpoint: Endpoint,
    /// Whether `endpoint` was made for this client alone.
    owns_endpoint: bool,
    /// The latest session: the current one while `state` is
    /// [`SessionState::Up`].
    session: Mutex<Session>,
    state: watch::Sender<SessionState>,
    /// The interfaces this client offers, said again in each hello.
    interfaces: Mutex<Vec<Interface>>,
    /// Direct connections, when this client takes direct channels.
    direct: Option<Arc<Direct>>,
    /// The fingerprint of this client's certificate.
    fingerprint: qmesh_certs::Fingerprint,
    incoming: tokio::sync::Mutex<mpsc::Receiver<IncomingChannel>>,
    /// Handed to each session's driver: offers from every session arrive
    /// on `incoming`.
    incoming_tx: mpsc::Sender<IncomingChannel>,
    /// Quotas on offered interfaces, by name.
    gates: HashMap<String, Arc<Gate>>,
    /// Waits for each session's end and reconnects.
    supervisor: Mutex<Option<JoinHandle<()>>>,
    span: Span,
}

/// The coordinator a client's latest session is (or was) on, where its
/// next reconnect starts.
#[derive(Debug)]
struct Spot {
    /// The configured address and the address it resolved to.
    on: Candidate,
    /// Start at the one after `on`: its coordinator said it is going away.
    next: bool,
}

impl Inner {
    /// The configuration a new session joins with: the client's, with a
    /// renewed certificate when [`Client::set_identity`] gave one.
    fn session_config(&self) -> ClientConfig {
        let mut config = self.config.clone();
        if let Some(identity) = lock(&self.identity).clone() {
            config.identity = Some(identity);
        }
        config
    }

    /// The coordinator address the latest session is (or was) on.
    fn coordinator(&self) -> String {
        lock(&self.current).on.address.to_string()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.supervisor).take() {
            t.abort();
        }
        if let Some(d) = &self.direct {
            d.close_all();
        }
        lock(&self.session)
            .conn
            .close(ConnCode::Normal.varint(), b"client dropped");
        // An endpoint of this client's own: close it, or the direct accept
        // loop keeps it (its socket and buffers) alive after the client.
        if self.owns_endpoint {
            self.endpoint
                .close(ConnCode::Normal.varint(), b"client dropped");
        }
    }
}

impl Client {
    /// Connect to the coordinator and join under `config.name`, on a UDP
    /// socket of its own.
    pub async fn connect(config: ClientConfig) -> Result<Client, ConnectError> {
        Self::connect_on(None, config).await
    }

    /// Queue a frame for the session stream.
    pub(crate) async fn session_send(&self, msg: ClientSession) -> Result<(), String> {
        let session = self.session()?;
        session
            .session_tx
            .send(msg)
            .await
            .map_err(|_| session_error(&session))
    }

    /// Connect as [`Client::connect`] does, over `endpoint` when given, so
    /// that many clients in one process can share a few UDP sockets.
    pub async fn connect_on(
        endpoint: Option<&Endpoint>,
        config: ClientConfig,
    ) -> Result<Client, ConnectError> {
        let span = info_span!("client", id = %config.name);
        let endpoint = endpoint.cloned();
        let events = config.events.clone();
        let name = config.name.clone();
        // Bounded inside: each lookup and each attempt has the connect
        // timeout, and how many addresses there are is known only once
        // the names are resolved.
        let outcome = Self::connect_inner(endpoint, config, span.clone())
            .instrument(span)
            .await;
        events::emit(&events, || match &outcome {
            Ok(c) => Event::Connected {
                name,
                session: c.session_id(),
            },
            Err(e) => Event::ConnectError {
                name,
                message: e.to_string(),
            },
        });
        if let Ok(c) = &outcome {
            c.supervise();
        }
        outcome
    }

    async fn connect_inner(
        endpoint: Option<Endpoint>,
        config: ClientConfig,
        span: Span,
    ) -> Result<Client, ConnectError> {
        let (incoming_tx, incoming) = mpsc::channel(config.incoming_backlog.max(1));
        let interfaces = config.interfaces.clone();
        let (base, session, at) = join(endpoint, &config, &interfaces, &incoming_tx, &span).await?;
        let gates = config
            .quotas
            .iter()
            .map(|(name, q)| (name.clone(), Gate::new(name, *q)))
            .collect();
        Ok(Client {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                current: Mutex::new(Spot {
                    on: at,
                    next: false,
                }),
                identity: Mutex::new(None),
                state: watch::Sender::new(SessionState::Up {
                    session: session.id,
                }),
                session: Mutex::new(session),
                interfaces: Mutex::new(interfaces),
                config,
                endpoint: base.endpoint,
                owns_endpoint: base.owns_endpoint,
                direct: base.direct,
                fingerprint: base.fingerprint,
                incoming: tokio::sync::Mutex::new(incoming),
                incoming_tx,
                gates,
                supervisor: Mutex::new(None),
                span,
            }),
        })
    }

    /// Start the task that waits for each session's end and reconnects.
    fn supervise(&self) {
        let weak = Arc::downgrade(&self.inner);
        let task = tokio::spawn(supervise(weak).instrument(self.inner.span.clone()));
        *lock(&self.inner.supervisor) = Some(task);
    }

    /// The current session, or why there is none.
    pub(crate) fn session(&self) -> Result<Session, String> {
        let state = self.inner.state.borrow();
        match &*state {
            SessionState::Up { .. } | SessionState::Leaving { .. } => {
                Ok(lock(&self.inner.session).clone())
            }
            SessionState::Reconnecting { attempt, cause, .. } => Err(format!(
                "the session with the coordinator was lost ({cause}); reconnecting (attempt {attempt})"
            )),
            SessionState::Ended { reason } => Err(reason.clone()),
        }
    }

    /// Where this client's session stands; `changed()` on the receiver
    /// fires at each loss, attempt, reconnect and at the end.
    pub fn state(&self) -> watch::Receiver<SessionState> {
        self.inner.state.subscribe()
    }

    /// This client's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The session number the coordinator assigned to the latest session.
    pub fn session_id(&self) -> u64 {
        lock(&self.inner.session).id
    }

    /// This client's address as the coordinator saw it in the latest
    /// session.
    pub fn observed_addr(&self) -> SocketAddr {
        lock(&self.inner.session).observed
    }

    /// The peers this client has a direct connection to, with their
    /// addresses; `changed()` on the receiver fires as links come and go.
    /// Always empty for a client that does not take direct channels.
    pub fn direct_links(&self) -> watch::Receiver<BTreeMap<String, SocketAddr>> {
        match &self.inner.direct {
            Some(d) => d.links(),
            None => watch::Sender::new(BTreeMap::new()).subscribe(),
        }
    }

    /// Close the direct connection to `peer`. Its `auto` channels carry on
    /// through the relay (their path events fire); its direct-only channels
    /// are lost. Returns whether there was one.
    pub fn drop_direct(&self, peer: &str) -> bool {
        self.inner
            .direct
            .as_ref()
            .is_some_and(|d| d.drop_link(peer))
    }

    /// The fingerprint of the certificate this client presents: what the
    /// coordinator vouches for when it introduces this client to peers.
    pub fn fingerprint(&self) -> qmesh_certs::Fingerprint {
        self.inner.fingerprint
    }

    /// Whether this client takes direct channels (it has its own endpoint
    /// and direct channels are enabled).
    pub fn takes_direct(&self) -> bool {
        self.inner.direct.is_some()
    }

    fn parts(
        &self,
        session: &Session,
        peer: String,
        name: String,
        label: String,
        mode: PathMode,
    ) -> Parts {
        let c = &self.inner.config;
        Parts {
            conn: session.conn.clone(),
            closed_why: session.closed_why.clone(),
            routes: session.routes.clone(),
            peer,
            name,
            label,
            max_message: self.inner.config.max_message,
            close_timeout: self.inner.config.close_timeout,
            max_streams: self.inner.config.tuning.stream_ceiling as usize,
            direct: self.inner.direct.clone(),
            mode,
            events: c.events.clone(),
            request_timeout: c.request_timeout,
            max_requests: c.max_requests.max(1),
            message_backlog: c.message_backlog,
            quota: None,
            defer_ready: false,
        }
    }

    /// Open a bidirectional stream to the coordinator and write `first`
    /// on it: the start of a describe, presence, join or member count.
    pub(crate) async fn request_stream(
        &self,
        first: &StreamRequest,
    ) -> Result<(SendStream, RecvStream), OpenError> {
        let session = self.session().map_err(OpenError::Session)?;
        self.request_stream_in(&session, first).await
    }

    async fn request_stream_in(
        &self,
        session: &Session,
        first: &StreamRequest,
    ) -> Result<(SendStream, RecvStream), OpenError> {
        let (mut send, recv) = session
            .conn
            .open_bi()
            .await
            .map_err(|_| OpenError::Session(session_error(session)))?;
        write_frame(&mut send, first)
            .await
            .map_err(|_| OpenError::Session(session_error(session)))?;
        Ok((send, recv))
    }

    /// As [`Client::request_stream`], also returning the connection the
    /// stream is on: a membership or a subscription made on it is over
    /// once that connection has closed.
    pub(crate) async fn request_stream_on(
        &self,
        first: &StreamRequest,
    ) -> Result<(SendStream, RecvStream, quinn::Connection), OpenError> {
        let session = self.session().map_err(OpenError::Session)?;
        let (send, recv) = self.request_stream_in(&session, first).await?;
        Ok((send, recv, session.conn))
    }

    /// Wait until the client has a session whose connection is open; the
    /// client's end if it ends instead.
    pub(crate) async fn wait_up(&self) -> Result<(), String> {
        let mut state = self.inner.state.subscribe();
        loop {
            let now = state.borrow_and_update().clone();
            match now {
                SessionState::Ended { reason } => return Err(reason),
                SessionState::Up { .. }
                    if lock(&self.inner.session).conn.close_reason().is_none() =>
                {
                    return Ok(())
                }
                _ => {}
            }
            if state.changed().await.is_err() {
                return Err("the client is gone".into());
            }
        }
    }

    /// A handle that does not keep the client alive.
    pub(crate) fn downgrade(&self) -> WeakClient {
        WeakClient(Arc::downgrade(&self.inner))
    }

    /// The coordinator's next answer on a stream from
    /// [`Client::request_stream`], within the open timeout. A frame that
    /// is not a `T` is a protocol error.
    pub(crate) async fn next_answer<T: DeserializeOwned>(
        &self,
        recv: &mut RecvStream,
    ) -> Result<T, OpenError> {
        let limit = self.inner.config.open_timeout;
        match read_within(tokio::time::Instant::now() + limit, recv).await {
            Read::Frame(answer) => Ok(answer),
            Read::Failed(ReadFrameError::Decode(e)) => Err(OpenError::Protocol(e.to_string())),
            Read::Finished | Read::Failed(_) => Err(OpenError::Session(
                self.session()
                    .err()
                    .unwrap_or_else(|| "the stream ended".into()),
            )),
            Read::Late => Err(OpenError::Timeout {
                secs: limit.as_secs(),
            }),
        }
    }

    /// Open channel `mesh/peer!channel` with path [`PathMode::Auto`] and
    /// wait until the peer accepts.
    ///
    /// Fails at once with [`PeerNotPresent`](qmesh_proto::codes::OpenFailCode::PeerNotPresent) when no client
    /// of that name is connected, and with [`Refused`](qmesh_proto::codes::OpenFailCode::Refused) and the
    /// peer's reason when it refuses.
    pub async fn open(&self, address: &Address) -> Result<Channel, OpenError> {
        self.open_with(address, PathMode::Auto).await
    }

    /// Open a channel on the path `mode` asks for:
    ///
    /// - [`PathMode::Auto`]: ready as soon as the peer accepts, relayed;
    ///   data moves to a direct path once one is up
    ///   ([`Channel::watch_path`] reports it).
    /// - [`PathMode::Direct`]: ready only once the direct path is up; fails
    ///   with [`OpenError::DirectUnavailable`] (and closes the channel) when
    ///   none comes up within [`crate::config::DirectConfig::timeout`].
    /// - [`PathMode::Relay`]: always through the coordinator.
    pub async fn open_with(&self, address: &Address, mode: PathMode) -> Result<Channel, OpenError> {
        let outcome = self.open_inner(address, mode).await;
        match &outcome {
            Ok(ch) => ch.report_ready(),
            Err(e) => {
                let (peer, name) = address
                    .mesh()
                    .map(|(p, c)| (p.to_owned(), c.to_owned()))
                    .unwrap_or_else(|_| (String::new(), address.to_string()));
                let channel = ChannelRef {
                    label: format!("{}>{}!{}", self.inner.name, peer, name),
                    peer,
                    name,
                };
                events::emit(&self.inner.config.events, || Event::OpenError {
                    channel,
                    message: e.to_string(),
                });
            }
        }
        outcome
    }

    async fn open_inner(&self, address: &Address, mode: PathMode) -> Result<Channel, OpenError> {
        let (peer, channel) = address.mesh()?;
        let label = format!("{}>{}!{}", self.inner.name, peer, channel);
        let span = info_span!(parent: &self.inner.span, "channel", id = %label);
        async {
            let session = self.session().map_err(OpenError::Session)?;
            let (mut send, mut recv) = session
                .conn
                .open_bi()
                .await
                .map_err(|_| OpenError::Session(session_error(&session)))?;
            let mut parts = self.parts(
                &session,
                peer.to_owned(),
                channel.to_owned(),
                label.clone(),
                mode,
            );
            // Ready is reported once open returns it.
            parts.defer_ready = true;
            let pending = Pending::register(parts, &send);
            let open = StreamRequest::Open(Open {
                peer: peer.into(),
                channel: channel.into(),
                path: mode,
            });
            if write_frame(&mut send, &open).await.is_err() {
                pending.abandon();
                return Err(OpenError::Session(session_error(&session)));
            }
            let secs = self.inner.config.open_timeout.as_secs();
            match read_within(
                tokio::time::Instant::now() + self.inner.config.open_timeout,
                &mut recv,
            )
            .await
            {
                Read::Frame(OpenAnswer::Ready(Ready {
                    channel: number,
                    peer: intro,
                    interface,
                })) => {
                    let offer = Offer {
                        interface,
                        offerer: false,
                    };
                    let ch = pending.ready((send, recv), None, number, intro, offer);
                    if mode != PathMode::Direct {
                        return Ok(ch);
                    }
                    let limit = self.inner.config.direct.timeout;
                    match ch.wait_direct(limit).await {
                        Ok(()) => Ok(ch),
                        Err(reason) => {
                            info!(cause = %Untrusted::reason(&reason), "direct-only channel without a direct path");
                            let _ = timeout(
                                self.inner.config.close_timeout,
                                ch.close(&format!("no direct path: {reason}")),
                            )
                            .await;
                            Err(OpenError::DirectUnavailable {
                                peer: peer.to_owned(),
                                reason,
                            })
                        }
                    }
                }
                Read::Frame(OpenAnswer::Failed(Failure { code, message })) => {
                    pending.abandon();
                    info!(code = ?code, cause = %Untrusted::reason(&message), "open failed");
                    Err(OpenError::Failed { code, message })
                }
                Read::Failed(ReadFrameError::Decode(e)) => {
                    pending.abandon();
                    Err(OpenError::Protocol(e.to_string()))
                }
                Read::Finished | Read::Failed(_) => {
                    pending.abandon();
                    Err(OpenError::Session(session_error(&session)))
                }
                Read::Late => {
                    pending.abandon();
                    let _ = send.reset(StreamCode::Cancelled.varint());
                    Err(OpenError::Timeout { secs })
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Open a channel by address text, e.g. `"mesh/bob!chat"`.
    pub async fn open_str(&self, address: &str) -> Result<Channel, OpenError> {
        let address: Address = address.parse()?;
        self.open(&address).await
    }

    /// The next channel a peer wants to open with this client, or `None`
    /// once the session has ended.
    ///
    /// An offer for an interface at its channel quota is refused here, with
    /// a reason that says so, and not returned.
    pub async fn accept(&self) -> Option<IncomingChannel> {
        let mut incoming = self.inner.incoming.lock().await;
        let mut state = self.inner.state.subscribe();
        loop {
            let mut offer = tokio::select! {
                offer = incoming.recv() => offer?,
                _ = state.wait_for(|s| matches!(s, SessionState::Ended { .. })) => return None,
            };
            // An offer from a session that has since been lost: its
            // streams are gone with it.
            let Some(session) = self
                .session()
                .ok()
                .filter(|s| s.generation == offer.generation)
            else {
                continue;
            };
            let quota = match self.inner.gates.get(&offer.channel) {
                Some(gate) => match gate.take_channel() {
                    Ok(slot) => Some(slot),
                    Err(why) => {
                        info!(parent: &self.inner.span, from = %Untrusted::name(&offer.from), cause = %why, "refusing a channel over quota");
                        offer.refuse(&why).await;
                        continue;
                    }
                },
                None => None,
            };
            // The label names the channel's span in log lines: the names
            // the coordinator sent are shown escaped.
            let label = format!(
                "{}>{}!{}",
                Untrusted::name(&offer.from),
                self.inner.name,
                Untrusted::name(&offer.channel)
            );
            let mut parts = self.parts(
                &session,
                offer.from.clone(),
                offer.channel.clone(),
                label,
                offer.mode,
            );
            parts.quota = quota;
            offer.parts = Some(PartsBox(parts));
            return Some(offer);
        }
    }

    /// Leave: close the connection with a normal code and `reason`, and
    /// stop reconnecting. On an endpoint of its own, also wait (up to 2 s)
    /// until the close has been sent; a shared endpoint is its owner's to
    /// drain.
    pub async fn close(&self, reason: &str) {
        info!(parent: &self.inner.span, reason, "leaving");
        if let Some(d) = &self.inner.direct {
            d.close_all();
        }
        // Between sessions there is no connection to close: the end is
        // this.
        let between = self.inner.state.send_if_modified(|s| match s {
            SessionState::Reconnecting { .. } => {
                *s = SessionState::Ended {
                    reason: format!("closed locally while reconnecting: {reason}"),
                };
                true
            }
            _ => false,
        });
        if between {
            events::emit(&self.inner.config.events, || Event::SessionEnded {
                name: self.inner.name.clone(),
                reason: format!("closed locally while reconnecting: {reason}"),
            });
        }
        let conn = lock(&self.inner.session).conn.clone();
        conn.close(ConnCode::Normal.varint(), reason.as_bytes());
        if self.inner.owns_endpoint {
            let _ = timeout(
                std::time::Duration::from_secs(2),
                self.inner.endpoint.wait_idle(),
            )
            .await;
        }
    }

    /// Wait until the client's session is over for good and say why: it
    /// left, was refused, or (with reconnecting off, or its attempts used
    /// up) lost its session.
    pub async fn closed(&self) -> String {
        let mut state = self.inner.state.subscribe();
        let ended = state
            .wait_for(|s| matches!(s, SessionState::Ended { .. }))
            .await;
        match ended.as_deref() {
            Ok(SessionState::Ended { reason }) => reason.clone(),
            _ => "the client is gone".into(),
        }
    }

    /// Replace the interfaces this client offers, here and in every later
    /// hello.
    pub(crate) fn remember_interfaces(&self, list: &[Interface]) {
        *lock(&self.inner.interfaces) = list.to_vec();
    }

    /// Present `identity` in every session from now on (the current one
    /// keeps its certificate): how a certificate renewed while the client
    /// runs reaches its reconnects.
    pub fn set_identity(&self, identity: Arc<qmesh_certs::Identity>) {
        *lock(&self.inner.identity) = Some(identity);
    }

    /// The coordinator address the latest session is (or was) on, as
    /// configured.
    pub fn coordinator(&self) -> String {
        self.inner.coordinator()
    }

    /// The UDP address of the coordinator the latest session is (or was)
    /// on: for a name that resolves to several addresses, the one that
    /// joined.
    pub fn coordinator_addr(&self) -> SocketAddr {
        lock(&self.inner.current).on.addr
    }
}

/// Why `session`'s connection failed, as a sentence.
fn session_error(session: &Session) -> String {
    match session.conn.close_reason() {
        Some(c) => describe_end(&c, &session.closed_why),
        None => "the session is closing".into(),
    }
}

/// Wait for each session's end; reconnect while the end is worth another
/// try and [`Reconnect`] allows, and end the client otherwise. Holds the
/// client only weakly, between steps, so that dropping the last
/// [`Client`] ends it.
async fn supervise(weak: Weak<Inner>) {
    loop {
        let Some(session) = weak.upgrade().map(|inner| lock(&inner.session).clone()) else {
            return;
        };
        let mut leaving = session.leaving.clone();
        let err = tokio::select! {
            err = session.conn.closed() => err,
            Some(within) = async { leaving.wait_for(Option::is_some).await.ok().map(|w| w.unwrap_or_default()) } => {
                if let Some(inner) = weak.upgrade() {
                    going_away(&inner, session.id, within);
                }
                session.conn.closed().await
            }
        };
        let cause = describe_end(&err, &session.closed_why);
        let after = reconnect::after_session(&err, session.closed_why.get().is_some());
        drop(session);
        let Some(inner) = weak.upgrade() else { return };
        if matches!(*inner.state.borrow(), SessionState::Ended { .. }) {
            return;
        }
        if after == After::Stop || !inner.config.reconnect.enabled {
            end(&inner, cause);
            return;
        }
        drop(inner);
        match rejoin(&weak, cause).await {
            Some(()) => continue,
            None => return,
        }
    }
}

/// The coordinator of session `id` said it is going away: live channels
/// may run for `within`.
fn going_away(inner: &Inner, id: u64, within: std::time::Duration) {
    if !matches!(*inner.state.borrow(), SessionState::Up { session } if session == id) {
        return;
    }
    // Another coordinator, when there is one, is the first to try next.
    lock(&inner.current).next = true;
    events::emit(&inner.config.events, || Event::GoingAway {
        name: inner.name.clone(),
        within,
    });
    inner.state.send_if_modified(|s| {
        if !matches!(s, SessionState::Up { session } if *session == id) {
            return false;
        }
        *s = SessionState::Leaving {
            session: id,
            within,
        };
        true
    });
}

/// End the client for good with `reason`.
fn end(inner: &Inner, reason: String) {
    info!(cause = %Untrusted::reason(&reason), "session over");
    // The event first: whoever wakes on the state finds it reported.
    events::emit(&inner.config.events, || Event::SessionEnded {
        name: inner.name.clone(),
        reason: reason.clone(),
    });
    inner.state.send_replace(SessionState::Ended { reason });
}

/// Join again after the session was lost with `cause`: attempts with
/// backoff until one joins (`Some`), a refusal or the attempt limit ends
/// the client, or the client is closed or dropped (`None`).
///
/// Each attempt resolves the coordinator addresses again (a name's
/// addresses can change) and tries one of them: the one the lost session
/// was on first, then each other in turn.
async fn rejoin(weak: &Weak<Inner>, mut cause: String) -> Option<()> {
    let lost = tokio::time::Instant::now();
    let mut attempt: u32 = 0;
    loop {
        attempt = attempt.saturating_add(1);
        let (config, last, next) = {
            let inner = weak.upgrade()?;
            if inner
                .config
                .reconnect
                .limit
                .is_some_and(|limit| attempt > limit)
            {
                end(
                    &inner,
                    format!(
                        "the session with the coordinator was lost and {} attempts to join again failed; the last: {cause}",
                        attempt - 1
                    ),
                );
                return None;
            }
            let spot = lock(&inner.current);
            (inner.session_config(), spot.on.clone(), spot.next)
        };
        let target = match candidates(&config.addresses(), config.connect_timeout, &config.resolve)
            .await
        {
            Ok((list, _)) if !list.is_empty() => {
                let keys: Vec<_> = list.iter().map(|c| (c.index, c.addr)).collect();
                let start = reconnect::position(&keys, (last.index, last.addr)) + usize::from(next);
                Ok(list[reconnect::address_for(attempt, start, list.len())].clone())
            }
            Ok((_, unresolved)) => Err(none_joined(unresolved)),
            Err(e) => Err(e),
        };
        let (policy, mut state, endpoint, direct, interfaces, incoming, span, generation) = {
            let inner = weak.upgrade()?;
            let to = match &target {
                Ok(candidate) => candidate.to_string(),
                Err(_) => last.address.to_string(),
            };
            let moved = inner.state.send_if_modified(|s| {
                if matches!(s, SessionState::Ended { .. }) {
                    return false;
                }
                *s = SessionState::Reconnecting {
                    attempt,
                    to: to.clone(),
                    cause: cause.clone(),
                };
                true
            });
            if !moved {
                return None;
            }
            info!(attempt, cause = %Untrusted::reason(&cause), "reconnecting to {to}");
            events::emit(&inner.config.events, || Event::Reconnecting {
                name: inner.name.clone(),
                attempt,
                cause: cause.clone(),
            });
            let generation = lock(&inner.session).generation + 1;
            let interfaces = lock(&inner.interfaces).clone();
            (
                inner.config.reconnect,
                inner.state.subscribe(),
                inner.endpoint.clone(),
                inner.direct.is_some(),
                interfaces,
                inner.incoming_tx.clone(),
                inner.span.clone(),
                generation,
            )
        };
        let wait = policy.delay(attempt, reconnect::jitter());
        // A close while waiting ends the wait.
        let closed = state.wait_for(|s| matches!(s, SessionState::Ended { .. }));
        if timeout(wait, closed).await.is_ok() {
            return None;
        }
        let joined = match target {
            Ok(candidate) => timeout(
                config.connect_timeout,
                join_session(
                    generation,
                    &endpoint,
                    &candidate,
                    direct,
                    &config,
                    &interfaces,
                    &incoming,
                    &span,
                ),
            )
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError::Timeout {
                    addr: candidate.to_string(),
                    secs: config.connect_timeout.as_secs(),
                })
            })
            .map(|session| (session, candidate)),
            Err(e) => Err(e),
        };
        let inner = weak.upgrade()?;
        match joined {
            Ok((session, candidate)) => {
                if matches!(*inner.state.borrow(), SessionState::Ended { .. }) {
                    session
                        .conn
                        .close(ConnCode::Normal.varint(), b"client closed");
                    return None;
                }
                let id = session.id;
                *lock(&inner.session) = session;
                *lock(&inner.current) = Spot {
                    on: candidate,
                    next: false,
                };
                let after = lost.elapsed();
                info!(
                    session = id,
                    after_ms = after.as_millis() as u64,
                    "reconnected"
                );
                events::emit(&inner.config.events, || Event::Reconnected {
                    name: inner.name.clone(),
                    session: id,
                    after,
                });
                inner.state.send_replace(SessionState::Up { session: id });
                return Some(());
            }
            Err(e) => {
                cause = e.to_string();
                if reconnect::after_attempt(&e) == After::Stop {
                    end(&inner, cause);
                    return None;
                }
            }
        }
    }
}
