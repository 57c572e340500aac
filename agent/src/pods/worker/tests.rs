//! The pod worker's executor on the in-memory fakes (`pods::services::fake`): what it asks of the runtime and in
//! which order, and the states it reports, without root.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{mpsc, watch};

use super::{Desired, Worker};
use crate::pods::restore::Inherited;
use crate::pods::services::fake::{self, FakeImages, FakeRuntime, Script};
use crate::pods::state::{ContainerRecord, ContainerState, Phase, PodState};
use crate::status::StatusMessage;

struct Harness {
    runtime: Arc<FakeRuntime>,
    status: mpsc::UnboundedReceiver<StatusMessage>,
    desired: watch::Sender<Desired>,
    pod: Pod,
    worker: Option<tokio::task::JoinHandle<()>>,
    /// What the dispatcher shares with the worker (an eviction).
    shared: Arc<crate::pods::Shared>,
    dir: tempfile::TempDir,
}

fn pod(yaml: &str) -> Pod {
    let mut pod: Pod = serde_yaml::from_str(yaml).expect("test pod");
    pod.metadata.namespace = Some("default".into());
    pod.metadata.uid = Some("u1".into());
    for c in pod.spec.iter_mut().flat_map(|s| s.containers.iter_mut().chain(s.init_containers.iter_mut().flatten())) {
        c.image.get_or_insert_with(|| "busybox".into());
    }
    pod
}

impl Harness {
    /// A worker for `pod` on fakes; `script` runs before it starts.
    fn start(pod: Pod, script: impl FnOnce(&FakeRuntime, &FakeImages)) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let runtime = Arc::new(FakeRuntime::default());
        let images = Arc::new(FakeImages::default());
        script(&runtime, &images);
        let (ctx, status) = fake::ctx(&root, runtime.clone(), images.clone());
        let (desired, rx) = watch::channel(Desired::Pod(Arc::new(pod.clone())));
        let inherited = Inherited { saved: None, containers: Default::default(), sandbox: None };
        let shared = Arc::new(crate::pods::Shared::default());
        let worker = Worker::new(ctx, pod.clone(), rx, inherited, shared.clone());
        let worker = Some(tokio::spawn(worker.run()));
        Harness { runtime, status, desired, pod, worker, shared, dir }
    }

    /// The first reported state that satisfies `f` (within 10 s).
    async fn until(&mut self, what: &str, f: impl Fn(&PodState) -> bool) -> PodState {
        let wait = async {
            while let Some(message) = self.status.recv().await {
                if let StatusMessage::Update { state, .. } = message
                    && f(&state)
                {
                    return Some(*state);
                }
            }
            None
        };
        match tokio::time::timeout(Duration::from_secs(10), wait).await {
            Ok(Some(state)) => state,
            _ => panic!("never reported: {what}; the runtime was asked: {:?}", self.runtime.log()),
        }
    }

    /// Sends the pod with a deletion timestamp and a grace period of `grace` seconds.
    fn send_deletion(&mut self, grace: i64) {
        let mut deleted = self.pod.clone();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
        deleted.metadata.deletion_grace_period_seconds = Some(grace);
        self.desired.send_replace(Desired::Pod(Arc::new(deleted)));
    }

    /// Waits until the worker is done.
    async fn ended(&mut self) {
        let worker = self.worker.take().expect("running");
        tokio::time::timeout(Duration::from_secs(10), worker).await.expect("the worker ended").expect("no panic");
    }

    /// Deletes the pod (1 s grace) and waits until the worker is done.
    async fn delete(&mut self) {
        self.send_deletion(1);
        self.ended().await;
    }
}

fn app<'a>(s: &'a PodState, name: &str) -> &'a ContainerRecord {
    s.containers.iter().chain(&s.init).find(|c| c.name == name).expect("container record")
}

fn waiting_reason(c: &ContainerRecord) -> Option<&str> {
    match &c.state {
        ContainerState::Waiting { reason, .. } => Some(reason),
        _ => None,
    }
}

