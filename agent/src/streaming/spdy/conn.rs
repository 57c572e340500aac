//! The server side of a SPDY/3.1 connection, as the API server's `spdystream` client expects it: the client opens
//! streams (odd IDs, increasing) with SYN_STREAM, the server answers each with SYN_REPLY, both send data frames and
//! half-close with FIN, either may reset a stream; PINGs from the client are echoed; GOAWAY ends the connection.
//!
//! Two tasks per connection: a reader (frames in, header blocks inflated in order, data handed to each stream's
//! bounded queue) and a writer (every outgoing frame from one queue, so frames never interleave and the deflate
//! stream stays in order). A stream whose queue is full stops the reader: back-pressure reaches the client through
//! TCP, as with `spdystream` (which also ignores WINDOW_UPDATE and never sends one: a server that waited for
//! window updates would stall, so windows are accepted and not enforced).
//!
//! Limits: frames over [`MAX_FRAME`] bytes end the connection; at most [`Config::max_streams`] open streams
//! (more are refused with RST_STREAM/REFUSED_STREAM); a connection with no frame either way for
//! [`Config::idle_timeout`] is closed (the kubelet's `streamingConnectionIdleTimeout`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::frame::{self, FLAG_FIN, Frame, goaway, rst};
use super::headers::{HeaderCodec, Headers};

/// The largest frame payload accepted.
pub const MAX_FRAME: usize = 1 << 20;
/// Outgoing data is cut into frames of at most this many bytes.
const WRITE_CHUNK: usize = 32 * 1024;
/// Data frames queued per stream before the reader waits.
const STREAM_QUEUE: usize = 16;

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub max_streams: usize,
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config { max_streams: 1000, idle_timeout: Duration::from_secs(4 * 3600) }
    }
}

/// What the writer task is asked to send.
enum Out {
    Frame(Frame),
    Reply(u32),
    /// GOAWAY, flush, shut the write side down, then report.
    Close(oneshot::Sender<()>),
}

/// Shared by a stream's handles: whether the peer reset it, and the connection's count of live streams (a stream
/// counts until its last handle is dropped).
struct Life {
    reset: AtomicBool,
    live: Arc<AtomicUsize>,
}

impl Drop for Life {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream the client opened.
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    data: mpsc::Receiver<Bytes>,
    writer: StreamWriter,
}

impl Stream {
    /// The next data the client sent; `None` once it half-closed (FIN), reset the stream or left.
    pub async fn read(&mut self) -> Option<Bytes> {
        self.data.recv().await
    }

    /// A handle that sends on this stream.
    pub fn writer(&self) -> StreamWriter {
        self.writer.clone()
    }

    /// Splits the stream into its reading and writing halves.
    pub fn split(self) -> (StreamReader, StreamWriter) {
        (StreamReader { data: self.data, _life: self.writer.life.clone() }, self.writer)
    }
}

/// The reading half of a [`Stream`].
pub struct StreamReader {
    data: mpsc::Receiver<Bytes>,
    _life: Arc<Life>,
}

impl StreamReader {
    /// As [`Stream::read`].
    pub async fn read(&mut self) -> Option<Bytes> {
        self.data.recv().await
    }
}

/// The connection is gone (or the stream was reset): nothing more can be sent.
#[derive(Debug, thiserror::Error)]
#[error("the SPDY connection is closed")]
pub struct Closed;

/// Sends on one stream.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    out: mpsc::Sender<Out>,
    life: Arc<Life>,
}

impl StreamWriter {
    /// Sends `data` (in frames of at most 32 KiB); fails once the connection is gone or the peer reset the stream.
    pub async fn write(&self, data: &[u8]) -> Result<(), Closed> {
        for chunk in data.chunks(WRITE_CHUNK) {
            if self.life.reset.load(Ordering::Relaxed) {
                return Err(Closed);
            }
            let frame = Frame::Data { stream: self.id, flags: 0, data: Bytes::copy_from_slice(chunk) };
            self.out.send(Out::Frame(frame)).await.map_err(|_| Closed)?;
        }
        Ok(())
    }

    /// Half-closes the stream (FIN): the client reads EOF after what was sent.
    pub async fn close(&self) {
        let frame = Frame::Data { stream: self.id, flags: FLAG_FIN, data: Bytes::new() };
        let _ = self.out.send(Out::Frame(frame)).await;
    }

    /// Resets the stream (both directions end at once).
    pub async fn reset(&self) {
        self.life.reset.store(true, Ordering::Relaxed);
        let _ = self.out.send(Out::Frame(Frame::RstStream { stream: self.id, status: rst::CANCEL })).await;
    }
}

/// A served connection: new streams arrive on [`Connection::accept`].
pub struct Connection {
    incoming: mpsc::Receiver<Stream>,
    out: mpsc::Sender<Out>,
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
}

