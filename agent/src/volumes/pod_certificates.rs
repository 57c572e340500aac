//! `podCertificate` projections, as upstream's pod certificate manager: for each projection of a pod, a key of
//! the requested type made here and a PodCertificateRequest (with a PKCS#10 stub signed by that key) sent for
//! the pod, its service account and this node; the signer named by the projection issues the chain. The files
//! are the key and chain (or both in one credential bundle). At the `beginRefreshAt` the signer gave (plus up
//! to 5 minutes of jitter, as upstream) a new key and request are sent while the current pair stays in place.
//! A denied or failed request is permanent for the pod, as upstream: its mount fails with the signer's words. A
//! request the API server does not have 10 minutes after it was sent (deleted) is sent again, as upstream.
//!
//! Requests are looked at when the pod's volumes are set up or resynced (every 5 s while the pod waits for a
//! mount, every 60 s once it runs), so no watch is needed; the issued pair lives in memory and on the pod's
//! tmpfs only.

use std::collections::HashMap;
use std::sync::Mutex;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{PodCertificateRequest, PodCertificateRequestSpec};
use k8s_openapi::api::core::v1::{Node, Pod, PodCertificateProjection, ServiceAccount};
use kube::Api;
use kube::api::PostParams;

/// A projection of a pod: (pod uid, volume, index of the source).
type Key = (String, String, usize);

/// A request sent: the key (PEM) it is for, its name, when.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    key: String,
    pcr: String,
    at: Timestamp,
}

/// A request the API server does not have this long after it was sent was deleted (upstream's rule; before
/// that, the read may just be early): another is sent.
const ASSUME_DELETED: SignedDuration = SignedDuration::from_secs(600);

fn abandoned(sent: &Sent, now: Timestamp) -> bool {
    now.duration_since(sent.at) > ASSUME_DELETED
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// A request sent; nothing issued yet.
    Waiting(Sent),
    /// Issued; `renewal`: a new key's request in flight.
    Issued { key: String, chain: String, refresh_at: Timestamp, renewal: Option<Sent> },
    /// Denied or failed: upstream's error, for good.
    Refused(String),
}

/// What a PodCertificateRequest's status says.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    /// The chain (cleaned to CERTIFICATE blocks) and when to start refreshing.
    Issued(String, Timestamp),
    Refused(String),
}

/// The outcome a request's status shows, in upstream's words for the refusals.
pub fn outcome(pcr: &PodCertificateRequest) -> Outcome {
    let status = pcr.status.clone().unwrap_or_default();
    for c in status.conditions.iter().flatten().filter(|c| c.status == "True") {
        let words = format!("reason={:?} message={:?}", c.reason, c.message);
        match c.type_.as_str() {
            "Denied" => return Outcome::Refused(format!("PodCertificateRequest was permanently denied: {words}")),
            "Failed" => return Outcome::Refused(format!("PodCertificateRequest was permanently failed: {words}")),
            "Issued" => {
                let chain = pem::parse_many(status.certificate_chain.clone().unwrap_or_default()).unwrap_or_default();
                let chain: String = chain
                    .into_iter()
                    .filter(|b| b.tag() == "CERTIFICATE")
                    .map(|b| crate::certificate::pem_block("CERTIFICATE", b.into_contents()))
                    .collect();
                let refresh = status.begin_refresh_at.clone().map(|t| t.0).unwrap_or_else(Timestamp::now);
                return Outcome::Issued(chain, refresh);
            }
            _ => {}
        }
    }
    Outcome::Pending
}

/// A new key of one of the types a projection may ask for (`keyType`).
pub fn new_key(key_type: &str) -> Result<rcgen::KeyPair, String> {
    let generated = match key_type {
        "RSA3072" => rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_3072),
        "RSA4096" => rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_4096),
        "ECDSAP256" => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        "ECDSAP384" => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        "ECDSAP521" => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512),
        "ED25519" => rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519),
        other => return Err(format!("unknown key type {other:?}")),
    };
    generated.map_err(|e| format!("while generating keypair: {e}"))
}

