//! `qmesh-soak`: churn against a `qmesh-coordinator` process for a set
//! time, restarting it every few minutes, and check that nothing was lost
//! or doubled and that the coordinator does not grow from cycle to cycle.
//!
//! The tool starts the coordinator (development certificate, a temporary
//! state directory, a free port on 127.0.0.1) and, in this process, the
//! stable clients: two echo servers (`srv0`, `srv1`), a prober, and an
//! exposer and a forwarder carrying a TCP echo server's connections. Then,
//! until `--duration` has passed:
//!
//! - churn workers each join as a new client, open one to three channels
//!   (to the servers or to each other), send numbered requests on them,
//!   close or drop the channels, and leave (close or drop the client);
//! - the prober opens a channel to a `qmesh serve` process, keeps requests
//!   in flight on it and kills the process with SIGKILL: the channel must
//!   end lost, once, and every request must be answered or reported;
//! - TCP connections go through the forward, each carrying a random
//!   payload that must come back byte-exact or fail visibly;
//! - every `--restart-every` the churn pauses, the coordinator's RSS,
//!   threads and descriptors are read at that quiet point, the churn goes
//!   on and the coordinator is stopped (SIGTERM and SIGKILL in turn) and
//!   started again on its port and state directory; every stable client
//!   must come back by itself.
//!
//! At the end it prints what it checked and a `SUMMARY` line, and exits
//! with status 1 when a check failed. The binaries come from `--bin-dir`
//! (or `QMESH_SOAK_BIN_DIR`), by default the directory of this one. See
//! docs/benchmarks.md, "Soak".

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::stream::StreamExt;
use qmesh_client::events::{Event, Events};
use qmesh_client::forward::{Endpoint, Expose, Exposer, Forward, Stop};
use qmesh_client::{Address, Channel, ChannelEnd, Client, ClientConfig, PathMode};
use qmesh_client::{Heartbeat, Trust};
use qmesh_integration_tests::programs::free_port;
use qmesh_integration_tests::{memory_kib, payload};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, RwLock};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout};

/// Churn against a coordinator process, with restarts; checks that
/// nothing is lost or doubled and that the coordinator does not grow.
#[derive(Debug, Parser)]
#[command(name = "qmesh-soak", version)]
struct Args {
    /// How long the churn runs, e.g. `120s` or `1h`.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    duration: Duration,
    /// Time between coordinator restarts (a cycle), e.g. `3m`.
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    restart_every: Duration,
    /// Directory holding `qmesh` and `qmesh-coordinator` (default: the
    /// directory of this binary).
    #[arg(long, env = "QMESH_SOAK_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Seed of the churn's random choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Churn workers, each one client at a time.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Log filter for this process's own log, `soak.log` in the work
    /// directory.
    #[arg(long, default_value = "warn")]
    log: String,
    /// Keep the work directory (logs, state) even when every check passes.
    #[arg(long)]
    keep: bool,
}

