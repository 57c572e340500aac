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

/// True when `path` is a mount point.
pub fn is_mountpoint(path: &Path) -> bool {
    under(path).iter().any(|p| p == path)
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
