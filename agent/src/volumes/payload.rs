//! What the files of a configMap, secret, downwardAPI or projected volume hold: pure functions of the volume
//! source and the objects it names (fetched beforehand), with upstream's modes, `items`, `optional` rules and
//! error messages.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapProjection, ConfigMapVolumeSource, DownwardAPIVolumeFile, KeyToPath, Pod,
    ProjectedVolumeSource, Secret, SecretProjection, SecretVolumeSource,
};

use super::atomic_writer::{FileProjection, Payload};
use crate::pods::downward_api::{self, Allocatable, Ips};

/// Upstream's `defaultMode` when none is given (0644).
pub const DEFAULT_MODE: i32 = 0o644;

/// The API objects a pod's volumes name, fetched: `None` for one that does not exist.
#[derive(Debug, Default)]
pub struct Objects {
    pub config_maps: HashMap<String, Option<ConfigMap>>,
    pub secrets: HashMap<String, Option<Secret>>,
    /// Service account tokens by the projection's (audience, expirationSeconds).
    pub tokens: HashMap<(String, i64), String>,
    /// `clusterTrustBundle` projections' files (or upstream's error) by [`super::trust_bundles::key`].
    pub trust_anchors: HashMap<String, Result<Vec<u8>, String>>,
    /// `podCertificate` projections' (key, chain), PEM, by (volume, index of the source).
    pub pod_certificates: HashMap<(String, usize), (String, String)>,
}

/// The pod and node facts downwardAPI files may show.
pub struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub ips: Ips<'a>,
    pub allocatable: Allocatable,
}

fn mode(m: Option<i32>, default: i32) -> u32 {
    u32::try_from(m.unwrap_or(default) & 0o7777).unwrap_or(0o644)
}

/// `data`/`binaryData` or a secret's `data` as (key -> bytes).
fn keyed(
    map: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: i32,
    optional: bool,
    missing: &str,
) -> Result<Payload, String> {
    let Some(items) = items.filter(|i| !i.is_empty()) else {
        return Ok(map
            .into_iter()
            .map(|(k, data)| (k, FileProjection { data, mode: mode(None, default_mode) }))
            .collect());
    };
    let mut out = Payload::new();
    for item in items {
        match map.get(&item.key) {
            Some(data) => {
                out.insert(
                    item.path.clone(),
                    FileProjection { data: data.clone(), mode: mode(item.mode, default_mode) },
                );
            }
            None if optional => {}
            None => return Err(format!("{missing}: {}", item.key)),
        }
    }
    Ok(out)
}

fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let text = cm.data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes()));
    let binary = cm.binary_data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone()));
    text.chain(binary).collect()
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let text = s.string_data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes()));
    let binary = s.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone()));
    text.chain(binary).collect()
}

/// A ConfigMap's or Secret's files; `data` is `None` when the object does not exist. `kind`: its lower-case
/// kind (for "not found"), `missing`: upstream's message for an item naming a key it does not have.
fn object_payload(
    data: Option<BTreeMap<String, Vec<u8>>>,
    (kind, missing): (&str, &str),
    name: &str,
    items: Option<&[KeyToPath]>,
    default_mode: i32,
    optional: bool,
) -> Result<Payload, String> {
    match data {
        Some(data) => keyed(data, items, default_mode, optional, missing),
        None if optional => Ok(Payload::new()),
        None => Err(format!("{kind} {name:?} not found")),
    }
}

const CONFIG_MAP: (&str, &str) = ("configmap", "configmap references non-existent config key");
const SECRET: (&str, &str) = ("secret", "references non-existent secret key");

fn config_map_payload(
    name: &str,
    items: Option<&[KeyToPath]>,
    mode: i32,
    optional: bool,
    objects: &Objects,
) -> Result<Payload, String> {
    let data = objects.config_maps.get(name).cloned().flatten().map(|cm| config_map_data(&cm));
    object_payload(data, CONFIG_MAP, name, items, mode, optional)
}

fn secret_payload(
    name: &str,
    items: Option<&[KeyToPath]>,
    mode: i32,
    optional: bool,
    objects: &Objects,
) -> Result<Payload, String> {
    let data = objects.secrets.get(name).cloned().flatten().map(|s| secret_data(&s));
    object_payload(data, SECRET, name, items, mode, optional)
}

/// A `configMap` volume's files.
pub fn config_map(source: &ConfigMapVolumeSource, objects: &Objects) -> Result<Payload, String> {
    let default_mode = source.default_mode.unwrap_or(DEFAULT_MODE);
    config_map_payload(&source.name, source.items.as_deref(), default_mode, source.optional.unwrap_or(false), objects)
}

/// A `secret` volume's files.
pub fn secret(source: &SecretVolumeSource, objects: &Objects) -> Result<Payload, String> {
    let default_mode = source.default_mode.unwrap_or(DEFAULT_MODE);
    let name = source.secret_name.clone().unwrap_or_default();
    secret_payload(&name, source.items.as_deref(), default_mode, source.optional.unwrap_or(false), objects)
}

