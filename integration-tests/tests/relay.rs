//! Relayed channels carry messages of any size, in order, both ways.

use qmesh_client::{ChannelEnd, Side};
use qmesh_integration_tests::{
    connect, next_message, next_stream, open_pair, payload, within, within_ok, Mesh, STEP,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_both_ways_and_graceful_close() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair(&alice, &bob, "chat").await;

    let mut to_bob = within_ok(STEP, "open stream", a.open_stream()).await;
    to_bob.send(b"hello").await.unwrap();
    let mut at_bob = next_stream(&b).await;
    let got = next_message(&mut at_bob).await;
    assert_eq!(&got[..], b"hello");

    let mut to_alice = b.open_stream().await.unwrap();
    to_alice.send(&payload(1, 100_000)).await.unwrap();
    to_alice.finish().await.unwrap();
    let mut at_alice = next_stream(&a).await;
    let got = next_message(&mut at_alice).await;
    assert_eq!(got, payload(1, 100_000));
    assert!(within_ok(STEP, "eos", at_alice.recv()).await.is_none());

    to_bob.finish().await.unwrap();
    within_ok(STEP, "close", a.close("all done")).await;
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

/// Sizes from 1 B to 1 MiB: mostly small, every 97th up to 1 MiB.
fn size_of(i: u64) -> usize {
    let x = (i.wrapping_mul(2_654_435_761) >> 7) as usize;
    if i % 97 == 0 {
        1 + x % (1024 * 1024)
    } else {
        1 + x % 4096
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_mixed_messages_both_ways_in_order() {
    const N: u64 = 10_000;
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair(&alice, &bob, "bulk").await;

    // Each side sends N messages on one stream and checks the N it gets.
    let run = |me: qmesh_client::Channel, seed: u64, peer_seed: u64| async move {
        let send = async {
            let mut out = me.open_stream().await.unwrap();
            for i in 0..N {
                out.feed(&payload(seed + i, size_of(i))).await.unwrap();
            }
            out.finish().await.unwrap();
        };
        let recv = async {
            let mut inbox = me.accept_stream().await.unwrap().unwrap();
            for i in 0..N {
                let msg = inbox.recv().await.unwrap().unwrap();
                assert_eq!(msg.len(), size_of(i), "message {i} length");
                assert!(
                    msg == payload(peer_seed + i, size_of(i)),
                    "message {i} bytes differ"
                );
            }
            assert!(
                inbox.recv().await.unwrap().is_none(),
                "no message after {N}"
            );
        };
        tokio::join!(send, recv);
        me
    };
    let (a, b) = within(STEP * 3, "exchange", async {
        tokio::join!(run(a, 1_000_000, 2_000_000), run(b, 2_000_000, 1_000_000))
    })
    .await;
    within_ok(STEP, "close", a.close("done")).await;
    assert!(matches!(
        within(STEP, "end", b.ended()).await,
        ChannelEnd::Closed { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_64_mib_message() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair(&alice, &bob, "big").await;
    let big = payload(64, 64 * 1024 * 1024);
    let send = async {
        let mut out = a.open_stream().await.unwrap();
        out.send(&big).await.unwrap();
        out.finish().await.unwrap();
    };
    let recv = async {
        let mut inbox = b.accept_stream().await.unwrap().unwrap();
        inbox.recv().await.unwrap().unwrap()
    };
    let ((), got) = within(STEP * 2, "64 MiB", async { tokio::join!(send, recv) }).await;
    assert_eq!(got.len(), big.len());
    assert!(got == big, "64 MiB message differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_limit_are_refused_on_both_ends() {
    let mesh = Mesh::start().await;
    let mut small = mesh.config("small");
    small.max_message = 1024 * 1024;
    let small = connect(small).await;
    let big = mesh.client("big").await;
    // `on_big` is big's side of the channel, `on_small` small's.
    let (on_big, on_small) = open_pair(&big, &small, "limits").await;

    // The sender refuses to send past its own limit.
    let mut out = on_small.open_stream().await.unwrap();
    let err = out.send(&payload(1, 2 * 1024 * 1024)).await.unwrap_err();
    assert!(
        matches!(err, qmesh_client::SendError::TooLarge { .. }),
        "{err}"
    );

    // The receiver refuses a message past its limit and stops the stream.
    let mut out = on_big.open_stream().await.unwrap();
    // Wait for the stop rather than finishing: a finish may be accepted
    // before the stop travels back through the relay.
    let sending = async {
        let _ = out.send(&payload(2, 2 * 1024 * 1024)).await;
        out.stopped().await
    };
    let receiving = async {
        let mut inbox = on_small.accept_stream().await.unwrap().unwrap();
        inbox.recv().await
    };
    let (sent, got) = within(STEP, "too large", async {
        tokio::join!(sending, receiving)
    })
    .await;
    assert!(
        matches!(got, Err(qmesh_client::RecvError::TooLarge { len, max }) if len == 2 * 1024 * 1024 && max == 1024 * 1024),
        "{got:?}"
    );
    let code = quinn::VarInt::from_u32(qmesh_proto::codes::StreamCode::MessageTooLarge.code());
    assert_eq!(sent, Some(code));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_drops_its_stream_stops_the_writer_through_the_relay() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair(&alice, &bob, "stop").await;
    let mut out = a.open_stream().await.unwrap();
    out.send(b"one").await.unwrap();
    let mut inbox = next_stream(&b).await;
    assert_eq!(&next_message(&mut inbox).await[..], b"one");
    // Bob is done with this stream while alice still holds it open.
    drop(inbox);
    // Alice learns without writing again: the relay passes the stop back.
    let code = within(STEP, "stopped", out.stopped()).await;
    assert!(code.is_some(), "the stop did not reach the writer");
    assert!(out.send(b"two").await.is_err());
    // The channel itself is unaffected.
    assert!(a.end().is_none() && b.end().is_none());
}
