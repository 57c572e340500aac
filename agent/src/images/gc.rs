//! Image garbage collection like upstream's image GC manager: when the image filesystem is at or above
//! `imageGCHighThresholdPercent`, remove images nobody uses, least recently used first, until usage is down to
//! `imageGCLowThresholdPercent`. Images younger than `imageMinimumGCAge` and images any container uses stay.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use super::digest::Digest;
use super::error::{ImageError, Result};
use super::store::{Store, now_secs};

/// KubeletConfiguration's image GC fields, with upstream defaults.
#[derive(Debug, Clone, Copy)]
pub struct GcPolicy {
    pub high_threshold_percent: u8,
    pub low_threshold_percent: u8,
    pub minimum_age: Duration,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy { high_threshold_percent: 85, low_threshold_percent: 80, minimum_age: Duration::from_secs(120) }
    }
}

impl GcPolicy {
    /// Upstream's validation: thresholds within 0..=100 and low below high.
    pub fn validate(&self) -> Result<(), String> {
        if self.high_threshold_percent > 100 || self.low_threshold_percent > 100 {
            return Err("imageGC thresholds must be between 0 and 100".into());
        }
        if self.low_threshold_percent >= self.high_threshold_percent && self.high_threshold_percent != 100 {
            return Err(format!(
                "imageGCLowThresholdPercent ({}) must be less than imageGCHighThresholdPercent ({})",
                self.low_threshold_percent, self.high_threshold_percent
            ));
        }
        Ok(())
    }
}

/// What one collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub usage_percent_before: u64,
    pub bytes_to_free: u64,
    pub bytes_freed: u64,
    pub removed: Vec<Digest>,
}

/// Usage of the filesystem holding `path`: (used bytes, capacity bytes).
pub fn filesystem_usage(path: &Path) -> Result<(u64, u64)> {
    let s = rustix::fs::statvfs(path).map_err(|e| ImageError::io("statvfs", path, e.into()))?;
    let capacity = s.f_blocks * s.f_frsize;
    let available = s.f_bavail * s.f_frsize;
    Ok((capacity.saturating_sub(available), capacity))
}

/// Runs one collection. `in_use` are the manifests of images some container (running or not) refers to.
pub fn collect(store: &Store, policy: &GcPolicy, in_use: &HashSet<Digest>) -> Result<GcReport> {
    let (used, capacity) = filesystem_usage(store.root())?;
    let mut report = GcReport { usage_percent_before: used * 100 / capacity.max(1), ..Default::default() };
    if report.usage_percent_before < u64::from(policy.high_threshold_percent) {
        return Ok(report);
    }
    report.bytes_to_free = used.saturating_sub(capacity * u64::from(policy.low_threshold_percent) / 100);
    let now = now_secs();
    let mut candidates: Vec<_> = store
        .images()?
        .into_iter()
        .filter(|r| !in_use.contains(&r.manifest))
        .filter(|r| now.saturating_sub(r.pulled_at) >= policy.minimum_age.as_secs())
        .collect();
    candidates.sort_by_key(|r| (r.last_used, r.pulled_at));
    for image in candidates {
        if report.bytes_freed >= report.bytes_to_free {
            break;
        }
        tracing::info!(image = %image.manifest, names = ?image.names, "image GC removes unused image");
        store.remove_record(&image.manifest)?;
        report.bytes_freed += store.sweep(&HashSet::new())?;
        report.removed.push(image.manifest);
    }
    Ok(report)
}
