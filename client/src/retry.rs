//! When a failed call is tried again: capped exponential backoff with full jitter, or the wait
//! the server asked for.

use std::time::Duration;

use crate::Error;

/// How calls that are safe to repeat are retried after a retryable error.
///
/// Reads are always safe; `Publish` and `RunCampaign` are made safe by an idempotency key, which
/// the client sets when the caller did not. Other writes are never retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Most attempts of one call, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// Upper bound of the wait before the first retry.
    pub initial_backoff: Duration,
    /// Upper bound of any wait.
    pub max_backoff: Duration,
    /// Growth of the bound from one retry to the next.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    /// Returns 8 attempts with waits growing from at most 100 ms to at most 3 s: about ten
    /// seconds in all, long enough for a node to restart.
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(3),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// Returns a policy that never retries.
    pub fn none() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    /// Returns the wait before attempt `attempt + 1` after `error` ended attempt `attempt`
    /// (counted from 1), or `None` when the call should fail now. `unit` is a uniform sample of
    /// `[0, 1)` that spreads the waits of many clients.
    pub(crate) fn delay(&self, attempt: u32, error: &Error, unit: f64) -> Option<Duration> {
        if attempt >= self.max_attempts || !error.retryable() {
            return None;
        }
        if let Error::ResourceExhausted { retry_after: Some(hint), .. } = error {
            // A hint is followed, within reason: a confused server cannot park a caller for hours.
            return Some((*hint).min(Duration::from_secs(60)));
        }
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let bound = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let bound = bound.min(self.max_backoff.as_secs_f64());
        Some(Duration::from_secs_f64(bound * unit.clamp(0.0, 1.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn errors_that_cannot_pass_on_a_retry_fail_at_once() {
        let policy = RetryPolicy::default();
        let invalid = Error::InvalidArgument { message: "x".into(), violations: vec![] };
        assert_eq!(policy.delay(1, &invalid, 0.5), None);
        assert_eq!(policy.delay(1, &Error::NotFound("w".into()), 0.5), None);
        let unavailable = Error::Unavailable("down".into());
        assert_eq!(policy.delay(8, &unavailable, 0.5), None);
        assert_eq!(RetryPolicy::none().delay(1, &unavailable, 0.5), None);
    }

    #[test]
    fn the_server_hint_is_honoured() {
        let hinted = Error::ResourceExhausted {
            message: "full".into(),
            retry_after: Some(Duration::from_secs(1)),
        };
        assert_eq!(RetryPolicy::default().delay(1, &hinted, 0.0), Some(Duration::from_secs(1)));
    }

    proptest! {
        #[test]
        fn waits_stay_under_the_growing_bound(attempt in 1u32..8, unit in 0.0f64..1.0) {
            let policy = RetryPolicy::default();
            let wait = policy.delay(attempt, &Error::Unavailable("down".into()), unit);
            let bound = (0.1 * 2f64.powi(attempt as i32 - 1)).min(3.0);
            prop_assert!(wait.is_some_and(|wait| wait.as_secs_f64() <= bound + 1e-9));
        }
    }
}
