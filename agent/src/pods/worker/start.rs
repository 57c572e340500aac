//! Starting a container: image, configuration, root filesystem, create and start, and the exit watch.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Container as ApiContainer;
use nodelet_runtime::{ContainerConfig, ContainerExit, ContainerIo, IoPipes, RuntimeError};

use super::{Desired, Exit, RETRY, Running, Worker};
use crate::images::{ImageFailure, PullPolicy, ReadyImage};
use crate::logs;
use crate::pods::plan;
use crate::pods::state::{ContainerState, Kind};
use crate::pods::{resources, spec, termination_message};

/// Why a container did not start.
enum NotStarted {
    /// Its configuration could not be made (upstream's `CreateContainerError`): it waits and is retried.
    Create(String),
    /// The runtime created or started it and failed (`StartError`): it counts as a run that exited with 128.
    Start(String),
}

/// Whether a container that started (without a startup probe) is ready at once: app containers and sidecars
/// without a readiness probe. Ephemeral containers never report ready (upstream).
fn ready_at_start(kind: Kind, c: &ApiContainer) -> bool {
    let counts = match kind {
        Kind::App => true,
        Kind::Init => plan::is_sidecar(c),
        Kind::Ephemeral => false,
    };
    counts && c.readiness_probe.is_none()
}

