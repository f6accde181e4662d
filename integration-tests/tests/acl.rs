//! Access control and limits: policy allow/deny/direct, reload with a dry
//! run, the flood cut-off, streams per channel and the message size limit.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::path::Path as FsPath;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use qmesh_client::{Client, Path, PathMode};
use qmesh_coordinator::limit::RateLimits;
use qmesh_coordinator::policy::Policy;
use qmesh_integration_tests::{
    next_message, next_stream, open_pair, open_pair_with, within, within_ok, Mesh, STEP,
};
use qmesh_proto::codes::{OpenFailCode, StreamCode};
use qmesh_proto::Address;

const POLICY: &str = r#"
[policy.groups]
ops = ["alice"]

[[policy.allow]]
from = ["@ops"]
to = ["bob"]
channels = ["chat", "logs-*"]

[[policy.allow]]
from = ["alice"]
to = ["bob"]
channels = ["fast"]
direct = true
"#;

fn policy(text: &str) -> Policy {
    qmesh_coordinator::file::check_text(text, FsPath::new("."))
        .unwrap()
        .policy
        .unwrap()
}

async fn open_code(from: &Client, address: &str, mode: PathMode) -> Option<OpenFailCode> {
    let address: Address = address.parse().unwrap();
    within(STEP, "open", from.open_with(&address, mode))
        .await
        .err()
        .and_then(|e| {
            assert!(
                e.code() != Some(OpenFailCode::Denied) || e.to_string().contains("policy"),
                "{e}"
            );
            e.code()
        })
}

#[tokio::test]
async fn the_policy_allows_what_it_lists_denies_the_rest_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("coordinator.toml");
    std::fs::write(&file, POLICY).unwrap();
    let path = file.clone();
    let mesh = Mesh::start_with(move |c| {
        c.policy = policy(POLICY);
        c.config_file = Some(path);
    })
    .await;
    let (alice, bob, carol) = tokio::join!(
        mesh.client("alice"),
        mesh.client("bob"),
        mesh.client("carol")
    );

    // Allowed, relayed only: auto stays relayed, direct is denied.
    let (a, b) = open_pair_with(&alice, &bob, "logs-1", PathMode::Auto).await;
    assert_eq!(a.path(), Path::Relay);
    assert_eq!(b.path(), Path::Relay);
    assert_eq!(
        open_code(&alice, "mesh/bob!chat", PathMode::Direct).await,
        Some(OpenFailCode::Denied)
    );
    // Allowed with direct.
    let (a, _b) = open_pair_with(&alice, &bob, "fast", PathMode::Direct).await;
    assert!(matches!(a.path(), Path::Direct { .. }));
    // Denied: another channel, another opener, the other direction; and
    // a denied opener learns nothing about presence.
    for (who, address) in [
        (&alice, "mesh/bob!shell"),
        (&carol, "mesh/bob!chat"),
        (&bob, "mesh/alice!chat"),
        (&carol, "mesh/nobody!chat"),
    ] {
        assert_eq!(
            open_code(who, address, PathMode::Auto).await,
            Some(OpenFailCode::Denied),
            "{} {address}",
            who.name()
        );
    }
    let joined = mesh.coordinator.stats().channels_joined.load(Relaxed);
    assert_eq!(joined, 2);

    // A broken file is refused whole, with every error; the policy in
    // force stays.
    std::fs::write(
        &file,
        "[[policy.allow]]\nfrom = [\"@nobody\"]\nto = []\nchannels = [\"*\"]\n",
    )
    .unwrap();
    let errors = mesh.coordinator.control().reload_policy().unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_eq!(
        open_code(&carol, "mesh/bob!chat", PathMode::Auto).await,
        Some(OpenFailCode::Denied)
    );
    let (_a, _b) = open_pair(&alice, &bob, "chat").await;

    // A good file takes effect for the next open.
    std::fs::write(
        &file,
        "[[policy.allow]]\nfrom = [\"carol\"]\nto = [\"bob\"]\nchannels = [\"chat\"]\n",
    )
    .unwrap();
    let done = mesh.coordinator.control().reload_policy().unwrap();
    assert!(done.contains("1 rules"), "{done}");
    let (_c, _b) = open_pair(&carol, &bob, "chat").await;
    assert_eq!(
        open_code(&alice, "mesh/bob!chat", PathMode::Auto).await,
        Some(OpenFailCode::Denied)
    );
}

