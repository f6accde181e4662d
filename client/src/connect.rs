//! Connecting: resolving the coordinator, the QUIC handshake, the hello on
//! the session stream, and starting the session's tasks.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use qmesh_proto::address::Host;
use qmesh_proto::codec::{read_frame, write_frame, ReadFrameError};
use qmesh_proto::codes::ConnCode;
use qmesh_proto::msg::{self, ClientSession, Greeting, Hello, Reject, Welcome};
use qmesh_proto::{Address, Interface, PROTOCOL_VERSION};
use quinn::{Connection, ConnectionError, Endpoint};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::{info, Instrument, Span};

use crate::channel::IncomingChannel;
use crate::config::ClientConfig;
use crate::direct::{Direct, DirectParts, PeerSet};
use crate::driver::{drive, run_session_stream};
use crate::error::ConnectError;
use crate::routes::Routes;
use crate::sync::lock;

/// One session with the coordinator: its connection, where the streams
/// the coordinator opens towards this client go, and the tasks that serve
/// it (aborted when the last copy is dropped).
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// This client's number for the session: 1 for the first, one more for
    /// each reconnect (the coordinator's numbers can repeat after it
    /// restarts).
    pub(crate) generation: u64,
    /// The session number the coordinator assigned.
    pub(crate) id: u64,
    /// This client's address as the coordinator sees it.
    pub(crate) observed: SocketAddr,
    pub(crate) conn: Connection,
    /// Why this client closed the session, when it did for a reason of its
    /// own (the coordinator went silent, or broke the protocol).
    pub(crate) closed_why: Arc<OnceLock<String>>,
    pub(crate) routes: Routes,
    /// Frames for the session stream (interface updates).
    pub(crate) session_tx: mpsc::Sender<ClientSession>,
    /// Set when the coordinator says it is going away: how long its live
    /// channels may still run.
    pub(crate) leaving: tokio::sync::watch::Receiver<Option<std::time::Duration>>,
    _tasks: Arc<Tasks>,
}

/// The session stream's task and the driver that accepts what the
/// coordinator opens.
#[derive(Debug)]
struct Tasks(JoinHandle<()>, JoinHandle<()>);

impl Drop for Tasks {
    fn drop(&mut self) {
        self.0.abort();
        self.1.abort();
    }
}

/// What a client keeps across its sessions: its endpoint and its direct
/// connections.
pub(crate) struct Base {
    pub(crate) endpoint: Endpoint,
    /// Whether `endpoint` was made for this client alone.
    pub(crate) owns_endpoint: bool,
    pub(crate) direct: Option<Arc<Direct>>,
    pub(crate) fingerprint: qmesh_certs::Fingerprint,
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
    let any = bind_for(coordinator);
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

/// The unspecified address of `towards`'s family, port 0: where to bind a
/// socket that talks to it.
pub(crate) fn bind_for(towards: SocketAddr) -> SocketAddr {
    if towards.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    }
}

/// Which endpoint a client connects from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndpointPlan {
    /// An endpoint shared with other clients: never takes direct channels
    /// (peers could not tell its clients apart).
    Shared,
    /// An endpoint of its own that also accepts direct connections.
    Direct,
    /// An endpoint of its own, relayed only.
    Plain,
}

/// Choose the endpoint: `own` when the client makes its own, with direct
/// channels when they are `direct` enabled.
pub(crate) fn plan_endpoint(own: bool, direct: bool) -> EndpointPlan {
    match (own, direct) {
        (false, _) => EndpointPlan::Shared,
        (true, true) => EndpointPlan::Direct,
        (true, false) => EndpointPlan::Plain,
    }
}

/// The frames that open a session: the hello (this client's name, the
/// protocol version and, when it takes direct channels, the addresses it
/// reports), then the interfaces it offers.
pub(crate) fn hello(
    name: &str,
    interfaces: &[Interface],
    reported: Option<Vec<SocketAddr>>,
) -> (Greeting, ClientSession) {
    (
        Greeting::Hello(Hello {
            version: PROTOCOL_VERSION,
            name: name.into(),
            direct: reported,
        }),
        ClientSession::Interfaces {
            list: interfaces.to_vec(),
        },
    )
}

/// What the coordinator's answer to a hello means.
#[derive(Debug)]
pub(crate) enum HelloAnswer {
    /// Joined as session `session`, seen from `observed`.
    Welcome {
        /// The session number.
        session: u64,
        /// This client's address as the coordinator sees it.
        observed: SocketAddr,
    },
    /// Refused: the error to return.
    Refused(ConnectError),
    /// No answer, or a frame that is not an answer to a hello: the
    /// connection's close says why; `otherwise` is the error's text should
    /// no close come.
    NoAnswer {
        /// What to say without a close.
        otherwise: String,
    },
}

