//! Forwarding: other programs' connections over the mesh.
//!
//! An *exposed* interface ([`Exposer`]) takes channels from peers and,
//! for every pipe a peer opens on one, connects to its target (a TCP
//! address, a Unix socket, or a UDP address) and copies bytes both ways. A
//! *forward* ([`Forward`]) listens locally and carries each accepted
//! connection (or each UDP flow) on a pipe of one standing channel to the
//! exposed interface, so a new connection costs one stream open, not a
//! channel.
//!
//! The exposer answers every pipe first with a [`PipeAnswer`]: `Connected`,
//! or `Failed` with a sentence the forwarder logs. After `Connected` the
//! pipe carries the connection's bytes (TCP and Unix), or its datagrams
//! each behind a 2-byte big-endian length (UDP).
//!
//! Per connection, each direction holds one buffer of [`BUF`] bytes; the
//! rest waits in QUIC's flow-control windows and the kernel's socket
//! buffers, so a slow reader on either side slows the writer on the other.
//! A TCP half-close is passed on as a finished pipe direction (and the
//! reverse as a write shutdown); a reset on either side resets the other.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmesh_proto::address::Host;
use qmesh_proto::codec::{read_within, write_frame, Read};
use qmesh_proto::codes::StreamCode;
use qmesh_proto::msg::{PathMode, PipeAnswer};
use qmesh_proto::{Address, ForwardKind, Interface, Untrusted};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::channel::{Channel, IncomingChannel};
use crate::client::Client;
use crate::datagram::{Port, Sent};
use crate::pipe::Pipe;
use crate::sync::lock;

/// Bytes one direction of a forwarded connection holds at once.
pub const BUF: usize = 64 * 1024;

/// The most connections (or UDP flows) a route carries at once, unless
/// configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// How long a UDP flow lives without a datagram either way, unless
/// configured otherwise.
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);

/// How long the forwarder waits for the exposer's [`PipeAnswer`].
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Room for any UDP payload (IPv6 allows 65,527 bytes, IPv4 65,507), so
/// none is truncated on receipt.
const UDP_BUF: usize = 65_536;

/// A local endpoint: what an exposed interface connects to, or where a
/// forward listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A TCP address (`tcp/HOST:PORT`).
    Tcp(SocketAddr),
    /// A Unix stream socket (`unix//PATH`).
    Unix(PathBuf),
    /// A UDP address (`udp/HOST:PORT`).
    Udp(SocketAddr),
}

impl Endpoint {
    /// The endpoint a connpipe address names: `tcp/HOST:PORT`,
    /// `udp/HOST:PORT` (with the host shorthands, such as `$4` for
    /// 127.0.0.1) or `unix//PATH`.
    pub fn from_address(address: &Address) -> Result<Endpoint, String> {
        let alias = address.connector().alias();
        let ip_port = || {
            let port = address
                .port()
                .ok_or_else(|| format!("{address}: give a port, as in {alias}/$4:8080"))?;
            match address.host() {
                Host::Name(name) => {
                    use std::net::ToSocketAddrs;
                    let mut found = (name.as_str(), port)
                        .to_socket_addrs()
                        .map_err(|e| format!("{address}: cannot resolve {name}: {e}"))?;
                    found
                        .next()
                        .ok_or_else(|| format!("{address}: {name} has no address"))
                }
                host => host
                    .to_ip()
                    .map(|ip| SocketAddr::new(ip, port))
                    .ok_or_else(|| {
                        format!("{address}: {host} is not a host to connect to or listen on")
                    }),
            }
        };
        match (alias, address.host()) {
            ("tcp", _) => Ok(Endpoint::Tcp(ip_port()?)),
            ("udp", _) => Ok(Endpoint::Udp(ip_port()?)),
            ("unix", Host::Path(path)) => Ok(Endpoint::Unix(PathBuf::from(path))),
            (other, _) => Err(format!(
                "{address}: cannot forward connector {other:?}; use tcp/HOST:PORT, udp/HOST:PORT or unix//PATH"
            )),
        }
    }

    /// Stream (TCP, Unix) or datagram (UDP).
    pub fn kind(&self) -> ForwardKind {
        match self {
            Endpoint::Tcp(_) | Endpoint::Unix(_) => ForwardKind::Stream,
            Endpoint::Udp(_) => ForwardKind::Datagram,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp/{a}"),
            Endpoint::Unix(p) => write!(f, "unix/{}", p.display()),
            Endpoint::Udp(a) => write!(f, "udp/{a}"),
        }
    }
}

/// A sentence for a failed connect, naming the target: "connect to
/// tcp/127.0.0.1:8080 refused".
fn connect_failure(target: &Endpoint, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => format!("connect to {target} refused"),
        io::ErrorKind::NotFound => format!("connect to {target}: no such socket"),
        _ => format!("connect to {target} failed: {e}"),
    }
}

/// A local byte-stream connection, TCP or Unix.
trait Local: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Make the connection's close an abort (TCP sends RST).
    fn abort(&self);
}

