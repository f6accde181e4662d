//! Whole-config reload of a coordinator process (`qmesh-coordinator
//! reload`, SIGHUP): transfers stay byte-exact through reloads that change
//! the policy, rates, groups and log level; a broken file changes nothing
//! and every error is printed; a rotated certificate is what new clients
//! see while old sessions go on.
//!
//! Every wait is bounded and waits for an event (a line of output, an exit).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use qmesh_integration_tests::payload;
use qmesh_integration_tests::process::{self, show, Proc};
use qmesh_integration_tests::programs::sha256_file;
use qmesh_integration_tests::target::CoordinatorProc;

/// `qmesh-coordinator info --json --state-dir DIR`: the data.
async fn info(state: &Path) -> serde_json::Value {
    let exit = Proc::spawn(
        "qmesh-coordinator",
        [
            OsStr::new("info"),
            OsStr::new("--json"),
            OsStr::new("--state-dir"),
            state.as_os_str(),
        ],
        &[],
    )
    .finish()
    .await;
    assert!(exit.status.success(), "{}", show(&exit));
    let reply: serde_json::Value = serde_json::from_str(&exit.stdout).unwrap();
    reply["data"].clone()
}

/// `qmesh-coordinator reload --state-dir DIR`: (success, stdout, stderr).
async fn reload(state: &Path) -> (bool, String, String) {
    let exit = Proc::spawn(
        "qmesh-coordinator",
        vec![
            OsStr::new("reload"),
            "--state-dir".as_ref(),
            state.as_os_str(),
        ],
        &[],
    )
    .finish()
    .await;
    (exit.status.success(), exit.stdout, exit.stderr)
}

const ALLOW: &str =
    "[[policy.allow]]\nfrom = [\"*\"]\nto = [\"*\"]\nchannels = [\"*\"]\ndirect = true\n";

