//! A client that is closed and dropped gives back its UDP socket: its own
//! endpoint is closed, so the direct-connection accept loop that holds a
//! clone of it ends too. (Before, each connect and drop kept one socket and
//! about 3 MB for the life of the process.)
//!
//! Alone in its test binary, so no other test opens descriptors meanwhile.

use std::time::Duration;

use qmesh_integration_tests::{within, Mesh, STEP};

/// This process's open descriptors. A machine where `/proc/self/fd`
/// cannot be read fails the test: counting nothing there would pass it
/// whatever the client does.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .expect("reading /proc/self/fd, which this test counts descriptors with")
}

#[tokio::test]
async fn a_dropped_client_gives_back_its_socket() {
    let mesh = Mesh::start().await;
    let warm = mesh.client("warm").await;
    warm.close("bye").await;
    drop(warm);
    let before = open_fds();
    for i in 0..20 {
        let c = mesh.client(&format!("c{i}")).await;
        c.close("bye").await;
        drop(c);
    }
    // The sockets close as the endpoint drivers finish; there is no event
    // to wait on for that, so poll the descriptor count with a deadline.
    within(STEP, "sockets given back", async {
        while open_fds() > before + 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
