//! Raw quinn at both ends: the baselines every qmesh figure is measured
//! against. The servers are child processes of the bench; the client side
//! of each case is here too, written once for every baseline.
//!
//! One server, two shapes ([`Shape`]):
//! - [`Shape::Multi`]: a multi-thread tokio runtime, as the coordinator
//!   runs; the tool's first baseline.
//! - [`Shape::Best`]: a node as quinn's own `bench` crate builds one: one OS
//!   thread running a current-thread runtime. A best-raw client is one OS
//!   thread of its own as well ([`on_own_thread`]).
//!
//! And a bare relay ([`serve_bare_relay`]): one OS thread, a current-thread
//! runtime, passing every stream's chunks on to the best server with
//! `read_chunk` → `write_chunk` and nothing else. It is the floor for what a
//! relay can cost.
//!
//! Every server has the coordinator's certificate, server TLS configuration,
//! transport configuration and socket buffers.

use std::future::Future;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use qmesh_certs::transport::Tuning;
use qmesh_certs::{Identity, Trust};
use qmesh_client::{MessageReceiver, MessageSender};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

/// The largest message any case sends (the 1 MiB bulk messages fit).
pub(crate) const MAX: usize = 64 * 1024 * 1024;

/// The file, in the bench's directory, holding the CA that issued the
/// coordinator's certificate (for the bare relay's own client side).
pub(crate) const CA_FILE: &str = "ca.pem";

/// How a raw server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// A multi-thread tokio runtime, as the coordinator runs.
    Multi,
    /// One OS thread with a current-thread runtime, as quinn's bench.
    Best,
    /// Coordinators only: one OS thread with a current-thread runtime per
    /// core, each with its own endpoint on an `SO_REUSEPORT` socket of the
    /// one port.
    PerCore,
}

/// The runtime of a node of `shape`.
pub(crate) fn runtime(shape: Shape) -> Result<tokio::runtime::Runtime> {
    Ok(match shape {
        Shape::Multi => tokio::runtime::Runtime::new()?,
        Shape::Best | Shape::PerCore => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    })
}

/// Start this binary as a child serving `flag` from `dir`; returns the
/// child and the port it reports.
pub(crate) fn start_child(flag: &str, dir: &Path, extra: &[&str]) -> Result<(Child, u16)> {
    start_child_under(None, flag, dir, extra)
}

/// As [`start_child`], run under `wrap` when given: a command and its
/// arguments, split at whitespace (for example `heaptrack -o /tmp/coord`),
/// for a profile of the child.
pub(crate) fn start_child_under(
    wrap: Option<&str>,
    flag: &str,
    dir: &Path,
    extra: &[&str],
) -> Result<(Child, u16)> {
    let exe = std::env::current_exe()?;
    let mut words = wrap.iter().flat_map(|w| w.split_whitespace());
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut child = command
        .arg(flag)
        .arg(dir)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting the {flag} child"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut stdout = std::io::BufReader::new(stdout);
    // A wrapper may print lines of its own first.
    let mut line = String::new();
    let port: u16 = loop {
        line.clear();
        if stdout.read_line(&mut line)? == 0 {
            bail!("the {flag} child ended without reporting its port");
        }
        if let Some(port) = line.trim().strip_prefix("port ") {
            break port.parse()?;
        }
    };
    // The rest of its output is drained, so it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    Ok((child, port))
}

/// Serve until stdin closes (the parent exited or dropped us).
pub(crate) async fn until_stdin_closes() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// A server endpoint with the coordinator's identity from `dir`, its
/// transport configuration and socket buffers, on 127.0.0.1; its port is
/// printed for the parent.
fn server_endpoint(dir: &Path) -> Result<Endpoint> {
    let identity = Identity::load(
        &dir.join("coordinator.pem"),
        &dir.join("coordinator-key.pem"),
    )?;
    let mut server = qmesh_certs::server_config(&identity)?;
    server.transport_config(Tuning::default().transport_config());
    let socket = qmesh_certs::transport::bind_udp(
        "127.0.0.1:0".parse()?,
        qmesh_certs::transport::SOCKET_BUFFER,
    )?;
    let endpoint = Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    println!("port {}", endpoint.local_addr()?.port());
    std::io::stdout().flush()?;
    Ok(endpoint)
}

/// The raw server child: the first byte of each bidirectional stream picks
/// what it does ([`raw_stream`]).
pub(crate) fn serve(dir: &Path, shape: Shape) -> Result<()> {
    runtime(shape)?.block_on(async {
        let endpoint = server_endpoint(dir)?;
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(raw_stream(send, recv));
                    }
                });
            }
        });
        until_stdin_closes().await;
        Ok(())
    })
}

