//! Exponential back-off per key, like upstream's `flowcontrol.Backoff`: used for image pulls
//! (`ImagePullBackOff`) and container restarts (`CrashLoopBackOff`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A random number in [0, 1) (the time hashed with a randomly keyed hasher: no random number crate needed for
/// spreading timers).
pub fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Past this many keys, those quiet long enough to have expired are dropped.
const GC_AT: usize = 256;

/// Back-off state for many keys (e.g. `<pod uid>_<image>`).
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    entries: HashMap<String, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    delay: Duration,
    last_update: Instant,
}

impl Backoff {
    /// Upstream's image pull back-off: 10 s doubling to 300 s.
    pub fn image_pull() -> Backoff {
        Backoff::new(Duration::from_secs(10), Duration::from_secs(300))
    }

    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max, entries: HashMap::new() }
    }

    /// Records a failure at `now`: the delay starts at `initial`, doubles up to `max`, and starts over once the
    /// key has been quiet for twice the maximum.
    pub fn next(&mut self, key: &str, now: Instant) {
        let (initial, max) = (self.initial, self.max);
        if self.entries.len() >= GC_AT {
            // Keys of pods long gone: quiet for twice the maximum, they would start over anyway (upstream's GC).
            self.entries.retain(|_, e| now.saturating_duration_since(e.last_update) <= max * 2);
        }
        let entry = self.entries.entry(key.to_owned()).or_insert(Entry { delay: Duration::ZERO, last_update: now });
        let expired = now.saturating_duration_since(entry.last_update) > max * 2;
        entry.delay = if entry.delay.is_zero() || expired { initial } else { (entry.delay * 2).min(max) };
        entry.last_update = now;
    }

    /// True while `now` is within the delay after the last recorded failure.
    pub fn in_backoff(&self, key: &str, now: Instant) -> bool {
        self.entries.get(key).is_some_and(|e| now < e.last_update + e.delay)
    }

    /// The current delay of a key (zero if none).
    pub fn delay(&self, key: &str) -> Duration {
        self.entries.get(key).map_or(Duration::ZERO, |e| e.delay)
    }

    /// Forgets a key (after a success).
    pub fn reset(&mut self, key: &str) {
        self.entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_expires() {
        let mut b = Backoff::image_pull();
        let t0 = Instant::now();
        assert!(!b.in_backoff("k", t0));
        b.next("k", t0);
        assert!(b.in_backoff("k", t0 + Duration::from_secs(9)));
        assert!(!b.in_backoff("k", t0 + Duration::from_secs(10)));
        let mut t = t0;
        for want in [20, 40, 80, 160, 300, 300] {
            t += Duration::from_secs(11);
            b.next("k", t);
            assert_eq!(b.delay("k"), Duration::from_secs(want));
        }
        b.next("k", t + Duration::from_secs(601));
        assert_eq!(b.delay("k"), Duration::from_secs(10));
        b.reset("k");
        assert_eq!(b.delay("k"), Duration::ZERO);
    }

    #[test]
    fn keys_of_gone_pods_do_not_pile_up() {
        let mut b = Backoff::image_pull();
        let t0 = Instant::now();
        for i in 0..10 * GC_AT {
            b.next(&format!("pod-{i}_image"), t0 + Duration::from_secs(i as u64));
        }
        // Only the keys of the last 600 s (twice the maximum) may stay.
        assert!(b.entries.len() <= GC_AT.max(601), "{}", b.entries.len());
    }
}
