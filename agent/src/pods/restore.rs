//! What lets pods survive an agent restart (kill -9 included): each pod worker saves its containers' records
//! (`<root-dir>/pod-state/<uid>.json`) whenever they change; at startup the runtime's live containers and sandboxes
//! are handed to the worker of their pod, which takes them over instead of starting new ones. Whatever no desired
//! pod claims once every source has delivered its pods is removed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use jiff::Timestamp;
use nodelet_runtime::{Container, Runtime, Sandbox};

use super::state::{ContainerRecord, PodState};

/// A pod worker's saved records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    pub start_time: Timestamp,
    /// `status.qosClass`, to find the pod cgroup of a pod that is gone.
    pub qos: String,
    pub init: Vec<ContainerRecord>,
    pub containers: Vec<ContainerRecord>,
    /// Ephemeral containers (absent in states saved before they were run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ephemeral: Vec<ContainerRecord>,
}

impl Saved {
    pub fn of(state: &PodState) -> Saved {
        Saved {
            start_time: state.start_time,
            qos: state.qos.as_str().to_string(),
            init: state.init.clone(),
            containers: state.containers.clone(),
            ephemeral: state.ephemeral.clone(),
        }
    }
}

/// Where pod workers save their records.
#[derive(Debug, Clone)]
pub struct SavedStates {
    dir: PathBuf,
}

impl SavedStates {
    pub fn new(root_dir: &Path) -> SavedStates {
        SavedStates { dir: root_dir.join("pod-state") }
    }

    fn path(&self, uid: &str) -> PathBuf {
        self.dir.join(format!("{uid}.json"))
    }

    /// Writes atomically (a crash leaves the old record or the new one); not fsynced, like the runtime's records.
    pub fn save(&self, uid: &str, saved: &Saved) -> std::io::Result<()> {
        let json = serde_json::to_vec(saved).map_err(std::io::Error::other)?;
        nodelet_runtime::state::write_atomic(&self.path(uid), &json).map_err(std::io::Error::other)
    }

    /// The saved records of `uid`; an unreadable file counts as none (and is removed).
    pub fn load(&self, uid: &str) -> Option<Saved> {
        let bytes = std::fs::read(self.path(uid)).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(saved) => Some(saved),
            Err(e) => {
                tracing::warn!(%uid, error = %e, "ignoring an unreadable saved pod state");
                self.remove(uid);
                None
            }
        }
    }

    pub fn remove(&self, uid: &str) {
        let _ = std::fs::remove_file(self.path(uid));
    }

    /// UIDs with saved records.
    pub fn uids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        entries.flatten().filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_string)).collect()
    }
}

/// What a pod worker takes over from the previous agent process.
#[derive(Debug, Default)]
pub struct Inherited {
    pub saved: Option<Saved>,
    pub containers: HashMap<String, Container>,
    pub sandbox: Option<Sandbox>,
}

impl Inherited {
    /// Whether a previous agent left anything of the pod (else the pod is new to this node).
    pub fn is_empty(&self) -> bool {
        self.saved.is_none() && self.containers.is_empty() && self.sandbox.is_none()
    }
}

/// The previous agent's live containers and sandboxes, until pod workers claim them.
#[derive(Debug, Default)]
pub struct Leftovers {
    containers: Mutex<HashMap<String, Container>>,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
}

impl Leftovers {
    /// Everything the runtime still has from before (its dead containers are cleaned up on the way).
    pub async fn find(runtime: &Runtime) -> Leftovers {
        let containers: HashMap<String, Container> =
            runtime.list().await.into_iter().map(|c| (c.id.clone(), c)).collect();
        let sandboxes: HashMap<String, Sandbox> =
            runtime.list_sandboxes().into_iter().map(|s| (s.id.clone(), s)).collect();
        if !containers.is_empty() || !sandboxes.is_empty() {
            tracing::info!(containers = containers.len(), sandboxes = sandboxes.len(), "found containers to take over");
        }
        Leftovers { containers: Mutex::new(containers), sandboxes: Mutex::new(sandboxes) }
    }

    /// Takes the sandbox and containers of pod `uid` (container IDs are `<uid>-<container>-<restart>`).
    pub fn claim(&self, uid: &str, states: &SavedStates) -> Inherited {
        let prefix = format!("{uid}-");
        let mut all = self.containers.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<String> = all.keys().filter(|id| id.starts_with(&prefix)).cloned().collect();
        let containers = ids.into_iter().filter_map(|id| all.remove_entry(&id)).collect();
        let sandbox = self.sandboxes.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
        Inherited { saved: states.load(uid), containers, sandbox }
    }

    /// Takes whatever is left: no desired pod wants it.
    pub fn unclaimed(&self) -> (Vec<Container>, Vec<Sandbox>) {
        let containers = std::mem::take(&mut *self.containers.lock().unwrap_or_else(|e| e.into_inner()));
        let sandboxes = std::mem::take(&mut *self.sandboxes.lock().unwrap_or_else(|e| e.into_inner()));
        (containers.into_values().collect(), sandboxes.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::state::ContainerState;

    #[test]
    fn saved_states_round_trip_and_bad_files_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let states = SavedStates::new(dir.path());
        let mut record = ContainerRecord::new("main", "busybox", "ContainerCreating");
        record.state = ContainerState::Running { started_at: "2026-01-01T00:00:00.5Z".parse().unwrap() };
        record.container_id = Some("nodelet://u1-main-2".into());
        record.restart_count = 2;
        let saved = Saved {
            start_time: "2026-01-01T00:00:00Z".parse().unwrap(),
            qos: "BestEffort".into(),
            init: Vec::new(),
            containers: vec![record],
            ephemeral: Vec::new(),
        };
        states.save("u1", &saved).unwrap();
        assert_eq!(states.load("u1"), Some(saved));
        assert_eq!(states.uids(), ["u1"]);
        std::fs::write(dir.path().join("pod-state/u2.json"), b"{not json").unwrap();
        assert_eq!(states.load("u2"), None);
        assert!(!dir.path().join("pod-state/u2.json").exists());
        states.remove("u1");
        assert!(states.uids().is_empty() && states.load("u1").is_none());
    }
}
