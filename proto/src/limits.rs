//! Protocol constants: ALPN, version, and the sizes every side enforces.

/// The ALPN protocol identifier qmesh speaks over QUIC.
pub const ALPN: &[u8] = b"qmesh/1";

/// The ALPN protocol identifier of a direct connection between two clients.
/// Distinct from [`ALPN`], so a peer connection and a coordinator
/// connection can never be taken for each other.
pub const DIRECT_ALPN: &[u8] = b"qmesh-direct/1";

/// The most addresses a client may report for itself in its hello.
pub const MAX_REPORTED_ADDRS: usize = 8;

/// The protocol version carried in `Hello`. The coordinator refuses any other.
pub const PROTOCOL_VERSION: u32 = 9;

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
}
