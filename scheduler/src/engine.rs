//! The seam between the partition machinery and what events and timers mean, and the engine
//! that gives them their meaning: campaigns and deliveries.
//!
//! A partition worker hands each event, due timer and attempt outcome to the [`Engine`], which
//! says what to write in return; the worker commits those writes together with the removal of
//! the inbox entry or timer, in one transaction guarded by its epoch, and only then starts the
//! HTTP attempts the engine asked for. An engine never writes partition state itself, so
//! fencing covers everything it decides.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::campaign::{Campaign, CampaignState, Run, RunState, Trigger, interval_run_id, run_key};
use crate::cluster::PartitionId;
use crate::contact::{Contact, ContactCache};
use crate::defs::Cache;
use crate::delivery::dispatch::{Dispatcher, Job, Outcome};
use crate::delivery::record::{self, Attempt, Delivery, ErrorClass, Status, StoredRequest};
use crate::delivery::render::Context;
use crate::delivery::retry::{self, Verdict};
use crate::inbox::Event;
use crate::keys;
use crate::rules::Programs;
use crate::secrets::Cipher;
use crate::store::{Op, Store};
use crate::template::Templates;
use crate::timers::{Timer, TimerKind};
use crate::webhook::Webhook;

/// Writes a batch of a run shard may add (each send takes two or three), leaving room in the
/// transaction for the shard's own bookkeeping.
const RUN_OPS: usize = 100;

/// Writes the campaigns of one event may add before the rest continue in a new inbox entry.
const EVENT_OPS: usize = 100;

/// Interval runs started by one firing; more missed occurrences continue in the next one.
const MAX_RUNS_PER_FIRING: usize = 40;

/// Contacts read per batch of a run shard: most may fall outside the audience.
const EVAL_PAGE: usize = 1000;

/// Extra time after an attempt's timeout before the attempt counts as lost.
const VISIBILITY_MARGIN_MS: i64 = 5_000;

/// The writes an engine asks for, and the attempts to start once they are committed.
#[derive(Debug, Default)]
pub struct Effects {
    /// Writes to commit with the batch.
    pub ops: Vec<Op>,
    /// Timers to add to the same partition (they get keys and join the in-memory index).
    pub timers: Vec<Timer>,
    /// Timers of the same partition to delete, by (due, key).
    pub cancel_timers: Vec<(i64, String)>,
    /// HTTP attempts to start after the commit.
    pub dispatch: Vec<Job>,
}

impl Effects {
    /// Returns how many store operations these effects take.
    pub fn op_count(&self) -> usize {
        self.ops.len() + self.timers.len() + self.cancel_timers.len()
    }
}

/// Decides the consequences of events, timers and attempt outcomes.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Handles one accepted event of `partition`.
    async fn on_event(&self, partition: PartitionId, event: &Event, effects: &mut Effects);

    /// Handles one due timer of `partition`.
    async fn on_timer(&self, partition: PartitionId, timer: &Timer, effects: &mut Effects);

    /// Evaluates a page of a run's audience in `partition`.
    async fn on_run_shard(
        &self,
        _partition: PartitionId,
        _campaign: &str,
        _run: &str,
        _after: &str,
        _effects: &mut Effects,
    ) {
    }

    /// Goes on fanning a run out, from partition `from`.
    async fn on_fan_out(
        &self,
        _partition: PartitionId,
        _campaign: &str,
        _run: &str,
        _from: u32,
        _effects: &mut Effects,
    ) {
    }

    /// Records an interaction of a contact with a campaign's delivery.
    #[allow(clippy::too_many_arguments)]
    async fn on_interaction(
        &self,
        _partition: PartitionId,
        _contact: &str,
        _campaign: &str,
        _delivery: &str,
        _kind: &str,
        _at_ms: i64,
        _effects: &mut Effects,
    ) {
    }

    /// Handles a request to send a delivery again.
    async fn on_redeliver(&self, _partition: PartitionId, _delivery: &str, _effects: &mut Effects) {
    }

    /// Records the outcome of an attempt this partition dispatched.
    async fn on_outcome(&self, _partition: PartitionId, _outcome: Outcome, _effects: &mut Effects) {
    }

    /// Reads ahead, in as few store round trips as possible, what handling these events will
    /// read. Called before each batch of inbox entries.
    /// `at_least` is a store revision the reads must reflect (see
    /// [`crate::store::Store::get_many_since`]).
    async fn prefetch_events(
        &self,
        _partition: PartitionId,
        _events: &[&Event],
        _at_least: crate::store::Revision,
    ) {
    }

    /// Reads ahead what recording these outcomes will read.
    async fn prefetch_outcomes(
        &self,
        _partition: PartitionId,
        _outcomes: &[Outcome],
        _at_least: crate::store::Revision,
    ) {
    }

    /// Called when this node starts working on `partition` (after a claim): state cached from
    /// an earlier ownership may have changed since. `owned` is cancelled when the ownership
    /// ends.
    fn on_claim(&self, _partition: PartitionId, _owned: &tokio_util::sync::CancellationToken) {}

    /// Starts an attempt of this partition; its outcome goes to `reply`.
    fn dispatch(&self, _job: Job, _reply: mpsc::UnboundedSender<Outcome>) {}

    /// How often the worker calls [`Engine::sweep`]; `None` for never.
    fn sweep_every(&self) -> Option<std::time::Duration> {
        None
    }

    /// Deletes a page of what has outlived its retention, scanning from after the key `after`
    /// (empty for the start). Returns the key to go on from, or `None` when the pass is done.
    async fn sweep(
        &self,
        _partition: PartitionId,
        _after: &[u8],
        _effects: &mut Effects,
    ) -> Option<Vec<u8>> {
        None
    }
}

