//! qmesh certificates: a small certificate authority for a qmesh mesh, PEM
//! files, SHA-256 fingerprints, and the rustls/quinn configurations built
//! from them.
//!
//! A coordinator serves with a certificate issued by a [`Ca`]
//! ([`Ca::issue_server`], [`server_config`]). Clients trust either the CA
//! file ([`Trust::Ca`]) or the coordinator certificate's fingerprint
//! ([`Trust::Pinned`]) and build their configuration with
//! [`client_config`]; its [`VerifyReport`] says in words why a coordinator's
//! certificate was rejected. Every client presents a certificate
//! ([`Identity::self_signed`], [`Ca::issue_client`],
//! [`client_config_with_identity`]); the coordinator records its
//! fingerprint and vouches for it when it introduces two clients.
//!
//! Every configuration uses TLS 1.3, the *ring* crypto provider and the
//! ALPN protocol `qmesh/1`. No certificate check is ever skipped.
//!
//! # Layout
//!
//! - `issue`: [`Ca`] (generate, load, save, issue certificates) and
//!   [`Identity`] (a certificate chain with its key). A loaded CA is checked
//!   with `x509-parser` and rebuilt for signing with rcgen's
//!   `Issuer::from_ca_cert_der`.
//! - `pem`: reading certificates and keys from PEM with `rustls-pki-types`
//!   ([`load_certs`], [`certs_from_pem`]) and writing PEM files with the
//!   `pem` crate (keys with mode 0600).
//! - `fingerprint`: [`Fingerprint`], the SHA-256 of a certificate's DER.
//! - `config`: [`server_config`], [`client_config`],
//!   [`client_config_with_identity`], [`Trust`] and [`VerifyReport`].
//! - [`clientauth`]: [`ClientAuth`], the coordinator's check of client
//!   certificates in the open, ca and token modes, with revocation; and
//!   readers of a certificate's names, validity and key.
//! - `peer`: client certificates as the coordinator checks them, and the
//!   configurations of direct client-to-client connections
//!   ([`direct_server_config`], [`direct_client_config`],
//!   [`peer_fingerprint`]).
//! - `signature`: the handshake-signature check (TLS 1.2 and 1.3, the
//!   provider's schemes) that the verifiers in `clientauth`, `config` and
//!   `peer` share.
//! - [`transport`]: QUIC transport tuning ([`transport::Tuning`]) shared by
//!   the coordinator and clients.
//! - `error`: [`CertError`].
#![warn(missing_docs)]

pub mod clientauth;
mod config;
mod error;
mod fingerprint;
mod issue;
mod peer;
mod pem;
mod signature;
pub mod transport;

pub use clientauth::ClientAuth;
pub use config::{
    client_config, client_config_with_identity, server_config, server_config_with, Trust,
    VerifyReport,
};
pub use error::CertError;
pub use fingerprint::Fingerprint;
pub use issue::{Ca, Identity, Issued};
pub use peer::{
    direct_client_config, direct_server_config, link_client_config, link_server_config, peer_chain,
    peer_fingerprint, AcceptFingerprint,
};
pub use pem::{certs_from_pem, load_certs};

