//! Reading a container's CRI log the way the kubelet serves `/containerLogs`: the current file only (like upstream),
//! `tailLines`, `sinceSeconds`/`sinceTime`, `timestamps`, `limitBytes`, and `follow`, which keeps reading as the
//! file grows and across rotation until the container has stopped and everything is out.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};
use tokio::sync::mpsc;

use super::parse_line;

/// How often a followed log is checked for new data, rotation and the container's end.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The query options of `/containerLogs` (`PodLogOptions`), already validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub follow: bool,
    /// The last N entries of the file.
    pub tail_lines: Option<u64>,
    /// Entries written before this are skipped.
    pub since: Option<Timestamp>,
    /// Each entry prefixed with its RFC 3339 timestamp and a space.
    pub timestamps: bool,
    /// Output stops after this many bytes.
    pub limit_bytes: Option<u64>,
}

/// Sends the log at `path` to `out` in chunks. With `follow`, returns once `running()` is false and the file has
/// no more to give, or when the receiver is gone.
pub async fn stream(
    path: PathBuf,
    options: LogOptions,
    running: impl Fn() -> bool,
    out: mpsc::Sender<Bytes>,
) -> std::io::Result<()> {
    let mut file = tokio::fs::File::open(&path).await?;
    let mut inode = file.metadata().await?.ino();
    if let Some(n) = options.tail_lines {
        let start = tail_start(&path, n).await?;
        file.seek(std::io::SeekFrom::Start(start)).await?;
    }
    let mut reader = BufReader::new(file);
    let mut budget = options.limit_bytes.unwrap_or(u64::MAX);
    let mut line = Vec::new();
    let mut draining = false;
    loop {
        let read = reader.read_until(b'\n', &mut line).await?;
        if read > 0 && line.last() == Some(&b'\n') {
            let Some(chunk) = render(&line, &options) else {
                line.clear();
                continue;
            };
            line.clear();
            let take = chunk.len().min(usize::try_from(budget).unwrap_or(usize::MAX));
            if out.send(Bytes::copy_from_slice(&chunk[..take])).await.is_err() {
                return Ok(());
            }
            budget -= take as u64;
            if budget == 0 {
                return Ok(());
            }
            continue;
        }
        // At the end of the file (a half-written entry stays in `line` until its newline lands).
        if !options.follow || draining {
            return Ok(());
        }
        let stopped = !running();
        match std::fs::metadata(&path) {
            // Rotated: the old file is read to its end; go on with the new one from its start.
            Ok(meta) if meta.ino() != inode => {
                inode = meta.ino();
                reader = BufReader::new(tokio::fs::File::open(&path).await?);
                line.clear();
                continue;
            }
            Ok(_) if stopped => {
                // One last pass: the log writer drains the container's pipes after it exits.
                tokio::time::sleep(FOLLOW_POLL).await;
                draining = true;
                continue;
            }
            Err(_) if stopped => return Ok(()),
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = out.closed() => return Ok(()),
        }
    }
}

/// One CRI entry as the client sees it, or `None` when it is filtered out (or not a CRI line).
fn render(entry: &[u8], options: &LogOptions) -> Option<Vec<u8>> {
    let text = String::from_utf8_lossy(entry.strip_suffix(b"\n").unwrap_or(entry));
    let parsed = parse_line(&text)?;
    if let Some(since) = options.since {
        let at: Timestamp = parsed.timestamp.parse().ok()?;
        if at < since {
            return None;
        }
    }
    let mut chunk = Vec::with_capacity(parsed.text.len() + 40);
    if options.timestamps {
        chunk.extend_from_slice(parsed.timestamp.as_bytes());
        chunk.push(b' ');
    }
    chunk.extend_from_slice(parsed.text.as_bytes());
    if !parsed.partial {
        chunk.push(b'\n');
    }
    Some(chunk)
}

/// The offset of the last `n` entries of the file.
async fn tail_start(path: &Path, n: u64) -> std::io::Result<u64> {
    let data = tokio::fs::read(path).await?;
    let mut seen = 0;
    // Skip the final newline: the entry it ends is the last one.
    let body = data.strip_suffix(b"\n").unwrap_or(&data);
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return Ok(i as u64 + 1);
            }
        }
    }
    Ok(if n == 0 { data.len() as u64 } else { 0 })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    const LOG: &str = "2026-01-01T00:00:01.000000001Z stdout F one\n\
                       2026-01-01T00:00:02Z stderr F two\n\
                       2026-01-01T00:00:03Z stdout P thr\n\
                       2026-01-01T00:00:03.5Z stdout F ee\n\
                       2026-01-01T00:00:04Z stdout F four\n";

    async fn read(path: &Path, options: LogOptions) -> String {
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(stream(path.to_owned(), options, || false, tx));
        let mut out = Vec::new();
        while let Some(chunk) = rx.recv().await {
            out.extend_from_slice(&chunk);
        }
        task.await.unwrap().unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn options_select_and_shape_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, LOG).unwrap();
        assert_eq!(read(&path, LogOptions::default()).await, "one\ntwo\nthree\nfour\n");
        let tail = |n| LogOptions { tail_lines: Some(n), ..Default::default() };
        assert_eq!(read(&path, tail(1)).await, "four\n");
        assert_eq!(read(&path, tail(3)).await, "three\nfour\n", "a partial entry counts as a line, as upstream");
        assert_eq!(read(&path, tail(0)).await, "");
        assert_eq!(read(&path, tail(99)).await, "one\ntwo\nthree\nfour\n");
        let since = LogOptions { since: Some("2026-01-01T00:00:02Z".parse().unwrap()), ..Default::default() };
        assert_eq!(read(&path, since).await, "two\nthree\nfour\n");
        let stamps = LogOptions { timestamps: true, tail_lines: Some(1), ..Default::default() };
        assert_eq!(read(&path, stamps).await, "2026-01-01T00:00:04Z four\n");
        let limit = LogOptions { limit_bytes: Some(6), ..Default::default() };
        assert_eq!(read(&path, limit).await, "one\ntw");
    }

    #[tokio::test]
    async fn follow_reads_new_entries_across_rotation_until_the_container_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, "2026-01-01T00:00:01Z stdout F first\n").unwrap();
        let running = Arc::new(AtomicBool::new(true));
        let (tx, mut rx) = mpsc::channel(16);
        let flag = running.clone();
        let options = LogOptions { follow: true, ..Default::default() };
        let task = tokio::spawn(stream(path.clone(), options, move || flag.load(Ordering::SeqCst), tx));
        assert_eq!(&rx.recv().await.unwrap()[..], b"first\n");
        // Half an entry, then the rest: one output line.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"2026-01-01T00:00:02Z stdout F sec").unwrap();
        tokio::time::sleep(FOLLOW_POLL * 2).await;
        f.write_all(b"ond\n").unwrap();
        assert_eq!(&rx.recv().await.unwrap()[..], b"second\n");
        // Rotation: the file is renamed and a new one written.
        std::fs::rename(&path, dir.path().join("0.log.1")).unwrap();
        std::fs::write(&path, "2026-01-01T00:00:03Z stdout F third\n").unwrap();
        assert_eq!(&rx.recv().await.unwrap()[..], b"third\n");
        // The container stops after a last line: it is sent, then the stream ends.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"2026-01-01T00:00:04Z stdout F last\n").unwrap();
        running.store(false, Ordering::SeqCst);
        let mut rest = Vec::new();
        while let Some(chunk) = rx.recv().await {
            rest.extend_from_slice(&chunk);
        }
        assert_eq!(rest, b"last\n");
        task.await.unwrap().unwrap();
    }
}
