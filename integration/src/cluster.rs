//! An upstream control plane on loopback: etcd, kube-apiserver, kube-controller-manager and kube-scheduler, with a
//! fresh PKI, data dir and free ports for every fixture, so runs never collide and a second run starts clean.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use tempfile::TempDir;

use crate::certs::Pki;
use crate::kubeconfig;
use crate::ports::free_port;
use crate::process::Process;
use crate::testbed::control_plane_bin;

/// Knobs a test may turn; everything else is upstream's default.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// kube-controller-manager `--node-monitor-grace-period` (upstream default 50 s): how long a node may miss
    /// heartbeats before it is marked NotReady.
    pub node_monitor_grace_period: Duration,
    /// How long to wait for the control plane to become ready.
    pub start_timeout: Duration,
    /// kube-controller-manager `--cluster-signing-duration` (upstream default a year): the lifetime of the
    /// certificates it issues for CSRs (less its 5 minutes of backdating).
    pub cluster_signing_duration: Option<Duration>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            node_monitor_grace_period: Duration::from_secs(50),
            start_timeout: Duration::from_secs(120),
            cluster_signing_duration: None,
        }
    }
}

/// Pod and service ranges handed to the control plane. They are bookkeeping in the API only: the node allocator
/// writes `spec.podCIDR` from the first, the service allocator picks ClusterIPs from the second; test traffic
/// only ever flows inside network namespaces the tests create.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// See [`CLUSTER_CIDR`].
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

/// A running control plane. Dropping it stops every process (in reverse start order) and removes its directory.
#[derive(Debug)]
pub struct Cluster {
    procs: Vec<Process>,
    pki: Pki,
    /// The aggregation layer's front proxy CA (the API server's identity to extension API servers).
    front_proxy: Pki,
    server: String,
    admin_kubeconfig: PathBuf,
    etcd_url: String,
    dir: TempDir,
}

impl Cluster {
    /// Starts a control plane with default options and waits until it is ready: `/readyz` is ok and the
    /// controller-manager has created the `default` ServiceAccount (pods can be created).
    pub async fn start() -> Result<Self> {
        Self::start_with(ClusterOptions::default()).await
    }

    /// Like [`Cluster::start`], with options.
    pub async fn start_with(opts: ClusterOptions) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("nodelet-cluster-").tempdir()?;
        let pki = Pki::new(&dir.path().join("pki"))?;
        let front_proxy = Pki::new(&dir.path().join("pki/front-proxy"))?;
        let api_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");
        let admin_kubeconfig = dir.path().join("admin.kubeconfig");
        let admin = pki.client("admin", "nodelet-test-admin", &["system:masters"])?;
        kubeconfig::write(&admin_kubeconfig, &server, &pki.ca_pem(), "admin", &admin)?;
        let mut cluster =
            Cluster { procs: Vec::new(), pki, front_proxy, server, admin_kubeconfig, etcd_url: String::new(), dir };
        let deadline = Instant::now() + opts.start_timeout;

        cluster.etcd_url = cluster.start_etcd()?;
        cluster.start_apiserver(api_port, &cluster.etcd_url.clone())?;
        cluster.wait_ready(deadline).await?;
        let client = cluster.admin().await?;

