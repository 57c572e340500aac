//! `cargo bench -p nodelet-runtime --bench exec [-- RUNS]`: the cost of running another process in a running
//! container, as exec probes and `kubectl exec` do: the latency of one exec of `/bin/true` (start to exit code,
//! each after a pause so that none inherits another's RCU grace period), and the throughput of execs issued 16 at a
//! time for 5 s. Side by side with `crun exec` and `runc exec` on a container each of them runs from the same
//! spec and rootfs. Root; runs in a cgroup sandbox like the tests, state on tmpfs. Prints a table.
#![allow(clippy::expect_used)] // a test: a failed expect is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodelet_runtime::{Container, ContainerConfig, ContainerIo, ExecConfig, Runtime, Zygote};

#[path = "../tests/support/mod.rs"]
mod support;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("exec bench: needs root");
        std::process::exit(1);
    }
    if std::env::var_os(support::SANDBOX_ENV).is_none() {
        std::process::exit(support::rerun_in_sandbox(&args));
    }
    let runs: usize = args.iter().skip(1).find_map(|a| a.parse().ok()).unwrap_or(100);
    let zygote = Zygote::fork().expect("forking the zygote");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");
    rt.block_on(bench(zygote, runs));
}

fn config(rootfs: &Path, id: &str) -> ContainerConfig {
    ContainerConfig {
        id: id.into(),
        rootfs: rootfs.to_path_buf(),
        command: vec!["/bin/sleep".into(), "3600".into()],
        cgroups_path: format!("/nodelet-bench/{id}"),
        ..Default::default()
    }
}

/// A running container of `bin` (crun or runc) from the spec nodelet would use; `None` when it is not installed.
fn cli_container(bin: &str, dir: &Path, rootfs: &Path) -> Option<PathBuf> {
    if !Command::new(bin).arg("--version").output().is_ok_and(|o| o.status.success()) {
        return None;
    }
    let bundle = dir.join(format!("bundle-{bin}"));
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    let spec = nodelet_runtime::spec::build(&config(rootfs, bin)).expect("spec");
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec).expect("json")).expect("config.json");
    let state = dir.join(format!("{bin}-state"));
    let status = Command::new(bin)
        .arg("--root")
        .arg(&state)
        .args(["run", "--detach", "--bundle"])
        .arg(&bundle)
        .arg(bin)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running the CLI");
    assert!(status.success(), "{bin} run --detach failed: {status}");
    Some(state)
}

fn cli_exec(bin: &str, state: &Path) -> Duration {
    let started = Instant::now();
    let status = Command::new(bin)
        .arg("--root")
        .arg(state)
        .args(["exec", bin, "/bin/true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("running the CLI");
    let took = started.elapsed();
    assert!(status.success(), "{bin} exec failed: {status}");
    took
}

fn cli_delete(bin: &str, state: &Path) {
    let _ = Command::new(bin).arg("--root").arg(state).args(["delete", "--force", bin]).status();
}

async fn ours(runtime: &Runtime, c: &Container) -> Duration {
    let started = Instant::now();
    let exec = ExecConfig { args: vec!["/bin/true".into()], ..Default::default() };
    let (code, _) = runtime.exec_sync(c, &exec, Duration::from_secs(30)).await.expect("exec");
    assert_eq!(code, Some(0));
    started.elapsed()
}

/// Execs completed in 5 s with `parallel` issued at a time.
async fn throughput<F, Fut>(parallel: usize, one: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let one = Arc::new(one);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let one = one.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u32;
            while Instant::now() < deadline {
                one().await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    f64::from(total) / 5.0
}

/// The pause before each measured exec (see the lifecycle bench's `settle`).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // Nearest rank, in per mille so that the index is integer arithmetic: ceil(n * q).
    let at = |per_mille: usize| ms(v[(v.len() * per_mille).div_ceil(1000).clamp(1, v.len()) - 1]);
    (at(500), at(990))
}

async fn bench(zygote: Zygote, runs: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    nix::mount::mount(Some("tmpfs"), dir.path(), Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>)
        .expect("tmpfs for the bench's state");
    let rootfs = dir.path().join("rootfs");
    support::busybox_rootfs(&rootfs).expect("rootfs");
    let runtime = Arc::new(Runtime::new(zygote, dir.path().join("state")).expect("runtime"));
    let c = runtime.create(&config(&rootfs, "nodelet"), ContainerIo::default()).await.expect("create");
    runtime.start(&c).await.expect("start");
    let c = Arc::new(c);
    let clis: Vec<(&str, PathBuf)> =
        ["crun", "runc"].into_iter().filter_map(|b| cli_container(b, dir.path(), &rootfs).map(|s| (b, s))).collect();

    let (mut t_ours, mut t_cli) = (Vec::new(), vec![Vec::new(); clis.len()]);
    for i in 0..runs + 5 {
        settle().await;
        let took = ours(&runtime, &c).await;
        let cli: Vec<Duration> = clis
            .iter()
            .map(|(bin, state)| {
                std::thread::sleep(Duration::from_millis(30));
                cli_exec(bin, state)
            })
            .collect();
        if i >= 5 {
            t_ours.push(took);
            for (v, t) in t_cli.iter_mut().zip(cli) {
                v.push(t);
            }
        }
    }
    let rate_ours = {
        let (runtime, c) = (runtime.clone(), c.clone());
        throughput(16, move || {
            let (runtime, c) = (runtime.clone(), c.clone());
            async move {
                ours(&runtime, &c).await;
            }
        })
        .await
    };
    let mut rate_cli = Vec::new();
    for (bin, state) in &clis {
        let (bin, state) = (bin.to_string(), state.clone());
        rate_cli.push(
            throughput(16, move || {
                let (bin, state) = (bin.clone(), state.clone());
                async move {
                    tokio::task::spawn_blocking(move || cli_exec(&bin, &state)).await.expect("cli exec");
                }
            })
            .await,
        );
    }
    for (bin, state) in &clis {
        cli_delete(bin, state);
    }
    runtime.delete(&c).await.expect("delete");

    println!(
        "exec of /bin/true in a running container: {runs} single runs each, interleaved; then 16 at a time for 5 s"
    );
    println!("{:<22} {:>10} {:>10} {:>14}", "runtime", "median ms", "p99 ms", "execs/s (16)");
    let (p50, p99) = stats(t_ours);
    println!("{:<22} {p50:>10.2} {p99:>10.2} {rate_ours:>14.1}", "nodelet (in-process)");
    for (((bin, _), v), rate) in clis.iter().zip(t_cli).zip(rate_cli) {
        let (p50, p99) = stats(v);
        println!("{:<22} {p50:>10.2} {p99:>10.2} {rate:>14.1}", format!("{bin} (CLI)"));
    }
}
