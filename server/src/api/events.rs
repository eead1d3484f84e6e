//! EventService: Publish and PublishBatch write events durably into their partition's inbox.

use tidings_api::v1 as pb;
use tidings_api::v1::event_service_server::EventService;
use tidings_scheduler::app::{Ingest, Publish};
use tidings_scheduler::inbox::{Event, InboxEntry};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{struct_to_json, timestamp_ms};
use super::{ApiError, Violations, invalid, new_id};

/// Most events in one PublishBatch.
const MAX_BATCH: usize = 1000;
/// Largest event data, encoded as JSON.
const MAX_DATA: usize = 64 * 1024;
/// Serves EventService.
pub(crate) struct EventApi {
    ingest: Ingest,
    partitions: u32,
}

impl EventApi {
    pub(crate) fn new(ingest: Ingest, partitions: u32) -> Self {
        Self { ingest, partitions }
    }

    /// Validates one event; `field` prefixes the names in violations.
    fn accept(
        &self,
        proto: Option<&pb::Event>,
        field: &str,
        traceparent: &str,
        violations: &mut Violations,
    ) -> Option<Publish> {
        let Some(proto) = proto else {
            violations.add(field, "is required");
            return None;
        };
        let before = violations.len();
        if proto.r#type.is_empty() {
            violations.add(format!("{field}.type"), "is required");
        } else if proto.r#type.len() > 128
            || !proto.r#type.chars().all(|c| c.is_ascii_alphanumeric() || ".:_-".contains(c))
        {
            violations.add(
                format!("{field}.type"),
                "must be 1 to 128 letters, digits, '.', ':', '_' or '-'",
            );
        }
        check_contact_id(violations, &format!("{field}.contact_id"), &proto.contact_id);
        let data = proto.data.as_ref().map(struct_to_json).unwrap_or_default();
        let size = serde_json::to_vec(&data).map_or(usize::MAX, |bytes| bytes.len());
        if size > MAX_DATA {
            violations.add(
                format!("{field}.data"),
                format!("is {size} bytes as JSON; the limit is {MAX_DATA}"),
            );
        }
        if proto.idempotency_key.len() > 256 {
            violations.add(format!("{field}.idempotency_key"), "must be at most 256 characters");
        } else if proto.idempotency_key.chars().any(char::is_control) {
            violations
                .add(format!("{field}.idempotency_key"), "must not contain control characters");
        }
        let now = tidings_scheduler::now_ms();
        let occurred_ms = match &proto.occurred_time {
            Some(t) => {
                timestamp_ms(violations, &format!("{field}.occurred_time"), t).unwrap_or(now)
            }
            None => now,
        };
        if violations.len() > before {
            return None;
        }
        Some(Publish {
            event: Event {
                id: new_id("evt"),
                kind: proto.r#type.clone(),
                contact_id: proto.contact_id.clone(),
                data: data.into_iter().collect(),
                occurred_ms,
                accepted_ms: now,
                resume_after: None,
                exits_after: None,
                traceparent: traceparent.to_string(),
            },
            idempotency_key: proto.idempotency_key.clone(),
        })
    }
}

/// Checks a contact id: 1 to 256 printable characters without white space.
pub(crate) fn check_contact_id(violations: &mut Violations, field: &str, id: &str) {
    if id.is_empty() {
        violations.add(field, "is required");
    } else if id.len() > 256 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        violations.add(field, "must be 1 to 256 printable characters without spaces");
    }
}

