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
    let mut confirmed = receipts::ask(&channel).await;
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
    let all_there = async {
        if tokio::time::timeout(RECEIPTS_WAIT, confirmed.wait_for(Option::is_some))
            .await
            .is_err()
        {
            return None;
        }
        confirmed
            .wait_for(|c| c.is_none_or(|c| c.covers(&sent)))
            .await
            .ok()
            .and_then(|c| *c)
    };
    tokio::select! {
        all = all_there => if let Some(told) = all {
            // What the peer says it has, which covers what was sent.
            eprintln!("qmesh: the peer confirmed {told}");
        } else {
            eprintln!("qmesh: the peer does not send receipts; {sent} sent, delivery not confirmed");
        },
        end = channel.ended() => {
            let told = *confirmed.borrow();
            if !told.is_some_and(|c| c.covers(&sent)) {
                anyhow::bail!(
                    "the channel {} ended before the peer confirmed everything ({end}); {}",
                    channel.label(),
                    what_arrived(told, &sent)
                );
            }
        }
    }
    channel
        .close("done")
        .await
        .context("waiting for the peer to confirm the close")?;
    client.close("done").await;
    Ok(())
}

/// What the peer confirmed of `sent`, as a sentence.
fn what_arrived(confirmed: Option<Count>, sent: &Count) -> String {
    match confirmed {
        Some(c) => format!("the peer confirmed {c} of the {sent} sent"),
        None => format!("the peer confirmed nothing of the {sent} sent (it sends no receipts)"),
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
