//! Which pod goes first, exactly as upstream ranks them. Memory: pods using more than they request first, then
//! lower priority, then by how far usage exceeds the request. Disk: the same with local ephemeral storage
//! (writable layers, logs, emptyDirs). PIDs: lower priority, then more processes. A pod without stats ranks
//! first (upstream's rule: nothing proves it is small). Critical pods (static and mirror pods, priority of at
//! least 2,000,000,000) are never evicted. Pure.

use std::cmp::Ordering;

use k8s_openapi::api::core::v1::Pod;

use super::thresholds::Starved;
use crate::stats::summary::PodStats;

/// Upstream's `SystemCriticalPriority`: pods at or above it are critical.
const SYSTEM_CRITICAL_PRIORITY: i32 = 2_000_000_000;

/// A pod's use of what is starved, next to its requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub uid: String,
    pub priority: i32,
    pub critical: bool,
    /// Pod working set and memory request.
    pub memory: Option<u64>,
    pub memory_request: u64,
    /// Local ephemeral storage used and requested.
    pub disk: Option<u64>,
    pub disk_request: u64,
    pub processes: Option<u64>,
    /// CPU usage (nanocores) and request (nanocores).
    pub cpu: Option<u64>,
    pub cpu_request: u64,
    pub containers: Vec<ContainerUse>,
}

/// A container's usage next to its requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerUse {
    pub name: String,
    /// Working set and memory request.
    pub memory: (u64, u64),
    /// Writable layer plus logs, and the ephemeral-storage request.
    pub disk: (u64, u64),
    /// CPU usage and request, in nanocores.
    pub cpu: (u64, u64),
}

impl Candidate {
    /// The candidate for `pod` with its latest `stats`.
    pub fn of(pod: &Pod, stats: Option<&PodStats>) -> Candidate {
        let spec = pod.spec.as_ref();
        let priority = spec.and_then(|s| s.priority).unwrap_or(0);
        // A request in bytes (memory, ephemeral-storage) or nanocores (cpu).
        let request = |c: &k8s_openapi::api::core::v1::Container, name: &str| {
            let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
            let scale = if name == "cpu" { 1e9 } else { 1.0 };
            let q = requests.and_then(|r| r.get(name));
            q.and_then(crate::pods::resources::quantity).map_or(0, |v| crate::units::ceil_u64(v * scale))
        };
        let all = spec.map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()).collect::<Vec<_>>());
        let containers = all
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                let used = stats.and_then(|s| s.containers.iter().find(|cs| cs.name == c.name));
                let memory = used.and_then(|u| u.memory.as_ref()?.working_set_bytes).unwrap_or(0);
                let layer = used.and_then(|u| u.rootfs.as_ref()?.used_bytes).unwrap_or(0);
                let logs = used.and_then(|u| u.logs.as_ref()?.used_bytes).unwrap_or(0);
                let disk = (layer + logs, request(c, "ephemeral-storage"));
                let cpu_used = used.and_then(|u| u.cpu.as_ref()?.usage_nano_cores).unwrap_or(0);
                let cpu = (cpu_used, request(c, "cpu"));
                ContainerUse { name: c.name.clone(), memory: (memory, request(c, "memory")), disk, cpu }
            })
            .collect::<Vec<_>>();
        let app = spec.map_or(0, |s| s.containers.len());
        let requests = crate::pods::resources::pod_requests(pod);
        Candidate {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            priority,
            critical: is_critical(pod),
            memory: stats.and_then(|s| s.memory.as_ref()?.working_set_bytes),
            memory_request: requests.1,
            disk: stats.and_then(|s| s.ephemeral_storage.as_ref()?.used_bytes),
            disk_request: containers.iter().take(app).map(|c| c.disk.1).sum(),
            processes: stats.and_then(|s| s.process_stats.as_ref()?.process_count),
            cpu: stats.and_then(|s| s.cpu.as_ref()?.usage_nano_cores),
            cpu_request: requests.0.saturating_mul(1_000_000),
            containers,
        }
    }
}

/// Upstream's critical pods: static and mirror pods, and pods of at least system-critical priority.
pub fn is_critical(pod: &Pod) -> bool {
    use crate::sources::mirror::{is_mirror, is_static};
    is_static(pod)
        || is_mirror(pod)
        || pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0) >= SYSTEM_CRITICAL_PRIORITY
}

/// `a` before `b` when `a` is true and `b` is not.
fn first_if(a: bool, b: bool) -> Ordering {
    b.cmp(&a)
}

/// Usage over request (`None`: no stats, which ranks as exceeding by the most).
fn excess(usage: Option<u64>, request: u64) -> Option<i128> {
    usage.map(|u| i128::from(u) - i128::from(request))
}

fn by_usage(a: Option<u64>, a_request: u64, b: Option<u64>, b_request: u64) -> Ordering {
    let (ea, eb) = (excess(a, a_request), excess(b, b_request));
    first_if(ea.is_none(), eb.is_none())
        .then_with(|| first_if(ea.is_some_and(|e| e > 0), eb.is_some_and(|e| e > 0)))
        .then_with(|| eb.cmp(&ea))
}

