//! First-frame dispatch: every stream a client opens goes to its handler.
//!
//! A bidirectional stream's first frame, a `StreamRequest`, says what it
//! is for: `Open` (a channel, in `channel`), `Describe` or `Watch` (in
//! `presence`), `Join` or `Members` (in `broadcast`), `Pipe` (in `relay`). A unidirectional stream is a data stream
//! for the `relay`.

use std::sync::Arc;

use qmesh_proto::codes::StreamCode;
use qmesh_proto::msg::StreamRequest;
use quinn::{RecvStream, SendStream};
use tokio::time::Instant;
use tracing::debug;

use crate::session::{Session, Shared};
use qmesh_proto::codec::{read_within_reserving, Read, ReadFrameError};

/// Handle a new bidirectional stream the client `session` opened: a
/// channel open, or one of the requests that use a stream of their own
/// (describe, presence, broadcast).
pub(crate) async fn bidi(
    shared: Arc<Shared>,
    session: Arc<Session>,
    send: SendStream,
    mut recv: RecvStream,
) {
    let deadline = Instant::now() + shared.config.hello_timeout;
    match read_within_reserving::<StreamRequest, _, _>(deadline, &mut recv, |len| {
        session.header_room(len)
    })
    .await
    {
        Read::Late => {
            debug!("channel stream opened but no open sent in time");
            let _ = recv.stop(StreamCode::Cancelled.varint());
        }
        Read::Frame(StreamRequest::Open(open)) => {
            crate::channel::handle_open(shared, session, (send, recv), open).await
        }
        Read::Frame(StreamRequest::Describe { peer, channel }) => {
            crate::presence::describe(&shared, &session, send, &peer, &channel).await
        }
        Read::Frame(StreamRequest::Watch { live }) => {
            crate::presence::watch(&shared, &session, send, recv, live).await
        }
        Read::Frame(StreamRequest::Join { group }) => {
            crate::broadcast::join(&shared, &session, send, recv, group).await
        }
        Read::Frame(StreamRequest::Members { group }) => {
            crate::broadcast::members(&shared, send, group).await
        }
        Read::Frame(StreamRequest::Pipe { channel }) => {
            crate::relay::relay_pipe(shared, session, (send, recv), channel).await
        }
        Read::Finished => {}
        Read::Failed(ReadFrameError::OverBudget { len }) => {
            let _ = recv.stop(StreamCode::TooManyStreams.varint());
            session.stream_violation(&format!(
                "a stream request of {len} bytes with the session's {} bytes of stream headers in flight",
                crate::limit::HEADER_BUDGET
            ));
        }
        Read::Failed(e) => {
            if let Some(code) = e.conn_code() {
                session.violation(code, &format!("bad channel open: {e}"));
            }
        }
    }
}

/// Handle a new unidirectional stream the client `session` opened: a data
/// stream for one of its channels.
pub(crate) async fn uni(shared: Arc<Shared>, session: Arc<Session>, recv: RecvStream) {
    crate::relay::relay_stream(shared, session, recv).await
}
