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
#[derive(Debug, Clone)]
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
    /// Concurrent bidirectional streams (channels) a peer may open.
    pub max_bidi_streams: u32,
    /// Concurrent unidirectional streams (data streams) a peer may open.
    pub max_uni_streams: u32,
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
            // Channels and data streams are cheap; 256 of each at once per
            // connection, more wait for a free slot (QUIC flow control).
            max_bidi_streams: 256,
            max_uni_streams: 256,
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
        let mut t = TransportConfig::default();
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .unwrap_or_else(|_| IdleTimeout::from(VarInt::from_u32(30_000)));
        t.max_idle_timeout(Some(idle));
        t.keep_alive_interval(self.keep_alive);
        t.stream_receive_window(VarInt::from_u32(self.stream_window));
        t.receive_window(VarInt::from_u32(self.conn_window));
        t.send_window(self.send_window);
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_bidi_streams));
        t.max_concurrent_uni_streams(VarInt::from_u32(self.max_uni_streams));
        Arc::new(t)
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
/// less than asked (`net.core.rmem_max`), which is logged at debug.
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // `[::]` also accepts IPv4 where the OS allows it.
        let _ = socket.set_only_v6(false);
    }
    if buffer > 0 {
        let _ = socket.set_recv_buffer_size(buffer);
        let _ = socket.set_send_buffer_size(buffer);
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
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
