//! The Rust client of Tidings.
//!
//! - [`Client`]: one connection (or a balanced set of them) to a node or a cluster, built with
//!   [`Client::builder`]; its services ([`Client::webhooks`], [`Client::events`],
//!   [`Client::campaigns`], …) share it and retry what is safe to retry ([`RetryPolicy`]);
//! - [`Error`]: what went wrong, decoded from the gRPC status (field violations included);
//! - [`List`]: paginated listings, one page at a time or as a `Stream`;
//! - [`webhook::Verifier`]: Standard Webhooks verification for the receivers Tidings calls;
//! - [`v1`]: the messages, with constructors for the common ones (`Event::new(…)`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tidings_client::Error> {
//! use tidings_client::{Client, v1::Event};
//! let client = Client::builder()
//!     .endpoint("http://127.0.0.1:50051")
//!     .token(std::env::var("TIDINGS_TOKEN").unwrap_or_default())
//!     .connect()
//!     .await?;
//! let event = Event::new("order.shipped", "user-42").data(serde_json::json!({"order": 1234}));
//! let published = client.events().publish(event).await?;
//! println!("event {}", published.event_id);
//! # Ok(()) }
//! ```

mod error;
mod list;
mod retry;
mod services;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use error::{Error, FieldViolation};
pub use list::{List, Page};
pub use retry::RetryPolicy;
pub use services::{Campaigns, Cluster, Contacts, Deliveries, Events, Segments, Tokens, Webhooks};

pub use prost_types;
pub use tidings_api::json;
pub use tidings_api::v1;
pub use tidings_api::v1::campaign_service_client::CampaignServiceClient;
pub use tidings_api::v1::cluster_service_client::ClusterServiceClient;
pub use tidings_api::v1::contact_service_client::ContactServiceClient;
pub use tidings_api::v1::delivery_service_client::DeliveryServiceClient;
pub use tidings_api::v1::event_service_client::EventServiceClient;
pub use tidings_api::v1::segment_service_client::SegmentServiceClient;
pub use tidings_api::v1::token_service_client::TokenServiceClient;
pub use tidings_api::v1::webhook_service_client::WebhookServiceClient;
pub use tonic;

/// The transport every generated client of a [`Client`] shares: the channel, with the bearer
/// token added to each request.
pub type Transport = InterceptedService<Channel, Credentials>;

/// Adds the `authorization` header of the configured token to every request.
#[derive(Clone)]
pub struct Credentials {
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = if self.authorization.is_some() { "<redacted>" } else { "<none>" };
        f.debug_struct("Credentials").field("token", &token).finish()
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Configures a [`Client`]; see [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    token: Option<String>,
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
    connect_timeout: Duration,
    timeout: Duration,
    user_agent: String,
    retry: RetryPolicy,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            token: None,
            ca: None,
            identity: None,
            domain: None,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            user_agent: format!("tidings-client/{}", env!("CARGO_PKG_VERSION")),
            retry: RetryPolicy::default(),
        }
    }
}

