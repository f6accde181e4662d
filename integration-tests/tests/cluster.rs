//! Several coordinators on one directory in etcd (issue 16): a real etcd
//! (Debian `etcd-server`) on loopback ports with its data in a temporary
//! directory, and three `qmesh-coordinator run --etcd` processes sharing a
//! certificate. Names are unique across the cluster; a coordinator's
//! death frees its names within its lease; a frozen etcd refuses new
//! names with a clear reason and no name is ever held twice.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qmesh_client::events::{Event, Events};
use qmesh_client::Interface;
use qmesh_client::{
    Address, ChannelEnd, Client, ClientConfig, ConnectError, Heartbeat, Incoming, Path, PathMode,
    Reconnect, Trust,
};
use qmesh_integration_tests::process;
use qmesh_integration_tests::programs::{etcd_cluster, require, EtcdMember};
use qmesh_integration_tests::target::CoordinatorProc;
use qmesh_integration_tests::{
    carries, memory_kib, message_flows, next_stream, open_pair, open_pair_with, payload, within,
    within_ok, STEP,
};
use qmesh_proto::codes::RejectCode;
use qmesh_proto::msg::PresenceEvent;
use tempfile::TempDir;

/// The lease TTL the coordinators here run with.
const TTL: Duration = Duration::from_secs(3);

/// etcd, a certificate every coordinator presents, and its CA.
struct Lab {
    etcd: Vec<EtcdMember>,
    dir: TempDir,
    trust: Trust,
}

/// A coordinator of the lab with its state directory.
struct Member {
    proc: CoordinatorProc,
    state: TempDir,
}

impl Member {
    fn address(&self) -> Address {
        self.proc.address()
    }

    /// Its state directory, where its admin socket is.
    fn state(&self) -> PathBuf {
        self.state.path().to_path_buf()
    }

    /// The names of the clients connected to this coordinator.
    fn names(&self) -> Vec<String> {
        clients_of(&self.state()).expect("the coordinator's admin socket")
    }
}

/// The names of the clients connected to the coordinator whose state
/// directory is `state` (`clients --json` on its admin socket); `None`
/// when it does not answer.
fn clients_of(state: &std::path::Path) -> Option<Vec<String>> {
    let out = Command::new(env_bin("qmesh-coordinator"))
        .args(["clients", "--json", "--state-dir"])
        .arg(state)
        .output()
        .expect("running qmesh-coordinator");
    if !out.status.success() {
        return None;
    }
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("clients --json");
    let list = reply["data"].as_array().expect("a list of clients");
    Some(
        list.iter()
            .map(|c| c["name"].as_str().expect("a name").to_owned())
            .collect(),
    )
}

/// Reads every live coordinator's client list, one after another, over
/// and over until stopped, and keeps each time a name was on two of them.
struct Watcher {
    stop: Arc<AtomicBool>,
    /// Coordinators (by index) no longer read: killed.
    dead: Arc<Mutex<HashSet<usize>>>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Drop for Watcher {
    /// A failed test stops it too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Watcher {
    fn start(members: &[&Member]) -> Watcher {
        let states: Vec<PathBuf> = members.iter().map(|m| m.state()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let dead = Arc::new(Mutex::new(HashSet::new()));
        let (stop2, dead2) = (stop.clone(), dead.clone());
        let task = tokio::task::spawn_blocking(move || {
            let mut rounds = 0;
            let mut twice = Vec::new();
            while !stop2.load(Ordering::Acquire) {
                let mut seen: BTreeMap<String, usize> = BTreeMap::new();
                for (i, state) in states.iter().enumerate() {
                    if dead2.lock().expect("lock").contains(&i) {
                        continue;
                    }
                    for name in clients_of(state).unwrap_or_default() {
                        if let Some(other) = seen.insert(name.clone(), i) {
                            twice.push(format!("{name} on coordinators {other} and {i}"));
                        }
                    }
                }
                rounds += 1;
            }
            (rounds, twice)
        });
        Watcher { stop, dead, task }
    }

    /// Stop reading coordinator `i` (before it is killed).
    fn forget(&self, i: usize) {
        self.dead.lock().expect("lock").insert(i);
    }

    /// Stop; no name may have been on two coordinators at once.
    async fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        let task = std::mem::replace(
            &mut self.task,
            tokio::task::spawn_blocking(|| (0, Vec::new())),
        );
        let (rounds, twice) = task.await.expect("the watcher");
        assert!(rounds > 0, "the watcher read nothing");
        assert!(twice.is_empty(), "names held twice: {twice:?}");
        eprintln!("watcher: {rounds} rounds, no name held twice");
    }
}

/// The path of one of the workspace's binaries, as the process helpers
/// find it.
fn env_bin(name: &str) -> PathBuf {
    qmesh_integration_tests::bin(name)
}

impl Lab {
    /// `None` (the test is skipped) outside CI when etcd is missing.
    fn new(etcd_members: usize) -> Option<Lab> {
        require("etcd")?;
        let etcd = etcd_cluster(etcd_members);
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = qmesh_certs::Ca::generate("qmesh cluster test CA").expect("CA");
        let hosts = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let identity = ca.issue_server(&hosts).expect("coordinator certificate");
        identity
            .save(&dir.path().join("cert.pem"), &dir.path().join("key.pem"))
            .expect("saving the certificate");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).expect("writing the CA");
        let trust = ClientConfig::trust_ca_file(&ca_file).expect("CA file");
        Some(Lab { etcd, dir, trust })
    }

    fn urls(&self) -> Vec<String> {
        self.etcd.iter().map(|m| m.url()).collect()
    }

    /// A coordinator in the cluster, once it listens (it has joined by
    /// then).
    async fn coordinator(&self) -> Member {
        self.coordinator_with(&[]).await
    }

