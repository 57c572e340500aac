//! Pod admission, as the kubelet's admit handlers decide it, in their order: the node's pressure conditions,
//! sysctls, the OS, the pod count, cpu and memory requests against allocatable, then AppArmor. Only pods that are not terminal count: a finished Job pod holds no slot and no
//! requests. Pure: the dispatcher passes what is in use.

use k8s_openapi::api::core::v1::Pod;

use crate::node::conditions::Pressure;

/// What the admitted, non-terminal pods use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub pods: u64,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// The node's capacity for pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub max_pods: u64,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// What the node lets pods ask for, beyond resources.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The sysctls pods may set.
    pub sysctls: super::sysctls::Allowlist,
    /// Whether the kernel enforces AppArmor (`/sys/module/apparmor/parameters/enabled`).
    pub apparmor: bool,
}

impl Policy {
    /// The policy of this host with `allowed_unsafe_sysctls` (a bad pattern is a configuration error).
    pub fn of_host(allowed_unsafe_sysctls: &[String]) -> Result<Policy, String> {
        let apparmor = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|s| s.starts_with('Y'))
            && std::path::Path::new("/sys/kernel/security/apparmor").exists();
        Ok(Policy { sysctls: super::sysctls::Allowlist::new(allowed_unsafe_sysctls)?, apparmor })
    }
}

/// Upstream's reason and message for a pod that is not admitted (`status.reason`, `status.message`, the event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: &'static str,
    pub message: String,
}

fn reject(reason: &'static str, message: String) -> Result<(), Rejection> {
    Err(Rejection { reason, message })
}

/// Whether `pod`, requesting `(cpu millis, memory bytes)`, may run next to what is in use.
pub fn admit(
    pod: &Pod,
    (cpu, memory): (u64, u64),
    used: Usage,
    capacity: Capacity,
    (policy, pressure): (&Policy, Pressure),
) -> Result<(), Rejection> {
    under_pressure(pod, pressure)?;
    let spec = pod.spec.as_ref();
    if let Err(message) = policy.sysctls.admit(pod) {
        return reject(super::sysctls::FORBIDDEN_REASON, message);
    }
    let selected_os = spec.and_then(|s| s.node_selector.as_ref()).and_then(|m| m.get("kubernetes.io/os"));
    if selected_os.is_some_and(|os| os != "linux") {
        return reject(
            "PodOSSelectorNodeLabelDoesNotMatch",
            "Failed to admit pod as the `kubernetes.io/os` label doesn't match node label".into(),
        );
    }
    if spec.and_then(|s| s.os.as_ref()).is_some_and(|os| os.name != "linux") {
        return reject("PodOSNotSupported", "Failed to admit pod as the OS field doesn't match node OS".into());
    }
    let (used_pods, max_pods) = (used.pods, capacity.max_pods);
    if used_pods + 1 > max_pods {
        return reject(
            "OutOfpods",
            format!("Node didn't have enough resource: pods, requested: 1, used: {used_pods}, capacity: {max_pods}"),
        );
    }
    let (used_cpu, cap_cpu) = (used.cpu_millis, capacity.cpu_millis);
    if used_cpu + cpu > cap_cpu {
        return reject(
            "OutOfcpu",
            format!("Node didn't have enough resource: cpu, requested: {cpu}, used: {used_cpu}, capacity: {cap_cpu}"),
        );
    }
    let (used_memory, cap_memory) = (used.memory_bytes, capacity.memory_bytes);
    if used_memory + memory > cap_memory {
        return reject(
            "OutOfmemory",
            format!(
                "Node didn't have enough resource: memory, requested: {memory}, used: {used_memory}, capacity: {cap_memory}"
            ),
        );
    }
    let pending = pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_none_or(|p| p == "Pending");
    if pending && !policy.apparmor && requires_apparmor(pod) {
        return reject("AppArmor", "Cannot enforce AppArmor: AppArmor is not enabled on the host".into());
    }
    Ok(())
}

