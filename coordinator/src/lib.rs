//! qmesh-coordinator: the coordinator of a qmesh mesh.
//!
//! Clients connect over QUIC, say hello with a unique name, and ask for
//! channels to each other by name (`mesh/bob!chat`). The coordinator asks
//! the callee, joins the two channel control streams end to end, and relays
//! every data stream either side opens, under QUIC flow control with a
//! bounded buffer per stream.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use qmesh_coordinator::{Config, Coordinator};
//!
//! let ca = qmesh_certs::Ca::generate("example CA")?;
//! let identity = ca.issue_server(&["localhost".into()])?;
//! let mut config = Config::new(identity);
//! config.listen = "127.0.0.1:0".parse()?;
//! let coordinator = Coordinator::bind(config)?;
//! println!("listening on {}", coordinator.local_addr());
//! coordinator.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`config`]: [`Config`], the coordinator's settings.
//! - [`registry`]: [`Registry`], admission and routing as a plain type.
//! - [`server`]: [`Coordinator`], bind, the accept loop, each session's
//!   task and shutdown.
//! - `session`: the state every handler shares (`Shared`, `Session`,
//!   [`Stats`], a joined channel's sides); imports no handler.
//! - [`control`]: [`Control`](control::Control), operator actions:
//!   revocation, policy reload, the client list.
//! - `admission`: admitting a hello decided as plain functions: join,
//!   refuse, violation or enroll; who keeps a name.
//! - `handshake`: the hello exchange, generic over the stream, and its
//!   effects on the connection.
//! - `streams`: first-frame dispatch of each stream a client opens.
//! - `open`: opening a channel decided as plain functions: a plan or a
//!   typed refusal, the callee's answer judged, direct introductions.
//! - `channel`: the I/O of an open (offer, answer, join), forwarding and
//!   close.
//! - `relay`: the data stream relay.
//! - `presence`: describe and presence watches.
//! - `broadcast`: broadcast group streams: fan-out and slow-member policies.
//! - `groups`: the broadcast groups' member lists and queues.
//! - `wire`: helpers every handler shares: codes as `VarInt`s, reading a
//!   frame within a deadline, the `Failed` answer.
//! - [`admin`]: the admin socket.
//! - [`http`]: the HTTP listener of `run --http`: `/metrics`,
//!   `/status.json` and the status page (`status.html`), behind a bearer
//!   token off loopback.
//! - [`metrics`]: the Prometheus metrics, in a registry per coordinator.
//! - [`bearer`]: the HTTP listener's bearer token, compared in constant
//!   time.
//! - [`auth`], [`token`], [`policy`], [`limit`]: authentication modes,
//!   enrollment tokens, the access policy and rate limits, as plain types.
//! - [`file`](mod@file): the config file.
//! - [`settings`]: `run`'s flags, the config file and defaults merged.
//! - [`devcert`]: development and deployment certificate files.
//! - [`socket`]: UDP socket setup.
//! - [`leader`]: the leader process that runs and replaces workers.

#![warn(missing_docs)]

pub mod acme;
pub mod admin;
mod admission;
pub mod auth;
pub mod bearer;
mod broadcast;
mod channel;
#[cfg(feature = "etcd")]
pub mod cluster;
pub mod config;
pub mod control;
pub mod devcert;
pub mod directory;
pub mod file;
mod files;
mod groupfeed;
mod groups;
mod handshake;
pub mod http;
pub mod leader;
pub mod limit;
pub mod link;
pub mod metrics;
mod open;
pub mod policy;
mod presence;
pub mod registry;
mod relay;
pub mod reload;
pub mod server;
mod session;
pub mod settings;
pub mod socket;
pub mod statelock;
mod streams;
pub mod strikes;
pub mod tls;
pub mod token;
mod wire;

pub use config::Config;
pub use registry::Registry;
pub use server::{BindError, Coordinator, CoordinatorHandle, Listener, Stats};
pub use session::Event;

pub use qmesh_certs::transport::describe_close;
