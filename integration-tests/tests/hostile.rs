//! Hostile clients: whatever a raw QUIC client sends, the coordinator closes
//! that client (or stops that one stream) with the matching code, says so at
//! `warn`, and no other client or channel notices.
//!
//! Each test sets up an honest pair (alice and bob with a joined channel)
//! before the attack and checks afterwards that a message still flows from
//! alice to bob and that neither side of their channel has ended.

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use qmesh_client::{Channel, Client};
use qmesh_integration_tests::{open_pair, within, Mesh, STEP};
use qmesh_proto::codec::{encode_frame, read_frame, write_frame};
use qmesh_proto::codes::{ConnCode, RejectCode, StreamCode};
use qmesh_proto::limits::MAX_CONTROL_FRAME;
use qmesh_proto::msg::{ChannelMsg, SessionMsg, StreamHeader};
use qmesh_proto::PROTOCOL_VERSION;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};

/// The bytes of one frame holding `msg`.
macro_rules! frame {
    ($msg:expr) => {
        encode_frame(&$msg).expect("encode frame")
    };
}

/// A hello followed by the (empty) interface list that protocol 4 sends
/// with it.
fn hello_frames(hello: &SessionMsg) -> Vec<u8> {
    let mut bytes = frame!(hello);
    bytes.extend(frame!(SessionMsg::Interfaces { list: vec![] }));
    bytes
}

// ---------------------------------------------------------------------------
// Warnings: every test installs (once per process) a subscriber that keeps
// the text of each `warn` and `error` event, so a test can check that the
// coordinator reported the attack. `QMESH_TEST_LOG` still prints logs.
// ---------------------------------------------------------------------------

mod warnings {
    use std::fmt::Write as _;

    use tracing::field::{Field, Visit};
    use tracing::{Event, Subscriber};
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;

    use super::{Mutex, OnceLock};

    fn seen() -> &'static Mutex<Vec<String>> {
        static SEEN: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
        SEEN.get_or_init(|| Mutex::new(Vec::new()))
    }

    struct Text(String);

    impl Visit for Text {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            let _ = write!(self.0, "{}={:?} ", field.name(), value);
        }
    }

    struct Capture;

    impl<S: Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            let mut text = Text(format!("{} ", event.metadata().level()));
            event.record(&mut text);
            seen()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(text.0);
        }
    }

    /// Install the capturing subscriber. Call before `Mesh::start`, whose
    /// own `init_tracing` then finds a subscriber in place and does nothing.
    pub(super) fn install() {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            let print = std::env::var("QMESH_TEST_LOG").ok().map(|filter| {
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(EnvFilter::new(filter))
            });
            let _ = tracing_subscriber::registry()
                .with(Capture.with_filter(LevelFilter::WARN))
                .with(print)
                .try_init();
        });
    }

    /// Whether a `warn` or `error` event mentioned every one of `needles`.
    pub(super) fn logged(needles: &[&str]) -> bool {
        seen()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|line| needles.iter().all(|n| line.contains(n)))
    }
}

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
        within(STEP, "alice sends", self.a.send_one(msg.as_bytes()))
            .await
            .unwrap_or_else(|e| panic!("alice cannot send {when}: {e}"));
        let mut at_bob = within(STEP, "bob accepts a stream", self.b.accept_stream())
            .await
            .unwrap_or_else(|e| panic!("bob cannot accept {when}: {e}"))
            .unwrap_or_else(|| panic!("bob's channel ended {when}"));
        let got = within(STEP, "bob receives", at_bob.recv())
            .await
            .unwrap_or_else(|e| panic!("bob cannot receive {when}: {e}"))
            .unwrap_or_else(|| panic!("bob's stream was empty {when}"));
        assert_eq!(&got[..], msg.as_bytes(), "message {when}");
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
// A raw QUIC client that speaks (or breaks) the protocol by hand.
// ---------------------------------------------------------------------------

struct Raw {
    _endpoint: Endpoint,
    conn: Connection,
    /// The address the coordinator sees this client at (it logs it).
    local: SocketAddr,
}

