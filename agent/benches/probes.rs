//! `cargo bench -p nodelet --bench probes [-- CONTAINERS] [--seconds S] [--no-upstream] [--http-only]`: the cost
//! of probing. CONTAINERS containers (default 500, ten per pod) each with a 1 s exec readiness probe and a 1 s liveness
//! probe, on one node, for S seconds (default 60) once every pod is Ready. Two scenarios:
//!
//! - `exec + httpGet` (the liveness probe an httpGet to busybox `httpd` in the container, pods on the host
//!   network with a port per container), nodelet only: the bench's pod network is not routable from the host,
//!   where the upstream kubelet's httpGet probes come from;
//! - `exec + exec` (the liveness probe `true`; not with `--http-only`), side by side in the same run with the
//!   upstream kubelet on containerd (`nodelet_integration::upstream`), each node measured while the other is
//!   idle. On this hybrid host upstream's runc fails to start these containers inside its cgroup sandbox ("error
//!   mounting cgroup to rootfs"), so its row says how many pods were Ready after 10 minutes instead of a figure.
//!
//! Measured:
//!
//! - the node software's own CPU (user + system of its long-lived processes: nodelet's agent and zygote; the
//!   kubelet, containerd and the runc shims) as a % of one core;
//! - the machine's CPU outside the pods' cgroups above what it was idle (adds what those processes fork and reap:
//!   runc for upstream, and the control plane's share), as a % of one core;
//! - the exec probes' period drift: each probe appends the kernel's time (`adjtimex`, microseconds) to a file on
//!   a hostPath volume; drift = interval between two runs − period, p50/p99/max over every container;
//! - liveness restarts (0 unless a probe failed);
//! - the kernel's floor (`exec + httpGet` only), its own row: the same load's unavoidable system calls alone, made
//!   by one thread of the bench while the pods still run: per second, one GET to each container's `httpd` (connect,
//!   request, response, close: as upstream's prober, a connection per probe) and one spawn-and-reap of `/bin/true`
//!   (`posix_spawn`, vfork-style as nodelet's zygote, with no namespaces joined) per container, in steps of 10 ms
//!   as nodelet's probe grid. That thread's user + system time is a lower bound for any node's probe cost here:
//!   no scheduling, no IPC, no timers per probe, no status.
//!
//! Root. Prints a table.
#![allow(clippy::expect_used)] // a test: a failed expect is a failed test

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::upstream::UpstreamNode;
use support::{arg_after, pod, process_cpu, rank, wait_for};

const PER_POD: usize = 10;

/// CPU time in seconds.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    /// User + system of the node software's long-lived processes.
    daemons: f64,
    /// Busy time of the whole machine.
    machine: f64,
    /// CPU of the pods' cgroups.
    pods: f64,
}

/// Busy seconds of the machine (every CPU) from `/proc/stat`.
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    busy as f64 / support::ticks_per_second()
}

/// CPU seconds of a cgroup sandbox's pods (v1 cpuacct or v2 cpu.stat).
fn pods_cpu(sandbox: &str) -> f64 {
    let v1 = Path::new("/sys/fs/cgroup/cpu,cpuacct").join(sandbox).join("cpuacct.usage");
    if let Ok(ns) = std::fs::read_to_string(&v1) {
        return ns.trim().parse::<u64>().unwrap_or(0) as f64 / 1e9;
    }
    let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mine = mine.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").trim_end_matches('/').to_string();
    let v2 = PathBuf::from(format!("/sys/fs/cgroup{mine}/{sandbox}/cpu.stat"));
    let stat = std::fs::read_to_string(v2).unwrap_or_default();
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(0.0, |us| us as f64 / 1e6)
}

/// What the liveness probe is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    ExecHttp,
    ExecExec,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::ExecHttp => "exec + httpGet",
            Scenario::ExecExec => "exec + exec",
        }
    }
}

/// Processes left in a cgroup sandbox's tree (its pods' containers).
fn sandbox_procs(sandbox: &str) -> usize {
    fn walk(dir: &Path) -> usize {
        let here = std::fs::read_to_string(dir.join("cgroup.procs")).map_or(0, |p| p.lines().count());
        let children = std::fs::read_dir(dir).into_iter().flatten().flatten().filter(|e| e.path().is_dir());
        here + children.map(|e| walk(&e.path())).sum::<usize>()
    }
    let v1 = Path::new("/sys/fs/cgroup/cpu,cpuacct").join(sandbox);
    if v1.exists() {
        return walk(&v1);
    }
    let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mine = mine.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").trim_end_matches('/').to_string();
    walk(&PathBuf::from(format!("/sys/fs/cgroup{mine}/{sandbox}")))
}

