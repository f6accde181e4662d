//! Direct channels through real NATs: network namespaces on this machine
//! (integration-tests/lab/nat-lab.sh), with the coordinator on a "public"
//! host and clients behind nftables masquerade.
//!
//! Needs root, iproute2, nftables and conntrack. Where namespaces cannot be
//! made, each test fails under `CI=true`; elsewhere it says so loudly on
//! stderr and returns without checking anything.
//!
//! The lab's addresses all live in namespaces the test makes:
//! coordinator 10.77.0.1; LAN 1 (192.168.71.0/24, hosts `a` .10 and `c`
//! .11) behind NAT 10.77.1.1; LAN 2 (192.168.72.0/24, host `b` .10) behind
//! NAT 10.77.2.1.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use qmesh_integration_tests::process::{show, Proc};

const COORDINATOR: &str = "quic/10.77.0.1:7447";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/nat-lab.sh")
}

/// Why the lab cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    for tool in ["ip", "nft"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("`{tool}` is not installed (iproute2, nftables)"));
        }
    }
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("qmp{}x{n}", std::process::id() % 100_000);
    let made = Command::new("ip").args(["netns", "add", &probe]).output();
    match made {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            None
        }
        Ok(o) => Some(format!(
            "cannot create a network namespace ({}); run as root",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run ip: {e}")),
    }
}

fn skip_if_unavailable(test: &str) -> bool {
    if let Some(why) = unavailable() {
        // CI runs as root and installs the tools: a lab that cannot run
        // there is a broken CI, not a reason to skip.
        if std::env::var_os("CI").is_some_and(|v| v == "true") {
            panic!("the NAT lab cannot run in CI: {test}: {why}");
        }
        eprintln!("\n!!!!!!!! NAT LAB SKIPPED: {test}: {why}. Nothing was checked. !!!!!!!!\n");
        return true;
    }
    false
}

/// A lab; torn down when dropped, also when the test fails.
struct Lab {
    prefix: String,
    dir: tempfile::TempDir,
    ca: PathBuf,
}

