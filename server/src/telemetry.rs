//! Traces, metrics and logs: the OpenTelemetry providers (OTLP export, configured by the
//! `[telemetry]` section and the standard `OTEL_*` variables), Prometheus text on
//! `metrics.listen`, logs that carry the trace, and the layer that gives every gRPC call its
//! SERVER span and its `rpc.server.duration`.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Histogram;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::auth::BoxFuture;
use crate::config::{Config, LogFormat};

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Where and how the node exports over OTLP; `None` when it does not.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Otlp {
    /// Base endpoint, from the configuration; `None` leaves it to the `OTEL_EXPORTER_OTLP_*`
    /// variables, which the exporters read themselves.
    endpoint: Option<String>,
    protocol: Protocol,
}

/// Returns the OTLP export the configuration and the environment ask for, or why they do not
/// make sense. `env` reads a variable.
fn otlp(config: &Config, env: impl Fn(&str) -> Option<String>) -> Result<Option<Otlp>, String> {
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let telemetry = &config.telemetry;
    let endpoint = (!telemetry.otlp_endpoint.is_empty()).then(|| telemetry.otlp_endpoint.clone());
    let from_env = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ]
    .iter()
    .any(|name| set(name).is_some());
    if endpoint.is_none() && !from_env {
        return Ok(None);
    }
    let (protocol, source) = if telemetry.otlp_protocol.is_empty() {
        (set("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_default(), "OTEL_EXPORTER_OTLP_PROTOCOL")
    } else {
        (telemetry.otlp_protocol.clone(), "telemetry.otlp_protocol")
    };
    let protocol = match protocol.trim() {
        "" | "grpc" => Protocol::Grpc,
        "http/protobuf" => Protocol::HttpProtobuf,
        other => {
            return Err(format!("{source}: {other:?} is not supported; use grpc or http/protobuf"));
        }
    };
    if let Some(endpoint) = &endpoint
        && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        return Err(format!(
            "telemetry.otlp_endpoint: {endpoint:?} must be a URL starting with http:// or https://"
        ));
    }
    Ok(Some(Otlp { endpoint, protocol }))
}

/// The running telemetry; [`Telemetry::shutdown`] flushes what is not exported yet.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    registry: Option<prometheus::Registry>,
}

impl Telemetry {
    /// Sets up logging, traces and metrics as `config` and the environment say. Call inside the
    /// Tokio runtime (the gRPC exporters need it).
    pub fn start(config: &Config) -> Result<Self, String> {
        let otlp = otlp(config, |name| std::env::var(name).ok())?;
        let resource = resource(config);
        let tracer = match &otlp {
            Some(otlp) => Some(tracer_provider(otlp, resource.clone())?),
            None => None,
        };
        let registry = (!config.metrics.listen.is_empty()).then(prometheus::Registry::new);
        let meter = if otlp.is_some() || registry.is_some() {
            let mut builder = SdkMeterProvider::builder().with_resource(resource);
            if let Some(registry) = &registry {
                let exporter = opentelemetry_prometheus::exporter()
                    .with_registry(registry.clone())
                    .build()
                    .map_err(|e| format!("metrics.listen: {e}"))?;
                builder = builder.with_reader(exporter);
            }
            if let Some(otlp) = &otlp {
                let exporter = metric_exporter(otlp)?;
                let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
                    .with_interval(config.telemetry.metrics_interval)
                    .build();
                builder = builder.with_reader(reader);
            }
            let provider = builder.build();
            opentelemetry::global::set_meter_provider(provider.clone());
            Some(provider)
        } else {
            None
        };
        init_logging(config, tracer.as_ref());
        Ok(Self { tracer, meter, registry })
    }

    /// Returns the registry `/metrics` serves, when `metrics.listen` is set.
    pub fn registry(&self) -> Option<&prometheus::Registry> {
        self.registry.as_ref()
    }

    /// Exports what is still buffered and stops the exporters.
    pub fn shutdown(self) {
        if let Some(tracer) = self.tracer
            && let Err(error) = tracer.shutdown()
        {
            eprintln!("tidings: cannot flush traces: {error}");
        }
        if let Some(meter) = self.meter
            && let Err(error) = meter.shutdown()
        {
            eprintln!("tidings: cannot flush metrics: {error}");
        }
    }
}

