//! The `qmesh` command line: argument parsing and the subcommands.

mod broadcast;
#[cfg(feature = "demo")]
mod demo;
mod forward;
mod listen;
mod messaging;
mod metrics;
mod receipts;
mod send;
mod signals;
mod up;

use std::path::PathBuf;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use qmesh_client::{Client, ClientConfig, Fingerprint, Identity, PathMode};
use qmesh_proto::Untrusted;
use tracing::info;

/// First message of a stream of text lines.
pub(crate) const TEXT_STREAM: &[u8] = b"qmesh-text/1";
/// First message of a file stream: this, then `\n<name>\n<size>`.
pub(crate) const FILE_STREAM: &[u8] = b"qmesh-file/1";
/// Bytes of file data per message.
pub(crate) const FILE_CHUNK: usize = 1024 * 1024;

/// Talk to peers over a qmesh coordinator.
#[derive(Debug, Parser)]
#[command(name = "qmesh", version, args_override_self = true)]
pub(crate) struct Cli {
    /// The coordinator, as a connpipe address; repeat it (or separate
    /// with commas) for several, and a host name with several addresses
    /// counts as that many.
    #[arg(
        long,
        global = true,
        env = "QMESH_COORDINATOR",
        default_value = "quic/$4:7447",
        value_delimiter = ','
    )]
    coordinator: Vec<String>,
    /// This client's name (1-64 of a-z 0-9 . _ -).
    #[arg(long, global = true, env = "QMESH_NAME")]
    name: Option<String>,
    /// PEM file of the CA that issued the coordinator's certificate, for
    /// a private deployment; trusted instead of the system's roots. With
    /// neither --ca nor --fingerprint the coordinator is verified against
    /// the system's trust store (SSL_CERT_FILE / SSL_CERT_DIR honoured).
    #[arg(long, global = true, env = "QMESH_CA")]
    ca: Option<PathBuf>,
    /// Trust exactly the coordinator certificate with this SHA-256
    /// fingerprint instead of a CA.
    #[arg(long, global = true, env = "QMESH_FINGERPRINT", conflicts_with = "ca")]
    fingerprint: Option<String>,
    /// Use ADDR for HOST:PORT instead of asking DNS, as curl's --resolve
    /// (HOST:PORT:ADDR[,ADDR...]; repeatable). The coordinator's
    /// certificate is still checked for HOST.
    #[arg(long, global = true, value_name = "HOST:PORT:ADDR")]
    resolve: Vec<qmesh_client::Resolve>,
    /// Seconds without hearing from the coordinator before the session is
    /// reported lost.
    #[arg(long, global = true, default_value_t = 30)]
    idle_timeout: u64,
    /// Where this client keeps its key and certificate
    /// (default: $XDG_STATE_HOME/qmesh or ~/.local/state/qmesh).
    #[arg(long, global = true, env = "QMESH_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// This client's certificate (PEM) instead of the one kept in the state
    /// directory; needs --key.
    #[arg(long, global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// A one-use enrollment token from the operator (`qmesh-coordinator
    /// token create`): used once to get a certificate for this client's
    /// key, which is kept in the state directory and renewed before it
    /// expires.
    #[arg(long, global = true, env = "QMESH_TOKEN")]
    token: Option<String>,
    /// Take no direct channels: everything goes through the coordinator.
    #[arg(long, global = true)]
    no_direct: bool,
    /// Seconds a direct path may take to come up.
    #[arg(long, global = true, default_value_t = 5)]
    direct_timeout: u64,
    /// Seconds between heartbeats to the coordinator.
    #[arg(long, global = true, default_value_t = 5)]
    heartbeat: u64,
    /// Heartbeats missed in a row after which the coordinator counts as
    /// lost.
    #[arg(long, global = true, default_value_t = 3)]
    heartbeat_misses: u32,
    /// Log filter, e.g. `info` or `debug` (else RUST_LOG, else what -v
    /// asks for); the last one given counts.
    #[arg(long, global = true)]
    log: Option<String>,
    /// Show more of the logs: -v info, -vv debug, -vvv trace. Without it
    /// only warnings and errors are logged, besides the command's own
    /// lines; --log or RUST_LOG, when given, is used instead.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print each message received on a channel, one line each, from any peer.
    Listen {
        /// The channel name to accept (e.g. `chat`).
        channel: String,
        /// Store files peers send into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Send each line of stdin as a message, or a file.
    Send {
        /// The channel, e.g. `mesh/bob!chat`.
        address: String,
        /// Send this file instead of stdin.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The path to use: relayed at once and direct when possible
        /// (auto), direct only (direct), or through the coordinator only
        /// (relay).
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
    },
    /// Join a broadcast group: each stdin line is sent to every member,
    /// and every member's message is printed as `SENDER: TEXT`.
    Broadcast {
        /// The group's name (e.g. `ops`).
        group: String,
        /// Print the group's member count and exit instead.
        #[arg(long)]
        count: bool,
    },
    /// Run a coordinator and two clients in this process and show a channel
    /// at work.
    #[cfg(feature = "demo")]
    Demo,
    /// Send one request and print the reply (exit 1 when it is missing).
    Request {
        /// The channel, e.g. `mesh/bob!echo`.
        address: String,
        /// The request body.
        body: String,
        /// Milliseconds to wait for the reply.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Send this many requests on the channel (bodies `BODY 1` to
        /// `BODY N`, up to 100 in flight) and print one line for each: its
        /// reply, or that it is missing and why; exits 1 if any is missing.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Offer interface CHANNEL and answer every request on it with its body
    /// (echo), until interrupted.
    Serve {
        /// The channel name to serve, e.g. `echo`.
        channel: String,
    },
    /// List the clients online and what they offer.
    Peers {
        /// Go on printing joins, leaves and interface changes.
        #[arg(long)]
        watch: bool,
        /// Print the list as one JSON document: an array of
        /// `{"name", "interfaces": [{"name", "direction", "version"}]}`.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
    },
    /// Print the manifest of an interface, e.g. `mesh/bob!web`.
    Describe {
        /// The interface's address.
        address: String,
    },
    /// Offer interface NAME and connect every connection peers forward to
    /// it to TARGET, until interrupted.
    Expose {
        /// The interface's name, which peers open as `mesh/ME!NAME`.
        #[arg(value_name = "NAME")]
        interface: String,
        /// Where each connection goes: `tcp/HOST:PORT`, `unix//PATH` or
        /// `udp/HOST:PORT` (host shorthands such as `$4` work).
        target: String,
        /// Only these peers may open it (comma-separated names); the
        /// coordinator's policy applies as well.
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
        /// The most connections (or UDP flows) at once.
        #[arg(long, default_value_t = qmesh_client::forward::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Seconds a UDP flow lives without a datagram.
        #[arg(long, default_value_t = 60)]
        udp_idle: u64,
    },
    /// Run every route in a TOML file as one client (the agent): its
    /// exposed interfaces and its forwards. SIGHUP, or `qmesh up --reload`,
    /// applies the file again: added routes start, removed ones stop
    /// (their live connections get the file's grace period), unchanged ones
    /// keep their connections; a file with any error changes nothing.
    Up {
        /// The agent's file (see docs/operations.md).
        #[arg(long, value_name = "FILE", required_unless_present = "check")]
        config: Option<PathBuf>,
        /// Check FILE and report every error with its line, then exit.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "reload"])]
        check: Option<PathBuf>,
        /// Tell the agent running for --config's name to apply its file
        /// again, then exit.
        #[arg(long, requires = "config")]
        reload: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics (routes,
        /// connections, bytes, paths); ADDR must be a loopback address,
        /// e.g. 127.0.0.1:9465.
        #[arg(long, value_name = "ADDR", conflicts_with_all = ["check", "reload"])]
        http: Option<std::net::SocketAddr>,
    },
    /// Print a completion script for SHELL on stdout, e.g.
    /// `qmesh completions bash > /etc/bash_completion.d/qmesh`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Listen on LISTEN and carry every connection (or UDP flow) to the
    /// exposed interface TO, until interrupted.
    Forward {
        /// Where to listen: `tcp/HOST:PORT`, `unix//PATH` or `udp/HOST:PORT`.
        listen: String,
        /// The exposed interface, e.g. `mesh/bob!web`.
        to: String,
        /// The path: relayed at once and direct when possible (auto),
        /// direct only (direct), or through the coordinator only (relay).
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// The most connections (or UDP flows) at once.
        #[arg(long, default_value_t = qmesh_client::forward::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Seconds a UDP flow lives without a datagram.
        #[arg(long, default_value_t = 60)]
        udp_idle: u64,
    },
}

/// `--mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// Relayed at once, direct as soon as a direct path is up.
    Auto,
    /// Direct only; fails when no direct path comes up in time.
    Direct,
    /// Through the coordinator only.
    Relay,
}

impl From<Mode> for PathMode {
    fn from(m: Mode) -> PathMode {
        match m {
            Mode::Auto => PathMode::Auto,
            Mode::Direct => PathMode::Direct,
            Mode::Relay => PathMode::Relay,
        }
    }
}

fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("qmesh");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/qmesh"),
        None => PathBuf::from(".qmesh"),
    }
}

