//! The connpipe log line format, for the qmesh binaries.
//!
//! ```text
//! [2026-11-21 23:40:00.670 INFO client/alice] connected to quic/127.0.0.1:7447
//! [2026-11-21 23:40:00.671 INFO channel/alice>bob!chat] joined
//! [2026-11-21 23:40:00.672 WARN session/alice] stopping data stream with a bad header
//! [2026-11-21 23:40:00.673 INFO qmesh_coordinator::devcert] an event outside any span
//! ```
//!
//! The bracket names the innermost span that carries an `id` field as
//! `span-name/id` (`coordinator/…`, `session/alice`, `client/alice`,
//! `channel/alice>bob!chat`); an event outside such spans names its module.
//! Times are UTC. Libraries only emit `tracing` events; binaries call
//! [`init`]. Behind the `logging` feature, which the two binaries turn on:
//! it lives here, below both, so that the `qmesh` command need not depend
//! on the coordinator for it.

use std::fmt;

use time::macros::format_description;
use time::OffsetDateTime;
use tracing::field::{Field, Visit};
use tracing::span::Attributes;
use tracing::{Event, Id, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The `id` field of a span, kept in the span's extensions.
struct LogId(String);

/// Records the `id` field of each new span.
struct IdLayer;

struct IdVisitor(Option<String>);

impl Visit for IdVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "id" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "id" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S> Layer<S> for IdLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut visitor = IdVisitor(None);
        attrs.record(&mut visitor);
        if let (Some(value), Some(span)) = (visitor.0, ctx.span(id)) {
            span.extensions_mut().insert(LogId(value));
        }
    }
}

/// Formats events as connpipe log lines.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnpipeFormat;

