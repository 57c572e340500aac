//! A nodelet process for end-to-end tests: run as the node of a test [`Cluster`] (or standalone), inside a cgroup
//! sandbox (`integration/scripts/cgroup-sandbox.sh`: every cgroup root it writes to is a test-owned child), with
//! its root dir, pod logs and config in a temp dir. Stopped with SIGTERM on drop; the sandbox is cleaned after.
#![allow(clippy::expect_used)] // a test: a failed expect is a failed test
#![allow(dead_code)]

pub mod guest;
pub mod memory;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use nodelet_integration::process::Process;

pub struct Nodelet {
    pub name: String,
    root: PathBuf,
    pub dir: tempfile::TempDir,
    sandbox: String,
    process: Option<Process>,
    args: Vec<String>,
    /// The network namespace it runs in (a [`Netns`]), if not the host's.
    netns: Option<String>,
}

/// Runs the `nodelet` CLI (e.g. `ps`, `logs`, `image import`): its stdout, or an error with its stderr.
pub fn nodelet_cli(args: &[&str]) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_nodelet")).args(args).output()?;
    anyhow::ensure!(out.status.success(), "nodelet {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// Imports the registry's busybox image into the store at `root_dir` as `nodelet.local/busybox:latest`, through an
/// OCI layout (what umoci writes in examples/run-standalone.sh): nodes with no registry to pull from. Before the
/// node starts: one process at a time owns the image store.
pub fn import_busybox(registry: &nodelet_integration::registry::Registry, work: &Path, root_dir: &Path) -> Result<()> {
    let layout = busybox_layout(registry, work)?;
    let imported = nodelet_cli(&[
        "image",
        "import",
        "--root-dir",
        &root_dir.display().to_string(),
        &layout.display().to_string(),
        "--tag",
        "busybox",
        "nodelet.local/busybox:latest",
    ])?;
    anyhow::ensure!(imported.starts_with("nodelet.local/busybox:latest nodelet.local/busybox@sha256:"), "{imported}");
    Ok(())
}

/// The registry's busybox image copied to an OCI layout `<work>/oci` (tag `busybox`), for `nodelet image import`.
pub fn busybox_layout(registry: &nodelet_integration::registry::Registry, work: &Path) -> Result<PathBuf> {
    let layout = work.join("oci");
    let status = Command::new("skopeo")
        .args(["copy", "-q", "--src-tls-verify=false"])
        .arg(format!("docker://{}", registry.reference("busybox", "latest")))
        .arg(format!("oci:{}:busybox", layout.display()))
        .env("REGISTRY_AUTH_FILE", work.join("auth.json"))
        .status()?;
    anyhow::ensure!(status.success(), "skopeo copy");
    Ok(layout)
}

/// A CNI conf dir whose network is loopback only: for nodes that must stay in the host's network namespace (the
/// API server listens on its loopback), so that no bridge, veth or iptables rule is made on the host.
pub fn loopback_only_network() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("99-loopback.conf"),
        r#"{"cniVersion": "1.0.0", "name": "lo-only", "type": "loopback"}"#,
    )?;
    Ok(dir)
}

/// An address of the host other than loopback, which the API server may proxy to (`nodes/proxy` refuses
/// loopback) and an EndpointSlice may name: one end of a veth pair whose other end waits in a network namespace
/// of its own (this kernel has no dummy interfaces). Deleting the namespace on drop deletes the pair.
pub struct HostAddress {
    pub ip: String,
    netns: String,
}

impl HostAddress {
    /// `192.168.<octet>.1`, its peer `.2`; a leftover of the same `tag` from a crashed run is replaced.
    pub fn create(tag: &str, octet: u8) -> Result<HostAddress> {
        let netns = format!("nodelet-addr-{tag}");
        let (host_if, peer_if) = (format!("nla{octet}h"), format!("nla{octet}p"));
        let ip = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip").args(args).output().context("running ip")?;
            anyhow::ensure!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        let _ = Command::new("ip").args(["netns", "delete", &netns]).output();
        let _ = Command::new("ip").args(["link", "delete", &host_if]).output();
        ip(&["netns", "add", &netns])?;
        let address = HostAddress { ip: format!("192.168.{octet}.1"), netns: netns.clone() };
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &peer_if, "netns", &netns])?;
        ip(&["addr", "add", &format!("{}/30", address.ip), "dev", &host_if])?;
        ip(&["-n", &netns, "addr", "add", &format!("192.168.{octet}.2/30"), "dev", &peer_if])?;
        ip(&["-n", &netns, "link", "set", &peer_if, "up"])?;
        ip(&["link", "set", &host_if, "up"])?;
        Ok(address)
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.netns]).output();
    }
}