#[tokio::test]
async fn init_containers_run_one_at_a_time_then_the_app() {
    let p = pod("metadata: {name: p}
spec:
  restartPolicy: Never
  initContainers: [{name: a}, {name: b}]
  containers: [{name: main}]");
    let mut h = Harness::start(p, |rt, _| {
        for name in ["a", "b", "main"] {
            rt.script(name, Script::ExitAtStart(0));
        }
    });
    let done = h.until("Succeeded", |s| s.phase == Phase::Succeeded).await;
    assert!(done.initialized);
    let creates: Vec<String> = h.runtime.log().into_iter().filter(|l| l.starts_with("create")).collect();
    assert_eq!(creates, ["create a", "create b", "create main"]);
    let log = h.runtime.log();
    let pos = |what: &str| log.iter().position(|l| l == what).expect(what);
    assert!(pos("sandbox") < pos("create a"), "the sandbox first: {log:?}");
    assert!(pos("start a") < pos("create b"), "b waits for a: {log:?}");
}

#[tokio::test]
async fn a_failed_init_container_fails_a_never_pod() {
    let p = pod("metadata: {name: p}
spec:
  restartPolicy: Never
  initContainers: [{name: a}]
  containers: [{name: main}]");
    let mut h = Harness::start(p, |rt, _| rt.script("a", Script::ExitAtStart(2)));
    let failed = h.until("Failed", |s| s.phase == Phase::Failed).await;
    assert!(
        matches!(app(&failed, "a").state, ContainerState::Terminated { exit_code: 2, ref reason, .. } if reason == "Error")
    );
    assert!(!h.runtime.log().contains(&"create main".to_string()), "{:?}", h.runtime.log());
}

#[tokio::test]
async fn a_crashing_container_backs_off_before_it_restarts() {
    let p = pod("metadata: {name: p}\nspec:\n  containers: [{name: main}]");
    let mut h = Harness::start(p, |rt, _| rt.script("main", Script::ExitAtStart(1)));
    let backing_off = h.until("CrashLoopBackOff", |s| waiting_reason(app(s, "main")) == Some("CrashLoopBackOff")).await;
    let main = app(&backing_off, "main");
    let ContainerState::Waiting { message, .. } = &main.state else { unreachable!() };
    assert_eq!(message.as_deref(), Some("back-off 10s restarting failed container=main pod=p_default(u1)"));
    assert!(matches!(main.last_state, Some(ContainerState::Terminated { exit_code: 1, .. })), "{main:?}");
    assert_eq!(backing_off.phase, Phase::Running);
    // As upstream: the first restart at once, the next after the back-off (10 s, then doubling).
    assert_eq!(main.restart_count, 1, "{main:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let starts = h.runtime.log().iter().filter(|l| *l == "start main").count();
    assert_eq!(starts, 2, "{:?}", h.runtime.log());
    h.delete().await;
}

#[tokio::test]
async fn a_new_image_for_a_crash_looping_container_starts_it_without_the_back_off() {
    let p = pod("metadata: {name: p}\nspec:\n  containers: [{name: main}]");
    let mut h = Harness::start(p.clone(), |rt, _| rt.script("main", Script::ExitAtStart(1)));
    h.until("CrashLoopBackOff", |s| waiting_reason(app(s, "main")) == Some("CrashLoopBackOff")).await;
    let mut updated = p;
    updated.spec.as_mut().expect("spec").containers[0].image = Some("busybox:other".into());
    h.pod = updated.clone();
    let sent = std::time::Instant::now();
    h.desired.send_replace(Desired::Pod(Arc::new(updated)));
    // The back-off was 10 s: the new spec starts at once (upstream keys the back-off by the container's spec).
    h.until("started with the new image", |s| app(s, "main").restart_count == 2).await;
    assert!(sent.elapsed() < Duration::from_secs(5), "{:?}", sent.elapsed());
    h.delete().await;
}

#[tokio::test]
async fn a_new_image_arriving_while_the_old_one_runs_has_a_fresh_back_off() {
    let p = pod("metadata: {name: p}\nspec:\n  containers: [{name: main}]");
    let mut h = Harness::start(p.clone(), |_, _| {});
    // One crash: restarted at once, and the next restart would wait 10 s.
    h.until("running", |s| app(s, "main").state.is_running()).await;
    h.runtime.exit("main", 1);
    h.until("restarted", |s| app(s, "main").restart_count == 1 && app(s, "main").state.is_running()).await;
    // The new image arrives while it runs: restarted with it; its first crash restarts at once.
    let mut updated = p;
    updated.spec.as_mut().expect("spec").containers[0].image = Some("busybox:other".into());
    h.pod = updated.clone();
    h.desired.send_replace(Desired::Pod(Arc::new(updated)));
    h.until("restarted with the new image", |s| app(s, "main").restart_count == 2 && app(s, "main").state.is_running())
        .await;
    let crashed = std::time::Instant::now();
    h.runtime.exit("main", 1);
    h.until("restarted at once", |s| app(s, "main").restart_count == 3).await;
    assert!(crashed.elapsed() < Duration::from_secs(5), "{:?}", crashed.elapsed());
    h.delete().await;
}

#[tokio::test]
async fn deletion_stops_the_app_containers_before_the_sidecars() {
    let p = pod("metadata: {name: p}
spec:
  initContainers: [{name: proxy, restartPolicy: Always}]
  containers: [{name: a}, {name: b}]");
    let mut h = Harness::start(p, |_, _| {});
    h.until("all running", |s| s.containers.iter().chain(&s.init).all(|c| c.state.is_running())).await;
    let log = h.runtime.log();
    let pos = |log: &[String], what: &str| log.iter().position(|l| l == what).expect(what);
    assert!(pos(&log, "start proxy") < pos(&log, "create a"), "the sidecar first: {log:?}");
    h.delete().await;
    let log = h.runtime.log();
    assert!(pos(&log, "stop a") < pos(&log, "stop proxy") && pos(&log, "stop b") < pos(&log, "stop proxy"), "{log:?}");
    assert!(pos(&log, "stop proxy") < pos(&log, "remove sandbox"), "{log:?}");
}

#[tokio::test]
async fn a_changed_spec_restarts_the_container_with_it() {
    let p = pod("metadata: {name: p}\nspec:\n  containers: [{name: main, command: [sleep, '1']}]");
    let mut h = Harness::start(p.clone(), |_, _| {});
    h.until("running", |s| app(s, "main").state.is_running()).await;
    let mut changed = p;
    changed.spec.as_mut().expect("spec").containers[0].command = Some(vec!["sleep".into(), "2".into()]);
    h.pod = changed.clone();
    h.desired.send_replace(Desired::Pod(Arc::new(changed)));
    let restarted =
        h.until("restarted", |s| app(s, "main").restart_count == 1 && app(s, "main").state.is_running()).await;
    assert!(app(&restarted, "main").container_id.as_deref().is_some_and(|id| id.ends_with("-1")));
    assert_eq!(h.runtime.command("main"), Some(vec!["sleep".to_string(), "2".to_string()]));
    let log = h.runtime.log();
    assert_eq!(log.iter().filter(|l| *l == "stop main").count(), 1, "{log:?}");
    h.delete().await;
}

#[tokio::test]
async fn failures_to_create_pull_or_start_are_reported_as_upstream() {
    let p = pod("metadata: {name: p}
spec:
  restartPolicy: Never
  containers: [{name: spec}, {name: start}, {name: pull, image: missing}]");
    let mut h = Harness::start(p, |rt, images| {
        rt.script("spec", Script::FailCreate);
        rt.script("start", Script::FailStart);
        images.missing.lock().unwrap_or_else(|e| e.into_inner()).push("missing".into());
    });
    let s = h
        .until("all three failures", |s| {
            waiting_reason(app(s, "spec")) == Some("CreateContainerError")
                && waiting_reason(app(s, "pull")) == Some("ErrImagePull")
                && matches!(app(s, "start").state, ContainerState::Terminated { .. })
        })
        .await;
    let ContainerState::Terminated { exit_code, reason, message, .. } = &app(&s, "start").state else { unreachable!() };
    assert_eq!((*exit_code, reason.as_str()), (128, "StartError"));
    assert!(message.as_deref().is_some_and(|m| m.contains("no such file")), "{message:?}");
    h.delete().await;
}

#[tokio::test]
async fn no_container_starts_before_the_volumes_are_set_up() {
    // Standalone (no API server): a required ConfigMap cannot be found.
    let p = pod("metadata: {name: p}
spec:
  containers: [{name: main, volumeMounts: [{name: c, mountPath: /c}]}]
  volumes: [{name: c, configMap: {name: app}}]");
    let mut h = Harness::start(p, |_, _| {});
    let s = h.until("ContainerCreating", |s| waiting_reason(app(s, "main")) == Some("ContainerCreating")).await;
    assert_eq!(s.phase, Phase::Pending);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(h.runtime.log().is_empty(), "nothing runs without its volumes: {:?}", h.runtime.log());
    h.delete().await;
}

#[tokio::test]
async fn readiness_follows_the_probe_and_a_failed_liveness_probe_restarts() {
    let p = pod("metadata: {name: p}
spec:
  containers:
  - name: web
    readinessProbe: {exec: {command: [check]}, periodSeconds: 1, failureThreshold: 1}
  - name: live
    livenessProbe: {exec: {command: [check]}, periodSeconds: 1, failureThreshold: 1}");
    let mut h = Harness::start(p, |rt, _| {
        rt.set_exec("live", 0);
        rt.delay_stops("live", Duration::from_millis(2500));
    });
    let running = h.until("web running", |s| app(s, "web").state.is_running()).await;
    assert!(!app(&running, "web").ready, "unready until the first probe");
    assert!(app(&running, "live").ready, "no readiness probe: ready once running");
    h.until("web ready", |s| app(s, "web").ready).await;
    h.runtime.set_exec("web", 1);
    h.until("web unready again", |s| !app(s, "web").ready && app(s, "web").state.is_running()).await;
    // A failing liveness probe: stopped (SIGTERM) and started again, as restartPolicy Always says.
    h.runtime.set_exec("live", 1);
    let restarted = h.until("live restarted", |s| app(s, "live").restart_count == 1).await;
    assert!(
        matches!(app(&restarted, "live").last_state, Some(ContainerState::Terminated { exit_code: 143, .. }))
            || matches!(app(&restarted, "live").state, ContainerState::Terminated { exit_code: 143, .. }),
        "{:?}",
        app(&restarted, "live")
    );
    // While it was being stopped (2.5 s), its liveness probe held off (upstream's onHold).
    let log = h.runtime.log();
    let stop = log.iter().position(|l| l == "stop live").expect("stopped");
    let next = log.iter().skip(stop).position(|l| l == "start live").map_or(log.len(), |p| stop + p);
    assert!(!log[stop..next].contains(&"exec live".to_string()), "probed while stopping: {log:?}");
    h.delete().await;
}

/// Upstream's prober while a pod terminates: readiness goes on (the pod leaves its Services once it stops
/// answering, before its containers have exited), liveness stops (no restart of a container on its way out).
#[tokio::test]
async fn while_a_container_stops_readiness_is_still_probed_and_liveness_is_not() {
    let check = "{exec: {command: [check]}, periodSeconds: 1, failureThreshold: 1}";
    let p = pod(&format!(
        "metadata: {{name: p}}\nspec:\n  containers:\n  - name: web\n    readinessProbe: {check}\n    livenessProbe: {check}"
    ));
    let mut h = Harness::start(p, |rt, _| {
        rt.set_exec("web", 0);
        rt.delay_stops("web", Duration::from_secs(4));
    });
    h.until("web ready", |s| app(s, "web").ready).await;
    h.send_deletion(30);
    let stopping = async {
        while !h.runtime.log().contains(&"stop web".to_string()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), stopping).await.expect("the container is being stopped");
    // It stops answering while it drains: unready before it has exited, and not restarted.
    h.runtime.set_exec("web", 1);
    h.until("unready while still running", |s| !app(s, "web").ready && app(s, "web").state.is_running()).await;
    h.ended().await;
    let stops = h.runtime.log().iter().filter(|l| *l == "stop web").count();
    assert_eq!(stops, 1, "stopped once, never for liveness: {:?}", h.runtime.log());
}

#[tokio::test]
async fn a_startup_probe_holds_back_started_and_readiness() {
    let p = pod("metadata: {name: p}
spec:
  containers:
  - name: slow
    startupProbe: {exec: {command: [check]}, periodSeconds: 1, failureThreshold: 30}
    readinessProbe: {exec: {command: [check]}, periodSeconds: 1}");
    let mut h = Harness::start(p, |rt, _| rt.set_exec("slow", 1));
    let s = h.until("running", |s| app(s, "slow").state.is_running()).await;
    assert!(!app(&s, "slow").started && !app(&s, "slow").ready);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h.runtime.set_exec("slow", 0);
    let s = h.until("started and ready", |s| app(s, "slow").started && app(s, "slow").ready).await;
    assert_eq!(app(&s, "slow").restart_count, 0);
    h.delete().await;
}

#[tokio::test]
async fn hooks_run_after_start_and_before_stop() {
    let p = pod("metadata: {name: p}
spec:
  containers:
  - name: main
    lifecycle:
      postStart: {exec: {command: [setup]}}
      preStop: {exec: {command: [drain]}}");
    let mut h = Harness::start(p, |_, _| {});
    h.until("running", |s| app(s, "main").state.is_running()).await;
    h.delete().await;
    let log = h.runtime.log();
    let main: Vec<&str> = log.iter().map(String::as_str).filter(|l| l.ends_with(" main")).collect();
    assert_eq!(main, ["create main", "start main", "exec main", "exec main", "stop main", "delete main"], "{log:?}");
}

#[tokio::test]
async fn a_failed_post_start_hook_restarts_the_container() {
    let p = pod("metadata: {name: p}
spec:
  containers:
  - name: main
    lifecycle: {postStart: {exec: {command: [setup]}}}");
    let mut h = Harness::start(p, |rt, _| rt.set_exec("main", 1));
    h.until("restarted", |s| app(s, "main").restart_count >= 1).await;
    let log = h.runtime.log();
    let first_stop = log.iter().position(|l| l == "stop main").expect("stopped");
    assert!(log.iter().position(|l| l == "exec main").is_some_and(|e| e < first_stop), "{log:?}");
    h.delete().await;
}

#[tokio::test]
async fn an_ephemeral_container_joins_its_targets_pid_namespace_runs_once_and_is_not_restarted() {
    let p = pod("metadata: {name: p}
spec:
  restartPolicy: Always
  containers: [{name: main}]");
    let mut h = Harness::start(p.clone(), |_, _| {});
    h.until("running", |s| s.containers[0].state.is_running()).await;
    // `kubectl debug --target=main` adds an ephemeral container to the running pod.
    let mut debugged = p;
    debugged.spec.as_mut().expect("spec").ephemeral_containers = Some(vec![
        serde_yaml::from_str("{name: debugger, image: busybox, targetContainerName: main}").expect("ephemeral"),
        serde_yaml::from_str("{name: lost, image: busybox, targetContainerName: ghost}").expect("ephemeral"),
    ]);
    h.desired.send_replace(Desired::Pod(Arc::new(debugged)));
    let s = h.until("the debugger running", |s| s.ephemeral.first().is_some_and(|e| e.state.is_running())).await;
    assert!(!s.ephemeral[0].ready, "ephemeral containers never report ready");
    let joined = h.runtime.pid_namespace_of("debugger");
    assert_eq!(joined, Some(nodelet_runtime::Namespace::Join("/nonexistent/containers/u1-main-0/ns/pid".into())));
    assert_eq!(h.runtime.pid_namespace_of("main"), Some(nodelet_runtime::Namespace::Private));
    let s = h.until("the lost one refused", |s| matches!(&s.ephemeral[1].state, ContainerState::Waiting { reason, .. } if reason == "CreateContainerConfigError")).await;
    let ContainerState::Waiting { message, .. } = &s.ephemeral[1].state else { unreachable!() };
    assert_eq!(message.as_deref(), Some("unable to find target container ghost"));
    h.runtime.exit("debugger", 3);
    let s = h.until("the debugger ended", |s| matches!(s.ephemeral[0].state, ContainerState::Terminated { .. })).await;
    assert_eq!(s.ephemeral[0].restart_count, 0);
    assert!(s.containers[0].state.is_running(), "the pod keeps running");
    h.delete().await;
    let log = h.runtime.log();
    assert_eq!(log.iter().filter(|l| *l == "create debugger").count(), 1, "never restarted: {log:?}");
}

#[tokio::test]
async fn an_ephemeral_container_added_while_an_image_is_pulled_is_started_without_another_update() {
    let p = pod("metadata: {name: p}
spec:
  containers: [{name: main, image: slow-image}]");
    let mut h = Harness::start(p.clone(), |_, images| images.slow.lock().unwrap().push("slow-image".into()));
    h.until("created", |s| matches!(&s.containers[0].state, ContainerState::Waiting { .. })).await;
    // The worker is in the pull (1 s) well before this: the update arrives there, and nothing comes after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut debugged = p;
    debugged.spec.as_mut().expect("spec").ephemeral_containers =
        Some(vec![serde_yaml::from_str("{name: debugger, image: busybox}").expect("ephemeral")]);
    h.desired.send_replace(Desired::Pod(Arc::new(debugged)));
    h.until("the debugger running", |s| s.ephemeral.first().is_some_and(|e| e.state.is_running())).await;
    h.delete().await;
}

#[tokio::test]
async fn an_evicted_pod_fails_as_upstream_reports_it() {
    let p = pod("metadata: {name: p}
spec:
  terminationGracePeriodSeconds: 30
  containers: [{name: a}, {name: b}]");
    let mut h = Harness::start(p, |_, _| {});
    h.until("running", |s| s.containers.iter().all(|c| c.state.is_running())).await;
    let message = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 80Mi. ";
    let grace = crate::eviction::HARD_EVICTION_GRACE;
    let eviction = crate::eviction::Eviction { uid: "u1".into(), message: message.into(), grace, disruption: true };
    *h.shared.eviction.lock().unwrap_or_else(|e| e.into_inner()) = Some(eviction);
    h.desired.send_modify(|_| {});
    let started = std::time::Instant::now();
    let s = h.until("evicted", |s| s.phase == Phase::Failed).await;
    assert_eq!((s.reason.as_deref(), s.message.as_deref()), (Some("Evicted"), Some(message)));
    assert_eq!(s.disruption.as_deref(), Some(message), "the DisruptionTarget condition's message");
    assert!(s.containers.iter().all(|c| !c.state.is_running() && !c.ready), "{:?}", s.containers);
    // The hard eviction's grace period, not the pod's 30 s.
    assert!(started.elapsed() < Duration::from_secs(5));
    let status = crate::status::pod_status::pod_status(&s, None);
    let condition = status.conditions.iter().flatten().find(|c| c.type_ == "DisruptionTarget").expect("condition");
    assert_eq!((condition.status.as_str(), condition.reason.as_deref()), ("True", Some("TerminationByKubelet")));
}

#[tokio::test]
async fn an_oom_kill_that_leaves_the_container_running_is_recorded() {
    let p = pod("metadata: {name: p}
spec:
  containers: [{name: a}]");
    let mut h = Harness::start(p, |_, _| {});
    h.until("running", |s| s.containers.iter().all(|c| c.state.is_running())).await;
    // The kernel kills a process in the container's cgroup; the container keeps running.
    let events = memory_events_files(&h.dir.path().join("cgroups"));
    let [events] = events.as_slice() else { panic!("one container cgroup watched: {events:?}") };
    std::fs::write(events, "oom 1\noom_kill 1\n").expect("a kill");
    let log = h.dir.path().join("oom/kills.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !log.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let records = crate::oom::OomLog::open(h.dir.path()).recent(Some("default/p"));
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0].container_kept_running && records[0].container == "a", "{:?}", records[0]);
    h.delete().await;
}

/// Every `memory.events` file below `dir`.
fn memory_events_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(memory_events_files(&path));
        } else if path.file_name().is_some_and(|n| n == "memory.events") {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn a_restart_all_rule_restarts_every_container_in_place() {
    let p = pod("metadata: {name: p}
spec:
  restartPolicy: Never
  initContainers: [{name: init}, {name: side, restartPolicy: Always}]
  containers:
  - name: source
    restartPolicy: Never
    restartPolicyRules: [{action: RestartAllContainers, exitCodes: {operator: In, values: [42]}}]
  - {name: regular, restartPolicy: Never}");
    let mut h = Harness::start(p, |rt, _| rt.script("init", Script::ExitAtStart(0)));
    let running = |s: &PodState, name: &str| app(s, name).state.is_running();
    h.until("all running", |s| running(s, "source") && running(s, "regular") && running(s, "side")).await;
    h.runtime.exit("source", 42);
    let stopping =
        h.until("AllContainersRestarting", |s| s.restart_all == Some(crate::pods::state::RestartAll::Stopping)).await;
    assert!(stopping.initialized, "the Initialized condition stays True");
    let again = h
        .until("everything started again", |s| {
            ["side", "source", "regular"].iter().all(|n| running(s, n) && app(s, n).restart_count == 1)
                && app(s, "init").restart_count == 1
                && s.restart_all.is_none()
        })
        .await;
    let (reason, _) = crate::pods::state::RESTARTING_ALL;
    for name in ["init", "side", "source", "regular"] {
        let last = app(&again, name).last_state.as_ref();
        assert!(
            matches!(last, Some(ContainerState::Terminated { reason: r, exit_code: 137, .. }) if r == reason),
            "{name}: {last:?}"
        );
    }
    assert!(app(&again, "init").succeeded(), "the init container ran again");
    assert_eq!(again.phase, Phase::Running);
    let log = h.runtime.log();
    let creates: Vec<&str> = log.iter().filter(|l| l.starts_with("create")).map(String::as_str).collect();
    assert_eq!(
        creates,
        ["create init", "create side", "create source", "create regular"].repeat(2),
        "the same order the second time"
    );
    // The app containers stopped before the sidecar; the sandbox stayed.
    let stops: Vec<&str> = log.iter().filter(|l| l.starts_with("stop")).map(String::as_str).collect();
    assert_eq!(stops.last(), Some(&"stop side"), "{stops:?}");
    assert_eq!(log.iter().filter(|l| l.as_str() == "sandbox").count(), 1, "{log:?}");
    h.delete().await;
}