    /// As [`Lab::coordinator`], with more flags.
    async fn coordinator_with(&self, extra: &[&str]) -> Member {
        let state = tempfile::tempdir().expect("temporary directory");
        let cert = self.dir.path().join("cert.pem");
        let key = self.dir.path().join("key.pem");
        let ttl = format!("{}s", TTL.as_secs());
        let mut args: Vec<&OsStr> = vec![
            "--single".as_ref(),
            "--state-dir".as_ref(),
            state.path().as_os_str(),
            "--cert".as_ref(),
            cert.as_os_str(),
            "--key".as_ref(),
            key.as_os_str(),
            "--cluster".as_ref(),
            "test".as_ref(),
            "--etcd-lease-ttl".as_ref(),
            ttl.as_ref(),
        ];
        let urls = self.urls();
        for url in &urls {
            args.push("--etcd".as_ref());
            args.push(url.as_ref());
        }
        args.extend(extra.iter().map(OsStr::new));
        let proc = CoordinatorProc::start(&args).await;
        Member { proc, state }
    }

    fn config(&self, at: &Member, name: &str) -> ClientConfig {
        let mut config = ClientConfig::new(at.address(), name, self.trust.clone());
        config.reconnect = Reconnect::never();
        config
    }

    /// A client that reconnects, to `at` first and then to `others`, and
    /// finds a silent coordinator in 2 s; with its events.
    fn staying(&self, at: &Member, others: &[&Member], name: &str) -> (ClientConfig, Events) {
        let mut config = ClientConfig::new(at.address(), name, self.trust.clone());
        config.also = others.iter().map(|m| m.address()).collect();
        config.heartbeat = Heartbeat::new(Duration::from_secs(1), 2);
        let events = Events::new();
        config.events = Some(events.clone());
        (config, events)
    }

    /// How many members are registered in etcd under the test cluster.
    async fn etcd_members(&self) -> usize {
        let mut etcd = etcd_client::Client::connect(self.urls(), None)
            .await
            .expect("connecting to etcd");
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_count_only();
        let answer = etcd
            .get("/qmesh/test/members/", Some(options))
            .await
            .expect("counting the members");
        usize::try_from(answer.count()).expect("a count")
    }

    /// The names in etcd under the test cluster, with their members.
    async fn etcd_names(&self) -> BTreeMap<String, String> {
        let mut etcd = etcd_client::Client::connect(self.urls(), None)
            .await
            .expect("connecting to etcd");
        let options = etcd_client::GetOptions::new().with_prefix();
        let answer = etcd
            .get("/qmesh/test/names/", Some(options))
            .await
            .expect("reading the names");
        answer
            .kvs()
            .iter()
            .map(|kv| {
                let name = kv.key_str().expect("a UTF-8 key");
                let name = name.strip_prefix("/qmesh/test/names/").expect("the prefix");
                let record: serde_json::Value =
                    serde_json::from_slice(kv.value()).expect("a JSON record");
                let member = record["member"].as_str().expect("its member").to_owned();
                (name.to_owned(), member)
            })
            .collect()
    }
}

