//! Conversions between the API's campaign and run messages and the domain records. A message
//! is checked field by field as it is converted, so that every missing or invalid field is
//! named at once; what needs a stored definition is checked in `validate`.

use tidings_api::v1 as pb;
use tidings_scheduler::campaign::{
    Audience, Campaign, CampaignState, FrequencyCap, IntervalTrigger, Run, RunState, SendWindow,
    Trigger,
};
use tidings_scheduler::defs::Versioned;
use tidings_scheduler::now_ms;
use tidings_scheduler::schedule::Misfire;

use super::validate::{DAY_MS, check_cel, check_interaction_kind, check_kind, parse_minute};
use crate::api::convert::{
    duration, duration_ms, json_to_struct, struct_to_json, timestamp, timestamp_ms,
};
use crate::api::{Violations, check_id};

/// Maps and checks everything that needs no store read.
pub(super) fn campaign_from_proto(
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
    let trigger = trigger_from_proto(proto.trigger.as_ref(), v);
    for (i, rule) in proto.rules.iter().enumerate() {
        check_cel(v, &format!("campaign.rules[{i}]"), rule);
    }
    if proto.rules.len() > 32 {
        v.add("campaign.rules", "must have at most 32 entries");
    }
    let frequency_cap = proto.frequency_cap.as_ref().map(|cap| {
        let period_ms = match &cap.period {
            Some(p) => {
                duration_ms(v, "campaign.frequency_cap.period", p, 1000, 365 * DAY_MS).unwrap_or(0)
            }
            None if cap.max_sends > 0 => {
                v.add("campaign.frequency_cap.period", "is required with max_sends");
                0
            }
            None => 0,
        };
        FrequencyCap { max_sends: cap.max_sends, period_ms, across_campaigns: cap.across_campaigns }
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
            v.add(format!("campaign.capture[{name}]"), "must be a JSON pointer such as /ticket/id");
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

pub(super) fn trigger_from_proto(trigger: Option<&pb::Trigger>, v: &mut Violations) -> Trigger {
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
            Trigger::Event { event_type: event.event_type.clone(), filter: event.filter.clone() }
        }
        Kind::Interval(interval) => Trigger::Interval(interval_from_proto(interval, v)),
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
                    Ok(pb::DeliveryStatus::Delivered) => on_status.push("delivered".to_string()),
                    Ok(pb::DeliveryStatus::Failed) => on_status.push("failed".to_string()),
                    _ => v.add(format!("{FIELD}.on_status[{i}]"), "must be DELIVERED or FAILED"),
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

pub(super) fn interval_from_proto(
    proto: &pb::IntervalTrigger,
    v: &mut Violations,
) -> IntervalTrigger {
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
    let start_ms =
        proto.start_time.as_ref().and_then(|t| timestamp_ms(v, &format!("{FIELD}.start_time"), t));
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

pub(super) fn campaign_to_proto(stored: &Versioned<Campaign>) -> pb::Campaign {
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
        audience: (!c.audience.segment_id.is_empty() || !c.audience.filter.is_empty()).then(|| {
            pb::Audience {
                segment_id: c.audience.segment_id.clone(),
                filter: c.audience.filter.clone(),
            }
        }),
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

pub(super) fn state_to_proto(state: CampaignState) -> pb::CampaignState {
    match state {
        CampaignState::Draft => pb::CampaignState::Draft,
        CampaignState::Active => pb::CampaignState::Active,
        CampaignState::Paused => pb::CampaignState::Paused,
        CampaignState::Completed => pb::CampaignState::Completed,
        CampaignState::Archived => pb::CampaignState::Archived,
    }
}

pub(super) fn run_to_proto(campaign: &str, id: &str, run: &Run) -> pb::Run {
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

pub(super) trait FromProto: Sized {
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
