//! `cargo bench -p nodelet-runtime --bench lifecycle [-- RUNS]`: the time to create, start, wait for and delete
//! a container running `/bin/true`, through nodelet's in-process runtime and through Debian's `crun` and `runc`
//! CLIs on the same bundle (same spec, same rootfs), interleaved so that all three see the same machine, each run
//! after a pause (see `settle`). Root; runs in a cgroup sandbox like the tests, state on tmpfs. Prints a table of
//! median and p99 and the ratio to crun.
#![allow(clippy::expect_used)] // a test: a failed expect is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nodelet_runtime::{ContainerConfig, ContainerIo, Runtime, Zygote};

#[path = "../tests/support/mod.rs"]
mod support;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("lifecycle bench: needs root");
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
        command: vec!["/bin/true".into()],
        cgroups_path: format!("/nodelet-bench/{id}"),
        ..Default::default()
    }
}

/// A bundle for the CLIs with the spec nodelet would use.
fn cli_bundle(dir: &Path, rootfs: &Path, name: &str) -> PathBuf {
    let bundle = dir.join(format!("bundle-{name}"));
    std::fs::create_dir_all(&bundle).expect("bundle dir");
    let spec = nodelet_runtime::spec::build(&config(rootfs, name)).expect("spec");
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec).expect("json")).expect("config.json");
    bundle
}

fn cli_run(bin: &str, state: &Path, bundle: &Path, id: &str) -> Duration {
    let started = Instant::now();
    let status = Command::new(bin)
        .arg("--root")
        .arg(state)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("running the CLI");
    let took = started.elapsed();
    assert!(status.success(), "{bin} run failed: {status}");
    took
}

/// A pause before each measured run, so that none starts within an RCU grace period of the previous one's
/// cgroup moves: a write to `cgroup.procs` waits for a grace period (4-25 ms here when the machine was idle)
/// unless another write happened within the last one, so back to back the runtime measured right after another
/// would get its cgroup moves for free (crun, after nodelet, did in earlier versions of this bench).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| ms(v[rank(v.len(), q)]);
    (p(0.5), p(0.99))
}

async fn bench(zygote: Zygote, runs: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    // Everyone's state (and the rootfs) on tmpfs, as crun's and runc's /run/crun and /run/runc are on usual hosts:
    // on ext4, rewriting a state file starts its writeback at once (auto_da_alloc), in the measured path. The bench
    // runs in its own mount namespace (the cgroup sandbox), so the mount goes with it.
    nix::mount::mount(Some("tmpfs"), dir.path(), Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>)
        .expect("tmpfs for the bench's state");
    let rootfs = dir.path().join("rootfs");
    support::busybox_rootfs(&rootfs).expect("rootfs");
    let runtime = Runtime::new(zygote, dir.path().join("state")).expect("runtime");
    let crun_bundle = cli_bundle(dir.path(), &rootfs, "crun");
    let runc_bundle = cli_bundle(dir.path(), &rootfs, "runc");
    let have = |bin: &str| Command::new(bin).arg("--version").output().is_ok_and(|o| o.status.success());
    let (crun, runc) = (have("crun"), have("runc"));

    let (mut ours, mut crun_t, mut runc_t) = (Vec::new(), Vec::new(), Vec::new());
    let mut phases: Vec<[Duration; 4]> = Vec::new();
    for i in 0..runs + 5 {
        let cfg = config(&rootfs, "nodelet");
        settle().await;
        let started = Instant::now();
        let c = runtime.create(&cfg, ContainerIo::default()).await.expect("create");
        let t_create = started.elapsed();
        runtime.start(&c).await.expect("start");
        let t_start = started.elapsed();
        let exit = runtime.wait(&c).await;
        let t_wait = started.elapsed();
        runtime.delete(&c).await.expect("delete");
        let took = started.elapsed();
        if i >= 5 {
            phases.push([t_create, t_start - t_create, t_wait - t_start, took - t_wait]);
        }
        assert_eq!(exit.code, 0);
        settle().await;
        let crun_took = crun.then(|| cli_run("crun", &dir.path().join("crun-state"), &crun_bundle, "crun"));
        settle().await;
        let runc_took = runc.then(|| cli_run("runc", &dir.path().join("runc-state"), &runc_bundle, "runc"));
        if i >= 5 {
            // The first runs warm caches for everyone.
            ours.push(took);
            crun_t.extend(crun_took);
            runc_t.extend(runc_took);
        }
    }

    println!("create+start+wait+delete of /bin/true, {runs} runs each, interleaved");
    println!("{:<28} {:>10} {:>10} {:>12}", "runtime", "median ms", "p99 ms", "vs crun p50");
    let crun_p50 = (!crun_t.is_empty()).then(|| stats(crun_t.clone()).0);
    for (name, v) in [("nodelet (in-process)", ours), ("crun (CLI)", crun_t), ("runc (CLI)", runc_t)] {
        if v.is_empty() {
            println!("{name:<28} {:>10}", "not installed");
            continue;
        }
        let (p50, p99) = stats(v);
        let ratio = crun_p50.map(|c| format!("{:.2}", p50 / c)).unwrap_or_else(|| "-".into());
        println!("{name:<28} {p50:>10.2} {p99:>10.2} {ratio:>12}");
    }
    let phase = |i: usize| stats(phases.iter().map(|p| p[i]).collect()).0;
    println!(
        "nodelet phases (median ms): create {:.2}, start {:.2}, wait {:.2}, delete {:.2}",
        phase(0),
        phase(1),
        phase(2),
        phase(3)
    );
}

/// The index of the `q` quantile (nearest rank) among `n` sorted samples.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // q is clamped to [0, 1]: 0..=1000 fits
fn rank(n: usize, q: f64) -> usize {
    // Per mille, so the rank is integer arithmetic: ceil(n * q).
    let per_mille = (q.clamp(0.0, 1.0) * 1000.0).round() as usize;
    (n * per_mille).div_ceil(1000).clamp(1, n) - 1
}