/// Where the identity of `name` is kept for the coordinator `cli` joins:
/// certificate and key files in that coordinator's folder of the state
/// directory (see [`credentials_folder`]).
fn identity_files(cli: &Cli, name: &str) -> Result<(PathBuf, PathBuf)> {
    let dir = cli
        .state_dir
        .clone()
        .unwrap_or_else(default_state_dir)
        .join(credentials_folder(cli)?);
    Ok((
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    ))
}

/// The state directory's folder for the coordinator `cli` joins. A
/// certificate one coordinator issued means nothing to another, and
/// enrolling with one must not overwrite what another issued, so each
/// coordinator (or mesh) has its own, named by what the client trusts:
/// `ca-HEX` for the `--ca` file's first certificate (every coordinator of
/// one mesh shares it), `pin-HEX` for `--fingerprint`, and with the
/// system's roots `addr-ADDRESS` for the first `--coordinator`.
fn credentials_folder(cli: &Cli) -> Result<String> {
    let short = |fp: &Fingerprint| hex_prefix(&fp.0);
    if let Some(path) = &cli.ca {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading the CA file {}", path.display()))?;
        let first = qmesh_certs::certs_from_pem(&pem)
            .ok()
            .and_then(|c| c.into_iter().next())
            .with_context(|| format!("the CA file {} holds no certificate", path.display()))?;
        return Ok(format!("ca-{}", short(&Fingerprint::of(&first))));
    }
    if let Some(fp) = &cli.fingerprint {
        let fp: Fingerprint = fp.parse().context("--fingerprint")?;
        return Ok(format!("pin-{}", short(&fp)));
    }
    let address = cli.coordinator.first().map_or("", String::as_str);
    let safe: String = address
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => c,
            _ => '_',
        })
        .collect();
    Ok(format!("addr-{safe}"))
}

