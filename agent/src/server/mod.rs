//! The kubelet API (`:10250`, TLS): `/healthz`, `/pods`, `/containerLogs/{ns}/{pod}/{container}` and the
//! streaming endpoints, behind upstream's authentication and authorization, so that `kubectl logs`, `exec`,
//! `attach` and `port-forward` work through the API server. The same routes are served to root on a local Unix
//! socket (see [`serve_local`]), for `nodelet exec` on a standalone node.

pub mod auth;
pub mod container_logs;
mod stats;
pub mod streaming;
pub mod tls;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

use crate::status::view::PodView;
use auth::{Attributes, Auth, Denied};

type Body = BoxBody<Bytes, Infallible>;

/// What requests are served from.
pub struct KubeletApi {
    pub pods: PodView,
    pub pod_logs_dir: PathBuf,
    pub streaming: streaming::Streaming,
    pub stats: crate::stats::StatsProvider,
    pub node: NodeDocuments,
    /// OOM kill records (`/debug/oom`).
    pub oom: crate::oom::OomLog,
}

/// Fixed documents about the node: `/configz` and `/spec`.
#[derive(Clone, Default)]
pub struct NodeDocuments {
    /// The KubeletConfiguration in effect.
    pub configz: Arc<serde_json::Value>,
    /// The machine (cAdvisor's `MachineInfo` shape).
    pub spec: Arc<serde_json::Value>,
}

/// Connections served at once; more are closed at accept (each costs a task and TLS buffers).
const MAX_CONNECTIONS: usize = 1024;
/// How long a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a client may take to send a request's head (HTTP/1).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// When a request's connection was accepted (the API server opens one per streaming request): the streaming
/// benchmark's measure of the node's share includes the TLS handshake and the authorization.
#[derive(Debug, Clone, Copy)]
pub struct Accepted(pub std::time::Instant);

/// Serves the API on `listener` until the process ends; a connection's failure affects only that connection.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    auth: Auth,
    api: Arc<KubeletApi>,
) -> Result<()> {
    tracing::info!(address = %listener.local_addr()?, "serving the kubelet API");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let auth = Arc::new(auth);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a kubelet API connection failed");
                continue;
            }
        };
        let accepted = std::time::Instant::now();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "kubelet API connection refused: {MAX_CONNECTIONS} connections open");
            continue;
        };
        // Streaming replies are small frames written one after another (a stream's reply, its data, the exit
        // status): with Nagle's algorithm each waits for the peer's delayed ACK (40 ms). Go's servers and clients
        // set TCP_NODELAY on every connection; so does this one.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "setting TCP_NODELAY");
        }
        let (acceptor, api, auth) = (acceptor.clone(), api.clone(), auth.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
            let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(Accepted(accepted));
                let (api, auth, cert) = (api.clone(), auth.clone(), cert.clone());
                async move { Ok::<_, Infallible>(api.handle(req, &auth, cert.as_ref()).await) }
            });
            if let Err(e) = serve_connection(stream, service).await {
                tracing::debug!(%peer, error = %e, "kubelet API connection ended");
            }
        });
    }
}

/// Serves one connection (HTTP/1 with upgrades, or HTTP/2).
async fn serve_connection<S, H>(stream: S, service: H) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: hyper::service::Service<Request<hyper::body::Incoming>, Response = Response<Body>, Error = Infallible>
        + Send
        + 'static,
    H::Future: Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // A client that never finishes its request head does not hold a connection forever.
    builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
        .await
        .map_err(|e| anyhow::anyhow!(e))
}

/// The `method` and `path` labels of a request, as upstream buckets them: known first path segments, else
/// `other` (a client's made-up paths or methods must not grow the series without bound).
fn metric_labels(method: &Method, path: &str) -> (&'static str, &'static str) {
    const BUCKETS: &[&str] = &[
        "attach",
        "configz",
        "containerLogs",
        "debug",
        "exec",
        "healthz",
        "logs",
        "metrics",
        "pods",
        "portForward",
        "run",
        "runningpods",
        "spec",
        "stats",
    ];
    const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let bucket = BUCKETS.iter().find(|b| **b == first).copied().unwrap_or("other");
    (METHODS.iter().find(|m| **m == method.as_str()).copied().unwrap_or("other"), bucket)
}

