//! What the appliance does about a sync event it cannot commit (fault row F13, "poison
//! message").
//!
//! The replica is a consistent prefix of the relay's outbox, so an event that passed every
//! check on the way in but whose commit keeps failing (a full or damaged disk, a store that
//! refuses one row) cannot be skipped without the replica silently diverging from the source of
//! truth. The appliance therefore **halts at it**: the events before it are committed, the
//! event itself is requeued until the broker dead-letters it after `sync.delivery_limit`
//! deliveries, the events after it are dropped (the replay resends them), the appliance stops
//! serving matches (it is behind) and says so on `/status` and `/metrics`. It keeps asking the
//! relay for a replay, with a growing pause between asks so a permanent failure does not turn
//! into a replay storm, and heals by itself as soon as the commit succeeds again.
//!
//! [`RetryGate`] is the pause: sans-IO, time passed in.

use std::time::{Duration, Instant};

/// Spaces out the hellos (and so the replays they trigger) while a commit keeps failing.
#[derive(Clone, Debug)]
pub struct RetryGate {
    initial: Duration,
    max: Duration,
    /// The pause the next failure starts.
    next: Duration,
    /// Closed until then.
    until: Option<Instant>,
}

impl RetryGate {
    pub fn new(initial: Duration, max: Duration) -> RetryGate {
        let initial = initial.min(max);
        RetryGate {
            initial,
            max,
            next: initial,
            until: None,
        }
    }

    /// A commit failed at `now`. Redeliveries failing while the gate is already closed do not
    /// extend the pause; the first failure after a retry doubles it (up to the maximum).
    pub fn failed(&mut self, now: Instant) {
        if self.until.is_none() {
            self.until = Some(now + self.next);
            self.next = (self.next * 2).min(self.max);
        }
    }

    /// May a hello go out at `now`?
    pub fn open(&self, now: Instant) -> bool {
        self.until.is_none_or(|t| now >= t)
    }

    /// A hello went out through the open gate: the replay it brings is the next attempt.
    pub fn passed(&mut self) {
        self.until = None;
    }

    /// The replica moved past the failing event: back to a quick first retry.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.until = None;
    }

    /// How long the gate stays closed after `now` (zero when open).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.until
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn pauses_double_up_to_the_maximum_and_reset_on_success() {
        let t0 = Instant::now();
        let mut g = RetryGate::new(S, 4 * S);
        assert!(g.open(t0), "open before any failure");
        g.failed(t0);
        assert!(!g.open(t0));
        assert!(g.open(t0 + S));
        // Redeliveries of the same message failing during the pause change nothing.
        g.failed(t0 + S / 2);
        assert_eq!(g.remaining(t0 + S / 2), S / 2);
        g.passed();
        let t1 = t0 + S;
        g.failed(t1);
        assert_eq!(g.remaining(t1), 2 * S);
        g.passed();
        let t2 = t1 + 2 * S;
        g.failed(t2);
        assert_eq!(g.remaining(t2), 4 * S);
        g.passed();
        g.failed(t2 + 4 * S);
        assert_eq!(g.remaining(t2 + 4 * S), 4 * S, "capped");
        g.reset();
        assert!(g.open(t2 + 4 * S), "a success opens the gate");
        g.failed(t2 + 5 * S);
        assert_eq!(
            g.remaining(t2 + 5 * S),
            S,
            "and the next pause is short again"
        );
    }

    proptest! {
        /// Whatever happens, the gate is never closed for longer than the maximum, and it is
        /// always open once that long has passed.
        #[test]
        fn never_closed_longer_than_the_maximum(
            steps in proptest::collection::vec((0u8..3, 0u64..10_000), 0..64),
            initial_ms in 1u64..5_000,
            max_ms in 1u64..60_000,
        ) {
            let max = Duration::from_millis(max_ms);
            let mut g = RetryGate::new(Duration::from_millis(initial_ms), max);
            let mut now = Instant::now();
            for (op, dt) in steps {
                now += Duration::from_millis(dt);
                match op {
                    0 => g.failed(now),
                    1 => if g.open(now) { g.passed() },
                    _ => g.reset(),
                }
                prop_assert!(g.remaining(now) <= max);
                prop_assert!(g.open(now + max));
            }
        }
    }
}
