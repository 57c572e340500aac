//! Stopping containers: the whole pod within its grace period (app containers first, sidecars last, in reverse
//! order; a shorter grace period arriving meanwhile takes effect), a container whose spec changed, the sidecars
//! of a finished pod, every container of a pod past its deadline or restarted in place by a restart rule; then
//! the pod's network, sandbox and cgroup.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::task::JoinSet;

use super::exits::terminated;
use super::{Desired, Worker};
use crate::pods::plan;
use crate::prober::hooks;

/// What SIGTERM gets at least after a preStop hook took its share of the grace period (upstream's minimum).
const MIN_GRACE: Duration = Duration::from_secs(2);
use crate::pods::state::{ContainerState, Kind, Phase, RESTARTING_ALL, RestartAll};
use crate::status::StatusMessage;

/// The pod's grace period: the deletion's, else `terminationGracePeriodSeconds`, else upstream's 30 s.
fn grace_period(pod: &k8s_openapi::api::core::v1::Pod, deletion: Option<i64>) -> Duration {
    let seconds = deletion.or(pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds)).unwrap_or(30);
    Duration::from_secs(seconds.max(0).unsigned_abs())
}

impl Worker {
    /// Stops every running container within the grace period (sidecars after the others), then removes what the
    /// pod had on the node.
    pub(super) async fn terminate(&mut self, grace: Option<i64>, delete: bool) {
        self.stop_everything(Instant::now() + grace_period(&self.pod, grace), true).await;
        for record in self.state.containers.iter_mut().chain(self.state.init.iter_mut()) {
            record.ready = false;
        }
        if !self.state.phase.is_terminal() {
            let all_ok = self.state.containers.iter().all(|c| c.succeeded());
            let started = self.state.containers.iter().any(|c| c.container_id.is_some());
            self.state.phase = if started && all_ok { Phase::Succeeded } else { Phase::Failed };
        }
        self.tear_down().await;
        // The pod is gone from the node: so are its logs (upstream's container GC).
        let dir = self.log_dir.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        tracing::debug!(pod = %self.pod_ref.uid, "torn down");
        self.publish();
        let _ = self.ctx.status.send(StatusMessage::Terminated { pod: self.pod_ref.clone(), delete });
    }

    /// Stops every running container by `deadline`: app and regular init containers together, then the sidecars,
    /// last started first (with `follow`, a shorter deletion grace period arriving meanwhile takes effect).
    async fn stop_everything(&mut self, deadline: Instant, follow: bool) {
        let sidecars = self.running_sidecars();
        let others: Vec<String> = self.running.keys().filter(|n| !sidecars.contains(n)).cloned().collect();
        let mut deadline = self.stop(others, deadline, follow).await;
        for name in sidecars.into_iter().rev() {
            deadline = self.stop(vec![name], deadline, follow).await;
        }
    }

    /// The running sidecars, in spec order.
    fn running_sidecars(&self) -> Vec<String> {
        let spec = self.pod.spec.as_ref();
        spec.and_then(|s| s.init_containers.as_ref())
            .into_iter()
            .flatten()
            .filter(|c| plan::is_sidecar(c) && self.running.contains_key(&c.name))
            .map(|c| c.name.clone())
            .collect()
    }