impl<S, N> FormatEvent<S, N> for ConnpipeFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = OffsetDateTime::now_utc();
        let stamp = now
            .format(format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
            ))
            .map_err(|_| fmt::Error)?;
        let meta = event.metadata();
        write!(writer, "[{stamp} {} ", meta.level())?;
        let mut named = false;
        if let Some(scope) = ctx.event_scope() {
            for span in scope {
                if let Some(LogId(id)) = span.extensions().get::<LogId>() {
                    write!(writer, "{}/{id}", span.name())?;
                    named = true;
                    break;
                }
            }
        }
        if !named {
            write!(writer, "{}", meta.module_path().unwrap_or(meta.target()))?;
        }
        write!(writer, "] ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Changes the installed filter; set by [`init`].
type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static SET_FILTER: std::sync::OnceLock<SetFilter> = std::sync::OnceLock::new();

/// Install the connpipe format on stderr. `level` (from `--log`) takes
/// precedence over `RUST_LOG`; the default is `info`. The filter can be
/// changed later with [`set_filter`].
pub fn init(level: Option<&str>) {
    let filter = match level {
        Some(l) => builder().parse_lossy(l),
        None => builder()
            .try_from_env()
            .unwrap_or_else(|_| builder().parse_lossy("info")),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .event_format(ConnpipeFormat)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    let installed = tracing_subscriber::registry()
        .with(IdLayer)
        .with(fmt)
        .with(filter)
        .try_init();
    if installed.is_ok() {
        let _ = SET_FILTER.set(Box::new(move |f: &str| {
            let new = check_filter(f)?;
            handle.reload(new).map_err(|e| e.to_string())
        }));
    }
}

/// How every filter is read: a field value in a directive
/// (`[span{id=alice}]`) matches as literal text, not as a regular
/// expression. A regex compiles to an automaton whose size the filter's
/// author controls (97 bytes of config asked for 4 MiB at once, and each
/// `(a|b)` more doubles it; found by the `config` fuzz target), and the
/// filter comes from files and reloads.
fn builder() -> tracing_subscriber::filter::Builder {
    EnvFilter::builder().with_regex(false)
}

/// A filter such as `info` or `qmesh_coordinator=debug,warn`, or why it
/// is not one. Field values match as literal text (see `builder`).
pub fn check_filter(filter: &str) -> Result<EnvFilter, String> {
    builder()
        .parse(filter)
        .map_err(|e| format!("log filter {filter:?}: {e}"))
}

/// Put `filter` in force for every later line (after [`init`]).
pub fn set_filter(filter: &str) -> Result<(), String> {
    match SET_FILTER.get() {
        Some(set) => set(filter),
        None => Err("this process did not install the qmesh log format".into()),
    }
}

#[cfg(test)]
/// The connpipe subscriber: span ids, the line format, and `filter`,
/// writing each line to what `writer` makes.
fn subscriber<W>(filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer()
        .event_format(ConnpipeFormat)
        .with_ansi(false)
        .with_writer(writer);
    tracing_subscriber::registry()
        .with(IdLayer)
        .with(fmt)
        .with(filter)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Lines {
        type Writer = Lines;

        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    fn logged(f: impl FnOnce()) -> Vec<String> {
        let lines = Lines::default();
        let sub = subscriber(EnvFilter::new("info"), lines.clone());
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    /// `[2026-11-21 23:40:00.670 ` is 24 characters; check its shape.
    fn stamp_shape(line: &str) {
        let b = line.as_bytes();
        assert_eq!(b[0], b'[', "{line}");
        for (i, c) in b[1..24].iter().enumerate() {
            let want_digit = !matches!(i, 4 | 7 | 10 | 13 | 16 | 19);
            assert_eq!(c.is_ascii_digit(), want_digit, "{line} at {}", i + 1);
        }
        assert_eq!(&line[5..6], "-");
        assert_eq!(&line[11..12], " ");
        assert_eq!(&line[20..21], ".");
    }

    #[test]
    fn an_event_in_a_span_with_an_id_names_the_span_and_id() {
        let lines = logged(|| {
            let span = tracing::info_span!("client", id = "alice");
            let _in = span.enter();
            let inner = tracing::info_span!("step");
            let _inner = inner.enter();
            tracing::info!("connected to quic/127.0.0.1:7447");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        stamp_shape(&lines[0]);
        assert!(
            lines[0].ends_with(" INFO client/alice] connected to quic/127.0.0.1:7447"),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn an_event_outside_named_spans_names_its_module_and_the_filter_applies() {
        let lines = logged(|| {
            tracing::debug!("hidden below info");
            tracing::warn!(peer = "bob", "closing");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        stamp_shape(&lines[0]);
        assert!(
            lines[0].ends_with(" WARN qmesh_proto::logging::tests] closing peer=\"bob\""),
            "{}",
            lines[0]
        );
    }

    #[test]
    fn a_filter_is_checked_and_changed_only_after_init() {
        assert!(check_filter("qmesh_coordinator=debug,warn").is_ok());
        let err = check_filter("[").unwrap_err();
        assert!(err.contains("log filter \"[\""), "{err}");
        // No test in this crate installs the format but this one.
        assert!(set_filter("debug").is_err());
        init(Some("warn"));
        assert_eq!(set_filter("debug"), Ok(()));
        assert!(set_filter("[").is_err());
    }

    #[test]
    fn a_wrapped_peer_name_stays_on_its_line() {
        let name = "x\n[2026-01-01 00:00:00.000 WARN session/admin] forged";
        let lines = logged(|| {
            let label = format!("a>{}!chat", crate::Untrusted::name(name));
            let span = tracing::info_span!("channel", id = %label);
            let _in = span.enter();
            tracing::info!(name = %crate::Untrusted::name(name), "hello refused");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].ends_with(
                r" INFO channel/a>x\n[2026-01-01 00:00:00.000 WARN session/admin] forged!chat] hello refused name=x\n[2026-01-01 00:00:00.000 WARN session/admin] forged"
            ),
            "{}",
            lines[0]
        );
    }
}
