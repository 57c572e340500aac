//! The kubelet's own certificates (upstream's `pkg/kubelet/certificate`): TLS bootstrap of the client
//! certificate from a bootstrap token, the certificate store, and rotation of the client (and serving)
//! certificates through CertificateSigningRequests while the agent runs.

pub mod bootstrap;
pub mod client;
pub mod csr;
pub mod rotation;
pub mod serving;
pub mod store;

/// One PEM block with Unix line ends (the `pem` crate's default is CRLF).
pub fn pem_block(label: &str, der: Vec<u8>) -> String {
    pem::encode_config(&pem::Pem::new(label, der), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

/// Writes `data` to `path` readable by root only, as a whole: a temporary file beside it (`.<name>.tmp`) written
/// and synced, then renamed over it, so a crash never leaves a half-written key.
pub fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The agent's API client: after TLS bootstrap when `--bootstrap-kubeconfig` is given, and with the client
/// certificate rotated (a task started here) when `rotateCertificates` is on and the kubeconfig names the
/// certificate store's current file.
pub async fn api_client(
    config: &crate::config::AgentConfig,
    kubeconfig: &std::path::Path,
) -> anyhow::Result<kube::Client> {
    let store = store::CertStore::new(&config.cert_dir, "kubelet-client");
    if let Some(boot) = &config.bootstrap_kubeconfig {
        let retry = std::time::Duration::from_secs(2);
        bootstrap::load_client_cert(kubeconfig, boot, &store, &config.node_name, retry).await?;
    }
    if !config.kubelet.rotate_certificates {
        return crate::agent::client_from(kubeconfig).await;
    }
    let kube_config = crate::agent::kube_config(kubeconfig).await?;
    let uses_store = kube_config.auth_info.client_certificate.as_deref().map(std::path::Path::new)
        == Some(store.current_path().as_path());
    if !uses_store {
        tracing::warn!(
            store = %store.current_path().display(),
            "rotateCertificates: the kubeconfig's client certificate is not the certificate store's; it is not rotated"
        );
        return crate::agent::client_from(kubeconfig).await;
    }
    let identity = client::Identity::new(&bootstrap::stored(&store)?)?;
    let client = client::rotating_client(kube_config, identity.clone())?;
    let request = csr::Request::client(&config.node_name);
    tokio::spawn(rotation::rotate(client.clone(), store, request, identity));
    Ok(client)
}
