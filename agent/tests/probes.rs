//! Probes end to end on nodelet as the only node of a real control plane (its pods on a loopback-only network:
//! the probes connect from inside each pod's network namespace): an exec readiness probe following a file,
//! a failing exec liveness probe (Unhealthy and Killing events, a restart), httpGet and tcpSocket probes on
//! agnhost's netexec server, a grpc probe on agnhost's health server, a startup probe holding back readiness,
//! a readiness gate, and lifecycle hooks (postStart, preStop before SIGTERM, a failing postStart).

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{Nodelet, events_for, pod, wait_pod};

const NODE: &str = "nodelet-probes";

fn condition(p: &Pod, kind: &str) -> Option<String> {
    let conditions = p.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|c| c.type_ == kind).map(|c| c.status.clone())
}

fn container_ready(p: &Pod) -> Option<bool> {
    p.status.as_ref()?.container_statuses.as_ref()?.first().map(|c| c.ready)
}

fn restarts(p: &Pod) -> i32 {
    let statuses = p.status.as_ref().and_then(|s| s.container_statuses.as_ref());
    statuses.and_then(|s| s.first()).map_or(0, |c| c.restart_count)
}

#[tokio::test]
async fn probes_drive_readiness_and_restarts() -> Result<()> {
    if !ready("probes_drive_readiness_and_restarts", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let image = registry.reference("busybox", "latest");
    let agnhost = registry.reference("agnhost", "2.66.1");
    let (node, _net_d) = support::start_cluster_node(
        &cluster,
        &registry,
        NODE,
        "nodeStatusUpdateFrequency: 2s\naddress: 127.0.0.1\n",
        &[],
    )?;
    let client = cluster.admin().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // Readiness follows an exec probe: unready, ready once the file exists, unready once it is gone. Its command
    // names the file through `$(READY)`, which the kubelet expands from the container's env.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: readiness}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    env: [{{name: READY, value: /tmp/ready}}]\n    command: [sh, -c, 'sleep 4; touch /tmp/ready; sleep 6; rm /tmp/ready; sleep 3600']\n    readinessProbe: {{exec: {{command: [cat, '$(READY)']}}, periodSeconds: 1, failureThreshold: 1}}\n"
    ))).await?;
    // A pod that drains on SIGTERM (checked below): upstream probes its readiness while it terminates.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: draining}}\nspec:\n  terminationGracePeriodSeconds: 30\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'trap \"rm -f /tmp/ready; sleep 6; exit 0\" TERM; touch /tmp/ready; while true; do sleep 1; done']\n    readinessProbe: {{exec: {{command: [cat, /tmp/ready]}}, periodSeconds: 1, failureThreshold: 1}}\n    livenessProbe: {{exec: {{command: [cat, /tmp/ready]}}, periodSeconds: 1, failureThreshold: 1}}\n"
    ))).await?;
    let running = wait_pod(&pods, "readiness", "Running, not ready", Duration::from_secs(60), |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") && container_ready(p) == Some(false)
    })
    .await
    .with_context(|| node.log())?;
    ensure!(condition(&running, "Ready").as_deref() == Some("False"), "{:?}", running.status);
    wait_pod(&pods, "readiness", "ready", Duration::from_secs(20), |p| {
        condition(p, "Ready").as_deref() == Some("True")
    })
    .await?;
    wait_pod(&pods, "readiness", "unready again", Duration::from_secs(20), |p| {
        condition(p, "Ready").as_deref() == Some("False") && container_ready(p) == Some(false)
    })
    .await?;
    let events = events_for(&client, "readiness").await?;
    ensure!(events.iter().any(|(r, m)| r == "Unhealthy" && m.starts_with("Readiness probe failed:")), "{events:?}");
    ensure!(restarts(&pods.get("readiness").await?) == 0, "a readiness probe never restarts");

    // A failing liveness probe: Unhealthy, Killing, and a restart.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: liveness}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'sleep 2; touch /tmp/sick; sleep 3600']\n    livenessProbe: {{exec: {{command: [sh, -c, 'test ! -e /tmp/sick']}}, periodSeconds: 1, failureThreshold: 2}}\n"
    ))).await?;
    wait_pod(&pods, "liveness", "restarted", Duration::from_secs(60), |p| restarts(p) >= 1)
        .await
        .with_context(|| node.log())?;
    let events = events_for(&client, "liveness").await?;
    ensure!(events.iter().any(|(r, m)| r == "Unhealthy" && m.starts_with("Liveness probe failed:")), "{events:?}");
    ensure!(
        events.iter().any(|(r, m)| r == "Killing" && m == "Container main failed liveness probe, will be restarted"),
        "{events:?}"
    );

    // Deleted, the draining pod stops answering its readiness probe: unready while its container still runs (it
    // drains for 6 s), and its liveness probe, failing too, no longer runs (no restart, no Killing for it).
    wait_pod(&pods, "draining", "ready", Duration::from_secs(30), |p| condition(p, "Ready").as_deref() == Some("True"))
        .await?;
    pods.delete("draining", &DeleteParams::default()).await?;
    let draining = wait_pod(&pods, "draining", "unready while still running", Duration::from_secs(20), |p| {
        let running = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .is_some_and(|s| s.running.is_some());
        condition(p, "Ready").as_deref() == Some("False") && running
    })
    .await
    .with_context(|| node.log())?;
    ensure!(restarts(&draining) == 0, "{:?}", draining.status);
    let events = events_for(&client, "draining").await?;
    ensure!(!events.iter().any(|(_, m)| m.contains("failed liveness probe")), "{events:?}");

    // httpGet and tcpSocket on agnhost's netexec, reached inside the pod's network namespace; a startup probe
    // on a port nothing listens on holds readiness back.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: web}}\nspec:\n  terminationGracePeriodSeconds: 5\n  containers:\n  - name: main\n    image: {agnhost}\n    args: [netexec, --http-port=8080]\n    ports: [{{name: http, containerPort: 8080}}]\n    readinessProbe: {{httpGet: {{path: /healthz, port: http}}, periodSeconds: 1}}\n    livenessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}\n    lifecycle: {{preStop: {{httpGet: {{path: '/echo?msg=gone&code=500', port: http}}}}}}\n  - name: waits\n    image: {image}\n    command: [sleep, '3600']\n    startupProbe: {{tcpSocket: {{port: 9999}}, periodSeconds: 1, failureThreshold: 600}}\n"
    ))).await?;
    let web = wait_pod(&pods, "web", "main ready", Duration::from_secs(60), |p| {
        let statuses = p.status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
        statuses.iter().any(|c| c.name == "main" && c.ready)
    })
    .await
    .with_context(|| node.log())?;
    let statuses = web.status.clone().unwrap_or_default().container_statuses.unwrap_or_default();
    let waits = statuses.iter().find(|c| c.name == "waits").context("waits")?;
    ensure!(waits.started == Some(false) && !waits.ready, "the startup probe holds it back: {waits:?}");
    ensure!(condition(&web, "Ready").as_deref() == Some("False"), "one container is not ready");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let web = pods.get("web").await?;
    let statuses = web.status.clone().unwrap_or_default().container_statuses.unwrap_or_default();
    ensure!(statuses.iter().all(|c| c.restart_count == 0), "the tcp liveness probe passes: {statuses:?}");
    // Its preStop httpGet hook gets a 500: as upstream's, a hook that got an answer ran (no FailedPreStopHook).
    // (A grace period of 5 s: the hook shares it, and a loaded machine must not time it out.)
    pods.delete("web", &DeleteParams::default()).await?;
    support::wait_for("web gone", Duration::from_secs(60), || async {
        Ok(pods.get_opt("web").await?.is_none().then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    let events = events_for(&client, "web").await?;
    ensure!(!events.iter().any(|(reason, _)| reason == "FailedPreStopHook"), "{events:?}");

    // A grpc probe against agnhost's health server (grpc-go): ready.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: grpc}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {agnhost}\n    args: [grpc-health-checking, --port=5000, --http-port=8081]\n    readinessProbe: {{grpc: {{port: 5000}}, periodSeconds: 1}}\n"
    ))).await?;
    wait_pod(&pods, "grpc", "ready by its grpc probe", Duration::from_secs(60), |p| container_ready(p) == Some(true))
        .await
        .with_context(|| node.log())?;

    // A readiness gate: Ready only once another controller sets its condition True (ContainersReady before).
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: gated}}\nspec:\n  terminationGracePeriodSeconds: 1\n  readinessGates: [{{conditionType: example.com/attached}}]\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600']}}\n"
    ))).await?;
    let gated = wait_pod(&pods, "gated", "ContainersReady", Duration::from_secs(60), |p| {
        condition(p, "ContainersReady").as_deref() == Some("True")
    })
    .await?;
    ensure!(condition(&gated, "Ready").as_deref() == Some("False"), "{:?}", gated.status);
    let patch = serde_json::json!({"status": {"conditions": [{"type": "example.com/attached", "status": "True"}]}});
    pods.patch_status("gated", &kube::api::PatchParams::default(), &kube::api::Patch::Strategic(&patch)).await?;
    wait_pod(&pods, "gated", "Ready once its gate is True", Duration::from_secs(20), |p| {
        condition(p, "Ready").as_deref() == Some("True")
    })
    .await
    .with_context(|| node.log())?;

    // Lifecycle hooks: postStart runs in the container (beside its process, as upstream, so it waits for it); preStop runs before
    // SIGTERM (the container's TERM trap sees what the hook wrote); a failing postStart restarts the container.
    let out = tempfile::tempdir()?;
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: hooks}}\nspec:\n  terminationGracePeriodSeconds: 10\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'trap \"cat /tmp/prestop > /out/seen; exit 0\" TERM; until [ -e /tmp/poststart ]; do sleep 0.1; done; cat /tmp/poststart > /out/started; while true; do sleep 0.2; done']\n    lifecycle:\n      postStart: {{exec: {{command: [sh, -c, 'echo from-post-start > /tmp/poststart']}}}}\n      preStop: {{exec: {{command: [sh, -c, 'echo from-pre-stop > /tmp/prestop']}}}}\n    volumeMounts: [{{name: out, mountPath: /out}}]\n  volumes: [{{name: out, hostPath: {{path: {}}}}}]\n",
        out.path().display()
    ))).await?;
    wait_pod(&pods, "hooks", "Running", Duration::from_secs(60), |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await
    .with_context(|| node.log())?;
    support::wait_for("postStart's file read by the container", Duration::from_secs(20), || async {
        Ok(std::fs::read_to_string(out.path().join("started")).ok().filter(|s| s == "from-post-start\n"))
    })
    .await?;
    pods.delete("hooks", &Default::default()).await?;
    support::wait_for("the pod to go", Duration::from_secs(30), || async {
        Ok(pods.get_opt("hooks").await?.is_none().then_some(()))
    })
    .await?;
    let seen = std::fs::read_to_string(out.path().join("seen")).unwrap_or_default();
    ensure!(seen == "from-pre-stop\n", "the TERM trap saw {seen:?}");
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: badhook}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    command: [sleep, '3600']\n    lifecycle: {{postStart: {{exec: {{command: ['false']}}}}}}\n"
    ))).await?;
    wait_pod(&pods, "badhook", "restarted", Duration::from_secs(60), |p| restarts(p) >= 1).await?;
    let events = events_for(&client, "badhook").await?;
    ensure!(events.iter().any(|(r, m)| r == "FailedPostStartHook" && m == "PostStartHook failed"), "{events:?}");
    node_running(&node)
}

fn node_running(node: &Nodelet) -> Result<()> {
    ensure!(node.log().contains("nodelet is running"), "{}", node.log());
    Ok(())
}
