//! Direct channels on loopback: the coordinator introduces two clients,
//! their data runs peer to peer, and channels fall back to the relay.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use qmesh_certs::Identity;
use qmesh_client::{Channel, ChannelEnd, Client, OpenError, Path, PathMode};
use qmesh_integration_tests::{
    carries, connect, open_pair_with, payload, within, within_ok, Mesh, STEP,
};
use qmesh_proto::codes::OpenFailCode;

async fn direct_soon(ch: &Channel) -> SocketAddr {
    let mut path = ch.watch_path();
    let seen = within_ok(
        STEP,
        "path becomes direct",
        path.wait_for(|p| matches!(p, Path::Direct { .. })),
    )
    .await;
    match *seen {
        Path::Direct { remote } => remote,
        Path::Relay => unreachable!(),
    }
}

async fn relay_soon(ch: &Channel) {
    let mut path = ch.watch_path();
    within_ok(
        STEP,
        "path falls back to the relay",
        path.wait_for(|p| *p == Path::Relay),
    )
    .await;
}

fn relayed_streams(mesh: &Mesh) -> u64 {
    mesh.coordinator
        .stats()
        .streams_relayed
        .load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_moves_data_peer_to_peer() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    assert!(alice.takes_direct() && bob.takes_direct());
    let (a, b) = open_pair_with(&alice, &bob, "bulk", PathMode::Direct).await;
    assert_eq!(a.mode(), PathMode::Direct);
    assert_eq!(b.mode(), PathMode::Direct);
    // The opener's open returns only once the direct path is up.
    assert_eq!(
        a.path(),
        Path::Direct {
            remote: bob.observed_addr()
        }
    );
    assert_eq!(direct_soon(&b).await, alice.observed_addr());

    let before = relayed_streams(&mesh);
    carries(&a, &b, &payload(7, 3 << 20)).await;
    carries(&b, &a, b"pong").await;
    assert_eq!(
        relayed_streams(&mesh),
        before,
        "no data stream may pass through the coordinator"
    );
    let links = alice.direct_links().borrow().clone();
    assert_eq!(links.get("bob"), Some(&bob.observed_addr()));

    within_ok(STEP, "close", a.close("done")).await;
    assert!(matches!(
        within(STEP, "bob's end", b.ended()).await,
        ChannelEnd::Closed { .. }
    ));
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_starts_relayed_and_moves_to_direct_with_an_event() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair_with(&alice, &bob, "chat", PathMode::Auto).await;
    // Ready at once, relayed, and usable before the direct path is up.
    let mut path = a.watch_path();
    carries(&a, &b, b"early").await;
    within_ok(STEP, "path event", path.changed()).await;
    direct_soon(&a).await;
    direct_soon(&b).await;

    let before = relayed_streams(&mesh);
    carries(&a, &b, &payload(3, 100_000)).await;
    carries(&b, &a, b"back").await;
    assert_eq!(relayed_streams(&mesh), before);
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_mode_never_goes_direct() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair_with(&alice, &bob, "chat", PathMode::Relay).await;
    let before = relayed_streams(&mesh);
    carries(&a, &b, b"via the coordinator").await;
    assert_eq!(relayed_streams(&mesh), before + 1);
    assert_eq!(a.path(), Path::Relay);
    assert!(alice.direct_links().borrow().is_empty());
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_per_pair_closed_after_the_grace_period() {
    let mesh = Mesh::start().await;
    let config = |name: &str| {
        let mut c = mesh.config(name);
        c.direct.grace = Duration::from_millis(200);
        c
    };
    let alice = connect(config("alice")).await;
    let bob = connect(config("bob")).await;
    let mut pairs = Vec::new();
    for name in ["one", "two", "three"] {
        pairs.push(open_pair_with(&alice, &bob, name, PathMode::Direct).await);
    }
    let remote = pairs[0].0.path();
    for (a, b) in &pairs {
        assert_eq!(a.path(), remote, "every channel uses the same connection");
        carries(a, b, a.name().as_bytes()).await;
    }
    assert_eq!(alice.direct_links().borrow().len(), 1);

    let mut links = alice.direct_links();
    for (a, b) in pairs {
        within_ok(STEP, "close", a.close("done")).await;
        drop((a, b));
    }
    within_ok(
        STEP,
        "link closes after the grace period",
        links.wait_for(|l| l.is_empty()),
    )
    .await;
    within_ok(
        STEP,
        "bob's side closes too",
        bob.direct_links().wait_for(|l| l.is_empty()),
    )
    .await;
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_direct_connection_falls_back_or_loses_direct_only_channels() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (a_auto, b_auto) = open_pair_with(&alice, &bob, "auto", PathMode::Auto).await;
    let (a_direct, b_direct) = open_pair_with(&alice, &bob, "strict", PathMode::Direct).await;
    direct_soon(&a_auto).await;
    direct_soon(&b_auto).await;

    assert!(bob.drop_direct("alice"), "bob had a direct connection");
    relay_soon(&a_auto).await;
    relay_soon(&b_auto).await;
    let before = relayed_streams(&mesh);
    carries(&a_auto, &b_auto, b"still here").await;
    carries(&b_auto, &a_auto, b"and back").await;
    assert_eq!(relayed_streams(&mesh), before + 2);

    for ch in [&a_direct, &b_direct] {
        match within(STEP, "direct-only channel ends", ch.ended()).await {
            ChannelEnd::Lost { reason } => assert!(reason.contains("direct path lost"), "{reason}"),
            ChannelEnd::Closed { reason, .. } => {
                assert!(reason.contains("direct path lost"), "{reason}")
            }
        }
    }
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_only_to_a_client_on_a_shared_endpoint_fails_clearly() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let endpoint =
        qmesh_certs::transport::client_endpoint("127.0.0.1:0".parse().expect("addr")).expect("ep");
    let bob = within_ok(
        STEP,
        "connect",
        Client::connect_on(Some(&endpoint), mesh.config("bob")),
    )
    .await;
    assert!(!bob.takes_direct());
    let err = within(
        STEP,
        "open",
        alice.open_with(&"mesh/bob!chat".parse().expect("address"), PathMode::Direct),
    )
    .await
    .expect_err("direct must fail");
    assert_eq!(err.code(), Some(OpenFailCode::DirectUnavailable), "{err}");
    assert!(
        err.to_string()
            .contains("\"bob\" cannot take direct channels"),
        "{err}"
    );
    // Auto still works, through the relay: the coordinator counts the
    // bytes, and both sides see the relay path.
    let (a, b) = open_pair_with(&alice, &bob, "chat", PathMode::Auto).await;
    let relayed = || {
        mesh.coordinator
            .stats()
            .bytes_relayed
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = relayed();
    carries(&a, &b, b"relayed").await;
    assert!(
        relayed() >= before + b"relayed".len() as u64,
        "the message did not pass through the coordinator"
    );
    assert_eq!(a.path(), Path::Relay);
    assert_eq!(b.path(), Path::Relay);
    mesh.coordinator.shutdown().await;
}

/// A client that connects to a direct endpoint with a certificate other
/// than the one the coordinator vouched for is refused in the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_endpoint_refuses_a_certificate_nobody_vouched_for() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair_with(&alice, &bob, "chat", PathMode::Direct).await;
    direct_soon(&b).await;

    // Mallory knows bob's address and certificate and claims to be alice,
    // with a key of her own: only bob's check stands between her and a
    // connection.
    let mallory = Identity::self_signed("alice").expect("identity");
    let bob_fp = bob.fingerprint();
    let (cfg, _) = qmesh_certs::direct_client_config(&mallory, bob_fp).expect("config");
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("ep");
    let attempt = within(
        STEP,
        "mallory dials bob",
        ep.connect_with(cfg, bob.observed_addr(), "qmesh-peer")
            .expect("dial"),
    )
    .await;
    let refused = match attempt {
        Err(e) => Some(e),
        // TLS 1.3: the client may finish before the server checks its
        // certificate; the server's refusal then closes the connection.
        Ok(conn) => Some(within(STEP, "refusal", conn.closed()).await),
    };
    let text = refused.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        text.contains("certificate") || text.contains("TLS") || text.contains("crypto"),
        "mallory must be refused by bob's certificate check, got: {text}"
    );
    // Alice's channel is unharmed.
    carries(&a, &b, b"still fine").await;
    mesh.coordinator.shutdown().await;
}

