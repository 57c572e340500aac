//! The HTTP/1.1 exchange of an httpGet probe or hook: one GET on a new connection with `Connection: close`, as
//! upstream's prober (its transport has keep-alives off), written over `httparse` rather than hyper's client.
//! At hundreds of probes a second hyper's connection machinery (a handshake, a dispatcher, a header map and a
//! body stream per probe) was a tenth of the agent's CPU; a probe needs one request written and one response
//! head read. HTTP/2 (`protocol: HTTP2`, gRPC) stays on hyper.
//!
//! Threat model: the server is the pod's, so its answer is untrusted. The head is read into a buffer of at most
//! [`MAX_HEAD`] bytes; a body is read only when the caller needs it (a redirect's warning) and only up to
//! [`MAX_BODY`], whatever its framing claims; a malformed head, a chunk size that does not parse or an early
//! end are errors (the probe fails), never a panic. The caller bounds the whole exchange with the probe's
//! timeout. The request carries the probe's own headers: one with a CR, LF or NUL in it is refused (it would
//! split the request), as Go's client refuses it.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest response head read (Go's `http.Transport` default `MaxResponseHeaderBytes` is 1 MiB; a probe's server
/// answers with a few hundred bytes).
pub const MAX_HEAD: usize = 64 * 1024;
/// Upstream reads at most this much of a probe's body.
pub const MAX_BODY: usize = 10 * 1024;
/// Interim (1xx) responses skipped before the final one (Go's client allows 5).
const MAX_INTERIM: usize = 5;

/// The headers of a probe's GET besides `Host` and `Connection`, by upstream's rules: `User-Agent` (`user_agent`,
/// `kube-probe/1.37` or `kube-lifecycle/1.37`) and `Accept: */*` unless the probe sets its own (an empty one is
/// left out), then the probe's other headers in order, less those Go never sends from a request's headers.
pub fn headers<'a>(own: &[(&'a str, &'a str)], user_agent: &'a str) -> Vec<(&'a str, &'a str)> {
    let named = |name: &str| own.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v);
    let mut out = Vec::with_capacity(own.len() + 2);
    let user_agent = named("User-Agent").unwrap_or(user_agent);
    if !user_agent.is_empty() {
        out.push(("User-Agent", user_agent));
    }
    let accept = named("Accept");
    if accept.is_none() {
        out.push(("Accept", "*/*"));
    }
    const NOT_SENT: [&str; 5] = ["Host", "User-Agent", "Content-Length", "Transfer-Encoding", "Trailer"];
    for &(name, value) in own {
        let skipped = NOT_SENT.iter().any(|n| n.eq_ignore_ascii_case(name))
            || (accept == Some("") && name.eq_ignore_ascii_case("Accept"));
        if !skipped {
            out.push((name, value));
        }
    }
    out
}

/// The `Host` of a probe's GET: the probe's own `Host` header, else the URL's authority.
pub fn host<'a>(own: &[(&'a str, &'a str)], authority: &'a str) -> &'a str {
    own.iter().find(|(n, _)| n.eq_ignore_ascii_case("Host")).map_or(authority, |(_, v)| *v)
}

/// The request head of a probe's GET for `path`: `Host`, the [`headers`], and `Connection: close`.
pub fn request(path: &str, host: &str, headers: &[(&str, &str)]) -> Result<Vec<u8>, String> {
    if path.is_empty() || path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(format!("invalid request path {path:?}"));
    }
    let mut out = format!("GET {path} HTTP/1.1\r\n").into_bytes();
    let lines = std::iter::once(("Host", host)).chain(headers.iter().copied()).chain([("Connection", "close")]);
    for (name, value) in lines {
        if let Some(bad) = [name, value].iter().find(|s| s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))) {
            return Err(format!("net/http: invalid header field {bad:?}"));
        }
        if name.is_empty() || name.bytes().any(|b| b == b':' || b.is_ascii_whitespace()) {
            return Err(format!("net/http: invalid header field name {name:?}"));
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// A response: status, `Location`, and the body (up to [`MAX_BODY`], read only for a redirect: the warning
/// quotes it; a failure's message must not, upstream's issue 99425).
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
}

