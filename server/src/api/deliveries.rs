//! DeliveryService: the attempt log, redelivery, and a live stream of delivery changes.

use std::sync::Arc;

use futures::StreamExt;
use tidings_api::v1 as pb;
use tidings_api::v1::delivery_service_server::DeliveryService;

/// The stream type of server-streaming calls.
type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, GrpcStatus>> + Send + 'static>>;
use tidings_scheduler::delivery::record::{self, Attempt, Delivery, ErrorClass, Status};
use tidings_scheduler::inbox::InboxEntry;
use tidings_scheduler::keys;
use tidings_scheduler::store::{Op, Store, Txn};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status as GrpcStatus};

use super::convert::{duration, timestamp, timestamp_ms};
use super::{ApiError, Violations, invalid, new_id, page_size};

/// Serves DeliveryService.
pub(crate) struct DeliveryApi {
    store: Arc<dyn Store>,
    partitions: u32,
}

/// A filter, checked.
#[derive(Clone, Default)]
struct Filter {
    webhook_id: String,
    campaign_id: String,
    contact_id: String,
    run_id: String,
    status: Option<Status>,
    start_ms: Option<i64>,
    end_ms: Option<i64>,
}

impl Filter {
    fn parse(proto: Option<&pb::DeliveryFilter>) -> Result<Self, ApiError> {
        let Some(proto) = proto else { return Ok(Self::default()) };
        let mut v = Violations::default();
        let status = match pb::DeliveryStatus::try_from(proto.status) {
            Ok(pb::DeliveryStatus::Unspecified) => None,
            Ok(pb::DeliveryStatus::Pending) => Some(Status::Pending),
            Ok(pb::DeliveryStatus::Sending) => Some(Status::Sending),
            Ok(pb::DeliveryStatus::Delivered) => Some(Status::Delivered),
            Ok(pb::DeliveryStatus::Failed) => Some(Status::Failed),
            Ok(pb::DeliveryStatus::Skipped) => Some(Status::Skipped),
            Err(_) => {
                v.add("filter.status", "is not a delivery status");
                None
            }
        };
        let start_ms =
            proto.start_time.as_ref().and_then(|t| timestamp_ms(&mut v, "filter.start_time", t));
        let end_ms =
            proto.end_time.as_ref().and_then(|t| timestamp_ms(&mut v, "filter.end_time", t));
        v.check()?;
        Ok(Self {
            webhook_id: proto.webhook_id.clone(),
            campaign_id: proto.campaign_id.clone(),
            contact_id: proto.contact_id.clone(),
            run_id: proto.run_id.clone(),
            status,
            start_ms,
            end_ms,
        })
    }

    fn matches(&self, d: &Delivery) -> bool {
        (self.webhook_id.is_empty() || d.webhook_id == self.webhook_id)
            && (self.campaign_id.is_empty() || d.campaign_id == self.campaign_id)
            && (self.contact_id.is_empty() || d.contact_id == self.contact_id)
            && (self.run_id.is_empty() || d.run_id == self.run_id)
            && self.status.is_none_or(|s| s == d.status)
            && self.start_ms.is_none_or(|t| d.created_ms >= t)
            && self.end_ms.is_none_or(|t| d.created_ms < t)
    }
}

fn status_to_proto(status: Status) -> pb::DeliveryStatus {
    match status {
        Status::Pending => pb::DeliveryStatus::Pending,
        Status::Sending => pb::DeliveryStatus::Sending,
        Status::Delivered => pb::DeliveryStatus::Delivered,
        Status::Failed => pb::DeliveryStatus::Failed,
        Status::Skipped => pb::DeliveryStatus::Skipped,
    }
}

/// Returns the proto of an attempt.
pub(crate) fn attempt_to_proto(a: &Attempt) -> pb::Attempt {
    pb::Attempt {
        start_time: Some(timestamp(a.start_ms)),
        duration: Some(duration(a.duration_ms)),
        status_code: u32::from(a.status_code),
        error_class: match a.error_class {
            ErrorClass::None => pb::ErrorClass::Unspecified,
            ErrorClass::HttpStatus => pb::ErrorClass::HttpStatus,
            ErrorClass::Timeout => pb::ErrorClass::Timeout,
            ErrorClass::Connection => pb::ErrorClass::Connection,
            ErrorClass::Blocked => pb::ErrorClass::Blocked,
            ErrorClass::Render => pb::ErrorClass::Render,
            ErrorClass::EndpointDisabled => pb::ErrorClass::EndpointDisabled,
        } as i32,
        error: a.error.clone(),
        response_headers: a.response_headers.clone().into_iter().collect(),
        response_body: a.response_body.clone(),
        node: a.node.clone(),
    }
}

/// Returns the proto of a stored request; secret header values are redacted.
pub(crate) fn request_to_proto(r: &record::StoredRequest) -> pb::RenderedRequest {
    let mut headers: std::collections::HashMap<String, String> =
        r.headers.clone().into_iter().collect();
    for name in r.sealed_headers.keys() {
        headers.insert(name.clone(), "[redacted]".into());
    }
    if r.method != "GET" {
        headers.insert("content-type".into(), r.content_type.clone());
    }
    pb::RenderedRequest {
        method: r.method.clone(),
        url: r.url.clone(),
        headers,
        body: r.body.clone().into_bytes(),
    }
}

fn to_proto(d: &Delivery) -> pb::Delivery {
    pb::Delivery {
        id: d.id.clone(),
        webhook_id: d.webhook_id.clone(),
        campaign_id: d.campaign_id.clone(),
        run_id: d.run_id.clone(),
        contact_id: d.contact_id.clone(),
        event_id: d.event_id.clone(),
        status: status_to_proto(d.status) as i32,
        reason: d.reason.clone(),
        request: d.request.as_ref().map(request_to_proto),
        attempts: d.attempts.iter().map(attempt_to_proto).collect(),
        next_attempt_time: d.next_attempt_ms.map(timestamp),
        create_time: Some(timestamp(d.created_ms)),
        update_time: Some(timestamp(d.updated_ms)),
    }
}

