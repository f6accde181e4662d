//! The data stream and pipe relay.
//!
//! Each unidirectional stream a client opens starts with a header naming
//! one of its channels. The relay opens a matching stream to the other
//! side, writes that side's header, and copies chunks until the end.
//! A pipe (a bidirectional stream whose request is `StreamRequest::Pipe`)
//! is relayed the same way, once in each direction, as raw bytes.
//!
//! Memory: the relay holds at most one batch of received chunks (each a
//! STREAM frame, about a packet) per stream. Everything else waits in QUIC's own buffers, which flow control
//! bounds: a stream's receive window on the inbound side and the
//! connection's send window on the outbound side. When the reader stops
//! reading, the outbound write blocks, the relay stops reading, the
//! inbound window closes, and the writer blocks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use qmesh_proto::codec::{write_frame, DecodeError, ReadFrameError};
use qmesh_proto::codes::StreamCode;
use qmesh_proto::msg::{Arrival, LinkRequest, StreamHeader};
use qmesh_proto::{StreamId, Untrusted};
use quinn::{ReadError, RecvStream, SendStream, WriteError};
use tokio::sync::watch;
use tracing::{debug, trace};

use crate::limit::{MessageCounter, TooLong};
use crate::session::{Session, Shared, StreamCount};
use qmesh_proto::codec::{read_within_reserving, Read};

/// Marks a relayed stream finished in its channel's count when dropped.
struct Active<'a>(&'a watch::Sender<StreamCount>);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0
            .send_modify(|c| c.active = c.active.saturating_sub(1));
    }
}

/// Relay one data stream `session` opened.
pub(crate) async fn relay_stream(shared: Arc<Shared>, session: Arc<Session>, mut recv: RecvStream) {
    let deadline = tokio::time::Instant::now() + shared.config.hello_timeout;
    let (channel, messages) = match read_within_reserving(deadline, &mut recv, |len| {
        session.header_room(len)
    })
    .await
    {
        Read::Frame(StreamHeader::Data { channel }) => (channel, false),
        Read::Frame(StreamHeader::Messages { channel }) => (channel, true),
        Read::Frame(
            StreamHeader::Direct { .. }
            | StreamHeader::DirectMessages { .. }
            | StreamHeader::Hold { .. }
            | StreamHeader::DirectClose { .. },
        ) => {
            let _ = recv.stop(StreamCode::Malformed.varint());
            session.stream_violation(
                "a data stream with a direct-connection header sent to the coordinator",
            );
            return;
        }
        Read::Finished | Read::Failed(ReadFrameError::Io(_)) => return,
        Read::Failed(ReadFrameError::OverBudget { len }) => {
            let _ = recv.stop(StreamCode::TooManyStreams.varint());
            session.stream_violation(&format!(
                "a data stream header of {len} bytes with the session's {} bytes of stream headers in flight",
                crate::limit::HEADER_BUDGET
            ));
            return;
        }
        Read::Failed(e) => {
            let c = match e {
                ReadFrameError::Decode(DecodeError::TooLarge { .. }) => StreamCode::FrameTooLarge,
                _ => StreamCode::Malformed,
            };
            let _ = recv.stop(c.varint());
            session.stream_violation(&format!("a data stream with a bad header: {e}"));
            return;
        }
        Read::Late => {
            let _ = recv.stop(StreamCode::Malformed.varint());
            session.stream_violation("a data stream whose header did not come in time");
            return;
        }
    };
    let side = session.channels().get(&channel).cloned();
    let Some(side) = side else {
        debug!(client = %Untrusted::name(&session.name), %channel, "data stream for an unknown channel");
        let _ = recv.stop(StreamCode::UnknownChannel.varint());
        return;
    };
    let max_streams = shared.config.max_streams_per_channel as u64;
    let mut over = false;
    side.streams.send_modify(|c| {
        c.accepted += 1;
        if c.active >= max_streams {
            over = true;
            c.dropped += 1;
        } else {
            c.active += 1;
        }
    });
    if over {
        debug!(channel = %side.label, max_streams, "stopping data stream: too many at once on the channel");
        let _ = recv.stop(StreamCode::TooManyStreams.varint());
        return;
    }
    let _active = Active(&side.streams);
    let mut send = match side.peer_conn.open_uni().await {
        Ok(s) => s,
        Err(_) => {
            let _ = recv.stop(StreamCode::PeerLost.varint());
            return;
        }
    };
    let header = if messages {
        StreamHeader::Messages {
            channel: side.peer_channel,
        }
    } else {
        StreamHeader::Data {
            channel: side.peer_channel,
        }
    };
    if write_frame(&mut send, &header).await.is_err() {
        let _ = recv.stop(StreamCode::PeerLost.varint());
        return;
    }
    shared.stats.streams_relayed.fetch_add(1, Ordering::Relaxed);
    trace!(channel = %side.label, "relaying stream");
    let counter = MessageCounter::new(shared.config.max_message);
    copy(
        &shared,
        &session,
        Some(counter),
        (&mut recv, &mut send),
        &side.record.bytes,
    )
    .await;
}

/// Counts a relayed pipe until dropped.
struct PipeSlot<'a>(&'a AtomicU64);

