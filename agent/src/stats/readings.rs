//! The node's files behind [`Readings`]: cgroup files through `nodelet-cgroups`, statvfs, directory walks,
//! `/proc/<pid>/net/dev` of a process in the pod (its network namespace), `/proc/self/cgroup` for the agent's own.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nodelet_cgroups::hierarchy::Hierarchy;
use nodelet_cgroups::stats::{self, CgroupStats, Extras, NodeStats, PressureStats};

use super::collector::{DiskUsage, Filesystem, Readings};
use super::summary::InterfaceStats;

/// Upper bound on the entries one walk visits: a pathological tree (millions of files in an emptyDir) costs one
/// bounded walk per period, and its usage is reported as far as it got.
const MAX_WALK_ENTRIES: u64 = 1_000_000;

pub struct HostReadings {
    /// The node's cgroup root.
    pub hierarchy: Hierarchy,
    /// The host's whole tree, for the agent's own cgroup.
    pub host: Option<Hierarchy>,
    /// What to read besides CPU and memory: no block I/O (the summary has no field for it), swap only where the
    /// node has swap (as it had when the agent started).
    extras: Extras,
}

impl HostReadings {
    pub fn new(hierarchy: Hierarchy) -> HostReadings {
        let swap = stats::node_stats().is_ok_and(|n| n.swap_total_bytes > 0);
        HostReadings { hierarchy, host: Hierarchy::detect("/").ok(), extras: Extras { io: false, swap } }
    }

    /// A process in cgroup `rel` or one of its children (a pod's processes are in its containers' cgroups).
    fn a_process(&self, rel: &str) -> Option<u32> {
        let dir = self.hierarchy.procs_dir(rel);
        let first = |d: &Path| {
            std::fs::read_to_string(d.join("cgroup.procs")).ok()?.lines().find_map(|l| l.trim().parse::<u32>().ok())
        };
        first(&dir).or_else(|| {
            // The directory entry's type, not a stat per entry: a v1 cgroup directory holds dozens of files.
            let children = std::fs::read_dir(&dir).ok()?.flatten();
            children.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).find_map(|e| first(&e.path()))
        })
    }
}

impl Readings for HostReadings {
    fn host(&self) -> Option<NodeStats> {
        stats::node_stats().ok()
    }

    fn host_pressure(&self) -> Option<PressureStats> {
        stats::node_pressure()
    }

    fn cgroup(&self, rel: &str) -> Option<CgroupStats> {
        stats::cgroup_stats_with(&self.hierarchy, rel, self.extras).ok()
    }

    fn pressure(&self, rel: &str) -> Option<PressureStats> {
        stats::cgroup_pressure(&self.hierarchy, rel)
    }

    fn agent(&self) -> Option<(CgroupStats, Option<PressureStats>)> {
        let host = self.host.as_ref()?;
        let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let (usage, unified) = own_cgroups(&text, host.is_v2());
        let stats = stats::cgroup_stats_with(host, usage?.trim_start_matches('/'), self.extras).ok()?;
        Some((stats, unified.and_then(|u| stats::cgroup_pressure(host, u.trim_start_matches('/')))))
    }

    fn filesystem(&self, path: &Path) -> Option<Filesystem> {
        let s = rustix::fs::statvfs(path).ok()?;
        let device = std::fs::metadata(path).ok()?.dev();
        Some(Filesystem {
            device,
            capacity_bytes: s.f_blocks * s.f_frsize,
            available_bytes: s.f_bavail * s.f_frsize,
            inodes: s.f_files,
            inodes_free: s.f_ffree,
        })
    }

    fn disk_usage(&self, path: &Path) -> Option<DiskUsage> {
        disk_usage(path)
    }

    fn interfaces(&self, rel: Option<&str>) -> Vec<InterfaceStats> {
        let (file, host) = match rel {
            None => (PathBuf::from("/proc/self/net/dev"), true),
            Some(rel) => match self.a_process(rel) {
                Some(pid) => (PathBuf::from(format!("/proc/{pid}/net/dev")), false),
                None => return Vec::new(),
            },
        };
        std::fs::read_to_string(file).map(|t| net_dev(&t, host)).unwrap_or_default()
    }

