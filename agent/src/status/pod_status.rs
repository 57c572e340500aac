//! `PodState` -> the API's `PodStatus`, with upstream's conditions, reasons and messages.

use k8s_openapi::api::core::v1::{
    ContainerState as ApiState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, ContainerUser, HostIP, LinuxContainerUser, PodCondition, PodIP, PodStatus, ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::pods::state::{ContainerRecord, ContainerState, Kind, Phase, PodState, ResizeStatus, RestartAll};

fn api_state(state: &ContainerState) -> ApiState {
    match state {
        ContainerState::Waiting { reason, message } => ApiState {
            waiting: Some(ContainerStateWaiting { reason: Some(reason.clone()), message: message.clone() }),
            ..Default::default()
        },
        ContainerState::Running { started_at } => ApiState {
            running: Some(ContainerStateRunning { started_at: Some(Time(*started_at)) }),
            ..Default::default()
        },
        ContainerState::Terminated { exit_code, signal, reason, message, started_at, finished_at, container_id } => {
            ApiState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: *exit_code,
                    signal: *signal,
                    reason: Some(reason.clone()),
                    message: message.clone(),
                    started_at: started_at.map(Time),
                    finished_at: Some(Time(*finished_at)),
                    container_id: container_id.clone(),
                }),
                ..Default::default()
            }
        }
    }
}

fn container_status(c: &ContainerRecord, kind: Kind) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone().unwrap_or_default(),
        container_id: c.container_id.clone(),
        state: Some(api_state(&c.state)),
        last_state: Some(c.last_state.as_ref().map(api_state).unwrap_or_default()),
        restart_count: i32::try_from(c.restart_count).unwrap_or(i32::MAX),
        ready: c.ready,
        // Upstream's prober leaves ephemeral containers' `started` unset.
        started: match kind {
            Kind::Init => Some(c.state.is_running()),
            Kind::App => Some(c.started),
            Kind::Ephemeral => None,
        },
        // What the running instance's cgroup has (upstream: allocatedResources = the requests admitted).
        resources: c.applied.as_ref().filter(|_| c.state.is_running()).map(|a| ResourceRequirements {
            requests: (!a.requests.is_empty()).then(|| quantities(&a.requests)),
            limits: (!a.limits.is_empty()).then(|| quantities(&a.limits)),
            ..Default::default()
        }),
        allocated_resources: c
            .applied
            .as_ref()
            .filter(|a| c.state.is_running() && !a.requests.is_empty())
            .map(|a| quantities(&a.requests)),
        // As upstream with SupplementalGroupsPolicy (on by default): the identity the process runs with.
        user: c.user.as_ref().map(|u| ContainerUser {
            linux: Some(LinuxContainerUser {
                uid: i64::from(u.uid),
                gid: i64::from(u.gid),
                supplemental_groups: Some(u.additional_gids.iter().map(|g| i64::from(*g)).collect()),
            }),
        }),
        ..Default::default()
    }
}

fn quantities(map: &std::collections::BTreeMap<String, String>) -> std::collections::BTreeMap<String, Quantity> {
    map.iter().map(|(k, v)| (k.clone(), Quantity(v.clone()))).collect()
}

/// The API status for `state`. Condition transition times carry over from `previous` while a condition keeps its
/// status.
/// The resize conditions: present only while true, so a status patch must delete them when they are gone.
pub const RESIZE_PENDING: &str = "PodResizePending";
pub const RESIZE_IN_PROGRESS: &str = "PodResizeInProgress";
/// The condition of a pod whose containers a restart rule restarts in place.
pub const ALL_CONTAINERS_RESTARTING: &str = "AllContainersRestarting";

