//! Prometheus metrics of one coordinator, for `/metrics` (see `http`).
//!
//! Each coordinator has a [`Metrics`] with a registry of its own (no
//! global registry), so several coordinators in one process each report
//! their own. Nothing is counted twice: one collector reads the
//! coordinator's [`Stats`] counters, its registry of sessions and its
//! channels at scrape time, and the process figures from `/proc/self`.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `qmesh_sessions` | gauge | clients connected now |
//! | `qmesh_channels{path}` | gauge | joined channels now, `relay` or `direct` |
//! | `qmesh_handshakes_pending` | gauge | connections before their hello |
//! | `qmesh_relayed_bytes_total` | counter | payload bytes relayed |
//! | `qmesh_relayed_streams_total` | counter | data streams and pipes relayed |
//! | `qmesh_channels_joined_total` | counter | channels joined |
//! | `qmesh_sessions_admitted_total` | counter | sessions admitted |
//! | `qmesh_handshakes_total{result}` | counter | `joined`, `refused`, `enrolled`, `failed` |
//! | `qmesh_rejects_total{code}` | counter | refused hellos by `RejectCode` |
//! | `qmesh_rate_limited_total` | counter | sessions closed past their flood threshold |
//! | `qmesh_worker_restarts_total` | counter | workers the leader started before this one |
//! | `qmesh_certificate_expiry_timestamp_seconds` | gauge | when the certificate in force expires (Unix time) |
//! | `qmesh_cluster_members` | gauge | members of this coordinator's cluster (with `--etcd`) |
//! | `qmesh_cluster_names` | gauge | names held in the cluster, `{member="here"}` and `{member="elsewhere"}` |
//! | `qmesh_cluster_directory_available` | gauge | 1 when names can be claimed, 0 when the directory does not answer |
//! | `qmesh_cluster_links` | gauge | member links up to the other coordinators |
//! | `qmesh_cluster_link_bytes_total` | counter | UDP bytes on each member link, `{member, direction="sent"\|"received"}` |
//! | `process_*` | | CPU seconds, resident memory, descriptors, start time |
//!
//! Counters count from this worker's start, except the worker restarts,
//! which the leader counts.

use std::fmt;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::control::Control;
use crate::session::Stats;

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// One coordinator's metrics, in a registry of their own.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// The metrics of the coordinator `control` acts on.
    pub fn new(control: Control) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(CoordinatorCollector(control)));
        registry.register_collector(Box::new(ProcessCollector));
        Metrics { registry }
    }

    /// The metrics now, in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String does not fail; a collector's error would
        // leave a partial text, which is still better than none.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// The coordinator's own figures, read at each scrape.
#[derive(Debug)]
struct CoordinatorCollector(Control);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge<N>(e: &mut DescriptorEncoder, name: &str, help: &str, v: N) -> fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter with one label, `key`, one sample per `(value, count)`.
fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    key: &str,
    samples: &[(&str, u64)],
) -> fmt::Result {
    let mut family =
        e.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (value, n) in samples {
        ConstCounter::new(*n).encode(family.encode_family(&[(key, *value)])?)?;
    }
    Ok(())
}

impl Collector for CoordinatorCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let shared = &self.0 .0;
        let stats: &Stats = &shared.stats;
        let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        let e = &mut e;
        gauge(
            e,
            "qmesh_sessions",
            "Clients connected now.",
            shared.registry().len() as i64,
        )?;
        let (mut relay, mut direct) = (0i64, 0i64);
        for c in self.0.channel_list() {
            match c.path.as_str() {
                "direct" => direct += 1,
                _ => relay += 1,
            }
        }
        let mut channels = e.encode_descriptor(
            "qmesh_channels",
            "Joined channels now, by path: relay (through the coordinator) or direct (peer to peer).",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (path, n) in [("direct", direct), ("relay", relay)] {
            ConstGauge::new(n).encode(channels.encode_family(&[("path", path)])?)?;
        }
        gauge(
            e,
            "qmesh_handshakes_pending",
            "Connections that have not finished their hello, now.",
            load(&stats.pending) as i64,
        )?;
        counter(
            e,
            "qmesh_relayed_bytes",
            "Payload bytes the coordinator relayed, both ways, since this worker started.",
            load(&stats.bytes_relayed),
        )?;
        counter(
            e,
            "qmesh_relayed_streams",
            "Data streams and pipes relayed since this worker started.",
            load(&stats.streams_relayed),
        )?;
        counter(
            e,
            "qmesh_channels_joined",
            "Channels joined since this worker started.",
            load(&stats.channels_joined),
        )?;
        counter(
            e,
            "qmesh_sessions_admitted",
            "Sessions admitted since this worker started.",
            load(&stats.sessions_admitted),
        )?;
        let refused = load(&stats.hellos_refused);
        let enrolled = load(&stats.certificates_issued);
        counters(
            e,
            "qmesh_handshakes",
            "Handshakes by result: joined (a session), refused (a hello or enrollment refused \
             with a code), enrolled (a certificate issued), failed (TLS failed or timed out, no \
             hello in time, a protocol violation, the peer gone).",
            "result",
            &[
                ("joined", load(&stats.sessions_admitted)),
                ("refused", refused),
                ("enrolled", enrolled),
                ("failed", load(&stats.handshakes_failed)),
            ],
        )?;
        let rejects: Vec<(String, u64)> = stats
            .rejects()
            .map(|(code, n)| (format!("{code:?}"), n))
            .collect();
        let rejects: Vec<(&str, u64)> = rejects.iter().map(|(c, n)| (c.as_str(), *n)).collect();
        counters(
            e,
            "qmesh_rejects",
            "Refused hellos and enrollments by their reject code.",
            "code",
            &rejects,
        )?;
        counter(
            e,
            "qmesh_rate_limited",
            "Sessions closed because the client sent past its rate limit's flood threshold \
             (close code 15).",
            load(&stats.rate_limited),
        )?;
        if let Some(cluster) = self.0.cluster() {
            gauge(
                e,
                "qmesh_cluster_members",
                "Coordinators in this coordinator's cluster, itself included, as its directory \
                 shows them.",
                cluster.members.len() as i64,
            )?;
            let here = cluster
                .names
                .iter()
                .filter(|(_, m)| *m == cluster.me)
                .count();
            let mut names = e.encode_descriptor(
                "qmesh_cluster_names",
                "Names held in the cluster: by clients of this member (here) or of the others \
                 (elsewhere).",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (member, n) in [
                ("here", here as i64),
                ("elsewhere", (cluster.names.len() - here) as i64),
            ] {
                ConstGauge::new(n).encode(names.encode_family(&[("member", member)])?)?;
            }
            gauge(
                e,
                "qmesh_cluster_directory_available",
                "1 when names can be claimed in the cluster's directory, 0 when it does not \
                 answer (new names are refused as unavailable).",
                i64::from(cluster.available),
            )?;
            let links = self.0.links();
            gauge(
                e,
                "qmesh_cluster_links",
                "Member links up to the other coordinators of the cluster.",
                links.len() as i64,
            )?;
            let mut family = e.encode_descriptor(
                "qmesh_cluster_link_bytes",
                "UDP bytes on each member link, by member and direction (sent or received).",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for l in &links {
                for (direction, n) in [("sent", l.sent), ("received", l.received)] {
                    ConstCounter::new(n).encode(family.encode_family(&[
                        ("member", l.member.as_str()),
                        ("direction", direction),
                    ])?)?;
                }
            }
        }
        counter(
            e,
            "qmesh_worker_restarts",
            "Workers the leader started before this one (0 with --single).",
            shared.config.worker.as_ref().map_or(0, |w| w.restarts),
        )?;
        let not_after = shared
            .cert_summary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.not_after);
        if let Some(not_after) = not_after {
            gauge(
                e,
                "qmesh_certificate_expiry_timestamp_seconds",
                "When the certificate new handshakes get stops being valid (Unix time).",
                i64::try_from(not_after).unwrap_or(i64::MAX),
            )?;
        }
        Ok(())
    }
}

