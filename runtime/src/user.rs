//! The container's process user: `runAsUser`/`runAsGroup` and the image's `User`, with names resolved in the
//! container's own `/etc/passwd` and `/etc/group`.
//!
//! Threat model: the root filesystem is the image's, and the image is anyone's who may create a pod. Its
//! `/etc/passwd` may be a symlink to the host's files or to `/dev/zero`, a FIFO that never delivers, a device, or
//! gigabytes long. So the databases are opened with `openat2(RESOLVE_IN_ROOT)` (every symlink, absolute or `..`,
//! resolves inside the rootfs, as it would for the container; magic links refused), without blocking
//! (`O_NONBLOCK`: a FIFO opens at once), accepted only as regular files, and read up to [`MAX_DATABASE_BYTES`].
//! Anything else is a [`SpecError::UserDatabase`] that names the file: the container fails to be created with a
//! clear reason, and the agent neither hangs nor grows.

use std::io::Read;
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::config::ContainerConfig;
use crate::error::SpecError;

/// The largest `/etc/passwd` or `/etc/group` read (real ones are kilobytes; distributions' largest a few hundred).
pub const MAX_DATABASE_BYTES: u64 = 4 << 20;

/// The user the process runs as: `runAsUser`/`runAsGroup` win over the image's `User`; names are resolved in the
/// container's `/etc/passwd` and `/etc/group`, and the user's groups there are added like containerd does
/// (unless `supplementalGroupsPolicy` is `Strict`).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ProcessUser {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// All the process's groups, as containerd lists them and the kubelet reports them
    /// (`status.containerStatuses[].user.linux.supplementalGroups`): the primary gid, the user's groups in the
    /// image's `/etc/group`, then `fsGroup` and `supplementalGroups`; each once.
    pub additional_gids: Vec<u32>,
}

/// Resolves the process user against the container's root filesystem.
pub fn resolve_user(cfg: &ContainerConfig) -> Result<ProcessUser, SpecError> {
    let passwd = read_db(&cfg.rootfs, "etc/passwd")?;
    let group = read_db(&cfg.rootfs, "etc/group")?;
    let image_user = cfg.image.user.as_deref().unwrap_or("").trim();
    let (user_part, group_part) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    // (uid, primary gid, name) from runAsUser or the image user.
    let (uid, mut gid, name) = match cfg.security.run_as_user {
        Some(uid) => {
            let entry = passwd.iter().find(|e| e.get(2).and_then(|s| s.parse().ok()) == Some(uid));
            (uid, entry.and_then(|e| e.get(3)?.parse().ok()).unwrap_or(0), entry.map(|e| e[0].clone()))
        }
        None if user_part.is_empty() => (0, 0, Some("root".to_string())),
        None => match user_part.parse::<u32>() {
            Ok(uid) => {
                let entry = passwd.iter().find(|e| e.get(2).and_then(|s| s.parse().ok()) == Some(uid));
                (uid, entry.and_then(|e| e.get(3)?.parse().ok()).unwrap_or(0), entry.map(|e| e[0].clone()))
            }
            Err(_) => {
                let entry = passwd
                    .iter()
                    .find(|e| e[0] == user_part)
                    .ok_or_else(|| SpecError::UnknownUser(user_part.to_string()))?;
                let uid = entry
                    .get(2)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| SpecError::UnknownUser(user_part.into()))?;
                (uid, entry.get(3).and_then(|s| s.parse().ok()).unwrap_or(0), Some(user_part.to_string()))
            }
        },
    };
    if let Some(g) = group_part.filter(|g| !g.is_empty() && cfg.security.run_as_user.is_none()) {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .iter()
                .find(|e| e[0] == g)
                .and_then(|e| e.get(2)?.parse().ok())
                .ok_or_else(|| SpecError::UnknownGroup(g.to_string()))?,
        };
    }
    if let Some(g) = cfg.security.run_as_group {
        gid = g;
    }
    let mut additional_gids: Vec<u32> = vec![gid];
    if let Some(name) = name.as_ref().filter(|_| !cfg.security.strict_supplemental_groups) {
        for e in &group {
            if e.get(3).is_some_and(|members| members.split(',').any(|m| m == name))
                && let Some(g) = e.get(2).and_then(|s| s.parse().ok())
            {
                additional_gids.push(g);
            }
        }
    }
    additional_gids.extend(&cfg.security.supplemental_groups);
    let mut seen = std::collections::HashSet::new();
    additional_gids.retain(|g| seen.insert(*g));
    Ok(ProcessUser { uid, gid, additional_gids })
}

/// An `/etc/passwd`-style file of the rootfs as fields per line; a missing file is empty (distroless images have
/// none). See the module's threat model.
fn read_db(rootfs: &Path, rel: &str) -> Result<Vec<Vec<String>>, SpecError> {
    let fail = |reason: String| SpecError::UserDatabase { path: format!("/{rel}"), reason };
    let Some(text) = read_in_root(rootfs, rel).map_err(fail)? else { return Ok(Vec::new()) };
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect())
}

