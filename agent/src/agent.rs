//! Wires the node together: runtime, images, cgroups, status manager, pod workers, pod sources and (with an API
//! server) node registration and heartbeats. Data flows one way: sources -> pod workers -> runtime -> status.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nodelet_cgroups::hierarchy::{Allocatable, Hierarchy};
use nodelet_runtime::{Runtime, Zygote};
use tokio::sync::mpsc;

use crate::config::AgentConfig;
use crate::events::Recorder;
use crate::images::{ImageManager, ImagesConfig};
use crate::network::dns::NodeDns;
use crate::network::{Network, NetworkConfig};
use crate::node::{NodeFacts, NodeManager};
use crate::pods::restore::{Leftovers, SavedStates};
use crate::pods::services::ContainerRuntime;
use crate::pods::{Ctx, PodWorkers};
use crate::server::{KubeletApi, auth::Auth, tls};
use crate::status::StatusManager;
use crate::status::view::PodView;

/// The built-in pod network's range when neither `--pod-cidr` nor the Node's `spec.podCIDR` gives one.
const DEFAULT_POD_CIDR: &str = "10.88.0.0/16";

/// A kube client configuration from a kubeconfig file.
pub async fn kube_config(path: &std::path::Path) -> Result<kube::Config> {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .with_context(|| format!("{}: invalid kubeconfig", path.display()))
}

/// A kube client from a kubeconfig file.
pub async fn client_from(path: &std::path::Path) -> Result<kube::Client> {
    let config = kube_config(path).await?;
    let host = config.cluster_url.authority().map(ToString::to_string).unwrap_or_default();
    let builder = kube::client::ClientBuilder::try_from(config).context("building the API client")?;
    Ok(builder.with_layer(&crate::metrics::rest_client::CountRequests { host }).build())
}

/// Starts the kubelet API: on the local socket always (root only: `nodelet exec`), on TCP with TLS when there is
/// an API server or when configured to need none (AlwaysAllow).
/// What the kubelet API's read-only endpoints serve from.
struct ApiViews {
    pods: PodView,
    stats: crate::stats::StatsProvider,
    node: crate::server::NodeDocuments,
    oom: crate::oom::OomLog,
}

fn start_kubelet_api(
    config: &AgentConfig,
    client: Option<kube::Client>,
    views: ApiViews,
    runtime: Arc<dyn ContainerRuntime>,
    attachments: crate::pods::attach::Attachments,
) -> Result<()> {
    let ApiViews { pods, stats, node, oom } = views;
    let kubelet = &config.kubelet;
    let streaming = crate::server::streaming::Streaming {
        runtime,
        spdy: crate::streaming::spdy::Config {
            idle_timeout: kubelet.streaming_connection_idle_timeout,
            ..Default::default()
        },
        websockets: kubelet.feature("ExtendWebSocketsToKubelet"),
        attachments,
    };
    // The local socket speaks every protocol nodelet has, whatever the node declares.
    let local = crate::server::streaming::Streaming { websockets: true, ..streaming.clone() };
    let local = Arc::new(KubeletApi {
        pods: pods.clone(),
        pod_logs_dir: config.log_dir.clone(),
        streaming: local,
        stats: stats.clone(),
        node: node.clone(),
        oom: oom.clone(),
    });
    if kubelet.healthz_port != 0 {
        let ip: std::net::IpAddr = kubelet.healthz_bind_address.parse().context("healthzBindAddress")?;
        let address = std::net::SocketAddr::new(ip, kubelet.healthz_port);
        tokio::spawn(crate::server::serve_healthz(address, local.clone()));
    }
    let listener = bind_local(&crate::server::local_socket(&config.root_dir))?;
    tokio::spawn(async move {
        if let Err(e) = crate::server::serve_local(listener, local).await {
            tracing::error!(error = %format!("{e:#}"), "the local kubelet API stopped");
        }
    });
    let auth = match Auth::new(kubelet, client.clone(), &config.node_name) {
        Ok(auth) => auth,
        Err(e) if config.kubeconfig.is_none() => {
            tracing::info!("kubelet API off on TCP: {e}");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let configured = kubelet
        .tls_cert_file
        .clone()
        .zip(kubelet.tls_private_key_file.clone())
        .map(|(cert, key)| tls::TlsFiles { cert, key });
    let client_ca = kubelet.authentication.x509.client_ca_file.as_deref();
    let tls = match (&client, configured) {
        // The cluster signs the serving certificate (and its renewals).
        (Some(client), None) if kubelet.server_tls_bootstrap => {
            let identity = Arc::new(crate::certificate::serving::ServingIdentity::default());
            let store = crate::certificate::store::CertStore::new(&config.cert_dir, "kubelet-server");
            let names = vec![config.node_name.clone()];
            let ips = config.node_ip.parse().into_iter().collect();
            let request = crate::certificate::csr::Request::serving(&config.node_name, names, ips);
            tokio::spawn(crate::certificate::serving::run(client.clone(), store, request, identity.clone()));
            tls::server_config_resolving(identity, client_ca)
        }
        (_, configured) => {
            let pki = config.root_dir.join("pki");
            let files = tls::serving_files(configured, &pki, &config.node_name, &config.node_ip)?;
            tls::server_config(&files, client_ca)
        }
    }
    .context("the kubelet API's TLS configuration")?;
    let ip: std::net::IpAddr = kubelet.address.parse().context("address")?;
    let api = Arc::new(KubeletApi { pods, pod_logs_dir: config.log_dir.clone(), streaming, stats, node, oom });
    let address = std::net::SocketAddr::new(ip, kubelet.port);
    // Bound here so that a taken port is a startup error, not a log line.
    let listener =
        std::net::TcpListener::bind(address).with_context(|| format!("binding the kubelet API to {address}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        if let Err(e) = crate::server::serve(listener, tls, auth, api).await {
            tracing::error!(error = %format!("{e:#}"), "the kubelet API stopped");
        }
    });
    Ok(())
}

/// Binds the local socket at `path`, in a directory only root may enter (the socket of a previous process, which
/// the root-dir lock says is gone, is replaced).
fn bind_local(path: &std::path::Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path.parent().context("the local socket's directory")?;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the old {}", path.display()));
        }
        _ => {}
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("binding the local kubelet API to {}", path.display()))
}

