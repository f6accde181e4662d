//! The hello handshake: the first exchange on a new connection's session
//! stream, which admits the client, refuses it, or enrolls it.
//!
//! [`serve`] is the coordinator's half of the exchange, generic over the
//! stream, so it runs against a client half over `tokio::io::duplex` in
//! tests. What the coordinator decides lives in `admission`; what it needs
//! from its state (authentication, the registry) comes through [`Gate`].
//! [`hello`] runs it on a QUIC connection and does what the outcome says
//! to the connection.
//!
//! Protocol flow (see `docs/protocol.md`):
//!
//! ```text
//! client                         coordinator
//!   Greeting::Hello{version,name,direct} ->
//!   ClientSession::Interfaces{list}      ->   (this protocol version only)
//!                                        <-   HelloAnswer::Welcome{session,observed}
//!                                             or HelloAnswer::Reject, finish, close
//!   Greeting::Enroll{version,name,token} ->
//!                                        <-   EnrollAnswer::Enrolled{cert_pem,expires},
//!                                             finish, close
//!                                             or EnrollAnswer::Reject, finish, close
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmesh_certs::Fingerprint;
use qmesh_proto::codec::write_frame;
use qmesh_proto::codes::ConnCode;
use qmesh_proto::limits::clip_reason;
use qmesh_proto::manifest::Interface;
use qmesh_proto::msg::{EnrollAnswer, HelloAnswer, PresenceEvent, Reject, Welcome};
use qmesh_proto::{ClientName, Untrusted, PROTOCOL_VERSION};
use quinn::Connection;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};
use tracing::{debug, info, warn};

use crate::admission::{
    self, judge_holder, Credential, Greeted, Hello, Joining, Refusal, Violation,
};
use crate::directory::{Claim, ClaimCredential};
use crate::limit::Limiter;
use crate::registry::{Admitted, SessionId};
use crate::session::{Session, Shared};
use qmesh_proto::codec::read_within;

/// How long a refusal, an issued certificate or a welcome may take to be
/// written before the connection is closed anyway.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// What the handshake needs from the coordinator.
pub(crate) trait Gate {
    /// What an admitted hello yields.
    type Admitted;

    /// Whether a hello of this protocol version may join as `name` with
    /// the connection's certificate.
    fn check(&self, name: &str) -> Result<(), Refusal>;

    /// Enroll (with a token) or renew (without): the certificate issued
    /// for `name`, PEM, and when it expires.
    fn enroll(&self, name: &str, token: Option<&str>) -> Result<(String, u64), Refusal>;

    /// Claim the name in the directory (across a cluster's coordinators),
    /// before [`Gate::admit`].
    fn claim(
        &self,
        joining: &Joining,
    ) -> impl std::future::Future<Output = Result<Claim, Refusal>> + Send;

    /// Admit `joining` with its `interfaces` and its `claim`: register it,
    /// and return its session number. A refusal gives the claim back.
    fn admit(
        &self,
        joining: &Joining,
        interfaces: Vec<Interface>,
        claim: Claim,
    ) -> Result<(SessionId, Self::Admitted), Refusal>;

    /// The welcome could not be delivered: undo `admit`.
    fn withdraw(&self, joining: &Joining, id: SessionId);
}

/// How a handshake ended. The stream is finished after a refusal or an
/// enrollment; closing the connection is the caller's part.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome<A> {
    /// Welcomed: the session stream goes on.
    Admitted(A),
    /// Refused: `Reject` was sent (unless the client did not read it by
    /// `linger`); close with the refusal's code and (clipped) sentence.
    Refused {
        /// The name asked for.
        name: ClientName,
        /// The refusal, its sentence clipped to a close reason.
        refusal: Refusal,
        /// Until when the `Reject` may still be on its way.
        linger: Instant,
    },
    /// A certificate was issued and sent; close normally.
    Enrolled {
        /// The name certified.
        name: ClientName,
        /// When the certificate expires (Unix seconds).
        expires: u64,
        /// Whether it renewed a certificate (no token).
        renewal: bool,
        /// Until when the certificate may still be on its way.
        linger: Instant,
    },
    /// The client broke the protocol.
    Violation(Violation),
    /// The stream failed with nobody at fault.
    Gone,
}

