//! Operator actions on a running coordinator: revocation, policy reload
//! and the list of connected clients, as [`Control`]. The admin socket and
//! the SIGHUP handler use it; so can a program embedding the coordinator.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use qmesh_certs::Fingerprint;
use qmesh_proto::codes::ConnCode;
use qmesh_proto::Untrusted;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::policy::Policy;
use crate::session::{Event, Session, Shared, Stats};

/// A connected client, for `qmesh-coordinator clients` and the status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Its name.
    pub name: String,
    /// The address its connection comes from.
    pub addr: String,
    /// Seconds since the Unix epoch when it joined.
    pub since: u64,
    /// Channels it is part of (joined or being opened).
    pub channels: usize,
    /// SHA-256 fingerprint of the certificate it presented (hex).
    pub fingerprint: String,
}

/// A joined channel, for `qmesh-coordinator channels` and the status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    /// The channel's number.
    pub number: u64,
    /// The client that opened it.
    pub opener: String,
    /// The client it was opened to.
    pub callee: String,
    /// The channel's name.
    pub name: String,
    /// `relay`, or `direct` when the two sides were introduced for a
    /// direct connection (their streams go there once it is up).
    pub path: String,
    /// Seconds since it was joined.
    pub age_secs: u64,
    /// Payload bytes the coordinator relayed on it, both ways.
    pub bytes: u64,
}

/// The coordinator at a glance, for `qmesh-coordinator info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// The coordinator's version.
    pub version: String,
    /// Seconds since the coordinator (the leader, when there is one)
    /// started.
    pub uptime_secs: u64,
    /// `open`, `token` or `ca`.
    pub auth: String,
    /// The address it listens on.
    pub listen: String,
    /// The process serving clients.
    pub worker_pid: u32,
    /// The leader's process id, when there is a leader.
    pub leader_pid: Option<u32>,
    /// Workers the leader started before this one.
    pub worker_restarts: u64,
    /// Clients connected now.
    pub clients: usize,
    /// Joined channels now, by path (`relay`, `direct`).
    pub channels: BTreeMap<String, usize>,
    /// Payload bytes relayed since this worker started.
    pub bytes_relayed: u64,
    /// Data streams and pipes relayed since this worker started.
    pub streams_relayed: u64,
    /// Sessions admitted since this worker started.
    pub sessions_admitted: u64,
    /// Hellos refused since this worker started.
    pub hellos_refused: u64,
    /// The certificate new handshakes get.
    #[serde(default)]
    pub certificate: Option<crate::tls::CertSummary>,
    /// The cluster, when this coordinator is a member of one (`--etcd`):
    /// its members and where each client is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::directory::ClusterView>,
    /// The live member links to the other members of the cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<crate::link::LinkInfo>,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What `revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Certificates newly added to the revocation list.
    pub certificates: usize,
    /// Whether a connected session was closed.
    pub disconnected: bool,
}

/// Operator actions on a running coordinator: revocation and policy
/// reload. The admin socket and the SIGHUP handler use it; so can a
/// program embedding the coordinator.
#[derive(Debug, Clone)]
pub struct Control(pub(crate) Arc<Shared>);

impl Control {
    /// Revoke every certificate `name` holds (its session's, and in `token`
    /// mode every unexpired one issued for it) and close its session with
    /// `ConnCode::Revoked`.
    pub fn revoke(&self, name: &str) -> Revoked {
        let auth = &self.0.config.auth;
        let session = self.0.registry().lookup(name).cloned();
        let mut fps = auth.issued_for(name);
        fps.extend(session.as_ref().map(|s| s.fingerprint));
        // A client of another member of the cluster: the certificate its
        // name was claimed with.
        fps.extend(self.0.config.directory.fingerprint_elsewhere(name));
        self.publish(fps.iter().map(|fp| (*fp, name.to_owned())).collect());
        let certificates = fps
            .into_iter()
            .filter(|fp| auth.revocations().add(*fp, name))
            .count();
        let disconnected = session.is_some_and(|s| s.close_revoked()) | self.close_all_revoked();
        info!(name, certificates, disconnected, "revoked");
        Revoked {
            certificates,
            disconnected,
        }
    }

    /// Revoke one certificate by fingerprint and close the session that
    /// holds it, if any.
    pub fn revoke_fingerprint(&self, fp: Fingerprint) -> Revoked {
        let r = self.revoke_here(fp, None);
        let name = self
            .0
            .registry()
            .iter()
            .find(|s| s.fingerprint == fp)
            .map_or_else(|| "-".to_owned(), |s| s.name.clone().into_string());
        self.publish(vec![(fp, name)]);
        r
    }

