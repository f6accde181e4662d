//! `qmesh-bench`: qmesh against raw QUIC, measured in one run.
//!
//! Starts a coordinator as a child process on loopback and a raw quinn
//! server in this process, both with the same TLS and transport settings,
//! and measures each case against its baseline. Every figure is the median
//! of `--runs` runs (3 by default). `--quick` runs a smaller version.
//! See docs/benchmarks.md.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use qmesh_certs::{Ca, Identity, Trust};
use qmesh_client::PathMode;
use qmesh_client::{Channel, Client, ClientConfig, SessionState};
use qmesh_coordinator::{Config, Coordinator};
use quinn::Endpoint;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

mod raw;

use raw::{RawServer, Shape, MAX};

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Parser)]
#[command(name = "qmesh-bench", version)]
/// Measure qmesh against raw QUIC on loopback, in one run.
struct Args {
    /// A smaller run (under 30 s) that checks the tool works.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Idle clients the idle case holds (100,000; 500 with --quick).
    #[arg(long)]
    idle: Option<usize>,
    /// Only run the cases whose name contains this, or one of these
    /// (comma-separated): bulk, forward, small, rtt, requests, open,
    /// connect, cluster, idle.
    #[arg(long)]
    only: Option<String>,
    /// Internal: run a coordinator from the certificates in this directory.
    #[arg(long, hide = true)]
    serve_coordinator: Option<PathBuf>,
    /// Internal: run the raw quinn server from the certificates in this directory.
    #[arg(long, hide = true)]
    serve_raw: Option<PathBuf>,
    /// Internal: run the one-thread raw quinn server from the certificates
    /// in this directory.
    #[arg(long, hide = true)]
    serve_best: Option<PathBuf>,
    /// Internal: run the bare quinn relay from the certificates in this
    /// directory, in front of the server on --upstream.
    #[arg(long, hide = true)]
    serve_bare_relay: Option<PathBuf>,
    /// Internal: with --serve-bare-relay, the port of the server it passes
    /// streams to.
    #[arg(long, hide = true)]
    upstream: Option<u16>,
    /// Run every coordinator on a current-thread runtime (one thread, as
    /// the best raw server) instead of the multi-thread runtime that
    /// `qmesh-coordinator` runs.
    #[arg(long, conflicts_with = "per_core")]
    current_thread: bool,
    /// Run every coordinator on one thread per core, each with a
    /// current-thread runtime and its own endpoint on an `SO_REUSEPORT`
    /// socket of the coordinator's port.
    #[arg(long)]
    per_core: bool,
    /// Internal: with --serve-coordinator, join the cluster whose
    /// directory is the etcd at this URL.
    #[arg(long, hide = true)]
    etcd: Option<String>,
}

/// Sizes of each case.
#[derive(Debug, Clone, Copy)]
struct Plan {
    bulk: u64,
    small: [(usize, u64); 3],
    rtt: usize,
    /// Rounds of 100 requests in flight at once.
    batches: usize,
    opens: usize,
    connects: usize,
    idle: usize,
    /// How long the idle clients sit idle while the coordinator's CPU is
    /// measured.
    idle_window: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                bulk: 64 * MIB,
                small: [(16, 100_000), (256, 50_000), (4096, 10_000)],
                rtt: 200,
                batches: 20,
                opens: 50,
                connects: 200,
                idle: 500,
                idle_window: Duration::from_secs(5),
            }
        } else {
            Plan {
                bulk: 1024 * MIB,
                small: [(16, 1_000_000), (256, 500_000), (4096, 100_000)],
                rtt: 2_000,
                batches: 200,
                opens: 300,
                connects: 1_000,
                idle: 100_000,
                idle_window: Duration::from_secs(60),
            }
        }
    }
}

/// One line of the report.
#[derive(Debug, Serialize)]
struct Row {
    case: String,
    unit: String,
    baseline: Option<f64>,
    /// `None` when the figure could not be measured here; `reason` says why.
    qmesh: Option<f64>,
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
    /// Why `qmesh` is missing (printed as `n/a`, JSON `null`).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Why a CPU figure is missing.
const PROC_STAT: &str = "/proc/PID/stat could not be read on this machine";
/// Why a UDP counter figure is missing.
const PROC_SNMP: &str = "/proc/net/snmp has no Udp counters on this machine";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

// ---------------------------------------------------------------- setup

/// A coordinator child process and what clients need to reach it.
struct CoordinatorProcess {
    child: Child,
    trust: Trust,
    /// Every client config is a clone of this one, so they share one TLS
    /// configuration as the raw baseline's connections do.
    base: ClientConfig,
}

impl CoordinatorProcess {
    fn start(dir: &Path, ca: &Ca, shape: Shape) -> Result<Self> {
        Self::start_with(dir, ca, shape, &[])
    }

    /// As [`CoordinatorProcess::start`], with more flags for the child.
    fn start_with(dir: &Path, ca: &Ca, shape: Shape, extra: &[&str]) -> Result<Self> {
        Self::launch(None, dir, ca, shape, extra)
    }

    /// The idle case's coordinator: with `QMESH_BENCH_WRAP` set (for
    /// example `heaptrack -o /tmp/coord`), it runs under that command, for
    /// a profile of it; no other coordinator of the run does. Its RSS and
    /// CPU rows are then of the wrapper process and mean nothing.
    fn start_for_idle(dir: &Path, ca: &Ca, shape: Shape) -> Result<Self> {
        let wrap = std::env::var("QMESH_BENCH_WRAP").ok();
        Self::launch(wrap.as_deref(), dir, ca, shape, &[])
    }

    fn launch(
        wrap: Option<&str>,
        dir: &Path,
        ca: &Ca,
        shape: Shape,
        extra: &[&str],
    ) -> Result<Self> {
        let mut extra = extra.to_vec();
        match shape {
            Shape::Best => extra.push("--current-thread"),
            Shape::PerCore => extra.push("--per-core"),
            Shape::Multi => {}
        }
        let (child, port) = raw::start_child_under(wrap, "--serve-coordinator", dir, &extra)?;
        let address: qmesh_proto::Address = format!("quic/127.0.0.1:{port}").parse()?;
        let trust = Trust::Ca {
            certs: vec![ca.cert_der().clone()],
            source: "bench CA".into(),
        };
        let mut base = ClientConfig::new(address.clone(), "base", trust.clone());
        base.max_message = MAX;
        Ok(Self { child, trust, base })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn config(&self, name: &str) -> ClientConfig {
        let mut c = self.base.clone();
        c.name = name.to_owned();
        c
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child side: serve until stdin closes.
fn serve_coordinator(dir: &Path, etcd: Option<&str>, shape: Shape) -> Result<()> {
    let identity = Identity::load(
        &dir.join("coordinator.pem"),
        &dir.join("coordinator-key.pem"),
    )?;
    raw::runtime(shape)?.block_on(async {
        let mut config = Config::new(identity);
        config.listen = "127.0.0.1:0".parse()?;
        // The raw baseline has no rate limits; the relay still counts
        // every message and checks its size.
        config.rate = qmesh_coordinator::limit::RateLimits::unlimited();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut sockets = if shape == Shape::PerCore {
            qmesh_certs::transport::bind_udp_shared(
                config.listen,
                qmesh_certs::transport::SOCKET_BUFFER,
                cores,
            )?
        } else {
            Vec::new()
        };
        let listener = if sockets.is_empty() {
            qmesh_coordinator::Listener::bind(config.listen)?
        } else {
            qmesh_coordinator::Listener::from_socket(sockets.remove(0))?
        };
        if let Some(url) = etcd {
            let link = qmesh_coordinator::Listener::bind(config.listen)?;
            let directory = qmesh_coordinator::cluster::EtcdDirectory::join(
                qmesh_coordinator::cluster::ClusterSettings {
                    endpoints: vec![url.to_owned()],
                    cluster: "bench".into(),
                    lease_ttl: Duration::from_secs(5),
                    clients: listener.local_addr(),
                    link: Some((link.local_addr(), config.identity.fingerprint())),
                },
            )
            .await?;
            config.directory = Arc::new(directory);
            config.link_socket = Some(Arc::new(link.socket().try_clone()?));
        }
        let mut coordinator = Coordinator::on(listener, config)?;
        // The other cores' runtimes, each on a thread of its own until the
        // coordinator has stopped.
        let mut threads = Vec::new();
        for socket in sockets {
            let runtime = raw::runtime(Shape::PerCore)?;
            coordinator.add_endpoint(socket, runtime.handle().clone())?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.await;
                })
            });
            threads.push((stop, thread));
        }
        println!("port {}", coordinator.local_addr().port());
        std::io::stdout().flush()?;
        coordinator.run(raw::until_stdin_closes()).await;
        for (stop, thread) in threads {
            let _ = stop.send(());
            let _ = thread.join();
        }
        Ok(())
    })
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(") ").next()?.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn rss_kib(pid: u32) -> Option<u64> {
    qmesh_integration_tests::memory_kib(pid).map(|(rss, _)| rss)
}

/// UDP receive-buffer drops on this host so far (`/proc/net/snmp`).
fn udp_rcvbuf_errors() -> Option<u64> {
    udp_counter("RcvbufErrors")
}

/// A counter from the `Udp:` lines of /proc/net/snmp (this network
/// namespace, all processes).
fn udp_counter(name: &str) -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let i = names.iter().position(|n| *n == name)?;
    values.get(i)?.parse().ok()
}