    /// Stops the named running containers together (SIGTERM, SIGKILL at `deadline`) and records how they ended;
    /// none is restarted. With `follow`, a newer pod with a shorter deletion grace period moves the deadline
    /// closer. Returns the deadline in force.
    async fn stop(&mut self, names: Vec<String>, mut deadline: Instant, follow: bool) -> Instant {
        let mut stops = JoinSet::new();
        let mut stopping = Vec::new();
        // Instance ID to name: their readiness probes go on until they have stopped.
        let mut probed = std::collections::HashMap::new();
        for name in names {
            let Some(mut running) = self.running.remove(&name) else { continue };
            running.probes.stopping();
            probed.insert(running.id.clone(), name.clone());
            let (kind, _) = self.locate(&name);
            self.event(Some((&name, kind)), false, "Killing", &format!("Stopping container {name}"));
            let (ctx, grace) = (self.ctx.clone(), deadline.saturating_duration_since(Instant::now()));
            stopping.push(running.id.clone());
            let pre_stop = self.container_spec(&name, kind).and_then(|(c, _)| {
                let hook = c.lifecycle.as_ref()?.pre_stop.clone()?;
                Some((c, hook, self.probe_target(), self.pod_ref.clone()))
            });
            stops.spawn(async move {
                let mut grace = grace;
                if let Some((c, hook, target, pod)) = pre_stop.filter(|_| !grace.is_zero()) {
                    // The hook runs first and shares the grace period; SIGTERM gets what is left (at least 2 s).
                    let began = Instant::now();
                    match hooks::run(&hook, &c, &running.id, &target, &ctx.runtime, grace).await {
                        Ok(None) => {}
                        Ok(Some(fallback)) => ctx.events.record(&pod, None, true, "LifecycleHTTPFallback", &fallback),
                        Err(e) => {
                            tracing::info!(container = %running.id, error = %e, "preStop hook failed");
                            let reason = "FailedPreStopHook";
                            ctx.events.record(&pod, Some((&c.name, kind)), true, reason, "PreStopHook failed");
                        }
                    }
                    grace = grace.saturating_sub(began.elapsed()).max(MIN_GRACE);
                }
                let exit = ctx.runtime.stop(&running.id, grace).await;
                tracing::debug!(container = %running.id, ?exit, "stopped");
                ctx.remove_container(&running.id).await;
                (name, running, exit)
            });
        }
        let mut inbox_open = follow;
        loop {
            tokio::select! {
                done = stops.join_next() => {
                    let Some(done) = done else { break };
                    let Ok((name, running, exit)) = done else { continue };
                    // (A report of it still queued must not make it ready again.)
                    probed.remove(&running.id);
                    let (kind, index) = self.locate(&name);
                    let message = self.termination_message(&name, &running.id, exit.code);
                    let record = self.record(kind, index);
                    record.state = terminated(&running.id, &exit, Some(running.started_at), message, Timestamp::now(), false);
                    record.ready = false;
                    record.started = false;
                }
                Some(report) = self.probe_rx.recv() => self.on_probe_while_stopping(report, &probed),
                changed = self.rx.changed(), if inbox_open => {
                    inbox_open = changed.is_ok();
                    let Desired::Pod(pod) = self.latest(inbox_open) else { continue };
                    let shorter = Instant::now() + grace_period(&pod, pod.metadata.deletion_grace_period_seconds);
                    if pod.metadata.deletion_timestamp.is_some() && shorter < deadline {
                        deadline = shorter;
                        tracing::info!(pod = %self.pod_ref.name, "a shorter grace period: killing sooner");
                        self.kill_at(&stopping, deadline);
                    }
                }
            }
        }
        deadline
    }

