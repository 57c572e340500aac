//! Facts about this machine that go into the Node: capacity, nodeInfo and addresses.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{DaemonEndpoint, NodeAddress, NodeDaemonEndpoints, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::config::AgentConfig;

/// The API level nodelet implements, as kubeletVersion reports it (with nodelet's own version as build data).
pub const KUBELET_API_VERSION: &str = "v1.37.0";

/// The version the node reports and `--version` prints: the kubelet API version, nodelet's as build metadata.
pub fn kubelet_version() -> String {
    format!("{KUBELET_API_VERSION}+nodelet.{}", env!("CARGO_PKG_VERSION"))
}

/// What the node reports about itself that does not change while it runs.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub cpus: u64,
    pub memory_bytes: u64,
    pub ephemeral_storage_bytes: u64,
    /// Capacity less reservations and hard eviction thresholds (see [`super::allocatable`]).
    pub allocatable: super::allocatable::Resources,
    /// What the pods' cgroup is limited to: capacity less reservations (not the eviction thresholds: evictions
    /// act before that limit is reached) with `enforceNodeAllocatable: [pods]`, else the whole capacity.
    pub pods_limit: super::allocatable::Resources,
    pub info: NodeSystemInfo,
    /// Pods can have user namespaces (`hostUsers: false`) here: reported in `status.runtimeHandlers`.
    pub user_namespaces: bool,
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
        let memory_bytes =
            super::conditions::meminfo_bytes(&meminfo, "MemTotal").context("no MemTotal in /proc/meminfo")?;
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
            kubelet_version: kubelet_version(),
            machine_id: read_trimmed("/etc/machine-id"),
            operating_system: "linux".into(),
            os_image,
            system_uuid: read_trimmed("/sys/class/dmi/id/product_uuid"),
            ..Default::default()
        };
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
        let capacity = super::allocatable::Resources {
            cpu_millis: cpus * 1000,
            memory_bytes,
            ephemeral_storage_bytes: fs.f_blocks * fs.f_frsize,
        };
        let kubelet = &config.kubelet;
        let eviction = super::allocatable::eviction_hard(kubelet.eviction_hard.as_ref());
        let allocatable =
            super::allocatable::allocatable(capacity, &kubelet.kube_reserved, &kubelet.system_reserved, &eviction)
                .context("kubeReserved, systemReserved or evictionHard")?;
        let pods_limit = if kubelet.enforces_pods_allocatable()? {
            let none = Default::default();
            super::allocatable::allocatable(capacity, &kubelet.kube_reserved, &kubelet.system_reserved, &none)?
        } else {
            capacity
        };
        Ok(NodeFacts {
            cpus,
            memory_bytes: capacity.memory_bytes,
            ephemeral_storage_bytes: capacity.ephemeral_storage_bytes,
            allocatable,
            pods_limit,
            info,
            user_namespaces: false,
        })
    }

    /// `/spec`: the machine in cAdvisor's `MachineInfo` shape, the fields nodelet knows.
    pub fn machine_spec(&self) -> serde_json::Value {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let mhz = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("cpu MHz")?.split(':').nth(1)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        let sockets: std::collections::BTreeSet<&str> =
            cpuinfo.lines().filter_map(|l| l.strip_prefix("physical id")?.split(':').nth(1)).map(str::trim).collect();
        let swap = nodelet_cgroups::stats::node_stats().map_or(0, |n| n.swap_total_bytes);
        serde_json::json!({
            "timestamp": jiff::Timestamp::now().to_string(),
            "num_cores": self.cpus,
            "num_sockets": sockets.len().max(1),
            "cpu_frequency_khz": (mhz * 1000.0).round(),
            "memory_capacity": self.memory_bytes,
            "swap_capacity": swap,
            "machine_id": self.info.machine_id,
            "system_uuid": self.info.system_uuid,
            "boot_id": self.info.boot_id,
            "cloud_provider": "Unknown",
            "instance_type": "Unknown",
            "instance_id": "None",
        })
    }

    /// Capacity and allocatable, nodeInfo, addresses and the kubelet endpoint.
    pub fn status(&self, config: &AgentConfig) -> NodeStatus {
        let quantities = |cpu: String, memory: u64, storage: u64| -> BTreeMap<String, Quantity> {
            [
                ("cpu", cpu),
                ("memory", format!("{}Ki", memory / 1024)),
                ("pods", config.kubelet.max_pods.to_string()),
                ("ephemeral-storage", format!("{}Ki", storage / 1024)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), Quantity(v)))
            .collect()
        };
        let a = &self.allocatable;
        let allocatable_cpu = if a.cpu_millis.is_multiple_of(1000) {
            (a.cpu_millis / 1000).to_string()
        } else {
            format!("{}m", a.cpu_millis)
        };
        NodeStatus {
            capacity: Some(quantities(self.cpus.to_string(), self.memory_bytes, self.ephemeral_storage_bytes)),
            allocatable: Some(quantities(allocatable_cpu, a.memory_bytes, a.ephemeral_storage_bytes)),
            node_info: Some(self.info.clone()),
            addresses: Some(vec![
                NodeAddress { type_: "InternalIP".into(), address: config.node_ip.clone() },
                NodeAddress { type_: "Hostname".into(), address: config.node_name.clone() },
            ]),
            daemon_endpoints: Some(NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint { port: i32::from(config.kubelet.port) }),
            }),
            declared_features: Some(config.kubelet.declared_features()).filter(|f| !f.is_empty()),
            // The runtime resolves `supplementalGroupsPolicy` and reports each container's user.
            features: Some(k8s_openapi::api::core::v1::NodeFeatures { supplemental_groups_policy: Some(true) }),
            // The one built-in runtime, as containerd reports its default handler (""): `recursiveReadOnly`
            // mounts are made with mount_setattr; user namespaces where idmapped mounts work.
            runtime_handlers: Some(vec![k8s_openapi::api::core::v1::NodeRuntimeHandler {
                name: Some(String::new()),
                features: Some(k8s_openapi::api::core::v1::NodeRuntimeHandlerFeatures {
                    recursive_read_only_mounts: Some(true),
                    user_namespaces: Some(self.user_namespaces),
                }),
            }]),
            ..Default::default()
        }
    }
}
