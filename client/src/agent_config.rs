//! The configuration file of `qmesh up`, the agent that runs forwarding
//! routes: parsing, checking and comparing two versions for a reload.
//!
//! ```toml
//! coordinator = "quic/coord.example.com:7447"   # required
//! name = "bob"                                   # required
//! ca = "/etc/qmesh/ca.pem"                       # optional
//! grace = "30s"                                  # optional, default 30s
//!
//! [expose.web]                # channel `web` of this client
//! target = "tcp/$4:8080"      # tcp/HOST:PORT, unix//PATH or udp/HOST:PORT
//! allow = ["alice"]           # optional: only these clients
//! max_connections = 1024      # optional, default 1024
//! udp_idle = "60s"            # optional, udp targets only, default 60s
//!
//! [forward.db]
//! listen = "tcp/$4:15432"     # tcp, unix or udp
//! to = "mesh/carol!postgres"  # a mesh channel
//! mode = "auto"               # auto | direct | relay, default auto
//! max_connections = 1024
//! udp_idle = "60s"
//! ```
//!
//! An *expose* route offers channel `NAME` of this client and connects each
//! channel opened to it to `target`. A *forward* route listens on `listen`
//! and opens the mesh channel `to` for each connection (or, for udp, each
//! sender). Addresses are connpipe addresses ([`Address`]), shorthands
//! such as `$4` included; a Unix socket is written `unix//run/app.sock`,
//! the path being everything after `unix/`.
//!
//! [`parse`] reports every error in the file at once, each with the line
//! and column of the value (or key) at fault. [`diff`] says which routes a
//! reload adds, removes, keeps and restarts.
//!
//! # Rules
//!
//! - Unknown keys are errors, so a typo never passes silently.
//! - `coordinator` is a `quic/` address; `name` and `allow` entries follow
//!   the client-name rules, expose names the channel-name rules
//!   ([`qmesh_proto::name`]). `allow`, when given, names at least one
//!   client; left out, the coordinator's policy decides who may open.
//! - Targets and listen addresses are `tcp`, `unix` or `udp` ([`kind_of`]),
//!   with no subport. `tcp` and `udp` ones need a port other than 0; a
//!   target cannot be a wildcard host (`*4`, `0.0.0.0`); a Unix path must
//!   be absolute (`unix/run/x.sock` is the relative path `run/x.sock`).
//! - `to` is a `mesh/peer!channel` address.
//! - No two forwards listen on overlapping addresses (see
//!   [`AgentConfig::forward`]).
//! - Durations are written as in `30s`, `500ms`, `2m` or `1h` (humantime);
//!   `udp_idle` is more than zero and only given for udp routes; `grace`
//!   may be `0s`.
//! - `max_connections` is from 1 to [`MAX_CONNECTIONS_LIMIT`].
//!
//! Relative paths (`ca`) are kept as written; the caller resolves them.
//! Addresses are kept as written too: `tcp/$4:80` and `tcp/127.0.0.1:80`
//! are different values.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use qmesh_proto::address::Host;
use qmesh_proto::msg::PathMode;
use qmesh_proto::name::{validate_channel_name, validate_client_name};
use qmesh_proto::Address;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// How long removed routes' live connections may finish when `grace` is
/// not given.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// A route's connection limit when `max_connections` is not given.
pub use crate::forward::DEFAULT_MAX_CONNECTIONS;
/// The largest `max_connections` a route may set.
pub const MAX_CONNECTIONS_LIMIT: usize = 65536;
/// How long a udp flow may stay silent before it is dropped, when
/// `udp_idle` is not given.
pub use crate::forward::DEFAULT_UDP_IDLE;

/// The connector aliases a route endpoint may use, as listed in messages.
const ENDPOINT_CONNECTORS: &str = "tcp, unix or udp";

/// The keys allowed at the top of the file.
const TOP_KEYS: &[&str] = &["coordinator", "name", "ca", "grace", "expose", "forward"];
/// The keys allowed in an `[expose.NAME]` table.
const EXPOSE_KEYS: &[&str] = &["target", "allow", "max_connections", "udp_idle"];
/// The keys allowed in a `[forward.NAME]` table.
const FORWARD_KEYS: &[&str] = &["listen", "to", "mode", "max_connections", "udp_idle"];

/// What an endpoint carries: a byte stream (`tcp`, `unix`) or datagrams
/// (`udp`); the same kind a forwarding interface's manifest states.
pub use qmesh_proto::ForwardKind as Kind;

/// The kind of an endpoint address, by its connector's alias: `tcp` and
/// `unix` are [`Kind::Stream`], `udp` is [`Kind::Datagram`].
///
/// Only the alias counts, as everywhere in connpipe addresses, so
/// `qmesh.core.tcp/$4:80` is a stream.
///
/// # Errors
///
/// [`UnsupportedConnector`] for any other connector (`quic`, `mesh`, …),
/// naming it and the connectors allowed.
pub fn kind_of(address: &Address) -> Result<Kind, UnsupportedConnector> {
    match address.connector().alias() {
        "tcp" | "unix" => Ok(Kind::Stream),
        "udp" => Ok(Kind::Datagram),
        other => Err(UnsupportedConnector {
            address: address.to_string(),
            connector: other.to_owned(),
        }),
    }
}

/// An endpoint address whose connector a route cannot listen on or
/// connect to; see [`kind_of`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "connector {connector:?} in {address:?} cannot carry a route; \
     use {ENDPOINT_CONNECTORS}"
)]
pub struct UnsupportedConnector {
    /// The address, as it prints.
    pub address: String,
    /// The connector's alias.
    pub connector: String,
}

/// The agent's configuration file, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The coordinator, a `quic/host[:port]` address.
    pub coordinator: Address,
    /// This client's name.
    pub name: String,
    /// The CA file to trust the coordinator with, as written (a relative
    /// path is not resolved).
    pub ca: Option<PathBuf>,
    /// How long the live connections of a removed or changed route may
    /// go on before they are cut.
    pub grace: Duration,
    /// `[expose.NAME]` routes, by channel name.
    pub expose: BTreeMap<String, Expose>,
    /// `[forward.NAME]` routes, by name. No two listen on overlapping
    /// addresses: the same Unix path, or the same transport and port on
    /// the same host, where a wildcard (`*4`, `0.0.0.0`) overlaps every
    /// host of its family, `*6` every host (IPv6 wildcards take IPv4 too on
    /// most systems), and names overlap when equal, `$n` being `localhost`.
    /// Names are not resolved.
    pub forward: BTreeMap<String, Forward>,
}

