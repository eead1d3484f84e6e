//! What the node tells OpenTelemetry: its metric instruments, and the W3C trace context that
//! joins a call, the records it causes and the attempts made for them into one trace.
//!
//! Instruments come from the global meter provider, which the node sets up before anything
//! records; until then (and in unit tests) they record nothing. Attributes stay bounded: webhook
//! and campaign ids, partitions, classes and outcomes, never contact ids.

use std::sync::OnceLock;

use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// Name of the instrumentation scope of every instrument.
pub const SCOPE: &str = "tidings";

/// OpenTelemetry's default buckets for HTTP and RPC durations, in seconds.
pub const DURATION_BUCKETS: [f64; 14] =
    [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

/// Buckets of timer lateness, in seconds: from a millisecond to a minute.
const LATENESS_BUCKETS: [f64; 14] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Buckets of store transaction sizes, in writes.
const SIZE_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// The node's instruments.
#[derive(Debug)]
pub struct Metrics {
    /// `http.client.request.duration`: webhook attempts that sent a request, in seconds.
    pub http_duration: Histogram<f64>,
    /// `tidings.delivery.attempts`: attempts by webhook, outcome and error class.
    pub attempts: Counter<u64>,
    /// `tidings.deliveries`: deliveries that ended, by webhook, outcome and error class.
    pub deliveries: Counter<u64>,
    /// `tidings.retries.scheduled`: retries scheduled, by webhook.
    pub retries: Counter<u64>,
    /// `tidings.circuit.state`: 0 closed, 1 half open (a probe in flight), 2 open; by webhook.
    pub circuit: Gauge<i64>,
    /// `tidings.rate_limit.waits`: attempts that waited for their webhook's rate limit.
    pub rate_limit_waits: Counter<u64>,
    /// `tidings.rate_limit.wait.duration`: time attempts spent waiting for it, in seconds.
    pub rate_limit_wait: Counter<f64>,
    /// `tidings.events`: events accepted and refused by Publish and PublishBatch.
    pub events: Counter<u64>,
    /// `tidings.timer.lateness`: how long after their due time timers fired, in seconds.
    pub timer_lateness: Histogram<f64>,
    /// `tidings.partition.ownership.changes`: partitions claimed, released and lost.
    pub ownership_changes: Counter<u64>,
    /// `tidings.store.transaction.duration`: partition transactions, in seconds, by result.
    pub txn_duration: Histogram<f64>,
    /// `tidings.store.transaction.size`: writes per partition transaction.
    pub txn_size: Histogram<u64>,
    /// `tidings.run.contacts`: contacts a run went through, by campaign and outcome.
    pub run_contacts: Counter<u64>,
    /// `tidings.inbox.set_aside`: inbox entries whose writes the store refused on their own,
    /// removed so that their partition goes on.
    pub set_aside: Counter<u64>,
}

impl Metrics {
    fn new(meter: &Meter) -> Self {
        Self {
            http_duration: meter
                .f64_histogram("http.client.request.duration")
                .with_unit("s")
                .with_description("Duration of webhook HTTP requests.")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            attempts: meter
                .u64_counter("tidings.delivery.attempts")
                .with_description("Webhook attempts, by webhook, outcome and error class.")
                .build(),
            deliveries: meter
                .u64_counter("tidings.deliveries")
                .with_description("Deliveries that ended, by webhook, outcome and error class.")
                .build(),
            retries: meter
                .u64_counter("tidings.retries.scheduled")
                .with_description("Retries scheduled after a failed attempt, by webhook.")
                .build(),
            circuit: meter
                .i64_gauge("tidings.circuit.state")
                .with_description("Circuit of each webhook: 0 closed, 1 half open, 2 open.")
                .build(),
            rate_limit_waits: meter
                .u64_counter("tidings.rate_limit.waits")
                .with_description("Attempts that waited for their webhook's rate limit.")
                .build(),
            rate_limit_wait: meter
                .f64_counter("tidings.rate_limit.wait.duration")
                .with_unit("s")
                .with_description("Time attempts waited for their webhook's rate limit.")
                .build(),
            events: meter
                .u64_counter("tidings.events")
                .with_description("Events accepted and refused, by result and reason.")
                .build(),
            timer_lateness: meter
                .f64_histogram("tidings.timer.lateness")
                .with_unit("s")
                .with_description("How long after their due time timers fired.")
                .with_boundaries(LATENESS_BUCKETS.to_vec())
                .build(),
            ownership_changes: meter
                .u64_counter("tidings.partition.ownership.changes")
                .with_description("Partitions this node claimed, released and lost.")
                .build(),
            txn_duration: meter
                .f64_histogram("tidings.store.transaction.duration")
                .with_unit("s")
                .with_description("Duration of partition transactions, by result.")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            txn_size: meter
                .u64_histogram("tidings.store.transaction.size")
                .with_description("Writes per partition transaction.")
                .with_boundaries(SIZE_BUCKETS.to_vec())
                .build(),
            run_contacts: meter
                .u64_counter("tidings.run.contacts")
                .with_description("Contacts runs went through, by campaign and outcome.")
                .build(),
            set_aside: meter
                .u64_counter("tidings.inbox.set_aside")
                .with_description("Inbox entries set aside: the store refused their writes.")
                .build(),
        }
    }
}

/// Returns the node's instruments, created from the global meter provider on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let metrics = Metrics::new(&meter());
        // Rare events are exported from the start, at zero, so that a rule can watch them.
        metrics.set_aside.add(0, &[]);
        metrics
    })
}

/// Returns the meter of every Tidings instrument.
pub fn meter() -> Meter {
    opentelemetry::global::meter(SCOPE)
}

/// Returns the context a stored W3C `traceparent` stands for; `None` when it is not valid.
pub fn context_of(traceparent: &str) -> Option<opentelemetry::Context> {
    if traceparent.is_empty() {
        return None;
    }
    let carrier = Carrier(traceparent);
    let context = TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

/// Returns the `traceparent` of a span context; `None` when it is not valid.
pub fn traceparent_of(span: &SpanContext) -> Option<String> {
    span.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span.trace_id(),
            span.span_id(),
            span.trace_flags().to_u8() & opentelemetry::trace::TraceFlags::SAMPLED.to_u8()
        )
    })
}

/// Returns the `traceparent` of a tracing span, when it is part of a trace (telemetry on).
pub fn span_traceparent(span: &tracing::Span) -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    traceparent_of(span.context().span().span_context())
}

/// Returns the `traceparent` of the current tracing span, when it is part of a trace (with
/// telemetry on), for the records the current call or run writes.
pub fn current_traceparent() -> Option<String> {
    span_traceparent(&tracing::Span::current())
}

/// A `traceparent` value as a propagation carrier.
struct Carrier<'a>(&'a str);

impl opentelemetry::propagation::Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_goes_through_the_propagator_and_back() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = context_of(parent).expect("valid");
        assert_eq!(traceparent_of(context.span().span_context()).as_deref(), Some(parent));
        for invalid in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "garbage",
        ] {
            assert!(context_of(invalid).is_none(), "{invalid}");
        }
    }
}
