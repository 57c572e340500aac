//! Lifecycle hook actions (`postStart`, `preStop`): `exec` in the container, `httpGet` from inside the pod's
//! network namespace, `sleep` in the agent. Failures come back as messages; the pod worker records upstream's
//! `FailedPostStartHook` / `FailedPreStopHook` events (without the message, as upstream: it may hold secrets).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, LifecycleHandler};

use super::{Target, handlers};
use crate::pods::services::ContainerRuntime;

/// How long an `exec` or `httpGet` hook may take when nothing else bounds it (a `postStart` hook; a `preStop`
/// hook is bounded by the grace period).
pub const UNBOUNDED: Duration = Duration::from_secs(24 * 3600);

/// What a hook that ran leaves to report: upstream's `LifecycleHTTPFallback` warning, when an HTTPS hook got a plain
/// HTTP answer and the same request over HTTP succeeded.
pub type Done = Option<String>;

/// Runs a hook action for container instance `id`, for at most `timeout`.
pub async fn run(
    handler: &LifecycleHandler,
    c: &Container,
    id: &str,
    target: &Target,
    runtime: &Arc<dyn ContainerRuntime>,
    timeout: Duration,
) -> Result<Done, String> {
    if let Some(exec) = &handler.exec {
        let args = exec.command.clone().unwrap_or_default();
        return match runtime.exec_sync(id, &args, timeout).await {
            Ok((Some(0), _)) => Ok(None),
            Ok((Some(code), output)) => Err(format!(
                "Exec lifecycle hook ({args:?}) for Container {:?} failed - error: command exited with {code}, message: {:?}",
                c.name,
                String::from_utf8_lossy(&output)
            )),
            Ok((None, _)) => Err(format!("Exec lifecycle hook ({args:?}) for Container {:?} timed out", c.name)),
            Err(e) => Err(e.to_string()),
        };
    }
    if let Some(http) = &handler.http_get {
        let failed = |e: String| {
            format!(
                "HTTP lifecycle hook ({}) for Container {:?} failed - error: {e}",
                http.path.clone().unwrap_or_default(),
                c.name
            )
        };
        return match tokio::time::timeout(timeout, http_hook(http, c, target, timeout)).await {
            Ok(result) => result.map_err(failed),
            Err(_) => Err(format!("HTTP lifecycle hook for Container {:?} timed out", c.name)),
        };
    }
    if let Some(sleep) = &handler.sleep {
        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0).unsigned_abs()).min(timeout)).await;
        return Ok(None);
    }
    if handler.tcp_socket.is_some() {
        return Err("tcpSocket is not supported as a lifecycle handler".into());
    }
    Err(format!("Cannot run handler: invalid handler for Container {:?}", c.name))
}

/// An httpGet hook as upstream's: any answer is a success, whatever its status (the hook ran); only no answer
/// fails. An HTTPS hook whose server answers in plain HTTP is retried over HTTP without its `Authorization`
/// header, and a success then is reported.
async fn http_hook(http: &HTTPGetAction, c: &Container, target: &Target, timeout: Duration) -> Result<Done, String> {
    const USER_AGENT: &str = "kube-lifecycle/1.37";
    let error = match handlers::get(http, c, target, timeout, USER_AGENT).await {
        Ok(_) => return Ok(None),
        Err(e) => e,
    };
    let https = http.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
    if !https || !error.ends_with(handlers::HTTP_RESPONSE_TO_HTTPS) {
        return Err(error);
    }
    let mut plain = http.clone();
    plain.scheme = Some("HTTP".into());
    if let Some(headers) = plain.http_headers.as_mut() {
        headers.retain(|h| !h.name.eq_ignore_ascii_case("Authorization"));
    }
    handlers::get(&plain, c, target, timeout, USER_AGENT).await.map_err(|_| error)?;
    let url = handlers::url(&plain, target, c)?;
    let host = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest.split('/').next().unwrap_or(rest));
    Ok(Some(format!("request to HTTPS lifecycle hook {host} got HTTP response, retry with HTTP succeeded")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A plain HTTP/1.1 server on 127.0.0.1 that answers every request with `status` and sends each request's
    /// head on the channel. Returns its port.
    async fn server(status: &'static str) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 4\r\n\r\nnope");
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        (port, rx)
    }

    fn handler(json: serde_json::Value) -> LifecycleHandler {
        serde_json::from_value(json).unwrap()
    }

    #[tokio::test]
    async fn an_http_hook_succeeds_on_any_answer_and_falls_back_from_https() {
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c"})).unwrap();
        let runtime: Arc<dyn ContainerRuntime> = Arc::new(crate::pods::services::fake::FakeRuntime::default());
        let target = Target { netns: None, pod_ip: "127.0.0.1".into() };
        let t = Duration::from_secs(5);
        // Upstream's hook fails only without an answer: a 500 is a hook that ran.
        let (port, mut heads) = server("500 Internal Server Error").await;
        let hook = handler(serde_json::json!({"httpGet": {"port": port, "path": "/hook"}}));
        assert_eq!(run(&hook, &c, "id", &target, &runtime, t).await, Ok(None));
        let head = heads.recv().await.unwrap();
        assert!(
            head.starts_with("GET /hook HTTP/1.1\r\n") && head.contains("User-Agent: kube-lifecycle/1.37\r\n"),
            "{head}"
        );
        // HTTPS to a plain HTTP server: retried over HTTP without Authorization, and reported.
        let https = handler(serde_json::json!({"httpGet": {"port": port, "path": "/tls", "scheme": "HTTPS",
            "httpHeaders": [{"name": "Authorization", "value": "Bearer x"}, {"name": "X-Kept", "value": "1"}]}}));
        let done = run(&https, &c, "id", &target, &runtime, t).await.unwrap();
        assert_eq!(
            done.as_deref(),
            Some(&*format!(
                "request to HTTPS lifecycle hook 127.0.0.1:{port} got HTTP response, retry with HTTP succeeded"
            ))
        );
        let _tls_hello = heads.recv().await.unwrap();
        let retried = heads.recv().await.unwrap();
        assert!(retried.starts_with("GET /tls HTTP/1.1\r\n") && retried.contains("X-Kept: 1\r\n"), "{retried}");
        assert!(!retried.to_ascii_lowercase().contains("authorization"), "{retried}");
        // No answer at all fails, with Go's message.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let refused = handler(serde_json::json!({"httpGet": {"port": closed, "path": "/"}}));
        let e = run(&refused, &c, "id", &target, &runtime, t).await.unwrap_err();
        assert!(e.contains("HTTP lifecycle hook (/) for Container \"c\" failed") && e.contains("refused"), "{e}");
    }
}
