//! Runs: a run starts, fans out one shard per partition, and each shard evaluates its
//! partition's contacts page by page against the audience, rules and caps; the shard's
//! counters are kept here.

use opentelemetry::KeyValue;

use super::{CampaignEngine, Effects, EngineResult, ShardId};
use crate::campaign::{CampaignState, Run, RunState};
use crate::cluster::PartitionId;
use crate::defs::DefsError;
use crate::delivery::record::{self};
use crate::delivery::render::Context;
use crate::state::Write;
use crate::timers::{Timer, TimerKind};

/// Writes a batch of a run shard may add (each send takes two or three), leaving room in the
/// transaction for the shard's own bookkeeping.
const RUN_OPS: usize = 100;

/// Contacts read per batch of a run shard: most may fall outside the audience.
const EVAL_PAGE: usize = 1000;

impl CampaignEngine {
    /// Returns a run's counters in one partition; a shard not written yet starts at zero.
    pub(super) async fn shard(&self, key: &ShardId) -> EngineResult<crate::campaign::Shard> {
        if let Some(shard) = self.shards.lock().unwrap_or_else(|p| p.into_inner()).get(key) {
            return Ok(shard.clone());
        }
        let (campaign, run, partition) = key;
        Ok(self.state.shard(campaign, run, *partition).await?.unwrap_or_default())
    }

    /// Writes a run shard's counters, and keeps them for the next reads of this owner.
    pub(super) fn save_shard(
        &self,
        key: ShardId,
        mut shard: crate::campaign::Shard,
        effects: &mut Effects,
    ) -> EngineResult {
        shard.changed_ms = self.clock.now_ms();
        effects.writes.push(Write::shard(&key.0, &key.1, key.2, &shard)?);
        self.shards.lock().unwrap_or_else(|p| p.into_inner()).insert(key, shard);
        Ok(())
    }

    /// Starts a run scheduled for later, when its timer falls due: the run is marked running
    /// and fanned out to every partition.
    pub(super) async fn start_scheduled_run(
        &self,
        partition: PartitionId,
        campaign: &str,
        run: &str,
        effects: &mut Effects,
    ) -> EngineResult {
        let Some(mut record) = self.state.run(campaign, run).await? else {
            tracing::debug!(campaign = %campaign, run = %run, "scheduled run was deleted");
            return Ok(());
        };
        if record.state == RunState::Scheduled {
            record.state = RunState::Running;
            record.started_ms = Some(self.clock.now_ms());
            tracing::info!(campaign = %campaign, run = %run, partition, "scheduled run started");
            effects.writes.push(Write::run(campaign, run, &record)?);
            effects.writes.extend(crate::campaign::fan_out(
                campaign,
                run,
                0,
                self.partitions,
                partition,
            )?);
        }
        Ok(())
    }

    /// Goes on writing a run's shard entries from partition `from`.
    pub(super) async fn continue_fan_out(
        &self,
        partition: PartitionId,
        campaign: &str,
        run: &str,
        from: u32,
        effects: &mut Effects,
    ) -> EngineResult {
        effects.writes.extend(crate::campaign::fan_out(
            campaign,
            run,
            from,
            self.partitions,
            partition,
        )?);
        Ok(())
    }