#[tokio::test]
async fn a_flooding_client_is_cut_off_and_others_carry_on() {
    let mesh = Mesh::start_with(|c| {
        c.rate = RateLimits {
            bytes_per_sec: Some(64 * 1024),
            messages_per_sec: None,
            burst: Duration::from_millis(250),
            flood_after: Duration::from_secs(1),
        };
    })
    .await;
    let (alice, bob, carol, dave) = tokio::join!(
        mesh.client("alice"),
        mesh.client("bob"),
        mesh.client("carol"),
        mesh.client("dave")
    );
    let (flood_out, _flood_in) = open_pair(&alice, &bob, "flood").await;
    let (calm_out, calm_in) = open_pair(&carol, &dave, "calm").await;

    // 64 streams pushing 256 KiB each at once: about 16 MiB waiting at a
    // 64 KiB/s limit, far past one second of backlog.
    let mut pushers = Vec::new();
    for _ in 0..64 {
        let mut s = flood_out.open_stream().await.unwrap();
        pushers.push(tokio::spawn(async move {
            let _ = s.send(&vec![1u8; 256 * 1024]).await;
            let _ = s.finish().await;
        }));
    }
    let why = within(STEP, "alice cut off", alice.closed()).await;
    assert!(why.contains("rate limit exceeded"), "{why}");
    assert!(why.contains("slow down"), "{why}");
    for p in pushers {
        let _ = p.await;
    }
    // Carol and dave, each within their own limit, are unaffected.
    let mut out = calm_out.open_stream().await.unwrap();
    out.send(b"still here").await.unwrap();
    out.finish().await.unwrap();
    let mut inbox = next_stream(&calm_in).await;
    assert_eq!(&next_message(&mut inbox).await[..], b"still here");
}

#[tokio::test]
async fn a_sender_over_the_rate_on_one_stream_is_slowed_not_cut_off() {
    let mesh = Mesh::start_with(|c| {
        c.rate = RateLimits {
            bytes_per_sec: Some(512 * 1024),
            messages_per_sec: Some(200),
            burst: Duration::from_millis(100),
            flood_after: Duration::from_secs(5),
        };
    })
    .await;
    let (alice, bob) = tokio::join!(mesh.client("alice"), mesh.client("bob"));
    let (out, inn) = open_pair(&alice, &bob, "bulk").await;
    let sender = tokio::spawn(async move {
        let mut s = out.open_stream().await.unwrap();
        // 1 MiB in 64 KiB messages and 100 tiny messages: over both rates.
        for _ in 0..16 {
            s.send(&vec![2u8; 64 * 1024]).await.unwrap();
        }
        for _ in 0..100 {
            s.feed(b"x").await.unwrap();
        }
        s.finish().await.unwrap();
        out
    });
    let started = std::time::Instant::now();
    let mut inbox = next_stream(&inn).await;
    let mut got = 0;
    while let Some(m) = within_ok(STEP, "message", inbox.recv()).await {
        got += m.len();
    }
    assert_eq!(got, 16 * 64 * 1024 + 100);
    let _out = sender.await.unwrap();
    // Slowed: 1 MiB at 512 KiB/s, less the 100 ms burst, takes at least
    // 1.9 s; with no byte limit it arrives in a few milliseconds. A slow
    // machine only lengthens this, so the bound cannot fail spuriously.
    let took = started.elapsed();
    eprintln!("RATE 1 MiB + 100 messages at 512 KiB/s, 200/s: {took:?}");
    assert!(
        took >= Duration::from_millis(1700),
        "1 MiB over a 512 KiB/s limit arrived in {took:?}"
    );
    // Still connected: another channel opens.
    let (_a, _b) = open_pair(&alice, &bob, "after").await;
}

