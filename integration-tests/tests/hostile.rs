//! Hostile clients: whatever a raw QUIC client sends, the coordinator closes
//! that client (or stops that one stream) with the matching code, says so at
//! `warn`, and no other client or channel notices.
//!
//! Each test sets up an honest pair (alice and bob with a joined channel)
//! before the attack and checks afterwards that a message still flows from
//! alice to bob and that neither side of their channel has ended.

use std::time::Duration;

use qmesh_client::{Channel, Client};
use qmesh_integration_tests::raw::{frame, hello, hello_frames, stream_code, Raw};
use qmesh_integration_tests::{message_flows, open_pair, warnings, within, within_ok, Mesh, STEP};
use qmesh_proto::codec::write_frame;
use qmesh_proto::codes::{ConnCode, RejectCode, StreamCode};
use qmesh_proto::limits::MAX_CONTROL_FRAME;
use qmesh_proto::msg::{Greeting, Hello, HelloAnswer, IncomingAnswer, StreamHeader, Welcome};
use qmesh_proto::PROTOCOL_VERSION;
use qmesh_proto::{SessionId, StreamId};

/// Start a coordinator, with the warning capture in place.
async fn start_with(adjust: impl FnOnce(&mut qmesh_coordinator::Config)) -> Mesh {
    warnings::install();
    Mesh::start_with(adjust).await
}

async fn start() -> Mesh {
    start_with(|_| {}).await
}

// ---------------------------------------------------------------------------
// The honest pair that must not notice anything.
// ---------------------------------------------------------------------------

struct Honest {
    alice: Client,
    bob: Client,
    a: Channel,
    b: Channel,
}

impl Honest {
    async fn join(mesh: &Mesh) -> Honest {
        let alice = mesh.client("alice").await;
        let bob = mesh.client("bob").await;
        let (a, b) = open_pair(&alice, &bob, "chat").await;
        let honest = Honest { alice, bob, a, b };
        honest.check("before the attack").await;
        honest
    }

    /// A message still flows alice → bob, and the channel has not ended.
    async fn check(&self, when: &str) {
        let msg = format!("alice to bob, {when}");
        message_flows(&self.a, &self.b, msg.as_bytes()).await;
        assert_eq!(self.a.end(), None, "alice's side of the channel {when}");
        assert_eq!(self.b.end(), None, "bob's side of the channel {when}");
    }

