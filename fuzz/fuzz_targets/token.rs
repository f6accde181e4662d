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
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use qmesh_coordinator::token::{
    parse_payload, pattern_matches, TokenError, TokenKey, UsedTokens, MAX_PATTERN_LEN,
    MAX_TOKEN_LEN,
};

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
fn redeem_once(claims: &qmesh_coordinator::token::Claims, what: &str) {
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

fuzz_target!(|data: &[u8]| {
    let key = key();

    // The payload decoder, on the raw bytes.
    match parse_payload(data) {
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
    match key.verify(&text) {
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
    match key.create(&text, ttl) {
        Ok(token) => {
            assert!(!text.is_empty() && text.len() <= MAX_PATTERN_LEN);
            let claims = key
                .verify(&token)
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
                key.verify(&tampered),
                Err(TokenError::BadSignature),
                "{token:?} with digit {at} changed"
            );
            redeem_once(&claims, "created token");
        }
        Err(_) => assert!(
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
