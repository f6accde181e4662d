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
    assert!(!ok && err.contains("not reloaded"), "{err}");
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

/// Run `qmesh-coordinator COMMAND ARGS --state-dir DIR [--json]`.
async fn ask(dir: &Path, command: &[&str], json: bool) -> (bool, String, String) {
    let mut args: Vec<&OsStr> = command.iter().map(OsStr::new).collect();
    args.extend(["--state-dir".as_ref(), dir.as_os_str()]);
    if json {
        args.push("--json".as_ref());
    }
    operator(&args).await
}

/// The `data` of a `--json` answer.
async fn ask_json(dir: &Path, command: &[&str]) -> serde_json::Value {
    let (ok, out, err) = ask(dir, command, true).await;
    assert!(ok, "{command:?} --json: {err}");
    let doc: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{command:?} --json: {e}: {out}"));
    assert_eq!(doc["ok"], true, "{out}");
    doc["data"].clone()
}

/// `info`, `clients`, `channels`, `events`, `kick`, `quit` and `stop`, each
/// with and without `--json`, against a running coordinator and against
/// none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_answer_in_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let clients = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state_arg = state.as_os_str().to_owned();
    let coord = start(&state, &[]).await;
    let mut bob = coord.qmesh(clients.path(), &["--name", "bob", "listen", "chat"]);
    bob.ready().await;
    let mut alice = coord.qmesh(
        clients.path(),
        &[
            "--name",
            "alice",
            "send",
            "--mode",
            "relay",
            "mesh/bob!chat",
        ],
    );
    alice.write_stdin(b"0123456789\n").await;
    assert_eq!(bob.stdout_line("the line", |_| true).await, "0123456789");

    let (ok, out, err) = ask(&state, &["info"], false).await;
    assert!(ok, "info: {err}");
    for want in ["clients 2", "channels 0 direct, 1 relay", "auth mode open"] {
        assert!(out.contains(want), "info lacks {want:?}: {out}");
    }
    let info = ask_json(&state, &["info"]).await;
    assert_eq!(info["clients"], 2, "{info}");
    assert_eq!(info["channels"]["relay"], 1, "{info}");
    assert_eq!(info["listen"], format!("quic/127.0.0.1:{}", coord.port));
    assert!(info["bytes_relayed"].as_u64().unwrap() >= 11, "{info}");

    let (ok, out, _) = ask(&state, &["clients"], false).await;
    assert!(ok && out.contains("2 client(s)"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("alice ")), "{out}");
    let list = ask_json(&state, &["clients"]).await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(list[0]["fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(list[1]["channels"], 1, "{list}");

    let (ok, out, _) = ask(&state, &["channels"], false).await;
    assert!(ok && out.contains("alice > bob ! chat  relay"), "{out}");
    let channels = ask_json(&state, &["channels"]).await;
    assert_eq!(channels[0]["opener"], "alice");
    assert_eq!(channels[0]["callee"], "bob");
    assert_eq!(channels[0]["name"], "chat");
    assert_eq!(channels[0]["path"], "relay");
    assert!(channels[0]["bytes"].as_u64().unwrap() >= 11, "{channels}");

    // kick: bob's session is closed with the reason, and bob comes back.
    let (ok, out, err) = ask(&state, &["kick", "bob", "--reason", "maintenance"], false).await;
    assert!(ok, "kick: {err}");
    assert!(out.contains("closed bob's session (maintenance)"), "{out}");
    let line = bob
        .stderr_line("bob's reconnect", |l| {
            l.starts_with("qmesh: reconnecting to")
        })
        .await;
    assert!(line.contains("maintenance"), "{line}");
    bob.stderr_line("bob back", |l| l.starts_with("qmesh: reconnected to"))
        .await;
    let events = ask_json(&state, &["events"]).await;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "kick" && e["what"].as_str().unwrap().contains("bob")),
        "{events}"
    );
    let (ok, out, _) = ask(&state, &["events"], false).await;
    assert!(ok && out.contains("kick bob kicked: maintenance"), "{out}");
    let (ok, _, err) = ask(&state, &["kick", "nobody"], false).await;
    assert!(!ok && err.contains("no client named nobody"), "{err}");
    let (ok, out, _) = ask(&state, &["kick", "nobody"], true).await;
    assert!(!ok && out.contains("\"ok\": false"), "{out}");

    // quit drains and the coordinator exits 0.
    let mut coord = coord;
    let (ok, out, err) = ask(&state, &["quit"], false).await;
    assert!(ok && out.contains("draining"), "quit: {out}{err}");
    let exit = coord.proc.finish().await;
    assert!(exit.status.success(), "{}", show(&exit));
    drop((alice, bob, state_arg));

    // Against no coordinator: one line on stderr, status 1.
    for command in ["info", "clients", "channels", "events", "quit", "stop"] {
        for json in [false, true] {
            let (ok, out, err) = ask(&state, &[command], json).await;
            assert!(!ok, "{command} with no coordinator succeeded: {out}");
            assert_eq!(err.trim().lines().count(), 1, "{command}: {err}");
            assert!(err.contains("no coordinator answers"), "{command}: {err}");
        }
    }

    // stop: exits at once, a live session notwithstanding.
    let coord = start(&state, &[]).await;
    let mut carol = coord.qmesh(clients.path(), &["--name", "carol", "listen", "chat"]);
    carol.ready().await;
    let (ok, _, err) = ask(&state, &["stop"], true).await;
    assert!(ok, "stop: {err}");
    let mut coord = coord;
    let exit = coord.proc.finish().await;
    assert!(exit.status.success(), "{}", show(&exit));
}

