//! Pressure stall information: `/proc/pressure/{cpu,memory,io}` for the node and `*.pressure` files of cgroup v2
//! directories (on hybrid hosts, of the unified tree).

use std::path::Path;

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
