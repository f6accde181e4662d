//! A coordinator process killed with SIGKILL under 50 clients, and
//! restarted on the same port and state directory: every client is back
//! under its name by itself, each relayed channel of the lost session ended
//! lost exactly once on each side, and new channels work. The time from
//! the restart to each client's reconnect is printed (p50 and max) for
//! docs/benchmarks.md.

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use qmesh_client::events::{Event, Events};
use qmesh_client::{ChannelEnd, Client, ClientConfig, SessionState};
use qmesh_integration_tests::target::CoordinatorProc;
use qmesh_integration_tests::{connect, message_flows, open_pair, within, within_ok, STEP};
use qmesh_proto::heartbeat::Heartbeat;

const CLIENTS: usize = 50;
const PAIRS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_and_a_restart_50_clients_come_back_and_each_lost_channel_ends_once() {
    let state = tempfile::tempdir().expect("temporary directory");
    let (mut coord, ca) = CoordinatorProc::start_dev(state.path(), &[] as &[&OsStr]).await;
    let listen = coord.v4();
    let trust = ClientConfig::trust_ca_file(&ca).expect("CA file");
    let mut clients: Vec<(Client, Events)> = Vec::new();
    for i in 0..CLIENTS {
        let mut config = ClientConfig::new(coord.address(), format!("c{i}"), trust.clone());
        // A killed coordinator is found silent in 2 s, not 15.
        config.heartbeat = Heartbeat::new(Duration::from_secs(1), 2);
        let events = Events::new();
        config.events = Some(events.clone());
        clients.push((connect(config).await, events));
    }
    let mut channels = Vec::new();
    for p in 0..PAIRS {
        let (a, b) = (&clients[2 * p].0, &clients[2 * p + 1].0);
        let (to, from) = open_pair(a, b, "chat").await;
        message_flows(&to, &from, b"before the kill").await;
        channels.push((to, from));
    }

    coord.proc.kill().await;
    // Every relayed channel ends lost, on both sides.
    for (to, from) in &channels {
        for side in [to, from] {
            match within(
                STEP,
                "a channel of the killed coordinator ends",
                side.ended(),
            )
            .await
            {
                ChannelEnd::Lost { .. } => {}
                other => panic!("{}: ended {other:?}", side.label()),
            }
        }
    }
    let (mut again, _) =
        CoordinatorProc::start_dev_at(state.path(), &listen, &[] as &[&OsStr]).await;
    let restarted = Instant::now();
    let mut waits = tokio::task::JoinSet::new();
    for (i, (client, _)) in clients.iter().enumerate() {
        let mut state = client.state();
        waits.spawn(async move {
            within(
                STEP,
                &format!("c{i} back"),
                state.wait_for(|s| matches!(s, SessionState::Up { .. })),
            )
            .await
            .expect("state");
            restarted.elapsed()
        });
    }
    let mut back: Vec<Duration> = Vec::new();
    while let Some(took) = waits.join_next().await {
        back.push(took.expect("wait task"));
    }
    back.sort();
    eprintln!(
        "RESTART: {CLIENTS} clients back after the restart: p50 {} ms, max {} ms",
        back[back.len() / 2].as_millis(),
        back[back.len() - 1].as_millis()
    );

    // Everyone is back under their name.
    let peers = within_ok(STEP, "peers", clients[0].0.peers()).await;
    for i in 0..CLIENTS {
        let name = format!("c{i}");
        assert!(
            i == 0 || peers.iter().any(|p| p.name == name),
            "{name} is not back"
        );
    }
    // New channels work.
    for p in 0..PAIRS {
        let (a, b) = (&clients[2 * p].0, &clients[2 * p + 1].0);
        let (to, from) = open_pair(a, b, "chat").await;
        message_flows(&to, &from, b"after the restart").await;
    }
    // Each lost channel was reported once on each side, and no client's
    // session ended.
    for (i, (_, events)) in clients.iter().enumerate() {
        let seen: Vec<Event> = std::iter::from_fn(|| events.try_next()).collect();
        let lost = seen
            .iter()
            .filter(|e| matches!(e, Event::Lost { .. }))
            .count();
        let expected = usize::from(i < 2 * PAIRS);
        assert_eq!(lost, expected, "c{i}: {seen:#?}");
        assert!(
            !seen.iter().any(|e| matches!(e, Event::SessionEnded { .. })),
            "c{i}: {seen:#?}"
        );
        assert_eq!(
            seen.iter()
                .filter(|e| matches!(e, Event::Reconnected { .. }))
                .count(),
            1,
            "c{i}: {seen:#?}"
        );
    }
    again.proc.kill().await;
}
