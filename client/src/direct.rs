//! Direct connections: one QUIC connection per pair of clients, carrying
//! the data streams of all their direct channels.
//!
//! When the coordinator introduces a peer (in a channel's `Ready`), both
//! clients punch: they send small datagrams from their QUIC socket to every
//! address the coordinator gave for the other, which opens the way through
//! NATs that map endpoint-independently. The client whose name sorts first
//! dials every candidate address at once and keeps the first connection
//! whose handshake completes; the other waits for it. Both sides present
//! their own certificate and accept only the fingerprint the coordinator
//! vouched for. A link unused by any channel for the grace period closes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmesh_certs::transport::{StreamAllowance, StreamKind, Tuning};
use qmesh_certs::{Fingerprint, Identity};
use qmesh_proto::codes::{ConnCode, StreamCode};
use qmesh_proto::msg::{Close, DirectPipe, PeerIntro, StreamHeader};
use qmesh_proto::{ChannelId, SessionId, Untrusted};
use quinn::udp::Transmit;
use quinn::{AsyncUdpSocket, Connection, Endpoint, RecvStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn, Instrument, Span};

use crate::datagram::Flows;
use crate::end::Path;
use crate::pipe::Pipe;
use crate::routes::{Held, Route};
use crate::sync::lock;
use qmesh_proto::codec::{read_within, Read};

/// What a punch datagram carries. It does not parse as a QUIC packet (the
/// fixed bit is clear), so a QUIC endpoint that receives one drops it.
const PUNCH: &[u8] = b"\0qmesh-punch";

/// How often each side punches while a link is coming up.
const PUNCH_EVERY: Duration = Duration::from_millis(50);

/// The state of the direct link to one peer.
#[derive(Debug, Clone)]
pub(crate) enum Link {
    /// Punching and dialing (or waiting to be dialed).
    Connecting,
    /// Up: new data streams go on this connection.
    Up(Connection),
    /// No direct path (never came up, or went away): why.
    Down(String),
}

/// The direct link to one peer, shared by the channels that use it.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) name: String,
    fingerprint: Fingerprint,
    state: watch::Sender<Link>,
    /// The peer's session at the coordinator this link was made for (the
    /// newest, when a link held across a reconnect was kept for it).
    session: Mutex<SessionId>,
    /// Channels held on this link while the coordinator is away
    /// (protocol.md §8.9): while there are any, a new session of the peer
    /// does not replace the link.
    holding: Mutex<usize>,
    /// Live connections (the dialer's race can leave the listener with more
    /// than one for a moment); the newest is the one in `state`.
    conns: Mutex<Vec<Connection>>,
    /// Channels using this link.
    users: Mutex<usize>,
}

impl Peer {
    /// Watch the link's state.
    pub(crate) fn watch(&self) -> watch::Receiver<Link> {
        self.state.subscribe()
    }

    /// The connection new streams should use, if the link is up.
    pub(crate) fn conn(&self) -> Option<Connection> {
        match &*self.state.borrow() {
            Link::Up(c) if c.close_reason().is_none() => Some(c.clone()),
            _ => None,
        }
    }
}

/// A channel's use of a link; dropping it lets the link close after the
/// grace period once no channel uses it.
#[derive(Debug)]
pub(crate) struct LinkUse {
    direct: Arc<Direct>,
    pub(crate) peer: Arc<Peer>,
    /// The channel is held on this link (protocol.md §8.9).
    held: std::sync::atomic::AtomicBool,
}

impl LinkUse {
    fn new(direct: Arc<Direct>, peer: Arc<Peer>) -> Self {
        Self {
            direct,
            peer,
            held: false.into(),
        }
    }

    /// The channel is now held on this link: keep the link across a new
    /// session of the peer while it lives.
    pub(crate) fn hold(&self) {
        if !self.held.swap(true, std::sync::atomic::Ordering::AcqRel) {
            *lock(&self.peer.holding) += 1;
        }
    }
}

impl Drop for LinkUse {
    fn drop(&mut self) {
        if *self.held.get_mut() {
            let mut holding = lock(&self.peer.holding);
            *holding = holding.saturating_sub(1);
        }
        self.direct.release(&self.peer);
    }
}

