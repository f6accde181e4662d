//! Interfaces and their manifests.
//!
//! A client may declare the interfaces it offers: for each channel name, a
//! [`Interface`] manifest saying what the channel is for, which way data
//! flows, what the messages look like, and its version. The client sends
//! the list right after its hello and again whenever it changes; the
//! coordinator keeps it, hands it to anyone who asks (`describe`, `peers`,
//! presence), refuses opens of channel names the client does not offer, and
//! puts the interface in both sides' `Ready` so that each side can keep to
//! its direction.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::name::validate_channel_name;

/// Most interfaces one client may declare.
pub const MAX_INTERFACES: usize = 64;

/// Largest encoded interface list: the whole list must fit in one control
/// frame with room to spare for the name and the message around it when
/// the coordinator passes it on.
pub const MAX_INTERFACES_BYTES: usize = crate::limits::MAX_CONTROL_FRAME - 512;

/// Which way data flows on an interface, seen from the side that offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Direction {
    /// The offerer sends; whoever opens the channel only receives.
    Send,
    /// The offerer receives; whoever opens the channel only sends.
    Recv,
    /// Both sides send.
    #[default]
    Both,
}

impl Direction {
    /// Whether the offerer (`offerer == true`) or the side that opened the
    /// channel may send data on it.
    pub fn may_send(self, offerer: bool) -> bool {
        match self {
            Direction::Both => true,
            Direction::Send => offerer,
            Direction::Recv => !offerer,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Send => "send",
            Direction::Recv => "recv",
            Direction::Both => "both",
        })
    }
}

impl std::str::FromStr for Direction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "send" => Ok(Direction::Send),
            "recv" => Ok(Direction::Recv),
            "both" => Ok(Direction::Both),
            other => Err(format!(
                "unknown direction {other:?}; use send, recv or both"
            )),
        }
    }
}

/// The manifest of one offered interface.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Interface {
    /// The channel name peers open (`mesh/peer!name`).
    pub name: String,
    /// What the interface is for, in a sentence.
    pub purpose: String,
    /// Which way data flows, from the offerer's side.
    pub direction: Direction,
    /// The message schema, as text for people (e.g. a Rust type or an IDL
    /// snippet).
    pub schema: String,
    /// The message schema as JSON Schema, when the offerer has one.
    pub json_schema: Option<String>,
    /// The interface's version, e.g. `1.2`.
    pub version: String,
    /// Set when the interface forwards another program's traffic
    /// (`qmesh expose`): peers open pipes on it, not messages.
    pub forward: Option<ForwardKind>,
}

/// What a forwarding interface carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ForwardKind {
    /// Byte streams: TCP connections or Unix stream sockets.
    Stream,
    /// Datagrams: UDP flows.
    Datagram,
}

impl fmt::Display for ForwardKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForwardKind::Stream => "stream (tcp or unix)",
            ForwardKind::Datagram => "datagram (udp)",
        })
    }
}

impl Interface {
    /// An interface with direction [`Direction::Both`], an empty schema and
    /// version `1`.
    pub fn new(name: impl Into<String>, purpose: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            purpose: purpose.into(),
            direction: Direction::Both,
            schema: String::new(),
            json_schema: None,
            version: "1".into(),
            forward: None,
        }
    }

    /// Mark the interface as a forward of `kind`.
    pub fn with_forward(mut self, kind: ForwardKind) -> Self {
        self.forward = Some(kind);
        self
    }

    /// Set the direction.
    pub fn with_direction(mut self, direction: Direction) -> Self {
        self.direction = direction;
        self
    }

    /// Set the text schema.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Set the JSON schema.
    pub fn with_json_schema(mut self, schema: impl Into<String>) -> Self {
        self.json_schema = Some(schema.into());
        self
    }

    /// Set the version.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "interface: {}", self.name)?;
        writeln!(f, "purpose:   {}", self.purpose)?;
        writeln!(f, "direction: {} (from the offerer's side)", self.direction)?;
        writeln!(f, "version:   {}", self.version)?;
        if let Some(kind) = self.forward {
            writeln!(f, "forwards:  {kind}")?;
        }
        if !self.schema.is_empty() {
            writeln!(f, "schema:")?;
            for line in self.schema.lines() {
                writeln!(f, "  {line}")?;
            }
        }
        if let Some(js) = &self.json_schema {
            writeln!(f, "json schema:")?;
            for line in js.lines() {
                writeln!(f, "  {line}")?;
            }
        }
        Ok(())
    }
}

