use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::streaming::spdy::frame::{FLAG_FIN, Frame, goaway, rst};
use crate::streaming::spdy::headers::{HeaderCodec, Headers};

/// The client side, frame by frame, as `spdystream` would send them.
pub(crate) struct Client {
    io: DuplexStream,
    codec: HeaderCodec,
    inflate: HeaderCodec,
    buf: BytesMut,
}

impl Client {
    pub(crate) fn new(io: DuplexStream) -> Self {
        Client { io, codec: HeaderCodec::new(), inflate: HeaderCodec::new(), buf: BytesMut::new() }
    }

    pub(crate) async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        frame::encode(&frame, &mut out);
        self.io.write_all(&out).await.unwrap();
    }

    pub(crate) async fn open(&mut self, id: u32, headers: &[(&str, &str)], fin: bool) {
        let h = Headers(headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect());
        let headers = Bytes::from(self.codec.encode(&h));
        let flags = if fin { FLAG_FIN } else { 0 };
        self.send(Frame::SynStream { stream: id, associated: 0, priority: 0, flags, headers }).await;
    }

    pub(crate) async fn data(&mut self, id: u32, data: &[u8], fin: bool) {
        let flags = if fin { FLAG_FIN } else { 0 };
        self.send(Frame::Data { stream: id, flags, data: Bytes::copy_from_slice(data) }).await;
    }

    /// The next frame from the server (`None` at EOF), with SYN_REPLY headers inflated to keep in step.
    pub(crate) async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some((f, used)) = frame::parse(&self.buf, 1 << 24).unwrap() {
                let _ = self.buf.split_to(used);
                if let Frame::SynReply { headers, .. } = &f {
                    self.inflate.decode(headers).unwrap();
                }
                return Some(f);
            }
            let read = tokio::time::timeout(Duration::from_secs(5), self.io.read_buf(&mut self.buf)).await;
            if read.expect("a frame within 5 s").unwrap() == 0 {
                return None;
            }
        }
    }
}

fn pair(config: Config) -> (Connection, Client) {
    let (a, b) = tokio::io::duplex(1 << 20);
    (Connection::serve(a, config), Client::new(b))
}

#[tokio::test]
async fn streams_are_replied_carry_data_both_ways_and_half_close() {
    let (mut conn, mut client) = pair(Config::default());
    client.open(1, &[("streamtype", "stdin")], false).await;
    assert!(matches!(client.next().await, Some(Frame::SynReply { stream: 1, .. })));
    let mut stream = conn.accept().await.unwrap();
    assert_eq!(stream.headers.get("streamType"), Some("stdin"));
    client.data(1, b"hello", false).await;
    client.data(1, b" world", true).await;
    assert_eq!(stream.read().await.unwrap(), Bytes::from_static(b"hello"));
    assert_eq!(stream.read().await.unwrap(), Bytes::from_static(b" world"));
    assert_eq!(stream.read().await, None, "FIN is EOF");
    // The server writes (in 32 KiB frames) and half-closes.
    let w = stream.writer();
    w.write(&vec![7u8; 70_000]).await.unwrap();
    w.close().await;
    let mut got = 0;
    loop {
        match client.next().await.unwrap() {
            Frame::Data { stream: 1, flags, data } => {
                assert!(data.len() <= 32 * 1024);
                got += data.len();
                if flags & FLAG_FIN != 0 {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, 70_000);
    // A stream opened with FIN is read-closed at once (the error stream is).
    client.open(3, &[("streamtype", "error")], true).await;
    let mut error = conn.accept().await.unwrap();
    assert_eq!(error.read().await, None);
    drop(stream);
    conn.close().await;
    let mut saw_goaway = false;
    while let Some(f) = client.next().await {
        saw_goaway |= matches!(f, Frame::GoAway { last_good: 3, status: goaway::OK });
    }
    assert!(saw_goaway, "GOAWAY naming the last stream, then EOF");
}

#[tokio::test]
async fn pings_are_echoed_and_bad_ids_reset() {
    let (mut conn, mut client) = pair(Config::default());
    client.send(Frame::Ping { id: 1 }).await;
    assert_eq!(client.next().await, Some(Frame::Ping { id: 1 }));
    // Settings and window updates are accepted silently.
    client.send(Frame::Settings { entries: vec![(0, 7, 1 << 20)] }).await;
    client.send(Frame::WindowUpdate { stream: 0, delta: 1000 }).await;
    client.open(2, &[], false).await; // even: a server ID
    assert_eq!(client.next().await, Some(Frame::RstStream { stream: 2, status: rst::PROTOCOL_ERROR }));
    client.open(5, &[], false).await;
    assert!(matches!(client.next().await, Some(Frame::SynReply { stream: 5, .. })));
    client.open(3, &[], false).await; // not increasing
    assert_eq!(client.next().await, Some(Frame::RstStream { stream: 3, status: rst::PROTOCOL_ERROR }));
    assert_eq!(conn.accept().await.unwrap().id, 5);
}

#[tokio::test]
async fn a_reset_stream_ends_reading_and_writing() {
    let (mut conn, mut client) = pair(Config::default());
    client.open(1, &[], false).await;
    client.next().await;
    let mut stream = conn.accept().await.unwrap();
    client.send(Frame::RstStream { stream: 1, status: rst::CANCEL }).await;
    assert_eq!(stream.read().await, None);
    assert!(stream.writer().write(b"late").await.is_err());
}

#[tokio::test]
async fn streams_over_the_limit_are_refused_until_one_is_dropped() {
    let (mut conn, mut client) = pair(Config { max_streams: 2, ..Config::default() });
    for id in [1, 3] {
        client.open(id, &[], false).await;
        client.next().await;
    }
    let (first, _second) = (conn.accept().await.unwrap(), conn.accept().await.unwrap());
    client.open(5, &[], false).await;
    assert_eq!(client.next().await, Some(Frame::RstStream { stream: 5, status: rst::REFUSED_STREAM }));
    drop(first);
    client.open(7, &[], false).await;
    assert!(matches!(client.next().await, Some(Frame::SynReply { stream: 7, .. })));
}

#[tokio::test]
async fn hostile_input_ends_the_connection_with_goaway() {
    let (mut conn, mut client) = pair(Config::default());
    // A frame declaring 16 MiB.
    client.io.write_all(b"\x00\x00\x00\x01\x00\xff\xff\xff").await.unwrap();
    assert_eq!(client.next().await, Some(Frame::GoAway { last_good: 0, status: goaway::PROTOCOL_ERROR }));
    assert!(conn.accept().await.is_none(), "no more streams");
    // A header block that is not zlib.
    let (mut conn, mut client) = pair(Config::default());
    let headers = Bytes::from_static(b"garbage");
    client.send(Frame::SynStream { stream: 1, associated: 0, priority: 0, flags: 0, headers }).await;
    assert_eq!(client.next().await, Some(Frame::GoAway { last_good: 0, status: goaway::PROTOCOL_ERROR }));
    assert!(conn.accept().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed() {
    let (mut conn, mut client) = pair(Config { idle_timeout: Duration::from_secs(60), ..Config::default() });
    client.open(1, &[], false).await;
    let _stream = conn.accept().await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    client.data(1, b"x", false).await; // activity: the clock restarts
    tokio::time::sleep(Duration::from_secs(45)).await;
    tokio::task::yield_now().await;
    client.open(3, &[], false).await;
    assert!(conn.accept().await.is_some(), "still open 45 s after the last frame");
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(conn.accept().await.is_none(), "closed after 60 s idle");
}
