//! The coordinator's TOML config file (`qmesh-coordinator run --config`).
//!
//! ```toml
//! listen = "quic/*4:7447"
//! state_dir = "/var/lib/qmesh-coordinator"
//! cert = "coordinator.pem"          # relative to this file
//! key = "coordinator-key.pem"
//! drain = "10s"                     # live channels' time after SIGTERM
//! http = "127.0.0.1:9464"           # /metrics and the status page
//! log = "info"                      # the log filter; a reload applies it
//! # http_token_file = "http-token"  # required when http is not loopback
//!
//! # [acme]                          # instead of cert/key
//! # domains = ["coord.example.com"]
//! # contact = ["mailto:ops@example.com"]
//! # directory = "letsencrypt"       # or staging, or an https:// URL
//! # http = "0.0.0.0:80"             # where the HTTP-01 challenge is answered
//!
//! [auth]
//! mode = "token"                    # open | token | ca
//! cert_ttl = "24h"                  # token mode: issued certificate lifetime
//! # client_ca = "clients-ca.pem"    # ca mode
//!
//! [limits]
//! max_clients = 10000
//! max_channels_per_client = 1024
//! max_streams_per_channel = 1024
//! max_message_size = 67108864
//! hello_timeout = "10s"
//! idle_timeout = "30s"
//! bytes_per_second = 268435456      # 0: unlimited
//! messages_per_second = 1000000     # 0: unlimited
//! burst = "250ms"
//! flood_after = "5s"
//! max_pending = 4096
//! max_pending_per_source = 64
//!
//! [policy]                          # see the policy module
//!
//! [groups.ops]                      # a broadcast group's settings
//! policy = "block"                  # block | lag | evict (default lag)
//! buffer = 64                       # messages queued per member (256)
//! max_message = 4096                # largest message, bytes (65536)
//! ```
//!
//! Every setting is optional; command-line flags override the file.
//! [`check_file`] is the dry run: it reports every error it finds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::auth::AuthMode;
use crate::config::GroupConfig;
use crate::policy::{Policy, PolicySpec};

/// The file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where to listen, as a connpipe address.
    pub listen: Option<String>,
    /// The state directory.
    pub state_dir: Option<PathBuf>,
    /// The coordinator certificate (PEM).
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    pub key: Option<PathBuf>,
    /// How long live channels may run after SIGTERM, e.g. `10s`.
    pub drain: Option<String>,
    /// Where to serve `/metrics` and the status page, e.g.
    /// `127.0.0.1:9464`.
    pub http: Option<String>,
    /// The bearer token the HTTP listener requires.
    pub http_token_file: Option<PathBuf>,
    /// The log filter, e.g. `info` or `qmesh_coordinator=debug` (`--log`
    /// and `RUST_LOG` come first at start; a reload applies it).
    pub log: Option<String>,
    /// `[acme]`: the certificate by ACME instead of `cert`/`key`.
    pub acme: Option<AcmeSection>,
    /// `[auth]`.
    #[serde(default)]
    pub auth: AuthSection,
    /// `[limits]`.
    #[serde(default)]
    pub limits: LimitsSection,
    /// `[policy]`.
    pub policy: Option<PolicySpec>,
    /// `[groups.NAME]`: broadcast groups with settings of their own.
    #[serde(default)]
    pub groups: HashMap<String, GroupSection>,
}

/// `[acme]`: what `--acme` and its companion flags say.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSection {
    /// The names to get a certificate for.
    #[serde(default)]
    pub domains: Vec<String>,
    /// The directory URL, or `letsencrypt` / `staging`.
    pub directory: Option<String>,
    /// Contact URLs, e.g. `mailto:ops@example.com`.
    #[serde(default)]
    pub contact: Vec<String>,
    /// CA file for the directory's own HTTPS.
    pub directory_ca: Option<PathBuf>,
    /// Where to answer the HTTP-01 challenge, e.g. `0.0.0.0:80`.
    pub http: Option<String>,
    /// The first wait after a failed order, e.g. `10s`.
    pub retry: Option<String>,
}

