//! The coordinator's client certificate check (certs/src/clientauth.rs) on
//! arbitrary bytes as the DER certificate a client presents.
//!
//! - `dns_names`, `validity` and `is_self_signed` on the raw bytes; they
//!   must agree with `X509Certificate::from_der` (nothing when it fails).
//! - `ClientAuth::issued_names` with one fixed client CA
//!   (corpus/client_cert/ca-cert.der) and with none (`ClientAuth::any`,
//!   always `None`).
//! - The `ClientAuth` verifier itself, as the coordinator runs it: the
//!   server side of an in-memory QUIC-TLS handshake built by
//!   `server_config_with` for each auth (`any`: open mode; `ca` with the
//!   fixed CA: ca mode; `ca` with self-signed allowed: token mode), whose
//!   client presents the input as its certificate and signs with the key of
//!   corpus/cert/client-identity.pem (the corpus certificates for that key
//!   complete the handshake). Fingerprints starting with a zero byte count
//!   as revoked. The verifier is private to qmesh-certs; the handshake is
//!   the way the coordinator reaches it. It runs only for input that
//!   `X509Certificate::from_der` parses without trailing bytes: the
//!   verifier refuses anything else before doing anything else.
//!
//! What must hold, in every mode, for a certificate not within two minutes
//! of its validity bounds: outside them it is refused with
//! `certificate_expired`; within them, when revoked, with
//! `certificate_revoked`; a completed handshake means the key is ours. In
//! ca mode a completed handshake means `issued_names` is `Some`, and
//! `issued_names` being `Some` for our key means the handshake completes
//! (in every mode); in token mode a completed handshake means
//! `issued_names` is `Some` or the certificate is self-issued; open mode
//! never says `unknown_ca`. Nothing may panic.
//!
//! Allocation bound: no single allocation larger than 72 bytes per byte of
//! certificate plus 4 KiB (`qmesh_fuzz::der_bound`, the bound of the `cert`
//! target: clientauth.rs documents none, and these parse with the same
//! x509-parser), around each helper (`dns_names`, `validity`,
//! `is_self_signed`, both `issued_names`) and around each piece of the
//! handshake the server reads. Reading the client's certificate flight,
//! the server holds the handshake message (the certificate and some 150
//! bytes) and its verifier parses the certificate; the ClientHello costs
//! rustls a fixed 1.6 KiB (measured). A read may also be the one in which
//! rustls's session cache grows to its largest table, 50192 bytes (see
//! `SESSION_CACHE`), so a handshake read is held to that or the bound
//! above, whichever is larger. The test client's side of the handshake is
//! not checked.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use qmesh_certs::clientauth::{dns_names, is_self_signed, validity, RevokedCheck};
use qmesh_certs::{server_config_with, Ca, ClientAuth, Fingerprint, Identity};
use qmesh_fuzz::{check_allocation, der_bound};
use quinn_proto::crypto::rustls::QuicClientConfig;
use quinn_proto::crypto::{ClientConfig as _, ServerConfig, Session};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{Side, TransportError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{AlertDescription, DigitallySignedStruct, SignatureScheme};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// The fixed client CA of the `ca` and `token` modes.
const CA_DER: &[u8] = include_bytes!("../corpus/client_cert/ca-cert.der");
/// The client's key (and a certificate for it) from the `cert` corpus.
const CLIENT_PEM: &str = include_str!("../corpus/cert/client-identity.pem");
/// The largest table of the server's session cache (rustls's
/// `ServerSessionMemoryCache` of 256 sessions, a `HashMap` of
/// `(Vec<u8>, Vec<u8>)`): 1024 buckets of 48 bytes and their 1024 + 16
/// control bytes. It is rehashed into that size, once, while a completed
/// handshake stores its session, after many handshakes: state of the
/// process, not a cost of the certificate.
const SESSION_CACHE: usize = 1024 * 48 + 1024 + 16;
/// Seconds around a validity bound where time-dependent checks are skipped.
const MARGIN: i64 = 120;

const EXPIRED: u8 = 45; // certificate_expired
const REVOKED: u8 = 44; // certificate_revoked
const UNKNOWN_CA: u8 = 48; // unknown_ca

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Ca,
    Token,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The server finished the handshake.
    Accepted,
    /// The server failed it, with this TLS alert if it sent one.
    Refused(Option<u8>),
}

