//! Text from peers in the coordinator's log, as an operator reads it: the
//! stderr of a `qmesh-coordinator` process.
//!
//! Raw peers send names that hold a newline, a made-up log line prefix and
//! a terminal escape, or ten thousand characters: in a hello, in an
//! enrollment, as an interface name after a hello, and, once joined, as the
//! peer and channel of an open. Each is refused, and each refusal is logged
//! with the text escaped and clipped: no line starts with the forged
//! prefix, no line holds the escape byte, and no line is longer than
//! [`MAX_LINE`].

use std::ffi::OsStr;

use qmesh_client::ClientConfig;
use qmesh_integration_tests::raw::{frame, hello, hello_frames, Raw};
use qmesh_integration_tests::target::{CoordinatorProc, Target};
use qmesh_integration_tests::STEP;
use qmesh_integration_tests::{within, within_ok};
use qmesh_proto::codec::read_frame;
use qmesh_proto::codes::ConnCode;
use qmesh_proto::msg::{
    ClientSession, Enroll, Greeting, Open, OpenAnswer, PathMode, StreamRequest,
};
use qmesh_proto::{Direction, Interface, PROTOCOL_VERSION};

/// A newline, then what a log line starts with, then a terminal escape.
const FORGED: &str = "\n[2026-01-01 00:00:00.000 WARN session/admin] forged \u{1b}[2J";

/// The start of a forged line.
const FORGED_START: &str = "[2026-01-01";

/// The longest line the coordinator may write for these refusals: a
/// reason is shown up to 1024 characters and a name up to 128 (each with
/// a short marker when cut), and a line has at most a few of each. Before
/// names were clipped, a 10,000-character interface name made a line of
/// over 20,000.
const MAX_LINE: usize = 3 * 1024;