/// A DER certificate as a PEM `CERTIFICATE` block.
pub fn pem_encode_cert(der: &[u8]) -> String {
    pem::encode("CERTIFICATE", der)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &std::path::Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn ca_save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        let ca = Ca::generate("qmesh test CA").unwrap();
        ca.save(&cert, &key).unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&key), 0o600);

        let loaded = Ca::load(&cert, &key).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        assert_eq!(load_certs(&cert).unwrap(), vec![ca.cert_der().clone()]);
        assert_eq!(certs_from_pem(ca.cert_pem()).unwrap()[0], *ca.cert_der());

        // The loaded CA issues certificates whose issuer is the CA's subject.
        let leaf = loaded.issue_server(&["localhost".to_owned()]).unwrap();
        let leaf_cert = issue::parse_cert(&leaf.chain[0], "leaf").unwrap();
        let ca_cert = issue::parse_cert(ca.cert_der(), "CA").unwrap();
        assert_eq!(leaf_cert.issuer().as_raw(), ca_cert.subject().as_raw());
        assert!(ca_cert.is_ca());
        assert!(!leaf_cert.is_ca());
        // The leaf's authority key identifier is the CA's subject key identifier.
        use x509_parser::extensions::ParsedExtension;
        let ski = ca_cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
                _ => None,
            });
        let aki = leaf_cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|id| id.0)
                }
                _ => None,
            });
        assert!(ski.is_some());
        assert_eq!(aki, ski);
    }

    #[test]
    fn ca_made_elsewhere_with_a_richer_name_loads_and_chains() {
        // A CA not made by Ca::generate: several name attributes with
        // different string types and no subject key identifier extension.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            rcgen::DnType::CountryName,
            rcgen::DnValue::PrintableString("NL".try_into().unwrap()),
        );
        dn.push(rcgen::DnType::OrganizationName, "qmesh tests");
        dn.push(rcgen::DnType::CommonName, "Ext CA");
        params.distinguished_name = dn;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(vec![7; 20]);
        let cert = params.self_signed(&key).unwrap();

        let ca = Ca::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
        let leaf = ca.issue_client("alice").unwrap();
        let leaf_cert = issue::parse_cert(&leaf.chain[0], "leaf").unwrap();
        let ca_cert = issue::parse_cert(cert.der(), "CA").unwrap();
        assert_eq!(leaf_cert.issuer().as_raw(), ca_cert.subject().as_raw());
    }

    #[test]
    fn certificate_without_basic_constraints_is_not_a_ca() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["plain".to_owned()]).unwrap();
        params.is_ca = rcgen::IsCa::NoCa;
        let cert = params.self_signed(&key).unwrap();
        let err = Ca::from_pem(&cert.pem(), &key.serialize_pem()).unwrap_err();
        assert!(matches!(err, CertError::NotACa { .. }), "{err}");
        assert!(err.to_string().contains("CA:true"), "{err}");
    }

    #[test]
    fn garbage_certificate_is_a_clear_error() {
        // Valid PEM, but the block does not hold an X.509 certificate.
        let ca = Ca::generate("CA").unwrap();
        let garbage = "-----BEGIN CERTIFICATE-----\nAQIDBAUGBwg=\n-----END CERTIFICATE-----\n";
        let err = Ca::from_pem(garbage, &ca.key_pem()).unwrap_err();
        assert!(matches!(err, CertError::BadCertificate { .. }), "{err}");
        assert!(err.to_string().contains("malformed certificate"), "{err}");

        let id = ca.issue_client("a").unwrap();
        let err = Identity::from_pem(garbage, &id.key_pem()).unwrap_err();
        assert!(matches!(err, CertError::BadCertificate { .. }), "{err}");

        // Trailing bytes after a real certificate are refused too.
        let mut der = ca.cert_der().to_vec();
        der.push(0);
        let padded = pem::encode("CERTIFICATE", &der);
        let err = Ca::from_pem(&padded, &ca.key_pem()).unwrap_err();
        assert!(matches!(err, CertError::BadCertificate { .. }), "{err}");
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn key_mode_is_tightened_on_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("id.pem"), dir.path().join("id.key"));
        std::fs::write(&key, "old").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let ca = Ca::generate("CA").unwrap();
        let id = ca.issue_client("alice").unwrap();
        id.save(&cert, &key).unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&key), 0o600);
        let loaded = Identity::load(&cert, &key).unwrap();
        assert_eq!(loaded.chain, id.chain);
        assert_eq!(loaded.key.secret_der(), id.key.secret_der());
    }

    #[test]
    fn identity_save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
        let ca = Ca::generate("CA").unwrap();
        let id = ca
            .issue_server(&["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
        id.save(&cert, &key).unwrap();
        #[cfg(unix)]
        assert_eq!(mode(&key), 0o600);
        let loaded = Identity::load(&cert, &key).unwrap();
        assert_eq!(loaded.chain, id.chain);
        assert_eq!(loaded.key.secret_der(), id.key.secret_der());
        assert_eq!(loaded.fingerprint(), id.fingerprint());
        assert_eq!(loaded.cert_pem(), id.cert_pem());
        assert_eq!(loaded.key_pem(), id.key_pem());
        assert!(id.key_pem().starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let cloned = id.clone();
        assert_eq!(cloned.chain, id.chain);
        assert_eq!(cloned.key.secret_der(), id.key.secret_der());
        // Debug never shows the key.
        let debug = format!("{id:?} {ca:?}");
        assert!(debug.contains("<elided>"));
        assert!(!debug.contains(&hex::encode(id.key.secret_der())));
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let ca = Ca::generate("CA").unwrap();
        let a = ca.issue_client("a").unwrap();
        let b = ca.issue_client("b").unwrap();
        let err = Identity::from_pem(&a.cert_pem(), &b.key_pem()).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");

        let other = Ca::generate("other").unwrap();
        let err = Ca::from_pem(ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn leaf_is_not_a_ca() {
        let ca = Ca::generate("CA").unwrap();
        let leaf = ca.issue_server(&["localhost".to_owned()]).unwrap();
        let err = Ca::from_pem(&leaf.cert_pem(), &leaf.key_pem()).unwrap_err();
        assert!(matches!(err, CertError::NotACa { .. }), "{err}");
        assert!(err.to_string().contains("pass the CA certificate"), "{err}");
    }

    #[test]
    fn issue_server_requires_valid_hosts() {
        let ca = Ca::generate("CA").unwrap();
        assert!(matches!(ca.issue_server(&[]), Err(CertError::NoHosts)));
        let err = ca.issue_server(&["bad host".to_owned()]).unwrap_err();
        assert!(matches!(err, CertError::InvalidName { .. }), "{err}");
        let err = ca.issue_client("").unwrap_err();
        assert!(matches!(err, CertError::InvalidName { .. }), "{err}");
        assert!(matches!(
            Ca::generate(" "),
            Err(CertError::InvalidName { .. })
        ));
    }

    #[test]
    fn ca_and_key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = Ca::load(&missing, &missing).unwrap_err();
        assert!(matches!(err, CertError::Io { .. }), "{err}");
        let ca = Ca::generate("CA").unwrap();
        let err = Ca::from_pem(ca.cert_pem(), ca.cert_pem()).unwrap_err();
        assert!(matches!(err, CertError::NoPrivateKey { .. }), "{err}");
        let err = Ca::from_pem(&ca.key_pem(), &ca.key_pem()).unwrap_err();
        assert!(matches!(err, CertError::NoCertificates { .. }), "{err}");
    }
}
