//! The image manager: what the kubelet's `EnsureImageExists` does — parse the name, apply the pull policy
//! and back-off, pick credentials, pull, and report Events and container waiting reasons with upstream's
//! strings.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::credentials::Keyring;
use super::digest::Digest;
use super::error::{ImageError, Result};
use super::gc::{self, GcPolicy, GcReport};
use super::pull::{Progress, Puller, RegistryConfig};
use super::reference::{PullPolicy, normalise, repo_digest};
use super::rootfs::Rootfs;
use super::store::{ImageRecord, Store};
use crate::backoff::Backoff;

/// Container waiting reasons for images (kubelet `images/types.go`).
pub mod reason {
    pub const ERR_IMAGE_PULL: &str = "ErrImagePull";
    pub const IMAGE_PULL_BACK_OFF: &str = "ImagePullBackOff";
    pub const ERR_IMAGE_NEVER_PULL: &str = "ErrImageNeverPull";
    pub const INVALID_IMAGE_NAME: &str = "InvalidImageName";
}

/// Settings of the image service.
#[derive(Debug, Clone, Default)]
pub struct ImagesConfig {
    /// `<root-dir>`: the store goes to `images/`, container rootfs mounts to `rootfs/`.
    pub root_dir: PathBuf,
    pub registry: RegistryConfig,
    /// A docker `config.json` with the node's own registry credentials.
    pub credentials_file: Option<PathBuf>,
    pub gc: GcPolicy,
}

/// An Event to record against the pod (`involvedObject` = the container), as upstream words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Why a container cannot start for image reasons: its `state.waiting` reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFailure {
    pub reason: &'static str,
    pub message: String,
}

/// A present image, as a container status reports it.
#[derive(Debug, Clone)]
pub struct ReadyImage {
    pub record: ImageRecord,
    /// `status.containerStatuses[].image`: the normalised name.
    pub image: String,
    /// `status.containerStatuses[].imageID`: `repo@sha256:…`.
    pub image_id: String,
}

/// The node's image service.
pub struct ImageManager {
    store: Store,
    puller: Puller,
    rootfs: Rootfs,
    node_keyring: Keyring,
    gc_policy: GcPolicy,
    backoff: Mutex<Backoff>,
    /// The last pull error per back-off key, to explain `ImagePullBackOff` like upstream does.
    last_errors: Mutex<HashMap<String, String>>,
}

