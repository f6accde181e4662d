//! `qmesh-coordinator run --http`: Prometheus metrics checked by
//! `promtool` and against a known transfer, the bearer token, and the
//! status page in headless Chromium.
//!
//! Every coordinator listens on loopback only, on ports the system picks
//! (`--http 127.0.0.1:0`; the address is read from the coordinator's log
//! line). Every wait is bounded and waits for an event (a line of output,
//! an exit, a DOM change); nothing sleeps to synchronise.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use qmesh_integration_tests::process::{self, show, Proc};
use qmesh_integration_tests::programs::{self, require};
use qmesh_integration_tests::target::CoordinatorProc;
use qmesh_integration_tests::{payload, within, within_ok, STEP};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The size of the known transfer.
const FILE_SIZE: usize = 1024 * 1024;

/// A coordinator process with its HTTP listener.
struct Coord {
    /// The process, stopped when this is dropped.
    _proc: Proc,
    port: u16,
    ca: PathBuf,
    state_dir: PathBuf,
    http: SocketAddr,
}

/// `qmesh-coordinator run --listen quic/$4:0 --state-dir DIR --http
/// 127.0.0.1:0 EXTRA...`, once it has said where it serves HTTP.
async fn start(dir: &Path, extra: &[&OsStr]) -> Coord {
    let mut args: Vec<&OsStr> = vec!["--http".as_ref(), "127.0.0.1:0".as_ref()];
    args.extend(extra.iter().copied());
    let (mut coord, ca) = CoordinatorProc::start_dev(dir, &args).await;
    let line = coord
        .proc
        .stderr_line("`serving /metrics`", |l| l.contains("serving /metrics"))
        .await;
    let http = line
        .split_once("url=http://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(addr, _)| addr.parse::<SocketAddr>().unwrap())
        .unwrap_or_else(|| panic!("no url=http://ADDR/ in {line:?}"));
    assert!(http.ip().is_loopback(), "{line}");
    Coord {
        _proc: coord.proc,
        port: coord.port,
        ca,
        state_dir: dir.to_owned(),
        http,
    }
}

impl Coord {
    /// `qmesh --coordinator quic/$4:PORT --ca CA --state-dir STATE ARGS`.
    fn qmesh(&self, state: &Path, args: &[&str]) -> Proc {
        process::qmesh(&format!("quic/$4:{}", self.port), &self.ca, state, args)
    }
}

/// An HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// `GET path` on `at` with HTTP/1.1, with `Authorization: AUTH` when given.
async fn get(at: SocketAddr, path: &str, auth: Option<&str>) -> Answer {
    let what = format!("GET http://{at}{path}");
    let answer = within_ok(STEP, &what, async {
        let mut stream = tokio::net::TcpStream::connect(at).await?;
        let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {at}\r\n{auth}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    })
    .await;
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    // Every answer has a length: the body is the rest.
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// `/metrics`, which must answer 200 in the Prometheus text format.
async fn scrape(at: SocketAddr) -> String {
    let answer = get(at, "/metrics", None).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer
            .head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        answer.head
    );
    answer.body
}

/// The value of the sample `name` (labels included, as written) in the
/// Prometheus text `text`; the test fails when there is none.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

/// `qmesh --name bob listen chat --out OUT`, once it is ready.
async fn listen_into(coord: &Coord, state: &Path, out: &Path) -> Proc {
    let mut bob = coord.qmesh(
        state,
        &[
            "--name",
            "bob",
            "listen",
            "chat",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    bob.ready().await;
    bob
}

/// The metrics pass `promtool check metrics` after a client joined, a
/// relayed channel carried a file and a hello was refused, and they count
/// what happened: `qmesh_relayed_bytes_total` grew by at least the file
/// (1 MiB through `send --mode relay`), a session joined per client, the
/// refused hello shows under its reject code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_a_relayed_transfer() {
    let Some(promtool) = require("promtool") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clients = tempfile::tempdir().unwrap();
    let coord = start(dir.path(), &[]).await;

    let out = clients.path().join("received");
    let mut bob = listen_into(&coord, clients.path(), &out).await;
    let before = scrape(coord.http).await;
    assert_eq!(sample(&before, "qmesh_sessions"), 1.0, "{before}");

    let file = clients.path().join("one-MiB.bin");
    let data = payload(7, FILE_SIZE);
    std::fs::write(&file, &data).unwrap();
    let sent = coord
        .qmesh(
            clients.path(),
            &[
                "--name",
                "alice",
                "send",
                "--mode",
                "relay",
                "mesh/bob!chat",
                "--file",
                file.to_str().unwrap(),
            ],
        )
        .finish()
        .await;
    assert!(sent.status.success(), "send: {}", show(&sent));
    assert!(
        sent.stderr.contains(&format!(
            "the peer confirmed 0 line(s), {FILE_SIZE} byte(s)"
        )),
        "{}",
        show(&sent)
    );
    bob.stderr_line("`file received`", |l| l.contains("file received"))
        .await;
    assert!(std::fs::read(out.join("one-MiB.bin")).unwrap() == data);

    // A second bob with another credential is refused: the name is taken.
    let other = tempfile::tempdir().unwrap();
    let twin = coord
        .qmesh(other.path(), &["--name", "bob", "listen", "chat"])
        .finish()
        .await;
    assert!(!twin.status.success(), "{}", show(&twin));

    let after = scrape(coord.http).await;
    let grown =
        sample(&after, "qmesh_relayed_bytes_total") - sample(&before, "qmesh_relayed_bytes_total");
    assert!(
        grown >= FILE_SIZE as f64,
        "qmesh_relayed_bytes_total grew by {grown}, less than the {FILE_SIZE} bytes sent:\n{after}"
    );
    assert!(sample(&after, "qmesh_relayed_streams_total") >= 1.0);
    assert!(sample(&after, "qmesh_channels_joined_total") >= 1.0);
    assert_eq!(sample(&after, "qmesh_sessions_admitted_total"), 2.0);
    assert_eq!(
        sample(&after, "qmesh_handshakes_total{result=\"joined\"}"),
        2.0
    );
    assert_eq!(
        sample(&after, "qmesh_handshakes_total{result=\"refused\"}"),
        1.0
    );
    assert_eq!(
        sample(&after, "qmesh_rejects_total{code=\"NameTaken\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "qmesh_rejects_total{code=\"NotAuthorised\"}"),
        0.0
    );
    assert_eq!(sample(&after, "qmesh_rate_limited_total"), 0.0);
    assert_eq!(sample(&after, "qmesh_worker_restarts_total"), 0.0);
    for name in [
        "qmesh_channels{path=\"relay\"}",
        "qmesh_channels{path=\"direct\"}",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        sample(&after, name);
    }
    assert!(sample(&after, "process_resident_memory_bytes") > 1e6);

    let out = programs::run_with_input(
        promtool.to_str().unwrap(),
        &["check", "metrics"],
        after.as_bytes(),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "promtool: {}\n{after}",
        programs::show(&out)
    );
    println!(
        "promtool check metrics: {} {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    bob.kill().await;
}

/// With `--http-token-file`, every request needs `Authorization: Bearer
/// TOKEN`: without it, or with another token, the answer is 401 (also for
/// paths that do not exist); with it, 200. Off loopback without a token
/// file the coordinator does not start, and says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_token_is_required_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("http-token");
    std::fs::write(&token_file, "k7Jd0-this-is-the-token\n").unwrap();
    let coord = start(
        &dir.path().join("state"),
        &["--http-token-file".as_ref(), token_file.as_os_str()],
    )
    .await;
    for path in ["/metrics", "/status.json", "/", "/nothing-here"] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Bearer k7Jd0-this-is-the-token-and-more"),
            Some("Basic k7Jd0-this-is-the-token"),
        ] {
            let answer = get(coord.http, path, auth).await;
            assert_eq!(answer.status, 401, "{path} with {auth:?}: {answer:?}");
            assert!(
                answer
                    .head
                    .to_ascii_lowercase()
                    .contains("www-authenticate: bearer"),
                "{answer:?}"
            );
            assert!(!answer.body.contains("qmesh_"), "{answer:?}");
        }
    }
    let ok = Some("Bearer k7Jd0-this-is-the-token");
    let metrics = get(coord.http, "/metrics", ok).await;
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert!(metrics.body.contains("qmesh_sessions 0"), "{metrics:?}");
    let status = get(coord.http, "/status.json", ok).await;
    assert_eq!(status.status, 200, "{status:?}");
    let status: Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(status["info"]["clients"], 0);
    assert!(status["events"].is_array(), "{status}");
    let page = get(coord.http, "/", ok).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>qmesh coordinator</title>"));
    assert_eq!(get(coord.http, "/nothing-here", ok).await.status, 404);
    drop(coord);

    // 192.0.2.1 is a documentation address no host has: even a
    // coordinator that did not refuse could not bind it.
    let refused = Proc::spawn(
        "qmesh-coordinator",
        [
            "run",
            "--listen",
            "quic/$4:0",
            "--state-dir",
            dir.path().join("state2").to_str().unwrap(),
            "--http",
            "192.0.2.1:9464",
        ],
        &[],
    )
    .finish()
    .await;
    assert!(!refused.status.success(), "{}", show(&refused));
    assert!(
        refused
            .stderr
            .contains("--http 192.0.2.1:9464 is not a loopback address")
            && refused.stderr.contains("--http-token-file FILE"),
        "{}",
        show(&refused)
    );
}

/// Two coordinators in one process, each with its own HTTP listener:
/// each registry reports its own coordinator (a client on the first
/// shows there only). A coordinator built from a `Config` whose HTTP
/// listener is off loopback without a token is refused before it binds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_in_one_process_report_separately() {
    let http = |c: &mut qmesh_coordinator::Config| {
        c.http = Some(qmesh_coordinator::config::HttpConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            token: None,
        });
    };
    let one = qmesh_integration_tests::Mesh::start_with(http).await;
    let two = qmesh_integration_tests::Mesh::start_with(http).await;
    let (at_one, at_two) = (
        one.coordinator.http_addr().unwrap(),
        two.coordinator.http_addr().unwrap(),
    );
    assert_ne!(at_one, at_two);
    let _alice = one.client("alice").await;
    let (m1, m2) = (scrape(at_one).await, scrape(at_two).await);
    assert_eq!(sample(&m1, "qmesh_sessions"), 1.0, "{m1}");
    assert_eq!(sample(&m1, "qmesh_sessions_admitted_total"), 1.0);
    assert_eq!(sample(&m2, "qmesh_sessions"), 0.0, "{m2}");
    assert_eq!(sample(&m2, "qmesh_sessions_admitted_total"), 0.0);
    let status = get(at_one, "/status.json", None).await;
    let status: Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(status["clients"][0]["name"], "alice", "{status}");

    let ca = qmesh_certs::Ca::generate("test CA").unwrap();
    let mut config =
        qmesh_coordinator::Config::new(ca.issue_server(&["localhost".into()]).unwrap());
    config.listen = "127.0.0.1:0".parse().unwrap();
    // 192.0.2.1 is a documentation address no host has.
    config.http = Some(qmesh_coordinator::config::HttpConfig {
        addr: "192.0.2.1:9464".parse().unwrap(),
        token: None,
    });
    let refused = qmesh_coordinator::Coordinator::bind(config).unwrap_err();
    assert!(
        matches!(refused, qmesh_coordinator::BindError::HttpNeedsToken(_)),
        "{refused}"
    );
}

