//! Eviction end to end, on nodelet as the only node of a real control plane, with its root dir on a small tmpfs:
//! pods past their emptyDir `sizeLimit` or their container's `ephemeral-storage` limit are evicted with
//! upstream's messages; then a pod filling its emptyDir takes the filesystem below `nodefs.available`; the node reports
//! `DiskPressure`, the eviction manager evicts the writer (upstream's ranking: the largest local storage user)
//! with upstream's status, condition and event while the quiet pod keeps running, a pod bound to the node under
//! pressure is refused at admission, and the condition clears after the transition period.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{pod, pressure, wait_for, wait_pod};

const NODE: &str = "nodelet-eviction";

/// A tmpfs of `size` mounted for the test's lifetime.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let status =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir).status()?;
        ensure!(status.success(), "mounting a tmpfs on {}", dir.display());
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // The node's own cleanup may have unmounted it already.
        let _ = Command::new("umount").arg("-l").arg(&self.0).stderr(std::process::Stdio::null()).status();
    }
}

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

async fn disk_pressure(nodes: &Api<Node>) -> Result<Option<bool>> {
    let node = nodes.get(NODE).await?;
    let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
    Ok(conditions.iter().find(|c| c.type_ == "DiskPressure").map(|c| c.status == "True"))
}

#[tokio::test]
async fn disk_pressure_evicts_the_largest_user_as_upstream() -> Result<()> {
    if !ready("disk_pressure_evicts_the_largest_user_as_upstream", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let image = registry.reference("busybox", "latest");
    let scratch = tempfile::Builder::new().prefix("nodelet-eviction-").tempdir()?;
    let tmpfs = Tmpfs::mount(&scratch.path().join("root"), "128m")?;
    let config = "address: 127.0.0.1\nnodeStatusUpdateFrequency: 1s\nvolumeStatsAggPeriod: 200ms\n\
        evictionHard: {nodefs.available: 48Mi, memory.available: 100Mi}\nevictionPressureTransitionPeriod: 15s\n";
    let extra = ["--housekeeping-interval".to_string(), "1s".into()];
    let (node, _net_d) =
        support::start_cluster_node_in(&cluster, &registry, NODE, ("127.0.0.1", Some(&tmpfs.0)), config, &extra)?;
    let client = cluster.admin().await?;
    support::wait_node_ready(&client, NODE).await.with_context(|| node.log())?;
    let nodes: Api<Node> = Api::all(client.clone());
    ensure!(disk_pressure(&nodes).await? == Some(false), "no pressure before the writer");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let plain = |name: &str, script: &str| {
        pod(&format!(
            "metadata: {{name: {name}}}\nspec:\n  nodeName: {NODE}\n  terminationGracePeriodSeconds: 30\n  volumes: [{{name: data, emptyDir: {{}}}}]\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, '{script}']\n    volumeMounts: [{{name: data, mountPath: /data}}]\n"
        ))
    };
    pods.create(&PostParams::default(), &plain("quiet", "sleep 3600")).await?;
    wait_pod(&pods, "quiet", "Running", Duration::from_secs(60), |p| phase(p) == "Running")
        .await
        .with_context(|| node.log())?;

    // Local storage limits, whatever the node's pressure (upstream's order: emptyDir, pod, container).
    let idle = format!(
        "  - name: idle\n    image: {image}\n    command: [sleep, '3600']\n    resources: {{limits: {{ephemeral-storage: 64Mi}}}}\n"
    );
    let limited = [
        (
            "sized",
            "  volumes: [{name: data, emptyDir: {sizeLimit: 8Mi}}]\n",
            "    volumeMounts: [{name: data, mountPath: /data}]\n".to_string(),
            "/data/fill",
            "Usage of EmptyDir volume \"data\" exceeds the limit \"8Mi\". ",
        ),
        (
            "whole",
            "",
            "    resources: {limits: {ephemeral-storage: 4Mi}}\n".to_string(),
            "/tmp/fill",
            "Pod ephemeral local storage usage exceeds the total limit of containers 4Mi. ",
        ),
        (
            "limited",
            "",
            format!("    resources: {{limits: {{ephemeral-storage: 4Mi}}}}\n{idle}"),
            "/tmp/fill",
            "Container main exceeded its local ephemeral storage limit \"4Mi\". ",
        ),
    ];
    for (name, volumes, container, file, _) in &limited {
        pods.create(&PostParams::default(), &pod(&format!(
            "metadata: {{name: {name}}}\nspec:\n  nodeName: {NODE}\n{volumes}  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'dd if=/dev/zero of={file} bs=1M count=16; sleep 3600']\n{container}"
        ))).await?;
    }
    for (name, _, _, _, message) in &limited {
        let p = wait_pod(&pods, name, "evicted", Duration::from_secs(60), |p| phase(p) == "Failed")
            .await
            .with_context(|| node.log())?;
        let status = p.status.unwrap_or_default();
        ensure!(
            status.reason.as_deref() == Some("Evicted") && status.message.as_deref() == Some(*message),
            "{name}: {status:?}"
        );
        ensure!(!status.conditions.iter().flatten().any(|c| c.type_ == "DisruptionTarget"), "{name}: no node pressure");
    }
    ensure!(disk_pressure(&nodes).await? == Some(false), "the limits were hit without node pressure");

    // A writer takes the node below nodefs.available: it is evicted with upstream's status, condition and event;
    // the quiet pod stays.
    let writer = plain("writer", "dd if=/dev/zero of=/data/fill bs=1M count=90; sleep 3600");
    pods.create(&PostParams::default(), &writer).await?;
    let evicted = wait_pod(&pods, "writer", "evicted", Duration::from_secs(60), |p| phase(p) == "Failed")
        .await
        .with_context(|| node.log())?;
    let prefix = "The node was low on resource: ephemeral-storage. Threshold quantity: 48Mi, available: ";
    support::ensure_evicted(&client, &evicted, prefix).await?;
    let quiet = pods.get("quiet").await?;
    ensure!(phase(&quiet) == "Running", "the quiet pod was evicted too: {:?}\n{}", quiet.status, node.log());

    // Under the condition, a pod bound to the node is refused (upstream's eviction admission).
    let taint = "node.kubernetes.io/disk-pressure";
    wait_for("DiskPressure", Duration::from_secs(10), || async {
        Ok((disk_pressure(&nodes).await? == Some(true)).then_some(()))
    })
    .await?;
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: late}}\nspec:\n  nodeName: {NODE}\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600']}}\n"
    ))).await?;
    let late = wait_pod(&pods, "late", "refused", Duration::from_secs(30), |p| phase(p) == "Failed").await?;
    let status = late.status.unwrap_or_default();
    ensure!(status.reason.as_deref() == Some("Evicted"), "{status:?}");
    ensure!(status.message.as_deref() == Some("The node had condition: [DiskPressure]. "), "{status:?}");

    // The writer's emptyDir went with it: the condition clears after the transition period.
    // The control plane tainted the node from the condition; the condition and the taint clear after the
    // transition period.
    wait_for("DiskPressure's taint", Duration::from_secs(30), || async {
        Ok(pressure(&client, NODE, "DiskPressure", taint).await?.1.then_some(()))
    })
    .await?;
    wait_for("DiskPressure and its taint to clear", Duration::from_secs(60), || async {
        Ok((pressure(&client, NODE, "DiskPressure", taint).await? == (Some(false), false)).then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    ensure!(phase(&pods.get("quiet").await?) == "Running");
    drop(node);
    drop(tmpfs);
    Ok(())
}