/// Reads `rel` with every path component resolved inside `root`: `None` when it does not exist; an error when it
/// is not a regular file or is larger than [`MAX_DATABASE_BYTES`].
fn read_in_root(root: &Path, rel: &str) -> Result<Option<String>, String> {
    let dir = match rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(dir) => dir,
        // No root filesystem to look in (a spec built without one): no database either.
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(format!("opening the root filesystem: {e}")),
    };
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let fd = match rustix::fs::openat2(&dir, rel, flags, Mode::empty(), resolve) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => return Ok(None),
        Err(e) => return Err(format!("opening it: {e}")),
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| format!("stat: {e}"))?;
    let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
    if kind != rustix::fs::FileType::RegularFile {
        return Err(format!("not a regular file ({kind:?})"));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_DATABASE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading it: {e}"))?;
    if bytes.len() as u64 > MAX_DATABASE_BYTES {
        return Err(format!("larger than {} MiB", MAX_DATABASE_BYTES >> 20));
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ContainerConfig {
        ContainerConfig { command: vec!["sh".into()], ..Default::default() }
    }

    #[test]
    fn users_resolve_against_the_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), "root:x:0:0::/:/bin/sh\nweb:x:33:44::/:/bin/sh\n").unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nwww:x:44:\nstaff:x:50:web,other\n").unwrap();
        let mut c = cfg();
        c.rootfs = dir.path().to_path_buf();
        let user = |c: &ContainerConfig| resolve_user(c).unwrap();
        assert_eq!(user(&c), ProcessUser { uid: 0, gid: 0, additional_gids: vec![0] });
        c.image.user = Some("web".into());
        assert_eq!(user(&c), ProcessUser { uid: 33, gid: 44, additional_gids: vec![44, 50] });
        c.image.user = Some("web:root".into());
        assert_eq!(user(&c).gid, 0);
        c.image.user = Some("1234:5678".into());
        assert_eq!(user(&c), ProcessUser { uid: 1234, gid: 5678, additional_gids: vec![5678] });
        c.image.user = Some("web".into());
        c.security.run_as_user = Some(7);
        c.security.supplemental_groups = vec![9, 9];
        assert_eq!(user(&c), ProcessUser { uid: 7, gid: 0, additional_gids: vec![0, 9] });
        // Merge (the default) adds the image's groups of the user before the pod's; Strict only the pod's.
        c.security.run_as_user = Some(33);
        c.security.supplemental_groups = vec![60, 50];
        assert_eq!(user(&c), ProcessUser { uid: 33, gid: 44, additional_gids: vec![44, 50, 60] });
        c.security.strict_supplemental_groups = true;
        assert_eq!(user(&c), ProcessUser { uid: 33, gid: 44, additional_gids: vec![44, 60, 50] });
        c.security.strict_supplemental_groups = false;
        c.security.supplemental_groups.clear();
        c.security.run_as_user = None;
        c.image.user = Some("ghost".into());
        assert!(matches!(resolve_user(&c), Err(SpecError::UnknownUser(u)) if u == "ghost"));
        c.image.user = Some("web:nogroup".into());
        assert!(matches!(resolve_user(&c), Err(SpecError::UnknownGroup(g)) if g == "nogroup"));
    }

    /// A rootfs with `etc/`, and a container config on it asking for user `evil`.
    fn hostile() -> (tempfile::TempDir, ContainerConfig) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root/etc")).unwrap();
        let mut c = cfg();
        c.rootfs = dir.path().join("root");
        c.image.user = Some("evil".into());
        (dir, c)
    }

    fn database_error(c: &ContainerConfig) -> String {
        match resolve_user(c) {
            Err(e @ SpecError::UserDatabase { .. }) => e.to_string(),
            other => panic!("want a user database error, got {other:?}"),
        }
    }

    #[test]
    fn an_endless_device_is_refused_not_read() {
        let (_dir, c) = hostile();
        std::os::unix::fs::symlink("/dev/zero", c.rootfs.join("etc/passwd")).unwrap();
        // /dev/zero does not exist inside the rootfs: the symlink resolves there, not on the host.
        assert!(matches!(resolve_user(&c), Err(SpecError::UnknownUser(u)) if u == "evil"));
        std::fs::create_dir(c.rootfs.join("dev")).unwrap();
        nix::sys::stat::mknod(
            &c.rootfs.join("dev/zero"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 5),
        )
        .expect("mknod (needs root)");
        let message = database_error(&c);
        assert!(message.contains("/etc/passwd") && message.contains("not a regular file"), "{message}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let (_dir, c) = hostile();
        nix::unistd::mkfifo(&c.rootfs.join("etc/group"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        std::fs::write(c.rootfs.join("etc/passwd"), "evil:x:5:5::/:/bin/sh\n").unwrap();
        let message = database_error(&c);
        assert!(message.contains("/etc/group") && message.contains("not a regular file"), "{message}");
    }

    #[test]
    fn symlinks_resolve_inside_the_rootfs_never_on_the_host() {
        let (dir, c) = hostile();
        // A host file the image points at, absolutely and through `..`: neither is read.
        let host = dir.path().join("host-passwd");
        std::fs::write(&host, "evil:x:0:0::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(&host, c.rootfs.join("etc/passwd")).unwrap();
        assert!(matches!(resolve_user(&c), Err(SpecError::UnknownUser(u)) if u == "evil"));
        std::fs::remove_file(c.rootfs.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("../../host-passwd", c.rootfs.join("etc/passwd")).unwrap();
        assert!(matches!(resolve_user(&c), Err(SpecError::UnknownUser(u)) if u == "evil"));
        // The same file inside the rootfs is followed, as the container itself would.
        std::fs::write(c.rootfs.join("host-passwd"), "evil:x:5:6::/:/bin/sh\n").unwrap();
        assert_eq!(resolve_user(&c).unwrap(), ProcessUser { uid: 5, gid: 6, additional_gids: vec![6] });
    }

    #[test]
    fn an_oversized_database_is_refused() {
        let (_dir, c) = hostile();
        let file = std::fs::File::create(c.rootfs.join("etc/passwd")).unwrap();
        file.set_len(MAX_DATABASE_BYTES + 1).unwrap();
        let message = database_error(&c);
        assert!(message.contains("larger than 4 MiB"), "{message}");
    }
}