impl Local for TcpStream {
    fn abort(&self) {
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

impl Local for UnixStream {
    fn abort(&self) {}
}

/// How one forwarded connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Spliced {
    /// Both directions finished.
    Finished,
    /// The local side reset; the pipe was reset too.
    LocalReset,
    /// The pipe was reset or stopped; the local side was aborted.
    PipeReset,
}

/// What one direction of a splice ended with.
enum Half {
    Done,
    LocalReset,
    PipeReset,
}

/// Copy `local` to the pipe and the pipe to `local` until both directions
/// finish, passing half-closes and resets across; the bytes are counted in
/// `stats`.
async fn splice<L: Local>(
    local: L,
    send: &mut SendStream,
    recv: &mut RecvStream,
    stats: &RouteStats,
) -> Spliced {
    let (mut rd, mut wr) = tokio::io::split(local);
    let ended = {
        let up = async {
            let mut buf = vec![0u8; BUF];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => {
                        let _ = send.finish();
                        return Half::Done;
                    }
                    Ok(n) => {
                        if send.write_all(&buf[..n]).await.is_err() {
                            return Half::PipeReset;
                        }
                        stats.sent.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => return Half::LocalReset,
                }
            }
        };
        let down = async {
            let mut buf = vec![0u8; BUF];
            loop {
                match recv.read(&mut buf).await {
                    Ok(None) => {
                        let _ = wr.shutdown().await;
                        return Half::Done;
                    }
                    Ok(Some(n)) => {
                        if wr.write_all(&buf[..n]).await.is_err() {
                            return Half::LocalReset;
                        }
                        stats.received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => return Half::PipeReset,
                }
            }
        };
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let half = tokio::select! {
                h = &mut up, if !up_done => { up_done = true; h }
                h = &mut down, if !down_done => { down_done = true; h }
            };
            match half {
                Half::Done if up_done && down_done => break Spliced::Finished,
                Half::Done => {}
                Half::LocalReset => break Spliced::LocalReset,
                Half::PipeReset => break Spliced::PipeReset,
            }
        }
    };
    let local = rd.unsplit(wr);
    match ended {
        Spliced::Finished => {}
        Spliced::LocalReset => {
            let _ = send.reset(StreamCode::ConnectionReset.varint());
            let _ = recv.stop(StreamCode::ConnectionReset.varint());
        }
        Spliced::PipeReset => {
            local.abort();
            let _ = send.reset(StreamCode::ConnectionReset.varint());
            let _ = recv.stop(StreamCode::ConnectionReset.varint());
        }
    }
    drop(local);
    ended
}

/// One route's traffic, counted as it flows: its connections (a UDP flow
/// counts as one) and their bytes. A program that runs routes (the `qmesh
/// up` agent's `/metrics`) passes its own to [`Forward::run_counted`] or
/// [`Exposer::add_counted`] and reads it.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Connections carried now.
    open: AtomicUsize,
    /// Connections taken on (within the route's limit) since it started.
    total: AtomicU64,
    /// Bytes (UDP: payload bytes) from the local side into the mesh.
    sent: AtomicU64,
    /// Bytes (UDP: payload bytes) from the mesh to the local side.
    received: AtomicU64,
    /// A forward's channel's path, once it has one.
    path: Mutex<Option<crate::Path>>,
}

impl RouteStats {
    /// Connections (or UDP flows) carried now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed) as u64
    }

    /// Connections (or UDP flows) taken on since the route started; those
    /// refused at its limit are not counted.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Bytes read on the local side and written into the mesh.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes from the mesh written to the local side.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// A forward's path now: that of its standing channel, once opened.
    /// `None` for an exposed interface, whose channels (one per peer) each
    /// have their own.
    pub fn path(&self) -> Option<crate::Path> {
        *lock(&self.path)
    }

    fn set_path(&self, path: crate::Path) {
        *lock(&self.path) = Some(path);
    }
}

/// Counts a route's live connections against its limit, and in its
/// stats (which a reloaded route keeps, while its limit starts afresh); the
/// slot frees itself when dropped.
#[derive(Debug, Clone, Default)]
struct Slots {
    taken: Arc<AtomicUsize>,
    stats: Arc<RouteStats>,
}

/// One taken place under a route's connection limit.
struct Slot {
    taken: Arc<AtomicUsize>,
    stats: Arc<RouteStats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.taken.fetch_sub(1, Ordering::Relaxed);
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Slots {
    fn new(stats: Arc<RouteStats>) -> Self {
        Self {
            taken: Arc::default(),
            stats,
        }
    }

    /// Take a slot, unless `max` are taken.
    fn take(&self, max: usize) -> Option<Slot> {
        let before = self.taken.fetch_add(1, Ordering::Relaxed);
        if before >= max {
            self.taken.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        self.stats.total.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            taken: self.taken.clone(),
            stats: self.stats.clone(),
        })
    }
}

