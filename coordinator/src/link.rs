//! The member link: one QUIC connection between each pair of coordinators
//! of a cluster, on which each stands in for the other's clients
//! (protocol.md §23).
//!
//! The connection uses its own endpoint and ALPN, `qmesh-peer/1`. Each
//! member registers the endpoint's address and its certificate's
//! fingerprint in the directory; the member with the lower id dials, and
//! both sides' certificates are pinned to the fingerprints the directory
//! lists. The dialler's first stream says which member it is, and that
//! member's listed fingerprint must be the one it presented.
//!
//! On each side the link is a `Session` whose `member` is set: an open
//! from a client here to a client of the other member is passed over the
//! link (`channel`), and the other member runs it with the link session
//! as the opener. From then on each member relays an ordinary channel,
//! client ⇄ link, with the same bounded copy, so flow control holds
//! across both hops.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmesh_certs::{AcceptFingerprint, CertError, Fingerprint};
use qmesh_proto::codec::{read_within, read_within_reserving, write_frame, Read, ReadFrameError};
use qmesh_proto::codes::{ConnCode, StreamCode};
use qmesh_proto::msg::{LinkAnswer, LinkHello, LinkRequest};
use qmesh_proto::{Untrusted, PROTOCOL_VERSION};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::config::Config;
use crate::directory::Member;
use crate::limit::{Limiter, RateLimits};
use crate::session::{Session, Shared};

/// Streams of each kind one link may have open at once: each channel
/// crossing it holds one bidirectional stream, and each data stream or
/// pipe one more while it is relayed.
const LINK_STREAMS: u32 = 8192;

/// A link's connection-level receive and send windows: room for many
/// channels' streams, each of which is bounded by its own stream window.
const LINK_WINDOW: u32 = 64 * 1024 * 1024;

/// How long a link may be silent before it is taken as lost: a member
/// killed without a word is found this soon, and the channels through it
/// end `Lost`. Keep-alives go every third of it.
pub(crate) const LINK_IDLE: Duration = Duration::from_secs(6);

/// How often links are checked against the members when nothing changed
/// (a dial that failed is tried again then).
const RECHECK: Duration = Duration::from_secs(1);

/// The server name a dialler asks for; the certificate is checked by its
/// fingerprint, not its names.
const SERVER_NAME: &str = "qmesh-member";

/// How a member link endpoint could not be made.
#[derive(Debug)]
pub(crate) enum EndpointError {
    Certificate(CertError),
    Socket(std::io::Error),
}

/// The member link endpoint on `config.link_socket`, or `None` when this
/// coordinator takes no links. It admits only a member the directory
/// lists, by the fingerprint of its certificate.
pub(crate) fn endpoint(config: &Config) -> Result<Option<Endpoint>, EndpointError> {
    let Some(socket) = &config.link_socket else {
        return Ok(None);
    };
    let socket = socket.try_clone().map_err(EndpointError::Socket)?;
    let directory = config.directory.clone();
    let accept: AcceptFingerprint = Arc::new(move |fp: &Fingerprint| {
        let fp = hex::encode(fp.0);
        directory.view().is_some_and(|v| {
            v.members
                .iter()
                .any(|m| m.id != v.me && m.fingerprint.as_deref() == Some(fp.as_str()))
        })
    });
    let mut server = qmesh_certs::link_server_config(&config.identity, accept)
        .map_err(EndpointError::Certificate)?;
    server.transport_config(transport(config));
    Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map(Some)
    .map_err(EndpointError::Socket)
}

fn transport(config: &Config) -> Arc<quinn::TransportConfig> {
    let mut t = config.tuning.transport();
    t.max_concurrent_bidi_streams(VarInt::from_u32(LINK_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(LINK_STREAMS));
    t.receive_window(VarInt::from_u32(LINK_WINDOW));
    t.send_window(u64::from(LINK_WINDOW));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(LINK_IDLE).ok());
    t.keep_alive_interval(Some(LINK_IDLE / 3));
    Arc::new(t)
}

