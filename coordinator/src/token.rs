//! One-use enrollment tokens.
//!
//! A token is `qmt1_` + hex(payload) + `_` + hex(HMAC-SHA256(key, payload)).
//! The payload is the expiry (8 bytes, big-endian Unix seconds), a random
//! 16-byte nonce and the name pattern it is for (UTF-8, at most 64 bytes).
//! The key is 32 random bytes in the coordinator's state directory, so
//! `qmesh-coordinator token create` works offline, without the running
//! coordinator. A token works once: the coordinator records each used nonce
//! (in memory and in `tokens-used` in the state directory) until the token
//! would have expired anyway.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::files::{read_small, write_private};

/// Longest token text accepted; anything longer is refused before decoding.
pub const MAX_TOKEN_LEN: usize = 512;
/// Longest name pattern a token may carry.
pub const MAX_PATTERN_LEN: usize = 64;
const PREFIX: &str = "qmt1_";
const NONCE: usize = 16;

/// Why a token was not accepted. Each sentence says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The text is not a token at all.
    #[error("this is not a qmesh enrollment token (they start with qmt1_); copy the whole token `qmesh-coordinator token create` printed")]
    Malformed,
    /// The signature does not match this coordinator's token key.
    #[error("this token was not issued by this coordinator (or its token key changed); ask the operator for a new one")]
    BadSignature,
    /// The token's lifetime is over.
    #[error("this token expired {ago} s ago; ask the operator for a new one")]
    Expired {
        /// Seconds since it expired.
        ago: u64,
    },
    /// The name asked for does not match the token's pattern.
    #[error("this token is for names matching `{pattern}`, not `{name}`")]
    WrongName {
        /// The token's pattern.
        pattern: String,
        /// The name asked for.
        name: String,
    },
    /// The token was used before.
    #[error("this token was already used (a token works once); ask the operator for a new one")]
    Used,
    /// The coordinator could not record the use, so it does not accept it.
    #[error("the coordinator could not record this token's use (a storage problem on its side); the token is not used up, try again later")]
    Unrecorded,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Unix seconds after which the token is refused.
    pub expires: u64,
    /// The names it enrolls (`*` and `?` wildcards).
    pub pattern: String,
    nonce: [u8; NONCE],
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether `name` matches a pattern with `*` and `?` wildcards.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    wildmatch::WildMatch::new(pattern).matches(name)
}

/// The HMAC key tokens are signed with.
#[derive(Debug)]
pub struct TokenKey {
    key: hmac::Key,
}

impl TokenKey {
    /// The key in `path`, made (32 random bytes, mode 0600) when missing.
    pub fn load_or_create(path: &Path) -> anyhow::Result<TokenKey> {
        let bytes = if path.exists() {
            let text = read_small(path, 1024)?;
            let bytes = hex::decode(text.trim())
                .map_err(|e| anyhow::anyhow!("{} is not a hex token key: {e}", path.display()))?;
            if bytes.len() != 32 {
                anyhow::bail!("{} must hold 32 bytes of hex", path.display());
            }
            bytes
        } else {
            let mut bytes = vec![0u8; 32];
            SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| anyhow::anyhow!("no random bytes for the token key"))?;
            write_private(path, format!("{}\n", hex::encode(&bytes)).as_bytes())?;
            bytes
        };
        Ok(TokenKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        })
    }

    /// A new token for names matching `pattern`, valid for `ttl`.
    pub fn create(&self, pattern: &str, ttl: Duration) -> anyhow::Result<String> {
        let expires = now_secs().saturating_add(ttl.as_secs().max(1));
        self.create_until(pattern, UNIX_EPOCH + Duration::from_secs(expires))
    }

    /// A new token for names matching `pattern`, refused after `expires`
    /// (which may be in the past: tests use that).
    pub fn create_until(&self, pattern: &str, expires: SystemTime) -> anyhow::Result<String> {
        let expires = expires
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if pattern.is_empty() || pattern.len() > MAX_PATTERN_LEN {
            anyhow::bail!("a token's name pattern must be 1 to {MAX_PATTERN_LEN} bytes");
        }
        let mut nonce = [0u8; NONCE];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no random bytes for the token"))?;
        let mut payload = Vec::with_capacity(8 + NONCE + pattern.len());
        payload.extend_from_slice(&expires.to_be_bytes());
        payload.extend_from_slice(&nonce);
        payload.extend_from_slice(pattern.as_bytes());
        let tag = hmac::sign(&self.key, &payload);
        Ok(format!(
            "{PREFIX}{}_{}",
            hex::encode(&payload),
            hex::encode(tag.as_ref())
        ))
    }

    /// Check a token's form and signature (not its expiry or use).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let body = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let (payload, tag) = body.split_once('_').ok_or(TokenError::Malformed)?;
        let payload = hex::decode(payload).map_err(|_| TokenError::Malformed)?;
        let tag = hex::decode(tag).map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, &payload, &tag).map_err(|_| TokenError::BadSignature)?;
        parse_payload(&payload)
    }
}

