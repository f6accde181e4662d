//! The `warn` and `error` events of this test process, kept as text, so a
//! test can check that the coordinator reported what a peer did.
//!
//! [`install`] sets up (once per process) a subscriber that keeps the text
//! of each such event; `QMESH_TEST_LOG` still prints logs as with
//! [`crate::init_tracing`].

use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Install the capturing subscriber. Call before [`crate::Mesh::start`],
/// whose own `init_tracing` then finds a subscriber in place and does
/// nothing.
pub fn install() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let print = std::env::var("QMESH_TEST_LOG").ok().map(|filter| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(EnvFilter::new(filter))
        });
        let _ = tracing_subscriber::registry()
            .with(Capture.with_filter(LevelFilter::WARN))
            .with(print)
            .try_init();
    });
}

/// Whether a `warn` or `error` event mentioned every one of `needles`.
pub fn logged(needles: &[&str]) -> bool {
    seen()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|line| needles.iter().all(|n| line.contains(n)))
}

fn seen() -> &'static Mutex<Vec<String>> {
    static SEEN: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    SEEN.get_or_init(|| Mutex::new(Vec::new()))
}

/// An event's level and fields as one line.
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

/// The layer that keeps each event it sees.
struct Capture;

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut text = Text(format!("{} ", event.metadata().level()));
        event.record(&mut text);
        seen()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(text.0);
    }
}
