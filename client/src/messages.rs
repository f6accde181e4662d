//! One-way messages, requests and replies on a channel.
//!
//! Each side sends its messages on one data stream of its own (its
//! *message stream*, opened at the first send and again after a path
//! change); every data message on it is an [`Envelope`]. Requests carry an
//! id the requester picks; the reply carries it back, so replies may come
//! in any order and each reaches its own request. A reply nobody waits for
//! (its request timed out, or it never existed) is dropped and logged.
//!
//! ```no_run
//! # async fn demo(to_bob: qmesh_client::Channel, from_alice: qmesh_client::Channel) -> anyhow::Result<()> {
//! use qmesh_client::messages::Incoming;
//!
//! // Bob answers every request with its body reversed.
//! tokio::spawn(async move {
//!     while let Some(incoming) = from_alice.recv_message().await {
//!         if let Incoming::Request(req) = incoming {
//!             let mut body = req.body().to_vec();
//!             body.reverse();
//!             let _ = req.reply(&body).await;
//!         }
//!     }
//! });
//! let reply = to_bob.request(b"ping").await?; // reply or reply missing (5 s)
//! assert_eq!(&reply[..], b"gnip");
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use qmesh_proto::codes::StreamCode;
use qmesh_proto::envelope::Envelope;
use qmesh_proto::Untrusted;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::end::Path;
use crate::error::{RecvError, SendError};
use crate::quota::Gate;
use crate::stream::{MessageReceiver, MessageSender};
use crate::sync::lock;

/// What arrived on a channel's message stream.
#[derive(Debug)]
pub enum Incoming {
    /// A one-way message.
    Message(Bytes),
    /// A request: answer it with [`Request::reply`].
    Request(Request),
}

impl Incoming {
    /// The body, whichever kind it is.
    pub fn body(&self) -> &Bytes {
        match self {
            Incoming::Message(b) => b,
            Incoming::Request(r) => &r.body,
        }
    }

    /// Decode the body as a typed value (bincode, as
    /// [`crate::Channel::send_value`] encodes it).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, RecvError> {
        decode(self.body())
    }
}

pub(crate) fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, RecvError> {
    qmesh_proto::codec::decode_value(body).map_err(|e| RecvError::Decode(e.to_string()))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, SendError> {
    qmesh_proto::codec::encode_value(value).map_err(|e| SendError::Encode(e.to_string()))
}

/// A request from the peer. Replying is optional: a request that is
/// dropped unanswered reaches the requester as reply missing when its
/// timeout passes.
#[derive(Debug)]
pub struct Request {
    pub(crate) id: u64,
    pub(crate) body: Bytes,
    pub(crate) outbox: Arc<Outbox>,
}

impl Request {
    /// The request's id (the requester's numbering).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The request body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Decode the body as a typed value.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, RecvError> {
        decode(&self.body)
    }

    /// Send the reply.
    pub async fn reply(self, body: &[u8]) -> Result<(), SendError> {
        let env = Envelope::Reply {
            id: self.id,
            body: Bytes::copy_from_slice(body),
        };
        self.outbox.send(env).await
    }

    /// Send a typed reply.
    pub async fn reply_value<T: Serialize>(self, value: &T) -> Result<(), SendError> {
        let body = encode(value)?;
        self.reply(&body).await
    }
}

/// A pinned, boxed, sendable future.
pub(crate) type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Opens this side's message stream on the channel's current path.
pub(crate) type OpenOut =
    Box<dyn Fn() -> BoxFuture<Result<(MessageSender, Path), SendError>> + Send + Sync>;

/// This side's outgoing message stream.
///
/// Concurrent senders write whole envelopes one after another. The lock on
/// the open stream is held only while one envelope goes into it, which
/// waits at most for the stream's flow-control credit. Opening a stream
/// (which may wait for a direct path) holds no lock: one sender opens it
/// and the others wait for the news.
pub(crate) struct Outbox {
    stream: tokio::sync::Mutex<Option<(MessageSender, Path)>>,
    /// Whether a sender is opening the next message stream now.
    opening: Mutex<bool>,
    /// Told when that sender has finished opening (or failed to).
    opened: Notify,
    open: OpenOut,
    path: watch::Receiver<Path>,
    /// Sends so far; every [`BUDGET_EVERY`]th spends a unit of tokio's
    /// per-poll budget.
    sends: AtomicU64,
}