/// An `[expose.NAME]` route: channel `NAME` of this client, connected to
/// `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expose {
    /// Where each channel is connected to: `tcp/host:port`, `unix//path`
    /// or `udp/host:port`.
    pub target: Address,
    /// The target's kind.
    pub kind: Kind,
    /// The clients that may open the channel; `None` leaves it to the
    /// coordinator's policy.
    pub allow: Option<Vec<String>>,
    /// The most channels (connections) open at once.
    pub max_connections: usize,
    /// For udp targets, how long a flow may stay silent before it is
    /// dropped.
    pub udp_idle: Duration,
}

/// A `[forward.NAME]` route: connections to `listen` are carried over
/// the mesh channel `to_channel` of `to_peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Where to listen: `tcp/host:port`, `unix//path` or `udp/host:port`;
    /// its kind is `kind_of(&listen)`, which [`parse`] has checked.
    pub listen: Address,
    /// The client to open channels to.
    pub to_peer: String,
    /// The channel of `to_peer` to open.
    pub to_channel: String,
    /// Which path the channels take.
    pub mode: PathMode,
    /// The most connections (udp: flows) carried at once.
    pub max_connections: usize,
    /// For udp listeners, how long a flow may stay silent before it is
    /// dropped.
    pub udp_idle: Duration,
}

/// One error in the file, at a 1-based line and column (in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The line, from 1.
    pub line: usize,
    /// The column, from 1, counted in characters.
    pub column: usize,
    /// What is wrong, starting with where in the file's structure when it
    /// is past the TOML syntax, as in `expose.web.target: ...`.
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// Writes `line L: message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Parses and checks the agent's file.
///
/// # Errors
///
/// Every error found, ordered by line and column. TOML syntax errors are
/// reported alone: the rest is checked only once the file reads as TOML.
pub fn parse(text: &str) -> Result<AgentConfig, Vec<ConfigError>> {
    let (doc, syntax) = DeTable::parse_recoverable(text);
    let mut checker = Checker {
        text,
        errors: Vec::new(),
    };
    if !syntax.is_empty() {
        for err in syntax {
            let span = err.span().unwrap_or(0..0);
            let mut message = err.message().trim_end().to_owned();
            if let Some(snippet) = text.get(span.clone()) {
                let short = !snippet.is_empty() && snippet.len() <= 40 && !snippet.contains('\n');
                if short && !message.contains(snippet) {
                    message = format!("{message}: {snippet}");
                }
            }
            checker.error(span, message);
        }
        return Err(checker.finish());
    }
    let config = checker.file(doc.get_ref());
    let errors = checker.finish();
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ => Err(errors),
    }
}

/// A route, by its table and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteId {
    /// `[expose.NAME]`.
    Expose(String),
    /// `[forward.NAME]`.
    Forward(String),
}

impl fmt::Display for RouteId {
    /// Writes `expose.NAME` or `forward.NAME`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteId::Expose(name) => write!(f, "expose.{}", key_text(name)),
            RouteId::Forward(name) => write!(f, "forward.{}", key_text(name)),
        }
    }
}

/// What a reload changes; see [`diff`]. Each list is sorted, exposes
/// first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Routes only in the new file: to start.
    pub added: Vec<RouteId>,
    /// Routes only in the old file: to stop, letting live connections
    /// finish within the grace time.
    pub removed: Vec<RouteId>,
    /// Routes in both, with the same settings: left alone.
    pub kept: Vec<RouteId>,
    /// Routes in both whose settings differ: to stop (as removed) and
    /// start again (as added).
    pub changed: Vec<RouteId>,
    /// Whether the coordinator, the name or the CA changed, which a reload
    /// cannot apply: the agent must restart.
    pub identity_changed: bool,
}

/// Compares two versions of the file for a reload.
///
/// A route is identified by its table and name; one whose settings differ
/// in any way is [`Changes::changed`], even if only in how an address is
/// written (`$4` for `127.0.0.1`). `grace` is not a route setting: the new
/// value simply applies.
pub fn diff(old: &AgentConfig, new: &AgentConfig) -> Changes {
    let mut changes = Changes {
        identity_changed: old.coordinator != new.coordinator
            || old.name != new.name
            || old.ca != new.ca,
        ..Changes::default()
    };
    diff_routes(&old.expose, &new.expose, RouteId::Expose, &mut changes);
    diff_routes(&old.forward, &new.forward, RouteId::Forward, &mut changes);
    changes
}

/// Sorts the routes of one table into `changes`.
fn diff_routes<T: PartialEq>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    id: fn(String) -> RouteId,
    changes: &mut Changes,
) {
    for (name, old_route) in old {
        match new.get(name) {
            None => changes.removed.push(id(name.clone())),
            Some(new_route) if new_route == old_route => changes.kept.push(id(name.clone())),
            Some(_) => changes.changed.push(id(name.clone())),
        }
    }
    for name in new.keys().filter(|name| !old.contains_key(*name)) {
        changes.added.push(id(name.clone()));
    }
}

/// A key as it would be written in TOML: bare when it can be, else quoted.
fn key_text(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
    if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// A value of the file with its span.
type Value<'i> = Spanned<DeValue<'i>>;

/// Which end of a route an endpoint address is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// An expose route's target, connected to.
    Target,
    /// A forward route's listen address, bound.
    Listen,
}