/// The bare relay child: one thread; every stream of every connection is
/// passed on, chunk by chunk, to a stream of one connection to the best
/// server on `upstream`, and its answer back.
pub(crate) fn serve_bare_relay(dir: &Path, upstream: u16) -> Result<()> {
    runtime(Shape::Best)?.block_on(async {
        let endpoint = server_endpoint(dir)?;
        let trust = qmesh_client::ClientConfig::trust_ca_file(&dir.join(CA_FILE))?;
        let client = client_config(&trust)?;
        let up = endpoint
            .connect_with(
                client,
                SocketAddr::from(([127, 0, 0, 1], upstream)),
                "localhost",
            )?
            .await
            .context("the bare relay's connection to the best server")?;
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let up = up.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((down_send, down_recv)) = conn.accept_bi().await {
                        let Ok((up_send, up_recv)) = up.open_bi().await else {
                            return;
                        };
                        tokio::spawn(pump(down_recv, up_send));
                        tokio::spawn(pump(up_recv, down_send));
                    }
                });
            }
        });
        until_stdin_closes().await;
        Ok(())
    })
}

/// Pass `from`'s chunks to `to` until `from` ends; then finish `to`.
async fn pump(mut from: RecvStream, mut to: SendStream) {
    while let Ok(Some(chunk)) = from.read_chunk(usize::MAX, true).await {
        if to.write_chunk(chunk.bytes).await.is_err() {
            return;
        }
    }
    let _ = to.finish();
}

/// One stream of a raw server; its first byte picks what it does.
async fn raw_stream(mut send: SendStream, mut recv: RecvStream) {
    let mut mode = [0u8; 1];
    if recv.read_exact(&mut mode).await.is_err() {
        return;
    }
    match mode[0] {
        // Sink raw bytes, answer with the count.
        b'S' => {
            let mut n = 0u64;
            while let Ok(Some(c)) = recv.read_chunk(usize::MAX, true).await {
                n += c.bytes.len() as u64;
            }
            let _ = send.write_all(&n.to_be_bytes()).await;
            let _ = send.finish();
        }
        // Sink framed messages, answer with the count.
        b'M' => {
            let mut inbox = MessageReceiver::new(recv, MAX);
            let mut n = 0u64;
            while let Ok(Some(_)) = inbox.recv().await {
                n += 1;
            }
            let _ = send.write_all(&n.to_be_bytes()).await;
            let _ = send.finish();
        }
        // Echo framed messages.
        b'E' => {
            let mut inbox = MessageReceiver::new(recv, MAX);
            let mut out = MessageSender::new(send, MAX);
            while let Ok(Some(m)) = inbox.recv().await {
                if out.send(&m).await.is_err() {
                    return;
                }
            }
        }
        // One byte back: a new stream's round trip.
        b'P' => {
            let _ = send.write_all(b"p").await;
            let _ = send.finish();
        }
        _ => {}
    }
}

/// The client configuration of every raw connection: the same mutual TLS
/// a qmesh client does (a self-signed identity) and its transport tuning.
pub(crate) fn client_config(trust: &Trust) -> Result<quinn::ClientConfig> {
    let identity = Identity::self_signed("raw-client")?;
    let (mut client, _) = qmesh_certs::client_config_with_identity(trust, &identity)?;
    client.transport_config(Tuning::client().transport_config());
    Ok(client)
}

/// A raw server child (or the bare relay) and the client configuration
/// for it.
pub(crate) struct RawServer {
    child: Child,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// The client configuration every connection to it uses.
    pub(crate) client: quinn::ClientConfig,
}

impl RawServer {
    /// A raw server of `shape`.
    pub(crate) fn start(dir: &Path, trust: &Trust, shape: Shape) -> Result<Self> {
        let flag = match shape {
            Shape::Multi => "--serve-raw",
            // The per-core shape is the coordinator's; a raw node is one thread.
            Shape::Best | Shape::PerCore => "--serve-best",
        };
        Self::child(flag, dir, trust, &[])
    }

    /// The bare relay in front of `best`.
    pub(crate) fn bare_relay(dir: &Path, trust: &Trust, best: &RawServer) -> Result<Self> {
        let port = best.addr.port().to_string();
        Self::child("--serve-bare-relay", dir, trust, &["--upstream", &port])
    }

    fn child(flag: &str, dir: &Path, trust: &Trust, extra: &[&str]) -> Result<Self> {
        let (child, port) = start_child(flag, dir, extra)?;
        Ok(Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            client: client_config(trust)?,
        })
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A connection to it through `via`.
    pub(crate) async fn connect(&self, via: &Endpoint) -> Result<Connection> {
        Ok(via
            .connect_with(self.client.clone(), self.addr, "localhost")?
            .await?)
    }

