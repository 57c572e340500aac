//! `cargo bench -p nodelet --bench pod_startup [-- PODS] [--no-upstream]`: pod created (API server) -> Running
//! observed through a watch, with the image already on the node, for PODS pods created one at a time and then PODS
//! at once; and the node software's RSS idle and with PODS pods running. Side by side in the same run with its
//! upstream peer: the upstream kubelet on Debian's containerd (runc shims, a pause image), a second node of the
//! same test control plane (`nodelet_integration::upstream`), pods pinned to each node by `nodeSelector`, each
//! node measured while the other is idle. Root. Prints a table.
#![allow(clippy::expect_used)] // a test: a failed expect is a failed test

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::process::{rss_kib, status_kib};
use nodelet_integration::registry::Registry;
use nodelet_integration::upstream::UpstreamNode;
use support::{pod, rank, wait_for};

/// The largest resident mappings of `pid` (from `/proc/<pid>/smaps`, grouped by file or `[anon]`/`[heap]`/
/// `[stack]`), as `name rss (anonymous)` in KiB: where the RSS is when it is over target.
fn largest_mappings(pid: u32, n: usize) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by_name: HashMap<String, (u64, u64)> = HashMap::new();
    let mut current = String::new();
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let kib = || fields.get(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match fields.first() {
            Some(&"Rss:") => by_name.entry(current.clone()).or_default().0 += kib(),
            Some(&"Anonymous:") => by_name.entry(current.clone()).or_default().1 += kib(),
            Some(first) if first.contains('-') && fields.len() >= 5 => {
                let name = fields.get(5).map(|p| p.rsplit('/').next().unwrap_or(p)).unwrap_or("[anon]");
                current = name.to_string();
            }
            _ => {}
        }
    }
    let mut all: Vec<_> = by_name.into_iter().collect();
    all.sort_by_key(|(_, (rss, _))| std::cmp::Reverse(*rss));
    all.into_iter().take(n).map(|(name, (rss, anon))| format!("{name} {rss} KiB ({anon} anon)")).collect()
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted[rank(sorted.len(), q)].as_secs_f64() * 1000.0
}

/// Creates `names` (all at once) and returns each one's created -> Running time as seen by a watch.
async fn run_batch(pods: &Api<Pod>, image: &str, node: &str, names: &[String]) -> Vec<Duration> {
    let mut stream = watcher(pods.clone(), watcher::Config::default().labels("bench=startup")).boxed();
    let mut created: HashMap<String, Instant> = HashMap::new();
    for name in names {
        let p = pod(&format!(
            "metadata: {{name: {name}, labels: {{bench: startup}}}}\nspec:\n  nodeSelector: {{kubernetes.io/hostname: {node}}}\n  terminationGracePeriodSeconds: 0\n  containers:\n  - {{name: main, image: {image}, imagePullPolicy: IfNotPresent, command: [sleep, '3600']}}\n"
        ));
        created.insert(name.clone(), Instant::now());
        pods.create(&PostParams::default(), &p).await.expect("create pod");
    }
    let mut done: HashMap<String, Duration> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while done.len() < names.len() && Instant::now() < deadline {
        let Ok(Some(Ok(event))) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await else { continue };
        let pods_seen = match event {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => vec![p],
            _ => vec![],
        };
        for p in pods_seen {
            let name = p.metadata.name.clone().unwrap_or_default();
            let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if running && let Some(t0) = created.get(&name) {
                done.entry(name).or_insert_with(|| t0.elapsed());
            }
        }
    }
    assert_eq!(done.len(), names.len(), "not every pod became Running");
    done.into_values().collect()
}

