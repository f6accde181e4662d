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
use crate::config::{ClientConfig, Resolve};
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

/// The first address `host` resolves to (an IP host is itself): where a
/// one-shot exchange such as an enrollment goes.
pub(crate) async fn resolve(
    host: &Host,
    port: u16,
    overrides: &[Resolve],
) -> Result<SocketAddr, ConnectError> {
    Ok(lookup(host, port, overrides).await?[0])
}

/// Every address `host` resolves to, in the resolver's order, each once
/// (an IP host is itself). Never empty.
/// A name in `overrides` (the config's `resolve`) is not looked up.
pub(crate) async fn lookup(
    host: &Host,
    port: u16,
    overrides: &[Resolve],
) -> Result<Vec<SocketAddr>, ConnectError> {
    if let Some(ip) = host.to_ip() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let name = server_name(host);
    if let Some(addrs) = Resolve::find(overrides, &name, port) {
        return Ok(addrs.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
    }
    let found = tokio::net::lookup_host((name.as_str(), port))
        .await
        .map_err(|e| ConnectError::Resolve {
            host: name.clone(),
            reason: e.to_string(),
        })?;
    let mut out: Vec<SocketAddr> = Vec::new();
    for addr in found {
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    if out.is_empty() {
        return Err(ConnectError::Resolve {
            host: name,
            reason: "no addresses".into(),
        });
    }
    Ok(out)
}

/// One place a session can be tried: a configured coordinator address and
/// one UDP address its host resolved to. A name that resolves to several
/// addresses gives one candidate for each, all checked for that name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// Which configured address: its place in [`ClientConfig::addresses`].
    pub(crate) index: usize,
    /// The configured address, as given.
    pub(crate) address: Address,
    /// Where its host resolved to.
    pub(crate) addr: SocketAddr,
}

impl Candidate {
    /// The name the coordinator's certificate must carry: the configured
    /// host (the DNS name when it is one), never the address it resolved to.
    pub(crate) fn server_name(&self) -> Result<String, ConnectError> {
        let (host, _) = self.address.quic_endpoint()?;
        Ok(server_name(host))
    }

    /// Whether the configured host is a name the resolver was asked about.
    fn resolved(&self) -> bool {
        self.address
            .quic_endpoint()
            .is_ok_and(|(host, _)| host.to_ip().is_none())
    }
}

impl std::fmt::Display for Candidate {
    /// The configured address, and for a name the address it resolved to:
    /// `quic/coord.example.com:7447 (192.0.2.10:7447)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.resolved() {
            write!(f, "{} ({})", self.address, self.addr)
        } else {
            write!(f, "{}", self.address)
        }
    }
}

/// Resolve every configured coordinator address, each within `within`:
/// the candidates in the configured order, the addresses of each name
/// sorted (so that turns over them do not follow a DNS server's rotation),
/// and the errors of the addresses that did not resolve. An address that
/// is not a `quic/` address is an error at once.
pub(crate) async fn candidates(
    addresses: &[&Address],
    within: std::time::Duration,
    overrides: &[Resolve],
) -> Result<(Vec<Candidate>, Vec<ConnectError>), ConnectError> {
    let mut found = Vec::new();
    let mut unresolved = Vec::new();
    for (index, address) in addresses.iter().enumerate() {
        let (host, port) = address.quic_endpoint()?;
        let looked = timeout(within, lookup(host, port, overrides))
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError::Resolve {
                    host: server_name(host),
                    reason: format!("no answer from the resolver within {} s", within.as_secs()),
                })
            });
        match looked {
            Ok(mut addrs) => {
                addrs.sort();
                found.extend(addrs.into_iter().map(|addr| Candidate {
                    index,
                    address: (*address).clone(),
                    addr,
                }));
            }
            Err(e) => unresolved.push(e),
        }
    }
    Ok((found, unresolved))
}

