//! Coordinators for a test to aim at: what a hand-made peer needs to reach
//! one ([`Target`]), and a `qmesh-coordinator run` process on loopback
//! ([`CoordinatorProc`]).

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use qmesh_certs::{Identity, Trust};
use qmesh_proto::Address;

use crate::process::Proc;
use crate::Mesh;

/// What a raw peer needs to reach a coordinator: where it listens, how to
/// trust it, and a client certificate to present.
#[derive(Debug, Clone)]
pub struct Target {
    /// The coordinator's UDP address.
    pub addr: SocketAddr,
    /// Trust in the coordinator's certificate.
    pub trust: Trust,
    /// A self-signed client certificate, which the open auth mode admits
    /// to the hello.
    pub identity: Arc<Identity>,
}

impl Target {
    /// The coordinator at `addr`, trusted by `trust`, reached with a new
    /// self-signed client certificate.
    pub fn new(addr: SocketAddr, trust: Trust) -> Target {
        Target {
            addr,
            trust,
            identity: Arc::new(Identity::self_signed("raw-peer").expect("identity")),
        }
    }
}

impl Mesh {
    /// The coordinator of this mesh as a [`Target`] for raw peers.
    pub fn target(&self) -> Target {
        Target::new(self.coordinator.local_addr(), self.trust.clone())
    }
}

/// The start of the line naming the address a coordinator listens on.
const LISTENING: &str = "qmesh-coordinator listening on ";
/// The start of the line naming the development CA file.
const CA_FILE: &str = "clients need the CA file: ";

/// A running `qmesh-coordinator run --listen quic/$4:0`.
#[derive(Debug)]
pub struct CoordinatorProc {
    /// The process.
    pub proc: Proc,
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    /// What it printed on stdout at start: the listening line, and with
    /// [`CoordinatorProc::start_dev`] every line up to the CA file line.
    pub banner: Vec<String>,
}

impl CoordinatorProc {
    /// `qmesh-coordinator run --listen 'quic/$4:0' EXTRA...`, once it has
    /// printed where it listens (which must be 127.0.0.1 and a real port).
    pub async fn start<S: AsRef<OsStr>>(extra: &[S]) -> CoordinatorProc {
        Self::start_at("quic/$4:0", extra).await
    }

    /// `qmesh-coordinator run --listen LISTEN EXTRA...`, once it has
    /// printed where it listens (which must be 127.0.0.1 and a real port).
    pub async fn start_at<S: AsRef<OsStr>>(listen: &str, extra: &[S]) -> CoordinatorProc {
        let mut args: Vec<&OsStr> = vec!["run".as_ref(), "--listen".as_ref(), listen.as_ref()];
        args.extend(extra.iter().map(|a| a.as_ref()));
        let mut proc = Proc::spawn("qmesh-coordinator", args, &[]);
        let line = proc
            .stdout_line("`qmesh-coordinator listening on`", |l| {
                l.starts_with(LISTENING)
            })
            .await;
        let port = listening_port(&line);
        CoordinatorProc {
            proc,
            port,
            banner: vec![line],
        }
    }

    /// As [`CoordinatorProc::start`] with `--state-dir STATE_DIR` first,
    /// where the coordinator makes (or finds) its development CA; also
    /// returns the CA file it names.
    pub async fn start_dev<S: AsRef<OsStr>>(
        state_dir: &Path,
        extra: &[S],
    ) -> (CoordinatorProc, PathBuf) {
        Self::start_dev_at(state_dir, "quic/$4:0", extra).await
    }

    /// As [`CoordinatorProc::start_dev`], listening on `listen`: a restart
    /// on the port of an earlier run.
    pub async fn start_dev_at<S: AsRef<OsStr>>(
        state_dir: &Path,
        listen: &str,
        extra: &[S],
    ) -> (CoordinatorProc, PathBuf) {
        let mut args: Vec<&OsStr> = vec!["--state-dir".as_ref(), state_dir.as_os_str()];
        args.extend(extra.iter().map(|a| a.as_ref()));
        let mut coord = CoordinatorProc::start_at(listen, &args).await;
        let seen = Mutex::new(Vec::new());
        let line = coord
            .proc
            .stdout_line("`clients need the CA file:`", |l| {
                seen.lock().expect("lock").push(l.to_owned());
                l.starts_with(CA_FILE)
            })
            .await;
        coord
            .banner
            .extend(seen.into_inner().unwrap_or_else(|e| e.into_inner()));
        let ca = PathBuf::from(line.strip_prefix(CA_FILE).expect("prefix"));
        (coord, ca)
    }

    /// `quic/$4:PORT`.
    pub fn v4(&self) -> String {
        format!("quic/$4:{}", self.port)
    }

    /// `quic/localhost:PORT`.
    pub fn localhost(&self) -> String {
        format!("quic/localhost:{}", self.port)
    }

    /// `quic/$4:PORT` as an [`Address`], for a client configuration.
    pub fn address(&self) -> Address {
        self.v4().parse().expect("address")
    }

    /// The coordinator's UDP address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// The port in `qmesh-coordinator listening on quic/127.0.0.1:PORT`.
fn listening_port(line: &str) -> u16 {
    let addr = line
        .strip_prefix(LISTENING)
        .and_then(|a| a.strip_prefix("quic/"))
        .unwrap_or_else(|| panic!("not a quic/ address: {line:?}"));
    let (ip, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    assert_eq!(
        ip, "127.0.0.1",
        "quic/$4 should listen on 127.0.0.1: {line:?}"
    );
    let port: u16 = port
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad port in {line:?}"));
    assert_ne!(port, 0, "the real port, not the requested one: {line:?}");
    port
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_its_port() {
        assert_eq!(
            listening_port("qmesh-coordinator listening on quic/127.0.0.1:7447"),
            7447
        );
    }

    #[test]
    #[should_panic(expected = "the real port")]
    fn a_listening_line_with_port_zero_is_refused() {
        listening_port("qmesh-coordinator listening on quic/127.0.0.1:0");
    }

    #[test]
    #[should_panic(expected = "should listen on 127.0.0.1")]
    fn a_listening_line_on_another_address_is_refused() {
        listening_port("qmesh-coordinator listening on quic/0.0.0.0:7447");
    }
}
