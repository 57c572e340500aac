//! Pod validation before a pod runs, in upstream's words (`field: Invalid value: "x": reason`): static pods get
//! no API server validation at all, and API pods are checked defensively. Only what nodelet relies on is checked:
//! names, containers, ports, restart policy and quantities (a quantity that does not parse must never run as if
//! no limit had been given).

use std::collections::HashSet;

use k8s_openapi::api::core::v1::{Container, Pod};

const DNS1123_LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const QUANTITY: &str = "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'";

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 subdomain: at most 253 characters, dot-separated parts of label characters (a part is not capped
/// at 63 here, as upstream's regular expression does not).
fn is_subdomain(s: &str) -> bool {
    let part = |p: &str| {
        let b = p.as_bytes();
        !b.is_empty()
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    s.len() <= 253 && s.split('.').all(part)
}

/// A quantity string as the API accepts it: a non-negative decimal number with an optional binary or decimal
/// suffix or exponent. Returns its value.
pub fn quantity_value(s: &str) -> Option<f64> {
    let number_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let digits = number.trim_start_matches(['+', '-']);
    if digits.is_empty() || digits.matches('.').count() > 1 || !digits.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    let suffix_ok = matches!(
        suffix,
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(|e| {
        let e = e.trim_start_matches(['+', '-']);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    });
    if !suffix_ok {
        return None;
    }
    let v = super::resources::quantity(&k8s_openapi::apimachinery::pkg::api::resource::Quantity(s.to_string()))?;
    v.is_finite().then_some(v)
}

/// Every problem with `pod`, each as upstream words it; empty when it may run.
pub fn validate(pod: &Pod) -> Vec<String> {
    let mut errors = Vec::new();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    if name.is_empty() {
        errors.push("metadata.name: Required value: name or generateName is required".to_string());
    } else if !is_subdomain(name) {
        errors.push(format!("metadata.name: Invalid value: {name:?}: {DNS1123_SUBDOMAIN}"));
    }
    if let Some(ns) = pod.metadata.namespace.as_deref().filter(|ns| !is_label(ns)) {
        errors.push(format!("metadata.namespace: Invalid value: {ns:?}: {DNS1123_LABEL}"));
    }
    let Some(spec) = pod.spec.as_ref() else {
        errors.push("spec: Required value".into());
        return errors;
    };
    if let Some(policy) = spec.restart_policy.as_deref().filter(|p| !["Always", "OnFailure", "Never"].contains(p)) {
        errors.push(format!(
            "spec.restartPolicy: Unsupported value: {policy:?}: supported values: \"Always\", \"OnFailure\", \"Never\""
        ));
    }
    if spec.containers.is_empty() {
        errors.push("spec.containers: Required value".into());
    }
    if let Some(sc) = spec.security_context.as_ref() {
        let ids = [("runAsUser", sc.run_as_user), ("runAsGroup", sc.run_as_group), ("fsGroup", sc.fs_group)];
        for (field, id) in ids {
            user_id(&format!("spec.securityContext.{field}"), id, &mut errors);
        }
        for (i, g) in sc.supplemental_groups.iter().flatten().enumerate() {
            user_id(&format!("spec.securityContext.supplementalGroups[{i}]"), Some(*g), &mut errors);
        }
    }
    let mut names = HashSet::new();
    let init = spec.init_containers.iter().flatten().enumerate().map(|(i, c)| (format!("spec.initContainers[{i}]"), c));
    let app = spec.containers.iter().enumerate().map(|(i, c)| (format!("spec.containers[{i}]"), c));
    for (path, c) in init.chain(app) {
        container(&path, c, &mut names, &mut errors);
    }
    errors
}

/// A user or group ID as the API allows it (upstream's `IsValidUserID`/`IsValidGroupID`): never one that would
/// wrap to root in the 32-bit IDs of the kernel.
fn user_id(path: &str, id: Option<i64>, errors: &mut Vec<String>) {
    if let Some(id) = id.filter(|id| !(0..=2_147_483_647).contains(id)) {
        errors.push(format!("{path}: Invalid value: {id}: must be between 0 and 2147483647, inclusive"));
    }
}

fn container(path: &str, c: &Container, names: &mut HashSet<String>, errors: &mut Vec<String>) {
    if let Some(sc) = c.security_context.as_ref() {
        user_id(&format!("{path}.securityContext.runAsUser"), sc.run_as_user, errors);
        user_id(&format!("{path}.securityContext.runAsGroup"), sc.run_as_group, errors);
    }
    if c.name.is_empty() {
        errors.push(format!("{path}.name: Required value"));
    } else if !is_label(&c.name) {
        errors.push(format!("{path}.name: Invalid value: {:?}: {DNS1123_LABEL}", c.name));
    } else if !names.insert(c.name.clone()) {
        errors.push(format!("{path}.name: Duplicate value: {:?}", c.name));
    }
    if c.image.as_deref().is_none_or(|i| i.trim().is_empty()) {
        errors.push(format!("{path}.image: Required value"));
    }
    for (i, p) in c.ports.iter().flatten().enumerate() {
        if !(1..=65535).contains(&p.container_port) {
            errors.push(format!(
                "{path}.ports[{i}].containerPort: Invalid value: {}: must be between 1 and 65535, inclusive",
                p.container_port
            ));
        }
        if let Some(host) = p.host_port.filter(|h| !(0..=65535).contains(h)) {
            errors.push(format!(
                "{path}.ports[{i}].hostPort: Invalid value: {host}: must be between 1 and 65535, inclusive"
            ));
        }
        if let Some(proto) = p.protocol.as_deref().filter(|p| !["TCP", "UDP", "SCTP"].contains(p)) {
            errors.push(format!(
                "{path}.ports[{i}].protocol: Unsupported value: {proto:?}: supported values: \"SCTP\", \"TCP\", \"UDP\""
            ));
        }
    }
    let resources = c.resources.as_ref();
    for (kind, map) in [
        ("limits", resources.and_then(|r| r.limits.as_ref())),
        ("requests", resources.and_then(|r| r.requests.as_ref())),
    ] {
        for (resource, q) in map.into_iter().flatten() {
            match quantity_value(&q.0) {
                None => {
                    errors.push(format!("{path}.resources.{kind}[{resource}]: Invalid value: {:?}: {QUANTITY}", q.0))
                }
                Some(v) if v < 0.0 => errors.push(format!(
                    "{path}.resources.{kind}[{resource}]: Invalid value: {:?}: must be greater than or equal to 0",
                    q.0
                )),
                Some(_) => {}
            }
        }
    }
    let value =
        |kind: Option<&std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
         r: &str| { kind.and_then(|m| m.get(r)).and_then(|q| quantity_value(&q.0)) };
    for r in ["cpu", "memory"] {
        let (request, limit) = (
            value(resources.and_then(|x| x.requests.as_ref()), r),
            value(resources.and_then(|x| x.limits.as_ref()), r),
        );
        if let (Some(request), Some(limit)) = (request, limit)
            && request > limit
        {
            let shown = resources.and_then(|x| x.requests.as_ref()).and_then(|m| m.get(r)).map(|q| q.0.clone());
            errors.push(format!(
                "{path}.resources.requests: Invalid value: {:?}: must be less than or equal to {r} limit of {}",
                shown.unwrap_or_default(),
                resources
                    .and_then(|x| x.limits.as_ref())
                    .and_then(|m| m.get(r))
                    .map(|q| q.0.clone())
                    .unwrap_or_default()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn ok_pod() -> serde_json::Value {
        serde_json::json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"containers": [{"name": "main", "image": "busybox",
                "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}, "requests": {"memory": "32Mi"}},
                "ports": [{"containerPort": 80, "hostPort": 8080}]}]}})
    }

    #[test]
    fn user_ids_that_would_wrap_are_refused() {
        let p: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": {
            "securityContext": {"runAsUser": 4294967296i64, "supplementalGroups": [-1]},
            "containers": [{"name": "c", "image": "i", "securityContext": {"runAsGroup": 2147483648i64}}]}}))
        .unwrap();
        assert_eq!(
            validate(&p),
            [
                "spec.securityContext.runAsUser: Invalid value: 4294967296: must be between 0 and 2147483647, inclusive",
                "spec.securityContext.supplementalGroups[0]: Invalid value: -1: must be between 0 and 2147483647, inclusive",
                "spec.containers[0].securityContext.runAsGroup: Invalid value: 2147483648: must be between 0 and 2147483647, inclusive",
            ]
        );
    }

    #[test]
    fn a_valid_pod_passes() {
        assert_eq!(validate(&pod(ok_pod())), Vec::<String>::new());
        let mut long = ok_pod();
        long["metadata"]["name"] = format!("{}-{}", "h".repeat(62), "x".repeat(7)).into();
        assert_eq!(validate(&pod(long)), Vec::<String>::new(), "names are subdomains: 253 characters");
        for q in ["1", "0.5", "100m", "64Mi", "1e3", "1E+3", "2Ki", ".5"] {
            assert!(quantity_value(q).is_some(), "{q}");
        }
        for q in ["12 parsecs", "lots", "1.2.3", "inf", "NaN", "Mi", "1e", "1Kb"] {
            assert!(quantity_value(q).is_none(), "{q}");
        }
    }

    #[test]
    fn invalid_pods_are_named_field_by_field() {
        let mut p = ok_pod();
        p["metadata"]["name"] = "Web_1".into();
        p["spec"]["restartPolicy"] = "Sometimes".into();
        p["spec"]["containers"][0]["resources"]["limits"]["memory"] = "12 parsecs".into();
        p["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "-1".into();
        p["spec"]["containers"][0]["ports"][0]["containerPort"] = 70000.into();
        p["spec"]["containers"].as_array_mut().unwrap().push(serde_json::json!({"name": "main"}));
        let errors = validate(&pod(p));
        let want = [
            "metadata.name: Invalid value: \"Web_1\": a lowercase RFC 1123 subdomain",
            "spec.restartPolicy: Unsupported value: \"Sometimes\"",
            "spec.containers[0].ports[0].containerPort: Invalid value: 70000",
            "spec.containers[0].resources.limits[memory]: Invalid value: \"12 parsecs\"",
            "spec.containers[0].resources.requests[cpu]: Invalid value: \"-1\": must be greater than or equal to 0",
            "spec.containers[1].name: Duplicate value: \"main\"",
            "spec.containers[1].image: Required value",
        ];
        for w in want {
            assert!(errors.iter().any(|e| e.starts_with(w)), "missing {w:?} in {errors:#?}");
        }
        assert_eq!(errors.len(), want.len(), "{errors:#?}");
        let mut p = ok_pod();
        p["spec"]["containers"][0]["resources"]["requests"]["memory"] = "128Mi".into();
        let errors = validate(&pod(p));
        assert_eq!(
            errors,
            [
                "spec.containers[0].resources.requests: Invalid value: \"128Mi\": must be less than or equal to memory limit of 64Mi"
            ]
        );
    }
}
