//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while creating, loading, saving or using
/// certificates.
///
/// Each message says what went wrong and, where there is one, what to do
/// about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// Reading or writing a file failed.
    #[error(
        "cannot access {}: {source} (check that the path exists and that this user may read or write it)",
        path.display()
    )]
    Io {
        /// The file that could not be read or written.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// PEM text could not be parsed.
    #[error("invalid PEM: {what}")]
    Pem {
        /// What was wrong with it, including where it came from.
        what: String,
    },

    /// A PEM file or text holds no `CERTIFICATE` block.
    #[error(
        "no certificate found in {origin}: expected PEM text with at least one \
         -----BEGIN CERTIFICATE----- block"
    )]
    NoCertificates {
        /// Where the certificates were expected (a file path or a description).
        origin: String,
    },

    /// A PEM file or text holds no private key block.
    #[error(
        "no private key found in {origin}: expected PEM text with a \
         -----BEGIN PRIVATE KEY----- (or EC/RSA PRIVATE KEY) block"
    )]
    NoPrivateKey {
        /// Where the key was expected (a file path or a description).
        origin: String,
    },

    /// A private key cannot be used for signing certificates.
    #[error(
        "the private key in {origin} cannot be used to sign certificates: {source} \
         (a CA key must be an unencrypted PKCS#8 key, -----BEGIN PRIVATE KEY-----)"
    )]
    UnsupportedKey {
        /// Where the key came from.
        origin: String,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },

    /// A private key does not belong to the certificate it was paired with.
    #[error(
        "the private key does not match the certificate in {origin}: \
         pass the key file that was written together with this certificate"
    )]
    KeyMismatch {
        /// Which certificate the key was paired with.
        origin: String,
    },

    /// A certificate given as a CA is not usable as one.
    #[error("the certificate in {origin} cannot be used as a CA: {reason}")]
    NotACa {
        /// Where the certificate came from.
        origin: String,
        /// Why it is not usable.
        reason: String,
    },

    /// A certificate's DER encoding could not be understood.
    #[error("malformed certificate in {origin}: {reason}")]
    BadCertificate {
        /// Where the certificate came from.
        origin: String,
        /// What was wrong with it.
        reason: String,
    },

    /// A server certificate was requested without any host name or address.
    #[error(
        "a server certificate needs at least one host name or IP address: \
         give the names clients will connect to (for example localhost or 127.0.0.1)"
    )]
    NoHosts,

    /// A host name or client name cannot be put into a certificate.
    #[error("{name:?} cannot be used as a certificate name: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },

    /// Certificate generation or signing failed in rcgen.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),

    /// rustls rejected a configuration (for example a key it cannot use).
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),

    /// The system's trust store held no usable root certificate.
    #[error(
        "no trusted root certificates in {origin} ({detail}); give the coordinator's CA with \
         --ca FILE, or set SSL_CERT_FILE to a PEM bundle of roots"
    )]
    NoSystemRoots {
        /// Which store was read.
        origin: String,
        /// What reading it found.
        detail: String,
    },

    /// A trust anchor could not be added to the root store.
    #[error("the CA certificate from {origin} cannot be used as a trust anchor: {source}")]
    BadTrustAnchor {
        /// Where the CA certificate came from.
        origin: String,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },

    /// The server certificate verifier could not be built.
    #[error("cannot build a certificate verifier for the CA in {origin}: {source}")]
    Verifier {
        /// Where the CA certificates came from.
        origin: String,
        /// The rustls error.
        #[source]
        source: rustls::client::VerifierBuilderError,
    },

    /// The TLS configuration lacks the cipher suite QUIC needs for its
    /// initial packets.
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),

    /// A fingerprint string could not be parsed.
    #[error(
        "invalid certificate fingerprint {input:?}: {reason} (expected sha256: followed by \
         64 hex digits, optionally separated by ':' between bytes)"
    )]
    BadFingerprint {
        /// The rejected input.
        input: String,
        /// What was wrong with it.
        reason: String,
    },
}