#[tokio::test]
async fn streams_per_channel_and_message_size_are_bounded_at_the_relay() {
    let mesh = Mesh::start_with(|c| {
        c.max_streams_per_channel = 2;
        c.max_message = 1000;
    })
    .await;
    let (alice, bob) = tokio::join!(mesh.client("alice"), mesh.client("bob"));
    let (out, inn) = open_pair(&alice, &bob, "small").await;
    // A message over the coordinator's limit: the sender's stream is
    // stopped with MessageTooLarge; the channel lives on.
    let mut big = out.open_stream().await.unwrap();
    big.send(&[0u8; 1001]).await.unwrap();
    let code = within(STEP, "big stream stopped", big.stopped()).await;
    assert_eq!(
        code.map(|c| c.into_inner()),
        Some(u64::from(StreamCode::MessageTooLarge.code()))
    );
    // Three streams held open at once: one of them is stopped with
    // TooManyStreams, the other two are relayed.
    let mut held = Vec::new();
    for i in 0..3u8 {
        let mut s = out.open_stream().await.unwrap();
        s.send(&[i]).await.unwrap();
        held.push(s);
    }
    let stops = held.iter().map(|s| Box::pin(s.stopped()));
    let (first, stopped, _) = within(
        STEP,
        "a stream stopped",
        futures_util::future::select_all(stops),
    )
    .await;
    assert_eq!(
        first.map(|c| c.into_inner()),
        Some(u64::from(StreamCode::TooManyStreams.code()))
    );
    // The two streams that were not stopped arrive, each with its own
    // byte; the stopped one's byte never does.
    let mut relayed = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let mut r = next_stream(&inn).await;
        let m = next_message(&mut r).await;
        assert_eq!(m.len(), 1);
        assert!(relayed.insert(m[0]), "stream {} relayed twice", m[0]);
    }
    let expected: std::collections::BTreeSet<u8> =
        (0..3u8).filter(|&i| usize::from(i) != stopped).collect();
    assert_eq!(relayed, expected, "stream {stopped} was stopped");
    // The relay opened a mirror for the oversized stream and the two
    // taken ones, and none for the stopped one.
    assert_eq!(
        mesh.coordinator
            .stats()
            .streams_relayed
            .load(std::sync::atomic::Ordering::Relaxed),
        3,
        "a stream was relayed past the limit of two"
    );
    drop(held);
}

