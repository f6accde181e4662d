//! Real programs for forwarding tests: an HTTP server, redis over TCP or a
//! unix socket, an iperf3 server and a socat echo, each started in a
//! temporary directory of its own and stopped when dropped; and client
//! programs (`curl`, `redis-cli`, `redis-benchmark`, `iperf3`, `socat`) run
//! with a time limit.
//!
//! The programs come from Debian packages, which `.ci/run` installs. A test
//! calls [`require`] for each program it uses first: outside CI a missing
//! program skips the test, under `CI=true` it fails it.
//!
//! Everything here blocks the calling thread. From an async test that
//! forwards through an in-process mesh, call [`run`] through
//! `tokio::task::spawn_blocking` (or use a multi-thread runtime), so the
//! mesh keeps running while the client program waits.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// The longest a started server may take to become ready.
pub const READY_LIMIT: Duration = Duration::from_secs(20);

/// How often a server's readiness, or a client program's exit, is checked.
const POLL: Duration = Duration::from_millis(20);

/// How many times a server is started on a fresh port when it exits before
/// becoming ready (another process may take a port between [`free_port`]
/// and the server binding it).
const START_ATTEMPTS: u32 = 3;

/// The path of `program` on `PATH`.
///
/// When it is missing: under `CI=true` this panics (CI installs every
/// program, so a missing one is a broken CI setup); otherwise it prints to
/// stderr that the test is skipped and returns `None`, and the test should
/// return without checking anything.
pub fn require(program: &str) -> Option<PathBuf> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    require_with(program, find_on_path(program), ci)
}

fn require_with(program: &str, found: Option<PathBuf>, ci: bool) -> Option<PathBuf> {
    if found.is_some() {
        return found;
    }
    let package = package_of(program);
    if ci {
        panic!(
            "`{program}` is not installed; `.ci/run` installs it (Debian package \
             `{package}`), so CI must have it"
        );
    }
    let thread = std::thread::current();
    let test = match thread.name() {
        Some(name) if name != "main" => format!(" {name}"),
        _ => String::new(),
    };
    eprintln!(
        "SKIPPED test{test}: `{program}` is not on PATH (Debian package `{package}`, \
         which `.ci/run` installs). Nothing was checked."
    );
    None
}

/// The Debian package that installs `program`.
fn package_of(program: &str) -> &str {
    match program {
        "redis-cli" | "redis-benchmark" => "redis-tools",
        "promtool" => "prometheus",
        "pebble-challtestsrv" => "pebble",
        "etcd" => "etcd-server",
        other => other,
    }
}

/// `program` itself when it names a path, or the first executable file of
/// that name in a `PATH` directory.
fn find_on_path(program: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return executable(&path).then_some(path);
    }
    let dirs = std::env::var_os("PATH")?;
    std::env::split_paths(&dirs)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// A TCP port on 127.0.0.1 that was free a moment ago: bound to port 0,
/// read, and released.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a TCP port on 127.0.0.1")
        .port()
}

/// A UDP port on 127.0.0.1 that was free a moment ago, as [`free_port`].
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("binding a UDP port on 127.0.0.1")
        .port()
}

/// A running program with a temporary directory of its own, which is its
/// working directory and holds its stdout and stderr. Dropping it kills the
/// program and waits for it, also when the test fails.
#[derive(Debug)]
pub struct Program {
    what: String,
    child: Child,
    dir: TempDir,
}

impl Program {
    /// Start `program` with `args` in a new temporary directory, stdin
    /// empty, stdout and stderr to `stdout.log` and `stderr.log` there.
    pub fn start<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Program {
        Program::start_in(
            tempfile::tempdir().expect("a temporary directory"),
            program,
            args,
        )
    }

    /// As [`Program::start`], in `dir`, which the program keeps (a server
    /// whose arguments name paths in its directory makes it first).
    pub fn start_in<S: AsRef<OsStr>>(dir: TempDir, program: &str, args: &[S]) -> Program {
        let what = command_line(program, args);
        let log = |name: &str| {
            File::create(dir.path().join(name))
                .unwrap_or_else(|e| panic!("creating {name} for {what}: {e}"))
        };
        let child = Command::new(program)
            .args(args)
            .current_dir(dir.path())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log("stdout.log"))
            .stderr(log("stderr.log"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Program { what, child, dir }
    }

    /// Its temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its command line.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// How it exited, if it has.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("checking the program")
    }

