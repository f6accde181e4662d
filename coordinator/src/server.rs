//! The coordinator: accept loop, sessions and shutdown.
//!
//! One task per connection runs its session: hello, then accepting the
//! channel control streams and data streams the client opens. Channel
//! routing lives in the `channel` module, byte relaying in `relay`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use qmesh_certs::transport::{StreamAllowance, StreamKind};
use qmesh_certs::Fingerprint;
use qmesh_proto::codec::{read_frame, write_frame, DecodeError, ReadFrameError};
use qmesh_proto::codes::{ConnCode, RejectCode};
use qmesh_proto::heartbeat::{self, StreamEnd};
use qmesh_proto::manifest::{validate_interfaces, Interface};
use qmesh_proto::msg::{PresenceEvent, SessionMsg};
use qmesh_proto::PROTOCOL_VERSION;
use quinn::{Connection, Endpoint, VarInt};
use rustls_pki_types::CertificateDer;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::channel::ChannelSide;
use crate::config::Config;
use crate::limit::Limiter;
use crate::policy::Policy;
use crate::registry::{Admitted, Holder, Registry, Rejection, SessionId};

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
}

/// Counters a running coordinator keeps.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sessions admitted since start.
    pub sessions_admitted: AtomicU64,
    /// Channels joined since start.
    pub channels_joined: AtomicU64,
    /// Data streams relayed since start.
    pub streams_relayed: AtomicU64,
    /// Payload bytes relayed since start.
    pub bytes_relayed: AtomicU64,
    /// Hellos and enrollments refused since start.
    pub hellos_refused: AtomicU64,
    /// Certificates issued (enrollments and renewals) since start.
    pub certificates_issued: AtomicU64,
    /// Connections that have not finished their hello, now.
    pub pending: AtomicU64,
}

/// State shared by all of a coordinator's tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) registry: Mutex<Registry<Arc<Session>>>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) tasks: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    /// The number the next joined channel gets.
    pub(crate) next_channel: AtomicU64,
    /// The access policy in force.
    pub(crate) policy: RwLock<Arc<Policy>>,
    /// Joins, leaves and interface changes, for presence watchers.
    pub(crate) presence: tokio::sync::broadcast::Sender<PresenceEvent>,
    /// Broadcast groups by name.
    pub(crate) groups: crate::broadcast::Groups,
}

