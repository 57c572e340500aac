//! remotecommand and port-forward over WebSocket, as a kubelet that declares `ExtendWebSocketsToKubelet` gets them
//! straight from the API server (which otherwise translates them to SPDY itself):
//!
//! - exec/attach: the channel protocols. Every message starts with its channel (0 stdin, 1 stdout, 2 stderr,
//!   3 error, 4 resize); `base64.` variants send text messages with the channel as an ASCII digit and the data
//!   base64-encoded. `v5.channel.k8s.io` adds the close signal: `[255, channel]` half-closes a channel (stdin EOF).
//!   The server first sends an empty message on its first output channel (upstream's readiness signal), and at
//!   the end the outcome on the error channel (v4+: the `Status` JSON; older: the message on failure only).
//! - port-forward: `SPDY/3.1+portforward.k8s.io`, SPDY frames carried in binary messages: the messages are
//!   turned back into a byte stream for the SPDY connection (`spdy::Connection` is generic over its I/O).

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::header::{
    CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key};

use super::remotecommand::{Options, Outcome, ResizeDecoder, Session, error_stream_bytes};

/// The exec/attach subprotocols nodelet speaks, preferred first.
pub const CHANNEL_PROTOCOLS: [&str; 5] =
    ["v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io", "channel.k8s.io", "base64.channel.k8s.io"];
/// Port-forward tunnelled as SPDY over WebSocket.
pub const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// The channels of the channel protocols (the first byte of each message).
pub mod channel {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const ERROR: u8 = 3;
    pub const RESIZE: u8 = 4;
    /// `v5.channel.k8s.io`: `[CLOSE, channel]` half-closes the channel.
    pub const CLOSE: u8 = 255;
}
use channel::{CLOSE, ERROR, RESIZE, STDERR, STDIN, STDOUT};

/// A normal closure: client-go treats only this one as the end of every stream (no status is an error).
fn normal_close() -> Message {
    Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))
}

/// The largest message accepted from a client.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Whether a request asks for a WebSocket upgrade.
pub fn is_websocket<B>(req: &hyper::Request<B>) -> bool {
    let has = |name, want: &str| {
        req.headers().get_all(name).iter().any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains(want)))
    };
    has(CONNECTION, "upgrade") && has(UPGRADE, "websocket")
}

/// The client's subprotocols, in order.
pub fn client_protocols<B>(req: &hyper::Request<B>) -> Vec<String> {
    req.headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The 101 answer accepting the upgrade with `protocol` (none when the client offered none), or why not.
pub fn accept<B>(req: &hyper::Request<B>, protocol: Option<&'static str>) -> Result<hyper::Response<()>, String> {
    let key = req.headers().get(SEC_WEBSOCKET_KEY).ok_or("missing Sec-WebSocket-Key")?;
    let mut response = hyper::Response::new(());
    *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes())).map_err(|e| e.to_string())?;
    h.insert(SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = protocol {
        h.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    Ok(response)
}

/// The server side of an upgraded connection.
pub async fn server<T: AsyncRead + AsyncWrite + Unpin>(io: T) -> WebSocketStream<T> {
    WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await
}

/// The server side's limits: no message or frame over [`MAX_MESSAGE`].
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE))
}

/// Runs an exec or attach over `ws` (negotiated as `protocol`): builds the session from the channels, lets `run`
/// drive it, then reports the outcome and closes.
pub async fn remotecommand<T, F, Fut>(ws: WebSocketStream<T>, protocol: &'static str, options: Options, run: F)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnOnce(Session) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let base64 = protocol.contains("base64");
    let (mut sink, mut source) = ws.split();
    // Everything sent goes through one queue: (channel, data); `None` closes the connection.
    let (out_tx, mut out_rx) = mpsc::channel::<Option<(u8, Bytes)>>(16);
    let writer = tokio::spawn(async move {
        while let Some(item) = out_rx.recv().await {
            let Some((channel, data)) = item else { break };
            if sink.send(encode(base64, channel, &data)).await.is_err() {
                return;
            }
        }
        let _ = sink.send(normal_close()).await;
        let _ = sink.close().await;
    });
    let first = if options.stdout {
        STDOUT
    } else if options.stderr {
        STDERR
    } else {
        ERROR
    };
    let _ = out_tx.send(Some((first, Bytes::new()))).await;

    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(8);
    let (resize_tx, resize_rx) = mpsc::channel(4);
    let mut inputs = JoinSet::new();
    inputs.spawn(async move {
        let (mut stdin_tx, mut decoder) = (Some(stdin_tx), ResizeDecoder::default());
        while let Some(Ok(message)) = source.next().await {
            let Some((channel, data)) = decode(base64, message) else { continue };
            match channel {
                STDIN => {
                    if let Some(tx) = &stdin_tx
                        && tx.send(data).await.is_err()
                    {
                        stdin_tx = None;
                    }
                }
                RESIZE => {
                    let Ok(sizes) = decoder.feed(&data) else { continue };
                    for size in sizes {
                        let _ = resize_tx.send(size).await;
                    }
                }
                CLOSE if data.first() == Some(&STDIN) => stdin_tx = None,
                _ => {}
            }
        }
    });
    let mut outputs = JoinSet::new();
    let mut output = |wanted: bool, channel: u8| {
        wanted.then(|| {
            let (tx, mut rx) = mpsc::channel::<Bytes>(8);
            let out = out_tx.clone();
            outputs.spawn(async move {
                while let Some(data) = rx.recv().await {
                    if out.send(Some((channel, data))).await.is_err() {
                        break;
                    }
                }
            });
            tx
        })
    };
    let session = Session {
        stdin: options.stdin.then_some(stdin_rx),
        stdout: output(options.stdout, STDOUT),
        stderr: output(options.stderr, STDERR),
        resize: options.tty.then_some(resize_rx),
    };
    let outcome = run(session).await;
    while outputs.join_next().await.is_some() {}
    inputs.abort_all();
    if let Some(bytes) = error_stream_bytes(protocol, &outcome) {
        let _ = out_tx.send(Some((ERROR, Bytes::from(bytes)))).await;
    }
    let _ = out_tx.send(None).await;
    let _ = writer.await;
}