/// A `downwardAPI` volume's (or projection's) files; every item that cannot be resolved is named in the error.
pub fn downward(items: &[DownwardAPIVolumeFile], default_mode: i32, facts: &PodFacts<'_>) -> Result<Payload, String> {
    let mut out = Payload::new();
    let mut errors = Vec::new();
    for item in items {
        let value = if let Some(f) = &item.field_ref {
            downward_api::field_value(facts.pod, &f.field_path, &facts.ips, true)
        } else if let Some(r) = &item.resource_field_ref {
            downward_api::resource_value(facts.pod, "", r, &facts.allocatable)
        } else {
            continue;
        };
        match value {
            Ok(v) => {
                let path = item.path.trim_end_matches('/').to_string();
                out.insert(path, FileProjection { data: v.into_bytes(), mode: mode(item.mode, default_mode) });
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors.join(", ")) }
}

/// A `projected` volume's (named `volume`) files: every source's, later sources overwriting earlier ones' paths.
pub fn projected(
    volume: &str,
    source: &ProjectedVolumeSource,
    objects: &Objects,
    facts: &PodFacts<'_>,
) -> Result<Payload, String> {
    let default_mode = source.default_mode.unwrap_or(DEFAULT_MODE);
    // Tokens and trust anchors are 0600 under an fsGroup (which then adds group read), as upstream.
    let fs_group = facts.pod.spec.as_ref().and_then(|s| s.security_context.as_ref()).and_then(|s| s.fs_group);
    let credential_mode = if fs_group.is_some() { 0o600 } else { default_mode };
    let mut out = Payload::new();
    for (index, s) in source.sources.iter().flatten().enumerate() {
        if let Some(ConfigMapProjection { name, items, optional }) = &s.config_map {
            out.extend(config_map_payload(name, items.as_deref(), default_mode, optional.unwrap_or(false), objects)?);
        } else if let Some(SecretProjection { name, items, optional }) = &s.secret {
            out.extend(secret_payload(name, items.as_deref(), default_mode, optional.unwrap_or(false), objects)?);
        } else if let Some(d) = &s.downward_api {
            out.extend(downward(d.items.as_deref().unwrap_or_default(), default_mode, facts)?);
        } else if let Some(t) = &s.service_account_token {
            let key = token_key(t);
            let token = objects.tokens.get(&key).ok_or_else(|| "no service account token was issued".to_string())?;
            out.insert(
                t.path.clone(),
                FileProjection { data: token.clone().into_bytes(), mode: mode(None, credential_mode) },
            );
        } else if let Some(b) = &s.cluster_trust_bundle {
            let anchors = objects
                .trust_anchors
                .get(&super::trust_bundles::key(b))
                .ok_or_else(|| "no ClusterTrustBundles were read".to_string())?;
            out.insert(b.path.clone(), FileProjection { data: anchors.clone()?, mode: mode(None, credential_mode) });
        } else if let Some(p) = &s.pod_certificate {
            let (key, chain) = objects
                .pod_certificates
                .get(&(volume.to_string(), index))
                .ok_or_else(|| "credential bundle is not issued yet".to_string())?;
            let file = |data: String| FileProjection { data: data.into_bytes(), mode: mode(None, credential_mode) };
            for (path, data) in [
                (&p.credential_bundle_path, format!("{key}{chain}")),
                (&p.key_path, key.clone()),
                (&p.certificate_chain_path, chain.clone()),
            ] {
                if let Some(path) = path.as_ref().filter(|p| !p.is_empty()) {
                    out.insert(path.clone(), file(data));
                }
            }
        }
    }
    Ok(out)
}

/// How a token projection is keyed in [`Objects::tokens`]: (audience, expirationSeconds with upstream's default).
pub fn token_key(t: &k8s_openapi::api::core::v1::ServiceAccountTokenProjection) -> (String, i64) {
    (t.audience.clone().unwrap_or_default(), t.expiration_seconds.unwrap_or(3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn objects() -> Objects {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cm"}, "data": {"a": "1", "b": "2"}, "binaryData": {"bin": "AAE="}
        }))
        .unwrap();
        let secret =
            Secret { data: Some([("token".to_string(), ByteString(b"s3cr3t".to_vec()))].into()), ..Default::default() };
        Objects {
            config_maps: [("cm".to_string(), Some(cm)), ("gone".to_string(), None)].into(),
            secrets: [("s".to_string(), Some(secret))].into(),
            tokens: [(("".to_string(), 3600), "jwt".to_string())].into(),
            trust_anchors: Default::default(),
            pod_certificates: Default::default(),
        }
    }

    fn cm_source(json: serde_json::Value) -> ConfigMapVolumeSource {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn config_maps_keys_items_modes_and_optional() {
        let o = objects();
        let all = config_map(&cm_source(serde_json::json!({"name": "cm"})), &o).unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["a", "b", "bin"]);
        assert_eq!(all["bin"].data, vec![0, 1]);
        assert_eq!(all["a"].mode, 0o644);
        let items = config_map(
            &cm_source(serde_json::json!({"name": "cm", "defaultMode": 0o400,
                "items": [{"key": "a", "path": "x/a.txt"}, {"key": "b", "path": "b", "mode": 0o600}]})),
            &o,
        )
        .unwrap();
        assert_eq!(items["x/a.txt"], FileProjection { data: b"1".to_vec(), mode: 0o400 });
        assert_eq!(items["b"].mode, 0o600);
        let missing_key = cm_source(serde_json::json!({"name": "cm", "items": [{"key": "zz", "path": "z"}]}));
        assert_eq!(config_map(&missing_key, &o).unwrap_err(), "configmap references non-existent config key: zz");
        assert_eq!(
            config_map(&cm_source(serde_json::json!({"name": "gone"})), &o).unwrap_err(),
            "configmap \"gone\" not found"
        );
        assert!(config_map(&cm_source(serde_json::json!({"name": "gone", "optional": true})), &o).unwrap().is_empty());
    }

    #[test]
    fn secrets_and_projections() {
        let o = objects();
        let s: SecretVolumeSource =
            serde_json::from_value(serde_json::json!({"secretName": "s", "defaultMode": 0o400})).unwrap();
        assert_eq!(secret(&s, &o).unwrap()["token"], FileProjection { data: b"s3cr3t".to_vec(), mode: 0o400 });
        let missing: SecretVolumeSource = serde_json::from_value(serde_json::json!({"secretName": "nope"})).unwrap();
        assert_eq!(secret(&missing, &o).unwrap_err(), "secret \"nope\" not found");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns"}, "spec": {"containers": [{"name": "c"}]}
        }))
        .unwrap();
        let facts = PodFacts { pod: &pod, ips: Ips { host: "h", pod: None }, allocatable: Allocatable::default() };
        // The volume the API server injects for the default service account.
        let p: ProjectedVolumeSource = serde_json::from_value(serde_json::json!({"defaultMode": 0o644, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3600, "path": "token"}},
            {"configMap": {"name": "cm", "items": [{"key": "a", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}
        ]}))
        .unwrap();
        let files = projected("v", &p, &o, &facts).unwrap();
        assert_eq!(files["token"].data, b"jwt");
        assert_eq!(files["ca.crt"].data, b"1");
        assert_eq!(files["namespace"].data, b"ns");
        let bad: ProjectedVolumeSource = serde_json::from_value(serde_json::json!({"sources": [
            {"downwardAPI": {"items": [{"path": "x", "fieldRef": {"fieldPath": "spec.bogus"}}]}}
        ]}))
        .unwrap();
        assert_eq!(projected("v", &bad, &o, &facts).unwrap_err(), "unsupported fieldPath: spec.bogus");
    }

    #[test]
    fn credentials_are_0600_under_an_fs_group() {
        let mut o = objects();
        let ctb: k8s_openapi::api::core::v1::ClusterTrustBundleProjection =
            serde_json::from_value(serde_json::json!({"name": "b", "path": "ca.pem"})).unwrap();
        o.trust_anchors.insert(super::super::trust_bundles::key(&ctb), Ok(b"anchors".to_vec()));
        let source: ProjectedVolumeSource = serde_json::from_value(serde_json::json!({"sources": [
            {"serviceAccountToken": {"path": "token"}},
            {"clusterTrustBundle": {"name": "b", "path": "ca.pem"}},
            {"configMap": {"name": "cm", "items": [{"key": "a", "path": "a"}]}}
        ]}))
        .unwrap();
        let modes = |fs_group: Option<i64>| {
            let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "p"},
                "spec": {"containers": [{"name": "c"}], "securityContext": {"fsGroup": fs_group}}}))
            .unwrap();
            let facts = PodFacts { pod: &pod, ips: Ips { host: "h", pod: None }, allocatable: Allocatable::default() };
            let files = projected("v", &source, &o, &facts).unwrap();
            assert_eq!(files["ca.pem"].data, b"anchors");
            (files["token"].mode, files["ca.pem"].mode, files["a"].mode)
        };
        assert_eq!(modes(None), (0o644, 0o644, 0o644));
        assert_eq!(modes(Some(2000)), (0o600, 0o600, 0o644));
        o.trust_anchors.insert(super::super::trust_bundles::key(&ctb), Err("no such bundle".into()));
        let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}})).unwrap();
        let facts = PodFacts { pod: &pod, ips: Ips { host: "h", pod: None }, allocatable: Allocatable::default() };
        assert_eq!(projected("v", &source, &o, &facts).unwrap_err(), "no such bundle");
    }
}
