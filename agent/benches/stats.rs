//! `cargo bench -p nodelet --bench stats [-- PODS] [--scrapes N] [--seconds S] [--no-upstream]`: the cost of the
//! stats endpoints with PODS pods (default 100, one `sleep` container each) on one node, side by side with the
//! upstream kubelet on containerd (`nodelet_integration::upstream`) in the same run:
//!
//! - `/stats/summary`: N requests (default 50) straight to the kubelet API (curl, one connection each: the time
//!   from the TLS handshake's end to the last byte), p50/p99, and the node software's CPU per request (its CPU
//!   during the requests less its idle rate, per request);
//! - idle: the node software's CPU as a % of one core over S seconds (default 60) while a real metrics-server
//!   scrapes both nodes' `/metrics/resource` every 15 s.
//!
//! Both nodes use their default housekeeping (10 s). Root. Prints a table.
#![allow(clippy::expect_used)] // a test: a failed expect is a failed test

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use nodelet_integration::certs::CertFiles;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::upstream::UpstreamNode;
use support::{arg_after, pod, process_cpu, rank, wait_for};

/// One node under test.
struct Peer<'a> {
    label: &'static str,
    node: &'static str,
    port: u16,
    daemons: Box<dyn Fn() -> Vec<u32> + 'a>,
}

impl Peer<'_> {
    fn cpu(&self) -> f64 {
        (self.daemons)().into_iter().map(process_cpu).sum()
    }
}

/// One `GET path` with curl: (seconds after the TLS handshake, bytes).
fn get(port: u16, path: &str, cert: &CertFiles) -> (f64, u64) {
    let out = std::process::Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{time_appconnect} %{time_total} %{size_download} %{http_code}"])
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key)
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(v.get(3), Some(&"200"), "GET {path} on :{port}: {text}");
    let f = |i: usize| v.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (f(1) - f(0), v.get(2).and_then(|x| x.parse().ok()).unwrap_or(0))
}

struct Measured {
    p50_ms: f64,
    p99_ms: f64,
    bytes: u64,
    cpu_ms_per_scrape: f64,
}

