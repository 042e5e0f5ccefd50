//! How long to wait before trying again: every backoff of the source is computed here.
//!
//! One exponential, `BACKOFF_BASE_MS` doubling up to `BACKOFF_MAX_MS`, counted by whoever
//! asks:
//! - a failed attempt's retry ([`Backoff::retry`]) counts the message's failed attempts, with
//!   jitter (or the sink's `Retry-After`);
//! - the sink's gate ([`crate::gate`]) counts its closings in a row, without jitter: the gate
//!   is one schedule for the whole source;
//! - a message of a full ordered line counts its deferrals, without jitter: deferred messages
//!   of a subject should come back in order.
//!
//! A message handed back while the gate is shut waits out the gate's remaining time, spread
//! a little ([`spread`]).

use std::time::Duration;

/// `BACKOFF_BASE_MS` and `BACKOFF_MAX_MS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// Delays from `base` doubling up to `max`.
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The longest delay: also how long a message is held when its dead letter could not be
    /// published.
    pub(crate) fn max(self) -> Duration {
        self.max
    }

    /// `base` doubled `n - 1` times, at most `max` (`n` 0 and 1 both give `base`).
    pub(crate) fn exponential(self, n: u32) -> Duration {
        // The doubling stops at 2^30, where `1 << n` would soon overflow; any `max` below
        // `base` x 2^30 (12 days at 1 ms) is reached before that.
        self.base
            .saturating_mul(1 << n.saturating_sub(1).min(30))
            .min(self.max)
    }

    /// A `Retry-After` from the sink, at most `max`.
    pub(crate) fn capped(self, retry_after: Duration) -> Duration {
        retry_after.min(self.max)
    }

    /// The delay before a message's next try after `failures` failed attempts: the
    /// exponential with equal jitter, or the sink's `Retry-After` (capped) with a little added.
    pub(crate) fn retry(self, failures: u32, retry_after: Option<Duration>) -> Duration {
        // Equal jitter for computed delays spreads a burst of failures; Retry-After is
        // respected as a floor with up to 10% added.
        match retry_after {
            Some(after) => {
                let base = self.capped(after);
                base + base.mul_f64(fastrand::f64() * 0.1)
            }
            None => {
                let base = self.exponential(failures);
                base / 2 + base.mul_f64(fastrand::f64() * 0.5)
            }
        }
    }
}

/// A hand-back delay for a shut gate: its remaining time and up to a quarter more, so the
/// messages it held do not all come back in the same instant.
pub(crate) fn spread(shut: Duration) -> Duration {
    shut + shut.mul_f64(fastrand::f64() * 0.25)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    #[test]
    fn the_exponential_doubles_from_the_base_up_to_the_max() {
        let b = backoff();
        assert_eq!(b.exponential(0), Duration::from_millis(100));
        assert_eq!(b.exponential(1), Duration::from_millis(100));
        assert_eq!(b.exponential(2), Duration::from_millis(200));
        assert_eq!(b.exponential(4), Duration::from_millis(800));
        assert_eq!(b.exponential(8), Duration::from_secs(10));
        assert_eq!(b.exponential(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn a_computed_retry_has_equal_jitter() {
        let b = backoff();
        for _ in 0..100 {
            let delay = b.retry(3, None);
            assert!(delay >= Duration::from_millis(200), "{delay:?}");
            assert!(delay <= Duration::from_millis(400), "{delay:?}");
        }
    }

    #[test]
    fn retry_after_is_a_floor_with_at_most_a_tenth_added_and_capped() {
        let b = backoff();
        for _ in 0..100 {
            let delay = b.retry(3, Some(Duration::from_secs(2)));
            assert!(delay >= Duration::from_secs(2), "{delay:?}");
            assert!(delay <= Duration::from_millis(2200), "{delay:?}");
            let capped = b.retry(1, Some(Duration::from_secs(60)));
            assert!(capped >= Duration::from_secs(10), "{capped:?}");
            assert!(capped <= Duration::from_secs(11), "{capped:?}");
        }
    }

    #[test]
    fn a_shut_gate_spreads_its_hand_backs_over_a_quarter_more() {
        for _ in 0..100 {
            let delay = spread(Duration::from_secs(4));
            assert!(delay >= Duration::from_secs(4), "{delay:?}");
            assert!(delay <= Duration::from_secs(5), "{delay:?}");
        }
    }
}
