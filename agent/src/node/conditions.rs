//! The node's signals for eviction and its pressure conditions: memory.available (`MemAvailable`),
//! allocatableMemory.available (the pods' cgroup limit less its working set, when allocatable is enforced), the
//! root dir's filesystem (bytes and inodes free) and the PIDs left. Reading them is an effect ([`Signals::read`]); the
//! eviction manager decides (`crate::eviction::thresholds`).

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
    /// The pods' cgroup limit (allocatable enforced on it), 0 when not enforced.
    pub allocatable_memory_capacity: u64,
    /// That limit less the pods' working set.
    pub allocatable_memory_available: u64,
}

/// The pods' cgroup (`kubepods`) when allocatable is enforced on it: where its working set is read, and its limit.
#[derive(Debug, Clone)]
pub struct PodsMemory {
    pub hierarchy: nodelet_cgroups::hierarchy::Hierarchy,
    pub limit: u64,
}

impl PodsMemory {
    /// The limit and what is left below it (the pods' working set read now).
    pub fn available(&self) -> (u64, u64) {
        let used = nodelet_cgroups::stats::memory_working_set(&self.hierarchy, "kubepods").unwrap_or(0);
        (self.limit, self.limit.saturating_sub(used))
    }
}

/// `MemTotal` and `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn meminfo() -> (u64, u64) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kib("MemTotal:"), kib("MemAvailable:"))
}

/// Which pressures the node is under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pressure {
    pub memory: bool,
    pub disk: bool,
    pub pid: bool,
}

impl Signals {
    /// Reads `/proc/meminfo`, the pods' cgroup when given, statvfs of `root_dir`, `/proc/sys/kernel/pid_max` and
    /// the number of processes.
    pub fn read(root_dir: &Path, pods: Option<&PodsMemory>) -> Signals {
        let (memory_capacity, memory_available) = meminfo();
        let (allocatable_memory_capacity, allocatable_memory_available) = pods.map_or((0, 0), PodsMemory::available);
        let fs = rustix::fs::statvfs(root_dir).ok();
        let pid_max =
            std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        let pids_used = std::fs::read_dir("/proc")
            .map(|d| d.flatten().filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok())).count())
            .unwrap_or(0) as u64;
        Signals {
            memory_capacity,
            memory_available,
            fs_capacity: fs.as_ref().map_or(0, |f| f.f_blocks * f.f_frsize),
            fs_available: fs.as_ref().map_or(0, |f| f.f_bavail * f.f_frsize),
            inodes_capacity: fs.as_ref().map_or(0, |f| f.f_files),
            inodes_free: fs.as_ref().map_or(0, |f| f.f_ffree),
            pid_max,
            pids_used,
            allocatable_memory_capacity,
            allocatable_memory_available,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_can_be_read() {
        let s = Signals::read(Path::new("/"), None);
        assert!(s.memory_capacity > 0 && s.memory_available > 0 && s.memory_available <= s.memory_capacity);
        assert!(s.fs_capacity > 0 && s.pid_max > 0 && s.pids_used > 0, "{s:?}");
    }
}
