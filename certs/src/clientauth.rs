//! How the coordinator checks the certificates clients present.
//!
//! One verifier serves every auth mode; [`ClientAuth`] says what it lets
//! through the TLS handshake:
//!
//! - `open`: any well-formed certificate within its validity period;
//! - `ca`: certificates that chain to the configured client CA;
//! - `token`: certificates that chain to the coordinator's own client CA,
//!   and self-signed certificates, which may only enroll (the coordinator
//!   checks [`ClientAuth::issued_names`] after the handshake).
//!
//! In every mode a revoked fingerprint is refused with the TLS alert
//! `certificate_revoked`, an expired or not yet valid certificate with
//! `certificate_expired`, and a certificate from another CA with
//! `unknown_ca`. In every mode the key must sign the handshake.

use std::fmt;
use std::sync::Arc;

use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DistinguishedName, RootCertStore};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::config::provider;
use crate::signature::{handshake_signatures, Signatures};
use crate::{CertError, Fingerprint};

/// Says whether a certificate fingerprint has been revoked.
pub type RevokedCheck = Arc<dyn Fn(&Fingerprint) -> bool + Send + Sync>;

/// What the coordinator admits through the TLS handshake.
#[derive(Clone)]
pub struct ClientAuth {
    /// The client CA certificates, or empty for none.
    roots: Vec<CertificateDer<'static>>,
    webpki: Option<Arc<dyn ClientCertVerifier>>,
    self_signed: bool,
    revoked: RevokedCheck,
    signatures: Signatures,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("roots", &self.roots.len())
            .field("self_signed", &self.self_signed)
            .finish()
    }
}

impl ClientAuth {
    /// Admit any well-formed certificate within its validity period (the
    /// `open` mode), unless revoked.
    pub fn any(revoked: RevokedCheck) -> ClientAuth {
        ClientAuth {
            roots: Vec::new(),
            webpki: None,
            self_signed: true,
            revoked,
            signatures: Signatures::of(&provider()),
        }
    }

    /// Admit certificates that chain to one of `roots` (the `ca` and
    /// `token` modes); with `self_signed`, self-signed certificates too
    /// (for enrollment in `token` mode).
    pub fn ca(
        roots: Vec<CertificateDer<'static>>,
        self_signed: bool,
        revoked: RevokedCheck,
    ) -> Result<ClientAuth, CertError> {
        if roots.is_empty() {
            return Err(CertError::Pem {
                what: "the client CA file holds no certificate".into(),
            });
        }
        let provider = provider();
        let mut store = RootCertStore::empty();
        for root in &roots {
            store.add(root.clone()).map_err(|e| CertError::Pem {
                what: format!("a client CA certificate is not usable as a trust anchor: {e}"),
            })?;
        }
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .map_err(|e| CertError::Pem {
                what: format!("cannot build the client certificate verifier: {e}"),
            })?;
        Ok(ClientAuth {
            roots,
            webpki: Some(webpki),
            self_signed,
            revoked,
            signatures: Signatures::of(&provider),
        })
    }

    /// The names a presented chain (leaf first) may use, when it chains to
    /// the client CA: its DNS subject alternative names. `None` when this
    /// auth has no CA or the chain does not verify against it.
    pub fn issued_names(&self, chain: &[CertificateDer<'_>]) -> Option<Vec<String>> {
        let webpki = self.webpki.as_ref()?;
        let (leaf, rest) = chain.split_first()?;
        webpki
            .verify_client_cert(leaf, rest, UnixTime::now())
            .ok()?;
        Some(dns_names(leaf))
    }

    /// Whether this auth checks certificates against a client CA.
    pub fn has_ca(&self) -> bool {
        self.webpki.is_some()
    }

    /// The rustls verifier for this auth.
    pub(crate) fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::new(Verifier { auth: self.clone() })
    }
}

/// The DNS subject alternative names of a DER certificate (empty when it
/// has none or does not parse).
pub fn dns_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

/// A DER certificate's validity period as (not before, not after), in
/// seconds since the Unix epoch; `None` if it does not parse.
pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// SHA-256 of a DER certificate's subject public key info: the same for
/// every certificate issued for one key (a renewal keeps the key).
pub fn key_id(der: &[u8]) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(Sha256::digest(cert.public_key().raw).into())
}

/// Whether a DER certificate names itself as its issuer.
pub fn is_self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.issuer() == c.subject())
        .unwrap_or(false)
}

/// The rustls face of a [`ClientAuth`].
struct Verifier {
    auth: ClientAuth,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.auth.fmt(f)
    }
}

fn invalid(e: CertificateError) -> rustls::Error {
    rustls::Error::InvalidCertificate(e)
}

