//! `qmesh-coordinator`: run a qmesh coordinator, or make its certificates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use qmesh_coordinator::admin::Request;
use qmesh_coordinator::auth::{token_key, AuthMode};
use qmesh_coordinator::devcert::write_certs;
use qmesh_coordinator::settings::{self, CertSource, Flags};
use qmesh_coordinator::{BindError, Coordinator, Listener};
use qmesh_proto::logging;

/// The qmesh coordinator: clients connect to it by name and open channels
/// to each other through it.
#[derive(Debug, Parser)]
#[command(name = "qmesh-coordinator", version)]
struct Cli {
    /// Log filter, e.g. `info` or `qmesh_coordinator=debug` (else RUST_LOG).
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a new CA and a coordinator certificate into a directory.
    Certs {
        /// Directory to write ca.pem, ca-key.pem, coordinator.pem and
        /// coordinator-key.pem into.
        #[arg(long)]
        out: PathBuf,
        /// Host names and IP addresses clients will use to reach the
        /// coordinator (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Serve clients.
    Run(Box<RunArgs>),
    /// Enrollment tokens (token mode).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Revoke a client: close its session within a second and refuse its
    /// certificate from now on.
    Revoke {
        /// The client name.
        #[arg(
            required_unless_present = "fingerprint",
            conflicts_with = "fingerprint"
        )]
        name: Option<String>,
        /// Revoke one certificate by its SHA-256 fingerprint (hex) instead.
        #[arg(long)]
        fingerprint: Option<String>,
        #[command(flatten)]
        place: Place,
    },
    /// Check or reload the access policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Version, uptime, auth mode, listen address, worker pid and
    /// restarts, clients, channels by path, bytes relayed.
    Info(Ask),
    /// The connected clients: name, address, since, channels, certificate
    /// fingerprint.
    Clients(Ask),
    /// The joined channels: both ends, name, path, age, bytes relayed.
    Channels(Ask),
    /// The last joins, leaves, kicks and reloads.
    Events(Ask),
    /// Close a client's session (code 17, kicked); unlike revoke, it may
    /// join again.
    Kick {
        /// The client name.
        name: String,
        /// Why, told to the client.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        ask: Ask,
    },
    /// Re-read the whole config file and apply what can change live.
    Reload(Ask),
    /// Drain this worker (live channels get the drain deadline), then have
    /// the leader start a new one; with --binary, from that binary (an
    /// upgrade in place).
    RestartWorker {
        /// The new worker's binary [default: the leader's].
        #[arg(long)]
        binary: Option<PathBuf>,
        #[command(flatten)]
        ask: Ask,
    },
    /// Drain (live channels get the drain deadline), then exit.
    Quit(Ask),
    /// Exit at once.
    Stop(Ask),
    /// Print a completion script for a shell: bash, zsh, fish, elvish or
    /// powershell (e.g. `qmesh-coordinator completions bash >
    /// /etc/bash_completion.d/qmesh-coordinator`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// An operator command's target and output form.
