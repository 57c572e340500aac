//! Builds the OCI runtime spec of a container the way containerd's CRI plugin does for the kubelet: process args
//! from image and pod (moby's entrypoint/cmd rules, `$(VAR)` expansion), env, user, capabilities, mounts, masked
//! paths, namespaces, cgroup path and resources.

use std::collections::BTreeMap;

use oci_spec::runtime::Spec;
use serde_json::{Value, json};

use crate::config::{ContainerConfig, Mount, Namespace, Seccomp};
use crate::error::SpecError;
use crate::seccomp;

/// containerd's default capability set for unprivileged containers.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Paths hidden from unprivileged containers (runc/containerd defaults).
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths read-only in unprivileged containers (runc/containerd defaults).
const READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The process's command line: moby's rules as containerd's CRI plugin applies them. `command` replaces the image
/// entrypoint (and then the image cmd is not used); `args` replaces the image cmd.
pub fn process_args(cfg: &ContainerConfig, env: &BTreeMap<String, String>) -> Result<Vec<String>, SpecError> {
    let command: Vec<String> = cfg.command.iter().map(|s| expand(s, env)).collect();
    let mut args: Vec<String> = cfg.args.iter().map(|s| expand(s, env)).collect();
    let mut argv = command;
    if argv.is_empty() {
        if args.is_empty() {
            args = cfg.image.cmd.clone();
        }
        let ep = &cfg.image.entrypoint;
        if !(ep.len() == 1 && ep[0].is_empty()) {
            argv = ep.clone();
        }
    }
    argv.extend(args);
    if argv.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(argv)
}

/// The environment: image env, then the pod's (later wins), with `$(VAR)` references to earlier variables
/// expanded as the kubelet does.
pub fn environment(cfg: &ContainerConfig) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for kv in &cfg.image.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        env.insert(k.to_string(), v.to_string());
    }
    for (k, v) in &cfg.env {
        let value = expand(v, &env);
        env.insert(k.clone(), value);
    }
    env.entry("PATH".into()).or_insert_with(|| DEFAULT_PATH["PATH=".len()..].to_string());
    env
}

/// Kubernetes `$(VAR)` expansion: a defined variable is replaced, an undefined reference is kept verbatim, and
/// `$$` is an escaped `$`.
pub fn expand(input: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        if let Some(after) = tail.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(inner) = tail.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&rest[i..i + 2 + end + 1]),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

/// The capability set: containerd's defaults (all the runtime's own capabilities when privileged), then drop,
/// then add, in upstream's order (add wins over drop; `ALL` in either). "All" is what this process may hand on
/// (its bounding set), as containerd takes its own: a capability the node withholds from the runtime cannot be
/// given, and asking the kernel for it would fail the container.
pub fn capabilities(cfg: &ContainerConfig) -> Result<Vec<String>, SpecError> {
    let known: Vec<String> = caps::all().iter().map(|c| c.to_string()).collect();
    let all: Vec<String> = match caps::read(None, caps::CapSet::Bounding) {
        Ok(set) => set.iter().map(|c| c.to_string()).collect(),
        Err(_) => known.clone(),
    };
    if cfg.security.privileged {
        let mut all = all;
        all.sort();
        return Ok(all);
    }
    let normalize = |name: &str| -> Result<String, SpecError> {
        let upper = name.to_ascii_uppercase();
        if upper == "ALL" {
            return Ok(upper);
        }
        let full = if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") };
        if known.contains(&full) { Ok(full) } else { Err(SpecError::UnknownCapability(name.to_string())) }
    };
    let add: Vec<String> = cfg.security.capabilities_add.iter().map(|c| normalize(c)).collect::<Result<_, _>>()?;
    let drop: Vec<String> = cfg.security.capabilities_drop.iter().map(|c| normalize(c)).collect::<Result<_, _>>()?;
    let mut set: Vec<String> = if drop.iter().any(|c| c == "ALL") {
        Vec::new()
    } else {
        DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).filter(|c| !drop.contains(c)).collect()
    };
    if add.iter().any(|c| c == "ALL") {
        set = all;
    } else {
        set.extend(add);
    }
    set.sort();
    set.dedup();
    Ok(set)
}

fn namespace(kind: &str, ns: &Namespace) -> Option<Value> {
    match ns {
        Namespace::Host => None,
        Namespace::Private => Some(json!({"type": kind})),
        Namespace::Join(path) => Some(json!({"type": kind, "path": path})),
    }
}

fn propagation_option(p: crate::config::Propagation) -> &'static str {
    match p {
        crate::config::Propagation::Private => "rprivate",
        crate::config::Propagation::HostToContainer => "rslave",
        crate::config::Propagation::Bidirectional => "rshared",
    }
}

