//! The coordinator's certificate by ACME (issue 20, point 2), against
//! Let's Encrypt's test server `pebble` on loopback (Debian package
//! `pebble`, installed by `.ci/run`; a missing pebble fails these tests
//! under `CI=true`).
//!
//! Clients trust pebble's root through `SSL_CERT_FILE` (the system's
//! trust store, no `--ca`) and reach `coord.test` at 127.0.0.1 with
//! `--resolve`. Pebble's mock DNS answers every name with 127.0.0.1, so
//! its HTTP-01 validation reaches the coordinator's `--acme-http`.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::ffi::OsStr;
use std::path::Path;

use qmesh_integration_tests::pebble::Pebble;
use qmesh_integration_tests::process::{show, Proc};
use qmesh_integration_tests::programs::free_udp_port;
use qmesh_integration_tests::target::CoordinatorProc;

/// `qmesh` with no `--ca`: the system store is `roots`; `coord.test` and
/// `other.test` at `port` resolve to 127.0.0.1.
fn qmesh(host: &str, port: u16, roots: &Path, state: &Path, args: &[&str]) -> Proc {
    let coordinator = format!("quic/{host}:{port}");
    let resolve = format!("{host}:{port}:127.0.0.1");
    let mut all: Vec<&OsStr> = vec![
        "--coordinator".as_ref(),
        coordinator.as_ref(),
        "--resolve".as_ref(),
        resolve.as_ref(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ];
    all.extend(args.iter().map(OsStr::new));
    Proc::spawn("qmesh", all, &[("SSL_CERT_FILE", roots.as_os_str())])
}

/// `run --single --acme coord.test` against `pebble`, answering the
/// challenge on `http01`, on UDP `port`.
fn acme_args(pebble: &Pebble, state: &Path, http01: u16) -> Vec<String> {
    vec![
        "--single".into(),
        "--state-dir".into(),
        state.display().to_string(),
        "--acme".into(),
        "coord.test".into(),
        "--acme-directory".into(),
        pebble.directory(),
        "--acme-ca".into(),
        pebble.listener_ca().display().to_string(),
        "--acme-contact".into(),
        "mailto:ops@coord.test".into(),
        "--acme-http".into(),
        format!("127.0.0.1:{http01}"),
        "--acme-retry".into(),
        "1s".into(),
    ]
}

/// `qmesh-coordinator info --json` for the coordinator on `state`.
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
    serde_json::from_str(&exit.stdout).unwrap()
}

/// The certificate `info` reports: (serial, fingerprint).
async fn certificate(state: &Path) -> (String, String) {
    let info = info(state).await;
    let c = &info["data"]["certificate"];
    assert_eq!(c["names"], serde_json::json!(["coord.test"]), "{info}");
    assert!(
        c["issuer"]
            .as_str()
            .unwrap()
            .contains("Pebble Intermediate CA"),
        "{info}"
    );
    (
        c["serial"].as_str().unwrap().to_lowercase(),
        c["fingerprint"].as_str().unwrap().to_owned(),
    )
}

/// Whether a client pinning `fingerprint` joins `port` (a new handshake
/// each time).
async fn joins_pinned(port: u16, fingerprint: &str, state: &Path) -> bool {
    let all: Vec<String> = vec![
        "--coordinator".into(),
        format!("quic/127.0.0.1:{port}"),
        "--fingerprint".into(),
        fingerprint.into(),
        "--state-dir".into(),
        state.display().to_string(),
        "--name".into(),
        "pinned".into(),
        "peers".into(),
    ];
    Proc::spawn("qmesh", all, &[])
        .finish()
        .await
        .status
        .success()
}