/// Direct connections of one client, on the client's own endpoint.
#[derive(Debug)]
pub(crate) struct Direct {
    endpoint: Endpoint,
    socket: Arc<dyn AsyncUdpSocket>,
    identity: Arc<Identity>,
    /// Introduced peers, by certificate fingerprint: the only certificates
    /// accepted on incoming direct connections.
    peers: Arc<Mutex<HashMap<Fingerprint, Arc<Peer>>>>,
    /// Where data streams of each channel go, by the coordinator's channel
    /// number, with the fingerprint of the only peer that may send them.
    routes: Mutex<HashMap<ChannelId, (Fingerprint, Route)>>,
    /// Wakes stream routers waiting for a route to be registered.
    routed: Notify,
    /// The datagram ports of direct pipes (§20.4).
    flows: Arc<Flows>,
    tuning: Tuning,
    timeout: Duration,
    grace: Duration,
    header_timeout: Duration,
    links: watch::Sender<BTreeMap<String, SocketAddr>>,
    span: Span,
}

/// The fingerprint set a direct endpoint's TLS verifier consults.
pub(crate) type PeerSet = Arc<Mutex<HashMap<Fingerprint, Arc<Peer>>>>;

/// Options of [`Direct::new`].
pub(crate) struct DirectParts {
    pub(crate) endpoint: Endpoint,
    pub(crate) socket: Arc<dyn AsyncUdpSocket>,
    pub(crate) identity: Arc<Identity>,
    pub(crate) peers: PeerSet,
    pub(crate) tuning: Tuning,
    pub(crate) timeout: Duration,
    pub(crate) grace: Duration,
    pub(crate) header_timeout: Duration,
    pub(crate) span: Span,
}

impl Direct {
    /// The datagram ports of this endpoint's direct pipes.
    pub(crate) fn flows(&self) -> Arc<Flows> {
        self.flows.clone()
    }

    /// Start accepting direct connections on `parts.endpoint`.
    pub(crate) fn start(parts: DirectParts) -> Arc<Direct> {
        let direct = Arc::new(Direct {
            endpoint: parts.endpoint,
            socket: parts.socket,
            identity: parts.identity,
            peers: parts.peers,
            routes: Mutex::new(HashMap::new()),
            routed: Notify::new(),
            flows: Arc::default(),
            tuning: parts.tuning,
            timeout: parts.timeout,
            grace: parts.grace,
            header_timeout: parts.header_timeout,
            links: watch::Sender::new(BTreeMap::new()),
            span: parts.span,
        });
        let weak = Arc::downgrade(&direct);
        let endpoint = direct.endpoint.clone();
        tokio::spawn(
            async move {
                while let Some(incoming) = endpoint.accept().await {
                    let Some(direct) = weak.upgrade() else { break };
                    if lock(&direct.peers).is_empty() {
                        // Nobody introduced: nothing to handshake for.
                        incoming.refuse();
                        continue;
                    }
                    tokio::spawn(direct.clone().accepted(incoming).in_current_span());
                }
            }
            .instrument(direct.span.clone()),
        );
        direct
    }

    /// The peers with a live direct connection, and their addresses.
    pub(crate) fn links(&self) -> watch::Receiver<BTreeMap<String, SocketAddr>> {
        self.links.subscribe()
    }

    /// The time a direct path may take to come up.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Use the link to the peer `name` the coordinator introduced, bringing
    /// it up if there is none.
    pub(crate) fn link(self: &Arc<Self>, name: &str, intro: &PeerIntro) -> LinkUse {
        let fingerprint = Fingerprint(intro.fingerprint);
        let mut peers = lock(&self.peers);
        if let Some(peer) = peers.get(&fingerprint) {
            let down = matches!(*peer.state.borrow(), Link::Down(_));
            let same = *lock(&peer.session) == intro.session;
            let holding = *lock(&peer.holding) > 0;
            if !down && (same || holding) {
                if !same {
                    // Channels held across the coordinator's absence prove
                    // the link alive: it serves the peer's new session too.
                    info!(parent: &self.span, peer = %Untrusted::name(&name), "the peer has a new session; keeping the direct link its held channels use");
                    *lock(&peer.session) = intro.session;
                }
                *lock(&peer.users) += 1;
                return LinkUse::new(self.clone(), peer.clone());
            }
            if !down {
                // The peer has a new session (it restarted or reconnected,
                // perhaps at a new address): the old link may be dead
                // without knowing it yet. Replace it.
                info!(parent: &self.span, peer = %Untrusted::name(&name), "the peer has a new session; replacing its direct link");
                for conn in lock(&peer.conns).iter() {
                    conn.close(ConnCode::Normal.varint(), b"the peer has a new session");
                }
            }
        }
        let peer = Arc::new(Peer {
            name: name.to_owned(),
            fingerprint,
            state: watch::Sender::new(Link::Connecting),
            session: Mutex::new(intro.session),
            holding: Mutex::new(0),
            conns: Mutex::new(Vec::new()),
            users: Mutex::new(1),
        });
        peers.insert(fingerprint, peer.clone());
        drop(peers);
        let candidates = self.candidates(intro);
        info!(parent: &self.span, peer = %Untrusted::name(&name), dial = intro.dial, candidates = ?candidates, "bringing up a direct path");
        tokio::spawn(
            self.clone()
                .establish(peer.clone(), candidates, intro.dial)
                .instrument(self.span.clone()),
        );
        LinkUse::new(self.clone(), peer)
    }

