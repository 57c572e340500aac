//! Upstream's atomic writer: the files of a configMap, secret, downwardAPI or projected volume change all at
//! once, so that a reader never sees a mix of old and new files.
//!
//! Layout (the same as upstream's, which tools in containers rely on):
//! ```text
//! <dir>/..2026_12_01_09_30_00.123456789/   the payload, written in full before it is published
//! <dir>/..data -> ..2026_12_01_09_30_00.123456789   swapped by rename(2): the one atomic step
//! <dir>/<key> -> ..data/<key>                         one per top-level name the user sees
//! ```
//!
//! Crash rules: until `..data` is swapped, the old payload is what readers see (a half-written timestamped
//! directory is invisible and removed by the next write); after the swap, only stale names and the old
//! directory remain, both removed by the next write too. A write that finds the same payload changes nothing.
//!
//! Threat model: `dir` belongs to the agent and is mounted read-only into containers, so no container can plant
//! symlinks in it; payload paths come from the API (keys, `items[].path`) and are checked here anyway (relative,
//! no `..`, no `..`-prefixed first element, which would collide with the layout's own names).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use jiff::Timestamp;

const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// One file of a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProjection {
    pub data: Vec<u8>,
    pub mode: u32,
}

/// Relative path -> file.
pub type Payload = BTreeMap<String, FileProjection>;

/// Checks a payload path as upstream does (`validatePath`).
pub fn validate_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("invalid path: must not be empty".into());
    }
    if path.len() > 4096 {
        return Err(format!("invalid path: must be less than or equal to 4096 characters: {path:?}"));
    }
    let p = Path::new(path);
    if p.is_absolute() {
        return Err(format!("invalid path: must be relative path: {path}"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("invalid path: must not contain '..': {path}"));
    }
    if path.starts_with("..") {
        return Err(format!("invalid path: must not start with '..': {path}"));
    }
    Ok(())
}

/// Writes `payload` into `dir` (created if missing); `group`: chown every file and directory to this group
/// (fsGroup). Returns whether anything changed.
pub fn write(dir: &Path, payload: &Payload, group: Option<u32>) -> io::Result<bool> {
    for path in payload.keys() {
        validate_path(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    }
    fs::create_dir_all(dir)?;
    let old = fs::read_link(dir.join(DATA)).ok();
    if let Some(old) = &old
        && same_payload(&dir.join(old), payload)
    {
        remove_stale(dir, old, payload)?;
        return Ok(false);
    }
    let name = timestamped_name();
    let fresh = dir.join(&name);
    fs::create_dir(&fresh)?;
    write_payload(&fresh, payload, group)?;
    sync_dir(&fresh)?;
    let tmp = dir.join(DATA_TMP);
    let _ = fs::remove_file(&tmp);
    symlink(&name, &tmp)?;
    fs::rename(&tmp, dir.join(DATA))?;
    for top in top_level(payload) {
        let link = dir.join(&top);
        if fs::symlink_metadata(&link).is_err() {
            symlink(Path::new(DATA).join(&top), &link)?;
        }
    }
    sync_dir(dir)?;
    remove_stale(dir, Path::new(&name), payload)?;
    Ok(true)
}

/// `..YYYY_MM_DD_HH_MM_SS.<nanoseconds>`: unique per write (one writer per directory).
fn timestamped_name() -> String {
    let now = Timestamp::now();
    let date = now.strftime("%Y_%m_%d_%H_%M_%S");
    format!("..{date}.{:09}", now.subsec_nanosecond())
}

/// The first path element of every file, the names users see at the top of the volume.
fn top_level(payload: &Payload) -> std::collections::BTreeSet<String> {
    payload.keys().filter_map(|p| p.split('/').find(|s| !s.is_empty() && *s != ".")).map(str::to_owned).collect()
}

fn write_payload(root: &Path, payload: &Payload, group: Option<u32>) -> io::Result<()> {
    for (path, file) in payload {
        let target = root.join(path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
            let mut dir = parent;
            while dir != root {
                chgrp(dir, group, 0o755 | if group.is_some() { 0o2000 } else { 0 })?;
                dir = dir.parent().unwrap_or(root);
            }
        }
        let mut f = fs::File::create(&target)?;
        f.write_all(&file.data)?;
        f.sync_all()?;
        drop(f);
        chgrp(&target, group, file.mode)?;
    }
    chgrp(root, group, 0o755 | if group.is_some() { 0o2000 } else { 0 })
}

/// Sets the mode and, with an fsGroup, the group (upstream adds group read to a read-only volume's files).
fn chgrp(path: &Path, group: Option<u32>, mode: u32) -> io::Result<()> {
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid))?;
            mode | 0o440
        }
        None => mode,
    };
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
}

