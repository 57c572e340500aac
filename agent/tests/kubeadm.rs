//! `kubeadm join` with nodelet as the kubelet, end to end. The test bed's control plane is given what `kubeadm
//! init` leaves behind, by kubeadm itself (`kubeadm init phase upload-config all` and `bootstrap-token`: the
//! kubeadm and kubelet ConfigMaps, a bootstrap token, the signed `cluster-info`, the bootstrap RBAC and CSR
//! auto-approval bindings). Then, in the node's private mount namespace (its cgroup sandbox's) whose `/etc`,
//! `/var/lib/kubelet` and `/var/log` are overlays (so the host's stay untouched), the Vagrant workers'
//! provisioning scripts run:
//! `vagrant/provision/install-nodelet.sh` installs nodelet as `kubelet` with the unit and kubeadm drop-in of
//! `agent/dist/`, and `vagrant/provision/join.sh` runs `kubeadm join <server> --token ...
//! --discovery-token-ca-cert-hash sha256:...`. nodelet is started the way systemd starts it from the installed
//! unit and drop-in (their `Environment=`, `EnvironmentFile=` and `ExecStart=` expanded here,
//! `/etc/default/kubelet` giving the test's own flags). kubeadm finishes, the node is Ready and runs a pod. The
//! unit files pass `systemd-analyze verify`, and the Vagrantfile `vagrant validate`.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, control_plane_bin, ready};
use sha2::Digest;
use support::{Nodelet, pod, wait_pod};

const NODE: &str = "nodelet-kubeadm";
const TOKEN: &str = "abcdef.0123456789abcdef";

fn dist(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist").join(file)
}