#[derive(Debug, clap::Args)]
struct Ask {
    #[command(flatten)]
    place: Place,
    /// Print the answer as one JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new one-use enrollment token.
    Create {
        /// The client name it enrolls, or a pattern with `*` and `?`.
        #[arg(long)]
        name: String,
        /// How long it can be used, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        #[command(flatten)]
        place: Place,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Dry run: check a config file and report every error.
    Check {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a running coordinator re-read its policy (as SIGHUP does);
    /// with errors it keeps the policy in force and reports them.
    Reload {
        #[command(flatten)]
        place: Place,
    },
}

/// Which coordinator an operator command is for.
#[derive(Debug, clap::Args)]
struct Place {
    /// The coordinator's state directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The coordinator's config file (for its state_dir).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl Place {
    fn state_dir(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.state_dir {
            return Ok(dir.clone());
        }
        if let Some(path) = &self.config {
            let checked = qmesh_coordinator::file::check_file(path)
                .map_err(|e| anyhow::anyhow!(e.join("\n")))?;
            if let Some(dir) = checked.file.state_dir {
                return Ok(dir);
            }
        }
        Ok(settings::default_state_dir())
    }
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Run the worker alone, with no leader process to replace it when it
    /// dies (for systemd-managed deployments and tests).
    #[arg(long)]
    single: bool,
    /// Read the --cert/--key files again this often and give new
    /// handshakes the new certificate when it changed (for certificates
    /// an ACME client renews), e.g. 1h.
    #[arg(long)]
    reload_certs_every: Option<humantime::Duration>,
    /// The leader gives up (and exits 1) when the worker dies this many
    /// times within --crash-window [default: 5].
    #[arg(long, default_value_t = qmesh_coordinator::leader::MAX_CRASHES)]
    max_crashes: usize,
    /// See --max-crashes [default: 60s].
    #[arg(long, default_value = "60s")]
    crash_window: humantime::Duration,
    /// Join a cluster of coordinators whose directory is this etcd,
    /// e.g. http://127.0.0.1:2379 (repeatable: the members of one etcd
    /// cluster). Names are then unique across the cluster.
    #[arg(long, value_name = "URL")]
    etcd: Vec<String>,
    /// The cluster's name: its keys in etcd are under /qmesh/NAME/.
    #[arg(long, value_name = "NAME", default_value = "qmesh", requires = "etcd")]
    cluster: String,
    /// The time to live of this coordinator's lease in etcd: how soon its
    /// names are free after it dies.
    #[arg(long, value_name = "DURATION", default_value = "5s", requires = "etcd")]
    etcd_lease_ttl: humantime::Duration,
    /// Where the member link endpoint listens: the other members of the
    /// cluster dial it to relay channels between their clients and this
    /// coordinator's. It must be an address they can reach [default: the
    /// --listen address's IP, any free port].
    #[arg(long, value_name = "ADDR", requires = "etcd")]
    peer_listen: Option<std::net::SocketAddr>,
    /// TOML config file; flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to listen, as a connpipe address [default: quic/*4:7447;
    /// with --auth open, quic/$4:7447, loopback only].
    #[arg(long)]
    listen: Option<String>,
    /// Coordinator certificate (PEM). Without it a development
    /// certificate is made in the state directory.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Coordinator private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// State directory: development certificate, revocations, token mode's
    /// client CA and keys, and the admin socket.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Who may join: open (development only), token or ca [default: open].
    #[arg(long, value_enum)]
    auth: Option<AuthMode>,
    /// ca mode: the CA file client certificates must chain to.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// token mode: lifetime of issued client certificates [default: 24h].
    #[arg(long)]
    cert_ttl: Option<humantime::Duration>,
    /// Seconds without hearing from a client before its session (and
    /// every channel it had) is reported lost [default: 30].
    #[arg(long)]
    idle_timeout: Option<u64>,
    /// After SIGTERM or SIGINT: how long live channels may go on before the
    /// coordinator closes them and exits (a second signal stops at once),
    /// e.g. 10s or 0 [default: 10s].
    #[arg(long)]
    drain: Option<humantime::Duration>,
    /// Most clients connected at once; the next is refused as full.
    #[arg(long)]
    max_clients: Option<usize>,
    /// Most channels one client may be part of at once [default: 1024].
    #[arg(long)]
    max_channels_per_client: Option<usize>,
    /// Relayed bytes per second per client; 0: unlimited [default: 256 MiB].
    #[arg(long)]
    bytes_per_second: Option<u64>,
    /// Relayed messages per second per client; 0: unlimited [default: 1000000].
    #[arg(long)]
    messages_per_second: Option<u64>,
    /// Serve Prometheus metrics at /metrics and a live status page at /
    /// on this TCP address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    http: Option<std::net::SocketAddr>,
    /// A file holding the bearer token every HTTP request must carry
    /// (`Authorization: Bearer TOKEN`); required when --http is not
    /// loopback.
    #[arg(long, value_name = "FILE")]
    http_token_file: Option<PathBuf>,
    /// Get (and renew) the certificate for this name by ACME instead of
    /// --cert/--key (repeatable; the first is the subject). Kept in
    /// acme/ in the state directory.
    #[arg(long, value_name = "DOMAIN", conflicts_with = "cert")]
    acme: Vec<String>,
    /// The ACME directory: an https:// URL, `letsencrypt` or `staging`
    /// [default: letsencrypt].
    #[arg(long, value_name = "URL")]
    acme_directory: Option<String>,
    /// Contact for the ACME account, e.g. mailto:ops@example.com
    /// (repeatable).
    #[arg(long, value_name = "URL")]
    acme_contact: Vec<String>,
    /// CA file for the ACME directory's own HTTPS (a private ACME server)
    /// [default: the system's roots].
    #[arg(long, value_name = "FILE")]
    acme_ca: Option<PathBuf>,
    /// Where to answer the ACME HTTP-01 challenge (TCP) [default:
    /// 0.0.0.0:80].
    #[arg(long, value_name = "ADDR")]
    acme_http: Option<std::net::SocketAddr>,
    /// The first wait after a failed ACME order; it doubles up to 1h
    /// [default: 10s].
    #[arg(long, value_name = "DURATION")]
    acme_retry: Option<humantime::Duration>,
}

/// Errors are one line each on stderr, the causes joined with ": ", and
/// status 1: never anyhow's debug form, which under `RUST_BACKTRACE=1`
/// adds a backtrace to what is an operator's mistake (a typo in the
/// config file, a port in use).
fn main() -> std::process::ExitCode {
    match run_cli() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_cli() -> Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log.as_deref());
    let log_fixed = cli.log.is_some() || std::env::var_os("RUST_LOG").is_some();
    match cli.command {
        Command::Certs { out, hosts, force } => {
            let files = write_certs(&out, &hosts, force)
                .with_context(|| format!("writing certificates into {}", out.display()))?;
            println!(
                "wrote {} (give this CA file to clients), {}, and the coordinator certificate \
                 coordinator.pem / coordinator-key.pem for: {}",
                files.ca_path.display(),
                out.join("ca-key.pem").display(),
                hosts.join(", ")
            );
            println!(
                "coordinator certificate fingerprint: {}",
                files.identity.fingerprint()
            );
            Ok(())
        }
        Command::Run(args) => {
            let worker = qmesh_coordinator::leader::become_worker();
            if args.single || worker.is_some() {
                let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
                runtime.block_on(run(*args, worker, log_fixed))
            } else {
                lead(&args)
            }
        }
        Command::Token {
            command: TokenCommand::Create { name, ttl, place },
        } => {
            let dir = place.state_dir()?;
            let key = token_key(&dir)?;
            let token = key.create(&name, ttl.into())?;
            println!("{token}");
            eprintln!(
                "one-use token for {name}, valid for {ttl}; the client joins once with: qmesh --token <token> --name {} …",
                if name.contains(['*', '?']) { "NAME" } else { &name }
            );
            Ok(())
        }
        Command::Revoke {
            name,
            fingerprint,
            place,
        } => admin(
            &place,
            qmesh_coordinator::admin::Request::Revoke { name, fingerprint },
        ),
        Command::Policy {
            command: PolicyCommand::Check { config },
        } => match qmesh_coordinator::file::check_file(&config) {
            Ok(checked) => {
                match &checked.policy {
                    Some(p) => println!("{}: ok, {} policy rule(s)", config.display(), p.len()),
                    None => println!(
                        "{}: ok, no [policy] table (everything is allowed)",
                        config.display()
                    ),
                }
                Ok(())
            }
            Err(errors) => {
                for e in &errors {
                    eprintln!("error: {e}");
                }
                bail!("{} error(s) in {}", errors.len(), config.display())
            }
        },
        Command::Policy {
            command: PolicyCommand::Reload { place },
        } => admin(&place, qmesh_coordinator::admin::Request::Reload),
        Command::Info(ask) => ask.send(Request::Info),
        Command::Clients(ask) => ask.send(Request::Clients),
        Command::Channels(ask) => ask.send(Request::Channels),
        Command::Events(ask) => ask.send(Request::Events),
        Command::Kick { name, reason, ask } => ask.send(Request::Kick { name, reason }),
        Command::Reload(ask) => ask.send(Request::Reload),
        Command::Quit(ask) => ask.send(Request::Quit),
        Command::RestartWorker { binary, ask } => ask.send(Request::RestartWorker { binary }),
        Command::Stop(ask) => ask.send(Request::Stop),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(
                shell,
                &mut command,
                "qmesh-coordinator",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

impl Ask {
    /// Send `request` and print the answer: its lines, or with `--json`
    /// one JSON document (`{"ok": …, "lines": […], "data": …}`). A
    /// coordinator that does not answer is one line on stderr and
    /// status 1.
    fn send(&self, request: Request) -> Result<()> {
        let reply = match ask(&self.place, &request) {
            Ok(reply) => reply,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&reply)?);
        } else {
            for line in &reply.lines {
                if reply.ok {
                    println!("{line}");
                } else {
                    eprintln!("{line}");
                }
            }
        }
        if !reply.ok {
            std::process::exit(1);
        }
        Ok(())
    }
}

/// Send one admin request to the coordinator `place` names.
fn ask(place: &Place, request: &Request) -> Result<qmesh_coordinator::admin::Reply> {
    let dir = place.state_dir()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(qmesh_coordinator::admin::request(&dir, request))
}

/// Send one admin request and print the reply.
fn admin(place: &Place, request: qmesh_coordinator::admin::Request) -> Result<()> {
    let dir = place.state_dir()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let reply = runtime.block_on(qmesh_coordinator::admin::request(&dir, &request))?;
    for line in &reply.lines {
        if reply.ok {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    }
    if !reply.ok {
        bail!("the coordinator did not do it (see above)");
    }
    Ok(())
}

impl From<&RunArgs> for Flags {
    fn from(args: &RunArgs) -> Self {
        Flags {
            config: args.config.clone(),
            listen: args.listen.clone(),
            cert: args.cert.clone(),
            key: args.key.clone(),
            state_dir: args.state_dir.clone(),
            auth: args.auth,
            client_ca: args.client_ca.clone(),
            cert_ttl: args.cert_ttl.map(Duration::from),
            idle_timeout: args.idle_timeout.map(Duration::from_secs),
            drain: args.drain.map(Duration::from),
            max_clients: args.max_clients,
            max_channels_per_client: args.max_channels_per_client,
            bytes_per_second: args.bytes_per_second,
            messages_per_second: args.messages_per_second,
            http: args.http,
            http_token_file: args.http_token_file.clone(),
            acme: args.acme.clone(),
            acme_directory: args.acme_directory.clone(),
            acme_contact: args.acme_contact.clone(),
            acme_ca: args.acme_ca.clone(),
            acme_http: args.acme_http,
            acme_retry: args.acme_retry.map(Duration::from),
        }
    }
}

/// With `--etcd`: join the cluster, and say so in a line for the banner.
#[cfg(feature = "etcd")]
async fn join_cluster(
    args: &RunArgs,
    listener: &Listener,
    config: &mut qmesh_coordinator::config::Config,
) -> Result<Option<String>> {
    use qmesh_coordinator::cluster::{ClusterSettings, EtcdDirectory};
    if args.etcd.is_empty() {
        return Ok(None);
    }
    let peers = args
        .peer_listen
        .unwrap_or_else(|| std::net::SocketAddr::new(listener.local_addr().ip(), 0));
    if peers.ip().is_unspecified() {
        bail!(
            "the member link would listen on {peers}, which the other members cannot dial: give \
             --peer-listen an address they reach, e.g. --peer-listen 10.0.0.5:7448"
        );
    }
    let link = Listener::bind(peers).with_context(|| {
        format!("binding the member link endpoint on {peers}: choose another with --peer-listen")
    })?;
    let directory = EtcdDirectory::join(ClusterSettings {
        endpoints: args.etcd.clone(),
        cluster: args.cluster.clone(),
        lease_ttl: args.etcd_lease_ttl.into(),
        clients: listener.local_addr(),
        link: Some((link.local_addr(), config.identity.fingerprint())),
    })
    .await?;
    let line = format!(
        "cluster {}: member {} (directory: etcd at {}; member link on quic/{})",
        args.cluster,
        directory.id(),
        args.etcd.join(", "),
        link.local_addr()
    );
    config.directory = std::sync::Arc::new(directory);
    config.link_socket = Some(std::sync::Arc::new(link.socket().try_clone()?));
    Ok(Some(line))
}

/// Without the `etcd` feature, `--etcd` is refused.
#[cfg(not(feature = "etcd"))]
async fn join_cluster(
    args: &RunArgs,
    _listener: &Listener,
    _config: &mut qmesh_coordinator::config::Config,
) -> Result<Option<String>> {
    if args.etcd.is_empty() {
        return Ok(None);
    }
    bail!(
        "this qmesh-coordinator was built without the `etcd` feature, so it cannot join a \
         cluster: build it with its default features (which need protoc)"
    )
}

/// Bind the coordinator's port, with what to do when it is taken.
fn bind(addr: std::net::SocketAddr) -> Result<Listener> {
    Listener::bind(addr).map_err(|e| match &e {
        BindError::Socket { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
            anyhow::anyhow!(
                "{e}; another program has this port: stop it, or choose another port with --listen"
            )
        }
        _ => e.into(),
    })
}

/// The leader: bind the port, check the settings, then run workers
/// (`qmesh_coordinator::leader`). Exits with the last worker's status.
fn lead(args: &RunArgs) -> Result<()> {
    // One thread: a worker's "stop with my parent" follows the thread
    // that started it, which must live as long as the leader.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let code = runtime.block_on(async {
        let settings = settings::read(&Flags::from(args))?;
        let listener = bind(settings.listen)?;
        // Held until this process exits; the workers run inside the hold.
        let _lock = qmesh_coordinator::statelock::hold(&settings.state_dir)?;
        // Errors in the certificate or auth files stop here, once, rather
        // than in a worker that would die at every start. An ACME
        // certificate is the worker's to get.
        if !matches!(settings.cert, CertSource::Acme(_)) {
            settings.load()?;
        }
        let leader = qmesh_coordinator::leader::Leader {
            binary: std::env::current_exe().context("finding this program")?,
            args: std::env::args_os().skip(1).collect(),
            socket: listener
                .socket()
                .try_clone()
                .context("sharing the socket")?,
            state_dir: settings.state_dir.clone(),
            crashes: qmesh_coordinator::leader::Crashes::new(
                args.crash_window.into(),
                args.max_crashes,
            ),
        };
        leader.run().await
    })?;
    drop(runtime);
    std::process::exit(code)
}

async fn run(
    args: RunArgs,
    worker: Option<qmesh_coordinator::config::WorkerOf>,
    log_fixed: bool,
) -> Result<()> {
    let settings = settings::read(&Flags::from(&args))?;
    // The port first: a coordinator that cannot listen writes nothing to
    // its state directory (no development CA, no auth files). A worker
    // takes the socket its leader bound.
    let listener = match &worker {
        Some(_) => Listener::from_socket(qmesh_coordinator::leader::inherited_socket()?)?,
        None => bind(settings.listen)?,
    };
    // A worker runs inside its leader's hold on the state directory; a
    // coordinator on its own (--single) holds the directory itself, before
    // it reads or writes anything there.
    let _lock = match &worker {
        Some(_) => None,
        None => Some(qmesh_coordinator::statelock::hold(&settings.state_dir)?),
    };
    // An ACME certificate: the kept one, or one ordered now (until one
    // arrives; nothing is served before).
    let acme = match &settings.cert {
        CertSource::Acme(acme) => {
            let acme = qmesh_coordinator::acme::Acme::new(acme.clone(), &settings.state_dir);
            acme.serve_challenges().await?;
            acme.first_certificate().await;
            Some(acme)
        }
        _ => None,
    };
    let (mut config, ca_note) = settings.load()?;
    config.worker = worker;
    // The file's log filter, unless --log or RUST_LOG chose one.
    if let (false, Some(path)) = (log_fixed, &settings.config_file) {
        if let Some(filter) = qmesh_coordinator::file::check_file(path)
            .ok()
            .and_then(|c| c.file.log)
        {
            if let Err(e) = logging::set_filter(&filter) {
                tracing::warn!(cause = %e, "the file's log filter is not used");
            }
        }
    }
    let mode = settings.auth.mode();
    let dir = &settings.state_dir;
    let policy_rules = settings.policy.as_ref().map(|p| p.len());
    let cluster = join_cluster(&args, &listener, &mut config).await?;
    let coordinator = Coordinator::on(listener, config)?;
    let control = coordinator.control();
    control.set_source(settings::Source {
        flags: Flags::from(&args),
        settings: settings.clone(),
        log_fixed,
    });
    // Install the signal handlers before saying we are up, so that a
    // SIGTERM sent right after the listening line still stops us cleanly.
    let stops = stop_signals()?;
    reload_on_hangup(control.clone())?;
    if let Some(acme) = acme {
        let control = control.clone();
        tokio::spawn(acme.renew(move || control.reload_certificate().map(|_| ())));
    }
    if let Some(every) = args.reload_certs_every {
        let control = control.clone();
        let every: Duration = every.into();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = control.reload_certificate() {
                    tracing::warn!(cause = %e, "the certificate files cannot be read; new handshakes keep the certificate in force");
                }
            }
        });
    }
    say(format_args!(
        "qmesh-coordinator listening on quic/{}",
        coordinator.local_addr()
    ));
    say(format_args!("auth mode: {mode}"));
    if let Some(line) = &cluster {
        say(format_args!("{line}"));
    }
    match mode {
        AuthMode::Open => {
            say_err(format_args!(
                "WARNING: auth mode is open: any client with any certificate may join under any \
                 free name. Use it for development only; deploy with --auth token or --auth ca."
            ));
            tracing::warn!("auth mode open: for development only");
        }
        AuthMode::Token => say(format_args!(
            "token mode: enroll clients with `qmesh-coordinator token create --name NAME --state-dir {}`",
            display_path(dir)
        )),
        AuthMode::Ca => {}
    }
    match policy_rules {
        Some(n) => say(format_args!(
            "access policy: {n} rule(s); reload with SIGHUP or `qmesh-coordinator policy reload`"
        )),
        None => say(format_args!(
            "access policy: none (every client may open every channel)"
        )),
    }
    if let Some(ca) = &ca_note {
        say(format_args!(
            "clients need the CA file: {}",
            display_path(ca)
        ));
        say(format_args!(
            "  e.g. qmesh --ca {} --name alice listen chat",
            display_path(ca)
        ));
    }
    let (first, second) = (stops.clone(), stops);
    coordinator
        .run_draining(
            async move {
                let _ = first.clone().wait_for(|n| *n >= 1).await;
            },
            async move {
                let _ = second.clone().wait_for(|n| *n >= 2).await;
            },
        )
        .await;
    if control.restart_asked() {
        std::process::exit(qmesh_coordinator::leader::RESTART_EXIT);
    }
    Ok(())
}

