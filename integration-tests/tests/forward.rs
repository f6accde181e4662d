//! Forwarding real programs' traffic through `qmesh expose` and `qmesh
//! forward`: curl and an HTTP server, redis over TCP and a Unix socket,
//! iperf3 over TCP and UDP, socat half-closes, and the faults a route must
//! survive. Every scenario runs relay-only and direct-only, through the
//! real binaries and a real coordinator process.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use qmesh_integration_tests::process::{qmesh, show as show_exit, Proc};
use qmesh_integration_tests::programs::{self, free_port, require, show};
use qmesh_integration_tests::target::CoordinatorProc;
use tempfile::TempDir;

/// The longest a client program may run.
const RUN: Duration = Duration::from_secs(120);

/// The tests here share the machine: each takes this lock shared, and the
/// UDP loss tests take it alone, so the loss they compare with the plain
/// run is not the other tests' load on two cores.
static LOAD: std::sync::LazyLock<tokio::sync::RwLock<()>> =
    std::sync::LazyLock::new(|| tokio::sync::RwLock::new(()));

/// A coordinator process with its development CA, and a state directory
/// for the clients.
struct Mesh {
    coord: CoordinatorProc,
    ca: PathBuf,
    clients: TempDir,
    _state: TempDir,
}

impl Mesh {
    async fn start() -> Mesh {
        let state = TempDir::new().expect("temp dir");
        let (coord, ca) = CoordinatorProc::start_dev(state.path(), &[] as &[&OsStr]).await;
        Mesh {
            coord,
            ca,
            clients: TempDir::new().expect("temp dir"),
            _state: state,
        }
    }

    fn qmesh(&self, args: &[&str]) -> Proc {
        qmesh(&self.coord.v4(), &self.ca, self.clients.path(), args)
    }

    /// `qmesh --name WHO expose NAME TARGET`, once it says so.
    async fn expose(&self, who: &str, name: &str, target: &str) -> Proc {
        let mut p = self.qmesh(&["--name", who, "expose", name, target]);
        p.stdout_line("`exposing`", |l| l.starts_with("exposing "))
            .await;
        p
    }

    /// `qmesh --name WHO forward --mode MODE LISTEN TO EXTRA...`, once the
    /// route is up; checks the path the route took.
    async fn forward(&self, who: &str, mode: &str, listen: &str, to: &str, extra: &[&str]) -> Proc {
        let mut args = vec!["--name", who, "forward", "--mode", mode, listen, to];
        args.extend(extra);
        let mut p = self.qmesh(&args);
        let up = p
            .stdout_line("`route … up`", |l| {
                l.starts_with("route ") && l.contains(" up: ")
            })
            .await;
        let want = if mode == "direct" {
            "(direct"
        } else {
            "(relay)"
        };
        assert!(
            up.ends_with(')') && up.contains(want),
            "{mode} route took another path: {up}"
        );
        p
    }
}

/// Run a client program on a blocking thread, so the test's runtime goes
/// on reading the qmesh processes' output.
async fn run(program: &'static str, args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        programs::run(program, &args, RUN)
    })
    .await
    .expect("the program's thread")
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn need(programs: &[&str]) -> bool {
    programs.iter().all(|p| require(p).is_some())
}

/// A file of `len` pseudo-random bytes.
fn random_file(path: &Path, len: usize) {
    let mut file = std::fs::File::create(path).expect("create");
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let n = left.min(chunk.len());
        file.write_all(&chunk[..n]).expect("write");
        left -= n;
    }
}

async fn http_through(mode: &str) {
    if !need(&["python3", "curl"]) {
        return;
    }
    let root = TempDir::new().expect("temp dir");
    random_file(&root.path().join("big.bin"), 100 << 20);
    random_file(&root.path().join("small.bin"), 4096);
    let (_server, port) = programs::http_server(root.path());
    let mesh = Mesh::start().await;
    let _bob = mesh.expose("bob", "web", &format!("tcp/$4:{port}")).await;
    let local = free_port();
    let _alice = mesh
        .forward(
            "alice",
            mode,
            &format!("tcp/$4:{local}"),
            "mesh/bob!web",
            &[],
        )
        .await;

    let out = TempDir::new().expect("temp dir");
    let got = out.path().join("big.bin");
    let url = format!("http://127.0.0.1:{local}/big.bin");
    let fetched = run(
        "curl",
        strings(&["-sS", "-f", "-o", got.to_str().expect("a UTF-8 path"), &url]),
    )
    .await;
    assert!(fetched.status.success(), "curl: {}", show(&fetched));
    assert_eq!(
        programs::sha256_file(&got),
        programs::sha256_file(&root.path().join("big.bin")),
        "the 100 MiB file arrived changed"
    );

    // 200 requests at once, each its own connection.
    let url = format!("http://127.0.0.1:{local}/small.bin");
    let mut all = Vec::new();
    for _ in 0..200 {
        all.push(run(
            "curl",
            strings(&["-sS", "-f", "-o", "/dev/null", "-w", "%{http_code}", &url]),
        ));
    }
    let outcomes = futures_join_all(all).await;
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.status.success() || o.stdout != b"200")
        .map(show)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 200 requests failed; first: {}",
        failed.len(),
        failed[0]
    );
}

