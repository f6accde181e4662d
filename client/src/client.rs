//! The client: one QUIC connection to the coordinator, one session on it.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use qmesh_certs::transport::{StreamAllowance, StreamGuard, StreamKind};
use qmesh_proto::address::Host;
use qmesh_proto::codec::{read_frame, write_frame};
use qmesh_proto::codes::{ConnCode, StreamCode};
use qmesh_proto::msg::{ChannelMsg, PathMode, SessionMsg, StreamHeader};
use qmesh_proto::{Address, PROTOCOL_VERSION};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::{debug, info, info_span, warn, Instrument, Span};

use crate::channel::{lock, Channel, IncomingChannel, Offer, Parts, PartsBox, Pending, Routes};
use crate::config::ClientConfig;
use crate::direct::{Direct, DirectParts, PeerSet};
use crate::error::{ConnectError, OpenError};
use crate::events::{self, ChannelRef, Event};
use crate::quota::Gate;
use qmesh_proto::heartbeat::{Heartbeat, StreamEnd};

/// A connected qmesh client. Cheap to clone; the session ends when the last
/// clone is dropped or [`Client::close`] is called.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    session: u64,
    observed: SocketAddr,
    coordinator: String,
    config: ClientConfig,
    endpoint: Endpoint,
    /// Whether `endpoint` was made for this client alone.
    owns_endpoint: bool,
    conn: Connection,
    /// Why this client closed its session, when it did (the coordinator
    /// went silent, or broke the protocol): what `closed` and the lost
    /// channels report instead of "closed locally".
    closed_why: Arc<OnceLock<String>>,
    routes: Routes,
    /// Direct connections, when this client takes direct channels.
    direct: Option<Arc<Direct>>,
    /// The fingerprint of this client's certificate.
    fingerprint: qmesh_certs::Fingerprint,
    incoming: tokio::sync::Mutex<mpsc::Receiver<IncomingChannel>>,
    /// Frames for the session stream (interface updates).
    session_tx: mpsc::Sender<SessionMsg>,
    /// Runs the session stream: heartbeats, and the end of the session.
    session_task: JoinHandle<()>,
    /// Quotas on offered interfaces, by name.
    gates: HashMap<String, Arc<Gate>>,
    driver: JoinHandle<()>,
    span: Span,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.driver.abort();
        self.session_task.abort();
        if let Some(d) = &self.direct {
            d.close_all();
        }
        self.conn
            .close(VarInt::from_u32(ConnCode::Normal.code()), b"client dropped");
        // An endpoint of this client's own: close it, or the direct accept
        // loop keeps it (its socket and buffers) alive after the client.
        if self.owns_endpoint {
            self.endpoint
                .close(VarInt::from_u32(ConnCode::Normal.code()), b"client dropped");
        }
    }
}

/// The name the coordinator's certificate must carry for this host.
pub(crate) fn server_name(host: &Host) -> String {
    match host {
        Host::Shorthand(_) => host
            .to_ip()
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| "localhost".into()),
        Host::Ipv4(ip) => ip.to_string(),
        Host::Ipv6(ip) => ip.to_string(),
        Host::Name(n) => n.clone(),
        Host::Path(p) => p.clone(),
    }
}

pub(crate) async fn resolve(host: &Host, port: u16) -> Result<SocketAddr, ConnectError> {
    if let Some(ip) = host.to_ip() {
        return Ok(SocketAddr::new(ip, port));
    }
    let name = server_name(host);
    let found = tokio::net::lookup_host((name.as_str(), port))
        .await
        .map(|mut addrs| addrs.next());
    match found {
        Ok(Some(addr)) => Ok(addr),
        Ok(None) => Err(ConnectError::Resolve {
            host: name,
            reason: "no addresses".into(),
        }),
        Err(e) => Err(ConnectError::Resolve {
            host: name,
            reason: e.to_string(),
        }),
    }
}

