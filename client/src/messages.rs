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
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use qmesh_proto::codes::StreamCode;
use qmesh_proto::envelope::Envelope;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn, Instrument};

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

/// This side's outgoing message stream: a handle on the task that owns
/// it. Sends queue (bounded) and are written in order; no lock is held
/// while the stream opens (which may wait for a direct path) or writes.
pub(crate) struct Outbox {
    commands: mpsc::Sender<Command>,
}

/// What the outbox task is asked to do.
enum Command {
    /// Write one envelope and say how it went.
    Send(Envelope, oneshot::Sender<Result<(), SendError>>),
    /// Finish the message stream, if one is open, and say when delivered.
    Finish(oneshot::Sender<()>),
}

/// Sends that may wait for the outbox task before their senders wait.
const OUTBOX_QUEUE: usize = 16;

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

impl Outbox {
    /// Start the task that owns the message stream; it ends when the
    /// outbox is dropped.
    pub(crate) fn new(open: OpenOut, path: tokio::sync::watch::Receiver<Path>) -> Self {
        let (commands, rx) = mpsc::channel(OUTBOX_QUEUE);
        tokio::spawn(run_outbox(rx, open, path).in_current_span());
        Self { commands }
    }

    /// Send one envelope, opening the message stream first if there is
    /// none, or a new one when the path has changed since it was opened
    /// (the old one is finished in the background).
    pub(crate) async fn send(&self, env: Envelope) -> Result<(), SendError> {
        let gone = || SendError::Stream("the channel is gone".into());
        let (done, outcome) = oneshot::channel();
        self.commands
            .send(Command::Send(env, done))
            .await
            .map_err(|_| gone())?;
        outcome.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Finish the message stream, if one is open, and wait until it is
    /// delivered.
    pub(crate) async fn finish(&self) {
        let (done, finished) = oneshot::channel();
        if self.commands.send(Command::Finish(done)).await.is_ok() {
            let _ = finished.await;
        }
    }
}

/// Own the message stream: carry out the outbox's commands in order.
async fn run_outbox(
    mut commands: mpsc::Receiver<Command>,
    open: OpenOut,
    path: tokio::sync::watch::Receiver<Path>,
) {
    let mut slot: Option<(MessageSender, Path)> = None;
    while let Some(command) = commands.recv().await {
        match command {
            Command::Send(env, done) => {
                let outcome = send_on(&mut slot, &open, &path, env).await;
                let _ = done.send(outcome);
            }
            Command::Finish(done) => {
                if let Some((out, _)) = slot.take() {
                    let _ = out.finish().await;
                }
                let _ = done.send(());
            }
        }
    }
}

/// Write `env` on the message stream in `slot`, (re)opening it on the
/// current path first when needed.
async fn send_on(
    slot: &mut Option<(MessageSender, Path)>,
    open: &OpenOut,
    path: &tokio::sync::watch::Receiver<Path>,
    env: Envelope,
) -> Result<(), SendError> {
    let now = *path.borrow();
    if slot.as_ref().is_some_and(|(_, on)| *on != now) {
        if let Some((old, _)) = slot.take() {
            tokio::spawn(async move {
                let _ = old.finish().await;
            });
        }
    }
    let (out, _) = match slot {
        Some(open) => open,
        None => slot.insert(open().await?),
    };
    out.send(&env.to_bytes()).await
}

/// Requests this side sent that wait for their reply.
#[derive(Debug, Default)]
pub(crate) struct Waiting {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Bytes>>>,
    /// Replies dropped because no request waited for them.
    pub(crate) dropped: AtomicU64,
}

impl Waiting {
    /// Register a new request; `None` when `max` are already waiting.
    pub(crate) fn register(&self, max: usize) -> Option<(u64, oneshot::Receiver<Bytes>)> {
        let mut pending = lock(&self.pending);
        if pending.len() >= max {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        pending.insert(id, tx);
        Some((id, rx))
    }

    /// Forget request `id` (answered, timed out or cancelled).
    pub(crate) fn forget(&self, id: u64) {
        lock(&self.pending).remove(&id);
    }

    /// Hand a reply to its request, or drop it.
    fn answer(&self, id: u64, body: Bytes, label: &str) {
        let waiter = lock(&self.pending).remove(&id);
        match waiter.map(|w| w.send(body)) {
            Some(Ok(())) => {}
            Some(Err(_)) | None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                warn!(channel = %label, id, "dropping a reply that no request waits for (it timed out, or was never sent)");
            }
        }
    }

    /// The channel ended: every waiting request gets no reply.
    pub(crate) fn fail_all(&self) {
        lock(&self.pending).clear();
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
                debug!(channel = %inbox.label, cause = %e, "message stream ended");
                return;
            }
        };
        let env = match Envelope::parse(msg) {
            Ok(env) => env,
            Err(e) => {
                warn!(channel = %inbox.label, cause = %e, "stopping a message stream with a bad envelope");
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
