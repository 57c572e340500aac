//! TLS bootstrap and client certificate rotation end to end, against the test bed's control plane prepared as
//! `kubeadm init` leaves it (bootstrap token authentication, the token's secret and kubeadm's RBAC bindings, the
//! controller-manager signing node CSRs): nodelet starts with only a bootstrap kubeconfig; its first CSR is
//! denied (a clear error, and a new request), the second approved; the node registers with the issued
//! certificate and runs a pod. Certificates are issued for 90 s, so rotation (at 70-90% of the lifetime,
//! counting the signer's 5 minutes of backdating) happens at once and again, while the pod's log streams
//! through the kubelet API; the node keeps renewing its Lease after the first certificate expired. With
//! `serverTLSBootstrap`, the kubelet API gets its serving certificate from a `kubelet-serving` CSR (approved by
//! the test, as an administrator would) and presents each renewal to new connections without a restart.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures_util::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestCondition};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, LogParams, Patch, PatchParams, PostParams};
use nodelet_integration::cluster::{Cluster, ClusterOptions};
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{Nodelet, pod, wait_for, wait_pod};

const NODE: &str = "nodelet-bootstrap";

/// Names of the kubelet client CSRs sent by `user`, oldest first.
async fn csrs_from(csrs: &Api<CertificateSigningRequest>, user: &str) -> Result<Vec<String>> {
    let mut list = csrs.list(&ListParams::default()).await?.items;
    list.sort_by_key(|c| c.metadata.creation_timestamp.clone().map(|t| t.0));
    Ok(list
        .into_iter()
        .filter(|c| c.spec.signer_name == "kubernetes.io/kube-apiserver-client-kubelet")
        .filter(|c| c.spec.username.as_deref() == Some(user))
        .filter_map(|c| c.metadata.name)
        .collect())
}

/// Sets the CSR's approval condition (`Approved` or `Denied`), as `kubectl certificate approve|deny` does.
async fn decide(csrs: &Api<CertificateSigningRequest>, name: &str, type_: &str, reason: &str) -> Result<()> {
    let mut csr = csrs.get(name).await?;
    let condition = CertificateSigningRequestCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(format!("{reason} by the test")),
        ..Default::default()
    };
    csr.status.get_or_insert_with(Default::default).conditions.get_or_insert_with(Vec::new).push(condition);
    csrs.replace_subresource("approval", name, &PostParams::default(), &csr).await?;
    Ok(())
}

/// The subject and serial of the certificate the kubelet API on `port` presents (`openssl s_client`).
fn presented(port: u16) -> Option<String> {
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -subject -serial -nameopt compat"
    );
    let out = std::process::Command::new("sh").args(["-c", &script]).output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| s.contains("serial="))
}

