//! The kubepods tree on disk with limits, read back from the kernel's files; usage stats of a real workload,
//! consistent between a container and its pod; freezing (cgroup2 and the v1 freezer); pod removal. Runs on this
//! hybrid host (v1 controllers + unified tree) and in the pure cgroup v2 VM, each below this process's own
//! cgroups.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nodelet_cgroups::hierarchy::{Allocatable, Hierarchy, V1};
use nodelet_cgroups::qos::{PodLimits, QosClass, shares_to_weight};
use nodelet_cgroups::stats::cgroup_stats;

mod support;

/// A hierarchy rooted at `nodelet-hier-<pid>` below this process's cgroups in every hierarchy.
fn test_hierarchy() -> Option<(Hierarchy, Vec<PathBuf>)> {
    let name = format!("nodelet-hier-{}", std::process::id());
    let unified_parent = support::own_unified_cgroup()?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut roots = vec![unified_parent.join(&name)];
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        // Pure v2: the parent must delegate the controllers (the VM runs tests in the root cgroup).
        std::fs::write(unified_parent.join("cgroup.subtree_control"), "+cpu +memory +pids").ok()?;
        return Some((Hierarchy::with_roots(roots[0].clone(), Vec::new()), roots));
    }
    let mut v1 = Vec::new();
    for controller in V1::ALL {
        let mine = own.lines().find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let (names, path) = rest.split_once(':')?;
            names.split(',').any(|n| n == controller.name()).then(|| path.trim_start_matches('/').to_string())
        })?;
        let root = Path::new("/sys/fs/cgroup").join(controller.name()).join(mine).join(&name);
        roots.push(root.clone());
        v1.push((controller, root));
    }
    Some((Hierarchy::with_roots(roots[0].clone(), v1), roots))
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().to_string()
}