async fn measure_summary(peer: &Peer<'_>, scrapes: usize, cert: &CertFiles) -> Measured {
    // The idle rate first, to take it out of the requests' CPU.
    let (c0, t0) = (peer.cpu(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_rate = (peer.cpu() - c0) / t0.elapsed().as_secs_f64();
    let (c1, t1) = (peer.cpu(), Instant::now());
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..scrapes {
        let (seconds, size) = get(peer.port, "/stats/summary", cert);
        times.push(seconds * 1000.0);
        bytes = size;
    }
    let busy = (peer.cpu() - c1) - idle_rate * t1.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let q = |q: f64| times.get(rank(times.len(), q)).copied().unwrap_or(f64::NAN);
    Measured { p50_ms: q(0.5), p99_ms: q(0.99), bytes, cpu_ms_per_scrape: busy.max(0.0) * 1000.0 / scrapes as f64 }
}

#[tokio::main]
async fn main() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("stats: needs root");
        std::process::exit(1);
    }
    let n_pods: usize = std::env::args().skip(1).take(1).find_map(|a| a.parse().ok()).unwrap_or(100);
    let scrapes = usize::try_from(arg_after("--scrapes").unwrap_or(50)).unwrap_or(50);
    let seconds = arg_after("--seconds").unwrap_or(60);
    let address = support::HostAddress::create("stats-bench", 252).expect("a host address for metrics-server");
    let mut cluster = Cluster::start().await.expect("control plane (run integration/scripts/setup.sh)");
    let registry = Registry::start().await.expect("registry");
    let (node, _net_d) = support::start_cluster_node(
        &cluster,
        &registry,
        "stats",
        &format!("maxPods: {}\naddress: 127.0.0.1\n", n_pods + 10),
        &[],
    )
    .expect("nodelet");
    let client = cluster.admin().await.expect("client");
    support::wait_node_ready(&client, "stats").await.expect("nodelet Ready");
    let upstream = if std::env::args().any(|a| a == "--no-upstream") {
        None
    } else {
        let up = UpstreamNode::start(&cluster, &registry, "upstream", n_pods + 10).await.expect("upstream");
        if let Err(e) = support::wait_node_ready(&client, "upstream").await {
            panic!("upstream kubelet not Ready: {e:#}\n{}", up.log_tail(40));
        }
        up.publish_address(&client, "upstream").await.expect("upstream address");
        Some(up)
    };
    let agent = node.pid().expect("nodelet pid");
    let mut peers = vec![Peer {
        label: "nodelet",
        node: "stats",
        port: node.port().expect("nodelet port"),
        daemons: Box::new(move || vec![agent]),
    }];
    if let Some(up) = &upstream {
        peers.push(Peer {
            label: "kubelet + containerd",
            node: "upstream",
            port: up.port(),
            daemons: Box::new(|| up.daemon_pids()),
        });
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let image = registry.reference("busybox", "latest");
    for peer in &peers {
        for i in 0..n_pods {
            let yaml = format!(
                "metadata: {{name: stats-{node}-{i}, labels: {{bench: stats}}}}\nspec:\n  nodeSelector: {{kubernetes.io/hostname: {node}}}\n  terminationGracePeriodSeconds: 0\n  containers:\n  - {{name: main, image: {image}, command: [sleep, '3600']}}\n",
                node = peer.node
            );
            pods.create(&PostParams::default(), &pod(&yaml)).await.expect("create pod");
        }
    }
    let lp = ListParams::default().labels("bench=stats");
    wait_for("every pod Running", Duration::from_secs(900), || async {
        let list = pods.list(&lp).await?.items;
        let running = list.iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
        Ok((running.count() == n_pods * peers.len()).then_some(()))
    })
    .await
    .expect("pods Running");
    // Two housekeeping rounds, so that every pod has a CPU rate.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let cert = cluster.pki().client("bench", "bench", &["system:masters"]).expect("client certificate");

    println!("{n_pods} pods per node (one container each); /stats/summary requested {scrapes} times, one at a time\n");
    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>16} {:>24}",
        "node", "summary p50", "summary p99", "bytes", "CPU per scrape", "idle %core, metrics-srv"
    );
    let mut rows = Vec::new();
    for peer in &peers {
        rows.push(measure_summary(peer, scrapes, &cert).await);
    }
    cluster.start_metrics_server(&address.ip, Duration::from_secs(15)).await.expect("metrics-server");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let start: Vec<f64> = peers.iter().map(Peer::cpu).collect();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let wall = t0.elapsed().as_secs_f64();
    for ((peer, m), c0) in peers.iter().zip(&rows).zip(start) {
        let idle = (peer.cpu() - c0) / wall * 100.0;
        println!(
            "{:<22} {:>10.2}ms {:>10.2}ms {:>12} {:>14.2}ms {:>24.2}",
            peer.label, m.p50_ms, m.p99_ms, m.bytes, m.cpu_ms_per_scrape, idle
        );
    }
    if rows.len() == 2 {
        println!("\nnodelet / upstream summary p50: {:.2}x", rows[0].p50_ms / rows[1].p50_ms);
    }
    // nodelet's own account of its housekeeping rounds (wall time, in its blocking thread).
    let out = std::process::Command::new("curl")
        .args(["-sk", "--cert"])
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key)
        .arg(format!("https://127.0.0.1:{}/metrics", peers[0].port))
        .output()
        .expect("curl /metrics");
    let metrics = String::from_utf8_lossy(&out.stdout);
    let value =
        |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(f64::NAN);
    let (sum, count) =
        (value("nodelet_housekeeping_duration_seconds_sum"), value("nodelet_housekeeping_duration_seconds_count"));
    println!("nodelet housekeeping: {count} rounds, {:.2} ms per round ({n_pods} pods)", sum / count * 1000.0);
    let top = cluster.kubectl().args(["top", "node"]).output().expect("kubectl top");
    println!("\nkubectl top node (through metrics-server):\n{}", String::from_utf8_lossy(&top.stdout));
    drop(peers);
    drop(upstream);
}
