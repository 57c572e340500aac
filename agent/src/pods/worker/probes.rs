//! A running container's probes (see [`crate::prober`]): started with the instance, their reports turned into
//! its `ready` and `started`, `Unhealthy` events, and a restart when liveness or startup fails.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Container as ApiContainer;

use super::Worker;
use crate::pods::plan;
use crate::prober::{self, Kind, ProbeReport, Report, Target};

/// An instance's probe tasks, aborted when dropped (the instance ended or was replaced).
#[derive(Default)]
pub struct Probes(Vec<(Kind, tokio::task::JoinHandle<()>)>);

impl Probes {
    /// The container is being stopped: as upstream, liveness and startup probes stop (a container on its way out
    /// is not restarted), and readiness goes on, so that a pod that stops answering leaves its Services before
    /// its containers have exited.
    pub fn stopping(&mut self) {
        self.stop(|kind| kind != Kind::Readiness);
    }

    /// The `kind` probe failed and the container is being restarted: that probe holds off until the next
    /// instance (upstream's `onHold`: no more runs, or `Unhealthy` events, against a container on its way out).
    pub fn hold(&mut self, kind: Kind) {
        self.stop(|k| k == kind);
    }

    fn stop(&mut self, which: impl Fn(Kind) -> bool) {
        self.0.retain(|(kind, task)| {
            if which(*kind) {
                task.abort();
                return false;
            }
            true
        });
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for (_, task) in &self.0 {
            task.abort();
        }
    }
}

impl Worker {
    /// Where probes and hooks connect: the pod's network namespace and IP.
    pub(super) fn probe_target(&self) -> Target {
        let host_network = self.pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
        Target {
            netns: self.sandbox.as_ref().and_then(|s| s.net.clone()).filter(|_| !host_network),
            pod_ip: self.state.pod_ip.clone().unwrap_or_else(|| self.ctx.config.node_ip.clone()),
        }
    }

    /// Starts `c`'s probes for instance `id` (`taken_over`: its readiness under the previous agent).
    pub(super) fn start_probes(&self, c: &ApiContainer, id: &str, taken_over: Option<bool>) -> Probes {
        if c.startup_probe.is_none() && c.liveness_probe.is_none() && c.readiness_probe.is_none() {
            return Probes::default();
        }
        let runtime = self.ctx.runtime.clone();
        Probes(prober::start(c, id, self.probe_target(), runtime, self.probe_tx.clone(), taken_over))
    }

    /// Acts on a probe task's report about an instance being stopped (`stopping`: instance ID to container name):
    /// only readiness still runs; its result still moves `ready`, and its failures are still events.
    pub(super) fn on_probe_while_stopping(&mut self, report: ProbeReport, stopping: &HashMap<String, String>) {
        if stopping.get(&report.id) != Some(&report.container) {
            return self.on_probe(report);
        }
        if report.report.kind() == Kind::Readiness {
            self.apply_probe(report);
            self.publish();
        }
    }

    /// Acts on a probe task's report about a still-running instance.
    pub(super) fn on_probe(&mut self, report: ProbeReport) {
        if self.running.get(&report.container).is_none_or(|r| r.id != report.id) {
            return;
        }
        self.apply_probe(report);
    }

    /// A report's effect: an event, the container's `ready` or `started`, a restart.
    fn apply_probe(&mut self, report: ProbeReport) {
        let ProbeReport { container: name, id, report } = report;
        let (list, index) = self.locate(&name);
        let Some((c, _)) = self.container_spec(&name, list) else { return };
        match report {
            Report::Failed { kind, output } => {
                let message = format!("{} probe failed: {}", kind.name(), output.trim_end());
                self.event(Some((&name, list)), true, "Unhealthy", &message);
            }
            Report::Warned { kind, output } => {
                let message = format!("{} probe warning: {}", kind.name(), output.trim_end());
                self.event(Some((&name, list)), true, "ProbeWarning", &message);
            }
            Report::Result { kind: Kind::Readiness, healthy } => {
                let record = self.record(list, index);
                record.ready = healthy && record.started;
            }
            Report::Result { kind: Kind::Startup, healthy: true } => {
                let record = self.record(list, index);
                record.started = true;
                if c.readiness_probe.is_none() {
                    record.ready = !list.is_init() || plan::is_sidecar(&c);
                }
            }
            Report::Result { kind, healthy: false } => {
                let which = if kind == Kind::Liveness { "liveness" } else { "startup" };
                let message = format!("Container {name} failed {which} probe, will be restarted");
                self.event(Some((&name, list)), false, "Killing", &message);
                if let Some(running) = self.running.get_mut(&name) {
                    running.probes.hold(kind);
                }
                // Stopped in the background: its exit comes through the exit watch and is restarted per policy.
                let probe = if kind == Kind::Liveness { &c.liveness_probe } else { &c.startup_probe };
                let seconds = probe
                    .as_ref()
                    .and_then(|p| p.termination_grace_period_seconds)
                    .or(self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
                    .unwrap_or(30);
                let grace = Duration::from_secs(seconds.max(0).unsigned_abs());
                let runtime = self.ctx.runtime.clone();
                tokio::spawn(async move { runtime.stop(&id, grace).await });
            }
            Report::Result { .. } => {}
        }
    }
}