/// A shell moved into `rel` before it runs `workload` (it waits for a line on stdin).
fn spawn_in(h: &Hierarchy, rel: &str, workload: &str) -> Child {
    let mut child = Command::new("sh")
        .args(["-c", &format!("read go; {workload}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    h.attach(rel, child.id()).expect("attach");
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    child
}

#[test]
fn kubepods_tree_limits_stats_freeze_and_removal() {
    let Some((h, roots)) = test_hierarchy() else {
        assert!(std::env::var_os("CI").is_none(), "hierarchy: needs root and cgroups, and CI must run it");
        eprintln!("hierarchy: skipped: needs root and cgroups");
        return;
    };
    let result = std::panic::catch_unwind(|| run(&h));
    for root in roots.iter().rev() {
        let _ = nodelet_cgroups::control::remove_tree(root, Duration::from_secs(5));
    }
    for root in &roots {
        assert!(!root.exists(), "{} was left behind", root.display());
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn run(h: &Hierarchy) {
    eprintln!("hierarchy: {}", if h.is_v2() { "pure cgroup v2" } else { "hybrid: v1 controllers + unified tree" });
    h.ensure_node(Allocatable { cpu_millis: 1500, memory_bytes: 512 << 20, pids: Some(1000) }).unwrap();
    let limits = PodLimits { cpu_shares: 256, cpu_quota_us: Some(25_000), memory_limit_bytes: Some(64 << 20) };
    let guaranteed = h.ensure_pod(QosClass::Guaranteed, "g1", &limits, None).unwrap();
    assert_eq!(guaranteed, "kubepods/podg1");
    let open = PodLimits { cpu_shares: 102, cpu_quota_us: None, memory_limit_bytes: None };
    let burstable = h.ensure_pod(QosClass::Burstable, "b1", &open, Some(100)).unwrap();
    h.update_burstable(100).unwrap();

    if h.is_v2() {
        let u = |rel: &str, file: &str| read(h.unified(rel).join(file));
        assert_eq!(u("kubepods", "cpu.weight"), shares_to_weight(1536).to_string());
        assert_eq!(u("kubepods", "memory.max"), (512u64 << 20).to_string());
        assert_eq!(u("kubepods", "pids.max"), "1000");
        assert_eq!(u("kubepods/besteffort", "cpu.weight"), "1");
        assert_eq!(u("kubepods/burstable", "cpu.weight"), shares_to_weight(102).to_string());
        assert_eq!(u(&guaranteed, "cpu.max"), "25000 100000");
        assert_eq!(u(&guaranteed, "memory.max"), (64u64 << 20).to_string());
        assert_eq!(u(&guaranteed, "cpu.weight"), shares_to_weight(256).to_string());
        assert_eq!(u(&burstable, "cpu.max"), "max 100000");
        assert_eq!(u(&burstable, "memory.max"), "max");
        assert_eq!(u(&burstable, "pids.max"), "100");
    } else {
        let v = |c: V1, rel: &str, file: &str| read(h.v1(c, rel).unwrap().join(file));
        assert_eq!(v(V1::Cpu, "kubepods", "cpu.shares"), "1536");
        assert_eq!(v(V1::Memory, "kubepods", "memory.limit_in_bytes"), (512u64 << 20).to_string());
        assert_eq!(v(V1::Pids, "kubepods", "pids.max"), "1000");
        assert_eq!(v(V1::Cpu, "kubepods/besteffort", "cpu.shares"), "2");
        assert_eq!(v(V1::Cpu, "kubepods/burstable", "cpu.shares"), "102");
        assert_eq!(v(V1::Cpu, &guaranteed, "cpu.cfs_quota_us"), "25000");
        assert_eq!(v(V1::Cpu, &guaranteed, "cpu.cfs_period_us"), "100000");
        assert_eq!(v(V1::Memory, &guaranteed, "memory.limit_in_bytes"), (64u64 << 20).to_string());
        assert_eq!(v(V1::Cpu, &burstable, "cpu.cfs_quota_us"), "-1");
        assert_eq!(v(V1::Pids, &burstable, "pids.max"), "100");
        // The same paths exist in the unified tree for PSI, events and kill.
        assert!(h.unified(&burstable).join("cgroup.events").exists());
    }

    // A container in the burstable pod holding 32 MiB and burning some CPU.
    let ctr = format!("{burstable}/ctr");
    h.create(&ctr).unwrap();
    let mut hog =
        spawn_in(h, &ctr, "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; dd if=/dev/zero bs=32M count=1 | sleep 60");
    let mut stats = cgroup_stats(h, &ctr).unwrap();
    for _ in 0..500 {
        if stats.memory_rss_bytes >= 32 << 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        stats = cgroup_stats(h, &ctr).unwrap();
    }
    assert!(stats.memory_rss_bytes >= 32 << 20, "{stats:?}");
    assert!(stats.memory_usage_bytes >= stats.memory_working_set_bytes, "{stats:?}");
    assert!(stats.memory_working_set_bytes >= 32 << 20, "{stats:?}");
    // The cheap read the eviction manager's memory watch makes agrees with the full one (the kubepods one too).
    let working_set = nodelet_cgroups::stats::memory_working_set(h, &ctr).unwrap();
    assert!(working_set >= 32 << 20 && working_set <= stats.memory_usage_bytes + (8 << 20), "{working_set}");
    assert!(nodelet_cgroups::stats::memory_working_set(h, "kubepods").unwrap() >= working_set);
    assert!(stats.cpu_usage_ns > 0 && stats.page_faults > 0, "{stats:?}");
    assert!(stats.pids >= 3, "sh, dd and sleep: {stats:?}");
    let pod = cgroup_stats(h, &burstable).unwrap();
    assert!(pod.cpu_usage_ns >= stats.cpu_usage_ns, "pod {pod:?} vs container {stats:?}");
    assert!(pod.memory_usage_bytes >= stats.memory_usage_bytes, "pod {pod:?} vs container {stats:?}");
    assert!(pod.pids >= stats.pids);
    assert_eq!(stats.oom_kills, 0, "{stats:?}");
    assert_eq!(pod.memory_limit_bytes, None, "the burstable pod has no memory limit");
    assert_eq!(cgroup_stats(h, &guaranteed).unwrap().memory_limit_bytes, Some(64 << 20));
    // PSI from the cgroup2 directory (on hybrid hosts too), and where its processes are listed.
    let pressure = nodelet_cgroups::stats::cgroup_pressure(h, &ctr).expect("PSI files of the container's cgroup");
    assert!(pressure.cpu.some.avg10 >= 0.0 && pressure.memory.full.total_us <= pressure.memory.some.total_us);
    assert!(nodelet_cgroups::stats::node_pressure().is_some(), "/proc/pressure");
    let procs = read(h.procs_dir(&ctr).join("cgroup.procs"));
    assert!(procs.lines().any(|p| p == hog.id().to_string()), "{procs}");
    if h.is_v2() {
        h.set_oom_group(&ctr, true).unwrap();
        assert_eq!(read(h.unified(&ctr).join("memory.oom.group")), "1");
    }

    // Freezing stops a busy loop: no CPU time while frozen, some again after thawing.
    let mut spinner = spawn_in(h, &guaranteed, "while :; do :; done");
    std::thread::sleep(Duration::from_millis(100));
    let frozen_cpu = |freeze: &dyn Fn(bool)| {
        freeze(true);
        let before = cgroup_stats(h, &guaranteed).unwrap().cpu_usage_ns;
        std::thread::sleep(Duration::from_millis(300));
        let during = cgroup_stats(h, &guaranteed).unwrap().cpu_usage_ns;
        freeze(false);
        std::thread::sleep(Duration::from_millis(300));
        let after = cgroup_stats(h, &guaranteed).unwrap().cpu_usage_ns;
        (during - before, after - during)
    };
    let (frozen, thawed) = frozen_cpu(&|f| h.set_frozen(&guaranteed, f, Duration::from_secs(5)).unwrap());
    assert!(frozen < 5_000_000 && thawed > 50_000_000, "cgroup.freeze: {frozen} ns frozen, {thawed} ns thawed");
    if let Some(dir) = h.v1(V1::Freezer, &guaranteed) {
        let v1 = |f| nodelet_cgroups::control::set_frozen_v1(&dir, f, Duration::from_secs(5)).unwrap();
        let (frozen, thawed) = frozen_cpu(&v1);
        assert!(frozen < 5_000_000 && thawed > 50_000_000, "v1 freezer: {frozen} ns frozen, {thawed} ns thawed");
    }

    // Removing the pods kills what is left and removes the cgroups everywhere.
    h.remove_pod(QosClass::Burstable, "b1", Duration::from_secs(5)).unwrap();
    h.remove_pod(QosClass::Guaranteed, "g1", Duration::from_secs(5)).unwrap();
    for child in [&mut hog, &mut spinner] {
        let status = child.wait().unwrap();
        assert!(!status.success(), "killed with the pod");
    }
    assert!(!h.unified(&burstable).exists() && !h.unified(&guaranteed).exists());
    if let Some(dir) = h.v1(V1::Memory, &burstable) {
        assert!(!dir.exists());
    }
}
