//! What the runtime persists per container to find it again after an agent restart, written atomically (temp
//! file, rename): an agent crash at any point leaves the old record or the new one, never half. Not fsynced: the
//! page cache outlives the agent process, and a power loss takes the containers with it anyway (a record that
//! outlived its container is cleaned up by `Runtime::list`); an fsync per container start costs milliseconds.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;

/// Everything needed to manage a container that this process did not create.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// Container ID.
    pub id: String,
    /// PID of the container's init.
    pub pid: i32,
    /// The init's start time (field 22 of `/proc/<pid>/stat`), which tells a live init from a reused PID.
    pub start_time: u64,
    /// The cgroup path given in the spec.
    pub cgroups_path: String,
    /// The OCI bundle directory.
    pub bundle: PathBuf,
    /// Inodes of the stdout and stderr pipes, to relay its output again after an agent restart.
    #[serde(default)]
    pub output: Option<(u64, u64)>,
}

/// Start time of `pid` in clock ticks since boot, if it is alive.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Writes `bytes` to `path` atomically with respect to crashes of this process.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    let err = |source| RuntimeError::State { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

impl Record {
    /// Saves the record as `<dir>/<id>.json`.
    pub fn save(&self, dir: &Path) -> Result<(), RuntimeError> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| RuntimeError::State { path: dir.to_path_buf(), source: std::io::Error::other(e) })?;
        write_atomic(&dir.join(format!("{}.json", self.id)), &bytes)
    }

    /// Loads every record in `dir`; leftover temp files and unreadable records (from a crash or a bug) are
    /// removed with a warning rather than trusted.
    pub fn load_all(dir: &Path) -> Vec<Record> {
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let parsed = (path.extension().is_some_and(|e| e == "json"))
                .then(|| std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok()))
                .flatten();
            match parsed {
                Some(r) => out.push(r),
                None => {
                    tracing::warn!(path = %path.display(), "removing unreadable runtime record");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        out
    }

    /// Removes the record of `id`.
    pub fn remove(dir: &Path, id: &str) {
        let _ = std::fs::remove_file(dir.join(format!("{id}.json")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let r = Record {
            id: "c1".into(),
            pid: 42,
            start_time: 7,
            cgroups_path: "/x".into(),
            bundle: "/b".into(),
            output: Some((3, 4)),
        };
        r.save(dir.path()).unwrap();
        std::fs::write(dir.path().join("c2.json"), b"{ half a rec").unwrap();
        std::fs::write(dir.path().join("c3.tmp"), b"leftover").unwrap();
        assert_eq!(Record::load_all(dir.path()), vec![r]);
        assert!(!dir.path().join("c2.json").exists());
        assert!(!dir.path().join("c3.tmp").exists());
    }

    #[test]
    fn start_time_of_self_is_stable_and_absent_for_dead_pids() {
        let me = std::process::id().cast_signed();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(me), start_time(me));
        assert_eq!(start_time(i32::MAX), None);
    }
}
