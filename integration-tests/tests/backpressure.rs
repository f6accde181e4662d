//! A reader that stops reading stops its writer, the coordinator's memory
//! stays bounded, and other channels keep flowing.

#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qmesh_client::{Channel, Client, ClientConfig, Incoming};
use qmesh_integration_tests::{
    bin, connect, memory_kib, next_stream, open_pair, within, within_ok, STEP,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

const MIB: u64 = 1024 * 1024;
/// What the slow pair's writer pushes.
const PUSH: u64 = 256 * MIB;
/// What the other pair moves while the slow reader is stalled.
const OTHER: u64 = 64 * MIB;
/// Most the stalled writer may get ahead of its reader: three 2 MiB stream
/// windows (sender, relay in, relay out) and a message in hand, with room.
const WRITER_BOUND: u64 = 16 * MIB;
/// Most the coordinator may grow by over its idle size during the test.
const COORDINATOR_BOUND_KIB: u64 = 64 * 1024;

fn message(i: u64) -> Vec<u8> {
    let mut m = vec![(i % 251) as u8; MIB as usize];
    m[..8].copy_from_slice(&i.to_be_bytes());
    m
}

/// A coordinator process and four clients connected to it.
struct Setup {
    coordinator: tokio::process::Child,
    pid: u32,
    clients: [Client; 4],
    _state: tempfile::TempDir,
}

async fn setup() -> Setup {
    let state = tempfile::tempdir().unwrap();
    let mut coordinator = tokio::process::Command::new(bin("qmesh-coordinator"))
        .args([
            "--log",
            "warn",
            "run",
            // One process, so that its memory is the coordinator's.
            "--single",
            "--listen",
            "quic/$4:0",
            "--state-dir",
        ])
        .arg(state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = coordinator.id().unwrap();
    let mut lines = BufReader::new(coordinator.stdout.take().unwrap()).lines();
    let (mut port, mut ca) = (None, None);
    while port.is_none() || ca.is_none() {
        let line = within_ok(STEP, "coordinator start", lines.next_line())
            .await
            .unwrap();
        if let Some(addr) = line.strip_prefix("qmesh-coordinator listening on quic/") {
            port = addr.rsplit(':').next().map(|p| p.parse::<u16>().unwrap());
        }
        if let Some(path) = line.strip_prefix("clients need the CA file: ") {
            ca = Some(path.to_owned());
        }
    }
    // The rest of stdout is read to its end, so that the coordinator never
    // writes into a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let address: qmesh_proto::Address = format!("quic/$4:{}", port.unwrap()).parse().unwrap();
    let trust = ClientConfig::trust_ca_file(std::path::Path::new(&ca.unwrap())).unwrap();
    let client = |name: &str| connect(ClientConfig::new(address.clone(), name, trust.clone()));
    let (alice, bob, carol, dave) = tokio::join!(
        client("alice"),
        client("bob"),
        client("carol"),
        client("dave")
    );
    Setup {
        coordinator,
        pid,
        clients: [alice, bob, carol, dave],
        _state: state,
    }
}

/// Carol moves `OTHER` to dave in full, as the time in which a stalled
/// pair could have run ahead; the other pair must keep flowing.
async fn other_pair_moves(fast_out: &Channel, fast_in: &Channel) {
    let fast = async {
        let mut out = fast_out.open_stream().await.unwrap();
        for i in 0..OTHER / MIB {
            out.send(&message(i)).await.unwrap();
        }
        out.finish().await.unwrap();
    };
    let drain = async {
        let mut inbox = fast_in.accept_stream().await.unwrap().unwrap();
        let mut n = 0u64;
        while let Some(m) = inbox.recv().await.unwrap() {
            assert!(m == message(n), "fast message {n}");
            n += 1;
        }
        n
    };
    let ((), moved) = within(STEP * 2, "other pair", async { tokio::join!(fast, drain) }).await;
    assert_eq!(moved, OTHER / MIB, "the other pair kept flowing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_blocks_its_writer_with_bounded_coordinator_memory() {
    let Setup {
        mut coordinator,
        pid,
        clients: [alice, bob, carol, dave],
        ..
    } = setup().await;
    let (slow_out, slow_in) = open_pair(&alice, &bob, "slow").await;
    let (fast_out, fast_in) = open_pair(&carol, &dave, "fast").await;
    let (idle_rss, _) = memory_kib(pid).unwrap();

    // Alice pushes 256 MiB at bob, who takes the stream but does not read.
    let written = Arc::new(AtomicU64::new(0));
    let (started_tx, mut started) = watch::channel(false);
    let writer = {
        let written = written.clone();
        tokio::spawn(async move {
            let mut out = slow_out.open_stream().await.unwrap();
            for i in 0..PUSH / MIB {
                out.send(&message(i)).await.unwrap();
                written.fetch_add(MIB, Ordering::SeqCst);
                let _ = started_tx.send(true);
            }
            out.finish().await.unwrap();
            slow_out
        })
    };
    let mut stalled = next_stream(&slow_in).await;
    within_ok(STEP, "writer started", started.wait_for(|s| *s)).await;

    // Meanwhile carol moves 64 MiB to dave in full.
    other_pair_moves(&fast_out, &fast_in).await;

    let ahead = written.load(Ordering::SeqCst);
    let (rss, peak) = memory_kib(pid).unwrap();
    eprintln!(
        "stalled writer got {} MiB ahead of its reader; coordinator RSS idle {idle_rss} KiB, \
         now {rss} KiB, peak {peak} KiB (growth {} KiB, bound {COORDINATOR_BOUND_KIB} KiB)",
        ahead / MIB,
        peak.saturating_sub(idle_rss)
    );
    assert!(ahead < PUSH, "the writer was not blocked");
    assert!(
        ahead <= WRITER_BOUND,
        "writer {ahead} bytes ahead, bound {WRITER_BOUND}"
    );
    assert!(
        peak.saturating_sub(idle_rss) <= COORDINATOR_BOUND_KIB,
        "coordinator grew by {} KiB",
        peak - idle_rss
    );

    // Bob reads now: all 256 MiB arrive, in order and intact.
    let read = async {
        let mut n = 0u64;
        while let Some(m) = stalled.recv().await.unwrap() {
            assert!(m == message(n), "slow message {n}");
            n += 1;
        }
        n
    };
    let (n, slow_out) = within(STEP * 2, "stalled pair drains", async {
        tokio::join!(read, async { writer.await.unwrap() })
    })
    .await;
    assert_eq!(n, PUSH / MIB);
    let (_, peak) = memory_kib(pid).unwrap();
    eprintln!("coordinator peak after the 256 MiB drained: {peak} KiB");
    within_ok(STEP, "close", slow_out.close("done")).await;
    let _ = coordinator.start_kill();
}

/// One-way messages of `SMALL` bytes for the message-stream case.
const SMALL: usize = 16 * 1024;
/// Messages alice tries to push at a bob who does not read: 64 MiB, four
/// times the bound.
const SMALL_PUSH: u64 = 64 * MIB / SMALL as u64;
/// Most the stalled message sender may get ahead: bob's message backlog
/// (256 messages, 4 MiB here) and the three stream windows, with room.
const MESSAGE_BOUND: u64 = 16 * MIB;

fn small(i: u64) -> Vec<u8> {
    let mut m = vec![(i % 251) as u8; SMALL];
    m[..8].copy_from_slice(&i.to_be_bytes());
    m
}

/// The message layer keeps the same bound: a receiver that does not call
/// `recv_message` holds its sender back once its backlog and the stream
/// windows are full; then every message arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_message_reader_holds_its_sender_back() {
    let Setup {
        mut coordinator,
        pid,
        clients: [alice, bob, carol, dave],
        ..
    } = setup().await;
    let (slow_out, slow_in) = open_pair(&alice, &bob, "slow").await;
    let (fast_out, fast_in) = open_pair(&carol, &dave, "fast").await;
    let (idle_rss, _) = memory_kib(pid).unwrap();

    let sent = Arc::new(AtomicU64::new(0));
    let (started_tx, mut started) = watch::channel(false);
    let sender = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for i in 0..SMALL_PUSH {
                slow_out.send_message(&small(i)).await.unwrap();
                sent.fetch_add(1, Ordering::SeqCst);
                let _ = started_tx.send(true);
            }
            slow_out
        })
    };
    within_ok(STEP, "sender started", started.wait_for(|s| *s)).await;
    other_pair_moves(&fast_out, &fast_in).await;

    let ahead = sent.load(Ordering::SeqCst) * SMALL as u64;
    let (_, peak) = memory_kib(pid).unwrap();
    eprintln!(
        "paused message reader: sender {} KiB ahead; coordinator grew by {} KiB",
        ahead / 1024,
        peak.saturating_sub(idle_rss)
    );
    assert!(
        ahead <= MESSAGE_BOUND,
        "sender {ahead} bytes ahead, bound {MESSAGE_BOUND}"
    );
    assert!(
        peak.saturating_sub(idle_rss) <= COORDINATOR_BOUND_KIB,
        "coordinator grew by {} KiB",
        peak - idle_rss
    );

    // Bob reads now: every message arrives, in order and intact.
    let read = async {
        for n in 0..SMALL_PUSH {
            match slow_in.recv_message().await {
                Some(Incoming::Message(m)) => assert!(m[..] == small(n)[..], "message {n}"),
                other => panic!("message {n}: got {other:?}"),
            }
        }
    };
    let ((), slow_out) = within(STEP * 2, "paused pair drains", async {
        tokio::join!(read, async { sender.await.unwrap() })
    })
    .await;
    within_ok(STEP, "close", slow_out.close("done")).await;
    let _ = coordinator.start_kill();
}

