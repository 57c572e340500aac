//! The status manager: the only writer of pod status. Pod workers send it their pod's state; it patches the
//! status subresource when something changed (strategic merge, so the scheduler's `PodScheduled` stays), retries
//! failed writes, and once a terminating pod's containers are all gone deletes it with grace 0, as upstream does.
//! Without an API server (standalone) it writes each pod's status to `<root-dir>/pods/<uid>/status.json`.

pub mod pod_status;
pub mod view;

/// Every container status of a pod: init, app, then ephemeral containers.
pub fn all_container_statuses(
    status: &PodStatus,
) -> impl Iterator<Item = &k8s_openapi::api::core::v1::ContainerStatus> {
    [&status.init_container_statuses, &status.container_statuses, &status.ephemeral_container_statuses]
        .into_iter()
        .flatten()
        .flatten()
}

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use tokio::sync::mpsc;

use crate::events::PodRef;
use crate::pods::state::PodState;

/// What pod workers tell the status manager.
#[derive(Debug)]
pub enum StatusMessage {
    /// The pod's current state.
    Update { pod: PodRef, state: Box<PodState> },
    /// Everything of the pod is gone from the node; `delete` when the API object should go (graceful deletion).
    Terminated { pod: PodRef, delete: bool },
}

/// The handle pod workers use.
pub type StatusSender = mpsc::UnboundedSender<StatusMessage>;

/// Status writes in flight at once.
const PARALLEL_WRITES: usize = 16;

/// Retry ticks (1 s) between re-sends of static pods' statuses to their mirror pods.
const MIRROR_REFRESH_TICKS: u64 = 10;

/// A written status as `nodelet ps` reads it in standalone mode.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct LocalStatus {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub status: PodStatus,
}

pub struct StatusManager {
    client: Option<kube::Client>,
    local_dir: PathBuf,
    sent: HashMap<String, PodStatus>,
    dirty: HashMap<String, (PodRef, PodStatus)>,
    /// Static pods whose status was sent, by UID: re-sent now and then, see `refresh_mirrors`.
    statics: HashMap<String, PodRef>,
    /// Pods to delete from the API once their final status is written.
    deleting: HashMap<String, PodRef>,
    view: view::PodView,
}

/// A strategic merge patch merges conditions by type, so a condition left out stays: the resize conditions,
/// which exist only while they hold, are deleted explicitly when absent.
fn delete_absent_resize_conditions(patch: &mut serde_json::Value) {
    let Some(conditions) = patch["status"]["conditions"].as_array_mut() else { return };
    for kind in [pod_status::RESIZE_PENDING, pod_status::RESIZE_IN_PROGRESS] {
        if !conditions.iter().any(|c| c["type"] == kind) {
            conditions.push(serde_json::json!({"type": kind, "$patch": "delete"}));
        }
    }
}

impl StatusManager {
    pub fn new(client: Option<kube::Client>, root_dir: PathBuf, view: view::PodView) -> StatusManager {
        StatusManager {
            client,
            local_dir: root_dir.join("pods"),
            sent: HashMap::new(),
            dirty: HashMap::new(),
            statics: HashMap::new(),
            deleting: HashMap::new(),
            view,
        }
    }