/// Growth allowed from the first cycle's reading to any later one, in
/// percent, with the absolute floors below.
const DRIFT_PERCENT: u64 = 10;
/// RSS growth always allowed, KiB.
const RSS_FLOOR_KIB: u64 = 2048;
/// Thread growth always allowed (tokio's blocking pool keeps an idle
/// thread for 10 s).
const THREADS_FLOOR: u64 = 2;
/// Descriptor growth always allowed.
const FDS_FLOOR: u64 = 4;
/// The longest one step may take before it counts as hung.
const STEP: Duration = Duration::from_secs(60);
/// How long a request waits for its reply (the client's default).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The coordinator's QUIC idle timeout: how soon it notices a killed
/// client.
const IDLE_TIMEOUT_SECS: &str = "5";
/// The coordinator's drain after SIGTERM.
const DRAIN: &str = "3s";
/// The stable in-process echo servers.
const SERVERS: [&str; 2] = ["srv0", "srv1"];
/// The stable client that runs the forward.
const FORWARDER: &str = "forwarder";
/// Concurrent forwarded connections.
const FORWARD_TASKS: usize = 2;
/// Largest payload of one forwarded connection.
const MAX_FORWARD_BYTES: usize = 256 * 1024;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("qmesh-soak: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Run the soak; whether every check passed.
async fn run(args: Args) -> Result<bool> {
    let bins = Bins::find(args.bin_dir.clone())?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    // Kept if the run fails or stops with an error: its logs say why.
    let work = tempfile::Builder::new()
        .prefix("qmesh-soak.")
        .tempdir()?
        .keep();
    let log = std::fs::File::create(work.join("soak.log"))?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(Mutex::new(log))
        .with_ansi(false)
        .init();
    println!(
        "qmesh-soak: {} with a restart every {}, {} workers, seed {seed}; binaries from {}; work directory {}",
        show_duration(args.duration),
        show_duration(args.restart_every),
        args.workers,
        bins.dir.display(),
        work.display()
    );

    let state = work.join("state");
    let mut coord = Coordinator::start(&bins, &state, "quic/$4:0", &work, 0).await?;
    println!("coordinator pid {} on 127.0.0.1:{}", coord.pid, coord.port);
    let trust = ClientConfig::trust_ca_file(&coord.ca).context("the coordinator's CA file")?;
    let address: Address = format!("quic/$4:{}", coord.port).parse()?;
    let soak = Arc::new(Soak {
        address,
        trust,
        bins: bins.clone(),
        work: work.clone(),
        ca: coord.ca.clone(),
        port: coord.port,
        stats: Stats::default(),
        ledger: Arc::new(Ledger::default()),
        gate: RwLock::new(()),
        stop: AtomicBool::new(false),
        live: Mutex::new(Vec::new()),
        seen: Mutex::new(Vec::new()),
        seq: AtomicU64::new(1),
        channel_no: AtomicU64::new(1),
        failures: Mutex::new(Vec::new()),
        forward_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
    });

    let stable = Stable::start(&soak).await?;
    let mut actors = JoinSet::new();
    for w in 0..args.workers {
        let (soak, seed) = (soak.clone(), seed ^ ((w as u64 + 1) * 0x9e37_79b9));
        actors.spawn(async move { soak.churn(w, Rng::new(seed)).await });
    }
    {
        let (soak, prober) = (soak.clone(), stable.prober.clone());
        let seed = seed ^ 0x5151;
        actors.spawn(async move { soak.victims(prober, Rng::new(seed)).await });
    }
    for f in 0..FORWARD_TASKS {
        let (soak, seed) = (soak.clone(), seed ^ ((f as u64 + 1) * 0x7f4a_7c15));
        actors.spawn(async move { soak.forwarding(Rng::new(seed)).await });
    }

    let started = Instant::now();
    let deadline = started + args.duration;
    let mut cycles: Vec<Cycle> = Vec::new();
    let mut cycle_start = Instant::now();
    let mut terminated_ok = 0u64;
    loop {
        // The last cycle runs to the deadline: from half a cycle to one
        // and a half.
        let cycle_end = cycle_start + args.restart_every;
        let last = cycle_end + args.restart_every / 2 > deadline;
        tokio::time::sleep_until(if last { deadline } else { cycle_end }.into()).await;
        if last {
            soak.stop.store(true, Ordering::SeqCst);
        }
        // The quiet point: every actor between two iterations.
        let quiet = soak.gate.write().await;
        soak.settle(&stable).await;
        let cycle = Cycle {
            n: cycles.len() as u64 + 1,
            secs: cycle_start.elapsed().as_secs(),
            coordinator: Sample::of(coord.pid)?,
            soak_rss_kib: memory_kib(std::process::id()).map_or(0, |m| m.0),
            requests: soak.stats.sent.load(Ordering::Relaxed),
        };
        println!("{}", cycle.line());
        cycles.push(cycle);
        drop(quiet);
        if last {
            break;
        }
        // The restart meets live churn.
        sleep(Duration::from_secs(2)).await;
        let kill = soak.stats.restarts.load(Ordering::Relaxed) % 2 == 1;
        let status = coord.stop(kill).await?;
        if !kill {
            if status.success() {
                terminated_ok += 1;
            } else {
                soak.fail(format!(
                    "the coordinator exited {status} after SIGTERM, not 0"
                ));
            }
        }
        let restarts = soak.stats.restarts.fetch_add(1, Ordering::Relaxed) + 1;
        let listen = format!("quic/$4:{}", soak.port);
        coord = Coordinator::start(&bins, &state, &listen, &work, restarts).await?;
        let back = Instant::now();
        let how = if kill { "SIGKILL" } else { "SIGTERM" };
        let every = stable.names();
        let all_back = soak
            .ledger
            .wait_until(STEP, |l| {
                every
                    .iter()
                    .all(|n| l.reconnected.get(n).copied().unwrap_or(0) >= restarts)
            })
            .await;
        if all_back {
            println!(
                "restart {restarts} ({how}): coordinator pid {}, every stable client back in {} ms",
                coord.pid,
                back.elapsed().as_millis()
            );
        } else {
            let missing: Vec<String> = {
                let l = soak.ledger.state();
                every
                    .iter()
                    .filter(|n| l.reconnected.get(*n).copied().unwrap_or(0) < restarts)
                    .cloned()
                    .collect()
            };
            soak.fail(format!(
                "restart {restarts} ({how}): {missing:?} not back within {} s",
                STEP.as_secs()
            ));
        }
        cycle_start = Instant::now();
    }

    // Every actor has seen the stop flag at the quiet point.
    while let Some(done) = timeout(STEP, actors.join_next()).await.ok().flatten() {
        if let Err(e) = done {
            soak.fail(format!("an actor task failed: {e}"));
        }
    }
    stable.close(&soak).await;
    let all_ended = soak.ledger.wait_until(STEP, |l| l.open.is_empty()).await;
    if !all_ended {
        let open: Vec<String> = soak
            .ledger
            .state()
            .open
            .keys()
            .take(10)
            .map(|(c, l)| format!("{c}: {l}"))
            .collect();
        soak.fail(format!(
            "channels with no end after every client left: {open:?}"
        ));
    }
    let status = coord.stop(false).await?;
    if status.success() {
        terminated_ok += 1;
    } else {
        soak.fail(format!(
            "the coordinator exited {status} after the final SIGTERM, not 0"
        ));
    }

    let passed = soak.report(started.elapsed(), &cycles, terminated_ok);
    if passed && !args.keep {
        std::fs::remove_dir_all(&work)?;
    } else {
        println!("work directory kept: {}", work.display());
    }
    Ok(passed)
}

/// A duration written as numbers with units, e.g. `90s`, `3m`, `1h30m`,
/// `500ms`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("an empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: expected a number at {rest:?}"))?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let millis: u64 = match &rest[..unit] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m, h)")),
        };
        total += Duration::from_millis(n.saturating_mul(millis));
        rest = &rest[unit..];
    }
    Ok(total)
}

/// `d` as whole hours, minutes and seconds, e.g. `1h2m3s`.
fn show_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if m > 0 {
        out += &format!("{m}m");
    }
    if s > 0 || out.is_empty() {
        out += &format!("{s}s");
    }
    out
}

/// Paths of the binaries the soak runs.
#[derive(Debug, Clone)]
struct Bins {
    dir: PathBuf,
    coordinator: PathBuf,
    qmesh: PathBuf,
}

impl Bins {
    /// The binaries in `dir`, by default this binary's directory.
    fn find(dir: Option<PathBuf>) -> Result<Bins> {
        let dir = match dir {
            Some(d) => d,
            None => std::env::current_exe()?
                .parent()
                .context("the tool's directory")?
                .to_owned(),
        };
        let bins = Bins {
            coordinator: dir.join("qmesh-coordinator"),
            qmesh: dir.join("qmesh"),
            dir,
        };
        for p in [&bins.coordinator, &bins.qmesh] {
            if !p.is_file() {
                bail!(
                    "{} not found (build it, or give --bin-dir / QMESH_SOAK_BIN_DIR)",
                    p.display()
                );
            }
        }
        Ok(bins)
    }
}

