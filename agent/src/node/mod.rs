//! The Node: registration, the heartbeat Lease in `kube-node-lease`, and the node status (capacity,
//! allocatable, nodeInfo, addresses, conditions) patched every `nodeStatusUpdateFrequency` when it changed and
//! at least every `nodeStatusReportFrequency`, like upstream's nodestatus and nodelease.

pub mod address;
pub mod allocatable;
pub mod conditions;
pub mod info;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ContainerImage, Node, NodeCondition, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};

use crate::config::AgentConfig;

pub use info::NodeFacts;

/// Registers the node and keeps its Lease and status fresh.
pub struct NodeManager {
    client: kube::Client,
    config: AgentConfig,
    facts: NodeFacts,
    images: std::sync::Arc<crate::images::ImageManager>,
    network: std::sync::Arc<crate::network::Network>,
    /// The eviction manager's pressure conditions.
    pressure: tokio::sync::watch::Receiver<conditions::Pressure>,
}

impl NodeManager {
    pub fn new(
        client: kube::Client,
        config: AgentConfig,
        images: std::sync::Arc<crate::images::ImageManager>,
        network: std::sync::Arc<crate::network::Network>,
        pressure: tokio::sync::watch::Receiver<conditions::Pressure>,
        facts: NodeFacts,
    ) -> Result<NodeManager> {
        Ok(NodeManager { client, config, facts, images, network, pressure })
    }

    /// Creates the Node object (or finds it already there, as after a restart), retrying until the API server
    /// answers.
    pub async fn register(&self) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let mut labels: BTreeMap<String, String> = [
            ("kubernetes.io/hostname", self.config.node_name.as_str()),
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", info::go_arch()),
            ("beta.kubernetes.io/os", "linux"),
            ("beta.kubernetes.io/arch", info::go_arch()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        labels.extend(self.config.node_labels.iter().cloned());
        let node = Node {
            metadata: ObjectMeta {
                name: Some(self.config.node_name.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: (!self.config.register_with_taints.is_empty())
                    .then(|| self.config.register_with_taints.clone()),
                ..Default::default()
            }),
            status: Some(self.status(None)),
        };
        let mut delay = Duration::from_millis(200);
        loop {
            match nodes.create(&PostParams::default(), &node).await {
                Ok(_) => {
                    tracing::info!(node = %self.config.node_name, "registered the node");
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::info!(node = %self.config.node_name, "node already registered");
                    self.reconcile(&nodes, &node).await;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "registering the node failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(7));
                }
            }
        }
    }

    /// On an existing Node: the labels and taints this node is configured with are added where missing or
    /// different (others' labels and taints stay).
    async fn reconcile(&self, nodes: &Api<Node>, wanted: &Node) {
        let Ok(existing) = nodes.get(&self.config.node_name).await else { return };
        let mut taints = existing.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
        let before = taints.len();
        for t in wanted.spec.as_ref().and_then(|s| s.taints.as_ref()).into_iter().flatten() {
            if !taints.iter().any(|have| have.key == t.key && have.effect == t.effect) {
                taints.push(t.clone());
            }
        }
        let mut patch = serde_json::json!({"metadata": {"labels": wanted.metadata.labels}});
        if taints.len() != before {
            patch["spec"] = serde_json::json!({"taints": taints});
        }
        let name = &self.config.node_name;
        if let Err(e) = nodes.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::warn!(error = %e, "reconciling the node's labels and taints");
        }
    }

