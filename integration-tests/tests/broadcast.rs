//! Broadcast groups: every member's message reaches every member with the
//! coordinator-stamped sender, member counts, and the three policies for a
//! slow member (block, lag, evict), each with 20 members and one member
//! that does not read.
//!
//! Nothing sleeps to synchronise: members wait for each other's messages,
//! and the sender paces itself on what the fast members have received.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use qmesh_client::{Client, Group, GroupEvent, GroupPolicy, SendError};
use qmesh_coordinator::config::GroupConfig;
use qmesh_integration_tests::raw::Raw;
use qmesh_integration_tests::{within, within_ok, Mesh, STEP};
use qmesh_proto::codec::{read_frame, write_frame};
use qmesh_proto::codes::{OpenFailCode, StreamCode};
use qmesh_proto::msg::{JoinAnswer, StreamRequest};
use quinn::VarInt;
use tokio::sync::watch;

/// Connect `n` clients named `{prefix}00`.. and join each to `group`.
async fn members(mesh: &Mesh, prefix: &str, n: usize, group: &str) -> Vec<(Client, Group)> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let client = mesh.client(&format!("{prefix}{i:02}")).await;
        let joined = within_ok(STEP, "join", client.join(group)).await;
        out.push((client, joined));
    }
    out
}

/// Read events until `n` messages arrived; returns them as (from, body).
/// Any other event fails the test.
async fn messages(group: &Group, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match within_ok(STEP, "group event", group.recv()).await {
            Some(GroupEvent::Message { from, body }) => got.push((from, body.to_vec())),
            other => panic!("expected a message, got {other:?} after {}", got.len()),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_members_get_every_message_once_in_order_with_stamped_sender() {
    const N: usize = 20;
    const EACH: usize = 5;
    let mesh = Mesh::start().await;
    let all = members(&mesh, "m", N, "room").await;
    assert_eq!(all[0].1.members_at_join(), 1);
    assert_eq!(all[N - 1].1.members_at_join(), N as u64);
    assert_eq!(all[0].1.policy(), GroupPolicy::Lag);
    let count = within(STEP, "count", all[3].0.group_members("room")).await;
    assert_eq!(count.unwrap(), N as u64);

    let mut tasks = Vec::new();
    for (i, (_, group)) in all.iter().enumerate() {
        let group = group.clone();
        tasks.push(tokio::spawn(async move {
            let send = async {
                for k in 0..EACH {
                    group.send(format!("{i}:{k}").as_bytes()).await.unwrap();
                }
            };
            let (_, got) = tokio::join!(send, messages(&group, N * EACH));
            got
        }));
    }
    for (me, task) in tasks.into_iter().enumerate() {
        let got = within_ok(STEP, "member done", task).await;
        let mut next: HashMap<String, usize> = HashMap::new();
        for (from, body) in got {
            let text = String::from_utf8(body).unwrap();
            let (sender, k) = text.split_once(':').unwrap();
            let sender: usize = sender.parse().unwrap();
            assert_eq!(from, format!("m{sender:02}"), "member {me}: stamped sender");
            let k: usize = k.parse().unwrap();
            let expected = next.entry(from.clone()).or_default();
            assert_eq!(k, *expected, "member {me}: order of {from}'s messages");
            *expected += 1;
        }
        assert_eq!(next.len(), N, "member {me} heard from everyone");
        assert!(next.values().all(|&n| n == EACH), "member {me}: {next:?}");
    }

    // One leaves: its stream ends, and the count drops.
    let (_, leaver) = &all[N - 1];
    let reader = leaver.clone();
    within_ok(STEP, "leave", leaver.clone().leave()).await;
    assert!(within_ok(STEP, "end", reader.recv()).await.is_none());
    let count = within(STEP, "count", all[0].0.group_members("room")).await;
    assert_eq!(count.unwrap(), N as u64 - 1);
    // The others still talk.
    all[0].1.send(b"still here").await.unwrap();
    for (_, g) in &all[..N - 1] {
        let got = messages(g, 1).await;
        assert_eq!(got, vec![("m00".to_string(), b"still here".to_vec())]);
    }
    // Sending after leaving is refused locally.
    assert!(matches!(
        leaver.send(b"late").await,
        Err(SendError::Stream(_))
    ));
    assert_eq!(
        within_ok(STEP, "count", all[0].0.group_members("nobody-here")).await,
        0
    );
    mesh.coordinator.shutdown().await;
}

/// Fast members, one slow member, one sender: what each one got.
struct Run {
    /// Per fast member: message numbers received, in order.
    fast: Vec<Vec<u32>>,
    slow: Group,
    _slow_client: Client,
    _fast: Vec<(Client, Group)>,
    mesh: Mesh,
    observer: Client,
}

const FAST: usize = 20;
const TOTAL: u32 = 200;
const BODY: usize = 4096;
/// The sender waits for every fast member to have received all it sent
/// after each batch, so fast members never hold more than this many queued:
/// less than the buffer of 8.
const BATCH: u32 = 4;

fn body(n: u32) -> Vec<u8> {
    let mut b = vec![n as u8; BODY];
    b[..4].copy_from_slice(&n.to_be_bytes());
    b
}

fn number(body: &[u8]) -> u32 {
    u32::from_be_bytes(body[..4].try_into().unwrap())
}

/// 20 fast members and one slow member (joined last, reading nothing until
/// told to) in a group with `policy` and a buffer of 8; member f00 sends
/// 200 messages of 4 KiB. With `blocked`, checks that the sender is held
/// until the slow member reads. Returns what the fast members got.
async fn slow_member_run(policy: GroupPolicy, blocked: bool) -> Run {
    let mesh = Mesh::start_with(|c| {
        c.groups.insert(
            "g".into(),
            GroupConfig {
                policy,
                buffer: 8,
                max_message: 64 * 1024,
            },
        );
    })
    .await;
    let observer = mesh.client("observer").await;
    let fast = members(&mesh, "f", FAST, "g").await;
    // The slow member takes little into its QUIC window, so its queue at
    // the coordinator fills quickly.
    let mut config = mesh.config("slow");
    config.tuning.stream_window = 16 * 1024;
    let slow_client = within_ok(STEP, "connect slow", Client::connect(config)).await;
    let slow = within_ok(STEP, "join slow", slow_client.join("g")).await;
    assert_eq!(slow.members_at_join(), FAST as u64 + 1);
    assert_eq!(slow.policy(), policy);

    let mut progress = Vec::new();
    let mut readers = Vec::new();
    for (_, g) in &fast {
        let (tx, rx) = watch::channel(0u32);
        progress.push(rx);
        let g = g.clone();
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < TOTAL as usize {
                match g.recv().await.unwrap() {
                    Some(GroupEvent::Message { from, body }) => {
                        assert_eq!(from, "f00");
                        got.push(number(&body));
                        tx.send_replace(got.len() as u32);
                    }
                    other => panic!("a fast member got {other:?}"),
                }
            }
            got
        }));
    }
    let sender = fast[0].1.clone();
    let mut sending = tokio::spawn(async move {
        for n in 0..TOTAL {
            if n % BATCH == 0 {
                for p in progress.iter_mut() {
                    p.wait_for(|&got| got >= n).await.unwrap();
                }
            }
            sender.send(&body(n)).await.unwrap();
        }
    });
    if blocked {
        // The group waits for the slow member: the sender cannot get all
        // of its messages through while the slow member reads nothing.
        let early = tokio::time::timeout(Duration::from_secs(2), &mut sending).await;
        assert!(
            early.is_err(),
            "the sender finished while the group should wait"
        );
        let done = readers.iter().filter(|r| r.is_finished()).count();
        assert_eq!(
            done, 0,
            "fast members got everything while the group should wait"
        );
        // Now the slow member reads: it gets everything, and so does
        // everyone else.
        let got = messages(&slow, TOTAL as usize).await;
        let numbers: Vec<u32> = got.iter().map(|(_, b)| number(b)).collect();
        assert_eq!(numbers, (0..TOTAL).collect::<Vec<_>>());
    }
    within_ok(STEP, "sender", &mut sending).await;
    let mut got = Vec::new();
    for r in readers {
        got.push(within_ok(STEP, "fast member", r).await);
    }
    Run {
        fast: got,
        slow,
        _slow_client: slow_client,
        _fast: fast,
        mesh,
        observer,
    }
}

