//! The delivery record kept in its contact's partition, with every attempt.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::render::Rendered;
use crate::cluster::PartitionId;
use crate::secrets::Sealed;

/// Where a delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for an attempt.
    Pending,
    /// An attempt is in flight.
    Sending,
    /// 2xx received.
    Delivered,
    /// Given up.
    Failed,
    /// Not sent by a guard's decision.
    Skipped,
}

impl Status {
    /// Returns the status as stored and filtered on.
    pub fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sending => "sending",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }
}

/// Why an attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// No failure.
    None,
    /// Non-2xx answer.
    HttpStatus,
    /// Took longer than the timeout.
    Timeout,
    /// No connection.
    Connection,
    /// Destination address refused.
    Blocked,
    /// A template failed.
    Render,
    /// Webhook disabled or circuit open.
    EndpointDisabled,
    /// The webhook's credentials could not be obtained.
    Credentials,
}

impl ErrorClass {
    /// Returns the class as it is named in metrics and in the API (snake case).
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::None => "none",
            ErrorClass::HttpStatus => "http_status",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Connection => "connection",
            ErrorClass::Blocked => "blocked",
            ErrorClass::Render => "render",
            ErrorClass::EndpointDisabled => "endpoint_disabled",
            ErrorClass::Credentials => "credentials",
        }
    }
}

/// One attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// Start, Unix milliseconds.
    pub start_ms: i64,
    /// Duration in milliseconds.
    pub duration_ms: u64,
    /// Status code; 0 without a response.
    pub status_code: u16,
    /// Failure class.
    pub error_class: ErrorClass,
    /// Failure text.
    pub error: String,
    /// Response headers.
    pub response_headers: BTreeMap<String, String>,
    /// First 4 KiB of the response body.
    pub response_body: Vec<u8>,
    /// Node that made it.
    pub node: String,
}

/// The request as stored: secret header values sealed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredRequest {
    /// Method.
    pub method: String,
    /// URL.
    pub url: String,
    /// Plain headers.
    pub headers: BTreeMap<String, String>,
    /// Secret headers, sealed.
    pub sealed_headers: BTreeMap<String, Sealed>,
    /// Body.
    pub body: String,
    /// Content type.
    pub content_type: String,
}

/// A delivery.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Identifier, sent as `webhook-id`.
    pub id: String,
    /// Partition holding it.
    pub partition: PartitionId,
    /// Webhook.
    pub webhook_id: String,
    /// Campaign; empty for tests.
    pub campaign_id: String,
    /// Run, if any.
    pub run_id: String,
    /// Contact.
    pub contact_id: String,
    /// Triggering event, if any.
    pub event_id: String,
    /// Status.
    pub status: Status,
    /// Why it failed or was skipped.
    pub reason: String,
    /// The rendered request; `None` when rendering failed.
    pub request: Option<StoredRequest>,
    /// Attempts, oldest first (the latest 50).
    pub attempts: Vec<Attempt>,
    /// Index into the retry schedule of the next retry.
    pub retry_index: u32,
    /// Bumped at each dispatch; a result for an older dispatch only adds to the log.
    pub dispatch_seq: u64,
    /// When the next attempt is due, while pending.
    pub next_attempt_ms: Option<i64>,
    /// Creation, Unix milliseconds.
    pub created_ms: i64,
    /// Last change.
    pub updated_ms: i64,
    /// The W3C trace context of the call that caused it (a `traceparent` value), if it came
    /// with one: its attempts continue that trace.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
}

/// Most attempts kept per delivery.
pub const MAX_ATTEMPTS_KEPT: usize = 50;

/// Returns a new delivery id in `partition`: the partition is readable from the id, so a
/// delivery is found without an index.
pub fn new_id(partition: PartitionId) -> String {
    format_id(partition, ulid::Ulid::new())
}

fn format_id(partition: PartitionId, ulid: ulid::Ulid) -> String {
    format!("msg_{partition:04}{}", ulid.to_string().to_ascii_lowercase())
}