/// Five reloads while a rate-limited relayed file transfer (10 MB at
/// 1 MB/s, about 10 s) and a paced direct stream of lines run: each
/// reload is answered with what changed, and both transfers arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_stay_byte_exact_through_five_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("coordinator.toml");
    let write = |rate: u64, group_buffer: u32, log: &str| {
        std::fs::write(
            &config,
            format!(
                "log = \"{log}\"\n[limits]\nbytes_per_second = {rate}\n\
                 [groups.ops]\nbuffer = {group_buffer}\n{ALLOW}"
            ),
        )
        .unwrap();
    };
    write(1_000_000, 64, "info");
    // Without the tests' --log, so that the file's log filter is used.
    let mut coord = Proc::spawn_default_log(
        "qmesh-coordinator",
        vec![
            OsStr::new("run"),
            "--listen".as_ref(),
            "quic/$4:0".as_ref(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        &[],
    );
    let line = coord
        .stdout_line("the listening line", |l| {
            l.starts_with("qmesh-coordinator listening on")
        })
        .await;
    let port = line.rsplit(':').next().unwrap().to_owned();
    let coord_addr = format!("quic/$4:{port}");
    let ca = state.join("ca.pem");
    let out = dir.path().join("received");
    let out_arg = out.display().to_string();
    let mut bob = process::qmesh(
        &coord_addr,
        &ca,
        dir.path(),
        &["--name", "bob", "listen", "files", "--out", &out_arg],
    );
    bob.ready().await;
    let mut carol = process::qmesh(
        &coord_addr,
        &ca,
        dir.path(),
        &["--name", "carol", "listen", "lines"],
    );
    carol.ready().await;

    let file = dir.path().join("ten.bin");
    std::fs::write(&file, payload(10, 10_000_000)).unwrap();
    let file_arg = file.display().to_string();
    let mut alice = process::qmesh(
        &coord_addr,
        &ca,
        dir.path(),
        &[
            "--name",
            "alice",
            "send",
            "--mode",
            "relay",
            "mesh/bob!files",
            "--file",
            &file_arg,
        ],
    );
    let mut dave = process::qmesh(
        &coord_addr,
        &ca,
        dir.path(),
        &[
            "--name",
            "dave",
            "send",
            "--mode",
            "direct",
            "mesh/carol!lines",
        ],
    );
    alice
        .stderr_line("alice's channel", |l| l.contains("open after"))
        .await;
    dave.stderr_line("dave's direct path", |l| l.contains("path direct"))
        .await;

    let before = info(&state).await;
    assert_eq!(
        (
            before["channels"]["relay"].as_u64(),
            before["channels"]["direct"].as_u64()
        ),
        (Some(1), Some(1)),
        "{before}"
    );
    let mut after = before.clone();
    // Five reloads, 1.5 s apart (a pace, not a synchronisation: the
    // transfers run on their own), while dave's lines go out every 100 ms.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut line = 0u32;
    for round in 1..=5u32 {
        for _ in 0..15 {
            tick.tick().await;
            line += 1;
            dave.write_stdin(format!("line {line}\n").as_bytes()).await;
        }
        write(
            1_000_000 + u64::from(round) * 100_000,
            64 + round,
            if round % 2 == 1 { "debug" } else { "info" },
        );
        let (ok, out, err) = reload(&state).await;
        assert!(ok, "reload {round}: {out}{err}");
        for want in [
            "policy reloaded from",
            &format!("{} bytes/s", 1_000_000 + u64::from(round) * 100_000),
            "groups: 1 with settings of their own",
            if round % 2 == 1 {
                "log filter: debug"
            } else {
                "log filter: info"
            },
        ] {
            assert!(out.contains(want), "reload {round} lacks {want:?}: {out}");
        }
        assert!(!out.contains("needs a restart"), "reload {round}: {out}");
        // The channels are the same ones after each reload: the direct one
        // throughout, the relayed one until its file is through.
        let now = info(&state).await;
        assert_eq!(now["channels"]["direct"].as_u64(), Some(1), "{now}");
        if alice.running() {
            assert_eq!(now["channels"]["relay"].as_u64(), Some(1), "{now}");
        }
        assert!(
            now["bytes_relayed"].as_u64() >= after["bytes_relayed"].as_u64(),
            "{now}"
        );
        after = now;
        if round == 1 {
            // The new filter is in force: debug lines come.
            coord
                .stderr_line("a DEBUG line after the reload", |l| l.contains(" DEBUG "))
                .await;
        }
    }
    dave.feed_stdin(b"").await;
    let sent = alice.finish().await;
    assert!(
        sent.status.success(),
        "the relayed transfer: {}",
        show(&sent)
    );
    assert_eq!(
        sha256_file(&out.join("ten.bin")),
        sha256_file(&file),
        "the relayed file changed"
    );
    let lines = dave.finish().await;
    assert!(
        lines.status.success(),
        "the direct transfer: {}",
        show(&lines)
    );
    for n in 1..=line {
        assert_eq!(
            carol.stdout_line("a direct line", |_| true).await,
            format!("line {n}")
        );
    }
    assert!(
        !lines.stderr.contains("reconnecting") && !sent.stderr.contains("reconnecting"),
        "no session was lost"
    );
    eprintln!(
        "RELOAD 5 reloads during 10 MB relayed and {line} direct lines: both whole; \
         before the first: channels {} bytes relayed {}; after the last: channels {} bytes relayed {}",
        before["channels"], before["bytes_relayed"], after["channels"], after["bytes_relayed"]
    );

    // A broken file: every error printed, nothing changed.
    std::fs::write(
        &config,
        "log = \"not a=filter=at all\"\n[limits]\nbytes_per_second = \"fast\"\nlisten_twice = 1\n",
    )
    .unwrap();
    let (ok, out, err) = reload(&state).await;
    assert!(!ok, "a broken file was accepted: {out}");
    assert!(
        err.contains("not reloaded") && err.contains("nothing changed"),
        "{err}"
    );
    // Changes that cannot apply live are named.
    // (--listen on the command line wins over the file, so a listen in
    // the file would change nothing; max_clients does.)
    std::fs::write(&config, format!("[limits]\nmax_clients = 5\n{ALLOW}")).unwrap();
    let (ok, out, err) = reload(&state).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("needs a restart (not applied): max_clients (None → Some(5))"),
        "{out}"
    );
    coord.terminate();
    let exit = coord.finish().await;
    assert!(exit.status.success(), "{}", show(&exit));
}