/// Accept links from the members that dial this one, and dial those this
/// one should, until the coordinator stops.
pub(crate) async fn run(shared: Arc<Shared>) {
    let Some(endpoint) = shared.link_endpoint.clone() else {
        return;
    };
    let accept = async {
        while let Some(incoming) = endpoint.accept().await {
            shared
                .tasks
                .spawn(accepted(shared.clone(), incoming).in_current_span());
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = keep_links(&shared, &endpoint) => {}
        _ = shared.shutdown.cancelled() => {}
    }
}

/// Dial every member with a higher id that has no link, whenever the
/// members change (and every [`RECHECK`], for dials that failed).
async fn keep_links(shared: &Arc<Shared>, endpoint: &Endpoint) {
    let Some(mut changes) = shared.config.directory.changes() else {
        return;
    };
    let dialing: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        if let Some(view) = shared.config.directory.view() {
            for m in view.members {
                if m.id <= view.me || shared.links().contains_key(&m.id) {
                    continue;
                }
                if !dialing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(m.id.clone())
                {
                    continue;
                }
                let (shared2, endpoint, dialing, me) = (
                    shared.clone(),
                    endpoint.clone(),
                    dialing.clone(),
                    view.me.clone(),
                );
                let span = info_span!("link", member = %Untrusted::name(&m.id));
                shared.tasks.spawn(
                    async move {
                        let id = m.id.clone();
                        if let Err(e) = dial(&shared2, &endpoint, &me, m).await {
                            debug!(cause = %Untrusted::reason(&e), "dialling the member failed; trying again");
                        }
                        dialing
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                    }
                    .instrument(span),
                );
            }
        }
        let _ = tokio::time::timeout(RECHECK, changes.changed()).await;
    }
}

