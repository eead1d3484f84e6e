//! CampaignService: definitions, life cycle, and runs.

mod convert;
mod validate;

use std::sync::Arc;

use tidings_api::v1 as pb;
use tidings_api::v1::campaign_service_server::CampaignService;
use tidings_scheduler::app::campaigns::{RunRequest, deletable, state_name};
use tidings_scheduler::app::{CampaignError, Campaigns, Contacts, RunError, Runs};
use tidings_scheduler::campaign::{Campaign, CampaignState, RunState};
use tidings_scheduler::defs::{Definitions, DefsError};
use tidings_scheduler::now_ms;
use tidings_scheduler::webhook::Webhook;
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use self::convert::{
    FromProto, campaign_from_proto, campaign_to_proto, run_to_proto, state_to_proto,
};
pub(crate) use self::validate::check_interaction_kind;
use self::validate::{PAST_TOLERANCE_MS, WRITABLE};
use super::convert::{json_to_struct, struct_to_json, timestamp, timestamp_ms};
use super::{
    ApiError, BoxStream, SLOW_CALLER, Violations, check_id, invalid, new_id, page_size, page_token,
    parse_etag, parse_page_token,
};

/// Serves CampaignService.
#[derive(Clone)]
pub(crate) struct CampaignApi {
    campaigns: Definitions<Campaign>,
    webhooks: Definitions<Webhook>,
    segments: Definitions<tidings_scheduler::segment::Segment>,
    runs: Runs,
    contacts: Contacts,
    /// The life cycle: activation, edits, runs.
    lifecycle: Campaigns,
    state: tidings_scheduler::state::State,
    partitions: u32,
    templates: Arc<tidings_scheduler::template::Templates>,
    cipher: tidings_scheduler::secrets::Cipher,
    programs: Arc<tidings_scheduler::rules::Programs>,
    /// Places for WatchRun streams.
    streams: super::Streams,
}

impl CampaignApi {
    pub(crate) fn new(
        coordination: &tidings_scheduler::coordination::Coordination,
        state: tidings_scheduler::state::State,
        partitions: u32,
        templates: Arc<tidings_scheduler::template::Templates>,
        cipher: tidings_scheduler::secrets::Cipher,
        streams: super::Streams,
    ) -> Self {
        let campaigns = coordination.campaigns();
        let webhooks = coordination.webhooks();
        Self {
            streams,
            lifecycle: Campaigns::new(
                campaigns.clone(),
                webhooks.clone(),
                state.clone(),
                partitions,
            ),
            campaigns,
            webhooks,
            segments: coordination.segments(),
            runs: Runs::new(state.clone(), partitions),
            contacts: Contacts::new(state.clone(), partitions),
            state,
            partitions,
            templates,
            cipher,
            programs: Default::default(),
        }
    }

    /// Returns the service with campaign writes that return once this node's cache of
    /// campaigns reflects them.
    pub(crate) fn read_your_writes(
        mut self,
        cache: &tidings_scheduler::defs::Cache<Campaign>,
    ) -> Self {
        self.campaigns = self.campaigns.read_your_writes(cache);
        self.lifecycle = Campaigns::new(
            self.campaigns.clone(),
            self.webhooks.clone(),
            self.state.clone(),
            self.partitions,
        );
        self
    }