/// The eviction manager's admission: under memory pressure alone, only BestEffort pods that do not tolerate the
/// memory-pressure taint are refused; under disk or PID pressure every pod; critical pods never.
fn under_pressure(pod: &Pod, pressure: Pressure) -> Result<(), Rejection> {
    let conditions: Vec<&str> =
        [(pressure.memory, "MemoryPressure"), (pressure.disk, "DiskPressure"), (pressure.pid, "PIDPressure")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
    if conditions.is_empty() || crate::eviction::ranking::is_critical(pod) {
        return Ok(());
    }
    if conditions == ["MemoryPressure"] {
        let best_effort = super::resources::pod_qos(pod) == nodelet_cgroups::qos::QosClass::BestEffort;
        let tolerates = pod.spec.as_ref().and_then(|s| s.tolerations.as_ref()).into_iter().flatten().any(|t| {
            let key = t.key.as_deref().unwrap_or_default();
            let exists = t.operator.as_deref() == Some("Exists");
            let key_matches = key == "node.kubernetes.io/memory-pressure" || (key.is_empty() && exists);
            let effect_matches = t.effect.as_deref().is_none_or(|e| e.is_empty() || e == "NoSchedule");
            key_matches && effect_matches && (exists || t.value.as_deref().unwrap_or_default().is_empty())
        });
        if !best_effort || tolerates {
            return Ok(());
        }
    }
    reject("Evicted", format!("The node had condition: [{}]. ", conditions.join(" ")))
}

/// Whether the pod asks for an AppArmor profile other than `Unconfined` (fields or the deprecated annotations),
/// as upstream's validator reads it.
fn requires_apparmor(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else { return false };
    let confined = |p: Option<&k8s_openapi::api::core::v1::AppArmorProfile>| p.is_some_and(|p| p.type_ != "Unconfined");
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    confined(spec.security_context.as_ref().and_then(|s| s.app_armor_profile.as_ref()))
        || containers
            .into_iter()
            .any(|c| confined(c.security_context.as_ref().and_then(|s| s.app_armor_profile.as_ref())))
        || spec
            .ephemeral_containers
            .iter()
            .flatten()
            .any(|c| confined(c.security_context.as_ref().and_then(|s| s.app_armor_profile.as_ref())))
        || pod.metadata.annotations.iter().flatten().any(|(key, value)| {
            key.starts_with("container.apparmor.security.beta.kubernetes.io/") && value != "unconfined"
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPACITY: Capacity = Capacity { max_pods: 3, cpu_millis: 2000, memory_bytes: 1 << 30 };

    fn admit(pod: &Pod, requests: (u64, u64), used: Usage, capacity: Capacity) -> Result<(), Rejection> {
        let policy = Policy { sysctls: super::super::sysctls::Allowlist::new(&[]).unwrap(), apparmor: false };
        super::admit(pod, requests, used, capacity, (&policy, Pressure::default()))
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    fn reason(r: Result<(), Rejection>) -> &'static str {
        r.err().map_or("admitted", |r| r.reason)
    }

    #[test]
    fn pods_and_requests_count_against_capacity() {
        let p = pod(serde_json::json!({"containers": []}));
        assert_eq!(reason(admit(&p, (0, 0), Usage { pods: 2, ..Default::default() }, CAPACITY)), "admitted");
        let full = Usage { pods: 3, ..Default::default() };
        let rejected = admit(&p, (0, 0), full, CAPACITY).unwrap_err();
        assert_eq!(rejected.reason, "OutOfpods");
        assert_eq!(rejected.message, "Node didn't have enough resource: pods, requested: 1, used: 3, capacity: 3");
        let busy = Usage { pods: 1, cpu_millis: 1500, memory_bytes: 0 };
        assert_eq!(reason(admit(&p, (600, 0), busy, CAPACITY)), "OutOfcpu");
        assert_eq!(reason(admit(&p, (500, 1 << 30), busy, CAPACITY)), "admitted");
        assert_eq!(reason(admit(&p, (500, (1 << 30) + 1), busy, CAPACITY)), "OutOfmemory");
    }

    #[test]
    fn a_pod_for_another_os_is_rejected_first() {
        let windows = pod(serde_json::json!({"containers": [], "os": {"name": "windows"}}));
        let full = Usage { pods: 3, ..Default::default() };
        let rejected = admit(&windows, (0, 0), full, CAPACITY).unwrap_err();
        assert_eq!(rejected.reason, "PodOSNotSupported");
        assert_eq!(rejected.message, "Failed to admit pod as the OS field doesn't match node OS");
        let selector = pod(serde_json::json!({"containers": [], "nodeSelector": {"kubernetes.io/os": "windows"}}));
        assert_eq!(reason(admit(&selector, (0, 0), Usage::default(), CAPACITY)), "PodOSSelectorNodeLabelDoesNotMatch");
        let linux = pod(serde_json::json!({"containers": [], "os": {"name": "linux"}}));
        assert_eq!(reason(admit(&linux, (0, 0), Usage::default(), CAPACITY)), "admitted");
    }

    #[test]
    fn sysctls_first_and_apparmor_last_as_upstream() {
        let both = pod(serde_json::json!({"containers": [{"name": "c",
            "securityContext": {"appArmorProfile": {"type": "RuntimeDefault"}}}],
            "securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}}));
        let rejected = admit(&both, (0, 0), Usage::default(), CAPACITY).unwrap_err();
        assert_eq!(rejected.reason, "SysctlForbidden");
        assert_eq!(rejected.message, "forbidden sysctl: \"kernel.msgmax\" not allowlisted");
        let apparmor = pod(serde_json::json!({"containers": [{"name": "c",
            "securityContext": {"appArmorProfile": {"type": "RuntimeDefault"}}}]}));
        let rejected = admit(&apparmor, (0, 0), Usage::default(), CAPACITY).unwrap_err();
        assert_eq!(
            (rejected.reason, rejected.message.as_str()),
            ("AppArmor", "Cannot enforce AppArmor: AppArmor is not enabled on the host")
        );
        let annotated: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "annotations":
            {"container.apparmor.security.beta.kubernetes.io/c": "runtime/default"}},
            "spec": {"containers": [{"name": "c"}]}}))
        .unwrap();
        assert_eq!(reason(admit(&annotated, (0, 0), Usage::default(), CAPACITY)), "AppArmor");
        let unconfined = pod(serde_json::json!({"containers": [{"name": "c"}],
            "securityContext": {"appArmorProfile": {"type": "Unconfined"}}}));
        assert_eq!(reason(admit(&unconfined, (0, 0), Usage::default(), CAPACITY)), "admitted");
    }

    #[test]
    fn pressure_refuses_as_upstreams_eviction_admission() {
        let policy = Policy { sysctls: super::super::sysctls::Allowlist::new(&[]).unwrap(), apparmor: false };
        let memory = Pressure { memory: true, ..Default::default() };
        let admit_under = |p: &Pod, pressure| super::admit(p, (0, 0), Usage::default(), CAPACITY, (&policy, pressure));
        let best_effort = pod(serde_json::json!({"containers": [{"name": "c"}]}));
        let rejected = admit_under(&best_effort, memory).unwrap_err();
        assert_eq!(
            (rejected.reason, rejected.message.as_str()),
            ("Evicted", "The node had condition: [MemoryPressure]. ")
        );
        let burstable =
            pod(serde_json::json!({"containers": [{"name": "c", "resources": {"requests": {"memory": "1Mi"}}}]}));
        assert!(admit_under(&burstable, memory).is_ok());
        let tolerant = pod(serde_json::json!({"containers": [{"name": "c"}], "tolerations":
            [{"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"}]}));
        assert!(admit_under(&tolerant, memory).is_ok());
        let disk = Pressure { memory: true, disk: true, ..Default::default() };
        let rejected = admit_under(&burstable, disk).unwrap_err();
        assert_eq!(rejected.message, "The node had condition: [MemoryPressure DiskPressure]. ");
        let mut critical = burstable.clone();
        critical.spec.as_mut().unwrap().priority = Some(2_000_001_000);
        assert!(admit_under(&critical, disk).is_ok());
    }
}
