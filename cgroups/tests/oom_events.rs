//! A memory hog in a test-owned cgroup (below this process's own, never elsewhere) is OOM-killed and the watch
//! reports it. Runs on this hybrid host (v1 memory controller) and, in CI, in the pure cgroup v2 test VM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodelet_cgroups::oom::{MemoryController, OomRecord, OomWatch, read_oom_kills};

/// The test's cgroup: a child of this process's own memory cgroup.
fn test_cgroup() -> Option<(PathBuf, MemoryController)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let name = format!("nodelet-oomtest-{}", std::process::id());
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if v2 {
        let mine = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        let parent = Path::new("/sys/fs/cgroup").join(mine.trim_start_matches('/'));
        // Possible where the parent holds no processes or is the root (the test VM).
        let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory");
        Some((parent.join(name), MemoryController::V2))
    } else {
        let mine = own.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))?;
        Some((Path::new("/sys/fs/cgroup/memory").join(mine.trim_start_matches('/')).join(name), MemoryController::V1))
    }
}

fn skip_or_fail(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("oom_events: {why}, and CI must run this test");
    }
    eprintln!("oom_events: skipped: {why}");
}

#[tokio::test]
async fn oom_kill_in_a_cgroup_is_reported() {
    let Some((dir, controller)) = test_cgroup() else { return skip_or_fail("needs root and a memory cgroup") };
    if std::fs::create_dir(&dir).is_err() {
        return skip_or_fail("cannot create a child of this process's memory cgroup");
    }
    let limit = (16u64 << 20).to_string();
    match controller {
        MemoryController::V2 => {
            std::fs::write(dir.join("memory.max"), &limit).expect("memory.max");
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        }
        MemoryController::V1 => {
            std::fs::write(dir.join("memory.limit_in_bytes"), &limit).expect("memory.limit_in_bytes");
            let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), &limit);
        }
    }
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
