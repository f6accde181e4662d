//! rustls and quinn configurations: what a coordinator serves with and how a
//! client decides to trust it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::signature::{handshake_signatures, Signatures};
use crate::{load_certs, CertError, Fingerprint, Identity};

use qmesh_proto::ALPN;

/// How a client decides whether the coordinator's certificate is genuine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Full certificate verification against these CA certificates:
    /// signature chain, validity period, extended key usage serverAuth, and
    /// that the certificate is valid for the server name connected to.
    Ca {
        /// The trusted CA certificates.
        certs: Vec<CertificateDer<'static>>,
        /// Where they came from (usually the CA file's path), for messages.
        source: String,
    },
    /// Full certificate verification, as for [`Trust::Ca`], against the
    /// platform's trust store: what every TLS client trusts by default.
    ///
    /// Made by [`Trust::system`]; on Linux the store is the distribution's
    /// CA bundle, or `SSL_CERT_FILE` / `SSL_CERT_DIR` when they are set.
    /// A certificate that does not verify is reported with a hint to give
    /// the coordinator's own CA (a private deployment) instead.
    System {
        /// The trusted root certificates.
        certs: Vec<CertificateDer<'static>>,
        /// Where they came from, for messages.
        source: String,
    },
    /// Trust exactly the certificate with this SHA-256 fingerprint.
    ///
    /// Only the end-entity certificate's fingerprint is compared; the server
    /// name, validity period and issuer do not apply to a pinned
    /// certificate. The TLS handshake signature is still verified against
    /// the pinned certificate's key, so a peer must hold its private key.
    Pinned(Fingerprint),
}

impl Trust {
    /// [`Trust::Ca`] with the certificates of a CA file, its path as source.
    pub fn ca_file(path: &Path) -> Result<Trust, CertError> {
        Ok(Trust::Ca {
            certs: load_certs(path)?,
            source: path.display().to_string(),
        })
    }

    /// [`Trust::System`]: the platform's trust store, read now (with
    /// `rustls-native-certs`, which honours `SSL_CERT_FILE` and
    /// `SSL_CERT_DIR`). Certificates in the store that are not usable as
    /// roots are left out; a store with no usable root is an error.
    pub fn system() -> Result<Trust, CertError> {
        let source = system_source();
        let found = rustls_native_certs::load_native_certs();
        let mut certs = Vec::new();
        for cert in found.certs {
            if RootCertStore::empty().add(cert.clone()).is_ok() {
                certs.push(cert);
            }
        }
        if certs.is_empty() {
            let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
            return Err(CertError::NoSystemRoots {
                origin: source,
                detail: if errors.is_empty() {
                    "no certificates found".into()
                } else {
                    errors.join("; ")
                },
            });
        }
        Ok(Trust::System { certs, source })
    }
}

/// How the system's trust store is named in messages, with the
/// environment variables that chose it.
fn system_source() -> String {
    let mut chosen = Vec::new();
    for var in ["SSL_CERT_FILE", "SSL_CERT_DIR"] {
        if let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            chosen.push(format!("{var}={}", value.to_string_lossy()));
        }
    }
    if chosen.is_empty() {
        "the system's trust store".into()
    } else {
        format!("the system's trust store ({})", chosen.join(", "))
    }
}

/// Why the most recent server certificate verification of a client config
/// failed, as a sentence for people.
///
/// [`client_config`] returns one alongside the config; clones share state.
/// QUIC connection errors only carry a TLS alert code, so this is where a
/// client finds out what was wrong with the coordinator's certificate.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    last_failure: Arc<Mutex<Option<String>>>,
}

impl VerifyReport {
    /// The sentence describing the last server certificate verification
    /// failure of this config, or `None` if there was none or the most
    /// recent verification succeeded.
    ///
    /// For example `the coordinator's certificate did not verify against the
    /// CA in /etc/qmesh/ca.pem: invalid peer certificate: UnknownIssuer`.
    pub fn failure(&self) -> Option<String> {
        self.slot().clone()
    }

