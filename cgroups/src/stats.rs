//! Resource usage for the kubelet's summary API (`/stats/summary`): per container, pod and node, read from
//! cgroup files (v2, or the v1 controllers on hybrid hosts) and `/proc`. Field meanings follow cAdvisor's, which
//! the kubelet reports: working set = usage - inactive file pages.

use std::io;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::hierarchy::{Hierarchy, V1};
use crate::psi::{self, Pressure};

/// One cgroup's usage at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CgroupStats {
    /// Cumulative CPU time, ns.
    pub cpu_usage_ns: u64,
    /// Memory charged to the cgroup (page cache included), bytes.
    pub memory_usage_bytes: u64,
    /// `memory_usage_bytes` minus inactive file pages: what eviction and `kubectl top` use.
    pub memory_working_set_bytes: u64,
    /// Anonymous memory (+ swap cache on v1's `rss`), bytes.
    pub memory_rss_bytes: u64,
    /// Page faults (`pgfault`).
    pub page_faults: u64,
    /// Major page faults (`pgmajfault`).
    pub major_page_faults: u64,
    /// Processes and threads in the cgroup.
    pub pids: u64,
    /// Bytes read from block devices.
    pub io_read_bytes: u64,
    /// Bytes written to block devices.
    pub io_write_bytes: u64,
    /// Swap in use (v2 `memory.swap.current`; v1 memory+swap minus memory), where the host accounts it.
    pub swap_usage_bytes: Option<u64>,
    /// The memory limit, bytes (`None`: unlimited).
    pub memory_limit_bytes: Option<u64>,
    /// Processes the kernel's OOM killer killed in the cgroup (`oom_kill` of v2 `memory.events`, v1
    /// `memory.oom_control`).
    pub oom_kills: u64,
}

/// Pressure stall information of one cgroup (or of the node): from the cgroup2 tree, where PSI lives on hybrid
/// hosts too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PressureStats {
    /// `cpu.pressure`.
    pub cpu: Pressure,
    /// `memory.pressure`.
    pub memory: Pressure,
    /// `io.pressure`.
    pub io: Pressure,
}

/// Reads the PSI files of cgroup `rel`; `None` where PSI is off (kernel without `CONFIG_PSI` or booted `psi=0`)
/// or the cgroup is gone.
pub fn cgroup_pressure(hierarchy: &Hierarchy, rel: &str) -> Option<PressureStats> {
    pressure_in(&hierarchy.unified(rel), ".pressure")
}

/// The node's PSI (`/proc/pressure/{cpu,memory,io}`).
pub fn node_pressure() -> Option<PressureStats> {
    pressure_in(Path::new("/proc/pressure"), "")
}

fn pressure_in(dir: &Path, suffix: &str) -> Option<PressureStats> {
    let one = |name: &str| psi::read(&dir.join(format!("{name}{suffix}"))).ok();
    Some(PressureStats { cpu: one("cpu")?, memory: one("memory")?, io: one("io")? })
}

fn read(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
}

fn number(path: &Path) -> io::Result<u64> {
    let text = read(path)?;
    text.trim().parse().map_err(|_| io::Error::other(format!("{}: not a number: {text:?}", path.display())))
}

/// A `key value` field of a flat-keyed file such as `memory.stat` or `cpu.stat` (0 when absent).
fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.split_once(' ').filter(|(k, _)| *k == key).and_then(|(_, v)| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// Which of the costlier counters to read besides CPU, memory, pids and OOM kills (a housekeeping round reads
/// every pod's and container's cgroup: each file is a few microseconds of kernel time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extras {
    /// Block I/O bytes.
    pub io: bool,
    /// Swap usage (pointless on a node without swap).
    pub swap: bool,
}

impl Extras {
    /// Everything.
    pub const ALL: Extras = Extras { io: true, swap: true };
}

/// Reads the usage of cgroup `rel` (relative to the node's cgroup root), every counter.
pub fn cgroup_stats(hierarchy: &Hierarchy, rel: &str) -> io::Result<CgroupStats> {
    cgroup_stats_with(hierarchy, rel, Extras::ALL)
}