/// A `qmesh-coordinator run` process.
#[derive(Debug)]
struct Coordinator {
    child: Child,
    pid: u32,
    port: u16,
    ca: PathBuf,
}

impl Coordinator {
    /// Start one on `listen` with `state` as its state directory, logging to
    /// `coordinator-N.log` in `work`, once it has named its port and CA
    /// file.
    async fn start(
        bins: &Bins,
        state: &Path,
        listen: &str,
        work: &Path,
        n: u64,
    ) -> Result<Coordinator> {
        let log = std::fs::File::create(work.join(format!("coordinator-{n}.log")))?;
        let mut child = Command::new(&bins.coordinator)
            // One process: its memory, threads and descriptors are the
            // coordinator's, and SIGKILL stops it.
            .args([
                "--log",
                "info",
                "run",
                "--single",
                "--listen",
                listen,
                "--state-dir",
            ])
            .arg(state)
            .args(["--idle-timeout", IDLE_TIMEOUT_SECS, "--drain", DRAIN])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bins.coordinator.display()))?;
        let pid = child.id().context("the coordinator's pid")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let (mut port, mut ca) = (None, None);
        timeout(STEP, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("qmesh-coordinator listening on quic/") {
                    port = rest.rsplit(':').next().and_then(|p| p.trim().parse().ok());
                }
                if let Some(file) = line.strip_prefix("clients need the CA file: ") {
                    ca = Some(PathBuf::from(file));
                    break;
                }
            }
            anyhow::Ok(())
        })
        .await
        .context("the coordinator's banner")??;
        // The rest of stdout is not needed, but must be read.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (Some(port), Some(ca)) = (port, ca) else {
            bail!("the coordinator ended before naming its port and CA file");
        };
        Ok(Coordinator {
            child,
            pid,
            port,
            ca,
        })
    }

    /// Stop it with SIGKILL, or with SIGTERM and its drain; how it exited.
    async fn stop(&mut self, kill: bool) -> Result<ExitStatus> {
        if kill {
            self.child.start_kill()?;
        } else {
            signal(self.pid, "TERM")?;
        }
        match timeout(STEP, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.start_kill()?;
                bail!("the coordinator did not exit within {} s", STEP.as_secs())
            }
        }
    }
}

/// Send signal `name` to process `pid` with `kill -NAME`.
fn signal(pid: u32, name: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{name} {pid}: {status}");
    }
    Ok(())
}

/// A process's resident memory, threads and open descriptors.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rss_kib: u64,
    threads: u64,
    fds: u64,
}

impl Sample {
    /// Read them from /proc/PID.
    fn of(pid: u32) -> Result<Sample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} in /proc/{pid}/status"))
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
        Ok(Sample {
            rss_kib: field("VmRSS:")?,
            threads: field("Threads:")?,
            fds,
        })
    }
}

/// What was read at the end of one cycle.
#[derive(Debug)]
struct Cycle {
    n: u64,
    secs: u64,
    coordinator: Sample,
    soak_rss_kib: u64,
    requests: u64,
}