impl EventApi {
    async fn record_interaction(
        &self,
        request: pb::RecordInteractionRequest,
    ) -> Result<(), ApiError> {
        let mut v = Violations::default();
        let partition = if !request.delivery_id.is_empty() {
            match tidings_scheduler::delivery::record::partition_of_id(&request.delivery_id) {
                Some(p) if p < self.partitions => Some(p),
                _ => {
                    v.add("delivery_id", "is not a delivery id (the webhook-id header, msg_...)");
                    None
                }
            }
        } else {
            if request.campaign_id.is_empty() {
                v.add("campaign_id", "is required when delivery_id is not given");
            } else {
                super::check_id(&mut v, "campaign_id", &request.campaign_id);
            }
            check_contact_id(&mut v, "contact_id", &request.contact_id);
            Some(self.ingest.partition_of(&request.contact_id))
        };
        super::campaigns::check_interaction_kind(&mut v, "kind", &request.kind);
        let at_ms = match &request.occurred_time {
            Some(t) => timestamp_ms(&mut v, "occurred_time", t),
            None => Some(tidings_scheduler::now_ms()),
        };
        v.check()?;
        let (Some(partition), Some(at_ms)) = (partition, at_ms) else {
            return Err(invalid("request", "is incomplete"));
        };
        let entry = InboxEntry::Interaction {
            contact: request.contact_id,
            campaign: request.campaign_id,
            delivery: request.delivery_id,
            kind: request.kind,
            at_ms,
        };
        self.ingest.interaction(partition, entry).await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl EventService for EventApi {
    #[instrument(skip_all)]
    async fn record_interaction(
        &self,
        request: Request<pb::RecordInteractionRequest>,
    ) -> Result<Response<pb::RecordInteractionResponse>, Status> {
        self.record_interaction(request.into_inner()).await?;
        Ok(Response::new(pb::RecordInteractionResponse {}))
    }

    #[instrument(skip_all)]
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let traceparent = traceparent(&request);
        let request = request.into_inner();
        let mut violations = Violations::default();
        let accepted = self.accept(request.event.as_ref(), "event", &traceparent, &mut violations);
        let published = async {
            violations.check()?;
            let Some(accepted) = accepted else {
                return Err(invalid("event", "is required").into());
            };
            let published = self.ingest.publish(&accepted).await.map_err(ApiError::from)?;
            Ok::<_, Status>(pb::PublishResponse {
                event_id: published.event_id,
                duplicate: published.duplicate,
            })
        }
        .await;
        match &published {
            Ok(_) => count_events("accepted", None, 1),
            Err(status) => count_events("refused", Some(status.code()), 1),
        }
        published.map(Response::new)
    }

    #[instrument(skip_all, fields(events = request.get_ref().events.len()))]
    async fn publish_batch(
        &self,
        request: Request<pb::PublishBatchRequest>,
    ) -> Result<Response<pb::PublishBatchResponse>, Status> {
        let traceparent = traceparent(&request);
        let request = request.into_inner();
        if request.events.is_empty() || request.events.len() > MAX_BATCH {
            return Err(invalid("events", format!("must hold 1 to {MAX_BATCH} events")).into());
        }
        let mut results = vec![pb::PublishResult::default(); request.events.len()];
        let mut accepted = Vec::with_capacity(request.events.len());
        for (i, event) in request.events.iter().enumerate() {
            let mut violations = Violations::default();
            match self.accept(Some(event), &format!("events[{i}]"), &traceparent, &mut violations) {
                Some(a) => accepted.push((i, a)),
                None => results[i].error = violations.describe(),
            }
        }
        let batch: Vec<Publish> = accepted.iter().map(|(_, a)| a.clone()).collect();
        count_events("refused", Some(tonic::Code::InvalidArgument), results.len() - batch.len());
        let published = match self.ingest.publish_batch(&batch).await {
            Ok(published) => published,
            Err(error) => {
                let status = Status::from(ApiError::from(error));
                count_events("refused", Some(status.code()), batch.len());
                return Err(status);
            }
        };
        count_events("accepted", None, batch.len());
        for ((i, _), published) in accepted.iter().zip(published) {
            results[*i].event_id = published.event_id;
            results[*i].duplicate = published.duplicate;
        }
        Ok(Response::new(pb::PublishBatchResponse { results }))
    }
}

/// Counts events accepted, or refused with the status code the caller got.
fn count_events(result: &'static str, code: Option<tonic::Code>, count: usize) {
    use opentelemetry::KeyValue;
    if count == 0 {
        return;
    }
    let mut attributes = vec![KeyValue::new("result", result)];
    if let Some(code) = code {
        attributes.push(KeyValue::new("rpc.grpc.status_code", code as i64));
    }
    tidings_scheduler::telemetry::metrics().events.add(count as u64, &attributes);
}

/// Returns the trace context the webhooks a call causes continue: the call's SERVER span with
/// telemetry on, else the call's own `traceparent` metadata when it is valid; empty otherwise,
/// as the W3C recommendation has an invalid one ignored.
pub(crate) fn traceparent<T>(request: &Request<T>) -> String {
    use tidings_scheduler::telemetry;
    telemetry::current_traceparent()
        .or_else(|| {
            let value = request.metadata().get("traceparent")?.to_str().ok()?;
            telemetry::context_of(value).map(|_| value.to_string())
        })
        .unwrap_or_default()
}
