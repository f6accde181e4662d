//! Per-client rate limits: token buckets on relayed bytes and messages.
//!
//! Each client has one bucket for the payload bytes and one for the
//! messages the coordinator relays for it (data messages, and channel
//! opens). A bucket is kept in its virtual-time form (GCRA): passing `n`
//! units moves the bucket's "theoretical arrival time" `n / rate` later,
//! and a pass waits until that time is less than `burst` ahead of now.
//!
//! - Within the rate (plus the burst) nothing waits.
//! - Over it the relay waits before forwarding, so it stops reading, QUIC
//!   flow control closes the client's windows and the sender is slowed.
//! - Each waiting pass adds to the backlog ahead of the next one. When the
//!   backlog would exceed `flood_after` worth of traffic at the rate (the
//!   client keeps many streams pushing at once), the pass fails and the
//!   client is disconnected with `ConnCode::RateExceeded`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Rate limits for one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Relayed payload bytes per second; `None`: unlimited.
    pub bytes_per_sec: Option<u64>,
    /// Relayed messages (data messages and channel opens) per second;
    /// `None`: unlimited.
    pub messages_per_sec: Option<u64>,
    /// Traffic allowed at once above the rate, as time at the rate.
    pub burst: Duration,
    /// Backlog, as time at the rate, past which the client is disconnected.
    pub flood_after: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            // 256 MiB/s and 1 M messages/s per client: far above what one
            // client needs, low enough that one client cannot take a
            // coordinator core to itself.
            bytes_per_sec: Some(256 * 1024 * 1024),
            messages_per_sec: Some(1_000_000),
            burst: Duration::from_millis(250),
            flood_after: Duration::from_secs(5),
        }
    }
}

impl RateLimits {
    /// No limits.
    pub fn unlimited() -> Self {
        Self {
            bytes_per_sec: None,
            messages_per_sec: None,
            ..Self::default()
        }
    }
}

/// A client sent past its flood threshold.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("sent {what} faster than the coordinator's limit of {rate}/s with more than {secs} s of it waiting; slow down or ask the operator to raise the limit")]
pub struct Flooded {
    /// `bytes` or `messages`.
    pub what: &'static str,
    /// The limit per second.
    pub rate: u64,
    /// The flood threshold in seconds.
    pub secs: f64,
}

/// One token bucket, in virtual-time form.
#[derive(Debug)]
pub struct Bucket {
    what: &'static str,
    rate: u64,
    burst: Duration,
    flood: Duration,
    tat: Mutex<Option<Instant>>,
}

impl Bucket {
    /// A bucket of `rate` units per second.
    pub fn new(what: &'static str, rate: u64, burst: Duration, flood: Duration) -> Bucket {
        Bucket {
            what,
            rate: rate.max(1),
            burst,
            flood,
            tat: Mutex::new(None),
        }
    }

    /// Account `n` units now: how long to wait before passing them on, or
    /// the flood error when the backlog would pass the threshold.
    pub fn take(&self, n: u64) -> Result<Duration, Flooded> {
        if n == 0 {
            return Ok(Duration::ZERO);
        }
        let now = Instant::now();
        let cost = Duration::from_secs_f64(n as f64 / self.rate as f64);
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let start = tat.map_or(now, |t| t.max(now));
        let next = start + cost;
        let wait = next.saturating_duration_since(now + self.burst);
        if wait > self.flood {
            return Err(Flooded {
                what: self.what,
                rate: self.rate,
                secs: self.flood.as_secs_f64(),
            });
        }
        *tat = Some(next);
        Ok(wait)
    }
}

/// A client's byte and message buckets; a reload replaces them
/// ([`Limiter::set`]) under a live session.
#[derive(Debug)]
pub struct Limiter {
    buckets: std::sync::RwLock<Arc<Buckets>>,
}

#[derive(Debug)]
struct Buckets {
    bytes: Option<Bucket>,
    messages: Option<Bucket>,
}

impl Buckets {
    fn new(limits: &RateLimits) -> Buckets {
        Buckets {
            bytes: limits
                .bytes_per_sec
                .map(|r| Bucket::new("bytes", r, limits.burst, limits.flood_after)),
            messages: limits
                .messages_per_sec
                .map(|r| Bucket::new("messages", r, limits.burst, limits.flood_after)),
        }
    }
}

impl Limiter {
    /// Buckets for `limits`.
    pub fn new(limits: &RateLimits) -> Limiter {
        Limiter {
            buckets: std::sync::RwLock::new(Arc::new(Buckets::new(limits))),
        }
    }

    /// Use `limits` from now on (fresh buckets: what was owed under the
    /// old rate is forgiven).
    pub fn set(&self, limits: &RateLimits) {
        *self.buckets.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Buckets::new(limits));
    }

    /// Wait until `bytes` and `messages` may pass, or fail past the flood
    /// threshold.
    pub async fn pass(&self, bytes: u64, messages: u64) -> Result<(), Flooded> {
        let buckets = self
            .buckets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut wait = Duration::ZERO;
        if let Some(b) = &buckets.bytes {
            wait = wait.max(b.take(bytes)?);
        }
        if let Some(m) = &buckets.messages {
            wait = wait.max(m.take(messages)?);
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }
}

