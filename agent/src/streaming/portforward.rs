//! Port-forwarding over SPDY (`portforward.k8s.io`): for every local connection the client opens two streams,
//! `error` and `data`, sharing a `requestID` header and naming the pod's `port`. Once both arrived, nodelet
//! connects to `localhost:<port>` inside the pod's network namespace and copies bytes both ways; a failure is
//! written to the error stream (upstream's wording) and both streams are reset. A pair still incomplete after the
//! stream-creation timeout is dropped with "timed out waiting for streams".

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::spdy::{Connection, Stream};

/// The SPDY subprotocol.
pub const PROTOCOL: &str = "portforward.k8s.io";

/// How long connecting to the pod's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the forwarded connections go.
#[derive(Debug, Clone)]
pub struct Target {
    /// The pod's network namespace (`None`: the host's, for `hostNetwork` pods).
    pub netns: Option<PathBuf>,
    pub pod: String,
    pub uid: String,
}

/// What a stream's headers say, or why it is refused (upstream resets such a stream).
fn check(stream: &Stream) -> Result<(u16, bool), String> {
    let port = stream.headers.get("port").filter(|p| !p.is_empty()).ok_or("\"port\" header is required")?;
    let port: u16 = port.parse().map_err(|e| format!("unable to parse {port:?} as a port: {e}"))?;
    if port < 1 {
        return Err(format!("port \"{port}\" must be > 0"));
    }
    match stream.headers.get("streamType") {
        Some("error") => Ok((port, true)),
        Some("data") => Ok((port, false)),
        Some(other) => Err(format!("invalid stream type {other:?}")),
        None => Err("\"streamType\" header is required".into()),
    }
}

/// A request's two streams as they arrive.
#[derive(Default)]
struct Pair {
    data: Option<(u16, Stream)>,
    error: Option<Stream>,
    since: Option<tokio::time::Instant>,
}

/// Serves `conn` until the client leaves.
pub async fn serve(mut conn: Connection, target: Target, creation_timeout: Duration) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let stream = tokio::select! {
            s = conn.accept() => match s { Some(s) => s, None => break },
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                let stale: Vec<String> = pairs
                    .iter()
                    .filter(|(_, p)| p.since.is_some_and(|t| now.duration_since(t) >= creation_timeout))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in stale {
                    if let Some(Pair { error: Some(error), .. }) = pairs.remove(&id) {
                        let _ = error.writer().write(format!("(request={id}) timed out waiting for streams").as_bytes()).await;
                        error.writer().close().await;
                    }
                }
                continue;
            }
        };
        let (port, is_error) = match check(&stream) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "port-forward: stream refused");
                stream.writer().reset().await;
                continue;
            }
        };
        let id = stream.headers.get("requestID").filter(|r| !r.is_empty()).map_or_else(
            // Old clients send no request ID: the error stream is opened first, its data stream 2 IDs later.
            || if is_error { stream.id.to_string() } else { stream.id.saturating_sub(2).to_string() },
            str::to_string,
        );
        let pair = pairs.entry(id.clone()).or_default();
        pair.since.get_or_insert_with(tokio::time::Instant::now);
        let duplicate = if is_error { pair.error.is_some() } else { pair.data.is_some() };
        if duplicate {
            let kind = if is_error { "error" } else { "data" };
            if let Some(error) = &pair.error {
                let message = format!("error processing stream for request {id}: {kind} stream already assigned");
                let _ = error.writer().write(message.as_bytes()).await;
            }
            stream.writer().reset().await;
            continue;
        }
        if is_error {
            pair.error = Some(stream);
        } else {
            pair.data = Some((port, stream));
        }
        if pair.error.is_some()
            && pair.data.is_some()
            && let Some(Pair { data: Some((port, data)), error: Some(error), .. }) = pairs.remove(&id)
        {
            tokio::spawn(forward(data, error, port, target.clone()));
        }
    }
    conn.close().await;
}