/// A typo in the config file is one error naming the file, the line and
/// the key (with TOML's excerpt of the line), and status 1: no backtrace
/// and no "Caused by" block, even with `RUST_BACKTRACE=1` set.
#[tokio::test]
async fn a_config_typo_is_one_error_without_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, "[limits]\nbytes_per_secnd = 5\n").unwrap();
    let state = dir.path().join("state");
    let exit = Proc::spawn(
        "qmesh-coordinator",
        [
            "run".as_ref(),
            "--single".as_ref(),
            "--listen".as_ref(),
            "quic/127.0.0.1:0".as_ref(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        &[("RUST_BACKTRACE", OsStr::new("1"))],
    )
    .finish()
    .await;
    assert!(!exit.status.success(), "{}", show(&exit));
    let err = &exit.stderr;
    assert!(err.starts_with("error: "), "{}", show(&exit));
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{}",
        show(&exit)
    );
    for part in [
        "coordinator.toml",
        "line 2",
        "unknown field `bytes_per_secnd`",
    ] {
        assert!(err.contains(part), "{part}: {}", show(&exit));
    }
    for noise in ["backtrace", "Caused by", "Stack", "panicked"] {
        assert!(!err.contains(noise), "{noise}: {}", show(&exit));
    }
}

/// One client, one state directory, two token-mode coordinators with CAs
/// of their own: bob enrolls with each, and each keeps its own credential.
/// Enrolling with the second does not overwrite the first, so bob joins the
/// first again with no token; alice, listening on each, gets both lines.
#[tokio::test]
async fn credentials_are_kept_per_coordinator() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let clients = tempfile::tempdir().unwrap();
    let alice_state = tempfile::tempdir().unwrap();
    let token_mode = ["--auth".as_ref(), "token".as_ref()];
    let mut a = start(dir_a.path(), &token_mode).await;
    let mut b = start(dir_b.path(), &token_mode).await;
    let mut listeners = Vec::new();
    for (coord, dir) in [(&a, dir_a.path()), (&b, dir_b.path())] {
        let t = token(dir, "alice").await;
        let mut alice = coord.qmesh(
            alice_state.path(),
            &["--name", "alice", "--token", &t, "listen", "chat"],
        );
        alice.ready().await;
        listeners.push(alice);
    }
    for (i, (coord, dir)) in [(&a, dir_a.path()), (&b, dir_b.path())]
        .into_iter()
        .enumerate()
    {
        let t = token(dir, "bob").await;
        let mut bob = coord.qmesh(
            clients.path(),
            &["--name", "bob", "--token", &t, "send", "mesh/alice!chat"],
        );
        bob.feed_stdin(format!("enrolled {i}\n").as_bytes()).await;
        let sent = bob.finish().await;
        assert!(sent.status.success(), "{}", show(&sent));
        assert_eq!(
            listeners[i].stdout_line("the line", |_| true).await,
            format!("enrolled {i}")
        );
    }
    // Back to the first coordinator without a token: its credential is
    // still there.
    let mut bob = a.qmesh(
        clients.path(),
        &["--name", "bob", "send", "mesh/alice!chat"],
    );
    bob.feed_stdin(b"again\n").await;
    let sent = bob.finish().await;
    assert!(sent.status.success(), "{}", show(&sent));
    assert_eq!(
        listeners[0].stdout_line("the line", |_| true).await,
        "again"
    );
    let folders = std::fs::read_dir(clients.path())
        .unwrap()
        .filter(|e| {
            let e = e.as_ref().unwrap();
            e.path().join("bob.pem").exists()
        })
        .count();
    assert_eq!(folders, 2, "one credential folder per coordinator");
    for mut l in listeners {
        l.kill().await;
    }
    for c in [&mut a, &mut b] {
        c.proc.terminate();
        let _ = c.proc.finish().await;
    }
}

