//! Who may call the kubelet API, upstream's way: authentication by client certificate (CN = user, O = groups,
//! verified by TLS against the client CA), else a bearer token checked with a TokenReview, else anonymous when
//! allowed; authorization of `nodes/<subresource>` with a SubjectAccessReview (or AlwaysAllow). Decisions are
//! cached for the configured TTLs, as upstream does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Api;
use kube::api::PostParams;
use rustls::pki_types::CertificateDer;

use crate::config::KubeletConfiguration;

/// Cache size above which expired token reviews and decisions are dropped.
const CACHE_ENTRIES: usize = 1024;

/// Makes room for one more entry in a cache of at most [`CACHE_ENTRIES`]: expired entries go first, then, if
/// every entry is fresh (e.g. a flood of distinct bogus tokens), the oldest ones.
fn bound<K: Clone + Eq + std::hash::Hash, V>(cache: &mut HashMap<K, V>, ttl: Duration, at: impl Fn(&V) -> Instant) {
    if cache.len() < CACHE_ENTRIES {
        return;
    }
    cache.retain(|_, v| at(v).elapsed() < ttl);
    while cache.len() >= CACHE_ENTRIES {
        let Some(oldest) = cache.iter().min_by_key(|(_, v)| at(v)).map(|(k, _)| k.clone()) else { return };
        cache.remove(&oldest);
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    fn anonymous() -> User {
        User { name: "system:anonymous".into(), groups: vec!["system:unauthenticated".into()] }
    }
}

/// What a request asks for, as upstream's kubelet authorizer names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub verb: &'static str,
    /// `nodes/<subresource>`: `proxy` for everything without a finer name.
    pub subresource: &'static str,
}

impl Attributes {
    /// Verb from the HTTP method, subresource from the path (upstream's `GetRequestAttributes`).
    pub fn of(method: &hyper::Method, path: &str) -> Vec<Attributes> {
        let verb = match *method {
            hyper::Method::POST => "create",
            hyper::Method::PUT => "update",
            hyper::Method::PATCH => "patch",
            hyper::Method::DELETE => "delete",
            _ => "get",
        };
        let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
        let fine = [("/stats", "stats"), ("/metrics", "metrics"), ("/logs", "log"), ("/spec", "spec")];
        if let Some((_, sub)) = fine.iter().find(|(prefix, _)| under(prefix)) {
            return vec![Attributes { verb, subresource: sub }];
        }
        // Fine-grained kubelet authorization: these are allowed by their own subresource or by `proxy`.
        let with_fallback = [("/pods", "pods"), ("/healthz", "healthz"), ("/configz", "configz")];
        let mut wanted = Vec::new();
        if let Some((_, sub)) = with_fallback.iter().find(|(prefix, _)| under(prefix)) {
            wanted.push(Attributes { verb, subresource: sub });
        }
        wanted.push(Attributes { verb, subresource: "proxy" });
        wanted
    }
}

/// Why a request is refused.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("Unauthorized")]
    Unauthenticated,
    #[error("Forbidden (user={user}, verb={verb}, resource=nodes, subresource(s)=[{subresource}])")]
    Forbidden { user: String, verb: &'static str, subresource: String },
    #[error("authorization failed: {0}")]
    Failed(String),
}

pub struct Auth {
    client: Option<kube::Client>,
    node: String,
    token_webhook: bool,
    anonymous: bool,
    webhook_authz: bool,
    token_ttl: Duration,
    allowed_ttl: Duration,
    denied_ttl: Duration,
    tokens: Mutex<HashMap<String, (Option<User>, Instant)>>,
    decisions: Mutex<HashMap<(User, Attributes), (bool, Instant)>>,
}

impl Auth {
    /// Errors when the configuration needs an API server and there is none (upstream refuses to start too).
    pub fn new(config: &KubeletConfiguration, client: Option<kube::Client>, node: &str) -> anyhow::Result<Auth> {
        let token_webhook = config.authentication.webhook.enabled;
        let webhook_authz = config.authorization.mode == "Webhook";
        if client.is_none() && (token_webhook || webhook_authz) {
            anyhow::bail!(
                "webhook authentication/authorization need an API server: set authentication.webhook.enabled=false \
                 and authorization.mode=AlwaysAllow to serve the kubelet API standalone"
            );
        }
        Ok(Auth {
            client,
            node: node.to_string(),
            token_webhook,
            anonymous: config.authentication.anonymous.enabled,
            webhook_authz,
            token_ttl: config.authentication.webhook.cache_ttl,
            allowed_ttl: config.authorization.webhook.cache_authorized_ttl,
            denied_ttl: config.authorization.webhook.cache_unauthorized_ttl,
            tokens: Mutex::default(),
            decisions: Mutex::default(),
        })
    }

    /// The caller: its verified client certificate, else its bearer token, else anonymous if allowed.
    pub async fn authenticate(
        &self,
        peer: Option<&CertificateDer<'_>>,
        authorization: Option<&str>,
    ) -> Result<User, Denied> {
        if let Some(user) = peer.and_then(user_of_certificate) {
            return Ok(user);
        }
        if let Some(token) = authorization.and_then(|h| h.strip_prefix("Bearer ")).filter(|_| self.token_webhook) {
            // A token that does not authenticate is a 401 even where anonymous requests are allowed (upstream):
            // anonymous is for requests that present no credentials.
            return self.review_token(token.trim()).await?.ok_or(Denied::Unauthenticated);
        }
        if self.anonymous {
            return Ok(User::anonymous());
        }
        Err(Denied::Unauthenticated)
    }

