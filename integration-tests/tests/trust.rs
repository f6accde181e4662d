//! How a client trusts its coordinator with neither `--ca` nor
//! `--fingerprint`: the system's trust store, as every TLS client does
//! (issue 20, point 1). Tests give the store a test root through
//! `SSL_CERT_FILE`, and reach a coordinator named `coord.test` on
//! loopback with `--resolve`, as curl's.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use qmesh_integration_tests::process::{show, Proc};
use qmesh_integration_tests::target::CoordinatorProc;

/// `qmesh-coordinator certs --out DIR --hosts HOST`: a CA and a
/// coordinator certificate for HOST; returns (ca, cert, key).
async fn certs(dir: &Path, host: &str) -> (PathBuf, PathBuf, PathBuf) {
    let exit = Proc::spawn(
        "qmesh-coordinator",
        [
            OsStr::new("certs"),
            OsStr::new("--out"),
            dir.as_os_str(),
            OsStr::new("--host"),
            OsStr::new(host),
        ],
        &[],
    )
    .finish()
    .await;
    assert!(exit.status.success(), "{}", show(&exit));
    (
        dir.join("ca.pem"),
        dir.join("coordinator.pem"),
        dir.join("coordinator-key.pem"),
    )
}

/// `qmesh` with no `--ca`, the system store being `roots`.
fn qmesh(coordinator: &str, roots: &Path, state: &Path, args: &[&str]) -> Proc {
    let mut all: Vec<&OsStr> = vec![
        "--coordinator".as_ref(),
        coordinator.as_ref(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ];
    all.extend(args.iter().map(OsStr::new));
    Proc::spawn("qmesh", all, &[("SSL_CERT_FILE", roots.as_os_str())])
}

/// A coordinator with a certificate for `coord.test` from a CA the
/// client's system store holds: a client without `--ca` dialling
/// `quic/coord.test:PORT` (resolved to 127.0.0.1 by `--resolve`) joins
/// and a message goes through; the same coordinator dialled as
/// `other.test` is refused for the name, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ca_the_system_store_is_trusted_and_the_name_is_checked() {
    let files = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certs(files.path(), "coord.test").await;
    let state = tempfile::tempdir().unwrap();
    let mut coord = CoordinatorProc::start(&[
        OsStr::new("--single"),
        OsStr::new("--cert"),
        cert.as_os_str(),
        OsStr::new("--key"),
        key.as_os_str(),
        OsStr::new("--state-dir"),
        state.path().as_os_str(),
    ])
    .await;
    let port = coord.port;
    let clients = tempfile::tempdir().unwrap();
    let named = format!("quic/coord.test:{port}");
    let resolve = format!("coord.test:{port}:127.0.0.1");

    let mut alice = qmesh(
        &named,
        &ca,
        clients.path(),
        &["--resolve", &resolve, "--name", "alice", "listen", "chat"],
    );
    alice.ready().await;
    let mut bob = qmesh(
        &named,
        &ca,
        clients.path(),
        &[
            "--resolve",
            &resolve,
            "--name",
            "bob",
            "send",
            "mesh/alice!chat",
        ],
    );
    bob.feed_stdin(b"trusted by the system store\n").await;
    let sent = bob.finish().await;
    assert!(sent.status.success(), "{}", show(&sent));
    assert_eq!(
        alice.stdout_line("the message", |_| true).await,
        "trusted by the system store"
    );

    // The same coordinator under another name: the certificate is not
    // for it.
    let other = format!("quic/other.test:{port}");
    let wrong = qmesh(
        &other,
        &ca,
        clients.path(),
        &[
            "--resolve",
            &format!("other.test:{port}:127.0.0.1"),
            "--name",
            "carol",
            "peers",
        ],
    )
    .finish()
    .await;
    assert!(!wrong.status.success(), "{}", show(&wrong));
    assert!(
        wrong.stderr.contains("not valid for name \"other.test\"")
            && wrong
                .stderr
                .contains("system's trust store (SSL_CERT_FILE="),
        "the refusal must name the name mismatch and the trust used: {}",
        show(&wrong)
    );
    alice.kill().await;
    coord.proc.terminate();
    let _ = coord.proc.finish().await;
}