/// Ten thousand characters.
fn long_name() -> String {
    "n".repeat(10_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_from_peers_are_escaped_and_clipped_in_the_log() {
    let state = tempfile::tempdir().expect("temporary directory");
    let (mut coord, ca) = CoordinatorProc::start_dev(state.path(), &[] as &[&OsStr]).await;
    let trust = ClientConfig::trust_ca_file(&ca).expect("CA file");
    let target = Target::new(coord.addr(), trust);

    // A hello whose name forges a line.
    let raw = Raw::connect(&target).await;
    let (_send, _recv) = raw
        .send_bi(&hello_frames(&hello(&format!("mallory{FORGED}"))))
        .await;
    raw.closed().await;
    let refused = coord
        .proc
        .stderr_line("`hello refused` for the forged name", |l| {
            l.contains("hello refused") && l.contains("mallory")
        })
        .await;
    assert!(
        refused.contains(r"mallory\n[2026-01-01 00:00:00.000 WARN session/admin] forged \u{1b}[2J"),
        "the name is shown escaped: {refused}"
    );

    // An enrollment for a name of ten thousand characters.
    let raw = Raw::connect(&target).await;
    let enroll = Greeting::Enroll(Enroll {
        version: PROTOCOL_VERSION,
        name: long_name().into(),
        token: Some("not-a-token".into()),
    });
    let (_send, _recv) = raw.send_bi(&frame(&enroll)).await;
    raw.closed().await;
    let refused = coord
        .proc
        .stderr_line("`hello refused` for the long enrollment", |l| {
            l.contains("hello refused") && l.contains("nnnn")
        })
        .await;
    assert!(
        refused.contains("…(9872 more bytes)"),
        "the name is clipped: {refused}"
    );

    // A hello whose interface list names an interface with ten thousand
    // characters, and one with a forged line.
    for name in [long_name(), format!("iface{FORGED}")] {
        let raw = Raw::connect(&target).await;
        let mut bytes = frame(&hello("offerer"));
        bytes.extend(frame(&ClientSession::Interfaces {
            list: vec![interface(&name)],
        }));
        let (_send, _recv) = raw.send_bi(&bytes).await;
        raw.closed().await;
        coord
            .proc
            .stderr_line("`closing connection` for the bad interface list", |l| {
                l.contains("closing connection") && l.contains("bad interface list")
            })
            .await;
    }

    // A joined client opens a channel whose peer forges a line and whose
    // channel name is ten thousand characters long.
    let (raw, _session_send, _session_recv) = Raw::join(&target, "opener").await;
    let open = StreamRequest::Open(Open {
        peer: format!("bob{FORGED}").into(),
        channel: long_name().into(),
        path: PathMode::Auto,
    });
    let (_send, mut recv) = raw.send_bi(&frame(&open)).await;
    let answer = within_ok(STEP, "open answer", read_frame::<OpenAnswer, _>(&mut recv)).await;
    assert!(
        matches!(answer, Some(OpenAnswer::Failed(_))),
        "the open is refused: {answer:?}"
    );
    let failed = coord
        .proc
        .stderr_line("`open failed` for the forged peer", |l| {
            l.contains("open failed")
        })
        .await;
    assert!(
        failed.contains(r"channel/opener>bob\n[2026-01-01"),
        "the channel's label is shown escaped: {failed}"
    );

    let exit = coord.proc.kill().await;
    let lines: Vec<&str> = exit.stderr.lines().collect();
    assert!(lines.len() >= 5, "the coordinator's log: {}", exit.stderr);
    for line in lines {
        assert!(
            !line.starts_with(FORGED_START),
            "a peer forged a log line: {line:?}\n--- the log\n{}",
            exit.stderr
        );
        assert!(
            !line.contains('\u{1b}'),
            "an escape byte reached the log: {line:?}"
        );
        let len = line.chars().count();
        assert!(
            len <= MAX_LINE,
            "a line of {len} characters: {}…",
            line.chars().take(300).collect::<String>()
        );
    }
}

/// A joined client that sends one bad data stream header after another
/// (about 3,100 WARN lines a second before the limit) is closed once it
/// is past its strikes, and the coordinator logs a few lines about it and
/// how many it left out, not one line per stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_flooding_bad_headers_is_closed_and_its_lines_are_limited() {
    use qmesh_coordinator::strikes::{LOG_PER_WINDOW, MAX_STRIKES};
    let state = tempfile::tempdir().expect("temporary directory");
    let (mut coord, ca) = CoordinatorProc::start_dev(state.path(), &[] as &[&OsStr]).await;
    let trust = ClientConfig::trust_ca_file(&ca).expect("CA file");
    let target = Target::new(coord.addr(), trust);
    let (raw, _session_send, _session_recv) = Raw::join(&target, "flooder").await;
    let mut sent = 0u32;
    while raw.conn.close_reason().is_none() && sent < 10 * MAX_STRIKES {
        let Ok(mut send) = raw.conn.open_uni().await else {
            break;
        };
        if send
            .write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
            .await
            .is_err()
        {
            break;
        }
        let _ = send.finish();
        // Each is stopped (or the connection closed) before the next.
        let _ = within(STEP, "the bad stream's end", send.stopped()).await;
        sent += 1;
    }
    let close = raw.closed().await;
    assert_eq!(
        close.error_code,
        quinn::VarInt::from_u32(ConnCode::Malformed.code()),
        "{close}"
    );
    let reason = String::from_utf8_lossy(&close.reason).into_owned();
    assert!(
        reason.contains(&format!(
            "{} protocol violations on streams",
            MAX_STRIKES + 1
        )),
        "{reason}"
    );
    // The close follows the stream that was one strike too many; it may
    // reach this side after one more stream was opened and written (the
    // last stream's stop can arrive before the close). CI saw 34.
    assert!(
        (MAX_STRIKES + 1..=MAX_STRIKES + 2).contains(&sent),
        "streams sent before the close: {sent}, want {} (or one more)",
        MAX_STRIKES + 1
    );
    let closing = coord
        .proc
        .stderr_line("`closing connection` for the flooder", |l| {
            l.contains("closing connection") && l.contains("flooder")
        })
        .await;
    assert!(closing.contains("protocol violations"), "{closing}");
    let exit = coord.proc.kill().await;
    let about: Vec<&str> = exit
        .stderr
        .lines()
        .filter(|l| l.contains("stopping a stream") && l.contains("flooder"))
        .collect();
    // The first window's lines, and the line that closed the session.
    assert_eq!(
        about.len() as u32,
        LOG_PER_WINDOW + 1,
        "lines about the flooder's streams:\n{}",
        about.join("\n")
    );
    let suppressed = format!("suppressed {} similar lines", MAX_STRIKES - LOG_PER_WINDOW);
    assert!(
        exit.stderr.lines().any(|l| l.contains(&suppressed)),
        "no `{suppressed}` line: {}",
        exit.stderr
    );
}

/// An interface called `name`, otherwise plain.
fn interface(name: &str) -> Interface {
    Interface {
        name: name.to_owned(),
        purpose: "test".into(),
        direction: Direction::Both,
        schema: String::new(),
        json_schema: None,
        version: "1".into(),
        forward: None,
    }
}
