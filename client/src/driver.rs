//! The session driver: the tasks that serve one session with the
//! coordinator once it is joined — accepting channel offers and data
//! streams, and running the session stream (heartbeats, interface updates).

use std::sync::{Arc, OnceLock};

use qmesh_certs::transport::{StreamAllowance, StreamGuard, StreamKind};
use qmesh_proto::codec::write_frame;
use qmesh_proto::codes::{ConnCode, StreamCode};
use qmesh_proto::heartbeat::{Heartbeat, StreamEnd};
use qmesh_proto::msg::{
    Arrival, ClientSession, CoordinatorSession, Incoming, IncomingAnswer, StreamHeader,
};
use qmesh_proto::Untrusted;
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tracing::{debug, info, warn, Instrument};

use crate::channel::IncomingChannel;
use crate::config::ClientConfig;
use crate::end::Path;
use crate::pipe::Pipe;
use crate::routes::Routes;
use crate::sync::lock;
use qmesh_proto::codec::{read_within, Read};

/// Accept what the coordinator opens towards this client: channel offers
/// (bidirectional) and data streams (unidirectional).
///
/// Offers carry `generation`, the client's number for this session, so
/// that an offer left from a lost session is not taken for the current one.
pub(crate) async fn drive(
    conn: Connection,
    generation: u64,
    routes: Routes,
    incoming: mpsc::Sender<IncomingChannel>,
    config: ClientConfig,
) {
    let t = &config.tuning;
    let bi_allowance = StreamAllowance::new(
        conn.clone(),
        StreamKind::Bi,
        t.max_bidi_streams,
        t.stream_ceiling,
    );
    let uni_allowance = StreamAllowance::new(
        conn.clone(),
        StreamKind::Uni,
        t.max_uni_streams,
        t.stream_ceiling,
    );
    loop {
        tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    // Channel control streams live as long as their channel;
                    // the guard travels with the offer into the channel.
                    let guard = bi_allowance.opened();
                    tokio::spawn(arrival(send, recv, generation, incoming.clone(), routes.clone(), config.clone(), guard).in_current_span());
                }
                Err(e) => {
                    info!(reason = %Untrusted::reason(qmesh_certs::transport::describe_close(&e)), "session ended");
                    break;
                }
            },
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    let guard = uni_allowance.opened();
                    tokio::spawn(route(recv, routes.clone(), config.connect_timeout, guard).in_current_span());
                }
                Err(_) => break,
            },
        }
    }
}

/// Read what a stream the coordinator opened is for: a channel offer
/// (queued for `accept`) or a pipe on one of this client's channels.
async fn arrival(
    mut send: SendStream,
    mut recv: RecvStream,
    generation: u64,
    incoming: mpsc::Sender<IncomingChannel>,
    routes: Routes,
    config: ClientConfig,
    guard: StreamGuard,
) {
    let first = read_within::<Arrival, _>(
        tokio::time::Instant::now() + config.connect_timeout,
        &mut recv,
    )
    .await;
    let (from, channel, mode) = match first {
        Read::Frame(Arrival::Channel(Incoming {
            from,
            channel,
            path,
        })) => (from.into_string(), channel.into_string(), path),
        Read::Frame(Arrival::Pipe { channel }) => {
            let route = lock(&routes).get(&channel).cloned();
            let pipe = Pipe::new(send, recv, Path::Relay, None, Some(guard));
            let refused = match route {
                Some(route) => route.deliver_pipe(pipe).await.err(),
                None => Some(pipe),
            };
            if let Some(mut pipe) = refused {
                debug!(%channel, "pipe for a channel that is gone");
                let (send, recv) = pipe.halves();
                let _ = send.reset(StreamCode::ChannelEnded.varint());
                let _ = recv.stop(StreamCode::ChannelEnded.varint());
            }
            return;
        }
        other => {
            warn!(got = %Untrusted::reason(format_args!("{other:?}")), "bad channel offer from the coordinator");
            let _ = send.reset(StreamCode::Malformed.varint());
            return;
        }
    };
    debug!(from = %Untrusted::name(&from), channel = %Untrusted::name(&channel), "channel offered");
    let offer = IncomingChannel {
        generation,
        from,
        channel,
        mode,
        streams: Some((send, recv)),
        parts: None,
        open_timeout: config.open_timeout,
        guard: Some(guard),
    };
    // A full backlog waits for room (the opener is waiting for an answer
    // anyway, and QUIC's stream limit bounds how many offers can wait);
    // past the open timeout the offer is refused as busy.
    let mut offer = match timeout(config.open_timeout, incoming.reserve()).await {
        Ok(Ok(permit)) => {
            permit.send(offer);
            return;
        }
        Ok(Err(_)) => return,
        Err(_) => offer,
    };
    if let Some((mut send, _recv)) = offer.streams.take() {
        let refuse = IncomingAnswer::Refuse {
            reason: "busy: nobody is accepting channels".into(),
        };
        if write_frame(&mut send, &refuse).await.is_ok() {
            let _ = send.finish();
        }
    }
}

