//! Memory eviction end to end, on nodelet as the only node of a real control plane whose pods get 640 MiB (the rest
//! of the machine is `systemReserved`; `enforceNodeAllocatable: [pods]`, upstream's default, limits the pods'
//! cgroup to that): a BestEffort pod growing its memory at ~160 MiB/s takes `allocatableMemory.available` below
//! the hard threshold (100Mi, added for it as upstream adds it); the memory watch wakes the eviction manager
//! between its 10 s rounds, and the pod is evicted with upstream's status, message, condition and event, its
//! SIGTERM before the pods' cgroup reaches its limit (the kernel's OOM killer never acts), while a Guaranteed pod
//! keeps running; the node reports its allocatable and `MemoryPressure`.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::memory::{OomWatch, kubepods, memory_limit, pods_memory_config, ramp_pod, uptime_mark};
use support::{pod, pressure, wait_for, wait_pod};

const NODE: &str = "nodelet-memory";
const PODS_MIB: u64 = 640;

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

#[tokio::test]
async fn a_pod_growing_past_allocatable_is_evicted_before_the_oom_killer() -> Result<()> {
    if !ready(
        "a_pod_growing_past_allocatable_is_evicted_before_the_oom_killer",
        &[Need::Root, Need::ControlPlane, Need::Registry],
    ) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let image = registry.reference("busybox", "latest");
    let config = format!("{}evictionPressureTransitionPeriod: 10s\n", pods_memory_config(PODS_MIB, 100));
    // The default rounds (10 s): an eviction within a few seconds of the pod's start is the memory watch's.
    let (node, _net_d) = support::start_cluster_node(&cluster, &registry, NODE, &config, &[])?;
    let client = cluster.admin().await?;
    support::wait_node_ready(&client, NODE).await.with_context(|| node.log())?;

    // Upstream's allocatable: capacity less the reservations and the hard threshold; the pods' cgroup limited to
    // capacity less the reservations.
    let nodes: Api<Node> = Api::all(client.clone());
    let status = nodes.get(NODE).await?.status.unwrap_or_default();
    let allocatable = status.allocatable.unwrap_or_default().get("memory").map(|q| q.0.clone()).unwrap_or_default();
    // (The API server writes the quantity in its canonical form.)
    let expected = [format!("{}Mi", PODS_MIB - 100), format!("{}Ki", (PODS_MIB - 100) << 10)];
    ensure!(expected.contains(&allocatable), "allocatable memory {allocatable}");
    let cgroup = kubepods(node.pid().context("the agent's pid")?);
    ensure!(memory_limit(&cgroup) == Some(PODS_MIB << 20), "kubepods limit {:?}", memory_limit(&cgroup));
    let ooms = OomWatch::start(&cgroup);

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let quiet = pod(&format!(
        "metadata: {{name: quiet}}\nspec:\n  nodeName: {NODE}\n  containers:\n  - name: main\n    image: {image}\n    command: [sleep, '3600']\n    resources: {{limits: {{cpu: 100m, memory: 16Mi}}}}\n"
    ));
    pods.create(&PostParams::default(), &quiet).await?;
    wait_pod(&pods, "quiet", "Running", Duration::from_secs(60), |p| phase(p) == "Running")
        .await
        .with_context(|| node.log())?;

    let out = tempfile::Builder::new().prefix("nodelet-memory-").tempdir()?;
    pods.create(&PostParams::default(), &ramp_pod("hog", NODE, &image, 16, 100, out.path())).await?;
    let evicted = wait_pod(&pods, "hog", "evicted", Duration::from_secs(60), |p| phase(p) == "Failed")
        .await
        .with_context(|| node.log())?;
    let prefix = "The node was low on resource: memory. Threshold quantity: 100Mi, available: ";
    let message = support::ensure_evicted(&client, &evicted, prefix).await?;
    ensure!(
        message.contains("Container main was using ")
            && message.ends_with("request is 0, has larger consumption of memory. "),
        "{message}"
    );

    // SIGTERM reached the pod, within seconds of its start: the watch, not a 10 s round (which needs two).
    let (start, term) = (uptime_mark(out.path(), "start"), uptime_mark(out.path(), "term"));
    let (Some(start), Some(term)) = (start, term) else {
        anyhow::bail!("the pod marked start {start:?} and SIGTERM {term:?}\n{}", node.log());
    };
    eprintln!("memory_eviction: SIGTERM {:.2} s after the ramp started", term - start);
    ensure!(term - start < 8.0, "SIGTERM {:.2} s after the ramp started", term - start);
    ensure!(ooms.kills() == 0, "the OOM killer acted first ({} kills)\n{}", ooms.kills(), node.log());
    ensure!(phase(&pods.get("quiet").await?) == "Running", "the Guaranteed pod was evicted too");

    // The condition, and the control plane's taint from it; both clear after the transition period.
    let taint = "node.kubernetes.io/memory-pressure";
    wait_for("MemoryPressure and its taint", Duration::from_secs(20), || async {
        Ok((pressure(&client, NODE, "MemoryPressure", taint).await? == (Some(true), true)).then_some(()))
    })
    .await?;
    wait_for("MemoryPressure and its taint cleared", Duration::from_secs(60), || async {
        Ok((pressure(&client, NODE, "MemoryPressure", taint).await? == (Some(false), false)).then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    Ok(())
}