// ------------------------------------------------------------ mesh side

/// Bob's side of every relayed case: the first message of each stream
/// picks what to do, as the raw server's first byte does.
async fn bob_serves(bob: Client) {
    while let Some(offer) = bob.accept().await {
        tokio::spawn(async move {
            let Ok(ch) = offer.accept().await else { return };
            let ch = Arc::new(ch);
            // Requests are answered with their body.
            let server = ch.clone();
            tokio::spawn(async move { server.serve(|body| async move { Some(body) }).await });
            while let Ok(Some(mut inbox)) = ch.accept_stream().await {
                let ch = ch.clone();
                tokio::spawn(async move {
                    let Ok(Some(mode)) = inbox.recv().await else {
                        return;
                    };
                    match mode.first() {
                        Some(b'S') | Some(b'M') => {
                            let (mut n, mut bytes) = (0u64, 0u64);
                            while let Ok(Some(m)) = inbox.recv().await {
                                n += 1;
                                bytes += m.len() as u64;
                            }
                            let answer = if mode[0] == b'S' { bytes } else { n };
                            if let Ok(mut out) = ch.open_stream().await {
                                let _ = out.send(&answer.to_be_bytes()).await;
                                let _ = out.finish().await;
                            }
                        }
                        Some(b'E') => {
                            let Ok(mut out) = ch.open_stream().await else {
                                return;
                            };
                            while let Ok(Some(m)) = inbox.recv().await {
                                if out.send(&m).await.is_err() {
                                    return;
                                }
                            }
                        }
                        _ => {}
                    }
                });
            }
        });
    }
}

/// A relayed channel from `x` to y on another member, opened once the
/// member link is up (until then the open is refused: no link).
async fn open_across(x: &Client, name: &str) -> Result<Channel> {
    let address: qmesh_proto::Address = format!("mesh/y!{name}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match x.open_with(&address, PathMode::Relay).await {
            Ok(ch) => return Ok(ch),
            Err(e) if Instant::now() < deadline => {
                // The link is dialed on the members' next check (1 s).
                tracing::debug!("open across: {e}; again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn answer_u64(ch: &Channel) -> Result<u64> {
    let mut inbox = ch.accept_stream().await?.context("no answer stream")?;
    let m = inbox.recv().await?.context("no answer")?;
    Ok(u64::from_be_bytes(m[..8].try_into()?))
}

/// Send `size` bytes on one data stream of `ch` in 1 MiB messages to
/// bob's sink and wait for its count: MB/s.
async fn stream_bulk(ch: &Channel, size: u64, chunk: &Bytes) -> Result<f64> {
    let t = Instant::now();
    let mut out = ch.open_stream().await?;
    out.send(b"S").await?;
    for _ in 0..size / MIB {
        out.send_bytes(chunk.clone()).await?;
    }
    out.finish().await?;
    let got = answer_u64(ch).await?;
    let secs = t.elapsed().as_secs_f64();
    if got != size {
        bail!("bulk moved {got} of {size} bytes");
    }
    Ok(size as f64 / secs / 1e6)
}

/// Requests in flight at once in the requests case, raw and qmesh alike.
const IN_FLIGHT: usize = 100;

/// On `ch` to bob: `n` requests one at a time (each one's time in µs),
/// then `batches` rounds of 100 requests in flight at once (requests per
/// second, and UDP datagrams sent per request by all on this host while
/// they ran). Every reply is checked. Closes `ch`.
async fn request_rates(
    ch: Channel,
    msg: [u8; 64],
    n: usize,
    batches: usize,
) -> Result<(Vec<f64>, f64, Option<f64>)> {
    ch.request(&msg).await?;
    let mut t = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        let reply = ch.request(&msg).await?;
        t.push(start.elapsed().as_secs_f64() * 1e6);
        if reply[..] != msg[..] {
            bail!("a reply that is not the request");
        }
    }
    let sent = udp_counter("OutDatagrams");
    let start = Instant::now();
    for _ in 0..batches {
        let replies =
            futures_util::future::join_all((0..IN_FLIGHT).map(|_| ch.request(&msg))).await;
        for r in replies {
            if r?[..] != msg[..] {
                bail!("a reply that is not the request");
            }
        }
    }
    let rate = (batches * IN_FLIGHT) as f64 / start.elapsed().as_secs_f64();
    let per = per_request(sent, batches * IN_FLIGHT);
    ch.close("done").await?;
    Ok((t, rate, per))
}

/// UDP datagrams sent on this host since `sent` (an `OutDatagrams`
/// reading), per request of `n`.
fn per_request(sent: Option<u64>, n: usize) -> Option<f64> {
    let now = udp_counter("OutDatagrams")?;
    Some(now.checked_sub(sent?)? as f64 / n as f64)
}

/// `n` round trips of `msg` through bob's echo on `ch`, in µs each.
async fn echo_round_trips(ch: &Channel, msg: &[u8], n: usize) -> Result<Vec<f64>> {
    let mut out = ch.open_stream().await?;
    out.send(b"E").await?;
    out.send(msg).await?;
    let mut inbox = ch.accept_stream().await?.context("echo stream")?;
    inbox.recv().await?.context("first echo")?;
    raw::round_trips(&mut out, &mut inbox, msg, n).await
}

/// A qmesh node as each best raw node is built: one OS thread with a
/// current-thread runtime. Work given to [`Node::run`] runs there, and so
/// do the tasks it spawns (a client's connection and channel tasks).
struct Node {
    handle: tokio::runtime::Handle,
    /// Dropped with the node: its thread's runtime then stops.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Node {
    fn start(name: &str) -> Result<Node> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || match raw::runtime(Shape::Best) {
                Ok(rt) => {
                    let _ = tx.send(Ok(rt.handle().clone()));
                    let _ = rt.block_on(stopped);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })?;
        let handle = rx
            .recv()
            .context("the node's thread ended at its start")??;
        Ok(Node {
            handle,
            _stop: stop,
        })
    }

    /// Run `work` on this node's thread and wait for its result.
    async fn run<T, Fut>(&self, work: Fut) -> Result<T>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        self.handle
            .spawn(work)
            .await
            .context("the node's task panicked or was cancelled")?
    }
}

