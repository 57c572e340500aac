//! Local storage limits, enforced by eviction as upstream does (whatever the node's pressure): an emptyDir past
//! its `sizeLimit`, a pod past the sum of its containers' `ephemeral-storage` limits, a container whose writable
//! layer and logs are past its own limit. Memory-backed emptyDirs are skipped: their tmpfs has the size limit.
//! Pure: the pod and its latest stats in, upstream's signal and message out.

use k8s_openapi::api::core::v1::{Container, Pod};

use super::thresholds::binary_quantity;
use crate::pods::plan::is_sidecar;
use crate::stats::summary::PodStats;

/// The `ephemeral-storage` limit of a container, as written (for the message) and in bytes.
fn limit(c: &Container) -> Option<(String, u64)> {
    let q = c.resources.as_ref()?.limits.as_ref()?.get("ephemeral-storage")?;
    let bytes = crate::pods::resources::quantity(q).map(crate::units::ceil_u64)?;
    (bytes > 0).then(|| (q.0.clone(), bytes))
}

/// The pod's `ephemeral-storage` limit (upstream's `PodLimits`): app containers and sidecars summed, at least
/// any regular init container's; `None` when no container sets one.
fn pod_limit(pod: &Pod) -> Option<u64> {
    let spec = pod.spec.as_ref()?;
    let init = spec.init_containers.iter().flatten();
    let running = spec.containers.iter().chain(init.clone().filter(|c| is_sidecar(c)));
    let limits: Vec<u64> = running.filter_map(|c| limit(c).map(|(_, b)| b)).collect();
    let init_max = init.filter(|c| !is_sidecar(c)).filter_map(|c| limit(c).map(|(_, b)| b)).max();
    if limits.is_empty() && init_max.is_none() {
        return None;
    }
    Some(limits.iter().sum::<u64>().max(init_max.unwrap_or(0)))
}

/// Why `pod` must be evicted for its local storage, if it must: (upstream's eviction signal, message).
pub fn violation(pod: &Pod, stats: &PodStats) -> Option<(&'static str, String)> {
    let spec = pod.spec.as_ref()?;
    for volume in spec.volumes.iter().flatten() {
        let Some(empty_dir) = &volume.empty_dir else { continue };
        if empty_dir.medium.as_deref() == Some("Memory") {
            continue;
        }
        let Some(size) = &empty_dir.size_limit else { continue };
        let Some(bytes) = crate::pods::resources::quantity(size).map(crate::units::ceil_u64).filter(|b| *b > 0) else {
            continue;
        };
        let used = stats.volume_stats.iter().find(|v| v.name == volume.name).and_then(|v| v.fs.used_bytes);
        if used.is_some_and(|u| u > bytes) {
            let message = format!("Usage of EmptyDir volume {:?} exceeds the limit {:?}. ", volume.name, size.0);
            return Some(("emptydirfs.limit", message));
        }
    }
    if let Some(limit) = pod_limit(pod) {
        let used = stats.ephemeral_storage.as_ref().and_then(|e| e.used_bytes).unwrap_or(0);
        if used > limit {
            let message = format!(
                "Pod ephemeral local storage usage exceeds the total limit of containers {}. ",
                binary_quantity(limit)
            );
            return Some(("ephemeralpodfs.limit", message));
        }
    }
    let limited = spec.containers.iter().chain(spec.init_containers.iter().flatten().filter(|c| is_sidecar(c)));
    for c in limited {
        let Some((written, bytes)) = limit(c) else { continue };
        let Some(cs) = stats.containers.iter().find(|cs| cs.name == c.name) else { continue };
        let used = cs.rootfs.as_ref().and_then(|f| f.used_bytes).unwrap_or(0)
            + cs.logs.as_ref().and_then(|f| f.used_bytes).unwrap_or(0);
        if used > bytes {
            let message = format!("Container {} exceeded its local ephemeral storage limit {written:?}. ", c.name);
            return Some(("ephemeralcontainerfs.limit", message));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "uid": "u"}, "spec": spec})).unwrap()
    }

    fn stats(volume: (&str, u64), pod_used: u64, container: (u64, u64)) -> PodStats {
        let fs = |used: u64| serde_json::json!({"time": "2026-01-01T00:00:00Z", "usedBytes": used});
        serde_json::from_value(serde_json::json!({
            "podRef": {"name": "p", "namespace": "default", "uid": "u"},
            "containers": [{"name": "main", "rootfs": fs(container.0), "logs": fs(container.1)}],
            "volume": [{"name": volume.0, "time": "2026-01-01T00:00:00Z", "usedBytes": volume.1}],
            "ephemeral-storage": fs(pod_used),
        }))
        .unwrap()
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn an_empty_dir_past_its_size_limit() {
        let p = pod(serde_json::json!({"volumes": [{"name": "data", "emptyDir": {"sizeLimit": "8Mi"}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}],
            "containers": [{"name": "main"}]}));
        assert_eq!(violation(&p, &stats(("data", 8 * MIB), 8 * MIB, (0, 0))), None);
        assert_eq!(
            violation(&p, &stats(("data", 9 * MIB), 9 * MIB, (0, 0))),
            Some(("emptydirfs.limit", "Usage of EmptyDir volume \"data\" exceeds the limit \"8Mi\". ".into()))
        );
        assert_eq!(violation(&p, &stats(("shm", 9 * MIB), 0, (0, 0))), None, "tmpfs enforces its own size");
    }

    #[test]
    fn pod_and_container_limits() {
        let p = pod(serde_json::json!({"containers": [
            {"name": "main", "resources": {"limits": {"ephemeral-storage": "4Mi"}}},
            {"name": "side", "resources": {"limits": {"ephemeral-storage": "4Mi"}}}]}));
        assert_eq!(violation(&p, &stats(("x", 0), 8 * MIB, (3 * MIB, 0))), None);
        assert_eq!(
            violation(&p, &stats(("x", 0), 9 * MIB, (3 * MIB, 0))),
            Some((
                "ephemeralpodfs.limit",
                "Pod ephemeral local storage usage exceeds the total limit of containers 8Mi. ".into()
            ))
        );
        assert_eq!(
            violation(&p, &stats(("x", 0), 5 * MIB, (4 * MIB, MIB))),
            Some((
                "ephemeralcontainerfs.limit",
                "Container main exceeded its local ephemeral storage limit \"4Mi\". ".into()
            ))
        );
        let unlimited = pod(serde_json::json!({"containers": [{"name": "main"}]}));
        assert_eq!(violation(&unlimited, &stats(("x", 0), 900 * MIB, (900 * MIB, 0))), None);
    }
}
