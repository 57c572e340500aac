//! The seconds before an OOM kill, for its record: the memory watch (`eviction/memory_watch.rs`) samples the
//! node's available memory and the pods' memory stall every interval (100 ms by default) into a ring of the last
//! [`WINDOW`]; a record takes what the ring holds when it is made. Node-level, not the killed container's: one
//! sampler for the node costs two small reads per interval, one per container would cost that many times more.
//! The ring is bounded by time and by [`MAX_SAMPLES`] (an interval of 10 ms keeps the last 0.5 s).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How far back a record looks.
pub const WINDOW: Duration = Duration::from_secs(5);
/// At most this many samples are kept.
pub const MAX_SAMPLES: usize = 50;

/// One sample of the node's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemorySample {
    /// How long before the record was made the sample was taken, ms.
    pub ms_before: u64,
    /// `MemAvailable`.
    pub memory_available_bytes: u64,
    /// The pods' cgroup's (`kubepods`) memory stall so far: `memory.pressure`'s `some` and `full` totals, µs.
    pub pods_stall_some_us: Option<u64>,
    pub pods_stall_full_us: Option<u64>,
}

/// What the watch reads at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub memory_available_bytes: u64,
    pub pods_stall: Option<(u64, u64)>,
}

/// The ring of recent readings, shared by the watch (writer) and the records (readers).
#[derive(Debug, Clone, Default)]
pub struct Samples(Arc<Mutex<VecDeque<(Instant, Reading)>>>);

impl Samples {
    /// Adds the reading taken `at`, dropping what falls out of the window or past the bound.
    pub fn push(&self, at: Instant, reading: Reading) {
        let mut ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ring.push_back((at, reading));
        while ring.len() > MAX_SAMPLES || ring.front().is_some_and(|(t, _)| at.saturating_duration_since(*t) > WINDOW) {
            ring.pop_front();
        }
    }

    /// The samples of the [`WINDOW`] before `now`, oldest first.
    pub fn before(&self, now: Instant) -> Vec<MemorySample> {
        let ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) <= WINDOW)
            .map(|(t, r)| MemorySample {
                ms_before: u64::try_from(now.saturating_duration_since(*t).as_millis()).unwrap_or(u64::MAX),
                memory_available_bytes: r.memory_available_bytes,
                pods_stall_some_us: r.pods_stall.map(|(some, _)| some),
                pods_stall_full_us: r.pods_stall.map(|(_, full)| full),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(mib: u64) -> Reading {
        Reading { memory_available_bytes: mib << 20, pods_stall: Some((mib, 0)) }
    }

    #[test]
    fn keeps_the_window_before_the_record() {
        let samples = Samples::default();
        let start = Instant::now();
        for i in 0..80u64 {
            samples.push(start + Duration::from_millis(100 * i), reading(1000 - i));
        }
        // 80 pushed over 7.9 s: the bound and the window keep the last 5 s (51 readings, capped at 50).
        let now = start + Duration::from_millis(7_900);
        let recent = samples.before(now);
        assert_eq!(recent.len(), MAX_SAMPLES);
        assert_eq!(recent.last().map(|s| (s.ms_before, s.memory_available_bytes)), Some((0, 921 << 20)));
        assert_eq!(recent[0].ms_before, 4_900);
        assert_eq!(recent[0].pods_stall_some_us, Some(970));
        // A record made long after the last sample has none.
        assert!(samples.before(now + 2 * WINDOW).is_empty());
    }

    #[test]
    fn a_slow_interval_keeps_the_window_only() {
        let samples = Samples::default();
        let start = Instant::now();
        for i in 0..10u64 {
            samples.push(start + Duration::from_secs(i), Reading { memory_available_bytes: i, pods_stall: None });
        }
        let recent = samples.before(start + Duration::from_secs(9));
        assert_eq!(recent.iter().map(|s| s.memory_available_bytes).collect::<Vec<_>>(), [4, 5, 6, 7, 8, 9]);
        assert!(recent.iter().all(|s| s.pods_stall_some_us.is_none()));
    }
}