    /// SIGKILLs the containers at `at` (those already gone ignore it).
    fn kill_at(&self, containers: &[String], at: Instant) {
        let (runtime, containers) = (self.ctx.runtime.clone(), containers.to_vec());
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            for c in &containers {
                runtime.kill(c);
            }
        });
    }

    /// Stops a container whose spec changed; the next plan starts it again at once, with its new spec.
    pub(super) async fn restart(&mut self, name: &str, kind: Kind, message: &str) {
        self.event(Some((name, kind)), false, "Killing", &format!("{message}, will be restarted"));
        let deadline = Instant::now() + grace_period(&self.pod, None);
        self.stop(vec![name.to_string()], deadline, false).await;
        let (kind, index) = self.locate(name);
        let record = self.record(kind, index);
        record.last_state = Some(record.state.clone());
        record.state = ContainerState::waiting("ContainerCreating", None);
        self.next_attempt.remove(name);
    }

    /// A `RestartAllContainers` rule fired on `source`'s exit: every container is stopped (app containers, then
    /// sidecars last started first) while the `AllContainersRestarting` condition says so; each that ran then
    /// waits with upstream's `RestartingAllContainers` state and last termination, and the pod starts again from
    /// its first init container, whatever each container's restart policy (its sandbox, IP and volumes stay).
    pub(super) async fn restart_all(&mut self, source: &str) {
        tracing::info!(pod = %self.pod_ref.name, container = source, "restart rule: restarting all containers");
        self.state.restart_all = Some(RestartAll::Stopping);
        self.publish();
        self.stop_everything(Instant::now() + grace_period(&self.pod, None), false).await;
        let (reason, message) = RESTARTING_ALL;
        let now = Timestamp::now();
        for record in self.state.init.iter_mut().chain(self.state.containers.iter_mut()) {
            if matches!(record.state, ContainerState::Waiting { .. }) && record.container_id.is_none() {
                continue; // never ran
            }
            record.last_state = Some(ContainerState::Terminated {
                exit_code: 137,
                signal: None,
                reason: reason.into(),
                message: Some(message.into()),
                started_at: None,
                finished_at: now,
                container_id: record.container_id.clone(),
            });
            record.state = ContainerState::waiting(reason, Some(message.into()));
            record.ready = false;
            record.started = false;
        }
        let ephemeral: std::collections::HashSet<&str> = self.state.ephemeral.iter().map(|r| r.name.as_str()).collect();
        self.next_attempt.retain(|name, _| ephemeral.contains(name.as_str()));
        self.state.restart_all = Some(RestartAll::Initializing);
        self.publish();
    }

    /// Stops the sidecars of a pod whose app containers are done, last started first.
    pub(super) async fn stop_sidecars(&mut self) {
        let deadline = Instant::now() + grace_period(&self.pod, None);
        for name in self.running_sidecars().into_iter().rev() {
            self.stop(vec![name], deadline, false).await;
        }
    }

    /// Fails the pod (e.g. past `activeDeadlineSeconds`): stops its containers and keeps it `Failed`.
    pub(super) async fn fail(&mut self, reason: &'static str, message: String) {
        self.event(None, true, reason, &message);
        self.stop_everything(Instant::now() + grace_period(&self.pod, None), false).await;
        self.state.phase = Phase::Failed;
        self.state.reason = Some(reason.to_string());
        self.state.message = Some(message);
    }

    /// Evicted by the eviction manager: every container stopped within the eviction's grace period (or the pod's,
    /// if shorter), then `Failed` with reason `Evicted`, upstream's message and event, and (for node
    /// pressure) the `DisruptionTarget` condition.
    pub(super) async fn evict(&mut self, eviction: crate::eviction::Eviction) {
        let message = eviction.message;
        self.event(None, true, "Evicted", &message);
        let grace = grace_period(&self.pod, None).min(eviction.grace);
        self.state.disruption = eviction.disruption.then(|| message.clone());
        self.stop_everything(Instant::now() + grace, false).await;
        for record in self.state.containers.iter_mut().chain(self.state.init.iter_mut()) {
            record.ready = false;
        }
        self.state.phase = Phase::Failed;
        self.state.reason = Some("Evicted".into());
        self.state.message = Some(message);
    }

    /// Removes the sandbox and the pod cgroup (containers are gone already).
    pub(super) async fn tear_down(&mut self) {
        self.torn_down = true;
        if let Some(sandbox) = self.sandbox.take() {
            self.ctx.remove_sandbox(&sandbox).await;
        }
        self.ctx.network.remove_files(&self.pod_ref.uid);
        self.state.sandbox_ready = false;
        self.ctx.remove_pod_cgroup(self.state.qos, &self.pod_ref.uid).await;
        self.volumes = None;
        // Its namespace is gone with the sandbox: the range is free (and the pod's directory empty of it).
        self.ctx.user_namespaces.release(&self.pod_ref.uid);
        self.ctx.tear_down_volumes(&self.pod_ref.uid).await;
        for name in std::mem::take(&mut self.image_volumes).into_keys() {
            let (images, id) = (self.ctx.images.clone(), crate::volumes::image_volume_id(&self.pod_ref.uid, &name));
            let _ = tokio::task::spawn_blocking(move || images.remove_rootfs(&id)).await;
        }
    }
}
