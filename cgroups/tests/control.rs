//! `cgroup.kill`, `cgroup.freeze` and tree removal on a test-owned cgroup in the cgroup2 tree (the unified tree on
//! this hybrid host; the only one in the v2 test VM).

use std::path::PathBuf;
use std::time::Duration;

use nodelet_cgroups::control::{kill_all, populated, remove_tree, set_frozen};

mod support;

fn test_cgroup() -> Option<PathBuf> {
    Some(support::own_unified_cgroup()?.join(format!("nodelet-ctltest-{}", std::process::id())))
}

#[tokio::test]
async fn kill_freeze_and_remove_a_cgroup_tree() {
    let Some(dir) = test_cgroup().filter(|d| std::fs::create_dir(d).is_ok()) else {
        assert!(std::env::var_os("CI").is_none(), "control: needs root and a cgroup2 tree, and CI must run it");
        eprintln!("control: skipped: needs root and a cgroup2 tree");
        return;
    };
    let child = dir.join("ctr");
    std::fs::create_dir(&child).expect("child cgroup");
    // Three processes, one of which forks more: all must die at once.
    let script = format!("echo $$ > {} && (sleep 1000 &) && sleep 1000", child.join("cgroup.procs").display());
    let mut procs: Vec<_> =
        (0..3).map(|_| tokio::process::Command::new("sh").args(["-c", &script]).spawn().expect("spawn")).collect();
    // Each shell moves itself into the cgroup first; once all three are in, whatever they fork is too.
    let shells: Vec<String> = procs.iter().map(|p| p.id().expect("pid").to_string()).collect();
    let mut moved = false;
    for _ in 0..3000 {
        let inside = std::fs::read_to_string(child.join("cgroup.procs")).unwrap_or_default();
        if shells.iter().all(|pid| inside.lines().any(|l| l == pid)) {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(moved, "the test processes did not move into {}", child.display());
    assert!(populated(&dir).unwrap());

    set_frozen(&dir, true, Duration::from_secs(5)).expect("freeze");
    set_frozen(&dir, false, Duration::from_secs(5)).expect("thaw");

    kill_all(&dir).expect("cgroup.kill");
    use std::os::unix::process::ExitStatusExt;
    for p in &mut procs {
        let status = tokio::time::timeout(Duration::from_secs(5), p.wait()).await.expect("killed").expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
    remove_tree(&dir, Duration::from_secs(5)).expect("remove");
    assert!(!dir.exists());
    remove_tree(&dir, Duration::from_secs(1)).expect("removing a missing cgroup is fine");
}
