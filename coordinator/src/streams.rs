//! First-frame dispatch: every stream a client opens goes to its handler.
//!
//! A bidirectional stream's first frame says what it is for: `Open` (a
//! channel, in `channel`), `Describe` or `Watch` (in `presence`), `Join`
//! or `Members` (in `broadcast`). A unidirectional stream is a data stream
//! for the `relay`.

use std::sync::Arc;

use qmesh_proto::codes::{ConnCode, StreamCode};
use qmesh_proto::msg::ChannelMsg;
use quinn::{RecvStream, SendStream};
use tokio::time::Instant;
use tracing::debug;

use crate::session::{Session, Shared};
use crate::wire::{code, msg_name, read_error_code, read_within, Read};

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
    match read_within::<ChannelMsg, _>(deadline, &mut recv).await {
        Read::TimedOut => {
            debug!("channel stream opened but no open sent in time");
            let _ = recv.stop(code(StreamCode::Cancelled));
        }
        Read::Frame(ChannelMsg::Open {
            peer,
            channel,
            path,
        }) => {
            crate::channel::handle_open(shared, session, (send, recv), (peer, channel, path)).await
        }
        Read::Frame(ChannelMsg::Describe { peer, channel }) => {
            crate::presence::describe(&shared, &session, send, &peer, &channel).await
        }
        Read::Frame(ChannelMsg::Watch { live }) => {
            crate::presence::watch(&shared, &session, send, recv, live).await
        }
        Read::Frame(ChannelMsg::Join { group }) => {
            crate::broadcast::join(&shared, &session, send, recv, group).await
        }
        Read::Frame(ChannelMsg::Members { group }) => {
            crate::broadcast::members(&shared, send, group).await
        }
        Read::Frame(other) => {
            let what = format!(
                "expected open, describe, watch, join or members on a new stream, got {}",
                msg_name(&other)
            );
            session.violation(ConnCode::UnexpectedMessage, &what);
        }
        Read::Finished => {}
        Read::Failed(e) => {
            if let Some(code) = read_error_code(&e) {
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
