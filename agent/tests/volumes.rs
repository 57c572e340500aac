//! Volumes end to end, on nodelet as the only node of a real control plane: configMap (a live edit reaches the
//! running pod), secret (tmpfs, mode 0400 plus fsGroup's group read), downwardAPI, emptyDir on disk and in
//! memory, hostPath, the service account volume the API server injects (its token verified by a TokenReview),
//! an optional missing configMap (the pod runs) and a required one (FailedMount until it exists), an
//! unsupported volume type (a clear FailedMount), a subPath symlink escape (refused), `kill -9` of the agent
//! with volumes mounted (no remount, no restart), an image volume (and one whose image cannot be pulled),
//! termination messages, clusterTrustBundle projections (by name, edited live; by signer and labels),
//! podCertificate projections (issued by the test as the signer; denied), and deletion (nothing left mounted or
//! on disk).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use nodelet_integration::cluster::Cluster;
use nodelet_integration::layers::{Layer, push_image};
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{Nodelet, events_for, pod, wait_for, wait_pod};

const NODE: &str = "nodelet-volumes";

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

/// The pod's container log as text (read from the node's log directory).
fn log_text(node: &Nodelet, p: &Pod, container: &str) -> String {
    let uid = p.metadata.uid.clone().unwrap_or_default();
    let name = p.metadata.name.clone().unwrap_or_default();
    let path = node.pod_logs_dir().join(format!("default_{name}_{uid}/{container}/0.log"));
    nodelet::logs::read_text(&path).unwrap_or_default()
}

/// The value of the last `KEY=` line of a log.
fn value(log: &str, key: &str) -> Option<String> {
    log.lines().rev().find_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_owned)
}

/// A self-signed CA certificate, PEM.
fn self_signed(name: &str) -> Result<String> {
    let mut params = rcgen::CertificateParams::new(Vec::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    Ok(params.self_signed(&rcgen::KeyPair::generate()?)?.pem())
}

/// A signer of PodCertificateRequests: issues those for `example.com/test-signer` from a CA of its own (valid 2 h,
/// refresh after 30 min, as the API's rules require), denies those for `example.com/deny`.
async fn sign_pod_certificates(client: kube::Client) -> Result<()> {
    use k8s_openapi::api::certificates::v1::PodCertificateRequest;
    let key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::new())?;
    ca.distinguished_name.push(rcgen::DnType::CommonName, "test pod signer");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca.clone().self_signed(&key)?.pem();
    let issuer = rcgen::Issuer::new(ca, key);
    let requests: Api<PodCertificateRequest> = Api::namespaced(client, "default");
    loop {
        for pcr in requests.list(&Default::default()).await?.items {
            let mut status = pcr.status.clone().unwrap_or_default();
            if status.conditions.as_ref().is_some_and(|c| !c.is_empty()) {
                continue;
            }
            let name = pcr.metadata.name.clone().unwrap_or_default();
            let now = time::OffsetDateTime::now_utc().replace_nanosecond(0)?;
            let at = |t: time::OffsetDateTime| -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
                Ok(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::from_second(
                    t.unix_timestamp(),
                )?))
            };
            let condition = |type_: &str, reason: &str| {
                serde_json::from_value(serde_json::json!({"type": type_, "status": "True", "reason": reason,
                    "message": format!("{reason} by the test"), "lastTransitionTime": jiff::Timestamp::now().to_string()}))
            };
            match pcr.spec.signer_name.as_str() {
                "example.com/test-signer" => {
                    let der =
                        rustls::pki_types::CertificateSigningRequestDer::from(pcr.spec.stub_pkc_s10_request.0.clone());
                    let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der)?;
                    csr.params.not_before = now;
                    csr.params.not_after = now + time::Duration::hours(2);
                    let leaf = csr.signed_by(&issuer)?;
                    status.certificate_chain = Some(format!("{}{ca_pem}", leaf.pem()));
                    status.not_before = Some(at(now)?);
                    status.not_after = Some(at(now + time::Duration::hours(2))?);
                    status.begin_refresh_at = Some(at(now + time::Duration::minutes(30))?);
                    status.conditions = Some(vec![condition("Issued", "Issued")?]);
                }
                "example.com/deny" => status.conditions = Some(vec![condition("Denied", "NotThisOne")?]),
                _ => continue,
            }
            let mut updated = pcr.clone();
            updated.status = Some(status);
            requests.replace_status(&name, &PostParams::default(), &updated).await?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Mount points below `dir` in the agent's mount namespace.
