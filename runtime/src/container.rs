//! The runtime's API: containers created through the zygote, their exits delivered as events, stopped with a
//! grace period, exec'd into, deleted, and found again after an agent restart.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use oci_spec::runtime::Spec;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::cgroup::{self, Layout};
use crate::config::{ContainerConfig, ExecConfig};
use crate::error::RuntimeError;
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::state::{self, Record};
use crate::user::ProcessUser;
use crate::zygote::{ExecRequest, ExecTemplate, Exited, Reply, Request, Zygote, ZygoteRequests, wire};
use crate::{bundle, cgroupfs, idmap};

/// The standard streams of a container or exec'd process; `None` means `/dev/null`.
#[derive(Debug, Default)]
pub struct ContainerIo {
    /// stdin.
    pub stdin: Option<OwnedFd>,
    /// stdout.
    pub stdout: Option<OwnedFd>,
    /// stderr.
    pub stderr: Option<OwnedFd>,
}

/// The caller's ends of [`ContainerIo::pipes`].
#[derive(Debug)]
pub struct IoPipes {
    /// Write end of the container's stdin, if requested.
    pub stdin: Option<File>,
    /// Read end of the container's stdout.
    pub stdout: File,
    /// Read end of the container's stderr.
    pub stderr: File,
}

impl ContainerIo {
    /// Pipes for stdout and stderr (and stdin when `stdin`), returning the container's ends and the caller's.
    ///
    /// The container's stdout and stderr ends are opened read-write: the container itself then always holds a
    /// reader, so it never gets SIGPIPE/EPIPE while the agent is down (it blocks once the 1 MiB pipe is full), and
    /// a restarted agent picks the output up again with [`Runtime::reopen_output`].
    pub fn pipes(stdin: bool) -> Result<(Self, IoPipes), RuntimeError> {
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(RuntimeError::sys("pipe2"));
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (in_r, in_w) = if stdin { pipe().map(|(r, w)| (Some(r), Some(w)))? } else { (None, None) };
        Ok((
            Self { stdin: in_r, stdout: Some(read_write(out_w)?), stderr: Some(read_write(err_w)?) },
            IoPipes { stdin: in_w.map(File::from), stdout: File::from(out_r), stderr: File::from(err_r) },
        ))
    }
}

/// How long [`Runtime::exec_sync`] waits for a process to exit before it reads the output as it comes (a
/// process that writes more than the pipe holds waits for that).
const READ_WHILE_RUNNING_AFTER: Duration = Duration::from_millis(100);

/// An exec'd process's output: the first [`EXEC_OUTPUT`] bytes are kept, the rest read and dropped (the process
/// never blocks on a full pipe, and its output never grows the agent).
#[derive(Default)]
struct Output {
    kept: Vec<u8>,
}

/// Where a non-blocking read of the pipe stopped.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    Eof,
    /// Nothing more to read now (a writer is still open), or an error.
    Open,
}

impl Output {
    fn keep(&mut self, chunk: &[u8]) {
        let limit = usize::try_from(EXEC_OUTPUT).unwrap_or(usize::MAX);
        let room = limit.saturating_sub(self.kept.len()).min(chunk.len());
        self.kept.extend_from_slice(&chunk[..room]);
    }

    /// Reads what the non-blocking pipe holds now.
    fn drain(&mut self, pipe: &OwnedFd) -> Drained {
        let mut chunk = [0u8; 4096];
        loop {
            match nix::unistd::read(pipe.as_raw_fd(), &mut chunk) {
                Ok(0) => return Drained::Eof,
                Ok(n) => self.keep(&chunk[..n]),
                Err(nix::Error::EINTR) => {}
                Err(_) => return Drained::Open,
            }
        }
    }

    /// Reads the non-blocking pipe until end-of-file or `deadline` (a process the command started may hold it
    /// long after the command exits).
    async fn read_until(&mut self, pipe: OwnedFd, deadline: tokio::time::Instant) {
        // Unchecked: it is a pipe's read end, made non-blocking by `exec_sync` (the checks cost two syscalls).
        let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(pipe) else { return };
        let mut chunk = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read(&mut pipe, &mut chunk)).await
        {
            if n == 0 {
                break;
            }
            self.keep(&chunk[..n]);
        }
    }
}

/// Capacity asked for the output pipes: what a container may write while no agent reads (the default
/// `fs.pipe-max-size`).
const OUTPUT_PIPE_BYTES: i32 = 1 << 20;