    /// What a best-raw client thread needs to reach it.
    pub(crate) fn target(&self) -> (SocketAddr, quinn::ClientConfig) {
        (self.addr, self.client.clone())
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `work` as a best-raw node: on an OS thread of its own, on a
/// current-thread runtime made for it. Endpoints it uses must be made
/// inside it.
pub(crate) async fn on_own_thread<T, F, Fut>(work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("best-raw-client".into())
        .spawn(move || {
            let result = runtime(Shape::Best).and_then(|rt| rt.block_on(work()));
            let _ = tx.send(result);
        })?;
    rx.await
        .context("the client thread ended without an answer")?
}

/// Connect to `addr` with `client` from a new endpoint made here, then
/// run `work` on the connection: for a best-raw client thread.
pub(crate) async fn dialed<T, F, Fut>(
    addr: SocketAddr,
    client: quinn::ClientConfig,
    work: F,
) -> Result<T>
where
    F: FnOnce(Connection) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let endpoint = qmesh_certs::transport::client_endpoint("127.0.0.1:0".parse()?)?;
    let conn = endpoint.connect_with(client, addr, "localhost")?.await?;
    let out = work(conn.clone()).await;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    out
}

/// `size` bytes on one stream in 1 MiB `write_chunk`s to a sink, whose
/// count must come back: MB/s.
pub(crate) async fn bulk(conn: &Connection, size: u64, chunk: &Bytes) -> Result<f64> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let t = Instant::now();
    send.write_all(b"S").await?;
    for _ in 0..size / chunk.len() as u64 {
        send.write_chunk(chunk.clone()).await?;
    }
    send.finish()?;
    let secs = counted(&mut recv, t, size, "raw bulk").await?;
    Ok(size as f64 / secs / 1e6)
}

/// `count` messages of `size` bytes, framed as qmesh frames them and
/// gathered into 64 KiB writes, to a counting sink: messages per second.
pub(crate) async fn messages(conn: &Connection, size: usize, count: u64) -> Result<f64> {
    let msg = vec![5u8; size];
    let (mut raw_send, mut recv) = conn.open_bi().await?;
    let t = Instant::now();
    raw_send.write_all(b"M").await?;
    let mut send = MessageSender::new(raw_send, MAX);
    for _ in 0..count {
        send.feed(&msg).await?;
    }
    send.finish().await?;
    let secs = counted(&mut recv, t, count, "raw small messages").await?;
    Ok(count as f64 / secs)
}

/// Read a sink's count from `answer`, which must be `want`: the seconds
/// since `start`.
pub(crate) async fn counted(
    answer: &mut (impl tokio::io::AsyncRead + Unpin),
    start: Instant,
    want: u64,
    what: &str,
) -> Result<f64> {
    let mut n = [0u8; 8];
    answer.read_exact(&mut n).await?;
    let secs = start.elapsed().as_secs_f64();
    let got = u64::from_be_bytes(n);
    if got != want {
        bail!("{what} moved {got} of {want}");
    }
    Ok(secs)
}

/// Open a stream to the server's echo.
pub(crate) async fn echo(conn: &Connection) -> Result<(MessageSender, MessageReceiver)> {
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(b"E").await?;
    Ok((
        MessageSender::new(send, MAX),
        MessageReceiver::new(recv, MAX),
    ))
}

/// `n` round trips of `msg` through an echo, each in µs.
pub(crate) async fn round_trips(
    out: &mut MessageSender,
    inbox: &mut MessageReceiver,
    msg: &[u8],
    n: usize,
) -> Result<Vec<f64>> {
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        out.send(msg).await?;
        inbox.recv().await?.context("raw echo")?;
        t.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok(t)
}

/// `batches` times: `per` messages fed and flushed, then their echoes
/// read. Echoes per second.
pub(crate) async fn in_flight(
    out: &mut MessageSender,
    inbox: &mut MessageReceiver,
    msg: &[u8],
    batches: usize,
    per: usize,
) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..batches {
        for _ in 0..per {
            out.feed(msg).await?;
        }
        out.flush().await?;
        for _ in 0..per {
            inbox.recv().await?.context("raw echo")?;
        }
    }
    Ok((batches * per) as f64 / start.elapsed().as_secs_f64())
}

/// A new stream's round trip (one byte each way), `n` times, each in µs.
pub(crate) async fn stream_round_trips(conn: &Connection, n: usize) -> Result<Vec<f64>> {
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"P").await?;
        send.finish()?;
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await?;
        t.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok(t)
}

/// `n` handshakes started at once from `endpoints` to `addr`: handshakes
/// per second, and the connections (to close once counted).
pub(crate) async fn handshakes(
    endpoints: &[Endpoint],
    client: &quinn::ClientConfig,
    addr: SocketAddr,
    n: usize,
) -> Result<(f64, Vec<Connection>)> {
    let t = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..n {
        let ep = endpoints[i % endpoints.len()].clone();
        let cfg = client.clone();
        set.spawn(async move {
            ep.connect_with(cfg, addr, "localhost")?
                .await
                .map_err(anyhow::Error::from)
        });
    }
    let mut conns = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        conns.push(r??);
    }
    Ok((n as f64 / t.elapsed().as_secs_f64(), conns))
}

/// `count` client endpoints on 127.0.0.1, made on the calling runtime.
pub(crate) fn client_endpoints(count: usize) -> Result<Vec<Endpoint>> {
    (0..count)
        .map(|_| qmesh_certs::transport::client_endpoint("127.0.0.1:0".parse().expect("addr")))
        .collect::<Result<_, _>>()
        .map_err(Into::into)
}