/// Kills and reaps a helper process on drop.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace for a test node, so that its pod network (bridge, veths, iptables rules) stays out of
/// the host's: loopback, which also holds the node IP (this kernel has no dummy interfaces). Deleted on drop.
pub struct Netns {
    pub name: String,
    pub node_ip: String,
}

impl Netns {
    pub fn create(tag: &str, node_ip: &str) -> Result<Netns> {
        let name = format!("nodelet-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip").args(args).output().context("running ip")?;
            anyhow::ensure!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        ip(&["netns", "add", &name])?;
        let ns = Netns { name: name.clone(), node_ip: node_ip.into() };
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        ip(&["-n", &name, "addr", "add", &format!("{node_ip}/32"), "dev", "lo"])?;
        Ok(ns)
    }

    /// `args` run in the namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name)).args(args);
        cmd
    }

    /// Runs `args` in the namespace: its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.command(args).output()?;
        anyhow::ensure!(out.status.success(), "{args:?} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).output();
    }
}

/// The cgroup sandbox (`cgroup-sandbox.sh`) of this test process's node `name`; its mount namespace, kept at
/// `/run/nodelet-sandbox/<sandbox>.mnt`, is the one the agent runs in.
pub fn sandbox_name(name: &str) -> String {
    format!("nodelet-e2e-{}-{name}", std::process::id())
}

/// `integration/scripts/cgroup-sandbox.sh`.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/scripts/cgroup-sandbox.sh")
}

/// The hard eviction thresholds of test nodes that do not set their own.
pub const EVICTION_HARD: &str =
    "evictionHard: {memory.available: 100Mi, nodefs.available: 2Gi, nodefs.inodesFree: 5%}\n";

impl Nodelet {
    /// Starts nodelet with `args` besides the ones every test needs (root dir, config, node name and IP).
    pub fn start(name: &str, config_yaml: &str, args: &[String]) -> Result<Nodelet> {
        Nodelet::start_in(name, config_yaml, None, None, None, args)
    }

    /// Like [`Nodelet::start`] in the host's network namespace with node IP `node_ip` (an address of the host).
    pub fn start_with_ip(name: &str, config_yaml: &str, node_ip: &str, args: &[String]) -> Result<Nodelet> {
        Nodelet::start_in(name, config_yaml, None, None, Some(node_ip), args)
    }

    /// Like [`Nodelet::start_with_ip`] with a given `--root-dir` (e.g. a small filesystem of the test's).
    pub fn start_with_root(
        name: &str,
        config_yaml: &str,
        root: &Path,
        node_ip: &str,
        args: &[String],
    ) -> Result<Nodelet> {
        Nodelet::start_in(name, config_yaml, Some(root), None, Some(node_ip), args)
    }

    /// Like [`Nodelet::start`] with a given `--root-dir` (prepared by the test, e.g. with imported images), in the
    /// network namespace `netns` (its node IP is the node's).
    pub fn start_in_netns(
        name: &str,
        config_yaml: &str,
        root: &Path,
        netns: &Netns,
        args: &[String],
    ) -> Result<Nodelet> {
        Nodelet::start_in(name, config_yaml, Some(root), Some(netns), None, args)
    }