impl Lab {
    fn up(case: u32, nat1: &str, nat2: &str) -> Lab {
        let prefix = format!("q{}{case}", std::process::id() % 100_000);
        let out = Command::new("bash")
            .arg(script())
            .args(["up", &prefix, nat1, nat2])
            .output()
            .expect("running nat-lab.sh");
        assert!(
            out.status.success(),
            "nat-lab.sh up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        let lab = Lab {
            prefix,
            ca: dir.path().join("ca.pem"),
            dir,
        };
        let certs = Command::new(qmesh_integration_tests::bin("qmesh-coordinator"))
            .args(["certs", "--out"])
            .arg(lab.dir.path())
            .args(["--host", "10.77.0.1"])
            .output()
            .expect("qmesh-coordinator certs");
        assert!(certs.status.success(), "certs: {certs:?}");
        lab
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn run(&self, what: &str) {
        let out = Command::new("bash")
            .arg(script())
            .args([what, &self.prefix])
            .output()
            .expect("running nat-lab.sh");
        assert!(
            out.status.success(),
            "nat-lab.sh {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn coordinator(&self) -> Proc {
        let cert = self.dir.path().join("coordinator.pem");
        let key = self.dir.path().join("coordinator-key.pem");
        // A state directory of its own: one coordinator holds a directory.
        let state = self.dir.path().join("coordinator-state");
        let args: Vec<&OsStr> = vec![
            "run".as_ref(),
            "--listen".as_ref(),
            COORDINATOR.as_ref(),
            "--cert".as_ref(),
            cert.as_os_str(),
            "--key".as_ref(),
            key.as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
        ];
        let mut p = Proc::spawn_in(Some(&self.ns("coord")), "qmesh-coordinator", args, &[]);
        p.stdout_line("`listening on`", |l| {
            l.starts_with("qmesh-coordinator listening on")
        })
        .await;
        p
    }

    /// `qmesh` on host `host` as `name`, with `args` after the globals.
    fn qmesh(&self, host: &str, name: &str, args: &[&str]) -> Proc {
        let state = self.dir.path().join(format!("state-{name}"));
        let mut all: Vec<&OsStr> = vec![
            "--coordinator".as_ref(),
            COORDINATOR.as_ref(),
            "--ca".as_ref(),
            self.ca.as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--name".as_ref(),
            name.as_ref(),
            "--direct-timeout".as_ref(),
            "3".as_ref(),
        ];
        all.extend(args.iter().map(OsStr::new));
        Proc::spawn_in(Some(&self.ns(host)), "qmesh", all, &[])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["down", &self.prefix])
            .output();
    }
}

/// Milliseconds in a `qmesh send` line `... after N ms ...`.
fn millis(line: &str) -> u64 {
    line.split(" after ")
        .nth(1)
        .and_then(|t| t.split(" ms").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no time in {line:?}"))
}

fn p50(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Case 1: both behind endpoint-independent NATs. The direct path comes
/// up, and data keeps flowing with the coordinator cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    qmesh_no_netns,
    ignore = "needs root, iproute2 and nftables (network namespaces), which this machine lacked when the tests were built; CI runs it"
)]
async fn lab_both_behind_eim_nats_go_direct() {
    if skip_if_unavailable("both behind EIM NATs") {
        return;
    }
    let lab = Lab::up(1, "eim", "eim");
    let _coordinator = lab.coordinator().await;
    let mut alice = lab.qmesh("a", "alice", &["listen", "chat"]);
    alice.ready().await;

    // Time to a direct path, `auto` channels, several runs.
    let mut times = Vec::new();
    for i in 0..5 {
        let mut bob = lab.qmesh("b", "bob", &["send", "mesh/alice!chat"]);
        let line = bob
            .stderr_line("`path direct`", |l| l.contains("path direct"))
            .await;
        assert!(
            line.contains("(10.77.1.1:"),
            "direct to alice's NAT: {line}"
        );
        times.push(millis(&line));
        bob.write_stdin(format!("auto {i}\n").as_bytes()).await;
        let got = alice.stdout_line("the line", |_| true).await;
        assert_eq!(got, format!("auto {i}"));
        bob.feed_stdin(b"").await;
        let exit = bob.finish().await;
        assert!(exit.status.success(), "send: {}", show(&exit));
    }
    eprintln!(
        "NAT lab case 1: time to direct path (auto), ms: {times:?}, p50 {} ms",
        p50(times.clone())
    );

    // A direct-only channel, then the coordinator is cut off.
    let mut bob = lab.qmesh("b", "bob", &["send", "--mode", "direct", "mesh/alice!chat"]);
    let line = bob
        .stderr_line("`open ... path direct`", |l| l.contains("open after"))
        .await;
    assert!(line.contains("path direct"), "{line}");
    bob.write_stdin(b"before the cut\n").await;
    assert_eq!(alice.stdout_line("line", |_| true).await, "before the cut");
    lab.run("block-coordinator");
    for i in 0..3 {
        bob.write_stdin(format!("peer to peer {i}\n").as_bytes())
            .await;
        assert_eq!(
            alice.stdout_line("line", |_| true).await,
            format!("peer to peer {i}"),
            "data must flow with the coordinator unreachable"
        );
    }
    lab.run("unblock-coordinator");
    bob.kill().await;
}

/// Case 2: one side behind a symmetric NAT. `auto` stays relayed and
/// works; `direct` fails with a clear error within its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    qmesh_no_netns,
    ignore = "needs root, iproute2 and nftables (network namespaces), which this machine lacked when the tests were built; CI runs it"
)]
async fn lab_symmetric_nat_stays_relayed_and_direct_fails_clearly() {
    if skip_if_unavailable("one side behind a symmetric NAT") {
        return;
    }
    let lab = Lab::up(2, "eim", "symmetric");
    let _coordinator = lab.coordinator().await;
    let mut alice = lab.qmesh("a", "alice", &["listen", "chat"]);
    alice.ready().await;

    let started = Instant::now();
    let mut bob = lab.qmesh("b", "bob", &["send", "mesh/alice!chat"]);
    let line = bob
        .stderr_line("`open ... path relay`", |l| l.contains("open after"))
        .await;
    assert!(line.contains("path relay"), "{line}");
    bob.write_stdin(b"relayed at once\n").await;
    assert_eq!(alice.stdout_line("line", |_| true).await, "relayed at once");
    // bob gives up on the direct path within its 3 s deadline...
    let gave_up = bob
        .stderr_line("`no direct path`", |l| l.contains("no direct path"))
        .await;
    let fallback = started.elapsed();
    assert!(!gave_up.contains("path direct"), "{gave_up}");
    // ...and the channel keeps working through the relay.
    bob.write_stdin(b"still relayed\n").await;
    assert_eq!(alice.stdout_line("line", |_| true).await, "still relayed");
    bob.feed_stdin(b"").await;
    let exit = bob.finish().await;
    assert!(exit.status.success(), "send: {}", show(&exit));
    assert!(
        !exit.stderr.contains("path direct"),
        "auto must stay relayed: {}",
        show(&exit)
    );
    eprintln!(
        "NAT lab case 2: auto gave up on direct after {} ms (deadline 3 s)",
        fallback.as_millis()
    );

    let started = Instant::now();
    let mut strict = lab.qmesh("b", "bob", &["send", "--mode", "direct", "mesh/alice!chat"]);
    strict.feed_stdin(b"never\n").await;
    let exit = strict.finish().await;
    let took = started.elapsed();
    assert!(!exit.status.success(), "direct must fail: {}", show(&exit));
    assert!(
        exit.stderr.contains("no direct path to alice") && exit.stderr.contains("path auto"),
        "the error must say what failed and what to do: {}",
        show(&exit)
    );
    eprintln!(
        "NAT lab case 2: --mode direct failed after {} ms (deadline 3 s)",
        took.as_millis()
    );
    alice.kill().await;
}

