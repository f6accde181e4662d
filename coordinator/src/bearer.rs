//! The bearer token of the HTTP listener (`run --http-token-file`).

use anyhow::Context as _;
use axum::http::{header, HeaderMap};
use ring::hmac;

/// The secret every request to the HTTP listener must carry. Compared in
/// constant time: the listener keeps an HMAC of it under a random key and
/// checks each presented token with `ring::hmac::verify`, so neither the
/// token's bytes nor its length show in the time an answer takes.
#[derive(Clone)]
pub struct BearerToken {
    key: hmac::Key,
    tag: hmac::Tag,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    /// A token with the value `secret`.
    pub fn new(secret: &str) -> anyhow::Result<BearerToken> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| anyhow::anyhow!("no random numbers for the HTTP token's key"))?;
        let tag = hmac::sign(&key, secret.as_bytes());
        Ok(BearerToken { key, tag })
    }

    /// The token in `path`: its first line, without surrounding white
    /// space, which must not be empty.
    pub fn read(path: &std::path::Path) -> anyhow::Result<BearerToken> {
        let text = crate::files::read_small(path, 4096)
            .with_context(|| format!("reading the HTTP token file {}", path.display()))?;
        let secret = text.lines().next().unwrap_or("").trim();
        if secret.is_empty() {
            anyhow::bail!(
                "the HTTP token file {} is empty: put a long random token in it, e.g. \
                 `head -c 32 /dev/urandom | base64 > {}`",
                path.display(),
                path.display()
            );
        }
        BearerToken::new(secret)
    }

    /// Whether `presented` is the token.
    pub fn matches(&self, presented: &[u8]) -> bool {
        hmac::verify(&self.key, presented, self.tag.as_ref()).is_ok()
    }

    /// Whether `headers` carry `Authorization: Bearer TOKEN` with this
    /// token (the scheme's name in any case, RFC 7235).
    pub(crate) fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        let scheme = b"bearer ";
        if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return false;
        }
        self.matches(value[scheme.len()..].trim_ascii())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn only_the_token_as_a_bearer_is_admitted() {
        let token = BearerToken::new("s3cret-token").unwrap();
        assert!(token.admits(&headers("Bearer s3cret-token")));
        assert!(token.admits(&headers("bearer s3cret-token")));
        assert!(token.admits(&headers("Bearer  s3cret-token ")));
        assert!(!token.admits(&headers("Bearer s3cret-toke")));
        assert!(!token.admits(&headers("Bearer s3cret-token2")));
        assert!(!token.admits(&headers("Basic s3cret-token")));
        assert!(!token.admits(&headers("Bearer ")));
        assert!(!token.admits(&headers("s3cret-token")));
        assert!(!token.admits(&HeaderMap::new()));
        assert_eq!(format!("{token:?}"), "BearerToken(..)");
    }

    #[test]
    fn a_token_file_gives_its_first_line_and_may_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  abc123 \nignored\n").unwrap();
        let token = BearerToken::read(&path).unwrap();
        assert!(token.matches(b"abc123"));
        std::fs::write(&path, "\n").unwrap();
        let e = BearerToken::read(&path).unwrap_err();
        assert!(format!("{e:#}").contains("is empty"), "{e:#}");
        let e = BearerToken::read(&dir.path().join("missing")).unwrap_err();
        assert!(
            format!("{e:#}").contains("reading the HTTP token file"),
            "{e:#}"
        );
    }
}
