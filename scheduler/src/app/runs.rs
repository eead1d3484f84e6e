//! Runs: one execution of a campaign, its life cycle and its counters.
//!
//! A run's record holds its state as callers set it (scheduled, running, paused, cancelled);
//! its counters live in one shard per partition, each written by its partition's owner.
//! [`tally`] adds the shards up and decides completion: a running run whose every partition is
//! done and whose every queued delivery has finished is completed. [`change`] is the life
//! cycle: which state a run may move to from which.

use crate::campaign::{Run, RunState, Shard};
use crate::inbox::InboxEntry;
use crate::state::{Expect, Key, State, StateError, Stored, Write, partition_of};
use crate::timers::{Timer, TimerKind};

/// Why a run call failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No such run.
    #[error("run {run} of campaign {campaign} not found")]
    NotFound {
        /// Campaign id.
        campaign: String,
        /// Run id.
        run: String,
    },
    /// The run's state does not allow the change.
    #[error("run {run} is {from}; it cannot become {to}")]
    Refused {
        /// Run id.
        run: String,
        /// Its state.
        from: &'static str,
        /// The state asked for.
        to: &'static str,
    },
    /// The state layer failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// What asking a run in one state to move to another does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The run moves.
    Apply,
    /// The run is in that state already.
    Already,
    /// The move is not allowed.
    Refused,
}

/// Returns what asking a run in `from` to move to `to` does: a running run pauses, a paused
/// one resumes, any run not ended can be cancelled; nothing else.
pub fn change(from: RunState, to: RunState) -> Change {
    if from == to {
        return Change::Already;
    }
    let allowed = match to {
        RunState::Paused => from == RunState::Running,
        RunState::Running => from == RunState::Paused,
        RunState::Cancelled => {
            matches!(from, RunState::Scheduled | RunState::Running | RunState::Paused)
        }
        RunState::Scheduled | RunState::Completed => false,
    };
    if allowed { Change::Apply } else { Change::Refused }
}

/// Returns the run with its partitions' counters added up, completed when it is running,
/// every partition is done and every queued delivery has finished.
pub fn tally(mut run: Run, shards: impl IntoIterator<Item = Shard>) -> Run {
    let mut changed_ms = 0;
    for shard in shards {
        changed_ms = changed_ms.max(shard.changed_ms);
        run.audience += shard.audience;
        run.queued += shard.queued;
        run.delivered += shard.delivered;
        run.failed += shard.failed;
        for (reason, n) in shard.skipped {
            *run.skipped.entry(reason).or_default() += n;
        }
        run.partitions_done += u32::from(shard.done);
    }
    if run.state == RunState::Running
        && run.partitions_done == run.partitions
        && run.delivered + run.failed >= run.queued
    {
        run.state = RunState::Completed;
        // Completion is read, not written: it ended with the last change of its shards.
        if run.ended_ms.is_none() && changed_ms > 0 {
            run.ended_ms = Some(changed_ms);
        }
    }
    run
}

/// Returns the lowercase name of a run state, as messages show it.
pub fn state_name(state: RunState) -> &'static str {
    match state {
        RunState::Scheduled => "scheduled",
        RunState::Running => "running",
        RunState::Paused => "paused",
        RunState::Completed => "completed",
        RunState::Cancelled => "cancelled",
    }
}

/// Runs for the adapters.
#[derive(Clone)]
pub struct Runs {
    state: State,
    partitions: u32,
}

impl std::fmt::Debug for Runs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runs").finish_non_exhaustive()
    }
}

impl Runs {
    /// Returns the runs of a cluster of `partitions` partitions.
    pub fn new(state: State, partitions: u32) -> Self {
        Self { state, partitions }
    }

    /// Starts a run unless one with its id exists: now (fanned out to every partition) or,
    /// when it is scheduled, through a timer in the campaign's partition. Returns the run and
    /// whether this call started it.
    pub async fn start(
        &self,
        campaign: &str,
        run_id: &str,
        run: &Run,
    ) -> Result<(Run, bool), RunError> {
        let home = partition_of(campaign, self.partitions);
        let mut writes = vec![Write::run(campaign, run_id, run)?];
        if run.state == RunState::Scheduled {
            let timer = Timer {
                id: run_id.to_string(),
                due_ms: run.scheduled_ms,
                kind: TimerKind::Run { campaign: campaign.to_string(), run: run_id.to_string() },
            };
            let entry = InboxEntry::Schedule(timer);
            writes.push(Write::inbox(home, &crate::inbox::new_id("in"), &entry)?);
        } else {
            writes.extend(crate::campaign::fan_out(campaign, run_id, 0, self.partitions, home)?);
        }
        let key = Key::Run { campaign: campaign.to_string(), run: run_id.to_string() };
        match self.state.write_if::<Run>(&key, Expect::Absent, writes).await? {
            Ok(_) => Ok((run.clone(), true)),
            Err(Some(Stored { value, .. })) => Ok((value?, false)),
            Err(None) => Ok((run.clone(), false)),
        }
    }

