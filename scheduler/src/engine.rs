//! The seam between the partition machinery and what events and timers mean, and the engine
//! that gives them their meaning: campaigns and deliveries.
//!
//! A partition worker hands each event, due timer and attempt outcome to the [`Engine`], which
//! says what to write in return; the worker commits those writes together with the removal of
//! the inbox entry or timer, in one transaction guarded by its epoch, and only then starts the
//! HTTP attempts the engine asked for. An engine never writes partition state itself, so
//! fencing covers everything it decides.

use std::sync::Arc;

use opentelemetry::KeyValue;
use tokio::sync::mpsc;

use crate::campaign::{Campaign, CampaignState, Run, RunState, Trigger, interval_run_id};
use crate::cluster::PartitionId;
use crate::contact::{Contact, ContactCache};
use crate::defs::{Cache, Definitions, DefsError};
use crate::delivery::dispatch::{Dispatcher, Job, Outcome};
use crate::delivery::record::{self, Attempt, Delivery, ErrorClass, Status, StoredRequest};
use crate::delivery::render::Context;
use crate::delivery::retry::{self, Verdict};
use crate::inbox::Event;
use crate::rules::Programs;
use crate::secrets::Cipher;
use crate::state::{State, StateError, TimerRef, Write};
use crate::store::Store;
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

/// What an engine decided, as typed intents: records to write, timers to register and cancel,
/// and the attempts to start once all of it is committed.
#[derive(Debug, Default)]
pub struct Effects {
    /// Records to write with the batch.
    pub writes: Vec<Write>,
    /// Timers to register in the same partition (they join the worker's in-memory index).
    pub timers: Vec<Timer>,
    /// Timers of the same partition to cancel.
    pub cancel_timers: Vec<TimerRef>,
    /// HTTP attempts to start after the commit.
    pub dispatch: Vec<Job>,
}

impl Effects {
    /// Returns how many writes these effects take.
    pub fn op_count(&self) -> usize {
        self.writes.len() + self.timers.len() + self.cancel_timers.len()
    }
}

/// Why the engine could not decide what an input means: a read of stored state failed, or a
/// record would not decode or encode. Nothing of that input is committed; the partition worker
/// tries it again, and never acts on a default in place of stored state.
pub type EngineError = StateError;

/// The result of an engine decision.
pub type EngineResult<T = ()> = Result<T, EngineError>;

/// Decides the consequences of events, timers and attempt outcomes.
///
/// Every method either succeeds, and its effects are committed with the input's removal, or
/// fails, and the worker commits nothing of that batch and tries it again.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Handles one accepted event of `partition`.
    async fn on_event(
        &self,
        partition: PartitionId,
        event: &Event,
        effects: &mut Effects,
    ) -> EngineResult;

    /// Handles one due timer of `partition`.
    async fn on_timer(
        &self,
        partition: PartitionId,
        timer: &Timer,
        effects: &mut Effects,
    ) -> EngineResult;

    /// Evaluates a page of a run's audience in `partition`.
    async fn on_run_shard(
        &self,
        _partition: PartitionId,
        _campaign: &str,
        _run: &str,
        _after: &str,
        _effects: &mut Effects,
    ) -> EngineResult {
        Ok(())
    }

    /// Goes on fanning a run out, from partition `from`.
    async fn on_fan_out(
        &self,
        _partition: PartitionId,
        _campaign: &str,
        _run: &str,
        _from: u32,
        _effects: &mut Effects,
    ) -> EngineResult {
        Ok(())
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
    ) -> EngineResult {
        Ok(())
    }

    /// Handles a request to send a delivery again.
    async fn on_redeliver(
        &self,
        _partition: PartitionId,
        _delivery: &str,
        _effects: &mut Effects,
    ) -> EngineResult {
        Ok(())
    }

    /// Records the outcome of an attempt this partition dispatched.
    async fn on_outcome(
        &self,
        _partition: PartitionId,
        _outcome: &Outcome,
        _effects: &mut Effects,
    ) -> EngineResult {
        Ok(())
    }

    /// Called when a batch of `partition` failed and nothing of it was committed: whatever
    /// the engine kept in memory of that batch's decisions must go.
    fn on_abort(&self, _partition: PartitionId) {}

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

    /// Deletes a page of what has outlived its retention, scanning from after the record
    /// `after` (from the start when `None`). Returns where to go on from, or `None` when the
    /// pass is done.
    async fn sweep(
        &self,
        _partition: PartitionId,
        _after: Option<&str>,
        _effects: &mut Effects,
    ) -> EngineResult<Option<String>> {
        Ok(None)
    }
}

