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
pub fn dev_identity(state_dir: &Path) -> Result<CertFiles, CertError> {
    let cert = state_dir.join(CERT_FILE);
    let key = state_dir.join(KEY_FILE);
    let ca_path = state_dir.join(CA_FILE);
    if cert.exists() && key.exists() && ca_path.exists() {
        return Ok(CertFiles {
            ca_path,
            identity: Identity::load(&cert, &key)?,
            created: false,
        });
    }
    write_certs(state_dir, &dev_hosts(), true)
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
    fn write_certs_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        write_certs(dir.path(), &["example.org".into()], false).unwrap();
        let err = write_certs(dir.path(), &["example.org".into()], false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
    }
}
