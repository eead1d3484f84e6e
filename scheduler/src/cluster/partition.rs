//! The work of one owned partition: consume its inbox and fire its timers.
//!
//! Invariant: every write this worker makes is one transaction that compares the create
//! revision of `owners/{p}` with the worker's epoch. When that compare fails, another node owns
//! the partition (or nobody does): the worker stops at once, without retrying.
//!
//! A transaction whose outcome is unknown (the store did not answer) is retried; the retry also
//! checks that the batch's first key still exists, so a batch that did commit is recognised
//! instead of applied twice.
//!
//! Reads fail closed: when the engine cannot read what a batch needs, the batch is dropped
//! whole (nothing of it is committed, the engine forgets what it kept of it) and the worker
//! tries it again after a pause, until the read succeeds or the partition is lost. Inbox
//! entries, due timers and outcomes stay where they were meanwhile.
//!
//! Outcomes are checked against the dispatch they answer: a delivery sent again (its
//! visibility timer fired while the first attempt was still out) has a higher
//! `dispatch_seq`, and the older attempt's late outcome is dropped instead of overwriting the
//! newer state.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::StoreError;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::PartitionId;
use crate::delivery::dispatch::{Job, Outcome};
use crate::engine::{Effects, Engine, EngineError};
use crate::inbox::InboxEntry;
use crate::state::{Committed, Fence, Key, State, StateResult, TimerRef, Write};
use crate::store::Revision;
use crate::timers::{Timer, TimerIndex, TimerKind};

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
/// How far a visibility timer moves when its attempt is still in flight on this node. After a
/// crash the next owner sends such an attempt again at most this long after it was due.
const VISIBILITY_RECHECK_MS: i64 = 30_000;
/// How long an attempt may stay in flight on this node, waiting for a slot or its webhook's
/// rate limit, before its visibility timer counts it as lost after all (a task that never
/// answers must not hold its delivery forever).
const MAX_IN_FLIGHT_MS: i64 = 3_600_000;

/// The first and the longest pause before a batch whose reads failed is tried again.
const ABORT_PAUSE: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));

/// Batches that failed in a row, and the pause before the next try.
struct Aborts {
    count: u32,
    backoff: crate::backoff::Backoff,
}

impl Aborts {
    fn new() -> Self {
        Self { count: 0, backoff: crate::backoff::Backoff::new(ABORT_PAUSE.0, ABORT_PAUSE.1) }
    }
}

/// Live figures of an owned partition, read by ListPartitions.
#[derive(Debug, Default)]
pub struct PartitionStats {
    /// Timers waiting to fire.
    pub pending_timers: AtomicU64,
    /// Inbox entries not yet processed.
    pub inbox_backlog: AtomicU64,
    /// When the oldest inbox entry not yet processed was accepted, Unix milliseconds; 0 when
    /// there is none.
    pub inbox_oldest_ms: std::sync::atomic::AtomicI64,
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
    /// The store refused one of its writes, which it would refuse again: the partition is
    /// released for a while instead of kept idle. `invalid` when the store said the request
    /// itself is invalid (too large, a value it does not take), not that it failed.
    Refused { invalid: bool },
}

/// What ends one step of the worker early.
enum Halt {
    /// The worker stops.
    Exit(Exit),
    /// The engine could not decide a batch; nothing of it was committed, and it is tried again.
    Abort(EngineError),
}

impl From<Exit> for Halt {
    fn from(exit: Exit) -> Self {
        Halt::Exit(exit)
    }
}

impl From<EngineError> for Halt {
    fn from(error: EngineError) -> Self {
        Halt::Abort(error)
    }
}

pub(crate) struct Worker {
    pub(crate) state: State,
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) partition: PartitionId,
    pub(crate) epoch: Revision,
    pub(crate) stats: Arc<PartitionStats>,
    /// The partition, epoch and signature every batch is guarded by and stamped with.
    pub(crate) fence: Fence,
    /// The newest store revision this worker knows of (its epoch, its last commit, the
    /// inbox entries it has seen): its reads must reflect at least that much.
    pub(crate) seen: std::sync::atomic::AtomicI64,
    /// Each delivery's attempt in flight, by delivery id. Only this worker's task touches it.
    pub(crate) in_flight: std::sync::Mutex<std::collections::HashMap<String, InFlight>>,
    /// How long a worker asked to stop waits for its attempts in flight.
    pub(crate) drain: Duration,
    /// The tasks of this worker's attempts, and what stops those still running when it ends.
    pub(crate) attempts: Attempts,
    /// See [`super::ClusterOptions::max_in_flight`].
    pub(crate) max_in_flight: usize,
    /// Inbox entries still to take one per batch: those of a batch the store refused, so
    /// that the one it refuses on its own is found and set aside.
    pub(crate) split: std::sync::atomic::AtomicUsize,
}

/// The tasks of a partition worker's attempts: each ends with its outcome, or when the
/// worker ends (a handoff, a lost partition, a shutdown) with the attempts it gave up on.
#[derive(Default)]
pub(crate) struct Attempts {
    tasks: tokio_util::task::TaskTracker,
    stop: CancellationToken,
}