/// Dial member `m` and serve the link until it ends.
async fn dial(
    shared: &Arc<Shared>,
    endpoint: &Endpoint,
    me: &str,
    m: Member,
) -> Result<(), String> {
    let (Some(addr), Some(fp)) = (&m.peers, &m.fingerprint) else {
        return Err("it lists no link address".into());
    };
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| format!("its link address {addr:?}: {e}"))?;
    let fp: Fingerprint = fp
        .parse()
        .map_err(|_| format!("its fingerprint {fp:?} is not one"))?;
    let mut client =
        qmesh_certs::link_client_config(&shared.config.identity, fp).map_err(|e| e.to_string())?;
    client.transport_config(transport(&shared.config));
    let deadline = Instant::now() + shared.config.hello_timeout;
    let conn = tokio::time::timeout_at(deadline, async {
        endpoint
            .connect_with(client, addr, SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| format!("no handshake with {addr} in time"))??;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = LinkHello {
        version: PROTOCOL_VERSION,
        cluster: cluster_name(shared),
        member: me.to_owned(),
    };
    write_frame(&mut send, &hello)
        .await
        .map_err(|e| e.to_string())?;
    match read_within::<LinkAnswer, _>(deadline, &mut recv).await {
        Read::Frame(LinkAnswer::Welcome { member }) if member == m.id => {}
        Read::Frame(LinkAnswer::Welcome { member }) => {
            conn.close(ConnCode::UnexpectedMessage.varint(), b"wrong member");
            return Err(format!(
                "{addr} says it is member {}, not {}",
                Untrusted::name(&member),
                m.id
            ));
        }
        Read::Frame(LinkAnswer::Refused { reason }) => {
            return Err(format!("refused: {}", Untrusted::reason(&reason)))
        }
        _ => return Err("no answer to the link hello".into()),
    }
    serve(shared.clone(), conn, m.id, (send, recv)).await;
    Ok(())
}

fn cluster_name(shared: &Shared) -> String {
    shared
        .config
        .directory
        .view()
        .map(|v| v.cluster)
        .unwrap_or_default()
}

/// A member dialled this one: check who it is, then serve the link.
async fn accepted(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let deadline = Instant::now() + shared.config.hello_timeout;
    let conn = match tokio::time::timeout_at(deadline, async { incoming.accept()?.await }).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            info!(peer = %remote, cause = %Untrusted::reason(&e), "a member link handshake failed");
            return;
        }
        Err(_) => {
            info!(peer = %remote, "a member link handshake timed out");
            return;
        }
    };
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout_at(deadline, conn.accept_bi()).await
    else {
        conn.close(ConnCode::Malformed.varint(), b"no link hello");
        return;
    };
    let hello = match read_within::<LinkHello, _>(deadline, &mut recv).await {
        Read::Frame(h) => h,
        _ => {
            conn.close(ConnCode::Malformed.varint(), b"no link hello");
            return;
        }
    };
    let presented = qmesh_certs::peer_fingerprint(&conn).map(|f| hex::encode(f.0));
    let view = shared.config.directory.view().unwrap_or_default();
    let listed = view.members.iter().find(|m| m.id == hello.member);
    let refusal = if hello.version != PROTOCOL_VERSION {
        Some(format!(
            "protocol version {} here, {} there: run one qmesh version across the cluster",
            PROTOCOL_VERSION, hello.version
        ))
    } else if hello.cluster != view.cluster {
        Some(format!(
            "this member is in cluster {:?}, not \"{}\"",
            view.cluster,
            Untrusted::name(&hello.cluster)
        ))
    } else {
        match listed {
            None => Some(format!(
                "member {} is not in the directory",
                Untrusted::name(&hello.member)
            )),
            Some(m) if m.fingerprint.is_none() || m.fingerprint != presented => Some(format!(
                "member {} presented a certificate other than the one the directory lists",
                Untrusted::name(&hello.member)
            )),
            Some(_) => None,
        }
    };
    if let Some(reason) = refusal {
        warn!(peer = %remote, cause = %reason, "refusing a member link");
        let _ = write_frame(&mut send, &LinkAnswer::Refused { reason }).await;
        let _ = send.finish();
        conn.close(ConnCode::NotAuthorised.varint(), b"link refused");
        return;
    }
    let member = hello.member.clone();
    let answer = LinkAnswer::Welcome {
        member: view.me.clone(),
    };
    if write_frame(&mut send, &answer).await.is_err() {
        return;
    }
    serve(shared, conn, member, (send, recv))
        .instrument(info_span!("link", member = %Untrusted::name(&hello.member)))
        .await;
}

/// Serve the link to `member` until it ends: every stream the member
/// opens is a channel open, a pipe or a data stream of a channel that
/// crosses it.
async fn serve(
    shared: Arc<Shared>,
    conn: Connection,
    member: String,
    control: (SendStream, RecvStream),
) {
    let link = Arc::new(Session {
        id: 0,
        joined: std::time::SystemTime::now(),
        name: format!("coordinator {member}").as_str().into(),
        fingerprint: qmesh_certs::peer_fingerprint(&conn).unwrap_or(Fingerprint([0; 32])),
        key: None,
        direct: None,
        channels: Mutex::new(HashMap::new()),
        slots: AtomicUsize::new(0),
        // The clients' own coordinators hold them to their rate limits.
        limiter: Limiter::new(&RateLimits::unlimited()),
        interfaces: Mutex::default(),
        closed_why: std::sync::OnceLock::new(),
        probe: tokio::sync::Notify::new(),
        strikes: Default::default(),
        headers: tokio::sync::Semaphore::new(crate::limit::HEADER_BUDGET * 16),
        claim: Default::default(),
        member: Some(member.clone()),
        conn: conn.clone(),
    });
    if let Some(old) = shared.links().insert(member.clone(), link.clone()) {
        old.close(ConnCode::Replaced, "a new link to this member replaced it");
    }
    shared.link_changes.send_modify(|n| *n += 1);
    info!(peer = %conn.remote_address(), "member link up");
    let (_control_send, mut control_recv) = control;
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => {
                link.close(ConnCode::Shutdown, "coordinator shutting down");
                break;
            }
            // The control stream carries nothing after the hello; its end
            // is the other member leaving.
            _ = control_recv.read_to_end(0) => {
                link.close(ConnCode::Normal, "the member closed the link");
                break;
            }
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    let task = request(shared.clone(), link.clone(), send, recv);
                    shared.tasks.spawn(task.in_current_span());
                }
                Err(_) => break,
            },
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    let task = crate::relay::relay_stream(shared.clone(), link.clone(), recv);
                    shared.tasks.spawn(task.in_current_span());
                }
                Err(_) => break,
            },
        }
    }
    {
        let mut links = shared.links();
        if links.get(&member).is_some_and(|l| Arc::ptr_eq(l, &link)) {
            links.remove(&member);
        }
    }
    shared.link_changes.send_modify(|n| *n += 1);
    let reason = conn
        .close_reason()
        .map(|e| qmesh_certs::transport::describe_close(&e))
        .unwrap_or_else(|| "closed".into());
    info!(reason = %Untrusted::reason(&reason), "member link down");
}