// ------------------------------------------------------------ the cases

struct Bench {
    plan: Plan,
    runs: usize,
    ca: Ca,
    identity: Identity,
    dir: tempfile::TempDir,
    /// The coordinators' runtime.
    shape: Shape,
    /// The first baseline: the raw server on a multi-thread runtime.
    raw: RawServer,
    raw_client: Endpoint,
    /// The best raw baseline: the raw server on one thread.
    best: RawServer,
    /// A bare quinn relay in front of `best`.
    bare: RawServer,
    /// The best raw bulk figure and 64 B round trip p50, once measured:
    /// the cluster case compares with them.
    best_bulk: Option<f64>,
    best_rtt50: Option<f64>,
    coordinator: CoordinatorProcess,
    alice: Client,
    bob: Client,
    /// The threads alice and bob run on.
    alice_node: Node,
    _bob_node: Node,
    rows: Vec<Row>,
    tick: u64,
}

impl Bench {
    fn name(&mut self, prefix: &str) -> String {
        self.tick += 1;
        format!("{prefix}-{}", self.tick)
    }

    async fn relay_channel(&mut self) -> Result<Channel> {
        self.channel(PathMode::Relay).await
    }

    async fn channel(&mut self, mode: PathMode) -> Result<Channel> {
        let name = self.name("c");
        let address = format!("mesh/bob!{name}").parse()?;
        let alice = self.alice.clone();
        self.alice_node
            .run(async move { Ok(alice.open_with(&address, mode).await?) })
            .await
    }

    fn row(
        &mut self,
        case: &str,
        unit: &str,
        baseline: Option<f64>,
        qmesh: f64,
        target: &str,
        met: Option<bool>,
    ) {
        let ratio = baseline.map(|b| qmesh / b);
        self.rows.push(Row {
            case: case.into(),
            unit: unit.into(),
            baseline,
            qmesh: Some(qmesh),
            ratio,
            target: target.into(),
            met,
            reason: None,
        });
    }

    /// A row this machine could not measure: `n/a` and `reason`, never a
    /// made-up figure (a missing counter read as 0 would pass a target).
    fn unavailable(&mut self, case: &str, unit: &str, target: &str, reason: &str) {
        self.rows.push(Row {
            case: case.into(),
            unit: unit.into(),
            baseline: None,
            qmesh: None,
            ratio: None,
            target: target.into(),
            met: None,
            reason: Some(reason.into()),
        });
    }

    /// A figure of the best raw baseline: `work` on a client thread of its
    /// own, on a connection from its own endpoint to `server`.
    async fn best_raw<T, F, Fut>(server: &RawServer, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(quinn::Connection) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let (addr, client) = server.target();
        raw::on_own_thread(move || raw::dialed(addr, client, work)).await
    }

    async fn bulk(&mut self) -> Result<()> {
        let size = self.plan.bulk;
        let chunk = Bytes::from(vec![7u8; MIB as usize]);
        let (mut best, mut multi, mut bare) = (Vec::new(), Vec::new(), Vec::new());
        let (mut relayed, mut direct, mut cpu, mut bare_cpu) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let gib = size as f64 / (1024.0 * MIB as f64);
        let conn = self.raw.connect(&self.raw_client).await?;
        for _ in 0..self.runs {
            // Best raw: one stream, write_chunk → read_chunk, one hop, one
            // thread at each end.
            let c = chunk.clone();
            best.push(
                Self::best_raw(&self.best, move |conn| async move {
                    raw::bulk(&conn, size, &c).await
                })
                .await?,
            );
            // The first baseline: the multi-thread raw server, the client
            // on the bench's runtime.
            multi.push(raw::bulk(&conn, size, &chunk).await?);
            // The bare relay: the same through one more thread that only
            // passes chunks on.
            let cpu0 = cpu_seconds(self.bare.pid());
            let c = chunk.clone();
            bare.push(
                Self::best_raw(&self.bare, move |conn| async move {
                    raw::bulk(&conn, size, &c).await
                })
                .await?,
            );
            if let (Some(a), Some(b)) = (cpu0, cpu_seconds(self.bare.pid())) {
                bare_cpu.push((b - a) / gib);
            }

            // Relayed: one data stream on a channel, 1 MiB messages.
            let ch = self.relay_channel().await?;
            let cpu0 = cpu_seconds(self.coordinator.pid());
            relayed.push(stream_bulk(&ch, size, &chunk).await.context("relayed")?);
            let cpu1 = cpu_seconds(self.coordinator.pid());
            if let (Some(a), Some(b)) = (cpu0, cpu1) {
                cpu.push((b - a) / gib);
            }
            ch.close("done").await?;

            // Direct: the same on a direct-only channel, peer to peer.
            let ch = self.channel(PathMode::Direct).await?;
            direct.push(stream_bulk(&ch, size, &chunk).await.context("direct")?);
            ch.close("done").await?;
        }
        let best = median(best);
        self.best_bulk = Some(best);
        let mib = size / MIB;
        let (multi, bare) = (median(multi), median(bare));
        let (relayed, direct) = (median(relayed), median(direct));
        self.row(
            &format!("bulk {mib} MiB, raw multi-thread server vs best raw"),
            "MB/s",
            Some(best),
            multi,
            "measured",
            None,
        );
        self.row(
            &format!("bulk {mib} MiB, bare quinn relay vs best raw"),
            "MB/s",
            Some(best),
            bare,
            "measured",
            None,
        );
        self.row(
            &format!("bulk {mib} MiB, relayed vs best raw"),
            "MB/s",
            Some(best),
            relayed,
            ">= 0.45x",
            Some(relayed / best >= 0.45),
        );
        self.row(
            &format!("bulk {mib} MiB, direct vs best raw"),
            "MB/s",
            Some(best),
            direct,
            ">= 0.95x",
            Some(direct / best >= 0.95),
        );
        if cpu.is_empty() || bare_cpu.is_empty() {
            self.unavailable(
                "relay CPU per GiB, coordinator vs bare quinn relay",
                "s/GiB",
                "<= 1x",
                PROC_STAT,
            );
        } else {
            let (b, q) = (median(bare_cpu), median(cpu));
            self.row(
                "relay CPU per GiB, coordinator vs bare quinn relay",
                "s/GiB",
                Some(b),
                q,
                "<= 1x",
                Some(q <= b),
            );
        }
        Ok(())
    }

