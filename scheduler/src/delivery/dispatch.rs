//! Sends attempts over HTTP: per-webhook in-flight limits, a cluster-wide rate limit (each node
//! takes its share), a circuit per webhook, the address guard, and Standard Webhooks headers.
//!
//! The dispatcher never writes partition state: it hands each outcome back to the partition
//! worker that dispatched it, which records it under its epoch. If that worker is gone, the
//! outcome is dropped and the attempt's visibility timer makes the new owner try again, with
//! the same `webhook-id`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt;
use rand::Rng;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::record::{Attempt, Delivery, ErrorClass};
use super::retry::{Verdict, classify, parse_retry_after};
use super::signing::sign;
use super::ssrf::{Guard, GuardedResolver};
use crate::defs::{Cache, Definitions, DefsError};
use crate::secrets::{Cipher, Secret};
use crate::webhook::Webhook;

/// Bytes of response body kept in the attempt log.
pub const RESPONSE_EXCERPT: usize = 4096;

/// Whether a response header carries a credential, whose value the attempt log leaves out.
pub fn redacted(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "set-cookie"
            | "set-cookie2"
            | "authorization"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "www-authenticate"
            | "cookie"
    ) || ["token", "secret", "api-key", "apikey", "password", "session", "credential"]
        .iter()
        .any(|part| name.contains(part))
}

/// How the dispatcher behaves.
#[derive(Clone, Debug)]
pub struct DispatchOptions {
    /// Networks let through the address guard.
    pub allow: Vec<super::ssrf::Network>,
    /// Consecutive failures that open a webhook's circuit.
    pub circuit_threshold: u32,
    /// How long an open circuit waits before a probe.
    pub circuit_cooldown: Duration,
    /// How long a webhook may keep failing before it is disabled.
    pub disable_after: Duration,
    /// Proxy every request goes through; none when `None` (the `HTTP_PROXY` family of
    /// variables is ignored).
    pub proxy: Option<String>,
    /// Ports webhooks may reach; any when empty.
    pub ports: Vec<u16>,
    /// PEM bundles of CAs trusted besides the Mozilla roots.
    pub roots: Vec<Vec<u8>>,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        Self {
            proxy: None,
            ports: Vec::new(),
            roots: Vec::new(),
            allow: Vec::new(),
            circuit_threshold: 5,
            circuit_cooldown: Duration::from_secs(30),
            disable_after: Duration::from_secs(3 * 24 * 3600),
        }
    }
}

/// One attempt to make.
#[derive(Debug)]
pub struct Job {
    /// The delivery as written when it was dispatched.
    pub delivery: Delivery,
    /// The timer that retries the attempt if no outcome is recorded in time.
    pub visibility: crate::state::TimerRef,
}

/// The outcome of a job, for its partition worker.
#[derive(Debug)]
pub struct Outcome {
    /// The job.
    pub job: Job,
    /// The attempt made, if one was made.
    pub attempt: Option<Attempt>,
    /// What it means.
    pub verdict: Verdict,
    /// When no attempt was made: the time to try again (circuit open, webhook disabled).
    pub deferred_until_ms: Option<i64>,
}

#[derive(Default)]
struct Circuit {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
    failing_since_ms: Option<i64>,
    cooldown: Duration,
}

/// This node's share of a webhook's rate limit: requests spaced evenly at the rate (a burst
/// of one), rebuilt when the share changes (the rate, or the number of live nodes).
struct Limiter {
    rate: f64,
    limiter: Arc<governor::DefaultDirectRateLimiter>,
}

struct Endpoint {
    max_in_flight: u32,
    in_flight: Arc<Semaphore>,
    limiter: Mutex<Option<Limiter>>,
    circuit: Mutex<Circuit>,
}

