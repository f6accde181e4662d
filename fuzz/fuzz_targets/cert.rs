//! What the certificate code parses from outside.
//!
//! - The raw input as DER, with `X509Certificate::from_der`, the parser the
//!   coordinator's client certificate check (certs/src/peer.rs) runs on the
//!   certificate a client presents, followed by what that check and the CA
//!   loader read from it (validity, basic constraints, names, key).
//! - The input as text (when it is UTF-8): `certs_from_pem`, then each
//!   certificate found as DER as above; `Identity::from_pem` and
//!   `Ca::from_pem` with the text as both the certificate and the key PEM (a
//!   file holding both is how the seeds give a matching pair);
//!   `str::parse::<Fingerprint>`, whose display must parse back to the same
//!   fingerprint.
//!
//! None of it may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmesh_certs::{certs_from_pem, Ca, Fingerprint, Identity};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

fn der(bytes: &[u8]) {
    let Ok((rest, cert)) = X509Certificate::from_der(bytes) else {
        return;
    };
    let _ = rest.is_empty();
    // The client certificate check.
    let validity = cert.validity();
    let _ = validity.not_before.timestamp() <= validity.not_after.timestamp();
    // What the CA loader and identity loader read.
    let _ = cert.basic_constraints();
    let _ = cert.is_ca();
    let _ = cert.public_key().raw.len();
    let _ = cert.subject().as_raw().len();
    let _ = cert.issuer().as_raw().len();
    let _ = cert.subject().to_string();
    let _ = cert.issuer().to_string();
    for ext in cert.extensions() {
        let _ = ext.parsed_extension();
    }
    let _ = cert.subject_alternative_name();
    let _ = cert.extended_key_usage();
    let _ = cert.key_usage();
    let _ = Fingerprint::of(&bytes.to_vec().into());
}

fuzz_target!(|data: &[u8]| {
    der(data);

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(certs) = certs_from_pem(text) {
        assert!(!certs.is_empty(), "certs_from_pem returned Ok with no certificate");
        for cert in &certs {
            der(cert.as_ref());
        }
    }
    if let Ok(identity) = Identity::from_pem(text, text) {
        assert!(!identity.chain.is_empty());
        let _ = identity.fingerprint();
    }
    if let Ok(ca) = Ca::from_pem(text, text) {
        let _ = ca.fingerprint();
    }
    if let Ok(fp) = text.parse::<Fingerprint>() {
        let shown = fp.to_string();
        assert_eq!(
            shown.parse::<Fingerprint>().ok(),
            Some(fp),
            "fingerprint {text:?} displays as {shown:?}, which does not parse back"
        );
    }
});
