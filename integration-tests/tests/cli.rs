//! The `qmesh-coordinator` and `qmesh` binaries, run as processes on
//! loopback: start-up output, certificates, messages and files through
//! `send`/`listen`, failures users should hear about, and shutdown.
//!
//! Every wait is bounded and waits for an event (a line of output, an exit);
//! nothing sleeps to synchronise.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qmesh_integration_tests::payload;
use qmesh_integration_tests::process::{self, show, Exit, Proc};
use qmesh_integration_tests::target::CoordinatorProc as Coord;

/// How fast a failure that needs no timeout must be reported: well under
/// the client's 30 s open timeout.
const QUICK: Duration = Duration::from_secs(15);

/// `qmesh --coordinator COORD --ca CA --state-dir DIR ARGS...`, with the
/// client state kept next to the CA file.
fn qmesh<S: AsRef<OsStr>>(coordinator: &str, ca: &Path, args: &[S]) -> Proc {
    let state = ca
        .parent()
        .expect("the CA file is in a directory")
        .join("client-state");
    process::qmesh(coordinator, ca, &state, args)
}

/// A coordinator with a development CA in `state_dir`; returns the CA path
/// it printed.
async fn start_dev(state_dir: &Path) -> (Coord, PathBuf) {
    Coord::start_dev(state_dir, &[] as &[&OsStr]).await
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// `qmesh-coordinator certs --out DIR --host ...`, which must succeed.
async fn make_certs(dir: &Path, hosts: &[&str]) -> Exit {
    let mut args: Vec<&OsStr> = vec!["certs".as_ref(), "--out".as_ref(), dir.as_os_str()];
    for h in hosts {
        args.push("--host".as_ref());
        args.push(h.as_ref());
    }
    let exit = Proc::spawn("qmesh-coordinator", args, &[]).finish().await;
    assert!(exit.status.success(), "certs failed: {}", show(&exit));
    exit
}

/// Test 1: a coordinator with a development CA relays stdin lines from
/// `send` to `listen`, in order. The listener is configured through the
/// environment, the sender through options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_lines_to_a_listener() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    assert!(ca.is_file(), "the CA file {} does not exist", ca.display());
    let state_real = std::fs::canonicalize(state.path()).expect("canonical state dir");
    let ca_real = std::fs::canonicalize(&ca).expect("canonical CA path");
    assert!(
        ca_real.starts_with(&state_real),
        "the CA file {} is not in the state dir {}",
        ca.display(),
        state.path().display()
    );

    let coordinator = coord.localhost();
    let mut bob = Proc::spawn(
        "qmesh",
        ["--name", "bob", "listen", "chat"],
        &[
            ("QMESH_COORDINATOR", OsStr::new(&coordinator)),
            ("QMESH_CA", ca.as_os_str()),
            ("QMESH_STATE_DIR", state.path().as_os_str()),
        ],
    );
    bob.ready().await;

    let mut alice = qmesh(
        &coord.v4(),
        &ca,
        &["--name", "alice", "send", "mesh/bob!chat"],
    );
    alice.feed_stdin(b"one\ntwo\nthree\n").await;
    let sent = alice.finish().await;
    assert!(sent.status.success(), "send failed: {}", show(&sent));
    // It exits once the listener has confirmed every line.
    assert!(
        sent.stderr
            .contains("qmesh: the peer confirmed 3 line(s), 11 byte(s)"),
        "{}",
        show(&sent)
    );

    for want in ["one", "two", "three"] {
        let line = bob.stdout_line(&format!("{want:?}"), |_| true).await;
        assert_eq!(line, want, "lines out of order");
    }
    // `listen` logs the channel's end (`… closed by the peer: done
    // from=alice`) once every stream of it is done: nothing more will be
    // printed for it.
    bob.stderr_line("saying alice's channel closed", |l| {
        l.contains("closed by the peer") && l.contains("from=alice")
    })
    .await;
    let listened = bob.kill().await;
    assert_eq!(
        listened.stdout,
        "one\ntwo\nthree",
        "listener output: {}",
        show(&listened)
    );
}

/// `qmesh` run as a user runs it: by default no log line below a warning,
/// only the command's own lines (the listener's ready line, `send`'s open
/// and confirmation lines); `-v` brings info back, `-vv` debug, and
/// `--log` or `RUST_LOG` are used instead when given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_is_quiet_by_default_and_v_brings_the_logs_back() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let client_state = state.path().join("client-state");
    let coordinator = coord.v4();
    let plain = |args: &[&str], env: &[(&str, &OsStr)]| {
        let mut all: Vec<&OsStr> = vec![
            "--coordinator".as_ref(),
            coordinator.as_ref(),
            "--ca".as_ref(),
            ca.as_os_str(),
            "--state-dir".as_ref(),
            client_state.as_os_str(),
        ];
        all.extend(args.iter().map(OsStr::new));
        Proc::spawn_default_log("qmesh", all, env)
    };
    // Ready at the default level: the ready line is the command's own.
    let mut bob = plain(&["--name", "bob", "listen", "chat"], &[]);
    bob.ready().await;
    let is_log = |l: &str, level: &str| l.starts_with('[') && l.contains(&format!(" {level} "));
    // Flags, RUST_LOG, the levels that must show and those that must not.
    let cases = [
        (&[][..], None, &[][..], &["INFO", "DEBUG"][..]),
        (&["-v"], None, &["INFO"], &["DEBUG"]),
        (&["-vv"], None, &["INFO", "DEBUG"], &[]),
        (&["-vv", "--log", "warn"], None, &[], &["INFO", "DEBUG"]),
        (&[], Some("info"), &["INFO"], &["DEBUG"]),
    ];
    for (i, (flags, rust_log, shown, hidden)) in cases.into_iter().enumerate() {
        let env: Vec<(&str, &OsStr)> = rust_log
            .map(|filter| ("RUST_LOG", OsStr::new(filter)))
            .into_iter()
            .collect();
        let mut args = flags.to_vec();
        args.extend(["send", "mesh/bob!chat"]);
        let mut alice = plain(&args, &env);
        let line = format!("line {i}\n");
        alice.feed_stdin(line.as_bytes()).await;
        let sent = alice.finish().await;
        let what = format!("{flags:?} RUST_LOG={rust_log:?}: {}", show(&sent));
        assert!(sent.status.success(), "send failed: {what}");
        assert!(sent.stderr.contains("qmesh: channel "), "{what}");
        assert!(sent.stderr.contains(" open after "), "{what}");
        assert!(
            sent.stderr
                .contains("qmesh: the peer confirmed 1 line(s), 6 byte(s)"),
            "{what}"
        );
        for level in shown {
            assert!(
                sent.stderr.lines().any(|l| is_log(l, level)),
                "no {level} line: {what}"
            );
        }
        for level in hidden {
            assert!(
                !sent.stderr.lines().any(|l| is_log(l, level)),
                "a {level} line: {what}"
            );
        }
        let got = bob.stdout_line("the line sent", |_| true).await;
        assert_eq!(got, format!("line {i}"));
    }
    // The default shows nothing but the command's lines and warnings.
    let mut alice = plain(&["send", "mesh/bob!chat"], &[]);
    alice.feed_stdin(b"last\n").await;
    let sent = alice.finish().await;
    assert!(sent.status.success(), "{}", show(&sent));
    for line in sent.stderr.lines() {
        assert!(
            line.starts_with("qmesh: ") || is_log(line, "WARN") || is_log(line, "ERROR"),
            "not a result line: {line:?} in {}",
            show(&sent)
        );
    }
    let listened = bob.kill().await;
    assert!(
        !listened.stderr.lines().any(|l| is_log(l, "INFO")),
        "the default listener logged info: {}",
        show(&listened)
    );
}

