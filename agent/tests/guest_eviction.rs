//! Memory eviction and the OOM record on the production hosts' layout: nodelet runs inside the pure cgroup v2
//! QEMU guest (1 GiB of memory), joined to a real control plane on this host (`support::guest`). This hybrid
//! host has no v2 memory controller; the guest has nothing else.
//!
//! - In the PSI-driven configuration (the memory watch and `memory.pressure.some=100ms/1s`), a BestEffort pod
//!   grows its memory quickly next to a Burstable pod over its request and a Guaranteed pod. The node's
//!   `memory.available` (hard threshold 300Mi) is met, or the stall trigger fires, between the manager's 10 s
//!   rounds, and it evicts the BestEffort pod (upstream's ranking: usage above requests, then priority,
//!   then usage) with upstream's status, message, condition and event, while the other two keep running. The
//!   kernel's OOM killer never acts: `oom_kill` in the pods' cgroup's `memory.events` (v2 counts every pod
//!   below it) stays 0.
//! - The node reports `MemoryPressure`, the control plane taints it, and both clear after the transition period.
//! - A pod OOM-killed in its own limit produces nodelet's OOM record: the `OOMKilling` event, the entry at
//!   `/debug/oom` (through the API server's node proxy) and the line in `<root-dir>/oom/kills.jsonl`, with the
//!   cgroup's `memory.stat`, `memory.events`, peak and PSI, and the node's memory in the seconds before.

mod support;

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use serde_json::Value;
use support::guest::{GuestNode, IMAGE, local};
use support::memory::{ramp_pod, uptime_mark};
use support::{HostAddress, events_for, pod, pressure, wait_for, wait_pod};

const NODE: &str = "nodelet-guest";

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

fn holder(name: &str, resources: &str, hold_mib: u64) -> Pod {
    let script = if hold_mib == 0 {
        "sleep 3600".to_string()
    } else {
        format!("dd if=/dev/zero bs={hold_mib}M count=1 2>/dev/null | sleep 3600")
    };
    local(pod(&format!(
        "metadata: {{name: {name}}}\nspec:\n  nodeName: {NODE}\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {IMAGE}\n    command: [sh, -c, '{script}']\n    resources: {resources}\n"
    )))
}

