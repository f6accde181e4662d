//! The registry of sessions: who is connected under which name.
//!
//! A plain type with no I/O: the coordinator's tasks call it under a lock,
//! and tests drive it directly. It decides admission (protocol version,
//! name rules, uniqueness) and routing (name → session handle). A session
//! leaves with the id it was admitted under, so a stale leave never evicts a
//! newer holder of the same name.
//!
//! The handle type `H` is whatever the caller needs to reach a session; for
//! the coordinator it is an `Arc` of the live session. Keeping the registry
//! generic and synchronous keeps it replaceable by a directory shared by
//! several coordinators.

use std::collections::HashMap;

use qmesh_proto::codes::RejectCode;
use qmesh_proto::name::validate_client_name;
use qmesh_proto::PROTOCOL_VERSION;

/// A coordinator-assigned session number, unique for the life of a registry.
pub type SessionId = u64;

/// Why a hello was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The typed reason.
    pub code: RejectCode,
    /// A sentence saying what was expected.
    pub message: String,
}

/// Sessions by name.
#[derive(Debug)]
pub struct Registry<H> {
    sessions: HashMap<String, (SessionId, H)>,
    next_id: SessionId,
    accepting: bool,
}

impl<H> Default for Registry<H> {
    fn default() -> Self {
        Self {
            sessions: HashMap::new(),
            next_id: 1,
            accepting: true,
        }
    }
}

impl<H: Clone> Registry<H> {
    /// An empty registry that admits sessions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decide on a hello. On success the session is registered under `name`
    /// with the handle `make(id)` returns, and the id and handle are returned.
    ///
    /// A name is taken while its holder is registered, unless `gone` says
    /// the holder has already ended (its leave not yet processed); such a
    /// holder is replaced.
    pub fn admit(
        &mut self,
        version: u32,
        name: &str,
        make: impl FnOnce(SessionId) -> H,
        gone: impl Fn(&H) -> bool,
    ) -> Result<(SessionId, H), Rejection> {
        if !self.accepting {
            return Err(Rejection {
                code: RejectCode::ShuttingDown,
                message: "the coordinator is shutting down; try again later".into(),
            });
        }
        if version != PROTOCOL_VERSION {
            return Err(Rejection {
                code: RejectCode::VersionMismatch,
                message: format!(
                    "protocol version {version} is not supported; this coordinator speaks \
                     version {PROTOCOL_VERSION}: use a matching qmesh client"
                ),
            });
        }
        if let Err(e) = validate_client_name(name) {
            return Err(Rejection {
                code: RejectCode::InvalidName,
                message: e.to_string(),
            });
        }
        if self.sessions.get(name).is_some_and(|(_, h)| !gone(h)) {
            return Err(Rejection {
                code: RejectCode::NameTaken,
                message: format!(
                    "the name \"{name}\" is taken by a connected client; choose another name \
                     or wait until that client leaves"
                ),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let handle = make(id);
        self.sessions.insert(name.to_owned(), (id, handle.clone()));
        Ok((id, handle))
    }

    /// Remove the session `id` holding `name`. Returns whether it was there;
    /// a newer session under the same name is left alone.
    pub fn leave(&mut self, name: &str, id: SessionId) -> bool {
        match self.sessions.get(name) {
            Some((held, _)) if *held == id => {
                self.sessions.remove(name);
                true
            }
            _ => false,
        }
    }

    /// The session registered under `name`.
    pub fn lookup(&self, name: &str) -> Option<&H> {
        self.sessions.get(name).map(|(_, h)| h)
    }

    /// Number of registered sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Stop admitting sessions (shutdown).
    pub fn stop_accepting(&mut self) {
        self.accepting = false;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_until_their_holder_leaves() {
        let mut reg = Registry::new();
        let (a, _) = reg
            .admit(PROTOCOL_VERSION, "alice", |id| id, |_| false)
            .unwrap();
        let err = reg
            .admit(PROTOCOL_VERSION, "alice", |id| id, |_| false)
            .unwrap_err();
        assert_eq!(err.code, RejectCode::NameTaken);
        assert!(err.message.contains("\"alice\""), "{}", err.message);
        assert!(reg.leave("alice", a));
        let (b, _) = reg
            .admit(PROTOCOL_VERSION, "alice", |id| id, |_| false)
            .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn stale_leave_keeps_the_new_holder() {
        let mut reg = Registry::new();
        let (a, _) = reg
            .admit(PROTOCOL_VERSION, "bob", |id| id, |_| false)
            .unwrap();
        assert!(reg.leave("bob", a));
        let (b, _) = reg
            .admit(PROTOCOL_VERSION, "bob", |id| id, |_| false)
            .unwrap();
        assert!(!reg.leave("bob", a));
        assert_eq!(reg.lookup("bob"), Some(&b));
    }

    #[test]
    fn version_and_name_are_checked_with_helpful_messages() {
        let mut reg: Registry<u64> = Registry::new();
        let err = reg
            .admit(PROTOCOL_VERSION + 1, "carol", |id| id, |_| false)
            .unwrap_err();
        assert_eq!(err.code, RejectCode::VersionMismatch);
        assert!(err.message.contains(&format!("version {PROTOCOL_VERSION}")));
        let err = reg
            .admit(PROTOCOL_VERSION, "Carol", |id| id, |_| false)
            .unwrap_err();
        assert_eq!(err.code, RejectCode::InvalidName);
        let err = reg
            .admit(PROTOCOL_VERSION, "", |id| id, |_| false)
            .unwrap_err();
        assert_eq!(err.code, RejectCode::InvalidName);
        assert!(reg.is_empty());
    }

    #[test]
    fn a_holder_that_is_gone_is_replaced() {
        let mut reg = Registry::new();
        let (a, _) = reg
            .admit(PROTOCOL_VERSION, "erin", |id| id, |_| false)
            .unwrap();
        let (b, _) = reg
            .admit(PROTOCOL_VERSION, "erin", |id| id, |h| *h == a)
            .unwrap();
        assert_eq!(reg.lookup("erin"), Some(&b));
        assert!(!reg.leave("erin", a));
    }

    #[test]
    fn shutdown_refuses_new_sessions() {
        let mut reg: Registry<u64> = Registry::new();
        reg.stop_accepting();
        let err = reg
            .admit(PROTOCOL_VERSION, "dave", |id| id, |_| false)
            .unwrap_err();
        assert_eq!(err.code, RejectCode::ShuttingDown);
    }
}
