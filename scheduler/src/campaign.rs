//! Campaign and run definitions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::schedule::{Misfire, Repeat, Schedule};

/// The life cycle of a campaign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    /// Being edited.
    Draft,
    /// Firing and sending.
    Active,
    /// Sending nothing new.
    Paused,
    /// Done.
    Completed,
    /// Retired.
    Archived,
}

/// Who a campaign sends to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audience {
    /// Segment id; empty for none.
    pub segment_id: String,
    /// CEL filter over `contact`; empty for none.
    pub filter: String,
}

/// An interval trigger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntervalTrigger {
    /// Fixed period in milliseconds; 0 when `cron` is used.
    pub every_ms: u64,
    /// Cron expression; empty when `every_ms` is used.
    pub cron: String,
    /// IANA time zone of the cron expression.
    pub timezone: String,
    /// First possible occurrence; the activation time when `None`.
    pub start_ms: Option<i64>,
    /// No occurrence at or after this time.
    pub end_ms: Option<i64>,
    /// Missed occurrences policy.
    pub misfire: Misfire,
    /// Most missed occurrences replayed.
    pub misfire_limit: u32,
}

impl IntervalTrigger {
    /// Returns the schedule, anchored (for fixed periods) at `anchor_ms`.
    pub fn schedule(&self, anchor_ms: i64) -> Result<Schedule, String> {
        let start_ms = self.start_ms.unwrap_or(anchor_ms);
        let repeat = if self.every_ms > 0 {
            Repeat::Every { period_ms: self.every_ms as i64, anchor_ms: start_ms }
        } else {
            Repeat::cron(&self.cron, &self.timezone)?
        };
        Ok(Schedule {
            repeat,
            start_ms,
            end_ms: self.end_ms,
            misfire: self.misfire,
            misfire_limit: self.misfire_limit.max(1) as usize,
        })
    }
}

/// When a campaign sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Trigger {
    /// On RunCampaign.
    OnDemand,
    /// On matching events.
    Event {
        /// Event type.
        event_type: String,
        /// CEL filter over `event` and `contact`.
        filter: String,
    },
    /// On a schedule.
    Interval(IntervalTrigger),
    /// After another campaign's delivery.
    FollowUp {
        /// The campaign followed.
        after_campaign_id: String,
        /// Delivery statuses that start the wait.
        on_status: Vec<String>,
        /// The wait, in milliseconds.
        delay_ms: u64,
        /// Interaction kinds that cancel the follow-up.
        unless_interactions: Vec<String>,
    },
}

/// Most sends per contact in a sliding period.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrequencyCap {
    /// Most sends; 0 for no cap.
    pub max_sends: u32,
    /// The period in milliseconds.
    pub period_ms: u64,
    /// Whether every campaign's sends count.
    pub across_campaigns: bool,
}

/// Hours of the week when sending is allowed, in the contact's time zone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendWindow {
    /// Days 1 (Monday) to 7; every day when empty.
    pub days: Vec<u32>,
    /// Opening minute of the day.
    pub start_minute: u32,
    /// Closing minute of the day.
    pub end_minute: u32,
}

/// A campaign as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    /// Free text.
    pub description: String,
    /// Webhook called.
    pub webhook_id: String,
    /// Who receives it.
    pub audience: Audience,
    /// When it sends.
    pub trigger: Trigger,
    /// CEL rules that must all hold.
    pub rules: Vec<String>,
    /// Frequency cap.
    pub frequency_cap: Option<FrequencyCap>,
    /// Send window.
    pub send_window: Option<SendWindow>,
    /// No send before.
    pub start_ms: Option<i64>,
    /// No send at or after.
    pub end_ms: Option<i64>,
    /// Event types that cancel pending follow-ups.
    pub exit_events: Vec<String>,
    /// Extra template data.
    pub data: BTreeMap<String, serde_json::Value>,
    /// Response capture: attribute name to JSON pointer.
    pub capture: BTreeMap<String, String>,
    /// Life-cycle state.
    pub state: CampaignState,
    /// Bumped at every activation, so timers of an earlier activation stop their chain.
    pub generation: u64,
    /// When it was last activated; anchors fixed-period intervals without a start time.
    #[serde(default)]
    pub activated_at_ms: i64,

    /// Creation time.
    pub created_at_ms: i64,
    /// Last change.
    pub updated_at_ms: i64,
}

