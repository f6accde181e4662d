//! Connecting: resolving the coordinator, the QUIC handshake, the hello on
//! the session stream, and starting the session's tasks.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use qmesh_proto::address::Host;
use qmesh_proto::codec::{read_frame, write_frame};
use qmesh_proto::codes::ConnCode;
use qmesh_proto::msg::SessionMsg;
use qmesh_proto::PROTOCOL_VERSION;
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

/// A joined session and the tasks that serve it.
pub(crate) struct Joined {
    pub(crate) session: u64,
    pub(crate) observed: SocketAddr,
    pub(crate) coordinator: String,
    pub(crate) endpoint: Endpoint,
    pub(crate) owns_endpoint: bool,
    pub(crate) conn: Connection,
    pub(crate) closed_why: Arc<OnceLock<String>>,
    pub(crate) routes: Routes,
    pub(crate) direct: Option<Arc<Direct>>,
    pub(crate) fingerprint: qmesh_certs::Fingerprint,
    pub(crate) incoming: mpsc::Receiver<IncomingChannel>,
    pub(crate) session_tx: mpsc::Sender<SessionMsg>,
    pub(crate) session_task: JoinHandle<()>,
    pub(crate) driver: JoinHandle<()>,
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

/// Connect to the coordinator, say hello, and start the session's tasks.
pub(crate) async fn join(
    endpoint: Option<Endpoint>,
    config: &ClientConfig,
    span: &Span,
) -> Result<Joined, ConnectError> {
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
            let (e, socket) = direct_endpoint(bind, &identity, &peers, config)?;
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
    info!(parent: span, session, observed = %observed, "connected to {}", &coord_text);

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
    let routes: Routes = Arc::default();
    let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_backlog.max(1));
    let driver = tokio::spawn(
        drive(conn.clone(), routes.clone(), incoming_tx, config.clone()).instrument(span.clone()),
    );
    Ok(Joined {
        session,
        observed,
        coordinator: coord_text,
        endpoint,
        owns_endpoint,
        conn,
        closed_why,
        routes,
        direct,
        fingerprint: identity.fingerprint(),
        incoming: incoming_rx,
        session_tx,
        session_task,
        driver,
    })
}