/// Await every future, all at once.
async fn futures_join_all<T: Send + 'static>(
    futs: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_a_relayed_forward_gets_100_mib_whole_and_200_requests_at_once() {
    let _shared = LOAD.read().await;
    http_through("relay").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_a_direct_forward_gets_100_mib_whole_and_200_requests_at_once() {
    let _shared = LOAD.read().await;
    http_through("direct").await;
}

async fn redis_through(mode: &str) {
    if !need(&["redis-server", "redis-cli", "redis-benchmark"]) {
        return;
    }
    let (_tcp, port) = programs::redis_tcp();
    let (_unix, socket) = programs::redis_unix();
    let mesh = Mesh::start().await;
    let _bob = mesh.expose("bob", "cache", &format!("tcp/$4:{port}")).await;
    let _carol = mesh
        .expose("carol", "cache", &format!("unix/{}", socket.display()))
        .await;
    let (via_tcp, via_unix) = (free_port(), free_port());
    let _a1 = mesh
        .forward(
            "alice",
            mode,
            &format!("tcp/$4:{via_tcp}"),
            "mesh/bob!cache",
            &[],
        )
        .await;
    let _a2 = mesh
        .forward(
            "dave",
            mode,
            &format!("tcp/$4:{via_unix}"),
            "mesh/carol!cache",
            &[],
        )
        .await;
    for direct in [
        vec!["-p".to_owned(), port.to_string()],
        vec!["-s".to_owned(), socket.display().to_string()],
    ] {
        let mut args = direct;
        args.extend(strings(&["DEL", "key:__rand_int__"]));
        run("redis-cli", args).await;
    }
    for (through, direct) in [
        (via_tcp, vec!["-p".to_owned(), port.to_string()]),
        (
            via_unix,
            vec!["-s".to_owned(), socket.display().to_string()],
        ),
    ] {
        let bench = run(
            "redis-benchmark",
            strings(&[
                "-h",
                "127.0.0.1",
                "-p",
                &through.to_string(),
                "-t",
                "set,get",
                "-n",
                "20000",
                "-c",
                "50",
                "-q",
            ]),
        )
        .await;
        let text = String::from_utf8_lossy(&bench.stdout).to_string()
            + &String::from_utf8_lossy(&bench.stderr);
        assert!(bench.status.success(), "redis-benchmark: {}", show(&bench));
        assert!(
            text.contains("SET: ") && text.contains("GET: "),
            "redis-benchmark did not report both tests: {text}"
        );
        assert!(
            !text.to_lowercase().contains("error"),
            "redis-benchmark saw errors: {text}"
        );
        // The key redis-benchmark set (a 3-byte value) is on the server
        // itself.
        let mut args = direct.clone();
        args.extend(strings(&["STRLEN", "key:__rand_int__"]));
        let got = run("redis-cli", args).await;
        assert_eq!(
            String::from_utf8_lossy(&got.stdout).trim(),
            "3",
            "the key set through qmesh is not on the server: {}",
            show(&got)
        );
        let mut args = direct;
        args.extend(strings(&["DEL", "key:__rand_int__"]));
        run("redis-cli", args).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_through_relayed_tcp_and_unix_forwards() {
    let _shared = LOAD.read().await;
    redis_through("relay").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_through_direct_tcp_and_unix_forwards() {
    let _shared = LOAD.read().await;
    redis_through("direct").await;
}

/// A port free for both TCP and UDP on 127.0.0.1 (iperf3 uses one port
/// for both).
fn free_tcp_and_udp_port() -> u16 {
    loop {
        let port = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A number from iperf3's JSON output at `path` (dot-separated keys).
fn json_number(out: &Output, path: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 JSON: {e}: {}", show(out)));
    let mut at = &v;
    for key in path.split('.') {
        at = &at[key];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("no number at {path} in iperf3's output: {}", show(out)))
}

async fn iperf_through(mode: &str) {
    if !need(&["iperf3"]) {
        return;
    }
    let (_server, port) = programs::iperf3_server();
    let mesh = Mesh::start().await;
    // iperf3 talks TCP (control) and UDP (data) on the same port.
    let _bob = mesh.expose("bob", "iperf", &format!("tcp/$4:{port}")).await;
    let _bob_udp = mesh
        .expose("bob-udp", "iperf", &format!("udp/$4:{port}"))
        .await;
    let local = free_tcp_and_udp_port();
    let _alice = mesh
        .forward(
            "alice",
            mode,
            &format!("tcp/$4:{local}"),
            "mesh/bob!iperf",
            &[],
        )
        .await;
    let _alice_udp = mesh
        .forward(
            "alice-udp",
            mode,
            &format!("udp/$4:{local}"),
            "mesh/bob-udp!iperf",
            &[],
        )
        .await;
    let p = local.to_string();
    let tcp = run(
        "iperf3",
        strings(&["-c", "127.0.0.1", "-p", &p, "-t", "5", "-J"]),
    )
    .await;
    assert!(tcp.status.success(), "iperf3 TCP: {}", show(&tcp));
    let bytes = json_number(&tcp, "end.sum_received.bytes");
    assert!(bytes > 1e6, "iperf3 TCP moved only {bytes} bytes");

    let udp_args = |port: &str| {
        strings(&[
            "-c",
            "127.0.0.1",
            "-p",
            port,
            "-u",
            "-b",
            "20M",
            "-l",
            "1400",
            "-t",
            "3",
            "-J",
        ])
    };
    let plain = run("iperf3", udp_args(&port.to_string())).await;
    assert!(
        plain.status.success(),
        "iperf3 UDP without qmesh: {}",
        show(&plain)
    );
    let through = run("iperf3", udp_args(&p)).await;
    assert!(
        through.status.success(),
        "iperf3 UDP through qmesh: {}",
        show(&through)
    );
    let base = json_number(&plain, "end.sum.lost_percent");
    let lost = json_number(&through, "end.sum.lost_percent");
    let packets = json_number(&through, "end.sum.packets");
    assert!(
        packets > 1000.0,
        "iperf3 UDP sent only {packets} packets through qmesh"
    );
    assert!(
        lost <= base + 1.0,
        "UDP loss through qmesh {lost}% is more than without it ({base}%) plus 1 point"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iperf3_tcp_and_udp_through_relayed_forwards() {
    let _alone = LOAD.write().await;
    iperf_through("relay").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iperf3_tcp_and_udp_through_direct_forwards() {
    let _alone = LOAD.write().await;
    iperf_through("direct").await;
}

/// Log filter of the UDP tests' clients: `info`, and the forwarding
/// module's `debug` lines, where a flow's end is counted.
const FLOW_LOG: &str = "info,qmesh_client::forward=debug";

/// Send each of `datagrams` to `to` from one socket (one flow) and check
/// that each comes back whole before the next goes.
async fn echo_each(to: std::net::SocketAddr, datagrams: Vec<Vec<u8>>) {
    tokio::task::spawn_blocking(move || {
        let bind = if to.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        let socket = std::net::UdpSocket::bind(bind).expect("binding a UDP socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut buf = vec![0u8; 1 << 16];
        for (i, d) in datagrams.iter().enumerate() {
            socket.send_to(d, to).expect("sending a datagram");
            let n = socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} ({} bytes) got no echo: {e}", d.len()));
            assert_eq!(
                &buf[..n],
                &d[..],
                "the echo of datagram {i} ({} bytes)",
                d.len()
            );
        }
    })
    .await
    .expect("the UDP client's thread");
}

/// The UDP echo exposed as `bob!echo`, with a 1 s idle time and the flow
/// log lines on.
async fn expose_udp_echo(mesh: &Mesh, port: u16) -> Proc {
    let target = format!("udp/$4:{port}");
    let mut bob = mesh.qmesh(&[
        "--name",
        "bob",
        "--log",
        FLOW_LOG,
        "expose",
        "--udp-idle",
        "1",
        "echo",
        &target,
    ]);
    bob.stdout_line("`exposing`", |l| l.starts_with("exposing "))
        .await;
    bob
}

async fn udp_datagrams_through(mode: &str) {
    if !need(&["socat"]) {
        return;
    }
    let _shared = LOAD.read().await;
    let mesh = Mesh::start().await;
    let (_echo, port) = programs::socat_udp_echo();
    let mut bob = expose_udp_echo(&mesh, port).await;
    let local = programs::free_udp_port();
    let listen = format!("udp/$4:{local}");
    let mut alice = mesh
        .forward(
            "alice",
            mode,
            &listen,
            "mesh/bob!echo",
            &["--udp-idle", "1", "--log", FLOW_LOG],
        )
        .await;
    // Ten that fit in a QUIC datagram, then three that do not.
    let mut datagrams: Vec<Vec<u8>> = (0..10)
        .map(|i| qmesh_integration_tests::payload(i, 200))
        .collect();
    datagrams.extend((10..13).map(|i| qmesh_integration_tests::payload(i, 8_000)));
    echo_each(([127, 0, 0, 1], local).into(), datagrams).await;
    let want = if mode == "direct" {
        "10 datagrams sent as QUIC datagrams, 3 framed"
    } else {
        "0 datagrams sent as QUIC datagrams, 13 framed"
    };
    for (who, p) in [("alice", &mut alice), ("bob", &mut bob)] {
        let end = p
            .stderr_line("a UDP flow's end", |l| l.contains("flow ended;"))
            .await;
        assert!(end.contains(want), "{mode}: {who} counted otherwise: {end}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_datagrams_through_a_relayed_forward_all_go_framed() {
    udp_datagrams_through("relay").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_datagrams_through_a_direct_forward_go_as_quic_datagrams_when_they_fit() {
    udp_datagrams_through("direct").await;
}

async fn oversized_datagrams_through(mode: &str) {
    if !need(&["socat"]) {
        return;
    }
    let _shared = LOAD.read().await;
    let mesh = Mesh::start().await;
    let (_echo, port) = programs::socat_udp_echo();
    let mut bob = expose_udp_echo(&mesh, port).await;
    // An IPv6 listener takes 65,520-byte datagrams; the IPv4 target
    // cannot (65,507 at most).
    let local = std::net::UdpSocket::bind("[::1]:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port on ::1")
        .port();
    let listen = format!("udp/$6:{local}");
    let _alice = mesh
        .forward(
            "alice",
            mode,
            &listen,
            "mesh/bob!echo",
            &["--udp-idle", "1"],
        )
        .await;
    let to: std::net::SocketAddr = (std::net::Ipv6Addr::LOCALHOST, local).into();
    tokio::task::spawn_blocking(move || {
        let socket = std::net::UdpSocket::bind("[::1]:0").expect("binding a UDP socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        for seed in [1, 2] {
            let big = qmesh_integration_tests::payload(seed, 65_520);
            socket
                .send_to(&big, to)
                .expect("sending 65,520 bytes on ::1");
        }
        // The flow carries on after them.
        socket.send_to(b"after", to).expect("sending a datagram");
        let mut buf = vec![0u8; 1 << 16];
        let n = socket
            .recv(&mut buf)
            .expect("the echo of a datagram after two dropped");
        assert_eq!(&buf[..n], b"after");
    })
    .await
    .expect("the UDP client's thread");
    let logged = std::cell::Cell::new(0);
    let end = bob
        .stderr_line("the oversized flow's end", |l| {
            if l.contains("dropped a 65520-byte datagram") {
                logged.set(logged.get() + 1);
            }
            l.contains("flow ended;") && l.contains("datagrams dropped")
        })
        .await;
    assert_eq!(logged.get(), 1, "{mode}: the first drop is logged, once");
    assert!(
        end.contains("flow ended; 2 datagrams dropped"),
        "{mode}: both drops are counted: {end}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_too_large_for_the_target_is_dropped_counted_and_logged_once_relayed() {
    oversized_datagrams_through("relay").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_too_large_for_the_target_is_dropped_counted_and_logged_once_direct() {
    oversized_datagrams_through("direct").await;
}

async fn half_close_through(mode: &str) {
    if !need(&["socat"]) {
        return;
    }
    let (_server, port) = programs::socat_counter();
    let mesh = Mesh::start().await;
    let _bob = mesh.expose("bob", "count", &format!("tcp/$4:{port}")).await;
    let local = free_port();
    let _alice = mesh
        .forward(
            "alice",
            mode,
            &format!("tcp/$4:{local}"),
            "mesh/bob!count",
            &[],
        )
        .await;
    let input = vec![b'q'; 1_000_000];
    let out = tokio::task::spawn_blocking(move || {
        let to = format!("TCP:127.0.0.1:{local}");
        programs::run_with_input("socat", &["-t", "30", "-", to.as_str()], &input, RUN)
    })
    .await
    .expect("socat thread");
    assert!(out.status.success(), "socat: {}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1000000",
        "the reply after the half-close: {}",
        show(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_connection_through_a_relayed_forward_gets_its_whole_reply() {
    let _shared = LOAD.read().await;
    half_close_through("relay").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_connection_through_a_direct_forward_gets_its_whole_reply() {
    let _shared = LOAD.read().await;
    half_close_through("direct").await;
}

/// Send a line through `port` and read the echo; `None` when the
/// connection is closed instead.
fn echo_once(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("the forward's listener");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(b"ping\n").ok()?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

async fn faults_through(mode: &str) {
    if !need(&["socat", "python3", "curl"]) {
        return;
    }
    let mesh = Mesh::start().await;

    // The target is stopped mid-connection: the connection ends, both
    // ends say why, and the route stays up.
    let root = TempDir::new().expect("temp dir");
    random_file(&root.path().join("big.bin"), 200 << 20);
    let (server, port) = programs::http_server(root.path());
    let mut bob = mesh.expose("bob", "web", &format!("tcp/$4:{port}")).await;
    let local = free_port();
    let mut alice = mesh
        .forward(
            "alice",
            mode,
            &format!("tcp/$4:{local}"),
            "mesh/bob!web",
            &[],
        )
        .await;
    let mut first = TcpStream::connect(("127.0.0.1", local)).expect("listener");
    first
        .write_all(b"GET /big.bin HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut head = [0u8; 12];
    first.read_exact(&mut head).expect("the response starts");
    assert_eq!(&head, b"HTTP/1.0 200");
    // The transfer is under way (and held back by flow control): stop the
    // server. The connection ends, short of the whole file.
    drop(server);
    let rest = tokio::task::spawn_blocking(move || {
        first
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match first.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("reader");
    assert!(
        rest < 200 << 20,
        "the whole file arrived from a killed server"
    );
    let url = format!("http://127.0.0.1:{local}/big.bin");
    let refused = format!("bob: connect to tcp/127.0.0.1:{port} refused");
    let next = run("curl", strings(&["-sS", "-o", "/dev/null", &url])).await;
    assert!(
        !next.status.success(),
        "a connection to a stopped target succeeded"
    );
    bob.stderr_line("the exposer's refused line", |l| l.contains(&refused))
        .await;
    alice
        .stderr_line("the forwarder's refused line", |l| l.contains(&refused))
        .await;

    // The exposer is killed: the listener stays up and closes connections
    // with a line; once it is back, connections work again.
    let (_echo, echo_port) = programs::socat_echo();
    let mut carol = mesh
        .expose("carol", "echo", &format!("tcp/$4:{echo_port}"))
        .await;
    let local = free_port();
    let mut dave = mesh
        .forward(
            "dave",
            mode,
            &format!("tcp/$4:{local}"),
            "mesh/carol!echo",
            &[],
        )
        .await;
    assert_eq!(echo_once(local).as_deref(), Some("ping\n"));
    carol.kill().await;
    // Connections now fail until carol is back (the channel may take a
    // moment to be seen as lost; each attempt is answered, never hangs).
    let closed = tokio::task::spawn_blocking(move || echo_once(local))
        .await
        .expect("thread");
    assert_eq!(
        closed, None,
        "a connection through a route whose exposer is dead got an echo"
    );
    dave.stderr_line("a line closing the connection", |l| {
        l.contains("closing a connection")
    })
    .await;
    let _carol = mesh
        .expose("carol", "echo", &format!("tcp/$4:{echo_port}"))
        .await;
    // The first connection may still meet the old carol's channel (or, on
    // the direct path, its link) before either is seen as gone: the
    // forwarder then closes it with a line, and the next one goes to the
    // carol that is back. A few tries, each after the forwarder's line
    // (at most 5 s: a pipe that opened before failing closes without one).
    let mut back = None;
    for _ in 0..5 {
        back = tokio::task::spawn_blocking(move || echo_once(local))
            .await
            .expect("thread");
        if back.is_some() {
            break;
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            dave.stderr_line("a line closing the connection", |l| {
                l.contains("closing a connection")
            }),
        )
        .await;
    }
    assert_eq!(
        back.as_deref(),
        Some("ping\n"),
        "the route did not work again after the exposer came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_route_survives_its_target_and_its_exposer_going_away() {
    let _shared = LOAD.read().await;
    faults_through("relay").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_route_survives_its_target_and_its_exposer_going_away() {
    let _shared = LOAD.read().await;
    faults_through("direct").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_connection_over_the_limit_is_refused_with_a_line() {
    let _shared = LOAD.read().await;
    if !need(&["socat"]) {
        return;
    }
    let (_echo, port) = programs::socat_echo();
    let mesh = Mesh::start().await;
    let _bob = mesh.expose("bob", "echo", &format!("tcp/$4:{port}")).await;
    let local = free_port();
    let mut alice = mesh
        .forward(
            "alice",
            "relay",
            &format!("tcp/$4:{local}"),
            "mesh/bob!echo",
            &["--max-connections", "2"],
        )
        .await;
    let held: Vec<TcpStream> = tokio::task::spawn_blocking(move || {
        (0..2)
            .map(|_| {
                let mut s = TcpStream::connect(("127.0.0.1", local)).expect("listener");
                s.write_all(b"hold\n").expect("write");
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).expect("echo");
                s
            })
            .collect()
    })
    .await
    .expect("thread");
    let third = tokio::task::spawn_blocking(move || echo_once(local))
        .await
        .expect("thread");
    assert_eq!(
        third, None,
        "a third connection was carried over a limit of 2"
    );
    alice
        .stderr_line("the refusal line", |l| l.contains("refusing a connection"))
        .await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_listener_pointed_at_a_datagram_interface_is_refused_at_start() {
    let _shared = LOAD.read().await;
    let mesh = Mesh::start().await;
    let _bob = mesh.expose("bob", "dns", "udp/$4:5353").await;
    let local = free_port();
    let mut alice = mesh.qmesh(&[
        "--name",
        "alice",
        "forward",
        &format!("tcp/$4:{local}"),
        "mesh/bob!dns",
    ]);
    let exit = alice.finish().await;
    assert!(
        !exit.status.success(),
        "the forward started: {}",
        exit.stdout
    );
    assert!(
        exit.stderr.contains("stream (tcp or unix) listener")
            && exit.stderr.contains("forwards datagram (udp)"),
        "the error does not name both kinds: {}",
        exit.stderr
    );
}

/// An agent file for `name` on `mesh`, with `routes` after the identity.
fn agent_file(mesh: &Mesh, dir: &Path, name: &str, routes: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "coordinator = \"{}\"\nname = \"{name}\"\nca = \"{}\"\ngrace = \"30s\"\n\n{routes}",
        mesh.coord.v4(),
        mesh.ca.display()
    );
    std::fs::write(&path, text).expect("write the agent's file");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_removes_and_keeps_routes_while_a_transfer_runs_on_a_kept_route() {
    let _shared = LOAD.read().await;
    if !need(&["python3", "curl"]) {
        return;
    }
    let root = TempDir::new().expect("temp dir");
    random_file(&root.path().join("big.bin"), 100 << 20);
    random_file(&root.path().join("small.bin"), 4096);
    let (_server, port) = programs::http_server(root.path());
    let mesh = Mesh::start().await;
    let files = TempDir::new().expect("temp dir");
    let bob = agent_file(
        &mesh,
        files.path(),
        "bob",
        &format!("[expose.web]\ntarget = \"tcp/$4:{port}\"\n"),
    );
    let mut bob = mesh.qmesh(&["up", "--config", bob.to_str().expect("path")]);
    bob.stdout_line("`agent bob up`", |l| l.starts_with("agent bob up"))
        .await;
    let (keep, gone, added) = (free_port(), free_port(), free_port());
    let route = |name: &str, port: u16| {
        format!("[forward.{name}]\nlisten = \"tcp/$4:{port}\"\nto = \"mesh/bob!web\"\nmode = \"relay\"\n\n")
    };
    let first = route("keep", keep) + &route("gone", gone);
    let alice_file = agent_file(&mesh, files.path(), "alice", &first);
    let alice_path = alice_file.to_str().expect("path").to_owned();
    let mut alice = mesh.qmesh(&["up", "--config", &alice_path]);
    // The routes start together: their lines come in either order.
    let mut up = std::collections::BTreeSet::new();
    while up.len() < 2 {
        let line = alice
            .stdout_line("`route keep up` and `route gone up`", |l| {
                l.starts_with("route keep up: ") || l.starts_with("route gone up: ")
            })
            .await;
        up.insert(line.split(' ').nth(1).unwrap_or_default().to_owned());
    }

    // A transfer on the kept route, slowed so the reload happens under it.
    let out = TempDir::new().expect("temp dir");
    let got = out.path().join("big.bin");
    let url = format!("http://127.0.0.1:{keep}/big.bin");
    let transfer = tokio::spawn(run(
        "curl",
        strings(&[
            "-sS",
            "-f",
            "--limit-rate",
            "25M",
            "-o",
            got.to_str().expect("path"),
            &url,
        ]),
    ));
    // The transfer has started once bytes arrive (polled: curl is another
    // process).
    let started = async {
        while std::fs::metadata(&got).map(|m| m.len()).unwrap_or(0) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), started)
        .await
        .expect("the transfer on the kept route did not start");

    let second = route("keep", keep) + &route("added", added);
    agent_file(&mesh, files.path(), "alice", &second);
    let asked = mesh
        .qmesh(&["up", "--reload", "--config", &alice_path])
        .finish()
        .await;
    assert!(
        asked.status.success(),
        "qmesh up --reload: {}",
        asked.stderr
    );
    let reloaded = alice
        .stdout_line("`reloaded:`", |l| l.starts_with("reloaded: "))
        .await;
    assert_eq!(reloaded, "reloaded: 1 added, 1 removed, 0 changed, 1 kept");
    alice
        .stdout_line("the added route up", |l| l.starts_with("route added up: "))
        .await;
    let small = format!("http://127.0.0.1:{added}/small.bin");
    let fetched = run("curl", strings(&["-sS", "-f", "-o", "/dev/null", &small])).await;
    assert!(
        fetched.status.success(),
        "the added route: {}",
        show(&fetched)
    );
    assert!(
        TcpStream::connect(("127.0.0.1", gone)).is_err(),
        "the removed route still listens"
    );

    // A file with an error changes nothing.
    agent_file(
        &mesh,
        files.path(),
        "alice",
        &(second + "[forward.bad]\nlisten = \"tcp/$4\"\n"),
    );
    let asked = mesh
        .qmesh(&["up", "--reload", "--config", &alice_path])
        .finish()
        .await;
    assert!(
        !asked.status.success(),
        "a reload of a bad file was sent as if fine"
    );
    assert!(asked.stderr.contains("has no port"), "{}", asked.stderr);
    // The agent itself, told to reload the bad file, keeps what it runs.
    alice.signal("HUP");
    alice
        .stderr_line("the refused reload", |l| {
            l.contains("reload refused, nothing changed") && l.contains("has no port")
        })
        .await;
    let fetched = run("curl", strings(&["-sS", "-f", "-o", "/dev/null", &small])).await;
    assert!(
        fetched.status.success(),
        "the added route after a refused reload: {}",
        show(&fetched)
    );

    let done = transfer.await.expect("curl task");
    assert!(
        done.status.success(),
        "the transfer on the kept route: {}",
        show(&done)
    );
    assert_eq!(
        programs::sha256_file(&got),
        programs::sha256_file(&root.path().join("big.bin")),
        "the transfer on the kept route arrived changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_interface_refuses_peers_not_in_its_allow_list() {
    let _shared = LOAD.read().await;
    if !need(&["socat"]) {
        return;
    }
    let (_echo, port) = programs::socat_echo();
    let mesh = Mesh::start().await;
    let mut bob = mesh.qmesh(&[
        "--name",
        "bob",
        "expose",
        "echo",
        &format!("tcp/$4:{port}"),
        "--allow",
        "alice",
    ]);
    bob.stdout_line("`exposing`", |l| l.starts_with("exposing "))
        .await;
    let (allowed, refused) = (free_port(), free_port());
    let _alice = mesh
        .forward(
            "alice",
            "relay",
            &format!("tcp/$4:{allowed}"),
            "mesh/bob!echo",
            &[],
        )
        .await;
    let mut dave = mesh.qmesh(&[
        "--name",
        "dave",
        "forward",
        "--mode",
        "relay",
        &format!("tcp/$4:{refused}"),
        "mesh/bob!echo",
    ]);
    // Dave's listener is up, but no route line comes: the channel is refused.
    let closed = tokio::task::spawn_blocking(move || {
        for _ in 0..500 {
            if TcpStream::connect(("127.0.0.1", refused)).is_ok() {
                return echo_once(refused);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("dave's listener never came up");
    })
    .await
    .expect("thread");
    assert_eq!(closed, None, "dave, not in the allow list, got an echo");
    dave.stderr_line("the refusal", |l| {
        l.contains("dave is not allowed to open echo")
    })
    .await;
    let echoed = tokio::task::spawn_blocking(move || echo_once(allowed))
        .await
        .expect("thread");
    assert_eq!(
        echoed.as_deref(),
        Some("ping\n"),
        "alice, in the allow list"
    );
}

/// A coordinator restart: the forward's listener stays up while the
/// coordinator is away, both ends print that they reconnect, and once they
/// are back connections through the route work again, with no restart of
/// either qmesh. While it is away, a relayed route closes connections at
/// once (never hangs); a direct route's channel is held on its direct
/// connection (protocol.md §8.9) and carries them.
async fn restart_through(mode: &str) {
    if !need(&["socat"]) {
        return;
    }
    let mut mesh = Mesh::start().await;
    let (_echo, echo_port) = programs::socat_echo();
    let mut carol = mesh
        .expose("carol", "echo", &format!("tcp/$4:{echo_port}"))
        .await;
    let local = free_port();
    let mut dave = mesh
        .forward(
            "dave",
            mode,
            &format!("tcp/$4:{local}"),
            "mesh/carol!echo",
            &[],
        )
        .await;
    assert_eq!(echo_once(local).as_deref(), Some("ping\n"));

    mesh.coord.proc.terminate();
    let exit = mesh.coord.proc.finish().await;
    assert_eq!(exit.status.code(), Some(0), "{}", show_exit(&exit));
    for (who, p) in [("carol", &mut carol), ("dave", &mut dave)] {
        let line = p
            .stderr_line(&format!("{who}'s `qmesh: reconnecting`"), |l| {
                l.starts_with("qmesh: reconnecting to")
            })
            .await;
        assert!(line.contains("shutting down"), "{who}: {line}");
    }
    let away = tokio::task::spawn_blocking(move || echo_once(local))
        .await
        .expect("thread");
    let expected = (mode == "direct").then_some("ping\n");
    assert_eq!(
        away.as_deref(),
        expected,
        "an echo through a {mode} route with no coordinator"
    );

    let listen = mesh.coord.v4();
    let (again, _) =
        CoordinatorProc::start_dev_at(mesh._state.path(), &listen, &[] as &[&OsStr]).await;
    mesh.coord = again;
    for (who, p) in [("carol", &mut carol), ("dave", &mut dave)] {
        p.stderr_line(&format!("{who}'s `qmesh: reconnected`"), |l| {
            l.starts_with("qmesh: reconnected")
        })
        .await;
    }
    // Carol's interface is offered again with her hello: the first
    // connection after the return goes through.
    let back = tokio::task::spawn_blocking(move || echo_once(local))
        .await
        .expect("thread");
    assert_eq!(
        back.as_deref(),
        Some("ping\n"),
        "the route did not work again after the coordinator came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_forward_works_again_after_a_coordinator_restart() {
    let _shared = LOAD.read().await;
    restart_through("relay").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_forward_works_again_after_a_coordinator_restart() {
    let _shared = LOAD.read().await;
    restart_through("direct").await;
}

/// `GET /metrics` from `at` (an agent's `--http` address): the body of a
/// 200 answer.
async fn scrape(at: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut conn = tokio::net::TcpStream::connect(at).await?;
        let ask = format!("GET /metrics HTTP/1.1\r\nHost: {at}\r\nConnection: close\r\n\r\n");
        conn.write_all(ask.as_bytes()).await?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), get)
        .await
        .unwrap_or_else(|_| panic!("GET http://{at}/metrics took over 10 s"))
        .unwrap_or_else(|e| panic!("GET http://{at}/metrics: {e}"));
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the sample `name` (with its labels, as written) in the
/// Prometheus text `text`; 0 when absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// `promtool check metrics` finds nothing to say about `text`.
fn promtool_passes(promtool: &Path, text: &str) {
    let out = programs::run_with_input(
        promtool.to_str().expect("path"),
        &["check", "metrics"],
        text.as_bytes(),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "promtool: {}\n{text}", show(&out));
}

/// `qmesh up --http 127.0.0.1:0` serves `/metrics`: after a known number
/// of bytes went through a relayed forward to an exposed echo, both
/// agents' byte counters have grown by at least that much, each counted
/// one connection, the forward says its path is relay, and promtool passes
/// the text. A non-loopback address is refused before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_metrics_count_a_known_transfer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BYTES: usize = 3 << 20;
    let _shared = LOAD.read().await;
    let Some(promtool) = require("promtool") else {
        return;
    };
    // A TCP echo in this process.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("echo");
    let echo_port = echo.local_addr().expect("echo address").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = conn.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    let mesh = Mesh::start().await;
    let files = TempDir::new().expect("temp dir");
    let bob_file = agent_file(
        &mesh,
        files.path(),
        "bob",
        &format!("[expose.echo]\ntarget = \"tcp/$4:{echo_port}\"\n"),
    );
    let local = free_port();
    let alice_file = agent_file(
        &mesh,
        files.path(),
        "alice",
        &format!("[forward.echo]\nlisten = \"tcp/$4:{local}\"\nto = \"mesh/bob!echo\"\nmode = \"relay\"\n"),
    );
    let (bob_file, alice_file) = (
        bob_file.to_str().expect("path"),
        alice_file.to_str().expect("path"),
    );

    let refused = mesh
        .qmesh(&["up", "--config", alice_file, "--http", "0.0.0.0:9465"])
        .finish()
        .await;
    assert!(!refused.status.success(), "{}", show_exit(&refused));
    assert!(
        refused.stderr.contains("loopback address only"),
        "{}",
        show_exit(&refused)
    );

    let metrics_at = |l: &str| l.strip_prefix("metrics at http://").is_some();
    let address = |line: String| {
        line.trim_start_matches("metrics at http://")
            .trim_end_matches("/metrics")
            .to_owned()
    };
    let mut bob = mesh.qmesh(&["up", "--config", bob_file, "--http", "127.0.0.1:0"]);
    let bob_at = address(bob.stdout_line("`metrics at`", metrics_at).await);
    let mut alice = mesh.qmesh(&["up", "--config", alice_file, "--http", "127.0.0.1:0"]);
    // The two lines come in either order.
    let (mut alice_at, mut route_up) = (None, false);
    while alice_at.is_none() || !route_up {
        let line = alice
            .stdout_line("`metrics at` and `route echo up`", |l| {
                metrics_at(l) || l.starts_with("route echo up: ")
            })
            .await;
        if metrics_at(&line) {
            alice_at = Some(address(line));
        } else {
            route_up = true;
        }
    }
    let alice_at = alice_at.expect("seen");

    let before = scrape(&alice_at).await;
    promtool_passes(&promtool, &before);
    let sent_name = r#"qmesh_agent_bytes_total{route="forward.echo",direction="sent"}"#;
    let received_name = r#"qmesh_agent_bytes_total{route="forward.echo",direction="received"}"#;
    let (sent_before, received_before) =
        (sample(&before, sent_name), sample(&before, received_name));

    // BYTES through the forward and back from the echo.
    let data: Vec<u8> = (0..BYTES).map(|i| (i * 7 % 251) as u8).collect();
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", local)).await?;
        let (mut rd, mut wr) = conn.split();
        let write = async {
            wr.write_all(&data).await?;
            wr.shutdown().await
        };
        let mut back = Vec::with_capacity(BYTES);
        let (written, read) = tokio::join!(write, rd.read_to_end(&mut back));
        written?;
        read?;
        Ok::<_, std::io::Error>(back)
    };
    let back = tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .expect("the exchange took over 60 s")
        .expect("the exchange");
    assert!(
        back == data,
        "the echo came back changed ({} bytes)",
        back.len()
    );

    let after = scrape(&alice_at).await;
    promtool_passes(&promtool, &after);
    assert!(
        sample(&after, sent_name) >= sent_before + BYTES as f64,
        "sent grew by less than {BYTES}:\n{before}\n{after}"
    );
    assert!(
        sample(&after, received_name) >= received_before + BYTES as f64,
        "received grew by less than {BYTES}:\n{after}"
    );
    assert_eq!(sample(&after, "qmesh_agent_routes"), 1.0, "{after}");
    assert!(
        sample(
            &after,
            r#"qmesh_agent_connections_total{route="forward.echo"}"#
        ) >= 1.0,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"qmesh_agent_route_path{route="forward.echo",path="relay"}"#
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            r#"qmesh_agent_route_path{route="forward.echo",path="direct"}"#
        ),
        0.0,
        "{after}"
    );
    // The exposer counted the same bytes the other way round.
    let exposed = scrape(&bob_at).await;
    promtool_passes(&promtool, &exposed);
    for direction in ["sent", "received"] {
        let name =
            format!(r#"qmesh_agent_bytes_total{{route="expose.echo",direction="{direction}"}}"#);
        assert!(
            sample(&exposed, &name) >= BYTES as f64,
            "{name}:\n{exposed}"
        );
    }
    // The exposer's side of the connection ends as its last bytes leave:
    // polled, as it may count it open a moment longer.
    let open = r#"qmesh_agent_connections{route="expose.echo"}"#;
    let mut now = exposed;
    for _ in 0..100 {
        if sample(&now, open) == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = scrape(&bob_at).await;
    }
    assert_eq!(
        sample(&now, open),
        0.0,
        "the finished connection is still counted open:\n{now}"
    );
    alice.kill().await;
    bob.kill().await;
}
