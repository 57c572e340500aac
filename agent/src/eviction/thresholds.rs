//! Hard eviction thresholds against the node's signals, the pressure conditions they raise (held for
//! `evictionPressureTransitionPeriod` after the last time a threshold was met, so that a node hovering at a
//! threshold does not flap), and upstream's words for an eviction. Pure.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::node::conditions::{Pressure, Signals};

/// The resource a signal starves, in upstream's words (`The node was low on resource: memory.`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Starved {
    Memory,
    EphemeralStorage,
    Inodes,
    Pids,
}

impl Starved {
    pub fn name(self) -> &'static str {
        match self {
            Starved::Memory => "memory",
            Starved::EphemeralStorage => "ephemeral-storage",
            Starved::Inodes => "inodes",
            Starved::Pids => "pids",
        }
    }
}

/// A threshold the node is past: what it starves, the threshold as a quantity, and what is available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Met {
    pub signal: &'static str,
    pub starved: Starved,
    pub threshold: u64,
    pub available: u64,
}

/// The thresholds in `thresholds` (evictionHard) that `signals` are below, in upstream's order of reclaim
/// (memory first, then disk, then PIDs).
pub fn met(signals: &Signals, thresholds: &BTreeMap<String, String>) -> Vec<Met> {
    let observed = [
        ("memory.available", Starved::Memory, signals.memory_available, signals.memory_capacity),
        ("nodefs.available", Starved::EphemeralStorage, signals.fs_available, signals.fs_capacity),
        ("nodefs.inodesFree", Starved::Inodes, signals.inodes_free, signals.inodes_capacity),
        ("pid.available", Starved::Pids, signals.pid_max.saturating_sub(signals.pids_used), signals.pid_max),
    ];
    observed
        .into_iter()
        .filter(|(signal, _, _, capacity)| *capacity > 0 && thresholds.contains_key(*signal))
        .filter_map(|(signal, starved, available, capacity)| {
            let threshold = crate::node::allocatable::threshold(thresholds, signal, capacity).ok()?;
            (available < threshold).then_some(Met { signal, starved, threshold, available })
        })
        .collect()
}

/// The pressures `met` thresholds mean.
pub fn pressure_of(met: &[Met]) -> Pressure {
    let any = |kinds: &[Starved]| met.iter().any(|m| kinds.contains(&m.starved));
    Pressure {
        memory: any(&[Starved::Memory]),
        disk: any(&[Starved::EphemeralStorage, Starved::Inodes]),
        pid: any(&[Starved::Pids]),
    }
}

/// The node's pressure conditions: each true from the first time its thresholds are met until the transition
/// period has passed without them being met.
#[derive(Debug, Clone)]
pub struct Conditions {
    period: Duration,
    last_met: [Option<Instant>; 3],
}

impl Conditions {
    pub fn new(period: Duration) -> Conditions {
        Conditions { period, last_met: [None; 3] }
    }

    /// Records what is met `now`; the conditions in force.
    pub fn observe(&mut self, now: Instant, met: Pressure) -> Pressure {
        for (last, is_met) in self.last_met.iter_mut().zip([met.memory, met.disk, met.pid]) {
            if is_met {
                *last = Some(now);
            }
        }
        let held = |last: Option<Instant>| last.is_some_and(|at| now.saturating_duration_since(at) < self.period);
        Pressure { memory: held(self.last_met[0]), disk: held(self.last_met[1]), pid: held(self.last_met[2]) }
    }
}

/// A byte count as Kubernetes prints a binary quantity: the largest power-of-1024 suffix that divides it, else
/// the plain number (`100Mi`, `1536Ki`, `1500`).
pub fn binary_quantity(n: u64) -> String {
    const SUFFIXES: [&str; 6] = ["Ei", "Pi", "Ti", "Gi", "Mi", "Ki"];
    if n == 0 {
        return "0".into();
    }
    for (i, suffix) in SUFFIXES.iter().enumerate() {
        let unit = 1u64 << (10 * (6 - i));
        if n.is_multiple_of(unit) {
            return format!("{}{suffix}", n / unit);
        }
    }
    n.to_string()
}

/// A count as Kubernetes prints a decimal quantity (pids, inodes).
fn count_quantity(n: u64) -> String {
    n.to_string()
}

/// Upstream's eviction message: the starved resource, the threshold and what is available, then each container
/// using more than it requested (`containers`: name, usage, request).
pub fn message(met: &Met, containers: &[(String, u64, u64)]) -> String {
    let quantity = |n| {
        if matches!(met.starved, Starved::Memory | Starved::EphemeralStorage) {
            binary_quantity(n)
        } else {
            count_quantity(n)
        }
    };
    let resource = met.starved.name();
    let mut out = format!(
        "The node was low on resource: {resource}. Threshold quantity: {}, available: {}. ",
        quantity(met.threshold),
        quantity(met.available)
    );
    for (name, usage, request) in containers.iter().filter(|(_, usage, request)| usage > request) {
        out.push_str(&format!(
            "Container {name} was using {}, request is {}, has larger consumption of {resource}. ",
            quantity(*usage),
            quantity(*request)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn signals() -> Signals {
        Signals {
            memory_capacity: 8 * GIB,
            memory_available: 4 * GIB,
            fs_capacity: 100 * GIB,
            fs_available: 50 * GIB,
            inodes_capacity: 1_000_000,
            inodes_free: 500_000,
            pid_max: 4_194_304,
            pids_used: 300,
        }
    }

    #[test]
    fn thresholds_are_met_below_them() {
        let defaults = crate::node::allocatable::eviction_hard(None);
        assert!(met(&signals(), &defaults).is_empty());
        let low = Signals { memory_available: 50 << 20, fs_available: 5 * GIB, ..signals() };
        let m = met(&low, &defaults);
        assert_eq!(m.iter().map(|m| m.signal).collect::<Vec<_>>(), ["memory.available", "nodefs.available"]);
        assert_eq!((m[0].threshold, m[0].available), (100 << 20, 50 << 20));
        assert_eq!(m[1].threshold, 10 * GIB);
        assert_eq!(pressure_of(&m), Pressure { memory: true, disk: true, pid: false });
    }

    #[test]
    fn a_condition_holds_for_the_transition_period() {
        let start = Instant::now();
        let mut c = Conditions::new(Duration::from_secs(300));
        let memory = Pressure { memory: true, ..Default::default() };
        assert_eq!(c.observe(start, Pressure::default()), Pressure::default());
        assert_eq!(c.observe(start + Duration::from_secs(1), memory), memory);
        assert_eq!(c.observe(start + Duration::from_secs(200), Pressure::default()), memory, "held");
        assert_eq!(c.observe(start + Duration::from_secs(302), Pressure::default()), Pressure::default(), "cleared");
    }

    #[test]
    fn messages_are_upstreams() {
        assert_eq!(binary_quantity(100 << 20), "100Mi");
        assert_eq!(binary_quantity(1536 << 10), "1536Ki");
        assert_eq!(binary_quantity(1500), "1500");
        assert_eq!(binary_quantity(0), "0");
        let met =
            Met { signal: "memory.available", starved: Starved::Memory, threshold: 100 << 20, available: 80 << 20 };
        let containers = [("hog".to_string(), 300 << 20, 0), ("quiet".to_string(), 1 << 20, 64 << 20)];
        assert_eq!(
            message(&met, &containers),
            "The node was low on resource: memory. Threshold quantity: 100Mi, available: 80Mi. \
             Container hog was using 300Mi, request is 0, has larger consumption of memory. "
        );
    }
}
