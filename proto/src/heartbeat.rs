//! Heartbeats and the session stream after the welcome.
//!
//! Once a session is up, both sides keep its session control stream open.
//! Each side looks every `interval`, and pings only when it has heard
//! nothing for half an interval; every ping is answered with a pong
//! ([`ClientSession::Ping`] and [`ClientSession::Pong`] one way,
//! [`CoordinatorSession::Ping`] and [`CoordinatorSession::Pong`] the
//! other). So whichever side looks first after a quiet half interval
//! pings, and its ping keeps the other quiet: an idle session carries one
//! ping and one pong per interval in all, not one of each per side. Any
//! frame heard counts as a sign of life; a side that hears nothing for
//! `misses × interval` declares the other lost. A side that leaves
//! finishes the stream (or closes the connection with a normal code): that
//! is a graceful end, never a loss.
//!
//! A ping also goes beside the stream as a QUIC datagram
//! ([`Beat::to_datagram`], protocol.md §13.1) when nothing has been heard
//! for a whole interval, and with every probe: flow control never holds a
//! datagram back, so a session whose stream is stuck behind full
//! connection windows (a peer that reads nothing while many streams wait
//! for it) still shows the other side alive. What the datagrams bring,
//! and when the session last heard anything, pass through a [`Pulse`]; the
//! task that sends and reads them is the transport's
//! (`qmesh_certs::transport::pulse`), on a timer of its own, so it goes on
//! while the stream's loop waits on a blocked write.
//!
//! [`drive`] is that loop, over any reader and writer, so the same code
//! runs on QUIC streams and, in tests, on in-memory pipes under tokio's
//! paused clock.

use std::future::Future;
use std::pin::{pin, Pin};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, MissedTickBehavior};

use crate::codec::{read_frame, write_frame};
use crate::msg::{ClientSession, CoordinatorSession};

/// A ping or a pong, as the heartbeat loop sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Are you there? (its sequence number)
    Ping(u64),
    /// The answer to the ping with this number.
    Pong(u64),
}

/// The length of a beat as a datagram.
pub const PULSE_LEN: usize = 9;

impl Beat {
    /// The datagram form: a tag byte (0 a ping, 1 a pong) and the
    /// sequence number, 8 bytes big-endian.
    pub fn to_datagram(self) -> [u8; PULSE_LEN] {
        let (tag, seq) = match self {
            Beat::Ping(seq) => (0u8, seq),
            Beat::Pong(seq) => (1u8, seq),
        };
        let mut out = [0u8; PULSE_LEN];
        out[0] = tag;
        out[1..].copy_from_slice(&seq.to_be_bytes());
        out
    }

    /// Read a datagram: `None` for anything that is not exactly a beat.
    pub fn from_datagram(bytes: &[u8]) -> Option<Beat> {
        let (&tag, seq) = bytes.split_first()?;
        let seq = u64::from_be_bytes(seq.try_into().ok()?);
        match tag {
            0 => Some(Beat::Ping(seq)),
            1 => Some(Beat::Pong(seq)),
            _ => None,
        }
    }
}

/// Signs of life from outside the session stream, requests for one, and
/// when the session last heard anything.
///
/// The transport's pulse task notifies `heard` for every beat datagram
/// that arrives; [`drive`] counts it as hearing the other side. `drive`
/// notifies `kick` when it probes, so a ping datagram goes out at once
/// even if the stream's ping is held back. Both record what they hear
/// ([`Pulse::hear`]), and the pulse task pings beside the stream only
/// once the session has been silent for a whole interval
/// ([`Pulse::silent_for`]).
#[derive(Debug)]
pub struct Pulse {
    /// A beat arrived outside the stream.
    pub heard: Notify,
    /// Send a ping outside the stream now.
    pub kick: Notify,
    last: std::sync::Mutex<Instant>,
}

impl Default for Pulse {
    /// A pulse that last heard the other side now.
    fn default() -> Self {
        Self {
            heard: Notify::new(),
            kick: Notify::new(),
            last: std::sync::Mutex::new(Instant::now()),
        }
    }
}

