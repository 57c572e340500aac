//! The kubelet API's TLS: the configured serving certificate or, like upstream, a self-signed one kept in
//! `<root-dir>/pki/kubelet.crt|key`; client certificates are verified against `authentication.x509.clientCAFile`
//! when one is set (and optional, so bearer tokens still work).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The configured pair, or the self-signed one under `pki_dir` (made on first start, kept afterwards).
pub fn serving_files(configured: Option<TlsFiles>, pki_dir: &Path, node_name: &str, node_ip: &str) -> Result<TlsFiles> {
    if let Some(files) = configured {
        return Ok(files);
    }
    let files = TlsFiles { cert: pki_dir.join("kubelet.crt"), key: pki_dir.join("kubelet.key") };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(pki_dir).with_context(|| format!("creating {}", pki_dir.display()))?;
    let names = vec![node_name.to_string(), node_ip.to_string(), "localhost".into(), "127.0.0.1".into()];
    let mut params = rcgen::CertificateParams::new(names).context("serving certificate names")?;
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("{node_name}@nodelet"));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().context("generating the serving key")?;
    let cert = params.self_signed(&key).context("self-signing the serving certificate")?;
    // The key first: a crash in between leaves a key without a certificate, which is regenerated next start.
    crate::certificate::write_private(&files.key, key.serialize_pem().as_bytes())
        .with_context(|| format!("writing {}", files.key.display()))?;
    crate::images::store::write_atomically(&files.cert, cert.pem().as_bytes())
        .with_context(|| format!("writing {}", files.cert.display()))?;
    tracing::info!(cert = %files.cert.display(), "generated a self-signed kubelet serving certificate");
    Ok(files)
}

/// The rustls server configuration: HTTP/1.1 (and h2) with optional client certificates from `client_ca`.
pub fn server_config(files: &TlsFiles, client_ca: Option<&Path>) -> Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .with_context(|| format!("reading {}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: invalid PEM", files.cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate", files.cert.display());
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("{}: no usable private key", files.key.display()))?;
    let mut config = builder(client_ca)?
        .with_single_cert(certs, key)
        .with_context(|| format!("{} does not match {}", files.cert.display(), files.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Like [`server_config`], the certificate chosen per handshake by `resolver` (one that rotates).
pub fn server_config_resolving(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig> {
    let mut config = builder(client_ca)?.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn builder(
    client_ca: Option<&Path>,
) -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?;
    Ok(match client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).with_context(|| format!("reading {}", path.display()))? {
                let cert = cert.with_context(|| format!("{}: invalid PEM", path.display()))?;
                roots.add(cert).with_context(|| format!("{}: not a CA certificate", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .with_context(|| format!("{}: unusable client CA", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_is_made_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let files = serving_files(None, dir.path(), "node-a", "10.0.0.5").unwrap();
        let first = std::fs::read(&files.cert).unwrap();
        let again = serving_files(None, dir.path(), "node-a", "10.0.0.5").unwrap();
        assert_eq!(std::fs::read(&again.cert).unwrap(), first, "kept across restarts");
        server_config(&files, None).unwrap();
        // A client CA file without certificates is refused, naming the file.
        let err = server_config(&files, Some(&files.key)).unwrap_err();
        assert!(format!("{err:#}").contains("kubelet.key"), "{err:#}");
        // A key that does not match the certificate.
        let other = tempfile::tempdir().unwrap();
        let other_files = serving_files(None, other.path(), "node-b", "10.0.0.6").unwrap();
        let mixed = TlsFiles { cert: files.cert.clone(), key: other_files.key };
        assert!(server_config(&mixed, None).is_err());
    }
}
