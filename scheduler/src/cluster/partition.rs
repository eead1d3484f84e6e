//! The work of one owned partition: consume its inbox and fire its timers.
//!
//! Invariant: every write this worker makes is one transaction that compares the create
//! revision of `owners/{p}` with the worker's epoch. When that compare fails, another node owns
//! the partition (or nobody does): the worker stops at once, without retrying.
//!
//! A transaction whose outcome is unknown (the store did not answer) is retried; the retry also
//! checks that the batch's first key still exists, so a batch that did commit is recognised
//! instead of applied twice.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::PartitionId;
use crate::delivery::dispatch::{Job, Outcome};
use crate::engine::{Effects, Engine};
use crate::inbox::InboxEntry;
use crate::keys;
use crate::store::{
    Compare, CompareOp, EventKind, Op, OpResult, Revision, Store, StoreError, Txn, WatchStream,
};
use crate::timers::{Timer, TimerIndex};

/// Operations per transaction, below etcd's limit of 128 with room for the guard.
const MAX_BATCH_OPS: usize = 120;
/// Timers fired per transaction.
const TIMER_BATCH: usize = 64;
/// How far ahead the worker reads stored timers while idle, in milliseconds.
const READ_AHEAD_MS: i64 = 5_000;
/// Stored timers read per read-ahead request.
const READ_AHEAD_PAGE: usize = 512;
/// The most stored timers a partition holds in memory: a read-ahead stops there.
const READ_AHEAD_MAX: usize = 4_096;
/// How long a batch waits for the attempts it started, to record their outcomes in its own
/// transaction.
const RECORD_WAIT: Duration = Duration::from_millis(20);

/// Live figures of an owned partition, read by ListPartitions.
#[derive(Debug, Default)]
pub struct PartitionStats {
    /// Timers waiting to fire.
    pub pending_timers: AtomicU64,
    /// Inbox entries not yet processed.
    pub inbox_backlog: AtomicU64,
    /// Whether the worker has loaded its timers and inbox (the figures above mean nothing before).
    pub loaded: std::sync::atomic::AtomicBool,
}

/// Why a worker stopped.
#[derive(Debug)]
pub(crate) enum Exit {
    /// Asked to stop (handoff, shutdown or lost lease).
    Cancelled,
    /// Its epoch no longer matches the owner key: another node owns the partition.
    Fenced,
}

pub(crate) struct Worker {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) committer: Arc<super::committer::Committer>,
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) partition: PartitionId,
    pub(crate) epoch: Revision,
    pub(crate) stats: Arc<PartitionStats>,
    /// `{node}/{epoch}`, written to `p/{p}/applied` by every batch so that etcd's history
    /// shows who made each partition write.
    pub(crate) signature: Vec<u8>,
    /// The newest store revision this worker knows of (its epoch, its last commit, the
    /// inbox entries it has seen): its reads must reflect at least that much.
    pub(crate) seen: std::sync::atomic::AtomicI64,
}

enum Outcome_ {
    Applied,
    Fenced,
}

impl Worker {
    fn saw(&self, revision: Revision) {
        self.seen.fetch_max(revision, Ordering::Relaxed);
    }

    fn seen(&self) -> Revision {
        self.seen.load(Ordering::Relaxed)
    }

    fn guard(&self) -> Compare {
        Compare::create_revision(keys::owner(self.partition), CompareOp::Equal, self.epoch)
    }