struct Fixture {
    provider: Arc<CryptoProvider>,
    client_key: Arc<dyn SigningKey>,
    client_spki: Vec<u8>,
    params: TransportParameters,
    any: ClientAuth,
    ca: ClientAuth,
    servers: Vec<(Mode, Arc<dyn ServerConfig>)>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = Identity::from_pem(CLIENT_PEM, CLIENT_PEM).expect("client identity");
        let client_key = provider
            .key_provider
            .load_private_key(client.key.clone_key())
            .expect("client key");
        let (_, leaf) = X509Certificate::from_der(&client.chain[0]).expect("client certificate");
        let client_spki = leaf.public_key().raw.to_vec();
        let revoked: RevokedCheck = Arc::new(|fp: &Fingerprint| fp.0[0] == 0);
        let roots = vec![CertificateDer::from(CA_DER.to_vec())];
        let any = ClientAuth::any(revoked.clone());
        let ca = ClientAuth::ca(roots.clone(), false, revoked.clone()).expect("ca auth");
        let token = ClientAuth::ca(roots, true, revoked).expect("token auth");
        let server = Ca::generate("fuzz server CA")
            .and_then(|ca| ca.issue_server(&["localhost".into()]))
            .expect("server identity");
        let servers = [(Mode::Open, &any), (Mode::Ca, &ca), (Mode::Token, &token)]
            .into_iter()
            .map(|(mode, auth)| {
                let config = server_config_with(&server, auth).expect("server config");
                (mode, config.crypto)
            })
            .collect();
        let params = TransportParameters::read(Side::Server, &mut &[][..]).expect("defaults");
        Fixture {
            provider,
            client_key,
            client_spki,
            params,
            any,
            ca,
            servers,
        }
    })
}

/// The test client trusts any server: only the server side is under test.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Presents the fuzzed certificate with the fixed key, whatever it is.
#[derive(Debug)]
struct Present(Arc<CertifiedKey>);

impl ResolvesClientCert for Present {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Everything `session` has to send, one piece per encryption level.
fn drain(session: &mut dyn Session) -> Vec<Vec<u8>> {
    let mut pieces = Vec::new();
    loop {
        let mut buf = Vec::new();
        let keys = session.write_handshake(&mut buf);
        if !buf.is_empty() {
            pieces.push(buf);
        }
        if keys.is_none() {
            return pieces;
        }
    }
}

fn alert(e: &TransportError) -> Option<u8> {
    let code = u64::from(e.code);
    (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8)
}

/// A handshake with `server` in which the client presents `leaf`.
fn handshake(fx: &Fixture, server: &Arc<dyn ServerConfig>, leaf: &[u8]) -> Outcome {
    let certified = CertifiedKey::new(vec![leaf.to_vec().into()], fx.client_key.clone());
    let mut tls = rustls::ClientConfig::builder_with_provider(fx.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(fx.provider.clone())))
        .with_client_cert_resolver(Arc::new(Present(Arc::new(certified))));
    tls.alpn_protocols = vec![qmesh_proto::ALPN.to_vec()];
    let client = Arc::new(QuicClientConfig::try_from(tls).expect("QUIC client config"));
    let mut client = client
        .start_session(1, "localhost", &fx.params)
        .expect("client session");
    let mut server = server.clone().start_session(1, &fx.params);
    // ClientHello; the server's flight; the client's certificate flight.
    for _ in 0..3 {
        for piece in drain(&mut *client) {
            let read = check_allocation(
                format_args!(
                    "the server reading a handshake with a {} byte certificate",
                    leaf.len()
                ),
                der_bound(leaf.len()).max(SESSION_CACHE),
                "72 bytes per byte of certificate plus 4 KiB, or rustls's session cache",
                || server.read_handshake(&piece),
            );
            if let Err(e) = read {
                return Outcome::Refused(alert(&e));
            }
        }
        if !server.is_handshaking() {
            return Outcome::Accepted;
        }
        for piece in drain(&mut *server) {
            if let Err(e) = client.read_handshake(&piece) {
                panic!("the test client failed: {e}");
            }
        }
    }
    panic!("the handshake did not finish in three rounds");
}