/// The error for a connect that joined nowhere: the one failure when there
/// was one, else every failure, each naming what it tried.
pub(crate) fn none_joined(mut failures: Vec<ConnectError>) -> ConnectError {
    match failures.len() {
        0 => ConnectError::Session("no coordinator address".into()),
        1 => failures.remove(0),
        _ => ConnectError::NoneJoined { tried: failures },
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
        51 => "the coordinator refused this client's certificate: its signature does not verify against the coordinator's client CA (TLS alert decrypt_error), so it was issued by another CA of the same name, such as another coordinator's; ask the operator for a certificate, or a token to enroll with",
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
///
/// Every configured address is resolved, and each address a name resolves
/// to is a coordinator of its own: the first choice is spread at random
/// over all of them, and a failure that may pass goes on to the next. Each
/// lookup and each attempt has the connect timeout. Returns the candidate
/// the session joined.
pub(crate) async fn join(
    endpoint: Option<Endpoint>,
    config: &ClientConfig,
    interfaces: &[Interface],
    incoming: &mpsc::Sender<IncomingChannel>,
    span: &Span,
) -> Result<(Base, Session, Candidate), ConnectError> {
    let (candidates, mut failures) =
        candidates(&config.addresses(), config.connect_timeout, &config.resolve).await?;
    if candidates.is_empty() {
        return Err(none_joined(failures));
    }
    let first = crate::reconnect::first_choice(candidates.len(), crate::reconnect::jitter());
    let bind = bind_for(candidates[first].addr);
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
    // Each candidate in turn from the first choice; a refusal is final (the
    // coordinators of one mesh answer alike), anything else goes on.
    let mut joined = None;
    for k in 0..candidates.len() {
        let candidate = &candidates[(first + k) % candidates.len()];
        let attempt = timeout(
            config.connect_timeout,
            join_session(
                1,
                &endpoint,
                candidate,
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
                addr: candidate.to_string(),
                secs: config.connect_timeout.as_secs(),
            })
        });
        match attempt {
            Ok(session) => {
                joined = Some((session, candidate.clone()));
                break;
            }
            Err(e) if crate::reconnect::after_attempt(&e) == crate::reconnect::After::Stop => {
                return Err(e)
            }
            Err(e) => {
                if k + 1 < candidates.len() {
                    info!(parent: span, coordinator = %candidate, cause = %qmesh_proto::Untrusted::reason(&e), "trying the next coordinator");
                }
                failures.push(e);
            }
        }
    }
    let Some((session, at)) = joined else {
        return Err(none_joined(failures));
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

/// Connect to `coordinator` from `endpoint`, say hello (reporting this
/// client's addresses when it takes `direct` channels) and start the
/// session's tasks: the first session, and each one after a reconnect.
#[allow(clippy::too_many_arguments)] // one session's every input, named
pub(crate) async fn join_session(
    generation: u64,
    endpoint: &Endpoint,
    coordinator: &Candidate,
    direct: bool,
    config: &ClientConfig,
    interfaces: &[Interface],
    incoming: &mpsc::Sender<IncomingChannel>,
    span: &Span,
) -> Result<Session, ConnectError> {
    let addr = coordinator.addr;
    let name = coordinator.server_name()?;
    let coord_text = coordinator.to_string();
    let (client_config, report) = config.quic()?;
    let reported = direct.then(|| {
        let port = endpoint.local_addr().map(|a| a.port()).unwrap_or(0);
        reported_addrs(addr, port, &config.direct.advertise)
    });
    let connecting = endpoint
        .connect_with(client_config, addr, &name)
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

    fn candidate(index: usize, address: &str, addr: &str) -> Candidate {
        Candidate {
            index,
            address: address.parse().expect("address"),
            addr: addr.parse().expect("addr"),
        }
    }

    #[test]
    fn a_resolved_candidate_shows_its_address_and_is_checked_for_the_name() {
        let named = candidate(0, "quic/coord.example.com:7447", "192.0.2.10:7447");
        assert_eq!(
            named.to_string(),
            "quic/coord.example.com:7447 (192.0.2.10:7447)"
        );
        assert_eq!(named.server_name().expect("name"), "coord.example.com");
        let ip = candidate(1, "quic/192.0.2.10:7447", "192.0.2.10:7447");
        assert_eq!(ip.to_string(), "quic/192.0.2.10:7447");
        assert_eq!(ip.server_name().expect("name"), "192.0.2.10");
        let shorthand = candidate(1, "quic/$4:7447", "127.0.0.1:7447");
        assert_eq!(shorthand.to_string(), "quic/$4:7447");
    }

    #[tokio::test]
    async fn every_configured_address_becomes_candidates_in_order() {
        let a: Address = "quic/192.0.2.2:7000".parse().expect("address");
        let b: Address = "quic/[2001:db8::1]".parse().expect("address");
        let (found, unresolved) = candidates(&[&a, &b], std::time::Duration::from_secs(1), &[])
            .await
            .expect("candidates");
        assert!(unresolved.is_empty(), "{unresolved:?}");
        assert_eq!(
            found,
            [
                candidate(0, "quic/192.0.2.2:7000", "192.0.2.2:7000"),
                candidate(1, "quic/[2001:db8::1]", "[2001:db8::1]:7447"),
            ]
        );
        let tcp: Address = "tcp/192.0.2.2:7000".parse().expect("address");
        assert!(matches!(
            candidates(&[&a, &tcp], std::time::Duration::from_secs(1), &[]).await,
            Err(ConnectError::Address(_))
        ));
    }

    #[test]
    fn joining_nowhere_says_each_failure_or_the_one() {
        let timeout = |addr: &str| ConnectError::Timeout {
            addr: addr.into(),
            secs: 10,
        };
        assert!(matches!(
            none_joined(vec![timeout("quic/$4:1")]),
            ConnectError::Timeout { .. }
        ));
        assert!(matches!(none_joined(vec![]), ConnectError::Session(_)));
        let both = none_joined(vec![
            timeout("quic/c.example:1 (192.0.2.1:1)"),
            ConnectError::Resolve {
                host: "d.example".into(),
                reason: "no addresses".into(),
            },
        ]);
        assert_eq!(
            both.to_string(),
            "no coordinator could be joined; tried 2: [no answer from the coordinator at \
             quic/c.example:1 (192.0.2.1:1) within 10 s; is it running and reachable?] \
             [cannot resolve coordinator host d.example: no addresses]"
        );
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
    fn the_server_name_is_the_host_as_configured() {
        use qmesh_proto::address::Shorthand;
        let ip4: std::net::Ipv4Addr = "192.0.2.1".parse().expect("v4");
        let ip6: std::net::Ipv6Addr = "2001:db8::1".parse().expect("v6");
        assert_eq!(server_name(&Host::Ipv4(ip4)), "192.0.2.1");
        assert_eq!(server_name(&Host::Ipv6(ip6)), "2001:db8::1");
        assert_eq!(server_name(&Host::Name("c.example".into())), "c.example");
        assert_eq!(
            server_name(&Host::Path("/run/q.sock".into())),
            "/run/q.sock"
        );
        assert_eq!(
            server_name(&Host::Shorthand(Shorthand::Local4)),
            "127.0.0.1"
        );
        assert_eq!(server_name(&Host::Shorthand(Shorthand::Local6)), "::1");
        assert_eq!(
            server_name(&Host::Shorthand(Shorthand::LocalName)),
            "localhost"
        );
    }

    #[tokio::test]
    async fn a_name_in_the_resolve_overrides_is_not_looked_up() {
        let ip: std::net::IpAddr = "192.0.2.9".parse().expect("ip");
        let other: std::net::IpAddr = "192.0.2.10".parse().expect("ip");
        let overrides = [Resolve {
            host: "Coord.Invalid".into(),
            port: 7447,
            addrs: vec![ip, other],
        }];
        let host = Host::Name("coord.invalid".into());
        let found = lookup(&host, 7447, &overrides).await.expect("lookup");
        assert_eq!(
            found,
            [SocketAddr::new(ip, 7447), SocketAddr::new(other, 7447)]
        );
        assert_eq!(
            resolve(&host, 7447, &overrides).await.expect("resolve"),
            SocketAddr::new(ip, 7447)
        );
        // An IP host is itself, whatever the overrides say.
        let v4 = Host::Ipv4("192.0.2.1".parse().expect("v4"));
        assert_eq!(
            lookup(&v4, 9, &overrides).await.expect("lookup"),
            ["192.0.2.1:9".parse::<SocketAddr>().expect("addr")]
        );
        // Names sort within one configured address, and keep its index.
        let named: Address = "quic/coord.invalid".parse().expect("address");
        let reversed = [Resolve {
            host: "coord.invalid".into(),
            port: 7447,
            addrs: vec![other, ip],
        }];
        let (found, _) = candidates(&[&named], std::time::Duration::from_secs(1), &reversed)
            .await
            .expect("candidates");
        assert_eq!(
            found,
            [
                candidate(0, "quic/coord.invalid", "192.0.2.9:7447"),
                candidate(0, "quic/coord.invalid", "192.0.2.10:7447"),
            ]
        );
    }

    #[tokio::test]
    async fn a_name_is_looked_up_and_each_address_kept_once() {
        // `localhost` comes from the hosts file: no network needed.
        let found = timeout(
            std::time::Duration::from_secs(10),
            lookup(&Host::Name("localhost".into()), 7447, &[]),
        )
        .await
        .expect("the resolver answers")
        .expect("localhost resolves");
        assert!(!found.is_empty());
        for (i, addr) in found.iter().enumerate() {
            assert!(addr.ip().is_loopback(), "{found:?}");
            assert_eq!(addr.port(), 7447);
            assert!(!found[..i].contains(addr), "{found:?}");
        }
    }

    #[test]
    fn a_client_reports_its_route_address_then_the_extra_ones_once_each() {
        let coordinator: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
        let extra: Vec<SocketAddr> = (1..=9)
            .map(|i| SocketAddr::from(([192, 0, 2, i], 7000)))
            .collect();
        let out = reported_addrs(coordinator, 5555, &extra[..2]);
        // Towards a loopback coordinator the route is the loopback address,
        // with the endpoint's port.
        assert_eq!(
            out,
            ["127.0.0.1:5555".parse().expect("addr"), extra[0], extra[1]]
        );
        let twice = reported_addrs(coordinator, 5555, &[extra[0], extra[0]]);
        assert_eq!(twice.len(), 2, "{twice:?}");
        let many = reported_addrs(coordinator, 5555, &extra);
        assert_eq!(many.len(), qmesh_proto::limits::MAX_REPORTED_ADDRS);
    }

    /// A connection closed by the peer with TLS alert `alert`.
    fn alert(alert: u8) -> ConnectionError {
        ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(alert),
            frame_type: None,
            reason: bytes::Bytes::new(),
        })
    }

    #[test]
    fn each_tls_alert_about_the_client_certificate_says_what_it_means() {
        for (code, words) in [
            (42, "malformed"),
            (43, "not a client certificate"),
            (44, "revoked"),
            (45, "expired"),
            (46, "certificate_unknown"),
            (49, "access_denied"),
            (48, "unknown_ca"),
            (51, "decrypt_error"),
            (116, "none was presented"),
        ] {
            let said = tls_refusal(&alert(code)).unwrap_or_else(|| panic!("alert {code}"));
            assert!(said.contains(words), "alert {code}: {said}");
        }
        // Other alerts, other transport codes and other errors are not about
        // this client's certificate.
        assert_eq!(tls_refusal(&alert(40)), None);
        let not_crypto = ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::PROTOCOL_VIOLATION,
            frame_type: None,
            reason: bytes::Bytes::new(),
        });
        assert_eq!(tls_refusal(&not_crypto), None);
        assert_eq!(tls_refusal(&ConnectionError::TimedOut), None);
    }

    #[test]
    fn a_failed_connect_says_why_in_the_users_terms() {
        let report = qmesh_certs::VerifyReport::default();
        let refused = connect_failure(alert(44), &report, "quic/$4");
        assert!(
            matches!(&refused, ConnectError::CertificateRefused(s) if s.contains("revoked")),
            "{refused:?}"
        );
        let rejected = ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: quinn::VarInt::from_u32(RejectCode::NameTaken.conn_code().code()),
            reason: bytes::Bytes::from_static(b"alice is here"),
        });
        let said = connect_failure(rejected, &report, "quic/$4");
        assert!(
            matches!(&said, ConnectError::Rejected { code: RejectCode::NameTaken, message } if message == "alice is here"),
            "{said:?}"
        );
        match connect_failure(ConnectionError::TimedOut, &report, "quic/$4") {
            ConnectError::Handshake { addr, reason } => {
                assert_eq!(addr, "quic/$4");
                assert!(reason.contains("is the coordinator running"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        match connect_failure(ConnectionError::Reset, &report, "quic/$4") {
            ConnectError::Handshake { reason, .. } => assert!(reason.contains("reset"), "{reason}"),
            other => panic!("{other:?}"),
        }
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
