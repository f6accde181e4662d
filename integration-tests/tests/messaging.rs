//! Messaging on channels, end to end through real endpoints on loopback:
//! one-way messages, requests and replies (in any order, late, typed),
//! exact events by handler and by polling, interfaces and presence,
//! directions and quotas.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmesh_client::events::{Event, Events};
use qmesh_client::{
    Channel, ChannelEnd, Client, Direction, Incoming, Interface, OpenError, Quota, RequestError,
    SendError, Side, StreamError,
};
use qmesh_integration_tests::{connect, open_pair, within, within_ok, Mesh, STEP};
use qmesh_proto::codes::OpenFailCode;
use qmesh_proto::msg::PresenceEvent;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

/// The next message or request on `ch`, which must come.
async fn next_incoming(ch: &Channel) -> Incoming {
    within_ok(STEP, "recv_message", ch.recv_message()).await
}

/// The next request on `ch`, which must come.
async fn next_request(ch: &Channel) -> qmesh_client::Request {
    match next_incoming(ch).await {
        Incoming::Request(r) => r,
        Incoming::Message(m) => panic!("expected a request, got message {m:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answered_out_of_order_each_reach_their_own_request() {
    const N: u32 = 100;
    let mesh = Mesh::start().await;
    let mut config = mesh.config("alice");
    // Bob holds every request until all have come: no timeout may fire.
    config.request_timeout = STEP;
    let alice = connect(config).await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair(&alice, &bob, "rpc").await;
    let a = Arc::new(a);

    let mut asks = JoinSet::new();
    for i in 0..N {
        let a = a.clone();
        asks.spawn(async move { (i, a.request(i.to_string().as_bytes()).await) });
    }

    // Every request is in flight at once before bob answers any.
    let mut held = Vec::new();
    for _ in 0..N {
        held.push(next_request(&b).await);
    }
    let mut bodies: Vec<u32> = held
        .iter()
        .map(|r| std::str::from_utf8(r.body()).unwrap().parse().unwrap())
        .collect();
    bodies.sort_unstable();
    assert_eq!(bodies, (0..N).collect::<Vec<_>>());

    // Answer in a scrambled order: odd ones backwards, then even ones.
    held.reverse();
    let (odd, even): (Vec<_>, Vec<_>) = held.into_iter().partition(|r| {
        std::str::from_utf8(r.body())
            .unwrap()
            .parse::<u32>()
            .unwrap()
            % 2
            == 1
    });
    for r in odd.into_iter().chain(even) {
        let n = std::str::from_utf8(r.body()).unwrap().to_owned();
        r.reply(format!("reply to {n}").as_bytes()).await.unwrap();
    }

    let mut answered = 0;
    while let Some(done) = within(STEP, "replies", asks.join_next()).await {
        let (i, reply) = done.unwrap();
        let reply = reply.unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(&reply[..], format!("reply to {i}").as_bytes());
        answered += 1;
    }
    assert_eq!(answered, N);
    assert_eq!(a.dropped_replies(), 0);
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_gives_reply_missing_and_a_late_reply_is_dropped() {
    let mesh = Mesh::start().await;
    let mut config = mesh.config("alice");
    config.request_timeout = STEP;
    let alice = connect(config).await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair(&alice, &bob, "rpc").await;

    let err = within(
        STEP,
        "first request",
        a.request_within(b"first", Duration::from_millis(300)),
    )
    .await
    .unwrap_err();
    match &err {
        RequestError::ReplyMissing { reason } => {
            assert!(reason.contains("no reply within"), "{reason}")
        }
        other => panic!("expected reply missing, got {other:?}"),
    }

    // Bob got the request and answers it only now, too late.
    let first = next_request(&b).await;
    assert_eq!(&first.body()[..], b"first");
    first.reply(b"late answer").await.unwrap();

    // The second request is answered at once; the late reply, sent before
    // it on the same ordered stream, must not be taken for it.
    let (second, ()) = within(STEP, "second request", async {
        tokio::join!(a.request(b"second"), async {
            let req = next_request(&b).await;
            assert_eq!(&req.body()[..], b"second");
            req.reply(b"second answer").await.unwrap();
        })
    })
    .await;
    assert_eq!(&second.unwrap()[..], b"second answer");
    // The late reply came before the second one on bob's message stream,
    // so it has been handled (dropped) by now.
    assert_eq!(a.dropped_replies(), 1);
    mesh.coordinator.shutdown().await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    celsius: f64,
    tags: Vec<String>,
    seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Query {
    Average { sensor: String },
    Count,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Answer {
    sensor: Option<String>,
    value: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_messages_and_requests_round_trip() {
    let mesh = Mesh::start().await;
    let mut config = mesh.config("alice");
    config.request_timeout = STEP;
    let alice = connect(config).await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair(&alice, &bob, "typed").await;

    let readings: Vec<Reading> = (0..3u32)
        .map(|i| Reading {
            sensor: format!("s{i}"),
            celsius: 20.5 + f64::from(i),
            tags: vec!["roof".into(), format!("t{i}")],
            seq: u64::from(i) << 40,
        })
        .collect();
    for r in &readings {
        a.send_value(r).await.unwrap();
    }
    for r in &readings {
        let got = next_incoming(&b).await;
        assert!(matches!(got, Incoming::Message(_)));
        assert_eq!(&got.decode::<Reading>().unwrap(), r);
    }

    // A typed request, answered by hand with a typed reply.
    let query = Query::Average {
        sensor: "s1".into(),
    };
    let (answer, ()) = within(STEP, "typed request", async {
        tokio::join!(a.request_value::<Query, Answer>(&query), async {
            let req = next_request(&b).await;
            let q: Query = req.decode().unwrap();
            assert_eq!(
                q,
                Query::Average {
                    sensor: "s1".into()
                }
            );
            req.reply_value(&Answer {
                sensor: Some("s1".into()),
                value: 21.5,
            })
            .await
            .unwrap();
        })
    })
    .await;
    assert_eq!(
        answer.unwrap(),
        Answer {
            sensor: Some("s1".into()),
            value: 21.5
        }
    );

    // The same through `serve`, which answers every request until the
    // channel ends.
    let b = Arc::new(b);
    let server = {
        let b = b.clone();
        tokio::spawn(async move {
            b.serve(|body| async move {
                let q: Query = qmesh_proto::codec::decode_value(&body).ok()?;
                let a = match q {
                    Query::Count => Answer {
                        sensor: None,
                        value: 3.0,
                    },
                    Query::Average { sensor } => Answer {
                        sensor: Some(sensor),
                        value: -1.0,
                    },
                };
                Some(qmesh_proto::codec::encode_value(&a).ok()?.into())
            })
            .await
        })
    };
    let count: Answer = within_ok(STEP, "served request", a.request_value(&Query::Count)).await;
    assert_eq!(
        count,
        Answer {
            sensor: None,
            value: 3.0
        }
    );
    within_ok(STEP, "close", a.close("done")).await;
    within_ok(STEP, "serve ends with the channel", server).await;
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_and_polling_see_the_same_events_in_the_same_order() {
    let mesh = Mesh::start().await;
    let events = Events::new();
    let seen = Arc::new(Mutex::new(Vec::<Event>::new()));
    {
        let seen = seen.clone();
        events.on("chat", move |e| seen.lock().unwrap().push(e.clone()));
    }
    let mut config = mesh.config("alice");
    config.events = Some(events.clone());
    config.request_timeout = STEP;
    let alice = connect(config).await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair(&alice, &bob, "chat").await;

    // One request answered.
    let (one, ()) = within(STEP, "answered request", async {
        tokio::join!(a.request(b"one"), async {
            next_request(&b).await.reply(b"answer one").await.unwrap();
        })
    })
    .await;
    assert_eq!(&one.unwrap()[..], b"answer one");

    // One request bob receives and holds: it times out.
    let (two, held) = within(STEP, "unanswered request", async {
        tokio::join!(
            a.request_within(b"two", Duration::from_millis(200)),
            next_request(&b)
        )
    })
    .await;
    assert!(matches!(two, Err(RequestError::ReplyMissing { .. })));
    drop(held);

    // An open of a channel of the same name to a peer that is not there.
    let missing = within(STEP, "open to nobody", alice.open_str("mesh/nobody!chat")).await;
    assert_eq!(
        missing.unwrap_err().code(),
        Some(OpenFailCode::PeerNotPresent)
    );

    within_ok(STEP, "close", a.close("done")).await;
    assert_eq!(
        within(STEP, "bob's end", b.ended()).await,
        ChannelEnd::Closed {
            by: Side::Peer,
            reason: "done".into()
        }
    );

    // Every outcome above was reported before the call that returned it.
    let mut polled = Vec::new();
    while let Some(e) = events.try_next() {
        polled.push(e);
    }
    assert!(
        matches!(&polled[0], Event::Connected { name, .. } if name == "alice"),
        "{polled:?}"
    );
    assert_eq!(
        polled
            .iter()
            .filter(|e| matches!(e, Event::Connected { .. }))
            .count(),
        1
    );
    assert!(!polled.iter().any(|e| matches!(e, Event::Lagged { .. })));
    let chat: Vec<Event> = polled
        .iter()
        .filter(|e| e.channel().is_some_and(|c| c.name == "chat"))
        .cloned()
        .collect();
    assert_eq!(*seen.lock().unwrap(), chat);
    assert_eq!(chat.len(), polled.len() - 1, "{polled:?}");

    // Exactly one terminal event per action, in order.
    let label = "alice>bob!chat";
    assert_eq!(chat.len(), 5, "{chat:#?}");
    assert!(matches!(&chat[0], Event::Ready { channel } if channel.label == label));
    let first_id = match &chat[1] {
        Event::Reply { channel, id, body } if channel.label == label => {
            assert_eq!(&body[..], b"answer one");
            *id
        }
        other => panic!("expected a reply, got {other:?}"),
    };
    match &chat[2] {
        Event::ReplyMissing {
            channel,
            id,
            reason,
        } if channel.label == label => {
            assert_ne!(*id, first_id);
            assert_ne!(*id, 0);
            assert!(reason.contains("no reply within"), "{reason}");
        }
        other => panic!("expected reply missing, got {other:?}"),
    }
    assert!(
        matches!(&chat[3], Event::OpenError { channel, .. } if channel.label == "alice>nobody!chat")
    );
    assert!(matches!(
        &chat[4],
        Event::Closed { channel, by: Side::Local, reason } if channel.label == label && reason == "done"
    ));
    mesh.coordinator.shutdown().await;
}

/// A tiny deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Bob {
    /// Answers every request.
    Answers,
    /// Takes requests and never answers.
    Ignores,
    /// Closes the channel at its first request.
    CloseChannel,
    /// Leaves abruptly at its first request.
    Leaves,
}

/// What alice did on one channel and how it came out.
#[derive(Debug, Default)]
struct Outcome {
    open_ok: bool,
    end: Option<ChannelEnd>,
    replies: usize,
    missing: usize,
}

async fn play_bob(bob: Arc<Client>, ch: Channel, mode: Bob) {
    let mut held = Vec::new();
    while let Some(incoming) = ch.recv_message().await {
        let Incoming::Request(req) = incoming else {
            continue;
        };
        match mode {
            Bob::Answers => {
                let body = req.body().clone();
                let _ = req.reply(&body).await;
            }
            Bob::Ignores => held.push(req),
            Bob::CloseChannel => {
                let _ = ch.close("bob closes").await;
            }
            Bob::Leaves => {
                bob.close("bob leaves").await;
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_terminal_event_per_action_under_random_peer_endings() {
    const ROUNDS: u64 = 30;
    let mesh = Mesh::start().await;
    let events = Events::new();
    let mut config = mesh.config("alice");
    config.events = Some(events.clone());
    config.request_timeout = Duration::from_millis(300);
    let alice = Arc::new(connect(config).await);
    assert!(matches!(
        within(STEP, "connected", events.next()).await,
        Event::Connected { .. }
    ));

    // label → outcome, over all rounds.
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut modes = HashMap::new();
    for round in 0..ROUNDS {
        let mut rng = Rng::new(round + 1);
        let mode =
            [Bob::Answers, Bob::Ignores, Bob::CloseChannel, Bob::Leaves][rng.below(4) as usize];
        *modes.entry(format!("{mode:?}")).or_insert(0) += 1;
        let name = format!("bob{round}");
        let bob = Arc::new(mesh.client(&name).await);
        let acceptor = {
            let bob = bob.clone();
            tokio::spawn(async move {
                let mut players = JoinSet::new();
                while let Some(offer) = bob.accept().await {
                    if offer.channel() == "late" {
                        offer.refuse("no late channels").await;
                        continue;
                    }
                    if let Ok(ch) = offer.accept().await {
                        players.spawn(play_bob(bob.clone(), ch, mode));
                    }
                }
                players.abort_all();
            })
        };

        let channels = 1 + rng.below(3);
        let mut asks = JoinSet::new();
        let mut opened = Vec::new();
        for c in 0..channels {
            let label = format!("alice>{name}!c{c}");
            let result = within(STEP, "open", alice.open_str(&format!("mesh/{name}!c{c}"))).await;
            let outcome = outcomes.entry(label.clone()).or_default();
            outcome.open_ok = result.is_ok();
            let Ok(ch) = result else { continue };
            assert_eq!(ch.label(), label);
            let ch = Arc::new(ch);
            for r in 0..1 + rng.below(3) {
                let ch = ch.clone();
                let label = label.clone();
                asks.spawn(async move { (label, ch.request(format!("r{r}").as_bytes()).await) });
            }
            opened.push(ch);
        }
        while let Some(done) = within(STEP, "requests resolve", asks.join_next()).await {
            let (label, result) = done.unwrap();
            let o = outcomes.get_mut(&label).unwrap();
            match result {
                Ok(_) => o.replies += 1,
                Err(RequestError::ReplyMissing { .. }) => o.missing += 1,
                Err(e) => panic!("{label}: unexpected {e:?}"),
            }
        }
        // A refused (or, once bob has left, failed) open.
        let late = format!("alice>{name}!late");
        let result = within(
            STEP,
            "late open",
            alice.open_str(&format!("mesh/{name}!late")),
        )
        .await;
        assert!(result.is_err(), "the late open must fail");
        outcomes.entry(late).or_default().open_ok = false;

        for ch in opened {
            // Alice closes, or bob leaves (a channel bob already ended
            // stays as it ended).
            if rng.below(2) == 0 {
                let _ = within(STEP, "close", ch.close("alice closes")).await;
            } else {
                bob.close("bob leaves at the end").await;
            }
            let end = within(STEP, "channel ends", ch.ended()).await;
            outcomes.get_mut(ch.label()).unwrap().end = Some(end);
        }
        bob.close("round over").await;
        within_ok(STEP, "bob's acceptor ends", acceptor).await;
    }
    assert!(modes.len() == 4, "every mode played: {modes:?}");
    // The rounds came out every way there is to come out.
    let ends = |f: fn(&ChannelEnd) -> bool| {
        outcomes
            .values()
            .filter(|o| o.end.as_ref().is_some_and(f))
            .count()
    };
    assert!(
        ends(|e| matches!(e, ChannelEnd::Lost { .. })) > 0,
        "{outcomes:#?}"
    );
    assert!(
        ends(|e| matches!(
            e,
            ChannelEnd::Closed {
                by: Side::Local,
                ..
            }
        )) > 0,
        "{outcomes:#?}"
    );
    assert!(
        ends(|e| matches!(e, ChannelEnd::Closed { by: Side::Peer, .. })) > 0,
        "{outcomes:#?}"
    );
    assert!(outcomes.values().any(|o| o.replies > 0), "{outcomes:#?}");
    assert!(outcomes.values().any(|o| o.missing > 0), "{outcomes:#?}");

    each_outcome_reported_once(&events, &outcomes).await;
    mesh.coordinator.shutdown().await;
}

/// How a peer process is made to disappear.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// SIGKILL while requests are in flight on an open channel.
    KilledMidRequest,
    /// SIGSTOP while requests are in flight: its endpoint goes silent
    /// without a close.
    FrozenMidRequest,
    /// SIGKILL just before alice opens a channel to it: the coordinator
    /// still holds its session when the open comes.
    KilledBeforeOpen,
    /// SIGSTOP just before alice opens a channel to it.
    FrozenBeforeOpen,
}

/// Peers that are real `qmesh serve` processes, killed with SIGKILL or
/// frozen with SIGSTOP mid-request and mid-open: every open, request and
/// channel of alice's still ends in exactly one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_terminal_event_per_action_when_peer_processes_are_killed_or_frozen() {
    use qmesh_integration_tests::process::qmesh;
    const IN_FLIGHT: usize = 20;
    let mesh = Mesh::start_with(|c| {
        c.heartbeat = qmesh_proto::heartbeat::Heartbeat::new(Duration::from_millis(500), 3);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, mesh.ca.cert_pem()).unwrap();
    let address = mesh.address.to_string();

    let events = Events::new();
    let mut config = mesh.config("alice");
    config.events = Some(events.clone());
    config.request_timeout = Duration::from_secs(5);
    let alice = Arc::new(connect(config).await);
    assert!(matches!(
        within(STEP, "connected", events.next()).await,
        Event::Connected { .. }
    ));

    let fates = [
        Fate::KilledMidRequest,
        Fate::FrozenMidRequest,
        Fate::KilledBeforeOpen,
        Fate::FrozenBeforeOpen,
        Fate::KilledMidRequest,
        Fate::FrozenMidRequest,
    ];
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    for (round, fate) in fates.into_iter().enumerate() {
        let name = format!("victim{round}");
        let state = dir.path().join(&name);
        let mut peer = qmesh(&address, &ca, &state, &["--name", &name, "serve", "echo"]);
        peer.stderr_line("`serves echo`", |l| l.contains("serves echo on"))
            .await;
        let label = format!("alice>{name}!echo");
        let outcome = outcomes.entry(label.clone()).or_default();
        let target = format!("mesh/{name}!echo");
        match fate {
            Fate::KilledMidRequest | Fate::FrozenMidRequest => {
                let ch = Arc::new(within_ok(STEP, "open", alice.open_str(&target)).await);
                outcome.open_ok = true;
                let mut asks = JoinSet::new();
                for r in 0..IN_FLIGHT {
                    let ch = ch.clone();
                    asks.spawn(async move { ch.request(format!("r{r}").as_bytes()).await });
                }
                // The first answer shows the peer mid-way through them.
                let first = within(STEP, "a first answer", asks.join_next()).await;
                let mut results = vec![first.unwrap().unwrap()];
                assert!(results[0].is_ok(), "{:?}", results[0]);
                match fate {
                    Fate::KilledMidRequest => peer.signal("KILL"),
                    _ => peer.signal("STOP"),
                }
                // And some that certainly reach no one.
                for r in 0..3 {
                    let ch = ch.clone();
                    asks.spawn(async move { ch.request(format!("late{r}").as_bytes()).await });
                }
                while let Some(done) = within(STEP, "requests resolve", asks.join_next()).await {
                    results.push(done.unwrap());
                }
                for result in results {
                    match result {
                        Ok(_) => outcome.replies += 1,
                        // The peer is declared lost after 1.5 s of silence,
                        // well before the 5 s request timeout: a missing
                        // reply is put down to the channel's end.
                        Err(RequestError::ReplyMissing { reason }) => {
                            assert!(
                                reason.starts_with("the channel ended before the reply")
                                    || reason.starts_with("the channel has ended"),
                                "{label}: a request on a lost channel: {reason}"
                            );
                            outcome.missing += 1;
                        }
                        Err(e) => panic!("{label}: unexpected {e:?}"),
                    }
                }
                let end = within(STEP, "channel ends", ch.ended()).await;
                assert!(
                    matches!(end, ChannelEnd::Lost { .. }),
                    "{label}: a killed or frozen peer is lost: {end:?}"
                );
                outcome.end = Some(end);
            }
            Fate::KilledBeforeOpen | Fate::FrozenBeforeOpen => {
                match fate {
                    Fate::KilledBeforeOpen => peer.signal("KILL"),
                    _ => peer.signal("STOP"),
                }
                let result = within(STEP, "open", alice.open_str(&target)).await;
                assert!(result.is_err(), "{label}: the open must fail");
            }
        }
        peer.kill().await;
    }
    let total = |f: fn(&Outcome) -> usize| outcomes.values().map(f).sum::<usize>();
    eprintln!(
        "killed and frozen peers: {} channels, {} replies, {} missing",
        outcomes.len(),
        total(|o| o.replies),
        total(|o| o.missing)
    );
    assert!(total(|o| o.missing) > 0, "{outcomes:#?}");
    each_outcome_reported_once(&events, &outcomes).await;
    mesh.coordinator.shutdown().await;
}

/// The hub reported each of `outcomes` exactly once, and nothing else:
/// one `Ready` or `OpenError` per open, one `Closed` or `Lost` per ended
/// channel, one `Reply` or `ReplyMissing` per request.
async fn each_outcome_reported_once(events: &Events, outcomes: &BTreeMap<String, Outcome>) {
    // The hub reports each outcome once: wait for the count, then check
    // for extras.
    let expected: usize = outcomes
        .values()
        .map(|o| 1 + usize::from(o.open_ok) + o.replies + o.missing)
        .sum();
    let mut got = Vec::new();
    while got.len() < expected {
        let e = within(STEP, "all events", events.next()).await;
        assert!(
            !matches!(e, Event::Lagged { .. } | Event::Connected { .. }),
            "{e:?}"
        );
        got.push(e);
    }
    assert_eq!(events.try_next(), None, "more events than actions");

    let mut by_label: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for e in got {
        let label = e.channel().unwrap().label.clone();
        by_label.entry(label).or_default().push(e);
    }
    assert_eq!(
        by_label.keys().collect::<Vec<_>>(),
        outcomes.keys().collect::<Vec<_>>()
    );
    for (label, o) in outcomes {
        let evs = &by_label[label];
        let count = |f: fn(&Event) -> bool| evs.iter().filter(|e| f(e)).count();
        let ready = count(|e| matches!(e, Event::Ready { .. }));
        let open_error = count(|e| matches!(e, Event::OpenError { .. }));
        assert_eq!(
            (ready, open_error),
            (usize::from(o.open_ok), usize::from(!o.open_ok)),
            "{label}: {evs:#?}"
        );
        let closed = count(|e| matches!(e, Event::Closed { .. }));
        let lost = count(|e| matches!(e, Event::Lost { .. }));
        match &o.end {
            Some(ChannelEnd::Closed { .. }) => {
                assert_eq!((closed, lost), (1, 0), "{label}: {evs:#?}")
            }
            Some(ChannelEnd::Lost { .. }) => {
                assert_eq!((closed, lost), (0, 1), "{label}: {evs:#?}")
            }
            None => assert_eq!((closed, lost), (0, 0), "{label}: {evs:#?}"),
        }
        let replies = count(|e| matches!(e, Event::Reply { .. }));
        let missing = count(|e| matches!(e, Event::ReplyMissing { .. }));
        assert_eq!(
            (replies, missing),
            (o.replies, o.missing),
            "{label}: {evs:#?}"
        );
        // A request that got an id has its own event.
        let mut ids: Vec<u64> = evs
            .iter()
            .filter_map(|e| match e {
                Event::Reply { id, .. } | Event::ReplyMissing { id, .. } if *id != 0 => Some(*id),
                _ => None,
            })
            .collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(
            ids.len(),
            n,
            "{label}: a request id reported twice: {evs:#?}"
        );
        // Ready comes first, the end after every other event of the channel
        // that happened while it was ready.
        if o.open_ok {
            assert!(matches!(evs[0], Event::Ready { .. }), "{label}: {evs:#?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interfaces_describe_peers_and_no_such_interface() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let web = Interface::new("web", "pages")
        .with_direction(Direction::Send)
        .with_schema("html");
    let echo = Interface::new("echo", "echo");
    let mut config = mesh.config("bob");
    config.interfaces = vec![web.clone(), echo.clone()];
    let bob = connect(config).await;

    let mut watch = within_ok(STEP, "watch", alice.watch()).await;
    let mut present = BTreeMap::new();
    loop {
        match within_ok(STEP, "presence", watch.next()).await {
            PresenceEvent::Present { name, interfaces } => {
                assert!(present.insert(name, interfaces).is_none());
            }
            PresenceEvent::Synced => break,
            other => panic!("before synced: {other:?}"),
        }
    }
    assert_eq!(
        present,
        BTreeMap::from([
            ("alice".into(), vec![]),
            ("bob".into(), vec![web.clone(), echo.clone()])
        ])
    );

    let described = within_ok(
        STEP,
        "describe",
        alice.describe(&"mesh/bob!web".parse().unwrap()),
    )
    .await;
    assert_eq!(described, web);

    let no_such = |e: OpenError| match e {
        OpenError::Failed { code, message } => {
            assert_eq!(code, OpenFailCode::NoSuchInterface, "{message}");
            assert!(message.contains("web, echo"), "{message}");
        }
        other => panic!("expected no such interface, got {other:?}"),
    };
    no_such(
        within(
            STEP,
            "describe nope",
            alice.describe(&"mesh/bob!nope".parse().unwrap()),
        )
        .await
        .unwrap_err(),
    );
    no_such(
        within(STEP, "open nope", alice.open_str("mesh/bob!nope"))
            .await
            .unwrap_err(),
    );

    let mut peers = within_ok(STEP, "peers", alice.peers()).await;
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    let listed: Vec<_> = peers
        .iter()
        .map(|p| (p.name.as_str(), p.interfaces.clone()))
        .collect();
    assert_eq!(
        listed,
        vec![("alice", vec![]), ("bob", vec![web.clone(), echo.clone()])]
    );

    let carol = mesh.client("carol").await;
    assert_eq!(
        within_ok(STEP, "carol joins", watch.next()).await,
        PresenceEvent::Joined {
            name: "carol".into(),
            interfaces: vec![]
        }
    );
    let feed = Interface::new("feed", "updates").with_version("2.1");
    within_ok(
        STEP,
        "set interfaces",
        bob.set_interfaces(vec![feed.clone()]),
    )
    .await;
    assert_eq!(
        within_ok(STEP, "bob changes", watch.next()).await,
        PresenceEvent::Changed {
            name: "bob".into(),
            interfaces: vec![feed.clone()]
        }
    );
    // The change is in force: web is gone, feed is there.
    assert_eq!(
        within_ok(
            STEP,
            "describe feed",
            alice.describe(&"mesh/bob!feed".parse().unwrap())
        )
        .await,
        feed
    );
    let gone = within(
        STEP,
        "describe web",
        alice.describe(&"mesh/bob!web".parse().unwrap()),
    )
    .await
    .unwrap_err();
    assert_eq!(gone.code(), Some(OpenFailCode::NoSuchInterface));

    carol.close("bye").await;
    assert_eq!(
        within_ok(STEP, "carol leaves", watch.next()).await,
        PresenceEvent::Left {
            name: "carol".into()
        }
    );
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direction_is_enforced_at_the_sender() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let feed = Interface::new("feed", "updates").with_direction(Direction::Send);
    let mut config = mesh.config("bob");
    config.interfaces = vec![feed.clone()];
    let bob = connect(config).await;
    let (a, b) = open_pair(&alice, &bob, "feed").await;
    assert_eq!(a.interface(), Some(&feed));
    assert_eq!(b.interface(), Some(&feed));

    match within(STEP, "send", a.send_message(b"hi")).await {
        Err(SendError::WrongDirection(why)) => assert!(why.contains("may not send"), "{why}"),
        other => panic!("expected wrong direction, got {other:?}"),
    }
    match within(STEP, "request", a.request(b"hi?")).await {
        Err(RequestError::ReplyMissing { reason }) => {
            assert!(reason.contains("may not send"), "{reason}")
        }
        other => panic!("expected reply missing, got {other:?}"),
    }
    match within(STEP, "open stream", a.open_stream()).await {
        Err(StreamError::WrongDirection(why)) => assert!(why.contains("may not send"), "{why}"),
        Err(other) => panic!("expected wrong direction, got {other:?}"),
        Ok(_) => panic!("expected wrong direction, got a stream"),
    }

    // The offerer sends; the opener receives.
    within_ok(STEP, "bob sends", b.send_message(b"update 1")).await;
    match next_incoming(&a).await {
        Incoming::Message(m) => assert_eq!(&m[..], b"update 1"),
        Incoming::Request(r) => panic!("expected a message, got request {r:?}"),
    }
    assert_eq!(a.end(), None, "refused sends do not end the channel");
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quota_peers_are_told_why_and_cut_off() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let config = mesh.config("bob").offer(
        Interface::new("api", "an API"),
        Quota {
            max_channels: Some(1),
            messages_per_second: Some(50),
        },
    );
    let bob = Arc::new(connect(config).await);
    let (taken_tx, mut taken) = tokio::sync::mpsc::unbounded_channel();
    let acceptor = {
        let bob = bob.clone();
        tokio::spawn(async move {
            while let Some(offer) = bob.accept().await {
                if let Ok(ch) = offer.accept().await {
                    let _ = taken_tx.send(ch);
                }
            }
        })
    };

    let a = within_ok(STEP, "first open", alice.open_str("mesh/bob!api")).await;
    // Bob holds the channel (and so its place under the cap).
    let b = within_ok(STEP, "bob's side", taken.recv()).await;
    match within(STEP, "second open", alice.open_str("mesh/bob!api")).await {
        Err(OpenError::Failed { code, message }) => {
            assert_eq!(code, OpenFailCode::Refused, "{message}");
            assert!(message.contains("over quota"), "{message}");
        }
        Err(other) => panic!("expected a refusal, got {other:?}"),
        Ok(ch) => panic!("a second channel opened: {}", ch.label()),
    }

    // A flood far over 50 per second: bob closes the channel.
    within(STEP, "flood", async {
        for i in 0..5000u32 {
            if a.end().is_some() || a.send_message(&i.to_be_bytes()).await.is_err() {
                break;
            }
        }
    })
    .await;
    match within(STEP, "alice's end", a.ended()).await {
        ChannelEnd::Closed {
            by: Side::Peer,
            reason,
        } => assert!(reason.contains("over quota"), "{reason}"),
        other => panic!("expected a close by bob over quota, got {other:?}"),
    }
    match within(STEP, "bob's end", b.ended()).await {
        ChannelEnd::Closed {
            by: Side::Local,
            reason,
        } => assert!(reason.contains("over quota"), "{reason}"),
        other => panic!("expected bob to close over quota, got {other:?}"),
    }
    acceptor.abort();
    mesh.coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_close_is_closed_not_lost_and_messages_sent_before_it_arrive() {
    let mesh = Mesh::start().await;
    let alice = mesh.client("alice").await;
    let bob = mesh.client("bob").await;
    let (a, b) = open_pair(&alice, &bob, "chat").await;

    for i in 0..50u32 {
        a.send_message(format!("m{i}").as_bytes()).await.unwrap();
    }
    within_ok(STEP, "close", a.close("bye")).await;
    for i in 0..50u32 {
        match next_incoming(&b).await {
            Incoming::Message(m) => assert_eq!(&m[..], format!("m{i}").as_bytes()),
            Incoming::Request(r) => panic!("expected a message, got {r:?}"),
        }
    }
    assert!(within(STEP, "end of messages", b.recv_message())
        .await
        .is_none());
    assert_eq!(
        within(STEP, "bob's end", b.ended()).await,
        ChannelEnd::Closed {
            by: Side::Peer,
            reason: "bye".into()
        }
    );
    assert_eq!(
        a.end(),
        Some(ChannelEnd::Closed {
            by: Side::Local,
            reason: "bye".into()
        })
    );
    mesh.coordinator.shutdown().await;
}