/// Returns the id of the delivery that `seed` (what caused it: an event and a campaign, a run
/// and a contact, a follow-up wait) makes at `origin_ms`. The same cause always gives the same
/// id, so a cause handled again after a crash sends the same `webhook-id`, and ids still sort
/// by time.
pub fn derived_id(partition: PartitionId, origin_ms: i64, seed: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(seed.as_bytes());
    let mut random = [0u8; 16];
    random[6..].copy_from_slice(&digest[..10]);
    format_id(
        partition,
        ulid::Ulid::from_parts(origin_ms.max(0) as u64, u128::from_be_bytes(random)),
    )
}

/// Returns the lowest delivery id of `partition` created at `ms`: every delivery created
/// before sorts before it.
pub fn first_id_at(partition: PartitionId, ms: i64) -> String {
    format_id(partition, ulid::Ulid::from_parts(ms.max(0) as u64, 0))
}

/// Returns the time in a delivery id, Unix milliseconds.
pub fn id_time_ms(id: &str) -> Option<i64> {
    let ulid = ulid::Ulid::from_string(id.strip_prefix("msg_")?.get(4..)?).ok()?;
    Some(ulid.timestamp_ms() as i64)
}

/// Returns the partition of a delivery id.
pub fn partition_of_id(id: &str) -> Option<PartitionId> {
    id.strip_prefix("msg_")?.get(..4)?.parse().ok()
}

/// Who and what a new delivery is for.
#[derive(Clone, Copy, Debug, Default)]
pub struct Origin<'a> {
    /// Webhook called.
    pub webhook_id: &'a str,
    /// Campaign, if any.
    pub campaign_id: &'a str,
    /// Run, if any.
    pub run_id: &'a str,
    /// Contact.
    pub contact_id: &'a str,
    /// Triggering event, if any.
    pub event_id: &'a str,
    /// The trace context the triggering event was published under, if any.
    pub traceparent: &'a str,
}

impl Delivery {
    /// Returns a pending delivery with no request and no attempt yet.
    pub fn new(id: String, partition: PartitionId, origin: Origin<'_>, now_ms: i64) -> Self {
        Self {
            id,
            partition,
            webhook_id: origin.webhook_id.to_string(),
            campaign_id: origin.campaign_id.to_string(),
            run_id: origin.run_id.to_string(),
            contact_id: origin.contact_id.to_string(),
            event_id: origin.event_id.to_string(),
            status: Status::Pending,
            reason: String::new(),
            request: None,
            attempts: Vec::new(),
            retry_index: 0,
            dispatch_seq: 0,
            next_attempt_ms: None,
            created_ms: now_ms,
            updated_ms: now_ms,
            traceparent: origin.traceparent.to_string(),
        }
    }
}

impl StoredRequest {
    /// Seals the secret headers of a rendered request for storage.
    pub fn seal(rendered: &Rendered, cipher: &crate::secrets::Cipher) -> Self {
        let mut headers = BTreeMap::new();
        let mut sealed_headers = BTreeMap::new();
        for (name, value) in &rendered.headers {
            if rendered.secret_headers.contains(name) {
                sealed_headers
                    .insert(name.clone(), cipher.seal(&crate::secrets::Secret::new(value.clone())));
            } else {
                headers.insert(name.clone(), value.clone());
            }
        }
        Self {
            method: rendered.method.clone(),
            url: rendered.url.clone(),
            headers,
            sealed_headers,
            body: rendered.body.clone(),
            content_type: rendered.content_type.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_carry_their_partition() {
        let id = super::new_id(37);
        assert_eq!(super::partition_of_id(&id), Some(37));
        assert_eq!(super::partition_of_id("nope"), None);
    }

    #[test]
    fn derived_ids_are_stable_distinct_and_time_ordered() {
        let a = super::derived_id(5, 1_700_000_000_000, "e/evt_1/welcome");
        assert_eq!(a, super::derived_id(5, 1_700_000_000_000, "e/evt_1/welcome"));
        assert_ne!(a, super::derived_id(5, 1_700_000_000_000, "e/evt_1/other"));
        assert_eq!(super::partition_of_id(&a), Some(5));
        assert_eq!(super::id_time_ms(&a), Some(1_700_000_000_000));
        assert!(a < super::derived_id(5, 1_700_000_000_001, "e/evt_0/welcome"));
        assert_eq!(super::id_time_ms(&super::new_id(3)).map(|t| t > 0), Some(true));
        assert!(super::first_id_at(5, 1_700_000_000_000) <= a);
        assert!(super::first_id_at(5, 1_700_000_000_001) > a);
    }
}
