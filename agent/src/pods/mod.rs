//! Pod workers: one task per pod (see [`worker`]), created by the dispatcher when a source first shows a pod,
//! after admission (pod count and resources against allocatable, upstream's `OutOf<resource>` rejections).

pub mod resources;
pub mod restore;
pub mod service_env;
pub mod spec;
pub mod state;
pub mod worker;

use std::collections::HashMap;
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use nodelet_cgroups::hierarchy::Hierarchy;
use nodelet_cgroups::qos::QosClass;
use nodelet_runtime::Runtime;
use tokio::sync::mpsc;

use crate::config::AgentConfig;
use crate::events::Recorder;
use crate::images::ImageManager;
use crate::sources::SourceEvent;
use crate::status::{StatusMessage, StatusSender};
use state::{Phase, PodState};
use worker::{Worker, WorkerMessage};

/// What every pod worker shares.
pub struct Ctx {
    pub runtime: Runtime,
    pub images: Arc<ImageManager>,
    pub hierarchy: Hierarchy,
    pub config: AgentConfig,
    pub client: Option<kube::Client>,
    pub events: Recorder,
    pub status: StatusSender,
    /// What the kubelet API shows; the dispatcher adds and removes pods.
    pub view: crate::status::view::PodView,
    /// The previous agent process's containers and sandboxes, until claimed or removed.
    pub leftovers: restore::Leftovers,
    /// Where pod workers save their records.
    pub states: restore::SavedStates,
    /// Pod networking (CNI).
    pub network: crate::network::Network,
    /// The cluster's services, for containers' service variables (with an API server).
    pub services: Option<service_env::ServiceCache>,
    /// Node allocatable: (cpu millis, memory bytes).
    pub allocatable: (u64, u64),
}

impl Ctx {
    /// Deletes a container (killing what is left of it) and its root filesystem.
    pub async fn remove_container(&self, c: &nodelet_runtime::Container) {
        let _ = self.runtime.delete(c).await;
        let _ = self.images.rootfs().remove(&c.id);
    }

    /// Releases a sandbox's network (while its namespace still exists, so the plugins find what to undo), then
    /// removes the sandbox.
    pub async fn remove_sandbox(&self, sandbox: &nodelet_runtime::Sandbox) {
        if let Err(e) = self.network.detach(&sandbox.id).await {
            tracing::warn!(sandbox = %sandbox.id, error = %e, "releasing a pod network");
        }
        if let Err(e) = self.runtime.remove_sandbox(sandbox).await {
            tracing::warn!(sandbox = %sandbox.id, error = %e, "removing a sandbox");
        }
    }
}

struct Admitted {
    tx: mpsc::Sender<WorkerMessage>,
    requests: (u64, u64),
}

/// Routes source events to pod workers.
pub struct PodWorkers {
    ctx: Arc<Ctx>,
    workers: HashMap<String, Admitted>,
    done_tx: mpsc::UnboundedSender<String>,
    done_rx: mpsc::UnboundedReceiver<String>,
    /// Sources that have not yet delivered their first complete set of pods.
    unsynced: usize,
}

impl PodWorkers {
    /// `sources`: how many pod sources will report [`SourceEvent::Synced`].
    pub fn new(ctx: Arc<Ctx>, sources: usize) -> PodWorkers {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        PodWorkers { ctx, workers: HashMap::new(), done_tx, done_rx, unsynced: sources }
    }

    pub async fn run(mut self, mut sources: mpsc::Receiver<SourceEvent>) {
        loop {
            tokio::select! {
                event = sources.recv() => match event {
                    Some(SourceEvent::Upsert(pod)) => self.upsert(*pod).await,
                    Some(SourceEvent::Remove { uid }) => {
                        if let Some(w) = self.workers.get(&uid) {
                            let _ = w.tx.send(WorkerMessage::Remove).await;
                        }
                    }
                    Some(SourceEvent::Synced) => {
                        self.unsynced = self.unsynced.saturating_sub(1);
                        if self.unsynced == 0 {
                            self.remove_leftovers();
                        }
                    }
                    None => return,
                },
                Some(uid) = self.done_rx.recv() => {
                    self.workers.remove(&uid);
                    self.ctx.view.remove(&uid);
                }
            }
        }
    }

