//! Admitting a hello, decided: plain functions with no I/O.
//!
//! The session stream's first frame is judged by [`first`]: a hello goes
//! on to [`Hello::Join`] (its interface list follows, judged by
//! [`interfaces`]), an enrollment to [`Hello::Enroll`], and anything else
//! is a refusal, a protocol violation or a stream that simply went away.
//! Who may keep a name is [`judge_holder`]'s call; the registry does the
//! rest of the admission. The `handshake` module does the I/O.

use std::net::SocketAddr;

use qmesh_certs::Fingerprint;
use qmesh_proto::codes::{ConnCode, RejectCode};
use qmesh_proto::limits::MAX_REPORTED_ADDRS;
use qmesh_proto::manifest::{validate_interfaces, Interface};
use qmesh_proto::msg::{ClientSession, Enroll, Greeting};
use qmesh_proto::{ClientName, PROTOCOL_VERSION};

use crate::registry::{Holder, Rejection};
use qmesh_proto::codec::Read;

/// A hello or enrollment refused: the `Reject` the client is sent, and
/// the close that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The typed reason.
    pub(crate) code: RejectCode,
    /// What to do about it, in a sentence.
    pub(crate) message: String,
}

impl From<Rejection> for Refusal {
    fn from(r: Rejection) -> Self {
        Self {
            code: r.code,
            message: r.message,
        }
    }
}

impl From<(RejectCode, String)> for Refusal {
    fn from((code, message): (RejectCode, String)) -> Self {
        Self { code, message }
    }
}

/// The client broke the protocol: its connection is closed with `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    /// The close code.
    pub(crate) code: ConnCode,
    /// What it did, in a sentence (the close reason).
    pub(crate) what: String,
}

impl Violation {
    fn new(code: ConnCode, what: impl Into<String>) -> Self {
        Self {
            code,
            what: what.into(),
        }
    }

    /// No session stream or no hello arrived before the deadline.
    pub(crate) fn no_hello() -> Self {
        Self::new(ConnCode::HelloTimeout, "no hello within the hello timeout")
    }

    /// The coordinator's own layers disagree about the connection.
    pub(crate) fn internal(what: &str) -> Self {
        Self::new(ConnCode::Internal, what)
    }

    /// The welcome could not be written before the deadline.
    pub(crate) fn unwelcome() -> Self {
        Self::new(
            ConnCode::HelloTimeout,
            "the welcome could not be delivered in time",
        )
    }
}

/// A hello that passed the checks so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Joining {
    /// The protocol version the client speaks.
    pub(crate) version: u32,
    /// The name it asks for.
    pub(crate) name: ClientName,
    /// The addresses it reported, or `None` when it cannot take direct
    /// channels.
    pub(crate) direct: Option<Vec<SocketAddr>>,
}

impl Joining {
    /// Whether an interface list follows the hello: only a client of this
    /// protocol version sends one (any other is refused on admission).
    pub(crate) fn interfaces_follow(&self) -> bool {
        self.version == PROTOCOL_VERSION
    }
}

/// Which greeting a refusal answers: a hello's is a `HelloAnswer`, an
/// enrollment's an `EnrollAnswer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Greeted {
    /// A `Greeting::Hello`.
    Hello,
    /// A `Greeting::Enroll`.
    Enroll,
}

/// What the session stream's first frame leads to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// A hello: read its interfaces (when they follow), then admit it.
    Join(Joining),
    /// An enrollment or renewal (no token) for `name`, of this protocol
    /// version: answer it, then close.
    Enroll {
        /// The name to certify.
        name: ClientName,
        /// The enrollment token; `None` asks to renew.
        token: Option<String>,
    },
    /// Refuse `name`: send the refusal, then close.
    Refuse {
        /// The name the client asked for, for the log.
        name: ClientName,
        /// Why.
        refusal: Refusal,
        /// The greeting refused, whose answer type carries the refusal.
        greeting: Greeted,
    },
    /// Close the connection: the client broke the protocol.
    Violation(Violation),
    /// The stream failed with nobody at fault: just end.
    Gone,
}

