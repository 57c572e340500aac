//! `clusterTrustBundle` projections: the trust anchors of one ClusterTrustBundle (by `name`) or of every bundle
//! of a signer whose labels match (`signerName` + `labelSelector`), as upstream's kubelet writes them: each
//! certificate once, PEM-encoded, headers dropped. The bundles come from one list-watch of ClusterTrustBundles
//! (the Node authorizer lets a node read them all), started when the first pod projects one; a change wakes
//! the pods that project any, and their worker rewrites the files.
//!
//! Upstream shuffles the certificates once per kubelet start so that nobody relies on an order; nodelet sorts
//! them (by DER), an order that holds across restarts, so that a restart does not rewrite every file.

use std::collections::BTreeSet;

use k8s_openapi::api::certificates::v1::ClusterTrustBundle;
use k8s_openapi::api::core::v1::ClusterTrustBundleProjection;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// The key of a projection's anchors in [`super::payload::Objects::trust_anchors`].
pub fn key(p: &ClusterTrustBundleProjection) -> String {
    let selector = p.label_selector.as_ref().map(|s| serde_json::to_string(s).unwrap_or_default());
    format!("{:?}/{:?}/{:?}", p.name, p.signer_name, selector)
}

/// A projection's file: the anchors, an empty file for an optional projection that matches nothing, or
/// upstream's error.
pub fn anchors(p: &ClusterTrustBundleProjection, bundles: &[&ClusterTrustBundle]) -> Result<Vec<u8>, String> {
    let optional = p.optional.unwrap_or(false);
    if let Some(name) = &p.name {
        return match bundles.iter().find(|b| b.metadata.name.as_ref() == Some(name)) {
            Some(b) => normalize(&[b]),
            None if optional => Ok(Vec::new()),
            None => Err(format!(
                "while getting ClusterTrustBundle: clustertrustbundles.certificates.k8s.io {name:?} not found"
            )),
        };
    }
    let Some(signer) = &p.signer_name else {
        return Err("ClusterTrustBundle projection requires either name or signerName to be set".into());
    };
    let selected: Vec<&ClusterTrustBundle> = bundles
        .iter()
        .copied()
        .filter(|b| &b.spec.signer_name.clone().unwrap_or_default() == signer)
        .filter(|b| selects(p.label_selector.as_ref(), b.metadata.labels.as_ref()))
        .collect();
    if selected.is_empty() {
        return if optional {
            Ok(Vec::new())
        } else {
            Err("combination of signerName and labelSelector matched zero ClusterTrustBundles".into())
        };
    }
    normalize(&selected)
}

/// Each certificate of the bundles once, sorted, re-encoded as `CERTIFICATE` PEM blocks.
fn normalize(bundles: &[&ClusterTrustBundle]) -> Result<Vec<u8>, String> {
    let mut ders = BTreeSet::new();
    for b in bundles {
        let blocks =
            pem::parse_many(&b.spec.trust_bundle).map_err(|e| format!("while normalizing trust anchors: {e}"))?;
        ders.extend(blocks.into_iter().map(pem::Pem::into_contents));
    }
    Ok(ders.into_iter().map(|der| crate::certificate::pem_block("CERTIFICATE", der)).collect::<String>().into_bytes())
}

