//! Client configuration.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use qmesh_certs::transport::Tuning;
use qmesh_certs::{CertError, Fingerprint, Trust};
use qmesh_proto::limits::DEFAULT_MAX_MESSAGE;
use qmesh_proto::Address;

/// How a client connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The coordinator, as `quic/host[:port]` (port 7447 by default).
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
struct TlsCache(Arc<Mutex<Option<Built>>>);

#[derive(Debug)]
struct Built {
    trust: Trust,
    tuning: Tuning,
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

    /// Trust exactly the coordinator certificate with this fingerprint.
    pub fn trust_fingerprint(fingerprint: Fingerprint) -> Trust {
        Trust::Pinned(fingerprint)
    }

    /// Set the idle timeout (and the keep-alive to a third of it).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.tuning = self.tuning.with_idle_timeout(idle);
        self
    }

    /// The quinn client configuration for `trust` and `tuning`, built on
    /// first use and rebuilt only when either has changed since.
    pub(crate) fn quic(
        &self,
    ) -> Result<(quinn::ClientConfig, qmesh_certs::VerifyReport), CertError> {
        let mut slot = self.tls.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = slot.as_ref() {
            if b.trust == self.trust && b.tuning == self.tuning {
                return Ok((b.quic.clone(), b.report.clone()));
            }
        }
        let (mut quic, report) = qmesh_certs::client_config(&self.trust)?;
        quic.transport_config(self.tuning.transport_config());
        *slot = Some(Built {
            trust: self.trust.clone(),
            tuning: self.tuning.clone(),
            quic: quic.clone(),
            report: report.clone(),
        });
        Ok((quic, report))
    }
}
