//! Connpipe addresses: `connector/host:port!subport`.
//!
//! An address names one end of a pipe: which connector carries it, where it
//! goes, and optionally a port and a subport. Examples:
//!
//! | Address                       | Meaning                                      |
//! |-------------------------------|----------------------------------------------|
//! | `quic/coord.example.com:7447` | QUIC to a coordinator by DNS name            |
//! | `quic/*4:7447`                | QUIC, bind every IPv4 interface              |
//! | `mesh/bob!chat`               | channel `chat` of mesh client `bob`          |
//! | `tcp/[::1]:80!mux`            | TCP to IPv6 loopback, subport `mux`          |
//! | `qmesh.core.tcp/10.0.0.1:22`  | TCP, connector written with its namespace    |
//! | `unix//run/app.sock`          | Unix socket at the path `/run/app.sock`      |
//!
//! # Grammar
//!
//! The canonical form is `connector/host:port!subport`. On input the first
//! `/` may also be written `:` (`quic:$4:7447`, `unix:/run/app.sock`);
//! [`Display`](fmt::Display) always prints the canonical `/` form.
//!
//! - **connector**: one or more parts separated by `.`, each made of
//!   `a-z A-Z 0-9 _ -`. Only the last part, the *alias*, selects the
//!   connector (`qmesh.core.tcp` is the `tcp` connector); the namespace
//!   before it is kept and printed back. Aliases are matched
//!   case-sensitively: `Quic` is not `quic`.
//! - **host**: a name of `a-z A-Z 0-9 . _ -` (a DNS name or a client name),
//!   an IPv4 address, a bracketed IPv6 address (`[::1]`), or a shorthand:
//!   `$4` = 127.0.0.1, `$6` = `[::1]`, `$n` = localhost, `*4` = 0.0.0.0,
//!   `*6` = `[::]`. An unbracketed IPv6 address is rejected with a hint to
//!   bracket it.
//! - **port** (optional): `:` then a decimal number from 0 to 65535. Port 0
//!   is allowed, for "any port" binds.
//! - **subport** (optional): `!` then a name following the channel-name
//!   rules of [`crate::name`] (`a-z 0-9 . _ -`, 1 to 64 characters).
//!
//! For the `unix` alias everything after the connector, up to an optional
//! `!subport`, is a filesystem path ([`Host::Path`]), which must be
//! non-empty; such addresses have no port.
//!
//! Every parse error names the part that is wrong and quotes the input, see
//! [`AddressError`].
//!
//! # Named values
//!
//! [`Address::to_fields`] and [`Address::from_fields`] convert an address to
//! and from a list of name + [`Value`] pairs (`connector`, `host`, `port`,
//! `subport`), for configuration formats and tools that work with typed
//! fields rather than strings.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::name::{validate_channel_name, validate_client_name, NameError, MAX_NAME_LEN};

/// The port a coordinator listens on when a `quic/` address gives none.
pub const DEFAULT_COORDINATOR_PORT: u16 = 7447;

/// The alias of the mesh connector (`mesh/peer!channel`).
const MESH: &str = "mesh";
/// The alias of the QUIC connector (`quic/host:port`).
const QUIC: &str = "quic";
/// The alias of the Unix socket connector, whose host is a filesystem path.
const UNIX: &str = "unix";

/// The host reason given for an IPv6 address written without brackets.
const UNBRACKETED_IPV6: &str = "is an IPv6 address; put IPv6 addresses in brackets, as in [::1]:80";

/// Why an address, or one of its parts, was rejected.
///
/// Each variant names the part that is wrong (connector, host, port,
/// subport, path, peer, field) and quotes the input, so the message can be
/// shown to a user as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The address does not start with a connector, as in `bob!chat`.
    #[error(
        "address {input:?} has no connector; start it with one, \
         as in \"tcp/host:port\" or \"mesh/peer!channel\""
    )]
    MissingConnector {
        /// The whole input.
        input: String,
    },
    /// The connector is empty, has an empty part or a character outside
    /// `a-z A-Z 0-9 _ -`.
    #[error("connector {connector:?} in {input:?} {reason}")]
    BadConnector {
        /// The whole input.
        input: String,
        /// The connector as written.
        connector: String,
        /// What is wrong with it, phrased to follow the connector.
        reason: &'static str,
    },
    /// The host is empty, malformed, or of a kind the connector does not take.
    #[error("host {host:?} in {input:?} {reason}")]
    BadHost {
        /// The whole input.
        input: String,
        /// The host as written.
        host: String,
        /// What is wrong with it, phrased to follow the host.
        reason: &'static str,
    },
    /// The port is not a decimal number from 0 to 65535.
    #[error("port {port:?} in {input:?} is not a number from 0 to 65535")]
    BadPort {
        /// The whole input.
        input: String,
        /// The port as written.
        port: String,
    },
    /// The subport breaks the channel-name rules.
    #[error("subport {subport:?} in {input:?} {reason}")]
    BadSubport {
        /// The whole input.
        input: String,
        /// The subport as written.
        subport: String,
        /// What is wrong with it, phrased to follow the subport.
        reason: String,
    },
    /// A `unix` address has no path, as in `unix/`.
    #[error(
        "address {input:?} has an empty path; the unix connector needs a \
         filesystem path, as in \"unix//run/app.sock\""
    )]
    EmptyPath {
        /// The whole input.
        input: String,
    },
    /// A `unix` path contains a character that cannot be written in an
    /// address.
    #[error("path {path:?} in {input:?} {reason}")]
    BadPath {
        /// The whole input.
        input: String,
        /// The path as written.
        path: String,
        /// What is wrong with it, phrased to follow the path.
        reason: &'static str,
    },
    /// The peer of a `mesh/` address is not a valid client name.
    #[error("peer {peer:?} in {input:?} {reason}")]
    BadPeer {
        /// The whole input.
        input: String,
        /// The peer (host) as written.
        peer: String,
        /// What is wrong with it, phrased to follow the peer.
        reason: String,
    },
    /// A part that is required here is absent, such as the host after
    /// `tcp/` or the channel of a `mesh/` address.
    #[error("address {input:?} has no {what}; {hint}")]
    Missing {
        /// The whole input.
        input: String,
        /// The missing part.
        what: &'static str,
        /// How to add it.
        hint: &'static str,
    },
    /// A part is present that this kind of address does not take, such as
    /// a port on a `mesh/` or `unix/` address.
    #[error("address {input:?} has a {what}, but {connector} addresses do not take one")]
    Unexpected {
        /// The whole input.
        input: String,
        /// The part that should not be there.
        what: &'static str,
        /// The connector alias that does not take it.
        connector: &'static str,
    },
    /// A typed view was asked of an address with another connector.
    #[error("address {input:?} is not a {expected} address; it should start with \"{expected}/\"")]
    WrongConnector {
        /// The whole input.
        input: String,
        /// The connector alias the view needs.
        expected: &'static str,
    },
    /// A field given to [`Address::from_fields`] is unknown, missing,
    /// repeated or of the wrong type.
    #[error("field {field:?} {reason}")]
    BadField {
        /// The field name.
        field: String,
        /// What is wrong with it, phrased to follow the field name.
        reason: String,
    },
}

/// The connector part of an address: an optional dotted namespace and an
/// alias, as in `qmesh.core.tcp` (namespace `qmesh.core`, alias `tcp`).
///
/// Only the alias selects the connector; the namespace is kept so that the
/// address prints back as written. Every part is non-empty and made of
/// `a-z A-Z 0-9 _ -`, and aliases are compared case-sensitively.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Connector {
    namespace: Vec<String>,
    alias: String,
}

impl Connector {
    /// A connector with no namespace, as in `tcp`.
    ///
    /// # Errors
    ///
    /// [`AddressError::BadConnector`] if `alias` is empty or has a character
    /// outside `a-z A-Z 0-9 _ -` (a `.` included: use [`Connector::parse`]
    /// for dotted connectors).
    pub fn new(alias: &str) -> Result<Connector, AddressError> {
        Connector::with_namespace(Vec::new(), alias)
    }

