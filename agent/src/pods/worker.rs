//! One pod worker per pod: the only owner of that pod's actual state on the node. A reconcile loop: it sets up
//! the pod (cgroup, sandbox, network), then on every wake-up (a new spec, a container exit, a retry time) asks
//! [`plan`](super::plan::plan) what to do from the latest spec and its records, and does it (start, restart on a
//! spec change, stop the sidecars, fail the pod); the phase comes from [`super::plan::phase`]. On deletion it stops
//! the containers within the grace period (sidecars last). Every change goes to the status manager.
//!
//! Its inbox is a `watch` channel: the dispatcher replaces the desired pod and never waits; the worker sees the
//! latest.

mod exits;
mod probes;
mod resize;
mod start;
mod take_over;
mod termination;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container as ApiContainer, Pod};
use nodelet_runtime::{ContainerExit, Sandbox, SandboxConfig};
use tokio::sync::{mpsc, watch};

use super::plan::{self, Action};
use super::restore::{Inherited, Saved};
use super::state::{ContainerRecord, Kind, Phase, PodState};
use super::{Ctx, resources};
use crate::backoff::Backoff;
use crate::events::PodRef;
use crate::logs;
use crate::status::StatusMessage;

/// The pod's readiness gates and the status of their conditions in the API object (set by other controllers).
fn readiness_gates(pod: &Pod) -> Vec<(String, Option<String>)> {
    let gates = pod.spec.as_ref().and_then(|s| s.readiness_gates.as_ref());
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    gates
        .into_iter()
        .flatten()
        .map(|g| {
            let status =
                conditions.into_iter().flatten().find(|c| c.type_ == g.condition_type).map(|c| c.status.clone());
            (g.condition_type.clone(), status)
        })
        .collect()
}

/// What the dispatcher wants of a worker: the latest wins.
#[derive(Debug, Clone)]
pub enum Desired {
    /// The latest version of the pod (e.g. with a deletionTimestamp).
    Pod(Arc<Pod>),
    /// The pod is gone from its source: stop everything, do not touch the API object.
    Removed,
}

/// A bound on plan-and-act rounds per wake-up (each round changes a record, so a few suffice).
const MAX_ROUNDS: usize = 8;

/// How long to wait before retrying a container that could not start for image or config reasons.
const RETRY: Duration = Duration::from_secs(5);
/// How often a running pod's configMap, secret, downwardAPI and projected volumes are brought up to date besides
/// the changes their objects' watches report (tokens are renewed then, and a missed change is caught):
/// upstream's sync period.
const VOLUME_RESYNC: Duration = Duration::from_secs(60);
/// The retry key of the pod's volumes (container names cannot hold a `/`).
const VOLUMES: &str = "/volumes";
/// A container that ran this long has its crash-loop back-off reset (upstream: 10 min).
const BACKOFF_RESET: Duration = Duration::from_secs(600);

struct Running {
    id: String,
    /// Its probe tasks, aborted when the instance is dropped (readiness's only once it has stopped).
    probes: probes::Probes,
    started_at: Timestamp,
    started: Instant,
}

struct Exit {
    name: String,
    id: String,
    exit: ContainerExit,
}