    /// The addresses worth trying: the observed one first, then the
    /// reported ones, of the socket's address family, without repeats.
    fn candidates(&self, intro: &PeerIntro) -> Vec<SocketAddr> {
        let v6 = self
            .endpoint
            .local_addr()
            .map(|a| a.is_ipv6())
            .unwrap_or(false);
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in std::iter::once(intro.observed).chain(intro.addrs.iter().copied()) {
            let usable = a.port() != 0 && !a.ip().is_unspecified() && (v6 || a.is_ipv4());
            if usable && !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    /// Punch, then dial or wait to be dialed, until the link is up or the
    /// timeout passes.
    async fn establish(self: Arc<Self>, peer: Arc<Peer>, candidates: Vec<SocketAddr>, dial: bool) {
        let deadline = Instant::now() + self.timeout;
        let punching = tokio::spawn(
            self.clone()
                .punch(peer.watch(), candidates.clone(), deadline),
        );
        let outcome = if dial {
            self.dial(&peer, &candidates, deadline).await
        } else {
            let mut state = peer.watch();
            let up = tokio::time::timeout_at(
                deadline,
                state.wait_for(|s| !matches!(s, Link::Connecting)),
            )
            .await;
            match up {
                Ok(_) => Ok(()),
                Err(_) => Err(format!(
                    "{} did not reach this client directly within {} s (tried to be reached at \
                     its NAT mapping; a symmetric NAT on either side prevents it)",
                    peer.name,
                    self.timeout.as_secs()
                )),
            }
        };
        punching.abort();
        if let Err(reason) = outcome {
            info!(peer = %Untrusted::name(&peer.name), cause = %Untrusted::reason(&reason), "no direct path");
            peer.state.send_if_modified(|s| {
                if matches!(s, Link::Connecting) {
                    *s = Link::Down(reason);
                    true
                } else {
                    false
                }
            });
            self.forget_if_down(&peer);
        }
    }

    /// Send punch datagrams to every candidate until the link is no longer
    /// coming up.
    async fn punch(
        self: Arc<Self>,
        mut state: watch::Receiver<Link>,
        candidates: Vec<SocketAddr>,
        deadline: Instant,
    ) {
        let mut tick = tokio::time::interval(PUNCH_EVERY);
        while Instant::now() < deadline {
            if !matches!(*state.borrow_and_update(), Link::Connecting) {
                return;
            }
            for &destination in &candidates {
                let t = Transmit {
                    destination,
                    ecn: None,
                    contents: PUNCH,
                    segment_size: None,
                    src_ip: None,
                };
                // Best effort: a full socket buffer just skips a punch.
                let _ = self.socket.try_send(&t);
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = state.changed() => {}
            }
        }
    }

    /// Dial every candidate at once and keep the first connection up. Each
    /// candidate is dialed again shortly after an attempt fails (the peer
    /// had not heard of us yet, or its NAT was still closed), until the
    /// deadline; a candidate that never answers does not hold up the rest.
    async fn dial(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        candidates: &[SocketAddr],
        deadline: Instant,
    ) -> Result<(), String> {
        let (mut config, report) =
            qmesh_certs::direct_client_config(&self.identity, peer.fingerprint)
                .map_err(|e| e.to_string())?;
        config.transport_config(direct_transport(&self.tuning));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut attempts = JoinSet::new();
        for &addr in candidates {
            let (endpoint, config, failures) =
                (self.endpoint.clone(), config.clone(), failures.clone());
            attempts.spawn(async move {
                loop {
                    let outcome = match endpoint.connect_with(config.clone(), addr, "qmesh-peer") {
                        Ok(connecting) => connecting.await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match outcome {
                        Ok(conn) => return Some((addr, conn)),
                        Err(e) => {
                            debug!(%addr, cause = %e, "dial failed; trying again");
                            let mut f = lock(&failures);
                            f.retain(|x| !x.starts_with(&format!("{addr}: ")));
                            f.push(format!("{addr}: {e}"));
                        }
                    }
                    if Instant::now() + PUNCH_EVERY * 2 >= deadline {
                        return None;
                    }
                    tokio::time::sleep(PUNCH_EVERY * 2).await;
                }
            });
        }
        let won = tokio::time::timeout_at(deadline, async {
            while let Some(done) = attempts.join_next().await {
                if let Ok(Some(found)) = done {
                    return Some(found);
                }
            }
            None
        })
        .await;
        // Losing attempts still in flight are dropped (and so abandoned).
        attempts.abort_all();
        if let Ok(Some((addr, conn))) = won {
            info!(peer = %Untrusted::name(&peer.name), %addr, "direct path up (dialed)");
            self.adopt(peer, conn);
            return Ok(());
        }
        let failures = lock(&failures).clone();
        let why = match report.failure() {
            Some(cert) => format!("a peer address presented the wrong certificate: {cert}"),
            None if failures.is_empty() => "no answer".to_owned(),
            None => failures.join("; "),
        };
        Err(format!(
            "no direct path to {} within {} s ({why}); tried {}",
            peer.name,
            self.timeout.as_secs(),
            candidates
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// An incoming direct connection: complete the handshake (the verifier
    /// admits only introduced fingerprints) and hand it to its peer.
    async fn accepted(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                debug!(%remote, cause = %e, "direct handshake refused");
                return;
            }
        };
        let conn = match timeout(self.timeout, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                info!(%remote, cause = %e, "direct handshake failed");
                return;
            }
            Err(_) => return,
        };
        let peer =
            qmesh_certs::peer_fingerprint(&conn).and_then(|fp| lock(&self.peers).get(&fp).cloned());
        let Some(peer) = peer else {
            // The introduction was withdrawn during the handshake.
            conn.close(ConnCode::NotAuthorised.varint(), b"not introduced");
            return;
        };
        info!(peer = %Untrusted::name(&peer.name), %remote, "direct path up (accepted)");
        self.adopt(&peer, conn);
    }

    /// Make `conn` the peer's current connection and serve its streams.
    fn adopt(self: &Arc<Self>, peer: &Arc<Peer>, conn: Connection) {
        lock(&peer.conns).push(conn.clone());
        peer.state.send_replace(Link::Up(conn.clone()));
        self.publish();
        tokio::spawn(
            self.clone()
                .serve(peer.clone(), conn)
                .instrument(self.span.clone()),
        );
    }

    /// Route the data streams the peer opens on `conn` until it closes;
    /// then fall back to another live connection or mark the link down.
    async fn serve(self: Arc<Self>, peer: Arc<Peer>, conn: Connection) {
        let allowance = StreamAllowance::new(
            conn.clone(),
            StreamKind::Uni,
            self.tuning.max_uni_streams,
            self.tuning.stream_ceiling,
        );
        let bi_allowance = StreamAllowance::new(
            conn.clone(),
            StreamKind::Bi,
            self.tuning.max_bidi_streams,
            self.tuning.stream_ceiling,
        );
        let reason = loop {
            tokio::select! {
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        let guard = allowance.opened();
                        let me = self.clone();
                        let fp = peer.fingerprint;
                        tokio::spawn(async move { me.route(recv, fp, guard).await }.in_current_span());
                    }
                    Err(e) => break qmesh_certs::transport::describe_close(&e),
                },
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let guard = bi_allowance.opened();
                        let me = self.clone();
                        let fp = peer.fingerprint;
                        let path = Path::Direct { remote: conn.remote_address() };
                        let pipe = Pipe::new(send, recv, path, Some((conn.clone(), self.flows.clone())), Some(guard));
                        tokio::spawn(async move { me.route_pipe(pipe, fp).await }.in_current_span());
                    }
                    Err(e) => break qmesh_certs::transport::describe_close(&e),
                },
                datagram = conn.read_datagram() => match datagram {
                    Ok(d) => self.flows.dispatch(&conn, d),
                    Err(e) => break qmesh_certs::transport::describe_close(&e),
                },
            }
        };
        let next = {
            let mut conns = lock(&peer.conns);
            conns.retain(|c| c.stable_id() != conn.stable_id() && c.close_reason().is_none());
            conns.last().cloned()
        };
        match next {
            Some(other) => {
                peer.state.send_replace(Link::Up(other));
            }
            None => {
                info!(peer = %Untrusted::name(&peer.name), cause = %Untrusted::reason(&reason), "direct path down");
                peer.state.send_replace(Link::Down(format!(
                    "direct connection to {} ended: {reason}",
                    peer.name
                )));
                self.forget_if_down(&peer);
            }
        }
        self.publish();
    }

    /// Hand one direct data stream to its channel, if `from` may send on it.
    async fn route(
        &self,
        mut recv: RecvStream,
        from: Fingerprint,
        guard: qmesh_certs::transport::StreamGuard,
    ) {
        let header =
            read_within(tokio::time::Instant::now() + self.header_timeout, &mut recv).await;
        let (channel, messages) = match header {
            Read::Frame(StreamHeader::Direct { channel }) => (channel, false),
            Read::Frame(StreamHeader::DirectMessages { channel }) => (channel, true),
            Read::Frame(StreamHeader::Hold { channel }) => {
                return self.held(channel, from, Held::Hold).await;
            }
            Read::Frame(StreamHeader::DirectClose { channel }) => {
                let deadline = tokio::time::Instant::now() + self.header_timeout;
                match read_within::<Close, _>(deadline, &mut recv).await {
                    Read::Frame(close) => {
                        return self.held(channel, from, Held::Close(close)).await
                    }
                    _ => {
                        let _ = recv.stop(StreamCode::Malformed.varint());
                        return;
                    }
                }
            }
            _ => {
                let _ = recv.stop(StreamCode::Malformed.varint());
                return;
            }
        };
        let Some(tx) = self.find_route(channel, from).await else {
            let _ = recv.stop(StreamCode::UnknownChannel.varint());
            return;
        };
        if let Err(mut recv) = tx.deliver(messages, (recv, guard)).await {
            let _ = recv.stop(StreamCode::ChannelEnded.varint());
        }
    }

    /// Hand the peer's word about held channel `channel` to it, if `from`
    /// is its peer.
    async fn held(&self, channel: ChannelId, from: Fingerprint, held: Held) {
        match self.find_route(channel, from).await {
            Some(tx) => {
                if !tx.deliver_held(held) {
                    debug!(%channel, "a held-channel message the channel did not take");
                }
            }
            None => debug!(%channel, "a held-channel message for an unknown channel"),
        }
    }

    /// Hand one direct pipe to its channel, if `from` may open it.
    async fn route_pipe(&self, mut pipe: Pipe, from: Fingerprint) {
        let (_, recv) = pipe.halves();
        let header = read_within(tokio::time::Instant::now() + self.header_timeout, recv).await;
        let code = match header {
            Read::Frame(DirectPipe { channel }) => match self.find_route(channel, from).await {
                Some(tx) => match tx.deliver_pipe(pipe).await {
                    Ok(()) => return,
                    Err(back) => {
                        pipe = back;
                        StreamCode::ChannelEnded
                    }
                },
                None => StreamCode::UnknownChannel,
            },
            _ => StreamCode::Malformed,
        };
        let (send, recv) = pipe.halves();
        let _ = send.reset(code.varint());
        let _ = recv.stop(code.varint());
    }

    /// The route of channel `channel`, when `from` is its peer. The peer
    /// may have learnt of the channel before this side did, so this waits
    /// (bounded) for the route.
    async fn find_route(&self, channel: ChannelId, from: Fingerprint) -> Option<Route> {
        let found = timeout(self.header_timeout, async {
            loop {
                let notified = self.routed.notified();
                if let Some(r) = lock(&self.routes).get(&channel).cloned() {
                    return r;
                }
                notified.await;
            }
        })
        .await;
        let Ok((owner, tx)) = found else {
            debug!(%channel, "direct stream for an unknown channel");
            return None;
        };
        if owner != from {
            warn!(
                %channel,
                "a peer sent a direct stream for a channel that is not its own"
            );
            return None;
        }
        Some(tx)
    }

    /// Deliver direct streams of channel `number` from `peer` to `tx`.
    pub(crate) fn add_route(&self, number: ChannelId, peer: Fingerprint, tx: Route) {
        lock(&self.routes).insert(number, (peer, tx));
        self.routed.notify_waiters();
    }

    /// Stop delivering direct streams of channel `number`.
    pub(crate) fn remove_route(&self, number: ChannelId) {
        lock(&self.routes).remove(&number);
    }

    /// One channel stopped using `peer`'s link; close it after the grace
    /// period if no channel uses it by then.
    fn release(self: &Arc<Self>, peer: &Arc<Peer>) {
        let left = {
            let mut users = lock(&peer.users);
            *users = users.saturating_sub(1);
            *users
        };
        if left > 0 {
            return;
        }
        let me = self.clone();
        let peer = peer.clone();
        tokio::spawn(
            async move {
                tokio::time::sleep(me.grace).await;
                if *lock(&peer.users) > 0 {
                    return;
                }
                {
                    let mut peers = lock(&me.peers);
                    if peers
                        .get(&peer.fingerprint)
                        .is_some_and(|p| Arc::ptr_eq(p, &peer))
                    {
                        peers.remove(&peer.fingerprint);
                    }
                }
                let conns: Vec<Connection> = lock(&peer.conns).drain(..).collect();
                if !conns.is_empty() {
                    info!(peer = %Untrusted::name(&peer.name), "closing the idle direct connection");
                }
                for c in conns {
                    c.close(ConnCode::Normal.varint(), b"no channels left");
                }
                peer.state
                    .send_replace(Link::Down("closed: no channels left".into()));
                me.publish();
            }
            .instrument(self.span.clone()),
        );
    }

    /// Remove a peer whose link is down, so its fingerprint is no longer
    /// admitted and the next introduction starts afresh.
    fn forget_if_down(&self, peer: &Arc<Peer>) {
        if matches!(*peer.state.borrow(), Link::Down(_)) {
            let mut peers = lock(&self.peers);
            if peers
                .get(&peer.fingerprint)
                .is_some_and(|p| Arc::ptr_eq(p, peer))
            {
                peers.remove(&peer.fingerprint);
            }
        }
    }

    /// Refresh the map of live links.
    fn publish(&self) {
        let now: BTreeMap<String, SocketAddr> = lock(&self.peers)
            .values()
            .filter_map(|p| p.conn().map(|c| (p.name.clone(), c.remote_address())))
            .collect();
        self.links.send_if_modified(|m| {
            if *m != now {
                *m = now;
                true
            } else {
                false
            }
        });
    }

    /// Close the direct connection to the peer `name`, if any; its channels
    /// fall back to the relay (direct-only ones are lost).
    pub(crate) fn drop_link(&self, name: &str) -> bool {
        let peer = lock(&self.peers).values().find(|p| p.name == name).cloned();
        let Some(peer) = peer else { return false };
        let conns: Vec<Connection> = lock(&peer.conns).clone();
        for c in &conns {
            c.close(ConnCode::Normal.varint(), b"direct connection dropped");
        }
        !conns.is_empty()
    }

    /// Close every direct connection (the client is leaving).
    pub(crate) fn close_all(&self) {
        let peers: Vec<Arc<Peer>> = lock(&self.peers).drain().map(|(_, p)| p).collect();
        for p in peers {
            for c in lock(&p.conns).drain(..) {
                c.close(ConnCode::Normal.varint(), b"client leaving");
            }
            p.state
                .send_replace(Link::Down("the client is leaving".into()));
        }
        self.publish();
    }
}

/// Bytes of QUIC datagrams a direct connection holds before the
/// dispatcher reads them; past it quinn drops the oldest.
const DATAGRAM_BUFFER: usize = 1 << 20;

/// Transport settings of direct connections: the client's, with a short
/// initial RTT estimate (10 ms), so that a dial whose first packet met a NAT
/// the peer had not punched open yet is sent again after about 35 ms rather
/// than a second. On a long path this costs a few early resends of the
/// first packet, until the first RTT sample.
pub(crate) fn direct_transport(tuning: &Tuning) -> Arc<quinn::TransportConfig> {
    let mut t = tuning.transport();
    t.initial_rtt(Duration::from_millis(10));
    // Direct pipes carry UDP flows as QUIC datagrams (§20.4).
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
    Arc::new(t)
}
