//! Pod workers: one task per pod (see [`worker`]), created by the dispatcher when a source first shows a pod,
//! after admission (pod count and resources against allocatable, upstream's `OutOf<resource>` rejections).

pub mod admission;
pub mod attach;
pub mod downward_api;
pub mod health;
pub mod plan;
pub mod resources;
pub mod restore;
pub mod service_env;
pub mod services;
pub mod spec;
pub mod state;
pub mod sysctls;
pub mod termination_message;
pub mod unsupported;
pub mod user_namespaces;
pub mod validation;
pub mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use nodelet_cgroups::qos::QosClass;
use tokio::sync::{mpsc, watch};

use crate::config::AgentConfig;
use crate::events::Recorder;
use crate::sources::SourceEvent;
use crate::status::{StatusMessage, StatusSender};
use services::{ContainerRuntime, ImageService, PodCgroups, PodNetwork};
use state::{Phase, PodState};
use worker::{Desired, Worker};

/// What every pod worker shares.
pub struct Ctx {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub images: Arc<dyn ImageService>,
    pub hierarchy: Arc<dyn PodCgroups>,
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
    pub network: Arc<dyn PodNetwork>,
    /// Pods' volumes.
    pub volumes: crate::volumes::VolumeManager,
    /// The cluster's services, for containers' service variables (with an API server).
    pub services: Option<service_env::ServiceCache>,
    /// Node allocatable: (cpu millis, memory bytes).
    pub allocatable: (u64, u64),
    /// The lowest `oom_score_adj` a container may get: the agent's own (where the agent could not lower its own,
    /// e.g. without CAP_SYS_RESOURCE, neither can its containers: containerd's rootless rule).
    pub min_oom_score_adj: i32,
    /// Running containers' output and stdin, for `kubectl attach`.
    pub attachments: attach::Attachments,
    /// Records of OOM kills (`/debug/oom`).
    pub oom: crate::oom::OomLog,
    /// What pods may ask for beyond resources (sysctls, AppArmor).
    pub admission: admission::Policy,
    /// The node's pressure conditions (the eviction manager's): admission refuses pods under them.
    pub pressure: tokio::sync::watch::Receiver<crate::node::conditions::Pressure>,
    /// The ranges of ids of pods with `hostUsers: false`.
    pub user_namespaces: Arc<user_namespaces::UserNamespaces>,
}

impl Ctx {
    /// Deletes a container (killing what is left of it) and its root filesystem.
    pub async fn remove_container(&self, id: &str) {
        self.runtime.delete(id).await;
        let (images, id) = (self.images.clone(), id.to_string());
        let _ = tokio::task::spawn_blocking(move || images.remove_rootfs(&id)).await;
    }

    /// Removes a pod's cgroup (killing what is left in it), off the async threads: removal retries while the
    /// cgroup drains.
    pub async fn remove_pod_cgroup(&self, qos: QosClass, uid: &str) {
        let (hierarchy, pod) = (self.hierarchy.clone(), uid.to_string());
        let removed =
            tokio::task::spawn_blocking(move || hierarchy.remove_pod(qos, &pod, Duration::from_secs(10))).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(%uid, error = %e, "removing a pod cgroup");
        }
    }

    /// A pod's cgroup, known by the QoS class in its saved records (a pod whose worker is gone).
    async fn remove_saved_pod_cgroup(&self, uid: &str) {
        if let Some(qos) = self.states.load(uid).and_then(|s| QosClass::parse(&s.qos)) {
            self.remove_pod_cgroup(qos, uid).await;
        }
    }

    /// Unmounts and removes a pod's volumes, off the async threads.
    pub async fn tear_down_volumes(self: &Arc<Self>, uid: &str) {
        let (ctx, pod) = (self.clone(), uid.to_string());
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || ctx.volumes.tear_down(&pod)).await {
            tracing::warn!(%uid, error = %e, "tearing down a pod's volumes");
        }
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

