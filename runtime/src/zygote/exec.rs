//! Starting a process in a running container (exec probes, `kubectl exec`), without libcontainer's tenant path.
//!
//! libcontainer's tenant build reloads the container's state and spec, scans mountinfo and `/proc/self/cgroup`
//! per v1 controller through hardened procfs handles, and keeps its caller (the zygote, which serves every
//! request one at a time) waiting on channels until the process has exec'd, and moves the process through each
//! cgroup's `cgroup.procs`, which waits for an RCU grace period: ~15 ms per exec here, ~33 execs/s with many
//! containers. This path gives the zygote one clone per exec, and joins the cgroups without that wait; what is
//! left to do happens in the new process, so execs run side by side.
//!
//! The steps, by process:
//! - **zygote**: sets the init's PID namespace for its children (through the init's pidfd: no PID reuse race;
//!   `setns` never moves the caller itself), clones the process right into the container's cgroup2 directory
//!   (`CLONE_INTO_CGROUP`), and restores its own PID namespace for children. It waits until the process has
//!   exec'd or failed (vfork-style, see [`start`]), so its reply is the PID or the failure. The process is the
//!   zygote's child, reaped by its PID (a `waitpid(-1)` scans every child, and the zygote has one per
//!   container); its exit arrives as any container process's does.
//! - **process**: undumpable until it execs; `oom_score_adj` through the host's procfs, then moves itself into the
//!   container's v1 cgroups (hybrid and v1 hosts; through `tasks`, which needs no RCU grace period; while still in
//!   the host's mount namespace, before the cgroup namespace), then joins the
//!   init's mount, network, IPC, UTS and cgroup namespaces at once through the pidfd; stdio or a terminal made in
//!   the container's devpts (the master goes to the agent over its console socket); rlimits, no_new_privs, groups,
//!   user; every descriptor above stdio closed before the working directory is entered (no host directory can
//!   be reached through `/proc/self/fd`: CVE-2024-21626), which is then checked to be inside the root; seccomp
//!   and capabilities as libcontainer orders them (it also provides both, and the terminal); the signal
//!   dispositions reset; `execve`. A failure is left for the zygote in the memory they share (or, where the
//!   process starts as a fork, written to a pipe whose end-of-file on a successful `execve` says it runs).
//!
//! The spec fields acted on are the ones nodelet's spec builder sets (`runtime/src/spec.rs`); the agent refuses
//! the rest before a container exists.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{LinuxSeccomp, Process};
use serde::{Deserialize, Serialize};

/// What every exec into a container shares, resolved by the agent from the container's spec. It travels with
/// the container's first exec only: the zygote keeps it until the container's init is reaped or the container
/// deleted (at hundreds of exec probes a second, encoding and decoding it per exec was a tenth of the agent's CPU).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ExecTemplate {
    /// The container's OCI process: env, cwd, user, capabilities, noNewPrivileges, oomScoreAdj, rlimits (its
    /// args and terminal are the request's).
    pub process: Process,
    /// The container's seccomp profile (none when unconfined or privileged).
    pub seccomp: Option<LinuxSeccomp>,
    /// The `tasks` file of each of the container's v1 cgroups.
    pub v1_tasks: Vec<PathBuf>,
    /// The container's cgroup2 directory (pure v2 and hybrid hosts).
    pub unified: Option<PathBuf>,
    /// The container is in its pod's user namespace (`hostUsers: false`): the process joins that too.
    pub user_namespace: bool,
}

/// One exec. Descriptors travel with the request, in this order: the init's pidfd, the console socket when
/// `tty`, then the attached stdio descriptors as `stdio` says.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ExecRequest {
    /// The container's ID: which template.
    pub container: String,
    /// The container's init (its template goes when the zygote reaps it).
    pub init: i32,
    /// The container's template, when the zygote may not have it yet.
    pub template: Option<ExecTemplate>,
    pub args: Vec<String>,
    /// Added to (or replacing variables of) the container's environment.
    pub env: Vec<String>,
    pub tty: bool,
    /// Which of stdin, stdout and stderr are attached (the rest are `/dev/null`); ignored with a terminal.
    pub stdio: [bool; 3],
}