fn mounts_under(pid: u32, dir: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let dir = dir.display().to_string();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((f.first()?.to_string(), f.get(4)?.to_string()))
        })
        .filter(|(_, p)| p.starts_with(&dir))
        .collect()
}

const SCRIPT: &str = r#"
echo "GREETING=$(cat /cfg/greeting)"
echo "SINGLE=$(cat /single/greeting.txt)"
echo "SECRET=$(cat /sec/password)"
echo "SECMODE=$(stat -L -c %a:%g /sec/password)"
echo "SECFS=$(grep ' /sec ' /proc/mounts | cut -d' ' -f3)"
echo "LABELS=$(tr '\n' , < /info/labels)"
echo "CPU=$(cat /info/cpu)"
echo "SCRATCH=$(stat -c %a:%g /scratch)"
echo "MEMFS=$(grep ' /mem ' /proc/mounts | cut -d' ' -f3,4)"
echo "OPTIONAL=$(ls /opt-cfg | wc -l)"
echo "READONLY=$(touch /cfg/x 2>/dev/null && echo no || echo yes)"
echo hi > /host/from-pod
SA=/var/run/secrets/kubernetes.io/serviceaccount
echo "TOKEN=$(cat $SA/token)"
echo "NS=$(cat $SA/namespace)"
echo "CA=$(head -1 $SA/ca.crt)"
while true; do echo "NOW=$(cat /cfg/greeting) $(cat /sec/password)"; sleep 0.2; done
"#;