    fn start_in(
        name: &str,
        config_yaml: &str,
        root: Option<&Path>,
        netns: Option<&Netns>,
        node_ip: Option<&str>,
        args: &[String],
    ) -> Result<Nodelet> {
        let dir = tempfile::Builder::new().prefix("nodelet-e2e-").tempdir()?;
        let root = root.map(Path::to_path_buf).unwrap_or_else(|| dir.path().join("root"));
        let config = dir.path().join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                "kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\npodLogsDir: {}\n{}{config_yaml}",
                dir.path().join("logs").display(),
                // The tests share the machine's disk: upstream's 10% would put every node under disk pressure
                // whenever the build cache fills it. Tests of eviction set their own.
                if config_yaml.contains("evictionHard") { "" } else { EVICTION_HARD }
            ),
        )?;
        let mut all = vec![
            "--root-dir".to_string(),
            root.display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--hostname-override".into(),
            name.into(),
            "--node-ip".into(),
            node_ip.or(netns.map(|n| n.node_ip.as_str())).unwrap_or("127.0.0.1").into(),
        ];
        all.extend(args.iter().cloned());
        if !args.iter().any(|a| a.starts_with("--healthz-port")) {
            // Tests run side by side in one network namespace: only a test that asks gets the health port.
            all.extend(["--healthz-port".into(), "0".into()]);
        }
        let mut n = Nodelet {
            root,
            name: name.into(),
            sandbox: sandbox_name(name),
            dir,
            process: None,
            args: all,
            netns: netns.map(|n| n.name.clone()),
        };
        n.restart()?;
        Ok(n)
    }

    /// Starts nodelet with `args` as a service manager would pass them (its `--config`, kubeconfigs and root dir
    /// among them), besides the health port. Its sandbox (and mount namespace, see [`sandbox_name`]) may have
    /// been prepared by the test.
    pub fn start_as_service(name: &str, root: &Path, args: &[String]) -> Result<Nodelet> {
        let dir = tempfile::Builder::new().prefix("nodelet-e2e-").tempdir()?;
        let mut n = Nodelet {
            root: root.to_path_buf(),
            name: name.into(),
            sandbox: sandbox_name(name),
            dir,
            process: None,
            args: args.to_vec(),
            netns: None,
        };
        n.restart()?;
        Ok(n)
    }

    /// (Re)starts the process with the same arguments.
    pub fn restart(&mut self) -> Result<()> {
        let mut cmd = match &self.netns {
            // nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup hierarchies.
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{ns}")).arg("sh");
                cmd
            }
            None => Command::new("sh"),
        };
        cmd.arg(script()).args(["run", &self.sandbox, "--", env!("CARGO_BIN_EXE_nodelet")]).args(&self.args);
        cmd.env(
            "NODELET_LOG",
            std::env::var("NODELET_TEST_LOG").unwrap_or_else(|_| "info,kube=warn,libcgroups=error".into()),
        );
        self.process = Some(Process::spawn(&format!("nodelet-{}", self.name), cmd, self.dir.path())?);
        Ok(())
    }

    /// Stops the process (SIGTERM): containers keep running, as with the kubelet.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// Kills the process with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            // SAFETY: kill(2) on the PID of our own child process, which has not been reaped yet.
            unsafe { libc::kill(p.pid().cast_signed(), libc::SIGKILL) };
            drop(p);
        }
    }

    /// The agent's PID (the sandbox script execs into it).
    /// The kubelet API's port (`--port`), when the test set one.
    pub fn port(&self) -> Option<u16> {
        self.args.iter().position(|a| a == "--port").and_then(|i| self.args.get(i + 1)).and_then(|p| p.parse().ok())
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid())
    }

    /// The name of the agent's cgroup sandbox (`cgroup-sandbox.sh`): its pods' cgroups are below it.
    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("nodelet-{}.log", self.name))).unwrap_or_default()
    }

    pub fn ensure_running(&mut self) -> Result<()> {
        match self.process.as_mut() {
            Some(p) => p.ensure_running(),
            None => bail!("nodelet is not running"),
        }
    }

    pub fn pod_logs_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    pub fn root_dir(&self) -> PathBuf {
        self.root.clone()
    }

    /// Runs `script` with `sh -c` in the agent's mount namespace (which outlives the agent's restarts).
    pub fn in_mount_namespace(&self, script: &str) -> Result<String> {
        let ns = format!("--mount=/run/nodelet-sandbox/{}.mnt", self.sandbox);
        let out = Command::new("nsenter").args([ns.as_str(), "--", "sh", "-c", script]).output()?;
        if !out.status.success() {
            bail!("{script}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Nodelet {
    fn drop(&mut self) {
        self.stop();
        // Containers outlive the agent by design: kill what is left in the sandbox, then remove it.
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            let dir = Path::new(root).join(&self.sandbox);
            if dir.join("cgroup.kill").exists() {
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            }
        }
        let root = self.root_dir();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            for line in mounts.lines() {
                if let Some(target) = line.split(' ').nth(4).filter(|t| t.starts_with(&*root.to_string_lossy())) {
                    let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        for _ in 0..100 {
            let ok = Command::new("sh")
                .arg(script())
                .args(["clean", &self.sandbox])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("nodelet fixture: cgroup sandbox {} could not be cleaned", self.sandbox);
    }
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() > deadline {
            let detail = last_err.map(|e| format!(" (last error: {e:#})")).unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{detail}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the pod satisfies `f` (given the pod), returning it.
pub async fn wait_pod(
    pods: &Api<Pod>,
    name: &str,
    what: &str,
    timeout: Duration,
    f: impl Fn(&Pod) -> bool,
) -> Result<Pod> {
    let result =
        wait_for(&format!("pod {name}: {what}"), timeout, || async { Ok(pods.get_opt(name).await?.filter(|p| f(p))) })
            .await;
    match result {
        Ok(p) => Ok(p),
        Err(e) => {
            let now = pods.get_opt(name).await.ok().flatten();
            let status = now.and_then(|p| p.status).map(|s| serde_json::to_string_pretty(&s).unwrap_or_default());
            Err(e).with_context(|| format!("its status now: {}", status.unwrap_or_else(|| "<gone>".into())))
        }
    }
}

/// Starts nodelet as node `name` of `cluster` on a loopback-only pod network, pulling from `registry`, with the
/// kubelet API on a free loopback port; `config_yaml` and `extra` args as [`Nodelet::start`]. The network's
/// configuration directory is returned too: it must live as long as the node.
pub fn start_cluster_node(
    cluster: &nodelet_integration::cluster::Cluster,
    registry: &nodelet_integration::registry::Registry,
    name: &str,
    config_yaml: &str,
    extra: &[String],
) -> Result<(Nodelet, tempfile::TempDir)> {
    start_cluster_node_at(cluster, registry, name, "127.0.0.1", config_yaml, extra)
}

/// Like [`start_cluster_node`] with node IP `node_ip` (an address of the host other than loopback, which the API
/// server may proxy to).
pub fn start_cluster_node_at(
    cluster: &nodelet_integration::cluster::Cluster,
    registry: &nodelet_integration::registry::Registry,
    name: &str,
    node_ip: &str,
    config_yaml: &str,
    extra: &[String],
) -> Result<(Nodelet, tempfile::TempDir)> {
    start_cluster_node_in(cluster, registry, name, (node_ip, None), config_yaml, extra)
}

/// Like [`start_cluster_node_at`] with node IP and, when given, root dir `at`.
pub fn start_cluster_node_in(
    cluster: &nodelet_integration::cluster::Cluster,
    registry: &nodelet_integration::registry::Registry,
    name: &str,
    (node_ip, root): (&str, Option<&Path>),
    config_yaml: &str,
    extra: &[String],
) -> Result<(Nodelet, tempfile::TempDir)> {
    let kubeconfig = cluster.node_kubeconfig(name)?;
    let net_d = loopback_only_network()?;
    let mut args = cluster_node_args(cluster, registry, net_d.path())?;
    args.extend(["--kubeconfig".into(), kubeconfig.display().to_string()]);
    args.extend(extra.iter().cloned());
    let node = match root {
        Some(root) => Nodelet::start_with_root(name, config_yaml, root, node_ip, &args)?,
        None => Nodelet::start_with_ip(name, config_yaml, node_ip, &args)?,
    };
    Ok((node, net_d))
}

/// What every node of `cluster` runs with besides its credentials: a free loopback port for the kubelet API, the
/// cluster's CA for its clients, the pod network in `net_d`, and `registry` over plain HTTP.
pub fn cluster_node_args(
    cluster: &nodelet_integration::cluster::Cluster,
    registry: &nodelet_integration::registry::Registry,
    net_d: &Path,
) -> Result<Vec<String>> {
    Ok(vec![
        "--port".into(),
        nodelet_integration::ports::free_port()?.to_string(),
        "--client-ca-file".into(),
        cluster.pki().ca().cert.display().to_string(),
        "--cni-conf-dir".into(),
        net_d.display().to_string(),
        "--insecure-registry".into(),
        registry.host(),
    ])
}

/// The (reason, message) of the Events about pod `pod` in `default`.
pub async fn events_for(client: &kube::Client, pod: &str) -> Result<Vec<(String, String)>> {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    let params = kube::api::ListParams::default().fields(&format!("involvedObject.name={pod}"));
    let list = events.list(&params).await?;
    Ok(list.items.into_iter().map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default())).collect())
}

/// Node `name`'s condition `kind` (`MemoryPressure`, ...) and whether it has the `NoSchedule` taint `taint` (which
/// the control plane's node lifecycle controller sets from the condition): `(condition True, tainted)`, the
/// condition `None` if the node does not report it.
pub async fn pressure(client: &kube::Client, name: &str, kind: &str, taint: &str) -> Result<(Option<bool>, bool)> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let node = nodes.get(name).await?;
    let tainted =
        node.spec.and_then(|s| s.taints).is_some_and(|t| t.iter().any(|t| t.key == taint && t.effect == "NoSchedule"));
    let condition = node
        .status
        .and_then(|s| s.conditions)
        .and_then(|c| c.into_iter().find(|c| c.type_ == kind))
        .map(|c| c.status == "True");
    Ok((condition, tainted))
}

/// Checks that `pod` was evicted for node pressure as upstream reports it: `Evicted`, a message starting with
/// `prefix`, the `DisruptionTarget` condition (`TerminationByKubelet`) and an `Evicted` event with the same
/// message. The message.
pub async fn ensure_evicted(client: &kube::Client, pod: &Pod, prefix: &str) -> Result<String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    anyhow::ensure!(status.reason.as_deref() == Some("Evicted"), "{name}: {status:?}");
    let message = status.message.clone().unwrap_or_default();
    anyhow::ensure!(message.starts_with(prefix), "{name}: {message}");
    let disruption =
        status.conditions.iter().flatten().find(|c| c.type_ == "DisruptionTarget").context("DisruptionTarget")?;
    anyhow::ensure!(
        disruption.status == "True" && disruption.reason.as_deref() == Some("TerminationByKubelet"),
        "{name}: {disruption:?}"
    );
    let events = events_for(client, name).await?;
    anyhow::ensure!(events.iter().any(|(reason, m)| reason == "Evicted" && *m == message), "{name}: {events:?}");
    Ok(message)
}

/// A pod from YAML.
pub fn pod(yaml: &str) -> Pod {
    serde_yaml::from_str(yaml).expect("test pod YAML")
}

/// The nearest-rank index of quantile `q` among `n` sorted samples (0 when there are none): benches' percentiles.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // q is clamped to [0, 1]: 0..=1000 fits
pub fn rank(n: usize, q: f64) -> usize {
    // Per mille, so the rank is integer arithmetic: ceil(n * q).
    let per_mille = (q.clamp(0.0, 1.0) * 1000.0).round() as usize;
    (n * per_mille).div_ceil(1000).clamp(1, n.max(1)) - 1
}

/// Waits (up to 2 min) until node `name` reports Ready.
pub async fn wait_node_ready(client: &kube::Client, name: &str) -> Result<()> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    wait_for(&format!("node {name} Ready"), Duration::from_secs(120), || async {
        let ready = nodes
            .get_opt(name)
            .await?
            .and_then(|n| n.status?.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Ok(ready.then_some(()))
    })
    .await
}

/// Clock ticks per second (`/proc` CPU times): benches' CPU figures.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of `pid` (its exited threads included), in seconds.
pub fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (which may hold spaces) in parentheses: field 3 onwards.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15: indexes 11 and 12 after the name.
    (get(11) + get(12)) as f64 / ticks_per_second()
}

/// The number after `flag` on the command line (benches' options).
pub fn arg_after(flag: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}
