//! The node's files behind [`Readings`]: cgroup files through `nodelet-cgroups`, statvfs, directory walks,
//! `/proc/<pid>/net/dev` of a process in the pod (its network namespace), `/proc/self/cgroup` for the agent's own.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nodelet_cgroups::hierarchy::{Hierarchy, V1};
use nodelet_cgroups::stats::{self, CgroupStats, Extras, NodeStats, PressureStats};

use super::collector::{DiskUsage, Filesystem, Readings};
use super::summary::InterfaceStats;

/// Upper bound on the entries one walk visits: a pathological tree (millions of files in an emptyDir) costs one
/// bounded walk per period, and its usage is reported as far as it got.
const MAX_WALK_ENTRIES: u64 = 1_000_000;

pub struct HostReadings {
    /// The node's cgroup root.
    pub hierarchy: Hierarchy,
    /// The agent's own cgroups (the `kubelet` and `runtime` system containers), as found at start.
    own: Option<Hierarchy>,
    /// What to read besides CPU and memory: no block I/O (the summary has no field for it), swap only where the
    /// node has swap (as it had when the agent started).
    extras: Extras,
}

impl HostReadings {
    pub fn new(hierarchy: Hierarchy) -> HostReadings {
        let swap = stats::node_stats().is_ok_and(|n| n.swap_total_bytes > 0);
        let own = match (std::fs::read_to_string("/proc/self/cgroup"), std::fs::read_to_string("/proc/self/mountinfo"))
        {
            (Ok(cgroups), Ok(mounts)) => own_hierarchy(&cgroups, &mounts),
            _ => None,
        };
        HostReadings { hierarchy, own, extras: Extras { io: false, swap } }
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
        let own = self.own.as_ref()?;
        let stats = stats::cgroup_stats_with(own, "", self.extras).ok()?;
        Some((stats, stats::cgroup_pressure(own, "")))
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
        let (limit, running) = crate::node::conditions::tasks();
        let signed = |n: Option<u64>| n.and_then(|n| i64::try_from(n).ok());
        (signed(limit), signed(running))
    }
}

/// The agent's own cgroup directories, from `/proc/self/cgroup` (its path in each hierarchy) and
/// `/proc/self/mountinfo` (where each hierarchy is mounted, and which of its cgroups the mount shows as its root:
/// a mount of a child cgroup, as in a container or the test bed's sandbox, shows the path below it). A hierarchy
/// whose visible mount does not hold the agent's cgroup is left out; without the cgroup2 one there is nothing.
fn own_hierarchy(cgroups: &str, mountinfo: &str) -> Option<Hierarchy> {
    // (fstype, super options, root, mount point) of each cgroup mount.
    let mounts: Vec<(&str, &str, &str, &str)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let (fstype, _source, options) = (right.next()?, right.next()?, right.next().unwrap_or(""));
            fstype.starts_with("cgroup").then_some((fstype, options, *left.get(3)?, *left.get(4)?))
        })
        .collect();
    // `path` as a directory of the mount whose root holds it.
    let locate = |path: &str, mount: Option<&(&str, &str, &str, &str)>| -> Option<std::path::PathBuf> {
        let (_, _, root, point) = mount?;
        let below = path.strip_prefix(root.trim_end_matches('/'))?;
        Some(std::path::Path::new(point).join(below.trim_start_matches('/')))
    };
    let path_of = |controller: &str| {
        cgroups.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
            names.split(',').any(|n| n == controller).then_some(path)
        })
    };
    // The last mount at a mount point is the one visible there (it shadows those before it).
    let unified_path = path_of("")?;
    let unified = locate(unified_path, mounts.iter().rfind(|m| m.0 == "cgroup2"))?;
    let mut v1 = Vec::new();
    for controller in V1::ALL {
        let mount = mounts.iter().rfind(|m| m.0 == "cgroup" && m.1.split(',').any(|o| o == controller.name()));
        if let Some(dir) = path_of(controller.name()).and_then(|p| locate(p, mount)) {
            v1.push((controller, dir));
        }
    }
    Some(Hierarchy::with_roots(unified, v1))
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
    fn finds_own_cgroups_through_mount_roots() {
        let cgroups = "12:memory:/user.slice/sandbox\n4:cpu,cpuacct:/sandbox/agent\n0::/sandbox/agent\n";
        let mountinfo = "\
            30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
            31 25 0:27 /user.slice/sandbox /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
            32 25 0:28 /sandbox /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
            33 25 8:1 / / rw - ext4 /dev/vda1 rw\n";
        let h = own_hierarchy(cgroups, mountinfo).unwrap();
        assert_eq!(h.unified(""), std::path::Path::new("/sys/fs/cgroup/unified/sandbox/agent"));
        assert_eq!(h.v1(V1::Memory, "").unwrap(), std::path::Path::new("/sys/fs/cgroup/memory/"));
        assert_eq!(h.v1(V1::Cpuacct, "").unwrap(), std::path::Path::new("/sys/fs/cgroup/cpu,cpuacct/agent"));
        assert!(h.v1(V1::Pids, "").is_none() && !h.is_v2());
        let v2 =
            own_hierarchy("0::/system.slice/nodelet.service\n", "1 0 0:25 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(v2.unwrap().unified(""), std::path::Path::new("/sys/fs/cgroup/system.slice/nodelet.service"));
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