    /// Commits `ops` under the epoch guard, retrying while the store is unavailable.
    async fn commit(
        &self,
        ops: Vec<Op>,
        witness: &str,
        cancel: &CancellationToken,
    ) -> Result<Outcome_, Exit> {
        let mut pause = Duration::from_millis(50);
        let mut first = true;
        loop {
            let mut txn = Txn::new()
                .when([self.guard()])
                .and_then(
                    ops.iter()
                        .cloned()
                        .chain([Op::put(keys::applied(self.partition), self.signature.clone())]),
                )
                .or_else([Op::get(keys::owner(self.partition))]);

            if !first {
                // The previous attempt may have committed: require the witness to still exist.
                txn.when.push(Compare::present(witness.to_string()));
            }
            match self.committer.txn(txn).await {
                Ok(result) if result.succeeded => {
                    self.saw(result.revision);
                    return Ok(Outcome_::Applied);
                }
                Ok(result) => {
                    let still_ours = matches!(result.results.first(),
                        Some(OpResult::Get(Some(kv))) if kv.create_revision == self.epoch);
                    // Read after the earlier attempt committed, when it did.
                    self.saw(result.revision);
                    return Ok(if still_ours && !first {
                        Outcome_::Applied
                    } else {
                        Outcome_::Fenced
                    });
                }
                Err(error) if error.is_retryable() => {
                    debug!(partition = self.partition, %error, "partition write failed; retrying");
                    first = false;
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Exit::Cancelled),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(error) => {
                    // A request the store refuses will not pass by retrying; dropping the
                    // partition lets a fresh owner (maybe a newer version) pick it up.
                    warn!(partition = self.partition, %error, "partition write refused; dropping the partition");
                    return Ok(Outcome_::Fenced);
                }
            }
        }
    }

