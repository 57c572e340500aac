//! The agent's configuration: kubelet flag names where they exist, and `KubeletConfiguration`
//! (`kubelet.config.k8s.io/v1beta1`) read from `--config` with upstream's field names and defaults. Every
//! upstream field is accepted (kubeadm writes many): those nodelet does not act on are named in one notice at
//! startup ([`NOT_ACTED_ON`]); a field upstream does not have (a typo) and invalid values are startup errors. As
//! upstream's defaulting, a zero value (`0s`, `0`, `""`) means the default.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// `--config`: the fields nodelet honours, named and defaulted as upstream.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubeletConfiguration {
    pub kind: Option<String>,
    pub api_version: Option<String>,
    pub max_pods: u32,
    pub static_pod_path: Option<PathBuf>,
    pub cgroup_root: Option<String>,
    /// The kubelet API's address and port.
    pub address: String,
    pub port: u16,
    /// The kubelet API's serving certificate; without it, a self-signed one is made under `<root-dir>/pki`.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    pub authentication: Authentication,
    pub authorization: Authorization,
    pub pod_logs_dir: PathBuf,
    #[serde(with = "go_duration")]
    pub node_status_update_frequency: Duration,
    #[serde(with = "go_duration")]
    pub node_status_report_frequency: Duration,
    pub node_lease_duration_seconds: u32,
    pub container_log_max_size: String,
    pub container_log_max_files: u32,
    #[serde(rename = "imageGCHighThresholdPercent")]
    pub image_gc_high_threshold_percent: u8,
    #[serde(rename = "imageGCLowThresholdPercent")]
    pub image_gc_low_threshold_percent: u8,
    #[serde(with = "go_duration", rename = "imageMinimumGCAge")]
    pub image_minimum_gc_age: Duration,
    #[serde(rename = "clusterDNS")]
    pub cluster_dns: Vec<String>,
    pub cluster_domain: Option<String>,
    /// The node's resolv.conf, the base of pods' with dnsPolicy Default.
    pub resolv_conf: PathBuf,
    /// The pod range of nodelet's built-in default network.
    #[serde(rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    pub pod_pids_limit: Option<i64>,
    #[serde(rename = "singleProcessOOMKill")]
    pub single_process_oom_kill: Option<bool>,
    /// Resources held back for Kubernetes daemons and for the system (`cpu`, `memory`, `ephemeral-storage`,
    /// `pid`): subtracted from capacity for allocatable.
    pub kube_reserved: std::collections::BTreeMap<String, String>,
    pub system_reserved: std::collections::BTreeMap<String, String>,
    /// Where allocatable is enforced: `pods` (upstream's default) limits the `kubepods` cgroup to capacity minus
    /// the reservations and adds the `allocatableMemory.available` thresholds; `none` (or an empty list) leaves it
    /// the whole capacity. The reservations' own cgroups (`system-reserved`, `kube-reserved`) are refused.
    pub enforce_node_allocatable: Vec<String>,
    /// Hard eviction thresholds (`memory.available`, `nodefs.available`...; quantities or percentages). Unset:
    /// upstream's defaults. They shape allocatable, and the eviction manager enforces them.
    pub eviction_hard: Option<std::collections::BTreeMap<String, String>>,
    /// Soft eviction thresholds: met for their `evictionSoftGracePeriod`, they evict with a grace period of at most
    /// `evictionMaxPodGracePeriod`.
    pub eviction_soft: std::collections::BTreeMap<String, String>,
    pub eviction_soft_grace_period: std::collections::BTreeMap<String, String>,
    /// How much beyond its threshold a signal must recover before evictions for it stop.
    pub eviction_minimum_reclaim: std::collections::BTreeMap<String, String>,
    pub eviction_max_pod_grace_period: i64,
    /// How long a pressure condition stays after its threshold was last met.
    #[serde(with = "go_duration")]
    pub eviction_pressure_transition_period: Duration,
    /// How long a volume's (and a writable layer's, a log's) disk usage, measured by walking it, is reused.
    #[serde(with = "go_duration")]
    pub volume_stats_agg_period: Duration,
    /// How long an exec, attach or port-forward connection may be idle before it is closed.
    #[serde(with = "go_duration")]
    pub streaming_connection_idle_timeout: Duration,
    /// Feature gates by name. Only those nodelet acts on matter ([`KubeletConfiguration::feature`]); others are
    /// accepted (a kubeadm config may set them).
    pub feature_gates: std::collections::BTreeMap<String, bool>,
    /// Sysctls (names or `prefix*`) pods may set beyond the safe set; pods asking for others are refused with
    /// `SysctlForbidden`.
    pub allowed_unsafe_sysctls: Vec<String>,
    /// Run containers without a `seccompProfile` under `RuntimeDefault` rather than `Unconfined`.
    pub seccomp_default: bool,
    /// Rotate the client certificate through CertificateSigningRequests before it expires (when the kubeconfig
    /// names the certificate store's `kubelet-client-current.pem`, as TLS bootstrap writes it).
    pub rotate_certificates: bool,
    /// Ask the cluster for the kubelet API's serving certificate (a `kubernetes.io/kubelet-serving` CSR, approved
    /// by an administrator) instead of a self-signed one, and rotate it; ignored when `tlsCertFile` is set.
    #[serde(rename = "serverTLSBootstrap")]
    pub server_tls_bootstrap: bool,
    /// The plain-HTTP health check (`/healthz`) kubeadm waits on: port 0 turns it off.
    pub healthz_port: u16,
    pub healthz_bind_address: String,
    /// Taints the node registers with (added to `--register-with-taints`).
    pub register_with_taints: Vec<k8s_openapi::api::core::v1::Taint>,
    /// User namespaces of pods with `hostUsers: false`.
    pub user_namespaces: UserNamespacesConfig,
}