/// Runs the node until SIGTERM or SIGINT. Containers keep running when the agent stops (like the kubelet).
pub async fn run(config: AgentConfig, zygote: Zygote) -> Result<()> {
    let runtime = Runtime::new(zygote, config.root_dir.join("runtime")).context("starting the runtime")?;
    let leftovers = Leftovers::find(&runtime).await;
    let images = Arc::new(ImageManager::open(ImagesConfig {
        root_dir: config.root_dir.clone(),
        registry: crate::images::pull::RegistryConfig {
            insecure_registries: config.insecure_registries.clone(),
            max_layer_bytes: None,
        },
        credentials_file: config.image_credentials.clone(),
        gc: crate::images::gc::GcPolicy {
            high_threshold_percent: config.kubelet.image_gc_high_threshold_percent,
            low_threshold_percent: config.kubelet.image_gc_low_threshold_percent,
            minimum_age: config.kubelet.image_minimum_gc_age,
        },
    })?);
    let facts = NodeFacts::gather(&config)?;
    // Admission counts against allocatable; the kubepods cgroup is limited to capacity less reservations
    // (`enforceNodeAllocatable: [pods]`, upstream's default), evictions acting before that limit is reached.
    let allocatable = (facts.allocatable.cpu_millis, facts.allocatable.memory_bytes);
    let hierarchy = Hierarchy::detect(config.kubelet.cgroup_root.as_deref().unwrap_or("/")).context("cgroups")?;
    let pods_limit = Allocatable {
        cpu_millis: facts.pods_limit.cpu_millis,
        memory_bytes: facts.pods_limit.memory_bytes,
        pids: None,
    };
    hierarchy.ensure_node(pods_limit).context("creating the kubepods cgroups")?;
    let pods_memory = config.kubelet.enforces_pods_allocatable()?.then(|| crate::node::conditions::PodsMemory {
        hierarchy: hierarchy.clone(),
        limit: facts.pods_limit.memory_bytes,
    });
    let client = match &config.kubeconfig {
        Some(path) => Some(crate::certificate::api_client(&config, path).await?),
        None => None,
    };
    // The built-in network's range: --pod-cidr, else the Node's spec.podCIDR (from the controller-manager) if the
    // Node exists already and the API server answers at once (static pods must not wait for it: on a kubeadm
    // control-plane node the API server is one of them), else the default.
    let pod_cidr = match (&config.kubelet.pod_cidr, &client) {
        (Some(cidr), _) => cidr.clone(),
        (None, Some(client)) => {
            let node = tokio::time::timeout(Duration::from_secs(2), crate::node::get(client, &config.node_name)).await;
            let assigned = node.ok().and_then(Result::ok).and_then(|n| n.spec?.pod_cidr).filter(|c| !c.is_empty());
            assigned.unwrap_or_else(|| DEFAULT_POD_CIDR.into())
        }
        (None, None) => DEFAULT_POD_CIDR.into(),
    };
    tracing::info!(%pod_cidr, "the built-in pod network's range (used when --cni-conf-dir has no configuration)");
    let view = PodView::default();
    let (status_tx, status_rx) = mpsc::unbounded_channel();
    tokio::spawn(StatusManager::new(client.clone(), config.root_dir.clone(), view.clone()).run(status_rx));
    let container_runtime: Arc<dyn ContainerRuntime> = Arc::new(crate::pods::services::RealRuntime::new(runtime));
    let attachments = crate::pods::attach::Attachments::default();
    let stats = crate::stats::StatsProvider::start(
        crate::stats::collector::Layout {
            node_name: config.node_name.clone(),
            root_dir: config.root_dir.clone(),
            log_dir: config.log_dir.clone(),
            disk_usage_period: config.kubelet.volume_stats_agg_period,
        },
        Arc::new(crate::stats::readings::HostReadings::new(hierarchy.clone())),
        view.clone(),
        config.housekeeping_interval,
    );
    let documents = crate::server::NodeDocuments {
        configz: Arc::new(serde_json::to_value(&config.kubelet).context("serializing the configuration")?),
        spec: Arc::new(facts.machine_spec()),
    };
    let oom = crate::oom::OomLog::open(&config.root_dir);
    let (evict_tx, evict_rx) = mpsc::unbounded_channel();
    let (stall_tx, stall_rx) = mpsc::unbounded_channel();
    crate::eviction::psi::arm(&config.stall_thresholds, &hierarchy.unified("kubepods"), stall_tx)
        .map_err(anyhow::Error::msg)
        .context("--eviction-pressure-stall")?;
    let thresholds = config.kubelet.eviction_thresholds().map_err(anyhow::Error::msg)?;
    let (thresholds, ignored) =
        crate::eviction::thresholds::with_container_fs(thresholds, containers_on_imagefs(&config.root_dir));
    for warning in ignored {
        tracing::warn!("eviction thresholds: {warning}");
    }
    let pressure = crate::eviction::EvictionManager::start(
        crate::eviction::Settings {
            root_dir: config.root_dir.clone(),
            thresholds,
            max_pod_grace: std::time::Duration::from_secs(
                config.kubelet.eviction_max_pod_grace_period.max(0).unsigned_abs(),
            ),
            interval: config.housekeeping_interval,
            pods_memory,
            memory_watch: config.eviction_memory_watch,
            oom_sampler: Some(crate::eviction::memory_watch::Sampler {
                samples: oom.samples().clone(),
                pods_pressure: hierarchy.unified("kubepods").join("memory.pressure"),
            }),
            transition_period: config.kubelet.eviction_pressure_transition_period,
            stall_thresholds: config.stall_thresholds.clone(),
            reclaim_disk: Some({
                let images = images.clone();
                Arc::new(move || match images.delete_unused_images() {
                    Ok(report) => report.bytes_freed,
                    Err(e) => {
                        tracing::warn!(error = %e, "removing unused images under disk pressure");
                        0
                    }
                })
            }),
        },
        view.clone(),
        stats.clone(),
        evict_tx,
        stall_rx,
    );
    let views = ApiViews { pods: view.clone(), stats, node: documents, oom: oom.clone() };
    start_kubelet_api(&config, client.clone(), views, container_runtime.clone(), attachments.clone())?;
    let network = Arc::new(Network::new(NetworkConfig {
        conf_dir: config.cni_conf_dir.clone(),
        bin_dirs: config.cni_bin_dirs.clone(),
        pod_cidr,
        root_dir: config.root_dir.clone(),
        dns: NodeDns {
            cluster_dns: config.kubelet.cluster_dns.clone(),
            cluster_domain: config.kubelet.cluster_domain.clone(),
            host_resolv_conf: std::fs::read_to_string(&config.kubelet.resolv_conf).unwrap_or_default(),
        },
        node_name: config.node_name.clone(),
    }));
    let user_namespaces = Arc::new(user_namespaces(&config).context("user namespaces")?);
    let facts = NodeFacts { user_namespaces: user_namespaces.supported(), ..facts };
    let ctx = Arc::new(Ctx {
        runtime: container_runtime,
        images: images.clone(),
        hierarchy: Arc::new(hierarchy),
        config: config.clone(),
        client: client.clone(),
        events: Recorder::new(client.clone(), config.node_name.clone()),
        status: status_tx,
        view,
        leftovers,
        states: SavedStates::new(&config.root_dir),
        volumes: crate::volumes::VolumeManager::new(
            &config.root_dir,
            client.clone(),
            crate::pods::downward_api::Allocatable {
                cpu_millis: facts.allocatable.cpu_millis,
                memory_bytes: facts.allocatable.memory_bytes,
                ephemeral_storage_bytes: facts.allocatable.ephemeral_storage_bytes,
            },
        ),
        services: client.clone().map(crate::pods::service_env::ServiceCache::start),
        network: network.clone(),
        allocatable,
        min_oom_score_adj: std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0),
        attachments,
        oom,
        admission: crate::pods::admission::Policy::of_host(&config.kubelet.allowed_unsafe_sysctls)
            .map_err(anyhow::Error::msg)
            .context("allowedUnsafeSysctls")?,
        pressure: pressure.clone(),
        user_namespaces,
    });
    let manifests = config.pod_manifest_path.clone().or(config.kubelet.static_pod_path.clone());
    let sources = usize::from(manifests.is_some()) + usize::from(client.is_some());
    let (source_tx, source_rx) = mpsc::channel(64);
    let mut workers = PodWorkers::new(ctx, sources);
    workers.take_evictions(evict_rx);
    tokio::spawn(workers.run(source_rx));
    let (statics_tx, statics_rx) = tokio::sync::watch::channel(Default::default());
    if let Some(dir) = manifests {
        tokio::spawn(crate::sources::file::watch(dir, config.node_name.clone(), source_tx.clone(), statics_tx));
    }
    if let Some(client) = client.clone() {
        let node = Arc::new(NodeManager::new(
            client.clone(),
            config.clone(),
            images.clone(),
            network.clone(),
            pressure,
            facts,
        )?);
        node.register().await?;
        let lease = node.clone();
        tokio::spawn(async move { lease.run_lease().await });
        tokio::spawn(async move { node.run_status().await });
        tokio::spawn(crate::sources::mirror::run(client.clone(), config.node_name.clone(), statics_rx));
        tokio::spawn(crate::sources::api::watch(client, config.node_name.clone(), source_tx.clone()));
    }
    drop(source_tx);
    let gc_images = images.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(300)).await;
            // File I/O over the whole store: off the async threads.
            let images = gc_images.clone();
            match tokio::task::spawn_blocking(move || images.garbage_collect(&Default::default())).await {
                Ok(Err(e)) => tracing::warn!(error = %e, "image GC failed"),
                Err(e) => tracing::warn!(error = %e, "image GC stopped"),
                Ok(Ok(_)) => {}
            }
        }
    });
    tracing::info!(node = %config.node_name, standalone = config.kubeconfig.is_none(), "nodelet is running");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping; containers keep running");
    Ok(())
}