/// Returns the node's resource: `service.name` (the configured one, else `OTEL_SERVICE_NAME`,
/// else `tidings`), `service.version`, `service.instance.id` (the node id), and what
/// `OTEL_RESOURCE_ATTRIBUTES` adds.
fn resource(config: &Config) -> opentelemetry_sdk::Resource {
    let mut builder = opentelemetry_sdk::Resource::builder().with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", config.node.id.clone()),
    ]);
    if !config.telemetry.service_name.is_empty() {
        builder = builder.with_service_name(config.telemetry.service_name.clone());
    } else if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.is_empty()) {
        builder = builder.with_service_name("tidings");
    }
    builder.build()
}

fn tracer_provider(
    otlp: &Otlp,
    resource: opentelemetry_sdk::Resource,
) -> Result<SdkTracerProvider, String> {
    let exporter = match (otlp.protocol, &otlp.endpoint) {
        (Protocol::Grpc, endpoint) => {
            let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            match endpoint {
                Some(endpoint) => builder.with_endpoint(endpoint.clone()).build(),
                None => builder.build(),
            }
        }
        (Protocol::HttpProtobuf, endpoint) => {
            let builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
            match endpoint {
                Some(endpoint) => builder.with_endpoint(signal_url(endpoint, "traces")).build(),
                None => builder.build(),
            }
        }
    }
    .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
    Ok(SdkTracerProvider::builder().with_resource(resource).with_batch_exporter(exporter).build())
}

fn metric_exporter(otlp: &Otlp) -> Result<opentelemetry_otlp::MetricExporter, String> {
    match (otlp.protocol, &otlp.endpoint) {
        (Protocol::Grpc, endpoint) => {
            let builder = opentelemetry_otlp::MetricExporter::builder().with_tonic();
            match endpoint {
                Some(endpoint) => builder.with_endpoint(endpoint.clone()).build(),
                None => builder.build(),
            }
        }
        (Protocol::HttpProtobuf, endpoint) => {
            let builder = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
            match endpoint {
                Some(endpoint) => builder.with_endpoint(signal_url(endpoint, "metrics")).build(),
                None => builder.build(),
            }
        }
    }
    .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))
}

/// Returns the OTLP/HTTP URL of a signal under a base endpoint, as the specification builds it
/// from `OTEL_EXPORTER_OTLP_ENDPOINT`.
fn signal_url(base: &str, signal: &str) -> String {
    format!("{}/v1/{signal}", base.trim_end_matches('/'))
}

/// Logs: plain or JSON lines on stderr, filtered by `log.level`; with traces on, spans go to
/// OpenTelemetry too and JSON lines carry `trace_id` and `span_id`.
fn init_logging(config: &Config, tracer: Option<&SdkTracerProvider>) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match config.log.format {
        LogFormat::Json => fmt.event_format(JsonLines).fmt_fields(JsonFields::new()).boxed(),
        LogFormat::Plain => fmt.boxed(),
    };
    let otel = tracer.map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("tidings"))
            .with_tracked_inactivity(false)
            .with_threads(false)
    });
    let subscriber = tracing_subscriber::registry().with(filter).with(fmt).with(otel);
    let dispatch = tracing::Dispatch::new(subscriber);
    let _ = DISPATCH.set(dispatch.downgrade());
    let _ = dispatch.try_init();
}

/// The logging dispatcher, for the JSON formatter to find each span's trace context.
static DISPATCH: OnceLock<tracing::dispatcher::WeakDispatch> = OnceLock::new();