/// The same pipe opened read-write, with a larger buffer (best effort: a lower `pipe-max-size` keeps the default).
fn read_write(end: OwnedFd) -> Result<OwnedFd, RuntimeError> {
    let _ = nix::fcntl::fcntl(end.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(OUTPUT_PIPE_BYTES));
    let flags = nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC;
    let path = format!("/proc/self/fd/{}", end.as_raw_fd());
    let fd = nix::fcntl::open(path.as_str(), flags, nix::sys::stat::Mode::empty())
        .map_err(RuntimeError::sys("reopening a pipe read-write"))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The inode of a pipe (or other file) descriptor.
fn inode(fd: &OwnedFd) -> Option<u64> {
    nix::sys::stat::fstat(fd.as_raw_fd()).ok().map(|st| st.st_ino)
}

/// How a container's init (or an exec'd process) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerExit {
    /// Exit code as the kubelet reports it: the status, or 128 + signal number when killed by a signal.
    pub code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// The kernel OOM-killed a process in the container's cgroup (the kubelet's `OOMKilled` reason).
    pub oom_killed: bool,
    /// False when the process exited while no agent was its parent (re-adopted after a restart): the kernel
    /// kept no exit status for us, and `code` is 255 like upstream's "unknown" exit.
    pub status_known: bool,
}

/// A process started by [`Runtime::exec`].
#[derive(Debug)]
pub struct ExecProcess {
    /// Its PID (see [`Runtime::wait_exec`]).
    pub pid: i32,
    /// The master side of its terminal, when it was started with one.
    pub pty: Option<File>,
}

/// A created container.
#[derive(Debug, Clone)]
pub struct Container {
    /// Container ID.
    pub id: String,
    /// PID of its init.
    pub pid: i32,
    /// Its cgroup path.
    pub cgroups_path: String,
    pidfd: Arc<OwnedFd>,
    pty: Option<Arc<OwnedFd>>,
    /// Re-adopted after an agent restart: exits are seen through the pidfd only.
    adopted: bool,
    /// Inodes of the stdout and stderr pipes given at create, to find them again after a restart.
    output: Option<(u64, u64)>,
    /// The user its process runs as (unknown for an adopted container: its creator recorded it).
    pub user: Option<ProcessUser>,
}

impl Container {
    /// The master side of the container's terminal (`tty: true`), for attach and the log reader.
    pub fn pty(&self) -> Option<&OwnedFd> {
        self.pty.as_deref()
    }

    /// Whether it was found again after a restart rather than created by this runtime.
    pub fn adopted(&self) -> bool {
        self.adopted
    }
}

/// The embedded runtime. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    zygote: ZygoteRequests,
    root: PathBuf,
    layout: Layout,
    /// v1 and hybrid hosts: the hierarchies containers' cgroupfs views are made of.
    hierarchies: Option<cgroupfs::Hierarchies>,
    /// The agent's and zygote's cgroup2 directory, where moving the zygote starts a grace period (`None` on
    /// legacy hosts, or where that cgroup is not under the mounted tree).
    zygote_cgroup: Option<PathBuf>,
    exits: Mutex<HashMap<i32, watch::Sender<Option<Exited>>>>,
    /// Per container: what its execs share ([`Runtime::exec_template`]), until it is deleted.
    exec_templates: Mutex<HashMap<String, Arc<Template>>>,
}

/// The parts of an exec that come from the container: its process (user, capabilities, env...), seccomp profile
/// and cgroups.
#[derive(Debug)]
struct Template {
    template: ExecTemplate,
    /// The zygote has it (it came with an exec that the zygote answered).
    sent: std::sync::atomic::AtomicBool,
}

impl Inner {
    /// Starts the grace period of the cgroup moves to come (`cgroup::start_grace_period`) on a pool thread.
    fn start_grace_period(&self) {
        if let Some(home) = self.zygote_cgroup.clone() {
            let zygote = self.zygote.pid;
            tokio::runtime::Handle::current().spawn_blocking(move || cgroup::start_grace_period(&home, zygote));
        }
    }
}

/// How long an exec'd process may take from its creation to its `execve` (joining cgroups waits for an RCU
/// grace period, milliseconds; a container whose cgroup is being removed could block it longer).
const EXEC_SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A container's bundle directory.
fn bundle_dir(root: &Path, id: &str) -> PathBuf {
    root.join("bundles").join(id)
}

