//! Protocol constants: ALPN, version, and the sizes every side enforces.

/// The ALPN protocol identifier qmesh speaks over QUIC.
pub const ALPN: &[u8] = b"qmesh/1";

/// The ALPN protocol identifier of a direct connection between two clients.
/// Distinct from [`ALPN`], so a peer connection and a coordinator
/// connection can never be taken for each other.
pub const DIRECT_ALPN: &[u8] = b"qmesh-direct/1";

/// The ALPN protocol identifier of the member link between two coordinators
/// of one cluster (protocol.md §23). Distinct from [`ALPN`] and
/// [`DIRECT_ALPN`], so a client can never be taken for a member.
pub const LINK_ALPN: &[u8] = b"qmesh-peer/1";

/// The most addresses a client may report for itself in its hello.
pub const MAX_REPORTED_ADDRS: usize = 8;

/// The protocol version carried in `Hello`. The coordinator refuses any other.
pub const PROTOCOL_VERSION: u32 = 11;

/// Largest control frame body (session and channel control streams and data
/// stream headers). A declared length above this is refused before any
/// allocation.
pub const MAX_CONTROL_FRAME: usize = 16 * 1024;

/// Bytes of the length prefix in front of every frame and data message.
pub const LENGTH_PREFIX: usize = 4;

/// Default largest data message a client accepts (64 MiB).
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Hard ceiling on a configured message size: the length prefix is a `u32`.
pub const MAX_MESSAGE_CEILING: usize = u32::MAX as usize;

/// Default largest broadcast message body (64 KiB).
pub const DEFAULT_MAX_BROADCAST: usize = 64 * 1024;

/// Longest free-text reason (close and refusal reasons, error messages) a
/// sender puts in a message; longer reasons are cut at a character boundary.
pub const MAX_REASON: usize = 1024;

/// Cut `reason` to at most [`MAX_REASON`] bytes on a character boundary.
pub fn clip_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON {
        return reason.to_owned();
    }
    let mut end = MAX_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_and_cuts_on_char_boundary() {
        assert_eq!(clip_reason("bye"), "bye");
        let long = "é".repeat(MAX_REASON);
        let cut = clip_reason(&long);
        assert!(cut.len() <= MAX_REASON);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    /// Runs `f` on another thread and fails the test if it takes longer
    /// than five seconds, so a loop that never ends is a failure, not a hang.
    fn within_five_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("did not finish within five seconds")
    }

    #[test]
    fn clip_keeps_max_reason_bytes_and_cuts_back_to_a_char_boundary() {
        let exact = "a".repeat(MAX_REASON);
        assert_eq!(clip_reason(&exact), exact);
        let ascii = "a".repeat(MAX_REASON + 1);
        assert_eq!(clip_reason(&ascii), exact);
        // Byte MAX_REASON falls inside a 2-byte character: cut one earlier.
        let odd = format!("a{}", "é".repeat(MAX_REASON));
        let cut = within_five_seconds(move || clip_reason(&odd));
        assert_eq!(cut.len(), MAX_REASON - 1);
        assert!(cut.starts_with('a') && cut[1..].chars().all(|c| c == 'é'));
    }

    #[test]
    fn documented_limits_have_their_documented_values() {
        // docs/protocol.md states these sizes; a change is a protocol change.
        assert_eq!(MAX_CONTROL_FRAME, 16_384);
        assert_eq!(DEFAULT_MAX_MESSAGE, 67_108_864);
        assert_eq!(DEFAULT_MAX_BROADCAST, 65_536);
        assert_eq!(MAX_REASON, 1024);
        assert_eq!(MAX_MESSAGE_CEILING, 4_294_967_295);
    }
}
