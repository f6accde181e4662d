//! Sessions: unique names, trust, and channel-open failures that say why.

use std::time::{Duration, Instant};

use qmesh_certs::{Ca, Trust};
use qmesh_client::{Client, ConnectError, OpenError};
use qmesh_integration_tests::{connect, next_message, next_stream, within, within_ok, Mesh, STEP};
use qmesh_proto::codes::{OpenFailCode, RejectCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_name_is_rejected_then_free_once_its_holder_leaves() {
    let mesh = Mesh::start().await;
    let first = mesh.client("alice").await;
    let err = within(STEP, "dup", Client::connect(mesh.config("alice")))
        .await
        .unwrap_err();
    match &err {
        ConnectError::Rejected { code, message } => {
            assert_eq!(*code, RejectCode::NameTaken);
            assert!(message.contains("\"alice\""), "{message}");
        }
        other => panic!("expected NameTaken, got {other}"),
    }
    within(STEP, "leave", first.close("bye")).await;
    let again = within(STEP, "reuse", Client::connect(mesh.config("alice"))).await;
    assert!(
        again.is_ok(),
        "name not free after leave: {:?}",
        again.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_name_is_rejected_with_the_rules() {
    let mesh = Mesh::start().await;
    let err = within(
        STEP,
        "bad name",
        Client::connect(mesh.config("Alice Smith")),
    )
    .await
    .unwrap_err();
    match err {
        ConnectError::Rejected { code, message } => {
            assert_eq!(code, RejectCode::InvalidName);
            assert!(message.contains("a-z 0-9"), "{message}");
        }
        other => panic!("expected InvalidName, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_to_an_absent_peer_fails_at_once() {
    let mesh = Mesh::start().await;
    let mut config = mesh.config("alice");
    config.open_timeout = Duration::from_secs(600);
    let alice = connect(config).await;
    let started = Instant::now();
    let err = within(STEP, "open", alice.open_str("mesh/nobody!chat"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(OpenFailCode::PeerNotPresent), "{err}");
    assert!(err.to_string().contains("peer not present"), "{err}");
    assert!(err.to_string().contains("nobody"), "{err}");
    // Far below the 600 s open timeout: the failure did not wait for it.
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reaches_the_opener_with_its_reason() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let refuse = async {
        let offer = bob.accept().await.unwrap();
        offer.refuse("not today").await;
    };
    let (opened, ()) = within(STEP, "refuse", async {
        tokio::join!(alice.open_str("mesh/bob!chat"), refuse)
    })
    .await;
    let err = opened.unwrap_err();
    assert_eq!(err.code(), Some(OpenFailCode::Refused));
    assert!(err.to_string().contains("not today"), "{err}");
    // A channel to oneself is refused by the coordinator.
    let err = within(STEP, "self", alice.open_str("mesh/alice!chat"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(OpenFailCode::SelfChannel), "{err}");
    // A malformed address never leaves the client.
    let err = within(STEP, "bad address", alice.open_str("mesh/bob"))
        .await
        .unwrap_err();
    assert!(matches!(err, OpenError::Address(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_between_one_pair_and_same_names_from_different_peers_are_independent() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let carol = mesh.client("carol").await;
    let (a1, b1) = qmesh_integration_tests::open_pair(&alice, &bob, "chat").await;
    let (a2, b2) = qmesh_integration_tests::open_pair(&alice, &bob, "chat").await;
    let (c1, b3) = qmesh_integration_tests::open_pair(&carol, &bob, "chat").await;
    for (i, ch) in [&a1, &a2, &c1].into_iter().enumerate() {
        let mut s = ch.open_stream().await.unwrap();
        s.send(format!("from {i}").as_bytes()).await.unwrap();
        s.finish().await.unwrap();
    }
    for (i, ch) in [&b1, &b2, &b3].into_iter().enumerate() {
        let mut s = next_stream(ch).await;
        let m = next_message(&mut s).await;
        assert_eq!(m, format!("from {i}").as_bytes());
    }
    within_ok(STEP, "close a2", a2.close("second done")).await;
    assert!(matches!(
        within(STEP, "b2", b2.ended()).await,
        qmesh_client::ChannelEnd::Closed { .. }
    ));
    // The others are untouched.
    assert!(a1.end().is_none() && b1.end().is_none() && c1.end().is_none() && b3.end().is_none());
    let mut s = a1.open_stream().await.unwrap();
    s.send(b"still here").await.unwrap();
    let mut r = next_stream(&b1).await;
    assert_eq!(&next_message(&mut r).await[..], b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_from_another_ca_is_refused_naming_the_ca() {
    let mesh = Mesh::start().await;
    let other = Ca::generate("some other CA").unwrap();
    let mut config = mesh.config("alice");
    config.trust = Trust::Ca {
        certs: vec![other.cert_der().clone()],
        source: "/etc/qmesh/other-ca.pem".into(),
    };
    let err = within(STEP, "connect", Client::connect(config))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConnectError::Certificate(_)), "{text}");
    assert!(text.contains("/etc/qmesh/other-ca.pem"), "{text}");
    assert!(text.contains("did not verify"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_host_is_refused() {
    let ca = Ca::generate("name test CA").unwrap();
    let identity = ca.issue_server(&["coordinator.example".into()]).unwrap();
    let mesh = Mesh::start_with(|c| c.identity = identity).await;
    let mut config = mesh.config("alice");
    config.trust = Trust::Ca {
        certs: vec![ca.cert_der().clone()],
        source: "name test CA".into(),
    };
    let err = within(STEP, "connect", Client::connect(config))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConnectError::Certificate(_)), "{text}");
    assert!(text.contains("not valid for name \"localhost\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_fingerprint_is_trusted_and_a_wrong_one_refused() {
    let ca = Ca::generate("pin CA").unwrap();
    let identity = ca.issue_server(&["localhost".into()]).unwrap();
    let pin = identity.fingerprint();
    let mesh = Mesh::start_with(|c| c.identity = identity).await;
    let mut config = mesh.config("alice");
    config.trust = Trust::Pinned(pin);
    within_ok(STEP, "pinned", Client::connect(config)).await;
    let mut config = mesh.config("bob");
    config.trust = Trust::Pinned(Ca::generate("x").unwrap().fingerprint());
    let err = within(STEP, "wrong pin", Client::connect(config))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("was pinned"), "{err}");
}