/// A headless Chromium driven over the DevTools protocol (a websocket).
struct Browser {
    child: tokio::process::Child,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
    /// Events read while waiting for a reply, for [`Browser::event`].
    events: Vec<Value>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start `chromium` with a new profile and connect to its DevTools
    /// endpoint, which it names on stderr.
    async fn start(chromium: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1200,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting chromium");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        let url = within(STEP, "chromium's `DevTools listening on`", async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return Some(url.trim().to_owned());
                }
                seen.push(line);
            }
            None
        })
        .await
        .unwrap_or_else(|| panic!("chromium exited; its stderr:\n{}", seen.join("\n")));
        // Keep reading, so that chromium never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = within_ok(
            STEP,
            "connecting to chromium",
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await;
        Browser {
            child,
            ws,
            next: 0,
            events: Vec::new(),
            _profile: profile,
        }
    }

    /// Call `method` (in the page `session`, when given) and return its
    /// result; events that arrive meanwhile are skipped.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        let (ws, events) = (&mut self.ws, &mut self.events);
        within(STEP, &format!("DevTools {method}"), async move {
            ws.send(tokio_tungstenite::tungstenite::Message::text(
                message.to_string(),
            ))
            .await
            .expect("sending to chromium");
            loop {
                let frame = ws
                    .next()
                    .await
                    .expect("chromium closed the DevTools connection")
                    .expect("reading from chromium");
                let Ok(text) = frame.to_text() else { continue };
                let Ok(reply) = serde_json::from_str::<Value>(text) else {
                    continue;
                };
                if reply.get("id").is_none() {
                    events.push(reply);
                    continue;
                }
                if reply["id"] != json!(id) {
                    continue;
                }
                if let Some(error) = reply.get("error") {
                    panic!("DevTools {method}: {error}");
                }
                return reply["result"].clone();
            }
        })
        .await
    }

    /// Wait for the event `method` of the tab `session`.
    async fn event(&mut self, session: &str, method: &str) -> Value {
        let (ws, events) = (&mut self.ws, &mut self.events);
        within(STEP, &format!("DevTools event {method}"), async move {
            let matches = |e: &Value| e["method"] == method && e["sessionId"] == session;
            if let Some(i) = events.iter().position(matches) {
                return events.remove(i);
            }
            loop {
                let frame = ws
                    .next()
                    .await
                    .expect("chromium closed the DevTools connection")
                    .expect("reading from chromium");
                let Ok(text) = frame.to_text() else { continue };
                match serde_json::from_str::<Value>(text) {
                    Ok(event) if matches(&event) => return event,
                    _ => continue,
                }
            }
        })
        .await
    }

    /// Open `url` in a new tab and wait until it has loaded; returns the
    /// tab's session.
    async fn open(&mut self, url: &str) -> String {
        let target = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let session = attached["sessionId"].as_str().unwrap().to_owned();
        self.call(Some(&session), "Page.enable", json!({})).await;
        // about:blank's own load is over by now: the load awaited below
        // is the page's.
        self.events.clear();
        let navigated = self
            .call(Some(&session), "Page.navigate", json!({"url": url}))
            .await;
        assert!(navigated.get("errorText").is_none(), "{url}: {navigated}");
        self.event(&session, "Page.loadEventFired").await;
        session
    }

    /// The value of the JavaScript `expression` in the tab, awaited when
    /// it is a promise.
    async fn eval(&mut self, session: &str, expression: &str) -> Value {
        let result = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = result.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        result["result"]["value"].clone()
    }

    /// Wait until the page has an element matching `selector`: a
    /// MutationObserver in the page answers as soon as the DOM has one, or
    /// `false` after 20 s.
    async fn wait_for(&mut self, session: &str, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let found = self
            .eval(
                session,
                &format!(
                    "new Promise(resolve => {{
                        const found = () => document.querySelector({sel}) !== null;
                        if (found()) return resolve(true);
                        const watch = new MutationObserver(() => {{
                            if (found()) {{ watch.disconnect(); resolve(true); }}
                        }});
                        watch.observe(document.documentElement,
                            {{subtree: true, childList: true, attributes: true, characterData: true}});
                        setTimeout(() => {{ watch.disconnect(); resolve(found()); }}, 20000);
                    }})"
                ),
            )
            .await;
        if found != json!(true) {
            let body = self.eval(session, "document.body.innerText").await;
            panic!("the status page has no {selector} after 20 s; it shows:\n{body}");
        }
    }
}