    /// TCP through a forward and an expose (the client library's `Forward`
    /// and `Exposer`, which `qmesh forward` and `qmesh expose` run): one
    /// connection moving `plan.bulk` bytes in 1 MiB writes to a counting
    /// TCP sink, which answers with the count, relayed and direct; against
    /// the best raw bulk and against the same connection straight to the
    /// sink.
    async fn forward(&mut self) -> Result<()> {
        use qmesh_client::forward::{Endpoint as Local, Expose, Exposer, Forward, Stopper};
        let size = self.plan.bulk;
        let sink = tcp_sink().await?;
        let exposer = Arc::new(Exposer::new(
            "fwd-bob",
            [Expose::new("sink", Local::Tcp(sink))],
        ));
        let mut cfg = self.coordinator.config("fwd-bob");
        cfg.interfaces = exposer.interfaces();
        let exposing = Client::connect(cfg).await?;
        let serving = {
            let (exposer, client) = (exposer.clone(), exposing.clone());
            tokio::spawn(async move { exposer.run(&client).await })
        };
        let forwarding = Client::connect(self.coordinator.config("fwd-alice")).await?;
        let mut routes = Vec::new();
        for mode in [PathMode::Relay, PathMode::Direct] {
            let listen = SocketAddr::from((
                [127, 0, 0, 1],
                qmesh_integration_tests::programs::free_port(),
            ));
            let mut route = Forward::new(
                format!("bench {mode:?}"),
                Local::Tcp(listen),
                "mesh/fwd-bob!sink".parse()?,
            );
            route.mode = mode;
            let (stopper, stop) = Stopper::new();
            let client = forwarding.clone();
            tokio::spawn(async move { route.run(client, stop, |_| {}).await });
            routes.push((stopper, listen));
        }
        let (mut plain, mut relayed, mut direct) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.runs {
            plain.push(tcp_bulk(sink, size).await.context("plain TCP")?);
            relayed.push(
                tcp_bulk(routes[0].1, size)
                    .await
                    .context("relayed forward")?,
            );
            direct.push(
                tcp_bulk(routes[1].1, size)
                    .await
                    .context("direct forward")?,
            );
        }
        for (stopper, _) in &routes {
            stopper.stop(Duration::ZERO);
        }
        serving.abort();
        forwarding.close("done").await;
        exposing.close("done").await;
        let mib = size / MIB;
        let (plain, relayed, direct) = (median(plain), median(relayed), median(direct));
        match self.best_bulk {
            Some(best) => {
                self.row(
                    &format!("TCP {mib} MiB, no tunnel vs best raw"),
                    "MB/s",
                    Some(best),
                    plain,
                    "measured",
                    None,
                );
                self.row(
                    &format!("TCP {mib} MiB through a relayed forward vs best raw"),
                    "MB/s",
                    Some(best),
                    relayed,
                    "measured",
                    None,
                );
                self.row(
                    &format!("TCP {mib} MiB through a direct forward vs best raw"),
                    "MB/s",
                    Some(best),
                    direct,
                    "measured",
                    None,
                );
            }
            None => {
                self.row(
                    &format!("TCP {mib} MiB through a relayed forward vs no tunnel"),
                    "MB/s",
                    Some(plain),
                    relayed,
                    "measured",
                    None,
                );
                self.row(
                    &format!("TCP {mib} MiB through a direct forward vs no tunnel"),
                    "MB/s",
                    Some(plain),
                    direct,
                    "measured",
                    None,
                );
            }
        }
        Ok(())
    }

    async fn small(&mut self) -> Result<()> {
        for (size, count) in self.plan.small {
            let msg = vec![5u8; size];
            let (mut best, mut relayed) = (Vec::new(), Vec::new());
            for _ in 0..self.runs {
                best.push(
                    Self::best_raw(&self.best, move |conn| async move {
                        raw::messages(&conn, size, count).await
                    })
                    .await?,
                );

                let ch = self.relay_channel().await?;
                let t = Instant::now();
                let mut out = ch.open_stream().await?;
                out.feed(b"M").await?;
                for _ in 0..count {
                    out.feed(&msg).await?;
                }
                out.finish().await?;
                let got = answer_u64(&ch).await?;
                let secs = t.elapsed().as_secs_f64();
                if got != count {
                    bail!("relayed small: {got} of {count}");
                }
                relayed.push(count as f64 / secs);
                ch.close("done").await?;
            }
            let (best, relayed) = (median(best), median(relayed));
            let (target, met) = if size == 16 {
                (">= 0.3x", Some(relayed / best >= 0.3))
            } else {
                ("measured", None)
            };
            self.row(
                &format!("messages {size} B, relayed vs best raw framed"),
                "msg/s",
                Some(best),
                relayed,
                target,
                met,
            );
        }
        Ok(())
    }

    async fn rtt(&mut self) -> Result<()> {
        let conn = self.raw.connect(&self.raw_client).await?;
        let msg = [9u8; 64];
        let n = self.plan.rtt;
        let (mut best50, mut best99, mut multi50, mut bare50) = (vec![], vec![], vec![], vec![]);
        let (mut rel50, mut rel99) = (vec![], vec![]);
        let echoes = move |conn: quinn::Connection| async move {
            let (mut out, mut inbox) = raw::echo(&conn).await?;
            raw::round_trips(&mut out, &mut inbox, &msg, n).await
        };
        for _ in 0..self.runs {
            let mut t = Self::best_raw(&self.best, echoes).await?;
            best50.push(percentile(&mut t, 0.5));
            best99.push(percentile(&mut t, 0.99));
            let mut t = echoes(conn.clone()).await?;
            multi50.push(percentile(&mut t, 0.5));
            let mut t = Self::best_raw(&self.bare, echoes).await?;
            bare50.push(percentile(&mut t, 0.5));

            let ch = self.relay_channel().await?;
            let mut t = self
                .alice_node
                .run(async move {
                    let t = echo_round_trips(&ch, &msg, n).await?;
                    ch.close("done").await?;
                    Ok(t)
                })
                .await?;
            rel50.push(percentile(&mut t, 0.5));
            rel99.push(percentile(&mut t, 0.99));
        }
        let (b50, q50) = (median(best50), median(rel50));
        self.best_rtt50 = Some(b50);
        self.row(
            "round trip 64 B p50, raw multi-thread server vs best raw",
            "µs",
            Some(b50),
            median(multi50),
            "measured",
            None,
        );
        self.row(
            "round trip 64 B p50, bare quinn relay vs best raw",
            "µs",
            Some(b50),
            median(bare50),
            "measured",
            None,
        );
        self.row(
            "round trip 64 B p50, relayed vs best raw",
            "µs",
            Some(b50),
            q50,
            "<= 1.7x",
            Some(q50 / b50 <= 1.7),
        );
        let (b99, q99) = (median(best99), median(rel99));
        self.row(
            "round trip 64 B p99, relayed vs best raw",
            "µs",
            Some(b99),
            q99,
            "measured",
            None,
        );
        Ok(())
    }

    /// Requests and replies on a relayed and on a direct channel against
    /// the best raw echo: one at a time (latency), and 100 in flight at once
    /// (rate, and on the direct channel UDP datagrams per request).
    async fn requests(&mut self) -> Result<()> {
        let msg = [7u8; 64];
        let (n, batches) = (self.plan.rtt, self.plan.batches);
        let (mut raw50, mut req50, mut raw_rate, mut req_rate) = (vec![], vec![], vec![], vec![]);
        let (mut dreq50, mut dreq_rate) = (vec![], vec![]);
        let (mut raw_dgrams, mut dreq_dgrams) = (vec![], vec![]);
        for _ in 0..self.runs {
            let (mut t, rate, per) = Self::best_raw(&self.best, move |conn| async move {
                let (mut out, mut inbox) = raw::echo(&conn).await?;
                let t = raw::round_trips(&mut out, &mut inbox, &msg, n).await?;
                let sent = udp_counter("OutDatagrams");
                let rate = raw::in_flight(&mut out, &mut inbox, &msg, batches, IN_FLIGHT).await?;
                Ok((t, rate, per_request(sent, batches * IN_FLIGHT)))
            })
            .await?;
            raw50.push(percentile(&mut t, 0.5));
            raw_rate.push(rate);
            raw_dgrams.extend(per);

            let (mut t, rate, _) = self.requests_on(PathMode::Relay, msg).await?;
            req50.push(percentile(&mut t, 0.5));
            req_rate.push(rate);
            let (mut t, rate, per) = self.requests_on(PathMode::Direct, msg).await?;
            dreq50.push(percentile(&mut t, 0.5));
            dreq_rate.push(rate);
            dreq_dgrams.extend(per);
        }
        let (r50, q50) = (median(raw50), median(req50));
        self.row(
            "request/reply 64 B p50, relayed vs best raw echo",
            "µs",
            Some(r50),
            q50,
            "measured",
            None,
        );
        self.row(
            "request/reply 64 B p50, direct vs best raw echo",
            "µs",
            Some(r50),
            median(dreq50),
            "measured",
            None,
        );
        let (r, q) = (median(raw_rate), median(req_rate));
        self.row(
            "100 requests in flight 64 B, relayed vs best raw echo",
            "req/s",
            Some(r),
            q,
            "measured",
            None,
        );
        let q = median(dreq_rate);
        self.row(
            "100 requests in flight 64 B, direct vs best raw echo",
            "req/s",
            Some(r),
            q,
            ">= 0.6x",
            Some(q / r >= 0.6),
        );
        if raw_dgrams.is_empty() || dreq_dgrams.is_empty() {
            self.unavailable(
                "UDP datagrams per request in flight, direct vs best raw echo",
                "datagrams",
                "measured",
                PROC_SNMP,
            );
        } else {
            self.row(
                "UDP datagrams per request in flight, direct vs best raw echo",
                "datagrams",
                Some(median(raw_dgrams)),
                median(dreq_dgrams),
                "measured",
                None,
            );
        }
        Ok(())
    }

