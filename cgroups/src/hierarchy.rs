//! The kubelet's cgroup tree on disk (cgroupfs driver): `<cgroup-root>/kubepods` limited to node allocatable,
//! `kubepods/burstable` and `kubepods/besteffort`, and `pod<uid>` cgroups with pod-level limits; containers go
//! below their pod (the runtime creates those). On a pure v2 host everything is in one tree; on a hybrid host the
//! limits go to the v1 controllers (`cpu`, `memory`, `pids`, ...) and the same paths are also made in the
//! unified tree, where PSI, `cgroup.events`, `cgroup.kill` and `cgroup.freeze` live.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control;
use crate::qos::{CPU_PERIOD_US, MIN_SHARES, PodLimits, QosClass, milli_cpu_to_shares, pod_cgroup, shares_to_weight};

/// A v1 controller hierarchy nodelet writes to or reads from on hybrid hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum V1 {
    /// `cpu`: shares and CFS quota.
    Cpu,
    /// `cpuacct`: CPU usage accounting.
    Cpuacct,
    /// `memory`: limits, usage, OOM events.
    Memory,
    /// `pids`: the process count limit.
    Pids,
    /// `blkio`: block I/O accounting.
    Blkio,
    /// `freezer`: freezing a cgroup's processes.
    Freezer,
}

impl V1 {
    /// Every v1 controller nodelet uses.
    pub const ALL: [V1; 6] = [V1::Cpu, V1::Cpuacct, V1::Memory, V1::Pids, V1::Blkio, V1::Freezer];

    /// The controller's name in `/proc/self/cgroup` and under `/sys/fs/cgroup`.
    pub fn name(self) -> &'static str {
        match self {
            V1::Cpu => "cpu",
            V1::Cpuacct => "cpuacct",
            V1::Memory => "memory",
            V1::Pids => "pids",
            V1::Blkio => "blkio",
            V1::Freezer => "freezer",
        }
    }
}

/// Node allocatable enforced on `kubepods` (capacity minus system and kube reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocatable {
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Processes (`None`: unlimited).
    pub pids: Option<u64>,
}

/// Where the node's cgroup root is in each hierarchy.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    /// The cgroup root in the cgroup2 tree (pure v2: with controllers; hybrid: for PSI, events, kill, freeze).
    unified: PathBuf,
    /// Hybrid hosts: the cgroup root in each v1 hierarchy. Empty on pure v2 hosts.
    v1: Vec<(V1, PathBuf)>,
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    std::fs::write(dir.join(file), value)
        .map_err(|e| io::Error::new(e.kind(), format!("writing {value:?} to {}: {e}", dir.join(file).display())))
}

/// v1's memory limit, kept in step with a memory+swap limit where the runtime set one (runc's and libcontainer's
/// "no swap beyond the limit"): the kernel refuses a limit above memory+swap, and a lower limit alone would let
/// the difference go to swap. Growing writes memory+swap first, shrinking the limit first.
fn write_v1_memory(dir: &Path, limit: &str) -> io::Result<()> {
    /// What v1 reads back for "no limit".
    const UNLIMITED: u64 = 9_223_372_036_854_771_712;
    let memsw = std::fs::read_to_string(dir.join("memory.memsw.limit_in_bytes"))
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|v| *v < UNLIMITED);
    let Some(current_memsw) = memsw else { return write(dir, "memory.limit_in_bytes", limit) };
    let new: u64 = limit.parse().unwrap_or(UNLIMITED);
    if new > current_memsw {
        write(dir, "memory.memsw.limit_in_bytes", limit)?;
        write(dir, "memory.limit_in_bytes", limit)
    } else {
        write(dir, "memory.limit_in_bytes", limit)?;
        write(dir, "memory.memsw.limit_in_bytes", limit)
    }
}

fn mkdir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), format!("creating cgroup {}: {e}", dir.display()))),
    }
}

/// Controllers kubepods' descendants need on v2.
const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];