/// One line of the start banner on standard output. The banner is for
/// whoever started the coordinator; if they have stopped reading (a closed
/// pipe), the coordinator serves on, so a failed write is ignored rather
/// than panicking as `println!` would.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line).and_then(|()| out.write_all(b"\n"));
    let _ = out.flush();
}

/// As [`say`], on standard error.
fn say_err(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Reload the whole config file on SIGHUP.
fn reload_on_hangup(control: qmesh_coordinator::server::Control) -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config file");
                // Errors are logged by reload; nothing changes then.
                let _ = control.reload();
            }
        });
    }
    #[cfg(not(unix))]
    let _ = control;
    Ok(())
}

fn display_path(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_owned())
        .display()
        .to_string()
}

/// How many SIGINTs and SIGTERMs have arrived: the first starts a drain,
/// the second stops at once. The handlers are installed when this returns.
fn stop_signals() -> Result<tokio::sync::watch::Receiver<u32>> {
    let (count, seen) = tokio::sync::watch::channel(0u32);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                count.send_modify(|n| *n += 1);
                tracing::info!(signals = *count.borrow(), "stop signal received");
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            count.send_modify(|n| *n += 1);
            tracing::info!(signals = *count.borrow(), "stop signal received");
        }
    });
    Ok(seen)
}