impl Raw {
    /// Connect (TLS verified against the mesh CA) without saying hello.
    async fn connect(mesh: &Mesh) -> Raw {
        let identity = qmesh_certs::Identity::self_signed("raw-peer").expect("identity");
        let (config, _report) = qmesh_certs::client_config_with_identity(&mesh.trust, &identity)
            .expect("client config");
        let endpoint =
            Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("client endpoint");
        let local = endpoint.local_addr().expect("local address");
        let connecting = endpoint
            .connect_with(config, mesh.coordinator.local_addr(), "localhost")
            .expect("start handshake");
        let conn = within(STEP, "raw handshake", connecting)
            .await
            .expect("raw handshake");
        Raw {
            _endpoint: endpoint,
            conn,
            local,
        }
    }

    /// Open a bidirectional stream (the first one is the session stream).
    async fn open_bi(&self) -> (SendStream, RecvStream) {
        within(STEP, "open bi stream", self.conn.open_bi())
            .await
            .expect("open bi stream")
    }

    /// Open a stream and write `bytes` on it, leaving it open.
    async fn send_bi(&self, bytes: &[u8]) -> (SendStream, RecvStream) {
        let (mut send, recv) = self.open_bi().await;
        within(STEP, "write", send.write_all(bytes))
            .await
            .expect("write");
        (send, recv)
    }

    /// Say a valid hello as `name` and read the welcome.
    async fn join(mesh: &Mesh, name: &str) -> (Raw, SendStream, RecvStream) {
        let raw = Raw::connect(mesh).await;
        let hello = SessionMsg::Hello {
            version: PROTOCOL_VERSION,
            name: name.into(),
            direct: None,
        };
        let (send, mut recv) = raw.send_bi(&hello_frames(&hello)).await;
        let reply = within(STEP, "welcome", read_frame::<SessionMsg, _>(&mut recv))
            .await
            .expect("read welcome");
        assert!(
            matches!(reply, Some(SessionMsg::Welcome { observed, .. }) if observed == raw.local),
            "expected a welcome for {name}, got {reply:?}"
        );
        (raw, send, recv)
    }

    /// Wait for the coordinator to close this connection; check the code.
    async fn closed_with(&self, code: ConnCode) -> quinn::ApplicationClose {
        let err = within(STEP, "raw connection closed", self.conn.closed()).await;
        match err {
            ConnectionError::ApplicationClosed(c)
                if c.error_code == VarInt::from_u32(code.code()) =>
            {
                c
            }
            other => panic!("expected the coordinator to close with {code}, got: {other}"),
        }
    }

    /// Closed with `code` and the coordinator said so at `warn`.
    async fn closed_for_violation(&self, code: ConnCode) {
        self.closed_with(code).await;
        let peer = self.local.to_string();
        let code_text = code.to_string();
        assert!(
            warnings::logged(&[&peer, &code_text]),
            "no warning names {peer} and \"{code_text}\""
        );
    }
}