/// One JSON object per event: `timestamp`, `level`, `target`, the fields of the event and of the
/// spans it is in, and `trace_id` and `span_id` when the event is inside a trace.
struct JsonLines;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = serde_json::Map::new();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        line.insert("timestamp".into(), now.into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        let mut current = None;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let fields = extensions
                    .get::<tracing_subscriber::fmt::FormattedFields<N>>()
                    .and_then(|f| serde_json::from_str::<serde_json::Value>(f).ok());
                if let Some(serde_json::Value::Object(fields)) = fields {
                    line.extend(fields.into_iter().filter(|(k, _)| !k.starts_with("otel.")));
                }
                current = Some(span.id());
            }
        }
        let mut visitor = Visitor(&mut line);
        event.record(&mut visitor);
        if let Some(id) = current
            && let Some(dispatch) = DISPATCH.get().and_then(|d| d.upgrade())
            && let Some(context) = tracing_opentelemetry::get_otel_context(&id, &dispatch)
        {
            let span = context.span();
            let span = span.span_context();
            if span.is_valid() {
                line.insert("trace_id".into(), span.trace_id().to_string().into());
                line.insert("span_id".into(), span.span_id().to_string().into());
            }
        }
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

/// Records an event's fields into a JSON object.
struct Visitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for Visitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

/// Serves the Prometheus text format at `/metrics` on `listen` until `stop` is cancelled.
pub async fn serve_metrics(
    listen: std::net::SocketAddr,
    registry: prometheus::Registry,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen: cannot listen on {listen}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                use axum::response::IntoResponse;
                use prometheus::Encoder;
                let mut body = Vec::new();
                let encoder = prometheus::TextEncoder::new();
                match encoder.encode(&registry.gather(), &mut body) {
                    Ok(()) => {
                        ([(http::header::CONTENT_TYPE, encoder.format_type().to_string())], body)
                            .into_response()
                    }
                    Err(error) => (
                        http::StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot encode the metrics: {error}"),
                    )
                        .into_response(),
                }
            }
        }),
    );
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(error) = served.await {
            tracing::warn!(%error, "the metrics listener stopped");
        }
    });
    Ok(bound)
}

/// The `rpc.server.duration` histogram.
fn rpc_duration() -> &'static Histogram<f64> {
    static HISTOGRAM: OnceLock<Histogram<f64>> = OnceLock::new();
    HISTOGRAM.get_or_init(|| {
        tidings_scheduler::telemetry::meter()
            .f64_histogram("rpc.server.duration")
            .with_unit("s")
            .with_description("Duration of gRPC calls, until the last message of the response.")
            .with_boundaries(tidings_scheduler::telemetry::DURATION_BUCKETS.to_vec())
            .build()
    })
}

/// The methods this node serves, so that metric attributes stay bounded whatever paths
/// callers send.
fn known_methods() -> &'static HashSet<String> {
    static METHODS: OnceLock<HashSet<String>> = OnceLock::new();
    METHODS.get_or_init(|| {
        use prost::Message;
        let mut methods = HashSet::new();
        if let Ok(set) = prost_types::FileDescriptorSet::decode(tidings_api::FILE_DESCRIPTOR_SET) {
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        methods.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        for path in [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            methods.insert(path.to_string());
        }
        methods
    })
}

/// The layer that gives every call a SERVER span (continuing the caller's `traceparent`) and
/// records its duration and status.
#[derive(Clone, Debug, Default)]
pub struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = Rpc<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rpc { inner }
    }
}

/// [`RpcLayer`] around a service.
#[derive(Clone, Debug)]
pub struct Rpc<S> {
    inner: S,
}

/// Reads W3C trace context from request headers.
struct Headers<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A call in progress: ends (span fields, histogram) when its response body is done or dropped.
struct Call {
    span: tracing::Span,
    started: Instant,
    service: Arc<str>,
    method: Arc<str>,
    status: Option<i32>,
}

impl Drop for Call {
    fn drop(&mut self) {
        // A response that ended without a status (the connection went away) is CANCELLED.
        let code = self.status.unwrap_or(tonic::Code::Cancelled as i32);
        self.span.record("rpc.grpc.status_code", code);
        let server_error = [
            tonic::Code::Unknown,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Unimplemented,
            tonic::Code::Internal,
            tonic::Code::Unavailable,
            tonic::Code::DataLoss,
        ]
        .iter()
        .any(|c| *c as i32 == code);
        if server_error {
            self.span.record("otel.status_code", "ERROR");
        }
        let elapsed = self.started.elapsed();
        self.span.in_scope(|| {
            tracing::debug!(
                target: "tidings::rpc",
                code,
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                "call finished"
            );
        });
        rpc_duration().record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", self.service.to_string()),
                KeyValue::new("rpc.method", self.method.to_string()),
                KeyValue::new("rpc.grpc.status_code", i64::from(code)),
            ],
        );
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