/// The pods' pod certificates.
#[derive(Debug, Default)]
pub struct PodCertificates {
    states: Mutex<HashMap<Key, State>>,
    node_uid: Mutex<Option<String>>,
}

impl PodCertificates {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, State>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The (private key, certificate chain) of projection `index` of volume `volume`, both PEM; an error (the
    /// volume's `FailedMount`) while none was issued.
    pub async fn credentials(
        &self,
        client: &kube::Client,
        pod: &Pod,
        volume: &str,
        index: usize,
        source: &PodCertificateProjection,
    ) -> Result<(String, String), String> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let key = (uid, volume.to_string(), index);
        let state = self.lock().get(&key).cloned();
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<PodCertificateRequest> = Api::namespaced(client.clone(), &namespace);
        let now = Timestamp::now();
        let next = match state {
            None => State::Waiting(self.request(client, pod, source).await?),
            Some(State::Waiting(sent)) => match get(&api, &sent.pcr).await? {
                None if abandoned(&sent, now) => State::Waiting(self.request(client, pod, source).await?),
                None | Some(Outcome::Pending) => State::Waiting(sent),
                Some(Outcome::Issued(chain, at)) => {
                    State::Issued { key: sent.key, chain, refresh_at: jitter(at), renewal: None }
                }
                Some(Outcome::Refused(message)) => State::Refused(message),
            },
            Some(State::Issued { key: k, chain, refresh_at, renewal }) if now >= refresh_at => match renewal {
                None => {
                    let renewal = Some(self.request(client, pod, source).await?);
                    State::Issued { key: k, chain, refresh_at, renewal }
                }
                Some(sent) => match get(&api, &sent.pcr).await? {
                    Some(Outcome::Issued(new_chain, at)) => {
                        State::Issued { key: sent.key, chain: new_chain, refresh_at: jitter(at), renewal: None }
                    }
                    Some(Outcome::Refused(message)) => State::Refused(message),
                    // Asked again next time.
                    None if abandoned(&sent, now) => State::Issued { key: k, chain, refresh_at, renewal: None },
                    _ => State::Issued { key: k, chain, refresh_at, renewal: Some(sent) },
                },
            },
            Some(state) => state,
        };
        self.lock().insert(key, next.clone());
        match next {
            State::Issued { key, chain, .. } => Ok((key, chain)),
            State::Waiting(sent) => {
                Err(format!("credential bundle is not issued yet (PodCertificateRequest {namespace}/{})", sent.pcr))
            }
            State::Refused(message) => Err(message),
        }
    }

    /// Sends a request for a new key of the projection's type.
    async fn request(
        &self,
        client: &kube::Client,
        pod: &Pod,
        source: &PodCertificateProjection,
    ) -> Result<Sent, String> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let spec = pod.spec.clone().unwrap_or_default();
        let account = spec.service_account_name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into());
        let node = spec.node_name.clone().unwrap_or_default();
        let sa = Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
            .get(&account)
            .await
            .map_err(|e| format!("while fetching service account: {e}"))?;
        let node_uid = self.node_uid(client, &node).await?;
        let key = new_key(&source.key_type)?;
        let stub = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .map_err(|e| format!("while generating stub PKCS#10 request: {e}"))?;
        let mut request = PodCertificateRequest {
            spec: PodCertificateRequestSpec {
                signer_name: source.signer_name.clone(),
                pod_name: pod.metadata.name.clone().unwrap_or_default(),
                pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
                service_account_name: account,
                service_account_uid: sa.metadata.uid.unwrap_or_default(),
                node_name: node,
                node_uid,
                max_expiration_seconds: source.max_expiration_seconds,
                stub_pkc_s10_request: ByteString(stub.der().to_vec()),
                unverified_user_annotations: source.user_annotations.clone(),
            },
            ..Default::default()
        };
        request.metadata.generate_name = Some("req-".into());
        request.metadata.owner_references =
            Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                ..Default::default()
            }]);
        let created = Api::<PodCertificateRequest>::namespaced(client.clone(), &namespace)
            .create(&PostParams::default(), &request)
            .await
            .map_err(|e| format!("while creating initial PodCertificateRequest: while creating on API: {e}"))?;
        Ok(Sent { key: key.serialize_pem(), pcr: created.metadata.name.unwrap_or_default(), at: Timestamp::now() })
    }

    async fn node_uid(&self, client: &kube::Client, node: &str) -> Result<String, String> {
        if let Some(uid) = self.node_uid.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(uid);
        }
        let got = Api::<Node>::all(client.clone())
            .get(node)
            .await
            .map_err(|e| format!("while getting node object: {e}"))?
            .metadata
            .uid
            .unwrap_or_default();
        *self.node_uid.lock().unwrap_or_else(|e| e.into_inner()) = Some(got.clone());
        Ok(got)
    }

    /// Forgets a pod's pairs (it is gone).
    pub fn forget(&self, uid: &str) {
        self.lock().retain(|(pod, _, _), _| pod != uid);
    }
}

