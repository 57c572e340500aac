//! The pod worker's rules end to end, on nodelet as the only node of a real control plane (`--max-pods 3`,
//! `podPidsLimit: -1`): a Job of 5 completions (finished pods hold no admission slot), a native sidecar (started
//! before the app container, stopped after it, the pod Succeeded), `kubectl set image` on a bare pod (the container
//! restarted with the new image), a 70-character pod name (a 63-character hostname less the trailing `-`),
//! `activeDeadlineSeconds` (DeadlineExceeded), a pod for another OS (PodOSNotSupported), and hostile images whose
//! `/etc/passwd` is a symlink to `/dev/zero` or whose `/etc/group` is a FIFO (a clear CreateContainerError; the
//! agent neither hangs nor grows), a `RestartAllContainers` restart rule (every container restarted in place) and
//! pod-level resources (the pod cgroup's memory limit).

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use nodelet_integration::cluster::Cluster;
use nodelet_integration::layers::{Layer, push_image};
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{pod, wait_for, wait_pod};

const NODE: &str = "nodelet-lifecycle";

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

fn statuses(p: &Pod, init: bool) -> Vec<ContainerStatus> {
    let s = p.status.clone().unwrap_or_default();
    if init { s.init_container_statuses } else { s.container_statuses }.unwrap_or_default()
}

fn waiting(c: &ContainerStatus) -> Option<(String, String)> {
    let w = c.state.as_ref()?.waiting.as_ref()?;
    Some((w.reason.clone().unwrap_or_default(), w.message.clone().unwrap_or_default()))
}

