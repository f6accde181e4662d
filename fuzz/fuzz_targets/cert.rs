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
//!
//! Allocation bound, around each call above (DER parse and reads, and each
//! text parser): no single allocation larger than 72 bytes per byte of
//! input plus 4 KiB (`qmesh_fuzz::der_bound`). The certificate code
//! documents no bound for parsing (`MAX_PEM_FILE` only caps the files it
//! reads), so the bound is linear: x509-parser keeps one value per element
//! of a list, and the costliest per byte is a 72-byte `GeneralName` for 2
//! bytes of DER, in a `Vec` up to twice as large as needed. x509-parser
//! builds its OID registry (20 KiB) the first time it names an attribute;
//! the target does that once before fuzzing, as it is not a cost of the
//! input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmesh_certs::{certs_from_pem, Ca, Fingerprint, Identity};
use qmesh_fuzz::{check_allocation, der_bound};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// A certificate from the corpus, read once before fuzzing.
const WARM_UP: &[u8] = include_bytes!("../corpus/cert/ca-cert.der");

/// `f`, on `len` bytes of input, checked against the bound above.
fn checked<T>(what: &str, len: usize, f: impl FnOnce() -> T) -> T {
    check_allocation(
        format_args!("{what} of {len} bytes"),
        der_bound(len),
        "72 bytes per byte plus 4 KiB: the certificate code documents no bound for parsing",
        f,
    )
}

fn der(bytes: &[u8]) {
    checked(
        "X509Certificate::from_der and its reads",
        bytes.len(),
        || read_der(bytes),
    )
}

fn read_der(bytes: &[u8]) {
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

fuzz_target!(init: read_der(WARM_UP), |data: &[u8]| {
    der(data);

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(certs) = checked("certs_from_pem", text.len(), || certs_from_pem(text)) {
        assert!(
            !certs.is_empty(),
            "certs_from_pem returned Ok with no certificate"
        );
        for cert in &certs {
            der(cert.as_ref());
        }
    }
    if let Ok(identity) = checked("Identity::from_pem", text.len(), || {
        Identity::from_pem(text, text)
    }) {
        assert!(!identity.chain.is_empty());
        let _ = identity.fingerprint();
    }
    if let Ok(ca) = checked("Ca::from_pem", text.len(), || Ca::from_pem(text, text)) {
        let _ = ca.fingerprint();
    }
    if let Ok(fp) = checked("str::parse::<Fingerprint>", text.len(), || {
        text.parse::<Fingerprint>()
    }) {
        let shown = fp.to_string();
        assert_eq!(
            shown.parse::<Fingerprint>().ok(),
            Some(fp),
            "fingerprint {text:?} displays as {shown:?}, which does not parse back"
        );
    }
});
