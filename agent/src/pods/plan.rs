//! The pod worker's decisions, as pure functions of the desired pod and what the worker observed: which container
//! to start next (init order, native sidecars, restart policies and rules, back-off), which to restart because
//! its spec changed, when to stop the sidecars, when the pod has outlived `activeDeadlineSeconds`, and the pod's
//! phase (upstream's `computePodActions` and `getPhase`). The worker ([`super::worker`]) observes, calls
//! [`plan`], and carries the actions out; nothing here touches the runtime, so every rule is unit tested with
//! plain data.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use sha2::Digest;

use super::state::{Applied, ContainerRecord, ContainerState, Phase, RESTARTING_ALL};

/// What the worker knows when it plans.
pub struct Observed<'a> {
    /// Init containers' records, in spec order.
    pub init: &'a [ContainerRecord],
    /// App containers' records, in spec order.
    pub containers: &'a [ContainerRecord],
    /// Ephemeral containers' records.
    pub ephemeral: &'a [ContainerRecord],
    /// The earliest time each container may be (re)started (crash-loop back-off, retries); absent: now.
    pub not_before: &'a HashMap<String, Instant>,
    pub now: Instant,
    /// Whether the pod has initialized (sticky: a sidecar that restarts later does not undo it; an in-place
    /// restart of all its containers does, here, so that its init containers run again).
    pub initialized: bool,
    /// How long the pod has been active on the node.
    pub active_for: Duration,
}

/// One step for the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start (or restart) the container.
    Start { name: String, init: bool },
    /// Stop the running container and start it again at once (its spec changed: `kubectl set image`; or a resize
    /// whose `resizePolicy` says `RestartContainer`).
    Restart { name: String, init: bool, message: String },
    /// Start an ephemeral container (once: it is never restarted).
    StartEphemeral { name: String },
    /// Change the running container's cgroup limits in place (in-place pod resize).
    Resize { name: String, init: bool },
    /// Every app container finished for good: stop the sidecars, in reverse order.
    StopSidecars,
    /// The pod fails: stop every container.
    Fail { reason: &'static str, message: String },
    /// Container `name` exited with a code its `RestartAllContainers` rule names: stop every container, then
    /// start them again from the first init container, in the same sandbox and volumes.
    RestartAll { name: String },
}

/// Upstream's reason and message for a pod past its `activeDeadlineSeconds`.
pub const DEADLINE_EXCEEDED: (&str, &str) =
    ("DeadlineExceeded", "Pod was active on the node longer than the specified deadline");

/// A native sidecar: an init container with `restartPolicy: Always`.
pub fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// The action of the container's first `restartPolicyRules` entry that matches exit code `code` (rules apply
/// only to containers with a `restartPolicy` of their own, as upstream's `FindMatchingContainerRestartRule`).
pub fn rule_action(c: &Container, code: i32) -> Option<&str> {
    c.restart_policy.as_ref()?;
    let rule = c.restart_policy_rules.iter().flatten().find(|rule| {
        rule.exit_codes.as_ref().is_some_and(|codes| {
            let listed = codes.values.iter().flatten().any(|v| *v == code);
            match codes.operator.as_str() {
                "In" => listed,
                "NotIn" => !listed,
                _ => false,
            }
        })
    })?;
    Some(rule.action.as_str())
}

/// Whether exit code `code` of the container restarts every container of its pod (a `RestartAllContainers`
/// rule; the feature gate of that name is on by default in upstream 1.37, and nodelet declares it).
pub fn restarts_all(c: &Container, code: i32) -> bool {
    rule_action(c, code) == Some("RestartAllContainers")
}

/// Whether a container that exited with `code` is restarted: its `restartPolicyRules`, then its own
/// `restartPolicy`, then the pod's (upstream's `ContainerShouldRestart`). A `RestartAllContainers` rule counts as
/// a restart (of the whole pod: see [`Action::RestartAll`]).
pub fn should_restart(c: &Container, spec: &PodSpec, code: i32) -> bool {
    if let Some(policy) = c.restart_policy.as_deref() {
        if matches!(rule_action(c, code), Some("Restart" | "RestartAllContainers")) {
            return true;
        }
        match policy {
            "Always" => return true,
            "OnFailure" => return code != 0,
            "Never" => return false,
            _ => {}
        }
    }
    match spec.restart_policy.as_deref() {
        Some("Never") => false,
        Some("OnFailure") => code != 0,
        _ => true,
    }
}