/// The development certificate is from the coordinator's own CA, which
/// no system store holds: a client without `--ca` is refused (the
/// certificate's issuer is not a trusted root), told which trust was used
/// and to pass `--ca`; with
/// `--ca` the same client joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_development_certificate_needs_ca_and_the_refusal_says_so() {
    let state = tempfile::tempdir().unwrap();
    let (mut coord, dev_ca) = CoordinatorProc::start_dev(state.path(), &["--single"]).await;
    let files = tempfile::tempdir().unwrap();
    let (unrelated, _, _) = certs(files.path(), "elsewhere.test").await;
    let clients = tempfile::tempdir().unwrap();
    let addr = format!("quic/127.0.0.1:{}", coord.port);

    let refused = qmesh(
        &addr,
        &unrelated,
        clients.path(),
        &["--name", "alice", "peers"],
    )
    .finish()
    .await;
    assert!(!refused.status.success(), "{}", show(&refused));
    for part in [
        "system's trust store (SSL_CERT_FILE=",
        "invalid peer certificate",
        "pass --ca FILE",
    ] {
        assert!(
            refused.stderr.contains(part),
            "no {part:?}: {}",
            show(&refused)
        );
    }

    let mut with_ca = vec!["--ca", dev_ca.to_str().unwrap()];
    with_ca.extend(["--name", "alice", "peers"]);
    let joined = qmesh(&addr, &unrelated, clients.path(), &with_ca)
        .finish()
        .await;
    assert!(joined.status.success(), "{}", show(&joined));
    coord.proc.terminate();
    let _ = coord.proc.finish().await;
}

/// A root, an intermediate under it, and a leaf for `coord.test` under
/// the intermediate, written to `dir`: (root.pem, fullchain.pem,
/// leaf.pem, key.pem), the chain being leaf then intermediate.
fn chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca("qmesh test root");
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let mid_key = KeyPair::generate().unwrap();
    let mid_params = ca("qmesh test intermediate");
    let mid = mid_params.signed_by(&mid_key, &root_issuer).unwrap();
    let mid_issuer = Issuer::new(mid_params, mid_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec!["coord.test".to_owned()]).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "coord.test");
    let leaf = leaf_params.signed_by(&leaf_key, &mid_issuer).unwrap();
    let paths = (
        dir.join("root.pem"),
        dir.join("fullchain.pem"),
        dir.join("leaf.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, root.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem() + &mid.pem()).unwrap();
    std::fs::write(&paths.2, leaf.pem()).unwrap();
    std::fs::write(&paths.3, leaf_key.serialize_pem()).unwrap();
    paths
}

/// A certificate from an intermediate CA, as public CAs issue them: with
/// the full chain in --cert a client trusting only the root (through the
/// system store) joins; with the leaf alone it is refused with
/// `UnknownIssuer`, which names the missing link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_chain_is_trusted_and_a_leaf_without_its_intermediate_is_not() {
    let files = tempfile::tempdir().unwrap();
    let (root, full, leaf, key) = chain(files.path());
    let clients = tempfile::tempdir().unwrap();
    for (cert, joins) in [(&full, true), (&leaf, false)] {
        let state = tempfile::tempdir().unwrap();
        let mut coord = CoordinatorProc::start(&[
            OsStr::new("--single"),
            OsStr::new("--cert"),
            cert.as_os_str(),
            OsStr::new("--key"),
            key.as_os_str(),
            OsStr::new("--state-dir"),
            state.path().as_os_str(),
        ])
        .await;
        let port = coord.port;
        let exit = qmesh(
            &format!("quic/coord.test:{port}"),
            &root,
            clients.path(),
            &[
                "--resolve",
                &format!("coord.test:{port}:127.0.0.1"),
                "--name",
                "alice",
                "peers",
            ],
        )
        .finish()
        .await;
        if joins {
            assert!(exit.status.success(), "full chain: {}", show(&exit));
        } else {
            assert!(
                !exit.status.success() && exit.stderr.contains("UnknownIssuer"),
                "leaf alone: {}",
                show(&exit)
            );
        }
        coord.proc.terminate();
        let _ = coord.proc.finish().await;
    }
}
