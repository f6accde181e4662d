//! Whole-config reload (SIGHUP, `qmesh-coordinator reload`).
//!
//! The file is read and checked first, and every setting resolved with
//! the command line's flags on top as at start; any error changes nothing
//! and every error is reported. Then, with sessions and channels going
//! on:
//!
//! - the access policy applies to opens from then on;
//! - the rate limits (`bytes_per_second`, `messages_per_second`, `burst`,
//!   `flood_after`) apply to every session at once, live ones included
//!   (each session's limiter is set to the new rates);
//! - `[groups.NAME]` settings apply to groups made from then on;
//! - `log` sets the log filter at once (unless `--log` was given);
//! - the certificate files (`cert`, `key`) are read again and new
//!   handshakes get the new certificate; live sessions keep theirs.
//!
//! A changed setting that cannot apply live (listen, state_dir, auth,
//! http, idle_timeout, drain and the other limits) is reported as "needs
//! a restart", never dropped silently.

use std::sync::Arc;

use qmesh_certs::Identity;
use tracing::{info, warn};

use crate::policy::Policy;
use crate::session::Shared;
use crate::settings::{resolve, CertSource, Settings};

/// A changed setting that needs a restart: `NAME (OLD → NEW)`.
fn restart_needed(old: &Settings, new: &Settings) -> Vec<String> {
    let mut lines = Vec::new();
    let mut check = |name: &str, a: String, b: String| {
        if a != b {
            lines.push(format!("{name} ({a} → {b})"));
        }
    };
    check("listen", old.listen.to_string(), new.listen.to_string());
    check(
        "state_dir",
        old.state_dir.display().to_string(),
        new.state_dir.display().to_string(),
    );
    check("auth", format!("{:?}", old.auth), format!("{:?}", new.auth));
    check("http", format!("{:?}", old.http), format!("{:?}", new.http));
    check("cert", kind(&old.cert).into(), kind(&new.cert).into());
    if let (CertSource::Acme(a), CertSource::Acme(b)) = (&old.cert, &new.cert) {
        check(
            "acme",
            format!("{:?}", a.domains),
            format!("{:?}", b.domains),
        );
        check("acme directory", a.directory.clone(), b.directory.clone());
        check("acme http", a.http.to_string(), b.http.to_string());
    }
    check(
        "idle_timeout",
        format!("{:?}", old.idle_timeout),
        format!("{:?}", new.idle_timeout),
    );
    check(
        "drain",
        format!("{:?}", old.drain),
        format!("{:?}", new.drain),
    );
    check(
        "max_clients",
        format!("{:?}", old.max_clients),
        format!("{:?}", new.max_clients),
    );
    check(
        "max_channels_per_client",
        format!("{:?}", old.max_channels_per_client),
        format!("{:?}", new.max_channels_per_client),
    );
    check(
        "max_streams_per_channel",
        format!("{:?}", old.max_streams_per_channel),
        format!("{:?}", new.max_streams_per_channel),
    );
    check(
        "max_message_size",
        format!("{:?}", old.max_message),
        format!("{:?}", new.max_message),
    );
    check(
        "max_pending",
        format!("{:?}", old.max_pending),
        format!("{:?}", new.max_pending),
    );
    check(
        "max_pending_per_source",
        format!("{:?}", old.max_pending_per_source),
        format!("{:?}", new.max_pending_per_source),
    );
    check(
        "hello_timeout",
        format!("{:?}", old.hello_timeout),
        format!("{:?}", new.hello_timeout),
    );
    lines
}

fn kind(c: &CertSource) -> &'static str {
    match c {
        CertSource::Files { .. } => "certificate files",
        CertSource::Development => "development certificate",
        CertSource::Acme(_) => "ACME certificate",
    }
}

