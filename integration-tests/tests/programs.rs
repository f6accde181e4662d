//! The helpers of `programs` against the real programs, with no qmesh in
//! between: each server serves and each client program reaches it, so a
//! forwarding test that fails points at the forwarding.

use std::path::Path;
use std::time::Duration;

use qmesh_integration_tests::payload;
use qmesh_integration_tests::programs::{
    http_server, iperf3_server, redis_tcp, redis_unix, require, run, run_with_input, sha256_file,
    show, socat_echo, socat_udp_echo, Program,
};

/// The longest a client program here may run.
const LIMIT: Duration = Duration::from_secs(30);

/// Every program in `programs` is installed (or the test is skipped).
fn all_installed(programs: &[&str]) -> bool {
    programs.iter().all(|p| require(p).is_some())
}

#[test]
fn curl_fetches_a_file_from_the_http_server() {
    if !all_installed(&["python3", "curl"]) {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let file = root.path().join("payload.bin");
    std::fs::write(&file, payload(1, 1 << 20)).expect("writing the payload");
    let (server, port) = http_server(root.path());

    let out_dir = tempfile::tempdir().expect("tempdir");
    let fetched = out_dir.path().join("fetched.bin");
    let url = format!("http://127.0.0.1:{port}/payload.bin");
    let out = run(
        "curl",
        &["-sS", "--fail", "-o", &fetched.to_string_lossy(), &url],
        LIMIT,
    );
    assert!(
        out.status.success(),
        "curl: {}\n{}",
        show(&out),
        server.log()
    );
    assert_eq!(
        std::fs::metadata(&fetched).expect("the fetched file").len(),
        1 << 20
    );
    assert_eq!(
        sha256_file(&fetched),
        sha256_file(&file),
        "the fetched file differs"
    );
}

/// `redis-cli ARGS...` (to a server `to` names), which must succeed; its
/// stdout, trimmed.
fn redis_cli(to: &[&str], args: &[&str], server: &Program) -> String {
    let all: Vec<&str> = to.iter().chain(args).copied().collect();
    let out = run("redis-cli", &all, LIMIT);
    assert!(
        out.status.success(),
        "redis-cli: {}\n{}",
        show(&out),
        server.log()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn set_and_get(to: &[&str], server: &Program) {
    assert_eq!(
        redis_cli(to, &["SET", "greeting", "hello mesh"], server),
        "OK"
    );
    assert_eq!(redis_cli(to, &["GET", "greeting"], server), "hello mesh");
}

#[test]
fn redis_cli_sets_and_gets_over_tcp() {
    if !all_installed(&["redis-server", "redis-cli"]) {
        return;
    }
    let (server, port) = redis_tcp();
    let port = port.to_string();
    set_and_get(&["-h", "127.0.0.1", "-p", &port], &server);
}

#[test]
fn redis_cli_sets_and_gets_over_the_unix_socket() {
    if !all_installed(&["redis-server", "redis-cli"]) {
        return;
    }
    let (server, socket) = redis_unix();
    assert!(Path::new(&socket).exists(), "{}", socket.display());
    set_and_get(&["-s", &socket.to_string_lossy()], &server);
}

#[test]
fn an_iperf3_client_sends_bytes_to_the_server() {
    if !all_installed(&["iperf3"]) {
        return;
    }
    let (server, port) = iperf3_server();
    let port = port.to_string();
    let out = run(
        "iperf3",
        &["-c", "127.0.0.1", "-p", &port, "-t", "1", "-J"],
        LIMIT,
    );
    assert!(
        out.status.success(),
        "iperf3: {}\n{}",
        show(&out),
        server.log()
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)));
    for sum in ["sum_sent", "sum_received"] {
        let bytes = report["end"][sum]["bytes"].as_u64();
        assert!(
            bytes.is_some_and(|b| b > 0),
            "end.{sum}.bytes is {bytes:?}: {}",
            show(&out)
        );
    }
}

#[test]
fn socat_echoes_a_line() {
    if !all_installed(&["socat"]) {
        return;
    }
    let (server, port) = socat_echo();
    let to = format!("TCP:127.0.0.1:{port}");
    let out = run_with_input("socat", &["-", &to], b"hello through socat\n", LIMIT);
    assert!(
        out.status.success(),
        "socat: {}\n{}",
        show(&out),
        server.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello through socat\n",
        "{}",
        show(&out)
    );
}

#[test]
fn a_dropped_program_is_stopped() {
    let program = Program::start("sleep", &["600"]);
    let pid = program.pid();
    let proc_dir = format!("/proc/{pid}");
    assert!(Path::new(&proc_dir).exists(), "sleep is running");
    drop(program);
    // Killed and reaped: its pid is gone (barring reuse in this instant).
    assert!(!Path::new(&proc_dir).exists(), "sleep {pid} still exists");
}

#[test]
#[should_panic(expected = "ran longer than")]
fn a_client_program_over_its_limit_is_killed() {
    run("sleep", &["600"], Duration::from_millis(300));
}

#[test]
fn socat_echoes_datagrams_whole_to_their_sender() {
    if !all_installed(&["socat"]) {
        return;
    }
    let (server, port) = socat_udp_echo();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("binding a UDP socket");
    socket
        .set_read_timeout(Some(LIMIT))
        .expect("setting a read timeout");
    let mut buf = vec![0u8; 1 << 16];
    for len in [1usize, 1_400, 60_000] {
        let datagram = payload(len as u64, len);
        socket
            .send_to(&datagram, ("127.0.0.1", port))
            .expect("sending a datagram");
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no echo of {len} bytes: {e}\n{}", server.log()));
        assert_eq!(&buf[..n], &datagram[..], "the echo of {len} bytes");
    }
}
