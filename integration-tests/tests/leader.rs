//! The leader and its worker (`qmesh-coordinator run` without `--single`):
//! a killed worker replaced, its clients back; `restart-worker` during a
//! transfer, which finishes or is reported to its sender; a crash loop
//! that makes the leader give up with the worker's last words; SIGTERM to
//! the leader drains and exits 0.
//!
//! Every wait is bounded and waits for an event (a line of output, an exit).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::ffi::OsStr;
use std::path::Path;
use std::time::Instant;

use qmesh_integration_tests::payload;
use qmesh_integration_tests::process::{self, show, Proc};
use qmesh_integration_tests::programs::sha256_file;
use qmesh_integration_tests::target::CoordinatorProc;

/// `qmesh-coordinator COMMAND --state-dir DIR --json`: its `data`.
async fn ask(dir: &Path, command: &[&str]) -> serde_json::Value {
    let mut args: Vec<&OsStr> = command.iter().map(OsStr::new).collect();
    args.extend(["--state-dir".as_ref(), dir.as_os_str(), "--json".as_ref()]);
    let exit = Proc::spawn("qmesh-coordinator", args, &[]).finish().await;
    assert!(exit.status.success(), "{command:?}: {}", show(&exit));
    let doc: serde_json::Value = serde_json::from_str(&exit.stdout).unwrap();
    doc["data"].clone()
}

