//! One coordinator per state directory.
//!
//! The state directory holds the coordinator's one-use tokens, the
//! certificates it issued, its revocations and its admin socket. Two
//! processes deciding on those records at once would each accept the same
//! one-use token, so a coordinator holds an exclusive lock on
//! `coordinator.lock` in the directory for as long as it runs (under a
//! leader, the leader holds it; its workers run inside that hold). A
//! second coordinator on the same directory refuses to start and names
//! the process that holds it.
//!
//! The lock is `flock(2)` on an open file: the kernel lets it go when the
//! holder exits however it exits, so a crashed coordinator leaves no stale
//! lock behind. The file keeps the holder's pid, for the refusal message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "coordinator.lock";

/// The held lock on a state directory; dropping it lets the directory go.
#[derive(Debug)]
pub struct StateLock {
    _held: Flock<File>,
    path: PathBuf,
}

impl StateLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Why a state directory could not be held.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "the state directory {} is in use by another coordinator{}: stop that one first, or \
         give this one a state directory of its own with --state-dir",
        dir.display(),
        match holder { Some(pid) => format!(" (pid {pid})"), None => String::new() }
    )]
    Held {
        /// The state directory.
        dir: PathBuf,
        /// The holder's pid, as it wrote it in the lock file.
        holder: Option<u32>,
    },
    /// The lock file could not be made or locked.
    #[error("cannot lock the state directory with {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Hold `dir` for this process, making the directory (mode 0700) and the
/// lock file (mode 0600) when they do not exist. Does not wait: a
/// directory held by another process is [`LockError::Held`] at once.
pub fn hold(dir: &Path) -> Result<StateLock, LockError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    let mut held = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => held,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let holder = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(LockError::Held {
                dir: dir.to_owned(),
                holder,
            });
        }
        Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
    };
    held.set_len(0).map_err(io)?;
    held.seek(SeekFrom::Start(0)).map_err(io)?;
    writeln!(held, "{}", std::process::id()).map_err(io)?;
    held.flush().map_err(io)?;
    Ok(StateLock { _held: held, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_directory_is_refused_with_the_holders_pid_and_free_after_the_drop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("state");
        let first = hold(&state).expect("first hold");
        let text = std::fs::read_to_string(first.path()).expect("lock file");
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock locks belong to the open file description, so a second
        // open in this process is refused as another process would be.
        match hold(&state) {
            Err(LockError::Held { holder, dir }) => {
                assert_eq!(holder, Some(std::process::id()));
                assert_eq!(dir, state);
            }
            other => panic!("a second hold must be refused: {other:?}"),
        }
        let message = hold(&state).expect_err("still held").to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id()))
                && message.contains("--state-dir"),
            "{message}"
        );
        drop(first);
        let again = hold(&state).expect("free after the drop");
        drop(again);
    }
}
