//! Heartbeats through real processes: a frozen process (SIGSTOP) keeps its
//! connection open as far as QUIC can tell until the idle timeout, so only
//! the heartbeat on the session stream notices it. Both directions: the
//! coordinator notices a frozen client, a client notices a frozen
//! coordinator. The idle timeouts here are far longer than the heartbeat's
//! `misses × interval`, so an end that names the heartbeat came from it.
//!
//! The exact deadline (lost after `misses × interval`, not before) is tested
//! with tokio's paused clock in `proto/src/heartbeat.rs`; these tests print
//! how long detection took and assert what was reported.

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use qmesh_client::{ChannelEnd, Client, OpenError, Path, PathMode, SessionState};
use qmesh_integration_tests::process::{show, Proc};
use qmesh_integration_tests::target::CoordinatorProc;
use qmesh_integration_tests::{connect, open_pair, within, within_ok, Mesh, STEP};
use qmesh_proto::address::Address;
use qmesh_proto::codes::OpenFailCode;
use qmesh_proto::heartbeat::Heartbeat;

/// The heartbeat under test: lost after 3 × 200 ms.
fn quick() -> Heartbeat {
    Heartbeat::new(Duration::from_millis(200), 3)
}

/// Far longer than the heartbeat's 600 ms: an end before it is the
/// heartbeat's doing.
const IDLE: Duration = Duration::from_secs(60);

/// Test 1: a frozen client is closed by the coordinator's heartbeat, its
/// peers' channels end lost with the heartbeat named, and the client, once
/// thawed, learns it was closed for missing heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_client_is_closed_by_the_coordinators_heartbeat_and_its_peers_see_lost() {
    let mesh = Mesh::start_with(|c| {
        c.heartbeat = quick();
        c.tuning = c.tuning.clone().with_idle_timeout(IDLE);
    })
    .await;
    let bob = within_ok(
        STEP,
        "bob",
        Client::connect(mesh.config("bob").with_idle_timeout(IDLE)),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, mesh.ca.cert_pem()).unwrap();
    // Alice's own heartbeat is slow (60 s × 3) so that, once thawed, she
    // reads the coordinator's close before her own timers could fire.
    let coordinator = mesh.address.to_string();
    let args: Vec<&OsStr> = vec![
        "--name".as_ref(),
        "alice".as_ref(),
        "--idle-timeout".as_ref(),
        "60".as_ref(),
        "--heartbeat".as_ref(),
        "60".as_ref(),
        "--coordinator".as_ref(),
        coordinator.as_ref(),
        "--ca".as_ref(),
        ca.as_os_str(),
        "send".as_ref(),
        "mesh/bob!chat".as_ref(),
        "--mode".as_ref(),
        "relay".as_ref(),
    ];
    let mut alice = Proc::spawn("qmesh", args, &[]);
    let offer = within_ok(STEP, "offer", bob.accept()).await;
    let ch = within_ok(STEP, "accept", offer.accept()).await;

    alice.signal("STOP");
    let frozen = Instant::now();
    let end = within(STEP, "bob's channel ends", ch.ended()).await;
    let took = frozen.elapsed();
    alice.signal("CONT");
    match &end {
        ChannelEnd::Lost { reason } => {
            assert!(
                reason.contains("\"alice\" was disconnected by the coordinator"),
                "{reason}"
            );
            assert!(reason.contains("3 heartbeats missed"), "{reason}");
        }
        other => panic!("expected lost, got {other:?}"),
    }
    eprintln!("frozen client closed by the coordinator after {took:?} (heartbeat 3 × 200 ms)");

    // Thawed, alice reads the close the coordinator sent meanwhile.
    let exit = alice.finish().await;
    assert!(!exit.status.success(), "{}", show(&exit));
    assert!(
        exit.stderr.contains("heartbeat") && exit.stderr.contains("3 heartbeats missed"),
        "{}",
        show(&exit)
    );
    // Bob's own session is untouched.
    let (_a, _b) = open_pair(&bob, &mesh.client("carol").await, "after").await;
}

