//! The volume manager: a pod's volumes set up before any of its containers is created, kept up to date while it
//! runs (configMap, secret, downwardAPI and projected contents, service account tokens), and torn down once its
//! last container is gone.
//!
//! Layout, as upstream's: `<root-dir>/pods/<uid>/volumes/kubernetes.io~<plugin>/<name>`; secret and projected
//! volumes (and `emptyDir.medium: Memory`) are tmpfs mounts there, so secrets never touch the disk. A volume
//! that cannot be set up is a [`MountError`] (upstream's `FailedMount` event text); the pod worker retries.
//!
//! Crash rules: set-up is idempotent and never remounts (after `kill -9` of the agent, a tmpfs that holds a
//! running container's files is found in mountinfo and kept); tear-down unmounts everything below the pod's
//! directory (also subPath pins and what an earlier agent left) and removes the directory only once nothing is
//! mounted there; pods deleted while the agent was down are torn down once the sources have synced.

pub mod atomic_writer;
mod container;
mod host_path;
pub mod mounts;
pub mod payload;
mod pod_certificates;
mod tokens;
mod trust_bundles;
mod watches;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Volume};
use kube::Api;

pub use container::{expand, mounts as container_mounts};
use payload::{Objects, PodFacts};

use crate::pods::downward_api::{Allocatable, Ips};

/// A volume ready to be mounted into containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetUp {
    /// The directory (or for a hostPath, the file) on the host.
    pub path: PathBuf,
    /// configMap, secret, downwardAPI and projected volumes are read-only in containers (upstream).
    pub read_only: bool,
    /// A disk-backed emptyDir's usage at its last set-up or resync (bytes allocated), for `sizeLimit` eviction.
    pub usage_bytes: Option<u64>,
}

/// A pod's volumes by name.
pub type PodVolumes = BTreeMap<String, SetUp>;

/// A volume that could not be set up, in the words of upstream's `FailedMount` event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("MountVolume.SetUp failed for volume {volume:?} : {message}")]
pub struct MountError {
    pub volume: String,
    pub message: String,
}

/// What a volume is made of on this node.
#[derive(Debug)]
enum Kind<'a> {
    EmptyDir {
        memory: bool,
        size_limit: Option<u64>,
    },
    HostPath {
        path: &'a str,
        type_: Option<&'a str>,
    },
    /// Files written by the atomic writer: (plugin directory, on tmpfs).
    Files(&'static str, bool),
    /// Pulled and mounted by the pod worker when a container that mounts it starts (as upstream).
    Image,
    Unsupported(&'static str),
}

/// The root filesystem ID of a pod's `image` volume (a `.` never appears in container IDs).
pub fn image_volume_id(uid: &str, volume: &str) -> String {
    format!("{uid}.volume.{volume}")
}

fn kind(v: &Volume) -> Kind<'_> {
    if let Some(e) = &v.empty_dir {
        let size_limit = e.size_limit.as_ref().and_then(crate::pods::resources::quantity).map(crate::units::ceil_u64);
        return Kind::EmptyDir { memory: e.medium.as_deref() == Some("Memory"), size_limit };
    }
    if let Some(h) = &v.host_path {
        return Kind::HostPath { path: &h.path, type_: h.type_.as_deref() };
    }
    if v.config_map.is_some() {
        return Kind::Files("kubernetes.io~configmap", false);
    }
    if v.secret.is_some() {
        return Kind::Files("kubernetes.io~secret", true);
    }
    if v.downward_api.is_some() {
        return Kind::Files("kubernetes.io~downward-api", false);
    }
    if v.projected.is_some() {
        return Kind::Files("kubernetes.io~projected", true);
    }
    if v.image.is_some() {
        return Kind::Image;
    }
    let unsupported = [
        (v.persistent_volume_claim.is_some(), "persistentVolumeClaim"),
        (v.ephemeral.is_some(), "ephemeral"),
        (v.csi.is_some(), "csi"),
        (v.nfs.is_some(), "nfs"),
        (v.iscsi.is_some(), "iscsi"),
        (v.fc.is_some(), "fc"),
        (v.rbd.is_some(), "rbd"),
        (v.cephfs.is_some(), "cephfs"),
        (v.git_repo.is_some(), "gitRepo"),
    ];
    Kind::Unsupported(unsupported.into_iter().find(|(set, _)| *set).map(|(_, name)| name).unwrap_or("this"))
}