impl Endpoint {
    /// Returns the limiter of this share of the rate.
    fn limiter(&self, rate: f64) -> Arc<governor::DefaultDirectRateLimiter> {
        let mut current = lock(&self.limiter);
        if let Some(current) = current.as_ref().filter(|l| l.rate == rate) {
            return current.limiter.clone();
        }
        // Rates too small to wait for are refused at write time; an hour a request at most.
        let period = Duration::try_from_secs_f64(1.0 / rate)
            .unwrap_or(Duration::from_secs(3600))
            .clamp(Duration::from_nanos(1), Duration::from_secs(3600));
        let quota = governor::Quota::with_period(period)
            .unwrap_or_else(|| governor::Quota::per_hour(std::num::NonZeroU32::MIN));
        let limiter = Arc::new(governor::RateLimiter::direct(quota));
        *current = Some(Limiter { rate, limiter: limiter.clone() });
        limiter
    }
}

struct Inner {
    client: reqwest::Client,
    credentials: super::credentials::Credentials,
    guard: Guard,
    webhooks: Cache<Webhook>,
    defs: Definitions<Webhook>,
    cipher: Cipher,
    node: String,
    live_nodes: Arc<AtomicUsize>,
    options: DispatchOptions,
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    pulse: super::pulse::Pulse,
}

/// The node's HTTP sender.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").field("node", &self.inner.node).finish()
    }
}

/// A webhook's circuit, as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    /// Attempts go.
    Closed,
    /// Attempts wait; a probe goes after `retry_in`.
    Open {
        /// Time until the probe.
        retry_in: Duration,
        /// Consecutive failures so far.
        failures: u32,
    },
    /// A probe is in flight.
    HalfOpen,
}

/// Values of the `tidings.circuit.state` gauge.
const CIRCUIT_CLOSED: i64 = 0;
const CIRCUIT_HALF_OPEN: i64 = 1;
const CIRCUIT_OPEN: i64 = 2;

fn circuit_state(webhook: &str, state: i64) {
    crate::telemetry::metrics()
        .circuit
        .record(state, &[KeyValue::new("tidings.webhook.id", webhook.to_string())]);
}

