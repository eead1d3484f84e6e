//! The errors of client calls, decoded from gRPC statuses.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;

/// One invalid field of a request: its path (for example `webhook.url`) and why it is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field in the request, for example `campaign.trigger.interval.every`.
    pub field: String,
    /// Why the value was refused.
    pub reason: String,
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request was refused; `violations` names each invalid field.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// The server's message, naming every violation.
        message: String,
        /// The invalid fields with their reasons.
        violations: Vec<FieldViolation>,
    },
    /// The resource named by the request does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request conflicts with the resource's state: it exists already, its etag changed,
    /// or its state does not allow the change.
    #[error("conflict: {0}")]
    Conflict(String),
    /// No valid token was sent.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token lacks the scope the call needs.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The node cannot be reached or cannot serve the call now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A limit was reached; `retry_after` is the server's hint, when it gave one.
    #[error("resource exhausted: {message}")]
    ResourceExhausted {
        /// The server's message, naming the limit.
        message: String,
        /// How long the server asks to wait before trying again.
        retry_after: Option<Duration>,
    },
    /// No answer came within the call's timeout.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The client was configured with something it cannot use (an endpoint, a certificate).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// Any other status.
    #[error("{code:?}: {message}")]
    Other {
        /// The gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
    },
}

impl Error {
    /// Returns true when trying the same call again later can succeed.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Unavailable(_) | Error::DeadlineExceeded(_) => true,
            Error::ResourceExhausted { retry_after, .. } => retry_after.is_some(),
            _ => false,
        }
    }

    /// Returns the invalid fields of an `InvalidArgument` error; empty for any other.
    pub fn violations(&self) -> &[FieldViolation] {
        match self {
            Error::InvalidArgument { violations, .. } => violations,
            _ => &[],
        }
    }

    /// Returns the gRPC status code this error came from.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } | Error::Config(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::Conflict(_) => Code::FailedPrecondition,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unavailable(_) => Code::Unavailable,
            Error::ResourceExhausted { .. } => Code::ResourceExhausted,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Other { code, .. } => *code,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_string();
        // A status with a source was made here, from a transport failure (a node that went
        // away, a refused handshake), not sent by a node.
        let local = std::error::Error::source(&status).map(|source| source.to_string());
        match status.code() {
            Code::Unknown if local.is_some() => {
                Error::Unavailable(format!("{message}: {}", local.unwrap_or_default()))
            }
            Code::InvalidArgument => {
                let violations = status
                    .get_details_bad_request()
                    .map(|bad| {
                        bad.field_violations
                            .into_iter()
                            .map(|v| FieldViolation { field: v.field, reason: v.description })
                            .collect()
                    })
                    .unwrap_or_default();
                Error::InvalidArgument { message, violations }
            }
            Code::NotFound => Error::NotFound(message),
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => {
                Error::Conflict(message)
            }
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::PermissionDenied => Error::PermissionDenied(message),
            Code::Unavailable => Error::Unavailable(message),
            // The caller never sees its own cancellations (it dropped the future), so a
            // cancelled call is one whose connection was lost: the node went away mid-call.
            Code::Cancelled => Error::Unavailable(format!("connection lost: {message}")),
            Code::ResourceExhausted => {
                let retry_after = status.get_details_retry_info().and_then(|info| info.retry_delay);
                Error::ResourceExhausted { message, retry_after }
            }
            Code::DeadlineExceeded => Error::DeadlineExceeded(message),
            code => Error::Other { code, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn field_violations_are_decoded_from_bad_request_details() {
        let mut details = ErrorDetails::new();
        details.add_bad_request_violation("webhook.url", "must be http or https");
        let status = tonic::Status::with_error_details(Code::InvalidArgument, "bad", details);
        let error = Error::from(status);
        assert_eq!(
            error.violations(),
            [FieldViolation {
                field: "webhook.url".into(),
                reason: "must be http or https".into()
            }]
        );
        assert!(!error.retryable());
    }

    #[test]
    fn exhaustion_is_retryable_only_with_a_hint() {
        let plain = Error::from(tonic::Status::resource_exhausted("full"));
        assert!(!plain.retryable());
        let details = ErrorDetails::with_retry_info(Some(Duration::from_secs(2)));
        let hinted = Error::from(tonic::Status::with_error_details(
            Code::ResourceExhausted,
            "full",
            details,
        ));
        assert!(hinted.retryable());
        assert!(Error::from(tonic::Status::unavailable("down")).retryable());
        assert!(Error::from(tonic::Status::cancelled("operation was canceled")).retryable());
        assert_eq!(
            Error::from(tonic::Status::already_exists("x")).code(),
            Code::FailedPrecondition
        );
    }
}
