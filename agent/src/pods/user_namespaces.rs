//! The user namespace manager (upstream's `pkg/kubelet/userns`): each pod with `hostUsers: false` gets a range
//! of `idsPerPod` node ids of its own (65536 by default), disjoint from every other pod's, which its user
//! namespace maps its ids `0..idsPerPod` onto.
//!
//! Where the ranges come from (upstream's rules): if the node has a `kubelet` user, its one entry in
//! `/etc/subuid` (identical in `/etc/subgid`); else ids from `idsPerPod` up to 2^32. The first id must be a
//! multiple of `idsPerPod` and at least `idsPerPod` (the node's own ids `0..idsPerPod` are never handed out), and
//! there must be room for `maxPods` ranges. Free ranges are taken lowest first (upstream picks at random; which
//! free one a pod gets does not matter).
//!
//! Crash rules: a pod's range is written to `<root-dir>/pods/<uid>/userns` (upstream's file and JSON) before its
//! sandbox is made with it (temp file, fsync, rename, fsync of the directory), and read back at startup, so a
//! restarted agent neither hands a live pod's range to another nor loses it. A file that does not parse, or
//! whose range is not one this node hands out or is another pod's, is an error for that pod (it is not started
//! on a range it may share), never silently replaced. A range is released when its pod is torn down (the file
//! goes) or is found on disk without a pod.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nodelet_runtime::IdMapping;
use serde::{Deserialize, Serialize};

use crate::config::USERNS_UNIT;

/// The file in a pod's directory.
pub const FILE: &str = "userns";

/// The user namespace manager.
#[derive(Debug)]
pub struct UserNamespaces {
    pods_dir: PathBuf,
    ids_per_pod: u32,
    /// Range index (id / ids_per_pod) of the first range handed out, and how many there are.
    first: u32,
    count: u32,
    /// Why pods cannot have a user namespace on this node, if they cannot.
    unsupported: Option<String>,
    used: Mutex<Used>,
}

#[derive(Debug, Default)]
struct Used {
    by_pod: HashMap<String, u32>,
    ranges: BTreeSet<u32>,
}

/// Upstream's file: one mapping for uids and the same for gids, container id 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Persisted {
    uid_mappings: Vec<Mapping>,
    gid_mappings: Vec<Mapping>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Mapping {
    host_id: u32,
    container_id: u32,
    length: u32,
}

