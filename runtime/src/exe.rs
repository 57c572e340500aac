//! The runtime's own binary, out of containers' reach (CVE-2019-5736).
//!
//! Threat: a process in a container finds a runtime process in its PID namespace (here: the zygote's child that
//! joins the container for an exec, before it execs the command; or, for a `hostPID` pod, the agent itself),
//! opens its `/proc/<pid>/exe` and writes to it. That file is the nodelet binary, which root on the node runs
//! next: a container escape. runc answered by copying itself into a sealed memfd for every `runc` run (a
//! binary-sized copy per container start), later with temporary read-only mounts.
//!
//! nodelet is not re-executed per container: the zygote and every process that enters a container are forks of
//! the agent. So one exec at startup is enough: [`reexec_read_only`] runs the agent again from a private,
//! read-only bind mount of its own binary that is attached to no mount namespace (`open_tree(OPEN_TREE_CLONE)`,
//! `mount_setattr(MOUNT_ATTR_RDONLY)`, `execveat`). Every process forked from it has that mount as
//! `/proc/<pid>/exe`, and a write through it fails with `EROFS`, for root in a container as for root on the
//! node: making the mount writable again needs a handle on it, which nothing but the kernel holds. No copy, no
//! per-container cost.

use std::ffi::CString;
use std::os::fd::AsRawFd;

use rustix::mount::OpenTreeFlags;

/// Set in the environment of the re-executed agent, so that it does not try again (and the state is visible in
/// `/proc/<pid>/environ` to the node's administrator).
pub const MARKER: &str = "NODELET_READ_ONLY_EXE";

use crate::mount_attr;

/// Whether this process's binary is on a read-only mount (a write through `/proc/<pid>/exe` fails).
pub fn is_read_only() -> bool {
    rustix::fs::statvfs("/proc/self/exe").is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// Re-executes this process (same arguments and environment, plus [`MARKER`]) from a read-only, detached bind
/// mount of its binary; returns only when that is not possible (an error saying why: not root, a kernel without
/// the new mount API) or not needed (`Ok`: the binary is read-only already). Call it first thing, before any
/// thread exists.
pub fn reexec_read_only() -> Result<(), String> {
    if is_read_only() {
        return Ok(());
    }
    if std::env::var_os(MARKER).is_some() {
        return Err("re-executed, but the binary is still on a writable mount".into());
    }
    let flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    let tree = rustix::mount::open_tree(rustix::fs::CWD, "/proc/self/exe", flags)
        .map_err(|e| format!("open_tree(/proc/self/exe): {e}"))?;
    mount_attr::set(&tree, mount_attr::RDONLY | mount_attr::NOSUID | mount_attr::NODEV, None, false)
        .map_err(|e| format!("mount_setattr: {e}"))?;
    let empty = c"";
    let args: Vec<CString> = std::env::args_os()
        .map(|a| CString::new(std::os::unix::ffi::OsStrExt::as_bytes(a.as_os_str())))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = std::os::unix::ffi::OsStrExt::as_bytes(k.as_os_str()).to_vec();
            kv.push(b'=');
            kv.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()));
            CString::new(kv).ok()
        })
        .collect();
    env.push(CString::new(format!("{MARKER}=1")).map_err(|e| e.to_string())?);
    let argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
    let envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).chain([std::ptr::null()]).collect();
    // SAFETY: argv and envp are NULL-terminated arrays of pointers to NUL-terminated strings that outlive the
    // call (it only returns on failure); `tree` is an open descriptor of the binary.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            tree.as_raw_fd(),
            empty.as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    Err(format!("execveat: {}", std::io::Error::last_os_error()))
}