/// Reads the usage of cgroup `rel`, the costlier counters only as `extras` asks (the others are 0 / `None`).
pub fn cgroup_stats_with(hierarchy: &Hierarchy, rel: &str, extras: Extras) -> io::Result<CgroupStats> {
    if hierarchy.is_v2() { v2_stats(&hierarchy.unified(rel), extras) } else { v1_stats(hierarchy, rel, extras) }
}

/// The working set of cgroup `rel` (usage less inactive file pages, as the kubelet counts it): the two reads a
/// frequent watch needs, not a whole [`cgroup_stats`].
pub fn memory_working_set(hierarchy: &Hierarchy, rel: &str) -> io::Result<u64> {
    let (dir, usage, inactive) = if hierarchy.is_v2() {
        (hierarchy.unified(rel), "memory.current", "inactive_file")
    } else {
        let dir = hierarchy.v1(V1::Memory, rel).ok_or_else(|| io::Error::other("no v1 memory hierarchy"))?;
        (dir, "memory.usage_in_bytes", "total_inactive_file")
    };
    let usage = number(&dir.join(usage))?;
    Ok(usage.saturating_sub(field(&read(&dir.join("memory.stat"))?, inactive)))
}

fn v2_stats(dir: &Path, extras: Extras) -> io::Result<CgroupStats> {
    let cpu = read(&dir.join("cpu.stat"))?;
    let memory = read(&dir.join("memory.stat"))?;
    let usage = number(&dir.join("memory.current"))?;
    let (io_read_bytes, io_write_bytes) = match std::fs::read_to_string(dir.join("io.stat")) {
        Ok(text) if extras.io => io_v2(&text),
        _ => (0, 0),
    };
    Ok(CgroupStats {
        cpu_usage_ns: field(&cpu, "usage_usec") * 1000,
        memory_usage_bytes: usage,
        memory_working_set_bytes: usage.saturating_sub(field(&memory, "inactive_file")),
        memory_rss_bytes: field(&memory, "anon"),
        page_faults: field(&memory, "pgfault"),
        major_page_faults: field(&memory, "pgmajfault"),
        pids: number(&dir.join("pids.current")).unwrap_or(0),
        io_read_bytes,
        io_write_bytes,
        swap_usage_bytes: if extras.swap { number(&dir.join("memory.swap.current")).ok() } else { None },
        // "max" does not parse: no limit.
        memory_limit_bytes: number(&dir.join("memory.max")).ok(),
        oom_kills: std::fs::read_to_string(dir.join("memory.events")).map_or(0, |t| field(&t, "oom_kill")),
    })
}

/// Sums `rbytes=` and `wbytes=` over the devices of an `io.stat`.
fn io_v2(text: &str) -> (u64, u64) {
    let mut totals = (0, 0);
    for word in text.split_whitespace() {
        if let Some(v) = word.strip_prefix("rbytes=") {
            totals.0 += v.parse::<u64>().unwrap_or(0);
        } else if let Some(v) = word.strip_prefix("wbytes=") {
            totals.1 += v.parse::<u64>().unwrap_or(0);
        }
    }
    totals
}

