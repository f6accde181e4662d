//! The settings of `qmesh-coordinator run`: command-line flags, the config
//! file and defaults merged into one [`Settings`].
//!
//! [`resolve`] is a plain function: a flag beats the file, the file beats
//! the default. Paths in the file are relative to the file's directory
//! (the file module makes them so); paths in flags are relative to the
//! working directory. [`Settings::load`] then does the I/O: it loads or
//! makes the certificate and sets up the auth mode's state.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use qmesh_certs::Identity;
use qmesh_proto::address::AddressError;
use qmesh_proto::Address;

use crate::auth::{Auth, AuthMode, DEFAULT_CERT_TTL};
use crate::config::{Config, GroupConfig};
use crate::file::Checked;
use crate::policy::Policy;

/// Where the coordinator listens when neither a flag nor the file says
/// (`token` and `ca` modes).
pub const DEFAULT_LISTEN: &str = "quic/*4:7447";

/// Where an `open` coordinator listens when neither a flag nor the file
/// says: loopback only, since it admits anyone.
pub const DEFAULT_LISTEN_OPEN: &str = "quic/$4:7447";

/// How long a silent client keeps its session when neither a flag nor
/// the file says.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The flags of `qmesh-coordinator run` that a setting can come from;
/// `None` leaves the setting to the file or the default.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--config`: the TOML file.
    pub config: Option<PathBuf>,
    /// `--listen`: a connpipe address.
    pub listen: Option<String>,
    /// `--cert`: the coordinator certificate (PEM).
    pub cert: Option<PathBuf>,
    /// `--key`: its private key (PEM).
    pub key: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--auth`.
    pub auth: Option<AuthMode>,
    /// `--client-ca`: ca mode's CA file.
    pub client_ca: Option<PathBuf>,
    /// `--cert-ttl`: token mode's certificate lifetime.
    pub cert_ttl: Option<Duration>,
    /// `--idle-timeout`.
    pub idle_timeout: Option<Duration>,
    /// `--drain`: how long live channels may run after SIGTERM.
    pub drain: Option<Duration>,
    /// `--max-clients`.
    pub max_clients: Option<usize>,
    /// `--max-channels-per-client`.
    pub max_channels_per_client: Option<usize>,
    /// `--bytes-per-second` (0: unlimited).
    pub bytes_per_second: Option<u64>,
    /// `--messages-per-second` (0: unlimited).
    pub messages_per_second: Option<u64>,
    /// `--http`: where to serve `/metrics` and the status page.
    pub http: Option<SocketAddr>,
    /// `--http-token-file`: the bearer token the HTTP listener requires.
    pub http_token_file: Option<PathBuf>,
    /// `--acme`: names to get a certificate for by ACME.
    pub acme: Vec<String>,
    /// `--acme-directory`.
    pub acme_directory: Option<String>,
    /// `--acme-contact`.
    pub acme_contact: Vec<String>,
    /// `--acme-ca`: CA file for the ACME directory's HTTPS.
    pub acme_ca: Option<PathBuf>,
    /// `--acme-http`: where to answer the HTTP-01 challenge.
    pub acme_http: Option<SocketAddr>,
    /// `--acme-retry`: the first wait after a failed order.
    pub acme_retry: Option<Duration>,
}

/// Where the coordinator's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// A certificate and key file.
    Files {
        /// The certificate chain (PEM).
        cert: PathBuf,
        /// The private key (PEM).
        key: PathBuf,
    },
    /// A development certificate made (or reused) in the state directory.
    Development,
    /// A certificate obtained and renewed by ACME, kept in the state
    /// directory's `acme/`.
    Acme(crate::acme::AcmeSettings),
}

impl CertSource {
    /// The certificate and key files to read for this source, `None` for
    /// the development certificate.
    pub fn files(&self, state_dir: &Path) -> Option<(PathBuf, PathBuf)> {
        match self {
            CertSource::Files { cert, key } => Some((cert.clone(), key.clone())),
            CertSource::Acme(_) => Some(crate::acme::AcmeSettings::files(state_dir)),
            CertSource::Development => None,
        }
    }
}

/// The auth mode with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthChoice {
    /// Any certificate, any free name (development only).
    Open,
    /// Certificates from a client CA.
    Ca {
        /// The CA file client certificates must chain to.
        client_ca: PathBuf,
    },
    /// Enrollment tokens; certificates issued by the coordinator.
    Token {
        /// Lifetime of an issued certificate.
        cert_ttl: Duration,
    },
}

impl AuthChoice {
    /// The mode.
    pub fn mode(&self) -> AuthMode {
        match self {
            AuthChoice::Open => AuthMode::Open,
            AuthChoice::Ca { .. } => AuthMode::Ca,
            AuthChoice::Token { .. } => AuthMode::Token,
        }
    }
}

/// What a running coordinator was made from.
#[derive(Debug, Clone)]
pub struct Source {
    /// The command line's flags (they win over the file).
    pub flags: Flags,
    /// The settings resolved at start.
    pub settings: Settings,
    /// Whether `--log` (or `RUST_LOG`) chose the log filter, which the
    /// file's `log` then does not replace.
    pub log_fixed: bool,
}

/// Every setting chosen; nothing loaded yet. A limit left `None` keeps
/// [`Config::new`]'s default.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The coordinator's certificate.
    pub cert: CertSource,
    /// Who may join.
    pub auth: AuthChoice,
    /// The config file, for policy reloads.
    pub config_file: Option<PathBuf>,
    /// The file's access policy, if it has one.
    pub policy: Option<Policy>,
    /// The file's broadcast groups.
    pub groups: HashMap<String, GroupConfig>,
    /// Most clients at once (`None`: no limit).
    pub max_clients: Option<usize>,
    /// Most channels per client (at least 1).
    pub max_channels_per_client: Option<usize>,
    /// Most data streams in flight per channel side (at least 1).
    pub max_streams_per_channel: Option<usize>,
    /// Largest relayed message (at least 1).
    pub max_message: Option<u64>,
    /// Most connections before their hello (at least 2).
    pub max_pending: Option<usize>,
    /// Most connections before their hello from one source (at least 1).
    pub max_pending_per_source: Option<usize>,
    /// Relayed bytes per second per client (0: unlimited).
    pub bytes_per_second: Option<u64>,
    /// Relayed messages per second per client (0: unlimited).
    pub messages_per_second: Option<u64>,
    /// The rate limits' burst.
    pub burst: Option<Duration>,
    /// How long over the rate before a client is closed.
    pub flood_after: Option<Duration>,
    /// How long a connection has for its hello.
    pub hello_timeout: Option<Duration>,
    /// How long a silent client keeps its session (at least 1 s).
    pub idle_timeout: Duration,
    /// How long live channels may run once a stop is asked for.
    pub drain: Option<Duration>,
    /// The HTTP listener, if any.
    pub http: Option<HttpChoice>,
}

/// The HTTP listener of `--http`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpChoice {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The file holding the bearer token; `None` only on loopback.
    pub token_file: Option<PathBuf>,
}

/// The settings cannot be resolved.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The config file has errors (every one is listed).
    #[error("{} error(s):\n  {}", .0.len(), .0.join("\n  "))]
    File(Vec<String>),
    /// `--listen` (or `listen` in the file) is not an address.
    #[error("parsing --listen")]
    Listen(#[source] AddressError),
    /// The listen address is not a QUIC address.
    #[error("--listen must be a quic/ address")]
    NotQuic(#[source] AddressError),
    /// The listen host could not be looked up.
    #[error("cannot look up the --listen host {host}")]
    Lookup {
        /// The host name.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The listen host has no address.
    #[error("--listen host {0} does not resolve")]
    NoAddress(String),
    /// `--http` off loopback without a token.
    #[error(
        "--http {0} is not a loopback address, so the HTTP listener needs a bearer token: give \
         --http-token-file FILE (or http_token_file in the config file), a file holding a long \
         random token that scrapers send as `Authorization: Bearer TOKEN`; or listen on \
         127.0.0.1 and reach it through an SSH tunnel"
    )]
    HttpNeedsToken(SocketAddr),
    /// ACME and certificate files both given.
    #[error(
        "--acme and --cert/--key both say where the certificate comes from: give one (--acme \
         gets and renews it; --cert/--key read files another program renews)"
    )]
    AcmeAndFiles,
    /// An ACME setting is wrong.
    #[error("{0}")]
    Acme(String),
    /// A token file without `--http`.
    #[error("--http-token-file is for the HTTP listener, which only runs with --http ADDR")]
    TokenWithoutHttp,
    /// `ca` mode without a client CA.
    #[error(
        "--auth ca needs --client-ca FILE (or [auth] client_ca): the CA client certificates \
         must chain to"
    )]
    NoClientCa,
}

/// The ACME settings from the flags over the file's `[acme]`, when
/// either names a domain.
fn acme_settings(
    flags: &Flags,
    file: Option<&Checked>,
) -> Result<Option<crate::acme::AcmeSettings>, SettingsError> {
    use crate::acme::{AcmeSettings, DEFAULT_CHALLENGE_ADDR, DEFAULT_RETRY, LETS_ENCRYPT};
    let section = file.and_then(|c| c.file.acme.clone()).unwrap_or_default();
    let domains = if flags.acme.is_empty() {
        section.domains.clone()
    } else {
        flags.acme.clone()
    };
    if domains.is_empty() {
        return Ok(None);
    }
    let directory = match flags.acme_directory.clone().or(section.directory.clone()) {
        Some(text) => AcmeSettings::directory_url(&text).map_err(SettingsError::Acme)?,
        None => LETS_ENCRYPT.into(),
    };
    let http = match flags.acme_http {
        Some(addr) => addr,
        None => section
            .http
            .as_deref()
            .unwrap_or(DEFAULT_CHALLENGE_ADDR)
            .parse()
            .map_err(|_| SettingsError::Acme("[acme] http is not an address".into()))?,
    };
    Ok(Some(AcmeSettings {
        domains,
        directory,
        contact: if flags.acme_contact.is_empty() {
            section.contact.clone()
        } else {
            flags.acme_contact.clone()
        },
        directory_ca: flags.acme_ca.clone().or(section.directory_ca.clone()),
        http,
        retry: flags
            .acme_retry
            .or(file.and_then(|c| c.acme_retry))
            .unwrap_or(DEFAULT_RETRY),
    }))
}

/// Read and check the config file `flags` name (if any), then
/// [`resolve`] with the [`default_state_dir`].
pub fn read(flags: &Flags) -> Result<Settings, SettingsError> {
    let checked = match &flags.config {
        Some(path) => Some(crate::file::check_file(path).map_err(SettingsError::File)?),
        None => None,
    };
    resolve(flags, checked.as_ref(), &default_state_dir())
}

/// Merge `flags`, the checked config `file` and the defaults: a flag
/// beats the file, the file beats the default (`state_dir` when neither
/// names a state directory).
pub fn resolve(
    flags: &Flags,
    file: Option<&Checked>,
    state_dir: &Path,
) -> Result<Settings, SettingsError> {
    let written = file.map(|c| c.file.clone()).unwrap_or_default();
    let limits = &written.limits;
    let open = flags.auth.or(written.auth.mode).unwrap_or(AuthMode::Open) == AuthMode::Open;
    let listen = flags
        .listen
        .clone()
        .or(written.listen.clone())
        .unwrap_or_else(|| {
            if open {
                DEFAULT_LISTEN_OPEN
            } else {
                DEFAULT_LISTEN
            }
            .into()
        });
    let listen = listen_addr(&listen)?;
    let state_dir = flags
        .state_dir
        .clone()
        .or(written.state_dir.clone())
        .unwrap_or_else(|| state_dir.to_owned());
    let cert = match (
        flags.cert.clone().or(written.cert.clone()),
        flags.key.clone().or(written.key.clone()),
    ) {
        (Some(cert), Some(key)) => CertSource::Files { cert, key },
        _ => CertSource::Development,
    };
    let cert = match acme_settings(flags, file)? {
        Some(_) if cert != CertSource::Development => return Err(SettingsError::AcmeAndFiles),
        Some(acme) => CertSource::Acme(acme),
        None => cert,
    };
    let auth = match flags.auth.or(written.auth.mode).unwrap_or(AuthMode::Open) {
        AuthMode::Open => AuthChoice::Open,
        AuthMode::Ca => AuthChoice::Ca {
            client_ca: flags
                .client_ca
                .clone()
                .or(written.auth.client_ca.clone())
                .ok_or(SettingsError::NoClientCa)?,
        },
        AuthMode::Token => AuthChoice::Token {
            cert_ttl: flags
                .cert_ttl
                .or(file.and_then(|c| c.cert_ttl))
                .unwrap_or(DEFAULT_CERT_TTL),
        },
    };
    Ok(Settings {
        listen,
        state_dir,
        cert,
        auth,
        config_file: flags.config.clone(),
        policy: file.and_then(|c| c.policy.clone()),
        groups: file.map(|c| c.groups.clone()).unwrap_or_default(),
        max_clients: flags.max_clients.or(limits.max_clients),
        max_channels_per_client: flags
            .max_channels_per_client
            .or(limits.max_channels_per_client),
        max_streams_per_channel: limits.max_streams_per_channel,
        max_message: limits.max_message_size,
        max_pending: limits.max_pending,
        max_pending_per_source: limits.max_pending_per_source,
        bytes_per_second: flags.bytes_per_second.or(limits.bytes_per_second),
        messages_per_second: flags.messages_per_second.or(limits.messages_per_second),
        burst: file.and_then(|c| c.burst),
        flood_after: file.and_then(|c| c.flood_after),
        hello_timeout: file.and_then(|c| c.hello_timeout),
        idle_timeout: flags
            .idle_timeout
            .or(file.and_then(|c| c.idle_timeout))
            .unwrap_or(DEFAULT_IDLE_TIMEOUT),
        drain: flags.drain.or(file.and_then(|c| c.drain)),
        http: http_choice(flags, file)?,
    })
}

/// `--http` and its token file: required off loopback, and only with
/// `--http`.
fn http_choice(flags: &Flags, file: Option<&Checked>) -> Result<Option<HttpChoice>, SettingsError> {
    let addr = flags.http.or(file.and_then(|c| c.http));
    let token_file = flags
        .http_token_file
        .clone()
        .or(file.and_then(|c| c.file.http_token_file.clone()));
    match (addr, token_file) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(SettingsError::TokenWithoutHttp),
        (Some(addr), None) if !addr.ip().is_loopback() => Err(SettingsError::HttpNeedsToken(addr)),
        (Some(addr), token_file) => Ok(Some(HttpChoice { addr, token_file })),
    }
}

/// The socket address a connpipe listen address names.
fn listen_addr(listen: &str) -> Result<SocketAddr, SettingsError> {
    let addr: Address = listen.parse().map_err(SettingsError::Listen)?;
    let (host, port) = addr.quic_endpoint().map_err(SettingsError::NotQuic)?;
    if let Some(ip) = host.to_ip() {
        return Ok(SocketAddr::new(ip, port));
    }
    let name = host.to_string();
    let name = if name == "$n" {
        "localhost".to_owned()
    } else {
        name
    };
    let mut found =
        (name.as_str(), port)
            .to_socket_addrs()
            .map_err(|source| SettingsError::Lookup {
                host: name.clone(),
                source,
            })?;
    found.next().ok_or(SettingsError::NoAddress(name))
}

/// The state directory when neither a flag nor the file names one:
/// `$XDG_STATE_HOME/qmesh-coordinator`, else
/// `~/.local/state/qmesh-coordinator`, else `.qmesh-coordinator`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("qmesh-coordinator");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".local/state/qmesh-coordinator");
    }
    PathBuf::from(".qmesh-coordinator")
}

impl Settings {
    /// The HTTP listener's token file, if any.
    fn http_token(&self) -> Option<&Path> {
        self.http.as_ref()?.token_file.as_deref()
    }

    /// The coordinator configuration these settings make with `identity`
    /// and `auth` (the HTTP listener without its token: [`Settings::load`]
    /// reads that).
    pub fn config(&self, identity: Identity, auth: Auth) -> Config {
        let mut config = Config::new(identity);
        config.listen = self.listen;
        config.auth = Arc::new(auth);
        config.state_dir = Some(self.state_dir.clone());
        config.config_file = self.config_file.clone();
        config.max_clients = self.max_clients;
        if let Some(d) = self.drain {
            config.drain = d;
        }
        if let Some(n) = self.max_channels_per_client {
            config.max_channels_per_client = n.max(1);
        }
        if let Some(n) = self.max_streams_per_channel {
            config.max_streams_per_channel = n.max(1);
        }
        if let Some(n) = self.max_message {
            config.max_message = n.max(1);
        }
        if let Some(n) = self.max_pending {
            config.max_pending = n.max(2);
        }
        if let Some(n) = self.max_pending_per_source {
            config.max_pending_per_source = n.max(1);
        }
        let nonzero = |v: u64| (v > 0).then_some(v);
        if let Some(v) = self.bytes_per_second {
            config.rate.bytes_per_sec = nonzero(v);
        }
        if let Some(v) = self.messages_per_second {
            config.rate.messages_per_sec = nonzero(v);
        }
        if let Some(d) = self.burst {
            config.rate.burst = d;
        }
        if let Some(d) = self.flood_after {
            config.rate.flood_after = d;
        }
        if let Some(d) = self.hello_timeout {
            config.hello_timeout = d;
        }
        if let Some(p) = &self.policy {
            config.policy = p.clone();
        }
        config.groups = self.groups.clone();
        config.http = self.http.as_ref().map(|h| crate::config::HttpConfig {
            addr: h.addr,
            token: None,
        });
        config.tuning = config
            .tuning
            .with_idle_timeout(self.idle_timeout.max(Duration::from_secs(1)));
        config
    }

    /// Load the certificate (or make the development one) and set up the
    /// auth mode's state: the configuration to run with, and the CA file
    /// clients need when the certificate is a development one.
    pub fn load(&self) -> anyhow::Result<(Config, Option<PathBuf>)> {
        let dir = &self.state_dir;
        let (identity, ca_note) = match &self.cert {
            CertSource::Files { cert, key } => {
                let identity =
                    Identity::load(cert, key).context("loading the coordinator --cert/--key")?;
                (identity, None)
            }
            CertSource::Acme(_) => {
                let (cert, key) = crate::acme::AcmeSettings::files(dir);
                let identity =
                    Identity::load(&cert, &key).context("loading the certificate ACME obtained")?;
                (identity, None)
            }
            CertSource::Development => {
                let files = crate::devcert::dev_identity(dir).with_context(|| {
                    format!("preparing the development certificate in {}", dir.display())
                })?;
                let verb = if files.created { "created" } else { "reusing" };
                tracing::info!(state_dir = %dir.display(), "{verb} development certificate");
                (files.identity, Some(files.ca_path))
            }
        };
        let auth = match &self.auth {
            AuthChoice::Open => Auth::open(Some(dir))?,
            AuthChoice::Ca { client_ca } => {
                let roots = qmesh_certs::load_certs(client_ca)
                    .with_context(|| format!("loading the client CA {}", client_ca.display()))?;
                Auth::ca(roots, Some(dir))?
            }
            AuthChoice::Token { cert_ttl } => Auth::token(dir, *cert_ttl)?,
        };
        let mut config = self.config(identity, auth);
        if let (Some(http), Some(path)) = (&mut config.http, self.http_token()) {
            http.token = Some(crate::bearer::BearerToken::read(path)?);
        }
        Ok((config, ca_note))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::file::check_text;

    fn file(text: &str) -> Checked {
        check_text(text, Path::new("/etc/qmesh")).unwrap()
    }

    fn default_dir() -> PathBuf {
        PathBuf::from("/var/default-state")
    }

    fn resolved(flags: &Flags, file: Option<&Checked>) -> Settings {
        resolve(flags, file, &default_dir()).unwrap()
    }

    fn config(settings: &Settings) -> Config {
        settings.config(
            Identity::self_signed("coordinator").unwrap(),
            Auth::development(),
        )
    }

    #[test]
    fn token_and_ca_modes_listen_on_every_address_by_default() {
        let flags = Flags {
            auth: Some(AuthMode::Token),
            ..Flags::default()
        };
        assert_eq!(
            resolved(&flags, None).listen,
            "0.0.0.0:7447".parse().unwrap()
        );
        let flags = Flags {
            auth: Some(AuthMode::Open),
            listen: Some("quic/*4:7447".into()),
            ..Flags::default()
        };
        assert_eq!(
            resolved(&flags, None).listen,
            "0.0.0.0:7447".parse().unwrap(),
            "open mode binds every address when told to"
        );
    }

    #[test]
    fn without_flags_or_file_everything_is_the_default() {
        let s = resolved(&Flags::default(), None);
        // open mode admits anyone: loopback unless told otherwise.
        assert_eq!(s.listen, "127.0.0.1:7447".parse().unwrap());
        assert_eq!(s.state_dir, default_dir());
        assert_eq!(s.cert, CertSource::Development);
        assert_eq!(s.auth, AuthChoice::Open);
        assert_eq!(s.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        let c = config(&s);
        let d = Config::new(Identity::self_signed("x").unwrap());
        assert_eq!(c.max_clients, None);
        assert_eq!(c.max_channels_per_client, d.max_channels_per_client);
        assert_eq!(c.max_streams_per_channel, d.max_streams_per_channel);
        assert_eq!(c.max_message, d.max_message);
        assert_eq!(c.max_pending, d.max_pending);
        assert_eq!(c.rate, d.rate);
        assert_eq!(c.hello_timeout, d.hello_timeout);
        assert_eq!(c.state_dir, Some(default_dir()));
        assert_eq!(c.config_file, None);
        assert!(c.groups.is_empty());
    }

    const FULL: &str = r#"
        listen = "quic/127.0.0.1:9000"
        state_dir = "/srv/state"
        cert = "c.pem"
        key = "k.pem"
        drain = "20s"
        [auth]
        mode = "token"
        cert_ttl = "2h"
        [limits]
        max_clients = 10
        max_channels_per_client = 20
        max_streams_per_channel = 30
        max_message_size = 40
        max_pending = 50
        max_pending_per_source = 5
        bytes_per_second = 60
        messages_per_second = 70
        burst = "1s"
        flood_after = "9s"
        hello_timeout = "3s"
        idle_timeout = "45s"
        [[policy.allow]]
        from = ["*"]
        to = ["*"]
        channels = ["chat"]
        [groups.ops]
        policy = "evict"
    "#;

    #[test]
    fn the_file_beats_the_defaults() {
        let checked = file(FULL);
        let s = resolved(&Flags::default(), Some(&checked));
        assert_eq!(s.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(s.state_dir, PathBuf::from("/srv/state"));
        assert_eq!(
            s.auth,
            AuthChoice::Token {
                cert_ttl: Duration::from_secs(7200)
            }
        );
        assert_eq!(s.idle_timeout, Duration::from_secs(45));
        let c = config(&s);
        assert_eq!(c.max_clients, Some(10));
        assert_eq!(c.max_channels_per_client, 20);
        assert_eq!(c.max_streams_per_channel, 30);
        assert_eq!(c.max_message, 40);
        assert_eq!(c.max_pending, 50);
        assert_eq!(c.max_pending_per_source, 5);
        assert_eq!(c.rate.bytes_per_sec, Some(60));
        assert_eq!(c.rate.messages_per_sec, Some(70));
        assert_eq!(c.rate.burst, Duration::from_secs(1));
        assert_eq!(c.rate.flood_after, Duration::from_secs(9));
        assert_eq!(c.hello_timeout, Duration::from_secs(3));
        assert_eq!(c.drain, Duration::from_secs(20));
        assert_eq!(c.policy.len(), 1);
        assert!(c.groups.contains_key("ops"));
    }

    #[test]
    fn acme_from_the_file_and_flags_and_never_with_files() {
        let checked = file(
            "[acme]\ndomains = [\"coord.example.com\"]\ncontact = [\"mailto:ops@example.com\"]\ndirectory = \"staging\"\nretry = \"3s\"\n",
        );
        let s = resolved(&Flags::default(), Some(&checked));
        let CertSource::Acme(acme) = &s.cert else {
            panic!("the file's [acme] must choose ACME: {:?}", s.cert);
        };
        assert_eq!(acme.domains, ["coord.example.com"]);
        assert_eq!(acme.directory, crate::acme::LETS_ENCRYPT_STAGING);
        assert_eq!(acme.contact, ["mailto:ops@example.com"]);
        assert_eq!(acme.retry, Duration::from_secs(3));
        assert_eq!(acme.http, "0.0.0.0:80".parse().unwrap());
        let flags = Flags {
            acme: vec!["other.example.com".into()],
            acme_http: Some("127.0.0.1:8080".parse().unwrap()),
            ..Flags::default()
        };
        let CertSource::Acme(acme) = resolved(&flags, Some(&checked)).cert else {
            panic!("ACME");
        };
        assert_eq!(acme.domains, ["other.example.com"]);
        assert_eq!(acme.http, "127.0.0.1:8080".parse().unwrap());
        let both = Flags {
            acme: vec!["coord.example.com".into()],
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ..Flags::default()
        };
        assert!(matches!(
            resolve(&both, None, Path::new("/tmp")),
            Err(SettingsError::AcmeAndFiles)
        ));
        assert!(crate::file::check_text(
            "cert = \"c.pem\"\nkey = \"k.pem\"\n[acme]\ndomains = [\"a.example\"]\n",
            Path::new("/etc")
        )
        .is_err());
    }

    #[test]
    fn a_flag_beats_the_file() {
        let checked = file(FULL);
        let flags = Flags {
            config: Some("/etc/qmesh/coordinator.toml".into()),
            listen: Some("quic/127.0.0.2:9001".into()),
            cert: Some("mine.pem".into()),
            key: Some("mine-key.pem".into()),
            state_dir: Some("/tmp/flag-state".into()),
            auth: Some(AuthMode::Ca),
            client_ca: Some("clients.pem".into()),
            cert_ttl: Some(Duration::from_secs(60)),
            idle_timeout: Some(Duration::from_secs(5)),
            drain: Some(Duration::ZERO),
            max_clients: Some(1),
            max_channels_per_client: Some(2),
            bytes_per_second: Some(3),
            messages_per_second: Some(4),
            http: Some("127.0.0.1:9464".parse().unwrap()),
            http_token_file: Some("token".into()),
            ..Flags::default()
        };
        let s = resolved(&flags, Some(&checked));
        assert_eq!(s.listen, "127.0.0.2:9001".parse().unwrap());
        assert_eq!(s.state_dir, PathBuf::from("/tmp/flag-state"));
        assert_eq!(
            s.cert,
            CertSource::Files {
                cert: "mine.pem".into(),
                key: "mine-key.pem".into()
            }
        );
        assert_eq!(
            s.auth,
            AuthChoice::Ca {
                client_ca: "clients.pem".into()
            }
        );
        assert_eq!(s.idle_timeout, Duration::from_secs(5));
        assert_eq!(s.config_file, flags.config);
        let c = config(&s);
        assert_eq!(c.max_clients, Some(1));
        assert_eq!(c.max_channels_per_client, 2);
        assert_eq!(c.rate.bytes_per_sec, Some(3));
        assert_eq!(c.rate.messages_per_sec, Some(4));
        assert_eq!(c.drain, Duration::ZERO);
        // Settings without a flag still come from the file.
        assert_eq!(c.max_streams_per_channel, 30);
        let token = Flags {
            auth: Some(AuthMode::Token),
            cert_ttl: Some(Duration::from_secs(60)),
            ..Flags::default()
        };
        assert_eq!(
            resolved(&token, Some(&checked)).auth,
            AuthChoice::Token {
                cert_ttl: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn file_paths_are_relative_to_the_file_and_flag_paths_to_the_working_directory() {
        let checked = file("cert = \"c.pem\"\nkey = \"keys/k.pem\"\nstate_dir = \"state\"\n");
        let s = resolved(&Flags::default(), Some(&checked));
        assert_eq!(
            s.cert,
            CertSource::Files {
                cert: "/etc/qmesh/c.pem".into(),
                key: "/etc/qmesh/keys/k.pem".into()
            }
        );
        assert_eq!(s.state_dir, PathBuf::from("/etc/qmesh/state"));
        // A flag replaces one of the pair and stays as written.
        let flags = Flags {
            cert: Some("here.pem".into()),
            ..Flags::default()
        };
        assert_eq!(
            resolved(&flags, Some(&checked)).cert,
            CertSource::Files {
                cert: "here.pem".into(),
                key: "/etc/qmesh/keys/k.pem".into()
            }
        );
    }

    #[test]
    fn a_client_ca_in_the_file_is_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = qmesh_certs::Ca::generate("clients").unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let checked = check_text(
            "[auth]\nmode = \"ca\"\nclient_ca = \"ca.pem\"\n",
            dir.path(),
        )
        .unwrap();
        assert_eq!(
            resolved(&Flags::default(), Some(&checked)).auth,
            AuthChoice::Ca {
                client_ca: dir.path().join("ca.pem")
            }
        );
    }

    #[test]
    fn a_certificate_without_its_key_falls_back_to_the_development_one() {
        let flags = Flags {
            cert: Some("c.pem".into()),
            ..Flags::default()
        };
        assert_eq!(resolved(&flags, None).cert, CertSource::Development);
    }

    #[test]
    fn zero_rates_mean_unlimited_and_limits_have_floors() {
        let flags = Flags {
            bytes_per_second: Some(0),
            messages_per_second: Some(0),
            max_channels_per_client: Some(0),
            idle_timeout: Some(Duration::ZERO),
            ..Flags::default()
        };
        // The file refuses zero limits itself; flags reach the floors.
        let c = config(&resolved(&flags, None));
        assert_eq!(c.rate.bytes_per_sec, None);
        assert_eq!(c.rate.messages_per_sec, None);
        assert_eq!(c.max_channels_per_client, 1);
        let floor = Config::new(Identity::self_signed("x").unwrap())
            .tuning
            .with_idle_timeout(Duration::from_secs(1));
        assert_eq!(c.tuning, floor);
    }

    #[test]
    fn a_listen_address_that_is_not_quic_or_not_an_address_is_an_error() {
        let listen = |l: &str| {
            let flags = Flags {
                listen: Some(l.into()),
                ..Flags::default()
            };
            resolve(&flags, None, &default_dir())
        };
        assert!(matches!(
            listen("not an address"),
            Err(SettingsError::Listen(_))
        ));
        let e = listen("tcp/127.0.0.1:80").unwrap_err();
        assert!(matches!(e, SettingsError::NotQuic(_)), "{e:?}");
        assert_eq!(e.to_string(), "--listen must be a quic/ address");
        assert_eq!(
            listen("quic/$n:7000").unwrap().listen.port(),
            7000,
            "$n is this host"
        );
    }

    #[test]
    fn http_off_loopback_needs_a_token_file_and_a_token_file_needs_http() {
        let http = |addr: &str, token: Option<&str>| {
            let flags = Flags {
                http: Some(addr.parse().unwrap()),
                http_token_file: token.map(PathBuf::from),
                ..Flags::default()
            };
            resolve(&flags, None, &default_dir())
        };
        let s = http("127.0.0.1:9464", None).unwrap();
        assert_eq!(
            s.http,
            Some(HttpChoice {
                addr: "127.0.0.1:9464".parse().unwrap(),
                token_file: None
            })
        );
        assert!(http("[::1]:9464", None).is_ok());
        for public in ["0.0.0.0:9464", "192.0.2.1:9464", "[::]:9464"] {
            let e = http(public, None).unwrap_err();
            assert!(matches!(e, SettingsError::HttpNeedsToken(_)), "{e:?}");
            assert!(e.to_string().contains("--http-token-file FILE"), "{e}");
            let s = http(public, Some("/etc/qmesh/http-token")).unwrap();
            assert_eq!(
                s.http.unwrap().token_file,
                Some(PathBuf::from("/etc/qmesh/http-token"))
            );
        }
        // A token on loopback is kept (and required).
        let s = http("127.0.0.1:9464", Some("t")).unwrap();
        assert_eq!(s.http.unwrap().token_file, Some(PathBuf::from("t")));
        let flags = Flags {
            http_token_file: Some("t".into()),
            ..Flags::default()
        };
        let e = resolve(&flags, None, &default_dir()).unwrap_err();
        assert!(matches!(e, SettingsError::TokenWithoutHttp), "{e:?}");
        // From the file, the token file relative to it.
        let checked = file("http = \"0.0.0.0:9464\"\nhttp_token_file = \"tok\"\n");
        let s = resolved(&Flags::default(), Some(&checked));
        assert_eq!(
            s.http,
            Some(HttpChoice {
                addr: "0.0.0.0:9464".parse().unwrap(),
                token_file: Some("/etc/qmesh/tok".into())
            })
        );
        let e = resolve(
            &Flags::default(),
            Some(&file("http = \"0.0.0.0:1\"\n")),
            &default_dir(),
        );
        assert!(matches!(e, Err(SettingsError::HttpNeedsToken(_))));
        let errs = check_text("http = \"localhost:9464\"\n", Path::new(".")).unwrap_err();
        assert!(errs[0].contains("not an IP address and port"), "{errs:?}");
    }

    #[test]
    fn the_token_file_is_read_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok-1\n").unwrap();
        let flags = Flags {
            state_dir: Some(dir.path().join("state")),
            http: Some("127.0.0.1:0".parse().unwrap()),
            http_token_file: Some(token.clone()),
            ..Flags::default()
        };
        let (config, _) = resolve(&flags, None, &default_dir())
            .unwrap()
            .load()
            .unwrap();
        let http = config.http.unwrap();
        assert!(http.token.unwrap().matches(b"tok-1"));
        std::fs::write(&token, "").unwrap();
        let e = resolve(&flags, None, &default_dir())
            .unwrap()
            .load()
            .unwrap_err();
        assert!(format!("{e:#}").contains("is empty"), "{e:#}");
    }

    #[test]
    fn ca_mode_without_a_client_ca_is_an_error() {
        let flags = Flags {
            auth: Some(AuthMode::Ca),
            ..Flags::default()
        };
        let e = resolve(&flags, None, &default_dir()).unwrap_err();
        assert!(matches!(e, SettingsError::NoClientCa));
        assert!(e.to_string().contains("--client-ca FILE"), "{e}");
    }

    #[test]
    fn a_bad_config_file_reports_every_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[limits]\nburst = \"soon\"\nidle_timeout = \"never\"\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some(path),
            ..Flags::default()
        };
        let e = read(&flags).unwrap_err();
        let SettingsError::File(errors) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(e.to_string().starts_with("2 error(s):\n  "), "{e}");
    }
}
