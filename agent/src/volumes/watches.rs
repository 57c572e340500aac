//! Live updates of configMap and secret volumes: one watch per ConfigMap or Secret that this node's pods mount,
//! on that object alone (`fieldSelector=metadata.name=<name>`, the only watch the Node authorizer allows a
//! node), shared by the pods that use it. A change wakes those pods' workers, which bring their volumes up to
//! date at once (upstream's kubelet takes up to its sync period plus a cache TTL, about a minute).
//!
//! ClusterTrustBundles are cluster-scoped and selected by signer and labels, so they get one list-watch of
//! them all, started by the first pod that projects one and kept while the agent runs (as upstream's lazy
//! informer); any change wakes every pod that projects one.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;

/// A watched object: (is a Secret, namespace, name).
pub type Key = (bool, String, String);

struct Watch {
    users: BTreeSet<String>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    watches: HashMap<Key, Watch>,
    /// Each pod's wake-up.
    pods: HashMap<String, Arc<Notify>>,
    /// The pods that project ClusterTrustBundles, and the bundles once their watch started.
    trust_bundle_users: BTreeSet<String>,
    trust_bundles: Option<Store<ClusterTrustBundle>>,
}

/// The object watches of this node's pods.
#[derive(Default)]
pub struct ObjectWatches {
    state: Arc<Mutex<State>>,
}

impl ObjectWatches {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pod's wake-up: notified when an object one of its volumes shows changes.
    pub fn changes(&self, uid: &str) -> Arc<Notify> {
        self.lock().pods.entry(uid.to_string()).or_default().clone()
    }

    /// Sets the objects pod `uid` uses: watches start for new ones and stop for those no pod uses any more.
    pub fn set(&self, client: &kube::Client, uid: &str, keys: BTreeSet<Key>) {
        let mut state = self.lock();
        state.pods.entry(uid.to_string()).or_default();
        let mut stopped = Vec::new();
        for (key, watch) in state.watches.iter_mut() {
            if !keys.contains(key) && watch.users.remove(uid) && watch.users.is_empty() {
                stopped.push(key.clone());
            }
        }
        for key in stopped {
            if let Some(w) = state.watches.remove(&key) {
                w.task.abort();
            }
        }
        for key in keys {
            if let Some(w) = state.watches.get_mut(&key) {
                w.users.insert(uid.to_string());
                continue;
            }
            let task = tokio::spawn(watch(client.clone(), key.clone(), self.state.clone()));
            state.watches.insert(key, Watch { users: BTreeSet::from([uid.to_string()]), task });
        }
    }

    /// Every ClusterTrustBundle, for pod `uid`, which from now on is woken when one changes. The first call
    /// starts the watch; a watch that has not listed them within 10 s is upstream's error (retried).
    pub async fn trust_bundles(
        &self,
        client: &kube::Client,
        uid: &str,
    ) -> Result<Vec<Arc<ClusterTrustBundle>>, String> {
        let store = {
            let mut state = self.lock();
            state.trust_bundle_users.insert(uid.to_string());
            match &state.trust_bundles {
                Some(store) => store.clone(),
                None => {
                    let (store, writer) = reflector::store();
                    tokio::spawn(watch_trust_bundles(client.clone(), writer, self.state.clone()));
                    state.trust_bundles = Some(store.clone());
                    store
                }
            }
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), store.wait_until_ready()).await {
            Ok(Ok(())) => Ok(store.state()),
            _ => Err("ClusterTrustBundle informer has not yet synced".into()),
        }
    }

    /// The pod is gone: its watches stop unless another pod uses them.
    pub fn forget(&self, uid: &str) {
        let mut state = self.lock();
        state.pods.remove(uid);
        state.trust_bundle_users.remove(uid);
        state.watches.retain(|_, w| {
            w.users.remove(uid);
            if w.users.is_empty() {
                w.task.abort();
            }
            !w.users.is_empty()
        });
    }
}

/// Watches one object until aborted, waking its users on every change after the first listing.
async fn watch(client: kube::Client, key: Key, state: Arc<Mutex<State>>) {
    let (secret, namespace, name) = key.clone();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = if secret {
        watcher(Api::<Secret>::namespaced(client, &namespace), config).default_backoff().map(|e| e.map(|_| ())).boxed()
    } else {
        watcher(Api::<ConfigMap>::namespaced(client, &namespace), config)
            .default_backoff()
            .map(|e| e.map(|_| ()))
            .boxed()
    };
    while let Some(event) = events.next().await {
        if let Err(e) = event {
            tracing::debug!(object = %name, error = %e, "watching a volume's object (retried)");
            continue;
        }
        let state = state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = state.watches.get(&key) else { return };
        for uid in &w.users {
            if let Some(notify) = state.pods.get(uid) {
                notify.notify_one();
            }
        }
    }
}

/// Keeps `writer` a copy of every ClusterTrustBundle, waking their users on every change after the first listing.
async fn watch_trust_bundles(
    client: kube::Client,
    writer: reflector::store::Writer<ClusterTrustBundle>,
    state: Arc<Mutex<State>>,
) {
    let stream = watcher(Api::<ClusterTrustBundle>::all(client), watcher::Config::default()).default_backoff();
    let mut events = reflector::reflector(writer, stream).boxed();
    while let Some(event) = events.next().await {
        match event {
            Err(e) => tracing::debug!(error = %e, "watching ClusterTrustBundles (retried)"),
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(_) => {
                let state = state.lock().unwrap_or_else(|e| e.into_inner());
                for uid in &state.trust_bundle_users {
                    if let Some(notify) = state.pods.get(uid) {
                        notify.notify_one();
                    }
                }
            }
        }
    }
}
