//! Receipts: how `qmesh send` learns what `qmesh listen` has delivered.
//!
//! The sender opens one pipe on the channel and writes [`HELLO`]. A
//! listener that keeps count answers with the same line, then writes
//! `LINES BYTES\n` each time its count grows: the lines it has printed
//! (and their bytes, newline not included), plus the bytes of every file it
//! has stored complete under its name. A file cut off on the way counts
//! nothing: it is kept as `NAME.part`, not delivered. Both sides bound
//! what they read: the hello by its length, each count line by
//! [`MAX_LINE`].

use std::time::Duration;

use qmesh_client::{Channel, Pipe};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::watch;
use tracing::{debug, warn};

/// The first line each side writes on the receipts pipe.
pub(crate) const HELLO: &[u8] = b"qmesh-receipts/1\n";

/// Longest count line a sender accepts (two u64s, a space and a newline).
const MAX_LINE: u64 = 48;

/// How long a listener waits for the hello on a pipe before closing it.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// What the listener has delivered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Count {
    /// Lines printed.
    pub(crate) lines: u64,
    /// Bytes printed (lines without their newline) and bytes of files
    /// stored complete.
    pub(crate) bytes: u64,
}

impl Count {
    /// Whether this covers everything in `sent`.
    pub(crate) fn covers(&self, sent: &Count) -> bool {
        self.lines >= sent.lines && self.bytes >= sent.bytes
    }

    fn parse(line: &str) -> Option<Count> {
        let (lines, bytes) = line.trim_end().split_once(' ')?;
        Some(Count {
            lines: lines.parse().ok()?,
            bytes: bytes.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} line(s), {} byte(s)", self.lines, self.bytes)
    }
}

/// The sender's side: open the receipts pipe and follow the listener's
/// count. The value is `None` until the listener has answered the hello
/// (and stays `None` for a peer that does not keep count).
pub(crate) async fn ask(channel: &Channel) -> watch::Receiver<Option<Count>> {
    let (tx, rx) = watch::channel(None);
    let mut pipe = match channel.open_pipe().await {
        Ok(p) => p,
        Err(e) => {
            debug!(cause = %e, "no receipts pipe");
            return rx;
        }
    };
    tokio::spawn(async move {
        let (send, recv) = pipe.halves();
        if send.write_all(HELLO).await.is_err() {
            return;
        }
        let mut hello = [0u8; HELLO.len()];
        if recv.read_exact(&mut hello).await.is_err() || hello != HELLO {
            return;
        }
        tx.send_replace(Some(Count::default()));
        let mut lines = BufReader::new(recv);
        let mut line = String::new();
        loop {
            line.clear();
            match (&mut lines).take(MAX_LINE).read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            match Count::parse(&line) {
                Some(c) => {
                    tx.send_modify(|now| {
                        if let Some(now) = now {
                            now.lines = now.lines.max(c.lines);
                            now.bytes = now.bytes.max(c.bytes);
                        }
                    });
                }
                None => {
                    warn!("the peer sent a receipt that is not two counts; ignoring its receipts");
                    tx.send_replace(None);
                    return;
                }
            }
        }
    });
    rx
}

/// The listener's side: answer the hello on `pipe`, then write `count`
/// each time it grows, until the channel's count is dropped or the sender
/// goes away.
pub(crate) async fn answer(mut pipe: Pipe, mut count: watch::Receiver<Count>) {
    let (send, recv) = pipe.halves();
    let mut hello = [0u8; HELLO.len()];
    match tokio::time::timeout(HELLO_WAIT, recv.read_exact(&mut hello)).await {
        Ok(Ok(_)) if hello == HELLO => {}
        _ => {
            debug!("a pipe that is not a receipts pipe; closing it");
            let _ = send.reset(qmesh_proto::codes::StreamCode::Cancelled.varint());
            return;
        }
    }
    if send.write_all(HELLO).await.is_err() {
        return;
    }
    loop {
        let now = *count.borrow_and_update();
        if send
            .write_all(format!("{} {}\n", now.lines, now.bytes).as_bytes())
            .await
            .is_err()
        {
            return;
        }
        if count.changed().await.is_err() {
            let last = *count.borrow();
            if last != now {
                let _ = send
                    .write_all(format!("{} {}\n", last.lines, last.bytes).as_bytes())
                    .await;
            }
            let _ = send.finish();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_line_parses_and_others_do_not() {
        assert_eq!(
            Count::parse("3 17\n"),
            Some(Count {
                lines: 3,
                bytes: 17
            })
        );
        assert_eq!(Count::parse("3\n"), None);
        assert_eq!(Count::parse("x 1\n"), None);
        assert_eq!(Count::parse("-1 2\n"), None);
    }

    #[test]
    fn a_count_covers_what_was_sent_only_when_both_figures_reach_it() {
        let sent = Count {
            lines: 2,
            bytes: 10,
        };
        assert!(Count {
            lines: 2,
            bytes: 10
        }
        .covers(&sent));
        assert!(Count {
            lines: 3,
            bytes: 11
        }
        .covers(&sent));
        assert!(!Count {
            lines: 1,
            bytes: 10
        }
        .covers(&sent));
        assert!(!Count { lines: 2, bytes: 9 }.covers(&sent));
    }
}
