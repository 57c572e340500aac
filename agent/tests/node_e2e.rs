//! nodelet as the only node of a real control plane (etcd, kube-apiserver, controller-manager, scheduler):
//! registration and heartbeats, pods scheduled to it running with upstream-shaped statuses, logs on disk,
//! restarts with CrashLoopBackOff, completion, image errors, graceful deletion, and NotReady/Ready when the agent
//! stops and comes back.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use nodelet_integration::cluster::{Cluster, ClusterOptions};
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{Nodelet, pod, wait_for, wait_pod};

const NODE: &str = "nodelet-e2e";

fn condition(node: &Node, kind: &str) -> Option<String> {
    node.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == kind).map(|c| c.status.clone())
}

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

fn container(p: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    p.status.as_ref()?.container_statuses.as_ref()?.first()
}

fn waiting_reason(p: &Pod) -> Option<&str> {
    container(p)?.state.as_ref()?.waiting.as_ref()?.reason.as_deref()
}

/// `kubectl` (admin) with `args`: (success, stdout, stderr).
fn kubectl(cluster: &Cluster, args: &[&str]) -> Result<(bool, String, String)> {
    let out = cluster.kubectl().args(args).output().context("running kubectl")?;
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Ok((out.status.success(), text(out.stdout), text(out.stderr)))
}

/// A request straight to the kubelet API with `curl` (optionally with a client certificate): (HTTP code, body).
fn kubelet_get(port: u16, path: &str, cert: Option<&nodelet_integration::certs::CertFiles>) -> Result<(u16, String)> {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sk", "--max-time", "10", "-w", "\n%{http_code}"]);
    if let Some(c) = cert {
        cmd.arg("--cert").arg(&c.cert).arg("--key").arg(&c.key);
    }
    let out = cmd.arg(format!("https://127.0.0.1:{port}{path}")).output().context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
    Ok((code.parse().with_context(|| format!("curl: {text}"))?, body.to_string()))
}

async fn events_for(client: &kube::Client, pod: &str) -> Result<Vec<(String, String)>> {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let list = events.list(&ListParams::default().fields(&format!("involvedObject.name={pod}"))).await?;
    Ok(list.items.into_iter().map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default())).collect())
}