/// How much of an `exec_sync` process's stdout and stderr is kept.
pub const EXEC_OUTPUT: u64 = 16 * 1024;

impl Runtime {
    /// A runtime keeping its state under `root` (`libcontainer/`, `bundles/`, `records/`, `sandboxes/`, `cgroupfs/`).
    /// Must be called inside a tokio runtime: it spawns the task that receives exit events from the zygote. Makes
    /// this process a child subreaper, so that container processes whose zygote died are still reparented to the
    /// agent.
    pub fn new(zygote: Zygote, root: impl Into<PathBuf>) -> Result<Self, RuntimeError> {
        let root = root.into();
        for dir in ["libcontainer", "bundles", "records", "sandboxes", "cgroupfs"] {
            std::fs::create_dir_all(root.join(dir))
                .map_err(|source| RuntimeError::State { path: root.join(dir), source })?;
        }
        cgroupfs::sweep(&root.join("cgroupfs"));
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes an attribute of this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
        nix::errno::Errno::result(rc).map_err(RuntimeError::sys("PR_SET_CHILD_SUBREAPER"))?;
        let (requests, events) = zygote.into_parts()?;
        let layout = cgroup::layout();
        let hierarchies = match layout {
            Layout::Unified => None,
            Layout::Hybrid | Layout::Legacy => Some(
                cgroupfs::Hierarchies::detect()
                    .map_err(|source| RuntimeError::State { path: "/proc/self/mountinfo".into(), source })?,
            ),
        };
        let zygote_cgroup = match cgroup::own_unified_dir(layout) {
            Ok(dir) => Some(dir),
            Err(e) => {
                tracing::debug!(error = %e, "container creation will not start its grace period early");
                None
            }
        };
        let inner = Arc::new(Inner {
            zygote: requests,
            root,
            layout,
            hierarchies,
            zygote_cgroup,
            exits: Mutex::default(),
            exec_templates: Mutex::default(),
        });
        tokio::spawn(receive_exits(Arc::downgrade(&inner), events));
        Ok(Self { inner })
    }

    /// The cgroup layout detected on this host.
    pub fn layout(&self) -> Layout {
        self.inner.layout
    }

    fn libcontainer_root(&self) -> PathBuf {
        self.inner.root.join("libcontainer")
    }

    fn records(&self) -> PathBuf {
        self.inner.root.join("records")
    }

    async fn call(&self, req: Request, fds: Vec<OwnedFd>) -> Result<(Reply, Vec<OwnedFd>), RuntimeError> {
        self.inner.zygote.call(req, fds).await
    }

