//! `cargo bench -p nodelet --bench streaming [-- EXECS] [--mib M] [--no-upstream]`: the kubelet streaming API
//! through the API server, side by side in the same run with its upstream peer (the upstream kubelet on Debian's
//! containerd, `nodelet_integration::upstream`, a second node of the same test control plane), each node measured
//! while the other is idle:
//!
//! - exec round trip: `true` in a running container, EXECS times (default 100) one after another, from the
//!   request to the API server until the exit status arrived and the connection closed; WebSocket
//!   `v5.channel.k8s.io` as kubectl speaks it (a client in this process: kubectl's own start-up is not measured);
//!   for nodelet also its own share, the sessions' durations it logs (from the connection's accept, so its TLS
//!   handshake and authorization included, to the connection's end): the rest is the client's and the API
//!   server's;
//! - port-forward throughput: `kubectl port-forward` to busybox `httpd` in the pod, one GET of an M MiB file
//!   (default 256), MiB/s from the request to the last byte (the file's size is checked).
//!
//! Root. Prints a table.
#![allow(clippy::expect_used)] // a bench: a failed expect is a failed run

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::upstream::UpstreamNode;
use support::{ChildGuard, pod, rank, wait_for, wait_pod};

/// One exec of `true` over WebSocket v5 through the API server: how long until the status and the close came.
async fn exec_true(client: &kube::Client, pod: &str) -> anyhow::Result<Duration> {
    use tokio_tungstenite::tungstenite::{Message, protocol::Role};
    let started = Instant::now();
    let uri = format!("/api/v1/namespaces/default/pods/{pod}/exec?stdout=1&stderr=1&container=main&command=true");
    let request = hyper::Request::get(uri)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", tokio_tungstenite::tungstenite::handshake::client::generate_key())
        .header("Sec-WebSocket-Protocol", "v5.channel.k8s.io")
        .body(kube::client::Body::from(Vec::new()))?;
    let response = client.send(request).await?;
    anyhow::ensure!(response.status() == 101, "exec: {}", response.status());
    let upgraded = hyper::upgrade::on(response).await?;
    let mut ws =
        tokio_tungstenite::WebSocketStream::from_raw_socket(hyper_util::rt::TokioIo::new(upgraded), Role::Client, None)
            .await;
    let mut status = Vec::new();
    while let Some(message) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await? {
        match message? {
            Message::Binary(b) if b.first() == Some(&3) => status.extend_from_slice(&b[1..]),
            Message::Close(_) => break,
            _ => {}
        }
    }
    let status: serde_json::Value = serde_json::from_slice(&status)?;
    anyhow::ensure!(status["status"] == "Success", "exec: {status}");
    Ok(started.elapsed())
}

/// GETs `/big` through `kubectl port-forward` to `pod`: MiB/s.
fn forward_throughput(cluster: &Cluster, pod: &str, mib: usize) -> anyhow::Result<f64> {
    let mut cmd = cluster.kubectl();
    cmd.args(["port-forward", &format!("pod/{pod}"), ":8080"]).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = ChildGuard(cmd.spawn()?);
    let mut lines = BufReader::new(child.0.stdout.take().expect("stdout")).lines();
    let port: u16 = loop {
        let line = lines.next().ok_or_else(|| anyhow::anyhow!("kubectl port-forward ended"))??;
        if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
            break rest.split_whitespace().next().unwrap_or_default().parse()?;
        }
    };
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let started = Instant::now();
    s.write_all(b"GET /big HTTP/1.0\r\n\r\n")?;
    let mut buf = vec![0; 1 << 20];
    let mut total = 0usize;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            n => total += n,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The body and a short header.
    anyhow::ensure!(total >= mib << 20 && total < (mib << 20) + 4096, "port-forward: {total} bytes");
    let _ = child.0.kill();
    Ok(total as f64 / f64::from(1u32 << 20) / elapsed)
}

/// Waits until `name` runs and its file is written (checked through an exec, which also warms the path up).
async fn serving(cluster: &Cluster, pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    let running = |p: &Pod| {
        let statuses = p.status.as_ref().and_then(|s| s.container_statuses.as_ref());
        statuses.is_some_and(|l| l.iter().all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())))
    };
    wait_pod(pods, name, "its container running", Duration::from_secs(120), running).await?;
    wait_for("the file to serve", Duration::from_secs(120), || async {
        let out = cluster.kubectl().args(["exec", name, "--", "ls", "/www/ready"]).output()?;
        Ok(out.status.success().then_some(()))
    })
    .await
}

