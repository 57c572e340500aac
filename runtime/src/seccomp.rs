//! The `RuntimeDefault` seccomp profile.
//!
//! containerd's default profile is an allowlist of ~350 syscalls with capability-dependent extras. This one is
//! its complement for the same effect on the default capability set: everything is allowed except the syscalls
//! that containerd's profile does not allow an unprivileged container, which fail with EPERM. (The capability-
//! gated exceptions are applied by the kernel's own capability checks: a container without CAP_SYS_ADMIN cannot
//! mount either way.) A smaller profile is cheaper to load on every container start.

use serde_json::{Value, json};

/// Syscalls denied by the default profile (names unknown to this kernel are skipped by libcontainer).
const DENIED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "_sysctl",
    "sysfs",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
];

/// The `linux.seccomp` section of the spec for `RuntimeDefault`.
pub fn runtime_default() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM}],
    })
}