    /// A connector with the given namespace parts and alias, as in
    /// `["qmesh", "core"]` and `tcp` for `qmesh.core.tcp`.
    ///
    /// # Errors
    ///
    /// [`AddressError::BadConnector`] if any part is empty or has a
    /// character outside `a-z A-Z 0-9 _ -`.
    pub fn with_namespace(
        namespace: Vec<String>,
        alias: impl Into<String>,
    ) -> Result<Connector, AddressError> {
        let connector = Connector {
            namespace,
            alias: alias.into(),
        };
        let text = connector.to_string();
        for part in connector.namespace.iter().chain([&connector.alias]) {
            check_connector_part(&text, &text, part)?;
        }
        Ok(connector)
    }

    /// Parses a connector as written in an address, as in `tcp` or
    /// `qmesh.core.tcp`.
    ///
    /// # Errors
    ///
    /// [`AddressError::BadConnector`] if `text` is empty, has an empty part
    /// (`a..b`, `.tcp`) or a character outside `a-z A-Z 0-9 _ - .`.
    pub fn parse(text: &str) -> Result<Connector, AddressError> {
        parse_connector(text, text)
    }

    /// The alias, the last part, which selects the connector.
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// The namespace parts before the alias; empty when there are none.
    pub fn namespace(&self) -> &[String] {
        &self.namespace
    }

    /// Whether this is the `unix` connector, whose host is a path.
    fn is_unix(&self) -> bool {
        self.alias == UNIX
    }
}

impl fmt::Display for Connector {
    /// Writes the namespace and alias joined with `.`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.namespace {
            write!(f, "{part}.")?;
        }
        f.write_str(&self.alias)
    }
}

/// A host shorthand: a short way to write a loopback or wildcard host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shorthand {
    /// `$4`: the IPv4 loopback address 127.0.0.1.
    Local4,
    /// `$6`: the IPv6 loopback address `[::1]`.
    Local6,
    /// `$n`: the name `localhost`, left to the resolver.
    LocalName,
    /// `*4`: the IPv4 wildcard 0.0.0.0, for binding every interface.
    Any4,
    /// `*6`: the IPv6 wildcard `[::]`, for binding every interface.
    Any6,
}

impl Shorthand {
    /// Every shorthand, in the order `$4 $6 $n *4 *6`.
    pub const ALL: [Shorthand; 5] = [
        Shorthand::Local4,
        Shorthand::Local6,
        Shorthand::LocalName,
        Shorthand::Any4,
        Shorthand::Any6,
    ];

    /// The shorthand as written in an address: `$4`, `$6`, `$n`, `*4` or `*6`.
    pub fn as_str(self) -> &'static str {
        match self {
            Shorthand::Local4 => "$4",
            Shorthand::Local6 => "$6",
            Shorthand::LocalName => "$n",
            Shorthand::Any4 => "*4",
            Shorthand::Any6 => "*6",
        }
    }

    /// The IP address the shorthand stands for; `None` for `$n`, which is a
    /// name for the resolver.
    pub fn to_ip(self) -> Option<IpAddr> {
        match self {
            Shorthand::Local4 => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Shorthand::Local6 => Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            Shorthand::LocalName => None,
            Shorthand::Any4 => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            Shorthand::Any6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        }
    }

    /// The shorthand written as `text`, if it is one.
    fn from_text(text: &str) -> Option<Shorthand> {
        Shorthand::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl fmt::Display for Shorthand {
    /// Writes the shorthand as in an address, as in `$4`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The host part of an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name or client name of `a-z A-Z 0-9 . _ -`. Never a string
    /// that reads as an IPv4 address: that is [`Host::Ipv4`].
    Name(String),
    /// An IPv4 address.
    Ipv4(Ipv4Addr),
    /// An IPv6 address, written in brackets in an address.
    Ipv6(Ipv6Addr),
    /// A shorthand such as `$4`; kept as written, not expanded.
    Shorthand(Shorthand),
    /// A filesystem path; only the `unix` connector has one.
    Path(String),
}

impl Host {
    /// The IP address of this host, if it is one without a lookup.
    ///
    /// IP hosts give their address and shorthands resolve (`$4` to
    /// 127.0.0.1, `$6` to ::1, `*4` to 0.0.0.0, `*6` to ::). Names
    /// (`localhost` included), `$n` and paths give `None`.
    pub fn to_ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ipv4(ip) => Some(IpAddr::V4(*ip)),
            Host::Ipv6(ip) => Some(IpAddr::V6(*ip)),
            Host::Shorthand(shorthand) => shorthand.to_ip(),
            Host::Name(_) | Host::Path(_) => None,
        }
    }
}

impl fmt::Display for Host {
    /// Writes the host as in an address: names and paths as is, IPv4
    /// dotted, IPv6 in brackets, shorthands as `$4` etc.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ipv4(ip) => write!(f, "{ip}"),
            Host::Ipv6(ip) => write!(f, "[{ip}]"),
            Host::Shorthand(shorthand) => f.write_str(shorthand.as_str()),
            Host::Path(path) => f.write_str(path),
        }
    }
}

/// A typed value of a named address field; see [`Address::to_fields`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// No value, as for an absent port or subport.
    Null,
    /// A boolean.
    Bool(bool),
    /// An unsigned 16-bit integer, as for a port.
    U16(u16),
    /// An unsigned 64-bit integer.
    U64(u64),
    /// A signed 64-bit integer.
    I64(i64),
    /// A floating-point number.
    F64(f64),
    /// A string.
    Str(String),
}

impl Value {
    /// The name of this value's type, for messages: `null`, `bool`, `u16`,
    /// `u64`, `i64`, `f64` or `string`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::U16(_) => "u16",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
            Value::Str(_) => "string",
        }
    }
}

/// A connpipe address: `connector/host:port!subport`.
///
/// Build one with [`Address::parse`] (or [`str::parse`]), [`Address::new`]
/// or [`Address::mesh_channel`]; every constructor checks the parts, so an
/// `Address` always prints (with [`Display`](fmt::Display)) to a string
/// that parses back to an equal value. Serde writes it as that string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    connector: Connector,
    host: Host,
    port: Option<u16>,
    subport: Option<String>,
}

impl Address {
    /// Builds an address from its parts, checking them.
    ///
    /// Errors quote the address as it would print.
    ///
    /// # Errors
    ///
    /// - [`AddressError::BadHost`] if a name host is empty, has a character
    ///   outside `a-z A-Z 0-9 . _ -` or reads as an IPv4 address; if the
    ///   connector is `unix` and the host is not a [`Host::Path`]; or if the
    ///   host is a path and the connector is not `unix`.
    /// - [`AddressError::EmptyPath`] or [`AddressError::BadPath`] if a path
    ///   is empty or contains `!` or a NUL character.
    /// - [`AddressError::Unexpected`] if a `unix` address has a port.
    /// - [`AddressError::BadSubport`] if the subport breaks the channel-name
    ///   rules.
    pub fn new(
        connector: Connector,
        host: Host,
        port: Option<u16>,
        subport: Option<String>,
    ) -> Result<Address, AddressError> {
        let address = Address {
            connector,
            host,
            port,
            subport,
        };
        address.check(&address.to_string())?;
        Ok(address)
    }

    /// The address of channel `channel` of mesh client `peer`:
    /// `mesh/peer!channel`.
    ///
    /// # Errors
    ///
    /// [`AddressError::BadPeer`] if `peer` is not a valid client name,
    /// [`AddressError::BadHost`] if it reads as an IPv4 address, and
    /// [`AddressError::BadSubport`] if `channel` is not a valid channel name.
    pub fn mesh_channel(peer: &str, channel: &str) -> Result<Address, AddressError> {
        validate_client_name(peer).map_err(|err| AddressError::BadPeer {
            input: format!("{MESH}/{peer}!{channel}"),
            peer: peer.to_owned(),
            reason: name_problem(&err, "client names"),
        })?;
        Address::new(
            Connector::new(MESH)?,
            Host::Name(peer.to_owned()),
            None,
            Some(channel.to_owned()),
        )
    }