/// `[groups.NAME]`: one broadcast group's settings; each defaults to
/// [`GroupConfig::default`]'s.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    /// `block`, `lag` or `evict`.
    pub policy: Option<String>,
    /// Messages queued per member before it counts as behind.
    pub buffer: Option<usize>,
    /// Largest message, in bytes.
    pub max_message: Option<usize>,
}

/// Largest `buffer` a group may configure.
pub const MAX_GROUP_BUFFER: usize = 1 << 20;

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// The mode; `open` when absent.
    pub mode: Option<AuthMode>,
    /// The client CA file (`ca` mode).
    pub client_ca: Option<PathBuf>,
    /// Lifetime of issued certificates (`token` mode), e.g. `24h`.
    pub cert_ttl: Option<String>,
}

/// `[limits]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct LimitsSection {
    pub max_clients: Option<usize>,
    pub max_channels_per_client: Option<usize>,
    pub max_streams_per_channel: Option<usize>,
    pub max_message_size: Option<u64>,
    pub hello_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub bytes_per_second: Option<u64>,
    pub messages_per_second: Option<u64>,
    pub burst: Option<String>,
    pub flood_after: Option<String>,
    pub max_pending: Option<usize>,
    pub max_pending_per_source: Option<usize>,
}

/// A checked file: its settings (paths made relative to the file's
/// directory) with durations parsed and the policy compiled.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The file's settings.
    pub file: FileConfig,
    /// The compiled policy, if the file has one.
    pub policy: Option<Policy>,
    /// `[auth] cert_ttl`.
    pub cert_ttl: Option<Duration>,
    /// `drain`.
    pub drain: Option<Duration>,
    /// `[limits] hello_timeout`.
    pub hello_timeout: Option<Duration>,
    /// `[limits] idle_timeout`.
    pub idle_timeout: Option<Duration>,
    /// `[limits] burst`.
    pub burst: Option<Duration>,
    /// `[limits] flood_after`.
    pub flood_after: Option<Duration>,
    /// `http`.
    pub http: Option<std::net::SocketAddr>,
    /// `[acme] retry`.
    pub acme_retry: Option<Duration>,
    /// `[groups.NAME]`, checked.
    pub groups: HashMap<String, GroupConfig>,
}

fn check_groups(
    sections: &HashMap<String, GroupSection>,
    errors: &mut Vec<String>,
) -> HashMap<String, GroupConfig> {
    let mut groups = HashMap::new();
    let mut names: Vec<_> = sections.keys().collect();
    names.sort();
    for name in names {
        let section = &sections[name];
        let at = format!("[groups.{name}]");
        if let Err(e) = qmesh_proto::name::validate_channel_name(name) {
            errors.push(format!("{at}: not a group name: {e}"));
        }
        let mut group = GroupConfig::default();
        if let Some(p) = &section.policy {
            match p.parse() {
                Ok(policy) => group.policy = policy,
                Err(e) => errors.push(format!("{at} policy: {e}")),
            }
        }
        match section.buffer {
            Some(b) if b == 0 || b > MAX_GROUP_BUFFER => errors.push(format!(
                "{at} buffer = {b} must be from 1 to {MAX_GROUP_BUFFER}"
            )),
            Some(b) => group.buffer = b,
            None => {}
        }
        let ceiling = qmesh_proto::limits::MAX_MESSAGE_CEILING / 2;
        match section.max_message {
            Some(m) if m == 0 || m > ceiling => errors.push(format!(
                "{at} max_message = {m} must be from 1 to {ceiling}"
            )),
            Some(m) => group.max_message = m,
            None => {}
        }
        groups.insert(name.clone(), group);
    }
    groups
}