    /// Creates a container: builds its spec and bundle, has the zygote create it (its init waits for
    /// [`Runtime::start`]), and records it for re-adoption. On failure nothing is left behind.
    pub async fn create(&self, cfg: &ContainerConfig, io: ContainerIo) -> Result<Container, RuntimeError> {
        let stdio = [io.stdin.is_some(), io.stdout.is_some(), io.stderr.is_some()];
        let output = io.stdout.as_ref().and_then(inode).zip(io.stderr.as_ref().and_then(inode));
        let fds: Vec<OwnedFd> = [io.stdin, io.stdout, io.stderr].into_iter().flatten().collect();
        let inner = self.inner.clone();
        let owned = cfg.clone();
        let created = tokio::task::spawn_blocking(move || {
            // The cgroups first (in planning the cgroupfs view): making one waits while a move into a cgroup
            // holds the kernel's cgroup lock through its grace period.
            let plan = inner.hierarchies.as_ref().map(|h| cgroupfs::Plan::new(h, &owned.cgroups_path)).transpose();
            let plan = plan.map_err(|e| RuntimeError::Create {
                id: owned.id.clone(),
                message: format!("creating its cgroups: {e}"),
            })?;
            inner.start_grace_period();
            let owned = idmap::stage_volumes(&bundle_dir(&inner.root, &owned.id), owned)?;
            let (bundle, cgroupfs, user) = bundle::write(&inner.root, inner.layout, &owned, plan.as_ref())?;
            let root = inner.root.join("libcontainer");
            let req = Request::Create { id: owned.id.clone(), root, bundle, stdio, tty: owned.tty };
            // This pool thread waits for the reply (the rest of creating is blocking work too).
            let reply = tokio::runtime::Handle::current().block_on(inner.zygote.call(req, fds));
            drop(cgroupfs);
            // The init has its copies of the idmapped volumes (or failed): the staged ones go.
            if let Err(e) = idmap::unstage(&bundle_dir(&inner.root, &owned.id)) {
                tracing::warn!(container = %owned.id, error = %e, "detaching staged idmapped mounts");
            }
            reply.map(|(reply, fds)| (reply, fds, user))
        })
        .await
        .map_err(|e| RuntimeError::Zygote(e.to_string()))
        .and_then(|r| r);
        let fail = |message: String| RuntimeError::Create { id: cfg.id.clone(), message };
        let (pid, pty, user) = match created {
            Ok((Reply::Pid(pid), mut fds, user)) => (pid, fds.pop(), user),
            Ok((Reply::Failed(message), _, _)) => {
                self.cleanup(&cfg.id, &cfg.cgroups_path).await;
                return Err(fail(message));
            }
            Ok((other, _, _)) => return Err(RuntimeError::Zygote(format!("unexpected reply {other:?}"))),
            Err(e) => {
                self.cleanup(&cfg.id, &cfg.cgroups_path).await;
                return Err(e);
            }
        };
        let bundle = bundle_dir(&self.inner.root, &cfg.id);
        let setup = async {
            cgroup::join_unified(self.inner.layout, &cfg.cgroups_path, pid)
                .map_err(|e| fail(format!("joining the unified cgroup: {e}")))?;
            let pidfd = pidfd_open(pid).map_err(RuntimeError::sys("pidfd_open"))?;
            let start_time = state::start_time(pid).ok_or_else(|| fail("init exited during create".into()))?;
            let record =
                Record { id: cfg.id.clone(), pid, start_time, cgroups_path: cfg.cgroups_path.clone(), bundle, output };
            record.save(&self.records())?;
            Ok::<_, RuntimeError>(pidfd)
        };
        match setup.await {
            Ok(pidfd) => Ok(Container {
                id: cfg.id.clone(),
                pid,
                cgroups_path: cfg.cgroups_path.clone(),
                pidfd: Arc::new(pidfd),
                pty: pty.map(Arc::new),
                adopted: false,
                output,
                user: Some(user),
            }),
            Err(e) => {
                self.cleanup(&cfg.id, &cfg.cgroups_path).await;
                Err(e)
            }
        }
    }

    /// Starts a created container (its init execs the process).
    pub async fn start(&self, c: &Container) -> Result<(), RuntimeError> {
        match self.call(Request::Start { id: c.id.clone(), root: self.libcontainer_root() }, vec![]).await?.0 {
            Reply::Done => Ok(()),
            Reply::Failed(message) => Err(RuntimeError::Start { id: c.id.clone(), message }),
            other => Err(RuntimeError::Zygote(format!("unexpected reply {other:?}"))),
        }
    }

    /// Waits until the container's init exits.
    pub async fn wait(&self, c: &Container) -> ContainerExit {
        if c.adopted {
            // Not the zygote's child: the pidfd becomes readable when it exits. If its old parent died and it was
            // reparented to us (we are a child subreaper), we can still reap it and learn its status.
            if let Ok(fd) = c.pidfd.try_clone()
                && let Ok(afd) = async_fd(fd)
            {
                let _ = afd.readable().await;
            }
            let oom_killed = cgroup::oom_kills(self.inner.layout, &c.cgroups_path) > 0;
            return match reap_pidfd(&c.pidfd) {
                Some(exited) => to_exit(exited, oom_killed),
                None => ContainerExit { code: 255, signal: None, oom_killed, status_known: false },
            };
        }
        let exited = self.wait_pid(c.pid).await;
        let oom_killed = cgroup::oom_kills(self.inner.layout, &c.cgroups_path) > 0;
        to_exit(exited, oom_killed)
    }

