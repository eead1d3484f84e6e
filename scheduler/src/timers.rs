//! Durable timers: what they are and the in-memory index an owner keeps of them.
//!
//! A timer is a key `p/{p}/timers/{due_ms}/{id}` whose value says what to do. Keys sort by due
//! time, so the owner fetches every due timer of a partition with one range read; in memory it
//! keeps only how many timers fall due at each millisecond, which tells it when to wake up at a
//! few bytes per distinct due time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a timer does when it fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TimerKind {
    /// An occurrence of an interval campaign. The occurrence time is part of its identity, so a
    /// re-fire of the same occurrence is recognisable downstream.
    Interval {
        /// Campaign id.
        campaign: String,
        /// The scheduled fire time of this occurrence, Unix milliseconds.
        occurrence_ms: i64,
        /// The campaign's activation this chain of occurrences belongs to.
        #[serde(default)]
        generation: u64,
    },

    /// The next attempt of a delivery: a retry, a deferral, or the visibility timeout of an
    /// attempt in flight (fires only if its outcome was never recorded).
    Attempt {
        /// Delivery id.
        delivery: String,
    },
    /// The end of a finished delivery's retention: its record and attempt log are deleted.
    Expire {
        /// Delivery id.
        delivery: String,
    },
    /// The end of a follow-up's wait: send `campaign` to `contact` unless the contact
    /// interacted with `after_campaign` since `since_ms`.
    FollowUp {
        /// The follow-up campaign.
        campaign: String,
        /// Contact.
        contact: String,
        /// The campaign whose delivery started the wait.
        after_campaign: String,
        /// When the wait started, Unix milliseconds.
        since_ms: i64,
    },
    /// A paused run's shard looking again whether it may go on.
    RunShard {
        /// Campaign id.
        campaign: String,
        /// Run id.
        run: String,
        /// Key of the last contact evaluated.
        after: String,
    },
    /// A run of an on-demand campaign scheduled for later.
    Run {
        /// Campaign id.
        campaign: String,
        /// Run id.
        run: String,
    },
}

/// A durable timer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// Unique id within its due time.
    pub id: String,
    /// When it fires, Unix milliseconds. It never fires before.
    pub due_ms: i64,
    /// What it does.
    #[serde(flatten)]
    pub kind: TimerKind,
}

/// Counts of pending timers by due time, for one partition.
#[derive(Debug, Default)]
pub struct TimerIndex {
    due: BTreeMap<i64, u32>,
    total: u64,
}

impl TimerIndex {
    /// Records a pending timer.
    pub fn add(&mut self, due_ms: i64) {
        *self.due.entry(due_ms).or_default() += 1;
        self.total += 1;
    }

    /// Forgets a fired (or deleted) timer.
    pub fn remove(&mut self, due_ms: i64) {
        if let Some(count) = self.due.get_mut(&due_ms) {
            *count -= 1;
            self.total -= 1;
            if *count == 0 {
                self.due.remove(&due_ms);
            }
        }
    }

    /// Returns the earliest due time, if any timer is pending.
    pub fn next_due(&self) -> Option<i64> {
        self.due.keys().next().copied()
    }

    /// Returns how many timers are pending.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Returns whether no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Forgets every timer due at or before `due_ms`; used when a range read finds none left.
    pub fn clear_until(&mut self, due_ms: i64) {
        let later = self.due.split_off(&(due_ms + 1));
        let dropped: u64 = self.due.values().map(|c| u64::from(*c)).sum();
        self.total -= dropped;
        self.due = later;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_tracks_counts_and_the_next_due_time() {
        let mut index = TimerIndex::default();
        index.add(20);
        index.add(10);
        index.add(10);
        assert_eq!((index.next_due(), index.len()), (Some(10), 3));
        index.remove(10);
        assert_eq!((index.next_due(), index.len()), (Some(10), 2));
        index.remove(10);
        assert_eq!(index.next_due(), Some(20));
        index.clear_until(25);
        assert!(index.is_empty());
        assert_eq!(index.next_due(), None);
    }

    #[test]
    fn timers_round_trip_through_json() {
        let timer = Timer {
            id: "t1".into(),
            due_ms: 5,
            kind: TimerKind::Interval { campaign: "c".into(), occurrence_ms: 5, generation: 1 },
        };
        let json = serde_json::to_string(&timer).expect("encode");
        assert_eq!(serde_json::from_str::<Timer>(&json).expect("decode"), timer);
    }
}