/// An endpoint of this client's own that also accepts direct connections
/// from introduced peers, and the socket handle punches are sent with.
fn direct_endpoint(
    bind: SocketAddr,
    identity: &Arc<qmesh_certs::Identity>,
    peers: &PeerSet,
    config: &ClientConfig,
) -> Result<(Endpoint, Arc<dyn quinn::AsyncUdpSocket>), ConnectError> {
    let known = peers.clone();
    let accept: qmesh_certs::AcceptFingerprint = Arc::new(move |fp| lock(&known).contains_key(fp));
    let mut server = qmesh_certs::direct_server_config(identity, accept)?;
    server.transport_config(crate::direct::direct_transport(&config.tuning));
    let std_socket = qmesh_certs::transport::bind_udp(bind, qmesh_certs::transport::SOCKET_BUFFER)
        .map_err(ConnectError::Socket)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket =
        quinn::Runtime::wrap_udp_socket(&*runtime, std_socket).map_err(ConnectError::Socket)?;
    let endpoint = Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server),
        socket.clone(),
        runtime,
    )
    .map_err(ConnectError::Socket)?;
    Ok((endpoint, socket))
}

/// The addresses this client reports for itself: the local address the OS
/// would use towards the coordinator (its LAN address behind a NAT), with
/// the endpoint's port, then `extra`.
fn reported_addrs(coordinator: SocketAddr, port: u16, extra: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    let any: SocketAddr = if coordinator.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    // Connecting a UDP socket sends nothing; it only asks the routing table.
    if let Ok(probe) = std::net::UdpSocket::bind(any) {
        if probe.connect(coordinator).is_ok() {
            if let Ok(local) = probe.local_addr() {
                out.push(SocketAddr::new(local.ip(), port));
            }
        }
    }
    for a in extra {
        if !out.contains(a) {
            out.push(*a);
        }
    }
    out.truncate(qmesh_proto::limits::MAX_REPORTED_ADDRS);
    out
}

/// What a TLS alert from the coordinator means for this client's
/// certificate, when the connection ended with one.
fn tls_refusal(err: &ConnectionError) -> Option<&'static str> {
    let code = match err {
        ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        ConnectionError::TransportError(t) => u64::from(t.code),
        _ => return None,
    };
    // QUIC carries a TLS alert as CRYPTO_ERROR 0x100 + alert.
    let alert = code.checked_sub(0x100).filter(|a| *a < 0x100)?;
    Some(match alert {
        42 => "the coordinator refused this client's certificate as malformed (TLS alert bad_certificate)",
        43 => "the coordinator refused this client's certificate: it is not a client certificate (TLS alert unsupported_certificate)",
        44 => "the coordinator refused this client's certificate: the operator revoked it (TLS alert certificate_revoked); ask them for a new credential",
        45 => "the coordinator refused this client's certificate: it has expired or is not valid yet (TLS alert certificate_expired); check this machine's clock, renew it, or enroll again with a new token",
        46 | 49 => "the coordinator refused this client's certificate (TLS alert certificate_unknown or access_denied)",
        48 => "the coordinator refused this client's certificate: it is not signed by the coordinator's client CA (TLS alert unknown_ca); ask the operator for a certificate, or a token to enroll with",
        116 => "the coordinator requires a client certificate and none was presented (TLS alert certificate_required)",
        _ => return None,
    })
}

/// Map a connection error seen while connecting to what the user should hear.
pub(crate) fn connect_failure(
    err: ConnectionError,
    report: &qmesh_certs::VerifyReport,
    addr: &str,
) -> ConnectError {
    if let Some(sentence) = report.failure() {
        return ConnectError::Certificate(sentence);
    }
    if let ConnectionError::ApplicationClosed(close) = &err {
        let message = String::from_utf8_lossy(&close.reason).into_owned();
        let code = ConnCode::from_code(close.error_code.into_inner())
            .and_then(qmesh_proto::codes::RejectCode::from_conn_code);
        if let Some(code) = code {
            return ConnectError::Rejected { code, message };
        }
    }
    if let Some(refused) = tls_refusal(&err) {
        return ConnectError::CertificateRefused(refused.into());
    }
    if matches!(err, ConnectionError::TimedOut) {
        return ConnectError::Handshake {
            addr: addr.to_owned(),
            reason: "no answer within the idle timeout; is the coordinator running?".into(),
        };
    }
    ConnectError::Handshake {
        addr: addr.to_owned(),
        reason: qmesh_certs::transport::describe_close(&err),
    }
}

impl Client {
    /// Connect to the coordinator and join under `config.name`, on a UDP
    /// socket of its own.
    pub async fn connect(config: ClientConfig) -> Result<Client, ConnectError> {
        Self::connect_on(None, config).await
    }

