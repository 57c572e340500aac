//! Pod networking: nodelet calls CNI itself on the sandbox's network namespace (upstream's kubelet asks the
//! runtime, which does the same). The network is the conf dir's first configuration, else nodelet's built-in
//! default (bridge `nodelet0` + host-local IPAM over the pod CIDR + portmap for hostPorts). Each attachment is
//! cached under `<root-dir>/network/` so that DEL (pod removal, or cleanup after a restart) releases exactly what
//! ADD took. Also writes the pod's `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname`.

pub mod cni;
pub mod dns;
pub mod netns;

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use cni::{Attachment, Cached, Cni, CniError, NetworkList};

/// Name of the built-in default network and its bridge.
pub const DEFAULT_NETWORK: &str = "nodelet";
pub const DEFAULT_BRIDGE: &str = "nodelet0";

/// Where the network comes from.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
    /// The default network's range (`podCIDR`).
    pub pod_cidr: String,
    /// `<root-dir>`: the cache, the default network's IPAM data and the pods' name files live under it.
    pub root_dir: PathBuf,
    pub dns: dns::NodeDns,
    pub node_name: String,
}

pub struct Network {
    config: NetworkConfig,
    cni: Cni,
}

/// The built-in network configuration list.
pub fn default_list(pod_cidr: &str, data_dir: &Path) -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0",
        "name": DEFAULT_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": DEFAULT_BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": data_dir,
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
}

impl Network {
    pub fn new(config: NetworkConfig) -> Network {
        let cni = Cni { bin_dirs: config.bin_dirs.clone() };
        Network { config, cni }
    }

    fn cache_path(&self, sandbox: &str) -> PathBuf {
        self.config.root_dir.join("network").join(format!("{sandbox}.json"))
    }

    /// The directory holding a pod's resolv.conf, hosts and hostname.
    pub fn files_dir(&self, uid: &str) -> PathBuf {
        self.config.root_dir.join("pod-files").join(uid)
    }

    /// The network to attach new pods to.
    pub fn list(&self) -> Result<NetworkList, CniError> {
        if let Some(list) = NetworkList::load_dir(&self.config.conf_dir)? {
            return Ok(list);
        }
        let data_dir = self.config.root_dir.join("cni").join("networks");
        let raw = default_list(&self.config.pod_cidr, &data_dir);
        NetworkList::parse(&raw.to_string(), Path::new("(built-in default network)"))
    }

    /// Whether pods can be attached: the network configuration loads and every plugin it names is installed
    /// (else the node is not Ready, as upstream's "cni plugin not initialized").
    pub fn readiness(&self) -> Result<(), String> {
        let list = self.list().map_err(|e| e.to_string())?;
        for plugin in &list.plugins {
            let kind =
                plugin["type"].as_str().ok_or_else(|| format!("network {:?}: a plugin has no type", list.name))?;
            self.cni.find(kind).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// ADD of the pod's sandbox to the network; returns its IPs. On failure whatever a plugin already took is
    /// released again (DEL), so a failed sandbox leaks nothing.
    pub async fn attach(&self, pod: &Pod, sandbox: &str, netns: &Path) -> Result<Vec<String>, CniError> {
        let list = self.list()?;
        let meta = &pod.metadata;
        let attachment = Attachment {
            container_id: sandbox.to_string(),
            netns: netns.to_path_buf(),
            if_name: "eth0".into(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), meta.namespace.clone().unwrap_or_else(|| "default".into())),
                ("K8S_POD_NAME".into(), meta.name.clone().unwrap_or_default()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), sandbox.to_string()),
                ("K8S_POD_UID".into(), meta.uid.clone().unwrap_or_default()),
            ],
            port_mappings: port_mappings(pod),
        };
        let cached = match self.cni.add(&list, &attachment).await {
            Ok(cached) => cached,
            Err(e) => {
                let partial = Cached { attachment, config: list.raw.clone(), result: serde_json::Value::Null };
                if let Err(del) = self.cni.del(&partial).await {
                    tracing::debug!(%sandbox, error = %del, "DEL after a failed ADD");
                }
                return Err(e);
            }
        };
        let json = serde_json::to_vec_pretty(&cached).map_err(std::io::Error::other)?;
        if let Err(e) = nodelet_runtime::state::write_atomic(&self.cache_path(sandbox), &json) {
            let _ = self.cni.del(&cached).await;
            return Err(std::io::Error::other(e).into());
        }
        Ok(cached.ips())
    }

    fn cached(&self, sandbox: &str) -> Option<Cached> {
        let bytes = std::fs::read(self.cache_path(sandbox)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The IPs a sandbox got (from the cache: also after a restart).
    pub fn ips(&self, sandbox: &str) -> Vec<String> {
        self.cached(sandbox).map(|c| c.ips()).unwrap_or_default()
    }

    /// CHECK of an attachment (after a restart).
    pub async fn check(&self, sandbox: &str) -> Result<(), CniError> {
        match self.cached(sandbox) {
            Some(cached) => self.cni.check(&cached).await,
            None => Ok(()),
        }
    }

    /// DEL of the sandbox's attachment, with what ADD was given and returned; the cache goes once it succeeded.
    pub async fn detach(&self, sandbox: &str) -> Result<(), CniError> {
        let Some(cached) = self.cached(sandbox) else { return Ok(()) };
        self.cni.del(&cached).await?;
        let _ = std::fs::remove_file(self.cache_path(sandbox));
        Ok(())
    }

    /// Sandboxes with a cached attachment.
    pub fn attached(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.config.root_dir.join("network")) else { return Vec::new() };
        entries.flatten().filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_string)).collect()
    }

    /// Writes the pod's resolv.conf, hosts and hostname; returns their bind mounts.
    pub fn write_files(&self, pod: &Pod, uid: &str, ips: &[String]) -> Result<Vec<nodelet_runtime::Mount>, String> {
        let dir = self.files_dir(uid);
        let domain = self.config.dns.cluster_domain.clone().unwrap_or_else(|| "cluster.local".into());
        let node_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let files = [
            ("resolv.conf", dns::resolv_conf(pod, &self.config.dns)?),
            ("hosts", dns::hosts(pod, ips, &domain, &node_hosts, &self.config.node_name)),
            ("hostname", format!("{}\n", dns::hostname(pod, &self.config.node_name))),
        ];
        for (name, text) in files {
            nodelet_runtime::state::write_atomic(&dir.join(name), text.as_bytes()).map_err(|e| e.to_string())?;
        }
        Ok(self.file_mounts(uid))
    }

    /// The bind mounts of the files written (also after a restart).
    pub fn file_mounts(&self, uid: &str) -> Vec<nodelet_runtime::Mount> {
        let dir = self.files_dir(uid);
        ["resolv.conf", "hosts", "hostname"]
            .into_iter()
            .filter(|name| dir.join(name).exists())
            .map(|name| nodelet_runtime::Mount::Bind {
                source: dir.join(name),
                destination: format!("/etc/{name}"),
                read_only: false,
                recursive: false,
                propagation: Default::default(),
            })
            .collect()
    }

    pub fn remove_files(&self, uid: &str) {
        let _ = std::fs::remove_dir_all(self.files_dir(uid));
    }
}