/// The whole OCI runtime spec.
pub fn build(cfg: &ContainerConfig) -> Result<Spec, SpecError> {
    let env = environment(cfg);
    let args = process_args(cfg, &env)?;
    let user = crate::user::resolve_user(cfg)?;
    let caps = capabilities(cfg)?;
    let privileged = cfg.security.privileged;
    let cwd = cfg.working_dir.clone().or_else(|| cfg.image.working_dir.clone()).filter(|d| !d.is_empty());

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", if privileged { "rw" } else { "ro" }]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["nosuid", "noexec", "nodev", "relatime", if privileged { "rw" } else { "ro" }]}),
    ];
    // /dev/shm: the sandbox's when IPC is shared (it lives with the IPC namespace), else a private tmpfs.
    mounts.push(json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}));
    for m in &cfg.mounts {
        let (Mount::Bind { destination, .. } | Mount::Tmpfs { destination, .. }) = m;
        crate::destinations::check(&cfg.rootfs, destination, privileged)?;
        mounts.push(match m {
            Mount::Bind { source, destination, read_only, recursive, propagation } => {
                let mut options = vec!["rbind", propagation_option(*propagation), if *read_only { "ro" } else { "rw" }];
                if *read_only && *recursive {
                    options.push("rro");
                }
                json!({"destination": destination, "type": "bind", "source": source, "options": options})
            }
            Mount::Tmpfs { destination, size } => {
                let mut options = vec!["nosuid".to_string(), "nodev".to_string(), "mode=1777".to_string()];
                if let Some(size) = size {
                    options.push(format!("size={size}"));
                }
                json!({"destination": destination, "type": "tmpfs", "source": "tmpfs", "options": options})
            }
        });
    }

    let mut namespaces: Vec<Value> = vec![json!({"type": "mount"}), json!({"type": "cgroup"})];
    namespaces.extend(namespace("network", &cfg.namespaces.network));
    namespaces.extend(namespace("ipc", &cfg.namespaces.ipc));
    namespaces.extend(namespace("uts", &cfg.namespaces.uts));
    namespaces.extend(namespace("pid", &cfg.namespaces.pid));
    if let Some(path) = &cfg.namespaces.user {
        namespaces.push(json!({"type": "user", "path": path}));
    }

    let r = &cfg.resources;
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if privileged {
        resources["devices"] = json!([{"allow": true, "access": "rwm"}]);
    }
    if r.cpu_shares.is_some() || r.cpu_quota.is_some() || r.cpu_period.is_some() {
        resources["cpu"] = json!({"shares": r.cpu_shares, "quota": r.cpu_quota, "period": r.cpu_period});
    }
    if let Some(limit) = r.memory_limit {
        resources["memory"] = json!({"limit": limit, "swap": limit});
    }
    if let Some(limit) = r.pids_limit {
        resources["pids"] = json!({"limit": limit});
    }

    let shared = cfg
        .mounts
        .iter()
        .any(|m| matches!(m, Mount::Bind { propagation: crate::config::Propagation::Bidirectional, .. }));
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": cfg.cgroups_path,
        "resources": resources,
        "sysctl": cfg.sysctls,
    });
    if privileged {
        linux["devices"] = json!(crate::devices::host_devices(std::path::Path::new("/dev")));
    }
    if shared {
        // A Bidirectional mount's events must reach the host: the container's root is shared, not a slave.
        linux["rootfsPropagation"] = json!("shared");
    }
    if !privileged {
        if !cfg.security.unmasked_proc {
            linux["maskedPaths"] = json!(MASKED_PATHS);
            linux["readonlyPaths"] = json!(READONLY_PATHS);
        }
        match &cfg.security.seccomp {
            Seccomp::Unconfined => {}
            Seccomp::RuntimeDefault => linux["seccomp"] = seccomp::runtime_default(),
            Seccomp::Localhost(path) => linux["seccomp"] = seccomp::localhost(path)?,
        }
    }

    let process = json!({
        "terminal": cfg.tty,
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids},
        "args": args,
        "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "cwd": cwd.unwrap_or_else(|| "/".into()),
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        // Set only when true: libcontainer 0.7 loads the seccomp filter after dropping capabilities whenever the
        // field is present, which without no_new_privs (and CAP_SYS_ADMIN) the kernel refuses; absent, it loads
        // the filter while it still may.
        "noNewPrivileges": (cfg.security.allow_privilege_escalation == Some(false) && !privileged).then_some(true),
        "oomScoreAdj": cfg.oom_score_adj,
    });

    let spec = json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": cfg.rootfs, "readonly": cfg.security.read_only_root_filesystem},
        // Only a UTS namespace of the container's own gets a hostname: a joined one has the sandbox's already,
        // and the host's must never be renamed.
        "hostname": if cfg.namespaces.uts == Namespace::Private { cfg.hostname.clone() } else { None },
        "mounts": mounts,
        "linux": linux,
    });
    serde_json::from_value(spec).map_err(|e| SpecError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ImageConfig;

    fn cfg(entrypoint: &[&str], cmd: &[&str], command: &[&str], args: &[&str]) -> ContainerConfig {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        ContainerConfig {
            image: ImageConfig { entrypoint: v(entrypoint), cmd: v(cmd), ..Default::default() },
            command: v(command),
            args: v(args),
            ..Default::default()
        }
    }

    #[test]
    fn command_and_args_follow_upstream_rules() {
        let env = BTreeMap::new();
        let argv = |c: &ContainerConfig| process_args(c, &env).unwrap();
        // Image only.
        assert_eq!(argv(&cfg(&["/ep"], &["a"], &[], &[])), ["/ep", "a"]);
        // args replace the image cmd, keep the entrypoint.
        assert_eq!(argv(&cfg(&["/ep"], &["a"], &[], &["b"])), ["/ep", "b"]);
        // command replaces the entrypoint and drops the image cmd.
        assert_eq!(argv(&cfg(&["/ep"], &["a"], &["/c"], &[])), ["/c"]);
        assert_eq!(argv(&cfg(&["/ep"], &["a"], &["/c"], &["x"])), ["/c", "x"]);
        // An entrypoint of [""] means none.
        assert_eq!(argv(&cfg(&[""], &["sh"], &[], &[])), ["sh"]);
        assert!(matches!(process_args(&cfg(&[], &[], &[], &[]), &env), Err(SpecError::NoCommand)));
    }

    #[test]
    fn dollar_parens_expand_like_the_kubelet() {
        let env: BTreeMap<String, String> = [("A".into(), "1".into()), ("B".into(), "two".into())].into();
        assert_eq!(expand("$(A)-$(B)", &env), "1-two");
        assert_eq!(expand("$(MISSING) stays", &env), "$(MISSING) stays");
        assert_eq!(expand("$$(A) is escaped", &env), "$(A) is escaped");
        assert_eq!(expand("cost: $5 $(A", &env), "cost: $5 $(A");
        // Env values may refer to earlier variables, image env included.
        let mut c = cfg(&[], &["sh"], &[], &[]);
        c.image.env = vec!["BASE=/opt".into()];
        c.env = vec![("BIN".into(), "$(BASE)/bin".into()), ("BASE".into(), "/usr".into())];
        let env = environment(&c);
        assert_eq!(env["BIN"], "/opt/bin");
        assert_eq!(env["BASE"], "/usr");
        assert!(env.contains_key("PATH"));
    }

    #[test]
    fn capabilities_add_and_drop_on_containerd_defaults() {
        let mut c = cfg(&[], &["sh"], &[], &[]);
        assert_eq!(capabilities(&c).unwrap().len(), DEFAULT_CAPABILITIES.len());
        c.security.capabilities_drop = vec!["NET_RAW".into(), "cap_chown".into()];
        c.security.capabilities_add = vec!["SYS_ADMIN".into()];
        let set = capabilities(&c).unwrap();
        assert!(!set.contains(&"CAP_NET_RAW".to_string()) && !set.contains(&"CAP_CHOWN".to_string()));
        assert!(set.contains(&"CAP_SYS_ADMIN".to_string()));
        c.security.capabilities_drop = vec!["ALL".into()];
        c.security.capabilities_add = vec!["NET_BIND_SERVICE".into()];
        assert_eq!(capabilities(&c).unwrap(), ["CAP_NET_BIND_SERVICE"]);
        c.security.capabilities_add = vec!["BOGUS".into()];
        assert!(matches!(capabilities(&c), Err(SpecError::UnknownCapability(n)) if n == "BOGUS"));
    }

    #[test]
    fn privileged_and_host_namespaces_shape_the_spec() {
        let mut c = cfg(&[], &["sh"], &[], &[]);
        c.hostname = Some("pod".into());
        let spec = build(&c).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.masked_paths().as_ref().is_some_and(|m| m.contains(&"/proc/kcore".to_string())));
        assert_eq!(spec.hostname().as_deref(), Some("pod"));
        c.security.privileged = true;
        c.namespaces.network = Namespace::Host;
        c.namespaces.uts = Namespace::Host;
        let spec = build(&c).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.masked_paths().is_none());
        let kinds: Vec<String> =
            linux.namespaces().as_ref().unwrap().iter().map(|n| format!("{:?}", n.typ())).collect();
        assert!(!kinds.iter().any(|k| k == "Network" || k == "Uts"), "{kinds:?}");
        assert_eq!(spec.hostname(), &None, "the host's hostname must not be set");
    }
}
