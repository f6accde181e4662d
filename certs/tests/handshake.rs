//! Real QUIC handshakes over loopback between quinn endpoints configured by
//! this crate.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use qmesh_certs::{
    client_config, client_config_with_identity, server_config, Ca, Fingerprint, Identity, Trust,
    VerifyReport,
};
use quinn::Endpoint;
use tokio::time::timeout;

/// Upper bound for every single await in these tests.
const STEP: Duration = Duration::from_secs(10);

/// Starts a server presenting `identity` on 127.0.0.1 and returns its
/// address. It accepts connections until the test's runtime ends.
async fn start_server(identity: &Identity) -> (Endpoint, SocketAddr) {
    let config = server_config(identity).unwrap();
    let endpoint = Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        while let Ok(Some(incoming)) = timeout(STEP * 3, accepting.accept()).await {
            tokio::spawn(async move {
                if let Ok(Ok(conn)) = timeout(STEP, incoming).await {
                    // Answer each stream with what it carried, after
                    // `echo:`: proof that this side is up too.
                    while let Ok(Ok((mut send, mut recv))) = timeout(STEP, conn.accept_bi()).await {
                        let Ok(Ok(asked)) = timeout(STEP, recv.read_to_end(1024)).await else {
                            break;
                        };
                        let _ = send.write_all(b"echo:").await;
                        let _ = send.write_all(&asked).await;
                        let _ = send.finish();
                        let _ = timeout(STEP, send.stopped()).await;
                    }
                }
            });
        }
    });
    (endpoint, addr)
}

/// Connects with `config` to `addr` under `server_name`.
async fn connect(
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint.connect_with(config, addr, server_name).unwrap();
    let result = timeout(STEP, connecting)
        .await
        .expect("handshake timed out");
    if let Ok(conn) = &result {
        let protocol = conn
            .handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol;
        assert_eq!(protocol.as_deref(), Some(&b"qmesh/1"[..]));
    }
    result
}

/// Connects, expects success and closes the connection again.
async fn expect_ok(
    config: quinn::ClientConfig,
    report: &VerifyReport,
    addr: SocketAddr,
    name: &str,
) {
    let conn = match connect(config, addr, name).await {
        Ok(conn) => conn,
        Err(e) => panic!(
            "handshake as {name:?} failed: {e}; report: {:?}",
            report.failure()
        ),
    };
    assert_eq!(report.failure(), None);
    // A server that refuses the client's certificate does so after the
    // client's side of the handshake completed: only a round trip shows
    // that both sides agree the connection is up.
    let round_trip = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(name.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1024).await.map_err(|e| e.to_string())
    };
    let answer = timeout(STEP, round_trip)
        .await
        .expect("the round trip timed out")
        .unwrap_or_else(|e| panic!("no round trip as {name:?}: {e}"));
    assert_eq!(answer, format!("echo:{name}").into_bytes());
    conn.close(0u32.into(), b"done");
}

/// Connects, expects failure and returns the report's sentence.
async fn expect_failure(
    config: quinn::ClientConfig,
    report: &VerifyReport,
    addr: SocketAddr,
    name: &str,
) -> String {
    let err = connect(config, addr, name)
        .await
        .expect_err("handshake should have failed");
    let failure = report
        .failure()
        .unwrap_or_else(|| panic!("no failure recorded for connection error {err}"));
    eprintln!("connection error: {err}\nreport: {failure}");
    failure
}

fn hosts() -> Vec<String> {
    ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec()
}

#[tokio::test]
async fn ca_trust_accepts_dns_and_ip_names() {
    let ca = Ca::generate("qmesh test CA").unwrap();
    let (_server, addr) = start_server(&ca.issue_server(&hosts()).unwrap()).await;
    let trust = Trust::Ca {
        certs: vec![ca.cert_der().clone()],
        source: "/test/ca.pem".to_owned(),
    };
    for name in ["localhost", "127.0.0.1"] {
        let (config, report) = client_config_with_identity(&trust, &client()).unwrap();
        expect_ok(config, &report, addr, name).await;
    }
}

#[tokio::test]
async fn ca_file_trust_works() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    let ca = Ca::generate("qmesh test CA").unwrap();
    ca.save(&cert, &key).unwrap();
    // A CA loaded back from disk issues certificates that chain to the file.
    let loaded = Ca::load(&cert, &key).unwrap();
    let (_server, addr) = start_server(&loaded.issue_server(&hosts()).unwrap()).await;
    let (config, report) =
        client_config_with_identity(&Trust::ca_file(&cert).unwrap(), &client()).unwrap();
    expect_ok(config, &report, addr, "localhost").await;
}

