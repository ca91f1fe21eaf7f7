//! How far behind the leader a member is, in entries and in time. The leader samples when its
//! log reached each index; a member's lag in time is the age of the oldest entry it lacks,
//! which stays meaningful under a steady stream of writes (a member that is never exactly
//! level can still be only milliseconds behind). Pure: time is an argument.

use std::collections::VecDeque;

use geolock_core::limits::LAG_SAMPLES_MAX;

/// When the leader's log reached which index.
#[derive(Debug, Default)]
pub struct LagClock {
    /// `(last log index, at ms)`, indexes strictly increasing.
    samples: VecDeque<(u64, u64)>,
}

/// A member's distance from the leader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lag {
    pub entries: u64,
    pub ms: u64,
}

impl LagClock {
    /// Note that the leader's log reaches `last_index` at `now_ms`.
    pub fn record(&mut self, last_index: u64, now_ms: u64) {
        if self.samples.back().is_some_and(|(i, _)| *i >= last_index) {
            return;
        }
        if self.samples.len() == LAG_SAMPLES_MAX {
            self.samples.pop_front();
        }
        self.samples.push_back((last_index, now_ms));
    }

    /// Forget the samples (leadership ended: a later leader's log tells its own story).
    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// The lag of a member that holds the log up to `matched`, the leader's last index being
    /// `last_index`. Its lag in time is the age of the first sample beyond `matched`: the
    /// leader had an entry the member still lacks since then (at the latest).
    pub fn lag(&self, matched: u64, last_index: u64, now_ms: u64) -> Lag {
        if matched >= last_index {
            return Lag::default();
        }
        let since = self.samples.iter().find(|(i, _)| *i > matched).map_or(now_ms, |(_, at)| *at);
        Lag { entries: last_index - matched, ms: now_ms.saturating_sub(since) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_missing_entry() {
        let mut c = LagClock::default();
        c.record(10, 1_000);
        c.record(10, 1_050); // no new entry: no new sample
        c.record(15, 1_100);
        c.record(20, 1_200);
        assert_eq!(c.lag(20, 20, 1_300), Lag { entries: 0, ms: 0 });
        assert_eq!(c.lag(16, 20, 1_300), Lag { entries: 4, ms: 100 });
        assert_eq!(c.lag(12, 20, 1_300), Lag { entries: 8, ms: 200 });
        assert_eq!(c.lag(3, 20, 1_300), Lag { entries: 17, ms: 300 });
        // An index the samples do not reach yet counts from now.
        assert_eq!(c.lag(20, 25, 1_300), Lag { entries: 5, ms: 0 });
        c.clear();
        assert_eq!(c.lag(3, 20, 1_300), Lag { entries: 17, ms: 0 });
    }

    #[test]
    fn samples_are_bounded() {
        let mut c = LagClock::default();
        for i in 0..(LAG_SAMPLES_MAX as u64 + 10) {
            c.record(i + 1, i);
        }
        assert_eq!(c.samples.len(), LAG_SAMPLES_MAX);
        // The oldest samples are gone: the lag of a member that far behind is a lower bound.
        assert_eq!(c.lag(0, LAG_SAMPLES_MAX as u64 + 10, 20_000).ms, 20_000 - 10);
    }
}
