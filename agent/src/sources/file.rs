//! Static pods from the manifest folder (`--pod-manifest-path` / `staticPodPath`): every `.yaml`, `.yml` and
//! `.json` file holding one Pod, re-read every few seconds. Like upstream, a static pod's name gets the node
//! name appended, its UID is a hash of its content and the node, and `kubernetes.io/config.*` annotations say
//! where it came from. A changed file replaces the pod; a malformed one is logged with its name and skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::SourceEvent;
use super::mirror::StaticPods;

/// How often the folder is re-read (upstream's file source checks every 20 s; nodelet is quicker).
const INTERVAL: Duration = Duration::from_secs(2);

/// Reads one manifest into a static pod for `node`.
pub fn load(path: &Path, node: &str) -> anyhow::Result<Pod> {
    let text = std::fs::read(path)?;
    let mut pod: Pod = serde_yaml::from_slice(&text)?;
    if pod.metadata.name.as_deref().unwrap_or("").is_empty() {
        anyhow::bail!("the pod has no metadata.name");
    }
    if pod.spec.as_ref().is_none_or(|s| s.containers.is_empty()) {
        anyhow::bail!("the pod has no containers");
    }
    let hash = hex::encode(&Sha256::new().chain_update(&text).chain_update(node).finalize()[..16]);
    let name = format!("{}-{node}", pod.metadata.name.clone().unwrap_or_default());
    pod.metadata.name = Some(name);
    pod.metadata.namespace.get_or_insert_with(|| "default".into());
    pod.metadata.uid = Some(hash.clone());
    let annotations = pod.metadata.annotations.get_or_insert_with(Default::default);
    annotations.insert("kubernetes.io/config.source".into(), "file".into());
    annotations.insert("kubernetes.io/config.hash".into(), hash);
    annotations.insert("kubernetes.io/config.seen".into(), jiff::Timestamp::now().to_string());
    let spec = pod.spec.get_or_insert_with(Default::default);
    spec.node_name = Some(node.to_string());
    spec.restart_policy.get_or_insert_with(|| "Always".into());
    for c in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
        c.termination_message_path.get_or_insert_with(|| "/dev/termination-log".into());
    }
    Ok(pod)
}

fn manifests(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    !name.starts_with('.') && [".yaml", ".yml", ".json"].iter().any(|s| name.ends_with(s))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Watches `dir` until the receiver is gone; `statics` always holds the current static pods (for mirror pods).
pub async fn watch(dir: PathBuf, node: String, tx: mpsc::Sender<SourceEvent>, statics: watch::Sender<StaticPods>) {
    // file -> (uid, pod); and the last error reported per file content, so a bad file is logged once.
    let mut current: HashMap<PathBuf, String> = HashMap::new();
    let mut reported: HashMap<PathBuf, String> = HashMap::new();
    let mut synced = false;
    loop {
        let mut seen: HashMap<PathBuf, String> = HashMap::new();
        // Reading the folder is blocking file I/O: off the async threads.
        let (d, n) = (dir.clone(), node.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            manifests(&d).into_iter().map(|path| (load(&path, &n), path)).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (loaded, path) in loaded {
            match loaded {
                Ok(pod) => {
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    reported.remove(&path);
                    if current.get(&path) != Some(&uid) {
                        if let Some(old) = current.get(&path) {
                            tracing::info!(file = %path.display(), uid = %old, "static pod changed: replacing it");
                            if tx.send(SourceEvent::Remove { uid: old.clone() }).await.is_err() {
                                return;
                            }
                        }
                        tracing::info!(file = %path.display(), pod = ?pod.metadata.name, "static pod");
                        statics.send_modify(|s| {
                            s.insert(uid.clone(), pod.clone());
                        });
                        if tx.send(SourceEvent::Upsert(Box::new(pod))).await.is_err() {
                            return;
                        }
                    }
                    seen.insert(path, uid);
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    if reported.get(&path) != Some(&message) {
                        tracing::error!(file = %path.display(), error = %message, "skipping a malformed static pod manifest");
                        reported.insert(path.clone(), message);
                    }
                    // A file that turned bad keeps its old pod running, as upstream does.
                    if let Some(uid) = current.get(&path) {
                        seen.insert(path, uid.clone());
                    }
                }
            }
        }
        for (path, uid) in &current {
            if !seen.contains_key(path) {
                tracing::info!(file = %path.display(), %uid, "static pod manifest removed");
                if tx.send(SourceEvent::Remove { uid: uid.clone() }).await.is_err() {
                    return;
                }
            }
        }
        statics.send_if_modified(|s| {
            let before = s.len();
            s.retain(|uid, _| seen.values().any(|u| u == uid));
            s.len() != before
        });
        // After the first pass every manifest there is has been delivered.
        if !synced {
            if tx.send(SourceEvent::Synced).await.is_err() {
                return;
            }
            synced = true;
        }
        current = seen;
        tokio::time::sleep(INTERVAL).await;
    }
}
