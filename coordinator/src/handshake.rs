//! The hello handshake: the first exchange on a new connection's session
//! stream, which admits the client, refuses it, or enrolls it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use qmesh_certs::Fingerprint;
use qmesh_proto::codec::{read_frame, write_frame};
use qmesh_proto::codes::{ConnCode, RejectCode};
use qmesh_proto::manifest::validate_interfaces;
use qmesh_proto::msg::{PresenceEvent, SessionMsg};
use qmesh_proto::PROTOCOL_VERSION;
use quinn::{Connection, VarInt};
use rustls_pki_types::CertificateDer;
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::limit::Limiter;
use crate::registry::{Admitted, Holder, Rejection};
use crate::session::{Session, Shared};
use crate::wire::{code, read_error_code};

/// How long a refusal, an issued certificate or a welcome may take to be
/// written before the connection is closed anyway.
pub(crate) const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Close `conn` because its peer broke the protocol, and say so at `warn`.
fn violation(conn: &Connection, code: ConnCode, what: &str) {
    warn!(peer = %conn.remote_address(), code = %code, cause = what, "closing connection");
    conn.close(self::code(code), what.as_bytes());
}

/// Refuse a hello or an enrollment: the `Reject` on the session stream,
/// then a close carrying the same sentence.
async fn refuse(
    shared: &Shared,
    conn: &Connection,
    send: &mut quinn::SendStream,
    name: &str,
    c: RejectCode,
    message: &str,
) {
    shared.stats.hellos_refused.fetch_add(1, Ordering::Relaxed);
    info!(peer = %conn.remote_address(), name = %name, code = ?c, cause = %message, "hello refused");
    let message = qmesh_proto::limits::clip_reason(message);
    let reject = SessionMsg::Reject {
        code: c,
        message: message.clone(),
    };
    // Bounded: a peer that never opens its window must not hold the
    // connection (and its pending place) past a second.
    let _ = timeout(LINGER, async {
        if write_frame(send, &reject).await.is_ok() && send.finish().is_ok() {
            // Let the rejection arrive before the close; the close carries
            // the same sentence in case it does not.
            let _ = send.stopped().await;
        }
    })
    .await;
    conn.close(code(c.conn_code()), message.as_bytes());
}