/// Decide what the answer to a hello means.
pub(crate) fn judge_hello(reply: Result<Option<msg::HelloAnswer>, ReadFrameError>) -> HelloAnswer {
    match reply {
        Ok(Some(msg::HelloAnswer::Welcome(Welcome { session, observed }))) => {
            HelloAnswer::Welcome {
                session: session.into(),
                observed,
            }
        }
        Ok(Some(msg::HelloAnswer::Reject(Reject { code, message }))) => {
            HelloAnswer::Refused(ConnectError::Rejected { code, message })
        }
        Ok(None) | Err(_) => HelloAnswer::NoAnswer {
            otherwise: format!("{reply:?}"),
        },
    }
}

/// Make this client's endpoint, connect to the coordinator, say hello and
/// start the session's tasks; with an endpoint of its own that takes direct
/// channels, start accepting direct connections too.
pub(crate) async fn join(
    endpoint: Option<Endpoint>,
    config: &ClientConfig,
    interfaces: &[Interface],
    incoming: &mpsc::Sender<IncomingChannel>,
    span: &Span,
) -> Result<(Base, Session, usize), ConnectError> {
    let addresses = config.addresses();
    let first = crate::reconnect::first_choice(addresses.len(), crate::reconnect::jitter());
    let (host, port) = addresses[first].quic_endpoint()?;
    let addr = resolve(host, port).await?;
    let bind = bind_for(addr);
    let owns_endpoint = endpoint.is_none();
    let identity = config.identity()?;
    let peers: PeerSet = Arc::default();
    let (endpoint, punch_socket) = match (
        endpoint,
        plan_endpoint(owns_endpoint, config.direct.enabled),
    ) {
        (Some(e), _) => (e, None),
        (None, EndpointPlan::Direct) => {
            let (e, socket) = direct_endpoint(bind, &identity, &peers, config)?;
            (e, Some(socket))
        }
        (None, _) => (
            qmesh_certs::transport::client_endpoint(bind).map_err(ConnectError::Socket)?,
            None,
        ),
    };
    // Each address in turn from the first choice; a refusal is final (the
    // coordinators of one mesh answer alike), anything else goes on.
    let mut last = None;
    let mut joined = None;
    for k in 0..addresses.len() {
        let at = (first + k) % addresses.len();
        let attempt = timeout(
            config.connect_timeout,
            join_session(
                1,
                &endpoint,
                addresses[at],
                punch_socket.is_some(),
                config,
                interfaces,
                incoming,
                span,
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                addr: addresses[at].to_string(),
                secs: config.connect_timeout.as_secs(),
            })
        });
        match attempt {
            Ok(session) => {
                joined = Some((session, at));
                break;
            }
            Err(e) if crate::reconnect::after_attempt(&e) == crate::reconnect::After::Stop => {
                return Err(e)
            }
            Err(e) => {
                if addresses.len() > 1 {
                    info!(parent: span, coordinator = %addresses[at], cause = %qmesh_proto::Untrusted::reason(&e), "trying the next coordinator");
                }
                last = Some(e);
            }
        }
    }
    let Some((session, at)) = joined else {
        return Err(last.unwrap_or_else(|| ConnectError::Session("no coordinator address".into())));
    };
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
    let base = Base {
        endpoint,
        owns_endpoint,
        direct,
        fingerprint: identity.fingerprint(),
    };
    Ok((base, session, at))
}

