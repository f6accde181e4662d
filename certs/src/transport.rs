//! QUIC transport settings shared by the coordinator and clients.
//!
//! Every number here is a product default with its reason beside it; the
//! coordinator and client configurations expose the ones a deployment may
//! need to change.

use std::sync::Arc;
use std::time::Duration;

use std::io;
use std::net::{SocketAddr, UdpSocket};

use quinn::{IdleTimeout, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

/// Tunable transport settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// Close a connection after this long without hearing from the peer.
    /// This is also how long a vanished peer takes to be reported lost.
    pub idle_timeout: Duration,
    /// Send a keep-alive this often (clients), so an idle but live session
    /// never reaches the idle timeout. `None` sends none (coordinator).
    pub keep_alive: Option<Duration>,
    /// Bytes a peer may have in flight on one stream before it must wait
    /// for the reader. Bounds the relay's buffer per stream.
    pub stream_window: u32,
    /// Bytes a peer may have in flight on the whole connection.
    pub conn_window: u32,
    /// Bytes this side buffers for sending on the whole connection.
    pub send_window: u64,
    /// Concurrent bidirectional streams (channels) a peer may open at
    /// first. quinn keeps state for every stream a peer may open, so the
    /// limit starts small and [`StreamAllowance`] raises it as it fills.
    pub max_bidi_streams: u32,
    /// Concurrent unidirectional streams (data streams) a peer may open at
    /// first; raised likewise.
    pub max_uni_streams: u32,
    /// The most either limit is ever raised to.
    pub stream_ceiling: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive: None,
            // 2 MiB per stream keeps a loopback or LAN stream at full speed
            // while bounding what one stalled stream can pin in the relay.
            stream_window: 2 * 1024 * 1024,
            // 16 MiB per connection: room for several busy streams.
            conn_window: 16 * 1024 * 1024,
            // 16 MiB of unacknowledged sends per connection.
            send_window: 16 * 1024 * 1024,
            // quinn-proto keeps a map entry per stream a peer may open:
            // 256 + 256 cost about 26 KiB per idle connection, 16 + 16 about
            // 2 KiB. Busy connections are raised on demand up to 4096.
            max_bidi_streams: 16,
            max_uni_streams: 16,
            stream_ceiling: 4096,
        }
    }
}

/// The keep-alive interval for an idle timeout: a third of it, and never
/// more than 5 s. QUIC uses the smaller of the two sides' idle timeouts, and
/// a client cannot learn the coordinator's before connecting, so the cap
/// keeps clients alive under any coordinator idle timeout of 15 s or more.
pub fn keep_alive_for(idle: Duration) -> Duration {
    (idle / 3).min(Duration::from_secs(5))
}

impl Tuning {
    /// Client defaults: as [`Tuning::default`], with a keep-alive (see
    /// [`keep_alive_for`]).
    pub fn client() -> Self {
        let mut t = Self::default();
        t.keep_alive = Some(keep_alive_for(t.idle_timeout));
        t
    }

    /// Set the idle timeout, and the keep-alive (if any) to match it.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        if self.keep_alive.is_some() {
            self.keep_alive = Some(keep_alive_for(idle));
        }
        self
    }

    /// Build the quinn transport configuration.
    pub fn transport_config(&self) -> Arc<TransportConfig> {
        Arc::new(self.transport())
    }

    /// The quinn transport configuration, for callers that adjust it
    /// further before use.
    pub fn transport(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .unwrap_or_else(|_| IdleTimeout::from(VarInt::from_u32(30_000)));
        t.max_idle_timeout(Some(idle));
        t.keep_alive_interval(self.keep_alive);
        // quinn's default first RTT estimate (333 ms) makes the first
        // resend of a lost handshake packet wait about a second, doubling
        // each time: at 10 % loss a handshake then sometimes takes over
        // the 10 s connect timeout (measured in the loss lab). 100 ms
        // resends after about 300 ms; a path slower than that sends a
        // spare first packet or two until its first RTT sample.
        t.initial_rtt(Duration::from_millis(100));
        t.stream_receive_window(VarInt::from_u32(self.stream_window));
        t.receive_window(VarInt::from_u32(self.conn_window));
        t.send_window(self.send_window);
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_bidi_streams));
        t.max_concurrent_uni_streams(VarInt::from_u32(self.max_uni_streams));
        // QUIC datagrams carry only heartbeat beats on a session ([`pulse`]):
        // a buffer of a few of them, the oldest dropped when it is full, so
        // what a peer sends there cannot pile up. Direct connections take
        // larger ones for forwarded UDP.
        t.datagram_receive_buffer_size(Some(PULSE_BUFFER));
        t.datagram_send_buffer_size(PULSE_BUFFER);
        t
    }
}

