//! `qmesh send`: stdin lines or a file to a channel.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use qmesh_client::{Channel, Client, MessageSender, Path, PathMode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::{FILE_CHUNK, FILE_STREAM, TEXT_STREAM};

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
    let sending = async {
        match file {
            Some(path) => {
                let mut out = channel
                    .open_stream()
                    .await
                    .context("opening a data stream")?;
                send_file(&mut out, &path).await?;
                out.finish().await.context("finishing the data stream")
            }
            None => send_lines(&channel).await,
        }
    };
    // A channel that ends first ends the sending at once: a write on a
    // direct stream would otherwise wait for the direct connection's idle
    // timeout, and a read of stdin for more input.
    tokio::select! {
        sent = sending => sent?,
        end = channel.ended() => anyhow::bail!(
            "the channel {} ended before everything was sent ({end}); what was sent last may not have arrived",
            channel.label()
        ),
    }
    channel
        .close("done")
        .await
        .context("waiting for the peer to confirm the close")?;
    client.close("done").await;
    Ok(())
}

/// Stdin lines, one message each, on a text stream. When the channel's
/// path changes, the current stream is finished and the next lines go on a
/// new stream, which takes the new path.
async fn send_lines(channel: &Channel) -> Result<()> {
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

async fn send_file(out: &mut MessageSender, path: &PathBuf) -> Result<()> {
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
        bar.set_position(sent);
    }
    bar.finish();
    Ok(())
}