/// Judge the session stream's first frame. `check` is the authentication
/// check of a hello of this protocol version for a name (the certificate's
/// validity, revocation, and whether it may use the name).
pub(crate) fn first(
    read: Read<Greeting>,
    check: impl FnOnce(&str) -> Result<(), Refusal>,
) -> Hello {
    match read {
        Read::Frame(Greeting::Hello(qmesh_proto::msg::Hello {
            version,
            name,
            direct,
        })) => {
            if direct
                .as_ref()
                .is_some_and(|a| a.len() > MAX_REPORTED_ADDRS)
            {
                let what = format!("hello reports more than {MAX_REPORTED_ADDRS} addresses");
                return Hello::Violation(Violation::new(ConnCode::Malformed, what));
            }
            let joining = Joining {
                version,
                name,
                direct,
            };
            if joining.interfaces_follow() {
                if let Err(refusal) = check(&joining.name) {
                    return Hello::Refuse {
                        name: joining.name,
                        refusal,
                        greeting: Greeted::Hello,
                    };
                }
            }
            Hello::Join(joining)
        }
        Read::Frame(Greeting::Enroll(Enroll {
            version,
            name,
            token,
        })) => {
            if version != PROTOCOL_VERSION {
                let message = format!(
                    "this coordinator speaks protocol version {PROTOCOL_VERSION}, the client \
                     {version}; upgrade the older side"
                );
                return Hello::Refuse {
                    name,
                    refusal: Refusal {
                        code: RejectCode::VersionMismatch,
                        message,
                    },
                    greeting: Greeted::Enroll,
                };
            }
            Hello::Enroll { name, token }
        }
        Read::Finished => Hello::Violation(Violation::new(
            ConnCode::Malformed,
            "session stream ended before hello",
        )),
        Read::Failed(e) => match e.conn_code() {
            Some(code) => Hello::Violation(Violation::new(code, format!("bad hello: {e}"))),
            None => Hello::Gone,
        },
        Read::Late => Hello::Violation(Violation::no_hello()),
    }
}

/// Judge the frame after a hello: the client's interface list. `Err(None)`
/// when the stream failed with nobody at fault.
pub(crate) fn interfaces(read: Read<ClientSession>) -> Result<Vec<Interface>, Option<Violation>> {
    let violation = |code, what: String| Err(Some(Violation::new(code, what)));
    match read {
        Read::Frame(ClientSession::Interfaces { list }) => match validate_interfaces(&list) {
            Ok(()) => Ok(list),
            Err(what) => violation(ConnCode::Malformed, format!("bad interface list: {what}")),
        },
        Read::Frame(other) => violation(
            ConnCode::UnexpectedMessage,
            format!("expected interfaces after hello, got {}", other.name()),
        ),
        Read::Finished => violation(
            ConnCode::Malformed,
            "session stream ended after hello".into(),
        ),
        Read::Failed(e) => match e.conn_code() {
            Some(code) => violation(code, format!("bad interface list: {e}")),
            None => Err(None),
        },
        Read::Late => violation(
            ConnCode::HelloTimeout,
            "no interface list within the hello timeout".into(),
        ),
    }
}

/// What identifies a client's credential: the certificate it presented,
/// and the certificate's public key (so a renewed certificate counts as
/// the same credential).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Credential {
    /// The certificate's fingerprint.
    pub(crate) fingerprint: Fingerprint,
    /// SHA-256 of its public key, when it could be read.
    pub(crate) key: Option<[u8; 32]>,
}

