//! Events about pods, as the kubelet records them (`source.component: kubelet`, `reportingComponent: kubelet`),
//! created in the background: a failed Event never blocks or fails pod work.

use crate::pods::state::Kind;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Api;
use kube::api::PostParams;

/// The pod (and container) an Event is about.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// From the manifest folder: the API server holds only its mirror pod (same name, another UID).
    pub static_pod: bool,
}

impl PodRef {
    pub fn of(pod: &k8s_openapi::api::core::v1::Pod) -> PodRef {
        PodRef {
            namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            static_pod: crate::sources::mirror::is_static(pod),
        }
    }
}

/// Sends Events to the API server (or only logs them in standalone mode).
#[derive(Clone)]
pub struct Recorder {
    client: Option<kube::Client>,
    node: String,
}

impl Recorder {
    pub fn new(client: Option<kube::Client>, node: String) -> Recorder {
        Recorder { client, node }
    }

    /// Records an Event; `container` sets `fieldPath` to `spec.containers{name}` (or `spec.initContainers`).
    pub fn record(&self, pod: &PodRef, container: Option<(&str, Kind)>, warning: bool, reason: &str, message: &str) {
        let kind = if warning { "Warning" } else { "Normal" };
        tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), reason, kind, "{message}");
        let Some(client) = self.client.clone() else { return };
        let now = Time(jiff::Timestamp::now());
        let field_path = container.map(|(name, kind)| format!("spec.{}{{{name}}}", kind.field()));
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", pod.name)),
                namespace: Some(pod.namespace.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                namespace: Some(pod.namespace.clone()),
                name: Some(pod.name.clone()),
                uid: Some(pod.uid.clone()),
                field_path,
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(kind.into()),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            source: Some(EventSource { component: Some("kubelet".into()), host: Some(self.node.clone()) }),
            reporting_component: Some("kubelet".into()),
            reporting_instance: Some(self.node.clone()),
            ..Default::default()
        };
        let namespace = pod.namespace.clone();
        tokio::spawn(async move {
            let events: Api<Event> = Api::namespaced(client, &namespace);
            if let Err(e) = events.create(&PostParams::default(), &event).await {
                tracing::debug!(error = %e, "recording an event failed");
            }
        });
    }
}