impl UserNamespaces {
    /// A manager handing out ranges of `ids_per_pod` from `(first id, length)` (see [`kubelet_mappings`]), for up
    /// to `max_pods` pods; `unsupported` says why this node cannot run such pods at all. Reads back the ranges of
    /// the pods on disk.
    pub fn new(
        pods_dir: &Path,
        ids_per_pod: u32,
        mappings: (u32, u32),
        max_pods: u32,
        unsupported: Option<String>,
    ) -> Result<Self, String> {
        let (first_id, length) = mappings;
        if ids_per_pod == 0 || !ids_per_pod.is_multiple_of(USERNS_UNIT) {
            return Err(format!("kubelet user namespace length {ids_per_pod} is not a multiple of {USERNS_UNIT}"));
        }
        if !first_id.is_multiple_of(ids_per_pod) {
            return Err(format!("kubelet user assigned ID {first_id} is not a multiple of {ids_per_pod}"));
        }
        if first_id < ids_per_pod {
            return Err(format!("kubelet user assigned ID {first_id} must be greater or equal to {ids_per_pod}"));
        }
        if !length.is_multiple_of(ids_per_pod) {
            return Err(format!("kubelet user assigned IDs length {length} is not a multiple of {ids_per_pod}"));
        }
        if length / ids_per_pod < max_pods {
            return Err(format!("kubelet user assigned IDs are not enough to support {max_pods} pods"));
        }
        let manager = UserNamespaces {
            pods_dir: pods_dir.to_path_buf(),
            ids_per_pod,
            first: first_id / ids_per_pod,
            count: length / ids_per_pod,
            unsupported,
            used: Mutex::default(),
        };
        for entry in std::fs::read_dir(pods_dir).into_iter().flatten().flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            match std::fs::read(entry.path().join(FILE)) {
                Ok(bytes) => {
                    if let Err(e) = manager.record(&uid, &bytes) {
                        // The pod will fail with this when it asks again; its range is not handed out meanwhile
                        // only if it parsed, so say so now.
                        tracing::error!(pod = %uid, error = %e, "a pod's user namespace file");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::error!(pod = %uid, error = %e, "reading a pod's user namespace file"),
            }
        }
        Ok(manager)
    }

    /// Whether this node can run pods in user namespaces (`status.runtimeHandlers[].features.userNamespaces`).
    pub fn supported(&self) -> bool {
        self.unsupported.is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Used> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pod's range: the one on disk, else a new one (written to disk before it is returned).
    pub fn get_or_create(&self, uid: &str) -> Result<IdMapping, String> {
        if let Some(why) = &self.unsupported {
            return Err(format!("can't set `spec.hostUsers: false`, runtime does not support user namespaces: {why}"));
        }
        let file = self.pods_dir.join(uid).join(FILE);
        match std::fs::read(&file) {
            Ok(bytes) => return self.record(uid, &bytes).map_err(|e| format!("user namespace: {e}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("user namespace: reading {}: {e}", file.display())),
        }
        let mut used = self.lock();
        let index = (self.first..self.first.saturating_add(self.count))
            .find(|i| !used.ranges.contains(i))
            .ok_or("create user namespace: could not find an empty slot to allocate a user namespace")?;
        let mapping = IdMapping { host_id: index * self.ids_per_pod, size: self.ids_per_pod };
        write_durably(&file, &encode(mapping)).map_err(|e| format!("create user namespace: {e}"))?;
        used.ranges.insert(index);
        used.by_pod.insert(uid.to_string(), index);
        Ok(mapping)
    }

    /// The pod's range, if it has one.
    pub fn get(&self, uid: &str) -> Option<IdMapping> {
        let index = *self.lock().by_pod.get(uid)?;
        Some(IdMapping { host_id: index * self.ids_per_pod, size: self.ids_per_pod })
    }

    /// Takes in a range read from a pod's file, with upstream's checks.
    fn record(&self, uid: &str, bytes: &[u8]) -> Result<IdMapping, String> {
        let mapping = decode(bytes)?;
        if mapping.size != self.ids_per_pod {
            return Err(format!("wrong user namespace length {}", mapping.size));
        }
        if !mapping.host_id.is_multiple_of(self.ids_per_pod) {
            return Err(format!("wrong user namespace offset specified {}", mapping.host_id));
        }
        let index = mapping.host_id / self.ids_per_pod;
        if index < self.first || index - self.first >= self.count {
            return Err(format!("id {} is out of range", mapping.host_id));
        }
        let mut used = self.lock();
        match used.by_pod.get(uid) {
            Some(had) if *had == index => return Ok(mapping),
            Some(_) => return Err(format!("different user namespace range already used by pod {uid:?}")),
            None if used.ranges.contains(&index) => return Err(format!("range picked for pod {uid:?} already taken")),
            None => {}
        }
        used.ranges.insert(index);
        used.by_pod.insert(uid.to_string(), index);
        Ok(mapping)
    }

    /// Releases the pod's range and removes its file (the pod is torn down).
    pub fn release(&self, uid: &str) {
        let mut used = self.lock();
        if let Some(index) = used.by_pod.remove(uid) {
            used.ranges.remove(&index);
        }
        let _ = std::fs::remove_file(self.pods_dir.join(uid).join(FILE));
    }

    /// The pods that hold a range now (for upstream's orphan cleanup: those of them without a pod are
    /// released once their sandboxes are gone).
    pub fn held(&self) -> Vec<String> {
        self.lock().by_pod.keys().cloned().collect()
    }
}

fn encode(m: IdMapping) -> Vec<u8> {
    let one = Mapping { host_id: m.host_id, container_id: 0, length: m.size };
    serde_json::to_vec(&Persisted { uid_mappings: vec![one], gid_mappings: vec![one] }).unwrap_or_default()
}

/// Upstream's checks of the file: one mapping, the same for uids and gids, container id 0.
fn decode(bytes: &[u8]) -> Result<IdMapping, String> {
    let p: Persisted =
        serde_json::from_slice(bytes).map_err(|e| format!("invalid user namespace mappings file: {e}"))?;
    if p.uid_mappings.len() != 1 {
        return Err("invalid user namespace configuration: no more than one mapping allowed.".into());
    }
    if p.uid_mappings != p.gid_mappings {
        return Err("invalid user namespace configuration: GID and UID mapping should be identical".into());
    }
    let m = p.uid_mappings[0];
    if m.container_id != 0 {
        return Err("invalid user namespace configuration: UID 0 must be mapped".into());
    }
    Ok(IdMapping { host_id: m.host_id, size: m.length })
}

/// Writes `bytes` to `path` so that after a crash it is either absent or whole, and stays after a power loss.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("no directory"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The node's ids for pods (upstream's `getKubeletMappings`): the `kubelet` user's subordinate ids if the user
/// exists (`passwd`, `subuid` and `subgid` are the files' texts), else `ids_per_pod..2^32`.
pub fn kubelet_mappings(passwd: &str, subuid: &str, subgid: &str, ids_per_pod: u32) -> Result<(u32, u32), String> {
    let user = passwd.lines().find_map(|l| {
        let mut fields = l.split(':');
        (fields.next() == Some("kubelet")).then(|| fields.nth(1).map(str::to_string)).flatten()
    });
    let Some(uid) = user else {
        return Ok((ids_per_pod, u32::try_from((1u64 << 32) - u64::from(ids_per_pod)).unwrap_or(u32::MAX)));
    };
    let entries = |text: &str| -> Vec<(u32, u32)> {
        text.lines()
            .filter_map(|l| {
                let mut f = l.trim().split(':');
                let (who, start, count) = (f.next()?, f.next()?, f.next()?);
                (who == "kubelet" || who == uid).then(|| Some((start.parse().ok()?, count.parse().ok()?))).flatten()
            })
            .collect()
    };
    let (uids, gids) = (entries(subuid), entries(subgid));
    if uids != gids {
        return Err("mismatched subuids and subgids for user \"kubelet\"".into());
    }
    match uids.as_slice() {
        [one] => Ok(*one),
        [] => Err("error retrieving additional uids for user \"kubelet\": no entry in /etc/subuid".into()),
        _ => Err("error retrieving additional uids for user \"kubelet\": more than one range".into()),
    }
}

/// [`kubelet_mappings`] from this node's files.
pub fn node_kubelet_mappings(ids_per_pod: u32) -> Result<(u32, u32), String> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    kubelet_mappings(&read("/etc/passwd"), &read("/etc/subuid"), &read("/etc/subgid"), ids_per_pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: (u32, u32) = (65536, u32::MAX - 65535);

    fn manager(dir: &Path) -> UserNamespaces {
        UserNamespaces::new(dir, 65536, DEFAULT, 110, None).unwrap()
    }

    #[test]
    fn pods_get_disjoint_ranges_that_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        let a = m.get_or_create("a").unwrap();
        let b = m.get_or_create("b").unwrap();
        assert_eq!(a, IdMapping { host_id: 65536, size: 65536 }, "the node's own ids 0..65536 are never handed out");
        assert_eq!(b.host_id, 131_072);
        assert_eq!(m.get_or_create("a").unwrap(), a, "asked again, the same range");
        let text = std::fs::read_to_string(dir.path().join("a").join(FILE)).unwrap();
        assert_eq!(
            text,
            r#"{"uidMappings":[{"hostId":65536,"containerId":0,"length":65536}],"gidMappings":[{"hostId":65536,"containerId":0,"length":65536}]}"#
        );
        // A restarted agent knows both, and hands a third pod a free range.
        let again = manager(dir.path());
        assert_eq!(again.get("a"), Some(a));
        assert_eq!(again.get("b"), Some(b));
        assert_eq!(again.get_or_create("c").unwrap().host_id, 196_608);
        // Released: the file goes, and the range is free again.
        again.release("a");
        assert!(!dir.path().join("a").join(FILE).exists());
        assert_eq!(again.get_or_create("d").unwrap(), a);
    }

    #[test]
    fn bad_or_colliding_files_are_errors_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        let a = m.get_or_create("a").unwrap();
        std::fs::create_dir_all(dir.path().join("x")).unwrap();
        std::fs::write(dir.path().join("x").join(FILE), "{not json").unwrap();
        assert!(m.get_or_create("x").unwrap_err().contains("invalid user namespace mappings file"));
        assert_eq!(std::fs::read_to_string(dir.path().join("x").join(FILE)).unwrap(), "{not json", "kept");
        // A second pod claiming a's range (a copied directory, a bug): refused.
        std::fs::create_dir_all(dir.path().join("y")).unwrap();
        std::fs::write(dir.path().join("y").join(FILE), encode(a)).unwrap();
        assert!(m.get_or_create("y").unwrap_err().contains("already taken"));
        // Ranges this node does not hand out.
        for (host_id, want) in [(0, "out of range"), (65537, "wrong user namespace offset")] {
            std::fs::write(dir.path().join("y").join(FILE), encode(IdMapping { host_id, size: 65536 })).unwrap();
            assert!(m.get_or_create("y").unwrap_err().contains(want), "{host_id}");
        }
        let differs = br#"{"uidMappings":[{"hostId":65536,"containerId":0,"length":65536}],"gidMappings":[{"hostId":131072,"containerId":0,"length":65536}]}"#;
        std::fs::write(dir.path().join("y").join(FILE), differs).unwrap();
        assert!(m.get_or_create("y").unwrap_err().contains("should be identical"));
    }

    #[test]
    fn the_node_limits_and_refuses_like_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let small = UserNamespaces::new(dir.path(), 65536, (65536, 65536 * 2), 2, None).unwrap();
        small.get_or_create("a").unwrap();
        small.get_or_create("b").unwrap();
        assert!(small.get_or_create("c").unwrap_err().contains("could not find an empty slot"));
        let new = |ids, mappings, max| UserNamespaces::new(dir.path(), ids, mappings, max, None).unwrap_err();
        assert!(new(65536, (65536, 65536), 2).contains("not enough to support 2 pods"));
        assert!(new(65536, (0, 65536 * 200), 2).contains("must be greater or equal to 65536"));
        assert!(new(65536, (65536 + 1, 65536 * 200), 2).contains("not a multiple of 65536"));
        assert!(new(1000, DEFAULT, 2).contains("is not a multiple of 65536"));
        let off = UserNamespaces::new(dir.path(), 65536, DEFAULT, 2, Some("no idmapped mounts".into())).unwrap();
        assert!(!off.supported());
        assert!(off.get_or_create("z").unwrap_err().contains("runtime does not support user namespaces"));
    }

    #[test]
    fn orphans_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let m = manager(dir.path());
        m.get_or_create("kept").unwrap();
        m.get_or_create("gone").unwrap();
        let mut held = m.held();
        held.sort();
        assert_eq!(held, ["gone", "kept"]);
        // The dispatcher releases those without a worker (after their sandboxes are removed).
        for uid in held.iter().filter(|u| *u != "kept") {
            m.release(uid);
        }
        assert!(m.get("kept").is_some() && m.get("gone").is_none());
        assert!(!dir.path().join("gone").join(FILE).exists());
    }

    #[test]
    fn the_kubelet_users_subordinate_ids_are_used_if_it_exists() {
        let passwd = "root:x:0:0::/root:/bin/sh\nkubelet:x:999:999::/:/usr/sbin/nologin\n";
        assert_eq!(kubelet_mappings("root:x:0:0::/:/bin/sh\n", "", "", 65536), Ok(DEFAULT));
        let sub = "kubelet:65536:7208960\n";
        assert_eq!(kubelet_mappings(passwd, sub, sub, 65536), Ok((65536, 7_208_960)));
        assert_eq!(kubelet_mappings(passwd, "999:131072:65536\n", "999:131072:65536\n", 65536), Ok((131_072, 65536)));
        assert!(kubelet_mappings(passwd, sub, "kubelet:1:2\n", 65536).unwrap_err().contains("mismatched"));
        assert!(kubelet_mappings(passwd, "", "", 65536).unwrap_err().contains("no entry"));
    }
}