/// Judge the session holding the name a newcomer with `new` asks for:
/// `held_open` says whether its connection is still open, `held` is its
/// credential. The same certificate, or one for the same key, takes the
/// name over.
pub(crate) fn judge_holder(held_open: bool, held: Credential, new: Credential) -> Holder {
    if !held_open {
        Holder::Gone
    } else if held.fingerprint == new.fingerprint || (new.key.is_some() && held.key == new.key) {
        Holder::SameCredential
    } else {
        Holder::Other
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use qmesh_certs::{Ca, Identity};
    use qmesh_proto::codec::{decode, encode, DecodeError, ReadFrameError};
    use qmesh_proto::manifest::Direction;
    use qmesh_proto::msg::StreamRequest;

    use super::*;
    use crate::auth::Auth;

    fn hello(version: u32, name: &str, addrs: usize) -> Read<Greeting> {
        let addr: SocketAddr = "192.0.2.1:1".parse().unwrap();
        Read::Frame(Greeting::Hello(qmesh_proto::msg::Hello {
            version,
            name: name.into(),
            direct: Some(vec![addr; addrs]),
        }))
    }

    fn allow(_: &str) -> Result<(), Refusal> {
        Ok(())
    }

    fn violation(h: Hello) -> (ConnCode, String) {
        match h {
            Hello::Violation(v) => (v.code, v.what),
            other => panic!("not a violation: {other:?}"),
        }
    }

    fn interface(name: &str) -> Interface {
        Interface {
            name: name.into(),
            purpose: String::new(),
            direction: Direction::Both,
            schema: String::new(),
            json_schema: None,
            version: "1".into(),
            forward: None,
        }
    }

    #[test]
    fn a_hello_of_this_version_is_checked_then_joins_with_interfaces_to_follow() {
        let mut asked = None;
        let h = first(hello(PROTOCOL_VERSION, "alice", 2), |n| {
            asked = Some(n.to_owned());
            Ok(())
        });
        assert_eq!(asked.as_deref(), Some("alice"));
        let Hello::Join(joining) = h else {
            panic!("{h:?}")
        };
        assert_eq!(joining.name, "alice");
        assert_eq!(joining.direct.as_ref().map(Vec::len), Some(2));
        assert!(joining.interfaces_follow());
    }

    #[test]
    fn a_hello_of_another_version_goes_unchecked_to_the_registry_which_refuses_it() {
        let h = first(hello(PROTOCOL_VERSION - 1, "alice", 0), |_| {
            panic!("an old client's certificate is not checked")
        });
        let Hello::Join(joining) = h else {
            panic!("{h:?}")
        };
        assert!(!joining.interfaces_follow());
        let mut registry = crate::registry::Registry::<u8>::new();
        let refused = registry
            .admit(joining.version, &joining.name, |_| 0, |_| Holder::Other)
            .map_err(Refusal::from)
            .unwrap_err();
        assert_eq!(refused.code, RejectCode::VersionMismatch);
    }

    #[test]
    fn a_hello_the_check_refuses_is_refused_with_the_checks_sentence() {
        let h = first(hello(PROTOCOL_VERSION, "alice", 0), |_| {
            Err(Refusal {
                code: RejectCode::NotAuthorised,
                message: "revoked".into(),
            })
        });
        assert_eq!(
            h,
            Hello::Refuse {
                name: "alice".into(),
                refusal: Refusal {
                    code: RejectCode::NotAuthorised,
                    message: "revoked".into()
                },
                greeting: Greeted::Hello,
            }
        );
    }

    #[test]
    fn a_hello_with_too_many_addresses_is_malformed() {
        assert!(matches!(
            first(hello(PROTOCOL_VERSION, "a", MAX_REPORTED_ADDRS), allow),
            Hello::Join(_)
        ));
        let (code, what) = violation(first(
            hello(PROTOCOL_VERSION, "a", MAX_REPORTED_ADDRS + 1),
            allow,
        ));
        assert_eq!(code, ConnCode::Malformed);
        assert!(what.contains("more than 8 addresses"), "{what}");
    }

    #[test]
    fn an_enrollment_of_this_version_is_answered_and_of_another_refused() {
        let enroll = |version, token: Option<&str>| {
            Read::Frame(Greeting::Enroll(Enroll {
                version,
                name: "alice".into(),
                token: token.map(Into::into),
            }))
        };
        assert_eq!(
            first(enroll(PROTOCOL_VERSION, Some("t")), allow),
            Hello::Enroll {
                name: "alice".into(),
                token: Some("t".into())
            }
        );
        assert_eq!(
            first(enroll(PROTOCOL_VERSION, None), allow),
            Hello::Enroll {
                name: "alice".into(),
                token: None
            }
        );
        let Hello::Refuse {
            refusal, greeting, ..
        } = first(enroll(PROTOCOL_VERSION + 1, None), allow)
        else {
            panic!("not refused")
        };
        assert_eq!(greeting, Greeted::Enroll);
        assert_eq!(refusal.code, RejectCode::VersionMismatch);
        assert!(refusal.message.contains("upgrade the older side"));
    }

    #[test]
    fn anything_but_a_hello_or_enrollment_first_breaks_the_protocol() {
        let (code, what) = violation(first(Read::Finished, allow));
        assert_eq!(
            (code, what.as_str()),
            (ConnCode::Malformed, "session stream ended before hello")
        );
        let (code, _) = violation(first(Read::Failed(ReadFrameError::Truncated), allow));
        assert_eq!(code, ConnCode::Malformed);
        // A frame that is not a greeting does not decode as one.
        let watch = encode(&StreamRequest::Watch { live: true }).unwrap();
        let not_a_greeting = ReadFrameError::Decode(decode::<Greeting>(&watch).unwrap_err());
        let (code, what) = violation(first(Read::Failed(not_a_greeting), allow));
        assert_eq!(code, ConnCode::Malformed);
        assert!(what.starts_with("bad hello: "), "{what}");
        let big = ReadFrameError::Decode(DecodeError::TooLarge { len: 9, limit: 1 });
        let (code, what) = violation(first(Read::Failed(big), allow));
        assert_eq!(code, ConnCode::FrameTooLarge);
        assert!(what.starts_with("bad hello: "), "{what}");
        let (code, _) = violation(first(Read::Late, allow));
        assert_eq!(code, ConnCode::HelloTimeout);
    }

    #[test]
    fn a_stream_that_fails_under_a_hello_is_nobodys_fault() {
        let io = ReadFrameError::Io(std::io::Error::other("reset"));
        assert_eq!(first(Read::Failed(io), allow), Hello::Gone);
    }

    #[test]
    fn the_interface_list_is_validated_and_must_come_next() {
        let list = vec![interface("chat"), interface("logs")];
        assert_eq!(
            interfaces(Read::Frame(ClientSession::Interfaces {
                list: list.clone()
            })),
            Ok(list)
        );
        let twice = vec![interface("chat"), interface("chat")];
        let v = interfaces(Read::Frame(ClientSession::Interfaces { list: twice }))
            .unwrap_err()
            .unwrap();
        assert_eq!(v.code, ConnCode::Malformed);
        assert!(v.what.contains("declared twice"), "{}", v.what);
        let v = interfaces(Read::Frame(ClientSession::Pong { seq: 1 }))
            .unwrap_err()
            .unwrap();
        assert_eq!(v.code, ConnCode::UnexpectedMessage);
        assert_eq!(v.what, "expected interfaces after hello, got pong");
        let v = interfaces(Read::Finished).unwrap_err().unwrap();
        assert_eq!(v.code, ConnCode::Malformed);
        let v = interfaces(Read::Late).unwrap_err().unwrap();
        assert_eq!(v.code, ConnCode::HelloTimeout);
        let io = ReadFrameError::Io(std::io::Error::other("reset"));
        assert_eq!(interfaces(Read::Failed(io)), Err(None));
    }

    fn credential(fp: u8, key: Option<u8>) -> Credential {
        Credential {
            fingerprint: Fingerprint([fp; 32]),
            key: key.map(|k| [k; 32]),
        }
    }

    #[test]
    fn the_same_certificate_or_key_takes_its_name_back_and_anyone_else_finds_it_taken() {
        let held = credential(1, Some(10));
        assert_eq!(
            judge_holder(true, held, credential(1, Some(10))),
            Holder::SameCredential
        );
        // A renewed certificate: a new fingerprint for the same key.
        assert_eq!(
            judge_holder(true, held, credential(2, Some(10))),
            Holder::SameCredential
        );
        assert_eq!(
            judge_holder(true, held, credential(2, Some(11))),
            Holder::Other
        );
        // Without a readable key only the certificate itself counts.
        assert_eq!(
            judge_holder(true, credential(1, None), credential(2, None)),
            Holder::Other
        );
        // A holder whose connection has ended gives the name up to anyone.
        assert_eq!(
            judge_holder(false, held, credential(2, Some(11))),
            Holder::Gone
        );
    }

    #[test]
    fn names_taken_by_another_credential_are_refused_by_the_registry() {
        let mut registry = crate::registry::Registry::<Credential>::new();
        let alice = credential(1, Some(1));
        let admit = |registry: &mut crate::registry::Registry<Credential>, who: Credential| {
            registry
                .admit(
                    PROTOCOL_VERSION,
                    "alice",
                    |_| who,
                    |held| judge_holder(true, *held, who),
                )
                .map_err(Refusal::from)
        };
        assert!(admit(&mut registry, alice).unwrap().replaced.is_none());
        let renewed = credential(2, Some(1));
        assert_eq!(admit(&mut registry, renewed).unwrap().replaced, Some(alice));
        let refused = admit(&mut registry, credential(3, Some(3))).unwrap_err();
        assert_eq!(refused.code, RejectCode::NameTaken);
    }

    fn checked(auth: &Auth, name: &str, id: &Identity) -> Hello {
        first(hello(PROTOCOL_VERSION, name, 0), |n| {
            Ok(auth.check_hello(n, &id.chain)?)
        })
    }

    fn refusal(h: Hello) -> Refusal {
        match h {
            Hello::Refuse { refusal, .. } => refusal,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn open_mode_admits_any_valid_certificate_under_any_name_until_it_is_revoked() {
        let auth = Auth::open(None).unwrap();
        let id = Identity::self_signed("alice").unwrap();
        assert!(matches!(checked(&auth, "bob", &id), Hello::Join(_)));
        auth.revocations()
            .add(Fingerprint::of(&id.chain[0]), "alice");
        let r = refusal(checked(&auth, "alice", &id));
        assert_eq!(r.code, RejectCode::NotAuthorised);
        assert!(
            r.message.contains("revoked by the operator"),
            "{}",
            r.message
        );
    }

    #[test]
    fn ca_mode_admits_its_own_certificates_under_their_names_only() {
        let ca = Ca::generate("clients").unwrap();
        let auth = Auth::ca(vec![ca.cert_der().clone()], None).unwrap();
        let alice = ca.issue_client("alice").unwrap();
        assert!(matches!(checked(&auth, "alice", &alice), Hello::Join(_)));
        let r = refusal(checked(&auth, "bob", &alice));
        assert!(r.message.contains("cannot join as bob"), "{}", r.message);
        let stranger = Ca::generate("other")
            .unwrap()
            .issue_client("alice")
            .unwrap();
        let r = refusal(checked(&auth, "alice", &stranger));
        assert_eq!(r.code, RejectCode::NotAuthorised);
        assert!(r.message.contains("client CA only"), "{}", r.message);
    }

    #[test]
    fn token_mode_refuses_a_certificate_it_did_not_issue() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::token(dir.path(), std::time::Duration::from_secs(3600)).unwrap();
        let r = refusal(checked(
            &auth,
            "alice",
            &Identity::self_signed("alice").unwrap(),
        ));
        assert_eq!(r.code, RejectCode::NotAuthorised);
        assert!(r.message.contains("enrolled clients only"), "{}", r.message);
    }
}
