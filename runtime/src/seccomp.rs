//! Seccomp profiles: `RuntimeDefault`, and `Localhost` files.
//!
//! containerd's default profile is an allowlist of ~350 syscalls with capability-dependent extras. This one is
//! its complement for the same effect on the default capability set: everything is allowed except the syscalls
//! that containerd's profile does not allow an unprivileged container, which fail with EPERM. (The capability-
//! gated exceptions are applied by the kernel's own capability checks: a container without CAP_SYS_ADMIN cannot
//! mount either way.) A smaller profile is cheaper to load on every container start.

use std::io::Read;
use std::path::Path;

use serde_json::{Value, json};

use crate::error::SpecError;

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

/// The largest profile file read (containerd's default profile, the largest in use, is ~20 KiB).
pub const MAX_PROFILE_BYTES: u64 = 1 << 20;

/// The `linux.seccomp` section for a `Localhost` profile file: the OCI format, or Docker's as containerd reads it
/// (`name` for one syscall, `archMap` for the architectures). Docker's `includes`/`excludes` (rules that depend
/// on capabilities or kernel versions) are refused, not ignored: ignoring them would change what the profile
/// allows. The file is the node administrator's; it is read with a size bound and must be a regular file.
pub fn localhost(path: &Path) -> Result<Value, SpecError> {
    let fail = |reason: String| SpecError::SeccompProfile { path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|e| fail(format!("open {}: {e}", path.display())))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PROFILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| fail(e.to_string()))?;
    if bytes.len() as u64 > MAX_PROFILE_BYTES {
        return Err(fail(format!("larger than {} KiB", MAX_PROFILE_BYTES >> 10)));
    }
    let profile: Value = serde_json::from_slice(&bytes).map_err(|e| fail(format!("decoding seccomp profile: {e}")))?;
    to_oci(profile).map_err(fail)
}

/// A Docker- or OCI-format profile as the OCI `linux.seccomp` object.
fn to_oci(profile: Value) -> Result<Value, String> {
    let Value::Object(mut profile) = profile else { return Err("a seccomp profile is a JSON object".into()) };
    if !profile.get("defaultAction").is_some_and(Value::is_string) {
        return Err("defaultAction is required".into());
    }
    if let Some(arch_map) = profile.remove("archMap") {
        // Docker's per-architecture list: the host's architecture and its sub-architectures.
        let host = host_arch();
        let mut arches = Vec::new();
        for entry in arch_map.as_array().into_iter().flatten() {
            if entry.get("architecture").and_then(Value::as_str) == Some(host) {
                arches.push(Value::from(host));
                arches.extend(entry.get("subArchitectures").and_then(Value::as_array).into_iter().flatten().cloned());
            }
        }
        if !profile.contains_key("architectures") {
            profile.insert("architectures".into(), Value::Array(arches));
        }
    }
    let mut syscalls = Vec::new();
    for rule in profile.remove("syscalls").and_then(|s| s.as_array().cloned()).into_iter().flatten() {
        let Value::Object(mut rule) = rule else { return Err("a syscalls entry is a JSON object".into()) };
        for docker_only in ["includes", "excludes"] {
            if rule.remove(docker_only).is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty())) {
                return Err(format!("syscalls[].{docker_only} is not supported by nodelet yet"));
            }
        }
        rule.remove("comment");
        if let Some(name) = rule.remove("name") {
            let names = rule.entry("names").or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(names) = names {
                names.push(name);
            }
        }
        syscalls.push(Value::Object(rule));
    }
    if !syscalls.is_empty() {
        profile.insert("syscalls".into(), Value::Array(syscalls));
    }
    let known =
        ["defaultAction", "defaultErrnoRet", "architectures", "flags", "listenerPath", "listenerMetadata", "syscalls"];
    let unknown: Vec<&String> = profile.keys().filter(|k| !known.contains(&k.as_str())).collect();
    if !unknown.is_empty() {
        return Err(format!("unknown fields {unknown:?}"));
    }
    Ok(Value::Object(profile))
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "SCMP_ARCH_X86_64",
        "aarch64" => "SCMP_ARCH_AARCH64",
        "riscv64" => "SCMP_ARCH_RISCV64",
        "s390x" => "SCMP_ARCH_S390X",
        "powerpc64" => "SCMP_ARCH_PPC64LE",
        _ => "SCMP_ARCH_NATIVE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_profiles_become_oci() {
        let docker = json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "archMap": [{"architecture": host_arch(), "subArchitectures": ["SCMP_ARCH_X86"]},
                        {"architecture": "SCMP_ARCH_MIPS", "subArchitectures": []}],
            "syscalls": [{"name": "read", "action": "SCMP_ACT_ALLOW"},
                         {"names": ["write"], "action": "SCMP_ACT_ALLOW", "comment": "", "includes": {}}],
        });
        let oci = to_oci(docker).unwrap();
        assert_eq!(oci["architectures"], json!([host_arch(), "SCMP_ARCH_X86"]));
        assert_eq!(oci["syscalls"][0]["names"], json!(["read"]));
        assert!(oci["syscalls"][1].get("comment").is_none());
        let spec: oci_spec::runtime::LinuxSeccomp = serde_json::from_value(oci).unwrap();
        assert_eq!(spec.syscalls().as_ref().unwrap().len(), 2);
    }

    #[test]
    fn profiles_that_cannot_be_honoured_are_errors() {
        assert!(to_oci(json!({"syscalls": []})).unwrap_err().contains("defaultAction"));
        let gated = json!({"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}}]});
        assert!(to_oci(gated).unwrap_err().contains("includes is not supported"));
        assert!(to_oci(json!({"defaultAction": "SCMP_ACT_LOG", "bogus": 1})).unwrap_err().contains("bogus"));
        assert!(to_oci(json!([1])).is_err());
        let dir = tempfile::tempdir().unwrap();
        let missing = localhost(&dir.path().join("none.json")).unwrap_err().to_string();
        assert!(missing.starts_with("failed to generate seccomp spec opts: cannot load seccomp profile"), "{missing}");
        assert!(missing.contains("No such file or directory"), "{missing}");
        assert!(localhost(dir.path()).unwrap_err().to_string().contains("not a regular file"));
        std::fs::write(dir.path().join("audit.json"), r#"{"defaultAction": "SCMP_ACT_LOG"}"#).unwrap();
        assert_eq!(localhost(&dir.path().join("audit.json")).unwrap(), json!({"defaultAction": "SCMP_ACT_LOG"}));
    }
}
