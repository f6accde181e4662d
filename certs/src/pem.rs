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

/// Encodes DER bytes as one PEM block with the given label: 64-column
/// base64 lines and `\n` line endings on every platform, so that files
/// written here are byte-for-byte the same everywhere.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    let config = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ::pem::encode_config(&::pem::Pem::new(label, der), config)
}

/// The PEM block label of a private key's encoding.
pub(crate) fn key_label(key: &PrivateKeyDer<'_>) -> &'static str {
    match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    }
}

/// Reads a whole text file.
/// Largest PEM file read: far more than any certificate chain or key.
const MAX_PEM_FILE: u64 = 1024 * 1024;

/// Reads a PEM file of at most 1 MiB (a path to `/dev/zero` or a huge file
/// is refused, not read until memory runs out).
pub(crate) fn read_text(path: &Path) -> Result<String, CertError> {
    use std::io::Read;
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_PEM_FILE {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_PEM_FILE} bytes; is this a PEM file?"),
        )));
    }
    Ok(text)
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
    fn encode_then_parse_round_trips() {
        let ders: Vec<Vec<u8>> = vec![(0..=255).collect(), vec![1, 2, 3], (0..100).collect()];
        let text: String = ders.iter().map(|d| encode("CERTIFICATE", d)).collect();
        assert!(text.lines().all(|l| l.len() <= 64));
        assert!(!text.contains('\r'));
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(text.ends_with("-----END CERTIFICATE-----\n"));
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
    fn garbage_pem_is_a_clear_error() {
        // Not PEM at all.
        let err = certs_from("hello, world\n", "garbage.pem").unwrap_err();
        assert!(matches!(err, CertError::NoCertificates { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");

        // A certificate block whose body is not base64.
        let bad = "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n";
        let err = certs_from(bad, "bad.pem").unwrap_err();
        assert!(matches!(err, CertError::Pem { .. }), "{err}");
        assert!(err.to_string().contains("bad.pem"), "{err}");

        // A block that is never closed.
        let open = "-----BEGIN CERTIFICATE-----\nAQID\n";
        let err = certs_from(open, "open.pem").unwrap_err();
        assert!(matches!(err, CertError::Pem { .. }), "{err}");

        // A private key block whose body is not base64.
        let bad_key = "-----BEGIN PRIVATE KEY-----\n####\n-----END PRIVATE KEY-----\n";
        let err = key_from(bad_key, "key.pem").unwrap_err();
        assert!(matches!(err, CertError::Pem { .. }), "{err}");
        assert!(err.to_string().contains("key.pem"), "{err}");
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
