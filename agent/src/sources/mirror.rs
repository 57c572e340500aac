//! Mirror pods: the API server's read-only copy of each static pod (upstream's mirror client), so that
//! `kubectl get pods` shows what runs from the manifest folder. A mirror carries the annotation
//! `kubernetes.io/config.mirror: <static pod hash>`, is owned by the Node, is recreated if someone deletes it, is
//! replaced when its static pod changes and deleted when the manifest goes. Mirrors are never run: the API source
//! skips them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::watch;

pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
const SOURCE_ANNOTATION: &str = "kubernetes.io/config.source";
const HASH_ANNOTATION: &str = "kubernetes.io/config.hash";
/// How often mirrors are checked again without a change (a create or delete that failed is retried).
const RESYNC: Duration = Duration::from_secs(10);

/// Static pods by UID, as the file source last read them.
pub type StaticPods = BTreeMap<String, Pod>;

/// A pod from the manifest folder.
pub fn is_static(pod: &Pod) -> bool {
    annotation(pod, SOURCE_ANNOTATION) == Some("file")
}

/// A mirror of a static pod in the API server.
pub fn is_mirror(pod: &Pod) -> bool {
    annotation(pod, MIRROR_ANNOTATION).is_some()
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str)
}

/// The mirror to create for `static_pod`: its metadata and spec, the mirror annotation, owned by the Node.
fn mirror_of(static_pod: &Pod, node: &Node) -> Pod {
    let hash = annotation(static_pod, HASH_ANNOTATION).unwrap_or_default().to_string();
    let mut annotations = static_pod.metadata.annotations.clone().unwrap_or_default();
    annotations.insert(MIRROR_ANNOTATION.into(), hash);
    Pod {
        metadata: ObjectMeta {
            name: static_pod.metadata.name.clone(),
            namespace: static_pod.metadata.namespace.clone(),
            labels: static_pod.metadata.labels.clone(),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.metadata.name.clone().unwrap_or_default(),
                uid: node.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: static_pod.spec.clone(),
        status: None,
    }
}

/// Keeps the mirrors in step with the static pods until the file source is gone. The node's pods come from a
/// reflector (a watch of `spec.nodeName=<node>`), so a deleted mirror is seen, and recreated, as soon as the API
/// server says so, with no list every few seconds.
pub async fn run(client: kube::Client, node: String, mut statics: watch::Receiver<StaticPods>) {
    let (reader, writer) = reflector::store::<Pod>();
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = reflector::reflector(writer, watcher(Api::<Pod>::all(client.clone()), config).default_backoff());
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = changed.clone();
    let driver = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream.touched_objects());
        while let Some(event) = stream.next().await {
            // Only mirrors matter here; errors are retried by the watcher's back-off.
            if event.as_ref().is_ok_and(is_mirror) {
                notify.notify_one();
            }
        }
    });
    if reader.wait_until_ready().await.is_err() {
        return;
    }
    loop {
        let wanted = statics.borrow_and_update().clone();
        let mirrors: Vec<Pod> = reader.state().iter().filter(|p| is_mirror(p)).map(|p| Pod::clone(p)).collect();
        if let Err(e) = sync(&client, &node, &wanted, &mirrors).await {
            tracing::warn!(error = %format!("{e:#}"), "syncing mirror pods failed; retrying");
        }
        tokio::select! {
            changed = statics.changed() => if changed.is_err() { break },
            _ = changed.notified() => {}
            // A failed create or delete is tried again.
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
    driver.abort();
}

async fn sync(client: &kube::Client, node: &str, wanted: &StaticPods, mirrors: &[Pod]) -> anyhow::Result<()> {
    let key = |p: &Pod| (p.metadata.namespace.clone().unwrap_or_default(), p.metadata.name.clone().unwrap_or_default());
    let mut present: BTreeSet<(String, String)> = BTreeSet::new();
    for mirror in mirrors {
        let hash = annotation(mirror, MIRROR_ANNOTATION).unwrap_or_default();
        let current = wanted.values().any(|s| key(s) == key(mirror) && annotation(s, HASH_ANNOTATION) == Some(hash));
        if current && mirror.metadata.deletion_timestamp.is_none() {
            present.insert(key(mirror));
        } else {
            // Its static pod changed or went, or someone deletes it (gracefully, waiting for the node as every
            // pod does): the old mirror goes now, and a current one is created below.
            delete(client, mirror).await?;
        }
    }
    let mut node_object = None;
    for static_pod in wanted.values() {
        if present.contains(&key(static_pod)) {
            continue;
        }
        let node_object = match &node_object {
            Some(n) => n,
            None => node_object.insert(Api::<Node>::all(client.clone()).get(node).await?),
        };
        let (namespace, name) = key(static_pod);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        match pods.create(&PostParams::default(), &mirror_of(static_pod, node_object)).await {
            Ok(_) => tracing::info!(pod = %format!("{namespace}/{name}"), "mirror pod created"),
            // The old mirror is still terminating: the next round creates it.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "creating a mirror pod failed"),
        }
    }
    Ok(())
}

async fn delete(client: &kube::Client, mirror: &Pod) -> anyhow::Result<()> {
    let namespace = mirror.metadata.namespace.clone().unwrap_or_default();
    let name = mirror.metadata.name.clone().unwrap_or_default();
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions { uid: mirror.metadata.uid.clone(), resource_version: None }),
        ..Default::default()
    };
    match Api::<Pod>::namespaced(client.clone(), &namespace).delete(&name, &params).await {
        Ok(_) => tracing::info!(pod = %format!("{namespace}/{name}"), "mirror pod deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_copies_the_static_pod_and_is_owned_by_the_node() {
        let static_pod: Pod = serde_yaml::from_str(
            "metadata: {name: web-n1, namespace: default, uid: abc, labels: {app: web},\n  annotations: {kubernetes.io/config.source: file, kubernetes.io/config.hash: abc}}\nspec: {nodeName: n1, containers: [{name: main, image: busybox}]}\n",
        )
        .unwrap();
        let node: Node = serde_yaml::from_str("metadata: {name: n1, uid: node-uid}").unwrap();
        let mirror = mirror_of(&static_pod, &node);
        assert!(is_static(&static_pod) && !is_mirror(&static_pod));
        assert!(is_mirror(&mirror));
        assert_eq!(annotation(&mirror, MIRROR_ANNOTATION), Some("abc"));
        assert_eq!(mirror.metadata.uid, None, "the API server assigns the mirror its own UID");
        assert_eq!(mirror.metadata.labels, static_pod.metadata.labels);
        let owner = &mirror.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()), ("Node", "n1", "node-uid"));
        assert_eq!(mirror.spec.unwrap().node_name.as_deref(), Some("n1"));
    }
}