/// `userNamespaces`: how many ids each pod's user namespace gets.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct UserNamespacesConfig {
    /// 65536 when unset (upstream's default); a multiple of 65536.
    pub ids_per_pod: Option<i64>,
}

impl UserNamespacesConfig {
    /// The ids each pod gets.
    pub fn ids_per_pod(&self) -> u32 {
        self.ids_per_pod.and_then(|n| u32::try_from(n).ok()).filter(|n| *n != 0).unwrap_or(USERNS_UNIT)
    }
}

/// The unit of user namespace ranges (upstream's `userNsUnitLength`).
pub const USERNS_UNIT: u32 = 65536;

/// Upstream's KubeletConfiguration fields nodelet accepts without acting on them (named in a startup notice).
/// `cgroupDriver`: nodelet writes cgroupfs itself below `cgroupRoot` whatever the driver (see DESIGN.md);
/// `containerRuntimeEndpoint`/`imageServiceEndpoint`: the runtime is built in.
pub const NOT_ACTED_ON: &[&str] = &[
    "enableServer",
    "syncFrequency",
    "fileCheckFrequency",
    "httpCheckFrequency",
    "staticPodURL",
    "staticPodURLHeader",
    "readOnlyPort",
    "tlsCipherSuites",
    "tlsCurvePreferences",
    "tlsMinVersion",
    "registryPullQPS",
    "registryBurst",
    "imagePullCredentialsVerificationPolicy",
    "preloadedImagesVerificationAllowlist",
    "eventRecordQPS",
    "eventBurst",
    "enableDebuggingHandlers",
    "enableContentionProfiling",
    "oomScoreAdj",
    "imageMaximumGCAge",
    "kubeletCgroups",
    "systemCgroups",
    "cgroupsPerQOS",
    "cgroupDriver",
    "cpuManagerPolicy",
    "cpuManagerPolicyOptions",
    "cpuManagerReconcilePeriod",
    "memoryManagerPolicy",
    "topologyManagerPolicy",
    "topologyManagerScope",
    "topologyManagerPolicyOptions",
    "qosReserved",
    "runtimeRequestTimeout",
    "hairpinMode",
    "runOnce",
    "cpuCFSQuota",
    "cpuCFSQuotaPeriod",
    "nodeStatusMaxImages",
    "maxOpenFiles",
    "contentType",
    "kubeAPIQPS",
    "kubeAPIBurst",
    "serializeImagePulls",
    "maxParallelImagePulls",
    "mergeDefaultEvictionSettings",
    "podsPerCore",
    "enableControllerAttachDetach",
    "protectKernelDefaults",
    "makeIPTablesUtilChains",
    "iptablesMasqueradeBit",
    "iptablesDropBit",
    "failSwapOn",
    "memorySwap",
    "containerLogMaxWorkers",
    "containerLogMonitorInterval",
    "configMapAndSecretChangeDetectionStrategy",
    "reservedSystemCPUs",
    "showHiddenMetricsForVersion",
    "systemReservedCgroup",
    "kubeReservedCgroup",
    "defaultPodSysctls",
    "volumePluginDir",
    "providerID",
    "kernelMemcgNotification",
    "logging",
    "enableSystemLogHandler",
    "enableSystemLogQuery",
    "shutdownGracePeriod",
    "shutdownGracePeriodCriticalPods",
    "shutdownGracePeriodByPodPriority",
    "crashLoopBackOff",
    "reservedMemory",
    "enableProfilingHandler",
    "enableDebugFlagsHandler",
    "memoryThrottlingFactor",
    "memoryReservationPolicy",
    "registerNode",
    "tracing",
    "localStorageCapacityIsolation",
    "containerRuntimeEndpoint",
    "imageServiceEndpoint",
    "failCgroupV1",
];