#[tokio::test]
async fn other_ca_is_rejected_with_unknown_issuer() {
    let ca = Ca::generate("real CA").unwrap();
    let other = Ca::generate("other CA").unwrap();
    let (_server, addr) = start_server(&ca.issue_server(&hosts()).unwrap()).await;
    let trust = Trust::Ca {
        certs: vec![other.cert_der().clone()],
        source: "/somewhere/other-ca.pem".to_owned(),
    };
    let (config, report) = client_config(&trust).unwrap();
    let failure = expect_failure(config, &report, addr, "localhost").await;
    assert!(failure.contains("/somewhere/other-ca.pem"), "{failure}");
    assert!(failure.contains("UnknownIssuer"), "{failure}");
    assert!(
        failure.starts_with("the coordinator's certificate did not verify"),
        "{failure}"
    );
}

#[tokio::test]
async fn wrong_host_name_is_rejected() {
    let ca = Ca::generate("qmesh test CA").unwrap();
    let (_server, addr) = start_server(&ca.issue_server(&hosts()).unwrap()).await;
    let trust = Trust::Ca {
        certs: vec![ca.cert_der().clone()],
        source: "/test/ca.pem".to_owned(),
    };
    let (config, report) = client_config(&trust).unwrap();
    let failure = expect_failure(config, &report, addr, "other.example").await;
    assert!(failure.contains("/test/ca.pem"), "{failure}");
    assert!(
        failure.contains("not valid for name \"other.example\""),
        "{failure}"
    );
    assert!(failure.contains("localhost"), "{failure}");
}

#[tokio::test]
async fn pinned_fingerprint_is_accepted_under_any_name() {
    let ca = Ca::generate("qmesh test CA").unwrap();
    let identity = ca.issue_server(&hosts()).unwrap();
    let (_server, addr) = start_server(&identity).await;
    let pin: Fingerprint = identity.fingerprint().to_string().parse().unwrap();
    for name in ["anything", "localhost"] {
        let (config, report) = client_config_with_identity(&Trust::Pinned(pin), &client()).unwrap();
        expect_ok(config, &report, addr, name).await;
    }
}

#[tokio::test]
async fn wrong_pin_is_rejected_naming_both_fingerprints() {
    let ca = Ca::generate("qmesh test CA").unwrap();
    let identity = ca.issue_server(&hosts()).unwrap();
    let (_server, addr) = start_server(&identity).await;
    // Pinning the CA instead of the server certificate is a likely mistake.
    let (config, report) = client_config(&Trust::Pinned(ca.fingerprint())).unwrap();
    let failure = expect_failure(config, &report, addr, "localhost").await;
    assert_eq!(
        failure,
        format!(
            "the coordinator's certificate has fingerprint {} but {} was pinned",
            identity.fingerprint(),
            ca.fingerprint()
        )
    );
}

#[tokio::test]
async fn client_identity_is_harmless_without_client_auth() {
    let ca = Ca::generate("qmesh test CA").unwrap();
    let (_server, addr) = start_server(&ca.issue_server(&hosts()).unwrap()).await;
    let client = ca.issue_client("alice").unwrap();
    let trust = Trust::Ca {
        certs: vec![ca.cert_der().clone()],
        source: "/test/ca.pem".to_owned(),
    };
    let (config, report) = client_config_with_identity(&trust, &client).unwrap();
    expect_ok(config, &report, addr, "localhost").await;
    let (config, report) = client_config_with_identity(
        &Trust::Pinned(Fingerprint::of(&unrelated_cert(&ca))),
        &client,
    )
    .unwrap();
    let failure = expect_failure(config, &report, addr, "localhost").await;
    assert!(failure.contains("was pinned"), "{failure}");
}

/// Some certificate that is not the server's.
fn unrelated_cert(ca: &Ca) -> rustls_pki_types::CertificateDer<'static> {
    ca.issue_client("not-the-server").unwrap().chain[0].clone()
}

/// A client certificate for the tests whose server requires one (every
/// [`server_config`] does).
fn client() -> Identity {
    Identity::self_signed("handshake-test-client").unwrap()
}

/// A client with no certificate completes its side of the handshake
/// against a server that requires one, and is refused only afterwards:
/// the round trip in [`expect_ok`] is what tells.
#[tokio::test]
async fn a_client_without_a_certificate_is_refused_after_its_handshake() {
    let ca = Ca::generate("qmesh test CA").unwrap();
    let (_server, addr) = start_server(&ca.issue_server(&hosts()).unwrap()).await;
    let trust = Trust::Ca {
        certs: vec![ca.cert_der().clone()],
        source: "/test/ca.pem".to_owned(),
    };
    let (config, _report) = client_config(&trust).unwrap();
    let conn = connect(config, addr, "localhost")
        .await
        .expect("the client's side of the handshake completes");
    let refused = timeout(STEP, async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"x").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1024).await.map_err(|e| e.to_string())
    })
    .await
    .expect("the refusal arrives");
    assert!(
        refused.is_err(),
        "a round trip without a client certificate: {refused:?}"
    );
}