/// From nothing to a certificate, kept over a restart, renewed under a
/// live channel, and kept serving when the ACME server is gone:
///
/// - the coordinator orders a certificate for coord.test (pebble issues
///   one) before it serves; a client with no `--ca` joins
///   `quic/coord.test:PORT` and a message arrives; as `other.test` it is
///   refused for the name; `info` shows the names, issuer and serial;
/// - a restart uses the kept certificate: pebble issues nothing more, and
///   the listener comes back by itself;
/// - renewal (pebble's certificates live 30 s; renewal is due after 20)
///   replaces the certificate while a `qmesh send` goes on carrying lines
///   on one channel; pebble has issued a second serial, `info` shows it,
///   a client pinning the new fingerprint joins and one pinning the old is
///   refused;
/// - with pebble killed, the next renewal fails with a logged reason and
///   is retried, and new clients still join with the certificate in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_gets_keeps_and_renews_its_certificate_by_acme() {
    let Some(mut pebble) = tokio::task::spawn_blocking(|| Pebble::start(30))
        .await
        .unwrap()
    else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let root = pebble.root(work.path());
    let state = tempfile::tempdir().unwrap();
    let clients = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let listen = format!("quic/127.0.0.1:{port}");
    let args = acme_args(&pebble, state.path(), pebble.http01_port());

    // Build the binaries first, so the figure below is the coordinator's.
    let _ = qmesh_integration_tests::bin("qmesh-coordinator");
    let started = std::time::Instant::now();
    let mut coord = CoordinatorProc::start_at(&listen, &args).await;
    eprintln!(
        "ACME from start to serving with a new certificate: {:?}",
        started.elapsed()
    );
    let issued = pebble.issued();
    assert_eq!(issued.len(), 1, "one order: {}", pebble.log());
    let (serial, first_fp) = certificate(state.path()).await;
    assert_eq!(serial, issued[0]);

    let mut alice = qmesh(
        "coord.test",
        port,
        &root,
        clients.path(),
        &["--name", "alice", "listen", "chat"],
    );
    alice.ready().await;
    let mut bob = qmesh(
        "coord.test",
        port,
        &root,
        clients.path(),
        &["--name", "bob", "send", "mesh/alice!chat"],
    );
    bob.feed_stdin(b"over an ACME certificate\n").await;
    let sent = bob.finish().await;
    assert!(sent.status.success(), "{}", show(&sent));
    assert_eq!(
        alice.stdout_line("the first message", |_| true).await,
        "over an ACME certificate"
    );
    let wrong = qmesh(
        "other.test",
        port,
        &root,
        clients.path(),
        &["--name", "carol", "peers"],
    )
    .finish()
    .await;
    assert!(
        !wrong.status.success() && wrong.stderr.contains("not valid for name \"other.test\""),
        "{}",
        show(&wrong)
    );

    // A restart uses the kept certificate.
    coord.proc.terminate();
    let exit = coord.proc.finish().await;
    assert!(exit.status.success(), "{}", show(&exit));
    let mut coord = CoordinatorProc::start_at(&listen, &args).await;
    coord
        .proc
        .stderr_line("`using the certificate kept`", |l| {
            l.contains("ACME: using the certificate kept in")
        })
        .await;
    assert_eq!(pebble.issued().len(), 1, "no new order: {}", pebble.log());
    alice
        .stderr_line("`reconnected`", |l| l.contains("qmesh: reconnected"))
        .await;

    // Renewal under a live channel.
    let mut feed = qmesh(
        "coord.test",
        port,
        &root,
        clients.path(),
        &["--name", "feed", "send", "mesh/alice!chat"],
    );
    feed.write_stdin(b"before the renewal\n").await;
    assert_eq!(
        alice.stdout_line("the line before", |_| true).await,
        "before the renewal"
    );
    coord
        .proc
        .stderr_line("`certificate renewed`", |l| {
            l.contains("ACME: certificate renewed")
        })
        .await;
    eprintln!(
        "ACME renewed {:?} after the first start (certificates live 30 s)",
        started.elapsed()
    );
    feed.write_stdin(b"after the renewal\n").await;
    assert_eq!(
        alice.stdout_line("the line after", |_| true).await,
        "after the renewal"
    );
    let issued = pebble.issued();
    assert_eq!(issued.len(), 2, "{}", pebble.log());
    let (serial, new_fp) = certificate(state.path()).await;
    assert_eq!(serial, issued[1]);
    assert_ne!(new_fp, first_fp);
    let pins = tempfile::tempdir().unwrap();
    assert!(
        joins_pinned(port, &new_fp, pins.path()).await,
        "a new handshake must get the renewed certificate"
    );
    assert!(
        !joins_pinned(port, &first_fp, pins.path()).await,
        "a new handshake must no longer get the first certificate"
    );

    // The ACME server gone: the renewal fails, is retried, and the
    // certificate in force keeps serving.
    tokio::task::spawn_blocking(move || {
        pebble.stop();
        pebble
    })
    .await
    .unwrap();
    for attempt in ["first", "second"] {
        let line = coord
            .proc
            .stderr_line(&format!("the {attempt} failed renewal"), |l| {
                l.contains("ACME: cannot renew the certificate for coord.test")
            })
            .await;
        assert!(
            line.contains("keeps serving") && line.contains("trying again in"),
            "{line}"
        );
    }
    let late = qmesh(
        "coord.test",
        port,
        &root,
        clients.path(),
        &["--name", "late", "peers"],
    )
    .finish()
    .await;
    assert!(late.status.success(), "{}", show(&late));

    feed.feed_stdin(b"").await;
    let fed = feed.finish().await;
    assert!(fed.status.success(), "{}", show(&fed));
    alice.kill().await;
    coord.proc.terminate();
    let _ = coord.proc.finish().await;
}

