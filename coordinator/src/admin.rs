//! The admin socket: `admin.sock` in the state directory, mode 0600.
//!
//! `qmesh-coordinator revoke` and `qmesh-coordinator policy reload` talk to
//! a running coordinator through it. Each connection carries one request
//! line of JSON ([`Request`], at most 4 KiB) and gets one reply line
//! ([`Reply`]). Only the coordinator's user can open the socket.

use std::future::Future;
use std::path::{Path, PathBuf};

use std::os::unix::fs::DirBuilderExt;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use qmesh_proto::Untrusted;

use crate::control::{Control, Revoked};

/// Longest request line read.
const MAX_REQUEST: u64 = 4096;

/// One admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Revoke a client by name, or one certificate by fingerprint.
    Revoke {
        /// The client name.
        name: Option<String>,
        /// A certificate fingerprint (hex SHA-256).
        fingerprint: Option<String>,
    },
    /// Re-read the policy from the config file.
    Reload,
    /// Who is connected (names only).
    Status,
    /// Version, uptime, auth mode, listen address, worker, counts.
    Info,
    /// Every connected client.
    Clients,
    /// Every joined channel.
    Channels,
    /// The last joins, leaves, kicks and reloads.
    Events,
    /// Close a client's session; it may join again.
    Kick {
        /// The client name.
        name: String,
        /// Why, told to the client.
        reason: Option<String>,
    },
    /// Drain, then exit with the status that asks the leader for a new
    /// worker (from `binary`, when given).
    RestartWorker {
        /// The new worker's binary.
        binary: Option<PathBuf>,
    },
    /// Drain, then exit.
    Quit,
    /// Exit at once.
    Stop,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether it was done.
    pub ok: bool,
    /// What happened, or every error.
    pub lines: Vec<String>,
    /// The same as data, for `--json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Reply {
    fn done(lines: Vec<String>) -> Self {
        Reply {
            ok: true,
            lines,
            data: None,
        }
    }

    fn failed(lines: Vec<String>) -> Self {
        Reply {
            ok: false,
            lines,
            data: None,
        }
    }

    fn with<T: Serialize>(mut self, data: &T) -> Self {
        self.data = serde_json::to_value(data).ok();
        self
    }
}

/// A duration in seconds as `3h12m`, `4m05s` or `7s`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn since(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{} ago", age(now.saturating_sub(unix)))
}

fn info_lines(i: &crate::control::Info) -> Vec<String> {
    let channels: Vec<String> = i.channels.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let certificate = match &i.certificate {
        Some(c) => format!(
            "certificate for {} from {}, serial {}, valid until {}",
            c.names.join(", "),
            c.issuer,
            c.serial,
            c.not_after_text()
        ),
        None => "certificate: cannot be read".into(),
    };
    vec![
        format!("version {}", i.version),
        format!("uptime {}", age(i.uptime_secs)),
        format!("auth mode {}", i.auth),
        format!("listening on {}", i.listen),
        match i.leader_pid {
            Some(leader) => format!(
                "worker pid {} (leader pid {leader}), {} worker restart(s)",
                i.worker_pid, i.worker_restarts
            ),
            None => format!("pid {} (--single: no leader)", i.worker_pid),
        },
        format!("clients {}", i.clients),
        format!("channels {}", channels.join(", ")),
        format!(
            "relayed {} bytes on {} streams; {} sessions admitted, {} hellos refused",
            i.bytes_relayed, i.streams_relayed, i.sessions_admitted, i.hellos_refused
        ),
        certificate,
    ]
    .into_iter()
    .chain(i.cluster.iter().flat_map(|c| cluster_lines(c, &i.links)))
    .collect()
}

/// The cluster part of `info`: the members, this one marked, and whether
/// names can be claimed.
fn cluster_lines(
    c: &crate::directory::ClusterView,
    links: &[crate::link::LinkInfo],
) -> Vec<String> {
    let mut lines = vec![format!(
        "cluster {}: member {}, {} member(s), {} name(s) held; directory {}",
        c.cluster,
        c.me,
        c.members.len(),
        c.names.len(),
        if c.available {
            "available"
        } else {
            "UNAVAILABLE: new names are refused until it answers"
        }
    )];
    lines.extend(c.members.iter().map(|m| {
        let held = c.names.iter().filter(|(_, h)| *h == m.id).count();
        format!(
            "  member {}{}  clients at {}  since {}  {held} name(s)",
            m.id,
            if m.id == c.me { " (this one)" } else { "" },
            m.clients,
            since(m.started)
        )
    }));
    lines.push(format!("{} member link(s) up", links.len()));
    lines.extend(links.iter().map(|l| {
        format!(
            "  link to member {} at {}  {} channel(s)  {} group(s) fed  {} bytes sent, {} received",
            l.member, l.addr, l.channels, l.groups, l.sent, l.received
        )
    }));
    lines
}

