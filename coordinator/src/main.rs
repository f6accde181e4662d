//! `qmesh-coordinator`: run a qmesh coordinator, or make its certificates.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use qmesh_certs::Identity;
use qmesh_coordinator::devcert::{dev_identity, write_certs};
use qmesh_coordinator::{logging, Config, Coordinator};
use qmesh_proto::Address;

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
    Run {
        /// Where to listen, as a connpipe address.
        #[arg(long, default_value = "quic/*4:7447")]
        listen: String,
        /// Coordinator certificate (PEM). Without it a development
        /// certificate is made in the state directory.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Coordinator private key (PEM).
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Directory for the development CA and certificate.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Seconds without hearing from a client before its session (and
        /// every channel it had) is reported lost.
        #[arg(long, default_value_t = 30)]
        idle_timeout: u64,
        /// Most clients connected at once; the next is refused as full.
        #[arg(long)]
        max_clients: Option<usize>,
        /// Most channels one client may be part of at once.
        #[arg(long, default_value_t = 1024)]
        max_channels_per_client: usize,
    },
}

/// Limits of `run`.
struct Limits {
    max_clients: Option<usize>,
    max_channels_per_client: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log.as_deref());
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
        Command::Run {
            listen,
            cert,
            key,
            state_dir,
            idle_timeout,
            max_clients,
            max_channels_per_client,
        } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let limits = Limits {
                max_clients,
                max_channels_per_client: max_channels_per_client.max(1),
            };
            runtime.block_on(run(listen, cert, key, state_dir, idle_timeout, limits))
        }
    }
}

fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(dir).join("qmesh-coordinator");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".local/state/qmesh-coordinator");
    }
    PathBuf::from(".qmesh-coordinator")
}

fn listen_addr(listen: &str) -> Result<SocketAddr> {
    let addr: Address = listen.parse().context("parsing --listen")?;
    let (host, port) = addr
        .quic_endpoint()
        .context("--listen must be a quic/ address")?;
    if let Some(ip) = host.to_ip() {
        return Ok(SocketAddr::new(ip, port));
    }
    let name = host.to_string();
    let name = if name == "$n" {
        "localhost".to_owned()
    } else {
        name
    };
    match (name.as_str(), port).to_socket_addrs()?.next() {
        Some(a) => Ok(a),
        None => bail!("--listen host {name} does not resolve"),
    }
}

async fn run(
    listen: String,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    idle_timeout: u64,
    limits: Limits,
) -> Result<()> {
    let listen = listen_addr(&listen)?;
    let (identity, ca_note) = match (cert, key) {
        (Some(cert), Some(key)) => {
            let identity = Identity::load(&cert, &key).context("loading --cert/--key")?;
            (identity, None)
        }
        _ => {
            let dir = state_dir.unwrap_or_else(default_state_dir);
            let files = dev_identity(&dir).with_context(|| {
                format!("preparing the development certificate in {}", dir.display())
            })?;
            let verb = if files.created { "created" } else { "reusing" };
            tracing::info!(state_dir = %dir.display(), "{verb} development certificate");
            (files.identity, Some(files.ca_path))
        }
    };
    let mut config = Config::new(identity);
    config.listen = listen;
    config.max_clients = limits.max_clients;
    config.max_channels_per_client = limits.max_channels_per_client;
    config.tuning = config
        .tuning
        .with_idle_timeout(Duration::from_secs(idle_timeout.max(1)));
    let coordinator = Coordinator::bind(config)?;
    // Install the signal handlers before saying we are up, so that a
    // SIGTERM sent right after the listening line still stops us cleanly.
    let shutdown = shutdown_signal()?;
    println!(
        "qmesh-coordinator listening on quic/{}",
        coordinator.local_addr()
    );
    if let Some(ca) = &ca_note {
        println!("clients need the CA file: {}", display_path(ca));
        println!(
            "  e.g. qmesh --ca {} --name alice listen chat",
            display_path(ca)
        );
    }
    coordinator.run(shutdown).await;
    Ok(())
}

fn display_path(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_owned())
        .display()
        .to_string()
}

/// A future that completes on SIGINT or SIGTERM; the handlers are
/// installed when this returns.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("signal received");
        })
    }
}
