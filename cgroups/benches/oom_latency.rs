//! `cargo bench -p nodelet-cgroups --bench oom_latency [-- RUNS] [--tracefs]`: how long after the kernel's OOM
//! kill an [`OomWatch`] subscriber hears of it. The kill time is the kernel's own: by default the timestamp of
//! its "Killed process <pid>" line in `/dev/kmsg` (on this host the log clock is CLOCK_MONOTONIC); with
//! `--tracefs`, the `oom:mark_victim` tracepoint with the trace clock set to `mono` (mounts tracefs if needed:
//! meant for the throwaway cgroup v2 VM, whose printk clock is not CLOCK_MONOTONIC). Root; test cgroups are
//! children of this process's own. Also counts how often the OOM event arrived before the process's exit was
//! observed (what makes `OOMKilled` race-free). Prints a table.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::time::Duration;

use nodelet_cgroups::oom::{MemoryController, OomWatch};

#[path = "../tests/support/mod.rs"]
mod support;

fn monotonic_us() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec().unsigned_abs() * 1_000_000 + t.tv_nsec().unsigned_abs() / 1_000
}

/// The timestamp (µs since boot, kernel log clock) of the next kernel log line containing `needle`.
fn find_line(kmsg: &mut BufReader<std::fs::File>, needle: &str) -> Option<u64> {
    let mut line = String::new();
    for _ in 0..10_000 {
        line.clear();
        match kmsg.read_line(&mut line) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue, // overwritten records
            Err(_) => return None,
        }
        if line.contains(needle) {
            return line.split(';').next()?.split(',').nth(2)?.parse().ok();
        }
    }
    None
}

/// The `oom:mark_victim` tracepoint on the CLOCK_MONOTONIC trace clock.
struct Tracer {
    dir: std::path::PathBuf,
    trace: std::fs::File,
    pending: String,
}

