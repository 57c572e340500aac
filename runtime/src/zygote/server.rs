//! The zygote's side: a poll loop over the request socket and a SIGCHLD self-pipe.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::wire::{self, WireError};
use super::{ExecRequest, ExecTemplate, Exited, Reply, Request};

/// Write end of the SIGCHLD self-pipe (the handler may only make async-signal-safe calls: one write(2)).
static SIGCHLD_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigchld(_: libc::c_int) {
    let fd = SIGCHLD_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; the buffer is a valid one-byte static. A full pipe (EAGAIN)
        // already guarantees a wake-up, so the result is irrelevant.
        unsafe { libc::write(fd, b"c".as_ptr().cast(), 1) };
    }
}

/// Wakes the poll loop on SIGCHLD. (Not signalfd: a blocked SIGCHLD would be inherited by every container.)
fn sigchld_pipe() -> nix::Result<OwnedFd> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    SIGCHLD_PIPE.store(w.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget(w); // lives as long as the zygote; the handler refers to it by number
    let action =
        SigAction::new(SigHandler::Handler(on_sigchld), SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP, SigSet::empty());
    // SAFETY: the handler only loads an atomic and calls write(2), both async-signal-safe.
    unsafe { sigaction(Signal::SIGCHLD, &action) }?;
    Ok(r)
}

/// Serves requests until the agent closes the request socket. Returns the exit code.
pub(super) fn serve(requests: OwnedFd, events: OwnedFd) -> i32 {
    // If the agent dies, so does the zygote; containers keep running (they are re-adopted on restart).
    // SAFETY: prctl(PR_SET_PDEATHSIG) only changes this process's own attributes.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    let _ = prctl_name(b"nodelet-zygote\0");
    let Ok(sigchld) = sigchld_pipe() else { return 1 };
    // Processes the agent knows about (container inits, exec'd processes). Every other child (a half-created
    // container's process after a failure) is reaped silently: a zombie in a container's PID namespace would
    // keep its init from ever finishing its exit.
    let mut tracked: HashSet<i32> = HashSet::new();
    // Exec'd processes still running (a few at a time): reaped by PID first, which costs no scan of the
    // zygote's children (one per container), unlike the `waitpid(-1)` that finds the rest.
    let mut execs: HashSet<i32> = HashSet::new();
    let mut templates = Templates::default();
    let mut scans = Scans::default();
    loop {
        let mut fds =
            [PollFd::new(requests.as_fd(), PollFlags::POLLIN), PollFd::new(sigchld.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, scans.poll_timeout(Instant::now())) {
            Err(nix::Error::EINTR) => continue,
            Err(_) => return 1,
            Ok(_) => {}
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        let (request_ready, child_ready) = (ready(&fds[0]), ready(&fds[1]));
        let mut exits: Vec<Exited> = Vec::new();
        if child_ready {
            let mut buf = [0u8; 64];
            while nix::unistd::read(sigchld.as_raw_fd(), &mut buf).is_ok_and(|n| n > 0) {}
            exits.extend(execs.iter().filter_map(|pid| reap(Some(Pid::from_raw(*pid)))));
            scans.sigchld(!exits.is_empty());
        }
        let now = Instant::now();
        if scans.due(now) {
            exits.extend(std::iter::from_fn(|| reap(None)));
            scans.scanned(now);
        }
        for exited in exits {
            let known = if execs.remove(&exited.pid) {
                true
            } else if tracked.remove(&exited.pid) {
                templates.init_ended(exited.pid);
                true
            } else {
                false
            };
            if known && wire::send(events.as_fd(), &exited, &[]).is_err() {
                return 0;
            }
        }
        if request_ready {
            let (req, fds): (Request, Vec<OwnedFd>) = match wire::recv(requests.as_fd()) {
                Ok(r) => r,
                Err(WireError::Closed) => return 0,
                Err(e) => {
                    let _ = wire::send(requests.as_fd(), &Reply::Failed(e.to_string()), &[]);
                    continue;
                }
            };
            let (reply, pty) = match handle(req, fds, &mut templates) {
                Ok(Handled::Exec(pid)) => {
                    execs.insert(pid);
                    (Reply::Pid(pid), None)
                }
                Ok(Handled::Init(pid, pty)) => {
                    tracked.insert(pid);
                    (Reply::Pid(pid), pty)
                }
                Ok(Handled::Done) => (Reply::Done, None),
                Err(message) => (Reply::Failed(message), None),
            };
            let attached: Vec<_> = pty.iter().map(|f| f.as_fd()).collect();
            if wire::send(requests.as_fd(), &reply, &attached).is_err() {
                return 0;
            }
        }
    }
}

/// How long a SIGCHLD that a reaped exec'd process explained may leave the zygote's other children unscanned.
const SCAN_WITHIN: Duration = Duration::from_millis(100);

/// When the zygote scans all its children (`waitpid(-1)`) for exits. Its children are every container's init, so
/// a scan checks each of them: at hundreds of exec probes a second, a scan per SIGCHLD was a fifth of the zygote's
/// CPU. Exec'd processes are reaped by PID instead; a SIGCHLD none of them explains (an init, a stray child of a
/// failed create) is scanned for at once. One they explain may hide another child's exit (SIGCHLDs merge while
/// pending), so a scan follows within [`SCAN_WITHIN`]: an init's exit is seen that much later at most, under
/// load only (upstream's PLEG relists every second).
#[derive(Debug, Default)]
struct Scans {
    last: Option<Instant>,
    /// A SIGCHLD came since the last scan.
    pending: bool,
    /// One came that no exec'd process explained.
    now: bool,
}

impl Scans {
    fn sigchld(&mut self, explained: bool) {
        self.pending = true;
        self.now |= !explained;
    }

    fn due(&self, now: Instant) -> bool {
        self.pending && (self.now || self.last.is_none_or(|last| now.duration_since(last) >= SCAN_WITHIN))
    }

    fn scanned(&mut self, now: Instant) {
        *self = Scans { last: Some(now), pending: false, now: false };
    }

    /// How long the poll loop may sleep: until a pending scan is due (rounded up to whole milliseconds), or
    /// until a request or SIGCHLD comes.
    fn poll_timeout(&self, now: Instant) -> PollTimeout {
        match self.last.filter(|_| self.pending) {
            Some(last) => {
                let left = (last + SCAN_WITHIN).saturating_duration_since(now);
                PollTimeout::from(u16::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u16::MAX))
            }
            None => PollTimeout::NONE,
        }
    }
}

/// Reaps the child `pid` if it exited, or (`None`) any child that did.
fn reap(pid: Option<Pid>) -> Option<Exited> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                return Some(Exited { pid: pid.as_raw(), code: Some(code), signal: None });
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                return Some(Exited { pid: pid.as_raw(), code: None, signal: Some(sig as i32) });
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

fn prctl_name(name: &[u8]) -> nix::Result<()> {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from a valid pointer.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong) };
    nix::errno::Errno::result(rc).map(drop)
}

