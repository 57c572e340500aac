//! One nodelet per `--root-dir`: an exclusive `flock` on `<root-dir>/nodelet.lock`, taken before any runtime
//! state is read or taken over, and held for the process's life. The holder's PID is written into the file, so a
//! second instance says which process has it. The kernel drops the lock with the process (kill -9 included).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// The held lock (dropping it releases it).
#[derive(Debug)]
pub struct RootDirLock {
    _file: File,
}

/// Takes the root directory's lock, or says who holds it.
pub fn acquire(root_dir: &Path) -> Result<RootDirLock> {
    std::fs::create_dir_all(root_dir).with_context(|| format!("creating {}", root_dir.display()))?;
    let path = root_dir.join("nodelet.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if let Err(e) = rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        if e != rustix::io::Errno::WOULDBLOCK {
            return Err(std::io::Error::from(e)).with_context(|| format!("locking {}", path.display()));
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        let who = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
        bail!("{} is in use by another nodelet ({who} holds {})", root_dir.display(), path.display());
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(RootDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let held = acquire(dir.path()).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts like another process.
        let err = acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another nodelet"), "{err}");
        assert!(err.contains(&format!("process {}", std::process::id())), "{err}");
        drop(held);
        acquire(dir.path()).unwrap();
    }
}
