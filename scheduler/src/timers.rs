//! Durable timers: what they are and the in-memory index an owner keeps of them.
//!
//! A timer is a key `p/{p}/timers/{due_ms}/{id}` whose value says what to do. Keys sort by due
//! time, so the owner reads a partition's timers in due order with range reads. In memory it
//! keeps how many timers fall due at each millisecond, which tells it when to wake up at a few
//! bytes per distinct due time, and the stored timers of the next few seconds, read ahead while
//! it is idle, so that firing a timer when it falls due takes no read.

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
        /// When the attempt that delivered started, Unix milliseconds: it names the follow-up.
        since_ms: i64,
        /// When what caused the delivery that started the wait happened (the time in its
        /// id: the event's acceptance, the run's start, the previous wait's end), Unix
        /// milliseconds; 0 in timers written by earlier versions. Interactions count from
        /// then, so that a click on a copy sent before its node died counts, even when the
        /// next owner made the delivery again, later than the click.
        #[serde(default, skip_serializing_if = "is_zero")]
        origin_ms: i64,
        /// The trace of the delivery that started the wait, which the follow-up continues.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        traceparent: String,
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

/// The pending timers of one partition: counts by due time, and the stored timers read ahead.
///
/// Only the partition's owner writes its timers, so once a key range has been read, the owner's
/// own writes (see [`TimerIndex::written`]) keep the copy of that range exact.
#[derive(Debug, Default)]
pub struct TimerIndex {
    due: BTreeMap<i64, u32>,
    total: u64,
    /// Stored timers by key, holding every timer whose key sorts before `ahead_end`.
    ahead: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The end of the key range read ahead; empty when nothing was read.
    ahead_end: Vec<u8>,
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

    /// Returns the end of the key range read ahead: every stored timer whose key sorts before
    /// it is held. Empty when nothing was read.
    pub fn ahead_end(&self) -> &[u8] {
        &self.ahead_end
    }

    /// Returns how many stored timers are held.
    pub fn ahead_len(&self) -> usize {
        self.ahead.len()
    }

    /// Takes in a range read that started at [`TimerIndex::ahead_end`]: `kvs` are the stored
    /// timers in the range, in key order, and `end` is where the range stopped (the key after
    /// the last one returned, when the read stopped at its limit).
    pub fn read_ahead(&mut self, kvs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>, end: Vec<u8>) {
        self.ahead.extend(kvs);
        if end > self.ahead_end {
            self.ahead_end = end;
        }
    }

    /// Returns up to `limit` stored timers due at or before `now`, in due order, from those
    /// read ahead.
    pub fn due_ahead(&self, now: i64, limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.ahead
            .iter()
            .take_while(|(key, _)| crate::state::timer_due(key).is_none_or(|due| due <= now))
            .take(limit)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }

    /// Keeps the timers read ahead in step with a committed write to this partition's timers:
    /// `value` is the stored timer, or `None` for a delete.
    pub fn written(&mut self, key: &[u8], value: Option<&[u8]>) {
        match value {
            Some(value) if key < self.ahead_end.as_slice() => {
                self.ahead.insert(key.to_vec(), value.to_vec());
            }
            Some(_) => {}
            None => {
                self.ahead.remove(key);
            }
        }
    }

    /// Drops the timers read ahead; the next firing reads them again.
    pub fn forget_ahead(&mut self) {
        self.ahead.clear();
        self.ahead_end.clear();
    }
}

/// Whether a number is zero, so that serde leaves it out.
fn is_zero(value: &i64) -> bool {
    *value == 0
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
    fn timers_read_ahead_follow_the_owners_writes() {
        let key = |due: i64, id: &str| crate::state::keys::timer(3, due, id).into_bytes();
        let mut index = TimerIndex::default();
        assert!(index.due_ahead(i64::MAX, 10).is_empty());
        // A read that stopped at its limit after the timer due at 20.
        let mut end = key(20, "b");
        end.push(0);
        index.read_ahead([(key(10, "a"), b"a".to_vec()), (key(20, "b"), b"b".to_vec())], end);
        // Writes inside the range read are held; writes after it are left to the next read.
        index.written(&key(15, "c"), Some(b"c"));
        index.written(&key(30, "d"), Some(b"d"));
        index.written(&key(10, "a"), None);
        assert_eq!(index.ahead_len(), 2);
        let due: Vec<_> = index.due_ahead(20, 10).into_iter().map(|(_, v)| v).collect();
        assert_eq!(due, vec![b"c".to_vec(), b"b".to_vec()]);
        assert_eq!(index.due_ahead(17, 10).len(), 1);
        assert_eq!(index.due_ahead(20, 1).len(), 1);
        // The next read goes on from where the last one stopped.
        let until = crate::state::keys::timers_until(3, 40).into_bytes();
        index.read_ahead([(key(30, "d"), b"d".to_vec())], until.clone());
        assert_eq!((index.ahead_len(), index.ahead_end()), (3, until.as_slice()));
        index.forget_ahead();
        assert!(index.ahead_end().is_empty() && index.ahead_len() == 0);
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