    /// [`request_rates`] on a new channel to bob in `mode`, run on alice's
    /// thread.
    async fn requests_on(
        &mut self,
        mode: PathMode,
        msg: [u8; 64],
    ) -> Result<(Vec<f64>, f64, Option<f64>)> {
        let (n, batches) = (self.plan.rtt, self.plan.batches);
        let ch = self.channel(mode).await?;
        self.alice_node
            .run(async move { request_rates(ch, msg, n, batches).await })
            .await
    }

    async fn open(&mut self) -> Result<()> {
        let opens = self.plan.opens;
        let msg = [9u8; 64];
        let (mut raw50, mut rtt50, mut open50, mut open99) = (vec![], vec![], vec![], vec![]);
        for _ in 0..self.runs {
            let mut t = Self::best_raw(&self.best, move |conn| async move {
                raw::stream_round_trips(&conn, opens).await
            })
            .await?;
            raw50.push(percentile(&mut t, 0.5));
            // The relayed round trip the open is held to, in the same run.
            let ch = self.relay_channel().await?;
            let names: Vec<String> = (0..opens).map(|_| self.name("o")).collect();
            let alice = self.alice.clone();
            let (mut rtt, mut t) = self
                .alice_node
                .run(async move {
                    let rtt = echo_round_trips(&ch, &msg, opens).await?;
                    ch.close("done").await?;
                    let mut t = Vec::new();
                    let mut keep = Vec::new();
                    for name in names {
                        let start = Instant::now();
                        let address = format!("mesh/bob!{name}").parse()?;
                        let ch = alice.open_with(&address, PathMode::Relay).await?;
                        t.push(start.elapsed().as_secs_f64() * 1e6);
                        keep.push(ch);
                    }
                    for ch in keep {
                        ch.close("done").await?;
                    }
                    Ok((rtt, t))
                })
                .await?;
            rtt50.push(percentile(&mut rtt, 0.5));
            open50.push(percentile(&mut t, 0.5));
            open99.push(percentile(&mut t, 0.99));
        }
        let (r, q) = (median(raw50), median(open50));
        self.row(
            "channel open p50 vs best raw stream round trip",
            "µs",
            Some(r),
            q,
            "measured",
            None,
        );
        let r = median(rtt50);
        self.row(
            "channel open p50 vs relayed round trip",
            "µs",
            Some(r),
            q,
            "<= 1.2x",
            Some(q / r <= 1.2),
        );
        self.row(
            "channel open p99",
            "µs",
            None,
            median(open99),
            "measured",
            None,
        );
        Ok(())
    }

