//! "How many in the last minute": a counter over a sliding 60-second window, for the status
//! page's "matches answered in the last minute". Sans-IO: the caller passes the current time as
//! whole seconds on any monotonic clock (the node uses seconds since start).
//!
//! Sixty one-second buckets, each remembering which second it counts; a bucket left from an
//! older second is reset when reused and ignored when read. Constant memory and O(1) per event
//! however many matches a second arrive (thousands at peak), unlike a queue of timestamps.

/// Width of the window in seconds.
pub const WINDOW_S: u64 = 60;

#[derive(Clone, Debug)]
pub struct MinuteWindow {
    /// `(second, count)` at index `second % WINDOW_S`.
    buckets: [(u64, u64); WINDOW_S as usize],
}

impl Default for MinuteWindow {
    fn default() -> Self {
        // Second `u64::MAX` is never current, so every bucket starts out stale.
        MinuteWindow {
            buckets: [(u64::MAX, 0); WINDOW_S as usize],
        }
    }
}

impl MinuteWindow {
    /// Counts one event at second `now_s`.
    pub fn record(&mut self, now_s: u64) {
        let slot = &mut self.buckets[(now_s % WINDOW_S) as usize];
        if slot.0 != now_s {
            *slot = (now_s, 0);
        }
        slot.1 += 1;
    }

    /// Events recorded in the seconds `now_s - 59 ..= now_s`. Events recorded at a second later
    /// than `now_s` (a caller whose clock went backwards) are not counted.
    pub fn total(&self, now_s: u64) -> u64 {
        self.buckets
            .iter()
            .filter(|(s, _)| *s <= now_s && now_s - *s < WINDOW_S)
            .map(|(_, n)| n)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counts_the_last_sixty_seconds_only() {
        let mut w = MinuteWindow::default();
        assert_eq!(w.total(0), 0);
        w.record(0);
        w.record(0);
        w.record(30);
        assert_eq!(w.total(30), 3);
        assert_eq!(w.total(59), 3);
        assert_eq!(w.total(60), 1, "second 0 has left the window");
        assert_eq!(w.total(89), 1);
        assert_eq!(w.total(90), 0);
        // A bucket reused a minute later starts from zero.
        w.record(120);
        assert_eq!(w.total(120), 1);
    }

    proptest! {
        /// The bucketed window agrees with a plain list of timestamps.
        #[test]
        fn agrees_with_a_list_of_timestamps(
            steps in proptest::collection::vec((0u64..5, 0u32..4), 1..300),
        ) {
            let mut w = MinuteWindow::default();
            let mut seen: Vec<u64> = Vec::new();
            let mut now = 1_000u64;
            for (advance, events) in steps {
                now += advance * 7; // jumps of 0..28 s, some past whole buckets
                for _ in 0..events {
                    w.record(now);
                    seen.push(now);
                }
                let model = seen.iter().filter(|&&t| now - t < WINDOW_S).count() as u64;
                prop_assert_eq!(w.total(now), model);
            }
        }
    }
}