fn kill(pid: u64, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Ten SIGKILLs of the worker: each time a new worker serves the same
/// port (its listening line comes again), `info` counts the restart and
/// shows a new worker under the same leader, and a listening client comes
/// back under its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_replaced_and_its_clients_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let clients = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Each kill comes after the client is back (over 1 s): a crash
    // window of 1 s makes each the first in its window, replaced at once
    // (the default 60 s would back off and give up at the fifth).
    let (mut coord, ca) =
        CoordinatorProc::start_dev(&state, &["--drain", "1s", "--crash-window", "1s"]).await;
    let leader = u64::from(coord.proc.pid());
    let mut bob = process::qmesh(
        &coord.v4(),
        &ca,
        clients.path(),
        &["--name", "bob", "--heartbeat", "1", "listen", "chat"],
    );
    bob.ready().await;
    let info = ask(&state, &["info"]).await;
    assert_eq!(info["leader_pid"], leader, "{info}");
    assert_eq!(info["worker_restarts"], 0, "{info}");
    let mut worker = info["worker_pid"].as_u64().unwrap();
    assert_ne!(worker, leader);

    let mut took = Vec::new();
    for round in 1..=10u64 {
        kill(worker, "-KILL");
        let killed = Instant::now();
        coord
            .proc
            .stdout_line("the new worker's listening line", |l| {
                l.starts_with("qmesh-coordinator listening on")
            })
            .await;
        took.push(killed.elapsed());
        bob.stderr_line("bob back", |l| l.starts_with("qmesh: reconnected to"))
            .await;
        let info = ask(&state, &["info"]).await;
        assert_eq!(info["worker_restarts"], round, "{info}");
        assert_eq!(info["leader_pid"], leader, "{info}");
        let clients = ask(&state, &["clients"]).await;
        assert_eq!(clients[0]["name"], "bob", "{clients}");
        let new = info["worker_pid"].as_u64().unwrap();
        assert_ne!(new, worker, "a new worker");
        worker = new;
    }
    took.sort();
    eprintln!(
        "WORKER RESTART over 10 SIGKILLs: p50 {} ms, max {} ms",
        took[4].as_millis(),
        took[9].as_millis()
    );
    assert!(coord.proc.running(), "the leader is still up");

    // SIGTERM to the leader: the worker drains, both exit 0.
    coord.proc.terminate();
    let exit = coord.proc.finish().await;
    assert!(exit.status.success(), "{}", show(&exit));
    assert!(
        std::process::Command::new("kill")
            .args(["-0", &worker.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .code()
            != Some(0),
        "the worker is gone with its leader"
    );
    drop(bob);
}

/// A relayed transfer through a worker that is asked to restart: with a
/// long drain it finishes byte-exact; with a 1 s drain it is cut, and the
/// sender says so and exits 1. Either way the new worker takes clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_worker_during_a_transfer_finishes_it_or_tells_the_sender() {
    for (drain, finishes) in [("30s", true), ("1s", false)] {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // 2 MB/s per client: the 6 MiB transfer takes about 3 s.
        let (mut coord, ca) = CoordinatorProc::start_dev(
            &state,
            &["--drain", drain, "--bytes-per-second", "2000000"],
        )
        .await;
        let out = dir.path().join("received");
        let out_arg = out.display().to_string();
        let mut bob = process::qmesh(
            &coord.v4(),
            &ca,
            dir.path(),
            &["--name", "bob", "listen", "chat", "--out", &out_arg],
        );
        bob.ready().await;
        let file = dir.path().join("six.bin");
        std::fs::write(&file, payload(6, 6 << 20)).unwrap();
        let file_arg = file.display().to_string();
        let mut alice = process::qmesh(
            &coord.v4(),
            &ca,
            dir.path(),
            &[
                "--name",
                "alice",
                "send",
                "--mode",
                "relay",
                "mesh/bob!chat",
                "--file",
                &file_arg,
            ],
        );
        alice
            .stderr_line("the channel open", |l| l.contains("open after"))
            .await;
        let exit = Proc::spawn(
            "qmesh-coordinator",
            vec![
                OsStr::new("restart-worker"),
                "--state-dir".as_ref(),
                state.as_os_str(),
            ],
            &[],
        )
        .finish()
        .await;
        assert!(exit.status.success(), "restart-worker: {}", show(&exit));
        let sent = alice.finish().await;
        if finishes {
            assert!(sent.status.success(), "drain {drain}: {}", show(&sent));
            assert_eq!(
                sha256_file(&out.join("six.bin")),
                sha256_file(&file),
                "drain {drain}: the stored file differs"
            );
        } else {
            assert!(!sent.status.success(), "drain {drain}: {}", show(&sent));
            assert!(
                sent.stderr.contains("ended before"),
                "drain {drain}: the sender must say it was cut: {}",
                show(&sent)
            );
        }
        eprintln!(
            "RESTART-WORKER drain {drain}: send {}; {}",
            if sent.status.success() {
                "finished"
            } else {
                "reported incomplete"
            },
            sent.stderr
                .lines()
                .filter(|l| l.contains("confirmed"))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        // The new worker serves, counted as a restart.
        coord
            .proc
            .stdout_line("the new worker", |l| {
                l.starts_with("qmesh-coordinator listening on")
            })
            .await;
        bob.stderr_line("bob back", |l| l.starts_with("qmesh: reconnected to"))
            .await;
        let info = ask(&state, &["info"]).await;
        assert_eq!(info["worker_restarts"], 1, "{info}");
        drop(bob);
        coord.proc.terminate();
        let exit = coord.proc.finish().await;
        assert!(exit.status.success(), "{}", show(&exit));
    }
}

/// `restart-worker --binary` with a program that dies at once: the leader
/// replaces it with backoff, then gives up after five deaths within a
/// minute, exits 1 and quotes the last worker's last line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_makes_the_leader_give_up_with_the_workers_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut coord, _ca) = CoordinatorProc::start_dev(&state, &["--drain", "0s"]).await;
    let broken = dir.path().join("broken-worker");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'broken worker: cannot start' >&2\nexit 3\n",
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let exit = Proc::spawn(
        "qmesh-coordinator",
        vec![
            OsStr::new("restart-worker"),
            "--binary".as_ref(),
            broken.as_os_str(),
            "--state-dir".as_ref(),
            state.as_os_str(),
        ],
        &[],
    )
    .finish()
    .await;
    assert!(exit.status.success(), "restart-worker: {}", show(&exit));
    let exit = coord.proc.finish().await;
    assert_eq!(exit.status.code(), Some(1), "{}", show(&exit));
    assert!(
        exit.stderr.contains("died 5 times within 60 s")
            && exit.stderr.contains("broken worker: cannot start")
            && exit.stderr.contains("exit status 3"),
        "{}",
        show(&exit)
    );
    // Backoff: at once, then 100, 200 and 400 ms between the deaths.
    for wait in ["in 0 ms", "in 100 ms", "in 200 ms", "in 400 ms"] {
        assert!(
            exit.stderr.contains(&format!("starting a new one {wait}")),
            "the leader backs off ({wait}): {}",
            show(&exit)
        );
    }
}

/// `restart-worker` without a leader is refused and says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_worker_needs_a_leader() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_coord, _ca) = CoordinatorProc::start_dev(&state, &["--single"]).await;
    let exit = Proc::spawn(
        "qmesh-coordinator",
        vec![
            OsStr::new("restart-worker"),
            "--state-dir".as_ref(),
            state.as_os_str(),
        ],
        &[],
    )
    .finish()
    .await;
    assert!(!exit.status.success());
    assert!(exit.stderr.contains("--single"), "{}", show(&exit));
    let info = ask(&state, &["info"]).await;
    assert_eq!(info["leader_pid"], serde_json::Value::Null, "{info}");
}

/// `qmesh-coordinator completions SHELL` prints that shell's script,
/// naming the operator commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_name_the_operator_commands() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef qmesh-coordinator"),
        ("fish", "complete -c qmesh-coordinator"),
    ] {
        let exit = Proc::spawn("qmesh-coordinator", ["completions", shell], &[])
            .finish()
            .await;
        assert!(exit.status.success(), "{shell}: {}", show(&exit));
        for want in [marker, "restart-worker", "kick", "reload"] {
            assert!(exit.stdout.contains(want), "{shell} lacks {want:?}");
        }
    }
}
