//! A Kubernetes container -> the runtime's `ContainerConfig`: image defaults, environment (with `fieldRef`,
//! ConfigMap and Secret references resolved), security context and resources. A reference that cannot be
//! resolved is a `CreateContainerConfigError`, as upstream.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::Api;
use nodelet_runtime::{ImageConfig, Security};

use super::downward_api;
pub use super::downward_api::Ips;

/// The image's process defaults from its config blob.
pub fn image_config(config_json: &[u8]) -> Result<ImageConfig> {
    let v: serde_json::Value = serde_json::from_slice(config_json).context("image config is not JSON")?;
    let c = &v["config"];
    let strings = |key: &str| -> Vec<String> {
        c[key].as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
    };
    let text = |key: &str| c[key].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    Ok(ImageConfig {
        entrypoint: strings("Entrypoint"),
        cmd: strings("Cmd"),
        env: strings("Env"),
        working_dir: text("WorkingDir"),
        user: text("User"),
        stop_signal: text("StopSignal"),
    })
}

/// Reads ConfigMaps and Secrets for env references (through the API server; none in standalone mode).
pub struct Lookup<'a> {
    pub client: Option<&'a kube::Client>,
    pub namespace: &'a str,
    /// The cluster's services (with an API server).
    pub services: Option<&'a super::service_env::ServiceCache>,
    /// Node allocatable, for `resourceFieldRef` limits a container does not set.
    pub allocatable: downward_api::Allocatable,
}

impl Lookup<'_> {
    async fn config_map(&self, name: &str) -> Result<Option<BTreeMap<String, String>>> {
        let Some(client) = self.client else { return Ok(None) };
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), self.namespace);
        Ok(api.get_opt(name).await?.map(|cm| cm.data.unwrap_or_default()))
    }

    async fn secret(&self, name: &str) -> Result<Option<BTreeMap<String, String>>> {
        let Some(client) = self.client else { return Ok(None) };
        let api: Api<Secret> = Api::namespaced(client.clone(), self.namespace);
        Ok(api.get_opt(name).await?.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                .chain(s.string_data.unwrap_or_default())
                .collect()
        }))
    }
}

/// The container's environment in order, as upstream builds it: `envFrom` first, then `env`, with `$(VAR)`
/// references left for the runtime to expand.
pub async fn environment(
    pod: &Pod,
    c: &Container,
    ips: &Ips<'_>,
    lookup: &Lookup<'_>,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for source in c.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let (data, name, kind, optional) = if let Some(r) = &source.config_map_ref {
            (lookup.config_map(&r.name).await?, r.name.clone(), "configmap", r.optional.unwrap_or(false))
        } else if let Some(r) = &source.secret_ref {
            (lookup.secret(&r.name).await?, r.name.clone(), "secret", r.optional.unwrap_or(false))
        } else {
            continue;
        };
        match data {
            Some(data) => out.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v))),
            None if optional => {}
            None => return Err(anyhow!("{kind} {name:?} not found")),
        }
    }
    for var in c.env.iter().flatten() {
        if let Some(value) = env_value(pod, &c.name, var, ips, lookup).await? {
            out.push((var.name.clone(), value));
        }
    }
    // Service variables come last, and only where the container does not define the name itself.
    let services = match lookup.services {
        Some(cache) => cache.services_for(pod).await?,
        None => Vec::new(),
    };
    for (name, value) in super::service_env::from_services(&services) {
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, value));
        }
    }
    Ok(out)
}

async fn env_value(
    pod: &Pod,
    container: &str,
    var: &EnvVar,
    ips: &Ips<'_>,
    lookup: &Lookup<'_>,
) -> Result<Option<String>> {
    let Some(from) = &var.value_from else { return Ok(Some(var.value.clone().unwrap_or_default())) };
    if let Some(field) = &from.field_ref {
        return downward_api::field_value(pod, &field.field_path, ips, false).map(Some);
    }
    if let Some(r) = &from.resource_field_ref {
        return downward_api::resource_value(pod, container, r, &lookup.allocatable).map(Some);
    }
    if let Some(r) = &from.config_map_key_ref {
        let data = lookup.config_map(&r.name).await?;
        return key_value(data, &r.name, &r.key, r.optional.unwrap_or(false), ("configmap", "ConfigMap"), lookup);
    }
    if let Some(r) = &from.secret_key_ref {
        let data = lookup.secret(&r.name).await?;
        return key_value(data, &r.name, &r.key, r.optional.unwrap_or(false), ("secret", "Secret"), lookup);
    }
    Err(anyhow!("env {}: unsupported valueFrom", var.name))
}

/// One key of a ConfigMap or Secret (`data` is `None` when the object is missing), with upstream's messages;
/// `kind` is the (lower-case, API) spelling of the object's kind.
fn key_value(
    data: Option<BTreeMap<String, String>>,
    name: &str,
    key: &str,
    optional: bool,
    (lower, kind): (&str, &str),
    lookup: &Lookup<'_>,
) -> Result<Option<String>> {
    match data {
        Some(data) => match data.get(key) {
            Some(v) => Ok(Some(v.clone())),
            None if optional => Ok(None),
            None => Err(anyhow!("couldn't find key {key} in {kind} {}/{name}", lookup.namespace)),
        },
        None if optional => Ok(None),
        None => Err(anyhow!("{lower} {name:?} not found")),
    }
}

