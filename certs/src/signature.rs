//! The handshake-signature checks every verifier in this crate shares.
//!
//! Whatever a verifier decides about a certificate, the peer must still
//! prove it holds the certificate's key by signing the handshake. The
//! client-certificate verifiers ([`crate::clientauth`], `peer`) and the
//! pinned server verifier (`config`) all check that signature the same way,
//! with the algorithms of the crate's *ring* provider: [`Signatures`] is that
//! check, and [`handshake_signatures!`] writes the three rustls trait
//! methods that delegate to it.

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::CertificateDer;

/// Checks handshake signatures against the key of a presented certificate,
/// with the signature algorithms of one crypto provider.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Signatures(WebPkiSupportedAlgorithms);

impl Signatures {
    /// The signature algorithms `provider` verifies.
    pub(crate) fn of(provider: &CryptoProvider) -> Signatures {
        Signatures(provider.signature_verification_algorithms)
    }

    /// Verify a TLS 1.2 handshake signature over `message` by `cert`'s key.
    pub(crate) fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    /// Verify a TLS 1.3 handshake signature over `message` by `cert`'s key.
    pub(crate) fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    /// The signature schemes a peer may sign the handshake with.
    pub(crate) fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Inside an `impl ServerCertVerifier` or `impl ClientCertVerifier` block:
/// the `verify_tls12_signature`, `verify_tls13_signature` and
/// `supported_verify_schemes` methods, delegating to the [`Signatures`] at
/// the field path given (`signatures`, `auth.signatures`) of `self`.
macro_rules! handshake_signatures {
    ($($field:ident).+) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &::rustls_pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            self.$($field).+.tls12(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls_pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            self.$($field).+.tls13(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<::rustls::SignatureScheme> {
            self.$($field).+.schemes()
        }
    };
}
pub(crate) use handshake_signatures;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::internal::msgs::codec::{Codec, Reader};
    use rustls::server::danger::ClientCertVerifier;

    use super::*;
    use crate::config::{provider, PinnedVerifier};
    use crate::peer::ClientCertCheck;
    use crate::{ClientAuth, Identity, VerifyReport};

    /// The scheme rcgen's default keys (ECDSA P-256) sign with.
    const SCHEME: SignatureScheme = SignatureScheme::ECDSA_NISTP256_SHA256;

    /// `identity`'s key signing `message`, as a handshake would carry it.
    fn signed(identity: &Identity, message: &[u8]) -> DigitallySignedStruct {
        let key = provider()
            .key_provider
            .load_private_key(identity.key.clone_key())
            .unwrap();
        let signature = key.choose_scheme(&[SCHEME]).unwrap().sign(message).unwrap();
        // rustls builds this struct only from the wire: scheme, length, bytes.
        let mut wire = Vec::new();
        SCHEME.encode(&mut wire);
        wire.extend((signature.len() as u16).to_be_bytes());
        wire.extend(signature);
        DigitallySignedStruct::read(&mut Reader::init(&wire)).unwrap()
    }

    /// One verifier's check of a handshake signature.
    type Check = Box<
        dyn Fn(
            &[u8],
            &CertificateDer<'_>,
            &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error>,
    >;

    /// A verifier's name, its TLS 1.2 check, its TLS 1.3 check and its
    /// schemes.
    macro_rules! checks {
        ($name:expr, $verifier:expr) => {{
            let v = Arc::new($verifier);
            let (v12, v13) = (v.clone(), v.clone());
            let tls12: Check = Box::new(move |m, c, d| v12.verify_tls12_signature(m, c, d));
            let tls13: Check = Box::new(move |m, c, d| v13.verify_tls13_signature(m, c, d));
            ($name, tls12, tls13, v.supported_verify_schemes())
        }};
    }

    /// The three verifiers of this crate, as their signature checks.
    fn verifiers() -> Vec<(&'static str, Check, Check, Vec<SignatureScheme>)> {
        let pin = Identity::self_signed("pinned").unwrap().fingerprint();
        vec![
            checks!(
                "client auth",
                ClientAuth::any(Arc::new(|_| false)).verifier()
            ),
            checks!(
                "direct client check",
                ClientCertCheck::new(&provider(), Arc::new(|_| true))
            ),
            checks!(
                "pinned server",
                PinnedVerifier::new(pin, "the peer", &provider(), VerifyReport::default())
            ),
        ]
    }

    #[test]
    fn every_verifier_accepts_the_signature_of_the_certificates_key_and_only_that() {
        let alice = Identity::self_signed("alice").unwrap();
        let mallory = Identity::self_signed("alice").unwrap();
        let message = b"the handshake transcript";
        let good = signed(&alice, message);
        let forged = signed(&mallory, message);
        for (name, tls12, tls13, _) in verifiers() {
            for (version, check) in [("1.2", &tls12), ("1.3", &tls13)] {
                assert!(
                    check(message, &alice.chain[0], &good).is_ok(),
                    "{name}, TLS {version}: the key's own signature"
                );
                assert!(
                    check(b"another transcript", &alice.chain[0], &good).is_err(),
                    "{name}, TLS {version}: a signature over other bytes"
                );
                assert!(
                    check(message, &alice.chain[0], &forged).is_err(),
                    "{name}, TLS {version}: another key's signature"
                );
            }
        }
    }

    #[test]
    fn every_verifier_offers_the_providers_schemes() {
        let expected = provider()
            .signature_verification_algorithms
            .supported_schemes();
        assert!(expected.contains(&SCHEME));
        for (name, _, _, schemes) in verifiers() {
            assert_eq!(schemes, expected, "{name}");
        }
    }
}