/// Every init and app container of `spec` with its record, if it has one.
fn with_records<'a>(
    spec: &'a PodSpec,
    init: &'a [ContainerRecord],
    containers: &'a [ContainerRecord],
) -> impl Iterator<Item = (&'a Container, &'a ContainerRecord)> {
    let init = spec.init_containers.iter().flatten().map(move |c| (c, init));
    let app = spec.containers.iter().map(move |c| (c, containers));
    init.chain(app).filter_map(|(c, records)| Some((c, record(records, &c.name)?)))
}

/// The container whose exit (not yet acted on) restarts all of the pod's containers, if any.
fn restart_all_trigger(spec: &PodSpec, observed: &Observed) -> Option<String> {
    with_records(spec, observed.init, observed.containers).find_map(|(c, r)| match &r.state {
        ContainerState::Terminated { exit_code, reason, .. }
            if reason != RESTARTING_ALL.0 && restarts_all(c, *exit_code) =>
        {
            Some(c.name.clone())
        }
        _ => None,
    })
}

/// The hash of the container's spec fields whose change restarts it (upstream hashes the container without its
/// resources, which resize changes in place). Stable across agent versions as long as the API types serialise the
/// same way.
pub fn spec_hash(c: &Container) -> String {
    let mut c = c.clone();
    c.resources = None;
    c.resize_policy = None;
    let json = serde_json::to_vec(&c).unwrap_or_default();
    hex::encode(&sha2::Sha256::digest(&json)[..8])
}

/// The exit code that decides a container's restart: its current termination, or the last one while it waits
/// to restart.
fn last_exit(r: &ContainerRecord) -> Option<i32> {
    if matches!(&r.state, ContainerState::Waiting { reason, .. } if reason == RESTARTING_ALL.0) {
        // Stopped by an in-place restart of the pod: it starts again whatever its policy says.
        return None;
    }
    match (&r.state, &r.last_state) {
        (ContainerState::Terminated { exit_code, .. }, _) => Some(*exit_code),
        (ContainerState::Waiting { .. }, Some(ContainerState::Terminated { exit_code, .. })) => Some(*exit_code),
        _ => None,
    }
}

fn record<'a>(records: &'a [ContainerRecord], name: &str) -> Option<&'a ContainerRecord> {
    records.iter().find(|r| r.name == name)
}

/// Whether the pod's initialization is complete: every regular init container succeeded and every sidecar has
/// started.
pub fn initialized(spec: &PodSpec, init: &[ContainerRecord]) -> bool {
    spec.init_containers.iter().flatten().all(|c| {
        let Some(r) = record(init, &c.name) else { return false };
        if is_sidecar(c) { r.state.is_running() && r.started } else { r.succeeded() }
    })
}

/// Containers whose spec differs from their current or last instance's (`kubectl set image` on a crash-looping
/// container): their crash back-off starts over, as upstream's, whose back-off is keyed by the container's spec
/// hash (a running one is restarted by [`plan`] too).
pub fn changed_spec(spec: &PodSpec, init: &[ContainerRecord], containers: &[ContainerRecord]) -> Vec<String> {
    with_records(spec, init, containers)
        .filter(|(c, r)| r.spec_hash.as_deref().is_some_and(|h| h != spec_hash(c)))
        .map(|(c, _)| c.name.clone())
        .collect()
}

/// Whether a running container's requests or limits differ from what its cgroup has (a resize to apply).
pub fn resize_wanted(spec: &PodSpec, init: &[ContainerRecord], containers: &[ContainerRecord]) -> bool {
    with_records(spec, init, containers).any(|(c, r)| {
        r.state.is_running() && r.applied.as_ref().is_some_and(|a| !a.changed(&Applied::of(c)).is_empty())
    })
}

