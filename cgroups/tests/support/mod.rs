//! Shared by the cgroup tests and the OOM benchmark (included with `mod support;` / `#[path]`): test cgroups are
//! children of this process's own, never anywhere else.
// Each test binary includes all of it and uses a part.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use nodelet_cgroups::oom::MemoryController;

/// This process's own memory cgroup directory and its controller flavour (`None` without root or a memory
/// cgroup). On v2, makes the memory controller available to children where the kernel allows it (a parent
/// without processes, or the root cgroup as in the test VM).
pub fn own_memory_cgroup() -> Option<(PathBuf, MemoryController)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let mine = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        let parent = Path::new("/sys/fs/cgroup").join(mine.trim_start_matches('/'));
        let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory");
        Some((parent, MemoryController::V2))
    } else {
        let mine = own.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))?;
        Some((Path::new("/sys/fs/cgroup/memory").join(mine.trim_start_matches('/')), MemoryController::V1))
    }
}

/// Limits a memory cgroup to `bytes`, swap included.
pub fn limit_memory(dir: &Path, controller: MemoryController, bytes: u64) -> std::io::Result<()> {
    let limit = bytes.to_string();
    match controller {
        MemoryController::V2 => {
            std::fs::write(dir.join("memory.max"), &limit)?;
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        }
        MemoryController::V1 => {
            std::fs::write(dir.join("memory.limit_in_bytes"), &limit)?;
            let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), &limit);
        }
    }
    Ok(())
}

/// This process's own cgroup in the cgroup2 tree (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid
/// hosts); `None` without root.
pub fn own_unified_cgroup() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mine = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim_start_matches('/').to_string();
    let root = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        Path::new("/sys/fs/cgroup")
    } else {
        Path::new("/sys/fs/cgroup/unified")
    };
    Some(root.join(mine))
}