/// A free lock is taken with `try_lock`, which spends none of tokio's
/// per-poll budget, and a quinn write into a stream with credit spends none
/// either: a burst of sends from one task goes into the stream within one
/// poll, so the connection does not send it in pieces. So that a long run of
/// sends still gives the task's other work and the connection's driver
/// their turn, one send in this many spends a unit (a task yields after 128
/// units: after about 4,000 sends).
const BUDGET_EVERY: u64 = 32;

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

/// Clears the opening mark and wakes the waiting senders however the
/// opening ends (a dropped send future too).
struct Opening<'a>(&'a Outbox);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        *lock(&self.0.opening) = false;
        self.0.opened.notify_waiters();
    }
}

impl Outbox {
    pub(crate) fn new(open: OpenOut, path: watch::Receiver<Path>) -> Self {
        Self {
            stream: tokio::sync::Mutex::new(None),
            opening: Mutex::new(false),
            opened: Notify::new(),
            open,
            path,
            sends: AtomicU64::new(0),
        }
    }

    /// Send one envelope, opening the message stream first if there is
    /// none, or a new one when the path has changed since it was opened
    /// (the old one is finished in the background).
    pub(crate) async fn send(&self, env: Envelope) -> Result<(), SendError> {
        let bytes = env.to_bytes();
        if self.sends.fetch_add(1, Ordering::Relaxed) % BUDGET_EVERY == BUDGET_EVERY - 1 {
            tokio::task::consume_budget().await;
        }
        loop {
            // See BUDGET_EVERY.
            let mut slot = match self.stream.try_lock() {
                Ok(slot) => slot,
                Err(_) => self.stream.lock().await,
            };
            let now = *self.path.borrow();
            if slot.as_ref().is_some_and(|(_, on)| *on != now) {
                if let Some((old, _)) = slot.take() {
                    tokio::spawn(async move {
                        let _ = old.finish().await;
                    });
                }
            }
            if let Some((mut out, on)) = slot.take() {
                // Taken out while it is written: should this future be
                // dropped mid-write, the stream is dropped with it (quinn
                // finishes it, so what went before is still delivered) and
                // the next send opens a new one.
                let sent = out.send(&bytes).await;
                *slot = Some((out, on));
                return sent;
            }
            drop(slot);
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if std::mem::replace(&mut *lock(&self.opening), true) {
                // Another sender is opening it: wait, then look again.
                opened.await;
                continue;
            }
            let _opening = Opening(self);
            let stream = (self.open)().await?;
            *self.stream.lock().await = Some(stream);
        }
    }

    /// Finish the message stream, if one is open, and wait until it is
    /// delivered.
    pub(crate) async fn finish(&self) {
        let open = self.stream.lock().await.take();
        if let Some((out, _)) = open {
            let _ = out.finish().await;
        }
    }
}

/// Requests this side sent that wait for their reply.
///
/// Each request's time limit runs from when it has been sent
/// ([`Waiting::arm`]). The limits are kept by one task per channel (started
/// with the first request), not by a timer per request: it sleeps until the
/// earliest limit, ends the requests whose time has run out, and sleeps
/// again. A steady run of answered requests costs it one wake-up per
/// request timeout.
#[derive(Debug, Default)]
pub(crate) struct Waiting {
    next: AtomicU64,
    pending: Mutex<Pending>,
    /// Replies dropped because no request waited for them.
    pub(crate) dropped: AtomicU64,
    /// Wakes the sweeper: a limit earlier than the one it sleeps to, or
    /// the requests are gone.
    wake: Arc<Notify>,
}

/// What a waiting request gets: its reply, or word that its time ran out.
/// (A request whose channel ended gets nothing: its sender is dropped.)
pub(crate) type Answer = Result<Bytes, TimedOut>;

/// The request's time limit passed before its reply came.
#[derive(Debug)]
pub(crate) struct TimedOut;

