//! One pod worker per pod: the only owner of that pod's actual state on the node. It sets up the pod (cgroup,
//! sandbox), runs init containers in order, then the app containers, restarts them per `restartPolicy` with
//! upstream's CrashLoopBackOff, and on deletion stops them within the grace period. Every change goes to the
//! status manager.

mod take_over;
mod termination;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container as ApiContainer, Pod};
use nodelet_runtime::{Container, ContainerConfig, ContainerExit, ContainerIo, Sandbox, SandboxConfig};
use tokio::sync::mpsc;

use super::restore::{Inherited, Saved};
use super::state::{ContainerRecord, ContainerState, Phase, PodState};
use super::{Ctx, resources, spec};
use crate::backoff::Backoff;
use crate::events::PodRef;
use crate::images::PullPolicy;
use crate::images::pull::Progress;
use crate::logs;
use crate::status::StatusMessage;

/// What the dispatcher tells a worker.
#[derive(Debug)]
pub enum WorkerMessage {
    /// A newer version of the pod (e.g. with a deletionTimestamp).
    Update(Box<Pod>),
    /// The pod is gone from its source: stop everything, do not touch the API object.
    Remove,
}

/// How long to wait before retrying a container that could not start for image or config reasons.
const RETRY: Duration = Duration::from_secs(5);
/// A container that ran this long has its crash-loop back-off reset (upstream: 10 min).
const BACKOFF_RESET: Duration = Duration::from_secs(600);

struct Running {
    container: Container,
    id: String,
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
    rx: mpsc::Receiver<WorkerMessage>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits_rx: mpsc::UnboundedReceiver<Exit>,
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
    /// A message that arrived while a container was being prepared (`None`: the dispatcher is gone), handled first.
    pending: Option<Option<WorkerMessage>>,
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()).unwrap_or("Always")
}

