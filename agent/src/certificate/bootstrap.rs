//! TLS bootstrap, as upstream's `LoadClientCert`: with `--bootstrap-kubeconfig`, a node that has no valid
//! client certificate asks for one with the bootstrap credentials (a bootstrap token), waits for it to be
//! approved and issued, keeps it in the certificate store and writes `--kubeconfig` naming the store's
//! `kubelet-client-current.pem`.
//!
//! Crash rules: the key is written (`kubelet-client.key.tmp`, 0600) before the request is sent and the request
//! is named after the key, so an agent killed while waiting finds its own request again; the kubeconfig is
//! written (temporary file, rename) only once the certificate is in the store. A denied or failed request is
//! logged with the signer's reason and asked again with a new key after a back-off.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use jiff::Timestamp;

use super::csr::{self, CsrError, Request};
use super::store::{CertStore, Credential};

/// The key of a request in flight.
const PENDING_KEY: &str = "kubelet-client.key.tmp";

fn current_context(kubeconfig: &kube::config::Kubeconfig) -> Option<&kube::config::Context> {
    let name = kubeconfig.current_context.as_deref()?;
    kubeconfig.contexts.iter().find(|c| c.name == name)?.context.as_ref()
}

/// Whether the kubeconfig can be used as it is: it exists, and its client certificate (if it uses one) has not
/// expired.
pub fn kubeconfig_is_valid(path: &Path) -> bool {
    let Ok(kubeconfig) = kube::config::Kubeconfig::read_from(path) else { return false };
    let user = current_context(&kubeconfig).map(|c| c.user.clone().unwrap_or_default());
    let Some(auth) =
        kubeconfig.auth_infos.iter().find(|a| Some(&a.name) == user.as_ref()).and_then(|a| a.auth_info.clone())
    else {
        return false;
    };
    let pem = if let Some(data) = &auth.client_certificate_data {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(data).ok()
    } else if let Some(file) = &auth.client_certificate {
        let file = if Path::new(file).is_relative() { path.with_file_name(file) } else { PathBuf::from(file) };
        std::fs::read(file).ok()
    } else {
        // A token or another credential: nothing here can expire.
        return true;
    };
    let Some(leaf) = pem.and_then(|p| pem::parse(p).ok()) else { return false };
    super::store::validity(leaf.contents()).is_ok_and(|(_, not_after)| not_after > Timestamp::now())
}

/// Writes upstream's kubelet kubeconfig: the bootstrap kubeconfig's cluster, and `cert` as client certificate
/// and key.
pub fn write_kubeconfig(path: &Path, bootstrap: &kube::config::Kubeconfig, cert: &Path) -> Result<()> {
    let cluster_name = current_context(bootstrap)
        .map(|c| c.cluster.clone())
        .context("the bootstrap kubeconfig has no current context")?;
    let cluster = bootstrap
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.clone())
        .context("the bootstrap kubeconfig's cluster")?;
    let mut c = serde_json::json!({"server": cluster.server});
    if let Some(data) = &cluster.certificate_authority_data {
        c["certificate-authority-data"] = data.clone().into();
    }
    if let Some(file) = &cluster.certificate_authority {
        c["certificate-authority"] = file.clone().into();
    }
    if let Some(name) = &cluster.tls_server_name {
        c["tls-server-name"] = name.clone().into();
    }
    let cert = cert.display().to_string();
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "default-cluster", "cluster": c}],
        "contexts": [{"name": "default-context",
            "context": {"cluster": "default-cluster", "namespace": "default", "user": "default-auth"}}],
        "current-context": "default-context",
        "users": [{"name": "default-auth", "user": {"client-certificate": cert, "client-key": cert}}],
    });
    let text = serde_yaml::to_string(&doc)?;
    let tmp = path.with_extension("tmp");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The key of the request in flight (kept across restarts), or a new one written before it is used.
fn pending_key(dir: &Path) -> Result<rcgen::KeyPair> {
    let path = dir.join(PENDING_KEY);
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(key) = rcgen::KeyPair::from_pem(&text)
    {
        return Ok(key);
    }
    let key = csr::new_key()?;
    std::fs::create_dir_all(dir)?;
    super::write_private(&path, key.serialize_pem().as_bytes())?;
    Ok(key)
}

