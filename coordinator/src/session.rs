//! The state every handler shares: [`Shared`] (config, registry, policy,
//! presence, groups, counters), one admitted client's [`Session`], and the
//! [`ChannelSide`] a joined channel leaves on each of its two sessions.
//!
//! This module imports no handler: the handlers import it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use qmesh_certs::Fingerprint;
use qmesh_proto::codes::{ConnCode, RejectCode};
use qmesh_proto::manifest::Interface;
use qmesh_proto::msg::PresenceEvent;
use qmesh_proto::{ClientName, StreamId, Untrusted};
use quinn::Connection;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::config::Config;
use crate::groups::Groups;
use crate::limit::Limiter;
use crate::policy::Policy;
use crate::registry::{Registry, SessionId};

/// Counters a running coordinator keeps.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sessions admitted since start.
    pub sessions_admitted: AtomicU64,
    /// Channels joined since start.
    pub channels_joined: AtomicU64,
    /// Data streams relayed since start.
    pub streams_relayed: AtomicU64,
    /// Payload bytes relayed since start.
    pub bytes_relayed: AtomicU64,
    /// Hellos and enrollments refused since start.
    pub hellos_refused: AtomicU64,
    /// Certificates issued (enrollments and renewals) since start.
    pub certificates_issued: AtomicU64,
    /// Connections that have not finished their hello, now.
    pub pending: AtomicU64,
    /// Handshakes that ended without a session, a refusal or a
    /// certificate: TLS failed or timed out, no hello in time, a protocol
    /// violation, or the peer went away.
    pub handshakes_failed: AtomicU64,
    /// Refused hellos and enrollments by [`RejectCode`], in the order of
    /// [`Stats::REJECT_CODES`].
    pub rejects: [AtomicU64; 8],
    /// Sessions closed because the client went past its rate limit's
    /// flood threshold (`ConnCode::RateExceeded`).
    pub rate_limited: AtomicU64,
}

impl Stats {
    /// Every [`RejectCode`], in the order [`Stats::rejects`] counts them.
    pub const REJECT_CODES: [RejectCode; 8] = [
        RejectCode::VersionMismatch,
        RejectCode::NameTaken,
        RejectCode::InvalidName,
        RejectCode::NotAuthorised,
        RejectCode::ShuttingDown,
        RejectCode::Full,
        RejectCode::BadToken,
        RejectCode::Unavailable,
    ];