impl DeliveryApi {
    pub(crate) fn new(store: Arc<dyn Store>, partitions: u32) -> Self {
        Self { store, partitions }
    }

    async fn get(&self, id: &str) -> Result<Delivery, ApiError> {
        let partition = record::partition_of_id(id)
            .filter(|p| *p < self.partitions)
            .ok_or_else(|| invalid("id", "is not a delivery id (msg_...)"))?;
        let kv = self
            .store
            .get(record::key(partition, id).as_bytes())
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("delivery {id} not found")))?;
        serde_json::from_slice(&kv.value)
            .map_err(|e| ApiError::Internal(format!("unreadable delivery {id}: {e}")))
    }

    fn redeliver_op(&self, d: &Delivery) -> Op {
        let entry = InboxEntry::Redeliver { delivery: d.id.clone() };
        Op::put(
            keys::inbox_entry(d.partition, &new_id("in")),
            serde_json::to_vec(&entry).unwrap_or_default(),
        )
    }
}

#[tonic::async_trait]
impl DeliveryService for DeliveryApi {
    async fn get_delivery(
        &self,
        request: Request<pb::GetDeliveryRequest>,
    ) -> Result<Response<pb::Delivery>, GrpcStatus> {
        Ok(Response::new(to_proto(&self.get(&request.into_inner().id).await?)))
    }

    async fn list_deliveries(
        &self,
        request: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, GrpcStatus> {
        let request = request.into_inner();
        let filter = Filter::parse(request.filter.as_ref())?;
        let (deliveries, next_page_token) = super::scan::scan(
            &self.store,
            self.partitions,
            "deliveries",
            &request.page_token,
            page_size(request.page_size),
            |kv| {
                serde_json::from_slice::<Delivery>(&kv.value)
                    .ok()
                    .filter(|d| filter.matches(d))
                    .map(|d| to_proto(&d))
            },
        )
        .await?;
        Ok(Response::new(pb::ListDeliveriesResponse { deliveries, next_page_token }))
    }

    async fn redeliver(
        &self,
        request: Request<pb::RedeliverRequest>,
    ) -> Result<Response<pb::Delivery>, GrpcStatus> {
        let delivery = self.get(&request.into_inner().id).await?;
        if matches!(delivery.status, Status::Pending | Status::Sending) {
            return Err(ApiError::FailedPrecondition(format!(
                "delivery {} is still in progress",
                delivery.id
            ))
            .into());
        }
        self.store
            .txn(Txn::new().and_then([self.redeliver_op(&delivery)]))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(to_proto(&delivery)))
    }

    async fn redeliver_failed(
        &self,
        request: Request<pb::RedeliverFailedRequest>,
    ) -> Result<Response<pb::RedeliverFailedResponse>, GrpcStatus> {
        let request = request.into_inner();
        let mut v = Violations::default();
        super::check_id(&mut v, "webhook_id", &request.webhook_id);
        let start_ms = match &request.start_time {
            Some(t) => timestamp_ms(&mut v, "start_time", t),
            None => {
                v.add("start_time", "is required");
                None
            }
        };
        let end_ms = request.end_time.as_ref().and_then(|t| timestamp_ms(&mut v, "end_time", t));
        v.check()?;
        let filter = Filter {
            webhook_id: request.webhook_id,
            status: Some(Status::Failed),
            start_ms,
            end_ms,
            ..Default::default()
        };
        let mut queued = 0u64;
        for partition in 0..self.partitions {
            let prefix = format!("p/{partition:04}/deliveries/");
            let page =
                self.store.range_prefix(prefix.as_bytes(), 0).await.map_err(ApiError::from)?;
            let ops: Vec<Op> = page
                .kvs
                .iter()
                .filter_map(|kv| serde_json::from_slice::<Delivery>(&kv.value).ok())
                .filter(|d| filter.matches(d))
                .map(|d| self.redeliver_op(&d))
                .collect();
            for chunk in ops.chunks(120) {
                self.store
                    .txn(Txn::new().and_then(chunk.to_vec()))
                    .await
                    .map_err(ApiError::from)?;
                queued += chunk.len() as u64;
            }
        }
        Ok(Response::new(pb::RedeliverFailedResponse { queued }))
    }

    async fn watch_deliveries(
        &self,
        request: Request<pb::WatchDeliveriesRequest>,
    ) -> Result<Response<BoxStream<pb::Delivery>>, GrpcStatus> {
        let filter = Filter::parse(request.into_inner().filter.as_ref())?;
        let mut stream = self.store.watch(b"p/", 0).await.map_err(ApiError::from)?;
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        // The task ends when the caller goes away (the send fails) or the watch ends.
        tokio::spawn(async move {
            while let Some(batch) = stream.next().await {
                let Ok(batch) = batch else {
                    let _ = sender
                        .send(Err(GrpcStatus::unavailable(
                            "the delivery stream was interrupted; watch again",
                        )))
                        .await;
                    return;
                };
                for event in batch.events {
                    if event.kind != tidings_scheduler::store::EventKind::Put
                        || !event.kv.key.windows(12).any(|w| w == b"/deliveries/")
                    {
                        continue;
                    }
                    if let Ok(d) = serde_json::from_slice::<Delivery>(&event.kv.value)
                        && filter.matches(&d)
                        && sender.send(Ok(to_proto(&d))).await.is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}