/// What to do next. Empty: nothing until an exit, a retry time or a new spec.
pub fn plan(spec: &PodSpec, observed: &Observed) -> Vec<Action> {
    if let Some(deadline) = spec.active_deadline_seconds
        && observed.active_for >= Duration::from_secs(deadline.max(0).unsigned_abs())
    {
        let (reason, message) = DEADLINE_EXCEEDED;
        return vec![Action::Fail { reason, message: message.into() }];
    }
    if let Some(name) = restart_all_trigger(spec, observed) {
        return vec![Action::RestartAll { name }];
    }
    let due = |name: &str| observed.not_before.get(name).is_none_or(|t| *t <= observed.now);
    // Ephemeral containers start even while the pod initializes (upstream), once each: one that never ran (its
    // image or configuration failed) is retried; one that ran is done.
    let mut actions: Vec<Action> = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .filter(|c| {
            record(observed.ephemeral, &c.name)
                .is_some_and(|r| r.container_id.is_none() && !r.state.is_running() && due(&c.name))
        })
        .map(|c| Action::StartEphemeral { name: c.name.clone() })
        .collect();
    let changed = |c: &Container, r: &ContainerRecord| {
        r.state.is_running() && r.spec_hash.as_deref().is_some_and(|h| h != spec_hash(c))
    };
    // A running container whose requests or limits changed: in place, or by restart where its resizePolicy
    // says so for a changed resource.
    let resize = |c: &Container, r: &ContainerRecord, init: bool| -> Option<Action> {
        let applied = r.applied.as_ref().filter(|_| r.state.is_running() && due(&c.name))?;
        let changed = applied.changed(&Applied::of(c));
        if changed.is_empty() {
            return None;
        }
        let restart = c
            .resize_policy
            .iter()
            .flatten()
            .any(|p| p.restart_policy == "RestartContainer" && changed.contains(&p.resource_name.as_str()));
        Some(if restart {
            let message = format!("Container {} resize requires restart", c.name);
            Action::Restart { name: c.name.clone(), init, message }
        } else {
            Action::Resize { name: c.name.clone(), init }
        })
    };
    for c in spec.init_containers.iter().flatten() {
        let Some(r) = record(observed.init, &c.name) else { continue };
        if is_sidecar(c) {
            if changed(c, r) {
                let message = format!("Init container {} definition changed", c.name);
                actions.push(Action::Restart { name: c.name.clone(), init: true, message });
            } else if let Some(action) = resize(c, r, true) {
                actions.push(action);
            } else if !r.state.is_running() && due(&c.name) {
                actions.push(Action::Start { name: c.name.clone(), init: true });
            }
            let started = r.state.is_running() && r.started;
            if !observed.initialized && !started {
                // The next init container waits for this sidecar to have started.
                return actions;
            }
            continue;
        }
        if observed.initialized || r.succeeded() {
            continue;
        }
        if r.state.is_running() {
            return actions;
        }
        if let Some(code) = last_exit(r)
            && !should_restart(c, spec, code)
        {
            // Failed for good: the pod fails (see `phase`).
            return actions;
        }
        if due(&c.name) {
            actions.push(Action::Start { name: c.name.clone(), init: true });
        }
        return actions;
    }
    let mut finished = true;
    for c in &spec.containers {
        let Some(r) = record(observed.containers, &c.name) else { continue };
        if r.state.is_running() {
            finished = false;
            if changed(c, r) {
                let message = format!("Container {} definition changed", c.name);
                actions.push(Action::Restart { name: c.name.clone(), init: false, message });
            } else if let Some(action) = resize(c, r, false) {
                actions.push(action);
            }
            continue;
        }
        let wanted = last_exit(r).is_none_or(|code| should_restart(c, spec, code));
        if wanted {
            finished = false;
            if due(&c.name) {
                actions.push(Action::Start { name: c.name.clone(), init: false });
            }
        }
    }
    let sidecars_running = spec
        .init_containers
        .iter()
        .flatten()
        .any(|c| is_sidecar(c) && record(observed.init, &c.name).is_some_and(|r| r.state.is_running()));
    if finished && !spec.containers.is_empty() {
        // Sidecars do not keep a finished pod alive; nor are they restarted once it finished.
        actions.retain(|a| !matches!(a, Action::Start { init: true, .. }));
        if sidecars_running {
            actions.push(Action::StopSidecars);
        }
    }
    actions
}

