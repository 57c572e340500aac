//! remotecommand over SPDY: the client opens one stream per channel, named by its `streamType` header (`error`,
//! `stdin`, `stdout`, `stderr`, `resize`); the server waits for all it expects (upstream's `waitForStreams`,
//! within the stream-creation timeout), then runs the command. At the end the outputs are half-closed, the error
//! stream carries the outcome (per protocol version), and the connection goes away.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::remotecommand::{Options, Outcome, ResizeDecoder, Session, error_stream_bytes};
use super::spdy::{Connection, StreamWriter};

/// How long the client may take to open its streams (upstream's `DefaultStreamCreationTimeout`).
pub const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// What is left to do once the command ended.
pub struct Finish {
    conn: Connection,
    protocol: &'static str,
    error: Option<StreamWriter>,
    /// Copies of the session's outputs to their streams; each half-closes its stream at the end.
    outputs: JoinSet<()>,
    /// Copies from the client (stdin, resize): stopped at the end.
    inputs: JoinSet<()>,
}

impl Finish {
    /// Sends the rest of the output, the outcome on the error stream, and ends the connection.
    pub async fn finish(mut self, outcome: &Outcome) {
        while self.outputs.join_next().await.is_some() {}
        self.inputs.abort_all();
        if let Some(error) = self.error.take() {
            if let Some(bytes) = error_stream_bytes(self.protocol, outcome) {
                let _ = error.write(&bytes).await;
            }
            error.close().await;
        }
        self.conn.close().await;
    }
}

/// Accepts the streams `options` calls for on `conn` (negotiated as `protocol`) and turns them into a session.
pub async fn accept(
    conn: Connection,
    protocol: &'static str,
    options: Options,
    timeout: Duration,
) -> Result<(Session, Finish), String> {
    let resize = options.tty && (protocol.starts_with("v3.") || protocol.starts_with("v4."));
    let expected = 1
        + usize::from(options.stdin)
        + usize::from(options.stdout)
        + usize::from(options.stderr)
        + usize::from(resize);
    let mut session = Session { stdin: None, stdout: None, stderr: None, resize: None };
    let mut finish = Finish { conn, protocol, error: None, outputs: JoinSet::new(), inputs: JoinSet::new() };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut received = 0;
    while received < expected {
        let stream = match tokio::time::timeout_at(deadline, finish.conn.accept()).await {
            Ok(Some(s)) => s,
            Ok(None) => return Err("the client closed the connection before opening its streams".into()),
            Err(_) => return Err("timed out waiting for client to create streams".into()),
        };
        let kind = stream.headers.get("streamType").unwrap_or_default().to_string();
        let (mut reader, writer) = stream.split();
        match kind.as_str() {
            "error" => finish.error = Some(writer),
            "stdin" => {
                let (tx, rx) = mpsc::channel(8);
                finish.inputs.spawn(async move {
                    while let Some(data) = reader.read().await {
                        if tx.send(data).await.is_err() {
                            break;
                        }
                    }
                });
                // The first protocol version closed stdin at once (upstream keeps that quirk).
                session.stdin = (protocol != "channel.k8s.io").then_some(rx);
            }
            "stdout" | "stderr" => {
                let (tx, mut rx) = mpsc::channel::<Bytes>(8);
                finish.outputs.spawn(async move {
                    while let Some(data) = rx.recv().await {
                        if writer.write(&data).await.is_err() {
                            break;
                        }
                    }
                    writer.close().await;
                });
                if kind == "stdout" {
                    session.stdout = Some(tx);
                } else {
                    session.stderr = Some(tx);
                }
            }
            "resize" => {
                let (tx, rx) = mpsc::channel(4);
                finish.inputs.spawn(async move {
                    let mut decoder = ResizeDecoder::default();
                    while let Some(data) = reader.read().await {
                        let Ok(sizes) = decoder.feed(&data) else { break };
                        for size in sizes {
                            if tx.send(size).await.is_err() {
                                return;
                            }
                        }
                    }
                });
                session.resize = Some(rx);
            }
            other => {
                tracing::debug!(stream_type = other, "SPDY exec: unexpected stream type");
                continue;
            }
        }
        received += 1;
    }
    Ok((session, finish))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pods::services::fake::FakeRuntime;
    use crate::streaming::spdy::conn::tests::Client;
    use crate::streaming::spdy::frame::{FLAG_FIN, Frame};
    use crate::streaming::spdy::{Config, Connection};

    /// A whole exec over SPDY with protocol v4: the client opens its streams as `kubectl` does, sends stdin,
    /// reads stdout and stderr, and gets the exit code as a `Status` on the error stream.
    #[tokio::test]
    async fn exec_over_spdy_end_to_end() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let conn = Connection::serve(a, Config::default());
        let mut client = Client::new(b);
        let options = Options { stdin: true, stdout: true, stderr: true, tty: false };
        let server = tokio::spawn(async move {
            let (session, finish) = accept(conn, "v4.channel.k8s.io", options, STREAM_CREATION_TIMEOUT).await.unwrap();
            let runtime = Arc::new(FakeRuntime::default());
            let command: Vec<String> =
                ["sh", "-c", "cat; echo oops >&2; exit 7"].iter().map(|s| s.to_string()).collect();
            let outcome = crate::streaming::exec::run(runtime.as_ref(), "c", command, false, session).await;
            finish.finish(&outcome).await;
        });
        client.open(1, &[("streamtype", "error")], true).await;
        client.open(3, &[("streamtype", "stdin")], false).await;
        client.open(5, &[("streamtype", "stdout")], true).await;
        client.open(7, &[("streamtype", "stderr")], true).await;
        client.data(3, b"typed\n", true).await;
        let mut per_stream: std::collections::HashMap<u32, (Vec<u8>, bool)> = Default::default();
        while let Some(frame) = client.next().await {
            if let Frame::Data { stream, flags, data } = frame {
                let entry = per_stream.entry(stream).or_default();
                entry.0.extend_from_slice(&data);
                entry.1 |= flags & FLAG_FIN != 0;
            }
        }
        server.await.unwrap();
        assert_eq!(per_stream[&5], (b"typed\n".to_vec(), true));
        assert_eq!(per_stream[&7], (b"oops\n".to_vec(), true));
        let status: serde_json::Value = serde_json::from_slice(&per_stream[&1].0).unwrap();
        assert_eq!(status["reason"], "NonZeroExitCode");
        assert_eq!(status["details"]["causes"][0]["message"], "7");
        assert!(per_stream[&1].1, "the error stream is half-closed after the status");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_opens_its_streams_times_out() {
        let (a, _b) = tokio::io::duplex(1024);
        let conn = Connection::serve(a, Config::default());
        let options = Options { stdin: false, stdout: true, stderr: false, tty: false };
        let result = accept(conn, "v4.channel.k8s.io", options, Duration::from_secs(30)).await;
        assert_eq!(result.err(), Some("timed out waiting for client to create streams".to_string()));
    }
}
