//! Termination messages, as upstream: each container instance gets a file of its own, bind-mounted at its
//! `terminationMessagePath` (default `/dev/termination-log`), writable by any user; when the instance ends,
//! the file's last 4096 bytes become `state.terminated.message`, or with `terminationMessagePolicy:
//! FallbackToLogsOnError` and a failed, empty-handed exit, the last 80 lines (at most 2048 bytes) of its log.
//! The pod's messages together stay within 12 KiB (each container gets its share).

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// At most this many bytes of a termination message file are read (the file's end).
pub const MAX_MESSAGE: usize = 4096;
/// The pod's termination messages together.
pub const MAX_POD_MESSAGES: usize = 12 * 1024;
/// A fallback message: the log's last lines, at most this many bytes.
const MAX_LOG_LINES: usize = 80;
const MAX_LOG_BYTES: usize = 2048;

/// The instance's message file: `<root-dir>/pods/<uid>/containers/<name>/<instance id>`.
pub fn path(root_dir: &Path, uid: &str, container: &str, id: &str) -> PathBuf {
    root_dir.join("pods").join(uid).join("containers").join(container).join(id)
}

/// Creates the empty, world-writable message file (a non-root container must be able to write it).
pub fn create(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::File::create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o666))
}

/// The last `max` bytes of a file (`None` when it does not exist).
fn tail(path: &Path, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max as u64)))?;
    let mut out = Vec::with_capacity(max.min(usize::try_from(len).unwrap_or(max)));
    f.take(max as u64).read_to_end(&mut out)?;
    Ok(Some(out))
}

/// The message of an instance that ended with `exit_code`. `log`: its log file (for the fallback);
/// `fallback`: the policy is `FallbackToLogsOnError`; `share`: this container's part of the pod's 12 KiB.
pub fn read(file: &Path, log: &Path, fallback: bool, exit_code: i32, share: usize) -> Option<String> {
    let fallback = fallback && exit_code != 0;
    let message = match tail(file, MAX_MESSAGE) {
        Ok(Some(data)) if !data.is_empty() => String::from_utf8_lossy(&data).into_owned(),
        Ok(_) if fallback => from_log(log)?,
        Ok(_) => return None,
        Err(e) => format!("Error on reading termination log {}: {e}", file.display()),
    };
    let mut message = message;
    if message.len() > share {
        let mut end = share;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    Some(message).filter(|m| !m.is_empty())
}

/// The log's last lines: enough of the file's end for 80 lines of 2048 bytes, parsed from the CRI format.
fn from_log(log: &Path) -> Option<String> {
    let raw = tail(log, 64 * 1024).ok()??;
    let text = String::from_utf8_lossy(&raw);
    // The first line may be cut: skip it unless the read started at the file's beginning.
    let whole = fs::metadata(log).is_ok_and(|m| m.len() <= raw.len() as u64);
    let mut out = String::new();
    for line in text.lines().skip(usize::from(!whole)).filter_map(crate::logs::parse_line) {
        out.push_str(&line.text);
        if !line.partial {
            out.push('\n');
        }
    }
    let lines: Vec<&str> = out.split_inclusive('\n').collect();
    let last: String = lines[lines.len().saturating_sub(MAX_LOG_LINES)..].concat();
    let mut start = last.len().saturating_sub(MAX_LOG_BYTES);
    while !last.is_char_boundary(start) {
        start += 1;
    }
    Some(last[start..].to_string()).filter(|m| !m.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_logs_as_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let file = path(dir.path(), "u", "c", "u-c-0");
        create(&file).unwrap();
        assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o666);
        let log = dir.path().join("0.log");
        let lines: String = (1..=100).map(|i| format!("2026-12-01T00:00:00Z stdout F line {i}\n")).collect();
        fs::write(&log, lines).unwrap();
        // Empty file, success: no message, even with the fallback.
        assert_eq!(read(&file, &log, true, 0, MAX_POD_MESSAGES), None);
        // Empty file, failure, fallback: the log's last 80 lines.
        let m = read(&file, &log, true, 1, MAX_POD_MESSAGES).unwrap();
        assert!(m.starts_with("line 21\n") && m.ends_with("line 100\n"), "{m}");
        assert_eq!(read(&file, &log, false, 1, MAX_POD_MESSAGES), None);
        // What the container wrote wins; its end, 4096 bytes at most, within the pod's share.
        fs::write(&file, format!("{}END", "x".repeat(5000))).unwrap();
        let m = read(&file, &log, true, 1, MAX_POD_MESSAGES).unwrap();
        assert_eq!(m.len(), MAX_MESSAGE);
        assert!(m.ends_with("END"));
        assert_eq!(read(&file, &log, true, 1, 100).unwrap().len(), 100);
        // A missing file with the fallback: the logs.
        assert!(read(&dir.path().join("gone"), &log, true, 2, MAX_POD_MESSAGES).is_some());
    }
}