/// Test 2: a frozen coordinator is noticed by its clients' heartbeats: each
/// client's session closes saying the coordinator is silent, and every
/// channel ends lost, not closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_coordinator_is_noticed_by_the_clients_heartbeat_and_channels_end_lost() {
    let state = tempfile::tempdir().unwrap();
    // --single: SIGSTOP freezes the process that serves (under a leader it
    // would freeze only the leader).
    let (coord, ca) = CoordinatorProc::start_dev(state.path(), &["--single"]).await;
    let trust = qmesh_certs::Trust::ca_file(&ca).unwrap();
    let address: Address = coord.localhost().parse().unwrap();
    let mut coord = coord.proc;
    let client = |name: &str| {
        let mut config = qmesh_client::ClientConfig::new(address.clone(), name, trust.clone())
            .with_idle_timeout(IDLE);
        config.heartbeat = quick();
        connect(config)
    };
    let alice = client("alice").await;
    let bob = client("bob").await;
    let (a, b) = open_pair(&alice, &bob, "chat").await;

    coord.signal("STOP");
    let frozen = Instant::now();
    for (who, client, ch) in [("alice", &alice, &a), ("bob", &bob, &b)] {
        // The client drops the silent session and tries to join again.
        let mut state = client.state();
        let down = within(
            STEP,
            "session lost",
            state.wait_for(|s| matches!(s, SessionState::Reconnecting { .. })),
        )
        .await
        .unwrap()
        .clone();
        // Attempt 1 names the silence; a later one (if the state moved on
        // already) names why the attempt before failed. The channel's end
        // below names the silence either way.
        assert!(
            matches!(&down, SessionState::Reconnecting { attempt, cause, .. }
                if *attempt > 1 || cause.contains("the coordinator is silent")),
            "{who}: {down:?}"
        );
        match within(STEP, "channel ends", ch.ended()).await {
            ChannelEnd::Lost { reason } => {
                assert!(
                    reason.contains("the coordinator is silent"),
                    "{who}: {reason}"
                )
            }
            other => panic!("{who}: expected lost, got {other:?}"),
        }
    }
    eprintln!(
        "frozen coordinator noticed by both clients after {:?} (heartbeat 3 × 200 ms)",
        frozen.elapsed()
    );
    coord.signal("CONT");
    coord.terminate();
    let exit = coord.finish().await;
    assert!(exit.status.success(), "{}", show(&exit));
}

/// Test 3: a client killed without a word (SIGKILL) holds its name until
/// the coordinator's heartbeat notices; here that is 3 × 10 s. A channel
/// opened to it makes the coordinator probe it at once, and the open fails
/// as soon as the probe goes unanswered (2 s by default), long before the
/// heartbeat would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_to_a_killed_peer_fails_after_the_probe_not_the_heartbeat() {
    let slow = Heartbeat::new(Duration::from_secs(10), 3);
    let mesh = Mesh::start_with(|c| {
        c.heartbeat = slow;
        c.tuning = c.tuning.clone().with_idle_timeout(IDLE);
    })
    .await;
    let alice = connect(mesh.config("alice").with_idle_timeout(IDLE)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, mesh.ca.cert_pem()).unwrap();
    let coordinator = mesh.address.to_string();
    let args: Vec<&OsStr> = vec![
        "--name".as_ref(),
        "bob".as_ref(),
        "--idle-timeout".as_ref(),
        "60".as_ref(),
        "--coordinator".as_ref(),
        coordinator.as_ref(),
        "--ca".as_ref(),
        ca.as_os_str(),
        "--state-dir".as_ref(),
        dir.path().as_os_str(),
        "listen".as_ref(),
        "chat".as_ref(),
    ];
    let mut bob = Proc::spawn("qmesh", args, &[]);
    bob.ready().await;
    bob.kill().await;

    let started = Instant::now();
    let err = within(STEP, "the open", alice.open_str("mesh/bob!chat"))
        .await
        .expect_err("bob is gone");
    let took = started.elapsed();
    match &err {
        OpenError::Failed { code, message } => {
            assert_eq!(*code, OpenFailCode::PeerLeft, "{message}");
            assert!(message.contains("bob"), "{message}");
        }
        other => panic!("expected the peer to have left, got {other:?}"),
    }
    // The heartbeat alone takes 30 s; one interval is far more than the
    // probe needs, and far less than the heartbeat.
    assert!(took < slow.interval, "the open took {took:?}: {err}");
    eprintln!(
        "open to a killed peer failed after {took:?} (probe window {:?}, heartbeat {:?}): {err}",
        slow.probe_window(),
        slow.limit()
    );
}

