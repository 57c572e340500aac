//! Service environment variables (`<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT`, docker-link `<NAME>_PORT_*`), as
//! upstream gives every container: the pod namespace's services when `enableServiceLinks` (default true), and
//! always the `kubernetes` service of the `default` namespace.

use std::collections::BTreeMap;

use anyhow::Result;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};

/// The variables of `services`, in upstream's order (services by name, each one's variables together).
pub fn from_services(services: &[Service]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for service in services {
        let spec = service.spec.clone().unwrap_or_default();
        let Some(ip) = spec.cluster_ip.filter(|ip| !ip.is_empty() && ip != "None") else { continue };
        let name = env_name(service.metadata.name.as_deref().unwrap_or_default());
        let ports = spec.ports.unwrap_or_default();
        out.push((format!("{name}_SERVICE_HOST"), ip.clone()));
        let Some(first) = ports.first() else { continue };
        out.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        for port in ports.iter().filter(|p| p.name.as_deref().is_some_and(|n| !n.is_empty())) {
            let port_name = env_name(port.name.as_deref().unwrap_or_default());
            out.push((format!("{name}_SERVICE_PORT_{port_name}"), port.port.to_string()));
        }
        let protocol = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
        out.push((format!("{name}_PORT"), format!("{}://{ip}:{}", protocol(first).to_lowercase(), first.port)));
        for port in &ports {
            let proto = protocol(port);
            let prefix = format!("{name}_PORT_{}_{}", port.port, proto.to_uppercase());
            out.push((prefix.clone(), format!("{}://{ip}:{}", proto.to_lowercase(), port.port)));
            out.push((format!("{prefix}_PROTO"), proto.to_lowercase()));
            out.push((format!("{prefix}_PORT"), port.port.to_string()));
            out.push((format!("{prefix}_ADDR"), ip.clone()));
        }
    }
    out
}

fn env_name(name: &str) -> String {
    name.to_uppercase().replace('-', "_")
}

/// The cluster's Services, kept current by a watch (the kubelet's service lister): container starts read it
/// instead of asking the API server.
#[derive(Clone)]
pub struct ServiceCache {
    store: reflector::Store<Service>,
}

impl ServiceCache {
    /// Starts the watch (it re-lists and retries with back-off on its own).
    pub fn start(client: kube::Client) -> ServiceCache {
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(Api::<Service>::all(client), watcher::Config::default()))
            .default_backoff()
            .touched_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::debug!(error = %e, "service watch failed; retrying");
                }
            }
        });
        ServiceCache { store }
    }

    /// The services whose variables a pod's containers get; waits for the first list (like upstream, which
    /// refuses to build environments before services were read once).
    pub async fn services_for(&self, pod: &Pod) -> Result<Vec<Service>> {
        tokio::time::timeout(std::time::Duration::from_secs(30), self.store.wait_until_ready())
            .await
            .map_err(|_| anyhow::anyhow!("services have not yet been read at least once"))?
            .map_err(|e| anyhow::anyhow!("service watch: {e}"))?;
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let links = pod.spec.as_ref().and_then(|s| s.enable_service_links).unwrap_or(true);
        let mut by_name: BTreeMap<String, Service> = BTreeMap::new();
        for service in self.store.state() {
            let ns = service.metadata.namespace.as_deref().unwrap_or_default();
            let name = service.metadata.name.clone().unwrap_or_default();
            // Always the master service; the pod namespace's own with service links.
            if ns == "default" && name == "kubernetes" {
                by_name.insert(name, (*service).clone());
            } else if ns == namespace && links {
                by_name.entry(name).or_insert_with(|| (*service).clone());
            }
        }
        Ok(by_name.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_like_upstream() {
        let services: Vec<Service> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "kubernetes"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}},
            {"metadata": {"name": "my-dns"}, "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53}]}},
            {"metadata": {"name": "headless"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}
        ]))
        .unwrap();
        let vars: BTreeMap<String, String> = from_services(&services).into_iter().collect();
        let get = |k: &str| vars.get(k).map(String::as_str);
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("10.96.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("443"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT_HTTPS"), Some("443"));
        assert_eq!(get("KUBERNETES_PORT"), Some("tcp://10.96.0.1:443"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP"), Some("tcp://10.96.0.1:443"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP_PROTO"), Some("tcp"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP_PORT"), Some("443"));
        assert_eq!(get("KUBERNETES_PORT_443_TCP_ADDR"), Some("10.96.0.1"));
        assert_eq!(get("MY_DNS_PORT"), Some("udp://10.96.0.10:53"));
        assert_eq!(get("MY_DNS_SERVICE_PORT_DNS_TCP"), Some("53"));
        assert_eq!(get("MY_DNS_PORT_53_UDP_PROTO"), Some("udp"));
        assert!(!vars.keys().any(|k| k.starts_with("HEADLESS")));
    }
}