pub struct Worker {
    ctx: Arc<Ctx>,
    pod: Pod,
    pod_ref: PodRef,
    state: PodState,
    rx: watch::Receiver<Desired>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
    /// OOM kills heard in a running instance's cgroup: (container name, instance ID).
    ooms_tx: mpsc::UnboundedSender<(String, String)>,
    ooms_rx: mpsc::UnboundedReceiver<(String, String)>,
    probe_tx: mpsc::UnboundedSender<crate::prober::ProbeReport>,
    probe_rx: mpsc::UnboundedReceiver<crate::prober::ProbeReport>,
    running: HashMap<String, Running>,
    crash_backoff: Backoff,
    next_attempt: HashMap<String, Instant>,
    sandbox: Option<Sandbox>,
    torn_down: bool,
    log_dir: PathBuf,
    /// What the previous agent process left of this pod, taken over when the worker starts.
    inherited: Option<Inherited>,
    /// The records last saved (see [`super::restore`]).
    saved: Option<Saved>,
    /// Bind mounts of the pod's resolv.conf, hosts and hostname.
    name_files: Vec<nodelet_runtime::Mount>,
    /// The pod's volumes, once set up (no container starts before).
    volumes: Option<crate::volumes::PodVolumes>,
    /// `image` volumes pulled and mounted (by the first container that mounts each).
    image_volumes: HashMap<String, PathBuf>,
    /// When the volumes' contents are next brought up to date.
    volumes_resync: Instant,
    /// Notified when an object the volumes show changes.
    volume_changes: Arc<tokio::sync::Notify>,
    /// A deletion or removal that arrived while a container was being prepared, handled first.
    pending: Option<Desired>,
    /// First pull's start and last pull's end: the pod start SLI leaves pulling out, as upstream's.
    pulling: Option<(Instant, Instant)>,
    /// Whether the pod's start was counted in `kubelet_pod_start_sli_duration_seconds` (or is not to be: a pod
    /// taken over from a previous agent).
    start_counted: bool,
    /// Shared with the dispatcher: the pod is terminal (it stops counting for admission); a deferred resize.
    shared: Arc<super::Shared>,
}

impl Worker {
    pub fn new(
        ctx: Arc<Ctx>,
        pod: Pod,
        rx: watch::Receiver<Desired>,
        inherited: Inherited,
        shared: Arc<super::Shared>,
    ) -> Worker {
        let spec = pod.spec.clone().unwrap_or_default();
        let pod_ref = PodRef::of(&pod);
        let host_network = spec.host_network.unwrap_or(false);
        let init: Vec<ContainerRecord> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| ContainerRecord::new(&c.name, c.image.as_deref().unwrap_or_default(), "PodInitializing"))
            .collect();
        let app_reason = if init.is_empty() { "ContainerCreating" } else { "PodInitializing" };
        let state = PodState {
            phase: Phase::Pending,
            reason: None,
            message: None,
            sandbox_ready: false,
            initialized: false,
            observed_generation: pod.metadata.generation,
            start_time: Timestamp::now(),
            qos: resources::pod_qos(&pod),
            host_ip: ctx.config.node_ip.clone(),
            pod_ip: host_network.then(|| ctx.config.node_ip.clone()),
            init,
            containers: spec
                .containers
                .iter()
                .map(|c| ContainerRecord::new(&c.name, c.image.as_deref().unwrap_or_default(), app_reason))
                .collect(),
            readiness_gates: Vec::new(),
            resize: None,
            ephemeral: Vec::new(),
            disruption: None,
            restart_all: None,
        };
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let (ooms_tx, ooms_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let volume_changes = ctx.volumes.changes(&pod_ref.uid);
        let log_dir = logs::pod_log_dir(&ctx.config.log_dir, &pod_ref.namespace, &pod_ref.name, &pod_ref.uid);
        let mut worker = Worker {
            ctx,
            pod,
            pod_ref,
            state,
            rx,
            exits_tx,
            exits_rx,
            ooms_tx,
            ooms_rx,
            probe_tx,
            probe_rx,
            running: HashMap::new(),
            crash_backoff: Backoff::new(Duration::from_secs(10), Duration::from_secs(300)),
            next_attempt: HashMap::new(),
            sandbox: None,
            torn_down: false,
            log_dir,
            inherited: Some(inherited),
            saved: None,
            name_files: Vec::new(),
            volumes: None,
            image_volumes: HashMap::new(),
            volumes_resync: Instant::now(),
            volume_changes,
            pending: None,
            pulling: None,
            start_counted: false,
            shared,
        };
        worker.add_ephemeral_containers();
        worker
    }

