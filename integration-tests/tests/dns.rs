//! A coordinator name with several addresses (issue 14): in a network
//! namespace of the test's own, `coord.qmesh.test` resolves to 127.0.0.1
//! and 127.0.0.2, with a coordinator on port 7447 at each. `qmesh` clients
//! given `--coordinator quic/coord.qmesh.test:7447` spread their first
//! choice over both addresses, fail over to the other when one dies, check
//! the coordinator's certificate for the name (not the address), and say
//! what they tried when no address answers.
//!
//! The resolver is the real one: glibc reads /etc/hosts, and `ip netns
//! exec` bind-mounts /etc/netns/NAME/hosts over it for the programs it
//! runs. The coordinators' certificate names only `coord.qmesh.test`;
//! `qmesh peers` asks each coordinator by its IP who is connected, trusting
//! it by fingerprint (which checks no name).
//!
//! Needs root and iproute2. Under `CI=true` a machine that cannot make the
//! namespace fails the test; elsewhere the test says so loudly and checks
//! nothing.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use qmesh_integration_tests::process::{show, Exit, Proc};
use qmesh_integration_tests::STEP;

/// The name, in the namespace's /etc/hosts with both addresses.
const NAME: &str = "coord.qmesh.test";
/// The two addresses it resolves to, both on the namespace's loopback.
const ONE: &str = "127.0.0.1";
const TWO: &str = "127.0.0.2";
const PORT: u16 = 7447;
/// Clients in the spread. Each picks one of the two addresses at random,
/// so all of them on one address has probability 2 × 2^-16 = 2^-15.
const CLIENTS: usize = 16;

/// A namespace whose /etc/hosts maps [`NAME`] to [`ONE`] and [`TWO`], and
/// a CA with certificates in a temporary directory; the namespace and
/// /etc/netns/NAME are deleted when dropped, also when the test fails.
struct Lab {
    ns: String,
    dir: tempfile::TempDir,
    ca: qmesh_certs::Ca,
}