/// What to do once the reply is on its way.
enum After {
    Nothing,
    Stop {
        at_once: bool,
    },
    /// Drain if the restart was accepted.
    Restart,
}

/// Where the admin socket of a coordinator with state directory `dir` is.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("admin.sock")
}

fn revoked_line(who: &str, r: &Revoked) -> String {
    format!(
        "revoked {who}: {} certificate(s) added to the revocation list, {}",
        r.certificates,
        if r.disconnected {
            "its session was closed"
        } else {
            "no session was connected"
        }
    )
}

fn handle(control: &Control, request: Request) -> (Reply, After) {
    let after = match &request {
        Request::Quit => After::Stop { at_once: false },
        Request::RestartWorker { .. } => After::Restart,
        Request::Stop => After::Stop { at_once: true },
        _ => After::Nothing,
    };
    (answer(control, request), after)
}

fn answer(control: &Control, request: Request) -> Reply {
    match request {
        Request::Revoke {
            name: Some(name),
            fingerprint: None,
        } => {
            let r = control.revoke(&name);
            let mut lines = vec![revoked_line(&name, &r)];
            if r.certificates == 0 && !r.disconnected {
                lines.push(format!(
                    "no certificate is known for {name}: it is not connected and holds no unexpired \
                     issued certificate; revoke its certificate by fingerprint (--fingerprint)"
                ));
            }
            Reply {
                ok: r.certificates > 0 || r.disconnected,
                lines,
                data: None,
            }
        }
        Request::Revoke {
            name: None,
            fingerprint: Some(fp),
        } => match fp.parse() {
            Ok(fp) => {
                let r = control.revoke_fingerprint(fp);
                Reply::done(vec![revoked_line(&format!("certificate {fp}"), &r)])
            }
            Err(e) => Reply::failed(vec![format!("bad fingerprint: {e}")]),
        },
        Request::Revoke { .. } => {
            Reply::failed(vec!["revoke takes a name or a fingerprint".into()])
        }
        Request::Reload => match control.reload() {
            Ok(lines) => Reply::done(lines),
            Err(errors) => {
                let mut lines = vec![format!(
                    "not reloaded ({} error(s)); nothing changed, the policy in force included:",
                    errors.len()
                )];
                lines.extend(errors);
                Reply::failed(lines)
            }
        },
        Request::Status => Reply::done(control.clients()),
        Request::Info => {
            let info = control.info();
            Reply::done(info_lines(&info)).with(&info)
        }
        Request::Clients => {
            let list = control.client_list();
            let mut lines = vec![format!("{} client(s)", list.len())];
            lines.extend(list.iter().map(|c| {
                format!(
                    "{}  {}  since {}  {} channel(s)  {}",
                    Untrusted::name(&c.name),
                    c.addr,
                    since(c.since),
                    c.channels,
                    c.fingerprint
                )
            }));
            if let Some(cluster) = control.cluster() {
                let elsewhere: Vec<&(String, String)> =
                    cluster.names.iter().filter(|(_, m)| *m != cluster.me).collect();
                lines.push(format!(
                    "{} client(s) on the other members of cluster {}",
                    elsewhere.len(),
                    cluster.cluster
                ));
                lines.extend(elsewhere.iter().map(|(name, member)| {
                    let at = cluster
                        .members
                        .iter()
                        .find(|m| m.id == *member)
                        .map_or("?", |m| m.clients.as_str());
                    format!("{}  on member {member} at {at}", Untrusted::name(name))
                }));
            }
            Reply::done(lines).with(&list)
        }
        Request::Channels => {
            let list = control.channel_list();
            let mut lines = vec![format!("{} channel(s)", list.len())];
            lines.extend(list.iter().map(|c| {
                format!(
                    "#{}  {} > {} ! {}  {}  {}  {} bytes",
                    c.number,
                    Untrusted::name(&c.opener),
                    Untrusted::name(&c.callee),
                    Untrusted::name(&c.name),
                    c.path,
                    age(c.age_secs),
                    c.bytes
                )
            }));
            Reply::done(lines).with(&list)
        }
        Request::Events => {
            let events = control.events();
            let lines = events
                .iter()
                .map(|e| format!("{} {} {}", since(e.at), e.kind, e.what))
                .collect();
            Reply::done(lines).with(&events)
        }
        Request::Kick { name, reason } => {
            let reason = reason.unwrap_or_else(|| "kicked by the operator".into());
            if control.kick(&name, &reason) {
                Reply::done(vec![format!(
                    "closed {}'s session ({reason}); it may join again",
                    Untrusted::name(&name)
                )])
            } else {
                Reply::failed(vec![format!(
                    "no client named {} is connected",
                    Untrusted::name(&name)
                )])
            }
        }
        Request::Quit => Reply::done(vec![
            "draining: live channels may finish within the drain deadline, then the coordinator exits".into(),
        ]),
        Request::Stop => Reply::done(vec!["stopping at once".into()]),
        Request::RestartWorker { binary } => match control.restart_worker(binary.as_deref()) {
            Ok(line) => Reply::done(vec![line]),
            Err(why) => Reply::failed(vec![why]),
        },
    }
}

