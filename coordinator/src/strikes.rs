//! Strikes: the protocol violations one session commits on its streams
//! (a bad data stream header, a header that never comes, an oversized
//! broadcast), which stop only the offending stream.
//!
//! Each one counts against the session: past [`MAX_STRIKES`] the session
//! is closed (`ConnCode::Malformed`). The log lines about them are limited
//! to [`LOG_PER_WINDOW`] per [`WINDOW`] per session; the rest are counted,
//! and the next line logged (or the close) says how many were suppressed.
//! So one session can neither flood the log nor keep the coordinator busy
//! with violations for long.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Stream violations a session may commit before it is closed.
pub const MAX_STRIKES: u32 = 32;

/// Log lines about one session's violations per [`WINDOW`].
pub const LOG_PER_WINDOW: u32 = 5;

/// The window [`LOG_PER_WINDOW`] counts in.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One session's count.
#[derive(Debug, Default)]
pub(crate) struct Strikes(Mutex<State>);

#[derive(Debug, Default)]
struct State {
    count: u32,
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// What to do about one violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Strike {
    /// The session's violations so far, this one included.
    pub(crate) count: u32,
    /// Log it: `Some(n)`, `n` being the lines suppressed since the last
    /// one logged. `None`: suppress it.
    pub(crate) log: Option<u64>,
    /// This violation put the session over its limit: close it. Only
    /// the first one past the limit says so; streams read while that
    /// close is on its way must not close the session again with another
    /// count (the reason the client sees would depend on which task ran
    /// first).
    pub(crate) close: bool,
}

impl Strikes {
    /// Count one violation at `now`.
    pub(crate) fn strike(&self, now: Instant) -> Strike {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.count = s.count.saturating_add(1);
        let fresh = s.window.is_none_or(|start| now >= start + WINDOW);
        if fresh {
            s.window = Some(now);
            s.logged = 0;
        }
        let over = s.count > MAX_STRIKES;
        // The line that closes the session is always logged, once: streams
        // read while the close is on its way are over too, and would
        // otherwise each log a line past the limit.
        let closing = s.count == MAX_STRIKES + 1;
        let log = if (s.logged < LOG_PER_WINDOW && !over) || closing {
            s.logged += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        };
        Strike {
            count: s.count,
            log,
            close: closing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_logs_its_first_lines_and_counts_the_rest() {
        let strikes = Strikes::default();
        let t0 = Instant::now();
        for i in 1..=LOG_PER_WINDOW {
            let s = strikes.strike(t0);
            assert_eq!(s.count, i);
            assert_eq!(s.log, Some(0), "strike {i}");
            assert!(!s.close);
        }
        for _ in 0..3 {
            assert_eq!(strikes.strike(t0 + Duration::from_secs(1)).log, None);
        }
        // The next window's first line says how many were left out.
        let next = strikes.strike(t0 + WINDOW);
        assert_eq!(next.log, Some(3));
        assert_eq!(next.count, LOG_PER_WINDOW + 4);
        assert_eq!(strikes.strike(t0 + WINDOW).log, Some(0));
    }

    #[test]
    fn past_the_limit_the_session_is_closed_with_a_logged_line() {
        let strikes = Strikes::default();
        let t0 = Instant::now();
        for _ in 0..MAX_STRIKES {
            assert!(!strikes.strike(t0).close);
        }
        let last = strikes.strike(t0);
        assert!(last.close);
        assert_eq!(last.count, MAX_STRIKES + 1);
        assert_eq!(
            last.log,
            Some(u64::from(MAX_STRIKES - LOG_PER_WINDOW)),
            "the closing line carries the suppressed count"
        );
        // A stream read while the close is on its way: over, neither
        // logged nor closing again.
        let after = strikes.strike(t0 + WINDOW);
        assert!(!after.close);
        assert_eq!(after.count, MAX_STRIKES + 2);
        assert_eq!(after.log, None);
    }
}
