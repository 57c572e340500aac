//! Eviction thresholds (hard, soft with grace periods, minimum reclaim) against the node's signals, the pressure
//! conditions they raise (held for `evictionPressureTransitionPeriod` after the last time a threshold was met, so
//! that a node hovering at a threshold does not flap), and upstream's words for an eviction. Pure.

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
    /// CPU: only a configured pressure stall threshold starves it (nodelet's own, see `psi`).
    Cpu,
}

impl Starved {
    pub fn name(self) -> &'static str {
        match self {
            Starved::Memory => "memory",
            Starved::Cpu => "cpu",
            Starved::EphemeralStorage => "ephemeral-storage",
            Starved::Inodes => "inodes",
            Starved::Pids => "pids",
        }
    }
}

/// The signals, in upstream's order of reclaim (memory first, then disk, then PIDs). The `imagefs` ones are the
/// image store's filesystem, the `containerfs` ones the writable layers' (both the root dir's unless something
/// is mounted there); their thresholds are set by [`with_container_fs`], as upstream sets them.
const OBSERVED: &[(&str, Starved)] = &[
    ("memory.available", Starved::Memory),
    ("allocatableMemory.available", Starved::Memory),
    ("nodefs.available", Starved::EphemeralStorage),
    ("nodefs.inodesFree", Starved::Inodes),
    ("imagefs.available", Starved::EphemeralStorage),
    ("imagefs.inodesFree", Starved::Inodes),
    ("containerfs.available", Starved::EphemeralStorage),
    ("containerfs.inodesFree", Starved::Inodes),
    ("pid.available", Starved::Pids),
];

/// One configured threshold: hard (no grace period) or soft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threshold {
    pub signal: &'static str,
    pub starved: Starved,
    /// A quantity or a percentage of capacity.
    pub value: String,
    /// `evictionMinimumReclaim`: once met, the signal must recover this much beyond the threshold.
    pub min_reclaim: Option<String>,
    /// `evictionSoftGracePeriod` of a soft threshold; `None` for a hard one.
    pub grace: Option<Duration>,
}

/// The thresholds in force from `evictionHard`, `evictionSoft`, `evictionSoftGracePeriod` and
/// `evictionMinimumReclaim`, with upstream's errors for what it refuses.
pub fn configured(
    hard: &BTreeMap<String, String>,
    soft: &BTreeMap<String, String>,
    soft_grace: &BTreeMap<String, String>,
    min_reclaim: &BTreeMap<String, String>,
) -> Result<Vec<Threshold>, String> {
    let known = |signal: &str| OBSERVED.iter().any(|(s, _)| *s == signal);
    for signal in hard.keys().chain(soft.keys()).chain(soft_grace.keys()).chain(min_reclaim.keys()) {
        if !known(signal) {
            return Err(format!("unsupported eviction signal {signal}"));
        }
    }
    for (signal, value) in hard.iter().chain(soft).chain(min_reclaim) {
        crate::node::allocatable::threshold_value(value, signal, 100).map_err(|e| format!("{signal}: {e:#}"))?;
    }
    let mut out = Vec::new();
    for (signal, starved) in OBSERVED {
        let min_reclaim = min_reclaim.get(*signal).cloned();
        if let Some(value) = hard.get(*signal) {
            out.push(Threshold {
                signal,
                starved: *starved,
                value: value.clone(),
                min_reclaim: min_reclaim.clone(),
                grace: None,
            });
        }
        if let Some(value) = soft.get(*signal) {
            let grace = soft_grace
                .get(*signal)
                .ok_or_else(|| format!("grace period must be specified for the soft eviction threshold {signal}"))?;
            let grace = crate::config::parse_go_duration(grace).map_err(|e| format!("{signal}: {e}"))?;
            out.push(Threshold { signal, starved: *starved, value: value.clone(), min_reclaim, grace: Some(grace) });
        }
    }
    Ok(out)
}

/// Upstream's `addAllocatableThresholds`: with allocatable enforced on the pods' cgroup, every hard
/// `memory.available` threshold also holds for `allocatableMemory.available` (what the pods' cgroup has left below
/// its limit), so that pods are evicted before that cgroup's own OOM killer acts.
pub fn with_allocatable(mut thresholds: Vec<Threshold>) -> Vec<Threshold> {
    let copies: Vec<Threshold> = thresholds
        .iter()
        .filter(|t| t.signal == "memory.available" && t.grace.is_none())
        .map(|t| Threshold { signal: "allocatableMemory.available", ..t.clone() })
        .collect();
    thresholds.extend(copies);
    thresholds
}