impl Connection {
    /// Serves `io` (an upgraded HTTP connection).
    pub fn serve<T>(io: T, config: Config) -> Connection
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read, write) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(16);
        let activity = Arc::new(Activity::new());
        let writer = tokio::spawn(write_frames(write, out_rx, activity.clone()));
        let reader = tokio::spawn(read_frames(read, in_tx, out_tx.clone(), config, activity));
        Connection { incoming: in_rx, out: out_tx, reader, writer: Some(writer) }
    }

    /// The next stream the client opened; `None` once the connection ended.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.incoming.recv().await
    }

    /// Ends the connection: what was queued is sent, then GOAWAY, and the socket is shut down.
    pub async fn close(mut self) {
        let (done_tx, done) = oneshot::channel();
        if self.out.send(Out::Close(done_tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
        }
        self.reader.abort();
        if let Some(w) = self.writer.take() {
            w.abort();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(w) = self.writer.take() {
            w.abort();
        }
    }
}

/// When a frame last went either way (for the idle timeout). tokio's clock, so that tests can pause it.
struct Activity {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { start: tokio::time::Instant::now(), last_ms: AtomicU64::new(0) }
    }
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(mut io: W, mut rx: mpsc::Receiver<Out>, activity: Arc<Activity>) {
    let mut codec = HeaderCodec::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut last_stream = 0;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut close = None;
        // Coalesce what is queued into one write.
        while let Some(item) = next.take() {
            match item {
                Out::Frame(f) => frame::encode(&f, &mut buf),
                Out::Reply(stream) => {
                    last_stream = last_stream.max(stream);
                    let headers = codec.encode(&Headers::default()).into();
                    frame::encode(&Frame::SynReply { stream, flags: 0, headers }, &mut buf);
                }
                Out::Close(done) => {
                    frame::encode(&Frame::GoAway { last_good: last_stream, status: goaway::OK }, &mut buf);
                    close = Some(done);
                    break;
                }
            }
            if buf.len() < 256 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            if io.write_all(&buf).await.is_err() || io.flush().await.is_err() {
                return;
            }
            buf.clear();
            activity.touch();
        }
        if let Some(done) = close {
            let _ = io.shutdown().await;
            let _ = done.send(());
            return;
        }
    }
}

async fn read_frames<R: AsyncRead + Unpin>(
    mut io: R,
    incoming: mpsc::Sender<Stream>,
    out: mpsc::Sender<Out>,
    config: Config,
    activity: Arc<Activity>,
) {
    let mut codec = HeaderCodec::new();
    // Where each stream's data goes, until the client half-closes it.
    let mut streams: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    // Every stream that may still have handles (pruned of dead ones as it grows).
    let mut lives: HashMap<u32, Weak<Life>> = HashMap::new();
    let live = Arc::new(AtomicUsize::new(0));
    let mut last_id = 0;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let protocol_error = |out: &mpsc::Sender<Out>, last: u32| {
        let _ = out.try_send(Out::Frame(Frame::GoAway { last_good: last, status: goaway::PROTOCOL_ERROR }));
    };
    loop {
        let frame = loop {
            match frame::parse(&buf, MAX_FRAME) {
                Ok(Some((frame, used))) => {
                    let _ = buf.split_to(used);
                    break Some(frame);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "SPDY: bad frame");
                    protocol_error(&out, last_id);
                    break None;
                }
            }
            let wait = config.idle_timeout.saturating_sub(activity.idle());
            match tokio::time::timeout(wait, io.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break None,
                Ok(Ok(_)) => activity.touch(),
                Err(_) if activity.idle() >= config.idle_timeout => {
                    tracing::debug!("SPDY: connection idle, closing");
                    break None;
                }
                Err(_) => {}
            }
        };
        let Some(frame) = frame else { break };
        match frame {
            Frame::SynStream { stream: id, flags, headers, .. } => {
                let headers = match codec.decode(&headers) {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::debug!(error = %e, "SPDY: bad header block");
                        protocol_error(&out, last_id);
                        break;
                    }
                };
                if id == 0 || id % 2 == 0 || id <= last_id {
                    let _ = out.send(Out::Frame(Frame::RstStream { stream: id, status: rst::PROTOCOL_ERROR })).await;
                    continue;
                }
                last_id = id;
                if live.load(Ordering::Relaxed) >= config.max_streams {
                    let _ = out.send(Out::Frame(Frame::RstStream { stream: id, status: rst::REFUSED_STREAM })).await;
                    continue;
                }
                let (tx, rx) = mpsc::channel(STREAM_QUEUE);
                if flags & FLAG_FIN == 0 {
                    streams.insert(id, tx);
                }
                live.fetch_add(1, Ordering::Relaxed);
                let life = Arc::new(Life { reset: AtomicBool::new(false), live: live.clone() });
                if lives.len() >= 2 * config.max_streams {
                    lives.retain(|_, l| l.strong_count() > 0);
                }
                lives.insert(id, Arc::downgrade(&life));
                if out.send(Out::Reply(id)).await.is_err() {
                    break;
                }
                let stream = Stream { id, headers, data: rx, writer: StreamWriter { id, out: out.clone(), life } };
                if incoming.send(stream).await.is_err() {
                    let _ = out.send(Out::Frame(Frame::RstStream { stream: id, status: rst::REFUSED_STREAM })).await;
                }
            }
            Frame::Data { stream, flags, data } => {
                if let Some(tx) = streams.get(&stream)
                    && !data.is_empty()
                    && tx.send(data).await.is_err()
                {
                    // The handler stopped reading this stream: drop what else comes.
                    streams.remove(&stream);
                }
                if flags & FLAG_FIN != 0 {
                    streams.remove(&stream);
                }
            }
            Frame::RstStream { stream, .. } => {
                streams.remove(&stream);
                if let Some(life) = lives.remove(&stream).and_then(|l| l.upgrade()) {
                    life.reset.store(true, Ordering::Relaxed);
                }
            }
            Frame::Ping { id } => {
                // Echo the client's (odd) pings; ours would come back even, and we send none.
                if id % 2 == 1 && out.send(Out::Frame(Frame::Ping { id })).await.is_err() {
                    break;
                }
            }
            Frame::Headers { headers, .. } | Frame::SynReply { headers, .. } => {
                // Ignored, but inflated: the zlib stream must stay in step.
                if codec.decode(&headers).is_err() {
                    protocol_error(&out, last_id);
                    break;
                }
            }
            Frame::GoAway { .. } => break,
            Frame::Settings { .. } | Frame::WindowUpdate { .. } | Frame::Unknown { .. } => {}
        }
    }
    // Every stream's reader sees its end.
    streams.clear();
}

#[cfg(test)]
pub(crate) mod tests;