/// One exec as the zygote runs it: the request and its container's template.
#[derive(Clone, Copy)]
pub(super) struct ExecPlan<'a> {
    pub template: &'a ExecTemplate,
    pub request: &'a ExecRequest,
}

/// `env` with `extra`'s variables added, or replacing those of the same name.
fn merge_env(env: &mut Vec<String>, extra: &[String]) {
    fn key(kv: &str) -> &str {
        kv.split_once('=').map_or(kv, |(k, _)| k)
    }
    for kv in extra {
        env.retain(|e| key(e) != key(kv));
        env.push(kv.clone());
    }
}

/// The namespaces an exec'd process joins itself (PID is set by the zygote for it). The user namespace only
/// when the container has its pod's own: joining the one a process is already in fails.
const NAMESPACES: libc::c_int =
    libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP;

/// PATH when the process's environment has none (the one the spec builder defaults to).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The descriptors of a request, by role.
struct Descriptors {
    pidfd: OwnedFd,
    console: Option<OwnedFd>,
    stdio: [OwnedFd; 3],
}

impl Descriptors {
    fn take(plan: ExecPlan<'_>, fds: Vec<OwnedFd>) -> Result<Self, String> {
        let terminal = plan.request.tty;
        let attached = if terminal { 0 } else { plan.request.stdio.iter().filter(|s| **s).count() };
        let wanted = 1 + usize::from(terminal) + attached;
        if fds.len() != wanted {
            return Err(format!("expected {wanted} descriptors with the exec request, got {}", fds.len()));
        }
        let mut fds = fds.into_iter();
        let mut next = || fds.next().ok_or_else(|| "fewer descriptors than the request names".to_string());
        let pidfd = next()?;
        let console = if terminal { Some(next()?) } else { None };
        let mut stdio = Vec::with_capacity(3);
        for attached in plan.request.stdio {
            stdio.push(if attached && !terminal { next()? } else { dev_null()? });
        }
        let stdio: [OwnedFd; 3] = stdio.try_into().map_err(|_| "three stdio descriptors".to_string())?;
        Ok(Self { pidfd, console, stdio })
    }
}

/// `/dev/null`, opened once (a copy per use: a path walk per exec is a cost at hundreds of execs a second).
fn dev_null() -> Result<OwnedFd, String> {
    static DEV_NULL: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    let opened = match DEV_NULL.get() {
        Some(fd) => fd,
        None => {
            let fd = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null");
            let fd = fd.map_err(|e| format!("/dev/null: {e}"))?;
            DEV_NULL.get_or_init(|| OwnedFd::from(fd))
        }
    };
    opened.try_clone().map_err(|e| format!("/dev/null: {e}"))
}

/// The zygote's own PID namespace, opened once: it goes back to it after every exec.
fn home_pid_namespace() -> Result<&'static std::fs::File, String> {
    static HOME: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    if let Some(home) = HOME.get() {
        return Ok(home);
    }
    let home = std::fs::File::open("/proc/self/ns/pid").map_err(|e| format!("/proc/self/ns/pid: {e}"))?;
    Ok(HOME.get_or_init(|| home))
}

/// Zygote side: starts the process and returns its PID once it has exec'd, or what failed (the process that
/// failed is reaped).
pub(super) fn spawn(plan: ExecPlan<'_>, fds: Vec<OwnedFd>) -> Result<i32, String> {
    let fds = Descriptors::take(plan, fds)?;
    let unified = plan.template.unified.as_deref().map(open_dir).transpose()?;
    let home = home_pid_namespace()?;
    // Children made from here on are born in the container's PID namespace (setns never moves the caller);
    // the zygote's own is restored right after the clone, before anything else can fork.
    nix::sched::setns(&fds.pidfd, CloneFlags::CLONE_NEWPID)
        .map_err(|e| format!("joining the container's PID namespace: {e}"))?;
    let cloned = start(plan, &fds, unified.as_ref());
    if let Err(e) = nix::sched::setns(home, CloneFlags::CLONE_NEWPID) {
        // Every later container would be made in that namespace: the zygote must not go on.
        eprintln!("nodelet zygote: restoring its PID namespace failed: {e}");
        // SAFETY: _exit ends the zygote at once; the agent sees its socket close.
        unsafe { libc::_exit(1) }
    }
    let (pid, failure) = cloned.map_err(|e| format!("cloning the process: {e}"))?;
    match failure {
        None => Ok(pid),
        Some(message) => {
            // It has left the shared memory and is exiting: reap it here (the agent never learns its PID).
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            Err(message)
        }
    }
}

