//! The node's pods as the kubelet API shows them (`/pods`, `/containerLogs`): the pods pod workers run, with the
//! status the status manager last computed. The dispatcher adds and removes pods; the status manager fills in status.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{Pod, PodStatus};

#[derive(Debug, Clone, Default)]
pub struct PodView(Arc<RwLock<HashMap<String, Pod>>>);

impl PodView {
    /// Adds a pod or takes its newer spec/metadata, keeping the status already computed.
    pub fn upsert(&self, mut pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut pods = self.0.write().unwrap_or_else(|e| e.into_inner());
        pod.status = pods.get(&uid).and_then(|p| p.status.clone()).or(pod.status);
        pods.insert(uid, pod);
    }

    pub fn set_status(&self, uid: &str, status: &PodStatus) {
        let mut pods = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some(pod) = pods.get_mut(uid) {
            pod.status = Some(status.clone());
        }
    }

    pub fn remove(&self, uid: &str) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }

    /// Every pod, ordered by namespace and name.
    pub fn list(&self) -> Vec<Pod> {
        let mut pods: Vec<Pod> = self.0.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        pods.sort_by(|a, b| (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name)));
        pods
    }

    /// The pod called `namespace/name` (a static pod under its mirror name, `<name>-<node>`).
    pub fn get(&self, namespace: &str, name: &str) -> Option<Pod> {
        let pods = self.0.read().unwrap_or_else(|e| e.into_inner());
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
}
