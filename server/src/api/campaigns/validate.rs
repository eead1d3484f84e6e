//! Checks of a campaign beyond its fields' own form: names and expressions, and what needs
//! the stored definitions (the webhook, the segment, the campaigns a rule or a follow-up
//! names, cycles and the number of follow-ups).

use tidings_scheduler::campaign::{Campaign, Trigger};
use tidings_scheduler::defs::DefsError;
use tidings_scheduler::rules;

use super::CampaignApi;
use crate::api::{ApiError, Violations};

pub(super) const DAY_MS: u64 = 24 * 3600 * 1000;
/// A scheduled time this far in the past is a mistake, not clock skew.
pub(super) const PAST_TOLERANCE_MS: i64 = 1000;
/// Longest follow-up chain followed when looking for a cycle.
const MAX_CHAIN: usize = 64;
/// Follow-up campaigns one campaign may have: a delivery starts all their waits in one
/// transaction, which holds at most 128 writes.
const MAX_FOLLOW_UPS: usize = 64;
pub(super) const WRITABLE: [&str; 13] = [
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

pub(super) fn check_kind(violations: &mut Violations, field: &str, value: &str) {
    if value.is_empty()
        || value.len() > 128
        || !value.chars().all(|c| c.is_ascii_alphanumeric() || ".:_-".contains(c))
    {
        violations.add(field, "must be 1 to 128 letters, digits, '.', ':', '_' or '-'");
    }
}

pub(super) fn check_cel(violations: &mut Violations, field: &str, source: &str) {
    if let Err(reason) = rules::check(source) {
        violations.add(field, format!("invalid CEL: {reason}"));
    }
}

pub(super) fn parse_minute(violations: &mut Violations, field: &str, value: &str) -> u32 {
    let parsed = value.split_once(':').and_then(|(h, m)| {
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60 && value.len() == 5).then_some(h * 60 + m)
    });
    parsed.unwrap_or_else(|| {
        violations.add(field, "must be a time of day HH:MM, for example 09:00");
        0
    })
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

/// Returns the campaign ids a rule reads through `campaigns["id"]`, `campaigns['id']` or
/// `campaigns.id`.
pub(super) fn campaigns_named(rule: &str) -> Vec<String> {
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

impl CampaignApi {
    /// Checks what needs the store: the webhook, the segment, the campaign followed.
    pub(super) async fn check_references(
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
}
