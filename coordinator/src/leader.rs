//! The leader: `qmesh-coordinator run` without `--single`.
//!
//! The leader binds the UDP socket, then runs one worker process (this
//! binary again, with the same arguments) that does all the network
//! work. The worker gets the socket as file descriptor 3 (`LISTEN_FDS=1`,
//! the systemd convention, read with `listenfd`), so a new worker serves
//! the same socket with no bind race. The leader:
//!
//! - passes SIGTERM, SIGINT and SIGHUP on to the worker, and exits with
//!   the worker's status once it has drained;
//! - starts a new worker at once when one dies (a crash, SIGKILL, the
//!   out-of-memory killer), backing off when crashes come close together,
//!   and gives up with the last worker's error after [`MAX_CRASHES`]
//!   within [`CRASH_WINDOW`];
//! - starts a new worker when the worker exits with [`RESTART_EXIT`]
//!   (`qmesh-coordinator restart-worker`), from the binary named in
//!   [`next_worker_file`] when there is one.
//!
//! A worker asks the kernel for SIGKILL when its leader dies
//! ([`become_worker`]), so killing the leader stops everything.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tracing::{info, warn};

use crate::config::WorkerOf;

/// `eprintln!` without its panic: a leader whose stderr was closed by
/// whoever started it goes on supervising its worker.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// The exit status with which a worker asks its leader for a new worker.
pub const RESTART_EXIT: i32 = 75;
/// Crashes closer together than this count towards giving up (the
/// default of `--crash-window`).
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// Crashes within the window after which the leader gives up (the
/// default of `--max-crashes`).
pub const MAX_CRASHES: usize = 5;
/// The longest wait before a new worker after a crash.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The worker's environment: the leader's pid.
pub const ENV_LEADER_PID: &str = "QMESH_LEADER_PID";
/// The worker's environment: workers started before it.
pub const ENV_RESTARTS: &str = "QMESH_WORKER_RESTARTS";
/// The worker's environment: when the leader started (Unix seconds).
pub const ENV_STARTED: &str = "QMESH_LEADER_STARTED";

/// Where `restart-worker --binary` leaves the next worker's binary.
pub fn next_worker_file(state_dir: &Path) -> PathBuf {
    state_dir.join("next-worker")
}

/// What to do after a worker crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start a new worker after this long.
    Restart(Duration),
    /// Too many crashes too close together: stop.
    GiveUp,
}

/// The recent crashes.
#[derive(Debug)]
pub struct Crashes {
    times: VecDeque<Instant>,
    window: Duration,
    max: usize,
}

impl Default for Crashes {
    fn default() -> Self {
        Crashes::new(CRASH_WINDOW, MAX_CRASHES)
    }
}

impl Crashes {
    /// Give up after `max` crashes within `window`.
    pub fn new(window: Duration, max: usize) -> Self {
        Crashes {
            times: VecDeque::new(),
            window,
            max: max.max(1),
        }
    }

    /// A worker crashed at `now`: the first crash in a while is replaced
    /// at once; each further one within the window waits twice as long
    /// (100 ms, 200 ms, … at most [`MAX_BACKOFF`]); the `max`th gives up.
    pub fn crashed(&mut self, now: Instant) -> Verdict {
        while self
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            self.times.pop_front();
        }
        self.times.push_back(now);
        let n = self.times.len();
        if n >= self.max {
            return Verdict::GiveUp;
        }
        if n == 1 {
            return Verdict::Restart(Duration::ZERO);
        }
        let wait = Duration::from_millis(100).saturating_mul(1 << (n - 2).min(16));
        Verdict::Restart(wait.min(MAX_BACKOFF))
    }
}

/// In a worker: what its leader told it, or `None` when this process is
/// not a worker. Asks the kernel to SIGKILL this process when the leader
/// dies, and exits if the leader is already gone.
pub fn become_worker() -> Option<WorkerOf> {
    let leader_pid: u32 = std::env::var(ENV_LEADER_PID).ok()?.parse().ok()?;
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        warn!(cause = %e, "cannot ask to be stopped with the leader");
    }
    if nix::unistd::getppid().as_raw() != leader_pid as i32 {
        note!("qmesh-coordinator: the leader ({leader_pid}) is gone; the worker stops");
        std::process::exit(1);
    }
    let restarts = std::env::var(ENV_RESTARTS)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let started = std::env::var(ENV_STARTED)
        .ok()
        .and_then(|n| n.parse().ok())
        .map_or_else(SystemTime::now, |s| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(s)
        });
    Some(WorkerOf {
        leader_pid,
        restarts,
        started,
    })
}

/// In a worker: the socket its leader passed.
pub fn inherited_socket() -> Result<std::net::UdpSocket> {
    listenfd::ListenFd::from_env()
        .take_udp_socket(0)
        .context("the leader's socket (descriptor 3) is not a UDP socket")?
        .context("no socket from the leader (LISTEN_FDS is not set)")
}

/// A leader and what it starts its workers with.
#[derive(Debug)]
pub struct Leader {
    /// The binary of the first worker.
    pub binary: PathBuf,
    /// The worker's arguments (this process's own).
    pub args: Vec<OsString>,
    /// The bound socket.
    pub socket: std::net::UdpSocket,
    /// The state directory (for [`next_worker_file`]).
    pub state_dir: PathBuf,
    /// When to give up on crashing workers.
    pub crashes: Crashes,
}

