//! Shared helpers for the qmesh end-to-end tests: a coordinator on loopback
//! with a CA made in memory, clients that trust it, timeouts on every wait,
//! and paths to the built binaries for process tests.

pub mod process;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

use qmesh_certs::{Ca, Trust};
use qmesh_client::{Channel, Client, ClientConfig, PathMode};
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
        within(STEP, "connect", Client::connect(self.config(name)))
            .await
            .unwrap_or_else(|e| panic!("connecting {name}: {e}"))
    }
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
        let mut args = vec![
            "build",
            "-p",
            "qmesh-client",
            "-p",
            "qmesh-coordinator",
            "--bins",
        ];
        if dir.ends_with("release") {
            args.push("--release");
        }
        let status = std::process::Command::new(cargo)
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            // The test's own CARGO_MANIFEST_DIR would make ring's build
            // script rerun, rebuilding the TLS stack for every test binary.
            .env_remove("CARGO_MANIFEST_DIR")
            .status()
            .expect("running cargo build");
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