/// clone3's arguments for an exec'd process, born in `cgroup` if any (`CLONE_INTO_CGROUP`: no migration, so no
/// wait for an RCU grace period, as a write to `cgroup.procs` has).
fn clone_args(cgroup: Option<&OwnedFd>) -> nix::Result<CloneArgs> {
    let mut args = CloneArgs { exit_signal: libc::SIGCHLD as u64, ..Default::default() };
    if let Some(dir) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = u64::try_from(dir.as_raw_fd()).map_err(|_| nix::errno::Errno::EBADF)?;
    }
    Ok(args)
}

/// clone3's result as a PID.
fn cloned(rc: i64) -> nix::Result<i32> {
    nix::errno::Errno::result(rc).and_then(|pid| i32::try_from(pid).map_err(|_| nix::errno::Errno::EOVERFLOW))
}

/// What the process allocated and still holds when it execs (or fails): with the zygote's memory shared, the
/// zygote frees it once the process is gone from that memory, and nothing leaks into the zygote's heap.
#[derive(Default)]
struct Kept {
    env: Vec<String>,
    path: Option<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    failure: String,
}

/// The process's part of an exec, handed to it by reference.
struct Child<'a> {
    plan: ExecPlan<'a>,
    fds: &'a Descriptors,
    kept: Kept,
}

/// Runs the process to its `execve`; on a failure, leaves it in `kept.failure` (and writes it to `errors`, the
/// fork path's pipe) and exits 127.
fn child_main(child: &mut Child<'_>, errors: Option<&OwnedFd>) -> ! {
    child.kept.failure = match run(child.plan, child.fds, &mut child.kept, errors) {
        Ok(never) => match never {},
        Err(message) => message,
    };
    if let Some(errors) = errors {
        let _ = nix::unistd::write(errors, child.kept.failure.as_bytes());
    }
    // SAFETY: _exit ends the process without running exit handlers of the zygote's.
    unsafe { libc::_exit(127) }
}

/// Starts the process in the zygote's memory, vfork-style: the zygote waits until the process has exec'd or
/// exited, so no page table is copied and nothing the zygote writes afterwards faults in a copy (a fork's cost
/// grows with the zygote's memory; at hundreds of exec probes a second it was most of the zygote's CPU). The
/// process runs on a stack of its own, with only what the zygote lent it: [`Child`].
///
/// Returns the process and, if it failed before `execve`, what failed.
#[cfg(target_arch = "x86_64")]
fn start(plan: ExecPlan<'_>, fds: &Descriptors, cgroup: Option<&OwnedFd>) -> nix::Result<(i32, Option<String>)> {
    let (base, size) = vfork_stack()?;
    let mut args = clone_args(cgroup)?;
    args.flags |= (libc::CLONE_VM | libc::CLONE_VFORK) as u64;
    args.stack = base;
    args.stack_size = size;
    let mut child = Child { plan, fds, kept: Kept::default() };
    // SAFETY: see `clone3_vfork`: `args` describes the stack made for this (no other process uses it: the zygote
    // is single-threaded and waits until the last process left it), `child` outlives the wait, and `entry` never
    // returns (it execs or exits).
    let rc = unsafe { clone3_vfork(&mut args, entry, (&raw mut child).cast()) };
    let pid = cloned(rc)?;
    let failure = std::mem::take(&mut child.kept.failure);
    drop(child); // frees what the process left in the shared memory
    Ok((pid, Some(failure).filter(|f| !f.is_empty())))
}

