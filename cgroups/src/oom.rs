//! OOM kills as they happen, per cgroup: on cgroup v2 an inotify watch on `memory.events` (counting `oom_kill`,
//! which, unlike `oom`, only moves when the kernel killed something); on v1 (hybrid hosts) an eventfd registered
//! through `cgroup.event_control` for `memory.oom_control`, whose `oom_kill` counter is then read.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// The memory controller's flavour of a cgroup directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryController {
    /// cgroup v2 (`memory.events`).
    V2,
    /// cgroup v1 (`memory.oom_control`, `cgroup.event_control`).
    V1,
}

/// Why a watch could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum OomError {
    /// A cgroup file could not be opened, written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was attempted.
        what: &'static str,
        /// errno.
        source: nix::Error,
    },
}

enum Source {
    Inotify(AsyncFd<OwnedFd>),
    EventFd(AsyncFd<OwnedFd>, #[allow(dead_code)] File),
}

/// Watches one cgroup for OOM kills.
pub struct OomWatch {
    source: Source,
    counter_file: PathBuf,
    seen: u64,
}

impl std::fmt::Debug for OomWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OomWatch").field("counter_file", &self.counter_file).field("seen", &self.seen).finish()
    }
}

/// Registers a descriptor with tokio's reactor.
fn async_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor for its whole life, so it stays open and unchanged.
    unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::other)
}

/// The `oom_kill` count in a `memory.events` or `memory.oom_control` file (0 when absent).
pub fn read_oom_kills(file: &Path) -> Result<u64, OomError> {
    let text = std::fs::read_to_string(file).map_err(|source| OomError::Io { path: file.into(), source })?;
    Ok(text.lines().find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok()).unwrap_or(0))
}

impl OomWatch {
    /// Starts watching the memory cgroup directory `dir`. Kills that happened before are not reported.
    pub fn new(dir: &Path, controller: MemoryController) -> Result<Self, OomError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OomError::Io { path, source }
        };
        let (source, counter_file) = match controller {
            MemoryController::V2 => {
                let file = dir.join("memory.events");
                let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
                    .map_err(|source| OomError::Sys { what: "inotify_init", source })?;
                ino.add_watch(&file, AddWatchFlags::IN_MODIFY)
                    .map_err(|source| OomError::Sys { what: "inotify_add_watch", source })?;
                let owned = ino.as_fd().try_clone_to_owned().map_err(io(&file))?;
                (Source::Inotify(async_fd(owned).map_err(io(&file))?), file)
            }
            MemoryController::V1 => {
                let file = dir.join("memory.oom_control");
                let control = File::open(&file).map_err(io(&file))?;
                let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .map_err(|source| OomError::Sys { what: "eventfd", source })?;
                let registration = format!("{} {}", efd.as_fd().as_raw_fd(), control.as_raw_fd());
                let event_control = dir.join("cgroup.event_control");
                std::fs::write(&event_control, registration).map_err(io(&event_control))?;
                (Source::EventFd(async_fd(OwnedFd::from(efd)).map_err(io(&file))?, control), file)
            }
        };
        let seen = read_oom_kills(&counter_file)?;
        Ok(Self { source, counter_file, seen })
    }

    /// Waits for the next OOM kill(s) and returns how many processes were killed since the last call; `None` once
    /// the cgroup is gone.
    pub async fn next(&mut self) -> Result<Option<u64>, OomError> {
        loop {
            let fd = match &self.source {
                Source::Inotify(fd) | Source::EventFd(fd, _) => fd,
            };
            let mut guard =
                fd.readable().await.map_err(|source| OomError::Io { path: self.counter_file.clone(), source })?;
            // Drain the notification (inotify events or the eventfd counter); what matters is the kill counter.
            let mut buf = [0u8; 4096];
            match nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf) {
                Err(nix::Error::EAGAIN) => {
                    guard.clear_ready();
                    continue;
                }
                Err(source) => return Err(OomError::Sys { what: "read", source }),
                Ok(_) => {}
            }
            // v1 notifies when the OOM starts, a moment before the victim is chosen and the counter moves:
            // look again for a little while (v2 notifies after the counter changed, so the first read hits).
            for attempt in 0..100u64 {
                let kills = match read_oom_kills(&self.counter_file) {
                    Ok(k) => k,
                    // The cgroup was removed (v1 signals that on the eventfd, v2 with IN_IGNORED).
                    Err(OomError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                };
                if kills > self.seen {
                    let new = kills - self.seen;
                    self.seen = kills;
                    return Ok(Some(new));
                }
                tokio::time::sleep(std::time::Duration::from_micros(100 * attempt.min(10))).await;
            }
        }
    }
}

/// What a cgroup looked like right after an OOM kill, for people studying OOM: limit, `memory.stat`, the OOM
/// counters and the cgroup's memory pressure (whose averages still cover the stall that led to the kill).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OomRecord {
    /// The memory cgroup directory.
    pub cgroup: PathBuf,
    /// When it was captured, ms since the Unix epoch.
    pub captured_at_ms: u128,
    /// Processes killed in this event.
    pub kills: u64,
    /// The memory limit (`memory.max` / `memory.limit_in_bytes`); `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// The highest usage the cgroup reached (`memory.peak` / `memory.max_usage_in_bytes`), where the kernel
    /// keeps it.
    #[serde(default)]
    pub memory_peak_bytes: Option<u64>,
    /// `memory.stat`.
    pub memory_stat: std::collections::BTreeMap<String, u64>,
    /// `memory.events` (v2) or `memory.oom_control` (v1) counters.
    pub oom_counters: std::collections::BTreeMap<String, u64>,
    /// `memory.pressure` of the cgroup (the unified tree's on hybrid hosts), if PSI is on.
    pub pressure: Option<crate::psi::Pressure>,
}

