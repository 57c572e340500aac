//! The kubelet API's serving certificate from the cluster (`serverTLSBootstrap: true`), as upstream's serving
//! certificate manager: a `kubernetes.io/kubelet-serving` CSR for the node's name and address, signed once
//! approved (the controller-manager never approves these by itself: an administrator or an approver does),
//! kept in the store as `kubelet-server-current.pem`, rotated like the client certificate, and swapped into
//! the TLS server without a restart: new handshakes get the new certificate, open connections keep theirs.
//! Until the first one is issued, handshakes fail (upstream: "no serving certificate available").

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Result;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::csr::{self, Request};
use super::rotation::{self, Presents};
use super::store::{CertStore, Credential};

/// The certificate the kubelet API presents; none until one is issued.
#[derive(Debug, Default)]
pub struct ServingIdentity {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for ServingIdentity {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Presents for ServingIdentity {
    fn present(&self, credential: &Credential) -> Result<()> {
        let key = super::client::certified(credential)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
        Ok(())
    }
}

/// Presents the stored certificate if it is still valid, else asks for one (retrying with back-off until it
/// is issued), then rotates it for ever. A task of the agent.
pub async fn run(client: kube::Client, store: CertStore, request: Request, identity: Arc<ServingIdentity>) {
    let mut backoff = Duration::from_secs(2);
    loop {
        match store.current() {
            Ok(Some(c)) if c.not_after > jiff::Timestamp::now() => match identity.present(&c) {
                Ok(()) => break,
                Err(e) => tracing::error!(error = %format!("{e:#}"), "the stored serving certificate"),
            },
            _ => {}
        }
        let key = match csr::new_key() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "serving certificate key");
                return;
            }
        };
        match csr::request_certificate(&client, &request, &key, None, Duration::from_secs(3600)).await {
            Ok(chain) => match store.update(&chain, &key.serialize_pem()) {
                Ok(_) => {
                    tracing::info!(cert = %store.current_path().display(), "serving certificate issued");
                    continue;
                }
                Err(e) => tracing::error!(error = %e, "storing the serving certificate"),
            },
            Err(e) => tracing::error!(error = %e, retry_in = ?backoff, "no serving certificate yet"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(300));
    }
    rotation::rotate(client, store, request, identity).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_presented_until_a_certificate_is_set() {
        let identity = ServingIdentity::default();
        assert!(identity.current.read().unwrap().is_none());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["node-a".into()]).unwrap().self_signed(&key).unwrap();
        let credential = Credential::parse(&format!("{}{}", cert.pem(), key.serialize_pem())).unwrap();
        identity.present(&credential).unwrap();
        let presented = identity.current.read().unwrap().clone().unwrap();
        assert_eq!(presented.cert[0].as_ref(), cert.der().as_ref());
    }
}
