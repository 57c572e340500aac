//! Pod sandboxes without a pause process: the pod's network, IPC and UTS namespaces are created by a throwaway
//! child of the zygote and kept alive as bind mounts of their `/proc/<pid>/ns/*` files under the runtime's state
//! directory; containers join them by path. The host's namespaces are used instead for hostNetwork/hostIPC.
//! (A shared PID namespace needs a live init and is not kept this way: see `Namespaces::pid`.)

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::unistd::{ForkResult, fork};
use serde::{Deserialize, Serialize};

use crate::config::{Namespace, Namespaces};

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
}

const KINDS: [(&str, CloneFlags); 3] =
    [("net", CloneFlags::CLONE_NEWNET), ("ipc", CloneFlags::CLONE_NEWIPC), ("uts", CloneFlags::CLONE_NEWUTS)];

impl Sandbox {
    /// Finds the sandbox's namespace files in `dir` (after an agent restart, too).
    pub fn open(id: &str, dir: &Path) -> Self {
        let file = |name: &str| Some(dir.join(name)).filter(|p| is_nsfs(p));
        Self { id: id.into(), dir: dir.to_path_buf(), net: file("net"), ipc: file("ipc"), uts: file("uts") }
    }

    /// The namespaces of a container in this pod; `pid` is the container's own unless the caller says otherwise.
    pub fn namespaces(&self, pid: Namespace) -> Namespaces {
        let join = |p: &Option<PathBuf>| p.clone().map(Namespace::Join).unwrap_or(Namespace::Host);
        Namespaces { network: join(&self.net), ipc: join(&self.ipc), uts: join(&self.uts), pid }
    }

    /// Unmounts the namespace files (the namespaces die with their last user) and removes the directory.
    pub fn remove(&self) -> std::io::Result<()> {
        for (name, _) in KINDS {
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
    if wanted.is_empty() {
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
            let status = match enter(flags, cfg) {
                Ok(()) => b'0',
                Err(_) => b'1',
            };
            let _ = nix::unistd::write(&ready_w, &[status]);
            let mut b = [0u8; 1];
            let _ = nix::unistd::read(done_r.as_raw_fd(), &mut b);
            // SAFETY: ends this forked child without running the zygote's exit paths.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(ready_w);
    drop(done_r);
    let mut status = [0u8; 1];
    let got = nix::unistd::read(ready_r.as_raw_fd(), &mut status);
    let mut result = match (got, status[0]) {
        (Ok(1), b'0') => Ok(()),
        _ => Err(format!("creating namespaces {flags:?} for sandbox {} failed", cfg.id)),
    };
    let mut mounted = Vec::new();
    if result.is_ok() {
        for (name, _) in &wanted {
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
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// In the child: new namespaces, hostname, loopback up.
fn enter(flags: CloneFlags, cfg: &SandboxConfig) -> nix::Result<()> {
    unshare(flags)?;
    if cfg.uts
        && let Some(h) = &cfg.hostname
    {
        nix::unistd::sethostname(h)?;
    }
    if cfg.network {
        loopback_up()?;
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
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into a valid ifreq.
    nix::errno::Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) })?;
    // SAFETY: SIOCGIFFLAGS filled ifru_flags, the active union member.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads a valid ifreq.
    nix::errno::Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) })?;
    Ok(())
}