/// `send --mode direct` runs the channel peer to peer, says so, and the
/// client keeps its key in the state directory across runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_direct_says_its_path_and_keeps_its_identity() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let mut bob = qmesh(&coord.v4(), &ca, &["--name", "bob", "listen", "chat"]);
    bob.ready().await;
    let client_state = ca.parent().expect("dir").join("client-state");
    // The identity lives in the folder of the coordinator's CA.
    let in_ca_folder = || {
        let folders: Vec<_> = std::fs::read_dir(&client_state)
            .expect("the client's state directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ca-"))
            .collect();
        assert_eq!(folders.len(), 1, "{folders:?}");
        client_state.join(&folders[0]).join("alice.pem")
    };
    let mut first_cert = None;
    for word in ["first", "second"] {
        let mut alice = qmesh(
            &coord.v4(),
            &ca,
            &[
                "--name",
                "alice",
                "send",
                "--mode",
                "direct",
                "mesh/bob!chat",
            ],
        );
        alice.feed_stdin(format!("{word}\n").as_bytes()).await;
        let sent = alice.finish().await;
        assert!(sent.status.success(), "send failed: {}", show(&sent));
        assert!(
            sent.stderr.contains("path direct"),
            "send must say the channel is direct: {}",
            show(&sent)
        );
        let line = bob.stdout_line(word, |_| true).await;
        assert_eq!(line, word);
        let pem =
            std::fs::read_to_string(in_ca_folder()).expect("alice's certificate in the state dir");
        match &first_cert {
            None => first_cert = Some(pem),
            Some(first) => assert_eq!(first, &pem, "the identity must be kept across runs"),
        }
    }
    bob.kill().await;
}

/// `send --mode direct` to a listener that takes no direct channels fails
/// with a sentence that says so and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_direct_to_a_relay_only_peer_fails_clearly() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let mut bob = qmesh(
        &coord.v4(),
        &ca,
        &["--name", "bob", "--no-direct", "listen", "chat"],
    );
    bob.ready().await;
    let mut alice = qmesh(
        &coord.v4(),
        &ca,
        &[
            "--name",
            "alice",
            "send",
            "--mode",
            "direct",
            "mesh/bob!chat",
        ],
    );
    alice.feed_stdin(b"x\n").await;
    let sent = alice.finish().await;
    assert!(!sent.status.success(), "must fail: {}", show(&sent));
    assert!(
        sent.stderr.contains("cannot take direct channels") && sent.stderr.contains("auto"),
        "{}",
        show(&sent)
    );
    bob.kill().await;
}

/// Test 2: a second `run` on the same state directory reuses the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reuses_the_development_ca() {
    let state = tempdir();
    let (mut first, ca) = start_dev(state.path()).await;
    let before = std::fs::read(&ca).expect("reading the CA file");
    // `run` prints its listening line before it installs its SIGTERM
    // handler; a client it has served shows it is past that point.
    let mut bob = qmesh(
        &first.localhost(),
        &ca,
        &["--name", "bob", "listen", "chat"],
    );
    bob.ready().await;
    first.proc.terminate();
    let exit = first.proc.finish().await;
    assert!(exit.status.success(), "first run: {}", show(&exit));

    let (second, ca_again) = start_dev(state.path()).await;
    assert_eq!(ca_again, ca, "the CA file moved");
    let after = std::fs::read(&ca).expect("reading the CA file again");
    assert!(before == after, "the CA file changed on restart");

    // The reused CA still verifies the restarted coordinator.
    let mut bob = qmesh(
        &second.localhost(),
        &ca,
        &["--name", "bob", "listen", "chat"],
    );
    bob.ready().await;
}

/// Test 3: a client trusting another CA is told the certificate did not
/// verify, and against which CA file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_another_ca_is_refused() {
    let state = tempdir();
    let (coord, _ca) = start_dev(state.path()).await;
    let other = tempdir();
    make_certs(other.path(), &["localhost"]).await;
    let other_ca = other.path().join("ca.pem");

    let exit = qmesh(
        &coord.localhost(),
        &other_ca,
        &["--name", "carol", "listen", "chat"],
    )
    .finish()
    .await;
    assert!(!exit.status.success(), "should fail: {}", show(&exit));
    assert!(
        exit.stderr
            .contains("the coordinator's certificate did not verify"),
        "stderr: {}",
        show(&exit)
    );
    assert!(
        exit.stderr.contains(&other_ca.display().to_string()),
        "stderr does not name {}: {}",
        other_ca.display(),
        show(&exit)
    );
}