    fn volumes(&self, pod_dir: &Path) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        let Ok(plugins) = std::fs::read_dir(pod_dir.join("volumes")) else { return out };
        for plugin in plugins.flatten() {
            let Ok(volumes) = std::fs::read_dir(plugin.path()) else { continue };
            for v in volumes.flatten() {
                out.push((v.file_name().to_string_lossy().into_owned(), v.path()));
            }
        }
        out.sort();
        out
    }

    fn processes(&self) -> (Option<i64>, Option<i64>) {
        let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|t| t.trim().parse().ok());
        // The fourth field of loadavg is "running/total" scheduling entities (threads), as sysinfo's procs.
        let total = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|t| t.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok());
        (pid_max, total)
    }
}

/// The agent's cgroup paths from `/proc/self/cgroup`: the one its usage is read from (v2: the unified path;
/// hybrid: the memory controller's) and the unified one (PSI).
fn own_cgroups(text: &str, v2: bool) -> (Option<&str>, Option<&str>) {
    let mut unified = None;
    let mut memory = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        match (controllers, path) {
            (Some(""), Some(p)) => unified = Some(p),
            (Some(c), Some(p)) if c.split(',').any(|c| c == "memory") => memory = Some(p),
            _ => {}
        }
    }
    (if v2 { unified } else { memory }, unified)
}

/// Interfaces of a `/proc/net/dev` file. The host's leaves out loopback and pods' veth ends (and docker's), as
/// cAdvisor does for the machine; a pod's leaves out loopback.
fn net_dev(text: &str, host: bool) -> Vec<InterfaceStats> {
    let ignored =
        |name: &str| name == "lo" || (host && ["veth", "docker", "nerdctl"].iter().any(|p| name.starts_with(p)));
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let name = name.trim();
            let n: Vec<u64> = counters.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
            // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs ...
            (!ignored(name) && n.len() >= 11).then(|| InterfaceStats {
                name: name.to_string(),
                rx_bytes: Some(n[0]),
                rx_errors: Some(n[2]),
                tx_bytes: Some(n[8]),
                tx_errors: Some(n[10]),
            })
        })
        .collect()
}

/// What a directory tree uses on its own filesystem: allocated blocks (as `du`) and inodes, each hard-linked
/// file once. Mount points below are not entered. `None` when the path does not exist.
pub fn disk_usage(path: &Path) -> Option<DiskUsage> {
    let root = std::fs::symlink_metadata(path).ok()?;
    let device = root.dev();
    let mut usage = DiskUsage { bytes: root.blocks() * 512, inodes: 1 };
    let mut seen = HashSet::new();
    let mut stack = vec![path.to_path_buf()];
    let mut visited = 0u64;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            visited += 1;
            if visited > MAX_WALK_ENTRIES {
                return Some(usage);
            }
            let Ok(meta) = entry.metadata() else { continue };
            if meta.dev() != device || (meta.nlink() > 1 && !meta.is_dir() && !seen.insert(meta.ino())) {
                continue;
            }
            usage.bytes += meta.blocks() * 512;
            usage.inodes += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Some(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0\n  \
            eth0: 5000 10 2 0 0 0 0 0 3000 8 1 0 0 0 0 0\n\
            veth12: 7 1 0 0 0 0 0 0 9 1 0 0 0 0 0 0\n";
        let pod = net_dev(text, false);
        assert_eq!(pod.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["eth0", "veth12"]);
        assert_eq!(
            (pod[0].rx_bytes, pod[0].rx_errors, pod[0].tx_bytes, pod[0].tx_errors),
            (Some(5000), Some(2), Some(3000), Some(1))
        );
        assert_eq!(net_dev(text, true).len(), 1, "the host's leaves veth ends out");
    }

    #[test]
    fn finds_own_cgroups() {
        let hybrid = "12:memory:/system.slice/nodelet.service\n4:cpu,cpuacct:/system.slice/nodelet.service\n0::/system.slice/nodelet.service\n";
        assert_eq!(
            own_cgroups(hybrid, false),
            (Some("/system.slice/nodelet.service"), Some("/system.slice/nodelet.service"))
        );
        assert_eq!(own_cgroups("0::/user.slice\n", true), (Some("/user.slice"), Some("/user.slice")));
    }

    #[test]
    fn walks_a_tree_once_per_inode() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/big"), vec![1u8; 1 << 20]).unwrap();
        std::fs::hard_link(dir.path().join("sub/big"), dir.path().join("link")).unwrap();
        let u = disk_usage(dir.path()).unwrap();
        assert!(u.bytes >= 1 << 20 && u.bytes < 2 << 20, "the hard link is counted once: {u:?}");
        assert_eq!(u.inodes, 3, "root, sub, big");
        assert_eq!(disk_usage(&dir.path().join("missing")), None);
    }
}
