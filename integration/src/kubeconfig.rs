//! Kubeconfig files with embedded credentials, as `kubectl` and `kube` read them.

use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::certs::CertFiles;

/// Writes a kubeconfig for `server` that trusts `ca_pem` and authenticates with the client certificate `creds`.
pub fn write(path: &Path, server: &str, ca_pem: &str, user: &str, creds: &CertFiles) -> Result<()> {
    let cert = std::fs::read(&creds.cert).with_context(|| format!("reading {}", creds.cert.display()))?;
    let key = std::fs::read(&creds.key).with_context(|| format!("reading {}", creds.key.display()))?;
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: nodelet-test
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {user}@nodelet-test
  context:
    cluster: nodelet-test
    user: {user}
current-context: {user}@nodelet-test
",
        ca = STANDARD.encode(ca_pem),
        cert = STANDARD.encode(cert),
        key = STANDARD.encode(key),
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
