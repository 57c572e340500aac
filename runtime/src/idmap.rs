//! Idmapped mounts for pods in a user namespace (`hostUsers: false`).
//!
//! A pod's user namespace maps its ids `0..size` to the node's `host_id..host_id + size`. Files on disk keep the
//! ids they have (the image's, the volumes'): an idmapped mount shows the file a container sees as owned by
//! `uid` to the kernel as owned by `host_id + uid`, and stores what the container writes as `uid` again.
//!
//! How (kernel ≥ 5.12; tmpfs ≥ 6.3): `open_tree(OPEN_TREE_CLONE)` copies a mount into a detached tree,
//! `mount_setattr(MOUNT_ATTR_IDMAP)` gives it the namespace's mapping, and the tree is either used through
//! `/proc/self/fd/N` right away (overlayfs takes its lower layers so, and keeps its own private clones) or
//! attached with `move_mount` where a later bind mount finds it (volumes: libcontainer bind-mounts them into the
//! container from there; [`Staged`]). overlayfs itself cannot be idmapped (EINVAL on 6.x), which is why the
//! rootfs maps its layers instead, as containerd does.
//!
//! Crash rules: staged mounts live only under a container's bundle (`<bundle>/idmapped/<n>`); [`unstage`]
//! detaches whatever is mounted there before the bundle is removed, so a removal never walks into a volume.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use rustix::mount::OpenTreeFlags;
use std::path::{Path, PathBuf};

use crate::config::{ContainerConfig, Mount, Propagation};
use crate::error::RuntimeError;

/// One mapping of the pod's ids onto the node's: container id 0 is `host_id` (upstream's single range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdMapping {
    /// The node's id that the pod's 0 is.
    pub host_id: u32,
    /// How many ids the pod has (65536 upstream).
    pub size: u32,
}

impl IdMapping {
    /// The line for `/proc/<pid>/uid_map` and `gid_map`.
    pub fn map_line(&self) -> String {
        format!("0 {} {}", self.host_id, self.size)
    }

    /// The node's id for the pod's `id`, if the range has it.
    pub fn to_host(&self, id: u32) -> Option<u32> {
        (id < self.size).then(|| self.host_id.checked_add(id)).flatten()
    }
}

/// A pod's user namespace as the mounts made for it need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodUserNamespace {
    /// Its namespace file (the sandbox's `user`).
    pub file: PathBuf,
    /// Its ids.
    pub mapping: IdMapping,
}

/// A detached copy of the mount tree at `source` (its submounts too when `recursive`), idmapped with the user
/// namespace `userns` (an open `/proc/<pid>/ns/user` or a bind mount of it).
pub fn idmapped_tree(source: &Path, userns: &File, recursive: bool) -> std::io::Result<OwnedFd> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = rustix::mount::open_tree(rustix::fs::CWD, source, flags)?;
    crate::mount_attr::set(&tree, crate::mount_attr::IDMAP, Some(userns.as_fd()), recursive)?;
    Ok(tree)
}

/// Attaches a detached tree at `target` (which must exist: a directory, or a file for a file mount).
fn attach(tree: &OwnedFd, target: &Path) -> std::io::Result<()> {
    let flags = rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH;
    Ok(rustix::mount::move_mount(tree, "", rustix::fs::CWD, target, flags)?)
}

/// Mounts an idmapped copy of the directory (or file) `source`, its submounts included, at `target`.
pub fn mount(source: &Path, target: &Path, userns: &File) -> std::io::Result<()> {
    attach(&idmapped_tree(source, userns, true)?, target)
}

/// The staging directory of a bundle.
fn staging(bundle: &Path) -> PathBuf {
    bundle.join("idmapped")
}

/// Mounts an idmapped copy of `source` at `<bundle>/idmapped/<n>` and returns that path, for a bind mount into
/// the container to take the mapping along.
pub fn stage(bundle: &Path, n: usize, source: &Path, userns: &File) -> std::io::Result<PathBuf> {
    let dir = staging(bundle);
    std::fs::create_dir_all(&dir)?;
    let target = dir.join(n.to_string());
    if source.is_dir() {
        std::fs::create_dir_all(&target)?;
    } else {
        File::create(&target)?;
    }
    mount(source, &target, userns)?;
    Ok(target)
}

