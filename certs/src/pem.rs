//! PEM text and files: reading certificates and keys, writing them back.

use std::fs;
use std::io::Write;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// Reads all `CERTIFICATE` blocks of a PEM file, in file order.
///
/// Other blocks (keys, parameters) are skipped. A file without any
/// certificate is an error ([`CertError::NoCertificates`]).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let text = read_text(path)?;
    certs_from(&text, &path.display().to_string())
}

/// Parses all `CERTIFICATE` blocks of PEM text, in order.
///
/// Other blocks are skipped. Text without any certificate is an error
/// ([`CertError::NoCertificates`]).
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    certs_from(pem, "the given PEM text")
}

/// [`certs_from_pem`] with a description of where the text came from, for
/// error messages.
pub(crate) fn certs_from(
    pem: &str,
    origin: &str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            what: format!("cannot read the certificates in {origin}: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificates {
            origin: origin.to_owned(),
        });
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, SEC1 or PKCS#1) of PEM text.
pub(crate) fn key_from(pem: &str, origin: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    use rustls_pki_types::pem::Error;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        Error::NoItemsFound => CertError::NoPrivateKey {
            origin: origin.to_owned(),
        },
        e => CertError::Pem {
            what: format!("cannot read the private key in {origin}: {e}"),
        },
    })
}

/// Encodes DER bytes as one PEM block with the given label.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    let body = base64(der);
    let mut out = String::with_capacity(body.len() + body.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in body.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// The PEM block label of a private key's encoding.
pub(crate) fn key_label(key: &PrivateKeyDer<'_>) -> &'static str {
    match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    }
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Reads a whole text file.
pub(crate) fn read_text(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a public file (certificates), replacing any previous content.
pub(crate) fn write_public(path: &Path, text: &str) -> Result<(), CertError> {
    fs::write(path, text).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a private key file, readable and writable by its owner only
/// (mode 0600 on unix), replacing any previous content.
///
/// The mode is set before any key material is written, also when the file
/// already existed with wider permissions.
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in cases {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let ders: Vec<Vec<u8>> = vec![(0..=255).collect(), vec![1, 2, 3], (0..100).collect()];
        let text: String = ders.iter().map(|d| encode("CERTIFICATE", d)).collect();
        assert!(text.lines().all(|l| l.len() <= 64));
        let parsed = certs_from_pem(&text).unwrap();
        let parsed: Vec<Vec<u8>> = parsed.iter().map(|c| c.to_vec()).collect();
        assert_eq!(parsed, ders);
    }

    #[test]
    fn no_certificates_is_an_error() {
        let key_only = encode("PRIVATE KEY", &[1, 2, 3]);
        let err = certs_from_pem(&key_only).unwrap_err();
        assert!(matches!(err, CertError::NoCertificates { .. }), "{err}");
        assert!(err.to_string().contains("BEGIN CERTIFICATE"));
        let err = certs_from_pem("").unwrap_err();
        assert!(matches!(err, CertError::NoCertificates { .. }), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.pem");
        let err = load_certs(&path).unwrap_err();
        assert!(matches!(err, CertError::Io { .. }));
        assert!(err.to_string().contains("nope.pem"), "{err}");
    }

    #[test]
    fn missing_key_is_an_error() {
        let err = key_from(&encode("CERTIFICATE", &[1]), "key.pem").unwrap_err();
        assert!(matches!(err, CertError::NoPrivateKey { .. }), "{err}");
        assert!(err.to_string().contains("key.pem"));
    }
}
