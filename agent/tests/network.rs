//! Pod networking end to end, on a standalone node in a network namespace of the test's own (node IP on a dummy
//! interface): nodelet's built-in CNI network (bridge + host-local + portmap from Debian's plugins) gives pods
//! their IPs; pods reach each other and the node; a hostPort answers on the node IP; resolv.conf follows each
//! dnsPolicy and /etc/hosts the hostAliases; a broken CNI config is a clear sandbox failure that leaks nothing; after a
//! kill -9 of nodelet, removing a pod still releases its IP, veth and iptables rules; 100 pods come and go and
//! leave no IP, veth, rule or cache entry behind.

mod support;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};
use support::{Netns, Nodelet, nodelet_cli, wait_for};

const NODE_IP: &str = "192.168.79.1";
const POD_CIDR: &str = "10.79.0.0/24";

/// (phase, ip) of the pod whose name starts with `name`, from `nodelet ps`.
fn pod_row(root: &str, name: &str) -> Result<Option<(String, String)>> {
    let ps = nodelet_cli(&["ps", "--root-dir", root])?;
    Ok(ps.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.get(1).filter(|n| n.starts_with(&format!("{name}-"))).map(|_| (cols[2].to_string(), cols[5].to_string()))
    }))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// veth interfaces in the node's namespace.
fn veths(netns: &Netns) -> Result<usize> {
    Ok(netns.run(&["ip", "-o", "link", "show", "type", "veth"])?.lines().count())
}

