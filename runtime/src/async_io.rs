//! Non-blocking, tokio-polled access to the descriptors a process's I/O goes through (an exec's pipes, its
//! terminal's master): the agent copies them without a thread blocked per stream, and a descriptor that never
//! reaches EOF (a background child holding it) costs nothing once the copy is dropped.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;

/// Makes `fd` non-blocking and registers it with the tokio reactor (call inside a runtime).
pub fn register(fd: OwnedFd) -> io::Result<AsyncFd<File>> {
    rustix::io::ioctl_fionbio(&fd, true)?;
    // SAFETY: the File owns the descriptor and the AsyncFd owns the File (handing out only references), so the
    // descriptor stays open and names the same file description for the AsyncFd's whole life.
    unsafe { AsyncFd::register(File::from(fd)) }.map_err(io::Error::from)
}