/// `key value` lines as a map (non-numeric values skipped).
fn read_flat_keyed(file: &Path) -> std::collections::BTreeMap<String, u64> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

impl OomRecord {
    /// Captures the record of `dir` (the memory cgroup) after `kills` kills; `pressure_dir` is the cgroup's
    /// directory in the cgroup2 tree (the same as `dir` on v2 hosts).
    pub fn capture(dir: &Path, controller: MemoryController, pressure_dir: Option<&Path>, kills: u64) -> Self {
        let (limit_file, peak_file, counters) = match controller {
            MemoryController::V2 => ("memory.max", "memory.peak", "memory.events"),
            MemoryController::V1 => ("memory.limit_in_bytes", "memory.max_usage_in_bytes", "memory.oom_control"),
        };
        // v1 reports "unlimited" as a huge page-aligned number, v2 as "max".
        let memory_limit_bytes = std::fs::read_to_string(dir.join(limit_file))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&l| l < (1 << 62));
        Self {
            cgroup: dir.to_path_buf(),
            captured_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            kills,
            memory_limit_bytes,
            memory_peak_bytes: std::fs::read_to_string(dir.join(peak_file)).ok().and_then(|s| s.trim().parse().ok()),
            memory_stat: read_flat_keyed(&dir.join("memory.stat")),
            oom_counters: read_flat_keyed(&dir.join(counters)),
            pressure: pressure_dir.and_then(|p| crate::psi::read(&p.join("memory.pressure")).ok()),
        }
    }
}

/// An OOM kill as the kernel's log tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelKill {
    /// The record's time, microseconds since boot on the log's clock.
    pub at_us: u64,
    /// The killed process.
    pub pid: u32,
    /// Its command name.
    pub task: String,
}

/// The kernel log's last OOM kill in a cgroup whose path ends in `/<cgroup_suffix>` (a container's ID), from
/// the `oom-kill:` records of `/dev/kmsg` (their `task_memcg=`). The log's clock is the scheduler clock, which
/// tracks CLOCK_MONOTONIC on most hosts (not all: callers check the difference is sane). `None` when no record
/// names the cgroup (or the log cannot be read: root only).
pub fn kernel_kill(cgroup_suffix: &str) -> Option<KernelKill> {
    last_kill_in(&read_kmsg().ok()?, cgroup_suffix)
}

/// Now on CLOCK_MONOTONIC, in microseconds (to compare with [`KernelKill::at_us`]).
pub fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0) / 1000)
        .unwrap_or(0)
}

/// Every record the kernel's log holds now (at most its ring buffer), one per line.
fn read_kmsg() -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg")?;
    let mut out = String::new();
    let mut record = vec![0u8; 8192];
    loop {
        match file.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                out.push_str(&String::from_utf8_lossy(&record[..n]));
                if !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            // A record overwritten while reading: the next one follows.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The last `oom-kill:` record whose `task_memcg` ends in `/<suffix>`.
fn last_kill_in(records: &str, suffix: &str) -> Option<KernelKill> {
    let wanted = format!("/{suffix}");
    records
        .lines()
        .filter_map(|line| {
            let (head, message) = line.split_once(';')?;
            let fields: Vec<&str> = message.strip_prefix("oom-kill:")?.split(',').collect();
            let field = |key: &str| fields.iter().find_map(|f| f.strip_prefix(key));
            field("task_memcg=")?.ends_with(&wanted).then_some(())?;
            Some(KernelKill {
                at_us: head.split(',').nth(2)?.parse().ok()?,
                pid: field("pid=")?.parse().ok()?,
                task: field("task=").unwrap_or_default().to_string(),
            })
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_last_kill_of_a_cgroup_in_the_kernel_log() {
        let log = "6,100,5000000,-;Memory cgroup out of memory: Killed process 42 (tail)\n\
                   6,99,4000000,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),oom_memcg=/kubepods/podu,task_memcg=/x/kubepods/podu/c1,task=tail,pid=41,uid=0\n\
                   6,101,6000000,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/kubepods/podu,task_memcg=/x/kubepods/podu/c1,task=tail,pid=42,uid=0\n\
                   6,102,7000000,-;oom-kill:constraint=CONSTRAINT_MEMCG,task_memcg=/x/kubepods/podu/c10,task=sh,pid=43,uid=0\n";
        let c1 = last_kill_in(log, "c1").unwrap();
        assert_eq!((c1.at_us, c1.pid, c1.task.as_str()), (6_000_000, 42, "tail"), "the last record of c1, not c10's");
        assert_eq!(last_kill_in(log, "c10").map(|k| k.pid), Some(43));
        assert_eq!(last_kill_in(log, "c2"), None);
        assert!(monotonic_us() > 0);
    }
}