impl Attempts {
    /// Runs `attempt` on a task of its own; its outcome goes to `reply`.
    fn spawn(
        &self,
        attempt: impl std::future::Future<Output = Outcome> + Send + 'static,
        reply: mpsc::UnboundedSender<Outcome>,
    ) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                outcome = attempt => {
                    // The worker may be gone: the visibility timer covers the attempt.
                    let _ = reply.send(outcome);
                }
            }
        });
    }

    /// Forwards `outcomes` to `reply` on a task of its own, until the attempts end.
    fn forward(
        &self,
        mut outcomes: mpsc::UnboundedReceiver<Outcome>,
        reply: mpsc::UnboundedSender<Outcome>,
    ) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            loop {
                let outcome = tokio::select! {
                    _ = stop.cancelled() => return,
                    outcome = outcomes.recv() => outcome,
                };
                let Some(outcome) = outcome else { return };
                if reply.send(outcome).is_err() {
                    return;
                }
            }
        });
    }

    /// Stops the attempts still running and waits for their tasks to end: they stop at their
    /// next wait (a slot, the rate limit, the endpoint's answer).
    async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(1), self.tasks.wait()).await.is_err() {
            warn!(tasks = self.tasks.len(), "attempt tasks still running 1 s after being stopped");
        }
    }
}

/// An attempt in flight on this node.
#[derive(Debug)]
pub(crate) struct InFlight {
    /// Which dispatch of its delivery it is: an outcome answering an older one is stale.
    seq: u64,
    /// The visibility timer that stands for it, when that was moved on because the attempt
    /// was still here, with when the first one fell due.
    moved: Option<(TimerRef, i64)>,
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

    fn in_flight(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, InFlight>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns the visibility timer a due attempt timer is replaced by, when it is the timer
    /// of an attempt still in flight on this node — waiting for a slot or its webhook's rate
    /// limit, not lost — unless that attempt has been out for [`MAX_IN_FLIGHT_MS`].
    fn rearm(&self, timer: &Timer, now: i64) -> Option<(String, Timer, i64)> {
        let TimerKind::Attempt { delivery } = &timer.kind else { return None };
        let first_due = match &self.in_flight().get(delivery)?.moved {
            Some((_, first)) => *first,
            None => timer.due_ms,
        };
        if now - first_due > MAX_IN_FLIGHT_MS {
            return None;
        }
        let next = Timer { due_ms: now + VISIBILITY_RECHECK_MS, ..timer.clone() };
        Some((delivery.clone(), next, first_due))
    }

    /// Points an outcome at the visibility timer that stands for its attempt now, so that
    /// recording it cancels that one.
    fn current_visibility(&self, mut outcome: Outcome) -> Outcome {
        if let Some((visibility, _)) =
            self.in_flight().get(&outcome.job.delivery.id).and_then(|f| f.moved.as_ref())
        {
            outcome.job.visibility = visibility.clone();
        }
        outcome
    }

    /// Starts an attempt, remembering which dispatch of its delivery it is.
    fn dispatch(&self, job: Job, reply: mpsc::UnboundedSender<Outcome>) {
        let entry = InFlight { seq: job.delivery.dispatch_seq, moved: None };
        let id = job.delivery.id.clone();
        if let Some(attempt) = self.engine.attempt(job) {
            self.in_flight().insert(id, entry);
            self.attempts.spawn(attempt, reply);
        }
    }

    /// Returns whether an outcome answers the latest dispatch of its delivery.
    fn is_current(&self, outcome: &Outcome) -> bool {
        let delivery = &outcome.job.delivery;
        let current =
            self.in_flight().get(&delivery.id).map(|f| f.seq) == Some(delivery.dispatch_seq);
        if !current {
            debug!(partition = self.partition, delivery = %delivery.id, dispatch_seq = delivery.dispatch_seq, "dropping the outcome of an earlier dispatch");
        }
        current
    }

    /// Forgets the dispatches these committed outcomes answered.
    fn settled<'a>(&self, outcomes: impl IntoIterator<Item = &'a Outcome>) {
        let mut in_flight = self.in_flight();
        for outcome in outcomes {
            let delivery = &outcome.job.delivery;
            if in_flight.get(&delivery.id).map(|f| f.seq) == Some(delivery.dispatch_seq) {
                in_flight.remove(&delivery.id);
            }
        }
    }

    /// Turns a step's result into the worker's next move: on with the loop, or stop. A batch
    /// the engine could not decide is forgotten, and the worker pauses before trying again.
    async fn recover(
        &self,
        step: Result<(), Halt>,
        failures: &mut Aborts,
        cancel: &CancellationToken,
    ) -> Result<(), Exit> {
        let error = match step {
            Ok(()) => {
                failures.count = 0;
                failures.backoff.reset();
                return Ok(());
            }
            Err(Halt::Exit(exit)) => return Err(exit),
            Err(Halt::Abort(error)) => error,
        };
        self.engine.on_abort(self.partition);
        let pause = failures.backoff.pause();
        failures.count += 1;
        warn!(partition = self.partition, %error, failures = failures.count, retry_in_ms = pause.as_millis() as u64, "batch not applied: a read failed; trying again");
        tokio::select! {
            _ = cancel.cancelled() => Err(Exit::Cancelled),
            _ = tokio::time::sleep(pause) => Ok(()),
        }
    }