/// An engine that consumes events and timers without consequences.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopEngine;

#[async_trait::async_trait]
impl Engine for NoopEngine {
    async fn on_event(&self, _partition: PartitionId, _event: &Event, _effects: &mut Effects) {}

    async fn on_timer(&self, _partition: PartitionId, _timer: &Timer, _effects: &mut Effects) {}
}

/// What the campaign engine needs.
pub struct CampaignEngine {
    store: Arc<dyn Store>,
    campaigns: Cache<Campaign>,
    webhooks: Cache<Webhook>,
    templates: Arc<Templates>,
    programs: Programs,
    cipher: Cipher,
    dispatcher: Dispatcher,
    partitions: u32,
    retention_ms: i64,
    /// Run shard counters and contacts' standings by key, as last written by this node. Only a
    /// partition's owner writes them, so within one ownership this copy is the truth: reads
    /// skip the store, and several outcomes of one batch add up instead of overwriting each
    /// other. A claim drops the partition's entries (another owner may have written since).
    shards: std::sync::Mutex<std::collections::HashMap<String, crate::campaign::Shard>>,
    statuses: std::sync::Mutex<std::collections::BTreeMap<String, crate::status::CampaignStatus>>,
    /// The contacts of the owned partitions.
    contacts: Arc<ContactCache>,
    /// Contacts read ahead for the batch of events a partition is handling, by partition and
    /// contact id (`None` when absent). Each batch replaces its partition's entry.
    prefetched: std::sync::Mutex<
        std::collections::HashMap<PartitionId, std::collections::HashMap<String, Option<Contact>>>,
    >,
}

impl std::fmt::Debug for CampaignEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CampaignEngine").finish_non_exhaustive()
    }
}

/// Retries a store read a few times: dropping a timer or event over a blip would lose it.
async fn read(store: &dyn Store, key: &str) -> Option<Vec<u8>> {
    retrying(key, || store.get(key.as_bytes())).await.and_then(|found| found.map(|kv| kv.value))
}