impl Pulse {
    /// Record that the other side was heard (on the stream or beside it)
    /// at `at`.
    pub fn hear(&self, at: Instant) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = (*last).max(at);
    }

    /// How long the session has heard nothing from the other side.
    pub fn silent_for(&self) -> Duration {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

/// A session-stream message type that carries heartbeats: each direction's
/// type implements it, so [`drive`] reads one type and writes the other.
pub trait Beats: Sized {
    /// A ping with sequence number `seq`.
    fn ping(seq: u64) -> Self;
    /// The answer to ping `seq`.
    fn pong(seq: u64) -> Self;
    /// The beat this message is, if it is one.
    fn beat(&self) -> Option<Beat>;
}

impl Beats for ClientSession {
    fn ping(seq: u64) -> Self {
        ClientSession::Ping { seq }
    }

    fn pong(seq: u64) -> Self {
        ClientSession::Pong { seq }
    }

    fn beat(&self) -> Option<Beat> {
        match *self {
            ClientSession::Ping { seq } => Some(Beat::Ping(seq)),
            ClientSession::Pong { seq } => Some(Beat::Pong(seq)),
            ClientSession::Interfaces { .. } => None,
        }
    }
}

impl Beats for CoordinatorSession {
    fn ping(seq: u64) -> Self {
        CoordinatorSession::Ping { seq }
    }

    fn pong(seq: u64) -> Self {
        CoordinatorSession::Pong { seq }
    }

    fn beat(&self) -> Option<Beat> {
        match *self {
            CoordinatorSession::Ping { seq } => Some(Beat::Ping(seq)),
            CoordinatorSession::Pong { seq } => Some(Beat::Pong(seq)),
            CoordinatorSession::GoingAway { .. } => None,
        }
    }
}

/// How often to ping, and how many silent intervals mean lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// How often each side looks, and pings when it has heard nothing
    /// for half of this.
    pub interval: Duration,
    /// Intervals without hearing anything after which the other side is
    /// lost (at least 1).
    pub misses: u32,
    /// How long the other side has to answer a probe (a ping sent at once,
    /// out of turn) before it counts as lost; at most [`Heartbeat::limit`].
    pub probe: Duration,
}

/// The default time to answer a probe: many round trips, and many QUIC
/// retransmissions under loss, yet well under the 15 s of the default
/// heartbeat.
pub const PROBE: Duration = Duration::from_secs(2);

impl Default for Heartbeat {
    /// A look every 5 s; lost after 3 silent intervals (15 s); 2 s to
    /// answer a probe.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            misses: 3,
            probe: PROBE,
        }
    }
}

impl Heartbeat {
    /// A heartbeat of `interval`, lost after `misses` silent intervals.
    pub fn new(interval: Duration, misses: u32) -> Self {
        Self {
            interval,
            misses: misses.max(1),
            probe: PROBE,
        }
    }

    /// The same heartbeat with `probe` to answer a probe.
    pub fn with_probe(mut self, probe: Duration) -> Self {
        self.probe = probe;
        self
    }

    /// How long a probed side has to answer: [`Heartbeat::probe`], but
    /// never longer than the silence the heartbeat allows anyway.
    pub fn probe_window(&self) -> Duration {
        self.probe.min(self.limit())
    }

    /// How long silence may last before the other side is lost.
    pub fn limit(&self) -> Duration {
        self.interval.saturating_mul(self.misses.max(1))
    }
}

/// How the session stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// The other side finished the stream: it left.
    Finished,
    /// The other side was silent for the whole limit.
    Silent {
        /// How long nothing was heard.
        silent_for: Duration,
        /// The heartbeat in force.
        heartbeat: Heartbeat,
    },
    /// A probe went unanswered: nothing was heard for `waited` after it.
    Unanswered {
        /// How long nothing was heard after the probe.
        waited: Duration,
    },
    /// The other side sent something it must not; the string says what.
    Violation(String),
    /// Reading or writing failed (the connection went away).
    Failed(String),
    /// This side asked to stop (its outgoing queue was closed).
    Stopped,
}

impl std::fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamEnd::Finished => f.write_str("the other side left"),
            StreamEnd::Silent {
                silent_for,
                heartbeat,
            } => write!(
                f,
                "nothing heard for {} ms: {} heartbeats missed (interval {} ms)",
                silent_for.as_millis(),
                heartbeat.misses,
                heartbeat.interval.as_millis()
            ),
            StreamEnd::Unanswered { waited } => {
                write!(f, "no answer to a probe within {} ms", waited.as_millis())
            }
            StreamEnd::Violation(what) => write!(f, "protocol violation: {what}"),
            StreamEnd::Failed(what) => write!(f, "session stream failed: {what}"),
            StreamEnd::Stopped => f.write_str("stopped"),
        }
    }
}