/// Tells a route's connections to wind down: once it says stop, each
/// live connection has the grace period to finish, and is then reset.
#[derive(Debug, Clone)]
pub struct Stop {
    rx: watch::Receiver<Option<Duration>>,
}

/// The sending side of a [`Stop`].
#[derive(Debug)]
pub struct Stopper(watch::Sender<Option<Duration>>);

impl Stopper {
    /// A new stopper and the [`Stop`] its route watches.
    pub fn new() -> (Stopper, Stop) {
        let (tx, rx) = watch::channel(None);
        (Stopper(tx), Stop { rx })
    }

    /// Stop accepting; live connections get `grace` to finish.
    pub fn stop(&self, grace: Duration) {
        self.0.send_replace(Some(grace));
    }
}

impl Stop {
    /// A stop that never fires: its stopper is gone, which the route
    /// reads as never.
    pub fn never() -> Stop {
        let (_, rx) = watch::channel(None);
        Stop { rx }
    }

    /// Resolves when the route stops accepting.
    async fn stopping(&self) -> Duration {
        let mut rx = self.rx.clone();
        let grace = rx
            .wait_for(Option::is_some)
            .await
            .map(|grace| grace.unwrap_or_default());
        match grace {
            Ok(grace) => grace,
            // The stopper is gone without stopping: never.
            Err(_) => std::future::pending().await,
        }
    }

    /// Resolves when a live connection's grace period is over.
    async fn expired(&self) {
        let grace = self.stopping().await;
        tokio::time::sleep(grace).await;
    }
}

/// Run `work` until it ends, or until the route's grace period after a
/// stop is over: `true` then, and the caller resets what `work` had.
async fn or_expired(stop: &Stop, work: impl std::future::Future<Output = ()>) -> bool {
    tokio::select! {
        () = work => false,
        () = stop.expired() => true,
    }
}

/// Reset both halves of a pipe whose route closed under it.
fn route_closed(pipe: &mut Pipe) {
    let (send, recv) = pipe.halves();
    let _ = send.reset(StreamCode::RouteClosed.varint());
    let _ = recv.stop(StreamCode::RouteClosed.varint());
}

/// One exposed interface: where its pipes go and who may open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expose {
    /// The interface (channel) name peers open.
    pub name: String,
    /// What each pipe connects to.
    pub target: Endpoint,
    /// The peers that may open it (the coordinator's policy applies too);
    /// `None` lets every peer the policy lets through.
    pub allow: Option<Vec<String>>,
    /// The most pipes at once; the newest beyond it is refused.
    pub max_connections: usize,
    /// How long a UDP flow lives without a datagram.
    pub udp_idle: Duration,
}

impl Expose {
    /// An exposed interface with the default limits, open to every peer
    /// the coordinator lets through.
    pub fn new(name: impl Into<String>, target: Endpoint) -> Self {
        Self {
            name: name.into(),
            target,
            allow: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            udp_idle: DEFAULT_UDP_IDLE,
        }
    }

    /// The manifest this interface is offered with.
    pub fn interface(&self) -> Interface {
        Interface::new(
            self.name.clone(),
            format!("forwards each connection to {}", self.target),
        )
        .with_forward(self.target.kind())
    }
}

/// An exposed interface being served.
#[derive(Debug)]
struct Served {
    expose: Expose,
    slots: Slots,
    stopper: Stopper,
    stop: Stop,
}

/// Serves a client's exposed interfaces: takes the channels peers open on
/// them and connects every pipe to the interface's target.
#[derive(Debug, Clone)]
pub struct Exposer {
    me: String,
    routes: Arc<Mutex<HashMap<String, Served>>>,
}

impl Exposer {
    /// An exposer (named `me` in the reasons it gives) serving `exposes`.
    pub fn new(me: impl Into<String>, exposes: impl IntoIterator<Item = Expose>) -> Self {
        let exposer = Self {
            me: me.into(),
            routes: Arc::default(),
        };
        for e in exposes {
            exposer.add(e);
        }
        exposer
    }

    /// Serve one more interface (replacing one of the same name at once).
    pub fn add(&self, expose: Expose) {
        self.add_counted(expose, Arc::default());
    }

    /// As [`Exposer::add`], counting its traffic in `stats`.
    pub fn add_counted(&self, expose: Expose, stats: Arc<RouteStats>) {
        let (stopper, stop) = Stopper::new();
        let served = Served {
            expose: expose.clone(),
            slots: Slots::new(stats),
            stopper,
            stop,
        };
        if let Some(old) = lock(&self.routes).insert(expose.name.clone(), served) {
            old.stopper.stop(Duration::ZERO);
        }
    }

    /// Stop serving interface `name`: no new channels or connections;
    /// live connections get `grace` to finish, and are then reset.
    pub fn remove(&self, name: &str, grace: Duration) {
        if let Some(old) = lock(&self.routes).remove(name) {
            old.stopper.stop(grace);
        }
    }