    /// Count a hello or enrollment refused with `code`.
    pub(crate) fn refused(&self, code: RejectCode) {
        self.hellos_refused.fetch_add(1, Ordering::Relaxed);
        // A match, so that a new code cannot be left out of the list.
        let i = match code {
            RejectCode::VersionMismatch => 0,
            RejectCode::NameTaken => 1,
            RejectCode::InvalidName => 2,
            RejectCode::NotAuthorised => 3,
            RejectCode::ShuttingDown => 4,
            RejectCode::Full => 5,
            RejectCode::BadToken => 6,
            RejectCode::Unavailable => 7,
        };
        self.rejects[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Count a handshake that ended without a session, a refusal or a
    /// certificate.
    pub(crate) fn handshake_failed(&self) {
        self.handshakes_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Refused hellos and enrollments so far, by code.
    pub fn rejects(&self) -> impl Iterator<Item = (RejectCode, u64)> + '_ {
        Stats::REJECT_CODES
            .into_iter()
            .zip(&self.rejects)
            .map(|(code, n)| (code, n.load(Ordering::Relaxed)))
    }
}

/// State shared by all of a coordinator's tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) registry: Mutex<Registry<Arc<Session>>>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) tasks: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    /// Connections before their hello, by source (see
    /// [`crate::config::Config::max_pending_per_source`]); a source leaves
    /// the map when its count is back to zero.
    pub(crate) pending_sources: Mutex<HashMap<std::net::IpAddr, u32>>,
    /// Cancelled when a drain starts: no new sessions or channels, and
    /// every client is told the coordinator is going away.
    pub(crate) draining: CancellationToken,
    /// Channel places taken, over all clients (two per channel: what a
    /// drain waits to reach zero).
    pub(crate) slots: tokio::sync::watch::Sender<usize>,
    /// The number the next joined channel gets.
    pub(crate) next_channel: AtomicU64,
    /// The access policy in force.
    pub(crate) policy: RwLock<Arc<Policy>>,
    /// Joins, leaves and interface changes, for presence watchers.
    pub(crate) presence: tokio::sync::broadcast::Sender<PresenceEvent>,
    /// Broadcast groups by name.
    pub(crate) groups: Groups,
    /// The address the endpoint is bound to.
    pub(crate) local_addr: SocketAddr,
    /// When this coordinator started.
    pub(crate) started: std::time::SystemTime,
    /// Stops asked for through the admin socket: 1 drains (`quit`), 2
    /// stops at once (`stop`).
    pub(crate) operator_stop: tokio::sync::watch::Sender<u8>,
    /// Set by `restart-worker`: once drained, the worker exits with
    /// [`crate::leader::RESTART_EXIT`].
    pub(crate) restart_asked: std::sync::atomic::AtomicBool,
    /// The last joins, leaves, kicks and reloads, newest last, at most
    /// [`EVENTS_KEPT`].
    pub(crate) events: Mutex<std::collections::VecDeque<Event>>,
    /// The rate limits new sessions get (a reload changes them).
    pub(crate) rate: RwLock<crate::limit::RateLimits>,
    /// The settings of broadcast groups made from now on.
    pub(crate) group_config: RwLock<HashMap<String, crate::config::GroupConfig>>,
    /// The settings in force, when the coordinator was started from them
    /// (what a reload compares the file with).
    pub(crate) running: Mutex<Option<crate::settings::Settings>>,
    /// The flags and settings the coordinator was started from (set by
    /// `Control::set_source`): without them only the policy reloads.
    pub(crate) source: Mutex<Option<Arc<crate::settings::Source>>>,
    /// The endpoint, whose certificate a reload can replace.
    pub(crate) endpoint: quinn::Endpoint,
    /// The endpoints on the same port added by
    /// [`Coordinator::add_endpoint`](crate::server::Coordinator::add_endpoint).
    pub(crate) more_endpoints: Mutex<Vec<quinn::Endpoint>>,
    /// The fingerprint of the certificate new handshakes get.
    pub(crate) current_cert: Mutex<Option<String>>,
    /// What `info` says about that certificate.
    pub(crate) cert_summary: Mutex<Option<crate::tls::CertSummary>>,
    /// The member link endpoint, for a member of a cluster.
    pub(crate) link_endpoint: Option<quinn::Endpoint>,
    /// The live member links, by member id: each a [`Session`] whose
    /// `member` is set.
    pub(crate) links: Mutex<HashMap<String, Arc<Session>>>,
    /// Bumped whenever a member link comes up or goes down.
    pub(crate) link_changes: tokio::sync::watch::Sender<u64>,
}

/// How many events [`Shared::events`] keeps.
pub(crate) const EVENTS_KEPT: usize = 50;

/// Something an operator may want to see on the status page.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `join`, `leave`, `kick`, `reload` or `revoke`.
    pub kind: String,
    /// What happened, in a sentence (client names escaped).
    pub what: String,
}