/// The life cycle of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waiting for its time.
    Scheduled,
    /// Evaluating and sending.
    Running,
    /// Paused.
    Paused,
    /// Done.
    Completed,
    /// Cancelled.
    Cancelled,
}

/// One execution of a campaign, stored under `runs/{campaign}/{run}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// State.
    pub state: RunState,
    /// The time it was scheduled for.
    pub scheduled_ms: i64,
    /// When it started.
    pub started_ms: Option<i64>,
    /// When it ended.
    pub ended_ms: Option<i64>,
    /// Contacts in the audience.
    pub audience: u64,
    /// Deliveries queued.
    pub queued: u64,
    /// Deliveries delivered.
    pub delivered: u64,
    /// Deliveries failed.
    pub failed: u64,
    /// Skips by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Partitions done.
    pub partitions_done: u32,
    /// Partitions fanned out to.
    pub partitions: u32,
    /// Extra template data for this run.
    pub data: BTreeMap<String, serde_json::Value>,
    /// The W3C trace context of the call or schedule that started the run, which its
    /// deliveries continue.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
}

impl Run {
    /// Returns a run in `state` scheduled for `scheduled_ms`.
    pub fn new(state: RunState, scheduled_ms: i64, partitions: u32) -> Self {
        Self {
            state,
            scheduled_ms,
            started_ms: (state == RunState::Running).then(crate::now_ms),
            ended_ms: None,
            audience: 0,
            queued: 0,
            delivered: 0,
            failed: 0,
            skipped: BTreeMap::new(),
            partitions_done: 0,
            partitions,
            data: BTreeMap::new(),
            traceparent: String::new(),
        }
    }
}

/// Returns the id of the run of an interval occurrence: the occurrence is its identity.
pub fn interval_run_id(occurrence_ms: i64) -> String {
    format!("i-{occurrence_ms:013}")
}

/// One partition's share of a run, under `shards/{campaign}/{run}/{p}`, written only by
/// that partition's owner.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    /// Contacts of the partition in the audience.
    pub audience: u64,
    /// Deliveries queued.
    pub queued: u64,
    /// Deliveries delivered.
    pub delivered: u64,
    /// Deliveries failed.
    pub failed: u64,
    /// Skips by reason.
    pub skipped: BTreeMap<String, u64>,
    /// Whether the partition finished evaluating the audience.
    pub done: bool,
    /// When the partition last changed it, Unix milliseconds (0 in shards written by earlier
    /// versions): the last of a completed run's shards tells when the run ended.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub changed_ms: i64,
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

/// Returns the inbox write that continues a run's shard in `partition` after the contact
/// `after` (from the first contact when empty).
pub fn fan_out_one(
    campaign: &str,
    run: &str,
    partition: crate::cluster::PartitionId,
    after: &str,
) -> crate::state::StateResult<crate::state::Write> {
    let entry = crate::inbox::InboxEntry::RunShard {
        campaign: campaign.to_string(),
        run: run.to_string(),
        after: after.to_string(),
    };
    let id = format!("run-{}-{}", ulid::Ulid::new().to_string().to_ascii_lowercase(), partition);
    crate::state::Write::inbox(partition, &id, &entry)
}

/// Shard entries written by one fan-out step: with the run's other writes, they stay within
/// the store's limit of operations per transaction.
pub const FAN_OUT_STEP: u32 = 96;

/// Returns the inbox writes that fan a run out to partitions `from` and on: a shard entry to
/// each of the next [`FAN_OUT_STEP`], and, when partitions remain, a [`InboxEntry::FanOut`]
/// entry in partition `home` that goes on from there.
///
/// [`InboxEntry::FanOut`]: crate::inbox::InboxEntry::FanOut
pub fn fan_out(
    campaign: &str,
    run: &str,
    from: u32,
    partitions: u32,
    home: crate::cluster::PartitionId,
) -> crate::state::StateResult<Vec<crate::state::Write>> {
    let until = from.saturating_add(FAN_OUT_STEP).min(partitions);
    let mut ops = (from..until)
        .map(|p| fan_out_one(campaign, run, p, ""))
        .collect::<crate::state::StateResult<Vec<_>>>()?;
    if until < partitions {
        let entry = crate::inbox::InboxEntry::FanOut {
            campaign: campaign.to_string(),
            run: run.to_string(),
            from: until,
        };
        let id =
            format!("fan-{}-{run}-{until}", ulid::Ulid::new().to_string().to_ascii_lowercase());
        ops.push(crate::state::Write::inbox(home, &id, &entry)?);
    }
    Ok(ops)
}
