//! A kernel PSI trigger on a test-owned cgroup's `cpu.pressure` fires under induced CPU contention (more busy
//! loops than cores). Runs on this hybrid host (unified tree) and, in CI, in the pure cgroup v2 test VM.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nodelet_cgroups::psi::{PressureTrigger, Stall, read};

mod support;

/// A child of this process's own cgroup in the cgroup2 tree.
fn test_cgroup() -> Option<PathBuf> {
    Some(support::own_unified_cgroup()?.join(format!("nodelet-psitest-{}", std::process::id())))
}

#[tokio::test]
async fn cpu_pressure_trigger_fires_under_contention() {
    let Some(dir) = test_cgroup().filter(|d| std::fs::create_dir(d).is_ok()) else {
        if std::env::var_os("CI").is_some() {
            panic!("psi_trigger: needs root and a cgroup2 tree, and CI must run this test");
        }
        eprintln!("psi_trigger: skipped: needs root and a cgroup2 tree");
        return;
    };
    let pressure = dir.join("cpu.pressure");
    assert!(read(&pressure).is_ok(), "no PSI in this kernel ({}): boot with psi=1", pressure.display());
    // 50 ms of stall within any 500 ms window (the kernel's smallest window).
    let mut trigger =
        PressureTrigger::new(&pressure, Stall::Some, Duration::from_millis(50), Duration::from_millis(500))
            .expect("arming the trigger");

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let script = format!("echo $$ > {} && while :; do :; done", dir.join("cgroup.procs").display());
    let started = Instant::now();
    let mut spinners: Vec<_> = (0..cores * 2)
        .map(|_| tokio::process::Command::new("sh").args(["-c", &script]).kill_on_drop(true).spawn().expect("spinner"))
        .collect();
    let fired = tokio::time::timeout(Duration::from_secs(10), trigger.fired()).await;
    let latency = started.elapsed();
    for s in &mut spinners {
        let _ = s.kill().await;
    }
    let after = read(&pressure).expect("reading cpu.pressure");
    for _ in 0..200 {
        if std::fs::remove_dir(&dir).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fired.expect("the trigger fired within 10 s").expect("trigger readable");
    let how = if trigger.is_kernel_trigger() { "kernel trigger" } else { "sampling fallback" };
    eprintln!("psi_trigger: {how} fired {latency:?} after {} busy loops started on {cores} cores", cores * 2);
    assert!(after.some.total_us > 0, "the cgroup recorded no CPU stall: {after:?}");
    assert!(latency < Duration::from_secs(2), "took {latency:?} (500 ms window, 50 ms threshold)");
    assert!(!dir.exists(), "test cgroup {} left behind", dir.display());
}
