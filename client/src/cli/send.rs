//! `qmesh send`: stdin lines or a file to a channel.

use std::path::PathBuf;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use qmesh_client::{Client, MessageSender};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::{FILE_CHUNK, FILE_STREAM, TEXT_STREAM};

pub(crate) async fn run(client: Client, address: &str, file: Option<PathBuf>) -> Result<()> {
    let channel = client
        .open_str(address)
        .await
        .with_context(|| format!("opening {address}"))?;
    let mut out = channel
        .open_stream()
        .await
        .context("opening a data stream")?;
    match file {
        Some(path) => send_file(&mut out, &path).await?,
        None => send_lines(&mut out).await?,
    }
    out.finish().await.context("finishing the data stream")?;
    channel
        .close("done")
        .await
        .context("waiting for the peer to confirm the close")?;
    client.close("done").await;
    Ok(())
}

async fn send_lines(out: &mut MessageSender) -> Result<()> {
    out.feed(TEXT_STREAM).await?;
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    loop {
        line.clear();
        if stdin.read_line(&mut line).await.context("reading stdin")? == 0 {
            break;
        }
        let text = line.strip_suffix('\n').unwrap_or(&line);
        let text = text.strip_suffix('\r').unwrap_or(text);
        out.feed(text.as_bytes()).await?;
        // Gather lines that are already waiting; send when stdin pauses.
        if stdin.buffer().is_empty() {
            out.flush().await?;
        }
    }
    Ok(())
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