#[tokio::test]
async fn memory_eviction_and_the_oom_record_in_the_cgroup_v2_guest() -> Result<()> {
    if !ready(
        "memory_eviction_and_the_oom_record_in_the_cgroup_v2_guest",
        &[Need::Root, Need::ControlPlane, Need::Registry, Need::Guest],
    ) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let work = tempfile::Builder::new().prefix("nodelet-guest-image-").tempdir()?;
    let layout = support::busybox_layout(&registry, work.path())?;
    let address = HostAddress::create("guest", 250)?;
    let port = nodelet_integration::ports::free_port()?;
    let config = "nodeStatusUpdateFrequency: 1s\nevictionPressureTransitionPeriod: 10s\n\
                  evictionHard: {memory.available: 300Mi, nodefs.available: 10%}\n";
    // The PSI-driven configuration: the memory watch (default) and a memory stall trigger on the pods' cgroup.
    let stall = ["--eviction-pressure-stall".to_string(), "memory.pressure.some=100ms/1s".into()];
    let node = GuestNode::start(&cluster, NODE, (&address.ip, port), 1024, &layout, config, &stall)?;
    let client = cluster.admin().await?;
    support::wait_node_ready(&client, NODE).await.with_context(|| node.log())?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    let steady = [
        holder("guaranteed", "{limits: {cpu: 100m, memory: 16Mi}}", 0),
        holder("burstable", "{requests: {memory: 16Mi}, limits: {memory: 128Mi}}", 48),
    ];
    for p in &steady {
        pods.create(&PostParams::default(), p).await?;
    }
    for name in ["guaranteed", "burstable"] {
        wait_pod(&pods, name, "Running", Duration::from_secs(120), |p| phase(p) == "Running")
            .await
            .with_context(|| node.log())?;
    }
    ensure!(
        node.kubepods_memory_events().get("oom_kill") == Some(&0),
        "the pods' cgroup's memory.events before the ramp: {:?}",
        node.kubepods_memory_events()
    );

    let out = node.shared();
    pods.create(&PostParams::default(), &local(ramp_pod("hog", NODE, IMAGE, 16, 100, &out))).await?;
    let evicted = wait_pod(&pods, "hog", "evicted", Duration::from_secs(180), |p| phase(p) == "Failed")
        .await
        .with_context(|| node.log())?;
    let seen = SystemTime::now();
    // The memory watch's threshold or the stall trigger, whichever acted first: upstream's words either way.
    let message = support::ensure_evicted(&client, &evicted, "The node was low on resource: memory. ").await?;
    let by = ["Threshold quantity: 300Mi, available: ", "Pressure stall memory.pressure.some exceeded 100ms in 1s. "]
        .into_iter()
        .find(|cause| message.contains(cause));
    ensure!(
        by.is_some()
            && message.contains("Container main was using ")
            && message.ends_with("request is 0, has larger consumption of memory. "),
        "{message}"
    );
    eprintln!("guest_eviction: evicted by {by:?}");
    let (start, term) = (uptime_mark(&out, "start"), uptime_mark(&out, "term"));
    let (Some(start), Some(term)) = (start, term) else {
        anyhow::bail!("the pod marked start {start:?} and SIGTERM {term:?}\n{}", node.log());
    };
    eprintln!("guest_eviction: SIGTERM {:.2} s after the ramp started", term - start);
    for name in ["guaranteed", "burstable"] {
        ensure!(phase(&pods.get(name).await?) == "Running", "{name} was evicted too\n{}", node.log());
    }
    // The copy of memory.events taken after the eviction was seen: no OOM kill in any pod.
    let memory_events = node.kubepods_memory_events_after(seen).await?;
    ensure!(memory_events.get("oom_kill") == Some(&0), "the OOM killer acted: {memory_events:?}\n{}", node.log());

    let taint = "node.kubernetes.io/memory-pressure";
    wait_for("MemoryPressure and its taint", Duration::from_secs(30), || async {
        Ok((pressure(&client, NODE, "MemoryPressure", taint).await? == (Some(true), true)).then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    wait_for("MemoryPressure and its taint cleared", Duration::from_secs(90), || async {
        Ok((pressure(&client, NODE, "MemoryPressure", taint).await? == (Some(false), false)).then_some(()))
    })
    .await
    .with_context(|| node.log())?;

    // An OOM kill in a pod's own limit: its record, three ways.
    let oom = local(pod(&format!(
        "metadata: {{name: oom}}\nspec:\n  nodeName: {NODE}\n  restartPolicy: Never\n  containers:\n  - name: grow\n    image: {IMAGE}\n    command: [sh, -c, 'sleep 2; dd if=/dev/zero bs=64M count=1 | sleep 3600']\n    resources: {{limits: {{memory: 24Mi}}}}\n"
    )));
    pods.create(&PostParams::default(), &oom).await?;
    wait_for("the OOMKilling event", Duration::from_secs(120), || async {
        let events = events_for(&client, "oom").await?;
        Ok(events.into_iter().find(|(reason, _)| reason == "OOMKilling"))
    })
    .await
    .with_context(|| node.log())?;
    let raw = cluster
        .kubectl()
        .args(["get", "--raw", &format!("/api/v1/nodes/{NODE}/proxy/debug/oom?pod=default/oom")])
        .output()?;
    ensure!(raw.status.success(), "/debug/oom: {}", String::from_utf8_lossy(&raw.stderr));
    let records: Value = serde_json::from_slice(&raw.stdout)?;
    let record = records.as_array().and_then(|r| r.first()).context("a record at /debug/oom")?;
    ensure!(record["container"] == "grow" && record["qosClass"] == "Burstable", "{record}");
    ensure!(record["cgroup"]["memory_stat"].as_object().is_some_and(|m| !m.is_empty()), "{record}");
    ensure!(record["cgroup"]["pressure"]["some"]["total_us"].is_u64(), "{record}");
    // v2's memory.peak: the cgroup reached its 24 MiB limit.
    ensure!(record["cgroup"]["memory_peak_bytes"].as_u64().is_some_and(|p| p >= 20 << 20), "{record}");
    ensure!(record["cgroup"]["oom_counters"]["oom_kill"].as_u64().is_some_and(|k| k >= 1), "{record}");
    // The memory watch's samples of the seconds before, each with the pods' stall (PSI is on in the guest).
    let samples = record["memorySamples"].as_array().context("memorySamples")?;
    ensure!(
        samples.len() >= 10 && samples.iter().all(|s| s["podsStallSomeUs"].is_u64() && s["msBefore"].is_u64()),
        "{record}"
    );
    eprintln!("guest_eviction: an OOM record from the cgroup v2 guest: {record}");
    wait_for("the record in kills.jsonl", Duration::from_secs(20), || async {
        let lines = node.oom_records();
        Ok(lines.lines().any(|l| l.contains("\"pod\":\"oom\"") && l.contains("\"memory_stat\"")).then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    Ok(())
}
