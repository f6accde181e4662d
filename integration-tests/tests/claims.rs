//! Who holds a name: the same credential takes it back at once, another
//! credential is refused, exactly one of many concurrent claims wins, and
//! the coordinator's client and channel caps refuse with a code while
//! everyone else carries on.

use std::sync::Arc;

use qmesh_certs::Identity;
use qmesh_client::{Client, ConnectError};
use qmesh_integration_tests::{
    connect, next_message, next_stream, open_pair, within, within_ok, Mesh, STEP,
};
use qmesh_proto::codes::{OpenFailCode, RejectCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_credential_takes_its_name_back_and_another_is_refused() {
    let mesh = Mesh::start().await;
    let identity = Arc::new(Identity::self_signed("alice").expect("identity"));
    let mut config = mesh.config("alice");
    config.identity = Some(identity.clone());
    let old = connect(config.clone()).await;

    // The same key from a new socket (a client that changed networks).
    let new = within_ok(
        STEP,
        "reconnecting: the same credential must get its name back",
        Client::connect(config),
    )
    .await;
    let why = within(STEP, "old session ends", old.closed()).await;
    assert!(why.contains("replaced"), "old session: {why}");
    assert_ne!(new.session_id(), old.session_id());

    // Another key asking for the held name.
    let mut other = mesh.config("alice");
    other.identity = Some(Arc::new(Identity::self_signed("alice").expect("identity")));
    match within(STEP, "impostor", Client::connect(other)).await {
        Err(ConnectError::Rejected { code, message }) => {
            assert_eq!(code, RejectCode::NameTaken);
            assert!(message.contains("another credential"), "{message}");
        }
        Err(e) => panic!("expected NameTaken, got {e}"),
        Ok(_) => panic!("a different credential took a held name"),
    }
    // The holder is untouched.
    let bob = mesh.client("bob").await;
    let (_a, _b) = open_pair(&bob, &new, "still-alice").await;
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_a_hundred_concurrent_claims_wins() {
    let mesh = Mesh::start().await;
    let endpoint =
        qmesh_certs::transport::client_endpoint("127.0.0.1:0".parse().expect("addr")).expect("ep");
    let mut claims = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let mut config = mesh.config("contested");
        config.identity = Some(Arc::new(Identity::self_signed("contested").expect("id")));
        let ep = endpoint.clone();
        claims.spawn(async move { Client::connect_on(Some(&ep), config).await });
    }
    let (mut won, mut taken) = (Vec::new(), 0);
    while let Some(r) = within(STEP, "claims", claims.join_next()).await {
        match r.expect("task") {
            Ok(c) => won.push(c),
            Err(ConnectError::Rejected {
                code: RejectCode::NameTaken,
                ..
            }) => taken += 1,
            Err(e) => panic!("unexpected failure: {e}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one claim wins");
    assert_eq!(taken, 99);
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_after_the_cap_is_refused_and_the_others_carry_on() {
    let mesh = Mesh::start_with(|c| c.max_clients = Some(3)).await;
    let a = mesh.client("a").await;
    let b = mesh.client("b").await;
    let _c = mesh.client("c").await;
    match within(STEP, "fourth", Client::connect(mesh.config("d"))).await {
        Err(ConnectError::Rejected { code, message }) => {
            assert_eq!(code, RejectCode::Full);
            assert!(message.contains("maximum of 3"), "{message}");
        }
        Err(e) => panic!("expected Full, got {e}"),
        Ok(_) => panic!("the fourth client was admitted past the cap of 3"),
    }
    // Existing clients are unaffected.
    let (x, y) = open_pair(&a, &b, "after-cap").await;
    let mut s = x.open_stream().await.expect("stream");
    s.send(b"fine").await.expect("send");
    let mut r = next_stream(&y).await;
    assert_eq!(&next_message(&mut r).await[..], b"fine");
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_past_the_per_client_cap_are_refused_with_a_code() {
    let mesh = Mesh::start_with(|c| c.max_channels_per_client = 2).await;
    let a = mesh.client("a").await;
    let b = mesh.client("b").await;
    let first = open_pair(&a, &b, "one").await;
    let second = open_pair(&a, &b, "two").await;
    let err = within(STEP, "third", a.open_str("mesh/b!three"))
        .await
        .expect_err("past the cap");
    assert_eq!(err.code(), Some(OpenFailCode::TooManyChannels), "{err}");
    assert!(err.to_string().contains("close some first"), "{err}");
    // Closing one makes room.
    within_ok(STEP, "close", first.0.close("done")).await;
    drop(first);
    let offer = async {
        let o = b.accept().await.expect("offer");
        o.accept().await.expect("accept")
    };
    let (third, _) = within(STEP, "third again", async {
        tokio::join!(a.open_str("mesh/b!three"), offer)
    })
    .await;
    assert!(third.is_ok(), "{:?}", third.err());
    drop(second);
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_cannot_pass_the_channel_cap() {
    let mesh = Mesh::start_with(|c| c.max_channels_per_client = 2).await;
    let a = mesh.client("a").await;
    let b = mesh.client("b").await;
    // b accepts whatever it is offered.
    let acceptor = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Some(offer) = b.accept().await {
                if let Ok(ch) = offer.accept().await {
                    kept.push(ch);
                }
            }
            kept
        })
    };
    let mut opens = tokio::task::JoinSet::new();
    for i in 0..6 {
        let a = a.clone();
        opens.spawn(async move { a.open_str(&format!("mesh/b!c{i}")).await });
    }
    let (mut ok, mut capped) = (Vec::new(), 0);
    while let Some(r) = within(STEP, "opens", opens.join_next()).await {
        match r.expect("task") {
            Ok(ch) => ok.push(ch),
            Err(e) if e.code() == Some(OpenFailCode::TooManyChannels) => capped += 1,
            Err(e) => panic!("unexpected open failure: {e}"),
        }
    }
    assert_eq!(ok.len(), 2, "exactly the cap succeeds");
    assert_eq!(capped, 4);
    acceptor.abort();
    mesh.coordinator.shutdown().await;
}