#[tokio::test]
async fn a_node_runs_pods_from_the_api_server() -> Result<()> {
    if !ready("a_node_runs_pods_from_the_api_server", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let mut cluster = Cluster::start_with(ClusterOptions {
        node_monitor_grace_period: Duration::from_secs(16),
        ..Default::default()
    })
    .await?;
    let registry = Registry::start().await?;
    let kubeconfig = cluster.node_kubeconfig(NODE)?;
    // A static pod in the manifest folder: shown in the API server as a mirror pod.
    let manifests = tempfile::tempdir()?;
    let static_manifest = manifests.path().join("static-web.yaml");
    std::fs::write(
        &static_manifest,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: static-web, labels: {{app: static}}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {}, command: [sleep, '3600']}}\n",
            registry.reference("busybox", "latest")
        ),
    )?;
    // The registry again behind a proxy that can stall (a pull that hangs).
    let proxy = nodelet_integration::proxy::Proxy::start(&registry.host()).await?;
    let port = nodelet_integration::ports::free_port()?;
    // The API server is on the host's loopback, so this node stays in the host's network namespace: its pods get
    // only loopback (the pod network is tested in a namespace of its own, tests/network.rs).
    let net_d = support::loopback_only_network()?;
    let mut node = Nodelet::start(
        NODE,
        "nodeLeaseDurationSeconds: 8\nnodeStatusUpdateFrequency: 2s\naddress: 127.0.0.1\n",
        &[
            "--port".into(),
            port.to_string(),
            "--client-ca-file".into(),
            cluster.pki().ca().cert.display().to_string(),
            "--cni-conf-dir".into(),
            net_d.path().display().to_string(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--insecure-registry".into(),
            registry.host(),
            "--insecure-registry".into(),
            proxy.host().into(),
            "--node-labels".into(),
            "nodelet.dev/test=yes".into(),
            "--pod-manifest-path".into(),
            manifests.path().display().to_string(),
        ],
    )?;
    let client = cluster.admin().await?;
    let nodes: Api<Node> = Api::all(client.clone());

    // Registration: Ready, with capacity, nodeInfo, addresses, labels, and a Lease renewed.
    let registered = wait_for("the node to be Ready", Duration::from_secs(60), || async {
        Ok(nodes.get_opt(NODE).await?.filter(|n| condition(n, "Ready").as_deref() == Some("True")))
    })
    .await
    .with_context(|| node.log())?;
    let status = registered.status.clone().unwrap_or_default();
    let info = status.node_info.clone().unwrap_or_default();
    ensure!(info.container_runtime_version.starts_with("nodelet://"), "{info:?}");
    ensure!(info.kubelet_version.starts_with("v1.37") && !info.kernel_version.is_empty(), "{info:?}");
    ensure!(
        status
            .capacity
            .as_ref()
            .is_some_and(|c| c.contains_key("cpu") && c.contains_key("memory") && c["pods"].0 == "110")
    );
    ensure!(status.daemon_endpoints.and_then(|d| d.kubelet_endpoint).map(|e| e.port) == Some(i32::from(port)));
    let labels = registered.metadata.labels.clone().unwrap_or_default();
    ensure!(labels.get("nodelet.dev/test").map(String::as_str) == Some("yes") && labels["kubernetes.io/os"] == "linux");
    for kind in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
        ensure!(condition(&registered, kind).as_deref() == Some("False"), "{kind}");
    }
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let first = wait_for("the node's lease", Duration::from_secs(20), || async {
        Ok(leases.get_opt(NODE).await?.and_then(|l| l.spec).and_then(|s| s.renew_time))
    })
    .await
    .with_context(|| node.log())?;
    wait_for("the lease to be renewed", Duration::from_secs(10), || async {
        let now = leases.get(NODE).await?.spec.and_then(|s| s.renew_time);
        Ok(now.filter(|t| t.0 > first.0).map(|_| ()))
    })
    .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let image = registry.reference("busybox", "latest");

    // A long-running pod: Running with upstream-shaped container status, output in its CRI log.
    let started = Instant::now();
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: web}}\nspec:\n  terminationGracePeriodSeconds: 3\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'echo hello from nodelet; echo to stderr >&2; echo svc=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT; exec sleep 3600']\n"
    ))).await?;
    let web = wait_pod(&pods, "web", "Running and Ready", Duration::from_secs(60), |p| {
        phase(p) == "Running" && container(p).is_some_and(|c| c.ready)
    })
    .await?;
    let running_after = started.elapsed();
    let c = container(&web).context("container status")?;
    ensure!(c.state.as_ref().and_then(|s| s.running.as_ref()).is_some(), "{c:?}");
    ensure!(c.container_id.as_deref().is_some_and(|id| id.starts_with("nodelet://")), "{c:?}");
    ensure!(c.image == image && c.image_id.starts_with(&format!("{}/busybox@sha256:", registry.host())), "{c:?}");
    ensure!(c.restart_count == 0 && c.started == Some(true));
    let st = web.status.clone().unwrap_or_default();
    ensure!(st.qos_class.as_deref() == Some("BestEffort") && st.host_ip.as_deref() == Some("127.0.0.1"));
    ensure!(st.start_time.is_some());
    let conds: Vec<(String, String)> =
        st.conditions.unwrap_or_default().into_iter().map(|c| (c.type_, c.status)).collect();
    for kind in ["PodScheduled", "PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready"] {
        ensure!(conds.contains(&(kind.to_string(), "True".to_string())), "{kind} in {conds:?}");
    }
    let uid = web.metadata.uid.clone().unwrap_or_default();
    let log = node.pod_logs_dir().join(format!("default_web_{uid}/main/0.log"));
    let text = wait_for("the container's log", Duration::from_secs(10), || async {
        let text = nodelet::logs::read_text(&log).unwrap_or_default();
        Ok(Some(text).filter(|t| t.contains("hello from nodelet") && t.contains("to stderr") && t.contains("svc=")))
    })
    .await?;
    // Service links: the API server's `kubernetes` Service.
    ensure!(text.contains("svc=10.96.0.1:443\n"), "service environment: {text}");
    let raw = std::fs::read_to_string(&log)?;
    ensure!(raw.lines().any(|l| l.contains(" stdout F hello from nodelet")), "{raw}");
    ensure!(raw.lines().any(|l| l.contains(" stderr F to stderr")), "{raw}");
    // Events are posted asynchronously, so the last may land after the status that says Running.
    let wanted = ["Pulling", "Pulled", "Created", "Started"];
    wait_for("the web pod's lifecycle events", Duration::from_secs(10), || async {
        let reasons: Vec<String> = events_for(&client, "web").await?.into_iter().map(|(r, _)| r).collect();
        Ok(Some(()).filter(|_| wanted.iter().all(|w| reasons.iter().any(|r| r == w))))
    })
    .await?;
    eprintln!("web: created -> Running in {running_after:?}; log: {text:?}");

    // `kubectl logs` goes through the API server to nodelet's kubelet API (TLS, its client certificate checked
    // against the cluster CA, authorized by a SubjectAccessReview).
    let (ok, out, err) = kubectl(&cluster, &["logs", "web"])?;
    ensure!(ok && out.contains("hello from nodelet\n") && out.contains("to stderr\n"), "kubectl logs: {out:?} {err}");
    let (ok, out, err) = kubectl(&cluster, &["logs", "web", "--limit-bytes=5"])?;
    ensure!(ok && out.len() == 5, "--limit-bytes: {out:?} {err}");
    let (ok, out, err) = kubectl(&cluster, &["logs", "web", "--tail=1", "--timestamps"])?;
    let (stamp, line) = out.trim_end().split_once(' ').unwrap_or_default();
    ensure!(
        ok && out.lines().count() == 1 && stamp.parse::<jiff::Timestamp>().is_ok(),
        "--tail/--timestamps: {out:?} {err}"
    );
    ensure!(text.contains(line), "--tail=1 gave {line:?}");
    let (ok, out, _) = kubectl(&cluster, &["logs", "web", "--since=1h"])?;
    ensure!(ok && out.contains("hello from nodelet"), "--since: {out:?}");
    let (ok, _, err) = kubectl(&cluster, &["logs", "web", "--previous"])?;
    ensure!(!ok && err.contains("previous terminated container \"main\" in pod \"web\" not found"), "{err}");
    // Straight to the kubelet API: no certificate is 401, a cluster identity without RBAC 403, the API server's
    // identity (system:masters) sees the node's pods.
    ensure!(kubelet_get(port, "/pods", None)?.0 == 401);
    let nobody = cluster.pki().client("nobody", "nobody", &[])?;
    let (code, body) = kubelet_get(port, "/pods", Some(&nobody))?;
    ensure!(code == 403 && body.contains("user=nobody"), "{code} {body}");
    let master = cluster.pki().client("kubelet-test-master", "tester", &["system:masters"])?;
    let (code, body) = kubelet_get(port, "/pods", Some(&master))?;
    let list: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{code} {body}"))?;
    let names: Vec<&str> =
        list["items"].as_array().into_iter().flatten().filter_map(|p| p["metadata"]["name"].as_str()).collect();
    ensure!(code == 200 && list["kind"] == "PodList" && names.contains(&"web"), "{names:?}");
    let web_status = list["items"].as_array().into_iter().flatten().find(|p| p["metadata"]["name"] == "web");
    ensure!(web_status.is_some_and(|p| p["status"]["phase"] == "Running"), "{web_status:?}");
    ensure!(kubelet_get(port, "/healthz", Some(&master))? == (200, "ok\n".into()));

    // `kubectl logs -f` follows the output as it is written and ends by itself when the container does.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: ticker}}\nspec:\n  restartPolicy: Never\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'for i in 1 2 3 4 5; do echo tick $i; sleep 1; done']}}\n"
    ))).await?;
    wait_pod(&pods, "ticker", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    let mut follow = cluster.kubectl();
    follow.args(["logs", "-f", "ticker"]).stdout(std::process::Stdio::piped());
    let follow = tokio::task::spawn_blocking(move || follow.output());
    let followed =
        tokio::time::timeout(Duration::from_secs(30), follow).await.context("kubectl logs -f never ended")???;
    let out = String::from_utf8_lossy(&followed.stdout);
    ensure!(out == "tick 1\ntick 2\ntick 3\ntick 4\ntick 5\n", "kubectl logs -f: {out:?}");

    // Init containers in order, then the app container; a completed pod with restartPolicy Never.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: job}}\nspec:\n  restartPolicy: Never\n  initContainers:\n  - {{name: first, image: {image}, command: [sh, -c, 'echo first']}}\n  - {{name: second, image: {image}, command: [sh, -c, 'echo second']}}\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'echo done']}}\n"
    ))).await?;
    let job = wait_pod(&pods, "job", "Succeeded", Duration::from_secs(60), |p| phase(p) == "Succeeded").await?;
    let st = job.status.clone().unwrap_or_default();
    let inits = st.init_container_statuses.unwrap_or_default();
    ensure!(inits.len() == 2);
    let finished = |s: &k8s_openapi::api::core::v1::ContainerStatus| {
        s.state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| (t.reason.clone(), t.exit_code, t.started_at.clone(), t.finished_at.clone()))
    };
    let (r1, c1, _, f1) = finished(&inits[0]).context("first init terminated")?;
    let (_, _, s2, _) = finished(&inits[1]).context("second init terminated")?;
    ensure!(r1.as_deref() == Some("Completed") && c1 == 0);
    ensure!(f1.map(|t| t.0) <= s2.map(|t| t.0), "init containers ran in order");
    let main = finished(container(&job).context("main")?).context("main terminated")?;
    ensure!(main.0.as_deref() == Some("Completed") && main.1 == 0);

    // A crashing container: restarted, CrashLoopBackOff with the last exit in lastState.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: crash}}\nspec:\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'echo crashing; exit 3']}}\n"
    ))).await?;
    let crash = wait_pod(&pods, "crash", "CrashLoopBackOff", Duration::from_secs(60), |p| {
        waiting_reason(p) == Some("CrashLoopBackOff") && container(p).is_some_and(|c| c.restart_count >= 1)
    })
    .await?;
    let c = container(&crash).context("crash status")?;
    let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()).context("lastState.terminated")?;
    ensure!(last.exit_code == 3 && last.reason.as_deref() == Some("Error"), "{last:?}");
    let message = c.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.message.clone()).unwrap_or_default();
    ensure!(message.starts_with("back-off 10s restarting failed container=main pod=crash_default("), "{message}");
    ensure!(phase(&crash) == "Running");
    // Upstream's timing: the first exit restarts at once, the second waits 10 s (from its finishedAt).
    ensure!(c.restart_count == 1, "restarted more than once before the back-off: {c:?}");
    let second_finished = last.finished_at.clone().context("finishedAt")?.0;
    let (ok, out, err) = kubectl(&cluster, &["logs", "crash", "--previous"])?;
    ensure!(ok && out == "crashing\n", "kubectl logs --previous: {out:?} {err}");
    // The third run as lastState: one that started after the second finished (while the third still runs,
    // lastState is the second).
    let crash = wait_pod(&pods, "crash", "the third run to finish", Duration::from_secs(40), |p| {
        container(p)
            .and_then(|c| c.last_state.as_ref())
            .and_then(|s| s.terminated.as_ref())
            .is_some_and(|t| t.started_at.as_ref().is_some_and(|s| s.0 > second_finished) && t.finished_at.is_some())
    })
    .await?;
    let third = container(&crash).and_then(|c| c.last_state.clone()).and_then(|s| s.terminated).context("third run")?;
    let third_started = third.started_at.clone().context("startedAt")?.0;
    let waited = third_started.duration_since(second_finished).as_secs_f64();
    ensure!((9.0..=15.0).contains(&waited), "back-off before the third run was {waited} s (want 10 s)");

    // Image errors: a missing image goes ErrImagePull -> ImagePullBackOff; a missing ConfigMap is a config error.
    pods.create(
        &PostParams::default(),
        &pod(&format!(
            "metadata: {{name: noimage}}\nspec:\n  containers:\n  - {{name: main, image: {}/does-not-exist:1}}\n",
            registry.host()
        )),
    )
    .await?;
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: nocm}}\nspec:\n  containers:\n  - name: main\n    image: {image}\n    command: [sleep, '3600']\n    env:\n    - name: X\n      valueFrom: {{configMapKeyRef: {{name: missing, key: k}}}}\n"
    ))).await?;
    wait_pod(&pods, "noimage", "ImagePullBackOff", Duration::from_secs(60), |p| {
        waiting_reason(p) == Some("ImagePullBackOff")
    })
    .await?;
    let nocm = wait_pod(&pods, "nocm", "CreateContainerConfigError", Duration::from_secs(60), |p| {
        waiting_reason(p) == Some("CreateContainerConfigError")
    })
    .await?;
    let message = container(&nocm)
        .and_then(|c| c.state.clone())
        .and_then(|s| s.waiting)
        .and_then(|w| w.message)
        .unwrap_or_default();
    ensure!(message.contains("configmap \"missing\" not found"), "{message}");
    // A pod deleted while its image pull hangs is stopped and removed at once (the pull goes on in the background).
    proxy.stall_after(0);
    pods.create(
        &PostParams::default(),
        &pod(&format!(
            "metadata: {{name: slowpull}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {}/busybox:latest}}\n",
            proxy.host()
        )),
    )
    .await?;
    wait_for("slowpull's Pulling event", Duration::from_secs(60), || async {
        Ok(events_for(&client, "slowpull").await?.iter().any(|(r, _)| r == "Pulling").then_some(()))
    })
    .await?;
    let deleting = Instant::now();
    pods.delete("slowpull", &DeleteParams::default()).await?;
    wait_for("slowpull to be gone", Duration::from_secs(30), || async {
        Ok(pods.get_opt("slowpull").await?.is_none().then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    ensure!(deleting.elapsed() < Duration::from_secs(10), "deletion waited for the pull: {:?}", deleting.elapsed());
    let (ok, _, err) = kubectl(&cluster, &["logs", "noimage"])?;
    ensure!(!ok && err.contains("is waiting to start: trying and failing to pull image"), "{err}");
    wait_for("a Failed event for noimage", Duration::from_secs(10), || async {
        let events = events_for(&client, "noimage").await?;
        Ok(events.iter().any(|(r, m)| r == "Failed" && m.starts_with("Failed to pull image")).then_some(()))
    })
    .await?;

    // Mirror pod: the static pod appears with the mirror annotation, owned by the Node, with its status; deleted by
    // someone, it is recreated (a new UID) while the static pod keeps running; the manifest removed, it goes.
    let mirror_name = format!("static-web-{NODE}");
    let mirror = wait_pod(&pods, &mirror_name, "a Running mirror pod", Duration::from_secs(60), |p| {
        phase(p) == "Running" && container(p).is_some_and(|c| c.ready)
    })
    .await?;
    let annotations = mirror.metadata.annotations.clone().unwrap_or_default();
    ensure!(annotations.contains_key("kubernetes.io/config.mirror"), "{annotations:?}");
    ensure!(annotations.get("kubernetes.io/config.source").map(String::as_str) == Some("file"), "{annotations:?}");
    let owners = mirror.metadata.owner_references.clone().unwrap_or_default();
    ensure!(owners.iter().any(|o| o.kind == "Node" && o.name == NODE), "{owners:?}");
    let first_container = container(&mirror).and_then(|c| c.container_id.clone());
    let first_uid = mirror.metadata.uid.clone();
    pods.delete(&mirror_name, &DeleteParams::default()).await?;
    let recreated = wait_pod(&pods, &mirror_name, "the mirror pod recreated", Duration::from_secs(60), |p| {
        p.metadata.uid != first_uid && phase(p) == "Running"
    })
    .await?;
    let c = container(&recreated).context("the recreated mirror's container status")?;
    ensure!(c.container_id == first_container && c.restart_count == 0, "the static pod must not restart: {c:?}");
    std::fs::remove_file(&static_manifest)?;
    wait_for("the mirror pod to go with its manifest", Duration::from_secs(30), || async {
        Ok(pods.get_opt(&mirror_name).await?.is_none().then_some(()))
    })
    .await?;

    // An invalid command: the container cannot start; StartError with exit code 128 and the reason, a Failed event.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: badcmd}}\nspec:\n  restartPolicy: Never\n  containers:\n  - {{name: main, image: {image}, command: [/no/such/binary]}}\n"
    ))).await?;
    let badcmd = wait_pod(&pods, "badcmd", "Failed", Duration::from_secs(60), |p| phase(p) == "Failed").await?;
    let terminated = container(&badcmd)
        .and_then(|c| c.state.clone())
        .and_then(|s| s.terminated)
        .context("badcmd's container terminated")?;
    ensure!(terminated.reason.as_deref() == Some("StartError") && terminated.exit_code == 128, "{terminated:?}");
    ensure!(terminated.message.as_deref().is_some_and(|m| m.contains("/no/such/binary")), "{terminated:?}");
    wait_for("a Failed event for badcmd", Duration::from_secs(10), || async {
        let events = events_for(&client, "badcmd").await?;
        Ok(events.iter().any(|(r, m)| r == "Failed" && m.contains("/no/such/binary")).then_some(()))
    })
    .await?;

    // Admission: a pod bound straight to the node (past the scheduler) asking for more CPU than allocatable is
    // rejected upstream's way: phase Failed, reason OutOfcpu, a Warning Event; the node keeps serving the rest.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: toobig}}\nspec:\n  nodeName: {NODE}\n  containers:\n  - name: main\n    image: {image}\n    command: [sleep, '3600']\n    resources: {{requests: {{cpu: '1000'}}}}\n"
    ))).await?;
    let toobig =
        wait_pod(&pods, "toobig", "Failed with OutOfcpu", Duration::from_secs(30), |p| phase(p) == "Failed").await?;
    let st = toobig.status.clone().unwrap_or_default();
    ensure!(st.reason.as_deref() == Some("OutOfcpu"), "{st:?}");
    ensure!(st.message.as_deref().is_some_and(|m| m.contains("Node didn't have enough resource: cpu")), "{st:?}");
    wait_for("an OutOfcpu event", Duration::from_secs(10), || async {
        let events = events_for(&client, "toobig").await?;
        Ok(events.iter().any(|(r, _)| r == "OutOfcpu").then_some(()))
    })
    .await?;
    ensure!(phase(&pods.get("web").await?) == "Running", "web must keep running after a rejected admission");

    // Graceful deletion: SIGTERM is ignored by the shell, so the grace period (3 s) passes, then SIGKILL.
    let deleting = Instant::now();
    pods.delete("web", &DeleteParams::default()).await?;
    wait_for("web to be gone", Duration::from_secs(30), || async {
        Ok(pods.get_opt("web").await?.is_none().then_some(()))
    })
    .await?;
    let took = deleting.elapsed();
    ensure!(took >= Duration::from_secs(3) && took < Duration::from_secs(15), "deletion took {took:?}");
    wait_for("a Killing event for web", Duration::from_secs(10), || async {
        let events = events_for(&client, "web").await?;
        Ok(events.iter().any(|(r, m)| r == "Killing" && m == "Stopping container main").then_some(()))
    })
    .await?;

    // The API server restarts: the pod watch resumes (a re-list), so a pod created afterwards runs.
    cluster.restart_apiserver().await?;
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: after-restart}}\nspec:\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600']}}\n"
    ))).await?;
    wait_pod(&pods, "after-restart", "Running after an API server restart", Duration::from_secs(90), |p| {
        phase(p) == "Running"
    })
    .await
    .with_context(|| node.log())?;

    // Restart survival: a pod that writes a line a second, and one that will be deleted while the agent is down.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: survivor}}\nspec:\n  hostUsers: false\n  terminationGracePeriodSeconds: 2\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'i=0; while true; do i=$((i+1)); echo beat $i; sleep 1; done']}}\n"
    ))).await?;
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: orphan}}\nspec:\n  hostUsers: false\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600']}}\n"
    ))).await?;
    let before = wait_pod(&pods, "survivor", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    let orphan = wait_pod(&pods, "orphan", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    let orphan_uid = orphan.metadata.uid.clone().unwrap_or_default();
    let survivor_uid = before.metadata.uid.clone().unwrap_or_default();
    let before = container(&before).cloned().context("survivor's status")?;
    // Both in user namespaces (`hostUsers: false`): their ranges are on disk, and an exec joins the survivor's.
    let pods_dir = node.root_dir().join("pods");
    let userns_file = |uid: &str| pods_dir.join(uid).join("userns");
    let range = std::fs::read_to_string(userns_file(&survivor_uid))?;
    ensure!(userns_file(&orphan_uid).exists() && std::fs::read_to_string(userns_file(&orphan_uid))? != range);
    let uid_map = |what: &'static str| {
        let (ok, out, err) = kubectl(&cluster, &["exec", "survivor", "--", "cat", "/proc/self/uid_map"])?;
        ensure!(ok && out.split_whitespace().next() == Some("0") && out.contains("65536"), "{what}: {out} {err}");
        Ok::<_, anyhow::Error>(out)
    };
    let map_before = uid_map("before the restart")?;

    // kill -9: the node goes NotReady (Unknown) upstream's way; containers keep running. The orphan is force-deleted
    // meanwhile. Back, the node is Ready again and takes its pods over: no restarts, the same statuses.
    node.kill();
    pods.delete("orphan", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;
    wait_for("the node to go NotReady", Duration::from_secs(60), || async {
        Ok(nodes.get(NODE).await.ok().filter(|n| condition(n, "Ready").as_deref() == Some("Unknown")).map(|_| ()))
    })
    .await?;
    node.restart()?;
    wait_for("the node to be Ready again", Duration::from_secs(60), || async {
        Ok(nodes.get(NODE).await.ok().filter(|n| condition(n, "Ready").as_deref() == Some("True")).map(|_| ()))
    })
    .await
    .with_context(|| node.log())?;
    let after = container(&pods.get("survivor").await?).cloned().context("survivor's status")?;
    ensure!(after.container_id == before.container_id && after.restart_count == 0, "restarted: {after:?}");
    ensure!(after.state == before.state && after.ready, "status changed: {before:?} -> {after:?}");
    // The restarted agent knows the survivor's range, and an exec still lands in its namespace.
    ensure!(std::fs::read_to_string(userns_file(&survivor_uid))? == range, "the survivor's range changed");
    ensure!(uid_map("after the restart")? == map_before, "the exec's user namespace changed");
    // Its output went on while no agent read it and is in its log, every line, in order.
    let beats = wait_for("the survivor's log to go on", Duration::from_secs(30), || async {
        let (ok, out, _) = kubectl(&cluster, &["logs", "survivor"])?;
        let beats: Vec<u32> = out.lines().filter_map(|l| l.strip_prefix("beat ")?.parse().ok()).collect();
        Ok(Some(beats).filter(|b| ok && b.len() >= 20))
    })
    .await
    .with_context(|| node.log())?;
    ensure!(beats.iter().copied().eq(1..=u32::try_from(beats.len())?), "lines lost or repeated: {beats:?}");
    // What the force-deleted pod left is removed once the API server's pods are known.
    let records = node.root_dir().join("runtime/records");
    wait_for("the orphan's container to be removed", Duration::from_secs(30), || async {
        let left =
            std::fs::read_dir(&records)?.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&orphan_uid));
        let state = node.root_dir().join(format!("pod-state/{orphan_uid}.json")).exists();
        // Its user namespace range is released too.
        let range = userns_file(&orphan_uid).exists();
        Ok((!left && !state && !range).then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    // The taken-over container stops gracefully on deletion, and its records go with it.
    pods.delete("survivor", &DeleteParams::default()).await?;
    wait_for("survivor to be gone", Duration::from_secs(30), || async {
        Ok(pods.get_opt("survivor").await?.is_none().then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    ensure!(!node.root_dir().join(format!("pod-state/{survivor_uid}.json")).exists());
    Ok(())
}