/// The certificate files replaced and reloaded: a client pinning the new
/// certificate joins, one pinning the old is refused, and a session from
/// before the rotation goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_what_new_clients_see() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ca = qmesh_certs::Ca::generate("reload test CA").unwrap();
    let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("c-key.pem"));
    let first = ca.issue_server(&hosts).unwrap();
    first.save(&cert, &key).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut coord = CoordinatorProc::start(&[
        OsStr::new("--state-dir"),
        state.as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
    ])
    .await;
    let mut bob = process::qmesh(
        &coord.v4(),
        &ca_file,
        dir.path(),
        &["--name", "bob", "listen", "chat"],
    );
    bob.ready().await;
    let pinned = |fp: String, name: &str| {
        Proc::spawn(
            "qmesh",
            vec![
                "--coordinator".to_string(),
                coord.v4(),
                "--fingerprint".into(),
                fp,
                "--state-dir".into(),
                dir.path().display().to_string(),
                "--name".into(),
                name.into(),
                "peers".into(),
            ],
            &[],
        )
    };
    let old_fp = first.fingerprint().to_string();
    assert!(pinned(old_fp.clone(), "before")
        .finish()
        .await
        .status
        .success());

    let second = ca.issue_server(&hosts).unwrap();
    second.save(&cert, &key).unwrap();
    let (ok, out, err) = reload(&state).await;
    assert!(ok, "{err}");
    let new_fp = second.fingerprint().to_string();
    assert!(out.contains(&format!("certificate: {new_fp}")), "{out}");
    let joined = pinned(new_fp, "after").finish().await;
    assert!(
        joined.status.success(),
        "the new certificate: {}",
        show(&joined)
    );
    let refused = pinned(old_fp, "stale").finish().await;
    assert!(
        !refused.status.success(),
        "the old certificate is still served: {}",
        show(&refused)
    );

    // bob's session from before the rotation still carries a message.
    let mut alice = process::qmesh(
        &coord.v4(),
        &ca_file,
        dir.path(),
        &["--name", "alice", "send", "mesh/bob!chat"],
    );
    alice.feed_stdin(b"after the rotation\n").await;
    assert!(alice.finish().await.status.success());
    assert_eq!(
        bob.stdout_line("the message", |_| true).await,
        "after the rotation"
    );
    let exit = bob.kill().await;
    assert!(
        !exit.stderr.contains("reconnecting"),
        "bob's session went on: {}",
        show(&exit)
    );
    coord.proc.terminate();
    let _ = coord.proc.finish().await;
}

/// A rate reload applies to sessions already joined: a `qmesh send` whose
/// session and channel were up before the reload, unlimited then, is held
/// to the new 40,000 bytes/s for what it sends after it (relayed: the
/// coordinator limits what it relays). 200 lines of
/// 1,000 bytes cannot pass in less than 200,000 / 40,000 = 5 s less the
/// 250 ms burst; the check is that lower bound with room (3.5 s), which a
/// busy machine can only lengthen. With the live sessions' limiters left
/// alone, the lines pass at once and the test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_reload_holds_a_live_session_to_the_new_rate() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, format!("[limits]\nbytes_per_second = 0\n{ALLOW}")).unwrap();
    let (mut coord, ca) = CoordinatorProc::start_dev(
        &state,
        &[
            OsStr::new("--single"),
            "--config".as_ref(),
            config.as_os_str(),
        ],
    )
    .await;
    let addr = coord.v4();
    let mut alice = process::qmesh(
        &addr,
        &ca,
        dir.path(),
        &["--name", "alice", "listen", "chat"],
    );
    alice.ready().await;
    let mut bob = process::qmesh(
        &addr,
        &ca,
        dir.path(),
        &[
            "--name",
            "bob",
            "send",
            "--mode",
            "relay",
            "mesh/alice!chat",
        ],
    );
    bob.write_stdin(b"before the reload\n").await;
    assert_eq!(
        alice.stdout_line("the first line", |_| true).await,
        "before the reload"
    );

    std::fs::write(
        &config,
        format!(
            "[limits]\nbytes_per_second = 40000\nburst = \"250ms\"\nflood_after = \"30s\"\n{ALLOW}"
        ),
    )
    .unwrap();
    let (ok, out, err) = reload(&state).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(
            "rates for every session (2 now, and those admitted from now on): 40000 bytes/s"
        ),
        "{out}"
    );
    let line = "x".repeat(999);
    let started = std::time::Instant::now();
    let mut block = String::new();
    for _ in 0..200 {
        block.push_str(&line);
        block.push('\n');
    }
    bob.write_stdin(block.as_bytes()).await;
    for n in 0..200 {
        let got = alice.stdout_line("a limited line", |_| true).await;
        assert_eq!(got.len(), 999, "line {n}");
    }
    let took = started.elapsed();
    eprintln!("RATE 200,000 bytes after the reload to 40,000 bytes/s took {took:?}");
    assert!(
        took >= Duration::from_millis(3500),
        "the live session was not held to the new rate: {took:?}"
    );
    bob.feed_stdin(b"").await;
    let sent = bob.finish().await;
    assert!(sent.status.success(), "{}", show(&sent));
    alice.kill().await;
    coord.proc.terminate();
    let _ = coord.proc.finish().await;
}
