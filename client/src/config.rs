//! Client configuration.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use qmesh_certs::transport::Tuning;
use qmesh_certs::{CertError, Fingerprint, Identity, Trust};
use qmesh_proto::heartbeat::Heartbeat;
use qmesh_proto::limits::DEFAULT_MAX_MESSAGE;
use qmesh_proto::{Address, Interface};

use crate::events::Events;
use crate::quota::Quota;
use crate::reconnect::Reconnect;

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The coordinator, as `quic/host[:port]` (port 7447 by default). A
    /// host name that resolves to several addresses counts as that many
    /// coordinators (see `also`), each checked for the name; the name is
    /// resolved again for every reconnect attempt.
    pub coordinator: Address,
    /// The name to be reachable by: 1–64 of `a-z 0-9 . _ -`.
    pub name: String,
    /// How to check the coordinator's certificate.
    pub trust: Trust,
    /// QUIC transport settings; the idle timeout is how long a vanished
    /// coordinator (and so every channel) takes to be reported lost.
    pub tuning: Tuning,
    /// How long connecting (handshake and hello) may take.
    pub connect_timeout: Duration,
    /// How long `open` waits for the peer to accept or refuse.
    pub open_timeout: Duration,
    /// How long a graceful close waits for the peer to confirm.
    pub close_timeout: Duration,
    /// Largest data message this client sends or accepts, in bytes.
    pub max_message: usize,
    /// Incoming channel offers held until [`crate::Client::accept`] takes
    /// them; further offers wait for room up to `open_timeout`, then are
    /// refused as busy.
    pub incoming_backlog: usize,
    /// The certificate and key this client presents to the coordinator and
    /// to peers on direct connections. `None`: a self-signed one for
    /// `name`, made at the first connect and kept by clones of this config.
    pub identity: Option<Arc<Identity>>,
    /// Direct channels: whether this client takes them, and their timings.
    pub direct: DirectConfig,
    /// How long a request waits for its reply (5 s).
    pub request_timeout: Duration,
    /// Most requests one channel may have waiting for replies at once.
    pub max_requests: usize,
    /// One-way messages and requests a channel holds until
    /// [`crate::Channel::recv_message`] takes them; past it the peer is
    /// slowed by flow control.
    pub message_backlog: usize,
    /// Pings to the coordinator, and how much silence means it is lost
    /// (then the session and every channel end as lost).
    pub heartbeat: Heartbeat,
    /// Where to report lifecycle and request events, if anywhere.
    pub events: Option<Events>,
    /// Quotas on offered interfaces, by interface name.
    pub quotas: HashMap<String, Quota>,
    /// The interfaces this client offers, sent to the coordinator at hello
    /// ([`crate::Client::set_interfaces`] changes them later). Empty: the
    /// client declares none, and peers may open any channel name on it.
    pub interfaces: Vec<Interface>,
    /// More coordinators of the same mesh, tried in turn with
    /// `coordinator`: the first choice is spread at random over all of
    /// them (over every address their names resolve to), and a connect or
    /// reconnect that fails on one goes on to the next.
    pub also: Vec<Address>,
    /// Addresses to use for host names instead of asking the resolver,
    /// like curl's `--resolve`: the certificate is still checked for the
    /// name. For a coordinator whose name is not (yet) in DNS, or to reach
    /// one instance of several behind a name.
    pub resolve: Vec<Resolve>,
    /// Whether and how a lost session is joined again (on by default:
    /// first retry within 100 ms, at most 5 s apart, no limit).
    pub reconnect: Reconnect,
    /// The TLS and transport configuration last built from `trust` and
    /// `tuning`, shared by clones of this config.
    tls: TlsCache,
}

/// One built quinn client configuration, reused while the settings it was
/// built from stay the same.
///
/// Reusing it is what lets reconnects resume TLS sessions (rustls keeps
/// session tickets per config) and spares the verifier set-up per connect.
#[derive(Debug, Clone, Default)]
struct TlsCache(
    Arc<Mutex<Option<Built>>>,
    Arc<std::sync::OnceLock<Arc<Identity>>>,
);

/// Settings of direct (peer-to-peer) channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectConfig {
    /// Take direct channels at all. A client on a shared endpoint
    /// ([`crate::Client::connect_on`]) never does: peers could not tell its
    /// connections apart from its neighbours'.
    pub enabled: bool,
    /// How long a direct path may take to come up: past it, an `auto`
    /// channel stays relayed and a `direct` one fails.
    pub timeout: Duration,
    /// How long a direct connection stays up after its last channel ended,
    /// ready for the next one.
    pub grace: Duration,
    /// Addresses to report to the coordinator besides the local address
    /// towards it (e.g. a port forwarded on a router).
    pub advertise: Vec<std::net::SocketAddr>,
}

impl Default for DirectConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            timeout: Duration::from_secs(5),
            grace: Duration::from_secs(10),
            advertise: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Built {
    trust: Trust,
    tuning: Tuning,
    identity: Fingerprint,
    quic: quinn::ClientConfig,
    report: qmesh_certs::VerifyReport,
}

