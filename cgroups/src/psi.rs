//! Pressure stall information: `/proc/pressure/{cpu,memory,io}` for the node and `*.pressure` files of cgroup v2
//! directories (on hybrid hosts, of the unified tree).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One line of a pressure file: the share of wall time in which tasks stalled, averaged over 10, 60 and 300
/// seconds (percent), and the total stall time (µs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PressureLine {
    /// avg10, percent.
    pub avg10: f64,
    /// avg60, percent.
    pub avg60: f64,
    /// avg300, percent.
    pub avg300: f64,
    /// Total stall time, µs.
    pub total_us: u64,
}

/// A whole pressure file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    /// Some tasks stalled.
    pub some: PressureLine,
    /// All non-idle tasks stalled at once (absent for the node's cpu on older kernels: zeros then).
    pub full: PressureLine,
}

/// A pressure file that is not in the kernel's format.
#[derive(Debug, thiserror::Error)]
pub enum PsiError {
    /// The file could not be read (PSI disabled: boot with `psi=1`).
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line did not parse.
    #[error("malformed pressure line {0:?}")]
    Malformed(String),
}

/// Parses the text of a pressure file.
pub fn parse(text: &str) -> Result<Pressure, PsiError> {
    let mut p = Pressure::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = || PsiError::Malformed(line.to_string());
        let mut fields = line.split_whitespace();
        let kind = fields.next().ok_or_else(bad)?;
        let mut out = PressureLine::default();
        for field in fields {
            let (key, value) = field.split_once('=').ok_or_else(bad)?;
            match key {
                "avg10" => out.avg10 = value.parse().map_err(|_| bad())?,
                "avg60" => out.avg60 = value.parse().map_err(|_| bad())?,
                "avg300" => out.avg300 = value.parse().map_err(|_| bad())?,
                "total" => out.total_us = value.parse().map_err(|_| bad())?,
                _ => {}
            }
        }
        match kind {
            "some" => p.some = out,
            "full" => p.full = out,
            _ => return Err(bad()),
        }
    }
    Ok(p)
}

/// Reads and parses a pressure file.
pub fn read(path: &Path) -> Result<Pressure, PsiError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| PsiError::Read { path: path.display().to_string(), source })?;
    parse(&text)
}

/// Which tasks a trigger counts: some of them stalled, or all non-idle ones at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// `some`.
    Some,
    /// `full`.
    Full,
}

/// A PSI trigger: fires as soon as tasks stalled for `stall` within a `window`, instead of the caller polling
/// averages (the kubelet's eviction manager looks every 10 s). Uses a kernel trigger (POLLPRI) where the kernel
/// accepts one; some kernels refuse triggers (EINVAL, seen on this project's hybrid CI host), and then the `total`
/// stall counter is sampled every 100 ms instead, with the same stall-within-window rule.
#[derive(Debug)]
pub struct PressureTrigger {
    path: PathBuf,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    Kernel(tokio::io::unix::AsyncFd<std::fs::File>),
    Sampling { kind: Stall, stall_us: u64, window: Duration, samples: VecDeque<(Instant, u64)> },
}

/// How often the sampling fallback reads the pressure file.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

impl PressureTrigger {
    /// Arms a trigger on a pressure file (`/proc/pressure/memory`, `<cgroup>/cpu.pressure`, ...). Windows from
    /// 500 ms to 10 s, and a stall shorter than the window, as the kernel requires.
    pub fn new(file: &Path, kind: Stall, stall: Duration, window: Duration) -> Result<Self, PsiError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = file.to_path_buf();
        let err = |source| PsiError::Read { path: file.display().to_string(), source };
        let word = match kind {
            Stall::Some => "some",
            Stall::Full => "full",
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(file)
            .map_err(err)?;
        // One write, with the terminating NUL the kernel expects.
        let armed = f.write_all(format!("{word} {} {}\0", stall.as_micros(), window.as_micros()).as_bytes());
        let mode = match armed {
            Ok(()) => {
                // SAFETY: the AsyncFd owns the File, so the descriptor stays open and unchanged for its life.
                let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(f, tokio::io::Interest::PRIORITY) }
                    .map_err(|e| err(std::io::Error::other(e)))?;
                Mode::Kernel(fd)
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && stall < window => {
                read(file)?; // the file itself must be readable
                Mode::Sampling {
                    kind,
                    stall_us: u64::try_from(stall.as_micros()).unwrap_or(u64::MAX),
                    window,
                    samples: VecDeque::new(),
                }
            }
            Err(e) => return Err(err(e)),
        };
        Ok(Self { path, mode })
    }

    /// Whether the kernel does the watching (false: sampling fallback).
    pub fn is_kernel_trigger(&self) -> bool {
        matches!(self.mode, Mode::Kernel(_))
    }

    /// Waits until the trigger fires. Fails if the file goes away (the cgroup was removed).
    pub async fn fired(&mut self) -> Result<(), PsiError> {
        let path = self.path.display().to_string();
        let err = |source| PsiError::Read { path: path.clone(), source };
        match &mut self.mode {
            Mode::Kernel(fd) => {
                let mut guard = fd.ready(tokio::io::Interest::PRIORITY).await.map_err(err)?;
                if guard.ready().is_error() {
                    return Err(err(std::io::Error::other("pressure file error (cgroup removed?)")));
                }
                guard.clear_ready_matching(tokio::io::Ready::PRIORITY);
                Ok(())
            }
            Mode::Sampling { kind, stall_us, window, samples } => loop {
                let p = read(&self.path)?;
                let total = match kind {
                    Stall::Some => p.some.total_us,
                    Stall::Full => p.full.total_us,
                };
                let now = Instant::now();
                samples.push_back((now, total));
                while samples.front().is_some_and(|(t, _)| now.duration_since(*t) > *window) {
                    samples.pop_front();
                }
                let oldest = samples.front().map_or(total, |(_, v)| *v);
                if total.saturating_sub(oldest) >= *stall_us {
                    // Like the kernel's, at most one event per window.
                    samples.clear();
                    return Ok(());
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_pressure_files() {
        let text =
            "some avg10=1.50 avg60=0.25 avg300=0.00 total=123456\nfull avg10=0.10 avg60=0.00 avg300=0.00 total=789\n";
        let p = parse(text).unwrap();
        assert_eq!(p.some, PressureLine { avg10: 1.5, avg60: 0.25, avg300: 0.0, total_us: 123_456 });
        assert_eq!(p.full.total_us, 789);
        assert!(matches!(parse("some avg10=x"), Err(PsiError::Malformed(_))));
        assert!(matches!(parse("most avg10=1.0"), Err(PsiError::Malformed(_))));
    }

    #[test]
    fn reads_the_nodes_pressure_when_the_kernel_has_psi() {
        let path = Path::new("/proc/pressure/memory");
        if !path.exists() {
            eprintln!("skipped: no /proc/pressure (kernel without PSI)");
            return;
        }
        let p = read(path).unwrap();
        assert!(p.some.avg10 >= 0.0 && p.some.avg10 <= 100.0);
        assert!(p.some.total_us >= p.full.total_us, "some-stall time includes full-stall time");
    }
}