/// The local socket's name under the root dir; its directory is root's alone (mode 0700).
pub fn local_socket(root_dir: &std::path::Path) -> PathBuf {
    root_dir.join("api").join("kubelet.sock")
}

/// Serves the kubelet API's routes on a Unix socket that only root can reach (the directory's mode): no TLS, no
/// authentication beyond the socket's permissions. `nodelet exec` uses it, standalone or not.
/// The plain-HTTP health check (`healthzBindAddress:healthzPort`, loopback by default) that kubeadm and
/// systemd-style supervisors poll: `/healthz` and its checks, nothing else. Binding is retried every 5 s while
/// the port is taken, as upstream does.
pub async fn serve_healthz(address: std::net::SocketAddr, api: Arc<KubeletApi>) {
    let listener = loop {
        match tokio::net::TcpListener::bind(address).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(%address, error = %e, "failed to start the healthz server (retried in 5 s)");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        }
    };
    tracing::info!(%address, "serving /healthz");
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let api = api.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let api = api.clone();
                async move {
                    let path: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
                    Ok::<_, Infallible>(match (req.method(), path.as_slice()) {
                        (&Method::GET, ["healthz"]) => api.healthz(None),
                        (&Method::GET, ["healthz", check]) => api.healthz(Some(check)),
                        _ => text(StatusCode::NOT_FOUND, "404 page not found".into()),
                    })
                }
            });
            let _ = serve_connection(stream, service).await;
        });
    }
}

pub async fn serve_local(listener: tokio::net::UnixListener, api: Arc<KubeletApi>) -> Result<()> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a local API connection failed");
                continue;
            }
        };
        let api = api.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.route(req).await) }
            });
            if let Err(e) = serve_connection(stream, service).await {
                tracing::debug!(error = %e, "local API connection ended");
            }
        });
    }
}

