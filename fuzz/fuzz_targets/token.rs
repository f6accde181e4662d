//! Enrollment tokens (coordinator/src/token.rs) on arbitrary input.
//!
//! - The raw bytes go to `parse_payload`: it must refuse anything outside
//!   8 + 16 + 1..=64 bytes or with a non-UTF-8 pattern, and read what it
//!   accepts field by field.
//! - The bytes as text (UTF-8, lossy) go to `TokenKey::verify` with a fixed
//!   key (bytes 0..32, written to a temporary `token.key` and read back with
//!   `TokenKey::load_or_create`; the seeds in corpus/token are signed with
//!   it). A token that verifies carries a 1 to 64 byte pattern; redeeming it
//!   for a name its pattern matches works once, unless it expired.
//! - The text as a pattern: `create` succeeds exactly for 1 to 64 bytes, and
//!   its token verifies back to that pattern and its expiry; changing any hex
//!   digit of it is a bad signature; it redeems once for a name the pattern
//!   matches.
//! - Text up to the first newline as a pattern and the rest as a name:
//!   `pattern_matches` must not panic, a pattern without `*` or `?` matches
//!   only itself, and every pattern matches the name made from it by
//!   dropping each `*` and turning each `?` into one character.
//!
//! None of it may panic.
//!
//! Allocation bounds, fixed whatever the input's length, since each of
//! these refuses oversized input before decoding it:
//! - `parse_payload`: `MAX_PATTERN_LEN` (64) bytes: it refuses a payload
//!   outside 8 + 16 + 1..=64 bytes first, and then copies only the pattern;
//! - `verify`: `MAX_TOKEN_LEN / 2` (256) bytes: it refuses text longer than
//!   `MAX_TOKEN_LEN` before decoding, and hex decoding halves what is left;
//! - `create`: `MAX_TOKEN_LEN` (512) bytes: it refuses a pattern outside
//!   1..=64 bytes first, and the token it makes for one is at most
//!   5 + 2 * (8 + 16 + 64) + 1 + 64 = 246 bytes long.
//!
//! `pattern_matches` is not a decoder and is left unarmed: it compiles
//! its pattern (up to 64 bytes in a token, or from the operator's policy)
//! into one state per character.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use qmesh_coordinator::token::{
    parse_payload, pattern_matches, Claims, TokenError, TokenKey, UsedTokens, MAX_PATTERN_LEN,
    MAX_TOKEN_LEN,
};
use qmesh_fuzz::check_allocation;

/// Errors made with anyhow (`create` refusing a pattern) capture a
/// backtrace when RUST_BACKTRACE is set, as CI sets it: an allocation of
/// some 2 KiB that depends on the depth of the stack, not on the input.
/// RUST_LIB_BACKTRACE=0 turns that off and keeps the backtraces of panics.
fn quiet_error_backtraces() {
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
}

/// `parse_payload`, checked against its bound.
fn parse(payload: &[u8]) -> Result<Claims, TokenError> {
    check_allocation(
        format_args!("parse_payload of {} bytes", payload.len()),
        MAX_PATTERN_LEN,
        "MAX_PATTERN_LEN: a payload outside 8 + 16 + 1..=64 bytes is refused first",
        || parse_payload(payload),
    )
}

/// `TokenKey::verify`, checked against its bound.
fn verify(key: &TokenKey, token: &str) -> Result<Claims, TokenError> {
    check_allocation(
        format_args!("verify of {} bytes", token.len()),
        MAX_TOKEN_LEN / 2,
        "MAX_TOKEN_LEN / 2: longer text is refused before hex decoding",
        || key.verify(token),
    )
}

/// `TokenKey::create`, checked against its bound (`None`: refused).
fn create(key: &TokenKey, pattern: &str, ttl: Duration) -> Option<String> {
    check_allocation(
        format_args!("create for a {} byte pattern", pattern.len()),
        MAX_TOKEN_LEN,
        "MAX_TOKEN_LEN: a pattern outside 1..=MAX_PATTERN_LEN bytes is refused first",
        || key.create(pattern, ttl).ok(),
    )
}

/// The fixed key: bytes 0, 1, ..., 31 (the seeds are signed with it).
fn key() -> &'static TokenKey {
    static KEY: OnceLock<TokenKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory for the token key");
        let path = dir.path().join("token.key");
        let hex: String = (0u8..32).map(|b| format!("{b:02x}")).collect();
        std::fs::write(&path, format!("{hex}\n")).expect("writing the token key");
        // The directory is removed when `dir` drops; the key is in memory.
        TokenKey::load_or_create(&path).expect("loading the fixed token key")
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A name `pattern` must match: each `*` dropped, each `?` made `a`.
fn name_for(pattern: &str) -> String {
    pattern
        .chars()
        .filter(|&c| c != '*')
        .map(|c| if c == '?' { 'a' } else { c })
        .collect()
}