    /// What it printed so far, stdout then stderr, for failure messages.
    pub fn log(&self) -> String {
        let read = |name: &str| {
            std::fs::read(self.dir.path().join(name))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| format!("({name}: {e})"))
        };
        format!(
            "{}\n--- stdout\n{}\n--- stderr\n{}",
            self.what,
            read("stdout.log"),
            read("stderr.log")
        )
    }

    /// Poll `ready` every few milliseconds until it holds. Fails the test
    /// when the program exits first or [`READY_LIMIT`] passes. Returns
    /// false only when the program exited with `retry` set, for the caller
    /// to start it again.
    fn wait_ready(&mut self, retry: bool, mut ready: impl FnMut() -> bool) -> bool {
        let attempts = READY_LIMIT.as_millis() / POLL.as_millis();
        for _ in 0..attempts {
            if let Some(status) = self.exited() {
                if retry {
                    return false;
                }
                panic!("{} exited ({status}) before it was ready", self.log());
            }
            if ready() {
                return true;
            }
            std::thread::sleep(POLL);
        }
        panic!("{} was not ready within {READY_LIMIT:?}", self.log());
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // It may have exited already; `wait` reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command_line<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut line = program.to_owned();
    for a in args {
        let a = a.as_ref().to_string_lossy();
        line.push(' ');
        line.push_str(if a.is_empty() { "''" } else { &a });
    }
    line
}

/// Start a server on a free port: `start(port)` starts it, `ready(port)`
/// tells it is serving. A server that exits before it is ready (its port
/// taken meanwhile) is started again on another port, a few times.
fn serve(start: impl Fn(u16) -> Program, ready: impl Fn(u16) -> bool) -> (Program, u16) {
    serve_on(free_port, start, ready)
}

/// As [`serve`], on ports from `pick`.
fn serve_on(
    pick: fn() -> u16,
    start: impl Fn(u16) -> Program,
    ready: impl Fn(u16) -> bool,
) -> (Program, u16) {
    for attempt in 1..=START_ATTEMPTS {
        let port = pick();
        let mut program = start(port);
        if program.wait_ready(attempt < START_ATTEMPTS, || ready(port)) {
            return (program, port);
        }
    }
    unreachable!("the last attempt panics instead of returning false")
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Whether 127.0.0.1:`port` accepts a TCP connection.
fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&local(port), Duration::from_secs(1)).is_ok()
}

/// Whether a redis server answers `PING` on `stream` with `+PONG`.
fn pongs(stream: std::io::Result<impl Read + Write>) -> bool {
    let Ok(mut stream) = stream else {
        return false;
    };
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && reply.starts_with(b"+PONG")
}

/// `python3 -m http.server` serving `root` on 127.0.0.1, once it accepts
/// connections; and its port.
pub fn http_server(root: &Path) -> (Program, u16) {
    serve(
        |port| {
            Program::start(
                "python3",
                &[
                    "-m".as_ref(),
                    "http.server".as_ref(),
                    OsStr::new(&port.to_string()),
                    "--bind".as_ref(),
                    "127.0.0.1".as_ref(),
                    "--directory".as_ref(),
                    root.as_os_str(),
                ],
            )
        },
        accepts,
    )
}

/// The arguments every redis server here gets: no persistence, its
/// directory for any file it writes, loopback only.
fn redis_args(dir: &Path) -> Vec<String> {
    vec![
        "--save".into(),
        String::new(),
        "--appendonly".into(),
        "no".into(),
        "--dir".into(),
        dir.to_string_lossy().into_owned(),
        "--bind".into(),
        "127.0.0.1".into(),
    ]
}

