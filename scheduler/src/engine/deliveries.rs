//! The delivery life cycle: a delivery is rendered and its first attempt dispatched (or
//! deferred to the send window), each outcome is recorded with the retry schedule's next
//! attempt or the final status, a lost attempt is sent again when its visibility timer fires,
//! and finished deliveries are swept once their retention ends.

use opentelemetry::KeyValue;

use super::runs::run_contacts;
use super::{CampaignEngine, Effects, EngineResult};
use crate::cluster::PartitionId;
use crate::delivery::dispatch::{Job, Outcome};
use crate::delivery::record::{self, Attempt, Delivery, ErrorClass, Status, StoredRequest};
use crate::delivery::render::Context;
use crate::delivery::retry::{self, Verdict};
use crate::state::{TimerRef, Write};
use crate::timers::{Timer, TimerKind};
use crate::webhook::Webhook;

/// Extra time after an attempt's timeout before the attempt counts as lost.
const VISIBILITY_MARGIN_MS: i64 = 5_000;

impl CampaignEngine {
    /// Renders a webhook's request for a delivery; the reason when it does not render.
    fn render(&self, webhook: &Webhook, context: &Context) -> Result<StoredRequest, String> {
        crate::delivery::render::request(&self.templates, &self.cipher, webhook, context)
    }

