//! The upstream peer of the side-by-side benchmarks: the upstream kubelet (same version as the control plane,
//! built by `scripts/build-kubelet.sh`) on Debian's containerd (CRI plugin, runc shims, a pause image from the
//! test registry), joined to a test [`Cluster`] as one more node. Both daemons run in a cgroup sandbox of their own
//! (`scripts/cgroup-sandbox.sh`: every cgroup they create lands below test-owned children) with state, logs and
//! sockets in a temp dir. Pod networking: containerd insists on an `eth0` with an address, so a tiny CNI plugin
//! gives each pod a veth pair whose both ends stay in the pod's network namespace (nothing on the host's network,
//! like the loopback-only network the benchmarks give nodelet). Everything is killed and removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster::Cluster;
use crate::layers::{Layer, push_image_with_cmd};
use crate::process::{Process, rss_kib};
use crate::registry::Registry;
use crate::testbed;

/// A kubelet + containerd node.
pub struct UpstreamNode {
    dir: tempfile::TempDir,
    /// The kubelet API's port (on 127.0.0.1; anonymous requests allowed).
    port: u16,
    sandbox: String,
    daemons: Process,
    /// Host directories containerd and libcni write to whatever their config says, and which did not exist
    /// before: removed on drop (shim sockets in `/run/containerd/s`, the CNI result cache in `/var/lib/cni`).
    host_dirs: Vec<PathBuf>,
}

const HOST_DIRS: [&str; 2] = ["/run/containerd", "/var/lib/cni"];

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

