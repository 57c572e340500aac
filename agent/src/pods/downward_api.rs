//! The downward API: a pod's own fields and its containers' resources as text, for environment variables
//! (`fieldRef`, `resourceFieldRef`) and downwardAPI volume files, with upstream's formats.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow};
use k8s_openapi::api::core::v1::{Pod, ResourceFieldSelector};

use super::resources::quantity;

/// The node's and the pod's addresses.
pub struct Ips<'a> {
    pub host: &'a str,
    /// The pod's address on the pod network (`None` before the network is set up, and for hostNetwork pods).
    pub pod: Option<&'a str>,
}

/// Node allocatable, the value of a limit a container does not set (upstream's `MergeContainerResourceLimits`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocatable {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub ephemeral_storage_bytes: u64,
}

/// A `fieldRef` path's value. `volume`: for a downwardAPI volume file, where whole label and annotation maps
/// may be projected (env vars may only name one key).
pub fn field_value(pod: &Pod, path: &str, ips: &Ips<'_>, volume: bool) -> Result<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let one = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref().and_then(|m| m.get(key)).cloned().unwrap_or_default()
    };
    if let Some(key) = path.strip_prefix("metadata.labels['").and_then(|k| k.strip_suffix("']")) {
        return Ok(one(&meta.labels, key));
    }
    if let Some(key) = path.strip_prefix("metadata.annotations['").and_then(|k| k.strip_suffix("']")) {
        return Ok(one(&meta.annotations, key));
    }
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" if volume => format_map(meta.labels.as_ref()),
        "metadata.annotations" if volume => format_map(meta.annotations.as_ref()),
        "spec.nodeName" if !volume => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" if !volume => spec.and_then(|s| s.service_account_name.clone()).unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" if !volume => ips.host.to_string(),
        "status.podIP" | "status.podIPs" if !volume => {
            if spec.and_then(|s| s.host_network).unwrap_or(false) {
                ips.host.to_string()
            } else {
                ips.pod.unwrap_or_default().to_string()
            }
        }
        other => return Err(anyhow!("unsupported fieldPath: {other}")),
    })
}

/// `key="value"` lines, keys sorted, values quoted as Go's `%q` (upstream's `FormatMap`).
pub fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter().flatten().map(|(k, v)| format!("{k}={}", go_quote(v))).collect::<Vec<_>>().join("\n")
}