#[tokio::main]
async fn main() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("pod_startup: needs root");
        std::process::exit(1);
    }
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(50);
    let cluster = Cluster::start().await.expect("control plane (run integration/scripts/setup.sh)");
    let registry = Registry::start().await.expect("registry");
    let (node, _net_d) = support::start_cluster_node(
        &cluster,
        &registry,
        "bench",
        &format!("maxPods: {}\naddress: 127.0.0.1\n", 2 * n + 10),
        &[],
    )
    .expect("nodelet");
    let client = cluster.admin().await.expect("client");
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    wait_for("the node", Duration::from_secs(60), || async { Ok(nodes.get_opt("bench").await?.map(|_| ())) })
        .await
        .expect("node");
    let upstream = if std::env::args().any(|a| a == "--no-upstream") {
        None
    } else {
        let up = UpstreamNode::start(&cluster, &registry, "upstream", 2 * n + 10).await.expect("upstream");
        let ready = wait_for("the upstream node", Duration::from_secs(120), || async {
            let ready = nodes
                .get_opt("upstream")
                .await?
                .and_then(|n| n.status?.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Ok(ready.then_some(()))
        })
        .await;
        if let Err(e) = ready {
            panic!("upstream kubelet not Ready: {e:#}\n{}", up.log_tail(40));
        }
        Some(up)
    };
    let mut peers = vec![Peer::new("nodelet", "bench")];
    if upstream.is_some() {
        peers.push(Peer::new("kubelet + containerd", "upstream"));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let image = registry.reference("busybox", "latest");
    // Warm-up: the image gets pulled once per node.
    for peer in &peers {
        run_batch(&pods, &image, peer.node, &[format!("warmup-{}", peer.node)]).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = node.pid().expect("nodelet pid");
    let footprint = |peer: &Peer| -> Vec<(String, u64)> {
        match (peer.node, &upstream) {
            ("upstream", Some(up)) => up.daemons_rss_kib(),
            _ => nodelet_processes(pid),
        }
    };
    let idle: Vec<Vec<(String, u64)>> = peers.iter().map(footprint).collect();
    let (idle_anon, idle_file) = (status_kib(pid, "RssAnon"), status_kib(pid, "RssFile"));
    let idle_mappings = largest_mappings(pid, 6);

    // One node at a time, the other idle with its warm-up pod only: 50 pods of one node (with their shims, for
    // the peer) would otherwise load the machine while the other is measured.
    let mut loaded = Vec::new();
    for peer in &mut peers {
        for i in 0..n {
            let name = format!("seq-{}-{i}", peer.node);
            peer.sequential.extend(run_batch(&pods, &image, peer.node, &[name]).await);
        }
        loaded.push(footprint(peer));
        delete_all(&pods).await;
    }
    for peer in &mut peers {
        let names: Vec<String> = (0..n).map(|i| format!("burst-{}-{i}", peer.node)).collect();
        peer.burst = run_batch(&pods, &image, peer.node, &names).await;
        delete_all(&pods).await;
    }

    println!("pod created -> Running (watch), image present, {n} pods per node, pods pinned by nodeSelector\n");
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "node",
        "seq p50",
        "seq p99",
        "seq max",
        "burst p50",
        "burst p99",
        "burst max",
        "idle MiB",
        format!("{n} pods MiB")
    );
    let mib = |v: &[(String, u64)]| v.iter().map(|(_, k)| *k).sum::<u64>() as f64 / 1024.0;
    for (i, peer) in peers.iter_mut().enumerate() {
        peer.sequential.sort();
        peer.burst.sort();
        let (s, b) = (&peer.sequential, &peer.burst);
        println!(
            "{:<22} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>12.1}",
            peer.label,
            percentile(s, 0.5),
            percentile(s, 0.99),
            percentile(s, 1.0),
            percentile(b, 0.5),
            percentile(b, 0.99),
            percentile(b, 1.0),
            mib(&idle[i]),
            mib(&loaded[i])
        );
    }
    println!("\nRSS by process (idle -> with {n} pods; sums of RSS, so pages shared between processes count twice):");
    for (i, peer) in peers.iter().enumerate() {
        println!("  {}: {}", peer.label, by_process(&idle[i], &loaded[i]));
    }
    let kib = |k: u64| k as f64 / 1024.0;
    println!(
        "nodelet agent idle: {:.1} MiB anonymous, {:.1} MiB file-backed; largest mappings: {}",
        kib(idle_anon),
        kib(idle_file),
        idle_mappings.join(", ")
    );
    drop(upstream);
}

/// One node under test and what was measured on it.
struct Peer {
    label: &'static str,
    node: &'static str,
    sequential: Vec<Duration>,
    burst: Vec<Duration>,
}

impl Peer {
    fn new(label: &'static str, node: &'static str) -> Self {
        Peer { label, node, sequential: Vec::new(), burst: Vec::new() }
    }
}

/// nodelet's processes with their RSS in KiB: the agent and its zygote (the parent of every container).
fn nodelet_processes(agent: u32) -> Vec<(String, u64)> {
    let mut out = vec![("agent".to_string(), rss_kib(agent))];
    let children = std::fs::read_to_string(format!("/proc/{agent}/task/{agent}/children")).unwrap_or_default();
    for child in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
        if std::fs::read_to_string(format!("/proc/{child}/comm")).is_ok_and(|c| c.trim() == "nodelet-zygote") {
            out.push(("zygote".to_string(), rss_kib(child)));
        }
    }
    out
}

/// `name idle->loaded MiB` per process name (several processes of one name summed, with their count).
fn by_process(idle: &[(String, u64)], loaded: &[(String, u64)]) -> String {
    let sum = |v: &[(String, u64)], name: &str| {
        let of: Vec<u64> = v.iter().filter(|(n, _)| n == name).map(|(_, k)| *k).collect();
        (of.len(), of.iter().sum::<u64>() as f64 / 1024.0)
    };
    let mut names: Vec<&str> = loaded.iter().chain(idle).map(|(n, _)| n.as_str()).collect();
    names.sort();
    names.dedup();
    names
        .iter()
        .map(|name| {
            let ((ni, i), (nl, l)) = (sum(idle, name), sum(loaded, name));
            if nl > 1 { format!("{name} ×{ni}->{nl} {i:.1} -> {l:.1}") } else { format!("{name} {i:.1} -> {l:.1}") }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn delete_all(pods: &Api<Pod>) {
    pods.delete_collection(&DeleteParams::default(), &ListParams::default().labels("bench=startup"))
        .await
        .expect("delete");
    wait_for("pods gone", Duration::from_secs(300), || async {
        Ok(pods.list(&ListParams::default().labels("bench=startup")).await?.items.is_empty().then_some(()))
    })
    .await
    .expect("cleanup");
}
