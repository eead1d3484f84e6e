//! CampaignService: definitions, life cycle, and runs.

use std::sync::Arc;

use tidings_api::v1 as pb;
use tidings_api::v1::campaign_service_server::CampaignService;
use tidings_scheduler::app::{Contacts, RunError, Runs};
use tidings_scheduler::campaign::{
    Audience, Campaign, CampaignState, FrequencyCap, IntervalTrigger, Run, RunState, SendWindow,
    Trigger,
};
use tidings_scheduler::defs::{Definitions, DefsError, Versioned};
use tidings_scheduler::inbox::InboxEntry;
use tidings_scheduler::schedule::Misfire;
use tidings_scheduler::state::{Write, partition_of};
use tidings_scheduler::store::Store;
use tidings_scheduler::timers::{Timer, TimerKind};
use tidings_scheduler::webhook::Webhook;
use tidings_scheduler::{now_ms, rules};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use super::convert::{
    duration, duration_ms, json_to_struct, struct_to_json, timestamp, timestamp_ms,
};
use super::{
    ApiError, Violations, check_id, invalid, new_id, page_size, page_token, parse_etag,
    parse_page_token,
};

const DAY_MS: u64 = 24 * 3600 * 1000;
/// A scheduled time this far in the past is a mistake, not clock skew.
const PAST_TOLERANCE_MS: i64 = 1000;
/// Longest follow-up chain followed when looking for a cycle.
const MAX_CHAIN: usize = 64;
/// Follow-up campaigns one campaign may have: a delivery starts all their waits in one
/// transaction, which holds at most 128 writes.
const MAX_FOLLOW_UPS: usize = 64;
const WRITABLE: [&str; 13] = [
    "description",
    "webhook_id",
    "audience",
    "trigger",
    "rules",
    "frequency_cap",
    "send_window",
    "start_time",
    "end_time",
    "exit_events",
    "data",
    "capture",
    "state",
];

/// Serves CampaignService.
#[derive(Clone)]
pub(crate) struct CampaignApi {
    campaigns: Definitions<Campaign>,
    webhooks: Definitions<Webhook>,
    segments: Definitions<tidings_scheduler::segment::Segment>,
    runs: Runs,
    contacts: Contacts,
    /// Where an activation's first interval timer is scheduled.
    state: tidings_scheduler::state::State,
    partitions: u32,
    templates: Arc<tidings_scheduler::template::Templates>,
    cipher: tidings_scheduler::secrets::Cipher,
    programs: Arc<tidings_scheduler::rules::Programs>,
    /// Places for WatchRun streams.
    streams: super::Streams,
}

fn check_kind(violations: &mut Violations, field: &str, value: &str) {
    if value.is_empty()
        || value.len() > 128
        || !value.chars().all(|c| c.is_ascii_alphanumeric() || ".:_-".contains(c))
    {
        violations.add(field, "must be 1 to 128 letters, digits, '.', ':', '_' or '-'");
    }
}

fn check_cel(violations: &mut Violations, field: &str, source: &str) {
    if let Err(reason) = rules::check(source) {
        violations.add(field, format!("invalid CEL: {reason}"));
    }
}

fn parse_minute(violations: &mut Violations, field: &str, value: &str) -> u32 {
    let parsed = value.split_once(':').and_then(|(h, m)| {
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60 && value.len() == 5).then_some(h * 60 + m)
    });
    parsed.unwrap_or_else(|| {
        violations.add(field, "must be a time of day HH:MM, for example 09:00");
        0
    })
}

fn state_to_proto(state: CampaignState) -> pb::CampaignState {
    match state {
        CampaignState::Draft => pb::CampaignState::Draft,
        CampaignState::Active => pb::CampaignState::Active,
        CampaignState::Paused => pb::CampaignState::Paused,
        CampaignState::Completed => pb::CampaignState::Completed,
        CampaignState::Archived => pb::CampaignState::Archived,
    }
}

