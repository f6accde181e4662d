//! Reconnect and resume: a client that loses its coordinator joins again by
//! itself, under its name, with the interfaces it offers, and says so in
//! its state and its events; the channels of the lost session end lost
//! once; a refusal on the way back ends the client with its reason.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use qmesh_certs::Ca;
use qmesh_client::events::{Event, Events};
use qmesh_client::{
    ChannelEnd, ClientConfig, GroupEvent, Interface, OpenError, Path, PathMode, Quota, Reconnect,
    SessionState, Side,
};
use qmesh_coordinator::auth::Auth;
use qmesh_coordinator::{Config, Coordinator, CoordinatorHandle};
use qmesh_integration_tests::{
    connect, message_flows, open_pair, open_pair_with, within, within_ok, Mesh, STEP,
};
use qmesh_proto::msg::PresenceEvent;
use tokio::sync::watch;

/// A coordinator on 127.0.0.1:`port` with a certificate from `ca`. The
/// port is free once the stopped coordinator's endpoint driver has seen
/// its last handle go, a moment after `shutdown` returns: binding is tried
/// again until then.
async fn coordinator_on(ca: &Ca, port: u16, adjust: impl FnOnce(&mut Config)) -> CoordinatorHandle {
    let identity = ca
        .issue_server(&["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    let mut config = Config::new(identity);
    config.listen = SocketAddr::from(([127, 0, 0, 1], port));
    adjust(&mut config);
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match Coordinator::bind(config.clone()) {
            Ok(c) => return c.spawn(),
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("port {port} not free yet: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("binding port {port} again: {e}"),
        }
    }
}

/// Wait until `state` satisfies `pred`; the state it reached.
async fn state_where(
    state: &mut watch::Receiver<SessionState>,
    what: &str,
    pred: impl FnMut(&SessionState) -> bool,
) -> SessionState {
    within(STEP, what, state.wait_for(pred))
        .await
        .unwrap()
        .clone()
}

/// Connect with `config` and an events hub of its own.
async fn with_events(mut config: ClientConfig) -> (qmesh_client::Client, Events) {
    let events = Events::new();
    config.events = Some(events.clone());
    (connect(config).await, events)
}

/// Every event the hub holds now.
fn drain(events: &Events) -> Vec<Event> {
    std::iter::from_fn(|| events.try_next()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_coordinator_restart_clients_come_back_with_their_names_and_interfaces() {
    let Mesh {
        coordinator,
        ca,
        address,
        trust,
    } = Mesh::start().await;
    let port = coordinator.local_addr().port();
    let (alice, events) =
        with_events(ClientConfig::new(address.clone(), "alice", trust.clone())).await;
    let bob = connect(
        ClientConfig::new(address.clone(), "bob", trust.clone())
            .offer(Interface::new("chat", "talk"), Quota::default()),
    )
    .await;
    // An interface offered at run time is said again after the reconnect.
    bob.set_interfaces(vec![
        Interface::new("chat", "talk"),
        Interface::new("files", "drop box"),
    ])
    .await
    .unwrap();
    let (to_bob, _from_alice) = open_pair(&alice, &bob, "chat").await;
    let first_session = alice.session_id();
    let mut alice_state = alice.state();
    let mut bob_state = bob.state();

    within(STEP, "shutdown", coordinator.shutdown()).await;

    // The relayed channel of the lost session ends lost, naming the cause.
    match within(STEP, "alice's channel ends", to_bob.ended()).await {
        ChannelEnd::Lost { reason } => {
            assert!(reason.contains("coordinator shutting down"), "{reason}")
        }
        other => panic!("expected lost, got {other:?}"),
    }
    state_where(&mut alice_state, "alice reconnecting", |s| {
        matches!(s, SessionState::Reconnecting { .. })
    })
    .await;
    // While it is away, an open fails at once and says why.
    match alice.open_str("mesh/bob!chat").await {
        Err(OpenError::Session(why)) => assert!(why.contains("reconnecting"), "{why}"),
        other => panic!("an open with no session: {other:?}"),
    }

    let _restarted = coordinator_on(&ca, port, |_| {}).await;
    for (who, state) in [("alice", &mut alice_state), ("bob", &mut bob_state)] {
        state_where(state, &format!("{who} back"), |s| {
            matches!(s, SessionState::Up { .. })
        })
        .await;
    }
    assert_ne!(alice.session_id(), 0);
    eprintln!(
        "alice: session {first_session} before the restart, {} after",
        alice.session_id()
    );

    // Bob is back under his name with both interfaces, with no call from
    // the application.
    let peers = within_ok(STEP, "peers", alice.peers()).await;
    let bob_seen = peers.iter().find(|p| p.name == "bob").expect("bob is back");
    let names: Vec<&str> = bob_seen
        .interfaces
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(names, ["chat", "files"]);
    // New channels work both ways, and offers reach the new session.
    let (a, b) = open_pair(&alice, &bob, "chat").await;
    message_flows(&a, &b, b"after the restart").await;
    let (b2, a2) = open_pair(&bob, &alice, "chat").await;
    message_flows(&b2, &a2, b"and back").await;

    // The events: the channel lost once, at least one attempt, one
    // Reconnected, and no end of the session.
    let seen = drain(&events);
    let lost = seen
        .iter()
        .filter(|e| matches!(e, Event::Lost { channel, .. } if channel.label == "alice>bob!chat"))
        .count();
    assert_eq!(lost, 1, "{seen:#?}");
    let attempts: Vec<u32> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Reconnecting { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert!(!attempts.is_empty(), "{seen:#?}");
    let first_cause = seen.iter().find_map(|e| match e {
        Event::Reconnecting { cause, .. } => Some(cause.as_str()),
        _ => None,
    });
    assert!(
        first_cause.is_some_and(|c| c.contains("coordinator shutting down")),
        "the first attempt names the loss: {seen:#?}"
    );
    assert_eq!(
        attempts,
        (1..=attempts.len() as u32).collect::<Vec<_>>(),
        "attempts count up from 1"
    );
    let back: Vec<_> = seen
        .iter()
        .filter(|e| matches!(e, Event::Reconnected { .. }))
        .collect();
    assert_eq!(back.len(), 1, "{seen:#?}");
    // Reconnected comes after the last attempt.
    let last_attempt = seen
        .iter()
        .rposition(|e| matches!(e, Event::Reconnecting { .. }))
        .unwrap();
    let reconnected = seen
        .iter()
        .position(|e| matches!(e, Event::Reconnected { .. }))
        .unwrap();
    assert!(reconnected > last_attempt, "{seen:#?}");
    assert!(
        !seen.iter().any(|e| matches!(e, Event::SessionEnded { .. })),
        "{seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_on_the_way_back_ends_the_client_with_its_reason() {
    let Mesh {
        coordinator,
        ca,
        address,
        trust,
    } = Mesh::start().await;
    let port = coordinator.local_addr().port();
    let (alice, events) =
        with_events(ClientConfig::new(address.clone(), "alice", trust.clone())).await;
    within(STEP, "shutdown", coordinator.shutdown()).await;
    // The coordinator comes back admitting only certificates of another
    // CA: alice's self-signed one is refused, which waiting will not fix.
    let other = Ca::generate("another client CA").unwrap();
    let roots = vec![other.cert_der().clone()];
    let _restarted = coordinator_on(&ca, port, |c| {
        c.auth = Arc::new(Auth::ca(roots, None).unwrap());
    })
    .await;
    let why = within(STEP, "alice gives up", alice.closed()).await;
    assert!(why.contains("unknown_ca"), "{why}");
    assert_eq!(
        *alice.state().borrow(),
        SessionState::Ended {
            reason: why.clone()
        }
    );
    let seen = drain(&events);
    let ended: Vec<_> = seen
        .iter()
        .filter(|e| matches!(e, Event::SessionEnded { .. }))
        .collect();
    assert_eq!(ended.len(), 1, "{seen:#?}");
    assert!(
        !seen.iter().any(|e| matches!(e, Event::Reconnected { .. })),
        "{seen:#?}"
    );
    assert!(alice.accept().await.is_none(), "no more offers");
}

/// A certificate renewed while the client runs (`set_identity`) is the one
/// its reconnects present: the coordinator comes back admitting only
/// certificates of a client CA, and the client, given one of that CA's
/// certificates before the loss, joins again (with its first,
/// self-signed certificate it would be refused, as the test above shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_the_one_a_reconnect_presents() {
    let Mesh {
        coordinator,
        ca,
        address,
        trust,
    } = Mesh::start().await;
    let port = coordinator.local_addr().port();
    let alice = connect(ClientConfig::new(address.clone(), "alice", trust.clone())).await;
    let clients_ca = Ca::generate("client CA").unwrap();
    alice.set_identity(Arc::new(clients_ca.issue_client("alice").unwrap()));
    let mut state = alice.state();
    within(STEP, "shutdown", coordinator.shutdown()).await;
    let roots = vec![clients_ca.cert_der().clone()];
    let _restarted = coordinator_on(&ca, port, |c| {
        c.auth = Arc::new(Auth::ca(roots, None).unwrap());
    })
    .await;
    let back = state_where(&mut state, "alice back or ended", |s| {
        matches!(s, SessionState::Up { .. } | SessionState::Ended { .. })
    })
    .await;
    assert!(matches!(back, SessionState::Up { .. }), "{back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attempt_limit_ends_the_client_and_reconnect_off_ends_it_at_the_loss() {
    let mesh = Mesh::start().await;
    let mut limited = mesh.config("alice");
    limited.reconnect = Reconnect {
        first: Duration::from_millis(10),
        max: Duration::from_millis(20),
        limit: Some(3),
        ..Reconnect::default()
    };
    limited.connect_timeout = Duration::from_secs(2);
    let alice = connect(limited).await;
    let mut never = mesh.config("bob");
    never.reconnect = Reconnect::never();
    let bob = connect(never).await;
    let mut alice_state = alice.state();
    within(STEP, "shutdown", mesh.coordinator.shutdown()).await;

    let why = within(STEP, "bob ends at the loss", bob.closed()).await;
    assert!(why.contains("coordinator shutting down"), "{why}");
    let why = within(STEP, "alice gives up", alice.closed()).await;
    assert!(why.contains("3 attempts to join again failed"), "{why}");
    // The state went through the attempts in order.
    let last = alice_state.borrow_and_update().clone();
    assert!(matches!(last, SessionState::Ended { .. }), "{last:?}");
}

/// A client closed while it is reconnecting stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_while_reconnecting_ends_the_client() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let mut state = alice.state();
    within(STEP, "shutdown", mesh.coordinator.shutdown()).await;
    state_where(&mut state, "alice reconnecting", |s| {
        matches!(s, SessionState::Reconnecting { .. })
    })
    .await;
    alice.close("giving up").await;
    let why = within(STEP, "closed", alice.closed()).await;
    assert!(why.contains("giving up"), "{why}");
    assert!(within(STEP, "accept", alice.accept()).await.is_none());
}

/// A group membership and a presence watch made before a restart carry on
/// after it with no call from the application: the watch reports who left
/// while it was away, the membership carries broadcasts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_membership_and_a_presence_watch_resume_after_a_restart() {
    let Mesh {
        coordinator,
        ca,
        address,
        trust,
    } = Mesh::start().await;
    let port = coordinator.local_addr().port();
    let config = |name: &str| ClientConfig::new(address.clone(), name, trust.clone());
    let alice = connect(config("alice")).await;
    let bob = connect(config("bob")).await;
    let mut once = config("carol");
    once.reconnect = Reconnect::never();
    let carol = connect(once).await;
    let at_alice = within_ok(STEP, "alice joins", alice.join("news")).await;
    let at_bob = within_ok(STEP, "bob joins", bob.join("news")).await;
    let mut watch = within_ok(STEP, "watch", alice.watch()).await;
    let mut listed = Vec::new();
    loop {
        match within(STEP, "the list", watch.next())
            .await
            .expect("an event")
        {
            PresenceEvent::Present { name, .. } => listed.push(name.to_string()),
            PresenceEvent::Synced => break,
            other => panic!("{other:?}"),
        }
    }
    listed.sort();
    assert_eq!(listed, ["alice", "bob", "carol"]);
    let (mut alice_state, mut bob_state) = (alice.state(), bob.state());

    within(STEP, "shutdown", coordinator.shutdown()).await;
    assert!(within(STEP, "carol ends", carol.closed())
        .await
        .contains("shutting down"));
    let _restarted = coordinator_on(&ca, port, |_| {}).await;
    for (who, state) in [("alice", &mut alice_state), ("bob", &mut bob_state)] {
        state_where(state, &format!("{who} back"), |s| {
            matches!(s, SessionState::Up { .. })
        })
        .await;
    }

    // The watch: carol left while it was away; then live events again.
    match within(STEP, "the change", watch.next())
        .await
        .expect("an event")
    {
        PresenceEvent::Left { name } => assert_eq!(name.as_str(), "carol"),
        other => panic!("expected carol's leave, got {other:?}"),
    }
    let _dave = connect(config("dave")).await;
    match within(STEP, "dave", watch.next()).await.expect("an event") {
        PresenceEvent::Joined { name, .. } => assert_eq!(name.as_str(), "dave"),
        other => panic!("expected dave's join, got {other:?}"),
    }

    // The group: alice's send joins her again first, so bob's broadcast,
    // sent after his own rejoin, reaches her.
    within_ok(STEP, "alice sends", at_alice.send(b"alice back")).await;
    within_ok(STEP, "bob sends", at_bob.send(b"bob back")).await;
    let mut heard = Vec::new();
    while heard.len() < 2 {
        match within_ok(STEP, "alice hears", at_alice.recv()).await {
            Some(GroupEvent::Message { from, body }) => {
                heard.push(format!("{from}: {}", String::from_utf8_lossy(&body)))
            }
            other => panic!("{other:?}"),
        }
    }
    // The two senders' streams reach the coordinator in either order.
    heard.sort();
    assert_eq!(heard, ["alice: alice back", "bob: bob back"]);
}

/// With several coordinator addresses, a client joins whichever answers
/// (a silent address costs one connect timeout), and a lost session
/// fails over to another coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_several_coordinators_joins_one_that_answers_and_fails_over() {
    let Mesh {
        coordinator: first,
        ca,
        address: first_address,
        trust,
    } = Mesh::start().await;
    let second = coordinator_on(&ca, 0, |_| {}).await;
    let second_address: qmesh_client::Address =
        format!("quic/localhost:{}", second.local_addr().port())
            .parse()
            .unwrap();
    // An address where nothing answers: a socket that reads nothing.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_address: qmesh_client::Address =
        format!("quic/localhost:{}", silent.local_addr().unwrap().port())
            .parse()
            .unwrap();

    let mut config = ClientConfig::new(silent_address.clone(), "alice", trust.clone());
    config.also = vec![first_address.clone(), second_address.clone()];
    config.connect_timeout = Duration::from_secs(1);
    let alice = connect(config).await;
    let on = alice.coordinator();
    assert_ne!(on, silent_address.to_string(), "joined a silent address");

    // Stop the coordinator alice is on: she comes back on the other one.
    let (stopped, other) = if on == first_address.to_string() {
        (first, second_address)
    } else {
        (second, first_address)
    };
    let mut state = alice.state();
    within(STEP, "shutdown", stopped.shutdown()).await;
    state_where(&mut state, "alice reconnecting", |s| {
        matches!(s, SessionState::Reconnecting { .. })
    })
    .await;
    state_where(&mut state, "alice back", |s| {
        matches!(s, SessionState::Up { .. })
    })
    .await;
    assert_eq!(alice.coordinator(), other.to_string());
    let peers = within_ok(STEP, "peers", alice.peers()).await;
    assert!(peers.iter().any(|p| p.name == "alice"), "{peers:?}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_live_channels_finish_refuses_new_ones_and_ends_when_they_have() {
    // A deadline far past the test's: the coordinator must stop because
    // the channel ended, not because the deadline passed.
    let Mesh {
        coordinator,
        ca,
        address,
        trust,
    } = Mesh::start_with(|c| c.drain = Duration::from_secs(600)).await;
    let port = coordinator.local_addr().port();
    let (alice, events) =
        with_events(ClientConfig::new(address.clone(), "alice", trust.clone())).await;
    let bob = connect(ClientConfig::new(address.clone(), "bob", trust.clone())).await;
    let (to_bob, from_alice) = open_pair(&alice, &bob, "chat").await;
    let mut alice_state = alice.state();

    coordinator.begin_drain();
    let leaving = state_where(&mut alice_state, "alice told of the drain", |s| {
        matches!(s, SessionState::Leaving { .. })
    })
    .await;
    assert!(
        matches!(leaving, SessionState::Leaving { within, .. } if within == Duration::from_secs(600)),
        "{leaving:?}"
    );
    // No new channel, with a reason that says what to do.
    match alice.open_str("mesh/bob!other").await {
        Err(OpenError::Failed { code, message }) => {
            assert_eq!(code, qmesh_proto::codes::OpenFailCode::ShuttingDown);
            assert!(message.contains("open again once"), "{message}");
        }
        other => panic!("an open during a drain: {other:?}"),
    }
    // No new session either.
    match qmesh_client::Client::connect(ClientConfig::new(address.clone(), "carol", trust.clone()))
        .await
    {
        Err(qmesh_client::error::ConnectError::Rejected { code, .. }) => {
            assert_eq!(code, qmesh_proto::codes::RejectCode::ShuttingDown)
        }
        other => panic!("a hello during a drain: {:?}", other.map(|_| "joined")),
    }
    // The live channel still carries messages both ways, and its graceful
    // close arrives as a close, not a loss.
    message_flows(&to_bob, &from_alice, b"during the drain").await;
    message_flows(&from_alice, &to_bob, b"and back").await;
    to_bob.close("done").await.unwrap();
    match within(STEP, "bob's side ends", from_alice.ended()).await {
        ChannelEnd::Closed { .. } => {}
        other => panic!("a channel closed during a drain ended {other:?}"),
    }
    // With no channel left the coordinator stops (long before its 600 s).
    within(STEP, "the drained coordinator stops", coordinator.stopped()).await;
    let reconnecting = state_where(&mut alice_state, "alice reconnecting", |s| {
        matches!(
            s,
            SessionState::Reconnecting { .. } | SessionState::Ended { .. }
        )
    })
    .await;
    assert!(
        matches!(&reconnecting, SessionState::Reconnecting { .. }),
        "{reconnecting:?}"
    );
    let _restarted = coordinator_on(&ca, port, |_| {}).await;
    state_where(&mut alice_state, "alice back", |s| {
        matches!(s, SessionState::Up { .. })
    })
    .await;
    // The events: GoingAway once, before the first attempt, whose cause is
    // the shutdown.
    let seen = drain(&events);
    let going = seen
        .iter()
        .position(
            |e| matches!(e, Event::GoingAway { within, .. } if *within == Duration::from_secs(600)),
        )
        .unwrap_or_else(|| panic!("no GoingAway: {seen:#?}"));
    assert_eq!(
        seen.iter()
            .filter(|e| matches!(e, Event::GoingAway { .. }))
            .count(),
        1,
        "{seen:#?}"
    );
    let first_attempt = seen
        .iter()
        .position(|e| matches!(e, Event::Reconnecting { attempt: 1, cause, .. } if cause.contains("coordinator shutting down")))
        .unwrap_or_else(|| panic!("no first attempt naming the shutdown: {seen:#?}"));
    assert!(going < first_attempt, "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_drain_deadline_the_channels_still_open_end_lost_with_the_reason() {
    let mesh = Mesh::start_with(|c| c.drain = Duration::from_millis(500)).await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (to_bob, from_alice) = open_pair(&alice, &bob, "chat").await;
    mesh.coordinator.begin_drain();
    within(
        STEP,
        "the coordinator stops at its deadline",
        mesh.coordinator.stopped(),
    )
    .await;
    for (who, side) in [("alice", &to_bob), ("bob", &from_alice)] {
        match within(STEP, &format!("{who}'s side ends"), side.ended()).await {
            ChannelEnd::Lost { reason } => {
                assert!(
                    reason.contains("coordinator shutting down"),
                    "{who}: {reason}"
                )
            }
            other => panic!("{who}: a channel cut at the drain deadline ended {other:?}"),
        }
    }
}

/// The terminal events (closed or lost) the hub holds for channel `label`.
fn terminal_events(seen: &[Event], label: &str) -> Vec<Event> {
    seen.iter()
        .filter(|e| {
            matches!(e, Event::Closed { channel, .. } | Event::Lost { channel, .. } if channel.label == label)
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_channel_is_held_on_its_connection_while_the_coordinator_is_away() {
    let Mesh {
        coordinator,
        ca,
        address,
        trust,
    } = Mesh::start().await;
    let port = coordinator.local_addr().port();
    let (alice, alice_events) =
        with_events(ClientConfig::new(address.clone(), "alice", trust.clone())).await;
    let (bob, bob_events) =
        with_events(ClientConfig::new(address.clone(), "bob", trust.clone())).await;
    let (a, b) = open_pair_with(&alice, &bob, "chat", PathMode::Direct).await;
    assert!(matches!(a.path(), Path::Direct { .. }), "{:?}", a.path());
    message_flows(&a, &b, b"before the loss").await;
    let (relayed, _) = open_pair(&alice, &bob, "relayed").await;
    let mut alice_state = alice.state();

    within(STEP, "shutdown", coordinator.shutdown()).await;
    // The relayed channel cannot outlive its coordinator ...
    match within(STEP, "the relayed channel ends", relayed.ended()).await {
        ChannelEnd::Lost { reason } => {
            assert!(reason.contains("coordinator shutting down"), "{reason}")
        }
        other => panic!("expected lost, got {other:?}"),
    }
    state_where(&mut alice_state, "alice reconnecting", |s| {
        matches!(s, SessionState::Reconnecting { .. })
    })
    .await;
    // ... the direct one carries on, both ways, with no coordinator.
    message_flows(&a, &b, b"while the coordinator is away").await;
    message_flows(&b, &a, b"and back").await;
    assert_eq!(a.end(), None);
    assert_eq!(b.end(), None);

    let _restarted = coordinator_on(&ca, port, |_| {}).await;
    for (who, client) in [("alice", &alice), ("bob", &bob)] {
        let mut state = client.state();
        state_where(&mut state, &format!("{who} back"), |s| {
            matches!(s, SessionState::Up { .. })
        })
        .await;
    }
    message_flows(&a, &b, b"after the restart").await;
    // A new channel between them after the restart shares the held
    // channel's connection rather than replacing it.
    let (a2, b2) = open_pair_with(&alice, &bob, "chat", PathMode::Direct).await;
    message_flows(&a2, &b2, b"a new channel").await;
    message_flows(&b, &a, b"the held one still works").await;
    assert_eq!(a.path(), a2.path());

    // Closing the held channel reaches the peer on the direct connection,
    // with the reason, and the closer's close is answered.
    within_ok(STEP, "alice closes the held channel", a.close("done here")).await;
    match within(STEP, "bob's side ends", b.ended()).await {
        ChannelEnd::Closed {
            by: Side::Peer,
            reason,
        } => assert_eq!(reason, "done here"),
        other => panic!("expected closed by alice, got {other:?}"),
    }
    // Each side reported the held channel's end exactly once.
    let alice_seen = drain(&alice_events);
    let bob_seen = drain(&bob_events);
    let label = a.label().to_owned();
    assert_eq!(
        terminal_events(&alice_seen, &label).len(),
        1,
        "{alice_seen:#?}"
    );
    assert_eq!(terminal_events(&bob_seen, &label).len(), 1, "{bob_seen:#?}");
    // The second channel was untouched by all of it.
    message_flows(&b2, &a2, b"the new channel too").await;
}
