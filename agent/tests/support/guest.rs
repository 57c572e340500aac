//! A nodelet node inside the pure cgroup v2 QEMU guest (`integration/scripts/cgv2-vm.sh run --net`), joined to a
//! test cluster on this host: the production hosts' layout (the v2 memory controller, `memory.events`, PSI) for
//! the end-to-end scenarios this hybrid host cannot show.
//!
//! - The guest reaches the API server at 10.0.2.2 (QEMU's user network maps it to this host's loopback; the
//!   API server's certificate names it).
//! - It has no registry: busybox is imported from an OCI layout as `nodelet.local/busybox:latest` before the
//!   agent starts, into a root dir on the guest's tmpfs.
//! - The API server reaches its kubelet API (logs, `/debug/oom`) through a forward from `address:port` on this
//!   host (`nodes/proxy` refuses loopback, so `address` is a [`HostAddress`](super::HostAddress)).
//! - A loop in the guest copies the pods' cgroup's `memory.events` and the OOM records' file to a directory
//!   shared with this host, where the test reads them.
//!
//! The guest and everything in it go when the node is dropped (its QEMU is killed: the guest is throwaway).

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use nodelet_integration::cluster::Cluster;

/// The image the guest has: imported, never pulled.
pub const IMAGE: &str = "nodelet.local/busybox:latest";

/// `p` with the guest's image in every container, never pulled (the guest has no registry).
pub fn local(mut p: k8s_openapi::api::core::v1::Pod) -> k8s_openapi::api::core::v1::Pod {
    for c in p.spec.iter_mut().flat_map(|s| s.containers.iter_mut()) {
        c.image = Some(IMAGE.into());
        c.image_pull_policy = Some("Never".into());
    }
    p
}

/// The guest's root dir (a tmpfs: the guest's writable `/run`).
const ROOT: &str = "/run/nodelet/root";

pub struct GuestNode {
    pub name: String,
    child: Child,
    log: PathBuf,
    /// Config, kubeconfig, script, log; `shared/` is the guest's read-write directory.
    dir: tempfile::TempDir,
}

impl GuestNode {
    /// Boots the guest with `mem_mib` of memory and starts nodelet in it as node `name` of `cluster`, its
    /// kubelet API on `port`, reached at `address:port` on this host; `config_yaml` and `extra` arguments as
    /// [`super::Nodelet::start`]'s. `layout` is an OCI layout with busybox ([`super::busybox_layout`]).
    pub fn start(
        cluster: &Cluster,
        name: &str,
        (address, port): (&str, u16),
        mem_mib: u64,
        layout: &Path,
        config_yaml: &str,
        extra: &[String],
    ) -> Result<GuestNode> {
        let dir = tempfile::Builder::new().prefix("nodelet-guest-").tempdir()?;
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared)?;
        // The node's credentials, its API server named as the guest reaches it.
        let kubeconfig =
            std::fs::read_to_string(cluster.node_kubeconfig(name)?)?.replace("https://127.0.0.1:", "https://10.0.2.2:");
        std::fs::write(dir.path().join("kubeconfig"), kubeconfig)?;
        std::fs::write(
            dir.path().join("kubelet.yaml"),
            format!(
                "kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\npodLogsDir: /run/nodelet/logs\n\
                 {config_yaml}"
            ),
        )?;
        let net_d = dir.path().join("net.d");
        std::fs::create_dir(&net_d)?;
        std::fs::write(
            net_d.join("99-loopback.conf"),
            r#"{"cniVersion": "1.0.0", "name": "lo-only", "type": "loopback"}"#,
        )?;
        let nodelet = env!("CARGO_BIN_EXE_nodelet");
        let d = dir.path().display();
        let s = shared.display();
        let mut args = vec![
            format!("--root-dir {ROOT}"),
            format!("--config {d}/kubelet.yaml"),
            format!("--kubeconfig {d}/kubeconfig"),
            format!("--hostname-override {name}"),
            format!("--node-ip {address}"),
            format!("--port {port}"),
            "--healthz-port 0".into(),
            format!("--client-ca-file {}", cluster.pki().ca().cert.display()),
            format!("--cni-conf-dir {}", net_d.display()),
        ];
        args.extend(extra.iter().cloned());
        let script = format!(
            "set -u\nmkdir -p {ROOT} /run/nodelet/logs\n\
             {nodelet} image import --root-dir {ROOT} {layout} --tag busybox nodelet.local/busybox:latest || exit 3\n\
             copy() {{ cat \"$1\" > \"$2.tmp\" 2>/dev/null && mv \"$2.tmp\" \"$2\"; }}\n\
             (while :; do copy /sys/fs/cgroup/kubepods/memory.events {s}/kubepods.memory.events; \
             copy {ROOT}/oom/kills.jsonl {s}/kills.jsonl; sleep 0.2; done) &\n\
             exec {nodelet} {}\n",
            args.join(" "),
            layout = layout.display(),
        );
        std::fs::write(dir.path().join("guest.sh"), script)?;
        let vm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/scripts/cgv2-vm.sh");
        let log = dir.path().join("guest.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new("bash");
        cmd.arg(vm)
            .args(["run", "--net", "--forward", &format!("{address}:{port}"), "--rw"])
            .arg(&shared)
            .args(["--timeout", "900", "--", "bash"])
            .arg(dir.path().join("guest.sh"))
            .env("CGV2_CACHE", nodelet_integration::testbed::guest_cache())
            .env("CGV2_MEM", mem_mib.to_string())
            .env("NODELET_LOG", "info,kube=warn,libcgroups=error")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own process group: QEMU (under `timeout`) goes with it on drop.
            .process_group(0);
        let child = cmd.spawn().context("starting cgv2-vm.sh")?;
        Ok(GuestNode { name: name.into(), child, log, dir })
    }

    /// The last lines of the guest's console (the agent's log among them), for error messages.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The directory the guest writes to (read-write at the same path inside it): hostPath volumes for pods.
    pub fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    /// The pods' cgroup's `memory.events` (v2: its descendants' events counted in), as last copied.
    pub fn kubepods_memory_events(&self) -> BTreeMap<String, u64> {
        let text = std::fs::read_to_string(self.shared().join("kubepods.memory.events")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (key, value) = l.split_once(' ')?;
                Some((key.to_string(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// The pods' cgroup's `memory.events` from a copy taken after `after` (within 30 s).
    pub async fn kubepods_memory_events_after(&self, after: std::time::SystemTime) -> Result<BTreeMap<String, u64>> {
        let copy = self.shared().join("kubepods.memory.events");
        super::wait_for("a copy of the pods' memory.events", std::time::Duration::from_secs(30), || async {
            Ok(std::fs::metadata(&copy)?.modified()?.gt(&after).then_some(()))
        })
        .await
        .with_context(|| self.log())?;
        Ok(self.kubepods_memory_events())
    }

    /// The agent's OOM records' file (`<root-dir>/oom/kills.jsonl`), as last copied.
    pub fn oom_records(&self) -> String {
        std::fs::read_to_string(self.shared().join("kills.jsonl")).unwrap_or_default()
    }
}

impl Drop for GuestNode {
    fn drop(&mut self) {
        let group = -(self.child.id().cast_signed());
        // SIGTERM first: QEMU ends and the script removes its control directory; SIGKILL if it has not in 10 s.
        // SAFETY: kill(2) on the process group of a child we spawned as its leader and have not reaped, so the
        // group cannot be another's.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // SAFETY: as above; the leader is still not reaped.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}