/// A bidirectional stream the other member opened on the link.
async fn request(shared: Arc<Shared>, link: Arc<Session>, send: SendStream, mut recv: RecvStream) {
    let deadline = Instant::now() + shared.config.hello_timeout;
    match read_within_reserving::<LinkRequest, _, _>(deadline, &mut recv, |len| {
        link.header_room(len)
    })
    .await
    {
        Read::Frame(LinkRequest::Open(offer)) => {
            crate::channel::handle_link_open(shared, link, (send, recv), offer).await
        }
        Read::Frame(LinkRequest::Pipe { channel }) => {
            crate::relay::relay_pipe(shared, link, (send, recv), channel).await
        }
        Read::Frame(LinkRequest::Join { group }) => {
            crate::groupfeed::serve(shared, link, send, recv, group).await
        }
        Read::Frame(LinkRequest::Watch { live }) => {
            crate::presence::serve_local(&shared, send, recv, live).await
        }
        Read::Frame(LinkRequest::Describe { peer, channel }) => {
            crate::presence::describe_local(&shared, send, &peer, &channel).await
        }
        Read::Finished | Read::Failed(ReadFrameError::Io(_)) => {}
        Read::Late | Read::Failed(ReadFrameError::OverBudget { .. }) => {
            let _ = recv.stop(StreamCode::Cancelled.varint());
        }
        Read::Failed(e) => {
            let _ = recv.stop(StreamCode::Malformed.varint());
            link.stream_violation(&format!("a bad link request: {e}"));
        }
    }
}

/// One live member link, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkInfo {
    /// The other member's id.
    pub member: String,
    /// Its link endpoint's address.
    pub addr: String,
    /// Channels crossing the link now.
    pub channels: usize,
    /// UDP payload bytes sent on the link.
    pub sent: u64,
    /// UDP payload bytes received on the link.
    pub received: u64,
    /// Broadcast groups whose broadcasts go to the other member (it has
    /// members in them).
    #[serde(default)]
    pub groups: usize,
}

/// The live member links, by member id.
pub(crate) fn links(shared: &Shared) -> Vec<LinkInfo> {
    let mut out: Vec<LinkInfo> = shared
        .links()
        .iter()
        .filter(|(_, l)| l.conn.close_reason().is_none())
        .map(|(id, l)| {
            let stats = l.conn.stats();
            LinkInfo {
                member: id.clone(),
                addr: l.conn.remote_address().to_string(),
                channels: l.channels().len(),
                sent: stats.udp_tx.bytes,
                received: stats.udp_rx.bytes,
                groups: shared.groups.fed_to(id),
            }
        })
        .collect();
    out.sort_by(|a, b| a.member.cmp(&b.member));
    out
}
