//! Resource quantities of a pod spec in the kubelet's units, and the cgroup settings they become.

use k8s_openapi::api::core::v1::{Container, Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use nodelet_cgroups::qos::{self, ContainerResources};

/// A Kubernetes quantity (`100m`, `1.5`, `64Mi`, `1G`, `129e6`) in base units.
pub fn quantity(q: &Quantity) -> Option<f64> {
    let s = q.0.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
    ];
    for (suffix, factor) in suffixes {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| v * factor);
        }
    }
    for (suffix, factor) in [("P", 1e15), ("E", 1e18)] {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|v| v * factor);
        }
    }
    s.parse::<f64>().ok()
}

fn get(map: Option<&std::collections::BTreeMap<String, Quantity>>, key: &str) -> Option<f64> {
    map.and_then(|m| m.get(key)).and_then(quantity)
}

/// A container's requests and limits; requests default to limits, as the API server's defaulting does.
pub fn container_resources(c: &Container) -> ContainerResources {
    requirements(c.resources.as_ref())
}

/// Requests and limits of cpu and memory; requests default to limits.
fn requirements(r: Option<&ResourceRequirements>) -> ContainerResources {
    let requests = r.and_then(|r| r.requests.as_ref());
    let limits = r.and_then(|r| r.limits.as_ref());
    let millis = |v: f64| crate::units::ceil_u64(v * 1000.0);
    let bytes = crate::units::ceil_u64;
    let cpu_limit = get(limits, "cpu").map(millis);
    let memory_limit = get(limits, "memory").map(bytes);
    ContainerResources {
        cpu_request_millis: get(requests, "cpu").map(millis).or(cpu_limit),
        cpu_limit_millis: cpu_limit,
        memory_request_bytes: get(requests, "memory").map(bytes).or(memory_limit),
        memory_limit_bytes: memory_limit,
    }
}

/// The pod-level `spec.resources` (PodLevelResources: beta, on by default in upstream 1.37), when it sets cpu or
/// memory: the pod's budget, which its QoS class, its admission and its cgroup follow instead of the sum of its
/// containers' (upstream's `IsPodLevelResourcesSet`).
pub fn pod_level(pod: &Pod) -> Option<ContainerResources> {
    let r = pod.spec.as_ref()?.resources.as_ref()?;
    let names = |m: Option<&std::collections::BTreeMap<String, Quantity>>| {
        m.is_some_and(|m| m.contains_key("cpu") || m.contains_key("memory"))
    };
    (names(r.requests.as_ref()) || names(r.limits.as_ref())).then(|| requirements(Some(r)))
}

/// All containers' resources: (app, init).
pub fn pod_resources(pod: &Pod) -> (Vec<ContainerResources>, Vec<ContainerResources>) {
    let spec = pod.spec.as_ref();
    let app = spec.map(|s| s.containers.iter().map(container_resources).collect()).unwrap_or_default();
    let init = spec
        .and_then(|s| s.init_containers.as_ref())
        .map(|cs| cs.iter().map(container_resources).collect())
        .unwrap_or_default();
    (app, init)
}

/// The pod's QoS class: from its pod-level resources when it has them, else from its containers' (upstream's
/// `ComputePodQOS`).
pub fn pod_qos(pod: &Pod) -> qos::QosClass {
    if let Some(level) = pod_level(pod) {
        return qos::pod_qos(&[level]);
    }
    let (app, init) = pod_resources(pod);
    qos::pod_qos(&[app, init].concat())
}

