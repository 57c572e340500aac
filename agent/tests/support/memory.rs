//! Memory pressure on a test node: a pod whose memory grows at a set rate, and what the node's pods' cgroup
//! (`kubepods` in the node's cgroup sandbox) says about it. Shared by the memory eviction test and the ramp bench.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;

/// `MemTotal` of this machine in bytes.
pub fn mem_total() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// The node configuration that leaves the pods `pods_mib` of memory: everything else reserved for the system
/// (`enforceNodeAllocatable: [pods]` limits the pods' cgroup to it), with `memory.available` at `threshold_mib`.
pub fn pods_memory_config(pods_mib: u64, threshold_mib: u64) -> String {
    let reserved = mem_total().saturating_sub(pods_mib << 20);
    format!(
        "address: 127.0.0.1\nnodeStatusUpdateFrequency: 1s\nsystemReserved: {{memory: \"{reserved}\"}}\n\
         evictionHard: {{memory.available: {threshold_mib}Mi, nodefs.available: 2Gi}}\n"
    )
}

/// A BestEffort pod whose memory grows by `chunk_mib` every `every_ms` (a `dd` holding a buffer of that size,
/// blocked on a pipe nobody reads) until SIGTERM, on which it stops. It writes the kernel's uptime when it
/// starts growing and when SIGTERM arrives to `start` and `term` in hostPath `out` (the trap runs between chunks).
pub fn ramp_pod(name: &str, node: &str, image: &str, chunk_mib: u64, every_ms: u64, out: &Path) -> Pod {
    let every = format!("{}.{:03}", every_ms / 1000, every_ms % 1000);
    let script = format!(
        "mark() {{ read up rest < /proc/uptime; echo $up > /out/$1; }}; trap \"mark term; exit 0\" TERM; mark start; \
         while true; do dd if=/dev/zero bs={chunk_mib}M count=1 2>/dev/null | sleep 3600 & sleep {every}; done"
    );
    super::pod(&format!(
        "metadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 30\n  restartPolicy: Never\n  volumes: [{{name: out, hostPath: {{path: {out}}}}}]\n  containers:\n  - name: main\n    image: {image}\n    command: [sh, -c, '{script}']\n    volumeMounts: [{{name: out, mountPath: /out}}]\n",
        out = out.display()
    ))
}

/// A second from the kernel's uptime written by [`ramp_pod`], if it was.
pub fn uptime_mark(out: &Path, name: &str) -> Option<f64> {
    std::fs::read_to_string(out.join(name)).ok()?.trim().parse().ok()
}

/// The pods' cgroup of the node whose agent is `pid`, seen through its mount namespace (whose cgroup roots are
/// its sandbox's): the v1 memory one on hybrid hosts, else cgroup2.
pub fn kubepods(pid: u32) -> PathBuf {
    let root = PathBuf::from(format!("/proc/{pid}/root/sys/fs/cgroup"));
    let v1 = root.join("memory/kubepods");
    if v1.exists() { v1 } else { root.join("kubepods") }
}

/// The OOM kill count of every live cgroup at or below `kubepods` that counts its own: on v2 only `kubepods`
/// itself (its `memory.events` counts its descendants' too), on v1 each cgroup (`memory.oom_control` counts only
/// the processes directly in it; the kernel does not count v1 events upwards).
fn oom_counts(kubepods: &Path, out: &mut HashMap<PathBuf, u64>) {
    let count = |dir: &Path, file: &str| -> u64 {
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    if kubepods.join("memory.events").exists() {
        out.insert(kubepods.to_path_buf(), count(kubepods, "memory.events"));
        return;
    }
    out.insert(kubepods.to_path_buf(), count(kubepods, "memory.oom_control"));
    for entry in std::fs::read_dir(kubepods).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            oom_counts(&entry.path(), out);
        }
    }
}

/// The kernel's OOM kills in the pods' cgroups from its start, read every 20 ms in a thread of its own: a pod's
/// cgroups (and on v1 their counts) go when the pod is torn down, so they are read while they exist, each
/// cgroup's highest count kept. (A kill in the last 20 ms of a cgroup's life can be missed on v1.)
pub struct OomWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<PathBuf, u64>>>,
    start: HashMap<PathBuf, u64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OomWatch {
    pub fn start(kubepods: &Path) -> OomWatch {
        let mut start = HashMap::new();
        oom_counts(kubepods, &mut start);
        let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(start.clone())));
        let (root, stopping, into) = (kubepods.to_path_buf(), stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let mut now = HashMap::new();
                oom_counts(&root, &mut now);
                let mut seen = into.lock().unwrap_or_else(|e| e.into_inner());
                for (path, n) in now {
                    let max = seen.entry(path).or_default();
                    *max = (*max).max(n);
                }
                drop(seen);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        OomWatch { stop, seen, start, thread: Some(thread) }
    }

    /// OOM kills seen since the start.
    pub fn kills(&self) -> u64 {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter().map(|(path, n)| n.saturating_sub(self.start.get(path).copied().unwrap_or(0))).sum()
    }
}

impl Drop for OomWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The pods' cgroup memory limit (v1 `memory.limit_in_bytes`, v2 `memory.max`).
pub fn memory_limit(kubepods: &Path) -> Option<u64> {
    ["memory.limit_in_bytes", "memory.max"]
        .iter()
        .find_map(|f| std::fs::read_to_string(kubepods.join(f)).ok())
        .and_then(|v| v.trim().parse().ok())
}
