//! The `qmesh` command line: argument parsing and the subcommands.

mod demo;
mod listen;
mod send;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use qmesh_client::{Client, ClientConfig, Fingerprint};

/// First message of a stream of text lines.
pub(crate) const TEXT_STREAM: &[u8] = b"qmesh-text/1";
/// First message of a file stream: this, then `\n<name>\n<size>`.
pub(crate) const FILE_STREAM: &[u8] = b"qmesh-file/1";
/// Bytes of file data per message.
pub(crate) const FILE_CHUNK: usize = 1024 * 1024;

/// Talk to peers over a qmesh coordinator.
#[derive(Debug, Parser)]
#[command(name = "qmesh", version)]
pub(crate) struct Cli {
    /// The coordinator, as a connpipe address.
    #[arg(
        long,
        global = true,
        env = "QMESH_COORDINATOR",
        default_value = "quic/$4:7447"
    )]
    coordinator: String,
    /// This client's name (1-64 of a-z 0-9 . _ -).
    #[arg(long, global = true, env = "QMESH_NAME")]
    name: Option<String>,
    /// PEM file of the CA that issued the coordinator's certificate.
    #[arg(long, global = true, env = "QMESH_CA")]
    ca: Option<PathBuf>,
    /// Trust exactly the coordinator certificate with this SHA-256
    /// fingerprint instead of a CA.
    #[arg(long, global = true, env = "QMESH_FINGERPRINT", conflicts_with = "ca")]
    fingerprint: Option<String>,
    /// Seconds without hearing from the coordinator before the session is
    /// reported lost.
    #[arg(long, global = true, default_value_t = 30)]
    idle_timeout: u64,
    /// Log filter, e.g. `info` or `debug` (else RUST_LOG).
    #[arg(long, global = true)]
    pub(crate) log: Option<String>,
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
    },
    /// Run a coordinator and two clients in this process and show a channel
    /// at work.
    Demo,
}

impl Cli {
    fn config(&self, default_name: Option<String>) -> Result<ClientConfig> {
        let coordinator = self
            .coordinator
            .parse()
            .with_context(|| format!("--coordinator {:?}", self.coordinator))?;
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
            (None, None) => bail!(
                "say how to trust the coordinator: --ca FILE (the CA file the coordinator \
                 printed at start) or --fingerprint sha256:..."
            ),
        };
        Ok(ClientConfig::new(coordinator, name, trust)
            .with_idle_timeout(std::time::Duration::from_secs(self.idle_timeout.max(1))))
    }

    async fn connect(&self, default_name: Option<String>) -> Result<Client> {
        let config = self.config(default_name)?;
        let what = format!("connecting to {} as {}", config.coordinator, config.name);
        Client::connect(config).await.context(what)
    }
}

/// Run the parsed command.
pub(crate) async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Listen { channel, out } => {
            let client = cli.connect(None).await?;
            listen::run(client, channel, out.clone()).await
        }
        Command::Send { address, file } => {
            let client = cli
                .connect(Some(format!("send-{}", std::process::id())))
                .await?;
            send::run(client, address, file.clone()).await
        }
        Command::Demo => demo::run().await,
    }
}
