//! The operator's commands, run as processes: token mode from `token create`
//! to a message between enrolled clients, `revoke`, `policy check`,
//! `policy reload` and SIGHUP, and the loud warning of open mode.
//!
//! Every wait is bounded and waits for an event (a line of output, an exit).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use qmesh_integration_tests::process::{self, show, Proc};
use qmesh_integration_tests::target::CoordinatorProc;

struct Coord {
    proc: Proc,
    port: u16,
    ca: PathBuf,
    /// What it printed on stdout at start, up to the CA file line.
    banner: Vec<String>,
}

/// `qmesh-coordinator run --listen quic/$4:0 --state-dir DIR ARGS`.
async fn start(dir: &Path, args: &[&OsStr]) -> Coord {
    let (coord, ca) = CoordinatorProc::start_dev(dir, args).await;
    Coord {
        proc: coord.proc,
        port: coord.port,
        ca,
        banner: coord.banner,
    }
}

impl Coord {
    fn qmesh(&self, client_state: &Path, args: &[&str]) -> Proc {
        let coordinator = format!("quic/$4:{}", self.port);
        process::qmesh(&coordinator, &self.ca, client_state, args)
    }
}

/// Run an operator command to its end; returns (success, stdout, stderr).
async fn operator(args: &[&OsStr]) -> (bool, String, String) {
    let exit = Proc::spawn("qmesh-coordinator", args.to_vec(), &[])
        .finish()
        .await;
    (exit.status.success(), exit.stdout, exit.stderr)
}

async fn token(dir: &Path, name: &str) -> String {
    let (ok, out, err) = operator(&[
        "token".as_ref(),
        "create".as_ref(),
        "--name".as_ref(),
        name.as_ref(),
        "--ttl".as_ref(),
        "10m".as_ref(),
        "--state-dir".as_ref(),
        dir.as_os_str(),
    ])
    .await;
    assert!(ok, "token create: {err}");
    out.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_from_token_to_message_then_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let clients = tempfile::tempdir().unwrap();
    let mut coord = start(dir.path(), &["--auth".as_ref(), "token".as_ref()]).await;
    assert!(
        coord.banner.iter().any(|l| l == "auth mode: token"),
        "{:?}",
        coord.banner
    );

    // Without a token: told what to do.
    let mut stranger = coord.qmesh(clients.path(), &["--name", "carol", "listen", "chat"]);
    let exit = stranger.finish().await;
    assert!(!exit.status.success());
    assert!(
        exit.stderr.contains("ask the operator for a token"),
        "{}",
        show(&exit)
    );

    let alice_token = token(dir.path(), "alice").await;
    let mut alice = coord.qmesh(
        clients.path(),
        &["--name", "alice", "--token", &alice_token, "listen", "chat"],
    );
    alice.ready().await;
    // The issued certificate is kept: a second run needs no token, and
    // the used token is refused.
    let bob_token = token(dir.path(), "bob").await;
    let mut bob = coord.qmesh(
        clients.path(),
        &[
            "--name",
            "bob",
            "--token",
            &bob_token,
            "send",
            "mesh/alice!chat",
        ],
    );
    bob.feed_stdin(b"enrolled hello\n").await;
    let sent = bob.finish().await;
    assert!(sent.status.success(), "{}", show(&sent));
    assert_eq!(
        alice.stdout_line("the message", |_| true).await,
        "enrolled hello"
    );
    let mut again = coord.qmesh(
        clients.path(),
        &["--name", "bob", "send", "mesh/alice!chat"],
    );
    again.feed_stdin(b"second run\n").await;
    let sent = again.finish().await;
    assert!(sent.status.success(), "{}", show(&sent));
    assert_eq!(
        alice.stdout_line("the message", |_| true).await,
        "second run"
    );
    let other = tempfile::tempdir().unwrap();
    let mut reuse = coord.qmesh(
        other.path(),
        &[
            "--name",
            "bob",
            "--token",
            &bob_token,
            "send",
            "mesh/alice!chat",
        ],
    );
    let exit = reuse.finish().await;
    assert!(exit.stderr.contains("already used"), "{}", show(&exit));

    // Revoke alice: her listener ends, saying why.
    let (ok, out, err) = operator(&[
        "revoke".as_ref(),
        "alice".as_ref(),
        "--state-dir".as_ref(),
        dir.path().as_os_str(),
    ])
    .await;
    assert!(ok, "revoke: {out} {err}");
    assert!(out.contains("its session was closed"), "{out}");
    let exit = alice.finish().await;
    assert!(exit.stderr.contains("revoked"), "{}", show(&exit));
    // And stays out.
    let mut back = coord.qmesh(clients.path(), &["--name", "alice", "listen", "chat"]);
    let exit = back.finish().await;
    assert!(!exit.status.success());
    assert!(exit.stderr.contains("revoked"), "{}", show(&exit));
    assert!(
        exit.stderr.contains("run once with --token"),
        "{}",
        show(&exit)
    );
    // Until the operator gives her a new token: she enrolls a new key.
    let fresh_token = token(dir.path(), "alice").await;
    let mut back = coord.qmesh(
        clients.path(),
        &["--name", "alice", "--token", &fresh_token, "listen", "chat"],
    );
    back.ready().await;
    back.kill().await;
    coord.proc.terminate();
    let _ = coord.proc.finish().await;
}

