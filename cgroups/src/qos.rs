//! QoS classes and the kubelet's cgroup layout and resource arithmetic (cgroupfs driver), as upstream computes
//! them (`pkg/apis/core/v1/helper/qos`, `pkg/kubelet/cm/helpers_linux.go`).

use serde::{Deserialize, Serialize};

/// Requests and limits of one container, in the kubelet's units (zero counts as unset, like upstream).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerResources {
    /// `requests.cpu` in millicores.
    pub cpu_request_millis: Option<u64>,
    /// `limits.cpu` in millicores.
    pub cpu_limit_millis: Option<u64>,
    /// `requests.memory` in bytes.
    pub memory_request_bytes: Option<u64>,
    /// `limits.memory` in bytes.
    pub memory_limit_bytes: Option<u64>,
}

/// A pod's QoS class (`status.qosClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QosClass {
    /// Every container has cpu and memory limits equal to its requests.
    Guaranteed,
    /// Some requests or limits, but not Guaranteed.
    Burstable,
    /// No requests or limits at all.
    BestEffort,
}

impl QosClass {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }

    /// The class named `name` (as [`QosClass::as_str`] writes it).
    pub fn parse(name: &str) -> Option<QosClass> {
        [QosClass::Guaranteed, QosClass::Burstable, QosClass::BestEffort].into_iter().find(|q| q.as_str() == name)
    }
}

fn set(v: Option<u64>) -> Option<u64> {
    v.filter(|&q| q != 0)
}