/// The pod's effective requests (max of the app sum and the largest init container; a pod-level request instead
/// where there is one): what admission checks.
pub fn pod_requests(pod: &Pod) -> (u64, u64) {
    let (app, init) = pod_resources(pod);
    let sum = |f: fn(&ContainerResources) -> Option<u64>| app.iter().filter_map(f).sum::<u64>();
    let max = |f: fn(&ContainerResources) -> Option<u64>| init.iter().filter_map(f).max().unwrap_or(0);
    let level = pod_level(pod).unwrap_or_default();
    (
        level.cpu_request_millis.unwrap_or_else(|| sum(|c| c.cpu_request_millis).max(max(|c| c.cpu_request_millis))),
        level
            .memory_request_bytes
            .unwrap_or_else(|| sum(|c| c.memory_request_bytes).max(max(|c| c.memory_request_bytes))),
    )
}

/// The pod cgroup's limits (upstream's `ResourceConfigForPod`): from its containers, or from its pod-level
/// resources where it has them (a pod-level limit bounds containers that have none of their own).
pub fn pod_cgroup_limits(pod: &Pod) -> qos::PodLimits {
    let (app, init) = pod_resources(pod);
    let from_containers = qos::pod_limits(&app, &init);
    let Some(level) = pod_level(pod) else { return from_containers };
    let best_effort = qos::pod_qos(&[level]) == qos::QosClass::BestEffort;
    qos::PodLimits {
        cpu_shares: match level.cpu_request_millis {
            _ if best_effort => qos::MIN_SHARES,
            Some(milli) => qos::milli_cpu_to_shares(milli),
            None => from_containers.cpu_shares,
        },
        cpu_quota_us: match level.cpu_limit_millis {
            Some(milli) => qos::milli_cpu_to_quota(milli),
            None => from_containers.cpu_quota_us,
        },
        memory_limit_bytes: level.memory_limit_bytes.or(from_containers.memory_limit_bytes),
    }
}

/// `podPidsLimit` as a cgroup limit: `-1` (or any value below 1) means unlimited (`pids.max` = `max`), as upstream.
pub fn pod_pids_limit(configured: Option<i64>) -> Option<u64> {
    configured.and_then(|p| u64::try_from(p).ok()).filter(|p| *p > 0)
}

/// The `oom_score_adj` of the node agent and its zygote (upstream's kubelet: -999): the kernel picks a container,
/// never the node, when memory runs out.
pub const AGENT_OOM_SCORE_ADJ: i32 = -999;

/// A container's `oom_score_adj` by QoS class, as upstream: Guaranteed -997, BestEffort 1000, Burstable
/// `1000 - 1000 * memory request / node memory`, kept within 3..=999 so it ranks between the two.
pub fn oom_score_adj(qos: qos::QosClass, c: &ContainerResources, memory_capacity: u64) -> i32 {
    match qos {
        qos::QosClass::Guaranteed => -997,
        qos::QosClass::BestEffort => 1000,
        qos::QosClass::Burstable => {
            let request = u128::from(c.memory_request_bytes.unwrap_or(0));
            let share = (1000 * request).checked_div(u128::from(memory_capacity)).unwrap_or(0);
            let adj = 1000 - i32::try_from(share.min(1000)).unwrap_or(1000);
            adj.clamp(3, 999)
        }
    }
}

