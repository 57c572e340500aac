//! What the agent asks the runtime for: a container described in Kubernetes terms (already resolved: env values,
//! volume host paths, cgroup path), plus the image's config. `spec` turns it into an OCI runtime spec.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The parts of an OCI image config that shape the process (`config.config` in the image JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=value`.
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: Option<String>,
    /// `User`: `uid`, `uid:gid`, `name` or `name:group`.
    pub user: Option<String>,
    /// `StopSignal` (`SIGQUIT`, `QUIT` or `3`).
    pub stop_signal: Option<String>,
}

/// One container to create.
#[derive(Debug, Clone, Default)]
pub struct ContainerConfig {
    /// Unique runtime ID (also the libcontainer state directory name).
    pub id: String,
    /// The container's root filesystem (e.g. an overlay mount made by the image service).
    pub rootfs: PathBuf,
    /// The image's process defaults.
    pub image: ImageConfig,
    /// Kubernetes `command` (replaces the image entrypoint).
    pub command: Vec<String>,
    /// Kubernetes `args` (replaces the image cmd).
    pub args: Vec<String>,
    /// Kubernetes `env`, in order, with values already resolved by the agent; later entries win.
    pub env: Vec<(String, String)>,
    /// Kubernetes `workingDir`.
    pub working_dir: Option<String>,
    /// Security settings from the pod and container security contexts.
    pub security: Security,
    /// Volume mounts, in order.
    pub mounts: Vec<Mount>,
    /// Namespaces to join or share with the host.
    pub namespaces: Namespaces,
    /// The pod's hostname (UTS namespace is the sandbox's).
    pub hostname: Option<String>,
    /// cgroup path (absolute, relative to each hierarchy root), e.g. `/kubepods/burstable/pod<uid>/<id>`.
    pub cgroups_path: String,
    /// Resource limits for the container cgroup.
    pub resources: Resources,
    /// Namespaced sysctls (`pod.spec.securityContext.sysctls`).
    pub sysctls: BTreeMap<String, String>,
    /// Allocate a terminal (`tty: true`).
    pub tty: bool,
    /// Keep stdin open (`stdin: true`).
    pub stdin: bool,
    /// `oom_score_adj` of the container's processes (the kubelet sets it from the QoS class).
    pub oom_score_adj: Option<i32>,
    /// The signal that asks the container to stop (the pod's `lifecycle.stopSignal`, else the image's); SIGTERM
    /// when unset. See [`parse_signal`].
    pub stop_signal: Option<String>,
}

/// A signal as images and pods name it: `SIGQUIT`, `QUIT` or `3`.
pub fn parse_signal(s: &str) -> Option<nix::sys::signal::Signal> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).ok();
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    name.parse().ok()
}

/// Security context, merged from pod and container level by the agent.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// `runAsUser`.
    pub run_as_user: Option<u32>,
    /// `runAsGroup`.
    pub run_as_group: Option<u32>,
    /// `fsGroup`, then `supplementalGroups` (the kubelet's order).
    pub supplemental_groups: Vec<u32>,
    /// `supplementalGroupsPolicy: Strict`: the user's groups in the image's `/etc/group` are not added.
    pub strict_supplemental_groups: bool,
    /// `privileged`.
    pub privileged: bool,
    /// `allowPrivilegeEscalation` (`None` means true, as upstream; false sets no_new_privs).
    pub allow_privilege_escalation: Option<bool>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root_filesystem: bool,
    /// `capabilities.add`, Kubernetes spelling (`NET_ADMIN`) or with the `CAP_` prefix; `ALL` allowed.
    pub capabilities_add: Vec<String>,
    /// `capabilities.drop`, same spelling; `ALL` allowed.
    pub capabilities_drop: Vec<String>,
    /// `seccompProfile.type`.
    pub seccomp: Seccomp,
    /// `procMount: Unmasked` (in a user namespace only): `/proc` without masked or read-only paths.
    pub unmasked_proc: bool,
}

