//! The zygote: a single-threaded helper forked from `main` before any other thread exists, which makes every
//! libcontainer call (they `clone()` and then run non-async-signal-safe code in the child, which is only sound
//! in a single-threaded process). It also contains libcontainer's side effects on its caller (`PR_SET_DUMPABLE`,
//! the spec's `oomScoreAdj` written to `/proc/self`), is the parent of every container process, reaps them on SIGCHLD
//! and reports their exits as events.
//!
//! Two `SOCK_SEQPACKET` pairs connect it to the agent: requests (one reply each, in order) and exit events.

mod exec;
mod server;
pub mod wire;

pub(crate) use exec::{ExecRequest, ExecTemplate};

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::unistd::{ForkResult, Pid, fork};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::error::RuntimeError;

/// A request to the zygote. Descriptors named in a request travel with it as `SCM_RIGHTS`, in field order.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Create (but do not start) a container from the bundle; `stdio` says which of stdin/stdout/stderr are
    /// attached (the rest are /dev/null).
    Create { id: String, root: PathBuf, bundle: PathBuf, stdio: [bool; 3], tty: bool },
    /// Let a created container's init exec its process.
    Start { id: String, root: PathBuf },
    /// Run another process in a running container (see [`ExecRequest`] for the descriptors that come with it).
    Exec(Box<ExecRequest>),
    /// Create a pod sandbox's namespaces as bind-mounted files in `dir`.
    CreateSandbox { config: crate::sandbox::SandboxConfig, dir: PathBuf },
    /// Delete the container (killing it first when `force`).
    Delete { id: String, root: PathBuf, force: bool },
}

/// The zygote's answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    /// The process created (container init or exec'd process).
    Pid(i32),
    /// Done.
    Done,
    /// It failed: libcontainer's error chain.
    Failed(String),
}

/// A process the zygote reaped.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Exited {
    pub pid: i32,
    /// Exit status if it exited.
    pub code: Option<i32>,
    /// Signal number if a signal killed it.
    pub signal: Option<i32>,
}

/// The agent's end of the zygote.
#[derive(Debug)]
pub struct Zygote {
    requests: OwnedFd,
    events: OwnedFd,
    pid: Pid,
}

impl Zygote {
    /// Forks the zygote. Call it first thing in `main`, before any thread (tokio, tracing appenders...) starts:
    /// it refuses to fork a multi-threaded process.
    pub fn fork() -> Result<Self, RuntimeError> {
        let threads = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().to_string())));
        if threads.as_deref() != Some("1") {
            return Err(RuntimeError::Zygote(format!(
                "the zygote must be forked while the process is single-threaded (threads: {})",
                threads.unwrap_or_else(|| "unknown".into())
            )));
        }
        let pair = || socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC);
        let (req_agent, req_zygote) = pair().map_err(RuntimeError::sys("socketpair"))?;
        let (ev_agent, ev_zygote) = pair().map_err(RuntimeError::sys("socketpair"))?;
        // SAFETY: the process has one thread (checked above), so the child is a complete copy in which any code
        // may run; it never returns into the caller's code (it exits with _exit).
        match unsafe { fork() }.map_err(RuntimeError::sys("fork"))? {
            ForkResult::Child => {
                drop(req_agent);
                drop(ev_agent);
                let code = server::serve(req_zygote, ev_zygote);
                // SAFETY: _exit ends the process without running the parent's atexit handlers or flushing stdio
                // buffers that were copied from it.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => Ok(Self { requests: req_agent, events: ev_agent, pid: child }),
        }
    }

    /// The zygote's PID.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// The request half and the socket on which exit events arrive (read by the runtime's event task), both
    /// non-blocking and registered with the reactor: call inside a tokio runtime.
    pub(crate) fn into_parts(self) -> Result<(ZygoteRequests, AsyncFd<OwnedFd>), RuntimeError> {
        let on_reactor = |fd: OwnedFd| {
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
                .map_err(RuntimeError::sys("O_NONBLOCK"))?;
            crate::container::async_fd(fd).map_err(|e| RuntimeError::Zygote(e.to_string()))
        };
        let requests = Arc::new(tokio::sync::Mutex::new(on_reactor(self.requests)?));
        Ok((ZygoteRequests { requests, pid: self.pid.as_raw() }, on_reactor(self.events)?))
    }
}

/// The request half of a [`Zygote`].
#[derive(Debug)]
pub(crate) struct ZygoteRequests {
    /// Held from a request's send to its reply's receipt: replies come in request order, one each.
    requests: Arc<tokio::sync::Mutex<AsyncFd<OwnedFd>>>,
    /// The zygote's PID.
    pub pid: i32,
}

impl ZygoteRequests {
    /// Sends a request and waits for its reply, on the reactor (an exec probe's request costs no thread hop).
    /// The exchange runs as a task of its own: a caller that stops waiting cannot leave a reply unread, which
    /// the next request would take for its own.
    pub(crate) async fn call(&self, req: Request, fds: Vec<OwnedFd>) -> Result<(Reply, Vec<OwnedFd>), RuntimeError> {
        let requests = self.requests.clone();
        let exchange = tokio::spawn(async move {
            let sock = requests.lock().await;
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            let bytes = wire::encode(&req).map_err(|e| RuntimeError::Zygote(e.to_string()))?;
            retry(&sock, Interest::WRITABLE, |fd| wire::send_encoded(fd, &bytes, &borrowed)).await?;
            drop(borrowed);
            drop(fds); // the zygote has its copies
            retry(&sock, Interest::READABLE, wire::recv).await
        });
        exchange.await.map_err(|e| RuntimeError::Zygote(e.to_string()))?
    }
}

/// Runs `op` on the non-blocking socket until it does not block.
async fn retry<T>(
    sock: &AsyncFd<OwnedFd>,
    interest: Interest,
    mut op: impl FnMut(BorrowedFd<'_>) -> Result<T, wire::WireError>,
) -> Result<T, RuntimeError> {
    loop {
        let mut guard = sock.ready(interest).await.map_err(|e| RuntimeError::Zygote(e.to_string()))?;
        match op(sock.get_ref().as_fd()) {
            Err(wire::WireError::Io(nix::Error::EAGAIN)) => guard.clear_ready(),
            other => return other.map_err(|e| RuntimeError::Zygote(e.to_string())),
        }
    }
}
