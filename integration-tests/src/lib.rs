//! Shared helpers for the qmesh end-to-end tests: a coordinator on loopback
//! with a CA made in memory, clients that trust it, timeouts on every wait,
//! and paths to the built binaries for process tests.
//!
//! # Layout
//!
//! - this file: [`Mesh`] (an in-process coordinator with its CA, and its
//!   clients), [`within`] and [`within_ok`] (every await bounded),
//!   [`open_pair`], [`message_flows`], [`bin`] (the built binaries),
//!   [`memory_kib`] and [`payload`].
//! - [`process`]: a workspace binary run as a process ([`process::Proc`]),
//!   its output read line by line.
//! - [`programs`]: real programs for forwarding tests (an HTTP server,
//!   redis, iperf3, a socat echo: [`programs::Program`]), client programs
//!   run with a time limit, and [`programs::require`] to skip a test, or
//!   fail it under CI, when a program is missing.
//! - [`target`]: coordinators for a test to aim at: [`target::Target`] (what
//!   a raw peer needs to reach one) and [`target::CoordinatorProc`] (a
//!   `qmesh-coordinator run` process).
//! - [`raw`]: [`raw::Raw`], a peer that writes hand-made frames, for what a
//!   buggy or hostile peer sends.
//! - [`warnings`]: the `warn` and `error` events of the test process, kept
//!   so a test can check the coordinator reported a peer.
#![warn(missing_docs)]

pub mod netns;
pub mod pebble;
pub mod process;
pub mod programs;
pub mod raw;
pub mod target;
pub mod warnings;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

use bytes::Bytes;
use qmesh_certs::{Ca, Trust};
use qmesh_client::{Channel, Client, ClientConfig, MessageReceiver, PathMode};
use qmesh_coordinator::{Config, Coordinator, CoordinatorHandle};
use qmesh_proto::Address;

/// The longest any single step of a test may take.
pub const STEP: Duration = Duration::from_secs(60);

/// Await `f`, failing the test if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Await `f`, which must succeed within `limit`: fails the test naming
/// `what` if it times out, returns an error or returns `None`; otherwise
/// returns the value.
pub async fn within_ok<F>(limit: Duration, what: &str, f: F) -> <F::Output as Expected>::Value
where
    F: Future,
    F::Output: Expected,
{
    within(limit, what, f).await.expected(what)
}

/// What a step of a test must produce: the value in an `Ok` or a `Some`.
pub trait Expected {
    /// The value.
    type Value;

    /// The value; panics naming the step `what` when there is none.
    fn expected(self, what: &str) -> Self::Value;
}

impl<T, E: std::fmt::Display> Expected for Result<T, E> {
    type Value = T;