/// The seccomp profile of a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Seccomp {
    /// No filter (`Unconfined`, the kubelet's default when nothing is set).
    #[default]
    Unconfined,
    /// The runtime's default profile (`RuntimeDefault`).
    RuntimeDefault,
    /// A profile file on the node (`Localhost`: `<root-dir>/seccomp/<localhostProfile>`), in the OCI or Docker
    /// JSON format containerd reads; read when the container is created.
    Localhost(PathBuf),
}

/// Mount propagation of a bind mount (Kubernetes' `mountPropagation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Propagation {
    /// `None`: the container sees the source as it was (`rprivate`).
    #[default]
    Private,
    /// `HostToContainer`: mounts made below the source on the host later appear in the container (`rslave`).
    HostToContainer,
    /// `Bidirectional` (privileged containers): and the container's mounts below it appear on the host
    /// (`rshared`, the container's root `shared`).
    Bidirectional,
}

/// A mount into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// A bind mount of a host path (volumes: hostPath, emptyDir, configMap, secret...).
    Bind {
        /// Host path.
        source: PathBuf,
        /// Path in the container.
        destination: String,
        /// Mounted read-only.
        read_only: bool,
        /// With `read_only`: the mounts below the source read-only too (`recursiveReadOnly`, mount_setattr).
        recursive: bool,
        /// Whether mounts below it propagate (Kubernetes' `mountPropagation`).
        propagation: Propagation,
    },
    /// A fresh tmpfs (emptyDir with `medium: Memory`).
    Tmpfs {
        /// Path in the container.
        destination: String,
        /// Size limit in bytes.
        size: Option<u64>,
    },
}

/// Where a namespace comes from: the host's, or a sandbox's (a bind-mounted namespace file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Namespace {
    /// The host's namespace (`hostNetwork`, `hostIPC`, `hostPID`).
    Host,
    /// A fresh namespace of the container's own.
    #[default]
    Private,
    /// Join the namespace at this path (e.g. the sandbox's `/run/nodelet/sandboxes/<pod>/net`).
    Join(PathBuf),
}

/// The namespaces a container is placed in. Mount and cgroup namespaces are always the container's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespaces {
    /// Network.
    pub network: Namespace,
    /// IPC.
    pub ipc: Namespace,
    /// UTS (hostname).
    pub uts: Namespace,
    /// PID (`Join` when `shareProcessNamespace`).
    pub pid: Namespace,
    /// The pod's user namespace to join (`hostUsers: false`); `None` is the host's. Its volumes are then
    /// bind-mounted idmapped, and its rootfs must have been made with the same mapping.
    pub user: Option<PathBuf>,
}

/// cgroup limits of the container, in the kubelet's units.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU shares (v1 semantics; converted to weight on v2 by libcontainer).
    pub cpu_shares: Option<u64>,
    /// CPU quota in µs per `cpu_period`.
    pub cpu_quota: Option<i64>,
    /// CPU period in µs (100 ms upstream).
    pub cpu_period: Option<u64>,
    /// Memory limit in bytes.
    pub memory_limit: Option<i64>,
    /// Max number of processes.
    pub pids_limit: Option<i64>,
    /// An OOM kill takes the whole container (`memory.oom.group`, cgroup v2 only): upstream sets it unless
    /// `singleProcessOOMKill`, which defaults to false on v2. Ignored on v1/hybrid hosts, as upstream does.
    pub oom_group: bool,
}

/// An extra process to run in a running container (`kubectl exec`, exec probes).
#[derive(Debug, Clone, Default)]
pub struct ExecConfig {
    /// The command line.
    pub args: Vec<String>,
    /// Environment (`KEY=value`); empty means the container's.
    pub env: Vec<String>,
    /// Allocate a terminal.
    pub tty: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn signals_by_name_short_name_or_number() {
        assert_eq!(parse_signal("SIGQUIT"), Some(Signal::SIGQUIT));
        assert_eq!(parse_signal("quit"), Some(Signal::SIGQUIT));
        assert_eq!(parse_signal("10"), Some(Signal::SIGUSR1));
        assert_eq!(parse_signal("SIGBOGUS"), None);
        assert_eq!(parse_signal("99"), None);
    }
}
