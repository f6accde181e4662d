//! Small wire helpers: a close code as the QUIC varint that carries it,
//! and reading one frame within a deadline.

use std::time::Duration;

use qmesh_proto::codec::{read_frame, ReadFrameError};
use qmesh_proto::codes::{ConnCode, StreamCode};
use quinn::VarInt;
use serde::de::DeserializeOwned;
use tokio::io::AsyncRead;
use tokio::time::timeout;

/// A qmesh close code as the QUIC application error code that carries it.
pub(crate) trait ToVarInt {
    /// The code as a QUIC varint.
    fn varint(self) -> VarInt;
}

impl ToVarInt for StreamCode {
    fn varint(self) -> VarInt {
        VarInt::from_u32(self.code())
    }
}

impl ToVarInt for ConnCode {
    fn varint(self) -> VarInt {
        VarInt::from_u32(self.code())
    }
}

/// What reading one frame within a deadline gave.
#[derive(Debug)]
pub(crate) enum Read<T> {
    /// A frame.
    Frame(T),
    /// The stream finished before a frame.
    Finished,
    /// The read failed: the stream or connection broke, or the bytes are
    /// not a frame.
    Failed(ReadFrameError),
    /// No frame within the deadline.
    Late,
}

/// Read one frame from `recv`, waiting at most `limit`.
pub(crate) async fn read_within<T, R>(limit: Duration, recv: &mut R) -> Read<T>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    match timeout(limit, read_frame::<T, R>(recv)).await {
        Ok(Ok(Some(frame))) => Read::Frame(frame),
        Ok(Ok(None)) => Read::Finished,
        Ok(Err(e)) => Read::Failed(e),
        Err(_) => Read::Late,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_frame_a_finish_bad_bytes_and_silence_each_read_as_themselves() {
        let limit = Duration::from_secs(5);
        let (mut a, mut b) = tokio::io::duplex(64);
        qmesh_proto::codec::write_frame(&mut a, &7u32)
            .await
            .expect("write");
        assert!(matches!(
            read_within::<u32, _>(limit, &mut b).await,
            Read::Frame(7)
        ));
        // Nothing more is written: the deadline passes on the paused clock.
        assert!(matches!(
            read_within::<u32, _>(limit, &mut b).await,
            Read::Late
        ));
        tokio::io::AsyncWriteExt::write_all(&mut a, &[0xff; 8])
            .await
            .expect("write");
        assert!(matches!(
            read_within::<u32, _>(limit, &mut b).await,
            Read::Failed(_)
        ));
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(matches!(
            read_within::<u32, _>(limit, &mut b).await,
            Read::Finished
        ));
    }

    #[test]
    fn codes_keep_their_numbers() {
        assert_eq!(
            StreamCode::Cancelled.varint().into_inner(),
            u64::from(StreamCode::Cancelled.code())
        );
        assert_eq!(ConnCode::Normal.varint().into_inner(), 0);
    }
}
