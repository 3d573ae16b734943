//! JSON log lines that name the trace they belong to: inside an exported
//! span, each line gains `trace_id` and `span_id`, so that a log search
//! leads to the trace and back.
//!
//! The log formatter cannot ask for the current span itself (it runs
//! inside the subscriber, where `Span::current()` is not available), and
//! the log filter hides Herald's exported spans from it (see `init`). So
//! [`SpanStack`], a layer that sees only those spans, keeps the ids of the
//! ones entered on each thread, and [`WithTraceIds`] reads them there.

use std::cell::RefCell;
use std::fmt;
use std::sync::OnceLock;

use opentelemetry::trace::TraceContextExt;
use tracing::dispatcher::WeakDispatch;
use tracing::span;
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

thread_local! {
    /// The exported spans entered on this thread, innermost last.
    static ENTERED: RefCell<Vec<span::Id>> = const { RefCell::new(Vec::new()) };
}

/// The process's subscriber, to look the spans' OpenTelemetry ids up.
static DISPATCH: OnceLock<WeakDispatch> = OnceLock::new();

/// Keeps [`ENTERED`]; add it with the same filter as the exporting layer.
pub struct SpanStack;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SpanStack {
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        let _ = DISPATCH.set(subscriber.downgrade());
    }

    fn on_enter(&self, id: &span::Id, _ctx: Context<'_, S>) {
        ENTERED.with(|e| e.borrow_mut().push(id.clone()));
    }

    fn on_exit(&self, id: &span::Id, _ctx: Context<'_, S>) {
        ENTERED.with(|e| {
            let mut e = e.borrow_mut();
            if let Some(at) = e.iter().rposition(|x| x == id) {
                e.remove(at);
            }
        });
    }
}

/// Remembers the process's default subscriber, for [`WithTraceIds`] to look
/// spans up in: call it once the subscriber is installed (not every way of
/// composing layers passes it to [`SpanStack`]).
pub fn remember_dispatch() {
    tracing::dispatcher::get_default(|d| {
        let _ = DISPATCH.set(d.downgrade());
    });
}

/// The trace id and span id of the innermost exported span entered on this
/// thread.
fn current_ids() -> Option<(String, String)> {
    let id = ENTERED.with(|e| e.borrow().last().cloned())?;
    let dispatch = DISPATCH.get()?.upgrade()?;
    let cx = tracing_opentelemetry::get_otel_context(&id, &dispatch)?;
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// Wraps a JSON event format (`tracing_subscriber::fmt::format().json()`).
pub struct WithTraceIds<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let Some((trace_id, span_id)) = current_ids() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // One JSON object per line: the ids go in before its closing brace.
        match line.trim_end().strip_suffix('}') {
            Some(object) => writeln!(
                writer,
                "{object},\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
            ),
            None => writer.write_str(&line),
        }
    }
}
