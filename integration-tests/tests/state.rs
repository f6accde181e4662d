//! The state directory is held by one coordinator at a time, and its
//! one-use tokens are decided in one place (issue 20, point 4).
//!
//! A second coordinator on a held directory refuses to start and names
//! the holder; the first goes on. Twenty clients enrolling at once with
//! one token get one certificate between them.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::ffi::OsStr;
use std::path::Path;

use qmesh_integration_tests::process::{self, show, Proc};
use qmesh_integration_tests::target::CoordinatorProc;

async fn token(dir: &Path, pattern: &str) -> String {
    let exit = Proc::spawn(
        "qmesh-coordinator",
        [
            OsStr::new("token"),
            OsStr::new("create"),
            OsStr::new("--name"),
            OsStr::new(pattern),
            OsStr::new("--ttl"),
            OsStr::new("10m"),
            OsStr::new("--state-dir"),
            dir.as_os_str(),
        ],
        &[],
    )
    .finish()
    .await;
    assert!(exit.status.success(), "token create: {}", show(&exit));
    exit.stdout.trim().to_owned()
}

/// A second `run` on a held state directory (another port, so that only
/// the directory is shared) exits 1 naming the first one's pid; the first
/// still admits a client and carries a message afterwards. Then 20
/// concurrent enrollments with one token (for `ci-*`, each under its own
/// name) end with exactly one enrolled client, and the others told the
/// token was already used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_coordinator_holds_a_state_directory_and_a_token_enrolls_once() {
    let dir = tempfile::tempdir().unwrap();
    // Under a leader (no --single): the leader holds the directory.
    let (mut first, ca) =
        CoordinatorProc::start_dev(dir.path(), &["--auth", "token", "--max-crashes", "1"]).await;
    let leader_pid = first.proc.pid();

    let mut second = Proc::spawn(
        "qmesh-coordinator",
        [
            OsStr::new("run"),
            OsStr::new("--listen"),
            OsStr::new("quic/127.0.0.1:0"),
            OsStr::new("--auth"),
            OsStr::new("token"),
            OsStr::new("--state-dir"),
            dir.path().as_os_str(),
        ],
        &[],
    );
    let refused = second.finish().await;
    assert_eq!(refused.status.code(), Some(1), "{}", show(&refused));
    assert!(
        refused.stderr.contains("is in use by another coordinator")
            && refused.stderr.contains(&format!("(pid {leader_pid})")),
        "the refusal must name the holder, pid {leader_pid}: {}",
        show(&refused)
    );
    // --single is refused the same way.
    let mut single = Proc::spawn(
        "qmesh-coordinator",
        [
            OsStr::new("run"),
            OsStr::new("--single"),
            OsStr::new("--listen"),
            OsStr::new("quic/127.0.0.1:0"),
            OsStr::new("--state-dir"),
            dir.path().as_os_str(),
        ],
        &[],
    );
    let refused = single.finish().await;
    assert_eq!(refused.status.code(), Some(1), "{}", show(&refused));
    assert!(
        refused.stderr.contains(&format!("(pid {leader_pid})")),
        "{}",
        show(&refused)
    );
    assert!(first.proc.running(), "the first coordinator must go on");

    // Twenty enrollments at once with one token.
    let coordinator = format!("quic/127.0.0.1:{}", first.port);
    let shared = token(dir.path(), "ci-*").await;
    let clients = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for i in 0..20 {
        let state = clients.path().join(format!("c{i}"));
        let name = format!("ci-{i}");
        runs.push(process::qmesh(
            &coordinator,
            &ca,
            &state,
            &["--name", &name, "--token", &shared, "peers"],
        ));
    }
    let mut enrolled = Vec::new();
    for (i, run) in runs.iter_mut().enumerate() {
        let exit = run.finish().await;
        if exit.status.success() {
            enrolled.push(i);
        } else {
            assert!(
                exit.stderr.contains("already used"),
                "ci-{i} failed for another reason than the used token: {}",
                show(&exit)
            );
        }
    }
    assert_eq!(
        enrolled.len(),
        1,
        "exactly one enrollment must win: {enrolled:?}"
    );
    let winner = enrolled[0];
    // The losers hold no issued certificate: without the token they are
    // asked for one.
    let loser = (0..20).find(|i| *i != winner).unwrap();
    let state = clients.path().join(format!("c{loser}"));
    let name = format!("ci-{loser}");
    let refused = process::qmesh(&coordinator, &ca, &state, &["--name", &name, "peers"])
        .finish()
        .await;
    assert!(
        !refused.status.success() && refused.stderr.contains("ask the operator for a token"),
        "{}",
        show(&refused)
    );

    // The first coordinator is undisturbed: the winner joins again with
    // its issued certificate and no token.
    let state = clients.path().join(format!("c{winner}"));
    let name = format!("ci-{winner}");
    let again = process::qmesh(&coordinator, &ca, &state, &["--name", &name, "peers"])
        .finish()
        .await;
    assert!(again.status.success(), "{}", show(&again));

    first.proc.terminate();
    let exit = first.proc.finish().await;
    assert!(exit.status.success(), "{}", show(&exit));
}