impl Worker {
    pub fn new(ctx: Arc<Ctx>, pod: Pod, rx: mpsc::Receiver<WorkerMessage>, inherited: Inherited) -> Worker {
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
        };
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let log_dir = logs::pod_log_dir(&ctx.config.log_dir, &pod_ref.namespace, &pod_ref.name, &pod_ref.uid);
        Worker {
            ctx,
            pod,
            pod_ref,
            state,
            rx,
            exits_tx,
            exits_rx,
            running: HashMap::new(),
            crash_backoff: Backoff::new(Duration::from_secs(10), Duration::from_secs(300)),
            next_attempt: HashMap::new(),
            sandbox: None,
            torn_down: false,
            log_dir,
            inherited: Some(inherited),
            saved: None,
            name_files: Vec::new(),
            pending: None,
        }
    }

    fn publish(&mut self) {
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

    fn event(&self, container: Option<(&str, bool)>, warning: bool, reason: &str, message: &str) {
        self.ctx.events.record(&self.pod_ref, container, warning, reason, message);
    }

    /// Runs the pod until it is deleted or removed.
    pub async fn run(mut self) {
        if let Some(inherited) = self.inherited.take() {
            self.take_over(inherited).await;
            self.update_phase();
        }
        self.publish();
        loop {
            if self.sandbox.is_none()
                && !self.state.phase.is_terminal()
                && let Err(e) = self.set_up().await
            {
                self.event(None, true, "FailedCreatePodSandBox", &format!("Failed to create pod sandbox: {e:#}"));
                self.next_attempt.insert(String::new(), Instant::now() + RETRY);
            }
            if self.sandbox.is_some() {
                self.sync().await;
            }
            self.update_phase();
            if self.state.phase.is_terminal() && self.running.is_empty() && !self.torn_down {
                self.tear_down().await;
            }
            self.publish();
            // Only retries still ahead count: a past one was acted on by `sync` above (else the loop would spin).
            let now = Instant::now();
            self.next_attempt.retain(|_, at| *at > now);
            let wake = self.next_attempt.values().min().copied().unwrap_or(now + Duration::from_secs(3600));
            if let Some(message) = self.pending.take() {
                if self.handle(message).await {
                    return;
                }
                continue;
            }
            tokio::select! {
                message = self.rx.recv() => if self.handle(message).await {
                    return;
                },
                Some(exit) = self.exits_rx.recv() => self.on_exit(exit).await,
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Acts on a dispatcher message; true when the worker is done (the pod was deleted or removed).
    async fn handle(&mut self, message: Option<WorkerMessage>) -> bool {
        match message {
            None | Some(WorkerMessage::Remove) => {
                self.terminate(None, false).await;
                self.ctx.states.remove(&self.pod_ref.uid);
                true
            }
            Some(WorkerMessage::Update(pod)) => {
                let deleting = pod.metadata.deletion_timestamp.is_some();
                let grace = pod.metadata.deletion_grace_period_seconds;
                self.pod = *pod;
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

    /// The pod cgroup and the sandbox (its namespaces).
    async fn set_up(&mut self) -> anyhow::Result<()> {
        if self.next_attempt.get("").is_some_and(|t| *t > Instant::now()) {
            return Ok(());
        }
        let spec = self.pod.spec.clone().unwrap_or_default();
        let (app, init) = resources::pod_resources(&self.pod);
        let limits = nodelet_cgroups::qos::pod_limits(&app, &init);
        let (ctx, qos, uid) = (self.ctx.clone(), self.state.qos, self.pod_ref.uid.clone());
        let pids = self.ctx.config.kubelet.pod_pids_limit.map(|p| p as u64);
        tokio::task::spawn_blocking(move || ctx.hierarchy.ensure_pod(qos, &uid, &limits, pids)).await??;
        let host_network = spec.host_network.unwrap_or(false);
        let sandbox = self
            .ctx
            .runtime
            .create_sandbox(&SandboxConfig {
                id: self.pod_ref.uid.clone(),
                hostname: Some(spec.hostname.clone().unwrap_or_else(|| self.pod_ref.name.clone()))
                    .filter(|_| !host_network),
                network: !host_network,
                ipc: !spec.host_ipc.unwrap_or(false),
                uts: !host_network,
                share_pid: spec.share_process_namespace.unwrap_or(false),
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

    /// Starts whatever should run now: the next init container, or the app containers.
    async fn sync(&mut self) {
        if self.state.phase.is_terminal() {
            return;
        }
        let spec = self.pod.spec.clone().unwrap_or_default();
        let never = restart_policy(&self.pod) == "Never";
        for (i, c) in spec.init_containers.iter().flatten().enumerate() {
            let record = &self.state.init[i];
            if record.succeeded() {
                continue;
            }
            if self.running.contains_key(&c.name) {
                return;
            }
            let failed = matches!(record.state, ContainerState::Terminated { .. });
            if failed && never {
                return;
            }
            if self.due(&c.name) {
                self.start(c, true, i).await;
            }
            return;
        }
        for (i, c) in spec.containers.iter().enumerate() {
            if self.running.contains_key(&c.name) {
                continue;
            }
            let record = &self.state.containers[i];
            let wanted = match &record.state {
                ContainerState::Terminated { exit_code, .. } => should_restart(&self.pod, *exit_code),
                _ => true,
            };
            if wanted && self.due(&c.name) {
                self.start(c, false, i).await;
            }
        }
    }

    fn due(&self, name: &str) -> bool {
        self.next_attempt.get(name).is_none_or(|t| *t <= Instant::now())
    }

    fn record(&mut self, init: bool, index: usize) -> &mut ContainerRecord {
        if init { &mut self.state.init[index] } else { &mut self.state.containers[index] }
    }

    /// Pulls the image, builds the container and starts it. Failures become the container's waiting reason.
    async fn start(&mut self, c: &ApiContainer, init: bool, index: usize) {
        if self.pending.is_some() {
            // A deletion (or removal) came in while an earlier container was being prepared: nothing more starts.
            return;
        }
        let image = c.image.clone().unwrap_or_default();
        let policy = match PullPolicy::for_container(&image, c.image_pull_policy.as_deref()) {
            Ok(p) => p,
            Err(message) => return self.config_error(c, init, index, message),
        };
        let secrets = spec::pull_secrets(&self.pod, self.ctx.client.as_ref()).await;
        let key = format!("{}_{image}", self.pod_ref.uid);
        let (events, pod_ref, name) = (self.ctx.events.clone(), self.pod_ref.clone(), c.name.clone());
        let record_event = move |e: crate::images::ImageEvent| {
            events.record(&pod_ref, Some((&name, init)), e.warning, e.reason, &e.message)
        };
        // The pull runs as a task of its own, so that a deletion or removal arriving meanwhile is acted on at once
        // (the pull goes on in the background and its layers stay for the next user).
        let images = self.ctx.images.clone();
        let image_name = image.clone();
        let mut pull = tokio::spawn(async move {
            images.ensure(&image_name, policy, &secrets, &key, Arc::new(Progress::default()), &record_event).await
        });
        let pulled = loop {
            tokio::select! {
                pulled = &mut pull => break pulled,
                message = self.rx.recv() => match message {
                    Some(WorkerMessage::Update(pod)) if pod.metadata.deletion_timestamp.is_none() => self.pod = *pod,
                    other => {
                        self.pending = Some(other);
                        return;
                    }
                },
            }
        };
        let pulled = match pulled {
            Ok(pulled) => pulled,
            Err(e) => {
                let message = format!("pulling the image stopped: {e}");
                return self.config_error(c, init, index, message);
            }
        };
        let ready = match pulled {
            Ok(ready) => ready,
            Err(failure) => {
                let record = self.record(init, index);
                record.state = ContainerState::waiting(failure.reason, Some(failure.message));
                self.next_attempt.insert(c.name.clone(), Instant::now() + RETRY);
                return;
            }
        };
        {
            let record = self.record(init, index);
            record.image = ready.image.clone();
            record.image_id = Some(ready.image_id.clone());
        }
        let restart = {
            let r = self.record(init, index);
            if r.container_id.is_some() { r.restart_count + 1 } else { 0 }
        };
        let id = format!("{}-{}-{restart}", self.pod_ref.uid, c.name);
        let config = match self.container_config(c, &ready, &id).await {
            Ok(config) => config,
            Err(e) => return self.config_error(c, init, index, format!("{e:#}")),
        };
        let rootfs = match self.ctx.images.prepare_rootfs(&id, &ready) {
            Ok(path) => path,
            Err(e) => return self.config_error(c, init, index, format!("preparing the root filesystem: {e}")),
        };
        let config = ContainerConfig { rootfs, ..config };
        let started = self.create_and_start(&config, c, init, restart).await;
        let now = Timestamp::now();
        let record = self.record(init, index);
        if let ContainerState::Terminated { .. } = record.state {
            record.last_state = Some(record.state.clone());
        }
        if record.container_id.is_some() {
            record.restart_count += 1;
        }
        record.container_id = Some(format!("nodelet://{id}"));
        match started {
            Ok(container) => {
                record.state = ContainerState::Running { started_at: now };
                record.started = true;
                record.ready = !init;
                self.watch(c.name.clone(), id, container, now);
            }
            Err(message) => {
                let _ = self.ctx.images.rootfs().remove(&id);
                let exit = ContainerExit { code: 128, signal: None, oom_killed: false, status_known: true };
                self.finish(&c.name, init, index, &id, exit, None, Some(message), now);
            }
        }
    }

    async fn create_and_start(
        &self,
        config: &ContainerConfig,
        c: &ApiContainer,
        init: bool,
        restart: u32,
    ) -> Result<Container, String> {
        let (io, pipes) = ContainerIo::pipes(config.stdin).map_err(|e| e.to_string())?;
        let container = match self.ctx.runtime.create(config, io).await {
            Ok(container) => container,
            Err(e) => {
                self.event(Some((&c.name, init)), true, "Failed", &format!("Error: {e}"));
                return Err(e.to_string());
            }
        };
        self.event(Some((&c.name, init)), false, "Created", &format!("Created container: {}", c.name));
        let path = logs::container_log_path(&self.log_dir, &c.name, restart);
        tokio::spawn(logs::copy_streams(pipes.stdout, pipes.stderr, path, self.log_rotation()));
        if let Err(e) = self.ctx.runtime.start(&container).await {
            let _ = self.ctx.runtime.delete(&container).await;
            self.event(Some((&c.name, init)), true, "Failed", &format!("Error: {e}"));
            return Err(e.to_string());
        }
        self.event(Some((&c.name, init)), false, "Started", &format!("Started container {}", c.name));
        Ok(container)
    }

    fn watch(&mut self, name: String, id: String, container: Container, started_at: Timestamp) {
        let running = Running { container: container.clone(), id: id.clone(), started_at, started: Instant::now() };
        self.running.insert(name.clone(), running);
        self.watch_exit(name, id, container);
    }

    /// Sends the container's exit to this worker when it comes.
    fn watch_exit(&self, name: String, id: String, container: Container) {
        let (runtime, tx) = (self.ctx.runtime.clone(), self.exits_tx.clone());
        tokio::spawn(async move {
            let exit = runtime.wait(&container).await;
            let _ = tx.send(Exit { name, id, exit });
        });
    }

    fn config_error(&mut self, c: &ApiContainer, init: bool, index: usize, message: String) {
        self.event(Some((&c.name, init)), true, "Failed", &format!("Error: {message}"));
        self.record(init, index).state = ContainerState::waiting("CreateContainerConfigError", Some(message));
        self.next_attempt.insert(c.name.clone(), Instant::now() + RETRY);
    }

    async fn container_config(
        &self,
        c: &ApiContainer,
        ready: &crate::images::ReadyImage,
        id: &str,
    ) -> anyhow::Result<ContainerConfig> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let sandbox = self.sandbox.as_ref().ok_or_else(|| anyhow::anyhow!("no sandbox"))?;
        let image = spec::image_config(&self.ctx.images.store().read_blob(&ready.record.config)?)?;
        let lookup = spec::Lookup {
            client: self.ctx.client.as_ref(),
            namespace: &self.pod_ref.namespace,
            services: self.ctx.services.as_ref(),
        };
        let env = spec::environment(&self.pod, c, &self.ctx.config.node_ip, &lookup).await?;
        let pod_cgroup = nodelet_cgroups::qos::pod_cgroup(self.state.qos, &self.pod_ref.uid);
        let cgroup_root = self.ctx.config.kubelet.cgroup_root.clone().unwrap_or_default();
        let cgroups_path = format!("/{}/{pod_cgroup}/{id}", cgroup_root.trim_matches('/')).replace("//", "/");
        let single = self.ctx.config.kubelet.single_process_oom_kill.unwrap_or(false);
        Ok(ContainerConfig {
            id: id.to_string(),
            rootfs: PathBuf::new(),
            image,
            command: c.command.clone().unwrap_or_default(),
            args: c.args.clone().unwrap_or_default(),
            env,
            working_dir: c.working_dir.clone(),
            security: spec::security(&self.pod, c),
            mounts: self.name_files.clone(),
            namespaces: sandbox.namespaces(spec.host_pid.unwrap_or(false)),
            hostname: None,
            cgroups_path,
            resources: resources::runtime_resources(
                &resources::container_resources(c),
                self.ctx.config.kubelet.pod_pids_limit,
                !single,
            ),
            sysctls: spec
                .security_context
                .as_ref()
                .and_then(|s| s.sysctls.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|s| (s.name, s.value))
                .collect(),
            tty: c.tty.unwrap_or(false),
            stdin: c.stdin.unwrap_or(false),
            oom_score_adj: None,
        })
    }

    async fn on_exit(&mut self, exit: Exit) {
        let Some(running) = self.running.remove(&exit.name) else { return };
        if running.id != exit.id {
            return;
        }
        self.ctx.remove_container(&running.container).await;
        let (init, index) = self.locate(&exit.name);
        if running.started.elapsed() >= BACKOFF_RESET {
            self.crash_backoff.reset(&exit.name);
        }
        self.finish(&exit.name, init, index, &running.id, exit.exit, Some(running.started_at), None, Timestamp::now());
    }

    fn locate(&self, name: &str) -> (bool, usize) {
        if let Some(i) = self.state.init.iter().position(|c| c.name == name) {
            return (true, i);
        }
        (false, self.state.containers.iter().position(|c| c.name == name).unwrap_or(0))
    }

    /// Records a container's end and schedules its restart per policy and back-off.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        name: &str,
        init: bool,
        index: usize,
        id: &str,
        exit: ContainerExit,
        started_at: Option<Timestamp>,
        message: Option<String>,
        finished_at: Timestamp,
    ) {
        let reason = match (message.is_some(), exit.oom_killed, exit.code) {
            // Exited while no agent was its parent: the kernel kept no status for us.
            _ if !exit.status_known => "ContainerStatusUnknown",
            (true, _, _) => "StartError",
            (_, true, _) => "OOMKilled",
            (_, _, 0) => "Completed",
            _ => "Error",
        };
        let terminated = ContainerState::Terminated {
            exit_code: exit.code,
            signal: exit.signal,
            reason: reason.into(),
            message,
            started_at,
            finished_at,
            container_id: Some(format!("nodelet://{id}")),
        };
        let restarts = if init {
            exit.code != 0 && restart_policy(&self.pod) != "Never"
        } else {
            should_restart(&self.pod, exit.code)
        };
        let now = Instant::now();
        let delay = self.crash_backoff.delay(name);
        if restarts {
            self.crash_backoff.next(name, now);
            self.next_attempt.insert(name.to_string(), now + delay);
        }
        let pod = format!("{}_{}({})", self.pod_ref.name, self.pod_ref.namespace, self.pod_ref.uid);
        let record = self.record(init, index);
        record.ready = false;
        record.state = terminated;
        if restarts && !delay.is_zero() {
            record.last_state = Some(record.state.clone());
            record.state = ContainerState::waiting(
                "CrashLoopBackOff",
                Some(format!("back-off {} restarting failed container={name} pod={pod}", go_seconds(delay))),
            );
            self.event(
                Some((name, init)),
                true,
                "BackOff",
                &format!("Back-off restarting failed container {name} in pod {pod}"),
            );
        }
    }

    fn update_phase(&mut self) {
        if self.state.phase.is_terminal() {
            return;
        }
        let never = restart_policy(&self.pod) == "Never";
        if self
            .state
            .init
            .iter()
            .any(|c| matches!(c.state, ContainerState::Terminated { exit_code, .. } if exit_code != 0))
            && never
        {
            self.state.phase = Phase::Failed;
            return;
        }
        if !self.state.init.iter().all(|c| c.succeeded()) {
            self.state.phase = Phase::Pending;
            return;
        }
        let done = self.state.containers.iter().all(|c| match c.state {
            ContainerState::Terminated { exit_code, .. } => !should_restart(&self.pod, exit_code),
            _ => false,
        });
        if done && !self.state.containers.is_empty() {
            let all_ok = self.state.containers.iter().all(|c| c.succeeded());
            self.state.phase = if all_ok { Phase::Succeeded } else { Phase::Failed };
        } else if self.state.containers.iter().any(|c| c.started) {
            self.state.phase = Phase::Running;
        }
    }
}

/// Whether `restartPolicy` restarts an app container that exited with `code`.
fn should_restart(pod: &Pod, code: i32) -> bool {
    match restart_policy(pod) {
        "Never" => false,
        "OnFailure" => code != 0,
        _ => true,
    }
}

/// A duration as Go prints whole seconds and minutes (`10s`, `2m40s`, `5m0s`).
fn go_seconds(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 { format!("{}m{}s", s / 60, s % 60) } else { format!("{s}s") }
}
