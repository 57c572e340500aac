//! The host's devices, for privileged containers: containerd gives a privileged container every character and
//! block device of the host's `/dev` (created in its own `/dev`, with the host's numbers, mode and owner), and the
//! device cgroup allows them all.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde_json::{Value, json};

/// Directories of `/dev` that are not devices the container should get (containerd's list): mounts of their
/// own in the container, or runtime bookkeeping.
const SKIPPED_DIRS: &[&str] = &["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"];

/// How deep below `/dev` devices are looked for (`/dev/net/tun`, `/dev/dri/by-path/...` are shallow; a bound
/// keeps a symlink loop or an odd mount from turning a container start into a long walk).
const MAX_DEPTH: usize = 4;

/// The OCI `linux.devices` entries of the host's devices below `dev`.
pub fn host_devices(dev: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    walk(dev, 0, &mut out);
    out
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<Value>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        // Not followed: a symlink is not a device node (and may point anywhere).
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let kind = meta.file_type();
        if kind.is_dir() {
            let name = entry.file_name();
            if depth < MAX_DEPTH && !SKIPPED_DIRS.iter().any(|s| name == *s) {
                walk(&path, depth + 1, out);
            }
            continue;
        }
        // The console is the container's own (its terminal), never the host's.
        if path == Path::new("/dev/console") {
            continue;
        }
        let type_ = if kind.is_char_device() {
            "c"
        } else if kind.is_block_device() {
            "b"
        } else {
            continue;
        };
        let rdev = meta.rdev();
        out.push(json!({
            "path": path,
            "type": type_,
            "major": libc::major(rdev),
            "minor": libc::minor(rdev),
            "fileMode": meta.mode() & 0o7777,
            "uid": meta.uid(),
            "gid": meta.gid(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_char_devices_are_listed_with_their_numbers() {
        let devices = host_devices(Path::new("/dev"));
        let null = devices.iter().find(|d| d["path"] == "/dev/null").expect("/dev/null is a device");
        assert_eq!(
            (null["type"].as_str(), null["major"].as_u64(), null["minor"].as_u64()),
            (Some("c"), Some(1), Some(3))
        );
        assert!(
            devices
                .iter()
                .all(|d| d["path"] != "/dev/console" && !d["path"].as_str().unwrap().starts_with("/dev/pts/"))
        );
        // The entries are what the OCI spec takes.
        let parsed: Vec<oci_spec::runtime::LinuxDevice> = serde_json::from_value(Value::Array(devices)).unwrap();
        assert!(!parsed.is_empty());
    }

    #[test]
    fn a_directory_without_devices_gives_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "x").unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.path().join("link")).unwrap();
        assert!(host_devices(dir.path()).is_empty());
    }
}