/// `runAsNonRoot`, checked as upstream does before a container is created: against `runAsUser`, else the
/// image's user (numeric, or a name that cannot be verified; none at all is root).
pub fn verify_run_as_non_root(pod: &Pod, c: &Container, image_user: Option<&str>) -> Result<()> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = c.security_context.as_ref();
    let non_root = sc.and_then(|s| s.run_as_non_root).or(pod_sc.and_then(|s| s.run_as_non_root)).unwrap_or(false);
    if !non_root {
        return Ok(());
    }
    let who = format!(
        "(pod: \"{}_{}({})\", container: {})",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default(),
        c.name
    );
    if let Some(uid) = sc.and_then(|s| s.run_as_user).or(pod_sc.and_then(|s| s.run_as_user)) {
        if uid == 0 {
            return Err(anyhow!("container's runAsUser breaks non-root policy {who}"));
        }
        return Ok(());
    }
    let user = image_user.unwrap_or_default();
    let name = user.split(':').next().unwrap_or_default();
    match name.parse::<i64>() {
        _ if name.is_empty() => Err(anyhow!("container has runAsNonRoot and image will run as root {who}")),
        Ok(0) => Err(anyhow!("container has runAsNonRoot and image will run as root {who}")),
        Ok(_) => Ok(()),
        Err(_) => Err(anyhow!(
            "container has runAsNonRoot and image has non-numeric user ({name}), cannot verify user is non-root {who}"
        )),
    }
}

/// Where `Localhost` seccomp profiles live (`<root-dir>/seccomp`, the kubelet's `seccompProfileRoot`), and
/// whether containers without a profile get `RuntimeDefault` (`seccompDefault`).
#[derive(Debug, Clone)]
pub struct SeccompSettings {
    pub root: PathBuf,
    pub default: bool,
}

/// The container's seccomp profile: the container's, else the pod's, else the node's default. A `Localhost`
/// path is relative below the profile root (the API server checks it; checked again here, since a static pod's
/// is not): a path that leaves it is an error, never read.
fn seccomp(pod: &Pod, c: &Container, settings: &SeccompSettings) -> Result<nodelet_runtime::Seccomp> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let profile = c
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref())
        .or(pod_sc.and_then(|s| s.seccomp_profile.as_ref()));
    Ok(match profile.map(|p| (p.type_.as_str(), p.localhost_profile.as_deref())) {
        None if settings.default => nodelet_runtime::Seccomp::RuntimeDefault,
        None | Some(("Unconfined", _)) => nodelet_runtime::Seccomp::Unconfined,
        Some(("RuntimeDefault", _)) => nodelet_runtime::Seccomp::RuntimeDefault,
        Some(("Localhost", Some(path))) => {
            let relative = Path::new(path);
            let descends = relative.components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if path.is_empty() || !descends {
                return Err(anyhow!("localhostProfile {path:?} must be a relative path below the profile root"));
            }
            nodelet_runtime::Seccomp::Localhost(settings.root.join(relative))
        }
        Some(("Localhost", None)) => {
            return Err(anyhow!("localhostProfile must be set if seccompProfile type is Localhost."));
        }
        Some((other, _)) => return Err(anyhow!("unknown seccomp profile type {other:?}")),
    })
}

/// The container's security settings, pod-level defaults first.
pub fn security(pod: &Pod, c: &Container, seccomp_settings: &SeccompSettings) -> Result<Security> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = c.security_context.as_ref();
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    // IDs are validated to 0..=2^31-1 before a pod runs (validation.rs): the conversions cannot fail.
    let id = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    // The kubelet's order: fsGroup, then supplementalGroups.
    let mut supplemental: Vec<u32> = pod_sc.and_then(|s| s.fs_group).map(id).into_iter().collect();
    supplemental.extend(pod_sc.and_then(|s| s.supplemental_groups.as_ref()).into_iter().flatten().map(|g| id(*g)));
    let strict = pod_sc.and_then(|s| s.supplemental_groups_policy.as_deref()) == Some("Strict");
    if sc.and_then(|s| s.se_linux_options.as_ref()).or(pod_sc.and_then(|s| s.se_linux_options.as_ref())).is_some()
        && !super::unsupported::selinux_enabled()
    {
        tracing::info!(container = %c.name, "seLinuxOptions ignored: SELinux is not enabled on this host");
    }
    Ok(Security {
        run_as_user: sc.and_then(|s| s.run_as_user).or(pod_sc.and_then(|s| s.run_as_user)).map(id),
        run_as_group: sc.and_then(|s| s.run_as_group).or(pod_sc.and_then(|s| s.run_as_group)).map(id),
        supplemental_groups: supplemental,
        strict_supplemental_groups: strict,
        privileged: sc.and_then(|s| s.privileged).unwrap_or(false),
        allow_privilege_escalation: sc.and_then(|s| s.allow_privilege_escalation),
        read_only_root_filesystem: sc.and_then(|s| s.read_only_root_filesystem).unwrap_or(false),
        // Admitted only with `hostUsers: false` (`unsupported`).
        unmasked_proc: sc.and_then(|s| s.proc_mount.as_deref()) == Some("Unmasked"),
        capabilities_add: caps.and_then(|c| c.add.clone()).unwrap_or_default(),
        capabilities_drop: caps.and_then(|c| c.drop.clone()).unwrap_or_default(),
        seccomp: seccomp(pod, c, seccomp_settings)?,
    })
}