        cluster.start_controller_manager(&opts)?;
        cluster.start_scheduler()?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        cluster
            .wait_until("the default ServiceAccount (controller-manager)", deadline, || async {
                Ok(sas.get_opt("default").await?.is_some())
            })
            .await?;
        Ok(cluster)
    }

    /// Stops the API server and starts it again on the same port and etcd: clients' watches break and must
    /// resume. Returns once it is ready again.
    pub async fn restart_apiserver(&mut self) -> Result<()> {
        let at = self.procs.iter().position(|p| p.name() == "kube-apiserver").context("no kube-apiserver running")?;
        self.procs.remove(at).stop(Duration::from_secs(5));
        let port: u16 = self.server.rsplit(':').next().unwrap_or_default().parse()?;
        self.start_apiserver(port, &self.etcd_url.clone())?;
        let restarted = self.procs.pop().context("the restarted kube-apiserver")?;
        self.procs.insert(at, restarted);
        self.wait_ready(Instant::now() + Duration::from_secs(60)).await
    }

    async fn wait_ready(&mut self, deadline: Instant) -> Result<()> {
        let client = self.admin().await?;
        self.wait_until("kube-apiserver /readyz", deadline, || async {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            Ok(client.request_text(req).await.is_ok_and(|t| t == "ok"))
        })
        .await
    }

    /// The API server's URL (`https://127.0.0.1:<port>`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The cluster's PKI: its CA signs client certificates (x509 authn) and, through the controller-manager, CSRs.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// A kubeconfig of a `system:masters` user.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A client with the admin identity.
    pub async fn admin(&self) -> Result<kube::Client> {
        client_from(&self.admin_kubeconfig).await
    }

    /// Writes a kubeconfig for node `node` (user `system:node:<node>`, group `system:nodes`): the identity the
    /// Node authorizer and NodeRestriction admission check.
    pub fn node_kubeconfig(&self, node: &str) -> Result<PathBuf> {
        let user = format!("system:node:{node}");
        let creds = self.pki.client(&format!("node-{node}"), &user, &["system:nodes"])?;
        let path = self.dir.path().join(format!("node-{node}.kubeconfig"));
        kubeconfig::write(&path, &self.server, &self.pki.ca_pem(), &user, &creds)?;
        Ok(path)
    }

    /// Creates a bootstrap token as `kubeadm token create` does (in the `system:bootstrappers:kubeadm:default-node-token`
    /// group, allowed to send CSRs by kubeadm's `kubeadm:kubelet-bootstrap` binding) and writes a bootstrap kubeconfig
    /// with it. `auto_approve`: also kubeadm's bindings under which the controller-manager approves node client
    /// CSRs by itself (the first from a bootstrap token, renewals from a node).
    pub fn bootstrap_token(&self, auto_approve: bool) -> Result<PathBuf> {
        let id: String = format!("{:06x}", std::process::id() % 0xffffff);
        let secret = "0123456789abcdef";
        let group = "system:bootstrappers:kubeadm:default-node-token";
        let binding = |name: &str, role: &str, kind: &str, subject: &str| {
            format!(
                "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: '{name}'}}\n\
                 roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: '{role}'}}\n\
                 subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: {kind}, name: '{subject}'}}]\n"
            )
        };
        let mut manifest = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: bootstrap-token-{id}, namespace: kube-system}}\n\
             type: bootstrap.kubernetes.io/token\nstringData: {{token-id: '{id}', token-secret: '{secret}', \
             usage-bootstrap-authentication: 'true', usage-bootstrap-signing: 'true', auth-extra-groups: '{group}'}}\n"
        );
        manifest += &binding("kubeadm:kubelet-bootstrap", "system:node-bootstrapper", "Group", group);
        if auto_approve {
            let client = "system:certificates.k8s.io:certificatesigningrequests:nodeclient";
            manifest += &binding("kubeadm:node-autoapprove-bootstrap", client, "Group", group);
        }
        self.apply(&format!("bootstrap-{id}"), &manifest)?;
        if auto_approve {
            self.auto_approve_renewals()?;
        }
        let path = self.dir.path().join(format!("bootstrap-{id}.kubeconfig"));
        kubeconfig::write_token(
            &path,
            &self.server,
            &self.pki.ca_pem(),
            "tls-bootstrap-token-user",
            &format!("{id}.{secret}"),
        )?;
        Ok(path)
    }

    /// kubeadm's `kubeadm:node-autoapprove-certificate-rotation` binding: the controller-manager approves a node's
    /// CSRs for its own client certificate.
    pub fn auto_approve_renewals(&self) -> Result<()> {
        let role = "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient";
        self.apply(
            "autoapprove-rotation",
            &format!(
                "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n\
                 metadata: {{name: 'kubeadm:node-autoapprove-certificate-rotation'}}\n\
                 roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: '{role}'}}\n\
                 subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: Group, name: 'system:nodes'}}]\n"
            ),
        )
    }

    /// `kubectl apply` of `manifest` (kept in the fixture's directory as `<name>.yaml`).
    fn apply(&self, name: &str, manifest: &str) -> Result<()> {
        let file = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, manifest)?;
        let out = self.kubectl().args(["apply", "-f"]).arg(&file).output()?;
        anyhow::ensure!(out.status.success(), "kubectl apply {name}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(&self.admin_kubeconfig);
        cmd
    }

    /// PIDs of the control-plane processes.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Process::pid).collect()
    }

    /// The fixture's directory (PKI, kubeconfigs, etcd data, logs); removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn start_etcd(&mut self) -> Result<String> {
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new(control_plane_bin("etcd")?);
        cmd.arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.path().join("etcd").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--listen-metrics-urls=")
            .arg("--log-level=warn")
            // Throwaway data: fsync buys nothing here and costs seconds per test on a shared disk.
            .arg("--unsafe-no-fsync");
        self.spawn("etcd", cmd)?;
        Ok(url)
    }

    fn start_apiserver(&mut self, port: u16, etcd_url: &str) -> Result<()> {
        let sans = [
            "127.0.0.1",
            // The host's loopback as a QEMU guest on its user network reaches it (`cgv2-vm.sh run --net`).
            "10.0.2.2",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "10.96.0.1",
        ];
        let serving = self.pki.server("apiserver", &sans)?;
        // The identity the API server presents to kubelets (logs, exec, port-forward).
        let kubelet_client =
            self.pki.client("apiserver-kubelet-client", "kube-apiserver-kubelet-client", &["system:masters"])?;
        let sa = self.pki.key_pair("sa")?;
        let ca = self.pki.ca().cert.clone();
        // The aggregation layer (metrics.k8s.io through metrics-server), as kubeadm configures it.
        let proxy_client = self.front_proxy.client("front-proxy-client", "front-proxy-client", &[])?;
        let mut cmd = Command::new(control_plane_bin("kube-apiserver")?);
        cmd.arg(format!("--etcd-servers={etcd_url}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            // The `kubernetes` Service's endpoints would be 127.0.0.1, which endpoint validation rejects.
            .arg("--endpoint-reconciler-type=none")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", self.dir.path().join("apiserver-certs").display()))
            .arg(format!("--tls-cert-file={}", serving.cert.display()))
            .arg(format!("--tls-private-key-file={}", serving.key.display()))
            .arg(format!("--client-ca-file={}", ca.display()))
            .arg(format!("--kubelet-client-certificate={}", kubelet_client.cert.display()))
            .arg(format!("--kubelet-client-key={}", kubelet_client.key.display()))
            // Like kubeadm: test node names do not resolve, their InternalIP does.
            .arg("--kubelet-preferred-address-types=InternalIP,Hostname")
            .arg(format!("--service-account-key-file={}", sa.cert.display()))
            .arg(format!("--service-account-signing-key-file={}", sa.key.display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--authorization-mode=Node,RBAC")
            // As kubeadm: bootstrap tokens (secrets in kube-system) authenticate joining nodes.
            .arg("--enable-bootstrap-token-auth=true")
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg("--allow-privileged=true")
            .arg(format!("--requestheader-client-ca-file={}", self.front_proxy.ca().cert.display()))
            .arg("--requestheader-allowed-names=front-proxy-client")
            .arg("--requestheader-extra-headers-prefix=X-Remote-Extra-")
            .arg("--requestheader-group-headers=X-Remote-Group")
            .arg("--requestheader-username-headers=X-Remote-User")
            .arg(format!("--proxy-client-cert-file={}", proxy_client.cert.display()))
            .arg(format!("--proxy-client-key-file={}", proxy_client.key.display()))
            // Extension API servers are reached at their endpoints' addresses: there is no kube-proxy.
            .arg("--enable-aggregator-routing=true")
            .arg("--profiling=false")
            .arg("--v=1");
        self.spawn("kube-apiserver", cmd)
    }

    fn start_controller_manager(&mut self, opts: &ClusterOptions) -> Result<()> {
        let kc = self.component_kubeconfig("kube-controller-manager", "system:kube-controller-manager")?;
        let sa_key = self.dir.path().join("pki/sa.key");
        let ca = self.pki.ca().clone();
        let mut cmd = Command::new(control_plane_bin("kube-controller-manager")?);
        component_args(&mut cmd, &kc, free_port()?, &self.dir.path().join("kcm-certs"));
        cmd.arg(format!("--cluster-signing-cert-file={}", ca.cert.display()))
            .arg(format!("--cluster-signing-key-file={}", ca.key.display()))
            .arg(format!("--root-ca-file={}", ca.cert.display()))
            .arg(format!("--service-account-private-key-file={}", sa_key.display()))
            .arg("--use-service-account-credentials=true")
            .arg("--allocate-node-cidrs=true")
            .arg(format!("--cluster-cidr={CLUSTER_CIDR}"))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!("--node-monitor-grace-period={}s", opts.node_monitor_grace_period.as_secs()))
            // As kubeadm: the bootstrap token controllers too.
            .arg("--controllers=*,bootstrapsigner,tokencleaner");
        if let Some(d) = opts.cluster_signing_duration {
            cmd.arg(format!("--cluster-signing-duration={}s", d.as_secs()));
        }
        self.spawn("kube-controller-manager", cmd)
    }

    fn start_scheduler(&mut self) -> Result<()> {
        let kc = self.component_kubeconfig("kube-scheduler", "system:kube-scheduler")?;
        let mut cmd = Command::new(control_plane_bin("kube-scheduler")?);
        component_args(&mut cmd, &kc, free_port()?, &self.dir.path().join("scheduler-certs"));
        self.spawn("kube-scheduler", cmd)
    }

    /// Starts metrics-server (`kubectl top`) serving on `address` (an address the API server reaches that is not
    /// loopback: endpoint validation refuses loopback), registers it as `v1beta1.metrics.k8s.io` and waits until
    /// the API server reports that APIService Available. It scrapes kubelets at their InternalIP and the port in
    /// their status, every `resolution`.
    pub async fn start_metrics_server(&mut self, address: &str, resolution: Duration) -> Result<()> {
        let creds = self.pki.client("metrics-server", "system:metrics-server", &["system:masters"])?;
        let kc = self.dir.path().join("metrics-server.kubeconfig");
        kubeconfig::write(&kc, &self.server, &self.pki.ca_pem(), "metrics-server", &creds)?;
        let port = free_port()?;
        let mut cmd = Command::new(crate::testbed::monitoring_bin("metrics-server")?);
        for flag in ["kubeconfig", "authentication-kubeconfig", "authorization-kubeconfig"] {
            cmd.arg(format!("--{flag}={}", kc.display()));
        }
        cmd.arg(format!("--bind-address={address}"))
            .arg(format!("--secure-port={port}"))
            .arg(format!("--cert-dir={}", self.dir.path().join("metrics-server-certs").display()))
            .arg("--kubelet-insecure-tls")
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg("--kubelet-use-node-status-port")
            .arg("--kubelet-request-timeout=5s")
            .arg(format!("--metric-resolution={}s", resolution.as_secs()))
            .arg("--v=2");
        self.spawn("metrics-server", cmd)?;
        let manifest = self.dir.path().join("metrics-server.yaml");
        std::fs::write(
            &manifest,
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: metrics-server, namespace: kube-system}}\n\
                 spec: {{ports: [{{name: https, port: 443, targetPort: {port}}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: metrics-server, namespace: kube-system, labels: {{kubernetes.io/service-name: metrics-server}}}}\n\
                 addressType: IPv4\nendpoints: [{{addresses: ['{address}'], conditions: {{ready: true}}}}]\n\
                 ports: [{{name: https, port: {port}, protocol: TCP}}]\n---\n\
                 apiVersion: apiregistration.k8s.io/v1\nkind: APIService\nmetadata: {{name: v1beta1.metrics.k8s.io}}\n\
                 spec: {{service: {{name: metrics-server, namespace: kube-system, port: 443}}, group: metrics.k8s.io, \
                 version: v1beta1, insecureSkipTLSVerify: true, groupPriorityMinimum: 100, versionPriority: 100}}\n"
            ),
        )?;
        let out = self.kubectl().args(["apply", "-f"]).arg(&manifest).output()?;
        anyhow::ensure!(out.status.success(), "registering metrics-server: {}", String::from_utf8_lossy(&out.stderr));
        let kubectl = self.kubectl();
        let deadline = Instant::now() + Duration::from_secs(60);
        let program = kubectl.get_program().to_owned();
        let args: Vec<_> = kubectl.get_args().map(|a| a.to_owned()).collect();
        self.wait_until("the metrics.k8s.io APIService to be Available", deadline, || {
            let (program, args) = (program.clone(), args.clone());
            async move {
                let out = Command::new(program)
                    .args(args)
                    .args(["get", "apiservice", "v1beta1.metrics.k8s.io", "-o"])
                    .arg("jsonpath={.status.conditions[?(@.type==\"Available\")].status}")
                    .output()?;
                Ok(String::from_utf8_lossy(&out.stdout).trim() == "True")
            }
        })
        .await
    }

    fn component_kubeconfig(&self, name: &str, user: &str) -> Result<PathBuf> {
        let creds = self.pki.client(name, user, &[])?;
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        kubeconfig::write(&path, &self.server, &self.pki.ca_pem(), user, &creds)?;
        Ok(path)
    }

    fn spawn(&mut self, name: &str, cmd: Command) -> Result<()> {
        let logs = self.dir.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        self.procs.push(Process::spawn(name, cmd, &logs)?);
        Ok(())
    }

    /// Polls `check` until it returns true, failing early (with the log tail) if any process has died.
    async fn wait_until<F, Fut>(&mut self, what: &str, deadline: Instant, mut check: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let mut last_err = None;
        loop {
            for p in &mut self.procs {
                p.ensure_running()?;
            }
            match check().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(e),
            }
            if Instant::now() > deadline {
                let logs: Vec<String> =
                    self.procs.iter().map(|p| format!("--- {} ---\n{}", p.name(), p.log_tail(15))).collect();
                bail!("timed out waiting for {what} (last error: {last_err:?})\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Flags shared by kube-controller-manager and kube-scheduler: identity, delegated authn/authz, loopback serving.
fn component_args(cmd: &mut Command, kubeconfig: &Path, port: u16, cert_dir: &Path) {
    for flag in ["kubeconfig", "authentication-kubeconfig", "authorization-kubeconfig"] {
        cmd.arg(format!("--{flag}={}", kubeconfig.display()));
    }
    cmd.arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg(format!("--cert-dir={}", cert_dir.display()))
        .arg("--leader-elect=false")
        .arg("--profiling=false")
        .arg("--v=1");
}

impl Drop for Cluster {
    fn drop(&mut self) {
        while let Some(mut p) = self.procs.pop() {
            p.stop(Duration::from_secs(10));
        }
    }
}

/// A `kube` client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}