impl KubeletConfiguration {
    /// Whether gate `name` is on: as configured, else upstream 1.37's default for the gates nodelet acts on.
    pub fn feature(&self, name: &str) -> bool {
        self.feature_gates.get(name).copied().unwrap_or(matches!(
            name,
            "ExtendWebSocketsToKubelet" | "ContainerRestartRules" | "RestartAllContainersOnContainerExits"
        ))
    }

    /// The features the node declares in `status.declaredFeatures` (NodeDeclaredFeatures): the API server routes
    /// by them, and the scheduler places a pod that needs one (a `RestartAllContainers` restart rule) only on a
    /// node that declares it. Sorted, as upstream's.
    pub fn declared_features(&self) -> Vec<String> {
        let restart_all = self.feature("ContainerRestartRules") && self.feature("RestartAllContainersOnContainerExits");
        let mut features: Vec<String> = [("ExtendWebSocketsToKubelet", self.feature("ExtendWebSocketsToKubelet"))]
            .into_iter()
            .chain([("RestartAllContainersOnContainerExits", restart_all)])
            .filter(|(_, on)| *on)
            .map(|(f, _)| f.to_string())
            .collect();
        features.sort();
        features
    }
}

impl Default for KubeletConfiguration {
    fn default() -> Self {
        KubeletConfiguration {
            kind: None,
            api_version: None,
            max_pods: 110,
            static_pod_path: None,
            cgroup_root: None,
            address: "0.0.0.0".into(),
            port: 10250,
            tls_cert_file: None,
            tls_private_key_file: None,
            authentication: Authentication::default(),
            authorization: Authorization::default(),
            pod_logs_dir: PathBuf::from("/var/log/pods"),
            node_status_update_frequency: Duration::from_secs(10),
            node_status_report_frequency: Duration::from_secs(300),
            node_lease_duration_seconds: 40,
            container_log_max_size: "10Mi".into(),
            container_log_max_files: 5,
            image_gc_high_threshold_percent: 85,
            image_gc_low_threshold_percent: 80,
            image_minimum_gc_age: Duration::from_secs(120),
            cluster_dns: Vec::new(),
            cluster_domain: None,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            pod_cidr: None,
            pod_pids_limit: None,
            single_process_oom_kill: None,
            kube_reserved: Default::default(),
            system_reserved: Default::default(),
            enforce_node_allocatable: vec!["pods".into()],
            eviction_hard: None,
            eviction_pressure_transition_period: Duration::from_secs(300),
            eviction_soft: Default::default(),
            eviction_soft_grace_period: Default::default(),
            eviction_minimum_reclaim: Default::default(),
            eviction_max_pod_grace_period: 0,
            volume_stats_agg_period: Duration::from_secs(60),
            streaming_connection_idle_timeout: Duration::from_secs(4 * 3600),
            feature_gates: Default::default(),
            allowed_unsafe_sysctls: Vec::new(),
            seccomp_default: false,
            rotate_certificates: false,
            server_tls_bootstrap: false,
            healthz_port: 10248,
            healthz_bind_address: "127.0.0.1".into(),
            register_with_taints: Vec::new(),
            user_namespaces: UserNamespacesConfig::default(),
        }
    }
}