fn provision(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../vagrant/provision").join(script)
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// kubeadm's `--discovery-token-ca-cert-hash`: SHA-256 of the CA certificate's SubjectPublicKeyInfo.
fn ca_cert_hash(ca_pem: &str) -> Result<String> {
    let der = pem::parse(ca_pem)?.into_contents();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(format!("sha256:{}", hex::encode(sha2::Sha256::digest(cert.tbs_certificate.subject_pki.raw))))
}

/// The command line systemd runs for a unit with drop-ins (the `[Service]` lines that matter here): later
/// `ExecStart=` lines replace earlier ones, an empty one resets; `$VAR` comes from `Environment=` and from the
/// `EnvironmentFile=`s (`-` for optional), read through `files` (a path in the namespace -> its contents).
fn exec_start(units: &[&str], files: &dyn Fn(&str) -> Option<String>) -> Result<Vec<String>> {
    let mut env: HashMap<String, String> = HashMap::new();
    let mut exec = String::new();
    let set = |assignment: &str, env: &mut HashMap<String, String>| {
        if let Some((k, v)) = assignment.split_once('=') {
            env.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
    };
    for unit in units {
        for line in unit.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            if let Some(v) = line.strip_prefix("Environment=") {
                set(v.trim_matches('"'), &mut env);
            } else if let Some(v) = line.strip_prefix("EnvironmentFile=") {
                let (optional, path) = v.strip_prefix('-').map_or((false, v), |p| (true, p));
                match files(path) {
                    Some(text) => {
                        text.lines().filter(|l| !l.trim_start().starts_with('#')).for_each(|l| set(l, &mut env))
                    }
                    None if optional => {}
                    None => bail!("{path} is missing"),
                }
            } else if let Some(v) = line.strip_prefix("ExecStart=") {
                exec = v.to_string();
            }
        }
    }
    Ok(exec
        .split_whitespace()
        .flat_map(|word| match word.strip_prefix('$') {
            Some(var) => env.get(var).map(|v| v.split_whitespace().map(String::from).collect()).unwrap_or_default(),
            None => vec![word.to_string()],
        })
        .collect())
}

/// The node's mount namespace: node `name`'s cgroup sandbox, made by `cgroup-sandbox.sh` from the host (where
/// the agent will run too: the script enters an existing one), with overlays on `dirs` whose writes land in
/// `<dir>/upper` (a directory the machine lacks, such as `/var/lib/kubelet` where no kubelet was ever installed, is
/// made empty first).
struct MountNamespace {
    dir: tempfile::TempDir,
    sandbox: String,
}

impl MountNamespace {
    fn new(name: &str, dirs: &[&str]) -> Result<MountNamespace> {
        let dir = tempfile::Builder::new().prefix("nodelet-kubeadm-ns-").tempdir()?;
        let sandbox = support::sandbox_name(name);
        run(Command::new("sh").arg(support::script()).args(["run", &sandbox, "--", "true"]))?;
        let ns = MountNamespace { dir, sandbox };
        let d = ns.dir.path().display();
        let mut script = String::from("set -e; ");
        for path in dirs {
            let name = path.trim_start_matches('/').replace('/', "-");
            script += &format!(
                "mkdir -p {path} {d}/upper/{name} {d}/work/{name} && mount -t overlay overlay -o lowerdir={path},upperdir={d}/upper/{name},workdir={d}/work/{name} {path}; "
            );
        }
        run(Command::new("nsenter").arg(format!("--mount={}", ns.ns().display())).args(["sh", "-c", &script]))?;
        Ok(ns)
    }

    fn ns(&self) -> PathBuf {
        PathBuf::from(format!("/run/nodelet-sandbox/{}.mnt", self.sandbox))
    }

    /// Where a file written below an overlaid directory lands on the host.
    fn upper(&self, path: &str, overlay: &str) -> PathBuf {
        let name = overlay.trim_start_matches('/').replace('/', "-");
        self.dir.path().join("upper").join(name).join(path.trim_start_matches(overlay).trim_start_matches('/'))
    }
}

impl Drop for MountNamespace {
    fn drop(&mut self) {
        // (The node's fixture cleans its sandbox too; this covers a test that failed before starting it.)
        let _ = Command::new("sh").arg(support::script()).args(["clean", &self.sandbox]).output();
    }
}

#[test]
fn the_unit_files_verify() -> Result<()> {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("skipped the_unit_files_verify: systemd-analyze is not installed");
        return Ok(());
    }
    // The units as installed, with the binary where this build has it (verify checks that it is executable).
    let dir = tempfile::tempdir()?;
    let binary = env!("CARGO_BIN_EXE_nodelet");
    let unit = std::fs::read_to_string(dist("nodelet.service"))?.replace("/usr/bin/nodelet", binary);
    std::fs::write(dir.path().join("nodelet.service"), &unit)?;
    std::fs::write(dir.path().join("kubelet.service"), &unit)?;
    std::fs::create_dir_all(dir.path().join("kubelet.service.d"))?;
    let dropin = std::fs::read_to_string(dist("10-kubeadm.conf"))?.replace("/usr/bin/kubelet", binary);
    std::fs::write(dir.path().join("kubelet.service.d/10-kubeadm.conf"), dropin)?;
    for name in ["nodelet.service", "kubelet.service"] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(name))
            .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success() && stderr.trim().is_empty(), "{name}: {stderr}");
    }
    // kubeadm's preflight reads `kubelet --version`.
    let version = run(Command::new(binary).arg("--version"))?;
    ensure!(version.trim().starts_with("Kubernetes v1.37."), "{version}");
    Ok(())
}