/// Streams alice opens at once toward a bob who accepts none of them.
const MANY: u64 = 1000;
/// What each of them tries to push: 256 KiB, 250 MiB in all.
const EACH: u64 = 256 * 1024;
/// Most the sender may get ahead of a reader who takes none of its 1,000
/// streams. Each hop holds at most a connection's worth plus what the
/// relay has in hand: alice's send buffer (16 MiB), the coordinator's
/// receive window for alice (16 MiB), one read of at most 32 chunks of a
/// datagram (under 48 KiB) in hand per stream (47 MiB for 1,000), the
/// coordinator's send buffer toward bob (16 MiB) and bob's receive window
/// (16 MiB): 111 MiB, under half of what is pushed.
const MANY_BOUND: u64 = 112 * MIB;
/// Most the coordinator may grow by meanwhile: its own share of the above
/// (16 + 47 + 16 MiB) with room for the allocator and 1,000 streams' state.
const MANY_COORDINATOR_BOUND_KIB: u64 = 128 * 1024;

/// `streams_relayed` from the coordinator's `info --json`.
async fn streams_relayed(state: &std::path::Path) -> u64 {
    let out = tokio::process::Command::new(bin("qmesh-coordinator"))
        .args(["info", "--json", "--state-dir"])
        .arg(state)
        .output()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["data"]["streams_relayed"]
        .as_u64()
        .unwrap_or_else(|| panic!("no streams_relayed in {v}"))
}

