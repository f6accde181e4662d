//! Coordinator configuration.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Auth;
use crate::limit::RateLimits;
use crate::policy::Policy;

use qmesh_certs::transport::Tuning;
use qmesh_certs::Identity;
use qmesh_proto::address::DEFAULT_COORDINATOR_PORT;
use qmesh_proto::heartbeat::Heartbeat;
use qmesh_proto::msg::GroupPolicy;

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
    /// After a stop is asked for with [`crate::server::Coordinator::run_draining`]:
    /// how long live channels may still run before every session is closed
    /// (each client is told with `CoordinatorSession::GoingAway`).
    pub drain: Duration,
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
    /// Most data streams one side of a channel may have in flight through
    /// the relay at once; more are stopped with `StreamCode::TooManyStreams`.
    pub max_streams_per_channel: usize,
    /// Largest data message the relay passes on; a stream declaring a
    /// longer one is reset with `StreamCode::MessageTooLarge`.
    pub max_message: u64,
    /// Per-client rate limits on relayed bytes and messages.
    pub rate: RateLimits,
    /// Most connections at once that have not finished their hello;
    /// past a quarter of it unvalidated addresses get a QUIC Retry, past
    /// all of it new connections are refused.
    pub max_pending: usize,
    /// Most of those from one source (an IPv4 address, or an IPv6 /64)
    /// once the coordinator is under load (a quarter of `max_pending`
    /// pending): past it that source's new connections are refused, so one
    /// host cannot take every place from the others.
    pub max_pending_per_source: usize,
    /// The connection receive window before the hello is accepted: all a
    /// peer that has not authenticated can make the coordinator buffer.
    pub pre_auth_window: u32,
    /// Who may join (auth mode, enrollment, revocations).
    pub auth: Arc<Auth>,
    /// Who may open what; [`Policy::allow_all`] when none is configured.
    pub policy: Policy,
    /// The TOML file the policy is reloaded from (SIGHUP, `policy reload`).
    pub config_file: Option<PathBuf>,
    /// The state directory: revocations, token state and the admin socket
    /// (`admin.sock`). `None`: no admin socket.
    pub state_dir: Option<PathBuf>,
    /// Pings on each session stream, and how much silence closes a session
    /// with `ConnCode::HeartbeatMissed`.
    pub heartbeat: Heartbeat,
    /// Presence events a watcher may fall behind by before it is told it
    /// lagged.
    pub presence_buffer: usize,
    /// Broadcast groups with a configured policy; other groups get
    /// [`GroupConfig::default`].
    pub groups: HashMap<String, GroupConfig>,
    /// Set when this coordinator is a worker under a leader process
    /// (`qmesh-coordinator run` without `--single`): what `info` reports
    /// of the leader.
    pub worker: Option<WorkerOf>,
    /// The HTTP listener for `/metrics`, `/status.json` and the status
    /// page (`run --http`); `None`: none.
    pub http: Option<HttpConfig>,
    /// Where names are claimed before a hello is admitted:
    /// [`crate::directory::LocalDirectory`] for a coordinator on its own,
    /// the etcd directory for a member of a cluster.
    pub directory: Arc<dyn crate::directory::Directory>,
    /// The UDP socket of the member link endpoint (`run --peer-listen`),
    /// for a member of a cluster: other members dial it.
    pub link_socket: Option<Arc<std::net::UdpSocket>>,
}

/// The HTTP listener of `run --http`.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Where to listen (TCP).
    pub addr: SocketAddr,
    /// The bearer token every request must carry; required off loopback.
    pub token: Option<crate::bearer::BearerToken>,
}

/// The leader a worker runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerOf {
    /// The leader's process id.
    pub leader_pid: u32,
    /// Workers the leader started before this one.
    pub restarts: u64,
    /// When the leader started.
    pub started: std::time::SystemTime,
}

/// How a broadcast group treats its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupConfig {
    /// What happens to a member that falls behind.
    pub policy: GroupPolicy,
    /// Broadcasts queued per member before it counts as behind.
    pub buffer: usize,
    /// Largest broadcast body.
    pub max_message: usize,
}

impl Default for GroupConfig {
    /// Policy `lag`, 256 queued per member, 64 KiB bodies.
    fn default() -> Self {
        Self {
            policy: GroupPolicy::Lag,
            buffer: 256,
            max_message: qmesh_proto::limits::DEFAULT_MAX_BROADCAST,
        }
    }
}

impl Config {
    /// Defaults for everything but the identity; listens on `*4:7447`.
    pub fn new(identity: Identity) -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_COORDINATOR_PORT)),
            identity,
            tuning: Tuning::default(),
            hello_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(10),
            answer_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            socket_buffer: qmesh_certs::transport::SOCKET_BUFFER,
            max_clients: None,
            max_channels_per_client: 1024,
            max_streams_per_channel: 1024,
            max_message: qmesh_proto::limits::DEFAULT_MAX_MESSAGE as u64,
            rate: RateLimits::default(),
            max_pending: 4096,
            max_pending_per_source: 64,
            pre_auth_window: 64 * 1024,
            auth: Arc::new(Auth::development()),
            policy: Policy::allow_all(),
            config_file: None,
            state_dir: None,
            heartbeat: Heartbeat::default(),
            presence_buffer: 1024,
            groups: HashMap::new(),
            worker: None,
            http: None,
            directory: Arc::new(crate::directory::LocalDirectory),
            link_socket: None,
        }
    }
}
