//! `qmesh-flood`: a half-open flood against a `qmesh-coordinator` process,
//! and what honest clients see meanwhile.
//!
//! One host (127.0.0.2) completes QUIC handshakes at `--rate` a second for
//! `--secs` seconds and then says nothing on them, so each holds a place
//! for connections before their hello until the coordinator's hello
//! timeout. Every `--honest-every` ms an honest client from another address
//! (127.0.0.1) connects and joins. The tool reports how many honest joins
//! succeeded, and the coordinator's RSS before, at its peak and after.
//! Run it from the target directory that holds `qmesh-coordinator`, e.g.
//! `cargo build --release -p qmesh-coordinator -p qmesh-integration-tests
//! && target/release/qmesh-flood`. See docs/benchmarks.md.

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use qmesh_client::ClientConfig;
use qmesh_integration_tests::raw::{hello, hello_frames, Raw};
use qmesh_integration_tests::target::Target;
use qmesh_proto::codec::read_frame;
use qmesh_proto::msg::HelloAnswer;

#[derive(Debug, Parser)]
#[command(name = "qmesh-flood", version)]
/// Half-open flood against a coordinator on loopback.
struct Args {
    /// Silent handshakes per second from the flooding host.
    #[arg(long, default_value_t = 430)]
    rate: u64,
    /// How long the flood lasts, seconds.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Milliseconds between honest joins.
    #[arg(long, default_value_t = 100)]
    honest_every: u64,
    /// The coordinator's `max_pending_per_source` (4096 = no per-source
    /// cap, as before it existed).
    #[arg(long, default_value_t = 64)]
    per_source: usize,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Connect from 127.0.0.1 and join; whether the welcome came.
async fn honest_join(target: &Target, n: u64) -> bool {
    let Ok(Ok(raw)) = tokio::time::timeout(
        Duration::from_secs(5),
        Raw::try_connect_from(target, IpAddr::from([127, 0, 0, 1])),
    )
    .await
    else {
        return false;
    };
    let Ok((mut send, mut recv)) = raw.conn.open_bi().await else {
        return false;
    };
    let bytes = hello_frames(&hello(&format!("honest{n}")));
    if send.write_all(&bytes).await.is_err() {
        return false;
    }
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        read_frame::<HelloAnswer, _>(&mut recv),
    )
    .await;
    let ok = matches!(answer, Ok(Ok(Some(HelloAnswer::Welcome(_)))));
    raw.conn.close(0u32.into(), b"done");
    ok
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!("[limits]\nmax_pending_per_source = {}\n", args.per_source),
    )?;
    let exe = std::env::current_exe()?;
    let coordinator = exe
        .parent()
        .context("the tool's directory")?
        .join("qmesh-coordinator");
    let mut child = Command::new(&coordinator)
        // One process, so that its memory is the coordinator's.
        .args([
            "run",
            "--single",
            "--listen",
            "quic/127.0.0.1:0",
            "--config",
        ])
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", coordinator.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("coordinator stdout")?;
    let (port, ca) = tokio::task::spawn_blocking(move || -> Result<(u16, String)> {
        use std::io::BufRead;
        let mut port = None;
        let mut lines = std::io::BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let line = line?;
            if let Some(rest) = line.strip_prefix("qmesh-coordinator listening on quic/") {
                port = rest.rsplit(':').next().and_then(|p| p.parse().ok());
            }
            if let Some(ca) = line.strip_prefix("clients need the CA file: ") {
                // The rest of stdout is read to its end, so that the
                // coordinator never writes into a closed pipe.
                std::thread::spawn(move || lines.for_each(drop));
                return Ok((port.context("no listening line")?, ca.to_owned()));
            }
        }
        bail!("the coordinator stopped before naming its CA file")
    })
    .await??;
    let trust = ClientConfig::trust_ca_file(std::path::Path::new(&ca))?;
    let target = Target::new(SocketAddr::from(([127, 0, 0, 1], port)), trust);

    let before = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
            }
        })
    };
    let held = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let flood_until = Instant::now() + Duration::from_secs(args.secs);
    let flood = {
        let (target, held, refused) = (target.clone(), held.clone(), refused.clone());
        let gap = Duration::from_micros(1_000_000 / args.rate.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(gap);
            let mut tasks = tokio::task::JoinSet::new();
            while Instant::now() < flood_until {
                tick.tick().await;
                let (target, held, refused) = (target.clone(), held.clone(), refused.clone());
                tasks.spawn(async move {
                    match Raw::try_connect_from(&target, IpAddr::from([127, 0, 0, 2])).await {
                        Ok(raw) => {
                            held.fetch_add(1, Ordering::Relaxed);
                            // Silent until the coordinator gives up on it.
                            let _ = raw.conn.closed().await;
                        }
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            tasks.abort_all();
        })
    };
    let (mut ok, mut failed, mut n) = (0u64, 0u64, 0u64);
    while Instant::now() < flood_until {
        n += 1;
        if honest_join(&target, n).await {
            ok += 1;
        } else {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(args.honest_every)).await;
    }
    let _ = flood.await;
    // Give the coordinator its hello timeout to drop what the flood held.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = rss_kib(pid);
    sampler.abort();
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "per-source cap {}: flood {} handshakes/s for {} s from 127.0.0.2 ({} completed, {} refused); \
         honest joins from 127.0.0.1: {ok} of {} ({failed} failed); coordinator RSS {} MiB before, \
         {} MiB peak, {} MiB after",
        args.per_source,
        args.rate,
        args.secs,
        held.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        ok + failed,
        before / 1024,
        peak.load(Ordering::Relaxed) / 1024,
        after / 1024
    );
    Ok(())
}