    /// Evaluates a campaign's audience without sending: the audience size and, for a sample,
    /// the request each contact would receive or why it would be skipped.
    async fn preview(
        &self,
        request: pb::PreviewCampaignRequest,
    ) -> Result<pb::PreviewCampaignResponse, ApiError> {
        let mut v = Violations::default();
        check_id(&mut v, "id", &request.id);
        if request.sample_size > 100 {
            v.add("sample_size", "must be at most 100");
        }
        v.check()?;
        let sample = if request.sample_size == 0 { 10 } else { request.sample_size as usize };
        let campaign = self.campaigns.get(&request.id).await?.value;
        let webhook = match self.webhooks.get(&campaign.webhook_id).await {
            Ok(found) => found.value,
            Err(DefsError::NotFound { .. }) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "campaign {}: its webhook {} no longer exists",
                    request.id, campaign.webhook_id
                )));
            }
            Err(error) => return Err(error.into()),
        };
        let segment_filter = if campaign.audience.segment_id.is_empty() {
            String::new()
        } else {
            // A deleted segment selects nobody.
            match self.segments.get(&campaign.audience.segment_id).await {
                Ok(segment) => segment.value.filter,
                Err(DefsError::NotFound { .. }) => "false".into(),
                Err(error) => return Err(error.into()),
            }
        };
        let event_data = request.event_data.as_ref().map(struct_to_json).unwrap_or_default();
        let event = serde_json::json!({"id": "evt_preview", "type": "preview", "data": event_data});
        let found = self
            .contacts
            .audience(&[segment_filter.as_str(), campaign.audience.filter.as_str()], sample)
            .await?;
        let audience = found.members;
        let mut items = Vec::new();
        {
            for member in found.sample {
                let (id, contact) = (member.id, member.contact);
                let view = contact.view(&id);
                let mut skip_reason = String::new();
                if contact.unsubscribed {
                    skip_reason = "unsubscribed".into();
                } else if !campaign.rules.is_empty() {
                    let campaigns: serde_json::Map<String, serde_json::Value> = self
                        .contacts
                        .standings(&id)
                        .await?
                        .into_iter()
                        .filter_map(|(name, status)| {
                            Some((name, serde_json::to_value(status).ok()?))
                        })
                        .collect();
                    let campaigns = serde_json::Value::Object(campaigns);
                    let vars = [("contact", &view), ("event", &event), ("campaigns", &campaigns)];
                    for rule in &campaign.rules {
                        match self.programs.evaluate(rule, &vars) {
                            Ok(true) => continue,
                            Ok(false) => skip_reason = format!("rule: {rule}"),
                            Err(error) => skip_reason = format!("rule: {rule}: {error}"),
                        }
                        break;
                    }
                }
                let context = tidings_scheduler::delivery::render::Context {
                    contact: view.clone(),
                    event: event.clone(),
                    campaign: serde_json::json!({"id": request.id, "data": campaign.data}),
                    run: serde_json::json!({"id": "preview", "data": {}}),
                    delivery: serde_json::json!({"id": "msg_preview"}),
                };
                let rendered = tidings_scheduler::delivery::render::request(
                    &self.templates,
                    &self.cipher,
                    &webhook,
                    &context,
                );
                let request = match rendered {
                    Ok(r) => Some(super::deliveries::request_to_proto(&r)),
                    Err(reason) => {
                        if skip_reason.is_empty() {
                            skip_reason = format!("render: {reason}");
                        }
                        None
                    }
                };
                items.push(pb::PreviewItem {
                    contact: Some(pb::Contact {
                        id: id.clone(),
                        attributes: Some(json_to_struct(&contact.attributes)),
                        timezone: contact.timezone.clone(),
                        unsubscribed: contact.unsubscribed,
                        create_time: Some(timestamp(contact.created_ms)),
                        update_time: Some(timestamp(contact.updated_ms)),
                        etag: member.version.to_string(),
                    }),
                    request,
                    skip_reason,
                });
            }
        }
        Ok(pb::PreviewCampaignResponse { audience, items })
    }

    async fn run(
        &self,
        request: pb::RunCampaignRequest,
        traceparent: String,
    ) -> Result<pb::Run, ApiError> {
        let mut v = Violations::default();
        check_id(&mut v, "id", &request.id);
        let now = now_ms();
        let scheduled =
            request.scheduled_time.as_ref().and_then(|t| timestamp_ms(&mut v, "scheduled_time", t));
        if scheduled.is_some_and(|t| t < now - PAST_TOLERANCE_MS) {
            v.add("scheduled_time", "is in the past");
        }
        if request.idempotency_key.len() > 256 {
            v.add("idempotency_key", "must be at most 256 characters");
        }
        v.check()?;
        let id = request.id;
        let request = RunRequest {
            idempotency_key: request.idempotency_key,
            at_ms: scheduled,
            data: request
                .data
                .as_ref()
                .map(struct_to_json)
                .unwrap_or_default()
                .into_iter()
                .collect(),
            traceparent,
        };
        let started = self.lifecycle.run(&id, request).await?;
        Ok(run_to_proto(&id, &started.id, &started.run))
    }
}