/// `redis-server` on a TCP port of 127.0.0.1, once it answers `PING`; and
/// its port.
pub fn redis_tcp() -> (Program, u16) {
    serve(
        |port| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let mut args = vec!["--port".to_owned(), port.to_string()];
            args.extend(redis_args(dir.path()));
            Program::start_in(dir, "redis-server", &args)
        },
        |port| {
            let stream = TcpStream::connect_timeout(&local(port), Duration::from_secs(1));
            pongs(stream.and_then(|s| s.set_read_timeout(Some(Duration::from_secs(1))).map(|()| s)))
        },
    )
}

/// `redis-server` on a unix socket only (`--port 0`), once it answers
/// `PING`; and the socket's path, `redis.sock` in its directory.
pub fn redis_unix() -> (Program, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("redis.sock");
    let mut args = vec![
        "--port".to_owned(),
        "0".to_owned(),
        "--unixsocket".to_owned(),
        socket.to_string_lossy().into_owned(),
        "--unixsocketperm".to_owned(),
        "700".to_owned(),
    ];
    args.extend(redis_args(dir.path()));
    let mut program = Program::start_in(dir, "redis-server", &args);
    program.wait_ready(false, || {
        let stream = UnixStream::connect(&socket);
        pongs(stream.and_then(|s| s.set_read_timeout(Some(Duration::from_secs(1))).map(|()| s)))
    });
    (program, socket)
}

/// `iperf3 -s` on a TCP port of 127.0.0.1, serving one test after another,
/// once it says it listens; and its port. (A connection as a readiness
/// check would be a client to it: one that sends no parameters, which the
/// server may still be ending when the real client connects, and then
/// resets.)
pub fn iperf3_server() -> (Program, u16) {
    for attempt in 1..=START_ATTEMPTS {
        let port = free_port().to_string();
        let mut program = Program::start(
            "iperf3",
            &["-s", "-p", &port, "--bind", "127.0.0.1", "--forceflush"],
        );
        let log = program.dir().join("stdout.log");
        let listening =
            || std::fs::read_to_string(&log).is_ok_and(|out| out.contains("Server listening on"));
        if program.wait_ready(attempt < START_ATTEMPTS, listening) {
            let port = port.parse().expect("a port number");
            return (program, port);
        }
    }
    unreachable!("the last attempt panics instead of returning false")
}

/// A socat echo on a TCP port of 127.0.0.1 (each connection gets a `cat`
/// that sends back what it reads), once it accepts connections; and its
/// port.
pub fn socat_echo() -> (Program, u16) {
    serve(
        |port| {
            let listen = format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork");
            Program::start("socat", &[listen.as_str(), "EXEC:cat"])
        },
        accepts,
    )
}

/// A socat server on a TCP port of 127.0.0.1 that reads each connection
/// to its end and only then answers with the number of bytes it read (`wc
/// -c`), once it accepts connections; and its port. A client that
/// half-closes gets the whole answer only if the half-close got through.
pub fn socat_counter() -> (Program, u16) {
    serve(
        |port| {
            let listen = format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork");
            Program::start("socat", &[listen.as_str(), "SYSTEM:wc -c"])
        },
        accepts,
    )
}

/// A socat UDP echo on a port of 127.0.0.1: each datagram, up to 65,536
/// bytes, goes back whole to the address it came from; once it answers;
/// and its port.
pub fn socat_udp_echo() -> (Program, u16) {
    serve_on(
        free_udp_port,
        |port| {
            let listen = format!("UDP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork");
            Program::start(
                "socat",
                &["-b", "65536", "-T", "60", listen.as_str(), "PIPE"],
            )
        },
        echoes,
    )
}

/// Whether a datagram to 127.0.0.1:`port` comes back.
fn echoes(port: u16) -> bool {
    let Ok(socket) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 16];
    socket.send_to(b"ready?", local(port)).is_ok()
        && matches!(socket.recv(&mut buf), Ok(6) if &buf[..6] == b"ready?")
}

/// Run a client program to its end with empty stdin, and return what it
/// printed and how it exited. Kills it and fails the test, with its output,
/// if it runs longer than `limit`.
pub fn run(program: &str, args: &[&str], limit: Duration) -> Output {
    run_with_input(program, args, &[], limit)
}