pub fn pod_status(state: &PodState, previous: Option<&PodStatus>) -> PodStatus {
    let now = Time(jiff::Timestamp::now());
    let condition = |kind: &str, ok: bool, reason: Option<String>, message: Option<String>| {
        let status = if ok { "True" } else { "False" };
        let since = previous
            .and_then(|p| p.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == kind && c.status == status))
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        PodCondition {
            type_: kind.into(),
            status: status.into(),
            reason: if ok { None } else { reason },
            message: if ok { None } else { message },
            last_transition_time: Some(since),
            last_probe_time: None,
            observed_generation: state.observed_generation,
        }
    };
    // Init containers still to complete (sidecars: to start).
    let incomplete: Vec<&str> = state
        .init
        .iter()
        .filter(|c| !(c.succeeded() || c.state.is_running() && c.started))
        .map(|c| c.name.as_str())
        .collect();
    // Running sidecars count for readiness too (a running regular init container means not initialized yet).
    let unready: Vec<&str> = state
        .init
        .iter()
        .filter(|c| c.state.is_running() && !c.ready)
        .chain(state.containers.iter().filter(|c| !c.ready))
        .map(|c| c.name.as_str())
        .collect();
    let initialized = state.initialized || incomplete.is_empty() || state.phase == Phase::Succeeded;
    let completed = state.phase == Phase::Succeeded;
    let containers_ready = unready.is_empty() && !completed && !state.containers.is_empty();
    // Readiness gates (upstream's GeneratePodReadyCondition): every gate's condition True, else its message.
    let gates: Vec<String> = state
        .readiness_gates
        .iter()
        .filter(|(_, status)| status.as_deref() != Some("True"))
        .map(|(kind, status)| match status {
            None => format!("corresponding condition of pod readiness gate {kind:?} does not exist."),
            Some(s) => format!("the status of pod readiness gate {kind:?} is not \"True\", but {s}"),
        })
        .collect();
    let ready = containers_ready && gates.is_empty();
    let (ready_reason, ready_message) = if containers_ready && !gates.is_empty() {
        (Some("ReadinessGatesNotReady".to_string()), Some(gates.join(", ")))
    } else if completed {
        (Some("PodCompleted".to_string()), None)
    } else if state.containers.is_empty() {
        // Refused before anything ran (validation, admission).
        (Some("UnknownContainerStatuses".to_string()), None)
    } else {
        (
            Some("ContainersNotReady".to_string()),
            Some(format!("containers with unready status: [{}]", unready.join(" "))),
        )
    };
    let conditions = vec![
        condition("PodReadyToStartContainers", state.sandbox_ready, None, None),
        condition(
            "Initialized",
            initialized,
            Some("ContainersNotInitialized".into()),
            Some(format!("containers with incomplete status: [{}]", incomplete.join(" "))),
        ),
        condition("Ready", ready, ready_reason.clone(), ready_message.clone()),
        condition("ContainersReady", containers_ready, ready_reason, ready_message),
    ];
    let mut conditions = conditions;
    let resize = |kind: &str, reason: Option<String>, message: Option<String>| PodCondition {
        type_: kind.into(),
        status: "True".into(),
        reason,
        message,
        last_transition_time: previous
            .and_then(|p| p.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == kind && c.status == "True"))
            .and_then(|c| c.last_transition_time.clone())
            .or_else(|| Some(now.clone())),
        observed_generation: state.observed_generation,
        ..Default::default()
    };
    if let Some(message) = &state.disruption {
        conditions.push(PodCondition {
            reason: Some("TerminationByKubelet".into()),
            message: Some(message.clone()),
            ..resize("DisruptionTarget", None, None)
        });
    }
    // Upstream's AllContainersRestarting: True while a restart rule's in-place restart stops the containers.
    if let Some(restart) = state.restart_all {
        let cond = condition(ALL_CONTAINERS_RESTARTING, restart == RestartAll::Stopping, None, None);
        conditions.push(match restart {
            RestartAll::Stopping => PodCondition {
                reason: Some("RestartAllContainersStarted".into()),
                message: Some("container exited with restart policy rule".into()),
                ..cond
            },
            RestartAll::Initializing => cond,
        });
    }
    match &state.resize {
        Some(ResizeStatus::Pending { reason, message }) => {
            conditions.push(resize(RESIZE_PENDING, Some((*reason).into()), Some(message.clone())));
        }
        Some(ResizeStatus::InProgress { error }) => {
            conditions.push(resize(RESIZE_IN_PROGRESS, error.as_ref().map(|_| "Error".into()), error.clone()));
        }
        None => {}
    }
    PodStatus {
        phase: Some(state.phase.as_str().into()),
        observed_generation: state.observed_generation,
        reason: state.reason.clone(),
        message: state.message.clone(),
        conditions: Some(conditions),
        host_ip: Some(state.host_ip.clone()),
        host_ips: Some(vec![HostIP { ip: state.host_ip.clone() }]),
        pod_ip: state.pod_ip.clone(),
        pod_ips: state.pod_ip.as_ref().map(|ip| vec![PodIP { ip: ip.clone() }]),
        start_time: Some(Time(state.start_time)),
        qos_class: Some(state.qos.as_str().into()),
        init_container_statuses: (!state.init.is_empty())
            .then(|| state.init.iter().map(|c| container_status(c, Kind::Init)).collect()),
        container_statuses: Some(state.containers.iter().map(|c| container_status(c, Kind::App)).collect()),
        ephemeral_container_statuses: (!state.ephemeral.is_empty())
            .then(|| state.ephemeral.iter().map(|c| container_status(c, Kind::Ephemeral)).collect()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::state::{ContainerRecord, ContainerState};

    fn running_ready() -> PodState {
        let mut c = ContainerRecord::new("main", "busybox", "ContainerCreating");
        c.state = ContainerState::Running { started_at: jiff::Timestamp::now() };
        c.ready = true;
        c.started = true;
        PodState {
            phase: Phase::Running,
            reason: None,
            message: None,
            sandbox_ready: true,
            initialized: true,
            observed_generation: None,
            start_time: jiff::Timestamp::now(),
            qos: nodelet_cgroups::qos::QosClass::BestEffort,
            host_ip: "10.0.0.1".into(),
            pod_ip: Some("10.88.0.2".into()),
            init: Vec::new(),
            containers: vec![c],
            readiness_gates: Vec::new(),
            resize: None,
            ephemeral: Vec::new(),
            disruption: None,
            restart_all: None,
        }
    }

    fn condition<'a>(s: &'a PodStatus, kind: &str) -> &'a k8s_openapi::api::core::v1::PodCondition {
        s.conditions.iter().flatten().find(|c| c.type_ == kind).expect("condition")
    }

    #[test]
    fn readiness_gates_hold_ready_back_but_not_containers_ready() {
        let mut state = running_ready();
        assert_eq!(condition(&pod_status(&state, None), "Ready").status, "True");
        state.readiness_gates = vec![("example.com/lb".into(), None), ("example.com/dns".into(), Some("False".into()))];
        let status = pod_status(&state, None);
        let ready = condition(&status, "Ready");
        assert_eq!((ready.status.as_str(), ready.reason.as_deref()), ("False", Some("ReadinessGatesNotReady")));
        assert_eq!(
            ready.message.as_deref(),
            Some(
                "corresponding condition of pod readiness gate \"example.com/lb\" does not exist., \
                 the status of pod readiness gate \"example.com/dns\" is not \"True\", but False"
            )
        );
        assert_eq!(condition(&status, "ContainersReady").status, "True");
        state.readiness_gates = vec![("example.com/lb".into(), Some("True".into()))];
        assert_eq!(condition(&pod_status(&state, None), "Ready").status, "True");
    }

    #[test]
    fn resize_conditions_only_while_they_hold() {
        let mut state = running_ready();
        let none = pod_status(&state, None);
        assert!(none.conditions.iter().flatten().all(|c| !c.type_.starts_with("PodResize")));
        state.resize =
            Some(ResizeStatus::Pending { reason: "Infeasible", message: "Node didn't have enough capacity".into() });
        let pending = pod_status(&state, None);
        let c = condition(&pending, RESIZE_PENDING);
        assert_eq!((c.status.as_str(), c.reason.as_deref()), ("True", Some("Infeasible")));
        state.resize = Some(ResizeStatus::InProgress { error: Some("write failed".into()) });
        let failed = pod_status(&state, None);
        let c = condition(&failed, RESIZE_IN_PROGRESS);
        assert_eq!((c.reason.as_deref(), c.message.as_deref()), (Some("Error"), Some("write failed")));
    }

    #[test]
    fn all_containers_restarting_is_true_while_an_in_place_restart_stops_them() {
        let mut state = running_ready();
        let kinds = |s: &PodStatus| s.conditions.iter().flatten().map(|c| c.type_.clone()).collect::<Vec<_>>();
        assert!(!kinds(&pod_status(&state, None)).contains(&ALL_CONTAINERS_RESTARTING.to_string()));
        state.restart_all = Some(RestartAll::Stopping);
        let stopping = pod_status(&state, None);
        let c = condition(&stopping, ALL_CONTAINERS_RESTARTING);
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref(), c.message.as_deref()),
            ("True", Some("RestartAllContainersStarted"), Some("container exited with restart policy rule"))
        );
        state.restart_all = Some(RestartAll::Initializing);
        let c = condition(&pod_status(&state, Some(&stopping)), ALL_CONTAINERS_RESTARTING).clone();
        assert_eq!((c.status.as_str(), c.reason), ("False", None));
    }
}
