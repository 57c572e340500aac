//! The node's pods as the kubelet API shows them (`/pods`, `/containerLogs`): the pods pod workers run, with the
//! status the status manager last computed. The dispatcher adds and removes pods; the status manager fills in status.
//!
//! Until every pod source has delivered its first set of pods, a pod missing from the view may only not be known
//! yet: an agent restarted under running pods serves its API before the API server's list arrives.
//! [`PodView::find`] waits for that list (a bounded time) before it says a pod does not exist, so `kubectl
//! exec/logs` right after a restart reach the pod instead of a 404.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use tokio::sync::watch;

/// How long [`PodView::find`] waits for the sources' first sync: the API server's list takes a round trip or a
/// few; past this a missing pod is reported missing even if the sources never sync.
const SYNC_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct PodView {
    pods: Arc<RwLock<HashMap<String, Pod>>>,
    /// True once every source has delivered its first complete set of pods.
    synced: Arc<watch::Sender<bool>>,
}

impl Default for PodView {
    fn default() -> PodView {
        PodView { pods: Arc::default(), synced: Arc::new(watch::Sender::new(false)) }
    }
}

impl PodView {
    /// Called by the pod workers once every source has synced: each source's pods are in the view by then.
    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    /// The pod called `namespace/name`; when it is not in the view and the sources have not synced yet, asks again
    /// once they have (or [`SYNC_WAIT`] has passed).
    pub async fn find(&self, namespace: &str, name: &str) -> Option<Pod> {
        if let Some(pod) = self.get(namespace, name) {
            return Some(pod);
        }
        let mut synced = self.synced.subscribe();
        if !*synced.borrow_and_update() {
            let _ = tokio::time::timeout(SYNC_WAIT, synced.wait_for(|s| *s)).await;
            return self.get(namespace, name);
        }
        None
    }

    /// Adds a pod or takes its newer spec/metadata, keeping the status already computed.
    pub fn upsert(&self, mut pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
        pod.status = pods.get(&uid).and_then(|p| p.status.clone()).or(pod.status);
        pods.insert(uid, pod);
    }

    pub fn set_status(&self, uid: &str, status: &PodStatus) {
        let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
        if let Some(pod) = pods.get_mut(uid) {
            pod.status = Some(status.clone());
        }
    }

    pub fn remove(&self, uid: &str) {
        self.pods.write().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }

    /// Every pod, ordered by namespace and name.
    pub fn list(&self) -> Vec<Pod> {
        let mut pods: Vec<Pod> = self.pods.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        pods.sort_by(|a, b| (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name)));
        pods
    }

    /// The pod called `namespace/name` (a static pod under its mirror name, `<name>-<node>`).
    pub fn get(&self, namespace: &str, name: &str) -> Option<Pod> {
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        pods.values()
            .find(|p| {
                p.metadata.namespace.as_deref().unwrap_or("default") == namespace
                    && p.metadata.name.as_deref() == Some(name)
            })
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, name: &str, image: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": uid},
            "spec": {"containers": [{"name": "c", "image": image}]}
        }))
        .unwrap()
    }

    #[test]
    fn keeps_status_across_spec_updates() {
        let view = PodView::default();
        view.upsert(pod("u1", "b", "one"));
        view.upsert(pod("u2", "a", "one"));
        view.set_status("u1", &PodStatus { phase: Some("Running".into()), ..Default::default() });
        view.set_status("gone", &PodStatus::default());
        view.upsert(pod("u1", "b", "two"));
        let b = view.get("ns", "b").unwrap();
        assert_eq!(b.status.and_then(|s| s.phase).as_deref(), Some("Running"));
        assert_eq!(b.spec.unwrap().containers[0].image.as_deref(), Some("two"));
        let names: Vec<_> = view.list().into_iter().map(|p| p.metadata.name.unwrap()).collect();
        assert_eq!(names, ["a", "b"]);
        view.remove("u1");
        assert!(view.get("ns", "b").is_none() && view.get("other", "a").is_none());
    }

    /// Before the sources have synced, a lookup of a pod not yet known waits for the sync and finds it; after,
    /// a missing pod is missing at once.
    #[tokio::test(start_paused = true)]
    async fn find_waits_for_the_first_sync() {
        let view = PodView::default();
        let (writer, started) = (view.clone(), tokio::time::Instant::now());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            writer.upsert(pod("u1", "late", "one"));
            writer.mark_synced();
        });
        assert!(view.find("ns", "late").await.is_some());
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let after = tokio::time::Instant::now();
        assert!(view.find("ns", "absent").await.is_none());
        assert_eq!(after.elapsed(), Duration::ZERO);
    }

    /// Sources that never sync cost a lookup [`SYNC_WAIT`], not a hang.
    #[tokio::test(start_paused = true)]
    async fn find_gives_up_on_sources_that_never_sync() {
        let view = PodView::default();
        let started = tokio::time::Instant::now();
        assert!(view.find("ns", "absent").await.is_none());
        assert_eq!(started.elapsed(), SYNC_WAIT);
    }
}
