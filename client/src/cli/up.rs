//! `qmesh up`: the agent. One process, one identity, every route in a TOML
//! file; SIGHUP (or `qmesh up --reload`) applies the file again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use qmesh_client::agent_config::{self, AgentConfig, RouteId};
use qmesh_client::forward::{Endpoint, Expose, Exposer, Forward, Stop, Stopper};
use qmesh_client::{Address, Client};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::metrics::AgentMetrics;
use super::Cli;

/// Read and check the agent's file; every error, with its line, in one
/// message.
fn load(path: &Path) -> Result<AgentConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the agent's file {}", path.display()))?;
    agent_config::parse(&text).map_err(|errors| {
        let lines: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {e}", path.display()))
            .collect();
        anyhow!(
            "{} error{} in {}:\n{}",
            errors.len(),
            if errors.len() == 1 { "" } else { "s" },
            path.display(),
            lines.join("\n")
        )
    })
}

/// `qmesh up --check FILE`: report every error, or what the file holds.
pub(crate) fn check(path: &Path) -> Result<()> {
    let config = load(path)?;
    println!(
        "{}: ok: {} as {}, {} exposed, {} forwarded",
        path.display(),
        config.coordinator,
        config.name,
        config.expose.len(),
        config.forward.len()
    );
    Ok(())
}

/// Where the running agent of `name` keeps its process id.
fn pid_file(cli: &Cli, name: &str) -> PathBuf {
    cli.state_dir
        .clone()
        .unwrap_or_else(super::default_state_dir)
        .join(format!("{name}.agent.pid"))
}

/// `qmesh up --reload --config FILE`: tell the agent running for the
/// file's name to apply its file again.
pub(crate) fn reload(cli: &Cli, path: &Path) -> Result<()> {
    let config = load(path)?;
    let pid_path = pid_file(cli, &config.name);
    let pid = std::fs::read_to_string(&pid_path).with_context(|| {
        format!(
            "no agent for {} seems to run (reading {})",
            config.name,
            pid_path.display()
        )
    })?;
    let pid = pid.trim();
    let status = std::process::Command::new("kill")
        .args(["-HUP", pid])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!(
            "the agent for {} (process {pid}, from {}) is not running; start it with qmesh up --config {}",
            config.name,
            pid_path.display(),
            path.display()
        );
    }
    println!(
        "asked the agent for {} (process {pid}) to reload {}",
        config.name,
        path.display()
    );
    Ok(())
}

fn expose_of(name: &str, e: &agent_config::Expose) -> Result<Expose> {
    let target = Endpoint::from_address(&e.target).map_err(|e| anyhow!("expose.{name}: {e}"))?;
    let mut expose = Expose::new(name, target);
    expose.allow = e.allow.clone();
    expose.max_connections = e.max_connections;
    expose.udp_idle = e.udp_idle;
    Ok(expose)
}

fn forward_of(name: &str, f: &agent_config::Forward) -> Result<Forward> {
    let listen = Endpoint::from_address(&f.listen).map_err(|e| anyhow!("forward.{name}: {e}"))?;
    let to = Address::mesh_channel(&f.to_peer, &f.to_channel)
        .map_err(|e| anyhow!("forward.{name}: {e}"))?;
    let mut forward = Forward::new(name, listen, to);
    forward.mode = f.mode;
    forward.max_connections = f.max_connections;
    forward.udp_idle = f.udp_idle;
    Ok(forward)
}

/// A running forward.
struct Running {
    stopper: Stopper,
    task: JoinHandle<()>,
}

/// The route's name in `/metrics`: `expose.NAME` or `forward.NAME`, as in
/// the file.
fn route_label(id: RouteId) -> String {
    id.to_string()
}

fn start(client: &Client, forward: Forward, metrics: &AgentMetrics) -> Running {
    let (stopper, stop): (Stopper, Stop) = Stopper::new();
    let name = forward.name.clone();
    let stats = metrics.route(&route_label(RouteId::Forward(name.clone())));
    let client = client.clone();
    let task = tokio::spawn(async move {
        let report = |line| println!("{line}");
        if let Err(e) = forward.run_counted(client, stop, report, stats).await {
            error!(route = %name, "forward.{name} stopped: {e}");
        }
    });
    Running { stopper, task }
}

/// The agent's routes as they run now.
struct Agent {
    path: PathBuf,
    config: AgentConfig,
    client: Client,
    exposer: Exposer,
    forwards: HashMap<String, Running>,
    metrics: Arc<AgentMetrics>,
}