    fn publish(&mut self) {
        self.state.observed_generation = self.pod.metadata.generation;
        self.state.readiness_gates = readiness_gates(&self.pod);
        if self.state.phase.is_terminal() {
            self.shared.terminal.store(true, Ordering::Relaxed);
        }
        let saved = Saved::of(&self.state);
        if self.saved.as_ref() != Some(&saved) {
            if let Err(e) = self.ctx.states.save(&self.pod_ref.uid, &saved) {
                tracing::warn!(pod = %self.pod_ref.name, error = %e, "saving the pod's state");
            }
            self.saved = Some(saved);
        }
        let _ = self
            .ctx
            .status
            .send(StatusMessage::Update { pod: self.pod_ref.clone(), state: Box::new(self.state.clone()) });
    }

    /// A record for each ephemeral container the spec gained (`kubectl debug` adds them to the running pod);
    /// [`plan`] starts them.
    fn add_ephemeral_containers(&mut self) {
        let spec = self.pod.spec.as_ref().and_then(|s| s.ephemeral_containers.as_ref());
        for e in spec.into_iter().flatten() {
            if !self.state.ephemeral.iter().any(|r| r.name == e.name) {
                let image = e.image.as_deref().unwrap_or_default();
                self.state.ephemeral.push(ContainerRecord::new(&e.name, image, "ContainerCreating"));
            }
        }
    }

    fn event(&self, container: Option<(&str, Kind)>, warning: bool, reason: &str, message: &str) {
        self.ctx.events.record(&self.pod_ref, container, warning, reason, message);
    }

