//! The coordinator: accept loop, sessions and shutdown.
//!
//! One task per connection runs its session: the hello (in `handshake`),
//! then the heartbeat and interface updates on the session stream, and
//! every stream the client opens, handed to `streams` for dispatch.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use qmesh_certs::transport::{StreamAllowance, StreamKind};
use qmesh_proto::codes::ConnCode;
use qmesh_proto::heartbeat::{self, StreamEnd};
use qmesh_proto::manifest::validate_interfaces;
use qmesh_proto::msg::{ClientSession, CoordinatorSession, PresenceEvent};
use qmesh_proto::Untrusted;
use quinn::{Connection, Endpoint, VarInt};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::config::Config;
use crate::handshake::hello;
use crate::registry::Registry;
use crate::session::Shared;

pub use crate::control::{Control, Revoked};
pub use crate::session::Stats;

/// Starting a coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The TLS configuration could not be built from the identity.
    #[error("cannot use the coordinator certificate: {0}")]
    Certificate(#[from] qmesh_certs::CertError),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Socket {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP listener would listen off loopback without a token.
    #[error("the HTTP listener on {0} is not on loopback, so it needs a bearer token")]
    HttpNeedsToken(SocketAddr),
    /// The HTTP listener (`--http`) could not be bound.
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The coordinator's UDP socket, bound before anything else is made: a
/// coordinator that cannot have its port fails before it writes any state
/// (a development certificate, the auth mode's files).
#[derive(Debug)]
pub struct Listener {
    socket: std::net::UdpSocket,
    addr: SocketAddr,
}

impl Listener {
    /// Bind `addr`, with
    /// [`SOCKET_BUFFER`](qmesh_certs::transport::SOCKET_BUFFER) bytes of
    /// kernel buffer each way.
    pub fn bind(addr: SocketAddr) -> Result<Listener, BindError> {
        Listener::bind_with(addr, crate::socket::SOCKET_BUFFER)
    }

    fn bind_with(addr: SocketAddr, buffer: usize) -> Result<Listener, BindError> {
        let socket = crate::socket::bind_udp(addr, buffer)
            .map_err(|source| BindError::Socket { addr, source })?;
        Ok(Listener { socket, addr })
    }

    /// The address the socket is bound to (with the real port when port 0
    /// was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap_or(self.addr)
    }

    /// A socket bound elsewhere: the one a worker's leader passed on.
    pub fn from_socket(socket: std::net::UdpSocket) -> Result<Listener, BindError> {
        let addr = socket.local_addr().map_err(|source| BindError::Socket {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        socket
            .set_nonblocking(true)
            .map_err(|source| BindError::Socket { addr, source })?;
        Ok(Listener { socket, addr })
    }

    /// The bound socket, for a leader to pass on to its workers.
    pub fn socket(&self) -> &std::net::UdpSocket {
        &self.socket
    }
}

/// A bound coordinator, ready to run.
#[derive(Debug)]
pub struct Coordinator {
    endpoint: Endpoint,
    /// Endpoints on the same port, each with the runtime it runs on.
    more: Vec<(Endpoint, tokio::runtime::Handle)>,
    shared: Arc<Shared>,
    /// The HTTP listener (`Config::http`), bound.
    http: Option<std::net::TcpListener>,
    /// The admin socket in the state directory, bound; or why not.
    admin: Option<anyhow::Result<crate::admin::Bound>>,
}

impl Coordinator {
    /// Bind the UDP socket (`config.listen`) and build the TLS configuration.
    pub fn bind(config: Config) -> Result<Self, BindError> {
        let listener = Listener::bind_with(config.listen, config.socket_buffer)?;
        Coordinator::on(listener, config)
    }

    /// Build the coordinator on a socket bound already; the listener's
    /// address takes the place of `config.listen`.
    pub fn on(listener: Listener, mut config: Config) -> Result<Self, BindError> {
        config.listen = listener.local_addr();
        let server = crate::tls::server_config(&config, &config.identity)?;
        let endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            listener.socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| BindError::Socket {
            addr: config.listen,
            source,
        })?;
        let http = match &config.http {
            Some(h) if h.token.is_none() && !h.addr.ip().is_loopback() => {
                return Err(BindError::HttpNeedsToken(h.addr))
            }
            Some(h) => Some(crate::http::bind(h.addr).map_err(|source| BindError::Http {
                addr: h.addr,
                source,
            })?),
            None => None,
        };
        let mut registry = Registry::new();
        registry.set_capacity(config.max_clients);
        let policy = config.policy.clone();
        let local_addr = endpoint.local_addr().unwrap_or(config.listen);
        // Bound before the coordinator says it listens, so that an
        // operator command right after that line finds it.
        let admin = config.state_dir.as_deref().map(crate::admin::bind);
        let shared_endpoint = endpoint.clone();
        let link_endpoint = crate::link::endpoint(&config).map_err(|e| match e {
            crate::link::EndpointError::Certificate(e) => BindError::Certificate(e),
            crate::link::EndpointError::Socket(source) => BindError::Socket {
                addr: config.listen,
                source,
            },
        })?;
        let shared = Arc::new(Shared {
            presence: tokio::sync::broadcast::channel(config.presence_buffer.max(1)).0,
            groups: crate::groups::Groups::default(),
            registry: Mutex::new(registry),
            stats: Arc::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            draining: CancellationToken::new(),
            pending_sources: Mutex::default(),
            slots: tokio::sync::watch::Sender::new(0),
            next_channel: AtomicU64::new(first_channel_number()),
            policy: RwLock::new(Arc::new(policy)),
            local_addr,
            started: std::time::SystemTime::now(),
            operator_stop: tokio::sync::watch::Sender::new(0),
            restart_asked: Default::default(),
            events: Mutex::default(),
            rate: RwLock::new(config.rate),
            group_config: RwLock::new(config.groups.clone()),
            running: Mutex::new(None),
            source: Mutex::new(None),
            endpoint: shared_endpoint,
            more_endpoints: Mutex::default(),
            current_cert: Mutex::new(Some(config.identity.fingerprint().to_string())),
            cert_summary: Mutex::new(crate::tls::CertSummary::of(&config.identity)),
            link_endpoint,
            links: Mutex::default(),
            link_changes: tokio::sync::watch::Sender::new(0),
            config,
        });
        // A name the directory gives to another coordinator closes its
        // session here.
        let weak = Arc::downgrade(&shared);
        shared.config.directory.on_lost(Box::new(move |lost| {
            let Some(shared) = weak.upgrade() else { return };
            let Some(session) = shared.registry().lookup(&lost.name).cloned() else {
                return;
            };
            let code = if lost.replaced {
                ConnCode::Replaced
            } else {
                ConnCode::NameTaken
            };
            session.close(code, &lost.reason);
        }));
        // A certificate another member revoked is refused here too.
        let weak = Arc::downgrade(&shared);
        shared.config.directory.on_revoked(Box::new(move |fp, name| {
            if let Some(shared) = weak.upgrade() {
                let r = crate::control::Control(shared).revoke_here(fp, Some(&name));
                info!(fingerprint = %fp, name = %Untrusted::name(&name), disconnected = r.disconnected, "revoked by another member of the cluster");
            }
        }));
        Ok(Self {
            endpoint,
            more: Vec::new(),
            http,
            admin,
            shared,
        })
    }

    /// Serve on one more socket bound to the same address (see
    /// [`qmesh_certs::transport::bind_udp_shared`]), with an endpoint of
    /// its own driven on the runtime of `handle`: the connections the
    /// kernel gives that socket have their QUIC state and their sessions'
    /// tasks on that runtime.
    pub fn add_endpoint(
        &mut self,
        socket: std::net::UdpSocket,
        handle: tokio::runtime::Handle,
    ) -> Result<(), BindError> {
        let config = &self.shared.config;
        let server = crate::tls::server_config(config, &config.identity)?;
        let endpoint = {
            let _in = handle.enter();
            Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server),
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(|source| BindError::Socket {
                addr: config.listen,
                source,
            })?
        };
        self.shared
            .more_endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(endpoint.clone());
        self.more.push((endpoint, handle));
        Ok(())
    }

    /// The address the coordinator listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// The coordinator's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// The address the HTTP listener (`Config::http`) is bound to.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Operator actions (revoke, policy reload) on this coordinator.
    pub fn control(&self) -> Control {
        Control(self.shared.clone())
    }

    /// Serve until `shutdown` completes, then stop accepting, close every
    /// session with [`ConnCode::Shutdown`] and return once all tasks ended.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.run_draining(std::future::pending(), shutdown).await
    }

    /// Serve until `drain` or `now` completes. After `drain`: refuse new
    /// sessions and channels, tell every client the coordinator is going
    /// away, and let live channels run until they have all ended, the
    /// config's [`Config::drain`] has passed, or `now` completes; then stop
    /// as [`Coordinator::run`] does.
    ///
    /// [`Config::drain`]: crate::config::Config::drain
    pub async fn run_draining(
        self,
        drain: impl Future<Output = ()>,
        now: impl Future<Output = ()>,
    ) {
        let Self {
            endpoint,
            more,
            shared,
            http,
            admin,
        } = self;
        let span = info_span!("coordinator", id = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default());
        async move {
            info!(listen = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), auth = %shared.config.auth.mode(), "listening");
            if let Some(bound) = admin {
                match bound.and_then(|b| crate::admin::serve(b, Control(shared.clone()), shared.shutdown.clone())) {
                    Ok(task) => { shared.tasks.spawn(task.in_current_span()); }
                    Err(e) => warn!(cause = %e, "no admin socket: the revoke and policy reload commands cannot reach this coordinator (SIGHUP still reloads the policy)"),
                }
            }
            if let Some(listener) = http {
                let token = shared.config.http.as_ref().and_then(|h| h.token.clone());
                let router = crate::http::router(Control(shared.clone()), token);
                let task = crate::http::serve(listener, router, shared.shutdown.clone());
                shared.tasks.spawn(task.in_current_span());
            }
            if shared.link_endpoint.is_some() {
                shared.tasks.spawn(crate::link::run(shared.clone()).in_current_span());
                shared
                    .tasks
                    .spawn(crate::groupfeed::run(shared.clone()).in_current_span());
            }
            let mut asked = shared.operator_stop.subscribe();
            let mut asked_now = asked.clone();
            let now = async move {
                tokio::select! {
                    _ = now => {}
                    _ = asked_now.wait_for(|n| *n >= 2) => info!("the operator asked to stop at once"),
                }
            };
            let drain = async move {
                tokio::select! {
                    _ = drain => {}
                    _ = asked.wait_for(|n| *n >= 1) => info!("the operator asked for a drain"),
                }
            };
            let mut now = pin!(now);
            let accept = async {
                loop {
                    let Some(incoming) = endpoint.accept().await else { break };
                    let shared2 = shared.clone();
                    shared.tasks.spawn(handle_incoming(shared2, incoming).in_current_span());
                }
            };
            for (endpoint, handle) in &more {
                let (endpoint, shared2) = (endpoint.clone(), shared.clone());
                let accept = async move {
                    while let Some(incoming) = endpoint.accept().await {
                        let shared3 = shared2.clone();
                        shared2.tasks.spawn(handle_incoming(shared3, incoming).in_current_span());
                    }
                };
                handle.spawn(shared.tasks.track_future(accept.in_current_span()));
            }
            let mut accept = pin!(accept);
            let drained = tokio::select! {
                _ = &mut now => false,
                _ = &mut accept => false,
                _ = drain => true,
            };
            if drained {
                // Connections are still accepted, so that a client trying
                // to join hears "shutting down" rather than nothing.
                tokio::select! {
                    _ = &mut now => info!("stopping at once"),
                    _ = &mut accept => {}
                    _ = drain_channels(&shared) => {}
                }
            }
            info!(sessions = shared.registry().len(), "shutting down");
            shared.registry().stop_accepting();
            shared.shutdown.cancel();
            for endpoint in std::iter::once(&endpoint).chain(more.iter().map(|(e, _)| e)) {
                endpoint.close(
                    VarInt::from_u32(ConnCode::Shutdown.code()),
                    b"coordinator shutting down",
                );
            }
            if let Some(links) = &shared.link_endpoint {
                links.close(
                    VarInt::from_u32(ConnCode::Shutdown.code()),
                    b"coordinator shutting down",
                );
            }
            shared.tasks.close();
            let idle = timeout(std::time::Duration::from_secs(3), async {
                endpoint.wait_idle().await;
                for (endpoint, _) in &more {
                    endpoint.wait_idle().await;
                }
                shared.tasks.wait().await;
            });
            if idle.await.is_err() {
                warn!("tasks still running after 3 s; stopping anyway");
            }
            // Every session has ended: give the names back to the
            // cluster at once rather than when the lease runs out.
            shared.config.directory.leave().await;
            info!("stopped");
        }
        .instrument(span)
        .await
    }

    /// Run in the background. The coordinator stops when the returned
    /// handle's [`CoordinatorHandle::shutdown`] is called or it is dropped.
    pub fn spawn(self) -> CoordinatorHandle {
        let addr = self.local_addr();
        let http_addr = self.http_addr();
        let stats = self.stats();
        let control = self.control();
        let endpoints = std::iter::once(&self.endpoint)
            .chain(self.more.iter().map(|(e, _)| e))
            .cloned()
            .collect();
        let stop = CancellationToken::new();
        let drain = CancellationToken::new();
        let (token, drain_token) = (stop.clone(), drain.clone());
        let task = tokio::spawn(
            self.run_draining(async move { drain_token.cancelled().await }, async move {
                token.cancelled().await
            }),
        );
        CoordinatorHandle {
            addr,
            http_addr,
            stats,
            control,
            endpoints,
            stop,
            drain,
            task: Some(task),
        }
    }
}