/// Runs a store read, retrying it a few times with a growing pause; `None` if it never
/// succeeds.
async fn retrying<T, F, Fut>(what: &str, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::store::StoreResult<T>>,
{
    let mut pause = std::time::Duration::from_millis(50);
    for _ in 0..20 {
        match attempt().await {
            Ok(found) => return Some(found),
            Err(error) => {
                tracing::debug!(what, %error, "read failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
    None
}

impl CampaignEngine {
    /// Returns an engine.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        campaigns: Cache<Campaign>,
        webhooks: Cache<Webhook>,
        templates: Arc<Templates>,
        cipher: Cipher,
        dispatcher: Dispatcher,
        partitions: u32,
        retention: std::time::Duration,
    ) -> Self {
        Self {
            store,
            campaigns,
            webhooks,
            templates,
            programs: Programs::default(),
            cipher,
            dispatcher,
            partitions,
            retention_ms: retention.as_millis() as i64,
            shards: Default::default(),
            statuses: Default::default(),
            contacts: Default::default(),
            prefetched: Default::default(),
        }
    }

    /// Returns the cache of the owned partitions' contacts.
    pub fn contact_cache(&self) -> &Arc<ContactCache> {
        &self.contacts
    }

    async fn shard(&self, key: &str) -> crate::campaign::Shard {
        if let Some(shard) = self.shards.lock().unwrap_or_else(|p| p.into_inner()).get(key) {
            return shard.clone();
        }
        read(self.store.as_ref(), key)
            .await
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn save_shard(&self, key: String, shard: crate::campaign::Shard, effects: &mut Effects) {
        effects.ops.push(Op::put(key.clone(), serde_json::to_vec(&shard).unwrap_or_default()));
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        if shards.len() > 100_000 {
            shards.clear();
        }
        shards.insert(key, shard);
    }

    /// Whether a delivery is finished and its retention has ended.
    fn expired(&self, delivery: &Delivery, now: i64) -> bool {
        matches!(delivery.status, Status::Delivered | Status::Failed | Status::Skipped)
            && delivery.updated_ms + self.retention_ms <= now
    }

    /// Writes a finished delivery. The partition's sweep deletes it once its retention ends.
    fn finish(&self, delivery: &Delivery, effects: &mut Effects) {
        effects.ops.push(put_delivery(delivery));
    }

    /// Reads a contact from the store: an event must see the contact as it was when the event
    /// was published, which the cache (trailing the store by its watch) does not promise.
    async fn fresh_contact(&self, partition: PartitionId, id: &str) -> Contact {
        let ahead = {
            let ahead = self.prefetched.lock().unwrap_or_else(|p| p.into_inner());
            ahead.get(&partition).and_then(|p| p.get(id)).cloned()
        };
        if let Some(found) = ahead {
            return found.unwrap_or_default();
        }
        read(self.store.as_ref(), &crate::contact::key(partition, id))
            .await
            .and_then(|bytes| serde_json::from_slice::<Contact>(&bytes).ok())
            .unwrap_or_default()
    }

    /// Returns a contact from the owner's cache, or from the store while the cache loads.
    async fn cached_contact(&self, partition: PartitionId, id: &str) -> Contact {
        self.contacts.start(&self.store, partition);
        match self.contacts.get(partition, id) {
            Some(found) => found.unwrap_or_default(),
            None => self.fresh_contact(partition, id).await,
        }
    }

    fn render(&self, webhook: &Webhook, context: &Context) -> Result<StoredRequest, String> {
        crate::delivery::render::request(&self.templates, &self.cipher, webhook, context)
    }

    /// Creates a delivery of `webhook` and, when it renders, dispatches its first attempt.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        partition: PartitionId,
        origin: record::Origin<'_>,
        webhook: &Webhook,
        cause: (i64, &str),
        defer_until: Option<i64>,
        mut context: Context,
        effects: &mut Effects,
    ) {
        let now = crate::now_ms();
        let id = record::derived_id(partition, cause.0, cause.1);
        context.delivery = serde_json::json!({ "id": id });
        let campaign_id = origin.campaign_id;
        let mut delivery = Delivery::new(id.clone(), partition, origin, now);
        match self.render(webhook, &context) {
            Ok(request) => {
                delivery.request = Some(request);
                match defer_until {
                    // Outside the send window: wait for it to open, never drop.
                    Some(at) => Self::schedule_attempt(partition, delivery, at, effects),
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
                self.finish(&delivery, effects);
            }
        }
    }

    /// Marks a delivery as sending, sets its visibility timer and asks for the attempt.
    fn start_attempt(
        &self,
        partition: PartitionId,
        mut delivery: Delivery,
        webhook: &Webhook,
        effects: &mut Effects,
    ) {
        let now = crate::now_ms();
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
        let visibility_key = keys::timer(partition, due, &timer.id);
        effects.ops.push(put_delivery(&delivery));
        effects.timers.push(timer);
        effects.dispatch.push(Job { delivery, visibility_key });
    }

    /// Schedules the next attempt of a pending delivery at `due`.
    fn schedule_attempt(
        partition: PartitionId,
        mut delivery: Delivery,
        due: i64,
        effects: &mut Effects,
    ) {
        let _ = partition;
        delivery.status = Status::Pending;
        delivery.next_attempt_ms = Some(due);
        delivery.updated_ms = crate::now_ms();
        effects.timers.push(Timer {
            id: delivery.id.clone(),
            due_ms: due,
            kind: TimerKind::Attempt { delivery: delivery.id.clone() },
        });
        effects.ops.push(put_delivery(&delivery));
    }

    async fn interval(
        &self,
        partition: PartitionId,
        id: &str,
        occurrence_ms: i64,
        generation: u64,
        effects: &mut Effects,
    ) {
        let Some(campaign) = self.campaign(id).await else { return };
        let Trigger::Interval(trigger) = &campaign.trigger else { return };
        if campaign.state != CampaignState::Active || campaign.generation != generation {
            tracing::debug!(campaign = %id, "interval chain of an earlier activation ends");
            return;
        }
        let Ok(schedule) = trigger.schedule(campaign.activated_at_ms) else { return };
        let now = crate::now_ms();
        let firing = schedule.on_fire(occurrence_ms, now);
        // Each run takes two writes: a replay of many missed occurrences goes on from where
        // this transaction's share ends, through the interval's own timer due at once.
        let (fire, rest) = firing.fire.split_at(firing.fire.len().min(MAX_RUNS_PER_FIRING));
        for occurrence in fire {
            // The run starts through a timer due now, which fans it out in a transaction of
            // its own: a firing that replays missed occurrences stays within the store's limit
            // on writes per transaction.
            let run = Run::new(RunState::Scheduled, *occurrence, self.partitions);
            let run_id = interval_run_id(*occurrence);
            tracing::info!(campaign = %id, run = %run_id, partition, lateness_ms = now - occurrence, "interval fired");
            effects
                .ops
                .push(Op::put(run_key(id, &run_id), serde_json::to_vec(&run).unwrap_or_default()));
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
    }

    /// Reads a campaign from the store (fresh, for decisions that must not act on a stale
    /// state such as a paused campaign).
    async fn campaign(&self, id: &str) -> Option<Campaign> {
        let bytes = read(self.store.as_ref(), &format!("defs/campaigns/{id}")).await?;
        serde_json::from_slice(&bytes).ok()
    }

    async fn read_delivery(&self, partition: PartitionId, id: &str) -> Option<Delivery> {
        let bytes = read(self.store.as_ref(), &record::key(partition, id)).await?;
        serde_json::from_slice(&bytes).ok()
    }
}

impl CampaignEngine {
    async fn status(
        &self,
        partition: PartitionId,
        contact: &str,
        campaign: &str,
    ) -> crate::status::CampaignStatus {
        let key = crate::status::key(partition, contact, campaign);
        if let Some(status) = self.statuses.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return status.clone();
        }
        read(self.store.as_ref(), &key)
            .await
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Writes a contact's standing in a campaign, and keeps it in the cache.
    fn save_status(
        &self,
        partition: PartitionId,
        contact: &str,
        campaign: &str,
        status: crate::status::CampaignStatus,
        effects: &mut Effects,
    ) {
        let key = crate::status::key(partition, contact, campaign);
        effects.ops.push(Op::put(key.clone(), serde_json::to_vec(&status).unwrap_or_default()));
        let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        if statuses.len() > 200_000 {
            statuses.clear();
        }
        statuses.insert(key, status);
    }

    /// Records a finished delivery in the contact's standing and starts the waits of the
    /// follow-up campaigns that follow it.
    async fn finished(&self, partition: PartitionId, delivery: &Delivery, effects: &mut Effects) {
        let status_name = if delivery.status == Status::Delivered { "delivered" } else { "failed" };
        let mut status = self.status(partition, &delivery.contact_id, &delivery.campaign_id).await;
        status.last_status = status_name.to_string();
        status.last_delivery = delivery.id.clone();
        status.last_at_ms = delivery.updated_ms;
        status.sends += 1;
        self.save_status(partition, &delivery.contact_id, &delivery.campaign_id, status, effects);
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
            // Interactions count from the start of the attempt that delivered: a receiver can
            // report a click before the outcome of that attempt is even recorded.
            let since_ms = delivery.attempts.last().map_or(delivery.updated_ms, |a| a.start_ms);
            tracing::debug!(campaign = %id, contact = %delivery.contact_id, delay_ms, "follow-up wait started");
            effects.timers.push(Timer {
                id: format!("f-{id}-{}", delivery.id),
                due_ms: delivery.updated_ms + *delay_ms as i64,
                kind: TimerKind::FollowUp {
                    campaign: id.clone(),
                    contact: delivery.contact_id.clone(),
                    after_campaign: delivery.campaign_id.clone(),
                    since_ms,
                },
            });
        }
    }

    /// Returns when a send to the contact may happen under the campaign's send window, if
    /// that is later than now.
    fn window_opening(campaign: &Campaign, contact: &serde_json::Value) -> Option<i64> {
        let window = campaign.send_window.as_ref()?;
        let tz = crate::schedule::parse_timezone(contact["timezone"].as_str().unwrap_or_default())
            .ok()?;
        let now = crate::now_ms();
        let window = crate::schedule::Window {
            days: window.days.clone(),
            start_minute: window.start_minute,
            end_minute: window.end_minute,
        };
        let opening = window.next_open(&tz, now);
        (opening > now).then_some(opening)
    }

    /// Returns whether every business rule of the campaign holds for the contact. Rules see
    /// `contact`, `event` (null outside event campaigns) and `campaigns`: the contact's standing
    /// in every campaign by id (`last_status`, `last_at_ms`, `sends`, `interactions`).
    async fn rules_pass(
        &self,
        partition: PartitionId,
        contact_id: &str,
        contact: &serde_json::Value,
        event: &serde_json::Value,
        campaign: &Campaign,
    ) -> bool {
        if campaign.rules.is_empty() {
            return true;
        }
        let standings = self
            .standings(partition, contact_id)
            .await
            .into_iter()
            .map(|(id, status)| (id, serde_json::to_value(status).unwrap_or_default()))
            .collect();
        let campaigns = serde_json::Value::Object(standings);
        let vars = [("contact", contact), ("event", event), ("campaigns", &campaigns)];
        campaign.rules.iter().all(|rule| self.programs.evaluate(rule, &vars).unwrap_or(false))
    }

    /// Returns the contact's standing in every campaign it has one in, by campaign id: the
    /// store's copy overlaid with this owner's newer writes.
    async fn standings(
        &self,
        partition: PartitionId,
        contact: &str,
    ) -> std::collections::BTreeMap<String, crate::status::CampaignStatus> {
        let prefix = format!("p/{partition:04}/status/{contact}/");
        let mut standings = std::collections::BTreeMap::new();
        let page = retrying(&prefix, || self.store.range_prefix(prefix.as_bytes(), 0)).await;
        for kv in page.map(|p| p.kvs).unwrap_or_default() {
            let id = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
            if let Ok(status) = serde_json::from_slice(&kv.value) {
                standings.insert(id, status);
            }
        }
        let cached = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        for (key, status) in cached.range(prefix.clone()..crate::store::prefix_end_string(&prefix))
        {
            standings.insert(key[prefix.len()..].to_string(), status.clone());
        }
        standings
    }

    /// Returns whether any active campaign caps sends across campaigns: then every send is
    /// recorded in the contact's standing, so that the cap can count it.
    fn across_caps(&self) -> bool {
        self.campaigns.all().iter().any(|(_, c)| {
            c.state == CampaignState::Active
                && c.frequency_cap.as_ref().is_some_and(|cap| cap.across_campaigns)
        })
    }

    /// Returns false (and records nothing) when a frequency cap is reached for the contact:
    /// the campaign's own, or one counting the sends of every campaign. Otherwise records this
    /// send in the contact's standing when some cap needs it, and returns true.
    async fn within_cap(
        &self,
        partition: PartitionId,
        contact: &str,
        id: &str,
        campaign: &Campaign,
        across_caps: bool,
        effects: &mut Effects,
    ) -> bool {
        let cap = campaign.frequency_cap.as_ref().filter(|c| c.max_sends > 0);
        if cap.is_none() && !across_caps {
            return true;
        }
        let now = crate::now_ms();
        let mut status = self.status(partition, contact, id).await;
        if let Some(cap) = cap {
            let since = now - cap.period_ms as i64;
            let sends = if cap.across_campaigns {
                let standings = self.standings(partition, contact).await;
                standings.values().flat_map(|s| &s.sent_at_ms).filter(|at| **at > since).count()
            } else {
                status.sent_at_ms.iter().filter(|at| **at > since).count()
            };
            if sends >= cap.max_sends as usize {
                return false;
            }
        }
        status.sent_at_ms.retain(|at| now - at < crate::status::SEND_HISTORY_MS);
        let excess = status.sent_at_ms.len().saturating_sub(crate::status::SEND_HISTORY - 1);
        status.sent_at_ms.drain(..excess);
        status.sent_at_ms.push(now);
        self.save_status(partition, contact, id, status, effects);
        true
    }

    /// Copies the fields the campaign captures from a 2xx JSON response into the contact's
    /// attributes. A response that is not JSON, or lacks a field, leaves that attribute as it
    /// was.
    async fn capture(
        &self,
        partition: PartitionId,
        delivery: &Delivery,
        body: &[u8],
        effects: &mut Effects,
    ) {
        if delivery.campaign_id.is_empty() || delivery.contact_id.is_empty() {
            return;
        }
        let Some(campaign) = self.campaigns.get(&delivery.campaign_id) else { return };
        if campaign.capture.is_empty() {
            return;
        }
        let Ok(response) = serde_json::from_slice::<serde_json::Value>(body) else {
            tracing::debug!(delivery = %delivery.id, "response is not JSON; nothing captured");
            return;
        };
        let captured: Vec<(&String, &serde_json::Value)> = campaign
            .capture
            .iter()
            .filter_map(|(name, pointer)| Some((name, response.pointer(pointer)?)))
            .collect();
        if captured.is_empty() {
            return;
        }
        let key = crate::contact::key(partition, &delivery.contact_id);
        let Some(bytes) = read(self.store.as_ref(), &key).await else {
            tracing::debug!(delivery = %delivery.id, "contact deleted; nothing captured");
            return;
        };
        let Ok(mut contact) = serde_json::from_slice::<Contact>(&bytes) else { return };
        for (name, value) in captured {
            contact.attributes.insert(name.clone(), value.clone());
        }
        contact.updated_ms = crate::now_ms();
        tracing::debug!(delivery = %delivery.id, contact = %delivery.contact_id, "response captured");
        effects.ops.push(Op::put(key, serde_json::to_vec(&contact).unwrap_or_default()));
    }

    /// Ends a follow-up's wait: sends unless the contact interacted first.
    async fn follow_up(
        &self,
        partition: PartitionId,
        id: &str,
        contact_id: &str,
        after: &str,
        since_ms: i64,
        effects: &mut Effects,
    ) {
        let Some(campaign) = self.campaign(id).await else { return };
        let Trigger::FollowUp { unless_interactions, .. } = &campaign.trigger else { return };
        if campaign.state != CampaignState::Active {
            return;
        }
        let status = self.status(partition, contact_id, after).await;
        if let Some(kind) = unless_interactions
            .iter()
            .find(|k| status.interactions.get(*k).is_some_and(|at| *at >= since_ms))
        {
            tracing::info!(campaign = %id, contact = %contact_id, interaction = %kind, "follow-up not needed");
            return;
        }
        let own = self.status(partition, contact_id, id).await;
        if own.exited_at_ms.is_some_and(|at| at >= since_ms) {
            tracing::info!(campaign = %id, contact = %contact_id, "follow-up cancelled by an exit event");
            return;
        }
        let contact = self.cached_contact(partition, contact_id).await.view(contact_id);
        if contact["unsubscribed"] == serde_json::Value::Bool(true) {
            return;
        }
        if !self
            .rules_pass(partition, contact_id, &contact, &serde_json::Value::Null, &campaign)
            .await
        {
            tracing::info!(campaign = %id, contact = %contact_id, "follow-up skipped: rule");
            return;
        }
        let across = self.across_caps();
        if !self.within_cap(partition, contact_id, id, &campaign, across, effects).await {
            tracing::info!(campaign = %id, contact = %contact_id, "follow-up skipped: frequency cap");
            return;
        }
        let Some(webhook) = self.webhooks.get(&campaign.webhook_id) else { return };
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
            ..Default::default()
        };
        self.deliver(
            partition,
            origin,
            &webhook,
            (since_ms, &format!("f/{id}/{contact_id}/{after}/{since_ms}")),
            Self::window_opening(&campaign, &context.contact),
            context,
            effects,
        );
    }
}

fn put_delivery(delivery: &Delivery) -> Op {
    Op::put(
        record::key(delivery.partition, &delivery.id),
        serde_json::to_vec(delivery).unwrap_or_default(),
    )
}

#[async_trait::async_trait]
impl Engine for CampaignEngine {
    async fn on_event(&self, partition: PartitionId, event: &Event, effects: &mut Effects) {
        let now = crate::now_ms();
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
                    effects.ops.push(Op::put(
                        keys::inbox_entry(partition, &format!("{}-exit-{id}", event.id)),
                        serde_json::to_vec(&crate::inbox::InboxEntry::Event(rest))
                            .unwrap_or_default(),
                    ));
                    tracing::debug!(event = %event.id, after = last, "exits continue in a new entry");
                    return;
                }
                last = Some(id);
                let mut status = self.status(partition, &event.contact_id, id).await;
                status.exited_at_ms = Some(now);
                self.save_status(partition, &event.contact_id, id, status, effects);
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
            return;
        }
        matching.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(after) = &event.resume_after {
            matching.retain(|(id, _)| id > after);
        }
        let contact =
            self.fresh_contact(partition, &event.contact_id).await.view(&event.contact_id);
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
                effects.ops.push(Op::put(
                    keys::inbox_entry(partition, &id),
                    serde_json::to_vec(&crate::inbox::InboxEntry::Event(rest)).unwrap_or_default(),
                ));
                tracing::debug!(event = %event.id, after = last, "event continues in a new entry");
                return;
            }
            handled = Some(campaign_id);
            let (campaign_id, campaign) = (campaign_id.clone(), campaign.clone());
            if contact["unsubscribed"] == serde_json::Value::Bool(true) {
                continue;
            }
            let vars = [("event", &event_view), ("contact", &contact)];
            let passes = |source: &str| {
                source.is_empty() || self.programs.evaluate(source, &vars).unwrap_or(false)
            };
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
                .await
            {
                tracing::debug!(campaign = %campaign_id, contact = %event.contact_id, "skipped: rule");
                continue;
            }
            if !self
                .within_cap(partition, &event.contact_id, &campaign_id, &campaign, across, effects)
                .await
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
                Self::window_opening(&campaign, &context.contact),
                context,
                effects,
            );
        }
    }

    async fn on_timer(&self, partition: PartitionId, timer: &Timer, effects: &mut Effects) {
        match &timer.kind {
            TimerKind::Interval { campaign, occurrence_ms, generation } => {
                self.interval(partition, campaign, *occurrence_ms, *generation, effects).await;
            }
            TimerKind::Run { campaign, run } => {
                let key = run_key(campaign, run);
                let Some(bytes) = read(self.store.as_ref(), &key).await else { return };
                let Ok(mut record) = serde_json::from_slice::<Run>(&bytes) else { return };
                if record.state == RunState::Scheduled {
                    record.state = RunState::Running;
                    record.started_ms = Some(crate::now_ms());
                    tracing::info!(campaign = %campaign, run = %run, partition, "scheduled run started");
                    effects.ops.push(Op::put(key, serde_json::to_vec(&record).unwrap_or_default()));
                    effects.ops.extend(crate::campaign::fan_out(
                        campaign,
                        run,
                        0,
                        self.partitions,
                        partition,
                    ));
                }
            }
            TimerKind::RunShard { campaign, run, after } => {
                self.on_run_shard(partition, campaign, run, after, effects).await;
            }
            TimerKind::FollowUp { campaign, contact, after_campaign, since_ms } => {
                self.follow_up(partition, campaign, contact, after_campaign, *since_ms, effects)
                    .await;
            }
            TimerKind::Expire { delivery } => {
                let Some(found) = self.read_delivery(partition, delivery).await else { return };
                if self.expired(&found, crate::now_ms()) {
                    effects.ops.push(Op::delete(record::key(partition, delivery)));
                }
            }
            TimerKind::Attempt { delivery } => {
                let Some(delivery) = self.read_delivery(partition, delivery).await else { return };
                if !matches!(delivery.status, Status::Pending | Status::Sending) {
                    return;
                }
                match self.webhooks.get(&delivery.webhook_id) {
                    Some(webhook) => self.start_attempt(partition, delivery, &webhook, effects),
                    None => {
                        let mut delivery = delivery;
                        delivery.status = Status::Failed;
                        delivery.reason =
                            format!("webhook {} no longer exists", delivery.webhook_id);
                        delivery.updated_ms = crate::now_ms();
                        effects.ops.push(put_delivery(&delivery));
                    }
                }
            }
        }
    }

    async fn on_fan_out(
        &self,
        partition: PartitionId,
        campaign: &str,
        run: &str,
        from: u32,
        effects: &mut Effects,
    ) {
        effects.ops.extend(crate::campaign::fan_out(
            campaign,
            run,
            from,
            self.partitions,
            partition,
        ));
    }

    async fn on_run_shard(
        &self,
        partition: PartitionId,
        campaign_id: &str,
        run_id: &str,
        after: &str,
        effects: &mut Effects,
    ) {
        let Some(campaign) = self.campaign(campaign_id).await else { return };
        let shard_key = crate::campaign::shard_key(campaign_id, run_id, partition);
        let mut shard = self.shard(&shard_key).await;
        if shard.done {
            return;
        }
        let run: Option<Run> = read(self.store.as_ref(), &run_key(campaign_id, run_id))
            .await
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let run_data = run.as_ref().map(|r| r.data.clone()).unwrap_or_default();
        // A paused run's shards wait on a timer and look again; a cancelled run's shards
        // stop where they are.
        match run.as_ref().map(|r| r.state) {
            Some(RunState::Paused) => {
                effects.timers.push(Timer {
                    id: format!("rs-{run_id}"),
                    due_ms: crate::now_ms() + 1000,
                    kind: TimerKind::RunShard {
                        campaign: campaign_id.to_string(),
                        run: run_id.to_string(),
                        after: after.to_string(),
                    },
                });
                return;
            }
            Some(RunState::Cancelled) => {
                shard.done = true;
                self.save_shard(shard_key, shard, effects);
                return;
            }
            _ => {}
        }
        let Some(webhook) = self.webhooks.get(&campaign.webhook_id) else {
            shard.done = true;
            self.save_shard(shard_key, shard, effects);
            return;
        };
        let segment_filter = if campaign.audience.segment_id.is_empty() {
            String::new()
        } else {
            read(self.store.as_ref(), &format!("defs/segments/{}", campaign.audience.segment_id))
                .await
                .and_then(|bytes| serde_json::from_slice::<crate::segment::Segment>(&bytes).ok())
                .map(|s| s.filter)
                .unwrap_or_else(|| "false".into())
        };
        let prefix = format!("p/{partition:04}/contacts/");
        let after_id = after.strip_prefix(&prefix).unwrap_or_default();
        self.contacts.start(&self.store, partition);
        let page = match self.contacts.page(partition, after_id, EVAL_PAGE) {
            Some(page) => page,
            None => {
                let mut start = prefix.clone().into_bytes();
                if !after_id.is_empty() {
                    start = after.as_bytes().to_vec();
                    start.push(0);
                }
                let end = crate::store::prefix_end(prefix.as_bytes());
                let Ok(page) = self.store.range(&start, &end, EVAL_PAGE).await else {
                    // Leave the shard queued as it is: the next attempt reads again.
                    effects.ops.extend(crate::campaign::fan_out_one(
                        campaign_id,
                        run_id,
                        partition,
                        after,
                    ));
                    return;
                };
                let contacts = page
                    .kvs
                    .iter()
                    .filter_map(|kv| {
                        let id = String::from_utf8_lossy(kv.key.get(prefix.len()..)?);
                        Some((id.into_owned(), serde_json::from_slice(&kv.value).ok()?))
                    })
                    .collect();
                crate::contact::CachedPage { contacts, more: page.more }
            }
        };
        let active = campaign.state == CampaignState::Active
            && run.as_ref().is_some_and(|r| r.state == RunState::Running);
        let run_view = serde_json::json!({ "id": run_id, "data": run_data });
        let across = self.across_caps();
        let campaign_view = serde_json::json!({ "id": campaign_id, "data": campaign.data });
        let run_time_ms = run.as_ref().map_or(0, |r| r.started_ms.unwrap_or(r.scheduled_ms));
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
            let inside = |source: &str| {
                source.is_empty() || self.programs.evaluate(source, &vars).unwrap_or(false)
            };
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
                .await
            {
                *shard.skipped.entry("rule".to_string()).or_default() += 1;
                continue;
            }
            if !self
                .within_cap(partition, contact_id, campaign_id, &campaign, across, effects)
                .await
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
                ..Default::default()
            };
            self.deliver(
                partition,
                origin,
                &webhook,
                (run_time_ms, &format!("r/{run_id}/{contact_id}")),
                Self::window_opening(&campaign, &context.contact),
                context,
                effects,
            );
        }
        match last.map(|i| &page.contacts[i].0) {
            Some(last) if more => {
                effects.ops.extend(crate::campaign::fan_out_one(
                    campaign_id,
                    run_id,
                    partition,
                    &format!("{prefix}{last}"),
                ));
            }
            _ => shard.done = true,
        }
        self.save_shard(shard_key, shard, effects);
    }

    async fn on_interaction(
        &self,
        partition: PartitionId,
        contact: &str,
        campaign: &str,
        delivery: &str,
        kind: &str,
        at_ms: i64,
        effects: &mut Effects,
    ) {
        let (contact, campaign) = if delivery.is_empty() {
            (contact.to_string(), campaign.to_string())
        } else {
            match self.read_delivery(partition, delivery).await {
                Some(found) => (found.contact_id, found.campaign_id),
                None => {
                    tracing::info!(delivery, "interaction for an unknown delivery ignored");
                    return;
                }
            }
        };
        if campaign.is_empty() {
            return;
        }
        let mut status = self.status(partition, &contact, &campaign).await;
        let latest = status.interactions.entry(kind.to_string()).or_insert(at_ms);
        *latest = (*latest).max(at_ms);
        tracing::debug!(%contact, %campaign, kind, "interaction recorded");
        self.save_status(partition, &contact, &campaign, status, effects);
    }

    async fn on_redeliver(&self, partition: PartitionId, id: &str, effects: &mut Effects) {
        let Some(mut delivery) = self.read_delivery(partition, id).await else { return };
        if matches!(delivery.status, Status::Pending | Status::Sending) {
            return;
        }
        let Some(webhook) = self.webhooks.get(&delivery.webhook_id) else { return };
        if delivery.request.is_none() {
            return;
        }
        delivery.retry_index = 0;
        delivery.reason.clear();
        tracing::info!(delivery = %id, "redelivering");
        self.start_attempt(partition, delivery, &webhook, effects);
    }

    async fn on_outcome(&self, partition: PartitionId, outcome: Outcome, effects: &mut Effects) {
        let Outcome { job, attempt, verdict, deferred_until_ms } = outcome;
        let mut delivery = job.delivery;
        let due = keys::parse_timer_due(job.visibility_key.as_bytes()).unwrap_or_default();
        effects.cancel_timers.push((due, job.visibility_key));
        let now = crate::now_ms();
        if let Some(until) = deferred_until_ms {
            Self::schedule_attempt(partition, delivery, until, effects);
            return;
        }
        let Some(attempt) = attempt else { return };
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
                self.capture(partition, &delivery, &attempt.response_body, effects).await;
            }
            Verdict::Retry(asked) => {
                let policy = self
                    .webhooks
                    .get(&delivery.webhook_id)
                    .map(|w| w.retry.clone())
                    .unwrap_or_default();
                let unit: f64 = rand::random();
                match retry::delay(&policy, delivery.retry_index as usize, asked, unit) {
                    Some(wait) => {
                        delivery.retry_index += 1;
                        tracing::info!(delivery = %delivery.id, attempt = number, status = attempt.status_code, error = %attempt.error, retry_in_ms = wait.as_millis() as u64, "attempt failed; retrying");
                        Self::schedule_attempt(
                            partition,
                            delivery,
                            now + wait.as_millis() as i64,
                            effects,
                        );
                        return;
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
        if !delivery.campaign_id.is_empty()
            && matches!(delivery.status, Status::Delivered | Status::Failed)
        {
            self.finished(partition, &delivery, effects).await;
        }
        if !delivery.run_id.is_empty() {
            let key =
                crate::campaign::shard_key(&delivery.campaign_id, &delivery.run_id, partition);
            let mut shard = self.shard(&key).await;
            if delivery.status == Status::Delivered {
                shard.delivered += 1;
            } else {
                shard.failed += 1;
            }
            self.save_shard(key, shard, effects);
        }
        delivery.next_attempt_ms = None;
        self.finish(&delivery, effects);
    }

    async fn prefetch_events(
        &self,
        partition: PartitionId,
        events: &[&Event],
        at_least: crate::store::Revision,
    ) {
        let mut ids: Vec<&str> = events.iter().map(|e| e.contact_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let keys: Vec<Vec<u8>> =
            ids.iter().map(|id| crate::contact::key(partition, id).into_bytes()).collect();
        // On an error the entry is simply absent, and each event reads its contact itself.
        let found = self.store.get_many_since(&keys, at_least).await.unwrap_or_default();
        let contacts = ids
            .iter()
            .zip(found)
            .map(|(id, kv)| {
                (id.to_string(), kv.and_then(|kv| serde_json::from_slice(&kv.value).ok()))
            })
            .collect();
        self.prefetched.lock().unwrap_or_else(|p| p.into_inner()).insert(partition, contacts);
    }

    async fn prefetch_outcomes(
        &self,
        partition: PartitionId,
        outcomes: &[Outcome],
        at_least: crate::store::Revision,
    ) {
        let mut keys: Vec<String> = {
            let cached = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
            outcomes
                .iter()
                .map(|o| &o.job.delivery)
                .filter(|d| !d.campaign_id.is_empty())
                .map(|d| crate::status::key(partition, &d.contact_id, &d.campaign_id))
                .filter(|key| !cached.contains_key(key))
                .collect()
        };
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return;
        }
        let raw: Vec<Vec<u8>> = keys.iter().map(|k| k.clone().into_bytes()).collect();
        let Ok(found) = self.store.get_many_since(&raw, at_least).await else { return };
        let mut cached = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        for (key, kv) in keys.into_iter().zip(found) {
            let status =
                kv.and_then(|kv| serde_json::from_slice(&kv.value).ok()).unwrap_or_default();
            // This owner's own writes are newer than anything read here.
            cached.entry(key).or_insert(status);
        }
    }

    fn dispatch(&self, job: Job, reply: mpsc::UnboundedSender<Outcome>) {
        self.dispatcher.submit(job, reply);
    }

    fn sweep_every(&self) -> Option<std::time::Duration> {
        let every = std::time::Duration::from_millis((self.retention_ms / 10).max(0) as u64);
        Some(every.clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(60)))
    }

    async fn sweep(
        &self,
        partition: PartitionId,
        after: &[u8],
        effects: &mut Effects,
    ) -> Option<Vec<u8>> {
        // Delivery ids sort by creation time, so the deliveries that may have outlived the
        // retention all come before the id of one created a retention ago.
        const PAGE: usize = 200;
        let now = crate::now_ms();
        let end = record::key(partition, &record::first_id_at(partition, now - self.retention_ms));
        let start = if after.is_empty() {
            record::key(partition, "").into_bytes()
        } else {
            let mut start = after.to_vec();
            start.push(0);
            start
        };
        let page =
            retrying("sweep deliveries", || self.store.range(&start, end.as_bytes(), PAGE)).await?;
        for kv in &page.kvs {
            let Ok(found) = serde_json::from_slice::<Delivery>(&kv.value) else { continue };
            if self.expired(&found, now) {
                effects.ops.push(Op::delete(kv.key.clone()));
                if effects.ops.len() >= 100 {
                    return Some(kv.key.clone());
                }
            }
        }
        match page.kvs.last() {
            Some(last) if page.more => Some(last.key.clone()),
            _ => None,
        }
    }

    fn on_claim(&self, partition: PartitionId, owned: &tokio_util::sync::CancellationToken) {
        self.contacts.own(partition, owned.clone());
        self.prefetched.lock().unwrap_or_else(|p| p.into_inner()).remove(&partition);
        let status_prefix = format!("p/{partition:04}/");
        let shard_suffix = format!("/{partition:04}");
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| !k.starts_with(&status_prefix));
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| !k.ends_with(&shard_suffix));
    }
}
