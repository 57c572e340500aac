//! `/exec`, `/attach`, `/portForward` and `/run` on the kubelet API: which running container a request means,
//! upstream's refusals (status codes and messages), and the protocol upgrade that hands the connection to
//! `crate::streaming`.

use std::sync::Arc;

use hyper::header::{CONNECTION, HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;

use super::{Body, text};
use crate::pods::attach::Attachments;
use crate::pods::services::{BoxFuture, ContainerRuntime};
use crate::streaming::remotecommand::{self, Options, Outcome, SPDY_PROTOCOLS, Session};
use crate::streaming::{attach, exec, portforward, spdy, spdy_session, websocket};

/// The header carrying the protocols a client speaks and the one chosen.
pub const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";

/// What the streaming handlers need.
#[derive(Clone)]
pub struct Streaming {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub spdy: spdy::Config,
    /// `ExtendWebSocketsToKubelet`: v5 WebSocket requests are served here (the node declares it, so the API
    /// server passes them through instead of translating them to SPDY).
    pub websockets: bool,
    /// Running containers' output and stdin, for attach.
    pub attachments: Attachments,
}

/// Upgrades a WebSocket request to `protocol` and hands the socket to `serve`.
fn websocket_upgrade<F, Fut>(
    mut req: Request<hyper::body::Incoming>,
    protocol: Option<&'static str>,
    serve: F,
) -> Response<Body>
where
    F: FnOnce(WebSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let accepted = match websocket::accept(&req, protocol) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("unable to upgrade: {e}")),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let accepted_at = req.extensions().get::<super::Accepted>().copied();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let started = std::time::Instant::now();
                serve(websocket::server(hyper_util::rt::TokioIo::new(upgraded)).await).await;
                session_ended("WebSocket", started, accepted_at);
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    accepted.map(|()| super::full(Vec::new()))
}

/// Logs how long an upgraded session took on this node: from the upgrade to the connection's end, and from the
/// connection's accept (TLS handshake, authorization, upgrade included). The streaming benchmark reads the latter
/// to split a round trip into the node's share and the client's and API server's.
fn session_ended(transport: &'static str, started: std::time::Instant, accepted: Option<super::Accepted>) {
    let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let took_us = micros(started.elapsed());
    let since_accept_us = accepted.map(|a| micros(a.0.elapsed()));
    tracing::debug!(transport, took_us, since_accept_us, "streaming session ended");
}

/// An upgraded WebSocket connection.
pub type WebSocket = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// The ID of the running instance of `container` in `pod` (app, init or ephemeral), as the runtime names it.
pub fn running_container(pod: &Pod, uid: Option<&str>, container: &str) -> Result<String, String> {
    let not_found = || format!("container not found ({container:?})");
    if uid.is_some_and(|u| pod.metadata.uid.as_deref() != Some(u)) {
        return Err(not_found());
    }
    let status = pod.status.as_ref().ok_or_else(not_found)?;
    let statuses = [&status.container_statuses, &status.init_container_statuses, &status.ephemeral_container_statuses];
    statuses
        .into_iter()
        .flatten()
        .flatten()
        .find(|s| s.name == container && s.state.as_ref().is_some_and(|st| st.running.is_some()))
        .and_then(|s| s.container_id.as_deref())
        .and_then(|id| id.split_once("://").map(|(_, id)| id.to_string()))
        .ok_or_else(not_found)
}

/// Checks an SPDY upgrade request and negotiates its subprotocol; the refusal as upstream words it otherwise.
pub fn spdy_handshake<B>(req: &Request<B>, server: &[&'static str]) -> Result<&'static str, Box<Response<Body>>> {
    let headers = req.headers();
    let values: Vec<&str> = headers.get_all(PROTOCOL_HEADER).iter().filter_map(|v| v.to_str().ok()).collect();
    if values.is_empty() {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            format!(
                "unable to upgrade: header {PROTOCOL_HEADER} does not exist in request with {} headers",
                headers.len()
            ),
        )));
    }
    let Some(protocol) = remotecommand::negotiate(values.iter().copied(), server) else {
        let mut refused = text(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {values:?}, server accepts {server:?}"
            ),
        );
        for p in server {
            refused.headers_mut().append("X-Accepted-Stream-Protocol-Versions", HeaderValue::from_static(p));
        }
        return Err(Box::new(refused));
    };
    let has = |name, want: &str| {
        headers.get_all(name).iter().any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains(want)))
    };
    if !has(CONNECTION, "upgrade") || !has(UPGRADE, "spdy/3.1") {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: missing upgrade headers in request".into(),
        )));
    }
    Ok(protocol)
}