    /// Parses an address; the same as [`str::parse`].
    ///
    /// Accepts the canonical `connector/host:port!subport` and the
    /// `connector:host:port!subport` form; see the [module docs](self).
    ///
    /// # Errors
    ///
    /// An [`AddressError`] naming the part that is wrong and quoting
    /// `input`.
    pub fn parse(input: &str) -> Result<Address, AddressError> {
        let (connector_text, rest) = split_connector(input)?;
        let connector = parse_connector(input, connector_text)?;
        let (main, subport) = match rest.split_once('!') {
            Some((main, subport)) => (main, Some(subport)),
            None => (rest, None),
        };
        let (host, port) = if connector.is_unix() {
            (parse_path(input, main)?, None)
        } else {
            parse_host_port(input, main)?
        };
        let address = Address {
            connector,
            host,
            port,
            subport: subport.map(str::to_owned),
        };
        address.check(input)?;
        Ok(address)
    }

    /// The connector.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The port, if one was given.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The subport (the part after `!`), if one was given.
    pub fn subport(&self) -> Option<&str> {
        self.subport.as_deref()
    }

    /// The socket address of this address, when the host is an IP address
    /// or a shorthand that resolves to one (see [`Host::to_ip`]); the port
    /// is `default_port` when the address has none.
    pub fn socket_addr(&self, default_port: u16) -> Option<SocketAddr> {
        let ip = self.host.to_ip()?;
        Some(SocketAddr::new(ip, self.port.unwrap_or(default_port)))
    }

    /// Reads a `mesh/peer!channel` address as `(peer, channel)`.
    ///
    /// # Errors
    ///
    /// - [`AddressError::WrongConnector`] if the alias is not `mesh`.
    /// - [`AddressError::BadPeer`] if the host is not a valid client name.
    /// - [`AddressError::Unexpected`] if there is a port.
    /// - [`AddressError::Missing`] if there is no subport (the channel).
    pub fn mesh(&self) -> Result<(&str, &str), AddressError> {
        if self.connector.alias != MESH {
            return Err(AddressError::WrongConnector {
                input: self.to_string(),
                expected: MESH,
            });
        }
        let Host::Name(peer) = &self.host else {
            return Err(AddressError::BadPeer {
                input: self.to_string(),
                peer: self.host.to_string(),
                reason: "is not a client name; mesh addresses name a peer, as in mesh/bob!chat"
                    .to_owned(),
            });
        };
        validate_client_name(peer).map_err(|err| AddressError::BadPeer {
            input: self.to_string(),
            peer: peer.clone(),
            reason: name_problem(&err, "client names"),
        })?;
        if self.port.is_some() {
            return Err(AddressError::Unexpected {
                input: self.to_string(),
                what: "port",
                connector: MESH,
            });
        }
        let Some(channel) = &self.subport else {
            return Err(AddressError::Missing {
                input: self.to_string(),
                what: "channel",
                hint: "write it after '!', as in \"mesh/bob!chat\"",
            });
        };
        Ok((peer, channel))
    }

    /// Reads a `quic/host:port` address as `(host, port)`, the port being
    /// [`DEFAULT_COORDINATOR_PORT`] when none is given.
    ///
    /// # Errors
    ///
    /// [`AddressError::WrongConnector`] if the alias is not `quic`, and
    /// [`AddressError::Unexpected`] if there is a subport.
    pub fn quic_endpoint(&self) -> Result<(&Host, u16), AddressError> {
        if self.connector.alias != QUIC {
            return Err(AddressError::WrongConnector {
                input: self.to_string(),
                expected: QUIC,
            });
        }
        if self.subport.is_some() {
            return Err(AddressError::Unexpected {
                input: self.to_string(),
                what: "subport",
                connector: QUIC,
            });
        }
        Ok((&self.host, self.port.unwrap_or(DEFAULT_COORDINATOR_PORT)))
    }

    /// The address as named values, in this order:
    ///
    /// - `connector`: [`Value::Str`], dotted with its namespace;
    /// - `host`: [`Value::Str`], as the host prints (`$4`, `[::1]`,
    ///   `/run/app.sock`, …);
    /// - `port`: [`Value::U16`] or [`Value::Null`];
    /// - `subport`: [`Value::Str`] or [`Value::Null`].
    pub fn to_fields(&self) -> Vec<(String, Value)> {
        vec![
            (
                "connector".to_owned(),
                Value::Str(self.connector.to_string()),
            ),
            ("host".to_owned(), Value::Str(self.host.to_string())),
            ("port".to_owned(), self.port.map_or(Value::Null, Value::U16)),
            (
                "subport".to_owned(),
                self.subport.clone().map_or(Value::Null, Value::Str),
            ),
        ]
    }

    /// Builds an address from named values, as made by
    /// [`Address::to_fields`].
    ///
    /// `connector` and `host` are required strings. `port` may be a
    /// [`Value::U16`], or a [`Value::U64`] or [`Value::I64`] from 0 to
    /// 65535; `port` and `subport` may be [`Value::Null`] or left out. The
    /// order of the fields does not matter.
    ///
    /// # Errors
    ///
    /// [`AddressError::BadField`] for an unknown, repeated or missing field
    /// or a value of the wrong type; otherwise the error of the part that
    /// is wrong, as from [`Connector::parse`] and [`Address::new`].
    pub fn from_fields(fields: &[(String, Value)]) -> Result<Address, AddressError> {
        let mut connector = None;
        let mut host = None;
        let mut port = None;
        let mut subport = None;
        for (field, value) in fields {
            match field.as_str() {
                "connector" => set_once(&mut connector, field, field_str(field, value)?)?,
                "host" => set_once(&mut host, field, field_str(field, value)?)?,
                "port" => set_once(&mut port, field, field_port(field, value)?)?,
                "subport" => set_once(&mut subport, field, field_subport(field, value)?)?,
                _ => {
                    return Err(AddressError::BadField {
                        field: field.clone(),
                        reason: "is not an address field; \
                                 the fields are connector, host, port and subport"
                            .to_owned(),
                    })
                }
            }
        }
        let connector = Connector::parse(connector.ok_or_else(|| missing_field("connector"))?)?;
        let host_text = host.ok_or_else(|| missing_field("host"))?;
        let host = parse_host_text(host_text, host_text, connector.is_unix())?;
        Address::new(
            connector,
            host,
            port.flatten(),
            subport.flatten().map(str::to_owned),
        )
    }

    /// Checks the parts that a caller could get wrong; errors quote
    /// `input`.
    fn check(&self, input: &str) -> Result<(), AddressError> {
        match (&self.host, self.connector.is_unix()) {
            (Host::Path(path), true) => check_path(input, path)?,
            (Host::Path(path), false) => {
                return Err(AddressError::BadHost {
                    input: input.to_owned(),
                    host: path.clone(),
                    reason: "is a filesystem path, which only the unix connector takes",
                })
            }
            (host, true) => {
                return Err(AddressError::BadHost {
                    input: input.to_owned(),
                    host: host.to_string(),
                    reason: "is not a filesystem path; the unix connector takes a path, \
                             as in unix//run/app.sock",
                })
            }
            (Host::Name(name), false) => check_name_host(input, name)?,
            (Host::Ipv4(_) | Host::Ipv6(_) | Host::Shorthand(_), false) => {}
        }
        if self.port.is_some() && self.connector.is_unix() {
            return Err(AddressError::Unexpected {
                input: input.to_owned(),
                what: "port",
                connector: UNIX,
            });
        }
        if let Some(subport) = &self.subport {
            check_subport(input, subport)?;
        }
        Ok(())
    }
}

impl FromStr for Address {
    type Err = AddressError;

    /// Parses an address; see [`Address::parse`].
    fn from_str(input: &str) -> Result<Address, AddressError> {
        Address::parse(input)
    }
}

impl fmt::Display for Address {
    /// Writes the canonical form `connector/host[:port][!subport]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.connector, self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        if let Some(subport) = &self.subport {
            write!(f, "!{subport}")?;
        }
        Ok(())
    }
}

