//! Exactly one ending per channel side, counted on the wire.
//!
//! The client library records the first `Ending` of a channel and ignores
//! any later one, so a coordinator that sent two would look right through
//! it. Here both ends of each channel are raw peers that read their
//! channel control stream to its end and count what the coordinator sends:
//! after `Ready`, exactly one [`Ending`] and then the end of the stream, or
//! for an open that fails, one [`OpenAnswer::Failed`] and no ending.

#![allow(clippy::unwrap_used)]

use qmesh_integration_tests::raw::{frame, Raw};
use qmesh_integration_tests::{within, within_ok, Mesh, STEP};
use qmesh_proto::codec::{read_frame, ReadFrameError};
use qmesh_proto::msg::{
    Arrival, Close, Ending, IncomingAnswer, Open, OpenAnswer, PathMode, Ready, StreamRequest,
};
use quinn::{RecvStream, SendStream, VarInt};

/// One end of a channel held by a raw peer: its session and its channel
/// control stream.
struct End {
    raw: Raw,
    _session: (SendStream, RecvStream),
    send: SendStream,
    recv: RecvStream,
}

impl End {
    /// Write a close of the channel (no data streams), leaving the stream
    /// open.
    async fn write_close(&mut self, reason: &str) {
        let close = Close {
            reason: reason.into(),
            streams: 0,
            relayed: 0,
        };
        within_ok(STEP, "write close", self.send.write_all(&frame(&close))).await;
    }

    /// Close the channel as the protocol says: `Close`, then FIN.
    async fn close(&mut self, reason: &str) {
        self.write_close(reason).await;
        self.send.finish().unwrap();
    }

    /// The next ending the coordinator sends.
    async fn next(&mut self) -> Ending {
        within_ok(STEP, "an ending", read_frame::<Ending, _>(&mut self.recv))
            .await
            .expect("an ending, not the stream's end")
    }

    /// Every ending the coordinator sends until the stream ends, and how it
    /// ended: `None` when finished, the error otherwise.
    async fn endings(&mut self) -> (Vec<Ending>, Option<String>) {
        let mut seen = Vec::new();
        let end = within(STEP, "the control stream's end", async {
            loop {
                match read_frame::<Ending, _>(&mut self.recv).await {
                    Ok(Some(e)) => seen.push(e),
                    Ok(None) => break None,
                    Err(ReadFrameError::Io(e)) => break Some(e.to_string()),
                    Err(e) => panic!("not an ending on the control stream: {e}"),
                }
            }
        })
        .await;
        (seen, end)
    }
}

/// Raw `opener` opens `chat` on raw `callee` (relayed) and the callee
/// accepts; both have read their `Ready`.
async fn channel(mesh: &Mesh, opener: &str, callee: &str) -> (End, End) {
    let (a, a_send, a_recv) = Raw::join(&mesh.target(), opener).await;
    let (b, b_send, b_recv) = Raw::join(&mesh.target(), callee).await;
    let open = StreamRequest::Open(Open {
        peer: callee.into(),
        channel: "chat".into(),
        path: PathMode::Relay,
    });
    let (a_ctl_send, mut a_ctl_recv) = a.send_bi(&frame(&open)).await;
    let (mut b_ctl_send, mut b_ctl_recv) = within_ok(STEP, "offer", b.conn.accept_bi()).await;
    let arrival = within_ok(STEP, "offer", read_frame::<Arrival, _>(&mut b_ctl_recv)).await;
    assert!(
        matches!(&arrival, Some(Arrival::Channel(i)) if i.from.as_str() == opener),
        "{arrival:?}"
    );
    within_ok(
        STEP,
        "accept",
        b_ctl_send.write_all(&frame(&IncomingAnswer::Accept)),
    )
    .await;
    let b_ready = within_ok(
        STEP,
        "callee ready",
        read_frame::<Ready, _>(&mut b_ctl_recv),
    )
    .await;
    let a_ready = within_ok(
        STEP,
        "opener ready",
        read_frame::<OpenAnswer, _>(&mut a_ctl_recv),
    )
    .await;
    let Some(OpenAnswer::Ready(a_ready)) = a_ready else {
        panic!("the open fails: {a_ready:?}");
    };
    assert_eq!(Some(a_ready.channel), b_ready.map(|r| r.channel));
    (
        End {
            raw: a,
            _session: (a_send, a_recv),
            send: a_ctl_send,
            recv: a_ctl_recv,
        },
        End {
            raw: b,
            _session: (b_send, b_recv),
            send: b_ctl_send,
            recv: b_ctl_recv,
        },
    )
}

fn closed_with(endings: &[Ending], reason: &str) -> bool {
    matches!(endings, [Ending::Closed(c)] if c.reason == reason)
}

fn lost(endings: &[Ending]) -> bool {
    matches!(endings, [Ending::Lost { .. }])
}

