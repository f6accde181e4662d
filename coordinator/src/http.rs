//! The HTTP listener of `run --http ADDR`: Prometheus metrics at
//! `/metrics`, the coordinator's state as JSON at `/status.json` (`info`,
//! `clients`, `channels`, `events`, as the operator commands give them),
//! and at `/` a status page that shows it, updating itself every second.
//!
//! Bound anywhere but loopback it needs a [`BearerToken`]
//! (`--http-token-file`): every request must carry
//! `Authorization: Bearer TOKEN`, or it is answered 401. On loopback a
//! token is optional (required when given).
//!
//! The page (`status.html`) is one file with no external assets. Its
//! script puts every string from the JSON into the page as text, never as
//! markup, and the page's Content-Security-Policy allows that one script
//! (by its hash) and nothing else, no inline handlers included.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bearer::BearerToken;
use crate::control::{ChannelInfo, ClientInfo, Control, Info};
use crate::metrics::Metrics;
use crate::session::Event;

/// The status page.
const PAGE: &str = include_str!("status.html");

/// Most HTTP connections open at once; further ones wait in the kernel's
/// backlog until one closes.
pub const MAX_CONNECTIONS: usize = 64;

/// How long open connections get to finish once the coordinator stops.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What `/status.json` answers.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The coordinator at a glance.
    pub info: Info,
    /// The connected clients.
    pub clients: Vec<ClientInfo>,
    /// The joined channels.
    pub channels: Vec<ChannelInfo>,
    /// The last joins, leaves, kicks and reloads, newest last.
    pub events: Vec<Event>,
}

#[derive(Debug)]
struct App {
    control: Control,
    metrics: Metrics,
    token: Option<BearerToken>,
    /// The page's Content-Security-Policy.
    policy: HeaderValue,
}

/// The listener's routes for the coordinator `control` acts on, each
/// behind `token` when there is one.
pub fn router(control: Control, token: Option<BearerToken>) -> Router {
    let app = Arc::new(App {
        metrics: Metrics::new(control.clone()),
        control,
        token,
        policy: page_policy(PAGE),
    });
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/status.json", get(status))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), authorize))
        .with_state(app)
}

/// Bind `addr` for [`serve`].
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serve `router` on `listener` until `shutdown`; connections still open
/// then get [`CLOSE_GRACE`] to finish.
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(cause = %e, "no HTTP listener: metrics and the status page are not served");
            return;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        info!(url = %format!("http://{addr}/"), "serving /metrics, /status.json and the status page");
    }
    let capped = Capped {
        inner: listener,
        room: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    let stop = shutdown.clone();
    let server = std::future::IntoFuture::into_future(
        axum::serve(capped, router).with_graceful_shutdown(async move { stop.cancelled().await }),
    );
    tokio::select! {
        done = server => if let Err(e) = done {
            warn!(cause = %e, "the HTTP listener failed");
        },
        _ = async { shutdown.cancelled().await; tokio::time::sleep(CLOSE_GRACE).await } => {
            debug!("closing the HTTP connections still open");
        }
    }
}

/// Answer 401 to a request without the token, when there is one.
async fn authorize(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    match &app.token {
        Some(token) if !token.admits(request.headers()) => (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"qmesh-coordinator\""),
            )],
            "401: send the token of --http-token-file as `Authorization: Bearer TOKEN`\n",
        )
            .into_response(),
        _ => next.run(request).await,
    }
}

async fn page(State(app): State<Arc<App>>) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CONTENT_SECURITY_POLICY, app.policy.clone()),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        PAGE,
    )
        .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        app.metrics.encode(),
    )
        .into_response()
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let c = &app.control;
    let status = Status {
        info: c.info(),
        clients: c.client_list(),
        channels: c.channel_list(),
        events: c.events(),
    };
    match serde_json::to_string(&status) {
        Ok(json) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    header::X_CONTENT_TYPE_OPTIONS,
                    HeaderValue::from_static("nosniff"),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            json,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "404: this listener serves /, /status.json and /metrics\n",
    )
        .into_response()
}

/// The page's Content-Security-Policy: nothing from elsewhere, requests
/// to this listener only, and no script but the page's own (by its
/// SHA-256), so markup slipped into the page could not run anything.
fn page_policy(page: &str) -> HeaderValue {
    let script = page
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map_or("", |(script, _)| script);
    let hash = base64(ring::digest::digest(&ring::digest::SHA256, script.as_bytes()).as_ref());
    let policy = format!(
        "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
         connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    );
    HeaderValue::from_str(&policy)
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
}

/// Standard base64 with padding (RFC 4648 §4), for the script's hash.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A TCP listener that holds at most [`MAX_CONNECTIONS`] connections:
/// past that it accepts no more until one closes.
struct Capped {
    inner: tokio::net::TcpListener,
    room: Arc<Semaphore>,
}

/// An accepted connection, holding its place until it is dropped.
struct CappedStream {
    stream: tokio::net::TcpStream,
    _place: OwnedSemaphorePermit,
}

impl axum::serve::Listener for Capped {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CappedStream, SocketAddr) {
        loop {
            let place = match self.room.clone().acquire_owned().await {
                Ok(p) => p,
                // The semaphore is never closed.
                Err(_) => continue,
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    return (
                        CappedStream {
                            stream,
                            _place: place,
                        },
                        addr,
                    )
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little
                    // rather than spin, as axum's own listener does.
                    debug!(cause = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_rfc_4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn the_page_policy_allows_its_script_by_hash_and_nothing_else() {
        let policy = page_policy("<p>x</p><script>let a = 1;</script>");
        let policy = policy.to_str().unwrap();
        let hash = base64(ring::digest::digest(&ring::digest::SHA256, b"let a = 1;").as_ref());
        assert!(
            policy.contains(&format!("script-src 'sha256-{hash}'")),
            "{policy}"
        );
        assert!(policy.starts_with("default-src 'none'"), "{policy}");
        // The real page has its script in one piece.
        assert_eq!(PAGE.matches("<script>").count(), 1);
        assert_eq!(PAGE.matches("</script>").count(), 1);
    }

    #[test]
    fn the_page_never_parses_data_as_markup() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "Function(",
            " on",
        ] {
            let script = PAGE.split_once("<script>").unwrap().1;
            let found = match sink {
                // No inline handler attributes anywhere in the markup.
                " on" => {
                    PAGE.split_once("<script>").unwrap().0.contains(" onclick=")
                        || PAGE.contains(" onload=")
                }
                _ => script.contains(sink),
            };
            assert!(!found, "the page uses {sink:?}");
        }
    }
}
