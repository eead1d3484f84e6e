//! Events: exit events end follow-up waits, and each active event campaign whose filter,
//! audience, rules and caps hold for the contact gets a delivery.

use std::sync::Arc;

use super::{CampaignEngine, Effects, EngineResult};
use crate::campaign::{Campaign, CampaignState, Trigger};
use crate::cluster::PartitionId;
use crate::delivery::record::{self};
use crate::delivery::render::Context;
use crate::inbox::Event;
use crate::state::Write;

/// Writes the campaigns of one event may add before the rest continue in a new inbox entry.
const EVENT_OPS: usize = 100;

impl CampaignEngine {
    /// Handles one event: its exit events first, then every matching campaign, continuing in
    /// a new inbox entry when the transaction would grow too large.
    pub(super) async fn handle_event(
        &self,
        partition: PartitionId,
        event: &Event,
        effects: &mut Effects,
    ) -> EngineResult {
        let now = self.clock.now_ms();
        // Exit events end the contact's pending follow-ups of the campaigns that list them, in
        // id order; when they do not all fit one transaction, the rest and the event's own
        // campaigns continue in a new inbox entry.
        if event.resume_after.is_none() {
            let mut exits: Vec<String> = self
                .campaigns
                .all()
                .into_iter()
                .filter(|(id, campaign)| {
                    campaign.exit_events.contains(&event.kind)
                        && event.exits_after.as_ref().is_none_or(|after| id > after)
                })
                .map(|(id, _)| id)
                .collect();
            exits.sort();
            let mut last: Option<&str> = None;
            for id in &exits {
                if let Some(last) = last
                    && effects.op_count() + 2 > EVENT_OPS
                {
                    let mut rest = event.clone();
                    rest.exits_after = Some(last.to_string());
                    effects.writes.push(Write::inbox(
                        partition,
                        &format!("{}-exit-{id}", event.id),
                        &crate::inbox::InboxEntry::Event(rest),
                    )?);
                    tracing::debug!(event = %event.id, after = last, "exits continue in a new entry");
                    return Ok(());
                }
                last = Some(id);
                let mut status = self.status(partition, &event.contact_id, id).await?;
                status.exited_at_ms = Some(now);
                self.save_status(partition, &event.contact_id, id, status, effects)?;
            }
        }
        let mut matching: Vec<(String, Arc<Campaign>)> = self
            .campaigns
            .all()
            .into_iter()
            .filter(|(_, c)| {
                c.state == CampaignState::Active
                    && matches!(&c.trigger, Trigger::Event { event_type, .. } if *event_type == event.kind)
                    && c.start_ms.is_none_or(|start| now >= start)
                    && c.end_ms.is_none_or(|end| now < end)
            })
            .collect();
        if matching.is_empty() {
            return Ok(());
        }
        matching.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(after) = &event.resume_after {
            matching.retain(|(id, _)| id > after);
        }
        let contact =
            self.fresh_contact(partition, &event.contact_id).await?.view(&event.contact_id);
        let event_view = serde_json::json!({
            "id": event.id,
            "type": event.kind,
            "data": event.data,
            "occurred_at": chrono::DateTime::from_timestamp_millis(event.occurred_ms).map(|t| t.to_rfc3339()),
        });
        let across = self.across_caps();
        let mut handled: Option<&str> = None;
        for (campaign_id, campaign) in &matching {
            // A send takes up to three writes; when the transaction is nearly full, the rest
            // of the campaigns get the event again as a new inbox entry.
            if let Some(last) = handled
                && effects.op_count() + 4 > EVENT_OPS
            {
                let mut rest = event.clone();
                rest.resume_after = Some(last.to_string());
                let id = format!("{}-{}", event.id, campaign_id);
                effects.writes.push(Write::inbox(
                    partition,
                    &id,
                    &crate::inbox::InboxEntry::Event(rest),
                )?);
                tracing::debug!(event = %event.id, after = last, "event continues in a new entry");
                return Ok(());
            }
            handled = Some(campaign_id);
            let (campaign_id, campaign) = (campaign_id.clone(), campaign.clone());
            if contact["unsubscribed"] == serde_json::Value::Bool(true) {
                continue;
            }
            let vars = [("event", &event_view), ("contact", &contact)];
            let passes = |source: &str| source.is_empty() || self.holds(source, &vars);
            let Trigger::Event { filter, .. } = &campaign.trigger else { continue };
            if !passes(filter) || !passes(&campaign.audience.filter) {
                continue;
            }
            let Some(webhook) = self.webhooks.get(&campaign.webhook_id) else {
                tracing::warn!(campaign = %campaign_id, webhook = %campaign.webhook_id, "the campaign's webhook does not exist");
                continue;
            };
            if !self
                .rules_pass(partition, &event.contact_id, &contact, &event_view, &campaign)
                .await?
            {
                tracing::debug!(campaign = %campaign_id, contact = %event.contact_id, "skipped: rule");
                continue;
            }
            if !self
                .within_cap(partition, &event.contact_id, &campaign_id, &campaign, across, effects)
                .await?
            {
                tracing::debug!(campaign = %campaign_id, contact = %event.contact_id, "skipped: frequency cap");
                continue;
            }
            let context = Context {
                contact: contact.clone(),
                event: event_view.clone(),
                campaign: serde_json::json!({ "id": campaign_id, "data": campaign.data }),
                run: serde_json::Value::Null,
                delivery: serde_json::Value::Null,
            };
            let origin = record::Origin {
                webhook_id: &campaign.webhook_id,
                campaign_id: &campaign_id,
                contact_id: &event.contact_id,
                event_id: &event.id,
                traceparent: &event.traceparent,
                ..Default::default()
            };
            self.deliver(
                partition,
                origin,
                &webhook,
                (event.accepted_ms, &format!("e/{}/{campaign_id}", event.id)),
                self.window_opening(&campaign, &context.contact),
                context,
                effects,
            )?;
        }
        Ok(())
    }

    /// Reads the contacts of a batch of events in one round trip, for `fresh_contact`.
    pub(super) async fn read_ahead_contacts(
        &self,
        partition: PartitionId,
        events: &[&Event],
        at_least: crate::store::Revision,
    ) {
        let mut ids: Vec<&str> = events.iter().map(|e| e.contact_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        // What cannot be read or decoded here is left out: each such event reads its contact
        // itself, and fails with the error rather than treating the contact as absent.
        let found = self.state.contacts(partition, &ids, at_least).await.unwrap_or_default();
        let contacts = found
            .into_iter()
            .filter_map(|(id, contact)| contact.ok().map(|contact| (id, contact)))
            .collect();
        self.prefetched.lock().unwrap_or_else(|p| p.into_inner()).insert(partition, contacts);
    }
}