/// A kept credential that a coordinator refuses, in each way it can be
/// refused (issued by another client CA of the same name, revoked,
/// expired): without a token `qmesh` fails with a line that says what
/// happened and to run once with `--token`; with a fresh token it enrolls
/// again under a new key and gets through.
///
/// The coordinator keeps its TLS certificate (files given with `--cert`
/// and `--key`) across a redeploy on a new state directory, so the client
/// trusts it as before and finds its kept credential, which the new
/// client CA did not issue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_kept_credential_says_to_enroll_again_and_a_token_does() {
    use qmesh_certs::{Ca, Identity};
    use std::time::{Duration, SystemTime};

    let files = tempfile::tempdir().unwrap();
    let server_ca = Ca::generate("deploy CA").unwrap();
    let server = server_ca
        .issue_server(&["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    let (cert, key, ca) = (
        files.path().join("cert.pem"),
        files.path().join("key.pem"),
        files.path().join("ca.pem"),
    );
    server.save(&cert, &key).unwrap();
    std::fs::write(&ca, server_ca.cert_pem()).unwrap();
    let run_on = |dir: &Path| {
        let (cert, key, dir) = (cert.clone(), key.clone(), dir.to_owned());
        async move {
            CoordinatorProc::start(&[
                "--auth".as_ref(),
                "token".as_ref(),
                "--cert".as_ref(),
                cert.as_os_str(),
                "--key".as_ref(),
                key.as_os_str(),
                "--state-dir".as_ref(),
                dir.as_os_str(),
            ])
            .await
        }
    };
    let clients = tempfile::tempdir().unwrap();
    let bob = |coord: &CoordinatorProc, token: Option<&str>| {
        let mut args = vec!["--name", "bob"];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        args.extend(["peers", "--json"]);
        process::qmesh(&coord.v4(), &ca, clients.path(), &args)
    };
    let refused = |exit: &process::Exit, why: &str| {
        assert!(!exit.status.success(), "{}", show(exit));
        assert!(
            exit.stderr.contains(why) && exit.stderr.contains("run once with --token"),
            "expected {why:?} and what to do: {}",
            show(exit)
        );
    };

    // Enrolled with the first deployment.
    let first = tempfile::tempdir().unwrap();
    let mut coord = run_on(first.path()).await;
    let t = token(first.path(), "bob").await;
    let enrolled = bob(&coord, Some(&t)).finish().await;
    assert!(enrolled.status.success(), "{}", show(&enrolled));
    coord.proc.terminate();
    let _ = coord.proc.finish().await;

    // 1. The same coordinator redeployed on a new state directory: a new
    //    client CA with the same name, which did not issue bob's.
    let second = tempfile::tempdir().unwrap();
    let mut coord = run_on(second.path()).await;
    refused(
        &bob(&coord, None).finish().await,
        "another CA of the same name",
    );
    let t = token(second.path(), "bob").await;
    let again = bob(&coord, Some(&t)).finish().await;
    assert!(again.status.success(), "{}", show(&again));
    let kept = bob(&coord, None).finish().await;
    assert!(
        kept.status.success(),
        "the new credential is kept: {}",
        show(&kept)
    );

    // 2. Revoked.
    let (ok, _, err) = operator(&[
        "revoke".as_ref(),
        "bob".as_ref(),
        "--state-dir".as_ref(),
        second.path().as_os_str(),
    ])
    .await;
    assert!(ok, "revoke: {err}");
    refused(&bob(&coord, None).finish().await, "revoked");
    let t = token(second.path(), "bob").await;
    let again = bob(&coord, Some(&t)).finish().await;
    assert!(again.status.success(), "{}", show(&again));

    // 3. Expired: bob's kept certificate replaced by one the client CA
    //    issued for the same key, valid until an hour ago.
    let folder = std::fs::read_dir(clients.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("bob.pem").exists())
        .expect("bob's credential folder");
    let kept = Identity::from_pem(
        &std::fs::read_to_string(folder.join("bob.pem")).unwrap(),
        &std::fs::read_to_string(folder.join("bob-key.pem")).unwrap(),
    )
    .unwrap();
    let client_ca = Ca::from_pem(
        &std::fs::read_to_string(second.path().join("client-ca.pem")).unwrap(),
        &std::fs::read_to_string(second.path().join("client-ca-key.pem")).unwrap(),
    )
    .unwrap();
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    let expired = client_ca
        .issue_client_valid(&kept.chain[0], "bob", now - hour * 3, now - hour)
        .unwrap();
    let expired = Identity {
        chain: vec![expired.cert],
        key: kept.key.clone_key(),
    };
    expired
        .save(&folder.join("bob.pem"), &folder.join("bob-key.pem"))
        .unwrap();
    refused(&bob(&coord, None).finish().await, "expired");
    let t = token(second.path(), "bob").await;
    let again = bob(&coord, Some(&t)).finish().await;
    assert!(again.status.success(), "{}", show(&again));
    let kept = bob(&coord, None).finish().await;
    assert!(kept.status.success(), "{}", show(&kept));

    coord.proc.terminate();
    let _ = coord.proc.finish().await;
}