/// Test 4: sending to a name nobody uses fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_absent_peer_fails_quickly() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let started = Instant::now();
    // Stdin is closed at once: the open must fail before any line is read.
    let mut send = qmesh(&coord.localhost(), &ca, &["send", "mesh/nobody!chat"]);
    let exit = send.finish_within(QUICK).await;
    let took = started.elapsed();
    assert!(!exit.status.success(), "should fail: {}", show(&exit));
    assert!(
        exit.stderr.contains("peer not present"),
        "stderr: {}",
        show(&exit)
    );
    assert!(took < QUICK, "took {took:?}");
}

/// `qmesh --name bob listen chat --out OUT`, once it is ready.
async fn listen_into(coordinator: &str, ca: &Path, out: &Path) -> Proc {
    let mut bob = qmesh(
        coordinator,
        ca,
        &[
            OsStr::new("--name"),
            OsStr::new("bob"),
            OsStr::new("listen"),
            OsStr::new("chat"),
            OsStr::new("--out"),
            out.as_os_str(),
        ],
    );
    bob.ready().await;
    bob
}

/// `qmesh --name alice send --mode MODE mesh/bob!chat --file PATH`.
fn send_file(coordinator: &str, ca: &Path, mode: &str, path: &Path) -> Proc {
    qmesh(
        coordinator,
        ca,
        &[
            OsStr::new("--name"),
            OsStr::new("alice"),
            OsStr::new("send"),
            OsStr::new("--mode"),
            OsStr::new(mode),
            OsStr::new("mesh/bob!chat"),
            OsStr::new("--file"),
            path.as_os_str(),
        ],
    )
}

/// The names of the entries in `dir`.
fn file_names(dir: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .expect("listing --out")
        .map(|e| e.expect("entry").file_name())
        .collect()
}

/// Test 5: `send --file` stores the file, byte for byte and under its name,
/// in the listener's `--out` directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_transfer_keeps_name_and_bytes() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let files = tempdir();
    let src = files.path().join("src");
    std::fs::create_dir_all(&src).expect("source dir");
    let out = files.path().join("received");
    let data = payload(5, 5 * 1024 * 1024);
    let path = src.join("random-5MiB.bin");
    std::fs::write(&path, &data).expect("writing the source file");

    let mut bob = listen_into(&coord.localhost(), &ca, &out).await;

    let exit = send_file(&coord.localhost(), &ca, "auto", &path)
        .finish()
        .await;
    assert!(exit.status.success(), "send --file failed: {}", show(&exit));
    assert!(
        exit.stderr
            .contains("qmesh: the peer confirmed 0 line(s), 5242880 byte(s)"),
        "the listener confirms the stored file: {}",
        show(&exit)
    );

    bob.stderr_line("`file received`", |l| l.contains("file received"))
        .await;
    let stored = out.join("random-5MiB.bin");
    let got =
        std::fs::read(&stored).unwrap_or_else(|e| panic!("reading {}: {e}", stored.display()));
    assert_eq!(got.len(), data.len(), "stored file size");
    assert!(got == data, "the stored file's bytes differ");
    let names = file_names(&out);
    assert_eq!(names, vec![OsStr::new("random-5MiB.bin").to_owned()]);
}

/// A file sent to a listener with no `--out` directory: the listener stops
/// the stream with `FileRefused`, and the sender fails saying the listener
/// takes no files and that nothing was confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_to_a_listener_without_out_is_refused_with_the_reason() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let files = tempdir();
    let path = files.path().join("notes.txt");
    std::fs::write(&path, payload(6, 200_000)).expect("writing the source file");
    let mut bob = qmesh(
        &coord.localhost(),
        &ca,
        &["--name", "bob", "listen", "chat"],
    );
    bob.ready().await;
    for mode in ["relay", "direct"] {
        let exit = send_file(&coord.localhost(), &ca, mode, &path)
            .finish()
            .await;
        assert!(!exit.status.success(), "{mode}: {}", show(&exit));
        // The stop code (FileRefused, 13) when it comes before the file is
        // acknowledged, else the channel's close: either way the reason.
        assert!(
            exit.stderr
                .contains("takes no files (it has no --out directory)"),
            "{mode}: {}",
            show(&exit)
        );
        assert!(
            exit.stderr
                .contains("the peer confirmed nothing of the 0 line(s), "),
            "{mode}: {}",
            show(&exit)
        );
        bob.stderr_line("the listener's refusal", |l| {
            l.contains("refused a file: this listener has no --out DIR") && l.contains("notes.txt")
        })
        .await;
    }
}

/// A file cut off mid-transfer (the sender killed) is kept as `NAME.part`,
/// never under its own name, and the listener says so, naming the part
/// file. The coordinator relays 1 MiB/s per client, so the 64 MiB file
/// takes a minute and the sender is killed as soon as the listener has
/// started on it; with a 2 s idle timeout the coordinator soon reports the
/// killed sender lost and the listener's stream fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_file_is_kept_as_part() {
    let state = tempdir();
    let (coord, ca) = Coord::start_dev(
        state.path(),
        &["--bytes-per-second", "1048576", "--idle-timeout", "2"],
    )
    .await;
    let files = tempdir();
    let out = files.path().join("received");
    let path = files.path().join("big.bin");
    // Sparse: zeros to read, nothing on disk.
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(64 * 1024 * 1024))
        .expect("making the source file");

    let mut bob = listen_into(&coord.localhost(), &ca, &out).await;
    let mut alice = send_file(&coord.localhost(), &ca, "relay", &path);
    bob.stderr_line("`receiving a file`", |l| l.contains("receiving a file"))
        .await;
    let killed = alice.kill().await;
    assert!(
        !killed.status.success(),
        "alice finished: {}",
        show(&killed)
    );

    let part = out.join("big.bin.part");
    let line = bob
        .stderr_line("saying the file is incomplete", |l| {
            l.contains("incomplete")
        })
        .await;
    assert!(
        line.contains(" WARN ") && line.contains(&part.display().to_string()),
        "the line names the part file: {line}"
    );
    let names = file_names(&out);
    assert_eq!(names, vec![OsStr::new("big.bin.part").to_owned()]);
    let kept = std::fs::metadata(&part).expect("the part file").len();
    assert!(
        kept < 64 * 1024 * 1024,
        "the part file holds {kept} bytes, the whole file"
    );
    assert!(bob.running(), "the listener goes on");
    bob.kill().await;
}

