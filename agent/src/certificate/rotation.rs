//! Certificate rotation, as upstream's certificate manager: a new key and request once a random point between
//! 70% and 90% of the current certificate's lifetime has passed, sent with the current credentials; the new
//! pair is stored, then presented ([`super::client::Identity`] or the TLS server's resolver). A failed attempt
//! is retried with back-off (2 s doubling to 5 minutes) while the old certificate still serves.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::csr::{self, Request};
use super::store::{CertStore, Credential};

/// When to rotate a certificate valid from `not_before` to `not_after`: `fraction` (0..1) picks the point in
/// upstream's 70%..90% window.
pub fn deadline(not_before: Timestamp, not_after: Timestamp, fraction: f64) -> Timestamp {
    let lifetime = not_after.duration_since(not_before).as_secs_f64().max(0.0);
    let at = lifetime * (0.7 + 0.2 * fraction.clamp(0.0, 1.0));
    not_before + SignedDuration::from_secs_f64(at)
}

/// Presents a new credential wherever the certificate is used.
pub trait Presents: Send + Sync {
    fn present(&self, credential: &Credential) -> anyhow::Result<()>;
}

impl Presents for super::client::Identity {
    fn present(&self, credential: &Credential) -> anyhow::Result<()> {
        self.set(credential)
    }
}

/// Rotates the store's certificate for ever (a task of the agent).
pub async fn rotate(client: kube::Client, store: CertStore, request: Request, presents: Arc<dyn Presents>) {
    let mut backoff = Duration::from_secs(2);
    loop {
        let current = match store.current() {
            Ok(Some(c)) => c,
            other => {
                tracing::error!(result = ?other.map(|_| ()), "certificate rotation: no current certificate");
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            }
        };
        let at = deadline(current.not_before, current.not_after, crate::backoff::random_fraction());
        let wait = Timestamp::now().duration_until(at).unsigned_abs();
        if at > Timestamp::now() {
            tracing::info!(signer = request.signer, expires = %current.not_after, rotation = %at, "waiting to rotate the certificate");
            tokio::time::sleep(wait).await;
        }
        match renew(&client, &request).await {
            Ok((chain, key)) => {
                let stored = store.update(&chain, &key).map_err(anyhow::Error::from).and_then(|_| {
                    let credential = super::bootstrap::stored(&store)?;
                    presents.present(&credential)?;
                    Ok(credential)
                });
                match stored {
                    Ok(c) => {
                        backoff = Duration::from_secs(2);
                        tracing::info!(signer = request.signer, expires = %c.not_after, "certificate rotated");
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "certificate rotation: storing the new certificate")
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?backoff, "certificate rotation failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(300));
            }
        }
    }
}

/// A new key and its issued chain.
async fn renew(client: &kube::Client, request: &Request) -> Result<(String, String), csr::CsrError> {
    let key = csr::new_key()?;
    let chain = csr::request_certificate(client, request, &key, None, Duration::from_secs(15 * 60)).await?;
    Ok((chain, key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_falls_between_70_and_90_percent() {
        let from = Timestamp::from_second(1_000_000).unwrap();
        let to = from + SignedDuration::from_secs(1000);
        assert_eq!(deadline(from, to, 0.0), from + SignedDuration::from_secs(700));
        assert_eq!(deadline(from, to, 1.0), from + SignedDuration::from_secs(900));
        assert_eq!(deadline(from, to, 0.5), from + SignedDuration::from_secs(800));
        assert_eq!(deadline(from, to, 7.0), from + SignedDuration::from_secs(900), "clamped");
        assert_eq!(deadline(to, from, 0.5), to, "a certificate already past its end rotates at once");
    }
}
