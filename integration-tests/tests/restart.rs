//! A coordinator process killed with SIGKILL under 50 clients, with
//! relayed channels, direct channels and a forward carrying traffic, and
//! restarted on the same port and state directory: every client is back
//! under its name by itself; each relayed channel of the lost session ended
//! lost exactly once on each side; the direct channels kept delivering
//! both ways while the coordinator was away, and after (held on their
//! direct connections, protocol.md §8.9); the forward works again; new
//! channels work. The time from the restart to each client's reconnect is
//! printed (p50 and max) for docs/benchmarks.md.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use qmesh_client::events::{Event, Events};
use qmesh_client::{ChannelEnd, Client, ClientConfig, Path, PathMode, SessionState};
use qmesh_integration_tests::process::qmesh;
use qmesh_integration_tests::programs::{self, free_port, require};
use qmesh_integration_tests::target::CoordinatorProc;
use qmesh_integration_tests::{
    connect, message_flows, open_pair, open_pair_with, within, within_ok, STEP,
};
use qmesh_proto::heartbeat::Heartbeat;

const CLIENTS: usize = 50;
/// Relayed pairs: clients 0 to 19.
const PAIRS: usize = 10;
/// Direct pairs: the next 10 clients.
const DIRECT_PAIRS: usize = 5;

/// One line through the forward's listener on 127.0.0.1:`port`, echoed;
/// `None` if the connection is closed instead.
fn echo_once(port: u16, line: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("the forward's listener");
    s.set_read_timeout(Some(STEP)).expect("timeout");
    s.write_all(line.as_bytes()).ok()?;
    let mut buf = vec![0u8; line.len()];
    s.read_exact(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// [`echo_once`] on a blocking thread.
async fn echo(port: u16, line: &'static str) -> Option<String> {
    tokio::task::spawn_blocking(move || echo_once(port, line))
        .await
        .expect("the echo's thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_and_a_restart_50_clients_come_back_relayed_channels_end_once_direct_ones_carry_on_and_the_forward_works_again(
) {
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
    let mut direct = Vec::new();
    for p in PAIRS..PAIRS + DIRECT_PAIRS {
        let (a, b) = (&clients[2 * p].0, &clients[2 * p + 1].0);
        let (to, from) = open_pair_with(a, b, "chat", PathMode::Direct).await;
        assert!(matches!(to.path(), Path::Direct { .. }), "{:?}", to.path());
        message_flows(&to, &from, b"before the kill").await;
        direct.push((to, from));
    }
    // A relayed forward to a socat echo: `carol` exposes it, `dave`
    // forwards a local port to it (two CLI processes).
    assert!(
        require("socat").is_some(),
        "socat is needed for the forward (CI installs it)"
    );
    let (_echo, echo_port) = programs::socat_echo();
    let ca_file = ca.clone();
    let clients_dir = tempfile::tempdir().expect("temporary directory");
    let cli = |args: &[&str]| qmesh(&listen, &ca_file, clients_dir.path(), args);
    let target = format!("tcp/$4:{echo_port}");
    let mut carol = cli(&[
        "--heartbeat",
        "1",
        "--heartbeat-misses",
        "2",
        "--name",
        "carol",
        "expose",
        "echo",
        &target,
    ]);
    carol
        .stdout_line("`exposing`", |l| l.starts_with("exposing "))
        .await;
    let local = free_port();
    let listener = format!("tcp/$4:{local}");
    let mut dave = cli(&[
        "--heartbeat",
        "1",
        "--heartbeat-misses",
        "2",
        "--name",
        "dave",
        "forward",
        "--mode",
        "relay",
        &listener,
        "mesh/carol!echo",
    ]);
    dave.stdout_line("`route … up`", |l| {
        l.starts_with("route ") && l.contains(" up: ")
    })
    .await;
    assert_eq!(echo(local, "before\n").await.as_deref(), Some("before\n"));

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
    // The direct channels carry on both ways with no coordinator.
    for (to, from) in &direct {
        message_flows(to, from, b"while the coordinator is away").await;
        message_flows(from, to, b"and back").await;
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
    // The held direct channels still work, and the forward works again
    // once both of its ends are back.
    for (to, from) in &direct {
        message_flows(from, to, b"after the restart").await;
        assert_eq!(to.end(), None);
    }
    for (who, p) in [("carol", &mut carol), ("dave", &mut dave)] {
        p.stderr_line(&format!("{who}'s `qmesh: reconnected`"), |l| {
            l.starts_with("qmesh: reconnected")
        })
        .await;
    }
    assert_eq!(
        echo(local, "after\n").await.as_deref(),
        Some("after\n"),
        "the forward did not work again after the restart"
    );
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
        // Relayed pairs lost their channel; direct pairs did not.
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
