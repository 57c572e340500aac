//! The memory watch (nodelet's own): between the eviction manager's rounds, a thread reads the two memory signals
//! (`memory.available` from `/proc/meminfo`, `allocatableMemory.available` from the pods' cgroup) every interval
//! and wakes the manager when a memory threshold is met, so that it evicts within the interval instead of at its
//! next round (upstream's housekeeping, 10 s: a pod growing at 256 MiB/s takes 2.5 GiB in that time, and the
//! OOM killer acts first).
//!
//! A poll, not the kernel's notifications, on both cgroup layouts: v1's `cgroup.event_control` thresholds on
//! `memory.usage_in_bytes` count page cache that `MemAvailable` and the working set leave out, so they fire
//! early or late by the cache's size, and cgroup v2 has no usage thresholds at all (its `memory.high` events
//! throttle the pods). Two small reads every 100 ms bound the delay on either layout (their cost is not
//! measured yet).
//! Pressure stalls (`psi`) are the kernel's own events and wake the manager directly.
//!
//! Each reading is also kept for OOM records ([`Sampler`], `crate::oom::samples`), with the pods' memory stall.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::thresholds::{self, Starved, Threshold};
use crate::node::conditions::{PodsMemory, Signals};

/// While a memory threshold stays met, the manager is woken at most this often: it evicts one pod per round and
/// waits for the last one to be cleaned up, so more wake-ups would only read the same signals again.
pub const REWAKE: Duration = Duration::from_secs(1);

/// `--eviction-memory-watch`: a Go duration from 10ms to 10s, or `0`/`0s` for none.
pub fn parse_interval(text: &str) -> Result<Option<Duration>, String> {
    if text == "0" {
        return Ok(None);
    }
    let interval = crate::config::parse_go_duration(text)?;
    if interval.is_zero() {
        return Ok(None);
    }
    if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&interval) {
        return Err(format!("{text:?}: the memory watch interval must be 0 (off) or from 10ms to 10s"));
    }
    Ok(Some(interval))
}

/// Whether to wake the manager: a memory threshold is met, and it was not woken within [`REWAKE`].
fn should_wake(met: bool, last_wake: Option<Instant>, now: Instant) -> bool {
    met && last_wake.is_none_or(|at| now.saturating_duration_since(at) >= REWAKE)
}

/// The memory signals read now (the rest left at zero: not observed).
fn memory_signals(pods: Option<&PodsMemory>) -> Signals {
    let (memory_capacity, memory_available) = crate::node::conditions::meminfo();
    let (allocatable_memory_capacity, allocatable_memory_available) = pods.map_or((0, 0), PodsMemory::available);
    Signals {
        memory_capacity,
        memory_available,
        allocatable_memory_capacity,
        allocatable_memory_available,
        ..Default::default()
    }
}

/// Where the watch keeps its readings for OOM records: the ring, and the pods' cgroup's `memory.pressure`.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub samples: crate::oom::samples::Samples,
    pub pods_pressure: std::path::PathBuf,
}

impl Sampler {
    fn keep(&self, at: Instant, signals: &Signals) {
        let stall = nodelet_cgroups::psi::read(&self.pods_pressure).ok().map(|p| (p.some.total_us, p.full.total_us));
        let reading =
            crate::oom::samples::Reading { memory_available_bytes: signals.memory_available, pods_stall: stall };
        self.samples.push(at, reading);
    }
}

/// Starts the watch on the memory thresholds among `thresholds` (none: no watch); the manager receives a `()` on
/// `wake` when one is met. Each reading goes to `sampler` too. The thread ends once the receiver is gone.
pub fn start(
    interval: Duration,
    thresholds: &[Threshold],
    pods: Option<PodsMemory>,
    wake: mpsc::UnboundedSender<()>,
    sampler: Option<Sampler>,
) {
    let memory: Vec<Threshold> = thresholds.iter().filter(|t| t.starved == Starved::Memory).cloned().collect();
    if memory.is_empty() {
        return;
    }
    let watch = move || {
        let mut last_wake = None;
        while !wake.is_closed() {
            std::thread::sleep(interval);
            let signals = memory_signals(pods.as_ref());
            let now = Instant::now();
            if let Some(sampler) = &sampler {
                sampler.keep(now, &signals);
            }
            let met = !thresholds::met(&signals, &memory).is_empty();
            if should_wake(met, last_wake, now) {
                last_wake = Some(now);
                let _ = wake.send(());
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name("memory-watch".into()).spawn(watch) {
        tracing::warn!(error = %e, "the eviction manager's memory watch did not start: memory is read at each round only");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_with_off_and_bounds() {
        assert_eq!(parse_interval("100ms").unwrap(), Some(Duration::from_millis(100)));
        assert_eq!(parse_interval("0s").unwrap(), None);
        assert_eq!(parse_interval("0").unwrap(), None);
        assert!(parse_interval("1ms").is_err());
        assert!(parse_interval("1m").unwrap_err().contains("from 10ms to 10s"));
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn wakes_when_met_then_at_most_once_a_rewake() {
        let start = Instant::now();
        assert!(!should_wake(false, None, start));
        assert!(should_wake(true, None, start));
        assert!(!should_wake(true, Some(start), start + Duration::from_millis(100)));
        assert!(should_wake(true, Some(start), start + REWAKE));
        assert!(!should_wake(false, Some(start), start + 2 * REWAKE));
    }

    #[tokio::test]
    async fn a_met_threshold_wakes_the_manager_and_the_thread_ends_with_it() {
        // memory.available below a threshold above the machine's memory: met at every read.
        let none = Default::default();
        let hard = [("memory.available".to_string(), "100Ti".to_string())].into_iter().collect();
        let met = thresholds::configured(&hard, &none, &none, &none).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let dir = tempfile::tempdir().unwrap();
        let pods_pressure = dir.path().join("memory.pressure");
        std::fs::write(
            &pods_pressure,
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=1500\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=700\n",
        )
        .unwrap();
        let sampler = Sampler { samples: Default::default(), pods_pressure };
        start(Duration::from_millis(10), &met, None, tx, Some(sampler.clone()));
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("woken").expect("a wake-up");
        // Each reading was kept for OOM records, with the pods' stall.
        let kept = sampler.samples.before(Instant::now());
        assert!(!kept.is_empty() && kept.iter().all(|s| s.memory_available_bytes > 0), "{kept:?}");
        assert_eq!((kept[0].pods_stall_some_us, kept[0].pods_stall_full_us), (Some(1500), Some(700)));
        // Under the threshold only: nothing within several intervals.
        let hard = [("memory.available".to_string(), "1Ki".to_string())].into_iter().collect();
        let unmet = thresholds::configured(&hard, &none, &none, &none).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        start(Duration::from_millis(10), &unmet, None, tx, None);
        assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv()).await.is_err());
        // No memory threshold: no thread, the sender dropped at once.
        let disk = [("nodefs.available".to_string(), "1%".to_string())].into_iter().collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        start(Duration::from_millis(10), &thresholds::configured(&disk, &none, &none, &none).unwrap(), None, tx, None);
        assert_eq!(rx.recv().await, None);
    }
}