impl ClientBuilder {
    /// Adds a node to call: `http://host:port`, or `https://host:port` for TLS. Calls are
    /// balanced over every endpoint added; `http://127.0.0.1:50051` when none is.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoints.push(url.into());
        self
    }

    /// Adds several nodes; see [`endpoint`](Self::endpoint).
    pub fn endpoints(mut self, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.endpoints.extend(urls.into_iter().map(Into::into));
        self
    }

    /// Sets the bearer token sent with every call; an empty token sends none.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.token = (!token.is_empty()).then_some(token);
        self
    }

    /// Trusts the PEM certificate authority the nodes' certificates chain to, instead of the
    /// system's roots.
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca = Some(pem.into());
        self
    }

    /// Presents a PEM client certificate and its key, to nodes that ask for one.
    pub fn client_certificate(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Sets the name the nodes' certificates must carry, when it differs from the endpoint's
    /// host.
    pub fn tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// Sets the longest wait for a connection; 5 s by default.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the longest wait for the answer to one attempt of a unary call; 30 s by default.
    /// Streams are not bound by it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the `user-agent` sent to the nodes, for their logs.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// Sets how calls safe to repeat are retried.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Connects to the first endpoint (the others connect on first use) and returns the client.
    pub async fn connect(self) -> Result<Client, Error> {
        let (channel, endpoints) = self.channel()?;
        if endpoints.len() == 1 {
            endpoints[0].connect().await.map_err(|error| {
                Error::Unavailable(format!("{}: {}", endpoints[0].uri(), describe(&error)))
            })?;
        }
        self.finish(channel)
    }

    /// Returns the client without connecting: the first call connects.
    pub fn connect_lazy(self) -> Result<Client, Error> {
        let (channel, _) = self.channel()?;
        self.finish(channel)
    }

    fn finish(self, channel: Channel) -> Result<Client, Error> {
        let authorization = match &self.token {
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                Error::Config("token: must be printable ASCII without spaces".into())
            })?),
            None => None,
        };
        Ok(Client {
            transport: InterceptedService::new(channel, Credentials { authorization }),
            settings: Arc::new(Settings { retry: self.retry, timeout: self.timeout }),
        })
    }

    fn channel(&self) -> Result<(Channel, Vec<Endpoint>), Error> {
        let urls: Vec<&str> = if self.endpoints.is_empty() {
            vec!["http://127.0.0.1:50051"]
        } else {
            self.endpoints.iter().map(String::as_str).collect()
        };
        let mut endpoints = Vec::with_capacity(urls.len());
        for url in urls {
            endpoints.push(self.endpoint_for(url)?);
        }
        let channel = if endpoints.len() == 1 {
            endpoints[0].connect_lazy()
        } else {
            Channel::balance_list(endpoints.clone().into_iter())
        };
        Ok((channel, endpoints))
    }

    fn endpoint_for(&self, url: &str) -> Result<Endpoint, Error> {
        let endpoint = Endpoint::from_shared(url.to_string()).map_err(|_| {
            Error::Config(format!("endpoint: {url:?} is not a URL such as http://127.0.0.1:50051"))
        })?;
        let mut endpoint = endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .user_agent(self.user_agent.clone())
            .map_err(|_| Error::Config("user_agent: not a valid header value".into()))?;
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &self.domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|error| Error::Config(format!("tls: {}", describe(&error))))?;
        } else if self.ca.is_some() || self.identity.is_some() {
            return Err(Error::Config(format!(
                "endpoint: {url} is plain http, but TLS certificates were given; use https://"
            )));
        }
        Ok(endpoint)
    }
}

/// Returns an error with its causes, which tonic keeps out of its `Display`.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[derive(Debug)]
struct Settings {
    retry: RetryPolicy,
    timeout: Duration,
}

/// A connection to Tidings; cheap to clone, and every clone and service shares the connection.
#[derive(Debug, Clone)]
pub struct Client {
    transport: Transport,
    settings: Arc<Settings>,
}

impl Client {
    /// Returns a builder; its defaults call `http://127.0.0.1:50051` without a token.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Returns the shared transport, for the generated clients of this crate's re-exports.
    pub fn transport(&self) -> Transport {
        self.transport.clone()
    }

    /// Returns the webhook service.
    pub fn webhooks(&self) -> Webhooks {
        Webhooks::new(self.clone())
    }

    /// Returns the segment service.
    pub fn segments(&self) -> Segments {
        Segments::new(self.clone())
    }

    /// Returns the campaign service.
    pub fn campaigns(&self) -> Campaigns {
        Campaigns::new(self.clone())
    }

    /// Returns the contact service.
    pub fn contacts(&self) -> Contacts {
        Contacts::new(self.clone())
    }

    /// Returns the event service.
    pub fn events(&self) -> Events {
        Events::new(self.clone())
    }

    /// Returns the delivery service.
    pub fn deliveries(&self) -> Deliveries {
        Deliveries::new(self.clone())
    }

    /// Returns the cluster service.
    pub fn cluster(&self) -> Cluster {
        Cluster::new(self.clone())
    }

    /// Returns the token service.
    pub fn tokens(&self) -> Tokens {
        Tokens::new(self.clone())
    }

    /// Runs one unary call, again after retryable errors when `safe` says a repeat cannot do
    /// harm. Each attempt is bound by the configured timeout.
    pub(crate) async fn call<R, F, Fut>(&self, safe: bool, mut attempt: F) -> Result<R, Error>
    where
        F: FnMut(Transport, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let timeout = self.settings.timeout;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match tokio::time::timeout(timeout, attempt(self.transport(), timeout))
                .await
            {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => Error::from(status),
                Err(_) => {
                    Error::DeadlineExceeded(format!("no answer within {} ms", timeout.as_millis()))
                }
            };
            let retry = if safe {
                self.settings.retry.delay(attempts, &error, rand::random::<f64>())
            } else {
                None
            };
            match retry {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(error),
            }
        }
    }
}

/// Returns a request carrying `timeout` as its gRPC deadline, so the node stops working on it
/// when the client has given up.
pub(crate) fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Returns a fresh idempotency key, for the calls the client makes safe to retry.
pub(crate) fn idempotency_key() -> String {
    format!("tidings-client-{:032x}", rand::random::<u128>())
}
