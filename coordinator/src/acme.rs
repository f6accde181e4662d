//! The coordinator's own certificate by ACME (`run --acme DOMAIN`).
//!
//! [`Acme`] orders a certificate for the configured names from an ACME
//! directory (Let's Encrypt by default) with the HTTP-01 challenge,
//! answered by a small TCP listener of its own ([`Acme::serve_challenges`],
//! `--acme-http`, port 80 by default; QUIC runs over UDP, so the
//! coordinator's own port cannot answer it). It uses `instant-acme` for
//! the protocol.
//!
//! Everything lives in `acme/` in the state directory: the account
//! (`account.json`), the certificate chain (`cert.pem`) and its key
//! (`key.pem`, mode 0600). A start with a certificate there that covers
//! the names and is not yet due for renewal uses it and orders nothing.
//!
//! Renewal is due when two thirds of the certificate's lifetime have
//! passed (30 days before the end of a 90-day certificate). The new
//! certificate is written to the same files and given to new handshakes
//! through the `swap` given to [`Acme::renew`] (the server's
//! `Control::reload_certificate`); sessions keep theirs. A
//! failure is logged with the ACME problem's text and retried with
//! backoff (`--acme-retry`, doubling up to an hour) while the certificate
//! in force keeps serving. With no certificate yet, the coordinator says
//! so at every attempt and does not serve: it never falls back to a
//! self-signed certificate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, ChallengeType, Identifier,
    NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::tls::CertSummary;

/// Let's Encrypt's production directory: the default of `--acme-directory`.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (`--acme-directory staging`).
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";
/// Where the HTTP-01 challenge is answered when `--acme-http` is not given.
pub const DEFAULT_CHALLENGE_ADDR: &str = "0.0.0.0:80";
/// The first wait after a failed order (`--acme-retry`); it doubles.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(10);
/// The longest wait between attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(3600);

/// What `--acme` and its companions say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    /// The names the certificate is for (the first is its subject).
    pub domains: Vec<String>,
    /// The ACME directory URL.
    pub directory: String,
    /// Contact URLs for the account (`mailto:ops@example.com`).
    pub contact: Vec<String>,
    /// CA file for the directory's own HTTPS (a private ACME server);
    /// the system's roots when `None`.
    pub directory_ca: Option<PathBuf>,
    /// Where the HTTP-01 challenge is answered (TCP).
    pub http: SocketAddr,
    /// The first wait after a failure.
    pub retry: Duration,
}

impl AcmeSettings {
    /// The directory URL for `--acme-directory TEXT`: `letsencrypt` and
    /// `staging` are shorthands, anything else must be an https URL.
    pub fn directory_url(text: &str) -> Result<String, String> {
        match text {
            "letsencrypt" | "production" => Ok(LETS_ENCRYPT.into()),
            "staging" | "letsencrypt-staging" => Ok(LETS_ENCRYPT_STAGING.into()),
            url if url.starts_with("https://") => Ok(url.into()),
            other => Err(format!(
                "the ACME directory {other:?} is not an https:// URL (or `letsencrypt`, `staging`)"
            )),
        }
    }

    /// The certificate chain and key files in `state_dir`.
    pub fn files(state_dir: &Path) -> (PathBuf, PathBuf) {
        let dir = state_dir.join("acme");
        (dir.join("cert.pem"), dir.join("key.pem"))
    }
}

/// The challenge tokens being answered: token → key authorization.
type Tokens = Arc<RwLock<HashMap<String, String>>>;

/// The account as kept in `account.json`: which directory it belongs to.
#[derive(Serialize, Deserialize)]
struct SavedAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// Obtains and renews the coordinator's certificate.
#[derive(Debug, Clone)]
pub struct Acme {
    settings: AcmeSettings,
    dir: PathBuf,
    tokens: Tokens,
}

/// A certificate kept in the state directory.
#[derive(Debug, Clone)]
struct Kept {
    summary: CertSummary,
    not_before: SystemTime,
}

impl Kept {
    /// When renewal is due: two thirds into the lifetime.
    fn renew_at(&self) -> SystemTime {
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(self.summary.not_after);
        let life = not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life * 2 / 3
    }
}

impl Acme {
    /// ACME for `settings`, keeping its files in `state_dir/acme`.
    pub fn new(settings: AcmeSettings, state_dir: &Path) -> Acme {
        Acme {
            settings,
            dir: state_dir.join("acme"),
            tokens: Tokens::default(),
        }
    }

    fn names(&self) -> String {
        self.settings.domains.join(", ")
    }