/// Counts the length-prefixed messages in a data stream as its chunks go
/// by, without buffering them, and checks each declared length.
#[derive(Debug)]
pub struct MessageCounter {
    max: u64,
    /// Body bytes of the current message still to come.
    body: u64,
    prefix: [u8; 4],
    have: usize,
}

/// A message declared longer than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong {
    /// The declared length.
    pub len: u64,
    /// The limit.
    pub max: u64,
}

impl MessageCounter {
    /// A counter for messages of at most `max` bytes.
    pub fn new(max: u64) -> Self {
        Self {
            max,
            body: 0,
            prefix: [0; 4],
            have: 0,
        }
    }

    /// Account a chunk; returns how many messages started in it.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<u64, TooLong> {
        let mut started = 0;
        while !chunk.is_empty() {
            if self.body > 0 {
                let skip = (self.body.min(chunk.len() as u64)) as usize;
                self.body -= skip as u64;
                chunk = &chunk[skip..];
                continue;
            }
            let take = (4 - self.have).min(chunk.len());
            self.prefix[self.have..self.have + take].copy_from_slice(&chunk[..take]);
            self.have += take;
            chunk = &chunk[take..];
            if self.have == 4 {
                self.have = 0;
                let len = u64::from(u32::from_be_bytes(self.prefix));
                if len > self.max {
                    return Err(TooLong { len, max: self.max });
                }
                self.body = len;
                started += 1;
            }
        }
        Ok(started)
    }
}