fn encode(base64: bool, channel: u8, data: &[u8]) -> Message {
    if base64 {
        let mut text = String::with_capacity(1 + data.len() * 4 / 3 + 4);
        text.push(char::from(b'0' + channel.min(9)));
        text.push_str(&base64::engine::general_purpose::STANDARD.encode(data));
        Message::text(text)
    } else {
        let mut frame = Vec::with_capacity(1 + data.len());
        frame.push(channel);
        frame.extend_from_slice(data);
        Message::binary(frame)
    }
}

/// A client message as (channel, data); `None` for control messages and malformed ones.
pub fn decode(base64: bool, message: Message) -> Option<(u8, Bytes)> {
    match message {
        Message::Binary(b) if !base64 => {
            let channel = *b.first()?;
            Some((channel, b.slice(1..)))
        }
        Message::Text(t) if base64 => {
            let s = t.as_str();
            let channel = s.as_bytes().first()?.checked_sub(b'0')?;
            let data = base64::engine::general_purpose::STANDARD.decode(s.get(1..)?).ok()?;
            Some((channel, Bytes::from(data)))
        }
        _ => None,
    }
}

/// Turns the binary messages of `ws` into a byte stream (and bytes written into messages): the tunnel of
/// `SPDY/3.1+portforward.k8s.io`. Returns the local end; a task copies until either side ends.
pub fn tunnel<T>(ws: WebSocketStream<T>) -> tokio::io::DuplexStream
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (local, mut remote) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        let (mut sink, mut source) = ws.split();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            tokio::select! {
                message = source.next() => match message {
                    Some(Ok(Message::Binary(b))) => {
                        if remote.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                n = remote.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                },
            }
        }
        let _ = sink.send(normal_close()).await;
        let _ = sink.close().await;
    });
    local
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_messages_encode_and_decode() {
        assert_eq!(encode(false, STDOUT, b"hi"), Message::binary(vec![1, b'h', b'i']));
        assert_eq!(encode(true, STDERR, b"hi"), Message::text("2aGk="));
        assert_eq!(decode(false, Message::binary(vec![0, b'x'])), Some((STDIN, Bytes::from_static(b"x"))));
        assert_eq!(decode(true, Message::text("0eA==")), Some((STDIN, Bytes::from_static(b"x"))));
        assert_eq!(decode(false, Message::binary(Vec::new())), None);
        assert_eq!(decode(true, Message::text("0***")), None, "bad base64 is dropped");
        assert_eq!(decode(false, Message::text("0eA==")), None, "text on a binary protocol");
    }

    /// A v5 exec over an in-memory WebSocket: readiness message, stdin with the close signal, stdout, stderr and
    /// the exit status on the error channel, then a close.
    #[tokio::test]
    async fn exec_over_v5() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server_ws = tokio::spawn(async move { server(a).await });
        let mut client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let ws = server_ws.await.unwrap();
        let options = Options { stdin: true, stdout: true, stderr: true, tty: false };
        let runtime = crate::pods::services::fake::FakeRuntime::default();
        let served = tokio::spawn(async move {
            remotecommand(ws, "v5.channel.k8s.io", options, |session| async move {
                let command = ["sh", "-c", "cat; echo e >&2; exit 2"].iter().map(|s| s.to_string()).collect();
                crate::streaming::exec::run(&runtime, "c", command, false, session).await
            })
            .await;
        });
        client.send(Message::binary(vec![STDIN, b'a', b'b'])).await.unwrap();
        client.send(Message::binary(vec![CLOSE, STDIN])).await.unwrap();
        let mut per_channel: std::collections::BTreeMap<u8, Vec<u8>> = Default::default();
        let mut first = None;
        let mut closed_normally = false;
        while let Some(Ok(message)) = client.next().await {
            closed_normally |= matches!(&message, Message::Close(Some(f)) if f.code == CloseCode::Normal);
            if let Message::Binary(b) = message {
                first.get_or_insert(b.to_vec());
                per_channel.entry(b[0]).or_default().extend_from_slice(&b[1..]);
            }
        }
        served.await.unwrap();
        assert!(closed_normally, "a normal closure (1000): client-go reads anything else as an error");
        assert_eq!(first, Some(vec![STDOUT]), "an empty stdout message first");
        assert_eq!(per_channel[&STDOUT], b"ab");
        assert_eq!(per_channel[&STDERR], b"e\n");
        let status: serde_json::Value = serde_json::from_slice(&per_channel[&ERROR]).unwrap();
        assert_eq!(status["details"]["causes"][0]["message"], "2");
    }
}
