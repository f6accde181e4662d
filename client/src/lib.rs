//! qmesh-client: the qmesh client library, the product's main surface.
//!
//! A client connects to a coordinator under a unique name, opens named
//! channels to other clients (`mesh/bob!chat`), accepts the channels others
//! open to it, and sends whole messages over data streams on those
//! channels. Every channel ends exactly once: closed (with the closer's
//! reason) or lost.
//!
//! ```
//! use qmesh_client::{Client, ClientConfig};
//! use qmesh_coordinator::{Config, Coordinator};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! // A coordinator on loopback with a fresh CA (a deployment uses
//! // `qmesh-coordinator certs` and `qmesh-coordinator run`).
//! let ca = qmesh_certs::Ca::generate("example CA")?;
//! let mut config = Config::new(ca.issue_server(&["localhost".into()])?);
//! config.listen = "127.0.0.1:0".parse()?;
//! let coordinator = Coordinator::bind(config)?.spawn();
//! let addr = format!("quic/localhost:{}", coordinator.local_addr().port()).parse()?;
//! let trust = qmesh_certs::Trust::Ca { certs: vec![ca.cert_der().clone()], source: "example CA".into() };
//!
//! let alice = Client::connect(ClientConfig::new(addr, "alice", trust.clone())).await?;
//! let bob = Client::connect(ClientConfig::new(alice_addr(&alice)?, "bob", trust)).await?;
//!
//! // `open` waits until bob answers, so bob answers concurrently.
//! let (opened, accepted) = tokio::join!(alice.open_str("mesh/bob!chat"), async {
//!     let offer = bob.accept().await.expect("an offer");
//!     assert_eq!((offer.peer(), offer.channel()), ("alice", "chat"));
//!     offer.accept().await
//! });
//! let to_bob = opened?;
//! let from_alice = accepted?;
//!
//! let mut out = to_bob.open_stream().await?;
//! out.send(b"hello bob").await?;
//! out.finish().await?;
//! let mut inbox = from_alice.accept_stream().await?.expect("a stream");
//! assert_eq!(&inbox.recv().await?.expect("a message")[..], b"hello bob");
//!
//! to_bob.close("done").await?;
//! println!("bob's side: {}", from_alice.ended().await);
//! # coordinator.shutdown().await;
//! # Ok(()) }
//! # fn alice_addr(c: &Client) -> anyhow::Result<qmesh_proto::Address> { Ok(c.coordinator().parse()?) }
//! ```
//!
//! # Layout
//!
//! From the top down; each module imports only modules below it.
//!
//! - [`agent_config`]: the `qmesh up` agent's routes file, checked; reload diffs.
//! - [`broadcast`]: [`Group`]: broadcast groups relayed by the coordinator.
//! - [`presence`]: manifests, who is online, and changes.
//! - `enroll`: enrolling with a token, and certificate renewal times.
//! - [`client`]: [`Client`]: connect, open, accept, leave; reconnects a
//!   lost session.
//! - `reconnect`: [`Reconnect`]: when to try again after a lost session,
//!   and how long to wait.
//! - `connect`: resolving (each address a name resolves to is a
//!   coordinator to try), the QUIC handshake and the hello; starts the
//!   session's tasks.
//! - `driver`: the session's tasks: channel offers, incoming streams, the
//!   session stream.
//! - [`channel`]: [`Channel`], [`IncomingChannel`]: a channel's streams,
//!   messages and close, driven through its state.
//! - `direct`: direct connections to peers and their hole punching.
//! - `routes`: where incoming streams go, by channel.
//! - [`messages`]: one-way messages, requests and replies on a channel.
//! - [`config`]: [`ClientConfig`]: coordinator, name, trust, timeouts, limits.
//! - `state`: a channel's life as a plain state type, and its one owner.
//! - [`events`]: exact events, by handler or by polling.
//! - [`quota`]: limits on offered interfaces.
//! - [`stream`]: [`MessageSender`], [`MessageReceiver`]: whole messages.
//! - `end`: [`ChannelEnd`], [`Side`], [`Path`]: how channels and sessions end.
//! - [`error`]: one error enum per operation.
//! - `sync`: the crate's lock helper.
//! - `wire`: close codes as QUIC varints; reading a frame within a deadline.

#![warn(missing_docs)]

pub mod agent_config;
pub mod broadcast;
pub mod channel;
pub mod client;
pub mod config;
mod connect;
mod datagram;
mod direct;
mod driver;
mod end;
pub mod enroll;
pub mod error;
pub mod events;
pub mod forward;
pub mod messages;
pub mod pipe;
pub mod presence;
pub mod quota;
mod reconnect;
mod routes;
mod state;
pub mod stream;
mod sync;

pub use broadcast::{Group, GroupEvent, GroupPolicy};
pub use channel::{Channel, ChannelEnd, IncomingChannel, Path, Side};
pub use client::{Client, SessionState};
pub use config::{ClientConfig, DirectConfig, Resolve};
pub use error::{
    AcceptError, CloseError, ConnectError, OpenError, RecvError, RequestError, SendError,
    StreamError,
};
pub use events::{Event, Events};
pub use messages::{Incoming, Request};
pub use pipe::Pipe;
pub use qmesh_certs::{Fingerprint, Identity, Trust};
pub use qmesh_proto::heartbeat::Heartbeat;
pub use qmesh_proto::msg::PathMode;
pub use qmesh_proto::Address;
pub use qmesh_proto::{Direction, Interface};
pub use quota::Quota;
pub use reconnect::Reconnect;
pub use stream::{MessageReceiver, MessageSender};
