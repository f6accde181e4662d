//! `qmesh-soak` for two minutes: clients joining and leaving, channels,
//! numbered requests, a forward, `qmesh serve` peers killed with SIGKILL
//! and the coordinator restarted twice (SIGTERM, then SIGKILL). The tool
//! must pass every check it makes, and its summary must show the restarts,
//! the kills and no request lost. Its output is printed for
//! docs/benchmarks.md ("Soak").

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use qmesh_integration_tests::{bin, within_ok};
use tokio::process::Command;

/// The run's length, and the most it may take with its set-up and the
/// final quiet point.
const DURATION: &str = "120s";
const LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_minutes_of_churn_lose_nothing_and_the_coordinator_comes_back_twice() {
    let coordinator = bin("qmesh-coordinator");
    let dir = coordinator.parent().expect("the binaries' directory");
    let child = Command::new(env!("CARGO_BIN_EXE_qmesh-soak"))
        .args([
            "--duration",
            DURATION,
            "--restart-every",
            "30s",
            "--bin-dir",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting qmesh-soak");
    let out = within_ok(LIMIT, "qmesh-soak to finish", child.wait_with_output()).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- qmesh-soak stdout\n{stdout}--- stderr\n{stderr}");
    assert!(out.status.success(), "qmesh-soak failed: {}", out.status);

    let summary = summary(&stdout);
    let number = |key: &str| -> u64 {
        summary
            .get(key)
            .unwrap_or_else(|| panic!("no {key}= in the summary"))
            .parse()
            .unwrap_or_else(|_| panic!("{key}= is not a number"))
    };
    assert_eq!(summary.get("result").map(String::as_str), Some("PASS"));
    assert!(number("restarts") >= 2, "restarts: {summary:?}");
    assert!(number("kills") >= 1, "kills: {summary:?}");
    assert_eq!(number("lost"), 0, "lost: {summary:?}");
    assert_eq!(number("duplicates"), 0, "duplicates: {summary:?}");
    assert!(number("requests") > 0 && number("forward_conns") > 0);
}

/// The `key=value` fields of the `SUMMARY` line.
fn summary(stdout: &str) -> HashMap<String, String> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("SUMMARY "))
        .expect("a SUMMARY line");
    line.split_whitespace()
        .skip(1)
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