/// The pod's phase from its containers (upstream's `getPhase`, with container restart rules on).
pub fn phase(spec: &PodSpec, init: &[ContainerRecord], containers: &[ContainerRecord], initialized: bool) -> Phase {
    let mut pending_init = 0;
    let mut pending_sidecars = 0;
    let mut failed_for_good = 0;
    for c in spec.init_containers.iter().flatten().filter(|c| !is_sidecar(c)) {
        let Some(r) = record(init, &c.name) else {
            pending_init += 1;
            continue;
        };
        match last_exit(r) {
            _ if r.state.is_running() => pending_init += 1,
            Some(0) if matches!(r.state, ContainerState::Terminated { .. }) => {}
            Some(code) if code != 0 => {
                if !should_restart(c, spec, code) {
                    failed_for_good += 1;
                }
            }
            _ => pending_init += 1,
        }
    }
    let (mut running, mut waiting, mut stopped, mut stopped_for_good, mut succeeded) = (0, 0, 0, 0, 0);
    for c in spec.init_containers.iter().flatten().filter(|c| is_sidecar(c)) {
        let Some(r) = record(init, &c.name) else { continue };
        if r.state.is_running() {
            if !r.started {
                pending_sidecars += 1;
            }
            running += 1;
        } else if last_exit(r).is_none() {
            pending_sidecars += 1;
            waiting += 1;
        }
    }
    for c in &spec.containers {
        let Some(r) = record(containers, &c.name) else {
            waiting += 1;
            continue;
        };
        if r.state.is_running() {
            running += 1;
            continue;
        }
        match last_exit(r) {
            Some(code) => {
                stopped += 1;
                if !should_restart(c, spec, code) {
                    stopped_for_good += 1;
                }
                // A container waiting to restart counts as stopped, but not as succeeded (upstream).
                if code == 0 && matches!(r.state, ContainerState::Terminated { .. }) {
                    succeeded += 1;
                }
            }
            None => waiting += 1,
        }
    }
    if failed_for_good > 0 {
        return Phase::Failed;
    }
    if pending_init > 0 || (pending_sidecars > 0 && !initialized) || waiting > 0 {
        return Phase::Pending;
    }
    if running > 0 {
        return Phase::Running;
    }
    if stopped > 0 {
        if stopped != stopped_for_good {
            return Phase::Running;
        }
        return if stopped == succeeded { Phase::Succeeded } else { Phase::Failed };
    }
    Phase::Pending
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;
    use k8s_openapi::api::core::v1::{ContainerRestartRule, ContainerRestartRuleOnExitCodes};

    fn container(name: &str) -> Container {
        Container { name: name.into(), image: Some("busybox".into()), ..Default::default() }
    }

    fn sidecar(name: &str) -> Container {
        Container { restart_policy: Some("Always".into()), ..container(name) }
    }

    fn spec(init: Vec<Container>, containers: Vec<Container>, policy: &str) -> PodSpec {
        PodSpec {
            init_containers: (!init.is_empty()).then_some(init),
            containers,
            restart_policy: Some(policy.into()),
            ..Default::default()
        }
    }

    fn waiting(name: &str) -> ContainerRecord {
        ContainerRecord::new(name, "busybox", "PodInitializing")
    }

    fn running(c: &Container) -> ContainerRecord {
        let mut r = waiting(&c.name);
        r.state = ContainerState::Running { started_at: Timestamp::UNIX_EPOCH };
        r.started = true;
        r.spec_hash = Some(spec_hash(c));
        r
    }

    fn exited(name: &str, code: i32) -> ContainerRecord {
        let mut r = waiting(name);
        r.state = ContainerState::Terminated {
            exit_code: code,
            signal: None,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            message: None,
            started_at: None,
            finished_at: Timestamp::UNIX_EPOCH,
            container_id: None,
        };
        r
    }

    fn backing_off(name: &str, code: i32) -> ContainerRecord {
        let mut r = exited(name, code);
        r.last_state = Some(r.state.clone());
        r.state = ContainerState::waiting("CrashLoopBackOff", None);
        r
    }

    struct World {
        init: Vec<ContainerRecord>,
        containers: Vec<ContainerRecord>,
        ephemeral: Vec<ContainerRecord>,
        not_before: HashMap<String, Instant>,
        initialized: bool,
        active_for: Duration,
    }

    impl World {
        fn new(init: Vec<ContainerRecord>, containers: Vec<ContainerRecord>) -> World {
            let (not_before, ephemeral) = (HashMap::new(), Vec::new());
            World { init, containers, ephemeral, not_before, initialized: false, active_for: Duration::ZERO }
        }

        fn plan(&self, spec: &PodSpec) -> Vec<Action> {
            plan(
                spec,
                &Observed {
                    init: &self.init,
                    containers: &self.containers,
                    ephemeral: &self.ephemeral,
                    not_before: &self.not_before,
                    now: Instant::now(),
                    initialized: self.initialized,
                    active_for: self.active_for,
                },
            )
        }

        fn phase(&self, spec: &PodSpec) -> Phase {
            phase(spec, &self.init, &self.containers, self.initialized)
        }
    }

    fn start(name: &str, init: bool) -> Action {
        Action::Start { name: name.into(), init }
    }

    #[test]
    fn ephemeral_containers_start_once_even_during_initialization_and_are_never_restarted() {
        let mut s = spec(vec![container("init")], vec![container("app")], "Always");
        s.ephemeral_containers = Some(vec![k8s_openapi::api::core::v1::EphemeralContainer {
            name: "debugger".into(),
            target_container_name: Some("app".into()),
            ..Default::default()
        }]);
        let mut w = World::new(vec![running(&container("init"))], vec![waiting("app")]);
        w.ephemeral = vec![waiting("debugger")];
        let debugger = Action::StartEphemeral { name: "debugger".into() };
        assert_eq!(w.plan(&s), [debugger], "started while the init container runs");
        w.not_before.insert("debugger".into(), Instant::now() + Duration::from_secs(5));
        assert!(w.plan(&s).is_empty(), "a failed start is retried after its delay");
        w.not_before.clear();
        w.ephemeral = vec![running(&container("debugger"))];
        w.ephemeral[0].container_id = Some("nodelet://u-debugger-0".into());
        assert!(w.plan(&s).is_empty());
        let mut done = exited("debugger", 1);
        done.container_id = Some("nodelet://u-debugger-0".into());
        w.ephemeral = vec![done];
        assert!(w.plan(&s).is_empty(), "an ephemeral container that ran is not restarted, whatever the policy");
        w.ephemeral.clear();
        assert!(w.plan(&s).is_empty(), "no record yet: nothing to start");
    }

    #[test]
    fn init_containers_run_one_at_a_time_in_order() {
        let s = spec(vec![container("a"), container("b")], vec![container("app")], "Always");
        let mut w = World::new(vec![waiting("a"), waiting("b")], vec![waiting("app")]);
        assert_eq!(w.plan(&s), [start("a", true)]);
        assert_eq!(w.phase(&s), Phase::Pending);
        w.init[0] = running(&s.init_containers.as_ref().unwrap()[0]);
        assert_eq!(w.plan(&s), []);
        w.init[0] = exited("a", 0);
        assert_eq!(w.plan(&s), [start("b", true)]);
        w.init[1] = exited("b", 0);
        assert!(initialized(&s, &w.init));
        w.initialized = true;
        assert_eq!(w.plan(&s), [start("app", false)]);
        assert_eq!(w.phase(&s), Phase::Pending, "the app container has not started");
    }

    #[test]
    fn a_failed_init_container_restarts_unless_the_policy_is_never() {
        let s = spec(vec![container("a")], vec![container("app")], "OnFailure");
        let mut w = World::new(vec![backing_off("a", 1)], vec![waiting("app")]);
        assert_eq!(w.plan(&s), [start("a", true)]);
        w.not_before.insert("a".into(), Instant::now() + Duration::from_secs(10));
        assert_eq!(w.plan(&s), [], "backing off");
        assert_eq!(w.phase(&s), Phase::Pending);
        let never = spec(vec![container("a")], vec![container("app")], "Never");
        let w = World::new(vec![exited("a", 1)], vec![waiting("app")]);
        assert_eq!(w.plan(&never), []);
        assert_eq!(w.phase(&never), Phase::Failed);
    }

    #[test]
    fn sidecars_start_in_order_and_the_next_waits_until_one_has_started() {
        let s = spec(vec![sidecar("proxy"), container("setup")], vec![container("app")], "Never");
        let mut w = World::new(vec![waiting("proxy"), waiting("setup")], vec![waiting("app")]);
        assert_eq!(w.plan(&s), [start("proxy", true)]);
        w.init[0] = running(&sidecar("proxy"));
        w.init[0].started = false;
        assert_eq!(w.plan(&s), [], "not started yet (startup probe)");
        w.init[0].started = true;
        assert_eq!(w.plan(&s), [start("setup", true)]);
        w.init[1] = exited("setup", 0);
        assert!(initialized(&s, &w.init));
        w.initialized = true;
        assert_eq!(w.plan(&s), [start("app", false)]);
        w.containers[0] = running(&container("app"));
        assert_eq!(w.phase(&s), Phase::Running);
    }

    #[test]
    fn a_sidecar_that_exits_is_restarted_even_when_the_pod_never_restarts() {
        let s = spec(vec![sidecar("proxy")], vec![container("app")], "Never");
        let mut w = World::new(vec![backing_off("proxy", 0)], vec![running(&container("app"))]);
        w.initialized = true;
        assert_eq!(w.plan(&s), [start("proxy", true)]);
        assert_eq!(w.phase(&s), Phase::Running, "a restarting sidecar does not send the pod back to Pending");
    }

    #[test]
    fn sidecars_stop_once_the_app_containers_are_done_and_do_not_count_for_the_phase() {
        let s = spec(vec![sidecar("proxy")], vec![container("job")], "Never");
        let mut w = World::new(vec![running(&sidecar("proxy"))], vec![exited("job", 0)]);
        w.initialized = true;
        assert_eq!(w.plan(&s), [Action::StopSidecars]);
        assert_eq!(w.phase(&s), Phase::Running, "still running while the sidecar stops");
        w.init[0] = exited("proxy", 143);
        assert_eq!(w.plan(&s), []);
        assert_eq!(w.phase(&s), Phase::Succeeded, "a sidecar's exit code does not fail the pod");
        w.containers[0] = exited("job", 2);
        assert_eq!(w.phase(&s), Phase::Failed);
    }

    #[test]
    fn restart_policies_decide_app_restarts() {
        for (policy, code, restarts) in [
            ("Always", 0, true),
            ("Always", 1, true),
            ("OnFailure", 0, false),
            ("OnFailure", 1, true),
            ("Never", 1, false),
        ] {
            let s = spec(vec![], vec![container("app")], policy);
            let mut w = World::new(vec![], vec![exited("app", code)]);
            w.initialized = true;
            let want = if restarts { vec![start("app", false)] } else { vec![] };
            assert_eq!(w.plan(&s), want, "{policy} exit {code}");
        }
    }

    #[test]
    fn a_changed_spec_restarts_the_back_off() {
        let (old, new) = (container("app"), Container { image: Some("other".into()), ..container("app") });
        let mut r = backing_off("app", 1);
        r.spec_hash = Some(spec_hash(&old));
        let s = spec(vec![], vec![new.clone()], "Always");
        assert_eq!(changed_spec(&s, &[], std::slice::from_ref(&r)), ["app"]);
        // A running instance of the old spec too (its crashes after the plan restarted it are the new spec's).
        assert_eq!(changed_spec(&s, &[], &[running(&old)]), ["app"]);
        // Unchanged: nothing.
        assert!(changed_spec(&spec(vec![], vec![old], "Always"), &[], std::slice::from_ref(&r)).is_empty());
        assert!(changed_spec(&s, &[], &[running(&new)]).is_empty());
    }

    /// A container of its own `policy` whose exit code 42 restarts the whole pod.
    fn restarting_all(name: &str, policy: &str) -> Container {
        let rule = ContainerRestartRule {
            action: "RestartAllContainers".into(),
            exit_codes: Some(ContainerRestartRuleOnExitCodes { operator: "In".into(), values: Some(vec![42]) }),
        };
        Container { restart_policy: Some(policy.into()), restart_policy_rules: Some(vec![rule]), ..container(name) }
    }

    /// What the worker leaves of a container an in-place restart stopped.
    fn restarted_in_place(name: &str, code: i32) -> ContainerRecord {
        let mut r = exited(name, code);
        r.container_id = Some(format!("nodelet://{name}-0"));
        r.last_state = Some(ContainerState::Terminated {
            exit_code: 137,
            signal: None,
            reason: RESTARTING_ALL.0.into(),
            message: Some(RESTARTING_ALL.1.into()),
            started_at: None,
            finished_at: Timestamp::UNIX_EPOCH,
            container_id: r.container_id.clone(),
        });
        r.state = ContainerState::waiting(RESTARTING_ALL.0, Some(RESTARTING_ALL.1.into()));
        r
    }

    #[test]
    fn a_restart_all_rule_restarts_the_pod_from_its_first_init_container() {
        let (init, side, src) = (container("init"), sidecar("side"), restarting_all("source", "Never"));
        let regular = Container { restart_policy: Some("Never".into()), ..container("regular") };
        let s = spec(vec![init.clone(), side.clone()], vec![src.clone(), regular.clone()], "Never");
        // The source exits with the rule's code: that restarts everything, before any other decision.
        let mut w = World::new(vec![exited("init", 0), running(&side)], vec![exited("source", 42), running(&regular)]);
        w.initialized = true;
        assert_eq!(w.plan(&s), vec![Action::RestartAll { name: "source".into() }]);
        // Its exit is a restart (of the pod), not the end of a `Never` container: the pod is not done.
        assert!(should_restart(&src, &s, 42) && restarts_all(&src, 42) && !restarts_all(&src, 1));
        assert_eq!(w.phase(&s), Phase::Running);
        // Another code is the container's own policy: Never, and nothing restarts.
        w.containers[0] = exited("source", 1);
        assert_eq!(w.plan(&s), vec![]);
        // Rules apply only with a container restartPolicy (upstream): without one, 42 is a plain failure.
        let bare = Container { restart_policy: None, ..src.clone() };
        assert!(!restarts_all(&bare, 42));

        // Once all are stopped, the init containers run again in order (the pod re-initializes), and the
        // app containers start whatever their `Never` says; the stopped ones are never a trigger again (137).
        let mut w = World::new(
            vec![restarted_in_place("init", 0), restarted_in_place("side", 137)],
            vec![restarted_in_place("source", 42), restarted_in_place("regular", 137)],
        );
        assert_eq!(w.plan(&s), vec![start("init", true)]);
        w.init[0] = exited("init", 0);
        assert_eq!(w.plan(&s), vec![start("side", true)]);
        w.init[1] = running(&side);
        w.initialized = true;
        assert_eq!(w.plan(&s), vec![start("source", false), start("regular", false)]);
        // A rule that also names 137 does not loop on the containers the restart itself stopped.
        let greedy = Container {
            restart_policy_rules: Some(vec![ContainerRestartRule {
                action: "RestartAllContainers".into(),
                exit_codes: Some(ContainerRestartRuleOnExitCodes { operator: "NotIn".into(), values: Some(vec![0]) }),
            }]),
            ..regular
        };
        let s = spec(vec![], vec![src, greedy], "Never");
        let w = World {
            initialized: true,
            ..World::new(vec![], vec![waiting("source"), restarted_in_place("regular", 137)])
        };
        assert_eq!(w.plan(&s), vec![start("source", false), start("regular", false)]);
    }

    #[test]
    fn container_restart_policy_and_rules_override_the_pod() {
        let rule = |op: &str, codes: Vec<i32>| ContainerRestartRule {
            action: "Restart".into(),
            exit_codes: Some(ContainerRestartRuleOnExitCodes { operator: op.into(), values: Some(codes) }),
        };
        let mut c = Container { restart_policy: Some("Never".into()), ..container("app") };
        c.restart_policy_rules = Some(vec![rule("In", vec![42])]);
        let s = spec(vec![], vec![c.clone()], "Always");
        assert!(should_restart(&c, &s, 42));
        assert!(!should_restart(&c, &s, 1), "the container's Never wins over the pod's Always");
        c.restart_policy_rules = Some(vec![rule("NotIn", vec![0])]);
        assert!(should_restart(&c, &s, 3) && !should_restart(&c, &s, 0));
        let c = Container { restart_policy: Some("OnFailure".into()), ..container("app") };
        let s = spec(vec![], vec![c.clone()], "Never");
        assert!(should_restart(&c, &s, 1) && !should_restart(&c, &s, 0));
        // Never on the pod, but a container that restarts on exit code 42: the pod keeps Running while it does.
        let mut c = Container { restart_policy: Some("Never".into()), ..container("app") };
        c.restart_policy_rules = Some(vec![rule("In", vec![42])]);
        let s = spec(vec![], vec![c], "Never");
        let w = World { initialized: true, ..World::new(vec![], vec![backing_off("app", 42)]) };
        assert_eq!(w.phase(&s), Phase::Running);
    }

    #[test]
    fn a_changed_image_restarts_the_running_container() {
        let old = container("app");
        let s = spec(vec![], vec![Container { image: Some("busybox:2".into()), ..old.clone() }], "Never");
        let mut w = World::new(vec![], vec![running(&old)]);
        w.initialized = true;
        let message = "Container app definition changed".to_string();
        assert_eq!(w.plan(&s), [Action::Restart { name: "app".into(), init: false, message }]);
        // Resources change in place (resize), not by restart.
        let mut resized = old.clone();
        resized.resources = Some(Default::default());
        assert_eq!(spec_hash(&resized), spec_hash(&old));
        // An exited container of a Never pod is not brought back by a new image.
        w.containers[0] = exited("app", 0);
        assert_eq!(w.plan(&s), []);
    }

    #[test]
    fn changed_resources_resize_in_place_or_restart_per_resize_policy() {
        let mut c = container("app");
        c.resources = Some(serde_json::from_value(serde_json::json!({"limits": {"memory": "32Mi"}})).unwrap());
        let mut started = running(&c);
        started.applied = Some(Applied::of(&c));
        let mut w = World::new(vec![], vec![started]);
        w.initialized = true;
        let s = spec(vec![], vec![c.clone()], "Always");
        assert_eq!(w.plan(&s), []);
        let mut bigger = c.clone();
        bigger.resources = Some(serde_json::from_value(serde_json::json!({"limits": {"memory": "48Mi"}})).unwrap());
        let s = spec(vec![], vec![bigger.clone()], "Always");
        assert_eq!(w.plan(&s), [Action::Resize { name: "app".into(), init: false }]);
        bigger.resize_policy = Some(vec![
            serde_json::from_value(serde_json::json!({"resourceName": "memory", "restartPolicy": "RestartContainer"}))
                .unwrap(),
        ]);
        let s = spec(vec![], vec![bigger], "Always");
        let message = "Container app resize requires restart".to_string();
        assert_eq!(w.plan(&s), [Action::Restart { name: "app".into(), init: false, message }]);
    }

    #[test]
    fn the_active_deadline_fails_the_pod() {
        let mut s = spec(vec![], vec![container("app")], "Always");
        s.active_deadline_seconds = Some(5);
        let mut w = World::new(vec![], vec![running(&container("app"))]);
        w.active_for = Duration::from_secs(4);
        assert_eq!(w.plan(&s), []);
        w.active_for = Duration::from_secs(5);
        let (reason, message) = DEADLINE_EXCEEDED;
        assert_eq!(w.plan(&s), [Action::Fail { reason, message: message.into() }]);
    }

    #[test]
    fn phase_follows_upstream() {
        let s = spec(vec![], vec![container("a"), container("b")], "Always");
        // One running, one still pulling: Pending until every container has started.
        let w = World::new(vec![], vec![running(&container("a")), waiting("b")]);
        assert_eq!(w.phase(&s), Phase::Pending);
        // One running, one in CrashLoopBackOff: Running.
        let w = World::new(vec![], vec![running(&container("a")), backing_off("b", 1)]);
        assert_eq!(w.phase(&s), Phase::Running);
        // All exited under Always: Running (restarting).
        let w = World::new(vec![], vec![exited("a", 0), backing_off("b", 1)]);
        assert_eq!(w.phase(&s), Phase::Running);
        let s = spec(vec![], vec![container("a"), container("b")], "OnFailure");
        let w = World::new(vec![], vec![exited("a", 0), exited("b", 0)]);
        assert_eq!(w.phase(&s), Phase::Succeeded);
        let w = World::new(vec![], vec![exited("a", 0), backing_off("b", 1)]);
        assert_eq!(w.phase(&s), Phase::Running);
        let s = spec(vec![], vec![container("a"), container("b")], "Never");
        let w = World::new(vec![], vec![exited("a", 0), exited("b", 1)]);
        assert_eq!(w.phase(&s), Phase::Failed);
    }
}