#[tokio::test]
async fn pods_get_a_network() -> Result<()> {
    if !ready("pods_get_a_network", &[Need::Root, Need::Registry]) {
        return Ok(());
    }
    let registry = Registry::start().await?;
    let work = tempfile::tempdir()?;
    let root_dir = work.path().join("root");
    let root = root_dir.display().to_string();
    support::import_busybox(&registry, work.path(), &root_dir)?;
    let (manifests, net_d) = (work.path().join("pods"), work.path().join("net.d"));
    std::fs::create_dir_all(&manifests)?;
    std::fs::create_dir_all(&net_d)?;
    let netns = Netns::create("net", NODE_IP)?;
    // A server on the node (in its namespace) for pods to reach.
    let www = work.path().join("www");
    std::fs::create_dir_all(&www)?;
    write(&www.join("index.html"), "from the node\n")?;
    let _node_server = support::ChildGuard(
        netns.command(&["busybox", "httpd", "-f", "-p", &format!("{NODE_IP}:9090"), "-h"]).arg(&www).spawn()?,
    );
    // The server pod: HTTP on 8080 published as hostPort 30080; dnsPolicy Default; host aliases.
    write(
        &manifests.join("server.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: server}\nspec:\n  terminationGracePeriodSeconds: 1\n  dnsPolicy: Default\n  hostAliases:\n  - {ip: 10.1.2.3, hostnames: [foo.local, bar.local]}\n  containers:\n  - name: web\n    image: nodelet.local/busybox:latest\n    imagePullPolicy: Never\n    ports: [{containerPort: 8080, hostPort: 30080}]\n    command: [sh, -c, 'cat /etc/resolv.conf /etc/hosts /etc/hostname; mkdir -p /www; echo pong > /www/index.html; exec httpd -f -p 8080 -h /www']\n",
    )?;
    write(&work.path().join("resolv.conf"), "search corp.example\nnameserver 192.168.79.53\n")?;
    let mut node = Nodelet::start_in_netns(
        "net",
        &format!("resolvConf: {}\n", work.path().join("resolv.conf").display()),
        &root_dir,
        &netns,
        &[
            "--pod-manifest-path".into(),
            manifests.display().to_string(),
            "--cni-conf-dir".into(),
            net_d.display().to_string(),
            "--pod-cidr".into(),
            POD_CIDR.into(),
            "--cluster-dns".into(),
            "10.96.0.10".into(),
        ],
    )?;
    let logs_dir = node.pod_logs_dir().display().to_string();
    let logs = |pod: &str| nodelet_cli(&["logs", pod, "--pod-logs-dir", &logs_dir]);
    let server_ip = wait_for("the server pod Running with an IP", Duration::from_secs(60), || async {
        Ok(pod_row(&root, "server")?
            .filter(|(phase, ip)| phase == "Running" && ip.starts_with("10.79.0."))
            .map(|r| r.1))
    })
    .await
    .with_context(|| node.log())?;
    let server_log = wait_for("the server's name files", Duration::from_secs(10), || async {
        Ok(logs("server").ok().filter(|l| l.contains("foo.local")))
    })
    .await?;
    ensure!(server_log.starts_with("search corp.example\nnameserver 192.168.79.53\n"), "Default: {server_log}");
    ensure!(server_log.contains(&format!("{server_ip}\tserver-net\n")), "hosts: {server_log}");
    ensure!(server_log.contains("# Entries added by HostAliases.\n10.1.2.3\tfoo.local\tbar.local\n"), "{server_log}");

    // The client pod (ClusterFirst) reaches the server by pod IP and the node's server by node IP.
    write(
        &manifests.join("client.yaml"),
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: client}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: nodelet.local/busybox:latest\n    imagePullPolicy: Never\n    env: [{{name: MY_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}]\n    command: [sh, -c, 'cat /etc/resolv.conf; echo my-ip=$MY_IP; until wget -qO- http://{server_ip}:8080/; do sleep 1; done; wget -qO- http://{NODE_IP}:9090/; exec sleep 3600']\n"
        ),
    )?;
    let client_log = wait_for("the client to reach the server and the node", Duration::from_secs(60), || async {
        Ok(logs("client").ok().filter(|l| l.contains("pong\n") && l.contains("from the node\n")))
    })
    .await
    .with_context(|| node.log())?;
    ensure!(
        client_log.starts_with("search default.svc.cluster.local svc.cluster.local cluster.local corp.example\nnameserver 10.96.0.10\noptions ndots:5\n"),
        "ClusterFirst: {client_log}"
    );
    // The downward API's status.podIP is the pod's address on the pod network.
    let client_ip = pod_row(&root, "client")?.map(|r| r.1).unwrap_or_default();
    ensure!(client_ip.starts_with("10.79.0.") && client_log.contains(&format!("my-ip={client_ip}\n")), "{client_log}");
    // The hostPort answers on the node IP.
    let answer = netns.run(&["busybox", "wget", "-qO-", &format!("http://{NODE_IP}:30080/")])?;
    ensure!(answer == "pong\n", "hostPort: {answer:?}");

    // The other dnsPolicies: None with dnsConfig, and a hostNetwork pod with ClusterFirstWithHostNet (which also
    // gets the node's IP and the node's /etc/hosts).
    write(
        &manifests.join("dnsnone.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: dnsnone}\nspec:\n  restartPolicy: Never\n  dnsPolicy: None\n  dnsConfig: {nameservers: [1.1.1.1], searches: [a.example], options: [{name: ndots, value: '2'}]}\n  containers:\n  - {name: main, image: nodelet.local/busybox:latest, imagePullPolicy: Never, command: [cat, /etc/resolv.conf]}\n",
    )?;
    write(
        &manifests.join("hostnet.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: hostnet}\nspec:\n  restartPolicy: Never\n  hostNetwork: true\n  dnsPolicy: ClusterFirstWithHostNet\n  containers:\n  - {name: main, image: nodelet.local/busybox:latest, imagePullPolicy: Never, command: [cat, /etc/resolv.conf]}\n",
    )?;
    let finished = |name: &'static str| {
        let root = root.clone();
        async move { Ok(pod_row(&root, name)?.filter(|(phase, _)| phase == "Succeeded").map(|r| r.1)) }
    };
    wait_for("dnsnone to finish", Duration::from_secs(60), || finished("dnsnone")).await.with_context(|| node.log())?;
    let hostnet_ip = wait_for("hostnet to finish", Duration::from_secs(60), || finished("hostnet"))
        .await
        .with_context(|| node.log())?;
    ensure!(
        logs("dnsnone")? == "search a.example\nnameserver 1.1.1.1\noptions ndots:2\n",
        "None: {}",
        logs("dnsnone")?
    );
    ensure!(
        logs("hostnet")?
            == "search default.svc.cluster.local svc.cluster.local cluster.local corp.example\nnameserver 10.96.0.10\noptions ndots:5\n",
        "ClusterFirstWithHostNet: {}",
        logs("hostnet")?
    );
    ensure!(hostnet_ip == NODE_IP, "a hostNetwork pod's IP is the node's: {hostnet_ip}");
    for file in ["dnsnone.yaml", "hostnet.yaml"] {
        std::fs::remove_file(manifests.join(file))?;
    }

    // A broken CNI config: the new pod's sandbox fails with the file named, nothing is left of it; fixed, it runs.
    write(&net_d.join("00-broken.conflist"), "{ not json")?;
    write(
        &manifests.join("late.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: late}\nspec:\n  containers:\n  - {name: main, image: nodelet.local/busybox:latest, imagePullPolicy: Never, command: [sleep, '3600']}\n",
    )?;
    wait_for("a FailedCreatePodSandBox naming the broken file", Duration::from_secs(30), || async {
        Ok(node
            .log()
            .lines()
            .any(|l| l.contains("FailedCreatePodSandBox") && l.contains("00-broken.conflist: invalid JSON"))
            .then_some(()))
    })
    .await?;
    let (phase, ip) = pod_row(&root, "late")?.context("late's status")?;
    ensure!(phase == "Pending" && ip == "<none>", "{phase} {ip}");
    ensure!(veths(&netns)? == 2, "a failed sandbox must leave no veth");
    std::fs::remove_file(net_d.join("00-broken.conflist"))?;
    wait_for("late to run once the config is fixed", Duration::from_secs(30), || async {
        Ok(pod_row(&root, "late")?.filter(|(phase, _)| phase == "Running").map(|_| ()))
    })
    .await
    .with_context(|| node.log())?;
    ensure!(veths(&netns)? == 3);

    // kill -9 and back: the pods keep their IPs; a pod removed afterwards releases its IP, veth and rules.
    node.kill();
    node.restart()?;
    wait_for("the restarted node to take its three pods over", Duration::from_secs(30), || async {
        Ok((node.log().matches("taking over the pod from the previous agent").count() == 3).then_some(()))
    })
    .await
    .with_context(|| node.log())?;
    wait_for("the client still reaching the server after the restart", Duration::from_secs(30), || async {
        let ok =
            netns.run(&["busybox", "wget", "-qO-", &format!("http://{NODE_IP}:30080/")]).is_ok_and(|a| a == "pong\n");
        Ok(pod_row(&root, "server")?.filter(|(_, ip)| ok && *ip == server_ip).map(|_| ()))
    })
    .await
    .with_context(|| node.log())?;
    for file in ["server.yaml", "client.yaml", "late.yaml"] {
        std::fs::remove_file(manifests.join(file))?;
    }
    let ipam = root_dir.join("cni/networks/nodelet");
    let released = || -> Result<bool> {
        let leases = std::fs::read_dir(&ipam)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("10.79."))
            .count();
        // The cache entry goes last, once DEL has finished (iptables rules included).
        let cached = std::fs::read_dir(root_dir.join("network"))?.count();
        Ok(leases == 0 && cached == 0 && veths(&netns)? == 0)
    };
    wait_for("every pod's network released", Duration::from_secs(60), || async { Ok(released()?.then_some(())) })
        .await
        .with_context(|| node.log())?;

    // 100 pods come and go, 25 at a time: nothing is left of any of them.
    for round in 0..4 {
        for i in 0..25 {
            write(
                &manifests.join(format!("churn-{i}.yaml")),
                &format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: churn{round}x{i}}}\nspec:\n  terminationGracePeriodSeconds: 0\n  containers:\n  - {{name: main, image: nodelet.local/busybox:latest, imagePullPolicy: Never, command: [sleep, '3600']}}\n"
                ),
            )?;
        }
        wait_for("25 pods Running", Duration::from_secs(120), || async {
            let ps = nodelet_cli(&["ps", "--root-dir", &root])?;
            let running =
                ps.lines().filter(|l| l.contains(&format!("churn{round}x")) && l.contains(" Running ")).count();
            Ok((running == 25 && veths(&netns)? == 25).then_some(()))
        })
        .await
        .with_context(|| node.log())?;
        for i in 0..25 {
            std::fs::remove_file(manifests.join(format!("churn-{i}.yaml")))?;
        }
        wait_for("the 25 pods' networks released", Duration::from_secs(120), || async {
            Ok(released()?.then_some(()))
        })
        .await
        .with_context(|| node.log())?;
    }
    let rules = netns.run(&["iptables-save", "-t", "nat"])?;
    ensure!(!rules.contains("10.79.0.") && !rules.contains("30080"), "rules left behind:\n{rules}\n{}", node.log());
    Ok(())
}