/// The first 16 hex digits of `bytes`: enough to tell folders apart.
fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Before per-coordinator folders, `NAME.pem` and `NAME-key.pem` sat in
/// the state directory itself. When they are there and the coordinator's
/// folder has none, copy them in: the client keeps its key and any
/// certificate it holds, and a coordinator that refuses it is answered by
/// enrolling again (`--token`) into that folder alone.
fn adopt_legacy_identity(cli: &Cli, name: &str, (cert, key): &(PathBuf, PathBuf)) -> Result<()> {
    let dir = cli.state_dir.clone().unwrap_or_else(default_state_dir);
    let (old_cert, old_key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    if cert.exists() || key.exists() || !old_cert.exists() || !old_key.exists() {
        return Ok(());
    }
    if let Some(parent) = cert.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // fs::copy keeps the key file's mode (0600).
    std::fs::copy(&old_key, key)
        .with_context(|| format!("copying {} to {}", old_key.display(), key.display()))?;
    std::fs::copy(&old_cert, cert)
        .with_context(|| format!("copying {} to {}", old_cert.display(), cert.display()))?;
    info!(from = %old_cert.display(), to = %cert.display(), "this coordinator's folder now holds the identity kept before per-coordinator folders");
    Ok(())
}

/// Enroll with `token` (or renew without one), save the issued
/// certificate next to its key, and return it.
async fn enroll_and_save(
    (cert, key): &(PathBuf, PathBuf),
    config: &ClientConfig,
    token: Option<&str>,
) -> Result<Identity> {
    let what = if token.is_some() {
        "enrolling"
    } else {
        "renewing the certificate"
    };
    let enrolled = qmesh_client::enroll::enroll(config, token)
        .await
        .with_context(|| format!("{what} with {} as {}", config.coordinator, config.name))?;
    enrolled
        .identity
        .save(cert, key)
        .with_context(|| format!("saving the issued certificate as {}", cert.display()))?;
    let left = enrolled
        .expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    info!(cert = %cert.display(), valid_for_s = left.as_secs(), "{what}: certificate issued");
    Ok(enrolled.identity)
}

/// Renew the kept certificate when it is due, again and again, while the
/// client runs; the client's later sessions (its reconnects) present the
/// renewed one.
fn renew_in_background(files: (PathBuf, PathBuf), mut config: ClientConfig, client: Client) {
    tokio::spawn(async move {
        loop {
            let Some(identity) = config.identity.clone() else {
                return;
            };
            let Some(at) = qmesh_client::enroll::renew_at(&identity) else {
                return;
            };
            let wait = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait.max(renewal_floor(&identity))).await;
            match enroll_and_save(&files, &config, None).await {
                Ok(renewed) => {
                    let renewed = Arc::new(renewed);
                    client.set_identity(renewed.clone());
                    config.identity = Some(renewed);
                }
                Err(e) => {
                    tracing::warn!(cause = %Untrusted::reason(format_args!("{e:#}")), "certificate renewal failed; retrying in a minute");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
        }
    });
}

/// The least time between two renewals of `identity`: a sixth of its
/// lifetime, and at least a second. A certificate that looks due at once
/// (this machine's clock ahead of the coordinator's) is then renewed a few
/// times over its life, not in a loop.
fn renewal_floor(identity: &Identity) -> Duration {
    let life = identity
        .chain
        .first()
        .and_then(|c| qmesh_certs::clientauth::validity(c))
        .map_or(0, |(from, until)| (until - from).max(0) as u64);
    let life = Duration::from_secs(life);
    (life / 6).max(Duration::from_secs(1))
}

/// The identity for `name`: `--cert`/`--key` when given, else the one kept
/// in the state directory, made there on first use.
fn load_identity(cli: &Cli, name: &str) -> Result<Identity> {
    if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
        return Identity::load(cert, key)
            .with_context(|| format!("loading --cert {} --key {}", cert.display(), key.display()));
    }
    let files = identity_files(cli, name)?;
    adopt_legacy_identity(cli, name, &files)?;
    let (cert, key) = files;
    let dir = cert.parent().map(PathBuf::from).unwrap_or_default();
    if cert.exists() || key.exists() {
        return Identity::load(&cert, &key).with_context(|| {
            format!(
                "loading this client's identity from {} and {} (delete both to make a new one)",
                cert.display(),
                key.display()
            )
        });
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let identity = Identity::self_signed(name).context("making a key and certificate")?;
    identity
        .save(&cert, &key)
        .with_context(|| format!("saving the new identity in {}", dir.display()))?;
    info!(cert = %cert.display(), fingerprint = %identity.fingerprint(), "made a new identity for this client");
    Ok(identity)
}

impl Cli {
    /// The log filter: `--log` when given; `None` when `RUST_LOG` is set
    /// (the logger reads it); else the level `-v` asks for.
    pub(crate) fn log_filter(&self) -> Option<String> {
        let rust_log = std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty());
        log_filter(self.log.as_deref(), rust_log, self.verbose)
    }

    fn config(&self, default_name: Option<String>) -> Result<ClientConfig> {
        let mut addresses = Vec::new();
        for text in &self.coordinator {
            let address: qmesh_client::Address = text
                .parse()
                .with_context(|| format!("--coordinator {text:?}"))?;
            addresses.push(address);
        }
        let Some(coordinator) = addresses.first().cloned() else {
            bail!("give the coordinator's address with --coordinator quic/HOST:PORT");
        };
        let Some(name) = self.name.clone().or(default_name) else {
            bail!("give this client a name with --name NAME (or QMESH_NAME)");
        };
        let trust = match (&self.ca, &self.fingerprint) {
            (Some(path), _) => ClientConfig::trust_ca_file(path)
                .with_context(|| format!("loading the CA file {}", path.display()))?,
            (None, Some(fp)) => {
                let fp: Fingerprint = fp.parse().context("--fingerprint")?;
                ClientConfig::trust_fingerprint(fp)
            }
            (None, None) => ClientConfig::trust_system()
                .context("no --ca or --fingerprint given, so the system's trust store is used")?,
        };
        let identity = load_identity(self, &name)?;
        let mut config = ClientConfig::new(coordinator, name, trust)
            .with_idle_timeout(Duration::from_secs(self.idle_timeout.max(1)));
        config.also = addresses.split_off(1);
        config.resolve = self.resolve.clone();
        config.identity = Some(Arc::new(identity));
        config.direct.enabled = !self.no_direct;
        config.direct.timeout = Duration::from_secs(self.direct_timeout.max(1));
        config.heartbeat = qmesh_client::Heartbeat::new(
            Duration::from_secs(self.heartbeat.max(1)),
            self.heartbeat_misses,
        );
        Ok(config)
    }

    /// Connect for a command that runs until stopped: a lost session is
    /// joined again, with a line on standard error for each attempt and
    /// for the return.
    async fn connect(&self, default_name: Option<String>) -> Result<Client> {
        self.connect_offering(default_name, Vec::new(), Stay::Up)
            .await
    }

    /// Connect for a one-shot command: a lost session ends it.
    async fn connect_once(&self, default_name: Option<String>) -> Result<Client> {
        self.connect_offering(default_name, Vec::new(), Stay::Once)
            .await
    }

    /// Connect, offering `interfaces`.
    async fn connect_offering(
        &self,
        default_name: Option<String>,
        interfaces: Vec<qmesh_client::Interface>,
        stay: Stay,
    ) -> Result<Client> {
        use qmesh_client::enroll::{expires_at, is_issued, renew_at};
        let mut config = self.config(default_name)?;
        config.interfaces = interfaces;
        if stay == Stay::Once {
            config.reconnect = qmesh_client::Reconnect::never();
        }
        let kept = self.cert.is_none();
        let files = identity_files(self, &config.name)?;
        // With --token and a kept issued certificate that still looks good,
        // try it first and enroll again only if the coordinator refuses it.
        let mut token_fallback = None;
        if let (Some(identity), true) = (config.identity.clone(), kept) {
            let now = std::time::SystemTime::now();
            let issued = is_issued(&identity);
            let expired = expires_at(&identity).is_some_and(|t| t <= now);
            let due = renew_at(&identity).is_some_and(|t| t <= now);
            match (&self.token, issued) {
                (Some(token), false) => {
                    let enrolled = enroll_and_save(&files, &config, Some(token)).await?;
                    config.identity = Some(Arc::new(enrolled));
                }
                (Some(token), true) if expired => {
                    let enrolled = enroll_fresh(&files, &config, token).await?;
                    config.identity = Some(Arc::new(enrolled));
                }
                (Some(token), true) => token_fallback = Some(token.clone()),
                (None, true) if due && !expired => {
                    let renewed = enroll_and_save(&files, &config, None).await?;
                    config.identity = Some(Arc::new(renewed));
                }
                _ => {}
            }
        }
        let what = format!("connecting to {} as {}", config.coordinator, config.name);
        let client = match Client::connect(config.clone()).await {
            Ok(client) => client,
            Err(e) if refused_credential(&e) => match token_fallback {
                Some(token) => {
                    info!(cause = %Untrusted::reason(&e), "the kept certificate was refused; enrolling again with --token and a new key");
                    config.identity = Some(Arc::new(enroll_fresh(&files, &config, &token).await?));
                    Client::connect(config.clone()).await.context(what)?
                }
                None if kept && config.identity.as_deref().is_some_and(is_issued) => {
                    return Err(e).context(format!(
                        "{what} (to enroll again, run once with --token and a new token from the operator)"
                    ))
                }
                None => return Err(e).context(what),
            },
            Err(e) => return Err(e).context(what),
        };
        if stay == Stay::Up {
            report_reconnects(&client);
        }
        if kept && config.identity.as_deref().is_some_and(is_issued) {
            renew_in_background(files, config, client.clone());
        }
        Ok(client)
    }
}

/// `--log` if given, `None` (the logger reads `RUST_LOG`) if `rust_log`,
/// else by `-v` count: warnings and errors only, then info, debug, trace.
fn log_filter(log: Option<&str>, rust_log: bool, verbose: u8) -> Option<String> {
    if let Some(filter) = log {
        return Some(filter.to_owned());
    }
    if rust_log {
        return None;
    }
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    Some(level.to_owned())
}

/// Whether a command stays up across lost sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stay {
    /// Runs until stopped: reconnects.
    Up,
    /// One-shot: a lost session ends it, with its status.
    Once,
}