/// The user namespace manager: upstream's ranges, and whether idmapped mounts work where the images and pods'
/// files are (pods with `hostUsers: false` are refused with the reason where they do not).
fn user_namespaces(config: &AgentConfig) -> Result<crate::pods::user_namespaces::UserNamespaces> {
    use crate::pods::user_namespaces::{UserNamespaces, node_kubelet_mappings};
    let ids = config.kubelet.user_namespaces.ids_per_pod();
    let mappings = node_kubelet_mappings(ids).map_err(anyhow::Error::msg).context("kubelet mappings")?;
    let unsupported = nodelet_runtime::idmap::supported(&config.root_dir).err();
    if let Some(why) = &unsupported {
        tracing::warn!(reason = %why, "pods with hostUsers: false cannot run on this node");
    }
    UserNamespaces::new(&config.root_dir.join("pods"), ids, mappings, config.kubelet.max_pods, unsupported)
        .map_err(anyhow::Error::msg)
}

/// Whether the writable layers share a filesystem of the images' own (something mounted at the image store, the
/// writable layers on it too): upstream's dedicated image filesystem without a split, whose `containerfs`
/// thresholds are the `imagefs` ones. A directory not made yet is on the root dir's filesystem.
fn containers_on_imagefs(root_dir: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let device = |path: &std::path::Path| std::fs::metadata(path).map(|m| m.dev()).ok();
    let root = device(root_dir);
    let images = device(&crate::images::store_dir(root_dir)).or(root);
    let layers = device(&crate::images::rootfs_dir(root_dir)).or(root);
    images != root && layers == images
}