impl Browser {
    /// Ask chromium to close (it then removes its temporary files, which
    /// a kill leaves behind) and wait for it to exit.
    async fn close(mut self) {
        // No waiting for the reply: chromium may close the connection
        // first.
        let message = json!({"id": self.next + 1, "method": "Browser.close"}).to_string();
        let _ = self
            .ws
            .send(tokio_tungstenite::tungstenite::Message::text(message))
            .await;
        within_ok(STEP, "chromium to exit", self.child.wait()).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The status page, loaded in headless Chromium before any client joined,
/// shows clients and channels that came after, by updating itself.
///
/// Chromium runs with `--remote-debugging-port=0` and the test drives it
/// over the DevTools protocol (`tokio-tungstenite`): it opens the page,
/// waits until the page has shown its first sample, and leaves a mark in
/// the page's `window`. Then alice opens a relayed channel to bob and
/// carol a direct one to dave. The test waits in the page (a
/// MutationObserver, no polling) until their rows appear, and checks the
/// rows and the mark: the same document, never reloaded, put them there
/// from its own requests to `/status.json`. Last, an operator kicks alice
/// with a reason holding markup: the event shows it as text and nothing in
/// it became an element.
///
/// With `QMESH_STATUS_SCREENSHOT=FILE` it also saves a screenshot of the
/// page there (how `docs/status-page.png` was made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_clients_that_join_after_it_loaded() {
    let Some(chromium) = require("chromium") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clients = tempfile::tempdir().unwrap();
    let coord = start(dir.path(), &[]).await;
    let mut browser = Browser::start(&chromium).await;
    let page = browser.open(&format!("http://{}/", coord.http)).await;

    browser.wait_for(&page, "#state.live").await;
    let empty = browser
        .eval(
            &page,
            "window.qmeshMark = 'loaded before the clients'; \
             [document.querySelectorAll('tr.client').length, \
              document.querySelectorAll('tr.channel').length, \
              document.getElementById('clients-count').textContent]",
        )
        .await;
    assert_eq!(empty, json!([0, 0, "0"]));

    let mut bob = coord.qmesh(clients.path(), &["--name", "bob", "listen", "chat"]);
    bob.ready().await;
    let mut alice = coord.qmesh(
        clients.path(),
        &[
            "--name",
            "alice",
            "send",
            "--mode",
            "relay",
            "mesh/bob!chat",
        ],
    );
    alice.write_stdin(b"hello through the relay\n").await;
    assert_eq!(
        bob.stdout_line("alice's line", |_| true).await,
        "hello through the relay"
    );
    let mut dave = coord.qmesh(clients.path(), &["--name", "dave", "listen", "files"]);
    dave.ready().await;
    let mut carol = coord.qmesh(
        clients.path(),
        &[
            "--name",
            "carol",
            "send",
            "--mode",
            "direct",
            "mesh/dave!files",
        ],
    );
    carol.write_stdin(b"hello peer to peer\n").await;
    assert_eq!(
        dave.stdout_line("carol's line", |_| true).await,
        "hello peer to peer"
    );

    let relayed = r#"tr.channel[data-opener="alice"][data-callee="bob"][data-name="chat"][data-path="relay"]"#;
    let direct = r#"tr.channel[data-opener="carol"][data-callee="dave"][data-name="files"][data-path="direct"]"#;
    for selector in [
        r#"tr.client[data-name="alice"]"#,
        r#"tr.client[data-name="bob"]"#,
        r#"tr.client[data-name="carol"]"#,
        r#"tr.client[data-name="dave"]"#,
        relayed,
        direct,
    ] {
        browser.wait_for(&page, selector).await;
    }
    let (relayed_js, direct_js) = (
        serde_json::to_string(relayed).unwrap(),
        serde_json::to_string(direct).unwrap(),
    );
    let shown = browser
        .eval(
            &page,
            &format!(
                "(() => {{
                    const row = s => Array.from(document.querySelector(s).cells, c => c.textContent);
                    return {{
                        mark: window.qmeshMark,
                        clients: Array.from(document.querySelectorAll('tr.client'), r => r.dataset.name),
                        relayed: row({relayed_js}),
                        direct: row({direct_js}),
                        path: document.querySelector({relayed_js} + ' .path.relay').textContent,
                        count: document.getElementById('clients-count').textContent,
                    }};
                }})()"
            ),
        )
        .await;
    assert_eq!(shown["mark"], "loaded before the clients", "{shown}");
    assert_eq!(
        shown["clients"],
        json!(["alice", "bob", "carol", "dave"]),
        "{shown}"
    );
    assert_eq!(shown["count"], "4");
    assert_eq!(shown["relayed"][1], "alice", "{shown}");
    assert_eq!(shown["relayed"][2], "bob");
    assert_eq!(shown["relayed"][3], "chat");
    assert_eq!(shown["relayed"][4], "relay");
    assert_eq!(shown["path"], "relay");
    assert_eq!(shown["direct"][3], "files", "{shown}");
    assert_eq!(shown["direct"][4], "direct");

    // Markup in an event is shown as text.
    let hostile = r#"<img id="pwned" src="x" onerror="window.qmeshPwned = 1">"#;
    let kicked = Proc::spawn(
        "qmesh-coordinator",
        [
            "kick",
            "alice",
            "--reason",
            hostile,
            "--state-dir",
            coord.state_dir.to_str().unwrap(),
        ],
        &[],
    )
    .finish()
    .await;
    assert!(kicked.status.success(), "{}", show(&kicked));
    browser
        .wait_for(&page, r#"#events li.event[data-kind="kick"]"#)
        .await;
    let kick = browser
        .eval(
            &page,
            "[document.querySelector('#events li.event[data-kind=\"kick\"] .what').textContent, \
              document.getElementById('pwned') === null, \
              document.querySelectorAll('#events img').length, \
              window.qmeshPwned === undefined, window.qmeshMark]",
        )
        .await;
    assert!(
        kick[0].as_str().unwrap().contains(hostile),
        "the kick event shows the reason as written: {kick}"
    );
    assert_eq!(
        kick,
        json!([kick[0], true, 0, true, "loaded before the clients"])
    );

    if let Some(path) = std::env::var_os("QMESH_STATUS_SCREENSHOT") {
        // Some seconds of samples for the throughput graph (alice, kicked,
        // has ended her send).
        let mut erin = coord.qmesh(
            clients.path(),
            &["--name", "erin", "send", "--mode", "relay", "mesh/bob!chat"],
        );
        for n in 0..20 {
            erin.write_stdin(format!("line {n} {}\n", "x".repeat(20_000)).as_bytes())
                .await;
            bob.stdout_line("a line", |_| true).await;
            browser
                .eval(&page, "new Promise(r => setTimeout(() => r(true), 500))")
                .await;
        }
        let height = browser
            .eval(&page, "document.documentElement.scrollHeight")
            .await;
        browser
            .call(
                Some(&page),
                "Emulation.setDeviceMetricsOverride",
                json!({"width": 1200, "height": height, "deviceScaleFactor": 1, "mobile": false}),
            )
            .await;
        let shot = browser
            .call(
                Some(&page),
                "Page.captureScreenshot",
                json!({"format": "png"}),
            )
            .await;
        let png = base64_decode(shot["data"].as_str().unwrap());
        std::fs::write(&path, png).unwrap();
        println!("screenshot: {}", Path::new(&path).display());
        erin.kill().await;
    }
    browser.close().await;
    for p in [&mut alice, &mut carol, &mut bob, &mut dave] {
        p.kill().await;
    }
}

/// Standard base64 (a DevTools screenshot).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    bytes
        .chunks(4)
        .flat_map(|c| {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &v)| n | u32::from(v) << (18 - 6 * i));
            let out = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.into_iter().take(c.len() - 1)
        })
        .collect()
}
