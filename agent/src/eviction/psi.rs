//! Eviction on pressure stall (PSI), nodelet's own beyond upstream: the kernel reports how long the pods' tasks
//! stalled for memory (or CPU) within a window, and a kernel PSI trigger on the pods' cgroup (`kubepods`) wakes
//! the eviction manager the moment a configured stall is exceeded, instead of at the next 10 s housekeeping
//! round. Memory stalls precede the OOM killer: reclaim and refaults stall tasks before memory runs out.
//!
//! Configured with `--eviction-pressure-stall SIGNAL=STALL/WINDOW` (repeatable), e.g.
//! `memory.pressure.full=100ms/1s`: evict when, within any 1 s window, all of the pods' non-idle tasks were stalled
//! on memory for 100 ms. Signals: `memory.pressure.some`, `memory.pressure.full`, `cpu.pressure.some`. Windows are
//! the kernel's (500 ms to 10 s). Off unless configured.

use std::path::Path;
use std::time::Duration;

use nodelet_cgroups::psi::{PressureTrigger, Stall};
use tokio::sync::mpsc;

use super::thresholds::Starved;

/// One configured stall threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StallThreshold {
    /// As configured: `memory.pressure.full`.
    pub signal: String,
    /// What it starves (memory or CPU): what ranks the pods.
    pub starved: Starved,
    /// The pressure file in the pods' cgroup: `memory.pressure`.
    pub file: &'static str,
    pub full: bool,
    pub stall: Duration,
    pub window: Duration,
}

fn go_duration(text: &str) -> Result<Duration, String> {
    crate::config::parse_go_duration(text)
}

/// `SIGNAL=STALL/WINDOW`, checked against what the kernel accepts.
pub fn parse(spec: &str) -> Result<StallThreshold, String> {
    let usage = || format!("{spec:?}: expected SIGNAL=STALL/WINDOW, e.g. memory.pressure.full=100ms/1s");
    let (signal, rest) = spec.split_once('=').ok_or_else(usage)?;
    let (stall, window) = rest.split_once('/').ok_or_else(usage)?;
    let (starved, file, full) = match signal {
        "memory.pressure.some" => (Starved::Memory, "memory.pressure", false),
        "memory.pressure.full" => (Starved::Memory, "memory.pressure", true),
        "cpu.pressure.some" => (Starved::Cpu, "cpu.pressure", false),
        other => return Err(format!("unsupported pressure stall signal {other}")),
    };
    let (stall, window) = (go_duration(stall)?, go_duration(window)?);
    if !(Duration::from_millis(500)..=Duration::from_secs(10)).contains(&window) {
        return Err(format!("{spec:?}: the window must be between 500ms and 10s (the kernel's)"));
    }
    if stall.is_zero() || stall > window {
        return Err(format!("{spec:?}: the stall must be positive and at most the window"));
    }
    Ok(StallThreshold { signal: signal.to_string(), starved, file, full, stall, window })
}

/// A stall threshold exceeded (the index into the configured list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled(pub usize);

/// Arms a kernel trigger per threshold on the pods' cgroup `dir` and reports each firing on `tx`. A trigger
/// that cannot be armed is an error: the node would be weaker than configured.
pub fn arm(thresholds: &[StallThreshold], dir: &Path, tx: mpsc::UnboundedSender<Stalled>) -> Result<(), String> {
    for (i, t) in thresholds.iter().enumerate() {
        let kind = if t.full { Stall::Full } else { Stall::Some };
        let path = dir.join(t.file);
        let mut trigger = PressureTrigger::new(&path, kind, t.stall, t.window)
            .map_err(|e| format!("arming {} on {}: {e}", t.signal, path.display()))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                if trigger.fired().await.is_err() || tx.send(Stalled(i)).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// The eviction message: nodelet's words in upstream's form.
pub fn message(t: &StallThreshold, containers: &[(String, u64, u64)], quantity: impl Fn(u64) -> String) -> String {
    let head = format!(
        "The node was low on resource: {}. Pressure stall {} exceeded {:?} in {:?}. ",
        t.starved.name(),
        t.signal,
        t.stall,
        t.window
    );
    head + &super::thresholds::offenders(t.starved, containers, quantity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_within_the_kernels_limits() {
        let t = parse("memory.pressure.full=100ms/1s").unwrap();
        assert_eq!((t.starved, t.file, t.full), (Starved::Memory, "memory.pressure", true));
        assert_eq!((t.stall, t.window), (Duration::from_millis(100), Duration::from_secs(1)));
        assert!(!parse("cpu.pressure.some=50ms/500ms").unwrap().full);
        assert!(parse("io.pressure.full=1s/2s").unwrap_err().contains("unsupported pressure stall signal"));
        assert!(parse("memory.pressure.some=1s/20s").unwrap_err().contains("between 500ms and 10s"));
        assert!(parse("memory.pressure.some=2s/1s").unwrap_err().contains("at most the window"));
        assert!(parse("memory.pressure.some").unwrap_err().contains("expected SIGNAL=STALL/WINDOW"));
    }

    #[test]
    fn the_message_names_the_stall_and_the_offenders() {
        let t = parse("memory.pressure.full=100ms/1s").unwrap();
        let containers = [("hog".to_string(), 300 << 20, 0), ("quiet".to_string(), 1 << 20, 64 << 20)];
        assert_eq!(
            message(&t, &containers, super::super::thresholds::binary_quantity),
            "The node was low on resource: memory. Pressure stall memory.pressure.full exceeded 100ms in 1s. \
             Container hog was using 300Mi, request is 0, has larger consumption of memory. "
        );
    }
}