/// Bytes of stream first frames (a `StreamRequest` or a `StreamHeader`,
/// each at most 16 KiB) one session may have being read at once. An
/// honest client's are tens of bytes and read as they arrive; a peer that
/// declares long ones and sends them slowly gets its further streams
/// stopped with `TooManyStreams`, so what it costs is bounded before any
/// allocation.
pub const HEADER_BUDGET: usize = 256 * 1024;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    fn msg(len: usize) -> Vec<u8> {
        let mut v = (len as u32).to_be_bytes().to_vec();
        v.resize(4 + len, 7);
        v
    }

    #[test]
    fn counts_messages_across_any_chunking() {
        let mut stream = Vec::new();
        for len in [0, 1, 5, 300, 0, 70_000] {
            stream.extend(msg(len));
        }
        for cut in [1, 2, 3, 4, 7, 1000, stream.len()] {
            let mut c = MessageCounter::new(100_000);
            let n: u64 = stream.chunks(cut).map(|ch| c.feed(ch).unwrap()).sum();
            assert_eq!(n, 6, "chunks of {cut}");
        }
        let mut c = MessageCounter::new(10);
        assert_eq!(c.feed(&msg(11)), Err(TooLong { len: 11, max: 10 }));
    }

    #[test]
    fn the_header_budget_holds_sixteen_whole_first_frames() {
        // Less than one frame would refuse an honest peer's largest header.
        assert_eq!(
            HEADER_BUDGET,
            16 * qmesh_proto::limits::MAX_CONTROL_FRAME,
            "256 KiB, as documented"
        );
    }

    #[test]
    fn counting_a_chunk_ends() {
        // On a thread with a deadline: a counter that stops consuming its
        // chunk would spin for ever, and so would the other counter tests,
        // which the harness would wait for: end the test binary instead.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut c = MessageCounter::new(100);
            let _ = tx.send(c.feed(&[msg(3), msg(0)].concat()));
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(counted) => assert_eq!(counted, Ok(2)),
            Err(_) => {
                eprintln!("counting one chunk did not end within 5 s");
                std::process::exit(101);
            }
        }
    }

    #[test]
    fn a_message_of_exactly_the_limit_passes() {
        let mut c = MessageCounter::new(10);
        assert_eq!(c.feed(&msg(10)), Ok(1));
        // Its body was skipped, not read as the next prefix.
        assert_eq!(c.feed(&msg(0)), Ok(1));
        // A prefix split 1 + 3 bytes is one message.
        let next = msg(2);
        assert_eq!(c.feed(&next[..1]), Ok(0));
        assert_eq!(c.feed(&next[1..]), Ok(1));
        assert_eq!(c.feed(&[]), Ok(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_waits_past_its_burst_and_floods_past_its_threshold() {
        // 100 units/s, 1 s of burst, flooded past 2 s of backlog.
        let b = Bucket::new("bytes", 100, Duration::from_secs(1), Duration::from_secs(2));
        assert_eq!(b.take(0), Ok(Duration::ZERO));
        // The first second's worth is the burst: no wait.
        assert_eq!(b.take(100), Ok(Duration::ZERO));
        assert_eq!(b.take(100), Ok(Duration::from_secs(1)));
        // A backlog of exactly the threshold still passes...
        assert_eq!(b.take(100), Ok(Duration::from_secs(2)));
        // ...one unit more is a flood, and is not counted.
        let flooded = b.take(1).unwrap_err();
        assert_eq!(
            flooded,
            Flooded {
                what: "bytes",
                rate: 100,
                secs: 2.0
            }
        );
        // Time pays the backlog off at the rate.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.take(100), Ok(Duration::from_secs(2)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.take(50), Ok(Duration::ZERO));
        // A rate of 0 is taken as 1 per second.
        let slow = Bucket::new("messages", 0, Duration::ZERO, Duration::from_secs(5));
        assert_eq!(slow.take(1), Ok(Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_replaces_the_limits_of_a_live_limiter() {
        let slow = RateLimits {
            bytes_per_sec: Some(10),
            messages_per_sec: Some(10),
            burst: Duration::ZERO,
            flood_after: Duration::from_secs(60),
        };
        let limiter = Limiter::new(&slow);
        let start = Instant::now();
        limiter.pass(20, 1).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // Messages alone are held to their own rate.
        let start = Instant::now();
        limiter.pass(0, 30).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        limiter.set(&RateLimits::unlimited());
        let start = Instant::now();
        limiter.pass(1_000_000, 1_000_000).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        let unlimited = RateLimits::unlimited();
        assert_eq!(
            (unlimited.bytes_per_sec, unlimited.messages_per_sec),
            (None, None)
        );
        let defaults = RateLimits::default();
        assert_eq!(defaults.bytes_per_sec, Some(256 * 1024 * 1024));
        assert_eq!(defaults.messages_per_sec, Some(1_000_000));
    }

    /// Most passes one sender in these tests makes: far more than any limit
    /// here lets through in the time the tests run, so a limiter that never
    /// waits ends the test at once (with a rate far over the limit) instead
    /// of spinning on the paused clock, which only moves when every task
    /// waits.
    const MAX_PASSES: u64 = 100_000;

    /// `tasks` senders push `chunk`-unit batches through one limiter as fast
    /// as it lets them for `secs` of (paused, virtual) time, each for at most
    /// [`MAX_PASSES`]; returns units passed and whether any pass reported a
    /// flood.
    async fn flood(limits: RateLimits, tasks: usize, chunk: u64, secs: u64) -> (u64, bool) {
        let limiter = Arc::new(Limiter::new(&limits));
        let passed = Arc::new(AtomicU64::new(0));
        let flooded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let end = Instant::now() + Duration::from_secs(secs);
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let (limiter, passed, flooded) = (limiter.clone(), passed.clone(), flooded.clone());
            handles.push(tokio::spawn(async move {
                for _ in 0..MAX_PASSES {
                    if Instant::now() >= end {
                        return;
                    }
                    tokio::task::yield_now().await;
                    match limiter.pass(chunk, 1).await {
                        Ok(()) => {
                            passed.fetch_add(chunk, Ordering::Relaxed);
                        }
                        Err(_) => {
                            flooded.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        (
            passed.load(Ordering::Relaxed),
            flooded.load(Ordering::Relaxed),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn byte_rate_holds_within_ten_percent_under_a_flood() {
        let rate = 1024 * 1024;
        let limits = RateLimits {
            bytes_per_sec: Some(rate),
            messages_per_sec: None,
            ..RateLimits::default()
        };
        // Four senders with 64 KiB batches: a backlog of 256 KiB, well under
        // the flood threshold (5 s at 1 MiB/s): slowed, never cut off.
        let secs = 60;
        let (passed, flooded) = flood(limits, 4, 64 * 1024, secs).await;
        assert!(!flooded);
        let per_sec = passed as f64 / secs as f64;
        assert!(
            (per_sec - rate as f64).abs() <= 0.1 * rate as f64,
            "{per_sec} B/s against a limit of {rate}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn message_rate_holds_within_ten_percent_under_a_flood() {
        let rate = 10_000;
        let limits = RateLimits {
            bytes_per_sec: None,
            messages_per_sec: Some(rate),
            ..RateLimits::default()
        };
        let secs = 30;
        let limiter = Limiter::new(&limits);
        let end = Instant::now() + Duration::from_secs(secs);
        let mut passed = 0u64;
        for _ in 0..MAX_PASSES {
            if Instant::now() >= end {
                break;
            }
            limiter.pass(0, 50).await.unwrap();
            passed += 50;
        }
        let per_sec = passed as f64 / secs as f64;
        assert!(
            (per_sec - rate as f64).abs() <= 0.1 * rate as f64,
            "{per_sec} msg/s against a limit of {rate}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn many_streams_pushing_at_once_pass_the_flood_threshold() {
        let limits = RateLimits {
            bytes_per_sec: Some(64 * 1024),
            messages_per_sec: None,
            burst: Duration::from_millis(250),
            flood_after: Duration::from_secs(2),
        };
        // 100 streams × 64 KiB waiting = 100 s at 64 KiB/s, past 2 s.
        let (_, flooded) = flood(limits, 100, 64 * 1024, 10).await;
        assert!(flooded);
        // One stream is only ever slowed.
        let (passed, flooded) = flood(limits, 1, 64 * 1024, 10).await;
        assert!(!flooded);
        assert!(passed <= 11 * 64 * 1024, "{passed}");
    }
}