    async fn upsert(&mut self, pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if let Some(w) = self.workers.get(&uid) {
            self.ctx.view.upsert(pod.clone());
            let _ = w.tx.send(WorkerMessage::Update(Box::new(pod))).await;
            return;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let pod_ref = crate::events::PodRef::of(&pod);
        if phase == "Succeeded" || phase == "Failed" {
            // Finished before (or rejected): nothing runs; a deletion only needs the final delete.
            if pod.metadata.deletion_timestamp.is_some() {
                let _ = self.ctx.status.send(StatusMessage::Terminated { pod: pod_ref, delete: true });
            }
            return;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            let _ = self.ctx.status.send(StatusMessage::Terminated { pod: pod_ref, delete: true });
            return;
        }
        let requests = resources::pod_requests(&pod);
        if let Err((reason, message)) = self.admit(requests) {
            self.ctx.events.record(&pod_ref, None, true, reason, &message);
            let state = PodState {
                phase: Phase::Failed,
                reason: Some(reason.to_string()),
                message: Some(message),
                sandbox_ready: false,
                start_time: Timestamp::now(),
                qos: resources::pod_qos(&pod),
                host_ip: self.ctx.config.node_ip.clone(),
                pod_ip: None,
                init: Vec::new(),
                containers: Vec::new(),
            };
            let _ = self.ctx.status.send(StatusMessage::Update { pod: pod_ref, state: Box::new(state) });
            return;
        }
        let (tx, rx) = mpsc::channel(16);
        self.workers.insert(uid.clone(), Admitted { tx, requests });
        self.ctx.view.upsert(pod.clone());
        let inherited = self.ctx.leftovers.claim(&uid, &self.ctx.states);
        let (ctx, done) = (self.ctx.clone(), self.done_tx.clone());
        tokio::spawn(async move {
            Worker::new(ctx, pod, rx, inherited).run().await;
            let _ = done.send(uid);
        });
    }

    /// Once every source has said what it wants: removes what the previous agent left that no pod claimed
    /// (containers, sandboxes, saved records and pod cgroups of pods deleted while the agent was down).
    fn remove_leftovers(&self) {
        let (containers, sandboxes) = self.ctx.leftovers.unclaimed();
        let stale: Vec<String> = self.ctx.states.uids().into_iter().filter(|u| !self.workers.contains_key(u)).collect();
        // Network attachments of sandboxes that are gone (their DEL needs only the cache).
        let detached: Vec<String> =
            self.ctx.network.attached().into_iter().filter(|u| !self.workers.contains_key(u)).collect();
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let mut containers = containers;
            for sandbox in sandboxes {
                // Its containers first keep the namespaces alive, so the network is released completely (the
                // bridge plugin finds its addresses, and with them its iptables rules, in the namespace).
                let prefix = format!("{}-", sandbox.id);
                let member = containers.iter().find(|c| c.id.starts_with(&prefix)).map(|c| c.pid);
                let sandbox = sandbox.repair(member).unwrap_or(sandbox);
                if let Err(e) = ctx.network.detach(&sandbox.id).await {
                    tracing::warn!(sandbox = %sandbox.id, error = %e, "releasing a leftover pod network");
                }
                remove_unwanted(&ctx, &mut containers, &prefix).await;
                ctx.remove_sandbox(&sandbox).await;
            }
            remove_unwanted(&ctx, &mut containers, "").await;
            for uid in detached {
                if let Err(e) = ctx.network.detach(&uid).await {
                    tracing::warn!(sandbox = %uid, error = %e, "releasing a leftover pod network");
                }
                ctx.network.remove_files(&uid);
            }
            for uid in stale {
                let qos = ctx.states.load(&uid).and_then(|s| QosClass::parse(&s.qos));
                if let Some(qos) = qos {
                    let (ctx, pod) = (ctx.clone(), uid.clone());
                    let removed = tokio::task::spawn_blocking(move || {
                        ctx.hierarchy.remove_pod(qos, &pod, std::time::Duration::from_secs(10))
                    })
                    .await;
                    if let Ok(Err(e)) = removed {
                        tracing::warn!(%uid, error = %e, "removing a leftover pod cgroup");
                    }
                }
                ctx.states.remove(&uid);
            }
        });
    }

    /// Upstream's admission: pod count, then cpu and memory requests against allocatable.
    fn admit(&self, (cpu, memory): (u64, u64)) -> Result<(), (&'static str, String)> {
        let max_pods = u64::from(self.ctx.config.kubelet.max_pods);
        let used = self.workers.len() as u64;
        if used + 1 > max_pods {
            return Err((
                "OutOfpods",
                format!("Node didn't have enough resource: pods, requested: 1, used: {used}, capacity: {max_pods}"),
            ));
        }
        let (cap_cpu, cap_memory) = self.ctx.allocatable;
        let used_cpu: u64 = self.workers.values().map(|w| w.requests.0).sum();
        let used_memory: u64 = self.workers.values().map(|w| w.requests.1).sum();
        if used_cpu + cpu > cap_cpu {
            return Err((
                "OutOfcpu",
                format!(
                    "Node didn't have enough resource: cpu, requested: {cpu}, used: {used_cpu}, capacity: {cap_cpu}"
                ),
            ));
        }
        if used_memory + memory > cap_memory {
            return Err((
                "OutOfmemory",
                format!(
                    "Node didn't have enough resource: memory, requested: {memory}, used: {used_memory}, capacity: {cap_memory}"
                ),
            ));
        }
        Ok(())
    }
}

/// Removes the containers whose IDs start with `prefix` from `containers`, and deletes them.
async fn remove_unwanted(ctx: &Ctx, containers: &mut Vec<nodelet_runtime::Container>, prefix: &str) {
    let (unwanted, rest): (Vec<_>, Vec<_>) =
        std::mem::take(containers).into_iter().partition(|c| c.id.starts_with(prefix));
    *containers = rest;
    for c in unwanted {
        tracing::info!(container = %c.id, "removing a container no pod wants");
        ctx.remove_container(&c).await;
    }
}