/// Print a line on standard error for each reconnect attempt and for the
/// return: `reconnecting to ADDR: attempt N (CAUSE)`, `reconnected to ADDR
/// after N ms`.
pub(crate) fn report_reconnects(client: &Client) {
    use qmesh_client::SessionState;
    let mut state = client.state();
    let client_now = client.clone();
    tokio::spawn(async move {
        let mut lost_at = None;
        while state.changed().await.is_ok() {
            let now = state.borrow_and_update().clone();
            match now {
                SessionState::Reconnecting { attempt, to, cause } => {
                    lost_at.get_or_insert_with(std::time::Instant::now);
                    eprintln!(
                        "qmesh: reconnecting to {to}: attempt {attempt} ({})",
                        Untrusted::reason(&cause)
                    );
                }
                SessionState::Up { session } => {
                    if let Some(at) = lost_at.take() {
                        eprintln!(
                            "qmesh: reconnected to {} after {} ms (session {session})",
                            client_now.coordinator(),
                            at.elapsed().as_millis()
                        );
                    }
                }
                SessionState::Leaving { within, .. } => eprintln!(
                    "qmesh: {} is going away: live channels may run for up to {} ms, then this \
                     client reconnects",
                    client_now.coordinator(),
                    within.as_millis()
                ),
                SessionState::Ended { .. } => return,
            }
        }
    });
}