    /// Bind the challenge listener and answer
    /// `/.well-known/acme-challenge/TOKEN` there until the process ends.
    pub async fn serve_challenges(&self) -> Result<()> {
        let addr = self.settings.http;
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "cannot listen on {addr} for the ACME HTTP-01 challenge; the ACME server \
                 connects to port 80 of the names: free that port, or choose where with \
                 --acme-http"
            )
        })?;
        let app = Router::new()
            .route("/.well-known/acme-challenge/{token}", get(answer))
            .with_state(self.tokens.clone());
        info!(addr = %listener.local_addr().unwrap_or(addr), "answering ACME HTTP-01 challenges");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(cause = %e, "the ACME challenge listener failed");
            }
        });
        Ok(())
    }

    /// Make sure a usable certificate is in the state directory: the kept
    /// one when it covers the names and is not due, else a new one,
    /// ordered again and again (saying why each time) until one arrives.
    pub async fn first_certificate(&self) {
        if let Some(kept) = self.kept() {
            info!(
                names = %self.names(),
                serial = %kept.summary.serial,
                not_after = %kept.summary.not_after_text(),
                "ACME: using the certificate kept in {} (no new order)",
                self.dir.display()
            );
            return;
        }
        let mut wait = self.settings.retry;
        loop {
            match self.order().await {
                Ok(summary) => {
                    info!(
                        names = %self.names(),
                        issuer = %summary.issuer,
                        serial = %summary.serial,
                        not_after = %summary.not_after_text(),
                        "ACME: certificate issued"
                    );
                    return;
                }
                Err(e) => {
                    warn!(
                        "ACME: no certificate yet for {}, so no client is served: {e:#}; trying again in {} s",
                        self.names(),
                        wait.as_secs_f64()
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// Renew whenever due, for as long as the process runs; `swap` gives
    /// each new certificate (in the files) to new handshakes.
    pub async fn renew<F>(self, swap: F)
    where
        F: Fn() -> Result<(), String> + Send + Sync,
    {
        loop {
            let Some(kept) = self.read_kept() else {
                warn!("ACME: the kept certificate cannot be read; ordering a new one");
                self.renew_now(&swap, None).await;
                continue;
            };
            let due = kept.renew_at();
            if let Ok(left) = due.duration_since(SystemTime::now()) {
                info!(
                    serial = %kept.summary.serial,
                    "ACME: renewal due in {} s",
                    left.as_secs()
                );
                tokio::time::sleep(left).await;
            }
            self.renew_now(&swap, Some(&kept.summary)).await;
        }
    }

    /// Order until an order succeeds, then swap the certificate in.
    async fn renew_now<F>(&self, swap: &F, old: Option<&CertSummary>)
    where
        F: Fn() -> Result<(), String> + Send + Sync,
    {
        let mut wait = self.settings.retry;
        loop {
            match self.order().await {
                Ok(summary) => {
                    match swap() {
                        Ok(_) => info!(
                            names = %self.names(),
                            serial = %summary.serial,
                            not_after = %summary.not_after_text(),
                            "ACME: certificate renewed; new handshakes get it, sessions keep theirs"
                        ),
                        Err(e) => warn!(cause = %e, "ACME: the renewed certificate cannot be used"),
                    }
                    return;
                }
                Err(e) => {
                    let keeps = old.map_or_else(
                        || "no certificate is in force".to_string(),
                        |s| format!("the certificate in force (serial {}, valid until {}) keeps serving", s.serial, s.not_after_text()),
                    );
                    warn!(
                        "ACME: cannot renew the certificate for {}: {e:#}; {keeps}; trying again in {} s",
                        self.names(),
                        wait.as_secs_f64()
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_RETRY);
                }
            }
        }
    }

    /// The kept certificate when it covers the names and is not yet due.
    fn kept(&self) -> Option<Kept> {
        let kept = self.read_kept()?;
        let covers = self
            .settings
            .domains
            .iter()
            .all(|d| kept.summary.names.iter().any(|n| n.eq_ignore_ascii_case(d)));
        (covers && kept.renew_at() > SystemTime::now()).then_some(kept)
    }

    fn read_kept(&self) -> Option<Kept> {
        let (cert, key) = (self.dir.join("cert.pem"), self.dir.join("key.pem"));
        let identity = qmesh_certs::Identity::load(&cert, &key).ok()?;
        let summary = CertSummary::of(&identity)?;
        let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(summary.not_before);
        Some(Kept {
            summary,
            not_before,
        })
    }

    /// The HTTP client for the directory: its CA file's roots, or the
    /// system's.
    fn http_client(&self) -> Result<Box<dyn instant_acme::HttpClient>> {
        let mut roots = rustls::RootCertStore::empty();
        let trust = match &self.settings.directory_ca {
            Some(path) => qmesh_certs::Trust::ca_file(path)
                .with_context(|| format!("reading --acme-ca {}", path.display()))?,
            None => qmesh_certs::Trust::system()?,
        };
        let certs = match trust {
            qmesh_certs::Trust::Ca { certs, .. } | qmesh_certs::Trust::System { certs, .. } => {
                certs
            }
            qmesh_certs::Trust::Pinned(_) => Vec::new(),
        };
        for cert in certs {
            roots
                .add(cert)
                .context("a CA certificate for the ACME directory")?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let client: hyper_util::client::legacy::Client<_, BodyWrapper<Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        Ok(Box::new(client))
    }

    /// The account: the kept one for this directory, else a new one.
    async fn account(&self) -> Result<Account> {
        let path = self.dir.join("account.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(saved) = serde_json::from_str::<SavedAccount>(&text) {
                if saved.directory == self.settings.directory {
                    return Account::builder_with_http(self.http_client()?)
                        .from_credentials(saved.credentials)
                        .await
                        .with_context(|| {
                            format!("the ACME directory {}", self.settings.directory)
                        });
                }
            }
        }
        let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
        let (account, credentials) = Account::builder_with_http(self.http_client()?)
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.settings.directory.clone(),
                None,
            )
            .await
            .with_context(|| {
                format!(
                    "creating an account at the ACME directory {}",
                    self.settings.directory
                )
            })?;
        let saved = SavedAccount {
            directory: self.settings.directory.clone(),
            credentials,
        };
        write_private(&path, serde_json::to_string_pretty(&saved)?.as_bytes())?;
        info!(account = %account.id(), "ACME: account created");
        Ok(account)
    }

    /// One order, from the account to the files: the new certificate.
    async fn order(&self) -> Result<CertSummary> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        info!(names = %self.names(), directory = %self.settings.directory, "ACME: ordering a certificate");
        let account = self.account().await?;
        let result = self.order_with(&account).await;
        if let Err(e) = &result {
            // An account the server no longer knows (its database was
            // reset) is made again at the next attempt.
            if format!("{e:#}").contains("accountDoesNotExist") {
                let _ = std::fs::remove_file(self.dir.join("account.json"));
            }
        }
        result
    }

    async fn order_with(&self, account: &Account) -> Result<CertSummary> {
        let ids: Vec<Identifier> = self
            .settings
            .domains
            .iter()
            .map(|d| Identifier::Dns(d.clone()))
            .collect();
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        let mut published = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => bail!("an authorization is {other:?}"),
            }
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| anyhow!("the ACME server offers no HTTP-01 challenge for a name"))?;
            let answer = challenge.key_authorization().as_str().to_owned();
            self.tokens
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(challenge.token.clone(), answer);
            published.push(challenge.token.clone());
            challenge.set_ready().await?;
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(Duration::from_secs(90));
        let status = order.poll_ready(&retry).await;
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                self.forget(&published);
                return Err(e.into());
            }
        };
        if status != OrderStatus::Ready {
            let mut problems = Vec::new();
            let mut authorizations = order.authorizations();
            while let Some(Ok(authz)) = authorizations.next().await {
                for c in &authz.challenges {
                    if let Some(p) = &c.error {
                        problems.push(p.to_string());
                    }
                }
            }
            self.forget(&published);
            bail!(
                "the order is {status:?}: {}",
                if problems.is_empty() {
                    "the ACME server gave no reason".to_string()
                } else {
                    problems.join("; ")
                }
            );
        }
        self.forget(&published);
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(self.settings.domains.clone())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        order.finalize_csr(csr.der()).await?;
        let chain = order.poll_certificate(&retry).await?;
        let (cert_path, key_path) = (self.dir.join("cert.pem"), self.dir.join("key.pem"));
        // The key first: a chain next to an older key would not load.
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_private(&cert_path, chain.as_bytes())?;
        let identity = qmesh_certs::Identity::load(&cert_path, &key_path)
            .context("the certificate the ACME server issued")?;
        CertSummary::of(&identity).ok_or_else(|| anyhow!("the issued certificate cannot be read"))
    }

    fn forget(&self, tokens: &[String]) {
        let mut map = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        for t in tokens {
            map.remove(t);
        }
    }
}