impl Hierarchy {
    /// The host's layout with the node's cgroup root at `cgroup_root` (`/` by default, like `--cgroup-root`).
    pub fn detect(cgroup_root: &str) -> io::Result<Hierarchy> {
        let rel = cgroup_root.trim_start_matches('/');
        let fs = Path::new("/sys/fs/cgroup");
        if fs.join("cgroup.controllers").exists() {
            return Ok(Hierarchy { unified: fs.join(rel), v1: Vec::new() });
        }
        if !fs.join("unified/cgroup.controllers").exists() {
            return Err(io::Error::other("no cgroup2 tree at /sys/fs/cgroup or /sys/fs/cgroup/unified"));
        }
        let v1 =
            V1::ALL.iter().filter(|c| fs.join(c.name()).is_dir()).map(|c| (*c, fs.join(c.name()).join(rel))).collect();
        Ok(Hierarchy { unified: fs.join("unified").join(rel), v1 })
    }

    /// An explicit layout (tests put the root below their own cgroups).
    pub fn with_roots(unified: PathBuf, v1: Vec<(V1, PathBuf)>) -> Hierarchy {
        Hierarchy { unified, v1 }
    }

    /// True on pure cgroup v2 hosts.
    pub fn is_v2(&self) -> bool {
        self.v1.is_empty()
    }

    /// `rel` (e.g. `kubepods/burstable/pod<uid>`) in the cgroup2 tree.
    pub fn unified(&self, rel: &str) -> PathBuf {
        self.unified.join(rel)
    }

    /// `rel` in a v1 hierarchy (`None` on pure v2 hosts or when the host lacks that controller).
    pub fn v1(&self, controller: V1, rel: &str) -> Option<PathBuf> {
        self.v1.iter().find(|(c, _)| *c == controller).map(|(_, root)| root.join(rel))
    }

    /// Where cgroup `rel` lists its processes (`cgroup.procs`): the cgroup2 tree on v2 hosts, the memory
    /// hierarchy on hybrid ones (where the runtime places every container).
    pub fn procs_dir(&self, rel: &str) -> PathBuf {
        self.v1(V1::Memory, rel).unwrap_or_else(|| self.unified(rel))
    }

    /// Every directory `rel` has, one per hierarchy.
    fn all(&self, rel: &str) -> Vec<PathBuf> {
        std::iter::once(self.unified(rel)).chain(self.v1.iter().map(|(_, root)| root.join(rel))).collect()
    }