impl UpstreamNode {
    /// Starts containerd and the kubelet as node `name` of `cluster`, pulling from `registry`, and waits for the
    /// containerd socket (the caller waits for the Node object).
    pub async fn start(cluster: &Cluster, registry: &Registry, name: &str, max_pods: usize) -> Result<Self> {
        let status = Command::new(scripts().join("build-kubelet.sh")).status().context("build-kubelet.sh")?;
        if !status.success() {
            bail!("building the upstream kubelet failed");
        }
        let kubelet = testbed::control_plane_bin("kubelet")?;
        let containerd = testbed::system_bin("containerd")?;
        let pause = pause_image(registry).await?;
        let dir = tempfile::Builder::new().prefix("nodelet-upstream-").tempdir()?;
        let d = dir.path().display().to_string();
        let host = registry.host();
        let cni = write_cni(dir.path())?;
        let (cni_bin, cni_conf) = (cni.join("bin").display().to_string(), cni.join("net.d").display().to_string());
        std::fs::write(
            dir.path().join("containerd.toml"),
            format!(
                r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd-ttrpc.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # This machine's root lacks CAP_SYS_RESOURCE: no oom_score_adj below the daemon's own (pause wants -998).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]
    endpoint = ["http://{host}"]
"#
            ),
        )?;
        let port = crate::ports::free_port()?;
        std::fs::write(
            dir.path().join("kubelet.yaml"),
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzPort: 0
# Anonymous, on loopback only: the API server's requests (exec, logs, port-forward) are let in.
authentication: {{anonymous: {{enabled: true}}, webhook: {{enabled: false}}}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://{d}/containerd.sock
failSwapOn: false
failCgroupV1: false
podLogsDir: {d}/pod-logs
maxPods: {max_pods}
evictionHard: {{memory.available: 1Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"#
            ),
        )?;
        let kubeconfig = cluster.node_kubeconfig(name)?;
        let script = format!(
            "{containerd} --config {d}/containerd.toml >{d}/containerd.log 2>&1 &\n\
             for _ in $(seq 100); do [ -S {d}/containerd.sock ] && break; sleep 0.1; done\n\
             exec {kubelet} --config {d}/kubelet.yaml --kubeconfig {kc} --root-dir {d}/kubelet --cert-dir {d}/pki \
             --hostname-override {name} --node-ip 127.0.0.1 -v=1",
            containerd = containerd.display(),
            kubelet = kubelet.display(),
            kc = kubeconfig.display(),
        );
        let sandbox = format!("nodelet-upstream-{}-{name}", std::process::id());
        let mut cmd = Command::new("sh");
        cmd.arg(scripts().join("cgroup-sandbox.sh")).args(["run", &sandbox, "--", "sh", "-c", &script]);
        // runc must see the sandbox's cgroup roots only (see the script).
        cmd.env("CGROUP_SANDBOX_ONLY_ROOTS", "1");
        let host_dirs = HOST_DIRS.iter().map(PathBuf::from).filter(|d| !d.exists()).collect();
        let daemons = Process::spawn("kubelet", cmd, dir.path())?;
        Ok(Self { dir, port, sandbox, daemons, host_dirs })
    }

    /// The node's daemons with their RSS in KiB: the kubelet, containerd and one runc shim per pod (not the
    /// containers, nor the pause processes, which nodelet does not have).
    pub fn daemons_rss_kib(&self) -> Vec<(String, u64)> {
        self.daemons().into_iter().map(|(comm, pid)| (comm, rss_kib(pid))).collect()
    }

    /// The PIDs of the node's daemons (as [`UpstreamNode::daemons_rss_kib`] counts them).
    pub fn daemon_pids(&self) -> Vec<u32> {
        self.daemons().into_iter().map(|(_, pid)| pid).collect()
    }

    /// (name, PID) of the kubelet, containerd and the shims.
    fn daemons(&self) -> Vec<(String, u32)> {
        let Some(ns) = mount_ns(self.daemons.pid()) else { return Vec::new() };
        let mut out = Vec::new();
        for pid in all_pids() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let comm = comm.trim();
            if mount_ns(pid).as_ref() == Some(&ns) && ["kubelet", "containerd", "containerd-shim"].contains(&comm) {
                out.push((comm.to_string(), pid));
            }
        }
        out
    }

    /// The name of the node's cgroup sandbox (`cgroup-sandbox.sh`): its pods' cgroups are below it.
    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    /// The last lines of the kubelet's log (for errors).
    pub fn log_tail(&self, lines: usize) -> String {
        self.daemons.log_tail(lines)
    }

    /// Gives the Node the address its kubelet listens on (127.0.0.1), which the kubelet itself refuses to report
    /// ("nodeIP can't be loopback address"), so that the API server can reach its kubelet API (`exec`, `logs`,
    /// `port-forward`). The kubelet's own status updates leave it, as its address setter fails before it writes.
    pub async fn publish_address(&self, client: &kube::Client, name: &str) -> Result<()> {
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
        let patch = serde_json::json!({"status": {"addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name}
        ]}});
        nodes
            .patch_status(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
            .await
            .context("patching the upstream node's addresses")?;
        Ok(())
    }

    /// The kubelet API's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The fixture's directory (configs, logs, state).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for UpstreamNode {
    fn drop(&mut self) {
        if std::env::var_os("NODELET_KEEP_UPSTREAM").is_some() {
            eprintln!("upstream node: keeping {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
        // Daemons first (they share the sandbox's mount namespace), then every container left in its cgroups.
        if let Some(ns) = mount_ns(self.daemons.pid()) {
            for pid in all_pids().into_iter().filter(|p| mount_ns(*p).as_ref() == Some(&ns)) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.cast_signed()), nix::sys::signal::SIGKILL);
            }
        }
        for root in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten().map(|e| e.path()) {
            kill_tree(&root.join(&self.sandbox));
        }
        kill_tree(&Path::new("/sys/fs/cgroup").join(&self.sandbox));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let clean =
                Command::new("sh").arg(scripts().join("cgroup-sandbox.sh")).args(["clean", &self.sandbox]).output();
            if clean.is_ok_and(|o| o.status.success()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for dir in &self.host_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        // containerd's pod network namespaces are bind mounts (gone with the sandbox's mount namespace) on files
        // that it made on the host's /run/netns.
        for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("cni-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The pod network of the peer: `<dir>/cni/bin` (Debian's `loopback`, which containerd runs itself, and the
/// `bench-eth0` plugin) and `<dir>/cni/net.d`. Returns `<dir>/cni`.
fn write_cni(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let cni = dir.join("cni");
    std::fs::create_dir_all(cni.join("bin"))?;
    std::fs::create_dir_all(cni.join("net.d"))?;
    std::os::unix::fs::symlink("/usr/lib/cni/loopback", cni.join("bin/loopback"))?;
    let plugin = cni.join("bin/bench-eth0");
    std::fs::write(
        &plugin,
        r#"#!/bin/sh
# eth0 as one end of a veth pair kept inside the pod's network namespace: an address, no host side.
case "$CNI_COMMAND" in
ADD)
  cat >/dev/null
  nsenter --net="$CNI_NETNS" sh -c 'ip link add eth0 type veth peer name eth0-peer &&
    ip addr add 10.255.0.1/32 dev eth0 && ip link set eth0 up' >&2 || exit 1
  printf '{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"%s"}],"ips":[{"address":"10.255.0.1/32","interface":0}]}' "$CNI_NETNS";;
VERSION) echo '{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}';;
*) cat >/dev/null;;
esac
"#,
    )?;
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(
        cni.join("net.d/10-bench.conflist"),
        r#"{"cniVersion": "1.0.0", "name": "bench", "plugins": [{"type": "bench-eth0"}]}"#,
    )?;
    Ok(cni)
}

/// SIGKILLs every process in a cgroup tree (v1 or v2: both list `cgroup.procs`).
fn kill_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            kill_tree(&entry.path());
        }
    }
    nodelet_cgroups::control::kill_listed(dir);
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

fn mount_ns(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

/// The sandbox ("pause") image containerd's CRI plugin runs per pod: busybox's `sleep` forever.
async fn pause_image(registry: &Registry) -> Result<String> {
    let busybox = std::fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?;
    let layer = Layer::new().dir("bin", 0o755).file("bin/busybox", &busybox, 0o755).symlink("bin/sleep", "busybox");
    push_image_with_cmd(registry, "pause", "bench", &[layer.tar()], &["/bin/sleep", "2147483647"]).await?;
    Ok(registry.reference("pause", "bench"))
}