impl CampaignApi {
    /// Moves a campaign along its life cycle.
    async fn transition(&self, id: &str, to: CampaignState) -> Result<pb::Campaign, ApiError> {
        let mut v = Violations::default();
        check_id(&mut v, "id", id);
        v.check()?;
        Ok(campaign_to_proto(&self.lifecycle.transition(id, to).await?))
    }
}

impl From<CampaignError> for ApiError {
    fn from(error: CampaignError) -> Self {
        match error {
            CampaignError::Refused { .. }
            | CampaignError::WebhookGone { .. }
            | CampaignError::NoOccurrenceLeft { .. }
            | CampaignError::NotOnDemand { .. }
            | CampaignError::NotActive { .. } => ApiError::FailedPrecondition(error.to_string()),
            CampaignError::InvalidSchedule { reason, .. } => {
                ApiError::Invalid(vec![("campaign.trigger.interval".into(), reason)])
            }
            CampaignError::Defs(error) => error.into(),
            CampaignError::State(error) => error.into(),
            CampaignError::Run(error) => error.into(),
        }
    }
}

impl CampaignApi {
    /// Returns a run with its counters added up.
    async fn read_run(&self, campaign: &str, run_id: &str) -> Result<pb::Run, ApiError> {
        let run = self.runs.get(campaign, run_id).await?;
        Ok(run_to_proto(campaign, run_id, &run))
    }

    /// Pauses, resumes or cancels a run.
    async fn change_run(
        &self,
        campaign: &str,
        run_id: &str,
        to: RunState,
    ) -> Result<pb::Run, ApiError> {
        let mut v = Violations::default();
        check_id(&mut v, "campaign_id", campaign);
        if run_id.is_empty() {
            v.add("run_id", "is required");
        }
        v.check()?;
        let run = self.runs.change(campaign, run_id, to).await?;
        Ok(run_to_proto(campaign, run_id, &run))
    }
}

impl From<RunError> for ApiError {
    fn from(error: RunError) -> Self {
        match error {
            RunError::NotFound { .. } => ApiError::NotFound(error.to_string()),
            RunError::Refused { .. } => ApiError::FailedPrecondition(error.to_string()),
            RunError::State(error) => error.into(),
        }
    }
}

#[tonic::async_trait]
impl CampaignService for CampaignApi {
    #[instrument(skip_all, fields(campaign = %request.get_ref().campaign_id))]
    async fn create_campaign(
        &self,
        request: Request<pb::CreateCampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        let id = if request.campaign_id.is_empty() {
            new_id("cmp")
        } else {
            request.campaign_id.clone()
        };
        check_id(&mut v, "campaign_id", &id);
        let Some(proto) = request.campaign else {
            return Err(invalid("campaign", "is required").into());
        };
        let campaign = campaign_from_proto(&proto, None, &mut v);
        self.check_references(&id, &campaign, &mut v).await?;
        v.check()?;
        let stored = self.campaigns.create(&id, &campaign).await.map_err(ApiError::from)?;
        info!(campaign = %id, "campaign created");
        Ok(Response::new(campaign_to_proto(&stored)))
    }

    async fn get_campaign(
        &self,
        request: Request<pb::GetCampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let id = request.into_inner().id;
        let mut v = Violations::default();
        check_id(&mut v, "id", &id);
        v.check()?;
        let stored = self.campaigns.get(&id).await.map_err(ApiError::from)?;
        Ok(Response::new(campaign_to_proto(&stored)))
    }

    async fn list_campaigns(
        &self,
        request: Request<pb::ListCampaignsRequest>,
    ) -> Result<Response<pb::ListCampaignsResponse>, Status> {
        let request = request.into_inner();
        let state = pb::CampaignState::try_from(request.state)
            .map_err(|_| invalid("state", "is not a campaign state"))?;
        let size = page_size(request.page_size);
        let mut after = parse_page_token(&request.page_token)?;
        let mut campaigns = Vec::new();
        let mut next_page_token = String::new();
        // Filtering by state may leave pages short; read on until the page is full.
        loop {
            let (items, more) =
                self.campaigns.list(after.as_deref(), size).await.map_err(ApiError::from)?;
            let last = items.last().map(|c| c.id.clone());
            for item in &items {
                if state == pb::CampaignState::Unspecified
                    || state_to_proto(item.value.state) == state
                {
                    campaigns.push(campaign_to_proto(item));
                    if campaigns.len() == size {
                        break;
                    }
                }
            }
            if campaigns.len() == size {
                if let Some(last) = campaigns.last()
                    && (more || last.id != items.last().map(|c| c.id.clone()).unwrap_or_default())
                {
                    next_page_token = page_token(&last.id);
                }
                break;
            }
            if !more {
                break;
            }
            after = last;
        }
        Ok(Response::new(pb::ListCampaignsResponse { campaigns, next_page_token }))
    }