impl ClientConfig {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(coordinator: Address, name: impl Into<String>, trust: Trust) -> Self {
        Self {
            coordinator,
            name: name.into(),
            trust,
            tuning: Tuning::client(),
            connect_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(30),
            max_message: DEFAULT_MAX_MESSAGE,
            incoming_backlog: 64,
            identity: None,
            direct: DirectConfig::default(),
            interfaces: Vec::new(),
            request_timeout: Duration::from_secs(5),
            max_requests: 4096,
            message_backlog: 256,
            heartbeat: Heartbeat::default(),
            events: None,
            quotas: HashMap::new(),
            reconnect: Reconnect::default(),
            also: Vec::new(),
            resolve: Vec::new(),
            tls: TlsCache::default(),
        }
    }

    /// Trust the CA certificate(s) in the PEM file at `path`.
    pub fn trust_ca_file(path: &Path) -> Result<Trust, CertError> {
        Ok(Trust::Ca {
            certs: qmesh_certs::load_certs(path)?,
            source: path.display().to_string(),
        })
    }

    /// Trust the coordinator certificates the platform's trust store
    /// vouches for, as every TLS client does by default
    /// ([`Trust::system`]): for a coordinator with a certificate from a
    /// public CA.
    pub fn trust_system() -> Result<Trust, CertError> {
        Trust::system()
    }

    /// Trust exactly the coordinator certificate with this fingerprint.
    pub fn trust_fingerprint(fingerprint: Fingerprint) -> Trust {
        Trust::Pinned(fingerprint)
    }

    /// Offer `interface`, with `quota` on it.
    pub fn offer(mut self, interface: Interface, quota: Quota) -> Self {
        if quota != Quota::default() {
            self.quotas.insert(interface.name.clone(), quota);
        }
        self.interfaces.retain(|i| i.name != interface.name);
        self.interfaces.push(interface);
        self
    }

    /// Set the idle timeout (and the keep-alive to a third of it).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.tuning = self.tuning.with_idle_timeout(idle);
        self
    }

    /// Every coordinator address: `coordinator`, then `also`.
    pub fn addresses(&self) -> Vec<&Address> {
        std::iter::once(&self.coordinator)
            .chain(self.also.iter())
            .collect()
    }

    /// The identity this client presents: the configured one, or the
    /// self-signed one made for this config (and its clones) on first use.
    pub(crate) fn identity(&self) -> Result<Arc<Identity>, CertError> {
        if let Some(id) = &self.identity {
            return Ok(id.clone());
        }
        if let Some(id) = self.tls.1.get() {
            return Ok(id.clone());
        }
        let made = Arc::new(Identity::self_signed(&self.name)?);
        Ok(self.tls.1.get_or_init(|| made).clone())
    }

    /// The quinn client configuration for `trust`, `tuning` and the
    /// identity, built on first use and rebuilt only when one has changed.
    pub(crate) fn quic(
        &self,
    ) -> Result<(quinn::ClientConfig, qmesh_certs::VerifyReport), CertError> {
        let identity = self.identity()?;
        let fingerprint = identity.fingerprint();
        let mut slot = self.tls.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = slot.as_ref() {
            if b.trust == self.trust && b.tuning == self.tuning && b.identity == fingerprint {
                return Ok((b.quic.clone(), b.report.clone()));
            }
        }
        let (mut quic, report) = qmesh_certs::client_config_with_identity(&self.trust, &identity)?;
        quic.transport_config(self.tuning.transport_config());
        *slot = Some(Built {
            trust: self.trust.clone(),
            tuning: self.tuning.clone(),
            identity: fingerprint,
            quic: quic.clone(),
            report: report.clone(),
        });
        Ok((quic, report))
    }
}

/// Where a host name and port go instead of the resolver's answer:
/// `HOST:PORT:ADDR[,ADDR...]`, as curl's `--resolve` (an IPv6 address in
/// brackets: `coord.example.com:7447:[::1]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolve {
    /// The host name, as written in the coordinator's address.
    pub host: String,
    /// The port it applies to.
    pub port: u16,
    /// The addresses to use, in order. Never empty.
    pub addrs: Vec<std::net::IpAddr>,
}

impl Resolve {
    /// The addresses for `host` and `port` in `overrides`, if any names them
    /// (host names compare without regard to case).
    pub(crate) fn find<'a>(
        overrides: &'a [Resolve],
        host: &str,
        port: u16,
    ) -> Option<&'a [std::net::IpAddr]> {
        overrides
            .iter()
            .find(|r| r.port == port && r.host.eq_ignore_ascii_case(host))
            .map(|r| r.addrs.as_slice())
    }
}

impl std::str::FromStr for Resolve {
    type Err = String;

    fn from_str(text: &str) -> Result<Resolve, String> {
        let usage = || {
            format!(
                "{text:?} is not HOST:PORT:ADDR[,ADDR...] (e.g. coord.example.com:7447:127.0.0.1)"
            )
        };
        let mut parts = text.splitn(3, ':');
        let (Some(host), Some(port), Some(addrs)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(usage());
        };
        if host.is_empty() {
            return Err(usage());
        }
        let port: u16 = port.parse().map_err(|_| usage())?;
        let mut parsed = Vec::new();
        for addr in addrs.split(',') {
            let bare = addr
                .strip_prefix('[')
                .and_then(|a| a.strip_suffix(']'))
                .unwrap_or(addr);
            parsed.push(
                bare.parse()
                    .map_err(|_| format!("{addr:?} in {text:?} is not an IP address"))?,
            );
        }
        Ok(Resolve {
            host: host.to_owned(),
            port,
            addrs: parsed,
        })
    }
}