    fn record(&self, failure: Option<String>) {
        *self.slot() = failure;
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A panic while holding this lock cannot leave the Option invalid.
        self.last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The crypto provider used everywhere in this crate: *ring*.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A quinn server configuration presenting `identity`.
///
/// TLS 1.3 only (as QUIC requires), ALPN `qmesh/1`, the *ring* provider.
/// Clients must present a certificate: any well-formed one within its
/// validity period whose key signs the handshake (a client's self-signed
/// [`Identity::self_signed`] will do). The coordinator reads its
/// fingerprint with [`crate::peer_fingerprint`] and vouches for it to peers.
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, CertError> {
    server_config_with(identity, &crate::ClientAuth::any(Arc::new(|_| false)))
}

/// A quinn server configuration presenting `identity` that admits the
/// client certificates `auth` allows (see [`crate::ClientAuth`]).
pub fn server_config_with(
    identity: &Identity,
    auth: &crate::ClientAuth,
) -> Result<quinn::ServerConfig, CertError> {
    let provider = provider();
    let verifier = auth.verifier();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// A quinn client configuration that verifies the server according to
/// `trust`, presenting no client certificate.
///
/// TLS 1.3 only, ALPN `qmesh/1`, the *ring* provider. The returned
/// [`VerifyReport`] tells why a server certificate was rejected.
pub fn client_config(trust: &Trust) -> Result<(quinn::ClientConfig, VerifyReport), CertError> {
    client_config_inner(trust, None)
}

/// Like [`client_config`], but presenting `identity` as the client
/// certificate when the server asks for one.
pub fn client_config_with_identity(
    trust: &Trust,
    identity: &Identity,
) -> Result<(quinn::ClientConfig, VerifyReport), CertError> {
    client_config_inner(trust, Some(identity))
}

fn client_config_inner(
    trust: &Trust,
    identity: Option<&Identity>,
) -> Result<(quinn::ClientConfig, VerifyReport), CertError> {
    let provider = provider();
    let report = VerifyReport::default();
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        Trust::Ca { certs, source } => Arc::new(CaVerifier::new(
            certs,
            source,
            provider.clone(),
            report.clone(),
        )?),
        Trust::System { certs, source } => Arc::new(
            CaVerifier::new(certs, source, provider.clone(), report.clone())?.with_hint(
                "; a coordinator with a certificate from a private CA (such as the development \
                 CA it prints at start) needs that CA: pass --ca FILE, or pin the certificate \
                 with --fingerprint",
            ),
        ),
        Trust::Pinned(pin) => Arc::new(PinnedVerifier::new(
            *pin,
            "the coordinator",
            &provider,
            report.clone(),
        )),
    };
    // `dangerous()` is merely how rustls spells "custom verifier": both
    // verifiers here check the certificate and the handshake signature.
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match identity {
        Some(identity) => {
            builder.with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls)?;
    Ok((quinn::ClientConfig::new(Arc::new(quic)), report))
}

/// Full WebPKI verification against a CA, recording failures in a report.
#[derive(Debug)]
struct CaVerifier {
    inner: Arc<WebPkiServerVerifier>,
    source: String,
    report: VerifyReport,
    /// Said after every failure: what to do instead.
    hint: &'static str,
}

impl CaVerifier {
    fn new(
        certs: &[CertificateDer<'static>],
        source: &str,
        provider: Arc<CryptoProvider>,
        report: VerifyReport,
    ) -> Result<CaVerifier, CertError> {
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert.clone())
                .map_err(|e| CertError::BadTrustAnchor {
                    origin: source.to_owned(),
                    source: e,
                })?;
        }
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| CertError::Verifier {
                origin: source.to_owned(),
                source: e,
            })?;
        Ok(CaVerifier {
            inner,
            source: source.to_owned(),
            report,
            hint: "",
        })
    }

    /// Add `hint` to every failure this verifier reports.
    fn with_hint(mut self, hint: &'static str) -> CaVerifier {
        self.hint = hint;
        self
    }
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        self.report.record(result.as_ref().err().map(|e| {
            // The hint is about the issuer: a name mismatch or an expired
            // certificate is not cured by another CA.
            let hint = match e {
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                    | rustls::CertificateError::BadSignature,
                ) => self.hint,
                _ => "",
            };
            format!(
                "the coordinator's certificate did not verify against the CA in {}: {e}{hint}",
                self.source
            )
        }));
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// Accepts exactly the end-entity certificate with the pinned fingerprint,
/// and still verifies the handshake signature against its key.
#[derive(Debug)]
pub(crate) struct PinnedVerifier {
    pin: Fingerprint,
    /// Whose certificate it is, for the report: "the coordinator", "the peer".
    subject: &'static str,
    signatures: Signatures,
    report: VerifyReport,
}

impl PinnedVerifier {
    /// Accept only the certificate with fingerprint `pin`, reporting a
    /// mismatch as `subject`'s ("the coordinator", "the peer").
    pub(crate) fn new(
        pin: Fingerprint,
        subject: &'static str,
        provider: &CryptoProvider,
        report: VerifyReport,
    ) -> PinnedVerifier {
        PinnedVerifier {
            pin,
            subject,
            signatures: Signatures::of(provider),
            report,
        }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of(end_entity);
        if presented == self.pin {
            self.report.record(None);
            Ok(ServerCertVerified::assertion())
        } else {
            self.report.record(Some(format!(
                "{}'s certificate has fingerprint {presented} but {} was pinned",
                self.subject, self.pin
            )));
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    handshake_signatures!(signatures);
}