/// The QoS class of a pod from all its containers (init and app), as upstream's `GetPodQOS`.
pub fn pod_qos(containers: &[ContainerResources]) -> QosClass {
    let mut any = false;
    let mut guaranteed = true;
    for c in containers {
        let pairs = [
            (set(c.cpu_request_millis), set(c.cpu_limit_millis)),
            (set(c.memory_request_bytes), set(c.memory_limit_bytes)),
        ];
        for (request, limit) in pairs {
            any |= request.is_some() || limit.is_some();
            match (request, limit) {
                // A request without a limit, or one that differs from it, is Burstable.
                (_, None) => guaranteed = false,
                (Some(r), Some(l)) if r != l => guaranteed = false,
                _ => {}
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => QosClass::BestEffort,
        (true, true) => QosClass::Guaranteed,
        (true, false) => QosClass::Burstable,
    }
}

/// Smallest and largest cpu.shares (v1) the kernel accepts.
pub const MIN_SHARES: u64 = 2;
/// See [`MIN_SHARES`].
pub const MAX_SHARES: u64 = 262_144;
/// CFS period the kubelet uses, in µs.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest quota the kubelet sets, in µs.
pub const MIN_QUOTA_US: u64 = 1_000;

/// cpu.shares for a cpu request (`MilliCPUToShares`).
pub fn milli_cpu_to_shares(milli: u64) -> u64 {
    if milli == 0 {
        return MIN_SHARES;
    }
    (milli * 1024 / 1000).clamp(MIN_SHARES, MAX_SHARES)
}

/// cgroup v2 `cpu.weight` for v1 shares (`CpuSharesToCpuWeight`).
pub fn shares_to_weight(shares: u64) -> u64 {
    1 + (shares.saturating_sub(2) * 9999) / 262_142
}

/// CFS quota in µs per [`CPU_PERIOD_US`] for a cpu limit (`MilliCPUToQuota`); `None` means unlimited.
pub fn milli_cpu_to_quota(milli: u64) -> Option<u64> {
    if milli == 0 {
        return None;
    }
    Some((milli * CPU_PERIOD_US / 1000).max(MIN_QUOTA_US))
}

/// The pod's cgroup relative to the cgroup root: `kubepods/pod<uid>` (Guaranteed),
/// `kubepods/burstable/pod<uid>` or `kubepods/besteffort/pod<uid>`.
pub fn pod_cgroup(qos: QosClass, pod_uid: &str) -> String {
    match qos {
        QosClass::Guaranteed => format!("kubepods/pod{pod_uid}"),
        QosClass::Burstable => format!("kubepods/burstable/pod{pod_uid}"),
        QosClass::BestEffort => format!("kubepods/besteffort/pod{pod_uid}"),
    }
}

/// Limits of a pod-level cgroup (`ResourceConfigForPod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodLimits {
    /// cpu.shares: the sum of cpu requests (2 for BestEffort).
    pub cpu_shares: u64,
    /// CFS quota: the sum of cpu limits, only if every container has one.
    pub cpu_quota_us: Option<u64>,
    /// Memory limit: the sum of memory limits, only if every container has one.
    pub memory_limit_bytes: Option<u64>,
}

/// The pod cgroup's limits from its app containers (init containers run one at a time and only raise the
/// request to their largest one).
pub fn pod_limits(app: &[ContainerResources], init: &[ContainerResources]) -> PodLimits {
    let sum = |f: fn(&ContainerResources) -> Option<u64>| -> (u64, bool) {
        let all = app.iter().all(|c| set(f(c)).is_some());
        (app.iter().filter_map(|c| set(f(c))).sum(), all)
    };
    let max_init = |f: fn(&ContainerResources) -> Option<u64>| init.iter().filter_map(|c| set(f(c))).max().unwrap_or(0);
    let (cpu_requests, _) = sum(|c| c.cpu_request_millis);
    let (cpu_limits, all_cpu) = sum(|c| c.cpu_limit_millis);
    let (mem_limits, all_mem) = sum(|c| c.memory_limit_bytes);
    let qos = pod_qos(&[app, init].concat());
    let cpu_request = cpu_requests.max(max_init(|c| c.cpu_request_millis));
    PodLimits {
        cpu_shares: if qos == QosClass::BestEffort { MIN_SHARES } else { milli_cpu_to_shares(cpu_request) },
        cpu_quota_us: (all_cpu && !app.is_empty())
            .then(|| milli_cpu_to_quota(cpu_limits.max(max_init(|c| c.cpu_limit_millis))))
            .flatten(),
        memory_limit_bytes: (all_mem && !app.is_empty()).then_some(mem_limits.max(max_init(|c| c.memory_limit_bytes))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(cpu_req: u64, cpu_lim: u64, mem_req: u64, mem_lim: u64) -> ContainerResources {
        ContainerResources {
            cpu_request_millis: Some(cpu_req),
            cpu_limit_millis: Some(cpu_lim),
            memory_request_bytes: Some(mem_req),
            memory_limit_bytes: Some(mem_lim),
        }
    }

    #[test]
    fn qos_classes_follow_upstream() {
        assert_eq!(pod_qos(&[ContainerResources::default()]), QosClass::BestEffort);
        assert_eq!(pod_qos(&[c(0, 0, 0, 0)]), QosClass::BestEffort, "zero quantities count as unset");
        assert_eq!(pod_qos(&[c(100, 100, 64, 64)]), QosClass::Guaranteed);
        assert_eq!(pod_qos(&[c(100, 100, 64, 64), c(200, 200, 1, 1)]), QosClass::Guaranteed);
        assert_eq!(pod_qos(&[c(100, 200, 64, 64)]), QosClass::Burstable);
        assert_eq!(pod_qos(&[c(100, 100, 64, 64), ContainerResources::default()]), QosClass::Burstable);
        let limits_only =
            ContainerResources { cpu_limit_millis: Some(100), memory_limit_bytes: Some(1), ..Default::default() };
        assert_eq!(pod_qos(&[limits_only]), QosClass::Guaranteed, "requests default to limits");
        let mem_only = ContainerResources { memory_request_bytes: Some(1), ..Default::default() };
        assert_eq!(pod_qos(&[mem_only]), QosClass::Burstable);
    }

    #[test]
    fn cpu_conversions_match_the_kubelet() {
        assert_eq!(milli_cpu_to_shares(0), 2);
        assert_eq!(milli_cpu_to_shares(1), 2);
        assert_eq!(milli_cpu_to_shares(100), 102);
        assert_eq!(milli_cpu_to_shares(1000), 1024);
        assert_eq!(milli_cpu_to_shares(1_000_000), MAX_SHARES);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(MAX_SHARES), 10_000);
        assert_eq!(milli_cpu_to_quota(0), None);
        assert_eq!(milli_cpu_to_quota(5), Some(MIN_QUOTA_US));
        assert_eq!(milli_cpu_to_quota(250), Some(25_000));
    }

    #[test]
    fn pod_cgroups_and_limits() {
        assert_eq!(pod_cgroup(QosClass::Guaranteed, "u1"), "kubepods/podu1");
        assert_eq!(pod_cgroup(QosClass::Burstable, "u1"), "kubepods/burstable/podu1");
        assert_eq!(pod_cgroup(QosClass::BestEffort, "u1"), "kubepods/besteffort/podu1");
        let l = pod_limits(&[c(100, 200, 10, 20), c(300, 400, 30, 40)], &[]);
        assert_eq!(l, PodLimits { cpu_shares: 409, cpu_quota_us: Some(60_000), memory_limit_bytes: Some(60) });
        // One container without limits: no pod-level quota or memory limit.
        let l = pod_limits(
            &[c(100, 200, 10, 20), ContainerResources { cpu_request_millis: Some(50), ..Default::default() }],
            &[],
        );
        assert_eq!((l.cpu_shares, l.cpu_quota_us, l.memory_limit_bytes), (153, None, None));
        // A bigger init container raises the pod's request and limits.
        let l = pod_limits(&[c(100, 100, 10, 10)], &[c(500, 500, 50, 50)]);
        assert_eq!(l, PodLimits { cpu_shares: 512, cpu_quota_us: Some(50_000), memory_limit_bytes: Some(50) });
        assert_eq!(pod_limits(&[ContainerResources::default()], &[]).cpu_shares, MIN_SHARES);
    }
}
