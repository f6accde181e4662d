//! Numbers and names that travel in messages, each as its own type.
//!
//! A `u64` on the wire means one of three different things (a session, a
//! coordinator-wide channel number, or the QUIC id of a control stream on
//! one connection), and a `String` one of three kinds of name. Each gets a
//! newtype so that code cannot pass one where another is meant. All of them
//! are `#[serde(transparent)]`: the bytes on the wire are those of the
//! inner value.
//!
//! Name types do not validate on decode: a peer that sends a bad name gets
//! the same answer as before (an open failure or a reject that quotes the
//! name and says what a valid one looks like), from the code that checks it
//! with [`crate::name`].

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Serialize};

macro_rules! number {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl From<u64> for $name {
            fn from(n: u64) -> Self {
                Self(n)
            }
        }

        impl From<$name> for u64 {
            fn from(n: $name) -> u64 {
                n.0
            }
        }
    };
}

number! {
    /// The coordinator's number for a session, unique while it runs.
    SessionId
}

number! {
    /// The coordinator's number for a channel, the same on both sides and
    /// unique while it runs. Direct data streams name their channel by it.
    ChannelId
}

number! {
    /// The QUIC stream id of a channel's control stream on one connection.
    /// Relayed data streams name their channel by it; it means nothing on
    /// another connection.
    StreamId
}

macro_rules! name {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The name as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

name! {
    /// A client's name (rules in [`crate::name`]).
    ClientName
}

name! {
    /// A channel's name, the subport of `mesh/peer!channel` (rules in
    /// [`crate::name`]).
    ChannelName
}

name! {
    /// A broadcast group's name (channel-name rules).
    GroupName
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[test]
    fn newtypes_encode_as_their_inner_value() {
        assert_eq!(
            encode(&ChannelId(300)).expect("encode"),
            encode(&300u64).expect("encode")
        );
        assert_eq!(
            encode(&ClientName::from("bob")).expect("encode"),
            encode(&"bob".to_owned()).expect("encode")
        );
        let back: ClientName = decode(&encode(&"alice").expect("encode")).expect("decode");
        assert_eq!(back, "alice");
    }

    #[test]
    fn names_display_and_borrow_as_their_text() {
        let name = ChannelName::from("chat");
        assert_eq!(name.to_string(), "chat");
        assert_eq!(name.as_str(), "chat");
        let mut set = std::collections::HashSet::new();
        set.insert(name.clone());
        assert!(set.contains("chat"));
        assert_eq!(String::from(name), "chat");
        assert_eq!(StreamId(7).to_string(), "7");
        assert_eq!(u64::from(SessionId(9)), 9);
    }
}
