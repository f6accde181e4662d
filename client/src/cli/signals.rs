//! SIGINT and SIGTERM, the same for every command.
//!
//! The first signal asks the command to leave: its client closes the
//! session with `stopped by SIGTERM` (or `SIGINT`) as the reason, so the
//! coordinator and every peer see it leave at once rather than after the
//! idle timeout. A service (`listen`, `serve`, `peers --watch`,
//! `broadcast`, `expose`, `forward`, `up`) then exits 0; a command that
//! had work left (`send`, `request`, `describe`, `peers`,
//! `broadcast --count`) exits 1 and says it was stopped. A second signal
//! exits at once with 128 + the signal's number.

use std::future::Future;
use std::sync::OnceLock;

use anyhow::{bail, Result};
use qmesh_client::Client;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// The first signal seen, by name.
static SEEN: OnceLock<watch::Sender<Option<&'static str>>> = OnceLock::new();

fn seen() -> &'static watch::Sender<Option<&'static str>> {
    SEEN.get_or_init(|| watch::channel(None).0)
}

/// Start listening for SIGINT and SIGTERM (once, inside the runtime).
pub(crate) fn install() -> Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let (name, number) = tokio::select! {
                _ = int.recv() => ("SIGINT", 2),
                _ = term.recv() => ("SIGTERM", 15),
            };
            if !first {
                eprintln!("qmesh: {name} again: exiting now");
                std::process::exit(128 + number);
            }
            first = false;
            eprintln!("qmesh: {name}: leaving (send it again to exit at once)");
            seen().send_replace(Some(name));
        }
    });
    Ok(())
}

/// Resolves when the first signal has arrived, with its name.
pub(crate) async fn requested() -> &'static str {
    let mut rx = seen().subscribe();
    let name = rx.wait_for(Option::is_some).await.map(|name| *name);
    match name {
        Ok(name) => name.unwrap_or("a signal"),
        // The sender is a static and never dropped.
        Err(_) => std::future::pending().await,
    }
}

/// The reason a client leaving on `signal` gives.
pub(crate) fn reason(signal: &str) -> String {
    format!("stopped by {signal}")
}

/// Whether a command, stopped by a signal, had finished its job: a
/// service has (it runs until told to stop); a one-shot command has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnStop {
    /// Exit 0 after leaving.
    Done,
    /// Exit 1 after leaving, saying the command was stopped.
    Unfinished,
}

/// Run `work` until it ends or a signal arrives; on a signal, close
/// `client` with the signal as the reason, and end as `on_stop` says.
pub(crate) async fn until_stopped(
    client: Client,
    on_stop: OnStop,
    work: impl Future<Output = Result<()>>,
) -> Result<()> {
    tokio::select! {
        done = work => done,
        signal = requested() => {
            client.close(&reason(signal)).await;
            match on_stop {
                OnStop::Done => Ok(()),
                OnStop::Unfinished => bail!("stopped by {signal} before the command finished"),
            }
        }
    }
}
