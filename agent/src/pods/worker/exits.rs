//! A container's end: its terminated state with upstream's reason, and its restart per policy with
//! CrashLoopBackOff.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use nodelet_runtime::ContainerExit;

use super::{BACKOFF_RESET, Exit, Worker};
use crate::logs;
use crate::pods::state::{ContainerState, Kind};
use crate::pods::{plan, termination_message};

/// Upstream's reason for a container's end.
pub(super) fn exit_reason(exit: &ContainerExit, start_error: bool) -> &'static str {
    match (start_error, exit.oom_killed, exit.code) {
        // Exited while no agent was its parent: the kernel kept no status for us.
        _ if !exit.status_known => "ContainerStatusUnknown",
        (true, _, _) => "StartError",
        (_, true, _) => "OOMKilled",
        (_, _, 0) => "Completed",
        _ => "Error",
    }
}

/// The terminated state of an instance.
pub(super) fn terminated(
    id: &str,
    exit: &ContainerExit,
    started_at: Option<Timestamp>,
    message: Option<String>,
    finished_at: Timestamp,
    start_error: bool,
) -> ContainerState {
    ContainerState::Terminated {
        exit_code: exit.code,
        signal: exit.signal,
        reason: exit_reason(exit, start_error).into(),
        message,
        started_at,
        finished_at,
        container_id: Some(format!("nodelet://{id}")),
    }
}

/// How long after an OOM kill in a container its exit, if the kill ended it, has surely been heard: the init's
/// exit reaches the worker within milliseconds of the kill.
const KILL_SETTLES: Duration = Duration::from_millis(300);

impl Worker {
    /// The OOM research view of a container the kernel OOM-killed: its cgroup as the kill left it (read now,
    /// before the cgroup goes), then, off the worker, the kernel log's record of the kill (read whole), the
    /// `nodelet_oom_event_latency_seconds` sample, the `OOMKilling` event and the record.
    fn record_oom_kill(&self, name: &str, id: &str, kept_running: bool) {
        let heard = nodelet_cgroups::oom::monotonic_us();
        let rel = format!("{}/{id}", nodelet_cgroups::qos::pod_cgroup(self.state.qos, &self.pod_ref.uid));
        let cgroup = self.ctx.hierarchy.oom_record(&rel);
        let (ctx, pod_ref) = (self.ctx.clone(), self.pod_ref.clone());
        let (kind, _) = self.locate(name);
        let mut kill = crate::oom::OomKill {
            namespace: pod_ref.namespace.clone(),
            pod: pod_ref.name.clone(),
            pod_uid: pod_ref.uid.clone(),
            container: name.to_string(),
            container_id: id.to_string(),
            qos_class: self.state.qos.as_str().to_string(),
            heard_at: Timestamp::now().to_string(),
            process: None,
            latency_ms: None,
            cgroup,
            container_kept_running: kept_running,
            memory_samples: self.ctx.oom.samples().before(std::time::Instant::now()),
        };
        tokio::task::spawn_blocking(move || {
            if let Some(k) = nodelet_cgroups::oom::kernel_kill(&kill.container_id) {
                kill.process = Some(crate::oom::KilledProcess { pid: k.pid, name: k.task });
                // A log clock that strays from CLOCK_MONOTONIC (seen in some VMs) would give nonsense: left out.
                if let Some(us) = heard.checked_sub(k.at_us).filter(|us| *us < 60_000_000) {
                    crate::metrics::kubelet::METRICS.oom_event(Duration::from_micros(us));
                    kill.latency_ms = Some(us as f64 / 1000.0);
                }
            }
            ctx.events.record(&pod_ref, Some((&kill.container, kind)), true, "OOMKilling", &kill.message());
            ctx.oom.record(kill);
        });
    }