/// Renewal follows the lifetime the operator chose: with `--cert-ttl 30s`
/// a running `qmesh listen` renews two thirds into its certificate's life,
/// about every 20 s, counted in the coordinator's log (`certificate issued
/// ... renewal=true`). It once renewed every 1.1 s (42 times in 47 s),
/// since the backdating of issued certificates counted as life spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_second_certificate_is_renewed_about_every_20_seconds() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let clients = tempfile::tempdir().unwrap();
    let mut coord = start(
        dir.path(),
        &[
            "--auth".as_ref(),
            "token".as_ref(),
            "--cert-ttl".as_ref(),
            "30s".as_ref(),
        ],
    )
    .await;
    let t = token(dir.path(), "alice").await;
    let mut alice = coord.qmesh(
        clients.path(),
        &["--name", "alice", "--token", &t, "listen", "chat"],
    );
    alice.ready().await;
    let enrolled = Instant::now();
    let issued = |l: &str| l.contains("certificate issued") && l.contains("alice");
    let renewal = |l: &str| issued(l) && l.contains("renewal=true");
    // Two renewals, each a line of its own; no other issue in between.
    let mut at = Vec::new();
    while at.len() < 2 {
        let line = coord.proc.stderr_line("a certificate issued", issued).await;
        if renewal(&line) {
            at.push(enrolled.elapsed());
        }
    }
    eprintln!(
        "RENEWAL with --cert-ttl 30s: after {:?} and {:?}",
        at[0], at[1]
    );
    // Two thirds into a 30 s life is 20 s (the backdating may take up to
    // a quarter of it, so 12.5 s at the least); a storm renews at once.
    assert!(at[0] >= Duration::from_millis(12_500), "{at:?}");
    assert!(at[1] - at[0] >= Duration::from_millis(12_500), "{at:?}");
    alice.kill().await;
    coord.proc.terminate();
    let _ = coord.proc.finish().await;
}
