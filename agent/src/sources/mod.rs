//! Pod sources: the API server (pods with `spec.nodeName=<node>`) and the static manifest folder, merged into
//! one stream of desired pods for the pod workers.

pub mod api;
pub mod file;
pub mod mirror;

use k8s_openapi::api::core::v1::Pod;

/// A change in the desired set.
#[derive(Debug)]
pub enum SourceEvent {
    /// A pod to run (new, or a newer version of one already running).
    Upsert(Box<Pod>),
    /// A pod that is gone from its source.
    Remove { uid: String },
    /// The source has delivered its first complete set of pods (upstream's "sources ready").
    Synced,
}
