//! DeliveryService: the attempt log, redelivery, and a live stream of delivery changes.

use tidings_api::v1 as pb;
use tidings_api::v1::delivery_service_server::DeliveryService;

use super::BoxStream;
use tidings_scheduler::app::{Deliveries, DeliveryError, DeliveryFilter};
use tidings_scheduler::delivery::record::{self, Attempt, Delivery, ErrorClass, Status};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status as GrpcStatus};

use super::convert::{duration, timestamp, timestamp_ms};
use super::{ApiError, Violations, invalid, page_size};

/// Serves DeliveryService.
pub(crate) struct DeliveryApi {
    deliveries: Deliveries,
    streams: super::Streams,
}

impl From<DeliveryError> for ApiError {
    fn from(error: DeliveryError) -> Self {
        match error {
            DeliveryError::InvalidId(_) => invalid("id", "is not a delivery id (msg_...)"),
            DeliveryError::NotFound(_) => ApiError::NotFound(error.to_string()),
            DeliveryError::InProgress(_) => ApiError::FailedPrecondition(error.to_string()),
            DeliveryError::State(error) => error.into(),
        }
    }
}

/// Checks a filter.
struct Filter;

impl Filter {
    fn parse(proto: Option<&pb::DeliveryFilter>) -> Result<DeliveryFilter, ApiError> {
        let Some(proto) = proto else { return Ok(DeliveryFilter::default()) };
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
        Ok(DeliveryFilter {
            webhook_id: proto.webhook_id.clone(),
            campaign_id: proto.campaign_id.clone(),
            contact_id: proto.contact_id.clone(),
            run_id: proto.run_id.clone(),
            status,
            start_ms,
            end_ms,
        })
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
            ErrorClass::Credentials => pb::ErrorClass::Credentials,
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
    pub(crate) fn new(deliveries: Deliveries, streams: super::Streams) -> Self {
        Self { deliveries, streams }
    }
}

#[tonic::async_trait]
impl DeliveryService for DeliveryApi {
    async fn get_delivery(
        &self,
        request: Request<pb::GetDeliveryRequest>,
    ) -> Result<Response<pb::Delivery>, GrpcStatus> {
        let delivery =
            self.deliveries.get(&request.into_inner().id).await.map_err(ApiError::from)?;
        Ok(Response::new(to_proto(&delivery)))
    }

    async fn list_deliveries(
        &self,
        request: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, GrpcStatus> {
        let request = request.into_inner();
        let filter = Filter::parse(request.filter.as_ref())?;
        let after = super::parse_page_token(&request.page_token)?;
        let (page, next) = self
            .deliveries
            .list(&filter, after.as_deref(), page_size(request.page_size))
            .await
            .map_err(|error| match error {
                DeliveryError::InvalidId(_) => {
                    invalid("page_token", "is not a page token of this call")
                }
                other => other.into(),
            })?;
        Ok(Response::new(pb::ListDeliveriesResponse {
            deliveries: page.iter().map(to_proto).collect(),
            next_page_token: next.map(|cursor| super::page_token(&cursor)).unwrap_or_default(),
        }))
    }

    async fn redeliver(
        &self,
        request: Request<pb::RedeliverRequest>,
    ) -> Result<Response<pb::Delivery>, GrpcStatus> {
        let delivery =
            self.deliveries.redeliver(&request.into_inner().id).await.map_err(ApiError::from)?;
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
        let filter = DeliveryFilter {
            webhook_id: request.webhook_id,
            start_ms,
            end_ms,
            ..Default::default()
        };
        let queued = self.deliveries.redeliver_failed(&filter).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::RedeliverFailedResponse { queued }))
    }

    async fn watch_deliveries(
        &self,
        request: Request<pb::WatchDeliveriesRequest>,
    ) -> Result<Response<BoxStream<pb::Delivery>>, GrpcStatus> {
        let filter = Filter::parse(request.into_inner().filter.as_ref())?;
        let permit = self.streams.open()?;
        let watch = self.deliveries.watch(filter, 256).await.map_err(ApiError::from)?;
        let stream = ReceiverStream::new(watch.changes).map(|change| match change {
            Ok(delivery) => Ok(to_proto(&delivery)),
            Err(_) => {
                Err(GrpcStatus::unavailable("the delivery stream was interrupted; watch again"))
            }
        });
        // A caller too slow to keep up learns why its stream ended.
        Ok(Response::new(super::ending_when_lagged(stream, watch.lagged, permit)))
    }
}