/// The exec templates of containers, by ID, with the PID of the container's init.
#[derive(Default)]
struct Templates(HashMap<String, (i32, ExecTemplate)>);

impl Templates {
    /// Forgets the template of the container whose init `pid` was.
    fn init_ended(&mut self, pid: i32) {
        self.0.retain(|_, (init, _)| *init != pid);
    }

    /// Keeps the request's template (if it has one) and returns the container's.
    fn for_request(&mut self, req: &mut ExecRequest) -> Result<&ExecTemplate, String> {
        if let Some(template) = req.template.take() {
            self.0.insert(req.container.clone(), (req.init, template));
        }
        match self.0.get(&req.container) {
            Some((init, template)) if *init == req.init => Ok(template),
            _ => Err(format!("container {:?} is not running (no exec template)", req.container)),
        }
    }

    /// Forgets the template of container `id` (deleted).
    fn forget(&mut self, id: &str) {
        self.0.remove(id);
    }
}

/// What a request made.
enum Handled {
    /// A container's init (reaped on SIGCHLD), with its terminal master if it has one.
    Init(i32, Option<OwnedFd>),
    /// An exec'd process.
    Exec(i32),
    Done,
}

/// Runs one request.
fn handle(req: Request, fds: Vec<OwnedFd>, templates: &mut Templates) -> Result<Handled, String> {
    let chain = |e: &dyn std::error::Error| {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        msg
    };
    match req {
        Request::Create { id, root, bundle, stdio, tty } => {
            let console = tty.then(Console::listen).transpose()?;
            let builder = ContainerBuilder::new(id, SyscallType::default()).with_executor(DefaultSignals);
            let builder = with_stdio(builder, stdio, fds)?;
            let builder = builder.with_root_path(root).map_err(|e| chain(&e))?;
            let builder = builder.with_console_socket(console.as_ref().map(|c| c.path.clone()));
            // libcontainer writes the spec's oomScoreAdj to our own /proc/self/oom_score_adj (its children inherit
            // it): put ours back afterwards so that the next container does not inherit this one's.
            let saved = std::fs::read_to_string("/proc/self/oom_score_adj").ok();
            let built = builder.as_init(bundle).with_systemd(false).with_detach(true).build();
            if let Some(saved) = saved {
                let _ = std::fs::write("/proc/self/oom_score_adj", saved.trim());
            }
            let container = built.map_err(|e| chain(&e))?;
            let pid = container.pid().ok_or("libcontainer returned a container without a pid")?;
            let pty = console.map(Console::receive).transpose()?;
            Ok(Handled::Init(pid.as_raw(), pty))
        }
        Request::Start { id, root } => {
            let mut c = load(&root, &id)?;
            c.start().map_err(|e| chain(&e))?;
            Ok(Handled::Done)
        }
        Request::Exec(mut request) => {
            let template = templates.for_request(&mut request)?;
            super::exec::spawn(super::exec::ExecPlan { template, request: &request }, fds).map(Handled::Exec)
        }
        Request::CreateSandbox { config, dir } => crate::sandbox::create(&config, &dir).map(|()| Handled::Done),
        Request::Delete { id, root, force } => {
            templates.forget(&id);
            if !root.join(&id).exists() {
                return Ok(Handled::Done);
            }
            let mut c = load(&root, &id)?;
            c.delete(force).map_err(|e| chain(&e))?;
            Ok(Handled::Done)
        }
    }
}