/// A coordinator whose port is taken fails with a sentence that says so,
/// before it writes anything: its state directory gets no development CA
/// or key (and is not even made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_fails_before_any_state_is_written() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
    let port = taken.local_addr().expect("its address").port();
    let parent = tempdir();
    let state = parent.path().join("state");
    let listen = format!("quic/127.0.0.1:{port}");
    let exit = Proc::spawn(
        "qmesh-coordinator",
        [
            OsStr::new("run"),
            OsStr::new("--listen"),
            OsStr::new(&listen),
            OsStr::new("--state-dir"),
            state.as_os_str(),
        ],
        &[],
    )
    .finish()
    .await;
    assert!(!exit.status.success(), "must fail: {}", show(&exit));
    assert!(
        exit.stderr
            .contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && exit.stderr.contains("another program has this port"),
        "{}",
        show(&exit)
    );
    let written: Vec<_> = std::fs::read_dir(parent.path())
        .expect("listing the parent of the state directory")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(
        written.is_empty(),
        "written before the bind failed: {written:?}\n{}",
        show(&exit)
    );
    drop(taken);
}

/// Test 6: `qmesh demo` runs a whole exchange in one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs() {
    let exit = Proc::spawn("qmesh", ["demo"], &[]).finish().await;
    assert!(exit.status.success(), "demo failed: {}", show(&exit));
    for word in ["alice", "bob", "closed"] {
        assert!(
            exit.stdout.contains(word),
            "demo output lacks {word:?}: {}",
            show(&exit)
        );
    }
}

/// Wait until `listener` says it is back with its coordinator.
async fn reconnected(listener: &mut Proc) {
    listener
        .stderr_line("`qmesh: reconnected to`", |l| {
            l.starts_with("qmesh: reconnected to")
        })
        .await;
}

/// `qmesh send` of `line` to bob through `coord` succeeds, and bob prints it.
async fn line_arrives(coord: &Coord, ca: &Path, bob: &mut Proc, line: &str) {
    let mut alice = qmesh(
        &coord.localhost(),
        ca,
        &["--name", "alice", "send", "mesh/bob!chat"],
    );
    alice.feed_stdin(format!("{line}\n").as_bytes()).await;
    let exit = alice.finish().await;
    assert!(exit.status.success(), "send: {}", show(&exit));
    assert_eq!(bob.stdout_line(&format!("`{line}`"), |_| true).await, line);
}

/// Test 7: SIGTERM stops the coordinator cleanly; its clients hear why,
/// stay up, and are back once it runs again on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_and_a_restart_a_listener_is_back_and_receives() {
    let state = tempdir();
    let (mut coord, ca) = start_dev(state.path()).await;
    let mut bob = qmesh(
        &coord.localhost(),
        &ca,
        &["--name", "bob", "listen", "chat"],
    );
    bob.ready().await;

    coord.proc.terminate();
    let exit = coord.proc.finish().await;
    assert_eq!(
        exit.status.code(),
        Some(0),
        "coordinator after SIGTERM: {}",
        show(&exit)
    );
    let line = bob
        .stderr_line("`qmesh: reconnecting to`", |l| {
            l.starts_with("qmesh: reconnecting to")
        })
        .await;
    assert!(line.contains("coordinator shutting down"), "{line}");
    assert!(bob.running(), "the listener stays up");

    let (again, _) = Coord::start_dev_at(state.path(), &coord.v4(), &[] as &[&OsStr]).await;
    reconnected(&mut bob).await;
    line_arrives(&again, &ca, &mut bob, "after the restart").await;
}

/// SIGTERM drains: the coordinator tells its clients it is going away,
/// lets a live `send` go on until it is done, then exits 0 without
/// waiting for the rest of its drain deadline; the listener reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_live_send_finish_then_the_coordinator_exits_0() {
    let state = tempdir();
    let (mut coord, ca) = Coord::start_dev(state.path(), &["--drain", "300s"]).await;
    let mut bob = qmesh(
        &coord.localhost(),
        &ca,
        &["--name", "bob", "listen", "chat"],
    );
    bob.ready().await;
    let mut alice = qmesh(
        &coord.localhost(),
        &ca,
        &["--name", "alice", "send", "mesh/bob!chat"],
    );
    alice.write_stdin(b"one\n").await;
    assert_eq!(bob.stdout_line("`one`", |_| true).await, "one");

    coord.proc.terminate();
    let line = bob
        .stderr_line("`qmesh: … is going away`", |l| {
            l.starts_with("qmesh: ") && l.contains("is going away")
        })
        .await;
    assert!(line.contains("300000 ms"), "{line}");
    // The channel still carries lines during the drain.
    alice.write_stdin(b"two\n").await;
    assert_eq!(bob.stdout_line("`two`", |_| true).await, "two");
    assert!(
        coord.proc.running(),
        "the coordinator waits for the live channel"
    );
    alice.feed_stdin(b"three\n").await;
    let sent = alice.finish().await;
    assert!(
        sent.status.success(),
        "send during a drain: {}",
        show(&sent)
    );
    assert_eq!(bob.stdout_line("`three`", |_| true).await, "three");
    // The last channel ended: the coordinator stops long before 300 s.
    let exit = coord.proc.finish().await;
    assert_eq!(exit.status.code(), Some(0), "coordinator: {}", show(&exit));
    let line = bob
        .stderr_line("`qmesh: reconnecting to`", |l| {
            l.starts_with("qmesh: reconnecting to")
        })
        .await;
    assert!(line.contains("coordinator shutting down"), "{line}");
    assert!(bob.running(), "the listener stays up");
}