/// With a user namespace to join: every bind mount of `cfg` staged idmapped under `bundle`, and its source
/// replaced by the staged copy. Without one, `cfg` as it is.
pub(crate) fn stage_volumes(bundle: &Path, mut cfg: ContainerConfig) -> Result<ContainerConfig, RuntimeError> {
    let Some(userns) = cfg.namespaces.user.clone() else { return Ok(cfg) };
    let fail = |message: String| RuntimeError::Create { id: cfg.id.clone(), message };
    let userns =
        File::open(&userns).map_err(|e| fail(format!("opening its user namespace {}: {e}", userns.display())))?;
    let mut staged = Vec::new();
    for (n, mount) in cfg.mounts.iter().enumerate() {
        if let Mount::Bind { source, propagation, destination, .. } = mount {
            if *propagation != Propagation::Private {
                // A staged copy is detached from the source's peer group: propagation could not be honoured.
                return Err(fail(format!("{destination}: mount propagation is not supported in a user namespace")));
            }
            let copy = stage(bundle, n, source, &userns).map_err(|e| {
                let _ = unstage(bundle);
                fail(format!("idmapping {} for {destination}: {e}", source.display()))
            })?;
            staged.push((n, copy));
        }
    }
    for (n, copy) in staged {
        if let Some(Mount::Bind { source, .. }) = cfg.mounts.get_mut(n) {
            *source = copy;
        }
    }
    Ok(cfg)
}

/// Detaches every staged mount of a bundle. Errors when one is still mounted afterwards: the caller must then not
/// remove the bundle recursively.
pub fn unstage(bundle: &Path) -> std::io::Result<()> {
    let dir = staging(bundle);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // Detach every mount stacked there (EINVAL: nothing (more) is mounted).
        loop {
            match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) => {}
                Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => break,
                Err(e) => return Err(e.into()),
            }
        }
        let removed = if path.is_dir() { std::fs::remove_dir(&path) } else { std::fs::remove_file(&path) };
        removed?;
    }
    std::fs::remove_dir(&dir)
}

/// Whether this kernel and the filesystem of `dir` can idmap a mount (the answer for the pods' volumes and
/// layers on it). Makes a throwaway user namespace; root only.
pub fn supported(dir: &Path) -> Result<(), String> {
    let mapping = IdMapping { host_id: 1 << 16, size: 1 << 16 };
    let userns = throwaway_user_namespace(mapping)?;
    idmapped_tree(dir, &userns, false)
        .map(drop)
        .map_err(|e| format!("idmapped mounts of {} are not supported here: {e}", dir.display()))
}

/// A user namespace with `mapping`, held by the returned file (its creator has exited).
pub fn throwaway_user_namespace(mapping: IdMapping) -> Result<File, String> {
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    let (done_r, done_w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    // SAFETY: the child only calls async-signal-safe functions (unshare, write, read, _exit).
    let child = match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        nix::unistd::ForkResult::Child => {
            // The parent's ends, or this child never sees the end of the pipe it waits on.
            drop((ready_r, done_w));
            let ok = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = nix::unistd::write(&ready_w, if ok { b"0" } else { b"1" });
            let mut b = [0u8; 1];
            let _ = nix::unistd::read(done_r.as_raw_fd(), &mut b);
            // SAFETY: ends the forked child without running the parent's exit paths.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop((ready_w, done_r));
    let mut b = [0u8; 1];
    let result = match nix::unistd::read(ready_r.as_raw_fd(), &mut b) {
        Ok(1) if b[0] == b'0' => write_maps(child.as_raw(), mapping)
            .and_then(|()| File::open(format!("/proc/{child}/ns/user")).map_err(|e| e.to_string())),
        _ => Err("unshare(CLONE_NEWUSER) failed".to_string()),
    };
    drop(done_w);
    let _ = nix::sys::wait::waitpid(child, None);
    result
}

/// Writes the pod's mapping as both the uid and gid map of process `pid` (which has just made its user
/// namespace). As root in the parent namespace, `setgroups` stays allowed.
pub fn write_maps(pid: i32, mapping: IdMapping) -> Result<(), String> {
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, mapping.map_line()).map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_ids_map_into_its_range_only() {
        let m = IdMapping { host_id: 65536 * 3, size: 65536 };
        assert_eq!(m.map_line(), "0 196608 65536");
        assert_eq!(m.to_host(0), Some(196_608));
        assert_eq!(m.to_host(65535), Some(262_143));
        assert_eq!(m.to_host(65536), None);
        assert_eq!(IdMapping { host_id: u32::MAX, size: 2 }.to_host(1), None);
    }

    #[test]
    fn unstaging_a_bundle_without_staged_mounts_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        unstage(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("idmapped/0")).unwrap();
        std::fs::write(dir.path().join("idmapped/1"), b"").unwrap();
        unstage(dir.path()).unwrap();
        assert!(!dir.path().join("idmapped").exists());
    }
}
