//! The node's pressure conditions from real signals, against the hard eviction thresholds (upstream's eviction
//! manager sets them the same way): `MemoryPressure` when memory.available (`MemAvailable`) is below
//! `memory.available`, `DiskPressure` when the root dir's filesystem has less than `nodefs.available` free or fewer
//! than `nodefs.inodesFree` inodes, `PIDPressure` when fewer than `pid.available` PIDs are left. Reading the
//! signals is an effect ([`Signals::read`]); deciding is pure ([`pressure`]).

use std::collections::BTreeMap;
use std::path::Path;

/// What the node has left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signals {
    pub memory_capacity: u64,
    pub memory_available: u64,
    pub fs_capacity: u64,
    pub fs_available: u64,
    pub inodes_capacity: u64,
    pub inodes_free: u64,
    pub pid_max: u64,
    pub pids_used: u64,
}

/// Which pressures the node is under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pressure {
    pub memory: bool,
    pub disk: bool,
    pub pid: bool,
}

impl Signals {
    /// Reads `/proc/meminfo`, statvfs of `root_dir`, `/proc/sys/kernel/pid_max` and the number of processes.
    pub fn read(root_dir: &Path) -> Signals {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib = |key: &str| -> u64 {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        let fs = rustix::fs::statvfs(root_dir).ok();
        let pid_max =
            std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        let pids_used = std::fs::read_dir("/proc")
            .map(|d| d.flatten().filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok())).count())
            .unwrap_or(0) as u64;
        Signals {
            memory_capacity: kib("MemTotal:"),
            memory_available: kib("MemAvailable:"),
            fs_capacity: fs.as_ref().map_or(0, |f| f.f_blocks * f.f_frsize),
            fs_available: fs.as_ref().map_or(0, |f| f.f_bavail * f.f_frsize),
            inodes_capacity: fs.as_ref().map_or(0, |f| f.f_files),
            inodes_free: fs.as_ref().map_or(0, |f| f.f_ffree),
            pid_max,
            pids_used,
        }
    }
}

/// A threshold of `signal`; `None` when not configured (or invalid: validated at startup with allocatable).
fn threshold(thresholds: &BTreeMap<String, String>, signal: &str, capacity: u64) -> Option<u64> {
    thresholds.contains_key(signal).then(|| super::allocatable::threshold(thresholds, signal, capacity).ok()).flatten()
}

/// The pressures `signals` show against `thresholds` (evictionHard).
pub fn pressure(signals: &Signals, thresholds: &BTreeMap<String, String>) -> Pressure {
    let below = |signal: &str, available: u64, capacity: u64| {
        capacity > 0 && threshold(thresholds, signal, capacity).is_some_and(|t| available < t)
    };
    Pressure {
        memory: below("memory.available", signals.memory_available, signals.memory_capacity),
        disk: below("nodefs.available", signals.fs_available, signals.fs_capacity)
            || below("nodefs.inodesFree", signals.inodes_free, signals.inodes_capacity),
        pid: below("pid.available", signals.pid_max.saturating_sub(signals.pids_used), signals.pid_max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn calm() -> Signals {
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
    fn pressure_is_a_signal_below_its_threshold() {
        let defaults = crate::node::allocatable::eviction_hard(None);
        assert_eq!(pressure(&calm(), &defaults), Pressure::default());
        let low_memory = Signals { memory_available: 99 << 20, ..calm() };
        assert_eq!(pressure(&low_memory, &defaults), Pressure { memory: true, ..Default::default() });
        let full_disk = Signals { fs_available: 9 * GIB, ..calm() };
        assert_eq!(pressure(&full_disk, &defaults), Pressure { disk: true, ..Default::default() });
        let no_inodes = Signals { inodes_free: 40_000, ..calm() };
        assert!(pressure(&no_inodes, &defaults).disk);
        // No default PID threshold on Linux; a configured one counts.
        let busy = Signals { pid_max: 1000, pids_used: 990, ..calm() };
        assert!(!pressure(&busy, &defaults).pid);
        let pid_threshold: BTreeMap<String, String> = [("pid.available".to_string(), "5%".to_string())].into();
        assert!(pressure(&busy, &pid_threshold).pid);
    }

    #[test]
    fn this_machine_can_be_read() {
        let s = Signals::read(Path::new("/"));
        assert!(s.memory_capacity > 0 && s.memory_available > 0 && s.memory_available <= s.memory_capacity);
        assert!(s.fs_capacity > 0 && s.pid_max > 0 && s.pids_used > 0, "{s:?}");
    }
}