impl Run {
    fn all_fast_got_everything(&self) {
        assert_eq!(self.fast.len(), FAST);
        for got in &self.fast {
            assert_eq!(*got, (0..TOTAL).collect::<Vec<_>>());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_holds_the_group_for_a_slow_member() {
    let run = slow_member_run(GroupPolicy::Block, true).await;
    run.all_fast_got_everything();
    let count = within(STEP, "count", run.observer.group_members("g")).await;
    assert_eq!(count.unwrap(), FAST as u64 + 1);
    run.mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_skips_messages_for_a_slow_member_and_says_how_many() {
    let run = slow_member_run(GroupPolicy::Lag, false).await;
    run.all_fast_got_everything();
    // The slow member reads now: messages in order, with counts of the
    // skipped ones, adding up to everything sent.
    let (mut received, mut missed, mut last) = (0u64, 0u64, None);
    let mut missed_events = 0;
    while received + missed < TOTAL as u64 {
        match within_ok(STEP, "slow event", run.slow.recv()).await {
            Some(GroupEvent::Message { from, body }) => {
                assert_eq!(from, "f00");
                let n = number(&body);
                assert!(last < Some(n), "out of order: {n} after {last:?}");
                // Every skip is announced before the next message.
                assert_eq!(u64::from(n), received + missed, "unannounced gap");
                last = Some(n);
                received += 1;
            }
            Some(GroupEvent::Missed { count }) => {
                assert!(count > 0);
                missed += count;
                missed_events += 1;
            }
            other => panic!("the slow member got {other:?}"),
        }
    }
    assert_eq!(received + missed, TOTAL as u64);
    assert!(received < TOTAL as u64, "the slow member missed nothing");
    assert!(missed_events >= 1);
    let count = within(STEP, "count", run.observer.group_members("g")).await;
    assert_eq!(count.unwrap(), FAST as u64 + 1);
    run.mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_removes_a_slow_member() {
    let run = slow_member_run(GroupPolicy::Evict, false).await;
    run.all_fast_got_everything();
    let count = within(STEP, "count", run.observer.group_members("g")).await;
    assert_eq!(count.unwrap(), FAST as u64);
    // The slow member reads now: what was queued, then its eviction, then
    // the end of the stream.
    let mut last = None;
    let reason = loop {
        match within_ok(STEP, "slow event", run.slow.recv()).await {
            Some(GroupEvent::Message { body, .. }) => {
                let n = number(&body);
                assert!(last < Some(n));
                last = Some(n);
            }
            Some(GroupEvent::Evicted { reason }) => break reason,
            other => panic!("the slow member got {other:?}"),
        }
    };
    assert!(
        reason.contains("evicted from group \"g\"") && reason.contains("policy evict"),
        "{reason}"
    );
    assert!(last.is_none_or(|n| n < TOTAL - 1));
    assert!(within_ok(STEP, "end", run.slow.recv()).await.is_none());
    // It can send no more: the coordinator stopped its side.
    let sent = within(STEP, "send after eviction", async {
        loop {
            if let Err(e) = run.slow.send(b"anyone?").await {
                break e;
            }
        }
    })
    .await;
    assert!(
        matches!(sent, SendError::Stopped(c) if c == VarInt::from_u32(StreamCode::Evicted.code())),
        "{sent:?}"
    );
    run.mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_cannot_change_the_stamped_sender() {
    let mesh = Mesh::start().await;
    let all = members(&mesh, "s", 2, "spoof").await;
    let mallory = mesh.client("mallory").await;
    let m = within_ok(STEP, "join", mallory.join("spoof")).await;
    // A body that looks like a whole group event from s00, and one that
    // looks like a chat line from s00.
    let forged = GroupEvent::Message {
        from: "s00".into(),
        body: bytes::Bytes::from_static(b"trust me"),
    }
    .to_bytes();
    m.send(&forged).await.unwrap();
    m.send(b"s00: trust me").await.unwrap();
    for g in [&all[0].1, &all[1].1, &m] {
        let got = messages(g, 2).await;
        assert_eq!(
            got,
            vec![
                ("mallory".to_string(), forged.clone()),
                ("mallory".to_string(), b"s00: trust me".to_vec()),
            ]
        );
    }
    // Bad group names are refused before anything else.
    let bad = within(STEP, "bad join", mallory.join("No Such/Group")).await;
    assert!(matches!(bad, Err(ref e) if e.code() == Some(OpenFailCode::InvalidAddress)));
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_broadcast_cuts_off_only_that_member() {
    let mesh = Mesh::start_with(|c| {
        c.groups.insert(
            "ops".into(),
            GroupConfig {
                policy: GroupPolicy::Lag,
                buffer: 16,
                max_message: 1024,
            },
        );
    })
    .await;
    let honest = members(&mesh, "h", 3, "ops").await;
    assert_eq!(honest[0].1.max_message(), 1024);

    // A raw client says hello, joins, and declares a 1 GiB broadcast.
    let (raw, _session_send, _session_recv) = Raw::join(&mesh.target(), "hostile").await;
    let conn = &raw.conn;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(
        &mut send,
        &StreamRequest::Join {
            group: "ops".into(),
        },
    )
    .await
    .unwrap();
    let joined = within_ok(STEP, "joined", read_frame::<JoinAnswer, _>(&mut recv)).await;
    assert!(
        matches!(
            joined,
            Some(JoinAnswer::Joined {
                members: 4,
                max_message: 1024,
                ..
            })
        ),
        "{joined:?}"
    );
    // The length prefix and the start of the body in one write: the
    // coordinator may stop the stream as soon as it has read the prefix.
    let mut start = (1u32 << 30).to_be_bytes().to_vec();
    start.extend_from_slice(b"just the start");
    send.write_all(&start).await.unwrap();
    let stopped = within_ok(STEP, "stopped", send.stopped()).await;
    assert_eq!(
        stopped,
        Some(VarInt::from_u32(StreamCode::MessageTooLarge.code()))
    );
    // It is out of the group, its stream ends, and its connection lives.
    let _ = within(STEP, "stream end", recv.read_to_end(1 << 20)).await;
    let count = within(STEP, "count", honest[0].0.group_members("ops")).await;
    assert_eq!(count.unwrap(), 3);
    assert!(conn.close_reason().is_none());

    // The rest of the group goes on.
    honest[1].1.send(b"still fine").await.unwrap();
    for (_, g) in &honest {
        assert_eq!(
            messages(g, 1).await,
            vec![("h01".to_string(), b"still fine".to_vec())]
        );
    }
    // Honest senders get the limit locally.
    assert!(matches!(
        honest[0].1.send(&[0; 1025]).await,
        Err(SendError::TooLarge { max: 1024, .. })
    ));
    mesh.coordinator.shutdown().await;
}