/// The process's first function, on its own stack.
#[cfg(target_arch = "x86_64")]
extern "C" fn entry(child: *mut libc::c_void) -> ! {
    // SAFETY: `start` passed a pointer to its `Child`, which stays alive and untouched while the zygote waits
    // (CLONE_VFORK) for this process to exec or exit.
    let child = unsafe { &mut *child.cast::<Child<'_>>() };
    child_main(child, None)
}

/// Elsewhere: a fork (the process gets a copy of the zygote's memory).
/// (The process reports a failure on a pipe, read until its end-of-file: the zygote waits as a vfork's does.)
#[cfg(not(target_arch = "x86_64"))]
fn start(plan: ExecPlan<'_>, fds: &Descriptors, cgroup: Option<&OwnedFd>) -> nix::Result<(i32, Option<String>)> {
    let (errors, errors_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut args = clone_args(cgroup)?;
    // SAFETY: clone3 without CLONE_VM and with no new stack behaves as fork(2): the child gets a copy of the
    // address space and continues here with a return value of 0. The caller is single-threaded, so no lock is
    // held by another thread in the copy. `args` is a valid clone_args of the size passed and outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_clone3, &raw mut args, std::mem::size_of::<CloneArgs>()) };
    if rc == 0 {
        child_main(&mut Child { plan, fds, kept: Kept::default() }, Some(&errors_w));
    }
    drop(errors_w);
    let pid = cloned(rc)?;
    let mut failure = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = nix::unistd::read(errors.as_raw_fd(), &mut buf) {
        if n == 0 || failure.len() > 4096 {
            break;
        }
        failure.extend_from_slice(&buf[..n]);
    }
    Ok((pid, Some(String::from_utf8_lossy(&failure).into_owned()).filter(|f| !f.is_empty())))
}

/// Size of the stack processes start on (the seccomp compiler is the deepest thing they run).
#[cfg(target_arch = "x86_64")]
const VFORK_STACK: usize = 1 << 20;

/// The stack processes start on, made once (one process at a time uses it): (lowest address, size), with a
/// guard page at the bottom.
#[cfg(target_arch = "x86_64")]
fn vfork_stack() -> nix::Result<(u64, u64)> {
    static STACK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if let Some(base) = STACK.get() {
        return Ok((*base as u64, VFORK_STACK as u64));
    }
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing; nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            VFORK_STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: the first page of the mapping just made: an overflowing process faults instead of writing below it.
    if unsafe { libc::mprotect(base, 4096, libc::PROT_NONE) } != 0 {
        return Err(nix::errno::Errno::last());
    }
    let base = STACK.get_or_init(|| base as usize);
    Ok((*base as u64, VFORK_STACK as u64))
}

/// clone3 with the child on a stack of its own: the child calls `entry(arg)` there (which must not return); the
/// caller gets clone3's result. With CLONE_VM | CLONE_VFORK the caller is suspended until the child execs or
/// exits.
///
/// # Safety
///
/// `args` must describe a stack (16-byte aligned top) that nothing else uses while the child runs, and `arg`
/// must stay valid for `entry` until then; with CLONE_VM the child shares the caller's memory, so the caller must
/// be single-threaded (no lock held elsewhere) and suspended (CLONE_VFORK) while the child runs.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_vfork(
    args: &mut CloneArgs,
    entry: extern "C" fn(*mut libc::c_void) -> !,
    arg: *mut libc::c_void,
) -> i64 {
    let rc: i64;
    // SAFETY: the caller's contract. The child starts after `syscall` with rax = 0 and rsp at the top of its
    // stack (the kernel sets it); every other register as the parent's, so r12/r13 still hold `entry` and `arg`.
    // It clears the frame pointer (the bottom of its stack trace) and calls `entry`, which never returns (`ud2`
    // would trap). The parent, with the PID or an error in rax, only jumps past: it touches no stack.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r13",
            "call r12",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => rc,
            in("rdi") std::ptr::from_mut(args),
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") entry,
            in("r13") arg,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    rc
}

/// The kernel's `struct clone_args` (version 2, with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3's flag (libc's constant is an `int`, which it does not fit).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// A cgroup2 directory for `CLONE_INTO_CGROUP`.
fn open_dir(dir: &Path) -> Result<OwnedFd, String> {
    let flags = nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC;
    nix::fcntl::open(dir, flags, nix::sys::stat::Mode::empty())
        .map(|fd| {
            // SAFETY: open just returned this descriptor and nothing else owns it.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        })
        .map_err(|e| format!("opening the cgroup {}: {e}", dir.display()))
}

/// The process itself: everything up to `execve`, which does not return on success.
/// What it allocates and still holds at `execve` goes into `kept` (see [`Kept`]).
fn run(
    plan: ExecPlan<'_>,
    fds: &Descriptors,
    kept: &mut Kept,
    errors: Option<&OwnedFd>,
) -> Result<std::convert::Infallible, String> {
    let Descriptors { pidfd, console, stdio } = fds;
    let process = &plan.template.process;
    let syscall = libcontainer::syscall::syscall::create_syscall();
    // Undumpable until execve: no process of the container may ptrace it or open its /proc files while it still
    // holds the agent's memory and the host's view.
    // SAFETY: prctl(PR_SET_DUMPABLE) only changes this process's attribute.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong) };
    if let Some(adj) = process.oom_score_adj() {
        // Through the host's procfs, before any container mount is joined (CVE-2025-52881: a container's /proc
        // could redirect the write).
        std::fs::write("/proc/self/oom_score_adj", adj.to_string()).map_err(|e| format!("oom_score_adj: {e}"))?;
    }
    // Into the container's v1 cgroups before its cgroup namespace (the cgroup2 one it was born in). Writing 0
    // to `tasks` moves the writing thread, this whole single-threaded process, without the lock that a write to
    // `cgroup.procs` takes, and so without its wait for an RCU grace period (~12 ms here, most of an exec).
    for tasks in &plan.template.v1_tasks {
        std::fs::write(tasks, "0").map_err(|e| format!("joining the cgroup {}: {e}", display_dir(tasks)))?;
    }
    let user = if plan.template.user_namespace { libc::CLONE_NEWUSER } else { 0 };
    // SAFETY: setns with a pidfd and a mask joins those namespaces of the process the pidfd refers to, all at once;
    // the descriptor is valid for the call.
    let rc = unsafe { libc::setns(pidfd.as_raw_fd(), NAMESPACES | user) };
    nix::errno::Errno::result(rc).map_err(|e| format!("joining the container's namespaces: {e}"))?;
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    match console {
        // A terminal in the container's devpts: the master goes to the agent, the slave becomes stdio.
        // (It closes its copy of the socket: this process's descriptors are its own.)
        Some(socket) => libcontainer::tty::setup_console(syscall.as_ref(), socket.as_raw_fd(), false)
            .map_err(|e| format!("setting up the terminal: {e}"))?,
        None => {
            for (fd, target) in stdio.iter().zip(0..) {
                nix::unistd::dup2(fd.as_raw_fd(), target).map_err(|e| format!("stdio: {e}"))?;
            }
        }
    }
    for rlimit in process.rlimits().iter().flatten() {
        syscall.set_rlimit(rlimit).map_err(|e| format!("setting rlimit {:?}: {e}", rlimit.typ()))?;
    }
    let no_new_privileges = process.no_new_privileges() == Some(true);
    if no_new_privileges {
        // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) only changes this process's attribute.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) };
        nix::errno::Errno::result(rc).map_err(|e| format!("no_new_privs: {e}"))?;
    }
    let user = process.user();
    if let Some(umask) = user.umask() {
        let mode = nix::sys::stat::Mode::from_bits(umask).ok_or_else(|| format!("invalid umask {umask:o}"))?;
        nix::sys::stat::umask(mode);
    }
    let env = &mut kept.env;
    *env = process.env().clone().unwrap_or_default();
    merge_env(env, &plan.request.env);
    if !env.iter().any(|e| e.strip_prefix("HOME=").is_some_and(|v| !v.is_empty())) {
        // As runc: the user's home from the container's /etc/passwd, else /. Parsed here, not through NSS,
        // which would follow the image's nsswitch.conf and could load the image's libraries into this process.
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let home = home_of(&passwd, user.uid()).unwrap_or("/");
        env.retain(|e| !e.starts_with("HOME="));
        env.push(format!("HOME={home}"));
    }
    // Nothing of the agent's survives into the container: every descriptor above stdio (but the fork path's error
    // pipe, close-on-exec) is closed, before the working directory is entered.
    close_all_but(errors.map(AsRawFd::as_raw_fd))?;
    // As root first (the user may not be able to enter it, in which case it is entered again below).
    let cwd = process.cwd();
    let entered = nix::unistd::chdir(cwd).is_ok();
    let gids: Vec<Gid> = user.additional_gids().iter().flatten().map(|g| Gid::from_raw(*g)).collect();
    if !gids.is_empty() {
        syscall.set_groups(&gids).map_err(|e| format!("setting supplementary groups: {e}"))?;
    }
    drop(gids);
    syscall
        .set_id(Uid::from_raw(user.uid()), Gid::from_raw(user.gid()))
        .map_err(|e| format!("setting uid {} and gid {}: {e}", user.uid(), user.gid()))?;
    if !entered {
        nix::unistd::chdir(cwd).map_err(|e| format!("chdir to cwd (\"{}\"): {e}", cwd.display()))?;
    }
    inside_root()?;
    if let Some(seccomp) = plan.template.seccomp.as_ref().filter(|_| !no_new_privileges) {
        // Without no_new_privs, loading a filter needs CAP_SYS_ADMIN: before the capabilities go.
        libcontainer::seccomp::initialize_seccomp(seccomp).map_err(|e| format!("loading seccomp: {e}"))?;
    }
    libcontainer::capabilities::reset_effective(syscall.as_ref()).map_err(|e| format!("capabilities: {e}"))?;
    if let Some(caps) = process.capabilities() {
        libcontainer::capabilities::drop_privileges(caps, syscall.as_ref())
            .map_err(|e| format!("dropping capabilities: {e}"))?;
    }
    if let Some(seccomp) = plan.template.seccomp.as_ref().filter(|_| no_new_privileges) {
        libcontainer::seccomp::initialize_seccomp(seccomp).map_err(|e| format!("loading seccomp: {e}"))?;
    }
    let args = &plan.request.args;
    let name = args.first().ok_or("no command")?;
    let path = lookup(name, env)?;
    default_signals();
    let c = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    kept.argv = args.iter().map(|a| c(a)).collect::<Result<Vec<_>, _>>()?;
    kept.envp = env.iter().map(|e| c(e)).collect::<Result<Vec<_>, _>>()?;
    let path = CString::new(path.into_os_string().into_encoded_bytes()).map_err(|_| "a NUL byte in the path")?;
    let path = kept.path.insert(path);
    nix::unistd::execve(path, &kept.argv, &kept.envp).map_err(|e| format!("exec: {name:?}: {}", e.desc()))
}

/// The home directory of `uid` in an `/etc/passwd` text (`name:x:uid:gid:gecos:home:shell`).
fn home_of(passwd: &str, uid: u32) -> Option<&str> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 7 && fields[2].parse() == Ok(uid) && !fields[5].is_empty() { Some(fields[5]) } else { None }
    })
}

