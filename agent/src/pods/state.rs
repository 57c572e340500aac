//! A pod worker's view of its pod: what each container is doing, as the kubelet reports it. The status manager
//! turns this into the API's `PodStatus`.

use jiff::Timestamp;
use nodelet_cgroups::qos::QosClass;

/// A container's state with upstream's reason strings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ContainerState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
        container_id: Option<String>,
    },
}

impl ContainerState {
    pub fn waiting(reason: &str, message: Option<String>) -> ContainerState {
        ContainerState::Waiting { reason: reason.into(), message }
    }

    pub fn is_running(&self) -> bool {
        matches!(self, ContainerState::Running { .. })
    }
}

/// Which of the pod's container lists a container is in (names are unique across the three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Init,
    App,
    /// Added to the running pod (`kubectl debug`): started once, never restarted, no probes or hooks.
    Ephemeral,
}

impl Kind {
    /// `Init` or `App`.
    pub fn of(init: bool) -> Kind {
        if init { Kind::Init } else { Kind::App }
    }

    pub fn is_init(self) -> bool {
        self == Kind::Init
    }

    /// The list's field in the pod spec (an event's `fieldPath` is `spec.<field>{<name>}`).
    pub fn field(self) -> &'static str {
        match self {
            Kind::Init => "initContainers",
            Kind::App => "containers",
            Kind::Ephemeral => "ephemeralContainers",
        }
    }
}

/// One container of the pod: init, app or ephemeral.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerRecord {
    pub name: String,
    /// The image as written in the spec, until the image service normalises it.
    pub image: String,
    pub image_id: Option<String>,
    /// `nodelet://<id>` of the current (or last) instance.
    pub container_id: Option<String>,
    pub state: ContainerState,
    pub last_state: Option<ContainerState>,
    pub restart_count: u32,
    pub ready: bool,
    pub started: bool,
    /// [`crate::pods::plan::spec_hash`] of the spec the current instance was started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    /// The requests and limits the current instance's cgroup has (at start, or after an in-place resize).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<Applied>,
    /// The user the current (or last) instance's process runs as (`status.containerStatuses[].user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<nodelet_runtime::ProcessUser>,
}

/// A container's requests and limits as quantity strings by resource name.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    pub requests: std::collections::BTreeMap<String, String>,
    pub limits: std::collections::BTreeMap<String, String>,
}

impl Applied {
    /// What `c` asks for.
    pub fn of(c: &k8s_openapi::api::core::v1::Container) -> Applied {
        let r = c.resources.as_ref();
        let map = |m: Option<
            &std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >| { m.into_iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect() };
        Applied { requests: map(r.and_then(|r| r.requests.as_ref())), limits: map(r.and_then(|r| r.limits.as_ref())) }
    }

    /// The resources (`cpu`, `memory`) whose request or limit differs from `other`'s.
    pub fn changed(&self, other: &Applied) -> Vec<&'static str> {
        ["cpu", "memory"]
            .into_iter()
            .filter(|r| self.requests.get(*r) != other.requests.get(*r) || self.limits.get(*r) != other.limits.get(*r))
            .collect()
    }
}

impl ContainerRecord {
    pub fn new(name: &str, image: &str, waiting_reason: &str) -> ContainerRecord {
        ContainerRecord {
            name: name.into(),
            image: image.into(),
            image_id: None,
            container_id: None,
            state: ContainerState::waiting(waiting_reason, None),
            last_state: None,
            restart_count: 0,
            ready: false,
            started: false,
            spec_hash: None,
            applied: None,
            user: None,
        }
    }

    /// Records that instance `id` was made: the previous run becomes `lastState`, and a restart is counted.
    pub fn new_instance(&mut self, id: &str) {
        if let ContainerState::Terminated { .. } = self.state {
            self.last_state = Some(self.state.clone());
        }
        if self.container_id.is_some() {
            self.restart_count += 1;
        }
        self.container_id = Some(format!("nodelet://{id}"));
    }

    /// Whether this container finished with exit code 0.
    pub fn succeeded(&self) -> bool {
        matches!(self.state, ContainerState::Terminated { exit_code: 0, .. })
    }
}

/// Everything the status manager needs to write the pod's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    pub phase: Phase,
    /// For pods rejected at admission or evicted: `status.reason` / `status.message`.
    pub reason: Option<String>,
    pub message: Option<String>,
    pub sandbox_ready: bool,
    /// Every init container has completed (sidecars: started) once; sticky.
    pub initialized: bool,
    /// `metadata.generation` of the spec this state answers (`status.observedGeneration`).
    pub observed_generation: Option<i64>,
    pub start_time: Timestamp,
    pub qos: QosClass,
    pub host_ip: String,
    pub pod_ip: Option<String>,
    pub init: Vec<ContainerRecord>,
    pub containers: Vec<ContainerRecord>,
    /// The pod's `readinessGates`: each condition type and its status in the API object (`None`: missing).
    pub readiness_gates: Vec<(String, Option<String>)>,
    /// An in-place resize that waits or is being applied (`PodResizePending` / `PodResizeInProgress`).
    pub resize: Option<ResizeStatus>,
    /// Ephemeral containers (`kubectl debug`), in the order they were added.
    pub ephemeral: Vec<ContainerRecord>,
    /// Why the kubelet ended the pod (an eviction): the `DisruptionTarget` condition's message.
    pub disruption: Option<String>,
    /// A `RestartAllContainers` restart rule fired and the pod is being restarted in place.
    pub restart_all: Option<RestartAll>,
}

/// Where an in-place restart of all of a pod's containers stands (a `RestartAllContainers` restart rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartAll {
    /// Its containers are being stopped: the `AllContainersRestarting` condition is True.
    Stopping,
    /// They are stopped and start again from the first init container (the `Initialized` condition stays True).
    Initializing,
}

/// Reason of the state and last termination of a container stopped by an in-place restart of its pod
/// (upstream's `RestartingAllContainers`), and their message.
pub const RESTARTING_ALL: (&str, &str) =
    ("RestartingAllContainers", "The container is removed because RestartAllContainers in place");

/// Where an in-place resize stands, as upstream's resize conditions say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResizeStatus {
    /// `PodResizePending`: it cannot be applied (`Infeasible`: more than the node has).
    Pending { reason: &'static str, message: String },
    /// `PodResizeInProgress`: being applied; with the error of an attempt that failed (reason `Error`).
    InProgress { error: Option<String> },
}

/// `status.phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}
