//! The client: one QUIC connection to the coordinator, one session on it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use qmesh_proto::codec::{write_frame, ReadFrameError};
use qmesh_proto::codes::{ConnCode, StreamCode};
use qmesh_proto::msg::{ClientSession, Failure, Open, OpenAnswer, PathMode, Ready, StreamRequest};
use qmesh_proto::{Address, Untrusted};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::{info, info_span, Instrument, Span};

use crate::channel::{Channel, IncomingChannel, Offer, Parts, PartsBox, Pending};
use crate::config::ClientConfig;
use crate::connect::{join, Joined};
use crate::direct::Direct;
use crate::end::describe_end;
use crate::error::{ConnectError, OpenError};
use crate::events::{self, ChannelRef, Event};
use crate::quota::Gate;
use crate::routes::Routes;
use qmesh_proto::codec::{read_within, Read};

/// A connected qmesh client. Cheap to clone; the session ends when the last
/// clone is dropped or [`Client::close`] is called.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    session: u64,
    observed: SocketAddr,
    coordinator: String,
    config: ClientConfig,
    endpoint: Endpoint,
    /// Whether `endpoint` was made for this client alone.
    owns_endpoint: bool,
    conn: Connection,
    /// Why this client closed its session, when it did (the coordinator
    /// went silent, or broke the protocol): what `closed` and the lost
    /// channels report instead of "closed locally".
    closed_why: Arc<OnceLock<String>>,
    routes: Routes,
    /// Direct connections, when this client takes direct channels.
    direct: Option<Arc<Direct>>,
    /// The fingerprint of this client's certificate.
    fingerprint: qmesh_certs::Fingerprint,
    incoming: tokio::sync::Mutex<mpsc::Receiver<IncomingChannel>>,
    /// Frames for the session stream (interface updates).
    session_tx: mpsc::Sender<ClientSession>,
    /// Runs the session stream: heartbeats, and the end of the session.
    session_task: JoinHandle<()>,
    /// Quotas on offered interfaces, by name.
    gates: HashMap<String, Arc<Gate>>,
    driver: JoinHandle<()>,
    span: Span,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.driver.abort();
        self.session_task.abort();
        if let Some(d) = &self.direct {
            d.close_all();
        }
        self.conn
            .close(ConnCode::Normal.varint(), b"client dropped");
        // An endpoint of this client's own: close it, or the direct accept
        // loop keeps it (its socket and buffers) alive after the client.
        if self.owns_endpoint {
            self.endpoint
                .close(ConnCode::Normal.varint(), b"client dropped");
        }
    }
}

impl Client {
    /// Connect to the coordinator and join under `config.name`, on a UDP
    /// socket of its own.
    pub async fn connect(config: ClientConfig) -> Result<Client, ConnectError> {
        Self::connect_on(None, config).await
    }

    /// Queue a frame for the session stream.
    pub(crate) async fn session_send(&self, msg: ClientSession) -> Result<(), ()> {
        self.inner.session_tx.send(msg).await.map_err(|_| ())
    }