/// One node under test.
struct Peer<'a> {
    label: &'static str,
    node: &'static str,
    sandbox: String,
    /// The node software's long-lived processes now.
    daemons: Box<dyn Fn() -> Vec<u32> + 'a>,
    port_base: usize,
}

impl Peer<'_> {
    fn sample(&self) -> Cpu {
        Cpu {
            daemons: (self.daemons)().into_iter().map(process_cpu).sum(),
            machine: machine_busy(),
            pods: pods_cpu(&self.sandbox),
        }
    }
}

/// What one node measured.
struct Measured {
    daemons_pct: f64,
    outside_pods_pct: f64,
    drift_ms: Vec<f64>,
    restarts: i32,
    /// When every pod was Ready (`None`: not within 10 minutes).
    ready_after: Option<Duration>,
    /// Pods Ready when the measurement started.
    ready_pods: usize,
    /// The kernel's floor of the same load (% of a core), when measured.
    floor_pct: Option<f64>,
}

fn pod_yaml(scenario: Scenario, name: &str, node: &str, log_dir: &Path, port_base: usize) -> String {
    let mut containers = String::new();
    for c in 0..PER_POD {
        let port = port_base + c;
        let (command, liveness) = match scenario {
            Scenario::ExecHttp => (
                format!("mkdir -p /www && echo ok >/www/index.html && exec httpd -f -p {port} -h /www"),
                format!("{{httpGet: {{path: /, port: {port}}}, periodSeconds: 1}}"),
            ),
            Scenario::ExecExec => {
                ("exec sleep 3600".to_string(), "{exec: {command: [true]}, periodSeconds: 1}".to_string())
            }
        };
        containers.push_str(&format!(
            "  - name: c{c}
    image: IMAGE
    imagePullPolicy: IfNotPresent
    command: [sh, -c, '{command}']
    volumeMounts: [{{name: log, mountPath: /log}}]
    readinessProbe: {{exec: {{command: [sh, -c, 'adjtimex >>/log/{name}-c{c}']}}, periodSeconds: 1}}
    livenessProbe: {liveness}
"
        ));
    }
    format!(
        "metadata: {{name: {name}, labels: {{bench: probes}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  hostNetwork: {host_network}
  terminationGracePeriodSeconds: 0
  volumes: [{{name: log, hostPath: {{path: {log}, type: DirectoryOrCreate}}}}]
  containers:
{containers}",
        log = log_dir.display(),
        host_network = scenario == Scenario::ExecHttp,
    )
}