/// Upstream's `UpdateContainerFsThresholds`: the `containerfs` thresholds are not configured but copied, from the
/// `nodefs` ones when the writable layers share the root dir's filesystem or have one of their own, from the
/// `imagefs` ones when they share a filesystem of the images' own (`on_imagefs`). Configured ones are dropped;
/// the warnings say which, in upstream's words.
pub fn with_container_fs(thresholds: Vec<Threshold>, on_imagefs: bool) -> (Vec<Threshold>, Vec<String>) {
    let (mut kept, dropped): (Vec<Threshold>, Vec<Threshold>) =
        thresholds.into_iter().partition(|t| !t.signal.starts_with("containerfs."));
    let warnings = dropped
        .iter()
        .map(|t| {
            let kind = if t.grace.is_none() { "hard" } else { "soft" };
            format!("found {} for {kind} eviction. ignoring", t.signal)
        })
        .collect();
    let from = if on_imagefs { "imagefs." } else { "nodefs." };
    let copies: Vec<Threshold> = kept
        .iter()
        .filter_map(|t| {
            let signal = match t.signal.strip_prefix(from)? {
                "available" => "containerfs.available",
                "inodesFree" => "containerfs.inodesFree",
                _ => return None,
            };
            Some(Threshold { signal, ..t.clone() })
        })
        .collect();
    kept.extend(copies);
    (kept, warnings)
}

/// What `signals` says is available for `threshold`, and its capacity (0: not observed).
fn observe(signals: &Signals, threshold: &Threshold) -> (u64, u64) {
    // The disk signals name their filesystem first (`nodefs.available`, `imagefs.inodesFree`...).
    let fs = match threshold.signal.split_once('.').map(|(fs, _)| fs) {
        Some("nodefs") => signals.nodefs,
        Some("imagefs") => signals.imagefs,
        Some("containerfs") => signals.containerfs,
        _ => Default::default(),
    };
    match threshold.starved {
        Starved::Memory if threshold.signal == "allocatableMemory.available" => {
            (signals.allocatable_memory_available, signals.allocatable_memory_capacity)
        }
        Starved::Memory => (signals.memory_available, signals.memory_capacity),
        Starved::EphemeralStorage => (fs.available, fs.capacity),
        Starved::Inodes => (fs.inodes_free, fs.inodes),
        Starved::Pids => (signals.pid_max.saturating_sub(signals.pids_used), signals.pid_max),
        Starved::Cpu => (0, 0),
    }
}

/// A threshold the node is past: what it starves, the threshold as a quantity, what is available, and whether
/// it is a hard one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Met {
    pub signal: &'static str,
    pub starved: Starved,
    pub threshold: u64,
    pub available: u64,
    pub hard: bool,
}

/// `threshold` against `signals`, the bar raised by its minimum reclaim when `reclaiming`.
fn check(threshold: &Threshold, signals: &Signals, reclaiming: bool) -> Option<Met> {
    let (available, capacity) = observe(signals, threshold);
    if capacity == 0 {
        return None;
    }
    let quantity = |value: &str| crate::node::allocatable::threshold_value(value, threshold.signal, capacity).ok();
    let value = quantity(&threshold.value)?;
    let reclaim = if reclaiming { threshold.min_reclaim.as_deref().and_then(quantity).unwrap_or(0) } else { 0 };
    (available < value + reclaim).then_some(Met {
        signal: threshold.signal,
        starved: threshold.starved,
        threshold: value,
        available,
        hard: threshold.grace.is_none(),
    })
}

/// The thresholds `signals` are below (hard or soft, grace periods ignored), in the order configured.
pub fn met(signals: &Signals, thresholds: &[Threshold]) -> Vec<Met> {
    thresholds.iter().filter_map(|t| check(t, signals, false)).collect()
}

/// Upstream's bookkeeping between rounds: when each threshold was first seen met, which ones drove evictions
/// last (they stay met until their minimum reclaim is recovered), and the node conditions.
#[derive(Debug, Clone)]
pub struct Tracker {
    thresholds: Vec<Threshold>,
    first_observed: Vec<Option<Instant>>,
    reclaiming: Vec<bool>,
    conditions: Conditions,
}

