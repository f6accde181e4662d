//! Broadcast groups: not built yet. Joins and member counts are refused
//! with a sentence that says so.

use std::sync::Arc;

use qmesh_proto::codes::OpenFailCode;
use quinn::{RecvStream, SendStream};

use crate::channel::fail;
use crate::server::{Session, Shared};

/// Serve a member's group stream.
pub(crate) async fn join(
    _shared: &Arc<Shared>,
    _session: &Arc<Session>,
    mut send: SendStream,
    _recv: RecvStream,
    group: String,
) {
    let msg = format!("cannot join group \"{group}\": broadcast is not built yet");
    fail(&mut send, OpenFailCode::Refused, msg).await;
}

/// Answer a member count query.
pub(crate) async fn members(_shared: &Arc<Shared>, mut send: SendStream, group: String) {
    let msg = format!("cannot count group \"{group}\": broadcast is not built yet");
    fail(&mut send, OpenFailCode::Refused, msg).await;
}
