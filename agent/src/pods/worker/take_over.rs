//! Taking a pod over from the previous agent process (see [`crate::pods::restore`]).

use std::time::{Duration, Instant};

use jiff::Timestamp;
use nodelet_runtime::ContainerExit;

use super::{Running, Worker};
use crate::logs;
use crate::pods::restore::Inherited;
use crate::pods::state::{ContainerState, Kind};

impl Worker {
    /// Takes over what the previous agent process left: the saved records, the sandbox and the containers still
    /// running (their output is relayed again, their exits watched). A container that died meanwhile is reported
    /// as upstream reports a container it cannot find, and restarted per policy.
    pub(super) async fn take_over(&mut self, inherited: Inherited) {
        let Inherited { saved, containers, sandbox } = inherited;
        // A member's PID finds the sandbox's namespaces again; the runtime keeps the handles from here on.
        let member = containers.values().next().map(|c| c.pid);
        let mut containers: std::collections::HashSet<String> =
            containers.into_values().map(|c| self.ctx.runtime.adopt(c)).collect();
        let Some(saved) = saved else {
            // Nothing says what these were: start afresh.
            for id in containers {
                self.ctx.remove_container(&id).await;
            }
            if let Some(sandbox) = sandbox {
                self.ctx.remove_sandbox(&sandbox).await;
            }
            return;
        };
        tracing::info!(pod = %self.pod_ref.name, live = containers.len(), "taking over the pod from the previous agent");
        self.state.start_time = saved.start_time;
        for records in [saved.init, saved.containers, saved.ephemeral] {
            for record in records {
                let (kind, _) = self.locate(&record.name);
                let mine = match kind {
                    Kind::Init => &mut self.state.init,
                    Kind::App => &mut self.state.containers,
                    Kind::Ephemeral => &mut self.state.ephemeral,
                };
                if let Some(slot) = mine.iter_mut().find(|r| r.name == record.name) {
                    *slot = record;
                }
            }
        }
        if let Some(sandbox) = sandbox {
            match sandbox.repair(member) {
                Ok(sandbox) => {
                    if let Some(ip) = self.ctx.network.ips(&sandbox.id).first() {
                        self.state.pod_ip = Some(ip.clone());
                    }
                    if let Err(e) = self.ctx.network.check(&sandbox.id).await {
                        tracing::warn!(pod = %self.pod_ref.name, error = %e, "the pod's network is not as it was set up");
                    }
                    self.name_files = self.ctx.network.file_mounts(&self.pod_ref.uid);
                    self.sandbox = Some(sandbox);
                    self.state.sandbox_ready = true;
                }
                Err(e) => {
                    tracing::info!(pod = %self.pod_ref.name, error = %e, "the pod's sandbox is gone: making a new one");
                    self.ctx.remove_sandbox(&sandbox).await;
                }
            }
        }
        let now = Timestamp::now();
        let records: Vec<(String, String, Timestamp)> = self
            .state
            .init
            .iter()
            .chain(&self.state.containers)
            .chain(&self.state.ephemeral)
            .filter_map(|r| match r.state {
                ContainerState::Running { started_at } => {
                    let id = r.container_id.as_deref()?.strip_prefix("nodelet://")?.to_string();
                    Some((r.name.clone(), id, started_at))
                }
                _ => None,
            })
            .collect();
        for (name, id, started_at) in records {
            let mut live = containers.remove(&id);
            if self.sandbox.is_none() && live {
                // Its pod's namespaces are gone: it cannot go on as part of the pod.
                self.ctx.remove_container(&id).await;
                live = false;
            }
            if !live {
                let (images, gone) = (self.ctx.images.clone(), id.clone());
                let _ = tokio::task::spawn_blocking(move || images.remove_rootfs(&gone)).await;
                let exit = ContainerExit { code: 137, signal: None, oom_killed: false, status_known: false };
                let message = "The container could not be located when the pod was terminated".to_string();
                self.finish(&name, &id, exit, Some(started_at), Some(message), now);
                continue;
            }
            match self.ctx.runtime.reopen_output(&id) {
                Some((stdout, stderr)) => {
                    let restart = id.rsplit_once('-').and_then(|(_, n)| n.parse().ok()).unwrap_or(0);
                    let path = logs::container_log_path(&self.log_dir, &name, restart);
                    // Its stdin and terminal stayed with the previous agent: attach gets the output.
                    let attachable = crate::pods::attach::Attachable::new(None, false, None);
                    self.log_and_attach(&id, logs::pipes(stdout, stderr), attachable, path);
                }
                None => tracing::warn!(container = %id, "cannot reopen the container's output: its log stops here"),
            }
            let ran = Duration::try_from(now.duration_since(started_at)).unwrap_or_default();
            let started = Instant::now().checked_sub(ran).unwrap_or_else(Instant::now);
            let (kind, index) = self.locate(&name);
            let ready = self.record(kind, index).ready;
            match self.container_spec(&name, kind) {
                Some((c, _)) => self.watch_since(&c, id, started_at, started, Some(ready)),
                None => {
                    let probes = super::probes::Probes::default();
                    self.running.insert(name.clone(), Running { id: id.clone(), probes, started_at, started });
                    self.watch_exit(name, id);
                }
            }
        }
        // Containers no record claims (created just before the crash): not ours to guess about.
        for id in containers {
            self.ctx.remove_container(&id).await;
        }
    }
}