/// Returns the `error.type` of a failed attempt: its status code when the endpoint answered,
/// its error class otherwise.
fn error_type(attempt: &Attempt) -> String {
    if attempt.error_class == ErrorClass::HttpStatus && attempt.status_code > 0 {
        attempt.status_code.to_string()
    } else {
        attempt.error_class.name().to_string()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Returns the `traceparent` header of an attempt made with telemetry off: a new span in the
/// trace of `parent` (a stored `traceparent`), or in a new sampled trace when there is none.
fn traceparent(parent: &str) -> String {
    let mut rng = rand::rng();
    let span = rng.random::<u64>() | 1;
    match crate::telemetry::context_of(parent) {
        Some(context) => {
            let parent = context.span().span_context().clone();
            let flags = parent.trace_flags().to_u8() & 1;
            format!("00-{}-{span:016x}-{flags:02x}", parent.trace_id())
        }
        None => format!("00-{:032x}-{span:016x}-01", rng.random::<u128>() | 1),
    }
}

/// Returns `url` as the attempt's span shows it: without user name and password, and with the
/// values of its query parameters replaced (rendered URLs may carry tokens).
fn display_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    if url.query().is_some() {
        let pairs: Vec<String> = url.query_pairs().map(|(k, _)| format!("{k}=REDACTED")).collect();
        shown.set_query(Some(&pairs.join("&")));
    }
    shown.to_string()
}

/// Returns the span of an attempt, an OpenTelemetry HTTP CLIENT span in the trace of the call
/// or run that caused the delivery. Its fields are recorded as the attempt learns them.
fn attempt_span(delivery: &Delivery) -> tracing::Span {
    // The span is named by the method (the HTTP client convention); its other fields are
    // recorded as the attempt learns them.
    let method = delivery.request.as_ref().map_or("webhook attempt", |r| r.method.as_str());
    let span = tracing::info_span!(
        target: "tidings::attempt",
        "webhook attempt",
        otel.name = method,
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = tracing::field::Empty,
        url.full = tracing::field::Empty,
        server.address = tracing::field::Empty,
        server.port = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        http.request.resend_count = tracing::field::Empty,
        tidings.webhook.id = %delivery.webhook_id,
        tidings.delivery.id = %delivery.id,
    );
    if !delivery.attempts.is_empty() {
        span.record("http.request.resend_count", delivery.attempts.len() as u64);
    }
    if let Some(parent) = crate::telemetry::context_of(&delivery.traceparent) {
        let _ = span.set_parent(parent);
    }
    span
}

/// Builds the HTTP client webhooks are sent with: the address guard on every resolution, no
/// redirects, only the configured proxy (one from the environment would receive every
/// webhook's credentials), the configured extra CAs, and `identity` as client certificate.
fn http_client(
    options: &DispatchOptions,
    guard: &Guard,
    identity: Option<reqwest::Identity>,
) -> Result<reqwest::Client, String> {
    let mut builder = match &options.proxy {
        Some(proxy) => reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(proxy).map_err(|e| format!("delivery.proxy: {e}"))?),
        None => reqwest::Client::builder().no_proxy(),
    };
    for pem in &options.roots {
        for root in reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("delivery.ca_file: {e}"))?
        {
            builder = builder.add_root_certificate(root);
        }
    }
    if let Some(identity) = identity {
        builder = builder.identity(identity);
    }
    builder
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(GuardedResolver { guard: guard.clone() }))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .user_agent(concat!("Tidings/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

impl Dispatcher {
    /// Returns a dispatcher.
    pub fn new(
        webhooks: Cache<Webhook>,
        defs: Definitions<Webhook>,
        cipher: Cipher,
        node: String,
        live_nodes: Arc<AtomicUsize>,
        options: DispatchOptions,
    ) -> Result<Self, String> {
        let guard = Guard::new(options.allow.clone());
        let client = http_client(&options, &guard, None)?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                credentials: Default::default(),
                guard,
                webhooks,
                defs,
                cipher,
                node,
                live_nodes,
                options,
                endpoints: Mutex::new(HashMap::new()),
                pulse: Default::default(),
            }),
        })
    }

    /// Returns the last hour of this node's attempts.
    pub fn pulse(&self) -> &super::pulse::Pulse {
        &self.inner.pulse
    }

    /// Returns the state of a webhook's circuit on this node.
    pub fn circuit(&self, webhook: &str) -> CircuitState {
        let endpoints = lock(&self.inner.endpoints);
        let Some(endpoint) = endpoints.get(webhook) else { return CircuitState::Closed };
        let circuit = lock(&endpoint.circuit);
        match circuit.open_until {
            None => CircuitState::Closed,
            Some(_) if circuit.probing => CircuitState::HalfOpen,
            Some(until) => CircuitState::Open {
                retry_in: until.saturating_duration_since(Instant::now()),
                failures: circuit.failures,
            },
        }
    }

    /// Returns a job's attempt, for the caller to run: waiting for a slot and the rate
    /// limit, sending, and its outcome.
    pub fn job(&self, job: Job) -> impl std::future::Future<Output = Outcome> + Send + 'static {
        let this = self.clone();
        async move { this.run(job).await }
    }

    fn endpoint(&self, id: &str, webhook: &Webhook) -> Arc<Endpoint> {
        let mut endpoints = lock(&self.inner.endpoints);
        let current =
            endpoints.get(id).filter(|e| e.max_in_flight == webhook.max_in_flight).cloned();
        current.unwrap_or_else(|| {
            let endpoint = Arc::new(Endpoint {
                max_in_flight: webhook.max_in_flight,
                in_flight: Arc::new(Semaphore::new(webhook.max_in_flight.max(1) as usize)),
                limiter: Mutex::new(None),
                circuit: Mutex::new(Circuit {
                    cooldown: self.inner.options.circuit_cooldown,
                    ..Default::default()
                }),
            });
            endpoints.insert(id.to_string(), endpoint.clone());
            endpoint
        })
    }

    /// Waits for this node's share of the webhook's rate limit.
    async fn throttle(&self, webhook: &str, endpoint: &Endpoint, rate_limit: f64) {
        if rate_limit <= 0.0 {
            return;
        }
        let nodes = self.inner.live_nodes.load(Ordering::Relaxed).max(1) as f64;
        let limiter = endpoint.limiter(rate_limit / nodes);
        if limiter.check().is_ok() {
            return;
        }
        let started = Instant::now();
        limiter.until_ready().await;
        let metrics = crate::telemetry::metrics();
        let attributes = [KeyValue::new("tidings.webhook.id", webhook.to_string())];
        metrics.rate_limit_waits.add(1, &attributes);
        metrics.rate_limit_wait.add(started.elapsed().as_secs_f64(), &attributes);
    }

    async fn run(&self, job: Job) -> Outcome {
        let now = crate::now_ms();
        let id = job.delivery.webhook_id.clone();
        let Some(webhook) = self.inner.webhooks.get(&id) else {
            let attempt = self.failed_attempt(
                now,
                ErrorClass::EndpointDisabled,
                format!("webhook {id} no longer exists"),
            );
            return Outcome {
                job,
                attempt: Some(attempt),
                verdict: Verdict::Fail,
                deferred_until_ms: None,
            };
        };
        if !webhook.enabled {
            return Outcome {
                job,
                attempt: None,
                verdict: Verdict::Retry(None),
                deferred_until_ms: Some(now + 60_000),
            };
        }
        let endpoint = self.endpoint(&id, &webhook);
        let Ok(_permit) = endpoint.in_flight.clone().acquire_owned().await else {
            return Outcome {
                job,
                attempt: None,
                verdict: Verdict::Retry(None),
                deferred_until_ms: Some(now + 1000),
            };
        };
        self.throttle(&id, &endpoint, webhook.rate_limit).await;
        // The circuit is checked once the attempt may go, so attempts that waited for a slot
        // while the circuit opened do not slip through.
        let mut probe = false;
        {
            let mut circuit = lock(&endpoint.circuit);
            if let Some(until) = circuit.open_until {
                if Instant::now() < until || circuit.probing {
                    let wait =
                        until.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                    return Outcome {
                        job,
                        attempt: None,
                        verdict: Verdict::Retry(None),
                        deferred_until_ms: Some(crate::now_ms() + wait.as_millis() as i64),
                    };
                }
                // Half open: this attempt is the probe.
                circuit.probing = true;
                probe = true;
                circuit_state(&id, CIRCUIT_HALF_OPEN);
            }
        }
        let (attempt, verdict) = self.send(&job.delivery, &webhook).await;
        crate::telemetry::metrics().attempts.add(
            1,
            &[
                KeyValue::new("tidings.webhook.id", id.clone()),
                KeyValue::new("outcome", verdict.name()),
                KeyValue::new("error.class", attempt.error_class.name()),
            ],
        );
        self.record(&id, &endpoint, &attempt, verdict, probe).await;
        Outcome { job, attempt: Some(attempt), verdict, deferred_until_ms: None }
    }

    fn failed_attempt(&self, start_ms: i64, class: ErrorClass, error: String) -> Attempt {
        Attempt {
            start_ms,
            duration_ms: 0,
            status_code: 0,
            error_class: class,
            error,
            response_headers: BTreeMap::new(),
            response_body: Vec::new(),
            node: self.inner.node.clone(),
        }
    }

    /// Returns why the guard refuses `url`'s host when it is an IP literal (those never reach
    /// the resolver, which checks names).
    fn blocked_literal(&self, url: &reqwest::Url) -> Option<String> {
        let ip = match url.host()? {
            url::Host::Ipv4(ip) => std::net::IpAddr::V4(ip),
            url::Host::Ipv6(ip) => std::net::IpAddr::V6(ip),
            url::Host::Domain(_) => return None,
        };
        let reason = self.inner.guard.check(ip)?;
        Some(format!("{ip} is a {reason} address, which is not allowed"))
    }

    /// Returns the webhook's OAuth 2.0 token, fetched with `client` when none is cached; the
    /// token endpoint is held to the address guard like any webhook URL.
    async fn token(
        &self,
        client: &reqwest::Client,
        webhook: &str,
        oauth: &crate::webhook::OAuth2,
    ) -> Result<Secret, (ErrorClass, String)> {
        let url = reqwest::Url::parse(&oauth.token_url)
            .map_err(|e| (ErrorClass::Credentials, format!("oauth2.token_url: {e}")))?;
        if let Some(error) = self.blocked_literal(&url) {
            return Err((ErrorClass::Blocked, format!("oauth2.token_url: {error}")));
        }
        self.inner
            .credentials
            .bearer(client, &self.inner.cipher, webhook, oauth)
            .await
            .map_err(|error| (ErrorClass::Credentials, error))
    }

    /// Makes one HTTP attempt, in its span.
    pub async fn send(&self, delivery: &Delivery, webhook: &Webhook) -> (Attempt, Verdict) {
        let span = attempt_span(delivery);
        let (attempt, verdict) =
            self.attempt(delivery, webhook, &span).instrument(span.clone()).await;
        if attempt.status_code > 0 {
            span.record("http.response.status_code", attempt.status_code);
        }
        if attempt.error_class != ErrorClass::None {
            span.record("error.type", error_type(&attempt));
            span.record("otel.status_code", "ERROR");
        }
        (attempt, verdict)
    }

    async fn attempt(
        &self,
        delivery: &Delivery,
        webhook: &Webhook,
        span: &tracing::Span,
    ) -> (Attempt, Verdict) {
        let start_ms = crate::now_ms();
        let started = Instant::now();
        let Some(request) = &delivery.request else {
            return (
                self.failed_attempt(start_ms, ErrorClass::Render, delivery.reason.clone()),
                Verdict::Fail,
            );
        };
        let url = match reqwest::Url::parse(&request.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => url,
            _ => {
                let error = format!("rendered URL {:?} is not an http(s) URL", request.url);
                return (self.failed_attempt(start_ms, ErrorClass::Render, error), Verdict::Fail);
            }
        };
        let ports = &self.inner.options.ports;
        if let Some(port) = url.port_or_known_default()
            && !ports.is_empty()
            && !ports.contains(&port)
        {
            let error = format!("port {port} is not one of delivery.ports {ports:?}");
            return (self.failed_attempt(start_ms, ErrorClass::Blocked, error), Verdict::Fail);
        }
        if let Some(error) = self.blocked_literal(&url) {
            return (self.failed_attempt(start_ms, ErrorClass::Blocked, error), Verdict::Fail);
        }
        let method =
            reqwest::Method::from_bytes(request.method.as_bytes()).unwrap_or(reqwest::Method::POST);
        let address = url.host_str().unwrap_or_default().to_string();
        let port = url.port_or_known_default().unwrap_or_default();
        span.record("http.request.method", method.as_str());
        span.record("url.full", display_url(&url));
        span.record("server.address", address.as_str());
        span.record("server.port", port);
        let timestamp = start_ms / 1000;
        let now = crate::now_ms();
        let secrets: Vec<Secret> = webhook
            .signing_secrets
            .iter()
            .filter(|s| s.expires_at_ms.is_none_or(|at| at > now))
            .filter_map(|s| self.inner.cipher.open(&s.sealed).ok())
            .collect();
        let body = request.body.clone().into_bytes();
        let client = match &webhook.client_certificate {
            Some(certificate) => {
                let built = self.inner.credentials.client_with(
                    &self.inner.cipher,
                    &delivery.webhook_id,
                    certificate,
                    |identity| http_client(&self.inner.options, &self.inner.guard, Some(identity)),
                );
                match built {
                    Ok(client) => client,
                    Err(error) => {
                        let attempt = self.failed_attempt(start_ms, ErrorClass::Credentials, error);
                        return (attempt, Verdict::Fail);
                    }
                }
            }
            None => self.inner.client.clone(),
        };
        let bearer = match &webhook.oauth2 {
            Some(oauth) => match self.token(&client, &delivery.webhook_id, oauth).await {
                Ok(token) => Some(token),
                Err((class, error)) => {
                    let verdict = if class == ErrorClass::Blocked {
                        Verdict::Fail
                    } else {
                        classify(None, None)
                    };
                    return (self.failed_attempt(start_ms, class, error), verdict);
                }
            },
            None => None,
        };
        let mut builder = client
            .request(method.clone(), url)
            .timeout(Duration::from_millis(webhook.timeout_ms))
            .header("webhook-id", &delivery.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sign(&secrets, &delivery.id, timestamp, &body))
            .header(
                "traceparent",
                crate::telemetry::traceparent_of(span.context().span().span_context())
                    .unwrap_or_else(|| traceparent(&delivery.traceparent)),
            );
        if method != reqwest::Method::GET {
            builder = builder.header("content-type", &request.content_type);
        }
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        for (name, sealed) in &request.sealed_headers {
            match self.inner.cipher.open(sealed) {
                Ok(value) => builder = builder.header(name.as_str(), value.expose()),
                Err(error) => {
                    return (
                        self.failed_attempt(
                            start_ms,
                            ErrorClass::Render,
                            format!("header {name}: {error}"),
                        ),
                        Verdict::Fail,
                    );
                }
            }
        }
        if let Some(token) = &bearer {
            builder = builder.header("authorization", format!("Bearer {}", token.expose()));
        }
        if method != reqwest::Method::GET {
            builder = builder.body(body);
        }
        let mut attempt = self.failed_attempt(start_ms, ErrorClass::None, String::new());
        let verdict = match builder.send().await {
            Ok(mut response) => {
                let status = response.status().as_u16();
                attempt.status_code = status;
                attempt.response_headers = response
                    .headers()
                    .iter()
                    .take(64)
                    .map(|(k, v)| {
                        let value = if redacted(k.as_str()) {
                            "[redacted]".to_string()
                        } else {
                            String::from_utf8_lossy(v.as_bytes()).chars().take(1024).collect()
                        };
                        (k.as_str().to_string(), value)
                    })
                    .collect();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, crate::now_ms()));
                while attempt.response_body.len() < RESPONSE_EXCERPT {
                    match tokio::time::timeout(
                        Duration::from_millis(webhook.timeout_ms),
                        response.chunk(),
                    )
                    .await
                    {
                        Ok(Ok(Some(chunk))) => {
                            let room = RESPONSE_EXCERPT - attempt.response_body.len();
                            attempt
                                .response_body
                                .extend_from_slice(&chunk[..chunk.len().min(room)]);
                        }
                        _ => break,
                    }
                }
                let mut verdict = classify(Some(status), retry_after);
                if status == 401 && bearer.is_some() {
                    // The token was refused (revoked, or expired early): the next attempt
                    // fetches a new one.
                    self.inner.credentials.forget(&delivery.webhook_id);
                    verdict = classify(None, None);
                }
                if verdict != Verdict::Success {
                    attempt.error_class = ErrorClass::HttpStatus;
                    attempt.error = format!("endpoint answered {status}");
                }
                verdict
            }
            Err(error) => {
                let blocked = std::error::Error::source(&error).and_then(find_blocked);
                let (class, message) = if let Some(blocked) = blocked {
                    (ErrorClass::Blocked, blocked)
                } else if error.is_timeout() {
                    (ErrorClass::Timeout, format!("no answer within {} ms", webhook.timeout_ms))
                } else {
                    (ErrorClass::Connection, describe(&error))
                };
                attempt.error_class = class;
                attempt.error = message;
                if class == ErrorClass::Blocked { Verdict::Fail } else { classify(None, None) }
            }
        };
        let elapsed = started.elapsed();
        attempt.duration_ms = elapsed.as_millis() as u64;
        let mut attributes = vec![
            KeyValue::new("http.request.method", method.as_str().to_string()),
            KeyValue::new("server.address", address),
            KeyValue::new("server.port", i64::from(port)),
            KeyValue::new("tidings.webhook.id", delivery.webhook_id.clone()),
        ];
        if attempt.status_code > 0 {
            attributes
                .push(KeyValue::new("http.response.status_code", i64::from(attempt.status_code)));
        }
        if attempt.error_class != ErrorClass::None {
            attributes.push(KeyValue::new("error.type", error_type(&attempt)));
        }
        crate::telemetry::metrics().http_duration.record(elapsed.as_secs_f64(), &attributes);
        (attempt, verdict)
    }

    /// Updates the circuit and disables webhooks that are gone or kept failing.
    async fn record(
        &self,
        id: &str,
        endpoint: &Endpoint,
        attempt: &Attempt,
        verdict: Verdict,
        probe: bool,
    ) {
        let now = crate::now_ms();
        self.inner.pulse.record(id, now, verdict == Verdict::Success, attempt.duration_ms);
        let disable = {
            let mut circuit = lock(&endpoint.circuit);
            let failed = matches!(verdict, Verdict::Retry(_))
                || (verdict == Verdict::Fail
                    && attempt.error_class != ErrorClass::Blocked
                    && attempt.status_code >= 500);
            if probe {
                circuit.probing = false;
            }
            if verdict == Verdict::Success || !failed {
                if circuit.open_until.take().is_some() {
                    info!(webhook = id, "circuit closed");
                    circuit_state(id, CIRCUIT_CLOSED);
                }
                circuit.failures = 0;
                circuit.failing_since_ms = None;
                circuit.cooldown = self.inner.options.circuit_cooldown;
                None
            } else {
                circuit.failures += 1;
                let since = *circuit.failing_since_ms.get_or_insert(now);
                // Only the first opening and a failed probe (re)start the cooldown; attempts that
                // were already in flight when the circuit opened do not extend it.
                if circuit.open_until.is_none()
                    && circuit.failures >= self.inner.options.circuit_threshold
                {
                    circuit.open_until = Some(Instant::now() + circuit.cooldown);
                    warn!(webhook = id, failures = circuit.failures, "circuit opened");
                    circuit_state(id, CIRCUIT_OPEN);
                } else if probe {
                    circuit.cooldown = (circuit.cooldown * 2).min(Duration::from_secs(600));
                    circuit.open_until = Some(Instant::now() + circuit.cooldown);
                    debug!(webhook = id, cooldown = ?circuit.cooldown, "probe failed; circuit stays open");
                    circuit_state(id, CIRCUIT_OPEN);
                }
                (now - since > self.inner.options.disable_after.as_millis() as i64)
                    .then(|| format!("endpoint kept failing since {}", humanize_ms(since)))
            }
        };
        let disable = if verdict == Verdict::Gone {
            Some("endpoint answered 410 Gone".to_string())
        } else {
            disable
        };
        if let Some(reason) = disable {
            self.disable(id, &reason).await;
        }
    }

    /// Disables a webhook with a reason, unless it already is disabled.
    pub async fn disable(&self, id: &str, reason: &str) {
        for _ in 0..5 {
            let Ok(current) = self.inner.defs.get(id).await else { return };
            if !current.value.enabled {
                return;
            }
            let mut webhook = current.value.clone();
            webhook.enabled = false;
            webhook.disabled_reason = reason.to_string();
            webhook.disabled_at_ms = Some(crate::now_ms());
            webhook.updated_at_ms = crate::now_ms();
            match self.inner.defs.replace(id, &webhook, current.revision).await {
                Ok(_) => {
                    warn!(webhook = id, reason, "webhook disabled");
                    return;
                }
                Err(DefsError::Conflict { .. }) => continue,
                Err(error) => {
                    debug!(webhook = id, %error, "cannot disable the webhook");
                    return;
                }
            }
        }
    }
}

