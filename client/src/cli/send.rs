//! `qmesh send`: stdin lines or a file to a channel.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use qmesh_client::{Channel, Client, MessageSender, Path, PathMode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::receipts::{self, Count};
use super::{FILE_CHUNK, FILE_STREAM, TEXT_STREAM};

/// How long `send` waits, once everything is sent, for a peer that has not
/// answered the receipts hello before it gives up on receipts.
const RECEIPTS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) async fn run(
    client: Client,
    address: &str,
    file: Option<PathBuf>,
    mode: PathMode,
) -> Result<()> {
    let target: qmesh_client::Address = address
        .parse()
        .with_context(|| format!("the channel address {address:?}"))?;
    let started = std::time::Instant::now();
    let channel = client
        .open_with(&target, mode)
        .await
        .with_context(|| format!("opening {address}"))?;
    eprintln!(
        "qmesh: channel {} open after {} ms, path {} (mode {mode:?})",
        channel.label(),
        started.elapsed().as_millis(),
        channel.path()
    );
    let mut paths = channel.watch_path();
    let label = channel.label().to_owned();
    tokio::spawn(async move {
        while paths.changed().await.is_ok() {
            let now = *paths.borrow_and_update();
            eprintln!(
                "qmesh: channel {label} path {now} after {} ms",
                started.elapsed().as_millis()
            );
        }
    });
    let confirmed = receipts::ask(&channel).await;
    let mut sent = Count::default();
    let sending = async {
        match file {
            Some(path) => {
                let mut out = channel
                    .open_stream()
                    .await
                    .context("opening a data stream")?;
                send_file(&mut out, &path, &mut sent).await?;
                out.finish().await.context("finishing the data stream")
            }
            None => send_lines(&channel, &mut sent).await,
        }
    };
    // A channel that ends first ends the sending at once: a write on a
    // direct stream would otherwise wait for the direct connection's idle
    // timeout, and a read of stdin for more input.
    let outcome = tokio::select! {
        done = sending => done,
        end = channel.ended() => Err(anyhow::anyhow!("{end}")),
    };
    if let Err(e) = outcome {
        let told = *confirmed.borrow();
        anyhow::bail!(
            "the channel {} ended before everything was sent ({e:#}); {}",
            channel.label(),
            what_arrived(told, &sent)
        );
    }
    // Everything is sent: wait until the peer confirms it all, or the
    // channel ends first.
    let mut follow = confirmed.clone();
    let heard = async move {
        match tokio::time::timeout(RECEIPTS_WAIT, follow.wait_for(Option::is_some)).await {
            // No answer to the hello: a peer that keeps no count (the
            // close below still has to be confirmed).
            Err(_) | Ok(Err(_)) => return Heard::NoReceipts,
            Ok(Ok(_)) => {}
        }
        match follow.wait_for(|c| c.is_none_or(|c| c.covers(&sent))).await {
            Ok(c) => c.map_or(Heard::NoReceipts, Heard::All),
            // The receipts ended short of what was sent: the peer is gone
            // or stopped counting.
            Err(_) => Heard::Short,
        }
    };
    let short = |end: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "the channel {} ended before the peer confirmed everything ({end}); {}",
            channel.label(),
            what_arrived(*confirmed.borrow(), &sent)
        )
    };
    tokio::select! {
        heard = heard => match heard {
            Heard::All(told) => eprintln!("qmesh: the peer confirmed {told}"),
            Heard::NoReceipts => eprintln!(
                "qmesh: the peer does not send receipts; {sent} sent, delivery not confirmed"
            ),
            Heard::Short => {
                let end = channel.ended().await;
                return Err(short(&end));
            }
        },
        end = channel.ended() => {
            if !confirmed.borrow().is_some_and(|c| c.covers(&sent)) {
                return Err(short(&end));
            }
        }
    }
    match channel.close("done").await {
        Ok(()) => {}
        // The receipts already cover everything: the close is a formality.
        Err(e) if confirmed.borrow().is_some_and(|c| c.covers(&sent)) => {
            eprintln!("qmesh: closing the channel: {e}")
        }
        Err(e) => return Err(short(&e)),
    }
    client.close("done").await;
    Ok(())
}

/// What `send` heard from the peer's receipts once everything was sent.
enum Heard {
    /// Receipts covering everything sent.
    All(Count),
    /// No receipts: the peer did not answer the hello, or sent a receipt
    /// that is not a count.
    NoReceipts,
    /// The receipts ended before they covered everything sent.
    Short,
}

/// What the peer confirmed of `sent`, as a sentence. A receipt of zero
/// and no receipt at all (the peer had not answered the receipts hello
/// when the channel ended, or keeps no count) read the same: nothing of
/// what was sent is confirmed.
fn what_arrived(confirmed: Option<Count>, sent: &Count) -> String {
    match confirmed {
        Some(c) if c != Count::default() => format!("the peer confirmed {c} of the {sent} sent"),
        _ => format!("the peer confirmed nothing of the {sent} sent"),
    }
}

/// Stdin lines, one message each, on a text stream, counted into `sent`
/// as they go. When the channel's path changes, the current stream is
/// finished and the next lines go on a new stream, which takes the new
/// path.
async fn send_lines(channel: &Channel, sent: &mut Count) -> Result<()> {
    let (mut out, mut on) = start_text(channel).await?;
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    loop {
        line.clear();
        if stdin.read_line(&mut line).await.context("reading stdin")? == 0 {
            break;
        }
        if channel.path() != on {
            out.finish().await.context("finishing the data stream")?;
            (out, on) = start_text(channel).await?;
        }
        let text = line.strip_suffix('\n').unwrap_or(&line);
        let text = text.strip_suffix('\r').unwrap_or(text);
        out.feed(text.as_bytes()).await?;
        sent.lines += 1;
        sent.bytes += text.len() as u64;
        // Gather lines that are already waiting; send when stdin pauses.
        if stdin.buffer().is_empty() {
            out.flush().await?;
        }
    }
    out.finish().await.context("finishing the data stream")?;
    Ok(())
}

/// A new text stream on the channel's current path.
async fn start_text(channel: &Channel) -> Result<(MessageSender, Path)> {
    let path = channel.path();
    let mut out = channel
        .open_stream()
        .await
        .context("opening a data stream")?;
    out.feed(TEXT_STREAM).await?;
    Ok((out, path))
}

async fn send_file(out: &mut MessageSender, path: &PathBuf, sent_count: &mut Count) -> Result<()> {
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().await?.len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("the file path has no file name")?;
    let mut header = FILE_STREAM.to_vec();
    header.extend_from_slice(format!("\n{name}\n{size}").as_bytes());
    out.send(&header).await?;
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(name);
    let mut buf = vec![0u8; FILE_CHUNK];
    let mut sent = 0u64;
    loop {
        let n = file.read(&mut buf).await.context("reading the file")?;
        if n == 0 {
            break;
        }
        out.send(&buf[..n]).await?;
        sent += n as u64;
        sent_count.bytes += n as u64;
        bar.set_position(sent);
    }
    bar.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_confirmed_reads_the_same_with_or_without_a_receipt() {
        let sent = Count { lines: 2, bytes: 9 };
        let none = what_arrived(None, &sent);
        assert_eq!(
            none,
            "the peer confirmed nothing of the 2 line(s), 9 byte(s) sent"
        );
        assert_eq!(what_arrived(Some(Count::default()), &sent), none);
        assert_eq!(
            what_arrived(Some(Count { lines: 1, bytes: 4 }), &sent),
            "the peer confirmed 1 line(s), 4 byte(s) of the 2 line(s), 9 byte(s) sent"
        );
    }
}