    /// Runs the pod until it is deleted or removed.
    /// Runs the pod until it is deleted or removed.
    pub async fn run(mut self) {
        let mut operation = "create";
        if let Some(inherited) = self.inherited.take() {
            // A pod a previous agent ran: its start was counted then.
            if !inherited.is_empty() {
                self.start_counted = true;
                operation = "sync";
            }
            self.take_over(inherited).await;
            let spec = self.pod.spec.clone().unwrap_or_default();
            // Its app containers ran before: the pod had initialized.
            self.state.initialized = plan::initialized(&spec, &self.state.init)
                || self.state.containers.iter().any(|c| c.container_id.is_some());
            self.refresh();
        }
        self.publish();
        loop {
            let round = Instant::now();
            if !self.state.phase.is_terminal()
                && let Some(eviction) = self.shared.eviction()
            {
                self.evict(eviction).await;
            }
            if !self.state.phase.is_terminal() {
                self.mount_volumes().await;
            }
            if self.sandbox.is_none()
                && self.volumes.is_some()
                && !self.state.phase.is_terminal()
                && let Err(e) = self.set_up().await
            {
                self.event(None, true, "FailedCreatePodSandBox", &format!("Failed to create pod sandbox: {e:#}"));
                self.next_attempt.insert(String::new(), Instant::now() + RETRY);
            }
            if self.sandbox.is_some() && self.volumes.is_some() {
                self.sync().await;
            }
            self.refresh();
            if self.state.phase.is_terminal() && self.running.is_empty() && !self.torn_down {
                self.tear_down().await;
            }
            self.publish();
            self.count_start();
            crate::metrics::kubelet::METRICS.pod_worker(operation, round.elapsed());
            operation = "sync";
            if let Some(desired) = self.pending.take() {
                operation = if matches!(desired, Desired::Pod(_)) { "update" } else { "sync" };
                if self.handle(desired).await {
                    return;
                }
                continue;
            }
            // Only retries still ahead count: a past one was acted on by `sync` above (else the loop would spin).
            let now = Instant::now();
            self.next_attempt.retain(|_, at| *at > now);
            let resync = (self.volumes.is_some() && !self.state.phase.is_terminal()).then_some(self.volumes_resync);
            let wake = self.next_attempt.values().min().copied().into_iter().chain(self.deadline()).chain(resync).min();
            let wake = wake.unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                changed = self.rx.changed() => {
                    let desired = self.latest(changed.is_ok());
                    operation = if matches!(desired, Desired::Pod(_)) { "update" } else { "sync" };
                    if self.handle(desired).await {
                        return;
                    }
                }
                Some(exit) = self.exits_rx.recv() => self.on_exit(exit).await,
                Some((name, id)) = self.ooms_rx.recv() => self.on_oom_kill(&name, &id),
                Some(report) = self.probe_rx.recv() => self.on_probe(report),
                _ = self.volume_changes.notified() => self.volumes_resync = Instant::now(),
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Counts the pod's start once all its app containers run: from its creation to now, less the time from
    /// the first pull's start to the last one's end (upstream's pod start SLI).
    fn count_start(&mut self) {
        if self.start_counted || self.state.containers.is_empty() {
            return;
        }
        if !self.state.containers.iter().all(|c| c.state.is_running()) {
            return;
        }
        self.start_counted = true;
        let Some(created) = self.pod.metadata.creation_timestamp.as_ref() else { return };
        let since = Timestamp::now().duration_since(created.0).as_secs_f64();
        let pulling = self.pulling.map_or(0.0, |(first, last)| last.saturating_duration_since(first).as_secs_f64());
        crate::metrics::kubelet::METRICS.pod_started(since - pulling);
    }

    /// The desired pod after the inbox changed (`open`: the dispatcher is still there).
    fn latest(&mut self, open: bool) -> Desired {
        if open { self.rx.borrow_and_update().clone() } else { Desired::Removed }
    }

    /// When `activeDeadlineSeconds` runs out, while the pod is not terminal.
    fn deadline(&self) -> Option<Instant> {
        let seconds = self.pod.spec.as_ref()?.active_deadline_seconds?;
        if self.state.phase.is_terminal() {
            return None;
        }
        let active = Duration::try_from(Timestamp::now().duration_since(self.state.start_time)).unwrap_or_default();
        let limit = Duration::from_secs(seconds.max(0).unsigned_abs());
        Some(Instant::now() + limit.saturating_sub(active))
    }

    /// Acts on the desired pod; true when the worker is done (the pod was deleted or removed).
    async fn handle(&mut self, desired: Desired) -> bool {
        match desired {
            Desired::Removed => {
                self.terminate(None, false).await;
                self.ctx.states.remove(&self.pod_ref.uid);
                true
            }
            Desired::Pod(pod) => {
                let deleting = pod.metadata.deletion_timestamp.is_some();
                let grace = pod.metadata.deletion_grace_period_seconds;
                // A deferred resize that the dispatcher now allocated: applied at once, not at the next retry
                // (only running containers wait for a resize retry; a crash back-off is left alone).
                let deferred = matches!(&self.state.resize, Some(super::state::ResizeStatus::Pending { reason, .. }) if *reason == "Deferred");
                if deferred && self.shared.deferred().is_none() {
                    let running: Vec<String> = self.running.keys().cloned().collect();
                    self.next_attempt.retain(|name, _| !running.contains(name));
                }
                // Labels and annotations a downwardAPI volume may show.
                if (&pod.metadata.labels, &pod.metadata.annotations)
                    != (&self.pod.metadata.labels, &self.pod.metadata.annotations)
                {
                    self.volumes_resync = Instant::now();
                }
                if let Some(spec) = &pod.spec {
                    for name in plan::changed_spec(spec, &self.state.init, &self.state.containers) {
                        self.crash_backoff.reset(&name);
                        self.next_attempt.remove(&name);
                    }
                }
                self.pod = Arc::unwrap_or_clone(pod);
                self.add_ephemeral_containers();
                if deleting {
                    self.terminate(grace, true).await;
                    self.ctx.states.remove(&self.pod_ref.uid);
                }
                deleting
            }
        }
    }

    fn log_rotation(&self) -> logs::Rotation {
        logs::Rotation {
            max_bytes: self.ctx.config.kubelet.container_log_max_bytes(),
            max_files: self.ctx.config.kubelet.container_log_max_files,
        }
    }

    /// Sets up the pod's volumes the first time (a failure is upstream's `FailedMount`, retried), then brings
    /// their contents up to date every [`VOLUME_RESYNC`].
    async fn mount_volumes(&mut self) {
        let now = Instant::now();
        if self.next_attempt.get(VOLUMES).is_some_and(|t| *t > now)
            || (self.volumes.is_some() && self.volumes_resync > now)
        {
            return;
        }
        let ips = crate::pods::downward_api::Ips { host: &self.ctx.config.node_ip, pod: self.state.pod_ip.as_deref() };
        let result = self.ctx.volumes.set_up(&self.pod, &ips).await;
        self.volumes_resync = Instant::now() + VOLUME_RESYNC;
        match result {
            Ok(volumes) => {
                self.next_attempt.remove(VOLUMES);
                self.volumes = Some(volumes);
            }
            Err(e) if self.volumes.is_some() => {
                // Running containers keep what they have; the next resync tries again.
                tracing::warn!(pod = %self.pod_ref.name, error = %e, "bringing volumes up to date");
            }
            Err(e) => {
                self.event(None, true, "FailedMount", &e.to_string());
                self.next_attempt.insert(VOLUMES.to_string(), Instant::now() + RETRY);
            }
        }
    }

    /// The pod cgroup and the sandbox (its namespaces).
    async fn set_up(&mut self) -> anyhow::Result<()> {
        if self.next_attempt.get("").is_some_and(|t| *t > Instant::now()) {
            return Ok(());
        }
        let spec = self.pod.spec.clone().unwrap_or_default();
        let limits = resources::pod_cgroup_limits(&self.pod);
        let (ctx, qos, uid) = (self.ctx.clone(), self.state.qos, self.pod_ref.uid.clone());
        let pids = resources::pod_pids_limit(self.ctx.config.kubelet.pod_pids_limit);
        tokio::task::spawn_blocking(move || ctx.hierarchy.ensure_pod(qos, &uid, &limits, pids)).await??;
        let host_network = spec.host_network.unwrap_or(false);
        let hostname = crate::network::dns::hostname(&self.pod, &self.ctx.config.node_name);
        // `hostUsers: false`: the pod's range, written down before the namespace is made with it.
        let user = if spec.host_users == Some(false) {
            let (manager, uid) = (self.ctx.user_namespaces.clone(), self.pod_ref.uid.clone());
            let got = tokio::task::spawn_blocking(move || manager.get_or_create(&uid)).await?;
            Some(got.map_err(anyhow::Error::msg)?)
        } else {
            None
        };
        let sandbox = self
            .ctx
            .runtime
            .create_sandbox(&SandboxConfig {
                id: self.pod_ref.uid.clone(),
                hostname: Some(hostname).filter(|_| !host_network),
                network: !host_network,
                ipc: !spec.host_ipc.unwrap_or(false),
                uts: !host_network,
                share_pid: spec.share_process_namespace.unwrap_or(false),
                user,
            })
            .await?;
        let connected = self.connect(&sandbox, host_network).await;
        if let Err(e) = connected {
            self.ctx.remove_sandbox(&sandbox).await;
            return Err(e);
        }
        self.sandbox = Some(sandbox);
        self.state.sandbox_ready = true;
        self.next_attempt.remove("");
        Ok(())
    }

    /// Attaches the sandbox to the pod network (not for hostNetwork pods) and writes the pod's name files.
    async fn connect(&mut self, sandbox: &Sandbox, host_network: bool) -> anyhow::Result<()> {
        if !host_network {
            let netns = sandbox.net.clone().ok_or_else(|| anyhow::anyhow!("the sandbox has no network namespace"))?;
            let ips = self
                .ctx
                .network
                .attach(&self.pod, &sandbox.id, &netns)
                .await
                .map_err(|e| anyhow::anyhow!("failed to set up network for sandbox {:?}: {e}", sandbox.id))?;
            self.state.pod_ip = ips.first().cloned();
        }
        let ips: Vec<String> = self.state.pod_ip.iter().cloned().collect();
        self.name_files =
            self.ctx.network.write_files(&self.pod, &self.pod_ref.uid, &ips).map_err(anyhow::Error::msg)?;
        Ok(())
    }

    /// Plans from the latest spec and the records, and acts, until there is nothing to do now.
    async fn sync(&mut self) {
        for _ in 0..MAX_ROUNDS {
            if self.state.phase.is_terminal() || self.pending.is_some() {
                return;
            }
            // A spec taken in while a container was prepared (`pull`, `post_start`) may have brought some.
            self.add_ephemeral_containers();
            let spec = self.pod.spec.clone().unwrap_or_default();
            let active_for = Duration::try_from(Timestamp::now().duration_since(self.state.start_time));
            let actions = plan::plan(
                &spec,
                &plan::Observed {
                    init: &self.state.init,
                    containers: &self.state.containers,
                    ephemeral: &self.state.ephemeral,
                    not_before: &self.next_attempt,
                    now: Instant::now(),
                    initialized: self.state.initialized && self.state.restart_all.is_none(),
                    active_for: active_for.unwrap_or_default(),
                },
            );
            if actions.is_empty() {
                return;
            }
            for action in actions {
                if self.pending.is_some() || self.state.phase.is_terminal() {
                    return;
                }
                match action {
                    Action::Start { name, init } => self.start(&name, Kind::of(init)).await,
                    Action::StartEphemeral { name } => self.start(&name, Kind::Ephemeral).await,
                    Action::Restart { name, init, message } => self.restart(&name, Kind::of(init), &message).await,
                    Action::Resize { name, init } => self.resize(&name, Kind::of(init)).await,
                    Action::StopSidecars => self.stop_sidecars().await,
                    Action::Fail { reason, message } => self.fail(reason, message).await,
                    Action::RestartAll { name } => self.restart_all(&name).await,
                }
            }
            self.refresh();
        }
    }

    /// Recomputes `initialized` and the phase (a terminal phase stays).
    fn refresh(&mut self) {
        if self.state.phase.is_terminal() {
            return;
        }
        let spec = self.pod.spec.clone().unwrap_or_default();
        if plan::initialized(&spec, &self.state.init) {
            self.state.initialized = true;
            // An in-place restart is over once the init containers have run again.
            self.state.restart_all = None;
        }
        // A pending resize the spec no longer asks for (reverted, or applied) is over.
        if matches!(self.state.resize, Some(super::state::ResizeStatus::Pending { .. }))
            && !plan::resize_wanted(&spec, &self.state.init, &self.state.containers)
        {
            self.state.resize = None;
        }
        self.state.phase = plan::phase(&spec, &self.state.init, &self.state.containers, self.state.initialized);
    }

    /// The container's spec and its place among the records of its kind (an ephemeral container as a
    /// `Container`: the same fields, less `targetContainerName`).
    fn container_spec(&self, name: &str, kind: Kind) -> Option<(ApiContainer, usize)> {
        let spec = self.pod.spec.as_ref()?;
        let c = match kind {
            Kind::Init => spec.init_containers.iter().flatten().find(|c| c.name == name)?.clone(),
            Kind::App => spec.containers.iter().find(|c| c.name == name)?.clone(),
            Kind::Ephemeral => {
                let e = spec.ephemeral_containers.iter().flatten().find(|c| c.name == name)?;
                serde_json::to_value(e).and_then(serde_json::from_value).ok()?
            }
        };
        Some((c, self.records(kind).iter().position(|r| r.name == name)?))
    }

    fn records(&self, kind: Kind) -> &[ContainerRecord] {
        match kind {
            Kind::Init => &self.state.init,
            Kind::App => &self.state.containers,
            Kind::Ephemeral => &self.state.ephemeral,
        }
    }

    fn record(&mut self, kind: Kind, index: usize) -> &mut ContainerRecord {
        match kind {
            Kind::Init => &mut self.state.init[index],
            Kind::App => &mut self.state.containers[index],
            Kind::Ephemeral => &mut self.state.ephemeral[index],
        }
    }

    /// The kind and index of container `name`'s record.
    fn locate(&self, name: &str) -> (Kind, usize) {
        [Kind::Init, Kind::Ephemeral]
            .into_iter()
            .find_map(|kind| Some((kind, self.records(kind).iter().position(|c| c.name == name)?)))
            .unwrap_or_else(|| (Kind::App, self.state.containers.iter().position(|c| c.name == name).unwrap_or(0)))
    }
}
