//! The seam between the partition machinery and what events and timers mean, and the engine
//! that gives them their meaning: campaigns and deliveries.
//!
//! A partition worker hands each event, due timer and attempt outcome to the [`Engine`], which
//! says what to write in return; the worker commits those writes together with the removal of
//! the inbox entry or timer, in one transaction guarded by its epoch, and only then starts the
//! HTTP attempts the engine asked for. An engine never writes partition state itself, so
//! fencing covers everything it decides.
//!
//! The campaign engine is split by concern, each module adding the methods of one:
//! - `events`: event campaigns and exit events;
//! - `runs`: runs, their fan-out and the audience evaluation of each partition's shard;
//! - `intervals`: interval firings, missed occurrences and the next firing;
//! - `follow_ups`: the waits after a delivery and the follow-up sent when one ends;
//! - `deliveries`: the delivery life cycle (render, attempt, outcome, retry, redelivery,
//!   retention);
//! - `standing`: a contact's standing per campaign and the guards that read it (rules,
//!   frequency caps, send windows), and interactions.
//!
//! Decisions read the time from an injected [`crate::clock::Clock`], so the unit tests in
//! `tests` drive it.

mod deliveries;
mod events;
mod follow_ups;
mod intervals;
mod runs;
mod standing;

use std::sync::Arc;

use crate::campaign::Campaign;
use crate::cluster::PartitionId;
use crate::contact::{Contact, ContactCache};
use crate::defs::{Cache, Definitions, DefsError};
use crate::delivery::dispatch::{Dispatcher, Job, Outcome};
use crate::delivery::record::Delivery;
use crate::inbox::Event;
use crate::rules::Programs;
use crate::secrets::Cipher;
use crate::state::{State, StateError, TimerRef, Write};

use crate::template::Templates;
use crate::timers::{Timer, TimerKind};
use crate::webhook::Webhook;

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

    /// Called when every batch `partition` decided so far is committed: what the engine kept
    /// in memory of them may go, since the store now holds it.
    fn on_commit(&self, _partition: PartitionId) {}

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

    /// Returns an attempt of a job of this partition, for the partition's worker to run on
    /// its own tasks; `None` for an engine that sends nothing.
    fn attempt(&self, _job: Job) -> Option<futures::future::BoxFuture<'static, Outcome>> {
        None
    }

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

/// A contact's standing in a campaign: (partition, contact, campaign).
type StandingId = (PartitionId, String, String);

/// Run shards and standings kept in memory, past which a partition's entries go once its
/// batches are committed.
const MAX_CACHED_SHARDS: usize = if cfg!(test) { 4 } else { 100_000 };
const MAX_CACHED_STANDINGS: usize = if cfg!(test) { 4 } else { 200_000 };

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
        coordination: &crate::coordination::Coordination,
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
            campaign_defs: coordination.campaigns(),
            segment_defs: coordination.segments(),
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

    /// Reads a campaign from the store (fresh, for decisions that must not act on a stale
    /// state such as a paused campaign); `None` when it was deleted.
    async fn campaign(&self, id: &str) -> EngineResult<Option<Campaign>> {
        match self.campaign_defs.get(id).await {
            Ok(found) => Ok(Some(found.value)),
            Err(DefsError::NotFound { .. }) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Returns a delivery of this partition, `None` when it does not exist.
    async fn read_delivery(
        &self,
        partition: PartitionId,
        id: &str,
    ) -> EngineResult<Option<Delivery>> {
        self.state.delivery(partition, id).await
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
}

#[async_trait::async_trait]
impl Engine for CampaignEngine {
    async fn on_event(
        &self,
        partition: PartitionId,
        event: &Event,
        effects: &mut Effects,
    ) -> EngineResult {
        self.handle_event(partition, event, effects).await
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
                self.start_scheduled_run(partition, campaign, run, effects).await
            }
            TimerKind::RunShard { campaign, run, after } => {
                self.evaluate_shard(partition, campaign, run, after, effects).await
            }
            TimerKind::FollowUp {
                campaign,
                contact,
                after_campaign,
                since_ms,
                origin_ms,
                traceparent,
            } => {
                let wait = (after_campaign.as_str(), *since_ms, *origin_ms, traceparent.as_str());
                self.follow_up(partition, campaign, contact, wait, effects).await
            }
            TimerKind::Expire { delivery } => self.expire(partition, delivery, effects).await,
            TimerKind::Attempt { delivery } => self.attempt_due(partition, delivery, effects).await,
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
        self.continue_fan_out(partition, campaign, run, from, effects).await
    }

    async fn on_run_shard(
        &self,
        partition: PartitionId,
        campaign: &str,
        run: &str,
        after: &str,
        effects: &mut Effects,
    ) -> EngineResult {
        self.evaluate_shard(partition, campaign, run, after, effects).await
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
        self.record_interaction(partition, contact, campaign, delivery, kind, at_ms, effects).await
    }

    async fn on_redeliver(
        &self,
        partition: PartitionId,
        id: &str,
        effects: &mut Effects,
    ) -> EngineResult {
        self.redeliver(partition, id, effects).await
    }

    async fn on_outcome(
        &self,
        partition: PartitionId,
        outcome: &Outcome,
        effects: &mut Effects,
    ) -> EngineResult {
        self.record_outcome(partition, outcome, effects).await
    }

    async fn prefetch_events(
        &self,
        partition: PartitionId,
        events: &[&Event],
        at_least: crate::store::Revision,
    ) {
        self.read_ahead_contacts(partition, events, at_least).await
    }

    async fn prefetch_outcomes(
        &self,
        partition: PartitionId,
        outcomes: &[Outcome],
        at_least: crate::store::Revision,
    ) {
        self.read_ahead_standings(partition, outcomes, at_least).await
    }

    fn attempt(&self, job: Job) -> Option<futures::future::BoxFuture<'static, Outcome>> {
        Some(Box::pin(self.dispatcher.job(job)))
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
        self.sweep_expired(partition, after, effects).await
    }

    fn on_claim(&self, partition: PartitionId, owned: &tokio_util::sync::CancellationToken) {
        self.contacts.own(partition, owned.clone());
        self.on_abort(partition);
    }

    fn on_commit(&self, partition: PartitionId) {
        // Only between batches: within one, the copy is newer than the store, and a batch's
        // later decisions must read what its earlier ones wrote. Only this partition's entries
        // go: the other partitions' batches may be under way.
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        if shards.len() > MAX_CACHED_SHARDS {
            shards.retain(|key, _| key.2 != partition);
        }
        drop(shards);
        let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        if statuses.len() > MAX_CACHED_STANDINGS {
            statuses.retain(|key, _| key.0 != partition);
        }
    }

    fn on_abort(&self, partition: PartitionId) {
        self.prefetched.lock().unwrap_or_else(|p| p.into_inner()).remove(&partition);
        self.statuses.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.0 != partition);
        self.shards.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| k.2 != partition);
    }
}

#[cfg(test)]
mod tests;
