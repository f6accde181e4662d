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
    /// Who is connected.
    Status,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether it was done.
    pub ok: bool,
    /// What happened, or every error.
    pub lines: Vec<String>,
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

fn handle(control: &Control, request: Request) -> Reply {
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
            }
        }
        Request::Revoke {
            name: None,
            fingerprint: Some(fp),
        } => match fp.parse() {
            Ok(fp) => {
                let r = control.revoke_fingerprint(fp);
                Reply {
                    ok: true,
                    lines: vec![revoked_line(&format!("certificate {fp}"), &r)],
                }
            }
            Err(e) => Reply {
                ok: false,
                lines: vec![format!("bad fingerprint: {e}")],
            },
        },
        Request::Revoke { .. } => Reply {
            ok: false,
            lines: vec!["revoke takes a name or a fingerprint".into()],
        },
        Request::Reload => match control.reload_policy() {
            Ok(line) => Reply {
                ok: true,
                lines: vec![line],
            },
            Err(errors) => {
                let mut lines = vec![format!(
                    "policy not reloaded ({} error(s)); the policy in force is unchanged:",
                    errors.len()
                )];
                lines.extend(errors);
                Reply { ok: false, lines }
            }
        },
        Request::Status => Reply {
            ok: true,
            lines: control.clients(),
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
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => {
            info!(request = ?req, "admin request");
            handle(&control, req)
        }
        Err(e) => Reply {
            ok: false,
            lines: vec![format!("not a request: {e}")],
        },
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await?;
    Ok(())
}

/// Bind the admin socket in `dir` and return the task that serves it until
/// `cancel`.
pub fn listen(
    dir: &Path,
    control: Control,
    cancel: CancellationToken,
) -> Result<impl Future<Output = ()>> {
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
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    debug!(socket = %path.display(), "admin socket ready");
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