impl Shared {
    /// Give new handshakes on every endpoint `server`.
    pub(crate) fn set_server_config(&self, server: quinn::ServerConfig) {
        self.endpoint.set_server_config(Some(server.clone()));
        for endpoint in self
            .more_endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            endpoint.set_server_config(Some(server.clone()));
        }
    }

    /// Keep an event for the status page.
    pub(crate) fn note(&self, kind: &str, what: String) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if events.len() >= EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(Event {
            at,
            kind: kind.into(),
            what,
        });
    }

    /// The rate limits for a session admitted now.
    pub(crate) fn rate(&self) -> crate::limit::RateLimits {
        *self.rate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The settings of broadcast group `name`, made now.
    pub(crate) fn group_config(&self, name: &str) -> crate::config::GroupConfig {
        self.group_config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
            .unwrap_or_default()
    }

    pub(crate) fn links(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The link session for the member holding `peer`, when another member
    /// holds it: `Ok(None)` when no member does, `Err(member)` when one
    /// does but there is no live link to it.
    pub(crate) fn route(&self, peer: &str) -> Result<Option<Arc<Session>>, String> {
        let Some(member) = self.config.directory.member_of(peer) else {
            return Ok(None);
        };
        match self.links().get(&member) {
            Some(link) if link.conn.close_reason().is_none() => Ok(Some(link.clone())),
            _ => Err(member),
        }
    }

    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry<Arc<Session>>> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One admitted client.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: SessionId,
    /// When it was admitted.
    pub(crate) joined: std::time::SystemTime,
    pub(crate) name: ClientName,
    pub(crate) conn: Connection,
    /// The fingerprint of the certificate the client presented in the TLS
    /// handshake (never what the client claims).
    pub(crate) fingerprint: Fingerprint,
    /// SHA-256 of the certificate's public key: what "the same credential"
    /// compares, so a renewed certificate takes its name back.
    pub(crate) key: Option<[u8; 32]>,
    /// Addresses the client reported for itself, or `None` when it cannot
    /// take direct channels.
    pub(crate) direct: Option<Vec<SocketAddr>>,
    /// This session's side of each joined channel, by the id of the channel
    /// control stream on this connection.
    pub(crate) channels: Mutex<HashMap<StreamId, Arc<ChannelSide>>>,
    /// Channels this client is part of, joined or being opened: what
    /// `max_channels_per_client` counts.
    pub(crate) slots: AtomicUsize,
    /// This client's rate limits.
    pub(crate) limiter: Limiter,
    /// The interfaces the client offers (empty: it declares none).
    pub(crate) interfaces: Mutex<Arc<Vec<Interface>>>,
    /// How and why the coordinator closed this session, when it did: the
    /// reason its peers' channels are told (`Normal`: the client left).
    pub(crate) closed_why: std::sync::OnceLock<(ConnCode, String)>,
    /// Notified when a channel is opened to this client: its session
    /// stream pings at once, and a client that does not answer within the
    /// heartbeat's probe window is closed as gone (a peer killed without a
    /// word is found in seconds, not after the whole heartbeat).
    pub(crate) probe: tokio::sync::Notify,
    /// Violations on its streams, each of which stopped only that stream.
    pub(crate) strikes: crate::strikes::Strikes,
    /// Room for the first frames of its new streams while they are read:
    /// [`crate::limit::HEADER_BUDGET`] bytes of permits.
    pub(crate) headers: tokio::sync::Semaphore,
    /// Its claim of the name in the directory, given back when it leaves.
    pub(crate) claim: crate::directory::Claim,
    /// `Some(id)` when this is not a client but the member link to
    /// coordinator `id` of the cluster, standing in for that member's
    /// clients in the channels that cross it.
    pub(crate) member: Option<String>,
}

impl Session {
    /// Close the session with `code`, and keep `why` for the peers of its
    /// channels. The first close is the one that counts.
    pub(crate) fn close(&self, c: ConnCode, why: &str) {
        let _ = self.closed_why.set((c, why.to_owned()));
        self.conn.close(c.varint(), why.as_bytes());
    }

    /// The client went past its rate limit's flood threshold: close the
    /// session with `ConnCode::RateExceeded`, counted once per session in
    /// [`Stats::rate_limited`].
    pub(crate) fn flooded(&self, stats: &Stats, flood: &crate::limit::Flooded) {
        if self.closed_why.get().is_none() {
            stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        self.violation(ConnCode::RateExceeded, &flood.to_string());
    }

    /// Close the session because the client broke the protocol, and say
    /// so at `warn`.
    pub(crate) fn violation(&self, code: ConnCode, what: &str) {
        warn!(name = %Untrusted::name(&self.name), peer = %self.conn.remote_address(), code = %code, cause = %Untrusted::reason(what), "closing connection");
        self.close(code, what);
    }

    /// The client broke the protocol on one stream, which was stopped: log
    /// it within the session's log allowance, and close the session once
    /// it has done so more than [`crate::strikes::MAX_STRIKES`] times.
    pub(crate) fn stream_violation(&self, what: &str) {
        let strike = self.strikes.strike(tokio::time::Instant::now());
        if let Some(suppressed) = strike.log {
            if suppressed > 0 {
                warn!(name = %Untrusted::name(&self.name), suppressed, "suppressed {suppressed} similar lines about this client");
            }
            warn!(name = %Untrusted::name(&self.name), strikes = strike.count, cause = %Untrusted::reason(what), "stopping a stream");
        }
        if strike.close {
            self.violation(
                ConnCode::Malformed,
                &format!(
                    "{} protocol violations on streams (the last: {what}); closing the session",
                    strike.count
                ),
            );
        }
    }

    /// Room for a first frame of `len` bytes in this session's header
    /// budget, held until the permit is dropped; `None` when it is full.
    pub(crate) fn header_room(&self, len: usize) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.headers.try_acquire_many(u32::try_from(len).ok()?).ok()
    }

    /// The interfaces the client offers now.
    pub(crate) fn interfaces(&self) -> Arc<Vec<Interface>> {
        self.interfaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn channels(&self) -> MutexGuard<'_, HashMap<StreamId, Arc<ChannelSide>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Close this session because its certificate was revoked; whether it
    /// was still open.
    pub(crate) fn close_revoked(&self) -> bool {
        if self.conn.close_reason().is_some() {
            return false;
        }
        warn!(name = %Untrusted::name(&self.name), "closing a revoked client's session");
        self.close(
            ConnCode::Revoked,
            "the operator revoked this client's certificate; ask them for a new credential",
        );
        true
    }
}

/// Data streams one side has sent into a channel.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct StreamCount {
    /// Streams whose header named this channel.
    pub(crate) accepted: u64,
    /// Of those, streams still being relayed.
    pub(crate) active: u64,
    /// Of those, streams the relay refused (too many at once): they never
    /// reach the other side.
    pub(crate) dropped: u64,
}

/// What the operator sees of a joined channel; both sides share it.
#[derive(Debug)]
pub(crate) struct ChannelRecord {
    /// The channel's number.
    pub(crate) number: u64,
    /// Who opened it.
    pub(crate) opener: ClientName,
    /// Who it was opened to.
    pub(crate) callee: ClientName,
    /// The channel's name.
    pub(crate) name: String,
    /// Whether the two sides were introduced for a direct connection.
    pub(crate) direct: bool,
    /// When it was joined.
    pub(crate) opened: std::time::Instant,
    /// Payload bytes relayed on it, both ways.
    pub(crate) bytes: std::sync::atomic::AtomicU64,
}

/// One side of a joined channel, as seen from that side's connection.
#[derive(Debug)]
pub(crate) struct ChannelSide {
    /// What the operator sees of the channel.
    pub(crate) record: Arc<ChannelRecord>,
    /// `opener>callee!channel`, for logs.
    pub(crate) label: Arc<str>,
    /// The other side's connection.
    pub(crate) peer_conn: Connection,
    /// The other side's session (weak: the two sessions' channel maps
    /// would otherwise hold each other), whose rate limit its bytes on a
    /// relayed pipe count against.
    pub(crate) peer: std::sync::Weak<Session>,
    /// The channel's control stream id on the other side's connection.
    pub(crate) peer_channel: StreamId,
    /// Data streams this side has sent into the channel.
    pub(crate) streams: watch::Sender<StreamCount>,
    /// Pipes this side opened on the channel that are being relayed now.
    pub(crate) pipes: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_counts_under_its_own_code() {
        let stats = Stats::default();
        for (n, code) in Stats::REJECT_CODES.into_iter().enumerate() {
            for _ in 0..=n {
                stats.refused(code);
            }
        }
        let counted: Vec<(RejectCode, u64)> = stats.rejects().collect();
        let expected: Vec<(RejectCode, u64)> = Stats::REJECT_CODES.into_iter().zip(1..).collect();
        assert_eq!(counted, expected);
        assert_eq!(stats.hellos_refused.load(Ordering::Relaxed), 36);
    }
}