/// The coordinator's half of the hello exchange on the session stream
/// `(recv, send)`: everything must arrive by `deadline`. `observed` is the
/// client's address as the coordinator sees it, for the welcome.
pub(crate) async fn serve<R, W, G>(
    recv: &mut R,
    send: &mut W,
    gate: &G,
    observed: SocketAddr,
    deadline: Instant,
) -> Outcome<G::Admitted>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    G: Gate,
{
    let first = admission::first(read_within(deadline, recv).await, |name| gate.check(name));
    let joining = match first {
        Hello::Join(joining) => joining,
        Hello::Enroll { name, token } => {
            return match gate.enroll(&name, token.as_deref()) {
                Ok((cert_pem, expires)) => {
                    let linger = Instant::now() + LINGER * 2;
                    let reply = EnrollAnswer::Enrolled { cert_pem, expires };
                    let _ = timeout_at(linger, finish_with(send, &reply)).await;
                    Outcome::Enrolled {
                        name,
                        expires,
                        renewal: token.is_none(),
                        linger,
                    }
                }
                Err(refusal) => reject(send, name, refusal, Greeted::Enroll).await,
            };
        }
        Hello::Refuse {
            name,
            refusal,
            greeting,
        } => return reject(send, name, refusal, greeting).await,
        Hello::Violation(v) => return Outcome::Violation(v),
        Hello::Gone => return Outcome::Gone,
    };
    let interfaces = if joining.interfaces_follow() {
        // The client's interfaces follow its hello at once.
        match admission::interfaces(read_within(deadline, recv).await) {
            Ok(list) => list,
            Err(Some(v)) => return Outcome::Violation(v),
            Err(None) => return Outcome::Gone,
        }
    } else {
        Vec::new()
    };
    let claim = match gate.claim(&joining).await {
        Ok(claim) => claim,
        Err(refusal) => {
            debug!(code = %refusal.code.conn_code(), "the directory refused");
            return reject(send, joining.name, refusal, Greeted::Hello).await;
        }
    };
    let (id, admitted) = match gate.admit(&joining, interfaces, claim) {
        Ok(ok) => ok,
        Err(refusal) => {
            debug!(
                client_version = joining.version,
                ours = PROTOCOL_VERSION,
                "registry refused"
            );
            return reject(send, joining.name, refusal, Greeted::Hello).await;
        }
    };
    let welcome = HelloAnswer::Welcome(Welcome {
        session: qmesh_proto::SessionId(id),
        observed,
    });
    match timeout_at(deadline + LINGER, write_frame(send, &welcome)).await {
        Ok(Ok(())) => Outcome::Admitted(admitted),
        _ => {
            gate.withdraw(&joining, id);
            Outcome::Violation(Violation::unwelcome())
        }
    }
}

/// Send `refusal` in the answer to `greeting` and finish the stream,
/// bounded: a peer that never opens its window must not hold the
/// connection (and its pending place) past [`LINGER`].
async fn reject<W, A>(
    send: &mut W,
    name: ClientName,
    refusal: Refusal,
    greeting: Greeted,
) -> Outcome<A>
where
    W: AsyncWrite + Unpin,
{
    let refusal = Refusal {
        message: clip_reason(&refusal.message),
        ..refusal
    };
    let linger = Instant::now() + LINGER;
    let reply = Reject {
        code: refusal.code,
        message: refusal.message.clone(),
    };
    let sent = async {
        match greeting {
            Greeted::Hello => finish_with(send, &HelloAnswer::Reject(reply)).await,
            Greeted::Enroll => finish_with(send, &EnrollAnswer::Reject(reply)).await,
        }
    };
    let _ = timeout_at(linger, sent).await;
    Outcome::Refused {
        name,
        refusal,
        linger,
    }
}