/// Decode a signed payload. Public for the fuzz target; signature checks
/// happen before this in [`TokenKey::verify`].
pub fn parse_payload(payload: &[u8]) -> Result<Claims, TokenError> {
    if payload.len() < 8 + NONCE + 1 || payload.len() > 8 + NONCE + MAX_PATTERN_LEN {
        return Err(TokenError::Malformed);
    }
    let (expires, rest) = payload.split_at(8);
    let (nonce, pattern) = rest.split_at(NONCE);
    let expires = u64::from_be_bytes(expires.try_into().map_err(|_| TokenError::Malformed)?);
    let nonce: [u8; NONCE] = nonce.try_into().map_err(|_| TokenError::Malformed)?;
    let pattern = std::str::from_utf8(pattern)
        .map_err(|_| TokenError::Malformed)?
        .to_owned();
    Ok(Claims {
        expires,
        pattern,
        nonce,
    })
}

/// Nonces of used tokens, until they expire; kept in a file so that a
/// restart does not make a used token good again.
#[derive(Debug)]
pub struct UsedTokens {
    used: Mutex<HashMap<[u8; NONCE], u64>>,
    file: Option<PathBuf>,
}

impl UsedTokens {
    /// An empty set kept in memory only.
    pub fn in_memory() -> UsedTokens {
        UsedTokens {
            used: Mutex::new(HashMap::new()),
            file: None,
        }
    }

