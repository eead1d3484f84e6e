//! Campaigns' life cycle: which state a campaign may move to from which, and what a move
//! starts.
//!
//! A draft or paused campaign becomes active; an active one pauses; any campaign can be
//! archived; nothing returns to draft, and only the engine completes a campaign. An
//! activation, or a new trigger on an active campaign, raises the campaign's generation and,
//! for an interval campaign, schedules the first firing of the new chain. That timer is
//! written to its partition's inbox *before* the definition: a timer whose activation did not
//! happen finds its generation stale and ends, while an activation without its timer would
//! never fire.

use std::collections::BTreeMap;

use crate::campaign::{Campaign, CampaignState, Run, RunState, Trigger};
use crate::clock::Clock;
use crate::defs::{Definitions, DefsError, Versioned};
use crate::inbox::InboxEntry;
use crate::state::{State, StateError, Write, partition_of};
use crate::timers::{Timer, TimerKind};
use crate::webhook::Webhook;

pub use super::runs::Change;

/// Why a campaign's life cycle call failed.
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    /// The campaign's state does not allow the change.
    #[error("campaign {id} is {from}; it cannot become {to}")]
    Refused {
        /// Campaign id.
        id: String,
        /// Its state.
        from: &'static str,
        /// The state asked for.
        to: &'static str,
    },
    /// The campaign cannot be activated: its webhook is gone.
    #[error("campaign {id}: its webhook {webhook} no longer exists")]
    WebhookGone {
        /// Campaign id.
        id: String,
        /// The missing webhook's id.
        webhook: String,
    },
    /// The campaign's interval has no occurrence left to schedule.
    #[error("campaign {id}: its interval has no occurrence left (end_time has passed)")]
    NoOccurrenceLeft {
        /// Campaign id.
        id: String,
    },
    /// The campaign's interval schedule cannot be computed.
    #[error("campaign {id}: invalid interval schedule: {reason}")]
    InvalidSchedule {
        /// Campaign id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A definition could not be read or written (not found, changed since read, store down).
    #[error(transparent)]
    Defs(#[from] DefsError),
    /// Only on-demand campaigns are run by a call; the others run by their trigger.
    #[error("campaign {id} is not an on-demand campaign; its trigger runs it")]
    NotOnDemand {
        /// Campaign id.
        id: String,
    },
    /// The campaign must be active to run.
    #[error("campaign {id} is {state}; activate it first")]
    NotActive {
        /// Campaign id.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// The partition state could not be written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The run could not be started.
    #[error(transparent)]
    Run(#[from] super::runs::RunError),
}

/// A request to run an on-demand campaign.
#[derive(Clone, Debug, Default)]
pub struct RunRequest {
    /// Makes the call safe to repeat: the same key starts the same run once.
    pub idempotency_key: String,
    /// When the run starts, in Unix milliseconds; `None` (or a time already past) for now.
    pub at_ms: Option<i64>,
    /// Extra template data for this run (`run.data`).
    pub data: BTreeMap<String, serde_json::Value>,
    /// The caller's trace, which the run's attempts continue.
    pub traceparent: String,
}

/// A run started (or found, for a repeated idempotency key).
#[derive(Clone, Debug)]
pub struct Started {
    /// The run's id.
    pub id: String,
    /// The run as it is now.
    pub run: Run,
    /// Whether this call started it.
    pub new: bool,
}

/// Scheduled times within this much of now start at once.
const START_TOLERANCE_MS: i64 = 1000;

/// Returns the name of a campaign state, as the API spells it.
pub fn state_name(state: CampaignState) -> &'static str {
    match state {
        CampaignState::Draft => "draft",
        CampaignState::Active => "active",
        CampaignState::Paused => "paused",
        CampaignState::Completed => "completed",
        CampaignState::Archived => "archived",
    }
}

/// Returns what asking a campaign in `from` to move to `to` does.
pub fn change(from: CampaignState, to: CampaignState) -> Change {
    if from == to {
        return Change::Already;
    }
    let allowed = match to {
        CampaignState::Active => matches!(from, CampaignState::Draft | CampaignState::Paused),
        CampaignState::Paused => from == CampaignState::Active,
        CampaignState::Archived => true,
        CampaignState::Draft | CampaignState::Completed => false,
    };
    if allowed { Change::Apply } else { Change::Refused }
}

/// Returns whether a campaign in `state` may be deleted: only drafts and archived campaigns,
/// so that nothing running loses its definition.
pub fn deletable(state: CampaignState) -> bool {
    matches!(state, CampaignState::Draft | CampaignState::Archived)
}

/// Returns a campaign that can still send (any but an archived one) and sends through webhook
/// `id`: a webhook in use cannot be deleted.
pub async fn webhook_user(
    campaigns: &Definitions<Campaign>,
    id: &str,
) -> Result<Option<String>, DefsError> {
    first_user(campaigns, |c| c.webhook_id == id).await
}

/// Returns a campaign that can still send and targets segment `id`: a segment in use cannot be
/// deleted.
pub async fn segment_user(
    campaigns: &Definitions<Campaign>,
    id: &str,
) -> Result<Option<String>, DefsError> {
    first_user(campaigns, |c| c.audience.segment_id == id).await
}

async fn first_user(
    campaigns: &Definitions<Campaign>,
    uses: impl Fn(&Campaign) -> bool,
) -> Result<Option<String>, DefsError> {
    let mut after: Option<String> = None;
    loop {
        let (page, more) = campaigns.list(after.as_deref(), 500).await?;
        if let Some(user) =
            page.iter().find(|c| c.value.state != CampaignState::Archived && uses(&c.value))
        {
            return Ok(Some(user.id.clone()));
        }
        match page.last() {
            Some(last) if more => after = Some(last.id.clone()),
            _ => return Ok(None),
        }
    }
}

/// Campaign life cycle calls over the definitions and the partitions' inboxes.
#[derive(Clone)]
pub struct Campaigns {
    campaigns: Definitions<Campaign>,
    webhooks: Definitions<Webhook>,
    state: State,
    runs: super::Runs,
    partitions: u32,
    clock: Clock,
}

impl std::fmt::Debug for Campaigns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Campaigns").field("partitions", &self.partitions).finish_non_exhaustive()
    }
}

