//! Pod sandboxes without a pause process: the pod's network, IPC and UTS namespaces are created by a throwaway
//! child of the zygote and kept alive as bind mounts of their `/proc/<pid>/ns/*` files under the runtime's state
//! directory; containers join them by path. The host's namespaces are used instead for hostNetwork/hostIPC.
//! A shared PID namespace (`shareProcessNamespace`) is different: it dies with its PID 1, so it is held by a
//! forked child of the zygote that does nothing but reap orphans (the one job upstream's pause process has
//! there); it is killed with the sandbox.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{ForkResult, fork};
use serde::{Deserialize, Serialize};

use crate::config::{Namespace, Namespaces};
use crate::idmap::IdMapping;

/// Which namespaces a pod gets of its own.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Sandbox ID (the pod UID is a good one).
    pub id: String,
    /// The pod's hostname (set in its own UTS namespace).
    pub hostname: Option<String>,
    /// Own network namespace (with loopback up); false for `hostNetwork`.
    pub network: bool,
    /// Own IPC namespace; false for `hostIPC`.
    pub ipc: bool,
    /// Own UTS namespace; upstream gives hostNetwork pods the host's.
    pub uts: bool,
    /// One PID namespace for all containers of the pod (`shareProcessNamespace`).
    pub share_pid: bool,
    /// A user namespace of the pod's own (`hostUsers: false`) with this mapping; the pod's network, IPC and UTS
    /// namespaces are made inside it (so its root may mount sysfs and set its sysctls there).
    pub user: Option<IdMapping>,
}

/// A created sandbox: the namespace files containers join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// Sandbox ID.
    pub id: String,
    /// Its directory (`<root>/sandboxes/<id>`).
    pub dir: PathBuf,
    /// Network namespace file, if the pod has its own.
    pub net: Option<PathBuf>,
    /// IPC namespace file, if the pod has its own.
    pub ipc: Option<PathBuf>,
    /// UTS namespace file, if the pod has its own.
    pub uts: Option<PathBuf>,
    /// The shared PID namespace file, with `shareProcessNamespace`.
    pub pid: Option<PathBuf>,
    /// The pod's user namespace file, with `hostUsers: false`.
    pub user: Option<PathBuf>,
}

const KINDS: [(&str, CloneFlags); 3] =
    [("net", CloneFlags::CLONE_NEWNET), ("ipc", CloneFlags::CLONE_NEWIPC), ("uts", CloneFlags::CLONE_NEWUTS)];

impl Sandbox {
    /// Finds the sandbox's namespace files in `dir` (after an agent restart, too).
    pub fn open(id: &str, dir: &Path) -> Self {
        let file = |name: &str| Some(dir.join(name)).filter(|p| is_nsfs(p));
        Self {
            id: id.into(),
            dir: dir.to_path_buf(),
            net: file("net"),
            ipc: file("ipc"),
            uts: file("uts"),
            pid: file("pid"),
            user: file("user"),
        }
    }