/// Lines a worker wrote on stderr, the last ones kept for the report.
type Tail = Arc<Mutex<VecDeque<String>>>;

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => Signal::try_from(sig)
            .map(|s| format!("killed by {s}"))
            .unwrap_or_else(|_| format!("killed by signal {sig}")),
        _ => status.to_string(),
    }
}

impl Leader {
    fn spawn(
        &self,
        binary: &Path,
        restarts: u64,
        started: SystemTime,
    ) -> Result<(tokio::process::Child, Tail)> {
        let mut cmd = std::process::Command::new(binary);
        cmd.args(&self.args)
            .env(ENV_LEADER_PID, std::process::id().to_string())
            .env(ENV_RESTARTS, restarts.to_string())
            .env(
                ENV_STARTED,
                started
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    .to_string(),
            )
            .env("LISTEN_FDS", "1")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        let socket = self.socket.try_clone().context("sharing the socket")?;
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: socket.into(),
            child_fd: 3,
        }])
        .context("passing the socket")?;
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the worker {}", binary.display()))?;
        let tail: Tail = Arc::default();
        if let Some(stderr) = child.stderr.take() {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                let mut out = tokio::io::stderr();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = out.write_all(format!("{line}\n").as_bytes()).await;
                    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if t.len() >= 20 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        Ok((child, tail))
    }

    /// Run workers until one exits 0 (after `quit`, `stop`, or a signal
    /// passed on), or crashes come too fast; returns the exit status for
    /// this process.
    pub async fn run(mut self) -> Result<i32> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let started = SystemTime::now();
        let mut restarts = 0u64;
        let mut crashes = std::mem::take(&mut self.crashes);
        let mut binary = self.binary.clone();
        let mut stopping = false;
        loop {
            let (mut child, tail) = match self.spawn(&binary, restarts, started) {
                Ok(c) => c,
                Err(e) if restarts == 0 => return Err(e),
                Err(e) => {
                    note!(
                        "qmesh-coordinator: {e:#}; going back to {}",
                        self.binary.display()
                    );
                    binary = self.binary.clone();
                    restarts += 1;
                    continue;
                }
            };
            let pid = child.id().map(|p| Pid::from_raw(p as i32));
            info!(pid = ?child.id(), restarts, binary = %binary.display(), "worker started");
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status.context("waiting for the worker")?,
                    _ = term.recv() => { stopping = true; pass(pid, Signal::SIGTERM); }
                    _ = int.recv() => { stopping = true; pass(pid, Signal::SIGTERM); }
                    _ = hup.recv() => pass(pid, Signal::SIGHUP),
                }
            };
            if stopping {
                info!(status = %describe(status), "the worker stopped; the leader exits");
                return Ok(status.code().unwrap_or(1));
            }
            match status.code() {
                Some(0) => {
                    info!("the worker exited as asked; the leader exits");
                    return Ok(0);
                }
                Some(RESTART_EXIT) => {
                    restarts += 1;
                    let next = next_worker_file(&self.state_dir);
                    if let Ok(path) = std::fs::read_to_string(&next) {
                        let _ = std::fs::remove_file(&next);
                        binary = PathBuf::from(path.trim());
                    }
                    note!(
                        "qmesh-coordinator: starting worker {} ({}) as asked",
                        restarts + 1,
                        binary.display()
                    );
                }
                _ => {
                    restarts += 1;
                    let last = tail
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .back()
                        .cloned()
                        .unwrap_or_else(|| "(it wrote nothing on stderr)".into());
                    match crashes.crashed(Instant::now()) {
                        Verdict::GiveUp => {
                            note!(
                                "qmesh-coordinator: the worker died {} times within {} s; \
                                 giving up. The last one: {}; its last line: {last}",
                                crashes.max,
                                crashes.window.as_secs(),
                                describe(status)
                            );
                            return Ok(1);
                        }
                        Verdict::Restart(wait) => {
                            note!(
                                "qmesh-coordinator: the worker died ({}); starting a new one in {} ms",
                                describe(status),
                                wait.as_millis()
                            );
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = term.recv() => return Ok(0),
                                _ = int.recv() => return Ok(0),
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Pass `signal` on to the worker.
fn pass(pid: Option<Pid>, signal: Signal) {
    if let Some(pid) = pid {
        if let Err(e) = kill(pid, signal) {
            warn!(cause = %e, %signal, "cannot pass the signal to the worker");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_crash_is_replaced_at_once_and_the_fifth_in_a_minute_gives_up() {
        let mut c = Crashes::default();
        let t = Instant::now();
        assert_eq!(c.crashed(t), Verdict::Restart(Duration::ZERO));
        assert_eq!(
            c.crashed(t + Duration::from_secs(1)),
            Verdict::Restart(Duration::from_millis(100))
        );
        assert_eq!(
            c.crashed(t + Duration::from_secs(2)),
            Verdict::Restart(Duration::from_millis(200))
        );
        assert_eq!(
            c.crashed(t + Duration::from_secs(3)),
            Verdict::Restart(Duration::from_millis(400))
        );
        assert_eq!(c.crashed(t + Duration::from_secs(4)), Verdict::GiveUp);
    }

    #[test]
    fn crashes_a_minute_apart_never_give_up() {
        let mut c = Crashes::default();
        let t = Instant::now();
        for i in 0..20 {
            assert_eq!(
                c.crashed(t + Duration::from_secs(61 * i)),
                Verdict::Restart(Duration::ZERO)
            );
        }
    }
}
