//! Token enrollment and certificate renewal (`token` auth mode).
//!
//! [`enroll`] connects with the configured identity's key, presents a
//! one-use token, and gets back a certificate for that same key signed by
//! the coordinator's client CA: the private key never leaves the client.
//! Without a token it renews: the connection must present a certificate
//! the coordinator issued, and the new one is for the same name and key.
//! [`renew_at`] says when a certificate is due for renewal (two thirds of
//! its lifetime).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qmesh_certs::Identity;
use qmesh_proto::codec::{read_frame, write_frame};
use qmesh_proto::msg::{Enroll, EnrollAnswer, Greeting, Reject};
use qmesh_proto::PROTOCOL_VERSION;
use tokio::time::timeout;

use crate::config::ClientConfig;
use crate::connect::{bind_for, connect_failure, resolve, server_name};
use crate::error::ConnectError;

/// A certificate the coordinator issued.
#[derive(Debug)]
pub struct Enrolled {
    /// The issued certificate with the key it was issued for.
    pub identity: Identity,
    /// When it expires.
    pub expires: SystemTime,
}

/// Enroll with `token`, or renew when `token` is `None`, presenting
/// `config`'s identity (its key goes with the issued certificate).
pub async fn enroll(config: &ClientConfig, token: Option<&str>) -> Result<Enrolled, ConnectError> {
    let coord_text = config.coordinator.to_string();
    let secs = config.connect_timeout.as_secs();
    match timeout(config.connect_timeout, enroll_inner(config, token)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout {
            addr: coord_text,
            secs,
        }),
    }
}

async fn enroll_inner(
    config: &ClientConfig,
    token: Option<&str>,
) -> Result<Enrolled, ConnectError> {
    let (host, port) = config.coordinator.quic_endpoint()?;
    let addr = resolve(host, port, &config.resolve).await?;
    let coord_text = config.coordinator.to_string();
    let (client_config, report) = config.quic()?;
    let identity = config.identity()?;
    let endpoint =
        qmesh_certs::transport::client_endpoint(bind_for(addr)).map_err(ConnectError::Socket)?;
    let conn = endpoint
        .connect_with(client_config, addr, &server_name(host))
        .map_err(|e| ConnectError::Handshake {
            addr: coord_text.clone(),
            reason: e.to_string(),
        })?
        .await
        .map_err(|e| connect_failure(e, &report, &coord_text))?;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        let msg = Greeting::Enroll(Enroll {
            version: PROTOCOL_VERSION,
            name: config.name.clone().into(),
            token: token.map(str::to_owned),
        });
        write_frame(&mut send, &msg).await.ok()?;
        read_frame::<EnrollAnswer, _>(&mut recv).await.ok()?
    }
    .await;
    let result = match exchange {
        Some(EnrollAnswer::Enrolled { cert_pem, expires }) => {
            let issued = Identity::from_pem(&cert_pem, &identity.key_pem()).map_err(|e| {
                ConnectError::Session(format!("the issued certificate is not usable: {e}"))
            })?;
            Ok(Enrolled {
                identity: issued,
                expires: UNIX_EPOCH + Duration::from_secs(expires),
            })
        }
        Some(EnrollAnswer::Reject(Reject { code, message })) => {
            Err(ConnectError::Rejected { code, message })
        }
        None => {
            let closed = timeout(Duration::from_secs(1), conn.closed()).await;
            Err(match closed {
                Ok(c) => connect_failure(c, &report, &coord_text),
                Err(_) => {
                    ConnectError::Session("the coordinator did not answer the enrollment".into())
                }
            })
        }
    };
    conn.close(0u32.into(), b"enrollment done");
    endpoint.wait_idle().await;
    result
}

/// When `identity`'s certificate is due for renewal: two thirds into its
/// lifetime. `None` when the certificate does not parse.
pub fn renew_at(identity: &Identity) -> Option<SystemTime> {
    let (not_before, not_after) = qmesh_certs::clientauth::validity(identity.chain.first()?)?;
    let life = (not_after - not_before).max(0) as u64;
    Some(UNIX_EPOCH + Duration::from_secs(not_before.max(0) as u64 + life * 2 / 3))
}

/// When `identity`'s certificate expires; `None` when it does not parse.
pub fn expires_at(identity: &Identity) -> Option<SystemTime> {
    let (_, not_after) = qmesh_certs::clientauth::validity(identity.chain.first()?)?;
    Some(UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64))
}

/// Whether `identity`'s certificate was issued by a CA (not self-signed).
pub fn is_issued(identity: &Identity) -> bool {
    identity
        .chain
        .first()
        .is_some_and(|c| !qmesh_certs::clientauth::is_self_signed(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qmesh_certs::Ca;

    /// `identity` carrying a certificate `ca` issued for `ttl` just now.
    fn issued(ca: &Ca, ttl: Duration) -> Identity {
        let own = Identity::self_signed("alice").unwrap();
        let issued = ca.issue_client_for(&own.chain[0], "alice", ttl).unwrap();
        Identity {
            chain: vec![issued.cert],
            key: own.key,
        }
    }

    /// Seconds from now to `at` (negative when past).
    fn from_now(at: SystemTime) -> i64 {
        match at.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    }

    #[test]
    fn a_new_certificate_is_due_about_two_thirds_into_its_ttl() {
        let ca = Ca::generate("clients").unwrap();
        // (ttl, earliest and latest due time from now, in seconds): the
        // backdate moves renewal a little earlier than 2/3 of the ttl, never
        // to now. A 30 s certificate backdated by 5 minutes would be due
        // at once and renewed in a loop.
        for (ttl, earliest, latest) in [(30, 15, 20), (3600, 2290, 2400), (86_400, 57_400, 57_600)]
        {
            let id = issued(&ca, Duration::from_secs(ttl));
            let due = from_now(renew_at(&id).unwrap());
            assert!(
                (earliest..=latest).contains(&due),
                "a {ttl} s certificate is due in {due} s"
            );
            let expires = from_now(expires_at(&id).unwrap());
            assert!(due < expires, "{ttl}: due {due}, expires {expires}");
            assert!(is_issued(&id));
        }
    }

    #[test]
    fn a_self_signed_identity_is_not_issued() {
        assert!(!is_issued(&Identity::self_signed("alice").unwrap()));
    }
}