#[tokio::test]
async fn volumes_reach_the_containers() -> Result<()> {
    if !ready("volumes_reach_the_containers", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let image = registry.reference("busybox", "latest");
    let host_dir = tempfile::tempdir()?;
    let (mut node, _net_d) = support::start_cluster_node(
        &cluster,
        &registry,
        NODE,
        "nodeStatusUpdateFrequency: 2s\naddress: 127.0.0.1\n",
        &[],
    )?;
    let client = cluster.admin().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "app-config"}, "data": {"greeting": "hello"}
            }))?,
        )
        .await?;
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "app-secret"}, "stringData": {"password": "s3cr3t"}
            }))?,
        )
        .await?;
    // The service account admission needs the namespace's default account (the controller-manager makes it).
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), "default");
    wait_for("the default service account", Duration::from_secs(60), || async {
        Ok(accounts.get_opt("default").await?)
    })
    .await?;

    let spec = format!(
        r#"metadata: {{name: vols, labels: {{app: vols, tier: test}}}}
spec:
  terminationGracePeriodSeconds: 1
  securityContext: {{fsGroup: 1234}}
  containers:
  - name: main
    image: {image}
    command: [sh, -c, {script:?}]
    resources: {{limits: {{cpu: 250m, memory: 64Mi}}}}
    volumeMounts:
    - {{name: cfg, mountPath: /cfg}}
    - {{name: cfg, mountPath: /single/greeting.txt, subPath: greeting}}
    - {{name: sec, mountPath: /sec}}
    - {{name: info, mountPath: /info}}
    - {{name: scratch, mountPath: /scratch}}
    - {{name: mem, mountPath: /mem}}
    - {{name: host, mountPath: /host}}
    - {{name: opt, mountPath: /opt-cfg}}
  volumes:
  - {{name: cfg, configMap: {{name: app-config}}}}
  - {{name: sec, secret: {{secretName: app-secret, defaultMode: 256}}}}
  - name: info
    downwardAPI:
      items:
      - {{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}
      - {{path: cpu, resourceFieldRef: {{containerName: main, resource: limits.cpu, divisor: 1m}}}}
  - {{name: scratch, emptyDir: {{}}}}
  - {{name: mem, emptyDir: {{medium: Memory, sizeLimit: 8Mi}}}}
  - {{name: host, hostPath: {{path: {host}, type: DirectoryOrCreate}}}}
  - {{name: opt, configMap: {{name: absent, optional: true}}}}
"#,
        script = SCRIPT,
        host = host_dir.path().join("made").display(),
    );
    pods.create(&PostParams::default(), &pod(&spec)).await?;
    let running = wait_pod(&pods, "vols", "Running", Duration::from_secs(90), |p| phase(p) == "Running")
        .await
        .with_context(|| node.log())?;
    let log = wait_for("the pod's report", Duration::from_secs(30), || async {
        let log = log_text(&node, &running, "main");
        Ok(Some(log).filter(|l| l.contains("NOW=")))
    })
    .await?;
    let expect = |key: &str, want: &str| -> Result<()> {
        let got = value(&log, key);
        ensure!(got.as_deref() == Some(want), "{key}: {got:?}, want {want:?}\n{log}");
        Ok(())
    };
    expect("GREETING", "hello")?;
    expect("SINGLE", "hello")?;
    expect("SECRET", "s3cr3t")?;
    // 0400 plus the group read fsGroup adds, owned by the fsGroup; on tmpfs.
    expect("SECMODE", "440:1234")?;
    expect("SECFS", "tmpfs")?;
    expect("LABELS", "app=\"vols\",tier=\"test\"")?;
    expect("CPU", "250")?;
    expect("SCRATCH", "2777:1234")?;
    let memfs = value(&log, "MEMFS").unwrap_or_default();
    ensure!(memfs.starts_with("tmpfs ") && memfs.contains("size=8192k"), "MEMFS: {memfs}");
    expect("OPTIONAL", "0")?;
    expect("READONLY", "yes")?;
    expect("NS", "default")?;
    expect("CA", "-----BEGIN CERTIFICATE-----")?;
    ensure!(std::fs::read_to_string(host_dir.path().join("made/from-pod"))? == "hi\n", "hostPath write");
    // The injected token is the pod's: the API server authenticates it as the default service account, bound
    // to this pod.
    let token = value(&log, "TOKEN").context("token")?;
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = TokenReview { spec: TokenReviewSpec { token, ..Default::default() }, ..Default::default() };
    let status = reviews.create(&PostParams::default(), &review).await?.status.unwrap_or_default();
    let user = status.user.clone().unwrap_or_default();
    ensure!(status.authenticated == Some(true), "token review: {status:?}");
    ensure!(user.username.as_deref() == Some("system:serviceaccount:default:default"), "{user:?}");
    let bound = user.extra.unwrap_or_default().get("authentication.kubernetes.io/pod-name").cloned();
    ensure!(bound == Some(vec!["vols".to_string()]), "bound to {bound:?}");

    // A live edit of the ConfigMap reaches the running pod through the object's watch (well before the 60 s
    // resync would).
    let mut latencies = Vec::new();
    for i in 1..=20 {
        let changed = Instant::now();
        let patch = serde_json::json!({"data": {"greeting": format!("edit-{i}")}});
        config_maps.patch("app-config", &PatchParams::default(), &Patch::Merge(&patch)).await?;
        wait_for("the edit in the pod", Duration::from_secs(30), || async {
            let log = log_text(&node, &running, "main");
            Ok(value(&log, "NOW").filter(|v| v.starts_with(&format!("edit-{i} "))))
        })
        .await?;
        latencies.push(changed.elapsed());
    }
    latencies.sort();
    eprintln!(
        "configMap edit -> file changed in the pod, 20 edits: p50 {:?}, max {:?} (the pod reads every 0.2 s)",
        latencies[10], latencies[19]
    );

    // kill -9 with volumes mounted: back, nothing is remounted and the container was not restarted. A pod with a
    // secret volume force-deleted while the agent is down has its volumes unmounted and removed once it is back.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: orphan}}\nspec:\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600'], volumeMounts: [{{name: s, mountPath: /s}}]}}\n  volumes:\n  - {{name: s, secret: {{secretName: app-secret}}}}\n"
    ))).await?;
    let orphan = wait_pod(&pods, "orphan", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    let orphan_dir = node.root_dir().join("pods").join(orphan.metadata.uid.clone().unwrap_or_default());
    let uid = running.metadata.uid.clone().unwrap_or_default();
    let pod_dir = node.root_dir().join("pods").join(&uid);
    let pid = node.pid().context("pid")?;
    let before = mounts_under(pid, &pod_dir);
    ensure!(before.len() >= 4, "secret, projected and memory tmpfs and the subPath pin: {before:?}");
    node.kill();
    pods.delete("orphan", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;
    node.restart()?;
    let pid = node.pid().context("pid")?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    wait_for("the node to be back", Duration::from_secs(60), || async {
        let n = nodes.get(NODE).await?;
        let heartbeat =
            n.status.and_then(|s| s.conditions).unwrap_or_default().into_iter().find(|c| c.type_ == "Ready");
        Ok(heartbeat.filter(|c| c.status == "True").map(|_| ()))
    })
    .await?;
    wait_for("the force-deleted pod's volumes gone", Duration::from_secs(30), || async {
        let gone = mounts_under(pid, &orphan_dir).is_empty() && !orphan_dir.join("volumes").exists();
        Ok(gone.then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = mounts_under(pid, &pod_dir);
    ensure!(after == before, "mounts changed across the restart: {before:?} -> {after:?}");
    let now = pods.get("vols").await?;
    let status = now.status.clone().unwrap_or_default().container_statuses.unwrap_or_default();
    ensure!(status.first().is_some_and(|c| c.restart_count == 0), "{status:?}");
    let patch = serde_json::json!({"data": {"greeting": "after-restart"}});
    config_maps.patch("app-config", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    wait_for("an edit after the restart", Duration::from_secs(30), || async {
        Ok(value(&log_text(&node, &running, "main"), "NOW").filter(|v| v == "after-restart s3cr3t"))
    })
    .await
    .with_context(|| node.log())?;

    // A required ConfigMap that does not exist: FailedMount, the pod waits; once it exists, the pod runs.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: needs-cfg}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'cat /c/k; sleep 3600'], volumeMounts: [{{name: c, mountPath: /c}}]}}\n  volumes:\n  - {{name: c, configMap: {{name: late}}}}\n"
    ))).await?;
    wait_for("FailedMount for the missing ConfigMap", Duration::from_secs(60), || async {
        let events = events_for(&client, "needs-cfg").await?;
        Ok(events.into_iter().find(|(r, m)| {
            r == "FailedMount" && m == "MountVolume.SetUp failed for volume \"c\" : configmap \"late\" not found"
        }))
    })
    .await?;
    ensure!(phase(&pods.get("needs-cfg").await?) == "Pending");
    config_maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "late"}, "data": {"k": "v"}}))?,
        )
        .await?;
    wait_pod(&pods, "needs-cfg", "Running once the ConfigMap exists", Duration::from_secs(60), |p| {
        phase(p) == "Running"
    })
    .await?;

    // A volume type nodelet does not support: a clear FailedMount, never a silent skip.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: claim}}\nspec:\n  nodeName: {NODE}\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600'], volumeMounts: [{{name: data, mountPath: /data}}]}}\n  volumes:\n  - {{name: data, persistentVolumeClaim: {{claimName: data}}}}\n"
    ))).await?;
    wait_for("FailedMount for the claim", Duration::from_secs(60), || async {
        let events = events_for(&client, "claim").await?;
        Ok(events
            .into_iter()
            .find(|(r, m)| r == "FailedMount" && m.contains("volume type persistentVolumeClaim is not supported")))
    })
    .await?;

    // A subPath that another container turned into a symlink to / is refused.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: escape}}\nspec:\n  restartPolicy: Never\n  initContainers:\n  - {{name: plant, image: {image}, command: [ln, -s, /, /vol/escape], volumeMounts: [{{name: shared, mountPath: /vol}}]}}\n  containers:\n  - {{name: main, image: {image}, command: [cat, /x/etc/hostname], volumeMounts: [{{name: shared, mountPath: /x, subPath: escape}}]}}\n  volumes:\n  - {{name: shared, emptyDir: {{}}}}\n"
    ))).await?;
    let refused = wait_pod(&pods, "escape", "the subPath refused", Duration::from_secs(60), |p| {
        let s = p.status.clone().unwrap_or_default().container_statuses.unwrap_or_default();
        s.first().and_then(|c| c.state.clone()?.waiting).is_some_and(|w| {
            w.reason.as_deref() == Some("CreateContainerConfigError")
                && w.message.unwrap_or_default().contains("leads outside the volume")
        })
    })
    .await?;
    ensure!(phase(&refused) == "Pending");

    // Termination messages: written by a non-root container at a path of its choice; from the log's end with
    // FallbackToLogsOnError when the container failed without writing one.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: said}}\nspec:\n  restartPolicy: Never\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'printf bye > /tmp/said'], terminationMessagePath: /tmp/said, securityContext: {{runAsUser: 1000}}}}\n  - {{name: fails, image: {image}, command: [sh, -c, 'echo first; echo last words; exit 3'], terminationMessagePolicy: FallbackToLogsOnError}}\n"
    ))).await?;
    let said = wait_pod(&pods, "said", "Failed", Duration::from_secs(60), |p| phase(p) == "Failed").await?;
    let statuses = said.status.clone().unwrap_or_default().container_statuses.unwrap_or_default();
    let message = |name: &str| {
        let s = statuses.iter().find(|s| s.name == name);
        s.and_then(|s| s.state.clone()?.terminated?.message)
    };
    ensure!(message("main").as_deref() == Some("bye"), "{statuses:?}");
    ensure!(message("fails").as_deref() == Some("first\nlast words\n"), "{statuses:?}");

    // An image volume: the image's files, read-only; one whose image cannot be pulled keeps its container
    // waiting with the pull's reason.
    let content = Layer::new().dir("data", 0o755).file("data/hello.txt", b"from an image\n", 0o644);
    push_image(&registry, "content", "v1", &[content.tar()]).await?;
    let content_ref = registry.reference("content", "v1");
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: imgvol}}\nspec:\n  restartPolicy: Never\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'cat /img/data/hello.txt; touch /img/x 2>/dev/null || echo read-only'], volumeMounts: [{{name: img, mountPath: /img}}]}}\n  volumes:\n  - {{name: img, image: {{reference: {content_ref}, pullPolicy: IfNotPresent}}}}\n"
    ))).await?;
    let done = wait_pod(&pods, "imgvol", "Succeeded", Duration::from_secs(60), |p| phase(p) == "Succeeded").await?;
    let out = log_text(&node, &done, "main");
    ensure!(out == "from an image\nread-only\n", "image volume: {out:?}");
    let missing_ref = registry.reference("content", "missing");
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: imgmissing}}\nspec:\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600'], volumeMounts: [{{name: img, mountPath: /img}}]}}\n  volumes:\n  - {{name: img, image: {{reference: {missing_ref}}}}}\n"
    ))).await?;
    wait_pod(&pods, "imgmissing", "waiting on the image volume's pull", Duration::from_secs(60), |p| {
        let s = p.status.clone().unwrap_or_default().container_statuses.unwrap_or_default();
        s.first()
            .and_then(|c| c.state.clone()?.waiting?.reason)
            .is_some_and(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
    })
    .await?;

    // mountPropagation: HostToContainer on a shared host mount: a mount made on the host after the container
    // started appears in it. On a private mount it is refused with the CRI runtimes' message.
    let shared = host_dir.path().join("shared");
    let private = host_dir.path().join("private");
    std::fs::create_dir_all(&shared)?;
    std::fs::create_dir_all(&private)?;
    let d = shared.display();
    node.in_mount_namespace(&format!("mount --bind {d} {d} && mount --make-shared {d} && mkdir -p {d}/sub"))?;
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: propagation}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'while true; do cat /h/sub/marker 2>/dev/null; sleep 0.2; done'], volumeMounts: [{{name: h, mountPath: /h, mountPropagation: HostToContainer}}]}}\n  volumes:\n  - {{name: h, hostPath: {{path: {d}}}}}\n"
    ))).await?;
    let running = wait_pod(&pods, "propagation", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    node.in_mount_namespace(&format!("mount -t tmpfs tmpfs {d}/sub && echo propagated > {d}/sub/marker"))?;
    wait_for("the host's new mount in the container", Duration::from_secs(20), || async {
        Ok(log_text(&node, &running, "main").contains("propagated").then_some(()))
    })
    .await?;
    node.in_mount_namespace(&format!("umount {d}/sub"))?;
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: unshared}}\nspec:\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600'], volumeMounts: [{{name: h, mountPath: /h, mountPropagation: HostToContainer}}]}}\n  volumes:\n  - {{name: h, hostPath: {{path: {}}}}}\n",
        private.display()
    ))).await?;
    wait_pod(&pods, "unshared", "refused: not a shared mount", Duration::from_secs(60), |p| {
        let s = p.status.clone().unwrap_or_default().container_statuses.unwrap_or_default();
        s.first().and_then(|c| c.state.clone()?.waiting).is_some_and(|w| {
            w.reason.as_deref() == Some("CreateContainerConfigError")
                && w.message.unwrap_or_default().contains("is not a shared or slave mount")
        })
    })
    .await?;

    // recursiveReadOnly: a read-only hostPath whose submount is read-only too; without it the submount is not.
    let ro = host_dir.path().join("ro");
    std::fs::create_dir_all(ro.join("sub"))?;
    node.in_mount_namespace(&format!("mount -t tmpfs tmpfs {}/sub", ro.display()))?;
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: rro}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'for d in /r /p; do touch $d/sub/x 2>/dev/null && echo $d:writable || echo $d:read-only; done']\n    volumeMounts:\n    - {{name: h, mountPath: /r, readOnly: true, recursiveReadOnly: Enabled}}\n    - {{name: h, mountPath: /p, readOnly: true}}\n  volumes:\n  - {{name: h, hostPath: {{path: {}}}}}\n",
        ro.display()
    ))).await?;
    let done = wait_pod(&pods, "rro", "Succeeded", Duration::from_secs(60), |p| phase(p) == "Succeeded").await?;
    let out = log_text(&node, &done, "main");
    ensure!(out == "/r:read-only\n/p:writable\n", "recursiveReadOnly: {out:?}");
    node.in_mount_namespace(&format!("umount {}/sub", ro.display()))?;

    // clusterTrustBundle projections: by name (an edit reaches the running pod), by signer and labels (each
    // certificate once, the other label's bundle left out), optional and missing (an empty file), and a
    // required missing one (FailedMount).
    let (first, second, third) = (self_signed("first")?, self_signed("second")?, self_signed("third")?);
    let bundles: Api<ClusterTrustBundle> = Api::all(client.clone());
    let bundle = |name: &str, signer: Option<&str>, env: &str, pem: String| -> Result<ClusterTrustBundle> {
        Ok(serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"env": env}},
            "spec": {"signerName": signer, "trustBundle": pem}
        }))?)
    };
    bundles.create(&PostParams::default(), &bundle("plain", None, "test", first.clone())?).await?;
    let signer = Some("example.com/trust");
    let both = format!("{first}{second}");
    bundles.create(&PostParams::default(), &bundle("example.com:trust:one", signer, "test", both)?).await?;
    bundles.create(&PostParams::default(), &bundle("example.com:trust:two", signer, "test", second.clone())?).await?;
    bundles.create(&PostParams::default(), &bundle("example.com:trust:prod", signer, "prod", third)?).await?;
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: trust}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'while true; do echo \"CTB=$(sed -n 2p /t/a.pem) $(grep -c BEGIN /t/signer.pem) $(wc -c < /t/none.pem)\"; sleep 0.2; done'], volumeMounts: [{{name: t, mountPath: /t}}]}}\n  volumes:\n  - name: t\n    projected:\n      sources:\n      - clusterTrustBundle: {{name: plain, path: a.pem}}\n      - clusterTrustBundle: {{signerName: example.com/trust, labelSelector: {{matchLabels: {{env: test}}}}, path: signer.pem}}\n      - clusterTrustBundle: {{name: absent, optional: true, path: none.pem}}\n"
    ))).await?;
    let trust = wait_pod(&pods, "trust", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    let second_line = |pem: &str| pem.lines().nth(1).unwrap_or_default().to_string();
    let want = format!("{} 2 0", second_line(&first));
    wait_for("the trust anchors in the pod", Duration::from_secs(30), || async {
        Ok(value(&log_text(&node, &trust, "main"), "CTB").filter(|v| *v == want))
    })
    .await
    .with_context(|| log_text(&node, &trust, "main"))?;
    let patch = serde_json::json!({"spec": {"trustBundle": second}});
    bundles.patch("plain", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let want = format!("{} 2 0", second_line(&second));
    wait_for("the edited bundle in the pod", Duration::from_secs(30), || async {
        Ok(value(&log_text(&node, &trust, "main"), "CTB").filter(|v| *v == want))
    })
    .await
    .with_context(|| log_text(&node, &trust, "main"))?;
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: trust-missing}}\nspec:\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600'], volumeMounts: [{{name: t, mountPath: /t}}]}}\n  volumes:\n  - {{name: t, projected: {{sources: [{{clusterTrustBundle: {{name: absent, path: a.pem}}}}]}}}}\n"
    ))).await?;
    wait_for("FailedMount for the missing bundle", Duration::from_secs(60), || async {
        let events = events_for(&client, "trust-missing").await?;
        Ok(events.into_iter().find(|(r, m)| {
            r == "FailedMount"
                && m == "MountVolume.SetUp failed for volume \"t\" : while getting ClusterTrustBundle: clustertrustbundles.certificates.k8s.io \"absent\" not found"
        }))
    })
    .await?;

    // podCertificate projections: the test is the signer (example.com/test-signer) and issues from its own CA;
    // the chain (leaf and CA), the key and the bundle (key first, then the chain) reach the pod. Another signer's
    // request is denied, which is a FailedMount in upstream's words.
    let signer = tokio::spawn(sign_pod_certificates(client.clone()));
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: pcert}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'while true; do echo \"PCERT=$(grep -c BEGIN.CERTIFICATE /p/chain.pem) $(head -1 /p/key.pem) $(grep -c BEGIN /p/bundle.pem)\"; sleep 0.2; done'], volumeMounts: [{{name: p, mountPath: /p}}]}}\n  volumes:\n  - name: p\n    projected:\n      sources:\n      - podCertificate: {{signerName: example.com/test-signer, keyType: ECDSAP256, keyPath: key.pem, certificateChainPath: chain.pem, credentialBundlePath: bundle.pem}}\n"
    ))).await?;
    let pcert = wait_pod(&pods, "pcert", "Running", Duration::from_secs(60), |p| phase(p) == "Running")
        .await
        .with_context(|| node.log())?;
    wait_for("the pod certificate in the pod", Duration::from_secs(30), || async {
        Ok(value(&log_text(&node, &pcert, "main"), "PCERT").filter(|v| v == "2 -----BEGIN PRIVATE KEY----- 3"))
    })
    .await
    .with_context(|| log_text(&node, &pcert, "main"))?;
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: pcert-denied}}\nspec:\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600'], volumeMounts: [{{name: p, mountPath: /p}}]}}\n  volumes:\n  - {{name: p, projected: {{sources: [{{podCertificate: {{signerName: example.com/deny, keyType: ED25519, credentialBundlePath: b.pem}}}}]}}}}\n"
    ))).await?;
    wait_for("FailedMount for the denied pod certificate", Duration::from_secs(60), || async {
        let events = events_for(&client, "pcert-denied").await?;
        Ok(events.into_iter().find(|(r, m)| {
            r == "FailedMount" && m.contains("PodCertificateRequest was permanently denied: reason=\"NotThisOne\"")
        }))
    })
    .await?;
    signer.abort();

    // Deleted: nothing of the pods' volumes is left mounted or on disk.
    let names = [
        "vols",
        "needs-cfg",
        "claim",
        "escape",
        "said",
        "imgvol",
        "imgmissing",
        "propagation",
        "unshared",
        "rro",
        "trust",
        "trust-missing",
        "pcert",
        "pcert-denied",
    ];
    let mut uids = Vec::new();
    for name in names {
        uids.push(pods.get(name).await?.metadata.uid.unwrap_or_default());
        pods.delete(name, &DeleteParams::default()).await?;
    }
    for name in names {
        wait_for(&format!("{name} to go"), Duration::from_secs(60), || async {
            Ok(pods.get_opt(name).await?.is_none().then_some(()))
        })
        .await
        .with_context(|| node.log())?;
    }
    let pods_dir = node.root_dir().join("pods");
    ensure!(
        mounts_under(pid, &pods_dir).is_empty(),
        "left mounted: {:?}\n{}",
        mounts_under(pid, &pods_dir),
        node.log()
    );
    for uid in uids {
        ensure!(!pods_dir.join(&uid).join("volumes").exists(), "pod {uid}'s volumes left on disk");
        let image_volume = node.root_dir().join("rootfs").join(format!("{uid}.volume.img"));
        ensure!(!image_volume.exists(), "{} left", image_volume.display());
    }
    ensure!(host_dir.path().join("made/from-pod").exists(), "a hostPath's contents stay");
    node.ensure_running()?;
    Ok(())
}
