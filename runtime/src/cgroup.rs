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

/// On hybrid hosts libcontainer drives the v1 controllers only and leaves the process at the unified root: put
/// it in its own unified cgroup so that PSI, `cgroup.events` and `cgroup.kill` work per container.
pub fn join_unified(layout: Layout, cgroups_path: &str, pid: i32) -> std::io::Result<()> {
    if layout != Layout::Hybrid {
        return Ok(());
    }
    let dir = unified_dir(layout, cgroups_path).expect("hybrid has a unified tree");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
}

/// Removes the unified cgroup that [`join_unified`] made (bounded retries while it drains).
pub fn remove_unified(layout: Layout, cgroups_path: &str) {
    if layout != Layout::Hybrid {
        return;
    }
    let dir = unified_dir(layout, cgroups_path).expect("hybrid has a unified tree");
    // A cgroup stays busy for a moment after its last process is reaped: retry, quickly at first (~1 s in all).
    for attempt in 0..60u64 {
        match std::fs::remove_dir(&dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_micros(200 * attempt.min(100))),
        }
    }
    tracing::warn!(dir = %dir.display(), "unified cgroup still busy; left behind");
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