/// Sets up, refreshes and tears down pods' volumes.
pub struct VolumeManager {
    root_dir: PathBuf,
    client: Option<kube::Client>,
    allocatable: Allocatable,
    tokens: tokens::Tokens,
    pod_certificates: pod_certificates::PodCertificates,
    watches: watches::ObjectWatches,
}

impl VolumeManager {
    pub fn new(root_dir: &Path, client: Option<kube::Client>, allocatable: Allocatable) -> VolumeManager {
        VolumeManager {
            root_dir: root_dir.to_path_buf(),
            client,
            allocatable,
            tokens: tokens::Tokens::default(),
            pod_certificates: Default::default(),
            watches: watches::ObjectWatches::default(),
        }
    }

    /// Notified when a ConfigMap or Secret that the pod's volumes show changes (once they were set up).
    pub fn changes(&self, uid: &str) -> std::sync::Arc<tokio::sync::Notify> {
        self.watches.changes(uid)
    }

    /// Node allocatable, for the downward API.
    pub fn allocatable(&self) -> Allocatable {
        self.allocatable
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root_dir.join("pods").join(uid)
    }

    /// Where a container's pinned subPaths go.
    pub fn subpaths_dir(&self, uid: &str, container: &str) -> PathBuf {
        self.pod_dir(uid).join("volume-subpaths").join(container)
    }

