//! Pod admission, as the kubelet's admit handlers decide it: the OS, then the pod count, then cpu and memory
//! requests against allocatable. Only pods that are not terminal count: a finished Job pod holds no slot and no
//! requests. Pure: the dispatcher passes what is in use.

use k8s_openapi::api::core::v1::Pod;

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
pub fn admit(pod: &Pod, (cpu, memory): (u64, u64), used: Usage, capacity: Capacity) -> Result<(), Rejection> {
    let spec = pod.spec.as_ref();
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPACITY: Capacity = Capacity { max_pods: 3, cpu_millis: 2000, memory_bytes: 1 << 30 };

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
}