    /// Connect as [`Client::connect`] does, over `endpoint` when given, so
    /// that many clients in one process can share a few UDP sockets.
    pub async fn connect_on(
        endpoint: Option<&Endpoint>,
        config: ClientConfig,
    ) -> Result<Client, ConnectError> {
        let span = info_span!("client", id = %config.name);
        let secs = config.connect_timeout.as_secs();
        let coord_text = config.coordinator.to_string();
        let endpoint = endpoint.cloned();
        let events = config.events.clone();
        let name = config.name.clone();
        let outcome = match timeout(
            config.connect_timeout,
            Self::connect_inner(endpoint, config, span.clone()),
        )
        .instrument(span)
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout {
                addr: coord_text,
                secs,
            }),
        };
        events::emit(&events, || match &outcome {
            Ok(c) => Event::Connected {
                name,
                session: c.session_id(),
            },
            Err(e) => Event::ConnectError {
                name,
                message: e.to_string(),
            },
        });
        outcome
    }

    async fn connect_inner(
        endpoint: Option<Endpoint>,
        config: ClientConfig,
        span: Span,
    ) -> Result<Client, ConnectError> {
        let Joined {
            session,
            observed,
            coordinator,
            endpoint,
            owns_endpoint,
            conn,
            closed_why,
            routes,
            direct,
            fingerprint,
            incoming,
            session_tx,
            session_task,
            driver,
        } = join(endpoint, &config, &span).await?;
        let gates = config
            .quotas
            .iter()
            .map(|(name, q)| (name.clone(), Gate::new(name, *q)))
            .collect();
        Ok(Client {
            inner: Arc::new(Inner {
                name: config.name.clone(),
                session,
                observed,
                coordinator,
                config,
                endpoint,
                owns_endpoint,
                conn,
                closed_why,
                routes,
                direct,
                fingerprint,
                incoming: tokio::sync::Mutex::new(incoming),
                session_tx,
                session_task,
                gates,
                driver,
                span,
            }),
        })
    }

    /// This client's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The session number the coordinator assigned.
    pub fn session_id(&self) -> u64 {
        self.inner.session
    }

    /// This client's address as the coordinator sees it.
    pub fn observed_addr(&self) -> SocketAddr {
        self.inner.observed
    }

    /// The peers this client has a direct connection to, with their
    /// addresses; `changed()` on the receiver fires as links come and go.
    /// Always empty for a client that does not take direct channels.
    pub fn direct_links(&self) -> watch::Receiver<BTreeMap<String, SocketAddr>> {
        match &self.inner.direct {
            Some(d) => d.links(),
            None => watch::Sender::new(BTreeMap::new()).subscribe(),
        }
    }

    /// Close the direct connection to `peer`. Its `auto` channels carry on
    /// through the relay (their path events fire); its direct-only channels
    /// are lost. Returns whether there was one.
    pub fn drop_direct(&self, peer: &str) -> bool {
        self.inner
            .direct
            .as_ref()
            .is_some_and(|d| d.drop_link(peer))
    }

    /// The fingerprint of the certificate this client presents: what the
    /// coordinator vouches for when it introduces this client to peers.
    pub fn fingerprint(&self) -> qmesh_certs::Fingerprint {
        self.inner.fingerprint
    }

    /// Whether this client takes direct channels (it has its own endpoint
    /// and direct channels are enabled).
    pub fn takes_direct(&self) -> bool {
        self.inner.direct.is_some()
    }

    fn parts(&self, peer: String, name: String, label: String, mode: PathMode) -> Parts {
        let c = &self.inner.config;
        Parts {
            conn: self.inner.conn.clone(),
            closed_why: self.inner.closed_why.clone(),
            routes: self.inner.routes.clone(),
            peer,
            name,
            label,
            max_message: self.inner.config.max_message,
            close_timeout: self.inner.config.close_timeout,
            max_streams: self.inner.config.tuning.stream_ceiling as usize,
            direct: self.inner.direct.clone(),
            mode,
            events: c.events.clone(),
            request_timeout: c.request_timeout,
            max_requests: c.max_requests.max(1),
            message_backlog: c.message_backlog,
            quota: None,
            defer_ready: false,
        }
    }

    /// Open a bidirectional stream to the coordinator and write `first`
    /// on it: the start of a describe, presence, join or member count.
    pub(crate) async fn request_stream(
        &self,
        first: &StreamRequest,
    ) -> Result<(SendStream, RecvStream), OpenError> {
        let (mut send, recv) = self
            .inner
            .conn
            .open_bi()
            .await
            .map_err(|_| OpenError::Session(self.session_error()))?;
        write_frame(&mut send, first)
            .await
            .map_err(|_| OpenError::Session(self.session_error()))?;
        Ok((send, recv))
    }

    /// The coordinator's next answer on a stream from
    /// [`Client::request_stream`], within the open timeout. A frame that
    /// is not a `T` is a protocol error.
    pub(crate) async fn next_answer<T: DeserializeOwned>(
        &self,
        recv: &mut RecvStream,
    ) -> Result<T, OpenError> {
        let limit = self.inner.config.open_timeout;
        match read_within(tokio::time::Instant::now() + limit, recv).await {
            Read::Frame(answer) => Ok(answer),
            Read::Failed(ReadFrameError::Decode(e)) => Err(OpenError::Protocol(e.to_string())),
            Read::Finished | Read::Failed(_) => Err(OpenError::Session(self.session_error())),
            Read::Late => Err(OpenError::Timeout {
                secs: limit.as_secs(),
            }),
        }
    }

    pub(crate) fn session_error(&self) -> String {
        match self.inner.conn.close_reason() {
            Some(c) => describe_end(&c, &self.inner.closed_why),
            None => "the session is closing".into(),
        }
    }

    /// Open channel `mesh/peer!channel` with path [`PathMode::Auto`] and
    /// wait until the peer accepts.
    ///
    /// Fails at once with [`PeerNotPresent`](qmesh_proto::codes::OpenFailCode::PeerNotPresent) when no client
    /// of that name is connected, and with [`Refused`](qmesh_proto::codes::OpenFailCode::Refused) and the
    /// peer's reason when it refuses.
    pub async fn open(&self, address: &Address) -> Result<Channel, OpenError> {
        self.open_with(address, PathMode::Auto).await
    }

    /// Open a channel on the path `mode` asks for:
    ///
    /// - [`PathMode::Auto`]: ready as soon as the peer accepts, relayed;
    ///   data moves to a direct path once one is up
    ///   ([`Channel::watch_path`] reports it).
    /// - [`PathMode::Direct`]: ready only once the direct path is up; fails
    ///   with [`OpenError::DirectUnavailable`] (and closes the channel) when
    ///   none comes up within [`crate::config::DirectConfig::timeout`].
    /// - [`PathMode::Relay`]: always through the coordinator.
    pub async fn open_with(&self, address: &Address, mode: PathMode) -> Result<Channel, OpenError> {
        let outcome = self.open_inner(address, mode).await;
        match &outcome {
            Ok(ch) => ch.report_ready(),
            Err(e) => {
                let (peer, name) = address
                    .mesh()
                    .map(|(p, c)| (p.to_owned(), c.to_owned()))
                    .unwrap_or_else(|_| (String::new(), address.to_string()));
                let channel = ChannelRef {
                    label: format!("{}>{}!{}", self.inner.name, peer, name),
                    peer,
                    name,
                };
                events::emit(&self.inner.config.events, || Event::OpenError {
                    channel,
                    message: e.to_string(),
                });
            }
        }
        outcome
    }

    async fn open_inner(&self, address: &Address, mode: PathMode) -> Result<Channel, OpenError> {
        let (peer, channel) = address.mesh()?;
        let label = format!("{}>{}!{}", self.inner.name, peer, channel);
        let span = info_span!(parent: &self.inner.span, "channel", id = %label);
        async {
            let (mut send, mut recv) = self
                .inner
                .conn
                .open_bi()
                .await
                .map_err(|_| OpenError::Session(self.session_error()))?;
            let mut parts = self.parts(peer.to_owned(), channel.to_owned(), label.clone(), mode);
            // Ready is reported once open returns it.
            parts.defer_ready = true;
            let pending = Pending::register(parts, &send);
            let open = StreamRequest::Open(Open {
                peer: peer.into(),
                channel: channel.into(),
                path: mode,
            });
            if write_frame(&mut send, &open).await.is_err() {
                pending.abandon();
                return Err(OpenError::Session(self.session_error()));
            }
            let secs = self.inner.config.open_timeout.as_secs();
            match read_within(
                tokio::time::Instant::now() + self.inner.config.open_timeout,
                &mut recv,
            )
            .await
            {
                Read::Frame(OpenAnswer::Ready(Ready {
                    channel: number,
                    peer: intro,
                    interface,
                })) => {
                    let offer = Offer {
                        interface,
                        offerer: false,
                    };
                    let ch = pending.ready((send, recv), None, number, intro, offer);
                    if mode != PathMode::Direct {
                        return Ok(ch);
                    }
                    let limit = self.inner.config.direct.timeout;
                    match ch.wait_direct(limit).await {
                        Ok(()) => Ok(ch),
                        Err(reason) => {
                            info!(cause = %Untrusted::reason(&reason), "direct-only channel without a direct path");
                            let _ = timeout(
                                self.inner.config.close_timeout,
                                ch.close(&format!("no direct path: {reason}")),
                            )
                            .await;
                            Err(OpenError::DirectUnavailable {
                                peer: peer.to_owned(),
                                reason,
                            })
                        }
                    }
                }
                Read::Frame(OpenAnswer::Failed(Failure { code, message })) => {
                    pending.abandon();
                    info!(code = ?code, cause = %Untrusted::reason(&message), "open failed");
                    Err(OpenError::Failed { code, message })
                }
                Read::Failed(ReadFrameError::Decode(e)) => {
                    pending.abandon();
                    Err(OpenError::Protocol(e.to_string()))
                }
                Read::Finished | Read::Failed(_) => {
                    pending.abandon();
                    Err(OpenError::Session(self.session_error()))
                }
                Read::Late => {
                    pending.abandon();
                    let _ = send.reset(StreamCode::Cancelled.varint());
                    Err(OpenError::Timeout { secs })
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Open a channel by address text, e.g. `"mesh/bob!chat"`.
    pub async fn open_str(&self, address: &str) -> Result<Channel, OpenError> {
        let address: Address = address.parse()?;
        self.open(&address).await
    }

    /// The next channel a peer wants to open with this client, or `None`
    /// once the session has ended.
    ///
    /// An offer for an interface at its channel quota is refused here, with
    /// a reason that says so, and not returned.
    pub async fn accept(&self) -> Option<IncomingChannel> {
        let mut incoming = self.inner.incoming.lock().await;
        loop {
            let mut offer = incoming.recv().await?;
            let quota = match self.inner.gates.get(&offer.channel) {
                Some(gate) => match gate.take_channel() {
                    Ok(slot) => Some(slot),
                    Err(why) => {
                        info!(parent: &self.inner.span, from = %Untrusted::name(&offer.from), cause = %why, "refusing a channel over quota");
                        offer.refuse(&why).await;
                        continue;
                    }
                },
                None => None,
            };
            // The label names the channel's span in log lines: the names
            // the coordinator sent are shown escaped.
            let label = format!(
                "{}>{}!{}",
                Untrusted::name(&offer.from),
                self.inner.name,
                Untrusted::name(&offer.channel)
            );
            let mut parts =
                self.parts(offer.from.clone(), offer.channel.clone(), label, offer.mode);
            parts.quota = quota;
            offer.parts = Some(PartsBox(parts));
            return Some(offer);
        }
    }

    /// Leave: close the connection with a normal code and `reason`. On an
    /// endpoint of its own, also wait (up to 2 s) until the close has been
    /// sent; a shared endpoint is its owner's to drain.
    pub async fn close(&self, reason: &str) {
        info!(parent: &self.inner.span, reason, "leaving");
        if let Some(d) = &self.inner.direct {
            d.close_all();
        }
        self.inner
            .conn
            .close(ConnCode::Normal.varint(), reason.as_bytes());
        if self.inner.owns_endpoint {
            let _ = timeout(
                std::time::Duration::from_secs(2),
                self.inner.endpoint.wait_idle(),
            )
            .await;
        }
    }

    /// Wait until the session ends and say why.
    pub async fn closed(&self) -> String {
        describe_end(&self.inner.conn.closed().await, &self.inner.closed_why)
    }

    /// The coordinator address this client connected to.
    pub fn coordinator(&self) -> &str {
        &self.inner.coordinator
    }
}