    /// The node status as of now. `previous` keeps condition transition times.
    fn status(&self, previous: Option<&NodeStatus>) -> NodeStatus {
        let now = Time(Timestamp::now());
        let condition = |kind: &str, status: &str, reason: &str, message: &str| {
            let transition = previous
                .and_then(|p| p.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == kind && c.status == status))
                .and_then(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            NodeCondition {
                type_: kind.into(),
                status: status.into(),
                reason: Some(reason.into()),
                message: Some(message.into()),
                last_heartbeat_time: Some(now.clone()),
                last_transition_time: Some(transition),
            }
        };
        let mut status = self.facts.status(&self.config);
        status.images = Some(node_images(self.images.store().images().unwrap_or_default()));
        let under = *self.pressure.borrow();
        let pressure = |kind: &str, on: bool, yes: (&str, &str), no: (&str, &str)| {
            let (reason, message) = if on { yes } else { no };
            condition(kind, if on { "True" } else { "False" }, reason, message)
        };
        status.conditions = Some(vec![
            pressure(
                "MemoryPressure",
                under.memory,
                ("KubeletHasInsufficientMemory", "kubelet has insufficient memory available"),
                ("KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ),
            pressure(
                "DiskPressure",
                under.disk,
                ("KubeletHasDiskPressure", "kubelet has disk pressure"),
                ("KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ),
            pressure(
                "PIDPressure",
                under.pid,
                ("KubeletHasInsufficientPID", "kubelet has insufficient PID available"),
                ("KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ),
        ]);
        // nodelet's own condition, on nodes with pressure stall thresholds (Kubernetes 1.37 has no PSI condition).
        if !self.config.stall_thresholds.is_empty()
            && let Some(conditions) = status.conditions.as_mut()
        {
            conditions.push(pressure(
                "PSIPressure",
                under.stall,
                ("NodeletHasPressureStall", "a pressure stall threshold (--eviction-pressure-stall) was exceeded"),
                ("NodeletHasNoPressureStall", "no pressure stall threshold is exceeded"),
            ));
        }
        status.conditions.get_or_insert_default().push(match self.network.readiness() {
            Ok(()) => condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            Err(e) => condition(
                "Ready",
                "False",
                "KubeletNotReady",
                &format!(
                    "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady \
                         message:Network plugin returns error: {e}"
                ),
            ),
        });
        status
    }

    /// Renews the Lease every `leaseDuration / 4` (10 s with the default 40 s), creating it when missing.
    pub async fn run_lease(&self) {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let name = self.config.node_name.clone();
        let duration = self.config.kubelet.node_lease_duration_seconds;
        let interval = Duration::from_secs(u64::from(duration).div_ceil(4).max(1));
        let nodes: Api<Node> = Api::all(self.client.clone());
        // The Lease is owned by its Node (upstream): deleting the Node deletes it.
        let mut owner: Option<OwnerReference> = None;
        loop {
            if owner.is_none()
                && let Ok(Some(node)) = nodes.get_opt(&name).await
            {
                owner = node.metadata.uid.map(|uid| OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: name.clone(),
                    uid,
                    ..Default::default()
                });
            }
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some("kube-node-lease".into()),
                    owner_references: owner.clone().map(|o| vec![o]),
                    ..Default::default()
                },
                spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                    holder_identity: Some(name.clone()),
                    lease_duration_seconds: Some(i32::try_from(duration).unwrap_or(i32::MAX)),
                    renew_time: Some(MicroTime(Timestamp::now())),
                    ..Default::default()
                }),
            };
            let patch = match &lease.metadata.owner_references {
                Some(owners) => serde_json::json!({"metadata": {"ownerReferences": owners}, "spec": lease.spec}),
                None => serde_json::json!({"spec": lease.spec}),
            };
            let result = match leases.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    leases.create(&PostParams::default(), &lease).await.map(|_| ())
                }
                other => other.map(|_| ()),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "renewing the node lease failed");
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Patches the node status when it changed (conditions, capacity...) and at least every report interval.
    pub async fn run_status(&self) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let mut last: Option<(NodeStatus, Instant)> = None;
        loop {
            let previous = last.as_ref().map(|(s, _)| s);
            let status = self.status(previous);
            let changed = previous.is_none_or(|p| !same_ignoring_heartbeats(p, &status));
            let due =
                last.as_ref().is_none_or(|(_, at)| at.elapsed() >= self.config.kubelet.node_status_report_frequency);
            if changed || due {
                let patch = serde_json::json!({"status": status});
                match nodes.patch_status(&self.config.node_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => last = Some((status, Instant::now())),
                    Err(e) => tracing::warn!(error = %e, "updating the node status failed"),
                }
            }
            tokio::time::sleep(self.config.kubelet.node_status_update_frequency).await;
        }
    }
}

/// The images on the node as the Node's status lists them: largest first, at most 50 (`nodeStatusMaxImages`),
/// each with its repo digests then its tags, at most 5 names (upstream).
pub fn node_images(mut records: Vec<crate::images::store::ImageRecord>) -> Vec<ContainerImage> {
    records.sort_by_key(|r| std::cmp::Reverse(r.size));
    records
        .into_iter()
        .take(50)
        .map(|r| {
            let names: Vec<String> = r.repo_digests.into_iter().chain(r.names).take(5).collect();
            ContainerImage { names: Some(names), size_bytes: i64::try_from(r.size).ok() }
        })
        .collect()
}

fn same_ignoring_heartbeats(a: &NodeStatus, b: &NodeStatus) -> bool {
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
        }
        serde_json::to_value(s).unwrap_or_default()
    };
    strip(a) == strip(b)
}

/// Reads the cluster's view of this node (for tests and `nodelet` diagnostics).
pub async fn get(client: &kube::Client, name: &str) -> Result<Node> {
    Api::<Node>::all(client.clone()).get(name).await.with_context(|| format!("reading node {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::digest::Digest;
    use crate::images::store::ImageRecord;

    fn record(n: u64, size: u64) -> ImageRecord {
        let d = Digest::parse(&format!("sha256:{}", &format!("{n:x}").repeat(64)[..64])).unwrap();
        ImageRecord {
            manifest: d.clone(),
            config: d,
            layers: Vec::new(),
            names: (0..4).map(|i| format!("r/img{n}:t{i}")).collect(),
            repo_digests: vec![format!("r/img{n}@sha256:{n}")],
            size,
            pulled_at: 0,
            last_used: 0,
        }
    }

    #[test]
    fn node_images_are_the_largest_fifty_with_digests_first() {
        let records: Vec<ImageRecord> = (1..=60).map(|n| record(n, n * 1000)).collect();
        let images = node_images(records);
        assert_eq!(images.len(), 50);
        assert_eq!(images[0].size_bytes, Some(60_000));
        let names = images[0].names.clone().unwrap();
        assert_eq!(names.len(), 5);
        assert_eq!(names[0], "r/img60@sha256:60");
    }
}
