//! One port served by two endpoints on two runtimes (`SO_REUSEPORT`,
//! `Coordinator::add_endpoint`): clients land on both, and channels between
//! clients on different endpoints carry messages both ways.

use qmesh_certs::transport::{bind_udp_shared, SOCKET_BUFFER};
use qmesh_certs::Ca;
use qmesh_client::Trust;
use qmesh_coordinator::config::Config;
use qmesh_coordinator::{Coordinator, Listener};
use qmesh_integration_tests::{carries, connect, init_tracing, open_pair};

/// Clients, each on an endpoint (a port) of its own. The kernel picks a
/// socket by the client's address and port: all 24 on one of the two
/// sockets would happen once in 2^23 runs.
const CLIENTS: usize = 24;

#[tokio::test(flavor = "current_thread")]
async fn clients_on_both_endpoints_of_one_port_reach_each_other() {
    init_tracing();
    // The second endpoint's runtime, on a thread of its own.
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let handle = second.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        second.block_on(async move {
            let _ = stopped.await;
        })
    });

    let ca = Ca::generate("qmesh test CA").expect("CA");
    let identity = ca
        .issue_server(&["localhost".into()])
        .expect("server certificate");
    let mut sockets =
        bind_udp_shared("127.0.0.1:0".parse().expect("addr"), SOCKET_BUFFER, 2).expect("bind");
    assert_eq!(sockets[0].local_addr().ok(), sockets[1].local_addr().ok());
    let listener = Listener::from_socket(sockets.remove(0)).expect("listener");
    let mut coordinator = Coordinator::on(listener, Config::new(identity)).expect("coordinator");
    coordinator
        .add_endpoint(sockets.remove(0), handle)
        .expect("second endpoint");
    let coordinator = coordinator.spawn();
    let address: qmesh_proto::Address =
        format!("quic/localhost:{}", coordinator.local_addr().port())
            .parse()
            .expect("address");
    let trust = Trust::Ca {
        certs: vec![ca.cert_der().clone()],
        source: "the test CA".into(),
    };

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let config =
            qmesh_client::ClientConfig::new(address.clone(), format!("c{i}"), trust.clone());
        clients.push(connect(config).await);
    }
    let held = coordinator.open_connections_by_endpoint();
    assert_eq!(held.len(), 2, "{held:?}");
    assert_eq!(held.iter().sum::<usize>(), CLIENTS, "{held:?}");
    assert!(
        held.iter().all(|&n| n > 0),
        "one endpoint holds every client: {held:?}"
    );

    // A ring of channels: with clients on both endpoints, some of them
    // join a client on one endpoint to a client on the other.
    for i in 0..CLIENTS {
        let (a, b) = open_pair(&clients[i], &clients[(i + 1) % CLIENTS], "ring").await;
        carries(&a, &b, format!("to {}", (i + 1) % CLIENTS).as_bytes()).await;
        carries(&b, &a, format!("back to {i}").as_bytes()).await;
    }

    coordinator.shutdown().await;
    let _ = stop.send(());
    thread.join().expect("second runtime's thread");
}
