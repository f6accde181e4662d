//! Many clients, many channels at once: every message is delivered.

use std::collections::BTreeMap;

use qmesh_client::Client;
use qmesh_integration_tests::{payload, within, Mesh, STEP};

const CLIENTS: usize = 50;
const FANOUT: usize = 5;
const MESSAGES: u64 = 20;

fn seed(from: usize, to: usize, i: u64) -> u64 {
    ((from * 1000 + to) as u64) << 20 | i
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_each_open_five_channels_at_once() {
    let mesh = Mesh::start().await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(mesh.client(&format!("peer-{i:02}")).await);
    }

    // Every client accepts FANOUT channels and records what arrives on each.
    let mut receivers = Vec::new();
    for (me, client) in clients.iter().enumerate() {
        let client = client.clone();
        receivers.push(tokio::spawn(async move {
            let mut got = BTreeMap::new();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..FANOUT {
                let offer = client.accept().await.expect("offer");
                let from: usize = offer.peer()[5..].parse().expect("peer number");
                let ch = offer.accept().await.expect("accept");
                tasks.spawn(async move {
                    let mut inbox = ch.accept_stream().await.unwrap().unwrap();
                    let mut msgs = Vec::new();
                    while let Some(m) = inbox.recv().await.unwrap() {
                        msgs.push(m);
                    }
                    // The opener closes once its stream is through.
                    let end = ch.ended().await;
                    (from, msgs, end)
                });
            }
            while let Some(done) = tasks.join_next().await {
                let (from, msgs, end) = done.expect("receiver task");
                got.insert(from, (msgs, end));
            }
            (me, got)
        }));
    }

    // Every client opens channels to the next FANOUT clients, all at once.
    let mut senders = Vec::new();
    for (me, client) in clients.iter().enumerate() {
        for k in 1..=FANOUT {
            let to = (me + k) % CLIENTS;
            let client: Client = client.clone();
            senders.push(tokio::spawn(async move {
                let ch = client
                    .open_str(&format!("mesh/peer-{to:02}!fan"))
                    .await
                    .expect("open");
                let mut out = ch.open_stream().await.unwrap();
                for i in 0..MESSAGES {
                    out.feed(&payload(seed(me, to, i), 100 + (i as usize * 37) % 3000))
                        .await
                        .unwrap();
                }
                out.finish().await.unwrap();
                ch.close("sent").await.unwrap();
            }));
        }
    }
    within(STEP * 2, "senders", async {
        for s in senders {
            s.await.expect("sender task");
        }
    })
    .await;
    let results = within(STEP * 2, "receivers", async {
        let mut all = Vec::new();
        for r in receivers {
            all.push(r.await.expect("receiver"));
        }
        all
    })
    .await;

    for (me, got) in results {
        let expected: Vec<usize> = (1..=FANOUT).map(|k| (me + CLIENTS - k) % CLIENTS).collect();
        let mut froms: Vec<usize> = got.keys().copied().collect();
        froms.sort();
        let mut expected_sorted = expected.clone();
        expected_sorted.sort();
        assert_eq!(
            froms, expected_sorted,
            "client {me} heard from the wrong peers"
        );
        for (from, (msgs, end)) in got {
            assert_eq!(msgs.len() as u64, MESSAGES, "{from}->{me}");
            for (i, m) in msgs.iter().enumerate() {
                let i = i as u64;
                assert!(
                    *m == payload(seed(from, me, i), 100 + (i as usize * 37) % 3000),
                    "{from}->{me} message {i}"
                );
            }
            assert!(
                matches!(end, qmesh_client::ChannelEnd::Closed { ref reason, .. } if reason == "sent"),
                "{from}->{me}: {end:?}"
            );
        }
    }
    assert_eq!(
        mesh.coordinator
            .stats()
            .channels_joined
            .load(std::sync::atomic::Ordering::Relaxed),
        (CLIENTS * FANOUT) as u64
    );
}