    /// The manifests of the interfaces served now.
    pub fn interfaces(&self) -> Vec<Interface> {
        let mut list: Vec<Interface> = lock(&self.routes)
            .values()
            .map(|s| s.expose.interface())
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Take channels from `client` until its session ends. Offers for a
    /// name this exposer does not serve, or from a peer not allowed, are
    /// refused with a reason.
    pub async fn run(&self, client: &Client) {
        while let Some(offer) = client.accept().await {
            let route = lock(&self.routes)
                .get(offer.channel())
                .map(|s| (s.expose.clone(), s.slots.clone(), s.stop.clone()));
            let Some((expose, slots, stop)) = route else {
                let reason = format!("{} does not expose {:?}", self.me, offer.channel());
                offer.refuse(&reason).await;
                continue;
            };
            if let Some(allow) = &expose.allow {
                if !allow.iter().any(|a| a == offer.peer()) {
                    info!(peer = %Untrusted::name(offer.peer()), interface = %expose.name, "refusing a peer not in the allow list");
                    let reason = format!("{} is not allowed to open {}", offer.peer(), expose.name);
                    offer.refuse(&reason).await;
                    continue;
                }
            }
            tokio::spawn(serve_offer(self.me.clone(), offer, expose, slots, stop));
        }
    }
}

/// Accept one channel and serve its pipes until it ends or the route
/// stops.
async fn serve_offer(me: String, offer: IncomingChannel, expose: Expose, slots: Slots, stop: Stop) {
    let peer = offer.peer().to_owned();
    let channel = match offer.accept().await {
        Ok(ch) => ch,
        Err(e) => {
            info!(peer = %Untrusted::name(&peer), interface = %expose.name, cause = %Untrusted::reason(&e), "accepting a forwarding channel failed");
            return;
        }
    };
    info!(peer = %Untrusted::name(&peer), interface = %expose.name, target = %expose.target, "forwarding channel ready");
    loop {
        let pipe = tokio::select! {
            pipe = channel.accept_pipe() => pipe,
            _ = stop.stopping() => None,
        };
        let Some(pipe) = pipe else { break };
        let slot = slots.take(expose.max_connections);
        tokio::spawn(expose_pipe(
            me.clone(),
            pipe,
            expose.clone(),
            slot,
            stop.clone(),
        ));
    }
    if channel.end().is_none() {
        // Stopped: the live pipes finish within their grace; the channel
        // carries them, so it closes after that.
        stop.expired().await;
        let _ = channel.close("the interface is no longer exposed").await;
    }
    let how = channel.ended().await;
    debug!(peer = %Untrusted::name(&peer), interface = %expose.name, how = %Untrusted::reason(&how), "forwarding channel ended");
}

/// Write the exposer's answer on a pipe.
async fn answer(send: &mut SendStream, answer: &PipeAnswer) -> bool {
    write_frame(send, answer).await.is_ok()
}

/// Tell the forwarder why its connection cannot be carried, and log it.
async fn refuse_pipe(send: &mut SendStream, reason: String) {
    warn!("{}", Untrusted::reason(&reason));
    let reason = qmesh_proto::limits::clip_reason(&reason);
    if answer(send, &PipeAnswer::Failed { reason }).await {
        let _ = send.finish();
    }
}

/// Answer `Connected` and copy between `local` and the pipe.
async fn connected<L: Local>(
    local: L,
    send: &mut SendStream,
    recv: &mut RecvStream,
    stats: &RouteStats,
) {
    if answer(send, &PipeAnswer::Connected).await {
        let how = splice(local, send, recv, stats).await;
        debug!(?how, "forwarded connection ended");
    }
}

/// Connect one pipe to the interface's target and copy until it ends.
async fn expose_pipe(me: String, mut pipe: Pipe, expose: Expose, slot: Option<Slot>, stop: Stop) {
    let Some(slot) = slot else {
        let (send, _) = pipe.halves();
        let reason = format!(
            "{me}: {} already carries {} connections, the most allowed",
            expose.name, expose.max_connections
        );
        return refuse_pipe(send, reason).await;
    };
    let failed = |e: io::Error| format!("{me}: {}", connect_failure(&expose.target, &e));
    // Registered before `Connected`, so no datagram of the flow finds it
    // missing.
    let port = match expose.target {
        Endpoint::Udp(_) => pipe.datagram_port(),
        _ => None,
    };
    let stats = &slot.stats;
    let (send, recv) = pipe.halves();
    let work = async {
        match &expose.target {
            Endpoint::Tcp(addr) => match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    connected(s, send, recv, stats).await
                }
                Err(e) => refuse_pipe(send, failed(e)).await,
            },
            Endpoint::Unix(path) => match UnixStream::connect(path).await {
                Ok(s) => connected(s, send, recv, stats).await,
                Err(e) => refuse_pipe(send, failed(e)).await,
            },
            Endpoint::Udp(addr) => {
                let socket = match udp_towards(*addr).await {
                    Ok(s) => s,
                    Err(e) => return refuse_pipe(send, failed(e)).await,
                };
                if answer(send, &PipeAnswer::Connected).await {
                    let mut local = UdpLocal::Connected(&socket);
                    let drops = Drops::new(format!(
                        "{me}: {}: UDP flow to {}",
                        expose.name, expose.target
                    ));
                    let flow = Flow {
                        send,
                        recv,
                        port,
                        stats,
                    };
                    udp_flow(&mut local, flow, expose.udp_idle, &drops).await;
                }
            }
        }
    };
    if or_expired(&stop, work).await {
        route_closed(&mut pipe);
    }
}

