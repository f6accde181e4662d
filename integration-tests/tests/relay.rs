//! Relayed channels carry messages of any size, in order, both ways.

use qmesh_client::{ChannelEnd, Side};
use qmesh_integration_tests::{open_pair, payload, within, Mesh, STEP};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_both_ways_and_graceful_close() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair(&alice, &bob, "chat").await;

    let mut to_bob = within(STEP, "open stream", a.open_stream()).await.unwrap();
    to_bob.send(b"hello").await.unwrap();
    let mut at_bob = within(STEP, "accept stream", b.accept_stream())
        .await
        .unwrap()
        .unwrap();
    let got = within(STEP, "recv", at_bob.recv()).await.unwrap().unwrap();
    assert_eq!(&got[..], b"hello");

    let mut to_alice = b.open_stream().await.unwrap();
    to_alice.send(&payload(1, 100_000)).await.unwrap();
    to_alice.finish().await.unwrap();
    let mut at_alice = within(STEP, "accept", a.accept_stream())
        .await
        .unwrap()
        .unwrap();
    let got = within(STEP, "recv", at_alice.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, payload(1, 100_000));
    assert!(within(STEP, "eos", at_alice.recv())
        .await
        .unwrap()
        .is_none());

    to_bob.finish().await.unwrap();
    within(STEP, "close", a.close("all done")).await.unwrap();
    assert_eq!(
        within(STEP, "bob's end", b.ended()).await,
        ChannelEnd::Closed {
            by: Side::Peer,
            reason: "all done".into()
        }
    );
    assert_eq!(
        a.end(),
        Some(ChannelEnd::Closed {
            by: Side::Local,
            reason: "all done".into()
        })
    );
    mesh.coordinator.shutdown().await;
}