    /// Queue a frame for the session stream.
    pub(crate) async fn session_send(&self, msg: SessionMsg) -> Result<(), ()> {
        self.inner.session_tx.send(msg).await.map_err(|_| ())
    }

    /// Connect as [`Client::connect`] does, over `endpoint` when given, so
    /// that many clients in one process can share a few UDP sockets.
    pub async fn connect_on(
        endpoint: Option<&Endpoint>,
        config: ClientConfig,
    ) -> Result<Client, ConnectError> {
        let span = info_span!("client", id = %config.name);
        let secs = config.connect_timeout.as_secs();
        let coord_text = config.coordinator.to_string();
        let endpoint = endpoint.cloned();
        let events = config.events.clone();
        let name = config.name.clone();
        let outcome = match timeout(
            config.connect_timeout,
            Self::connect_inner(endpoint, config, span.clone()),
        )
        .instrument(span)
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout {
                addr: coord_text,
                secs,
            }),
        };
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
        outcome
    }

    async fn connect_inner(
        endpoint: Option<Endpoint>,
        config: ClientConfig,
        span: Span,
    ) -> Result<Client, ConnectError> {
        let (host, port) = config.coordinator.quic_endpoint()?;
        let host = host.clone();
        let addr = resolve(&host, port).await?;
        let coord_text = config.coordinator.to_string();
        let (client_config, report) = config.quic()?;
        let bind: SocketAddr = if addr.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let owns_endpoint = endpoint.is_none();
        let identity = config.identity()?;
        let peers: PeerSet = Arc::default();
        let (endpoint, punch_socket) = match endpoint {
            Some(e) => (e, None),
            None if config.direct.enabled => {
                let (e, socket) = direct_endpoint(bind, &identity, &peers, &config)?;
                (e, Some(socket))
            }
            None => (
                qmesh_certs::transport::client_endpoint(bind).map_err(ConnectError::Socket)?,
                None,
            ),
        };
        let reported = punch_socket.as_ref().map(|_| {
            let port = endpoint.local_addr().map(|a| a.port()).unwrap_or(0);
            reported_addrs(addr, port, &config.direct.advertise)
        });
        let connecting = endpoint
            .connect_with(client_config, addr, &server_name(&host))
            .map_err(|e| ConnectError::Handshake {
                addr: coord_text.clone(),
                reason: e.to_string(),
            })?;
        let conn = connecting
            .await
            .map_err(|e| connect_failure(e, &report, &coord_text))?;

        // Hello on the session control stream.
        let session = async {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| ConnectError::Session(e.to_string()))?;
            let hello = SessionMsg::Hello {
                version: PROTOCOL_VERSION,
                name: config.name.clone(),
                direct: reported.clone(),
            };
            write_frame(&mut send, &hello)
                .await
                .map_err(|e| ConnectError::Session(e.to_string()))?;
            let interfaces = SessionMsg::Interfaces {
                list: config.interfaces.clone(),
            };
            write_frame(&mut send, &interfaces)
                .await
                .map_err(|e| ConnectError::Session(e.to_string()))?;
            let reply = read_frame::<SessionMsg, _>(&mut recv).await;
            Ok::<_, ConnectError>((send, recv, reply))
        }
        .await;
        let (send, recv, reply) = match session {
            Ok(x) => x,
            Err(e) => {
                return Err(match conn.close_reason() {
                    Some(c) => connect_failure(c, &report, &coord_text),
                    None => e,
                })
            }
        };
        let (session, observed) = match reply {
            Ok(Some(SessionMsg::Welcome { session, observed })) => (session, observed),
            Ok(Some(SessionMsg::Reject { code, message })) => {
                return Err(ConnectError::Rejected { code, message })
            }
            Ok(Some(other)) => {
                return Err(ConnectError::Session(format!(
                    "expected welcome, got {other:?}"
                )))
            }
            Ok(None) | Err(_) => {
                // The close usually carries the rejection.
                let closed = timeout(std::time::Duration::from_secs(1), conn.closed()).await;
                return Err(match closed {
                    Ok(c) => connect_failure(c, &report, &coord_text),
                    Err(_) => ConnectError::Session(format!("{reply:?}")),
                });
            }
        };
        info!(parent: &span, session, observed = %observed, "connected to {}", &coord_text);

        let direct = punch_socket.map(|socket| {
            Direct::start(DirectParts {
                endpoint: endpoint.clone(),
                socket,
                identity: identity.clone(),
                peers: peers.clone(),
                tuning: config.tuning.clone(),
                timeout: config.direct.timeout,
                grace: config.direct.grace,
                header_timeout: config.connect_timeout,
                span: span.clone(),
            })
        });
        let (session_tx, session_rx) = mpsc::channel(4);
        let closed_why = Arc::new(OnceLock::new());
        let session_task = tokio::spawn(
            run_session_stream(
                conn.clone(),
                closed_why.clone(),
                send,
                recv,
                config.heartbeat,
                session_rx,
            )
            .instrument(span.clone()),
        );
        let gates = config
            .quotas
            .iter()
            .map(|(name, q)| (name.clone(), Gate::new(name, *q)))
            .collect();
        let routes: Routes = Arc::default();
        let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_backlog.max(1));
        let driver = tokio::spawn(
            drive(conn.clone(), routes.clone(), incoming_tx, config.clone())
                .instrument(span.clone()),
        );
        Ok(Client {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                session,
                observed,
                coordinator: coord_text,
                config,
                endpoint,
                owns_endpoint,
                conn,
                closed_why,
                routes,
                direct,
                fingerprint: identity.fingerprint(),
                incoming: tokio::sync::Mutex::new(incoming_rx),
                session_tx,
                session_task,
                gates,
                driver,
                span,
            }),
        })
    }

    /// This client's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The session number the coordinator assigned.
    pub fn session_id(&self) -> u64 {
        self.inner.session
    }

    /// This client's address as the coordinator sees it.
    pub fn observed_addr(&self) -> SocketAddr {
        self.inner.observed
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

    fn parts(&self, peer: String, name: String, label: String, mode: PathMode) -> Parts {
        let c = &self.inner.config;
        Parts {
            conn: self.inner.conn.clone(),
            closed_why: self.inner.closed_why.clone(),
            routes: self.inner.routes.clone(),
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
        first: &ChannelMsg,
    ) -> Result<(SendStream, RecvStream), OpenError> {
        let (mut send, recv) = self
            .inner
            .conn
            .open_bi()
            .await
            .map_err(|_| OpenError::Session(self.session_error()))?;
        write_frame(&mut send, first)
            .await
            .map_err(|_| OpenError::Session(self.session_error()))?;
        Ok((send, recv))
    }

    /// The coordinator's next answer on a stream from
    /// [`Client::request_stream`], within the open timeout. An
    /// `OpenFailed` answer comes back as the error it carries.
    pub(crate) async fn next_answer(&self, recv: &mut RecvStream) -> Result<ChannelMsg, OpenError> {
        let limit = self.inner.config.open_timeout;
        match timeout(limit, read_frame::<ChannelMsg, _>(recv)).await {
            Ok(Ok(Some(ChannelMsg::OpenFailed { code, message }))) => {
                Err(OpenError::Failed { code, message })
            }
            Ok(Ok(Some(answer))) => Ok(answer),
            Ok(Ok(None) | Err(_)) => Err(OpenError::Session(self.session_error())),
            Err(_) => Err(OpenError::Timeout {
                secs: limit.as_secs(),
            }),
        }
    }

    pub(crate) fn session_error(&self) -> String {
        match self.inner.conn.close_reason() {
            Some(c) => describe_end(&c, &self.inner.closed_why),
            None => "the session is closing".into(),
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
            let (mut send, mut recv) = self
                .inner
                .conn
                .open_bi()
                .await
                .map_err(|_| OpenError::Session(self.session_error()))?;
            let mut parts = self.parts(peer.to_owned(), channel.to_owned(), label.clone(), mode);
            // Ready is reported once open returns it.
            parts.defer_ready = true;
            let pending = Pending::register(parts, &send);
            let open = ChannelMsg::Open {
                peer: peer.to_owned(),
                channel: channel.to_owned(),
                path: mode,
            };
            if write_frame(&mut send, &open).await.is_err() {
                pending.abandon();
                return Err(OpenError::Session(self.session_error()));
            }
            let secs = self.inner.config.open_timeout.as_secs();
            let reply = timeout(
                self.inner.config.open_timeout,
                read_frame::<ChannelMsg, _>(&mut recv),
            )
            .await;
            match reply {
                Ok(Ok(Some(ChannelMsg::Ready {
                    channel: number,
                    peer: intro,
                    interface,
                }))) => {
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
                            info!(cause = %reason, "direct-only channel without a direct path");
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
                Ok(Ok(Some(ChannelMsg::OpenFailed { code, message }))) => {
                    pending.abandon();
                    info!(code = ?code, cause = %message, "open failed");
                    Err(OpenError::Failed { code, message })
                }
                Ok(Ok(Some(other))) => {
                    pending.abandon();
                    Err(OpenError::Protocol(format!("unexpected {other:?}")))
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    pending.abandon();
                    Err(OpenError::Session(self.session_error()))
                }
                Err(_) => {
                    pending.abandon();
                    let _ = send.reset(VarInt::from_u32(StreamCode::Cancelled.code()));
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
        loop {
            let mut offer = incoming.recv().await?;
            let quota = match self.inner.gates.get(&offer.channel) {
                Some(gate) => match gate.take_channel() {
                    Ok(slot) => Some(slot),
                    Err(why) => {
                        info!(parent: &self.inner.span, from = %offer.from, cause = %why, "refusing a channel over quota");
                        offer.refuse(&why).await;
                        continue;
                    }
                },
                None => None,
            };
            let label = format!("{}>{}!{}", offer.from, self.inner.name, offer.channel);
            let mut parts =
                self.parts(offer.from.clone(), offer.channel.clone(), label, offer.mode);
            parts.quota = quota;
            offer.parts = Some(PartsBox(parts));
            return Some(offer);
        }
    }

    /// Leave: close the connection with a normal code and `reason`. On an
    /// endpoint of its own, also wait (up to 2 s) until the close has been
    /// sent; a shared endpoint is its owner's to drain.
    pub async fn close(&self, reason: &str) {
        info!(parent: &self.inner.span, reason, "leaving");
        if let Some(d) = &self.inner.direct {
            d.close_all();
        }
        self.inner
            .conn
            .close(VarInt::from_u32(ConnCode::Normal.code()), reason.as_bytes());
        if self.inner.owns_endpoint {
            let _ = timeout(
                std::time::Duration::from_secs(2),
                self.inner.endpoint.wait_idle(),
            )
            .await;
        }
    }

    /// Wait until the session ends and say why.
    pub async fn closed(&self) -> String {
        describe_end(&self.inner.conn.closed().await, &self.inner.closed_why)
    }

    /// The coordinator address this client connected to.
    pub fn coordinator(&self) -> &str {
        &self.inner.coordinator
    }
}

/// Accept what the coordinator opens towards this client: channel offers
/// (bidirectional) and data streams (unidirectional).
async fn drive(
    conn: Connection,
    routes: Routes,
    incoming: mpsc::Sender<IncomingChannel>,
    config: ClientConfig,
) {
    let t = &config.tuning;
    let bi_allowance = StreamAllowance::new(
        conn.clone(),
        StreamKind::Bi,
        t.max_bidi_streams,
        t.stream_ceiling,
    );
    let uni_allowance = StreamAllowance::new(
        conn.clone(),
        StreamKind::Uni,
        t.max_uni_streams,
        t.stream_ceiling,
    );
    loop {
        tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    // Channel control streams live as long as their channel;
                    // the guard travels with the offer into the channel.
                    let guard = bi_allowance.opened();
                    tokio::spawn(offer(send, recv, incoming.clone(), config.clone(), guard).in_current_span());
                }
                Err(e) => {
                    info!(reason = %qmesh_certs::transport::describe_close(&e), "session ended");
                    break;
                }
            },
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    let guard = uni_allowance.opened();
                    tokio::spawn(route(recv, routes.clone(), config.connect_timeout, guard).in_current_span());
                }
                Err(_) => break,
            },
        }
    }
}