/// Reload the whole config file: the lines to report, or every error
/// (then nothing changed).
pub(crate) fn reload(shared: &Shared) -> Result<Vec<String>, Vec<String>> {
    let source = shared
        .source
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let Some(source) = source else {
        return Err(vec![
            "this coordinator was not started from settings (an embedded one): only \
             Control::set_policy applies"
                .into(),
        ]);
    };
    let Some(path) = source.settings.config_file.clone() else {
        return Err(vec![
            "this coordinator was started without --config, so there is no file to reload".into(),
        ]);
    };
    let checked = crate::file::check_file(&path)?;
    let old = shared
        .running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| source.settings.clone());
    let new = resolve(&source.flags, Some(&checked), &old.state_dir)
        .map_err(|e| vec![format!("{:#}", anyhow::Error::from(e))])?;
    // Everything that can fail, before anything changes.
    let identity = match new.cert.files(&new.state_dir) {
        Some((cert, key)) => Some(
            Identity::load(&cert, &key)
                .map_err(|e| vec![format!("the certificate files {}: {e}", cert.display())])?,
        ),
        None => None,
    };
    let server = match &identity {
        Some(id) => Some(
            crate::tls::server_config(&shared.config, id)
                .map_err(|e| vec![format!("the new certificate: {e}")])?,
        ),
        None => None,
    };
    let log = match (&checked.file.log, source.log_fixed) {
        (Some(filter), false) => Some(filter.clone()),
        _ => None,
    };

    // Apply.
    let mut lines = vec![format!("reloaded {}", path.display())];
    let rules = new.policy.as_ref().map(|p| p.len());
    *shared.policy.write().unwrap_or_else(|e| e.into_inner()) =
        Arc::new(new.policy.clone().unwrap_or_else(Policy::allow_all));
    lines.push(match rules {
        Some(n) => format!(
            "policy reloaded from {}: {n} rules in force for opens from now on",
            path.display()
        ),
        None => format!(
            "policy reloaded from {}: no [policy] table, everything is allowed",
            path.display()
        ),
    });
    let rate = new
        .config(
            shared.config.identity.clone(),
            crate::auth::Auth::development(),
        )
        .rate;
    *shared.rate.write().unwrap_or_else(|e| e.into_inner()) = rate;
    let live: Vec<_> = shared.registry().iter().cloned().collect();
    for session in &live {
        session.limiter.set(&rate);
    }
    lines.push(format!(
        "rates for every session ({} now, and those admitted from now on): {} bytes/s, {} messages/s",
        live.len(),
        rate.bytes_per_sec
            .map_or("unlimited".into(), |v| v.to_string()),
        rate.messages_per_sec
            .map_or("unlimited".into(), |v| v.to_string())
    ));
    *shared
        .group_config
        .write()
        .unwrap_or_else(|e| e.into_inner()) = new.groups.clone();
    lines.push(format!(
        "groups: {} with settings of their own, for groups made from now on",
        new.groups.len()
    ));
    if let Some(filter) = &log {
        match qmesh_proto::logging::set_filter(filter) {
            Ok(()) => lines.push(format!("log filter: {filter}")),
            Err(e) => lines.push(format!("log filter not changed: {e}")),
        }
    } else if let (Some(filter), true) = (&checked.file.log, source.log_fixed) {
        lines.push(format!(
            "log filter not changed: --log or RUST_LOG chose it at start, so the file's \
             log = {filter:?} is not used"
        ));
    }
    if let (Some(server), Some(id)) = (server, &identity) {
        shared.set_server_config(server);
        *shared
            .current_cert
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(id.fingerprint().to_string());
        *shared
            .cert_summary
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = crate::tls::CertSummary::of(id);
        lines.push(format!(
            "certificate: {} for new handshakes; live sessions keep theirs",
            id.fingerprint()
        ));
    }
    let restart = restart_needed(&old, &new);
    if !restart.is_empty() {
        lines.push(format!(
            "needs a restart (not applied): {}",
            restart.join(", ")
        ));
    }
    for line in &lines {
        info!("{line}");
    }
    if !restart.is_empty() {
        warn!(
            "settings changed that need a restart: {}",
            restart.join(", ")
        );
    }
    shared.note("reload", lines[1..].join("; "));
    *shared.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(new);
    Ok(lines)
}

/// Read the certificate files again and give new handshakes the new
/// certificate when it changed (`--reload-certs-every`): the new
/// fingerprint, or `None` when unchanged.
pub(crate) fn reload_certificate(shared: &Shared) -> Result<Option<String>, String> {
    let files = shared
        .running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|s| s.cert.files(&s.state_dir));
    let Some((cert, key)) = files else {
        return Ok(None);
    };
    let id = Identity::load(&cert, &key).map_err(|e| format!("{}: {e}", cert.display()))?;
    let fp = id.fingerprint().to_string();
    let mut current = shared
        .current_cert
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if current.as_deref() == Some(fp.as_str()) {
        return Ok(None);
    }
    let server = crate::tls::server_config(&shared.config, &id).map_err(|e| e.to_string())?;
    shared.set_server_config(server);
    *current = Some(fp.clone());
    *shared
        .cert_summary
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = crate::tls::CertSummary::of(&id);
    info!(fingerprint = %fp, "certificate reloaded for new handshakes");
    shared.note("reload", format!("certificate {fp} for new handshakes"));
    Ok(Some(fp))
}