    #[instrument(skip_all)]
    async fn update_campaign(
        &self,
        request: Request<pb::UpdateCampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        let request = request.into_inner();
        let Some(proto) = request.campaign else {
            return Err(invalid("campaign", "is required").into());
        };
        let mut v = Violations::default();
        check_id(&mut v, "campaign.id", &proto.id);
        let etag = parse_etag("etag", &request.etag)?;
        let paths: Vec<String> = request.update_mask.map(|m| m.paths).unwrap_or_default();
        for path in &paths {
            let top = path.split('.').next().unwrap_or_default();
            if top == "state" {
                v.add(
                    "update_mask",
                    "state changes through ActivateCampaign, PauseCampaign and ArchiveCampaign",
                );
            } else if !WRITABLE.contains(&top) {
                v.add("update_mask", format!("{path} is not a writable field"));
            }
        }
        v.check()?;
        let named = |field: &str| {
            paths.is_empty() || paths.iter().any(|p| p.split('.').next() == Some(field))
        };
        loop {
            let current = self.campaigns.get(&proto.id).await.map_err(ApiError::from)?;
            if etag.is_some_and(|e| e != current.revision) {
                return Err(ApiError::FailedPrecondition(format!(
                    "campaign {} changed since etag {} was read",
                    proto.id, request.etag
                ))
                .into());
            }
            if current.value.state == CampaignState::Archived {
                return Err(ApiError::FailedPrecondition(format!(
                    "campaign {} is archived",
                    proto.id
                ))
                .into());
            }
            let mut merged = campaign_to_proto(&current);
            if named("description") {
                merged.description = proto.description.clone();
            }
            if named("webhook_id") {
                merged.webhook_id = proto.webhook_id.clone();
            }
            if named("audience") {
                merged.audience = proto.audience.clone();
            }
            if named("trigger") {
                merged.trigger = proto.trigger.clone();
            }
            if named("rules") {
                merged.rules = proto.rules.clone();
            }
            if named("frequency_cap") {
                merged.frequency_cap = proto.frequency_cap;
            }
            if named("send_window") {
                merged.send_window = proto.send_window.clone();
            }
            if named("start_time") {
                merged.start_time = proto.start_time;
            }
            if named("end_time") {
                merged.end_time = proto.end_time;
            }
            if named("exit_events") {
                merged.exit_events = proto.exit_events.clone();
            }
            if named("data") {
                merged.data = proto.data.clone();
            }
            if named("capture") {
                merged.capture = proto.capture.clone();
            }
            let mut v = Violations::default();
            let updated = campaign_from_proto(&merged, Some(&current.value), &mut v);
            self.check_references(&proto.id, &updated, &mut v).await?;
            v.check()?;
            match self.lifecycle.replace(&proto.id, updated, &current).await {
                Ok(stored) => return Ok(Response::new(campaign_to_proto(&stored))),
                Err(CampaignError::Defs(DefsError::Conflict { .. })) if etag.is_none() => continue,
                Err(error) => return Err(ApiError::from(error).into()),
            }
        }
    }

