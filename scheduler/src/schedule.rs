//! When interval campaigns fire: fixed periods and cron expressions in a time zone, between a
//! start and an end, with a policy for firings missed while no node could run them.
//!
//! Pure: times in, times out. Cron expressions are read in their IANA time zone with daylight
//! saving handled the way operators expect: a wall-clock time that does not exist (spring
//! forward) fires at the first instant after the gap instead of being skipped, and a wall-clock
//! time that happens twice (fall back) fires once, at its first instance.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde::{Deserialize, Serialize};

/// A late firing within this much of its due time is an ordinary firing, not a misfire.
pub const MISFIRE_THRESHOLD_MS: i64 = 60_000;

/// How an interval repeats.
#[derive(Clone, Debug)]
pub enum Repeat {
    /// Every `period_ms`, counted from `anchor_ms`.
    Every {
        /// Period in milliseconds.
        period_ms: i64,
        /// An occurrence; the others are whole periods away from it.
        anchor_ms: i64,
    },
    /// A cron expression read in a time zone.
    Cron {
        /// The parsed expression.
        cron: Box<Cron>,
        /// The time zone.
        tz: Tz,
    },
}

/// What to do with occurrences missed while no node could run them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// Fire none of them; wait for the next occurrence.
    Skip,
    /// Fire once, for the latest of them.
    #[default]
    FireOnce,
    /// Fire each of them, the latest `limit` at most.
    FireAll,
}

/// Parses a cron expression of 5 fields, or 6 with seconds first.
pub fn parse_cron(expression: &str) -> Result<Cron, String> {
    let fields = expression.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!(
            "has {fields} fields; expected 6 (second minute hour day-of-month month day-of-week) or 5 without seconds"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(expression)
        .map_err(|e| e.to_string())
}

/// Parses an IANA time zone name; empty means UTC.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    if name.is_empty() {
        return Ok(Tz::UTC);
    }
    Tz::from_str(name)
        .map_err(|_| format!("{name:?} is not an IANA time zone (for example Europe/Paris)"))
}

fn to_datetime(tz: &Tz, ms: i64) -> Option<DateTime<Tz>> {
    Utc.timestamp_millis_opt(ms).single().map(|t| t.with_timezone(tz))
}

impl Repeat {
    /// Returns a cron repeat, or why the expression or zone is invalid.
    pub fn cron(expression: &str, timezone: &str) -> Result<Self, String> {
        Ok(Repeat::Cron { cron: Box::new(parse_cron(expression)?), tz: parse_timezone(timezone)? })
    }

    /// Returns the first occurrence strictly after `after_ms`, if there is one.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Repeat::Every { period_ms, anchor_ms } => {
                let period = (*period_ms).max(1);
                let steps = (after_ms - anchor_ms).div_euclid(period) + 1;
                Some(anchor_ms + steps * period)
            }
            Repeat::Cron { cron, tz } => {
                let mut start = to_datetime(tz, after_ms)?;
                // In a repeated hour, a wall-clock time can resolve to its first instance, which
                // lies before `after_ms`; search again from after that wall-clock time.
                for _ in 0..8 {
                    let next = cron.find_next_occurrence(&start, false).ok()?;
                    let ms = next.timestamp_millis();
                    if ms > after_ms {
                        return Some(ms);
                    }
                    let naive = next.naive_local() + chrono::Duration::seconds(1);
                    start = tz.from_local_datetime(&naive).latest()?;
                }
                None
            }
        }
    }

    /// Returns up to `limit` latest occurrences in `[from_ms, until_ms]`, oldest first.
    pub fn latest_between(&self, from_ms: i64, until_ms: i64, limit: usize) -> Vec<i64> {
        let mut out = Vec::new();
        match self {
            Repeat::Every { period_ms, anchor_ms } => {
                let period = (*period_ms).max(1);
                let mut at = anchor_ms + (until_ms - anchor_ms).div_euclid(period) * period;
                while at >= from_ms && out.len() < limit {
                    out.push(at);
                    at -= period;
                }
            }
            Repeat::Cron { cron, tz } => {
                let Some(mut cursor) = to_datetime(tz, until_ms + 1) else { return out };
                while out.len() < limit {
                    let Ok(previous) = cron.find_previous_occurrence(&cursor, false) else { break };
                    let ms = previous.timestamp_millis();
                    if ms < from_ms || out.last() == Some(&ms) {
                        break;
                    }
                    out.push(ms);
                    cursor = previous;
                }
            }
        }
        out.reverse();
        out
    }
}