impl ImageManager {
    /// Opens the store (repairing it after a crash) and reads the node's credentials file. A bad credentials
    /// file or GC policy is a startup error.
    pub fn open(config: ImagesConfig) -> anyhow::Result<ImageManager> {
        use anyhow::Context;
        config.gc.validate().map_err(anyhow::Error::msg)?;
        let store = Store::open(super::store_dir(&config.root_dir)).context("opening the image store")?;
        let rootfs = Rootfs::new(super::rootfs_dir(&config.root_dir))?;
        let mut node_keyring = Keyring::default();
        if let Some(path) = &config.credentials_file {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            node_keyring.add_docker_config(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        Ok(ImageManager {
            puller: Puller::new(store.clone(), config.registry),
            store,
            rootfs,
            node_keyring,
            gc_policy: config.gc,
            backoff: Mutex::new(Backoff::image_pull()),
            last_errors: Mutex::default(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn rootfs(&self) -> &Rootfs {
        &self.rootfs
    }

    /// The stored image a pod-spec name refers to, if present.
    pub fn find(&self, image: &str) -> Result<Option<ReadyImage>> {
        let reference = normalise(image)?;
        let key = match reference.digest() {
            Some(d) => repo_digest(&reference, d),
            None => reference.whole(),
        };
        Ok(self.store.resolve(&key)?.map(|record| ready(&reference, record)))
    }

    /// Makes sure a container's image is present per its pull policy. `pull_secrets` are the pod's
    /// `.dockerconfigjson` documents; `backoff_key` is upstream's `<pod uid>_<image>`. Events go to `event`.
    pub async fn ensure(
        &self,
        image: &str,
        policy: PullPolicy,
        pull_secrets: &[Vec<u8>],
        backoff_key: &str,
        progress: Arc<Progress>,
        event: &(dyn Fn(ImageEvent) + Send + Sync),
    ) -> Result<ReadyImage, ImageFailure> {
        let reference = match normalise(image) {
            Ok(r) => r,
            Err(e) => {
                let message = format!("Failed to apply default image tag {image:?}: {e}");
                event(ImageEvent { warning: true, reason: "InspectFailed", message: message.clone() });
                return Err(ImageFailure { reason: reason::INVALID_IMAGE_NAME, message });
            }
        };
        let present = self.find(image).ok().flatten();
        let must_pull = match policy {
            PullPolicy::Always => true,
            PullPolicy::IfNotPresent | PullPolicy::Never => present.is_none(),
        };
        if !must_pull && let Some(present) = present {
            event(ImageEvent {
                warning: false,
                reason: "Pulled",
                message: format!("Container image {image:?} already present on machine"),
            });
            return Ok(present);
        }
        if policy == PullPolicy::Never {
            let message = format!("Container image {image:?} is not present with pull policy of Never");
            event(ImageEvent { warning: true, reason: reason::ERR_IMAGE_NEVER_PULL, message: message.clone() });
            return Err(ImageFailure { reason: reason::ERR_IMAGE_NEVER_PULL, message });
        }
        let last_error = self.last_errors(backoff_key);
        if self.backoff.lock().unwrap_or_else(|p| p.into_inner()).in_backoff(backoff_key, Instant::now()) {
            let message = format!("Back-off pulling image {image:?}");
            event(ImageEvent { warning: false, reason: "BackOff", message: message.clone() });
            let message = match last_error {
                Some(e) => format!("{message}: {}: {e}", reason::ERR_IMAGE_PULL),
                None => message,
            };
            return Err(ImageFailure { reason: reason::IMAGE_PULL_BACK_OFF, message });
        }

        event(ImageEvent { warning: false, reason: "Pulling", message: format!("Pulling image {image:?}") });
        let started = Instant::now();
        match self.pull_with_credentials(&reference, pull_secrets, progress).await {
            Ok(record) => {
                crate::metrics::kubelet::METRICS.image_pull("success", record.size, started.elapsed());
                self.backoff.lock().unwrap_or_else(|p| p.into_inner()).reset(backoff_key);
                self.forget_error(backoff_key);
                event(ImageEvent {
                    warning: false,
                    reason: "Pulled",
                    message: format!(
                        "Successfully pulled image {image:?} in {} ({} including waiting). Image size: {} bytes.",
                        go_duration(started.elapsed()),
                        go_duration(started.elapsed()),
                        record.size
                    ),
                });
                Ok(ready(&reference, record))
            }
            Err(e) => {
                crate::metrics::kubelet::METRICS.image_pull("failure", 0, started.elapsed());
                let message = format!("failed to pull and unpack image \"{}\": {e}", reference.whole());
                self.backoff.lock().unwrap_or_else(|p| p.into_inner()).next(backoff_key, Instant::now());
                self.remember_error(backoff_key, &message);
                event(ImageEvent {
                    warning: true,
                    reason: "Failed",
                    message: format!("Failed to pull image {image:?}: {message}"),
                });
                Err(ImageFailure { reason: reason::ERR_IMAGE_PULL, message })
            }
        }
    }

    /// Pull secrets' matching credentials first (best match first), then the node's, then anonymous; the next
    /// is tried only when the registry refused the previous one.
    async fn pull_with_credentials(
        &self,
        reference: &oci_client::Reference,
        pull_secrets: &[Vec<u8>],
        progress: Arc<Progress>,
    ) -> Result<ImageRecord> {
        let mut pod_keyring = Keyring::default();
        for secret in pull_secrets {
            if let Err(e) = pod_keyring.add_docker_config(secret) {
                tracing::warn!(error = %e, "ignoring an unreadable image pull secret");
            }
        }
        let mut candidates: Vec<_> = pod_keyring.lookup_all(reference);
        candidates.extend(self.node_keyring.lookup_all(reference));
        if candidates.is_empty() {
            return self.puller.pull(reference, None, progress).await;
        }
        let mut last = None;
        for credential in candidates {
            match self.puller.pull(reference, Some(credential), progress.clone()).await {
                Err(e @ ImageError::Unauthorized { .. }) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| ImageError::NotPresent(reference.whole())))
    }

    /// Imports an image from an OCI layout directory under the name `image` (normalised like a pod's image).
    pub fn import(&self, layout: &std::path::Path, tag: Option<&str>, image: &str) -> Result<ReadyImage> {
        let reference = normalise(image)?;
        let record = super::import::import_layout(&self.store, layout, tag, &reference)?;
        Ok(ready(&reference, record))
    }

    /// Mounts the rootfs of a container and marks the image used.
    pub fn prepare_rootfs(
        &self,
        container_id: &str,
        image: &ReadyImage,
        userns: Option<&nodelet_runtime::idmap::PodUserNamespace>,
    ) -> Result<PathBuf> {
        let path = self.rootfs.prepare(&self.store, container_id, &image.record, userns)?;
        self.store.touch(&image.record.manifest)?;
        Ok(path)
    }

    /// Runs image GC; images used by any container rootfs count as in use besides `in_use`.
    pub fn garbage_collect(&self, in_use: &HashSet<Digest>) -> Result<GcReport> {
        let mut in_use = in_use.clone();
        in_use.extend(self.rootfs.images_in_use()?);
        gc::collect(&self.store, &self.gc_policy, &in_use)
    }

    /// Removes every image no container uses (older than the GC policy's minimum age), whatever the disk usage:
    /// the eviction manager's reclaim under disk pressure, before it evicts (upstream's `DeleteUnusedImages`).
    pub fn delete_unused_images(&self) -> Result<GcReport> {
        let in_use = self.rootfs.images_in_use()?.into_iter().collect();
        let all = gc::GcPolicy { high_threshold_percent: 0, low_threshold_percent: 0, ..self.gc_policy };
        gc::collect(&self.store, &all, &in_use)
    }

    fn last_errors(&self, key: &str) -> Option<String> {
        self.last_errors.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    fn remember_error(&self, key: &str, message: &str) {
        self.last_errors.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_owned(), message.to_owned());
    }

    fn forget_error(&self, key: &str) {
        self.last_errors.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

fn ready(reference: &oci_client::Reference, record: ImageRecord) -> ReadyImage {
    let repo = super::reference::repository_name(reference);
    let image_id = record
        .repo_digests
        .iter()
        .find(|d| d.starts_with(&format!("{repo}@")))
        .or(record.repo_digests.first())
        .cloned()
        .unwrap_or_else(|| repo_digest(reference, record.manifest.as_str()));
    let image = match reference.digest() {
        Some(_) => image_id.clone(),
        None => reference.whole(),
    };
    ReadyImage { record, image, image_id }
}

/// A duration as Go prints it (`1.234s`, `512ms`), as in upstream's Pulled event.
fn go_duration(d: Duration) -> String {
    if d >= Duration::from_secs(1) { format!("{:.3}s", d.as_secs_f64()) } else { format!("{}ms", d.as_millis()) }
}