    async fn after_attack(self, mesh: Mesh) {
        self.check("after the attack").await;
        drop(self);
        within(STEP, "coordinator shutdown", mesh.coordinator.shutdown()).await;
    }
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_hello_closes_with_malformed() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let raw = Raw::connect(&mesh.target()).await;
    // A 3-byte body that is no message: 0xff is no valid variant tag.
    let _session = raw.send_bi(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await;
    raw.closed_for_violation(ConnCode::Malformed).await;

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_hello_closes_with_frame_too_large_without_waiting_for_the_body() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    for declared in [u32::MAX, MAX_CONTROL_FRAME as u32 + 1] {
        let raw = Raw::connect(&mesh.target()).await;
        // Only the length prefix: no body follows and the stream stays open,
        // so a coordinator that waited for the body would hit the hello
        // timeout (another code) instead.
        let _session = raw.send_bi(&declared.to_be_bytes()).await;
        raw.closed_for_violation(ConnCode::FrameTooLarge).await;
    }

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_message_as_hello_closes_with_malformed() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let raw = Raw::connect(&mesh.target()).await;
    // A well-framed body whose variant tag (0x7f) names no session message.
    let _session = raw.send_bi(&[0, 0, 0, 1, 0x7f]).await;
    raw.closed_for_violation(ConnCode::Malformed).await;

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_instead_of_hello_closes_with_malformed() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    // The coordinator's own answer sent back to it: since protocol 5 the
    // first frame is read as a greeting, and a welcome is not one.
    let raw = Raw::connect(&mesh.target()).await;
    let welcome = HelloAnswer::Welcome(Welcome {
        session: SessionId(1),
        observed: raw.local,
    });
    let _session = raw.send_bi(&frame(&welcome)).await;
    raw.closed_for_violation(ConnCode::Malformed).await;

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_hello_after_welcome_closes_with_unexpected_message() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let (raw, mut send, _recv) = Raw::join(&mesh.target(), "twice").await;
    within_ok(
        STEP,
        "second hello",
        write_frame(&mut send, &hello("twice")),
    )
    .await;
    raw.closed_for_violation(ConnCode::UnexpectedMessage).await;

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_as_first_channel_frame_closes_with_malformed() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let (raw, _send, _recv) = Raw::join(&mesh.target(), "acceptor").await;
    // A stream a client opens must start with a stream request; a callee's
    // answer is not one.
    let _channel = raw.send_bi(&frame(&IncomingAnswer::Accept)).await;
    raw.closed_for_violation(ConnCode::Malformed).await;

    honest.after_attack(mesh).await;
}

/// Whether `message` names `version` as a number of its own.
fn mentions_number(message: &str, version: u32) -> bool {
    message
        .split(|c: char| !c.is_ascii_digit())
        .any(|word| word == version.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_with_another_version_is_rejected_with_version_mismatch() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let wrong = PROTOCOL_VERSION + 41;
    let raw = Raw::connect(&mesh.target()).await;
    let hello = Greeting::Hello(Hello {
        version: wrong,
        name: "future".into(),
        direct: None,
    });
    // An older or newer client sends no interface list: the version alone
    // decides.
    let (_send, recv) = raw.send_bi(&frame(&hello)).await;
    let (message, close) = raw.rejected_with(recv, RejectCode::VersionMismatch).await;
    assert!(
        mentions_number(&message, PROTOCOL_VERSION),
        "the reject does not say which version is expected: {message:?}"
    );
    assert_eq!(
        &close.reason[..],
        message.as_bytes(),
        "the close carries the reject's sentence"
    );

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_with_an_invalid_name_is_rejected_with_invalid_name() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let raw = Raw::connect(&mesh.target()).await;
    let (_send, recv) = raw.send_bi(&hello_frames(&hello("Not Valid"))).await;
    raw.rejected_with(recv, RejectCode::InvalidName).await;

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_data_stream_headers_stop_only_that_stream() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let (raw, _send, _recv) = Raw::join(&mesh.target(), "streamer").await;
    let cases: [(&str, Vec<u8>, StreamCode); 3] = [
        (
            "garbage header",
            vec![0, 0, 0, 3, 0xff, 0xff, 0xff],
            StreamCode::Malformed,
        ),
        (
            "oversized header",
            u32::MAX.to_be_bytes().to_vec(),
            StreamCode::FrameTooLarge,
        ),
        (
            "header naming a channel that does not exist",
            frame(&StreamHeader::Data {
                channel: StreamId(1_000_000),
            }),
            StreamCode::UnknownChannel,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut send = within_ok(STEP, "open uni stream", raw.conn.open_uni()).await;
        within_ok(STEP, "write header", send.write_all(&bytes)).await;
        let stopped = within(STEP, "stream stopped", send.stopped())
            .await
            .unwrap_or_else(|e| panic!("{what}: stream failed instead of being stopped: {e}"));
        assert_eq!(stopped, stream_code(code), "{what}: stop code");
        assert!(
            raw.conn.close_reason().is_none(),
            "{what}: the connection was closed: {:?}",
            raw.conn.close_reason()
        );
    }
    assert!(
        warnings::logged(&["streamer"]),
        "no warning names the client that sent a bad header"
    );

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_closes_with_hello_timeout() {
    let mesh = start_with(|c| c.hello_timeout = Duration::from_millis(500)).await;
    let honest = Honest::join(&mesh).await;

    // One client says nothing at all; another starts a hello and stalls
    // halfway through the length prefix.
    let silent = Raw::connect(&mesh.target()).await;
    let stalled = Raw::connect(&mesh.target()).await;
    let _session = stalled.send_bi(&[0, 0]).await;
    silent.closed_for_violation(ConnCode::HelloTimeout).await;
    stalled.closed_for_violation(ConnCode::HelloTimeout).await;

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_claiming_a_connected_name_is_rejected_with_name_taken() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let raw = Raw::connect(&mesh.target()).await;
    let (_send, recv) = raw.send_bi(&hello_frames(&hello("alice"))).await;
    raw.rejected_with(recv, RejectCode::NameTaken).await;

    // The name still routes to the real alice.
    let (at_bob, at_alice) = open_pair(&honest.bob, &honest.alice, "again").await;
    message_flows(&at_bob, &at_alice, b"still you?").await;
    drop((at_bob, at_alice));

    honest.after_attack(mesh).await;
}

/// Streams that each declare a 16 KiB header and send only part of it: the
/// coordinator reads at most `HEADER_BUDGET` bytes of such headers for
/// one session at once, stops the streams past it with `TooManyStreams`
/// before allocating their bodies, and closes the session once those
/// refusals pass its strikes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_headers_past_the_session_budget_are_stopped_then_the_session_closed() {
    use qmesh_coordinator::limit::HEADER_BUDGET;
    use qmesh_coordinator::strikes::MAX_STRIKES;
    // Long enough that no held header is stopped for being late, and that
    // the raw client, which sends no heartbeats, is not lost for its
    // silence on a loaded machine before the attack is over.
    let mesh = start_with(|c| {
        c.hello_timeout = Duration::from_secs(600);
        c.heartbeat = qmesh_proto::heartbeat::Heartbeat::new(Duration::from_secs(60), 10);
    })
    .await;
    let honest = Honest::join(&mesh).await;
    let (raw, _send, _recv) = Raw::join(&mesh.target(), "hoarder").await;
    let held = HEADER_BUDGET / MAX_CONTROL_FRAME;
    let mut partial = (MAX_CONTROL_FRAME as u32).to_be_bytes().to_vec();
    partial.extend([0u8; 100]);
    let mut streams = Vec::new();
    let mut over_budget = 0;
    // The held ones, then one stream at a time past them until the session
    // is closed.
    while raw.conn.close_reason().is_none() && over_budget <= 10 * MAX_STRIKES as usize {
        let Ok(mut send) = raw.conn.open_uni().await else {
            break;
        };
        if send.write_all(&partial).await.is_err() {
            break;
        }
        if streams.len() >= held {
            match within(STEP, "a stream past the budget ends", send.stopped()).await {
                Ok(code) => {
                    assert_eq!(
                        code,
                        stream_code(StreamCode::TooManyStreams),
                        "past the budget"
                    );
                    over_budget += 1;
                    // Give the stream's credit back, as a peer must before
                    // it may open more.
                    let _ = send.reset(quinn::VarInt::from_u32(0));
                    continue;
                }
                Err(_) => break,
            }
        }
        streams.push(send);
    }
    let close = raw.closed_with(ConnCode::Malformed).await;
    let reason = String::from_utf8_lossy(&close.reason).into_owned();
    assert!(reason.contains("stream headers in flight"), "{reason}");
    assert!(
        over_budget >= 1 && over_budget <= MAX_STRIKES as usize + 1,
        "{over_budget} streams stopped for the budget"
    );
    // The budget held exactly this many partial headers.
    assert_eq!(streams.len(), held);
    honest.after_attack(mesh).await;
}

/// One host completes handshakes and then says nothing, more of them than
/// the coordinator takes before hellos: once the coordinator is under load
/// (a quarter of `max_pending`) the host gets no more than its share
/// (`max_pending_per_source`), and a client from another address is still
/// admitted. Two loopback addresses stand for the two hosts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_holding_silent_handshakes_keeps_only_its_share_of_the_places() {
    const MAX_PENDING: usize = 64;
    const PER_SOURCE: usize = 8;
    let mesh = start_with(|c| {
        c.max_pending = MAX_PENDING;
        c.max_pending_per_source = PER_SOURCE;
        // The silent ones stay pending for the whole test.
        c.hello_timeout = Duration::from_secs(600);
    })
    .await;
    let target = mesh.target();
    let attacker: std::net::IpAddr = [127, 0, 0, 2].into();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..2 * MAX_PENDING {
        match within(
            STEP,
            "a silent handshake",
            Raw::try_connect_from(&target, attacker),
        )
        .await
        {
            Ok(raw) => held.push(raw),
            Err(quinn::ConnectionError::ConnectionClosed(c))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                refused += 1
            }
            Err(e) => panic!("a handshake from the attacker ended otherwise: {e}"),
        }
    }
    // Up to the load mark, then nothing more: it holds more than its share.
    let mark = MAX_PENDING / 4;
    assert_eq!(held.len(), mark, "handshakes the attacker holds");
    assert_eq!(refused, 2 * MAX_PENDING - mark);
    // A client from another address joins, while the attacker still holds
    // its share.
    let honest = within_ok(
        STEP,
        "the honest handshake",
        Raw::try_connect_from(&target, [127, 0, 0, 3].into()),
    )
    .await;
    let (_raw, _send, _recv) = honest.say_hello("honest").await;
    assert!(held.iter().all(|r| r.conn.close_reason().is_none()));
    // Once the attacker's handshakes go, its places come back.
    drop(held);
    within(STEP, "the attacker's places freed", async {
        loop {
            match Raw::try_connect_from(&target, attacker).await {
                Ok(raw) => return raw,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await;
}
