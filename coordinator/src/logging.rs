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
//! [`init`].

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

/// Install the connpipe format on stderr. `level` (from `--log`) takes
/// precedence over `RUST_LOG`; the default is `info`.
pub fn init(level: Option<&str>) {
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .event_format(ConnpipeFormat)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    let _ = tracing_subscriber::registry()
        .with(IdLayer)
        .with(fmt)
        .with(filter)
        .try_init();
}
