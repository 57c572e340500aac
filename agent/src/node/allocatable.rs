//! Node allocatable, upstream's formula: capacity − `kubeReserved` − `systemReserved` − the hard eviction
//! threshold of the resource (`memory.available` for memory, `nodefs.available` for ephemeral storage), never
//! below zero. Pure; the node status and admission both use it.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::pods::resources::quantity;

/// Upstream's default hard eviction thresholds (Linux).
pub const DEFAULT_EVICTION_HARD: &[(&str, &str)] = &[
    ("memory.available", "100Mi"),
    ("nodefs.available", "10%"),
    ("nodefs.inodesFree", "5%"),
    ("imagefs.available", "15%"),
];

/// Capacity or allocatable in the kubelet's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub ephemeral_storage_bytes: u64,
}

/// A reservation map (`cpu: 500m`, `memory: 1Gi`...) read for one resource.
fn reserved(map: &BTreeMap<String, String>, name: &str, scale: f64) -> Result<u64> {
    let Some(value) = map.get(name) else { return Ok(0) };
    let v = quantity(&Quantity(value.clone())).with_context(|| format!("invalid quantity {value:?} for {name}"))?;
    if v < 0.0 {
        bail!("negative reservation {value:?} for {name}");
    }
    Ok(crate::units::ceil_u64(v * scale))
}

/// An eviction threshold: a quantity, or a percentage of `capacity` (0 when not set).
pub fn threshold(thresholds: &BTreeMap<String, String>, signal: &str, capacity: u64) -> Result<u64> {
    thresholds.get(signal).map_or(Ok(0), |value| threshold_value(value, signal, capacity))
}

/// One eviction threshold value of `signal`: a quantity, or a percentage of `capacity`.
pub fn threshold_value(value: &str, signal: &str, capacity: u64) -> Result<u64> {
    if let Some(percent) = value.strip_suffix('%') {
        let p: f64 = percent
            .parse()
            .ok()
            .filter(|p| (0.0..=100.0).contains(p))
            .with_context(|| format!("invalid eviction threshold {value:?} for {signal}"))?;
        return Ok(crate::units::ceil_u64(capacity as f64 * p / 100.0));
    }
    let v = quantity(&Quantity(value.to_string())).with_context(|| format!("invalid eviction threshold {value:?}"))?;
    Ok(crate::units::ceil_u64(v))
}

/// The eviction thresholds in force: the configured ones, else upstream's defaults.
pub fn eviction_hard(configured: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    configured
        .cloned()
        .unwrap_or_else(|| DEFAULT_EVICTION_HARD.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

/// Allocatable from capacity, reservations and hard eviction thresholds.
pub fn allocatable(
    capacity: Resources,
    kube_reserved: &BTreeMap<String, String>,
    system_reserved: &BTreeMap<String, String>,
    eviction_hard: &BTreeMap<String, String>,
) -> Result<Resources> {
    let held = |name: &str, scale: f64| -> Result<u64> {
        Ok(reserved(kube_reserved, name, scale)? + reserved(system_reserved, name, scale)?)
    };
    let memory_eviction = threshold(eviction_hard, "memory.available", capacity.memory_bytes)?;
    let storage_eviction = threshold(eviction_hard, "nodefs.available", capacity.ephemeral_storage_bytes)?;
    Ok(Resources {
        cpu_millis: capacity.cpu_millis.saturating_sub(held("cpu", 1000.0)?),
        memory_bytes: capacity.memory_bytes.saturating_sub(held("memory", 1.0)? + memory_eviction),
        ephemeral_storage_bytes: capacity
            .ephemeral_storage_bytes
            .saturating_sub(held("ephemeral-storage", 1.0)? + storage_eviction),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn allocatable_subtracts_reservations_and_hard_eviction() {
        let capacity = Resources { cpu_millis: 2000, memory_bytes: 8 * GIB, ephemeral_storage_bytes: 100 * GIB };
        let defaults = eviction_hard(None);
        let a = allocatable(capacity, &map(&[]), &map(&[]), &defaults).unwrap();
        assert_eq!(a.cpu_millis, 2000);
        assert_eq!(a.memory_bytes, 8 * GIB - 100 * 1024 * 1024);
        assert_eq!(a.ephemeral_storage_bytes, 90 * GIB);
        let kube = map(&[("cpu", "100m"), ("memory", "1Gi")]);
        let system = map(&[("cpu", "0.4"), ("memory", "512Mi"), ("ephemeral-storage", "10Gi")]);
        let a = allocatable(capacity, &kube, &system, &map(&[("memory.available", "5%")])).unwrap();
        assert_eq!(a.cpu_millis, 1500);
        assert_eq!(a.memory_bytes, 8 * GIB - GIB - GIB / 2 - (8 * GIB).div_ceil(20));
        assert_eq!(a.ephemeral_storage_bytes, 90 * GIB, "no nodefs threshold configured");
        // Never below zero; bad values are errors, not silently dropped.
        let huge = map(&[("cpu", "64")]);
        assert_eq!(allocatable(capacity, &huge, &map(&[]), &defaults).unwrap().cpu_millis, 0);
        assert!(allocatable(capacity, &map(&[("memory", "12 parsecs")]), &map(&[]), &defaults).is_err());
        assert!(allocatable(capacity, &map(&[("memory", "-1Gi")]), &map(&[]), &defaults).is_err());
        assert!(allocatable(capacity, &map(&[]), &map(&[]), &map(&[("memory.available", "150%")])).is_err());
    }
}