/// A coordinator running in the background; dropping it stops it.
#[derive(Debug)]
pub struct CoordinatorHandle {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    stats: Arc<Stats>,
    control: Control,
    /// Every endpoint, the one the coordinator was built on first.
    endpoints: Vec<Endpoint>,
    stop: CancellationToken,
    drain: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl CoordinatorHandle {
    /// The address the coordinator listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the HTTP listener (`Config::http`) is bound to.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The coordinator's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Operator actions (revoke, policy reload) on this coordinator.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// QUIC connections the endpoint still holds state for, authenticated
    /// or not (closed ones count until they have drained).
    pub fn open_connections(&self) -> usize {
        self.open_connections_by_endpoint().iter().sum()
    }

    /// [`Self::open_connections`] of each endpoint: the one the coordinator
    /// was built on first, then those of [`Coordinator::add_endpoint`].
    pub fn open_connections_by_endpoint(&self) -> Vec<usize> {
        self.endpoints
            .iter()
            .map(Endpoint::open_connections)
            .collect()
    }

    /// Start a drain (what SIGTERM does to `qmesh-coordinator run`): no
    /// new sessions or channels, every client told the coordinator is going
    /// away, live channels given [`Config::drain`] to end. [`Self::stopped`]
    /// waits for the end of it.
    ///
    /// [`Config::drain`]: crate::config::Config::drain
    pub fn begin_drain(&self) {
        self.drain.cancel();
    }

    /// Wait until the coordinator has stopped by itself (after a drain).
    pub async fn stopped(mut self) {
        self.join().await;
    }

    /// Stop the coordinator at once (no drain) and wait until it has.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        self.join().await;
    }

