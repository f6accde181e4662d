//! `qmesh listen`: print messages, store files.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use qmesh_client::{Channel, Client, MessageReceiver};
use qmesh_proto::Untrusted;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::receipts::{self, Count};
use super::{FILE_STREAM, TEXT_STREAM};

/// What this listener has delivered on one channel, for its receipts.
type Tally = std::sync::Arc<tokio::sync::watch::Sender<Count>>;

pub(crate) async fn run(client: Client, channel: &str, out: Option<PathBuf>) -> Result<()> {
    qmesh_proto::name::validate_channel_name(channel).context("the channel to listen on")?;
    if let Some(dir) = &out {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    // The command's own line, shown whatever the log level: it is ready.
    eprintln!(
        "qmesh: {} listening on mesh/{}!{channel}",
        client.name(),
        client.name()
    );
    while let Some(offer) = client.accept().await {
        if offer.channel() != channel {
            let reason = format!("not listening on channel \"{}\"", offer.channel());
            offer.refuse(&reason).await;
            continue;
        }
        let from = offer.peer().to_owned();
        match offer.accept().await {
            Ok(ch) => {
                tokio::spawn(serve(ch, out.clone()));
            }
            Err(e) => {
                warn!(from = %Untrusted::name(&from), cause = %Untrusted::reason(&e), "channel withdrawn")
            }
        }
    }
    bail!("session ended: {}", client.closed().await)
}

async fn serve(channel: Channel, out: Option<PathBuf>) {
    info!(from = %Untrusted::name(channel.peer()), mode = ?channel.mode(), path = %channel.path(), "channel open");
    let mut paths = channel.watch_path();
    let peer = channel.peer().to_owned();
    tokio::spawn(async move {
        while paths.changed().await.is_ok() {
            let now = *paths.borrow_and_update();
            info!(from = %Untrusted::name(&peer), path = %now, "path changed");
        }
    });
    let channel = std::sync::Arc::new(channel);
    let tally: Tally = std::sync::Arc::new(tokio::sync::watch::Sender::new(Count::default()));
    // The sender's receipts pipe (at most a few: each is answered or closed).
    let answering = {
        let channel = channel.clone();
        // A receiver, not the sender: dropping `tally` below must close the
        // count for every answer.
        let counts = tally.subscribe();
        tokio::spawn(async move {
            let mut answers = tokio::task::JoinSet::new();
            while let Some(pipe) = channel.accept_pipe().await {
                if answers.len() >= 4 {
                    debug!("more than 4 receipts pipes on one channel; ignoring this one");
                    continue;
                }
                answers.spawn(receipts::answer(pipe, counts.clone()));
            }
            while answers.join_next().await.is_some() {}
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    while let Ok(Some(stream)) = channel.accept_stream().await {
        let peer = channel.peer().to_owned();
        let out = out.clone();
        let tally = tally.clone();
        let channel = channel.clone();
        tasks.spawn(async move {
            let result = receive(peer.clone(), stream, out, &tally).await;
            if let Some(refused) = result.as_ref().err().and_then(|e| e.downcast_ref::<NoFiles>()) {
                // The stop code reaches a sender only if it comes before
                // the file is acknowledged; the close reaches it always
                // (else a sender waiting for receipts would wait forever).
                warn!(from = %Untrusted::name(&peer), file = %Untrusted::name(&refused.0), "refused a file: this listener has no --out DIR");
                let _ = channel.close(NO_FILES).await;
                return;
            }
            if let Err(e) = result {
                // The whole chain: a file's error names its part file.
                warn!(from = %Untrusted::name(&peer), cause = %Untrusted::reason(format_args!("{e:#}")), "stream failed");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    // Every stream is done: the last count goes out, and the receipts
    // pipes finish.
    drop(tally);
    let _ = answering.await;
    let ended = channel.ended().await;
    info!(from = %Untrusted::name(channel.peer()), "{}", Untrusted::reason(&ended));
}

/// The reason a listener without `--out` closes a channel that sent it
/// a file.
const NO_FILES: &str = "this listener takes no files (it has no --out directory)";

/// A file arrived at a listener without `--out`: the stream is stopped
/// with `FileRefused` and the channel closed with [`NO_FILES`].
#[derive(Debug)]
struct NoFiles(String);

impl std::fmt::Display for NoFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "file {:?} refused: {NO_FILES}", self.0)
    }
}

impl std::error::Error for NoFiles {}

async fn receive(
    peer: String,
    mut stream: MessageReceiver,
    out: Option<PathBuf>,
    tally: &Tally,
) -> Result<()> {
    let Some(first) = stream.recv().await? else {
        return Ok(());
    };
    let printed = |msg: &[u8]| -> std::io::Result<()> {
        print_line(msg)?;
        tally.send_modify(|c| {
            c.lines += 1;
            c.bytes += msg.len() as u64;
        });
        Ok(())
    };
    if first.as_ref() == TEXT_STREAM {
        while let Some(msg) = stream.recv().await? {
            printed(&msg)?;
        }
        return Ok(());
    }
    if let Some(rest) = first.strip_prefix(FILE_STREAM) {
        let text = String::from_utf8_lossy(rest);
        let mut parts = text.splitn(3, '\n').skip(1);
        let (Some(name), Some(size)) = (parts.next(), parts.next()) else {
            bail!("bad file header from {peer}");
        };
        let size: u64 = size.parse().context("bad file size")?;
        let Some(dir) = out else {
            stream.stop(qmesh_proto::codes::StreamCode::FileRefused);
            return Err(NoFiles(name.to_owned()).into());
        };
        let path = safe_path(&dir, name)?;
        receive_file(&peer, &mut stream, &path, size).await?;
        // Only a file stored whole under its name counts as delivered.
        tally.send_modify(|c| c.bytes += size);
        return Ok(());
    }
    // Any other stream: print each message as a line.
    printed(&first)?;
    while let Some(msg) = stream.recv().await? {
        printed(&msg)?;
    }
    Ok(())
}

/// Store a file's messages under `path` with `.part` added, and rename it
/// to `path` only once the stream has finished with exactly the `size`
/// bytes the sender announced. A file that is cut off, or longer than
/// announced, stays as `NAME.part`, and the error names it.
async fn receive_file(
    peer: &str,
    stream: &mut MessageReceiver,
    path: &Path,
    size: u64,
) -> Result<()> {
    let part = part_path(path);
    let mut file = tokio::fs::File::create(&part)
        .await
        .with_context(|| format!("creating {}", part.display()))?;
    info!(
        from = %Untrusted::name(peer),
        file = %Untrusted::reason(part.display()),
        bytes = size,
        "receiving a file"
    );
    let mut got = 0u64;
    let received = async {
        while let Some(msg) = stream.recv().await? {
            got += msg.len() as u64;
            if got > size {
                bail!("the sender sent more than the {size} bytes it announced");
            }
            file.write_all(&msg)
                .await
                .with_context(|| format!("writing {}", part.display()))?;
        }
        if got != size {
            bail!("the stream ended after {got} of the {size} bytes announced");
        }
        file.sync_all()
            .await
            .with_context(|| format!("writing {}", part.display()))
    }
    .await;
    drop(file);
    if let Err(e) = received {
        return Err(e.context(format!(
            "file {:?} from {peer} is incomplete ({got} of {size} bytes); what arrived is kept in {}",
            path.file_name().unwrap_or_default(),
            part.display()
        )));
    }
    tokio::fs::rename(&part, path)
        .await
        .with_context(|| format!("renaming {} to {}", part.display(), path.display()))?;
    info!(
        from = %Untrusted::name(peer),
        file = %Untrusted::reason(path.display()),
        bytes = got,
        "file received"
    );
    Ok(())
}

/// Where a file is stored while it arrives: `NAME.part` next to `NAME`.
fn part_path(path: &Path) -> PathBuf {
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    PathBuf::from(part)
}

/// Print one message as one line, whole, even with other streams printing.
fn print_line(msg: &[u8]) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(msg)?;
    stdout.write_all(b"\n")?;
    stdout.flush()
}

/// `dir/name`, refusing names that would land anywhere else.
fn safe_path(dir: &Path, name: &str) -> Result<PathBuf> {
    let file = Path::new(name);
    match file.file_name() {
        Some(base) if base == file.as_os_str() && name != "." && name != ".." => Ok(dir.join(base)),
        _ => bail!("refusing file name {name:?}: it must be a plain file name"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_cannot_escape_the_directory() {
        let dir = Path::new("/tmp/in");
        assert_eq!(safe_path(dir, "a.txt").ok(), Some(dir.join("a.txt")));
        assert!(safe_path(dir, "../a.txt").is_err());
        assert!(safe_path(dir, "/etc/passwd").is_err());
        assert!(safe_path(dir, "x/y").is_err());
        assert!(safe_path(dir, "..").is_err());
        assert!(safe_path(dir, "").is_err());
    }

    #[test]
    fn a_file_arrives_under_its_name_with_part_added() {
        assert_eq!(
            part_path(Path::new("/tmp/in/a.txt")),
            Path::new("/tmp/in/a.txt.part")
        );
        assert_eq!(
            part_path(Path::new("/tmp/in/x")),
            Path::new("/tmp/in/x.part")
        );
    }
}