/// Write `msg` as the last frame of the stream.
async fn finish_with<W: AsyncWrite + Unpin>(send: &mut W, msg: &impl Serialize) -> bool {
    write_frame(send, msg).await.is_ok() && send.shutdown().await.is_ok()
}

/// The coordinator as the handshake sees it, for one connection.
struct CoordinatorGate<'a> {
    shared: &'a Arc<Shared>,
    conn: &'a Connection,
    chain: &'a [CertificateDer<'static>],
    credential: Credential,
}

impl Gate for CoordinatorGate<'_> {
    /// The session, and whether it took its name over from an older
    /// session of the same credential.
    type Admitted = (Arc<Session>, bool);

    fn check(&self, name: &str) -> Result<(), Refusal> {
        Ok(self.shared.config.auth.check_hello(name, self.chain)?)
    }

    fn enroll(&self, name: &str, token: Option<&str>) -> Result<(String, u64), Refusal> {
        Ok(self.shared.config.auth.enroll(name, token, self.chain)?)
    }

    async fn claim(&self, joining: &Joining) -> Result<Claim, Refusal> {
        let Credential { fingerprint, key } = self.credential;
        let credential = ClaimCredential { fingerprint, key };
        Ok(self
            .shared
            .config
            .directory
            .claim(&joining.name, credential)
            .await?)
    }

    fn admit(
        &self,
        joining: &Joining,
        interfaces: Vec<Interface>,
        claim: Claim,
    ) -> Result<(SessionId, Self::Admitted), Refusal> {
        let Credential { fingerprint, key } = self.credential;
        let directory = &self.shared.config.directory;
        let admitted = self.shared.registry().admit(
            joining.version,
            &joining.name,
            |id| {
                Arc::new(Session {
                    id,
                    joined: std::time::SystemTime::now(),
                    name: joining.name.clone(),
                    conn: self.conn.clone(),
                    fingerprint,
                    key,
                    direct: joining.direct.clone(),
                    channels: Mutex::new(HashMap::new()),
                    slots: AtomicUsize::new(0),
                    limiter: Limiter::new(&self.shared.rate()),
                    interfaces: Mutex::new(Arc::new(interfaces)),
                    closed_why: std::sync::OnceLock::new(),
                    probe: tokio::sync::Notify::new(),
                    strikes: Default::default(),
                    headers: tokio::sync::Semaphore::new(crate::limit::HEADER_BUDGET),
                    claim,
                    member: None,
                })
            },
            |held| {
                let open = held.conn.close_reason().is_none();
                let held_credential = Credential {
                    fingerprint: held.fingerprint,
                    key: held.key,
                };
                judge_holder(open, held_credential, self.credential)
            },
        );
        let admitted = match admitted {
            Ok(a) => {
                directory.admitted(&joining.name, claim);
                a
            }
            Err(e) => {
                directory.release(&joining.name, claim);
                return Err(e.into());
            }
        };
        let Admitted {
            id,
            handle: session,
            replaced,
        } = admitted;
        let rejoined = replaced.is_some();
        if let Some(old) = replaced {
            info!(name = %Untrusted::name(&joining.name), old = old.id, new = id, "the same credential connected again; closing its old session");
            old.close(
                ConnCode::Replaced,
                "this name was taken over by a new session with the same credential",
            );
        }
        // Authenticated: open the windows and stream limits that were
        // kept small until now.
        let tuning = &self.shared.config.tuning;
        let conn = self.conn;
        conn.set_receive_window(quinn::VarInt::from_u32(tuning.conn_window));
        conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(tuning.max_bidi_streams));
        conn.set_max_concurrent_uni_streams(quinn::VarInt::from_u32(tuning.max_uni_streams));
        Ok((id, (session, rejoined)))
    }

    fn withdraw(&self, joining: &Joining, id: SessionId) {
        let session = self.shared.registry().lookup(&joining.name).cloned();
        self.shared.registry().leave(&joining.name, id);
        if let Some(s) = session.filter(|s| s.id == id) {
            self.shared.config.directory.release(&joining.name, s.claim);
        }
    }
}