/// Parse a presented leaf certificate (trailing bytes refused) and check it
/// is within its validity period at `now`: the checks every client
/// certificate verifier here starts with.
pub(crate) fn parse_valid_leaf<'a>(
    der: &'a CertificateDer<'_>,
    now: UnixTime,
) -> Result<X509Certificate<'a>, rustls::Error> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|_| invalid(CertificateError::BadEncoding))?;
    if !rest.is_empty() {
        return Err(invalid(CertificateError::BadEncoding));
    }
    let secs = now.as_secs() as i64;
    let validity = cert.validity();
    if secs < validity.not_before.timestamp() {
        return Err(invalid(CertificateError::NotValidYet));
    }
    if secs > validity.not_after.timestamp() {
        return Err(invalid(CertificateError::Expired));
    }
    Ok(cert)
}

impl ClientCertVerifier for Verifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client has one certificate and presents it.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let auth = &self.auth;
        let cert = parse_valid_leaf(end_entity, now)?;
        if (auth.revoked)(&Fingerprint::of(end_entity)) {
            return Err(invalid(CertificateError::Revoked));
        }
        let Some(webpki) = &auth.webpki else {
            return Ok(ClientCertVerified::assertion());
        };
        match webpki.verify_client_cert(end_entity, intermediates, now) {
            Ok(v) => Ok(v),
            Err(_) if auth.self_signed && cert.issuer() == cert.subject() => {
                Ok(ClientCertVerified::assertion())
            }
            Err(e) => Err(e),
        }
    }

    handshake_signatures!(auth.signatures);

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{Ca, Identity};

    fn never() -> RevokedCheck {
        Arc::new(|_| false)
    }

    fn err_of(auth: &ClientAuth, id: &Identity) -> Option<rustls::Error> {
        auth.verifier()
            .verify_client_cert(&id.chain[0], &id.chain[1..], UnixTime::now())
            .err()
    }

    #[test]
    fn ca_mode_admits_issued_and_refuses_others() {
        let ca = Ca::generate("clients").unwrap();
        let other = Ca::generate("other").unwrap();
        let auth = ClientAuth::ca(vec![ca.cert_der().clone()], false, never()).unwrap();
        let alice = ca.issue_client("alice").unwrap();
        assert!(err_of(&auth, &alice).is_none());
        assert_eq!(auth.issued_names(&alice.chain), Some(vec!["alice".into()]));
        let stranger = other.issue_client("alice").unwrap();
        assert!(matches!(
            err_of(&auth, &stranger),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ));
        let selfie = Identity::self_signed("alice").unwrap();
        assert!(err_of(&auth, &selfie).is_some());
        assert_eq!(auth.issued_names(&selfie.chain), None);
    }

    #[test]
    fn token_mode_lets_self_signed_through_but_not_as_issued() {
        let ca = Ca::generate("clients").unwrap();
        let auth = ClientAuth::ca(vec![ca.cert_der().clone()], true, never()).unwrap();
        let selfie = Identity::self_signed("alice").unwrap();
        assert!(err_of(&auth, &selfie).is_none());
        assert_eq!(auth.issued_names(&selfie.chain), None);
        // Issued by another CA and not self-signed: refused.
        let other = Ca::generate("other").unwrap();
        assert!(err_of(&auth, &other.issue_client("alice").unwrap()).is_some());
    }

    #[test]
    fn revoked_fingerprints_are_refused_in_every_mode() {
        let ca = Ca::generate("clients").unwrap();
        let alice = ca.issue_client("alice").unwrap();
        let fp = alice.fingerprint();
        let revoked: RevokedCheck = Arc::new(move |f| *f == fp);
        for auth in [
            ClientAuth::any(revoked.clone()),
            ClientAuth::ca(vec![ca.cert_der().clone()], false, revoked.clone()).unwrap(),
        ] {
            assert!(matches!(
                err_of(&auth, &alice),
                Some(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            ));
        }
    }

    #[test]
    fn issued_for_key_carries_the_name_and_lifetime() {
        let ca = Ca::generate("clients").unwrap();
        let selfie = Identity::self_signed("bob").unwrap();
        let issued = ca
            .issue_client_for(
                &selfie.chain[0],
                "bob",
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        assert_eq!(dns_names(&issued.cert), vec!["bob".to_owned()]);
        let (_, not_after) = validity(&issued.cert).unwrap();
        assert_eq!(not_after as u64, issued.expires);
        let now = UnixTime::now().as_secs();
        assert!(issued.expires > now + 3500 && issued.expires <= now + 3600);
        // The same key: the self-signed identity's key goes with the new cert.
        let id = Identity::from_pem(
            &crate::pem::encode("CERTIFICATE", &issued.cert),
            &selfie.key_pem(),
        )
        .unwrap();
        let auth = ClientAuth::ca(vec![ca.cert_der().clone()], false, never()).unwrap();
        assert!(err_of(&auth, &id).is_none());
        assert!(!is_self_signed(&issued.cert));
        assert!(is_self_signed(&selfie.chain[0]));
    }
}