impl Serialize for Address {
    /// Serializes the address as its canonical string.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Address {
    /// Deserializes an address from a string, parsing it.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Address, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Splits `input` at the first `/` or `:` into the connector and the rest.
fn split_connector(input: &str) -> Result<(&str, &str), AddressError> {
    let Some(at) = input.find(['/', ':']) else {
        // A bare connector such as `tcp` is missing its host, not its
        // connector.
        if !input.is_empty() && parse_connector(input, input).is_ok() {
            return Err(AddressError::Missing {
                input: input.to_owned(),
                what: "host",
                hint: "write it after the connector and a '/', as in \"tcp/$4:8080\"",
            });
        }
        return Err(AddressError::MissingConnector {
            input: input.to_owned(),
        });
    };
    let connector = &input[..at];
    // An empty prefix, or one that starts like a host (`[::1]:80`,
    // `$4:80`) or holds a subport, means the connector was left out.
    if connector.is_empty() || connector.contains(['!', '[', '$', '*']) {
        return Err(AddressError::MissingConnector {
            input: input.to_owned(),
        });
    }
    Ok((connector, &input[at + 1..]))
}

/// Parses the connector `text` found in `input`.
fn parse_connector(input: &str, text: &str) -> Result<Connector, AddressError> {
    let mut parts: Vec<String> = Vec::new();
    for part in text.split('.') {
        check_connector_part(input, text, part)?;
        parts.push(part.to_owned());
    }
    // `split` yields at least one part, and each was checked non-empty.
    let alias = parts.pop().unwrap_or_default();
    Ok(Connector {
        namespace: parts,
        alias,
    })
}

/// Checks one dot-separated part of the connector `text` found in `input`.
fn check_connector_part(input: &str, text: &str, part: &str) -> Result<(), AddressError> {
    let reason = if text.is_empty() {
        "is empty; an address starts with a connector such as tcp, quic or mesh"
    } else if part.is_empty() {
        "has an empty part; separate its parts with single dots, as in qmesh.core.tcp"
    } else if !part
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
    {
        "may use only a-z A-Z 0-9 _ - between its dots"
    } else {
        return Ok(());
    };
    Err(AddressError::BadConnector {
        input: input.to_owned(),
        connector: text.to_owned(),
        reason,
    })
}

/// Parses `host[:port]` (the text between the connector and any `!`) of a
/// network address.
fn parse_host_port(input: &str, text: &str) -> Result<(Host, Option<u16>), AddressError> {
    if let Some(after_open) = text.strip_prefix('[') {
        let Some(close) = after_open.find(']') else {
            return Err(bad_host(
                input,
                text,
                "has '[' but no closing ']'; write IPv6 addresses as [::1]",
            ));
        };
        // `close` indexes `after_open`; the host keeps both brackets.
        let (host_text, after) = text.split_at(close + 2);
        let host = parse_bracketed(input, host_text)?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(parse_port(input, port)?),
            None if after.is_empty() => None,
            None => {
                return Err(bad_host(
                    input,
                    text,
                    "has text after ']'; write a port after a ':', as in [::1]:80",
                ))
            }
        };
        return Ok((host, port));
    }
    match text.matches(':').count() {
        0 => Ok((parse_plain_host(input, text)?, None)),
        1 => {
            let (host, port) = text.split_once(':').unwrap_or((text, ""));
            let host = parse_plain_host(input, host)?;
            Ok((host, Some(parse_port(input, port)?)))
        }
        _ => {
            // Quote just the IPv6 address if the text is one followed by
            // a port (`::1:80` reads best as `[::1]:80`), or the whole text.
            let host = match text.rsplit_once(':') {
                Some((host, _)) if host.parse::<Ipv6Addr>().is_ok() => host,
                _ => text,
            };
            let reason = if host.parse::<Ipv6Addr>().is_ok() {
                UNBRACKETED_IPV6
            } else {
                "has more than one ':'; a host takes at most one ':port', \
                 and IPv6 addresses go in brackets, as in [::1]:80"
            };
            Err(bad_host(input, host, reason))
        }
    }
}

/// Parses a host given on its own (as in [`Address::from_fields`]); `unix`
/// says whether it is a path.
fn parse_host_text(input: &str, text: &str, unix: bool) -> Result<Host, AddressError> {
    if unix {
        return parse_path(input, text);
    }
    if text.starts_with('[') {
        if text.len() < 2 || !text.ends_with(']') {
            return Err(bad_host(
                input,
                text,
                "has '[' but does not end with ']'; write IPv6 addresses as [::1]",
            ));
        }
        return parse_bracketed(input, text);
    }
    parse_plain_host(input, text)
}

/// Parses a bracketed IPv6 host such as `[::1]`; `text` has both brackets.
fn parse_bracketed(input: &str, text: &str) -> Result<Host, AddressError> {
    text.get(1..text.len() - 1)
        .and_then(|inner| inner.parse::<Ipv6Addr>().ok())
        .map(Host::Ipv6)
        .ok_or_else(|| {
            bad_host(
                input,
                text,
                "is not an IPv6 address; brackets hold IPv6 addresses only, as in [::1]",
            )
        })
}

/// Parses an unbracketed host: a shorthand, an IPv4 address or a name.
fn parse_plain_host(input: &str, text: &str) -> Result<Host, AddressError> {
    if let Some(shorthand) = Shorthand::from_text(text) {
        return Ok(Host::Shorthand(shorthand));
    }
    if text.starts_with(['$', '*']) {
        return Err(bad_host(
            input,
            text,
            "is not a known shorthand; use $4, $6, $n, *4 or *6",
        ));
    }
    if let Ok(ip) = text.parse::<Ipv4Addr>() {
        return Ok(Host::Ipv4(ip));
    }
    if text.parse::<Ipv6Addr>().is_ok() {
        return Err(bad_host(input, text, UNBRACKETED_IPV6));
    }
    check_name_host(input, text)?;
    Ok(Host::Name(text.to_owned()))
}

/// Checks a name host: non-empty, `a-z A-Z 0-9 . _ -`, not an IPv4 address.
fn check_name_host(input: &str, name: &str) -> Result<(), AddressError> {
    let reason = if name.is_empty() {
        "is empty; write a name, an IP address or a shorthand such as $4"
    } else if !name
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
    {
        "may use only a-z A-Z 0-9 . _ -, unless it is an IP address or a shorthand such as $4"
    } else if name.parse::<Ipv4Addr>().is_ok() {
        "reads as an IPv4 address, so it cannot be a host name"
    } else {
        return Ok(());
    };
    Err(bad_host(input, name, reason))
}

/// Parses the path of a `unix` address.
fn parse_path(input: &str, text: &str) -> Result<Host, AddressError> {
    check_path(input, text)?;
    Ok(Host::Path(text.to_owned()))
}

/// Checks a `unix` path: non-empty, no `!` (which starts a subport), no NUL.
fn check_path(input: &str, path: &str) -> Result<(), AddressError> {
    if path.is_empty() {
        return Err(AddressError::EmptyPath {
            input: input.to_owned(),
        });
    }
    let reason = if path.contains('!') {
        "contains '!', which would start a subport"
    } else if path.contains('\0') {
        "contains a NUL character"
    } else {
        return Ok(());
    };
    Err(AddressError::BadPath {
        input: input.to_owned(),
        path: path.to_owned(),
        reason,
    })
}

/// Parses a port: decimal digits only, 0 to 65535.
fn parse_port(input: &str, text: &str) -> Result<u16, AddressError> {
    // `u16::from_str` also takes a leading `+`; a port is digits only.
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(port) = text.parse() {
            return Ok(port);
        }
    }
    Err(AddressError::BadPort {
        input: input.to_owned(),
        port: text.to_owned(),
    })
}

/// Checks a subport against the channel-name rules.
fn check_subport(input: &str, subport: &str) -> Result<(), AddressError> {
    validate_channel_name(subport).map_err(|err| AddressError::BadSubport {
        input: input.to_owned(),
        subport: subport.to_owned(),
        reason: name_problem(&err, "subports"),
    })
}

