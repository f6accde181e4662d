//! The async `read_frame` reading frames from a stream until its end or the
//! first error, as the coordinator reads its control streams.
//!
//! Input layout: byte 0 is a control byte, the rest is the stream.
//! - bits 0-1: message type, as the coordinator reads them: 0 `Greeting`
//!   (first frame of a session), 1 `StreamRequest` (first frame of a client
//!   stream), 2 `StreamHeader`, 3 `ClientSession` (session frames after the
//!   hello);
//! - bits 2-4: 0 reads from a plain `&[u8]`; 1-7 hands out at most that many
//!   bytes per read, as a network stream may;
//! - bit 5: every other read first answers `Pending` (and wakes itself);
//! - bit 6: the stream ends with an I/O error instead of a clean end.
//!
//! Checks: no panic, and no single allocation made while reading is larger
//! than the frame limit `MAX_CONTROL_FRAME` (the codec documents that a
//! length on the wire, of a frame or inside one, cannot make it allocate
//! more than a whole frame may hold). The allocation bound can be raised
//! with the environment variable `QMESH_FUZZ_ALLOC_LIMIT` (bytes), to keep
//! fuzzing past a known finding.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use qmesh_fuzz::check_allocation;
use qmesh_proto::codec::read_frame;
use qmesh_proto::limits::MAX_CONTROL_FRAME;
use qmesh_proto::msg::{ClientSession, Greeting, StreamHeader, StreamRequest};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, ReadBuf};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("current-thread runtime")
    })
}

fn alloc_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("QMESH_FUZZ_ALLOC_LIMIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MAX_CONTROL_FRAME)
    })
}

/// A stream that hands out its bytes in small pieces, may answer
/// `Pending` before each piece, and may end with an error.
struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
    pending: bool,
    pend_next: bool,
    fail_at_end: bool,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending {
            this.pend_next = !this.pend_next;
            if this.pend_next {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        if this.data.is_empty() && this.fail_at_end {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "stream reset",
            )));
        }
        let n = this.chunk.min(this.data.len()).min(buf.remaining());
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(()))
    }
}

/// Read frames of type `T` until the stream ends or an error.
async fn read_all<T: DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R) {
    // Each frame consumes at least 4 bytes, so this ends; the bound is a
    // guard against a reader that would loop on an empty stream.
    for _ in 0..=1 << 20 {
        match read_frame::<T, R>(r).await {
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return,
        }
    }
    panic!("read_frame kept returning frames");
}

async fn read_stream<T: DeserializeOwned>(control: u8, data: &[u8]) {
    let chunk = usize::from((control >> 2) & 7);
    if chunk == 0 && control & 0x60 == 0 {
        let mut plain: &[u8] = data;
        read_all::<T, _>(&mut plain).await;
    } else {
        let mut trickle = Trickle {
            data,
            chunk: if chunk == 0 { usize::MAX } else { chunk },
            pending: control & 0x20 != 0,
            pend_next: false,
            fail_at_end: control & 0x40 != 0,
        };
        read_all::<T, _>(&mut trickle).await;
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&control, data)) = input.split_first() else {
        return;
    };
    let rt = runtime();
    let limit = alloc_limit();
    check_allocation(
        "read_frame",
        limit,
        format_args!(
            "MAX_CONTROL_FRAME is {MAX_CONTROL_FRAME}; QMESH_FUZZ_ALLOC_LIMIT overrides it"
        ),
        || match control & 3 {
            0 => rt.block_on(read_stream::<Greeting>(control, data)),
            1 => rt.block_on(read_stream::<StreamRequest>(control, data)),
            2 => rt.block_on(read_stream::<StreamHeader>(control, data)),
            _ => rt.block_on(read_stream::<ClientSession>(control, data)),
        },
    );
});