/// The run times (seconds) in an `adjtimex` log, in order.
fn run_times(log: &str) -> Vec<f64> {
    let mut out = Vec::new();
    let mut sec = None;
    for line in log.lines() {
        let value = |l: &str| l.split(':').nth(1).and_then(|v| v.trim().parse::<u64>().ok());
        if line.contains("time.tv_sec:") {
            sec = value(line);
        } else if line.contains("time.tv_usec:")
            && let (Some(s), Some(us)) = (sec.take(), value(line))
        {
            out.push(s as f64 + us as f64 / 1e6);
        }
    }
    out
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

async fn measure(
    pods: &Api<Pod>,
    image: &str,
    (peer, scenario): (&Peer<'_>, Scenario),
    n_pods: usize,
    seconds: u64,
    log_root: &Path,
) -> Measured {
    let log_dir = log_root.join(format!("{}-{scenario:?}", peer.node));
    let t0 = Instant::now();
    for i in 0..n_pods {
        let name = format!("probes-{}-{i}", peer.node);
        let yaml = pod_yaml(scenario, &name, peer.node, &log_dir, peer.port_base + i * PER_POD).replace("IMAGE", image);
        pods.create(&PostParams::default(), &pod(&yaml)).await.expect("create pod");
    }
    let lp = ListParams::default().labels("bench=probes");
    let count_ready = || async {
        let list = pods.list(&lp).await.map(|l| l.items).unwrap_or_default();
        list.iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count()
    };
    // A node that cannot bring every pod Ready in 10 minutes is measured as it is then (the table says so).
    let all_ready = wait_for("every pod Ready", Duration::from_secs(600), || async {
        Ok((count_ready().await == n_pods).then_some(()))
    })
    .await
    .is_ok();
    let ready_after = all_ready.then(|| t0.elapsed());
    let ready_pods = count_ready().await;
    // Let the start-up settle (first runs are jittered into the first period).
    tokio::time::sleep(Duration::from_secs(5)).await;
    eprintln!("{} {}: measuring for {seconds} s", peer.label, scenario.label());
    let (from, start) = (unix_now(), peer.sample());
    let each: Vec<(u32, f64)> = (peer.daemons)().into_iter().map(|p| (p, process_cpu(p))).collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (to, end) = (unix_now(), peer.sample());
    let wall = to - from;
    // Each process's share (stderr): where to look first.
    for (pid, before) in each {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        eprintln!("  {} ({pid}): {:.1}% of a core", comm.trim(), (process_cpu(pid) - before) / wall * 100.0);
    }
    let floor_pct = if scenario == Scenario::ExecHttp {
        eprintln!("the kernel's floor: measuring for {} s", seconds.min(30));
        let ports: Vec<u16> = (0..n_pods * PER_POD).filter_map(|i| u16::try_from(peer.port_base + i).ok()).collect();
        let run = Duration::from_secs(seconds.min(30));
        Some(tokio::task::spawn_blocking(move || floor(&ports, run)).await.expect("floor"))
    } else {
        None
    };
    let mut drift_ms = Vec::new();
    for entry in std::fs::read_dir(&log_dir).expect("probe logs").flatten() {
        let times: Vec<f64> = run_times(&std::fs::read_to_string(entry.path()).unwrap_or_default())
            .into_iter()
            .filter(|t| (from..=to).contains(t))
            .collect();
        drift_ms.extend(times.windows(2).map(|w| (w[1] - w[0] - 1.0) * 1000.0));
    }
    let restarts = pods
        .list(&lp)
        .await
        .expect("list")
        .items
        .iter()
        .flat_map(|p| p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()))
        .map(|c| c.restart_count)
        .sum();
    if restarts > 0 {
        unhealthy_summary(pods).await;
    }
    pods.delete_collection(&DeleteParams::default(), &lp).await.expect("delete");
    wait_for("pods gone", Duration::from_secs(600), || async {
        Ok(pods.list(&lp).await?.items.is_empty().then_some(()))
    })
    .await
    .expect("cleanup");
    // And their processes: the next run is measured on a quiet node.
    wait_for("containers gone", Duration::from_secs(300), || async {
        Ok((sandbox_procs(&peer.sandbox) == 0).then_some(()))
    })
    .await
    .expect("containers gone");
    Measured {
        daemons_pct: (end.daemons - start.daemons) / wall * 100.0,
        outside_pods_pct: ((end.machine - start.machine) - (end.pods - start.pods)) / wall * 100.0,
        drift_ms,
        restarts,
        ready_after,
        ready_pods,
        floor_pct,
    }
}

/// The kernel's floor of the load (see the header), as a % of a core: this thread's CPU while, every second, it
/// GETs each port once and spawns and reaps one process per port, in 10 ms steps.
fn floor(ports: &[u16], run: Duration) -> f64 {
    use std::io::{Read, Write};
    const STEP: Duration = Duration::from_millis(10);
    let per_step = ports.len().div_ceil(100);
    let start = Instant::now();
    let cpu0 = thread_cpu();
    let (mut next, mut i, mut failed) = (start, 0usize, 0usize);
    let mut body = Vec::with_capacity(1024);
    while start.elapsed() < run {
        for _ in 0..per_step {
            let port = ports[i % ports.len()];
            i += 1;
            let request = format!(
                "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\n\
                 Connection: close\r\n\r\n"
            );
            body.clear();
            let ok = std::net::TcpStream::connect(("127.0.0.1", port))
                .and_then(|mut s| s.write_all(request.as_bytes()).and_then(|()| s.read_to_end(&mut body)))
                .is_ok_and(|_| body.starts_with(b"HTTP/1.") && body.get(9..12) == Some(b"200"));
            let spawned = std::process::Command::new("/bin/true").spawn().and_then(|mut c| c.wait());
            failed += usize::from(!ok) + usize::from(!spawned.is_ok_and(|s| s.success()));
        }
        next += STEP;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let (cpu, wall) = (thread_cpu() - cpu0, start.elapsed().as_secs_f64());
    assert!(failed * 100 <= i, "the floor's GETs or spawns failed: {failed} of {}", i * 2);
    cpu / wall * 100.0
}

/// User + system seconds of the calling thread.
fn thread_cpu() -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to that struct; RUSAGE_THREAD has no other precondition.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

#[tokio::main]
async fn main() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("probes: needs root");
        std::process::exit(1);
    }
    let containers: usize = std::env::args().skip(1).take(1).find_map(|a| a.parse().ok()).unwrap_or(500);
    let seconds = arg_after("--seconds").unwrap_or(60);
    let n_pods = containers.div_ceil(PER_POD);
    let cluster = Cluster::start().await.expect("control plane (run integration/scripts/setup.sh)");
    let registry = Registry::start().await.expect("registry");
    let (node, _net_d) = support::start_cluster_node(
        &cluster,
        &registry,
        "probes",
        &format!("maxPods: {}\naddress: 127.0.0.1\n", n_pods + 10),
        &[],
    )
    .expect("nodelet");
    let client = cluster.admin().await.expect("client");
    let ready = |name: &'static str| support::wait_node_ready(&client, name);
    ready("probes").await.expect("nodelet Ready");
    let upstream = if std::env::args().any(|a| a == "--no-upstream") {
        None
    } else {
        let up = UpstreamNode::start(&cluster, &registry, "upstream", n_pods + 10).await.expect("upstream");
        if let Err(e) = ready("upstream").await {
            panic!("upstream kubelet not Ready: {e:#}\n{}", up.log_tail(40));
        }
        Some(up)
    };
    let agent = node.pid().expect("nodelet pid");
    let mut peers = vec![Peer {
        label: "nodelet",
        node: "probes",
        sandbox: node.sandbox().to_string(),
        daemons: Box::new(move || nodelet_daemons(agent)),
        port_base: 20000,
    }];
    if let Some(up) = &upstream {
        peers.push(Peer {
            label: "kubelet + containerd",
            node: "upstream",
            sandbox: up.sandbox().to_string(),
            daemons: Box::new(|| up.daemon_pids()),
            port_base: 21000,
        });
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let image = registry.reference("busybox", "latest");
    let log_root = tempfile::Builder::new().prefix("nodelet-probe-bench-").tempdir().expect("log dir");
    let mut runs = vec![(&peers[0], Scenario::ExecHttp)];
    if !std::env::args().any(|a| a == "--http-only") {
        runs.extend(peers.iter().map(|p| (p, Scenario::ExecExec)));
    }
    // Each row as soon as it is measured: a later run that fails does not lose the earlier ones.
    println!(
        "{} containers ({n_pods} pods), each a 1 s exec readiness probe and a 1 s liveness probe, {seconds} s once \
         all Ready; drift of the exec readiness probes\n",
        n_pods * PER_POD
    );
    println!(
        "{:<22} {:<15} {:>10} {:>14} {:>16} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "node",
        "probes",
        "all Ready",
        "daemons %core",
        "outside pods %",
        "drift p50",
        "drift p99",
        "drift max",
        "runs",
        "restarts"
    );
    for (peer, scenario) in &runs {
        let mut m = measure(&pods, &image, (peer, *scenario), n_pods, seconds, log_root.path()).await;
        m.drift_ms.sort_by(f64::total_cmp);
        let q = |q: f64| m.drift_ms.get(rank(m.drift_ms.len(), q)).copied().unwrap_or(f64::NAN);
        let ready = match m.ready_after {
            Some(t) => format!("{:.1}s", t.as_secs_f64()),
            None => format!("{}/{n_pods} pods", m.ready_pods),
        };
        println!(
            "{:<22} {:<15} {:>10} {:>14.1} {:>16.1} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>9} {:>9}",
            peer.label,
            scenario.label(),
            ready,
            m.daemons_pct,
            m.outside_pods_pct,
            q(0.5),
            q(0.99),
            q(1.0),
            m.drift_ms.len(),
            m.restarts
        );
        if let Some(floor) = m.floor_pct {
            println!("{:<22} {:<15} {:>10} {:>14.1}", "kernel floor", "GET + spawn", "-", floor);
        }
    }
    drop(runs);
    drop(peers);
    drop(upstream);
}

/// Why probes failed (restarts are the bench's failure, not part of its load): the `Unhealthy` events by
/// message (its first 80 characters), most frequent first, on stderr.
async fn unhealthy_summary(pods: &Api<Pod>) {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(pods.clone().into_client(), "default");
    let lp = ListParams::default().fields("reason=Unhealthy");
    let mut counts: std::collections::BTreeMap<String, i32> = Default::default();
    for e in events.list(&lp).await.map(|l| l.items).unwrap_or_default() {
        let message: String = e.message.unwrap_or_default().chars().take(80).collect();
        *counts.entry(message).or_default() += e.count.unwrap_or(1);
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by_key(|(_, n)| -n);
    for (message, n) in counts.iter().take(5) {
        eprintln!("  Unhealthy x{n}: {message}");
    }
}

/// nodelet's long-lived processes: the agent and its zygote.
fn nodelet_daemons(agent: u32) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{agent}/task/{agent}/children")).unwrap_or_default();
    let mut out = vec![agent];
    out.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()).filter(|c| {
        std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|comm| comm.trim() == "nodelet-zygote")
    }));
    out
}