const DENY_CHAT: &str =
    "[[policy.allow]]\nfrom = [\"alice\"]\nto = [\"bob\"]\nchannels = [\"other\"]\n";
const ALLOW_CHAT: &str =
    "[[policy.allow]]\nfrom = [\"alice\"]\nto = [\"bob\"]\nchannels = [\"chat\"]\n";

async fn send_line(coord: &Coord, clients: &Path, line: &str) -> (bool, String) {
    let mut alice = coord.qmesh(clients, &["--name", "alice", "send", "mesh/bob!chat"]);
    alice.feed_stdin(format!("{line}\n").as_bytes()).await;
    let exit = alice.finish().await;
    (exit.status.success(), exit.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_check_reload_command_and_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let clients = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");

    // The dry run reports every error and fails.
    std::fs::write(
        &config,
        "[[policy.allow]]\nfrom = [\"@ghosts\"]\nto = []\nchannels = [\"*\"]\n",
    )
    .unwrap();
    let check = |path: PathBuf| async move {
        operator(&[
            "policy".as_ref(),
            "check".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
        ])
        .await
    };
    let (ok, _, err) = check(config.clone()).await;
    assert!(!ok);
    assert!(
        err.contains("group `ghosts`") && err.contains("`to` is empty"),
        "{err}"
    );
    assert!(err.contains("2 error(s)"), "{err}");
    std::fs::write(&config, DENY_CHAT).unwrap();
    let (ok, out, _) = check(config.clone()).await;
    assert!(ok && out.contains("1 policy rule(s)"), "{out}");

    let mut coord = start(dir.path(), &["--config".as_ref(), config.as_os_str()]).await;
    assert!(
        coord
            .banner
            .iter()
            .any(|l| l.starts_with("access policy: 1 rule(s)")),
        "{:?}",
        coord.banner
    );
    let mut bob = coord.qmesh(clients.path(), &["--name", "bob", "listen", "chat"]);
    bob.ready().await;
    let (ok, err) = send_line(&coord, clients.path(), "denied").await;
    assert!(!ok);
    assert!(err.contains("denied by the coordinator's policy"), "{err}");

    // Reload by command.
    std::fs::write(&config, ALLOW_CHAT).unwrap();
    let (ok, out, err) = operator(&[
        "policy".as_ref(),
        "reload".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--state-dir".as_ref(),
        dir.path().as_os_str(),
    ])
    .await;
    assert!(ok && out.contains("policy reloaded"), "{out} {err}");
    let (ok, err) = send_line(&coord, clients.path(), "allowed").await;
    assert!(ok, "{err}");
    assert_eq!(bob.stdout_line("the message", |_| true).await, "allowed");

    // A broken file: the reload is refused and the policy stays.
    std::fs::write(&config, "[[policy.allow]]\nfrom = 3\n").unwrap();
    let (ok, _, err) = operator(&[
        "policy".as_ref(),
        "reload".as_ref(),
        "--state-dir".as_ref(),
        dir.path().as_os_str(),
    ])
    .await;
    assert!(!ok && err.contains("policy not reloaded"), "{err}");
    let (ok, err) = send_line(&coord, clients.path(), "still allowed").await;
    assert!(ok, "{err}");
    assert_eq!(
        bob.stdout_line("the message", |_| true).await,
        "still allowed"
    );

    // Reload by SIGHUP.
    std::fs::write(&config, DENY_CHAT).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &coord.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    coord
        .proc
        .stderr_line("the SIGHUP reload", |l| l.contains("policy reloaded from"))
        .await;
    let (ok, err) = send_line(&coord, clients.path(), "denied again").await;
    assert!(
        !ok && err.contains("denied by the coordinator's policy"),
        "{err}"
    );
    coord.proc.terminate();
    let _ = coord.proc.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_warns_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let mut coord = start(dir.path(), &[]).await;
    coord
        .proc
        .stderr_line("the open-mode warning", |l| {
            l.starts_with("WARNING: auth mode is open") && l.contains("development only")
        })
        .await;
    coord.proc.terminate();
    let _ = coord.proc.finish().await;
}