/// True when `dir` holds exactly `payload` (same files, bytes and modes).
fn same_payload(dir: &Path, payload: &Payload) -> bool {
    let mut found = Vec::new();
    if list_files(dir, dir, &mut found).is_err() || found.len() != payload.len() {
        return false;
    }
    payload.iter().all(|(path, file)| {
        let p = dir.join(path);
        let mode_ok = fs::metadata(&p).is_ok_and(|m| m.permissions().mode() & 0o777 == file.mode & 0o777);
        mode_ok && fs::read(&p).is_ok_and(|d| d == file.data)
    })
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            list_files(root, &entry.path(), out)?;
        } else {
            out.push(entry.path().strip_prefix(root).unwrap_or(&entry.path()).to_path_buf());
        }
    }
    Ok(())
}

/// Removes timestamped directories other than `current` and user-visible links no longer in the payload.
fn remove_stale(dir: &Path, current: &Path, payload: &Payload) -> io::Result<()> {
    let keep = top_level(payload);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == DATA || Path::new(&name) == current {
            continue;
        }
        let kind = entry.file_type()?;
        if name.starts_with("..") {
            if kind.is_dir() {
                fs::remove_dir_all(entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        } else if kind.is_symlink() && !keep.contains(&name) {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn payload(pairs: &[(&str, &str)]) -> Payload {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), FileProjection { data: v.as_bytes().to_vec(), mode: 0o644 }))
            .collect()
    }

    #[test]
    fn layout_is_upstreams() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write(dir.path(), &payload(&[("a", "1"), ("sub/b", "2")]), None).unwrap());
        assert_eq!(fs::read_link(dir.path().join("a")).unwrap(), Path::new("..data/a"));
        assert_eq!(fs::read_link(dir.path().join("sub")).unwrap(), Path::new("..data/sub"));
        let data = fs::read_link(dir.path().join("..data")).unwrap();
        assert!(data.to_string_lossy().starts_with("..20"), "{data:?}");
        assert_eq!(fs::read_to_string(dir.path().join("sub/b")).unwrap(), "2");
        // The same payload again: nothing changes.
        assert!(!write(dir.path(), &payload(&[("a", "1"), ("sub/b", "2")]), None).unwrap());
        assert_eq!(fs::read_link(dir.path().join("..data")).unwrap(), data);
        // A key gone: its link goes; the old directory goes.
        assert!(write(dir.path(), &payload(&[("a", "3")]), None).unwrap());
        assert!(fs::symlink_metadata(dir.path().join("sub")).is_err());
        assert!(!dir.path().join(&data).exists());
        let names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn modes_and_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = payload(&[("secret", "x")]);
        p.get_mut("secret").unwrap().mode = 0o400;
        write(dir.path(), &p, None).unwrap();
        assert_eq!(fs::metadata(dir.path().join("secret")).unwrap().permissions().mode() & 0o777, 0o400);
        for bad in ["/abs", "../up", "a/../../b", "..hidden", ""] {
            assert!(write(dir.path(), &payload(&[(bad, "x")]), None).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_half_written_update_is_invisible_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &payload(&[("a", "old")]), None).unwrap();
        // A crash after the new directory was written, before the swap.
        fs::create_dir(dir.path().join("..2000_01_01_00_00_00.000000001")).unwrap();
        fs::write(dir.path().join("..2000_01_01_00_00_00.000000001/a"), "half").unwrap();
        assert_eq!(fs::read_to_string(dir.path().join("a")).unwrap(), "old");
        write(dir.path(), &payload(&[("a", "new")]), None).unwrap();
        assert!(!dir.path().join("..2000_01_01_00_00_00.000000001").exists());
    }

    #[test]
    fn a_reader_never_sees_a_mix() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        write(&root, &payload(&[("a", "0"), ("b", "0")]), None).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (root, stop) = (root.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    // Read both through one resolution of ..data, as a reader of a consistent snapshot does.
                    let Ok(target) = fs::read_link(root.join("..data")) else { continue };
                    let (Ok(a), Ok(b)) = (
                        fs::read_to_string(root.join(&target).join("a")),
                        fs::read_to_string(root.join(&target).join("b")),
                    ) else {
                        continue; // the directory was already replaced and removed: read again
                    };
                    assert_eq!(a, b, "a mix of two updates");
                    reads += 1;
                }
                reads
            })
        };
        for i in 1..200 {
            let v = i.to_string();
            write(&root, &payload(&[("a", &v), ("b", &v)]), None).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }
}
