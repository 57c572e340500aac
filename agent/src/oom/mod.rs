//! The OOM research view: a record of every OOM kill in a container, whether it ended the container or killed
//! another of its processes while the container kept running (upstream reports nothing then). It holds the pod and container, the
//! killed process from the kernel's log, how long nodelet took to hear of it, and the container cgroup as the
//! kill left it: its limit, `memory.stat`, OOM counters and memory PSI.
//!
//! It also holds the node's memory in the seconds before the kill, as the memory watch sampled it ([`samples`]).
//!
//! The record is published three ways: as a Warning event `OOMKilling` on the pod (as the node-problem-detector
//! words it), at `/debug/oom` on the kubelet API (the last [`KEEP`]), and as one JSON line in
//! `<root-dir>/oom/kills.jsonl`.
//!
//! Crash rules for the file. Each record is one `write` of one line to a file opened for appending, so a crash
//! leaves at most a torn last line, and readers skip lines that do not parse. The file moves to `kills.jsonl.1`
//! past [`ROTATE_BYTES`], so at most two files are kept.

pub mod samples;

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nodelet_cgroups::oom::OomRecord;
use serde::{Deserialize, Serialize};

/// Records `/debug/oom` keeps in memory.
pub const KEEP: usize = 100;
/// Size past which the JSONL file is rotated.
const ROTATE_BYTES: u64 = 16 << 20;

/// The process the kernel killed, from its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KilledProcess {
    pub pid: u32,
    pub name: String,
}

/// One OOM kill.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OomKill {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub container: String,
    pub container_id: String,
    pub qos_class: String,
    /// When the pod worker heard of it (RFC 3339).
    pub heard_at: String,
    /// From the kernel's `oom-kill:` record, when its log still has it.
    pub process: Option<KilledProcess>,
    /// The kernel's kill to the pod worker hearing of the container's exit, ms (where the log's clock allows).
    pub latency_ms: Option<f64>,
    /// The container's cgroup right after the kill.
    pub cgroup: Option<OomRecord>,
    /// The kill took a process other than the container's init, and the container kept running (cgroup v1, or
    /// v2 without group kills).
    #[serde(default)]
    pub container_kept_running: bool,
    /// The node's available memory and the pods' memory stall in the seconds before the record was made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory_samples: Vec<samples::MemorySample>,
}

impl OomKill {
    /// The `OOMKilling` event's message: the kernel's words, then the numbers that matter most.
    pub fn message(&self) -> String {
        let mut m = match &self.process {
            Some(p) => format!("Memory cgroup out of memory: Killed process {} ({})", p.pid, p.name),
            None => "Memory cgroup out of memory: killed a process".to_string(),
        };
        m.push_str(&format!(" in container {}", self.container));
        if self.container_kept_running {
            m.push_str(" (the container kept running)");
        }
        if let Some(c) = &self.cgroup {
            let mib = |b: u64| format!("{:.1}Mi", b as f64 / f64::from(1 << 20));
            if let Some(limit) = c.memory_limit_bytes {
                m.push_str(&format!(", limit {}", mib(limit)));
            }
            if let Some(anon) = c.memory_stat.get("anon").or(c.memory_stat.get("total_rss")) {
                m.push_str(&format!(", anon {}", mib(*anon)));
            }
            if let Some(p) = &c.pressure {
                m.push_str(&format!(", memory PSI some avg10 {:.2}% full avg10 {:.2}%", p.some.avg10, p.full.avg10));
            }
        }
        m
    }
}

/// The records: the last [`KEEP`] in memory, every one in the JSONL file.
#[derive(Debug, Clone)]
pub struct OomLog {
    file: PathBuf,
    recent: Arc<Mutex<VecDeque<OomKill>>>,
    /// The memory watch's recent samples.
    samples: samples::Samples,
}

impl OomLog {
    /// The log under `root_dir`, with the records a previous agent process wrote (the last [`KEEP`]).
    pub fn open(root_dir: &Path) -> OomLog {
        let file = root_dir.join("oom").join("kills.jsonl");
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        // A torn last line is closed, so that the next record starts on a line of its own.
        if !text.is_empty() && !text.ends_with('\n') {
            let _ = std::fs::OpenOptions::new().append(true).open(&file).and_then(|mut f| f.write_all(b"\n"));
        }
        let mut recent: VecDeque<OomKill> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        while recent.len() > KEEP {
            recent.pop_front();
        }
        OomLog { file, recent: Arc::new(Mutex::new(recent)), samples: Default::default() }
    }