#[derive(Debug, Default)]
struct Pending {
    /// Keyed by this side's own request numbers (a reply's id is only
    /// looked up), so the fast hasher is safe.
    requests: HashMap<u64, Entry, rustc_hash::FxBuildHasher>,
    /// When the sweeper looks next; `None` while no request has a limit
    /// (as far as the sweeper last saw).
    next_sweep: Option<Instant>,
    /// Whether the sweeper has been started.
    sweeper: bool,
}

#[derive(Debug)]
struct Entry {
    reply: oneshot::Sender<Answer>,
    /// Set once the request is sent.
    deadline: Option<Instant>,
}

impl Waiting {
    /// Register a new request; `None` when `max` are already waiting.
    pub(crate) fn register(&self, max: usize) -> Option<(u64, oneshot::Receiver<Answer>)> {
        let mut pending = lock(&self.pending);
        if pending.requests.len() >= max {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (reply, rx) = oneshot::channel();
        let entry = Entry {
            reply,
            deadline: None,
        };
        pending.requests.insert(id, entry);
        Some((id, rx))
    }

    /// Request `id` has been sent: it gets [`TimedOut`] unless its reply
    /// comes within `limit`. Must be called on a tokio runtime.
    pub(crate) fn arm(self: &Arc<Self>, id: u64, limit: Duration) {
        // A limit too far off to name is no limit, as with tokio's timeout.
        let Some(at) = Instant::now().checked_add(limit) else {
            return;
        };
        let mut pending = lock(&self.pending);
        let Some(entry) = pending.requests.get_mut(&id) else {
            return; // answered already, or the channel has ended
        };
        entry.deadline = Some(at);
        if !pending.sweeper {
            pending.sweeper = true;
            tokio::spawn(sweep(Arc::downgrade(self), self.wake.clone()));
        }
        if pending.next_sweep.is_none_or(|next| at < next) {
            pending.next_sweep = Some(at);
            drop(pending);
            self.wake.notify_one();
        }
    }

    /// End the requests whose limit is `now` or earlier; note when the
    /// next one's limit is.
    fn expire(&self, now: Instant) {
        let mut pending = lock(&self.pending);
        let ids: Vec<u64> = pending
            .requests
            .iter()
            .filter(|(_, e)| e.deadline.is_some_and(|at| at <= now))
            .map(|(id, _)| *id)
            .collect();
        let over: Vec<Entry> = ids
            .iter()
            .filter_map(|id| pending.requests.remove(id))
            .collect();
        pending.next_sweep = pending.requests.values().filter_map(|e| e.deadline).min();
        drop(pending);
        for e in over {
            let _ = e.reply.send(Err(TimedOut));
        }
    }

    /// Forget request `id` (answered, timed out or cancelled).
    pub(crate) fn forget(&self, id: u64) {
        lock(&self.pending).requests.remove(&id);
    }

    /// Hand a reply to its request, or drop it.
    fn answer(&self, id: u64, body: Bytes, label: &str) {
        let waiter = lock(&self.pending).requests.remove(&id);
        match waiter.map(|w| w.reply.send(Ok(body))) {
            Some(Ok(())) => {}
            Some(Err(_)) | None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                warn!(channel = %label, id, "dropping a reply that no request waits for (it timed out, or was never sent)");
            }
        }
    }

    /// The channel ended: every waiting request gets no reply.
    pub(crate) fn fail_all(&self) {
        lock(&self.pending).requests.clear();
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // The sweeper finds the requests gone and ends.
        self.wake.notify_one();
    }
}

/// Keep the time limits of a channel's requests (see [`Waiting`]); ends
/// once the requests are gone.
async fn sweep(waiting: Weak<Waiting>, wake: Arc<Notify>) {
    loop {
        let next = match waiting.upgrade() {
            Some(w) => lock(&w.pending).next_sweep,
            None => return,
        };
        match next {
            Some(at) => tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = wake.notified() => continue,
            },
            None => {
                wake.notified().await;
                continue;
            }
        }
        match waiting.upgrade() {
            Some(w) => w.expire(Instant::now()),
            None => return,
        }
    }
}