/// A listener killed mid-send: `send` exits non-zero and says how much the
/// listener confirmed, never more than it printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_listener_dies_says_what_the_listener_confirmed() {
    let state = tempdir();
    let (coord, ca) = Coord::start_dev(state.path(), &["--idle-timeout", "2"]).await;
    let mut bob = qmesh(
        &coord.localhost(),
        &ca,
        &["--name", "bob", "--idle-timeout", "2", "listen", "chat"],
    );
    bob.ready().await;
    let mut alice = qmesh(
        &coord.localhost(),
        &ca,
        &[
            "--name",
            "alice",
            "--idle-timeout",
            "2",
            "send",
            "mesh/bob!chat",
        ],
    );
    alice.write_stdin(b"one\n").await;
    assert_eq!(bob.stdout_line("`one`", |_| true).await, "one");
    alice.write_stdin(b"two\n").await;
    assert_eq!(bob.stdout_line("`two`", |_| true).await, "two");
    bob.kill().await;
    alice.feed_stdin(b"three\n").await;
    let exit = alice.finish().await;
    assert!(!exit.status.success(), "send succeeded: {}", show(&exit));
    let line = exit
        .stderr
        .lines()
        .find(|l| l.contains("the peer confirmed"))
        .unwrap_or_else(|| panic!("no confirmation figure: {}", show(&exit)));
    assert!(line.contains("of the 3 line(s), 11 byte(s) sent"), "{line}");
    let confirmed: u64 = line
        // The figure is in the last "the peer confirmed" (the first may
        // be "... before the peer confirmed everything").
        .rsplit("the peer confirmed ")
        .next()
        .and_then(|rest| rest.split(' ').next())
        // "nothing": the receipts had not come back when the listener died.
        .and_then(|n| {
            if n == "nothing" {
                Some(0)
            } else {
                n.parse().ok()
            }
        })
        .unwrap_or_else(|| panic!("no line count in {line}"));
    assert!(confirmed <= 2, "more confirmed than printed: {line}");
}

/// Graceful restart during a file transfer: the coordinator relays 1 MiB/s,
/// so a 64 MiB file cannot finish within a 1 s drain. The sender is told
/// the transfer is incomplete, with nothing confirmed; the listener keeps
/// only `NAME.part`; the coordinator exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_cut_by_a_drain_is_reported_incomplete_and_nothing_confirmed() {
    let state = tempdir();
    let (mut coord, ca) = Coord::start_dev(
        state.path(),
        &["--bytes-per-second", "1048576", "--drain", "1s"],
    )
    .await;
    let files = tempdir();
    let out = files.path().join("received");
    let path = files.path().join("big.bin");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(64 * 1024 * 1024))
        .expect("making the source file");
    let mut bob = listen_into(&coord.localhost(), &ca, &out).await;
    let mut alice = send_file(&coord.localhost(), &ca, "relay", &path);
    bob.stderr_line("`receiving a file`", |l| l.contains("receiving a file"))
        .await;
    coord.proc.terminate();
    let exit = alice.finish().await;
    assert!(!exit.status.success(), "send succeeded: {}", show(&exit));
    assert!(
        exit.stderr
            .contains("the peer confirmed nothing of the 0 line(s), "),
        "{}",
        show(&exit)
    );
    let stopped = coord.proc.finish().await;
    assert_eq!(
        stopped.status.code(),
        Some(0),
        "coordinator: {}",
        show(&stopped)
    );
    bob.stderr_line("saying the file is incomplete", |l| {
        l.contains("incomplete")
    })
    .await;
    assert_eq!(
        file_names(&out),
        vec![OsStr::new("big.bin.part").to_owned()]
    );
}

/// A coordinator killed with SIGKILL says nothing: its listener notices the
/// silence by its heartbeats, keeps trying, and is back once a new
/// coordinator runs on the same port and state directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_and_a_restart_a_listener_is_back_and_receives() {
    let state = tempdir();
    let (mut coord, ca) = start_dev(state.path()).await;
    let mut bob = qmesh(
        &coord.localhost(),
        &ca,
        &[
            "--name",
            "bob",
            "--heartbeat",
            "1",
            "--heartbeat-misses",
            "2",
            "listen",
            "chat",
        ],
    );
    bob.ready().await;
    coord.proc.kill().await;
    let killed = Instant::now();
    let (again, _) = Coord::start_dev_at(state.path(), &coord.v4(), &[] as &[&OsStr]).await;
    let line = bob
        .stderr_line("`qmesh: reconnecting to`", |l| {
            l.starts_with("qmesh: reconnecting to")
        })
        .await;
    assert!(line.contains("silent"), "{line}");
    reconnected(&mut bob).await;
    eprintln!("listener back {:?} after the SIGKILL", killed.elapsed());
    line_arrives(&again, &ca, &mut bob, "after the kill").await;
}

/// A direct `send` goes on while the coordinator is away (its channel is
/// held on the direct connection), and when its peer dies the send exits
/// soon with a failure that says so, instead of waiting for more input
/// or for the direct connection's idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_send_outlives_the_coordinator_and_ends_when_its_peer_dies() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let mut bob = qmesh(&coord.v4(), &ca, &["--name", "bob", "listen", "chat"]);
    bob.ready().await;
    let mut alice = qmesh(
        &coord.v4(),
        &ca,
        &[
            "--name",
            "alice",
            "send",
            "--mode",
            "direct",
            "mesh/bob!chat",
        ],
    );
    // stdin stays open: alice waits for more lines.
    alice.write_stdin(b"one\n").await;
    assert_eq!(bob.stdout_line("one", |_| true).await, "one");

    let mut coord = coord;
    coord.proc.terminate();
    let stopped = coord.proc.finish().await;
    assert!(stopped.status.success(), "coordinator: {}", show(&stopped));
    alice
        .stderr_line("the reconnect", |l| l.starts_with("qmesh: reconnecting to"))
        .await;
    alice.write_stdin(b"two\n").await;
    assert_eq!(
        bob.stdout_line("a line sent with the coordinator away", |_| true)
            .await,
        "two"
    );
    let (again, _) = Coord::start_dev_at(state.path(), &coord.v4(), &[] as &[&OsStr]).await;
    reconnected(&mut alice).await;
    alice.write_stdin(b"three\n").await;
    assert_eq!(
        bob.stdout_line("a line sent after the restart", |_| true)
            .await,
        "three"
    );

    bob.kill().await;
    let killed = Instant::now();
    // stdin stays open until send has said why it stopped: closing it
    // first would let send finish normally if it has not seen the loss.
    alice
        .stderr_line("the channel's end", |l| {
            l.contains("ended before everything was sent")
        })
        .await;
    eprintln!(
        "send ended {:?} after its peer was killed",
        killed.elapsed()
    );
    let exit = alice.finish_within(QUICK).await;
    assert!(
        !exit.status.success(),
        "send after the peer died: {}",
        show(&exit)
    );
    drop(again);
}

