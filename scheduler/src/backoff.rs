//! The pause of every loop that waits out a failing store, peer or connection: it starts short,
//! doubles up to a ceiling, and starts short again after a success. One type, so that every
//! such loop backs off the same way and none spins.

use std::time::Duration;

/// A doubling pause between tries, capped.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    ceiling: Duration,
    next: Duration,
}

impl Backoff {
    /// Returns a backoff whose first pause is `first` and whose pauses never exceed `ceiling`.
    pub fn new(first: Duration, ceiling: Duration) -> Self {
        Self { first, ceiling, next: first.min(ceiling) }
    }

    /// Returns the pause to wait before the next try, and doubles the one after it.
    pub fn pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = self.next.saturating_mul(2).min(self.ceiling);
        pause
    }

    /// Returns the pause the next call to [`Backoff::pause`] gives, without using it.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Starts again from the first pause, after a try that succeeded.
    pub fn reset(&mut self) {
        self.next = self.first.min(self.ceiling);
    }

    /// Waits the next pause.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.pause()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_ceiling_and_start_again_after_a_success() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(50), ms(300));
        let pauses: Vec<Duration> = (0..5).map(|_| backoff.pause()).collect();
        assert_eq!(pauses, [ms(50), ms(100), ms(200), ms(300), ms(300)]);
        backoff.reset();
        assert_eq!(backoff.peek(), ms(50));
        assert_eq!(backoff.pause(), ms(50));
    }

    #[test]
    fn a_first_pause_above_the_ceiling_is_capped() {
        let mut backoff = Backoff::new(Duration::from_secs(9), Duration::from_secs(1));
        assert_eq!(backoff.pause(), Duration::from_secs(1));
    }
}
