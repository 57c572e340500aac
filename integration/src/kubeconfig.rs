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
    let user_fields = format!(
        "    client-certificate-data: {}\n    client-key-data: {}\n",
        STANDARD.encode(cert),
        STANDARD.encode(key)
    );
    write_with(path, server, ca_pem, user, &user_fields)
}

/// Writes a kubeconfig for `server` that trusts `ca_pem` and authenticates with the bearer token `token` (a
/// bootstrap token's kubeconfig, as `kubeadm join` writes it).
pub fn write_token(path: &Path, server: &str, ca_pem: &str, user: &str, token: &str) -> Result<()> {
    write_with(path, server, ca_pem, user, &format!("    token: {token}\n"))
}

fn write_with(path: &Path, server: &str, ca_pem: &str, user: &str, user_fields: &str) -> Result<()> {
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
{user_fields}contexts:
- name: {user}@nodelet-test
  context:
    cluster: nodelet-test
    user: {user}
current-context: {user}@nodelet-test
",
        ca = STANDARD.encode(ca_pem),
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