/// Bytes of beat datagrams a session connection buffers each way.
pub const PULSE_BUFFER: usize = 1024;

/// Beats as QUIC datagrams beside a session stream, until `conn` closes
/// (protocol.md §13.1).
///
/// Sends a ping datagram every `every` when the session has heard nothing
/// for that long ([`qmesh_proto::heartbeat::Pulse::silent_for`]; an idle
/// session whose stream beats flow sends none) and each time
/// `pulse.kick` is notified (a probe), answers every ping datagram with a
/// pong, and notifies
/// `pulse.heard` for every beat that arrives. Datagrams are not held back
/// by flow control, so the other side hears these while the session
/// stream waits behind full connection windows. Anything that is not a
/// beat is ignored. A peer that takes no datagrams (an older version)
/// gets none, and the session stream's beats are all there is.
pub async fn pulse(
    conn: quinn::Connection,
    every: Duration,
    pulse: Arc<qmesh_proto::heartbeat::Pulse>,
) {
    use qmesh_proto::heartbeat::Beat;
    let send = |beat: Beat| {
        // Best effort: a full buffer drops the oldest, and a peer that
        // takes none is told nothing.
        let _ = conn.send_datagram(bytes::Bytes::copy_from_slice(&beat.to_datagram()));
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            got = conn.read_datagram() => match got {
                Ok(datagram) => {
                    if let Some(beat) = Beat::from_datagram(&datagram) {
                        if let Beat::Ping(n) = beat {
                            send(Beat::Pong(n));
                        }
                        pulse.hear(tokio::time::Instant::now());
                        pulse.heard.notify_one();
                    }
                }
                Err(_) => return,
            },
            _ = ticks.tick() => {
                if pulse.silent_for() >= every {
                    seq += 1;
                    send(Beat::Ping(seq));
                }
            }
            () = pulse.kick.notified() => {
                seq += 1;
                send(Beat::Ping(seq));
            }
        }
    }
}

/// A sentence for why a QUIC connection ended, naming qmesh close codes.
pub fn describe_close(err: &quinn::ConnectionError) -> String {
    use qmesh_proto::codes::ConnCode;
    use quinn::ConnectionError;
    match err {
        ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason);
            match ConnCode::from_code(close.error_code.into_inner()) {
                Some(code) if reason.is_empty() => format!("closed: {}", code.describe()),
                Some(code) => format!("closed: {} ({reason})", code.describe()),
                None => format!("closed with code {}: {reason}", close.error_code),
            }
        }
        ConnectionError::TimedOut => {
            "connection timed out (nothing heard within the idle timeout)".into()
        }
        ConnectionError::LocallyClosed => "closed locally".into(),
        ConnectionError::Reset => "connection reset by the peer".into(),
        other => other.to_string(),
    }
}