    async fn delete_campaign(
        &self,
        request: Request<pb::DeleteCampaignRequest>,
    ) -> Result<Response<pb::DeleteCampaignResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        check_id(&mut v, "id", &request.id);
        v.check()?;
        let etag = parse_etag("etag", &request.etag)?;
        let current = self.campaigns.get(&request.id).await.map_err(ApiError::from)?;
        if !deletable(current.value.state) {
            return Err(ApiError::FailedPrecondition(format!(
                "campaign {} is {}; archive it before deleting it",
                request.id,
                state_name(current.value.state)
            ))
            .into());
        }
        self.campaigns
            .delete(&request.id, Some(etag.unwrap_or(current.revision)))
            .await
            .map_err(ApiError::from)?;
        info!(campaign = %request.id, "campaign deleted");
        Ok(Response::new(pb::DeleteCampaignResponse {}))
    }

    async fn activate_campaign(
        &self,
        request: Request<pb::ActivateCampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        Ok(Response::new(self.transition(&request.into_inner().id, CampaignState::Active).await?))
    }

    async fn pause_campaign(
        &self,
        request: Request<pb::PauseCampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        Ok(Response::new(self.transition(&request.into_inner().id, CampaignState::Paused).await?))
    }

    async fn archive_campaign(
        &self,
        request: Request<pb::ArchiveCampaignRequest>,
    ) -> Result<Response<pb::Campaign>, Status> {
        Ok(Response::new(self.transition(&request.into_inner().id, CampaignState::Archived).await?))
    }

    #[instrument(skip_all, fields(campaign = %request.get_ref().id))]
    async fn run_campaign(
        &self,
        request: Request<pb::RunCampaignRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let traceparent = super::events::traceparent(&request);
        Ok(Response::new(self.run(request.into_inner(), traceparent).await?))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        check_id(&mut v, "campaign_id", &request.campaign_id);
        if request.run_id.is_empty() {
            v.add("run_id", "is required");
        }
        v.check()?;
        Ok(Response::new(self.read_run(&request.campaign_id, &request.run_id).await?))
    }

    async fn pause_run(
        &self,
        request: Request<pb::PauseRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let r = request.into_inner();
        Ok(Response::new(self.change_run(&r.campaign_id, &r.run_id, RunState::Paused).await?))
    }

    async fn resume_run(
        &self,
        request: Request<pb::ResumeRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let r = request.into_inner();
        Ok(Response::new(self.change_run(&r.campaign_id, &r.run_id, RunState::Running).await?))
    }

    async fn cancel_run(
        &self,
        request: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let r = request.into_inner();
        Ok(Response::new(self.change_run(&r.campaign_id, &r.run_id, RunState::Cancelled).await?))
    }

    async fn watch_run(
        &self,
        request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<BoxStream<pb::Run>>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        check_id(&mut v, "campaign_id", &r.campaign_id);
        if r.run_id.is_empty() {
            v.add("run_id", "is required");
        }
        v.check()?;
        let permit = self.streams.open()?;
        // Fails at once for an unknown run.
        self.read_run(&r.campaign_id, &r.run_id).await?;
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let lagged = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lagging = lagged.clone();
        let this = self.clone();
        // The task ends when the run ends, the caller goes away, or the caller leaves its
        // buffer full for SLOW_CALLER.
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let run = match this.read_run(&r.campaign_id, &r.run_id).await {
                    Ok(run) => run,
                    Err(error) => {
                        let _ = sender.send_timeout(Err(Status::from(error)), SLOW_CALLER).await;
                        return;
                    }
                };
                let done = matches!(
                    RunState::try_from_proto(run.state),
                    Some(RunState::Completed | RunState::Cancelled)
                );
                if last.as_ref() != Some(&run) {
                    match sender.send_timeout(Ok(run.clone()), SLOW_CALLER).await {
                        Ok(()) => {}
                        Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => {
                            lagging.store(true, std::sync::atomic::Ordering::Release);
                            return;
                        }
                        Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => return,
                    }
                    last = Some(run);
                }
                if done {
                    return;
                }
                tokio::select! {
                    _ = sender.closed() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        Ok(Response::new(super::ending_when_lagged(stream, lagged, permit)))
    }

    async fn preview_campaign(
        &self,
        request: Request<pb::PreviewCampaignRequest>,
    ) -> Result<Response<pb::PreviewCampaignResponse>, Status> {
        Ok(Response::new(self.preview(request.into_inner()).await?))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let request = request.into_inner();
        let mut v = Violations::default();
        check_id(&mut v, "campaign_id", &request.campaign_id);
        v.check()?;
        let after = parse_page_token(&request.page_token)?;
        let (page, more) = self
            .runs
            .list(&request.campaign_id, after.as_deref(), page_size(request.page_size))
            .await
            .map_err(ApiError::from)?;
        let runs: Vec<pb::Run> =
            page.iter().map(|(id, run)| run_to_proto(&request.campaign_id, id, run)).collect();
        let next_page_token = match runs.last() {
            Some(last) if more => page_token(&last.id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListRunsResponse { runs, next_page_token }))
    }
}
