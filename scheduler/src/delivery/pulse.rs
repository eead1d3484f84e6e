//! The last hour of this node's attempts, minute by minute, in total and by webhook: what the
//! console charts. Bounded: sixty minutes per series, one series per webhook this node sent to.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Upper bounds of the latency buckets, in milliseconds; a last bucket holds the rest.
const BOUNDS_MS: [u64; 14] = [5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000];

/// Minutes kept.
pub const MINUTES: usize = 60;

const MINUTE_MS: i64 = 60_000;

#[derive(Clone, Copy, Default)]
struct Minute {
    start_ms: i64,
    attempts: u64,
    succeeded: u64,
    latency: [u64; BOUNDS_MS.len() + 1],
}

impl Minute {
    fn add(&mut self, other: &Minute) {
        self.attempts += other.attempts;
        self.succeeded += other.succeeded;
        for (a, b) in self.latency.iter_mut().zip(other.latency.iter()) {
            *a += b;
        }
    }
}

#[derive(Default)]
struct Series {
    minutes: VecDeque<Minute>,
}

impl Series {
    fn record(&mut self, now_ms: i64, succeeded: bool, duration_ms: u64) {
        let start_ms = now_ms - now_ms.rem_euclid(MINUTE_MS);
        if self.minutes.back().is_none_or(|m| m.start_ms < start_ms) {
            self.minutes.push_back(Minute { start_ms, ..Default::default() });
        }
        while self
            .minutes
            .front()
            .is_some_and(|m| m.start_ms <= start_ms - MINUTES as i64 * MINUTE_MS)
        {
            self.minutes.pop_front();
        }
        // A clock that stepped back lands in the newest minute.
        let Some(minute) = self.minutes.back_mut() else { return };
        minute.attempts += 1;
        minute.succeeded += u64::from(succeeded);
        let bucket = BOUNDS_MS.iter().position(|b| duration_ms <= *b).unwrap_or(BOUNDS_MS.len());
        minute.latency[bucket] += 1;
    }

    fn since(&self, from_ms: i64) -> impl Iterator<Item = &Minute> {
        self.minutes.iter().filter(move |m| m.start_ms >= from_ms)
    }
}

/// One minute of attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MinuteFigures {
    /// Start of the minute, Unix milliseconds.
    pub start_ms: i64,
    /// Attempts made.
    pub attempts: u64,
    /// Attempts the endpoint accepted.
    pub succeeded: u64,
    /// The 95th percentile latency, as the upper bound of its bucket, in milliseconds; `None`
    /// without attempts or above the largest bound.
    pub p95_ms: Option<u64>,
}

impl MinuteFigures {
    /// Attempts per second over the minute.
    pub fn per_second(&self) -> f64 {
        self.attempts as f64 / 60.0
    }

    /// Share of attempts that succeeded, `None` without attempts.
    pub fn success_rate(&self) -> Option<f64> {
        (self.attempts > 0).then(|| self.succeeded as f64 / self.attempts as f64)
    }
}

fn figures(minute: &Minute) -> MinuteFigures {
    let wanted = (minute.attempts as f64 * 0.95).ceil() as u64;
    let mut seen = 0;
    let mut p95_ms = None;
    if minute.attempts > 0 {
        for (i, count) in minute.latency.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                p95_ms = BOUNDS_MS.get(i).copied();
                break;
            }
        }
    }
    MinuteFigures {
        start_ms: minute.start_ms,
        attempts: minute.attempts,
        succeeded: minute.succeeded,
        p95_ms,
    }
}

#[derive(Default)]
struct Inner {
    total: Series,
    webhooks: HashMap<String, Series>,
}

/// This node's attempts over the last hour.
#[derive(Default)]
pub struct Pulse {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Pulse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pulse").finish_non_exhaustive()
    }
}

impl Pulse {
    /// Records an attempt at `now_ms`.
    pub fn record(&self, webhook: &str, now_ms: i64, succeeded: bool, duration_ms: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.total.record(now_ms, succeeded, duration_ms);
        match inner.webhooks.get_mut(webhook) {
            Some(series) => series.record(now_ms, succeeded, duration_ms),
            None => {
                let mut series = Series::default();
                series.record(now_ms, succeeded, duration_ms);
                inner.webhooks.insert(webhook.to_string(), series);
            }
        }
    }

    /// Returns the last hour minute by minute, oldest first, with the minutes without attempts.
    pub fn hour(&self, now_ms: i64) -> Vec<MinuteFigures> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let current = now_ms - now_ms.rem_euclid(MINUTE_MS);
        let first = current - (MINUTES as i64 - 1) * MINUTE_MS;
        let mut out: Vec<MinuteFigures> = (0..MINUTES as i64)
            .map(|i| MinuteFigures { start_ms: first + i * MINUTE_MS, ..Default::default() })
            .collect();
        for minute in inner.total.since(first) {
            let i = ((minute.start_ms - first) / MINUTE_MS) as usize;
            if let Some(slot) = out.get_mut(i) {
                *slot = figures(minute);
            }
        }
        out
    }

    /// Returns a webhook's whole last hour as one figure (`start_ms` is the hour's start).
    pub fn webhook(&self, webhook: &str, now_ms: i64) -> MinuteFigures {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let from = now_ms - now_ms.rem_euclid(MINUTE_MS) - (MINUTES as i64 - 1) * MINUTE_MS;
        let mut sum = Minute { start_ms: from, ..Default::default() };
        if let Some(series) = inner.webhooks.get(webhook) {
            for minute in series.since(from) {
                sum.add(minute);
            }
        }
        figures(&sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    #[test]
    fn minutes_are_counted_and_the_hour_rolls() {
        let pulse = Pulse::default();
        for i in 0..100 {
            pulse.record("wh_a", T0, i < 90, if i < 95 { 20 } else { 900 });
        }
        pulse.record("wh_b", T0 + 61_000, true, 3);
        let hour = pulse.hour(T0 + 61_000);
        assert_eq!(hour.len(), MINUTES);
        let last = hour[MINUTES - 1];
        assert_eq!((last.attempts, last.succeeded, last.p95_ms), (1, 1, Some(5)));
        let before = hour[MINUTES - 2];
        assert_eq!((before.attempts, before.succeeded, before.p95_ms), (100, 90, Some(25)));
        assert_eq!(before.success_rate(), Some(0.9));
        let a = pulse.webhook("wh_a", T0 + 61_000);
        assert_eq!((a.attempts, a.p95_ms), (100, Some(25)));
        // An hour later the first minute has left the window.
        let later = T0 + 60 * 60_000;
        assert_eq!(pulse.webhook("wh_a", later).attempts, 0);
        assert_eq!(pulse.hour(later).iter().map(|m| m.attempts).sum::<u64>(), 1);
        assert_eq!(
            pulse.webhook("wh_none", later),
            MinuteFigures {
                start_ms: pulse.webhook("wh_none", later).start_ms,
                ..Default::default()
            }
        );
    }
}