/// The container cgroup's settings (`cpu.shares` from the request, quota from the limit, memory limit).
pub fn runtime_resources(
    c: &ContainerResources,
    pids_limit: Option<i64>,
    oom_group: bool,
) -> nodelet_runtime::Resources {
    let quota = c.cpu_limit_millis.and_then(qos::milli_cpu_to_quota);
    nodelet_runtime::Resources {
        cpu_shares: Some(qos::milli_cpu_to_shares(c.cpu_request_millis.unwrap_or(0))),
        cpu_quota: quota.map(|q| i64::try_from(q).unwrap_or(i64::MAX)),
        cpu_period: quota.map(|_| qos::CPU_PERIOD_US),
        memory_limit: c.memory_limit_bytes.map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
        pids_limit: pod_pids_limit(pids_limit).and_then(|p| i64::try_from(p).ok()),
        oom_group,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        let q = |s: &str| quantity(&Quantity(s.into())).unwrap();
        assert_eq!(q("100m"), 0.1);
        assert_eq!(q("1.5"), 1.5);
        assert_eq!(q("64Mi"), 67_108_864.0);
        assert_eq!(q("1G"), 1e9);
        assert_eq!(q("129e6"), 129e6);
        assert_eq!(q("2Ki"), 2048.0);
        assert!(quantity(&Quantity("lots".into())).is_none());
    }

    #[test]
    fn oom_score_adj_follows_the_qos_class() {
        let gib = 1u64 << 30;
        let c = |request: Option<u64>| ContainerResources { memory_request_bytes: request, ..Default::default() };
        assert_eq!(oom_score_adj(qos::QosClass::Guaranteed, &c(Some(gib)), 4 * gib), -997);
        assert_eq!(oom_score_adj(qos::QosClass::BestEffort, &c(None), 4 * gib), 1000);
        assert_eq!(oom_score_adj(qos::QosClass::Burstable, &c(Some(gib)), 4 * gib), 750);
        assert_eq!(oom_score_adj(qos::QosClass::Burstable, &c(None), 4 * gib), 999);
        assert_eq!(oom_score_adj(qos::QosClass::Burstable, &c(Some(4 * gib)), 4 * gib), 3);
        let guaranteed = oom_score_adj(qos::QosClass::Guaranteed, &c(Some(gib)), gib);
        assert!(AGENT_OOM_SCORE_ADJ < guaranteed, "the agent ranks below every container");
    }

    #[test]
    fn a_pod_pids_limit_of_minus_one_is_unlimited() {
        assert_eq!(pod_pids_limit(Some(-1)), None);
        assert_eq!(pod_pids_limit(Some(0)), None);
        assert_eq!(pod_pids_limit(None), None);
        assert_eq!(pod_pids_limit(Some(1024)), Some(1024));
        let r = runtime_resources(&ContainerResources::default(), Some(-1), true);
        assert_eq!(r.pids_limit, None);
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec})).expect("pod")
    }

    #[test]
    fn pod_level_resources_decide_qos_admission_and_the_pod_cgroup() {
        // Containers without resources, a pod-level budget: Guaranteed by the pod's (requests default to limits).
        let guaranteed = pod(serde_json::json!({
            "resources": {"limits": {"cpu": "500m", "memory": "128Mi"}},
            "containers": [{"name": "a"}, {"name": "b"}],
        }));
        assert_eq!(pod_qos(&guaranteed), qos::QosClass::Guaranteed);
        assert_eq!(pod_requests(&guaranteed), (500, 128 << 20));
        let limits = pod_cgroup_limits(&guaranteed);
        assert_eq!(
            (limits.cpu_shares, limits.cpu_quota_us, limits.memory_limit_bytes),
            (512, Some(50_000), Some(128 << 20)),
            "the pod cgroup gets the pod's budget although no container has a limit"
        );
        // A pod-level request only: Burstable, no limits; the pod's request, not the containers' sum, is admitted.
        let burstable = pod(serde_json::json!({
            "resources": {"requests": {"cpu": "1"}},
            "containers": [{"name": "a", "resources": {"requests": {"cpu": "100m", "memory": "1Mi"}}}],
        }));
        assert_eq!(pod_qos(&burstable), qos::QosClass::Burstable);
        assert_eq!(pod_requests(&burstable), (1000, 1 << 20), "memory: the containers' (no pod-level request)");
        let limits = pod_cgroup_limits(&burstable);
        assert_eq!((limits.cpu_shares, limits.cpu_quota_us, limits.memory_limit_bytes), (1024, None, None));
        // Other pod-level resources (hugepages) do not make it a pod-level budget (upstream's supported set).
        let other = pod(serde_json::json!({
            "resources": {"limits": {"hugepages-2Mi": "2Mi"}},
            "containers": [{"name": "a"}],
        }));
        assert!(pod_level(&other).is_none());
        assert_eq!(pod_qos(&other), qos::QosClass::BestEffort);
    }
}
