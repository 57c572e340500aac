//! A container's `volumeMounts` -> the runtime's bind mounts.
//!
//! `subPath` threat model (the CVE-2017-1002101 class): the volume may be writable by another container of the
//! pod, which can replace a directory on the subPath with a symlink to anywhere on the host, between our check
//! and the mount. So the subPath is opened with `openat2(RESOLVE_BENEATH)` from the volume's root (symlinks that
//! stay inside the volume, like a configMap key's, are followed; one that leaves it is refused), and the open
//! file itself (`/proc/self/fd/N`) is bind-mounted onto a pod-private path under `volume-subpaths/`, which the
//! container then mounts: what the container gets is the inode that was checked, whatever happens to the path
//! later. Missing directories on the subPath are created, one `mkdirat` at a time below checked parents.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, VolumeMount};
use nodelet_runtime::{Mount, Propagation};
use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::PodVolumes;

/// The bind mounts for `c`'s `volumeMounts`. `env`: the container's environment, for `subPathExpr`;
/// `subpaths`: where this container's pinned subPaths go (`<pod>/volume-subpaths/<container>`).
pub fn mounts(
    volumes: &PodVolumes,
    c: &Container,
    env: &[(String, String)],
    subpaths: &Path,
) -> Result<Vec<Mount>, String> {
    let mut out = Vec::new();
    let privileged = c.security_context.as_ref().and_then(|s| s.privileged).unwrap_or(false);
    for (index, m) in c.volume_mounts.iter().flatten().enumerate() {
        let volume = volumes
            .get(&m.name)
            .ok_or_else(|| format!("cannot find volume {:?} to mount into container {:?}", m.name, c.name))?;
        let propagation = match m.mount_propagation.as_deref() {
            None | Some("None") => Propagation::Private,
            Some("HostToContainer") => Propagation::HostToContainer,
            Some("Bidirectional") if privileged => Propagation::Bidirectional,
            Some("Bidirectional") => {
                return Err("Bidirectional mount propagation is available only to privileged containers".into());
            }
            Some(other) => return Err(format!("invalid mount propagation mode {other:?}")),
        };
        let read_only = m.read_only.unwrap_or(false) || volume.read_only;
        // Enabled and IfPossible alike: this kernel has mount_setattr (5.12+), so recursive read-only is possible.
        let recursive = match m.recursive_read_only.as_deref() {
            None | Some("Disabled") => false,
            Some("Enabled" | "IfPossible") if !m.read_only.unwrap_or(false) => {
                return Err("recursiveReadOnly requires readOnly to be true".into());
            }
            Some("Enabled" | "IfPossible") => true,
            Some(other) => return Err(format!("invalid recursiveReadOnly mode {other:?}")),
        };
        let sub = sub_path(m, env)?;
        let source = match sub {
            None => volume.path.clone(),
            Some(sub) => pin(&volume.path, &sub, &subpaths.join(format!("{}-{index}", m.name)))?,
        };
        if propagation != Propagation::Private {
            super::mounts::check_propagation(&source, propagation == Propagation::Bidirectional)?;
        }
        if recursive && propagation != Propagation::Private {
            return Err("recursiveReadOnly requires mountPropagation None".into());
        }
        out.push(Mount::Bind { source, destination: m.mount_path.clone(), read_only, recursive, propagation });
    }
    Ok(out)
}

/// The mount's subPath (`subPathExpr` expanded with the container's environment), checked to be relative and
/// free of `..`.
fn sub_path(m: &VolumeMount, env: &[(String, String)]) -> Result<Option<String>, String> {
    let raw = match (&m.sub_path, &m.sub_path_expr) {
        (Some(p), _) if !p.is_empty() => p.clone(),
        (_, Some(e)) if !e.is_empty() => expand(e, env),
        _ => return Ok(None),
    };
    let path = Path::new(&raw);
    if path.is_absolute() {
        return Err(format!("subpath {raw:?} must be a relative path"));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("subpath {raw:?} must not contain '..'"));
    }
    Ok(Some(raw))
}

