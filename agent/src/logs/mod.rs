//! Container logs in the CRI format the kubelet reads (`/var/log/pods/<ns>_<pod>_<uid>/<ctr>/<restart>.log`,
//! lines `<RFC3339Nano> <stdout|stderr> <F|P> <text>`), with size-based rotation like upstream's
//! `containerLogMaxSize` / `containerLogMaxFiles`.

pub mod read;

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Longest line written as one entry; longer ones are split into partial (`P`) entries like containerd does.
const MAX_LINE: usize = 16 * 1024;

/// `<podLogsDir>/<ns>_<pod>_<uid>`.
pub fn pod_log_dir(pod_logs_dir: &Path, namespace: &str, name: &str, uid: &str) -> PathBuf {
    pod_logs_dir.join(format!("{namespace}_{name}_{uid}"))
}

/// `<pod log dir>/<container>/<restart>.log`.
pub fn container_log_path(pod_dir: &Path, container: &str, restart: u32) -> PathBuf {
    pod_dir.join(container).join(format!("{restart}.log"))
}

/// Removes the logs of a container's instances before `keep_from` (with their rotated files): upstream's
/// container GC keeps the current instance and the one before it (`kubectl logs --previous`).
pub fn prune_container_logs(pod_dir: &Path, container: &str, keep_from: u32) {
    let dir = pod_dir.join(container);
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let restart = name.to_str().and_then(|n| n.split('.').next()).and_then(|n| n.parse::<u32>().ok());
        if restart.is_some_and(|r| r < keep_from) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Rotation limits.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    pub max_bytes: u64,
    pub max_files: u32,
}