/// What the dispatcher and a pod's worker share.
#[derive(Debug, Default)]
pub struct Shared {
    /// Set by the worker once its pod is terminal: it no longer counts for admission.
    pub terminal: AtomicBool,
    /// Set by the dispatcher while a resize does not fit beside the other pods (upstream's `Deferred`): why.
    pub resize_deferred: std::sync::Mutex<Option<String>>,
    /// Set by the dispatcher when the eviction manager picked the pod.
    pub eviction: std::sync::Mutex<Option<crate::eviction::Eviction>>,
}

impl Shared {
    pub fn deferred(&self) -> Option<String> {
        self.resize_deferred.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_deferred(&self, why: Option<String>) {
        *self.resize_deferred.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    pub fn eviction(&self) -> Option<crate::eviction::Eviction> {
        self.eviction.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct Admitted {
    tx: watch::Sender<Desired>,
    requests: (u64, u64),
    qos: QosClass,
    /// Shared with the worker: its pod is terminal; its resize is deferred.
    shared: Arc<Shared>,
}

/// How a worker task ended.
enum Done {
    Finished(String),
    /// It panicked: its pod's containers are released and a new worker takes the pod over.
    Panicked {
        uid: String,
        message: String,
    },
    /// A panicked worker's pod was released; a new worker may start.
    Released(String),
}

/// Routes source events to pod workers; never waits for one (each has a coalescing inbox).
pub struct PodWorkers {
    ctx: Arc<Ctx>,
    workers: HashMap<String, Admitted>,
    /// Pods refused (validation, admission): they stay refused until their source forgets them.
    rejected: HashMap<String, crate::events::PodRef>,
    /// Pods whose worker panicked, while their containers are released: the latest desired pod.
    releasing: HashMap<String, Desired>,
    /// Panics per pod, for the delay before its next worker.
    panics: HashMap<String, u32>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Sources that have not yet delivered their first complete set of pods.
    unsynced: usize,
    /// The cpu requests the burstable QoS cgroup's shares were last set to.
    burstable_millis: Option<u64>,
    /// When this agent process started: root filesystems older than that and without a container are leftovers.
    started: std::time::SystemTime,
    /// Pods the eviction manager picked (see [`PodWorkers::take_evictions`]).
    evictions: Option<mpsc::UnboundedReceiver<crate::eviction::Eviction>>,
}

impl PodWorkers {
    /// `sources`: how many pod sources will report [`SourceEvent::Synced`].
    pub fn new(ctx: Arc<Ctx>, sources: usize) -> PodWorkers {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        PodWorkers {
            ctx,
            workers: HashMap::new(),
            rejected: HashMap::new(),
            releasing: HashMap::new(),
            panics: HashMap::new(),
            done_tx,
            done_rx,
            unsynced: sources,
            burstable_millis: None,
            started: std::time::SystemTime::now(),
            evictions: None,
        }
    }

    /// Takes the pods the eviction manager picks.
    pub fn take_evictions(&mut self, evictions: mpsc::UnboundedReceiver<crate::eviction::Eviction>) {
        self.evictions = Some(evictions);
    }

    /// Hands the eviction to the pod's worker, which fails the pod (see `Worker::evict`).
    fn evict(&mut self, eviction: crate::eviction::Eviction) {
        let Some(w) = self.workers.get(&eviction.uid) else { return };
        *w.shared.eviction.lock().unwrap_or_else(|e| e.into_inner()) = Some(eviction);
        w.tx.send_modify(|_| {});
    }

    pub async fn run(mut self, mut sources: mpsc::Receiver<SourceEvent>) {
        let mut heartbeat = tokio::time::interval(health::BEAT_EVERY);
        // Without an eviction manager (tests), a channel nobody sends on.
        let (_none, unused) = mpsc::unbounded_channel();
        let mut evictions = self.evictions.take().unwrap_or(unused);
        if self.unsynced == 0 {
            // No sources: nothing will sync, and nothing is missing from the view.
            self.ctx.view.mark_synced();
        }
        loop {
            tokio::select! {
                _ = heartbeat.tick() => health::beat(),
                Some(eviction) = evictions.recv() => self.evict(eviction),
                event = sources.recv() => match event {
                    Some(SourceEvent::Upsert(pod)) => self.upsert(*pod),
                    Some(SourceEvent::Remove { uid }) => {
                        if let Some(pod) = self.rejected.remove(&uid) {
                            // Nothing ran: only its status goes.
                            let _ = self.ctx.status.send(StatusMessage::Terminated { pod, delete: false });
                        }
                        self.panics.remove(&uid);
                        if let Some(desired) = self.releasing.get_mut(&uid) {
                            *desired = Desired::Removed;
                        }
                        if let Some(w) = self.workers.get(&uid) {
                            w.tx.send_replace(Desired::Removed);
                        }
                    }
                    Some(SourceEvent::Synced) => {
                        self.unsynced = self.unsynced.saturating_sub(1);
                        if self.unsynced == 0 {
                            self.ctx.view.mark_synced();
                            self.remove_leftovers();
                        }
                    }
                    None => return,
                },
                Some(done) = self.done_rx.recv() => self.on_done(done),
            }
        }
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Finished(uid) => {
                self.workers.remove(&uid);
                self.ctx.view.remove(&uid);
                self.update_burstable_shares();
                self.retry_deferred();
            }
            Done::Panicked { uid, message } => {
                let Some(w) = self.workers.remove(&uid) else { return };
                let desired = w.tx.borrow().clone();
                tracing::error!(%uid, %message, "a pod worker panicked: releasing its pod and starting it again");
                if let Desired::Pod(pod) = &desired {
                    let message = format!(
                        "pod worker failed: {message}; its containers are stopped and the pod is started again"
                    );
                    self.ctx.events.record(&crate::events::PodRef::of(pod), None, true, "FailedSync", &message);
                }
                self.releasing.insert(uid.clone(), desired);
                let panics = self.panics.entry(uid.clone()).or_default();
                *panics += 1;
                let delay = Duration::from_secs(1 << (*panics).min(6));
                let (ctx, done) = (self.ctx.clone(), self.done_tx.clone());
                tokio::spawn(async move {
                    release(&ctx, &uid).await;
                    tokio::time::sleep(delay).await;
                    let _ = done.send(Done::Released(uid));
                });
            }
            Done::Released(uid) => match self.releasing.remove(&uid) {
                Some(Desired::Pod(pod)) => self.upsert(Arc::unwrap_or_clone(pod)),
                _ => {
                    self.ctx.view.remove(&uid);
                    self.ctx.states.remove(&uid);
                    let ctx = self.ctx.clone();
                    tokio::spawn(async move { ctx.tear_down_volumes(&uid).await });
                }
            },
        }
    }

    fn upsert(&mut self, pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if let Some(desired) = self.releasing.get_mut(&uid) {
            *desired = Desired::Pod(Arc::new(pod));
            return;
        }
        if self.workers.contains_key(&uid) {
            self.ctx.view.upsert(pod.clone());
            self.allocate(&uid, &pod);
            if let Some(w) = self.workers.get(&uid) {
                w.tx.send_replace(Desired::Pod(Arc::new(pod)));
            }
            return;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let pod_ref = crate::events::PodRef::of(&pod);
        let finished = phase == "Succeeded" || phase == "Failed" || self.rejected.contains_key(&uid);
        if finished || pod.metadata.deletion_timestamp.is_some() {
            // Finished before (or rejected), or deleted before it ran: nothing runs; a deletion only needs the
            // final delete.
            if pod.metadata.deletion_timestamp.is_some() {
                let _ = self.ctx.status.send(StatusMessage::Terminated { pod: pod_ref, delete: true });
            }
            return;
        }
        let errors = validation::validate(&pod);
        if !errors.is_empty() {
            let name = pod.metadata.name.clone().unwrap_or_default();
            return self.reject(
                &pod,
                "FailedValidation",
                format!("Error validating pod {name}: {}", errors.join(", ")),
            );
        }
        let requests = resources::pod_requests(&pod);
        let pressure = *self.ctx.pressure.borrow();
        if let Err(admission::Rejection { reason, message }) =
            admission::admit(&pod, requests, self.usage(), self.capacity(), (&self.ctx.admission, pressure))
        {
            return self.reject(&pod, reason, message);
        }
        let shared = Arc::new(Shared::default());
        let pod = Arc::new(pod);
        let (tx, rx) = watch::channel(Desired::Pod(pod.clone()));
        let qos = resources::pod_qos(&pod);
        self.workers.insert(uid.clone(), Admitted { tx, requests, qos, shared: shared.clone() });
        self.update_burstable_shares();
        self.ctx.view.upsert(Pod::clone(&pod));
        let inherited = self.ctx.leftovers.claim(&uid, &self.ctx.states);
        let worker = Worker::new(self.ctx.clone(), Arc::unwrap_or_clone(pod), rx, inherited, shared);
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let done_message = match supervise(worker.run()).await {
                Ok(()) => Done::Finished(uid),
                Err(message) => Done::Panicked { uid, message },
            };
            let _ = done.send(done_message);
        });
    }

    /// Refuses a pod for good: `Failed` with `reason`, and a warning event.
    fn reject(&mut self, pod: &Pod, reason: &'static str, message: String) {
        let pod_ref = crate::events::PodRef::of(pod);
        self.rejected.insert(pod_ref.uid.clone(), pod_ref.clone());
        tracing::warn!(pod = %pod_ref.name, %reason, %message, "pod refused");
        self.ctx.events.record(&pod_ref, None, true, reason, &message);
        let state = PodState {
            phase: Phase::Failed,
            reason: Some(reason.to_string()),
            message: Some(message),
            sandbox_ready: false,
            initialized: false,
            observed_generation: pod.metadata.generation,
            start_time: Timestamp::now(),
            qos: resources::pod_qos(pod),
            host_ip: self.ctx.config.node_ip.clone(),
            pod_ip: None,
            init: Vec::new(),
            containers: Vec::new(),
            readiness_gates: Vec::new(),
            resize: None,
            ephemeral: Vec::new(),
            disruption: None,
            restart_all: None,
        };
        let _ = self.ctx.status.send(StatusMessage::Update { pod: pod_ref, state: Box::new(state) });
    }

    /// A running pod whose requests changed (an in-place resize): allocated if it fits beside the other pods'
    /// requests, else deferred (upstream's `PodResizePending`/`Deferred`) until it does. More than the node has at
    /// all is the worker's `Infeasible`.
    fn allocate(&mut self, uid: &str, pod: &Pod) {
        let wanted = resources::pod_requests(pod);
        let Some(w) = self.workers.get(uid) else { return };
        if wanted == w.requests && w.shared.deferred().is_none() {
            return;
        }
        let others = self.usage_without(uid);
        let capacity = self.capacity();
        let short = [
            ("cpu", wanted.0, others.cpu_millis, capacity.cpu_millis),
            ("memory", wanted.1, others.memory_bytes, capacity.memory_bytes),
        ]
        .into_iter()
        .find(|(_, want, used, cap)| want <= cap && used + want > *cap);
        let Some(w) = self.workers.get_mut(uid) else { return };
        match short {
            Some((resource, want, used, cap)) => w.shared.set_deferred(Some(format!(
                "Node didn't have enough resource: {resource}, requested: {want}, used: {used}, capacity: {cap}"
            ))),
            None => {
                w.requests = wanted;
                w.shared.set_deferred(None);
            }
        }
        self.update_burstable_shares();
    }

    /// Deferred resizes looked at again (a pod ended or went): a worker whose resize now fits is woken.
    fn retry_deferred(&mut self) {
        let deferred: Vec<String> =
            self.workers.iter().filter(|(_, w)| w.shared.deferred().is_some()).map(|(uid, _)| uid.clone()).collect();
        for uid in deferred {
            let Some(Desired::Pod(pod)) = self.workers.get(&uid).map(|w| w.tx.borrow().clone()) else { continue };
            self.allocate(&uid, &pod);
            if let Some(w) = self.workers.get(&uid).filter(|w| w.shared.deferred().is_none()) {
                w.tx.send_modify(|_| {});
            }
        }
    }

    /// The burstable QoS cgroup's cpu shares follow its running pods' cpu requests (upstream's QoS manager), so
    /// that burstable pods together get their share against guaranteed ones.
    fn update_burstable_shares(&mut self) {
        let active = self
            .workers
            .values()
            .filter(|w| w.qos == QosClass::Burstable && !w.shared.terminal.load(Ordering::Relaxed));
        let millis: u64 = active.map(|w| w.requests.0).sum();
        if self.burstable_millis == Some(millis) {
            return;
        }
        self.burstable_millis = Some(millis);
        let hierarchy = self.ctx.hierarchy.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = hierarchy.update_burstable(millis) {
                tracing::warn!(error = %e, "updating the burstable cgroup's cpu shares");
            }
        });
    }

