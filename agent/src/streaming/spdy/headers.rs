//! SPDY/3 header blocks: `u32 count`, then per pair `u32 len, name, u32 len, value` (several values of one name
//! joined by NUL), compressed with one zlib stream per direction for the whole connection, primed with the
//! protocol's dictionary and flushed (sync) at the end of every block. A block therefore decodes only in order:
//! the connection owns one [`HeaderCodec`] and feeds it every block it receives, even of frames it ignores.
//!
//! Limits: a block inflates to at most [`MAX_BLOCK`] bytes (a zlib bomb stops there with an error) and holds at
//! most [`MAX_PAIRS`] pairs.

use bytes::{Buf, BufMut, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::DICTIONARY;

/// The most a header block may inflate to.
pub const MAX_BLOCK: usize = 64 * 1024;
/// The most pairs in one block.
pub const MAX_PAIRS: usize = 256;

/// Header names (lowercase, as SPDY/3 requires) with their values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The first value of `name` (case-insensitive: names are lowercase on the wire, Go's peers canonicalise).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.split('\0').next().unwrap_or(v))
    }
}

/// Why a header block could not be read. Ends the connection: the zlib stream is out of step after it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("header block does not inflate: {0}")]
    Zlib(String),
    #[error("header block inflates to more than {MAX_BLOCK} bytes")]
    TooLarge,
    #[error("malformed header block")]
    Malformed,
}

/// One connection's two zlib streams.
pub struct HeaderCodec {
    inflate: Decompress,
    deflate: Compress,
    deflate_primed: bool,
}

impl Default for HeaderCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderCodec {
    pub fn new() -> Self {
        Self {
            inflate: Decompress::new(true),
            deflate: Compress::new(Compression::default(), true),
            deflate_primed: false,
        }
    }

    /// Inflates and parses the next received block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, HeaderError> {
        let mut out = Vec::with_capacity(256);
        let mut input = block;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_BLOCK {
                    return Err(HeaderError::TooLarge);
                }
                out.reserve((out.len() * 2).min(MAX_BLOCK) - out.len());
            }
            let before = self.inflate.total_in();
            let result = self.inflate.decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = usize::try_from(self.inflate.total_in() - before).unwrap_or(input.len()).min(input.len());
            input = &input[used..];
            match result {
                Ok(Status::StreamEnd) => return Err(HeaderError::Zlib("the stream ended".into())),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate.set_dictionary(DICTIONARY).map_err(|e| HeaderError::Zlib(e.to_string()))?;
                    continue;
                }
                Err(e) => return Err(HeaderError::Zlib(e.to_string())),
            }
            // Done once every input byte is consumed and the output had room to spare (nothing is pending).
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        parse_block(&out)
    }

    /// Serialises and deflates a block to send.
    pub fn encode(&mut self, headers: &Headers) -> Vec<u8> {
        let mut raw = BytesMut::new();
        raw.put_u32(u32::try_from(headers.0.len()).unwrap_or(0));
        for (name, value) in &headers.0 {
            for s in [name.to_ascii_lowercase().as_str(), value.as_str()] {
                raw.put_u32(u32::try_from(s.len()).unwrap_or(0));
                raw.put_slice(s.as_bytes());
            }
        }
        if !self.deflate_primed {
            // Cannot fail on a fresh stream.
            let _ = self.deflate.set_dictionary(DICTIONARY);
            self.deflate_primed = true;
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input: &[u8] = &raw;
        loop {
            if out.len() == out.capacity() {
                out.reserve(256);
            }
            let before = self.deflate.total_in();
            if self.deflate.compress_vec(input, &mut out, FlushCompress::Sync).is_err() {
                break;
            }
            let used = usize::try_from(self.deflate.total_in() - before).unwrap_or(input.len()).min(input.len());
            input = &input[used..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        out
    }
}

fn parse_block(mut b: &[u8]) -> Result<Headers, HeaderError> {
    let word = |b: &mut &[u8]| if b.len() >= 4 { Ok(b.get_u32()) } else { Err(HeaderError::Malformed) };
    let n = usize::try_from(word(&mut b)?).map_err(|_| HeaderError::Malformed)?;
    if n > MAX_PAIRS {
        return Err(HeaderError::Malformed);
    }
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        let string = |b: &mut &[u8]| {
            let len = usize::try_from(word(b)?).map_err(|_| HeaderError::Malformed)?;
            let s = b.get(..len).ok_or(HeaderError::Malformed)?;
            let s = String::from_utf8(s.to_vec()).map_err(|_| HeaderError::Malformed)?;
            b.advance(len);
            Ok::<_, HeaderError>(s)
        };
        let name = string(&mut b)?;
        let value = string(&mut b)?;
        pairs.push((name, value));
    }
    Ok(Headers(pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        Headers(pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect())
    }

    #[test]
    fn blocks_round_trip_in_order_through_one_stream_per_direction() {
        let (mut client, mut server) = (HeaderCodec::new(), HeaderCodec::new());
        let blocks = [
            headers(&[("streamtype", "error"), ("requestid", "0"), ("port", "8080")]),
            headers(&[("streamtype", "stdout")]),
            headers(&[]),
            headers(&[("x-long", &"v".repeat(10_000))]),
        ];
        for h in &blocks {
            let wire = client.encode(h);
            assert_eq!(&server.decode(&wire).unwrap(), h);
        }
        assert_eq!(blocks[0].get("StreamType"), Some("error"));
    }

    #[test]
    fn the_stream_is_primed_with_the_spdy_dictionary() {
        // The first block's zlib header names the dictionary by its Adler-32 (FDICT set).
        let wire = HeaderCodec::new().encode(&headers(&[("streamtype", "data")]));
        assert_eq!(wire[1] & 0x20, 0x20, "FDICT");
        let (mut a, mut b) = (1u32, 0u32);
        for byte in DICTIONARY {
            a = (a + u32::from(*byte)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(&wire[2..6], &(b << 16 | a).to_be_bytes(), "the dictionary's Adler-32");
    }

    #[test]
    fn a_zlib_bomb_and_garbage_are_errors() {
        let mut client = HeaderCodec::new();
        let mut bomb = Headers::default();
        for i in 0..40 {
            bomb.0.push((format!("h{i}"), "a".repeat(4096)));
        }
        let wire = client.encode(&bomb);
        assert!(wire.len() < 8 * 1024, "compresses well");
        assert_eq!(HeaderCodec::new().decode(&wire), Err(HeaderError::TooLarge));
        assert!(HeaderCodec::new().decode(b"\x78\x9cnot zlib at all").is_err());
        // A valid stream whose block is not a header block.
        let mut raw = Compress::new(Compression::default(), true);
        let _ = raw.set_dictionary(DICTIONARY);
        let mut out = Vec::with_capacity(64);
        raw.compress_vec(b"\xff\xff\xff\xff", &mut out, FlushCompress::Sync).unwrap();
        assert_eq!(HeaderCodec::new().decode(&out), Err(HeaderError::Malformed));
    }
}