/// libcontainer's own executor, with every signal's disposition reset first: a container's init must not
/// inherit the agent's ignored SIGPIPE (Rust's start-up ignores it), as runc's do not.
#[derive(Clone)]
struct DefaultSignals;

impl Executor for DefaultSignals {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        super::exec::default_signals();
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// The socket on which libcontainer hands over a new terminal's master (OCI `--console-socket`). The process
/// connects and sends while we are still inside `build()`; the connection waits in the backlog until we accept.
struct Console {
    listener: UnixListener,
    path: PathBuf,
}

impl Console {
    fn listen() -> Result<Self, String> {
        static NEXT: AtomicI32 = AtomicI32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Short, in /tmp: socket paths are limited to 108 bytes.
        let path = std::env::temp_dir().join(format!("nodelet-console-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| format!("console socket {}: {e}", path.display()))?;
        Ok(Self { listener, path })
    }

    fn receive(self) -> Result<OwnedFd, String> {
        self.listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let (stream, _) = self.listener.accept().map_err(|e| format!("the process sent no terminal: {e}"))?;
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        let (_name, mut fds) = wire::recv_short(stream.as_fd()).map_err(|e| format!("receiving the terminal: {e}"))?;
        fds.pop().ok_or_else(|| "the process sent no terminal descriptor".to_string())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn load(root: &Path, id: &str) -> Result<Container, String> {
    Container::load(root.join(id)).map_err(|e| format!("loading container {id}: {e}"))
}

/// Attaches the descriptors that came with the request to stdin/stdout/stderr as `stdio` says.
fn with_stdio(mut b: ContainerBuilder, stdio: [bool; 3], fds: Vec<OwnedFd>) -> Result<ContainerBuilder, String> {
    let wanted = stdio.iter().filter(|s| **s).count();
    if fds.len() != wanted {
        return Err(format!("expected {wanted} stdio descriptors, got {}", fds.len()));
    }
    let mut fds = fds.into_iter();
    let devnull = || -> Result<OwnedFd, String> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|e| e.to_string())
    };
    let mut next = |attached: bool| match attached {
        true => fds.next().ok_or_else(|| "fewer descriptors than the request names".to_string()),
        false => devnull(),
    };
    b = b.with_stdin(next(stdio[0])?);
    b = b.with_stdout(next(stdio[1])?);
    b = b.with_stderr(next(stdio[2])?);
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sigchld_no_exec_explains_is_scanned_for_at_once() {
        let t0 = Instant::now();
        let mut scans = Scans::default();
        assert!(!scans.due(t0), "nothing came");
        assert_eq!(scans.poll_timeout(t0), PollTimeout::NONE);
        // The first SIGCHLD, explained or not, is scanned for (no scan yet).
        scans.sigchld(true);
        assert!(scans.due(t0));
        scans.scanned(t0);
        // Unexplained: at once, however recent the last scan.
        scans.sigchld(false);
        assert!(scans.due(t0 + Duration::from_millis(1)));
    }

    #[test]
    fn sigchlds_exec_processes_explain_are_scanned_for_within_the_bound() {
        let t0 = Instant::now();
        let mut scans = Scans::default();
        scans.scanned(t0);
        assert_eq!(scans.poll_timeout(t0), PollTimeout::NONE, "no sleep limit without a pending scan");
        let t1 = t0 + Duration::from_millis(30);
        scans.sigchld(true);
        assert!(!scans.due(t1));
        // The poll loop wakes when it is due: 70 ms left, rounded up.
        assert_eq!(scans.poll_timeout(t1), PollTimeout::from(70u16));
        assert_eq!(scans.poll_timeout(t1 + Duration::from_micros(500)), PollTimeout::from(70u16));
        assert_eq!(scans.poll_timeout(t0 + SCAN_WITHIN + Duration::from_millis(5)), PollTimeout::ZERO);
        // More explained ones do not move it.
        scans.sigchld(true);
        assert!(!scans.due(t0 + SCAN_WITHIN - Duration::from_millis(1)));
        assert!(scans.due(t0 + SCAN_WITHIN));
        scans.scanned(t0 + SCAN_WITHIN);
        assert!(!scans.due(t0 + SCAN_WITHIN * 5), "nothing pending");
    }
}