/// Rephrases a name error to follow the quoted name, for example
/// `has 'C' at position 0; subports use only a-z 0-9 . _ -`; `kind` is the
/// plural of what the name is.
fn name_problem(err: &NameError, kind: &str) -> String {
    match err {
        NameError::Empty => {
            format!("is empty; {kind} are 1 to {MAX_NAME_LEN} characters of a-z 0-9 . _ -")
        }
        NameError::TooLong { len, .. } => {
            format!("is {len} characters long; {kind} are at most {MAX_NAME_LEN}")
        }
        NameError::BadChar { ch, index, .. } => {
            format!("has {ch:?} at position {index}; {kind} use only a-z 0-9 . _ -")
        }
    }
}

/// A [`AddressError::BadHost`] for `host` in `input`.
fn bad_host(input: &str, host: &str, reason: &'static str) -> AddressError {
    AddressError::BadHost {
        input: input.to_owned(),
        host: host.to_owned(),
        reason,
    }
}

/// Stores a field value, refusing a second one.
fn set_once<T>(slot: &mut Option<T>, field: &str, value: T) -> Result<(), AddressError> {
    if slot.is_some() {
        return Err(AddressError::BadField {
            field: field.to_owned(),
            reason: "is given more than once".to_owned(),
        });
    }
    *slot = Some(value);
    Ok(())
}

/// The error for a required field that is absent.
fn missing_field(field: &str) -> AddressError {
    AddressError::BadField {
        field: field.to_owned(),
        reason: "is missing; an address needs a connector and a host".to_owned(),
    }
}

/// The error for a field whose value has the wrong type.
fn wrong_type(field: &str, expected: &str, value: &Value) -> AddressError {
    AddressError::BadField {
        field: field.to_owned(),
        reason: format!("must be {expected}, not {}", value.type_name()),
    }
}

/// Reads a required string field.
fn field_str<'a>(field: &str, value: &'a Value) -> Result<&'a str, AddressError> {
    match value {
        Value::Str(text) => Ok(text),
        _ => Err(wrong_type(field, "a string", value)),
    }
}

/// Reads the port field: a number from 0 to 65535, or null.
fn field_port(field: &str, value: &Value) -> Result<Option<u16>, AddressError> {
    let out_of_range = |n: &dyn fmt::Display| AddressError::BadField {
        field: field.to_owned(),
        reason: format!("must be from 0 to 65535, not {n}"),
    };
    match value {
        Value::Null => Ok(None),
        Value::U16(port) => Ok(Some(*port)),
        Value::U64(n) => u16::try_from(*n).map(Some).map_err(|_| out_of_range(n)),
        Value::I64(n) => u16::try_from(*n).map(Some).map_err(|_| out_of_range(n)),
        _ => Err(wrong_type(field, "a u16 or null", value)),
    }
}

