//! A contact's standing in each campaign (last status, sends, interactions, exits), and the
//! guards that read it before every send: business rules, frequency caps and send windows.

use super::{CampaignEngine, Effects, EngineResult};
use crate::campaign::{Campaign, CampaignState};
use crate::cluster::PartitionId;
use crate::delivery::dispatch::Outcome;
use crate::state::Write;

impl CampaignEngine {
    /// Returns a contact's standing in a campaign: this owner's latest write, or the stored one.
    pub(super) async fn status(
        &self,
        partition: PartitionId,
        contact: &str,
        campaign: &str,
    ) -> EngineResult<crate::status::CampaignStatus> {
        let key = (partition, contact.to_string(), campaign.to_string());
        if let Some(status) = self.statuses.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(status.clone());
        }
        // No standing yet: the contact has had nothing from the campaign.
        Ok(self.state.standing(partition, contact, campaign).await?.unwrap_or_default())
    }

    /// Writes a contact's standing in a campaign, and keeps it in the cache.
    pub(super) fn save_status(
        &self,
        partition: PartitionId,
        contact: &str,
        campaign: &str,
        status: crate::status::CampaignStatus,
        effects: &mut Effects,
    ) -> EngineResult {
        effects.writes.push(Write::standing(partition, contact, campaign, &status)?);
        let key = (partition, contact.to_string(), campaign.to_string());
        self.statuses.lock().unwrap_or_else(|p| p.into_inner()).insert(key, status);
        Ok(())
    }

    /// Returns the contact's standing in every campaign it has one in, by campaign id: the
    /// store's copy overlaid with this owner's newer writes.
    pub(super) async fn standings(
        &self,
        partition: PartitionId,
        contact: &str,
    ) -> EngineResult<std::collections::BTreeMap<String, crate::status::CampaignStatus>> {
        let mut standings: std::collections::BTreeMap<_, _> =
            self.state.standings(partition, contact).await?.into_iter().collect();
        let cached = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        let from = (partition, contact.to_string(), String::new());
        for ((p, c, campaign), status) in cached.range(from..) {
            if *p != partition || c != contact {
                break;
            }
            standings.insert(campaign.clone(), status.clone());
        }
        Ok(standings)
    }

    /// Returns whether any active campaign caps sends across campaigns: then every send is
    /// recorded in the contact's standing, so that the cap can count it.
    pub(super) fn across_caps(&self) -> bool {
        self.campaigns.all().iter().any(|(_, c)| {
            c.state == CampaignState::Active
                && c.frequency_cap.as_ref().is_some_and(|cap| cap.across_campaigns)
        })
    }

    /// Returns false (and records nothing) when a frequency cap is reached for the contact:
    /// the campaign's own, or one counting the sends of every campaign. Otherwise records this
    /// send in the contact's standing when some cap needs it, and returns true.
    pub(super) async fn within_cap(
        &self,
        partition: PartitionId,
        contact: &str,
        id: &str,
        campaign: &Campaign,
        across_caps: bool,
        effects: &mut Effects,
    ) -> EngineResult<bool> {
        let cap = campaign.frequency_cap.as_ref().filter(|c| c.max_sends > 0);
        if cap.is_none() && !across_caps {
            return Ok(true);
        }
        let now = self.clock.now_ms();
        let mut status = self.status(partition, contact, id).await?;
        if let Some(cap) = cap {
            let since = now - cap.period_ms as i64;
            let sends = if cap.across_campaigns {
                let standings = self.standings(partition, contact).await?;
                standings.values().flat_map(|s| &s.sent_at_ms).filter(|at| **at > since).count()
            } else {
                status.sent_at_ms.iter().filter(|at| **at > since).count()
            };
            if sends >= cap.max_sends as usize {
                return Ok(false);
            }
        }
        status.sent_at_ms.retain(|at| now - at < crate::status::SEND_HISTORY_MS);
        let excess = status.sent_at_ms.len().saturating_sub(crate::status::SEND_HISTORY - 1);
        status.sent_at_ms.drain(..excess);
        status.sent_at_ms.push(now);
        self.save_status(partition, contact, id, status, effects)?;
        Ok(true)
    }

    /// Returns whether every business rule of the campaign holds for the contact. Rules see
    /// `contact`, `event` (null outside event campaigns) and `campaigns`: the contact's standing
    /// in every campaign by id (`last_status`, `last_at_ms`, `sends`, `interactions`).
    pub(super) async fn rules_pass(
        &self,
        partition: PartitionId,
        contact_id: &str,
        contact: &serde_json::Value,
        event: &serde_json::Value,
        campaign: &Campaign,
    ) -> EngineResult<bool> {
        if campaign.rules.is_empty() {
            return Ok(true);
        }
        let mut standings = serde_json::Map::new();
        for (id, status) in self.standings(partition, contact_id).await? {
            // A standing is strings and numbers only, so it always has a JSON form.
            if let Ok(value) = serde_json::to_value(status) {
                standings.insert(id, value);
            }
        }
        let campaigns = serde_json::Value::Object(standings);
        let vars = [("contact", contact), ("event", event), ("campaigns", &campaigns)];
        Ok(campaign.rules.iter().all(|rule| self.holds(rule, &vars)))
    }

    /// Returns when a send to the contact may happen under the campaign's send window, if
    /// that is later than now.
    pub(super) fn window_opening(
        &self,
        campaign: &Campaign,
        contact: &serde_json::Value,
    ) -> Option<i64> {
        let window = campaign.send_window.as_ref()?;
        let tz = crate::schedule::parse_timezone(contact["timezone"].as_str().unwrap_or_default())
            .ok()?;
        let now = self.clock.now_ms();
        let window = crate::schedule::Window {
            days: window.days.clone(),
            start_minute: window.start_minute,
            end_minute: window.end_minute,
        };
        let opening = window.next_open(&tz, now);
        (opening > now).then_some(opening)
    }

    /// Records an interaction in the contact's standing in the campaign it names, directly or
    /// through one of its deliveries; the latest time of each kind is kept.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn record_interaction(
        &self,
        partition: PartitionId,
        contact: &str,
        campaign: &str,
        delivery: &str,
        kind: &str,
        at_ms: i64,
        effects: &mut Effects,
    ) -> EngineResult {
        let (contact, campaign) = if delivery.is_empty() {
            (contact.to_string(), campaign.to_string())
        } else {
            match self.read_delivery(partition, delivery).await? {
                Some(found) => (found.contact_id, found.campaign_id),
                None => {
                    tracing::info!(delivery, "interaction for an unknown delivery ignored");
                    return Ok(());
                }
            }
        };
        if campaign.is_empty() {
            return Ok(());
        }
        let mut status = self.status(partition, &contact, &campaign).await?;
        let latest = status.interactions.entry(kind.to_string()).or_insert(at_ms);
        *latest = (*latest).max(at_ms);
        tracing::debug!(%contact, %campaign, kind, "interaction recorded");
        self.save_status(partition, &contact, &campaign, status, effects)
    }

    /// Reads the standings a batch of outcomes will update in one round trip.
    pub(super) async fn read_ahead_standings(
        &self,
        partition: PartitionId,
        outcomes: &[Outcome],
        at_least: crate::store::Revision,
    ) {
        let mut pairs: Vec<(String, String)> = {
            let cached = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
            outcomes
                .iter()
                .map(|o| &o.job.delivery)
                .filter(|d| !d.campaign_id.is_empty())
                .map(|d| (d.contact_id.clone(), d.campaign_id.clone()))
                .filter(|(contact, campaign)| {
                    !cached.contains_key(&(partition, contact.clone(), campaign.clone()))
                })
                .collect()
        };
        pairs.sort_unstable();
        pairs.dedup();
        if pairs.is_empty() {
            return;
        }
        let Ok(found) = self.state.standings_of(partition, &pairs, at_least).await else { return };
        let mut cached = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        for ((contact, campaign), status) in pairs.into_iter().zip(found) {
            // A standing that does not decode is left for the outcome to read, and fail on.
            let Ok(status) = status else { continue };
            // This owner's own writes are newer than anything read here.
            cached.entry((partition, contact, campaign)).or_insert(status.unwrap_or_default());
        }
    }
}