    async fn stored(&self, campaign: &str, run_id: &str) -> Result<Stored<Run>, RunError> {
        let key = Key::Run { campaign: campaign.to_string(), run: run_id.to_string() };
        self.state.versioned(&key).await?.ok_or_else(|| RunError::NotFound {
            campaign: campaign.to_string(),
            run: run_id.to_string(),
        })
    }

    async fn tallied(&self, campaign: &str, run_id: &str, run: Run) -> Result<Run, RunError> {
        let shards = self
            .state
            .shards(campaign, run_id)
            .await?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(tally(run, shards))
    }

    /// Returns a run with its counters added up.
    pub async fn get(&self, campaign: &str, run_id: &str) -> Result<Run, RunError> {
        let run = self.stored(campaign, run_id).await?.value?;
        self.tallied(campaign, run_id, run).await
    }

    /// Pauses, resumes or cancels a run; returns it as it is then.
    pub async fn change(
        &self,
        campaign: &str,
        run_id: &str,
        to: RunState,
    ) -> Result<Run, RunError> {
        let key = Key::Run { campaign: campaign.to_string(), run: run_id.to_string() };
        loop {
            let stored = self.stored(campaign, run_id).await?;
            let mut run = stored.value?;
            let current = self.tallied(campaign, run_id, run.clone()).await?.state;
            match change(current, to) {
                Change::Already => return self.get(campaign, run_id).await,
                Change::Refused => {
                    return Err(RunError::Refused {
                        run: run_id.to_string(),
                        from: state_name(current),
                        to: state_name(to),
                    });
                }
                Change::Apply => {}
            }
            run.state = to;
            if to == RunState::Cancelled {
                run.ended_ms = Some(crate::now_ms());
            }
            let write = Write::run(campaign, run_id, &run)?;
            let expect = Expect::Version(stored.version);
            if self.state.write_if::<Run>(&key, expect, vec![write]).await?.is_ok() {
                tracing::info!(campaign, run = run_id, state = state_name(to), "run state changed");
                return self.get(campaign, run_id).await;
            }
        }
    }

    /// Returns up to `size` runs of a campaign in id order after the run `after`, with their
    /// counters added up, and whether more follow.
    pub async fn list(
        &self,
        campaign: &str,
        after: Option<&str>,
        size: usize,
    ) -> Result<(Vec<(String, Run)>, bool), RunError> {
        let (page, more) = self.state.runs(campaign, after, size).await?;
        let mut runs = Vec::with_capacity(page.len());
        for (id, run) in page {
            let run = self.tallied(campaign, &id, run?).await?;
            runs.push((id, run));
        }
        Ok((runs, more))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_move_only_along_their_life_cycle() {
        use RunState::*;
        assert_eq!(change(Running, Paused), Change::Apply);
        assert_eq!(change(Paused, Running), Change::Apply);
        assert_eq!(change(Scheduled, Cancelled), Change::Apply);
        assert_eq!(change(Paused, Cancelled), Change::Apply);
        assert_eq!(change(Paused, Paused), Change::Already);
        assert_eq!(change(Scheduled, Paused), Change::Refused);
        assert_eq!(change(Completed, Cancelled), Change::Refused);
        assert_eq!(change(Cancelled, Running), Change::Refused);
        assert_eq!(change(Running, Completed), Change::Refused);
    }

    #[test]
    fn a_run_completes_when_every_partition_is_done_and_every_send_finished() {
        let run = Run::new(RunState::Running, 0, 2);
        let shard = |done, queued, delivered| Shard {
            audience: queued,
            queued,
            delivered,
            done,
            ..Default::default()
        };
        let partial = tally(run.clone(), [shard(true, 2, 2), shard(false, 1, 1)]);
        assert_eq!(
            (partial.state, partial.partitions_done, partial.queued),
            (RunState::Running, 1, 3)
        );
        let waiting = tally(run.clone(), [shard(true, 2, 2), shard(true, 1, 0)]);
        assert_eq!(waiting.state, RunState::Running);
        let done = tally(run.clone(), [shard(true, 2, 2), shard(true, 1, 1)]);
        assert_eq!((done.state, done.delivered), (RunState::Completed, 3));
        // It ended with the last change of its shards.
        let at = |changed_ms, shard: Shard| Shard { changed_ms, ..shard };
        let ended =
            tally(run.clone(), [at(7_000, shard(true, 2, 2)), at(9_000, shard(true, 1, 1))]);
        assert_eq!(ended.ended_ms, Some(9_000));
        let running =
            tally(run.clone(), [at(7_000, shard(true, 2, 2)), at(9_000, shard(false, 1, 1))]);
        assert_eq!(running.ended_ms, None);
        let paused = tally(Run::new(RunState::Paused, 0, 1), [shard(true, 1, 1)]);
        assert_eq!(paused.state, RunState::Paused);
    }
}