impl Shared {
    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry<Arc<Session>>> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What `revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Certificates newly added to the revocation list.
    pub certificates: usize,
    /// Whether a connected session was closed.
    pub disconnected: bool,
}

/// Operator actions on a running coordinator: revocation and policy
/// reload. The admin socket and the SIGHUP handler use it; so can a
/// program embedding the coordinator.
#[derive(Debug, Clone)]
pub struct Control(Arc<Shared>);

impl Control {
    /// Revoke every certificate `name` holds (its session's, and in `token`
    /// mode every unexpired one issued for it) and close its session with
    /// `ConnCode::Revoked`.
    pub fn revoke(&self, name: &str) -> Revoked {
        let auth = &self.0.config.auth;
        let session = self.0.registry().lookup(name).cloned();
        let mut fps = auth.issued_for(name);
        fps.extend(session.as_ref().map(|s| s.fingerprint));
        let certificates = fps
            .into_iter()
            .filter(|fp| auth.revocations().add(*fp, name))
            .count();
        let disconnected = session.is_some_and(|s| close_revoked(&s)) | self.close_all_revoked();
        info!(name, certificates, disconnected, "revoked");
        Revoked {
            certificates,
            disconnected,
        }
    }

    /// Revoke one certificate by fingerprint and close the session that
    /// holds it, if any.
    pub fn revoke_fingerprint(&self, fp: Fingerprint) -> Revoked {
        let holder = self
            .0
            .registry()
            .iter()
            .find(|s| s.fingerprint == fp)
            .cloned();
        let name = holder
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_else(|| "-".into());
        let certificates = usize::from(self.0.config.auth.revocations().add(fp, &name));
        let disconnected = holder.is_some_and(|s| close_revoked(&s)) | self.close_all_revoked();
        info!(fingerprint = %fp, certificates, disconnected, "revoked");
        Revoked {
            certificates,
            disconnected,
        }
    }

    /// Close every session whose certificate is revoked (one certificate
    /// may hold several names); returns whether any was.
    fn close_all_revoked(&self) -> bool {
        let revoked: Vec<Arc<Session>> = self
            .0
            .registry()
            .iter()
            .filter(|s| self.0.config.auth.revocations().contains(&s.fingerprint))
            .cloned()
            .collect();
        revoked.iter().fold(false, |any, s| close_revoked(s) | any)
    }

    /// Put `policy` in force for opens from now on.
    pub fn set_policy(&self, policy: Policy) {
        *self.0.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.0.policy()
    }

    /// Re-read the policy from the config file after checking it; on any
    /// error the policy in force stays and every error is returned.
    pub fn reload_policy(&self) -> Result<String, Vec<String>> {
        let Some(path) = &self.0.config.config_file else {
            let what = "this coordinator was started without --config, so there is no policy file to reload";
            warn!("policy reload refused: {what}");
            return Err(vec![what.into()]);
        };
        match crate::file::check_file(path) {
            Ok(checked) => {
                let rules = checked.policy.as_ref().map(|p| p.len());
                self.set_policy(checked.policy.unwrap_or_else(Policy::allow_all));
                let what = match rules {
                    Some(n) => format!(
                        "policy reloaded from {}: {n} rules in force",
                        path.display()
                    ),
                    None => format!(
                        "policy reloaded from {}: no [policy] table, everything is allowed",
                        path.display()
                    ),
                };
                info!("{what}");
                Ok(what)
            }
            Err(errors) => {
                for e in &errors {
                    warn!(file = %path.display(), error = %e, "policy reload refused; the old policy stays");
                }
                Err(errors)
            }
        }
    }

    /// The coordinator's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.0.stats.clone()
    }

    /// Names of the connected clients, sorted.
    pub fn clients(&self) -> Vec<String> {
        let mut names: Vec<String> = self.0.registry().iter().map(|s| s.name.clone()).collect();
        names.sort();
        names
    }
}

fn close_revoked(session: &Session) -> bool {
    if session.conn.close_reason().is_some() {
        return false;
    }
    warn!(name = %session.name, "closing a revoked client's session");
    session.close(
        ConnCode::Revoked,
        "the operator revoked this client's certificate; ask them for a new credential",
    );
    true
}

/// One admitted client.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: SessionId,
    pub(crate) name: String,
    pub(crate) conn: Connection,
    /// The fingerprint of the certificate the client presented in the TLS
    /// handshake (never what the client claims).
    pub(crate) fingerprint: Fingerprint,
    /// SHA-256 of the certificate's public key: what "the same credential"
    /// compares, so a renewed certificate takes its name back.
    pub(crate) key: Option<[u8; 32]>,
    /// Addresses the client reported for itself, or `None` when it cannot
    /// take direct channels.
    pub(crate) direct: Option<Vec<SocketAddr>>,
    /// This session's side of each joined channel, by the id of the channel
    /// control stream on this connection.
    pub(crate) channels: Mutex<HashMap<u64, Arc<ChannelSide>>>,
    /// Channels this client is part of, joined or being opened: what
    /// `max_channels_per_client` counts.
    pub(crate) slots: AtomicUsize,
    /// This client's rate limits.
    pub(crate) limiter: Limiter,
    /// The interfaces the client offers (empty: it declares none).
    pub(crate) interfaces: Mutex<Arc<Vec<Interface>>>,
    /// Why the coordinator closed this session, when it did: the reason
    /// its peers' channels are told.
    pub(crate) closed_why: std::sync::OnceLock<String>,
}

impl Session {
    /// Close the session with `code`, and keep `why` for the peers of its
    /// channels. The first close is the one that counts.
    pub(crate) fn close(&self, code: ConnCode, why: &str) {
        let _ = self.closed_why.set(why.to_owned());
        self.conn
            .close(VarInt::from_u32(code.code()), why.as_bytes());
    }

    /// Close the session because the client broke the protocol, and say
    /// so at `warn`.
    pub(crate) fn violation(&self, code: ConnCode, what: &str) {
        warn!(name = %self.name, peer = %self.conn.remote_address(), code = %code, cause = what, "closing connection");
        self.close(code, what);
    }

    /// The interfaces the client offers now.
    pub(crate) fn interfaces(&self) -> Arc<Vec<Interface>> {
        self.interfaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn channels(&self) -> MutexGuard<'_, HashMap<u64, Arc<ChannelSide>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Close `conn` because its peer broke the protocol, and say so at `warn`.
pub(crate) fn violation(conn: &Connection, code: ConnCode, what: &str) {
    warn!(peer = %conn.remote_address(), code = %code, cause = what, "closing connection");
    conn.close(VarInt::from_u32(code.code()), what.as_bytes());
}

/// The close code for a frame that could not be read.
pub(crate) fn read_error_code(err: &ReadFrameError) -> Option<ConnCode> {
    match err {
        ReadFrameError::Decode(DecodeError::TooLarge { .. }) => Some(ConnCode::FrameTooLarge),
        ReadFrameError::Decode(_) | ReadFrameError::Truncated => Some(ConnCode::Malformed),
        ReadFrameError::Io(_) => None,
    }
}

/// A bound coordinator, ready to run.
#[derive(Debug)]
pub struct Coordinator {
    endpoint: Endpoint,
    shared: Arc<Shared>,
}

impl Coordinator {
    /// Bind the UDP socket and build the TLS configuration.
    pub fn bind(config: Config) -> Result<Self, BindError> {
        let mut server =
            qmesh_certs::server_config_with(&config.identity, config.auth.client_auth())?;
        // Before the hello is accepted a peer gets one bidirectional stream
        // (the session stream), no unidirectional ones, and a small
        // connection window; `hello` opens them up once it has joined.
        let mut transport = config.tuning.transport();
        transport.receive_window(VarInt::from_u32(config.pre_auth_window));
        transport.max_concurrent_bidi_streams(VarInt::from_u32(1));
        transport.max_concurrent_uni_streams(VarInt::from_u32(0));
        server.transport_config(Arc::new(transport));
        let socket =
            crate::socket::bind_udp(config.listen, config.socket_buffer).map_err(|source| {
                BindError::Socket {
                    addr: config.listen,
                    source,
                }
            })?;
        let endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| BindError::Socket {
            addr: config.listen,
            source,
        })?;
        let mut registry = Registry::new();
        registry.set_capacity(config.max_clients);
        let policy = config.policy.clone();
        Ok(Self {
            endpoint,
            shared: Arc::new(Shared {
                presence: tokio::sync::broadcast::channel(config.presence_buffer.max(1)).0,
                groups: crate::broadcast::Groups::default(),
                config,
                registry: Mutex::new(registry),
                stats: Arc::default(),
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                next_channel: AtomicU64::new(1),
                policy: RwLock::new(Arc::new(policy)),
            }),
        })
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

    /// Operator actions (revoke, policy reload) on this coordinator.
    pub fn control(&self) -> Control {
        Control(self.shared.clone())
    }

    /// Serve until `shutdown` completes, then stop accepting, close every
    /// session with [`ConnCode::Shutdown`] and return once all tasks ended.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self { endpoint, shared } = self;
        let span = info_span!("coordinator", id = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default());
        async move {
            info!(listen = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), auth = %shared.config.auth.mode(), "listening");
            if let Some(dir) = &shared.config.state_dir {
                match crate::admin::listen(dir, Control(shared.clone()), shared.shutdown.clone()) {
                    Ok(task) => { shared.tasks.spawn(task.in_current_span()); }
                    Err(e) => warn!(cause = %e, "no admin socket: the revoke and policy reload commands cannot reach this coordinator (SIGHUP still reloads the policy)"),
                }
            }
            let mut shutdown = pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    incoming = endpoint.accept() => {
                        let Some(incoming) = incoming else { break };
                        let shared2 = shared.clone();
                        shared.tasks.spawn(handle_incoming(shared2, incoming).in_current_span());
                    }
                }
            }
            info!(sessions = shared.registry().len(), "shutting down");
            shared.registry().stop_accepting();
            shared.shutdown.cancel();
            endpoint.close(
                VarInt::from_u32(ConnCode::Shutdown.code()),
                b"coordinator shutting down",
            );
            shared.tasks.close();
            let idle = timeout(std::time::Duration::from_secs(3), async {
                endpoint.wait_idle().await;
                shared.tasks.wait().await;
            });
            if idle.await.is_err() {
                warn!("tasks still running after 3 s; stopping anyway");
            }
            info!("stopped");
        }
        .instrument(span)
        .await
    }

    /// Run in the background. The coordinator stops when the returned
    /// handle's [`CoordinatorHandle::shutdown`] is called or it is dropped.
    pub fn spawn(self) -> CoordinatorHandle {
        let addr = self.local_addr();
        let stats = self.stats();
        let control = self.control();
        let endpoint = self.endpoint.clone();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(self.run(async move { token.cancelled().await }));
        CoordinatorHandle {
            addr,
            stats,
            control,
            endpoint,
            stop,
            task: Some(task),
        }
    }
}

/// A coordinator running in the background; dropping it stops it.
#[derive(Debug)]
pub struct CoordinatorHandle {
    addr: SocketAddr,
    stats: Arc<Stats>,
    control: Control,
    endpoint: Endpoint,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl CoordinatorHandle {
    /// The address the coordinator listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
        self.endpoint.open_connections()
    }

    /// Stop the coordinator and wait until it has.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
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

/// How long a refusal, an issued certificate or a welcome may take to be
/// written before the connection is closed anyway.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Counts a connection as pending (not through its hello) until dropped.
struct Pending(Arc<Shared>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.stats.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle_incoming(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let pending = shared.stats.pending.fetch_add(1, Ordering::Relaxed) as usize;
    let guard = Pending(shared.clone());
    let max = shared.config.max_pending.max(2);
    if pending >= max {
        debug!(peer = %remote, pending, "refusing a connection: too many handshakes in progress");
        incoming.refuse();
        return;
    }
    if pending >= max / 2 && !incoming.remote_address_validated() {
        // Under load, make the peer prove its address before any state is
        // kept for it.
        let _ = incoming.retry();
        return;
    }
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(peer = %remote, cause = %e, "handshake refused");
            return;
        }
    };
    // One deadline covers the handshake and the hello.
    let deadline = tokio::time::Instant::now() + shared.config.hello_timeout;
    let conn = match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            info!(peer = %remote, cause = %e, "handshake failed");
            return;
        }
        Err(_) => {
            info!(peer = %remote, "handshake timed out");
            return;
        }
    };
    run_session(shared, conn, deadline, guard).await;
}

/// Refuse a hello or an enrollment: the `Reject` on the session stream,
/// then a close carrying the same sentence.
async fn refuse(
    shared: &Shared,
    conn: &Connection,
    send: &mut quinn::SendStream,
    name: &str,
    code: RejectCode,
    message: &str,
) {
    shared.stats.hellos_refused.fetch_add(1, Ordering::Relaxed);
    info!(peer = %conn.remote_address(), name = %name, code = ?code, cause = %message, "hello refused");
    let message = qmesh_proto::limits::clip_reason(message);
    let reject = SessionMsg::Reject {
        code,
        message: message.clone(),
    };
    // Bounded: a peer that never opens its window must not hold the
    // connection (and its pending place) past a second.
    let _ = timeout(LINGER, async {
        if write_frame(send, &reject).await.is_ok() && send.finish().is_ok() {
            // Let the rejection arrive before the close; the close carries
            // the same sentence in case it does not.
            let _ = send.stopped().await;
        }
    })
    .await;
    conn.close(
        VarInt::from_u32(code.conn_code().code()),
        message.as_bytes(),
    );
}

/// Answer an enrollment or renewal, then end the connection.
async fn enroll(
    shared: &Shared,
    conn: &Connection,
    mut send: quinn::SendStream,
    chain: &[CertificateDer<'static>],
    (version, name, token): (u32, String, Option<String>),
) {
    if version != PROTOCOL_VERSION {
        let msg = format!("this coordinator speaks protocol version {PROTOCOL_VERSION}, the client {version}; upgrade the older side");
        return refuse(
            shared,
            conn,
            &mut send,
            &name,
            RejectCode::VersionMismatch,
            &msg,
        )
        .await;
    }
    let renewal = token.is_none();
    match shared.config.auth.enroll(&name, token.as_deref(), chain) {
        Ok((cert_pem, expires)) => {
            shared
                .stats
                .certificates_issued
                .fetch_add(1, Ordering::Relaxed);
            info!(peer = %conn.remote_address(), name = %name, expires, renewal, "certificate issued");
            let reply = SessionMsg::Enrolled { cert_pem, expires };
            let _ = timeout(LINGER * 2, async {
                if write_frame(&mut send, &reply).await.is_ok() && send.finish().is_ok() {
                    let _ = send.stopped().await;
                }
            })
            .await;
            conn.close(
                VarInt::from_u32(ConnCode::Normal.code()),
                b"certificate issued",
            );
        }
        Err((code, message)) => refuse(shared, conn, &mut send, &name, code, &message).await,
    }
}

/// Wait for the hello and answer it; returns the admitted session and its
/// control stream, or `None` when the connection was refused, enrolled or
/// closed.
async fn hello(
    shared: &Arc<Shared>,
    conn: &Connection,
    deadline: tokio::time::Instant,
) -> Option<(Arc<Session>, quinn::SendStream, quinn::RecvStream)> {
    let first = tokio::time::timeout_at(deadline, async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        Some((send, read_frame::<SessionMsg, _>(&mut recv).await, recv))
    })
    .await;
    let (mut send, msg, recv) = match first {
        Err(_) => {
            violation(
                conn,
                ConnCode::HelloTimeout,
                "no hello within the hello timeout",
            );
            return None;
        }
        Ok(None) => return None,
        Ok(Some(x)) => x,
    };
    // The server configuration requires a client certificate, so a missing
    // one here means the TLS layer and this code disagree.
    let Some(chain) = qmesh_certs::peer_chain(conn) else {
        violation(
            conn,
            ConnCode::Internal,
            "no client certificate after the handshake",
        );
        return None;
    };
    let (version, name, direct) = match msg {
        Ok(Some(SessionMsg::Hello {
            version,
            name,
            direct,
        })) => (version, name, direct),
        Ok(Some(SessionMsg::Enroll {
            version,
            name,
            token,
        })) => {
            enroll(shared, conn, send, &chain, (version, name, token)).await;
            return None;
        }
        Ok(Some(other)) => {
            let what = format!("expected hello, got {}", session_msg_name(&other));
            violation(conn, ConnCode::UnexpectedMessage, &what);
            return None;
        }
        Ok(None) => {
            violation(
                conn,
                ConnCode::Malformed,
                "session stream ended before hello",
            );
            return None;
        }
        Err(e) => {
            if let Some(code) = read_error_code(&e) {
                violation(conn, code, &format!("bad hello: {e}"));
            }
            return None;
        }
    };
    if direct
        .as_ref()
        .is_some_and(|a| a.len() > qmesh_proto::limits::MAX_REPORTED_ADDRS)
    {
        let what = format!(
            "hello reports more than {} addresses",
            qmesh_proto::limits::MAX_REPORTED_ADDRS
        );
        violation(conn, ConnCode::Malformed, &what);
        return None;
    }
    let mut recv = recv;
    let mut interfaces = Vec::new();
    if version == PROTOCOL_VERSION {
        if let Err((code, message)) = shared.config.auth.check_hello(&name, &chain) {
            refuse(shared, conn, &mut send, &name, code, &message).await;
            return None;
        }
        // The client's interfaces follow its hello at once.
        let declared =
            tokio::time::timeout_at(deadline, read_frame::<SessionMsg, _>(&mut recv)).await;
        match declared {
            Ok(Ok(Some(SessionMsg::Interfaces { list }))) => {
                if let Err(what) = validate_interfaces(&list) {
                    violation(
                        conn,
                        ConnCode::Malformed,
                        &format!("bad interface list: {what}"),
                    );
                    return None;
                }
                interfaces = list;
            }
            Ok(Ok(Some(other))) => {
                let what = format!(
                    "expected interfaces after hello, got {}",
                    session_msg_name(&other)
                );
                violation(conn, ConnCode::UnexpectedMessage, &what);
                return None;
            }
            Ok(Ok(None)) => {
                violation(
                    conn,
                    ConnCode::Malformed,
                    "session stream ended after hello",
                );
                return None;
            }
            Ok(Err(e)) => {
                if let Some(code) = read_error_code(&e) {
                    violation(conn, code, &format!("bad interface list: {e}"));
                }
                return None;
            }
            Err(_) => {
                violation(
                    conn,
                    ConnCode::HelloTimeout,
                    "no interface list within the hello timeout",
                );
                return None;
            }
        }
    }
    let interfaces = Arc::new(interfaces);
    let fingerprint = Fingerprint::of(&chain[0]);
    let key = qmesh_certs::clientauth::key_id(&chain[0]);
    let admitted = shared.registry().admit(
        version,
        &name,
        |id| {
            Arc::new(Session {
                id,
                name: name.clone(),
                conn: conn.clone(),
                fingerprint,
                key,
                direct: direct.clone(),
                channels: Mutex::new(HashMap::new()),
                slots: AtomicUsize::new(0),
                limiter: Limiter::new(&shared.config.rate),
                interfaces: Mutex::new(interfaces.clone()),
                closed_why: std::sync::OnceLock::new(),
            })
        },
        |held| {
            if held.conn.close_reason().is_some() {
                Holder::Gone
            } else if held.fingerprint == fingerprint || (key.is_some() && held.key == key) {
                // The same certificate, or one renewed for the same key.
                Holder::SameCredential
            } else {
                Holder::Other
            }
        },
    );
    match admitted {
        Ok(Admitted {
            id,
            handle: session,
            replaced,
        }) => {
            let rejoined = replaced.is_some();
            if let Some(old) = replaced {
                info!(name = %name, old = old.id, new = id, "the same credential connected again; closing its old session");
                old.close(
                    ConnCode::Replaced,
                    "this name was taken over by a new session with the same credential",
                );
            }
            // Authenticated: open the windows and stream limits that were
            // kept small until now.
            let tuning = &shared.config.tuning;
            conn.set_receive_window(VarInt::from_u32(tuning.conn_window));
            conn.set_max_concurrent_bi_streams(VarInt::from_u32(tuning.max_bidi_streams));
            conn.set_max_concurrent_uni_streams(VarInt::from_u32(tuning.max_uni_streams));
            let welcome = SessionMsg::Welcome {
                session: id,
                observed: conn.remote_address(),
            };
            let written =
                tokio::time::timeout_at(deadline + LINGER, write_frame(&mut send, &welcome)).await;
            if !matches!(written, Ok(Ok(()))) {
                shared.registry().leave(&name, id);
                violation(
                    conn,
                    ConnCode::HelloTimeout,
                    "the welcome could not be delivered in time",
                );
                return None;
            }
            // A revocation that landed between the check above and the
            // admission: revoke adds to the list, then closes what the
            // registry holds, so one of the two sees this session.
            if shared.config.auth.revocations().contains(&fingerprint) {
                shared.registry().leave(&name, id);
                close_revoked(&session);
                return None;
            }
            shared
                .stats
                .sessions_admitted
                .fetch_add(1, Ordering::Relaxed);
            let interfaces = interfaces.to_vec();
            let _ = shared.presence.send(if rejoined {
                PresenceEvent::Changed {
                    name: name.clone(),
                    interfaces,
                }
            } else {
                PresenceEvent::Joined {
                    name: name.clone(),
                    interfaces,
                }
            });
            Some((session, send, recv))
        }
        Err(Rejection { code, message }) => {
            debug!(
                client_version = version,
                ours = PROTOCOL_VERSION,
                "registry refused"
            );
            refuse(shared, conn, &mut send, &name, code, &message).await;
            None
        }
    }
}

fn session_msg_name(msg: &SessionMsg) -> &'static str {
    match msg {
        SessionMsg::Hello { .. } => "hello",
        SessionMsg::Welcome { .. } => "welcome",
        SessionMsg::Reject { .. } => "reject",
        SessionMsg::Enroll { .. } => "enroll",
        SessionMsg::Enrolled { .. } => "enrolled",
        SessionMsg::Interfaces { .. } => "interfaces",
        SessionMsg::Ping { .. } => "ping",
        SessionMsg::Pong { .. } => "pong",
    }
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
    let span = info_span!("session", id = %session.name);
    async {
        info!(peer = %conn.remote_address(), session = session.id, "joined");
        // After the welcome the session stream carries heartbeats both
        // ways and the client's interface updates; anything else is a
        // protocol violation.
        let updates = {
            let shared = shared.clone();
            let session = session.clone();
            move |msg: SessionMsg| match msg {
                SessionMsg::Interfaces { list } => {
                    validate_interfaces(&list).map_err(|e| format!("bad interface list: {e}"))?;
                    *session.interfaces.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(list.clone());
                    debug!(interfaces = list.len(), "interfaces updated");
                    let _ = shared.presence.send(PresenceEvent::Changed { name: session.name.clone(), interfaces: list });
                    Ok(())
                }
                other => Err(format!("unexpected {} after welcome", session_msg_name(&other))),
            }
        };
        let mut session_stream = pin!(heartbeat::drive(recv, send, shared.config.heartbeat, None, updates));
        let tuning = &shared.config.tuning;
        let bi_allowance = StreamAllowance::new(conn.clone(), StreamKind::Bi, tuning.max_bidi_streams, tuning.stream_ceiling);
        let uni_allowance = StreamAllowance::new(conn.clone(), StreamKind::Uni, tuning.max_uni_streams, tuning.stream_ceiling);
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => {
                    session.close(ConnCode::Shutdown, "coordinator shutting down");
                    break;
                }
                end = &mut session_stream => {
                    match end {
                        StreamEnd::Finished => session.close(ConnCode::Normal, "session stream finished"),
                        StreamEnd::Silent { .. } => {
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
                        let task = crate::channel::handle_open(shared.clone(), session.clone(), send, recv);
                        shared.tasks.spawn(async move { task.await; drop(guard) }.in_current_span());
                    }
                    Err(_) => break,
                },
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        let guard = uni_allowance.opened();
                        let task = crate::relay::relay_stream(shared.clone(), session.clone(), recv);
                        shared.tasks.spawn(async move { task.await; drop(guard) }.in_current_span());
                    }
                    Err(_) => break,
                },
            }
        }
        if shared.registry().leave(&session.name, session.id) {
            let _ = shared.presence.send(PresenceEvent::Left { name: session.name.clone() });
        }
        let reason = conn
            .close_reason()
            .map(|e| crate::describe_close(&e))
            .unwrap_or_else(|| "closed".into());
        info!(reason = %reason, "left");
    }
    .instrument(span)
    .await
}
