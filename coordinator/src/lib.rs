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
//! - [`server`]: [`Coordinator`], the accept loop, sessions and shutdown.
//! - `channel`: channel open, join, forwarding and close.
//! - `relay`: the data stream relay.
//! - `broadcast`: broadcast groups: fan-out and slow-member policies.
//! - [`devcert`]: development and deployment certificate files.
//! - [`socket`]: UDP socket setup.
//! - [`logging`]: the connpipe log format used by the binaries.

#![warn(missing_docs)]

pub mod admin;
pub mod auth;
mod broadcast;
mod channel;
pub mod config;
pub mod devcert;
pub mod file;
mod files;
pub mod limit;
pub mod logging;
pub mod policy;
mod presence;
pub mod registry;
mod relay;
pub mod server;
pub mod socket;
pub mod token;

pub use config::Config;
pub use registry::Registry;
pub use server::{BindError, Coordinator, CoordinatorHandle, Stats};

pub use qmesh_certs::transport::describe_close;