    /// Watches instance `id`'s memory cgroup for OOM kills while it runs (the watch ends when the cgroup goes). A
    /// kill is sent to this worker a moment later ([`KILL_SETTLES`]), when a kill that ended the container has
    /// been heard as its exit and recorded by it ([`Worker::on_oom_kill`] then finds it gone).
    pub(super) fn watch_oom_kills(&self, name: String, id: String) {
        let rel = format!("{}/{id}", nodelet_cgroups::qos::pod_cgroup(self.state.qos, &self.pod_ref.uid));
        let Some(mut watch) = self.ctx.hierarchy.oom_watch(&rel) else { return };
        let tx = self.ooms_tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(_)) = watch.next().await {
                tokio::time::sleep(KILL_SETTLES).await;
                if tx.send((name.clone(), id.clone())).is_err() {
                    return;
                }
            }
        });
    }

    /// An OOM kill in instance `id` of `name`: recorded if the instance still runs (the kernel killed another
    /// of its processes: cgroup v1, or v2 without group kills); a kill that ended it was recorded with its exit.
    pub(super) fn on_oom_kill(&self, name: &str, id: &str) {
        if self.running.get(name).is_some_and(|r| r.id == id) {
            self.record_oom_kill(name, id, true);
        }
    }

    /// Where an instance's termination message is written.
    pub(super) fn termination_message_file(&self, name: &str, id: &str) -> std::path::PathBuf {
        termination_message::path(&self.ctx.config.root_dir, &self.pod_ref.uid, name, id)
    }

    /// The message an instance left (or its log's end, per `terminationMessagePolicy`); its file goes.
    pub(super) fn termination_message(&self, name: &str, id: &str, code: i32) -> Option<String> {
        let (kind, _) = self.locate(name);
        let (c, _) = self.container_spec(name, kind)?;
        c.termination_message_path.as_deref().filter(|p| !p.is_empty())?;
        let spec = self.pod.spec.as_ref()?;
        let containers = spec.containers.len() + spec.init_containers.as_ref().map_or(0, Vec::len);
        let share = termination_message::MAX_POD_MESSAGES / containers.max(1);
        // Instance IDs end in the instance's number, which names its log file.
        let restart = id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let log = logs::container_log_path(&self.log_dir, name, restart);
        let fallback = c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
        let file = self.termination_message_file(name, id);
        let message = termination_message::read(&file, &log, fallback, code, share);
        let _ = std::fs::remove_file(&file);
        message
    }

    pub(super) async fn on_exit(&mut self, exit: Exit) {
        // An exit of an instance this worker already stopped (and replaced) is old news.
        if self.running.get(&exit.name).is_none_or(|r| r.id != exit.id) {
            return;
        }
        let Some(running) = self.running.remove(&exit.name) else { return };
        if exit.exit.oom_killed {
            self.record_oom_kill(&exit.name, &running.id, false);
        }
        self.ctx.remove_container(&running.id).await;
        if running.started.elapsed() >= BACKOFF_RESET {
            self.crash_backoff.reset(&exit.name);
        }
        self.finish(&exit.name, &running.id, exit.exit, Some(running.started_at), None, Timestamp::now());
    }

    /// Records a container's end and schedules its restart per policy and back-off.
    pub(super) fn finish(
        &mut self,
        name: &str,
        id: &str,
        exit: ContainerExit,
        started_at: Option<Timestamp>,
        message: Option<String>,
        finished_at: Timestamp,
    ) {
        let (kind, index) = self.locate(name);
        // A container that could not start has no message of its own (upstream).
        let message = message.or_else(|| self.termination_message(name, id, exit.code));
        let start_error = message.is_some() && started_at.is_none();
        let state = terminated(id, &exit, started_at, message, finished_at, start_error);
        let spec = self.pod.spec.clone().unwrap_or_default();
        let init = kind.is_init();
        let restarts = kind != Kind::Ephemeral
            && self.container_spec(name, kind).is_some_and(|(c, _)| {
                let sidecar = init && plan::is_sidecar(&c);
                // A regular init container that succeeded is done; an exit that restarts the whole pod is the
                // plan's (`RestartAll`), with no back-off of its own.
                (sidecar || !init || exit.code != 0)
                    && plan::should_restart(&c, &spec, exit.code)
                    && !plan::restarts_all(&c, exit.code)
            });
        let now = Instant::now();
        let delay = self.crash_backoff.delay(name);
        if restarts {
            self.crash_backoff.next(name, now);
            self.next_attempt.insert(name.to_string(), now + delay);
        }
        let pod = format!("{}_{}({})", self.pod_ref.name, self.pod_ref.namespace, self.pod_ref.uid);
        let record = self.record(kind, index);
        // A completed init container reports ready (upstream); anything else that ended is not.
        let completed_init = init && exit.code == 0 && !restarts;
        record.ready = completed_init;
        record.started = false;
        record.state = state;
        if restarts && !delay.is_zero() {
            record.last_state = Some(record.state.clone());
            record.state = ContainerState::waiting(
                "CrashLoopBackOff",
                Some(format!("back-off {} restarting failed container={name} pod={pod}", go_seconds(delay))),
            );
            self.event(
                Some((name, kind)),
                true,
                "BackOff",
                &format!("Back-off restarting failed container {name} in pod {pod}"),
            );
        }
    }
}

/// A duration as Go prints whole seconds and minutes (`10s`, `2m40s`, `5m0s`).
fn go_seconds(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 { format!("{}m{}s", s / 60, s % 60) } else { format!("{s}s") }
}
