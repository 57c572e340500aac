//! Eviction on a pressure stall (PSI), nodelet's own beyond upstream, end to end on nodelet as the only node of a
//! real control plane: with `--eviction-pressure-stall cpu.pressure.some=500ms/1s`, a pod running more busy loops
//! than the host has cores makes the pods' tasks wait for CPU; the kernel's trigger on the pods' cgroup fires and
//! the eviction manager evicts that pod at once (not at its next housekeeping round), while a quiet pod keeps
//! running. CPU is the stall a test can cause on any host; memory stalls use the same trigger and path. The node
//! reports nodelet's `PSIPressure` condition: False, then True once the trigger fired.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{events_for, pod, pressure, wait_for, wait_pod};

const NODE: &str = "nodelet-stall";

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

#[tokio::test]
async fn a_pressure_stall_evicts_the_pod_causing_it() -> Result<()> {
    if !ready("a_pressure_stall_evicts_the_pod_causing_it", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let image = registry.reference("busybox", "latest");
    // Stall signals are only acted on when the kernel's trigger fires (the housekeeping rounds never look at
    // them); housekeeping every second keeps the pods' CPU usage, which ranks them, fresh.
    let extra: Vec<String> =
        ["--eviction-pressure-stall", "cpu.pressure.some=500ms/1s", "--housekeeping-interval", "1s"]
            .map(String::from)
            .into();
    let (node, _net_d) = support::start_cluster_node(&cluster, &registry, NODE, "address: 127.0.0.1\n", &extra)?;
    let client = cluster.admin().await?;
    support::wait_node_ready(&client, NODE).await.with_context(|| node.log())?;
    // (`PSIPressure` has no taint: the name of one that does not exist.)
    let psi = || pressure(&client, NODE, "PSIPressure", "-");
    ensure!(psi().await?.0 == Some(false), "PSIPressure False before any stall");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let create = |name: &str, script: &str, resources: &str| {
        pod(&format!(
            "metadata: {{name: {name}}}\nspec:\n  nodeName: {NODE}\n  terminationGracePeriodSeconds: 30\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, '{script}']\n{resources}"
        ))
    };
    // The quiet pod stays within what it requested: never taken for the cause of a stall.
    let within = "    resources: {requests: {cpu: 100m}}\n";
    pods.create(&PostParams::default(), &create("quiet", "sleep 3600", within)).await?;
    wait_pod(&pods, "quiet", "Running", Duration::from_secs(60), |p| phase(p) == "Running")
        .await
        .with_context(|| node.log())?;
    let loops = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let spin = format!("for i in $(seq {loops}); do (while :; do :; done) & done; wait");
    pods.create(&PostParams::default(), &create("spinner", &spin, "")).await?;
    let running = wait_pod(&pods, "spinner", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    let started = Instant::now();
    let evicted = wait_pod(&pods, "spinner", "evicted", Duration::from_secs(30), |p| phase(p) == "Failed")
        .await
        .with_context(|| node.log())?;
    let took = started.elapsed();
    let status = evicted.status.unwrap_or_default();
    ensure!(status.reason.as_deref() == Some("Evicted"), "{status:?}");
    let message = status.message.unwrap_or_default();
    ensure!(
        message
            .starts_with("The node was low on resource: cpu. Pressure stall cpu.pressure.some exceeded 500ms in 1s. "),
        "{message}"
    );
    ensure!(status.conditions.iter().flatten().any(|c| c.type_ == "DisruptionTarget"), "DisruptionTarget");
    let events = events_for(&client, "spinner").await?;
    ensure!(events.iter().any(|(reason, m)| reason == "Evicted" && *m == message), "{events:?}");
    let quiet = pods.get("quiet").await?;
    ensure!(phase(&quiet) == "Running", "the quiet pod was evicted too: {:?}\n{}", quiet.status, node.log());
    eprintln!("pressure_stall: evicted {took:?} after the spinner was seen Running ({:?})", running.metadata.name);
    ensure!(took < Duration::from_secs(20), "took {took:?}");
    wait_for("PSIPressure True", Duration::from_secs(30), || async {
        Ok((psi().await?.0 == Some(true)).then_some(()))
    })
    .await?;
    Ok(())
}