    /// The set recorded in `path` (missing: empty), without expired
    /// entries; new entries are appended to it.
    pub fn load(path: &Path) -> anyhow::Result<UsedTokens> {
        let mut used = HashMap::new();
        let now = now_secs();
        if path.exists() {
            let text = std::fs::read_to_string(path)?;
            for line in text.lines() {
                let mut parts = line.split_whitespace();
                let (Some(n), Some(e)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let (Ok(n), Ok(e)) = (hex::decode(n), e.parse::<u64>()) else {
                    continue;
                };
                if let Ok(n) = <[u8; NONCE]>::try_from(n.as_slice()) {
                    if e >= now {
                        used.insert(n, e);
                    }
                }
            }
            let kept: String = used
                .iter()
                .map(|(n, e)| format!("{} {e}\n", hex::encode(n)))
                .collect();
            write_private(path, kept.as_bytes())?;
        }
        Ok(UsedTokens {
            used: Mutex::new(used),
            file: Some(path.to_owned()),
        })
    }

    /// Use up a verified token for `name`: it must match the name, be
    /// unexpired and unused. Exactly one of concurrent uses succeeds.
    pub fn redeem(&self, claims: &Claims, name: &str) -> Result<(), TokenError> {
        let now = now_secs();
        if now > claims.expires {
            return Err(TokenError::Expired {
                ago: now - claims.expires,
            });
        }
        if !pattern_matches(&claims.pattern, name) {
            return Err(TokenError::WrongName {
                pattern: claims.pattern.clone(),
                name: name.to_owned(),
            });
        }
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        used.retain(|_, e| *e >= now);
        if used.contains_key(&claims.nonce) {
            return Err(TokenError::Used);
        }
        used.insert(claims.nonce, claims.expires);
        if let Some(path) = &self.file {
            let line = format!("{} {}\n", hex::encode(claims.nonce), claims.expires);
            if let Err(e) = crate::files::append_private(path, &line) {
                tracing::error!(file = %path.display(), cause = %e, "cannot record a used token; refusing it");
                used.remove(&claims.nonce);
                return Err(TokenError::Unrecorded);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(dir: &Path) -> TokenKey {
        TokenKey::load_or_create(&dir.join("token.key")).unwrap()
    }

    #[test]
    fn a_token_works_once_for_matching_names() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path());
        let used = UsedTokens::load(&dir.path().join("used")).unwrap();
        let t = k.create("ci-*", Duration::from_secs(60)).unwrap();
        let claims = k.verify(&t).unwrap();
        assert!(matches!(
            used.redeem(&claims, "alice"),
            Err(TokenError::WrongName { .. })
        ));
        used.redeem(&claims, "ci-7").unwrap();
        assert_eq!(used.redeem(&claims, "ci-8"), Err(TokenError::Used));
        // A restart keeps it used.
        let again = UsedTokens::load(&dir.path().join("used")).unwrap();
        assert_eq!(again.redeem(&claims, "ci-7"), Err(TokenError::Used));
        // The key file is reused, so the token still verifies.
        assert_eq!(key(dir.path()).verify(&t).unwrap(), claims);
    }

    #[test]
    fn tampered_foreign_and_expired_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let k = key(dir.path());
        let t = k.create("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(key(other.path()).verify(&t), Err(TokenError::BadSignature));
        // Change the pattern's last byte: the signature no longer matches.
        let (head, tag) = t.rsplit_once('_').unwrap();
        let mut head = head.to_owned();
        head.pop();
        head.push('0');
        assert_eq!(
            k.verify(&format!("{head}_{tag}")),
            Err(TokenError::BadSignature)
        );
        for junk in ["", "qmt1_", "qmt1_zz_zz", "hello", &"a".repeat(4000)] {
            assert_eq!(k.verify(junk), Err(TokenError::Malformed), "{junk}");
        }
        let mut claims = k.verify(&t).unwrap();
        claims.expires = now_secs() - 10;
        assert!(matches!(
            UsedTokens::in_memory().redeem(&claims, "alice"),
            Err(TokenError::Expired { .. })
        ));
    }

    /// A payload of `pattern_len` pattern bytes, as `create_until` lays it out.
    fn payload(expires: u64, pattern_len: usize) -> Vec<u8> {
        let mut p = expires.to_be_bytes().to_vec();
        p.extend_from_slice(&[9; NONCE]);
        p.extend(std::iter::repeat_n(b'a', pattern_len));
        p
    }

    #[test]
    fn a_payload_holds_one_to_max_pattern_bytes() {
        assert_eq!(parse_payload(&payload(0, 0)), Err(TokenError::Malformed));
        assert_eq!(
            parse_payload(&payload(0, 0)[..8]),
            Err(TokenError::Malformed)
        );
        let one = parse_payload(&payload(77, 1)).unwrap();
        assert_eq!((one.expires, one.pattern.as_str()), (77, "a"));
        assert_eq!(one.nonce, [9; NONCE]);
        let max = parse_payload(&payload(u64::MAX, MAX_PATTERN_LEN)).unwrap();
        assert_eq!(max.expires, u64::MAX);
        assert_eq!(max.pattern, "a".repeat(MAX_PATTERN_LEN));
        assert_eq!(
            parse_payload(&payload(0, MAX_PATTERN_LEN + 1)),
            Err(TokenError::Malformed)
        );
        let mut not_utf8 = payload(0, 1);
        *not_utf8.last_mut().unwrap() = 0xff;
        assert_eq!(parse_payload(&not_utf8), Err(TokenError::Malformed));
    }

    #[test]
    fn a_pattern_of_one_to_max_bytes_makes_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path());
        let ttl = Duration::from_secs(60);
        assert!(k.create("", ttl).is_err());
        assert!(k.create(&"a".repeat(MAX_PATTERN_LEN + 1), ttl).is_err());
        for pattern in ["a", &"a".repeat(MAX_PATTERN_LEN)] {
            let t = k.create(pattern, ttl).unwrap();
            assert_eq!(k.verify(&t).unwrap().pattern, pattern);
        }
    }

