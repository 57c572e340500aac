//! `cargo bench -p nodelet --bench eviction_ramp [-- --runs N] [--rate MIB_PER_S]`: memory eviction against the
//! kernel's OOM killer. nodelet is the only node of a real control plane, its pods given 640 MiB (the rest of the
//! machine `systemReserved`; `enforceNodeAllocatable: [pods]` limits the pods' cgroup to it) and upstream's hard
//! threshold (`memory.available` 100Mi, so `allocatableMemory.available` 100Mi too). A BestEffort pod grows its
//! memory at 64 MiB/s, 256 MiB/s and 1 GiB/s (anonymous memory held by `dd`s; no swap: nothing can be reclaimed)
//! and stops when SIGTERM arrives. Measured per run: the time from the start of the ramp to the pod's SIGTERM (as
//! the pod records it) and whether the kernel's OOM killer acted in the pods' cgroup first.
//!
//! Three configurations of the same node, one after the other:
//! - nodelet's memory watch (100 ms, the default) with a pressure stall threshold (`memory.pressure.some`
//!   100ms in 1s) as well;
//! - the memory watch alone;
//! - the watch off (`--eviction-memory-watch 0s`): eviction rounds every 10 s only, upstream's housekeeping
//!   period with `kernelMemcgNotification` off (its default). This stands in for the upstream kubelet, whose
//!   side-by-side node cannot run this scenario here (its runc does not start containers in the test's cgroup
//!   sandbox on this hybrid host; see the probes bench).
//!
//! `-- --guest` runs each node in the pure cgroup v2 QEMU guest instead (1 GiB of memory, `support::guest`),
//! the production hosts' layout: there the pods' cgroup is not limited, the node's `memory.available` (hard
//! threshold 300Mi) is the signal, and OOM kills are counted by the pods' cgroup's `memory.events` (v2 counts
//! every pod below it). The ramp rates are nominal: under QEMU's emulation a `dd` may not reach 1 GiB/s.
//!
//! Root. Prints a table.
#![allow(clippy::expect_used)] // a test: a failed expect is a failed test

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use support::arg_after;
use support::guest::GuestNode;
use support::memory::{OomWatch, kubepods, pods_memory_config, ramp_pod, uptime_mark};

const PODS_MIB: u64 = 640;

/// A ramp speed: MiB/s, and the `dd` chunk and interval that make it.
#[derive(Debug, Clone, Copy)]
struct Ramp {
    mib_per_s: u64,
    chunk_mib: u64,
    every_ms: u64,
}

const RAMPS: [Ramp; 3] = [
    Ramp { mib_per_s: 64, chunk_mib: 8, every_ms: 125 },
    Ramp { mib_per_s: 256, chunk_mib: 32, every_ms: 125 },
    Ramp { mib_per_s: 1024, chunk_mib: 64, every_ms: 62 },
];

/// One run's outcome.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Ramp start to SIGTERM, if SIGTERM came.
    to_sigterm: Option<f64>,
    /// OOM kills in the pods' cgroup during the run.
    oom_kills: u64,
    /// The ramp never started (the pod was refused, or did not run within the run's time).
    no_ramp: bool,
}