/// Kernel buffer of each forwarding UDP socket, so a burst waits there
/// (not dropped) while the process is busy; the kernel may grant less.
const UDP_BUFFER: usize = 4 << 20;

/// A UDP socket on `addr` with [`UDP_BUFFER`]-sized kernel buffers.
fn udp_bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = qmesh_certs::transport::bind_udp(addr, UDP_BUFFER)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// A UDP socket connected to `addr`, from an ephemeral port.
async fn udp_towards(addr: SocketAddr) -> io::Result<UdpSocket> {
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = udp_bind(bind)?;
    socket.connect(addr).await?;
    Ok(socket)
}

/// The local side of one UDP flow.
enum UdpLocal<'a> {
    /// The exposer's socket, connected to the target.
    Connected(&'a UdpSocket),
    /// The forwarder's listening socket, shared by every flow, and the
    /// datagrams of this flow's source address.
    Listener {
        socket: &'a UdpSocket,
        source: SocketAddr,
        datagrams: mpsc::Receiver<Vec<u8>>,
    },
}

impl UdpLocal<'_> {
    /// The next datagram from the local side; `None` when it is gone.
    async fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        match self {
            UdpLocal::Connected(s) => loop {
                match s.recv(buf).await {
                    Ok(n) => return Some(n),
                    // An ICMP port unreachable from an earlier send: the
                    // target is not listening (yet); datagrams may be lost.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(_) => return None,
                }
            },
            UdpLocal::Listener { datagrams, .. } => {
                let d = datagrams.recv().await?;
                buf[..d.len()].copy_from_slice(&d);
                Some(d.len())
            }
        }
    }

    /// Send one datagram to the local side; one it refuses is counted in
    /// `drops`.
    async fn send(&self, datagram: &[u8], drops: &Drops) {
        let sent = match self {
            UdpLocal::Connected(s) => s.send(datagram).await,
            UdpLocal::Listener { socket, source, .. } => socket.send_to(datagram, *source).await,
        };
        match sent {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                drops.note(datagram.len(), "nothing listens there (port unreachable)")
            }
            Err(e) => drops.note(datagram.len(), format_args!("it could not be sent: {e}")),
        }
    }
}

/// The datagrams one UDP flow dropped. The first drop is logged; the rest
/// are counted, and the count is logged when the flow ends.
#[derive(Debug)]
struct Drops {
    /// The flow, as log lines name it.
    flow: String,
    count: AtomicU64,
}

impl Drops {
    fn new(flow: String) -> Self {
        Self {
            flow,
            count: AtomicU64::new(0),
        }
    }

    /// Count one dropped datagram of `size` bytes; log the first.
    fn note(&self, size: usize, why: impl fmt::Display) {
        if self.count.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!(
                "{}: dropped a {size}-byte datagram: {why}; further drops on this flow are counted, not logged",
                self.flow
            );
        }
    }
}

/// The pipe of one UDP flow: its stream halves and, on a direct
/// connection, its QUIC datagrams; and its route's counts.
struct Flow<'a> {
    send: &'a mut SendStream,
    recv: &'a mut RecvStream,
    port: Option<Port>,
    stats: &'a RouteStats,
}

/// The next datagram from the peer on `port`; never, without one.
async fn from_port(port: &mut Option<Port>) -> bytes::Bytes {
    if let Some(p) = port {
        if let Some(d) = p.recv().await {
            return d;
        }
    }
    std::future::pending().await
}