/// Test 8: `certs` writes a CA and a coordinator certificate that `run
/// --cert --key` serves and clients trusting that CA accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_then_run_with_cert_and_key() {
    let dir = tempdir();
    make_certs(dir.path(), &["localhost", "127.0.0.1"]).await;
    for f in [
        "ca.pem",
        "ca-key.pem",
        "coordinator.pem",
        "coordinator-key.pem",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} was not written");
    }
    let cert = dir.path().join("coordinator.pem");
    let key = dir.path().join("coordinator-key.pem");
    let ca = dir.path().join("ca.pem");
    let mut coord = Coord::start(&[
        OsStr::new("--cert"),
        cert.as_os_str(),
        OsStr::new("--key"),
        key.as_os_str(),
    ])
    .await;

    // By IP address (127.0.0.1 is in the certificate) and by name.
    let mut bob = qmesh(&coord.v4(), &ca, &["--name", "bob", "listen", "chat"]);
    bob.ready().await;
    let mut alice = qmesh(
        &coord.localhost(),
        &ca,
        &["--name", "alice", "send", "mesh/bob!chat"],
    );
    alice.feed_stdin(b"hi bob\n").await;
    let exit = alice.finish().await;
    assert!(exit.status.success(), "send: {}", show(&exit));
    let line = bob.stdout_line("`hi bob`", |_| true).await;
    assert_eq!(line, "hi bob");

    let exit = coord.proc.kill().await;
    assert!(
        !exit.stdout.contains("clients need the CA file"),
        "no development CA with --cert/--key: {}",
        show(&exit)
    );
}

/// A coordinator whose standard output nobody reads (the pipe's reading
/// end closed before it starts, as when a supervisor or a test stops
/// reading after the banner) prints its banner into the closed pipe and
/// serves on: a client joins and listens after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_whose_stdout_is_closed_serves_on() {
    let state = tempdir();
    let port = qmesh_integration_tests::programs::free_udp_port();
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let mut cmd = tokio::process::Command::new(qmesh_integration_tests::bin("qmesh-coordinator"));
    cmd.args(["--log", "info", "run", "--listen"])
        .arg(format!("quic/$4:{port}"))
        .arg("--state-dir")
        .arg(state.path());
    for var in process::CLEARED_ENV {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting qmesh-coordinator");
    let mut stderr = process::Lines::read(child.stderr.take().expect("stderr"));
    // The open-mode warning comes after the whole stdout banner.
    let warned = qmesh_integration_tests::within(QUICK, "the open-mode warning", async {
        while let Some(line) = stderr.next().await {
            if line.starts_with("WARNING: auth mode is open") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        warned,
        "the coordinator ended before its banner was out: {}",
        stderr.all().await
    );
    let ca = state.path().join("ca.pem");
    let mut bob = qmesh(
        &format!("quic/$4:{port}"),
        &ca,
        &["--name", "bob", "listen", "chat"],
    );
    bob.ready().await;
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "the coordinator is still running"
    );
    let _ = child.kill().await;
}

/// Test 9: a second client under a connected client's name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_name_is_refused() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let mut first = qmesh(
        &coord.localhost(),
        &ca,
        &["--name", "bob", "listen", "chat"],
    );
    first.ready().await;

    // Another bob, with a key of its own (another state directory).
    let elsewhere = tempdir();
    let coordinator = coord.localhost();
    let exit = Proc::spawn(
        "qmesh",
        [
            OsStr::new("--coordinator"),
            OsStr::new(&coordinator),
            OsStr::new("--ca"),
            ca.as_os_str(),
            OsStr::new("--state-dir"),
            elsewhere.path().as_os_str(),
            OsStr::new("--name"),
            OsStr::new("bob"),
            OsStr::new("listen"),
            OsStr::new("chat"),
        ],
        &[],
    )
    .finish()
    .await;
    assert!(!exit.status.success(), "second bob: {}", show(&exit));
    assert!(
        exit.stderr.contains("taken"),
        "second bob's stderr: {}",
        show(&exit)
    );
    assert!(first.running(), "the first bob should still be running");
}

/// `qmesh broadcast GROUP`: two members exchange a line, each printing
/// every group message as `SENDER: TEXT` (its own included); `--count`
/// prints the member count; stdin EOF leaves with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_members_exchange_lines() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let joined = |l: &str| l.starts_with("qmesh: joined group room");
    let mut ann = qmesh(&coord.v4(), &ca, &["--name", "ann", "broadcast", "room"]);
    ann.stderr_line("`joined group`", joined).await;
    let mut ben = qmesh(&coord.v4(), &ca, &["--name", "ben", "broadcast", "room"]);
    let line = ben.stderr_line("`joined group`", joined).await;
    assert!(line.contains("2 members, policy lag"), "{line}");

    ann.write_stdin(b"hello from ann\n").await;
    for p in [&mut ben, &mut ann] {
        let got = p.stdout_line("ann's line", |_| true).await;
        assert_eq!(got, "ann: hello from ann");
    }
    ben.write_stdin(b"hi ann\n").await;
    for p in [&mut ann, &mut ben] {
        let got = p.stdout_line("ben's line", |_| true).await;
        assert_eq!(got, "ben: hi ann");
    }

    let counted = qmesh(
        &coord.v4(),
        &ca,
        &["--name", "counter", "broadcast", "room", "--count"],
    )
    .finish()
    .await;
    assert!(counted.status.success(), "count failed: {}", show(&counted));
    assert_eq!(counted.stdout.trim(), "2");

    for mut p in [ann, ben] {
        p.feed_stdin(b"").await;
        let exit = p.finish().await;
        assert!(exit.status.success(), "broadcast failed: {}", show(&exit));
    }
}