    /// Retries a read while the store is unavailable.
    async fn read<T, F, Fut>(&self, cancel: &CancellationToken, mut read: F) -> Result<T, Exit>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut pause = Duration::from_millis(50);
        loop {
            match read().await {
                Ok(value) => return Ok(value),
                Err(error) => {
                    debug!(partition = self.partition, %error, "partition read failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Exit::Cancelled),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    pub(crate) async fn run(self, cancel: CancellationToken) -> Exit {
        match self.run_inner(&cancel).await {
            Ok(never) => match never {},
            Err(exit) => exit,
        }
    }

    async fn run_inner(
        &self,
        cancel: &CancellationToken,
    ) -> Result<std::convert::Infallible, Exit> {
        // Cancelled when this function returns, however it does.
        let owned = cancel.child_token();
        let _owned = owned.clone().drop_guard();
        self.engine.on_claim(self.partition, &owned);
        let mut index = self.load_timers(cancel).await?;
        let (mut pending, mut loaded, mut stream) = self.load_inbox(cancel).await?;
        info!(
            partition = self.partition,
            epoch = self.epoch,
            timers = index.len(),
            inbox = pending.len(),
            "partition started"
        );
        // Outcomes of this worker's attempts come back here; when the worker stops, late
        // outcomes are dropped and the attempts' visibility timers take over.
        let (reply, mut outcomes) = mpsc::unbounded_channel();
        let sweep_every = self.engine.sweep_every();
        // Spread the partitions' sweeps over the interval.
        let mut next_sweep = sweep_every.map(|every| {
            tokio::time::Instant::now() + every.mul_f64(rand::random::<f64>().max(0.1))
        });
        let mut sweep_from = Vec::new();
        loop {
            self.stats.pending_timers.store(index.len(), Ordering::Relaxed);
            self.stats.inbox_backlog.store(pending.len() as u64, Ordering::Relaxed);
            self.stats.loaded.store(true, Ordering::Release);

            if cancel.is_cancelled() {
                return Err(Exit::Cancelled);
            }
            if let Ok(outcome) = outcomes.try_recv() {
                self.process_outcomes(outcome, &mut outcomes, &mut index, cancel, &reply).await?;
                continue;
            }
            if !pending.is_empty() {
                self.process_inbox(&mut pending, &mut index, cancel, &reply).await?;
                continue;
            }
            let now = crate::now_ms();
            if index.next_due().is_some_and(|due| due <= now) {
                self.fire_timers(&mut index, now, cancel, &reply).await?;
                continue;
            }
            // Idle: read the timers of the next seconds now, rather than when they fall due.
            if index.next_due().is_some_and(|due| due <= now + READ_AHEAD_MS)
                && !self.reads_ahead(&index, now + READ_AHEAD_MS / 2)
                && index.ahead_len() < READ_AHEAD_MAX
            {
                self.read_ahead(&mut index, now, cancel).await?;
                continue;
            }
            if let (Some(at), Some(every)) = (next_sweep, sweep_every)
                && at <= tokio::time::Instant::now()
            {
                let mut effects = Effects::default();
                let more = self.engine.sweep(self.partition, &sweep_from, &mut effects).await;
                if let Some(Op::Delete { key }) = effects.ops.first() {
                    let mut batch = Batch {
                        witness: Some(String::from_utf8_lossy(key).into_owned()),
                        ..Default::default()
                    };
                    batch.add(self.partition, effects);
                    self.commit_batch(batch, &mut index, cancel, &reply).await?;
                }
                // A pass that stopped at a full page goes on at once, after the other work.
                next_sweep = Some(
                    tokio::time::Instant::now()
                        + if more.is_some() { Duration::ZERO } else { every },
                );
                sweep_from = more.unwrap_or_default();
                continue;
            }
            let sleep = index.next_due().map_or(Duration::from_secs(3600), |due| {
                Duration::from_millis((due - now).max(0) as u64)
            });
            let sleep = match next_sweep {
                Some(at) => sleep.min(at.saturating_duration_since(tokio::time::Instant::now())),
                None => sleep,
            };
            tokio::select! {
                _ = cancel.cancelled() => return Err(Exit::Cancelled),
                _ = tokio::time::sleep(sleep) => {}
                Some(outcome) = outcomes.recv() => {
                    self.process_outcomes(outcome, &mut outcomes, &mut index, cancel, &reply).await?;
                }
                batch = stream.next() => {
                    // Take every batch already received too, so a backlog is handled in full
                    // transactions rather than one watch message at a time.
                    let mut next = Some(batch);
                    while let Some(batch) = next.take() {
                        match batch {
                            Some(Ok(batch)) => {
                                for event in batch.events {
                                    self.saw(event.kv.mod_revision);
                                    if event.kind != EventKind::Put
                                        || loaded.remove(&event.kv.key)
                                    {
                                        continue;
                                    }
                                    pending.push_back((event.kv.key, event.kv.value));
                                }
                                loaded.clear();
                                next = stream.next().now_or_never();
                            }
                            Some(Err(error)) => {
                                debug!(partition = self.partition, %error, "inbox watch ended; reloading");
                                (pending, loaded, stream) = self.load_inbox(cancel).await?;
                            }
                            None => {
                                (pending, loaded, stream) = self.load_inbox(cancel).await?;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Reads every timer of the partition into a new index, holding on to the stored timers of
    /// the next seconds as a read-ahead would.
    async fn load_timers(&self, cancel: &CancellationToken) -> Result<TimerIndex, Exit> {
        let prefix = keys::timers(self.partition);
        let end = crate::store::prefix_end(prefix.as_bytes());
        let horizon = keys::timers_until(self.partition, crate::now_ms() + READ_AHEAD_MS);
        let mut index = TimerIndex::default();
        let mut ahead = Vec::new();
        // Where the stored timers held stop: at the horizon, or at the first one not held.
        let mut ahead_end = horizon.into_bytes();
        let mut start = prefix.clone().into_bytes();
        loop {
            let page = self.read(cancel, || self.store.range(&start, &end, 10_000)).await?;
            self.saw(page.revision);
            for kv in &page.kvs {
                if let Some(due) = keys::parse_timer_due(&kv.key) {
                    index.add(due);
                }
                if kv.key < ahead_end {
                    if ahead.len() < READ_AHEAD_MAX {
                        ahead.push((kv.key.clone(), kv.value.clone()));
                    } else {
                        ahead_end = kv.key.clone();
                    }
                }
            }
            match page.kvs.last() {
                Some(last) if page.more => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => {
                    index.read_ahead(ahead, ahead_end);
                    return Ok(index);
                }
            }
        }
    }

    /// Returns whether the stored timers held cover every timer due at or before `due_ms`.
    fn reads_ahead(&self, index: &TimerIndex, due_ms: i64) -> bool {
        index.ahead_end() >= keys::timers_until(self.partition, due_ms).as_bytes()
    }

    /// Reads the stored timers due before `now` plus [`READ_AHEAD_MS`] that are not held yet,
    /// a page at most.
    async fn read_ahead(
        &self,
        index: &mut TimerIndex,
        now: i64,
        cancel: &CancellationToken,
    ) -> Result<(), Exit> {
        let start = match index.ahead_end() {
            [] => keys::timers(self.partition).into_bytes(),
            end => end.to_vec(),
        };
        let end = keys::timers_until(self.partition, now + READ_AHEAD_MS).into_bytes();
        // The index knows only timers this worker loaded or committed, all at or before
        // `seen`, so a read reflecting `seen` finds every one of them.
        let page = self
            .read(cancel, || self.store.range_since(&start, &end, READ_AHEAD_PAGE, self.seen()))
            .await?;
        let stop = match page.kvs.last() {
            Some(last) if page.more => {
                let mut key = last.key.clone();
                key.push(0);
                key
            }
            _ => end,
        };
        index.read_ahead(page.kvs.into_iter().map(|kv| (kv.key, kv.value)), stop);
        Ok(())
    }

    /// Reads the inbox and opens a watch on it. Entries put between the read and the watch's
    /// start appear in both; `loaded` remembers them so the watch's copy is skipped.
    #[allow(clippy::type_complexity)]
    async fn load_inbox(
        &self,
        cancel: &CancellationToken,
    ) -> Result<(VecDeque<(Vec<u8>, Vec<u8>)>, HashSet<Vec<u8>>, WatchStream), Exit> {
        let prefix = keys::inbox(self.partition);
        loop {
            let start = self.read(cancel, || self.store.revision()).await?;
            let stream = match self.store.watch(prefix.as_bytes(), start + 1).await {
                Ok(stream) => stream,
                Err(error) => {
                    debug!(partition = self.partition, %error, "cannot watch the inbox; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Exit::Cancelled),
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    }
                }
            };
            let page = self.read(cancel, || self.store.range_prefix(prefix.as_bytes(), 0)).await?;
            self.saw(page.revision);
            let mut kvs = page.kvs;
            kvs.sort_by_key(|kv| kv.mod_revision);
            let loaded =
                kvs.iter().filter(|kv| kv.mod_revision > start).map(|kv| kv.key.clone()).collect();
            let pending = kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
            return Ok((pending, loaded, stream));
        }
    }

    async fn process_inbox(
        &self,
        pending: &mut VecDeque<(Vec<u8>, Vec<u8>)>,
        index: &mut TimerIndex,
        cancel: &CancellationToken,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Result<(), Exit> {
        // Each entry takes at least one write (its removal), so a batch holds at most
        // MAX_BATCH_OPS entries, and one more may be carried into a transaction of its own.
        let mut parsed: VecDeque<serde_json::Result<InboxEntry>> = pending
            .iter()
            .take(MAX_BATCH_OPS + 1)
            .map(|(_, value)| serde_json::from_slice(value))
            .collect();
        // Read ahead the contacts of the events this batch will likely take.
        let events: Vec<&crate::inbox::Event> = parsed
            .iter()
            .filter_map(|entry| match entry {
                Ok(InboxEntry::Event(event)) => Some(event),
                _ => None,
            })
            .collect();
        if !events.is_empty() {
            self.engine.prefetch_events(self.partition, &events, self.seen()).await;
        }
        let mut batch = Batch::default();
        let mut taken = 0;
        let mut carried = None;
        while let Some(entry) = parsed.pop_front() {
            let key = pending[taken].0.clone();
            let effects = self.entry_effects(&key, entry).await;
            // The engine may have cached what these effects write, so they are never dropped:
            // when they do not fit, they go in a transaction of their own right after.
            if taken > 0 && batch.ops.len() + 1 + effects.op_count() > MAX_BATCH_OPS {
                carried = Some((key, effects));
                break;
            }
            batch.consume(key, effects, self.partition);
            taken += 1;
        }
        self.commit_batch(batch, index, cancel, reply).await?;
        pending.drain(..taken);
        if let Some((key, effects)) = carried {
            let mut batch = Batch::default();
            batch.consume(key, effects, self.partition);
            self.commit_batch(batch, index, cancel, reply).await?;
            pending.pop_front();
        }
        Ok(())
    }

    /// Asks the engine what an inbox entry means.
    async fn entry_effects(&self, key: &[u8], entry: serde_json::Result<InboxEntry>) -> Effects {
        let mut effects = Effects::default();
        match entry {
            Ok(InboxEntry::Event(event)) => {
                self.engine.on_event(self.partition, &event, &mut effects).await
            }
            Ok(InboxEntry::Schedule(timer)) => effects.timers.push(timer),
            Ok(InboxEntry::Redeliver { delivery }) => {
                self.engine.on_redeliver(self.partition, &delivery, &mut effects).await
            }
            Ok(InboxEntry::Interaction { contact, campaign, delivery, kind, at_ms }) => {
                self.engine
                    .on_interaction(
                        self.partition,
                        &contact,
                        &campaign,
                        &delivery,
                        &kind,
                        at_ms,
                        &mut effects,
                    )
                    .await
            }
            Ok(InboxEntry::FanOut { campaign, run, from }) => {
                self.engine.on_fan_out(self.partition, &campaign, &run, from, &mut effects).await
            }
            Ok(InboxEntry::RunShard { campaign, run, after }) => {
                self.engine
                    .on_run_shard(self.partition, &campaign, &run, &after, &mut effects)
                    .await
            }
            Err(error) => warn!(
                partition = self.partition,
                key = %String::from_utf8_lossy(key),
                %error,
                "dropping an unreadable inbox entry"
            ),
        }
        effects
    }

    /// Records attempt outcomes, as many as are waiting, in one transaction.
    async fn process_outcomes(
        &self,
        first: Outcome,
        outcomes: &mut mpsc::UnboundedReceiver<Outcome>,
        index: &mut TimerIndex,
        cancel: &CancellationToken,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Result<(), Exit> {
        // Each outcome takes a handful of writes: take as many as one transaction holds.
        const PER_BATCH: usize = MAX_BATCH_OPS / 8;
        // A few transactions' worth at most, so the inbox and timers get their turn.
        const ROUNDS: usize = 4;
        let mut waiting = vec![first];
        for round in 0.. {
            while round < ROUNDS && waiting.len() < PER_BATCH {
                match outcomes.try_recv() {
                    Ok(outcome) => waiting.push(outcome),
                    Err(_) => break,
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            self.engine.prefetch_outcomes(self.partition, &waiting, self.seen()).await;
            let mut batch = Batch::default();
            let mut rest = std::mem::take(&mut waiting).into_iter();
            for outcome in rest.by_ref() {
                let key = crate::delivery::record::key(self.partition, &outcome.job.delivery.id);
                let mut effects = Effects::default();
                self.engine.on_outcome(self.partition, outcome, &mut effects).await;
                batch.witness.get_or_insert(key);
                batch.add(self.partition, effects);
                if batch.ops.len() + 8 > MAX_BATCH_OPS {
                    break;
                }
            }
            waiting.extend(rest);
            self.commit_batch(batch, index, cancel, reply).await?;
        }
        Ok(())
    }

    /// Starts the batch's attempts, commits the batch under the epoch guard, then updates the
    /// timer index.
    ///
    /// The attempts go out before the commit and get up to [`RECORD_WAIT`] to finish: the
    /// outcomes that arrive in time are written by the same transaction, in place of the
    /// `sending` records and visibility timers, which are then never written. A crash before
    /// the commit leaves the batch's inbox entries and timers in place, so the next owner sends
    /// again, with the same delivery ids: the receiver sees a duplicate with the same
    /// `webhook-id`, as with any attempt in flight when its owner died.
    async fn commit_batch(
        &self,
        mut batch: Batch,
        index: &mut TimerIndex,
        cancel: &CancellationToken,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Result<(), Exit> {
        let Some(witness) = batch.witness.clone() else { return Ok(()) };
        let overflow = if batch.dispatch.is_empty() {
            Vec::new()
        } else {
            self.attempt(&mut batch, reply).await
        };
        self.apply(batch, &witness, index, cancel, reply).await?;
        for batch in overflow {
            let Some(witness) = batch.witness.clone() else { continue };
            self.apply(batch, &witness, index, cancel, reply).await?;
        }
        Ok(())
    }

    async fn apply(
        &self,
        batch: Batch,
        witness: &str,
        index: &mut TimerIndex,
        cancel: &CancellationToken,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Result<(), Exit> {
        let ops = collapse(batch.ops);
        let prefix = keys::timers(self.partition);
        let timer_writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put { key, value, .. } if key.starts_with(prefix.as_bytes()) => {
                    Some((key.clone(), Some(value.clone())))
                }
                Op::Delete { key } if key.starts_with(prefix.as_bytes()) => {
                    Some((key.clone(), None))
                }
                _ => None,
            })
            .collect();
        let clears_timers = ops.iter().any(|op| {
            matches!(op, Op::DeletePrefix { prefix: cleared }
                if cleared.starts_with(prefix.as_bytes()) || prefix.as_bytes().starts_with(cleared))
        });
        match self.commit(ops, witness, cancel).await? {
            Outcome_::Applied => {
                for due in batch.removed {
                    index.remove(due);
                }
                for due in batch.added {
                    index.add(due);
                }
                for (key, value) in timer_writes {
                    index.written(&key, value.as_deref());
                }
                if clears_timers {
                    index.forget_ahead();
                }
                for job in batch.dispatch {
                    self.engine.dispatch(job, reply.clone());
                }
                Ok(())
            }
            Outcome_::Fenced => Err(Exit::Fenced),
        }
    }

    /// Dispatches the batch's jobs and folds the outcomes that arrive within [`RECORD_WAIT`]
    /// into it. Outcomes whose writes do not fit are returned as batches to commit right after;
    /// later outcomes reach the worker the usual way.
    async fn attempt(
        &self,
        batch: &mut Batch,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Vec<Batch> {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let mut waiting = batch.dispatch.len();
        for job in batch.dispatch.drain(..) {
            self.engine.dispatch(job, sender.clone());
        }
        drop(sender);
        let deadline = tokio::time::Instant::now() + RECORD_WAIT;
        let mut arrived = Vec::with_capacity(waiting);
        while waiting > 0 {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(outcome)) => {
                    arrived.push(outcome);
                    waiting -= 1;
                }
                _ => break,
            }
        }
        if waiting > 0 {
            // The worker reads these only after this batch has committed.
            let reply = reply.clone();
            tokio::spawn(async move {
                while let Some(outcome) = receiver.recv().await {
                    if reply.send(outcome).is_err() {
                        return;
                    }
                }
            });
        }
        if arrived.is_empty() {
            return Vec::new();
        }
        self.engine.prefetch_outcomes(self.partition, &arrived, self.seen()).await;
        let mut overflow: Vec<Batch> = Vec::new();
        for outcome in arrived {
            let key = crate::delivery::record::key(self.partition, &outcome.job.delivery.id);
            let mut effects = Effects::default();
            self.engine.on_outcome(self.partition, outcome, &mut effects).await;
            let effects = if overflow.is_empty() {
                match batch.absorb(effects, self.partition) {
                    Ok(()) => continue,
                    Err(effects) => effects,
                }
            } else {
                effects
            };
            if overflow.last().is_none_or(|b| b.ops.len() + effects.op_count() > MAX_BATCH_OPS) {
                overflow.push(Batch::default());
            }
            if let Some(last) = overflow.last_mut() {
                last.witness.get_or_insert(key);
                last.add(self.partition, effects);
            }
        }
        overflow
    }

    async fn fire_timers(
        &self,
        index: &mut TimerIndex,
        now: i64,
        cancel: &CancellationToken,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Result<(), Exit> {
        let mut due = index.due_ahead(now, TIMER_BATCH);
        if due.is_empty() && !self.reads_ahead(index, now) {
            self.read_ahead(index, now, cancel).await?;
            due = index.due_ahead(now, TIMER_BATCH);
        }
        if due.is_empty() {
            if self.reads_ahead(index, now) {
                // Another writer removed them (a previous owner's last batch): forget them.
                index.clear_until(now);
            }
            return Ok(());
        }
        let mut batch = Batch::default();
        let mut carried = None;
        for (key, value) in &due {
            let mut effects = Effects::default();
            match serde_json::from_slice::<Timer>(value) {
                Ok(timer) => self.engine.on_timer(self.partition, &timer, &mut effects).await,
                Err(error) => warn!(
                    partition = self.partition,
                    key = %String::from_utf8_lossy(key),
                    %error,
                    "dropping an unreadable timer"
                ),
            }
            // As with inbox entries, effects that do not fit go in a transaction of their own.
            if !batch.ops.is_empty() && batch.ops.len() + 1 + effects.op_count() > MAX_BATCH_OPS {
                carried = Some((key, effects));
                break;
            }
            batch.consume_timer(key, effects, self.partition, now);
        }
        self.commit_batch(batch, index, cancel, reply).await?;
        if let Some((key, effects)) = carried {
            let mut batch = Batch::default();
            batch.consume_timer(key, effects, self.partition, now);
            self.commit_batch(batch, index, cancel, reply).await?;
        }
        Ok(())
    }
}

/// Keeps only the last write to each key: etcd refuses a transaction that writes a key twice,
/// and the last write is the one that would stand.
fn collapse(ops: Vec<Op>) -> Vec<Op> {
    let mut seen = HashSet::new();
    let mut kept: Vec<Op> = ops
        .into_iter()
        .rev()
        .filter(|op| op.written_key().is_none_or(|k| seen.insert(k.clone())))
        .collect();
    kept.reverse();
    kept
}

/// The write that stores a timer.
fn timer_op(partition: PartitionId, timer: &Timer) -> Op {
    let key = keys::timer(partition, timer.due_ms, &timer.id);
    // Timers are plain structs and always serialize.
    Op::put(key, serde_json::to_vec(timer).unwrap_or_default())
}

/// The writes of one transaction and what to do once it commits.
#[derive(Default)]
struct Batch {
    ops: Vec<Op>,
    /// Due times of timers the batch adds and removes, for the index.
    added: Vec<i64>,
    removed: Vec<i64>,
    dispatch: Vec<Job>,
    /// A key the batch deletes or writes, to recognise a batch that did commit.
    witness: Option<String>,
}

impl Batch {
    /// Adds the removal of an inbox entry and the effects it had.
    fn consume(&mut self, key: Vec<u8>, effects: Effects, partition: PartitionId) {
        self.witness.get_or_insert_with(|| String::from_utf8_lossy(&key).into_owned());
        self.ops.push(Op::delete(key));
        self.add(partition, effects);
    }

    /// Adds the removal of a fired timer and the effects it had.
    fn consume_timer(&mut self, key: &[u8], effects: Effects, partition: PartitionId, now: i64) {
        self.witness.get_or_insert_with(|| String::from_utf8_lossy(key).into_owned());
        self.ops.push(Op::delete(key.to_vec()));
        self.removed.push(keys::parse_timer_due(key).unwrap_or(now));
        self.add(partition, effects);
    }

    /// Adds the effects of an outcome of one of this batch's attempts: writes to keys the
    /// batch already writes replace those, and the attempt's visibility timer, written by this
    /// batch, is dropped instead of deleted. Gives the effects back, changing nothing, when the
    /// result would not fit one transaction.
    fn absorb(&mut self, effects: Effects, partition: PartitionId) -> Result<(), Effects> {
        let last = |ops: &[Op], key: &[u8]| {
            ops.iter().rposition(|op| op.written_key().is_some_and(|k| k.as_slice() == key))
        };
        let timers: Vec<(i64, Op)> =
            effects.timers.iter().map(|t| (t.due_ms, timer_op(partition, t))).collect();
        let added = effects
            .ops
            .iter()
            .chain(timers.iter().map(|(_, op)| op))
            .filter(|op| op.written_key().is_none_or(|k| last(&self.ops, k).is_none()))
            .count();
        let dropped = effects
            .cancel_timers
            .iter()
            .filter(|(_, key)| last(&self.ops, key.as_bytes()).is_some())
            .count();
        let deleted = effects.cancel_timers.len() - dropped;
        if self.ops.len() + added + deleted - dropped > MAX_BATCH_OPS {
            return Err(effects);
        }
        for (due, key) in effects.cancel_timers {
            match last(&self.ops, key.as_bytes()) {
                Some(i) => {
                    self.ops.remove(i);
                    if let Some(j) = self.added.iter().position(|d| *d == due) {
                        self.added.swap_remove(j);
                    }
                }
                None => {
                    self.ops.push(Op::delete(key));
                    self.removed.push(due);
                }
            }
        }
        for (due, _) in &timers {
            self.added.push(*due);
        }
        for op in effects.ops.into_iter().chain(timers.into_iter().map(|(_, op)| op)) {
            match op.written_key().and_then(|k| last(&self.ops, k)) {
                Some(i) => self.ops[i] = op,
                None => self.ops.push(op),
            }
        }
        self.dispatch.extend(effects.dispatch);
        Ok(())
    }

    fn add(&mut self, partition: PartitionId, effects: Effects) {
        self.ops.extend(effects.ops);
        for timer in effects.timers {
            self.ops.push(timer_op(partition, &timer));
            self.added.push(timer.due_ms);
        }
        for (due, key) in effects.cancel_timers {
            self.ops.push(Op::delete(key));
            self.removed.push(due);
        }
        self.dispatch.extend(effects.dispatch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_keeps_the_last_write_of_each_key_in_order() {
        let ops = vec![
            Op::put("a", "1"),
            Op::put("b", "1"),
            Op::delete("a"),
            Op::put("c", "1"),
            Op::put("b", "2"),
        ];
        assert_eq!(collapse(ops), vec![Op::delete("a"), Op::put("c", "1"), Op::put("b", "2")]);
    }

    #[test]
    fn an_absorbed_outcome_replaces_the_sending_record_and_drops_the_visibility_timer() {
        let timer = |due_ms: i64| Timer {
            id: "d1".into(),
            due_ms,
            kind: crate::timers::TimerKind::Attempt { delivery: "d1".into() },
        };
        let mut batch = Batch::default();
        batch.consume(
            b"p/0001/inbox/e1".to_vec(),
            Effects {
                ops: vec![Op::put("p/0001/deliveries/d1", "sending")],
                timers: vec![timer(5_000)],
                ..Default::default()
            },
            1,
        );
        assert_eq!((batch.ops.len(), batch.added.clone()), (3, vec![5_000]));
        let outcome = Effects {
            ops: vec![
                Op::put("p/0001/deliveries/d1", "delivered"),
                Op::put("p/0001/status/c", "s"),
            ],
            cancel_timers: vec![(5_000, keys::timer(1, 5_000, "d1"))],
            ..Default::default()
        };
        assert!(batch.absorb(outcome, 1).is_ok());
        assert_eq!(
            batch.ops,
            vec![
                Op::delete("p/0001/inbox/e1"),
                Op::put("p/0001/deliveries/d1", "delivered"),
                Op::put("p/0001/status/c", "s"),
            ]
        );
        assert!(batch.added.is_empty() && batch.removed.is_empty());

        // An outcome that would not fit is given back untouched.
        let mut full = Batch {
            ops: (0..MAX_BATCH_OPS).map(|i| Op::put(format!("k{i}"), "v")).collect(),
            ..Default::default()
        };
        let outcome = Effects { ops: vec![Op::put("other", "v")], ..Default::default() };
        let back = full.absorb(outcome, 1).expect_err("does not fit");
        assert_eq!(back.ops, vec![Op::put("other", "v")]);
        assert_eq!(full.ops.len(), MAX_BATCH_OPS);
    }
}
