//! `rest_client_requests_total{code,host,method}`: every request the agent's API client sends, counted by its
//! outcome, as client-go's metric. A tower layer on the kube client's service stack.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::{Request, Response};
use tower::{Layer, Service};

/// Wraps a client's service with the count.
#[derive(Debug, Clone)]
pub struct CountRequests {
    /// The API server's `host:port`, the metric's `host` label.
    pub host: String,
}

impl<S> Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner, host: self.host.clone() }
    }
}

/// The counting service.
#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    host: String,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Counted<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let method = request.method().to_string();
        let host = self.host.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            // client-go's label for a request that got no response.
            let code = result.as_ref().map_or_else(|_| "<error>".to_string(), |r| r.status().as_u16().to_string());
            super::kubelet::METRICS.rest_client_request(&code, &host, &method);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_by_code_host_and_method() {
        let inner = tower::service_fn(|req: Request<()>| async move {
            let code = if req.uri().path() == "/missing" { 404 } else { 200 };
            Ok::<_, std::convert::Infallible>(Response::builder().status(code).body(()).unwrap_or_default())
        });
        let mut counted = CountRequests { host: "test-host:6443".into() }.layer(inner);
        for path in ["/a", "/missing", "/missing"] {
            let req = Request::builder().method("PATCH").uri(path).body(()).unwrap_or_default();
            let _ = counted.call(req).await;
        }
        let text = crate::metrics::encode(&super::super::kubelet::METRICS.gather(&[]));
        let line = |code: &str| {
            format!("rest_client_requests_total{{code=\"{code}\",host=\"test-host:6443\",method=\"PATCH\"}}")
        };
        assert!(text.contains(&format!("{} 2", line("404"))), "{text}");
        assert!(text.contains(&format!("{} 1", line("200"))), "{text}");
    }
}
