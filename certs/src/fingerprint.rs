//! SHA-256 certificate fingerprints.

use std::fmt;
use std::str::FromStr;

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::CertError;

/// The prefix of a fingerprint's text form.
const PREFIX: &str = "sha256:";

/// The SHA-256 digest of a certificate's DER encoding.
///
/// Its text form is `sha256:` followed by 64 lowercase hex digits. Parsing
/// ([`FromStr`]) is lenient: the prefix may be left out, hex digits may be
/// upper or lower case, and bytes may be separated by `:` (as in
/// `AB:CD:...`, the form many tools print).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        Fingerprint(Sha256::digest(cert.as_ref()).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = CertError;

    fn from_str(input: &str) -> Result<Fingerprint, CertError> {
        let bad = |reason: String| CertError::BadFingerprint {
            input: input.to_owned(),
            reason,
        };
        let text = input.trim();
        let text = match text.get(..PREFIX.len()) {
            Some(head) if head.eq_ignore_ascii_case(PREFIX) => &text[PREFIX.len()..],
            _ => text,
        };
        if let Some((pos, c)) = text
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_hexdigit() || c == ':'))
        {
            return Err(bad(format!(
                "unexpected character {c:?} at position {pos} (after any sha256: prefix)"
            )));
        }
        let digits: String = if text.contains(':') {
            let groups: Vec<&str> = text.split(':').collect();
            if groups.iter().any(|g| g.len() != 2) {
                return Err(bad(
                    "when ':' separators are used they must sit between every byte \
                     (two hex digits each)"
                        .to_owned(),
                ));
            }
            groups.concat()
        } else {
            text.to_owned()
        };
        if digits.len() != 64 {
            return Err(bad(format!(
                "a SHA-256 fingerprint has 32 bytes (64 hex digits), this has {} hex digit{}",
                digits.len(),
                if digits.len() == 1 { "" } else { "s" }
            )));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&digits, &mut bytes).map_err(|e| bad(e.to_string()))?;
        Ok(Fingerprint(bytes))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn sample() -> Fingerprint {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(HEX, &mut bytes).unwrap();
        Fingerprint(bytes)
    }

    #[test]
    fn display_is_prefixed_lowercase_hex() {
        assert_eq!(sample().to_string(), format!("sha256:{HEX}"));
        assert_eq!(format!("{:?}", sample()), format!("sha256:{HEX}"));
    }

    #[test]
    fn display_parse_round_trip() {
        let fp = sample();
        assert_eq!(fp.to_string().parse::<Fingerprint>().unwrap(), fp);
    }

    #[test]
    fn parse_accepts_variants() {
        let fp = sample();
        assert_eq!(HEX.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(HEX.to_uppercase().parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(
            format!("SHA256:{}", HEX.to_uppercase())
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
        let colons = HEX
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(
            format!("  sha256:{colons}\n")
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
    }

    #[test]
    fn of_hashes_the_der() {
        let der = CertificateDer::from(b"abc".to_vec());
        assert_eq!(
            Fingerprint::of(&der).to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn reason(input: &str) -> String {
        match input.parse::<Fingerprint>() {
            Err(CertError::BadFingerprint { input: got, reason }) => {
                assert_eq!(got, input);
                reason
            }
            other => panic!("expected BadFingerprint for {input:?}, got {other:?}"),
        }
    }

    #[test]
    fn parse_errors_are_clear() {
        assert!(reason("").contains("(64 hex digits), this has 0 hex digits"));
        assert!(reason("sha256:abcd").contains("this has 4 hex digits"));
        assert!(reason(&format!("{HEX}00")).contains("this has 66"));
        let bad_char = format!("sha256:{}g", &HEX[..63]);
        assert!(reason(&bad_char).contains("unexpected character 'g' at position 63"));
        assert!(reason("sha1:abcd").contains("unexpected character 's'"));
        assert!(reason(&format!("{}:{}", &HEX[..3], &HEX[3..])).contains("between every byte"));
        let message = "abcd".parse::<Fingerprint>().unwrap_err().to_string();
        assert!(message.contains("expected sha256:"), "{message}");
    }
}