impl Drop for PipeSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Relay one pipe `session` opened on its channel `channel`: open a
/// bidirectional stream to the other side, tell it which of its channels
/// the pipe is on, and copy bytes both ways until both directions end.
pub(crate) async fn relay_pipe(
    shared: Arc<Shared>,
    session: Arc<Session>,
    (mut a_send, mut a_recv): (SendStream, RecvStream),
    channel: StreamId,
) {
    let side = session.channels().get(&channel).cloned();
    let Some(side) = side else {
        debug!(client = %Untrusted::name(&session.name), %channel, "pipe for an unknown channel");
        let _ = a_recv.stop(StreamCode::UnknownChannel.varint());
        let _ = a_send.reset(StreamCode::UnknownChannel.varint());
        return;
    };
    let max = shared.config.max_streams_per_channel as u64;
    if side.pipes.fetch_add(1, Ordering::Relaxed) >= max {
        side.pipes.fetch_sub(1, Ordering::Relaxed);
        debug!(channel = %side.label, max, "refusing pipe: too many at once on the channel");
        let _ = a_recv.stop(StreamCode::TooManyStreams.varint());
        let _ = a_send.reset(StreamCode::TooManyStreams.varint());
        return;
    }
    let _slot = PipeSlot(&side.pipes);
    // Each direction counts against the rate limit of the side that
    // sends it.
    let Some(peer) = side.peer.upgrade() else {
        let _ = a_recv.stop(StreamCode::PeerLost.varint());
        let _ = a_send.reset(StreamCode::PeerLost.varint());
        return;
    };
    let opened = async {
        let (mut send, recv) = side.peer_conn.open_bi().await.ok()?;
        let channel = side.peer_channel;
        // Over a member link the pipe is a link request; to a client, an
        // arrival.
        if peer.member.is_some() {
            write_frame(&mut send, &LinkRequest::Pipe { channel }).await
        } else {
            write_frame(&mut send, &Arrival::Pipe { channel }).await
        }
        .ok()?;
        Some((send, recv))
    };
    let Some((mut b_send, mut b_recv)) = opened.await else {
        let _ = a_recv.stop(StreamCode::PeerLost.varint());
        let _ = a_send.reset(StreamCode::PeerLost.varint());
        return;
    };
    shared.stats.streams_relayed.fetch_add(1, Ordering::Relaxed);
    trace!(channel = %side.label, "relaying pipe");
    tokio::join!(
        copy(
            &shared,
            &session,
            None,
            (&mut a_recv, &mut b_send),
            &side.record.bytes
        ),
        copy(
            &shared,
            &peer,
            None,
            (&mut b_recv, &mut a_send),
            &side.record.bytes
        ),
    );
}

/// Chunks taken from the inbound stream per read: each is one received
/// STREAM frame (about a packet), so taking many per lock of the connection
/// and writing them in one call is what lets the relay keep up.
const CHUNKS_PER_READ: usize = 32;

/// Copy `recv` to `send` in batches of chunks, passing resets and stops
/// across. At most one batch is held here; the rest waits in QUIC's windows.
/// With a `counter`, the bytes are length-prefixed messages, each checked
/// against the size limit and counted for the rate limit; without, they
/// are raw bytes (a pipe), counted only as bytes.
async fn copy(
    shared: &Shared,
    session: &Session,
    mut counter: Option<MessageCounter>,
    (recv, send): (&mut RecvStream, &mut SendStream),
    channel_bytes: &AtomicU64,
) {
    let mut bufs: [Bytes; CHUNKS_PER_READ] = std::array::from_fn(|_| Bytes::new());
    // A reader that stops its stream is passed back to the writer at once,
    // not only at the next write: the stream's QUIC credit is freed then.
    let stopped = send.stopped();
    tokio::pin!(stopped);
    loop {
        let read = tokio::select! {
            read = recv.read_chunks(&mut bufs) => read,
            stop = &mut stopped => {
                let c = match stop {
                    Ok(Some(c)) => c,
                    _ => StreamCode::PeerLost.varint(),
                };
                let _ = recv.stop(c);
                return;
            }
        };
        match read {
            Ok(Some(n)) => {
                let bytes: u64 = bufs[..n].iter().map(|b| b.len() as u64).sum();
                let mut messages = 0;
                if let Some(counter) = counter.as_mut() {
                    for b in &bufs[..n] {
                        match counter.feed(b) {
                            Ok(m) => messages += m,
                            Err(TooLong { len, max }) => {
                                debug!(client = %Untrusted::name(&session.name), len, max, "resetting data stream: message over the size limit");
                                let _ = recv.stop(StreamCode::MessageTooLarge.varint());
                                let _ = send.reset(StreamCode::MessageTooLarge.varint());
                                return;
                            }
                        }
                    }
                }
                if let Err(flood) = session.limiter.pass(bytes, messages).await {
                    session.flooded(&shared.stats, &flood);
                    let _ = send.reset(StreamCode::PeerLost.varint());
                    return;
                }
                // One contiguous buffer per batch: quinn's send buffer walks
                // its segments to build each packet, so a few large
                // segments cost less than many packet-sized ones (profiled:
                // `write_stream_frames` was the relay's top symbol).
                let mut batch = BytesMut::with_capacity(bytes as usize);
                for b in &bufs[..n] {
                    batch.extend_from_slice(b);
                }
                match send.write_chunk(batch.freeze()).await {
                    Ok(()) => {
                        shared
                            .stats
                            .bytes_relayed
                            .fetch_add(bytes, Ordering::Relaxed);
                        channel_bytes.fetch_add(bytes, Ordering::Relaxed);
                    }
                    Err(WriteError::Stopped(c)) => {
                        let _ = recv.stop(c);
                        return;
                    }
                    Err(_) => {
                        let _ = recv.stop(StreamCode::PeerLost.varint());
                        return;
                    }
                }
            }
            Ok(None) => {
                let _ = send.finish();
                return;
            }
            Err(ReadError::Reset(c)) => {
                let _ = send.reset(c);
                return;
            }
            Err(_) => {
                let _ = send.reset(StreamCode::PeerLost.varint());
                return;
            }
        }
    }
}