/// Where the node runs: on this host (its agent's pid, for its pods' cgroup) or in the cgroup v2 guest.
#[derive(Clone, Copy)]
enum Place<'a> {
    Host { agent: u32, image: &'a str },
    Guest(&'a GuestNode),
}

/// Whether the node reports `MemoryPressure`.
async fn memory_pressure(nodes: &Api<Node>, node: &str) -> anyhow::Result<bool> {
    let status = nodes.get(node).await?.status.unwrap_or_default();
    Ok(status.conditions.unwrap_or_default().iter().any(|c| c.type_ == "MemoryPressure" && c.status == "True"))
}

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

/// One ramp on the running node: the pod is created, followed until it fails (evicted or OOM-killed) or 45 s
/// pass, and deleted.
async fn run_once(pods: &Api<Pod>, node: &str, place: Place<'_>, ramp: Ramp, name: &str) -> anyhow::Result<Run> {
    // Under MemoryPressure a BestEffort pod is refused at admission (upstream's rule): each run waits for the
    // previous run's pressure to clear: the transition period (5 s here) and the next node status (1 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let nodes: Api<Node> = Api::all(pods.clone().into_client());
    let calm = Instant::now();
    while memory_pressure(&nodes, node).await? && calm.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (out, pod, ooms, guest_kills) = match place {
        Place::Host { agent, image } => {
            let out = tempfile::Builder::new().prefix("nodelet-ramp-").tempdir()?;
            let pod = ramp_pod(name, node, image, ramp.chunk_mib, ramp.every_ms, out.path());
            (out, pod, Some(OomWatch::start(&kubepods(agent))), 0)
        }
        Place::Guest(guest) => {
            let out = tempfile::Builder::new().prefix("ramp-").tempdir_in(guest.shared())?;
            let pod = ramp_pod(name, node, support::guest::IMAGE, ramp.chunk_mib, ramp.every_ms, out.path());
            let before = guest.kubepods_memory_events_after(std::time::SystemTime::now()).await?;
            (out, support::guest::local(pod), None, before.get("oom_kill").copied().unwrap_or(0))
        }
    };
    pods.create(&PostParams::default(), &pod).await?;
    let deadline = Instant::now() + Duration::from_secs(45);
    while Instant::now() < deadline {
        if pods.get_opt(name).await?.is_some_and(|p| phase(&p) == "Failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let oom_kills = match (&ooms, place) {
        (Some(ooms), _) => ooms.kills(),
        (None, Place::Guest(guest)) => {
            let after = guest.kubepods_memory_events_after(std::time::SystemTime::now()).await?;
            after.get("oom_kill").copied().unwrap_or(0).saturating_sub(guest_kills)
        }
        (None, Place::Host { .. }) => 0,
    };
    let start = uptime_mark(out.path(), "start");
    let to_sigterm = match (start, uptime_mark(out.path(), "term")) {
        (Some(start), Some(term)) => Some(term - start),
        _ => None,
    };
    pods.delete(name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await?;
    support::wait_for(&format!("{name} deleted"), Duration::from_secs(60), || async {
        Ok(pods.get_opt(name).await?.is_none().then_some(()))
    })
    .await?;
    // Until the pods' memory is back (the deleted pod's cgroup gone); in the guest, its pressure wait does it.
    if let Place::Host { agent, .. } = place {
        let settled = Instant::now();
        while nodelet_cgroups_usage(&kubepods(agent)) > 64 << 20 && settled.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(Run { to_sigterm, oom_kills, no_ramp: start.is_none() })
}

/// The pods' cgroup's memory usage now.
fn nodelet_cgroups_usage(cgroup: &std::path::Path) -> u64 {
    ["memory.usage_in_bytes", "memory.current"]
        .iter()
        .find_map(|f| std::fs::read_to_string(cgroup.join(f)).ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("eviction_ramp: needs root; skipped");
        return Ok(());
    }
    let runs = arg_after("--runs").unwrap_or(3);
    let ramps: Vec<Ramp> = match arg_after("--rate") {
        Some(rate) => RAMPS.iter().copied().filter(|r| r.mib_per_s == rate).collect(),
        None => RAMPS.to_vec(),
    };
    let in_guest = std::env::args().any(|a| a == "--guest");
    let cluster = Cluster::start().await?;
    let registry = Registry::start().await?;
    let image = registry.reference("busybox", "latest");
    let work = tempfile::Builder::new().prefix("nodelet-ramp-image-").tempdir()?;
    let layout = if in_guest { Some(support::busybox_layout(&registry, work.path())?) } else { None };
    let address = if in_guest { Some(support::HostAddress::create("ramp", 249)?) } else { None };
    let configs: [(&str, Vec<String>); 3] = [
        (
            "nodelet: memory watch + PSI",
            vec!["--eviction-pressure-stall".into(), "memory.pressure.some=100ms/1s".into()],
        ),
        ("nodelet: memory watch", vec![]),
        ("10 s rounds (upstream's period)", vec!["--eviction-memory-watch".into(), "0s".into()]),
    ];
    let config = if in_guest {
        "nodeStatusUpdateFrequency: 1s\nevictionHard: {memory.available: 300Mi, nodefs.available: 10%}\n".to_string()
    } else {
        pods_memory_config(PODS_MIB, 100)
    } + "evictionPressureTransitionPeriod: 5s\n";
    let mut rows = Vec::new();
    for (n, (label, extra)) in configs.iter().enumerate() {
        // A node of its own per configuration (its own sandbox and Node object).
        let name = format!("nodelet-ramp-{n}");
        let (host_node, guest_node) = match (&layout, &address) {
            (Some(layout), Some(address)) => {
                let port = nodelet_integration::ports::free_port()?;
                let guest = GuestNode::start(&cluster, &name, (&address.ip, port), 1024, layout, &config, extra)?;
                (None, Some(guest))
            }
            _ => (Some(support::start_cluster_node(&cluster, &registry, &name, &config, extra)?), None),
        };
        let place = match (&host_node, &guest_node) {
            (Some((node, _)), _) => Place::Host { agent: node.pid().expect("the agent runs"), image: &image },
            (None, Some(guest)) => Place::Guest(guest),
            (None, None) => unreachable!("one of the two was started"),
        };
        let client = cluster.admin().await?;
        support::wait_node_ready(&client, &name).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        for ramp in &ramps {
            let mut results = Vec::new();
            for i in 0..runs {
                let pod = format!("ramp-{}-{i}", ramp.mib_per_s);
                results.push(run_once(&pods, &name, place, *ramp, &pod).await?);
            }
            rows.push((*label, *ramp, results));
        }
        drop(host_node);
        drop(guest_node);
    }
    if in_guest {
        println!(
            "\nmemory ramp in a BestEffort pod, pure cgroup v2 guest of 1 GiB, memory.available 300Mi; {runs} runs each"
        );
    } else {
        println!(
            "\nmemory ramp in a BestEffort pod, pods limited to {PODS_MIB} MiB, hard threshold 100Mi; {runs} runs each"
        );
    }
    println!(
        "{:<34} {:>10} {:>16} {:>16} {:>18} {:>10} {:>8}",
        "configuration", "ramp", "SIGTERM p50", "SIGTERM max", "evicted before OOM", "OOM kills", "no ramp"
    );
    for (label, ramp, results) in rows {
        let mut times: Vec<f64> = results.iter().filter_map(|r| r.to_sigterm).collect();
        times.sort_by(f64::total_cmp);
        let cell = |t: Option<&f64>| t.map_or("-".to_string(), |t| format!("{t:.2} s"));
        let first = results.iter().filter(|r| r.to_sigterm.is_some() && r.oom_kills == 0).count();
        let kills: u64 = results.iter().map(|r| r.oom_kills).sum();
        let no_ramp = results.iter().filter(|r| r.no_ramp).count();
        println!(
            "{:<34} {:>10} {:>16} {:>16} {:>18} {:>10} {:>8}",
            label,
            format!("{} MiB/s", ramp.mib_per_s),
            cell(times.get(support::rank(times.len(), 0.5))),
            cell(times.last()),
            format!("{first}/{}", results.len()),
            kills,
            no_ramp
        );
    }
    Ok(())
}