/// `authentication`: who may call the kubelet API (v1beta1 defaults: no anonymous, token webhook on).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Authentication {
    pub x509: X509Authentication,
    pub webhook: WebhookAuthentication,
    pub anonymous: AnonymousAuthentication,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct X509Authentication {
    /// Client certificates signed by this CA authenticate as their CN (user) and O (groups).
    #[serde(rename = "clientCAFile")]
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WebhookAuthentication {
    /// Bearer tokens are checked with TokenReviews.
    pub enabled: bool,
    #[serde(with = "go_duration", rename = "cacheTTL")]
    pub cache_ttl: Duration,
}

impl Default for WebhookAuthentication {
    fn default() -> Self {
        WebhookAuthentication { enabled: true, cache_ttl: Duration::from_secs(120) }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AnonymousAuthentication {
    pub enabled: bool,
}

/// `authorization`: `Webhook` (SubjectAccessReviews, the v1beta1 default) or `AlwaysAllow`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Authorization {
    pub mode: String,
    pub webhook: WebhookAuthorization,
}

impl Default for Authorization {
    fn default() -> Self {
        Authorization { mode: "Webhook".into(), webhook: WebhookAuthorization::default() }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WebhookAuthorization {
    #[serde(with = "go_duration", rename = "cacheAuthorizedTTL")]
    pub cache_authorized_ttl: Duration,
    #[serde(with = "go_duration", rename = "cacheUnauthorizedTTL")]
    pub cache_unauthorized_ttl: Duration,
}

impl Default for WebhookAuthorization {
    fn default() -> Self {
        WebhookAuthorization {
            cache_authorized_ttl: Duration::from_secs(300),
            cache_unauthorized_ttl: Duration::from_secs(30),
        }
    }
}

impl KubeletConfiguration {
    /// Reads and validates a config file; returns it with the upstream fields it sets that nodelet does not act on.
    pub fn load(path: &std::path::Path) -> Result<(KubeletConfiguration, Vec<String>)> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}: invalid KubeletConfiguration", path.display()))
    }

    /// Parses a config (see [`KubeletConfiguration::load`]).
    pub fn parse(text: &str) -> Result<(KubeletConfiguration, Vec<String>)> {
        let mut doc: serde_yaml::Value = serde_yaml::from_str(text)?;
        let mut ignored = Vec::new();
        if let Some(map) = doc.as_mapping_mut() {
            for field in NOT_ACTED_ON {
                if map.remove(*field).is_some() {
                    ignored.push(field.to_string());
                }
            }
        } else if !doc.is_null() {
            bail!("not a mapping");
        }
        let mut config: KubeletConfiguration =
            if doc.is_null() { KubeletConfiguration::default() } else { serde_yaml::from_value(doc)? };
        config.default_zero_values();
        config.validate()?;
        Ok((config, ignored))
    }

    /// Upstream's defaulting: a zero value stands for the default (kubeadm writes `0s` for most durations).
    fn default_zero_values(&mut self) {
        let d = KubeletConfiguration::default();
        let durations = [
            (&mut self.node_status_update_frequency, d.node_status_update_frequency),
            (&mut self.node_status_report_frequency, d.node_status_report_frequency),
            (&mut self.image_minimum_gc_age, d.image_minimum_gc_age),
            (&mut self.eviction_pressure_transition_period, d.eviction_pressure_transition_period),
            (&mut self.volume_stats_agg_period, d.volume_stats_agg_period),
            (&mut self.streaming_connection_idle_timeout, d.streaming_connection_idle_timeout),
            (&mut self.authentication.webhook.cache_ttl, d.authentication.webhook.cache_ttl),
            (&mut self.authorization.webhook.cache_authorized_ttl, d.authorization.webhook.cache_authorized_ttl),
            (&mut self.authorization.webhook.cache_unauthorized_ttl, d.authorization.webhook.cache_unauthorized_ttl),
        ];
        for (value, default) in durations {
            if value.is_zero() {
                *value = default;
            }
        }
        if self.max_pods == 0 {
            self.max_pods = d.max_pods;
        }
        if self.port == 0 {
            self.port = d.port;
        }
        if self.node_lease_duration_seconds == 0 {
            self.node_lease_duration_seconds = d.node_lease_duration_seconds;
        }
        if self.container_log_max_files == 0 {
            self.container_log_max_files = d.container_log_max_files;
        }
        if self.container_log_max_size.is_empty() {
            self.container_log_max_size = d.container_log_max_size;
        }
        if self.address.is_empty() {
            self.address = d.address;
        }
        if self.healthz_bind_address.is_empty() {
            self.healthz_bind_address = d.healthz_bind_address;
        }
        if self.resolv_conf.as_os_str().is_empty() {
            self.resolv_conf = d.resolv_conf;
        }
        if self.pod_logs_dir.as_os_str().is_empty() {
            self.pod_logs_dir = d.pod_logs_dir;
        }
    }

    /// Checks values the types cannot (also after flags override the file).
    pub fn validate(&self) -> Result<()> {
        if let Some(kind) = self.kind.as_deref().filter(|k| *k != "KubeletConfiguration") {
            bail!("kind is {kind:?}, expected \"KubeletConfiguration\"");
        }
        if let Some(v) = self.api_version.as_deref().filter(|v| *v != "kubelet.config.k8s.io/v1beta1") {
            bail!("apiVersion is {v:?}, expected \"kubelet.config.k8s.io/v1beta1\"");
        }
        if self.max_pods == 0 {
            bail!("maxPods must be positive");
        }
        if self.container_log_max_files < 2 {
            bail!("containerLogMaxFiles must be at least 2");
        }
        if let Some(ids) = self.user_namespaces.ids_per_pod {
            let unit = i64::from(USERNS_UNIT);
            if ids < unit {
                bail!("invalid configuration: userNamespaces.idsPerPod must not be less than {unit}");
            }
            if ids % unit != 0 {
                bail!("invalid configuration: userNamespaces.idsPerPod must be a multiple of {unit}");
            }
            if ids > i64::from(u32::MAX) {
                bail!("invalid configuration: userNamespaces.idsPerPod must not be more than {}", u32::MAX);
            }
        }
        parse_quantity(&self.container_log_max_size).context("containerLogMaxSize")?;
        if !["Webhook", "AlwaysAllow"].contains(&self.authorization.mode.as_str()) {
            bail!("authorization.mode is {:?}, expected \"Webhook\" or \"AlwaysAllow\"", self.authorization.mode);
        }
        if self.tls_cert_file.is_some() != self.tls_private_key_file.is_some() {
            bail!("tlsCertFile and tlsPrivateKeyFile go together");
        }
        self.address.parse::<std::net::IpAddr>().with_context(|| format!("address {:?}", self.address))?;
        self.healthz_bind_address
            .parse::<std::net::IpAddr>()
            .with_context(|| format!("healthzBindAddress {:?}", self.healthz_bind_address))?;
        if let Some(cidr) = &self.pod_cidr {
            let (ip, bits) = cidr.split_once('/').with_context(|| format!("podCIDR {cidr:?} is not a CIDR"))?;
            ip.parse::<std::net::IpAddr>().with_context(|| format!("podCIDR {cidr:?}"))?;
            bits.parse::<u8>().ok().filter(|b| *b <= 128).with_context(|| format!("podCIDR {cidr:?}"))?;
        }
        self.enforces_pods_allocatable()?;
        self.eviction_thresholds().map_err(anyhow::Error::msg).context("eviction thresholds")?;
        crate::pods::sysctls::Allowlist::new(&self.allowed_unsafe_sysctls)
            .map_err(anyhow::Error::msg)
            .context("allowedUnsafeSysctls")?;
        for ip in &self.cluster_dns {
            ip.parse::<std::net::IpAddr>().with_context(|| format!("clusterDNS {ip:?} is not an IP address"))?;
        }
        Ok(())
    }

    /// Whether `enforceNodeAllocatable` asks for the pods' cgroup to be limited to allocatable, with upstream's
    /// validation; the reservations' own cgroups are refused (nodelet does not manage them).
    pub fn enforces_pods_allocatable(&self) -> Result<bool> {
        let mut pods = false;
        for value in &self.enforce_node_allocatable {
            match value.as_str() {
                "pods" => pods = true,
                "none" if self.enforce_node_allocatable.len() == 1 => {}
                "none" => bail!("enforceNodeAllocatable: \"none\" cannot be combined with other options"),
                "system-reserved" | "kube-reserved" | "system-reserved-compressible" | "kube-reserved-compressible" => {
                    bail!(
                        "enforceNodeAllocatable: {value:?} is not supported by nodelet (it does not manage the \
                         reservations' own cgroups); use \"pods\" or \"none\""
                    )
                }
                other => bail!("enforceNodeAllocatable: invalid option {other:?}"),
            }
        }
        Ok(pods)
    }

    /// The eviction thresholds in force (hard ones defaulted as upstream; with allocatable enforced on the pods,
    /// the hard `memory.available` ones also for `allocatableMemory.available`, as upstream adds them).
    pub fn eviction_thresholds(&self) -> Result<Vec<crate::eviction::thresholds::Threshold>, String> {
        let thresholds = crate::eviction::thresholds::configured(
            &crate::node::allocatable::eviction_hard(self.eviction_hard.as_ref()),
            &self.eviction_soft,
            &self.eviction_soft_grace_period,
            &self.eviction_minimum_reclaim,
        )?;
        let pods = self.enforces_pods_allocatable().map_err(|e| e.to_string())?;
        Ok(if pods { crate::eviction::thresholds::with_allocatable(thresholds) } else { thresholds })
    }

    pub fn container_log_max_bytes(&self) -> u64 {
        parse_quantity(&self.container_log_max_size).unwrap_or(10 << 20)
    }
}

/// A byte quantity like `10Mi`, `1G`, `512Ki` or a plain number.
pub fn parse_quantity(text: &str) -> Result<u64> {
    let suffixes: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (number, multiplier) =
        suffixes.iter().find_map(|(s, m)| text.strip_suffix(s).map(|n| (n, *m))).unwrap_or((text, 1));
    let n: u64 = number.parse().with_context(|| format!("{text:?} is not a quantity"))?;
    Ok(n * multiplier)
}

/// Go duration strings (`10s`, `5m0s`, `1h`), as KubeletConfiguration writes them.
mod go_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    /// As Go's `time.Duration.String()` for whole milliseconds: `4h0m0s`, `1m30s`, `500ms`, `0s`.
    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if ms == 0 {
            return "0s".into();
        }
        if ms < 1000 {
            return format!("{ms}ms");
        }
        let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        let seconds =
            if frac == 0 { format!("{s}s") } else { format!("{s}.{}s", format!("{frac:03}").trim_end_matches('0')) };
        match (h, m) {
            (0, 0) => seconds,
            (0, m) => format!("{m}m{seconds}"),
            (h, m) => format!("{h}h{m}m{seconds}"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub fn parse(text: &str) -> Result<Duration, String> {
        let mut total = 0f64;
        let mut rest = text;
        if rest.is_empty() {
            return Err("empty duration".into());
        }
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
            let value: f64 = rest[..digits].parse().map_err(|_| format!("invalid duration {text:?}"))?;
            rest = &rest[digits..];
            let unit = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let seconds = match &rest[..unit] {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 0.001,
                _ => return Err(format!("invalid duration {text:?}")),
            };
            total += value * seconds;
            rest = &rest[unit..];
        }
        Ok(Duration::from_secs_f64(total))
    }
}

/// Everything the agent runs with, after flags and the config file are merged.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub kubeconfig: Option<PathBuf>,
    /// `--bootstrap-kubeconfig`: credentials to ask for a client certificate with when `kubeconfig` has none.
    pub bootstrap_kubeconfig: Option<PathBuf>,
    /// `--cert-dir`: the certificate store (default `<root-dir>/pki`).
    pub cert_dir: PathBuf,
    pub node_name: String,
    pub node_ip: String,
    pub root_dir: PathBuf,
    /// `podLogsDir` (default `/var/log/pods`).
    pub log_dir: PathBuf,
    pub pod_manifest_path: Option<PathBuf>,
    pub node_labels: Vec<(String, String)>,
    pub register_with_taints: Vec<k8s_openapi::api::core::v1::Taint>,
    pub insecure_registries: Vec<String>,
    pub image_credentials: Option<PathBuf>,
    /// CNI network configurations (the first file by name is used; none: the built-in default network).
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugins are looked for, in order.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// How often the stats provider reads usage (`--housekeeping-interval`).
    pub housekeeping_interval: Duration,
    /// Pressure stall eviction thresholds (`--eviction-pressure-stall`, nodelet's own).
    pub stall_thresholds: Vec<crate::eviction::psi::StallThreshold>,
    /// How often the eviction manager's memory watch reads `memory.available` and `allocatableMemory.available`
    /// between its rounds (`--eviction-memory-watch`, nodelet's own; `None`: only at each round, as upstream).
    pub eviction_memory_watch: Option<Duration>,
    pub kubelet: KubeletConfiguration,
}

/// A Go duration (`10s`, `1m30s`) for flags; at least 100 ms.
/// A Go duration (`1m30s`) as the configuration file writes them.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    go_duration::parse(text)
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = go_duration::parse(text)?;
    if d < Duration::from_millis(100) {
        return Err(format!("{text:?} is shorter than 100ms"));
    }
    Ok(d)
}

