//! The host mounts volumes need: tmpfs for memory-backed volumes, and finding and removing every mount below a
//! pod's volume directory (also those a previous agent process left).

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// Mount points in this mount namespace at or below `dir`, deepest first (so that they can be unmounted in order).
pub fn under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Checks that the mount holding `source` propagates as a `HostToContainer` (shared or slave) or
/// `Bidirectional` (shared) volume needs, with the CRI runtimes' message when it does not.
pub fn check_propagation(source: &Path, bidirectional: bool) -> Result<(), String> {
    let path = std::fs::canonicalize(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let (mount_point, optional) =
        holding_mount(&text, &path).ok_or_else(|| format!("no mount holds {}", path.display()))?;
    let shared = optional.iter().any(|o| o.starts_with("shared:"));
    let slave = optional.iter().any(|o| o.starts_with("master:"));
    match (bidirectional, shared, slave) {
        (true, true, _) | (false, true, _) | (false, _, true) => Ok(()),
        (true, _, _) => Err(format!(
            "path {:?} is mounted on {:?} but it is not a shared mount",
            path.display().to_string(),
            mount_point
        )),
        (false, _, _) => Err(format!(
            "path {:?} is mounted on {:?} but it is not a shared or slave mount",
            path.display().to_string(),
            mount_point
        )),
    }
}

/// The mount point (the longest that holds `path`) and its optional fields (`shared:N`, `master:N`...).
fn holding_mount(mountinfo: &str, path: &Path) -> Option<(String, Vec<String>)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let mount_point = unescape(fields.get(4)?);
            let optional = fields.get(6..)?.iter().take_while(|f| **f != "-").map(|f| f.to_string()).collect();
            Some((mount_point, optional))
        })
        .filter(|(mp, _)| path.starts_with(mp))
        .max_by_key(|(mp, _)| mp.len())
}

/// True when `path` is a mount point.
pub fn is_mountpoint(path: &Path) -> bool {
    use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};
    // statx's mount-root attribute (Linux 5.8): one syscall, where mountinfo is rendered whole (every overlay's
    // options) and pods' workers ask every minute for their tmpfs volumes.
    let flags = AtFlags::NO_AUTOMOUNT | AtFlags::SYMLINK_NOFOLLOW;
    match rustix::fs::statx(rustix::fs::CWD, path, flags, StatxFlags::empty()) {
        Ok(s) if s.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) => {
            s.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
        }
        Ok(_) | Err(rustix::io::Errno::NOSYS) => under(path).iter().any(|p| p == path),
        Err(_) => false,
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if b[i] == b'\\'
            && let Some(d) = octal
        {
            out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')));
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mounts a tmpfs at `dir` unless one is there already (after an agent restart: a running container's files stay,
/// nothing is remounted over them). `size` in bytes; `mode` of its root.
pub fn ensure_tmpfs(dir: &Path, size: Option<u64>, mode: u32) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    if is_mountpoint(dir) {
        return Ok(());
    }
    let mut data = format!("mode={mode:o}");
    if let Some(size) = size {
        data.push_str(&format!(",size={size}"));
    }
    nix::mount::mount(Some("tmpfs"), dir, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(data.as_str()))
        .map_err(io::Error::from)
}

/// Unmounts everything at or below `dir` (lazily: a mount a process still uses goes once it lets go) and
/// checks that nothing is left.
pub fn unmount_all(dir: &Path) -> io::Result<()> {
    for mount in under(dir) {
        if let Err(e) = nix::mount::umount2(&mount, MntFlags::MNT_DETACH)
            && e != nix::errno::Errno::EINVAL
        {
            return Err(io::Error::other(format!("unmounting {}: {e}", mount.display())));
        }
    }
    match under(dir).first() {
        Some(left) => Err(io::Error::other(format!("{} is still mounted", left.display()))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mount_holding_a_path_and_its_propagation() {
        let info = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    30 22 0:40 / /var/lib rw shared:5 master:2 - tmpfs tmpfs rw\n\
                    31 22 0:41 / /data rw - tmpfs tmpfs rw\n";
        let (mp, optional) = holding_mount(info, Path::new("/var/lib/kubelet/x")).unwrap();
        assert_eq!((mp.as_str(), optional), ("/var/lib", vec!["shared:5".to_string(), "master:2".to_string()]));
        let (mp, optional) = holding_mount(info, Path::new("/data/y")).unwrap();
        assert_eq!((mp.as_str(), optional.len()), ("/data", 0));
        assert_eq!(holding_mount(info, Path::new("/etc")).unwrap().0, "/");
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/end\\"), "/end\\");
    }

    #[test]
    fn tmpfs_mounted_once_and_removed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let vol = dir.path().join("v");
        ensure_tmpfs(&vol, Some(1 << 20), 0o755).unwrap();
        std::fs::write(vol.join("f"), "kept").unwrap();
        // A second call (an agent restart) does not hide the first tmpfs's files.
        ensure_tmpfs(&vol, Some(1 << 20), 0o755).unwrap();
        assert_eq!(std::fs::read_to_string(vol.join("f")).unwrap(), "kept");
        assert_eq!(under(dir.path()), vec![vol.clone()]);
        unmount_all(dir.path()).unwrap();
        assert!(under(dir.path()).is_empty());
        assert!(!vol.join("f").exists());
    }
}