/// Run the session stream: look every `heartbeat.interval` and ping when
/// nothing was heard for half of one, answer pings, write what arrives on
/// `outgoing` (when there is one), and hand every other frame to
/// `on_frame` (which returns an error to end the stream as a violation).
/// Returns how the stream ended.
///
/// Each time `probe` is notified, a ping goes out at once unless one is
/// already waiting, and the other side must be heard from within
/// [`Heartbeat::probe_window`] or the stream ends
/// [`StreamEnd::Unanswered`]: how a coordinator finds out quickly that the
/// peer a channel is being opened to is gone.
///
/// With a `pulse`, a beat that arrived as a datagram counts as hearing
/// the other side (and answers a probe), every frame read is recorded in
/// it ([`Pulse::hear`]), and a probe also kicks a ping datagram out.
///
/// It holds no queue and no task of its own: one frame read is kept in
/// flight across the loop (a frame read must never be cancelled half way),
/// so an idle session costs only this future.
pub async fn drive<R, W, In, Out>(
    reader: R,
    mut writer: W,
    heartbeat: Heartbeat,
    mut outgoing: Option<mpsc::Receiver<Out>>,
    probe: Option<&Notify>,
    pulse: Option<&Pulse>,
    mut on_frame: impl FnMut(In) -> Result<(), String>,
) -> StreamEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    In: Beats + DeserializeOwned,
    Out: Beats + Serialize,
{
    let mut read = pin!(read_next::<R, In>(reader));
    let mut ticks = tokio::time::interval(heartbeat.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut heard = Instant::now();
    let mut seq = 0u64;
    // When the waiting probe was sent.
    let mut probed: Option<Instant> = None;
    loop {
        let answer_by = probed.map(|at| at + heartbeat.probe_window());
        tokio::select! {
            biased;
            (reader, frame) = &mut read => {
                heard = Instant::now();
                probed = None;
                if let Some(p) = pulse {
                    p.hear(heard);
                }
                let msg: In = match frame {
                    Ok(Some(msg)) => msg,
                    Ok(None) => return StreamEnd::Finished,
                    Err(crate::codec::ReadFrameError::Io(e)) => return StreamEnd::Failed(e.to_string()),
                    Err(e) => return StreamEnd::Violation(format!("bad session frame: {e}")),
                };
                read.set(read_next(reader));
                match msg.beat() {
                    Some(Beat::Ping(seq)) => {
                        if let Err(e) = write_frame(&mut writer, &Out::pong(seq)).await {
                            return write_failed(read, e, heartbeat).await;
                        }
                    }
                    Some(Beat::Pong(_)) => {}
                    None => if let Err(what) = on_frame(msg) {
                        return StreamEnd::Violation(what);
                    },
                }
            }
            () = notified(pulse.map(|p| &p.heard)) => {
                heard = Instant::now();
                probed = None;
            }
            () = wait_until(answer_by) => {
                return StreamEnd::Unanswered { waited: heard.elapsed().min(heartbeat.probe_window()) };
            }
            () = notified(probe), if probed.is_none() => {
                seq += 1;
                probed = Some(Instant::now());
                if let Some(p) = pulse {
                    p.kick.notify_one();
                }
                if let Err(e) = write_frame(&mut writer, &Out::ping(seq)).await {
                    return write_failed(read, e, heartbeat).await;
                }
            }
            _ = ticks.tick() => {
                let silent_for = heard.elapsed();
                if silent_for >= heartbeat.limit() {
                    return StreamEnd::Silent { silent_for, heartbeat };
                }
                // Heard within the last half interval: the other side's
                // ping, or the pong to ours, has shown both sides alive.
                // (Half, not a whole one: the pong to the last ping came a
                // round trip after the last tick, so a whole one would
                // skip every other tick and let silence reach two
                // intervals.)
                if silent_for < heartbeat.interval / 2 {
                    continue;
                }
                seq += 1;
                if let Err(e) = write_frame(&mut writer, &Out::ping(seq)).await {
                    return write_failed(read, e, heartbeat).await;
                }
            }
            msg = next_outgoing(&mut outgoing) => match msg {
                Some(msg) => if let Err(e) = write_frame(&mut writer, &msg).await {
                    return write_failed(read, e, heartbeat).await;
                },
                None => {
                    let _ = writer.shutdown().await;
                    return StreamEnd::Stopped;
                }
            },
        }
    }
}

/// Ready at `at`; never without one.
async fn wait_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Ready when `probe` is notified; never without one.
async fn notified(probe: Option<&Notify>) {
    match probe {
        Some(p) => p.notified().await,
        None => std::future::pending().await,
    }
}

/// Read one frame, and hand the reader back with it.
async fn read_next<R: AsyncRead + Unpin, In: DeserializeOwned>(
    mut reader: R,
) -> (R, FrameResult<In>) {
    let frame = read_frame::<In, _>(&mut reader).await;
    (reader, frame)
}

type FrameResult<In> = Result<Option<In>, crate::codec::ReadFrameError>;

/// The next frame to send; never ready without an `outgoing` queue.
async fn next_outgoing<Out>(outgoing: &mut Option<mpsc::Receiver<Out>>) -> Option<Out> {
    match outgoing {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A write failed: when the other side finished its stream just before
/// (it left, and its end is gone), that is the end to report.
async fn write_failed<R, F, In>(
    read: Pin<&mut F>,
    err: crate::codec::WriteFrameError,
    heartbeat: Heartbeat,
) -> StreamEnd
where
    R: AsyncRead + Unpin,
    F: Future<Output = (R, FrameResult<In>)>,
    In: DeserializeOwned,
{
    let next = tokio::time::timeout(heartbeat.limit(), async move {
        let (mut reader, mut frame) = read.await;
        loop {
            match frame {
                Ok(Some(_)) => frame = read_frame::<In, _>(&mut reader).await,
                other => return other,
            }
        }
    })
    .await;
    match next {
        Ok(Ok(None)) => StreamEnd::Finished,
        _ => StreamEnd::Failed(err.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_end_says_what_happened() {
        assert_eq!(StreamEnd::Finished.to_string(), "the other side left");
        let unanswered = StreamEnd::Unanswered {
            waited: Duration::from_millis(1500),
        };
        assert_eq!(
            unanswered.to_string(),
            "no answer to a probe within 1500 ms"
        );
    }

    /// The coordinator's end: reads client frames, writes its own.
    async fn coordinator_end<R, W>(
        r: R,
        w: W,
        rx: Option<mpsc::Receiver<CoordinatorSession>>,
        on_frame: impl FnMut(ClientSession) -> Result<(), String>,
    ) -> StreamEnd
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        drive(r, w, hb(), rx, None, None, on_frame).await
    }

    /// A coordinator-side loop on `r` and `w` with a pulse and [`hb`], run
    /// as a task: the pulse, and the task.
    fn spawn_with_pulse<R, W>(
        r: R,
        w: W,
    ) -> (std::sync::Arc<Pulse>, tokio::task::JoinHandle<StreamEnd>)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let pulse = std::sync::Arc::new(Pulse::default());
        let theirs = pulse.clone();
        let side = tokio::spawn(async move {
            drive::<_, _, ClientSession, CoordinatorSession>(
                r,
                w,
                hb(),
                None,
                None,
                Some(&theirs),
                |_| Ok(()),
            )
            .await
        });
        (pulse, side)
    }

    fn hb() -> Heartbeat {
        Heartbeat::new(Duration::from_secs(1), 3)
    }

    /// A silent peer (its end of the pipe open, nothing written) is lost
    /// after misses × interval, not before, and not much later.
    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_lost_after_misses_times_interval() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(ours);
        let (_tx, rx) = mpsc::channel(1);
        let start = Instant::now();
        let end = coordinator_end(r, w, Some(rx), |_| Ok(())).await;
        let took = start.elapsed();
        assert!(matches!(end, StreamEnd::Silent { .. }), "{end:?}");
        assert!(took >= hb().limit(), "{took:?}");
        assert!(took <= hb().limit() + hb().interval, "{took:?}");
        drop(theirs);
    }

    /// Two sides that both run the loop keep each other alive for an hour
    /// of virtual time; then one leaves and the other sees it finished,
    /// never as lost.
    #[tokio::test(start_paused = true)]
    async fn live_peers_stay_up_and_a_graceful_leave_is_not_a_loss() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let (a_tx, a_rx) = mpsc::channel(1);
        let (_b_tx, b_rx) = mpsc::channel(1);
        let a_side = tokio::spawn(coordinator_end(ar, aw, Some(a_rx), |_| Ok(())));
        let b_side = tokio::spawn(drive::<_, _, CoordinatorSession, ClientSession>(
            br,
            bw,
            hb(),
            Some(b_rx),
            None,
            None,
            |_| Ok(()),
        ));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!a_side.is_finished() && !b_side.is_finished());
        drop(a_tx); // a stops, dropping its writer: the stream is finished
        assert_eq!(a_side.await.unwrap(), StreamEnd::Stopped);
        assert_eq!(b_side.await.unwrap(), StreamEnd::Finished);
    }

    /// Copy frames of type `M` from `r` to `w`, each a millisecond late
    /// (a path's one-way delay), counting the pings.
    async fn tap<M, R, W>(mut r: R, mut w: W, pings: std::sync::Arc<std::sync::atomic::AtomicU64>)
    where
        M: Beats + Serialize + DeserializeOwned,
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        while let Ok(Some(msg)) = read_frame::<M, _>(&mut r).await {
            if let Some(Beat::Ping(_)) = msg.beat() {
                pings.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            if write_frame(&mut w, &msg).await.is_err() {
                return;
            }
        }
    }

    /// Run a coordinator's loop and a client's, both with `heartbeat`,
    /// their ticks a third of an interval apart, over taps that count the
    /// pings, for `intervals` intervals: whether both are still up, and
    /// the pings (client's, coordinator's).
    async fn idle_pair(heartbeat: Heartbeat, intervals: u32) -> (bool, u64, u64) {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let (a, a_tap) = tokio::io::duplex(64 * 1024);
        let (b, b_tap) = tokio::io::duplex(64 * 1024);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let (a_tap_r, a_tap_w) = tokio::io::split(a_tap);
        let (b_tap_r, b_tap_w) = tokio::io::split(b_tap);
        let from_client = Arc::new(AtomicU64::new(0));
        let from_coordinator = Arc::new(AtomicU64::new(0));
        // a is the coordinator: it writes CoordinatorSession frames.
        tokio::spawn(tap::<CoordinatorSession, _, _>(
            a_tap_r,
            b_tap_w,
            from_coordinator.clone(),
        ));
        tokio::spawn(tap::<ClientSession, _, _>(
            b_tap_r,
            a_tap_w,
            from_client.clone(),
        ));
        let (_a_tx, a_rx) = mpsc::channel(1);
        let (_b_tx, b_rx) = mpsc::channel(1);
        let a_side = tokio::spawn(drive::<_, _, ClientSession, CoordinatorSession>(
            ar,
            aw,
            heartbeat,
            Some(a_rx),
            None,
            None,
            |_| Ok(()),
        ));
        tokio::time::sleep(heartbeat.interval / 3).await;
        let b_side = tokio::spawn(drive::<_, _, CoordinatorSession, ClientSession>(
            br,
            bw,
            heartbeat,
            Some(b_rx),
            None,
            None,
            |_| Ok(()),
        ));
        tokio::time::sleep(heartbeat.interval * intervals).await;
        let up = !a_side.is_finished() && !b_side.is_finished();
        (
            up,
            from_client.load(Ordering::SeqCst),
            from_coordinator.load(Ordering::SeqCst),
        )
    }

    /// A ping goes out only after half an interval heard nothing, so one
    /// side's ping keeps the other quiet: an hour of 1 s intervals carries
    /// one ping per interval in all (the old rule, each side every
    /// interval, sent two), and both sides stay up.
    #[tokio::test(start_paused = true)]
    async fn an_idle_pair_sends_one_ping_per_interval_in_all_not_one_each() {
        let intervals = 3600;
        let (up, c, k) = idle_pair(hb(), intervals).await;
        assert!(up, "a side of a live pair ended");
        let all = c + k;
        assert!(
            (u64::from(intervals) - 2..=u64::from(intervals) + 2).contains(&all),
            "{all} pings in {intervals} intervals ({c} from the client, {k} from the coordinator)"
        );
    }

    /// With `misses` 2 (lost after two silent intervals) a live pair stays
    /// up for an hour: skipping pings never lets either side's silence
    /// reach the limit.
    #[tokio::test(start_paused = true)]
    async fn a_live_pair_with_two_misses_allowed_stays_up() {
        let (up, c, k) = idle_pair(Heartbeat::new(Duration::from_secs(1), 2), 3600).await;
        assert!(
            up,
            "a side was lost ({c} pings from the client, {k} from the coordinator)"
        );
    }

    /// What the stream's loop hears is recorded in the pulse, so the pulse
    /// task (which pings beside the stream only after a whole interval of
    /// silence) stays quiet while frames arrive, and is due once they stop.
    #[tokio::test(start_paused = true)]
    async fn frames_read_keep_the_pulse_quiet_until_they_stop() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(ours);
        let (_their_r, mut their_w) = tokio::io::split(theirs);
        let (pulse, side) = spawn_with_pulse(r, w);
        for seq in 0..100 {
            tokio::time::sleep(Duration::from_millis(900)).await;
            write_frame(&mut their_w, &ClientSession::Pong { seq })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert!(
                pulse.silent_for() < Duration::from_millis(10),
                "{:?}",
                pulse.silent_for()
            );
        }
        tokio::time::sleep(hb().interval).await;
        assert!(pulse.silent_for() >= hb().interval);
        assert!(!side.is_finished());
        side.abort();
    }

    /// A probed peer that says nothing is lost after the probe window,
    /// well before the heartbeat would notice; one that answers is kept,
    /// probe after probe.
    #[tokio::test(start_paused = true)]
    async fn a_probe_finds_a_silent_peer_at_once_and_keeps_a_live_one() {
        let slow = Heartbeat::new(Duration::from_secs(5), 3).with_probe(Duration::from_millis(500));
        // Silent: its end of the pipe open, nothing written.
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(ours);
        let probe = Notify::new();
        probe.notify_one();
        let start = Instant::now();
        let end = drive::<_, _, ClientSession, CoordinatorSession>(
            r,
            w,
            slow,
            None,
            Some(&probe),
            None,
            |_| Ok(()),
        )
        .await;
        assert_eq!(
            end,
            StreamEnd::Unanswered {
                waited: Duration::from_millis(500)
            }
        );
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        drop(theirs);

        // Live: the other side runs the loop and answers every probe.
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let probe = std::sync::Arc::new(Notify::new());
        let p = probe.clone();
        let prober = tokio::spawn(async move {
            drive::<_, _, ClientSession, CoordinatorSession>(
                ar,
                aw,
                slow,
                None,
                Some(&p),
                None,
                |_| Ok(()),
            )
            .await
        });
        let answerer = tokio::spawn(drive::<_, _, CoordinatorSession, ClientSession>(
            br,
            bw,
            slow,
            None,
            None,
            None,
            |_| Ok(()),
        ));
        for _ in 0..100 {
            probe.notify_one();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(!prober.is_finished() && !answerer.is_finished());
    }

    /// A peer that finishes its stream at once is finished, however long
    /// the heartbeat.
    #[tokio::test(start_paused = true)]
    async fn finishing_is_reported_as_finished() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(ours);
        let (_tx, rx) = mpsc::channel(1);
        theirs.shutdown().await.unwrap();
        let end = coordinator_end(r, w, Some(rx), |_| Ok(())).await;
        assert_eq!(end, StreamEnd::Finished);
    }

    /// Frames other than pings and pongs go to the callback; its error
    /// ends the stream as a violation.
    #[tokio::test(start_paused = true)]
    async fn other_frames_reach_the_callback() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(ours);
        let (_tx, rx) = mpsc::channel(1);
        for _ in 0..2 {
            write_frame(&mut theirs, &ClientSession::Interfaces { list: vec![] })
                .await
                .unwrap();
        }
        let mut seen = Vec::new();
        let end = coordinator_end(r, w, Some(rx), |m| {
            assert!(m.beat().is_none(), "beats never reach the callback");
            seen.push(m.name());
            if seen.len() == 1 {
                Ok(())
            } else {
                Err("second".into())
            }
        })
        .await;
        assert_eq!(seen, ["interfaces", "interfaces"]);
        assert_eq!(end, StreamEnd::Violation("second".into()));
    }

    /// A ping is answered with a pong of the writer's type carrying the
    /// same number, and neither reaches the callback.
    #[tokio::test(start_paused = true)]
    async fn a_ping_is_answered_with_a_pong_of_the_same_number() {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (r, w) = tokio::io::split(ours);
        let (mut tr, mut tw) = tokio::io::split(theirs);
        let (_tx, rx) = mpsc::channel(1);
        let side = tokio::spawn(coordinator_end(r, w, Some(rx), |m| {
            Err(format!("callback got {}", m.name()))
        }));
        write_frame(&mut tw, &ClientSession::Ping { seq: 41 })
            .await
            .unwrap();
        let answer: CoordinatorSession = read_frame(&mut tr).await.unwrap().unwrap();
        assert_eq!(answer, CoordinatorSession::Pong { seq: 41 });
        write_frame(&mut tw, &ClientSession::Pong { seq: 1 })
            .await
            .unwrap();
        tw.shutdown().await.unwrap();
        assert_eq!(side.await.unwrap(), StreamEnd::Finished);
    }

    /// A beat as a datagram reads back as itself; anything else is not a
    /// beat.
    #[test]
    fn beats_as_datagrams_round_trip_and_nothing_else_reads_as_one() {
        for beat in [
            Beat::Ping(0),
            Beat::Pong(1),
            Beat::Ping(u64::MAX),
            Beat::Pong(0x0102),
        ] {
            assert_eq!(Beat::from_datagram(&beat.to_datagram()), Some(beat));
        }
        assert_eq!(
            Beat::Pong(0x0102).to_datagram(),
            [1, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        let ping = Beat::Ping(7).to_datagram();
        assert_eq!(Beat::from_datagram(&ping[..PULSE_LEN - 1]), None);
        assert_eq!(Beat::from_datagram(&[&ping[..], &[0]].concat()), None);
        assert_eq!(Beat::from_datagram(&[]), None);
        let mut bad = ping;
        bad[0] = 2;
        assert_eq!(Beat::from_datagram(&bad), None);
    }

    /// A stream that carries nothing (stuck behind flow control) with
    /// beats arriving outside it: the other side is alive for an hour;
    /// once the beats stop, it is lost after the heartbeat's limit.
    #[tokio::test(start_paused = true)]
    async fn beats_outside_the_stream_keep_a_stuck_stream_alive() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(ours);
        let (pulse, side) = spawn_with_pulse(r, w);
        for _ in 0..3600 {
            pulse.heard.notify_one();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(!side.is_finished(), "lost while beats arrived");
        let stopped = Instant::now();
        let end = side.await.unwrap();
        assert!(matches!(end, StreamEnd::Silent { .. }), "{end:?}");
        let took = stopped.elapsed();
        assert!(took <= hb().limit() + hb().interval, "{took:?}");
        drop(theirs);
    }

    /// A probe kicks a ping out beside the stream, and a beat heard
    /// outside the stream answers it.
    #[tokio::test(start_paused = true)]
    async fn a_probe_kicks_the_pulse_and_a_beat_outside_the_stream_answers_it() {
        let slow = Heartbeat::new(Duration::from_secs(5), 3).with_probe(Duration::from_millis(500));
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(ours);
        let pulse = std::sync::Arc::new(Pulse::default());
        let probe = std::sync::Arc::new(Notify::new());
        let side = {
            let (pulse, probe) = (pulse.clone(), probe.clone());
            tokio::spawn(async move {
                drive::<_, _, ClientSession, CoordinatorSession>(
                    r,
                    w,
                    slow,
                    None,
                    Some(&probe),
                    Some(&pulse),
                    |_| Ok(()),
                )
                .await
            })
        };
        for _ in 0..20 {
            probe.notify_one();
            tokio::time::timeout(Duration::from_millis(100), pulse.kick.notified())
                .await
                .expect("the probe kicks a ping datagram out");
            pulse.heard.notify_one();
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        assert!(!side.is_finished(), "a probe answered outside the stream");
        probe.notify_one();
        let end = side.await.unwrap();
        assert!(matches!(end, StreamEnd::Unanswered { .. }), "{end:?}");
        drop(theirs);
    }
}
