//! Stopping a pod: its containers within the grace period, then its network, sandbox and cgroup.

use std::time::Duration;

use jiff::Timestamp;

use super::Worker;
use crate::pods::state::{ContainerState, Phase};
use crate::status::StatusMessage;

impl Worker {
    /// Stops every running container within the grace period, then removes what the pod had on the node.
    pub(super) async fn terminate(&mut self, grace: Option<i64>, delete: bool) {
        let grace =
            grace.or(self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds)).unwrap_or(30).max(0)
                as u64;
        let mut stops = Vec::new();
        for (name, running) in self.running.drain() {
            let (init, _) = (self.state.init.iter().any(|c| c.name == name), ());
            self.ctx.events.record(
                &self.pod_ref,
                Some((&name, init)),
                false,
                "Killing",
                &format!("Stopping container {name}"),
            );
            let ctx = self.ctx.clone();
            stops.push(tokio::spawn(async move {
                let exit = ctx.runtime.stop(&running.container, Duration::from_secs(grace)).await;
                tracing::debug!(container = %running.id, ?exit, "stopped");
                ctx.remove_container(&running.container).await;
                tracing::debug!(container = %running.id, "deleted");
                (name, running, exit)
            }));
        }
        for stop in stops {
            let Ok((name, running, exit)) = stop.await else { continue };
            let (init, index) = self.locate(&name);
            let terminated = ContainerState::Terminated {
                exit_code: exit.code,
                signal: exit.signal,
                reason: if exit.oom_killed {
                    "OOMKilled"
                } else if exit.code == 0 {
                    "Completed"
                } else {
                    "Error"
                }
                .into(),
                message: None,
                started_at: Some(running.started_at),
                finished_at: Timestamp::now(),
                container_id: Some(format!("nodelet://{}", running.id)),
            };
            let record = self.record(init, index);
            record.state = terminated;
            record.ready = false;
        }
        for record in self.state.containers.iter_mut().chain(self.state.init.iter_mut()) {
            record.ready = false;
        }
        if !self.state.phase.is_terminal() {
            let all_ok = self.state.containers.iter().all(|c| c.succeeded());
            let started = self.state.containers.iter().any(|c| c.started);
            self.state.phase = match (started, all_ok) {
                (true, true) => Phase::Succeeded,
                (true, false) => Phase::Failed,
                (false, _) => Phase::Failed,
            };
        }
        self.tear_down().await;
        tracing::debug!(pod = %self.pod_ref.uid, "torn down");
        self.publish();
        let _ = self.ctx.status.send(StatusMessage::Terminated { pod: self.pod_ref.clone(), delete });
    }

    /// Removes the sandbox and the pod cgroup (containers are gone already).
    pub(super) async fn tear_down(&mut self) {
        self.torn_down = true;
        if let Some(sandbox) = self.sandbox.take() {
            self.ctx.remove_sandbox(&sandbox).await;
        }
        self.ctx.network.remove_files(&self.pod_ref.uid);
        self.state.sandbox_ready = false;
        // Removal retries (sleeping) while the cgroup drains: keep it off the async threads.
        let (ctx, qos, uid) = (self.ctx.clone(), self.state.qos, self.pod_ref.uid.clone());
        let removed =
            tokio::task::spawn_blocking(move || ctx.hierarchy.remove_pod(qos, &uid, Duration::from_secs(10))).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(pod = %self.pod_ref.name, error = %e, "removing the pod cgroup");
        }
    }
}
