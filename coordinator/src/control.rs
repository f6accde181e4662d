//! Operator actions on a running coordinator: revocation, policy reload
//! and the list of connected clients, as [`Control`]. The admin socket and
//! the SIGHUP handler use it; so can a program embedding the coordinator.

use std::sync::Arc;

use qmesh_certs::Fingerprint;
use tracing::{info, warn};

use crate::policy::Policy;
use crate::session::{Session, Shared, Stats};

/// What `revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Certificates newly added to the revocation list.
    pub certificates: usize,
    /// Whether a connected session was closed.
    pub disconnected: bool,
}

/// Operator actions on a running coordinator: revocation and policy
/// reload. The admin socket and the SIGHUP handler use it; so can a
/// program embedding the coordinator.
#[derive(Debug, Clone)]
pub struct Control(pub(crate) Arc<Shared>);

impl Control {
    /// Revoke every certificate `name` holds (its session's, and in `token`
    /// mode every unexpired one issued for it) and close its session with
    /// `ConnCode::Revoked`.
    pub fn revoke(&self, name: &str) -> Revoked {
        let auth = &self.0.config.auth;
        let session = self.0.registry().lookup(name).cloned();
        let mut fps = auth.issued_for(name);
        fps.extend(session.as_ref().map(|s| s.fingerprint));
        let certificates = fps
            .into_iter()
            .filter(|fp| auth.revocations().add(*fp, name))
            .count();
        let disconnected = session.is_some_and(|s| s.close_revoked()) | self.close_all_revoked();
        info!(name, certificates, disconnected, "revoked");
        Revoked {
            certificates,
            disconnected,
        }
    }

    /// Revoke one certificate by fingerprint and close the session that
    /// holds it, if any.
    pub fn revoke_fingerprint(&self, fp: Fingerprint) -> Revoked {
        let holder = self
            .0
            .registry()
            .iter()
            .find(|s| s.fingerprint == fp)
            .cloned();
        let name = holder
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_else(|| "-".into());
        let certificates = usize::from(self.0.config.auth.revocations().add(fp, &name));
        let disconnected = holder.is_some_and(|s| s.close_revoked()) | self.close_all_revoked();
        info!(fingerprint = %fp, certificates, disconnected, "revoked");
        Revoked {
            certificates,
            disconnected,
        }
    }

    /// Close every session whose certificate is revoked (one certificate
    /// may hold several names); returns whether any was.
    fn close_all_revoked(&self) -> bool {
        let revoked: Vec<Arc<Session>> = self
            .0
            .registry()
            .iter()
            .filter(|s| self.0.config.auth.revocations().contains(&s.fingerprint))
            .cloned()
            .collect();
        revoked.iter().fold(false, |any, s| s.close_revoked() | any)
    }

    /// Put `policy` in force for opens from now on.
    pub fn set_policy(&self, policy: Policy) {
        *self.0.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.0.policy()
    }

    /// Re-read the policy from the config file after checking it; on any
    /// error the policy in force stays and every error is returned.
    pub fn reload_policy(&self) -> Result<String, Vec<String>> {
        let Some(path) = &self.0.config.config_file else {
            let what = "this coordinator was started without --config, so there is no policy file to reload";
            warn!("policy reload refused: {what}");
            return Err(vec![what.into()]);
        };
        match crate::file::check_file(path) {
            Ok(checked) => {
                let rules = checked.policy.as_ref().map(|p| p.len());
                self.set_policy(checked.policy.unwrap_or_else(Policy::allow_all));
                let what = match rules {
                    Some(n) => format!(
                        "policy reloaded from {}: {n} rules in force",
                        path.display()
                    ),
                    None => format!(
                        "policy reloaded from {}: no [policy] table, everything is allowed",
                        path.display()
                    ),
                };
                info!("{what}");
                Ok(what)
            }
            Err(errors) => {
                for e in &errors {
                    warn!(file = %path.display(), error = %e, "policy reload refused; the old policy stays");
                }
                Err(errors)
            }
        }
    }

    /// The coordinator's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.0.stats.clone()
    }

    /// Names of the connected clients, sorted.
    pub fn clients(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .0
            .registry()
            .iter()
            .map(|s| s.name.clone().into_string())
            .collect();
        names.sort();
        names
    }
}