    /// Evaluates the next page of a run's audience in this partition: each contact inside it
    /// is sent to or counted as skipped with its reason.
    pub(super) async fn evaluate_shard(
        &self,
        partition: PartitionId,
        campaign_id: &str,
        run_id: &str,
        after: &str,
        effects: &mut Effects,
    ) -> EngineResult {
        let Some(campaign) = self.campaign(campaign_id).await? else {
            tracing::debug!(campaign = %campaign_id, run = %run_id, "run of a deleted campaign ends");
            return Ok(());
        };
        let shard_key = (campaign_id.to_string(), run_id.to_string(), partition);
        let mut shard = self.shard(&shard_key).await?;
        if shard.done {
            return Ok(());
        }
        let run: Option<Run> = self.state.run(campaign_id, run_id).await?;
        let run_data = run.as_ref().map(|r| r.data.clone()).unwrap_or_default();
        // A paused run's shards wait on a timer and look again; a cancelled run's shards
        // stop where they are.
        match run.as_ref().map(|r| r.state) {
            Some(RunState::Paused) => {
                effects.timers.push(Timer {
                    id: format!("rs-{run_id}"),
                    due_ms: self.clock.now_ms() + 1000,
                    kind: TimerKind::RunShard {
                        campaign: campaign_id.to_string(),
                        run: run_id.to_string(),
                        after: after.to_string(),
                    },
                });
                return Ok(());
            }
            Some(RunState::Cancelled) => {
                shard.done = true;
                return self.save_shard(shard_key, shard, effects);
            }
            _ => {}
        }
        let Some(webhook) = self.webhooks.get(&campaign.webhook_id) else {
            shard.done = true;
            return self.save_shard(shard_key, shard, effects);
        };
        let segment_filter = if campaign.audience.segment_id.is_empty() {
            String::new()
        } else {
            // A deleted segment selects nobody.
            match self.segment_defs.get(&campaign.audience.segment_id).await {
                Ok(segment) => segment.value.filter,
                Err(DefsError::NotFound { .. }) => "false".into(),
                Err(error) => return Err(error.into()),
            }
        };
        let after_id = crate::state::resume_after(partition, after);
        self.contacts.start(&self.state, partition);
        let page = match self.contacts.page(partition, after_id, EVAL_PAGE) {
            Some(page) => page,
            None => {
                let page = self.state.contacts_after(partition, after_id, EVAL_PAGE).await?;
                crate::contact::CachedPage { contacts: page.contacts, more: page.more }
            }
        };
        let active = campaign.state == CampaignState::Active
            && run.as_ref().is_some_and(|r| r.state == RunState::Running);
        let run_view = serde_json::json!({ "id": run_id, "data": run_data });
        let across = self.across_caps();
        let campaign_view = serde_json::json!({ "id": campaign_id, "data": campaign.data });
        let run_time_ms = run.as_ref().map_or(0, |r| r.started_ms.unwrap_or(r.scheduled_ms));
        let traceparent = run.as_ref().map_or("", |r| r.traceparent.as_str());
        let counted = (shard.queued, shard.skipped.values().sum::<u64>());
        let mut last = None;
        let mut more = page.more;
        for (i, (contact_id, contact)) in page.contacts.iter().enumerate() {
            // Each send adds a few writes to the batch: stop at a page of sends and go on
            // from here in the next entry.
            if effects.op_count() + 3 > RUN_OPS {
                more = true;
                break;
            }
            last = Some(i);
            let contact_id = contact_id.as_str();
            let view = contact.view(contact_id);
            let vars = [("contact", &view)];
            let inside = |source: &str| source.is_empty() || self.holds(source, &vars);
            if !inside(&segment_filter) || !inside(&campaign.audience.filter) {
                continue;
            }
            shard.audience += 1;
            let skip = if !active {
                Some("campaign_not_active")
            } else if contact.unsubscribed {
                Some("unsubscribed")
            } else {
                None
            };
            if let Some(reason) = skip {
                *shard.skipped.entry(reason.to_string()).or_default() += 1;
                continue;
            }
            if !self
                .rules_pass(partition, contact_id, &view, &serde_json::Value::Null, &campaign)
                .await?
            {
                *shard.skipped.entry("rule".to_string()).or_default() += 1;
                continue;
            }
            if !self
                .within_cap(partition, contact_id, campaign_id, &campaign, across, effects)
                .await?
            {
                *shard.skipped.entry("frequency_cap".to_string()).or_default() += 1;
                continue;
            }
            let context = Context {
                contact: view.clone(),
                event: serde_json::Value::Null,
                campaign: campaign_view.clone(),
                run: run_view.clone(),
                delivery: serde_json::Value::Null,
            };
            shard.queued += 1;
            let origin = record::Origin {
                webhook_id: &campaign.webhook_id,
                campaign_id,
                run_id,
                contact_id,
                traceparent,
                ..Default::default()
            };
            self.deliver(
                partition,
                origin,
                &webhook,
                (run_time_ms, &format!("r/{run_id}/{contact_id}")),
                self.window_opening(&campaign, &context.contact),
                context,
                effects,
            )?;
        }
        match last.map(|i| &page.contacts[i].0) {
            Some(last) if more => {
                effects.writes.push(crate::campaign::fan_out_one(
                    campaign_id,
                    run_id,
                    partition,
                    last,
                )?);
            }
            _ => shard.done = true,
        }
        run_contacts(campaign_id, "queued", shard.queued - counted.0);
        run_contacts(campaign_id, "skipped", shard.skipped.values().sum::<u64>() - counted.1);
        self.save_shard(shard_key, shard, effects)
    }
}

/// Counts `count` contacts of a campaign's runs with this outcome.
pub(super) fn run_contacts(campaign: &str, outcome: &'static str, count: u64) {
    if count > 0 {
        crate::telemetry::metrics().run_contacts.add(
            count,
            &[
                KeyValue::new("tidings.campaign.id", campaign.to_string()),
                KeyValue::new("outcome", outcome),
            ],
        );
    }
}