/// This process's figures from `/proc/self`, as the official clients
/// name them; any that cannot be read are left out.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let e = &mut e;
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| parse_stat(&s));
        if let Some(stat) = &stat {
            let c = ConstCounter::new(stat.cpu_seconds());
            c.encode(e.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds.",
                Some(&prometheus_client::registry::Unit::Seconds),
                c.metric_type(),
            )?)?;
        }
        if let Some(rss) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| resident_bytes(&s))
        {
            gauge(
                e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                rss as i64,
            )?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // Less the descriptor reading the directory.
            let n = dir.count().saturating_sub(1);
            gauge(
                e,
                "process_open_fds",
                "Number of open file descriptors.",
                n as i64,
            )?;
        }
        if let Some(max) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| max_fds(&s))
        {
            gauge(
                e,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                max as i64,
            )?;
        }
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s));
        if let (Some(stat), Some(boot)) = (&stat, boot) {
            gauge(
                e,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                boot as f64 + stat.start_ticks as f64 / USER_HZ,
            )?;
        }
        Ok(())
    }
}

/// Clock ticks per second in `/proc` (`USER_HZ`): 100 on every Linux
/// architecture the kernel's ABI knows (Prometheus's procfs library
/// assumes the same).
const USER_HZ: f64 = 100.0;

/// What `/proc/self/stat` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    /// User time, in ticks.
    utime: u64,
    /// System time, in ticks.
    stime: u64,
    /// When the process started, in ticks after boot.
    start_ticks: u64,
}

impl Stat {
    fn cpu_seconds(&self) -> f64 {
        (self.utime + self.stime) as f64 / USER_HZ
    }
}

/// Fields 14, 15 and 22 of `/proc/PID/stat` (proc(5)). The second field,
/// the command in parentheses, may hold spaces and parentheses itself, so
/// the count starts after its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        start_ticks: field(22)?,
    })
}

/// `VmRSS` of `/proc/PID/status`, in bytes.
fn resident_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The soft limit of `Max open files` in `/proc/PID/limits`.
fn max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `btime` of `/proc/stat`: the boot time in Unix seconds.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_stat_line_is_read_after_the_last_parenthesis() {
        let line = "4242 (qmesh (x) y) S 1 4242 4242 0 -1 4194560 1523 0 0 0 250 75 0 0 20 0 \
                    6 0 123456 1000000 2000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 \
                    17 1 0 0 0 0 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            Stat {
                utime: 250,
                stime: 75,
                start_ticks: 123456
            }
        );
        assert_eq!(stat.cpu_seconds(), 3.25);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn status_limits_and_boot_time_are_read() {
        let status = "Name:\tqmesh\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t3\n";
        assert_eq!(resident_bytes(status), Some(1234 * 1024));
        assert_eq!(resident_bytes("Name:\tx\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_fds(limits), Some(1024));
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1700000000)
        );
    }

    #[test]
    fn this_process_can_be_read() {
        let stat = parse_stat(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        assert!(stat.start_ticks > 0);
        let rss = resident_bytes(&std::fs::read_to_string("/proc/self/status").unwrap());
        assert!(rss.unwrap() > 0);
    }
}