/// The 101 answer to an SPDY upgrade.
pub fn switching_protocols(protocol: &'static str) -> Response<Body> {
    let mut response = Response::new(super::full(Vec::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(PROTOCOL_HEADER, HeaderValue::from_static(protocol));
    response
}

/// Which remotecommand a request is.
pub enum Command {
    Exec,
    Attach,
}

impl Streaming {
    /// `/exec/...?command=...` and `/attach/...`: after upstream's checks, upgrades (WebSocket or SPDY) and runs
    /// the command in, or attaches to, the running container.
    pub fn remotecommand(
        &self,
        kind: Command,
        req: Request<hyper::body::Incoming>,
        pod: Option<Pod>,
        uid: Option<&str>,
        container: &str,
    ) -> Response<Body> {
        let query = req.uri().query().map(str::to_string);
        let options = match Options::from_query(query.as_deref()) {
            Ok(o) => o,
            Err(e) => return text(StatusCode::BAD_REQUEST, e),
        };
        let Some(pod) = pod else { return text(StatusCode::NOT_FOUND, "pod does not exist".into()) };
        let id = match running_container(&pod, uid, container) {
            Ok(id) => id,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e),
        };
        let (runtime, tty) = (self.runtime.clone(), options.tty);
        let run: Box<dyn FnOnce(Session) -> BoxFuture<'static, Outcome> + Send> = match kind {
            Command::Exec => {
                let command = remotecommand::command(query.as_deref());
                tracing::debug!(container, ?command, "exec");
                Box::new(move |session| {
                    Box::pin(async move { exec::run(runtime.as_ref(), &id, command, tty, session).await })
                })
            }
            Command::Attach => {
                let Some(attachable) = self.attachments.get(&id) else {
                    return text(StatusCode::INTERNAL_SERVER_ERROR, format!("container not found ({container:?})"));
                };
                tracing::debug!(container, "attach");
                Box::new(move |session| Box::pin(attach::run(attachable, tty, session)))
            }
        };
        if websocket::is_websocket(&req) {
            let offered = websocket::client_protocols(&req);
            let speaks = |p: &&str| self.websockets || !p.starts_with("v5.");
            let protocol =
                websocket::CHANNEL_PROTOCOLS.into_iter().filter(speaks).find(|p| offered.iter().any(|o| o == p));
            if protocol.is_none() && !offered.is_empty() {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "requested protocol(s) are not supported: {offered:?}; supports {:?}",
                        websocket::CHANNEL_PROTOCOLS
                    ),
                );
            }
            return websocket_upgrade(req, protocol, move |ws| async move {
                websocket::remotecommand(ws, protocol.unwrap_or("channel.k8s.io"), options, run).await;
            });
        }
        let protocol = match spdy_handshake(&req, &SPDY_PROTOCOLS) {
            Ok(p) => p,
            Err(refused) => return *refused,
        };
        let config = self.spdy;
        spdy_upgrade(req, protocol, config, move |conn| async move {
            let (session, finish) =
                match spdy_session::accept(conn, protocol, options, spdy_session::STREAM_CREATION_TIMEOUT).await {
                    Ok(s) => s,
                    Err(e) => return tracing::info!(error = %e, "remotecommand: no session"),
                };
            let outcome = run(session).await;
            finish.finish(&outcome).await;
        })
    }
}

/// How long a `/run` command may take (upstream has no limit; a request must not hang forever).
const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl Streaming {
    /// `POST /run/{ns}/{pod}[/{uid}]/{container}?cmd=...`: runs the command (split on spaces, as upstream) and
    /// answers its output (stdout, then stderr); a non-zero exit is a 500 with upstream's message.
    pub async fn run(
        &self,
        pod: Option<Pod>,
        uid: Option<&str>,
        container: &str,
        query: Option<&str>,
    ) -> Response<Body> {
        let Some(pod) = pod else { return text(StatusCode::NOT_FOUND, "pod does not exist".into()) };
        let id = match running_container(&pod, uid, container) {
            Ok(id) => id,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e),
        };
        let cmd = form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .find(|(k, _)| k == "cmd")
            .map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default();
        match self.runtime.exec_sync(&id, &cmd, RUN_TIMEOUT).await {
            Ok((Some(0), out)) => {
                let mut response = Response::new(super::full(out));
                response
                    .headers_mut()
                    .insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                response
            }
            Ok((Some(code), out)) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("command '{}' exited with {code}: {}", cmd.join(" "), String::from_utf8_lossy(&out)),
            ),
            Ok((None, _)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("command '{}' timed out", cmd.join(" "))),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// Answers an SPDY upgrade to `protocol` and hands the connection to `serve`.
fn spdy_upgrade<F, Fut>(
    mut req: Request<hyper::body::Incoming>,
    protocol: &'static str,
    config: spdy::Config,
    serve: F,
) -> Response<Body>
where
    F: FnOnce(spdy::Connection) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let upgrade = hyper::upgrade::on(&mut req);
    let accepted_at = req.extensions().get::<super::Accepted>().copied();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let started = std::time::Instant::now();
                serve(spdy::Connection::serve(hyper_util::rt::TokioIo::new(upgraded), config)).await;
                session_ended("SPDY", started, accepted_at);
            }
            Err(e) => tracing::debug!(error = %e, "SPDY upgrade failed"),
        }
    });
    switching_protocols(protocol)
}

