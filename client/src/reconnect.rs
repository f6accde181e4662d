//! Staying connected: when a session with the coordinator is lost, decide
//! whether to try again, how long to wait (exponential backoff with
//! jitter), and tell the difference between a fault that may pass (the
//! coordinator restarting, a network outage) and a refusal that will not
//! (a revoked certificate, a name held by another credential).
//!
//! The decisions are plain functions with unit tests; [`crate::client`]
//! runs the loop.

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::time::Duration;

use qmesh_proto::codes::{ConnCode, RejectCode};
use quinn::ConnectionError;

use crate::error::ConnectError;

/// How a client reconnects after losing its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// Reconnect at all. When `false`, the first lost session ends the
    /// client, as [`crate::Client::closed`] reports.
    pub enabled: bool,
    /// The first retry comes within this long of the loss (a random delay
    /// between zero and this, so that clients of a restarted coordinator
    /// do not all come back in the same instant).
    pub first: Duration,
    /// The longest wait between two attempts.
    pub max: Duration,
    /// Give up after this many failed attempts in a row; `None` goes on
    /// until the client is closed.
    pub limit: Option<u32>,
}

impl Default for Reconnect {
    /// On, first retry within 100 ms, at most 5 s apart, no limit.
    fn default() -> Self {
        Self {
            enabled: true,
            first: Duration::from_millis(100),
            max: Duration::from_secs(5),
            limit: None,
        }
    }
}

impl Reconnect {
    /// Never reconnect: the first lost session ends the client.
    pub fn never() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// The wait before attempt `attempt` (1 for the first), given `unit`, a
    /// random number in `[0, 1)`.
    ///
    /// The ceiling doubles from [`Reconnect::first`] with each attempt, up
    /// to [`Reconnect::max`]. The first attempt waits anywhere in
    /// `[0, first]`; later ones in the upper half of their ceiling, so the
    /// waits keep growing while clients still spread out.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        let doublings = attempt.saturating_sub(1).min(30);
        let ceiling = self
            .first
            .saturating_mul(1u32 << doublings)
            .min(self.max.max(self.first));
        if attempt <= 1 {
            ceiling.mul_f64(unit)
        } else {
            ceiling / 2 + (ceiling / 2).mul_f64(unit)
        }
    }
}

/// A random number in `[0, 1)`, from the standard library's per-process
/// random hash keys (jitter needs spread, not cryptographic strength).
pub(crate) fn jitter() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Which of `n` coordinator addresses to try first, given `unit`, a
/// random number in `[0, 1)`: spread evenly, so that the clients of a mesh
/// share its coordinators.
pub(crate) fn first_choice(n: usize, unit: f64) -> usize {
    if n <= 1 {
        return 0;
    }
    ((unit.clamp(0.0, 1.0) * n as f64) as usize).min(n - 1)
}

/// Which address attempt `attempt` (1 for the first) of a reconnect tries,
/// of `n`, after a session on address `current` was lost: the same one
/// first (a restarted coordinator comes back there), then each of the
/// others in turn.
pub(crate) fn address_for(attempt: u32, current: usize, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    (current + attempt.saturating_sub(1) as usize) % n
}

/// Where a reconnect's turn over `list` starts: the place of `lost`, the
/// candidate the lost session was on, as `(configured index, resolved
/// address)`; when that address no longer resolves, the first of the same
/// configured address; the first of all when that address is gone too.
pub(crate) fn position(list: &[(usize, SocketAddr)], lost: (usize, SocketAddr)) -> usize {
    list.iter()
        .position(|c| *c == lost)
        .or_else(|| list.iter().position(|(index, _)| *index == lost.0))
        .unwrap_or(0)
}

/// What to do after a session ended this way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    /// Try again: the fault may pass.
    Retry,
    /// Stop: trying again would be refused the same way, or the end was
    /// asked for.
    Stop,
}

/// Whether a session that ended with `err` is worth another try.
/// `closed_here` says whether this side closed it for a reason of its own
/// (the coordinator went silent, or broke the protocol); a close without
/// one is the application leaving.
pub(crate) fn after_session(err: &ConnectionError, closed_here: bool) -> After {
    match err {
        ConnectionError::ApplicationClosed(close) => {
            match ConnCode::from_code(close.error_code.into_inner()) {
                Some(code) => after_code(code),
                // A code this version does not know: a newer coordinator's
                // close. Trying again costs one handshake per backoff.
                None => After::Retry,
            }
        }
        ConnectionError::LocallyClosed if closed_here => After::Retry,
        ConnectionError::LocallyClosed => After::Stop,
        ConnectionError::VersionMismatch => After::Stop,
        ConnectionError::TimedOut
        | ConnectionError::Reset
        | ConnectionError::TransportError(_)
        | ConnectionError::ConnectionClosed(_)
        | ConnectionError::CidsExhausted => After::Retry,
    }
}