impl KubeletApi {
    async fn handle(
        &self,
        req: Request<hyper::body::Incoming>,
        auth: &Auth,
        cert: Option<&CertificateDer<'static>>,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        let bearer = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let allowed = match auth.authenticate(cert, bearer).await {
            Ok(user) => auth.authorize(&user, &Attributes::of(req.method(), &path)).await.map(|_| user),
            Err(e) => Err(e),
        };
        let user = match allowed {
            Ok(user) => user,
            Err(e) => {
                let code = match e {
                    Denied::Unauthenticated => StatusCode::UNAUTHORIZED,
                    Denied::Forbidden { .. } => StatusCode::FORBIDDEN,
                    Denied::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
                };
                tracing::debug!(%path, error = %e, "kubelet API request refused");
                return text(code, e.to_string());
            }
        };
        tracing::debug!(%path, user = %user.name, "kubelet API request");
        self.route(req).await
    }

    /// Serves an authorized request, counted in `kubelet_http_requests_total`.
    async fn route(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let started = std::time::Instant::now();
        let (method, bucket) = metric_labels(req.method(), req.uri().path());
        let long_running = matches!(bucket, "exec" | "attach" | "portForward" | "containerLogs");
        let response = self.dispatch(req).await;
        crate::metrics::kubelet::METRICS.http_request(method, bucket, long_running, started.elapsed());
        response
    }

    async fn dispatch(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let get_or_post = matches!(*req.method(), Method::GET | Method::POST);
        match (req.method(), segments.as_slice()) {
            (&Method::GET, ["healthz"]) => self.healthz(None),
            (&Method::GET, ["healthz", check]) => self.healthz(Some(check)),
            (&Method::GET, ["stats", "summary"]) => self.summary(req.uri().query()),
            (&Method::GET, ["metrics"]) => self.metrics(""),
            (&Method::GET, ["metrics", which @ ("resource" | "cadvisor")]) => self.metrics(which),
            (&Method::GET, ["spec"] | ["spec", ""]) => self.spec(),
            (&Method::GET, ["configz"]) => self.configz(),
            (&Method::GET, ["runningpods", ""] | ["runningpods"]) => self.running_pods(),
            (&Method::GET, ["debug", "oom"]) => self.oom_kills(req.uri().query()),
            (&Method::GET, ["pods"] | ["pods", ""]) => self.pods(),
            (&Method::GET, ["containerLogs", namespace, pod, container]) => {
                self.container_logs(namespace, pod, container, req.uri().query()).await
            }
            (_, [kind @ ("exec" | "attach"), ns, pod, rest @ ..]) if get_or_post && matches!(rest.len(), 1 | 2) => {
                let pod = self.pods.find(ns, pod).await;
                let kind = if *kind == "exec" { streaming::Command::Exec } else { streaming::Command::Attach };
                let (uid, container) = match rest {
                    [uid, container] => (Some(uid.to_string()), container.to_string()),
                    _ => (None, rest.first().map(|c| c.to_string()).unwrap_or_default()),
                };
                self.streaming.remotecommand(kind, req, pod, uid.as_deref(), &container)
            }
            (&Method::POST, ["run", ns, pod, rest @ ..]) if matches!(rest.len(), 1 | 2) => {
                let pod = self.pods.find(ns, pod).await;
                let (uid, container) = match rest {
                    [uid, container] => (Some(uid.to_string()), container.to_string()),
                    _ => (None, rest.first().map(|c| c.to_string()).unwrap_or_default()),
                };
                self.streaming.run(pod, uid.as_deref(), &container, req.uri().query()).await
            }
            (_, ["portForward", ns, pod]) if get_or_post => {
                let pod = self.pods.find(ns, pod).await;
                self.streaming.port_forward(req, pod, None)
            }
            (_, ["portForward", ns, pod, uid]) if get_or_post => {
                let (pod, uid) = (self.pods.find(ns, pod).await, uid.to_string());
                self.streaming.port_forward(req, pod, Some(&uid))
            }
            _ => text(StatusCode::NOT_FOUND, "404 page not found".into()),
        }
    }

    fn pods(&self) -> Response<Body> {
        let list = serde_json::json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {},
            "items": self.pods.list(),
        });
        json(&list)
    }

    async fn container_logs(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
        query: Option<&str>,
    ) -> Response<Body> {
        let (options, previous) = match container_logs::options(query) {
            Ok(o) => o,
            Err(e) => return refused(e),
        };
        let Some(pod) = self.pods.find(namespace, name).await else {
            return text(StatusCode::NOT_FOUND, format!("pod {name:?} does not exist"));
        };
        let id = match container_logs::container_id(&pod, container, previous) {
            Ok(id) => id,
            Err(e) => return refused(e),
        };
        let Some(path) = container_logs::log_path(&self.pod_logs_dir, &pod, container, &id).filter(|p| p.exists())
        else {
            return text(StatusCode::BAD_REQUEST, format!("no log for container {container:?} in pod {name:?}"));
        };
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let (view, namespace, name, container) =
            (self.pods.clone(), namespace.to_string(), name.to_string(), container.to_string());
        tokio::spawn(async move {
            let running = move || container_logs::is_running(view.get(&namespace, &name), &container, &id);
            if let Err(e) = crate::logs::read::stream(path.clone(), options, running, tx).await {
                tracing::warn!(path = %path.display(), error = %e, "streaming a container log failed");
            }
        });
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
        response
    }
}

fn full(data: Vec<u8>) -> Body {
    Full::new(Bytes::from(data)).boxed()
}

/// A 200 with `value` as JSON.
fn json(value: &impl serde::Serialize) -> Response<Body> {
    with_type(StatusCode::OK, serde_json::to_vec(value).unwrap_or_default(), "application/json")
}

fn with_type(code: StatusCode, body: Vec<u8>, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = code;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}

fn text(code: StatusCode, message: String) -> Response<Body> {
    with_type(code, format!("{message}\n").into_bytes(), "text/plain; charset=utf-8")
}

fn refused(e: container_logs::Refusal) -> Response<Body> {
    text(StatusCode::from_u16(e.code).unwrap_or(StatusCode::BAD_REQUEST), e.message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_metrics_have_bounded_labels() {
        assert_eq!(metric_labels(&Method::GET, "/stats/summary"), ("GET", "stats"));
        assert_eq!(metric_labels(&Method::POST, "/exec/ns/pod/c"), ("POST", "exec"));
        assert_eq!(metric_labels(&Method::GET, "/made-up-1234"), ("GET", "other"));
        let odd = Method::from_bytes(b"BREW").unwrap_or(Method::GET);
        assert_eq!(metric_labels(&odd, "/"), ("other", "other"));
    }
}