/// A challenge the ACME server cannot validate (the coordinator answers
/// on another port than the one pebble connects to): the coordinator says
/// it has no certificate yet, with pebble's problem, tries again, and
/// serves nothing meanwhile. An unreachable directory is said as plainly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_certificate_the_coordinator_says_why_retries_and_serves_nothing() {
    let Some(pebble) = tokio::task::spawn_blocking(|| Pebble::start(3600))
        .await
        .unwrap()
    else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let wrong_port = qmesh_integration_tests::programs::free_port();
    let mut args = vec![
        "run".to_owned(),
        "--listen".into(),
        format!("quic/127.0.0.1:{}", free_udp_port()),
    ];
    args.extend(acme_args(&pebble, state.path(), wrong_port));
    let mut coord = Proc::spawn("qmesh-coordinator", &args, &[]);
    for attempt in ["first", "second"] {
        let line = coord
            .stderr_line(&format!("the {attempt} failed order"), |l| {
                l.contains("ACME: no certificate yet for coord.test")
            })
            .await;
        assert!(
            line.contains("urn:ietf:params:acme:error:") && line.contains("trying again in"),
            "the line must carry the ACME problem: {line}"
        );
    }
    let exit = coord.kill().await;
    assert!(
        !exit.stdout.contains("listening on"),
        "nothing may be served without a certificate: {}",
        show(&exit)
    );
    assert_eq!(pebble.issued().len(), 0, "{}", pebble.log());

    // A directory nothing answers at.
    let state = tempfile::tempdir().unwrap();
    let closed = qmesh_integration_tests::programs::free_port();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--listen".into(),
        format!("quic/127.0.0.1:{}", free_udp_port()),
    ];
    args.extend(acme_args(&pebble, state.path(), pebble.http01_port()));
    let at = args.iter().position(|a| a == "--acme-directory").unwrap();
    args[at + 1] = format!("https://127.0.0.1:{closed}/dir");
    let mut coord = Proc::spawn("qmesh-coordinator", &args, &[]);
    let line = coord
        .stderr_line("the unreachable directory", |l| {
            l.contains("ACME: no certificate yet for coord.test")
        })
        .await;
    assert!(
        line.contains(&format!("127.0.0.1:{closed}")),
        "the line must name the directory: {line}"
    );
    coord.kill().await;
}
