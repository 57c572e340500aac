//! Stats and metrics end to end, on nodelet as the only node of a real control plane with a real metrics-server:
//! `/stats/summary` through the API server's node proxy checked against workloads that do known things (a pod
//! burning a core, one holding 64 MiB in tmpfs and writing 10 MiB to an emptyDir, one thrashing its page cache
//! under a small memory limit so that it stalls); `/metrics`, `/metrics/resource` and `/metrics/cadvisor`
//! parsed and linted by Prometheus' own parser; the authorization of each path (401, 403 with upstream's
//! subresource, a user allowed `nodes/metrics` only); `/healthz/syncloop`, `/configz`, `/spec`, `/runningpods`;
//! an OOM-killed pod's record (`/debug/oom`, the JSONL file, `nodelet oom`, the `OOMKilling` event) and how long
//! nodelet took to hear of the kill; and `kubectl top node` / `kubectl top pod` showing nodelet's figures.

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, monitoring_bin, ready};
use serde_json::Value;
use support::{HostAddress, pod, wait_for, wait_pod};

const NODE: &str = "nodelet-stats";
const MIB: u64 = 1 << 20;

/// `kubectl get --raw` of a path of the node's kubelet API, through the API server's `nodes/proxy`.
fn raw(cluster: &Cluster, path: &str) -> Result<String> {
    let out = cluster.kubectl().args(["get", "--raw", &format!("/api/v1/nodes/{NODE}/proxy{path}")]).output()?;
    ensure!(out.status.success(), "{path}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// Prometheus' parser and linter over `text`: its report, or an error with the complaint.
fn promcheck(text: &str) -> Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new(monitoring_bin("promcheck")?)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "promcheck: {}{}", String::from_utf8_lossy(&out.stderr), report);
    Ok(report)
}

fn pod_stats<'a>(summary: &'a Value, name: &str) -> Option<&'a Value> {
    summary["pods"].as_array()?.iter().find(|p| p["podRef"]["name"] == name)
}