    /// What the admitted pods that are not terminal use.
    fn usage(&self) -> admission::Usage {
        self.usage_without("")
    }

    /// [`PodWorkers::usage`] of every pod but `uid`.
    fn usage_without(&self, uid: &str) -> admission::Usage {
        let active = self
            .workers
            .iter()
            // As upstream's active pods: not terminal, and still wanted by a source (a pod deleted from the API
            // holds no slot while its containers are stopped and its volumes torn down).
            .filter(|(u, w)| {
                *u != uid && !w.shared.terminal.load(Ordering::Relaxed) && !matches!(*w.tx.borrow(), Desired::Removed)
            })
            .map(|(_, w)| w);
        active.fold(admission::Usage::default(), |u, w| admission::Usage {
            pods: u.pods + 1,
            cpu_millis: u.cpu_millis + w.requests.0,
            memory_bytes: u.memory_bytes + w.requests.1,
        })
    }

    fn capacity(&self) -> admission::Capacity {
        let (cpu_millis, memory_bytes) = self.ctx.allocatable;
        admission::Capacity { max_pods: u64::from(self.ctx.config.kubelet.max_pods), cpu_millis, memory_bytes }
    }

    /// Once every source has said what it wants: removes what the previous agent left that no pod claimed
    /// (containers, sandboxes, saved records and pod cgroups of pods deleted while the agent was down).
    fn remove_leftovers(&self) {
        let (containers, sandboxes) = self.ctx.leftovers.unclaimed();
        let stale: Vec<String> = self.ctx.states.uids().into_iter().filter(|u| !self.workers.contains_key(u)).collect();
        // Network attachments of sandboxes that are gone (their DEL needs only the cache).
        let detached: Vec<String> =
            self.ctx.network.attached().into_iter().filter(|u| !self.workers.contains_key(u)).collect();
        let unmounted: Vec<String> =
            self.ctx.volumes.pods_on_disk().into_iter().filter(|u| !self.workers.contains_key(u)).collect();
        // Image volumes (`<uid>.volume.<name>`) of pods no worker runs.
        let image_volumes: Vec<String> = self
            .ctx
            .images
            .rootfs_made_before(self.started)
            .into_iter()
            .filter(|id| id.split_once(".volume.").is_some_and(|(uid, _)| !self.workers.contains_key(uid)))
            .collect();
        let (ctx, started) = (self.ctx.clone(), self.started);
        // Taken now: a pod admitted from here on may get a range before the task below is done.
        let unheld: Vec<String> = self
            .ctx
            .user_namespaces
            .held()
            .into_iter()
            .filter(|u| !self.workers.contains_key(u) && !self.releasing.contains_key(u))
            .collect();
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
            // No process of theirs is left: the user namespace ranges of pods that are gone.
            for uid in unheld {
                ctx.user_namespaces.release(&uid);
            }
            for uid in detached {
                if let Err(e) = ctx.network.detach(&uid).await {
                    tracing::warn!(sandbox = %uid, error = %e, "releasing a leftover pod network");
                }
                ctx.network.remove_files(&uid);
            }
            for uid in stale {
                ctx.remove_saved_pod_cgroup(&uid).await;
                ctx.states.remove(&uid);
            }
            // Root filesystems the previous agent made for containers it never created (it died in between).
            let live = ctx.runtime.list_matching("").await;
            let made = ctx.images.rootfs_made_before(started);
            let unused = made.into_iter().filter(|id| !id.contains('.') && !live.contains(id));
            for id in unused.chain(image_volumes) {
                tracing::info!(container = %id, "removing a root filesystem no container uses");
                let (images, id) = (ctx.images.clone(), id.clone());
                let _ = tokio::task::spawn_blocking(move || images.remove_rootfs(&id)).await;
            }
            // After the containers: nothing uses these volumes any more.
            for uid in unmounted {
                tracing::info!(pod = %uid, "tearing down the volumes of a pod that is gone");
                ctx.tear_down_volumes(&uid).await;
            }
        });
    }
}

