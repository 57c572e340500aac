//! A container's root filesystem: an overlay mount of the image's unpacked layers (read-only lower dirs, top
//! layer first) with a per-container upper and work dir, under `<root-dir>/rootfs/<container-id>/`. The image
//! it uses is recorded there, so image GC never removes layers a container still runs on.
//!
//! In a pod's user namespace (`hostUsers: false`) the layers are idmapped into the pod's range (detached
//! idmapped trees, passed to overlayfs as `/proc/self/fd/N`; it keeps private clones), and the upper and work
//! dirs belong to the range's first id, as containerd does it: overlayfs itself cannot be idmapped, and what the
//! container writes (and copies up) is then owned by its own ids as the node sees them.

use std::fs;
use std::path::PathBuf;

use nix::mount::{MntFlags, MsFlags};

use super::digest::Digest;
use super::error::{ImageError, Result};
use super::store::{ImageRecord, Store, write_atomically};

/// The kernel limits mount options to one page.
const MAX_MOUNT_DATA: usize = 4095;

/// Creates and removes container rootfs mounts.
#[derive(Debug, Clone)]
pub struct Rootfs {
    dir: PathBuf,
}

impl Rootfs {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Rootfs> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| ImageError::io("create", &dir, e))?;
        Ok(Rootfs { dir })
    }

    fn container_dir(&self, id: &str) -> Result<PathBuf> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(ImageError::Mount { container: id.to_owned(), message: "invalid container id".into() });
        }
        Ok(self.dir.join(id))
    }

    /// Mounts the rootfs for container `id` from `image` and returns its path. Idempotent: an existing mount
    /// for the same container is reused (after an agent restart).
    pub fn prepare(
        &self,
        store: &Store,
        id: &str,
        image: &ImageRecord,
        userns: Option<&nodelet_runtime::idmap::PodUserNamespace>,
    ) -> Result<PathBuf> {
        let dir = self.container_dir(id)?;
        let merged = dir.join("merged");
        if crate::volumes::mounts::is_mountpoint(&merged) {
            return Ok(merged);
        }
        let mut lower = Vec::new();
        for chain_id in image.chain_ids().collect::<Vec<_>>().into_iter().rev() {
            let path = store.layer_path(chain_id);
            if !path.is_dir() {
                return Err(ImageError::Mount {
                    container: id.to_owned(),
                    message: format!("layer {chain_id} is not unpacked"),
                });
            }
            lower.push(path.display().to_string());
        }
        for sub in ["upper", "work", "merged"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(|e| ImageError::io("create", &path, e))?;
        }
        let mount_err = |message: String| ImageError::Mount { container: id.to_owned(), message };
        // Kept open until the overlay is mounted: its lower dirs are these trees.
        let mut trees = Vec::new();
        if let Some(userns) = userns {
            let file = fs::File::open(&userns.file)
                .map_err(|e| mount_err(format!("opening the pod's user namespace: {e}")))?;
            for layer in &mut lower {
                let tree = nodelet_runtime::idmap::idmapped_tree(std::path::Path::new(layer), &file, false)
                    .map_err(|e| mount_err(format!("idmapping layer {layer}: {e}")))?;
                *layer = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&tree));
                trees.push(tree);
            }
            let owner = Some(nix::unistd::Uid::from_raw(userns.mapping.host_id));
            let group = Some(nix::unistd::Gid::from_raw(userns.mapping.host_id));
            for sub in ["upper", "work"] {
                let path = dir.join(sub);
                nix::unistd::chown(&path, owner, group).map_err(|e| ImageError::io("chown", &path, e.into()))?;
            }
        }
        write_atomically(&dir.join("image"), image.manifest.as_str().as_bytes())?;
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        if data.len() > MAX_MOUNT_DATA {
            return Err(ImageError::Mount {
                container: id.to_owned(),
                message: format!("{} layers make overlay options longer than a page", lower.len()),
            });
        }
        nix::mount::mount(Some("overlay"), &merged, Some("overlay"), MsFlags::empty(), Some(data.as_str()))
            .map_err(|e| mount_err(format!("overlay mount: {e}")))?;
        drop(trees);
        Ok(merged)
    }

    /// Unmounts and deletes the container's rootfs (its writable layer goes with it). Missing is fine.
    pub fn remove(&self, id: &str) -> Result<()> {
        let dir = self.container_dir(id)?;
        let merged = dir.join("merged");
        if crate::volumes::mounts::is_mountpoint(&merged) {
            nix::mount::umount2(&merged, MntFlags::MNT_DETACH)
                .map_err(|e| ImageError::Mount { container: id.to_owned(), message: format!("unmount: {e}") })?;
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io("remove", &dir, e)),
        }
    }

    /// The container IDs with a root filesystem here that was made before `before` (the previous agent's).
    pub fn made_before(&self, before: std::time::SystemTime) -> Vec<String> {
        let entries = fs::read_dir(&self.dir).into_iter().flatten().flatten();
        entries
            .filter(|e| e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < before))
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect()
    }

    /// Image manifests that some container rootfs uses (for GC).
    pub fn images_in_use(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(|e| ImageError::io("list", &self.dir, e))?;
        for entry in entries.flatten() {
            if let Ok(text) = fs::read_to_string(entry.path().join("image"))
                && let Ok(d) = Digest::parse(text.trim())
            {
                out.push(d);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_those_made_before_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = Rootfs::new(dir.path()).unwrap();
        let before = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        fs::create_dir(dir.path().join("u1-main-0")).unwrap();
        assert!(rootfs.made_before(before).is_empty(), "made after the agent started: not a leftover");
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        assert_eq!(rootfs.made_before(later), vec!["u1-main-0".to_string()]);
        rootfs.remove("u1-main-0").unwrap();
        assert!(rootfs.made_before(later).is_empty());
    }
}
