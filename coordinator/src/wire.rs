//! The `Failed` answer that ends a refused request. Nothing here knows
//! about sessions or handlers, so every other module may import it.
//! (Reading a frame within a deadline, and a code as a QUIC varint, are
//! `qmesh_proto::codec::read_within` and `ConnCode::varint`.)

use qmesh_proto::codec::write_frame;
use qmesh_proto::codes::OpenFailCode;
use qmesh_proto::limits::clip_reason;
use qmesh_proto::msg::Failure;
use qmesh_proto::Untrusted;
use quinn::SendStream;
use serde::Serialize;
use tracing::info;

/// Tell the client its request (open, describe, join, …) failed, and finish
/// the stream. `answer` is the `Failed` variant of the request's answer
/// type, e.g. `OpenAnswer::Failed`.
pub(crate) async fn fail<A: Serialize>(
    send: &mut SendStream,
    answer: impl FnOnce(Failure) -> A,
    code: OpenFailCode,
    message: String,
) {
    info!(code = ?code, cause = %Untrusted::reason(&message), "open failed");
    let msg = answer(Failure {
        code,
        message: clip_reason(&message),
    });
    if write_frame(send, &msg).await.is_ok() {
        let _ = send.finish();
    }
}
