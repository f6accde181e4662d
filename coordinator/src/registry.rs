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
    capacity: Option<usize>,
}

/// An admitted session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted<H> {
    /// Its number.
    pub id: SessionId,
    /// Its handle, as `make` returned it.
    pub handle: H,
    /// The session it took the name over from (the same credential
    /// reconnecting), which the caller should now close.
    pub replaced: Option<H>,
}

/// What `admit` should do about the current holder of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// It has ended (its leave is not processed yet): take the name.
    Gone,
    /// It is live and holds the same credential as the newcomer: the
    /// newcomer takes over (a client that changed networks gets its name
    /// back at once).
    SameCredential,
    /// It is live and someone else: the name is taken.
    Other,
}

impl<H> Default for Registry<H> {
    fn default() -> Self {
        Self {
            sessions: HashMap::new(),
            next_id: 1,
            accepting: true,
            capacity: None,
        }
    }
}

impl<H: Clone> Registry<H> {
    /// An empty registry that admits sessions.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `max` sessions at once (`None`: no limit).
    pub fn set_capacity(&mut self, max: Option<usize>) {
        self.capacity = max;
    }

    /// Decide on a hello. On success the session is registered under `name`
    /// with the handle `make(id)` returns.
    ///
    /// `holder` judges the current holder of `name`, if any: one that is
    /// [`Holder::Gone`] or holds the [`Holder::SameCredential`] is replaced
    /// (and returned in [`Admitted::replaced`]); any other keeps the name.
    pub fn admit(
        &mut self,
        version: u32,
        name: &str,
        make: impl FnOnce(SessionId) -> H,
        holder: impl Fn(&H) -> Holder,
    ) -> Result<Admitted<H>, Rejection> {
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
        let current = self.sessions.get(name).map(|(_, h)| holder(h));
        if current == Some(Holder::Other) {
            return Err(Rejection {
                code: RejectCode::NameTaken,
                message: format!(
                    "the name \"{name}\" is taken by a connected client with another \
                     credential; choose another name or wait until that client leaves"
                ),
            });
        }
        if let Some(max) = self.capacity {
            if current.is_none() && self.sessions.len() >= max {
                return Err(Rejection {
                    code: RejectCode::Full,
                    message: format!(
                        "the coordinator holds its maximum of {max} clients; try again later \
                         or ask its operator to raise max_clients"
                    ),
                });
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let handle = make(id);
        let replaced = self
            .sessions
            .insert(name.to_owned(), (id, handle.clone()))
            .map(|(_, old)| old);
        Ok(Admitted {
            id,
            handle,
            replaced,
        })
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

    /// Every registered session, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &H> {
        self.sessions.values().map(|(_, h)| h)
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

    /// Admit `name` with handle = id; the current holder is judged `judge`.
    fn admit(
        reg: &mut Registry<u64>,
        name: &str,
        judge: Holder,
    ) -> Result<Admitted<u64>, Rejection> {
        reg.admit(PROTOCOL_VERSION, name, |id| id, |_| judge)
    }

    #[test]
    fn names_are_unique_until_their_holder_leaves() {
        let mut reg = Registry::new();
        let a = admit(&mut reg, "alice", Holder::Other).unwrap().id;
        let err = admit(&mut reg, "alice", Holder::Other).unwrap_err();
        assert_eq!(err.code, RejectCode::NameTaken);
        assert!(err.message.contains("\"alice\""), "{}", err.message);
        assert!(reg.leave("alice", a));
        let b = admit(&mut reg, "alice", Holder::Other).unwrap().id;
        assert_ne!(a, b);
    }

    #[test]
    fn every_session_is_listed_until_it_leaves() {
        let mut reg = Registry::new();
        assert!(reg.is_empty());
        assert_eq!(reg.iter().count(), 0);
        let a = admit(&mut reg, "alice", Holder::Other).unwrap().id;
        let b = admit(&mut reg, "bob", Holder::Other).unwrap().id;
        assert!(!reg.is_empty());
        let mut all: Vec<u64> = reg.iter().copied().collect();
        all.sort();
        assert_eq!(all, [a, b]);
        assert!(reg.leave("alice", a));
        assert_eq!(reg.iter().copied().collect::<Vec<_>>(), [b]);
    }

    #[test]
    fn stale_leave_keeps_the_new_holder() {
        let mut reg = Registry::new();
        let a = admit(&mut reg, "bob", Holder::Other).unwrap().id;
        assert!(reg.leave("bob", a));
        let b = admit(&mut reg, "bob", Holder::Other).unwrap().id;
        assert!(!reg.leave("bob", a));
        assert_eq!(reg.lookup("bob"), Some(&b));
    }

    #[test]
    fn version_and_name_are_checked_with_helpful_messages() {
        let mut reg: Registry<u64> = Registry::new();
        let err = reg
            .admit(PROTOCOL_VERSION + 1, "carol", |id| id, |_| Holder::Other)
            .unwrap_err();
        assert_eq!(err.code, RejectCode::VersionMismatch);
        assert!(err.message.contains(&format!("version {PROTOCOL_VERSION}")));
        let err = admit(&mut reg, "Carol", Holder::Other).unwrap_err();
        assert_eq!(err.code, RejectCode::InvalidName);
        let err = admit(&mut reg, "", Holder::Other).unwrap_err();
        assert_eq!(err.code, RejectCode::InvalidName);
        assert!(reg.is_empty());
    }

    #[test]
    fn a_holder_that_is_gone_or_has_the_same_credential_is_replaced() {
        let mut reg = Registry::new();
        let a = admit(&mut reg, "erin", Holder::Other).unwrap();
        let b = admit(&mut reg, "erin", Holder::Gone).unwrap();
        assert_eq!(b.replaced, Some(a.id));
        let c = admit(&mut reg, "erin", Holder::SameCredential).unwrap();
        assert_eq!(c.replaced, Some(b.id));
        assert_eq!(reg.lookup("erin"), Some(&c.id));
        assert!(!reg.leave("erin", a.id));
        assert!(!reg.leave("erin", b.id));
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn capacity_refuses_newcomers_but_not_takeovers() {
        let mut reg = Registry::new();
        reg.set_capacity(Some(2));
        admit(&mut reg, "a", Holder::Other).unwrap();
        admit(&mut reg, "b", Holder::Other).unwrap();
        let err = admit(&mut reg, "c", Holder::Other).unwrap_err();
        assert_eq!(err.code, RejectCode::Full);
        assert!(err.message.contains("max_clients"), "{}", err.message);
        // The same credential taking its name back needs no new room.
        assert!(admit(&mut reg, "a", Holder::SameCredential).is_ok());
        assert_eq!(reg.len(), 2);
    }

    #[test]
    fn shutdown_refuses_new_sessions() {
        let mut reg: Registry<u64> = Registry::new();
        reg.stop_accepting();
        let err = admit(&mut reg, "dave", Holder::Other).unwrap_err();
        assert_eq!(err.code, RejectCode::ShuttingDown);
    }
}