fn v1_stats(h: &Hierarchy, rel: &str, extras: Extras) -> io::Result<CgroupStats> {
    let missing = |c: V1| io::Error::other(format!("no v1 {} hierarchy", c.name()));
    let memory_dir = h.v1(V1::Memory, rel).ok_or_else(|| missing(V1::Memory))?;
    let memory = read(&memory_dir.join("memory.stat"))?;
    let usage = number(&memory_dir.join("memory.usage_in_bytes"))?;
    let cpu_dir = h.v1(V1::Cpuacct, rel).ok_or_else(|| missing(V1::Cpuacct))?;
    let (io_read_bytes, io_write_bytes) = h
        .v1(V1::Blkio, rel)
        .filter(|_| extras.io)
        .and_then(|d| std::fs::read_to_string(d.join("blkio.throttle.io_service_bytes_recursive")).ok())
        .map(|t| io_v1(&t))
        .unwrap_or((0, 0));
    Ok(CgroupStats {
        cpu_usage_ns: number(&cpu_dir.join("cpuacct.usage"))?,
        memory_usage_bytes: usage,
        memory_working_set_bytes: usage.saturating_sub(field(&memory, "total_inactive_file")),
        memory_rss_bytes: field(&memory, "total_rss"),
        page_faults: field(&memory, "total_pgfault"),
        major_page_faults: field(&memory, "total_pgmajfault"),
        pids: h.v1(V1::Pids, rel).map(|d| number(&d.join("pids.current")).unwrap_or(0)).unwrap_or(0),
        io_read_bytes,
        io_write_bytes,
        swap_usage_bytes: if extras.swap {
            number(&memory_dir.join("memory.memsw.usage_in_bytes")).ok().map(|t| t.saturating_sub(usage))
        } else {
            None
        },
        oom_kills: std::fs::read_to_string(memory_dir.join("memory.oom_control")).map_or(0, |t| field(&t, "oom_kill")),
        // v1 reads back "no limit" as a page-rounded i64::MAX.
        memory_limit_bytes: number(&memory_dir.join("memory.limit_in_bytes")).ok().filter(|l| *l < 1 << 62),
    })
}

/// Sums the `<dev> Read <n>` and `<dev> Write <n>` lines of a v1 blkio file.
fn io_v1(text: &str) -> (u64, u64) {
    let mut totals = (0, 0);
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let [_, op, n] = parts[..] {
            let n = n.parse::<u64>().unwrap_or(0);
            match op {
                "Read" => totals.0 += n,
                "Write" => totals.1 += n,
                _ => {}
            }
        }
    }
    totals
}

/// The node as a whole, from `/proc` (the same on v1 and v2 hosts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NodeStats {
    /// CPU time used, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// The machine's memory, in bytes.
    pub memory_capacity_bytes: u64,
    /// Memory in use, in bytes.
    pub memory_usage_bytes: u64,
    /// usage - inactive file pages.
    pub memory_working_set_bytes: u64,
    /// capacity - working set: the signal of `memory.available` eviction.
    pub memory_available_bytes: u64,
    /// Anonymous memory (`AnonPages`), bytes.
    pub memory_rss_bytes: u64,
    /// Page faults since boot (`pgfault` of `/proc/vmstat`).
    pub page_faults: u64,
    /// Major page faults since boot (`pgmajfault`).
    pub major_page_faults: u64,
    /// Swap configured, bytes (0: none).
    pub swap_total_bytes: u64,
    /// Swap free, bytes.
    pub swap_free_bytes: u64,
}

/// Reads node-level usage.
pub fn node_stats() -> io::Result<NodeStats> {
    let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    node_stats_from(&read(Path::new("/proc/stat"))?, &read(Path::new("/proc/meminfo"))?, &vmstat)
}

fn node_stats_from(stat: &str, meminfo: &str, vmstat: &str) -> io::Result<NodeStats> {
    let cpu =
        stat.lines().find(|l| l.starts_with("cpu ")).ok_or_else(|| io::Error::other("/proc/stat: no cpu line"))?;
    // user nice system irq softirq steal (idle and iowait are not usage), in USER_HZ ticks.
    let ticks: Vec<u64> = cpu.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| ticks.get(*i)).sum();
    let tick_ns = 1_000_000_000 / ticks_per_second();
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok()))
            .unwrap_or(0)
            * 1024
    };
    let capacity = kib("MemTotal:");
    let usage = capacity.saturating_sub(kib("MemFree:"));
    let working_set = usage.saturating_sub(kib("Inactive(file):"));
    Ok(NodeStats {
        cpu_usage_ns: busy * tick_ns,
        memory_capacity_bytes: capacity,
        memory_usage_bytes: usage,
        memory_working_set_bytes: working_set,
        memory_available_bytes: capacity.saturating_sub(working_set),
        memory_rss_bytes: kib("AnonPages:"),
        page_faults: field(vmstat, "pgfault"),
        major_page_faults: field(vmstat, "pgmajfault"),
        swap_total_bytes: kib("SwapTotal:"),
        swap_free_bytes: kib("SwapFree:"),
    })
}

fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().map_or(100, |t| t.max(1).unsigned_abs())
}

/// CPU usage rate from successive cumulative samples: nanocores (1e9 = one core busy), as the summary API's
/// `usageNanoCores`.
#[derive(Debug, Default)]
pub struct CpuRate {
    last: Option<(Instant, u64)>,
}

impl CpuRate {
    /// Records a sample; returns the rate since the previous one (none for the first, or if time stood still).
    pub fn sample(&mut self, at: Instant, usage_ns: u64) -> Option<u64> {
        let rate = self.last.and_then(|(t0, u0)| {
            let dt = at.checked_duration_since(t0)?.as_nanos();
            (dt > 0).then(|| {
                u64::try_from(u128::from(usage_ns.saturating_sub(u0)) * 1_000_000_000 / dt).unwrap_or(u64::MAX)
            })
        });
        self.last = Some((at, usage_ns));
        rate
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn parses_io_and_node_files() {
        assert_eq!(io_v2("8:0 rbytes=100 wbytes=20 rios=1\n8:16 rbytes=5 wbytes=1 dbytes=0\n"), (105, 21));
        assert_eq!(io_v1("8:0 Read 10\n8:0 Write 4\n8:0 Sync 14\n8:16 Read 1\nTotal 15\n"), (11, 4));
        let stat = "cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        let meminfo = "MemTotal:       1000 kB\nMemFree:         200 kB\nInactive(file):  300 kB\nAnonPages: 100 kB\n\
                       SwapTotal: 64 kB\nSwapFree: 16 kB\n";
        let n = node_stats_from(stat, meminfo, "pgfault 12\npgmajfault 3\n").unwrap();
        assert_eq!((n.memory_rss_bytes, n.page_faults, n.major_page_faults), (100 * 1024, 12, 3));
        assert_eq!((n.swap_total_bytes, n.swap_free_bytes), (64 * 1024, 16 * 1024));
        assert_eq!(n.cpu_usage_ns, (100 + 5 + 50 + 1 + 2 + 3) * (1_000_000_000 / ticks_per_second()));
        assert_eq!(n.memory_capacity_bytes, 1_024_000);
        assert_eq!(n.memory_usage_bytes, 800 * 1024);
        assert_eq!(n.memory_working_set_bytes, 500 * 1024);
        assert_eq!(n.memory_available_bytes, 500 * 1024);
        assert_eq!(field("anon 5\ninactive_file 7\n", "inactive_file"), 7);
        assert_eq!(field("anon 5\n", "file"), 0);
    }

    #[test]
    fn reads_pressure_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["cpu", "memory", "io"] {
            let text = format!(
                "some avg10=1.50 avg60=0.00 avg300=0.00 total={}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n",
                name.len()
            );
            std::fs::write(dir.path().join(format!("{name}.pressure")), text).unwrap();
        }
        let p = pressure_in(dir.path(), ".pressure").unwrap();
        assert_eq!((p.cpu.some.total_us, p.memory.some.total_us, p.io.some.total_us), (3, 6, 2));
        assert_eq!((p.memory.some.avg10, p.io.full.total_us), (1.5, 7));
        std::fs::remove_file(dir.path().join("io.pressure")).unwrap();
        assert_eq!(pressure_in(dir.path(), ".pressure"), None, "PSI off");
    }

    #[test]
    fn cpu_rate_in_nanocores() {
        let mut r = CpuRate::default();
        let t0 = Instant::now();
        assert_eq!(r.sample(t0, 1_000), None);
        assert_eq!(r.sample(t0 + Duration::from_secs(2), 1_000 + 1_000_000_000), Some(500_000_000));
        assert_eq!(r.sample(t0 + Duration::from_secs(2), 5), None, "no time passed");
    }
}