    /// The ring the memory watch samples into, for the records.
    pub fn samples(&self) -> &samples::Samples {
        &self.samples
    }

    /// Adds a record (blocking: it appends to the file).
    pub fn record(&self, kill: OomKill) {
        if let Err(e) = self.append(&kill) {
            tracing::warn!(file = %self.file.display(), error = %e, "writing an OOM record");
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.push_back(kill);
        while recent.len() > KEEP {
            recent.pop_front();
        }
    }

    fn append(&self, kill: &OomKill) -> std::io::Result<()> {
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if std::fs::metadata(&self.file).is_ok_and(|m| m.len() > ROTATE_BYTES) {
            std::fs::rename(&self.file, self.file.with_extension("jsonl.1"))?;
        }
        let mut line = serde_json::to_vec(kill).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.file)?;
        f.write_all(&line)
    }

    /// The records in memory, oldest first; with `pod`, those of pods named so (`name` or `namespace/name`).
    pub fn recent(&self, pod: Option<&str>) -> Vec<OomKill> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .filter(|k| pod.is_none_or(|p| p == k.pod || p == format!("{}/{}", k.namespace, k.pod)))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kill(pod: &str) -> OomKill {
        OomKill {
            namespace: "ns".into(),
            pod: pod.into(),
            pod_uid: "u".into(),
            container: "c".into(),
            container_id: "id".into(),
            qos_class: "Burstable".into(),
            heard_at: "2026-12-01T00:00:00Z".into(),
            process: Some(KilledProcess { pid: 42, name: "tail".into() }),
            latency_ms: Some(3.5),
            cgroup: Some(OomRecord {
                cgroup: "/sys/fs/cgroup/x".into(),
                captured_at_ms: 1,
                kills: 1,
                memory_limit_bytes: Some(24 << 20),
                memory_peak_bytes: Some(24 << 20),
                memory_stat: [("anon".to_string(), 23u64 << 20)].into(),
                oom_counters: [("oom_kill".to_string(), 1)].into(),
                pressure: None,
            }),
            container_kept_running: false,
            memory_samples: Vec::new(),
        }
    }

    #[test]
    fn records_survive_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = OomLog::open(dir.path());
        log.record(kill("a"));
        log.record(kill("b"));
        // A crash in the middle of a write leaves a torn line: skipped.
        let file = dir.path().join("oom/kills.jsonl");
        std::fs::OpenOptions::new().append(true).open(&file).unwrap().write_all(b"{\"namesp").unwrap();
        let again = OomLog::open(dir.path());
        assert_eq!(again.recent(None).len(), 2);
        again.record(kill("c"));
        assert_eq!(OomLog::open(dir.path()).recent(None).len(), 3, "the record after the torn line is whole");
        assert_eq!(again.recent(Some("ns/b")).len(), 1);
        assert_eq!(again.recent(Some("b"))[0].process, Some(KilledProcess { pid: 42, name: "tail".into() }));
        assert!(again.recent(Some("d")).is_empty());
        let message = kill("a").message();
        assert_eq!(
            message,
            "Memory cgroup out of memory: Killed process 42 (tail) in container c, limit 24.0Mi, anon 23.0Mi"
        );
        let survived = OomKill { container_kept_running: true, ..kill("a") };
        assert!(survived.message().contains("in container c (the container kept running), limit"));
        // A record written before the field existed reads as one that ended its container.
        let old = serde_json::to_string(&kill("a")).unwrap().replace(",\"containerKeptRunning\":false", "");
        assert!(!old.contains("containerKeptRunning"));
        assert!(!serde_json::from_str::<OomKill>(&old).unwrap().container_kept_running);
    }

    #[test]
    fn keeps_the_last_records_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let log = OomLog::open(dir.path());
        for i in 0..KEEP + 5 {
            log.record(kill(&format!("p{i}")));
        }
        let recent = log.recent(None);
        assert_eq!(recent.len(), KEEP);
        assert_eq!(recent[0].pod, "p5");
    }
}