fn stream_code(code: StreamCode) -> Option<VarInt> {
    Some(VarInt::from_u32(code.code()))
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_hello_closes_with_malformed() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let raw = Raw::connect(&mesh).await;
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
        let raw = Raw::connect(&mesh).await;
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

    let raw = Raw::connect(&mesh).await;
    // A well-framed body whose variant tag (0x7f) names no session message.
    let _session = raw.send_bi(&[0, 0, 0, 1, 0x7f]).await;
    raw.closed_for_violation(ConnCode::Malformed).await;

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_instead_of_hello_closes_with_unexpected_message() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let raw = Raw::connect(&mesh).await;
    let welcome = SessionMsg::Welcome {
        session: 1,
        observed: raw.local,
    };
    let _session = raw.send_bi(&frame!(welcome)).await;
    raw.closed_for_violation(ConnCode::UnexpectedMessage).await;

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_hello_after_welcome_closes_with_unexpected_message() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let (raw, mut send, _recv) = Raw::join(&mesh, "twice").await;
    let again = SessionMsg::Hello {
        version: PROTOCOL_VERSION,
        name: "twice".into(),
        direct: None,
    };
    within(STEP, "second hello", write_frame(&mut send, &again))
        .await
        .expect("write second hello");
    raw.closed_for_violation(ConnCode::UnexpectedMessage).await;

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_as_first_channel_frame_closes_with_unexpected_message() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let (raw, _send, _recv) = Raw::join(&mesh, "acceptor").await;
    // A new channel control stream must start with Open.
    let _channel = raw.send_bi(&frame!(ChannelMsg::Accept)).await;
    raw.closed_for_violation(ConnCode::UnexpectedMessage).await;

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
    let raw = Raw::connect(&mesh).await;
    let hello = SessionMsg::Hello {
        version: wrong,
        name: "future".into(),
        direct: None,
    };
    // An older or newer client sends no interface list: the version alone
    // decides.
    let (_send, mut recv) = raw.send_bi(&frame!(hello)).await;
    let reply = within(STEP, "reject", read_frame::<SessionMsg, _>(&mut recv))
        .await
        .expect("read reject");
    let Some(SessionMsg::Reject {
        code: RejectCode::VersionMismatch,
        message,
    }) = reply
    else {
        panic!("expected a version mismatch reject, got {reply:?}");
    };
    assert!(
        mentions_number(&message, PROTOCOL_VERSION),
        "the reject does not say which version is expected: {message:?}"
    );
    let close = raw.closed_with(ConnCode::VersionMismatch).await;
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

    let raw = Raw::connect(&mesh).await;
    let hello = SessionMsg::Hello {
        version: PROTOCOL_VERSION,
        name: "Not Valid".into(),
        direct: None,
    };
    let (_send, mut recv) = raw.send_bi(&hello_frames(&hello)).await;
    let reply = within(STEP, "reject", read_frame::<SessionMsg, _>(&mut recv))
        .await
        .expect("read reject");
    assert!(
        matches!(
            reply,
            Some(SessionMsg::Reject {
                code: RejectCode::InvalidName,
                ..
            })
        ),
        "expected an invalid name reject, got {reply:?}"
    );
    raw.closed_with(ConnCode::InvalidName).await;

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_data_stream_headers_stop_only_that_stream() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let (raw, _send, _recv) = Raw::join(&mesh, "streamer").await;
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
            frame!(StreamHeader::Data { channel: 1_000_000 }),
            StreamCode::UnknownChannel,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut send = within(STEP, "open uni stream", raw.conn.open_uni())
            .await
            .expect("open uni stream");
        within(STEP, "write header", send.write_all(&bytes))
            .await
            .expect("write header");
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
    let silent = Raw::connect(&mesh).await;
    let stalled = Raw::connect(&mesh).await;
    let _session = stalled.send_bi(&[0, 0]).await;
    silent.closed_for_violation(ConnCode::HelloTimeout).await;
    stalled.closed_for_violation(ConnCode::HelloTimeout).await;

    honest.after_attack(mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_claiming_a_connected_name_is_rejected_with_name_taken() {
    let mesh = start().await;
    let honest = Honest::join(&mesh).await;

    let raw = Raw::connect(&mesh).await;
    let hello = SessionMsg::Hello {
        version: PROTOCOL_VERSION,
        name: "alice".into(),
        direct: None,
    };
    let (_send, mut recv) = raw.send_bi(&hello_frames(&hello)).await;
    let reply = within(STEP, "reject", read_frame::<SessionMsg, _>(&mut recv))
        .await
        .expect("read reject");
    assert!(
        matches!(
            reply,
            Some(SessionMsg::Reject {
                code: RejectCode::NameTaken,
                ..
            })
        ),
        "expected a name taken reject, got {reply:?}"
    );
    raw.closed_with(ConnCode::NameTaken).await;

    // The name still routes to the real alice.
    let (at_bob, at_alice) = open_pair(&honest.bob, &honest.alice, "again").await;
    within(STEP, "bob sends", at_bob.send_one(b"still you?"))
        .await
        .expect("bob sends on the new channel");
    let mut s = within(STEP, "alice accepts", at_alice.accept_stream())
        .await
        .expect("alice accepts")
        .expect("a stream");
    let got = within(STEP, "alice receives", s.recv())
        .await
        .expect("alice receives")
        .expect("a message");
    assert_eq!(&got[..], b"still you?");
    drop((at_bob, at_alice));

    honest.after_attack(mesh).await;
}