/// The request's outcome; `None` while the API server does not have it yet.
async fn get(api: &Api<PodCertificateRequest>, name: &str) -> Result<Option<Outcome>, String> {
    let got = api.get_opt(name).await.map_err(|e| format!("while getting PodCertificateRequest {name:?}: {e}"))?;
    Ok(got.as_ref().map(outcome))
}

/// Upstream spreads refreshes over 5 minutes after `beginRefreshAt`.
fn jitter(at: Timestamp) -> Timestamp {
    at + SignedDuration::from_secs_f64(300.0 * crate::backoff::random_fraction())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcr(conditions: serde_json::Value, chain: &str) -> PodCertificateRequest {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "req-1"},
            "spec": {"signerName": "example.com/s", "podName": "p", "podUID": "u", "serviceAccountName": "sa",
                "serviceAccountUID": "sau", "nodeName": "n", "nodeUID": "nu", "stubPKCS10Request": ""},
            "status": {"conditions": conditions, "certificateChain": chain, "beginRefreshAt": "2030-01-01T00:00:00Z"}
        }))
        .unwrap()
    }

    #[test]
    fn outcomes_in_upstreams_words() {
        assert_eq!(outcome(&pcr(serde_json::json!([]), "")), Outcome::Pending);
        let denied = serde_json::json!([{"type": "Denied", "status": "True", "reason": "UnsupportedKeyType",
            "message": "RSA only", "lastTransitionTime": "2030-01-01T00:00:00Z"}]);
        assert_eq!(
            outcome(&pcr(denied, "")),
            Outcome::Refused(
                "PodCertificateRequest was permanently denied: reason=\"UnsupportedKeyType\" message=\"RSA only\""
                    .into()
            )
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![]).unwrap().self_signed(&key).unwrap();
        let issued = serde_json::json!([{"type": "Issued", "status": "True", "reason": "Issued", "message": "",
            "lastTransitionTime": "2030-01-01T00:00:00Z"}]);
        let chain = format!("junk before\n{}", cert.pem());
        match outcome(&pcr(issued, &chain)) {
            Outcome::Issued(clean, at) => {
                assert_eq!(clean, cert.pem().replace("\r\n", "\n"), "text outside the blocks dropped");
                assert_eq!(at, "2030-01-01T00:00:00Z".parse::<Timestamp>().unwrap());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_not_found_for_ten_minutes_is_sent_again() {
        let at = Timestamp::from_second(1_000_000).unwrap();
        let sent = Sent { key: String::new(), pcr: "req-1".into(), at };
        assert!(!abandoned(&sent, at + SignedDuration::from_secs(599)), "informer lag, as upstream allows");
        assert!(abandoned(&sent, at + SignedDuration::from_secs(601)));
    }

    #[test]
    fn every_key_type_upstream_names() {
        for t in ["ECDSAP256", "ECDSAP384", "ECDSAP521", "ED25519", "RSA3072"] {
            let key = new_key(t).unwrap();
            assert!(key.serialize_pem().starts_with("-----BEGIN PRIVATE KEY-----"), "{t}: PKCS#8");
            rcgen::CertificateParams::default().serialize_request(&key).unwrap();
        }
        assert_eq!(new_key("DSA").unwrap_err(), "unknown key type \"DSA\"");
    }
}
