//! EventService: Publish and PublishBatch write events durably into their partition's inbox.

use std::sync::Arc;

use tidings_api::v1 as pb;
use tidings_api::v1::event_service_server::EventService;
use tidings_scheduler::inbox::{Event, IdempotencyRecord, InboxEntry};
use tidings_scheduler::keys;
use tidings_scheduler::store::{Compare, CompareOp, Op, OpResult, Store, Txn};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{struct_to_json, timestamp_ms};
use super::{ApiError, Violations, invalid, new_id};

/// Most events in one PublishBatch.
const MAX_BATCH: usize = 1000;
/// Largest event data, encoded as JSON.
const MAX_DATA: usize = 64 * 1024;
/// Store operations per transaction when writing a batch.
const OPS_PER_TXN: usize = 120;

/// Serves EventService.
pub(crate) struct EventApi {
    store: Arc<dyn Store>,
    partitions: u32,
    /// How long an idempotency key is remembered, in milliseconds.
    retention_ms: i64,
}

/// An event ready to write.
struct Accepted {
    event: Event,
    idempotency_key: String,
}

impl EventApi {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        partitions: u32,
        retention: std::time::Duration,
    ) -> Self {
        Self { store, partitions, retention_ms: retention.as_millis() as i64 }
    }

    /// Validates one event; `field` prefixes the names in violations.
    fn accept(
        &self,
        proto: Option<&pb::Event>,
        field: &str,
        traceparent: &str,
        violations: &mut Violations,
    ) -> Option<Accepted> {
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
        Some(Accepted {
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

    fn entry_op(&self, event: &Event) -> Op {
        let partition = keys::partition_of(&event.contact_id, self.partitions);
        let entry = InboxEntry::Event(event.clone());
        Op::put(
            keys::inbox_entry(partition, &event.id),
            serde_json::to_vec(&entry).unwrap_or_default(),
        )
    }

    /// Writes one event, honouring its idempotency key; returns (event id, duplicate).
    async fn write_one(&self, accepted: &Accepted) -> Result<(String, bool), ApiError> {
        let entry = self.entry_op(&accepted.event);
        if accepted.idempotency_key.is_empty() {
            self.store.txn(Txn::new().and_then([entry])).await?;
            return Ok((accepted.event.id.clone(), false));
        }
        let key = keys::idempotency(&accepted.idempotency_key);
        let record = IdempotencyRecord {
            event_id: accepted.event.id.clone(),
            created_ms: accepted.event.accepted_ms,
        };
        let record = serde_json::to_vec(&record).unwrap_or_default();
        let mut guard = Compare::absent(key.clone());
        loop {
            let result = self
                .store
                .txn(
                    Txn::new()
                        .when([guard.clone()])
                        .and_then([Op::put(key.clone(), record.clone()), entry.clone()])
                        .or_else([Op::get(key.clone())]),
                )
                .await?;
            if result.succeeded {
                return Ok((accepted.event.id.clone(), false));
            }
            let Some(OpResult::Get(Some(kv))) = result.results.first() else { continue };
            let existing: Option<IdempotencyRecord> = serde_json::from_slice(&kv.value).ok();
            match existing {
                Some(first)
                    if accepted.event.accepted_ms - first.created_ms < self.retention_ms =>
                {
                    return Ok((first.event_id, true));
                }
                // Past the retention (or unreadable): the key is free again; replace it only
                // if nobody else did in between.
                _ => guard = Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision),
            }
        }
    }

    /// Writes events without idempotency keys in as few transactions as the limits allow.
    async fn write_plain(&self, events: &[&Accepted]) -> Result<(), ApiError> {
        for chunk in events.chunks(OPS_PER_TXN) {
            let ops: Vec<Op> = chunk.iter().map(|a| self.entry_op(&a.event)).collect();
            self.store.txn(Txn::new().and_then(ops)).await?;
        }
        Ok(())
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
            Some(keys::partition_of(&request.contact_id, self.partitions))
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
        let op = Op::put(
            keys::inbox_entry(partition, &new_id("ix")),
            serde_json::to_vec(&entry).unwrap_or_default(),
        );
        self.store.txn(Txn::new().and_then([op])).await?;
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
        violations.check()?;
        let Some(accepted) = accepted else { return Err(invalid("event", "is required").into()) };
        let (event_id, duplicate) = self.write_one(&accepted).await?;
        Ok(Response::new(pb::PublishResponse { event_id, duplicate }))
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
        let plain: Vec<&Accepted> =
            accepted.iter().filter(|(_, a)| a.idempotency_key.is_empty()).map(|(_, a)| a).collect();
        self.write_plain(&plain).await?;
        let keyed: Vec<&(usize, Accepted)> =
            accepted.iter().filter(|(_, a)| !a.idempotency_key.is_empty()).collect();
        // Keyed events go in one transaction per chunk when none of their keys was seen
        // (the usual case); a chunk with a repeated key falls back to one event at a time.
        let mut fallback = Vec::new();
        for chunk in keyed.chunks(OPS_PER_TXN / 2) {
            let mut seen = std::collections::HashSet::new();
            let distinct = chunk.iter().all(|(_, a)| seen.insert(a.idempotency_key.as_str()));
            let mut txn = Txn::new();
            for (_, a) in chunk {
                let key = keys::idempotency(&a.idempotency_key);
                let record = IdempotencyRecord {
                    event_id: a.event.id.clone(),
                    created_ms: a.event.accepted_ms,
                };
                txn = txn.when([Compare::absent(key.clone())]).and_then([
                    Op::put(key, serde_json::to_vec(&record).unwrap_or_default()),
                    self.entry_op(&a.event),
                ]);
            }
            if distinct && self.store.txn(txn).await.map_err(ApiError::from)?.succeeded {
                continue;
            }
            fallback.extend(chunk.iter().map(|(i, _)| *i));
        }
        for (i, a) in &accepted {
            if a.idempotency_key.is_empty() || !fallback.contains(i) {
                results[*i].event_id = a.event.id.clone();
            } else {
                let (event_id, duplicate) = self.write_one(a).await?;
                results[*i].event_id = event_id;
                results[*i].duplicate = duplicate;
            }
        }
        Ok(Response::new(pb::PublishBatchResponse { results }))
    }
}

/// Deletes idempotency records past the retention, while this node owns partition 0 (one node
/// at a time does it). Each delete compares the record's revision, so a key reused meanwhile
/// is kept. Runs until `stop` is cancelled.
pub(crate) async fn sweep_idempotency_keys(
    store: Arc<dyn Store>,
    cluster: tidings_scheduler::cluster::Cluster,
    retention: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let retention_ms = retention.as_millis() as i64;
    let every = (retention / 24).max(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if !cluster.owned().contains(&0) {
            continue;
        }
        let now = tidings_scheduler::now_ms();
        let end = tidings_scheduler::store::prefix_end(b"idem/");
        let mut start = b"idem/".to_vec();
        let mut deleted = 0;
        loop {
            let Ok(page) = store.range(&start, &end, 500).await else { break };
            for kv in &page.kvs {
                let expired = serde_json::from_slice::<IdempotencyRecord>(&kv.value)
                    .is_ok_and(|r| now - r.created_ms >= retention_ms);
                if !expired {
                    continue;
                }
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        kv.key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision,
                    )])
                    .and_then([Op::delete(kv.key.clone())]);
                if store.txn(txn).await.is_ok_and(|r| r.succeeded) {
                    deleted += 1;
                }
            }
            match page.kvs.last() {
                Some(last) if page.more => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "expired idempotency keys removed");
        }
    }
}

/// Returns the call's W3C trace context (its `traceparent` metadata) when it is valid, for the
/// webhooks the call causes to continue; empty otherwise, as the W3C recommendation has an
/// invalid one ignored.
pub(crate) fn traceparent<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(tidings_scheduler::delivery::dispatch::valid_traceparent)
        .unwrap_or_default()
        .to_string()
}