/// A container's output as it is logged, for `kubectl attach`: (stream, bytes), lines as written.
pub type Tee = tokio::sync::broadcast::Sender<(&'static str, bytes::Bytes)>;

/// A stream of container output to log.
pub type Output = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// A container's stdout and stderr pipes as outputs to copy.
pub fn pipes(stdout: std::fs::File, stderr: std::fs::File) -> Vec<(&'static str, Output)> {
    let pipe = |f: std::fs::File| tokio::net::unix::pipe::Receiver::from_file(f).map(|r| Box::new(r) as Output);
    let streams = [("stdout", pipe(stdout)), ("stderr", pipe(stderr))];
    streams.into_iter().filter_map(|(n, r)| Some((n, r.ok()?))).collect()
}

/// Copies each named output (`stdout`, `stderr`; a terminal is logged as `stdout`) into the CRI log file at
/// `path`, and to `tee` while anyone listens. Returns when every output ended.
pub async fn copy_outputs(outputs: Vec<(&'static str, Output)>, path: PathBuf, rotation: Rotation, tee: Option<Tee>) {
    let (tx, rx) = mpsc::channel::<(&'static str, Vec<u8>, bool)>(256);
    for (name, output) in outputs {
        let (tx, tee) = (tx.clone(), tee.clone());
        tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(MAX_LINE, output);
            loop {
                let mut line = Vec::new();
                let complete = match read_line(&mut reader, &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => line.last() == Some(&b'\n'),
                };
                if let Some(tee) = &tee
                    && tee.receiver_count() > 0
                {
                    let _ = tee.send((name, bytes::Bytes::copy_from_slice(&line)));
                }
                if complete {
                    line.pop();
                }
                if tx.send((name, line, complete)).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    write_log(rx, path, rotation).await;
}

/// Reads up to a newline or [`MAX_LINE`] bytes.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R, out: &mut Vec<u8>) -> std::io::Result<usize> {
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(out.len());
        }
        let room = MAX_LINE - out.len();
        let take = match buf.iter().take(room).position(|b| *b == b'\n') {
            Some(i) => i + 1,
            None => buf.len().min(room),
        };
        out.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if out.last() == Some(&b'\n') || out.len() >= MAX_LINE {
            return Ok(out.len());
        }
    }
}

/// How long after a failed open or write the log file is tried again (lines meanwhile are dropped, counted).
const REOPEN_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes entries until both streams end. A log that cannot be opened or written never stops the draining (a
/// container whose pipe fills would block): its lines are dropped and counted, and the file is tried again.
async fn write_log(mut rx: mpsc::Receiver<(&'static str, Vec<u8>, bool)>, path: PathBuf, rotation: Rotation) {
    // Only the first open makes the directory: once the pod's logs are removed with the pod, a late line must
    // not bring them back.
    if let Some(dir) = path.parent() {
        let _ = tokio::fs::create_dir_all(dir).await;
    }
    let open = |path: PathBuf| async move { tokio::fs::OpenOptions::new().create(true).append(true).open(&path).await };
    // Opened at once, as the runtime does, so that a silent container has an (empty) log too.
    let (mut file, mut failed_at) = match open(path.clone()).await {
        Ok(f) => (Some(f), None),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open container log; dropping lines");
            (None, Some(std::time::Instant::now()))
        }
    };
    let mut size = match &file {
        Some(f) => f.metadata().await.map(|m| m.len()).unwrap_or(0),
        None => 0,
    };
    let mut dropped: u64 = 0;
    while let Some((stream, text, complete)) = rx.recv().await {
        if file.is_none() && failed_at.is_none_or(|t| t.elapsed() >= REOPEN_AFTER) {
            match open(path.clone()).await {
                Ok(f) => {
                    size = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                    file = Some(f);
                    if dropped > 0 {
                        tracing::warn!(path = %path.display(), dropped, "container log writable again; lines lost");
                        dropped = 0;
                    }
                }
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "container log still cannot be opened");
                    failed_at = Some(std::time::Instant::now());
                }
            }
        }
        let mut entry = format!("{} {stream} {} ", cri_timestamp(), if complete { "F" } else { "P" }).into_bytes();
        entry.extend_from_slice(&text);
        entry.push(b'\n');
        if let Some(f) = file.as_mut()
            && size > 0
            && size + entry.len() as u64 > rotation.max_bytes
        {
            let _ = f.flush().await;
            rotate(&path, rotation.max_files).await;
            size = 0;
            file = match open(path.clone()).await {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "reopening a rotated container log failed");
                    failed_at = Some(std::time::Instant::now());
                    None
                }
            };
        }
        let Some(f) = file.as_mut() else {
            dropped += 1;
            continue;
        };
        if let Err(e) = f.write_all(&entry).await {
            tracing::warn!(path = %path.display(), error = %e, "writing a container log failed; dropping lines");
            file = None;
            failed_at = Some(std::time::Instant::now());
            dropped += 1;
            continue;
        }
        size += entry.len() as u64;
    }
    if let Some(mut f) = file {
        let _ = f.flush().await;
    }
}

/// `0.log` -> `0.log.<timestamp>`; the oldest rotated files go so that at most `max_files` remain.
async fn rotate(path: &Path, max_files: u32) {
    let stamp = jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S%.6f").to_string();
    let rotated = PathBuf::from(format!("{}.{stamp}", path.display()));
    let _ = tokio::fs::rename(path, &rotated).await;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut old: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
                .collect()
        })
        .unwrap_or_default();
    old.sort();
    let keep = max_files.saturating_sub(1) as usize;
    while old.len() > keep {
        let _ = tokio::fs::remove_file(old.remove(0)).await;
    }
}

/// RFC 3339 with nanoseconds, UTC, like Go's `time.RFC3339Nano`.
pub fn cri_timestamp() -> String {
    jiff::Timestamp::now().to_string()
}

/// One parsed CRI log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub timestamp: String,
    pub stream: String,
    pub partial: bool,
    pub text: String,
}

/// Parses `<time> <stream> <F|P> <text>`.
pub fn parse_line(line: &str) -> Option<LogLine> {
    let mut parts = line.splitn(4, ' ');
    let timestamp = parts.next()?.to_string();
    let stream = parts.next()?.to_string();
    let tag = parts.next()?;
    let text = parts.next().unwrap_or("").to_string();
    Some(LogLine { timestamp, stream, partial: tag == "P", text })
}