/// Go's `strconv.Quote` for the characters labels and annotations hold.
fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A `resourceFieldRef`'s value for container `container` (the ref's own `containerName` wins): the request or
/// limit divided by the divisor, rounded up; a limit the container does not set is node allocatable.
pub fn resource_value(
    pod: &Pod,
    container: &str,
    r: &ResourceFieldSelector,
    allocatable: &Allocatable,
) -> Result<String> {
    let name = r.container_name.as_deref().filter(|n| !n.is_empty()).unwrap_or(container);
    let spec = pod.spec.as_ref().ok_or_else(|| anyhow!("the pod has no spec"))?;
    let c = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .ok_or_else(|| anyhow!("container {name} not found"))?;
    let (kind, resource) =
        r.resource.split_once('.').ok_or_else(|| anyhow!("unsupported container resource : {}", r.resource))?;
    let res = c.resources.as_ref();
    let map = match kind {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => return Err(anyhow!("unsupported container resource : {}", r.resource)),
    };
    let set = map.and_then(|m| m.get(resource)).and_then(quantity);
    let divisor = r.divisor.as_ref().and_then(quantity).filter(|d| *d > 0.0).unwrap_or(1.0);
    // A container without a limit of its own is bounded by the pod-level limit, else by the node (upstream).
    let level = crate::pods::resources::pod_level(pod).unwrap_or_default();
    let pod_cpu = level.cpu_limit_millis.map(|m| m as f64 / 1000.0);
    let pod_memory = level.memory_limit_bytes.map(|b| b as f64);
    let value = match (resource, kind) {
        ("cpu", "limits") => set.or(pod_cpu).unwrap_or(allocatable.cpu_millis as f64 / 1000.0),
        ("memory", "limits") => set.or(pod_memory).unwrap_or(allocatable.memory_bytes as f64),
        ("ephemeral-storage", "limits") => set.unwrap_or(allocatable.ephemeral_storage_bytes as f64),
        ("cpu" | "memory" | "ephemeral-storage", _) => set.unwrap_or(0.0),
        (h, _) if h.starts_with("hugepages-") => set.unwrap_or(0.0),
        _ => return Err(anyhow!("unsupported container resource : {}", r.resource)),
    };
    // CPU in millicores over the divisor's millicores, as upstream (so `1m` divisors count millicores).
    let out = if resource == "cpu" {
        ((value * 1000.0).round() / (divisor * 1000.0).round()).ceil()
    } else {
        (value / divisor).ceil()
    };
    Ok(format!("{}", crate::units::ceil_i64(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1",
                         "labels": {"b": "two", "a": "o\"ne"}, "annotations": {"x": "line\nbreak"}},
            "spec": {"containers": [
                {"name": "c", "resources": {"limits": {"cpu": "250m", "memory": "64Mi"}, "requests": {"cpu": "100m"}}},
                {"name": "bare"}
            ]}
        }))
        .unwrap()
    }

    fn rf(resource: &str, divisor: Option<&str>) -> ResourceFieldSelector {
        ResourceFieldSelector {
            resource: resource.into(),
            divisor: divisor.map(|d| k8s_openapi::apimachinery::pkg::api::resource::Quantity(d.into())),
            container_name: None,
        }
    }

    #[test]
    fn fields_and_maps_as_upstream_formats_them() {
        let ips = Ips { host: "10.0.0.1", pod: Some("10.1.0.5") };
        let p = pod();
        assert_eq!(field_value(&p, "metadata.labels", &ips, true).unwrap(), "a=\"o\\\"ne\"\nb=\"two\"");
        assert_eq!(field_value(&p, "metadata.annotations", &ips, true).unwrap(), "x=\"line\\nbreak\"");
        assert_eq!(field_value(&p, "metadata.labels['b']", &ips, false).unwrap(), "two");
        assert_eq!(field_value(&p, "status.podIP", &ips, false).unwrap(), "10.1.0.5");
        assert!(field_value(&p, "status.podIP", &ips, true).is_err(), "not a volume field");
        assert!(field_value(&p, "metadata.labels", &ips, false).is_err(), "not an env field");
    }

    #[test]
    fn resources_with_divisors_and_allocatable_defaults() {
        let p = pod();
        let alloc = Allocatable { cpu_millis: 2000, memory_bytes: 8 << 30, ephemeral_storage_bytes: 0 };
        assert_eq!(resource_value(&p, "c", &rf("limits.cpu", None), &alloc).unwrap(), "1");
        assert_eq!(resource_value(&p, "c", &rf("limits.cpu", Some("1m")), &alloc).unwrap(), "250");
        assert_eq!(resource_value(&p, "c", &rf("requests.cpu", Some("1m")), &alloc).unwrap(), "100");
        assert_eq!(resource_value(&p, "c", &rf("limits.memory", Some("1Mi")), &alloc).unwrap(), "64");
        assert_eq!(resource_value(&p, "bare", &rf("limits.cpu", None), &alloc).unwrap(), "2");
        assert_eq!(resource_value(&p, "bare", &rf("limits.memory", None), &alloc).unwrap(), (8u64 << 30).to_string());
        assert_eq!(resource_value(&p, "bare", &rf("requests.memory", None), &alloc).unwrap(), "0");
        assert!(resource_value(&p, "c", &rf("limits.gpu", None), &alloc).is_err());
        let mut other = rf("limits.memory", Some("1Mi"));
        other.container_name = Some("c".into());
        assert_eq!(resource_value(&p, "bare", &other, &alloc).unwrap(), "64");
        // A pod-level limit bounds a container without its own, before the node does.
        let mut bounded = pod();
        bounded.spec.as_mut().expect("spec").resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
            limits: Some(
                [("memory".to_string(), k8s_openapi::apimachinery::pkg::api::resource::Quantity("32Mi".into()))].into(),
            ),
            ..Default::default()
        });
        assert_eq!(resource_value(&bounded, "bare", &rf("limits.memory", Some("1Mi")), &alloc).unwrap(), "32");
        assert_eq!(resource_value(&bounded, "bare", &rf("limits.cpu", None), &alloc).unwrap(), "2");
        assert_eq!(resource_value(&bounded, "c", &rf("limits.memory", Some("1Mi")), &alloc).unwrap(), "64");
    }
}
