//! Which attempts are retried and when: pure functions of the outcome and the policy.

use std::time::Duration;

use crate::webhook::RetryPolicy;

/// Shortest wait a `Retry-After` can ask for.
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Longest wait a `Retry-After` can ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What an attempt's outcome means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered.
    Success,
    /// Worth another attempt, after at least the given wait when the receiver asked for one.
    Retry(Option<Duration>),
    /// Final failure.
    Fail,
    /// The endpoint is gone for good (410): fail and disable the webhook.
    Gone,
}

impl Verdict {
    /// Returns the verdict as it is named in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Success => "success",
            Verdict::Retry(_) => "retry",
            Verdict::Fail => "fail",
            Verdict::Gone => "gone",
        }
    }
}

/// Classifies an HTTP status (`None` for no response: connection error or timeout).
pub fn classify(status: Option<u16>, retry_after: Option<Duration>) -> Verdict {
    match status {
        None => Verdict::Retry(None),
        Some(200..=299) => Verdict::Success,
        Some(410) => Verdict::Gone,
        Some(408 | 425 | 429 | 500..=599) => {
            Verdict::Retry(retry_after.map(|d| d.clamp(MIN_RETRY_AFTER, MAX_RETRY_AFTER)))
        }
        Some(_) => Verdict::Fail,
    }
}

/// Parses a `Retry-After` value: delay seconds, or an HTTP date relative to `now_ms`.
pub fn parse_retry_after(value: &str, now_ms: i64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?.timestamp_millis();
    Some(Duration::from_millis((at - now_ms).max(0) as u64))
}

/// Returns the wait before retry number `retry` (0 for the first retry), or `None` when the
/// schedule is exhausted. `unit` is a random number in [0, 1) that places the jitter.
pub fn delay(
    policy: &RetryPolicy,
    retry: usize,
    asked: Option<Duration>,
    unit: f64,
) -> Option<Duration> {
    let base = *policy.delays_ms.get(retry)?;
    let spread = policy.jitter.clamp(0.0, 0.5);
    let factor = 1.0 + spread * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
    let jittered = Duration::from_millis((base as f64 * factor).round() as u64);
    Some(asked.map_or(jittered, |asked| asked.max(jittered)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn statuses_are_classified_as_the_contract_says() {
        assert_eq!(classify(Some(204), None), Verdict::Success);
        assert_eq!(classify(None, None), Verdict::Retry(None));
        for status in [408, 425, 429, 500, 502, 503] {
            assert!(matches!(classify(Some(status), None), Verdict::Retry(_)), "{status}");
        }
        for status in [301, 400, 401, 404, 422] {
            assert_eq!(classify(Some(status), None), Verdict::Fail, "{status}");
        }
        assert_eq!(classify(Some(410), None), Verdict::Gone);
        assert_eq!(
            classify(Some(429), Some(Duration::from_secs(999_999))),
            Verdict::Retry(Some(MAX_RETRY_AFTER))
        );
        assert_eq!(
            classify(Some(503), Some(Duration::ZERO)),
            Verdict::Retry(Some(MIN_RETRY_AFTER))
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("120", 0), Some(Duration::from_secs(120)));
        let now = chrono::DateTime::parse_from_rfc2822("Wed, 21 Oct 2026 07:28:00 GMT")
            .expect("date")
            .timestamp_millis();
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", 0), None);
    }

    #[test]
    fn the_schedule_ends() {
        let policy = RetryPolicy::default();
        assert_eq!(delay(&policy, 0, None, 0.5), Some(Duration::ZERO));
        assert_eq!(delay(&policy, 1, None, 0.5), Some(Duration::from_secs(5)));
        assert_eq!(delay(&policy, 8, None, 0.5), None);
        assert_eq!(
            delay(&policy, 1, Some(Duration::from_secs(60)), 0.5),
            Some(Duration::from_secs(60))
        );
    }

    proptest! {
        #[test]
        fn jitter_stays_within_bounds(retry in 0usize..8, unit in 0.0f64..1.0) {
            let policy = RetryPolicy::default();
            let base = policy.delays_ms[retry] as f64;
            let got = delay(&policy, retry, None, unit).expect("in schedule").as_millis() as f64;
            prop_assert!(got >= (base * 0.8).floor() && got <= (base * 1.2).ceil());
        }
    }
}