/// What the readers of the peer's message streams need.
pub(crate) struct Inbox {
    pub(crate) label: String,
    pub(crate) max_message: usize,
    pub(crate) waiting: Arc<Waiting>,
    pub(crate) outbox: Arc<Outbox>,
    /// Whether the peer may send one-way messages and requests here.
    pub(crate) peer_may_send: bool,
    /// Counts each message against the interface's quota; an error ends
    /// the stream and says why.
    pub(crate) quota: Option<Arc<Gate>>,
}

/// Read the peer's message streams as they arrive, one task each, and
/// deliver what they carry to `deliver` (bounded: a full queue stops the
/// reading, and QUIC flow control stops the peer). `counted` is called once
/// per stream, for the close accounting.
pub(crate) async fn read_streams(
    inbox: Arc<Inbox>,
    mut streams: mpsc::Receiver<(quinn::RecvStream, qmesh_certs::transport::StreamGuard)>,
    deliver: mpsc::Sender<Incoming>,
    counted: impl Fn(i64) + Send + Sync + 'static,
    over_quota: impl Fn(String) + Send + Sync + 'static,
) {
    let over_quota = Arc::new(over_quota);
    let counted = Arc::new(counted);
    while let Some((recv, guard)) = streams.recv().await {
        counted(1);
        let rx = MessageReceiver::with_guard(recv, inbox.max_message, guard);
        let (inbox, deliver, over_quota, counted) = (
            inbox.clone(),
            deliver.clone(),
            over_quota.clone(),
            counted.clone(),
        );
        tokio::spawn(async move {
            read_one(inbox, rx, deliver, over_quota).await;
            counted(-1);
        });
    }
}