/// `runtimeConfig.portMappings` from the containers' `hostPort`s (the portmap plugin's capability).
pub fn port_mappings(pod: &Pod) -> Vec<serde_json::Value> {
    let spec = pod.spec.clone().unwrap_or_default();
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.is_some_and(|h| h > 0))
        .map(|p| {
            let mut m = json!({
                "hostPort": p.host_port,
                "containerPort": p.container_port,
                "protocol": p.protocol.as_deref().unwrap_or("TCP").to_lowercase(),
            });
            if let Some(ip) = p.host_ip.as_deref().filter(|ip| !ip.is_empty()) {
                m["hostIP"] = json!(ip);
            }
            m
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_become_port_mappings() {
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "ports": [{"containerPort": 80, "hostPort": 8080}, {"containerPort": 81}]},
            {"name": "b", "ports": [{"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "127.0.0.1"}]}
        ]}}))
        .unwrap();
        assert_eq!(
            port_mappings(&pod),
            [
                json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}),
                json!({"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"})
            ]
        );
    }

    #[test]
    fn the_default_network_is_used_without_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let network = Network::new(NetworkConfig {
            conf_dir: dir.path().join("net.d"),
            bin_dirs: vec![],
            pod_cidr: "10.77.0.0/24".into(),
            root_dir: dir.path().into(),
            dns: Default::default(),
            node_name: "n".into(),
        });
        let list = network.list().unwrap();
        assert_eq!(list.name, DEFAULT_NETWORK);
        assert_eq!(list.plugins[0]["ipam"]["ranges"][0][0]["subnet"], "10.77.0.0/24");
        std::fs::create_dir(dir.path().join("net.d")).unwrap();
        std::fs::write(
            dir.path().join("net.d/1.conflist"),
            r#"{"cniVersion":"1.0.0","name":"mine","plugins":[{"type":"ptp"}]}"#,
        )
        .unwrap();
        assert_eq!(network.list().unwrap().name, "mine");
        std::fs::write(dir.path().join("net.d/0.conf"), "{broken").unwrap();
        assert!(network.list().unwrap_err().to_string().contains("0.conf: invalid JSON"));
        assert!(network.readiness().unwrap_err().contains("0.conf: invalid JSON"));
    }

    #[test]
    fn ready_only_with_every_plugin_installed() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let network = Network::new(NetworkConfig {
            conf_dir: dir.path().join("net.d"),
            bin_dirs: vec![bin.clone()],
            pod_cidr: "10.77.0.0/24".into(),
            root_dir: dir.path().into(),
            dns: Default::default(),
            node_name: "n".into(),
        });
        // The built-in network needs bridge, host-local and portmap.
        assert!(network.readiness().unwrap_err().contains("bridge"));
        for plugin in ["bridge", "host-local", "portmap"] {
            std::fs::write(bin.join(plugin), "#!/bin/sh\n").unwrap();
        }
        assert_eq!(network.readiness(), Ok(()));
    }
}