    /// Namespace files that exist but are no longer bind mounts (the agent restarted in another mount namespace,
    /// or someone unmounted them): the sandbox must not be used as is, or its containers would get the host's.
    pub fn broken(&self) -> Vec<&'static str> {
        ["net", "ipc", "uts", "pid", "user"]
            .into_iter()
            .filter(|name| {
                let path = self.dir.join(name);
                path.exists() && !is_nsfs(&path)
            })
            .collect()
    }

    /// Mounts the namespaces again from a live member: `member` (a container init in the pod) for net/ipc/uts,
    /// the holder process for pid. Returns the repaired sandbox, or an error naming what could not be restored.
    pub fn repair(&self, member: Option<i32>) -> Result<Sandbox, String> {
        for name in self.broken() {
            let pid = match name {
                "pid" => read_holder(&self.dir),
                _ => member,
            };
            let pid = pid.ok_or_else(|| format!("no live process holds the sandbox's {name} namespace"))?;
            let source = format!("/proc/{pid}/ns/{name}");
            let target = self.dir.join(name);
            mount(Some(source.as_str()), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(|e| format!("bind-mounting {source} to {}: {e}", target.display()))?;
        }
        Ok(Sandbox::open(&self.id, &self.dir))
    }

    /// The namespaces of a container in this pod. Its PID namespace is the pod's shared one, or its own
    /// (`Private`), or the host's when `host_pid` (`hostPID`).
    pub fn namespaces(&self, host_pid: bool) -> Namespaces {
        let join = |p: &Option<PathBuf>| p.clone().map(Namespace::Join).unwrap_or(Namespace::Host);
        let pid = match (&self.pid, host_pid) {
            (_, true) => Namespace::Host,
            (Some(path), false) => Namespace::Join(path.clone()),
            (None, false) => Namespace::Private,
        };
        Namespaces {
            network: join(&self.net),
            ipc: join(&self.ipc),
            uts: join(&self.uts),
            pid,
            user: self.user.clone(),
        }
    }

    /// Unmounts the namespace files (the namespaces die with their last user) and removes the directory.
    pub fn remove(&self) -> std::io::Result<()> {
        if let Some(holder) = read_holder(&self.dir) {
            // SAFETY: kill(2) of a PID whose start time we just matched against the one recorded at creation.
            unsafe { libc::kill(holder, libc::SIGKILL) };
        }
        for name in ["net", "ipc", "uts", "pid", "user"] {
            let path = self.dir.join(name);
            if is_nsfs(&path) {
                umount2(&path, MntFlags::MNT_DETACH).map_err(std::io::Error::from)?;
            }
        }
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

const HOLDER: &str = "pid.holder";

/// The PID of the shared PID namespace's holder, if it is still the process we started.
fn read_holder(dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join(HOLDER)).ok()?;
    let (pid, start) = text.trim().split_once(' ')?;
    let pid: i32 = pid.parse().ok()?;
    (crate::state::start_time(pid)?.to_string() == start).then_some(pid)
}

/// Zygote side: starts the PID 1 of a new PID namespace as a direct child of the zygote (which reaps it when it
/// is killed), bind-mounts its namespace to `<dir>/pid` and records it in `<dir>/pid.holder`.
fn hold_pid_namespace(dir: &Path) -> Result<(), String> {
    let own = std::fs::File::open("/proc/self/ns/pid").map_err(|e| format!("/proc/self/ns/pid: {e}"))?;
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("unshare(CLONE_NEWPID): {e}"))?;
    // SAFETY: called in the single-threaded zygote; the child runs `hold` and never returns.
    let forked = unsafe { fork() };
    // Our own children are born in our PID namespace again (setns to the caller's own namespace is allowed).
    let restored = nix::sched::setns(&own, CloneFlags::CLONE_NEWPID);
    let child = match forked.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => hold(),
        ForkResult::Parent { child } => child,
    };
    restored.map_err(|e| format!("restoring the zygote's PID namespace for children: {e}"))?;
    let target = dir.join("pid");
    let source = format!("/proc/{child}/ns/pid");
    let kill = || {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    };
    let start = crate::state::start_time(child.as_raw()).ok_or("the PID namespace holder died")?;
    let mounted = std::fs::File::create(&target)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            mount(Some(source.as_str()), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(|e| e.to_string())
        })
        .and_then(|_| std::fs::write(dir.join(HOLDER), format!("{child} {start}")).map_err(|e| e.to_string()));
    if let Err(e) = mounted {
        kill();
        let _ = umount2(&target, MntFlags::MNT_DETACH);
        return Err(format!("keeping the PID namespace: {e}"));
    }
    Ok(())
}

/// PID 1 of a shared PID namespace: reaps the orphans the kernel hands it, and otherwise sleeps.
fn hold() -> ! {
    extern "C" fn wake(_: libc::c_int) {}
    let _ = prctl_name(b"nodelet-pidns\0");
    // Hold nothing of the zygote's: no stdio (it would keep the agent's pipes open), no other descriptors.
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this single-threaded child.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    // SAFETY: closes every descriptor above stderr in this process; nothing here uses them any more.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(wake),
        nix::sys::signal::SaFlags::SA_NOCLDSTOP,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler does nothing, which is async-signal-safe.
    let _ = unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGCHLD, &action) };
    loop {
        nix::unistd::pause();
        while let Ok(status) = nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            if status == nix::sys::wait::WaitStatus::StillAlive {
                break;
            }
        }
    }
}

fn prctl_name(name: &[u8]) -> nix::Result<()> {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from a valid pointer.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong) };
    nix::errno::Errno::result(rc).map(drop)
}

