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

/// A registered descriptor read as a tokio `AsyncRead`. A terminal master whose other side is closed (EIO) reads
/// as end of file, like a pipe.
pub struct Reader(AsyncFd<File>);

impl Reader {
    /// Reads `fd` (made non-blocking).
    pub fn new(fd: OwnedFd) -> io::Result<Reader> {
        register(fd).map(Reader)
    }
}

impl tokio::io::AsyncRead for Reader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::io::Read;
        use std::task::Poll;
        loop {
            let mut guard = match self.0.poll_read_ready(cx) {
                Poll::Ready(Ok(g)) => g,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}