/// Read a channel offer and queue it for `accept`.
async fn offer(
    mut send: SendStream,
    mut recv: RecvStream,
    incoming: mpsc::Sender<IncomingChannel>,
    config: ClientConfig,
    guard: StreamGuard,
) {
    let first = timeout(
        config.connect_timeout,
        read_frame::<ChannelMsg, _>(&mut recv),
    )
    .await;
    let (from, channel, mode) = match first {
        Ok(Ok(Some(ChannelMsg::Incoming {
            from,
            channel,
            path,
        }))) => (from, channel, path),
        other => {
            warn!(got = ?other.map(|r| r.map(|m| m.is_some())), "bad channel offer from the coordinator");
            let _ = send.reset(VarInt::from_u32(StreamCode::Malformed.code()));
            return;
        }
    };
    debug!(from = %from, channel = %channel, "channel offered");
    let offer = IncomingChannel {
        from,
        channel,
        mode,
        streams: Some((send, recv)),
        parts: None,
        open_timeout: config.open_timeout,
        guard: Some(guard),
    };
    // A full backlog waits for room (the opener is waiting for an answer
    // anyway, and QUIC's stream limit bounds how many offers can wait);
    // past the open timeout the offer is refused as busy.
    let mut offer = match timeout(config.open_timeout, incoming.reserve()).await {
        Ok(Ok(permit)) => {
            permit.send(offer);
            return;
        }
        Ok(Err(_)) => return,
        Err(_) => offer,
    };
    if let Some((mut send, _recv)) = offer.streams.take() {
        let refuse = ChannelMsg::Refuse {
            reason: "busy: nobody is accepting channels".into(),
        };
        if write_frame(&mut send, &refuse).await.is_ok() {
            let _ = send.finish();
        }
    }
}