    fn expected(self, what: &str) -> T {
        self.unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

impl<T> Expected for Option<T> {
    type Value = T;

    fn expected(self, what: &str) -> T {
        self.unwrap_or_else(|| panic!("{what}: ended with nothing"))
    }
}

/// Log to the test output when `QMESH_TEST_LOG` is set (e.g. `debug`).
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("QMESH_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}

/// A coordinator on `127.0.0.1:0` with its own CA.
#[derive(Debug)]
pub struct Mesh {
    /// The running coordinator.
    pub coordinator: CoordinatorHandle,
    /// The CA that issued its certificate.
    pub ca: Ca,
    /// Trust in that CA, for clients.
    pub trust: Trust,
    /// The coordinator's address, `quic/localhost:PORT`.
    pub address: Address,
}

impl Mesh {
    /// Start a coordinator with default settings.
    pub async fn start() -> Mesh {
        Self::start_with(|_| {}).await
    }

    /// Start a coordinator, adjusting its configuration first.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Mesh {
        init_tracing();
        let ca = Ca::generate("qmesh test CA").expect("CA");
        let identity = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .expect("server certificate");
        let mut config = Config::new(identity);
        config.listen = "127.0.0.1:0".parse().expect("addr");
        adjust(&mut config);
        let coordinator = Coordinator::bind(config).expect("bind").spawn();
        let address = format!("quic/localhost:{}", coordinator.local_addr().port())
            .parse()
            .expect("address");
        let trust = Trust::Ca {
            certs: vec![ca.cert_der().clone()],
            source: "the test CA".into(),
        };
        Mesh {
            coordinator,
            ca,
            trust,
            address,
        }
    }

    /// A client configuration for `name`.
    pub fn config(&self, name: &str) -> ClientConfig {
        ClientConfig::new(self.address.clone(), name, self.trust.clone())
    }

    /// Connect a client named `name`.
    pub async fn client(&self, name: &str) -> Client {
        connect(self.config(name)).await
    }
}

/// Connect a client with `config`, which must succeed.
pub async fn connect(config: ClientConfig) -> Client {
    let what = format!("connecting {}", config.name);
    within_ok(STEP, &what, Client::connect(config)).await
}

/// `opener` opens `mesh/{callee}!{channel}`, relay-only, and `callee`
/// accepts it. Returns (opener's side, callee's side).
pub async fn open_pair(opener: &Client, callee: &Client, channel: &str) -> (Channel, Channel) {
    open_pair_with(opener, callee, channel, PathMode::Relay).await
}

/// As [`open_pair`], on the path `mode` asks for.
pub async fn open_pair_with(
    opener: &Client,
    callee: &Client,
    channel: &str,
    mode: PathMode,
) -> (Channel, Channel) {
    let address: Address = format!("mesh/{}!{channel}", callee.name())
        .parse()
        .expect("address");
    let accept = async {
        let offer = callee.accept().await.expect("offer");
        assert_eq!(offer.peer(), opener.name());
        assert_eq!(offer.channel(), channel);
        offer.accept().await.expect("accept")
    };
    let (opened, accepted) = within(STEP, "open pair", async {
        tokio::join!(opener.open_with(&address, mode), accept)
    })
    .await;
    (opened.expect("open"), accepted)
}

/// Send `msg` from `from` and check it arrives whole at `to`.
pub async fn carries(from: &Channel, to: &Channel, msg: &[u8]) {
    let send = async {
        let mut s = from.open_stream().await.expect("open stream");
        s.send(msg).await.expect("send");
        s.finish().await.expect("finish");
    };
    let recv = async {
        let mut r = to
            .accept_stream()
            .await
            .expect("accept stream")
            .expect("a stream");
        let msg = r.recv().await.expect("recv").expect("a message");
        // Read to the end, so the sender's finish sees the stream delivered
        // rather than stopped.
        assert!(r.recv().await.expect("end").is_none(), "one message only");
        msg
    };
    let ((), got) = within(STEP, "carry a message", async { tokio::join!(send, recv) }).await;
    assert_eq!(&got[..], msg);
}

/// `from` sends `msg` on a stream of its own, and the next stream `to`
/// accepts carries it.
pub async fn message_flows(from: &Channel, to: &Channel, msg: &[u8]) {
    let text = String::from_utf8_lossy(msg);
    within_ok(STEP, &format!("sending {text:?}"), from.send_one(msg)).await;
    let got = next_message(&mut next_stream(to).await).await;
    assert_eq!(&got[..], msg, "the message that came");
}

/// The next stream `ch` accepts, which must come before the channel ends.
pub async fn next_stream(ch: &Channel) -> MessageReceiver {
    within_ok(STEP, "accepting a stream", ch.accept_stream())
        .await
        .unwrap_or_else(|| panic!("{} ended instead of giving a stream", ch.label()))
}

/// The next message on `stream`, which must come before its end.
pub async fn next_message(stream: &mut MessageReceiver) -> Bytes {
    within_ok(STEP, "receiving a message", stream.recv())
        .await
        .unwrap_or_else(|| panic!("the stream ended instead of giving a message"))
}

/// Path of a workspace binary (`qmesh`, `qmesh-coordinator`), building it
/// first if this test run has not.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // `--examples` (the workspace has none) turns on the features the
        // dev-dependencies ask for, as `cargo test --workspace` does: with
        // the same features the build reuses that run's dependencies
        // instead of building the TLS and QUIC stack a second time.
        let mut args = vec!["build", "--workspace", "--bins", "--examples"];
        if dir.ends_with("release") {
            args.push("--release");
        }
        let mut build = std::process::Command::new(cargo);
        build.args(&args).current_dir(env!("CARGO_MANIFEST_DIR"));
        // The variables cargo sets for this test (CARGO_PKG_NAME,
        // CARGO_MANIFEST_DIR, ...) would make ring's build script rerun,
        // and the next `cargo test` rebuild the TLS stack again after it.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    // This package's build script's, which ring's build
                    // script reads: set, it rebuilt ring and all above it.
                    "OUT_DIR",
                ]
                .contains(&key.as_ref())
            {
                build.env_remove(key.as_ref());
            }
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "building the binaries failed");
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} not found", path.display());
    path
}

/// Resident and peak resident memory of process `pid`, in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Deterministic test payload of `len` bytes, different for each `seed`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn within_ok_gives_the_value_of_an_ok_or_a_some() {
        assert_eq!(within_ok(STEP, "ok", async { Ok::<_, String>(7) }).await, 7);
        assert_eq!(within_ok(STEP, "some", async { Some("x") }).await, "x");
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "reading the reply: connection lost")]
    async fn within_ok_fails_naming_the_step_and_the_error() {
        within_ok(STEP, "reading the reply", async {
            Err::<(), _>("connection lost")
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "accepting a stream: ended with nothing")]
    async fn within_ok_fails_on_none() {
        within_ok(STEP, "accepting a stream", async { None::<u8> }).await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 60s: the welcome")]
    async fn within_ok_fails_when_the_step_takes_too_long() {
        within_ok(
            STEP,
            "the welcome",
            std::future::pending::<Result<(), String>>(),
        )
        .await;
    }
}
