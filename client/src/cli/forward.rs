//! `qmesh expose` and `qmesh forward`: one route each, until interrupted.

use anyhow::{anyhow, bail, Context, Result};
use qmesh_client::forward::{Endpoint, Expose, Exposer, Forward, Stop};
use qmesh_client::{Address, Client};

/// Parse a local endpoint given on the command line.
fn endpoint(what: &str, text: &str) -> Result<Endpoint> {
    let address: Address = text
        .parse()
        .with_context(|| format!("the {what} address {text:?}"))?;
    Endpoint::from_address(&address).map_err(|e| anyhow!("the {what} address: {e}"))
}

/// The route `qmesh expose NAME TARGET` serves.
pub(crate) fn expose(name: &str, target: &str) -> Result<Expose> {
    qmesh_proto::name::validate_channel_name(name)
        .with_context(|| format!("the interface name {name:?}"))?;
    Ok(Expose::new(name, endpoint("target", target)?))
}

/// The route `qmesh forward LISTEN TO` runs.
pub(crate) fn forward(listen: &str, to: &str) -> Result<Forward> {
    let listen = endpoint("listen", listen)?;
    let address: Address = to
        .parse()
        .with_context(|| format!("the interface address {to:?}"))?;
    address
        .mesh()
        .with_context(|| format!("{to} is not an interface; write it as mesh/PEER!NAME"))?;
    Ok(Forward::new(listen.to_string(), listen, address))
}

/// Serve `expose` until interrupted or the session ends.
pub(crate) async fn run_expose(client: Client, expose: Expose) -> Result<()> {
    println!("exposing {} -> {}", expose.name, expose.target);
    let exposer = Exposer::new(client.name().to_owned(), [expose]);
    let signal = tokio::select! {
        () = exposer.run(&client) => bail!("the session ended: {}", client.closed().await),
        signal = super::signals::requested() => signal,
    };
    client.close(&super::signals::reason(signal)).await;
    Ok(())
}

/// Run `route` until interrupted.
pub(crate) async fn run_forward(client: Client, route: Forward) -> Result<()> {
    let run = route.run(client.clone(), Stop::never(), |line| println!("{line}"));
    let reason = tokio::select! {
        done = run => {
            done.map_err(|e| anyhow!(e))?;
            "the forward ended".to_owned()
        }
        signal = super::signals::requested() => super::signals::reason(signal),
    };
    client.close(&reason).await;
    Ok(())
}
