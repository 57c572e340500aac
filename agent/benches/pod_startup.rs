//! `cargo bench -p nodelet --bench pod_startup [-- PODS]`: pod created (API server) -> Running observed through
//! a watch, with the image already on the node, for PODS pods created one at a time and then PODS at once; and
//! the agent's RSS idle and with PODS pods running. nodelet runs as the only node of the test control plane.
//! Root. Prints a table.

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
use nodelet_integration::registry::Registry;
use support::{Nodelet, pod, wait_for};

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `RssAnon`, `RssFile`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?
                    .strip_prefix(':')
                    .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

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
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

/// Creates `names` (all at once) and returns each one's created -> Running time as seen by a watch.
async fn run_batch(pods: &Api<Pod>, image: &str, names: &[String]) -> Vec<Duration> {
    let mut stream = watcher(pods.clone(), watcher::Config::default().labels("bench=startup")).boxed();
    let mut created: HashMap<String, Instant> = HashMap::new();
    for name in names {
        let p = pod(&format!(
            "metadata: {{name: {name}, labels: {{bench: startup}}}}\nspec:\n  terminationGracePeriodSeconds: 0\n  containers:\n  - {{name: main, image: {image}, imagePullPolicy: IfNotPresent, command: [sleep, '3600']}}\n"
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
    let kubeconfig = cluster.node_kubeconfig("bench").expect("node kubeconfig");
    let net_d = support::loopback_only_network().expect("CNI conf dir");
    let port = nodelet_integration::ports::free_port().expect("a port").to_string();
    let node = Nodelet::start(
        "bench",
        &format!("maxPods: {}\n", 2 * n + 10),
        &[
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--insecure-registry".into(),
            registry.host(),
            // On the host's network: pods get loopback only (no bridge or iptables rules on the host).
            "--cni-conf-dir".into(),
            net_d.path().display().to_string(),
            "--address".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port,
        ],
    )
    .expect("nodelet");
    let client = cluster.admin().await.expect("client");
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    wait_for("the node", Duration::from_secs(60), || async { Ok(nodes.get_opt("bench").await?.map(|_| ())) })
        .await
        .expect("node");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let image = registry.reference("busybox", "latest");
    // Warm-up: the image gets pulled once.
    run_batch(&pods, &image, &["warmup".into()]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = node.pid().expect("nodelet pid");
    let idle = rss_kib(pid);
    let (idle_anon, idle_file) = (status_kib(pid, "RssAnon"), status_kib(pid, "RssFile"));
    let idle_mappings = largest_mappings(pid, 6);

    let mut sequential = Vec::new();
    for i in 0..n {
        sequential.extend(run_batch(&pods, &image, &[format!("seq-{i}")]).await);
    }
    let with_pods = rss_kib(pid);
    pods.delete_collection(&DeleteParams::default(), &ListParams::default().labels("bench=startup"))
        .await
        .expect("delete");
    wait_for("pods gone", Duration::from_secs(300), || async {
        Ok(pods.list(&ListParams::default().labels("bench=startup")).await?.items.is_empty().then_some(()))
    })
    .await
    .expect("cleanup");
    let names: Vec<String> = (0..n).map(|i| format!("burst-{i}")).collect();
    let mut burst = run_batch(&pods, &image, &names).await;
    // Which of the one-at-a-time pods were slowest (an outlier early on is warm-up, late on something periodic).
    let mut order: Vec<(usize, Duration)> = sequential.iter().copied().enumerate().collect();
    order.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
    let slowest: Vec<String> =
        order.iter().take(3).map(|(i, t)| format!("seq-{i} {:.0} ms", t.as_secs_f64() * 1000.0)).collect();
    sequential.sort();
    burst.sort();
    println!("pod created -> Running (watch), image present, {n} pods, nodelet as the only node\n");
    println!("{:<28} {:>10} {:>10} {:>10}", "", "p50 ms", "p99 ms", "max ms");
    for (label, t) in [("one at a time".to_string(), &sequential), (format!("{n} at once"), &burst)] {
        println!(
            "{label:<28} {:>10.1} {:>10.1} {:>10.1}",
            percentile(t, 0.5),
            percentile(t, 0.99),
            t.last().unwrap().as_secs_f64() * 1000.0
        );
    }
    println!("\nagent RSS: idle {:.1} MiB, with {n} pods {:.1} MiB", idle as f64 / 1024.0, with_pods as f64 / 1024.0);
    println!("slowest one at a time: {}", slowest.join(", "));
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "idle RSS split: {:.1} MiB anonymous, {:.1} MiB file-backed (the binary's pages)",
        mib(idle_anon),
        mib(idle_file)
    );
    println!("largest idle mappings: {}", idle_mappings.join(", "));
    let _ = pods.delete_collection(&DeleteParams::default(), &ListParams::default().labels("bench=startup")).await;
    wait_for("pods gone", Duration::from_secs(300), || async {
        Ok(pods.list(&ListParams::default().labels("bench=startup")).await?.items.is_empty().then_some(()))
    })
    .await
    .ok();
}