    /// Connects one after another to `targets` in turn: each connect's
    /// time in µs (the hello, and with etcd the claim, included).
    async fn timed_connects(
        targets: &[&CoordinatorProcess],
        n: usize,
        prefix: &str,
    ) -> Result<Vec<f64>> {
        // One endpoint for all of them: a client with an endpoint of its
        // own waits, when it closes, for the connection's draining period
        // (up to 2 s), which made 1,200 connects take many minutes.
        let endpoint = qmesh_certs::transport::client_endpoint("127.0.0.1:0".parse()?)?;
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let cfg = targets[i % targets.len()].config(&format!("{prefix}-{i}"));
            let start = Instant::now();
            let c = Client::connect_on(Some(&endpoint), cfg).await?;
            times.push(start.elapsed().as_secs_f64() * 1e6);
            c.close("done").await;
        }
        settle(&[endpoint]).await;
        Ok(times)
    }

    /// `n` connects at once spread over `targets`: connects per second.
    async fn connect_burst(targets: &[&CoordinatorProcess], n: usize, prefix: &str) -> Result<f64> {
        let endpoints: Vec<Endpoint> = (0..8)
            .map(|_| qmesh_certs::transport::client_endpoint("127.0.0.1:0".parse().expect("addr")))
            .collect::<std::io::Result<_>>()?;
        let t = Instant::now();
        let mut set = JoinSet::new();
        for i in 0..n {
            let ep = endpoints[i % endpoints.len()].clone();
            let cfg = targets[i % targets.len()].config(&format!("{prefix}-{i}"));
            set.spawn(async move {
                Client::connect_on(Some(&ep), cfg)
                    .await
                    .map_err(anyhow::Error::from)
            });
        }
        let mut clients = Vec::new();
        while let Some(r) = set.join_next().await {
            clients.push(r??);
        }
        let rate = n as f64 / t.elapsed().as_secs_f64();
        for c in &clients {
            c.close("done").await;
        }
        drop(clients);
        settle(&endpoints).await;
        Ok(rate)
    }

    /// Three coordinators on a directory in etcd against the single
    /// coordinator: the hello with its claim, a connect burst spread over
    /// the three, and a relayed channel from a client of one member to a
    /// client of another (two relays and the member link between them)
    /// against a relayed channel through the single coordinator.
    async fn cluster(&mut self) -> Result<()> {
        const HELLO: &str = "connect p50 (hello with its name claim), etcd member vs single";
        const HELLO99: &str = "connect p99 (hello with its name claim), etcd member vs single";
        const RATE: &str = "connect rate spread over 3 etcd members vs 1 single";
        if qmesh_integration_tests::programs::require("etcd").is_none() {
            for case in [HELLO, HELLO99, RATE] {
                self.unavailable(
                    case,
                    "",
                    "measured",
                    "etcd (Debian etcd-server) is not installed",
                );
            }
            return Ok(());
        }
        let etcd = qmesh_integration_tests::programs::etcd_cluster(1);
        let url = etcd[0].url();
        let members: Vec<CoordinatorProcess> = (0..3)
            .map(|_| {
                CoordinatorProcess::start_with(
                    self.dir.path(),
                    &self.ca,
                    self.shape,
                    &["--etcd", &url],
                )
            })
            .collect::<Result<_>>()?;
        let cluster: Vec<&CoordinatorProcess> = members.iter().collect();
        let n = self.plan.opens * 4;
        let burst = self.plan.connects;
        let (mut single50, mut single99, mut member50, mut member99) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut single_rate, mut cluster_rate) = (Vec::new(), Vec::new());
        for run in 0..self.runs {
            progress(format_args!(
                "cluster run {run}: {n} connects to the single coordinator"
            ));
            let mut t = Self::timed_connects(&[&self.coordinator], n, &format!("hs{run}")).await?;
            single50.push(percentile(&mut t, 0.5));
            single99.push(percentile(&mut t, 0.99));
            progress(format_args!(
                "cluster run {run}: {n} connects to one member"
            ));
            let mut t = Self::timed_connects(&cluster[..1], n, &format!("hm{run}")).await?;
            member50.push(percentile(&mut t, 0.5));
            member99.push(percentile(&mut t, 0.99));
            progress(format_args!(
                "cluster run {run}: {burst} connects at once to the single coordinator"
            ));
            single_rate
                .push(Self::connect_burst(&[&self.coordinator], burst, &format!("bs{run}")).await?);
            progress(format_args!(
                "cluster run {run}: {burst} connects at once over 3 members"
            ));
            cluster_rate.push(Self::connect_burst(&cluster, burst, &format!("bm{run}")).await?);
        }
        let (r, q) = (median(single50), median(member50));
        self.row(HELLO, "µs", Some(r), q, "measured", None);
        let (r, q) = (median(single99), median(member99));
        self.row(HELLO99, "µs", Some(r), q, "measured", None);
        let (r, q) = (median(single_rate), median(cluster_rate));
        self.row(RATE, "per s", Some(r), q, "measured", None);
        self.across(&cluster)
            .await
            .context("across the member link")?;
        drop(members);
        drop(etcd);
        Ok(())
    }

    /// Bulk and 64 B round trips on a channel from x on the first member
    /// to y on the second, against the same through the single
    /// coordinator.
    async fn across(&mut self, cluster: &[&CoordinatorProcess]) -> Result<()> {
        let size = self.plan.bulk;
        let chunk = Bytes::from(vec![7u8; MIB as usize]);
        let msg = [9u8; 64];
        let x = Client::connect(cluster[0].config("x")).await?;
        let y = Client::connect(cluster[1].config("y")).await?;
        tokio::spawn(bob_serves(y.clone()));
        let (mut single, mut cross) = (Vec::new(), Vec::new());
        let (mut single50, mut single99, mut cross50, mut cross99) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.runs {
            let ch = self.relay_channel().await?;
            single.push(
                stream_bulk(&ch, size, &chunk)
                    .await
                    .context("single bulk")?,
            );
            let mut t = echo_round_trips(&ch, &msg, self.plan.rtt).await?;
            single50.push(percentile(&mut t, 0.5));
            single99.push(percentile(&mut t, 0.99));
            ch.close("done").await?;

            let ch = open_across(&x, &self.name("x")).await?;
            cross.push(stream_bulk(&ch, size, &chunk).await.context("cross bulk")?);
            let mut t = echo_round_trips(&ch, &msg, self.plan.rtt).await?;
            cross50.push(percentile(&mut t, 0.5));
            cross99.push(percentile(&mut t, 0.99));
            ch.close("done").await?;
        }
        let (cross_bulk, cross_rtt50) = (median(cross.clone()), median(cross50.clone()));
        if let Some(best) = self.best_bulk {
            let case = format!("bulk {} MiB, across 2 etcd members vs best raw", size / MIB);
            self.row(&case, "MB/s", Some(best), cross_bulk, "measured", None);
        }
        if let Some(best) = self.best_rtt50 {
            let case = "round trip 64 B p50, across 2 etcd members vs best raw";
            self.row(case, "µs", Some(best), cross_rtt50, "measured", None);
        }
        let (r, q) = (median(single), median(cross));
        self.row(
            &format!(
                "bulk {} MiB, across 2 etcd members vs single relayed",
                size / MIB
            ),
            "MB/s",
            Some(r),
            q,
            ">= 0.6x",
            Some(q / r >= 0.6),
        );
        let (r, q) = (median(single50), median(cross50));
        self.row(
            "round trip 64 B p50, across 2 etcd members vs single relayed",
            "µs",
            Some(r),
            q,
            "measured",
            None,
        );
        let (r, q) = (median(single99), median(cross99));
        self.row(
            "round trip 64 B p99, across 2 etcd members vs single relayed",
            "µs",
            Some(r),
            q,
            "measured",
            None,
        );
        x.close("done").await;
        y.close("done").await;
        Ok(())
    }

    async fn connects(&mut self) -> Result<()> {
        let n = self.plan.connects;
        let (mut raw, mut mesh, mut lost) = (Vec::new(), Vec::new(), 0u64);
        let (mut raw_cpu, mut mesh_cpu) = (Vec::new(), Vec::new());
        let mut drops_counted = true;
        let (mut raw_ccpu, mut mesh_ccpu) = (Vec::new(), Vec::new());
        let (mut raw_dgrams, mut mesh_dgrams) = (Vec::new(), Vec::new());
        let me = std::process::id();
        for run in 0..self.runs {
            let drops0 = udp_rcvbuf_errors();
            // Best raw: the handshakes from a client thread of its own to
            // the one-thread server; the counters are read as the last
            // handshake completes, before the closes.
            let (addr, client, server) =
                (self.best.addr, self.best.client.clone(), self.best.pid());
            let (rate, cpu, ccpu, dgrams) = raw::on_own_thread(move || async move {
                let endpoints = raw::client_endpoints(8)?;
                let (cpu0, ccpu0, dgrams0) = (
                    cpu_seconds(server),
                    cpu_seconds(me),
                    udp_counter("OutDatagrams"),
                );
                let (rate, conns) = raw::handshakes(&endpoints, &client, addr, n).await?;
                let delta = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
                let cpu = delta(cpu0, cpu_seconds(server));
                let ccpu = delta(ccpu0, cpu_seconds(me));
                let dgrams = delta(
                    dgrams0.map(|d| d as f64),
                    udp_counter("OutDatagrams").map(|d| d as f64),
                );
                // Let the closes finish before the next phase, so that
                // neither phase pays for the other's teardown.
                for c in &conns {
                    c.close(0u32.into(), b"done");
                }
                drop(conns);
                settle(&endpoints).await;
                Ok((rate, cpu, ccpu, dgrams))
            })
            .await?;
            raw.push(rate);
            raw_cpu.extend(cpu.map(|c| c * 1e6 / n as f64));
            raw_ccpu.extend(ccpu.map(|c| c * 1e6 / n as f64));
            raw_dgrams.extend(dgrams.map(|d| d / n as f64));
            let endpoints = raw::client_endpoints(8)?;
            let cpu0 = cpu_seconds(self.coordinator.pid());
            let ccpu0 = cpu_seconds(me);
            let dgrams0 = udp_counter("OutDatagrams");

            let t = Instant::now();
            let mut set = JoinSet::new();
            for i in 0..n {
                let ep = endpoints[i % endpoints.len()].clone();
                let cfg = self.coordinator.config(&format!("conn-{run}-{i}"));
                set.spawn(async move {
                    Client::connect_on(Some(&ep), cfg)
                        .await
                        .map_err(anyhow::Error::from)
                });
            }
            let mut clients = Vec::new();
            while let Some(r) = set.join_next().await {
                clients.push(r??);
            }
            mesh.push(n as f64 / t.elapsed().as_secs_f64());
            if let (Some(a), Some(b)) = (cpu0, cpu_seconds(self.coordinator.pid())) {
                mesh_cpu.push((b - a) * 1e6 / n as f64);
            }
            if let (Some(a), Some(b)) = (ccpu0, cpu_seconds(me)) {
                mesh_ccpu.push((b - a) * 1e6 / n as f64);
            }
            if let (Some(a), Some(b)) = (dgrams0, udp_counter("OutDatagrams")) {
                mesh_dgrams.push((b - a) as f64 / n as f64);
            }
            match (drops0, udp_rcvbuf_errors()) {
                (Some(a), Some(b)) => lost += b - a,
                _ => drops_counted = false,
            }
            for c in &clients {
                c.close("done").await;
            }
            drop(clients);
            settle(&endpoints).await;
        }
        let (r, q) = (median(raw), median(mesh));
        let case = format!("connect rate, {n} at once, sessions vs best raw handshakes");
        self.row(&case, "per s", Some(r), q, ">= 0.8x", Some(q / r >= 0.8));
        if raw_cpu.is_empty() || mesh_cpu.is_empty() {
            self.unavailable(
                "server CPU per connect, coordinator vs best raw server",
                "µs",
                "measured",
                PROC_STAT,
            );
        } else {
            let (r, q) = (median(raw_cpu), median(mesh_cpu));
            self.row(
                "server CPU per connect, coordinator vs best raw server",
                "µs",
                Some(r),
                q,
                "measured",
                None,
            );
        }
        if raw_ccpu.is_empty() || mesh_ccpu.is_empty() {
            self.unavailable(
                "client CPU per connect, qmesh client vs best raw client",
                "µs",
                "measured",
                PROC_STAT,
            );
        } else {
            let (r, q) = (median(raw_ccpu), median(mesh_ccpu));
            self.row(
                "client CPU per connect, qmesh client vs best raw client",
                "µs",
                Some(r),
                q,
                "measured",
                None,
            );
        }
        if raw_dgrams.is_empty() || mesh_dgrams.is_empty() {
            self.unavailable(
                "UDP datagrams per connect, both directions",
                "datagrams",
                "measured",
                PROC_SNMP,
            );
        } else {
            let (r, q) = (median(raw_dgrams), median(mesh_dgrams));
            self.row(
                "UDP datagrams per connect, both directions",
                "datagrams",
                Some(r),
                q,
                "measured",
                None,
            );
        }
        if drops_counted {
            self.row(
                "UDP receive-buffer drops during connect bursts",
                "datagrams",
                None,
                lost as f64,
                "0",
                Some(lost == 0),
            );
        } else {
            self.unavailable(
                "UDP receive-buffer drops during connect bursts",
                "datagrams",
                "0",
                PROC_SNMP,
            );
        }
        Ok(())
    }

    /// Idle clients on one coordinator: RSS per client against idle raw
    /// quinn connections to the one-thread raw server, the time to connect
    /// them all, and the coordinator's CPU while they sit idle with
    /// default heartbeats and keep-alives.
    async fn idle(&mut self) -> Result<()> {
        let n = self.plan.idle;
        // At full size one run: 100,000 clients take a minute or more to
        // connect and some gigabytes in this process.
        let runs = if n >= 50_000 { 1 } else { self.runs };
        let endpoint_count = (n / 1_600).clamp(16, 64);
        let (mut per, mut raw_per, mut secs, mut cpu) = (vec![], vec![], vec![], vec![]);
        let (mut held, mut lost) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let raw = RawServer::start(self.dir.path(), &self.coordinator.trust, Shape::Best)?;
            let endpoints = raw::client_endpoints(endpoint_count)?;
            let warm = raw.connect(&endpoints[0]).await?;
            let before = rss_kib(raw.pid()).context("raw server RSS")?;
            let (cfg, addr) = (raw.client.clone(), raw.addr);
            let conns = in_batches(n, &endpoints, |_, ep| {
                let cfg = cfg.clone();
                async move { Ok(ep.connect_with(cfg, addr, "localhost")?.await?) }
            })
            .await?;
            let after = rss_kib(raw.pid()).context("raw server RSS")?;
            raw_per.push(after.saturating_sub(before) as f64 / n as f64);
            drop((conns, warm));
            // Until the closed connections have drained, this process still
            // runs a driver for each (100,000 at full size): the qmesh
            // clients' handshakes below would compete with them.
            let drained =
                tokio::time::timeout(Duration::from_secs(120), futures_wait_idle(&endpoints)).await;
            if drained.is_err() {
                progress(format_args!(
                    "idle: the raw connections had not drained after 120 s; going on"
                ));
            }
        }
        for run in 0..runs {
            progress(format_args!("idle run {run}: {n} clients"));
            // A fresh coordinator for each count.
            let coordinator =
                CoordinatorProcess::start_for_idle(self.dir.path(), &self.ca, self.shape)?;
            let endpoints = raw::client_endpoints(endpoint_count)?;
            // One client first, so the baseline includes a warmed-up runtime.
            let warm = Client::connect_on(Some(&endpoints[0]), coordinator.config("warm")).await?;
            let before = rss_kib(coordinator.pid()).context("coordinator RSS")?;
            let t = Instant::now();
            let (clients, failed) = in_batches_counting(n, &endpoints, |i, ep| {
                let cfg = coordinator.config(&format!("idle-{run}-{i}"));
                async move { Ok(Client::connect_on(Some(&ep), cfg).await?) }
            })
            .await;
            secs.push(t.elapsed().as_secs_f64());
            held.push(clients.len() as f64);
            if let Some((count, first)) = failed {
                progress(format_args!(
                    "idle run {run}: {count} connects failed after {} clients were held, \
                     the first with: {first:#}",
                    clients.len()
                ));
            }
            if clients.is_empty() {
                bail!("no idle client could connect");
            }
            let after = rss_kib(coordinator.pid()).context("coordinator RSS")?;
            per.push((after.saturating_sub(before)) as f64 / clients.len() as f64);
            // The clients sit idle: what remains is heartbeats, keep-alives
            // and timers.
            let sessions: Vec<u64> = clients.iter().map(Client::session_id).collect();
            let cpu0 = cpu_seconds(coordinator.pid());
            let window = Instant::now();
            tokio::time::sleep(self.plan.idle_window).await;
            if let (Some(a), Some(b)) = (cpu0, cpu_seconds(coordinator.pid())) {
                cpu.push((b - a) / window.elapsed().as_secs_f64() * 100.0);
            }
            let gone = clients
                .iter()
                .zip(&sessions)
                .filter(|(c, id)| !matches!(*c.state().borrow(), SessionState::Up { session } if session == **id))
                .count();
            lost.push(gone as f64);
            drop(clients);
            drop(warm);
        }
        let (r, q) = (median(raw_per), median(per));
        let case = format!("idle clients of {n}: connected and held");
        let got = median(held);
        self.row(
            &case,
            "clients",
            None,
            got,
            &format!("{n}"),
            Some(got >= n as f64),
        );
        let case = format!("idle clients of {n}: sessions lost while idle");
        let gone = median(lost);
        self.row(&case, "clients", None, gone, "0", Some(gone == 0.0));
        let case = format!("idle clients of {n}: RSS per client held vs best raw quinn");
        self.row(&case, "KiB", Some(r), q, "<= 32", Some(q <= 32.0));
        let case = format!("idle clients of {n}: time to connect them");
        self.row(&case, "s", None, median(secs), "measured", None);
        let case = format!(
            "idle clients of {n}: coordinator CPU over {} s, default heartbeats",
            self.plan.idle_window.as_secs()
        );
        if cpu.is_empty() {
            self.unavailable(&case, "% of a core", "<= 5", PROC_STAT);
        } else {
            let q = median(cpu);
            self.row(&case, "% of a core", None, q, "<= 5", Some(q <= 5.0));
        }
        Ok(())
    }
}

