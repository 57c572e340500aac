//! Where a container's volumes may be mounted. A mount into `/proc` would hide or replace kernel interfaces the
//! runtime relies on (runc refuses them, CVE-2019-16884 and CVE-2019-19921 went through there), and a mount into
//! `/sys` of an unprivileged container could make parts of the host's sysfs writable. So a destination inside
//! `/proc` is refused for every container (except the files LXCFS replaces, as runc allows), and one at or
//! inside `/sys` for unprivileged ones.
//!
//! The destination is checked as written (lexically: `/data/../proc/x` is `/proc/x`) and as it resolves in the
//! image's root filesystem (a symlink `/data -> /proc` in the image makes `/data/x` a mount into `/proc`): the
//! symlinks are resolved inside the rootfs as libcontainer will resolve them, and the result checked.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use crate::error::SpecError;

/// Files in `/proc` a mount may replace: LXCFS's container views (runc's list).
const PROC_ALLOWED: &[&str] = &[
    "/proc/cpuinfo",
    "/proc/diskstats",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/swaps",
    "/proc/uptime",
    "/proc/loadavg",
    "/proc/slabinfo",
    "/proc/net/dev",
    "/proc/sys/kernel/ns_last_pid",
];

/// `path` as an absolute path with `.` and `..` applied (never above `/`).
pub fn clean(path: &str) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in Path::new(path).components() {
        match c {
            Component::Normal(name) => out.push(name),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Why a mount at `dest` (as the container sees it) is not allowed, if it is not.
fn refusal(dest: &Path, privileged: bool) -> Option<String> {
    if dest == Path::new("/proc") || dest.starts_with("/proc") && !PROC_ALLOWED.iter().any(|a| dest == Path::new(a)) {
        return Some(format!("{} cannot be mounted because it is inside /proc", dest.display()));
    }
    if !privileged && dest.starts_with("/sys") {
        return Some(format!("{} cannot be mounted in an unprivileged container: it is inside /sys", dest.display()));
    }
    None
}

/// Checks a mount destination, as written and as it resolves in `rootfs`.
pub fn check(rootfs: &Path, destination: &str, privileged: bool) -> Result<(), SpecError> {
    let forbidden = |reason: String| SpecError::ForbiddenMount { destination: destination.to_string(), reason };
    let lexical = clean(destination);
    if let Some(reason) = refusal(&lexical, privileged) {
        return Err(forbidden(reason));
    }
    if let Some(resolved) = resolve_in_root(rootfs, &lexical)
        && let Some(reason) = refusal(&resolved, privileged)
    {
        return Err(forbidden(format!("it resolves to {} in the image: {reason}", resolved.display())));
    }
    Ok(())
}

/// Where `dest` (clean, absolute) lands in `rootfs` with the image's symlinks resolved inside it, as
/// libcontainer resolves a destination when it mounts: component by component, `..` never above the root, an
/// absolute target from the root, dangling links too (their target may exist by then: `/proc/sys` appears when
/// procfs is mounted). Each component is looked at with `lstat` below an already resolved prefix, so the walk
/// never follows a link itself. `None` after 40 links (the mount fails anyway).
fn resolve_in_root(rootfs: &Path, dest: &Path) -> Option<PathBuf> {
    let mut current = PathBuf::from("/");
    let mut pending: VecDeque<OsString> = dest.iter().map(OsString::from).collect();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        match name.to_str() {
            Some("/" | ".") => continue,
            Some("..") => {
                current.pop();
                continue;
            }
            _ => {}
        }
        let candidate = current.join(&name);
        let on_host = rootfs.join(candidate.strip_prefix("/").ok()?);
        match std::fs::symlink_metadata(&on_host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return None;
                }
                let target = std::fs::read_link(&on_host).ok()?;
                if target.is_absolute() {
                    current = PathBuf::from("/");
                }
                for part in target.iter().rev() {
                    pending.push_front(part.to_os_string());
                }
            }
            _ => current = candidate,
        }
    }
    Some(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_in_proc_and_sys_are_refused_as_written() {
        let root = Path::new("/nonexistent-rootfs");
        assert!(check(root, "/data", false).is_ok());
        assert!(check(root, "/proc/sys/kernel/core_pattern", true).is_err());
        assert!(check(root, "/proc", true).is_err());
        assert!(check(root, "/data/../proc/x", false).is_err());
        assert!(check(root, "/proc/meminfo", false).is_ok(), "LXCFS's files are allowed");
        assert!(check(root, "/processes", false).is_ok());
        let sys = check(root, "/sys/fs/cgroup/x", false).unwrap_err().to_string();
        assert!(sys.contains("unprivileged") && sys.contains("/sys/fs/cgroup/x"), "{sys}");
        assert!(check(root, "/sys", true).is_ok(), "a privileged container may mount the host's /sys");
        assert!(check(root, "/system", false).is_ok());
    }

    #[test]
    fn symlinks_in_the_image_are_followed_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::os::unix::fs::symlink("/proc/sys", root.join("data")).unwrap();
        std::os::unix::fs::symlink("../../../proc", root.join("real/up")).unwrap();
        std::os::unix::fs::symlink("/real", root.join("fine")).unwrap();
        let err = check(root, "/data/kernel/x", false).unwrap_err().to_string();
        assert!(err.contains("resolves to /proc/sys/kernel/x"), "{err}");
        assert!(check(root, "/real/up/x", false).is_err(), "`..` stops at the image's root");
        assert!(check(root, "/fine/x", false).is_ok());
        assert!(check(root, "/new/dir", false).is_ok());
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(check(root, "/loop/x", false).is_ok(), "a link loop is libcontainer's error, not a refusal");
    }
}