/// Hand a data stream to its channel.
async fn route(
    mut recv: RecvStream,
    routes: Routes,
    header_timeout: std::time::Duration,
    guard: StreamGuard,
) {
    let (channel, messages) =
        match timeout(header_timeout, read_frame::<StreamHeader, _>(&mut recv)).await {
            Ok(Ok(Some(StreamHeader::Data { channel }))) => (channel, false),
            Ok(Ok(Some(StreamHeader::Messages { channel }))) => (channel, true),
            _ => {
                let _ = recv.stop(VarInt::from_u32(StreamCode::Malformed.code()));
                return;
            }
        };
    let tx = lock(&routes).get(&channel).cloned();
    let Some(tx) = tx else {
        debug!(channel, "data stream for a channel that is gone");
        let _ = recv.stop(VarInt::from_u32(StreamCode::ChannelEnded.code()));
        return;
    };
    if let Err(mut recv) = tx.deliver(messages, (recv, guard)).await {
        let _ = recv.stop(VarInt::from_u32(StreamCode::ChannelEnded.code()));
    }
}

/// Run the session stream until it ends: heartbeats both ways and this
/// client's interface updates. A silent coordinator closes the connection
/// with [`ConnCode::HeartbeatMissed`], so every channel ends as lost; the
/// reason goes to `closed_why` first.
async fn run_session_stream(
    conn: Connection,
    closed_why: Arc<OnceLock<String>>,
    send: SendStream,
    recv: RecvStream,
    heartbeat: Heartbeat,
    outgoing: mpsc::Receiver<SessionMsg>,
) {
    let end = qmesh_proto::heartbeat::drive(recv, send, heartbeat, Some(outgoing), |msg| {
        Err(format!(
            "the coordinator sent an unexpected {msg:?} on the session stream"
        ))
    })
    .await;
    if conn.close_reason().is_some() {
        // The session is already over (this client left, or the
        // connection ended): nothing to add.
        return;
    }
    let (code, why) = match end {
        StreamEnd::Silent { .. } => {
            let why = format!("the coordinator is silent: {end}");
            warn!(cause = %why, "closing the session");
            (ConnCode::HeartbeatMissed, why)
        }
        StreamEnd::Finished => (
            ConnCode::Normal,
            "the coordinator finished the session stream".to_owned(),
        ),
        StreamEnd::Violation(what) => {
            warn!(cause = %what, "closing the session");
            (ConnCode::UnexpectedMessage, what)
        }
        StreamEnd::Failed(_) | StreamEnd::Stopped => return,
    };
    let _ = closed_why.set(why.clone());
    conn.close(VarInt::from_u32(code.code()), why.as_bytes());
}

/// Why a session ended, for the user: the reason this client gave when it
/// closed the session itself, otherwise the close as QUIC reports it.
pub(crate) fn describe_end(err: &ConnectionError, closed_why: &OnceLock<String>) -> String {
    match (err, closed_why.get()) {
        (ConnectionError::LocallyClosed, Some(why)) => why.clone(),
        _ => qmesh_certs::transport::describe_close(err),
    }
}