    /// Creates cgroup `rel` (and its parents) in every hierarchy; on v2 delegates the controllers down the path.
    pub fn create(&self, rel: &str) -> io::Result<()> {
        let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
        for depth in 0..=parts.len() {
            let prefix = parts[..depth].join("/");
            for dir in self.all(&prefix) {
                mkdir(&dir)?;
                if self.is_v2() && depth < parts.len() {
                    // Delegate controllers one level down; a controller the host does not have is skipped.
                    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                    let wanted: Vec<String> = V2_CONTROLLERS
                        .iter()
                        .filter(|c| available.split_whitespace().any(|a| a == **c))
                        .map(|c| format!("+{c}"))
                        .collect();
                    if !wanted.is_empty() {
                        write(&dir, "cgroup.subtree_control", &wanted.join(" "))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes cpu shares (v2: the matching weight), an optional quota and an optional memory and pids limit.
    fn limit(
        &self,
        rel: &str,
        shares: u64,
        quota_us: Option<u64>,
        memory: Option<u64>,
        pids: Option<u64>,
    ) -> io::Result<()> {
        self.update_cpu_memory(rel, shares, quota_us, memory)?;
        let pids = pids.map_or_else(|| "max".to_string(), |p| p.to_string());
        if self.is_v2() {
            return write(&self.unified(rel), "pids.max", &pids);
        }
        if let Some(dir) = self.v1(V1::Pids, rel) {
            write(&dir, "pids.max", &pids)?;
        }
        Ok(())
    }

    /// Writes a cgroup's cpu shares (v2: weight), quota and memory limit, leaving everything else as it is: what
    /// an in-place pod resize changes, for a pod's cgroup or one of its containers'.
    pub fn update_cpu_memory(
        &self,
        rel: &str,
        shares: u64,
        quota_us: Option<u64>,
        memory: Option<u64>,
    ) -> io::Result<()> {
        let quota = quota_us.map(|q| q.to_string());
        let memory = memory.map(|m| m.to_string());
        if self.is_v2() {
            let dir = self.unified(rel);
            write(&dir, "cpu.weight", &shares_to_weight(shares).to_string())?;
            write(&dir, "cpu.max", &format!("{} {CPU_PERIOD_US}", quota.as_deref().unwrap_or("max")))?;
            return write(&dir, "memory.max", memory.as_deref().unwrap_or("max"));
        }
        if let Some(dir) = self.v1(V1::Cpu, rel) {
            write(&dir, "cpu.shares", &shares.to_string())?;
            write(&dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
            write(&dir, "cpu.cfs_quota_us", quota.as_deref().unwrap_or("-1"))?;
        }
        if let Some(dir) = self.v1(V1::Memory, rel) {
            write_v1_memory(&dir, memory.as_deref().unwrap_or("-1"))?;
        }
        Ok(())
    }

    /// Creates `kubepods` limited to `allocatable` and the two QoS cgroups below it. Idempotent.
    pub fn ensure_node(&self, allocatable: Allocatable) -> io::Result<()> {
        self.create("kubepods")?;
        let shares = milli_cpu_to_shares(allocatable.cpu_millis);
        self.limit("kubepods", shares, None, Some(allocatable.memory_bytes), allocatable.pids)?;
        self.create("kubepods/burstable")?;
        self.create("kubepods/besteffort")?;
        self.limit("kubepods/besteffort", MIN_SHARES, None, None, None)?;
        self.update_burstable(0)
    }

    /// The burstable cgroup's cpu shares follow the sum of its pods' cpu requests (upstream's QoS manager).
    pub fn update_burstable(&self, cpu_request_millis: u64) -> io::Result<()> {
        self.limit("kubepods/burstable", milli_cpu_to_shares(cpu_request_millis), None, None, None)
    }

    /// Creates (or updates) a pod's cgroup with its limits; returns its path relative to the cgroup root.
    pub fn ensure_pod(&self, qos: QosClass, uid: &str, limits: &PodLimits, pids: Option<u64>) -> io::Result<String> {
        let rel = pod_cgroup(qos, uid);
        self.create(&rel)?;
        self.limit(&rel, limits.cpu_shares, limits.cpu_quota_us, limits.memory_limit_bytes, pids)?;
        Ok(rel)
    }

    /// Kills everything left in a pod cgroup and removes it from every hierarchy (retrying while it drains).
    pub fn remove_pod(&self, qos: QosClass, uid: &str, timeout: Duration) -> io::Result<()> {
        let rel = pod_cgroup(qos, uid);
        let unified = self.unified(&rel);
        if unified.exists() && control::populated(&unified).unwrap_or(false) {
            control::kill_all(&unified)?;
        }
        for dir in self.all(&rel) {
            control::remove_tree(&dir, timeout)?;
        }
        Ok(())
    }

    /// Freezes or thaws a cgroup: `cgroup.freeze` in the cgroup2 tree, or the v1 freezer where the cgroup2 tree
    /// cannot freeze (kernels before 5.2).
    pub fn set_frozen(&self, rel: &str, frozen: bool, timeout: Duration) -> io::Result<()> {
        let unified = self.unified(rel);
        if unified.join("cgroup.freeze").exists() {
            return control::set_frozen(&unified, frozen, timeout);
        }
        match self.v1(V1::Freezer, rel) {
            Some(dir) => control::set_frozen_v1(&dir, frozen, timeout),
            None => Err(io::Error::other(format!("{rel}: no freezer (cgroup.freeze or v1 freezer)"))),
        }
    }

    /// Moves a process into `rel` in every hierarchy (v1 controllers and the cgroup2 tree).
    pub fn attach(&self, rel: &str, pid: u32) -> io::Result<()> {
        for dir in self.all(rel) {
            write(&dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Sets `memory.oom.group` on a container's cgroup (v2 only): upstream sets it unless
    /// `singleProcessOOMKill`, which defaults to false on v2, so an OOM kills the whole container.
    pub fn set_oom_group(&self, rel: &str, group: bool) -> io::Result<()> {
        if !self.is_v2() {
            return Ok(());
        }
        write(&self.unified(rel), "memory.oom.group", if group { "1" } else { "0" })
    }
}
