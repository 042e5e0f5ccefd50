//! Logs, metrics and traces.
//!
//! - Logs: one JSON object per line on stdout (what Kubernetes log pipelines expect), level from
//!   `RUST_LOG` (default `info`).
//! - Metrics: recorded once through the OpenTelemetry API and read two ways: Prometheus text at
//!   `/metrics` (always), and OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the metrics
//!   specific variable) is set and the `otlp` feature is on. One set of instruments, two outputs.
//! - Traces: spans go out over OTLP under the same conditions; an incoming W3C `traceparent`
//!   (HTTP header, `ce-traceparent`, or the structured event's extension) becomes the parent, so
//!   a function's spans join the caller's trace.
//!
//! Start-up cost matters (cold start is the product): nothing here does network I/O at init;
//! exporters connect on their first export, on their own threads.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use axum::http::HeaderMap;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, MeterProvider as _, UpDownCounter};
use opentelemetry::propagation::Extractor;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Seconds buckets for event and backend latencies: 5 ms .. 2 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

struct Pipelines {
    provider: SdkMeterProvider,
    scrape: Arc<ManualReader>,
    metrics: Metrics,
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

static PIPELINES: OnceLock<Pipelines> = OnceLock::new();

/// Sets up logging, metrics and tracing for the process. Call once, first thing in `main`.
///
/// Returns a guard whose [`Telemetry::shutdown`] flushes exporters on the way out.
pub fn init(service_name: &'static str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false);
    let pipelines = pipelines_for(service_name, otlp_wanted());
    let otel = pipelines.tracer.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(provider.tracer(service_name))
    });
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(json.with_filter(filter))
        .with(otel)
        .try_init();
    Telemetry
}

/// Guard returned by [`init`].
#[derive(Debug)]
pub struct Telemetry;

impl Telemetry {
    /// Flushes and stops the exporters; call after the server has drained.
    pub fn shutdown(&self) {
        if let Some(p) = PIPELINES.get() {
            let _ = p.provider.shutdown();
            if let Some(tracer) = &p.tracer {
                let _ = tracer.shutdown();
            }
        }
    }
}

fn otlp_wanted() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
}

fn pipelines_for(service_name: &'static str, otlp: bool) -> &'static Pipelines {
    PIPELINES.get_or_init(|| {
        let resource = Resource::builder()
            .with_service_name(
                std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service_name.into()),
            )
            .build();
        let scrape = Arc::new(ManualReader::builder().build());
        #[allow(unused_mut)]
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(SharedReader(scrape.clone()));
        let mut tracer = None;
        if otlp {
            crate::http::install_crypto_provider();
            match otlp::metric_reader() {
                Ok(reader) => builder = builder.with_reader(reader),
                Err(e) => eprintln!("OTLP metrics disabled: {e}"),
            }
            match otlp::tracer_provider(resource) {
                Ok(provider) => tracer = Some(provider),
                Err(e) => eprintln!("OTLP traces disabled: {e}"),
            }
        }
        let provider = builder.build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let meter = provider.meter("handler-kit");
        Pipelines {
            metrics: Metrics::new(&meter),
            provider,
            scrape,
            tracer,
        }
    })
}

/// The process's metric instruments (the meter is set up on first use if [`init`] was not called).
pub fn metrics() -> &'static Metrics {
    &pipelines_for("handler", false).metrics
}

/// A meter for a function's own instruments, on the same pipelines as [`metrics`].
pub fn meter(name: &'static str) -> Meter {
    pipelines_for("handler", false).provider.meter(name)
}

/// The instruments every function records.
#[derive(Debug)]
pub struct Metrics {
    /// Events answered, by `type` and HTTP `status`.
    pub events: Counter<u64>,
    /// Seconds from request to answer, by `type` and `status`.
    pub event_duration: Histogram<f64>,
    /// Events being handled right now.
    pub in_flight: UpDownCounter<i64>,
    /// Outbound calls by `backend` and `outcome` (ok, rejected, failed, timeout, open, saturated).
    pub backend_calls: Counter<u64>,
    /// Seconds per outbound call, by `backend`.
    pub backend_duration: Histogram<f64>,
    /// 1 while a backend's circuit breaker is open, else 0.
    pub breaker_open: Gauge<u64>,
    /// Messages published to NATS.
    pub published: Counter<u64>,
    /// 1 while the NATS connection is up, 0 while it is lost or not made yet.
    pub nats_connected: Gauge<u64>,
}

impl Metrics {
    fn new(meter: &Meter) -> Self {
        Self {
            events: meter
                .u64_counter("handler_events")
                .with_description("Events answered, by type and HTTP status")
                .build(),
            event_duration: meter
                .f64_histogram("handler_event_duration_seconds")
                .with_description("Time from request to answer")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            in_flight: meter
                .i64_up_down_counter("handler_events_in_flight")
                .with_description("Events being handled")
                .build(),
            backend_calls: meter
                .u64_counter("handler_backend_calls")
                .with_description("Outbound calls by backend and outcome")
                .build(),
            backend_duration: meter
                .f64_histogram("handler_backend_duration_seconds")
                .with_description("Outbound call latency")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            breaker_open: meter
                .u64_gauge("handler_breaker_open")
                .with_description("1 while the backend's circuit breaker is open")
                .build(),
            published: meter
                .u64_counter("handler_nats_published")
                .with_description("Messages published to NATS")
                .build(),
            nats_connected: meter
                .u64_gauge("handler_nats_connected")
                .with_description("1 while the NATS connection is up")
                .build(),
        }
    }
}

