//! `mount_setattr(2)` on a detached mount tree (libc has the syscall's number; neither nix nor rustix wraps it):
//! the agent's read-only binary (`exe`) and idmapped mounts (`idmap`).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// `MOUNT_ATTR_RDONLY`.
pub(crate) const RDONLY: u64 = 0x1;
/// `MOUNT_ATTR_NOSUID`.
pub(crate) const NOSUID: u64 = 0x2;
/// `MOUNT_ATTR_NODEV`.
pub(crate) const NODEV: u64 = 0x4;
/// `MOUNT_ATTR_IDMAP` (with a user namespace).
pub(crate) const IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Sets `attrs` on the mount tree `tree` (its submounts too when `recursive`); `userns` is the user namespace
/// whose mapping `IDMAP` gives it.
pub(crate) fn set(tree: &OwnedFd, attrs: u64, userns: Option<BorrowedFd<'_>>, recursive: bool) -> std::io::Result<()> {
    let attr = MountAttr {
        attr_set: attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.and_then(|fd| u64::try_from(fd.as_raw_fd()).ok()).unwrap_or_default(),
    };
    let flags = libc::AT_EMPTY_PATH | if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes from `attr`, a live `repr(C)` struct of the
    // kernel's layout, and an empty NUL-terminated path relative to `tree`, an open descriptor we borrow.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &raw const attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}