impl Tracker {
    pub fn new(thresholds: Vec<Threshold>, transition_period: Duration) -> Tracker {
        let n = thresholds.len();
        Tracker {
            thresholds,
            first_observed: vec![None; n],
            reclaiming: vec![false; n],
            conditions: Conditions::new(transition_period),
        }
    }

    /// One round: the node conditions in force (from every threshold met, grace periods ignored, as upstream),
    /// and the thresholds that drive eviction now (hard ones, and soft ones met for their grace period).
    pub fn observe(&mut self, signals: &Signals, now: Instant) -> (Pressure, Vec<Met>) {
        let mut all = Vec::new();
        for (i, t) in self.thresholds.iter().enumerate() {
            match check(t, signals, self.reclaiming[i]) {
                Some(m) => {
                    self.first_observed[i].get_or_insert(now);
                    all.push((i, m));
                }
                None => self.first_observed[i] = None,
            }
        }
        let conditions =
            self.conditions.observe(now, pressure_of(&all.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>()));
        let first_observed = &self.first_observed;
        let thresholds = &self.thresholds;
        let driving: Vec<(usize, Met)> = all
            .into_iter()
            .filter(|(i, _)| {
                let grace = thresholds[*i].grace.unwrap_or_default();
                first_observed[*i].is_some_and(|at| now.saturating_duration_since(at) >= grace)
            })
            .collect();
        self.reclaiming = (0..self.thresholds.len()).map(|i| driving.iter().any(|(j, _)| *j == i)).collect();
        (conditions, driving.into_iter().map(|(_, m)| m).collect())
    }

    /// Records pressure seen outside the rounds (a stall trigger); the conditions in force.
    pub fn mark(&mut self, now: Instant, met: Pressure) -> Pressure {
        self.conditions.observe(now, met)
    }
}

/// The pressures `met` thresholds mean.
pub fn pressure_of(met: &[Met]) -> Pressure {
    let any = |kinds: &[Starved]| met.iter().any(|m| kinds.contains(&m.starved));
    Pressure {
        memory: any(&[Starved::Memory]),
        disk: any(&[Starved::EphemeralStorage, Starved::Inodes]),
        pid: any(&[Starved::Pids]),
        stall: false,
    }
}

/// The node's pressure conditions: each true from the first time its thresholds are met until the transition
/// period has passed without them being met.
#[derive(Debug, Clone)]
pub struct Conditions {
    period: Duration,
    last_met: [Option<Instant>; 4],
}

impl Conditions {
    pub fn new(period: Duration) -> Conditions {
        Conditions { period, last_met: [None; 4] }
    }

