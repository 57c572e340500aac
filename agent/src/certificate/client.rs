//! An API client whose TLS client certificate can change while it runs (certificate rotation): new connections
//! present the current certificate at once, and the connections opened with an older one are closed shortly
//! before that one expires (a minute before, or halfway there if that is sooner), so nothing talks to the API
//! server with an expired certificate. Upstream's `connrotation` dialer closes them at the rotation; waiting
//! lets a watch in flight (the API server ends each within minutes) finish on its own instead of breaking at
//! every rotation. A watch still open when its connection is closed resumes from its resource version.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use tokio::sync::Notify;

use anyhow::{Context as _, Result};
use futures_util::task::AtomicWaker;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use kube::client::ConfigExt;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tower::{BoxError, ServiceBuilder, ServiceExt};

use super::store::Credential;

/// The client certificate new connections present, and the connections opened with older ones.
#[derive(Debug)]
pub struct Identity {
    current: RwLock<(Arc<CertifiedKey>, Timestamp)>,
    /// Bumped by every rotation; a connection remembers the one it was opened under.
    generation: AtomicU64,
    /// Connections opened under an older generation than this are closed.
    closed_below: AtomicU64,
    /// When to close the connections of the generations before: (time, generation).
    retirements: Mutex<Vec<(Timestamp, u64)>>,
    retired: Notify,
    /// Each open connection's wake-up, so that idle ones close when their generation is retired.
    connections: Mutex<Vec<Weak<AtomicWaker>>>,
}