/// A client that reports someone else's address for itself cannot get a
/// peer to accept a foreign certificate: the dialer checks the fingerprint
/// the coordinator vouched for and keeps only the genuine connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_refuses_an_impostor_at_a_reported_address() {
    let mesh = Mesh::start().await;
    // An impostor endpoint that accepts anyone and presents its own cert.
    let impostor_id = Identity::self_signed("mallory").expect("identity");
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let server =
        qmesh_certs::direct_server_config(&impostor_id, Arc::new(|_| true)).expect("config");
    let impostor =
        quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let impostor_addr = impostor.local_addr().expect("addr");
    let counter = seen.clone();
    let accepting = tokio::spawn(async move {
        while let Some(incoming) = impostor.accept().await {
            if let Ok(connecting) = incoming.accept() {
                if connecting.await.is_ok() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });

    let bob = mesh.client("bob").await;
    let mut config = mesh.config("mallory");
    config.direct.advertise = vec![impostor_addr];
    let mallory = connect(config).await;
    // "bob" sorts before "mallory": bob dials every address mallory has,
    // the impostor's included.
    let (b, m) = open_pair_with(&bob, &mallory, "chat", PathMode::Direct).await;
    assert_eq!(
        b.path(),
        Path::Direct {
            remote: mallory.observed_addr()
        },
        "bob must end up on mallory's genuine endpoint"
    );
    carries(&b, &m, b"genuine").await;
    assert_eq!(
        seen.load(Ordering::Relaxed),
        0,
        "no handshake with the impostor may complete"
    );
    accepting.abort();
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_open_error_names_the_fix() {
    let err = OpenError::DirectUnavailable {
        peer: "bob".into(),
        reason: "no direct path to bob within 5 s (no answer)".into(),
    };
    let text = err.to_string();
    assert!(text.contains("bob") && text.contains("path auto"), "{text}");
}

/// `send_bytes` (no copy) and `feed` interleave on one stream, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_bytes_and_feed_keep_order_on_a_direct_stream() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair_with(&alice, &bob, "mix", PathMode::Direct).await;
    let big = bytes::Bytes::from(payload(9, 2 << 20));
    let send = async {
        let mut s = a.open_stream().await.expect("open stream");
        s.feed(b"small one").await.expect("feed");
        s.send_bytes(big.clone()).await.expect("send_bytes");
        s.feed(b"small two").await.expect("feed");
        s.finish().await.expect("finish");
    };
    let recv = async {
        let mut r = b.accept_stream().await.expect("accept").expect("stream");
        let mut got = Vec::new();
        while let Some(m) = r.recv().await.expect("recv") {
            got.push(m);
        }
        got
    };
    let ((), got) = within(STEP, "mixed stream", async { tokio::join!(send, recv) }).await;
    assert_eq!(got.len(), 3);
    assert_eq!(&got[0][..], b"small one");
    assert_eq!(got[1], big);
    assert_eq!(&got[2][..], b"small two");
    mesh.coordinator.shutdown().await;
}