/// Connect to the coordinator from `endpoint`, say hello (reporting this
/// client's addresses when it takes `direct` channels) and start the
/// session's tasks: the first session, and each one after a reconnect.
#[allow(clippy::too_many_arguments)] // one session's every input, named
pub(crate) async fn join_session(
    generation: u64,
    endpoint: &Endpoint,
    coordinator: &Address,
    direct: bool,
    config: &ClientConfig,
    interfaces: &[Interface],
    incoming: &mpsc::Sender<IncomingChannel>,
    span: &Span,
) -> Result<Session, ConnectError> {
    let (host, port) = coordinator.quic_endpoint()?;
    let host = host.clone();
    let addr = resolve(&host, port).await?;
    let coord_text = coordinator.to_string();
    let (client_config, report) = config.quic()?;
    let reported = direct.then(|| {
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
        let (greeting, interfaces) = hello(&config.name, interfaces, reported);
        let failed = |e: qmesh_proto::codec::WriteFrameError| ConnectError::Session(e.to_string());
        write_frame(&mut send, &greeting).await.map_err(failed)?;
        write_frame(&mut send, &interfaces).await.map_err(failed)?;
        let reply = read_frame::<msg::HelloAnswer, _>(&mut recv).await;
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
    let (id, observed) = match judge_hello(reply) {
        HelloAnswer::Welcome { session, observed } => (session, observed),
        HelloAnswer::Refused(e) => return Err(e),
        HelloAnswer::NoAnswer { otherwise } => {
            // The close usually carries the rejection.
            let closed = timeout(std::time::Duration::from_secs(1), conn.closed()).await;
            return Err(match closed {
                Ok(c) => connect_failure(c, &report, &coord_text),
                Err(_) => ConnectError::Session(otherwise),
            });
        }
    };
    info!(parent: span, session = id, observed = %observed, "connected to {}", &coord_text);

    let (session_tx, session_rx) = mpsc::channel(4);
    let closed_why = Arc::new(OnceLock::new());
    let (going_away, leaving) = tokio::sync::watch::channel(None);
    let session_task = tokio::spawn(
        run_session_stream(
            conn.clone(),
            closed_why.clone(),
            send,
            recv,
            config.heartbeat,
            session_rx,
            going_away,
        )
        .instrument(span.clone()),
    );
    let routes: Routes = Arc::default();
    let driver = tokio::spawn(
        drive(
            conn.clone(),
            generation,
            routes.clone(),
            incoming.clone(),
            config.clone(),
        )
        .instrument(span.clone()),
    );
    Ok(Session {
        generation,
        id,
        observed,
        conn,
        closed_why,
        routes,
        session_tx,
        leaving,
        _tasks: Arc::new(Tasks(session_task, driver)),
    })
}

#[cfg(test)]
mod tests {
    use qmesh_proto::codes::RejectCode;

    use super::*;

    fn config() -> ClientConfig {
        let address = "quic/localhost:4433".parse().expect("address");
        let ca = qmesh_certs::Ca::generate("test CA").expect("ca");
        let trust = qmesh_certs::Trust::Ca {
            certs: vec![ca.cert_der().clone()],
            source: "test".into(),
        };
        ClientConfig::new(address, "alice", trust)
    }

    #[test]
    fn a_welcome_joins_with_its_session_and_observed_address() {
        let observed: SocketAddr = "192.0.2.7:5000".parse().expect("addr");
        let reply = Ok(Some(msg::HelloAnswer::Welcome(Welcome {
            session: 9.into(),
            observed,
        })));
        assert!(matches!(
            judge_hello(reply),
            HelloAnswer::Welcome { session: 9, observed: o } if o == observed
        ));
    }

    #[test]
    fn a_reject_is_returned_with_its_code_and_message() {
        let reply = Ok(Some(msg::HelloAnswer::Reject(Reject {
            code: RejectCode::NameTaken,
            message: "alice is here".into(),
        })));
        match judge_hello(reply) {
            HelloAnswer::Refused(ConnectError::Rejected { code, message }) => {
                assert_eq!(
                    (code, message.as_str()),
                    (RejectCode::NameTaken, "alice is here")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    /// A frame of another type does not decode as an answer: it is
    /// malformed, and the connection's close is asked why.
    #[tokio::test]
    async fn another_message_is_malformed_and_asks_the_connection_close() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &ClientSession::Interfaces { list: vec![] })
            .await
            .expect("write");
        let reply = read_frame::<msg::HelloAnswer, _>(&mut b).await;
        match judge_hello(reply) {
            HelloAnswer::NoAnswer { otherwise } => {
                assert!(otherwise.contains("Decode"), "{otherwise}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_answer_asks_the_connection_close() {
        assert!(matches!(
            judge_hello(Ok(None)),
            HelloAnswer::NoAnswer { .. }
        ));
    }

    #[test]
    fn a_shared_endpoint_never_takes_direct_channels() {
        assert_eq!(plan_endpoint(false, true), EndpointPlan::Shared);
        assert_eq!(plan_endpoint(false, false), EndpointPlan::Shared);
        assert_eq!(plan_endpoint(true, true), EndpointPlan::Direct);
        assert_eq!(plan_endpoint(true, false), EndpointPlan::Plain);
    }

    #[test]
    fn sockets_bind_in_the_coordinators_address_family() {
        assert_eq!(
            bind_for("192.0.2.1:4433".parse().expect("v4")),
            "0.0.0.0:0".parse().expect("any")
        );
        assert_eq!(
            bind_for("[2001:db8::1]:4433".parse().expect("v6")),
            "[::]:0".parse().expect("any")
        );
    }

    #[test]
    fn the_hello_names_the_client_its_version_and_then_its_interfaces() {
        let reported = vec!["192.0.2.1:7000".parse().expect("addr")];
        let (first, second) = hello(&config().name, &[], Some(reported.clone()));
        match first {
            Greeting::Hello(Hello {
                version,
                name,
                direct,
            }) => {
                assert_eq!(
                    (version, name.as_str(), direct),
                    (PROTOCOL_VERSION, "alice", Some(reported))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(second, ClientSession::Interfaces { list } if list.is_empty()));
    }
}