/// Whether the pod uses more of `starved` than it requested (a pod without stats counts as doing so, as
/// upstream ranks it; PIDs have no requests).
pub fn exceeds(c: &Candidate, starved: Starved) -> bool {
    match starved {
        Starved::Memory => c.memory.is_none_or(|m| m > c.memory_request),
        Starved::EphemeralStorage | Starved::Inodes => c.disk.is_none_or(|d| d > c.disk_request),
        Starved::Cpu => c.cpu.is_none_or(|u| u > c.cpu_request),
        Starved::Pids => true,
    }
}

/// Whether the pod is known to use more of `starved` than it requested (its stats say so).
pub fn known_excess(c: &Candidate, starved: Starved) -> bool {
    let over = |usage: Option<u64>, request: u64| usage.is_some_and(|u| u > request);
    match starved {
        Starved::Memory => over(c.memory, c.memory_request),
        Starved::EphemeralStorage | Starved::Inodes => over(c.disk, c.disk_request),
        Starved::Cpu => over(c.cpu, c.cpu_request),
        Starved::Pids => c.processes.is_some(),
    }
}

/// Sorts `candidates` into eviction order for `starved`; critical pods are dropped.
pub fn rank(mut candidates: Vec<Candidate>, starved: Starved) -> Vec<Candidate> {
    candidates.retain(|c| !c.critical);
    let exceeds = |c: &Candidate| exceeds(c, starved);
    candidates.sort_by(|a, b| match starved {
        Starved::Memory => first_if(exceeds(a), exceeds(b))
            .then_with(|| a.priority.cmp(&b.priority))
            .then_with(|| by_usage(a.memory, a.memory_request, b.memory, b.memory_request)),
        Starved::EphemeralStorage | Starved::Inodes => first_if(exceeds(a), exceeds(b))
            .then_with(|| a.priority.cmp(&b.priority))
            .then_with(|| by_usage(a.disk, a.disk_request, b.disk, b.disk_request)),
        Starved::Cpu => first_if(exceeds(a), exceeds(b))
            .then_with(|| a.priority.cmp(&b.priority))
            .then_with(|| by_usage(a.cpu, a.cpu_request, b.cpu, b.cpu_request)),
        Starved::Pids => a
            .priority
            .cmp(&b.priority)
            .then_with(|| first_if(a.processes.is_none(), b.processes.is_none()))
            .then_with(|| b.processes.cmp(&a.processes)),
    });
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn candidate(uid: &str, priority: i32, memory: Option<u64>, request: u64) -> Candidate {
        Candidate {
            uid: uid.into(),
            priority,
            critical: false,
            memory,
            memory_request: request,
            disk: memory,
            disk_request: request,
            processes: memory.map(|m| m / MIB),
            cpu: memory,
            cpu_request: request,
            containers: Vec::new(),
        }
    }

    fn order(c: Vec<Candidate>, starved: Starved) -> Vec<String> {
        rank(c, starved).into_iter().map(|c| c.uid).collect()
    }

    #[test]
    fn memory_ranking_is_upstreams() {
        let pods = vec![
            candidate("guaranteed-within", 0, Some(100 * MIB), 200 * MIB),
            candidate("burstable-over", 0, Some(300 * MIB), 100 * MIB),
            candidate("besteffort-small", 0, Some(10 * MIB), 0),
            candidate("besteffort-big", 0, Some(500 * MIB), 0),
            candidate("important-over", 1000, Some(900 * MIB), 0),
            candidate("no-stats", 0, None, 0),
        ];
        // Over request first (no stats counts as over), then lower priority, then usage above request.
        assert_eq!(
            order(pods, Starved::Memory),
            ["no-stats", "besteffort-big", "burstable-over", "besteffort-small", "important-over", "guaranteed-within"]
        );
    }

    #[test]
    fn critical_pods_are_never_candidates() {
        let mut critical = candidate("static", 0, Some(900 * MIB), 0);
        critical.critical = true;
        assert_eq!(order(vec![critical, candidate("other", 0, Some(MIB), 0)], Starved::Memory), ["other"]);
        let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "uid": "u",
            "annotations": {"kubernetes.io/config.source": "file"}}, "spec": {"containers": [{"name": "c"}]}}))
        .unwrap();
        assert!(Candidate::of(&pod, None).critical);
        let api: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "uid": "u"},
            "spec": {"priority": 2_000_000_000, "containers": [{"name": "c"}]}}))
        .unwrap();
        assert!(Candidate::of(&api, None).critical);
    }

    #[test]
    fn pid_ranking_is_priority_then_processes() {
        let pods = vec![
            candidate("few", 0, Some(2 * MIB), 0),
            candidate("many", 0, Some(50 * MIB), 0),
            candidate("important-many", 10, Some(90 * MIB), 0),
        ];
        assert_eq!(order(pods, Starved::Pids), ["many", "few", "important-many"]);
    }

    #[test]
    fn a_stall_is_blamed_only_on_known_excess() {
        let within = candidate("within", 0, Some(50 * MIB), 100 * MIB);
        let over = candidate("over", 0, Some(150 * MIB), 100 * MIB);
        let unknown = candidate("unknown", 0, None, 0);
        assert!(!known_excess(&within, Starved::Memory) && known_excess(&over, Starved::Memory));
        assert!(!known_excess(&unknown, Starved::Cpu), "no stats: not known to exceed");
        assert!(exceeds(&unknown, Starved::Cpu), "while thresholds rank it first");
    }
}