/// Runs a pod worker as a task of its own: `Err` with the panic's message if it panicked (never a silent end).
pub async fn supervise(worker: impl Future<Output = ()> + Send + 'static) -> Result<(), String> {
    match tokio::spawn(worker).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(message)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Releases what a failed worker held of pod `uid`: its containers (stopped with the default grace period), its
/// sandbox and network, its pod cgroup. Its saved records stay, so the next worker carries on its restart counts.
async fn release(ctx: &Ctx, uid: &str) {
    for c in ctx.runtime.list_matching(&format!("{uid}-")).await {
        ctx.runtime.stop(&c, Duration::from_secs(30)).await;
        ctx.remove_container(&c).await;
    }
    for sandbox in ctx.runtime.list_sandboxes().into_iter().filter(|s| s.id == uid) {
        ctx.remove_sandbox(&sandbox).await;
    }
    ctx.network.remove_files(uid);
    ctx.remove_saved_pod_cgroup(uid).await;
}

/// Removes the containers whose IDs start with `prefix` from `containers`, and deletes them.
async fn remove_unwanted(ctx: &Ctx, containers: &mut Vec<nodelet_runtime::Container>, prefix: &str) {
    let (unwanted, rest): (Vec<_>, Vec<_>) =
        std::mem::take(containers).into_iter().partition(|c| c.id.starts_with(prefix));
    *containers = rest;
    for c in unwanted {
        tracing::info!(container = %c.id, "removing a container no pod wants");
        let id = ctx.runtime.adopt(c);
        ctx.remove_container(&id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_worker_is_reported_with_its_message() {
        assert_eq!(supervise(async {}).await, Ok(()));
        let panicked = supervise(async { panic!("injected: worker {}", 7) }).await;
        assert_eq!(panicked, Err("injected: worker 7".to_string()));
        let static_message = supervise(async { std::panic::panic_any("static") }).await;
        assert_eq!(static_message, Err("static".to_string()));
    }

    fn test_pod(name: &str, uid: &str, cpu: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "uid": uid},
            "spec": {"containers": [{"name": "main", "image": "busybox",
                "resources": {"requests": {"cpu": cpu}, "limits": {"memory": "64Mi"}}}]}
        }))
        .unwrap()
    }

    /// The next state reported for pod `name` that satisfies `f`.
    async fn state_of(
        status: &mut mpsc::UnboundedReceiver<StatusMessage>,
        name: &str,
        what: &str,
        f: impl Fn(&PodState) -> bool,
    ) -> PodState {
        let wait = async {
            while let Some(message) = status.recv().await {
                if let StatusMessage::Update { pod, state } = message
                    && pod.name == name
                    && f(&state)
                {
                    return *state;
                }
            }
            panic!("the status channel closed");
        };
        tokio::time::timeout(Duration::from_secs(10), wait).await.unwrap_or_else(|_| panic!("{name}: never {what}"))
    }

    #[tokio::test]
    async fn a_resize_that_does_not_fit_beside_the_others_is_deferred_until_it_does() {
        use services::fake::{self, FakeRuntime};
        let dir = tempfile::tempdir().unwrap();
        // The fake node has 2000m of cpu.
        let (ctx, mut status) = fake::ctx(dir.path(), Arc::new(FakeRuntime::default()), Default::default());
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(PodWorkers::new(ctx, 1).run(rx));
        tx.send(SourceEvent::Upsert(Box::new(test_pod("big", "u1", "1500m")))).await.unwrap();
        tx.send(SourceEvent::Upsert(Box::new(test_pod("small", "u2", "200m")))).await.unwrap();
        let running = |s: &PodState| s.containers.first().is_some_and(|c| c.state.is_running());
        state_of(&mut status, "small", "running", running).await;
        tx.send(SourceEvent::Upsert(Box::new(test_pod("small", "u2", "800m")))).await.unwrap();
        let deferred = state_of(&mut status, "small", "deferred", |s| s.resize.is_some()).await;
        let Some(state::ResizeStatus::Pending { reason, message }) = deferred.resize else { panic!("{deferred:?}") };
        assert_eq!(reason, "Deferred");
        assert_eq!(message, "Node didn't have enough resource: cpu, requested: 800, used: 1500, capacity: 2000");
        // The big pod goes: the resize fits now and is applied without waiting for a retry.
        tx.send(SourceEvent::Remove { uid: "u1".into() }).await.unwrap();
        let applied = state_of(&mut status, "small", "resized", |s| {
            s.resize.is_none()
                && s.containers[0]
                    .applied
                    .as_ref()
                    .is_some_and(|a| a.requests.get("cpu").map(String::as_str) == Some("800m"))
        })
        .await;
        assert_eq!(applied.containers[0].restart_count, 0);
    }

    #[tokio::test]
    async fn a_worker_that_panics_is_replaced_and_its_pod_runs() {
        use services::fake::{self, FakeRuntime, Script};
        let dir = tempfile::tempdir().unwrap();
        let runtime = Arc::new(FakeRuntime::default());
        runtime.script("main", Script::PanicOnce);
        let (ctx, mut status) = fake::ctx(dir.path(), runtime.clone(), Default::default());
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(PodWorkers::new(ctx, 1).run(rx));
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u1"},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]}
        }))
        .unwrap();
        tx.send(SourceEvent::Upsert(Box::new(pod))).await.unwrap();
        let running = async {
            while let Some(message) = status.recv().await {
                if let StatusMessage::Update { state, .. } = message
                    && state.containers.first().is_some_and(|c| c.state.is_running())
                {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), running).await.expect("the pod runs after the panic");
        let log = runtime.log();
        assert_eq!(log.iter().filter(|l| *l == "create main").count(), 2, "{log:?}");
        assert_eq!(log.iter().filter(|l| *l == "start main").count(), 1, "{log:?}");
        // The first worker's sandbox was released before the second made its own.
        let sandboxes: Vec<&String> = log.iter().filter(|l| l.contains("sandbox")).collect();
        assert_eq!(sandboxes, ["sandbox", "remove sandbox", "sandbox"], "{log:?}");
    }
}
