//! `nodelet`: a Kubernetes node in one binary. Without a subcommand it runs the node: registered with the API
//! server named by `--kubeconfig`, or standalone on the static pods of `--pod-manifest-path`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use nodelet::config::{AgentConfig, KubeletConfiguration, parse_labels, parse_taints};
use nodelet::images::{ImageManager, ImagesConfig, PullPolicy, pull::Progress};

/// Command-line flags, named like the kubelet's where they exist.
#[derive(Debug, Parser)]
#[command(name = "nodelet", about = "A Kubernetes node in one binary", disable_version_flag = true)]
struct Flags {
    /// Print the version as the kubelet does (`Kubernetes v1.37.0+nodelet.0.1.0`: the kubelet API version
    /// implemented, then nodelet's own; kubeadm's preflight parses it) and exit.
    #[arg(long)]
    version: bool,
    /// Kubeconfig of the API server to register with; without it, the node runs standalone (static pods only).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// A kubeconfig with bootstrap credentials (a bootstrap token): when `--kubeconfig` is missing or its
    /// certificate expired, a client certificate is requested with them and `--kubeconfig` written (TLS
    /// bootstrap).
    #[arg(long)]
    bootstrap_kubeconfig: Option<PathBuf>,
    /// The certificate store (default `<root-dir>/pki`).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Accepted for kubeadm's drop-ins, not acted on: nodelet's runtime is built in.
    #[arg(long, hide = true)]
    container_runtime_endpoint: Option<String>,
    /// Overrides `healthzPort` (the plain-HTTP `/healthz`; 0 turns it off).
    #[arg(long)]
    healthz_port: Option<u16>,
    /// Overrides `healthzBindAddress`.
    #[arg(long)]
    healthz_bind_address: Option<String>,
    /// Overrides `rotateCertificates`.
    #[arg(long)]
    rotate_certificates: Option<bool>,
    /// The node's name (default: the host name).
    #[arg(long)]
    hostname_override: Option<String>,
    /// The node's InternalIP (default: the first global IPv4 address, else 127.0.0.1).
    #[arg(long)]
    node_ip: Option<String>,
    /// Directory for nodelet's state: images, container rootfs mounts, runtime records.
    #[arg(long, default_value = "/var/lib/nodelet", global = true)]
    root_dir: PathBuf,
    /// Folder of static pod manifests (YAML or JSON, one Pod per file).
    #[arg(long)]
    pod_manifest_path: Option<PathBuf>,
    /// A KubeletConfiguration (kubelet.config.k8s.io/v1beta1) file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides `maxPods`.
    #[arg(long)]
    max_pods: Option<u32>,
    /// Overrides `cgroupRoot` (default `/`).
    #[arg(long)]
    cgroup_root: Option<String>,
    /// Overrides `port` (the kubelet API, default 10250).
    #[arg(long)]
    port: Option<u16>,
    /// Overrides `address` (the kubelet API's bind address, default 0.0.0.0).
    #[arg(long)]
    address: Option<String>,
    /// Overrides `tlsCertFile` (the kubelet API's serving certificate, PEM).
    #[arg(long)]
    tls_cert_file: Option<PathBuf>,
    /// Overrides `tlsPrivateKeyFile`.
    #[arg(long)]
    tls_private_key_file: Option<PathBuf>,
    /// Overrides `authentication.x509.clientCAFile`: client certificates signed by it authenticate.
    #[arg(long)]
    client_ca_file: Option<PathBuf>,
    /// CNI network configurations: the first file by name is used; without one, the built-in default network
    /// (bridge `nodelet0`, host-local IPAM over `--pod-cidr`, portmap).
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Directories with CNI plugins, comma-separated.
    #[arg(long, default_value = "/opt/cni/bin,/usr/lib/cni")]
    cni_bin_dir: String,
    /// Overrides `podCIDR`: the built-in default network's range (default 10.88.0.0/16).
    #[arg(long)]
    pod_cidr: Option<String>,
    /// Overrides `clusterDNS`: DNS servers for ClusterFirst pods, comma-separated.
    #[arg(long)]
    cluster_dns: Option<String>,
    /// Overrides `clusterDomain`.
    #[arg(long)]
    cluster_domain: Option<String>,
    /// Overrides `allowedUnsafeSysctls`: sysctls (names or `prefix*`) pods may set beyond the safe set,
    /// comma-separated.
    #[arg(long)]
    allowed_unsafe_sysctls: Option<String>,
    /// Overrides `seccompDefault`: containers without a seccomp profile run under `RuntimeDefault`.
    #[arg(long)]
    seccomp_default: Option<bool>,
    /// Labels to register the node with: `key=value,...`.
    #[arg(long, default_value = "")]
    node_labels: String,
    /// Taints to register the node with: `key=value:Effect,...`.
    #[arg(long, default_value = "")]
    register_with_taints: String,
    /// A registry (`host[:port]`) reached over plain HTTP instead of HTTPS. Repeatable.
    #[arg(long = "insecure-registry", global = true)]
    insecure_registries: Vec<String>,
    /// Docker `config.json` with the node's registry credentials.
    #[arg(long, global = true)]
    image_credentials: Option<PathBuf>,
    /// How often resource usage is read for the summary API and the metrics endpoints (cAdvisor's flag).
    #[arg(long, default_value = "10s", value_parser = nodelet::config::parse_duration)]
    housekeeping_interval: std::time::Duration,
    /// Evict when the pods' pressure stall passes `SIGNAL=STALL/WINDOW` (nodelet's own, beyond upstream; e.g.
    /// `memory.pressure.full=100ms/1s`; also `memory.pressure.some`, `cpu.pressure.some`). Repeatable.
    #[arg(long = "eviction-pressure-stall", value_parser = parse_stall)]
    eviction_pressure_stall: Vec<nodelet::eviction::psi::StallThreshold>,
    /// How often memory.available and allocatableMemory.available are read between eviction rounds, so that a
    /// memory threshold evicts within this time, not at the next 10 s round (nodelet's own; `0s`: only at each
    /// round, as upstream).
    #[arg(long, default_value = "100ms", value_parser = parse_watch)]
    eviction_memory_watch: WatchInterval,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with the node's image store.
    #[command(subcommand)]
    Image(ImageCommand),
    /// List the pods of a standalone node (as its status manager last wrote them).
    Ps,
    /// Run a command in a running container on this node (through the agent's local kubelet API socket).
    Exec {
        /// Pod name (standalone static pods carry the node name as a suffix; the name before it is enough).
        pod: String,
        /// Container (default: the pod's `kubectl.kubernetes.io/default-container`, else its first).
        #[arg(short = 'c', long)]
        container: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Pass stdin to the command.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Allocate a terminal (when stdin is one).
        #[arg(short = 't', long)]
        tty: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a container's log on this node.
    Logs {
        /// Pod name (standalone static pods carry the node name as a suffix; a prefix is enough).
        pod: String,
        /// Container (default: the pod's first).
        #[arg(short = 'c', long)]
        container: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// `podLogsDir`.
        #[arg(long, default_value = "/var/log/pods")]
        pod_logs_dir: PathBuf,
    },
    /// CPU, memory and pressure (PSI) of the node and its pods, from the agent's last housekeeping round.
    Top {
        /// One row per container.
        #[arg(long)]
        containers: bool,
        /// Only this namespace (default: all).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// The OOM kills the agent recorded: process, limit, memory and pressure at the kill, how fast it heard.
    Oom {
        /// Only this pod's (`NAME` or `NAMESPACE/NAME`).
        #[arg(long)]
        pod: Option<String>,
    },
    /// GET a path of the agent's kubelet API (e.g. `/stats/summary`, `/metrics/cadvisor`) and print the answer.
    Raw {
        /// The path, with its query.
        path: String,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Pull an image (always contacts the registry) and unpack it.
    Pull { image: String },
    /// Import an image from an OCI layout directory (e.g. written by umoci or `skopeo copy ... oci:DIR:TAG`).
    Import {
        /// The layout directory.
        layout: PathBuf,
        /// The name pods will use, e.g. `nodelet.local/busybox:latest`.
        name: String,
        /// The tag in the layout (`org.opencontainers.image.ref.name`); default: its only image.
        #[arg(long)]
        tag: Option<String>,
    },
    /// List stored images.
    Ls,
    /// Verify every blob and layer of the store; exits 1 if something is wrong.
    Check,
}

fn main() -> Result<()> {
    let flags = Flags::parse();
    if flags.version {
        println!("Kubernetes {}", nodelet::node::info::kubelet_version());
        return Ok(());
    }
    tracing_subscriber::fmt()
        // libcgroups warns about every v1 controller it does not know, for every container: kept out by default.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NODELET_LOG")
                .unwrap_or_else(|_| "info,libcgroups=error".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: files and journals get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match flags.command {
        Some(Command::Image(command)) => {
            let config = images_config(&flags.root_dir, flags.insecure_registries, flags.image_credentials);
            let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
            runtime.block_on(image_command(config, command))
        }
        Some(Command::Ps) => ps(&flags.root_dir),
        Some(Command::Exec { pod, container, namespace, stdin, tty, command }) => {
            let request = nodelet::cli::exec::ExecRequest { namespace, pod, container, command, stdin, tty };
            let socket = nodelet::server::local_socket(&flags.root_dir);
            let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
            let code = runtime.block_on(nodelet::cli::exec::exec(&socket, &request));
            // Without waiting for tokio's stdin thread, which may sit in a read.
            runtime.shutdown_background();
            std::process::exit(code?)
        }
        Some(Command::Top { containers, namespace }) => {
            let socket = nodelet::server::local_socket(&flags.root_dir);
            let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
            let body = runtime.block_on(nodelet::cli::get(&socket, "/stats/summary"))?;
            let summary = serde_json::from_slice(&body).context("the agent's /stats/summary")?;
            let options = nodelet::cli::top::TopOptions { containers, namespace };
            print!("{}", nodelet::cli::top::render(&summary, &options));
            Ok(())
        }
        Some(Command::Oom { pod }) => {
            let socket = nodelet::server::local_socket(&flags.root_dir);
            let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
            let query: String =
                form_urlencoded::Serializer::new(String::new()).extend_pairs(&pod.map(|p| ("pod", p))).finish();
            let body = runtime.block_on(nodelet::cli::get(&socket, &format!("/debug/oom?{query}")))?;
            let kills: Vec<nodelet::oom::OomKill> = serde_json::from_slice(&body).context("the agent's /debug/oom")?;
            print!("{}", nodelet::cli::oom::render(&kills));
            Ok(())
        }
        Some(Command::Raw { path }) => {
            let socket = nodelet::server::local_socket(&flags.root_dir);
            let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
            let body = runtime.block_on(nodelet::cli::get(&socket, &path))?;
            std::io::Write::write_all(&mut std::io::stdout(), &body)?;
            Ok(())
        }
        Some(Command::Logs { ref pod, ref container, ref namespace, ref pod_logs_dir }) => {
            logs(pod_logs_dir, namespace, pod, container.as_deref())
        }
        None => {
            // Before anything else: the agent, and so the zygote and every process that enters a container,
            // runs from a read-only mount of its binary (CVE-2019-5736; see nodelet_runtime::exe).
            if let Err(e) = nodelet_runtime::exe::reexec_read_only() {
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } == 0 {
                    anyhow::bail!("protecting the nodelet binary from containers (CVE-2019-5736): {e}");
                }
                tracing::warn!(error = %e, "not root: the nodelet binary is not protected from containers");
            }
            // The kernel's OOM killer must pick a container, never the node (the zygote inherits this; containers
            // get theirs per QoS class).
            if let Err(e) =
                std::fs::write("/proc/self/oom_score_adj", nodelet::pods::resources::AGENT_OOM_SCORE_ADJ.to_string())
            {
                tracing::warn!(error = %e, "setting the agent's own oom_score_adj");
            }
            // The zygote must exist before any thread: fork it first, then start tokio.
            let zygote = nodelet_runtime::Zygote::fork().context("forking the runtime's zygote")?;
            // One nodelet per root dir, decided before anything there is read or taken over (after the fork, so
            // the zygote does not hold the lock too).
            let _lock = nodelet::root_lock::acquire(&flags.root_dir)?;
            let config = agent_config(flags)?;
            let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
            runtime.block_on(nodelet::agent::run(config, zygote))
        }
    }
}

/// `--eviction-memory-watch`: an interval, or none.
#[derive(Debug, Clone, Copy)]
struct WatchInterval(Option<std::time::Duration>);

fn parse_watch(text: &str) -> Result<WatchInterval, String> {
    nodelet::eviction::memory_watch::parse_interval(text).map(WatchInterval)
}

fn parse_stall(spec: &str) -> Result<nodelet::eviction::psi::StallThreshold, String> {
    nodelet::eviction::psi::parse(spec)
}

fn agent_config(flags: Flags) -> Result<AgentConfig> {
    let mut kubelet = match &flags.config {
        Some(path) => {
            let (config, not_acted_on) = KubeletConfiguration::load(path)?;
            if !not_acted_on.is_empty() {
                tracing::info!("{}: accepted, not acted on by nodelet: {}", path.display(), not_acted_on.join(", "));
            }
            config
        }
        None => KubeletConfiguration::default(),
    };
    if let Some(endpoint) = &flags.container_runtime_endpoint {
        tracing::info!(%endpoint, "--container-runtime-endpoint: accepted, not acted on (nodelet's runtime is built in)");
    }
    if let Some(n) = flags.max_pods {
        anyhow::ensure!(n > 0, "--max-pods must be positive");
        kubelet.max_pods = n;
    }
    if flags.cgroup_root.is_some() {
        kubelet.cgroup_root = flags.cgroup_root.clone();
    }
    kubelet.port = flags.port.unwrap_or(kubelet.port);
    kubelet.address = flags.address.clone().unwrap_or(kubelet.address);
    if flags.tls_cert_file.is_some() || flags.tls_private_key_file.is_some() {
        kubelet.tls_cert_file = flags.tls_cert_file.clone();
        kubelet.tls_private_key_file = flags.tls_private_key_file.clone();
    }
    if flags.client_ca_file.is_some() {
        kubelet.authentication.x509.client_ca_file = flags.client_ca_file.clone();
    }
    if flags.pod_cidr.is_some() {
        kubelet.pod_cidr = flags.pod_cidr.clone();
    }
    if let Some(dns) = &flags.cluster_dns {
        kubelet.cluster_dns = dns.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
    }
    if flags.cluster_domain.is_some() {
        kubelet.cluster_domain = flags.cluster_domain.clone();
    }
    if let Some(list) = &flags.allowed_unsafe_sysctls {
        kubelet.allowed_unsafe_sysctls = list.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
    }
    kubelet.seccomp_default = flags.seccomp_default.unwrap_or(kubelet.seccomp_default);
    kubelet.rotate_certificates = flags.rotate_certificates.unwrap_or(kubelet.rotate_certificates);
    kubelet.healthz_port = flags.healthz_port.unwrap_or(kubelet.healthz_port);
    kubelet.healthz_bind_address = flags.healthz_bind_address.clone().unwrap_or(kubelet.healthz_bind_address);
    kubelet.validate().context("invalid flags")?;
    let node_name = match flags.hostname_override {
        Some(name) => name,
        None => rustix::system::uname().nodename().to_string_lossy().into_owned(),
    }
    .to_lowercase();
    anyhow::ensure!(!node_name.is_empty(), "the node name is empty: pass --hostname-override");
    if flags.kubeconfig.is_none() && flags.pod_manifest_path.is_none() && kubelet.static_pod_path.is_none() {
        anyhow::bail!("nothing to run: pass --kubeconfig (join a cluster) or --pod-manifest-path (standalone)");
    }
    let node_ip = match flags.node_ip {
        Some(ip) => {
            ip.parse::<std::net::IpAddr>().with_context(|| format!("--node-ip {ip:?} is not an IP address"))?;
            ip
        }
        None => default_node_ip(),
    };
    anyhow::ensure!(
        flags.bootstrap_kubeconfig.is_none() || flags.kubeconfig.is_some(),
        "--bootstrap-kubeconfig needs --kubeconfig: the file TLS bootstrap writes"
    );
    Ok(AgentConfig {
        kubeconfig: flags.kubeconfig,
        bootstrap_kubeconfig: flags.bootstrap_kubeconfig,
        cert_dir: flags.cert_dir.unwrap_or_else(|| flags.root_dir.join("pki")),
        node_name,
        node_ip,
        root_dir: flags.root_dir,
        log_dir: kubelet.pod_logs_dir.clone(),
        pod_manifest_path: flags.pod_manifest_path,
        node_labels: parse_labels(&flags.node_labels).context("--node-labels")?,
        register_with_taints: {
            let mut taints = kubelet.register_with_taints.clone();
            taints.extend(parse_taints(&flags.register_with_taints).context("--register-with-taints")?);
            taints
        },
        insecure_registries: flags.insecure_registries,
        image_credentials: flags.image_credentials,
        cni_conf_dir: flags.cni_conf_dir,
        cni_bin_dirs: flags.cni_bin_dir.split(',').filter(|s| !s.is_empty()).map(PathBuf::from).collect(),
        housekeeping_interval: flags.housekeeping_interval,
        stall_thresholds: flags.eviction_pressure_stall,
        eviction_memory_watch: flags.eviction_memory_watch.0,
        kubelet,
    })
}

/// The first global IPv4 address from `ip -4 -o addr`-like data in /proc (falls back to loopback).
fn default_node_ip() -> String {
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let addresses: Vec<(String, std::net::Ipv4Addr)> = nix::ifaddrs::getifaddrs()
        .map(|all| {
            all.filter_map(|a| {
                let ip = a.address?.as_sockaddr_in()?.ip();
                Some((a.interface_name, ip))
            })
            .collect()
        })
        .unwrap_or_default();
    nodelet::node::address::default_node_ip(&routes, &addresses).to_string()
}

fn images_config(root: &std::path::Path, insecure: Vec<String>, credentials: Option<PathBuf>) -> ImagesConfig {
    ImagesConfig {
        root_dir: root.to_owned(),
        registry: nodelet::images::pull::RegistryConfig { insecure_registries: insecure, max_layer_bytes: None },
        credentials_file: credentials,
        gc: Default::default(),
    }
}

fn ps(root: &std::path::Path) -> Result<()> {
    println!(
        "{:<16} {:<40} {:<10} {:<9} {:>8}  {:<15}  CONTAINERS",
        "NAMESPACE", "NAME", "PHASE", "READY", "RESTARTS", "IP"
    );
    let dir = root.join("pods");
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read(entry.path().join("status.json")) else { continue };
        let local: nodelet::status::LocalStatus =
            serde_json::from_slice(&text).with_context(|| format!("{}", entry.path().display()))?;
        rows.push(local);
    }
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for p in rows {
        let statuses = p.status.container_statuses.unwrap_or_default();
        let ready = statuses.iter().filter(|c| c.ready).count();
        let restarts: i32 = statuses.iter().map(|c| c.restart_count).sum();
        let states: Vec<String> = statuses
            .iter()
            .map(|c| {
                let s = c.state.as_ref();
                let what = if s.and_then(|s| s.running.as_ref()).is_some() {
                    "Running".to_string()
                } else if let Some(w) = s.and_then(|s| s.waiting.as_ref()) {
                    w.reason.clone().unwrap_or_default()
                } else if let Some(t) = s.and_then(|s| s.terminated.as_ref()) {
                    format!("{}({})", t.reason.clone().unwrap_or_default(), t.exit_code)
                } else {
                    "?".into()
                };
                format!("{}={what}", c.name)
            })
            .collect();
        println!(
            "{:<16} {:<40} {:<10} {:<9} {:>8}  {:<15}  {}",
            p.namespace,
            p.name,
            p.status.phase.unwrap_or_default(),
            format!("{ready}/{}", statuses.len()),
            restarts,
            p.status.pod_ip.unwrap_or_else(|| "<none>".into()),
            states.join(" ")
        );
    }
    Ok(())
}

fn logs(pod_logs_dir: &std::path::Path, namespace: &str, pod: &str, container: Option<&str>) -> Result<()> {
    let prefix = format!("{namespace}_{pod}");
    let pod_dir = std::fs::read_dir(pod_logs_dir)
        .with_context(|| format!("reading {}", pod_logs_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
        .with_context(|| format!("no logs for pod {namespace}/{pod}"))?;
    let container_dir = match container {
        Some(c) => pod_dir.join(c),
        None => {
            std::fs::read_dir(&pod_dir)?.flatten().map(|e| e.path()).min().context("the pod has no container logs")?
        }
    };
    let latest = std::fs::read_dir(&container_dir)
        .with_context(|| format!("no logs for container in {}", container_dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".log").and_then(|n| n.parse::<u32>().ok()))
        .max()
        .context("no log files")?;
    print!("{}", nodelet::logs::read_text(&container_dir.join(format!("{latest}.log")))?);
    Ok(())
}

async fn image_command(config: ImagesConfig, command: ImageCommand) -> Result<()> {
    let images = ImageManager::open(config)?;
    match command {
        ImageCommand::Pull { image } => {
            let event = |e: nodelet::images::ImageEvent| eprintln!("{}: {}", e.reason, e.message);
            let ready = images
                .ensure(&image, PullPolicy::Always, &[], "cli", Arc::new(Progress::default()), &event)
                .await
                .map_err(|f| anyhow::anyhow!("{}: {}", f.reason, f.message))?;
            println!("{}", ready.image_id);
        }
        ImageCommand::Import { layout, name, tag } => {
            let ready = images.import(&layout, tag.as_deref(), &name)?;
            println!("{} {}", ready.image, ready.image_id);
        }
        ImageCommand::Ls => {
            println!("{:<60} {:<73} {:>12}", "NAME", "MANIFEST", "SIZE");
            for record in images.store().images()? {
                let name = record.names.first().cloned().unwrap_or_else(|| "<none>".into());
                println!("{name:<60} {:<73} {:>12}", record.manifest, record.size);
            }
        }
        ImageCommand::Check => {
            let problems = images.store().check()?;
            for p in &problems {
                println!("{p}");
            }
            if !problems.is_empty() {
                anyhow::bail!("{} problems in the image store", problems.len());
            }
        }
    }
    Ok(())
}
