//! The node's signals for eviction and its pressure conditions: memory.available (`MemAvailable`),
//! allocatableMemory.available (the pods' cgroup limit less its working set, when allocatable is enforced), the
//! root dir's filesystem (nodefs), the image store's (imagefs) and the writable layers' (containerfs), bytes and
//! inodes free, and the PIDs left. Reading them is an effect ([`Signals::read`]); the
//! eviction manager decides (`crate::eviction::thresholds`).

use std::path::Path;

/// What the node has left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signals {
    pub memory_capacity: u64,
    pub memory_available: u64,
    /// The root dir's filesystem.
    pub nodefs: Fs,
    pub pid_max: u64,
    pub pids_used: u64,
    /// The pods' cgroup limit (allocatable enforced on it), 0 when not enforced.
    pub allocatable_memory_capacity: u64,
    /// That limit less the pods' working set.
    pub allocatable_memory_available: u64,
    /// The image store's filesystem (`<root-dir>/images`).
    pub imagefs: Fs,
    /// The containers' writable layers' filesystem (`<root-dir>/rootfs`).
    pub containerfs: Fs,
}

/// A filesystem's bytes and inodes (all 0: not observed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fs {
    pub capacity: u64,
    pub available: u64,
    pub inodes: u64,
    pub inodes_free: u64,
}

impl Fs {
    /// statvfs of `path`, `None` if it cannot be read (e.g. not made yet).
    pub fn of(path: &Path) -> Option<Fs> {
        let f = rustix::fs::statvfs(path).ok()?;
        Some(Fs {
            capacity: f.f_blocks * f.f_frsize,
            available: f.f_bavail * f.f_frsize,
            inodes: f.f_files,
            inodes_free: f.f_ffree,
        })
    }
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

/// `MemTotal` and `MemAvailable` from `/proc/meminfo`, in bytes (0 when unreadable).
pub fn meminfo() -> (u64, u64) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let bytes = |key: &str| meminfo_bytes(&meminfo, key).unwrap_or(0);
    (bytes("MemTotal"), bytes("MemAvailable"))
}

/// Field `key` (`MemTotal`...) of a `/proc/meminfo` text, in bytes.
pub fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    let kib = meminfo.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?.checked_mul(1024)
}

/// The node's task limit and the tasks it runs, as upstream's `pid.available` counts them (`pidlimit`): the
/// lower of `kernel.pid_max` and `kernel.threads-max`, and the total of `/proc/loadavg`'s fourth field (every
/// thread of every PID namespace: the limits are the kernel's, not a namespace's).
pub fn tasks() -> (Option<u64>, Option<u64>) {
    let read = |file: &str| std::fs::read_to_string(file).ok().and_then(|t| t.trim().parse::<u64>().ok());
    let limit = [read("/proc/sys/kernel/pid_max"), read("/proc/sys/kernel/threads-max")].into_iter().flatten().min();
    let running = std::fs::read_to_string("/proc/loadavg").ok().and_then(|t| loadavg_tasks(&t));
    (limit, running)
}

/// The total of `running/total` in `/proc/loadavg` (`1.36 3.49 4.53 2/3518 3715089`).
fn loadavg_tasks(loadavg: &str) -> Option<u64> {
    loadavg.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok()
}

/// Which pressures the node is under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pressure {
    pub memory: bool,
    pub disk: bool,
    pub pid: bool,
    /// A configured pressure stall threshold was exceeded (nodelet's `PSIPressure` condition).
    pub stall: bool,
}

impl Signals {
    /// Reads `/proc/meminfo`, the pods' cgroup when given, statvfs of `root_dir`, and the [`tasks`].
    pub fn read(root_dir: &Path, pods: Option<&PodsMemory>) -> Signals {
        let (memory_capacity, memory_available) = meminfo();
        let (allocatable_memory_capacity, allocatable_memory_available) = pods.map_or((0, 0), PodsMemory::available);
        let nodefs = Fs::of(root_dir).unwrap_or_default();
        // Not made yet: on the root dir's filesystem, where they will be made.
        let imagefs = Fs::of(&crate::images::store_dir(root_dir)).unwrap_or(nodefs);
        let containerfs = Fs::of(&crate::images::rootfs_dir(root_dir)).unwrap_or(nodefs);
        let (pid_max, pids_used) = tasks();
        let (pid_max, pids_used) = (pid_max.unwrap_or(0), pids_used.unwrap_or(0));
        Signals {
            memory_capacity,
            memory_available,
            nodefs,
            pid_max,
            pids_used,
            allocatable_memory_capacity,
            allocatable_memory_available,
            imagefs,
            containerfs,
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
        assert!(s.nodefs.capacity > 0 && s.pid_max > 0 && s.pids_used > 0, "{s:?}");
    }

    #[test]
    fn imagefs_and_containerfs_are_their_directories_filesystems() {
        let root = tempfile::tempdir().unwrap();
        // Not made yet: the root dir's filesystem.
        let s = Signals::read(root.path(), None);
        assert_eq!((s.imagefs, s.containerfs), (s.nodefs, s.nodefs));
        // The image store on a filesystem of its own (/proc here: no blocks, unlike the root dir's).
        std::os::unix::fs::symlink("/proc", crate::images::store_dir(root.path())).unwrap();
        let s = Signals::read(root.path(), None);
        assert_eq!(s.imagefs.capacity, 0);
        assert_eq!(s.containerfs.capacity, s.nodefs.capacity);
    }

    #[test]
    fn meminfo_fields_are_bytes() {
        let text = "MemTotal:       16384 kB\nMemFree:  100 kB\nMemAvailable:    8192 kB\n";
        assert_eq!(meminfo_bytes(text, "MemTotal"), Some(16 << 20));
        assert_eq!(meminfo_bytes(text, "MemAvailable"), Some(8 << 20));
        assert_eq!(meminfo_bytes(text, "Mem"), None, "a whole key only");
        assert_eq!(meminfo_bytes("MemTotal: lots\n", "MemTotal"), None);
    }

    #[test]
    fn loadavg_total_is_the_task_count() {
        assert_eq!(loadavg_tasks("1.36 3.49 4.53 2/3518 3715089\n"), Some(3518));
        assert_eq!(loadavg_tasks("1.36 3.49 4.53 3518 3715089"), None);
        assert_eq!(loadavg_tasks(""), None);
    }

    #[test]
    fn the_task_limit_is_the_lower_kernel_limit() {
        let read = |f: &str| std::fs::read_to_string(f).unwrap().trim().parse::<u64>().unwrap();
        let lower = read("/proc/sys/kernel/pid_max").min(read("/proc/sys/kernel/threads-max"));
        assert_eq!(tasks().0, Some(lower));
    }
}