/// 1,000 streams at a reader that takes none: the sender stops within the
/// bound, the coordinator's memory stays within its share, another pair
/// keeps flowing, and once bob reads, every stream arrives whole.
///
/// The streams are opened, and their headers relayed, before any pushes
/// data.
///
/// This test found that such a sender lost its session: the blocked
/// streams filled the connection windows, which the session stream's
/// heartbeats share, and the coordinator declared alice silent. Beats now
/// also travel as datagrams (protocol.md §13.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_to_a_paused_reader_hold_the_sender_back() {
    let Setup {
        mut coordinator,
        pid,
        clients: [alice, bob, carol, dave],
        _state: state,
    } = setup().await;
    let (many_out, many_in) = open_pair(&alice, &bob, "many").await;
    let (fast_out, fast_in) = open_pair(&carol, &dave, "fast").await;
    let (idle_rss, _) = memory_kib(pid).unwrap();
    let relayed_before = streams_relayed(state.path()).await;

    let mut streams = Vec::new();
    for _ in 0..MANY {
        streams.push(within_ok(STEP, "open", many_out.open_stream()).await);
    }
    within(STEP, "every header relayed", async {
        while streams_relayed(state.path()).await < relayed_before + MANY {}
    })
    .await;

    let written = Arc::new(AtomicU64::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for (s, mut stream) in (0u64..).zip(streams) {
        let written = written.clone();
        writers.spawn(async move {
            for part in 0..EACH / (64 * 1024) {
                let mut m = vec![(s % 251) as u8; 64 * 1024];
                m[..16].copy_from_slice(&[s.to_be_bytes(), part.to_be_bytes()].concat());
                stream.send(&m).await.unwrap();
                written.fetch_add(m.len() as u64, Ordering::SeqCst);
            }
            stream.finish().await.unwrap();
        });
    }
    // The time in which the writers could run ahead: carol moves 64 MiB.
    other_pair_moves(&fast_out, &fast_in).await;

    let ahead = written.load(Ordering::SeqCst);
    let (_, peak) = memory_kib(pid).unwrap();
    let grown = peak.saturating_sub(idle_rss);
    eprintln!(
        "1000 streams to a paused reader: sender {} MiB ahead (bound {} MiB) of {} MiB; \
         coordinator grew by {} KiB (bound {MANY_COORDINATOR_BOUND_KIB} KiB)",
        ahead / MIB,
        MANY_BOUND / MIB,
        MANY * EACH / MIB,
        grown
    );
    assert!(
        ahead <= MANY_BOUND,
        "sender {ahead} bytes ahead, bound {MANY_BOUND}"
    );
    assert!(
        grown <= MANY_COORDINATOR_BOUND_KIB,
        "coordinator grew by {grown} KiB"
    );

    // Bob reads now: 1,000 streams, each whole and its own. He reads them
    // side by side, as a reader of many streams must: one read to its end
    // before the next is taken would wait forever, since the other
    // streams' data fills the connection's window (RFC 9000 §4), whatever
    // carries it.
    let read = async {
        let mut readers = tokio::task::JoinSet::new();
        for _ in 0..MANY {
            let mut inbox = many_in.accept_stream().await.unwrap().unwrap();
            readers.spawn(async move {
                let first = inbox.recv().await.unwrap().unwrap();
                let s = u64::from_be_bytes(first[..8].try_into().unwrap());
                let mut parts = 1u64;
                while let Some(m) = inbox.recv().await.unwrap() {
                    assert_eq!(m.len(), 64 * 1024);
                    assert_eq!(m[..8], s.to_be_bytes(), "stream {s} mixed");
                    assert_eq!(m[8..16], parts.to_be_bytes(), "stream {s} order");
                    parts += 1;
                }
                assert_eq!(parts * 64 * 1024, EACH, "stream {s}");
                s
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        while let Some(s) = readers.join_next().await {
            let s = s.unwrap();
            assert!(seen.insert(s), "stream {s} twice");
        }
        seen.len() as u64
    };
    let drain = async { while writers.join_next().await.is_some() {} };
    let (n, ()) = within(STEP * 3, "the thousand streams drain", async {
        tokio::join!(read, drain)
    })
    .await;
    assert_eq!(n, MANY);
    let _ = coordinator.start_kill();
}

/// Broadcasts the sender pushes past a member that reads nothing.
const GROUP_SENT: u64 = 4096;
/// Each broadcast's body: under the group's 64 KiB limit.
const GROUP_BODY: usize = 60 * 1024;
/// Most the coordinator may grow by: the slow member's queue (256 events
/// of at most 64 KiB, protocol.md §19.4: 16 MiB), the sender's 16 MiB
/// connection window, and room for the allocator; far below the
/// 240 MiB sent.
const GROUP_BOUND_KIB: u64 = 64 * 1024;

/// A broadcast group with policy `lag` and a member that reads nothing:
/// the member's queue at the coordinator stays at its bound while 240 MiB
/// go past it (the coordinator's memory shows it), and once the member
/// reads, the broadcasts it gets and the missed counts add up to what
/// was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_group_member_costs_the_coordinator_its_queue_bound_only() {
    use qmesh_client::GroupEvent;
    use qmesh_integration_tests::target::CoordinatorProc;

    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("coordinator.toml");
    std::fs::write(
        &file,
        "[groups.big]\npolicy = \"lag\"\nbuffer = 256\nmax_message = 65536\n",
    )
    .unwrap();
    let dir = state.path().join("state");
    let (coordinator, ca) = CoordinatorProc::start_dev(
        &dir,
        &["--single".as_ref(), "--config".as_ref(), file.as_os_str()],
    )
    .await;
    let pid = coordinator.proc.pid();
    let trust = ClientConfig::trust_ca_file(&ca).unwrap();
    let client = |name: &str| {
        connect(ClientConfig::new(
            coordinator.address(),
            name,
            trust.clone(),
        ))
    };
    let (sender_client, slow_client, witness_client) =
        tokio::join!(client("sender"), client("slow"), client("witness"));
    let sender = within_ok(STEP, "join", sender_client.join("big")).await;
    let slow = within_ok(STEP, "join", slow_client.join("big")).await;
    let witness = within_ok(STEP, "join", witness_client.join("big")).await;
    let (idle_rss, _) = memory_kib(pid).unwrap();

    // A member that reads everything: once it has all of it (or its
    // missed counts), every broadcast has been through the coordinator.
    let witnessed = tokio::spawn(async move {
        let mut seen = 0u64;
        while seen < GROUP_SENT {
            match witness.recv().await.unwrap() {
                Some(GroupEvent::Message { .. }) => seen += 1,
                Some(GroupEvent::Missed { count }) => seen += count,
                other => panic!("the witness got {other:?}"),
            }
        }
    });
    within(STEP * 2, "sending", async {
        for n in 0..GROUP_SENT {
            let mut body = vec![(n % 251) as u8; GROUP_BODY];
            body[..8].copy_from_slice(&n.to_be_bytes());
            sender.send(&body).await.unwrap();
        }
    })
    .await;
    within_ok(STEP, "the witness has every broadcast", witnessed).await;
    let (_, peak) = memory_kib(pid).unwrap();
    let grown = peak.saturating_sub(idle_rss);
    eprintln!(
        "slow group member: {} MiB broadcast past it; coordinator grew by {grown} KiB \
         (bound {GROUP_BOUND_KIB} KiB)",
        GROUP_SENT * GROUP_BODY as u64 / MIB
    );
    assert!(
        grown <= GROUP_BOUND_KIB,
        "coordinator grew by {grown} KiB for one slow member"
    );

    // The member reads now: in order, and with the missed counts, all of it.
    let (mut received, mut missed, mut last) = (0u64, 0u64, None::<u64>);
    within(STEP, "the slow member reads", async {
        while received + missed < GROUP_SENT {
            match slow.recv().await.unwrap() {
                Some(GroupEvent::Message { body, .. }) => {
                    let n = u64::from_be_bytes(body[..8].try_into().unwrap());
                    assert!(last.is_none_or(|l| n > l), "{n} after {last:?}");
                    last = Some(n);
                    received += 1;
                }
                Some(GroupEvent::Missed { count }) => missed += count,
                other => panic!("the slow member got {other:?}"),
            }
        }
    })
    .await;
    eprintln!("slow group member: {received} received, {missed} missed");
    assert_eq!(received + missed, GROUP_SENT);
    assert!(missed > 0, "a member that read nothing missed nothing");
}
