//! Data streams: whole messages over one unidirectional QUIC stream.
//!
//! Each message is a 4-byte big-endian length and the bytes. A read yields
//! a whole message or nothing. Small messages are gathered into one QUIC
//! write ([`MessageSender::feed`]) because one write per tiny message is
//! what makes QUIC slow for them.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use qmesh_certs::transport::StreamGuard;
use qmesh_proto::codec::{check_length, length_prefix, DecodeError};
use qmesh_proto::codes::StreamCode;
use qmesh_proto::limits::{LENGTH_PREFIX, MAX_MESSAGE_CEILING};
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::io::AsyncReadExt;

use crate::error::{RecvError, SendError};

/// Gathered bytes at which `feed` writes them out.
const COALESCE: usize = 64 * 1024;

/// Sends whole messages on one data stream, in order.
#[derive(Debug)]
pub struct MessageSender {
    stream: SendStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already written to the stream: a flush that was
    /// cancelled part way resumes from here, so nothing is sent twice.
    written: usize,
    max: usize,
}

fn write_error(e: WriteError) -> SendError {
    match e {
        WriteError::Stopped(code) => SendError::Stopped(code),
        other => SendError::Stream(other.to_string()),
    }
}

impl MessageSender {
    /// Send qmesh messages (at most `max` bytes each) on any QUIC stream.
    pub fn new(stream: SendStream, max: usize) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(COALESCE + LENGTH_PREFIX),
            written: 0,
            max: max.min(MAX_MESSAGE_CEILING),
        }
    }

    /// Send one message and write it out now.
    pub async fn send(&mut self, msg: &[u8]) -> Result<(), SendError> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Send one message held in [`Bytes`] and write it out now, without
    /// copying it (quinn keeps the buffer until it is acknowledged).
    pub async fn send_bytes(&mut self, msg: Bytes) -> Result<(), SendError> {
        if msg.len() > self.max {
            return Err(SendError::TooLarge {
                len: msg.len(),
                max: self.max,
            });
        }
        self.buf.extend_from_slice(&length_prefix(msg.len()));
        let mut head =
            std::mem::replace(&mut self.buf, Vec::with_capacity(COALESCE + LENGTH_PREFIX));
        head.drain(..std::mem::take(&mut self.written));
        let mut chunks = [Bytes::from(head), msg];
        self.stream
            .write_all_chunks(&mut chunks)
            .await
            .map_err(write_error)
    }

    /// Queue one message; it is written out together with others once
    /// enough have gathered, or on [`flush`](Self::flush) or
    /// [`finish`](Self::finish).
    pub async fn feed(&mut self, msg: &[u8]) -> Result<(), SendError> {
        if msg.len() > self.max {
            return Err(SendError::TooLarge {
                len: msg.len(),
                max: self.max,
            });
        }
        if msg.len() >= COALESCE {
            // Large: no point copying it into the gather buffer.
            self.buf.extend_from_slice(&length_prefix(msg.len()));
            self.flush().await?;
            return self.stream.write_all(msg).await.map_err(write_error);
        }
        self.buf.extend_from_slice(&length_prefix(msg.len()));
        self.buf.extend_from_slice(msg);
        if self.buf.len() >= COALESCE {
            self.flush().await?;
        }
        Ok(())
    }

    /// Write out every queued message.
    ///
    /// Cancel-safe: dropped part way, what it wrote is remembered and the
    /// next `flush` (or [`feed`](Self::feed), [`finish`](Self::finish))
    /// writes the rest, so the stream carries every queued message once
    /// and whole.
    pub async fn flush(&mut self) -> Result<(), SendError> {
        while self.written < self.buf.len() {
            match self.stream.write(&self.buf[self.written..]).await {
                Ok(n) => self.written += n,
                Err(e) => {
                    self.buf.clear();
                    self.written = 0;
                    return Err(write_error(e));
                }
            }
        }
        self.buf.clear();
        self.written = 0;
        Ok(())
    }

    /// Of the gathered bytes, how many a cancelled flush wrote, and all.
    #[cfg(test)]
    pub(crate) fn part_written(&self) -> (usize, usize) {
        (self.written, self.buf.len())
    }

    /// Flush, end the stream, and wait until the other end (the
    /// coordinator, for a relayed channel) has received all of it.
    pub async fn finish(mut self) -> Result<(), SendError> {
        self.flush().await?;
        self.stream
            .finish()
            .map_err(|e| SendError::Stream(e.to_string()))?;
        match self.stream.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(SendError::Stopped(code)),
            Err(e) => Err(SendError::Stream(e.to_string())),
        }
    }

    /// Wait until the receiver stops the stream (dropping or stopping its
    /// [`MessageReceiver`]) and return its code; `None` if the stream ended
    /// another way (finished and delivered, or the session ended).
    pub async fn stopped(&self) -> Option<VarInt> {
        self.stream.stopped().await.ok().flatten()
    }

    /// Abandon the stream; the receiver sees it reset with
    /// [`StreamCode::Cancelled`].
    pub fn cancel(mut self) {
        let _ = self.stream.reset(StreamCode::Cancelled.varint());
    }
}

/// Receives whole messages from one data stream, in order.
#[derive(Debug)]
pub struct MessageReceiver {
    stream: RecvStream,
    buf: BytesMut,
    max: usize,
    _guard: Option<StreamGuard>,
}

fn read_error(e: io::Error) -> RecvError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ReadError>())
    {
        Some(ReadError::Reset(code)) => RecvError::Reset(*code),
        Some(other) => RecvError::Stream(other.to_string()),
        None => RecvError::Stream(e.to_string()),
    }
}

impl MessageReceiver {
    /// Receive qmesh messages (at most `max` bytes each) from any QUIC stream.
    pub fn new(stream: RecvStream, max: usize) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(COALESCE),
            max: max.min(MAX_MESSAGE_CEILING),
            _guard: None,
        }
    }

    pub(crate) fn with_guard(stream: RecvStream, max: usize, guard: StreamGuard) -> Self {
        let mut r = Self::new(stream, max);
        r._guard = Some(guard);
        r
    }

    /// The next whole message, or `None` when the sender finished the
    /// stream. A message longer than the maximum stops the stream with
    /// [`StreamCode::MessageTooLarge`] before anything is allocated for it.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, RecvError> {
        loop {
            let mut want = LENGTH_PREFIX;
            if let Some(prefix) = self.buf.first_chunk::<LENGTH_PREFIX>() {
                let len = match check_length(*prefix, self.max) {
                    Ok(len) => len,
                    Err(DecodeError::TooLarge { len, limit }) => {
                        let _ = self.stream.stop(StreamCode::MessageTooLarge.varint());
                        return Err(RecvError::TooLarge { len, max: limit });
                    }
                    Err(_) => return Err(RecvError::Truncated),
                };
                want = LENGTH_PREFIX + len;
                if self.buf.len() >= want {
                    self.buf.advance(LENGTH_PREFIX);
                    return Ok(Some(self.buf.split_to(len).freeze()));
                }
            }
            // Room for the rest of this message (bounded by `max`), and at
            // least a chunk's worth so small messages arrive in batches.
            let need = (want - self.buf.len()).max(COALESCE);
            self.buf.reserve(need);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(read_error)?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(RecvError::Truncated)
                };
            }
        }
    }

    /// Tell the sender to stop; its writes fail with `code`.
    pub fn stop(mut self, code: StreamCode) {
        let _ = self.stream.stop(code.varint());
    }
}
