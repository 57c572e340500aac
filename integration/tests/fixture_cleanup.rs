//! Fixtures leave nothing behind: no process, no directory, no mount.

use std::path::Path;

use anyhow::Result;
use nodelet_integration::cluster::Cluster;
use nodelet_integration::registry::Registry;
use nodelet_integration::testbed::{Need, ready};

/// Whether `pid` is still a process (a zombie counts: it would mean nobody reaped it).
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_string_lossy().to_string();
    mountinfo
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&prefix)))
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn dropped_fixtures_leave_no_process_dir_or_mount() -> Result<()> {
    if !ready("dropped_fixtures_leave_no_process_dir_or_mount", &[Need::ControlPlane, Need::Registry]) {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let registry = Registry::start_with_auth("u", "p").await?;
    let mut pids = cluster.pids();
    pids.push(registry.pid());
    let dirs = vec![cluster.dir().to_path_buf(), registry.dir().to_path_buf()];
    assert_eq!(pids.len(), 5, "etcd, apiserver, controller-manager, scheduler, registry");
    assert!(pids.iter().all(|&p| alive(p)));
    assert!(dirs.iter().all(|d| d.is_dir()));

    drop(registry);
    drop(cluster);
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived its fixture");
    }
    for dir in &dirs {
        assert!(!dir.exists(), "{} outlived its fixture", dir.display());
        assert!(mounts_under(dir).is_empty(), "mounts left under {}", dir.display());
    }
    Ok(())
}

#[tokio::test]
async fn a_panicking_test_still_stops_its_fixture() -> Result<()> {
    if !ready("a_panicking_test_still_stops_its_fixture", &[Need::Registry]) {
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = tokio::spawn(async move {
        let registry = Registry::start().await.expect("registry starts");
        tx.send((registry.pid(), registry.dir().to_path_buf())).expect("receiver is alive");
        panic!("deliberate panic with a live fixture");
    })
    .await;
    assert!(result.is_err_and(|e| e.is_panic()));
    let (pid, dir) = rx.recv()?;
    assert!(!alive(pid), "registry {pid} outlived a panicking test");
    assert!(!dir.exists());
    Ok(())
}