/// `key=value,key2=value2` (`--node-labels`).
pub fn parse_labels(text: &str) -> Result<Vec<(String, String)>> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').with_context(|| format!("label {pair:?} is not key=value"))?;
            if k.is_empty() {
                bail!("label {pair:?} has an empty key");
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// `key=value:Effect,key2:Effect` (`--register-with-taints`).
pub fn parse_taints(text: &str) -> Result<Vec<k8s_openapi::api::core::v1::Taint>> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|spec| {
            let (kv, effect) = spec.rsplit_once(':').with_context(|| format!("taint {spec:?} has no :Effect"))?;
            if !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect) {
                bail!("taint {spec:?}: effect must be NoSchedule, PreferNoSchedule or NoExecute");
            }
            let (key, value) = match kv.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (kv, None),
            };
            Ok(k8s_openapi::api::core::v1::Taint { key: key.into(), value, effect: effect.into(), time_added: None })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_durations_and_errors() {
        let c: KubeletConfiguration = serde_yaml::from_str(
            "kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\nmaxPods: 20\nnodeStatusUpdateFrequency: 4s\nimageMinimumGCAge: 1m30s\n",
        )
        .unwrap();
        assert_eq!(c.max_pods, 20);
        assert_eq!(c.node_status_update_frequency, Duration::from_secs(4));
        assert_eq!(c.image_minimum_gc_age, Duration::from_secs(90));
        assert_eq!(c.node_status_report_frequency, Duration::from_secs(300));
        assert_eq!(c.container_log_max_bytes(), 10 << 20);
        // Serialized back as upstream's /configz shows it (Go duration strings, camelCase names).
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["imageMinimumGCAge"], "1m30s");
        assert_eq!(json["streamingConnectionIdleTimeout"], "4h0m0s");
        assert_eq!(json["volumeStatsAggPeriod"], "1m0s");
        assert_eq!(json["maxPods"], 20);
        for (d, text) in [(0, "0s"), (500, "500ms"), (1500, "1.5s"), (61_000, "1m1s"), (3_600_000, "1h0m0s")] {
            assert_eq!(go_duration::format(Duration::from_millis(d)), text);
            assert_eq!(go_duration::parse(text).unwrap(), Duration::from_millis(d));
        }
        let err = serde_yaml::from_str::<KubeletConfiguration>("maxPod: 3\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `maxPod`"), "{err}");
        assert!(serde_yaml::from_str::<KubeletConfiguration>("nodeStatusUpdateFrequency: soon\n").is_err());
        let bad = KubeletConfiguration { kind: Some("Pod".into()), ..Default::default() };
        assert!(bad.validate().is_err());
        assert!(parse_quantity("12Mi").unwrap() == 12 << 20 && parse_quantity("x").is_err());
        let auth: KubeletConfiguration = serde_yaml::from_str(
            "authentication:\n  x509: {clientCAFile: /ca.crt}\n  webhook: {enabled: false}\nauthorization: {mode: AlwaysAllow}\n",
        )
        .unwrap();
        assert_eq!(auth.authentication.x509.client_ca_file.as_deref(), Some(std::path::Path::new("/ca.crt")));
        assert!(!auth.authentication.webhook.enabled && !auth.authentication.anonymous.enabled);
        assert!(auth.validate().is_ok());
        let defaults = KubeletConfiguration::default();
        assert!(defaults.authentication.webhook.enabled && defaults.authorization.mode == "Webhook");
        let bad = KubeletConfiguration { address: "here".into(), ..Default::default() };
        assert!(bad.validate().is_err());
        let bad: KubeletConfiguration = serde_yaml::from_str("authorization: {mode: RBAC}\n").unwrap();
        assert!(bad.validate().is_err());
    }

    /// The KubeletConfiguration `kubeadm join` writes to /var/lib/kubelet/config.yaml (v1.37 defaults).
    const KUBEADM: &str = "apiVersion: kubelet.config.k8s.io/v1beta1
