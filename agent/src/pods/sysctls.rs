//! Which `pod.spec.securityContext.sysctls` a pod may set, as the kubelet's sysctl admit handler decides it: the
//! safe set always, the `allowedUnsafeSysctls` patterns of the configuration too, and only sysctls of a
//! namespace the pod does not share with the host (a pod on the host network may not set `net.*`, one with host
//! IPC not `kernel.shm*`...). Anything else is refused with `SysctlForbidden`, never applied to the host. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

/// The sysctls upstream calls safe: namespaced, and unable to affect other pods or the node. All are namespaced
/// in every kernel nodelet runs on (≥ 4.15), so none is dropped for the kernel version as upstream may.
pub const SAFE: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_slow_start_after_idle",
    "net.ipv4.tcp_notsent_lowat",
];

/// The kernel namespace a sysctl belongs to (what sharing the host's makes it unsafe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    Ipc,
    Net,
    Uts,
    User,
}

impl Namespace {
    /// Upstream's spelling in messages.
    fn name(self) -> &'static str {
        match self {
            Namespace::Ipc => "IPC",
            Namespace::Net => "Net",
            Namespace::Uts => "UTS",
            Namespace::User => "User",
        }
    }

    /// The namespace of a (normalized) sysctl name or prefix, if it is namespaced at all.
    pub fn of(name: &str) -> Option<Namespace> {
        let exact = match name {
            "kernel.domainname" => Some(Namespace::Uts),
            "kernel.sem"
            | "kernel.shmall"
            | "kernel.shmmax"
            | "kernel.shmmni"
            | "kernel.shm_rmid_forced"
            | "kernel.shm"
            | "kernel.msgmax"
            | "kernel.msgmnb"
            | "kernel.msgmni"
            | "kernel.msg" => Some(Namespace::Ipc),
            _ => None,
        };
        exact.or_else(|| {
            let under = |prefix: &str| name.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('.'));
            if under("net") {
                Some(Namespace::Net)
            } else if under("fs.mqueue") {
                Some(Namespace::Ipc)
            } else if under("user") {
                Some(Namespace::User)
            } else {
                None
            }
        })
    }
}

/// A sysctl name with `.` separators: `net/ipv4/conf/eth0.100/rp_filter` is `net.ipv4.conf.eth0/100.rp_filter`
/// (the separators swap when the first one is a slash), as the kernel's `sysctl` tool and upstream read it.
pub fn normalize(name: &str) -> String {
    match name.find(['.', '/']) {
        Some(i) if name.as_bytes()[i] == b'/' => name
            .chars()
            .map(|c| match c {
                '.' => '/',
                '/' => '.',
                c => c,
            })
            .collect(),
        _ => name.to_string(),
    }
}

/// Whether `pattern` is a valid sysctl name or prefix pattern (`net.core.*`, `kernel.msg*`): upstream's syntax,
/// at most 253 characters, lower-case segments separated by `.` or `/`, a `*` only at the very end.
fn valid_pattern(pattern: &str) -> bool {
    if pattern.is_empty() || pattern.len() > 253 {
        return false;
    }
    let segments: Vec<&str> = pattern.split(['.', '/']).collect();
    let last = segments.len() - 1;
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    segments.iter().enumerate().all(|(i, s)| {
        let (body, star) = match s.strip_suffix('*') {
            Some(body) if i == last => (body, true),
            _ => (*s, false),
        };
        let bytes = body.as_bytes();
        if bytes.is_empty() {
            return star;
        }
        bytes.first().is_some_and(edge)
            && (star || bytes.last().is_some_and(edge))
            && bytes.iter().all(|b| edge(b) || *b == b'-' || *b == b'_')
    })
}

/// The sysctls this node lets pods set.
#[derive(Debug, Clone)]
pub struct Allowlist {
    exact: BTreeMap<String, Namespace>,
    prefixes: BTreeMap<String, Namespace>,
}

impl Allowlist {
    /// The safe set plus `allowed_unsafe` (names or `prefix*` patterns); an invalid or non-namespaced pattern is
    /// a configuration error, as upstream refuses to start with it.
    pub fn new(allowed_unsafe: &[String]) -> Result<Allowlist, String> {
        let mut list = Allowlist { exact: BTreeMap::new(), prefixes: BTreeMap::new() };
        for pattern in SAFE.iter().copied().chain(allowed_unsafe.iter().map(String::as_str)) {
            if !valid_pattern(pattern) {
                return Err(format!(
                    "sysctl {pattern:?} must have at most 253 characters and be a sysctl name or a prefix ending in *"
                ));
            }
            let normalized = normalize(pattern);
            let (name, prefixed) = match normalized.find('*') {
                Some(i) => (normalized[..i].to_string(), true),
                None => (normalized, false),
            };
            let Some(ns) = Namespace::of(&name) else {
                return Err(format!("the sysctls {name:?} are not known to be namespaced"));
            };
            if prefixed {
                list.prefixes.insert(name, ns)
            } else {
                list.exact.insert(name, ns)
            };
        }
        Ok(list)
    }