impl<S, B, R> tower::Service<http::Request<B>> for Rpc<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: http_body::Body + Send + 'static,
{
    type Response = http::Response<RpcBody<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let (service, method): (Arc<str>, Arc<str>) = if known_methods().contains(path) {
            let (service, method) =
                path.trim_start_matches('/').split_once('/').unwrap_or_default();
            (service.into(), method.into())
        } else {
            ("unknown".into(), "unknown".into())
        };
        let span = tracing::info_span!(
            target: "tidings::rpc",
            "rpc",
            otel.name = format!("{service}/{method}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = &*service,
            rpc.method = &*method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
        let started = Instant::now();
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                let response = future.await?;
                let status = grpc_status(response.headers());
                let span = tracing::Span::current();
                let call = Call { span, started, service, method, status };
                Ok(response.map(|body| RpcBody { inner: Box::pin(body), call: Some(call) }))
            }
            .instrument(span),
        )
    }
}

/// A response body that ends its call when it has sent its last frame (the trailers with the
/// status of a successful or streaming call) or is dropped.
pub struct RpcBody<B> {
    inner: Pin<Box<B>>,
    call: Option<Call>,
}

impl<B> std::fmt::Debug for RpcBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcBody").finish_non_exhaustive()
    }
}

impl<B: http_body::Body> http_body::Body for RpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = self.call.as_mut()
                {
                    call.status = grpc_status(trailers).or(call.status);
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = self.call.as_mut()
                    && call.status.is_none()
                {
                    call.status = Some(0);
                }
                self.call = None;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        use figment::providers::Format;
        let mut config: Config =
            figment::Figment::from(figment::providers::Toml::string(crate::config::DEFAULT_TOML))
                .merge(figment::providers::Toml::string(toml))
                .extract()
                .expect("config");
        config.node.id = "n1".into();
        config
    }

    #[test]
    fn otlp_is_off_unless_an_endpoint_is_set() {
        let none = |_: &str| None;
        assert_eq!(otlp(&config(""), none), Ok(None));
        let env =
            |name: &str| (name == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:4317".into());
        assert_eq!(
            otlp(&config(""), env),
            Ok(Some(Otlp { endpoint: None, protocol: Protocol::Grpc }))
        );
        let configured = config(
            "[telemetry]\notlp_endpoint = \"http://c:4318\"\notlp_protocol = \"http/protobuf\"",
        );
        assert_eq!(
            otlp(&configured, none),
            Ok(Some(Otlp {
                endpoint: Some("http://c:4318".into()),
                protocol: Protocol::HttpProtobuf
            }))
        );
        let disabled = |name: &str| match name {
            "OTEL_SDK_DISABLED" => Some("true".into()),
            _ => Some("http://c:4317".into()),
        };
        assert_eq!(otlp(&config(""), disabled), Ok(None));
        let json = |name: &str| match name {
            "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("http/json".into()),
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://c:4318".into()),
            _ => None,
        };
        let error = otlp(&config(""), json).expect_err("refused");
        assert!(error.starts_with("OTEL_EXPORTER_OTLP_PROTOCOL: \"http/json\""), "{error}");
        let bad = config("[telemetry]\notlp_endpoint = \"collector:4317\"");
        let error = otlp(&bad, none).expect_err("refused");
        assert!(error.starts_with("telemetry.otlp_endpoint:"), "{error}");
    }

    #[test]
    fn signal_urls_follow_the_specification() {
        assert_eq!(signal_url("http://c:4318", "traces"), "http://c:4318/v1/traces");
        assert_eq!(signal_url("http://c:4318/", "metrics"), "http://c:4318/v1/metrics");
    }

    #[test]
    fn metric_attributes_name_only_methods_that_exist() {
        let methods = known_methods();
        assert!(methods.contains("/tidings.v1.EventService/Publish"));
        assert!(methods.contains("/grpc.health.v1.Health/Check"));
        assert!(!methods.contains("/tidings.v1.EventService/Nope"));
    }
}