/// Case 3: both on one LAN, no NAT between them: direct, on the LAN
/// addresses they reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    qmesh_no_netns,
    ignore = "needs root, iproute2 and nftables (network namespaces), which this machine lacked when the tests were built; CI runs it"
)]
async fn lab_same_lan_goes_direct() {
    if skip_if_unavailable("both on one LAN") {
        return;
    }
    let lab = Lab::up(3, "eim", "eim");
    let _coordinator = lab.coordinator().await;
    let mut alice = lab.qmesh("a", "alice", &["listen", "chat"]);
    alice.ready().await;
    let mut carol = lab.qmesh(
        "c",
        "carol",
        &["send", "--mode", "direct", "mesh/alice!chat"],
    );
    let line = carol
        .stderr_line("`open ... path direct`", |l| l.contains("open after"))
        .await;
    assert!(
        line.contains("path direct (192.168.71.10:"),
        "carol must reach alice on the LAN: {line}"
    );
    carol.feed_stdin(b"over the LAN\n").await;
    assert_eq!(alice.stdout_line("line", |_| true).await, "over the LAN");
    let exit = carol.finish().await;
    assert!(exit.status.success(), "send: {}", show(&exit));
    eprintln!("NAT lab case 3: {line}");
}

/// Case 4: NAT rebinding. Alice, behind NAT 1, receives a relayed channel;
/// mid-session NAT 1 forgets its mappings and maps to other ports (the lab's
/// `rebind`). Her session survives by QUIC connection migration (the
/// coordinator follows her new address): lines sent after the rebinding
/// arrive, she never reconnects, and the sender's channel ends once, closed,
/// with every line confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    qmesh_no_netns,
    ignore = "needs root, iproute2 and nftables (network namespaces), which this machine lacked when the tests were built; CI runs it"
)]
async fn lab_a_nat_rebinding_mid_session_keeps_the_session_and_the_channel() {
    if let Some(why) = unavailable() {
        if std::env::var_os("CI").is_some_and(|v| v == "true") {
            panic!("the NAT lab cannot run in CI: {why}");
        }
        eprintln!(
            "\n!!!!!!!! NAT LAB SKIPPED: NAT rebinding: {why}. Nothing was checked. !!!!!!!!\n"
        );
        return;
    }
    let lab = Lab::up(4, "eim", "eim");
    let _coordinator = lab.coordinator().await;
    let mut alice = lab.qmesh("a", "alice", &["listen", "chat"]);
    alice.ready().await;
    let mut bob = lab.qmesh("b", "bob", &["send", "--mode", "relay", "mesh/alice!chat"]);
    bob.stderr_line("`open after`", |l| l.contains("open after"))
        .await;
    bob.write_stdin(b"before the rebinding\n").await;
    assert_eq!(
        alice.stdout_line("line", |_| true).await,
        "before the rebinding"
    );

    lab.run("rebind");
    for i in 0..3 {
        bob.write_stdin(format!("after the rebinding {i}\n").as_bytes())
            .await;
        assert_eq!(
            alice.stdout_line("line", |_| true).await,
            format!("after the rebinding {i}")
        );
    }
    // Alice's traffic to the coordinator now leaves NAT 1 from a port of
    // the new range: she did get a new public address.
    let tracked = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("nat1"),
            "conntrack",
            "-L",
            "-p",
            "udp",
        ])
        .output()
        .expect("conntrack -L");
    let table = String::from_utf8_lossy(&tracked.stdout);
    let remapped = table.lines().any(|l| {
        l.contains("src=192.168.71.10")
            && l.contains("dst=10.77.0.1")
            && l.split_whitespace()
                .filter_map(|f| f.strip_prefix("dport="))
                .filter_map(|p| p.parse::<u16>().ok())
                .any(|p| (40000..=40999).contains(&p))
    });
    assert!(remapped, "no mapping of alice in the new range:\n{table}");

    bob.feed_stdin(b"").await;
    let sent = bob.finish().await;
    assert!(sent.status.success(), "send: {}", show(&sent));
    assert!(
        sent.stderr.contains("the peer confirmed 4 line(s)"),
        "{}",
        show(&sent)
    );
    let listened = alice.kill().await;
    assert!(
        !listened.stderr.contains("qmesh: reconnecting"),
        "alice lost her session at the rebinding: {}",
        show(&listened)
    );
    let ends = listened
        .stderr
        .lines()
        .filter(|l| l.contains("from=bob") && (l.contains("closed by") || l.contains("lost")))
        .count();
    assert_eq!(ends, 1, "the channel's ends: {}", show(&listened));
}