/// Whether a label selector matches `labels`, with upstream's rule for this projection: no selector matches
/// nothing, an empty one everything.
fn selects(selector: Option<&LabelSelector>, labels: Option<&std::collections::BTreeMap<String, String>>) -> bool {
    let Some(selector) = selector else { return false };
    let get = |k: &str| labels.and_then(|l| l.get(k));
    let labels_match = selector.match_labels.iter().flatten().all(|(k, v)| get(k) == Some(v));
    let expressions_match = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => get(&e.key).is_some(),
            "DoesNotExist" => get(&e.key).is_none(),
            _ => false,
        }
    });
    labels_match && expressions_match
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str) -> String {
        let params = rcgen::CertificateParams::new(vec![cn.to_string()]).unwrap();
        params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem()
    }

    fn bundle(name: &str, signer: Option<&str>, labels: serde_json::Value, pem: &str) -> ClusterTrustBundle {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"signerName": signer, "trustBundle": pem}
        }))
        .unwrap()
    }

    fn projection(json: serde_json::Value) -> ClusterTrustBundleProjection {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn by_name_by_signer_and_optional() {
        let (a, b, c) = (cert("a"), cert("b"), cert("c"));
        let bundles = [
            // Text around the blocks and a certificate given twice are dropped.
            bundle("plain", None, serde_json::json!({}), &format!("# comment\n{a}\n{a}")),
            bundle("example.com:signer:one", Some("example.com/signer"), serde_json::json!({"tier": "x"}), &b),
            bundle(
                "example.com:signer:two",
                Some("example.com/signer"),
                serde_json::json!({"tier": "y"}),
                &format!("{c}{b}"),
            ),
        ];
        let all: Vec<&ClusterTrustBundle> = bundles.iter().collect();
        let plain = anchors(&projection(serde_json::json!({"name": "plain", "path": "ca.pem"})), &all).unwrap();
        assert_eq!(String::from_utf8(plain).unwrap(), a.replace("\r\n", "\n"));
        let everything =
            projection(serde_json::json!({"signerName": "example.com/signer", "labelSelector": {}, "path": "p"}));
        let text = String::from_utf8(anchors(&everything, &all).unwrap()).unwrap();
        assert_eq!(text.matches("BEGIN CERTIFICATE").count(), 2, "b once, c once: {text}");
        let tier_x = projection(serde_json::json!({"signerName": "example.com/signer",
            "labelSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}]}, "path": "p"}));
        assert_eq!(String::from_utf8(anchors(&tier_x, &all).unwrap()).unwrap(), b.replace("\r\n", "\n"));
        // No selector selects nothing, as upstream.
        let none = projection(serde_json::json!({"signerName": "example.com/signer", "path": "p"}));
        assert_eq!(
            anchors(&none, &all).unwrap_err(),
            "combination of signerName and labelSelector matched zero ClusterTrustBundles"
        );
        let optional =
            projection(serde_json::json!({"signerName": "example.com/signer", "optional": true, "path": "p"}));
        assert_eq!(anchors(&optional, &all).unwrap(), b"");
        let missing = projection(serde_json::json!({"name": "nope", "path": "p"}));
        assert_eq!(
            anchors(&missing, &all).unwrap_err(),
            "while getting ClusterTrustBundle: clustertrustbundles.certificates.k8s.io \"nope\" not found"
        );
        let neither = projection(serde_json::json!({"path": "p"}));
        assert!(anchors(&neither, &all).unwrap_err().contains("requires either name or signerName"));
    }

    #[test]
    fn selectors() {
        let labels = std::collections::BTreeMap::from([("a".to_string(), "1".to_string())]);
        let sel = |json: serde_json::Value| serde_json::from_value::<LabelSelector>(json).unwrap();
        assert!(!selects(None, Some(&labels)));
        assert!(selects(Some(&sel(serde_json::json!({}))), None));
        assert!(selects(Some(&sel(serde_json::json!({"matchLabels": {"a": "1"}}))), Some(&labels)));
        assert!(!selects(Some(&sel(serde_json::json!({"matchLabels": {"a": "2"}}))), Some(&labels)));
        let expr = |op: &str, values: &[&str]| {
            sel(serde_json::json!({"matchExpressions": [{"key": "a", "operator": op, "values": values}]}))
        };
        assert!(selects(Some(&expr("NotIn", &["2"])), Some(&labels)));
        assert!(!selects(Some(&expr("NotIn", &["1"])), Some(&labels)));
        assert!(selects(Some(&expr("Exists", &[])), Some(&labels)));
        assert!(!selects(Some(&expr("DoesNotExist", &[])), Some(&labels)));
        assert!(selects(Some(&expr("DoesNotExist", &[])), None));
    }
}