async fn read_one(
    inbox: Arc<Inbox>,
    mut rx: MessageReceiver,
    deliver: mpsc::Sender<Incoming>,
    over_quota: Arc<impl Fn(String) + Send + Sync>,
) {
    loop {
        let msg = match rx.recv().await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                debug!(channel = %inbox.label, cause = %Untrusted::reason(&e), "message stream ended");
                return;
            }
        };
        let env = match Envelope::parse(msg) {
            Ok(env) => env,
            Err(e) => {
                warn!(channel = %inbox.label, cause = %Untrusted::reason(&e), "stopping a message stream with a bad envelope");
                rx.stop(StreamCode::Malformed);
                return;
            }
        };
        if !matches!(env, Envelope::Reply { .. }) {
            if !inbox.peer_may_send {
                warn!(channel = %inbox.label, "stopping a message stream that sends against the interface's direction");
                rx.stop(StreamCode::WrongDirection);
                return;
            }
            if let Some(gate) = &inbox.quota {
                if let Err(why) = gate.pass() {
                    rx.stop(StreamCode::OverQuota);
                    over_quota(why);
                    return;
                }
            }
        }
        let item = match env {
            Envelope::Reply { id, body } => {
                inbox.waiting.answer(id, body, &inbox.label);
                continue;
            }
            Envelope::OneWay(body) => Incoming::Message(body),
            Envelope::Request { id, body } => Incoming::Request(Request {
                id,
                body,
                outbox: inbox.outbox.clone(),
            }),
        };
        if deliver.send(item).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use qmesh_certs::{Ca, Trust};
    use quinn::{Connection, Endpoint};
    use tokio::sync::Semaphore;

    use super::*;

    /// A QUIC connection over loopback: the sending side, and the
    /// receiving side's connection.
    async fn pair() -> (Connection, Connection, Endpoint, Endpoint) {
        let ca = Ca::generate("outbox test CA").unwrap();
        let identity = ca.issue_server(&["localhost".to_owned()]).unwrap();
        let server_config = qmesh_certs::server_config(&identity).unwrap();
        let server = Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let trust = Trust::Ca {
            certs: vec![ca.cert_der().clone()],
            source: "the test CA".into(),
        };
        let me = ca.issue_client("outbox").unwrap();
        let (client_config, _) = qmesh_certs::client_config_with_identity(&trust, &me).unwrap();
        let mut client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_config);
        let addr = server.local_addr().unwrap();
        let (dialled, accepted) = tokio::join!(
            async { client.connect(addr, "localhost").unwrap().await.unwrap() },
            async { server.accept().await.unwrap().await.unwrap() },
        );
        (dialled, accepted, client, server)
    }

    /// An outbox whose streams open on `conn` once `gate` lets them, and
    /// a count of the openings begun.
    fn outbox(conn: Connection, gate: Arc<Semaphore>) -> (Outbox, Arc<AtomicUsize>) {
        let opened = Arc::new(AtomicUsize::new(0));
        let count = opened.clone();
        let open: OpenOut = Box::new(move || {
            let (conn, gate, count) = (conn.clone(), gate.clone(), count.clone());
            Box::pin(async move {
                count.fetch_add(1, Ordering::SeqCst);
                let _pass = gate.acquire().await.unwrap();
                let send = conn.open_uni().await.unwrap();
                Ok((MessageSender::new(send, 1 << 16), Path::Relay))
            })
        });
        let (_, path) = watch::channel(Path::Relay);
        (Outbox::new(open, path), opened)
    }

    fn one_way(n: u32) -> Envelope {
        Envelope::OneWay(Bytes::from(n.to_be_bytes().to_vec()))
    }

    async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .unwrap_or_else(|_| panic!("{what} did not happen within 10 s"))
    }

    #[tokio::test]
    async fn senders_that_arrive_while_the_stream_opens_share_one_stream() {
        let (conn, peer, _c, _s) = pair().await;
        let gate = Arc::new(Semaphore::new(0));
        let (outbox, opened) = outbox(conn, gate.clone());
        let outbox = Arc::new(outbox);
        let mut sends = Vec::new();
        for n in 0..20 {
            let outbox = outbox.clone();
            sends.push(tokio::spawn(async move { outbox.send(one_way(n)).await }));
        }
        // On this single-threaded runtime each yield lets every sender run
        // until it waits: all of them reach the outbox before the path opens.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1, "one sender opens");
        gate.add_permits(100);
        for send in sends {
            within("a send", send).await.unwrap().unwrap();
        }
        assert_eq!(
            opened.load(Ordering::SeqCst),
            1,
            "one stream for all senders"
        );
        outbox.finish().await;
        let recv = within("the stream", peer.accept_uni()).await.unwrap();
        let mut rx = MessageReceiver::new(recv, 1 << 16);
        let mut got = Vec::new();
        while let Some(msg) = within("a message", rx.recv()).await.unwrap() {
            let Envelope::OneWay(body) = Envelope::parse(msg).unwrap() else {
                panic!("not a one-way message");
            };
            got.push(u32::from_be_bytes(body[..].try_into().unwrap()));
        }
        got.sort_unstable();
        assert_eq!(got, (0..20).collect::<Vec<_>>());
    }

    /// Sends `n` messages from one task into `outbox`'s open stream: how
    /// many polls that took.
    async fn polls_for_sends(outbox: &Outbox, n: u32) -> usize {
        let mut run = std::pin::pin!(async {
            for i in 1..=n {
                outbox.send(one_way(i)).await.unwrap();
            }
        });
        let mut polls = 0;
        within(
            "the sends",
            std::future::poll_fn(|cx| {
                polls += 1;
                std::future::Future::poll(run.as_mut(), cx)
            }),
        )
        .await;
        polls
    }

    /// The messages on the first stream `peer` accepts, counted.
    async fn count_arrivals(peer: &Connection) -> usize {
        let recv = within("the stream", peer.accept_uni()).await.unwrap();
        let mut rx = MessageReceiver::new(recv, 1 << 16);
        let mut n = 0;
        while within("a message", rx.recv()).await.unwrap().is_some() {
            n += 1;
        }
        n
    }

    /// An outbox whose stream one send has opened, then `n` more sends from
    /// one task: the polls those took, and the messages the peer got.
    async fn run_of_sends(n: u32) -> (usize, usize) {
        let (conn, peer, _c, _s) = pair().await;
        let (outbox, _) = outbox(conn, Arc::new(Semaphore::new(1)));
        within("the first send", outbox.send(one_way(0)))
            .await
            .unwrap();
        let polls = polls_for_sends(&outbox, n).await;
        within("finish", outbox.finish()).await;
        (polls, count_arrivals(&peer).await)
    }

    /// Hundreds of sends from one task into an open stream go in within one
    /// poll: taking the free lock spends none of tokio's per-poll budget.
    #[tokio::test]
    async fn a_burst_of_sends_from_one_task_goes_in_within_one_poll() {
        let (polls, arrived) = run_of_sends(300).await;
        assert_eq!(polls, 1, "the burst was cut into {polls} polls");
        assert_eq!(arrived, 301, "every message arrives");
    }

    /// A long run of sends from one task still yields to the runtime now
    /// and then (one unit of budget every 32 sends, 128 units a poll).
    #[tokio::test]
    async fn a_long_run_of_sends_from_one_task_still_yields() {
        let (polls, arrived) = run_of_sends(20_000).await;
        assert!(polls >= 4, "20,000 sends took {polls} polls");
        assert_eq!(arrived, 20_001, "every message arrives");
    }

    #[tokio::test]
    async fn finishing_does_not_wait_for_a_stream_that_is_opening() {
        let (conn, _peer, _c, _s) = pair().await;
        let gate = Arc::new(Semaphore::new(0));
        let (outbox, opened) = outbox(conn, gate);
        let outbox = Arc::new(outbox);
        let sender = outbox.clone();
        let send = tokio::spawn(async move { sender.send(one_way(1)).await });
        while opened.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // The opening waits on the gate for good; finish still returns.
        within("finish", outbox.finish()).await;
        send.abort();
    }

    #[tokio::test]
    async fn a_sender_dropped_while_opening_leaves_the_opening_to_the_next() {
        let (conn, peer, _c, _s) = pair().await;
        let gate = Arc::new(Semaphore::new(0));
        let (outbox, opened) = outbox(conn, gate.clone());
        let outbox = Arc::new(outbox);
        let sender = outbox.clone();
        let first = tokio::spawn(async move { sender.send(one_way(1)).await });
        while opened.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let sender = outbox.clone();
        let second = tokio::spawn(async move { sender.send(one_way(2)).await });
        first.abort();
        let _ = first.await;
        gate.add_permits(100);
        within("the second send", second).await.unwrap().unwrap();
        assert_eq!(opened.load(Ordering::SeqCst), 2);
        outbox.finish().await;
        let recv = within("the stream", peer.accept_uni()).await.unwrap();
        let mut rx = MessageReceiver::new(recv, 1 << 16);
        let msg = within("the message", rx.recv()).await.unwrap().unwrap();
        assert!(
            matches!(Envelope::parse(msg).unwrap(), Envelope::OneWay(b) if b[..] == 2u32.to_be_bytes())
        );
    }

    /// A `MessageSender` flush cancelled part way (the stream's window full) and then run
    /// again writes the rest, not all of it twice: the peer reads every
    /// message once, whole and in order.
    #[tokio::test]
    async fn a_flush_cancelled_part_way_resumes_where_it_stopped() {
        const COUNT: u32 = 100_000;
        let (conn, peer, _c, _s) = pair().await;
        let mut out = MessageSender::new(conn.open_uni().await.unwrap(), 1 << 16);
        // Feed numbered messages until a feed's own flush (every 64 KiB)
        // finds the peer's stream window full: that poll writes part of
        // the gathered bytes and waits, and the feed is dropped there.
        let mut fed = 0u32;
        loop {
            let mut m = vec![9u8; 1020];
            m[..4].copy_from_slice(&fed.to_be_bytes());
            fed += 1;
            let blocked = tokio::select! {
                biased;
                r = out.feed(&m) => { r.unwrap(); false }
                () = std::future::ready(()) => true,
            };
            if blocked {
                break;
            }
            assert!(fed < COUNT, "the window never filled");
        }
        let (written, queued) = out.part_written();
        assert!(written > 0 && written < queued, "{written} of {queued}");
        let reader = tokio::spawn(async move {
            let recv = peer.accept_uni().await.unwrap();
            let mut rx = MessageReceiver::new(recv, 1 << 16);
            let mut next = 0u32;
            while let Some(m) = rx.recv().await.unwrap() {
                assert_eq!(m.len(), 1020);
                assert_eq!(u32::from_be_bytes(m[..4].try_into().unwrap()), next);
                next += 1;
            }
            next
        });
        within("the flush", out.flush()).await.unwrap();
        within("the finish", out.finish()).await.unwrap();
        assert_eq!(within("the reader", reader).await.unwrap(), fed);
    }

    /// Whether a request's answer has come, without waiting for it.
    fn answered(rx: &mut oneshot::Receiver<Answer>) -> Option<Result<Answer, ()>> {
        match rx.try_recv() {
            Ok(a) => Some(Ok(a)),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(())),
        }
    }

    /// A request registered and sent with `limit`.
    fn sent(waiting: &Arc<Waiting>, limit: Duration) -> (u64, oneshot::Receiver<Answer>) {
        let (id, rx) = waiting.register(10).unwrap();
        waiting.arm(id, limit);
        (id, rx)
    }

    /// Lets the sweeper run at the paused clock's current time.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_times_out_at_its_limit_and_not_before() {
        let waiting = Arc::new(Waiting::default());
        let (_, mut rx) = sent(&waiting, Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(99)).await;
        settle().await;
        assert!(answered(&mut rx).is_none(), "timed out before its limit");
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert!(matches!(answered(&mut rx), Some(Ok(Err(TimedOut)))));
        assert!(lock(&waiting.pending).requests.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_limit_set_later_ends_first() {
        let waiting = Arc::new(Waiting::default());
        let (_, mut long_rx) = sent(&waiting, Duration::from_secs(10));
        settle().await; // the sweeper now sleeps until 10 s
        let (_, mut short_rx) = sent(&waiting, Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert!(matches!(answered(&mut short_rx), Some(Ok(Err(TimedOut)))));
        assert!(answered(&mut long_rx).is_none());
        tokio::time::advance(Duration::from_secs(9)).await;
        settle().await;
        assert!(matches!(answered(&mut long_rx), Some(Ok(Err(TimedOut)))));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answered_request_is_not_timed_out_and_others_still_are() {
        let waiting = Arc::new(Waiting::default());
        let (first, mut first_rx) = sent(&waiting, Duration::from_secs(1));
        let (_, mut second_rx) = sent(&waiting, Duration::from_secs(2));
        waiting.answer(first, Bytes::from_static(b"yes"), "test");
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert!(matches!(answered(&mut first_rx), Some(Ok(Ok(b))) if &b[..] == b"yes"));
        assert!(answered(&mut second_rx).is_none());
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert!(matches!(answered(&mut second_rx), Some(Ok(Err(TimedOut)))));
        assert_eq!(waiting.dropped.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_not_yet_sent_has_no_limit() {
        let waiting = Arc::new(Waiting::default());
        let (unsent, mut unsent_rx) = waiting.register(10).unwrap();
        let (_, mut sent_rx) = sent(&waiting, Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(60)).await;
        settle().await;
        assert!(matches!(answered(&mut sent_rx), Some(Ok(Err(TimedOut)))));
        assert!(answered(&mut unsent_rx).is_none());
        waiting.arm(unsent, Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        assert!(matches!(answered(&mut unsent_rx), Some(Ok(Err(TimedOut)))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_too_far_off_to_name_is_no_limit() {
        let waiting = Arc::new(Waiting::default());
        let (id, mut rx) = sent(&waiting, Duration::MAX);
        tokio::time::advance(Duration::from_secs(3600)).await;
        settle().await;
        assert!(answered(&mut rx).is_none());
        waiting.answer(id, Bytes::from_static(b"late"), "test");
        assert!(matches!(answered(&mut rx), Some(Ok(Ok(b))) if &b[..] == b"late"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_ends_with_its_requests() {
        let metrics = tokio::runtime::Handle::current().metrics();
        let waiting = Arc::new(Waiting::default());
        let (_, _rx) = sent(&waiting, Duration::from_secs(5));
        settle().await;
        assert_eq!(metrics.num_alive_tasks(), 1, "no sweeper started");
        drop(waiting);
        settle().await;
        assert_eq!(
            metrics.num_alive_tasks(),
            0,
            "the sweeper outlived its requests"
        );
    }

    #[tokio::test]
    async fn the_channel_ending_fails_waiting_requests() {
        let waiting = Arc::new(Waiting::default());
        let (_, mut rx) = sent(&waiting, Duration::from_secs(5));
        waiting.fail_all();
        assert!(matches!(answered(&mut rx), Some(Err(()))));
    }
}
