//! SPDY/3.1 frames (draft-mbelshe-httpbis-spdy-00 with the 3.1 changes): the wire format only. Header blocks stay
//! compressed here; the connection decompresses them in order (one zlib stream per direction, see `headers.rs`).
//!
//! Threat model: the bytes come from an authenticated but possibly hostile peer. [`parse`] never panics, never
//! reads past what it was given, and refuses a frame whose declared length is over the caller's limit before
//! buffering it, so a peer can make the connection hold at most one frame of that size.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol version in control frames.
pub const VERSION: u16 = 3;
/// Last frame of a stream in this direction (data, SYN_STREAM, SYN_REPLY, HEADERS).
pub const FLAG_FIN: u8 = 0x01;
/// SYN_STREAM: the receiver never sends on the stream.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// Every frame starts with 8 bytes.
pub const HEADER_LEN: usize = 8;

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const STREAM_IN_USE: u32 = 8;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
}

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// Stream IDs and deltas are 31 bits.
const ID_MASK: u32 = 0x7fff_ffff;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        flags: u8,
        data: Bytes,
    },
    SynStream {
        stream: u32,
        associated: u32,
        priority: u8,
        flags: u8,
        headers: Bytes,
    },
    SynReply {
        stream: u32,
        flags: u8,
        headers: Bytes,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    /// (flags, id, value) entries.
    Settings {
        entries: Vec<(u8, u32, u32)>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good: u32,
        status: u32,
    },
    Headers {
        stream: u32,
        flags: u8,
        headers: Bytes,
    },
    WindowUpdate {
        stream: u32,
        delta: u32,
    },
    /// A control frame of a type this version does not define: ignored, as the protocol says.
    Unknown {
        kind: u16,
    },
}

/// Why bytes are not a frame. Any of these ends the connection (GOAWAY with PROTOCOL_ERROR).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("control frame of version {0} (only SPDY/3 is spoken)")]
    Version(u16),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
}

/// Parses the frame at the start of `buf`: `Ok(None)` when more bytes are needed, else the frame and how many
/// bytes it took. A payload over `max_payload` bytes is refused from its header alone.
pub fn parse(buf: &[u8], max_payload: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(head) = buf.get(..HEADER_LEN) else { return Ok(None) };
    let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let flags = head[4];
    let len = usize::from(head[5]) << 16 | usize::from(head[6]) << 8 | usize::from(head[7]);
    if len > max_payload {
        return Err(FrameError::TooLarge(len));
    }
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else { return Ok(None) };
    let frame = if word & 0x8000_0000 == 0 {
        Frame::Data { stream: word & ID_MASK, flags, data: Bytes::copy_from_slice(payload) }
    } else {
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        let kind = u16::from_be_bytes([head[2], head[3]]);
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        control(kind, flags, payload)?
    };
    Ok(Some((frame, HEADER_LEN + len)))
}

fn control(kind: u16, flags: u8, mut p: &[u8]) -> Result<Frame, FrameError> {
    let need =
        |p: &[u8], n: usize, name: &'static str| if p.len() < n { Err(FrameError::Malformed(name)) } else { Ok(()) };
    Ok(match kind {
        SYN_STREAM => {
            need(p, 10, "SYN_STREAM")?;
            let stream = p.get_u32() & ID_MASK;
            let associated = p.get_u32() & ID_MASK;
            let priority = p.get_u8() >> 5;
            let _slot = p.get_u8();
            Frame::SynStream { stream, associated, priority, flags, headers: Bytes::copy_from_slice(p) }
        }
        SYN_REPLY => {
            need(p, 4, "SYN_REPLY")?;
            let stream = p.get_u32() & ID_MASK;
            Frame::SynReply { stream, flags, headers: Bytes::copy_from_slice(p) }
        }
        RST_STREAM => {
            need(p, 8, "RST_STREAM")?;
            Frame::RstStream { stream: p.get_u32() & ID_MASK, status: p.get_u32() }
        }
        SETTINGS => {
            need(p, 4, "SETTINGS")?;
            let n = usize::try_from(p.get_u32()).unwrap_or(usize::MAX);
            if n.checked_mul(8) != Some(p.len()) {
                return Err(FrameError::Malformed("SETTINGS"));
            }
            let entries = (0..n)
                .map(|_| {
                    let id = p.get_u32();
                    (id.to_be_bytes()[0], id & 0x00ff_ffff, p.get_u32())
                })
                .collect();
            Frame::Settings { entries }
        }
        PING => {
            need(p, 4, "PING")?;
            Frame::Ping { id: p.get_u32() }
        }
        GOAWAY => {
            need(p, 8, "GOAWAY")?;
            Frame::GoAway { last_good: p.get_u32() & ID_MASK, status: p.get_u32() }
        }
        HEADERS => {
            need(p, 4, "HEADERS")?;
            let stream = p.get_u32() & ID_MASK;
            Frame::Headers { stream, flags, headers: Bytes::copy_from_slice(p) }
        }
        WINDOW_UPDATE => {
            need(p, 8, "WINDOW_UPDATE")?;
            Frame::WindowUpdate { stream: p.get_u32() & ID_MASK, delta: p.get_u32() & ID_MASK }
        }
        kind => Frame::Unknown { kind },
    })
}