    /// Runs until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<StatusMessage>) {
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                message = rx.recv() => match message {
                    Some(StatusMessage::Update { pod, state }) => {
                        let status = pod_status::pod_status(&state, self.sent.get(&pod.uid));
                        self.view.set_status(&pod.uid, &status);
                        self.dirty.insert(pod.uid.clone(), (pod, status));
                        self.flush().await;
                    }
                    Some(StatusMessage::Terminated { pod, delete }) => {
                        tracing::debug!(uid = %pod.uid, delete, "pod terminated");
                        self.flush().await;
                        if self.dirty.contains_key(&pod.uid) && delete && self.client.is_some() {
                            // Its final status is not written yet: the API object goes only after it is.
                            self.deleting.insert(pod.uid.clone(), pod);
                        } else {
                            self.finish(&pod, delete).await;
                        }
                    }
                    None => return,
                },
                _ = retry.tick() => {
                    ticks += 1;
                    if ticks.is_multiple_of(MIRROR_REFRESH_TICKS) {
                        self.refresh_mirrors();
                    }
                    self.flush().await;
                    let written: Vec<String> =
                        self.deleting.keys().filter(|uid| !self.dirty.contains_key(*uid)).cloned().collect();
                    for uid in written {
                        if let Some(pod) = self.deleting.remove(&uid) {
                            self.finish(&pod, true).await;
                        }
                    }
                }
            }
        }
    }

    /// Forgets a pod whose containers are all gone; deletes its API object (grace 0) when `delete`.
    async fn finish(&mut self, pod: &PodRef, delete: bool) {
        // Standalone, a pod that is gone from its source has nothing left to show.
        if delete || self.client.is_none() {
            self.delete(pod).await;
        }
        self.sent.remove(&pod.uid);
        self.dirty.remove(&pod.uid);
        self.statics.remove(&pod.uid);
    }

    /// Sends static pods' statuses again: a mirror pod deleted and recreated by someone starts with none.
    fn refresh_mirrors(&mut self) {
        if self.client.is_none() {
            return;
        }
        for (uid, pod) in &self.statics {
            if self.dirty.contains_key(uid) {
                continue;
            }
            if let Some(status) = self.sent.remove(uid) {
                self.dirty.insert(uid.clone(), (pod.clone(), status));
            }
        }
    }

    /// Writes every changed status, several pods at once (one slow request does not hold up the others).
    async fn flush(&mut self) {
        let unchanged: Vec<String> = self
            .dirty
            .iter()
            .filter(|(uid, (_, status))| self.sent.get(*uid).is_some_and(|s| same_ignoring_times(s, status)))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in unchanged {
            self.dirty.remove(&uid);
        }
        let pending: Vec<(String, PodRef, PodStatus)> =
            self.dirty.iter().map(|(uid, (pod, status))| (uid.clone(), pod.clone(), status.clone())).collect();
        let this = &*self;
        let written: Vec<_> = futures_util::stream::iter(pending)
            .map(|(uid, pod, status)| async move {
                let result = this.write(&pod, &status).await;
                (uid, pod, status, result)
            })
            .buffer_unordered(PARALLEL_WRITES)
            .collect()
            .await;
        for (uid, pod, status, result) in written {
            match result {
                Ok(()) => {
                    self.sent.insert(uid.clone(), status);
                    if pod.static_pod {
                        self.statics.insert(uid.clone(), pod);
                    }
                    self.dirty.remove(&uid);
                }
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e, "status update failed")
                }
            }
        }
    }

    async fn write(&self, pod: &PodRef, status: &PodStatus) -> anyhow::Result<()> {
        tracing::debug!(uid = %pod.uid, phase = ?status.phase, "writing pod status");
        let Some(client) = self.client.clone() else {
            let dir = self.local_dir.join(&pod.uid);
            std::fs::create_dir_all(&dir)?;
            let local = LocalStatus {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                status: status.clone(),
            };
            let json = serde_json::to_vec_pretty(&local)?;
            tokio::task::spawn_blocking(move || {
                crate::images::store::write_atomically(&dir.join("status.json"), &json)
            })
            .await??;
            return Ok(());
        };
        let pods: Api<Pod> = Api::namespaced(client, &pod.namespace);
        // A static pod's status goes to its mirror pod, which has a UID of its own.
        let mut patch = match pod.static_pod {
            true => serde_json::json!({"status": status}),
            false => serde_json::json!({"metadata": {"uid": pod.uid}, "status": status}),
        };
        delete_absent_resize_conditions(&mut patch);
        match pods.patch_status(&pod.name, &PatchParams::default(), &Patch::Strategic(&patch)).await {
            Ok(_) => Ok(()),
            // The mirror pod is not there yet (or is being recreated): retried.
            Err(kube::Error::Api(e)) if e.code == 404 && pod.static_pod => anyhow::bail!("no mirror pod yet"),
            // The pod is gone (or replaced by one with the same name): nothing left to report.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete(&self, pod: &PodRef) {
        if pod.static_pod && self.client.is_some() {
            // Its mirror pod is the mirror client's to delete.
            return;
        }
        let Some(client) = self.client.clone() else {
            let result = std::fs::remove_dir_all(self.local_dir.join(&pod.uid));
            tracing::debug!(uid = %pod.uid, ?result, "local status removed");
            return;
        };
        let pods: Api<Pod> = Api::namespaced(client, &pod.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(pod.uid.clone()), resource_version: None }),
            ..Default::default()
        };
        match pods.delete(&pod.name, &params).await {
            Ok(_) => tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), "pod deleted after termination"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(error = %e, "deleting a terminated pod failed"),
        }
    }
}

/// Equal apart from condition transition times (which only move when a status changes anyway).
fn same_ignoring_times(a: &PodStatus, b: &PodStatus) -> bool {
    let strip = |s: &PodStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_transition_time = None;
        }
        serde_json::to_value(s).unwrap_or_default()
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod resize_patch_tests {
    use super::*;

    #[test]
    fn absent_resize_conditions_are_deleted_by_the_patch() {
        let mut patch = serde_json::json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "PodResizePending", "status": "True", "reason": "Infeasible"}
        ]}});
        delete_absent_resize_conditions(&mut patch);
        let conditions = patch["status"]["conditions"].as_array().unwrap();
        assert_eq!(conditions.len(), 3);
        assert_eq!(conditions[2], serde_json::json!({"type": "PodResizeInProgress", "$patch": "delete"}));
        assert_eq!(conditions[1]["reason"], "Infeasible", "a present one stays as it is");
    }
}