/// Connects to `localhost:port` in the pod (IPv4, then IPv6) and copies until both directions ended.
async fn forward(data: Stream, error: Stream, port: u16, target: Target) {
    let mut failures = Vec::new();
    let mut connected = None;
    for ip in [std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), std::net::IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        match crate::network::netns::connect(target.netns.clone(), SocketAddr::new(ip, port), CONNECT_TIMEOUT).await {
            Ok(s) => {
                connected = Some(s);
                break;
            }
            Err(e) => failures.push(format!("dial tcp {}: {e}", SocketAddr::new(ip, port))),
        }
    }
    let Some(tcp) = connected else {
        let message = format!(
            "error forwarding port {port} to pod {}, uid {}: failed to connect to localhost:{port} inside the pod's network namespace: {}",
            target.pod,
            target.uid,
            failures.join("; ")
        );
        tracing::debug!(%message, "port-forward");
        let _ = error.writer().write(message.as_bytes()).await;
        data.writer().reset().await;
        error.writer().reset().await;
        return;
    };
    let (mut from_pod, mut to_pod) = tcp.into_split();
    let (mut reader, writer) = data.split();
    let inbound = async move {
        while let Some(bytes) = reader.read().await {
            if to_pod.write_all(&bytes).await.is_err() {
                break;
            }
        }
        // The client closed its side: so does the connection to the pod (half-close).
        let _ = to_pod.shutdown().await;
    };
    let outbound = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from_pod.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if writer.write(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        writer.close().await;
    };
    tokio::join!(inbound, outbound);
    error.writer().close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streaming::spdy::Config;
    use crate::streaming::spdy::conn::tests::Client;
    use crate::streaming::spdy::frame::{FLAG_FIN, Frame};

    /// Two forwarded connections to a local echo server (host network namespace), one to a closed port.
    #[tokio::test]
    async fn forwards_both_ways_and_reports_a_refused_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.unwrap();
                    s.write_all(&buf).await.unwrap();
                });
            }
        });
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port().to_string()
        };
        let (a, b) = tokio::io::duplex(1 << 20);
        let target = Target { netns: None, pod: "p".into(), uid: "u".into() };
        tokio::spawn(serve(Connection::serve(a, Config::default()), target, Duration::from_secs(30)));
        let mut client = Client::new(b);
        client.open(1, &[("streamtype", "error"), ("port", &port), ("requestid", "0")], true).await;
        client.open(3, &[("streamtype", "data"), ("port", &port), ("requestid", "0")], false).await;
        client.data(3, b"ping", true).await;
        client.open(5, &[("streamtype", "error"), ("port", &closed), ("requestid", "1")], true).await;
        client.open(7, &[("streamtype", "data"), ("port", &closed), ("requestid", "1")], false).await;
        client.open(9, &[("streamtype", "data"), ("port", "0"), ("requestid", "2")], false).await;
        let (mut echoed, mut error_text) = (Vec::new(), String::new());
        let (mut echo_done, mut refused_reset, mut bad_port_reset) = (false, false, false);
        while !(echo_done && refused_reset && bad_port_reset) {
            match client.next().await.unwrap() {
                Frame::Data { stream: 3, flags, data } => {
                    echoed.extend_from_slice(&data);
                    echo_done |= flags & FLAG_FIN != 0;
                }
                Frame::Data { stream: 5, data, .. } => error_text.push_str(std::str::from_utf8(&data).unwrap()),
                Frame::RstStream { stream: 7, .. } => refused_reset = true,
                Frame::RstStream { stream: 9, .. } => bad_port_reset = true,
                _ => {}
            }
        }
        assert_eq!(echoed, b"ping");
        assert!(error_text.starts_with(&format!("error forwarding port {closed} to pod p, uid u:")), "{error_text}");
        assert!(error_text.contains("refused"), "{error_text}");
    }
}