/// Decodes `.dockerconfigjson` of the pod's image pull secrets (missing ones are skipped, like upstream).
pub async fn pull_secrets(pod: &Pod, client: Option<&kube::Client>) -> Vec<Vec<u8>> {
    let (Some(client), Some(spec)) = (client, pod.spec.as_ref()) else { return Vec::new() };
    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let mut out = Vec::new();
    for r in spec.image_pull_secrets.iter().flatten() {
        if let Ok(Some(secret)) = api.get_opt(&r.name).await
            && let Some(data) = secret.data.as_ref().and_then(|d| d.get(".dockerconfigjson").or(d.get(".dockercfg")))
        {
            out.push(data.0.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_as_non_root_as_upstream_checks_it() {
        let pod = |sc: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u"},
                "spec": {"securityContext": sc, "containers": [{"name": "c"}]}}))
            .unwrap()
        };
        let check = |p: &Pod, user: Option<&str>| {
            verify_run_as_non_root(p, &p.spec.as_ref().unwrap().containers[0], user).map_err(|e| e.to_string())
        };
        let strict = pod(serde_json::json!({"runAsNonRoot": true}));
        assert_eq!(
            check(&strict, None).unwrap_err(),
            "container has runAsNonRoot and image will run as root (pod: \"p_ns(u)\", container: c)"
        );
        assert!(check(&strict, Some("0:0")).is_err());
        assert!(check(&strict, Some("1000:1000")).is_ok());
        assert!(check(&strict, Some("nobody")).unwrap_err().contains("image has non-numeric user (nobody)"));
        let by_uid = pod(serde_json::json!({"runAsNonRoot": true, "runAsUser": 1000}));
        assert!(check(&by_uid, None).is_ok());
        let root = pod(serde_json::json!({"runAsNonRoot": true, "runAsUser": 0}));
        assert!(check(&root, Some("1000")).unwrap_err().starts_with("container's runAsUser breaks non-root policy"));
        assert!(check(&pod(serde_json::json!({})), None).is_ok());
    }

    #[test]
    fn security_merges_pod_and_container_like_the_kubelet() {
        let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": {
            "securityContext": {"fsGroup": 5, "supplementalGroups": [7, 6], "supplementalGroupsPolicy": "Strict",
                "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/audit.json"}},
            "containers": [{"name": "a"}, {"name": "b", "securityContext": {"seccompProfile": {"type": "Unconfined"}}},
                {"name": "c", "securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": "../x"}}}]}}))
        .unwrap();
        let settings = SeccompSettings { root: PathBuf::from("/var/lib/nodelet/seccomp"), default: true };
        let containers = &pod.spec.as_ref().unwrap().containers;
        let a = security(&pod, &containers[0], &settings).unwrap();
        assert_eq!(a.supplemental_groups, [5, 7, 6], "fsGroup first");
        assert!(a.strict_supplemental_groups);
        assert_eq!(
            a.seccomp,
            nodelet_runtime::Seccomp::Localhost(PathBuf::from("/var/lib/nodelet/seccomp/profiles/audit.json"))
        );
        assert_eq!(security(&pod, &containers[1], &settings).unwrap().seccomp, nodelet_runtime::Seccomp::Unconfined);
        let escape = security(&pod, &containers[2], &settings).unwrap_err().to_string();
        assert!(escape.contains("must be a relative path below the profile root"), "{escape}");
        // Nothing set: the node's default.
        let bare: Pod = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}}),
        )
        .unwrap();
        let c = &bare.spec.as_ref().unwrap().containers[0];
        assert_eq!(security(&bare, c, &settings).unwrap().seccomp, nodelet_runtime::Seccomp::RuntimeDefault);
        let off = SeccompSettings { default: false, ..settings };
        assert_eq!(security(&bare, c, &off).unwrap().seccomp, nodelet_runtime::Seccomp::Unconfined);
        assert!(!security(&bare, c, &off).unwrap().strict_supplemental_groups);
    }

    #[test]
    fn image_defaults_include_the_stop_signal() {
        let config = br#"{"config": {"Cmd": ["nginx"], "StopSignal": "SIGQUIT", "WorkingDir": ""}}"#;
        let image = image_config(config).unwrap();
        assert_eq!(image.cmd, ["nginx"]);
        assert_eq!(image.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(image.working_dir, None);
    }
}