#[tokio::test]
async fn pod_workers_follow_upstream_rules() -> Result<()> {
    if !ready("pod_workers_follow_upstream_rules", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let image = registry.reference("busybox", "latest");
    // Hostile images: /etc/passwd a symlink to /dev/zero (with a /dev/zero of its own), /etc/group a FIFO.
    let zero = Layer::new()
        .dir("etc", 0o755)
        .dir("dev", 0o755)
        .char_device("dev/zero", 1, 5)
        .symlink("etc/passwd", "/dev/zero");
    push_image(&registry, "hostile", "zero", &[zero.tar()]).await?;
    let fifo = Layer::new().dir("etc", 0o755).file("etc/passwd", b"root:x:0:0::/:/bin/sh\n", 0o644).fifo("etc/group");
    push_image(&registry, "hostile", "fifo", &[fifo.tar()]).await?;
    let (node, _net_d) = support::start_cluster_node(
        &cluster,
        &registry,
        NODE,
        "podPidsLimit: -1\nnodeStatusUpdateFrequency: 2s\naddress: 127.0.0.1\n",
        &["--max-pods".into(), "3".into()],
    )?;
    let client = cluster.admin().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let registered =
        wait_for("the node to register", Duration::from_secs(60), || async { Ok(nodes.get_opt(NODE).await?) })
            .await
            .with_context(|| node.log())?;
    // Allocatable is capacity less the default hard eviction threshold for memory (100Mi).
    let status = registered.status.clone().unwrap_or_default();
    let kib =
        |m: Option<&std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| {
            m.and_then(|m| m.get("memory")).and_then(|q| q.0.strip_suffix("Ki")?.parse::<u64>().ok()).unwrap_or(0)
        };
    let (capacity, allocatable) = (kib(status.capacity.as_ref()), kib(status.allocatable.as_ref()));
    ensure!(capacity > 0 && capacity - allocatable == 100 * 1024, "memory {capacity}Ki, allocatable {allocatable}Ki");
    // The Lease is owned by the Node.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let node_uid = registered.metadata.uid.clone();
    wait_for("the lease owned by the node", Duration::from_secs(30), || async {
        let lease = leases.get_opt(NODE).await?;
        let owners = lease.and_then(|l| l.metadata.owner_references).unwrap_or_default();
        Ok(owners.iter().find(|o| o.kind == "Node" && Some(&o.uid) == node_uid.as_ref()).map(|_| ()))
    })
    .await?;

    // A Job of 5 completions, one at a time, on a node that takes 3 pods: finished pods do not count.
    let jobs: Api<Job> = Api::namespaced(client.clone(), "default");
    let job: Job = serde_yaml::from_str(&format!(
        "metadata: {{name: five}}\nspec:\n  completions: 5\n  parallelism: 1\n  backoffLimit: 0\n  template:\n    spec:\n      restartPolicy: Never\n      terminationGracePeriodSeconds: 1\n      containers:\n      - {{name: main, image: {image}, command: [sh, -c, 'echo done']}}\n"
    ))?;
    jobs.create(&PostParams::default(), &job).await?;
    wait_for("the job's 5 completions", Duration::from_secs(120), || async {
        let status = jobs.get("five").await?.status.unwrap_or_default();
        ensure!(status.failed.unwrap_or(0) == 0, "a job pod failed: {status:?}");
        Ok(Some(()).filter(|_| status.succeeded == Some(5)))
    })
    .await
    .with_context(|| node.log())?;
    let job_pods = pods.list(&ListParams::default().labels("job-name=five")).await?;
    ensure!(job_pods.items.len() == 5 && job_pods.items.iter().all(|p| phase(p) == "Succeeded"));
    jobs.delete(
        "five",
        &DeleteParams { propagation_policy: Some(kube::api::PropagationPolicy::Background), ..Default::default() },
    )
    .await?;

    // The burstable QoS cgroup's cpu shares follow its pods' cpu requests.
    let shares = || -> Result<u64> {
        let root = format!("/proc/{}/root/sys/fs/cgroup", node.pid().unwrap_or(0));
        let path = ["cpu,cpuacct", "cpu"]
            .iter()
            .map(|h| format!("{root}/{h}/kubepods/burstable/cpu.shares"))
            .find(|p| std::path::Path::new(p).exists())
            .context("no v1 cpu hierarchy")?;
        Ok(std::fs::read_to_string(path)?.trim().parse()?)
    };
    let v1_cpu = shares().is_ok();
    if !v1_cpu {
        eprintln!("no v1 cpu hierarchy on this host: the burstable shares check is skipped");
    }
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: burstable}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    command: [sleep, '3600']\n    resources: {{requests: {{cpu: 500m}}, limits: {{memory: 32Mi}}}}\n"
    ))).await?;
    let before = wait_pod(&pods, "burstable", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    if v1_cpu {
        ensure!(shares()? == 512, "burstable cpu.shares {:?}", shares());
    }
    // In-place resize: the memory limit grows without a restart.
    let first = statuses(&before, false).first().cloned().context("status")?;
    let patch = r#"{"spec":{"containers":[{"name":"main","resources":{"requests":{"cpu":"500m"},"limits":{"memory":"48Mi"}}}]}}"#;
    let o = cluster.kubectl().args(["patch", "pod", "burstable", "--subresource", "resize", "-p", patch]).output()?;
    ensure!(o.status.success(), "kubectl patch --subresource resize: {o:?}");
    let resized = wait_pod(&pods, "burstable", "resized in place", Duration::from_secs(30), |p| {
        statuses(p, false).first().is_some_and(|c| {
            let limit = c.resources.as_ref().and_then(|r| r.limits.as_ref()).and_then(|l| l.get("memory"));
            limit.is_some_and(|q| q.0 == "48Mi")
        })
    })
    .await
    .with_context(|| node.log())?;
    let after = statuses(&resized, false).first().cloned().context("status")?;
    ensure!(after.restart_count == 0 && after.container_id == first.container_id, "{first:?} -> {after:?}");
    let uid = before.metadata.uid.clone().unwrap_or_default();
    let id = first.container_id.clone().unwrap_or_default().replace("nodelet://", "");
    let root = format!("/proc/{}/root/sys/fs/cgroup", node.pid().unwrap_or(0));
    let v1 = format!("{root}/memory/kubepods/burstable/pod{uid}/{id}/memory.limit_in_bytes");
    let v2 = format!("{root}/kubepods/burstable/pod{uid}/{id}/memory.max");
    let limit = std::fs::read_to_string(&v1).or_else(|_| std::fs::read_to_string(&v2))?;
    ensure!(limit.trim() == (48u64 << 20).to_string(), "the container's memory limit is {limit}");
    // PodResizeInProgress held while the resize was applied is deleted from the status once it is done (a
    // strategic merge patch keeps conditions left out). (A resize beyond the node's allocatable is refused by
    // the API server itself in 1.37, so Infeasible is covered by unit tests.)
    let resize_conditions = |p: &Pod| {
        let conditions = p.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
        conditions.into_iter().filter(|c| c.type_.starts_with("PodResize")).count()
    };
    wait_pod(&pods, "burstable", "no resize condition left", Duration::from_secs(30), |p| resize_conditions(p) == 0)
        .await?;
    pods.delete("burstable", &DeleteParams::default()).await?;
    wait_for("the burstable pod to go", Duration::from_secs(30), || async {
        Ok(pods.get_opt("burstable").await?.is_none().then_some(()))
    })
    .await?;
    if v1_cpu {
        wait_for("burstable cpu.shares back to 2", Duration::from_secs(10), || async {
            Ok((shares()? == 2).then_some(()))
        })
        .await?;
    }

    // A native sidecar: started before the app container, stopped once it completed; the pod Succeeded.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: sidecar}}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 2\n  initContainers:\n  - {{name: proxy, image: {image}, restartPolicy: Always, command: [sleep, '3600']}}\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'sleep 2; echo served']}}\n"
    ))).await?;
    let running = wait_pod(&pods, "sidecar", "Running with its sidecar", Duration::from_secs(60), |p| {
        phase(p) == "Running" && statuses(p, true).first().is_some_and(|c| c.started == Some(true) && c.ready)
    })
    .await?;
    let conditions = running.status.clone().unwrap_or_default().conditions.unwrap_or_default();
    ensure!(conditions.iter().any(|c| c.type_ == "Initialized" && c.status == "True"), "{conditions:?}");
    let done = wait_pod(&pods, "sidecar", "Succeeded", Duration::from_secs(60), |p| phase(p) == "Succeeded").await?;
    let proxy = statuses(&done, true).first().cloned().context("sidecar status")?;
    let main = statuses(&done, false).first().cloned().context("main status")?;
    let ended = |c: &ContainerStatus| c.state.clone().and_then(|s| s.terminated).context("terminated");
    let (proxy_end, main_end) = (ended(&proxy)?, ended(&main)?);
    ensure!(main_end.exit_code == 0 && proxy.restart_count == 0, "{main:?} {proxy:?}");
    ensure!(proxy_end.started_at.clone().map(|t| t.0) <= main_end.started_at.clone().map(|t| t.0), "sidecar first");
    ensure!(proxy_end.finished_at.clone().map(|t| t.0) >= main_end.finished_at.clone().map(|t| t.0), "sidecar last");
    pods.delete("sidecar", &DeleteParams::default()).await?;

    // `kubectl set image` on a bare pod: the container is stopped and started again with the new image.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: setimage}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600']}}\n"
    ))).await?;
    let before = wait_pod(&pods, "setimage", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    let first = statuses(&before, false).first().cloned().context("status")?;
    // The same image by digest: another reference, so another spec.
    let by_digest = first.image_id.clone();
    let (ok, out) = {
        let o = cluster.kubectl().args(["set", "image", "pod/setimage", &format!("main={by_digest}")]).output()?;
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    };
    ensure!(ok, "kubectl set image: {out}");
    let after = wait_pod(&pods, "setimage", "restarted with the new image", Duration::from_secs(60), |p| {
        let observed = p.status.as_ref().and_then(|s| s.observed_generation);
        observed.is_some()
            && observed == p.metadata.generation
            && statuses(p, false).first().is_some_and(|c| {
                c.restart_count == 1 && c.image == by_digest && c.state.as_ref().is_some_and(|s| s.running.is_some())
            })
    })
    .await?;
    let second = statuses(&after, false).first().cloned().context("status")?;
    ensure!(second.container_id != first.container_id, "{first:?} -> {second:?}");
    // Logs of the instance before the previous are pruned; the pod's logs go with the pod.
    let log_dir =
        node.pod_logs_dir().join(format!("default_setimage_{}", after.metadata.uid.clone().unwrap_or_default()));
    ensure!(log_dir.join("main/0.log").exists() && log_dir.join("main/1.log").exists());
    pods.delete("setimage", &DeleteParams::default()).await?;
    wait_for("the deleted pod's logs to go", Duration::from_secs(30), || async {
        Ok((!log_dir.exists()).then_some(()))
    })
    .await?;

    // Hostile images: a clear CreateContainerError, never a hang or a growing agent.
    let rss_before = node.pid().map(nodelet_integration::process::rss_kib).unwrap_or(0);
    for (name, tag, file) in [("zero", "zero", "/etc/passwd"), ("fifo", "fifo", "/etc/group")] {
        pods.create(&PostParams::default(), &pod(&format!(
            "metadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {}, command: [sh]}}\n",
            registry.reference("hostile", tag)
        ))).await?;
        let p = wait_pod(&pods, name, "CreateContainerError", Duration::from_secs(60), |p| {
            statuses(p, false).first().and_then(waiting).is_some_and(|(r, _)| r == "CreateContainerError")
        })
        .await?;
        let (_, message) = statuses(&p, false).first().and_then(waiting).unwrap_or_default();
        ensure!(message.contains(file) && message.contains("not a regular file"), "{name}: {message}");
    }
    let rss_after = node.pid().map(nodelet_integration::process::rss_kib).unwrap_or(0);
    ensure!(rss_after < rss_before + 64 * 1024, "the agent grew from {rss_before} to {rss_after} KiB");
    for name in ["zero", "fifo"] {
        pods.delete(name, &DeleteParams::default()).await?;
    }

    // A 70-character pod name: the hostname is cut to 63 characters, less the '-' it would end in.
    let long = format!("{}-{}", "h".repeat(62), "x".repeat(7));
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: {long}}}\nspec:\n  restartPolicy: Never\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'hostname; cat /proc/self/oom_score_adj']}}\n"
    ))).await?;
    wait_pod(&pods, &long, "Succeeded", Duration::from_secs(60), |p| phase(p) == "Succeeded").await?;
    let o = cluster.kubectl().args(["logs", &long]).output()?;
    // A BestEffort container is the kernel's first choice (1000); the agent its last (-999).
    ensure!(String::from_utf8_lossy(&o.stdout) == format!("{}\n1000\n", "h".repeat(62)), "{o:?}");
    let agent_adj = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", node.pid().unwrap_or(0)))?;
    // Lowering it needs CAP_SYS_RESOURCE, which some machines (containers) do not grant even to root.
    let can_lower = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0); // bit 24: CAP_SYS_RESOURCE
    if can_lower {
        ensure!(agent_adj.trim() == "-999", "the agent's oom_score_adj: {agent_adj}");
    } else {
        eprintln!("no CAP_SYS_RESOURCE here: the agent's oom_score_adj stays {}", agent_adj.trim());
    }

    // activeDeadlineSeconds: the pod fails with DeadlineExceeded and its container is stopped.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: deadline}}\nspec:\n  activeDeadlineSeconds: 3\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600']}}\n"
    ))).await?;
    let failed = wait_pod(&pods, "deadline", "Failed", Duration::from_secs(60), |p| phase(p) == "Failed").await?;
    let st = failed.status.clone().unwrap_or_default();
    ensure!(st.reason.as_deref() == Some("DeadlineExceeded"), "{st:?}");
    ensure!(statuses(&failed, false).first().is_some_and(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some())));

    // The node lists its images.
    wait_for("the node's images", Duration::from_secs(30), || async {
        let node_now = nodes.get(NODE).await?;
        let images = node_now.status.and_then(|s| s.images).unwrap_or_default();
        Ok(images
            .iter()
            .any(|i| i.names.iter().flatten().any(|n| n.contains("/busybox@sha256:")) && i.size_bytes.unwrap_or(0) > 0)
            .then_some(()))
    })
    .await?;

    // A shorter grace period during a graceful deletion takes effect: a container that ignores SIGTERM with a
    // 60 s grace period goes within seconds once the deletion is repeated with --grace-period=1.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: stubborn}}\nspec:\n  terminationGracePeriodSeconds: 60\n  containers:\n  - {{name: main, image: {image}, command: [sh, -c, 'trap \"\" TERM; while true; do sleep 1; done']}}\n"
    ))).await?;
    wait_pod(&pods, "stubborn", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    pods.delete("stubborn", &DeleteParams::default()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(pods.get_opt("stubborn").await?.is_some(), "the pod went before its grace period");
    let shortened = std::time::Instant::now();
    pods.delete("stubborn", &DeleteParams { grace_period_seconds: Some(1), ..Default::default() }).await?;
    wait_for("the pod to go after the shorter grace period", Duration::from_secs(20), || async {
        Ok(pods.get_opt("stubborn").await?.is_none().then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    eprintln!("stubborn pod gone {:?} after the grace period was shortened", shortened.elapsed());

    // A RestartAllContainers restart rule: the scheduler places the pod here only because the node declares the
    // feature; the source's exit 42 restarts every container in place, the init container first.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: restart-all}}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  volumes: [{{name: work, emptyDir: {{}}}}]\n  initContainers:\n  - {{name: init, image: {image}, command: [sh, -c, 'echo init >> /work/runs'], volumeMounts: [{{name: work, mountPath: /work}}]}}\n  containers:\n  - name: source\n    image: {image}\n    command: [sh, -c, 'if [ -f /work/done ]; then sleep 3600; else touch /work/done; sleep 2; exit 42; fi']\n    restartPolicy: Never\n    restartPolicyRules: [{{action: RestartAllContainers, exitCodes: {{operator: In, values: [42]}}}}]\n    volumeMounts: [{{name: work, mountPath: /work}}]\n  - {{name: regular, image: {image}, command: [sleep, '3600'], restartPolicy: Never}}\n"
    ))).await?;
    let restarted = wait_pod(&pods, "restart-all", "all containers restarted in place", Duration::from_secs(90), |p| {
        let all = statuses(p, true).into_iter().chain(statuses(p, false)).collect::<Vec<_>>();
        all.len() == 3
            && all.iter().all(|c| {
                let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref());
                c.restart_count == 1 && last.is_some_and(|t| t.reason.as_deref() == Some("RestartingAllContainers"))
            })
            && statuses(p, false).iter().all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
    })
    .await
    .with_context(|| node.log())?;
    let conditions = restarted.status.and_then(|s| s.conditions).unwrap_or_default();
    ensure!(
        conditions.iter().any(|c| c.type_ == "AllContainersRestarting" && c.status == "False")
            && conditions.iter().any(|c| c.type_ == "Initialized" && c.status == "True"),
        "{conditions:?}"
    );
    let out = cluster.kubectl().args(["exec", "restart-all", "-c", "source", "--", "cat", "/work/runs"]).output()?;
    let runs = String::from_utf8_lossy(&out.stdout);
    ensure!(runs == "init\ninit\n", "the init container ran twice, in the same volume: {runs:?} {out:?}");
    pods.delete("restart-all", &DeleteParams::default()).await?;

    // Pod-level resources: containers without limits, a pod-level budget; the pod is Guaranteed and its cgroup
    // has the budget's memory limit.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: pod-level}}\nspec:\n  terminationGracePeriodSeconds: 1\n  resources: {{limits: {{cpu: 500m, memory: 48Mi}}}}\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600']}}\n"
    ))).await?;
    let level = wait_pod(&pods, "pod-level", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    let status = level.status.clone().unwrap_or_default();
    ensure!(status.qos_class.as_deref() == Some("Guaranteed"), "{:?}", status.qos_class);
    let uid = level.metadata.uid.clone().unwrap_or_default();
    let root = format!("/proc/{}/root/sys/fs/cgroup", node.pid().unwrap_or(0));
    let limit = [
        format!("{root}/memory/kubepods/pod{uid}/memory.limit_in_bytes"),
        format!("{root}/kubepods/pod{uid}/memory.max"),
    ]
    .into_iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .context("no memory limit file for the pod cgroup")?;
    ensure!(limit.trim() == (48u64 << 20).to_string(), "pod cgroup memory limit {limit:?}");
    pods.delete("pod-level", &DeleteParams::default()).await?;
    wait_for("the two pods to go", Duration::from_secs(30), || async {
        Ok((pods.get_opt("restart-all").await?.is_none() && pods.get_opt("pod-level").await?.is_none()).then_some(()))
    })
    .await?;

    // A pod for another OS is rejected at admission, as upstream words it.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: windows}}\nspec:\n  os: {{name: windows}}\n  containers:\n  - {{name: main, image: {image}}}\n"
    ))).await?;
    let rejected = wait_pod(&pods, "windows", "Failed", Duration::from_secs(60), |p| phase(p) == "Failed").await?;
    let st = rejected.status.clone().unwrap_or_default();
    ensure!(st.reason.as_deref() == Some("PodOSNotSupported"), "{st:?}");
    pods.delete("windows", &DeleteParams::default()).await?;

    // runAsNonRoot: busybox runs as root, so the container waits in CreateContainerConfigError with upstream's
    // message; with runAsUser 1000 it runs.
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: nonroot}}\nspec:\n  terminationGracePeriodSeconds: 1\n  securityContext: {{runAsNonRoot: true}}\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600']}}\n"
    ))).await?;
    let refused = wait_pod(&pods, "nonroot", "CreateContainerConfigError", Duration::from_secs(60), |p| {
        statuses(p, false).first().and_then(waiting).is_some_and(|(r, _)| r == "CreateContainerConfigError")
    })
    .await?;
    let (_, message) = statuses(&refused, false).first().and_then(waiting).unwrap_or_default();
    ensure!(
        message.starts_with("container has runAsNonRoot and image will run as root (pod: \"nonroot_default("),
        "{message}"
    );
    pods.create(&PostParams::default(), &pod(&format!(
        "metadata: {{name: nonroot-ok}}\nspec:\n  terminationGracePeriodSeconds: 1\n  securityContext: {{runAsNonRoot: true, runAsUser: 1000}}\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600']}}\n"
    ))).await?;
    wait_pod(&pods, "nonroot-ok", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    Ok(())
}
