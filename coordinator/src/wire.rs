//! Helpers every stream handler shares on the wire.
//!
//! Close and stream codes as QUIC [`VarInt`]s, reading one frame within a
//! deadline, the close code for a frame that could not be read, and the
//! `Failed` answer that ends a refused request. Nothing here knows about
//! sessions or handlers, so every other module may import it.

use qmesh_proto::codec::{read_frame, write_frame, DecodeError, ReadFrameError};
use qmesh_proto::codes::{ConnCode, OpenFailCode, StreamCode};
use qmesh_proto::limits::clip_reason;
use qmesh_proto::msg::Failure;
use quinn::{SendStream, VarInt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncRead;
use tokio::time::Instant;
use tracing::info;

/// A code that travels in a QUIC close or stream reset.
pub(crate) trait WireCode: Copy {
    /// The code's number on the wire.
    fn number(self) -> u32;
}

impl WireCode for ConnCode {
    fn number(self) -> u32 {
        self.code()
    }
}

impl WireCode for StreamCode {
    fn number(self) -> u32 {
        self.code()
    }
}

/// `c` as the [`VarInt`] quinn takes for a close, reset or stop.
pub(crate) fn code(c: impl WireCode) -> VarInt {
    VarInt::from_u32(c.number())
}

/// What reading one frame within a deadline gave.
#[derive(Debug)]
pub(crate) enum Read<T> {
    /// A whole frame.
    Frame(T),
    /// The stream ended cleanly before a frame began.
    Finished,
    /// The stream failed or carried a bad frame.
    Failed(ReadFrameError),
    /// The deadline passed first.
    TimedOut,
}

/// Read one frame from `recv`, giving up at `deadline`.
pub(crate) async fn read_within<T, R>(deadline: Instant, recv: &mut R) -> Read<T>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    match tokio::time::timeout_at(deadline, read_frame::<T, R>(recv)).await {
        Ok(Ok(Some(frame))) => Read::Frame(frame),
        Ok(Ok(None)) => Read::Finished,
        Ok(Err(e)) => Read::Failed(e),
        Err(_) => Read::TimedOut,
    }
}

/// The close code for a frame that could not be read: `None` when the
/// stream itself failed (nobody broke the protocol).
pub(crate) fn read_error_code(err: &ReadFrameError) -> Option<ConnCode> {
    match err {
        ReadFrameError::Decode(DecodeError::TooLarge { .. }) => Some(ConnCode::FrameTooLarge),
        ReadFrameError::Decode(_) | ReadFrameError::Truncated => Some(ConnCode::Malformed),
        ReadFrameError::Io(_) => None,
    }
}

/// Tell the client its request (open, describe, join, …) failed, and finish
/// the stream. `answer` is the `Failed` variant of the request's answer
/// type, e.g. `OpenAnswer::Failed`.
pub(crate) async fn fail<A: Serialize>(
    send: &mut SendStream,
    answer: impl FnOnce(Failure) -> A,
    code: OpenFailCode,
    message: String,
) {
    info!(code = ?code, cause = %message, "open failed");
    let msg = answer(Failure {
        code,
        message: clip_reason(&message),
    });
    if write_frame(send, &msg).await.is_ok() {
        let _ = send.finish();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use qmesh_proto::msg::IncomingAnswer;

    use super::*;

    #[test]
    fn codes_keep_their_wire_numbers() {
        assert_eq!(
            code(ConnCode::Revoked).into_inner(),
            u64::from(ConnCode::Revoked.code())
        );
        assert_eq!(
            code(StreamCode::TooManyStreams).into_inner(),
            u64::from(StreamCode::TooManyStreams.code())
        );
    }

    #[test]
    fn a_frame_too_large_and_a_malformed_one_close_with_different_codes() {
        let big = ReadFrameError::Decode(DecodeError::TooLarge { len: 9, limit: 1 });
        assert_eq!(read_error_code(&big), Some(ConnCode::FrameTooLarge));
        assert_eq!(
            read_error_code(&ReadFrameError::Truncated),
            Some(ConnCode::Malformed)
        );
        let io = ReadFrameError::Io(std::io::Error::other("reset"));
        assert_eq!(read_error_code(&io), None);
    }

    #[tokio::test(start_paused = true)]
    async fn reading_within_a_deadline_tells_frame_end_failure_and_timeout_apart() {
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        let frame = qmesh_proto::codec::encode_frame(&IncomingAnswer::Accept).unwrap();
        let mut bytes: &[u8] = &frame;
        assert!(matches!(
            read_within::<IncomingAnswer, _>(deadline, &mut bytes).await,
            Read::Frame(IncomingAnswer::Accept)
        ));
        assert!(matches!(
            read_within::<IncomingAnswer, _>(deadline, &mut bytes).await,
            Read::Finished
        ));
        let mut cut: &[u8] = &frame[..frame.len() - 1];
        assert!(matches!(
            read_within::<IncomingAnswer, _>(deadline, &mut cut).await,
            Read::Failed(ReadFrameError::Truncated)
        ));
        let (_keep, mut silent) = tokio::io::duplex(64);
        assert!(matches!(
            read_within::<IncomingAnswer, _>(deadline, &mut silent).await,
            Read::TimedOut
        ));
    }
}