    /// Commits `writes` under the epoch guard, retrying while the store is unavailable.
    async fn commit(
        &self,
        writes: Vec<Write>,
        witness: &Key,
        cancel: &CancellationToken,
    ) -> Result<Outcome_, Exit> {
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let mut first = true;
        loop {
            // After a failed attempt that may have committed, the witness must still exist.
            let started = std::time::Instant::now();
            let committed =
                self.state.commit(&self.fence, writes.clone(), (!first).then_some(witness)).await;
            let result = match &committed {
                Ok(Committed::Applied(_)) => "applied",
                Ok(Committed::Refused { .. }) => "refused",
                Err(_) => "error",
            };
            let metrics = crate::telemetry::metrics();
            let attributes = [opentelemetry::KeyValue::new("result", result)];
            metrics.txn_duration.record(started.elapsed().as_secs_f64(), &attributes);
            metrics.txn_size.record(writes.len() as u64, &attributes);
            match committed {
                Ok(Committed::Applied(revision)) => {
                    self.saw(revision);
                    return Ok(Outcome_::Applied);
                }
                Ok(Committed::Refused { still_ours, revision }) => {
                    // Read after the earlier attempt committed, when it did.
                    self.saw(revision);
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
                        _ = backoff.wait() => {}
                    }
                }
                Err(error) => {
                    // A request the store refuses will not pass by retrying; releasing the
                    // partition lets another owner (maybe a newer version) pick it up.
                    tracing::error!(partition = self.partition, %error, "partition write refused by the store");
                    let invalid = matches!(error, StoreError::InvalidRequest(_));
                    return Err(Exit::Refused { invalid });
                }
            }
        }
    }

    /// Retries a read while the store is unavailable.
    async fn read<T, E, F, Fut>(&self, cancel: &CancellationToken, mut read: F) -> Result<T, Exit>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            match read().await {
                Ok(value) => return Ok(value),
                Err(error) => {
                    debug!(partition = self.partition, %error, "partition read failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Exit::Cancelled),
                        _ = backoff.wait() => {}
                    }
                }
            }
        }
    }

    pub(crate) async fn run(self, cancel: CancellationToken) -> Exit {
        let exit = match self.run_inner(&cancel).await {
            Ok(never) => match never {},
            Err(exit) => exit,
        };
        self.attempts.stop().await;
        exit
    }

    async fn run_inner(
        &self,
        cancel: &CancellationToken,
    ) -> Result<std::convert::Infallible, Exit> {
        // Cancelled when this function returns, however it does.
        let owned = cancel.child_token();
        let _owned = owned.clone().drop_guard();
        if !self.read(cancel, || self.state.claim(&self.fence)).await? {
            info!(
                partition = self.partition,
                epoch = self.epoch,
                "a newer owner holds the partition"
            );
            return Err(Exit::Fenced);
        }
        self.engine.on_claim(self.partition, &owned);
        let mut index = self.load_timers(cancel).await?;
        let mut feed = self.read(cancel, || self.state.inbox(self.partition)).await?;
        let mut pending: VecDeque<(Key, Vec<u8>)> = VecDeque::new();
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return Err(Exit::Cancelled),
                first = feed.next() => first,
            };
            match first {
                Ok(first) => break self.take_inbox(&mut pending, first),
                Err(error) => {
                    debug!(partition = self.partition, %error, "cannot read the inbox; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        info!(
            partition = self.partition,
            epoch = self.epoch,
            timers = index.len(),
            inbox = pending.len(),
            "partition started"
        );
        // Outcomes of this worker's attempts come back here. A worker asked to stop waits a
        // bounded time for the attempts in flight (see `drain`); outcomes later than that are
        // dropped and the attempts' visibility timers take over.
        let (reply, mut outcomes) = mpsc::unbounded_channel();
        let sweep_every = self.engine.sweep_every();
        // Spread the partitions' sweeps over the interval.
        let mut next_sweep = sweep_every.map(|every| {
            tokio::time::Instant::now() + every.mul_f64(rand::random::<f64>().max(0.1))
        });
        let mut sweep_from: Option<String> = None;
        // Outcomes taken from the channel but not yet recorded (a batch was aborted, or did
        // not hold them all).
        let mut held: VecDeque<Outcome> = VecDeque::new();
        let mut failures = Aborts::new();
        loop {
            self.stats.pending_timers.store(index.len(), Ordering::Relaxed);
            self.stats.inbox_backlog.store(pending.len() as u64, Ordering::Relaxed);
            let oldest = pending.front().and_then(|(key, _)| inbox_time_ms(key)).unwrap_or(0);
            self.stats.inbox_oldest_ms.store(oldest, Ordering::Relaxed);
            self.stats.loaded.store(true, Ordering::Release);

            if cancel.is_cancelled() {
                return Err(self.drain(&mut held, &mut outcomes, &mut index, &reply).await);
            }
            if let Ok(outcome) = outcomes.try_recv() {
                held.push_back(outcome);
            }
            if !held.is_empty() {
                let step = self
                    .process_outcomes(&mut held, &mut outcomes, &mut index, cancel, &reply)
                    .await;
                self.recover(step, &mut failures, cancel).await?;
                continue;
            }
            // A due sweep takes its turn before the inbox, so that retention keeps up under
            // sustained load: a pass alternates its pages with the other work until it is done.
            if let (Some(at), Some(every)) = (next_sweep, sweep_every)
                && at <= tokio::time::Instant::now()
            {
                let mut effects = Effects::default();
                let more = match self
                    .engine
                    .sweep(self.partition, sweep_from.as_deref(), &mut effects)
                    .await
                {
                    Ok(more) => more,
                    Err(error) => {
                        // Nothing is lost by sweeping later: the next pass starts over.
                        debug!(partition = self.partition, %error, "sweep failed; trying again at the next pass");
                        effects = Effects::default();
                        None
                    }
                };
                if let Some(first) = effects.writes.first() {
                    let mut batch =
                        Batch { witness: Some(first.key().clone()), ..Default::default() };
                    let step = match batch.add(self.partition, effects) {
                        Ok(()) => self.commit_batch(batch, &mut index, cancel, &reply).await,
                        Err(error) => Err(Halt::Abort(error)),
                    };
                    self.recover(step, &mut failures, cancel).await?;
                }
                // A pass that stopped at a full page goes on at the next turn.
                next_sweep = Some(
                    tokio::time::Instant::now()
                        + if more.is_some() { Duration::ZERO } else { every },
                );
                sweep_from = more;
                continue;
            }
            // At the bound of attempts in flight, the inbox waits for outcomes; timers go on
            // (retries, and the visibility timers that give up on attempts out for too long).
            if !pending.is_empty() && self.in_flight().len() < self.max_in_flight {
                let step = self.process_inbox(&mut pending, &mut index, cancel, &reply).await;
                self.recover(step, &mut failures, cancel).await?;
                continue;
            }
            let now = crate::now_ms();
            if index.next_due().is_some_and(|due| due <= now) {
                let step = self.fire_timers(&mut index, now, cancel, &reply).await;
                self.recover(step, &mut failures, cancel).await?;
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
            let sleep = index.next_due().map_or(Duration::from_secs(3600), |due| {
                Duration::from_millis((due - now).max(0) as u64)
            });
            let sleep = match next_sweep {
                Some(at) => sleep.min(at.saturating_duration_since(tokio::time::Instant::now())),
                None => sleep,
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(sleep) => {}
                Some(outcome) = outcomes.recv() => held.push_back(outcome),
                batch = feed.next() => match batch {
                    Ok(batch) => self.take_inbox(&mut pending, batch),
                    Err(error) => {
                        debug!(partition = self.partition, %error, "cannot follow the inbox; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                },
            }
        }
    }

    /// Adds what the inbox feed returned to the entries waiting.
    fn take_inbox(&self, pending: &mut VecDeque<(Key, Vec<u8>)>, batch: crate::state::InboxBatch) {
        self.saw(batch.revision);
        if batch.reset {
            pending.clear();
        }
        pending.extend(batch.entries);
    }

    /// Stops taking new work but waits, up to the drain bound, for the attempts in flight and
    /// records their outcomes, so that the next owner does not send them again. Attempts still
    /// out at the bound are left to their visibility timers.
    async fn drain(
        &self,
        held: &mut VecDeque<Outcome>,
        outcomes: &mut mpsc::UnboundedReceiver<Outcome>,
        index: &mut TimerIndex,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Exit {
        let deadline = tokio::time::Instant::now() + self.drain;
        // Commits are retried up to the bound, not stopped by the cancellation being served.
        let until_deadline = CancellationToken::new();
        loop {
            while let Ok(outcome) = outcomes.try_recv() {
                held.push_back(outcome);
            }
            if held.is_empty() {
                if self.in_flight().is_empty() {
                    break;
                }
                match tokio::time::timeout_at(deadline, outcomes.recv()).await {
                    Ok(Some(outcome)) => held.push_back(outcome),
                    _ => break,
                }
            }
            let step = self.process_outcomes(held, outcomes, index, &until_deadline, reply);
            match tokio::time::timeout_at(deadline, step).await {
                Ok(Ok(())) => {}
                Ok(Err(Halt::Exit(Exit::Fenced))) => return Exit::Fenced,
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let abandoned = self.in_flight().len();
        if abandoned > 0 {
            info!(partition = self.partition, abandoned, "stopping with attempts still in flight");
        }
        Exit::Cancelled
    }

    /// Reads every timer of the partition into a new index, holding on to the stored timers of
    /// the next seconds as a read-ahead would.
    async fn load_timers(&self, cancel: &CancellationToken) -> Result<TimerIndex, Exit> {
        let end = crate::state::timers_until(self.partition, i64::MAX / 2);
        let horizon = crate::state::timers_until(self.partition, crate::now_ms() + READ_AHEAD_MS);
        let mut index = TimerIndex::default();
        let mut ahead = Vec::new();
        // Where the stored timers held stop: at the horizon, or at the first one not held.
        let mut ahead_end = horizon;
        let mut start = crate::state::timers_start(self.partition);
        loop {
            let page = self
                .read(cancel, || self.state.timers(self.partition, &start, &end, 10_000, 0))
                .await?;
            self.saw(page.revision);
            for (position, value) in &page.timers {
                if let Some(due) = crate::state::timer_due(position) {
                    index.add(due);
                }
                if *position < ahead_end {
                    if ahead.len() < READ_AHEAD_MAX {
                        ahead.push((position.clone(), value.clone()));
                    } else {
                        ahead_end = position.clone();
                    }
                }
            }
            match page.timers.last() {
                Some((last, _)) if page.more => start = crate::state::timer_after(last),
                _ => {
                    index.read_ahead(ahead, ahead_end);
                    return Ok(index);
                }
            }
        }
    }

    /// Returns whether the stored timers held cover every timer due at or before `due_ms`.
    fn reads_ahead(&self, index: &TimerIndex, due_ms: i64) -> bool {
        index.ahead_end() >= crate::state::timers_until(self.partition, due_ms).as_slice()
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
            [] => crate::state::timers_start(self.partition),
            end => end.to_vec(),
        };
        let end = crate::state::timers_until(self.partition, now + READ_AHEAD_MS);
        // The index knows only timers this worker loaded or committed, all at or before
        // `seen`, so a read reflecting `seen` finds every one of them.
        let page = self
            .read(cancel, || {
                self.state.timers(self.partition, &start, &end, READ_AHEAD_PAGE, self.seen())
            })
            .await?;
        let stop = match page.timers.last() {
            Some((last, _)) if page.more => crate::state::timer_after(last),
            _ => end,
        };
        index.read_ahead(page.timers, stop);
        Ok(())
    }

    async fn process_inbox(
        &self,
        pending: &mut VecDeque<(Key, Vec<u8>)>,
        index: &mut TimerIndex,
        cancel: &CancellationToken,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Result<(), Halt> {
        // Each entry takes at least one write (its removal), so a batch holds at most
        // MAX_BATCH_OPS entries, and one more may be carried into a transaction of its own;
        // after a refused batch, one entry at a time.
        let split = self.split.load(Ordering::Relaxed) > 0;
        let mut parsed: VecDeque<serde_json::Result<InboxEntry>> = pending
            .iter()
            .take(if split { 1 } else { MAX_BATCH_OPS + 1 })
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
        // Nothing is dispatched before the batch commits, so the room is known once.
        let room = self.max_in_flight.saturating_sub(self.in_flight().len());
        while let Some(entry) = parsed.pop_front() {
            // The bound of attempts in flight holds between entries.
            if taken > 0 && batch.dispatch.len() >= room {
                break;
            }
            // Reads go to the store: an entry that reads a delivery this batch writes (a click
            // on a delivery its event created, after a failover) waits for the batch's commit.
            if let Some(id) = delivery_read(&entry)
                && last_write(&batch.writes, &Key::Delivery { partition: self.partition, id })
                    .is_some()
            {
                break;
            }
            let key = pending[taken].0.clone();
            let effects = self.entry_effects(&key, entry).await?;
            // The engine may have cached what these effects write, so they are never dropped:
            // when they do not fit, they go in a transaction of their own right after.
            if taken > 0 && batch.writes.len() + 1 + effects.op_count() > MAX_BATCH_OPS {
                carried = Some((key, effects));
                break;
            }
            batch.consume(key, effects, self.partition)?;
            taken += 1;
        }
        if let Err(halt) = self.commit_batch(batch, index, cancel, reply).await {
            return self.refused(halt, pending, taken, index, cancel, reply).await;
        }
        pending.drain(..taken);
        if split {
            self.split
                .store(self.split.load(Ordering::Relaxed).saturating_sub(taken), Ordering::Relaxed);
        }
        if let Some((key, effects)) = carried {
            let mut batch = Batch::default();
            batch.consume(key, effects, self.partition)?;
            if let Err(halt) = self.commit_batch(batch, index, cancel, reply).await {
                return self.refused(halt, pending, 1, index, cancel, reply).await;
            }
            pending.pop_front();
        }
        Ok(())
    }

    /// After the store refused the batch of the first `taken` entries of `pending` (a request
    /// it finds invalid, such as one too large, which it would refuse again): a batch of
    /// several is taken again one entry at a time; a single entry is set aside, removed with
    /// nothing of what it would write, when the store takes its removal alone. When the store
    /// refuses that too, the partition's writes are refused whatever they hold, and the worker
    /// stops so that the partition is released.
    async fn refused(
        &self,
        halt: Halt,
        pending: &mut VecDeque<(Key, Vec<u8>)>,
        taken: usize,
        index: &mut TimerIndex,
        cancel: &CancellationToken,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Result<(), Halt> {
        // Only a request the store calls invalid is split or set aside: a store that fails
        // (a damaged page, an internal error) would fail any entry, and none is dropped for it.
        if !matches!(halt, Halt::Exit(Exit::Refused { invalid: true })) {
            return Err(halt);
        }
        // What the engine kept of the refused batch was never written.
        self.engine.on_abort(self.partition);
        if taken > 1 {
            warn!(
                partition = self.partition,
                entries = taken,
                "batch refused by the store; taking its entries one at a time"
            );
            self.split.store(taken, Ordering::Relaxed);
            return Ok(());
        }
        let Some((key, _)) = pending.front().cloned() else { return Ok(()) };
        let mut batch = Batch::default();
        batch.consume(key.clone(), Effects::default(), self.partition)?;
        self.commit_batch(batch, index, cancel, reply).await?;
        tracing::error!(partition = self.partition, %key, "inbox entry set aside: the store refused what it writes; it is removed and its effects are not applied");
        crate::telemetry::metrics().set_aside.add(1, &[]);
        pending.pop_front();
        self.split.store(self.split.load(Ordering::Relaxed).saturating_sub(1), Ordering::Relaxed);
        Ok(())
    }

    /// Asks the engine what an inbox entry means.
    async fn entry_effects(
        &self,
        key: &Key,
        entry: serde_json::Result<InboxEntry>,
    ) -> Result<Effects, EngineError> {
        let mut effects = Effects::default();
        match entry {
            Ok(InboxEntry::Event(event)) => {
                self.engine.on_event(self.partition, &event, &mut effects).await
            }
            Ok(InboxEntry::Schedule(timer)) => {
                effects.timers.push(timer);
                Ok(())
            }
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
            Err(error) => {
                // Written by the API from a typed entry, so only a newer version's entry (or a
                // damaged store) fails here; keeping it would stop the partition for good.
                warn!(
                    partition = self.partition,
                    %key,
                    %error,
                    "dropping an unreadable inbox entry"
                );
                Ok(())
            }
        }?;
        Ok(effects)
    }

    /// Records attempt outcomes, as many as are waiting, a transaction's worth at a time.
    /// Outcomes not recorded (the batch was aborted, or a few rounds are done) stay in `held`.
    async fn process_outcomes(
        &self,
        held: &mut VecDeque<Outcome>,
        outcomes: &mut mpsc::UnboundedReceiver<Outcome>,
        index: &mut TimerIndex,
        cancel: &CancellationToken,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Result<(), Halt> {
        // Each outcome takes a handful of writes: take as many as one transaction holds.
        const PER_BATCH: usize = MAX_BATCH_OPS / 8;
        // A few transactions' worth at most, so the inbox and timers get their turn.
        const ROUNDS: usize = 4;
        for _ in 0..ROUNDS {
            while held.len() < PER_BATCH {
                match outcomes.try_recv() {
                    Ok(outcome) => held.push_back(outcome),
                    Err(_) => break,
                }
            }
            held.retain(|outcome| self.is_current(outcome));
            if held.is_empty() {
                return Ok(());
            }
            let take = held.len().min(PER_BATCH);
            let waiting: Vec<Outcome> =
                held.drain(..take).map(|outcome| self.current_visibility(outcome)).collect();
            self.engine.prefetch_outcomes(self.partition, &waiting, self.seen()).await;
            let mut batch = Batch::default();
            let mut used = 0;
            let mut failed = None;
            for outcome in &waiting {
                let key = Key::Delivery {
                    partition: self.partition,
                    id: outcome.job.delivery.id.clone(),
                };
                let mut effects = Effects::default();
                let decided = self.engine.on_outcome(self.partition, outcome, &mut effects).await;
                if let Err(error) = decided.and_then(|()| batch.add(self.partition, effects)) {
                    failed = Some(error);
                    break;
                }
                batch.witness.get_or_insert(key);
                used += 1;
                if batch.writes.len() + 8 > MAX_BATCH_OPS {
                    break;
                }
            }
            if let Some(error) = failed {
                for outcome in waiting.into_iter().rev() {
                    held.push_front(outcome);
                }
                return Err(Halt::Abort(error));
            }
            let mut waiting = waiting.into_iter();
            let recorded: Vec<Outcome> = waiting.by_ref().take(used).collect();
            for outcome in waiting.rev() {
                held.push_front(outcome);
            }
            self.commit_batch(batch, index, cancel, reply).await?;
            self.settled(&recorded);
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
    ) -> Result<(), Halt> {
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
        witness: &Key,
        index: &mut TimerIndex,
        cancel: &CancellationToken,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Result<(), Exit> {
        let writes = collapse(batch.writes);
        // What the batch does to stored timers, for the index's copy of the next seconds.
        let timer_writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = writes
            .iter()
            .filter_map(|write| match write.key() {
                Key::Timer(timer) => {
                    Some((crate::state::timer_position(timer), write.value().map(<[u8]>::to_vec)))
                }
                _ => None,
            })
            .collect();
        match self.commit(writes, witness, cancel).await? {
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
                for job in batch.dispatch {
                    self.dispatch(job, reply.clone());
                }
                self.settled(&batch.recorded);
                let mut in_flight = self.in_flight();
                for (delivery, visibility, first_due) in batch.rearm {
                    // No outcome is recorded between this batch's decision and its commit, so
                    // the attempt is still here.
                    if let Some(attempt) = in_flight.get_mut(&delivery) {
                        attempt.moved = Some((visibility, first_due));
                    }
                }
                drop(in_flight);
                self.engine.on_commit(self.partition);
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
        for job in std::mem::take(&mut batch.dispatch) {
            self.dispatch(job, sender.clone());
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
            self.attempts.forward(receiver, reply.clone());
        }
        if arrived.is_empty() {
            return Vec::new();
        }
        self.engine.prefetch_outcomes(self.partition, &arrived, self.seen()).await;
        let mut overflow: Vec<Batch> = Vec::new();
        let mut arrived = arrived.into_iter();
        while let Some(outcome) = arrived.next() {
            let key =
                Key::Delivery { partition: self.partition, id: outcome.job.delivery.id.clone() };
            let mut effects = Effects::default();
            let mut decided = self.engine.on_outcome(self.partition, &outcome, &mut effects).await;
            let effects = match decided {
                Ok(()) if overflow.is_empty() => match batch.absorb(effects, self.partition) {
                    Ok(()) => {
                        batch.recorded.push(outcome);
                        continue;
                    }
                    Err(effects) => effects,
                },
                _ => effects,
            };
            if decided.is_ok() {
                if overflow
                    .last()
                    .is_none_or(|b| b.writes.len() + effects.op_count() > MAX_BATCH_OPS)
                {
                    overflow.push(Batch::default());
                }
                if let Some(last) = overflow.last_mut() {
                    decided = last.add(self.partition, effects);
                    if decided.is_ok() {
                        last.witness.get_or_insert(key);
                        last.recorded.push(outcome);
                        continue;
                    }
                }
            }
            if let Err(error) = decided {
                // This batch's attempts are out already, so the batch goes on; the outcomes
                // not recorded yet reach the worker the usual way, and are recorded after it
                // commits. What the engine kept of the failed one goes, and with it what it
                // kept of this batch, which reads after the commit find in the store.
                warn!(partition = self.partition, %error, "outcome not recorded with its batch: a read failed");
                self.engine.on_abort(self.partition);
                for outcome in std::iter::once(outcome).chain(arrived) {
                    let _ = reply.send(outcome);
                }
                break;
            }
        }
        overflow.retain(|batch| batch.witness.is_some());
        overflow
    }

    async fn fire_timers(
        &self,
        index: &mut TimerIndex,
        now: i64,
        cancel: &CancellationToken,
        reply: &mpsc::UnboundedSender<Outcome>,
    ) -> Result<(), Halt> {
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
        let lateness = &crate::telemetry::metrics().timer_lateness;
        for (key, value) in &due {
            let Some(fired) = TimerRef::parse(self.partition, key) else {
                warn!(partition = self.partition, key = %String::from_utf8_lossy(key), "a timer key outside the timers; dropping the partition");
                return Err(Halt::Exit(Exit::Fenced));
            };
            lateness.record((now - fired.due_ms).max(0) as f64 / 1000.0, &[]);
            let mut effects = Effects::default();
            let mut rearm = None;
            match serde_json::from_slice::<Timer>(value) {
                Ok(timer) => match self.rearm(&timer, now) {
                    Some((delivery, next, first_due)) => {
                        debug!(partition = self.partition, %delivery, "attempt still in flight here; its visibility timer moves on");
                        rearm = Some((delivery, TimerRef::of(self.partition, &next), first_due));
                        effects.timers.push(next);
                    }
                    None => self.engine.on_timer(self.partition, &timer, &mut effects).await?,
                },
                Err(error) => warn!(
                    partition = self.partition,
                    key = %String::from_utf8_lossy(key),
                    %error,
                    "dropping an unreadable timer"
                ),
            }
            // As with inbox entries, effects that do not fit go in a transaction of their own.
            if !batch.writes.is_empty()
                && batch.writes.len() + 1 + effects.op_count() > MAX_BATCH_OPS
            {
                carried = Some((fired, effects, rearm));
                break;
            }
            batch.consume_timer(fired, effects, self.partition)?;
            batch.rearm.extend(rearm);
        }
        self.commit_batch(batch, index, cancel, reply).await?;
        if let Some((fired, effects, rearm)) = carried {
            let mut batch = Batch::default();
            batch.consume_timer(fired, effects, self.partition)?;
            batch.rearm.extend(rearm);
            self.commit_batch(batch, index, cancel, reply).await?;
        }
        Ok(())
    }
}

/// Returns when an inbox entry was accepted, from the time in its id (`{prefix}_{ulid}`).
fn inbox_time_ms(key: &Key) -> Option<i64> {
    let Key::Inbox { id, .. } = key else { return None };
    let (_, ulid) = id.rsplit_once('_')?;
    let ulid = ulid::Ulid::from_string(ulid).ok()?;
    Some(ulid.timestamp_ms() as i64)
}

/// Keeps only the last write to each key: etcd refuses a transaction that writes a key twice,
/// and the last write is the one that would stand.
fn collapse(writes: Vec<Write>) -> Vec<Write> {
    let mut seen = HashSet::new();
    let mut kept: Vec<Write> =
        writes.into_iter().rev().filter(|write| seen.insert(write.key().clone())).collect();
    kept.reverse();
    kept
}

/// The writes of one transaction and what to do once it commits.
#[derive(Default)]
struct Batch {
    writes: Vec<Write>,
    /// Due times of timers the batch adds and removes, for the index.
    added: Vec<i64>,
    removed: Vec<i64>,
    dispatch: Vec<Job>,
    /// Outcomes whose records the batch writes: their dispatches are settled once it commits.
    recorded: Vec<Outcome>,
    /// A key the batch deletes or writes, to recognise a batch that did commit.
    witness: Option<Key>,
    /// Visibility timers the batch moves on (delivery, new timer, when the first fell due).
    rearm: Vec<(String, TimerRef, i64)>,
}

/// The delivery an inbox entry reads, if it names one.
fn delivery_read(entry: &serde_json::Result<InboxEntry>) -> Option<String> {
    match entry {
        Ok(InboxEntry::Interaction { delivery, .. } | InboxEntry::Redeliver { delivery })
            if !delivery.is_empty() =>
        {
            Some(delivery.clone())
        }
        _ => None,
    }
}

/// Returns the index of the last write to `key`.
fn last_write(writes: &[Write], key: &Key) -> Option<usize> {
    writes.iter().rposition(|write| write.key() == key)
}

impl Batch {
    /// Adds the removal of an inbox entry and the effects it had.
    fn consume(&mut self, key: Key, effects: Effects, partition: PartitionId) -> StateResult {
        self.witness.get_or_insert(key.clone());
        self.writes.push(Write::remove(key));
        self.add(partition, effects)
    }

    /// Adds the removal of a fired timer and the effects it had.
    fn consume_timer(
        &mut self,
        fired: TimerRef,
        effects: Effects,
        partition: PartitionId,
    ) -> StateResult {
        self.witness.get_or_insert(Key::Timer(fired.clone()));
        self.removed.push(fired.due_ms);
        self.writes.push(Write::remove_timer(fired));
        self.add(partition, effects)
    }

    /// Adds the effects of an outcome of one of this batch's attempts: writes to keys the
    /// batch already writes replace those, and the attempt's visibility timer, written by this
    /// batch, is dropped instead of deleted. Gives the effects back, changing nothing, when the
    /// result would not fit one transaction (or a timer would not encode).
    fn absorb(&mut self, effects: Effects, partition: PartitionId) -> Result<(), Effects> {
        let Ok(timers) = timer_writes(partition, &effects.timers) else { return Err(effects) };
        let added = effects
            .writes
            .iter()
            .chain(timers.iter().map(|(_, write)| write))
            .filter(|write| last_write(&self.writes, write.key()).is_none())
            .count();
        let dropped = effects
            .cancel_timers
            .iter()
            .filter(|timer| last_write(&self.writes, &Key::Timer((*timer).clone())).is_some())
            .count();
        let deleted = effects.cancel_timers.len() - dropped;
        if self.writes.len() + added + deleted - dropped > MAX_BATCH_OPS {
            return Err(effects);
        }
        for timer in effects.cancel_timers {
            let due = timer.due_ms;
            let key = Key::Timer(timer);
            match last_write(&self.writes, &key) {
                Some(i) => {
                    self.writes.remove(i);
                    if let Some(j) = self.added.iter().position(|d| *d == due) {
                        self.added.swap_remove(j);
                    }
                }
                None => {
                    self.writes.push(Write::remove(key));
                    self.removed.push(due);
                }
            }
        }
        for (due, _) in &timers {
            self.added.push(*due);
        }
        for write in effects.writes.into_iter().chain(timers.into_iter().map(|(_, write)| write)) {
            match last_write(&self.writes, write.key()) {
                Some(i) => self.writes[i] = write,
                None => self.writes.push(write),
            }
        }
        self.dispatch.extend(effects.dispatch);
        Ok(())
    }

    /// Adds effects; changes nothing when a timer does not encode.
    fn add(&mut self, partition: PartitionId, effects: Effects) -> StateResult {
        let timers = timer_writes(partition, &effects.timers)?;
        self.writes.extend(effects.writes);
        for (due, write) in timers {
            self.writes.push(write);
            self.added.push(due);
        }
        for timer in effects.cancel_timers {
            self.removed.push(timer.due_ms);
            self.writes.push(Write::remove_timer(timer));
        }
        self.dispatch.extend(effects.dispatch);
        Ok(())
    }
}

/// Returns the writes that register `timers`, with their due times.
fn timer_writes(partition: PartitionId, timers: &[Timer]) -> StateResult<Vec<(i64, Write)>> {
    timers.iter().map(|timer| Ok((timer.due_ms, Write::timer(partition, timer)?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::CampaignStatus;

    fn standing(sends: u64) -> Write {
        let status = CampaignStatus { sends, ..Default::default() };
        Write::standing(1, "c", "k", &status).expect("encodes")
    }

    #[test]
    fn collapse_keeps_the_last_write_of_each_key_in_order() {
        let writes = vec![
            standing(1),
            Write::remove_delivery(1, "a"),
            Write::remove_inbox(1, "e"),
            standing(2),
            Write::remove_delivery(1, "a"),
        ];
        assert_eq!(
            collapse(writes),
            vec![Write::remove_inbox(1, "e"), standing(2), Write::remove_delivery(1, "a")]
        );
    }

    #[test]
    fn an_absorbed_outcome_replaces_the_sending_record_and_drops_the_visibility_timer() {
        let timer = |due_ms: i64| Timer {
            id: "d1".into(),
            due_ms,
            kind: crate::timers::TimerKind::Attempt { delivery: "d1".into() },
        };
        let delivery = |status| {
            let origin = crate::delivery::record::Origin::default();
            let mut delivery = crate::delivery::record::Delivery::new("d1".into(), 1, origin, 0);
            delivery.status = status;
            Write::delivery(&delivery).expect("encodes")
        };
        use crate::delivery::record::Status;
        let mut batch = Batch::default();
        let inbox = Key::Inbox { partition: 1, id: "e1".into() };
        let effects = Effects {
            writes: vec![delivery(Status::Sending)],
            timers: vec![timer(5_000)],
            ..Default::default()
        };
        batch.consume(inbox, effects, 1).expect("added");
        assert_eq!((batch.writes.len(), batch.added.clone()), (3, vec![5_000]));
        let outcome = Effects {
            writes: vec![delivery(Status::Delivered), standing(1)],
            cancel_timers: vec![TimerRef::of(1, &timer(5_000))],
            ..Default::default()
        };
        assert!(batch.absorb(outcome, 1).is_ok());
        assert_eq!(
            batch.writes,
            vec![Write::remove_inbox(1, "e1"), delivery(Status::Delivered), standing(1)]
        );
        assert!(batch.added.is_empty() && batch.removed.is_empty());

        // An outcome that would not fit is given back untouched.
        let mut full = Batch {
            writes: (0..MAX_BATCH_OPS).map(|i| Write::remove_inbox(1, &format!("e{i}"))).collect(),
            ..Default::default()
        };
        let outcome = Effects { writes: vec![standing(3)], ..Default::default() };
        let back = full.absorb(outcome, 1).expect_err("does not fit");
        assert_eq!(back.writes, vec![standing(3)]);
        assert_eq!(full.writes.len(), MAX_BATCH_OPS);
    }
}
