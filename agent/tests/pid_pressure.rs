//! PID pressure end to end, on nodelet as the only node of a real control plane: a pod with no pids limit forks
//! processes until the node's tasks come within `pid.available` of the kernel's limit (the threshold is set a few
//! hundred tasks above what the machine runs when the test starts); the node reports `PIDPressure`, the control
//! plane taints it `node.kubernetes.io/pid-pressure`, the eviction manager evicts the forker (upstream's ranking
//! for pids: priority, then process count) with upstream's status, message, condition and event while a quiet pod
//! keeps running, and the condition and taint clear after the transition period.
//!
//! The forker stops at a bound: a true fork bomb would take the shared CI machine's PIDs along with the node's.
//! In its own test binary, so no other test's processes move the count.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{pod, pressure, wait_for, wait_pod};

const NODE: &str = "nodelet-pids";
const TAINT: &str = "node.kubernetes.io/pid-pressure";
/// How many tasks above the machine's count at the start the threshold is met.
const MARGIN: u64 = 300;
/// How many processes the forker makes at most (four times the margin).
const FORKS: u64 = 1200;

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

/// The kernel's task limit and the tasks running (upstream's `pid.available` reading).
fn tasks() -> Result<(u64, u64)> {
    let read = |f: &str| -> Result<u64> { Ok(std::fs::read_to_string(f)?.trim().parse()?) };
    let limit = read("/proc/sys/kernel/pid_max")?.min(read("/proc/sys/kernel/threads-max")?);
    let loadavg = std::fs::read_to_string("/proc/loadavg")?;
    let running = loadavg.split_whitespace().nth(3).and_then(|f| f.split_once('/')).context("loadavg")?.1.parse()?;
    Ok((limit, running))
}

#[tokio::test]
async fn a_forking_pod_is_evicted_under_pid_pressure() -> Result<()> {
    if !ready("a_forking_pod_is_evicted_under_pid_pressure", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let image = registry.reference("busybox", "latest");
    // Met 2 × MARGIN tasks above what runs now. The node and its pods add their threads after this reading: the
    // test checks below that they stayed within MARGIN of it before the forker starts.
    let (limit, before) = tasks()?;
    let threshold = limit.saturating_sub(before + 2 * MARGIN);
    let (node, _net_d) = {
        let config = format!(
            "address: 127.0.0.1\nnodeStatusUpdateFrequency: 1s\nevictionPressureTransitionPeriod: 10s\n\
             evictionHard: {{pid.available: \"{threshold}\", memory.available: 100Mi, nodefs.available: 2Gi}}\n"
        );
        let extra = ["--housekeeping-interval".to_string(), "1s".into()];
        support::start_cluster_node(&cluster, &registry, NODE, &config, &extra)?
    };
    let client = cluster.admin().await?;
    support::wait_node_ready(&client, NODE).await.with_context(|| node.log())?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let plain = |name: &str, script: &str| {
        pod(&format!(
            "metadata: {{name: {name}}}\nspec:\n  nodeName: {NODE}\n  terminationGracePeriodSeconds: 30\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, '{script}']\n"
        ))
    };
    pods.create(&PostParams::default(), &plain("quiet", "sleep 3600")).await?;
    wait_pod(&pods, "quiet", "Running", Duration::from_secs(60), |p| phase(p) == "Running")
        .await
        .with_context(|| node.log())?;
    let (_, running) = tasks()?;
    ensure!(
        running < before + MARGIN,
        "the machine's tasks grew from {before} to {running} before the forker started: too close to the threshold"
    );
    ensure!(pressure(&client, NODE, "PIDPressure", TAINT).await? == (Some(false), false), "pressure before the forker");

    let forker =
        plain("forker", &format!("i=0; while [ $i -lt {FORKS} ]; do sleep 3600 & i=$((i+1)); done; echo forked; wait"));
    pods.create(&PostParams::default(), &forker).await?;
    let evicted = wait_pod(&pods, "forker", "evicted", Duration::from_secs(90), |p| phase(p) == "Failed")
        .await
        .with_context(|| node.log())?;
    let prefix = format!("The node was low on resource: pids. Threshold quantity: {threshold}, available: ");
    support::ensure_evicted(&client, &evicted, &prefix).await?;
    ensure!(phase(&pods.get("quiet").await?) == "Running", "the quiet pod was evicted too\n{}", node.log());

    // The condition, and the control plane's taint from it; both clear once the forker's processes are gone and
    // the transition period has passed.
    wait_for("PIDPressure and its taint", Duration::from_secs(30), || async {
        Ok((pressure(&client, NODE, "PIDPressure", TAINT).await? == (Some(true), true)).then_some(()))
    })
    .await?;
    wait_for("PIDPressure and its taint cleared", Duration::from_secs(90), || async {
        Ok((pressure(&client, NODE, "PIDPressure", TAINT).await? == (Some(false), false)).then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    let (_, after) = tasks()?;
    ensure!(after < running + MARGIN, "the forker's processes are gone: {after} tasks, {running} before it");
    ensure!(phase(&pods.get("quiet").await?) == "Running");
    Ok(())
}