/// Redeem verified claims for a name their pattern matches: once, unless
/// expired (then never).
fn redeem_once(claims: &Claims, what: &str) {
    let used = UsedTokens::in_memory();
    let name = name_for(&claims.pattern);
    let before = now_secs();
    match used.redeem(claims, &name) {
        Ok(()) => {
            assert!(claims.expires >= before, "{what}: expired token redeemed");
            assert_eq!(
                used.redeem(claims, &name),
                Err(TokenError::Used),
                "{what}: a token redeemed twice"
            );
        }
        Err(TokenError::Expired { ago }) => {
            assert!(
                claims.expires < now_secs(),
                "{what}: unexpired token refused as expired"
            );
            assert!(ago > 0);
        }
        Err(e) => panic!(
            "{what}: {:?} does not redeem for {name:?}: {e:?}",
            claims.pattern
        ),
    }
}

fuzz_target!(init: quiet_error_backtraces(), |data: &[u8]| {
    let key = key();

    // The payload decoder, on the raw bytes.
    match parse(data) {
        Ok(claims) => {
            assert!((8 + 16 + 1..=8 + 16 + MAX_PATTERN_LEN).contains(&data.len()));
            let expires = u64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
            assert_eq!(claims.expires, expires);
            assert_eq!(claims.pattern.as_bytes(), &data[24..]);
        }
        Err(e) => assert_eq!(e, TokenError::Malformed, "parse_payload refused with {e:?}"),
    }

    let text = String::from_utf8_lossy(data);

    // The token check the coordinator runs on a client's enroll request.
    match verify(key, &text) {
        Ok(claims) => {
            let t = text.trim();
            assert!(
                t.len() <= MAX_TOKEN_LEN && t.starts_with("qmt1_"),
                "{t:?} verified"
            );
            assert!(
                !claims.pattern.is_empty() && claims.pattern.len() <= MAX_PATTERN_LEN,
                "{t:?} verified with pattern {:?}",
                claims.pattern
            );
            redeem_once(&claims, "verified input");
        }
        Err(TokenError::Malformed | TokenError::BadSignature) => {}
        Err(e) => panic!("verify refused with {e:?}, which only redeem may say"),
    }

    // A token made for the text as a pattern.
    let ttl = Duration::from_secs(3600);
    let before = now_secs();
    match create(key, &text, ttl) {
        Some(token) => {
            assert!(!text.is_empty() && text.len() <= MAX_PATTERN_LEN);
            let claims = verify(key, &token)
                .unwrap_or_else(|e| panic!("created token {token:?} does not verify: {e:?}"));
            assert_eq!(
                claims.pattern, text,
                "created token carries another pattern"
            );
            let after = now_secs();
            assert!(
                claims.expires >= before + ttl.as_secs() && claims.expires <= after + ttl.as_secs(),
                "created token expires at {}, not {} s from now",
                claims.expires,
                ttl.as_secs()
            );
            // Change one hex digit (chosen by the input) of payload or tag.
            let digits: Vec<usize> = token
                .char_indices()
                .skip("qmt1_".len())
                .filter(|&(_, c)| c != '_')
                .map(|(i, _)| i)
                .collect();
            let at =
                digits[data.len().wrapping_mul(31).wrapping_add(data[0] as usize) % digits.len()];
            let mut tampered = token.clone().into_bytes();
            tampered[at] = if tampered[at] == b'0' { b'1' } else { b'0' };
            let tampered = String::from_utf8(tampered).expect("hex is ASCII");
            assert_eq!(
                verify(key, &tampered),
                Err(TokenError::BadSignature),
                "{token:?} with digit {at} changed"
            );
            redeem_once(&claims, "created token");
        }
        None => assert!(
            text.is_empty() || text.len() > MAX_PATTERN_LEN,
            "create refused a {} byte pattern",
            text.len()
        ),
    }

    // Name patterns, as policies and tokens use them.
    let (pattern, name) = text.split_once('\n').unwrap_or((&text, ""));
    let matched = pattern_matches(pattern, name);
    if !pattern.contains(['*', '?']) {
        assert_eq!(matched, pattern == name, "{pattern:?} against {name:?}");
    }
    let own = name_for(pattern);
    assert!(
        pattern_matches(pattern, &own),
        "{pattern:?} does not match {own:?}"
    );
});