authentication:
  anonymous:
    enabled: false
  webhook:
    cacheTTL: 0s
    enabled: true
  x509:
    clientCAFile: /etc/kubernetes/pki/ca.crt
authorization:
  mode: Webhook
  webhook:
    cacheAuthorizedTTL: 0s
    cacheUnauthorizedTTL: 0s
cgroupDriver: systemd
clusterDNS:
- 10.96.0.10
clusterDomain: cluster.local
containerRuntimeEndpoint: \"\"
cpuManagerReconcilePeriod: 0s
crashLoopBackOff: {}
evictionPressureTransitionPeriod: 0s
fileCheckFrequency: 0s
healthzBindAddress: 127.0.0.1
healthzPort: 10248
httpCheckFrequency: 0s
imageMaximumGCAge: 0s
imageMinimumGCAge: 0s
kind: KubeletConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: \"0\"
    text:
      infoBufferSize: \"0\"
  verbosity: 0
memorySwap: {}
nodeStatusReportFrequency: 0s
nodeStatusUpdateFrequency: 0s
rotateCertificates: true
runtimeRequestTimeout: 0s
shutdownGracePeriod: 0s
shutdownGracePeriodCriticalPods: 0s
staticPodPath: /etc/kubernetes/manifests
streamingConnectionIdleTimeout: 0s
syncFrequency: 0s
volumeStatsAggPeriod: 0s
";

    #[test]
    fn kubeadms_config_is_accepted_with_its_zero_values_defaulted() {
        let (c, ignored) = KubeletConfiguration::parse(KUBEADM).unwrap();
        assert!(c.rotate_certificates);
        assert_eq!(c.static_pod_path, Some(PathBuf::from("/etc/kubernetes/manifests")));
        assert_eq!(c.cluster_dns, ["10.96.0.10"]);
        assert_eq!(c.healthz_port, 10248);
        let d = KubeletConfiguration::default();
        assert_eq!(c.node_status_update_frequency, d.node_status_update_frequency);
        assert_eq!(c.streaming_connection_idle_timeout, Duration::from_secs(4 * 3600));
        assert_eq!(c.authentication.webhook.cache_ttl, Duration::from_secs(120));
        assert_eq!(c.authorization.webhook.cache_unauthorized_ttl, Duration::from_secs(30));
        assert_eq!(c.eviction_pressure_transition_period, Duration::from_secs(300));
        assert!(!c.authentication.anonymous.enabled);
        for field in ["cgroupDriver", "containerRuntimeEndpoint", "logging", "syncFrequency", "memorySwap"] {
            assert!(NOT_ACTED_ON.contains(&field));
            assert!(ignored.contains(&field.to_string()), "{field} in {ignored:?}");
        }
        // A field nodelet has is never in the list (it would be dropped before it is read).
        let modelled = serde_json::to_value(KubeletConfiguration::default()).unwrap();
        for field in modelled.as_object().unwrap().keys() {
            assert!(!NOT_ACTED_ON.contains(&field.as_str()), "{field} is acted on");
        }
        // A field upstream does not have is still an error.
        assert!(
            KubeletConfiguration::parse("cgroupDriverr: systemd\n").unwrap_err().to_string().contains("unknown field")
        );
        assert_eq!(KubeletConfiguration::parse("").unwrap().1, Vec::<String>::new());
        let taints = KubeletConfiguration::parse("registerWithTaints: [{key: a, value: b, effect: NoSchedule}]\n");
        assert_eq!(taints.unwrap().0.register_with_taints[0].key, "a");
    }

    #[test]
    fn labels_and_taints() {
        assert_eq!(parse_labels("a=b,c=").unwrap(), [("a".into(), "b".into()), ("c".into(), "".into())]);
        assert!(parse_labels("novalue").is_err());
        let t = parse_taints("dedicated=gpu:NoSchedule,spot:PreferNoSchedule").unwrap();
        assert_eq!(
            (t[0].key.as_str(), t[0].value.as_deref(), t[0].effect.as_str()),
            ("dedicated", Some("gpu"), "NoSchedule")
        );
        assert_eq!((t[1].key.as_str(), t[1].value.as_deref()), ("spot", None));
        assert!(parse_taints("x=y:Sometimes").is_err());
    }
}