/// Makes sure `kubeconfig` holds valid credentials, bootstrapping a client certificate with `bootstrap` when it
/// does not. Retries (with `retry` between attempts, doubling to 5 minutes) until it has one.
pub async fn load_client_cert(
    kubeconfig: &Path,
    bootstrap: &Path,
    store: &CertStore,
    node: &str,
    retry: Duration,
) -> Result<()> {
    if kubeconfig_is_valid(kubeconfig) {
        tracing::info!(kubeconfig = %kubeconfig.display(), "the kubeconfig is valid: no bootstrap needed");
        return Ok(());
    }
    let boot = kube::config::Kubeconfig::read_from(bootstrap)
        .with_context(|| format!("reading the bootstrap kubeconfig {}", bootstrap.display()))?;
    if let Ok(Some(current)) = store.current()
        && current.not_after > Timestamp::now()
    {
        tracing::info!(cert = %store.current_path().display(), "using the stored client certificate");
        return write_kubeconfig(kubeconfig, &boot, &store.current_path());
    }
    let client = crate::agent::client_from(bootstrap).await?;
    let request = Request::client(node);
    let dir = store.current_path().parent().map(Path::to_path_buf).unwrap_or_default();
    let mut wait = retry;
    loop {
        let key = pending_key(&dir)?;
        let name = request.digested_name(&key);
        match csr::request_certificate(&client, &request, &key, Some(name), Duration::from_secs(3600)).await {
            Ok(chain) => {
                store.update(&chain, &key.serialize_pem())?;
                let _ = std::fs::remove_file(dir.join(PENDING_KEY));
                tracing::info!(cert = %store.current_path().display(), "TLS bootstrap: client certificate issued");
                return write_kubeconfig(kubeconfig, &boot, &store.current_path());
            }
            Err(e) => {
                if matches!(e, CsrError::Denied { .. } | CsrError::Failed { .. } | CsrError::Timeout(..)) {
                    // That request is over: the next one gets a new key (and so a new name).
                    let _ = std::fs::remove_file(dir.join(PENDING_KEY));
                }
                tracing::error!(error = %e, retry_in = ?wait, "TLS bootstrap failed");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(300));
            }
        }
    }
}

/// The stored credential as a [`Credential`], for callers that must have one.
pub fn stored(store: &CertStore) -> Result<Credential> {
    store.current()?.with_context(|| format!("{} does not exist", store.current_path().display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap_kubeconfig(dir: &Path) -> PathBuf {
        let path = dir.join("bootstrap.conf");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://10.0.0.1:6443', certificate-authority-data: Q0E=}\ncontexts:\n- name: boot\n  context: {cluster: c, user: tls-bootstrap-token-user}\ncurrent-context: boot\nusers:\n- name: tls-bootstrap-token-user\n  user: {token: abcdef.0123456789abcdef}\n",
        )
        .unwrap();
        path
    }

    #[test]
    fn the_written_kubeconfig_names_the_current_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let boot = kube::config::Kubeconfig::read_from(bootstrap_kubeconfig(dir.path())).unwrap();
        let store = CertStore::new(&dir.path().join("pki"), "kubelet-client");
        let kubeconfig = dir.path().join("kubelet.conf");
        assert!(!kubeconfig_is_valid(&kubeconfig), "missing");
        write_kubeconfig(&kubeconfig, &boot, &store.current_path()).unwrap();
        let written = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
        let cluster = written.clusters[0].cluster.clone().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("Q0E="));
        let user = written.auth_infos[0].auth_info.clone().unwrap();
        assert_eq!(user.client_certificate, Some(store.current_path().display().to_string()));
        assert!(!kubeconfig_is_valid(&kubeconfig), "the certificate it names does not exist yet");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![]).unwrap().self_signed(&key).unwrap();
        store.update(&cert.pem(), &key.serialize_pem()).unwrap();
        assert!(kubeconfig_is_valid(&kubeconfig));
        // An expired certificate makes it invalid.
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        store.update(&params.self_signed(&key).unwrap().pem(), &key.serialize_pem()).unwrap();
        assert!(!kubeconfig_is_valid(&kubeconfig));
        // A token never expires here.
        assert!(kubeconfig_is_valid(&dir.path().join("bootstrap.conf")));
    }

    #[test]
    fn the_pending_key_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = pending_key(dir.path()).unwrap();
        let again = pending_key(dir.path()).unwrap();
        assert_eq!(first.public_key_raw(), again.public_key_raw());
        let request = Request::client("n");
        assert_eq!(request.digested_name(&first), request.digested_name(&again));
    }
}
