//! `cargo bench -p nodelet --bench image_pull [-- RUNS]`: cold pull + unpack of the same images from the same
//! local registry, by `nodelet image pull` and by Debian's containerd (`ctr image pull --plain-http`, which
//! fetches and unpacks into its overlayfs snapshotter), interleaved run by run. Each run starts from an empty
//! store: a fresh `--root-dir` for nodelet, a freshly started containerd with an empty root for containerd
//! (daemon start-up is not timed). Root. Prints median / min / max and the ratio to containerd.
#![allow(clippy::expect_used)] // a test: a failed expect is a failed test

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nodelet_integration::registry::Registry;

fn main() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("image_pull bench: needs root");
        std::process::exit(1);
    }
    let runs: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10);
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let registry = rt.block_on(Registry::start()).expect("starting the registry (run integration/scripts/setup.sh)");
    let images = [("agnhost", "2.66.1"), ("busybox", "latest")];
    println!("cold pull + unpack, {runs} runs each, interleaved, registry on loopback\n");
    println!("{:<22} {:>12} {:>12} {:>12} {:>12} {:>10}", "image", "puller", "median ms", "min ms", "max ms", "vs ctr");
    for (name, tag) in images {
        let reference = registry.reference(name, tag);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            ours.push(nodelet_pull(&registry.host(), &reference));
            theirs.push(containerd_pull(&reference));
        }
        let ctr_median = median(&mut theirs);
        for (puller, times) in [("nodelet", &mut ours), ("containerd", &mut theirs)] {
            let m = median(times);
            println!(
                "{:<22} {:>12} {:>12.1} {:>12.1} {:>12.1} {:>9.2}x",
                format!("{name}:{tag}"),
                puller,
                ms(m),
                ms(times[0]),
                ms(*times.last().expect("runs > 0")),
                m.as_secs_f64() / ctr_median.as_secs_f64()
            );
        }
    }
}

fn nodelet_pull(host: &str, reference: &str) -> Duration {
    let root = tempfile::tempdir().expect("tempdir");
    sync();
    let start = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_nodelet"))
        .args(["image", "pull", reference, "--insecure-registry", host, "--root-dir"])
        .arg(root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running nodelet");
    let took = start.elapsed();
    assert!(status.success(), "nodelet image pull {reference} failed");
    took
}

/// A containerd with its own root, state and socket under a temp dir; killed and removed on drop.
struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.toml");
        let d = dir.path().display();
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/ttrpc.sock\"\n"
            ),
        )
        .expect("writing containerd config");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting containerd (apt-get install containerd)");
        let c = Containerd { dir, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Command::new("ctr")
            .args(["--address"])
            .arg(c.socket())
            .arg("version")
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Snapshots are mounted only while containers run; the root is plain files now.
        let _ = std::fs::remove_dir_all(self.dir.path().join("root"));
    }
}

fn containerd_pull(reference: &str) -> Duration {
    let containerd = Containerd::start();
    sync();
    let start = Instant::now();
    let output = Command::new("ctr")
        .arg("--address")
        .arg(containerd.socket())
        .args(["image", "pull", "--plain-http", reference])
        .output()
        .expect("running ctr");
    let took = start.elapsed();
    assert!(output.status.success(), "ctr image pull failed: {}", String::from_utf8_lossy(&output.stderr));
    took
}

/// Both pullers write the same amount; flush dirty pages first so one does not pay for the other's writeback.
fn sync() {
    let _ = Command::new("sync").status();
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