/// Collects errors with their positions while the file is checked.
struct Checker<'t> {
    text: &'t str,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    /// Records an error at the start of `span`.
    fn error(&mut self, span: Range<usize>, message: String) {
        let offset = span.start.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line_start = before.rfind('\n').map_or(0, |at| at + 1);
        self.errors.push(ConfigError {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
            message,
        });
    }

    /// The errors, ordered by position (and by finding, at one position).
    fn finish(mut self) -> Vec<ConfigError> {
        self.errors.sort_by_key(|err| (err.line, err.column));
        self.errors
    }

    /// Checks the whole file; `None` if something required at the top is
    /// missing or wrong. Routes that are wrong are left out; either way the
    /// errors say what is wrong, and [`parse`] fails if there are any.
    fn file(&mut self, doc: &DeTable<'_>) -> Option<AgentConfig> {
        self.unknown_keys("", doc, TOP_KEYS, "the top of the file");
        let whole = 0..0;
        let coordinator = self.required(doc, "", "coordinator", &whole, |c, place, value| {
            c.coordinator(place, value)
        });
        let name = self.required(doc, "", "name", &whole, |c, place, value| {
            let name = c.string(place, value)?;
            c.check(
                value,
                validate_client_name(name).map_err(|e| format!("{place}: {e}")),
            )?;
            Some(name.to_owned())
        });
        let ca = match doc.get("ca") {
            Some(value) => {
                let path = self.string("ca", value);
                match path {
                    Some("") => {
                        self.error(value.span(), "ca: is empty; give the CA file's path".into());
                        None
                    }
                    Some(path) => Some(Some(PathBuf::from(path))),
                    None => None,
                }
            }
            None => Some(None),
        };
        let grace = match doc.get("grace") {
            Some(value) => self.duration("grace", value, true),
            None => Some(DEFAULT_GRACE),
        };
        let expose = self.routes(doc, "expose", |c, place, name, table, span| {
            c.expose(place, name, table, span)
        });
        let forward = self.routes(doc, "forward", |c, place, _, table, span| {
            c.forward(place, table, span)
        });
        // Among the forwards that are right, so that a clash is reported
        // even when another forward is wrong.
        self.overlapping_listens(doc, &forward);
        Some(AgentConfig {
            coordinator: coordinator?,
            name: name?,
            ca: ca?,
            grace: grace?,
            expose,
            forward,
        })
    }

    /// Records an error for each key of `table` not in `allowed`.
    fn unknown_keys(&mut self, prefix: &str, table: &DeTable<'_>, allowed: &[&str], what: &str) {
        for key in table.keys() {
            if !allowed.contains(&key.get_ref().as_ref()) {
                self.error(
                    key.span(),
                    format!(
                        "{prefix}{}: unknown key; the keys of {what} are {}",
                        key_text(key.get_ref()),
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    /// Reads the required `key` of `table` (whose place is `prefix` and
    /// span `span`) with `read`, or records that it is missing.
    fn required<T>(
        &mut self,
        table: &DeTable<'_>,
        prefix: &str,
        key: &str,
        span: &Range<usize>,
        read: impl FnOnce(&mut Self, &str, &Value<'_>) -> Option<T>,
    ) -> Option<T> {
        let place = format!("{prefix}{key}");
        match table.get(key) {
            Some(value) => read(self, &place, value),
            None => {
                let within = if prefix.is_empty() {
                    String::new()
                } else {
                    format!(" from [{}]", prefix.trim_end_matches('.'))
                };
                self.error(
                    span.clone(),
                    format!("{place}: missing{within}; it is required"),
                );
                None
            }
        }
    }

    /// Records `result`'s error at `value`; `Some(())` if there is none.
    fn check(&mut self, value: &Value<'_>, result: Result<(), String>) -> Option<()> {
        match result {
            Ok(()) => Some(()),
            Err(message) => {
                self.error(value.span(), message);
                None
            }
        }
    }

    /// The string at `value`, or an error if it is something else.
    fn string<'v>(&mut self, place: &str, value: &'v Value<'_>) -> Option<&'v str> {
        let found = value.get_ref().as_str();
        if found.is_none() {
            self.error(
                value.span(),
                format!(
                    "{place}: must be a string, not {}",
                    value.get_ref().type_str()
                ),
            );
        }
        found
    }

    /// The address written at `value`.
    fn address(&mut self, place: &str, value: &Value<'_>) -> Option<(Address, String)> {
        let text = self.string(place, value)?;
        match Address::parse(text) {
            Ok(address) => Some((address, text.to_owned())),
            Err(e) => {
                self.error(value.span(), format!("{place}: {e}"));
                None
            }
        }
    }

    /// The coordinator address: a `quic/` address with no subport.
    fn coordinator(&mut self, place: &str, value: &Value<'_>) -> Option<Address> {
        let (address, _) = self.address(place, value)?;
        let result = address
            .quic_endpoint()
            .map(|_| ())
            .map_err(|e| format!("{place}: {e}"));
        self.check(value, result)?;
        Some(address)
    }

    /// A duration such as `30s`; zero only if `zero_ok`.
    fn duration(&mut self, place: &str, value: &Value<'_>, zero_ok: bool) -> Option<Duration> {
        let Some(text) = value.get_ref().as_str() else {
            self.error(
                value.span(),
                format!(
                    "{place}: must be a duration in a string, as in \"30s\", not {}",
                    value.get_ref().type_str()
                ),
            );
            return None;
        };
        let result = match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() && !zero_ok => Err(format!("{place}: must be more than zero")),
            Ok(d) => return Some(d),
            Err(e) => Err(format!(
                "{place}: {text:?} is not a duration like 30s, 500ms or 2m ({e})"
            )),
        };
        self.check(value, result);
        None
    }

    /// A `max_connections` value: an integer from 1 to
    /// [`MAX_CONNECTIONS_LIMIT`].
    fn max_connections(&mut self, place: &str, value: &Value<'_>) -> Option<usize> {
        let range = format!("an integer from 1 to {MAX_CONNECTIONS_LIMIT}");
        let Some(int) = value.get_ref().as_integer() else {
            let found = value.get_ref().type_str();
            self.error(
                value.span(),
                format!("{place}: must be {range}, not {found}"),
            );
            return None;
        };
        let n = i128::from_str_radix(int.as_str(), int.radix()).ok();
        match n.and_then(|n| usize::try_from(n).ok()) {
            Some(n) if (1..=MAX_CONNECTIONS_LIMIT).contains(&n) => Some(n),
            _ => {
                self.error(value.span(), format!("{place}: must be {range}, not {int}"));
                None
            }
        }
    }

    /// An endpoint address (an expose target or a forward listen address)
    /// and its kind.
    fn endpoint(&mut self, place: &str, value: &Value<'_>, role: Role) -> Option<(Address, Kind)> {
        let (address, text) = self.address(place, value)?;
        match endpoint_problem(&address, &text, role) {
            Ok(kind) => Some((address, kind)),
            Err(e) => {
                self.error(value.span(), format!("{place}: {e}"));
                None
            }
        }
    }

    /// Checks each `[TABLE.NAME]` route with `route`, and returns those
    /// that are right (the errors say what is wrong with the others).
    fn routes<T>(
        &mut self,
        doc: &DeTable<'_>,
        table: &str,
        mut route: impl FnMut(
            &mut Self,
            &str,
            &Spanned<String>,
            &DeTable<'_>,
            Range<usize>,
        ) -> Option<T>,
    ) -> BTreeMap<String, T> {
        let mut routes = BTreeMap::new();
        let Some(value) = doc.get(table) else {
            return routes;
        };
        let Some(entries) = value.get_ref().as_table() else {
            self.error(
                value.span(),
                format!(
                    "{table}: must be a table of routes, as in [{table}.NAME], not {}",
                    value.get_ref().type_str()
                ),
            );
            return routes;
        };
        for (key, value) in entries {
            let name = Spanned::new(key.span(), key.get_ref().to_string());
            let place = format!("{table}.{}", key_text(name.get_ref()));
            let Some(fields) = value.get_ref().as_table() else {
                self.error(
                    value.span(),
                    format!(
                        "{place}: must be a table, as in [{place}], not {}",
                        value.get_ref().type_str()
                    ),
                );
                continue;
            };
            if let Some(checked) = route(self, &place, &name, fields, value.span()) {
                routes.insert(name.into_inner(), checked);
            }
        }
        routes
    }

    /// Checks an `[expose.NAME]` table.
    fn expose(
        &mut self,
        place: &str,
        name: &Spanned<String>,
        table: &DeTable<'_>,
        span: Range<usize>,
    ) -> Option<Expose> {
        let prefix = format!("{place}.");
        self.unknown_keys(&prefix, table, EXPOSE_KEYS, "an expose route");
        let mut ok = true;
        if let Err(e) = validate_channel_name(name.get_ref()) {
            self.error(
                name.span(),
                format!(
                    "{place}: an exposed route is a channel, and its name breaks the rules: {e}"
                ),
            );
            ok = false;
        }
        let target = self.required(table, &prefix, "target", &span, |c, place, value| {
            c.endpoint(place, value, Role::Target)
        });
        let allow = match table.get("allow") {
            Some(value) => self.allow(&format!("{prefix}allow"), value).map(Some),
            None => Some(None),
        };
        let max_connections = self.route_max_connections(table, &prefix);
        let udp_idle = self.udp_idle(table, &prefix, target.as_ref(), "target");
        let (target, kind) = target?;
        ok.then_some(Expose {
            target,
            kind,
            allow: allow?,
            max_connections: max_connections?,
            udp_idle: udp_idle?,
        })
    }

    /// Checks a `[forward.NAME]` table.
    fn forward(&mut self, place: &str, table: &DeTable<'_>, span: Range<usize>) -> Option<Forward> {
        let prefix = format!("{place}.");
        self.unknown_keys(&prefix, table, FORWARD_KEYS, "a forward route");
        let listen = self.required(table, &prefix, "listen", &span, |c, place, value| {
            c.endpoint(place, value, Role::Listen)
        });
        let to = self.required(table, &prefix, "to", &span, |c, place, value| {
            let (address, _) = c.address(place, value)?;
            match address.mesh() {
                Ok((peer, channel)) => Some((peer.to_owned(), channel.to_owned())),
                Err(e) => {
                    c.error(
                        value.span(),
                        format!(
                            "{place}: must be a mesh channel, as in \"mesh/carol!postgres\": {e}"
                        ),
                    );
                    None
                }
            }
        });
        let mode = match table.get("mode") {
            Some(value) => self.mode(&format!("{prefix}mode"), value),
            None => Some(PathMode::default()),
        };
        let max_connections = self.route_max_connections(table, &prefix);
        let udp_idle = self.udp_idle(table, &prefix, listen.as_ref(), "listen address");
        let (listen, _) = listen?;
        let (to_peer, to_channel) = to?;
        Some(Forward {
            listen,
            to_peer,
            to_channel,
            mode: mode?,
            max_connections: max_connections?,
            udp_idle: udp_idle?,
        })
    }

    /// A route's `max_connections`, or the default.
    fn route_max_connections(&mut self, table: &DeTable<'_>, prefix: &str) -> Option<usize> {
        match table.get("max_connections") {
            Some(value) => self.max_connections(&format!("{prefix}max_connections"), value),
            None => Some(DEFAULT_MAX_CONNECTIONS),
        }
    }

    /// A route's `udp_idle`, or the default; an error if it is given and
    /// the route's `endpoint` (if it was read) is not udp.
    fn udp_idle(
        &mut self,
        table: &DeTable<'_>,
        prefix: &str,
        endpoint: Option<&(Address, Kind)>,
        endpoint_name: &str,
    ) -> Option<Duration> {
        let Some(value) = table.get("udp_idle") else {
            return Some(DEFAULT_UDP_IDLE);
        };
        let place = format!("{prefix}udp_idle");
        let idle = self.duration(&place, value, false);
        if let Some((address, Kind::Stream)) = endpoint {
            self.error(
                value.span(),
                format!(
                    "{place}: only udp routes have an idle time, and this route's \
                     {endpoint_name} is {}",
                    address.connector().alias()
                ),
            );
            return None;
        }
        idle
    }

    /// A forward's `mode`.
    fn mode(&mut self, place: &str, value: &Value<'_>) -> Option<PathMode> {
        match self.string(place, value)? {
            "auto" => Some(PathMode::Auto),
            "direct" => Some(PathMode::Direct),
            "relay" => Some(PathMode::Relay),
            other => {
                self.error(
                    value.span(),
                    format!("{place}: {other:?} is not a mode; use auto, direct or relay"),
                );
                None
            }
        }
    }

    /// An expose's `allow` list: client names, at least one.
    fn allow(&mut self, place: &str, value: &Value<'_>) -> Option<Vec<String>> {
        let Some(list) = value.get_ref().as_array() else {
            self.error(
                value.span(),
                format!(
                    "{place}: must be a list of client names, as in [\"alice\"], not {}",
                    value.get_ref().type_str()
                ),
            );
            return None;
        };
        if list.is_empty() {
            self.error(
                value.span(),
                format!(
                    "{place}: is empty, so no client could open the channel; \
                     leave allow out to let the coordinator's policy decide"
                ),
            );
            return None;
        }
        let mut names = Vec::with_capacity(list.len());
        let mut ok = true;
        for (index, item) in list.iter().enumerate() {
            let item_place = format!("{place}[{index}]");
            let Some(name) = self.string(&item_place, item) else {
                ok = false;
                continue;
            };
            match validate_client_name(name) {
                Ok(()) => names.push(name.to_owned()),
                Err(e) => {
                    self.error(item.span(), format!("{item_place}: {e}"));
                    ok = false;
                }
            }
        }
        ok.then_some(names)
    }

    /// Records an error for each forward whose listen address overlaps an
    /// earlier one's (by name order).
    fn overlapping_listens(&mut self, doc: &DeTable<'_>, forward: &BTreeMap<String, Forward>) {
        let routes: Vec<(&String, &Forward)> = forward.iter().collect();
        for (at, (name, route)) in routes.iter().enumerate() {
            let Some((other, earlier)) = routes[..at]
                .iter()
                .find(|(_, earlier)| listens_overlap(&earlier.listen, &route.listen))
            else {
                continue;
            };
            let span = doc
                .get("forward")
                .and_then(|f| f.get_ref().get(name.as_str()))
                .and_then(|t| t.get_ref().get("listen"))
                .map_or(0..0, Spanned::span);
            let this = RouteId::Forward((*name).clone());
            let other = RouteId::Forward((*other).clone());
            self.error(
                span,
                format!(
                    "{this}.listen: \"{}\" overlaps {other}.listen \"{}\"; \
                     two routes cannot listen on one address",
                    route.listen, earlier.listen
                ),
            );
        }
    }
}

/// What is wrong with an endpoint address, if anything; else its kind.
/// `text` is the address as written, for messages.
fn endpoint_problem(address: &Address, text: &str, role: Role) -> Result<Kind, String> {
    let kind = kind_of(address).map_err(|e| e.to_string())?;
    let what = match role {
        Role::Target => "a target",
        Role::Listen => "a listen address",
    };
    if address.subport().is_some() {
        return Err(format!(
            "{text:?} has a subport (after '!'), which {what} does not take"
        ));
    }
    if let Host::Path(path) = address.host() {
        if !path.starts_with('/') {
            return Err(format!(
                "{text:?} has the relative path {path:?}; the path is everything \
                 after \"unix/\", so write an absolute one as in \"unix//run/app.sock\""
            ));
        }
        return Ok(kind);
    }
    match address.port() {
        None => return Err(format!("{text:?} has no port")),
        Some(0) => return Err(format!("{text:?} has port 0; give the port to use")),
        Some(_) => {}
    }
    if role == Role::Target && address.host().to_ip().is_some_and(|ip| ip.is_unspecified()) {
        return Err(format!(
            "{text:?} has a wildcard host, which can be listened on but not \
             connected to; use $4, $6 or an address"
        ));
    }
    Ok(kind)
}

/// Whether two listen addresses would take the same socket: the same
/// Unix path, or the same transport and port on hosts that overlap. A
/// wildcard host (`*4`, `0.0.0.0`) overlaps every host of its family, and
/// `*6` every host (IPv6 wildcards take IPv4 too on most systems); names
/// overlap when equal, ignoring case, `$n` being `localhost`.
fn listens_overlap(a: &Address, b: &Address) -> bool {
    if a.connector().alias() != b.connector().alias() {
        return false;
    }
    match (a.host(), b.host()) {
        (Host::Path(x), Host::Path(y)) => return x == y,
        (Host::Path(_), _) | (_, Host::Path(_)) => return false,
        _ => {}
    }
    if a.port() != b.port() {
        return false;
    }
    match (a.host().to_ip(), b.host().to_ip()) {
        (Some(x), Some(y)) => x == y || covers(x, y) || covers(y, x),
        (Some(ip), None) | (None, Some(ip)) => ip.is_unspecified(),
        (None, None) => host_name(a.host()).eq_ignore_ascii_case(&host_name(b.host())),
    }
}

/// Whether binding `wide` takes the address `ip` too.
fn covers(wide: IpAddr, ip: IpAddr) -> bool {
    wide.is_unspecified() && (wide.is_ipv6() || ip.is_ipv4())
}

/// A host that is a name, `$n` read as `localhost`.
fn host_name(host: &Host) -> String {
    match host {
        Host::Shorthand(_) if host.to_string() == "$n" => "localhost".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The minimal top of a valid file, two lines long.
    const TOP: &str = "coordinator = \"quic/coord.example.com\"\nname = \"bob\"\n";

    fn addr(text: &str) -> Address {
        Address::parse(text).unwrap()
    }

    fn ok(text: &str) -> AgentConfig {
        match parse(text) {
            Ok(config) => config,
            Err(errors) => panic!("{text}\n{errors:#?}"),
        }
    }

    /// The errors of `text`, as displayed.
    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(config) => panic!("{text}\nparsed: {config:#?}"),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    /// The single error of `text`, as displayed.
    fn error(text: &str) -> String {
        let errors = errors(text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        errors.into_iter().next().unwrap()
    }

    #[test]
    fn a_full_file_parses_to_the_values_written() {
        let config = ok(r#"
coordinator = "quic/coord.example.com:7447"
name = "bob"
ca = "/etc/qmesh/ca.pem"
grace = "45s"

[expose.web]
target = "tcp/$4:8080"
allow = ["alice", "carol"]
max_connections = 10

[expose.dns]
target = "udp/10.0.0.53:53"
udp_idle = "500ms"

[expose.redis]
target = "unix//run/redis.sock"

[forward.db]
listen = "tcp/$4:15432"
to = "mesh/carol!postgres"
mode = "relay"
max_connections = 65536

[forward.syslog]
listen = "udp/*6:514"
to = "mesh/logs!syslog"
udp_idle = "2m"
"#);
        assert_eq!(config.coordinator, addr("quic/coord.example.com:7447"));
        assert_eq!(config.name, "bob");
        assert_eq!(config.ca, Some(PathBuf::from("/etc/qmesh/ca.pem")));
        assert_eq!(config.grace, Duration::from_secs(45));
        assert_eq!(
            config.expose.keys().collect::<Vec<_>>(),
            ["dns", "redis", "web"]
        );
        assert_eq!(
            config.expose["web"],
            Expose {
                target: addr("tcp/$4:8080"),
                kind: Kind::Stream,
                allow: Some(vec!["alice".into(), "carol".into()]),
                max_connections: 10,
                udp_idle: DEFAULT_UDP_IDLE,
            }
        );
        // Shorthands are kept as written: `$4` is not equal to 127.0.0.1.
        assert_ne!(config.expose["web"].target, addr("tcp/127.0.0.1:8080"));
        let dns = &config.expose["dns"];
        assert_eq!(
            (dns.kind, dns.udp_idle),
            (Kind::Datagram, Duration::from_millis(500))
        );
        let redis = &config.expose["redis"];
        assert_eq!(redis.kind, Kind::Stream);
        assert_eq!(redis.target.host(), &Host::Path("/run/redis.sock".into()));
        assert_eq!(redis.target.port(), None);
        assert_eq!(
            config.forward["db"],
            Forward {
                listen: addr("tcp/$4:15432"),
                to_peer: "carol".into(),
                to_channel: "postgres".into(),
                mode: PathMode::Relay,
                max_connections: 65536,
                udp_idle: DEFAULT_UDP_IDLE,
            }
        );
        let syslog = &config.forward["syslog"];
        assert_eq!(kind_of(&syslog.listen), Ok(Kind::Datagram));
        assert_eq!(syslog.udp_idle, Duration::from_secs(120));
        assert_eq!(syslog.mode, PathMode::Auto);
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let config = ok(&format!(
            "{TOP}[expose.web]\ntarget = \"tcp/$4:80\"\n\
             [forward.db]\nlisten = \"tcp/$4:5432\"\nto = \"mesh/carol!db\"\n"
        ));
        assert_eq!(config.ca, None);
        assert_eq!(config.grace, Duration::from_secs(30));
        let web = &config.expose["web"];
        assert_eq!(web.allow, None);
        assert_eq!(web.max_connections, 1024);
        assert_eq!(web.udp_idle, Duration::from_secs(60));
        let db = &config.forward["db"];
        assert_eq!(db.mode, PathMode::Auto);
        assert_eq!(db.max_connections, 1024);
        assert_eq!(db.udp_idle, Duration::from_secs(60));
        // No routes at all is a valid (idle) agent; grace may be zero.
        let bare = ok(&format!("{TOP}grace = \"0s\"\n"));
        assert!(bare.expose.is_empty() && bare.forward.is_empty());
        assert_eq!(bare.grace, Duration::ZERO);
    }

    #[test]
    fn kind_of_endpoint_addresses() {
        assert_eq!(kind_of(&addr("tcp/$4:80")), Ok(Kind::Stream));
        assert_eq!(kind_of(&addr("qmesh.core.tcp/$4:80")), Ok(Kind::Stream));
        assert_eq!(kind_of(&addr("unix//run/a.sock")), Ok(Kind::Stream));
        assert_eq!(kind_of(&addr("udp/$6:53")), Ok(Kind::Datagram));
        let err = kind_of(&addr("quic/$4:7447")).unwrap_err();
        assert_eq!(err.connector, "quic");
        assert_eq!(
            err.to_string(),
            "connector \"quic\" in \"quic/$4:7447\" cannot carry a route; use tcp, unix or udp"
        );
        assert!(kind_of(&addr("mesh/bob!chat")).is_err());
        assert!(
            kind_of(&addr("Tcp/$4:80")).is_err(),
            "aliases are case-sensitive"
        );
    }

    #[test]
    fn an_address_error_carries_the_line_of_its_value() {
        let text = format!(
            "{TOP}\n# routes\n\n[expose.web]\nallow = [\"alice\"]\n\ntarget = \"tcp/$4\"\n"
        );
        assert_eq!(
            error(&text),
            "line 9: expose.web.target: \"tcp/$4\" has no port"
        );
        let err = &parse(&text).unwrap_err()[0];
        assert_eq!((err.line, err.column), (9, 10));
        // Columns count characters, not bytes; inline tables work too.
        let text =
            format!("{TOP}[forward]\n\"café\" = {{ to = \"mesh/a!b\", listen = \"tcp/$4\" }}\n");
        let err = &parse(&text).unwrap_err()[0];
        assert_eq!(
            (err.line, err.column, err.message.as_str()),
            (4, 38, "forward.\"café\".listen: \"tcp/$4\" has no port")
        );
        // Errors from the address grammar itself are passed on as they are.
        assert_eq!(
            error(&format!(
                "{TOP}[forward.x]\nlisten = \"tcp/::1:80\"\nto = \"mesh/a!b\"\n"
            )),
            "line 4: forward.x.listen: host \"::1\" in \"tcp/::1:80\" is an IPv6 address; \
             put IPv6 addresses in brackets, as in [::1]:80"
        );
    }

    #[test]
    fn endpoints_must_be_usable() {
        let target = |t: &str| error(&format!("{TOP}[expose.web]\ntarget = \"{t}\"\n"));
        assert_eq!(
            target("quic/$4:80"),
            "line 4: expose.web.target: connector \"quic\" in \"quic/$4:80\" cannot carry \
             a route; use tcp, unix or udp"
        );
        assert!(target("tcp/$4:0").contains("has port 0"));
        assert!(target("tcp/$4:80!mux").contains("has a subport"));
        assert!(target("tcp/*4:80").contains("wildcard host"));
        assert!(target("udp/0.0.0.0:53").contains("wildcard host"));
        // `unix/run/x.sock` is the relative path run/x.sock: a trap.
        assert!(target("unix/run/x.sock").contains("relative path \"run/x.sock\""));
        // A wildcard is fine to listen on, and unix: is the same as unix/.
        let config = ok(&format!(
            "{TOP}[forward.a]\nlisten = \"tcp/*4:80\"\nto = \"mesh/c!d\"\n\
             [forward.b]\nlisten = \"unix:/run/b.sock\"\nto = \"mesh/c!d\"\n"
        ));
        assert_eq!(config.forward["b"].listen.to_string(), "unix//run/b.sock");
    }

    #[test]
    fn unknown_keys_are_named_with_the_keys_allowed() {
        let text = format!(
            "{TOP}colour = \"red\"\n[expose.web]\ntarget = \"tcp/$4:80\"\nmax_conections = 5\n\
             [forward.db]\nlisten = \"tcp/$4:1\"\nto = \"mesh/a!b\"\nmod = \"auto\"\n[exposes.x]\n"
        );
        assert_eq!(
            errors(&text),
            [
                "line 3: colour: unknown key; the keys of the top of the file are \
                 coordinator, name, ca, grace, expose, forward",
                "line 6: expose.web.max_conections: unknown key; the keys of an expose \
                 route are target, allow, max_connections, udp_idle",
                "line 10: forward.db.mod: unknown key; the keys of a forward route are \
                 listen, to, mode, max_connections, udp_idle",
                "line 11: exposes: unknown key; the keys of the top of the file are \
                 coordinator, name, ca, grace, expose, forward",
            ]
        );
    }

    #[test]
    fn names_follow_the_client_and_channel_rules() {
        let text = "coordinator = \"quic/c\"\nname = \"Bob\"\n\
                    [expose.Web]\ntarget = \"tcp/$4:80\"\nallow = [\"alice\", \"Carol\", 7]\n";
        assert_eq!(
            errors(text),
            [
                "line 2: name: name \"Bob\" has 'B' at position 0; names use only a-z 0-9 . _ -",
                "line 3: expose.Web: an exposed route is a channel, and its name breaks \
                 the rules: name \"Web\" has 'W' at position 0; names use only a-z 0-9 . _ -",
                "line 5: expose.Web.allow[1]: name \"Carol\" has 'C' at position 0; \
                 names use only a-z 0-9 . _ -",
                "line 5: expose.Web.allow[2]: must be a string, not integer",
            ]
        );
        let errs = parse(text).unwrap_err();
        assert_eq!((errs[2].column, errs[3].column), (19, 28));
        assert!(error(&format!(
            "{TOP}[expose.web]\ntarget = \"tcp/$4:80\"\nallow = []\n"
        ))
        .starts_with("line 5: expose.web.allow: is empty"));
    }

    #[test]
    fn durations_are_checked() {
        let config = ok("coordinator = \"quic/c\"\nname = \"b\"\ngrace = \"1h\"\n\
             [expose.dns]\ntarget = \"udp/$4:53\"\nudp_idle = \"1500ms\"\n");
        assert_eq!(config.grace, Duration::from_secs(3600));
        assert_eq!(config.expose["dns"].udp_idle, Duration::from_millis(1500));
        let errs = errors(&format!(
            "{TOP}grace = 30\n[expose.dns]\ntarget = \"udp/$4:53\"\nudp_idle = \"0s\"\n\
             [expose.web]\ntarget = \"tcp/$4:80\"\nudp_idle = \"10s\"\n\
             [forward.f]\nlisten = \"udp/$4:9\"\nto = \"mesh/a!b\"\nudp_idle = \"soon\"\n"
        ));
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert_eq!(
            errs[0],
            "line 3: grace: must be a duration in a string, as in \"30s\", not integer"
        );
        assert_eq!(
            errs[1],
            "line 6: expose.dns.udp_idle: must be more than zero"
        );
        assert_eq!(
            errs[2],
            "line 9: expose.web.udp_idle: only udp routes have an idle time, and this \
             route's target is tcp"
        );
        assert!(
            errs[3].starts_with(
                "line 13: forward.f.udp_idle: \"soon\" is not a duration like 30s, 500ms or 2m ("
            ),
            "{}",
            errs[3]
        );
    }

    #[test]
    fn max_connections_is_from_1_to_65536() {
        let with = |n: &str| {
            parse(&format!(
                "{TOP}[expose.web]\ntarget = \"tcp/$4:80\"\nmax_connections = {n}\n"
            ))
        };
        assert_eq!(with("1").unwrap().expose["web"].max_connections, 1);
        assert_eq!(with("65536").unwrap().expose["web"].max_connections, 65536);
        assert_eq!(with("0x10").unwrap().expose["web"].max_connections, 16);
        for bad in ["0", "65537", "-1", "99999999999999999999"] {
            let errs = with(bad).unwrap_err();
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert_eq!(
                errs[0].to_string(),
                format!(
                    "line 5: expose.web.max_connections: must be an integer from 1 to 65536, \
                     not {bad}"
                )
            );
        }
        assert!(with("\"many\"").unwrap_err()[0]
            .message
            .ends_with("not string"));
    }

    #[test]
    fn forwards_go_to_a_mesh_channel_in_a_known_mode() {
        let forward = |to: &str, mode: &str| {
            error(&format!(
                "{TOP}[forward.db]\nlisten = \"tcp/$4:1\"\nto = \"{to}\"\nmode = \"{mode}\"\n"
            ))
        };
        assert_eq!(
            forward("tcp/carol:5432", "auto"),
            "line 5: forward.db.to: must be a mesh channel, as in \"mesh/carol!postgres\": \
             address \"tcp/carol:5432\" is not a mesh address; it should start with \"mesh/\""
        );
        assert!(forward("mesh/carol", "auto").contains("has no channel"));
        assert!(forward("mesh/carol:1!db", "auto").contains("has a port"));
        assert_eq!(
            forward("mesh/carol!db", "fast"),
            "line 6: forward.db.mode: \"fast\" is not a mode; use auto, direct or relay"
        );
        let config = ok(&format!(
            "{TOP}[forward.db]\nlisten = \"tcp/$4:1\"\nto = \"mesh:carol!db\"\nmode = \"direct\"\n"
        ));
        assert_eq!(config.forward["db"].mode, PathMode::Direct);
        assert_eq!(config.forward["db"].to_peer, "carol");
    }

    #[test]
    fn two_routes_cannot_listen_on_one_address() {
        let pair = |a: &str, b: &str| {
            parse(&format!(
                "{TOP}[forward.a]\nlisten = \"{a}\"\nto = \"mesh/c!d\"\n\
                 [forward.b]\nlisten = \"{b}\"\nto = \"mesh/c!d\"\n"
            ))
        };
        let errs = pair("tcp/$4:80", "tcp/127.0.0.1:80").unwrap_err();
        assert_eq!(
            errs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "line 7: forward.b.listen: \"tcp/127.0.0.1:80\" overlaps forward.a.listen \
              \"tcp/$4:80\"; two routes cannot listen on one address"
            ]
        );
        for (a, b) in [
            ("tcp/*4:80", "tcp/$4:80"),
            ("udp/*6:53", "udp/10.1.2.3:53"),
            ("tcp/$n:80", "tcp/LocalHost:80"),
            ("tcp/*4:80", "tcp/example.com:80"),
            ("unix//run/x.sock", "unix:/run/x.sock"),
        ] {
            assert!(pair(a, b).is_err(), "{a} {b}");
            assert!(pair(b, a).is_err(), "{b} {a}");
        }
        for (a, b) in [
            ("tcp/$4:80", "udp/$4:80"),
            ("tcp/$4:80", "tcp/$4:81"),
            ("tcp/$4:80", "tcp/$6:80"),
            ("tcp/*4:80", "tcp/[::1]:80"),
            ("tcp/a.example:80", "tcp/b.example:80"),
            ("unix//run/x.sock", "unix//run/y.sock"),
        ] {
            assert!(pair(a, b).is_ok(), "{a} {b}");
        }
    }

    #[test]
    fn missing_and_mistyped_values_are_reported() {
        assert_eq!(
            errors("\n[expose.web]\n\n[forward.db]\nlisten = \"tcp/$4:1\"\n"),
            [
                "line 1: coordinator: missing; it is required",
                "line 1: name: missing; it is required",
                "line 2: expose.web.target: missing from [expose.web]; it is required",
                "line 4: forward.db.to: missing from [forward.db]; it is required",
            ]
        );
        assert_eq!(
            errors("coordinator = \"tcp/c:1\"\nname = 5\nca = \"\"\nexpose = 3\n[[forward.x]]\n"),
            [
                "line 1: coordinator: address \"tcp/c:1\" is not a quic address; \
                 it should start with \"quic/\"",
                "line 2: name: must be a string, not integer",
                "line 3: ca: is empty; give the CA file's path",
                "line 4: expose: must be a table of routes, as in [expose.NAME], not integer",
                "line 5: forward.x: must be a table, as in [forward.x], not array",
            ]
        );
    }

    #[test]
    fn every_error_is_reported_in_line_order() {
        let text = r#"coordinator = "quic/c:99999"
name = "bob"
grace = "forever"

[forward.b]
listen = "tcp/$4:1"
to = "mesh/c!d"
[forward.a]
listen = "tcp/$4:1"
to = "mesh/c"
[forward.c]
listen = "tcp/127.0.0.1:1"
to = "mesh/c!e"
[expose.web]
target = "tcp/$4"
max_connections = 0
typo = 1
"#;
        let errs = parse(text).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, [1, 3, 10, 12, 15, 16, 17], "{errs:#?}");
        // forward.a is wrong, so it is not compared with the others, but
        // forward.c still clashes with forward.b.
        assert!(errs[0].message.starts_with("coordinator: port \"99999\""));
        assert!(errs[1]
            .message
            .starts_with("grace: \"forever\" is not a duration"));
        assert!(errs[2].message.starts_with("forward.a.to: "));
        assert!(errs[3]
            .message
            .starts_with("forward.c.listen: \"tcp/127.0.0.1:1\" overlaps forward.b.listen"));
        assert!(errs[4]
            .message
            .starts_with("expose.web.target: \"tcp/$4\" has no port"));
        assert!(errs[5].message.starts_with("expose.web.max_connections: "));
        assert!(errs[6].message.starts_with("expose.web.typo: unknown key"));
    }

    #[test]
    fn toml_syntax_errors_have_their_line() {
        let errs = parse("coordinator = \"quic/c\"\nname = \"bob\"\ngrace = 30s\n").unwrap_err();
        assert!(!errs.is_empty());
        assert_eq!((errs[0].line, errs[0].column), (3, 9), "{errs:#?}");
        let errs = parse("name = \"a\"\nname = \"b\"\n").unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].to_string(), "line 2: duplicate key: name");
    }

    #[test]
    fn diff_sorts_routes_into_added_removed_kept_changed() {
        let old = ok(&format!(
            "{TOP}[expose.web]\ntarget = \"tcp/$4:80\"\n[expose.ssh]\ntarget = \"tcp/$4:22\"\n\
             [forward.db]\nlisten = \"tcp/$4:1\"\nto = \"mesh/c!db\"\n\
             [forward.old]\nlisten = \"tcp/$4:2\"\nto = \"mesh/c!old\"\n"
        ));
        let new = ok(&format!(
            "{TOP}grace = \"5s\"\n[expose.web]\ntarget = \"tcp/$4:80\"\n\
             [expose.ssh]\ntarget = \"tcp/$4:22\"\nallow = [\"alice\"]\n\
             [forward.db]\nlisten = \"tcp/$4:1\"\nto = \"mesh/c!db\"\n\
             [forward.new]\nlisten = \"tcp/$4:2\"\nto = \"mesh/c!new\"\n\
             [expose.api]\ntarget = \"unix//run/api.sock\"\n"
        ));
        let changes = diff(&old, &new);
        assert_eq!(
            changes,
            Changes {
                added: vec![
                    RouteId::Expose("api".into()),
                    RouteId::Forward("new".into())
                ],
                removed: vec![RouteId::Forward("old".into())],
                kept: vec![RouteId::Expose("web".into()), RouteId::Forward("db".into())],
                changed: vec![RouteId::Expose("ssh".into())],
                identity_changed: false,
            }
        );
        assert_eq!(changes.changed[0].to_string(), "expose.ssh");
        assert_eq!(diff(&new, &new).kept.len(), 5);
        assert_eq!(diff(&new, &new).changed, []);
    }

    #[test]
    fn diff_flags_identity_changes_apart_from_routes() {
        let base = ok(&format!("{TOP}[expose.web]\ntarget = \"tcp/$4:80\"\n"));
        let mut other = base.clone();
        other.grace = Duration::from_secs(1);
        assert!(
            !diff(&base, &other).identity_changed,
            "grace is not identity"
        );
        for change in [
            |c: &mut AgentConfig| c.name = "carol".into(),
            |c: &mut AgentConfig| c.coordinator = Address::parse("quic/other").unwrap(),
            |c: &mut AgentConfig| c.ca = Some("/ca.pem".into()),
        ] {
            let mut other = base.clone();
            change(&mut other);
            let changes = diff(&base, &other);
            assert!(changes.identity_changed, "{other:?}");
            assert_eq!(changes.kept, [RouteId::Expose("web".into())]);
        }
        // A changed kind of setting counts too: udp_idle, mode, target.
        let mut other = base.clone();
        other.expose.get_mut("web").unwrap().max_connections = 5;
        assert_eq!(diff(&base, &other).changed, [RouteId::Expose("web".into())]);
    }
}
