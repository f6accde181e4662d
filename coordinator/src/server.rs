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
use std::sync::{Arc, Mutex, MutexGuard};

use qmesh_certs::transport::{StreamAllowance, StreamKind};
use qmesh_certs::Fingerprint;
use qmesh_proto::codec::{read_frame, write_frame, DecodeError, ReadFrameError};
use qmesh_proto::codes::ConnCode;
use qmesh_proto::msg::SessionMsg;
use qmesh_proto::PROTOCOL_VERSION;
use quinn::{Connection, Endpoint, VarInt};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::channel::ChannelSide;
use crate::config::Config;
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
}

impl Shared {
    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry<Arc<Session>>> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
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
    /// Addresses the client reported for itself, or `None` when it cannot
    /// take direct channels.
    pub(crate) direct: Option<Vec<SocketAddr>>,
    /// This session's side of each joined channel, by the id of the channel
    /// control stream on this connection.
    pub(crate) channels: Mutex<HashMap<u64, Arc<ChannelSide>>>,
    /// Channels this client is part of, joined or being opened: what
    /// `max_channels_per_client` counts.
    pub(crate) slots: AtomicUsize,
}

impl Session {
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
        let mut server = qmesh_certs::server_config(&config.identity)?;
        server.transport_config(config.tuning.transport_config());
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
        Ok(Self {
            endpoint,
            shared: Arc::new(Shared {
                config,
                registry: Mutex::new(registry),
                stats: Arc::default(),
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                next_channel: AtomicU64::new(1),
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

    /// Serve until `shutdown` completes, then stop accepting, close every
    /// session with [`ConnCode::Shutdown`] and return once all tasks ended.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self { endpoint, shared } = self;
        let span = info_span!("coordinator", id = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default());
        async move {
            info!(listen = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
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
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(self.run(async move { token.cancelled().await }));
        CoordinatorHandle {
            addr,
            stats,
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

async fn handle_incoming(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
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
    run_session(shared, conn, deadline).await;
}

/// Wait for the hello and answer it; returns the admitted session and its
/// control stream, or `None` when the connection was refused or closed.
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
    let (version, name, direct) = match msg {
        Ok(Some(SessionMsg::Hello {
            version,
            name,
            direct,
        })) => (version, name, direct),
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
    // The server configuration requires a client certificate, so a missing
    // one here means the TLS layer and this code disagree.
    let Some(fingerprint) = qmesh_certs::peer_fingerprint(conn) else {
        violation(
            conn,
            ConnCode::Internal,
            "no client certificate after the handshake",
        );
        return None;
    };
    let admitted = shared.registry().admit(
        version,
        &name,
        |id| {
            Arc::new(Session {
                id,
                name: name.clone(),
                conn: conn.clone(),
                fingerprint,
                direct: direct.clone(),
                channels: Mutex::new(HashMap::new()),
                slots: AtomicUsize::new(0),
            })
        },
        |held| {
            if held.conn.close_reason().is_some() {
                Holder::Gone
            } else if held.fingerprint == fingerprint {
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
            if let Some(old) = replaced {
                info!(name = %name, old = old.id, new = id, "the same credential connected again; closing its old session");
                old.conn.close(
                    VarInt::from_u32(ConnCode::Replaced.code()),
                    b"this name was taken over by a new session with the same credential",
                );
            }
            let welcome = SessionMsg::Welcome {
                session: id,
                observed: conn.remote_address(),
            };
            if write_frame(&mut send, &welcome).await.is_err() {
                shared.registry().leave(&name, id);
                return None;
            }
            shared
                .stats
                .sessions_admitted
                .fetch_add(1, Ordering::Relaxed);
            Some((session, send, recv))
        }
        Err(Rejection { code, message }) => {
            info!(peer = %conn.remote_address(), name = %name, client_version = version, ours = PROTOCOL_VERSION, cause = %message, "hello refused");
            let message = qmesh_proto::limits::clip_reason(&message);
            let reject = SessionMsg::Reject {
                code,
                message: message.clone(),
            };
            if write_frame(&mut send, &reject).await.is_ok() && send.finish().is_ok() {
                // Let the rejection arrive before the close; the close
                // carries the same sentence in case it does not.
                let _ = timeout(std::time::Duration::from_secs(1), send.stopped()).await;
            }
            conn.close(
                VarInt::from_u32(code.conn_code().code()),
                message.as_bytes(),
            );
            None
        }
    }
}

fn session_msg_name(msg: &SessionMsg) -> &'static str {
    match msg {
        SessionMsg::Hello { .. } => "hello",
        SessionMsg::Welcome { .. } => "welcome",
        SessionMsg::Reject { .. } => "reject",
    }
}

async fn run_session(shared: Arc<Shared>, conn: Connection, deadline: tokio::time::Instant) {
    let Some((session, _send, mut recv)) = hello(&shared, &conn, deadline).await else {
        return;
    };
    let span = info_span!("session", id = %session.name);
    async {
        info!(peer = %conn.remote_address(), session = session.id, "joined");
        // After the welcome the client sends nothing more on the session
        // stream; anything it does send is a protocol violation. The read is
        // pinned outside the loop so that it is never cancelled mid-frame.
        let mut session_read = pin!(read_frame::<SessionMsg, _>(&mut recv));
        let tuning = &shared.config.tuning;
        let bi_allowance = StreamAllowance::new(conn.clone(), StreamKind::Bi, tuning.max_bidi_streams, tuning.stream_ceiling);
        let uni_allowance = StreamAllowance::new(conn.clone(), StreamKind::Uni, tuning.max_uni_streams, tuning.stream_ceiling);
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => {
                    conn.close(VarInt::from_u32(ConnCode::Shutdown.code()), b"coordinator shutting down");
                    break;
                }
                msg = &mut session_read => {
                    match msg {
                        Ok(Some(other)) => violation(&conn, ConnCode::UnexpectedMessage, &format!("unexpected {} after welcome", session_msg_name(&other))),
                        Ok(None) => conn.close(VarInt::from_u32(ConnCode::Normal.code()), b"session stream finished"),
                        Err(e) => if let Some(code) = read_error_code(&e) {
                            violation(&conn, code, &format!("bad session frame: {e}"));
                        },
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
        shared.registry().leave(&session.name, session.id);
        let reason = conn
            .close_reason()
            .map(|e| crate::describe_close(&e))
            .unwrap_or_else(|| "closed".into());
        info!(reason = %reason, "left");
    }
    .instrument(span)
    .await
}
