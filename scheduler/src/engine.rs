//! The seam between the partition machinery and what events and timers mean.
//!
//! A partition worker hands each event and each due timer to the [`Engine`], which says what
//! to write in return; the worker commits those writes together with the removal of the inbox
//! entry or timer, in one transaction guarded by its epoch. An engine never writes partition
//! state itself, so fencing covers everything it decides.

use crate::cluster::PartitionId;
use crate::inbox::Event;
use crate::store::Op;
use crate::timers::Timer;

/// The writes an engine asks for.
#[derive(Debug, Default)]
pub struct Effects {
    /// Writes to commit with the batch.
    pub ops: Vec<Op>,
    /// Timers to add to the same partition (they get keys and join the in-memory index).
    pub timers: Vec<Timer>,
}

impl Effects {
    /// Returns how many store operations these effects take.
    pub fn op_count(&self) -> usize {
        self.ops.len() + self.timers.len()
    }
}

/// Decides the consequences of events and timers.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Handles one accepted event of `partition`.
    async fn on_event(&self, partition: PartitionId, event: &Event, effects: &mut Effects);

    /// Handles one due timer of `partition`.
    async fn on_timer(&self, partition: PartitionId, timer: &Timer, effects: &mut Effects);
}

/// An engine that consumes events and timers without consequences.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopEngine;

#[async_trait::async_trait]
impl Engine for NoopEngine {
    async fn on_event(&self, _partition: PartitionId, _event: &Event, _effects: &mut Effects) {}

    async fn on_timer(&self, _partition: PartitionId, _timer: &Timer, _effects: &mut Effects) {}
}

/// The engine of a node: interval campaigns fire runs, scheduled runs start.
pub struct CampaignEngine {
    campaigns: crate::defs::Definitions<crate::campaign::Campaign>,
    partitions: u32,
}

impl std::fmt::Debug for CampaignEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CampaignEngine").finish_non_exhaustive()
    }
}

impl CampaignEngine {
    /// Returns an engine over the campaign definitions.
    pub fn new(
        campaigns: crate::defs::Definitions<crate::campaign::Campaign>,
        partitions: u32,
    ) -> Self {
        Self { campaigns, partitions }
    }

    /// Reads a campaign; a failed read is retried, since dropping a timer would lose a firing.
    async fn campaign(&self, id: &str) -> Option<crate::campaign::Campaign> {
        let mut pause = std::time::Duration::from_millis(50);
        for _ in 0..20 {
            match self.campaigns.get(id).await {
                Ok(found) => return Some(found.value),
                Err(crate::defs::DefsError::NotFound { .. }) => return None,
                Err(error) => {
                    tracing::debug!(campaign = id, %error, "cannot read the campaign; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(1));
                }
            }
        }
        None
    }
}

#[async_trait::async_trait]
impl Engine for CampaignEngine {
    async fn on_event(&self, _partition: PartitionId, _event: &Event, _effects: &mut Effects) {}

    async fn on_timer(&self, partition: PartitionId, timer: &Timer, effects: &mut Effects) {
        use crate::campaign::{CampaignState, Run, RunState, Trigger, interval_run_id, run_key};
        use crate::timers::TimerKind;
        match &timer.kind {
            TimerKind::Interval { campaign: id, occurrence_ms, generation } => {
                let Some(campaign) = self.campaign(id).await else { return };
                let Trigger::Interval(trigger) = &campaign.trigger else { return };
                if campaign.state != CampaignState::Active || campaign.generation != *generation {
                    tracing::debug!(campaign = %id, "interval chain of an earlier activation ends");
                    return;
                }
                let Ok(schedule) = trigger.schedule(campaign.activated_at_ms) else { return };
                let now = crate::now_ms();
                let firing = schedule.on_fire(*occurrence_ms, now);
                for occurrence in &firing.fire {
                    let mut run = Run::new(RunState::Running, *occurrence, self.partitions);
                    run.started_ms = Some(now);
                    let run_id = interval_run_id(*occurrence);
                    tracing::info!(campaign = %id, run = %run_id, partition, lateness_ms = now - occurrence, "interval fired");
                    effects.ops.push(crate::store::Op::put(
                        run_key(id, &run_id),
                        serde_json::to_vec(&run).unwrap_or_default(),
                    ));
                }
                if let Some(next) = firing.next {
                    effects.timers.push(Timer {
                        id: format!("{id}-{generation}"),
                        due_ms: next,
                        kind: TimerKind::Interval {
                            campaign: id.clone(),
                            occurrence_ms: next,
                            generation: *generation,
                        },
                    });
                }
            }
            TimerKind::Run { campaign, run } => {
                let key = run_key(campaign, run);
                let Ok(Some(kv)) = self.campaigns_store_get(&key).await else { return };
                let Ok(mut record) = serde_json::from_slice::<Run>(&kv) else { return };
                if record.state == RunState::Scheduled {
                    record.state = RunState::Running;
                    record.started_ms = Some(crate::now_ms());
                    tracing::info!(campaign = %campaign, run = %run, partition, "scheduled run started");
                    effects.ops.push(crate::store::Op::put(
                        key,
                        serde_json::to_vec(&record).unwrap_or_default(),
                    ));
                }
            }
        }
    }
}

impl CampaignEngine {
    async fn campaigns_store_get(
        &self,
        key: &str,
    ) -> Result<Option<Vec<u8>>, crate::store::StoreError> {
        Ok(self.campaigns.store().get(key.as_bytes()).await?.map(|kv| kv.value))
    }
}
