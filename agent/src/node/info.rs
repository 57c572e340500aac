//! Facts about this machine that go into the Node: capacity, nodeInfo and addresses.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{DaemonEndpoint, NodeAddress, NodeDaemonEndpoints, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::config::AgentConfig;

/// The API level nodelet implements, as kubeletVersion reports it (with nodelet's own version as build data).
pub const KUBELET_API_VERSION: &str = "v1.37.0";

/// What the node reports about itself that does not change while it runs.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub cpus: u64,
    pub memory_bytes: u64,
    pub ephemeral_storage_bytes: u64,
    pub info: NodeSystemInfo,
}

/// The architecture in Go's words (`amd64`, `arm64`).
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

impl NodeFacts {
    pub fn gather(config: &AgentConfig) -> Result<NodeFacts> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let memory_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no MemTotal in /proc/meminfo")?;
        std::fs::create_dir_all(&config.root_dir).with_context(|| format!("creating {}", config.root_dir.display()))?;
        let fs =
            rustix::fs::statvfs(&config.root_dir).with_context(|| format!("statvfs {}", config.root_dir.display()))?;
        let os_image = read_trimmed("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "Linux".into());
        let uname = rustix::system::uname();
        let info = NodeSystemInfo {
            architecture: go_arch().into(),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: format!("nodelet://{}", env!("CARGO_PKG_VERSION")),
            kernel_version: uname.release().to_string_lossy().into_owned(),
            kube_proxy_version: String::new(),
            kubelet_version: format!("{KUBELET_API_VERSION}+nodelet.{}", env!("CARGO_PKG_VERSION")),
            machine_id: read_trimmed("/etc/machine-id"),
            operating_system: "linux".into(),
            os_image,
            system_uuid: read_trimmed("/sys/class/dmi/id/product_uuid"),
            ..Default::default()
        };
        Ok(NodeFacts {
            cpus: std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1),
            memory_bytes: memory_kib * 1024,
            ephemeral_storage_bytes: fs.f_blocks * fs.f_frsize,
            info,
        })
    }

    /// Capacity and allocatable (no reservations yet: equal), nodeInfo, addresses and the kubelet endpoint.
    pub fn status(&self, config: &AgentConfig) -> NodeStatus {
        let resources: BTreeMap<String, Quantity> = [
            ("cpu", self.cpus.to_string()),
            ("memory", format!("{}Ki", self.memory_bytes / 1024)),
            ("pods", config.kubelet.max_pods.to_string()),
            ("ephemeral-storage", format!("{}Ki", self.ephemeral_storage_bytes / 1024)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Quantity(v)))
        .collect();
        NodeStatus {
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            node_info: Some(self.info.clone()),
            addresses: Some(vec![
                NodeAddress { type_: "InternalIP".into(), address: config.node_ip.clone() },
                NodeAddress { type_: "Hostname".into(), address: config.node_name.clone() },
            ]),
            daemon_endpoints: Some(NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint { port: i32::from(config.kubelet.port) }),
            }),
            ..Default::default()
        }
    }
}
