//! Shared by the privileged tests and benchmarks of the runtime (included with `mod support;` /
//! `#[path]`): a cgroup sandbox to run in and a busybox root filesystem.
#![allow(clippy::expect_used)] // a test: a failed expect is a failed test

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// Set inside the sandbox, so that the re-executed binary knows it is there.
pub const SANDBOX_ENV: &str = "NODELET_TEST_CGROUP_SANDBOX";

/// Re-runs this binary inside a cgroup sandbox and removes the sandbox afterwards.
pub fn rerun_in_sandbox(args: &[String]) -> i32 {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/scripts/cgroup-sandbox.sh");
    let name = format!("nodelet-runtime-test-{}", std::process::id());
    let status = std::process::Command::new("sh")
        .arg(&script)
        .args(["run", &name, "--"])
        .args(args)
        .env(SANDBOX_ENV, "1")
        .status()
        .expect("running cgroup-sandbox.sh");
    // Processes of the sandbox that outlived the test are reaped by init asynchronously: retry for a while.
    let mut last = String::new();
    for _ in 0..50 {
        match std::process::Command::new("sh").arg(&script).args(["clean", &name]).output() {
            Ok(o) if o.status.success() && o.stderr.is_empty() => return status.code().unwrap_or(1),
            Ok(o) => last = String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("containers: cgroup sandbox {name} is still populated after the test: {last}");
    1
}

/// A minimal root filesystem: busybox-static with a few applet links, a user `app` (1000) and groups.
pub fn busybox_rootfs(root: &Path) -> Result<()> {
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "data"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("copying /bin/busybox (busybox-static)")?;
    for applet in [
        "sh", "true", "false", "echo", "cat", "sleep", "dd", "touch", "id", "grep", "head", "ls", "kill", "nc", "seq",
        "readlink", "hostname", "awk", "stat", "mknod", "mount", "mkdir", "tty", "wc", "tr",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\nextra:x:2000:app\n")?;
    Ok(())
}