impl Streaming {
    /// `/portForward/{ns}/{pod}[/{uid}]`: upgrades and forwards the client's connections into the pod.
    pub fn port_forward(
        &self,
        req: Request<hyper::body::Incoming>,
        pod: Option<Pod>,
        uid: Option<&str>,
    ) -> Response<Body> {
        let Some(pod) = pod else { return text(StatusCode::NOT_FOUND, "pod does not exist".into()) };
        let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
        if uid.is_some_and(|u| u != pod_uid) {
            return text(StatusCode::NOT_FOUND, "pod not found".into());
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let Some(sandbox) = self.runtime.list_sandboxes().into_iter().find(|s| s.id == pod_uid) else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("pod not found ({name:?})"));
        };
        let target = portforward::Target { netns: sandbox.net, pod: name, uid: pod_uid };
        if websocket::is_websocket(&req) {
            if !websocket::client_protocols(&req).iter().any(|p| p == websocket::TUNNEL_PROTOCOL) {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("port-forward over WebSocket needs the {} subprotocol", websocket::TUNNEL_PROTOCOL),
                );
            }
            let config = self.spdy;
            return websocket_upgrade(req, Some(websocket::TUNNEL_PROTOCOL), move |ws| async move {
                let conn = spdy::Connection::serve(websocket::tunnel(ws), config);
                portforward::serve(conn, target, spdy_session::STREAM_CREATION_TIMEOUT).await;
            });
        }
        let protocol = match spdy_handshake(&req, &[portforward::PROTOCOL]) {
            Ok(p) => p,
            Err(refused) => return *refused,
        };
        spdy_upgrade(req, protocol, self.spdy, move |conn| async move {
            portforward::serve(conn, target, spdy_session::STREAM_CREATION_TIMEOUT).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn only_a_running_instance_is_found() {
        let p = pod(
            "metadata: {name: p, uid: u1}
status:
  containerStatuses:
  - {name: app, image: i, imageID: '', ready: true, restartCount: 0, containerID: 'nodelet://u1-app-0', state: {running: {}}}
  - {name: done, image: i, imageID: '', ready: false, restartCount: 0, containerID: 'nodelet://u1-done-0', state: {terminated: {exitCode: 0}}}
  ephemeralContainerStatuses:
  - {name: debug, image: i, imageID: '', ready: false, restartCount: 0, containerID: 'nodelet://u1-debug-0', state: {running: {}}}
",
        );
        assert_eq!(running_container(&p, None, "app"), Ok("u1-app-0".into()));
        assert_eq!(running_container(&p, Some("u1"), "debug"), Ok("u1-debug-0".into()));
        assert_eq!(running_container(&p, None, "done"), Err("container not found (\"done\")".into()));
        assert_eq!(running_container(&p, Some("other"), "app"), Err("container not found (\"app\")".into()));
        assert!(running_container(&p, None, "nope").is_err());
    }

    #[test]
    fn spdy_handshakes_are_checked_as_upstream() {
        let req = |headers: &[(&str, &str)]| {
            let mut b = Request::builder();
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        let upgrade = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")];
        let ok = req(&[
            upgrade[0],
            upgrade[1],
            (PROTOCOL_HEADER, "v4.channel.k8s.io"),
            (PROTOCOL_HEADER, "v3.channel.k8s.io"),
        ]);
        assert_eq!(spdy_handshake(&ok, &SPDY_PROTOCOLS).unwrap(), "v4.channel.k8s.io");
        let missing = spdy_handshake(&req(&upgrade), &SPDY_PROTOCOLS).unwrap_err();
        assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
        let unknown =
            spdy_handshake(&req(&[upgrade[0], upgrade[1], (PROTOCOL_HEADER, "v9")]), &SPDY_PROTOCOLS).unwrap_err();
        assert_eq!(unknown.status(), StatusCode::FORBIDDEN);
        assert_eq!(unknown.headers().get_all("X-Accepted-Stream-Protocol-Versions").iter().count(), 4);
        let no_upgrade = spdy_handshake(&req(&[(PROTOCOL_HEADER, "v4.channel.k8s.io")]), &SPDY_PROTOCOLS).unwrap_err();
        assert_eq!(no_upgrade.status(), StatusCode::BAD_REQUEST);
    }
}