    /// Creates a delivery of `webhook` and, when it renders, dispatches its first attempt.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn deliver(
        &self,
        partition: PartitionId,
        origin: record::Origin<'_>,
        webhook: &Webhook,
        cause: (i64, &str),
        defer_until: Option<i64>,
        mut context: Context,
        effects: &mut Effects,
    ) -> EngineResult {
        let now = self.clock.now_ms();
        let id = record::derived_id(partition, cause.0, cause.1);
        context.delivery = serde_json::json!({ "id": id });
        let campaign_id = origin.campaign_id;
        let mut delivery = Delivery::new(id.clone(), partition, origin, now);
        match self.render(webhook, &context) {
            Ok(request) => {
                delivery.request = Some(request);
                match defer_until {
                    // Outside the send window: wait for it to open, never drop.
                    Some(at) => self.schedule_attempt(delivery, at, effects),
                    None => self.start_attempt(partition, delivery, webhook, effects),
                }
            }
            Err(reason) => {
                tracing::info!(delivery = %id, campaign = campaign_id, %reason, "render failed");
                delivery.status = Status::Failed;
                delivery.attempts.push(Attempt {
                    start_ms: now,
                    duration_ms: 0,
                    status_code: 0,
                    error_class: ErrorClass::Render,
                    error: reason.clone(),
                    response_headers: Default::default(),
                    response_body: Vec::new(),
                    node: String::new(),
                });
                delivery.reason = reason;
                self.finish(&delivery, effects)
            }
        }
    }

    /// Marks a delivery as sending, sets its visibility timer and asks for the attempt.
    pub(super) fn start_attempt(
        &self,
        partition: PartitionId,
        mut delivery: Delivery,
        webhook: &Webhook,
        effects: &mut Effects,
    ) -> EngineResult {
        let now = self.clock.now_ms();
        delivery.status = Status::Sending;
        delivery.dispatch_seq += 1;
        delivery.next_attempt_ms = None;
        delivery.updated_ms = now;
        let due = now + webhook.timeout_ms as i64 + VISIBILITY_MARGIN_MS;
        let timer = Timer {
            id: delivery.id.clone(),
            due_ms: due,
            kind: TimerKind::Attempt { delivery: delivery.id.clone() },
        };
        let visibility = TimerRef::of(partition, &timer);
        effects.writes.push(put_delivery(&delivery)?);
        effects.timers.push(timer);
        effects.dispatch.push(Job { delivery, visibility });
        Ok(())
    }

    /// Schedules the next attempt of a pending delivery at `due`.
    pub(super) fn schedule_attempt(
        &self,
        mut delivery: Delivery,
        due: i64,
        effects: &mut Effects,
    ) -> EngineResult {
        delivery.status = Status::Pending;
        delivery.next_attempt_ms = Some(due);
        delivery.updated_ms = self.clock.now_ms();
        effects.timers.push(Timer {
            id: delivery.id.clone(),
            due_ms: due,
            kind: TimerKind::Attempt { delivery: delivery.id.clone() },
        });
        effects.writes.push(put_delivery(&delivery)?);
        Ok(())
    }

    /// Deletes a delivery whose retention ended, when its timer falls due.
    pub(super) async fn expire(
        &self,
        partition: PartitionId,
        delivery: &str,
        effects: &mut Effects,
    ) -> EngineResult {
        let Some(found) = self.read_delivery(partition, delivery).await? else {
            return Ok(());
        };
        if self.expired(&found, self.clock.now_ms()) {
            effects.writes.push(Write::remove_delivery(partition, delivery));
        }
        Ok(())
    }

    /// Starts a pending delivery's attempt when its timer falls due, or again when its
    /// visibility timer fires because the attempt in flight was lost.
    pub(super) async fn attempt_due(
        &self,
        partition: PartitionId,
        delivery: &str,
        effects: &mut Effects,
    ) -> EngineResult {
        let Some(delivery) = self.read_delivery(partition, delivery).await? else {
            return Ok(());
        };
        if !matches!(delivery.status, Status::Pending | Status::Sending) {
            return Ok(());
        }
        match self.webhooks.get(&delivery.webhook_id) {
            Some(webhook) => self.start_attempt(partition, delivery, &webhook, effects),
            None => {
                let mut delivery = delivery;
                delivery.status = Status::Failed;
                delivery.reason = format!("webhook {} no longer exists", delivery.webhook_id);
                delivery.updated_ms = self.clock.now_ms();
                effects.writes.push(put_delivery(&delivery)?);
                Ok(())
            }
        }
    }

    /// Records an attempt's outcome: delivered, failed, or the next attempt of the retry
    /// schedule; a finished delivery updates the contact's standing and its run's counters.
    pub(super) async fn record_outcome(
        &self,
        partition: PartitionId,
        outcome: &Outcome,
        effects: &mut Effects,
    ) -> EngineResult {
        let Outcome { job, attempt, verdict, deferred_until_ms } = outcome;
        let mut delivery = job.delivery.clone();
        effects.cancel_timers.push(job.visibility.clone());
        let now = self.clock.now_ms();
        if let Some(until) = *deferred_until_ms {
            return self.schedule_attempt(delivery, until, effects);
        }
        let Some(attempt) = attempt else { return Ok(()) };
        let number = delivery.attempts.len() + 1;
        delivery.attempts.push(attempt.clone());
        if delivery.attempts.len() > record::MAX_ATTEMPTS_KEPT {
            delivery.attempts.remove(0);
        }
        delivery.updated_ms = now;
        match verdict {
            Verdict::Success => {
                delivery.status = Status::Delivered;
                delivery.reason.clear();
                tracing::debug!(delivery = %delivery.id, attempt = number, status = attempt.status_code, "delivered");
                self.capture(partition, &delivery, &attempt.response_body, effects).await?;
            }
            Verdict::Retry(asked) => {
                let policy = self
                    .webhooks
                    .get(&delivery.webhook_id)
                    .map(|w| w.retry.clone())
                    .unwrap_or_default();
                let unit: f64 = rand::random();
                match retry::delay(&policy, delivery.retry_index as usize, *asked, unit) {
                    Some(wait) => {
                        delivery.retry_index += 1;
                        crate::telemetry::metrics().retries.add(
                            1,
                            &[KeyValue::new("tidings.webhook.id", delivery.webhook_id.clone())],
                        );
                        tracing::info!(delivery = %delivery.id, attempt = number, status = attempt.status_code, error = %attempt.error, retry_in_ms = wait.as_millis() as u64, "attempt failed; retrying");
                        return self.schedule_attempt(
                            delivery,
                            now + wait.as_millis() as i64,
                            effects,
                        );
                    }
                    None => {
                        delivery.status = Status::Failed;
                        delivery.reason =
                            format!("gave up after {number} attempts: {}", attempt.error);
                    }
                }
            }
            Verdict::Fail => {
                delivery.status = Status::Failed;
                delivery.reason = attempt.error.clone();
            }
            Verdict::Gone => {
                delivery.status = Status::Failed;
                delivery.reason = "endpoint answered 410 Gone; the webhook was disabled".into();
            }
        }
        if delivery.status == Status::Failed {
            tracing::info!(delivery = %delivery.id, attempt = number, reason = %delivery.reason, "delivery failed");
        }
        crate::telemetry::metrics().deliveries.add(
            1,
            &[
                KeyValue::new("tidings.webhook.id", delivery.webhook_id.clone()),
                KeyValue::new("outcome", delivery.status.name()),
                KeyValue::new("error.class", attempt.error_class.name()),
            ],
        );
        if !delivery.campaign_id.is_empty()
            && matches!(delivery.status, Status::Delivered | Status::Failed)
        {
            self.finished(partition, &delivery, effects).await?;
        }
        if !delivery.run_id.is_empty() {
            let key = (delivery.campaign_id.clone(), delivery.run_id.clone(), partition);
            let mut shard = self.shard(&key).await?;
            if delivery.status == Status::Delivered {
                shard.delivered += 1;
            } else {
                shard.failed += 1;
            }
            run_contacts(&delivery.campaign_id, delivery.status.name(), 1);
            self.save_shard(key, shard, effects)?;
        }
        delivery.next_attempt_ms = None;
        self.finish(&delivery, effects)
    }

    /// Sends a finished delivery again from the start of its retry schedule; one still
    /// pending or in flight is left as it is.
    pub(super) async fn redeliver(
        &self,
        partition: PartitionId,
        id: &str,
        effects: &mut Effects,
    ) -> EngineResult {
        let Some(mut delivery) = self.read_delivery(partition, id).await? else { return Ok(()) };
        if matches!(delivery.status, Status::Pending | Status::Sending) {
            return Ok(());
        }
        let Some(webhook) = self.webhooks.get(&delivery.webhook_id) else { return Ok(()) };
        if delivery.request.is_none() {
            return Ok(());
        }
        delivery.retry_index = 0;
        delivery.reason.clear();
        tracing::info!(delivery = %id, "redelivering");
        self.start_attempt(partition, delivery, &webhook, effects)
    }

    /// Copies the fields the campaign captures from a 2xx JSON response into the contact's
    /// attributes. A response that is not JSON, or lacks a field, leaves that attribute as it
    /// was.
    pub(super) async fn capture(
        &self,
        partition: PartitionId,
        delivery: &Delivery,
        body: &[u8],
        effects: &mut Effects,
    ) -> EngineResult {
        if delivery.campaign_id.is_empty() || delivery.contact_id.is_empty() {
            return Ok(());
        }
        let Some(campaign) = self.campaigns.get(&delivery.campaign_id) else { return Ok(()) };
        if campaign.capture.is_empty() {
            return Ok(());
        }
        let Ok(response) = serde_json::from_slice::<serde_json::Value>(body) else {
            tracing::debug!(delivery = %delivery.id, "response is not JSON; nothing captured");
            return Ok(());
        };
        let captured: Vec<(&String, &serde_json::Value)> = campaign
            .capture
            .iter()
            .filter_map(|(name, pointer)| Some((name, response.pointer(pointer)?)))
            .collect();
        if captured.is_empty() {
            return Ok(());
        }
        let Some(mut contact) = self.state.contact(partition, &delivery.contact_id).await? else {
            tracing::debug!(delivery = %delivery.id, "contact deleted; nothing captured");
            return Ok(());
        };
        for (name, value) in captured {
            contact.attributes.insert(name.clone(), value.clone());
        }
        contact.updated_ms = self.clock.now_ms();
        tracing::debug!(delivery = %delivery.id, contact = %delivery.contact_id, "response captured");
        effects.writes.push(Write::contact(partition, &delivery.contact_id, &contact)?);
        Ok(())
    }

    /// Whether a delivery is finished and its retention has ended.
    pub(super) fn expired(&self, delivery: &Delivery, now: i64) -> bool {
        matches!(delivery.status, Status::Delivered | Status::Failed | Status::Skipped)
            && delivery.updated_ms + self.retention_ms <= now
    }

    /// Writes a finished delivery. The partition's sweep deletes it once its retention ends.
    pub(super) fn finish(&self, delivery: &Delivery, effects: &mut Effects) -> EngineResult {
        effects.writes.push(Write::delivery(delivery)?);
        Ok(())
    }

    /// Deletes a page of the partition's finished deliveries whose retention has ended;
    /// returns where the next page starts, or `None` when the pass is done.
    pub(super) async fn sweep_expired(
        &self,
        partition: PartitionId,
        after: Option<&str>,
        effects: &mut Effects,
    ) -> EngineResult<Option<String>> {
        // Delivery ids sort by creation time, so the deliveries that may have outlived the
        // retention all come before the id of one created a retention ago.
        const PAGE: usize = 500;
        let now = self.clock.now_ms();
        let before = record::first_id_at(partition, now - self.retention_ms);
        let (page, more) = self.state.deliveries_between(partition, after, &before, PAGE).await?;
        for (id, found) in page {
            // A record that does not decode is kept: deleting what cannot be read loses it.
            let Ok(found) = found else { continue };
            if self.expired(&found, now) {
                effects.writes.push(Write::remove_delivery(partition, &id));
                if effects.writes.len() >= 100 {
                    return Ok(Some(id));
                }
            }
        }
        Ok(more)
    }
}

fn put_delivery(delivery: &Delivery) -> EngineResult<Write> {
    Write::delivery(delivery)
}
