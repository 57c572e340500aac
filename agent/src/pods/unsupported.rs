//! Pod fields nodelet does not implement yet. A pod that asks for one never runs weaker than it asked: the
//! container fails with `CreateContainerConfigError` and a message that names the field, instead of the field
//! being ignored. (A volume nodelet cannot set up is the volume manager's `FailedMount`; probes and lifecycle
//! hooks are their own issue and are not refused here.)

use k8s_openapi::api::core::v1::{Container, Pod};

/// Why `c` of `pod` cannot run as asked, if it cannot.
pub fn unsupported(pod: &Pod, c: &Container) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let pod_sc = spec.security_context.as_ref();
    let sc = c.security_context.as_ref();
    let not_yet = |what: &str| Some(format!("{what} is not supported by nodelet yet"));
    // Without AppArmor on the host, admission refuses such pods as upstream does; with it, nodelet cannot load or
    // apply a profile yet.
    let apparmor = sc.and_then(|s| s.app_armor_profile.as_ref()).or(pod_sc.and_then(|s| s.app_armor_profile.as_ref()));
    if let Some(profile) = apparmor.filter(|p| p.type_ != "Unconfined") {
        return not_yet(&format!("AppArmor profile type {}", profile.type_));
    }
    // With SELinux off (the kernel has no selinuxfs), options are ignored as upstream ignores them (logged when
    // the container is made); with it on, nodelet cannot label containers yet.
    let selinux = sc.and_then(|s| s.se_linux_options.as_ref()).or(pod_sc.and_then(|s| s.se_linux_options.as_ref()));
    if selinux.is_some() && selinux_enabled() {
        return not_yet("seLinuxOptions with SELinux enabled");
    }
    let userns = spec.host_users == Some(false);
    if sc.and_then(|s| s.proc_mount.as_deref()).is_some_and(|m| m != "Default") && !userns {
        // Upstream's API validation requires a user namespace for it; a static pod reaches nodelet unvalidated.
        return not_yet("procMount: Unmasked without hostUsers: false");
    }
    if userns && let Some(why) = user_namespace_limits(pod, c) {
        return Some(why);
    }
    if c.volume_devices.as_ref().is_some_and(|d| !d.is_empty()) {
        return not_yet("volumeDevices (raw block volumes)");
    }
    let claims = c.resources.as_ref().and_then(|r| r.claims.as_ref()).is_some_and(|claims| !claims.is_empty());
    if claims || spec.resource_claims.as_ref().is_some_and(|claims| !claims.is_empty()) {
        return not_yet("resource claims (dynamic resource allocation)");
    }
    None
}

/// What a pod in a user namespace may not have (yet): the host's namespaces (upstream's API validation refuses
/// them; static pods are not validated), a shared PID namespace, image volumes (an overlay cannot be idmapped)
/// and mount propagation (an idmapped copy of a volume is not in its source's peer group).
fn user_namespace_limits(pod: &Pod, c: &Container) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    for (set, field) in [(spec.host_network, "hostNetwork"), (spec.host_pid, "hostPID"), (spec.host_ipc, "hostIPC")] {
        if set == Some(true) {
            return Some(format!("{field} is not allowed with hostUsers: false"));
        }
    }
    let not_yet = |what: &str| Some(format!("{what} with hostUsers: false is not supported by nodelet yet"));
    if spec.share_process_namespace == Some(true) {
        return not_yet("shareProcessNamespace");
    }
    if spec.volumes.iter().flatten().any(|v| v.image.is_some()) {
        return not_yet("an image volume");
    }
    let propagates =
        c.volume_mounts.iter().flatten().any(|m| m.mount_propagation.as_deref().is_some_and(|p| p != "None"));
    if propagates {
        return not_yet("mountPropagation");
    }
    None
}

/// Whether the kernel enforces SELinux here.
pub fn selinux_enabled() -> bool {
    std::path::Path::new("/sys/fs/selinux/enforce").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    fn check(spec: serde_json::Value) -> Option<String> {
        let p = pod(spec);
        let c = p.spec.as_ref().unwrap().containers[0].clone();
        unsupported(&p, &c)
    }

    #[test]
    fn fields_nodelet_cannot_honour_are_named() {
        assert_eq!(check(serde_json::json!({"containers": [{"name": "c"}]})), None);
        let runtime_default = serde_json::json!({"containers": [{"name": "c",
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}}]});
        assert_eq!(check(runtime_default), None);
        let localhost = serde_json::json!({"securityContext": {"seccompProfile": {"type": "Localhost",
            "localhostProfile": "p.json"}}, "containers": [{"name": "c"}]});
        assert_eq!(check(localhost), None);
        let unmasked = serde_json::json!({"containers": [{"name": "c", "securityContext": {"procMount": "Unmasked"}}]});
        assert_eq!(
            check(unmasked).unwrap(),
            "procMount: Unmasked without hostUsers: false is not supported by nodelet yet"
        );
        let apparmor = serde_json::json!({"containers": [{"name": "c",
            "securityContext": {"appArmorProfile": {"type": "Localhost", "localhostProfile": "x"}}}]});
        assert!(check(apparmor).unwrap().starts_with("AppArmor profile type Localhost"));
        let userns = serde_json::json!({"hostUsers": false,
            "containers": [{"name": "c", "securityContext": {"procMount": "Unmasked"}}]});
        assert_eq!(check(userns), None, "user namespaces, and Unmasked in one");
        for (extra, want) in [
            (serde_json::json!({"hostPID": true}), "hostPID is not allowed with hostUsers: false"),
            (serde_json::json!({"shareProcessNamespace": true}), "shareProcessNamespace with hostUsers: false"),
            (
                serde_json::json!({"volumes": [{"name": "i", "image": {"reference": "x"}}]}),
                "an image volume with hostUsers: false",
            ),
        ] {
            let mut spec = serde_json::json!({"hostUsers": false, "containers": [{"name": "c"}]});
            for (k, v) in extra.as_object().unwrap() {
                spec[k] = v.clone();
            }
            assert!(check(spec).unwrap().starts_with(want), "{want}");
        }
        let propagation = serde_json::json!({"hostUsers": false, "containers": [{"name": "c",
            "volumeMounts": [{"name": "v", "mountPath": "/v", "mountPropagation": "HostToContainer"}]}]});
        assert!(check(propagation).unwrap().starts_with("mountPropagation with hostUsers: false"));
        let block = serde_json::json!({"containers": [{"name": "c",
            "volumeDevices": [{"name": "v", "devicePath": "/dev/xvda"}]}]});
        assert!(check(block).unwrap().starts_with("volumeDevices"));
    }
}