    async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                error!(cause = %e, "coordinator task failed");
            }
        }
    }
}

impl Drop for CoordinatorHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Refuse new sessions and channels, tell every client the coordinator is
/// going away, and wait until no channel is left or the drain deadline has
/// passed.
async fn drain_channels(shared: &Shared) {
    let within = shared.config.drain;
    let live = *shared.slots.borrow() / 2;
    info!(
        channels = live,
        drain_ms = within.as_millis() as u64,
        "draining: no new sessions or channels; live channels may run for {} ms (stop again to end them now)",
        within.as_millis()
    );
    shared.registry().stop_accepting();
    shared.draining.cancel();
    let mut slots = shared.slots.subscribe();
    let ended = timeout(within, slots.wait_for(|n| *n == 0)).await.is_ok();
    match ended {
        true => info!("drained: every channel has ended"),
        false => {
            let left = *shared.slots.borrow() / 2;
            warn!(
                channels = left,
                "the drain deadline passed; closing the channels still open"
            )
        }
    }
}

/// Counts a connection as pending (not through its hello) until dropped,
/// and, once it has a place, against its source too.
struct Pending(Arc<Shared>, Option<IpAddr>);

impl Pending {
    /// Take one of `source`'s places; `false` when `capped` and it holds
    /// its share already.
    fn take_source(&mut self, source: IpAddr, capped: bool) -> bool {
        let max = self.0.config.max_pending_per_source.max(1) as u32;
        let mut sources = self
            .0
            .pending_sources
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = sources.entry(source).or_insert(0);
        if capped && *n >= max {
            return false;
        }
        *n += 1;
        self.1 = Some(source);
        true
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.stats.pending.fetch_sub(1, Ordering::Relaxed);
        if let Some(source) = self.1 {
            let mut sources = self
                .0
                .pending_sources
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let std::collections::hash_map::Entry::Occupied(mut n) = sources.entry(source) {
                *n.get_mut() -= 1;
                if *n.get() == 0 {
                    n.remove();
                }
            }
        }
    }
}