/// A TCP sink on 127.0.0.1: each connection is read to its end, and the
/// count of bytes read is written back.
async fn tcp_sink() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// One TCP connection to `addr` moving `size` bytes in 1 MiB writes to a
/// [`tcp_sink`], whose count must come back: MB/s. The connect is tried
/// again for up to 10 s: a forward binds its listener once it has asked
/// for the interface.
async fn tcp_bulk(addr: SocketAddr, size: u64) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("connect {addr}: {e}; again");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context(format!("connecting to {addr}")),
        }
    };
    s.set_nodelay(true)?;
    let chunk = vec![7u8; MIB as usize];
    let t = Instant::now();
    for _ in 0..size / MIB {
        s.write_all(&chunk).await?;
    }
    s.shutdown().await?;
    let secs = raw::counted(&mut s, t, size, "TCP bulk").await?;
    Ok(size as f64 / secs / 1e6)
}

/// Wait (up to 10 s) until every connection on `endpoints` has finished
/// closing.
async fn settle(endpoints: &[Endpoint]) {
    let all = futures_wait_idle(endpoints);
    let _ = tokio::time::timeout(Duration::from_secs(10), all).await;
}

async fn futures_wait_idle(endpoints: &[Endpoint]) {
    for ep in endpoints {
        ep.wait_idle().await;
    }
}

