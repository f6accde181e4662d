//! The certificate authority and the identities it issues.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::pem::{self, certs_from, key_from};
use crate::{CertError, Fingerprint};

/// How long a generated CA certificate is valid: about ten years.
const CA_VALIDITY: Duration = Duration::days(3650);
/// How long an issued server or client certificate is valid: 825 days.
const LEAF_VALIDITY: Duration = Duration::days(825);
/// How far `notBefore` is backdated, to tolerate clocks that run behind.
const BACKDATE: Duration = Duration::hours(1);

/// A certificate authority: a self-signed CA certificate and its key, able to
/// issue server and client certificates.
///
/// Keys are ECDSA P-256. The CA certificate has basic constraints `CA:true`
/// with path length 0 (it signs leaf certificates only) and key usages
/// keyCertSign, cRLSign and digitalSignature.
pub struct Ca {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Generates a new self-signed CA named `common_name`, valid for about
    /// ten years from now (backdated by an hour for clock skew).
    pub fn generate(common_name: &str) -> Result<Ca, CertError> {
        if common_name.trim().is_empty() {
            return Err(CertError::InvalidName {
                name: common_name.to_owned(),
                reason: "a CA needs a non-empty common name".to_owned(),
            });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY)?;
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        Ok(Ca {
            cert_pem: pem::encode("CERTIFICATE", &cert_der),
            cert_der,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from PEM text: the CA certificate (the first `CERTIFICATE`
    /// block) and its private key (PKCS#8).
    ///
    /// The certificate must be a CA (basic constraints `CA:true`), the key
    /// must belong to it, and its subject must be a name rcgen can
    /// reproduce when signing (one attribute per RDN, as produced by
    /// [`Ca::generate`], rcgen and openssl).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, CertError> {
        Ca::from_pem_named(cert_pem, key_pem, "the given CA PEM", "the given key PEM")
    }

    /// Loads a CA from a certificate file and a key file, as written by
    /// [`Ca::save`]. See [`Ca::from_pem`] for what is checked.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, CertError> {
        let cert_pem = pem::read_text(cert_path)?;
        let key_pem = pem::read_text(key_path)?;
        Ca::from_pem_named(
            &cert_pem,
            &key_pem,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    fn from_pem_named(
        cert_pem: &str,
        key_pem: &str,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Ca, CertError> {
        let cert_der = certs_from(cert_pem, cert_origin)?.swap_remove(0);
        let key_der = key_from(key_pem, key_origin)?;
        let key = KeyPair::try_from(&key_der).map_err(|source| CertError::UnsupportedKey {
            origin: key_origin.to_owned(),
            source,
        })?;

        let not_a_ca = |reason: String| CertError::NotACa {
            origin: cert_origin.to_owned(),
            reason,
        };
        let subject = {
            let cert = parse_cert(&cert_der, cert_origin)?;
            let constraints = cert
                .basic_constraints()
                .map_err(|e| not_a_ca(format!("its basic constraints cannot be read: {e}")))?;
            if !constraints.is_some_and(|bc| bc.value.ca) {
                return Err(not_a_ca(
                    "its basic constraints do not say CA:true (is this a server or client \
                     certificate? pass the CA certificate instead)"
                        .to_owned(),
                ));
            }
            if cert.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(CertError::KeyMismatch {
                    origin: cert_origin.to_owned(),
                });
            }
            cert.subject().as_raw().to_vec()
        };

        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| {
            not_a_ca(format!(
                "its subject name cannot be reused for signing ({e}): it must have one \
                 attribute per RDN with string values, as written by rcgen and openssl"
            ))
        })?;

        // Certificates chain by exact name bytes: make sure what rcgen will
        // write as the issuer of new certificates is this CA's subject.
        let probe = CertificateParams::default().signed_by(issuer.key(), &issuer)?;
        let probe = parse_cert(probe.der(), "a probe certificate")?;
        if probe.issuer().as_raw() != subject.as_slice() {
            return Err(not_a_ca(
                "its subject name uses an encoding this crate cannot reproduce when signing"
                    .to_owned(),
            ));
        }

        Ok(Ca {
            cert_pem: pem::encode("CERTIFICATE", &cert_der),
            cert_der,
            issuer,
        })
    }

    /// Writes the CA certificate to `cert_path` and its private key to
    /// `key_path` (mode 0600 on unix), replacing existing files.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
        pem::write_public(cert_path, &self.cert_pem)?;
        pem::write_private(key_path, &self.key_pem())
    }

    /// The CA certificate, DER-encoded.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate as PEM text: what clients put in their CA file.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key as PKCS#8 PEM text. Keep it secret.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The SHA-256 fingerprint of the CA certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert_der)
    }

    /// Issues a server certificate (extended key usage serverAuth) with a
    /// fresh ECDSA P-256 key, valid for 825 days.
    ///
    /// Each host that parses as an IP address becomes an IP address subject
    /// alternative name, every other host a DNS name. The common name is the
    /// first host. At least one host is required ([`CertError::NoHosts`]).
    pub fn issue_server(&self, hosts: &[String]) -> Result<Identity, CertError> {
        let first = hosts.first().ok_or(CertError::NoHosts)?;
        let mut params = leaf_params(first)?;
        for host in hosts {
            let san = match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(dns_name(host)?),
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// Issues a client certificate (extended key usage clientAuth) with a
    /// fresh ECDSA P-256 key, valid for 825 days.
    ///
    /// The common name is `name` and so is the one DNS subject alternative
    /// name, so `name` must be usable as a DNS name (letters, digits, `-`
    /// and `.`).
    pub fn issue_client(&self, name: &str) -> Result<Identity, CertError> {
        let mut params = leaf_params(name)?;
        params.subject_alt_names = vec![SanType::DnsName(dns_name(name)?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    /// Issues a client certificate for `name` (common name and DNS name)
    /// for the public key of `presented`, a certificate whose key the
    /// client has just proved it holds (in a TLS handshake), valid for
    /// `ttl` from now. This is how token enrollment and renewal certify a
    /// key that never leaves the client.
    pub fn issue_client_for(
        &self,
        presented: &CertificateDer<'_>,
        name: &str,
        ttl: std::time::Duration,
    ) -> Result<Issued, CertError> {
        let ttl = Duration::try_from(ttl)
            .unwrap_or(LEAF_VALIDITY)
            .min(LEAF_VALIDITY);
        let now = std::time::SystemTime::now();
        // A short backdate for clocks a little behind: five minutes, and
        // never more than a quarter of the lifetime. Renewal is due two
        // thirds from `notBefore`, so a backdate as long as the lifetime
        // (a 30 s certificate backdated 5 min) would make every new
        // certificate due at once, and the client would renew in a loop.
        let backdate = (ttl / 4_u32).min(Duration::minutes(5));
        self.issue_client_valid(presented, name, now - backdate, now + ttl)
    }

    /// As [`Ca::issue_client_for`], valid from `not_before` to `not_after`
    /// exactly: for a certificate already some way into its life, as a
    /// test of renewal needs one.
    pub fn issue_client_valid(
        &self,
        presented: &CertificateDer<'_>,
        name: &str,
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Result<Issued, CertError> {
        let leaf = parse_cert(presented, "the presented certificate")?;
        let spki = rcgen::SubjectPublicKeyInfo::from_der(leaf.public_key().raw)?;
        let mut params = leaf_params(name)?;
        params.subject_alt_names = vec![SanType::DnsName(dns_name(name)?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        let cert = params.signed_by(&spki, &self.issuer)?;
        Ok(Issued {
            cert: cert.der().clone(),
            expires: params.not_after.unix_timestamp().max(0) as u64,
        })
    }

    fn issue(&self, params: CertificateParams) -> Result<Identity, CertError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .field("key", &"<elided>")
            .finish()
    }
}

/// A certificate issued for a key the CA does not hold
/// ([`Ca::issue_client_for`]).
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert: CertificateDer<'static>,
    /// When it expires, in seconds since the Unix epoch.
    pub expires: u64,
}

/// A certificate chain and its private key: what a server or client presents.
///
/// `chain[0]` is the leaf certificate; further entries, if any, are
/// intermediates (certificates issued by [`Ca`] have none).
pub struct Identity {
    /// The certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf certificate's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// A self-signed client identity for `name`: a fresh ECDSA P-256 key and
    /// a certificate (common name and DNS name `name`, extended key usage
    /// clientAuth and serverAuth, valid for 825 days).
    ///
    /// This is what a client presents when no certificate is configured. The
    /// coordinator learns its fingerprint from the TLS handshake and vouches
    /// for it to peers, which is what direct channels check.
    ///
    /// A name that is not a valid DNS name (one with `_`, say) goes in the
    /// common name only.
    pub fn self_signed(name: &str) -> Result<Identity, CertError> {
        let mut params = leaf_params(name)?;
        params.subject_alt_names = match dns_name(name) {
            Ok(dns) => vec![SanType::DnsName(dns)],
            Err(_) => Vec::new(),
        };
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        Ok(Identity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// Loads an identity from PEM text: every `CERTIFICATE` block of
    /// `cert_pem` (leaf first) and the first private key of `key_pem`
    /// (PKCS#8, SEC1 or PKCS#1). The key must belong to the leaf.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Identity, CertError> {
        Identity::from_pem_named(
            cert_pem,
            key_pem,
            "the given certificate PEM",
            "the given key PEM",
        )
    }

    /// Loads an identity from a certificate file and a key file, as written
    /// by [`Identity::save`]. See [`Identity::from_pem`] for what is checked.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Identity, CertError> {
        let cert_pem = pem::read_text(cert_path)?;
        let key_pem = pem::read_text(key_path)?;
        Identity::from_pem_named(
            &cert_pem,
            &key_pem,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    fn from_pem_named(
        cert_pem: &str,
        key_pem: &str,
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Identity, CertError> {
        let chain = certs_from(cert_pem, cert_origin)?;
        let key = key_from(key_pem, key_origin)?;
        let signing_key = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| CertError::Pem {
                what: format!("the private key in {key_origin} is not usable: {e}"),
            })?;
        if let Some(public) = signing_key.public_key() {
            let leaf = parse_cert(&chain[0], cert_origin)?;
            if leaf.public_key().raw != public.as_ref() {
                return Err(CertError::KeyMismatch {
                    origin: cert_origin.to_owned(),
                });
            }
        }
        Ok(Identity { chain, key })
    }

    /// Writes the certificate chain to `cert_path` and the private key to
    /// `key_path` (mode 0600 on unix), replacing existing files.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
        pem::write_public(cert_path, &self.cert_pem())?;
        pem::write_private(key_path, &self.key_pem())
    }

    /// The certificate chain as PEM text, leaf first.
    pub fn cert_pem(&self) -> String {
        self.chain
            .iter()
            .map(|cert| pem::encode("CERTIFICATE", cert))
            .collect()
    }

    /// The private key as PEM text, in the encoding it was loaded or
    /// generated in (PKCS#8 for generated keys). Keep it secret.
    pub fn key_pem(&self) -> String {
        pem::encode(pem::key_label(&self.key), self.key.secret_der())
    }

    /// The SHA-256 fingerprint of the leaf certificate (`chain[0]`): what a
    /// client pins with [`Trust::Pinned`](crate::Trust::Pinned).
    pub fn fingerprint(&self) -> Fingerprint {
        // Every constructor in this crate ensures a non-empty chain; a
        // hand-built empty one has the fingerprint of empty input.
        match self.chain.first() {
            Some(leaf) => Fingerprint::of(leaf),
            None => Fingerprint::of(&CertificateDer::from(&[][..])),
        }
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chain: Vec<Fingerprint> = self.chain.iter().map(Fingerprint::of).collect();
        f.debug_struct("Identity")
            .field("chain", &chain)
            .field("key", &"<elided>")
            .finish()
    }
}

/// Parameters shared by server and client certificates.
fn leaf_params(common_name: &str) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_VALIDITY)?;
    Ok(params)
}

/// Sets a random serial number and a validity period starting (an hour
/// before) now.
fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), CertError> {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    let mut serial = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut serial)
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)?;
    // Positive and without leading zero byte.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(())
}

/// Checks that `name` is a valid DNS name and converts it for rcgen.
fn dns_name(name: &str) -> Result<Ia5String, CertError> {
    let invalid = |reason: &str| CertError::InvalidName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    DnsName::try_from(name).map_err(|_| {
        invalid("it is neither an IP address nor a valid DNS name (letters, digits, '-' and '.')")
    })?;
    Ia5String::try_from(name).map_err(|_| invalid("it is not ASCII"))
}

/// Parses a DER certificate with x509-parser; trailing bytes are an error.
pub(crate) fn parse_cert<'a>(
    der: &'a [u8],
    origin: &str,
) -> Result<X509Certificate<'a>, CertError> {
    let bad = |reason: String| CertError::BadCertificate {
        origin: origin.to_owned(),
        reason,
    };
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| {
        bad(format!(
            "{e} (is the file a PEM CERTIFICATE block of an X.509 certificate?)"
        ))
    })?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the certificate".to_owned()));
    }
    Ok(cert)
}
