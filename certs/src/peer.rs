//! Client certificates as the coordinator sees them, and the TLS
//! configurations of direct connections between two clients.
//!
//! Every client presents a certificate to the coordinator. In this version
//! the coordinator accepts any well-formed certificate within its validity
//! period whose key signs the handshake, and records its SHA-256
//! fingerprint: the name a client holds is bound to that key for the life
//! of the session, and the coordinator vouches for the fingerprint when it
//! introduces two clients. A direct connection then checks the peer's
//! certificate against exactly that fingerprint, both ways.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName};
use rustls_pki_types::{CertificateDer, UnixTime};

use qmesh_proto::{DIRECT_ALPN, LINK_ALPN};

use crate::config::{provider, PinnedVerifier};
use crate::signature::{handshake_signatures, Signatures};
use crate::{CertError, Fingerprint, Identity, VerifyReport};

/// Which client certificate fingerprints a verifier lets in.
pub type AcceptFingerprint = Arc<dyn Fn(&Fingerprint) -> bool + Send + Sync>;

/// The certificate chain (leaf first) the peer of `conn` presented.
pub fn peer_chain(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    (!chain.is_empty()).then_some(*chain)
}

/// Verifies a client certificate: it must parse as X.509, be within its
/// validity period, have a fingerprint `accept` allows, and its key must
/// sign the TLS 1.3 handshake.
pub(crate) struct ClientCertCheck {
    signatures: Signatures,
    accept: AcceptFingerprint,
}

impl std::fmt::Debug for ClientCertCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientCertCheck")
    }
}

impl ClientCertCheck {
    pub(crate) fn new(provider: &CryptoProvider, accept: AcceptFingerprint) -> Self {
        Self {
            signatures: Signatures::of(provider),
            accept,
        }
    }
}

impl ClientCertVerifier for ClientCertCheck {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        crate::clientauth::parse_valid_leaf(end_entity, now)?;
        if !(self.accept)(&Fingerprint::of(end_entity)) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!(signatures);

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// The fingerprint of the leaf certificate the peer of `conn` presented, if
/// it presented one.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(Fingerprint::of)
}

/// The server side of direct connections: presents `identity` and admits
/// only clients whose certificate fingerprint `accept` allows (the peers the
/// coordinator introduced). ALPN `qmesh-direct/1`.
pub fn direct_server_config(
    identity: &Identity,
    accept: AcceptFingerprint,
) -> Result<quinn::ServerConfig, CertError> {
    pinned_server_config(identity, accept, DIRECT_ALPN)
}

/// The accepting side of a member link between two coordinators: presents
/// the coordinator's `identity` and admits only members whose certificate
/// fingerprint `accept` allows (those the cluster's directory lists).
/// ALPN `qmesh-peer/1`.
pub fn link_server_config(
    identity: &Identity,
    accept: AcceptFingerprint,
) -> Result<quinn::ServerConfig, CertError> {
    pinned_server_config(identity, accept, LINK_ALPN)
}

/// The dialling side of a member link: presents `identity` and accepts only
/// a certificate with fingerprint `member` (the one the directory lists for
/// that member). ALPN `qmesh-peer/1`.
pub fn link_client_config(
    identity: &Identity,
    member: Fingerprint,
) -> Result<quinn::ClientConfig, CertError> {
    pinned_client_config(identity, member, "the member", LINK_ALPN).map(|(c, _)| c)
}

fn pinned_server_config(
    identity: &Identity,
    accept: AcceptFingerprint,
    alpn: &[u8],
) -> Result<quinn::ServerConfig, CertError> {
    let provider = provider();
    let verifier = Arc::new(ClientCertCheck::new(&provider, accept));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicServerConfig::try_from(tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// The client side of a direct connection: presents `identity` and accepts
/// only a server certificate with fingerprint `peer` (the one the
/// coordinator vouched for). ALPN `qmesh-direct/1`.
pub fn direct_client_config(
    identity: &Identity,
    peer: Fingerprint,
) -> Result<(quinn::ClientConfig, VerifyReport), CertError> {
    pinned_client_config(identity, peer, "the peer", DIRECT_ALPN)
}

fn pinned_client_config(
    identity: &Identity,
    peer: Fingerprint,
    subject: &'static str,
    alpn: &[u8],
) -> Result<(quinn::ClientConfig, VerifyReport), CertError> {
    let provider = provider();
    let report = VerifyReport::default();
    let verifier = Arc::new(PinnedVerifier::new(
        peer,
        subject,
        &provider,
        report.clone(),
    ));
    // `dangerous()` is how rustls spells "custom verifier": the pinned
    // verifier checks the fingerprint and the handshake signature.
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(tls)?;
    Ok((quinn::ClientConfig::new(Arc::new(quic)), report))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn check(accept: AcceptFingerprint) -> ClientCertCheck {
        ClientCertCheck::new(&provider(), accept)
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn accepts_a_self_signed_certificate_the_filter_allows() {
        let id = Identity::self_signed("alice").unwrap();
        let fp = id.fingerprint();
        let v = check(Arc::new(move |f| *f == fp));
        assert!(v.verify_client_cert(&id.chain[0], &[], now()).is_ok());
    }

    #[test]
    fn refuses_a_fingerprint_the_filter_does_not_allow() {
        let expected = Identity::self_signed("alice").unwrap().fingerprint();
        let other = Identity::self_signed("alice").unwrap();
        let v = check(Arc::new(move |f| *f == expected));
        let err = v
            .verify_client_cert(&other.chain[0], &[], now())
            .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
            ),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_garbage_and_certificates_outside_their_validity() {
        let v = check(Arc::new(|_| true));
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff]);
        assert!(v.verify_client_cert(&junk, &[], now()).is_err());
        let id = Identity::self_signed("alice").unwrap();
        // 1000 days from now: past the 825-day validity.
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            now().as_secs() + 1000 * 86_400,
        ));
        let err = v.verify_client_cert(&id.chain[0], &[], later).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::Expired)
            ),
            "{err:?}"
        );
        let earlier =
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now().as_secs() - 86_400));
        let err = v
            .verify_client_cert(&id.chain[0], &[], earlier)
            .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::NotValidYet)
            ),
            "{err:?}"
        );
    }
}