fn run_to_proto(campaign: &str, id: &str, run: &Run) -> pb::Run {
    pb::Run {
        id: id.to_string(),
        campaign_id: campaign.to_string(),
        state: match run.state {
            RunState::Scheduled => pb::RunState::Scheduled,
            RunState::Running => pb::RunState::Running,
            RunState::Paused => pb::RunState::Paused,
            RunState::Completed => pb::RunState::Completed,
            RunState::Cancelled => pb::RunState::Cancelled,
        } as i32,
        scheduled_time: Some(timestamp(run.scheduled_ms)),
        start_time: run.started_ms.map(timestamp),
        end_time: run.ended_ms.map(timestamp),
        audience: run.audience,
        queued: run.queued,
        delivered: run.delivered,
        failed: run.failed,
        skipped: run.skipped.clone().into_iter().collect(),
        partitions_done: run.partitions_done,
        partitions: run.partitions,
    }
}

impl CampaignApi {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        state: tidings_scheduler::state::State,
        partitions: u32,
        templates: Arc<tidings_scheduler::template::Templates>,
        cipher: tidings_scheduler::secrets::Cipher,
        streams: super::Streams,
    ) -> Self {
        Self {
            streams,
            campaigns: Definitions::new(store.clone(), "campaign", "campaigns"),
            webhooks: Definitions::new(store.clone(), "webhook", "webhooks"),
            segments: Definitions::new(store, "segment", "segments"),
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
                    if let Some(rule) = campaign
                        .rules
                        .iter()
                        .find(|r| !self.programs.evaluate(r, &vars).unwrap_or(false))
                    {
                        skip_reason = format!("rule: {rule}");
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

    /// Maps and checks everything that needs no store read.
    fn to_domain(
        &self,
        proto: &pb::Campaign,
        existing: Option<&Campaign>,
        v: &mut Violations,
    ) -> Campaign {
        let now = now_ms();
        if proto.description.chars().count() > 1024 {
            v.add("campaign.description", "must be at most 1024 characters");
        }
        if proto.webhook_id.is_empty() {
            v.add("campaign.webhook_id", "is required");
        } else {
            check_id(v, "campaign.webhook_id", &proto.webhook_id);
        }
        let audience = proto.audience.as_ref().map_or_else(Audience::default, |a| {
            if !a.segment_id.is_empty() {
                check_id(v, "campaign.audience.segment_id", &a.segment_id);
            }
            if !a.filter.is_empty() {
                check_cel(v, "campaign.audience.filter", &a.filter);
            }
            Audience { segment_id: a.segment_id.clone(), filter: a.filter.clone() }
        });
        let trigger = self.trigger(proto.trigger.as_ref(), v);
        for (i, rule) in proto.rules.iter().enumerate() {
            check_cel(v, &format!("campaign.rules[{i}]"), rule);
        }
        if proto.rules.len() > 32 {
            v.add("campaign.rules", "must have at most 32 entries");
        }
        let frequency_cap = proto.frequency_cap.as_ref().map(|cap| {
            let period_ms = match &cap.period {
                Some(p) => duration_ms(v, "campaign.frequency_cap.period", p, 1000, 365 * DAY_MS)
                    .unwrap_or(0),
                None if cap.max_sends > 0 => {
                    v.add("campaign.frequency_cap.period", "is required with max_sends");
                    0
                }
                None => 0,
            };
            FrequencyCap {
                max_sends: cap.max_sends,
                period_ms,
                across_campaigns: cap.across_campaigns,
            }
        });
        if proto
            .frequency_cap
            .as_ref()
            .is_some_and(|c| c.max_sends as usize > tidings_scheduler::status::SEND_HISTORY)
        {
            v.add(
                "campaign.frequency_cap.max_sends",
                format!("must be at most {}", tidings_scheduler::status::SEND_HISTORY),
            );
        }
        if proto.capture.len() > 32 {
            v.add("campaign.capture", "must have at most 32 entries");
        }
        let send_window = proto.send_window.as_ref().map(|w| {
            for (i, day) in w.days.iter().enumerate() {
                if !(1..=7).contains(day) {
                    v.add(
                        format!("campaign.send_window.days[{i}]"),
                        "must be 1 (Monday) to 7 (Sunday)",
                    );
                }
            }
            let start_minute = parse_minute(v, "campaign.send_window.start", &w.start);
            let end_minute = parse_minute(v, "campaign.send_window.end", &w.end);
            if start_minute == end_minute && !w.start.is_empty() {
                v.add("campaign.send_window.end", "must differ from start");
            }
            SendWindow { days: w.days.clone(), start_minute, end_minute }
        });
        let start_ms =
            proto.start_time.as_ref().and_then(|t| timestamp_ms(v, "campaign.start_time", t));
        let end_ms = proto.end_time.as_ref().and_then(|t| timestamp_ms(v, "campaign.end_time", t));
        if let (Some(start), Some(end)) = (start_ms, end_ms)
            && end <= start
        {
            v.add("campaign.end_time", "must be after start_time");
        }
        for (i, kind) in proto.exit_events.iter().enumerate() {
            check_kind(v, &format!("campaign.exit_events[{i}]"), kind);
        }
        let data = proto.data.as_ref().map(struct_to_json).unwrap_or_default();
        if serde_json::to_vec(&data).map_or(0, |b| b.len()) > 64 * 1024 {
            v.add("campaign.data", "must be at most 64 KiB as JSON");
        }
        for (name, pointer) in &proto.capture {
            if name.is_empty() || name.len() > 128 {
                v.add(
                    format!("campaign.capture[{name}]"),
                    "attribute names must be 1 to 128 characters",
                );
            }
            if !pointer.starts_with('/') {
                v.add(
                    format!("campaign.capture[{name}]"),
                    "must be a JSON pointer such as /ticket/id",
                );
            }
        }
        Campaign {
            description: proto.description.clone(),
            webhook_id: proto.webhook_id.clone(),
            audience,
            trigger,
            rules: proto.rules.clone(),
            frequency_cap,
            send_window,
            start_ms,
            end_ms,
            exit_events: proto.exit_events.clone(),
            data: data.into_iter().collect(),
            capture: proto.capture.clone().into_iter().collect(),
            state: existing.map_or(CampaignState::Draft, |c| c.state),
            generation: existing.map_or(0, |c| c.generation),
            activated_at_ms: existing.map_or(0, |c| c.activated_at_ms),
            created_at_ms: existing.map_or(now, |c| c.created_at_ms),
            updated_at_ms: now,
        }
    }

    fn trigger(&self, trigger: Option<&pb::Trigger>, v: &mut Violations) -> Trigger {
        use pb::trigger::Kind;
        let Some(kind) = trigger.and_then(|t| t.kind.as_ref()) else {
            v.add("campaign.trigger", "is required: one of on_demand, event, interval, follow_up");
            return Trigger::OnDemand;
        };
        match kind {
            Kind::OnDemand(_) => Trigger::OnDemand,
            Kind::Event(event) => {
                check_kind(v, "campaign.trigger.event.event_type", &event.event_type);
                if !event.filter.is_empty() {
                    check_cel(v, "campaign.trigger.event.filter", &event.filter);
                }
                Trigger::Event {
                    event_type: event.event_type.clone(),
                    filter: event.filter.clone(),
                }
            }
            Kind::Interval(interval) => Trigger::Interval(self.interval(interval, v)),
            Kind::FollowUp(follow) => {
                const FIELD: &str = "campaign.trigger.follow_up";
                if follow.after_campaign_id.is_empty() {
                    v.add(format!("{FIELD}.after_campaign_id"), "is required");
                } else {
                    check_id(v, &format!("{FIELD}.after_campaign_id"), &follow.after_campaign_id);
                }
                let delay_ms = match &follow.delay {
                    Some(d) => {
                        duration_ms(v, &format!("{FIELD}.delay"), d, 0, 90 * DAY_MS).unwrap_or(0)
                    }
                    None => {
                        v.add(format!("{FIELD}.delay"), "is required");
                        0
                    }
                };
                let mut on_status = Vec::new();
                for (i, status) in follow.on_status.iter().enumerate() {
                    match pb::DeliveryStatus::try_from(*status) {
                        Ok(pb::DeliveryStatus::Delivered) => {
                            on_status.push("delivered".to_string())
                        }
                        Ok(pb::DeliveryStatus::Failed) => on_status.push("failed".to_string()),
                        _ => {
                            v.add(format!("{FIELD}.on_status[{i}]"), "must be DELIVERED or FAILED")
                        }
                    }
                }
                if on_status.is_empty() {
                    on_status.push("delivered".into());
                }
                for (i, kind) in follow.unless_interactions.iter().enumerate() {
                    check_interaction_kind(v, &format!("{FIELD}.unless_interactions[{i}]"), kind);
                }
                Trigger::FollowUp {
                    after_campaign_id: follow.after_campaign_id.clone(),
                    on_status,
                    delay_ms,
                    unless_interactions: follow.unless_interactions.clone(),
                }
            }
        }
    }

    fn interval(&self, proto: &pb::IntervalTrigger, v: &mut Violations) -> IntervalTrigger {
        const FIELD: &str = "campaign.trigger.interval";
        let every_ms = proto
            .every
            .as_ref()
            .and_then(|e| duration_ms(v, &format!("{FIELD}.every"), e, 1000, 366 * DAY_MS));
        match (every_ms.is_some() || proto.every.is_some(), proto.cron.is_empty()) {
            (true, false) => v.add(format!("{FIELD}.cron"), "give either every or cron, not both"),
            (false, true) => v.add(format!("{FIELD}.every"), "one of every or cron is required"),
            _ => {}
        }
        if !proto.cron.is_empty()
            && let Err(reason) = tidings_scheduler::schedule::parse_cron(&proto.cron)
        {
            v.add(format!("{FIELD}.cron"), format!("invalid cron expression: {reason}"));
        }
        if let Err(reason) = tidings_scheduler::schedule::parse_timezone(&proto.timezone) {
            v.add(format!("{FIELD}.timezone"), reason);
        }
        let start_ms = proto
            .start_time
            .as_ref()
            .and_then(|t| timestamp_ms(v, &format!("{FIELD}.start_time"), t));
        let end_ms =
            proto.end_time.as_ref().and_then(|t| timestamp_ms(v, &format!("{FIELD}.end_time"), t));
        if let (Some(start), Some(end)) = (start_ms, end_ms)
            && end <= start
        {
            v.add(format!("{FIELD}.end_time"), "must be after start_time");
        }
        let misfire = match pb::MisfirePolicy::try_from(proto.misfire_policy) {
            Ok(pb::MisfirePolicy::Unspecified | pb::MisfirePolicy::FireOnce) => Misfire::FireOnce,
            Ok(pb::MisfirePolicy::Skip) => Misfire::Skip,
            Ok(pb::MisfirePolicy::FireAll) => Misfire::FireAll,
            Err(_) => {
                v.add(format!("{FIELD}.misfire_policy"), "is not a misfire policy");
                Misfire::FireOnce
            }
        };
        if proto.misfire_limit > 1000 {
            v.add(format!("{FIELD}.misfire_limit"), "must be at most 1000");
        }
        let trigger = IntervalTrigger {
            every_ms: every_ms.unwrap_or(0),
            cron: proto.cron.clone(),
            timezone: proto.timezone.clone(),
            start_ms,
            end_ms,
            misfire,
            misfire_limit: if proto.misfire_limit == 0 { 10 } else { proto.misfire_limit },
        };
        // A valid expression can still never fire (30 February) or end before its first firing.
        if v.is_empty_for(FIELD)
            && trigger
                .schedule(now_ms())
                .ok()
                .and_then(|s| s.first_from(start_ms.unwrap_or(0).max(now_ms())))
                .is_none()
        {
            v.add(FIELD, "never fires: no occurrence between now (or start_time) and end_time");
        }
        trigger
    }

    /// Checks what needs the store: the webhook, the segment, the campaign followed.
    async fn check_references(
        &self,
        id: &str,
        campaign: &Campaign,
        v: &mut Violations,
    ) -> Result<(), ApiError> {
        for (i, rule) in campaign.rules.iter().enumerate() {
            for named in campaigns_named(rule) {
                if named != id
                    && matches!(self.campaigns.get(&named).await, Err(DefsError::NotFound { .. }))
                {
                    v.add(
                        format!("campaign.rules[{i}]"),
                        format!("names campaign {named}, which does not exist"),
                    );
                }
            }
        }
        if !campaign.webhook_id.is_empty() {
            match self.webhooks.get(&campaign.webhook_id).await {
                Ok(_) => {}
                Err(DefsError::NotFound { .. }) => {
                    v.add(
                        "campaign.webhook_id",
                        format!("webhook {} does not exist", campaign.webhook_id),
                    );
                }
                Err(error) => return Err(error.into()),
            }
        }
        let segment = &campaign.audience.segment_id;
        let segment_missing = !segment.is_empty()
            && match self.segments.get(segment).await {
                Ok(_) => false,
                Err(DefsError::NotFound { .. }) => true,
                Err(error) => return Err(error.into()),
            };
        if segment_missing {
            v.add(
                "campaign.audience.segment_id",
                format!("segment {} does not exist", campaign.audience.segment_id),
            );
        }
        if let Trigger::FollowUp { after_campaign_id, .. } = &campaign.trigger {
            let field = "campaign.trigger.follow_up.after_campaign_id";
            let mut chain = vec![id.to_string()];
            let mut next = after_campaign_id.clone();
            loop {
                if chain.contains(&next) {
                    chain.push(next);
                    v.add(field, format!("creates a cycle: {}", chain.join(" follows ")));
                    break;
                }
                match self.campaigns.get(&next).await {
                    Ok(found) => {
                        chain.push(next.clone());
                        match found.value.trigger {
                            Trigger::FollowUp { after_campaign_id, .. }
                                if chain.len() < MAX_CHAIN =>
                            {
                                next = after_campaign_id
                            }
                            _ => break,
                        }
                    }
                    Err(DefsError::NotFound { .. }) => {
                        if chain.len() == 1 {
                            v.add(field, format!("campaign {next} does not exist"));
                        }
                        break;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            let mut siblings = 0;
            let mut after: Option<String> = None;
            loop {
                let (page, more) = self.campaigns.list(after.as_deref(), 500).await?;
                siblings += page
                    .iter()
                    .filter(|c| {
                        c.id != id
                            && matches!(&c.value.trigger,
                                Trigger::FollowUp { after_campaign_id: a, .. } if a == after_campaign_id)
                    })
                    .count();
                match page.last() {
                    Some(last) if more => after = Some(last.id.clone()),
                    _ => break,
                }
            }
            if siblings >= MAX_FOLLOW_UPS {
                v.add(
                    field,
                    format!(
                        "campaign {after_campaign_id} already has {siblings} follow-ups, the most \
                         one campaign may have ({MAX_FOLLOW_UPS})"
                    ),
                );
            }
        }
        Ok(())
    }

    fn to_proto(&self, stored: &Versioned<Campaign>) -> pb::Campaign {
        let c = &stored.value;
        use pb::trigger::Kind;
        let trigger = match &c.trigger {
            Trigger::OnDemand => Kind::OnDemand(pb::OnDemandTrigger {}),
            Trigger::Event { event_type, filter } => {
                Kind::Event(pb::EventTrigger { event_type: event_type.clone(), filter: filter.clone() })
            }
            Trigger::Interval(i) => Kind::Interval(pb::IntervalTrigger {
                every: (i.every_ms > 0).then(|| duration(i.every_ms)),
                cron: i.cron.clone(),
                timezone: i.timezone.clone(),
                start_time: i.start_ms.map(timestamp),
                end_time: i.end_ms.map(timestamp),
                misfire_policy: match i.misfire {
                    Misfire::Skip => pb::MisfirePolicy::Skip,
                    Misfire::FireOnce => pb::MisfirePolicy::FireOnce,
                    Misfire::FireAll => pb::MisfirePolicy::FireAll,
                } as i32,
                misfire_limit: i.misfire_limit,
            }),
            Trigger::FollowUp { after_campaign_id, on_status, delay_ms, unless_interactions } => {
                Kind::FollowUp(pb::FollowUpTrigger {
                    after_campaign_id: after_campaign_id.clone(),
                    on_status: on_status
                        .iter()
                        .map(|s| if s == "failed" { pb::DeliveryStatus::Failed } else { pb::DeliveryStatus::Delivered } as i32)
                        .collect(),
                    delay: Some(duration(*delay_ms)),
                    unless_interactions: unless_interactions.clone(),
                })
            }
        };
        let minute = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        pb::Campaign {
            id: stored.id.clone(),
            description: c.description.clone(),
            webhook_id: c.webhook_id.clone(),
            audience: (!c.audience.segment_id.is_empty() || !c.audience.filter.is_empty()).then(
                || pb::Audience {
                    segment_id: c.audience.segment_id.clone(),
                    filter: c.audience.filter.clone(),
                },
            ),
            trigger: Some(pb::Trigger { kind: Some(trigger) }),
            rules: c.rules.clone(),
            frequency_cap: c.frequency_cap.as_ref().map(|f| pb::FrequencyCap {
                max_sends: f.max_sends,
                period: Some(duration(f.period_ms)),
                across_campaigns: f.across_campaigns,
            }),
            send_window: c.send_window.as_ref().map(|w| pb::SendWindow {
                days: w.days.clone(),
                start: minute(w.start_minute),
                end: minute(w.end_minute),
            }),
            start_time: c.start_ms.map(timestamp),
            end_time: c.end_ms.map(timestamp),
            exit_events: c.exit_events.clone(),
            data: (!c.data.is_empty()).then(|| json_to_struct(&c.data)),
            capture: c.capture.clone().into_iter().collect(),
            state: state_to_proto(c.state) as i32,
            create_time: Some(timestamp(c.created_at_ms)),
            update_time: Some(timestamp(c.updated_at_ms)),
            etag: stored.revision.to_string(),
        }
    }

    /// Returns the write that starts the interval chain of a campaign being activated.
    fn first_interval_timer(
        &self,
        id: &str,
        campaign: &Campaign,
    ) -> Result<Option<Write>, ApiError> {
        let Trigger::Interval(trigger) = &campaign.trigger else { return Ok(None) };
        let now = now_ms();
        let schedule = trigger
            .schedule(campaign.activated_at_ms)
            .map_err(|e| invalid("campaign.trigger.interval", e))?;
        let Some(first) = schedule.first_from(now) else {
            return Err(ApiError::FailedPrecondition(format!(
                "campaign {id}: its interval has no occurrence left (end_time has passed)"
            )));
        };
        let timer = Timer {
            id: format!("{id}-{}", campaign.generation),
            due_ms: first,
            kind: TimerKind::Interval {
                campaign: id.to_string(),
                occurrence_ms: first,
                generation: campaign.generation,
            },
        };
        let partition = partition_of(id, self.partitions);
        Ok(Some(Write::inbox(partition, &new_id("in"), &InboxEntry::Schedule(timer))?))
    }

    /// Schedules an activation's first interval timer, before the definition that activates
    /// it is written: a timer whose activation did not happen finds its generation stale and
    /// ends, while an activation without its timer would never fire.
    async fn schedule(&self, writes: Vec<Write>) -> Result<(), ApiError> {
        if !writes.is_empty() {
            self.state.write(writes).await?;
        }
        Ok(())
    }

    /// Applies a state change with a compare on the revision read, retrying on a race.
    async fn transition(&self, id: &str, to: CampaignState) -> Result<pb::Campaign, ApiError> {
        let mut v = Violations::default();
        check_id(&mut v, "id", id);
        v.check()?;
        loop {
            let current = self.campaigns.get(id).await?;
            let from = current.value.state;
            if from == to {
                return Ok(self.to_proto(&current));
            }
            let allowed = match to {
                CampaignState::Active => {
                    matches!(from, CampaignState::Draft | CampaignState::Paused)
                }
                CampaignState::Paused => from == CampaignState::Active,
                CampaignState::Archived => true,
                CampaignState::Draft | CampaignState::Completed => false,
            };
            if !allowed {
                return Err(ApiError::FailedPrecondition(format!(
                    "campaign {id} is {}; it cannot become {}",
                    state_name(from),
                    state_name(to)
                )));
            }
            let mut next = current.value.clone();
            next.state = to;
            next.updated_at_ms = now_ms();
            let mut extra = Vec::new();
            if to == CampaignState::Active {
                if let Err(reason) = self.webhooks.get(&next.webhook_id).await {
                    return Err(match reason {
                        DefsError::NotFound { .. } => ApiError::FailedPrecondition(format!(
                            "campaign {id}: its webhook {} no longer exists",
                            next.webhook_id
                        )),
                        other => other.into(),
                    });
                }
                next.generation += 1;
                next.activated_at_ms = next.updated_at_ms;
                extra.extend(self.first_interval_timer(id, &next)?);
            }
            self.schedule(extra).await?;
            match self.campaigns.replace(id, &next, current.revision).await {
                Ok(stored) => {
                    info!(campaign = %id, state = state_name(to), "campaign state changed");
                    return Ok(self.to_proto(&stored));
                }
                Err(DefsError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
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
        let campaign = self.campaigns.get(&request.id).await?;
        if campaign.value.trigger != Trigger::OnDemand {
            return Err(ApiError::FailedPrecondition(format!(
                "campaign {} is not an on-demand campaign; its trigger runs it",
                request.id
            )));
        }
        if campaign.value.state != CampaignState::Active {
            return Err(ApiError::FailedPrecondition(format!(
                "campaign {} is {}; activate it first",
                request.id,
                state_name(campaign.value.state)
            )));
        }
        let run_id = if request.idempotency_key.is_empty() {
            new_id("r")
        } else {
            format!("k-{:016x}", fnv(&request.idempotency_key))
        };
        let at = scheduled.unwrap_or(now).max(now);
        let later = at > now + PAST_TOLERANCE_MS;
        let mut run = Run::new(
            if later { RunState::Scheduled } else { RunState::Running },
            at,
            self.partitions,
        );
        run.data =
            request.data.as_ref().map(struct_to_json).unwrap_or_default().into_iter().collect();
        run.traceparent = traceparent;
        let (run, started) = self.runs.start(&request.id, &run_id, &run).await?;
        if started {
            info!(campaign = %request.id, run = %run_id, scheduled = later, "run started");
        }
        Ok(run_to_proto(&request.id, &run_id, &run))
    }
}

/// The stream type of server-streaming calls.
type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

trait FromProto: Sized {
    fn try_from_proto(value: i32) -> Option<Self>;
}

impl FromProto for RunState {
    fn try_from_proto(value: i32) -> Option<Self> {
        match pb::RunState::try_from(value).ok()? {
            pb::RunState::Scheduled => Some(RunState::Scheduled),
            pb::RunState::Running => Some(RunState::Running),
            pb::RunState::Paused => Some(RunState::Paused),
            pb::RunState::Completed => Some(RunState::Completed),
            pb::RunState::Cancelled => Some(RunState::Cancelled),
            pb::RunState::Unspecified => None,
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

/// Returns the campaign ids a rule reads through `campaigns["id"]`, `campaigns['id']` or
/// `campaigns.id`.
fn campaigns_named(rule: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = rule;
    while let Some(at) = rest.find("campaigns") {
        let after = &rest[at + "campaigns".len()..];
        let name =
            if let Some(quoted) = after.strip_prefix("[\"").or_else(|| after.strip_prefix("['")) {
                quoted.find(['"', '\'']).map(|end| quoted[..end].to_string())
            } else if let Some(field) = after.strip_prefix('.') {
                let end = field
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(field.len());
                Some(field[..end].to_string())
            } else {
                None
            };
        names.extend(name.filter(|n| !n.is_empty()));
        rest = after;
    }
    names
}

fn fnv(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn state_name(state: CampaignState) -> &'static str {
    match state {
        CampaignState::Draft => "draft",
        CampaignState::Active => "active",
        CampaignState::Paused => "paused",
        CampaignState::Completed => "completed",
        CampaignState::Archived => "archived",
    }
}

/// Checks an interaction kind: the built-in ones or a custom lowercase name.
pub(crate) fn check_interaction_kind(v: &mut Violations, field: &str, kind: &str) {
    if kind.is_empty()
        || kind.len() > 64
        || !kind.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        v.add(field, "must be 1 to 64 lowercase letters, digits or '_' (delivered, opened, clicked, actioned, converted, or a custom name)");
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
        let campaign = self.to_domain(&proto, None, &mut v);
        self.check_references(&id, &campaign, &mut v).await?;
        v.check()?;
        let stored = self.campaigns.create(&id, &campaign).await.map_err(ApiError::from)?;
        info!(campaign = %id, "campaign created");
        Ok(Response::new(self.to_proto(&stored)))
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
        Ok(Response::new(self.to_proto(&stored)))
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
                    campaigns.push(self.to_proto(item));
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
            let mut merged = self.to_proto(&current);
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
            let mut updated = self.to_domain(&merged, Some(&current.value), &mut v);
            self.check_references(&proto.id, &updated, &mut v).await?;
            v.check()?;
            let mut extra = Vec::new();
            if updated.state == CampaignState::Active && updated.trigger != current.value.trigger {
                // A new schedule starts a new chain; the old chain's next timer ends itself.
                updated.generation += 1;
                updated.activated_at_ms = updated.updated_at_ms;
                extra.extend(self.first_interval_timer(&proto.id, &updated)?);
            }
            self.schedule(extra).await.map_err(Status::from)?;
            match self.campaigns.replace(&proto.id, &updated, current.revision).await {
                Ok(stored) => return Ok(Response::new(self.to_proto(&stored))),
                Err(DefsError::Conflict { .. }) if etag.is_none() => continue,
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
        if !matches!(current.value.state, CampaignState::Draft | CampaignState::Archived) {
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
        let this = self.clone();
        // The task ends when the run ends or the caller goes away.
        tokio::spawn(async move {
            let _permit = permit;
            let mut last = None;
            loop {
                let run = match this.read_run(&r.campaign_id, &r.run_id).await {
                    Ok(run) => run,
                    Err(error) => {
                        let _ = sender.send(Err(Status::from(error))).await;
                        return;
                    }
                };
                let done = matches!(
                    RunState::try_from_proto(run.state),
                    Some(RunState::Completed | RunState::Cancelled)
                );
                if last.as_ref() != Some(&run) {
                    if sender.send(Ok(run.clone())).await.is_err() {
                        return;
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
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
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