fn duration(field: &str, value: &Option<String>, errors: &mut Vec<String>) -> Option<Duration> {
    let v = value.as_ref()?;
    match humantime::parse_duration(v) {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            errors.push(format!("{field} = \"{v}\" must be more than zero"));
            None
        }
        Err(e) => {
            errors.push(format!(
                "{field} = \"{v}\" is not a duration like 30s or 24h: {e}"
            ));
            None
        }
    }
}

/// Parse and check config text; `base` is the directory relative paths
/// are taken from. Every error found is returned.
pub fn check_text(text: &str, base: &Path) -> Result<Checked, Vec<String>> {
    let mut file: FileConfig = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
    let mut errors = Vec::new();
    let rel = |p: &mut Option<PathBuf>| {
        if let Some(path) = p {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    };
    rel(&mut file.cert);
    rel(&mut file.key);
    rel(&mut file.state_dir);
    rel(&mut file.auth.client_ca);
    rel(&mut file.http_token_file);
    if let Some(acme) = &mut file.acme {
        rel(&mut acme.directory_ca);
    }
    if file.cert.is_some() != file.key.is_some() {
        errors.push("cert and key go together: give both or neither".into());
    }
    if let Some(Err(e)) = file.log.as_deref().map(qmesh_proto::logging::check_filter) {
        errors.push(format!("log: {e}"));
    }
    let mode = file.auth.mode.unwrap_or(AuthMode::Open);
    match (mode, &file.auth.client_ca) {
        (AuthMode::Ca, None) => errors.push(
            "[auth] mode = \"ca\" needs client_ca, the CA file client certificates must chain to"
                .into(),
        ),
        (AuthMode::Ca, Some(ca)) => {
            if let Err(e) = qmesh_certs::load_certs(ca) {
                errors.push(format!("[auth] client_ca: {e}"));
            }
        }
        (_, Some(_)) => errors.push(format!(
            "[auth] client_ca is only used in ca mode, not {mode}"
        )),
        _ => {}
    }
    let cert_ttl = duration("[auth] cert_ttl", &file.auth.cert_ttl, &mut errors);
    if cert_ttl.is_some() && mode != AuthMode::Token {
        errors.push(format!(
            "[auth] cert_ttl is only used in token mode, not {mode}"
        ));
    }
    // Zero is a valid drain: stop at once.
    let drain = match &file.drain {
        Some(v) if humantime::parse_duration(v).is_ok_and(|d| d.is_zero()) => Some(Duration::ZERO),
        _ => duration("drain", &file.drain, &mut errors),
    };
    let l = &file.limits;
    let hello_timeout = duration("[limits] hello_timeout", &l.hello_timeout, &mut errors);
    let idle_timeout = duration("[limits] idle_timeout", &l.idle_timeout, &mut errors);
    let burst = duration("[limits] burst", &l.burst, &mut errors);
    let flood_after = duration("[limits] flood_after", &l.flood_after, &mut errors);
    for (field, v) in [
        ("max_clients", l.max_clients),
        ("max_channels_per_client", l.max_channels_per_client),
        ("max_streams_per_channel", l.max_streams_per_channel),
        ("max_pending", l.max_pending),
        ("max_pending_per_source", l.max_pending_per_source),
    ] {
        if v == Some(0) {
            errors.push(format!("[limits] {field} must be at least 1"));
        }
    }
    if l.max_message_size == Some(0) {
        errors.push("[limits] max_message_size must be at least 1".into());
    }
    let policy = match &file.policy {
        Some(spec) => match Policy::from_spec(spec) {
            Ok(p) => Some(p),
            Err(e) => {
                errors.extend(e.into_iter().map(|e| format!("[policy] {e}")));
                None
            }
        },
        None => None,
    };
    let groups = check_groups(&file.groups, &mut errors);
    let acme_retry = match &file.acme {
        Some(acme) => {
            if acme.domains.is_empty() {
                errors.push("[acme] domains: give at least one name".into());
            }
            if file.cert.is_some() {
                errors.push("[acme] and cert/key both give the certificate: keep one".into());
            }
            if let Some(Err(e)) = acme
                .directory
                .as_deref()
                .map(crate::acme::AcmeSettings::directory_url)
            {
                errors.push(format!("[acme] directory: {e}"));
            }
            if let Some(v) = &acme.http {
                if v.parse::<std::net::SocketAddr>().is_err() {
                    errors.push(format!(
                        "[acme] http = \"{v}\" is not an IP address and port like 0.0.0.0:80"
                    ));
                }
            }
            duration("[acme] retry", &acme.retry, &mut errors)
        }
        None => None,
    };
    let http = match &file.http {
        Some(v) => match v.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                errors.push(format!(
                    "http = \"{v}\" is not an IP address and port like 127.0.0.1:9464"
                ));
                None
            }
        },
        None => None,
    };
    if errors.is_empty() {
        Ok(Checked {
            file,
            policy,
            cert_ttl,
            drain,
            hello_timeout,
            idle_timeout,
            burst,
            flood_after,
            http,
            acme_retry,
            groups,
        })
    } else {
        Err(errors)
    }
}