    /// Sets up (or brings up to date) every volume of the pod; `ips` for the downward API.
    pub async fn set_up(&self, pod: &Pod, ips: &Ips<'_>) -> Result<PodVolumes, MountError> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
        let objects = self.fetch(pod, &volumes).await?;
        if let Some(client) = &self.client {
            let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let keys = volumes.iter().flat_map(|v| {
                let Named { config_maps, secrets, .. } = named(v);
                let cms = config_maps.into_iter().map(|n| (false, namespace.clone(), n));
                cms.chain(secrets.into_iter().map(|n| (true, namespace.clone(), n))).collect::<Vec<_>>()
            });
            self.watches.set(client, &uid, keys.collect());
        }
        let facts = PodFacts { pod, ips: Ips { host: ips.host, pod: ips.pod }, allocatable: self.allocatable };
        let fs_group = pod.spec.as_ref().and_then(|s| s.security_context.as_ref()).and_then(|s| s.fs_group);
        let memory_limit = pod_memory_limit(pod).unwrap_or(self.allocatable.memory_bytes);
        let mut out = PodVolumes::new();
        // Payloads are computed here (pure); the writes and mounts go to a blocking thread.
        let mut work = Vec::new();
        for v in &volumes {
            let err = |message: String| MountError { volume: v.name.clone(), message };
            let job = match kind(v) {
                Kind::Unsupported(what) => {
                    return Err(err(format!("volume type {what} is not supported by nodelet yet")));
                }
                Kind::Image => continue,
                Kind::HostPath { path, type_ } => Job::HostPath(PathBuf::from(path), type_.map(str::to_owned)),
                Kind::EmptyDir { memory, size_limit } => {
                    let size =
                        memory.then(|| size_limit.filter(|s| *s > 0).map_or(memory_limit, |s| s.min(memory_limit)));
                    Job::EmptyDir { dir: self.volume_dir(&uid, "kubernetes.io~empty-dir", &v.name), tmpfs: size }
                }
                Kind::Files(plugin, tmpfs) => {
                    let payload = if let Some(s) = &v.config_map {
                        payload::config_map(s, &objects)
                    } else if let Some(s) = &v.secret {
                        payload::secret(s, &objects)
                    } else if let Some(s) = &v.downward_api {
                        let mode = s.default_mode.unwrap_or(payload::DEFAULT_MODE);
                        payload::downward(s.items.as_deref().unwrap_or_default(), mode, &facts)
                    } else if let Some(s) = &v.projected {
                        payload::projected(&v.name, s, &objects, &facts)
                    } else {
                        Ok(Default::default())
                    };
                    Job::Files { dir: self.volume_dir(&uid, plugin, &v.name), tmpfs, payload: payload.map_err(err)? }
                }
            };
            work.push((v.name.clone(), job));
        }
        let done = tokio::task::spawn_blocking(move || {
            work.into_iter()
                .map(|(name, job)| {
                    (name.clone(), job.run(fs_group).map_err(|message| MountError { volume: name, message }))
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| MountError { volume: String::new(), message: e.to_string() })?;
        for (name, result) in done {
            out.insert(name, result?);
        }
        Ok(out)
    }

    fn volume_dir(&self, uid: &str, plugin: &str, name: &str) -> PathBuf {
        self.pod_dir(uid).join("volumes").join(plugin).join(name)
    }

    /// Fetches the ConfigMaps and Secrets the volumes name, and the service account tokens and trust anchors
    /// they project.
    async fn fetch(&self, pod: &Pod, volumes: &[Volume]) -> Result<Objects, MountError> {
        let mut objects = Objects::default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        for v in volumes {
            let err = |message: String| MountError { volume: v.name.clone(), message };
            let Named { config_maps, secrets, tokens, trust_bundles, pod_certificates } = named(v);
            let none = [config_maps.is_empty(), secrets.is_empty(), tokens.is_empty(), trust_bundles.is_empty()];
            if none.iter().all(|n| *n) && pod_certificates.is_empty() {
                continue;
            }
            let Some(client) = &self.client else {
                // Standalone: nothing to read them from; an optional object is simply missing.
                for name in config_maps {
                    objects.config_maps.insert(name, None);
                }
                for name in secrets {
                    objects.secrets.insert(name, None);
                }
                if !tokens.is_empty() {
                    return Err(err("service account tokens need an API server (nodelet runs standalone)".into()));
                }
                if !trust_bundles.is_empty() {
                    return Err(err("ClusterTrustBundle projection is not supported in static kubelet mode".into()));
                }
                if !pod_certificates.is_empty() {
                    return Err(err("podCertificate projections need an API server (nodelet runs standalone)".into()));
                }
                continue;
            };
            for name in config_maps {
                if objects.config_maps.contains_key(&name) {
                    continue;
                }
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
                let got = api
                    .get_opt(&name)
                    .await
                    .map_err(|e| err(format!("failed to get configmap {namespace}/{name}: {e}")))?;
                objects.config_maps.insert(name, got);
            }
            for name in secrets {
                if objects.secrets.contains_key(&name) {
                    continue;
                }
                let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
                let got = api
                    .get_opt(&name)
                    .await
                    .map_err(|e| err(format!("failed to get secret {namespace}/{name}: {e}")))?;
                objects.secrets.insert(name, got);
            }
            for (audience, expiration) in tokens {
                let token =
                    self.tokens.get(client, pod, &audience, expiration).await.map_err(|e| err(format!("{e:#}")))?;
                objects.tokens.insert((audience, expiration), token);
            }
            if !trust_bundles.is_empty() {
                let uid = pod.metadata.uid.as_deref().unwrap_or_default();
                let bundles = self.watches.trust_bundles(client, uid).await.map_err(err)?;
                let bundles: Vec<&k8s_openapi::api::certificates::v1::ClusterTrustBundle> =
                    bundles.iter().map(|b| b.as_ref()).collect();
                for p in trust_bundles {
                    objects.trust_anchors.insert(trust_bundles::key(&p), trust_bundles::anchors(&p, &bundles));
                }
            }
            for (index, source) in pod_certificates {
                let pair =
                    self.pod_certificates.credentials(client, pod, &v.name, index, &source).await.map_err(err)?;
                objects.pod_certificates.insert((v.name.clone(), index), pair);
            }
        }
        Ok(objects)
    }

    /// Unmounts and removes the pod's volumes (blocking; containers must be gone). Keeps the directory if
    /// anything is still mounted there (the next tear-down tries again).
    pub fn tear_down(&self, uid: &str) -> std::io::Result<()> {
        self.tokens.forget(uid);
        self.pod_certificates.forget(uid);
        self.watches.forget(uid);
        let dir = self.pod_dir(uid);
        mounts::unmount_all(&dir)?;
        // (`containers`: the termination message files, which go with the pod too.)
        for sub in ["volumes", "volume-subpaths", "containers"] {
            match std::fs::remove_dir_all(dir.join(sub)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        // The pod's directory itself goes once empty (a standalone pod's status file may still be there).
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }

    /// Pods with volumes on disk (for tearing down those of pods deleted while the agent was down).
    pub fn pods_on_disk(&self) -> Vec<String> {
        let entries = std::fs::read_dir(self.root_dir.join("pods")).into_iter().flatten().flatten();
        entries
            .filter(|e| e.path().join("volumes").exists() || e.path().join("volume-subpaths").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

/// What a volume shows that comes from the API server.
#[derive(Default)]
struct Named {
    config_maps: Vec<String>,
    secrets: Vec<String>,
    /// Service account tokens: (audience, lifetime).
    tokens: Vec<(String, i64)>,
    trust_bundles: Vec<k8s_openapi::api::core::v1::ClusterTrustBundleProjection>,
    /// `podCertificate` projections with their index among the volume's sources.
    pod_certificates: Vec<(usize, k8s_openapi::api::core::v1::PodCertificateProjection)>,
}

fn named(v: &Volume) -> Named {
    let mut named = Named::default();
    if let Some(s) = &v.config_map {
        named.config_maps.push(s.name.clone());
    }
    if let Some(s) = &v.secret {
        named.secrets.push(s.secret_name.clone().unwrap_or_default());
    }
    for (index, source) in v.projected.iter().flat_map(|p| p.sources.iter().flatten()).enumerate() {
        named.pod_certificates.extend(source.pod_certificate.clone().map(|p| (index, p)));
        named.config_maps.extend(source.config_map.as_ref().map(|c| c.name.clone()));
        named.secrets.extend(source.secret.as_ref().map(|s| s.name.clone()));
        named.tokens.extend(source.service_account_token.as_ref().map(payload::token_key));
        named.trust_bundles.extend(source.cluster_trust_bundle.clone());
    }
    named
}

/// The pod's memory limit when every container sets one (upstream sizes a memory-backed emptyDir by it).
fn pod_memory_limit(pod: &Pod) -> Option<u64> {
    let spec = pod.spec.as_ref()?;
    let limit =
        |c: &k8s_openapi::api::core::v1::Container| crate::pods::resources::container_resources(c).memory_limit_bytes;
    let app: Option<u64> = spec.containers.iter().map(limit).sum();
    let init = spec.init_containers.iter().flatten().map(limit).try_fold(0u64, |m, l| l.map(|l| m.max(l)));
    Some(app?.max(init?))
}

/// Bytes allocated below `dir` on its filesystem (like `du`: symlinks not followed, other filesystems not
/// entered), walking at most a million entries.
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(root) = std::fs::symlink_metadata(dir) else { return 0 };
    let (device, mut total, mut seen) = (root.dev(), 0u64, 0usize);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            seen += 1;
            if seen > 1_000_000 {
                return total;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if meta.dev() != device {
                continue;
            }
            total = total.saturating_add(meta.blocks().saturating_mul(512));
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// One volume's host-side work.
enum Job {
    EmptyDir { dir: PathBuf, tmpfs: Option<u64> },
    HostPath(PathBuf, Option<String>),
    Files { dir: PathBuf, tmpfs: bool, payload: atomic_writer::Payload },
}

impl Job {
    fn run(self, fs_group: Option<i64>) -> Result<SetUp, String> {
        let group = fs_group.and_then(|g| u32::try_from(g).ok());
        match self {
            Job::HostPath(path, type_) => {
                host_path::check(&path, type_.as_deref())?;
                Ok(SetUp { path, read_only: false, usage_bytes: None })
            }
            Job::EmptyDir { dir, tmpfs } => {
                match tmpfs {
                    Some(size) => mounts::ensure_tmpfs(&dir, Some(size), 0o1777),
                    None => std::fs::create_dir_all(&dir),
                }
                .map_err(|e| e.to_string())?;
                // World-writable like upstream's (on tmpfs also sticky: a tmpfs root's default, which upstream
                // keeps), group-owned and setgid with an fsGroup.
                let mode = if tmpfs.is_some() { 0o1777 } else { 0o777 } | if group.is_some() { 0o2000 } else { 0 };
                if let Some(gid) = group {
                    std::os::unix::fs::chown(&dir, None, Some(gid)).map_err(|e| e.to_string())?;
                }
                std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .map_err(|e| e.to_string())?;
                let usage_bytes = tmpfs.is_none().then(|| disk_usage(&dir));
                Ok(SetUp { path: dir, read_only: false, usage_bytes })
            }
            Job::Files { dir, tmpfs, payload } => {
                if tmpfs {
                    mounts::ensure_tmpfs(&dir, None, 0o755).map_err(|e| e.to_string())?;
                }
                atomic_writer::write(&dir, &payload, group).map_err(|e| format!("writing the volume's files: {e}"))?;
                Ok(SetUp { path: dir, read_only: true, usage_bytes: None })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(
            serde_json::json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u-1"}, "spec": spec}),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn set_up_writes_files_and_tear_down_removes_them() {
        let root = tempfile::tempdir().unwrap();
        let manager =
            VolumeManager::new(root.path(), None, Allocatable { memory_bytes: 1 << 30, ..Default::default() });
        let host = root.path().join("host-data");
        let p = pod(serde_json::json!({
            "containers": [{"name": "c", "volumeMounts": [{"name": "info", "mountPath": "/etc/info"}]}],
            "volumes": [
                {"name": "scratch", "emptyDir": {}},
                {"name": "info", "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
                {"name": "host", "hostPath": {"path": host.display().to_string(), "type": "DirectoryOrCreate"}},
                {"name": "optional", "configMap": {"name": "absent", "optional": true}}
            ]
        }));
        let ips = Ips { host: "10.0.0.1", pod: None };
        let volumes = manager.set_up(&p, &ips).await.unwrap();
        let info = &volumes["info"];
        assert!(info.read_only);
        assert_eq!(std::fs::read_to_string(info.path.join("name")).unwrap(), "p");
        assert_eq!(volumes["host"].path, host);
        assert!(host.is_dir());
        assert!(volumes["scratch"].path.ends_with("pods/u-1/volumes/kubernetes.io~empty-dir/scratch"));
        assert_eq!(volumes["scratch"].usage_bytes, Some(0));
        std::fs::write(volumes["scratch"].path.join("data"), vec![7u8; 64 * 1024]).unwrap();
        let used = manager.set_up(&p, &ips).await.unwrap()["scratch"].usage_bytes.unwrap_or(0);
        assert!(used >= 64 * 1024, "usage recorded at the resync: {used}");
        std::fs::remove_file(volumes["scratch"].path.join("data")).unwrap();
        // Idempotent: a second set-up (a resync, or after a restart) changes nothing.
        assert_eq!(manager.set_up(&p, &ips).await.unwrap(), volumes);
        let c = p.spec.as_ref().unwrap().containers[0].clone();
        let mounts = container_mounts(&volumes, &c, &[], &manager.subpaths_dir("u-1", "c")).unwrap();
        assert_eq!(
            mounts,
            vec![nodelet_runtime::Mount::Bind {
                source: info.path.clone(),
                destination: "/etc/info".into(),
                read_only: true,
                recursive: false,
                propagation: nodelet_runtime::Propagation::Private,
            }]
        );
        assert_eq!(manager.pods_on_disk(), vec!["u-1".to_string()]);
        manager.tear_down("u-1").unwrap();
        assert!(!root.path().join("pods/u-1").exists());
        assert!(host.is_dir(), "a hostPath is never removed");
    }

    #[tokio::test]
    async fn failures_name_the_volume_as_upstream() {
        let root = tempfile::tempdir().unwrap();
        let manager = VolumeManager::new(root.path(), None, Allocatable::default());
        let ips = Ips { host: "h", pod: None };
        let missing = pod(
            serde_json::json!({"containers": [{"name": "c"}], "volumes": [{"name": "cfg", "configMap": {"name": "app"}}]}),
        );
        assert_eq!(
            manager.set_up(&missing, &ips).await.unwrap_err().to_string(),
            "MountVolume.SetUp failed for volume \"cfg\" : configmap \"app\" not found"
        );
        let pvc = pod(serde_json::json!({"containers": [{"name": "c"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "x"}}]}));
        assert_eq!(
            manager.set_up(&pvc, &ips).await.unwrap_err().to_string(),
            "MountVolume.SetUp failed for volume \"data\" : volume type persistentVolumeClaim is not supported by nodelet yet"
        );
        let file = root.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let wrong = pod(serde_json::json!({"containers": [{"name": "c"}],
            "volumes": [{"name": "h", "hostPath": {"path": file.display().to_string(), "type": "Directory"}}]}));
        let e = manager.set_up(&wrong, &ips).await.unwrap_err();
        assert_eq!(
            e.message,
            format!("hostPath type check failed: {} is not a directory, it's a File", file.display())
        );
    }

    #[test]
    fn memory_limits_size_memory_volumes() {
        let limited = pod(serde_json::json!({"containers": [
            {"name": "a", "resources": {"limits": {"memory": "64Mi"}}},
            {"name": "b", "resources": {"limits": {"memory": "32Mi"}}}]}));
        assert_eq!(pod_memory_limit(&limited), Some(96 << 20));
        let open = pod(serde_json::json!({"containers": [{"name": "a"}]}));
        assert_eq!(pod_memory_limit(&open), None);
    }
}