/// Reads the subport field: a string or null.
fn field_subport<'a>(field: &str, value: &'a Value) -> Result<Option<&'a str>, AddressError> {
    match value {
        Value::Null => Ok(None),
        Value::Str(text) => Ok(Some(text)),
        _ => Err(wrong_type(field, "a string or null", value)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use proptest::prelude::*;

    use super::*;

    fn parse(input: &str) -> Address {
        match Address::parse(input) {
            Ok(address) => address,
            Err(err) => panic!("{input:?} should parse: {err}"),
        }
    }

    fn parse_err(input: &str) -> AddressError {
        match Address::parse(input) {
            Ok(address) => panic!("{input:?} should not parse, got {address:?}"),
            Err(err) => err,
        }
    }

    fn connector(text: &str) -> Connector {
        Connector::parse(text).unwrap()
    }

    fn address(c: &str, host: Host, port: Option<u16>, subport: Option<&str>) -> Address {
        Address::new(connector(c), host, port, subport.map(str::to_owned)).unwrap()
    }

    fn name(text: &str) -> Host {
        Host::Name(text.to_owned())
    }

    // ---- the examples from the design ----

    #[test]
    fn design_examples_parse_to_the_expected_parts() {
        let cases = [
            (
                "quic/coord.example.com:7447",
                address("quic", name("coord.example.com"), Some(7447), None),
            ),
            (
                "quic/*4:7447",
                address("quic", Host::Shorthand(Shorthand::Any4), Some(7447), None),
            ),
            (
                "quic:$4:7447",
                address("quic", Host::Shorthand(Shorthand::Local4), Some(7447), None),
            ),
            (
                "quic/$4",
                address("quic", Host::Shorthand(Shorthand::Local4), None, None),
            ),
            (
                "mesh/bob!chat",
                address("mesh", name("bob"), None, Some("chat")),
            ),
            (
                "mesh:bob!chat",
                address("mesh", name("bob"), None, Some("chat")),
            ),
            (
                "tcp/$4:8080",
                address("tcp", Host::Shorthand(Shorthand::Local4), Some(8080), None),
            ),
            (
                "udp/*6:53",
                address("udp", Host::Shorthand(Shorthand::Any6), Some(53), None),
            ),
            (
                "tcp/[::1]:80!mux",
                address(
                    "tcp",
                    Host::Ipv6(Ipv6Addr::LOCALHOST),
                    Some(80),
                    Some("mux"),
                ),
            ),
            (
                "qmesh.core.tcp/10.0.0.1:22",
                address(
                    "qmesh.core.tcp",
                    Host::Ipv4(Ipv4Addr::new(10, 0, 0, 1)),
                    Some(22),
                    None,
                ),
            ),
            (
                "unix//run/app.sock",
                address("unix", Host::Path("/run/app.sock".into()), None, None),
            ),
            (
                "unix:/run/app.sock",
                address("unix", Host::Path("/run/app.sock".into()), None, None),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input), expected, "{input}");
        }
    }

    #[test]
    fn canonical_inputs_display_unchanged() {
        for input in [
            "quic/coord.example.com:7447",
            "quic/*4:7447",
            "quic/$4",
            "mesh/bob!chat",
            "tcp/$4:8080",
            "udp/*6:53",
            "tcp/[::1]:80!mux",
            "qmesh.core.tcp/10.0.0.1:22",
            "unix//run/app.sock",
            "unix/relative.sock!sub",
            "tcp/1.2.3.4:0",
        ] {
            assert_eq!(parse(input).to_string(), input);
        }
    }

    #[test]
    fn colon_form_equals_slash_form_and_displays_with_slash() {
        for (colon, slash) in [
            ("quic:$4:7447", "quic/$4:7447"),
            ("mesh:bob!chat", "mesh/bob!chat"),
            ("unix:/run/app.sock", "unix//run/app.sock"),
            ("tcp:[::1]:80!mux", "tcp/[::1]:80!mux"),
            ("qmesh.core.tcp:10.0.0.1:22", "qmesh.core.tcp/10.0.0.1:22"),
        ] {
            assert_eq!(parse(colon), parse(slash), "{colon}");
            assert_eq!(parse(colon).to_string(), slash);
        }
    }

    #[test]
    fn every_shorthand_parses_displays_and_resolves() {
        let cases = [
            (
                "$4",
                Shorthand::Local4,
                Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ),
            (
                "$6",
                Shorthand::Local6,
                Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ),
            ("$n", Shorthand::LocalName, None),
            (
                "*4",
                Shorthand::Any4,
                Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            ),
            (
                "*6",
                Shorthand::Any6,
                Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            ),
        ];
        for (text, shorthand, ip) in cases {
            let a = parse(&format!("tcp/{text}:1"));
            assert_eq!(a.host(), &Host::Shorthand(shorthand));
            assert_eq!(a.host().to_string(), text);
            assert_eq!(shorthand.to_string(), text);
            assert_eq!(a.to_string(), format!("tcp/{text}:1"), "kept, not expanded");
            assert_eq!(a.host().to_ip(), ip);
        }
        assert_eq!(Shorthand::ALL.len(), 5);
    }

    #[test]
    fn connector_namespace_and_alias() {
        let a = parse("qmesh.core.tcp/10.0.0.1:22");
        assert_eq!(a.connector().alias(), "tcp");
        assert_eq!(a.connector().namespace(), ["qmesh", "core"]);
        assert_eq!(a.connector().to_string(), "qmesh.core.tcp");

        let plain = Connector::new("tcp").unwrap();
        assert!(plain.namespace().is_empty());
        assert_eq!(plain.to_string(), "tcp");
        assert_eq!(
            Connector::with_namespace(vec!["qmesh".into(), "core".into()], "tcp").unwrap(),
            connector("qmesh.core.tcp")
        );
        // The namespace is kept, so it distinguishes addresses.
        assert_ne!(parse("qmesh.core.tcp/$4"), parse("tcp/$4"));
    }

    #[test]
    fn connector_errors() {
        for bad in ["", ".tcp", "tcp.", "a..b", "t cp", "tc:p", "qmesh.core/tcp"] {
            assert!(
                matches!(
                    Connector::parse(bad),
                    Err(AddressError::BadConnector { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Connector::new("qmesh.tcp"),
            Err(AddressError::BadConnector { .. })
        ));
        assert!(matches!(
            Connector::with_namespace(vec![String::new()], "tcp"),
            Err(AddressError::BadConnector { .. })
        ));
        assert_eq!(
            parse_err("a..b/$4"),
            AddressError::BadConnector {
                input: "a..b/$4".into(),
                connector: "a..b".into(),
                reason: "has an empty part; separate its parts with single dots, \
                         as in qmesh.core.tcp",
            }
        );
        assert!(matches!(
            parse_err("tc p/$4"),
            AddressError::BadConnector { connector, .. } if connector == "tc p"
        ));
    }

    #[test]
    fn aliases_are_case_sensitive() {
        let a = parse("Quic/$4:7447");
        assert_eq!(a.connector().alias(), "Quic");
        assert!(matches!(
            a.quic_endpoint(),
            Err(AddressError::WrongConnector {
                expected: "quic",
                ..
            })
        ));
        // `UNIX` is not the unix connector, so its host is not a path.
        assert!(matches!(
            parse_err("UNIX//run/app.sock"),
            AddressError::BadHost { .. }
        ));
    }

    #[test]
    fn hosts_of_each_kind() {
        assert_eq!(parse("tcp/localhost").host(), &name("localhost"));
        assert_eq!(parse("tcp/Node_1-a.B").host(), &name("Node_1-a.B"));
        assert_eq!(
            parse("tcp/192.168.1.2").host(),
            &Host::Ipv4(Ipv4Addr::new(192, 168, 1, 2))
        );
        // Not quite an IPv4 address, so it is a name.
        assert_eq!(parse("tcp/1.2.3").host(), &name("1.2.3"));
        assert_eq!(
            parse("tcp/[fe80::1]").host(),
            &Host::Ipv6("fe80::1".parse().unwrap())
        );
        assert_eq!(parse("tcp/[::1]").port(), None);
    }

    #[test]
    fn host_display() {
        assert_eq!(name("a.b").to_string(), "a.b");
        assert_eq!(Host::Ipv4(Ipv4Addr::new(1, 2, 3, 4)).to_string(), "1.2.3.4");
        assert_eq!(Host::Ipv6(Ipv6Addr::LOCALHOST).to_string(), "[::1]");
        assert_eq!(Host::Shorthand(Shorthand::Any6).to_string(), "*6");
        assert_eq!(Host::Path("/x".into()).to_string(), "/x");
    }

    #[test]
    fn host_to_ip() {
        assert_eq!(name("localhost").to_ip(), None);
        assert_eq!(name("example.com").to_ip(), None);
        assert_eq!(Host::Path("/x".into()).to_ip(), None);
        assert_eq!(
            Host::Ipv4(Ipv4Addr::new(1, 2, 3, 4)).to_ip(),
            Some(IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)))
        );
        assert_eq!(
            Host::Ipv6(Ipv6Addr::LOCALHOST).to_ip(),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
    }

    #[test]
    fn ports() {
        assert_eq!(parse("tcp/$4:0").port(), Some(0));
        assert_eq!(parse("tcp/$4:65535").port(), Some(65535));
        assert_eq!(parse("tcp/$4").port(), None);
        for bad in [
            "tcp/$4:65536",
            "tcp/$4:",
            "tcp/$4:+80",
            "tcp/$4:-1",
            "tcp/$4:8o",
        ] {
            assert!(
                matches!(parse_err(bad), AddressError::BadPort { .. }),
                "{bad}"
            );
        }
    }

    #[test]
    fn subports() {
        assert_eq!(parse("tcp/$4:80!mux").subport(), Some("mux"));
        assert_eq!(parse("tcp/$4:80").subport(), None);
        assert_eq!(parse("unix//run/a.sock!x.y_z-1").subport(), Some("x.y_z-1"));
        assert!(matches!(
            parse_err("mesh/bob!"),
            AddressError::BadSubport { subport, .. } if subport.is_empty()
        ));
        assert!(matches!(
            parse_err("mesh/bob!a!b"),
            AddressError::BadSubport { subport, .. } if subport == "a!b"
        ));
        let long = format!("mesh/bob!{}", "c".repeat(65));
        assert!(matches!(parse_err(&long), AddressError::BadSubport { .. }));
    }

    #[test]
    fn unix_paths() {
        assert_eq!(
            parse("unix/app.sock").host(),
            &Host::Path("app.sock".into())
        );
        assert_eq!(
            parse("unix//tmp/a:b").host(),
            &Host::Path("/tmp/a:b".into()),
            "the whole rest is the path"
        );
        assert_eq!(
            parse("qmesh.unix//run/x").host(),
            &Host::Path("/run/x".into()),
            "only the alias selects the connector"
        );
        assert_eq!(parse("unix//run/x").port(), None);
        assert!(matches!(parse_err("unix/\0"), AddressError::BadPath { .. }));
    }

    // ---- error cases: which part is named ----

    #[test]
    fn error_missing_connector() {
        for input in ["bob!chat", "", "/run/app.sock", "[::1]:80", "$4:80", "*4"] {
            assert_eq!(
                parse_err(input),
                AddressError::MissingConnector {
                    input: input.into()
                },
                "{input:?}"
            );
        }
        assert_eq!(
            parse_err("bob!chat").to_string(),
            "address \"bob!chat\" has no connector; start it with one, \
             as in \"tcp/host:port\" or \"mesh/peer!channel\""
        );
    }

    #[test]
    fn error_bare_connector_is_missing_host() {
        assert!(matches!(
            parse_err("tcp"),
            AddressError::Missing { what: "host", .. }
        ));
    }

    #[test]
    fn error_bad_port() {
        let err = parse_err("tcp/$4:99999");
        assert_eq!(
            err,
            AddressError::BadPort {
                input: "tcp/$4:99999".into(),
                port: "99999".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "port \"99999\" in \"tcp/$4:99999\" is not a number from 0 to 65535"
        );
    }

    #[test]
    fn error_unbracketed_ipv6() {
        let err = parse_err("tcp/::1:80");
        assert_eq!(
            err,
            AddressError::BadHost {
                input: "tcp/::1:80".into(),
                host: "::1".into(),
                reason: UNBRACKETED_IPV6,
            }
        );
        assert!(err.to_string().contains("brackets"), "{err}");
        assert!(matches!(
            parse_err("tcp/fe80::1"),
            AddressError::BadHost { host, reason: UNBRACKETED_IPV6, .. } if host == "fe80::1"
        ));
        assert!(matches!(
            parse_err("tcp/a:b:c"),
            AddressError::BadHost { host, .. } if host == "a:b:c"
        ));
    }

    #[test]
    fn error_bad_brackets() {
        for (input, host) in [
            ("tcp/[::1", "[::1"),
            ("tcp/[1.2.3.4]:80", "[1.2.3.4]"),
            ("tcp/[::1]80", "[::1]80"),
            ("tcp/[]", "[]"),
        ] {
            assert!(
                matches!(parse_err(input), AddressError::BadHost { host: h, .. } if h == host),
                "{input}"
            );
        }
    }

    #[test]
    fn error_empty_host() {
        let err = parse_err("tcp/:80");
        assert!(
            matches!(&err, AddressError::BadHost { host, .. } if host.is_empty()),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "host \"\" in \"tcp/:80\" is empty; write a name, an IP address or a shorthand such as $4"
        );
        assert!(matches!(parse_err("quic/"), AddressError::BadHost { .. }));
        assert!(matches!(
            parse_err("mesh/!chat"),
            AddressError::BadHost { .. }
        ));
    }

    #[test]
    fn error_bad_host_chars_and_shorthands() {
        assert!(matches!(
            parse_err("tcp/a b"),
            AddressError::BadHost { host, .. } if host == "a b"
        ));
        assert!(matches!(
            parse_err("tcp/$5:80"),
            AddressError::BadHost { host, .. } if host == "$5"
        ));
        assert!(matches!(
            parse_err("tcp//run/x"),
            AddressError::BadHost { .. }
        ));
    }

    #[test]
    fn error_bad_subport() {
        let err = parse_err("mesh/bob!Chat");
        assert_eq!(
            err,
            AddressError::BadSubport {
                input: "mesh/bob!Chat".into(),
                subport: "Chat".into(),
                reason: "has 'C' at position 0; subports use only a-z 0-9 . _ -".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            "subport \"Chat\" in \"mesh/bob!Chat\" has 'C' at position 0; \
             subports use only a-z 0-9 . _ -"
        );
    }

    #[test]
    fn error_empty_path() {
        for input in ["unix/", "unix:", "unix/!sub"] {
            assert_eq!(
                parse_err(input),
                AddressError::EmptyPath {
                    input: input.into()
                }
            );
        }
        assert!(parse_err("unix/").to_string().contains("empty path"));
    }

    // ---- Address::new ----

    #[test]
    fn new_validates_parts() {
        let tcp = || connector("tcp");
        let unix = || connector("unix");
        assert!(matches!(
            Address::new(tcp(), name(""), None, None),
            Err(AddressError::BadHost { .. })
        ));
        assert!(matches!(
            Address::new(tcp(), name("a:b"), None, None),
            Err(AddressError::BadHost { .. })
        ));
        assert!(
            matches!(
                Address::new(tcp(), name("1.2.3.4"), None, None),
                Err(AddressError::BadHost { .. })
            ),
            "would print as an IPv4 host"
        );
        assert!(matches!(
            Address::new(tcp(), Host::Path("/x".into()), None, None),
            Err(AddressError::BadHost { .. })
        ));
        assert!(matches!(
            Address::new(unix(), name("x"), None, None),
            Err(AddressError::BadHost { .. })
        ));
        assert!(matches!(
            Address::new(unix(), Host::Path(String::new()), None, None),
            Err(AddressError::EmptyPath { .. })
        ));
        assert!(matches!(
            Address::new(unix(), Host::Path("/a!b".into()), None, None),
            Err(AddressError::BadPath { .. })
        ));
        assert_eq!(
            Address::new(unix(), Host::Path("/x".into()), Some(1), None),
            Err(AddressError::Unexpected {
                input: "unix//x:1".into(),
                what: "port",
                connector: "unix"
            })
        );
        assert!(matches!(
            Address::new(tcp(), name("h"), None, Some("Bad".into())),
            Err(AddressError::BadSubport { .. })
        ));
        let ok = Address::new(tcp(), name("h"), Some(1), Some("s".into())).unwrap();
        assert_eq!(ok.to_string(), "tcp/h:1!s");
    }

    // ---- typed views ----

    #[test]
    fn socket_addr() {
        assert_eq!(
            parse("tcp/$4:8080").socket_addr(1),
            Some(SocketAddr::from(([127, 0, 0, 1], 8080)))
        );
        assert_eq!(
            parse("udp/*6").socket_addr(53),
            Some(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 53)))
        );
        assert_eq!(
            parse("tcp/[::1]:80").socket_addr(1),
            Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 80)))
        );
        assert_eq!(parse("tcp/$n:80").socket_addr(1), None);
        assert_eq!(parse("tcp/localhost:80").socket_addr(1), None);
        assert_eq!(parse("unix//run/x").socket_addr(1), None);
    }

    #[test]
    fn mesh_view() {
        assert_eq!(parse("mesh/bob!chat").mesh().unwrap(), ("bob", "chat"));
        assert_eq!(
            parse("qmesh.mesh:node-1!files.v2").mesh().unwrap(),
            ("node-1", "files.v2")
        );
        assert!(matches!(
            parse("tcp/bob!chat").mesh(),
            Err(AddressError::WrongConnector {
                expected: "mesh",
                ..
            })
        ));
        assert!(matches!(
            parse("mesh/Bob!chat").mesh(),
            Err(AddressError::BadPeer { peer, .. }) if peer == "Bob"
        ));
        assert!(matches!(
            parse("mesh/$4!chat").mesh(),
            Err(AddressError::BadPeer { peer, .. }) if peer == "$4"
        ));
        assert!(matches!(
            parse("mesh/bob:1!chat").mesh(),
            Err(AddressError::Unexpected { what: "port", .. })
        ));
        let err = parse("mesh/bob").mesh().unwrap_err();
        assert_eq!(
            err.to_string(),
            "address \"mesh/bob\" has no channel; write it after '!', as in \"mesh/bob!chat\""
        );
    }

    #[test]
    fn mesh_channel_constructor() {
        let a = Address::mesh_channel("bob", "chat").unwrap();
        assert_eq!(a, parse("mesh/bob!chat"));
        assert_eq!(a.mesh().unwrap(), ("bob", "chat"));
        assert!(matches!(
            Address::mesh_channel("Bob", "chat"),
            Err(AddressError::BadPeer { .. })
        ));
        assert!(matches!(
            Address::mesh_channel("bob", "Chat"),
            Err(AddressError::BadSubport { .. })
        ));
        assert!(matches!(
            Address::mesh_channel("", "chat"),
            Err(AddressError::BadPeer { .. })
        ));
    }

    #[test]
    fn quic_endpoint_view() {
        let a = parse("quic/coord.example.com");
        assert_eq!(
            a.quic_endpoint().unwrap(),
            (&name("coord.example.com"), DEFAULT_COORDINATOR_PORT)
        );
        let a = parse("quic/*4:9000");
        assert_eq!(
            a.quic_endpoint().unwrap(),
            (&Host::Shorthand(Shorthand::Any4), 9000)
        );
        assert!(matches!(
            parse("tcp/$4").quic_endpoint(),
            Err(AddressError::WrongConnector {
                expected: "quic",
                ..
            })
        ));
        assert!(matches!(
            parse("quic/$4!x").quic_endpoint(),
            Err(AddressError::Unexpected {
                what: "subport",
                ..
            })
        ));
    }

    // ---- named values ----

    #[test]
    fn to_fields_layout() {
        let a = parse("qmesh.core.tcp/[::1]:80!mux");
        assert_eq!(
            a.to_fields(),
            vec![
                ("connector".into(), Value::Str("qmesh.core.tcp".into())),
                ("host".into(), Value::Str("[::1]".into())),
                ("port".into(), Value::U16(80)),
                ("subport".into(), Value::Str("mux".into())),
            ]
        );
        let a = parse("unix//run/app.sock");
        assert_eq!(
            a.to_fields(),
            vec![
                ("connector".into(), Value::Str("unix".into())),
                ("host".into(), Value::Str("/run/app.sock".into())),
                ("port".into(), Value::Null),
                ("subport".into(), Value::Null),
            ]
        );
    }

    fn fields(list: &[(&str, Value)]) -> Vec<(String, Value)> {
        list.iter()
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect()
    }

    #[test]
    fn from_fields_accepts_variants() {
        let str_ = |s: &str| Value::Str(s.to_owned());
        let a = Address::from_fields(&fields(&[
            ("host", str_("$4")),
            ("connector", str_("tcp")),
            ("port", Value::U64(8080)),
        ]))
        .unwrap();
        assert_eq!(a, parse("tcp/$4:8080"));
        let a = Address::from_fields(&fields(&[
            ("connector", str_("tcp")),
            ("host", str_("[::1]")),
            ("port", Value::I64(80)),
            ("subport", Value::Null),
        ]))
        .unwrap();
        assert_eq!(a, parse("tcp/[::1]:80"));
        let a = Address::from_fields(&fields(&[
            ("connector", str_("unix")),
            ("host", str_("/x")),
        ]))
        .unwrap();
        assert_eq!(a, parse("unix//x"));
    }

    /// A host field that opens a bracket must close it; `[]` and `[x]` are
    /// closed but hold no IPv6 address, and say that instead.
    #[test]
    fn from_fields_hosts_with_brackets_say_what_is_wrong() {
        let str_ = |s: &str| Value::Str(s.to_owned());
        let err = |host: &str| {
            Address::from_fields(&fields(&[
                ("connector", str_("tcp")),
                ("host", str_(host)),
                ("port", Value::U64(80)),
            ]))
            .unwrap_err()
            .to_string()
        };
        for unclosed in ["[", "[x", "[::1"] {
            let e = err(unclosed);
            assert!(e.contains("does not end with ']'"), "{unclosed}: {e}");
        }
        for closed in ["[]", "[x]"] {
            let e = err(closed);
            assert!(!e.contains("does not end with ']'"), "{closed}: {e}");
        }
    }

    #[test]
    fn from_fields_errors_name_the_field() {
        let str_ = |s: &str| Value::Str(s.to_owned());
        let bad_field = |list: &[(&str, Value)]| match Address::from_fields(&fields(list)) {
            Err(AddressError::BadField { field, reason }) => (field, reason),
            other => panic!("expected BadField, got {other:?}"),
        };
        let (field, reason) = bad_field(&[
            ("connector", str_("tcp")),
            ("host", str_("h")),
            ("colour", str_("red")),
        ]);
        assert_eq!(field, "colour");
        assert!(reason.contains("not an address field"), "{reason}");

        let (field, reason) = bad_field(&[("connector", str_("tcp")), ("host", Value::U16(1))]);
        assert_eq!(
            (field.as_str(), reason.as_str()),
            ("host", "must be a string, not u16")
        );

        let (field, reason) = bad_field(&[
            ("connector", str_("tcp")),
            ("host", str_("h")),
            ("port", str_("80")),
        ]);
        assert_eq!(
            (field.as_str(), reason.as_str()),
            ("port", "must be a u16 or null, not string")
        );

        let (field, _) = bad_field(&[
            ("connector", str_("tcp")),
            ("host", str_("h")),
            ("port", Value::U64(70000)),
        ]);
        assert_eq!(field, "port");
        let (field, _) = bad_field(&[
            ("connector", str_("tcp")),
            ("host", str_("h")),
            ("port", Value::I64(-1)),
        ]);
        assert_eq!(field, "port");
        let (field, _) = bad_field(&[
            ("connector", str_("tcp")),
            ("host", str_("h")),
            ("subport", Value::Bool(true)),
        ]);
        assert_eq!(field, "subport");
        let (field, _) = bad_field(&[("host", str_("h"))]);
        assert_eq!(field, "connector");
        let (field, _) = bad_field(&[("connector", str_("tcp"))]);
        assert_eq!(field, "host");
        let (field, reason) = bad_field(&[
            ("connector", str_("tcp")),
            ("host", str_("h")),
            ("host", str_("h")),
        ]);
        assert_eq!(
            (field.as_str(), reason.as_str()),
            ("host", "is given more than once")
        );

        // Values of the right type but bad content give the part's error.
        assert!(matches!(
            Address::from_fields(&fields(&[
                ("connector", str_("tcp")),
                ("host", str_("::1"))
            ])),
            Err(AddressError::BadHost {
                reason: UNBRACKETED_IPV6,
                ..
            })
        ));
        assert!(matches!(
            Address::from_fields(&fields(&[("connector", str_("")), ("host", str_("h"))])),
            Err(AddressError::BadConnector { .. })
        ));
    }

    #[test]
    fn value_type_names() {
        assert_eq!(Value::Null.type_name(), "null");
        assert_eq!(Value::Bool(true).type_name(), "bool");
        assert_eq!(Value::F64(1.5).type_name(), "f64");
        assert_eq!(Value::Str(String::new()).type_name(), "string");
    }

    // ---- serde ----

    #[test]
    fn serde_uses_the_canonical_string() {
        let config = bincode::config::standard();
        let a = parse("mesh:bob!chat");
        let bytes = bincode::serde::encode_to_vec(&a, config).unwrap();
        let as_string = bincode::serde::encode_to_vec("mesh/bob!chat", config).unwrap();
        assert_eq!(bytes, as_string);
        let (back, _): (Address, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, a);

        let bad = bincode::serde::encode_to_vec("bob!chat", config).unwrap();
        let err = bincode::serde::decode_from_slice::<Address, _>(&bad, config).unwrap_err();
        assert!(err.to_string().contains("no connector"), "{err}");
    }

    #[test]
    fn value_serde_round_trip() {
        let config = bincode::config::standard();
        for value in [
            Value::Null,
            Value::Bool(true),
            Value::U16(7),
            Value::U64(u64::MAX),
            Value::I64(-3),
            Value::F64(0.5),
            Value::Str("x".into()),
        ] {
            let bytes = bincode::serde::encode_to_vec(&value, config).unwrap();
            let (back, _): (Value, usize) =
                bincode::serde::decode_from_slice(&bytes, config).unwrap();
            assert_eq!(back, value);
        }
    }

    // ---- properties ----

    fn connector_part() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{1,8}"
    }

    fn any_connector() -> impl Strategy<Value = Connector> {
        let alias = prop_oneof![
            Just(UNIX.to_owned()),
            Just(MESH.to_owned()),
            Just(QUIC.to_owned()),
            connector_part(),
        ];
        (prop::collection::vec(connector_part(), 0..3), alias)
            .prop_map(|(namespace, alias)| Connector::with_namespace(namespace, alias).unwrap())
    }

    fn network_host() -> impl Strategy<Value = Host> {
        prop_oneof![
            "[A-Za-z0-9._-]{1,20}"
                .prop_filter("reads as IPv4", |s| s.parse::<Ipv4Addr>().is_err())
                .prop_map(Host::Name),
            any::<u32>().prop_map(|n| Host::Ipv4(Ipv4Addr::from(n))),
            any::<u128>().prop_map(|n| Host::Ipv6(Ipv6Addr::from(n))),
            prop::sample::select(Shorthand::ALL.to_vec()).prop_map(Host::Shorthand),
        ]
    }

    fn any_address() -> impl Strategy<Value = Address> {
        (
            any_connector(),
            network_host(),
            "[^!\\x00]{1,30}",
            any::<Option<u16>>(),
            prop::option::of("[a-z0-9._-]{1,64}"),
        )
            .prop_map(|(connector, host, path, port, subport)| {
                if connector.alias() == UNIX {
                    Address::new(connector, Host::Path(path), None, subport)
                } else {
                    Address::new(connector, host, port, subport)
                }
                .unwrap()
            })
    }

    /// Strings built from the address alphabet, to reach deep into the
    /// parser more often than arbitrary strings do.
    fn address_like() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9$*:/!\\[\\].%_ -]{0,24}"
    }

    proptest! {
        #[test]
        fn display_parses_back(a in any_address()) {
            let text = a.to_string();
            prop_assert_eq!(Address::parse(&text), Ok(a));
        }

        #[test]
        fn fields_round_trip(a in any_address()) {
            prop_assert_eq!(Address::from_fields(&a.to_fields()), Ok(a));
        }

        #[test]
        fn parsing_arbitrary_strings_never_panics(s in any::<String>()) {
            let _ = Address::parse(&s);
        }

        #[test]
        fn parsing_address_like_strings_never_panics(s in address_like()) {
            let _ = Address::parse(&s);
        }

        #[test]
        fn accepted_strings_display_to_a_fixpoint(
            s in prop_oneof![address_like(), any::<String>()]
        ) {
            if let Ok(a) = Address::parse(&s) {
                let shown = a.to_string();
                let again = Address::parse(&shown);
                prop_assert_eq!(again.as_ref(), Ok(&a));
                prop_assert_eq!(again.map(|b| b.to_string()), Ok(shown));
            }
        }
    }
}