/// Make `n` connections, 500 at a time, spread over `endpoints`; the
/// first failure ends it.
async fn in_batches<T, F, Fut>(n: usize, endpoints: &[Endpoint], make: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize, Endpoint) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let (made, failed) = in_batches_counting(n, endpoints, make).await;
    match failed {
        Some((count, first)) => Err(first.context(format!("{count} of {n} failed"))),
        None => Ok(made),
    }
}

/// As [`in_batches`], to the end: what was made, and how many failed with
/// the first failure. A batch with a failure is the last one tried.
async fn in_batches_counting<T, F, Fut>(
    n: usize,
    endpoints: &[Endpoint],
    make: F,
) -> (Vec<T>, Option<(usize, anyhow::Error)>)
where
    T: Send + 'static,
    F: Fn(usize, Endpoint) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let mut out = Vec::with_capacity(n);
    let mut failed: Option<(usize, anyhow::Error)> = None;
    for batch in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut set = JoinSet::new();
        for &i in batch {
            set.spawn(make(i, endpoints[i % endpoints.len()].clone()));
        }
        while let Some(r) = set.join_next().await {
            match r.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok(t) => out.push(t),
                Err(e) => match &mut failed {
                    Some((count, _)) => *count += 1,
                    None => failed = Some((1, e)),
                },
            }
        }
        if failed.is_some() {
            break;
        }
    }
    (out, failed)
}

/// A line on stderr saying what the bench is doing now, so that a run
/// that stalls shows where.
fn progress(what: std::fmt::Arguments<'_>) {
    eprintln!("qmesh-bench: {what}");
}

fn print_table(rows: &[Row], machine: &str, run: &Provenance) {
    println!(
        "qmesh-bench on {machine}, commit {}, {}",
        run.commit, run.date
    );
    println!(
        "{:<58} {:>14} {:>14} {:>8}  {:<9} unit",
        "case", "baseline", "qmesh", "ratio", "target"
    );
    for r in rows {
        let base = r
            .baseline
            .map(|b| format!("{b:.1}"))
            .unwrap_or_else(|| "-".into());
        let ratio = r
            .ratio
            .map(|x| format!("{x:.2}x"))
            .unwrap_or_else(|| "-".into());
        let met = match (r.met, &r.reason) {
            (Some(true), _) => " ok".to_owned(),
            (Some(false), _) => " MISSED".to_owned(),
            (None, Some(why)) => format!(" ({why})"),
            (None, None) => String::new(),
        };
        let qmesh = r
            .qmesh
            .map(|q| format!("{q:.1}"))
            .unwrap_or_else(|| "n/a".into());
        println!(
            "{:<58} {:>14} {:>14} {:>8}  {:<9} {}{}",
            r.case, base, qmesh, ratio, r.target, r.unit, met
        );
    }
}

/// Which code a table measured, and when: every figure in
/// docs/benchmarks.md names its run by these.
struct Provenance {
    /// `git rev-parse --short=12 HEAD`, `+changes` when the tree differs
    /// from it; `unknown` outside a checkout.
    commit: String,
    /// UTC, to the second.
    date: String,
}

impl Provenance {
    fn now() -> Provenance {
        let run = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        let commit = match run("git", &["rev-parse", "--short=12", "HEAD"]) {
            Some(c) => match run("git", &["status", "--porcelain", "--untracked-files=no"]) {
                Some(changes) if !changes.is_empty() => format!("{c}+changes"),
                _ => c,
            },
            None => "unknown (not run in a git checkout)".into(),
        };
        let date =
            run("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_else(|| "unknown".into());
        Provenance { commit, date }
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

impl Args {
    /// The coordinators' runtime shape.
    fn shape(&self) -> Shape {
        if self.per_core {
            Shape::PerCore
        } else if self.current_thread {
            Shape::Best
        } else {
            Shape::Multi
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.serve_coordinator {
        return serve_coordinator(dir, args.etcd.as_deref(), args.shape());
    }
    if let Some(dir) = &args.serve_raw {
        return raw::serve(dir, Shape::Multi);
    }
    if let Some(dir) = &args.serve_best {
        return raw::serve(dir, Shape::Best);
    }
    if let Some(dir) = &args.serve_bare_relay {
        let upstream = args
            .upstream
            .context("--serve-bare-relay needs --upstream")?;
        return raw::serve_bare_relay(dir, upstream);
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let mut plan = Plan::new(args.quick);
    if let Some(n) = args.idle {
        plan.idle = n.max(1);
    }
    let dir = tempfile::tempdir()?;
    let ca = Ca::generate("qmesh bench CA")?;
    let identity = ca.issue_server(&["localhost".into(), "127.0.0.1".into()])?;
    identity.save(
        &dir.path().join("coordinator.pem"),
        &dir.path().join("coordinator-key.pem"),
    )?;
    let shape = args.shape();
    let coordinator = CoordinatorProcess::start(dir.path(), &ca, shape)?;
    std::fs::write(
        dir.path().join(raw::CA_FILE),
        qmesh_certs::pem_encode_cert(ca.cert_der()),
    )?;
    let raw = RawServer::start(dir.path(), &coordinator.trust, Shape::Multi)?;
    let best = RawServer::start(dir.path(), &coordinator.trust, Shape::Best)?;
    let bare = RawServer::bare_relay(dir.path(), &coordinator.trust, &best)?;
    let raw_client = qmesh_certs::transport::client_endpoint("127.0.0.1:0".parse()?)?;
    let (alice_node, bob_node) = (Node::start("alice")?, Node::start("bob")?);
    let cfg = coordinator.config("alice");
    let alice = alice_node
        .run(async move { Ok(Client::connect(cfg).await?) })
        .await?;
    let cfg = coordinator.config("bob");
    let bob = bob_node
        .run(async move { Ok(Client::connect(cfg).await?) })
        .await?;
    bob_node.handle.spawn(bob_serves(bob.clone()));
    let mut bench = Bench {
        plan,
        runs: args.runs.max(1),
        ca,
        identity,
        dir,
        raw,
        raw_client,
        best,
        bare,
        best_bulk: None,
        best_rtt50: None,
        shape,
        coordinator,
        alice,
        bob,
        alice_node,
        _bob_node: bob_node,
        rows: Vec::new(),
        tick: 0,
    };
    let wants = |case: &str| {
        args.only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|part| case.contains(part.trim())))
    };
    const CASES: [&str; 9] = [
        "bulk", "forward", "small", "rtt", "requests", "open", "connect", "cluster", "idle",
    ];
    for case in CASES.into_iter().filter(|c| wants(c)) {
        progress(format_args!("case {case}"));
        let done = match case {
            "bulk" => bench.bulk().await,
            "forward" => bench.forward().await,
            "small" => bench.small().await,
            "rtt" => bench.rtt().await,
            "requests" => bench.requests().await,
            "open" => bench.open().await,
            "connect" => bench.connects().await,
            "cluster" => bench.cluster().await,
            _ => bench.idle().await,
        };
        done.with_context(|| format!("case {case}"))?;
    }
    let _ = (&bench.identity, &bench.bob);
    let machine = machine();
    let run = Provenance::now();
    let runtime_name = match bench.shape {
        Shape::Multi => "multi-thread",
        Shape::Best => "current-thread",
        Shape::PerCore => "per-core current-thread (SO_REUSEPORT)",
    };
    if args.json {
        let out = serde_json::json!({
            "machine": machine,
            "commit": run.commit,
            "date": run.date,
            "quick": args.quick,
            "runs": bench.runs,
            "coordinator_runtime": runtime_name,
            "client_runtime": "current-thread, one thread per client",
            "seconds": started.elapsed().as_secs_f64(),
            "rows": bench.rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&bench.rows, &machine, &run);
        println!(
            "({} runs per figure, median; coordinators on the {runtime_name} runtime; alice and bob \
             each on a thread of its own with a current-thread runtime, as each best raw node; \
             {:.0} s in all)",
            bench.runs,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