    /// Whether the pod may set `sysctl`, given which namespaces it shares with the host.
    fn check(&self, sysctl: &str, host: &[Namespace]) -> Result<(), String> {
        let sysctl = normalize(sysctl);
        let ns = self
            .exact
            .get(&sysctl)
            .or_else(|| self.prefixes.iter().find(|(prefix, _)| sysctl.starts_with(prefix.as_str())).map(|(_, ns)| ns));
        match ns {
            Some(ns) if host.contains(ns) => Err(format!("{sysctl:?} not allowed with host {} enabled", ns.name())),
            Some(_) => Ok(()),
            None => Err(format!("{sysctl:?} not allowlisted")),
        }
    }

    /// Upstream's admission: the message of the first sysctl the pod may not set (the reason is
    /// [`FORBIDDEN_REASON`]).
    pub fn admit(&self, pod: &Pod) -> Result<(), String> {
        let Some(spec) = pod.spec.as_ref() else { return Ok(()) };
        let sysctls = spec.security_context.as_ref().and_then(|s| s.sysctls.as_ref());
        let mut host = Vec::new();
        if spec.host_network == Some(true) {
            host.push(Namespace::Net);
        }
        if spec.host_ipc == Some(true) {
            host.push(Namespace::Ipc);
        }
        if spec.host_users != Some(false) {
            host.push(Namespace::User);
        }
        for s in sysctls.into_iter().flatten() {
            self.check(&s.name, &host).map_err(|e| format!("forbidden sysctl: {e}"))?;
        }
        Ok(())
    }
}

/// `status.reason` of a pod refused for its sysctls.
pub const FORBIDDEN_REASON: &str = "SysctlForbidden";

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    fn with_sysctls(extra: serde_json::Value, sysctls: &[&str]) -> Pod {
        let list: Vec<_> = sysctls.iter().map(|n| serde_json::json!({"name": n, "value": "1"})).collect();
        let mut spec = serde_json::json!({"securityContext": {"sysctls": list}, "containers": [{"name": "c"}]});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        pod(spec)
    }

    #[test]
    fn names_with_slashes_are_normalized_like_upstream() {
        assert_eq!(normalize("kernel/shm_rmid_forced"), "kernel.shm_rmid_forced");
        assert_eq!(normalize("net/ipv4/conf/eno2.100/rp_filter"), "net.ipv4.conf.eno2/100.rp_filter");
        assert_eq!(normalize("net.ipv4.conf.eno2/100.rp_filter"), "net.ipv4.conf.eno2/100.rp_filter");
        assert_eq!(normalize(""), "");
    }

    #[test]
    fn safe_sysctls_pass_and_others_are_forbidden() {
        let list = Allowlist::new(&[]).unwrap();
        let none = serde_json::json!({});
        assert_eq!(list.admit(&with_sysctls(none.clone(), &["kernel.shm_rmid_forced"])), Ok(()));
        assert_eq!(list.admit(&with_sysctls(none.clone(), &["kernel/shm_rmid_forced"])), Ok(()));
        assert_eq!(
            list.admit(&with_sysctls(none.clone(), &["kernel.shm_rmid_forced", "kernel.msgmax"])),
            Err("forbidden sysctl: \"kernel.msgmax\" not allowlisted".into())
        );
        assert_eq!(list.admit(&pod(serde_json::json!({"containers": [{"name": "c"}]}))), Ok(()));
        // A safe net sysctl with the host's network would change the host's.
        assert_eq!(
            list.admit(&with_sysctls(serde_json::json!({"hostNetwork": true}), &["net.ipv4.tcp_syncookies"])),
            Err("forbidden sysctl: \"net.ipv4.tcp_syncookies\" not allowed with host Net enabled".into())
        );
        assert!(list.admit(&with_sysctls(serde_json::json!({"hostIPC": true}), &["kernel.shm_rmid_forced"])).is_err());
    }

    #[test]
    fn unsafe_sysctls_only_when_allowed() {
        let list = Allowlist::new(&["kernel.msg*".into(), "net.core.somaxconn".into()]).unwrap();
        let none = serde_json::json!({});
        assert_eq!(list.admit(&with_sysctls(none.clone(), &["kernel.msgmax", "net.core.somaxconn"])), Ok(()));
        assert!(list.admit(&with_sysctls(none, &["net.core.rmem_max"])).is_err());
        let user = Allowlist::new(&["user.max_user_namespaces".into()]).unwrap();
        let userns = serde_json::json!({"hostUsers": false});
        assert_eq!(user.admit(&with_sysctls(userns, &["user.max_user_namespaces"])), Ok(()));
        assert!(user.admit(&with_sysctls(serde_json::json!({}), &["user.max_user_namespaces"])).is_err());
    }

    #[test]
    fn bad_patterns_are_configuration_errors() {
        assert!(Allowlist::new(&["vm.swappiness".into()]).unwrap_err().contains("not known to be namespaced"));
        assert!(Allowlist::new(&["Net.Core".into()]).is_err());
        assert!(Allowlist::new(&["net.*.x".into()]).is_err());
        assert!(Allowlist::new(&["".into()]).is_err());
        assert!(Allowlist::new(&["net.*".into()]).is_ok());
        assert!(Allowlist::new(&["net/core/somaxconn".into()]).is_ok());
    }
}