/// Carry one UDP flow both ways until either side ends it or it is idle
/// for `idle`. Each datagram goes as a QUIC datagram when the pipe has a
/// port and it fits; otherwise behind a 2-byte length on the pipe's
/// stream. Both arrive from the peer the same ways.
async fn udp_flow(local: &mut UdpLocal<'_>, flow: Flow<'_>, idle: Duration, drops: &Drops) {
    let Flow {
        send,
        recv,
        mut port,
        stats,
    } = flow;
    let mut up = vec![0u8; UDP_BUF];
    // Bytes read from the pipe and not yet a whole datagram: at most one
    // datagram and its length, plus one chunk.
    let mut down = bytes::BytesMut::new();
    let (mut as_datagrams, mut framed) = (0u64, 0u64);
    let mut deadline = tokio::time::Instant::now() + idle;
    loop {
        tokio::select! {
            got = local.recv(&mut up) => {
                let Some(n) = got else { break };
                stats.sent.fetch_add(n as u64, Ordering::Relaxed);
                let sent = match &port {
                    Some(p) => p.send(&up[..n]).await,
                    None => Sent::TooLarge,
                };
                match sent {
                    Sent::Datagram => as_datagrams += 1,
                    Sent::Closed => break,
                    Sent::TooLarge => {
                        let Ok(len) = u16::try_from(n) else {
                            drops.note(n, "it is larger than a pipe frame holds (65,535 bytes)");
                            continue;
                        };
                        let mut frame = Vec::with_capacity(n + 2);
                        frame.extend_from_slice(&len.to_be_bytes());
                        frame.extend_from_slice(&up[..n]);
                        if send.write_all(&frame).await.is_err() {
                            break;
                        }
                        framed += 1;
                    }
                }
            }
            datagram = from_port(&mut port) => {
                stats.received.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                local.send(&datagram, drops).await
            }
            chunk = recv.read_chunk(UDP_BUF + 2, true) => {
                let Ok(Some(chunk)) = chunk else { break };
                down.extend_from_slice(&chunk.bytes);
                while let Some(len) = down.first_chunk::<2>().map(|l| usize::from(u16::from_be_bytes(*l))) {
                    if down.len() < 2 + len {
                        break;
                    }
                    let datagram = down.split_to(2 + len);
                    stats.received.fetch_add(len as u64, Ordering::Relaxed);
                    local.send(&datagram[2..], drops).await;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                debug!(idle_s = idle.as_secs(), "UDP flow idle; ending it");
                break;
            }
        }
        deadline = tokio::time::Instant::now() + idle;
    }
    let dropped = drops.count.load(Ordering::Relaxed) + port.as_ref().map_or(0, Port::dropped);
    if dropped > 0 {
        warn!(
            "{}: flow ended; {dropped} datagrams dropped, {as_datagrams} sent as QUIC datagrams, {framed} framed",
            drops.flow
        );
    } else {
        debug!(
            "{}: flow ended; {as_datagrams} datagrams sent as QUIC datagrams, {framed} framed",
            drops.flow
        );
    }
    let _ = send.finish();
}

/// One forward: a local listener whose connections go to an exposed
/// interface on a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The route's name, for log lines.
    pub name: String,
    /// Where to listen.
    pub listen: Endpoint,
    /// The exposed interface, `mesh/PEER!NAME`.
    pub to: Address,
    /// The path the route's channel asks for.
    pub mode: PathMode,
    /// The most connections (or UDP flows) at once; the newest beyond it
    /// is refused.
    pub max_connections: usize,
    /// How long a UDP flow lives without a datagram.
    pub udp_idle: Duration,
}

impl Forward {
    /// A forward from `listen` to `to` with the default limits, on any
    /// path.
    pub fn new(name: impl Into<String>, listen: Endpoint, to: Address) -> Self {
        Self {
            name: name.into(),
            listen,
            to,
            mode: PathMode::Auto,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            udp_idle: DEFAULT_UDP_IDLE,
        }
    }

    /// Check the interface's manifest against this forward's listener:
    /// both must carry the same kind.
    pub fn check(&self, interface: &Interface) -> Result<(), String> {
        let want = self.listen.kind();
        match interface.forward {
            Some(kind) if kind == want => Ok(()),
            Some(kind) => Err(format!(
                "{} is a {want} listener, but {} forwards {kind}; point it at an interface of the same kind",
                self.listen, self.to
            )),
            None => Err(format!(
                "{} is not a forwarding interface (it was not offered with qmesh expose)",
                self.to
            )),
        }
    }

    /// Bind the listener, then carry connections until `stop` fires; live
    /// connections then get the grace period, and are reset after it.
    /// Fails only when the listener cannot be bound, or the interface
    /// forwards another kind. Lines for people (the route up, its path,
    /// each change) go to `report`.
    pub async fn run(
        self,
        client: Client,
        stop: Stop,
        report: impl Fn(String) + Send + Sync + 'static,
    ) -> Result<(), String> {
        self.run_counted(client, stop, report, Arc::default()).await
    }

