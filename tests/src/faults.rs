//! Faults injected into a real store: the scheduler's [`FlakyStore`] fails reads on demand.

pub use tidings_scheduler::store::FlakyStore;