/// An interval's whole schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// How it repeats.
    pub repeat: Repeat,
    /// No occurrence before this time.
    pub start_ms: i64,
    /// No occurrence at or after this time.
    pub end_ms: Option<i64>,
    /// Missed occurrences policy.
    pub misfire: Misfire,
    /// Most missed occurrences replayed by [`Misfire::FireAll`].
    pub misfire_limit: usize,
}

/// What to do when the timer of an occurrence fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firing {
    /// Occurrences to run now, oldest first (each is a run's identity).
    pub fire: Vec<i64>,
    /// The occurrence to set the next timer for, if any.
    pub next: Option<i64>,
}

impl Schedule {
    /// Returns the first occurrence at or after `at_ms` (and at or after the start).
    pub fn first_from(&self, at_ms: i64) -> Option<i64> {
        let from = at_ms.max(self.start_ms);
        self.repeat.next_after(from - 1).filter(|t| self.end_ms.is_none_or(|end| *t < end))
    }

    /// Decides what the timer of occurrence `due_ms` does when it fires at `now_ms`.
    pub fn on_fire(&self, due_ms: i64, now_ms: i64) -> Firing {
        let in_range = |t: &i64| *t >= self.start_ms && self.end_ms.is_none_or(|end| *t < end);
        let next = self.repeat.next_after(now_ms.max(due_ms)).filter(in_range);
        let bound = self.end_ms.map_or(now_ms, |end| now_ms.min(end - 1));
        // Occurrences from the due one up to now; more than one means some were missed.
        let passed = self.repeat.latest_between(due_ms, bound, self.misfire_limit.max(1) + 1);
        let missed = passed.len() > 1 || now_ms - due_ms > MISFIRE_THRESHOLD_MS;
        let fire = if !in_range(&due_ms) {
            Vec::new()
        } else if !missed {
            vec![due_ms]
        } else {
            let mut passed: Vec<i64> = passed.into_iter().filter(in_range).collect();
            if passed.is_empty() {
                passed.push(due_ms);
            }
            match self.misfire {
                Misfire::Skip => Vec::new(),
                Misfire::FireOnce => passed.last().copied().into_iter().collect(),
                Misfire::FireAll => {
                    let keep = self.misfire_limit.max(1);
                    passed.split_off(passed.len().saturating_sub(keep))
                }
            }
        };
        Firing { fire, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn utc(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).expect("time").timestamp_millis()
    }

    fn every(period_ms: i64) -> Schedule {
        Schedule {
            repeat: Repeat::Every { period_ms, anchor_ms: 0 },
            start_ms: 0,
            end_ms: None,
            misfire: Misfire::FireOnce,
            misfire_limit: 10,
        }
    }

    #[test]
    fn spring_forward_fires_after_the_gap_instead_of_skipping() {
        // New York, 2026-03-08: 02:00 EST jumps to 03:00 EDT; 02:30 does not exist.
        let repeat = Repeat::cron("0 30 2 * * *", "America/New_York").expect("valid");
        let next = repeat.next_after(utc("2026-03-08T06:00:00Z")).expect("an occurrence");
        assert_eq!(next, utc("2026-03-08T07:00:00Z"), "03:00 EDT, right after the gap");
        let after = repeat.next_after(next).expect("an occurrence");
        assert_eq!(after, utc("2026-03-09T06:30:00Z"), "02:30 EDT the next day");
    }

    #[test]
    fn fall_back_fires_a_repeated_time_once() {
        // New York, 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice.
        let repeat = Repeat::cron("0 30 1 * * *", "America/New_York").expect("valid");
        let first = repeat.next_after(utc("2026-11-01T04:00:00Z")).expect("an occurrence");
        assert_eq!(first, utc("2026-11-01T05:30:00Z"), "01:30 EDT");
        let second = repeat.next_after(first).expect("an occurrence");
        assert_eq!(second, utc("2026-11-02T06:30:00Z"), "not 01:30 EST the same night");
        // Asking from inside the repeated hour does not go back in time either.
        let inside = repeat.next_after(utc("2026-11-01T06:10:00Z")).expect("an occurrence");
        assert_eq!(inside, utc("2026-11-02T06:30:00Z"));
    }

    #[test]
    fn bad_expressions_and_zones_are_explained() {
        assert!(parse_cron("* * *").expect_err("3 fields").contains("3 fields"));
        assert!(parse_cron("0 61 * * * *").is_err());
        assert!(parse_timezone("Mars/Olympus").expect_err("zone").contains("IANA"));
        assert_eq!(parse_timezone("").expect("utc"), Tz::UTC);
    }

    #[test]
    fn misfire_policies() {
        let mut schedule = every(1000);
        // On time: fire the due occurrence.
        assert_eq!(schedule.on_fire(5000, 5010), Firing { fire: vec![5000], next: Some(6000) });
        // Five occurrences passed while no node ran.
        assert_eq!(schedule.on_fire(5000, 9500).fire, vec![9000]);
        schedule.misfire = Misfire::Skip;
        assert_eq!(schedule.on_fire(5000, 9500), Firing { fire: vec![], next: Some(10000) });
        schedule.misfire = Misfire::FireAll;
        schedule.misfire_limit = 3;
        assert_eq!(schedule.on_fire(5000, 9500).fire, vec![7000, 8000, 9000]);
        schedule.misfire_limit = 100;
        assert_eq!(schedule.on_fire(5000, 9500).fire, vec![5000, 6000, 7000, 8000, 9000]);
    }

    #[test]
    fn start_and_end_bound_the_occurrences() {
        let mut schedule = every(1000);
        schedule.start_ms = 2500;
        schedule.end_ms = Some(5000);
        assert_eq!(schedule.first_from(0), Some(3000));
        assert_eq!(schedule.on_fire(4000, 4001), Firing { fire: vec![4000], next: None });
        assert_eq!(schedule.first_from(5000), None);
    }

    proptest! {
        #[test]
        fn cron_occurrences_always_move_forward(start in 1_700_000_000_000i64..1_900_000_000_000, zone in 0usize..4) {
            let zones = ["UTC", "America/New_York", "Europe/Paris", "Australia/Lord_Howe"];
            let repeat = Repeat::cron("0 */20 * * * *", zones[zone]).expect("valid");
            let mut at = start;
            for _ in 0..20 {
                let next = repeat.next_after(at).expect("an occurrence");
                prop_assert!(next > at);
                prop_assert!(next - at <= 2 * 3600 * 1000, "no silent gap: {} -> {}", at, next);
                at = next;
            }
        }

        #[test]
        fn a_firing_never_runs_an_occurrence_twice_or_early(period in 1000i64..100_000, due_steps in 1i64..1000, late in 0i64..1_000_000) {
            let schedule = every(period);
            let due = due_steps * period;
            let now = due + late;
            let firing = schedule.on_fire(due, now);
            prop_assert!(firing.fire.iter().all(|t| *t >= due && *t <= now));
            prop_assert!(firing.fire.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(firing.next.is_some_and(|n| n > now));
        }
    }
}

/// Hours of the week when sending is allowed, in a time zone.
#[derive(Clone, Debug)]
pub struct Window {
    /// Days allowed, 1 (Monday) to 7 (Sunday); every day when empty.
    pub days: Vec<u32>,
    /// Opening minute of the day.
    pub start_minute: u32,
    /// Closing minute of the day; before `start_minute` when the window spans midnight.
    pub end_minute: u32,
}

impl Window {
    /// Returns `now_ms` when the window is open then, or else when it next opens. A send is
    /// deferred to that time, never dropped.
    pub fn next_open(&self, tz: &Tz, now_ms: i64) -> i64 {
        use chrono::{Datelike, Duration as ChronoDuration, NaiveTime};
        let Some(now) = to_datetime(tz, now_ms) else { return now_ms };
        let local = now.naive_local();
        let allowed = |date: chrono::NaiveDate| {
            self.days.is_empty() || self.days.contains(&date.weekday().number_from_monday())
        };
        let at = |date: chrono::NaiveDate, minute: u32| {
            date.and_time(NaiveTime::from_hms_opt(minute / 60, minute % 60, 0).unwrap_or_default())
        };
        // Open intervals in local time, from yesterday (a window spanning midnight) on.
        let mut intervals = Vec::new();
        for offset in -1..8 {
            let date = local.date() + ChronoDuration::days(offset);
            if !allowed(date) {
                continue;
            }
            if self.start_minute < self.end_minute {
                intervals.push((at(date, self.start_minute), at(date, self.end_minute)));
            } else {
                intervals.push((
                    at(date, self.start_minute),
                    at(date + ChronoDuration::days(1), self.end_minute),
                ));
            }
        }
        if intervals.iter().any(|(open, close)| *open <= local && local < *close) {
            return now_ms;
        }
        let Some((open, _)) = intervals.into_iter().filter(|(open, _)| *open > local).min() else {
            return now_ms;
        };
        // An opening inside a spring-forward gap opens right after it.
        let mut naive = open;
        for _ in 0..4 {
            if let Some(instant) = tz.from_local_datetime(&naive).earliest() {
                return instant.timestamp_millis().max(now_ms);
            }
            naive += ChronoDuration::minutes(30);
        }
        now_ms
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    fn utc(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).expect("time").timestamp_millis()
    }

    #[test]
    fn an_open_window_sends_now_and_a_closed_one_waits_for_the_next_opening() {
        let paris: Tz = "Europe/Paris".parse().expect("zone");
        // Weekdays 09:00-18:00 in Paris (UTC+1 in November).
        let window =
            Window { days: vec![1, 2, 3, 4, 5], start_minute: 9 * 60, end_minute: 18 * 60 };
        let monday_noon = utc("2026-11-30T11:00:00Z");
        assert_eq!(window.next_open(&paris, monday_noon), monday_noon);
        let monday_night = utc("2026-11-30T20:00:00Z");
        assert_eq!(window.next_open(&paris, monday_night), utc("2026-12-01T08:00:00Z"));
        let saturday = utc("2026-11-28T10:00:00Z");
        assert_eq!(window.next_open(&paris, saturday), utc("2026-11-30T08:00:00Z"));
    }

    #[test]
    fn a_window_can_span_midnight() {
        let window = Window { days: vec![], start_minute: 22 * 60, end_minute: 2 * 60 };
        assert_eq!(
            window.next_open(&Tz::UTC, utc("2026-11-28T23:30:00Z")),
            utc("2026-11-28T23:30:00Z")
        );
        assert_eq!(
            window.next_open(&Tz::UTC, utc("2026-11-29T01:00:00Z")),
            utc("2026-11-29T01:00:00Z")
        );
        assert_eq!(
            window.next_open(&Tz::UTC, utc("2026-11-29T03:00:00Z")),
            utc("2026-11-29T22:00:00Z")
        );
    }
}