/// A credential as rustls presents it.
pub fn certified(credential: &Credential) -> Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_slice_iter(credential.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the client certificate")?;
    let key = PrivateKeyDer::from_pem_slice(credential.key_pem.as_bytes()).context("the client key")?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider.key_provider.load_private_key(key).context("the client key")?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

impl Identity {
    pub fn new(credential: &Credential) -> Result<Arc<Identity>> {
        Ok(Arc::new(Identity {
            current: RwLock::new((certified(credential)?, credential.not_after)),
            generation: AtomicU64::new(0),
            closed_below: AtomicU64::new(0),
            retirements: Mutex::new(Vec::new()),
            retired: Notify::new(),
            connections: Mutex::new(Vec::new()),
        }))
    }

    /// Presents `credential` from now on; the connections opened before are closed before the old one expires.
    pub fn set(&self, credential: &Credential) -> Result<()> {
        let key = certified(credential)?;
        let (_, old_expiry) = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            (key, credential.not_after),
        );
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let left = old_expiry.duration_since(Timestamp::now()).max(SignedDuration::ZERO);
        let at = old_expiry - left.checked_div(2).unwrap_or_default().min(SignedDuration::from_secs(60));
        self.retirements.lock().unwrap_or_else(|e| e.into_inner()).push((at, generation));
        self.retired.notify_one();
        Ok(())
    }

    /// Closes the connections of the generations whose time has come; the next time one comes, if any.
    fn retire_due(&self, now: Timestamp) -> Option<Timestamp> {
        let mut retirements = self.retirements.lock().unwrap_or_else(|e| e.into_inner());
        let due = retirements.iter().filter(|(at, _)| *at <= now).map(|(_, g)| *g).max();
        retirements.retain(|(at, _)| *at > now);
        if let Some(generation) = due {
            self.closed_below.fetch_max(generation, Ordering::SeqCst);
            let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
            for waker in connections.iter().filter_map(Weak::upgrade) {
                waker.wake();
            }
        }
        retirements.iter().map(|(at, _)| *at).min()
    }

    /// Closes retired connections on time (a task of the client).
    async fn retire(self: Arc<Self>) {
        loop {
            let next = self.retire_due(Timestamp::now());
            let wait = next.map_or(Duration::from_secs(3600), |at| {
                Timestamp::now().duration_until(at).unsigned_abs().max(Duration::from_millis(10))
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.retired.notified() => {}
            }
        }
    }

    fn track(&self) -> (u64, Arc<AtomicWaker>) {
        let waker = Arc::new(AtomicWaker::new());
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.retain(|w| w.strong_count() > 0);
        connections.push(Arc::downgrade(&waker));
        (self.generation.load(Ordering::SeqCst), waker)
    }

    fn is_retired(&self, generation: u64) -> bool {
        generation < self.closed_below.load(Ordering::SeqCst)
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A kube client for `config` (its own client certificate ignored) presenting `identity`'s certificate.
pub fn rotating_client(mut config: kube::Config, identity: Arc<Identity>) -> Result<kube::Client> {
    config.auth_info.client_certificate = None;
    config.auth_info.client_certificate_data = None;
    config.auth_info.client_key = None;
    config.auth_info.client_key_data = None;
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    let mut tls = config.rustls_client_config().context("the API client's TLS configuration")?;
    tls.client_auth_cert_resolver = identity.clone();
    // No session resumption (client-go has none either): a resumed session would carry the certificate it was
    // first made with past a rotation.
    tls.resumption = rustls::client::Resumption::disabled();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    tokio::spawn(identity.clone().retire());
    let mut connector = hyper_timeout::TimeoutConnector::new(Rotating { inner: https, identity });
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    let client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    let host = config.cluster_url.authority().map(ToString::to_string).unwrap_or_default();
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .layer(crate::metrics::rest_client::CountRequests { host })
        .map_err(BoxError::from)
        .service(client)
        .map_response(|r| r.map(|b| http_body_util::BodyExt::map_err(b, BoxError::from)));
    Ok(kube::Client::new(service, config.default_namespace))
}

/// The connector: each connection remembers the certificate generation it was opened under.
#[derive(Clone)]
struct Rotating<C> {
    inner: C,
    identity: Arc<Identity>,
}

impl<C> tower::Service<Uri> for Rotating<C>
where
    C: tower::Service<Uri> + Send,
    C::Future: Send + 'static,
{
    type Response = Tracked<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (born, waker) = self.identity.track();
        let identity = self.identity.clone();
        let connecting = self.inner.call(uri);
        Box::pin(async move { Ok(Tracked { io: connecting.await?, born, waker, identity }) })
    }
}

/// A connection that fails once the certificate it was opened with is replaced.
struct Tracked<T> {
    io: T,
    born: u64,
    waker: Arc<AtomicWaker>,
    identity: Arc<Identity>,
}

impl<T> Tracked<T> {
    fn stale(&self, cx: &Context<'_>) -> Option<std::io::Error> {
        self.waker.register(cx.waker());
        self.identity
            .is_retired(self.born)
            .then(|| std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "client certificate rotated"))
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.stale(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Tracked<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.stale(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connection> Connection for Tracked<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(not_after: Timestamp) -> Credential {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![]).unwrap().self_signed(&key).unwrap();
        Credential { not_after, ..Credential::parse(&format!("{}{}", cert.pem(), key.serialize_pem())).unwrap() }
    }

    #[test]
    fn old_connections_close_before_the_old_certificate_expires() {
        let now = Timestamp::now();
        let identity = Identity::new(&credential(now + SignedDuration::from_secs(600))).unwrap();
        let (before, _waker) = identity.track();
        identity.set(&credential(now + SignedDuration::from_secs(3600))).unwrap();
        let (after, _waker2) = identity.track();
        assert_ne!(before, after, "new connections are of the new generation");
        assert!(!identity.is_retired(before), "an open watch is not cut at the rotation");
        // The old certificate has 10 minutes left: its connections close a minute before it expires.
        let next = identity.retire_due(now + SignedDuration::from_secs(60)).unwrap();
        assert!(!identity.is_retired(before));
        assert!(
            next.duration_since(now + SignedDuration::from_secs(540)).abs() < SignedDuration::from_secs(2),
            "{next}"
        );
        assert_eq!(identity.retire_due(now + SignedDuration::from_secs(541)), None);
        assert!(identity.is_retired(before));
        assert!(!identity.is_retired(after));
        // A certificate already expired: its connections go at once.
        let expired = Identity::new(&credential(now - SignedDuration::from_secs(1))).unwrap();
        let (old, _w) = expired.track();
        expired.set(&credential(now + SignedDuration::from_secs(3600))).unwrap();
        expired.retire_due(Timestamp::now());
        assert!(expired.is_retired(old));
    }
}
