//! Certificate files: the development CA a coordinator makes for itself,
//! and the files `qmesh-coordinator certs` writes.

use std::path::{Path, PathBuf};

use qmesh_certs::{Ca, CertError, Identity};

/// File name of the CA certificate clients need.
pub const CA_FILE: &str = "ca.pem";
/// File name of the CA key (keep it off the coordinator in production).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the coordinator certificate.
pub const CERT_FILE: &str = "coordinator.pem";
/// File name of the coordinator key.
pub const KEY_FILE: &str = "coordinator-key.pem";

/// The host names a development certificate is valid for.
pub fn dev_hosts() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

/// A coordinator identity together with the CA file clients must trust.
#[derive(Debug)]
pub struct CertFiles {
    /// Path of the CA certificate to hand to clients.
    pub ca_path: PathBuf,
    /// The coordinator's certificate and key.
    pub identity: Identity,
    /// Whether the files were created now (rather than reused).
    pub created: bool,
}

/// Write a new CA and a coordinator certificate for `hosts` into `dir`.
/// Refuses to overwrite existing files unless `force`.
pub fn write_certs(dir: &Path, hosts: &[String], force: bool) -> Result<CertFiles, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    if !force {
        for f in [CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE] {
            let p = dir.join(f);
            if p.exists() {
                return Err(CertError::Io {
                    path: p,
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "file exists; pass --force to replace it or choose another --out",
                    ),
                });
            }
        }
    }
    let ca = Ca::generate("qmesh CA")?;
    let identity = ca.issue_server(hosts)?;
    ca.save(&dir.join(CA_FILE), &dir.join(CA_KEY_FILE))?;
    identity.save(&dir.join(CERT_FILE), &dir.join(KEY_FILE))?;
    Ok(CertFiles {
        ca_path: dir.join(CA_FILE),
        identity,
        created: true,
    })
}

/// Load the development certificate from `state_dir`, creating a CA and a
/// certificate for [`dev_hosts`] on first use.
///
/// An existing CA is never replaced: clients may already trust it. If the
/// coordinator certificate is missing but the CA and its key are there, a
/// new certificate is issued from that CA. Any other partial state is an
/// error that says which files are missing.
pub fn dev_identity(state_dir: &Path) -> Result<CertFiles, CertError> {
    let path = |f: &str| state_dir.join(f);
    let have = |f: &str| path(f).exists();
    let ca_path = path(CA_FILE);
    if have(CERT_FILE) && have(KEY_FILE) && have(CA_FILE) {
        return Ok(CertFiles {
            ca_path,
            identity: Identity::load(&path(CERT_FILE), &path(KEY_FILE))?,
            created: false,
        });
    }
    if have(CA_FILE) && have(CA_KEY_FILE) {
        let ca = Ca::load(&ca_path, &path(CA_KEY_FILE))?;
        let identity = ca.issue_server(&dev_hosts())?;
        identity.save(&path(CERT_FILE), &path(KEY_FILE))?;
        return Ok(CertFiles {
            ca_path,
            identity,
            created: true,
        });
    }
    let present: Vec<&str> = [CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE]
        .into_iter()
        .filter(|f| have(f))
        .collect();
    if present.is_empty() {
        return write_certs(state_dir, &dev_hosts(), false);
    }
    Err(CertError::Io {
        path: state_dir.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "the state directory holds only {}; restore the missing certificate files \
                 or remove the directory to make a new CA (clients must then get the new ca.pem)",
                present.join(", ")
            ),
        ),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dev_identity_is_created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = dev_identity(dir.path()).unwrap();
        assert!(first.created);
        let second = dev_identity(dir.path()).unwrap();
        assert!(!second.created);
        assert_eq!(first.identity.fingerprint(), second.identity.fingerprint());
        assert_eq!(first.ca_path, second.ca_path);
    }

    #[test]
    fn a_missing_coordinator_certificate_is_reissued_from_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = dev_identity(dir.path()).unwrap();
        let ca_pem = std::fs::read(&first.ca_path).unwrap();
        std::fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let second = dev_identity(dir.path()).unwrap();
        assert_eq!(std::fs::read(&second.ca_path).unwrap(), ca_pem);
        assert_ne!(first.identity.fingerprint(), second.identity.fingerprint());
    }

    #[test]
    fn a_partial_state_directory_is_an_error_not_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        dev_identity(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        std::fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let err = dev_identity(dir.path()).unwrap_err();
        assert!(err.to_string().contains("remove the directory"), "{err}");
    }

    #[test]
    fn write_certs_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        write_certs(dir.path(), &["example.org".into()], false).unwrap();
        let err = write_certs(dir.path(), &["example.org".into()], false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
    }
}