impl Campaigns {
    /// Returns the life cycle calls over these definitions and partitions.
    pub fn new(
        campaigns: Definitions<Campaign>,
        webhooks: Definitions<Webhook>,
        state: State,
        partitions: u32,
    ) -> Self {
        let runs = super::Runs::new(state.clone(), partitions);
        Self { campaigns, webhooks, state, runs, partitions, clock: Clock::system() }
    }

    /// Returns these calls reading the time from `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Moves a campaign to `to`, retrying on a concurrent change; a campaign already there is
    /// returned as it is.
    pub async fn transition(
        &self,
        id: &str,
        to: CampaignState,
    ) -> Result<Versioned<Campaign>, CampaignError> {
        loop {
            let current = self.campaigns.get(id).await?;
            let from = current.value.state;
            match change(from, to) {
                Change::Already => return Ok(current),
                Change::Refused => {
                    return Err(CampaignError::Refused {
                        id: id.to_string(),
                        from: state_name(from),
                        to: state_name(to),
                    });
                }
                Change::Apply => {}
            }
            let mut next = current.value.clone();
            next.state = to;
            next.updated_at_ms = self.clock.now_ms();
            if to == CampaignState::Active {
                match self.webhooks.get(&next.webhook_id).await {
                    Ok(_) => {}
                    Err(DefsError::NotFound { .. }) => {
                        return Err(CampaignError::WebhookGone {
                            id: id.to_string(),
                            webhook: next.webhook_id.clone(),
                        });
                    }
                    Err(other) => return Err(other.into()),
                }
                next.generation += 1;
                next.activated_at_ms = next.updated_at_ms;
                self.schedule_first_firing(id, &next).await?;
            }
            match self.campaigns.replace(id, &next, current.revision).await {
                Ok(stored) => {
                    tracing::info!(campaign = %id, state = state_name(to), "campaign state changed");
                    return Ok(stored);
                }
                Err(DefsError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Stores `updated` in place of `current` (a validated edit that keeps the state): a new
    /// trigger on an active campaign starts a new chain, whose first firing is scheduled; the
    /// old chain's next timer ends itself. Fails with [`DefsError::Conflict`] when the
    /// campaign changed since `current` was read.
    pub async fn replace(
        &self,
        id: &str,
        mut updated: Campaign,
        current: &Versioned<Campaign>,
    ) -> Result<Versioned<Campaign>, CampaignError> {
        if updated.state == CampaignState::Active && updated.trigger != current.value.trigger {
            updated.generation += 1;
            updated.activated_at_ms = updated.updated_at_ms;
            self.schedule_first_firing(id, &updated).await?;
        }
        Ok(self.campaigns.replace(id, &updated, current.revision).await?)
    }

    /// Runs an active on-demand campaign, now or at `request.at_ms`.
    pub async fn run(&self, id: &str, request: RunRequest) -> Result<Started, CampaignError> {
        let campaign = self.campaigns.get(id).await?.value;
        if campaign.trigger != Trigger::OnDemand {
            return Err(CampaignError::NotOnDemand { id: id.to_string() });
        }
        if campaign.state != CampaignState::Active {
            return Err(CampaignError::NotActive {
                id: id.to_string(),
                state: state_name(campaign.state),
            });
        }
        let run_id = run_id(&request.idempotency_key);
        let now = self.clock.now_ms();
        let at = request.at_ms.unwrap_or(now).max(now);
        let later = at > now + START_TOLERANCE_MS;
        let mut run = Run::new(
            if later { RunState::Scheduled } else { RunState::Running },
            at,
            self.partitions,
        );
        run.data = request.data;
        run.traceparent = request.traceparent;
        let (run, new) = self.runs.start(id, &run_id, &run).await?;
        if new {
            tracing::info!(campaign = %id, run = %run_id, scheduled = later, "run started");
        }
        Ok(Started { id: run_id, run, new })
    }

    /// Schedules the first firing of an interval campaign's chain of this generation; other
    /// triggers have no chain.
    async fn schedule_first_firing(
        &self,
        id: &str,
        campaign: &Campaign,
    ) -> Result<(), CampaignError> {
        let Some(timer) = first_firing(id, campaign, self.clock.now_ms())? else { return Ok(()) };
        let partition = partition_of(id, self.partitions);
        let entry = crate::inbox::new_id("in");
        self.state
            .write(vec![Write::inbox(partition, &entry, &InboxEntry::Schedule(timer))?])
            .await?;
        Ok(())
    }
}

/// Returns the id of a run started with this idempotency key: the same key names the same run,
/// and no key a new one.
pub fn run_id(idempotency_key: &str) -> String {
    if idempotency_key.is_empty() {
        return crate::inbox::new_id("r");
    }
    // FNV-1a: stable across versions and platforms, unlike the standard library's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in idempotency_key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("k-{hash:016x}")
}

/// Returns the timer of the first firing at or after `now` of an interval campaign's chain,
/// `None` for other triggers.
pub fn first_firing(
    id: &str,
    campaign: &Campaign,
    now: i64,
) -> Result<Option<Timer>, CampaignError> {
    let Trigger::Interval(trigger) = &campaign.trigger else { return Ok(None) };
    let schedule = trigger
        .schedule(campaign.activated_at_ms)
        .map_err(|reason| CampaignError::InvalidSchedule { id: id.to_string(), reason })?;
    let Some(first) = schedule.first_from(now) else {
        return Err(CampaignError::NoOccurrenceLeft { id: id.to_string() });
    };
    Ok(Some(Timer {
        id: format!("{id}-{}", campaign.generation),
        due_ms: first,
        kind: TimerKind::Interval {
            campaign: id.to_string(),
            occurrence_ms: first,
            generation: campaign.generation,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use CampaignState::*;

    #[test]
    fn a_campaign_moves_only_along_its_life_cycle() {
        let all = [Draft, Active, Paused, Completed, Archived];
        for from in all {
            for to in all {
                let expected = if from == to {
                    Change::Already
                } else if matches!((from, to), (Draft | Paused, Active) | (Active, Paused))
                    || to == Archived
                {
                    Change::Apply
                } else {
                    Change::Refused
                };
                assert_eq!(change(from, to), expected, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn nothing_returns_to_draft_and_only_the_engine_completes() {
        assert_eq!(change(Active, Draft), Change::Refused);
        assert_eq!(change(Archived, Draft), Change::Refused);
        assert_eq!(change(Active, Completed), Change::Refused);
        assert_eq!(change(Archived, Active), Change::Refused);
    }

    #[test]
    fn a_key_names_one_run_and_no_key_a_new_one() {
        assert_eq!(run_id("order-1"), run_id("order-1"));
        assert_ne!(run_id("order-1"), run_id("order-2"));
        assert_ne!(run_id(""), run_id(""));
        // Ids already given out by earlier versions stay the same.
        assert_eq!(run_id("a"), "k-af63dc4c8601ec8c");
    }

    #[test]
    fn only_drafts_and_archived_campaigns_can_be_deleted() {
        assert!(deletable(Draft));
        assert!(deletable(Archived));
        assert!(!deletable(Active));
        assert!(!deletable(Paused));
        assert!(!deletable(Completed));
    }
}