    #[test]
    fn a_token_text_up_to_max_len_is_read_and_a_longer_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path());
        // Surrounding blanks are trimmed before the length check.
        let t = k.create("alice", Duration::from_secs(60)).unwrap();
        let padded = format!("{t}{}", " ".repeat(MAX_TOKEN_LEN));
        assert_eq!(k.verify(&padded).unwrap().pattern, "alice");
        // Hex digits after the signature lengthen the text: at MAX_TOKEN_LEN
        // it is read and its signature checked; longer (an even number of
        // digits, so still hex) it is refused unread.
        let at_max = format!("{t}{}", "0".repeat(MAX_TOKEN_LEN - t.len()));
        assert_eq!(k.verify(&at_max), Err(TokenError::BadSignature));
        let over = format!("{t}{}", "0".repeat(MAX_TOKEN_LEN + 2 - t.len()));
        assert_eq!(k.verify(&over), Err(TokenError::Malformed));
    }

    #[test]
    fn a_ttl_below_one_second_still_gives_one_second() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path());
        let before = now_secs();
        let claims = k
            .verify(&k.create("alice", Duration::ZERO).unwrap())
            .unwrap();
        assert!(claims.expires > before, "{} <= {before}", claims.expires);
        assert!(claims.expires <= now_secs() + 1);
    }

    /// Runs `f` with the current Unix second, again if the clock ticked
    /// while it ran (as in `auth`'s tests), so the exact expiry second is
    /// tested without sleeping.
    fn in_one_second<T>(mut f: impl FnMut(u64) -> T) -> T {
        for _ in 0..5 {
            let now = now_secs();
            let out = f(now);
            if now_secs() == now {
                return out;
            }
        }
        panic!("the clock ticked during each of five tries");
    }

    #[test]
    fn a_token_works_through_its_expiry_second_and_not_after() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path());
        let (last, late) = in_one_second(|now| {
            let until = |secs| {
                let t = k.create_until("alice", UNIX_EPOCH + Duration::from_secs(secs));
                k.verify(&t.unwrap()).unwrap()
            };
            let used = UsedTokens::in_memory();
            (
                used.redeem(&until(now), "alice"),
                used.redeem(&until(now - 3), "alice"),
            )
        });
        assert_eq!(last, Ok(()));
        assert_eq!(late, Err(TokenError::Expired { ago: 3 }));
    }

    #[test]
    fn a_used_token_is_forgotten_only_once_it_has_expired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("used");
        let keep = [1u8; NONCE];
        let gone = [2u8; NONCE];
        let now = now_secs();
        // One entry expiring in an hour, one an hour ago, and junk lines.
        std::fs::write(
            &path,
            format!(
                "{} {}\n{} {}\nnot-hex 5\n{} soon\n{}\n",
                hex::encode(keep),
                now + 3600,
                hex::encode(gone),
                now - 3600,
                hex::encode(keep),
                hex::encode(keep),
            ),
        )
        .unwrap();
        let used = UsedTokens::load(&path).unwrap();
        assert_eq!(
            used.used.lock().unwrap().keys().collect::<Vec<_>>(),
            [&keep]
        );
        // The file is rewritten without the expired entry and the junk.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{} {}\n", hex::encode(keep), now + 3600));
        // Redeeming drops expired entries from memory too.
        used.used.lock().unwrap().insert(gone, now - 1);
        let claims = Claims {
            expires: now + 60,
            pattern: "alice".into(),
            nonce: [3; NONCE],
        };
        used.redeem(&claims, "alice").unwrap();
        let mut left: Vec<_> = used.used.lock().unwrap().keys().copied().collect();
        left.sort();
        assert_eq!(left, [keep, [3; NONCE]]);
    }

    #[test]
    fn concurrent_redeems_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path());
        let used = std::sync::Arc::new(UsedTokens::in_memory());
        let claims = k
            .verify(&k.create("alice", Duration::from_secs(60)).unwrap())
            .unwrap();
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    let used = used.clone();
                    let claims = claims.clone();
                    s.spawn(move || used.redeem(&claims, "alice").is_ok() as usize)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
    }
}
