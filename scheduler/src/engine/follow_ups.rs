//! Follow-ups: when a delivery of a campaign finishes, the follow-up campaigns after it start
//! a wait; when the wait ends, the follow-up is sent unless the contact interacted first.

use super::{CampaignEngine, Effects, EngineResult};
use crate::campaign::{CampaignState, Trigger};
use crate::cluster::PartitionId;
use crate::delivery::record::{self, Delivery, Status};
use crate::delivery::render::Context;
use crate::timers::{Timer, TimerKind};

impl CampaignEngine {
    /// Records a finished delivery in the contact's standing and starts the waits of the
    /// follow-up campaigns that follow it.
    pub(super) async fn finished(
        &self,
        partition: PartitionId,
        delivery: &Delivery,
        effects: &mut Effects,
    ) -> EngineResult {
        let status_name = if delivery.status == Status::Delivered { "delivered" } else { "failed" };
        let mut status =
            self.status(partition, &delivery.contact_id, &delivery.campaign_id).await?;
        status.last_status = status_name.to_string();
        status.last_delivery = delivery.id.clone();
        status.last_at_ms = delivery.updated_ms;
        status.sends += 1;
        self.save_status(partition, &delivery.contact_id, &delivery.campaign_id, status, effects)?;
        for (id, campaign) in self.campaigns.all() {
            let Trigger::FollowUp { after_campaign_id, on_status, delay_ms, .. } =
                &campaign.trigger
            else {
                continue;
            };
            if *after_campaign_id != delivery.campaign_id
                || campaign.state != CampaignState::Active
                || !on_status.iter().any(|s| s == status_name)
            {
                continue;
            }
            // The follow-up is named after the attempt that delivered. Interactions count from
            // the delivery's cause: a receiver can report a click before the outcome of an
            // attempt is recorded, or on a copy sent by a node that died before recording it,
            // whose next owner made the delivery again after the click.
            let since_ms = delivery.attempts.last().map_or(delivery.updated_ms, |a| a.start_ms);
            let origin_ms = record::id_time_ms(&delivery.id)
                .map_or(delivery.created_ms, |at| at.min(delivery.created_ms));
            tracing::debug!(campaign = %id, contact = %delivery.contact_id, delay_ms, "follow-up wait started");
            effects.timers.push(Timer {
                id: format!("f-{id}-{}", delivery.id),
                due_ms: delivery.updated_ms + *delay_ms as i64,
                kind: TimerKind::FollowUp {
                    campaign: id.clone(),
                    contact: delivery.contact_id.clone(),
                    after_campaign: delivery.campaign_id.clone(),
                    since_ms,
                    origin_ms,
                    traceparent: delivery.traceparent.clone(),
                },
            });
        }
        Ok(())
    }

    /// Ends a follow-up's wait: sends unless the contact interacted first.
    pub(super) async fn follow_up(
        &self,
        partition: PartitionId,
        id: &str,
        contact_id: &str,
        (after, since_ms, origin_ms, traceparent): (&str, i64, i64, &str),
        effects: &mut Effects,
    ) -> EngineResult {
        let from_ms = if origin_ms > 0 { origin_ms.min(since_ms) } else { since_ms };
        let Some(campaign) = self.campaign(id).await? else { return Ok(()) };
        let Trigger::FollowUp { unless_interactions, .. } = &campaign.trigger else {
            return Ok(());
        };
        if campaign.state != CampaignState::Active {
            return Ok(());
        }
        let status = self.status(partition, contact_id, after).await?;
        if let Some(kind) = unless_interactions
            .iter()
            .find(|k| status.interactions.get(*k).is_some_and(|at| *at >= from_ms))
        {
            tracing::info!(campaign = %id, contact = %contact_id, interaction = %kind, "follow-up not needed");
            return Ok(());
        }
        let own = self.status(partition, contact_id, id).await?;
        if own.exited_at_ms.is_some_and(|at| at >= from_ms) {
            tracing::info!(campaign = %id, contact = %contact_id, "follow-up cancelled by an exit event");
            return Ok(());
        }
        let contact = self.cached_contact(partition, contact_id).await?.view(contact_id);
        if contact["unsubscribed"] == serde_json::Value::Bool(true) {
            return Ok(());
        }
        if !self
            .rules_pass(partition, contact_id, &contact, &serde_json::Value::Null, &campaign)
            .await?
        {
            tracing::info!(campaign = %id, contact = %contact_id, "follow-up skipped: rule");
            return Ok(());
        }
        let across = self.across_caps();
        if !self.within_cap(partition, contact_id, id, &campaign, across, effects).await? {
            tracing::info!(campaign = %id, contact = %contact_id, "follow-up skipped: frequency cap");
            return Ok(());
        }
        let Some(webhook) = self.webhooks.get(&campaign.webhook_id) else { return Ok(()) };
        let context = Context {
            contact,
            event: serde_json::Value::Null,
            campaign: serde_json::json!({ "id": id, "data": campaign.data }),
            run: serde_json::Value::Null,
            delivery: serde_json::Value::Null,
        };
        tracing::info!(campaign = %id, contact = %contact_id, "follow-up sent");
        let origin = record::Origin {
            webhook_id: &campaign.webhook_id,
            campaign_id: id,
            contact_id,
            traceparent,
            ..Default::default()
        };
        self.deliver(
            partition,
            origin,
            &webhook,
            (since_ms, &format!("f/{id}/{contact_id}/{after}/{since_ms}")),
            self.window_opening(&campaign, &context.contact),
            context,
            effects,
        )
    }
}
