//! The gRPC services and the one place where errors become statuses.

mod campaigns;
mod cluster;
mod contacts;
mod convert;
mod deliveries;
mod events;
mod tokens;
mod webhooks;

pub(crate) use campaigns::CampaignApi;
pub(crate) use cluster::ClusterApi;
pub(crate) use contacts::ContactApi;
pub(crate) use deliveries::DeliveryApi;
pub(crate) use events::EventApi;
pub(crate) use tokens::TokenApi;
pub(crate) use webhooks::WebhookApi;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tidings_scheduler::coordination::Failure;
use tidings_scheduler::defs::DefsError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Most items one List call returns.
pub(crate) const MAX_PAGE_SIZE: u32 = 1000;
/// Items a List call returns when the caller does not say.
pub(crate) const DEFAULT_PAGE_SIZE: u32 = 50;

/// The long-lived streams (WatchDeliveries, WatchRun) this node serves at once.
#[derive(Clone, Debug)]
pub(crate) struct Streams {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    max: usize,
}

impl Streams {
    pub(crate) fn new(max: usize) -> Self {
        Self { permits: std::sync::Arc::new(tokio::sync::Semaphore::new(max)), max }
    }

    /// Takes a place for one stream, held until the permit is dropped.
    pub(crate) fn open(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            ApiError::Exhausted(format!(
                "this node already serves {} watch streams, its limit (grpc.max_streams); \
                 try again later",
                self.max
            ))
        })
    }
}