/// Close `conn` because its peer broke the protocol, and say so at `warn`.
fn violation(conn: &Connection, v: &Violation) {
    warn!(peer = %conn.remote_address(), code = %v.code, cause = %Untrusted::reason(&v.what), "closing connection");
    conn.close(v.code.varint(), v.what.as_bytes());
}

/// Wait for the hello and answer it; returns the admitted session and its
/// session stream, or `None` when the connection was refused, enrolled or
/// closed.
pub(crate) async fn hello(
    shared: &Arc<Shared>,
    conn: &Connection,
    deadline: Instant,
) -> Option<(Arc<Session>, quinn::SendStream, quinn::RecvStream)> {
    let (mut send, mut recv) = match timeout_at(deadline, conn.accept_bi()).await {
        Err(_) => {
            shared.stats.handshake_failed();
            violation(conn, &Violation::no_hello());
            return None;
        }
        Ok(Err(_)) => {
            shared.stats.handshake_failed();
            return None;
        }
        Ok(Ok(streams)) => streams,
    };
    // The server configuration requires a client certificate, so a missing
    // one here means the TLS layer and this code disagree.
    let Some(chain) = qmesh_certs::peer_chain(conn) else {
        let what = "no client certificate after the handshake";
        shared.stats.handshake_failed();
        violation(conn, &Violation::internal(what));
        return None;
    };
    let credential = Credential {
        fingerprint: Fingerprint::of(&chain[0]),
        key: qmesh_certs::clientauth::key_id(&chain[0]),
    };
    let gate = CoordinatorGate {
        shared,
        conn,
        chain: &chain,
        credential,
    };
    let outcome = serve(&mut recv, &mut send, &gate, conn.remote_address(), deadline).await;
    match outcome {
        Outcome::Admitted((session, rejoined)) => {
            // A revocation that landed between the check and the
            // admission: revoke adds to the list, then closes what the
            // registry holds, so one of the two sees this session.
            if shared
                .config
                .auth
                .revocations()
                .contains(&credential.fingerprint)
            {
                shared.registry().leave(&session.name, session.id);
                shared
                    .config
                    .directory
                    .release(&session.name, session.claim);
                session.close_revoked();
                shared.stats.handshake_failed();
                return None;
            }
            shared
                .stats
                .sessions_admitted
                .fetch_add(1, Ordering::Relaxed);
            let name = session.name.clone();
            let interfaces = session.interfaces().to_vec();
            shared.note(
                "join",
                format!(
                    "{} joined from {}",
                    Untrusted::name(&name),
                    session.conn.remote_address()
                ),
            );
            let _ = shared.presence.send(if rejoined {
                PresenceEvent::Changed { name, interfaces }
            } else {
                PresenceEvent::Joined { name, interfaces }
            });
            Some((session, send, recv))
        }
        Outcome::Refused {
            name,
            refusal,
            linger,
        } => {
            shared.stats.refused(refusal.code);
            // The name is whatever the peer sent, unchecked when it was refused.
            info!(peer = %conn.remote_address(), name = %Untrusted::name(&name), code = ?refusal.code, cause = %Untrusted::reason(&refusal.message), "hello refused");
            // Let the rejection arrive before the close; the close carries
            // the same sentence in case it does not.
            let _ = timeout_at(linger, send.stopped()).await;
            conn.close(
                refusal.code.conn_code().varint(),
                refusal.message.as_bytes(),
            );
            None
        }
        Outcome::Enrolled {
            name,
            expires,
            renewal,
            linger,
        } => {
            shared
                .stats
                .certificates_issued
                .fetch_add(1, Ordering::Relaxed);
            info!(peer = %conn.remote_address(), name = %Untrusted::name(&name), expires, renewal, "certificate issued");
            let _ = timeout_at(linger, send.stopped()).await;
            conn.close(ConnCode::Normal.varint(), b"certificate issued");
            None
        }
        Outcome::Violation(v) => {
            shared.stats.handshake_failed();
            violation(conn, &v);
            None
        }
        Outcome::Gone => {
            shared.stats.handshake_failed();
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::MutexGuard;

    use qmesh_proto::codec::read_frame;
    use qmesh_proto::codes::RejectCode;
    use qmesh_proto::manifest::Direction;
    use qmesh_proto::msg::{ClientSession, Enroll, Greeting, StreamRequest};
    use serde::de::DeserializeOwned;
    use tokio::io::DuplexStream;

    use super::*;
    use crate::registry::Registry;

    type Names = Arc<Mutex<Registry<Credential>>>;

    /// A coordinator with a registry of credentials and nothing else.
    struct TestGate {
        registry: Names,
        credential: Credential,
        refuse: Option<Refusal>,
        admitted: Mutex<Vec<(ClientName, Vec<Interface>)>>,
    }

    impl TestGate {
        fn new(registry: &Names, fp: u8) -> Self {
            Self {
                registry: registry.clone(),
                credential: Credential {
                    fingerprint: Fingerprint([fp; 32]),
                    key: Some([fp; 32]),
                },
                refuse: None,
                admitted: Mutex::new(Vec::new()),
            }
        }

        fn names(&self) -> MutexGuard<'_, Registry<Credential>> {
            self.registry.lock().unwrap()
        }
    }

    impl Gate for TestGate {
        type Admitted = SessionId;

        fn check(&self, _: &str) -> Result<(), Refusal> {
            self.refuse.clone().map_or(Ok(()), Err)
        }

        fn enroll(&self, name: &str, token: Option<&str>) -> Result<(String, u64), Refusal> {
            match token {
                Some("good") => Ok((format!("certificate for {name}"), 99)),
                Some(_) => Err(Refusal {
                    code: RejectCode::BadToken,
                    message: "this token is not valid".into(),
                }),
                None => Ok((format!("renewed for {name}"), 100)),
            }
        }

        async fn claim(&self, _: &Joining) -> Result<Claim, Refusal> {
            Ok(Claim::default())
        }

        fn admit(
            &self,
            joining: &Joining,
            interfaces: Vec<Interface>,
            _: Claim,
        ) -> Result<(SessionId, SessionId), Refusal> {
            let me = self.credential;
            let a = self.names().admit(
                joining.version,
                &joining.name,
                |_| me,
                |held| judge_holder(true, *held, me),
            )?;
            self.admitted
                .lock()
                .unwrap()
                .push((joining.name.clone(), interfaces));
            Ok((a.id, a.id))
        }

        fn withdraw(&self, joining: &Joining, id: SessionId) {
            self.names().leave(&joining.name, id);
        }
    }

    fn observed() -> SocketAddr {
        "198.51.100.7:4433".parse().unwrap()
    }

    fn hello(version: u32, name: &str) -> Greeting {
        Greeting::Hello(qmesh_proto::msg::Hello {
            version,
            name: name.into(),
            direct: None,
        })
    }

    fn chat() -> Vec<Interface> {
        vec![Interface {
            name: "chat".into(),
            purpose: "talk".into(),
            direction: Direction::Both,
            schema: String::new(),
            json_schema: None,
            version: "1".into(),
            forward: None,
        }]
    }

    /// The client's half of a hello: send `first`, then `interfaces` when
    /// given, and read what the coordinator answers until a welcome or the
    /// end of the stream.
    async fn client(
        stream: DuplexStream,
        first: Greeting,
        interfaces: Option<Vec<Interface>>,
    ) -> Vec<HelloAnswer> {
        answers(stream, first, interfaces, |a| {
            matches!(a, HelloAnswer::Welcome(_))
        })
        .await
    }

    /// The client's half of an enrollment: send it, and read what the
    /// coordinator answers until the end of the stream.
    async fn enrollee(stream: DuplexStream, enroll: Enroll) -> Vec<EnrollAnswer> {
        answers(stream, Greeting::Enroll(enroll), None, |_| false).await
    }

    /// Send `first` and `interfaces`, then read answers of type `A` until
    /// one is `last` or the stream ends.
    async fn answers<A: DeserializeOwned>(
        mut stream: DuplexStream,
        first: Greeting,
        interfaces: Option<Vec<Interface>>,
        last: impl Fn(&A) -> bool,
    ) -> Vec<A> {
        write_frame(&mut stream, &first).await.unwrap();
        if let Some(list) = interfaces {
            write_frame(&mut stream, &ClientSession::Interfaces { list })
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        while let Ok(Some(msg)) = read_frame::<A, _>(&mut stream).await {
            let done = last(&msg);
            got.push(msg);
            if done {
                break;
            }
        }
        got
    }

    /// Run the coordinator's half against `client_half` over a duplex pipe.
    async fn exchange<F>(
        gate: &TestGate,
        client_half: impl FnOnce(DuplexStream) -> F,
    ) -> (Outcome<SessionId>, F::Output)
    where
        F: std::future::Future,
    {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let (mut recv, mut send) = tokio::io::split(far);
        let deadline = Instant::now() + Duration::from_secs(5);
        let both = async {
            tokio::join!(
                serve(&mut recv, &mut send, gate, observed(), deadline),
                client_half(near)
            )
        };
        tokio::time::timeout(Duration::from_secs(60), both)
            .await
            .unwrap()
    }

    fn refused(outcome: Outcome<SessionId>) -> Refusal {
        match outcome {
            Outcome::Refused { refusal, .. } => refusal,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hello_with_its_interfaces_is_welcomed_with_its_number_and_address() {
        let names = Names::default();
        let gate = TestGate::new(&names, 1);
        let (outcome, got) = exchange(&gate, |s| {
            client(s, hello(PROTOCOL_VERSION, "alice"), Some(chat()))
        })
        .await;
        assert_eq!(outcome, Outcome::Admitted(1));
        assert_eq!(
            got,
            vec![HelloAnswer::Welcome(Welcome {
                session: qmesh_proto::SessionId(1),
                observed: observed()
            })]
        );
        assert_eq!(
            *gate.admitted.lock().unwrap(),
            vec![("alice".into(), chat())]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_credential_takes_its_name_back_and_another_finds_it_taken() {
        let names = Names::default();
        let join = |gate| async move {
            exchange(gate, |s| {
                client(s, hello(PROTOCOL_VERSION, "alice"), Some(Vec::new()))
            })
            .await
        };
        let first = TestGate::new(&names, 1);
        assert_eq!(join(&first).await.0, Outcome::Admitted(1));
        assert_eq!(join(&first).await.0, Outcome::Admitted(2));
        let other = TestGate::new(&names, 2);
        let (outcome, got) = join(&other).await;
        let refusal = refused(outcome);
        assert_eq!(refusal.code, RejectCode::NameTaken);
        assert_eq!(
            got,
            vec![HelloAnswer::Reject(Reject {
                code: RejectCode::NameTaken,
                message: refusal.message
            })],
            "the refusal is sent, then the stream ends"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_check_sends_the_clipped_sentence_and_finishes() {
        let names = Names::default();
        let mut gate = TestGate::new(&names, 1);
        let long = "revoked; ".repeat(200);
        gate.refuse = Some(Refusal {
            code: RejectCode::NotAuthorised,
            message: long.clone(),
        });
        let (outcome, got) =
            exchange(&gate, |s| client(s, hello(PROTOCOL_VERSION, "alice"), None)).await;
        let refusal = refused(outcome);
        assert_eq!(refusal.message, clip_reason(&long));
        assert!(refusal.message.len() < long.len());
        assert_eq!(
            got,
            vec![HelloAnswer::Reject(Reject {
                code: RejectCode::NotAuthorised,
                message: refusal.message
            })]
        );
        assert!(names.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_client_is_refused_without_waiting_for_interfaces() {
        let names = Names::default();
        let gate = TestGate::new(&names, 1);
        let (outcome, got) = exchange(&gate, |s| {
            client(s, hello(PROTOCOL_VERSION - 1, "alice"), None)
        })
        .await;
        assert_eq!(refused(outcome).code, RejectCode::VersionMismatch);
        assert!(matches!(
            got[..],
            [HelloAnswer::Reject(Reject {
                code: RejectCode::VersionMismatch,
                ..
            })]
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_enrollment_gets_its_certificate_or_a_refusal_and_the_stream_ends() {
        let names = Names::default();
        let gate = TestGate::new(&names, 1);
        let enroll = |token: Option<&str>| Enroll {
            version: PROTOCOL_VERSION,
            name: "alice".into(),
            token: token.map(Into::into),
        };
        let (outcome, got) = exchange(&gate, |s| enrollee(s, enroll(Some("good")))).await;
        assert!(matches!(
            outcome,
            Outcome::Enrolled {
                expires: 99,
                renewal: false,
                ..
            }
        ));
        assert_eq!(
            got,
            vec![EnrollAnswer::Enrolled {
                cert_pem: "certificate for alice".into(),
                expires: 99
            }]
        );
        let (outcome, _) = exchange(&gate, |s| enrollee(s, enroll(None))).await;
        assert!(matches!(outcome, Outcome::Enrolled { renewal: true, .. }));
        let (outcome, got) = exchange(&gate, |s| enrollee(s, enroll(Some("forged")))).await;
        assert_eq!(refused(outcome).code, RejectCode::BadToken);
        assert!(matches!(
            got[..],
            [EnrollAnswer::Reject(Reject {
                code: RejectCode::BadToken,
                ..
            })]
        ));
        let mut old = enroll(Some("good"));
        old.version = PROTOCOL_VERSION - 1;
        let (outcome, got) = exchange(&gate, |s| enrollee(s, old)).await;
        assert_eq!(refused(outcome).code, RejectCode::VersionMismatch);
        assert!(matches!(
            got[..],
            [EnrollAnswer::Reject(Reject {
                code: RejectCode::VersionMismatch,
                ..
            })]
        ));
        assert!(names.lock().unwrap().is_empty(), "enrolling admits nobody");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_says_nothing_is_closed_at_the_deadline() {
        let names = Names::default();
        let gate = TestGate::new(&names, 1);
        let (outcome, _) = exchange(&gate, |s| async move {
            // Hold the stream open without a word until the server gives up.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        })
        .await;
        assert_eq!(outcome, Outcome::Violation(Violation::no_hello()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hello_without_its_interface_list_is_closed_at_the_deadline() {
        let names = Names::default();
        let gate = TestGate::new(&names, 1);
        let (outcome, _) = exchange(&gate, |mut s| async move {
            write_frame(&mut s, &hello(PROTOCOL_VERSION, "alice"))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let Outcome::Violation(v) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(v.code, ConnCode::HelloTimeout);
        assert_eq!(v.what, "no interface list within the hello timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_other_than_a_greeting_is_malformed() {
        let names = Names::default();
        let gate = TestGate::new(&names, 1);
        let (outcome, ()) = exchange(&gate, |mut s| async move {
            write_frame(&mut s, &StreamRequest::Watch { live: true })
                .await
                .unwrap();
        })
        .await;
        let Outcome::Violation(v) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(v.code, ConnCode::Malformed);
        assert!(v.what.starts_with("bad hello: "), "{}", v.what);
        assert!(names.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_welcome_that_cannot_be_delivered_gives_the_name_back() {
        let names = Names::default();
        let gate = TestGate::new(&names, 1);
        let (outcome, ()) = exchange(&gate, |mut s| async move {
            write_frame(&mut s, &hello(PROTOCOL_VERSION, "alice"))
                .await
                .unwrap();
            write_frame(&mut s, &ClientSession::Interfaces { list: chat() })
                .await
                .unwrap();
            // Gone before the welcome.
            drop(s);
        })
        .await;
        assert_eq!(outcome, Outcome::Violation(Violation::unwelcome()));
        assert_eq!(gate.admitted.lock().unwrap().len(), 1, "it was admitted");
        assert!(names.lock().unwrap().is_empty(), "and withdrawn");
    }
}
