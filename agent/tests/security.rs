//! Security contexts end to end on nodelet as the only node of a real control plane, checked from inside the
//! containers (`/proc/self/status`, `id`, the mount table) and in the pod status: sysctls (safe, allowed unsafe,
//! forbidden with `SysctlForbidden`), `supplementalGroupsPolicy` with the reported user, `Localhost` and
//! `RuntimeDefault` seccomp, capabilities, no_new_privs, a read-only root filesystem, AppArmor refused on a
//! kernel without it, a volume mount into `/proc` refused, and the agent's binary out of a `hostPID` pod's reach
//! (CVE-2019-5736). Pods with `hostUsers: false`: a user namespace with the range written in the pod's
//! directory, idmapped rootfs and volumes, root in the container unprivileged on the node, `procMount: Unmasked`.

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
    // A node directory for the user namespace pods: a file of an id outside any pod's range, readable by it only.
    let host_dir = node.root_dir().join("userns-host");
    std::fs::create_dir_all(&host_dir)?;
    std::fs::write(host_dir.join("secret"), "node only\n")?;
    std::os::unix::fs::chown(host_dir.join("secret"), Some(1 << 31), Some(1 << 31))?;
    std::fs::set_permissions(host_dir.join("secret"), std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let userns_volumes = format!(
        "  hostUsers: false\n  volumes: [{{name: host, hostPath: {{path: {}}}}}, {{name: cache, emptyDir: {{}}}}]\n",
        host_dir.display()
    );
    let userns_mounts = "    volumeMounts: [{name: host, mountPath: /host}, {name: cache, mountPath: /cache}]\n";
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
        script_pod(
            "userns",
            &image,
            "cat /proc/self/uid_map; id -u; stat -c rootfs=%u /; cat /host/secret 2>/dev/null || echo secret-denied; \
             echo x > /host/made && echo hostpath-writable; echo x > /cache/f && echo emptydir-writable; \
             mknod /tmp/n c 1 3 2>/dev/null || echo mknod-denied; \
             grep -q ' /proc/keys ' /proc/self/mountinfo && echo keys-masked",
            &userns_volumes,
            userns_mounts,
        ),
        script_pod(
            "userns-user",
            &image,
            "id -u; echo x > /cache/f && stat -c cache=%u /cache/f",
            &format!("{userns_volumes}  securityContext: {{runAsUser: 1000}}\n"),
            userns_mounts,
        ),
        script_pod("userns-sleeper", &image, "sleep 3600", "  hostUsers: false\n", ""),
        script_pod(
            "userns-unmasked",
            &image,
            "grep -q ' /proc/keys ' /proc/self/mountinfo && echo keys-masked || echo keys-unmasked",
            "  hostUsers: false\n",
            "    securityContext: {procMount: Unmasked}\n",
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

    // User namespaces: the node says it has them, and each pod gets a range of its own, written down.
    let handlers = node_status.runtime_handlers.unwrap_or_default();
    let userns_feature = handlers.first().and_then(|h| h.features.as_ref()).and_then(|f| f.user_namespaces);
    ensure!(userns_feature == Some(true), "status.runtimeHandlers: {handlers:?}");
    let userns = finished_logs(&pods, "userns").await.with_context(|| node.log())?;
    let map: Vec<u64> =
        userns.lines().next().unwrap_or_default().split_whitespace().filter_map(|n| n.parse().ok()).collect();
    ensure!(
        map.len() == 3 && map[0] == 0 && map[1] >= 65536 && map[1].is_multiple_of(65536) && map[2] == 65536,
        "{userns}"
    );
    for expected in
        ["\n0\n", "rootfs=0", "secret-denied", "hostpath-writable", "emptydir-writable", "mknod-denied", "keys-masked"]
    {
        ensure!(userns.contains(expected), "userns: {expected:?} missing from {userns}");
    }
    // Written through the idmapped hostPath by the pod's root: stored as its id 0, as upstream's idmapped volumes do.
    let made = std::fs::metadata(host_dir.join("made"))?;
    ensure!(std::os::unix::fs::MetadataExt::uid(&made) == 0, "made by the pod's root: {made:?}");
    let user = finished_logs(&pods, "userns-user").await?;
    ensure!(user.lines().collect::<Vec<_>>() == ["1000", "cache=1000"], "{user}");
    let unmasked = finished_logs(&pods, "userns-unmasked").await?;
    ensure!(unmasked.trim() == "keys-unmasked", "{unmasked}");
    // A running pod's range is written in its directory (upstream's file); a finished pod's is released.
    let pod_file = |uid: String| node.root_dir().join("pods").join(uid).join("userns");
    let finished = pod_file(pods.get("userns").await?.metadata.uid.context("uid")?);
    ensure!(!finished.exists(), "a finished pod kept its range");
    wait_pod(&pods, "userns-sleeper", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await?;
    let file = pod_file(pods.get("userns-sleeper").await?.metadata.uid.context("uid")?);
    let persisted = std::fs::read_to_string(&file)?;
    ensure!(persisted.starts_with(r#"{"uidMappings":[{"hostId":"#), "{persisted}");
    // Deleted, the pod's range is released with its file.
    pods.delete("userns-sleeper", &Default::default()).await?;
    let released = async {
        while file.exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), released).await.context("the userns file stayed")?;

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