/// `/sys/fs/cgroup/memory/a/b` for `/sys/fs/cgroup/memory/a/b/tasks`.
fn display_dir(procs: &Path) -> String {
    procs.parent().unwrap_or(procs).display().to_string()
}

/// Closes every descriptor from 3 up except `keep`.
fn close_all_but(keep: Option<RawFd>) -> Result<(), String> {
    let close_range = |first: u32, last: u32| {
        if first > last {
            return Ok(());
        }
        // SAFETY: close_range only closes descriptors of this process; none of those closed is used afterwards
        // (the process keeps only stdio and `keep`).
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        nix::errno::Errno::result(rc).map(drop).map_err(|e| format!("closing descriptors: {e}"))
    };
    let Some(keep) = keep else { return close_range(3, u32::MAX) };
    let keep = u32::try_from(keep).map_err(|_| "a negative descriptor".to_string())?;
    if keep >= 3 {
        close_range(3, keep - 1)?;
    }
    close_range(keep.max(2) + 1, u32::MAX)
}

/// The working directory must be inside the container's root: `getcwd` reports a directory outside it as
/// unreachable (the check runc makes against CVE-2024-21626).
fn inside_root() -> Result<(), String> {
    match nix::unistd::getcwd() {
        Ok(dir) if dir.is_absolute() => Ok(()),
        Ok(dir) => Err(format!("the working directory is outside the container's root: {}", dir.display())),
        Err(e) => Err(format!("the working directory is outside the container's root: {e}")),
    }
}