impl Lab {
    /// The namespace, or why it cannot be made.
    fn up(case: u32) -> Result<Lab, String> {
        let ns = format!("qdns{}x{case}", std::process::id() % 100_000);
        let run = |args: &[&str]| -> Result<String, String> {
            let out = Command::new(args[0])
                .args(&args[1..])
                .output()
                .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                Err(format!(
                    "`{}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        run(&["ip", "netns", "add", &ns])?;
        let lab = Lab {
            ns,
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            ca: qmesh_certs::Ca::generate("qmesh DNS test CA").map_err(|e| e.to_string())?,
        };
        run(&["ip", "-n", &lab.ns, "link", "set", "lo", "up"])?;
        let etc = lab.etc();
        std::fs::create_dir_all(&etc).map_err(|e| format!("{}: {e}", etc.display()))?;
        let hosts = format!("127.0.0.1 localhost\n{ONE} {NAME}\n{TWO} {NAME}\n");
        std::fs::write(etc.join("hosts"), hosts).map_err(|e| format!("writing hosts: {e}"))?;
        // `ahosts`, not `ahostsv4`: getent asks with AI_ADDRCONFIG, and
        // with AF_INET glibc then finds nothing where the only IPv4
        // addresses are on loopback, as here. The client asks as `ahosts`
        // does for the family (Rust's lookup passes no flags), and gets
        // both addresses.
        let found = run(&["ip", "netns", "exec", &lab.ns, "getent", "ahosts", NAME])?;
        let addrs: BTreeSet<&str> = found
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        if addrs != BTreeSet::from([ONE, TWO]) {
            return Err(format!(
                "{NAME} resolves to {addrs:?} in the namespace, not to {ONE} and {TWO}: {found}"
            ));
        }
        std::fs::write(lab.dir.path().join("ca.pem"), lab.ca.cert_pem())
            .map_err(|e| format!("writing the CA: {e}"))?;
        Ok(lab)
    }

    /// /etc/netns/NS, whose hosts file `ip netns exec` puts over /etc/hosts.
    fn etc(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.ns)
    }

    /// Write a coordinator certificate from the lab's CA for `hosts` as
    /// `NAME.pem` and `NAME-key.pem`; returns its fingerprint.
    fn certificate(&self, name: &str, hosts: &[&str]) -> String {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let identity = self
            .ca
            .issue_server(&hosts)
            .expect("coordinator certificate");
        identity
            .save(
                &self.dir.path().join(format!("{name}.pem")),
                &self.dir.path().join(format!("{name}-key.pem")),
            )
            .expect("saving the certificate");
        identity.fingerprint().to_string()
    }

    /// `qmesh-coordinator run` on `ip`:[`PORT`] with certificate `cert`,
    /// once it listens.
    async fn coordinator(&self, ip: &str, cert: &str) -> Proc {
        let listen = format!("quic/{ip}:{PORT}");
        let pem = self.dir.path().join(format!("{cert}.pem"));
        let key = self.dir.path().join(format!("{cert}-key.pem"));
        let state = self.dir.path().join(format!("coordinator-{ip}"));
        let args: Vec<&OsStr> = vec![
            "run".as_ref(),
            "--listen".as_ref(),
            listen.as_ref(),
            "--cert".as_ref(),
            pem.as_os_str(),
            "--key".as_ref(),
            key.as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
        ];
        let mut p = Proc::spawn_in(Some(&self.ns), "qmesh-coordinator", args, &[]);
        let wanted = format!("qmesh-coordinator listening on quic/{ip}:{PORT}");
        p.stdout_line(&format!("`{wanted}`"), |l| l.starts_with(&wanted))
            .await;
        p
    }

    /// `qmesh` in the namespace aimed at `coordinator`, trusting the lab's
    /// CA, with `args` after the globals. Heartbeats every second, two
    /// missed: a dead coordinator is noticed within about 2 s.
    fn qmesh(&self, coordinator: &str, args: &[&str]) -> Proc {
        let state = self.dir.path().join("state");
        let ca = self.dir.path().join("ca.pem");
        let mut all: Vec<&OsStr> = vec![
            "--coordinator".as_ref(),
            coordinator.as_ref(),
            "--ca".as_ref(),
            ca.as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--heartbeat".as_ref(),
            "1".as_ref(),
            "--heartbeat-misses".as_ref(),
            "2".as_ref(),
        ];
        all.extend(args.iter().map(OsStr::new));
        Proc::spawn_in(Some(&self.ns), "qmesh", all, &[])
    }

    /// `qmesh listen chat` as `name` through the name, once it is connected.
    async fn listener(&self, name: &str) -> Proc {
        let mut p = self.qmesh(&by_name(PORT), &["--name", name, "listen", "chat"]);
        p.ready().await;
        p
    }

    /// The clients connected to the coordinator at `ip`, as `qmesh peers`
    /// against that address says (trusting it by `fingerprint`, which
    /// checks no name); the lister itself left out.
    async fn peers_on(&self, ip: &str, fingerprint: &str) -> BTreeSet<String> {
        let state = self.dir.path().join("state");
        let coordinator = format!("quic/{ip}:{PORT}");
        let args: Vec<&OsStr> = vec![
            "--coordinator".as_ref(),
            coordinator.as_ref(),
            "--fingerprint".as_ref(),
            fingerprint.as_ref(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "peers".as_ref(),
        ];
        let exit = Proc::spawn_in(Some(&self.ns), "qmesh", args, &[])
            .finish()
            .await;
        assert!(exit.status.success(), "peers on {ip}: {}", show(&exit));
        exit.stdout
            .lines()
            .filter_map(|l| l.split(':').next())
            .filter(|n| !n.starts_with("peers-"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = std::fs::remove_dir_all(self.etc());
    }
}

/// `quic/coord.qmesh.test:PORT`.
fn by_name(port: u16) -> String {
    format!("quic/{NAME}:{port}")
}

/// The lab for `case`, or `None` (said loudly) where it cannot be made
/// outside CI.
fn lab(case: u32, test: &str) -> Option<Lab> {
    match Lab::up(case) {
        Ok(lab) => Some(lab),
        Err(why) if std::env::var_os("CI").is_some_and(|v| v == "true") => {
            panic!("the DNS lab cannot run in CI: {test}: {why}")
        }
        Err(why) => {
            eprintln!("\n!!!!!!!! DNS LAB SKIPPED: {test}: {why}. Nothing was checked. !!!!!!!!\n");
            None
        }
    }
}

/// Clients given the name spread over both addresses; when the coordinator
/// at one dies, its clients reconnect through the name to the other, and a
/// new client joins there too. Every join checked the certificate, which
/// names only `coord.qmesh.test`, so each checked the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    qmesh_no_netns,
    ignore = "needs root, iproute2 and nftables (network namespaces), which this machine lacked when the tests were built; CI runs it"
)]
async fn clients_of_a_name_with_two_addresses_spread_over_both_and_fail_over() {
    let Some(lab) = lab(1, "spread and failover") else {
        return;
    };
    let fingerprint = lab.certificate("coordinator", &[NAME]);
    let mut one = lab.coordinator(ONE, "coordinator").await;
    let _two = lab.coordinator(TWO, "coordinator").await;

    let names: Vec<String> = (0..CLIENTS).map(|i| format!("c{i}")).collect();
    let mut clients = Vec::new();
    for name in &names {
        clients.push(lab.listener(name).await);
    }
    let on_one = lab.peers_on(ONE, &fingerprint).await;
    let on_two = lab.peers_on(TWO, &fingerprint).await;
    eprintln!("DNS spread: on {ONE}: {on_one:?}; on {TWO}: {on_two:?}");
    let all: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(
        on_one.union(&on_two).cloned().collect::<BTreeSet<_>>(),
        all,
        "every client is on one of the two"
    );
    assert!(on_one.is_disjoint(&on_two), "{on_one:?} {on_two:?}");
    // Odds of a false failure: 2^-15 (see CLIENTS).
    assert!(
        !on_one.is_empty() && !on_two.is_empty(),
        "the first choices did not spread: {ONE} has {on_one:?}, {TWO} has {on_two:?}"
    );

    // The coordinator at 127.0.0.1 dies. Its clients notice (heartbeats),
    // try it again, then the other address of the name.
    let started = Instant::now();
    one.kill().await;
    let late = lab.listener("late").await;
    let mut want = all.clone();
    want.insert("late".to_owned());
    loop {
        let on_two = lab.peers_on(TWO, &fingerprint).await;
        if on_two == want {
            break;
        }
        assert!(
            started.elapsed() < STEP,
            "after {ONE} died, {TWO} has only {on_two:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "DNS failover: {} client(s) moved to {TWO} within {} ms",
        on_one.len(),
        started.elapsed().as_millis()
    );
    // Those that moved said where their attempt went: the name, at the
    // other address.
    let other = format!("qmesh: reconnecting to {} ({TWO}:{PORT})", by_name(PORT));
    for (name, client) in names.iter().zip(clients.iter_mut()) {
        if on_one.contains(name) {
            client
                .stderr_line(&format!("`{other}`"), |l| l.starts_with(&other))
                .await;
            client
                .stderr_line("`qmesh: reconnected to`", |l| {
                    l.starts_with("qmesh: reconnected to")
                })
                .await;
        }
    }
    drop(late);
}

/// A certificate valid for both addresses but not for the name is refused
/// through the name, with an error that names it; through an address it
/// is accepted (so the name is what failed). With nothing answering at
/// either address, the error lists both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    qmesh_no_netns,
    ignore = "needs root, iproute2 and nftables (network namespaces), which this machine lacked when the tests were built; CI runs it"
)]
async fn the_name_is_what_the_certificate_must_carry_and_a_failure_lists_each_address() {
    let Some(lab) = lab(2, "certificate name") else {
        return;
    };
    lab.certificate("wrong", &["other.qmesh.test", ONE, TWO]);
    let _one = lab.coordinator(ONE, "wrong").await;
    let _two = lab.coordinator(TWO, "wrong").await;

    let refused = lab.qmesh(&by_name(PORT), &["peers"]).finish().await;
    eprintln!("DNS wrong name: {}", refused.stderr.trim_end());
    assert!(!refused.status.success(), "{}", show(&refused));
    assert!(
        refused
            .stderr
            .contains(&format!("not valid for name \"{NAME}\"")),
        "the error names the name the certificate lacks: {}",
        show(&refused)
    );
    assert!(
        refused
            .stderr
            .contains("check the trust given (--ca, --fingerprint, or else the system's roots) and the coordinator's host name"),
        "{}",
        show(&refused)
    );
    let by_ip = lab
        .qmesh(&format!("quic/{ONE}:{PORT}"), &["peers"])
        .finish()
        .await;
    assert!(
        by_ip.status.success(),
        "the same certificate through the address it names: {}",
        show(&by_ip)
    );

    // Nothing on port 7448: each address costs the connect timeout (10 s),
    // and the error names both.
    let silent: Exit = lab.qmesh(&by_name(PORT + 1), &["peers"]).finish().await;
    eprintln!("DNS nothing answers: {}", silent.stderr.trim_end());
    assert!(!silent.status.success(), "{}", show(&silent));
    for ip in [ONE, TWO] {
        let tried = format!("{} ({ip}:{})", by_name(PORT + 1), PORT + 1);
        assert!(
            silent.stderr.contains(&tried),
            "the error names {tried}: {}",
            show(&silent)
        );
    }
    assert!(
        silent
            .stderr
            .contains("no coordinator could be joined; tried 2:"),
        "{}",
        show(&silent)
    );
}