    /// As [`Forward::run`], counting the route's traffic and path in
    /// `stats`.
    pub async fn run_counted(
        self,
        client: Client,
        stop: Stop,
        report: impl Fn(String) + Send + Sync + 'static,
        stats: Arc<RouteStats>,
    ) -> Result<(), String> {
        match client.describe(&self.to).await {
            Ok(interface) => self.check(&interface)?,
            Err(e) => {
                warn!(route = %self.name, cause = %Untrusted::reason(&e), "cannot check the interface yet; until the peer is present, each connection is closed with a line")
            }
        }
        let listener = Listener::bind(&self.listen).await?;
        let link = Arc::new(Link {
            forward: self.clone(),
            client,
            channel: tokio::sync::Mutex::new(None),
            report: Box::new(report),
            stats: stats.clone(),
        });
        // Open the channel now, so the route's first line comes at start.
        let _ = link.channel().await;
        let slots = Slots::new(stats);
        match listener {
            Listener::Tcp(l) => loop {
                let accepted = tokio::select! {
                    a = l.accept() => a,
                    _ = stop.stopping() => break,
                };
                let Ok((s, from)) = accepted else { continue };
                let _ = s.set_nodelay(true);
                let slot = slots.take(self.max_connections);
                tokio::spawn(forward_conn(
                    link.clone(),
                    s,
                    from.to_string(),
                    slot,
                    stop.clone(),
                ));
            },
            Listener::Unix(l, path) => {
                loop {
                    let accepted = tokio::select! {
                        a = l.accept() => a,
                        _ = stop.stopping() => break,
                    };
                    let Ok((s, _)) = accepted else { continue };
                    let slot = slots.take(self.max_connections);
                    tokio::spawn(forward_conn(
                        link.clone(),
                        s,
                        path.display().to_string(),
                        slot,
                        stop.clone(),
                    ));
                }
                let _ = std::fs::remove_file(&path);
            }
            Listener::Udp(socket) => udp_listen(link, Arc::new(socket), slots, stop).await,
        }
        Ok(())
    }
}

/// A bound local listener.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    Udp(UdpSocket),
}

impl Listener {
    async fn bind(at: &Endpoint) -> Result<Listener, String> {
        let failed = |e: io::Error| format!("cannot listen on {at}: {e}");
        Ok(match at {
            Endpoint::Tcp(a) => Listener::Tcp(TcpListener::bind(a).await.map_err(failed)?),
            Endpoint::Unix(p) => {
                // A socket file nobody listens on is left from an earlier
                // run: take its place. A live one is an error.
                if std::os::unix::net::UnixStream::connect(p).is_err() {
                    if let Ok(meta) = std::fs::symlink_metadata(p) {
                        use std::os::unix::fs::FileTypeExt;
                        if meta.file_type().is_socket() {
                            let _ = std::fs::remove_file(p);
                        }
                    }
                }
                Listener::Unix(UnixListener::bind(p).map_err(failed)?, p.clone())
            }
            Endpoint::Udp(a) => Listener::Udp(udp_bind(*a).map_err(failed)?),
        })
    }
}

/// A forward's standing channel to the exposed interface, opened when
/// first needed and again after it ends.
struct Link {
    forward: Forward,
    client: Client,
    channel: tokio::sync::Mutex<Option<Arc<Channel>>>,
    report: Box<dyn Fn(String) + Send + Sync>,
    stats: Arc<RouteStats>,
}

