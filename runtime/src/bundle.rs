//! A container's bundle: its OCI spec as `config.json`, with what the host prepares for it.

use std::path::{Path, PathBuf};

use crate::cgroup::Layout;
use crate::cgroupfs::{Plan, View};
use crate::config::ContainerConfig;
use crate::error::RuntimeError;
use crate::user::ProcessUser;
use crate::{spec, state};

/// Builds the container's spec and writes it to `<root>/bundles/<id>/config.json`; on v1 and hybrid hosts
/// (`cgroupfs` planned) with the container's cgroupfs assembled on the host, to be dropped once the init has its
/// own copy. Returns the bundle directory and the user the process runs as.
pub(crate) fn write(
    root: &Path,
    layout: Layout,
    cfg: &ContainerConfig,
    cgroupfs: Option<&Plan>,
) -> Result<(PathBuf, Option<View>, ProcessUser), RuntimeError> {
    let mut spec = spec::build(cfg)?;
    let user = spec.process().as_ref().map(|p| p.user()).map_or_else(ProcessUser::default, |u| ProcessUser {
        uid: u.uid(),
        gid: u.gid(),
        additional_gids: u.additional_gids().clone().unwrap_or_default(),
    });
    if layout == Layout::Unified && cfg.resources.oom_group {
        let unified = [("memory.oom.group".to_string(), "1".to_string())].into_iter().collect();
        if let Some(resources) = spec.linux_mut().as_mut().and_then(|l| l.resources_mut().as_mut()) {
            resources.set_unified(Some(unified));
        }
    }
    let view = match cgroupfs {
        Some(plan) => plan.replace_mount(&mut spec, &root.join("cgroupfs").join(&cfg.id)).map_err(|e| {
            RuntimeError::Create { id: cfg.id.clone(), message: format!("preparing its /sys/fs/cgroup: {e}") }
        })?,
        None => None,
    };
    let bundle = root.join("bundles").join(&cfg.id);
    let json = serde_json::to_vec_pretty(&spec).map_err(|e| RuntimeError::Zygote(e.to_string()))?;
    state::write_atomic(&bundle.join("config.json"), &json)?;
    Ok((bundle, view, user))
}