/// Whether `path` is a mounted namespace file.
fn is_nsfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Zygote side: creates the namespaces in a forked child and bind-mounts them into `dir`. On failure nothing is
/// left mounted.
pub(crate) fn create(cfg: &SandboxConfig, dir: &Path) -> Result<(), String> {
    let wanted: Vec<(&str, CloneFlags)> = KINDS
        .into_iter()
        .filter(|(n, _)| match *n {
            "net" => cfg.network,
            "ipc" => cfg.ipc,
            _ => cfg.uts,
        })
        .collect();
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    if cfg.share_pid {
        if cfg.user.is_some() {
            // The holder's PID namespace would be owned by the host's user namespace, where the pod's root may
            // not mount its /proc.
            return Err("a shared PID namespace (shareProcessNamespace) in a user namespace is not supported".into());
        }
        hold_pid_namespace(dir)?;
    }
    if wanted.is_empty() && cfg.user.is_none() {
        return Ok(());
    }
    let flags = wanted.iter().fold(CloneFlags::empty(), |acc, (_, f)| acc | *f);
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    let (done_r, done_w) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    // SAFETY: called in the single-threaded zygote, so the child may run any code; it leaves with _exit.
    let child = match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop(ready_r);
            drop(done_w);
            // With a user namespace: make it, say so, and wait for the parent to write its maps; the other
            // namespaces are then made inside it.
            let mut outcome = Ok(());
            if cfg.user.is_some() {
                outcome = unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| (Step::UserNamespace, e));
                if outcome.is_ok() {
                    let _ = nix::unistd::write(&ready_w, &[b'u', 0, 0, 0, 0, 0]);
                    let mut b = [0u8; 1];
                    if !matches!(nix::unistd::read(done_r.as_raw_fd(), &mut b), Ok(1)) {
                        // SAFETY: the parent gave up; end this forked child without the zygote's exit paths.
                        unsafe { libc::_exit(1) }
                    }
                }
            }
            // One byte of outcome, then on failure the step and its errno, for the parent's message.
            let report = match outcome.and_then(|()| enter(flags, cfg)) {
                Ok(()) => [b'0', 0, 0, 0, 0, 0],
                Err((step, errno)) => {
                    let code = (errno as i32).to_le_bytes();
                    [b'1', step as u8, code[0], code[1], code[2], code[3]]
                }
            };
            let _ = nix::unistd::write(&ready_w, &report);
            let mut b = [0u8; 1];
            let _ = nix::unistd::read(done_r.as_raw_fd(), &mut b);
            // SAFETY: ends this forked child without running the zygote's exit paths.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(ready_w);
    drop(done_r);
    let report = |got: nix::Result<usize>, report: [u8; 6]| match (got, report[0]) {
        (Ok(n), b'0' | b'u') if n >= 1 => Ok(()),
        (Ok(6), b'1') => {
            let errno = nix::errno::Errno::from_raw(i32::from_le_bytes([report[2], report[3], report[4], report[5]]));
            let step = Step::from_byte(report[1]);
            Err(format!("creating namespaces {flags:?} for sandbox {} failed: {}: {errno}", cfg.id, step.name()))
        }
        (got, _) => Err(format!("creating namespaces {flags:?} for sandbox {} failed (child said {got:?})", cfg.id)),
    };
    let mut result = Ok(());
    if let Some(mapping) = cfg.user {
        let mut first = [0u8; 6];
        let got = nix::unistd::read(ready_r.as_raw_fd(), &mut first);
        result = report(got, first).and_then(|()| crate::idmap::write_maps(child.as_raw(), mapping));
        if result.is_ok() {
            let _ = nix::unistd::write(&done_w, b"g");
        }
    }
    if result.is_ok() {
        let mut last = [0u8; 6];
        let got = nix::unistd::read(ready_r.as_raw_fd(), &mut last);
        result = report(got, last);
    }
    let wanted: Vec<&str> = wanted.iter().map(|(n, _)| *n).chain(cfg.user.map(|_| "user")).collect();
    let mut mounted = Vec::new();
    if result.is_ok() {
        for name in &wanted {
            let target = dir.join(name);
            let source = PathBuf::from(format!("/proc/{child}/ns/{name}"));
            let step = std::fs::File::create(&target).map_err(|e| e.to_string()).and_then(|_| {
                mount(Some(&source), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| e.to_string())
            });
            match step {
                Ok(()) => mounted.push(target),
                Err(e) => {
                    result = Err(format!("bind-mounting {} to {}: {e}", source.display(), target.display()));
                    break;
                }
            }
        }
    }
    drop(done_w);
    let _ = nix::sys::wait::waitpid(child, None);
    if result.is_err() {
        for m in &mounted {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
        let _ = Sandbox::open(&cfg.id, dir).remove();
    }
    result
}

/// A step of the sandbox child, to say which one failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Unshare = 0,
    Hostname = 1,
    Loopback = 2,
    UserNamespace = 3,
}

impl Step {
    fn from_byte(b: u8) -> Step {
        match b {
            1 => Step::Hostname,
            2 => Step::Loopback,
            3 => Step::UserNamespace,
            _ => Step::Unshare,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Step::Unshare => "unshare",
            Step::Hostname => "sethostname",
            Step::Loopback => "bringing up the loopback interface",
            Step::UserNamespace => "unshare(CLONE_NEWUSER)",
        }
    }
}

/// In the child: new namespaces, hostname, loopback up.
fn enter(flags: CloneFlags, cfg: &SandboxConfig) -> Result<(), (Step, nix::errno::Errno)> {
    unshare(flags).map_err(|e| (Step::Unshare, e))?;
    if cfg.uts
        && let Some(h) = &cfg.hostname
    {
        nix::unistd::sethostname(h).map_err(|e| (Step::Hostname, e))?;
    }
    if cfg.network {
        loopback_up().map_err(|e| (Step::Loopback, e))?;
    }
    Ok(())
}

/// Sets `lo` up in the current network namespace (SIOCSIFFLAGS: no netlink needed for one flag).
fn loopback_up() -> nix::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let sock: OwnedFd = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into a valid ifreq.
    nix::errno::Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) })?;
    // SAFETY: SIOCGIFFLAGS filled ifru_flags, the active union member.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).unwrap_or(1) };
    // SAFETY: SIOCSIFFLAGS reads a valid ifreq.
    nix::errno::Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) })?;
    Ok(())
}
