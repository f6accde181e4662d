//! A hostile exposer on a forwarding channel: garbage, or a frame over the
//! size limit, where its answer should be closes only that one forwarded
//! connection, with a line saying why; the route stays up.

use std::net::SocketAddr;

use qmesh_client::forward::{Endpoint, Forward, Stop};
use qmesh_client::{Address, Interface};
use qmesh_integration_tests::programs::free_port;
use qmesh_integration_tests::{connect, warnings, within, within_ok, Mesh, STEP};
use qmesh_proto::codec::write_frame;
use qmesh_proto::msg::PipeAnswer;
use qmesh_proto::ForwardKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Write `hi` through the forward at `addr` and read what comes back
/// until the connection ends.
async fn exchange(addr: SocketAddr) -> Vec<u8> {
    let mut s = within_ok(STEP, "connecting to the forward", TcpStream::connect(addr)).await;
    let _ = s.write_all(b"hi").await;
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    let _ = within(STEP, "the connection to end", s.read_to_end(&mut got)).await;
    got
}

#[tokio::test]
async fn a_bad_answer_on_a_pipe_closes_only_that_connection() {
    warnings::install();
    let mesh = Mesh::start().await;
    let mut config = mesh.config("bob");
    config.interfaces = vec![Interface::new("web", "hostile").with_forward(ForwardKind::Stream)];
    let bob = connect(config).await;
    let alice = mesh.client("alice").await;

    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let to = Address::mesh_channel("bob", "web").expect("address");
    let forward = Forward::new("web", Endpoint::Tcp(addr), to);
    let (up_tx, mut up) = mpsc::unbounded_channel();
    tokio::spawn(forward.run(alice.clone(), Stop::never(), move |line| {
        let _ = up_tx.send(line);
    }));

    // Bob takes the channel and answers its pipes: first with a length
    // prefix far over the frame limit, then with bytes that are no answer,
    // then properly, echoing what comes.
    let offer = within_ok(STEP, "the forward's channel", bob.accept()).await;
    let channel = within_ok(STEP, "accepting it", offer.accept()).await;
    let line = within_ok(STEP, "the route up line", up.recv()).await;
    assert!(line.starts_with("route web up: "), "{line}");
    let bob_side = tokio::spawn(async move {
        for n in 0.. {
            let Some(mut pipe) = channel.accept_pipe().await else {
                return;
            };
            let (send, recv) = pipe.halves();
            match n {
                0 => {
                    let _ = send.write_all(&[0xff; 8]).await;
                }
                1 => {
                    let _ = send.write_all(&[0, 0, 0, 3, 0xee, 0xee, 0xee]).await;
                }
                _ => {
                    write_frame(send, &PipeAnswer::Connected)
                        .await
                        .expect("answer");
                    let got = recv.read_to_end(1024).await.unwrap_or_default();
                    let _ = send.write_all(&got).await;
                    let _ = send.finish();
                }
            }
            // Keep the pipe open: the forwarder must not wait for its end.
            tokio::spawn(async move {
                let _keep = pipe;
                std::future::pending::<()>().await;
            });
        }
    });

    assert_eq!(exchange(addr).await, b"", "an oversized answer");
    assert!(
        warnings::logged(&[
            "closing a connection",
            "sent a bad answer",
            "exceeds the limit"
        ]),
        "no line for the oversized answer"
    );
    assert_eq!(exchange(addr).await, b"", "a garbage answer");
    assert!(
        warnings::logged(&["closing a connection", "sent a bad answer", "malformed"]),
        "no line for the garbage answer"
    );
    assert_eq!(
        exchange(addr).await,
        b"hi",
        "the route after two bad answers"
    );
    bob_side.abort();
}

#[tokio::test]
async fn an_exposer_flooding_a_relayed_pipe_is_cut_off_not_the_forwarder() {
    use qmesh_client::PathMode;
    use qmesh_coordinator::limit::RateLimits;
    use qmesh_integration_tests::open_pair_with;
    use std::time::Duration;

    let mesh = Mesh::start_with(|c| {
        c.rate = RateLimits {
            bytes_per_sec: Some(64 * 1024),
            messages_per_sec: None,
            burst: Duration::from_millis(250),
            flood_after: Duration::from_secs(1),
        };
    })
    .await;
    let (alice, bob) = tokio::join!(mesh.client("alice"), mesh.client("bob"));
    let (to_bob, from_alice) = open_pair_with(&alice, &bob, "web", PathMode::Relay).await;
    // Alice sends a few bytes on each pipe; bob answers each with 1 MiB:
    // 16 MiB from bob at a 64 KiB/s limit, far past one second of backlog.
    let mut pipes = Vec::new();
    for _ in 0..16 {
        let mut pipe = within_ok(STEP, "a pipe", to_bob.open_pipe()).await;
        let (send, _) = pipe.halves();
        send.write_all(b"get").await.expect("request");
        pipes.push(pipe);
    }
    let flood = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(mut pipe) = from_alice.accept_pipe().await {
            let (send, _) = pipe.halves();
            let _ = send.write_all(&vec![7u8; 1 << 20]).await;
            held.push(pipe);
        }
    });
    let why = within(STEP, "bob cut off", bob.closed()).await;
    assert!(why.contains("rate limit exceeded"), "{why}");
    // Alice, who sent 48 bytes, keeps her session.
    let _carol = mesh.client("carol").await;
    let peers = within_ok(STEP, "alice listing peers", alice.peers()).await;
    assert!(
        peers.iter().any(|p| p.name == "carol"),
        "alice's session is gone"
    );
    flood.abort();
    drop(pipes);
}