/// The source a connection counts against: its IPv4 address, or the /64
/// of its IPv6 address (one host usually has a whole /64).
fn source_of(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

async fn handle_incoming(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let pending = shared.stats.pending.fetch_add(1, Ordering::Relaxed) as usize;
    let mut guard = Pending(shared.clone(), None);
    let max = shared.config.max_pending.max(2);
    if pending >= max {
        debug!(peer = %remote, pending, "refusing a connection: too many handshakes in progress");
        incoming.refuse();
        return;
    }
    let under_load = pending >= max / 4;
    if under_load && !incoming.remote_address_validated() {
        // Under load, make the peer prove its address before any state is
        // kept for it (a Retry costs no state).
        let _ = incoming.retry();
        return;
    }
    // Every connection counts against its source; under load, a source
    // that holds its share gets no more, so a host that completes
    // handshakes and then says nothing cannot take the other hosts'
    // places. (Not before: many clients behind one NAT may all join at
    // once after a restart.)
    if !guard.take_source(source_of(remote), under_load) {
        debug!(peer = %remote, "refusing a connection: this source has too many handshakes in progress");
        incoming.refuse();
        return;
    }
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            shared.stats.handshake_failed();
            debug!(peer = %remote, cause = %Untrusted::reason(&e), "handshake refused");
            return;
        }
    };
    // One deadline covers the handshake and the hello.
    let deadline = tokio::time::Instant::now() + shared.config.hello_timeout;
    let conn = match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            shared.stats.handshake_failed();
            info!(peer = %remote, cause = %Untrusted::reason(&e), "handshake failed");
            return;
        }
        Err(_) => {
            shared.stats.handshake_failed();
            info!(peer = %remote, "handshake timed out");
            return;
        }
    };
    run_session(shared, conn, deadline, guard).await;
}