/// Approves every kubelet-serving CSR of node `NODE` (an administrator's part: the controller-manager does not).
async fn approve_serving(csrs: Api<CertificateSigningRequest>) {
    loop {
        for csr in csrs.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
            let pending = csr.status.as_ref().and_then(|s| s.conditions.as_ref()).is_none_or(Vec::is_empty);
            let ours = csr.spec.signer_name == "kubernetes.io/kubelet-serving"
                && csr.spec.username.as_deref() == Some(&format!("system:node:{NODE}"));
            if pending && ours {
                let _ = decide(&csrs, &csr.metadata.name.unwrap_or_default(), "Approved", "Administrator").await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn current_link(node: &Nodelet) -> Option<PathBuf> {
    std::fs::read_link(node.root_dir().join("pki/kubelet-client-current.pem")).ok()
}

fn not_after(file: &std::path::Path) -> Result<jiff::Timestamp> {
    let text = std::fs::read_to_string(file)?;
    Ok(nodelet::certificate::store::Credential::parse(&text).map_err(anyhow::Error::msg)?.not_after)
}

#[tokio::test]
async fn tls_bootstrap_and_rotation() -> Result<()> {
    if !ready("tls_bootstrap_and_rotation", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let options = ClusterOptions { cluster_signing_duration: Some(Duration::from_secs(90)), ..Default::default() };
    let cluster = Cluster::start_with(options).await?;
    let registry = Registry::start().await?;
    let client = cluster.admin().await?;
    let bootstrap = cluster.bootstrap_token(false)?;
    let token_id = std::fs::read_to_string(&bootstrap)?
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: ").map(|t| t.split('.').next().unwrap_or_default().to_string()))
        .context("the token id")?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubelet.conf");
    let net_d = support::loopback_only_network()?;
    let mut args = support::cluster_node_args(&cluster, &registry, net_d.path())?;
    args.extend([
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--bootstrap-kubeconfig".into(),
        bootstrap.display().to_string(),
        "--rotate-certificates=true".into(),
    ]);
    let config = "nodeStatusUpdateFrequency: 2s\naddress: 127.0.0.1\nserverTLSBootstrap: true\n";
    let mut node = Nodelet::start_with_ip(NODE, config, "127.0.0.1", &args)?;

    // The first request is denied: nodelet says why and asks again with a new key.
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let bootstrapper = format!("system:bootstrap:{token_id}");
    let first = wait_for("the node's first CSR", Duration::from_secs(60), || async {
        Ok(csrs_from(&csrs, &bootstrapper).await?.into_iter().next())
    })
    .await
    .with_context(|| node.log())?;
    decide(&csrs, &first, "Denied", "NotToday").await?;
    wait_for("the denial in nodelet's log", Duration::from_secs(30), || async {
        Ok(node.log().contains("certificate signing request is denied, reason: NotToday").then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    let second = wait_for("a second CSR", Duration::from_secs(30), || async {
        Ok(csrs_from(&csrs, &bootstrapper).await?.into_iter().find(|n| *n != first))
    })
    .await
    .with_context(|| node.log())?;
    ensure!(kubeconfig.metadata().is_err(), "no kubeconfig before a certificate is issued");
    decide(&csrs, &second, "Approved", "ByTheTest").await?;
    support::wait_node_ready(&client, NODE).await.with_context(|| node.log())?;
    let written = std::fs::read_to_string(&kubeconfig)?;
    let current = node.root_dir().join("pki/kubelet-client-current.pem");
    ensure!(written.contains(&format!("client-certificate: {}", current.display())), "{written}");

    // The kubelet API presents no certificate until its serving CSR is approved, then the issued one.
    let port = node.port().context("the kubelet API's port")?;
    ensure!(presented(port).is_none(), "a serving certificate before any was issued: {:?}", presented(port));
    let approver = tokio::spawn(approve_serving(csrs.clone()));
    let first_serving =
        wait_for("the issued serving certificate", Duration::from_secs(60), || async { Ok(presented(port)) })
            .await
            .with_context(|| node.log())?;
    ensure!(first_serving.contains(&format!("CN=system:node:{NODE}")), "{first_serving}");

    // Renewals are approved by the controller-manager (kubeadm's binding); a pod logs across rotations.
    cluster.auto_approve_renewals()?;
    let image = registry.reference("busybox", "latest");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: ticker}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.5; done']}}\n"
    ))).await?;
    wait_pod(&pods, "ticker", "Running", Duration::from_secs(60), |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await
    .with_context(|| node.log())?;
    let lines = Arc::new(AtomicUsize::new(0));
    let stream = pods.log_stream("ticker", &LogParams { follow: true, ..Default::default() }).await?;
    let counter = lines.clone();
    let follow = tokio::spawn(async move {
        let mut stream = stream.lines();
        while let Some(Ok(_)) = stream.next().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let bootstrapped = current_link(&node).context("the current certificate")?;
    let first_expiry = not_after(&node.root_dir().join("pki").join(&bootstrapped))?;
    let rotated = wait_for("a rotation", Duration::from_secs(120), || async {
        Ok(current_link(&node).filter(|l| *l != bootstrapped))
    })
    .await
    .with_context(|| node.log())?;
    ensure!(node.log().contains("certificate rotated"), "{}", node.log());
    let renewals = csrs_from(&csrs, &format!("system:node:{NODE}")).await?;
    ensure!(!renewals.is_empty(), "the renewal is the node's own request");
    ensure!(node.root_dir().join("pki").join(&bootstrapped).exists(), "the bootstrapped pair stays");
    ensure!(rotated != bootstrapped);

    // Past the first certificate's end, the node still renews its Lease (new connections present the new
    // certificate) and the log still streams.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let after = first_expiry + jiff::SignedDuration::from_secs(1);
    let streamed = lines.load(Ordering::SeqCst);
    wait_for("a Lease renewal after the first certificate expired", Duration::from_secs(120), || async {
        let lease = leases.get(NODE).await?;
        let renewed = lease.spec.and_then(|s| s.renew_time).map(|t| t.0);
        Ok(renewed.filter(|r| *r > after).map(|_| ()))
    })
    .await
    .with_context(|| node.log())?;
    let now = lines.load(Ordering::SeqCst);
    ensure!(now > streamed, "the log kept streaming: {streamed} -> {now} lines");
    // The serving certificate was renewed too, and new connections get the renewal.
    let renewed = presented(port).context("the serving certificate")?;
    ensure!(renewed != first_serving, "the serving certificate was not rotated: {renewed}");
    follow.abort();
    approver.abort();
    let patch = serde_json::json!({"metadata": {"labels": {"checked": "yes"}}});
    pods.patch("ticker", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    node.ensure_running()?;
    Ok(())
}
