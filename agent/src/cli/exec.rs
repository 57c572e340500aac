//! `nodelet exec`: a command in a running container of this node, like `crictl exec` (and `kubectl exec` without
//! an API server). It takes the path `kubectl exec` takes: the agent's own kubelet API, here on its local socket
//! ([`crate::server::serve_local`], root only), over WebSocket `v5.channel.k8s.io`: stdin with its end signalled,
//! stdout and stderr, a terminal with its size (the local terminal in raw mode meanwhile), and the exit code from
//! the error channel's `Status`.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use hyper::body::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::streaming::remotecommand::TerminalSize;
use crate::streaming::websocket::channel::{CLOSE, ERROR, RESIZE, STDERR, STDIN, STDOUT};

/// What to run where.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub namespace: String,
    /// The pod's name, or the start of it up to a `-` (static pods' names end in `-<node name>`).
    pub pod: String,
    /// Default: the pod's `kubectl.kubernetes.io/default-container`, else its first container.
    pub container: Option<String>,
    pub command: Vec<String>,
    /// Pass this process's stdin (`-i`).
    pub stdin: bool,
    /// Run in a terminal (`-t`); only when this process's stdin is one, as kubectl.
    pub tty: bool,
}

const PROTOCOL: &str = "v5.channel.k8s.io";

/// Runs the command; its exit code. The terminal is restored before this returns.
pub async fn exec(socket: &Path, request: &ExecRequest) -> Result<i32> {
    let pods = get(socket, "/pods").await?;
    let (pod, container) = pick(&pods, request)?;
    let tty = request.tty && std::io::stdin().is_terminal();
    if request.tty && !tty {
        eprintln!("Unable to use a TTY - input is not a terminal or the right kind of file");
    }
    let uri = format!(
        "ws://localhost/exec/{}/{pod}/{container}?{}",
        request.namespace,
        query(&request.command, request.stdin, tty)
    );
    let mut ws_request = uri.into_client_request()?;
    ws_request.headers_mut().insert("Sec-WebSocket-Protocol", hyper::header::HeaderValue::from_static(PROTOCOL));
    let stream = super::connect(socket).await?;
    let (ws, _) = match tokio_tungstenite::client_async(ws_request, stream).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            bail!("{}", body.trim_end())
        }
        Err(e) => return Err(e).context("starting the exec"),
    };
    let _raw = if tty { Some(RawMode::enter()?) } else { None };
    let (mut sink, mut incoming) = ws.split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(16);
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    if request.stdin {
        tasks.spawn(send_stdin(tx.clone()));
    }
    if tty {
        tasks.spawn(send_sizes(tx.clone()));
    }
    drop(tx);
    let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
    let mut status = Vec::new();
    while let Some(message) = incoming.next().await {
        let data = match message {
            Ok(Message::Binary(data)) => data,
            Ok(Message::Close(_)) => break,
            Ok(_) => continue,
            Err(e) if !status.is_empty() => {
                tracing::debug!(error = %e, "the exec connection ended");
                break;
            }
            Err(e) => return Err(e).context("the exec connection"),
        };
        let Some((&channel, payload)) = data.split_first() else { continue };
        match channel {
            STDOUT => {
                stdout.write_all(payload).await?;
                stdout.flush().await?;
            }
            STDERR => {
                stderr.write_all(payload).await?;
                stderr.flush().await?;
            }
            ERROR => status.extend_from_slice(payload),
            _ => {}
        }
    }
    tasks.abort_all();
    writer.abort();
    exit_code(&status)
}

/// `/exec`'s query: the command, one `command` per word, and the streams asked for.
fn query(command: &[String], stdin: bool, tty: bool) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for word in command {
        q.append_pair("command", word);
    }
    q.append_pair("output", "1");
    if !tty {
        // A terminal carries both outputs on one stream.
        q.append_pair("error", "1");
    }
    if stdin {
        q.append_pair("input", "1");
    }
    if tty {
        q.append_pair("tty", "1");
    }
    q.finish()
}

