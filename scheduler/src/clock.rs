//! Where time comes from: the system clock, or a clock a test sets and advances, so that
//! decisions that depend on time are unit-tested with time under the test's control.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// A source of the current time in Unix milliseconds. Cheap to clone; clones share the time.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    /// Returns the system clock.
    pub fn system() -> Self {
        Self(None)
    }

    /// Returns a clock that stands at `start_ms` until set or advanced.
    pub fn manual(start_ms: i64) -> Self {
        Self(Some(Arc::new(AtomicI64::new(start_ms))))
    }

    /// Returns the current time in Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        match &self.0 {
            Some(manual) => manual.load(Ordering::SeqCst),
            None => crate::now_ms(),
        }
    }

    /// Moves a manual clock forward by `ms`; the system clock ignores it.
    pub fn advance(&self, ms: i64) {
        if let Some(manual) = &self.0 {
            manual.fetch_add(ms, Ordering::SeqCst);
        }
    }
}
