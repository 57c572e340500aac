//! Security contexts end to end on nodelet as the only node of a real control plane, checked from inside the
//! containers (`/proc/self/status`, `id`, the mount table) and in the pod status: sysctls (safe, allowed unsafe,
//! forbidden with `SysctlForbidden`), `supplementalGroupsPolicy` with the reported user, `Localhost` and
//! `RuntimeDefault` seccomp, capabilities, no_new_privs, a read-only root filesystem, AppArmor refused on a
//! kernel without it, a volume mount into `/proc` refused, and the agent's binary out of a `hostPID` pod's reach
//! (CVE-2019-5736).

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{LogParams, PostParams};
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{pod, wait_pod};

const NODE: &str = "nodelet-security";

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

/// The first container's waiting (reason, message).
fn waiting(p: &Pod) -> Option<(String, String)> {
    let status = p.status.as_ref()?.container_statuses.as_ref()?.first()?;
    let w = status.state.as_ref()?.waiting.as_ref()?;
    Some((w.reason.clone().unwrap_or_default(), w.message.clone().unwrap_or_default()))
}

/// A pod running `script` in busybox (`extra` is more YAML under `spec`, `container` more under the container).
fn script_pod(name: &str, image: &str, script: &str, spec: &str, container: &str) -> Pod {
    pod(&format!(
        "metadata: {{name: {name}}}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n{spec}  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, {script:?}]\n{container}"
    ))
}

/// The logs of a pod that ran to completion.
async fn finished_logs(pods: &Api<Pod>, name: &str) -> Result<String> {
    let done =
        wait_pod(pods, name, "finished", Duration::from_secs(60), |p| matches!(phase(p), "Succeeded" | "Failed"))
            .await?;
    let logs = pods.logs(name, &LogParams::default()).await?;
    ensure!(phase(&done) == "Succeeded", "{name} failed: {logs} {:?}", done.status);
    Ok(logs)
}