async fn serve_one(control: Control, stream: tokio::net::UnixStream) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        BufReader::new(read.take(MAX_REQUEST)).read_line(&mut line),
    )
    .await
    .context("no request line within 5 s")??;
    let (reply, after) = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => {
            info!(request = ?req, "admin request");
            handle(&control, req)
        }
        Err(e) => (
            Reply::failed(vec![format!("not a request: {e}")]),
            After::Nothing,
        ),
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    let written = async {
        write.write_all(&out).await?;
        write.shutdown().await
    }
    .await;
    match after {
        After::Stop { at_once } => control.stop(at_once),
        After::Restart if reply.ok => control.stop(false),
        _ => {}
    }
    written?;
    Ok(())
}

/// The admin socket, bound: commands can reach the coordinator as soon
/// as this returns (they wait in the backlog until it is served).
#[derive(Debug)]
pub struct Bound {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
}

/// Bind the admin socket in `dir` and return the task that serves it until
/// `cancel`.
pub fn listen(
    dir: &Path,
    control: Control,
    cancel: CancellationToken,
) -> Result<impl Future<Output = ()>> {
    serve(bind(dir)?, control, cancel)
}

/// Bind the admin socket in `dir` (mode 0600, the directory 0700 when
/// made here); refused when another coordinator answers on it.
pub fn bind(dir: &Path) -> Result<Bound> {
    let path = socket_path(dir);
    if !dir.exists() {
        // Owner only: the socket, keys and lists live here.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            bail!(
                "{} is in use: another coordinator runs with this state directory",
                path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    debug!(socket = %path.display(), "admin socket ready");
    Ok(Bound { listener, path })
}

/// Serve a bound admin socket until `cancel`, then remove it.
pub fn serve(
    bound: Bound,
    control: Control,
    cancel: CancellationToken,
) -> Result<impl Future<Output = ()>> {
    let Bound { listener, path } = bound;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("serving {}", path.display()))?;
    let listener = tokio::net::UnixListener::from_std(listener)
        .with_context(|| format!("serving {}", path.display()))?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let control = control.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve_one(control, stream).await {
                                warn!(cause = %e, "admin request failed");
                            }
                        });
                    }
                    Err(e) => {
                        warn!(cause = %e, "admin socket accept failed");
                        break;
                    }
                },
            }
        }
        let _ = std::fs::remove_file(&path);
    })
}

/// Send `request` to the coordinator running with state directory `dir`.
pub async fn request(dir: &Path, request: &Request) -> Result<Reply> {
    let path = socket_path(dir);
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .with_context(|| {
            format!(
                "no coordinator answers on {}; is it running with --state-dir {}?",
                path.display(),
                dir.display()
            )
        })?;
    let (read, mut write) = stream.into_split();
    let mut out = serde_json::to_vec(request)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await?;
    let mut line = String::new();
    BufReader::new(read.take(1024 * 1024))
        .read_line(&mut line)
        .await?;
    serde_json::from_str(line.trim())
        .with_context(|| format!("the coordinator's reply is not understood: {line:?}"))
}