#[test]
fn the_vagrantfile_validates() -> Result<()> {
    if Command::new("vagrant").arg("--version").output().is_err() {
        eprintln!(
            "skipped the_vagrantfile_validates: vagrant is not installed (integration/scripts/setup.sh installs it)"
        );
        return Ok(());
    }
    let dot = tempfile::tempdir()?;
    for workers in ["1", "3"] {
        let out = run(Command::new("vagrant")
            .args(["validate", "--ignore-provider"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../vagrant"))
            .env("VAGRANT_DOTFILE_PATH", dot.path())
            .env("NODELET_WORKERS", workers))?;
        ensure!(out.contains("Vagrantfile validated successfully"), "{out}");
        ensure!(out.contains(&format!("worker-{workers}")), "{workers} workers: {out}");
    }
    for script in ["common.sh", "control-plane.sh", "install-nodelet.sh", "join.sh"] {
        run(Command::new("sh").arg("-n").arg(provision(script)))?;
    }
    Ok(())
}

#[tokio::test]
async fn kubeadm_join_with_nodelet_as_the_kubelet() -> Result<()> {
    if !ready("kubeadm_join_with_nodelet_as_the_kubelet", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let client = cluster.admin().await?;
    let kubeadm = control_plane_bin("kubeadm")?;
    let work = tempfile::tempdir()?;
    let endpoint = cluster.server().trim_start_matches("https://").to_string();
    // (kubeadm refuses a loopback advertise address; a worker's join never uses this one.)
    let (_, port) = endpoint.rsplit_once(':').context("the API server's port")?;

    // What `kubeadm init` leaves behind, made by kubeadm against the running control plane.
    let init = work.path().join("init.yaml");
    std::fs::write(
        &init,
        format!(
            "apiVersion: kubeadm.k8s.io/v1beta4\nkind: InitConfiguration\nbootstrapTokens:\n- token: {TOKEN}\n  ttl: 1h\n\
             localAPIEndpoint: {{advertiseAddress: 192.0.2.1, bindPort: {port}}}\nnodeRegistration: {{name: control-plane}}\n---\n\
             apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\nkubernetesVersion: v1.37.2\n\
             controlPlaneEndpoint: {endpoint}\nnetworking: {{serviceSubnet: 10.96.0.0/12, podSubnet: 10.244.0.0/16}}\n---\n\
             apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n{}",
            // Uploaded by kubeadm into the kubelet-config ConfigMap, which the joining node's config.yaml comes
            // from (the test shares the machine's disk: see EVICTION_HARD).
            support::EVICTION_HARD
        ),
    )?;
    for phase in [&["upload-config", "all"][..], &["bootstrap-token"][..]] {
        run(Command::new(&kubeadm)
            .args(["init", "phase"])
            .args(phase)
            .arg("--config")
            .arg(&init)
            .arg("--kubeconfig")
            .arg(cluster.admin_kubeconfig()))?;
    }

    // The node: `kubelet` is nodelet; /etc, /var/lib/kubelet and /var/log are the namespace's own.
    let ns = MountNamespace::new(NODE, &["/etc", "/var/lib/kubelet", "/var/log"])?;
    let prefix = work.path().join("usr");
    let nsenter = || {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount={}", ns.ns().display()));
        cmd
    };
    run(nsenter()
        .arg("sh")
        .arg(provision("install-nodelet.sh"))
        .env("NODELET_BIN", env!("CARGO_BIN_EXE_nodelet"))
        .env("NODELET_DIST", dist(""))
        .env("PREFIX", &prefix)
        .env("NODELET_NO_SYSTEMD", "1"))?;
    let root = work.path().join("root");
    let net_d = support::loopback_only_network()?;
    let extra = format!(
        "KUBELET_EXTRA_ARGS=--root-dir={} --node-ip=127.0.0.1 --cni-conf-dir={} --insecure-registry={}\n",
        root.display(),
        net_d.path().display(),
        registry.host()
    );
    let defaults = ns.upper("/etc/default/kubelet", "/etc");
    std::fs::create_dir_all(defaults.parent().context("/etc/default")?)?;
    std::fs::write(&defaults, extra)?;
    let hash = ca_cert_hash(&cluster.pki().ca_pem())?;
    let log = std::fs::File::create(work.path().join("kubeadm.log"))?;
    let kubeadm_dir = kubeadm.parent().context("kubeadm's directory")?;
    let path = format!("{}:{}:{}", prefix.join("bin").display(), kubeadm_dir.display(), std::env::var("PATH")?);
    let mut join = nsenter()
        .arg("sh")
        .arg(provision("join.sh"))
        .envs([("API_SERVER", endpoint.as_str()), ("TOKEN", TOKEN), ("CA_HASH", &hash), ("NODE_NAME", NODE)])
        // This sandbox: cgroup v1 and IP forwarding off (a Vagrant VM has neither).
        .env("EXTRA_IGNORES", "SystemVerification,FileContent--proc-sys-net-ipv4-ip_forward")
        .env("PATH", path)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let kubeadm_log = || std::fs::read_to_string(work.path().join("kubeadm.log")).unwrap_or_default();

    // systemd's part: once kubeadm wrote the kubelet's configuration, start it as the unit and drop-in say.
    let config = ns.upper("/var/lib/kubelet/config.yaml", "/var/lib/kubelet");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !config.exists() {
        if let Some(status) = join.try_wait()? {
            bail!("kubeadm join ended early ({status}):\n{}", kubeadm_log());
        }
        ensure!(std::time::Instant::now() < deadline, "kubeadm wrote no kubelet configuration:\n{}", kubeadm_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let installed = |path: &str| std::fs::read_to_string(ns.upper(path, "/etc"));
    let units = [
        installed("/etc/systemd/system/kubelet.service")?,
        installed("/etc/systemd/system/kubelet.service.d/10-kubeadm.conf")?,
    ];
    let files = |path: &str| {
        ["/var/lib/kubelet", "/etc"]
            .iter()
            .find(|o| path.starts_with(*o))
            .and_then(|o| std::fs::read_to_string(ns.upper(path, o)).ok())
    };
    let argv = exec_start(&[&units[0], &units[1]], &files)?;
    let kubelet = prefix.join("bin/kubelet");
    ensure!(argv.first().map(PathBuf::from) == Some(kubelet.clone()), "{argv:?}");
    ensure!(std::fs::read_link(&kubelet)? == Path::new("nodelet"), "kubelet is a link to nodelet");
    ensure!(argv.iter().any(|a| a == "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf"), "{argv:?}");
    let mut node = Nodelet::start_as_service(NODE, &root, &argv[1..])?;

    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = join.try_wait()? {
            break status;
        }
        let failed = node.ensure_running().err().map(|e| e.to_string());
        if failed.is_some() || std::time::Instant::now() > deadline {
            let _ = join.kill();
            bail!("kubeadm join did not finish ({failed:?}):\n{}\n--- nodelet ---\n{}", kubeadm_log(), node.log());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    ensure!(status.success(), "kubeadm join: {status}\n{}\n--- nodelet ---\n{}", kubeadm_log(), node.log());
    ensure!(kubeadm_log().contains("This node has joined the cluster"), "{}", kubeadm_log());
    ensure!(!Path::new("/etc/kubernetes/kubelet.conf").exists(), "the host's /etc is untouched");
    ensure!(
        node.log().contains("accepted, not acted on by nodelet: ") && node.log().contains("cgroupDriver"),
        "{}",
        node.log()
    );

    support::wait_node_ready(&client, NODE).await.with_context(|| node.log())?;
    let nodes: Api<Node> = Api::all(client.clone());
    let info = nodes.get(NODE).await?.status.and_then(|s| s.node_info).context("nodeInfo")?;
    ensure!(info.kubelet_version.starts_with("v1.37."), "{info:?}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let image = registry.reference("busybox", "latest");
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: joined}}\nspec:\n  nodeName: {NODE}\n  restartPolicy: Never\n  containers:\n  - {{name: main, image: {image}, command: [echo, joined]}}\n"
    ))).await?;
    wait_pod(&pods, "joined", "Succeeded", Duration::from_secs(60), |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
    })
    .await
    .with_context(|| node.log())?;
    node.ensure_running()?;
    eprintln!("kubeadm join, as it went:\n{}", kubeadm_log());
    Ok(())
}
