//! Coordinator configuration.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use qmesh_certs::transport::Tuning;
use qmesh_certs::Identity;
use qmesh_proto::address::DEFAULT_COORDINATOR_PORT;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The coordinator's certificate chain and key.
    pub identity: Identity,
    /// QUIC transport settings (idle timeout, windows, stream limits).
    pub tuning: Tuning,
    /// How long a new connection has to complete its hello.
    pub hello_timeout: Duration,
    /// How long a callee has to accept or refuse a channel.
    pub answer_timeout: Duration,
    /// How long a graceful close may wait for the closer's data streams to
    /// be relayed before the close is forwarded anyway.
    pub drain_timeout: Duration,
    /// Kernel UDP socket buffer size to ask for (send and receive), so a
    /// burst of handshakes or a fast stream is not dropped by the kernel.
    pub socket_buffer: usize,
    /// Most clients connected at once; the next one is refused with
    /// `RejectCode::Full`. `None`: no limit.
    pub max_clients: Option<usize>,
    /// Most channels one client may be part of at once (as opener or
    /// callee); an open past it fails with `OpenFailCode::TooManyChannels`.
    pub max_channels_per_client: usize,
}

impl Config {
    /// Defaults for everything but the identity; listens on `*4:7447`.
    pub fn new(identity: Identity) -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_COORDINATOR_PORT)),
            identity,
            tuning: Tuning::default(),
            hello_timeout: Duration::from_secs(10),
            answer_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            socket_buffer: qmesh_certs::transport::SOCKET_BUFFER,
            max_clients: None,
            max_channels_per_client: 1024,
        }
    }
}