    /// Records what is met `now`; the conditions in force.
    pub fn observe(&mut self, now: Instant, met: Pressure) -> Pressure {
        for (last, is_met) in self.last_met.iter_mut().zip([met.memory, met.disk, met.pid, met.stall]) {
            if is_met {
                *last = Some(now);
            }
        }
        let held = |last: Option<Instant>| last.is_some_and(|at| now.saturating_duration_since(at) < self.period);
        let [memory, disk, pid, stall] = self.last_met.map(held);
        Pressure { memory, disk, pid, stall }
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
    let head = format!(
        "The node was low on resource: {resource}. Threshold quantity: {}, available: {}. ",
        quantity(met.threshold),
        quantity(met.available)
    );
    head + &offenders(met.starved, containers, quantity)
}

/// Upstream's sentence for each container using more of `starved` than it requested (name, usage, request).
pub fn offenders(starved: Starved, containers: &[(String, u64, u64)], quantity: impl Fn(u64) -> String) -> String {
    let resource = starved.name();
    containers
        .iter()
        .filter(|(_, usage, request)| usage > request)
        .map(|(name, usage, request)| {
            format!(
                "Container {name} was using {}, request is {}, has larger consumption of {resource}. ",
                quantity(*usage),
                quantity(*request)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::conditions::Fs;

    const GIB: u64 = 1 << 30;

    fn signals() -> Signals {
        let fs = Fs { capacity: 100 * GIB, available: 50 * GIB, inodes: 1_000_000, inodes_free: 500_000 };
        Signals {
            memory_capacity: 8 * GIB,
            memory_available: 4 * GIB,
            nodefs: fs,
            pid_max: 4_194_304,
            pids_used: 300,
            allocatable_memory_capacity: 0,
            allocatable_memory_available: 0,
            imagefs: fs,
            containerfs: fs,
        }
    }

    #[test]
    fn imagefs_is_the_image_stores_filesystem() {
        let none = BTreeMap::new();
        let t = configured(
            &threshold_map(&[("imagefs.available", "15%"), ("nodefs.available", "10%")]),
            &none,
            &none,
            &none,
        )
        .unwrap();
        // The image store's filesystem below 15% while the root dir's is not: only imagefs is met.
        let low = Signals { imagefs: Fs { available: 10 * GIB, ..signals().imagefs }, ..signals() };
        let met = met(&low, &t);
        assert_eq!(met.len(), 1, "{met:?}");
        assert_eq!(
            (met[0].signal, met[0].starved, met[0].threshold),
            ("imagefs.available", Starved::EphemeralStorage, 15 * GIB)
        );
        let inodes = configured(&threshold_map(&[("imagefs.inodesFree", "5%")]), &none, &none, &none).unwrap();
        let few = Signals { imagefs: Fs { inodes_free: 10_000, ..signals().imagefs }, ..signals() };
        assert_eq!(super::met(&few, &inodes)[0].starved, Starved::Inodes);
    }

    #[test]
    fn containerfs_thresholds_are_copied_as_upstream() {
        let none = BTreeMap::new();
        let grace = threshold_map(&[("nodefs.available", "1m")]);
        let t = configured(
            &threshold_map(&[
                ("nodefs.available", "10%"),
                ("imagefs.available", "15%"),
                ("containerfs.available", "50%"),
            ]),
            &threshold_map(&[("nodefs.available", "20%")]),
            &grace,
            &none,
        )
        .unwrap();
        // On the root dir's filesystem: nodefs's, hard and soft; the configured one dropped with upstream's warning.
        let (shared, warnings) = with_container_fs(t.clone(), false);
        let container: Vec<_> = shared.iter().filter(|t| t.signal == "containerfs.available").collect();
        assert_eq!(container.len(), 2, "{container:?}");
        assert!(container.iter().all(|t| t.value == "10%" || (t.value == "20%" && t.grace.is_some())));
        assert_eq!(warnings, ["found containerfs.available for hard eviction. ignoring"]);
        // On a filesystem of the images' own: imagefs's.
        let (own, _) = with_container_fs(t, true);
        let container: Vec<_> = own.iter().filter(|t| t.signal == "containerfs.available").collect();
        assert_eq!(container.len(), 1);
        assert_eq!(container[0].value, "15%");
        // Observed on the writable layers' filesystem.
        let low = Signals { containerfs: Fs { available: 5 * GIB, ..signals().containerfs }, ..signals() };
        assert!(met(&low, &own).iter().any(|m| m.signal == "containerfs.available"));
    }

    #[test]
    fn allocatable_memory_is_watched_as_upstream_adds_it() {
        let none: BTreeMap<String, String> = BTreeMap::new();
        let soft = threshold_map(&[("memory.available", "1Gi")]);
        let grace = threshold_map(&[("memory.available", "1m")]);
        let hard = crate::node::allocatable::eviction_hard(None);
        let t = with_allocatable(configured(&hard, &soft, &grace, &none).unwrap());
        let copies: Vec<_> = t.iter().filter(|t| t.signal == "allocatableMemory.available").collect();
        assert_eq!(copies.len(), 1, "hard memory.available only: {t:?}");
        assert_eq!((copies[0].value.as_str(), copies[0].grace), ("100Mi", None));
        // Not enforced (no capacity): never met. Enforced: the pods' cgroup 50Mi below its limit is met, as memory.
        assert!(met(&signals(), &t).is_empty());
        let pods_full =
            Signals { allocatable_memory_capacity: 2 * GIB, allocatable_memory_available: 50 << 20, ..signals() };
        let m = met(&pods_full, &t);
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(
            (m[0].signal, m[0].starved, m[0].available),
            ("allocatableMemory.available", Starved::Memory, 50 << 20)
        );
        assert_eq!(pressure_of(&m), Pressure { memory: true, ..Default::default() });
        let configured_too = threshold_map(&[("allocatableMemory.available", "1Gi")]);
        assert_eq!(configured(&configured_too, &none, &none, &none).unwrap()[0].signal, "allocatableMemory.available");
    }

    #[test]
    fn thresholds_are_met_below_them() {
        let none: BTreeMap<String, String> = BTreeMap::new();
        let defaults = configured(&crate::node::allocatable::eviction_hard(None), &none, &none, &none).unwrap();
        assert!(met(&signals(), &defaults).is_empty());
        let low =
            Signals { memory_available: 50 << 20, nodefs: Fs { available: 5 * GIB, ..signals().nodefs }, ..signals() };
        let m = met(&low, &defaults);
        assert_eq!(m.iter().map(|m| m.signal).collect::<Vec<_>>(), ["memory.available", "nodefs.available"]);
        assert_eq!((m[0].threshold, m[0].available), (100 << 20, 50 << 20));
        assert_eq!(m[1].threshold, 10 * GIB);
        assert_eq!(pressure_of(&m), Pressure { memory: true, disk: true, pid: false, stall: false });
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
        let met = Met {
            signal: "memory.available",
            starved: Starved::Memory,
            threshold: 100 << 20,
            available: 80 << 20,
            hard: true,
        };
        let containers = [("hog".to_string(), 300 << 20, 0), ("quiet".to_string(), 1 << 20, 64 << 20)];
        assert_eq!(
            message(&met, &containers),
            "The node was low on resource: memory. Threshold quantity: 100Mi, available: 80Mi. \
             Container hog was using 300Mi, request is 0, has larger consumption of memory. "
        );
    }

    fn threshold_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn configuration_is_checked_as_upstream() {
        let none: BTreeMap<String, String> = BTreeMap::new();
        let soft = threshold_map(&[("memory.available", "1Gi")]);
        assert_eq!(
            configured(&none, &soft, &none, &none).unwrap_err(),
            "grace period must be specified for the soft eviction threshold memory.available"
        );
        assert_eq!(
            configured(&threshold_map(&[("memory.free", "1Gi")]), &none, &none, &none).unwrap_err(),
            "unsupported eviction signal memory.free"
        );
        assert!(configured(&threshold_map(&[("nodefs.available", "150%")]), &none, &none, &none).is_err());
        let grace = threshold_map(&[("memory.available", "1m30s")]);
        let t = configured(&crate::node::allocatable::eviction_hard(None), &soft, &grace, &none).unwrap();
        let soft_one = t.iter().find(|t| t.grace.is_some()).unwrap();
        assert_eq!((soft_one.signal, soft_one.grace), ("memory.available", Some(Duration::from_secs(90))));
        assert!(t.iter().any(|t| t.signal == "imagefs.available"), "upstream's default imagefs threshold");
    }

    #[test]
    fn soft_thresholds_wait_for_their_grace_period_and_min_reclaim_holds() {
        let hard = threshold_map(&[("memory.available", "100Mi")]);
        let soft = threshold_map(&[("memory.available", "1Gi")]);
        let grace = threshold_map(&[("memory.available", "30s")]);
        let reclaim = threshold_map(&[("memory.available", "500Mi")]);
        let mut tracker = Tracker::new(configured(&hard, &soft, &grace, &reclaim).unwrap(), Duration::from_secs(300));
        let at = |available: u64| Signals { memory_available: available, ..signals() };
        let start = Instant::now();
        let (conditions, driving) = tracker.observe(&at(GIB - 1), start);
        assert!(conditions.memory, "the condition does not wait for the grace period");
        assert!(driving.is_empty(), "the soft threshold waits");
        let (_, driving) = tracker.observe(&at(GIB - 1), start + Duration::from_secs(31));
        assert_eq!(driving.len(), 1);
        assert!(!driving[0].hard);
        // Recovered past the threshold but not by the minimum reclaim: still driving.
        let (_, driving) = tracker.observe(&at(GIB + 100 * (1 << 20)), start + Duration::from_secs(32));
        assert_eq!(driving.len(), 1, "min reclaim not yet recovered");
        let (_, driving) = tracker.observe(&at(2 * GIB), start + Duration::from_secs(33));
        assert!(driving.is_empty());
        // A hard threshold drives at once.
        let (_, driving) = tracker.observe(&at(50 << 20), start + Duration::from_secs(34));
        assert!(driving.iter().any(|m| m.hard && m.signal == "memory.available"), "{driving:?}");
    }
}