/// `qmesh completions SHELL` prints that shell's completion script, which
/// names the subcommands; bash reads the bash one without a syntax error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_for_bash_zsh_and_fish_name_the_subcommands() {
    for (shell, marker) in [
        ("bash", "complete -F _qmesh"),
        ("zsh", "#compdef qmesh"),
        ("fish", "complete -c qmesh"),
    ] {
        let exit = Proc::spawn("qmesh", ["completions", shell], &[])
            .finish()
            .await;
        assert!(exit.status.success(), "{shell}: {}", show(&exit));
        let script = &exit.stdout;
        assert!(script.contains(marker), "{shell}: no {marker:?}: {script}");
        for sub in ["listen", "send", "peers", "up", "completions"] {
            assert!(script.contains(sub), "{shell}: no {sub}: {script}");
        }
        // Flags are completed as well.
        assert!(script.contains("coordinator"), "{shell}: {script}");
        if shell == "bash" {
            let dir = tempdir();
            let file = dir.path().join("qmesh.bash");
            std::fs::write(&file, script).expect("writing the script");
            let checked = std::process::Command::new("bash")
                .arg("-n")
                .arg(&file)
                .output()
                .expect("running bash -n");
            assert!(
                checked.status.success(),
                "bash -n: {}",
                String::from_utf8_lossy(&checked.stderr)
            );
        }
    }
    let bad = Proc::spawn("qmesh", ["completions", "tcsh"], &[])
        .finish()
        .await;
    assert_eq!(bad.status.code(), Some(2), "{}", show(&bad));
}

/// `qmesh peers --json`: one JSON document, an array with an object per
/// client online (itself included) holding what the text lines show: its
/// name, and each interface's name, direction and version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_json_lists_each_client_and_its_interfaces() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let run = |args: &[&str]| qmesh(&coord.v4(), &ca, args);
    let mut bob = run(&["--name", "bob", "serve", "echo"]);
    bob.stderr_line("`serves echo`", |l| l.contains("bob serves echo"))
        .await;
    let mut carol = run(&["--name", "carol", "listen", "quiet"]);
    carol.ready().await;

    let listed = run(&["--name", "erin", "peers", "--json"]).finish().await;
    assert!(listed.status.success(), "{}", show(&listed));
    let doc: serde_json::Value = serde_json::from_str(&listed.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", show(&listed)));
    let list = doc.as_array().expect("an array");
    let mut names: Vec<&str> = list
        .iter()
        .map(|p| p["name"].as_str().expect("a name"))
        .collect();
    names.sort();
    assert_eq!(names, ["bob", "carol", "erin"], "{}", show(&listed));
    let of = |name: &str| {
        list.iter()
            .find(|p| p["name"] == name)
            .expect("listed")
            .clone()
    };
    let bob_json = of("bob");
    let interfaces = bob_json["interfaces"].as_array().expect("interfaces");
    assert_eq!(interfaces.len(), 1, "{bob_json}");
    assert_eq!(interfaces[0]["name"], "echo", "{bob_json}");
    assert_eq!(interfaces[0]["direction"], "both", "{bob_json}");
    assert!(interfaces[0]["version"].is_string(), "{bob_json}");
    assert_eq!(of("carol")["interfaces"], serde_json::json!([]));

    // The watch prints lines as they come: no single document.
    let both = run(&["--name", "erin", "peers", "--json", "--watch"])
        .finish()
        .await;
    assert_eq!(both.status.code(), Some(2), "{}", show(&both));
    assert!(
        both.stderr.contains("cannot be used with"),
        "{}",
        show(&both)
    );
    bob.kill().await;
    carol.kill().await;
}