fn u64_at(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

/// The HTTP status of a direct request to the kubelet API, with client certificate `cert` (none: anonymous).
fn status_of(url: &str, cert: Option<&nodelet_integration::certs::CertFiles>) -> Result<String> {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"]);
    if let Some(c) = cert {
        cmd.arg("--cert").arg(&c.cert).arg("--key").arg(&c.key);
    }
    Ok(String::from_utf8(cmd.arg(url).output()?.stdout)?)
}

#[tokio::test]
async fn summary_metrics_and_kubectl_top() -> Result<()> {
    if !ready("summary_metrics_and_kubectl_top", &[Need::Root, Need::ControlPlane, Need::Registry, Need::Monitoring]) {
        return Ok(());
    }
    let address = HostAddress::create("stats", 251)?;
    let mut cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let image = registry.reference("busybox", "latest");
    let (node, _net_d) = support::start_cluster_node_at(
        &cluster,
        &registry,
        NODE,
        &address.ip,
        &format!("nodeStatusUpdateFrequency: 2s\naddress: {}\nvolumeStatsAggPeriod: 1s\n", address.ip),
        &["--housekeeping-interval".into(), "1s".into()],
    )?;
    let client = cluster.admin().await?;
    support::wait_node_ready(&client, NODE).await.with_context(|| node.log())?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let spec = |name: &str, body: &str| {
        pod(&format!("metadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 0\n{body}"))
    };
    pods.create(
        &PostParams::default(),
        &spec(
            "burner",
            &format!(
                "  containers:\n  - name: burn\n    image: {image}\n    command: [sh, -c, 'while :; do :; done']\n"
            ),
        ),
    )
    .await?;
    pods.create(&PostParams::default(), &spec("holder", &format!(
        "  containers:\n  - name: hold\n    image: {image}\n    command: [sh, -c, 'dd if=/dev/zero of=/data/file bs=1M count=10; dd if=/dev/zero of=/shm/held bs=1M count=64; sleep 3600']\n    resources: {{limits: {{memory: 256Mi}}}}\n    volumeMounts: [{{name: data, mountPath: /data}}, {{name: shm, mountPath: /shm}}]\n  volumes:\n  - {{name: data, emptyDir: {{}}}}\n  - {{name: shm, emptyDir: {{medium: Memory}}}}\n"
    ))).await?;
    pods.create(&PostParams::default(), &spec("stalled", &format!(
        "  containers:\n  - name: thrash\n    image: {image}\n    command: [sh, -c, 'dd if=/dev/zero of=/data/big bs=1M count=96; while :; do cat /data/big > /dev/null; done']\n    resources: {{limits: {{memory: 40Mi}}}}\n    volumeMounts: [{{name: data, mountPath: /data}}]\n  volumes:\n  - {{name: data, emptyDir: {{}}}}\n"
    ))).await?;
    // Killed by the kernel's OOM killer at once: nodelet times how long it took to hear of it.
    pods.create(&PostParams::default(), &spec("oom", &format!(
        "  restartPolicy: Never\n  containers:\n  - name: grow\n    image: {image}\n    command: [tail, /dev/zero]\n    resources: {{limits: {{memory: 24Mi}}}}\n"
    ))).await?;
    for name in ["burner", "holder", "stalled"] {
        wait_pod(&pods, name, "Running", Duration::from_secs(60), |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .await
        .with_context(|| node.log())?;
    }

    // The summary, through the API server's node proxy (the node's address is not loopback).
    let last = std::sync::Mutex::new(String::new());
    let summary: Value = wait_for("the summary to show the workloads", Duration::from_secs(60), || async {
        let summary: Value = serde_json::from_str(&raw(&cluster, "/stats/summary")?)?;
        // A rate needs two samples: the container's cgroup may be sampled a round after the pod's.
        let burning = pod_stats(&summary, "burner").is_some_and(|p| u64_at(p, "/containers/0/cpu/usageNanoCores") > 0);
        // The volumes are walked at most every volumeStatsAggPeriod (1 s), apart from the cgroup reads: wait for a
        // walk after the writes too.
        let holding = pod_stats(&summary, "holder").is_some_and(|p| {
            let shm = p["volume"].as_array().into_iter().flatten().find(|v| v["name"] == "shm");
            u64_at(p, "/containers/0/memory/workingSetBytes") >= 64 * MIB
                && shm.is_some_and(|v| u64_at(v, "/usedBytes") >= 64 * MIB)
        });
        let stalled = pod_stats(&summary, "stalled").is_some_and(|p| u64_at(p, "/memory/psi/some/total") > 0);
        *last.lock().unwrap_or_else(|e| e.into_inner()) = format!(
            "burning {burning}, holding {holding}, stalled {stalled}; stalled pod: {}",
            pod_stats(&summary, "stalled").map(Value::to_string).unwrap_or_default()
        );
        Ok((burning && holding && stalled).then_some(summary))
    })
    .await
    .with_context(|| last.lock().unwrap_or_else(|e| e.into_inner()).clone())?;
    let text = serde_json::to_string_pretty(&summary)?;
    let burner = pod_stats(&summary, "burner").context("burner")?;
    let cores = u64_at(burner, "/cpu/usageNanoCores");
    // One busy loop on a 2-core machine that other tests share: about one core, allowing for contention.
    ensure!((400_000_000..=1_150_000_000).contains(&cores), "burner at {cores} nanocores\n{text}");
    let container_cores = u64_at(burner, "/containers/0/cpu/usageNanoCores");
    ensure!(container_cores > 300_000_000, "burner's container at {container_cores} nanocores\n{text}");
    let holder = pod_stats(&summary, "holder").context("holder")?;
    let held = u64_at(holder, "/containers/0/memory/workingSetBytes");
    ensure!((64 * MIB..=96 * MIB).contains(&held), "holder's working set {held}\n{text}");
    let volumes = holder["volume"].as_array().context("volumes")?;
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).cloned().unwrap_or_default();
    ensure!(u64_at(&volume("data"), "/usedBytes") >= 10 * MIB, "data volume\n{text}");
    ensure!(u64_at(&volume("shm"), "/usedBytes") >= 64 * MIB, "shm volume\n{text}");
    ensure!(u64_at(&volume("data"), "/capacityBytes") > 0 && u64_at(&volume("data"), "/inodesUsed") >= 2, "{text}");
    // Ephemeral storage counts the disk-backed emptyDir, not the tmpfs one.
    let ephemeral = u64_at(holder, "/ephemeral-storage/usedBytes");
    ensure!((10 * MIB..64 * MIB).contains(&ephemeral), "ephemeral storage {ephemeral}\n{text}");
    ensure!(u64_at(holder, "/process_stats/process_count") >= 1, "{text}");
    let node_stats = &summary["node"];
    ensure!(node_stats["nodeName"] == NODE, "{text}");
    for pointer in [
        "/cpu/usageCoreNanoSeconds",
        "/memory/workingSetBytes",
        "/memory/availableBytes",
        "/fs/capacityBytes",
        "/runtime/imageFs/usedBytes",
        "/rlimit/maxpid",
    ] {
        ensure!(u64_at(node_stats, pointer) > 0, "node {pointer}\n{text}");
    }
    let system: Vec<&str> =
        node_stats["systemContainers"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()).collect();
    // The agent's own cgroup (`kubelet`, and `runtime`: the same) is measured where it is visible; in the test
    // bed's cgroup sandbox the agent's v1 memory cgroup is outside the mounted tree, so only `pods` may show.
    ensure!(system == ["kubelet", "runtime", "pods"] || system == ["pods"], "system containers {system:?}\n{text}");
    // Under a 256 MiB limit: available = limit - working set.
    let available = u64_at(holder, "/containers/0/memory/availableBytes");
    ensure!(available + held == 256 * MIB, "holder's available {available}\n{text}");
    let only: Value = serde_json::from_str(&raw(&cluster, "/stats/summary?only_cpu_and_memory=true")?)?;
    let holder_only = pod_stats(&only, "holder").context("holder in the small summary")?;
    ensure!(holder_only.get("volume").is_none() && holder_only["memory"]["workingSetBytes"].is_u64(), "{only}");

    // Prometheus endpoints: valid for Prometheus' own parser, with the series metrics-server and dashboards use.
    let resource = raw(&cluster, "/metrics/resource")?;
    eprintln!("/metrics/resource: {}", promcheck(&resource).context("/metrics/resource")?);
    for series in [
        "node_cpu_usage_seconds_total",
        "pod_memory_working_set_bytes{namespace=\"default\",pod=\"holder\"}",
        "container_cpu_usage_seconds_total{container=\"burn\"",
        "resource_scrape_error 0",
    ] {
        ensure!(resource.contains(series), "{series} in /metrics/resource:\n{resource}");
    }
    let cadvisor = raw(&cluster, "/metrics/cadvisor")?;
    eprintln!("/metrics/cadvisor: {}", promcheck(&cadvisor).context("/metrics/cadvisor")?);
    for series in [
        "container_memory_working_set_bytes{container=\"hold\"",
        "container_pressure_memory_waiting_seconds_total",
        "container_oom_events_total",
        "container_cpu_usage_seconds_total{container=\"\",cpu=\"total\",id=\"/\"",
    ] {
        ensure!(cadvisor.contains(series), "{series} in /metrics/cadvisor");
    }
    wait_pod(&pods, "oom", "OOMKilled", Duration::from_secs(60), |p| {
        let statuses = p.status.as_ref().and_then(|s| s.container_statuses.as_ref());
        let terminated = statuses.and_then(|s| s.first()?.state.as_ref()?.terminated.as_ref());
        terminated.is_some_and(|t| t.reason.as_deref() == Some("OOMKilled"))
    })
    .await?;
    // The OOM research view: the record at /debug/oom, in the JSONL file and in `nodelet oom`, and the event.
    let records: Value = wait_for("the OOM record", Duration::from_secs(30), || async {
        let records: Value = serde_json::from_str(&raw(&cluster, "/debug/oom?pod=default/oom")?)?;
        Ok(records.as_array().is_some_and(|r| r.len() == 1).then_some(records))
    })
    .await?;
    let record = &records[0];
    ensure!(record["container"] == "grow" && record["qosClass"] == "Burstable", "{record}");
    ensure!(record["process"]["name"] == "tail" && record["latencyMs"].is_f64(), "{record}");
    ensure!(u64_at(record, "/cgroup/memory_limit_bytes") == 24 * MIB, "{record}");
    // The cgroup reached its limit (the kernel rounds the peak to pages).
    ensure!(u64_at(record, "/cgroup/memory_peak_bytes") >= 20 * MIB, "{record}");
    ensure!(record["cgroup"]["memory_stat"].as_object().is_some_and(|m| !m.is_empty()), "{record}");
    ensure!(record["cgroup"]["pressure"]["some"]["total_us"].is_u64(), "{record}");
    // The node's memory in the seconds before, as the memory watch sampled it.
    ensure!(
        record["memorySamples"].as_array().is_some_and(|s| !s.is_empty() && s[0]["memoryAvailableBytes"].is_u64()),
        "{record}"
    );
    let jsonl = std::fs::read_to_string(node.root_dir().join("oom/kills.jsonl"))?;
    ensure!(jsonl.lines().count() == 1 && jsonl.contains("\"pod\":\"oom\""), "{jsonl}");
    let listed = support::nodelet_cli(&["oom", "--root-dir", &node.root_dir().display().to_string(), "--pod", "oom"])?;
    ensure!(
        listed.lines().nth(1).is_some_and(|l| l.contains(" oom ") && l.contains("(tail)") && l.contains("24Mi")),
        "{listed}"
    );
    let events = support::events_for(&client, "oom").await?;
    let killing = events.iter().find(|(reason, _)| reason == "OOMKilling");
    ensure!(
        killing
            .is_some_and(|(_, m)| m.contains("Killed process") && m.contains("(tail) in container grow, limit 24.0Mi")),
        "{events:?}"
    );
    let metrics = wait_for("the OOM kill's latency in /metrics", Duration::from_secs(30), || async {
        let text = raw(&cluster, "/metrics")?;
        Ok(text.contains("nodelet_oom_event_latency_seconds_count 1").then_some(text))
    })
    .await?;
    eprintln!("/metrics: {}", promcheck(&metrics).context("/metrics")?);
    let oom_latency = metrics.lines().find_map(|l| l.strip_prefix("nodelet_oom_event_latency_seconds_sum "));
    eprintln!("OOM kill to the pod worker: {}s", oom_latency.unwrap_or("?"));
    let sli = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kubelet_pod_start_sli_duration_seconds_count ")?.parse::<u64>().ok());
    ensure!(sli.is_some_and(|n| n >= 3), "pod start SLI count {sli:?}");
    for series in [
        "kubelet_running_pods 3",
        "kubelet_running_containers{container_state=\"running\"} 3",
        "kubelet_runtime_operations_total{operation_type=\"start_container\"}",
        "kubelet_http_requests_total{long_running=\"false\",method=\"GET\",path=\"stats\"",
        "process_resident_memory_bytes",
    ] {
        ensure!(metrics.contains(series), "{series} in /metrics:\n{metrics}");
    }

    // The other read-only endpoints.
    ensure!(raw(&cluster, "/healthz/syncloop")?.trim() == "ok" && raw(&cluster, "/healthz")?.trim() == "ok");
    let configz: Value = serde_json::from_str(&raw(&cluster, "/configz")?)?;
    ensure!(configz["kubeletconfig"]["volumeStatsAggPeriod"] == "1s", "{configz}");
    let machine: Value = serde_json::from_str(&raw(&cluster, "/spec/")?)?;
    ensure!(u64_at(&machine, "/num_cores") >= 1 && u64_at(&machine, "/memory_capacity") > 0, "{machine}");
    let running: Value = serde_json::from_str(&raw(&cluster, "/runningpods/")?)?;
    ensure!(running["items"].as_array().is_some_and(|i| i.len() == 3), "{running}");

    // Authorization as upstream maps paths: no identity is 401; a user without rights is refused with the
    // subresource named; one allowed `nodes/metrics` only reads metrics, not stats.
    let port = node.port().context("the kubelet API's port")?;
    let url = |path: &str| format!("https://{}:{port}{path}", address.ip);
    ensure!(status_of(&url("/stats/summary"), None)? == "401");
    let nobody = cluster.pki().client("nobody", "nobody", &[])?;
    ensure!(status_of(&url("/stats/summary"), Some(&nobody))? == "403");
    let reader = cluster.pki().client("metrics-reader", "metrics-reader", &[])?;
    let rbac = cluster.dir().join("metrics-reader.yaml");
    std::fs::write(
        &rbac,
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: node-metrics}\nrules: [{apiGroups: [''], resources: [nodes/metrics], verbs: [get]}]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: node-metrics}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: node-metrics}\nsubjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: metrics-reader}]\n",
    )?;
    let out = cluster.kubectl().args(["apply", "-f"]).arg(&rbac).output()?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("metrics-reader to read /metrics/resource", Duration::from_secs(30), || async {
        Ok((status_of(&url("/metrics/resource"), Some(&reader))? == "200").then_some(()))
    })
    .await?;
    ensure!(status_of(&url("/stats/summary"), Some(&reader))? == "403", "nodes/metrics does not allow stats");
    ensure!(status_of(&url("/configz"), Some(&reader))? == "403", "nor configz");

    // kubectl top, through metrics-server (it needs two scrapes a resolution apart).
    cluster.start_metrics_server(&address.ip, Duration::from_secs(10)).await?;
    let top = wait_for("kubectl top pod", Duration::from_secs(90), || async {
        let out = cluster.kubectl().args(["top", "pod", "--no-headers"]).output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((out.status.success() && text.contains("burner") && text.contains("holder")).then_some(text))
    })
    .await?;
    let row = |name: &str| -> Result<(u64, u64)> {
        let line = top.lines().find(|l| l.starts_with(name)).with_context(|| format!("{name} in {top}"))?;
        let cells: Vec<&str> = line.split_whitespace().collect();
        let cpu = cells.get(1).and_then(|c| c.strip_suffix('m')).and_then(|c| c.parse().ok()).context("cpu")?;
        let memory = cells.get(2).and_then(|c| c.strip_suffix("Mi")).and_then(|c| c.parse().ok()).context("memory")?;
        Ok((cpu, memory))
    };
    eprintln!("kubectl top pod:\n{top}");
    let (cpu, _) = row("burner")?;
    ensure!((400..=1150).contains(&cpu), "kubectl top: burner at {cpu}m\n{top}");
    let (_, memory) = row("holder")?;
    ensure!((64..=96).contains(&memory), "kubectl top: holder at {memory}Mi\n{top}");
    let out = cluster.kubectl().args(["top", "node", "--no-headers"]).output()?;
    let nodes = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success() && nodes.starts_with(NODE), "kubectl top node: {nodes}");

    // An OOM kill of a process other than the container's init (cgroup v1 kills one process, no group): the
    // container keeps running, and the kill is recorded all the same (upstream reports nothing).
    let survivor = support::pod(&format!(
        "metadata: {{name: survivor}}\nspec:\n  nodeName: {NODE}\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'dd if=/dev/zero bs=64M count=1 | sleep 1; sleep 3600']\n    resources: {{limits: {{memory: 24Mi}}}}\n"
    ));
    pods.create(&PostParams::default(), &survivor).await?;
    let record: Value = wait_for("the survivor's OOM record", Duration::from_secs(60), || async {
        let records: Value = serde_json::from_str(&raw(&cluster, "/debug/oom?pod=default/survivor")?)?;
        Ok(records.as_array().and_then(|r| r.first().cloned()))
    })
    .await
    .with_context(|| node.log())?;
    ensure!(record["containerKeptRunning"] == true && record["process"]["name"] == "dd", "{record}");
    let events = support::events_for(&client, "survivor").await?;
    ensure!(
        events
            .iter()
            .any(|(reason, m)| reason == "OOMKilling"
                && m.contains("(dd) in container main (the container kept running)")),
        "{events:?}"
    );
    let p = pods.get("survivor").await?;
    let status = p.status.unwrap_or_default();
    let main = status.container_statuses.iter().flatten().next().context("survivor's status")?;
    ensure!(
        status.phase.as_deref() == Some("Running")
            && main.restart_count == 0
            && main.state.as_ref().is_some_and(|s| s.running.is_some()),
        "{main:?}"
    );
    Ok(())
}
