//! Text from peers made safe to put in a log line.
//!
//! A name, channel name, interface name or reason that came from the
//! network may hold a newline and a made-up log prefix, terminal escape
//! sequences, or ten thousand characters. Logged as it is, it forges log
//! lines or floods the log. [`Untrusted`] displays such text on one line
//! and within a bound:
//!
//! - control and other invisible characters (and `\`) are shown as Rust
//!   escapes, as [`char::escape_debug`] writes them: `\n`, `\t`, `\\`,
//!   `\u{1b}`, `\u{202e}`. Quotes and printable characters stay as they
//!   are, so a valid name displays unchanged.
//! - past its limit ([`MAX_SHOWN`] characters of output for a name,
//!   [`MAX_SHOWN_REASON`] for a sentence) the text is cut, on a character
//!   boundary, and ends with `…(N more bytes)`, N counting the bytes of the
//!   original text that were left out.
//!
//! Every log site that prints a peer-supplied string wraps it:
//!
//! ```
//! use qmesh_proto::untrusted::Untrusted;
//!
//! let name = "bob\n[2026-01-01 00:00:00.000 WARN session/admin] forged";
//! let shown = Untrusted::name(name).to_string();
//! assert_eq!(shown, "bob\\n[2026-01-01 00:00:00.000 WARN session/admin] forged");
//! assert!(!shown.contains('\n'));
//! // tracing: warn!(name = %Untrusted::name(&name), "hello refused");
//! ```
//!
//! Tokens are never logged, wrapped or not.

use std::fmt::{self, Display, Write};

use crate::limits::MAX_REASON;

/// The most characters [`Untrusted::name`] shows before it cuts.
pub const MAX_SHOWN: usize = 128;

/// The most characters [`Untrusted::reason`] shows before it cuts: a
/// reason's limit on the wire ([`MAX_REASON`]).
pub const MAX_SHOWN_REASON: usize = MAX_REASON;

/// Peer-supplied text (anything that displays), shown escaped and clipped;
/// see the [module documentation](self).
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<T> {
    value: T,
    max: usize,
}

impl<T: Display> Untrusted<T> {
    /// A name or other short string from a peer, clipped at [`MAX_SHOWN`]
    /// characters.
    pub fn name(value: T) -> Self {
        Self::clipped_at(value, MAX_SHOWN)
    }

    /// A reason or sentence that is, or holds, text from a peer, clipped
    /// at [`MAX_SHOWN_REASON`] characters.
    pub fn reason(value: T) -> Self {
        Self::clipped_at(value, MAX_SHOWN_REASON)
    }

    /// `value`, showing at most `max` characters.
    pub fn clipped_at(value: T, max: usize) -> Self {
        Self { value, max }
    }
}

impl<T: Display> Display for Untrusted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Escaper {
            out: f,
            shown: 0,
            max: self.max,
            left_out: 0,
        };
        write!(out, "{}", self.value)?;
        let left_out = out.left_out;
        if left_out > 0 {
            write!(f, "…({left_out} more bytes)")?;
        }
        Ok(())
    }
}

/// Writes what it is given escaped, until `max` characters are out; then
/// counts the bytes it leaves out.
struct Escaper<'a, 'b> {
    out: &'a mut fmt::Formatter<'b>,
    shown: usize,
    max: usize,
    left_out: usize,
}

impl Write for Escaper<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for (i, c) in s.char_indices() {
            if self.left_out > 0 {
                // Cut already: count the rest and stop.
                self.left_out += s.len() - i;
                return Ok(());
            }
            let escaped = escape(c);
            let len = escaped.clone().count();
            if self.shown + len > self.max {
                self.left_out = s.len() - i;
                return Ok(());
            }
            self.shown += len;
            for e in escaped {
                self.out.write_char(e)?;
            }
        }
        Ok(())
    }
}

/// `c` as shown: quotes as they are, anything else as
/// [`char::escape_debug`] shows it (itself when printable).
fn escape(c: char) -> Escaped {
    match c {
        '"' | '\'' => Escaped::Plain(Some(c)),
        _ => Escaped::Debug(c.escape_debug()),
    }
}

/// The characters that show one character.
#[derive(Clone)]
enum Escaped {
    Plain(Option<char>),
    Debug(std::char::EscapeDebug),
}

impl Iterator for Escaped {
    type Item = char;