async fn answer(
    State(tokens): State<Tokens>,
    UrlPath(token): UrlPath<String>,
) -> Result<String, StatusCode> {
    tokens
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&token)
        .cloned()
        .ok_or(StatusCode::NOT_FOUND)
}

/// Write `data` to `path` through a temporary file and a rename, mode 0600.
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(data)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_shorthands_and_urls() {
        assert_eq!(
            AcmeSettings::directory_url("staging").as_deref(),
            Ok(LETS_ENCRYPT_STAGING)
        );
        assert_eq!(
            AcmeSettings::directory_url("letsencrypt").as_deref(),
            Ok(LETS_ENCRYPT)
        );
        assert_eq!(
            AcmeSettings::directory_url("https://127.0.0.1:14000/dir").as_deref(),
            Ok("https://127.0.0.1:14000/dir")
        );
        assert!(AcmeSettings::directory_url("http://plain.example/dir").is_err());
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let kept = Kept {
            summary: CertSummary {
                names: vec!["coord.test".into()],
                issuer: "CN=test".into(),
                serial: "01".into(),
                fingerprint: String::new(),
                not_before: 1_000_000,
                not_after: 1_000_000 + 90 * 86_400,
            },
            not_before: start,
        };
        assert_eq!(kept.renew_at(), start + Duration::from_secs(60 * 86_400));
    }
}
