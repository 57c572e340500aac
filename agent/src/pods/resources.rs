//! Resource quantities of a pod spec in the kubelet's units, and the cgroup settings they become.

use k8s_openapi::api::core::v1::{Container, Pod};
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
    let r = c.resources.as_ref();
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

/// The pod's QoS class.
pub fn pod_qos(pod: &Pod) -> qos::QosClass {
    let (app, init) = pod_resources(pod);
    qos::pod_qos(&[app, init].concat())
}

/// The pod's effective requests (max of the app sum and the largest init container): what admission checks.
pub fn pod_requests(pod: &Pod) -> (u64, u64) {
    let (app, init) = pod_resources(pod);
    let sum = |f: fn(&ContainerResources) -> Option<u64>| app.iter().filter_map(f).sum::<u64>();
    let max = |f: fn(&ContainerResources) -> Option<u64>| init.iter().filter_map(f).max().unwrap_or(0);
    (
        sum(|c| c.cpu_request_millis).max(max(|c| c.cpu_request_millis)),
        sum(|c| c.memory_request_bytes).max(max(|c| c.memory_request_bytes)),
    )
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
}
