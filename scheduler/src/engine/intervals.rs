//! Interval campaigns: each firing starts the runs of the occurrences due (replaying missed
//! ones by the campaign's misfire policy) and registers the next firing.

use super::{CampaignEngine, Effects, EngineResult};
use crate::campaign::{CampaignState, Run, RunState, Trigger, interval_run_id};
use crate::cluster::PartitionId;
use crate::state::Write;
use crate::timers::{Timer, TimerKind};

/// Interval runs started by one firing; more missed occurrences continue in the next one.
const MAX_RUNS_PER_FIRING: usize = 40;

/// How long an interval timer waits for the activation that scheduled it to be stored; past
/// that, the activation did not happen and the chain ends.
const ACTIVATION_WAIT_MS: i64 = 60_000;

impl CampaignEngine {
    /// Fires an interval campaign's occurrence (and any missed ones its misfire policy
    /// replays) as runs, and registers the chain's next firing.
    pub(super) async fn interval(
        &self,
        partition: PartitionId,
        id: &str,
        occurrence_ms: i64,
        generation: u64,
        effects: &mut Effects,
    ) -> EngineResult {
        let Some(campaign) = self.campaign(id).await? else {
            tracing::debug!(campaign = %id, "interval chain of a deleted campaign ends");
            return Ok(());
        };
        let Trigger::Interval(trigger) = &campaign.trigger else { return Ok(()) };
        let now = self.clock.now_ms();
        if campaign.generation < generation && now - occurrence_ms < ACTIVATION_WAIT_MS {
            // An activation schedules its first timer just before it writes the campaign:
            // this one fell due in between, so it waits for the activation to be stored.
            effects.timers.push(Timer {
                id: format!("{id}-{generation}"),
                due_ms: now + 200,
                kind: TimerKind::Interval { campaign: id.to_string(), occurrence_ms, generation },
            });
            return Ok(());
        }
        if campaign.state != CampaignState::Active || campaign.generation != generation {
            tracing::debug!(campaign = %id, "interval chain of an earlier activation ends");
            return Ok(());
        }
        let schedule = match trigger.schedule(campaign.activated_at_ms) {
            Ok(schedule) => schedule,
            Err(reason) => {
                // Validation refuses such a schedule; one stored by an older version ends here.
                tracing::warn!(campaign = %id, %reason, "interval chain ends: invalid schedule");
                return Ok(());
            }
        };
        let firing = schedule.on_fire(occurrence_ms, now);
        // Each run takes two writes: a replay of many missed occurrences goes on from where
        // this transaction's share ends, through the interval's own timer due at once.
        let (fire, rest) = firing.fire.split_at(firing.fire.len().min(MAX_RUNS_PER_FIRING));
        for occurrence in fire {
            // The run starts through a timer due now, which fans it out in a transaction of
            // its own: a firing that replays missed occurrences stays within the store's limit
            // on writes per transaction.
            let mut run = Run::new(RunState::Scheduled, *occurrence, self.partitions);
            let run_id = interval_run_id(*occurrence);
            // Each occurrence starts a trace of its own, the parent of its run's attempts.
            let span = tracing::info_span!(
                target: "tidings::run",
                "interval occurrence",
                otel.kind = "internal",
                tidings.campaign.id = %id,
                tidings.run.id = %run_id,
            );
            run.traceparent = crate::telemetry::span_traceparent(&span).unwrap_or_default();
            tracing::info!(campaign = %id, run = %run_id, partition, lateness_ms = now - occurrence, "interval fired");
            effects.writes.push(Write::run(id, &run_id, &run)?);
            effects.timers.push(Timer {
                id: format!("r-{id}-{run_id}"),
                due_ms: now,
                kind: TimerKind::Run { campaign: id.to_string(), run: run_id },
            });
        }
        if let Some(next) = rest.first().copied().or(firing.next) {
            effects.timers.push(Timer {
                id: format!("{id}-{generation}"),
                due_ms: next,
                kind: TimerKind::Interval {
                    campaign: id.to_string(),
                    occurrence_ms: next,
                    generation,
                },
            });
        }
        Ok(())
    }
}
