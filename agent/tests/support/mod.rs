//! A nodelet process for end-to-end tests: run as the node of a test [`Cluster`] (or standalone), inside a cgroup
//! sandbox (`integration/scripts/cgroup-sandbox.sh`: every cgroup root it writes to is a test-owned child), with
//! its root dir, pod logs and config in a temp dir. Stopped with SIGTERM on drop; the sandbox is cleaned after.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use nodelet_integration::process::Process;

pub struct Nodelet {
    pub name: String,
    root: PathBuf,
    pub dir: tempfile::TempDir,
    sandbox: String,
    process: Option<Process>,
    args: Vec<String>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/scripts/cgroup-sandbox.sh")
}

impl Nodelet {
    /// Starts nodelet with `args` besides the ones every test needs (root dir, config, node name and IP).
    pub fn start(name: &str, config_yaml: &str, args: &[String]) -> Result<Nodelet> {
        Nodelet::start_in(name, config_yaml, None, args)
    }

    /// Like [`Nodelet::start`] with a given `--root-dir` (prepared by the test, e.g. with imported images).
    pub fn start_with_root(name: &str, config_yaml: &str, root: &Path, args: &[String]) -> Result<Nodelet> {
        Nodelet::start_in(name, config_yaml, Some(root), args)
    }

    fn start_in(name: &str, config_yaml: &str, root: Option<&Path>, args: &[String]) -> Result<Nodelet> {
        let dir = tempfile::Builder::new().prefix("nodelet-e2e-").tempdir()?;
        let root = root.map(Path::to_path_buf).unwrap_or_else(|| dir.path().join("root"));
        let config = dir.path().join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                "kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\npodLogsDir: {}\n{config_yaml}",
                dir.path().join("logs").display()
            ),
        )?;
        let mut all = vec![
            "--root-dir".to_string(),
            root.display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--hostname-override".into(),
            name.into(),
            "--node-ip".into(),
            "127.0.0.1".into(),
        ];
        all.extend(args.iter().cloned());
        let mut n = Nodelet {
            root,
            name: name.into(),
            sandbox: format!("nodelet-e2e-{}-{name}", std::process::id()),
            dir,
            process: None,
            args: all,
        };
        n.restart()?;
        Ok(n)
    }

    /// (Re)starts the process with the same arguments.
    pub fn restart(&mut self) -> Result<()> {
        let mut cmd = Command::new("sh");
        cmd.arg(script()).args(["run", &self.sandbox, "--", env!("CARGO_BIN_EXE_nodelet")]).args(&self.args);
        cmd.env("NODELET_LOG", std::env::var("NODELET_TEST_LOG").unwrap_or_else(|_| "info,kube=warn".into()));
        self.process = Some(Process::spawn(&format!("nodelet-{}", self.name), cmd, self.dir.path())?);
        Ok(())
    }

    /// Stops the process (SIGTERM): containers keep running, as with the kubelet.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// Kills the process with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            // SAFETY: kill(2) on the PID of our own child process, which has not been reaped yet.
            unsafe { libc::kill(p.pid() as i32, libc::SIGKILL) };
            drop(p);
        }
    }

    /// The agent's PID (the sandbox script execs into it).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("nodelet-{}.log", self.name))).unwrap_or_default()
    }

    pub fn ensure_running(&mut self) -> Result<()> {
        match self.process.as_mut() {
            Some(p) => p.ensure_running(),
            None => bail!("nodelet is not running"),
        }
    }

    pub fn pod_logs_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    pub fn root_dir(&self) -> PathBuf {
        self.root.clone()
    }
}

impl Drop for Nodelet {
    fn drop(&mut self) {
        self.stop();
        // Containers outlive the agent by design: kill what is left in the sandbox, then remove it.
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            let dir = Path::new(root).join(&self.sandbox);
            if dir.join("cgroup.kill").exists() {
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            }
        }
        let root = self.root_dir();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            for line in mounts.lines() {
                if let Some(target) = line.split(' ').nth(4).filter(|t| t.starts_with(&*root.to_string_lossy())) {
                    let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        for _ in 0..100 {
            let ok = Command::new("sh")
                .arg(script())
                .args(["clean", &self.sandbox])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("nodelet fixture: cgroup sandbox {} could not be cleaned", self.sandbox);
    }
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() > deadline {
            let detail = last_err.map(|e| format!(" (last error: {e:#})")).unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{detail}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the pod satisfies `f` (given the pod), returning it.
pub async fn wait_pod(
    pods: &Api<Pod>,
    name: &str,
    what: &str,
    timeout: Duration,
    f: impl Fn(&Pod) -> bool,
) -> Result<Pod> {
    let result =
        wait_for(&format!("pod {name}: {what}"), timeout, || async { Ok(pods.get_opt(name).await?.filter(|p| f(p))) })
            .await;
    match result {
        Ok(p) => Ok(p),
        Err(e) => {
            let now = pods.get_opt(name).await.ok().flatten();
            let status = now.and_then(|p| p.status).map(|s| serde_json::to_string_pretty(&s).unwrap_or_default());
            Err(e).with_context(|| format!("its status now: {}", status.unwrap_or_else(|| "<gone>".into())))
        }
    }
}

/// A pod from YAML.
pub fn pod(yaml: &str) -> Pod {
    serde_yaml::from_str(yaml).expect("test pod YAML")
}