/// Whether a session the coordinator closed with `code` is worth another
/// try.
fn after_code(code: ConnCode) -> After {
    match code {
        // The coordinator is restarting, overloaded, or one side stopped
        // hearing the other: all may pass.
        ConnCode::Normal
        | ConnCode::Shutdown
        | ConnCode::Internal
        | ConnCode::Full
        | ConnCode::HeartbeatMissed
        // The operator closed the session (`kick`), not the credential.
        | ConnCode::Kicked
        | ConnCode::Unavailable => After::Retry,
        // Refusals of this credential or this name, and this client's own
        // protocol faults: the same hello would meet the same answer.
        ConnCode::Malformed
        | ConnCode::FrameTooLarge
        | ConnCode::UnexpectedMessage
        | ConnCode::VersionMismatch
        | ConnCode::NameTaken
        | ConnCode::InvalidName
        | ConnCode::HelloTimeout
        | ConnCode::NotAuthorised
        | ConnCode::Replaced
        | ConnCode::Revoked
        | ConnCode::BadToken
        | ConnCode::RateExceeded => After::Stop,
    }
}

/// Whether a failed reconnect attempt is worth another.
pub(crate) fn after_attempt(err: &ConnectError) -> After {
    match err {
        ConnectError::Rejected { code, .. } => match code {
            RejectCode::ShuttingDown | RejectCode::Full | RejectCode::Unavailable => After::Retry,
            RejectCode::VersionMismatch
            | RejectCode::NameTaken
            | RejectCode::InvalidName
            | RejectCode::NotAuthorised
            | RejectCode::BadToken => After::Stop,
        },
        // The coordinator's certificate no longer verifies, or it refuses
        // this client's: not a fault that passes by waiting.
        ConnectError::Certificate(_)
        | ConnectError::CertificateRefused(_)
        | ConnectError::Config(_)
        | ConnectError::Address(_) => After::Stop,
        ConnectError::Resolve { .. }
        | ConnectError::Socket(_)
        | ConnectError::Handshake { .. }
        | ConnectError::Timeout { .. }
        | ConnectError::Session(_)
        // Every one of them was worth another try, or it would have
        // stopped there.
        | ConnectError::NoneJoined { .. } => After::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_close(code: ConnCode) -> ConnectionError {
        ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: code.varint(),
            reason: bytes::Bytes::from_static(b"x"),
        })
    }

    #[test]
    fn the_first_retry_comes_within_first_and_later_ones_double_up_to_max() {
        let r = Reconnect::default();
        assert_eq!(r.delay(1, 0.0), Duration::ZERO);
        assert_eq!(
            r.delay(1, 0.999_999),
            Duration::from_millis(100).mul_f64(0.999_999)
        );
        assert!(r.delay(1, 1.0) <= Duration::from_millis(100));
        // Attempt 2: ceiling 200 ms, upper half.
        assert_eq!(r.delay(2, 0.0), Duration::from_millis(100));
        assert_eq!(r.delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(r.delay(4, 0.5), Duration::from_millis(600));
        // Capped at max, however many attempts.
        assert_eq!(r.delay(7, 1.0), Duration::from_secs(5));
        assert_eq!(r.delay(u32::MAX, 1.0), Duration::from_secs(5));
        assert_eq!(r.delay(u32::MAX, 0.0), Duration::from_millis(2500));
    }

    #[test]
    fn the_delays_follow_the_configured_first_and_max() {
        let r = Reconnect {
            first: Duration::from_millis(10),
            max: Duration::from_millis(40),
            ..Reconnect::default()
        };
        let ceilings: Vec<_> = (1..=5).map(|a| r.delay(a, 1.0)).collect();
        assert_eq!(
            ceilings,
            [10, 20, 40, 40, 40].map(Duration::from_millis).to_vec()
        );
    }

    #[test]
    fn the_first_choice_spreads_over_every_address() {
        assert_eq!(first_choice(1, 0.9), 0);
        assert_eq!(first_choice(0, 0.5), 0);
        assert_eq!(
            [0.0, 0.3, 0.34, 0.67, 0.999].map(|u| first_choice(3, u)),
            [0, 0, 1, 2, 2]
        );
        assert_eq!(first_choice(3, 1.0), 2);
    }

    #[test]
    fn a_reconnect_tries_the_lost_coordinator_first_then_the_others_in_turn() {
        let order: Vec<usize> = (1..=5).map(|a| address_for(a, 1, 3)).collect();
        assert_eq!(order, [1, 2, 0, 1, 2]);
        assert_eq!(address_for(7, 0, 1), 0);
    }

    #[test]
    fn a_reconnect_starts_where_the_lost_session_was_even_when_the_addresses_changed() {
        let a = |last: u8| SocketAddr::from(([192, 0, 2, last], 7447));
        let list = [(0, a(1)), (0, a(2)), (0, a(3)), (1, a(9))];
        assert_eq!(position(&list, (0, a(2))), 1);
        assert_eq!(position(&list, (1, a(9))), 3);
        // 192.0.2.4 no longer resolves: the first of the same name.
        assert_eq!(position(&list, (1, a(4))), 3);
        assert_eq!(position(&list, (0, a(4))), 0);
        // A configured address that resolves to nothing now.
        assert_eq!(position(&list[..3], (1, a(9))), 0);
        assert_eq!(position(&[], (0, a(1))), 0);
        // Then each other in turn, over every address of every name.
        let order: Vec<usize> = (1..=5).map(|n| address_for(n, 2, list.len())).collect();
        assert_eq!(order, [2, 3, 0, 1, 2]);
    }

    #[test]
    fn never_is_off_and_the_default_is_on_with_no_limit() {
        assert!(!Reconnect::never().enabled);
        let on = Reconnect::default();
        assert!(on.enabled);
        assert_eq!(on.limit, None);
        assert_eq!(
            (on.first, on.max),
            (Duration::from_millis(100), Duration::from_secs(5))
        );
    }

    #[test]
    fn jitter_spreads_over_the_unit_interval() {
        let draws: Vec<f64> = (0..200).map(|_| jitter()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        assert!(draws.iter().any(|u| *u < 0.25));
        assert!(draws.iter().any(|u| *u > 0.75));
    }

    #[test]
    fn a_restart_an_outage_or_silence_is_retried() {
        for code in [
            ConnCode::Shutdown,
            ConnCode::HeartbeatMissed,
            ConnCode::Internal,
            ConnCode::Full,
            ConnCode::Normal,
        ] {
            assert_eq!(
                after_session(&app_close(code), false),
                After::Retry,
                "{code}"
            );
        }
        assert_eq!(
            after_session(&ConnectionError::TimedOut, false),
            After::Retry
        );
        assert_eq!(after_session(&ConnectionError::Reset, false), After::Retry);
        // This side closed it because the coordinator went silent.
        assert_eq!(
            after_session(&ConnectionError::LocallyClosed, true),
            After::Retry
        );
    }

    #[test]
    fn a_refusal_of_the_credential_or_name_and_leaving_are_final() {
        for code in [
            ConnCode::Revoked,
            ConnCode::Replaced,
            ConnCode::NotAuthorised,
            ConnCode::NameTaken,
            ConnCode::RateExceeded,
            ConnCode::Malformed,
        ] {
            assert_eq!(
                after_session(&app_close(code), false),
                After::Stop,
                "{code}"
            );
        }
        assert_eq!(
            after_session(&ConnectionError::LocallyClosed, false),
            After::Stop
        );
        assert_eq!(
            after_session(&ConnectionError::VersionMismatch, false),
            After::Stop
        );
    }

    #[test]
    fn attempts_stop_at_a_refusal_and_go_on_past_an_unreachable_coordinator() {
        let rejected = |code| ConnectError::Rejected {
            code,
            message: String::new(),
        };
        assert_eq!(after_attempt(&rejected(RejectCode::NameTaken)), After::Stop);
        assert_eq!(
            after_attempt(&rejected(RejectCode::NotAuthorised)),
            After::Stop
        );
        assert_eq!(
            after_attempt(&rejected(RejectCode::ShuttingDown)),
            After::Retry
        );
        assert_eq!(after_attempt(&rejected(RejectCode::Full)), After::Retry);
        assert_eq!(
            after_attempt(&ConnectError::CertificateRefused("revoked".into())),
            After::Stop
        );
        assert_eq!(
            after_attempt(&ConnectError::Certificate("unknown issuer".into())),
            After::Stop
        );
        assert_eq!(
            after_attempt(&ConnectError::Handshake {
                addr: "quic/$4:1".into(),
                reason: "timed out".into()
            }),
            After::Retry
        );
        assert_eq!(
            after_attempt(&ConnectError::Timeout {
                addr: "quic/$4:1".into(),
                secs: 10
            }),
            After::Retry
        );
    }
}
