//! `qmesh request`, `qmesh serve`, `qmesh peers` and `qmesh describe`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use qmesh_client::{Client, Interface};
use qmesh_proto::msg::PresenceEvent;
use qmesh_proto::Untrusted;
use tracing::info;

/// The manifest `qmesh serve NAME` offers.
pub(crate) fn echo_interface(channel: &str) -> Interface {
    Interface::new(channel, "echo: answers every request with its body, and every one-way message with the same message")
        .with_schema("any bytes in; the same bytes back")
}

/// Send one request and print the reply; a missing reply is an error.
pub(crate) async fn request(
    client: Client,
    address: &str,
    body: &str,
    limit: Duration,
) -> Result<()> {
    let channel = client
        .open_str(address)
        .await
        .with_context(|| format!("opening {address}"))?;
    let outcome = channel.request_within(body.as_bytes(), limit).await;
    let _ = channel.close("request done").await;
    client.close("done").await;
    let reply = outcome.with_context(|| format!("request to {address}"))?;
    println!("{}", String::from_utf8_lossy(&reply));
    Ok(())
}

/// `count` requests on one channel, `body 1` to `body N`, up to 100 in
/// flight. Each gets exactly one line on stdout: `N answered` when its reply
/// came back with its own body, `N missing: WHY` otherwise (no reply in
/// time, the channel lost, or a reply with another body). Then a summary
/// on stderr; an error if any is missing.
pub(crate) async fn requests(
    client: Client,
    address: &str,
    body: &str,
    limit: Duration,
    count: u32,
) -> Result<()> {
    let channel = std::sync::Arc::new(
        client
            .open_str(address)
            .await
            .with_context(|| format!("opening {address}"))?,
    );
    let room = std::sync::Arc::new(tokio::sync::Semaphore::new(100));
    let mut asked = tokio::task::JoinSet::new();
    for i in 1..=count {
        let permit = room.clone().acquire_owned().await?;
        let channel = channel.clone();
        let text = format!("{body} {i}");
        asked.spawn(async move {
            let outcome = channel.request_within(text.as_bytes(), limit).await;
            drop(permit);
            match outcome {
                Ok(reply) if reply.as_ref() == text.as_bytes() => (i, None),
                Ok(reply) => (
                    i,
                    Some(format!(
                        "a reply with another body ({:?})",
                        String::from_utf8_lossy(&reply)
                    )),
                ),
                Err(e) => (i, Some(e.to_string())),
            }
        });
    }
    let mut missing = 0u32;
    while let Some(done) = asked.join_next().await {
        let (i, why) = done?;
        match why {
            None => println!("{i} answered"),
            Some(why) => {
                missing += 1;
                println!("{i} missing: {}", Untrusted::reason(&why));
            }
        }
    }
    let _ = channel.close("requests done").await;
    client.close("done").await;
    eprintln!(
        "qmesh: {count} requests to {address}: {} answered, {missing} missing",
        count - missing
    );
    if missing > 0 {
        bail!("{missing} of {count} requests to {address} got no reply");
    }
    Ok(())
}

/// Answer requests on `channel` with their body, until interrupted.
pub(crate) async fn serve(client: Client, channel: &str) -> Result<()> {
    info!(channel, "serving echo");
    eprintln!(
        "qmesh: {} serves echo on mesh/{}!{channel}",
        client.name(),
        client.name()
    );
    let signal = loop {
        let offer = tokio::select! {
            offer = client.accept() => offer,
            signal = super::signals::requested() => break signal,
        };
        let Some(offer) = offer else {
            bail!("the session ended: {}", client.closed().await);
        };
        if offer.channel() != channel {
            let why = format!("this client serves only \"{channel}\"");
            offer.refuse(&why).await;
            continue;
        }
        tokio::spawn(async move {
            let from = offer.peer().to_owned();
            match offer.accept().await {
                Ok(ch) => {
                    let ch = Arc::new(ch);
                    ch.serve(|body| async move { Some(body) }).await;
                    let how = ch.ended().await;
                    info!(peer = %Untrusted::name(&from), how = %Untrusted::reason(&how), "channel ended");
                }
                Err(e) => {
                    info!(peer = %Untrusted::name(&from), cause = %Untrusted::reason(&e), "accept failed")
                }
            }
        });
    };
    client.close(&super::signals::reason(signal)).await;
    Ok(())
}

fn offers(list: &[Interface]) -> String {
    if list.is_empty() {
        return "declares no interfaces".into();
    }
    let each: Vec<String> = list
        .iter()
        .map(|i| format!("{} ({}, v{})", i.name, i.direction, i.version))
        .collect();
    format!("offers {}", each.join(", "))
}

/// One client in `qmesh peers --json`: what its text line shows.
#[derive(Debug, serde::Serialize)]
struct PeerJson<'a> {
    name: &'a str,
    interfaces: Vec<InterfaceJson<'a>>,
}

/// One interface in `qmesh peers --json`.
#[derive(Debug, serde::Serialize)]
struct InterfaceJson<'a> {
    name: &'a str,
    direction: String,
    version: &'a str,
}

/// The peers as one JSON document: an array with an object per client.
fn peers_json(peers: &[qmesh_client::presence::Peer]) -> Result<String> {
    let list: Vec<PeerJson<'_>> = peers
        .iter()
        .map(|p| PeerJson {
            name: &p.name,
            interfaces: p
                .interfaces
                .iter()
                .map(|i| InterfaceJson {
                    name: &i.name,
                    direction: i.direction.to_string(),
                    version: &i.version,
                })
                .collect(),
        })
        .collect();
    serde_json::to_string_pretty(&list).context("writing the peers as JSON")
}

/// List who is online (as JSON with `json`); with `watch`, go on printing
/// changes.
pub(crate) async fn peers(client: Client, watch: bool, json: bool) -> Result<()> {
    if !watch {
        let peers = client.peers().await.context("listing peers")?;
        if json {
            println!("{}", peers_json(&peers)?);
        } else {
            for peer in &peers {
                println!("{}: {}", peer.name, offers(&peer.interfaces));
            }
        }
        client.close("done").await;
        return Ok(());
    }
    let mut events = client.watch().await.context("watching presence")?;
    let signal = loop {
        let event = tokio::select! {
            e = events.next() => e,
            signal = super::signals::requested() => break signal,
        };
        let Some(event) = event else {
            bail!("the presence watch ended: {}", client.closed().await);
        };
        match event {
            PresenceEvent::Present { name, interfaces } => {
                println!("{name}: {}", offers(&interfaces))
            }
            PresenceEvent::Synced => println!("-- watching for changes"),
            PresenceEvent::Joined { name, interfaces } => {
                println!("joined {name}: {}", offers(&interfaces))
            }
            PresenceEvent::Left { name } => println!("left {name}"),
            PresenceEvent::Changed { name, interfaces } => {
                println!("changed {name}: {}", offers(&interfaces))
            }
            PresenceEvent::Lagged { missed } => {
                eprintln!(
                    "qmesh: missed {missed} presence events; run `qmesh peers` for the full list"
                )
            }
        }
    };
    client.close(&super::signals::reason(signal)).await;
    Ok(())
}

/// Print the manifest of an interface.
pub(crate) async fn describe(client: Client, address: &str) -> Result<()> {
    let parsed = address
        .parse()
        .with_context(|| format!("the address {address:?}"))?;
    let manifest = client
        .describe(&parsed)
        .await
        .with_context(|| format!("describing {address}"))?;
    print!("{manifest}");
    client.close("done").await;
    Ok(())
}