/// The executable for `name`: itself if it has a slash, else the first regular executable file of that name in
/// the process's PATH (as `execvp` would search it, but in the process's environment, not the zygote's).
fn lookup(name: &str, env: &[String]) -> Result<PathBuf, String> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = env.iter().rev().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(name))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|m| m.is_file())
                && nix::unistd::access(candidate, nix::unistd::AccessFlags::X_OK).is_ok()
        })
        .ok_or_else(|| format!("exec: {name:?}: executable file not found in $PATH"))
}

/// Every signal back to its default disposition and unblocked, as a process started by runc has them: the agent
/// ignores SIGPIPE (Rust's start-up does), the zygote handles SIGCHLD, and glibc's own two real-time signals
/// (32 and 33, which its `sigaction` refuses to touch) are ignored in this process tree.
pub(crate) fn default_signals() {
    /// The kernel's `struct sigaction` (x86_64 and aarch64 share this layout); no restorer is needed for SIG_DFL.
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 };
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction with SIG_DFL installs no handler; the struct outlives the call and has the kernel's
        // layout on the architectures nodelet builds for; the old action is not read (null).
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                &raw const default,
                std::ptr::null_mut::<KernelSigaction>(),
                std::mem::size_of::<u64>(),
            )
        };
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_env_adds_to_and_replaces_the_containers() {
        let mut env = vec!["PATH=/bin".to_string(), "A=1".to_string(), "B=2".to_string()];
        merge_env(&mut env, &["A=x".to_string(), "C=3".to_string(), "EMPTY=".to_string()]);
        assert_eq!(env, ["PATH=/bin", "B=2", "A=x", "C=3", "EMPTY="]);
    }

    #[test]
    fn home_comes_from_the_passwd_text() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\n# comment\napp:x:1000:1000::/home/app:/bin/sh\nnohome:x:7:7:::/bin/sh\nbad:x\n";
        assert_eq!(home_of(passwd, 0), Some("/root"));
        assert_eq!(home_of(passwd, 1000), Some("/home/app"));
        assert_eq!(home_of(passwd, 7), None);
        assert_eq!(home_of(passwd, 4242), None);
    }

    #[test]
    fn lookup_searches_the_process_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("tool");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        let not_exec = dir.path().join("data");
        std::fs::write(&not_exec, "").unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let env = vec![format!("PATH=/nonexistent:{}", dir.path().display())];
        assert_eq!(lookup("tool", &env).unwrap(), bin);
        assert_eq!(lookup("/abs/x", &env).unwrap(), PathBuf::from("/abs/x"));
        // A directory or a missing name is not an executable; the message is runc's.
        assert_eq!(lookup("nothere", &env).unwrap_err(), "exec: \"nothere\": executable file not found in $PATH");
        if nix::unistd::geteuid().is_root() {
            // root passes access(X_OK) only for files with an execute bit.
            assert!(lookup("data", &env).is_err());
        }
    }
}