impl Link {
    /// The live channel, opening one when there is none.
    async fn channel(self: &Arc<Self>) -> Result<Arc<Channel>, String> {
        let mut slot = self.channel.lock().await;
        if let Some(ch) = slot.as_ref().filter(|c| c.end().is_none()) {
            return Ok(ch.clone());
        }
        let f = &self.forward;
        let ch = self
            .client
            .open_with(&f.to, f.mode)
            .await
            .map_err(|e| format!("route {}: cannot reach {}: {e}", f.name, f.to))?;
        if let Some(interface) = ch.interface() {
            if let Err(e) = f.check(interface) {
                let _ = ch.close("wrong kind of interface").await;
                return Err(format!("route {}: {e}", f.name));
            }
        }
        let ch = Arc::new(ch);
        self.stats.set_path(ch.path());
        (self.report)(format!(
            "route {} up: {} -> {} ({})",
            f.name,
            f.listen,
            f.to,
            ch.path()
        ));
        tokio::spawn(watch_path(self.clone(), ch.clone()));
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// A pipe for one new connection, answered `Connected` by the exposer.
    async fn pipe(self: &Arc<Self>) -> Result<Pipe, String> {
        let ch = self.channel().await?;
        let f = &self.forward;
        let mut pipe = ch
            .open_pipe()
            .await
            .map_err(|e| format!("route {}: cannot open a pipe to {}: {e}", f.name, f.to))?;
        let (_, recv) = pipe.halves();
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        match read_within::<PipeAnswer, _>(deadline, recv).await {
            Read::Frame(PipeAnswer::Connected) => Ok(pipe),
            Read::Frame(PipeAnswer::Failed { reason }) => Err(reason),
            Read::Late => Err(format!(
                "{} did not answer within {} s",
                f.to,
                ANSWER_TIMEOUT.as_secs()
            )),
            Read::Finished => Err(format!("{} closed the connection", f.to)),
            Read::Failed(e) => {
                let (send, recv) = pipe.halves();
                let _ = send.reset(StreamCode::Malformed.varint());
                let _ = recv.stop(StreamCode::Malformed.varint());
                Err(format!("{} sent a bad answer: {e}", f.to))
            }
        }
    }
}

/// Report each change of a route channel's path until it ends.
async fn watch_path(link: Arc<Link>, ch: Arc<Channel>) {
    let mut path = ch.watch_path();
    loop {
        tokio::select! {
            changed = path.changed() => if changed.is_err() { break },
            _ = ch.ended() => break,
        }
        let now = *path.borrow_and_update();
        link.stats.set_path(now);
        (link.report)(format!("route {} path: {now}", link.forward.name));
    }
    if let Some(end) = ch.end() {
        info!(route = %link.forward.name, how = %Untrusted::reason(&end), "route channel ended; the next connection opens another");
    }
}

/// Carry one accepted local connection on a new pipe.
async fn forward_conn<L: Local>(
    link: Arc<Link>,
    local: L,
    from: String,
    slot: Option<Slot>,
    stop: Stop,
) {
    let name = &link.forward.name;
    let Some(slot) = slot else {
        warn!(route = %name, %from, max = link.forward.max_connections, "refusing a connection: the route carries the most allowed");
        return;
    };
    let mut pipe = match link.pipe().await {
        Ok(p) => p,
        Err(reason) => {
            warn!(route = %name, %from, "closing a connection: {}", Untrusted::reason(&reason));
            return;
        }
    };
    debug!(route = %name, %from, path = %pipe.path(), "connection forwarded");
    let (send, recv) = pipe.halves();
    let work = async {
        let how = splice(local, send, recv, &slot.stats).await;
        debug!(route = %name, %from, ?how, "forwarded connection ended");
    };
    if or_expired(&stop, work).await {
        route_closed(&mut pipe);
    }
}

/// Datagrams waiting for one flow's pipe.
const FLOW_QUEUE: usize = 256;

/// Receive datagrams on `socket` and carry each source address's as one
/// flow, until `stop` fires.
async fn udp_listen(link: Arc<Link>, socket: Arc<UdpSocket>, slots: Slots, stop: Stop) {
    type Flows = Arc<Mutex<HashMap<SocketAddr, (mpsc::Sender<Vec<u8>>, Arc<Drops>)>>>;
    let flows: Flows = Arc::default();
    let mut buf = vec![0u8; UDP_BUF];
    loop {
        let got = tokio::select! {
            got = socket.recv_from(&mut buf) => got,
            _ = stop.stopping() => break,
        };
        let Ok((n, source)) = got else { continue };
        let datagram = buf[..n].to_vec();
        let flow = lock(&flows).get(&source).cloned();
        let (tx, drops) = match flow {
            Some(flow) => flow,
            None => {
                let Some(slot) = slots.take(link.forward.max_connections) else {
                    warn!(route = %link.forward.name, %source, "dropping a datagram from a new source: the route carries the most flows allowed");
                    continue;
                };
                let (tx, rx) = mpsc::channel(FLOW_QUEUE);
                let drops = Arc::new(Drops::new(format!(
                    "route {}: UDP flow from {source}",
                    link.forward.name
                )));
                lock(&flows).insert(source, (tx.clone(), drops.clone()));
                let (link, socket, flows, stop, flow_drops) = (
                    link.clone(),
                    socket.clone(),
                    flows.clone(),
                    stop.clone(),
                    drops.clone(),
                );
                tokio::spawn(async move {
                    udp_forward_flow(&link, &socket, source, rx, &stop, &flow_drops).await;
                    lock(&flows).remove(&source);
                    drop(slot);
                });
                (tx, drops)
            }
        };
        // A flow that cannot keep up loses datagrams, as UDP may.
        if tx.try_send(datagram).is_err() {
            drops.note(n, "its flow has 256 datagrams waiting for the pipe");
        }
    }
}

/// Carry one UDP flow from `source` on its own pipe.
async fn udp_forward_flow(
    link: &Arc<Link>,
    socket: &UdpSocket,
    source: SocketAddr,
    datagrams: mpsc::Receiver<Vec<u8>>,
    stop: &Stop,
    drops: &Drops,
) {
    let mut pipe = match link.pipe().await {
        Ok(p) => p,
        Err(reason) => {
            warn!(route = %link.forward.name, %source, "dropping a UDP flow: {}", Untrusted::reason(&reason));
            return;
        }
    };
    let idle = link.forward.udp_idle;
    let port = pipe.datagram_port();
    let (send, recv) = pipe.halves();
    let flow = Flow {
        send,
        recv,
        port,
        stats: &link.stats,
    };
    let mut local = UdpLocal::Listener {
        socket,
        source,
        datagrams,
    };
    if or_expired(stop, udp_flow(&mut local, flow, idle, drops)).await {
        route_closed(&mut pipe);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stop_fires_with_its_grace_and_never_without_a_stopper() {
        let (stopper, stop) = Stopper::new();
        let waiting = tokio::spawn({
            let stop = stop.clone();
            async move { stop.stopping().await }
        });
        stopper.stop(Duration::from_secs(7));
        assert_eq!(waiting.await.unwrap(), Duration::from_secs(7));

        let hour = Duration::from_secs(3600);
        let never = Stop::never();
        assert!(tokio::time::timeout(hour, never.stopping()).await.is_err());
        let (stopper, stop) = Stopper::new();
        drop(stopper);
        assert!(tokio::time::timeout(hour, stop.expired()).await.is_err());
    }
}
