//! `qmesh broadcast`: stdin lines to a group, the group's messages to
//! stdout.

use std::io::Write;

use anyhow::{bail, Context, Result};
use qmesh_client::{Client, Group, GroupEvent, SendError, SessionState};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Join `group`; send each stdin line as a broadcast and print each group
/// message as `SENDER: TEXT`. On stdin EOF, leave and return; on eviction,
/// fail.
pub(crate) async fn run(client: Client, group_name: &str) -> Result<()> {
    let group = client
        .join(group_name)
        .await
        .with_context(|| format!("joining group {group_name}"))?;
    eprintln!(
        "qmesh: joined group {} as {} ({} members, policy {})",
        group.name(),
        client.name(),
        group.members_at_join(),
        group.policy()
    );
    let mut printer = tokio::spawn(print_events(group.clone()));
    let (sent, printed) = tokio::select! {
        sent = send_lines(&client, &group) => {
            // Leave; the coordinator then ends the stream, and what is
            // still on its way is printed.
            let left = group.clone().leave().await;
            let printed = (&mut printer).await.context("the printing task failed")?;
            (sent.and(left.context("leaving the group")), printed)
        }
        // The membership ended before stdin did (evicted, or cut off).
        printed = &mut printer => {
            let printed = printed.context("the printing task failed")?;
            (Ok(()), printed.and_then(|()| bail!("group {group_name} ended the membership")))
        }
    };
    client.close("done").await;
    printed?;
    sent
}

/// Each stdin line, one broadcast each, until EOF. A line that cannot be
/// sent because the session is lost is reported on stderr and skipped;
/// the membership is joined again once the client is back.
async fn send_lines(client: &Client, group: &Group) -> Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    loop {
        line.clear();
        if stdin.read_line(&mut line).await.context("reading stdin")? == 0 {
            return Ok(());
        }
        let text = line.strip_suffix('\n').unwrap_or(&line);
        let text = text.strip_suffix('\r').unwrap_or(text);
        match group.send(text.as_bytes()).await {
            Ok(()) => {}
            Err(e @ SendError::TooLarge { .. }) => {
                return Err(e).with_context(|| format!("sending to group {}", group.name()))
            }
            Err(e) if !matches!(*client.state().borrow(), SessionState::Ended { .. }) => {
                eprintln!(
                    "qmesh: a line was not sent to group {} ({e}); the session is coming back",
                    group.name()
                );
            }
            Err(e) => return Err(e).with_context(|| format!("sending to group {}", group.name())),
        }
    }
}

/// Print group events until the membership ends.
async fn print_events(group: Group) -> Result<()> {
    loop {
        let event = group
            .recv()
            .await
            .with_context(|| format!("receiving from group {}", group.name()))?;
        match event {
            None => return Ok(()),
            Some(GroupEvent::Message { from, body }) => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{from}: {}", String::from_utf8_lossy(&body))?;
                out.flush()?;
            }
            Some(GroupEvent::Missed { count }) => {
                eprintln!(
                    "qmesh: missed {count} messages in group {} (too slow)",
                    group.name()
                );
            }
            Some(GroupEvent::Evicted { reason }) => {
                eprintln!("qmesh: {reason}");
                bail!("evicted from group {}", group.name());
            }
        }
    }
}

/// Print the member count of `group`.
pub(crate) async fn count(client: Client, group: &str) -> Result<()> {
    let members = client
        .group_members(group)
        .await
        .with_context(|| format!("counting the members of group {group}"))?;
    println!("{members}");
    client.close("done").await;
    Ok(())
}