/// An engine that consumes events and timers without consequences.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopEngine;

#[async_trait::async_trait]
impl Engine for NoopEngine {
    async fn on_event(&self, _: PartitionId, _: &Event, _: &mut Effects) -> EngineResult {
        Ok(())
    }

    async fn on_timer(&self, _: PartitionId, _: &Timer, _: &mut Effects) -> EngineResult {
        Ok(())
    }
}

/// A run's shard: (campaign, run, partition).
type ShardId = (String, String, PartitionId);

/// How long an interval timer waits for the activation that scheduled it to be stored; past
/// that, the activation did not happen and the chain ends.
const ACTIVATION_WAIT_MS: i64 = 60_000;

/// A contact's standing in a campaign: (partition, contact, campaign).
type StandingId = (PartitionId, String, String);

/// What the campaign engine needs.
pub struct CampaignEngine {
    state: State,
    /// Fresh reads of definitions, for decisions that must not act on a stale cache.
    campaign_defs: Definitions<Campaign>,
    segment_defs: Definitions<crate::segment::Segment>,
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
    shards: std::sync::Mutex<std::collections::HashMap<ShardId, crate::campaign::Shard>>,
    statuses:
        std::sync::Mutex<std::collections::BTreeMap<StandingId, crate::status::CampaignStatus>>,
    /// The contacts of the owned partitions.
    contacts: Arc<ContactCache>,
    /// Where decisions read the time.
    clock: crate::clock::Clock,
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

impl CampaignEngine {
    /// Returns an engine.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        state: State,
        campaigns: Cache<Campaign>,
        webhooks: Cache<Webhook>,
        templates: Arc<Templates>,
        cipher: Cipher,
        dispatcher: Dispatcher,
        partitions: u32,
        retention: std::time::Duration,
    ) -> Self {
        Self {
            state,
            campaign_defs: Definitions::new(store.clone(), "campaign", "campaigns"),
            segment_defs: Definitions::new(store, "segment", "segments"),
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
            clock: crate::clock::Clock::system(),
        }
    }