    async fn wait_pid(&self, pid: i32) -> Exited {
        let mut rx = self.exit_slot(pid).subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.expect("waited for Some"),
            // The sender lives in the map until delete, so this only happens when the runtime is dropped.
            Err(_) => Exited { pid, code: None, signal: Some(libc::SIGKILL) },
        }
    }

    fn exit_slot(&self, pid: i32) -> watch::Sender<Option<Exited>> {
        let mut exits = self.inner.exits.lock().unwrap_or_else(|e| e.into_inner());
        exits.entry(pid).or_insert_with(|| watch::channel(None).0).clone()
    }

    /// Sends `signal` to the container's init (through its pidfd: never to a recycled PID). A container that
    /// already exited is not an error.
    pub fn signal(&self, c: &Container, signal: Signal) -> Result<(), RuntimeError> {
        pidfd_send_signal(&c.pidfd, signal).map_err(RuntimeError::sys("pidfd_send_signal"))
    }

    /// Stops the container the kubelet's way: SIGTERM, up to `grace` to exit, then SIGKILL.
    pub async fn stop(&self, c: &Container, grace: Duration) -> ContainerExit {
        self.stop_with(c, Signal::SIGTERM, grace).await
    }

    /// [`Runtime::stop`] with another first signal (a container's stop signal).
    pub async fn stop_with(&self, c: &Container, signal: Signal, grace: Duration) -> ContainerExit {
        let _ = self.signal(c, signal);
        if let Ok(exit) = tokio::time::timeout(grace, self.wait(c)).await {
            return exit;
        }
        let _ = self.signal(c, Signal::SIGKILL);
        self.wait(c).await
    }

    /// Starts `exec` in the running container as the container's own process does (user, capabilities,
    /// no_new_privs, seccomp, working directory, environment plus `exec.env`), with a terminal when `exec.tty`.
    /// Returns once the process has exec'd (the zygote's reply comes then); a failure before that (no such
    /// executable...) is an error.
    pub async fn exec(&self, c: &Container, exec: &ExecConfig, io: ContainerIo) -> Result<ExecProcess, RuntimeError> {
        let fail = |message: String| RuntimeError::Exec { id: c.id.clone(), message };
        let template = self.exec_template(c).map_err(fail)?;
        let stdio = if exec.tty { [false; 3] } else { [io.stdin.is_some(), io.stdout.is_some(), io.stderr.is_some()] };
        let sent = template.sent.load(std::sync::atomic::Ordering::Acquire);
        let request = ExecRequest {
            container: c.id.clone(),
            init: c.pid,
            template: (!sent).then(|| template.template.clone()),
            args: exec.args.clone(),
            env: exec.env.clone(),
            tty: exec.tty,
            stdio,
        };
        let sys = |what: &'static str| move |e: nix::Error| fail(format!("{what}: {e}"));
        let pidfd = c.pidfd.try_clone().map_err(|e| fail(format!("duplicating the pidfd: {e}")))?;
        let mut fds = vec![pidfd];
        let console = if exec.tty {
            let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
                .map_err(sys("a console socket"))?;
            fds.push(theirs);
            Some(ours)
        } else {
            fds.extend([io.stdin, io.stdout, io.stderr].into_iter().flatten());
            None
        };
        // The request's descriptors (our copies of the stdio pipes' ends among them) are closed once it is sent.
        let pid = match self.call(Request::Exec(Box::new(request)), fds).await? {
            (Reply::Pid(pid), _) => {
                template.sent.store(true, std::sync::atomic::Ordering::Release);
                pid
            }
            (Reply::Failed(message), _) => {
                // (Sent again with the next exec: a failure may be a zygote without it.)
                template.sent.store(false, std::sync::atomic::Ordering::Release);
                return Err(fail(message));
            }
            (other, _) => return Err(RuntimeError::Zygote(format!("unexpected reply {other:?}"))),
        };
        // It has exec'd; with a terminal, it sent the master before that.
        let Some(socket) = console else { return Ok(ExecProcess { pid, pty: None }) };
        let receive = tokio::task::spawn_blocking(move || wire::recv_short(socket.as_fd()));
        let failure = match tokio::time::timeout(EXEC_SETUP_TIMEOUT, receive).await {
            Ok(Ok(Ok((_, mut fds)))) => match fds.pop() {
                Some(pty) => return Ok(ExecProcess { pid, pty: Some(File::from(pty)) }),
                None => "the process sent no terminal".to_string(),
            },
            Ok(Ok(Err(e))) => format!("receiving the terminal: {e}"),
            Ok(Err(e)) => format!("receiving the terminal: {e}"),
            Err(_) => format!("the process sent no terminal within {EXEC_SETUP_TIMEOUT:?}"),
        };
        if let Ok(fd) = pidfd_open(pid) {
            let _ = pidfd_send_signal(&fd, Signal::SIGKILL);
        }
        self.wait_exec(pid).await;
        Err(fail(failure))
    }

    /// What every exec into `c` shares, read from its bundle and cgroups once (exec probes run every second) and
    /// sent to the zygote with the first exec.
    fn exec_template(&self, c: &Container) -> Result<Arc<Template>, String> {
        let mut templates = self.inner.exec_templates.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = templates.get(&c.id) {
            return Ok(t.clone());
        }
        let bundle = bundle_dir(&self.inner.root, &c.id);
        let spec = Spec::load(bundle.join("config.json")).map_err(|e| format!("reading the container spec: {e}"))?;
        let process = spec.process().clone().ok_or("the container spec has no process")?;
        let (v1_tasks, unified) = cgroup::exec_cgroups(self.inner.layout, &c.cgroups_path);
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        let user_namespace = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| ns.iter().any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::User));
        let template = Arc::new(Template {
            template: ExecTemplate { process, seccomp, v1_tasks, unified, user_namespace },
            sent: std::sync::atomic::AtomicBool::new(false),
        });
        templates.insert(c.id.clone(), template.clone());
        Ok(template)
    }

    /// Waits for an exec'd process; returns its exit code (128 + signal when killed).
    pub async fn wait_exec(&self, pid: i32) -> i32 {
        let exited = self.wait_pid(pid).await;
        self.inner.exits.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid);
        to_exit(exited, false).code
    }

    /// Runs `exec` to completion with its output captured (stdout and stderr on one pipe, as written; at most
    /// [`EXEC_OUTPUT`] bytes kept, read until the process ends or `timeout`), killed after `timeout` (exec probes,
    /// hooks). Returns (exit code, output); `None` as the code on timeout.
    ///
    /// Most such commands end within milliseconds: their output is read once they have exited, from the pipe's
    /// buffer, without putting the pipe on the reactor (no `epoll_ctl`, no wake-up for its end-of-file; at
    /// hundreds of exec probes a second these are most of an exec's cost). One that runs longer than
    /// [`READ_WHILE_RUNNING_AFTER`], or that leaves a process holding the pipe, is read as it writes.
    pub async fn exec_sync(
        &self,
        c: &Container,
        exec: &ExecConfig,
        timeout: Duration,
    ) -> Result<(Option<i32>, Vec<u8>), RuntimeError> {
        let (out, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(RuntimeError::sys("pipe2"))?;
        nix::fcntl::fcntl(out.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
            .map_err(RuntimeError::sys("fcntl"))?;
        let err_w = out_w.try_clone().map_err(|e| RuntimeError::Zygote(format!("duplicating a pipe: {e}")))?;
        let io = ContainerIo { stdin: None, stdout: Some(out_w), stderr: Some(err_w) };
        let pid = self.exec(c, &ExecConfig { tty: false, ..exec.clone() }, io).await?.pid;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut output = Output::default();
        let quick = tokio::time::Instant::now() + READ_WHILE_RUNNING_AFTER.min(timeout);
        let exited = tokio::time::timeout_at(quick, self.wait_exec(pid)).await.ok();
        if let Some(code) = exited
            && output.drain(&out) == Drained::Eof
        {
            return Ok((Some(code), output.kept));
        }
        let wait = async {
            if exited.is_some() {
                return exited;
            }
            match tokio::time::timeout_at(deadline, self.wait_exec(pid)).await {
                Ok(code) => Some(code),
                Err(_) => {
                    if let Ok(fd) = pidfd_open(pid) {
                        let _ = pidfd_send_signal(&fd, Signal::SIGKILL);
                    }
                    None
                }
            }
        };
        let (code, ()) = tokio::join!(wait, output.read_until(out, deadline));
        Ok((code, output.kept))
    }

    /// Deletes the container: kills what is left of it, removes its cgroups, libcontainer state, bundle and
    /// record.
    pub async fn delete(&self, c: &Container) -> Result<(), RuntimeError> {
        let _ = self.signal(c, Signal::SIGKILL);
        let result = if c.adopted {
            let req = Request::Delete { id: c.id.clone(), root: self.libcontainer_root(), force: true };
            match self.call(req, vec![]).await?.0 {
                Reply::Done => Ok(()),
                Reply::Failed(message) => Err(RuntimeError::Delete { id: c.id.clone(), message }),
                other => Err(RuntimeError::Zygote(format!("unexpected reply {other:?}"))),
            }
        } else {
            // The init is reaped: of libcontainer's delete only its state directory is left to remove (the
            // cgroups go below, faster than its v1 manager would; the spec has no poststop hooks).
            self.wait_pid(c.pid).await;
            match std::fs::remove_dir_all(self.libcontainer_root().join(&c.id)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(RuntimeError::Delete { id: c.id.clone(), message: format!("removing its state: {e}") })
                }
                _ => Ok(()),
            }
        };
        self.remove_files(&c.id, &c.cgroups_path).await;
        self.inner.exits.lock().unwrap_or_else(|e| e.into_inner()).remove(&c.pid);
        self.inner.exec_templates.lock().unwrap_or_else(|e| e.into_inner()).remove(&c.id);
        result
    }

    /// Removes everything of `id` outside libcontainer's own state (and that too, best effort).
    async fn cleanup(&self, id: &str, cgroups_path: &str) {
        let req = Request::Delete { id: id.into(), root: self.libcontainer_root(), force: true };
        let _ = self.call(req, vec![]).await;
        self.remove_files(id, cgroups_path).await;
    }

    /// Blocking work on a pool thread: removing a cgroup that is still busy retries for up to a second.
    async fn remove_files(&self, id: &str, cgroups_path: &str) {
        let (inner, id, cgroups_path) = (self.inner.clone(), id.to_string(), cgroups_path.to_string());
        let removed = tokio::task::spawn_blocking(move || {
            cgroup::remove(inner.layout, &cgroups_path);
            let bundle = bundle_dir(&inner.root, &id);
            // Never walk into a volume: a bundle whose staged mounts cannot be detached stays.
            match idmap::unstage(&bundle) {
                Ok(()) => drop(std::fs::remove_dir_all(&bundle)),
                Err(e) => tracing::warn!(container = %id, error = %e, "a staged idmapped mount stays mounted"),
            }
            Record::remove(&inner.root.join("records"), &id);
        });
        if let Err(e) = removed.await {
            tracing::warn!(error = %e, "removing a container's files");
        }
    }

    /// The containers of a previous agent process that are still alive (re-adopted: they can be signalled,
    /// exec'd into, waited for and deleted). Records of dead ones are cleaned up. Call once at startup.
    pub async fn list(&self) -> Vec<Container> {
        self.list_matching("").await
    }

    /// [`Runtime::list`] for the containers whose IDs start with `prefix` (one pod's: `<uid>-`), e.g. to release
    /// what a failed pod worker held. Only call it for containers that no one else is deleting.
    pub async fn list_matching(&self, prefix: &str) -> Vec<Container> {
        let mut live = Vec::new();
        for r in Record::load_all(&self.records()).into_iter().filter(|r| r.id.starts_with(prefix)) {
            let alive = state::start_time(r.pid) == Some(r.start_time);
            match pidfd_open(r.pid).ok().filter(|_| alive) {
                Some(pidfd) => live.push(Container {
                    id: r.id,
                    pid: r.pid,
                    cgroups_path: r.cgroups_path,
                    pidfd: Arc::new(pidfd),
                    pty: None,
                    adopted: true,
                    output: r.output,
                    user: None,
                }),
                None => {
                    tracing::info!(id = %r.id, "container exited while the agent was down; cleaning up");
                    self.cleanup(&r.id, &r.cgroups_path).await;
                }
            }
        }
        live
    }

    /// Read ends of a re-adopted container's stdout and stderr pipes (opened through its init's descriptors 1
    /// and 2, checked to be the pipes it was created with), so that its output is relayed again after a restart.
    /// `None` when it was created without pipes or its init has replaced them.
    pub fn reopen_output(&self, c: &Container) -> Option<(File, File)> {
        let (out_ino, err_ino) = c.output?;
        let open = |n: i32, ino: u64| {
            let flags = nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK;
            let path = format!("/proc/{}/fd/{n}", c.pid);
            let fd = nix::fcntl::open(path.as_str(), flags, nix::sys::stat::Mode::empty()).ok()?;
            // SAFETY: `open` just returned this descriptor and nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            (inode(&fd) == Some(ino)).then(|| File::from(fd))
        };
        Some((open(1, out_ino)?, open(2, err_ino)?))
    }

    /// Creates a pod sandbox: the pod's own network (loopback up), IPC and UTS namespaces as configured, kept as
    /// namespace files under `<root>/sandboxes/<id>`.
    pub async fn create_sandbox(&self, config: &SandboxConfig) -> Result<Sandbox, RuntimeError> {
        // The pod's containers come next: their cgroup moves' grace period can run while the sandbox and the
        // pod's network are set up.
        self.inner.start_grace_period();
        let dir = self.inner.root.join("sandboxes").join(&config.id);
        let req = Request::CreateSandbox { config: config.clone(), dir: dir.clone() };
        match self.call(req, vec![]).await?.0 {
            Reply::Done => Ok(Sandbox::open(&config.id, &dir)),
            Reply::Failed(message) => Err(RuntimeError::Sandbox { id: config.id.clone(), message }),
            other => Err(RuntimeError::Zygote(format!("unexpected reply {other:?}"))),
        }
    }

    /// Removes a sandbox (after its containers are gone).
    pub async fn remove_sandbox(&self, sandbox: &Sandbox) -> Result<(), RuntimeError> {
        let sb = sandbox.clone();
        tokio::task::spawn_blocking(move || sb.remove())
            .await
            .map_err(|e| RuntimeError::Zygote(e.to_string()))?
            .map_err(|e| RuntimeError::Sandbox { id: sandbox.id.clone(), message: e.to_string() })
    }

    /// The sandboxes that exist on disk (after an agent restart: their namespaces are still mounted).
    pub fn list_sandboxes(&self) -> Vec<Sandbox> {
        let dir = self.inner.root.join("sandboxes");
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        entries.flatten().filter_map(|e| Some(Sandbox::open(e.file_name().to_str()?, &e.path()))).collect()
    }

    /// The runtime's state directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }
}

