//! Pods bound to this node, from the API server: a watch on `spec.nodeName=<node>` (kube-runtime's watcher:
//! re-lists after a 410 Gone or an API server restart, with back-off), turned into upserts and removals.

use std::collections::HashSet;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;

use super::SourceEvent;

/// Runs until the receiver is gone.
pub async fn watch(client: kube::Client, node: String, tx: mpsc::Sender<SourceEvent>) {
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher(pods, config).default_backoff().boxed();
    let mut known: HashSet<String> = HashSet::new();
    let mut relisted: HashSet<String> = HashSet::new();
    let mut synced = false;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; retrying");
                continue;
            }
        };
        // Mirror pods are this node's own copies of static pods: shown, never run.
        let event = match event {
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) | watcher::Event::Delete(pod)
                if super::mirror::is_mirror(&pod) =>
            {
                continue;
            }
            other => other,
        };
        let sent = match event {
            watcher::Event::Init => {
                relisted.clear();
                Ok(())
            }
            watcher::Event::InitApply(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                relisted.insert(uid.clone());
                known.insert(uid);
                tx.send(SourceEvent::Upsert(Box::new(pod))).await
            }
            watcher::Event::InitDone => {
                let gone: Vec<String> = known.difference(&relisted).cloned().collect();
                let mut result = Ok(());
                for uid in gone {
                    known.remove(&uid);
                    result = result.and(tx.send(SourceEvent::Remove { uid }).await);
                }
                if !synced {
                    synced = true;
                    result = result.and(tx.send(SourceEvent::Synced).await);
                }
                result
            }
            watcher::Event::Apply(pod) => {
                known.insert(pod.metadata.uid.clone().unwrap_or_default());
                tx.send(SourceEvent::Upsert(Box::new(pod))).await
            }
            watcher::Event::Delete(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                known.remove(&uid);
                tx.send(SourceEvent::Remove { uid }).await
            }
        };
        if sent.is_err() {
            return;
        }
    }
}
