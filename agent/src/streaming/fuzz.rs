//! Fuzzing of everything in `streaming` that parses bytes from the network: SPDY frames, SPDY header blocks
//! (zlib with the protocol's dictionary), WebSocket frames as the server reads them (tungstenite, with nodelet's
//! size limits) and the channel messages in them, and terminal resize messages. Random and mutated valid inputs;
//! the property is that nothing panics, every parse consumes what it says, and nothing grows without bound.
//!
//! `NODELET_FUZZ_ITERATIONS` sets the inputs per target (default 20,000: a short run for every `cargo test`);
//! a long run: `NODELET_FUZZ_ITERATIONS=1000000 cargo test --release -p nodelet --lib streaming::fuzz`.

use bytes::{Bytes, BytesMut};

use super::remotecommand::ResizeDecoder;
use super::spdy::frame::{self, Frame};
use super::spdy::headers::{HeaderCodec, Headers};
use super::websocket;

/// xorshift64: fast, deterministic, good enough to wander the input space.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next().to_le_bytes()[0]).collect()
    }

    /// `valid` with a few bytes changed, inserted or cut: deep paths get reached, not only the first check.
    pub fn mutate(&mut self, valid: &[u8]) -> Vec<u8> {
        let mut v = valid.to_vec();
        for _ in 0..=self.below(3) {
            match self.below(4) {
                0 if !v.is_empty() => {
                    let at = self.below(v.len());
                    v[at] = self.next().to_le_bytes()[0];
                }
                1 => {
                    let at = self.below(v.len() + 1);
                    let n = self.below(8);
                    let extra = self.bytes(n);
                    v.splice(at..at, extra);
                }
                2 => v.truncate(self.below(v.len() + 1)),
                _ if !v.is_empty() => {
                    // A length or count field pushed to an extreme.
                    let at = self.below(v.len());
                    v[at] = if self.next().is_multiple_of(2) { 0xff } else { 0 };
                }
                _ => {}
            }
        }
        v
    }

    /// Random bytes half of the time, a mutation of one of `valid` the other half.
    pub fn input(&mut self, valid: &[Vec<u8>]) -> Vec<u8> {
        if self.next().is_multiple_of(2) || valid.is_empty() {
            let n = self.below(96);
            self.bytes(n)
        } else {
            let pick = self.below(valid.len());
            self.mutate(&valid[pick])
        }
    }
}

/// Inputs per target.
pub fn iterations() -> usize {
    std::env::var("NODELET_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)
}

#[test]
fn spdy_frames() {
    let mut valid = Vec::new();
    let mut codec = HeaderCodec::new();
    let headers = codec.encode(&Headers(vec![("streamtype".into(), "data".into()), ("port".into(), "80".into())]));
    for f in [
        Frame::Settings { entries: vec![(0, 7, 1)] },
        Frame::SynStream { stream: 1, associated: 0, priority: 0, flags: 0, headers: Bytes::from(headers) },
        Frame::Ping { id: 7 },
        Frame::Data { stream: 1, flags: 1, data: Bytes::from_static(b"hello") },
        Frame::RstStream { stream: 3, status: 5 },
        Frame::GoAway { last_good: 1, status: 0 },
        Frame::WindowUpdate { stream: 1, delta: 4096 },
    ] {
        let mut b = BytesMut::new();
        frame::encode(&f, &mut b);
        valid.push(b.to_vec());
    }
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut parsed = 0;
    for _ in 0..iterations() {
        let input = rng.input(&valid);
        let mut rest: &[u8] = &input;
        while let Ok(Some((_, used))) = frame::parse(rest, 4096) {
            assert!(used >= frame::HEADER_LEN && used <= rest.len());
            rest = &rest[used..];
            parsed += 1;
        }
    }
    // The mutations keep many inputs parseable: the checks past the first bytes are exercised too.
    assert!(parsed > iterations() / 10, "{parsed} frames parsed");
}

#[test]
fn spdy_header_blocks() {
    let mut rng = Rng::new(0x5151_2024);
    let mut encoder = HeaderCodec::new();
    let first = encoder.encode(&Headers(vec![("streamtype".into(), "error".into()), ("requestid".into(), "0".into())]));
    let second = encoder.encode(&Headers(vec![("streamtype".into(), "data".into())]));
    let mut decoded = 0;
    for _ in 0..iterations() {
        // A fresh connection's codec: the first block carries the zlib header and the dictionary's checksum.
        let mut decoder = HeaderCodec::new();
        let input = rng.input(std::slice::from_ref(&first));
        if decoder.decode(&input).is_ok() {
            let next = rng.input(std::slice::from_ref(&second));
            if let Ok(h) = decoder.decode(&next) {
                assert!(h.0.len() <= 256);
                decoded += 1;
            }
        }
    }
    assert!(decoded > 0, "no second block ever decoded: the inputs never got past zlib");
}

#[test]
fn websocket_frames_and_channel_messages() {
    use std::io::Cursor;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket};
    // Client frames are masked: a few valid ones (binary stdin, text base64 stdin, close signal, resize, close).
    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut v = vec![0x80 | opcode, 0x80 | u8::try_from(payload.len()).unwrap_or(125).min(125)];
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }
    let valid = vec![
        masked(2, b"\x00typed"),
        masked(1, b"0dHlwZWQ="),
        masked(2, &[255, 0]),
        masked(2, b"\x04{\"Width\":80,\"Height\":24}"),
        masked(8, &[0x03, 0xe8]),
        masked(9, b"ping"),
    ];
    let mut rng = Rng::new(0x7e57_c0de);
    let mut messages = 0;
    for _ in 0..iterations() {
        let mut input = rng.input(&valid);
        if rng.next().is_multiple_of(2) {
            // Frames back to back, as they come on a connection.
            input.extend(rng.input(&valid));
        }
        let mut ws = WebSocket::from_raw_socket(Cursor::new(input), Role::Server, Some(websocket::config()));
        for _ in 0..8 {
            let Ok(message) = ws.read() else { break };
            assert!(message.len() <= websocket::MAX_MESSAGE);
            messages += 1;
            for base64 in [false, true] {
                if let Some((_, data)) = websocket::decode(base64, message.clone()) {
                    assert!(data.len() <= websocket::MAX_MESSAGE);
                }
            }
        }
    }
    assert!(messages > iterations() / 10, "{messages} messages read");
}

#[test]
fn resize_messages() {
    let valid = vec![b"{\"Width\":80,\"Height\":24}".to_vec(), b"{\"Width\":1,\"Height\":65535}{\"Width\":2".to_vec()];
    let mut rng = Rng::new(0xdead_beef);
    let mut sizes = 0;
    for _ in 0..iterations() {
        let mut decoder = ResizeDecoder::default();
        for _ in 0..4 {
            let input = rng.input(&valid);
            match decoder.feed(&input) {
                Ok(got) => sizes += got.len(),
                Err(_) => break,
            }
        }
    }
    assert!(sizes > 0, "no size ever decoded");
}