impl Agent {
    /// Apply the file again. A file with any error, or one that changes
    /// the identity, changes nothing.
    async fn reload(&mut self) {
        let new = match load(&self.path) {
            Ok(c) => c,
            Err(e) => {
                // One line, so a log reader sees every error with the cause.
                let all = format!("{e:#}").replace('\n', "; ");
                error!("reload refused, nothing changed: {all}");
                return;
            }
        };
        let changes = agent_config::diff(&self.config, &new);
        if changes.identity_changed {
            error!("reload refused, nothing changed: the coordinator, name or ca changed; restart the agent to use them");
            return;
        }
        // Build every new route first: an error here also changes nothing.
        let mut exposes = Vec::new();
        let mut forwards = Vec::new();
        for id in changes.added.iter().chain(&changes.changed) {
            let built = match id {
                RouteId::Expose(n) => expose_of(n, &new.expose[n]).map(|e| exposes.push(e)),
                RouteId::Forward(n) => forward_of(n, &new.forward[n]).map(|f| forwards.push(f)),
            };
            if let Err(e) = built {
                error!("reload refused, nothing changed: {e:#}");
                return;
            }
        }
        let grace = new.grace;
        let mut interfaces_changed = false;
        for id in &changes.removed {
            self.metrics.remove(&route_label(id.clone()));
        }
        for id in changes.removed.iter().chain(&changes.changed) {
            match id {
                RouteId::Expose(n) => {
                    self.exposer.remove(n, grace);
                    interfaces_changed = true;
                }
                RouteId::Forward(n) => {
                    if let Some(old) = self.forwards.remove(n) {
                        old.stopper.stop(grace);
                        // Its listener is closed once its task ends.
                        let _ = old.task.await;
                    }
                }
            }
        }
        for e in exposes {
            add_expose(&self.exposer, e, &self.metrics);
            interfaces_changed = true;
        }
        for f in forwards {
            let name = f.name.clone();
            self.forwards
                .insert(name, start(&self.client, f, &self.metrics));
        }
        if interfaces_changed {
            if let Err(e) = self.client.set_interfaces(self.exposer.interfaces()).await {
                warn!(cause = %e, "offering the new interface list failed");
            }
        }
        info!(
            added = changes.added.len(),
            removed = changes.removed.len(),
            changed = changes.changed.len(),
            kept = changes.kept.len(),
            "reloaded {}",
            self.path.display()
        );
        println!(
            "reloaded: {} added, {} removed, {} changed, {} kept",
            changes.added.len(),
            changes.removed.len(),
            changes.changed.len(),
            changes.kept.len()
        );
        self.config = new;
    }
}

/// Serve `expose`, counting its traffic under its route's name.
fn add_expose(exposer: &Exposer, expose: Expose, metrics: &AgentMetrics) {
    let stats = metrics.route(&route_label(RouteId::Expose(expose.name.clone())));
    exposer.add_counted(expose, stats);
}

/// Removes the pid file when the agent ends.
struct PidFile(PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `qmesh up --config FILE`: run every route until interrupted; with
/// `http`, serve `/metrics` there.
pub(crate) async fn run(cli: &mut Cli, path: &Path, http: Option<SocketAddr>) -> Result<()> {
    let config = load(path)?;
    // Bound first: a taken port or a wrong address fails before the
    // session starts.
    let listener = match http {
        Some(addr) => Some(super::metrics::bind(addr).await?),
        None => None,
    };
    cli.coordinator = vec![config.coordinator.to_string()];
    cli.name = Some(config.name.clone());
    if config.ca.is_some() {
        cli.ca = config.ca.clone();
        cli.fingerprint = None;
    }
    let mut exposes = Vec::new();
    for (name, e) in &config.expose {
        exposes.push(expose_of(name, e)?);
    }
    let mut forwards = Vec::new();
    for (name, f) in &config.forward {
        forwards.push(forward_of(name, f)?);
    }
    let mut hup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    let metrics = Arc::new(AgentMetrics::default());
    let exposer = Exposer::new(config.name.clone(), []);
    for e in exposes {
        add_expose(&exposer, e, &metrics);
    }
    let client = cli
        .connect_offering(None, exposer.interfaces(), super::Stay::Up)
        .await?;
    let pid_path = pid_file(cli, &config.name);
    std::fs::write(&pid_path, std::process::id().to_string())
        .with_context(|| format!("writing {}", pid_path.display()))?;
    let _pid = PidFile(pid_path);
    let mut agent = Agent {
        path: path.to_owned(),
        client: client.clone(),
        exposer: exposer.clone(),
        forwards: HashMap::new(),
        metrics: metrics.clone(),
        config,
    };
    for f in forwards {
        let name = f.name.clone();
        agent.forwards.insert(name, start(&client, f, &metrics));
    }
    println!(
        "agent {} up: {} exposed, {} forwarded",
        agent.config.name,
        agent.config.expose.len(),
        agent.forwards.len()
    );
    if let Some(listener) = listener {
        let at = listener.local_addr().context("the metrics listener")?;
        super::metrics::serve(listener, metrics);
        println!("metrics at http://{at}/metrics");
    }
    let serving = exposer.run(&client);
    tokio::pin!(serving);
    let signal = loop {
        tokio::select! {
            () = &mut serving => bail!("the session ended: {}", client.closed().await),
            _ = hup.recv() => agent.reload().await,
            signal = super::signals::requested() => break signal,
        }
    };
    client.close(&super::signals::reason(signal)).await;
    Ok(())
}
