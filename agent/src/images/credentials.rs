//! Registry credentials from `.dockerconfigjson` documents: a pod's `imagePullSecrets` and the node's own
//! credentials file, matched against an image like upstream's credential keyring (registry host, optional
//! repository path prefix, `*` wildcards in host labels; the longest match wins).

use std::collections::BTreeMap;

use base64::Engine;
use oci_client::Reference;
use serde::Deserialize;

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential {{ username: {:?}, password: <redacted> }}", self.username)
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    auths: Option<BTreeMap<String, AuthEntry>>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
}

/// Credentials from any number of docker config documents, in the order they were added.
#[derive(Debug, Default, Clone)]
pub struct Keyring {
    entries: Vec<(String, Credential)>,
}

impl Keyring {
    /// Adds the entries of a `.dockerconfigjson` (`{"auths": {...}}`) or legacy `.dockercfg` (`{host: {...}}`).
    pub fn add_docker_config(&mut self, json: &[u8]) -> Result<(), String> {
        let auths = match serde_json::from_slice::<DockerConfig>(json) {
            Ok(DockerConfig { auths: Some(auths) }) => auths,
            _ => serde_json::from_slice::<BTreeMap<String, AuthEntry>>(json)
                .map_err(|e| format!("not a docker config: {e}"))?,
        };
        for (key, entry) in auths {
            let (username, password) = match (entry.username, entry.password, entry.auth) {
                (Some(u), Some(p), _) => (u, p),
                (_, _, Some(auth)) => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|e| format!("auth for {key} is not base64: {e}"))?;
                    let text = String::from_utf8(raw).map_err(|_| format!("auth for {key} is not UTF-8"))?;
                    let (u, p) = text.split_once(':').ok_or_else(|| format!("auth for {key} is not user:password"))?;
                    (u.to_owned(), p.to_owned())
                }
                _ => continue,
            };
            self.entries.push((normalise_key(&key), Credential { username, password }));
        }
        Ok(())
    }

    /// The credential whose key matches the image best, if any.
    pub fn lookup(&self, reference: &Reference) -> Option<&Credential> {
        self.lookup_all(reference).into_iter().next()
    }

    /// Every matching credential, best (longest key) first, then in the order added.
    pub fn lookup_all(&self, reference: &Reference) -> Vec<&Credential> {
        let target = format!("{}/{}", canonical_host(reference.registry()), reference.repository());
        let mut found: Vec<&(String, Credential)> =
            self.entries.iter().filter(|(key, _)| key_matches(key, &target)).collect();
        found.sort_by_key(|(key, _)| std::cmp::Reverse(key.len()));
        found.into_iter().map(|(_, c)| c).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `https://index.docker.io/v1/` -> `docker.io`; `http://host:5000/path/` -> `host:5000/path`.
fn normalise_key(key: &str) -> String {
    let key = key.trim();
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let key = key.trim_end_matches('/');
    let (host, path) = key.split_once('/').unwrap_or((key, ""));
    let path = if path == "v1" || path == "v2" { "" } else { path };
    let host = canonical_host(host);
    if path.is_empty() { host.to_owned() } else { format!("{host}/{path}") }
}

fn canonical_host(host: &str) -> &str {
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    }
}

fn key_matches(key: &str, target: &str) -> bool {
    let (khost, kpath) = key.split_once('/').unwrap_or((key, ""));
    let (thost, tpath) = target.split_once('/').unwrap_or((target, ""));
    if !host_matches(khost, thost) {
        return false;
    }
    kpath.is_empty() || tpath == kpath || tpath.starts_with(&format!("{kpath}/"))
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let (pname, pport) = pattern.split_once(':').unwrap_or((pattern, ""));
    let (hname, hport) = host.split_once(':').unwrap_or((host, ""));
    if pport != hport {
        return false;
    }
    let plabels: Vec<&str> = pname.split('.').collect();
    let hlabels: Vec<&str> = hname.split('.').collect();
    plabels.len() == hlabels.len() && plabels.iter().zip(&hlabels).all(|(p, h)| glob_label(p, h))
}

/// One host label against a pattern label with `*` wildcards (`*`, `ab*`, `*cd`, `a*d`).
fn glob_label(pattern: &str, label: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern.eq_ignore_ascii_case(label),
        Some((pre, rest)) => {
            label.len() >= pre.len()
                && label[..pre.len()].eq_ignore_ascii_case(pre)
                && (0..=label.len() - pre.len()).any(|i| glob_label(rest, &label[pre.len() + i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(s: &str) -> Reference {
        s.parse().unwrap()
    }

    #[test]
    fn reads_both_formats_and_matches_hosts() {
        let mut k = Keyring::default();
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        k.add_docker_config(format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}}}}}}"#).as_bytes())
            .unwrap();
        k.add_docker_config(br#"{"127.0.0.1:5000":{"username":"alice","password":"pw"}}"#).unwrap();
        k.add_docker_config(br#"{"auths":{"*.example.com/team":{"username":"team","password":"t"}}}"#).unwrap();
        assert_eq!(k.lookup(&reference("busybox")).unwrap().username, "bob");
        assert_eq!(k.lookup(&reference("127.0.0.1:5000/busybox:1")).unwrap().password, "pw");
        assert!(k.lookup(&reference("127.0.0.1:5001/busybox")).is_none());
        assert_eq!(k.lookup(&reference("reg.example.com/team/app")).unwrap().username, "team");
        assert!(k.lookup(&reference("reg.example.com/other/app")).is_none());
        assert!(k.lookup(&reference("a.b.example.com/team/app")).is_none());
    }

    #[test]
    fn longest_key_wins_and_garbage_is_an_error() {
        let mut k = Keyring::default();
        k.add_docker_config(
            br#"{"auths":{"r.io":{"username":"all","password":"1"},"r.io/x":{"username":"x","password":"2"}}}"#,
        )
        .unwrap();
        assert_eq!(k.lookup(&reference("r.io/x/y")).unwrap().username, "x");
        assert_eq!(k.lookup(&reference("r.io/z")).unwrap().username, "all");
        assert!(k.add_docker_config(b"not json").is_err());
        assert!(k.add_docker_config(br#"{"auths":{"r.io":{"auth":"!!"}}}"#).is_err());
        assert!(!format!("{:?}", k.lookup(&reference("r.io/z")).unwrap()).contains('1'));
    }
}