    fn next(&mut self) -> Option<char> {
        match self {
            Escaped::Plain(c) => c.take(),
            Escaped::Debug(e) => e.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_valid_name_shows_as_it_is() {
        for name in ["bob", "eu.west_2", "node-1", &"a".repeat(64)] {
            assert_eq!(Untrusted::name(name).to_string(), name);
        }
        assert_eq!(
            Untrusted::reason("closed by the peer: it's \"done\"").to_string(),
            "closed by the peer: it's \"done\""
        );
    }

    #[test]
    fn control_characters_and_backslashes_are_escaped() {
        let forged = "x\n[2026-01-01 00:00:00.000 WARN session/admin] owned\r\t\u{1b}[31m\\n";
        assert_eq!(
            Untrusted::name(forged).to_string(),
            "x\\n[2026-01-01 00:00:00.000 WARN session/admin] owned\\r\\t\\u{1b}[31m\\\\n"
        );
        // Unicode line breaks, bidi overrides and other invisible ones too.
        assert_eq!(
            Untrusted::name("a\u{2028}b\u{202e}c\u{85}d\u{0}").to_string(),
            "a\\u{2028}b\\u{202e}c\\u{85}d\\0"
        );
        // Printable non-ASCII stays.
        assert_eq!(Untrusted::name("zürich").to_string(), "zürich");
    }

    #[test]
    fn long_text_is_cut_with_the_count_of_bytes_left_out() {
        let long = "a".repeat(10_000);
        let shown = Untrusted::name(&long).to_string();
        assert_eq!(
            shown,
            format!("{}…(9872 more bytes)", "a".repeat(MAX_SHOWN))
        );
        // Exactly at the limit: nothing cut.
        let at = "b".repeat(MAX_SHOWN);
        assert_eq!(Untrusted::name(&at).to_string(), at);
        // A reason has the longer limit.
        let shown = Untrusted::reason(&long).to_string();
        assert!(shown.starts_with(&"a".repeat(MAX_SHOWN_REASON)));
        assert!(shown.ends_with(&format!("…({} more bytes)", 10_000 - MAX_SHOWN_REASON)));
    }

    #[test]
    fn a_value_written_in_pieces_counts_every_piece_left_out() {
        /// Displays itself in three writes.
        struct Pieces;
        impl Display for Pieces {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("abcdef")?;
                f.write_str("ghij")?;
                f.write_str("kl")
            }
        }
        let shown = Untrusted::clipped_at(Pieces, 3).to_string();
        assert_eq!(shown, "abc…(9 more bytes)");
        assert_eq!(
            Untrusted::clipped_at(Pieces, 12).to_string(),
            "abcdefghijkl"
        );
    }

    #[test]
    fn the_cut_counts_escapes_as_shown_and_never_splits_one() {
        // 127 plain characters, then a newline whose escape would pass 128.
        let text = format!("{}\néé", "x".repeat(MAX_SHOWN - 1));
        assert_eq!(
            Untrusted::name(&text).to_string(),
            format!("{}…(5 more bytes)", "x".repeat(MAX_SHOWN - 1))
        );
        // Multi-byte characters are counted as characters, cut whole.
        let text = "é".repeat(MAX_SHOWN + 1);
        assert_eq!(
            Untrusted::name(&text).to_string(),
            format!("{}…(2 more bytes)", "é".repeat(MAX_SHOWN))
        );
    }

    #[test]
    fn any_display_can_be_wrapped() {
        let err = std::io::Error::other("bad\nline");
        assert_eq!(Untrusted::reason(&err).to_string(), "bad\\nline");
        assert_eq!(
            Untrusted::clipped_at(format_args!("{}-{}", "ab", "cd"), 3).to_string(),
            "ab-…(2 more bytes)"
        );
    }

    proptest! {
        #[test]
        fn shown_text_is_one_line_and_bounded(
            chars in proptest::collection::vec(any::<char>(), 0..400)
        ) {
            // Any characters, controls included (`any::<String>()` has none).
            let text: String = chars.into_iter().collect();
            let shown = Untrusted::name(&text).to_string();
            let breaks = ['\u{2028}', '\u{2029}'];
            prop_assert!(!shown.chars().any(char::is_control), "{:?}", shown);
            prop_assert!(!shown.contains(breaks), "{:?}", shown);
            // The shown part, plus the marker.
            let marker = format!("…({} more bytes)", text.len());
            prop_assert!(shown.chars().count() <= MAX_SHOWN + marker.chars().count());
        }

        #[test]
        fn text_that_needs_no_escape_and_fits_is_unchanged(text in "[ -\\[\\]-~]{0,128}") {
            prop_assert_eq!(Untrusted::name(&text).to_string(), text);
        }
    }
}