/// Appends `frame` to `out`. Payloads must fit the 24-bit length (the connection splits data into smaller
/// frames); a longer one is cut there rather than corrupting the stream.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let control = |out: &mut BytesMut, kind: u16, flags: u8, payload: &[u8]| {
        out.put_u16(0x8000 | VERSION);
        out.put_u16(kind);
        put_len(out, flags, payload.len());
        out.put_slice(&payload[..payload.len().min(MAX_LEN)]);
    };
    let mut p = BytesMut::new();
    match frame {
        Frame::Data { stream, flags, data } => {
            out.put_u32(stream & ID_MASK);
            put_len(out, *flags, data.len());
            out.put_slice(&data[..data.len().min(MAX_LEN)]);
        }
        Frame::SynStream { stream, associated, priority, flags, headers } => {
            p.put_u32(stream & ID_MASK);
            p.put_u32(associated & ID_MASK);
            p.put_u8((priority & 0x7) << 5);
            p.put_u8(0);
            p.put_slice(headers);
            control(out, SYN_STREAM, *flags, &p);
        }
        Frame::SynReply { stream, flags, headers } => {
            p.put_u32(stream & ID_MASK);
            p.put_slice(headers);
            control(out, SYN_REPLY, *flags, &p);
        }
        Frame::RstStream { stream, status } => {
            p.put_u32(stream & ID_MASK);
            p.put_u32(*status);
            control(out, RST_STREAM, 0, &p);
        }
        Frame::Settings { entries } => {
            p.put_u32(u32::try_from(entries.len()).unwrap_or(0));
            for (flags, id, value) in entries.iter().take(usize::try_from(u32::MAX).unwrap_or(usize::MAX)) {
                p.put_u32(u32::from(*flags) << 24 | (id & 0x00ff_ffff));
                p.put_u32(*value);
            }
            control(out, SETTINGS, 0, &p);
        }
        Frame::Ping { id } => control(out, PING, 0, &id.to_be_bytes()),
        Frame::GoAway { last_good, status } => {
            p.put_u32(last_good & ID_MASK);
            p.put_u32(*status);
            control(out, GOAWAY, 0, &p);
        }
        Frame::Headers { stream, flags, headers } => {
            p.put_u32(stream & ID_MASK);
            p.put_slice(headers);
            control(out, HEADERS, *flags, &p);
        }
        Frame::WindowUpdate { stream, delta } => {
            p.put_u32(stream & ID_MASK);
            p.put_u32(delta & ID_MASK);
            control(out, WINDOW_UPDATE, 0, &p);
        }
        Frame::Unknown { kind } => control(out, *kind, 0, &[]),
    }
}

/// The largest payload the 24-bit length can say.
pub const MAX_LEN: usize = 0x00ff_ffff;

fn put_len(out: &mut BytesMut, flags: u8, len: usize) {
    let len = u32::try_from(len.min(MAX_LEN)).unwrap_or(0);
    out.put_u32(u32::from(flags) << 24 | len);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame) {
        let mut out = BytesMut::new();
        encode(&frame, &mut out);
        let (back, used) = parse(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(back, frame);
        // Every proper prefix asks for more bytes.
        for n in 0..out.len() {
            assert_eq!(parse(&out[..n], 1 << 20).unwrap(), None, "prefix of {n} bytes");
        }
    }

    #[test]
    fn every_frame_type_round_trips() {
        round_trip(Frame::Data { stream: 5, flags: FLAG_FIN, data: Bytes::from_static(b"hello") });
        round_trip(Frame::Data { stream: 0x7fff_ffff, flags: 0, data: Bytes::new() });
        round_trip(Frame::SynStream {
            stream: 1,
            associated: 0,
            priority: 7,
            flags: FLAG_FIN | FLAG_UNIDIRECTIONAL,
            headers: Bytes::from_static(b"\x78\x9c"),
        });
        round_trip(Frame::SynReply { stream: 3, flags: 0, headers: Bytes::from_static(b"abc") });
        round_trip(Frame::RstStream { stream: 3, status: rst::CANCEL });
        round_trip(Frame::Settings { entries: vec![(1, 7, 65536), (0, 4, 100)] });
        round_trip(Frame::Ping { id: 1 });
        round_trip(Frame::GoAway { last_good: 9, status: goaway::OK });
        round_trip(Frame::Headers { stream: 7, flags: FLAG_FIN, headers: Bytes::from_static(b"x") });
        round_trip(Frame::WindowUpdate { stream: 1, delta: 1 << 20 });
        round_trip(Frame::Unknown { kind: 0x7777 });
    }

    #[test]
    fn the_wire_format_is_spdy_3() {
        let mut out = BytesMut::new();
        encode(&Frame::Ping { id: 0x0102_0304 }, &mut out);
        assert_eq!(&out[..], b"\x80\x03\x00\x06\x00\x00\x00\x04\x01\x02\x03\x04");
        out.clear();
        encode(&Frame::Data { stream: 3, flags: FLAG_FIN, data: Bytes::from_static(b"ab") }, &mut out);
        assert_eq!(&out[..], b"\x00\x00\x00\x03\x01\x00\x00\x02ab");
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        // A declared length over the limit is refused before the payload arrives.
        assert_eq!(parse(b"\x00\x00\x00\x01\x00\xff\xff\xff", 1024), Err(FrameError::TooLarge(0xff_ffff)));
        assert_eq!(parse(b"\x80\x02\x00\x06\x00\x00\x00\x04\0\0\0\x01", 1024), Err(FrameError::Version(2)));
        assert_eq!(
            parse(b"\x80\x03\x00\x03\x00\x00\x00\x04\0\0\0\x01", 1024),
            Err(FrameError::Malformed("RST_STREAM"))
        );
        // SETTINGS whose count does not match its length.
        let bad = b"\x80\x03\x00\x04\x00\x00\x00\x0c\xff\xff\xff\xff\0\0\0\0\0\0\0\0";
        assert_eq!(parse(bad, 1024), Err(FrameError::Malformed("SETTINGS")));
    }
}