    async fn review_token(&self, token: &str) -> Result<Option<User>, Denied> {
        if let Some((user, at)) = lock(&self.tokens).get(token)
            && at.elapsed() < self.token_ttl
        {
            return Ok(user.clone());
        }
        let Some(client) = self.client.clone() else { return Ok(None) };
        let review =
            TokenReview { spec: TokenReviewSpec { token: token.to_string(), audiences: None }, ..Default::default() };
        let reviewed = Api::<TokenReview>::all(client)
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Denied::Failed(format!("token review: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        let user = status
            .user
            .filter(|_| status.authenticated == Some(true))
            .map(|u| User { name: u.username.unwrap_or_default(), groups: u.groups.unwrap_or_default() });
        let mut tokens = lock(&self.tokens);
        bound(&mut tokens, self.token_ttl, |(_, at)| *at);
        tokens.insert(token.to_string(), (user.clone(), Instant::now()));
        Ok(user)
    }

    /// Allowed if any of `wanted` is (upstream tries the fine-grained subresource, then `proxy`).
    pub async fn authorize(&self, user: &User, wanted: &[Attributes]) -> Result<(), Denied> {
        if !self.webhook_authz {
            return Ok(());
        }
        for attributes in wanted {
            if self.allowed(user, attributes).await? {
                return Ok(());
            }
        }
        let last = wanted.last().map(|a| (a.verb, a.subresource)).unwrap_or(("get", "proxy"));
        Err(Denied::Forbidden { user: user.name.clone(), verb: last.0, subresource: last.1.to_string() })
    }

    async fn allowed(&self, user: &User, attributes: &Attributes) -> Result<bool, Denied> {
        let key = (user.clone(), attributes.clone());
        if let Some((allowed, at)) = lock(&self.decisions).get(&key) {
            let ttl = if *allowed { self.allowed_ttl } else { self.denied_ttl };
            if at.elapsed() < ttl {
                return Ok(*allowed);
            }
        }
        let Some(client) = self.client.clone() else { return Ok(false) };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                groups: Some(user.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(attributes.verb.into()),
                    resource: Some("nodes".into()),
                    subresource: Some(attributes.subresource.into()),
                    name: Some(self.node.clone()),
                    version: Some("v1".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(client)
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Denied::Failed(format!("subject access review: {e}")))?;
        let allowed = reviewed.status.is_some_and(|s| s.allowed);
        let mut decisions = lock(&self.decisions);
        bound(&mut decisions, self.allowed_ttl.max(self.denied_ttl), |(_, at)| *at);
        decisions.insert(key, (allowed, Instant::now()));
        Ok(allowed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// CN is the user, each O a group (how Kubernetes reads x509 identities).
fn user_of_certificate(cert: &CertificateDer<'_>) -> Option<User> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let groups = subject.iter_organization().filter_map(|o| o.as_str().ok().map(str::to_string)).collect();
    Some(User { name, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_stay_bounded_under_a_flood_of_fresh_entries() {
        let mut cache: HashMap<String, Instant> = HashMap::new();
        for i in 0..3 * CACHE_ENTRIES {
            bound(&mut cache, Duration::from_secs(3600), |at| *at);
            cache.insert(format!("bogus-{i}"), Instant::now());
        }
        assert_eq!(cache.len(), CACHE_ENTRIES);
        assert!(cache.contains_key(&format!("bogus-{}", 3 * CACHE_ENTRIES - 1)), "the newest stays");
    }

    #[test]
    fn attributes_follow_upstream_paths() {
        let get = hyper::Method::GET;
        let subs = |path: &str| -> Vec<&str> { Attributes::of(&get, path).iter().map(|a| a.subresource).collect() };
        assert_eq!(subs("/containerLogs/ns/pod/c"), ["proxy"]);
        assert_eq!(subs("/stats/summary"), ["stats"]);
        assert_eq!(subs("/logs/syslog"), ["log"]);
        assert_eq!(subs("/pods"), ["pods", "proxy"]);
        assert_eq!(subs("/healthz"), ["healthz", "proxy"]);
        assert_eq!(subs("/podsx"), ["proxy"]);
        assert_eq!(Attributes::of(&hyper::Method::POST, "/exec/a/b/c")[0].verb, "create");
    }

    #[test]
    fn certificate_names_the_user_and_groups() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "alice");
        // rcgen keeps one value per attribute type: one group here.
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "ops");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let user = user_of_certificate(cert.der()).unwrap();
        assert_eq!(user, User { name: "alice".into(), groups: vec!["ops".into()] });
    }

    #[tokio::test]
    async fn without_an_api_server_only_always_allow_works() {
        let config = KubeletConfiguration::default();
        assert!(Auth::new(&config, None, "n").is_err());
        let mut open = KubeletConfiguration::default();
        open.authentication.webhook.enabled = false;
        open.authorization.mode = "AlwaysAllow".into();
        let auth = Auth::new(&open, None, "n").unwrap();
        assert!(matches!(auth.authenticate(None, Some("Bearer x")).await, Err(Denied::Unauthenticated)));
        open.authentication.anonymous.enabled = true;
        let auth = Auth::new(&open, None, "n").unwrap();
        let user = auth.authenticate(None, None).await.unwrap();
        assert_eq!(user.name, "system:anonymous");
        auth.authorize(&user, &Attributes::of(&hyper::Method::GET, "/pods")).await.unwrap();
    }
}