/// Read and check a config file (the dry run).
pub fn check_file(path: &Path) -> Result<Checked, Vec<String>> {
    let text = crate::files::read_small(path, 1024 * 1024).map_err(|e| vec![format!("{e:#}")])?;
    let base = path.parent().unwrap_or(Path::new("."));
    check_text(&text, base).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| format!("{}: {e}", path.display()))
            .collect()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_checks() {
        let c = check_text(
            r#"
            listen = "quic/127.0.0.1:0"
            state_dir = "state"
            [auth]
            mode = "token"
            cert_ttl = "1h"
            [limits]
            bytes_per_second = 1000
            flood_after = "3s"
            [[policy.allow]]
            from = ["*"]
            to = ["*"]
            channels = ["chat"]
            "#,
            Path::new("/etc/qmesh"),
        )
        .unwrap();
        assert_eq!(c.cert_ttl, Some(Duration::from_secs(3600)));
        assert_eq!(c.flood_after, Some(Duration::from_secs(3)));
        assert_eq!(c.file.state_dir, Some(PathBuf::from("/etc/qmesh/state")));
        assert_eq!(c.policy.unwrap().len(), 1);
    }

    #[test]
    fn groups_check_and_default() {
        let c = check_text(
            "[groups.ops]\npolicy = \"evict\"\nbuffer = 8\n[groups.chat]\nmax_message = 100\n",
            Path::new("."),
        )
        .unwrap();
        let ops = c.groups["ops"];
        assert_eq!(ops.policy, qmesh_proto::msg::GroupPolicy::Evict);
        assert_eq!((ops.buffer, ops.max_message), (8, 64 * 1024));
        let chat = c.groups["chat"];
        assert_eq!(chat.policy, qmesh_proto::msg::GroupPolicy::Lag);
        assert_eq!((chat.buffer, chat.max_message), (256, 100));
        let errs = check_text(
            "[groups.ops]\npolicy = \"drop\"\nbuffer = 0\nmax_message = 0\n[groups.\"Bad Name\"]\n",
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(errs
            .iter()
            .any(|e| e.contains("unknown group policy \"drop\"")));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let errs = check_text(
            r#"
            cert = "x.pem"
            [auth]
            mode = "ca"
            cert_ttl = "soon"
            [limits]
            max_clients = 0
            [[policy.allow]]
            from = ["@ghosts"]
            to = ["*"]
            channels = ["*"]
            "#,
            Path::new("."),
        )
        .unwrap_err();
        assert_eq!(errs.len(), 5, "{errs:#?}");
        let typo = check_text("[limits]\nmax_clinets = 3\n", Path::new(".")).unwrap_err();
        assert!(typo[0].contains("max_clinets"), "{typo:?}");
    }
}