/// The stream type of server-streaming calls.
pub(crate) type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Ends `stream` with RESOURCE_EXHAUSTED when `lagged` was set (its producer gave up on a
/// caller that left the buffer full for [`SLOW_CALLER`]), and holds the stream's `permit`
/// until then.
pub(crate) fn ending_when_lagged<T: Send + 'static>(
    stream: impl futures::Stream<Item = Result<T, Status>> + Send + 'static,
    lagged: std::sync::Arc<std::sync::atomic::AtomicBool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> BoxStream<T> {
    use futures::StreamExt;
    let end = futures::stream::once(async move {
        let _permit = permit;
        lagged.load(std::sync::atomic::Ordering::Acquire).then(|| {
            Status::resource_exhausted(format!(
                "this watch fell behind: its buffer stayed full for {} s; watch again and read \
                 faster",
                SLOW_CALLER.as_secs()
            ))
        })
    })
    .filter_map(|error| async move { error.map(Err) });
    Box::pin(stream.chain(end))
}

pub(crate) use tidings_scheduler::app::deliveries::SLOW_CALLER;

/// How long a caller is asked to wait after RESOURCE_EXHAUSTED.
const EXHAUSTED_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Every failure a caller can see, by the status it maps to.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// Bad input: one violation per field.
    Invalid(Vec<(String, String)>),
    NotFound(String),
    AlreadyExists(String),
    FailedPrecondition(String),
    Unavailable(String),
    Exhausted(String),
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::Invalid(violations) => {
                let message = Violations(violations.clone()).describe();
                let mut details = ErrorDetails::new();
                for (field, reason) in violations {
                    details.add_bad_request_violation(field, reason);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ApiError::NotFound(message) => Status::not_found(message),
            ApiError::AlreadyExists(message) => Status::already_exists(message),
            ApiError::FailedPrecondition(message) => Status::failed_precondition(message),
            ApiError::Unavailable(message) => Status::unavailable(message),
            ApiError::Exhausted(message) => {
                // The hint lets clients back off for as long as a full store or stream table
                // takes to drain, instead of hammering the node.
                let details = ErrorDetails::with_retry_info(Some(EXHAUSTED_RETRY_AFTER));
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            ApiError::Internal(message) => Status::internal(message),
        }
    }
}

impl ApiError {
    /// The error for a store's failure, described by `message`.
    pub(crate) fn of_store(failure: Failure, message: String) -> Self {
        match failure {
            Failure::Unavailable => ApiError::Unavailable(format!("{message}; try again")),
            Failure::Exhausted => ApiError::Exhausted(format!("{message}; try again later")),
            Failure::Invalid => ApiError::Invalid(vec![("request".into(), message)]),
            Failure::Internal => ApiError::Internal(message),
        }
    }
}

impl From<tidings_scheduler::engine::EngineError> for ApiError {
    fn from(error: tidings_scheduler::engine::EngineError) -> Self {
        use tidings_scheduler::engine::EngineError;
        let message = error.to_string();
        match error {
            EngineError::Read { source, .. } | EngineError::Write { source, .. } => {
                match source.failure() {
                    failure @ (Failure::Unavailable | Failure::Exhausted) => {
                        ApiError::of_store(failure, message)
                    }
                    _ => ApiError::Internal(message),
                }
            }
            EngineError::Definition(error) => error.into(),
            _ => ApiError::Internal(message),
        }
    }
}

impl From<DefsError> for ApiError {
    fn from(error: DefsError) -> Self {
        match error {
            DefsError::NotFound { .. } => ApiError::NotFound(error.to_string()),
            DefsError::AlreadyExists { .. } => ApiError::AlreadyExists(error.to_string()),
            DefsError::Conflict { .. } => ApiError::FailedPrecondition(error.to_string()),
            DefsError::Corrupt { .. } | DefsError::Unencodable { .. } => {
                ApiError::Internal(error.to_string())
            }
            DefsError::Store(store) => ApiError::of_store(store.failure(), store.to_string()),
        }
    }
}

/// Collects field violations so a caller learns every problem of a request at once.
#[derive(Debug, Default)]
pub(crate) struct Violations(Vec<(String, String)>);

impl Violations {
    pub(crate) fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push((field.into(), reason.into()));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Returns whether no violation names `field` or a field inside it.
    pub(crate) fn is_empty_for(&self, field: &str) -> bool {
        !self.0.iter().any(|(f, _)| f.starts_with(field))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// Returns the violations as one line, `field: reason; ...`.
    pub(crate) fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(field, reason)| format!("{field}: {reason}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Returns the violations as an error, or `Ok` when there are none.
    pub(crate) fn check(self) -> Result<(), ApiError> {
        if self.0.is_empty() { Ok(()) } else { Err(ApiError::Invalid(self.0)) }
    }
}

/// Returns the single violation as an error.
pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ApiError {
    ApiError::Invalid(vec![(field.into(), reason.into())])
}

/// Checks a resource id: 1 to 63 of `[a-z0-9_-]`, starting with a letter or digit.
pub(crate) fn check_id(violations: &mut Violations, field: &str, id: &str) {
    if id.is_empty() {
        violations.add(field, "is required");
    } else if id.len() > 63 {
        violations.add(field, "must be at most 63 characters");
    } else if !id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        || !id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        violations.add(
            field,
            "must be lowercase letters, digits, '-' and '_', starting with a letter or digit",
        );
    }
}

/// Returns a new id with a kind prefix, for example `wh_01J...`.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new().to_string().to_ascii_lowercase())
}

/// Returns the page size to use, or the violation.
pub(crate) fn page_size(size: u32) -> usize {
    match size {
        0 => DEFAULT_PAGE_SIZE as usize,
        n => n.min(MAX_PAGE_SIZE) as usize,
    }
}

/// Encodes the last id of a page as the token of the next one.
pub(crate) fn page_token(last_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(last_id)
}

/// Decodes a page token back into the id to continue after.
pub(crate) fn parse_page_token(token: &str) -> Result<Option<String>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .map(Some)
        .ok_or_else(|| invalid("page_token", "is not a token returned by this API"))
}

/// Parses an etag (a store revision) given by a caller.
pub(crate) fn parse_etag(field: &str, etag: &str) -> Result<Option<i64>, ApiError> {
    if etag.is_empty() {
        return Ok(None);
    }
    etag.trim_matches('"')
        .parse::<i64>()
        .ok()
        .filter(|revision| *revision > 0)
        .map(Some)
        .ok_or_else(|| invalid(field, "is not an etag returned by this API"))
}

/// Returns one page of definitions after the page token, and the next page's token.
pub(crate) async fn list_page<T: serde::Serialize + serde::de::DeserializeOwned>(
    defs: &tidings_scheduler::defs::Definitions<T>,
    token: &str,
    size: u32,
) -> Result<(Vec<tidings_scheduler::defs::Versioned<T>>, String), ApiError> {
    let after = parse_page_token(token)?;
    let (items, more) = defs.list(after.as_deref(), page_size(size)).await?;
    let next = match items.last() {
        Some(last) if more => page_token(&last.id),
        _ => String::new(),
    };
    Ok((items, next))
}
