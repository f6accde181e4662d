//! Running the workspace binaries as processes in tests: their output read
//! line by line, every wait bounded and waiting for an event.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::{bin, within, within_ok, STEP};

/// Environment variables of the binaries that must not leak in from the
/// environment the tests run in.
pub const CLEARED_ENV: &[&str] = &[
    "QMESH_COORDINATOR",
    "QMESH_NAME",
    "QMESH_CA",
    "QMESH_FINGERPRINT",
    "RUST_LOG",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// A running binary, its stdout and stderr read line by line.
#[derive(Debug)]
pub struct Proc {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines,
    stderr: Lines,
}

/// The lines of one output stream: those seen so far, and those to come.
#[derive(Debug)]
pub struct Lines {
    seen: Vec<String>,
    rx: mpsc::UnboundedReceiver<String>,
}

impl Lines {
    /// Read `from` line by line on a task of its own.
    pub fn read(from: impl AsyncRead + Unpin + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut from = BufReader::new(from);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match from.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.strip_suffix('\n').unwrap_or(&line);
                        if tx.send(line.to_owned()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Lines {
            seen: Vec::new(),
            rx,
        }
    }

    /// The next line (`None` at the end of the stream).
    pub async fn next(&mut self) -> Option<String> {
        let line = self.rx.recv().await?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Every line, once the stream has ended.
    pub async fn all(&mut self) -> String {
        while self.next().await.is_some() {}
        self.seen.join("\n")
    }
}

/// What a process left behind when it exited.
#[derive(Debug)]
pub struct Exit {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

impl Proc {
    /// Start `program` with `args` and `env` (on top of a cleaned
    /// environment), logging at `info`.
    pub fn spawn<I, S>(program: &str, args: I, env: &[(&str, &OsStr)]) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proc::spawn_in(None, program, args, env)
    }

    /// As [`Proc::spawn`], inside the network namespace `netns` when given
    /// (through `ip netns exec`).
    pub fn spawn_in<I, S>(
        netns: Option<&str>,
        program: &str,
        args: I,
        env: &[(&str, &OsStr)],
    ) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proc::start(netns, program, Some("info"), args, env)
    }

    /// As [`Proc::spawn`], without `--log info`: the program logs what it
    /// logs by default (`qmesh`: warnings and errors), as a user sees it.
    pub fn spawn_default_log<I, S>(program: &str, args: I, env: &[(&str, &OsStr)]) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proc::start(None, program, None, args, env)
    }

    fn start<I, S>(
        netns: Option<&str>,
        program: &str,
        log: Option<&str>,
        args: I,
        env: &[(&str, &OsStr)],
    ) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let what = format!(
            "{program} {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin(program));
                c
            }
            None => Command::new(bin(program)),
        };
        if let Some(filter) = log {
            cmd.arg("--log").arg(filter);
        }
        cmd.args(&args);
        for var in CLEARED_ENV {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        let stdout = Lines::read(child.stdout.take().expect("stdout"));
        let stderr = Lines::read(child.stderr.take().expect("stderr"));
        Proc {
            what,
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is running")
    }

    /// Write `data` to stdin and flush it, keeping stdin open.
    pub async fn write_stdin(&mut self, data: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        within_ok(STEP, "writing stdin", async {
            stdin.write_all(data).await?;
            stdin.flush().await
        })
        .await;
    }

    /// Write `data` to stdin and close it. A process that exits early
    /// breaks the pipe; its exit status tells the test why, so write errors
    /// are not failures here.
    pub async fn feed_stdin(&mut self, data: &[u8]) {
        let mut stdin = self.stdin.take().expect("stdin still open");
        let _ = within(STEP, "writing stdin", stdin.write_all(data)).await;
        let _ = within(STEP, "closing stdin", stdin.shutdown()).await;
    }

    /// Wait for a stdout line for which `pred` holds; return it.
    pub async fn stdout_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.line(false, what, pred).await
    }

    /// Wait for a stderr line for which `pred` holds; return it.
    pub async fn stderr_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.line(true, what, pred).await
    }

    async fn line(&mut self, stderr: bool, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let name = if stderr { "stderr" } else { "stdout" };
        let limit = format!("{}: {name} line {what}", self.what);
        let lines = if stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        let found = within(STEP, &limit, async {
            while let Some(line) = lines.next().await {
                if pred(&line) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Some(line) => line,
            None => self.ended_without(&format!("a {name} line {what}")).await,
        }
    }

    /// A `qmesh listen` is connected and ready once it prints
    /// `qmesh: NAME listening on mesh/NAME!CHANNEL` (at any log level).
    pub async fn ready(&mut self) {
        self.stderr_line("`qmesh: ... listening on`", |l| {
            l.starts_with("qmesh: ") && l.contains(" listening on mesh/")
        })
        .await;
    }

    /// Fail the test: the process ended without printing `wanted`.
    pub async fn ended_without(&mut self, wanted: &str) -> String {
        let exit = self.finish_within(STEP).await;
        panic!(
            "{} ended without {wanted}: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.what, exit.status, exit.stdout, exit.stderr
        );
    }

    /// Wait for the process to exit by itself and collect its output.
    pub async fn finish(&mut self) -> Exit {
        self.finish_within(STEP).await
    }

    /// As [`Proc::finish`], waiting at most `limit`.
    pub async fn finish_within(&mut self, limit: Duration) -> Exit {
        self.stdin.take();
        let what = format!("{} to exit", self.what);
        let status = within_ok(limit, &what, self.child.wait()).await;
        let (stdout, stderr) = within(STEP, &format!("{} output", self.what), async {
            (self.stdout.all().await, self.stderr.all().await)
        })
        .await;
        Exit {
            status,
            stdout,
            stderr,
        }
    }

    /// Kill the process and collect its output.
    pub async fn kill(&mut self) -> Exit {
        // It may have exited already; `wait` below tells either way.
        let _ = self.child.start_kill();
        self.finish().await
    }

    /// Send SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Send the signal named `name` (`TERM`, `STOP`, `CONT`, …) with
    /// `kill -NAME`.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} {} failed", self.what);
    }
}

/// `qmesh --coordinator COORDINATOR --ca CA --state-dir STATE_DIR ARGS...`.
pub fn qmesh<S: AsRef<OsStr>>(coordinator: &str, ca: &Path, state_dir: &Path, args: &[S]) -> Proc {
    let mut all: Vec<&OsStr> = vec![
        "--coordinator".as_ref(),
        coordinator.as_ref(),
        "--ca".as_ref(),
        ca.as_os_str(),
        "--state-dir".as_ref(),
        state_dir.as_os_str(),
    ];
    all.extend(args.iter().map(|a| a.as_ref()));
    Proc::spawn("qmesh", all, &[])
}

/// Describe an exit for assertion messages.
pub fn show(exit: &Exit) -> String {
    format!(
        "{}\n--- stdout\n{}\n--- stderr\n{}",
        exit.status, exit.stdout, exit.stderr
    )
}