    /// Returns the engine reading the time from `clock`.
    pub fn with_clock(mut self, clock: crate::clock::Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Returns the cache of the owned partitions' contacts.
    pub fn contact_cache(&self) -> &Arc<ContactCache> {
        &self.contacts
    }

    /// Returns a run's counters in one partition; a shard not written yet starts at zero.
    async fn shard(&self, key: &ShardId) -> EngineResult<crate::campaign::Shard> {
        if let Some(shard) = self.shards.lock().unwrap_or_else(|p| p.into_inner()).get(key) {
            return Ok(shard.clone());
        }
        let (campaign, run, partition) = key;
        Ok(self.state.shard(campaign, run, *partition).await?.unwrap_or_default())
    }

    fn save_shard(
        &self,
        key: ShardId,
        shard: crate::campaign::Shard,
        effects: &mut Effects,
    ) -> EngineResult {
        effects.writes.push(Write::shard(&key.0, &key.1, key.2, &shard)?);
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        if shards.len() > 100_000 {
            shards.clear();
        }
        shards.insert(key, shard);
        Ok(())
    }

    /// Whether a delivery is finished and its retention has ended.
    fn expired(&self, delivery: &Delivery, now: i64) -> bool {
        matches!(delivery.status, Status::Delivered | Status::Failed | Status::Skipped)
            && delivery.updated_ms + self.retention_ms <= now
    }

    /// Writes a finished delivery. The partition's sweep deletes it once its retention ends.
    fn finish(&self, delivery: &Delivery, effects: &mut Effects) -> EngineResult {
        effects.writes.push(Write::delivery(delivery)?);
        Ok(())
    }

    /// Reads a contact from the store: an event must see the contact as it was when the event
    /// was published, which the cache (trailing the store by its watch) does not promise.
    /// A contact never upserted has no attributes and is subscribed; one that cannot be read
    /// is an error, never a default.
    async fn fresh_contact(&self, partition: PartitionId, id: &str) -> EngineResult<Contact> {
        let ahead = {
            let ahead = self.prefetched.lock().unwrap_or_else(|p| p.into_inner());
            ahead.get(&partition).and_then(|p| p.get(id)).cloned()
        };
        if let Some(found) = ahead {
            return Ok(found.unwrap_or_default());
        }
        Ok(self.state.contact(partition, id).await?.unwrap_or_default())
    }

    /// Returns a contact from the owner's cache, or from the store while the cache loads.
    async fn cached_contact(&self, partition: PartitionId, id: &str) -> EngineResult<Contact> {
        self.contacts.start(&self.state, partition);
        match self.contacts.get(partition, id) {
            Some(found) => Ok(found.unwrap_or_default()),
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
    fn start_attempt(
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
    fn schedule_attempt(
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

    async fn interval(
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

    /// Reads a campaign from the store (fresh, for decisions that must not act on a stale
    /// state such as a paused campaign); `None` when it was deleted.
    async fn campaign(&self, id: &str) -> EngineResult<Option<Campaign>> {
        match self.campaign_defs.get(id).await {
            Ok(found) => Ok(Some(found.value)),
            Err(DefsError::NotFound { .. }) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    async fn read_delivery(
        &self,
        partition: PartitionId,
        id: &str,
    ) -> EngineResult<Option<Delivery>> {
        self.state.delivery(partition, id).await
    }
}

impl CampaignEngine {
    async fn status(
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
    fn save_status(
        &self,
        partition: PartitionId,
        contact: &str,
        campaign: &str,
        status: crate::status::CampaignStatus,
        effects: &mut Effects,
    ) -> EngineResult {
        effects.writes.push(Write::standing(partition, contact, campaign, &status)?);
        let key = (partition, contact.to_string(), campaign.to_string());
        let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        if statuses.len() > 200_000 {
            statuses.clear();
        }
        statuses.insert(key, status);
        Ok(())
    }

    /// Records a finished delivery in the contact's standing and starts the waits of the
    /// follow-up campaigns that follow it.
    async fn finished(
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
                    traceparent: delivery.traceparent.clone(),
                },
            });
        }
        Ok(())
    }

    /// Returns when a send to the contact may happen under the campaign's send window, if
    /// that is later than now.
    fn window_opening(&self, campaign: &Campaign, contact: &serde_json::Value) -> Option<i64> {
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

    /// Evaluates a filter or rule; an expression that fails to evaluate (a missing attribute,
    /// a type mismatch) does not hold, and says why in the debug log.
    fn holds(&self, source: &str, vars: &[(&str, &serde_json::Value)]) -> bool {
        match self.programs.evaluate(source, vars) {
            Ok(holds) => holds,
            Err(error) => {
                tracing::debug!(expression = source, %error, "expression failed; it does not hold");
                false
            }
        }
    }

    /// Returns the contact's standing in every campaign it has one in, by campaign id: the
    /// store's copy overlaid with this owner's newer writes.
    async fn standings(
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

    /// Copies the fields the campaign captures from a 2xx JSON response into the contact's
    /// attributes. A response that is not JSON, or lacks a field, leaves that attribute as it
    /// was.
    async fn capture(
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

    /// Ends a follow-up's wait: sends unless the contact interacted first.
    async fn follow_up(
        &self,
        partition: PartitionId,
        id: &str,
        contact_id: &str,
        (after, since_ms, traceparent): (&str, i64, &str),
        effects: &mut Effects,
    ) -> EngineResult {
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
            .find(|k| status.interactions.get(*k).is_some_and(|at| *at >= since_ms))
        {
            tracing::info!(campaign = %id, contact = %contact_id, interaction = %kind, "follow-up not needed");
            return Ok(());
        }
        let own = self.status(partition, contact_id, id).await?;
        if own.exited_at_ms.is_some_and(|at| at >= since_ms) {
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

/// Counts `count` contacts of a campaign's runs with this outcome.
fn run_contacts(campaign: &str, outcome: &'static str, count: u64) {
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

fn put_delivery(delivery: &Delivery) -> EngineResult<Write> {
    Write::delivery(delivery)
}

#[async_trait::async_trait]
impl Engine for CampaignEngine {
    async fn on_event(
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

    async fn on_timer(
        &self,
        partition: PartitionId,
        timer: &Timer,
        effects: &mut Effects,
    ) -> EngineResult {
        match &timer.kind {
            TimerKind::Interval { campaign, occurrence_ms, generation } => {
                self.interval(partition, campaign, *occurrence_ms, *generation, effects).await
            }
            TimerKind::Run { campaign, run } => {
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
            TimerKind::RunShard { campaign, run, after } => {
                self.on_run_shard(partition, campaign, run, after, effects).await
            }
            TimerKind::FollowUp { campaign, contact, after_campaign, since_ms, traceparent } => {
                let wait = (after_campaign.as_str(), *since_ms, traceparent.as_str());
                self.follow_up(partition, campaign, contact, wait, effects).await
            }
            TimerKind::Expire { delivery } => {
                let Some(found) = self.read_delivery(partition, delivery).await? else {
                    return Ok(());
                };
                if self.expired(&found, self.clock.now_ms()) {
                    effects.writes.push(Write::remove_delivery(partition, delivery));
                }
                Ok(())
            }
            TimerKind::Attempt { delivery } => {
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
                        delivery.reason =
                            format!("webhook {} no longer exists", delivery.webhook_id);
                        delivery.updated_ms = self.clock.now_ms();
                        effects.writes.push(put_delivery(&delivery)?);
                        Ok(())
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

    async fn on_run_shard(
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

    async fn on_interaction(
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

    async fn on_redeliver(
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

    async fn on_outcome(
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

    async fn prefetch_events(
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

    async fn prefetch_outcomes(
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

    fn on_claim(&self, partition: PartitionId, owned: &tokio_util::sync::CancellationToken) {
        self.contacts.own(partition, owned.clone());
        self.on_abort(partition);
    }

    fn on_abort(&self, partition: PartitionId) {
        self.prefetched.lock().unwrap_or_else(|p| p.into_inner()).remove(&partition);
        self.statuses.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.0 != partition);
        self.shards.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.2 != partition);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::campaign::{Audience, SendWindow};
    use crate::clock::Clock;
    use crate::delivery::dispatch::DispatchOptions;
    use crate::delivery::retry::Verdict;
    use crate::store::{EmbeddedStore, FlakyStore};
    use crate::webhook::{Method, RetryPolicy};

    /// 2026-12-01 20:00:00 UTC, a Tuesday.
    const EVENING_MS: i64 = 1_796_155_200_000;

    struct Setup {
        engine: CampaignEngine,
        store: Arc<FlakyStore>,
        clock: Clock,
        _dir: tempfile::TempDir,
        _stop: tokio_util::sync::CancellationToken,
    }

    fn webhook() -> Webhook {
        Webhook {
            description: String::new(),
            url: "https://example.com/{{ contact.id }}".into(),
            method: Method::Post,
            headers: Vec::new(),
            body: "{}".into(),
            content_type: "application/json".into(),
            timeout_ms: 1_000,
            retry: RetryPolicy::default(),
            rate_limit: 0.0,
            max_in_flight: 0,
            signing_secrets: Vec::new(),
            enabled: true,
            disabled_reason: String::new(),
            disabled_at_ms: None,
            labels: Default::default(),
            created_at_ms: 0,
            updated_at_ms: 0,
            oauth2: None,
            client_certificate: None,
        }
    }

    fn campaign(trigger: Trigger) -> Campaign {
        Campaign {
            description: String::new(),
            webhook_id: "hook".into(),
            audience: Audience::default(),
            trigger,
            rules: Vec::new(),
            frequency_cap: None,
            send_window: None,
            start_ms: None,
            end_ms: None,
            exit_events: Vec::new(),
            data: Default::default(),
            capture: Default::default(),
            state: CampaignState::Active,
            generation: 1,
            activated_at_ms: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn on_event(kind: &str) -> Trigger {
        Trigger::Event { event_type: kind.into(), filter: String::new() }
    }

    async fn setup(campaigns: Vec<(&str, Campaign)>) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let inner = EmbeddedStore::open(&dir.path().join("t.redb")).expect("store");
        let store = FlakyStore::new(Arc::new(inner));
        let shared: Arc<dyn Store> = store.clone();
        let webhook_defs = Definitions::new(shared.clone(), "webhook", "webhooks");
        webhook_defs.create("hook", &webhook()).await.expect("webhook");
        let campaign_defs = Definitions::new(shared.clone(), "campaign", "campaigns");
        for (id, campaign) in campaigns {
            campaign_defs.create(id, &campaign).await.expect("campaign");
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let webhooks = Cache::start(webhook_defs.clone(), stop.clone()).await.expect("cache");
        let campaigns = Cache::start(campaign_defs, stop.clone()).await.expect("cache");
        let cipher = Cipher::from_base64(&Cipher::generate_key()).expect("cipher");
        let live = Arc::new(std::sync::atomic::AtomicUsize::new(1));
        let dispatcher = Dispatcher::new(
            webhooks.clone(),
            webhook_defs,
            cipher.clone(),
            "test".into(),
            live,
            DispatchOptions::default(),
        )
        .expect("dispatcher");
        let clock = Clock::manual(EVENING_MS);
        let engine = CampaignEngine::new(
            shared.clone(),
            State::new(shared),
            campaigns,
            webhooks,
            Arc::new(Templates::new()),
            cipher,
            dispatcher,
            1,
            Duration::from_secs(3600),
        )
        .with_clock(clock.clone());
        Setup { engine, store, clock, _dir: dir, _stop: stop }
    }

    fn event(kind: &str, contact: &str, at_ms: i64) -> Event {
        Event {
            id: format!("evt-{contact}-{at_ms}"),
            kind: kind.into(),
            contact_id: contact.into(),
            data: Default::default(),
            occurred_ms: at_ms,
            accepted_ms: at_ms,
            resume_after: None,
            exits_after: None,
            traceparent: String::new(),
        }
    }

    fn delivered(job: Job, at_ms: i64) -> Outcome {
        let attempt = Attempt {
            start_ms: at_ms,
            duration_ms: 5,
            status_code: 200,
            error_class: ErrorClass::None,
            error: String::new(),
            response_headers: Default::default(),
            response_body: Vec::new(),
            node: "test".into(),
        };
        Outcome { job, attempt: Some(attempt), verdict: Verdict::Success, deferred_until_ms: None }
    }

    #[tokio::test]
    async fn a_follow_up_waits_its_delay_and_is_not_sent_after_a_click() {
        let follow_up = Trigger::FollowUp {
            after_campaign_id: "email".into(),
            on_status: vec!["delivered".into()],
            delay_ms: 60_000,
            unless_interactions: vec!["clicked".into()],
        };
        let t = setup(vec![("email", campaign(on_event("urgent"))), ("sms", campaign(follow_up))])
            .await;
        let mut waits = Vec::new();
        for contact in ["clicks", "ignores"] {
            let mut effects = Effects::default();
            let now = t.clock.now_ms();
            t.engine
                .on_event(0, &event("urgent", contact, now), &mut effects)
                .await
                .expect("event");
            let job = effects.dispatch.pop().expect("the email is sent");
            let mut effects = Effects::default();
            t.engine.on_outcome(0, &delivered(job, now), &mut effects).await.expect("outcome");
            let wait = effects.timers.pop().expect("the follow-up waits");
            assert_eq!(wait.due_ms, now + 60_000, "the wait starts when the email is delivered");
            waits.push(wait);
        }
        let mut effects = Effects::default();
        let now = t.clock.now_ms();
        t.engine
            .on_interaction(0, "clicks", "email", "", "clicked", now + 10, &mut effects)
            .await
            .expect("click");
        t.clock.advance(60_000);
        let mut sent = Vec::new();
        for wait in &waits {
            let mut effects = Effects::default();
            t.engine.on_timer(0, wait, &mut effects).await.expect("wait ends");
            sent.extend(effects.dispatch.into_iter().map(|job| job.delivery.contact_id));
        }
        assert_eq!(sent, vec!["ignores".to_string()]);
    }

    #[tokio::test]
    async fn a_send_outside_the_window_waits_for_it_to_open() {
        let mut business_hours = campaign(on_event("notice"));
        business_hours.send_window =
            Some(SendWindow { days: vec![], start_minute: 9 * 60, end_minute: 17 * 60 });
        let t = setup(vec![("notice", business_hours)]).await;
        let mut effects = Effects::default();
        let now = t.clock.now_ms();
        t.engine
            .on_event(0, &event("notice", "night-owl", now), &mut effects)
            .await
            .expect("event");
        assert!(effects.dispatch.is_empty(), "nothing is sent at 20:00");
        let attempt = effects.timers.pop().expect("the attempt is scheduled");
        assert_eq!(attempt.due_ms, EVENING_MS + 13 * 3_600_000, "the next day at 09:00");
    }

    #[tokio::test]
    async fn a_read_that_fails_is_an_error_never_a_default() {
        let every = crate::campaign::IntervalTrigger {
            every_ms: 60_000,
            cron: String::new(),
            timezone: String::new(),
            start_ms: None,
            end_ms: None,
            misfire: crate::schedule::Misfire::Skip,
            misfire_limit: 0,
        };
        let t = setup(vec![
            ("notice", campaign(on_event("notice"))),
            ("tick", campaign(Trigger::Interval(every))),
        ])
        .await;
        t.store.fail_reads(true);
        let mut effects = Effects::default();
        let now = t.clock.now_ms();
        let decided = t.engine.on_event(0, &event("notice", "someone", now), &mut effects).await;
        assert!(decided.is_err(), "an unreadable contact is not a subscribed one");
        let tick = Timer {
            id: "tick-1".into(),
            due_ms: now,
            kind: TimerKind::Interval {
                campaign: "tick".into(),
                occurrence_ms: now,
                generation: 1,
            },
        };
        let mut effects = Effects::default();
        assert!(t.engine.on_timer(0, &tick, &mut effects).await.is_err(), "the chain is kept");

        // Once reads work again the same inputs decide as they should.
        t.store.fail_reads(false);
        let mut effects = Effects::default();
        t.engine.on_event(0, &event("notice", "someone", now), &mut effects).await.expect("event");
        assert_eq!(effects.dispatch.len(), 1);
        let mut effects = Effects::default();
        t.engine.on_timer(0, &tick, &mut effects).await.expect("interval");
        assert!(
            effects.timers.iter().any(|t| matches!(t.kind, TimerKind::Interval { .. })),
            "the interval chain goes on: {:?}",
            effects.timers
        );
    }
}
