//! Many clients, many channels at once: every message is delivered.

use std::collections::BTreeMap;

use qmesh_client::Client;
use qmesh_integration_tests::{next_message, next_stream, payload, within, within_ok, Mesh, STEP};

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

/// Stream limits start small and grow with use: 100 channels between one
/// pair, then 100 data streams at once on one channel, all open together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_channels_and_streams_past_the_initial_limits() {
    const N: usize = 100;
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    // Answer each offer in its own task, as a server would: the offer
    // backlog is bounded and refuses when nobody takes offers.
    let accept_all = async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..N {
            let offer = bob.accept().await.expect("offer");
            set.spawn(async move { offer.accept().await.expect("accept") });
        }
        let mut chans = Vec::new();
        while let Some(r) = set.join_next().await {
            chans.push(r.expect("task"));
        }
        chans
    };
    let open_all = async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..N {
            let alice = alice.clone();
            set.spawn(async move { alice.open_str(&format!("mesh/bob!ch-{i}")).await });
        }
        let mut chans = Vec::new();
        while let Some(r) = set.join_next().await {
            chans.push(r.expect("task").expect("open"));
        }
        chans
    };
    let (at_bob, at_alice) = within(STEP, "100 channels", async {
        tokio::join!(accept_all, open_all)
    })
    .await;
    assert_eq!((at_bob.len(), at_alice.len()), (N, N));

    // All channels stay open; now 100 streams at once on the first one,
    // none finished before all are open.
    let (a, b) = (
        &at_alice[0],
        at_bob
            .iter()
            .find(|c| c.name() == at_alice[0].name())
            .expect("pair"),
    );
    let mut outs = Vec::new();
    for i in 0..N {
        let mut out = within_ok(STEP, "open stream", a.open_stream()).await;
        out.send(&payload(i as u64, 10)).await.unwrap();
        outs.push(out);
    }
    // Bob keeps every stream until it ends, as a reader does; dropping a
    // receiver early stops that stream (see the relay).
    let mut seen = Vec::new();
    let mut inboxes = Vec::new();
    for _ in 0..N {
        let mut inbox = next_stream(b).await;
        seen.push(next_message(&mut inbox).await);
        inboxes.push(inbox);
    }
    for out in outs {
        within_ok(STEP, "finish", out.finish()).await;
    }
    for mut inbox in inboxes {
        assert!(within_ok(STEP, "end", inbox.recv()).await.is_none());
    }
    for i in 0..N as u64 {
        assert!(
            seen.iter().any(|m| *m == payload(i, 10)),
            "stream {i} missing"
        );
    }
}
