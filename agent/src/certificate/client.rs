//! An API client whose TLS client certificate can change while it runs (certificate rotation), as upstream's
//! kubelet does it: new connections present the current certificate, and every connection opened with an
//! older one is closed when the certificate changes (upstream's `connrotation` dialer), so nothing keeps
//! talking to the API server with a certificate about to expire. Watches see a broken connection and resume
//! from their last resource version on a new one.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};

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
    current: RwLock<Arc<CertifiedKey>>,
    generation: AtomicU64,
    /// Each open connection's wake-up, so that a rotation closes idle ones at once.
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
            current: RwLock::new(certified(credential)?),
            generation: AtomicU64::new(0),
            connections: Mutex::new(Vec::new()),
        }))
    }

    /// Presents `credential` from now on and closes every connection opened before.
    pub fn set(&self, credential: &Credential) -> Result<()> {
        let key = certified(credential)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        self.generation.fetch_add(1, Ordering::SeqCst);
        let connections = std::mem::take(&mut *self.connections.lock().unwrap_or_else(|e| e.into_inner()));
        for waker in connections.iter().filter_map(Weak::upgrade) {
            waker.wake();
        }
        Ok(())
    }

    fn track(&self) -> (u64, Arc<AtomicWaker>) {
        let waker = Arc::new(AtomicWaker::new());
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.retain(|w| w.strong_count() > 0);
        connections.push(Arc::downgrade(&waker));
        (self.generation.load(Ordering::SeqCst), waker)
    }
}

impl ResolvesClientCert for Identity {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
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
        (self.identity.generation.load(Ordering::SeqCst) != self.born)
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