/// `$(VAR)` from `env` (`$$` is a literal `$`, an unknown name stays as written), as upstream's expansion.
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut out = String::new();
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Opens `sub` beneath `root` (creating missing directories) and bind-mounts what was opened onto `target`.
fn pin(root: &Path, sub: &str, target: &Path) -> Result<PathBuf, String> {
    let fd =
        open_beneath(root, sub).map_err(|e| format!("failed to prepare subPath {sub:?} of {}: {e}", root.display()))?;
    let is_dir =
        rustix::fs::fstat(&fd).map(|s| s.st_mode & libc::S_IFMT == libc::S_IFDIR).map_err(|e| e.to_string())?;
    if super::mounts::is_mountpoint(target) {
        // Pinned before (an agent restart, or a restarted container): the same inode.
        return Ok(target.to_path_buf());
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    let made = if is_dir { std::fs::create_dir_all(target) } else { std::fs::File::create(target).map(drop) };
    made.map_err(|e| format!("creating {}: {e}", target.display()))?;
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    nix::mount::mount(Some(proc_path.as_str()), target, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| format!("pinning subPath {sub:?}: {e}"))?;
    Ok(target.to_path_buf())
}

/// Opens `sub` with every step resolved beneath `root`; missing directories are made on the way with the volume
/// root's mode, setgid and sticky bits included, whatever the umask (upstream: so that an fsGroup volume's group
/// can write into a subPath the kubelet made; its owner is the agent, its group the root's when that is setgid).
fn open_beneath(root: &Path, sub: &str) -> std::io::Result<OwnedFd> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    let root_fd = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let mode = Mode::from_raw_mode(rustix::fs::fstat(&root_fd)?.st_mode & 0o7777);
    let mut done = PathBuf::new();
    let parts: Vec<&str> = sub.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    for (i, part) in parts.iter().enumerate() {
        done.push(part);
        let last = i + 1 == parts.len();
        match rustix::fs::openat2(root_fd.as_fd(), &done, OFlags::PATH | OFlags::CLOEXEC, Mode::empty(), resolve) {
            Ok(fd) if last => return Ok(fd),
            Ok(_) => {}
            Err(rustix::io::Errno::NOENT) => {
                // The parent was checked: make this step in it, without following anything.
                let parent = if i == 0 {
                    rustix::fs::openat2(
                        root_fd.as_fd(),
                        ".",
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                        resolve,
                    )?
                } else {
                    let up = done.parent().unwrap_or(Path::new("."));
                    rustix::fs::openat2(
                        root_fd.as_fd(),
                        up,
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                        resolve,
                    )?
                };
                match rustix::fs::mkdirat(parent.as_fd(), *part, mode) {
                    Ok(()) => {
                        // mkdir leaves out what the umask takes and the setgid and sticky bits: set them on the
                        // directory itself (opened without following anything), not on a path.
                        let made = rustix::fs::openat2(
                            root_fd.as_fd(),
                            &done,
                            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                            resolve,
                        )?;
                        rustix::fs::fchmod(&made, mode)?;
                    }
                    Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                if last {
                    return Ok(rustix::fs::openat2(
                        root_fd.as_fd(),
                        &done,
                        OFlags::PATH | OFlags::CLOEXEC,
                        Mode::empty(),
                        resolve,
                    )?);
                }
            }
            Err(rustix::io::Errno::XDEV) => {
                return Err(std::io::Error::other(format!("{} leads outside the volume", done.display())));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(root_fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_as_upstream() {
        let env = vec![("POD".to_string(), "web-0".to_string())];
        assert_eq!(expand("logs/$(POD)", &env), "logs/web-0");
        assert_eq!(expand("$$(POD)", &env), "$(POD)");
        assert_eq!(expand("$(NOPE)/x", &env), "$(NOPE)/x");
        assert_eq!(expand("a$b", &env), "a$b");
        assert_eq!(expand("$(POD", &env), "$(POD");
    }

    #[test]
    fn escaping_sub_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir_all(vol.join("inside")).unwrap();
        std::fs::write(vol.join("..data_file"), "ok").unwrap();
        std::os::unix::fs::symlink("/etc", vol.join("escape")).unwrap();
        std::os::unix::fs::symlink("../..", vol.join("inside/up")).unwrap();
        std::os::unix::fs::symlink("..data_file", vol.join("key")).unwrap();
        assert!(open_beneath(&vol, "escape").is_err());
        assert!(open_beneath(&vol, "escape/passwd").is_err());
        assert!(open_beneath(&vol, "inside/up/vol").is_err());
        // A symlink that stays inside (a configMap key's) is followed.
        assert!(open_beneath(&vol, "key").is_ok());
        // Missing directories are made.
        open_beneath(&vol, "new/deeper").unwrap();
        assert!(vol.join("new/deeper").is_dir());
        // They get the volume's mode, special bits too, whatever the umask (upstream's fsGroup subPath spec:
        // `dgtrwxrwxrwx` below a setgid, sticky tmpfs root).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o3777)).unwrap();
        open_beneath(&vol, "made/here").unwrap();
        for made in ["made", "made/here"] {
            let mode = std::fs::metadata(vol.join(made)).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o3777, "{made}: {mode:o}");
        }
        let m = VolumeMount { sub_path: Some("../x".into()), ..Default::default() };
        assert!(sub_path(&m, &[]).unwrap_err().contains("must not contain '..'"));
        let m = VolumeMount { sub_path: Some("/x".into()), ..Default::default() };
        assert!(sub_path(&m, &[]).is_err());
    }
}
