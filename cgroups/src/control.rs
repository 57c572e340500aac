//! Acting on a whole cgroup: kill everything in it at once, freeze and thaw it, and remove a cgroup tree
//! robustly. These use the cgroup2 tree (`cgroup.kill`, `cgroup.freeze`, `cgroup.events`), which hybrid hosts
//! have as `/sys/fs/cgroup/unified` too; the v1 freezer is there for hosts whose cgroup2 tree cannot freeze.

use std::path::Path;
use std::time::{Duration, Instant};

/// Kills every process in the cgroup and its descendants with SIGKILL, atomically (no fork can escape), as
/// `cgroup.kill` does (Linux 5.14+).
pub fn kill_all(dir: &Path) -> std::io::Result<()> {
    std::fs::write(dir.join("cgroup.kill"), "1")
}

/// SIGKILLs the processes `cgroup.procs` lists (v1 hierarchies, which have no `cgroup.kill`; not atomic: a
/// process forked meanwhile escapes, so callers retry the removal that follows).
pub fn kill_listed(dir: &Path) {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.parse().ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
}

/// A `key value` field of `cgroup.events` (`populated`, `frozen`).
fn event(dir: &Path, key: &str) -> std::io::Result<bool> {
    let text = std::fs::read_to_string(dir.join("cgroup.events"))?;
    Ok(text.lines().any(|l| l.strip_prefix(key).is_some_and(|v| v.trim() == "1")))
}

/// Whether any process is in the cgroup or its descendants.
pub fn populated(dir: &Path) -> std::io::Result<bool> {
    event(dir, "populated ")
}

/// Freezes (`true`) or thaws (`false`) the cgroup and waits up to `timeout` for the kernel to report it done.
pub fn set_frozen(dir: &Path, frozen: bool, timeout: Duration) -> std::io::Result<()> {
    std::fs::write(dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
    let deadline = Instant::now() + timeout;
    while event(dir, "frozen ")? != frozen {
        if Instant::now() > deadline {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{} did not settle", dir.display())));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Freezes or thaws a cgroup through the v1 freezer (`freezer.state`), waiting for `FROZEN`/`THAWED`.
pub fn set_frozen_v1(dir: &Path, frozen: bool, timeout: Duration) -> std::io::Result<()> {
    let want = if frozen { "FROZEN" } else { "THAWED" };
    std::fs::write(dir.join("freezer.state"), want)?;
    let deadline = Instant::now() + timeout;
    while std::fs::read_to_string(dir.join("freezer.state"))?.trim() != want {
        if Instant::now() > deadline {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{} did not settle", dir.display())));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Removes the cgroup and its descendants bottom-up, retrying while they drain (a cgroup is busy for a moment
/// after its last process exits) for at most `timeout`. A missing cgroup is not an error.
pub fn remove_tree(dir: &Path, timeout: Duration) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut children: Vec<_> = match std::fs::read_dir(dir) {
        Ok(entries) => {
            entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    children.sort();
    for child in children {
        remove_tree(&child, deadline.saturating_duration_since(Instant::now()))?;
    }
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}