/// The pod and container `request` means, from the node's pod list.
fn pick(pods: &serde_json::Value, request: &ExecRequest) -> Result<(String, String)> {
    let items = pods["items"].as_array().map(Vec::as_slice).unwrap_or_default();
    let in_namespace: Vec<&serde_json::Value> =
        items.iter().filter(|p| p["metadata"]["namespace"].as_str() == Some(&request.namespace)).collect();
    let name = |p: &serde_json::Value| p["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let prefix = format!("{}-", request.pod);
    let pod = match in_namespace.iter().find(|p| name(p) == request.pod) {
        Some(p) => *p,
        None => {
            let matching: Vec<&&serde_json::Value> =
                in_namespace.iter().filter(|p| name(p).starts_with(&prefix)).collect();
            match matching.as_slice() {
                [one] => **one,
                [] => bail!("pod {:?} not found in namespace {:?} on this node", request.pod, request.namespace),
                many => {
                    let names: Vec<String> = many.iter().map(|p| name(p)).collect();
                    bail!("{:?} could mean any of {}: name one", request.pod, names.join(", "))
                }
            }
        }
    };
    let container = match &request.container {
        Some(c) => c.clone(),
        None => pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"]
            .as_str()
            .or_else(|| pod["spec"]["containers"][0]["name"].as_str())
            .context("the pod has no containers")?
            .to_string(),
    };
    Ok((name(pod), container))
}

/// The command's exit code from the error channel's `Status` (upstream's `NonZeroExitCode` cause), or why it did
/// not run.
fn exit_code(status: &[u8]) -> Result<i32> {
    if status.is_empty() {
        bail!("the exec ended without a status");
    }
    let status: serde_json::Value = serde_json::from_slice(status).context("the exec's status")?;
    if status["status"] == "Success" {
        return Ok(0);
    }
    if status["reason"] == "NonZeroExitCode" {
        let causes = status["details"]["causes"].as_array().map(Vec::as_slice).unwrap_or_default();
        let code = causes.iter().find(|c| c["reason"] == "ExitCode").and_then(|c| c["message"].as_str());
        if let Some(code) = code.and_then(|c| c.parse().ok()) {
            return Ok(code);
        }
    }
    bail!("{}", status["message"].as_str().unwrap_or("the exec failed"))
}

/// Sends this process's stdin, then the close signal for it (the process reads EOF).
async fn send_stdin(tx: tokio::sync::mpsc::Sender<Message>) {
    let mut input = tokio::io::stdin();
    let mut buf = vec![0; 32 * 1024];
    loop {
        let n = match input.read(&mut buf[1..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf[0] = STDIN;
        if tx.send(Message::Binary(Bytes::copy_from_slice(&buf[..=n]))).await.is_err() {
            return;
        }
    }
    let _ = tx.send(Message::Binary(Bytes::from_static(&[CLOSE, STDIN]))).await;
}

/// Sends the terminal's size now and whenever it changes (SIGWINCH).
async fn send_sizes(tx: tokio::sync::mpsc::Sender<Message>) {
    let Ok(mut changes) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) else {
        return;
    };
    loop {
        if let Ok(size) = rustix::termios::tcgetwinsize(std::io::stdin()) {
            let size = TerminalSize { width: size.ws_col, height: size.ws_row };
            let mut message = vec![RESIZE];
            message.extend(serde_json::to_vec(&size).unwrap_or_default());
            if tx.send(Message::Binary(message.into())).await.is_err() {
                return;
            }
        }
        if changes.recv().await.is_none() {
            return;
        }
    }
}

/// The local terminal in raw mode (keys go to the container's terminal as typed) until dropped.
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("putting the terminal in raw mode")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, &self.0);
    }
}

/// A GET on the local API: the JSON it answers.
async fn get(socket: &Path, path: &str) -> Result<serde_json::Value> {
    let body = super::get(socket, path).await?;
    serde_json::from_slice(&body).with_context(|| format!("{path}: not JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(pod: &str, container: Option<&str>) -> ExecRequest {
        ExecRequest {
            namespace: "default".into(),
            pod: pod.into(),
            container: container.map(str::to_string),
            command: vec!["sh".into()],
            stdin: false,
            tty: false,
        }
    }

    #[test]
    fn picks_the_pod_by_name_or_static_prefix_and_the_default_container() {
        let pods = serde_json::json!({"items": [
            {"metadata": {"name": "hello-node1", "namespace": "default"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}]}},
            {"metadata": {"name": "web-node1", "namespace": "default",
                          "annotations": {"kubectl.kubernetes.io/default-container": "b"}},
             "spec": {"containers": [{"name": "a"}, {"name": "b"}]}},
            {"metadata": {"name": "web-2-node1", "namespace": "default"}, "spec": {"containers": [{"name": "a"}]}},
            {"metadata": {"name": "hello", "namespace": "other"}, "spec": {"containers": [{"name": "x"}]}}
        ]});
        assert_eq!(pick(&pods, &request("hello", None)).unwrap(), ("hello-node1".into(), "a".into()));
        assert_eq!(pick(&pods, &request("hello-node1", Some("b"))).unwrap(), ("hello-node1".into(), "b".into()));
        assert_eq!(pick(&pods, &request("web-node1", None)).unwrap(), ("web-node1".into(), "b".into()));
        let err = pick(&pods, &request("web", None)).unwrap_err().to_string();
        assert!(err.contains("web-node1") && err.contains("web-2-node1"), "{err}");
        let err = pick(&pods, &request("nope", None)).unwrap_err().to_string();
        assert_eq!(err, "pod \"nope\" not found in namespace \"default\" on this node");
    }

    #[test]
    fn exit_codes_come_from_the_status() {
        assert_eq!(exit_code(br#"{"metadata":{},"status":"Success"}"#).unwrap(), 0);
        let failed = br#"{"status":"Failure","reason":"NonZeroExitCode","message":"command terminated with non-zero exit code: 3",
            "details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        assert_eq!(exit_code(failed).unwrap(), 3);
        let err = exit_code(br#"{"status":"Failure","message":"executable not found"}"#).unwrap_err();
        assert_eq!(err.to_string(), "executable not found");
        assert!(exit_code(b"").is_err() && exit_code(b"{broken").is_err());
    }

    #[test]
    fn the_query_names_each_word_and_the_streams() {
        let words = ["sh".to_string(), "-c".into(), "echo a&b".into()];
        assert_eq!(query(&words, true, false), "command=sh&command=-c&command=echo+a%26b&output=1&error=1&input=1");
        assert_eq!(query(&words[..1], false, true), "command=sh&output=1&tty=1");
    }
}