/// Kernel UDP buffer size qmesh asks for on every socket (4 MiB): a
/// burst of handshakes or a fast stream is not dropped before quinn reads it.
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Bind a UDP socket for QUIC with `buffer` bytes of kernel send and receive
/// buffer. Large buffers keep a burst of handshakes, or a fast stream, from
/// being dropped by the kernel before quinn reads it; the kernel may grant
/// less than asked (`net.core.rmem_max`).
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let socket = udp_socket(addr, buffer)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// An unbound UDP socket for `addr`'s family with `buffer` bytes of kernel
/// buffer each way (0: the OS default).
fn udp_socket(addr: SocketAddr, buffer: usize) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // `[::]` also accepts IPv4 where the OS allows it.
        let _ = socket.set_only_v6(false);
    }
    if buffer > 0 {
        let _ = socket.set_recv_buffer_size(buffer);
        let _ = socket.set_send_buffer_size(buffer);
    }
    Ok(socket)
}

/// `count` UDP sockets on one address (port 0: the port the first one
/// gets), each with `SO_REUSEPORT` and `buffer` bytes of kernel buffer
/// each way. The kernel gives each peer's datagrams, by its address and
/// port, to one of them.
#[cfg(unix)]
pub fn bind_udp_shared(
    addr: SocketAddr,
    buffer: usize,
    count: usize,
) -> io::Result<Vec<UdpSocket>> {
    let mut sockets: Vec<UdpSocket> = Vec::with_capacity(count);
    let mut at = addr;
    for _ in 0..count.max(1) {
        let socket = udp_socket(at, buffer)?;
        socket.set_reuse_port(true)?;
        socket.bind(&at.into())?;
        let socket: UdpSocket = socket.into();
        at = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(sockets)
}

/// A client endpoint on `bind` with [`SOCKET_BUFFER`]-sized socket buffers.
pub fn client_endpoint(bind: SocketAddr) -> io::Result<quinn::Endpoint> {
    let socket = bind_udp(bind, SOCKET_BUFFER)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Which kind of peer-opened stream a [`StreamAllowance`] tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Bidirectional streams (channel control streams).
    Bi,
    /// Unidirectional streams (data streams).
    Uni,
}

/// Raises a connection's limit of concurrent peer-opened streams as it
/// fills, so that idle connections keep a small limit (and little state)
/// while busy ones are not held back. Call [`StreamAllowance::opened`] for
/// each accepted stream and keep the guard while the stream is in use.
#[derive(Debug)]
pub struct StreamAllowance {
    conn: quinn::Connection,
    kind: StreamKind,
    ceiling: u64,
    /// (active streams, current limit)
    state: std::sync::Mutex<(u64, u64)>,
}

impl StreamAllowance {
    /// Track `kind` streams on `conn`, whose limit starts at `initial`.
    pub fn new(conn: quinn::Connection, kind: StreamKind, initial: u32, ceiling: u32) -> Arc<Self> {
        Arc::new(Self {
            conn,
            kind,
            ceiling: u64::from(ceiling.max(initial)),
            state: std::sync::Mutex::new((0, u64::from(initial))),
        })
    }

    /// A peer-opened stream was accepted; the limit doubles once three
    /// quarters of it are in use.
    pub fn opened(self: &Arc<Self>) -> StreamGuard {
        let raise = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0 += 1;
            if s.0 * 4 >= s.1 * 3 && s.1 < self.ceiling {
                s.1 = (s.1 * 2).min(self.ceiling);
                Some(s.1)
            } else {
                None
            }
        };
        if let Some(limit) = raise {
            let limit = VarInt::from_u64(limit).unwrap_or(VarInt::MAX);
            match self.kind {
                StreamKind::Bi => self.conn.set_max_concurrent_bi_streams(limit),
                StreamKind::Uni => self.conn.set_max_concurrent_uni_streams(limit),
            }
        }
        StreamGuard(self.clone())
    }

    /// The current limit.
    pub fn limit(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

/// Counts one stream as in use until dropped.
#[derive(Debug)]
pub struct StreamGuard(Arc<StreamAllowance>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = s.0.saturating_sub(1);
    }
}