/// The text of a log file (and of its rotated predecessors, oldest first), partial lines joined.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return Ok(String::new()) };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
        .collect();
    files.sort();
    files.push(path.to_path_buf());
    let mut out = String::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().filter_map(parse_line) {
            out.push_str(&line.text);
            if !line.partial {
                out.push('\n');
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(fd: std::os::fd::OwnedFd) -> std::fs::File {
        std::fs::File::from(fd)
    }

    /// Runs one copier over fresh pipes, feeding it `lines` (from a thread: pipe writes block until it reads).
    async fn copy(path: &Path, lines: Vec<(bool, String)>) {
        let (out_r, out_w) = std::io::pipe().unwrap();
        let (err_r, err_w) = std::io::pipe().unwrap();
        let rotation = Rotation { max_bytes: 64 * 1024, max_files: 3 };
        let outputs = pipes(file(out_r.into()), file(err_r.into()));
        let writer = tokio::spawn(copy_outputs(outputs, path.to_owned(), rotation, None));
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let (mut out, mut err) = (file(out_w.into()), file(err_w.into()));
            for (to_err, line) in lines {
                let target = if to_err { &mut err } else { &mut out };
                writeln!(target, "{line}").unwrap();
            }
        })
        .await
        .unwrap();
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_log_that_cannot_be_written_never_blocks_the_container() {
        let dir = tempfile::tempdir().unwrap();
        // The log's directory is a regular file: opening fails until it is replaced by a directory.
        let blocker = dir.path().join("pod");
        std::fs::write(&blocker, b"").unwrap();
        let path = container_log_path(&blocker, "c", 0);
        // 4 MiB through a pipe of 64 KiB: it only gets through if the copier keeps draining.
        let lines: Vec<(bool, String)> = (0..4096).map(|i| (false, format!("{i:04} {}", "x".repeat(1019)))).collect();
        tokio::time::timeout(std::time::Duration::from_secs(30), copy(&path, lines))
            .await
            .expect("the container's output was not drained");
        assert!(!path.exists());
        // Once the log can be written again, it is.
        std::fs::remove_file(&blocker).unwrap();
        std::fs::create_dir(&blocker).unwrap();
        copy(&path, vec![(false, "back".to_string())]).await;
        assert_eq!(read_text(&path).unwrap(), "back\n");
    }

    #[test]
    fn only_the_current_and_previous_instances_keep_their_logs() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["0.log", "0.log.20260101-000000", "1.log", "2.log", "3.log"] {
            std::fs::create_dir_all(dir.path().join("c")).unwrap();
            std::fs::write(dir.path().join("c").join(name), b"x").unwrap();
        }
        prune_container_logs(dir.path(), "c", 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path().join("c"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["2.log", "3.log"]);
    }

    #[tokio::test]
    async fn writes_cri_lines_splits_long_ones_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = container_log_path(dir.path(), "c", 0);
        let long = "x".repeat(MAX_LINE + 10);
        let mut lines = vec![(false, "hello".to_string()), (true, "oops".to_string()), (false, long.clone())];
        lines.extend((0..1500).map(|i| (false, format!("line {i:05} {}", "y".repeat(60)))));
        copy(&path, lines).await;
        let current = std::fs::read_to_string(&path).unwrap();
        let first = parse_line(current.lines().next().unwrap()).unwrap();
        assert!(first.timestamp.ends_with('Z') && first.timestamp.parse::<jiff::Timestamp>().is_ok());
        let all = read_text(&path).unwrap();
        // stdout and stderr are separate pipes: their relative order is not fixed.
        assert!(all.starts_with("hello\n") && all.contains("\noops\n"), "{}", &all[..20]);
        assert!(all.contains(&format!("{long}\n")), "partial lines are joined again");
        assert!(all.ends_with(&format!("line 01499 {}\n", "y".repeat(60))));
        let files = || std::fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(files(), 3, "0.log and two rotated files");
        // More output: still three files, the oldest lines are gone.
        copy(&path, (0..2000).map(|i| (false, format!("more {i:05} {}", "z".repeat(60)))).collect()).await;
        assert_eq!(files(), 3);
        let all = read_text(&path).unwrap();
        assert!(!all.contains("hello") && all.ends_with(&format!("more 01999 {}\n", "z".repeat(60))));
    }
}
