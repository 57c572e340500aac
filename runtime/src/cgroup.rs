//! The few cgroup facts the runtime itself needs: which layout the host has, moving a container's init into the
//! unified tree on hybrid hosts, and whether the kernel OOM-killed something in a container's cgroup. (The QoS
//! hierarchy, limits, events and stats are the `nodelet-cgroups` crate's.)

use std::path::{Path, PathBuf};

/// How cgroups are mounted on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `/sys/fs/cgroup` is cgroup2: one tree for everything.
    Unified,
    /// v1 controllers (memory among them) plus cgroup2 at `/sys/fs/cgroup/unified` (PSI, cgroup.kill, events).
    Hybrid,
    /// v1 only.
    Legacy,
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Detects the layout from the mounts at `/sys/fs/cgroup`.
pub fn layout() -> Layout {
    if is_cgroup2(Path::new("/sys/fs/cgroup")) {
        Layout::Unified
    } else if is_cgroup2(Path::new("/sys/fs/cgroup/unified")) {
        Layout::Hybrid
    } else {
        Layout::Legacy
    }
}

/// The container's directory in the cgroup2 tree (`None` on legacy hosts).
pub fn unified_dir(layout: Layout, cgroups_path: &str) -> Option<PathBuf> {
    let rel = cgroups_path.trim_start_matches('/');
    match layout {
        Layout::Unified => Some(Path::new("/sys/fs/cgroup").join(rel)),
        Layout::Hybrid => Some(Path::new("/sys/fs/cgroup/unified").join(rel)),
        Layout::Legacy => None,
    }
}

/// On hybrid hosts libcontainer drives the v1 controllers only and leaves the process at the zygote's place in
/// the unified tree: move it into its own unified cgroup so that PSI, `cgroup.events` and `cgroup.kill` work per
/// container (its children, forked later, are born there).
pub fn join_unified(layout: Layout, cgroups_path: &str, pid: i32) -> std::io::Result<()> {
    if layout != Layout::Hybrid {
        return Ok(());
    }
    let Some(dir) = unified_dir(layout, cgroups_path) else { return Ok(()) };
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
}

/// Where an exec'd process joins the container's cgroups: the `tasks` file of each v1 hierarchy the container
/// has a directory in, and its cgroup2 directory (when it exists).
pub(crate) fn exec_cgroups(layout: Layout, cgroups_path: &str) -> (Vec<PathBuf>, Option<PathBuf>) {
    let rel = cgroups_path.trim_start_matches('/');
    let v1 = match layout {
        Layout::Unified => Vec::new(),
        Layout::Hybrid | Layout::Legacy => v1_hierarchies().into_iter().map(|h| h.join(rel)).collect(),
    };
    let tasks = v1.into_iter().filter(|d| d.is_dir()).map(|d| d.join("tasks")).collect();
    (tasks, unified_dir(layout, cgroups_path).filter(|d| d.is_dir()))
}

/// Starts the RCU grace period that creating a container waits for, so that it runs while the runtime writes
/// the bundle and libcontainer prepares, instead of after. Any write to a `cgroup.procs` waits for a grace period
/// (4-25 ms on this host, far more than the rest of a create) unless another such write happened within the last
/// one; libcontainer's moves of the container into its cgroups would otherwise start that wait themselves. This
/// write moves the zygote to the cgroup it already is in (`home`, see [`own_unified_dir`]): nothing changes but
/// the time. Blocking; best effort.
pub(crate) fn start_grace_period(home: &Path, zygote: i32) {
    if let Err(e) = std::fs::write(home.join("cgroup.procs"), zygote.to_string()) {
        tracing::debug!(error = %e, "could not start the grace period early");
    }
}

/// This process's (the agent's, so also the zygote's) directory in the cgroup2 tree: its path in
/// `/proc/self/cgroup`, relative to the subtree mounted where the layout has that tree.
pub(crate) fn own_unified_dir(layout: Layout) -> std::io::Result<PathBuf> {
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let point = unified_dir(layout, "").ok_or_else(|| invalid("no cgroup2 tree"))?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")?;
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::")).ok_or_else(|| invalid("no cgroup2 line"))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount = crate::cgroupfs::mounts(&mountinfo)
        .filter(|m| m.fstype == "cgroup2" && m.point == point)
        .last()
        .ok_or_else(|| invalid("no cgroup2 mount"))?;
    let rel = Path::new(own).strip_prefix(&mount.root).map_err(|_| invalid("own cgroup is not mounted"))?;
    Ok(point.join(rel))
}

/// Removes the container's cgroup from every hierarchy once its init is gone, killing whatever is left in it
/// first (with a shared PID namespace, the init's death does not take its children along). This is what
/// libcontainer's delete does for cgroups, without its per-controller mountinfo and `/proc/self/cgroup` scans
/// through hardened procfs handles: ~700 system calls per container on a hybrid host, 2-3 ms.
pub fn remove(layout: Layout, cgroups_path: &str) {
    let rel = cgroups_path.trim_start_matches('/');
    let unified = unified_dir(layout, cgroups_path).filter(|d| d.exists());
    if let Some(dir) = &unified
        && nodelet_cgroups::control::populated(dir).unwrap_or(false)
    {
        let _ = nodelet_cgroups::control::kill_all(dir);
    }
    let v1: Vec<PathBuf> = match layout {
        Layout::Unified => Vec::new(),
        Layout::Hybrid | Layout::Legacy => {
            v1_hierarchies().into_iter().map(|h| h.join(rel)).filter(|d| d.exists()).collect()
        }
    };
    if unified.is_none() {
        // No cgroup.kill (legacy hosts): signal what each hierarchy lists.
        v1.iter().for_each(|dir| nodelet_cgroups::control::kill_listed(dir));
    }
    for dir in v1.iter().chain(&unified) {
        if let Err(e) = nodelet_cgroups::control::remove_tree(dir, std::time::Duration::from_secs(1)) {
            tracing::warn!(dir = %dir.display(), error = %e, "container cgroup still busy; left behind");
        }
    }
}

/// The v1 hierarchies mounted under `/sys/fs/cgroup` (real directories: `cpu` -> `cpu,cpuacct` links are skipped).
fn v1_hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name() != "unified")
        .map(|e| e.path())
        .collect()
}

/// How many processes the kernel OOM-killed in the container's cgroup: `oom_kill` of `memory.events` (v2; not
/// `oom`, which also counts failed charges that killed nothing) or of `memory.oom_control` (v1), read by the
/// cgroup layer's OOM code. Called when the init exits and before the cgroup goes, so the verdict is final.
pub fn oom_kills(layout: Layout, cgroups_path: &str) -> u64 {
    let rel = cgroups_path.trim_start_matches('/');
    let file = match layout {
        Layout::Unified => Path::new("/sys/fs/cgroup").join(rel).join("memory.events"),
        Layout::Hybrid | Layout::Legacy => Path::new("/sys/fs/cgroup/memory").join(rel).join("memory.oom_control"),
    };
    nodelet_cgroups::oom::read_oom_kills(&file).unwrap_or(0)
}