impl Cycle {
    fn line(&self) -> String {
        format!(
            "cycle {} ({} s): coordinator RSS {}, {} threads, {} fds; this process RSS {}; {} requests so far",
            self.n,
            self.secs,
            mib(self.coordinator.rss_kib),
            self.coordinator.threads,
            self.coordinator.fds,
            mib(self.soak_rss_kib),
            self.requests
        )
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The lock of `m`, also when a holder panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// xorshift64*: the churn's random choices, reproducible from `--seed`.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// Counters of everything the soak did and saw.
#[derive(Debug, Default)]
struct Stats {
    join_attempts: AtomicU64,
    joins: AtomicU64,
    leaves_closed: AtomicU64,
    leaves_dropped: AtomicU64,
    open_attempts: AtomicU64,
    opened: AtomicU64,
    open_failed: AtomicU64,
    channels_closed: AtomicU64,
    channels_dropped: AtomicU64,
    sent: AtomicU64,
    answered: AtomicU64,
    reported_failed: AtomicU64,
    wrong: AtomicU64,
    hung: AtomicU64,
    duplicates: AtomicU64,
    /// Reported failed: no reply within the request timeout.
    missing_timeout: AtomicU64,
    /// Reported failed: the channel ended before the reply.
    missing_ended: AtomicU64,
    /// Reported failed: anything else (not sent).
    missing_other: AtomicU64,
    victim_requests: AtomicU64,
    victim_failed: AtomicU64,
    kills: AtomicU64,
    kills_lost: AtomicU64,
    victim_start_failed: AtomicU64,
    forward_conns: AtomicU64,
    forward_ok: AtomicU64,
    forward_reset: AtomicU64,
    forward_short: AtomicU64,
    forward_nothing: AtomicU64,
    forward_corrupt: AtomicU64,
    forward_hung: AtomicU64,
    forward_bytes: AtomicU64,
    restarts: AtomicU64,
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The events every in-process client reported, through one handler per
/// client's [`Events`] hub.
#[derive(Debug, Default)]
struct Ledger {
    state: Mutex<LedgerState>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct LedgerState {
    /// Ready channels without their end yet, by (client, label).
    open: HashMap<(String, String), ()>,
    /// A channel's events out of order: a second Ready, an end without
    /// a Ready (a second end).
    violations: Vec<String>,
    violation_count: u64,
    ready: u64,
    ended: u64,
    opener_ready: u64,
    opener_open_errors: u64,
    replies: u64,
    missing: u64,
    /// Reconnected events of the stable clients, by name.
    reconnected: HashMap<String, u64>,
    /// SessionEnded events of the stable clients, by name.
    session_ended: HashMap<String, u64>,
}

impl Ledger {
    /// Record the events of client `name` (a stable client's sessions are
    /// counted too).
    fn watch(self: &Arc<Ledger>, name: &str, stable: bool) -> Events {
        let events = Events::with_capacity(1);
        let (ledger, name) = (self.clone(), name.to_owned());
        events.on_all(move |e| ledger.note(&name, stable, e));
        events
    }

    fn state(&self) -> MutexGuard<'_, LedgerState> {
        lock(&self.state)
    }

    fn note(&self, client: &str, stable: bool, e: &Event) {
        let mut st = self.state();
        // The forwarder opens its channel itself, not through
        // `Soak::open`: its opens are not counted there.
        let opener = |label: &str| {
            client != FORWARDER
                && label
                    .strip_prefix(client)
                    .is_some_and(|rest| rest.starts_with('>'))
        };
        match e {
            Event::Ready { channel } => {
                st.ready += 1;
                if opener(&channel.label) {
                    st.opener_ready += 1;
                }
                let key = (client.to_owned(), channel.label.clone());
                if st.open.insert(key, ()).is_some() {
                    st.violation(format!(
                        "{client}: {} ready again before it ended",
                        channel.label
                    ));
                }
            }
            Event::Closed { channel, .. } | Event::Lost { channel, .. } => {
                st.ended += 1;
                let key = (client.to_owned(), channel.label.clone());
                if st.open.remove(&key).is_none() {
                    st.violation(format!(
                        "{client}: {} ended without being open (a second end?): {e}",
                        channel.label
                    ));
                }
            }
            Event::OpenError { channel, .. } if opener(&channel.label) => {
                st.opener_open_errors += 1
            }
            Event::Reply { .. } => st.replies += 1,
            Event::ReplyMissing { .. } => st.missing += 1,
            Event::Reconnected { .. } if stable => {
                *st.reconnected.entry(client.to_owned()).or_default() += 1
            }
            Event::SessionEnded { .. } if stable => {
                *st.session_ended.entry(client.to_owned()).or_default() += 1
            }
            _ => {}
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Wait, at most `limit`, until `pred` holds; whether it did.
    async fn wait_until(&self, limit: Duration, pred: impl Fn(&LedgerState) -> bool) -> bool {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if pred(&self.state()) {
                return true;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return pred(&self.state());
            }
        }
    }
}

impl LedgerState {
    fn violation(&mut self, what: String) {
        self.violation_count += 1;
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }
}

/// What every actor shares.
#[derive(Debug)]
struct Soak {
    address: Address,
    trust: Trust,
    bins: Bins,
    work: PathBuf,
    ca: PathBuf,
    port: u16,
    stats: Stats,
    ledger: Arc<Ledger>,
    /// Held shared by each actor's iteration; the controller takes it
    /// alone for the quiet point.
    gate: RwLock<()>,
    /// Set at the end: actors stop at their next iteration.
    stop: AtomicBool,
    /// Churn clients online now, which other churn clients may open to.
    live: Mutex<Vec<String>>,
    /// Request numbers an in-process server has answered, one bit each.
    seen: Mutex<Vec<u64>>,
    seq: AtomicU64,
    channel_no: AtomicU64,
    failures: Mutex<Vec<String>>,
    /// Where the forward listens.
    forward_addr: SocketAddr,
}

/// The clients that live the whole run.
#[derive(Debug)]
struct Stable {
    servers: Vec<(Client, tokio::task::JoinHandle<()>)>,
    prober: Client,
    exposer: (Client, tokio::task::JoinHandle<()>),
    forwarder: (Client, tokio::task::JoinHandle<()>),
    echo: tokio::task::JoinHandle<()>,
}

impl Stable {
    /// Connect the stable clients and start the echo servers, the TCP echo
    /// server and the forward.
    async fn start(soak: &Arc<Soak>) -> Result<Stable> {
        let mut servers = Vec::new();
        for name in SERVERS {
            let client = soak.connect(name, true).await?;
            let task = tokio::spawn(serve_echo(soak.clone(), client.clone()));
            servers.push((client, task));
        }
        let prober = soak.connect("prober", true).await?;

        let tcp = TcpListener::bind("127.0.0.1:0").await?;
        let target = tcp.local_addr()?;
        let echo = tokio::spawn(tcp_echo(tcp));
        let expose = Expose::new("echo", Endpoint::Tcp(target));
        let mut config = soak.config("exposer", true);
        config.interfaces = vec![expose.interface()];
        let exposer = Client::connect(config)
            .await
            .context("connecting exposer")?;
        let served = {
            let (exposer, client) = (Exposer::new("exposer", [expose]), exposer.clone());
            tokio::spawn(async move { exposer.run(&client).await })
        };
        let forwarder = soak.connect(FORWARDER, true).await?;
        let mut route = Forward::new(
            "echo",
            Endpoint::Tcp(soak.forward_addr),
            Address::mesh_channel("exposer", "echo")?,
        );
        route.mode = PathMode::Relay;
        let (up_tx, mut up) = tokio::sync::mpsc::unbounded_channel();
        let forwarding = {
            let client = forwarder.clone();
            tokio::spawn(async move {
                let run = route.run(client, Stop::never(), move |line| {
                    let _ = up_tx.send(line);
                });
                if let Err(e) = run.await {
                    eprintln!("qmesh-soak: the forward stopped: {e}");
                }
            })
        };
        let line = timeout(STEP, up.recv())
            .await
            .context("the forward's first line")?
            .context("the forward stopped")?;
        if !line.contains(" up") {
            bail!("the forward did not come up: {line}");
        }
        // Later lines (the route down and up again) are not needed.
        tokio::spawn(async move { while up.recv().await.is_some() {} });
        Ok(Stable {
            servers,
            prober,
            exposer: (exposer, served),
            forwarder: (forwarder, forwarding),
            echo,
        })
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = SERVERS.iter().map(|s| s.to_string()).collect();
        names.extend(["prober", "exposer", FORWARDER].map(String::from));
        names
    }

    /// Leave: every stable client closes.
    async fn close(self, soak: &Soak) {
        let Stable {
            servers,
            prober,
            exposer,
            forwarder,
            echo,
        } = self;
        // Their own close ends their sessions: look before it.
        let ended = soak.ledger.state().session_ended.clone();
        for (name, n) in ended {
            soak.fail(format!(
                "stable client {name}'s session ended {n} time(s) before the end"
            ));
        }
        for (client, task) in [forwarder, exposer].into_iter().chain(servers) {
            task.abort();
            let _ = task.await;
            client.close("the soak is over").await;
        }
        prober.close("the soak is over").await;
        echo.abort();
    }
}

impl Soak {
    /// A client configuration for `name`, reporting to the ledger.
    fn config(&self, name: &str, stable: bool) -> ClientConfig {
        let mut config = ClientConfig::new(self.address.clone(), name, self.trust.clone());
        // A killed coordinator is noticed in 3 s, not 15.
        config.heartbeat = Heartbeat::new(Duration::from_secs(1), 3);
        config.request_timeout = REQUEST_TIMEOUT;
        config.events = Some(self.ledger.watch(name, stable));
        config
    }

    async fn connect(&self, name: &str, stable: bool) -> Result<Client> {
        let config = self.config(name, stable);
        timeout(STEP, Client::connect(config))
            .await
            .with_context(|| format!("connecting {name}: timed out"))?
            .with_context(|| format!("connecting {name}"))
    }

    /// Record a failed check.
    fn fail(&self, what: String) {
        eprintln!("qmesh-soak: FAILURE: {what}");
        let mut failures = lock(&self.failures);
        if failures.len() < 1000 {
            failures.push(what);
        }
    }

    /// Whether the actors should stop.
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// An in-process server got request `body`: note its number, and
    /// count it as a duplicate if it came before.
    fn delivered(&self, body: &[u8]) {
        let Some(seq) = body
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
        else {
            return;
        };
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        let mut seen = lock(&self.seen);
        if seen.len() <= word {
            seen.resize(word + 1, 0);
        }
        if seen[word] & (1 << bit) != 0 {
            drop(seen);
            add(&self.stats.duplicates);
            self.fail(format!("request {seq} was delivered twice"));
        } else {
            seen[word] |= 1 << bit;
        }
    }

    /// Send one numbered request with `pad` bytes after its number on
    /// `ch`, and count how it ended.
    async fn request(&self, ch: &Channel, pad: usize, victim: bool) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut body = seq.to_le_bytes().to_vec();
        body.extend(payload(seq, pad));
        add(&self.stats.sent);
        if victim {
            add(&self.stats.victim_requests);
        }
        match timeout(REQUEST_TIMEOUT + STEP, ch.request(&body)).await {
            Ok(Ok(reply)) if reply[..] == body[..] => add(&self.stats.answered),
            Ok(Ok(reply)) => {
                add(&self.stats.wrong);
                self.fail(format!(
                    "request {seq} on {}: the reply ({} bytes) is not its body ({} bytes)",
                    ch.label(),
                    reply.len(),
                    body.len()
                ));
            }
            Ok(Err(e)) => {
                add(&self.stats.reported_failed);
                if victim {
                    add(&self.stats.victim_failed);
                }
                let why = e.to_string();
                if why.contains("no reply within") {
                    add(&self.stats.missing_timeout);
                } else if why.contains("ended") {
                    add(&self.stats.missing_ended);
                } else {
                    add(&self.stats.missing_other);
                }
            }
            Err(_) => {
                add(&self.stats.hung);
                self.fail(format!(
                    "request {seq} on {}: neither answered nor reported within {} s",
                    ch.label(),
                    (REQUEST_TIMEOUT + STEP).as_secs()
                ));
            }
        }
    }

    /// Open channel `name` to `peer` from `client`, counting the outcome.
    async fn open(
        &self,
        client: &Client,
        peer: &str,
        name: &str,
        mode: PathMode,
    ) -> Option<Channel> {
        add(&self.stats.open_attempts);
        let address = Address::mesh_channel(peer, name).ok()?;
        match timeout(STEP, client.open_with(&address, mode)).await {
            Ok(Ok(ch)) => {
                add(&self.stats.opened);
                Some(ch)
            }
            Ok(Err(_)) => {
                add(&self.stats.open_failed);
                None
            }
            Err(_) => {
                self.fail(format!(
                    "{}: opening {address} took over {} s",
                    client.name(),
                    STEP.as_secs()
                ));
                None
            }
        }
    }

    /// The quiet point: wait until the coordinator has only the stable
    /// clients (the churn's have left, the killed ones are gone).
    async fn settle(&self, stable: &Stable) {
        let want: HashSet<String> = stable.names().into_iter().collect();
        let until = Instant::now() + STEP;
        let mut last = Vec::new();
        while Instant::now() < until {
            if let Ok(Ok(peers)) = timeout(STEP, stable.prober.peers()).await {
                let names: HashSet<String> = peers.into_iter().map(|p| p.name).collect();
                if names == want {
                    return;
                }
                last = names.symmetric_difference(&want).cloned().collect();
            }
            // Pacing of the poll: the presence list has no event for
            // "only these are left".
            sleep(Duration::from_millis(200)).await;
        }
        self.fail(format!(
            "no quiet point within {} s: {last:?} still differ from the stable clients",
            STEP.as_secs()
        ));
    }

    /// Churn worker `w`: one client life after another.
    async fn churn(self: Arc<Soak>, w: usize, mut rng: Rng) {
        let mut generation = 0u64;
        loop {
            let gate = self.gate.read().await;
            if self.stopping() {
                return;
            }
            generation += 1;
            self.churn_life(&format!("w{w}-{generation}"), &mut rng)
                .await;
            drop(gate);
            sleep(rng.millis(0, 300)).await;
        }
    }

    /// One churn client: join, open channels and send requests, leave.
    async fn churn_life(self: &Arc<Soak>, name: &str, rng: &mut Rng) {
        add(&self.stats.join_attempts);
        let Ok(client) = self.connect(name, false).await else {
            // Refused or unreachable while the coordinator restarts.
            sleep(rng.millis(200, 1000)).await;
            return;
        };
        add(&self.stats.joins);
        let server = tokio::spawn(serve_echo(self.clone(), client.clone()));
        lock(&self.live).push(name.to_owned());
        let mut channels = JoinSet::new();
        for _ in 0..rng.range(1, 3) {
            let peer = {
                let live = lock(&self.live);
                let others: Vec<&String> = live.iter().filter(|n| *n != name).collect();
                let pick = rng.range(0, (SERVERS.len() + others.len()) as u64 - 1) as usize;
                match pick.checked_sub(SERVERS.len()) {
                    None => SERVERS[pick].to_owned(),
                    Some(i) => others[i].clone(),
                }
            };
            let (soak, client, seed) = (self.clone(), client.clone(), rng.next());
            channels.spawn(async move { soak.channel_life(&client, &peer, Rng::new(seed)).await });
        }
        while let Some(done) = channels.join_next().await {
            if let Err(e) = done {
                self.fail(format!("{name}: a channel task failed: {e}"));
            }
        }
        lock(&self.live).retain(|n| n != name);
        server.abort();
        let _ = server.await;
        if rng.coin() {
            client.close("churn: leaving").await;
            add(&self.stats.leaves_closed);
        } else {
            drop(client);
            add(&self.stats.leaves_dropped);
        }
    }

    /// One channel from `client` to `peer`: requests, then closed or
    /// dropped.
    async fn channel_life(&self, client: &Client, peer: &str, mut rng: Rng) {
        let name = format!("c{}", self.channel_no.fetch_add(1, Ordering::Relaxed));
        let mode = if rng.coin() {
            PathMode::Relay
        } else {
            PathMode::Auto
        };
        let Some(ch) = self.open(client, peer, &name, mode).await else {
            return;
        };
        let pads: Vec<(usize, Duration)> = (0..rng.range(5, 40))
            .map(|_| (rng.range(0, 2048) as usize, rng.millis(0, 50)))
            .collect();
        futures_util::stream::iter(pads)
            .for_each_concurrent(4, |(pad, pause)| {
                let ch = &ch;
                async move {
                    // Once the peer has gone, the rest of the batch is not
                    // sent.
                    if ch.end().is_none() {
                        self.request(ch, pad, false).await;
                        sleep(pause).await;
                    }
                }
            })
            .await;
        if rng.coin() {
            if timeout(STEP, ch.close("churn: done")).await.is_err() {
                self.fail(format!(
                    "closing {} took over {} s",
                    ch.label(),
                    STEP.as_secs()
                ));
            }
            add(&self.stats.channels_closed);
        } else {
            add(&self.stats.channels_dropped);
        }
    }

    /// The prober's victims, one after another.
    async fn victims(self: Arc<Soak>, prober: Client, mut rng: Rng) {
        let mut n = 0u64;
        loop {
            let gate = self.gate.read().await;
            if self.stopping() {
                return;
            }
            n += 1;
            self.victim_life(&prober, n, &mut rng).await;
            drop(gate);
            sleep(rng.millis(0, 500)).await;
        }
    }

    /// Start `qmesh serve echo` as `victim-N`, keep requests in flight to
    /// it from the prober, kill it with SIGKILL: the channel must end lost
    /// and every request must end.
    async fn victim_life(self: &Arc<Soak>, prober: &Client, n: u64, rng: &mut Rng) {
        let name = format!("victim-{n}");
        let mut victim = match self.start_victim(&name).await {
            Ok(v) => v,
            Err(e) => {
                // The coordinator may be restarting: not a failure.
                tracing::info!(victim = %name, cause = %format!("{e:#}"), "victim did not start");
                add(&self.stats.victim_start_failed);
                sleep(rng.millis(200, 1000)).await;
                return;
            }
        };
        let mut opened = None;
        for _ in 0..5 {
            opened = self.open(prober, &name, "echo", PathMode::Relay).await;
            if opened.is_some() {
                break;
            }
            sleep(Duration::from_millis(500)).await;
        }
        let Some(ch) = opened else {
            let _ = victim.start_kill();
            let _ = timeout(STEP, victim.wait()).await;
            return;
        };
        let ch = Arc::new(ch);
        let mut pumps = JoinSet::new();
        for _ in 0..4 {
            let (ch, pad) = (ch.clone(), rng.range(0, 512) as usize);
            let soak = self.clone();
            pumps.spawn(async move {
                while ch.end().is_none() {
                    soak.request(&ch, pad, true).await;
                    sleep(Duration::from_millis(20)).await;
                }
            });
        }
        sleep(rng.millis(300, 3000)).await;
        let _ = victim.start_kill();
        let _ = timeout(STEP, victim.wait()).await;
        add(&self.stats.kills);
        match timeout(STEP, ch.ended()).await {
            Ok(ChannelEnd::Lost { .. }) => add(&self.stats.kills_lost),
            Ok(other) => self.fail(format!(
                "{}: the killed peer's channel ended {other}, not lost",
                ch.label()
            )),
            Err(_) => self.fail(format!(
                "{}: no end within {} s of the peer's SIGKILL",
                ch.label(),
                STEP.as_secs()
            )),
        }
        let joined = timeout(STEP, async {
            while let Some(done) = pumps.join_next().await {
                if let Err(e) = done {
                    self.fail(format!("a request pump failed: {e}"));
                }
            }
        })
        .await;
        if joined.is_err() {
            self.fail(format!(
                "{}: requests to the killed peer still waiting after {} s",
                ch.label(),
                STEP.as_secs()
            ));
        }
    }

    /// `qmesh serve echo` as `name`, once it says it serves.
    async fn start_victim(&self, name: &str) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.join("victims.log"))?;
        let mut child = Command::new(&self.bins.qmesh)
            .args([
                "--log",
                "info",
                "--coordinator",
                &format!("quic/$4:{}", self.port),
            ])
            .arg("--ca")
            .arg(&self.ca)
            .arg("--state-dir")
            .arg(self.work.join("victims"))
            .args([
                "--name",
                name,
                "--heartbeat",
                "1",
                "--heartbeat-misses",
                "3",
            ])
            .args(["serve", "echo"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bins.qmesh.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let serving = format!("{name} serves echo");
        let ready = timeout(STEP, first_line_with(stderr, serving)).await;
        match ready {
            Ok(Ok(())) => Ok(child),
            Ok(Err(e)) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(e)
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!("{name} did not say it serves within {} s", STEP.as_secs())
            }
        }
    }

    /// Forwarded connections, one after another.
    async fn forwarding(self: Arc<Soak>, mut rng: Rng) {
        loop {
            let gate = self.gate.read().await;
            if self.stopping() {
                return;
            }
            self.forward_conn(&mut rng).await;
            drop(gate);
            sleep(rng.millis(0, 200)).await;
        }
    }

    /// One TCP connection through the forward: a random payload written
    /// and half-closed, the echo read to its end and compared.
    async fn forward_conn(&self, rng: &mut Rng) {
        add(&self.stats.forward_conns);
        let len = rng.range(1, MAX_FORWARD_BYTES as u64) as usize;
        let data = payload(rng.next(), len);
        let exchange = async {
            let stream = TcpStream::connect(self.forward_addr).await?;
            let (mut rd, mut wr) = stream.into_split();
            let write = async {
                wr.write_all(&data).await?;
                wr.shutdown().await
            };
            let read = async {
                let mut got = Vec::new();
                let end = rd.read_to_end(&mut got).await;
                (end, got)
            };
            let (wrote, (end, got)) = tokio::join!(write, read);
            std::io::Result::Ok((wrote, end, got))
        };
        match timeout(STEP, exchange).await {
            Err(_) => {
                add(&self.stats.forward_hung);
                self.fail(format!(
                    "a forwarded connection of {len} bytes neither ended nor failed within {} s",
                    STEP.as_secs()
                ));
            }
            Ok(Err(_)) => add(&self.stats.forward_reset),
            Ok(Ok((_, end, got))) => {
                if got == data {
                    add(&self.stats.forward_ok);
                    self.stats
                        .forward_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                } else if got.len() < data.len() && data.starts_with(&got) {
                    if end.is_err() {
                        add(&self.stats.forward_reset);
                    } else if got.is_empty() {
                        // The forwarder closes a connection it cannot
                        // carry (no channel) at once, with a line.
                        add(&self.stats.forward_nothing);
                    } else {
                        add(&self.stats.forward_short);
                        self.fail(format!(
                            "a forwarded connection ended cleanly after {} of its {len} bytes came back: cut short without an error",
                            got.len()
                        ));
                    }
                } else {
                    add(&self.stats.forward_corrupt);
                    let at = got.iter().zip(&data).position(|(a, b)| a != b);
                    self.fail(format!(
                        "a forwarded connection came back changed: sent {len} bytes, got {}, first difference at {at:?}",
                        got.len()
                    ));
                }
            }
        }
    }

    /// Print every check and the summary line; whether all passed.
    fn report(&self, took: Duration, cycles: &[Cycle], terminated_ok: u64) -> bool {
        let s = &self.stats;
        let ledger = self.ledger.state();
        let sent = get(&s.sent);
        let answered = get(&s.answered);
        let failed = get(&s.reported_failed);
        let wrong = get(&s.wrong);
        // More outcomes than requests would be a request counted twice.
        let lost = sent.checked_sub(answered + failed + wrong);
        let lost = lost.map_or_else(
            || format!("-{}", answered + failed + wrong - sent),
            |n| n.to_string(),
        );
        let mut checks: Vec<(bool, String)> = Vec::new();
        checks.push((
            lost == "0",
            format!(
                "requests: {sent} sent, {answered} answered, {failed} reported failed ({} the channel ended, {} no reply within {} s, {} other), {wrong} wrong replies, LOST {lost} (neither answered nor reported)",
                get(&s.missing_ended),
                get(&s.missing_timeout),
                REQUEST_TIMEOUT.as_secs(),
                get(&s.missing_other)
            ),
        ));
        checks.push((
            wrong == 0,
            format!("replies that were not their request's body: {wrong}"),
        ));
        checks.push((
            get(&s.duplicates) == 0,
            format!("requests delivered twice: {}", get(&s.duplicates)),
        ));
        checks.push((
            ledger.replies == answered + wrong && ledger.missing == failed,
            format!(
                "request events: {} Reply, {} ReplyMissing (return values: {} replies, {failed} missing)",
                ledger.replies,
                ledger.missing,
                answered + wrong
            ),
        ));
        checks.push((
            ledger.opener_ready == get(&s.opened)
                && ledger.opener_open_errors == get(&s.open_failed),
            format!(
                "opens: {} attempted, {} ready, {} failed; events: {} Ready, {} OpenError on the opening side",
                get(&s.open_attempts),
                get(&s.opened),
                get(&s.open_failed),
                ledger.opener_ready,
                ledger.opener_open_errors
            ),
        ));
        checks.push((
            ledger.violation_count == 0 && ledger.open.is_empty() && ledger.ready == ledger.ended,
            format!(
                "channel sides: {} ready, {} ended (Closed or Lost), {} with no end, {} ended twice or out of order{}",
                ledger.ready,
                ledger.ended,
                ledger.open.len(),
                ledger.violation_count,
                if ledger.violations.is_empty() {
                    String::new()
                } else {
                    format!(": {:?}", ledger.violations)
                }
            ),
        ));
        checks.push((
            get(&s.kills) == get(&s.kills_lost) && get(&s.kills) > 0,
            format!(
                "SIGKILLed qmesh serve peers: {}, their channels ended lost: {}; requests to them: {} ({} reported failed)",
                get(&s.kills),
                get(&s.kills_lost),
                get(&s.victim_requests),
                get(&s.victim_failed)
            ),
        ));
        checks.push((
            get(&s.forward_corrupt) == 0
                && get(&s.forward_hung) == 0
                && get(&s.forward_short) == 0
                && get(&s.forward_ok) > 0,
            format!(
                "forwarded connections: {}, round-tripped byte-exact {} ({}), reset {}, closed with nothing back {}, cut short without an error {}, changed {}, hung {}",
                get(&s.forward_conns),
                get(&s.forward_ok),
                mib(get(&s.forward_bytes) / 1024),
                get(&s.forward_reset),
                get(&s.forward_nothing),
                get(&s.forward_short),
                get(&s.forward_corrupt),
                get(&s.forward_hung)
            ),
        ));
        let restarts = get(&s.restarts);
        checks.push((
            terminated_ok == restarts.div_ceil(2) + 1,
            format!(
                "coordinator restarts: {restarts} ({} SIGTERM, {} SIGKILL); exits 0 after SIGTERM: {terminated_ok} of {} (the final stop included)",
                restarts.div_ceil(2),
                restarts / 2,
                restarts.div_ceil(2) + 1
            ),
        ));
        let first = cycles.first().map(|c| c.coordinator);
        if let Some(first) = first {
            for c in cycles.iter().skip(1) {
                let grew = |what: &str, base: u64, now: u64, floor: u64| {
                    let allowed = (base * DRIFT_PERCENT / 100).max(floor);
                    (
                        now <= base + allowed,
                        format!(
                            "cycle {} coordinator {what}: {now} against {base} in cycle 1 (allowed +{allowed})",
                            c.n
                        ),
                    )
                };
                checks.push(grew(
                    "RSS KiB",
                    first.rss_kib,
                    c.coordinator.rss_kib,
                    RSS_FLOOR_KIB,
                ));
                checks.push(grew(
                    "threads",
                    first.threads,
                    c.coordinator.threads,
                    THREADS_FLOOR,
                ));
                checks.push(grew("fds", first.fds, c.coordinator.fds, FDS_FLOOR));
            }
        }
        checks.push((
            true,
            "coordinator tokio tasks: not reported (the coordinator exposes no task count)".into(),
        ));
        let failures = lock(&self.failures).clone();
        checks.push((
            failures.is_empty(),
            format!("other failures during the run: {}", failures.len()),
        ));
        let mut passed = true;
        println!("checks:");
        for (ok, line) in &checks {
            passed &= ok;
            println!("  {} {line}", if *ok { "ok  " } else { "FAIL" });
        }
        for f in failures.iter().take(20) {
            println!("  failure: {f}");
        }
        let (rss_first, rss_last) = (
            first.map_or(0, |c| c.rss_kib),
            cycles.last().map_or(0, |c| c.coordinator.rss_kib),
        );
        let drift = if rss_first > 0 {
            (rss_last as f64 - rss_first as f64) * 100.0 / rss_first as f64
        } else {
            0.0
        };
        println!(
            "joins: {} of {} attempts; leaves: {} closed, {} dropped; channels: {} closed, {} dropped by the churn; qmesh serve processes that did not start (a restart under way): {}",
            get(&s.joins),
            get(&s.join_attempts),
            get(&s.leaves_closed),
            get(&s.leaves_dropped),
            get(&s.channels_closed),
            get(&s.channels_dropped),
            get(&s.victim_start_failed)
        );
        println!(
            "SUMMARY result={} duration={}s requests={sent} channels={} forward_conns={} joins={} kills={} restarts={restarts} rss_first={} rss_last={} rss_drift={drift:+.1}% lost={lost} undelivered={failed} duplicates={}",
            if passed { "PASS" } else { "FAIL" },
            took.as_secs(),
            get(&s.opened),
            get(&s.forward_conns),
            get(&s.joins),
            get(&s.kills),
            mib(rss_first).replace(' ', ""),
            mib(rss_last).replace(' ', ""),
            get(&s.duplicates)
        );
        passed
    }
}

/// Read `from` line by line until one contains `wanted`; keep reading the
/// rest in the background so the writer never blocks.
async fn first_line_with(
    from: impl AsyncRead + Unpin + Send + 'static,
    wanted: String,
) -> Result<()> {
    let mut lines = BufReader::new(from).lines();
    while let Some(line) = lines.next_line().await? {
        if line.contains(&wanted) {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok(());
        }
    }
    bail!("ended before saying {wanted:?}")
}

/// Take every channel `client` is offered and answer its requests with
/// their bodies, noting each request number.
async fn serve_echo(soak: Arc<Soak>, client: Client) {
    while let Some(offer) = client.accept().await {
        let soak = soak.clone();
        tokio::spawn(async move {
            let Ok(ch) = offer.accept().await else {
                return;
            };
            ch.serve(|body| {
                soak.delivered(&body);
                async move { Some(body) }
            })
            .await;
            let _ = ch.ended().await;
        });
    }
}

/// A TCP echo server: each connection gets back what it sent, then the
/// end.
async fn tcp_echo(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut rd, mut wr) = stream.into_split();
            if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                let _ = wr.shutdown().await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_with_their_units() {
        assert_eq!(parse_duration("120s"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("3d").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn durations_are_shown_in_hours_minutes_and_seconds() {
        assert_eq!(show_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(show_duration(Duration::from_secs(120)), "2m");
        assert_eq!(show_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn a_random_range_stays_in_its_bounds() {
        let mut rng = Rng::new(7);
        for _ in 0..1000 {
            let n = rng.range(3, 5);
            assert!((3..=5).contains(&n), "{n}");
        }
    }
}