/// Hand a data stream to its channel.
async fn route(
    mut recv: RecvStream,
    routes: Routes,
    header_timeout: std::time::Duration,
    guard: StreamGuard,
) {
    let (channel, messages) =
        match read_within(tokio::time::Instant::now() + header_timeout, &mut recv).await {
            Read::Frame(StreamHeader::Data { channel }) => (channel, false),
            Read::Frame(StreamHeader::Messages { channel }) => (channel, true),
            _ => {
                let _ = recv.stop(StreamCode::Malformed.varint());
                return;
            }
        };
    let tx = lock(&routes).get(&channel).cloned();
    let Some(tx) = tx else {
        debug!(%channel, "data stream for a channel that is gone");
        let _ = recv.stop(StreamCode::ChannelEnded.varint());
        return;
    };
    if let Err(mut recv) = tx.deliver(messages, (recv, guard)).await {
        let _ = recv.stop(StreamCode::ChannelEnded.varint());
    }
}

/// Run the session stream until it ends: heartbeats both ways, this
/// client's interface updates, and the coordinator's going-away notice
/// (into `going_away`). A silent coordinator closes the connection
/// with [`ConnCode::HeartbeatMissed`], so every channel ends as lost; the
/// reason goes to `closed_why` first.
pub(crate) async fn run_session_stream(
    conn: Connection,
    closed_why: Arc<OnceLock<String>>,
    send: SendStream,
    recv: RecvStream,
    heartbeat: Heartbeat,
    outgoing: mpsc::Receiver<ClientSession>,
    going_away: tokio::sync::watch::Sender<Option<std::time::Duration>>,
) {
    // After the welcome the coordinator sends pings and pongs, which
    // `drive` answers itself, and at most one going-away notice.
    // Beats also go as datagrams after an interval of silence, and flow
    // control never holds those back.
    let pulse = Arc::new(qmesh_proto::heartbeat::Pulse::default());
    tokio::spawn(
        qmesh_certs::transport::pulse(conn.clone(), heartbeat.interval, pulse.clone())
            .in_current_span(),
    );
    let end = qmesh_proto::heartbeat::drive(
        recv,
        send,
        heartbeat,
        Some(outgoing),
        None,
        Some(&pulse),
        |msg: CoordinatorSession| {
            if let CoordinatorSession::GoingAway { drain_ms } = msg {
                let within = std::time::Duration::from_millis(drain_ms);
                info!(drain_ms, "the coordinator is going away");
                going_away.send_replace(Some(within));
            }
            Ok(())
        },
    )
    .await;
    if conn.close_reason().is_some() {
        // The session is already over (this client left, or the
        // connection ended): nothing to add.
        return;
    }
    let (code, why) = match end {
        StreamEnd::Silent { .. } | StreamEnd::Unanswered { .. } => {
            let why = format!("the coordinator is silent: {end}");
            warn!(cause = %why, "closing the session");
            (ConnCode::HeartbeatMissed, why)
        }
        StreamEnd::Finished => (
            ConnCode::Normal,
            "the coordinator finished the session stream".to_owned(),
        ),
        StreamEnd::Violation(what) => {
            warn!(cause = %what, "closing the session");
            (ConnCode::UnexpectedMessage, what)
        }
        StreamEnd::Failed(_) | StreamEnd::Stopped => return,
    };
    let _ = closed_why.set(why.clone());
    conn.close(code.varint(), why.as_bytes());
}