async fn run_session(
    shared: Arc<Shared>,
    conn: Connection,
    deadline: tokio::time::Instant,
    pending: Pending,
) {
    let hello = hello(&shared, &conn, deadline).await;
    drop(pending);
    let Some((session, send, recv)) = hello else {
        return;
    };
    let span = info_span!("session", id = %Untrusted::name(&session.name));
    async {
        info!(peer = %conn.remote_address(), session = session.id, "joined");
        // After the welcome the session stream carries heartbeats both
        // ways and the client's interface updates; anything else is a
        // protocol violation.
        let updates = {
            let shared = shared.clone();
            let session = session.clone();
            move |msg: ClientSession| match msg {
                ClientSession::Interfaces { list } => {
                    validate_interfaces(&list).map_err(|e| format!("bad interface list: {e}"))?;
                    *session.interfaces.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(list.clone());
                    debug!(interfaces = list.len(), "interfaces updated");
                    let _ = shared.presence.send(PresenceEvent::Changed { name: session.name.clone(), interfaces: list });
                    Ok(())
                }
                // `drive` answers beats itself; they never reach here.
                ClientSession::Ping { .. } | ClientSession::Pong { .. } => Ok(()),
            }
        };
        // The session stream's only message of the coordinator's own: the
        // going-away notice when a drain starts.
        let (notices, notices_rx) = tokio::sync::mpsc::channel(1);
        let mut told = false;
        // Beats also go as datagrams after an interval of silence, and
        // flow control never holds those back.
        let pulse = Arc::new(heartbeat::Pulse::default());
        shared.tasks.spawn(qmesh_certs::transport::pulse(conn.clone(), shared.config.heartbeat.interval, pulse.clone()).in_current_span());
        let mut session_stream = pin!(heartbeat::drive::<_, _, ClientSession, CoordinatorSession>(recv, send, shared.config.heartbeat, Some(notices_rx), Some(&session.probe), Some(&pulse), updates));
        let tuning = &shared.config.tuning;
        let bi_allowance = StreamAllowance::new(conn.clone(), StreamKind::Bi, tuning.max_bidi_streams, tuning.stream_ceiling);
        let uni_allowance = StreamAllowance::new(conn.clone(), StreamKind::Uni, tuning.max_uni_streams, tuning.stream_ceiling);
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => {
                    session.close(ConnCode::Shutdown, "coordinator shutting down");
                    break;
                }
                _ = shared.draining.cancelled(), if !told => {
                    told = true;
                    let drain_ms = shared.config.drain.as_millis().try_into().unwrap_or(u64::MAX);
                    let _ = notices.try_send(CoordinatorSession::GoingAway { drain_ms });
                }
                end = &mut session_stream => {
                    match end {
                        StreamEnd::Finished => session.close(ConnCode::Normal, "it finished its session stream"),
                        StreamEnd::Silent { .. } | StreamEnd::Unanswered { .. } => {
                            let why = format!("{end}; closing the session");
                            info!(cause = %why, "client silent");
                            session.close(ConnCode::HeartbeatMissed, &why);
                        }
                        StreamEnd::Violation(what) => session.violation(ConnCode::UnexpectedMessage, &what),
                        StreamEnd::Failed(_) | StreamEnd::Stopped => {}
                    }
                    break;
                }
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let guard = bi_allowance.opened();
                        let task = crate::streams::bidi(shared.clone(), session.clone(), send, recv);
                        shared.tasks.spawn(async move { task.await; drop(guard) }.in_current_span());
                    }
                    Err(_) => break,
                },
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        let guard = uni_allowance.opened();
                        let task = crate::streams::uni(shared.clone(), session.clone(), recv);
                        shared.tasks.spawn(async move { task.await; drop(guard) }.in_current_span());
                    }
                    Err(_) => break,
                },
            }
        }
        let left = shared.registry().leave(&session.name, session.id);
        shared.config.directory.release(&session.name, session.claim);
        if left {
            let _ = shared.presence.send(PresenceEvent::Left { name: session.name.clone() });
        }
        let reason = conn
            .close_reason()
            .map(|e| qmesh_certs::transport::describe_close(&e))
            .unwrap_or_else(|| "closed".into());
        if left {
            shared.note("leave", format!("{} left: {}", Untrusted::name(&session.name), Untrusted::reason(&reason)));
        }
        info!(reason = %Untrusted::reason(&reason), "left");
    }
    .instrument(span)
    .await
}

/// Where this run's channel numbers start: a random 48-bit number. Direct
/// connections outlive a coordinator restart and route their streams by
/// channel number (protocol.md §8.9), so a restarted coordinator must not
/// hand out the numbers of channels still held on them.
fn first_channel_number() -> u64 {
    let mut bytes = [0u8; 8];
    // An unavailable system RNG leaves the start at 1; that only matters
    // for channels held across a restart.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes[2..]);
    u64::from_be_bytes(bytes).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let v4: SocketAddr = "192.0.2.7:4433".parse().unwrap();
        assert_eq!(source_of(v4), "192.0.2.7".parse::<IpAddr>().unwrap());
        let a: SocketAddr = "[2001:db8:1:2:aaaa::1]:1".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:bbbb::9]:2".parse().unwrap();
        let other: SocketAddr = "[2001:db8:1:3::1]:1".parse().unwrap();
        assert_eq!(source_of(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_eq!(source_of(a), source_of(b));
        assert_ne!(source_of(a), source_of(other));
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:1".parse().unwrap();
        assert_eq!(source_of(mapped), source_of(v4));
    }
}