/// Answer an enrollment or renewal, then end the connection.
async fn enroll(
    shared: &Shared,
    conn: &Connection,
    mut send: quinn::SendStream,
    chain: &[CertificateDer<'static>],
    (version, name, token): (u32, String, Option<String>),
) {
    if version != PROTOCOL_VERSION {
        let msg = format!("this coordinator speaks protocol version {PROTOCOL_VERSION}, the client {version}; upgrade the older side");
        return refuse(
            shared,
            conn,
            &mut send,
            &name,
            RejectCode::VersionMismatch,
            &msg,
        )
        .await;
    }
    let renewal = token.is_none();
    match shared.config.auth.enroll(&name, token.as_deref(), chain) {
        Ok((cert_pem, expires)) => {
            shared
                .stats
                .certificates_issued
                .fetch_add(1, Ordering::Relaxed);
            info!(peer = %conn.remote_address(), name = %name, expires, renewal, "certificate issued");
            let reply = SessionMsg::Enrolled { cert_pem, expires };
            let _ = timeout(LINGER * 2, async {
                if write_frame(&mut send, &reply).await.is_ok() && send.finish().is_ok() {
                    let _ = send.stopped().await;
                }
            })
            .await;
            conn.close(code(ConnCode::Normal), b"certificate issued");
        }
        Err((code, message)) => refuse(shared, conn, &mut send, &name, code, &message).await,
    }
}

/// Wait for the hello and answer it; returns the admitted session and its
/// control stream, or `None` when the connection was refused, enrolled or
/// closed.
pub(crate) async fn hello(
    shared: &Arc<Shared>,
    conn: &Connection,
    deadline: tokio::time::Instant,
) -> Option<(Arc<Session>, quinn::SendStream, quinn::RecvStream)> {
    let first = tokio::time::timeout_at(deadline, async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        Some((send, read_frame::<SessionMsg, _>(&mut recv).await, recv))
    })
    .await;
    let (mut send, msg, recv) = match first {
        Err(_) => {
            violation(
                conn,
                ConnCode::HelloTimeout,
                "no hello within the hello timeout",
            );
            return None;
        }
        Ok(None) => return None,
        Ok(Some(x)) => x,
    };
    // The server configuration requires a client certificate, so a missing
    // one here means the TLS layer and this code disagree.
    let Some(chain) = qmesh_certs::peer_chain(conn) else {
        violation(
            conn,
            ConnCode::Internal,
            "no client certificate after the handshake",
        );
        return None;
    };
    let (version, name, direct) = match msg {
        Ok(Some(SessionMsg::Hello {
            version,
            name,
            direct,
        })) => (version, name, direct),
        Ok(Some(SessionMsg::Enroll {
            version,
            name,
            token,
        })) => {
            enroll(shared, conn, send, &chain, (version, name, token)).await;
            return None;
        }
        Ok(Some(other)) => {
            let what = format!("expected hello, got {}", session_msg_name(&other));
            violation(conn, ConnCode::UnexpectedMessage, &what);
            return None;
        }
        Ok(None) => {
            violation(
                conn,
                ConnCode::Malformed,
                "session stream ended before hello",
            );
            return None;
        }
        Err(e) => {
            if let Some(code) = read_error_code(&e) {
                violation(conn, code, &format!("bad hello: {e}"));
            }
            return None;
        }
    };
    if direct
        .as_ref()
        .is_some_and(|a| a.len() > qmesh_proto::limits::MAX_REPORTED_ADDRS)
    {
        let what = format!(
            "hello reports more than {} addresses",
            qmesh_proto::limits::MAX_REPORTED_ADDRS
        );
        violation(conn, ConnCode::Malformed, &what);
        return None;
    }
    let mut recv = recv;
    let mut interfaces = Vec::new();
    if version == PROTOCOL_VERSION {
        if let Err((code, message)) = shared.config.auth.check_hello(&name, &chain) {
            refuse(shared, conn, &mut send, &name, code, &message).await;
            return None;
        }
        // The client's interfaces follow its hello at once.
        let declared =
            tokio::time::timeout_at(deadline, read_frame::<SessionMsg, _>(&mut recv)).await;
        match declared {
            Ok(Ok(Some(SessionMsg::Interfaces { list }))) => {
                if let Err(what) = validate_interfaces(&list) {
                    violation(
                        conn,
                        ConnCode::Malformed,
                        &format!("bad interface list: {what}"),
                    );
                    return None;
                }
                interfaces = list;
            }
            Ok(Ok(Some(other))) => {
                let what = format!(
                    "expected interfaces after hello, got {}",
                    session_msg_name(&other)
                );
                violation(conn, ConnCode::UnexpectedMessage, &what);
                return None;
            }
            Ok(Ok(None)) => {
                violation(
                    conn,
                    ConnCode::Malformed,
                    "session stream ended after hello",
                );
                return None;
            }
            Ok(Err(e)) => {
                if let Some(code) = read_error_code(&e) {
                    violation(conn, code, &format!("bad interface list: {e}"));
                }
                return None;
            }
            Err(_) => {
                violation(
                    conn,
                    ConnCode::HelloTimeout,
                    "no interface list within the hello timeout",
                );
                return None;
            }
        }
    }
    let interfaces = Arc::new(interfaces);
    let fingerprint = Fingerprint::of(&chain[0]);
    let key = qmesh_certs::clientauth::key_id(&chain[0]);
    let admitted = shared.registry().admit(
        version,
        &name,
        |id| {
            Arc::new(Session {
                id,
                name: name.clone(),
                conn: conn.clone(),
                fingerprint,
                key,
                direct: direct.clone(),
                channels: Mutex::new(HashMap::new()),
                slots: AtomicUsize::new(0),
                limiter: Limiter::new(&shared.config.rate),
                interfaces: Mutex::new(interfaces.clone()),
                closed_why: std::sync::OnceLock::new(),
            })
        },
        |held| {
            if held.conn.close_reason().is_some() {
                Holder::Gone
            } else if held.fingerprint == fingerprint || (key.is_some() && held.key == key) {
                // The same certificate, or one renewed for the same key.
                Holder::SameCredential
            } else {
                Holder::Other
            }
        },
    );
    match admitted {
        Ok(Admitted {
            id,
            handle: session,
            replaced,
        }) => {
            let rejoined = replaced.is_some();
            if let Some(old) = replaced {
                info!(name = %name, old = old.id, new = id, "the same credential connected again; closing its old session");
                old.close(
                    ConnCode::Replaced,
                    "this name was taken over by a new session with the same credential",
                );
            }
            // Authenticated: open the windows and stream limits that were
            // kept small until now.
            let tuning = &shared.config.tuning;
            conn.set_receive_window(VarInt::from_u32(tuning.conn_window));
            conn.set_max_concurrent_bi_streams(VarInt::from_u32(tuning.max_bidi_streams));
            conn.set_max_concurrent_uni_streams(VarInt::from_u32(tuning.max_uni_streams));
            let welcome = SessionMsg::Welcome {
                session: id,
                observed: conn.remote_address(),
            };
            let written =
                tokio::time::timeout_at(deadline + LINGER, write_frame(&mut send, &welcome)).await;
            if !matches!(written, Ok(Ok(()))) {
                shared.registry().leave(&name, id);
                violation(
                    conn,
                    ConnCode::HelloTimeout,
                    "the welcome could not be delivered in time",
                );
                return None;
            }
            // A revocation that landed between the check above and the
            // admission: revoke adds to the list, then closes what the
            // registry holds, so one of the two sees this session.
            if shared.config.auth.revocations().contains(&fingerprint) {
                shared.registry().leave(&name, id);
                session.close_revoked();
                return None;
            }
            shared
                .stats
                .sessions_admitted
                .fetch_add(1, Ordering::Relaxed);
            let interfaces = interfaces.to_vec();
            let _ = shared.presence.send(if rejoined {
                PresenceEvent::Changed {
                    name: name.clone(),
                    interfaces,
                }
            } else {
                PresenceEvent::Joined {
                    name: name.clone(),
                    interfaces,
                }
            });
            Some((session, send, recv))
        }
        Err(Rejection { code, message }) => {
            debug!(
                client_version = version,
                ours = PROTOCOL_VERSION,
                "registry refused"
            );
            refuse(shared, conn, &mut send, &name, code, &message).await;
            None
        }
    }
}

pub(crate) fn session_msg_name(msg: &SessionMsg) -> &'static str {
    match msg {
        SessionMsg::Hello { .. } => "hello",
        SessionMsg::Welcome { .. } => "welcome",
        SessionMsg::Reject { .. } => "reject",
        SessionMsg::Enroll { .. } => "enroll",
        SessionMsg::Enrolled { .. } => "enrolled",
        SessionMsg::Interfaces { .. } => "interfaces",
        SessionMsg::Ping { .. } => "ping",
        SessionMsg::Pong { .. } => "pong",
    }
}