/// A flooder is held to its rates, measured: 600 one-byte messages at
/// 200 messages/s, then 1 MiB on one stream at 256 KiB/s, each slowed for
/// seconds and never cut off (only a backlog past `flood_after` is: see
/// the test above; 600 messages in one go are a 3 s backlog, within the
/// default 5 s). Meanwhile an honest client
/// on the same coordinator keeps its round trip: each of its requests,
/// during both floods, is answered within 500 ms (its own rate limit is
/// its own; the figures are printed against a baseline taken before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooder_is_held_to_its_rates_and_an_honest_client_keeps_its_latency() {
    use qmesh_client::Incoming;
    use std::time::Instant;
    const MESSAGES: u64 = 600;
    const BYTES: usize = 1 << 20;
    let mesh = Mesh::start_with(|c| {
        c.rate = RateLimits {
            bytes_per_sec: Some(256 * 1024),
            messages_per_sec: Some(200),
            burst: Duration::from_millis(100),
            flood_after: Duration::from_secs(5),
        };
    })
    .await;
    let (alice, bob, carol, dave) = tokio::join!(
        mesh.client("alice"),
        mesh.client("bob"),
        mesh.client("carol"),
        mesh.client("dave")
    );
    let first_session = alice.state().borrow().clone();
    assert!(
        matches!(first_session, qmesh_client::SessionState::Up { .. }),
        "{first_session:?}"
    );
    let (flood_out, flood_in) = open_pair(&alice, &bob, "flood").await;
    let (ask, answer) = open_pair(&carol, &dave, "ask").await;
    tokio::spawn(async move {
        while let Some(Incoming::Request(r)) = answer.recv_message().await {
            let body = r.body().clone();
            let _ = r.reply(&body).await;
        }
    });
    let ask = std::sync::Arc::new(ask);
    // Carol's round trips until `stop`, each timed.
    let round_trips = |n: usize| {
        let ask = ask.clone();
        async move {
            let mut took = Vec::new();
            for i in 0..n {
                let start = Instant::now();
                let body = format!("ping {i}");
                let reply = within_ok(STEP, "request", ask.request(body.as_bytes())).await;
                assert_eq!(&reply[..], body.as_bytes());
                took.push(start.elapsed());
            }
            took.sort();
            took
        }
    };
    let baseline = round_trips(30).await;

    // Messages: 600 of one byte, over the 200/s rate.
    let messages = async {
        let start = Instant::now();
        let mut s = flood_out.open_stream().await.unwrap();
        for _ in 0..MESSAGES {
            s.feed(b"x").await.unwrap();
        }
        s.finish().await.unwrap();
        let mut inbox = next_stream(&flood_in).await;
        let mut got = 0;
        while within_ok(STEP, "message", inbox.recv()).await.is_some() {
            got += 1;
        }
        assert_eq!(got, MESSAGES);
        start.elapsed()
    };
    let (took_messages, during_messages) = tokio::join!(messages, round_trips(30));
    // Bytes: 1 MiB on one stream, over the 256 KiB/s rate.
    let bytes = async {
        let start = Instant::now();
        let mut s = flood_out.open_stream().await.unwrap();
        for _ in 0..16 {
            s.send(&vec![3u8; BYTES / 16]).await.unwrap();
        }
        s.finish().await.unwrap();
        let mut inbox = next_stream(&flood_in).await;
        let mut got = 0;
        while let Some(m) = within_ok(STEP, "message", inbox.recv()).await {
            got += m.len();
        }
        assert_eq!(got, BYTES);
        start.elapsed()
    };
    let (took_bytes, during_bytes) = tokio::join!(bytes, round_trips(30));

    let p50_max = |t: &[Duration]| (t[t.len() / 2], t[t.len() - 1]);
    eprintln!(
        "RATE messages: {MESSAGES} in {took_messages:?} ({:.0}/s, limit 200/s); bytes: 1 MiB in \
         {took_bytes:?} ({:.0} KiB/s, limit 256 KiB/s); honest round trip p50/max: before \
         {:?}, during messages {:?}, during bytes {:?}",
        MESSAGES as f64 / took_messages.as_secs_f64(),
        1024.0 / took_bytes.as_secs_f64(),
        p50_max(&baseline),
        p50_max(&during_messages),
        p50_max(&during_bytes),
    );
    // Held to the rates: (n - burst) / rate at the least. A slow machine
    // only lengthens these, so they cannot fail spuriously.
    assert!(
        took_messages >= Duration::from_millis(2600),
        "{MESSAGES} messages at 200/s arrived in {took_messages:?}"
    );
    assert!(
        took_bytes >= Duration::from_millis(3600),
        "1 MiB at 256 KiB/s arrived in {took_bytes:?}"
    );
    for (what, t) in [("messages", &during_messages), ("bytes", &during_bytes)] {
        let (_, max) = p50_max(t);
        assert!(
            max < Duration::from_millis(500),
            "an honest request took {max:?} during the {what} flood"
        );
    }
    // Slowed, never cut off: alice is still in the same session.
    assert_eq!(*alice.state().borrow(), first_session);
}
