//! `qmesh demo`: a coordinator and two clients in one process, on loopback.

use anyhow::{bail, Context, Result};
use qmesh_client::{Client, ClientConfig, Trust};
use qmesh_coordinator::devcert::dev_identity;
use qmesh_coordinator::{Config, Coordinator};

pub(crate) async fn run() -> Result<()> {
    let state = tempfile::tempdir().context("making a temporary state directory")?;
    let files = dev_identity(state.path()).context("making a development certificate")?;
    let mut config = Config::new(files.identity);
    config.listen = "127.0.0.1:0".parse()?;
    let coordinator = Coordinator::bind(config)?.spawn();
    let port = coordinator.local_addr().port();
    println!(
        "coordinator  listening on quic/$4:{port} with a development CA ({})",
        files.ca_path.display()
    );

    let trust = ClientConfig::trust_ca_file(&files.ca_path)?;
    let address: qmesh_client::Address = format!("quic/$4:{port}").parse()?;
    let connect =
        |name: &str, trust: Trust| Client::connect(ClientConfig::new(address.clone(), name, trust));
    let alice = connect("alice", trust.clone()).await?;
    println!(
        "alice        connected (seen by the coordinator as {})",
        alice.observed_addr()
    );
    let bob = connect("bob", trust).await?;
    println!(
        "bob          connected (seen by the coordinator as {})",
        bob.observed_addr()
    );

    // Bob answers while alice waits for the answer.
    let bob_side = async {
        let offer = bob.accept().await.context("bob's session ended")?;
        println!(
            "bob          offered channel \"{}\" by {}; accepting",
            offer.channel(),
            offer.peer()
        );
        anyhow::Ok(offer.accept().await?)
    };
    let (opened, accepted) = tokio::join!(alice.open_str("mesh/bob!chat"), bob_side);
    let at_bob = accepted?;
    let at_alice = opened?;
    println!(
        "alice        channel {} ready, path {}",
        at_alice.label(),
        at_alice.path()
    );

    let mut to_bob = at_alice.open_stream().await?;
    for text in ["hello bob", "how are you?"] {
        to_bob.send(text.as_bytes()).await?;
        println!("alice  ->    {text}");
    }
    to_bob.finish().await?;
    let mut from_alice = at_bob
        .accept_stream()
        .await?
        .context("no stream from alice")?;
    while let Some(msg) = from_alice.recv().await? {
        println!("bob    <-    {}", String::from_utf8_lossy(&msg));
    }

    let mut to_alice = at_bob.open_stream().await?;
    to_alice.send(b"hi alice, all good").await?;
    println!("bob    ->    hi alice, all good");
    to_alice.finish().await?;
    let mut from_bob = at_alice
        .accept_stream()
        .await?
        .context("no stream from bob")?;
    let Some(reply) = from_bob.recv().await? else {
        bail!("bob's stream ended without a message");
    };
    println!("alice  <-    {}", String::from_utf8_lossy(&reply));

    at_alice.close("demo finished").await?;
    println!("alice        channel {}", at_alice.ended().await);
    println!("bob          channel {}", at_bob.ended().await);

    alice.close("bye").await;
    bob.close("bye").await;
    coordinator.shutdown().await;
    println!("coordinator  stopped; demo complete");
    Ok(())
}