fn to_exit(e: Exited, oom_killed: bool) -> ContainerExit {
    let code = e.code.unwrap_or_else(|| 128 + e.signal.unwrap_or(0));
    ContainerExit { code, signal: e.signal, oom_killed, status_known: true }
}

/// Receives exit events from the zygote until it goes away (or the runtime is dropped).
async fn receive_exits(inner: std::sync::Weak<Inner>, events: AsyncFd<OwnedFd>) {
    loop {
        let Ok(mut guard) = events.readable().await else { return };
        let received = guard.try_io(|fd| match wire::recv::<Exited>(fd.get_ref().as_fd()) {
            Err(wire::WireError::Io(nix::Error::EAGAIN)) => Err(std::io::ErrorKind::WouldBlock.into()),
            other => Ok(other),
        });
        let exited = match received {
            Err(_would_block) => continue,
            Ok(Ok(Ok((exited, _)))) => exited,
            Ok(Ok(Err(e))) => {
                // A closed socket is the normal end once the runtime (and with it the zygote) is dropped.
                if inner.strong_count() > 0 {
                    tracing::error!("runtime helper stopped reporting exits: {e}");
                }
                return;
            }
            Ok(Err(e)) => {
                tracing::error!("runtime helper stopped reporting exits: {e}");
                return;
            }
        };
        let Some(inner) = inner.upgrade() else { return };
        let mut exits = inner.exits.lock().unwrap_or_else(|e| e.into_inner());
        let slot = exits.entry(exited.pid).or_insert_with(|| watch::channel(None).0);
        slot.send_replace(Some(exited));
    }
}

