//! In-place pod resize (InPlacePodVerticalScaling): a running container's new requests and limits written to its
//! cgroup and its pod's, without a restart. Growing memory goes to the pod first, shrinking to the container
//! first, so the container's limit never exceeds the pod's.

use std::time::{Duration, Instant};

use nodelet_cgroups::qos;

use super::Worker;
use crate::pods::resources;
use crate::pods::state::{Applied, Kind, ResizeStatus};

/// How long before a resize that failed (e.g. a memory limit below the usage) is tried again.
const RESIZE_RETRY: Duration = Duration::from_secs(10);

impl Worker {
    pub(super) async fn resize(&mut self, name: &str, kind: Kind) {
        let Some((c, index)) = self.container_spec(name, kind) else { return };
        // More than the node has is infeasible (upstream's PodResizePending, reason Infeasible): nothing is
        // applied, and it is looked at again when the spec changes or after the retry delay.
        let (cpu, memory) = resources::pod_requests(&self.pod);
        let (cpu_capacity, memory_capacity) = self.ctx.allocatable;
        let over = [("cpu", cpu, cpu_capacity), ("memory", memory, memory_capacity)]
            .into_iter()
            .find(|(_, requested, capacity)| requested > capacity);
        if let Some((resource, requested, capacity)) = over {
            let message =
                format!("Node didn't have enough capacity: {resource}, requested: {requested}, capacity: {capacity}");
            if !matches!(&self.state.resize, Some(ResizeStatus::Pending { message: m, .. }) if *m == message) {
                self.event(None, true, "ResizeInfeasible", &format!("Pod resize Infeasible: {message}"));
            }
            self.state.resize = Some(ResizeStatus::Pending { reason: "Infeasible", message });
            self.next_attempt.insert(name.to_string(), Instant::now() + RESIZE_RETRY);
            return;
        }
        // Fits the node, not beside the other pods (the dispatcher decides): Deferred until it does.
        if let Some(message) = self.shared.deferred() {
            self.state.resize = Some(ResizeStatus::Pending { reason: "Deferred", message });
            self.next_attempt.insert(name.to_string(), Instant::now() + RESIZE_RETRY);
            return;
        }
        self.state.resize = Some(ResizeStatus::InProgress { error: None });
        let record = self.record(kind, index);
        let Some(id) = record.container_id.as_deref().and_then(|i| i.strip_prefix("nodelet://")).map(str::to_string)
        else {
            return;
        };
        let old_memory = record
            .applied
            .as_ref()
            .and_then(|a| a.limits.get("memory"))
            .and_then(|m| resources::quantity(&k8s_openapi::apimachinery::pkg::api::resource::Quantity(m.clone())));
        let wanted = Applied::of(&c);
        let kubelet = &self.ctx.config.kubelet;
        let limits = resources::runtime_resources(
            &resources::container_resources(&c),
            kubelet.pod_pids_limit,
            !kubelet.single_process_oom_kill.unwrap_or(false),
        );
        let pod_limits = resources::pod_cgroup_limits(&self.pod);
        let pids = resources::pod_pids_limit(kubelet.pod_pids_limit);
        let (qos_class, uid) = (self.state.qos, self.pod_ref.uid.clone());
        let rel = format!("{}/{id}", qos::pod_cgroup(qos_class, &uid));
        let memory = limits.memory_limit.and_then(|m| u64::try_from(m).ok());
        let growing = memory.map(|m| m as f64) > old_memory || memory.is_none();
        let hierarchy = self.ctx.hierarchy.clone();
        let shares = limits.cpu_shares.unwrap_or(qos::MIN_SHARES);
        let quota = limits.cpu_quota.and_then(|q| u64::try_from(q).ok());
        let applied = tokio::task::spawn_blocking(move || {
            let pod = || hierarchy.ensure_pod(qos_class, &uid, &pod_limits, pids).map(drop);
            let container = || hierarchy.update_cpu_memory(&rel, shares, quota, memory);
            if growing {
                pod()?;
                container()
            } else {
                container()?;
                pod()
            }
        })
        .await;
        match applied {
            Ok(Ok(())) => {
                self.record(kind, index).applied = Some(wanted);
                let spec = self.pod.spec.clone().unwrap_or_default();
                if !crate::pods::plan::resize_wanted(&spec, &self.state.init, &self.state.containers) {
                    self.state.resize = None;
                }
                self.event(Some((name, kind)), false, "ResizeCompleted", &format!("Pod resize completed: {name}"));
            }
            Ok(Err(e)) => {
                self.event(Some((name, kind)), true, "ResizeFailed", &format!("Pod resize of {name} failed: {e}"));
                self.state.resize = Some(ResizeStatus::InProgress { error: Some(e.to_string()) });
                self.next_attempt.insert(name.to_string(), Instant::now() + RESIZE_RETRY);
            }
            Err(e) => tracing::warn!(container = %name, error = %e, "resizing a container stopped"),
        }
    }
}