/// Check an interface list: at most [`MAX_INTERFACES`], valid and distinct
/// channel names, and at most [`MAX_INTERFACES_BYTES`] encoded. The error
/// says which rule broke.
pub fn validate_interfaces(list: &[Interface]) -> Result<(), String> {
    if list.len() > MAX_INTERFACES {
        return Err(format!(
            "{} interfaces declared; at most {MAX_INTERFACES} are allowed",
            list.len()
        ));
    }
    for (i, iface) in list.iter().enumerate() {
        validate_channel_name(&iface.name)
            .map_err(|e| format!("interface {:?}: {e}", iface.name))?;
        if list[..i].iter().any(|o| o.name == iface.name) {
            return Err(format!("interface {:?} is declared twice", iface.name));
        }
    }
    let size = crate::codec::encoded_len(&list)
        .map_err(|e| format!("the interface list cannot be encoded: {e}"))?;
    if size > MAX_INTERFACES_BYTES {
        return Err(format!(
            "the interface list takes {size} bytes encoded; at most {MAX_INTERFACES_BYTES} are allowed (shorten schemas or purposes)"
        ));
    }
    // What a receiver's decoder allows is counted in memory, not on the
    // wire (each string's length as 8 bytes, each field at its size): a
    // list under the byte limit can still be refused where it arrives, as
    // a broken session frame. Decode it as its receivers will, with room
    // for the message around it.
    let body = crate::codec::encode(&list)
        .map_err(|e| format!("the interface list cannot be encoded: {e}"))?;
    if let Err(e) = crate::codec::decode_in_carrier::<Vec<Interface>>(&body) {
        return Err(format!(
            "the interface list of {} interfaces ({size} bytes encoded) is more than a receiver decodes in one message ({e}); shorten schemas or purposes, or declare fewer interfaces",
            list.len()
        ));
    }
    Ok(())
}

/// The names in `list`, comma separated, for "no such interface" messages.
pub fn names(list: &[Interface]) -> String {
    if list.is_empty() {
        return "none".into();
    }
    list.iter()
        .map(|i| i.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_rules_from_both_sides() {
        assert!(Direction::Send.may_send(true));
        assert!(!Direction::Send.may_send(false));
        assert!(!Direction::Recv.may_send(true));
        assert!(Direction::Recv.may_send(false));
        assert!(Direction::Both.may_send(true) && Direction::Both.may_send(false));
        assert_eq!("recv".parse::<Direction>(), Ok(Direction::Recv));
        assert!("sideways".parse::<Direction>().is_err());
    }

    #[test]
    fn lists_are_checked() {
        let ok = vec![
            Interface::new("web", "pages"),
            Interface::new("echo", "echo"),
        ];
        assert_eq!(validate_interfaces(&ok), Ok(()));
        let twice = vec![Interface::new("web", "a"), Interface::new("web", "b")];
        assert!(validate_interfaces(&twice).unwrap_err().contains("twice"));
        let bad = vec![Interface::new("no spaces", "a")];
        assert!(validate_interfaces(&bad).is_err());
        let many: Vec<_> = (0..=MAX_INTERFACES)
            .map(|i| Interface::new(format!("i{i}"), ""))
            .collect();
        assert!(validate_interfaces(&many).unwrap_err().contains("at most"));
        let huge = vec![Interface::new("big", "x".repeat(MAX_INTERFACES_BYTES))];
        assert!(validate_interfaces(&huge).unwrap_err().contains("bytes"));
        assert_eq!(names(&ok), "web, echo");
        assert_eq!(names(&[]), "none");
    }

    #[test]
    fn a_direction_reads_back_from_its_name() {
        for d in [Direction::Send, Direction::Recv, Direction::Both] {
            assert_eq!(d.to_string().parse::<Direction>(), Ok(d));
        }
        assert_eq!("send".parse::<Direction>(), Ok(Direction::Send));
    }

    #[test]
    fn exactly_max_interfaces_pass() {
        let list: Vec<_> = (0..MAX_INTERFACES)
            .map(|i| Interface::new(format!("i{i}"), ""))
            .collect();
        assert_eq!(validate_interfaces(&list), Ok(()));
    }

    #[test]
    fn a_list_of_max_bytes_passes_and_one_byte_more_does_not() {
        assert_eq!(MAX_INTERFACES_BYTES, 16 * 1024 - 512);
        // The purpose is the only free length: grow it to the limit.
        let list = |purpose: usize| vec![Interface::new("big", "x".repeat(purpose))];
        let fixed = crate::codec::encoded_len(&list(300)).unwrap() - 300;
        let at = list(MAX_INTERFACES_BYTES - fixed);
        assert_eq!(
            crate::codec::encoded_len(&at).unwrap(),
            MAX_INTERFACES_BYTES
        );
        assert_eq!(validate_interfaces(&at), Ok(()));
        let over = list(MAX_INTERFACES_BYTES - fixed + 1);
        let err = validate_interfaces(&over).unwrap_err();
        assert!(err.contains("15873 bytes"), "{err}");
    }

    #[test]
    fn an_interface_shows_every_field_it_has() {
        let plain = Interface::new("web", "pages").to_string();
        assert_eq!(
            plain,
            "interface: web\npurpose:   pages\n\
             direction: both (from the offerer's side)\nversion:   1\n"
        );
        let full = Interface::new("tunnel", "ssh")
            .with_direction(Direction::Recv)
            .with_forward(ForwardKind::Stream)
            .with_schema("line one\nline two")
            .with_json_schema("{}")
            .with_version("2");
        assert_eq!(full.direction, Direction::Recv);
        assert_eq!(full.forward, Some(ForwardKind::Stream));
        assert_eq!(full.schema, "line one\nline two");
        assert_eq!(full.json_schema.as_deref(), Some("{}"));
        assert_eq!(full.version, "2");
        let text = full.to_string();
        for line in [
            "direction: recv (from",
            "version:   2",
            "forwards:  stream (tcp or unix)",
            "schema:\n  line one\n  line two\n",
            "json schema:\n  {}\n",
        ] {
            assert!(text.contains(line), "{line:?} not in {text}");
        }
        let udp = Interface::new("dns", "").with_forward(ForwardKind::Datagram);
        assert!(udp.to_string().contains("forwards:  datagram (udp)"));
    }
}