/// Writes `request` and reads the response on `io`.
pub async fn exchange<T: AsyncRead + AsyncWrite + Unpin>(io: &mut T, request: &[u8]) -> Result<Response, String> {
    io.write_all(request).await.map_err(|e| e.to_string())?;
    io.flush().await.map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(1024);
    for _ in 0..=MAX_INTERIM {
        let head = read_head(io, &mut buf).await?;
        if (100..200).contains(&head.status) && head.status != 101 {
            buf.drain(..head.len);
            continue;
        }
        let body = if (300..400).contains(&head.status) {
            let already = buf.split_off(head.len);
            read_body(io, already, head.framing).await?
        } else {
            String::new()
        };
        return Ok(Response { status: head.status, location: head.location, body });
    }
    Err("net/http: too many 1xx informational responses".into())
}

/// How a body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the server closes (HTTP/1.1 without a length: the connection is closed after it).
    Close,
    None,
}

#[derive(Debug)]
struct Head {
    /// Bytes of `buf` the head took.
    len: usize,
    status: u16,
    location: Option<String>,
    framing: Framing,
}

/// Reads until `buf` holds a whole response head, and parses it.
async fn read_head<T: AsyncRead + Unpin>(io: &mut T, buf: &mut Vec<u8>) -> Result<Head, String> {
    loop {
        if let Some(head) = parse_head(buf)? {
            return Ok(head);
        }
        if buf.len() >= MAX_HEAD {
            return Err(format!("net/http: server response headers exceeded {MAX_HEAD} bytes; aborted"));
        }
        let had = buf.len();
        match read_more(io, buf, (MAX_HEAD - had).min(4096)).await? {
            0 if had == 0 => return Err("EOF".into()),
            0 => return Err("unexpected EOF".into()),
            _ => {}
        }
    }
}

/// Reads at most `max` more bytes onto the end of `buf`; how many came (0: the server closed).
async fn read_more<T: AsyncRead + Unpin>(io: &mut T, buf: &mut Vec<u8>, max: usize) -> Result<usize, String> {
    let start = buf.len();
    buf.resize(start + max, 0);
    let n = io.read(&mut buf[start..]).await.map_err(|e| e.to_string());
    buf.truncate(start + *n.as_ref().unwrap_or(&0));
    n
}

/// The head at the start of `buf`, `None` if it is not whole yet.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            let start = String::from_utf8_lossy(&buf[..buf.len().min(40)]).into_owned();
            return Err(format!(
                "net/http: HTTP/1.x transport connection broken: malformed HTTP response {start:?}: {e}"
            ));
        }
    };
    let status = response.code.ok_or("malformed HTTP response: no status")?;
    let value = |name: &str| {
        response.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value))
    };
    let location = value("Location").map(|v| v.trim().to_string());
    let chunked = value("Transfer-Encoding")
        .is_some_and(|v| v.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked")));
    let framing = if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(length) = value("Content-Length") {
        Framing::Length(length.trim().parse().map_err(|_| format!("bad Content-Length {length:?}"))?)
    } else {
        Framing::Close
    };
    Ok(Some(Head { len, status, location, framing }))
}