/// As [`run`], writing `input` to its stdin and then closing it.
pub fn run_with_input(program: &str, args: &[&str], input: &[u8], limit: Duration) -> Output {
    let what = command_line(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // A program that exits without reading breaks the pipe; its output
    // and status tell why, so the write error is not a failure here.
    let writer = std::thread::spawn(move || {
        let mut stdin = stdin;
        let _ = stdin.write_all(&input);
    });
    let stdout = read_all(child.stdout.take().expect("stdout"));
    let stderr = read_all(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("checking the program") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
    };
    let _ = writer.join();
    let join = |t: std::thread::JoinHandle<Vec<u8>>| t.join().expect("reading the output");
    let (stdout, stderr) = (join(stdout), join(stderr));
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{what} ran longer than {limit:?} and was killed\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

fn read_all(mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = from.read_to_end(&mut buf);
        buf
    })
}

/// Describe a client program's output for assertion messages.
pub fn show(output: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The SHA-256 of the file at `path`, in lowercase hex.
pub fn sha256_file(path: &Path) -> String {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    format!("{:x}", hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_on_path_is_found() {
        let sh = require("sh").expect("sh is on PATH");
        assert!(sh.ends_with("sh"), "{}", sh.display());
    }

    #[test]
    fn a_missing_program_is_skipped_outside_ci() {
        assert_eq!(require_with("no-such-program", None, false), None);
    }

    #[test]
    #[should_panic(
        expected = "`redis-cli` is not installed; `.ci/run` installs it (Debian package `redis-tools`)"
    )]
    fn a_missing_program_fails_under_ci() {
        require_with("redis-cli", None, true);
    }

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").expect("write");
        assert_eq!(
            sha256_file(&path),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn free_ports_are_bindable() {
        TcpListener::bind(local(free_port())).expect("the TCP port is free");
        UdpSocket::bind(local(free_udp_port())).expect("the UDP port is free");
    }
}

/// One member of an etcd cluster started by [`etcd_cluster`].
#[derive(Debug)]
pub struct EtcdMember {
    /// The running `etcd`.
    pub program: Program,
    /// Its client port on 127.0.0.1.
    pub port: u16,
}

impl EtcdMember {
    /// `http://127.0.0.1:PORT`: what `--etcd` takes.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Whether etcd on 127.0.0.1:`port` says it is healthy (`GET /health`:
/// it has a leader and answers).
pub fn etcd_healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&local(port), Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

/// An etcd cluster of `members` members on loopback, each with a data
/// directory in its own temporary directory, once every member says it
/// is healthy.
pub fn etcd_cluster(members: usize) -> Vec<EtcdMember> {
    for attempt in 1..=START_ATTEMPTS {
        let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("t{i}=http://127.0.0.1:{peer}"))
            .collect();
        let initial = initial.join(",");
        let token = format!("qmesh-test-{}-{attempt}", std::process::id());
        let mut started: Vec<EtcdMember> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let client_url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let args = [
                    "--name".to_owned(),
                    format!("t{i}"),
                    "--data-dir".to_owned(),
                    "data".to_owned(),
                    "--listen-client-urls".to_owned(),
                    client_url.clone(),
                    "--advertise-client-urls".to_owned(),
                    client_url,
                    "--listen-peer-urls".to_owned(),
                    peer_url.clone(),
                    "--initial-advertise-peer-urls".to_owned(),
                    peer_url,
                    "--initial-cluster".to_owned(),
                    initial.clone(),
                    "--initial-cluster-token".to_owned(),
                    token.clone(),
                    "--initial-cluster-state".to_owned(),
                    "new".to_owned(),
                ];
                EtcdMember {
                    program: Program::start("etcd", &args),
                    port: *client,
                }
            })
            .collect();
        let last = attempt == START_ATTEMPTS;
        let mut all = true;
        for m in &mut started {
            let port = m.port;
            if !m.program.wait_ready(!last, || etcd_healthy(port)) {
                all = false;
                break;
            }
        }
        if all {
            return started;
        }
    }
    unreachable!("the last attempt panics instead of returning false")
}