impl Worker {
    /// Pulls the image, builds the container and starts it. Failures become the container's waiting reason.
    pub(super) async fn start(&mut self, name: &str, kind: Kind) {
        if self.pending.is_some() {
            // A deletion (or removal) came in while an earlier container was being prepared: nothing more starts.
            return;
        }
        let Some((c, index)) = self.container_spec(name, kind) else { return };
        if let Some(message) = crate::pods::unsupported::unsupported(&self.pod, &c) {
            return self.config_error(&c, kind, index, message);
        }
        let image = c.image.clone().unwrap_or_default();
        let policy = match PullPolicy::for_container(&image, c.image_pull_policy.as_deref()) {
            Ok(p) => p,
            Err(message) => return self.config_error(&c, kind, index, message),
        };
        let ready = match self.pull(&image, policy, Some((&c.name, kind))).await {
            None => return,
            Some(Ok(ready)) => ready,
            Some(Err(failure)) => return self.pull_failed(&c.name, kind, index, failure),
        };
        match self.image_volumes(&c).await {
            None => return,
            Some(Ok(())) => {}
            Some(Err(failure)) => {
                let message = format!("Error: {}", failure.message);
                self.event(Some((&c.name, kind)), true, "Failed", &message);
                return self.pull_failed(&c.name, kind, index, failure);
            }
        }
        {
            let record = self.record(kind, index);
            record.image = ready.image.clone();
            record.image_id = Some(ready.image_id.clone());
        }
        let restart = {
            let r = self.record(kind, index);
            if r.container_id.is_some() { r.restart_count + 1 } else { 0 }
        };
        let id = format!("{}-{}-{restart}", self.pod_ref.uid, c.name);
        let config = match self.container_config(&c, kind, &ready, &id).await {
            Ok(config) => config,
            Err(e) => return self.config_error(&c, kind, index, format!("{e:#}")),
        };
        // An overlay mount and fsyncs: off the async threads.
        let (images, rootfs_id, image) = (self.ctx.images.clone(), id.clone(), ready.clone());
        let userns = match self.pod_user_namespace() {
            Ok(userns) => userns,
            Err(e) => return self.config_error(&c, kind, index, format!("preparing the root filesystem: {e}")),
        };
        let prepared =
            tokio::task::spawn_blocking(move || images.prepare_rootfs(&rootfs_id, &image, userns.as_ref())).await;
        let rootfs = match prepared {
            Ok(Ok(path)) => path,
            Ok(Err(e)) => return self.config_error(&c, kind, index, format!("preparing the root filesystem: {e}")),
            Err(e) => return self.config_error(&c, kind, index, format!("preparing the root filesystem: {e}")),
        };
        let config = ContainerConfig { rootfs, ..config };
        let started = self.create_and_start(&config, &c, kind, restart).await;
        let message = match started {
            Ok(user) => {
                let now = Timestamp::now();
                self.record(kind, index).new_instance(&id);
                self.record(kind, index).user = user;
                if let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.post_start.clone()) {
                    // The container runs; it is not Running in the status until its postStart hook returned.
                    self.watch(&c, id.clone(), now);
                    let ok = self.post_start(&c, kind, &id, &hook).await;
                    // Running also after a failed hook, until its exit (which is on its way) is recorded: never
                    // a second instance beside it.
                    let record = self.record(kind, index);
                    record.state = ContainerState::Running { started_at: now };
                    if !ok {
                        return;
                    }
                    record.spec_hash = Some(plan::spec_hash(&c));
                    record.applied = Some(crate::pods::state::Applied::of(&c));
                    record.started = c.startup_probe.is_none();
                    record.ready = ready_at_start(kind, &c) && record.started;
                    return;
                }
                let record = self.record(kind, index);
                record.state = ContainerState::Running { started_at: now };
                record.spec_hash = Some(plan::spec_hash(&c));
                record.applied = Some(crate::pods::state::Applied::of(&c));
                // Started at once without a startup probe; ready (app containers and sidecars) at once without
                // a readiness probe, else when the probes say so.
                record.started = c.startup_probe.is_none();
                record.ready = ready_at_start(kind, &c) && record.started;
                self.watch(&c, id, now);
                return;
            }
            Err(NotStarted::Create(message)) => {
                self.ctx.images.remove_rootfs(&id);
                self.event(Some((&c.name, kind)), true, "Failed", &format!("Error: {message}"));
                let record = self.record(kind, index);
                record.state = ContainerState::waiting("CreateContainerError", Some(message));
                self.next_attempt.insert(c.name.clone(), Instant::now() + RETRY);
                return;
            }
            Err(NotStarted::Start(message)) => message,
        };
        self.ctx.images.remove_rootfs(&id);
        self.record(kind, index).new_instance(&id);
        let exit = ContainerExit { code: 128, signal: None, oom_killed: false, status_known: true };
        self.finish(&c.name, &id, exit, None, Some(message), Timestamp::now());
    }

    /// Runs the container's postStart hook; false when it failed (the container is stopped and restarted per
    /// policy, as upstream) or a deletion came in meanwhile (acted on next).
    async fn post_start(
        &mut self,
        c: &ApiContainer,
        kind: Kind,
        id: &str,
        hook: &k8s_openapi::api::core::v1::LifecycleHandler,
    ) -> bool {
        let (target, runtime) = (self.probe_target(), self.ctx.runtime.clone());
        let run = crate::prober::hooks::run(hook, c, id, &target, &runtime, crate::prober::hooks::UNBOUNDED);
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                result = &mut run => break result,
                changed = self.rx.changed() => match self.latest(changed.is_ok()) {
                    Desired::Pod(pod) if pod.metadata.deletion_timestamp.is_none() => {
                        self.pod = Arc::unwrap_or_clone(pod);
                    }
                    other => {
                        self.pending = Some(other);
                        return false;
                    }
                },
            }
        };
        let e = match result {
            Ok(fallback) => {
                if let Some(message) = fallback {
                    self.event(None, true, "LifecycleHTTPFallback", &message);
                }
                return true;
            }
            Err(e) => e,
        };
        tracing::info!(container = %id, error = %e, "postStart hook failed");
        self.event(Some((&c.name, kind)), true, "FailedPostStartHook", "PostStartHook failed");
        let grace = self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30);
        let (runtime, id) = (self.ctx.runtime.clone(), id.to_string());
        // Its exit comes through the exit watch: recorded and restarted per policy.
        tokio::spawn(async move { runtime.stop(&id, Duration::from_secs(grace.max(0).unsigned_abs())).await });
        false
    }

    /// Pulls `image` per `policy` (events on `container`, else on the pod) as a task of its own, so that a
    /// deletion or removal arriving meanwhile is acted on at once (the pull goes on in the background and its
    /// layers stay for the next user): `None` then.
    async fn pull(
        &mut self,
        image: &str,
        policy: PullPolicy,
        container: Option<(&str, Kind)>,
    ) -> Option<Result<ReadyImage, ImageFailure>> {
        let secrets = spec::pull_secrets(&self.pod, self.ctx.client.as_ref()).await;
        let key = format!("{}_{image}", self.pod_ref.uid);
        let (events, pod_ref) = (self.ctx.events.clone(), self.pod_ref.clone());
        let container = container.map(|(name, kind)| (name.to_string(), kind));
        let record_event = move |e: crate::images::ImageEvent| {
            let on = container.as_ref().map(|(name, kind)| (name.as_str(), *kind));
            events.record(&pod_ref, on, e.warning, e.reason, &e.message)
        };
        let (images, image_name) = (self.ctx.images.clone(), image.to_string());
        let started = Instant::now();
        let mut pull =
            tokio::spawn(async move { images.ensure(&image_name, policy, &secrets, &key, &record_event).await });
        let pulled = loop {
            tokio::select! {
                pulled = &mut pull => break pulled,
                changed = self.rx.changed() => match self.latest(changed.is_ok()) {
                    Desired::Pod(pod) if pod.metadata.deletion_timestamp.is_none() => {
                        self.pod = Arc::unwrap_or_clone(pod);
                    }
                    other => {
                        self.pending = Some(other);
                        return None;
                    }
                },
            }
        };
        self.pulling = Some(self.pulling.map_or((started, Instant::now()), |(first, _)| (first, Instant::now())));
        Some(pulled.unwrap_or_else(|e| {
            Err(ImageFailure { reason: "ErrImagePull", message: format!("pulling the image stopped: {e}") })
        }))
    }

    fn pull_failed(&mut self, name: &str, kind: Kind, index: usize, failure: ImageFailure) {
        let record = self.record(kind, index);
        record.state = ContainerState::waiting(failure.reason, Some(failure.message));
        self.next_attempt.insert(name.to_string(), Instant::now() + RETRY);
    }

    /// Pulls and mounts (read-only overlays of their layers) the `image` volumes `c` mounts that are not ready
    /// yet, as upstream pulls them: when a container that mounts one starts. `None`: a deletion came in.
    async fn image_volumes(&mut self, c: &ApiContainer) -> Option<Result<(), ImageFailure>> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        for m in c.volume_mounts.iter().flatten() {
            let Some(source) = spec.volumes.iter().flatten().find(|v| v.name == m.name).and_then(|v| v.image.as_ref())
            else {
                continue;
            };
            if self.image_volumes.contains_key(&m.name) {
                continue;
            }
            let reference = source.reference.clone().unwrap_or_default();
            let policy = match PullPolicy::for_container(&reference, source.pull_policy.as_deref()) {
                Ok(p) => p,
                Err(message) => return Some(Err(ImageFailure { reason: "InvalidImageName", message })),
            };
            let ready = match self.pull(&reference, policy, None).await? {
                Ok(ready) => ready,
                Err(failure) => return Some(Err(failure)),
            };
            let id = crate::volumes::image_volume_id(&self.pod_ref.uid, &m.name);
            let images = self.ctx.images.clone();
            // (Image volumes are refused in user namespaces: their overlay cannot be idmapped.)
            let prepared = tokio::task::spawn_blocking(move || images.prepare_rootfs(&id, &ready, None)).await;
            match prepared {
                Ok(Ok(path)) => {
                    self.image_volumes.insert(m.name.clone(), path);
                }
                Ok(Err(message)) => return Some(Err(ImageFailure { reason: "ErrImagePull", message })),
                Err(e) => return Some(Err(ImageFailure { reason: "ErrImagePull", message: e.to_string() })),
            }
        }
        Some(Ok(()))
    }

    async fn create_and_start(
        &self,
        config: &ContainerConfig,
        c: &ApiContainer,
        kind: Kind,
        restart: u32,
    ) -> Result<Option<nodelet_runtime::ProcessUser>, NotStarted> {
        // A terminal replaces the pipes (the runtime hands its master back).
        let (io, pipes) = if config.tty {
            (ContainerIo::default(), None)
        } else {
            let (io, pipes) = ContainerIo::pipes(config.stdin).map_err(|e| NotStarted::Start(e.to_string()))?;
            (io, Some(pipes))
        };
        let user = match self.ctx.runtime.create(config, io).await {
            Ok(user) => user,
            // The spec could not be made from the image and the pod (a user that does not exist, a hostile
            // /etc/passwd...): nothing ran.
            Err(RuntimeError::Spec(e)) => return Err(NotStarted::Create(e.to_string())),
            Err(e) => {
                self.event(Some((&c.name, kind)), true, "Failed", &format!("Error: {e}"));
                return Err(NotStarted::Start(e.to_string()));
            }
        };
        self.event(Some((&c.name, kind)), false, "Created", &format!("Created container: {}", c.name));
        if restart >= 2 {
            let (dir, name) = (self.log_dir.clone(), c.name.clone());
            tokio::task::spawn_blocking(move || logs::prune_container_logs(&dir, &name, restart - 1));
        }
        let path = logs::container_log_path(&self.log_dir, &c.name, restart);
        self.copy_output(config, c, pipes, path);
        if let Err(e) = self.ctx.runtime.start(&config.id).await {
            self.ctx.runtime.delete(&config.id).await;
            self.event(Some((&c.name, kind)), true, "Failed", &format!("Error: {e}"));
            return Err(NotStarted::Start(e.to_string()));
        }
        self.event(Some((&c.name, kind)), false, "Started", &format!("Started container {}", c.name));
        Ok(user)
    }

    /// Logs the container's output (its pipes, or its terminal) and makes it attachable: its output, its stdin
    /// when the spec keeps one (`stdin`, closed after the first attach with `stdinOnce`), its terminal.
    fn copy_output(&self, config: &ContainerConfig, c: &ApiContainer, pipes: Option<IoPipes>, path: PathBuf) {
        let (outputs, stdin, terminal): (Vec<(&'static str, logs::Output)>, _, _) = match pipes {
            Some(p) => (logs::pipes(p.stdout, p.stderr), p.stdin.map(OwnedFd::from), None),
            None => {
                let master = self.ctx.runtime.terminal(&config.id);
                let dup = || master.as_ref().and_then(|m| m.try_clone().ok());
                let stdin = if config.stdin { dup() } else { None };
                let terminal = dup();
                let reader = master.and_then(|m| nodelet_runtime::async_io::Reader::new(m).ok());
                let outputs = reader.map(|r| ("stdout", Box::new(r) as logs::Output)).into_iter().collect();
                (outputs, stdin, terminal)
            }
        };
        let attachable = crate::pods::attach::Attachable::new(stdin, c.stdin_once.unwrap_or(false), terminal);
        self.log_and_attach(&config.id, outputs, attachable, path);
    }

    /// Copies `outputs` to the log at `path` and makes container `id` attachable until they end.
    pub(super) fn log_and_attach(
        &self,
        id: &str,
        outputs: Vec<(&'static str, logs::Output)>,
        (attachable, tee): (crate::pods::attach::Attachable, logs::Tee),
        path: PathBuf,
    ) {
        self.ctx.attachments.insert(id, Arc::new(attachable));
        let (attachments, id, rotation) = (self.ctx.attachments.clone(), id.to_string(), self.log_rotation());
        tokio::spawn(async move {
            logs::copy_outputs(outputs, path, rotation, Some(tee)).await;
            attachments.remove(&id);
        });
    }

    /// Records a new running instance: its exit is watched and its probes start.
    pub(super) fn watch(&mut self, c: &ApiContainer, id: String, started_at: Timestamp) {
        self.watch_since(c, id, started_at, Instant::now(), None);
    }

    /// [`Worker::watch`] for an instance started at `started`; `taken_over`: the readiness an instance of the
    /// previous agent had (its probes keep it and start at a random point of their first period).
    pub(super) fn watch_since(
        &mut self,
        c: &ApiContainer,
        id: String,
        started_at: Timestamp,
        started: Instant,
        taken_over: Option<bool>,
    ) {
        let probes = self.start_probes(c, &id, taken_over);
        let running = Running { id: id.clone(), probes, started_at, started };
        self.running.insert(c.name.clone(), running);
        self.watch_oom_kills(c.name.clone(), id.clone());
        self.watch_exit(c.name.clone(), id);
    }

    /// Sends the container's exit to this worker when it comes.
    pub(super) fn watch_exit(&self, name: String, id: String) {
        let (runtime, tx) = (self.ctx.runtime.clone(), self.exits_tx.clone());
        tokio::spawn(async move {
            let exit = runtime.wait(&id).await;
            let _ = tx.send(Exit { name, id, exit });
        });
    }

    /// The pod's user namespace, with `hostUsers: false` (its sandbox's file and the pod's range).
    fn pod_user_namespace(&self) -> Result<Option<nodelet_runtime::idmap::PodUserNamespace>, String> {
        let Some(file) = self.sandbox.as_ref().and_then(|s| s.user.clone()) else { return Ok(None) };
        // Never a rootfs that is not mapped for the namespace its container runs in.
        let mapping = self.ctx.user_namespaces.get(&self.pod_ref.uid).ok_or("the pod's user namespace has no range")?;
        Ok(Some(nodelet_runtime::idmap::PodUserNamespace { file, mapping }))
    }

    /// The sandbox's namespaces; an ephemeral container with a `targetContainerName` joins its target's PID
    /// namespace (`kubectl debug --target`) unless the pod shares one or uses the host's.
    fn namespaces(
        &self,
        sandbox: &nodelet_runtime::Sandbox,
        c: &ApiContainer,
        kind: Kind,
    ) -> anyhow::Result<nodelet_runtime::Namespaces> {
        let spec = self.pod.spec.as_ref();
        let host_pid = spec.and_then(|s| s.host_pid).unwrap_or(false);
        let mut namespaces = sandbox.namespaces(host_pid);
        let target = spec
            .and_then(|s| s.ephemeral_containers.as_ref())
            .and_then(|e| e.iter().find(|e| e.name == c.name))
            .and_then(|e| e.target_container_name.clone())
            .filter(|_| kind == Kind::Ephemeral);
        if let Some(target) = target
            && namespaces.pid == nodelet_runtime::Namespace::Private
        {
            // As upstream: the target must be there (running: a stopped one has no namespace to join).
            let path = self.running.get(&target).and_then(|r| self.ctx.runtime.pid_namespace(&r.id));
            let path = path.ok_or_else(|| anyhow::anyhow!("unable to find target container {target}"))?;
            namespaces.pid = nodelet_runtime::Namespace::Join(path);
        }
        Ok(namespaces)
    }

    fn config_error(&mut self, c: &ApiContainer, kind: Kind, index: usize, message: String) {
        self.event(Some((&c.name, kind)), true, "Failed", &format!("Error: {message}"));
        self.record(kind, index).state = ContainerState::waiting("CreateContainerConfigError", Some(message));
        self.next_attempt.insert(c.name.clone(), Instant::now() + RETRY);
    }

    async fn container_config(
        &self,
        c: &ApiContainer,
        kind: Kind,
        ready: &crate::images::ReadyImage,
        id: &str,
    ) -> anyhow::Result<ContainerConfig> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let sandbox = self.sandbox.as_ref().ok_or_else(|| anyhow::anyhow!("no sandbox"))?;
        let image = spec::image_config(&self.ctx.images.config_blob(ready).map_err(anyhow::Error::msg)?)?;
        let stop_signal = c.lifecycle.as_ref().and_then(|l| l.stop_signal.clone()).or(image.stop_signal.clone());
        spec::verify_run_as_non_root(&self.pod, c, image.user.as_deref())?;
        let lookup = spec::Lookup {
            client: self.ctx.client.as_ref(),
            namespace: &self.pod_ref.namespace,
            services: self.ctx.services.as_ref(),
            allocatable: self.ctx.volumes.allocatable(),
        };
        let ips = spec::Ips { host: &self.ctx.config.node_ip, pod: self.state.pod_ip.as_deref() };
        let env = spec::environment(&self.pod, c, &ips, &lookup).await?;
        let mut volumes = self.volumes.clone().ok_or_else(|| anyhow::anyhow!("the pod's volumes are not set up"))?;
        volumes.extend(self.image_volumes.iter().map(|(name, path)| {
            (name.clone(), crate::volumes::SetUp { path: path.clone(), read_only: true, usage_bytes: None })
        }));
        let subpaths = self.ctx.volumes.subpaths_dir(&self.pod_ref.uid, &c.name);
        let mut mounts = self.name_files.clone();
        mounts.extend(crate::volumes::container_mounts(&volumes, c, &env, &subpaths).map_err(anyhow::Error::msg)?);
        if let Some(destination) = c.termination_message_path.clone().filter(|p| !p.is_empty()) {
            let source = self.termination_message_file(&c.name, id);
            termination_message::create(&source)
                .map_err(|e| anyhow::anyhow!("creating the termination message file {}: {e}", source.display()))?;
            let propagation = Default::default();
            let (read_only, recursive) = (false, false);
            mounts.push(nodelet_runtime::Mount::Bind { source, destination, read_only, recursive, propagation });
        }
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
            security: spec::security(
                &self.pod,
                c,
                &spec::SeccompSettings {
                    root: self.ctx.config.root_dir.join("seccomp"),
                    default: self.ctx.config.kubelet.seccomp_default,
                },
            )?,
            mounts,
            namespaces: self.namespaces(sandbox, c, kind)?,
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
                .map(|s| (crate::pods::sysctls::normalize(&s.name), s.value))
                .collect(),
            tty: c.tty.unwrap_or(false),
            stdin: c.stdin.unwrap_or(false),
            stop_signal,
            oom_score_adj: Some(
                resources::oom_score_adj(self.state.qos, &resources::container_resources(c), self.ctx.allocatable.1)
                    .max(self.ctx.min_oom_score_adj),
            ),
        })
    }
}