/// Whether the coordinator refused this client's credential (revoked,
/// expired, not admitted), as opposed to failing otherwise.
fn refused_credential(e: &qmesh_client::error::ConnectError) -> bool {
    use qmesh_client::error::ConnectError;
    use qmesh_proto::codes::RejectCode;
    matches!(
        e,
        ConnectError::CertificateRefused(_)
            | ConnectError::Rejected {
                code: RejectCode::NotAuthorised,
                ..
            }
    )
}

/// Enroll with `token` under a new key (the kept one was refused or has
/// expired), and keep the result.
async fn enroll_fresh(
    files: &(PathBuf, PathBuf),
    config: &ClientConfig,
    token: &str,
) -> Result<Identity> {
    let mut fresh = config.clone();
    fresh.identity = Some(Arc::new(
        Identity::self_signed(&config.name).context("making a key and certificate")?,
    ));
    enroll_and_save(files, &fresh, Some(token)).await
}

/// Run the parsed command.
pub(crate) async fn run(mut cli: Cli) -> Result<()> {
    if let Command::Completions { shell } = &cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(*shell, &mut command, "qmesh", &mut std::io::stdout());
        return Ok(());
    }
    if let Command::Up {
        config,
        check,
        reload,
        http,
    } = &cli.command
    {
        let http = *http;
        return match (check.clone(), config.clone(), *reload) {
            (Some(file), _, _) => up::check(&file),
            (None, Some(file), true) => up::reload(&cli, &file),
            (None, Some(file), false) => up::run(&mut cli, &file, http).await,
            (None, None, _) => bail!("give the agent's file: qmesh up --config FILE"),
        };
    }
    signals::install().context("listening for SIGINT and SIGTERM")?;
    use signals::{until_stopped, OnStop};
    match &cli.command {
        Command::Listen { channel, out } => {
            let client = cli.connect(None).await?;
            until_stopped(
                client.clone(),
                OnStop::Done,
                listen::run(client, channel, out.clone()),
            )
            .await
        }
        Command::Send {
            address,
            file,
            mode,
        } => {
            // send stays up: a direct channel is held through a lost
            // session, and a relayed one ends it through the channel's end.
            let client = cli
                .connect(Some(format!("send-{}", std::process::id())))
                .await?;
            until_stopped(
                client.clone(),
                OnStop::Unfinished,
                send::run(client, address, file.clone(), (*mode).into()),
            )
            .await
        }
        Command::Broadcast { group, count } => {
            let name = Some(format!("broadcast-{}", std::process::id()));
            let client = if *count {
                cli.connect_once(name).await?
            } else {
                cli.connect(name).await?
            };
            if *count {
                until_stopped(
                    client.clone(),
                    OnStop::Unfinished,
                    broadcast::count(client, group),
                )
                .await
            } else {
                until_stopped(client.clone(), OnStop::Done, broadcast::run(client, group)).await
            }
        }
        #[cfg(feature = "demo")]
        Command::Demo => demo::run().await,
        Command::Request {
            address,
            body,
            timeout_ms,
            count,
        } => {
            let client = cli
                .connect_once(Some(format!("request-{}", std::process::id())))
                .await?;
            let limit = Duration::from_millis((*timeout_ms).max(1));
            let work = async {
                if *count > 1 {
                    messaging::requests(client.clone(), address, body, limit, *count).await
                } else {
                    messaging::request(client.clone(), address, body, limit).await
                }
            };
            until_stopped(client.clone(), OnStop::Unfinished, work).await
        }
        Command::Serve { channel } => {
            qmesh_proto::name::validate_channel_name(channel)
                .with_context(|| format!("the channel name {channel:?}"))?;
            let offer = vec![messaging::echo_interface(channel)];
            let client = cli.connect_offering(None, offer, Stay::Up).await?;
            messaging::serve(client, channel).await
        }
        Command::Peers { watch, json } => {
            let name = Some(format!("peers-{}", std::process::id()));
            let client = if *watch {
                cli.connect(name).await?
            } else {
                cli.connect_once(name).await?
            };
            if *watch {
                // peers --watch leaves on a signal by itself.
                messaging::peers(client, true, *json).await
            } else {
                until_stopped(
                    client.clone(),
                    OnStop::Unfinished,
                    messaging::peers(client, false, *json),
                )
                .await
            }
        }
        Command::Describe { address } => {
            let client = cli
                .connect_once(Some(format!("describe-{}", std::process::id())))
                .await?;
            until_stopped(
                client.clone(),
                OnStop::Unfinished,
                messaging::describe(client, address),
            )
            .await
        }
        Command::Expose {
            interface,
            target,
            allow,
            max_connections,
            udp_idle,
        } => {
            let mut expose = forward::expose(interface, target)?;
            expose.allow = (!allow.is_empty()).then(|| allow.clone());
            expose.max_connections = (*max_connections).max(1);
            expose.udp_idle = Duration::from_secs((*udp_idle).max(1));
            let client = cli
                .connect_offering(None, vec![expose.interface()], Stay::Up)
                .await?;
            forward::run_expose(client, expose).await
        }
        Command::Forward {
            listen,
            to,
            mode,
            max_connections,
            udp_idle,
        } => {
            let mut route = forward::forward(listen, to)?;
            route.mode = (*mode).into();
            route.max_connections = (*max_connections).max(1);
            route.udp_idle = Duration::from_secs((*udp_idle).max(1));
            let client = cli.connect(None).await?;
            forward::run_forward(client, route).await
        }
        Command::Up { .. } | Command::Completions { .. } => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_quiet_by_default_and_log_or_rust_log_win_over_v() {
        assert_eq!(log_filter(None, false, 0).as_deref(), Some("warn"));
        assert_eq!(log_filter(None, false, 1).as_deref(), Some("info"));
        assert_eq!(log_filter(None, false, 2).as_deref(), Some("debug"));
        assert_eq!(log_filter(None, false, 7).as_deref(), Some("trace"));
        assert_eq!(log_filter(None, true, 2), None);
        assert_eq!(
            log_filter(Some("quinn=debug"), true, 1).as_deref(),
            Some("quinn=debug")
        );
    }

    #[test]
    fn credentials_sit_in_a_folder_per_coordinator_and_old_ones_are_adopted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().to_str().unwrap();
        let cli = |address: &str| {
            Cli::parse_from([
                "qmesh",
                "--state-dir",
                state,
                "--coordinator",
                address,
                "peers",
            ])
        };
        let (one, two) = (cli("quic/127.0.0.1:4433"), cli("quic/127.0.0.1:4434"));
        let (cert, key) = identity_files(&one, "alice").unwrap();
        assert_eq!(
            cert,
            dir.path()
                .join("addr-quic_127.0.0.1_4433")
                .join("alice.pem")
        );
        assert_eq!(key.parent(), cert.parent());
        assert_ne!(identity_files(&two, "alice").unwrap().0, cert);
        // The old layout's files are copied into the folder, key mode kept.
        let legacy = Identity::self_signed("alice").unwrap();
        legacy
            .save(
                &dir.path().join("alice.pem"),
                &dir.path().join("alice-key.pem"),
            )
            .unwrap();
        let loaded = load_identity(&one, "alice").unwrap();
        assert_eq!(loaded.fingerprint(), legacy.fingerprint());
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A folder that has its own identity keeps it.
        let own = Identity::self_signed("alice").unwrap();
        let files = identity_files(&two, "alice").unwrap();
        std::fs::create_dir_all(files.0.parent().unwrap()).unwrap();
        own.save(&files.0, &files.1).unwrap();
        assert_eq!(
            load_identity(&two, "alice").unwrap().fingerprint(),
            own.fingerprint()
        );
    }

    #[test]
    fn v_counts_before_or_after_the_subcommand() {
        for (args, want) in [
            (&["qmesh", "peers"][..], 0),
            (&["qmesh", "-v", "peers"], 1),
            (&["qmesh", "peers", "-v"], 1),
            (&["qmesh", "-v", "-v", "peers"], 2),
            (&["qmesh", "peers", "-vvv"], 3),
        ] {
            assert_eq!(Cli::parse_from(args).verbose, want, "{args:?}");
        }
        let cli = Cli::parse_from(["qmesh", "--log", "info", "peers", "--log", "debug"]);
        assert_eq!(cli.log.as_deref(), Some("debug"));
    }
}