    /// Tell the other members of the cluster, if any, through the
    /// directory; tried again while it does not answer.
    fn publish(&self, revoked: Vec<(Fingerprint, String)>) {
        if revoked.is_empty() || self.0.config.directory.view().is_none() {
            return;
        }
        let shared = self.0.clone();
        tokio::spawn(async move {
            let mut wait = std::time::Duration::from_millis(200);
            loop {
                match shared.config.directory.publish_revoked(&revoked).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(cause = %e, "the revocation cannot be given to the cluster's directory yet; trying again");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(5));
                    }
                }
            }
        });
    }

    /// Revoke `fp` on this coordinator only (another member revoked it):
    /// add it to the list and close the session that holds it.
    pub(crate) fn revoke_here(&self, fp: Fingerprint, name: Option<&str>) -> Revoked {
        let holder = self
            .0
            .registry()
            .iter()
            .find(|s| s.fingerprint == fp)
            .cloned();
        let name = holder
            .as_ref()
            .map(|s| s.name.clone().into_string())
            .or_else(|| name.map(str::to_owned))
            .unwrap_or_else(|| "-".into());
        let certificates = usize::from(self.0.config.auth.revocations().add(fp, &name));
        let disconnected = holder.is_some_and(|s| s.close_revoked()) | self.close_all_revoked();
        info!(fingerprint = %fp, certificates, disconnected, "revoked");
        Revoked {
            certificates,
            disconnected,
        }
    }

    /// Close every session whose certificate is revoked (one certificate
    /// may hold several names); returns whether any was.
    fn close_all_revoked(&self) -> bool {
        let revoked: Vec<Arc<Session>> = self
            .0
            .registry()
            .iter()
            .filter(|s| self.0.config.auth.revocations().contains(&s.fingerprint))
            .cloned()
            .collect();
        revoked.iter().fold(false, |any, s| s.close_revoked() | any)
    }

    /// Put `policy` in force for opens from now on.
    pub fn set_policy(&self, policy: Policy) {
        *self.0.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.0.policy()
    }

    /// Re-read the policy from the config file after checking it; on any
    /// error the policy in force stays and every error is returned.
    pub fn reload_policy(&self) -> Result<String, Vec<String>> {
        let Some(path) = &self.0.config.config_file else {
            let what = "this coordinator was started without --config, so there is no policy file to reload";
            warn!("policy reload refused: {what}");
            return Err(vec![what.into()]);
        };
        match crate::file::check_file(path) {
            Ok(checked) => {
                let rules = checked.policy.as_ref().map(|p| p.len());
                self.set_policy(checked.policy.unwrap_or_else(Policy::allow_all));
                let what = match rules {
                    Some(n) => format!(
                        "policy reloaded from {}: {n} rules in force",
                        path.display()
                    ),
                    None => format!(
                        "policy reloaded from {}: no [policy] table, everything is allowed",
                        path.display()
                    ),
                };
                info!("{what}");
                Ok(what)
            }
            Err(errors) => {
                for e in &errors {
                    warn!(file = %path.display(), error = %e, "policy reload refused; the old policy stays");
                }
                Err(errors)
            }
        }
    }

    /// The coordinator's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.0.stats.clone()
    }

    /// Names of the connected clients, sorted.
    pub fn clients(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .0
            .registry()
            .iter()
            .map(|s| s.name.clone().into_string())
            .collect();
        names.sort();
        names
    }

    /// Every connected client, sorted by name.
    pub fn client_list(&self) -> Vec<ClientInfo> {
        let sessions: Vec<Arc<Session>> = self.0.registry().iter().cloned().collect();
        let mut list: Vec<ClientInfo> = sessions
            .iter()
            .map(|s| ClientInfo {
                name: s.name.clone().into_string(),
                addr: s.conn.remote_address().to_string(),
                since: unix_secs(s.joined),
                channels: s.slots.load(Ordering::Relaxed),
                fingerprint: s.fingerprint.to_string(),
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Every joined channel, oldest first.
    pub fn channel_list(&self) -> Vec<ChannelInfo> {
        let sessions: Vec<Arc<Session>> = self.0.registry().iter().cloned().collect();
        let mut seen = BTreeMap::new();
        for session in &sessions {
            for side in session.channels().values() {
                let r = &side.record;
                seen.entry(r.number).or_insert_with(|| ChannelInfo {
                    number: r.number,
                    opener: r.opener.clone().into_string(),
                    callee: r.callee.clone().into_string(),
                    name: r.name.clone(),
                    path: if r.direct { "direct" } else { "relay" }.into(),
                    age_secs: r.opened.elapsed().as_secs(),
                    bytes: r.bytes.load(Ordering::Relaxed),
                });
            }
        }
        let mut list: Vec<ChannelInfo> = seen.into_values().collect();
        list.sort_by(|a, b| b.age_secs.cmp(&a.age_secs).then(a.number.cmp(&b.number)));
        list
    }

    /// The coordinator at a glance.
    pub fn info(&self) -> Info {
        let config = &self.0.config;
        let channels = self.channel_list();
        let mut by_path = BTreeMap::from([("direct".to_string(), 0), ("relay".to_string(), 0)]);
        for c in &channels {
            *by_path.entry(c.path.clone()).or_default() += 1;
        }
        let started = config.worker.as_ref().map_or(self.0.started, |w| w.started);
        let stats = &self.0.stats;
        Info {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: started.elapsed().map_or(0, |d| d.as_secs()),
            auth: config.auth.mode().to_string(),
            listen: format!("quic/{}", self.0.local_addr),
            worker_pid: std::process::id(),
            leader_pid: config.worker.as_ref().map(|w| w.leader_pid),
            worker_restarts: config.worker.as_ref().map_or(0, |w| w.restarts),
            clients: self.0.registry().len(),
            channels: by_path,
            bytes_relayed: stats.bytes_relayed.load(Ordering::Relaxed),
            streams_relayed: stats.streams_relayed.load(Ordering::Relaxed),
            sessions_admitted: stats.sessions_admitted.load(Ordering::Relaxed),
            hellos_refused: stats.hellos_refused.load(Ordering::Relaxed),
            certificate: self
                .0
                .cert_summary
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            cluster: self.cluster(),
            links: self.links(),
        }
    }

    /// The live member links, by member id.
    pub fn links(&self) -> Vec<crate::link::LinkInfo> {
        crate::link::links(&self.0)
    }

    /// The cluster as this coordinator's directory sees it; `None` for a
    /// coordinator on its own.
    pub fn cluster(&self) -> Option<crate::directory::ClusterView> {
        self.0.config.directory.view()
    }

    /// The last joins, leaves, kicks and reloads, newest last.
    pub fn events(&self) -> Vec<Event> {
        self.0
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Close `name`'s session with [`ConnCode::Kicked`] and `reason`; the
    /// client may join again (unlike [`Control::revoke`]). Whether a
    /// session was connected under that name.
    pub fn kick(&self, name: &str, reason: &str) -> bool {
        let Some(session) = self.0.registry().lookup(name).cloned() else {
            return false;
        };
        let why = format!("the operator closed this session: {reason}");
        warn!(name = %Untrusted::name(&session.name), reason = %Untrusted::reason(reason), "kicking a client");
        session.close(ConnCode::Kicked, &why);
        self.0.note(
            "kick",
            format!(
                "{} kicked: {}",
                Untrusted::name(&session.name),
                Untrusted::reason(reason)
            ),
        );
        true
    }

    /// Start a drain, as the first SIGTERM does (`quit`); with `at_once`,
    /// stop at once, as the second does (`stop`).
    pub fn stop(&self, at_once: bool) {
        let level = if at_once { 2 } else { 1 };
        self.0.operator_stop.send_modify(|n| *n = (*n).max(level));
    }

    /// Ask the leader for a new worker (from `binary`, when given) once
    /// this one has drained; refused without a leader (`--single`).
    pub fn restart_worker(&self, binary: Option<&std::path::Path>) -> Result<String, String> {
        if self.0.config.worker.is_none() {
            return Err(
                "this coordinator runs with --single: there is no leader to start a new \
                        worker; restart the coordinator instead"
                    .into(),
            );
        }
        if let Some(binary) = binary {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(binary)
                .map_err(|e| format!("cannot use {} as the worker: {e}", binary.display()))?;
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                return Err(format!(
                    "{} is not an executable file; give the path of a qmesh-coordinator binary",
                    binary.display()
                ));
            }
            let Some(dir) = &self.0.config.state_dir else {
                return Err("this coordinator has no state directory to leave the path in".into());
            };
            let path = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_owned());
            std::fs::write(
                crate::leader::next_worker_file(dir),
                path.display().to_string(),
            )
            .map_err(|e| format!("cannot write {}: {e}", dir.display()))?;
        }
        self.0.restart_asked.store(true, Ordering::SeqCst);
        self.0.note("restart", "a new worker was asked for".into());
        Ok(match binary {
            Some(b) => format!(
                "draining; the leader then starts a new worker from {}",
                b.display()
            ),
            None => "draining; the leader then starts a new worker".into(),
        })
    }

    /// Reload the whole config file (see [`crate::reload`]): the lines to
    /// report, or every error (then nothing changed). A coordinator not
    /// started from settings reloads only its policy.
    pub fn reload(&self) -> Result<Vec<String>, Vec<String>> {
        let started_from = self
            .0
            .source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if !started_from {
            return self.reload_policy().map(|line| vec![line]);
        }
        let result = crate::reload::reload(&self.0);
        if let Err(errors) = &result {
            for e in errors {
                warn!(error = %e, "reload refused; nothing changed");
            }
        }
        result
    }

    /// What the coordinator was started from, for a whole-config reload
    /// (without it only the policy reloads).
    pub fn set_source(&self, source: crate::settings::Source) {
        *self.0.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(source.settings.clone());
        *self.0.source.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(source));
    }

    /// Read the certificate files again; new handshakes get the new
    /// certificate when it changed: its fingerprint, or `None`.
    pub fn reload_certificate(&self) -> Result<Option<String>, String> {
        crate::reload::reload_certificate(&self.0)
    }

    /// Whether `restart-worker` was asked for.
    pub fn restart_asked(&self) -> bool {
        self.0.restart_asked.load(Ordering::SeqCst)
    }

    /// Keep an event for the status page (e.g. a reload done outside).
    pub fn note(&self, kind: &str, what: String) {
        self.0.note(kind, what);
    }
}