fn main() {
    // The node logs each streaming session's duration at debug level: its share of the round trip.
    if std::env::var_os("NODELET_TEST_LOG").is_none() {
        // SAFETY: no other thread exists yet (the tokio runtime is built below).
        unsafe {
            std::env::set_var("NODELET_TEST_LOG", "info,kube=warn,libcgroups=error,nodelet::server::streaming=debug")
        };
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio").block_on(bench());
}

/// The durations (ms) of the streaming sessions a node logged, from their connections' accept
/// (`streaming session ended ... since_accept_us=N`).
fn node_sessions(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("streaming session ended"))
        .filter_map(|l| l.split("since_accept_us=").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
        .map(|us| us / 1000.0)
        .collect()
}

async fn bench() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("streaming: needs root");
        std::process::exit(1);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let execs: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(100);
    let mib: usize = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let cluster = Cluster::start().await.expect("control plane (run integration/scripts/setup.sh)");
    let registry = Registry::start().await.expect("registry");
    let (nodelet, _net_d) =
        support::start_cluster_node(&cluster, &registry, "bench", "address: 127.0.0.1\n", &[]).expect("nodelet");
    let client = cluster.admin().await.expect("client");
    let ready = |name: &'static str| support::wait_node_ready(&client, name);
    ready("bench").await.expect("nodelet Ready");
    let mut peers = vec![("nodelet", "bench")];
    let upstream = if args.iter().any(|a| a == "--no-upstream") {
        None
    } else {
        let up = UpstreamNode::start(&cluster, &registry, "upstream", 10).await.expect("upstream");
        if let Err(e) = ready("upstream").await {
            panic!("upstream kubelet not Ready: {e:#}\n{}", up.log_tail(40));
        }
        up.publish_address(&client, "upstream").await.expect("the upstream node's address");
        peers.push(("kubelet + containerd", "upstream"));
        Some(up)
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let image = registry.reference("busybox", "latest");
    let mut failures: Vec<(&&str, String)> = Vec::new();
    for (_, node) in &peers {
        pods.create(&PostParams::default(), &pod(&format!(
            "metadata: {{name: served-{node}}}\nspec:\n  nodeSelector: {{kubernetes.io/hostname: {node}}}\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, 'mkdir -p /www && head -c {} /dev/urandom > /www/big && touch /www/ready && exec httpd -f -p 8080 -h /www']\n",
            mib << 20
        )))
        .await
        .expect("pod");
    }
    let mut rows = Vec::new();
    for (label, node) in &peers {
        let name = format!("served-{node}");
        match serving(&cluster, &pods, &name).await {
            Ok(()) => {}
            // Upstream's runc may fail to start containers in its cgroup sandbox on this hybrid host: say so in
            // its row rather than lose nodelet's.
            Err(e) => {
                let why = format!("{e:#}");
                let line = why.lines().find(|l| l.contains("runc") || l.contains("error")).unwrap_or(&why);
                let why = line.trim().trim_start_matches("\"message\": ").to_string();
                eprintln!("{label}: not measured: {why}");
                failures.push((label, why));
                continue;
            }
        }
        let logged = if *node == "bench" { node_sessions(&nodelet.log()).len() } else { 0 };
        let mut times = Vec::with_capacity(execs);
        for _ in 0..execs {
            times.push(exec_true(&client, &name).await.unwrap_or_else(|e| panic!("{label}: {e:#}")));
        }
        times.sort();
        let ms = |q: f64| times[rank(times.len(), q)].as_secs_f64() * 1000.0;
        // nodelet's share: the sessions it logged during these execs (the upgrade to the connection's end).
        let mut own = if *node == "bench" { node_sessions(&nodelet.log()) } else { Vec::new() };
        own.drain(..logged.min(own.len()));
        own.sort_by(f64::total_cmp);
        let own_p50 = (!own.is_empty()).then(|| own[rank(own.len(), 0.5)]);
        let throughput = forward_throughput(&cluster, &name, mib).unwrap_or_else(|e| panic!("{label}: {e:#}"));
        rows.push((label, ms(0.5), ms(0.99), ms(1.0), throughput, own_p50));
    }
    println!(
        "kubelet streaming API through the API server: exec `true` ×{execs} (WebSocket v5), port-forward GET of {mib} MiB (kubectl)\n"
    );
    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>22} {:>18}",
        "node", "exec p50 ms", "exec p99 ms", "exec max ms", "of which node p50 ms", "port-fwd MiB/s"
    );
    for (label, p50, p99, max, throughput, own) in &rows {
        let own = own.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        println!("{label:<22} {p50:>12.1} {p99:>12.1} {max:>12.1} {own:>22} {throughput:>18.1}");
    }
    for (label, why) in &failures {
        println!("{label:<22} not measured: {why}");
    }
    if let [(_, ours, _, _, our_mib, _), (_, theirs, _, _, their_mib, _)] = rows.as_slice() {
        println!(
            "\nexec p50: {:.2}× upstream's (target ≤ 0.5×); port-forward: {:.2}× upstream's (target ≥ 1×)",
            ours / theirs,
            our_mib / their_mib
        );
    }
    drop(upstream);
}