/// The body, up to [`MAX_BODY`] bytes (`already`: what came with the head).
async fn read_body<T: AsyncRead + Unpin>(io: &mut T, already: Vec<u8>, framing: Framing) -> Result<String, String> {
    let limit = match framing {
        Framing::Chunked => {
            return read_chunked(io, already).await.map(|b| String::from_utf8_lossy(&b).into_owned());
        }
        Framing::None => 0,
        Framing::Length(n) => usize::try_from(n).unwrap_or(usize::MAX).min(MAX_BODY),
        Framing::Close => MAX_BODY,
    };
    let mut body = already;
    body.truncate(limit);
    while body.len() < limit {
        let left = limit - body.len();
        if read_more(io, &mut body, left).await? == 0 {
            if matches!(framing, Framing::Length(_)) {
                return Err("unexpected EOF".into());
            }
            break;
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A chunked body's data, up to [`MAX_BODY`] bytes (what follows is not read).
async fn read_chunked<T: AsyncRead + Unpin>(io: &mut T, mut raw: Vec<u8>) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        match decode_chunk(&raw[at..]) {
            Chunk::Data { start, len, next } => {
                let data = &raw[at + start..at + start + len];
                body.extend_from_slice(&data[..data.len().min(MAX_BODY - body.len())]);
                at += next;
                if body.len() >= MAX_BODY {
                    return Ok(body);
                }
            }
            Chunk::Last => return Ok(body),
            Chunk::Bad => return Err("malformed chunked encoding".into()),
            Chunk::Partial => {
                // Only the bytes not yet decoded are kept; a chunk is read whole, up to a bound.
                raw.drain(..at);
                at = 0;
                if raw.len() > MAX_BODY + 4096 {
                    // A chunk larger than the body we keep: what we have of it is enough.
                    let data_from = raw.iter().position(|b| *b == b'\n').map_or(raw.len(), |i| i + 1);
                    let rest = MAX_BODY - body.len();
                    body.extend_from_slice(&raw[data_from..][..rest.min(raw.len() - data_from)]);
                    return Ok(body);
                }
                if read_more(io, &mut raw, 4096).await? == 0 {
                    return Err("unexpected EOF".into());
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// Data at `start..start + len` of the input; the next chunk at `next`.
    Data {
        start: usize,
        len: usize,
        next: usize,
    },
    /// The last chunk (size 0).
    Last,
    /// More input needed.
    Partial,
    Bad,
}

/// The chunk at the start of `b`.
fn decode_chunk(b: &[u8]) -> Chunk {
    let Some(eol) = b.iter().position(|c| *c == b'\n') else {
        return if b.len() > 1024 { Chunk::Bad } else { Chunk::Partial };
    };
    let line = String::from_utf8_lossy(&b[..eol]);
    let size = line.trim_end_matches('\r').split(';').next().unwrap_or_default().trim();
    let Ok(len) = usize::from_str_radix(size, 16) else { return Chunk::Bad };
    if len == 0 {
        return Chunk::Last;
    }
    let start = eol + 1;
    let Some((end, after)) = start.checked_add(len).and_then(|end| Some((end, end.checked_add(2)?))) else {
        return Chunk::Bad;
    };
    // The data and its CRLF.
    match b.get(end..after) {
        Some(b"\r\n") => Chunk::Data { start, len, next: after },
        Some(_) => Chunk::Bad,
        None => Chunk::Partial,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(path: &str, authority: &str, own: &[(&str, &str)]) -> Result<String, String> {
        request(path, host(own, authority), &headers(own, "kube-probe/1.37")).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn upstream_headers_unless_the_probe_sets_its_own() {
        assert_eq!(
            head("/healthz", "10.0.0.2:8080", &[]).unwrap(),
            "GET /healthz HTTP/1.1\r\nHost: 10.0.0.2:8080\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\n\
             Connection: close\r\n\r\n"
        );
        let own = [("host", "example.com"), ("user-agent", "mine"), ("X-Probe", "1"), ("accept", "text/plain")];
        assert_eq!(
            head("/", "10.0.0.2:80", &own).unwrap(),
            "GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: mine\r\nX-Probe: 1\r\naccept: text/plain\r\n\
             Connection: close\r\n\r\n"
        );
        // An empty Accept is left out; an empty User-Agent too.
        assert_eq!(
            head("/", "h:1", &[("Accept", ""), ("User-Agent", "")]).unwrap(),
            "GET / HTTP/1.1\r\nHost: h:1\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(headers(&[], "kube-lifecycle/1.37")[0], ("User-Agent", "kube-lifecycle/1.37"));
    }

    #[test]
    fn a_header_that_would_split_the_request_is_refused() {
        for bad in [("X-A", "1\r\nX-Injected: 2"), ("X-A\n", "1"), ("X A", "1"), ("", "1"), ("X-A", "a\0b")] {
            assert!(head("/", "h:1", &[bad]).is_err(), "{bad:?}");
        }
        assert!(head("/", "h:1\r\nX: y", &[]).is_err(), "an authority");
        assert!(head("/a b", "h:1", &[]).is_err());
        assert!(head("/a\r\n", "h:1", &[]).is_err());
    }

    /// Runs `exchange` against a server that answers `answer` (in pieces of `piece` bytes) and returns what it
    /// got and what the server read.
    async fn against(answer: &[u8], piece: usize) -> (Result<Response, String>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let answer = answer.to_vec();
        let served = tokio::spawn(async move {
            let mut got = vec![0u8; 4096];
            let n = server.read(&mut got).await.unwrap();
            got.truncate(n);
            for part in answer.chunks(piece.max(1)) {
                if server.write_all(part).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            got
        });
        let result = exchange(&mut client, b"GET / HTTP/1.1\r\n\r\n").await;
        drop(client);
        (result, served.await.unwrap())
    }

    #[tokio::test]
    async fn statuses_locations_and_bodies() {
        for piece in [1, 7, 4096] {
            let (r, got) = against(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", piece).await;
            assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
            assert_eq!(r.unwrap(), Response { status: 200, location: None, body: String::new() }, "{piece}");
            // A redirect's body is read: by length, chunked, or until the server closes.
            let (r, _) =
                against(b"HTTP/1.1 302 Found\r\nLocation: /new\r\nContent-Length: 5\r\n\r\nmoved", piece).await;
            assert_eq!(r.unwrap(), Response { status: 302, location: Some("/new".into()), body: "moved".into() });
            let chunked = b"HTTP/1.1 301 Moved\r\nTransfer-Encoding: chunked\r\nLocation: http://x/\r\n\r\n\
                            3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n";
            let (r, _) = against(chunked, piece).await;
            assert_eq!(r.unwrap().body, "abcde", "{piece}");
            let (r, _) = against(b"HTTP/1.1 300 Choices\r\n\r\nuntil close", piece).await;
            assert_eq!(r.unwrap().body, "until close");
            // Interim responses are skipped.
            let (r, _) = against(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\n\r\n", piece).await;
            assert_eq!(r.unwrap().status, 503);
        }
    }

    #[tokio::test]
    async fn bodies_are_bounded_whatever_the_framing_claims() {
        let mut big = b"HTTP/1.1 307 Temp\r\nContent-Length: 1000000\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', 100_000));
        let (r, _) = against(&big, 4096).await;
        assert_eq!(r.unwrap().body.len(), MAX_BODY);
        let mut chunk = b"HTTP/1.1 307 Temp\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n".to_vec();
        chunk.extend(std::iter::repeat_n(b'y', 50_000));
        let (r, _) = against(&chunk, 4096).await;
        assert_eq!(r.unwrap().body, "y".repeat(MAX_BODY));
        // A head that never ends is refused at the bound.
        let mut endless = b"HTTP/1.1 200 OK\r\nX-Pad: ".to_vec();
        endless.extend(std::iter::repeat_n(b'a', 100_000));
        let (r, _) = against(&endless, 4096).await;
        assert!(r.unwrap_err().contains("exceeded"));
        // So is one with more headers than the parser keeps.
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        many.extend(std::iter::repeat_n(b"X-Pad: 0123456789\r\n".to_vec(), 1_000).flatten());
        let (r, _) = against(&many, 4096).await;
        assert!(r.unwrap_err().contains("malformed HTTP response"));
    }

    #[tokio::test]
    async fn broken_answers_are_errors() {
        for (answer, wanted) in [
            (&b""[..], "EOF"),
            (b"HTTP/1.1 200 OK\r\nContent-", "unexpected EOF"),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed HTTP response"),
            (b"HTTP/1.1 302 Found\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
            (b"HTTP/1.1 302 Found\r\nContent-Length: 10\r\n\r\nshort", "unexpected EOF"),
            (b"HTTP/1.1 302 Found\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunked"),
            (b"HTTP/1.1 302 Found\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "unexpected EOF"),
        ] {
            let (r, _) = against(answer, 3).await;
            let e = r.unwrap_err();
            assert!(e.contains(wanted), "{:?}: {e}", String::from_utf8_lossy(answer));
        }
        let six_interim = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(6);
        let (r, _) = against(&six_interim, 4096).await;
        assert!(r.unwrap_err().contains("1xx"));
    }

    #[test]
    fn chunks_decode_or_are_refused() {
        assert_eq!(decode_chunk(b"3\r\nabc\r\n"), Chunk::Data { start: 3, len: 3, next: 8 });
        assert_eq!(decode_chunk(b"3\r\nab"), Chunk::Partial);
        assert_eq!(decode_chunk(b"3"), Chunk::Partial);
        assert_eq!(decode_chunk(b"0\r\n\r\n"), Chunk::Last);
        assert_eq!(decode_chunk(b"3\r\nabcXY"), Chunk::Bad);
        assert_eq!(decode_chunk(b"ffffffffffffffffff\r\n"), Chunk::Bad);
        assert_eq!(decode_chunk(b"-1\r\n"), Chunk::Bad);
        assert_eq!(decode_chunk(&[b'1'; 2000]), Chunk::Bad);
    }
}