impl Tracer {
    fn start() -> Tracer {
        let dir = std::path::PathBuf::from("/sys/kernel/tracing");
        if !dir.join("trace_clock").exists() {
            let status = std::process::Command::new("mount").args(["-t", "tracefs", "tracefs"]).arg(&dir).status();
            assert!(status.is_ok_and(|s| s.success()), "mounting tracefs");
        }
        std::fs::write(dir.join("trace_clock"), "mono").expect("trace_clock mono");
        std::fs::write(dir.join("trace"), "").expect("clearing the trace");
        std::fs::write(dir.join("events/oom/mark_victim/enable"), "1").expect("enabling oom:mark_victim");
        let trace = std::fs::File::open(dir.join("trace_pipe")).expect("trace_pipe");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&trace);
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).expect("nonblocking");
        Tracer { dir, trace, pending: String::new() }
    }

    /// The kill time (µs, CLOCK_MONOTONIC) of `pid`, waiting up to a second for the record.
    fn kill_time(&mut self, pid: u32) -> Option<u64> {
        use std::io::Read;
        let needle = format!("mark_victim: pid={pid}");
        for _ in 0..100 {
            let mut buf = [0u8; 8192];
            match self.trace.read(&mut buf) {
                Ok(n) if n > 0 => self.pending.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
            // `pid=12` must not match `pid=123`.
            let is_victim = |l: &&str| {
                l.split_once(&needle).is_some_and(|(_, rest)| !rest.starts_with(|c: char| c.is_ascii_digit()))
            };
            if let Some(line) = self.pending.lines().find(is_victim) {
                // "<task>-<pid> [cpu] flags 123.456789: mark_victim: pid=..."
                let stamp = line.split(": mark_victim").next()?.rsplit(' ').next()?;
                let (secs, micros) = stamp.split_once('.')?;
                let at = secs.parse::<u64>().ok()? * 1_000_000 + micros.parse::<u64>().ok()?;
                self.pending.clear();
                return Some(at);
            }
        }
        None
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("events/oom/mark_victim/enable"), "0");
        let _ = std::fs::write(self.dir.join("trace_clock"), "local");
    }
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    sorted[rank(sorted.len(), q)] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("oom_latency: needs root");
        std::process::exit(1);
    }
    let runs: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(50);
    let mut tracer = std::env::args().any(|a| a == "--tracefs").then(Tracer::start);
    let (parent, controller) = support::own_memory_cgroup().expect("a memory cgroup of our own");
    let mut kmsg = std::fs::File::open("/dev/kmsg").expect("/dev/kmsg");
    kmsg.seek(SeekFrom::End(0)).expect("seek /dev/kmsg");
    let mut kmsg = BufReader::new(kmsg);
    let (mut pairs, mut before_exit) = (Vec::new(), 0);
    for i in 0..runs {
        let dir = parent.join(format!("nodelet-oombench-{}-{i}", std::process::id()));
        std::fs::create_dir(&dir).expect("test cgroup");
        support::limit_memory(&dir, controller, 16 << 20).expect("memory limit");
        let mut watch = OomWatch::new(&dir, controller).expect("watch");
        let script = format!(
            "echo $$ > {} && exec dd if=/dev/zero of=/dev/null bs=64M count=1",
            dir.join("cgroup.procs").display()
        );
        let mut hog = tokio::process::Command::new("sh").args(["-c", &script]).spawn().expect("hog");
        let pid = hog.id().expect("pid");
        let mut exited_first = false;
        let event_at = tokio::select! {
            biased;
            r = watch.next() => { r.expect("watch").expect("event"); monotonic_us() }
            _ = hog.wait() => {
                exited_first = true;
                tokio::time::timeout(Duration::from_secs(5), watch.next()).await.expect("event").expect("watch");
                monotonic_us()
            }
        };
        let _ = hog.wait().await;
        if !exited_first {
            before_exit += 1;
        }
        let killed_at = match tracer.as_mut() {
            Some(t) => t.kill_time(pid),
            None => find_line(&mut kmsg, &format!("Killed process {pid} ")),
        };
        if let Some(killed_at) = killed_at {
            pairs.push((event_at, killed_at));
        }
        for _ in 0..200 {
            if std::fs::remove_dir(&dir).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // The kernel log's clock (local_clock) matches CLOCK_MONOTONIC on this host; in a TCG guest it runs ahead,
    // and a kill that seems to come after its own event is reported as a clock mismatch instead of a number.
    let mut latencies: Vec<u64> =
        pairs.iter().filter(|(event_at, killed_at)| event_at >= killed_at).map(|(e, k)| e - k).collect();
    let mismatched = pairs.len() - latencies.len();
    if mismatched > 0 {
        println!("oom_latency: {mismatched} kills logged after their event: kernel log clock != CLOCK_MONOTONIC here");
    }
    latencies.sort_unstable();
    let layout = match controller {
        MemoryController::V2 => "cgroup v2 (memory.events, inotify)",
        MemoryController::V1 => "cgroup v1 memory (oom_control, eventfd)",
    };
    let source = if tracer.is_some() { "oom:mark_victim (tracefs, mono clock)" } else { "/dev/kmsg" };
    println!("OOM kill -> subscriber, {} of {runs} kills matched in {source}, {layout}", latencies.len());
    println!("{:<12} {:>10} {:>10} {:>10} {:>18}", "", "median ms", "p99 ms", "max ms", "event before exit");
    if latencies.is_empty() {
        println!("{:<12} {:>10} {:>10} {:>10} {:>15}/{runs}", "nodelet", "-", "-", "-", before_exit);
        return;
    }
    println!(
        "{:<12} {:>10.3} {:>10.3} {:>10.3} {:>15}/{runs}",
        "nodelet",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        *latencies.last().unwrap() as f64 / 1000.0,
        before_exit
    );
}

/// The index of the `q` quantile (nearest rank) among `n` sorted samples.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // q is clamped to [0, 1]: 0..=1000 fits
fn rank(n: usize, q: f64) -> usize {
    // Per mille, so the rank is integer arithmetic: ceil(n * q).
    let per_mille = (q.clamp(0.0, 1.0) * 1000.0).round() as usize;
    (n * per_mille).div_ceil(1000).clamp(1, n) - 1
}
