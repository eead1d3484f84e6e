//! The seam between the partition machinery and what events and timers mean.
//!
//! A partition worker hands each event and each due timer to the [`Engine`], which says what
//! to write in return; the worker commits those writes together with the removal of the inbox
//! entry or timer, in one transaction guarded by its epoch. An engine never writes partition
//! state itself, so fencing covers everything it decides.

use crate::cluster::PartitionId;
use crate::inbox::Event;
use crate::store::Op;
use crate::timers::Timer;

/// The writes an engine asks for.
#[derive(Debug, Default)]
pub struct Effects {
    /// Writes to commit with the batch.
    pub ops: Vec<Op>,
    /// Timers to add to the same partition (they get keys and join the in-memory index).
    pub timers: Vec<Timer>,
}

impl Effects {
    /// Returns how many store operations these effects take.
    pub fn op_count(&self) -> usize {
        self.ops.len() + self.timers.len()
    }
}

/// Decides the consequences of events and timers.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Handles one accepted event of `partition`.
    async fn on_event(&self, partition: PartitionId, event: &Event, effects: &mut Effects);

    /// Handles one due timer of `partition`.
    async fn on_timer(&self, partition: PartitionId, timer: &Timer, effects: &mut Effects);
}

/// An engine that consumes events and timers without consequences.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopEngine;

#[async_trait::async_trait]
impl Engine for NoopEngine {
    async fn on_event(&self, _partition: PartitionId, _event: &Event, _effects: &mut Effects) {}

    async fn on_timer(&self, _partition: PartitionId, _timer: &Timer, _effects: &mut Effects) {}
}
