//! An OpenTelemetry collector for tests: the OTLP/gRPC `TraceService` and `MetricsService` on a
//! free port, keeping every span and metric it is sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
pub use opentelemetry_proto::tonic::trace::v1::Span;
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<Span>>,
    resources: Mutex<Vec<Vec<KeyValue>>>,
    metrics: Mutex<Vec<String>>,
}

#[derive(Clone)]
struct Service(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            if let Some(resource) = resource.resource {
                self.0.resources.lock().expect("lock").push(resource.attributes);
            }
            let mut spans = self.0.spans.lock().expect("lock");
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut metrics = self.0.metrics.lock().expect("lock");
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                metrics.extend(scope.metrics.into_iter().map(|m| m.name));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

/// A running collector; stops when dropped.
pub struct Collector {
    addr: SocketAddr,
    received: Arc<Received>,
    stop: CancellationToken,
}

impl Collector {
    /// Starts a collector on a free port of 127.0.0.1.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Received::default());
        let stop = CancellationToken::new();
        let service = Service(received.clone());
        let router = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(service.clone()))
            .add_service(MetricsServiceServer::new(service));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let signal = stop.clone().cancelled_owned();
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal));
        Ok(Self { addr, received, stop })
    }

    /// Returns the OTLP/gRPC endpoint, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Returns every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.received.spans.lock().expect("lock").clone()
    }

    /// Returns the resource attributes of every export received so far.
    pub fn resources(&self) -> Vec<Vec<KeyValue>> {
        self.received.resources.lock().expect("lock").clone()
    }

    /// Returns the names of the metrics received so far.
    pub fn metric_names(&self) -> Vec<String> {
        self.received.metrics.lock().expect("lock").clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Returns an attribute of a span (or resource) as text: strings as they are, numbers and
/// booleans in decimal.
pub fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    text(value)
}

fn text(value: &AnyValue) -> Option<String> {
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

/// Returns bytes as lowercase hex, as ids appear in a `traceparent`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