/// `f`, on `len` bytes of certificate, checked against the bound above.
fn checked<T>(what: &str, len: usize, f: impl FnOnce() -> T) -> T {
    check_allocation(
        format_args!("{what} of {len} bytes"),
        der_bound(len),
        "72 bytes per byte of certificate plus 4 KiB: clientauth.rs documents no bound",
        f,
    )
}

fn alert_name(outcome: Outcome) -> String {
    match outcome {
        Outcome::Refused(Some(a)) => format!("{:?}", AlertDescription::from(a)),
        other => format!("{other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();

    let names = checked("dns_names", data.len(), || dns_names(data));
    let valid = checked("validity", data.len(), || validity(data));
    let self_issued = checked("is_self_signed", data.len(), || is_self_signed(data));
    let parsed = X509Certificate::from_der(data);
    match &parsed {
        Ok((_, cert)) => {
            let v = cert.validity();
            assert_eq!(
                valid,
                Some((v.not_before.timestamp(), v.not_after.timestamp()))
            );
            assert_eq!(self_issued, cert.issuer() == cert.subject());
        }
        Err(_) => {
            assert_eq!(valid, None);
            assert!(names.is_empty() && !self_issued);
        }
    }
    let chain = [CertificateDer::from(data)];
    assert!(!fx.any.has_ca() && fx.ca.has_ca());
    let none = checked("issued_names (no CA)", data.len(), || {
        fx.any.issued_names(&chain)
    });
    assert_eq!(none, None, "no CA, but issued names");
    let issued = checked("issued_names", data.len(), || fx.ca.issued_names(&chain));

    let Ok((rest, cert)) = parsed else {
        return;
    };
    if !rest.is_empty() {
        return;
    }
    let Some((not_before, not_after)) = valid else {
        unreachable!("parsed, so it has a validity");
    };
    let now = UnixTime::now().as_secs() as i64;
    let in_time =
        not_before.saturating_add(MARGIN) <= now && now <= not_after.saturating_sub(MARGIN);
    let out_of_time =
        now < not_before.saturating_sub(MARGIN) || now > not_after.saturating_add(MARGIN);
    let revoked = Fingerprint::of(&chain[0]).0[0] == 0;
    let ours = cert.public_key().raw == fx.client_spki.as_slice();

    for (mode, server) in &fx.servers {
        let outcome = handshake(fx, server, data);
        let said = alert_name(outcome);
        if out_of_time {
            assert_eq!(
                outcome,
                Outcome::Refused(Some(EXPIRED)),
                "{mode:?}: valid {not_before}..{not_after}, now {now}: {said}"
            );
            continue;
        }
        if !in_time {
            continue;
        }
        if revoked {
            assert_eq!(
                outcome,
                Outcome::Refused(Some(REVOKED)),
                "{mode:?}: revoked: {said}"
            );
            continue;
        }
        let accepted = outcome == Outcome::Accepted;
        assert!(
            !accepted || ours,
            "{mode:?}: accepted without the client's key"
        );
        if issued.is_some() && ours {
            assert!(
                accepted,
                "{mode:?}: issued by the CA for our key, but {said}"
            );
        }
        match mode {
            Mode::Open => assert_ne!(
                outcome,
                Outcome::Refused(Some(UNKNOWN_CA)),
                "open mode refused with unknown_ca"
            ),
            Mode::Ca => assert!(
                !accepted || issued.is_some(),
                "ca mode accepted, not issued"
            ),
            Mode::Token => assert!(
                !accepted || issued.is_some() || self_issued,
                "token mode accepted, neither issued nor self-signed"
            ),
        }
    }
});