#[tokio::test]
async fn security_contexts_are_honoured_or_refused() -> Result<()> {
    if !ready("security_contexts_are_honoured_or_refused", &[Need::Root, Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let image = registry.reference("busybox", "latest");
    let agnhost = registry.reference("agnhost", "2.66.1");
    let config = "address: 127.0.0.1\nallowedUnsafeSysctls: [net.core.somaxconn]\n";
    let (node, _net_d) = support::start_cluster_node(&cluster, &registry, NODE, config, &[])?;
    let profiles = node.root_dir().join("seccomp");
    std::fs::create_dir_all(&profiles)?;
    std::fs::write(
        profiles.join("no-mkdir.json"),
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}"#,
    )?;
    let client = cluster.admin().await?;
    support::wait_node_ready(&client, NODE).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let status = "grep -E '^(CapBnd|CapEff|NoNewPrivs|Seccomp):' /proc/self/status; id";
    let nodelet_pid = node.pid().context("nodelet's pid")?;
    let all = [
        script_pod(
            "sysctls",
            &image,
            "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/net/core/somaxconn /proc/sys/net/ipv4/ip_unprivileged_port_start",
            "  securityContext:\n    sysctls: [{name: kernel/shm_rmid_forced, value: '1'}, {name: net.core.somaxconn, value: '1234'}, {name: net.ipv4.ip_unprivileged_port_start, value: '80'}]\n",
            "",
        ),
        script_pod(
            "forbidden-sysctl",
            &image,
            "true",
            "  securityContext:\n    sysctls: [{name: kernel.msgmax, value: '1'}]\n",
            "",
        ),
        script_pod(
            "merge-groups",
            &agnhost,
            "id -G",
            "  securityContext: {runAsUser: 1000, supplementalGroups: [60000]}\n",
            "",
        ),
        script_pod(
            "strict-groups",
            &agnhost,
            "id -G",
            "  securityContext: {runAsUser: 1000, supplementalGroups: [60000], supplementalGroupsPolicy: Strict}\n",
            "",
        ),
        script_pod(
            "seccomp-localhost",
            &image,
            "grep Seccomp: /proc/self/status; mkdir /tmp/x || echo mkdir-denied",
            "  securityContext: {seccompProfile: {type: Localhost, localhostProfile: no-mkdir.json}}\n",
            "",
        ),
        script_pod(
            "seccomp-missing",
            &image,
            "true",
            "  securityContext: {seccompProfile: {type: Localhost, localhostProfile: missing.json}}\n",
            "",
        ),
        script_pod(
            "restricted",
            &image,
            &format!("{status}; touch /x 2>/dev/null || echo root-read-only; touch /tmp/x && echo tmp-writable"),
            "  securityContext: {runAsUser: 1000, runAsGroup: 3000, runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}\n  volumes: [{name: tmp, emptyDir: {}}]\n",
            "    volumeMounts: [{name: tmp, mountPath: /tmp}]\n    securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL], add: [NET_BIND_SERVICE]}}\n",
        ),
        // RuntimeDefault without allowPrivilegeEscalation: false (the filter is loaded while capabilities allow).
        script_pod(
            "runtime-default",
            &image,
            status,
            "",
            "    securityContext: {seccompProfile: {type: RuntimeDefault}}\n",
        ),
        script_pod("privileged", &image, status, "", "    securityContext: {privileged: true}\n"),
        script_pod("apparmor", &image, "true", "", "    securityContext: {appArmorProfile: {type: RuntimeDefault}}\n"),
        script_pod(
            "proc-mount",
            &image,
            "true",
            "  volumes: [{name: v, emptyDir: {}}]\n",
            "    volumeMounts: [{name: v, mountPath: /proc/sys/kernel/x}]\n",
        ),
        // Root in a hostPID pod finds the agent and tries to open its binary for writing (dd writes nothing).
        script_pod(
            "overwrite-runtime",
            &image,
            &format!(
                "for p in {nodelet_pid} $(cat /proc/{nodelet_pid}/task/*/children); do \
                 dd if=/dev/null of=/proc/$p/exe conv=notrunc 2>/dev/null && echo ESCAPE:$p; done; echo tried"
            ),
            "  hostPID: true\n",
            "    securityContext: {capabilities: {add: [SYS_PTRACE]}}\n",
        ),
    ];
    for p in &all {
        pods.create(&PostParams::default(), p).await?;
    }

    let sysctls = finished_logs(&pods, "sysctls").await.with_context(|| node.log())?;
    ensure!(sysctls.split_whitespace().collect::<Vec<_>>() == ["1", "1234", "80"], "{sysctls}");
    let forbidden =
        wait_pod(&pods, "forbidden-sysctl", "Failed", Duration::from_secs(30), |p| phase(p) == "Failed").await?;
    let status = forbidden.status.unwrap_or_default();
    ensure!(status.reason.as_deref() == Some("SysctlForbidden"), "{status:?}");
    ensure!(status.message.as_deref() == Some("forbidden sysctl: \"kernel.msgmax\" not allowlisted"), "{status:?}");

    // supplementalGroupsPolicy, as upstream's e2e checks it (agnhost's user 1000 is in its group 50000).
    let node_status = Api::<Node>::all(client.clone()).get(NODE).await?.status.unwrap_or_default();
    ensure!(node_status.features.and_then(|f| f.supplemental_groups_policy) == Some(true), "node features");
    for (name, groups) in [("merge-groups", vec![1000, 50000, 60000]), ("strict-groups", vec![1000, 60000])] {
        let logs = finished_logs(&pods, name).await?;
        let expected: Vec<String> = groups.iter().map(i64::to_string).collect();
        ensure!(logs.trim() == expected.join(" "), "{name}: id -G printed {logs:?}");
        let p = pods.get(name).await?;
        let user = p.status.and_then(|s| s.container_statuses).and_then(|c| c.first()?.user.clone());
        let linux = user.and_then(|u| u.linux).context("status.containerStatuses[].user.linux")?;
        ensure!(linux.uid == 1000 && linux.gid == 1000 && linux.supplemental_groups == Some(groups), "{linux:?}");
    }

    let seccomp = finished_logs(&pods, "seccomp-localhost").await?;
    ensure!(seccomp.contains("Seccomp:\t2") && seccomp.contains("mkdir-denied"), "{seccomp}");
    let missing = wait_pod(&pods, "seccomp-missing", "CreateContainerError", Duration::from_secs(30), |p| {
        waiting(p).is_some_and(|(reason, _)| reason == "CreateContainerError")
    })
    .await?;
    let (_, message) = waiting(&missing).unwrap_or_default();
    let path = profiles.join("missing.json");
    ensure!(message.contains(&format!("cannot load seccomp profile {path:?}")), "{message}");

    let restricted = finished_logs(&pods, "restricted").await?;
    for expected in [
        "CapBnd:\t0000000000000400",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "uid=1000 gid=3000",
        "root-read-only",
        "tmp-writable",
    ] {
        ensure!(restricted.contains(expected), "restricted: {expected:?} missing from {restricted}");
    }
    let runtime_default = finished_logs(&pods, "runtime-default").await?;
    ensure!(runtime_default.contains("Seccomp:\t2") && runtime_default.contains("NoNewPrivs:\t0"), "{runtime_default}");
    let privileged = finished_logs(&pods, "privileged").await?;
    ensure!(privileged.contains("Seccomp:\t0") && privileged.contains("uid=0(root)"), "{privileged}");

    let apparmor = wait_pod(&pods, "apparmor", "Failed", Duration::from_secs(30), |p| phase(p) == "Failed").await?;
    let status = apparmor.status.unwrap_or_default();
    ensure!(status.reason.as_deref() == Some("AppArmor"), "{status:?}");
    ensure!(
        status.message.as_deref() == Some("Cannot enforce AppArmor: AppArmor is not enabled on the host"),
        "{status:?}"
    );
    let refused = wait_pod(&pods, "proc-mount", "CreateContainerError", Duration::from_secs(30), |p| {
        waiting(p).is_some_and(|(reason, _)| reason == "CreateContainerError")
    })
    .await?;
    let (_, message) = waiting(&refused).unwrap_or_default();
    ensure!(message.contains("/proc/sys/kernel/x cannot be mounted because it is inside /proc"), "{message}");

    let overwrite = finished_logs(&pods, "overwrite-runtime").await?;
    ensure!(overwrite.contains("tried") && !overwrite.contains("ESCAPE"), "{overwrite}");
    // From the host: the agent and the zygote run from a read-only mount of the binary.
    let children = std::fs::read_to_string(format!("/proc/{nodelet_pid}/task/{nodelet_pid}/children"))?;
    for pid in std::iter::once(nodelet_pid.to_string()).chain(children.split_whitespace().map(String::from)) {
        let flags = rustix::fs::statvfs(format!("/proc/{pid}/exe").as_str())?.f_flag;
        ensure!(flags.contains(rustix::fs::StatVfsMountFlags::RDONLY), "process {pid}'s binary is writable");
    }
    Ok(())
}