fn rejected(r: &Result<Client, ConnectError>) -> Option<RejectCode> {
    match r {
        Err(ConnectError::Rejected { code, .. }) => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_claims_of_one_name_through_three_coordinators_have_one_winner() {
    let Some(lab) = Lab::new(1) else { return };
    let members = [
        lab.coordinator().await,
        lab.coordinator().await,
        lab.coordinator().await,
    ];
    // Each claimant has a credential of its own (a self-signed certificate
    // made at its connect), so none may take the name over from another.
    let tries: Vec<_> = (0..100)
        .map(|i| {
            let config = lab.config(&members[i % 3], "contested");
            tokio::spawn(Client::connect(config))
        })
        .collect();
    let mut winners = Vec::new();
    let mut taken = 0;
    for (i, t) in tries.into_iter().enumerate() {
        let r = within(STEP * 4, "a claim", t)
            .await
            .expect("the claim's task");
        match rejected(&r) {
            Some(RejectCode::NameTaken) => taken += 1,
            None if r.is_ok() => winners.push((i, r.expect("connected"))),
            _ => panic!("claim {i} failed otherwise: {:?}", r.err()),
        }
    }
    assert_eq!(winners.len(), 1, "one winner, {taken} refused as taken");
    assert_eq!(taken, 99);
    let (i, _winner) = &winners[0];
    // The winner is the only "contested" in the cluster: on its own
    // coordinator, and nowhere else.
    for (m, member) in members.iter().enumerate() {
        let here = member.names().contains(&"contested".to_owned());
        assert_eq!(here, m == i % 3, "coordinator {m}: {:?}", member.names());
    }
    let names = lab.etcd_names().await;
    assert_eq!(names.len(), 1, "{names:?}");
    // What an operator sees: every member, and where the winner is, from
    // any coordinator.
    let holder = &members[i % 3];
    let info = admin_json(holder, "info");
    let cluster = &info["data"]["cluster"];
    let me = cluster["me"].as_str().expect("this member's id");
    assert_eq!(names["contested"], me);
    let ids: BTreeSet<&str> = cluster["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["id"].as_str().expect("an id"))
        .collect();
    assert_eq!(ids.len(), 3, "{cluster}");
    let other = &members[(i + 1) % 3];
    let text = admin_text(other, "clients");
    let line = format!(
        "contested  on member {me} at 127.0.0.1:{}",
        holder.proc.port
    );
    assert!(text.contains(&line), "{text}");
    let text = admin_text(other, "info");
    assert!(
        text.contains("3 member(s), 1 name(s) held; directory available"),
        "{text}"
    );
}

/// `qmesh-coordinator COMMAND --json` on `member`'s admin socket.
fn admin_json(member: &Member, command: &str) -> serde_json::Value {
    serde_json::from_str(&admin(member, &[command, "--json"])).expect("JSON")
}

/// `qmesh-coordinator COMMAND` on `member`'s admin socket: what it prints.
fn admin_text(member: &Member, command: &str) -> String {
    admin(member, &[command])
}

fn admin(member: &Member, args: &[&str]) -> String {
    let out = Command::new(env_bin("qmesh-coordinator"))
        .args(args)
        .arg("--state-dir")
        .arg(member.state())
        .output()
        .expect("running qmesh-coordinator");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The next event that is not about channels, within `limit`.
async fn next_session_event(events: &Events, limit: Duration, what: &str) -> Event {
    within(limit, what, async {
        loop {
            let e = events.next().await;
            if e.channel().is_none() {
                return e;
            }
        }
    })
    .await
}

/// Connect with `config` until the coordinator admits it, within `limit`;
/// returns the client and each refusal before, as (code, message).
async fn connect_until_admitted(
    config: ClientConfig,
    limit: Duration,
) -> (Client, Vec<(RejectCode, String)>) {
    let mut refusals = Vec::new();
    let started = Instant::now();
    loop {
        match Client::connect(config.clone()).await {
            Ok(c) => return (c, refusals),
            Err(ConnectError::Rejected { code, message }) => refusals.push((code, message)),
            Err(e) => panic!("connecting failed otherwise: {e}"),
        }
        assert!(
            started.elapsed() < limit,
            "not admitted within {limit:?}; refused {} times, last: {:?}",
            refusals.len(),
            refusals.last()
        );
        // The pace of a client's retries (Reconnect's first step).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connects with `config` until it is refused for a reason other than
/// `Unavailable`, and returns that reason; panics if it is admitted or
/// the directory stays unavailable past `limit`.
async fn refused_once_decided(config: ClientConfig, limit: Duration) -> RejectCode {
    let started = Instant::now();
    loop {
        match Client::connect(config.clone()).await {
            Ok(_) => panic!("{} was admitted", config.name),
            Err(ConnectError::Rejected { code, .. }) if code != RejectCode::Unavailable => {
                return code
            }
            Err(ConnectError::Rejected { .. }) => {}
            Err(e) => panic!("connecting failed otherwise: {e}"),
        }
        assert!(
            started.elapsed() < limit,
            "the directory stayed unavailable for {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_held_once_in_the_cluster_and_its_credential_takes_it_over_on_another_coordinator(
) {
    let Some(lab) = Lab::new(1) else { return };
    let (a, b, c) = (
        lab.coordinator().await,
        lab.coordinator().await,
        lab.coordinator().await,
    );
    let mut config = lab.config(&a, "alice");
    let events = Events::new();
    config.events = Some(events.clone());
    let alice = Client::connect(config.clone()).await.expect("alice on A");
    // Another credential cannot have "alice" on B: the refusal names the
    // coordinator that holds it.
    let other = Client::connect(lab.config(&b, "alice")).await;
    match &other {
        Err(ConnectError::Rejected { code, message }) => {
            assert_eq!(*code, RejectCode::NameTaken, "{message}");
            assert!(
                message.contains(&format!("127.0.0.1:{}", a.proc.port)),
                "the refusal should say where alice is: {message}"
            );
        }
        _ => panic!("a second alice was admitted on B"),
    }
    // The same credential on C takes the name over; A closes its session
    // as replaced.
    let mut moved = config.clone();
    moved.coordinator = c.address();
    moved.events = None;
    let alice_c = Client::connect(moved)
        .await
        .expect("alice's credential on C");
    let reason = within(STEP, "alice on A to end", alice.closed()).await;
    assert!(
        reason.contains("taken over by a new session with the same credential"),
        "{reason}"
    );
    assert_eq!(a.names(), Vec::<String>::new());
    assert_eq!(c.names(), vec!["alice".to_owned()]);
    let names = lab.etcd_names().await;
    assert_eq!(names.len(), 1, "{names:?}");
    // Leaving frees the name in the cluster: another credential gets it on B.
    alice_c.close("done").await;
    let (_b_alice, refusals) = connect_until_admitted(lab.config(&b, "alice"), STEP).await;
    assert!(
        refusals
            .iter()
            .all(|(code, _)| *code == RejectCode::NameTaken),
        "{refusals:?}"
    );
    assert_eq!(b.names(), vec!["alice".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_coordinators_clients_reclaim_their_names_elsewhere_and_its_other_names_free_within_the_lease(
) {
    const MOVERS: usize = 24;
    let Some(lab) = Lab::new(1) else { return };
    let (a, mut b, c) = (
        lab.coordinator().await,
        lab.coordinator().await,
        lab.coordinator().await,
    );
    // Clients given all three coordinators: each joins one at random.
    let mut movers = Vec::new();
    for i in 0..MOVERS {
        let (config, events) = lab.staying(&b, &[&a, &c], &format!("m{i}"));
        let client = Client::connect(config).await.expect("a client");
        movers.push((client, events));
    }
    let on_b: BTreeSet<String> = b.names().into_iter().collect();
    assert!(!on_b.is_empty(), "no client chose B");
    // zed does not come back: its name frees when B's lease ends.
    let _zed = Client::connect(lab.config(&b, "zed"))
        .await
        .expect("zed on B");
    // Two clients on A with a channel between them: untouched by B's death.
    let mut config = lab.config(&a, "x");
    let x_events = Events::new();
    config.events = Some(x_events.clone());
    let x = Client::connect(config).await.expect("x");
    let y = Client::connect(lab.config(&a, "y")).await.expect("y");
    let (to, from) = open_pair(&x, &y, "chat").await;
    // And one from x to w on B, across the link: it ends lost, once.
    links_up(&[&a, &b, &c]).await;
    let w = Client::connect(lab.config(&b, "w")).await.expect("w on B");
    let (across, _at_w) = open_pair(&x, &w, "across").await;
    let watcher = Watcher::start(&[&a, &b, &c]);
    watcher.forget(1);
    let killed = Instant::now();
    b.proc.proc.kill().await;
    // Another credential asks for "zed" at once: refused while B's lease
    // lives, admitted once it has ended.
    let (_zed2, refusals) = connect_until_admitted(lab.config(&a, "zed"), TTL * 4).await;
    let freed = killed.elapsed();
    assert!(!refusals.is_empty(), "zed's name was free at once");
    assert!(
        refusals
            .iter()
            .all(|(code, _)| *code == RejectCode::NameTaken),
        "{refusals:?}"
    );
    eprintln!(
        "zed's name was free {} ms after the kill ({} refusals; lease {TTL:?})",
        freed.as_millis(),
        refusals.len()
    );
    for (i, (_, events)) in movers.iter().enumerate() {
        if !on_b.contains(&format!("m{i}")) {
            continue;
        }
        loop {
            match next_session_event(events, TTL * 4, "a mover to come back").await {
                Event::Reconnected { .. } => break,
                Event::Connected { .. } => continue,
                Event::Reconnecting { .. } => continue,
                other => panic!("m{i}: {other:?}"),
            }
        }
    }
    let mut on_a: BTreeSet<String> = a.names().into_iter().collect();
    let on_c: BTreeSet<String> = c.names().into_iter().collect();
    assert!(on_a.is_disjoint(&on_c), "{on_a:?} and {on_c:?}");
    on_a.extend(on_c);
    let mut expected: BTreeSet<String> = (0..MOVERS).map(|i| format!("m{i}")).collect();
    expected.extend(["x".to_owned(), "y".to_owned(), "zed".to_owned()]);
    assert_eq!(on_a, expected);
    let in_etcd: BTreeSet<String> = lab.etcd_names().await.into_keys().collect();
    assert_eq!(in_etcd, expected);
    message_flows(&to, &from, b"after B died").await;
    match within(STEP, "the channel across to end", across.ended()).await {
        ChannelEnd::Lost { reason } => {
            assert!(reason.contains("the link to coordinator"), "{reason}")
        }
        other => panic!("the channel to w on B: {other:?}"),
    }
    watcher.finish().await;
    // x heard of each of its channels' ends once: the one across, lost.
    let mut ends = Vec::new();
    while let Some(event) = x_events.try_next() {
        if matches!(event, Event::Closed { .. } | Event::Lost { .. }) {
            ends.push(event.to_string());
        }
    }
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert!(ends[0].contains("across lost"), "{ends:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_frozen_for_ten_seconds_refuses_new_names_keeps_live_channels_and_then_resumes_without_a_duplicate(
) {
    const FROZEN: Duration = Duration::from_secs(10);
    let Some(lab) = Lab::new(1) else { return };
    let http = qmesh_integration_tests::programs::free_port();
    let http_addr = format!("127.0.0.1:{http}");
    let a = lab.coordinator_with(&["--http", &http_addr]).await;
    let b = lab.coordinator().await;
    assert_eq!(
        metric(http, "qmesh_cluster_directory_available").await,
        Some(1.0)
    );
    assert_eq!(metric(http, "qmesh_cluster_members").await, Some(2.0));
    let alice = Client::connect(lab.config(&a, "alice"))
        .await
        .expect("alice");
    let bob = Client::connect(lab.config(&a, "bob")).await.expect("bob");
    let (to, from) = open_pair(&alice, &bob, "chat").await;
    let (config, carol_events) = lab.staying(&b, &[], "carol");
    let _carol = Client::connect(config).await.expect("carol");
    let watcher = Watcher::start(&[&a, &b]);
    let etcd = lab.etcd[0].program.pid().to_string();
    let signal = |name: &str| {
        let status = Command::new("kill")
            .args([name, &etcd])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {name} {etcd}");
    };
    signal("-STOP");
    let frozen = Instant::now();
    // A new name cannot be claimed: refused with the reason, not admitted
    // at the risk of a duplicate.
    match Client::connect(lab.config(&a, "dave")).await {
        Err(ConnectError::Rejected { code, message }) => {
            assert_eq!(code, RejectCode::Unavailable, "{message}");
            assert!(
                message.contains("directory unavailable; retrying"),
                "{message}"
            );
        }
        Err(e) => panic!("dave failed otherwise: {e}"),
        Ok(_) => panic!("dave was admitted while etcd was frozen"),
    }
    // The connected keep their channels.
    message_flows(&to, &from, b"while etcd is frozen").await;
    message_flows(&from, &to, b"both ways").await;
    // carol, closed by B's operator, comes back by herself: refused as
    // unavailable while etcd is frozen, admitted after.
    let status = Command::new(env_bin("qmesh-coordinator"))
        .args(["kick", "carol", "--state-dir"])
        .arg(b.state())
        .output()
        .expect("running qmesh-coordinator kick");
    assert!(status.status.success());
    let mut unavailable = 0;
    loop {
        match next_session_event(&carol_events, STEP * 4, "carol's reconnects").await {
            Event::Connected { .. } => continue,
            Event::Reconnecting { cause, .. } if cause.contains("directory unavailable") => {
                unavailable += 1;
                if frozen.elapsed() >= FROZEN {
                    break;
                }
            }
            Event::Reconnecting { .. } => continue,
            other => panic!("carol while etcd is frozen: {other:?}"),
        }
    }
    assert!(unavailable > 0);
    // A whole lease without keep-alive answers: the operator sees it.
    assert_eq!(
        metric(http, "qmesh_cluster_directory_available").await,
        Some(0.0)
    );
    signal("-CONT");
    let thawed = Instant::now();
    // dave retries until admitted; carol reconnects by herself.
    let (_dave, refusals) = connect_until_admitted(lab.config(&a, "dave"), TTL * 4).await;
    assert!(
        refusals
            .iter()
            .all(|(code, _)| *code == RejectCode::Unavailable),
        "{refusals:?}"
    );
    loop {
        match next_session_event(&carol_events, TTL * 4, "carol to come back").await {
            Event::Reconnected { .. } => break,
            Event::Reconnecting { .. } => continue,
            other => panic!("carol after etcd came back: {other:?}"),
        }
    }
    eprintln!(
        "after etcd continued: dave admitted and carol back within {} ms",
        thawed.elapsed().as_millis()
    );
    message_flows(&to, &from, b"after etcd came back").await;
    assert_eq!(
        metric(http, "qmesh_cluster_directory_available").await,
        Some(1.0)
    );
    let mut names = a.names();
    names.extend(b.names());
    names.sort();
    assert_eq!(names, ["alice", "bob", "carol", "dave"]);
    let in_etcd: Vec<String> = lab.etcd_names().await.into_keys().collect();
    assert_eq!(in_etcd, names);
    watcher.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_etcd_that_loses_a_member_keeps_names_unique_and_claims_working() {
    let Some(mut lab) = Lab::new(3) else { return };
    let (a, b) = (lab.coordinator().await, lab.coordinator().await);
    let _alice = Client::connect(lab.config(&a, "alice"))
        .await
        .expect("alice");
    let watcher = Watcher::start(&[&a, &b]);
    // The member each coordinator is likely talking to: the first given.
    let lost = lab.etcd.remove(0);
    drop(lost);
    // Claims go on through the two members left (after a retry while the
    // coordinators' requests move to them).
    let (_bob, refusals) = connect_until_admitted(lab.config(&b, "bob"), TTL * 4).await;
    assert!(
        refusals
            .iter()
            .all(|(code, _)| *code == RejectCode::Unavailable),
        "{refusals:?}"
    );
    // A second alice is refused NameTaken once the directory answers; while
    // B's etcd client still moves off the lost member it may be told
    // Unavailable, as a client would be, but never admitted.
    let code = refused_once_decided(lab.config(&b, "alice"), TTL * 4).await;
    assert_eq!(code, RejectCode::NameTaken);
    let (_carol, _) = connect_until_admitted(lab.config(&a, "carol"), TTL * 4).await;
    let in_etcd: Vec<String> = lab.etcd_names().await.into_keys().collect();
    assert_eq!(in_etcd, ["alice", "bob", "carol"]);
    watcher.finish().await;
}

/// The value of the unlabelled metric `name` at 127.0.0.1:`port`/metrics.
async fn metric(port: u16, name: &str) -> Option<f64> {
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the HTTP listener");
        s.set_read_timeout(Some(STEP)).expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    })
    .await
    .expect("the scrape")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_coordinator_closes_the_session_on_another_and_is_refused_everywhere() {
    let Some(lab) = Lab::new(1) else { return };
    let (a, b, c) = (
        lab.coordinator().await,
        lab.coordinator().await,
        lab.coordinator().await,
    );
    let config = lab.config(&b, "alice");
    let alice = Client::connect(config.clone()).await.expect("alice on B");
    // bob, on B too, is not revoked and stays.
    let bob = Client::connect(lab.config(&b, "bob")).await.expect("bob");
    let said = admin(&a, &["revoke", "alice"]);
    assert!(said.contains("1 certificate(s) added"), "{said}");
    let reason = within(STEP, "alice on B to end", alice.closed()).await;
    assert!(reason.contains("revoked"), "{reason}");
    // Her certificate is refused by every member, and by one that joins
    // after the revocation.
    let d = lab.coordinator().await;
    for (m, member) in [&a, &b, &c, &d].into_iter().enumerate() {
        let mut again = config.clone();
        again.coordinator = member.address();
        let refused = within(STEP, "alice again", async {
            loop {
                match Client::connect(again.clone()).await {
                    Ok(c) => {
                        // The revocation may still be on its way to this
                        // member: it closes the session when it arrives.
                        let reason = within(STEP, "the session to be closed", c.closed()).await;
                        if reason.contains("revoked") {
                            return reason;
                        }
                    }
                    Err(e) => return e.to_string(),
                }
            }
        })
        .await;
        assert!(
            refused.contains("revoked")
                || refused.contains("not authorised")
                || refused.contains("certificate"),
            "coordinator {m}: {refused}"
        );
    }
    assert_eq!(b.names(), vec!["bob".to_owned()]);
    drop(bob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_stopped_with_sigterm_gives_its_names_back_at_once() {
    let Some(lab) = Lab::new(1) else { return };
    let (mut a, b) = (lab.coordinator().await, lab.coordinator().await);
    assert_eq!(lab.etcd_members().await, 2);
    let carol = Client::connect(lab.config(&a, "carol"))
        .await
        .expect("carol on A");
    a.proc.proc.terminate();
    let exit = a.proc.proc.finish().await;
    assert_eq!(exit.status.code(), Some(0), "{}", exit.stderr);
    assert!(exit.stderr.contains("left the cluster"), "{}", exit.stderr);
    drop(carol);
    // A left the cluster as it stopped: its lease is revoked, so its
    // member key is gone at once, not when the lease would have run out.
    assert_eq!(lab.etcd_members().await, 1);
    // Another credential takes "carol" at the first try: the name did not
    // wait for A's lease to run out.
    let names = lab.etcd_names().await;
    assert!(names.is_empty(), "{names:?}");
    let other = Client::connect(lab.config(&b, "carol")).await;
    assert!(other.is_ok(), "{:?}", other.err());
}

/// Waits until each of `members` has a member link up to every other.
async fn links_up(members: &[&Member]) {
    let want = members.len() - 1;
    let started = Instant::now();
    loop {
        let counts: Vec<usize> = members
            .iter()
            .map(|m| {
                admin_json(m, "info")["data"]["links"]
                    .as_array()
                    .map_or(0, Vec::len)
            })
            .collect();
        if counts.iter().all(|n| *n == want) {
            return;
        }
        assert!(
            started.elapsed() < STEP,
            "member links not up within {STEP:?}: {counts:?} of {want} each"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `streams_relayed` of `member`'s `info`.
fn streams_relayed(member: &Member) -> u64 {
    admin_json(member, "info")["data"]["streams_relayed"]
        .as_u64()
        .expect("streams_relayed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_channel_from_a_client_on_a_to_one_on_b_carries_streams_pipes_and_requests_exactly_both_ways(
) {
    let Some(lab) = Lab::new(1) else { return };
    let (a, b, c) = (
        lab.coordinator().await,
        lab.coordinator().await,
        lab.coordinator().await,
    );
    links_up(&[&a, &b, &c]).await;
    let alice = Client::connect(lab.config(&a, "alice"))
        .await
        .expect("alice on A");
    let bob = Client::connect(lab.config(&b, "bob"))
        .await
        .expect("bob on B");
    let (before_a, before_b) = (streams_relayed(&a), streams_relayed(&b));
    let (to_bob, to_alice) = open_pair(&alice, &bob, "chat").await;
    assert_eq!(to_bob.path(), Path::Relay);
    // Both coordinators show the channel on their link to the other.
    let link_of = |m: &Member| admin_json(m, "info")["data"]["links"].clone();
    let on_a = link_of(&a);
    let on_a = on_a
        .as_array()
        .expect("links")
        .iter()
        .find(|l| l["channels"] == 1)
        .unwrap_or_else(|| panic!("A shows no link with the channel: {on_a}"))
        .clone();
    assert!(link_of(&b).to_string().contains("\"channels\":1"));

    // Streams of several MiB each way, byte for byte.
    carries(&to_bob, &to_alice, &payload(1, 4 << 20)).await;
    carries(&to_alice, &to_bob, &payload(2, 3 << 20)).await;
    // Both coordinators relayed them: one hop each.
    assert!(streams_relayed(&a) >= before_a + 2);
    assert!(streams_relayed(&b) >= before_b + 2);

    // A request from each side, answered by the other.
    let ask = async {
        let reply = to_bob.request(b"ping from A").await.expect("bob's reply");
        assert_eq!(&reply[..], b"pong from B");
    };
    let answer = async {
        match within_ok(STEP, "the request", to_alice.recv_message()).await {
            Incoming::Request(r) => {
                assert_eq!(&r.body()[..], b"ping from A");
                r.reply(b"pong from B").await.expect("reply");
            }
            Incoming::Message(m) => panic!("a message instead of the request: {m:?}"),
        }
    };
    within(STEP, "request and reply", async {
        tokio::join!(ask, answer)
    })
    .await;

    // A pipe opened on B's side, bytes both ways.
    let (mut pipe_b, mut pipe_a) = within(STEP, "a pipe across the link", async {
        tokio::join!(
            async { to_alice.open_pipe().await.expect("open pipe") },
            async { to_bob.accept_pipe().await.expect("a pipe") },
        )
    })
    .await;
    let up = payload(3, 1 << 20);
    let down = payload(4, 1 << 20);
    let (sent_up, got_up, sent_down, got_down) = within(STEP, "pipe bytes", async {
        let (b_send, b_recv) = pipe_b.halves();
        let (a_send, a_recv) = pipe_a.halves();
        let up_w = async {
            b_send.write_all(&up).await.expect("write");
            b_send.finish().expect("finish");
        };
        let down_w = async {
            a_send.write_all(&down).await.expect("write");
            a_send.finish().expect("finish");
        };
        let up_r = async { a_recv.read_to_end(8 << 20).await.expect("read") };
        let down_r = async { b_recv.read_to_end(8 << 20).await.expect("read") };
        let ((), got_up, (), got_down) = tokio::join!(up_w, up_r, down_w, down_r);
        (&up, got_up, &down, got_down)
    })
    .await;
    assert!(got_up == *sent_up, "the pipe's bytes from bob");
    assert!(got_down == *sent_down, "the pipe's bytes from alice");

    // The link's bytes are counted.
    let sent = on_a["sent"].as_u64().expect("sent");
    let now_sent = link_of(&a)
        .as_array()
        .expect("links")
        .iter()
        .find(|l| l["member"] == on_a["member"])
        .expect("the link")["sent"]
        .as_u64()
        .expect("sent");
    assert!(now_sent >= sent + (4 << 20), "{sent} then {now_sent}");

    // A close crosses both hops, once.
    within_ok(STEP, "close", to_bob.close("done")).await;
    match within(STEP, "bob's end", to_alice.ended()).await {
        ChannelEnd::Closed { reason, .. } => assert_eq!(reason, "done"),
        other => panic!("bob's end: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_channel_across_two_coordinators_introduces_each_peer_as_its_own_coordinator_sees_it(
) {
    let Some(lab) = Lab::new(1) else { return };
    let (a, b) = (lab.coordinator().await, lab.coordinator().await);
    links_up(&[&a, &b]).await;
    let alice = Client::connect(lab.config(&a, "alice"))
        .await
        .expect("alice on A");
    let bob = Client::connect(lab.config(&b, "bob"))
        .await
        .expect("bob on B");
    assert!(alice.takes_direct() && bob.takes_direct());
    let (to_bob, to_alice) = open_pair_with(&alice, &bob, "bulk", PathMode::Direct).await;
    // B's observed address of bob reached alice through A, and A's of
    // alice reached bob through B.
    assert_eq!(
        to_bob.path(),
        Path::Direct {
            remote: bob.observed_addr()
        }
    );
    let mut path = to_alice.watch_path();
    within_ok(
        STEP,
        "bob's path becomes direct",
        path.wait_for(|p| {
            *p == Path::Direct {
                remote: alice.observed_addr(),
            }
        }),
    )
    .await;
    let (before_a, before_b) = (streams_relayed(&a), streams_relayed(&b));
    carries(&to_bob, &to_alice, &payload(5, 3 << 20)).await;
    carries(&to_alice, &to_bob, &payload(6, 1 << 20)).await;
    assert_eq!(
        (streams_relayed(&a), streams_relayed(&b)),
        (before_a, before_b),
        "no data stream may pass through either coordinator"
    );
    within_ok(STEP, "close", to_alice.close("bye")).await;
    assert!(matches!(
        within(STEP, "alice's end", to_bob.ended()).await,
        ChannelEnd::Closed { .. }
    ));
}

/// Waits until, on each of `members`, every member link carries `groups`
/// broadcast groups to the other side.
async fn groups_fed(members: &[&Member], groups: u64) {
    let started = Instant::now();
    loop {
        let fed: Vec<Vec<u64>> = members
            .iter()
            .map(|m| {
                admin_json(m, "info")["data"]["links"]
                    .as_array()
                    .map(|ls| ls.iter().filter_map(|l| l["groups"].as_u64()).collect())
                    .unwrap_or_default()
            })
            .collect();
        if fed
            .iter()
            .all(|f| f.len() == members.len() - 1 && f.iter().all(|n| *n == groups))
        {
            return;
        }
        assert!(
            started.elapsed() < STEP,
            "groups not fed over every link within {STEP:?}: {fed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_group_with_a_member_on_each_coordinator_reaches_every_member_once_in_order() {
    let Some(lab) = Lab::new(1) else { return };
    let (a, b, c) = (
        lab.coordinator().await,
        lab.coordinator().await,
        lab.coordinator().await,
    );
    links_up(&[&a, &b, &c]).await;
    let mut members = Vec::new();
    for (m, name) in [(&a, "alice"), (&b, "bob"), (&c, "carol")] {
        let client = Client::connect(lab.config(m, name))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let group = within_ok(STEP, "join", client.join("room")).await;
        members.push((name, client, group));
    }
    // Each coordinator asked the other two for the group's broadcasts.
    groups_fed(&[&a, &b, &c], 1).await;

    const EACH: usize = 25;
    let body = |from: &str, i: usize| -> Vec<u8> {
        // Every fifth one large, so that bodies span many QUIC packets.
        let len = if i % 5 == 0 { 48 << 10 } else { 16 };
        let mut b = format!("{from}#{i}:").into_bytes();
        b.extend(payload(i as u64, len));
        b
    };
    within(STEP, "every member's broadcasts", async {
        let sends = members.iter().map(|(name, _, group)| async move {
            for i in 0..EACH {
                group.send(&body(name, i)).await.expect("send");
            }
        });
        let recvs = members.iter().map(|(me, _, group)| async move {
            // Per sender, what arrived, in order.
            let mut got: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
            while got.values().map(Vec::len).sum::<usize>() < 3 * EACH {
                match group.recv().await.expect("recv") {
                    Some(qmesh_client::GroupEvent::Message { from, body }) => {
                        got.entry(from).or_default().push(body.to_vec())
                    }
                    other => panic!("{me} got {other:?}"),
                }
            }
            (me, got)
        });
        let (_, got) = tokio::join!(
            futures_util::future::join_all(sends),
            futures_util::future::join_all(recvs)
        );
        for (me, got) in got {
            let senders: Vec<&String> = got.keys().collect();
            assert_eq!(senders, ["alice", "bob", "carol"], "{me} heard from");
            for (from, bodies) in &got {
                let want: Vec<Vec<u8>> = (0..EACH).map(|i| body(from, i)).collect();
                assert!(
                    *bodies == want,
                    "{me}: {from}'s broadcasts not each once in order ({} arrived)",
                    bodies.len()
                );
            }
        }
    })
    .await;
}

/// The next presence event of `watch` that is not `Lagged`.
async fn next_presence(watch: &mut qmesh_client::presence::Watch, what: &str) -> PresenceEvent {
    within(STEP, what, async {
        loop {
            match watch.next().await {
                Some(PresenceEvent::Lagged { .. }) => continue,
                Some(event) => return event,
                None => panic!("the watch ended waiting for {what}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_describe_on_any_coordinator_cover_the_clients_of_every_coordinator() {
    let Some(lab) = Lab::new(1) else { return };
    let (a, b, mut c) = (
        lab.coordinator().await,
        lab.coordinator().await,
        lab.coordinator().await,
    );
    links_up(&[&a, &b, &c]).await;
    let offers = |name: &str| vec![Interface::new(name, format!("{name} for the test"))];
    let mut config = lab.config(&a, "alice");
    config.interfaces = offers("chat");
    let alice = Client::connect(config).await.expect("alice on A");
    let mut config = lab.config(&b, "bob");
    config.interfaces = offers("files");
    let _bob = Client::connect(config).await.expect("bob on B");
    let mut config = lab.config(&c, "carol");
    config.interfaces = offers("feed");
    let carol = Client::connect(config).await.expect("carol on C");

    // The list from each coordinator has everyone, with what each offers.
    let want: BTreeMap<String, Vec<String>> =
        [("alice", "chat"), ("bob", "files"), ("carol", "feed")]
            .into_iter()
            .map(|(n, i)| (n.to_owned(), vec![i.to_owned()]))
            .collect();
    for client in [&alice, &carol] {
        let listed: BTreeMap<String, Vec<String>> = within_ok(STEP, "peers", client.peers())
            .await
            .into_iter()
            .map(|p| (p.name, p.interfaces.into_iter().map(|i| i.name).collect()))
            .collect();
        assert_eq!(listed, want);
    }
    // `qmesh peers` through B.
    let ca = lab.dir.path().join("ca.pem");
    let state = lab.dir.path().join("cli-state");
    let listed = process::qmesh(
        &b.proc.v4(),
        &ca,
        &state,
        &["--name", "erin", "peers", "--json"],
    )
    .finish()
    .await;
    assert!(
        listed.status.success(),
        "{}{}",
        listed.stdout,
        listed.stderr
    );
    let doc: serde_json::Value = serde_json::from_str(&listed.stdout).expect("JSON");
    let names: BTreeSet<&str> = doc
        .as_array()
        .expect("an array")
        .iter()
        .map(|p| p["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(names, BTreeSet::from(["alice", "bob", "carol", "erin"]));

    // Describe reaches the offerer's coordinator, and its refusal comes back.
    let files = within_ok(
        STEP,
        "describe",
        alice.describe(&"mesh/bob!files".parse().unwrap()),
    )
    .await;
    assert_eq!(files.purpose, "files for the test");
    let refused = within(
        STEP,
        "describe",
        alice.describe(&"mesh/bob!chat".parse().unwrap()),
    )
    .await
    .expect_err("bob does not offer chat");
    assert!(
        refused.to_string().contains("it offers: files"),
        "{refused}"
    );

    // A live watch on A sees a client join and leave on C, and an
    // interface change on B... through the links.
    let mut watch = within_ok(STEP, "watch", alice.watch()).await;
    let mut listed = BTreeSet::new();
    loop {
        match next_presence(&mut watch, "the list").await {
            PresenceEvent::Present { name, .. } => {
                listed.insert(name.into_string());
            }
            PresenceEvent::Synced => break,
            other => panic!("{other:?} in the list"),
        }
    }
    assert_eq!(
        listed,
        BTreeSet::from(["alice", "bob", "carol"].map(String::from))
    );
    let dave = Client::connect(lab.config(&c, "dave"))
        .await
        .expect("dave on C");
    match next_presence(&mut watch, "dave's join").await {
        PresenceEvent::Joined { name, .. } => assert_eq!(name.as_str(), "dave"),
        other => panic!("{other:?} instead of dave's join"),
    }
    within_ok(STEP, "interfaces", carol.set_interfaces(offers("news"))).await;
    match next_presence(&mut watch, "carol's change").await {
        PresenceEvent::Changed { name, interfaces } => {
            assert_eq!(name.as_str(), "carol");
            assert_eq!(interfaces[0].name, "news");
        }
        other => panic!("{other:?} instead of carol's change"),
    }
    dave.close("done").await;
    match next_presence(&mut watch, "dave's leave").await {
        PresenceEvent::Left { name } => assert_eq!(name.as_str(), "dave"),
        other => panic!("{other:?} instead of dave's leave"),
    }
    // C stops: its clients leave A's view with its link.
    drop(carol);
    c.proc.proc.kill().await;
    match next_presence(&mut watch, "carol gone with C").await {
        PresenceEvent::Left { name } => assert_eq!(name.as_str(), "carol"),
        other => panic!("{other:?} instead of carol's leave"),
    }
}

/// Message `i` of 1 MiB, numbered.
fn numbered(i: u64) -> Vec<u8> {
    let mut m = vec![(i % 251) as u8; 1 << 20];
    m[..8].copy_from_slice(&i.to_be_bytes());
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_on_b_holds_back_a_writer_on_a_with_both_coordinators_memory_bounded() {
    const MIB: u64 = 1 << 20;
    /// What the writer tries to push: far more than every window on the
    /// way.
    const PUSH: u64 = 128 * MIB;
    /// Five 2 MiB stream windows (writer, A in, the link, B in, bob) and
    /// a message in hand, with room.
    const WRITER_BOUND: u64 = 24 * MIB;
    /// Most either coordinator may grow over its size with the channels
    /// open.
    const GROWTH_KIB: u64 = 64 * 1024;
    let Some(lab) = Lab::new(1) else { return };
    let (a, b) = (lab.coordinator().await, lab.coordinator().await);
    links_up(&[&a, &b]).await;
    let connect = |at: &Member, name: &str| Client::connect(lab.config(at, name));
    let (alice, bob, carol, dave) = tokio::join!(
        connect(&a, "alice"),
        connect(&b, "bob"),
        connect(&a, "carol"),
        connect(&b, "dave")
    );
    let (alice, bob, carol, dave) = (
        alice.expect("alice"),
        bob.expect("bob"),
        carol.expect("carol"),
        dave.expect("dave"),
    );
    let (slow_out, slow_in) = open_pair(&alice, &bob, "slow").await;
    let (fast_out, fast_in) = open_pair(&carol, &dave, "fast").await;
    let pids = [a.proc.proc.pid(), b.proc.proc.pid()];
    let idle: Vec<u64> = pids
        .iter()
        .map(|p| memory_kib(*p).expect("RSS").0)
        .collect();

    // Alice pushes at bob, who takes the stream and does not read it.
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (started_tx, mut started) = tokio::sync::watch::channel(false);
    let writer = {
        let written = written.clone();
        tokio::spawn(async move {
            let mut out = slow_out.open_stream().await.expect("stream");
            for i in 0..PUSH / MIB {
                out.send(&numbered(i)).await.expect("send");
                written.fetch_add(MIB, Ordering::SeqCst);
                let _ = started_tx.send(true);
            }
            out.finish().await.expect("finish");
            slow_out
        })
    };
    let mut stalled = next_stream(&slow_in).await;
    within_ok(STEP, "the writer to start", started.wait_for(|s| *s)).await;

    // Meanwhile carol moves 64 MiB to dave over the same link, in full:
    // the stalled stream holds up nothing else.
    for i in 0..16 {
        carries(&fast_out, &fast_in, &payload(i, 4 << 20)).await;
    }

    let ahead = written.load(Ordering::SeqCst);
    let peaks: Vec<u64> = pids
        .iter()
        .map(|p| memory_kib(*p).expect("RSS").1)
        .collect();
    eprintln!(
        "stalled writer {} MiB ahead of its reader; A's RSS {} KiB idle, peak {} KiB; B's {} KiB idle, peak {} KiB",
        ahead / MIB,
        idle[0],
        peaks[0],
        idle[1],
        peaks[1]
    );
    assert!(
        ahead <= WRITER_BOUND,
        "the writer got {ahead} bytes ahead across two hops (bound {WRITER_BOUND})"
    );
    for (i, who) in ["A", "B"].iter().enumerate() {
        let growth = peaks[i].saturating_sub(idle[i]);
        assert!(growth <= GROWTH_KIB, "{who} grew by {growth} KiB");
    }

    // Bob reads now: everything arrives, in order and intact.
    let read = async {
        let mut n = 0u64;
        while let Some(m) = stalled.recv().await.expect("recv") {
            assert!(m == numbered(n), "message {n}");
            n += 1;
        }
        n
    };
    let (n, slow_out) = within(STEP * 2, "the stalled stream to drain", async {
        tokio::join!(read, async { writer.await.expect("writer") })
    })
    .await;
    assert_eq!(n, PUSH / MIB);
    within_ok(STEP, "close", slow_out.close("done")).await;
}