/// Registers an owned descriptor with tokio's reactor.
pub(crate) fn async_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor stays open and refers to the same
    // file description for the AsyncFd's whole life.
    unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::other)
}

fn pidfd_open(pid: i32) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = RawFd::try_from(nix::errno::Errno::result(fd)?).map_err(|_| nix::errno::Errno::EBADF)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reaps the exited process behind `pidfd` if it is our child.
fn reap_pidfd(pidfd: &OwnedFd) -> Option<Exited> {
    // SAFETY: siginfo_t is plain data; zeroed is a valid initial value for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with P_PIDFD on a pidfd we own, writing into a properly sized siginfo_t.
    let rc = unsafe {
        libc::waitid(libc::P_PIDFD, pidfd.as_raw_fd().unsigned_abs(), &mut info, libc::WEXITED | libc::WNOHANG)
    };
    // SAFETY: waitid succeeded; si_pid/si_code/si_status are initialised (si_pid is 0 if nothing was reaped).
    let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
    if rc != 0 || pid == 0 {
        return None;
    }
    Some(match code {
        libc::CLD_EXITED => Exited { pid, code: Some(status), signal: None },
        _ => Exited { pid, code: None, signal: Some(status) },
    })
}

fn pidfd_send_signal(pidfd: &OwnedFd, signal: Signal) -> nix::Result<()> {
    // SAFETY: pidfd_send_signal with a pidfd we own, a valid signal number, no siginfo and no flags.
    let rc = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal as libc::c_int, std::ptr::null::<u8>(), 0)
    };
    match nix::errno::Errno::result(rc) {
        Ok(_) | Err(nix::Error::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}