/// Test 4: a channel on a direct connection whose peer was killed. The
/// coordinator's heartbeat finds the peer gone and says the channel is
/// lost; the direct connection looks up for its whole idle timeout (120 s
/// here), so the side left tries to hold the channel there (protocol.md
/// §8.6), gets no answer, and ends it lost with that reason, without
/// waiting for the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_channel_to_a_killed_peer_ends_lost_when_the_peer_does_not_hold_it() {
    const DIRECT_IDLE: Duration = Duration::from_secs(120);
    assert!(
        DIRECT_IDLE > STEP,
        "the wait below must end before the idle timeout"
    );
    let mesh = Mesh::start_with(|c| {
        c.heartbeat = quick();
        c.tuning = c.tuning.clone().with_idle_timeout(IDLE);
    })
    .await;
    let alice = connect(mesh.config("alice").with_idle_timeout(DIRECT_IDLE)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, mesh.ca.cert_pem()).unwrap();
    let coordinator = mesh.address.to_string();
    let idle = DIRECT_IDLE.as_secs().to_string();
    let args: Vec<&OsStr> = vec![
        "--name".as_ref(),
        "bob".as_ref(),
        "--idle-timeout".as_ref(),
        idle.as_ref(),
        "--coordinator".as_ref(),
        coordinator.as_ref(),
        "--ca".as_ref(),
        ca.as_os_str(),
        "--state-dir".as_ref(),
        dir.path().as_os_str(),
        "listen".as_ref(),
        "chat".as_ref(),
    ];
    let mut bob = Proc::spawn("qmesh", args, &[]);
    bob.ready().await;
    let address: Address = "mesh/bob!chat".parse().unwrap();
    let ch = within_ok(STEP, "open", alice.open_with(&address, PathMode::Direct)).await;
    assert!(matches!(ch.path(), Path::Direct { .. }), "{:?}", ch.path());
    within_ok(STEP, "a message to bob", ch.send_one(b"hello bob")).await;
    bob.kill().await;

    let killed = Instant::now();
    match within(STEP, "the channel to the killed peer ends", ch.ended()).await {
        ChannelEnd::Lost { reason } => {
            assert!(
                reason.contains("bob did not hold the channel on the direct connection"),
                "{reason}"
            );
        }
        other => panic!("expected lost, got {other:?}"),
    }
    eprintln!(
        "a direct channel to a killed peer ended {:?} after the kill",
        killed.elapsed()
    );
}

/// Sessions whose streams are stuck behind full connection windows stay
/// up: alice pushes 12 streams at bob, who reads nothing, until both
/// connections' 16 MiB windows are full, so the session streams' beats
/// are held back both ways. The beats that travel as datagrams
/// (protocol.md §13.1) keep both sessions: neither changes state over
/// five times the heartbeat's 600 ms limit. Then bob reads, and every
/// stream arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stuck_behind_full_connection_windows_stay_up() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    const STREAMS: u64 = 12;
    const EACH: u64 = 8 << 20;
    const PART: usize = 64 << 10;
    let mesh = Mesh::start_with(|c| {
        c.heartbeat = quick();
        c.tuning = c.tuning.clone().with_idle_timeout(IDLE);
    })
    .await;
    let client = |name: &str| {
        let mut config = mesh.config(name).with_idle_timeout(IDLE);
        config.heartbeat = quick();
        connect(config)
    };
    let (alice, bob) = tokio::join!(client("alice"), client("bob"));
    let (out, inbox) = open_pair(&alice, &bob, "bulk").await;
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for s in 0..STREAMS {
        let mut stream = within_ok(STEP, "open", out.open_stream()).await;
        let written = written.clone();
        writers.spawn(async move {
            for part in 0..EACH / PART as u64 {
                let mut m = vec![s as u8; PART];
                m[..8].copy_from_slice(&part.to_be_bytes());
                stream.send(&m).await.unwrap();
                written.fetch_add(PART as u64, Ordering::SeqCst);
            }
            stream.finish().await.unwrap();
        });
    }
    // Past bob's 16 MiB window: the rest fills alice's 16 MiB within
    // milliseconds, well inside the time held below.
    within(STEP, "the windows fill", async {
        let mut ticks = tokio::time::interval(Duration::from_millis(20));
        while written.load(Ordering::SeqCst) < 20 << 20 {
            ticks.tick().await;
        }
    })
    .await;
    let (mut a_state, mut b_state) = (alice.state(), bob.state());
    let held = quick().limit() * 5;
    let changed = tokio::time::timeout(held, async {
        tokio::select! {
            _ = a_state.changed() => format!("alice: {:?}", *a_state.borrow()),
            _ = b_state.changed() => format!("bob: {:?}", *b_state.borrow()),
        }
    })
    .await;
    assert!(
        changed.is_err(),
        "a session changed while its streams were stuck: {changed:?}"
    );
    assert!(
        written.load(Ordering::SeqCst) < STREAMS * EACH,
        "the writers were never held back"
    );
    // Bob reads now, every stream side by side.
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let mut stream = within_ok(STEP, "accept", inbox.accept_stream())
            .await
            .expect("a stream");
        readers.spawn(async move {
            let mut parts = 0u64;
            while let Some(m) = stream.recv().await.unwrap() {
                assert_eq!(m[..8], parts.to_be_bytes());
                parts += 1;
            }
            parts
        });
    }
    let parts = within(STEP, "every stream read", async {
        let mut all = Vec::new();
        while let Some(p) = readers.join_next().await {
            all.push(p.unwrap());
        }
        all
    })
    .await;
    assert_eq!(parts, vec![EACH / PART as u64; STREAMS as usize]);
    within(STEP, "writers", async {
        while writers.join_next().await.is_some() {}
    })
    .await;
}