/// `qmesh serve`, `request`, `peers [--watch]` and `describe` from a shell:
/// a request is echoed; a request nobody answers says its reply is missing
/// and exits non-zero; `peers` lists what each client offers, `--watch`
/// prints joins and leaves as they happen; `describe` prints the manifest;
/// a name that is not offered is refused with what is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_serve_peers_and_describe_from_a_shell() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let run = |args: &[&str]| qmesh(&coord.v4(), &ca, args);

    let mut bob = run(&["--name", "bob", "serve", "echo"]);
    bob.stderr_line("`serves echo`", |l| {
        l.contains("bob serves echo on mesh/bob!echo")
    })
    .await;
    let mut carol = run(&["--name", "carol", "listen", "quiet"]);
    carol.ready().await;

    let mut watcher = run(&["--name", "watcher", "peers", "--watch"]);
    let mut present = Vec::new();
    loop {
        let line = watcher.stdout_line("a present peer", |_| true).await;
        if line == "-- watching for changes" {
            break;
        }
        present.push(line);
    }
    present.sort();
    assert_eq!(present.len(), 3, "{present:?}");
    assert!(
        present[0].starts_with("bob: offers echo (both, v"),
        "{present:?}"
    );
    assert_eq!(present[1], "carol: declares no interfaces");
    assert_eq!(present[2], "watcher: declares no interfaces");

    let asked = run(&["--name", "alice", "request", "mesh/bob!echo", "ping"])
        .finish()
        .await;
    assert!(asked.status.success(), "request failed: {}", show(&asked));
    assert_eq!(asked.stdout.trim(), "ping");
    assert_eq!(
        watcher.stdout_line("alice joins", |_| true).await,
        "joined alice: declares no interfaces"
    );
    assert_eq!(
        watcher.stdout_line("alice leaves", |_| true).await,
        "left alice"
    );

    let unanswered = run(&[
        "--name",
        "dave",
        "request",
        "mesh/carol!quiet",
        "hello?",
        "--timeout-ms",
        "300",
    ])
    .finish()
    .await;
    assert!(
        !unanswered.status.success(),
        "a missing reply must fail: {}",
        show(&unanswered)
    );
    assert!(
        unanswered
            .stderr
            .contains("reply missing: no reply within 300 ms"),
        "{}",
        show(&unanswered)
    );
    assert!(unanswered.stdout.is_empty(), "{}", show(&unanswered));

    // Several requests: each reported once, answered or missing.
    let many = run(&[
        "--name",
        "dave",
        "request",
        "mesh/bob!echo",
        "hi",
        "--count",
        "5",
    ])
    .finish()
    .await;
    assert!(many.status.success(), "{}", show(&many));
    let mut lines: Vec<&str> = many.stdout.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "1 answered",
            "2 answered",
            "3 answered",
            "4 answered",
            "5 answered"
        ]
    );
    assert!(
        many.stderr
            .contains("5 requests to mesh/bob!echo: 5 answered, 0 missing"),
        "{}",
        show(&many)
    );
    let none = run(&[
        "--name",
        "dave",
        "request",
        "mesh/carol!quiet",
        "hello?",
        "--count",
        "3",
        "--timeout-ms",
        "300",
    ])
    .finish()
    .await;
    assert!(!none.status.success(), "{}", show(&none));
    let mut lines: Vec<&str> = none.stdout.lines().collect();
    lines.sort();
    assert_eq!(lines.len(), 3, "{}", show(&none));
    for (i, line) in lines.iter().enumerate() {
        assert!(
            line.starts_with(&format!("{} missing: ", i + 1))
                && line.contains("no reply within 300 ms"),
            "{line}"
        );
    }
    assert!(
        none.stderr.contains("0 answered, 3 missing"),
        "{}",
        show(&none)
    );

    let listed = run(&["--name", "erin", "peers"]).finish().await;
    assert!(listed.status.success(), "peers failed: {}", show(&listed));
    assert!(
        listed
            .stdout
            .lines()
            .any(|l| l.starts_with("bob: offers echo (both, v")),
        "{}",
        show(&listed)
    );

    let described = run(&["describe", "mesh/bob!echo"]).finish().await;
    assert!(
        described.status.success(),
        "describe failed: {}",
        show(&described)
    );
    assert!(
        described
            .stdout
            .starts_with("interface: echo\npurpose:   echo: answers every request"),
        "{}",
        show(&described)
    );
    let nope = run(&["describe", "mesh/bob!web"]).finish().await;
    assert!(!nope.status.success(), "{}", show(&nope));
    assert!(
        nope.stderr.contains("no such interface") && nope.stderr.contains("echo"),
        "{}",
        show(&nope)
    );

    for mut p in [bob, watcher] {
        p.signal("INT");
        let exit = p.finish().await;
        assert!(exit.status.success(), "after ^C: {}", show(&exit));
    }
    carol.kill().await;
}

/// SIGTERM to `qmesh listen` (a service): it leaves at once, closing its
/// session with the signal as the reason, and exits 0; the relayed channel
/// of the `qmesh send` feeding it ends with that reason (not after the idle
/// timeout as "silent"). SIGINT to a `qmesh send` (a one-shot command)
/// makes it leave and exit 1, saying it was stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_makes_a_client_leave_at_once_with_the_signal_as_reason() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    let mut bob = qmesh(
        &coord.localhost(),
        &ca,
        &["--name", "bob", "listen", "chat"],
    );
    bob.ready().await;
    let mut alice = qmesh(
        &coord.localhost(),
        &ca,
        &[
            "--name",
            "alice",
            "send",
            "--mode",
            "relay",
            "mesh/bob!chat",
        ],
    );
    alice.write_stdin(b"one\n").await;
    assert_eq!(bob.stdout_line("`one`", |_| true).await, "one");

    bob.terminate();
    let exit = bob.finish().await;
    assert_eq!(exit.status.code(), Some(0), "listen: {}", show(&exit));
    assert!(
        exit.stderr.contains("qmesh: SIGTERM: leaving"),
        "listen: {}",
        show(&exit)
    );
    // alice's send sees bob leave for the reason bob gave.
    let lost = alice
        .stderr_line("the channel's end", |l| l.contains("\"bob\""))
        .await;
    assert!(lost.contains("stopped by SIGTERM"), "{lost}");

    // A second sender, stopped while it still reads its input.
    let mut carol = qmesh(
        &coord.localhost(),
        &ca,
        &["--name", "carol", "listen", "chat"],
    );
    carol.ready().await;
    let mut dave = qmesh(
        &coord.localhost(),
        &ca,
        &[
            "--name",
            "dave",
            "send",
            "--mode",
            "relay",
            "mesh/carol!chat",
        ],
    );
    dave.write_stdin(b"two\n").await;
    assert_eq!(carol.stdout_line("`two`", |_| true).await, "two");
    dave.signal("INT");
    let exit = dave.finish().await;
    assert_eq!(exit.status.code(), Some(1), "send: {}", show(&exit));
    assert!(
        exit.stderr
            .contains("stopped by SIGINT before the command finished"),
        "send: {}",
        show(&exit)
    );
    carol.kill().await;
    alice.kill().await;
}

/// A second signal exits at once, with 128 + its number, without waiting
/// for the leave the first one started. The process is stopped
/// (SIGSTOP) while SIGTERM and SIGINT are sent, so both are pending when
/// it runs again (SIGCONT) and the second is seen before the first's leave
/// can finish: whichever it takes second, it exits 130 or 143.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let state = tempdir();
    let (coord, ca) = start_dev(state.path()).await;
    for args in [
        &["--name", "bob", "listen", "chat"][..],
        &["--name", "erin", "peers", "--watch"][..],
    ] {
        let mut p = qmesh(&coord.localhost(), &ca, args);
        if args[2] == "listen" {
            p.ready().await;
        } else {
            p.stdout_line("the watch's start", |l| l == "-- watching for changes")
                .await;
        }
        p.signal("STOP");
        p.signal("TERM");
        p.signal("INT");
        p.signal("CONT");
        let exit = p.finish().await;
        assert!(
            matches!(exit.status.code(), Some(130 | 143)),
            "{args:?}: {}",
            show(&exit)
        );
        assert!(
            exit.stderr.contains("again: exiting now"),
            "{args:?}: {}",
            show(&exit)
        );
    }
}