/// Renders every metric in the Prometheus text exposition format (version 0.0.4).
pub fn render_prometheus() -> String {
    let pipelines = pipelines_for("handler", false);
    let mut rm = ResourceMetrics::default();
    if pipelines.scrape.collect(&mut rm).is_err() {
        return String::new();
    }
    let mut out = String::new();
    for scope in rm.scope_metrics() {
        for metric in scope.metrics() {
            encode_metric(&mut out, metric.name(), metric.description(), metric.data());
        }
    }
    out
}

fn encode_metric(out: &mut String, name: &str, help: &str, data: &AggregatedMetrics) {
    match data {
        AggregatedMetrics::F64(d) => encode_data(out, name, help, d),
        AggregatedMetrics::U64(d) => encode_data(out, name, help, d),
        AggregatedMetrics::I64(d) => encode_data(out, name, help, d),
    }
}

fn encode_data<T: Copy + std::fmt::Display>(
    out: &mut String,
    name: &str,
    help: &str,
    data: &MetricData<T>,
) {
    let name = sanitize(name);
    match data {
        MetricData::Sum(sum) if sum.is_monotonic() => {
            let name = if name.ends_with("_total") {
                name
            } else {
                format!("{name}_total")
            };
            header(out, &name, help, "counter");
            for p in sum.data_points() {
                sample(out, &name, &labels(p.attributes(), None), p.value());
            }
        }
        MetricData::Sum(sum) => {
            header(out, &name, help, "gauge");
            for p in sum.data_points() {
                sample(out, &name, &labels(p.attributes(), None), p.value());
            }
        }
        MetricData::Gauge(gauge) => {
            header(out, &name, help, "gauge");
            for p in gauge.data_points() {
                sample(out, &name, &labels(p.attributes(), None), p.value());
            }
        }
        MetricData::Histogram(hist) => {
            header(out, &name, help, "histogram");
            for p in hist.data_points() {
                let mut cumulative = 0u64;
                let counts: Vec<u64> = p.bucket_counts().collect();
                for (bound, count) in p.bounds().zip(&counts) {
                    cumulative += count;
                    let le = labels(p.attributes(), Some(&bound.to_string()));
                    sample(out, &format!("{name}_bucket"), &le, cumulative);
                }
                let inf = labels(p.attributes(), Some("+Inf"));
                sample(out, &format!("{name}_bucket"), &inf, p.count());
                let plain = labels(p.attributes(), None);
                sample(out, &format!("{name}_sum"), &plain, p.sum());
                sample(out, &format!("{name}_count"), &plain, p.count());
            }
        }
        // Not used by this crate's instruments; skipped rather than misrepresented.
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(
        out,
        "# HELP {name} {}",
        help.replace('\\', "\\\\").replace('\n', "\\n")
    );
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{name}{labels} {value}");
}

fn labels<'a>(attrs: impl Iterator<Item = &'a KeyValue>, le: Option<&str>) -> String {
    let mut parts: Vec<String> = attrs
        .map(|kv| {
            let value = match &kv.value {
                Value::String(s) => s.as_str().to_string(),
                other => other.to_string(),
            };
            format!("{}=\"{}\"", sanitize(kv.key.as_str()), escape(&value))
        })
        .collect();
    parts.sort();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Lets the SDK own a reader that `/metrics` also holds, so one reader serves every scrape.
#[derive(Debug)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// Reads W3C trace context from HTTP headers, also under the binary-mode `ce-` prefix.
struct TraceHeaders<'a>(&'a HeaderMap);

impl Extractor for TraceHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .or_else(|| self.0.get(format!("ce-{key}")))
            .and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The caller's trace context carried by these headers (empty if none).
pub fn parent_from_headers(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&TraceHeaders(headers))
}

/// For structured events the trace context travels inside the JSON: adopt it as the parent.
pub fn continue_trace_from_event(event: &cloudevents::Event) {
    let Some(traceparent) = event.extension("traceparent") else {
        return;
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = traceparent.to_string().parse() {
        headers.insert("traceparent", v);
    }
    let cx = parent_from_headers(&headers);
    let _ = tracing::Span::current().set_parent(cx);
}

mod otlp {
    //! OTLP/HTTP exporters; endpoints, headers and protocol come from the standard OTEL_* variables.
    use opentelemetry_otlp::{MetricExporter, SpanExporter};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::metrics::PeriodicReader;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    pub(super) fn metric_reader() -> Result<PeriodicReader<MetricExporter>, String> {
        let exporter = MetricExporter::builder()
            .with_http()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(PeriodicReader::builder(exporter).build())
    }

    pub(super) fn tracer_provider(resource: Resource) -> Result<SdkTracerProvider, String> {
        let exporter = SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(SdkTracerProvider::builder()
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_counters_and_histograms() {
        let m = metrics();
        let attrs = [
            KeyValue::new("type", "test.render"),
            KeyValue::new("status", "200"),
        ];
        m.events.add(2, &attrs);
        m.event_duration.record(0.02, &attrs);
        let text = render_prometheus();
        assert!(
            text.contains("# TYPE handler_events_total counter"),
            "{text}"
        );
        assert!(
            text.contains("handler_events_total{status=\"200\",type=\"test.render\"} 2"),
            "{text}"
        );
        assert!(text.contains("handler_event_duration_seconds_bucket{status=\"200\",type=\"test.render\",le=\"0.025\"} 1"), "{text}");
        assert!(
            text.contains(
                "handler_event_duration_seconds_count{status=\"200\",type=\"test.render\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn traceparent_is_read_from_plain_and_ce_headers() {
        use opentelemetry::trace::TraceContextExt as _;
        for name in ["traceparent", "ce-traceparent"] {
            let mut h = HeaderMap::new();
            h.insert(
                name,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                    .parse()
                    .expect("header"),
            );
            let cx = parent_from_headers(&h);
            assert_eq!(
                cx.span().span_context().trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
        }
    }
}
