//! Service account tokens for projected volumes: TokenRequests bound to the pod (so the token dies with it),
//! cached per pod, audience and lifetime, and renewed like upstream's token manager: once 80% of the lifetime
//! has passed or the token is older than 24 h.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, anyhow};
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Api;
use kube::api::PostParams;

const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
struct Issued {
    token: String,
    issued: Timestamp,
    expires: Timestamp,
}

impl Issued {
    /// Upstream's `requiresRefresh`: past 80% of its lifetime, or older than 24 h.
    fn fresh(&self, now: Timestamp) -> bool {
        let lifetime = self.expires.duration_since(self.issued).as_secs_f64();
        let age = now.duration_since(self.issued).as_secs_f64();
        age < lifetime * 0.8 && age < MAX_TTL.as_secs_f64()
    }
}

/// The tokens issued to this node's pods.
#[derive(Debug, Default)]
pub struct Tokens {
    issued: Mutex<HashMap<(String, String, i64), Issued>>,
}

impl Tokens {
    /// A token for the pod's service account, from the cache or a new TokenRequest.
    pub async fn get(&self, client: &kube::Client, pod: &Pod, audience: &str, expiration: i64) -> Result<String> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let key = (uid.clone(), audience.to_string(), expiration);
        let now = Timestamp::now();
        if let Some(issued) = self.lock().get(&key).filter(|i| i.fresh(now)) {
            return Ok(issued.token.clone());
        }
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: (!audience.is_empty()).then(|| vec![audience.to_string()]),
                expiration_seconds: Some(expiration),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: Some(uid),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
        let answer: TokenRequest =
            api.create_subresource("token", &account, &PostParams::default(), &request).await.map_err(|e| {
                anyhow!("failed to fetch token for service account {namespace}/{account}: {}", api_message(&e))
            })?;
        let status = answer.status.ok_or_else(|| anyhow!("the token request was answered without a token"))?;
        let token = status
            .token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| anyhow!("the token request was answered without a token"))?;
        let expires = status.expiration_timestamp.map_or(now + jiff::SignedDuration::from_secs(expiration), |t| t.0);
        self.lock().insert(key, Issued { token: token.clone(), issued: now, expires });
        Ok(token)
    }

    /// Forgets a pod's tokens (it is gone).
    pub fn forget(&self, uid: &str) {
        self.lock().retain(|(pod, _, _), _| pod != uid);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, i64), Issued>> {
        self.issued.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The API server's own message for an API error (kube's display repeats it).
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewed_at_eighty_percent_or_a_day() {
        let issued = Timestamp::from_second(1_000_000).unwrap();
        let hour = Issued { token: "t".into(), issued, expires: issued + jiff::SignedDuration::from_secs(3600) };
        assert!(hour.fresh(issued + jiff::SignedDuration::from_secs(2879)));
        assert!(!hour.fresh(issued + jiff::SignedDuration::from_secs(2880)));
        let year = Issued { token: "t".into(), issued, expires: issued + jiff::SignedDuration::from_hours(24 * 365) };
        assert!(year.fresh(issued + jiff::SignedDuration::from_hours(23)));
        assert!(!year.fresh(issued + jiff::SignedDuration::from_hours(24)));
    }
}