/// A close reaches the other side as one `Closed`, even when the closer
/// sends it twice; the answering close reaches the closer as one `Closed`;
/// both streams then end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_sent_twice_reaches_the_peer_once_and_its_answer_once() {
    let mesh = Mesh::start().await;
    let (mut a, mut b) = channel(&mesh, "alice", "bob").await;
    a.write_close("done").await;
    a.close("done again").await;
    let (to_b, end) = b.endings().await;
    assert!(closed_with(&to_b, "done"), "bob got {to_b:?}");
    assert_eq!(end, None, "bob's stream finished after the ending");
    b.close("bye").await;
    let (to_a, end) = a.endings().await;
    assert!(closed_with(&to_a, "bye"), "alice got {to_a:?}");
    assert_eq!(end, None);
}

/// Both sides close at once: each gets the other's close, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_that_cross_reach_each_side_once() {
    let mesh = Mesh::start().await;
    let (mut a, mut b) = channel(&mesh, "alice", "bob").await;
    tokio::join!(a.close("from alice"), b.close("from bob"));
    let ((to_a, a_end), (to_b, b_end)) = tokio::join!(a.endings(), b.endings());
    assert!(closed_with(&to_a, "from bob"), "alice got {to_a:?}");
    assert!(closed_with(&to_b, "from alice"), "bob got {to_b:?}");
    assert_eq!((a_end, b_end), (None, None));
}

/// A side that closes and then vanishes: its peer gets the close, and no
/// `Lost` after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_then_the_closers_connection_gone_is_one_ending() {
    let mesh = Mesh::start().await;
    let (mut a, mut b) = channel(&mesh, "alice", "bob").await;
    a.write_close("leaving").await;
    let first = b.next().await;
    assert!(
        matches!(&first, Ending::Closed(c) if c.reason == "leaving"),
        "{first:?}"
    );
    a.raw.conn.close(VarInt::from_u32(0), b"gone");
    let (after, end) = b.endings().await;
    assert!(after.is_empty(), "bob got {after:?} after the close");
    assert_eq!(end, None);
}

/// A peer whose connection drops without a close: the other side gets one
/// `Lost`, and its stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_peer_is_one_lost() {
    let mesh = Mesh::start().await;
    let (mut a, b) = channel(&mesh, "alice", "bob").await;
    b.raw.conn.close(VarInt::from_u32(99), b"crash");
    let (to_a, end) = a.endings().await;
    assert!(lost(&to_a), "alice got {to_a:?}");
    assert_eq!(end, None);
}

/// A peer that finishes its control stream without a close abandoned the
/// channel: one `Lost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_stream_finished_without_a_close_is_one_lost() {
    let mesh = Mesh::start().await;
    let (mut a, mut b) = channel(&mesh, "alice", "bob").await;
    b.send.finish().unwrap();
    let (to_a, end) = a.endings().await;
    assert!(
        matches!(&to_a[..], [Ending::Lost { reason }] if reason.contains("without closing")),
        "alice got {to_a:?}"
    );
    assert_eq!(end, None);
    // Bob's own side still ends once, when alice closes.
    a.close("then closed").await;
    let (to_b, _) = b.endings().await;
    assert!(closed_with(&to_b, "then closed"), "bob got {to_b:?}");
}

/// An open the callee refuses, and one to a name nobody holds: one
/// `Failed` each, then the stream ends, with no ending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_open_is_one_failure_and_no_ending() {
    let mesh = Mesh::start().await;
    let (a, _a_send, _a_recv) = Raw::join(&mesh.target(), "alice").await;
    let (b, _b_send, _b_recv) = Raw::join(&mesh.target(), "bob").await;
    let open = |peer: &str| {
        frame(&StreamRequest::Open(Open {
            peer: peer.into(),
            channel: "chat".into(),
            path: PathMode::Relay,
        }))
    };

    let (_s, mut refused) = a.send_bi(&open("bob")).await;
    let (mut b_send, mut b_recv) = within_ok(STEP, "offer", b.conn.accept_bi()).await;
    within_ok(STEP, "offer", read_frame::<Arrival, _>(&mut b_recv)).await;
    let refuse = IncomingAnswer::Refuse {
        reason: "not now".into(),
    };
    within_ok(STEP, "refuse", b_send.write_all(&frame(&refuse))).await;

    let (_s, mut nobody) = a.send_bi(&open("nobody")).await;
    for (what, recv) in [("refused", &mut refused), ("to nobody", &mut nobody)] {
        let answer = within_ok(STEP, what, read_frame::<OpenAnswer, _>(recv)).await;
        assert!(
            matches!(answer, Some(OpenAnswer::Failed(_))),
            "{what}: {answer:?}"
        );
        let after = within(STEP, what, read_frame::<Ending, _>(recv)).await;
        assert!(
            matches!(after, Ok(None)),
            "{what}: after the failure: {after:?}"
        );
    }
}

/// A coordinator shutting down sends each side at most one ending before
/// the connection goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_shutdown_is_at_most_one_ending_per_side() {
    let mesh = Mesh::start().await;
    let (mut a, mut b) = channel(&mesh, "alice", "bob").await;
    within(STEP, "shutdown", mesh.coordinator.shutdown()).await;
    let ((to_a, _), (to_b, _)) = tokio::join!(a.endings(), b.endings());
    assert!(to_a.len() <= 1, "alice got {to_a:?}");
    assert!(to_b.len() <= 1, "bob got {to_b:?}");
    assert!(to_a
        .iter()
        .chain(&to_b)
        .all(|e| matches!(e, Ending::Lost { .. })));
}
