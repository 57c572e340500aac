//! A memory hog in a test-owned cgroup (below this process's own, never elsewhere) is OOM-killed and the watch
//! reports it. Runs on this hybrid host (v1 memory controller) and, in CI, in the pure cgroup v2 test VM.

use std::time::{Duration, Instant};

use nodelet_cgroups::oom::{MemoryController, OomRecord, OomWatch, read_oom_kills};

mod support;

fn skip_or_fail(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("oom_events: {why}, and CI must run this test");
    }
    eprintln!("oom_events: skipped: {why}");
}

#[tokio::test]
async fn oom_kill_in_a_cgroup_is_reported() {
    let Some((parent, controller)) = support::own_memory_cgroup() else {
        return skip_or_fail("needs root and a memory cgroup");
    };
    let dir = parent.join(format!("nodelet-oomtest-{}", std::process::id()));
    if std::fs::create_dir(&dir).is_err() {
        return skip_or_fail("cannot create a child of this process's memory cgroup");
    }
    support::limit_memory(&dir, controller, 16 << 20).expect("setting the memory limit");
    let mut watch = OomWatch::new(&dir, controller).expect("watch");

    let procs = dir.join("cgroup.procs");
    let script = format!("echo $$ > {} && exec dd if=/dev/zero of=/dev/null bs=64M count=1", procs.display());
    let started = Instant::now();
    let mut hog = tokio::process::Command::new("sh").args(["-c", &script]).spawn().expect("spawning the hog");
    let kills = tokio::time::timeout(Duration::from_secs(20), watch.next()).await;
    let status = hog.wait().await.expect("hog exits");
    let seen_after = started.elapsed();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the hog was not OOM-killed: {status:?}");
    assert_eq!(kills.expect("an OOM event within 20 s").expect("readable"), Some(1));
    let counter = match controller {
        MemoryController::V2 => dir.join("memory.events"),
        MemoryController::V1 => dir.join("memory.oom_control"),
    };
    assert_eq!(read_oom_kills(&counter).expect("counter"), 1);
    eprintln!("oom_events: OOM kill reported {seen_after:?} after the hog started");
    let pressure_dir = match controller {
        MemoryController::V2 => Some(dir.clone()),
        MemoryController::V1 => None,
    };
    let record = OomRecord::capture(&dir, controller, pressure_dir.as_deref(), 1);
    assert_eq!(record.memory_limit_bytes, Some(16 << 20));
    // The peak reached the limit (v2's memory.peak, v1's memory.max_usage_in_bytes; page-rounded).
    assert!(record.memory_peak_bytes.is_some_and(|p| p >= 15 << 20), "{record:?}");
    assert_eq!(record.oom_counters.get("oom_kill"), Some(&1), "{record:?}");
    assert!(!record.memory_stat.is_empty(), "memory.stat captured");
    if controller == MemoryController::V2 {
        assert!(record.pressure.is_some(), "memory.pressure captured on v2");
    }
    let json = serde_json::to_string(&record).expect("records serialise");
    assert!(json.contains("\"oom_kill\":1"));

    for _ in 0..100 {
        if std::fs::remove_dir(&dir).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("test cgroup {} could not be removed", dir.display());
}