fn find_blocked(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(blocked) = e.downcast_ref::<super::ssrf::Blocked>() {
            return Some(blocked.0.clone());
        }
        current = e.source();
    }
    None
}

fn describe(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        message = format!("{message}: {e}");
        source = e.source();
    }
    message
}

fn humanize_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |t| t.to_rfc3339())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_spans_leave_credentials_out() {
        let url = reqwest::Url::parse("https://user:pw@example.com:8443/hook?token=abc&x=1")
            .expect("valid");
        assert_eq!(display_url(&url), "https://example.com:8443/hook?token=REDACTED&x=REDACTED");
        let plain = reqwest::Url::parse("http://example.com/a").expect("valid");
        assert_eq!(display_url(&plain), "http://example.com/a");
    }

    #[test]
    fn attempts_continue_a_valid_trace_and_start_one_otherwise() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = traceparent(parent);
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{child}");
        assert!(child.ends_with("-01") && child.len() == 55, "{child}");
        assert_ne!(&child[36..52], "00f067aa0ba902b7", "each attempt is a new span");
        for invalid in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(crate::telemetry::context_of(invalid).is_none(), "{invalid}");
            let fresh = traceparent(invalid);
            assert!(fresh.starts_with("00-") && fresh.ends_with("-01") && fresh.len() == 55);
            assert!(crate::telemetry::context_of(&fresh).is_some(), "{fresh}");
        }
    }
}
