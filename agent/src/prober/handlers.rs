//! Probe handlers: `exec` through the runtime (killed at the timeout), `tcpSocket` and `httpGet` over a
//! connection opened inside the pod's network namespace (a short-lived thread joins it, connects and exits, so
//! no thread of the agent ever stays in a pod's namespace), and `grpc`: the standard health protocol
//! (`grpc.health.v1.Health/Check` over HTTP/2, hand-encoded: one string field in, one enum field out).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Outcome, Target, http1};
use crate::pods::services::ContainerRuntime;

/// Upstream keeps at most this much of a probe's output (exec) or body (httpGet).
const MAX_OUTPUT: usize = 10 * 1024;

/// Runs the probe once with `timeout`.
pub async fn run(
    probe: &Probe,
    c: &Container,
    id: &str,
    target: &Target,
    runtime: &Arc<dyn ContainerRuntime>,
    timeout: Duration,
) -> Outcome {
    if let Some(exec) = &probe.exec {
        let args = exec_command(exec.command.as_deref().unwrap_or_default(), c);
        return match runtime.exec_sync(id, &args, timeout).await {
            Ok((Some(0), _)) => Outcome::Success,
            Ok((Some(_), output)) => Outcome::Failure(text(&output)),
            Ok((None, _)) => Outcome::Failure(format!(
                "command timed out: {:?} timed out after {}s",
                args.join(" "),
                timeout.as_secs()
            )),
            Err(e) => Outcome::Failure(e.to_string()),
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let host = tcp.host.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| target.pod_ip.clone());
        let connected = async {
            let addrs = addresses(&host, port(&tcp.port, c)?).await?;
            dial(target, &addrs, timeout).await
        };
        // The name's lookup and the attempts together within the probe's timeout.
        return match tokio::time::timeout(timeout, connected).await {
            Ok(Ok(_)) => Outcome::Success,
            Ok(Err(e)) => Outcome::Failure(e),
            Err(_) => Outcome::Failure(format!("dial tcp {host}: i/o timeout")),
        };
    }
    if let Some(http) = &probe.http_get {
        return match tokio::time::timeout(timeout, http_get(http, c, target, timeout)).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Failure(format!(
                "Get \"{}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)",
                url(http, target, c).unwrap_or_default()
            )),
        };
    }
    if let Some(grpc) = &probe.grpc {
        let service = grpc.service.clone().unwrap_or_default();
        let port = match u16::try_from(grpc.port).ok().filter(|p| *p > 0) {
            Some(p) => p,
            None => return Outcome::Failure(format!("invalid port number: {}", grpc.port)),
        };
        let addr = match address(&target.pod_ip, port) {
            Ok(a) => a,
            Err(e) => return Outcome::Failure(e),
        };
        let tls = grpc.mode.as_deref() == Some("TLS");
        return match tokio::time::timeout(timeout, grpc_check(addr, &service, tls, target, timeout)).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Failure(format!("timeout: health rpc did not complete within {}s", timeout.as_secs())),
        };
    }
    Outcome::Failure("the probe has no handler".into())
}

/// An exec probe's command as upstream runs it: `$(VAR)` expanded from the container's `env` as written (a
/// `valueFrom` variable expands to nothing; `envFrom` and the image's variables not at all), `$$` a literal `$`.
fn exec_command(command: &[String], c: &Container) -> Vec<String> {
    let env: Vec<(String, String)> =
        c.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect();
    command.iter().map(|arg| crate::volumes::expand(arg, &env)).collect()
}

fn text(output: &[u8]) -> String {
    String::from_utf8_lossy(&output[..output.len().min(MAX_OUTPUT)]).into_owned()
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port(p: &IntOrString, c: &Container) -> Result<u16, String> {
    let number = match p {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => match name.parse::<i32>() {
            Ok(n) => n,
            Err(_) => c
                .ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .map(|cp| cp.container_port)
                .ok_or_else(|| format!("couldn't find port: {name:?} in container {:?}", c.name))?,
        },
    };
    u16::try_from(number).ok().filter(|n| *n > 0).ok_or_else(|| format!("invalid port number: {number}"))
}

/// A failed connection as Go's dialer words it (`dial tcp 10.0.0.2:80: connect: connection refused`), the text
/// users know from upstream's probe events.
fn dial_error(addr: SocketAddr, e: &std::io::Error) -> String {
    let cause = match e.raw_os_error() {
        Some(code) => {
            let text = nix::errno::Errno::from_raw(code).desc();
            let mut chars = text.chars();
            let first = chars.next().map(|c| c.to_ascii_lowercase()).into_iter();
            format!("connect: {}", first.chain(chars).collect::<String>())
        }
        None => e.to_string(),
    };
    format!("dial tcp {addr}: {cause}")
}

fn address(host: &str, port: u16) -> Result<SocketAddr, String> {
    let ip: std::net::IpAddr = host.parse().map_err(|_| format!("probe host {host:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

/// Where `host` is at `port`: an IP as it is; a name (`host: localhost`, a Service's DNS name) resolved on the node,
/// as upstream's kubelet resolves it, every address, IPv4 first (Go's dialer tries them in turn).
async fn addresses(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = address(host, port) {
        return Ok(vec![addr]);
    }
    let resolved = tokio::net::lookup_host((host, port)).await.map_err(|e| format!("dial tcp: lookup {host}: {e}"))?;
    let mut addrs: Vec<SocketAddr> = resolved.collect();
    addrs.sort_by_key(SocketAddr::is_ipv6);
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("dial tcp: lookup {host}: no such host"));
    }
    Ok(addrs)
}

/// A connection from the pod's network namespace to the first of `addrs` that accepts one; the last failure as
/// Go's dialer words it.
async fn dial(target: &Target, addrs: &[SocketAddr], timeout: Duration) -> Result<tokio::net::TcpStream, String> {
    let mut failure = String::from("dial tcp: no address");
    for addr in addrs {
        match crate::network::netns::connect(target.netns.clone(), *addr, timeout).await {
            Ok(stream) => return Ok(stream),
            Err(e) => failure = dial_error(*addr, &e),
        }
    }
    Err(failure)
}

pub(crate) fn url(
    http: &k8s_openapi::api::core::v1::HTTPGetAction,
    target: &Target,
    c: &Container,
) -> Result<String, String> {
    let scheme = http.scheme.as_deref().unwrap_or("HTTP").to_ascii_lowercase();
    let host = http.host.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| target.pod_ip.clone());
    let port = port(&http.port, c)?;
    let path = http.path.clone().unwrap_or_default();
    let path = if path.starts_with('/') { path } else { format!("/{path}") };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    Ok(format!("{scheme}://{host}:{port}{path}"))
}

/// An httpGet probe as upstream's prober: 200-299 succeed; a redirect that is not followed (see [`get`]) is a
/// success with a warning that quotes the body (up to 10 KiB); a failure's message never does (upstream's issue
/// 99425: a body may hold secrets). HTTPS is not verified.
pub(crate) async fn http_get(
    http: &k8s_openapi::api::core::v1::HTTPGetAction,
    c: &Container,
    target: &Target,
    timeout: Duration,
) -> Outcome {
    match get(http, c, target, timeout, "kube-probe/1.37").await {
        Ok((status, _)) if (200..300).contains(&status) => Outcome::Success,
        Ok((status, body)) if (300..400).contains(&status) => {
            Outcome::Warning(format!("Probe terminated redirects, Response body: {body}"))
        }
        Ok((status, _)) => Outcome::Failure(format!("HTTP probe failed with statuscode: {status}")),
        Err(e) => Outcome::Failure(e),
    }
}

/// A GET for an httpGet action (`user_agent`: `kube-probe/1.37`, or `kube-lifecycle/1.37` for a hook), with
/// redirects followed as Go's client with upstream's checker: 301, 302, 303, 307 and 308 to the same host name
/// (ports aside), up to 10 requests. Returns the last response's status and, for a redirect not followed (to
/// another host, a code Go does not follow, or without `Location`), its body; `Err`: no response (a message
/// as Go's, `Get "<url>": ...`).
pub(crate) async fn get(
    http: &k8s_openapi::api::core::v1::HTTPGetAction,
    c: &Container,
    target: &Target,
    timeout: Duration,
    user_agent: &str,
) -> Result<(u16, String), String> {
    let url = url(http, target, c)?;
    let mut current = url.clone();
    for _ in 0..10 {
        let (status, location, body) =
            request(&current, http, target, timeout, user_agent).await.map_err(|e| format!("Get {current:?}: {e}"))?;
        let followed = matches!(status, 301 | 302 | 303 | 307 | 308);
        match location.filter(|_| followed).map(|l| resolve(&current, &l)) {
            Some(next) if hostname_of(&next) == hostname_of(&url) => current = next,
            _ => return Ok((status, body)),
        }
    }
    Err(format!("Get {current:?}: stopped after 10 redirects"))
}

/// Go's message for a TLS handshake answered in plain HTTP (what a hook falls back to HTTP on).
pub(crate) const HTTP_RESPONSE_TO_HTTPS: &str = "http: server gave HTTP response to HTTPS client";

/// The host name of a URL (no port, no brackets).
fn hostname_of(url: &str) -> &str {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest.split('/').next().unwrap_or(rest));
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.split(':').next().unwrap_or(authority)
}

fn resolve(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let host = rest.split('/').next().unwrap_or(rest);
    if let Some(authority) = location.strip_prefix("//") {
        return format!("{scheme}://{authority}");
    }
    if location.starts_with('/') {
        format!("{scheme}://{host}{location}")
    } else {
        format!("{scheme}://{host}/{location}")
    }
}

/// One GET: (status, Location header, body up to 10 KiB for a redirect).
async fn request(
    url: &str,
    http: &k8s_openapi::api::core::v1::HTTPGetAction,
    target: &Target,
    timeout: Duration,
    user_agent: &str,
) -> Answer {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("no host")?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addrs = addresses(&host, port).await?;
    // `protocol: HTTP2` (alpha upstream, H2CContainerProbe): HTTP/2 with prior knowledge over plain TCP (h2c),
    // or negotiated as `h2` over TLS; a server that does not speak it fails the probe.
    let http2 = http.protocol.as_deref() == Some("HTTP2");
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = uri.authority().map_or(String::new(), |a| a.to_string());
    let own: Vec<(&str, &str)> =
        http.http_headers.iter().flatten().map(|h| (h.name.as_str(), h.value.as_str())).collect();
    let headers = http1::headers(&own, user_agent);
    let host_header = http1::host(&own, &authority);
    // Upstream's prober sends, over HTTP/1, `Connection: close` (its transport has keep-alives off), so the
    // server closes first. HTTP/2 carries the host as the request's authority.
    let head = if http2 { Vec::new() } else { http1::request(path, host_header, &headers)? };
    let mut stream = dial(target, &addrs, timeout).await?;
    let h2_request = || {
        let scheme = if https { "https" } else { "http" };
        let builder = hyper::Request::get(format!("{scheme}://{host_header}{path}"));
        headers
            .iter()
            .fold(builder, |b, (name, value)| b.header(*name, *value))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())
    };
    let answer = |r: http1::Response| (r.status, r.location, r.body);
    match (https, http2) {
        (false, false) => http1::exchange(&mut stream, &head).await.map(answer),
        (false, true) => exchange_h2(hyper_util::rt::TokioIo::new(stream), h2_request()?).await,
        (true, _) => {
            let mut stream = tls_connect(stream, &host, http2).await?;
            if !http2 {
                return http1::exchange(&mut stream, &head).await.map(answer);
            }
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err("the server did not negotiate HTTP/2 (h2)".into());
            }
            exchange_h2(hyper_util::rt::TokioIo::new(stream), h2_request()?).await
        }
    }
}

/// TLS over `stream`, the server's certificate not verified (as upstream's prober), offering `h2` (ALPN) when
/// `http2`. The two configurations are made once (each is a provider and a verifier: allocations a probe
/// need not repeat).
async fn tls_connect(
    stream: tokio::net::TcpStream,
    host: &str,
    http2: bool,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    static CONFIGS: std::sync::OnceLock<[Arc<rustls::ClientConfig>; 2]> = std::sync::OnceLock::new();
    let configs = CONFIGS.get_or_init(|| {
        let mut h2 = insecure_tls();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        [Arc::new(insecure_tls()), Arc::new(h2)]
    });
    let tls = tokio_rustls::TlsConnector::from(configs[usize::from(http2)].clone());
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    tls.connect(name, stream).await.map_err(|e| {
        // A server that answers in plain HTTP: its "HTTP/" is no TLS record's content type.
        let plain = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
            == Some(&rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType));
        if plain { HTTP_RESPONSE_TO_HTTPS.to_string() } else { e.to_string() }
    })
}

/// An exchange's result: (status, Location, body up to 10 KiB).
type Answer = Result<(u16, Option<String>, String), String>;

/// Sends `request` on a new HTTP/2 connection over `io` and reads the answer. The connection is driven in this
/// task, not a task of its own; it ends with the exchange.
async fn exchange_h2<T>(io: T, request: hyper::Request<http_body_util::Empty<bytes::Bytes>>) -> Answer
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .map_err(|e| e.to_string())?;
    let answer = async move { read_answer(sender.send_request(request).await.map_err(|e| e.to_string())?).await };
    while_driving(conn, answer).await
}

/// `answer`, with the connection `conn` driven meanwhile: its own end (or failure) only matters if it comes
/// first, in which case the answer says what went wrong.
async fn while_driving(conn: impl std::future::Future, answer: impl std::future::Future<Output = Answer>) -> Answer {
    tokio::pin!(conn);
    tokio::pin!(answer);
    tokio::select! {
        biased;
        result = &mut answer => result,
        _ = &mut conn => answer.await,
    }
}

async fn read_answer(response: hyper::Response<hyper::body::Incoming>) -> Answer {
    let status = response.status().as_u16();
    let location = response.headers().get(hyper::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut body = Vec::new();
    let mut incoming = response.into_body();
    while body.len() < MAX_OUTPUT {
        match incoming.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    body.extend_from_slice(data);
                }
            }
            _ => break,
        }
    }
    body.truncate(MAX_OUTPUT);
    Ok((status, location, String::from_utf8_lossy(&body).into_owned()))
}

/// `grpc.health.v1.Health/Check` for `service` at `addr` (plain HTTP/2, as upstream's prober).
async fn grpc_check(addr: SocketAddr, service: &str, tls: bool, target: &Target, timeout: Duration) -> Outcome {
    match grpc_status(addr, service, tls, target, timeout).await {
        Ok(1) => Outcome::Success,
        Ok(status) => {
            let name = match status {
                0 => "UNKNOWN",
                2 => "NOT_SERVING",
                3 => "SERVICE_UNKNOWN",
                _ => "UNKNOWN",
            };
            Outcome::Failure(format!("service unhealthy (responded with {name:?})"))
        }
        Err(e) => Outcome::Failure(e),
    }
}

/// The serving status the health service answers (1: SERVING).
async fn grpc_status(
    addr: SocketAddr,
    service: &str,
    tls: bool,
    target: &Target,
    timeout: Duration,
) -> Result<u64, String> {
    let stream = crate::network::netns::connect(target.netns.clone(), addr, timeout)
        .await
        .map_err(|e| format!("failed to connect service {addr:?} within {}s: {e}", timeout.as_secs()))?;
    async fn h2<T>(io: T) -> Result<hyper::client::conn::http2::SendRequest<Full<bytes::Bytes>>, String>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let executor = hyper_util::rt::TokioExecutor::new();
        let (sender, conn) = hyper::client::conn::http2::handshake(executor, io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(sender)
    }
    let mut sender = if tls {
        // `mode: TLS` (alpha upstream, GRPCContainerProbeTLS): h2 over TLS, the certificate not verified.
        h2(hyper_util::rt::TokioIo::new(tls_connect(stream, &addr.ip().to_string(), true).await?)).await?
    } else {
        h2(hyper_util::rt::TokioIo::new(stream)).await?
    };
    let scheme = if tls { "https" } else { "http" };
    let request = hyper::Request::post(format!("{scheme}://{addr}/grpc.health.v1.Health/Check"))
        .header(hyper::header::CONTENT_TYPE, "application/grpc")
        .header(hyper::header::TE, "trailers")
        .header(hyper::header::USER_AGENT, "kube-probe/1.37")
        .body(Full::new(bytes::Bytes::from(grpc_frame(&health_request(service)))))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let mut body = response.into_body();
    let mut message = Vec::new();
    let mut grpc_status: Option<(String, String)> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            if message.len() + data.len() > MAX_OUTPUT {
                return Err("health rpc answer too large".into());
            }
            message.extend_from_slice(data);
        } else if let Some(trailers) = frame.trailers_ref() {
            let get = |k: &str| trailers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            grpc_status = Some((get("grpc-status"), get("grpc-message")));
        }
    }
    if let Some((code, desc)) = grpc_status.filter(|(code, _)| code != "0") {
        return Err(format!("rpc error: code = {code} desc = {desc}"));
    }
    // One length-prefixed message: HealthCheckResponse { status (field 1, varint) }.
    let payload = message.get(5..).ok_or("health rpc: no answer")?;
    health_response(payload).ok_or_else(|| "health rpc: an answer that does not parse".to_string())
}

/// HealthCheckRequest { string service = 1; } in protobuf.
fn health_request(service: &str) -> Vec<u8> {
    if service.is_empty() {
        return Vec::new();
    }
    let mut out = vec![0x0a];
    varint(service.len() as u64, &mut out);
    out.extend_from_slice(service.as_bytes());
    out
}

/// The status (field 1) of a HealthCheckResponse; a missing field is 0 (UNKNOWN).
fn health_response(mut b: &[u8]) -> Option<u64> {
    let mut status = 0;
    while let Some((&key, rest)) = b.split_first() {
        b = rest;
        match key & 7 {
            0 => {
                let (v, rest) = read_varint(b)?;
                b = rest;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            2 => {
                let (len, rest) = read_varint(b)?;
                b = rest.get(usize::try_from(len).ok()?..)?;
            }
            _ => return None,
        }
    }
    Some(status)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(u8::try_from(v & 0x7f).unwrap_or(0) | 0x80);
        v >>= 7;
    }
    out.push(u8::try_from(v).unwrap_or(0x7f));
}

fn read_varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
}

/// A gRPC message: uncompressed flag, big-endian length, the message.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// TLS that accepts any server certificate (upstream's prober does not verify either).
fn insecure_tls() -> rustls::ClientConfig {
    #[derive(Debug)]
    struct AcceptAll(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AcceptAll {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map(|b| b.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAll(provider))).with_no_client_auth())
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAll(Arc::new(
                    rustls::crypto::aws_lc_rs::default_provider(),
                ))))
                .with_no_client_auth()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> Container {
        serde_json::from_value(serde_json::json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}))
            .unwrap()
    }

    #[test]
    fn ports_by_number_or_name() {
        let c = container();
        assert_eq!(port(&IntOrString::Int(80), &c), Ok(80));
        assert_eq!(port(&IntOrString::String("http".into()), &c), Ok(8080));
        assert_eq!(port(&IntOrString::String("81".into()), &c), Ok(81));
        assert!(port(&IntOrString::String("nope".into()), &c).unwrap_err().contains("couldn't find port"));
        assert!(port(&IntOrString::Int(0), &c).is_err());
    }

    #[test]
    fn exec_commands_expand_the_static_env_as_upstream() {
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c", "env": [
            {"name": "PORT", "value": "8080"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "PORT", "value": "9090"},
        ]}))
        .unwrap();
        let command = ["sh", "-c", "wget -q localhost:$(PORT)/$(POD)x $(NONE) $$(PORT)"].map(String::from);
        assert_eq!(exec_command(&command, &c), ["sh", "-c", "wget -q localhost:9090/x $(NONE) $(PORT)"]);
    }

    #[test]
    fn urls_and_redirects() {
        let target = Target { netns: None, pod_ip: "10.1.2.3".into() };
        let http: k8s_openapi::api::core::v1::HTTPGetAction =
            serde_json::from_value(serde_json::json!({"port": "http", "path": "healthz"})).unwrap();
        assert_eq!(url(&http, &target, &container()).unwrap(), "http://10.1.2.3:8080/healthz");
        assert_eq!(resolve("http://10.1.2.3:8080/a", "/b"), "http://10.1.2.3:8080/b");
        assert_eq!(hostname_of("http://10.1.2.3:8080/b"), "10.1.2.3");
        assert_eq!(hostname_of("https://[fd00::1]:443/"), "fd00::1");
        assert_eq!(hostname_of("http://user@example.com"), "example.com");
        assert_eq!(resolve("http://h:1/a", "//other:2/x"), "http://other:2/x");
        assert_eq!(resolve("http://h:1/a", "https://other/x"), "https://other/x");
    }

    #[test]
    fn health_messages_encode_and_decode() {
        assert_eq!(health_request(""), Vec::<u8>::new());
        assert_eq!(health_request("db"), vec![0x0a, 2, b'd', b'b']);
        assert_eq!(health_response(&[0x08, 0x01]), Some(1));
        assert_eq!(health_response(&[]), Some(0));
        assert_eq!(health_response(&[0x12, 0x01, 0xff, 0x08, 0x02]), Some(2), "unknown fields are skipped");
        assert_eq!(health_response(&[0x08]), None, "truncated");
        assert_eq!(health_response(&[0x0b]), None, "a wire type it does not know");
        assert_eq!(grpc_frame(&[0x08, 0x01]), vec![0, 0, 0, 0, 2, 0x08, 0x01]);
        let mut long = Vec::new();
        varint(300, &mut long);
        assert_eq!(read_varint(&long), Some((300, &[][..])));
    }

    /// An HTTP/2 server on 127.0.0.1 (prior knowledge, or `h2` over TLS with a self-signed certificate): gRPC's
    /// health service for POSTs, 200 "ok" for GETs. Returns its port.
    async fn h2_server(tls: bool) -> u16 {
        use http_body_util::StreamBody;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tls.then(|| {
            let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
            let der = rustls::pki_types::PrivateKeyDer::try_from(key.signing_key.serialize_der()).unwrap();
            let mut config =
                rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(vec![key.cert.der().clone()], der)
                    .unwrap();
            config.alpn_protocols = vec![b"h2".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { return };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        if req.method() == hyper::Method::GET {
                            let ok = Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                bytes::Bytes::from_static(b"ok"),
                            ));
                            return Ok::<_, std::convert::Infallible>(hyper::Response::new(StreamBody::new(
                                futures_util::stream::iter(vec![ok]),
                            )));
                        }
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        // The service name decides the answer: "" serving, "down" not serving, else an error.
                        let name = body.get(7..).map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                        let (status, code) = match name.as_str() {
                            "" => (1u8, "0"),
                            "down" => (2, "0"),
                            _ => (0, "5"),
                        };
                        let mut trailers = hyper::HeaderMap::new();
                        trailers.insert("grpc-status", code.parse().unwrap());
                        let data = bytes::Bytes::from(grpc_frame(&[0x08, status]));
                        let frames = if code == "0" {
                            vec![
                                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(data)),
                                Ok(hyper::body::Frame::trailers(trailers)),
                            ]
                        } else {
                            vec![Ok(hyper::body::Frame::trailers(trailers))]
                        };
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(StreamBody::new(
                            futures_util::stream::iter(frames),
                        )))
                    });
                    let server = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                    let _ = match acceptor {
                        Some(acceptor) => match acceptor.accept(s).await {
                            Ok(s) => server.serve_connection(hyper_util::rt::TokioIo::new(s), service).await,
                            Err(_) => return,
                        },
                        None => server.serve_connection(hyper_util::rt::TokioIo::new(s), service).await,
                    };
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn grpc_probes_against_a_local_health_server() {
        let port = h2_server(false).await;
        let target = Target { netns: None, pod_ip: "127.0.0.1".into() };
        let c = container();
        let runtime: Arc<dyn ContainerRuntime> = Arc::new(crate::pods::services::fake::FakeRuntime::default());
        let t = Duration::from_secs(2);
        let probe = |service: &str| -> Probe {
            serde_json::from_value(serde_json::json!({"grpc": {"port": port, "service": service}})).unwrap()
        };
        assert_eq!(run(&probe(""), &c, "id", &target, &runtime, t).await, Outcome::Success);
        assert_eq!(
            run(&probe("down"), &c, "id", &target, &runtime, t).await,
            Outcome::Failure("service unhealthy (responded with \"NOT_SERVING\")".into())
        );
        assert!(
            matches!(run(&probe("gone"), &c, "id", &target, &runtime, t).await, Outcome::Failure(m) if m.contains("code = 5"))
        );
    }

    /// The alpha probe modes (`grpc.mode: TLS`, `httpGet.protocol: HTTP2`): each reaches a server that speaks
    /// it, and fails against one that does not, as upstream's e2e tests expect.
    #[tokio::test]
    async fn http2_and_tls_grpc_probes() {
        let (plain, tls) = (h2_server(false).await, h2_server(true).await);
        let target = Target { netns: None, pod_ip: "127.0.0.1".into() };
        let c = container();
        let runtime: Arc<dyn ContainerRuntime> = Arc::new(crate::pods::services::fake::FakeRuntime::default());
        let t = Duration::from_secs(2);
        let probe = |json: serde_json::Value| -> Probe { serde_json::from_value(json).unwrap() };
        let grpc_tls = probe(serde_json::json!({"grpc": {"port": tls, "mode": "TLS"}}));
        assert_eq!(run(&grpc_tls, &c, "id", &target, &runtime, t).await, Outcome::Success);
        let grpc_plain_to_tls = probe(serde_json::json!({"grpc": {"port": tls}}));
        assert!(matches!(run(&grpc_plain_to_tls, &c, "id", &target, &runtime, t).await, Outcome::Failure(_)));
        let grpc_tls_to_plain = probe(serde_json::json!({"grpc": {"port": plain, "mode": "TLS"}}));
        assert!(matches!(run(&grpc_tls_to_plain, &c, "id", &target, &runtime, t).await, Outcome::Failure(_)));
        let h2c = probe(serde_json::json!({"httpGet": {"port": plain, "path": "/", "protocol": "HTTP2"}}));
        assert_eq!(run(&h2c, &c, "id", &target, &runtime, t).await, Outcome::Success);
        let h2 = probe(serde_json::json!({"httpGet": {"port": tls, "scheme": "HTTPS", "protocol": "HTTP2"}}));
        assert_eq!(run(&h2, &c, "id", &target, &runtime, t).await, Outcome::Success);
        // HTTP/1.1 to an HTTP/2-only server fails, as the other way round (below).
        let http1 = probe(serde_json::json!({"httpGet": {"port": plain, "path": "/"}}));
        assert!(matches!(run(&http1, &c, "id", &target, &runtime, t).await, Outcome::Failure(_)));
    }

    #[tokio::test]
    async fn http_and_tcp_probes_against_a_local_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                    // Upstream's three headers (and Host), nothing else.
                    let mut names: Vec<String> = head
                        .lines()
                        .skip(1)
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| format!("{}={}", k.to_ascii_lowercase(), v.trim()))
                        .collect();
                    names.sort();
                    let reply = if head.starts_with("GET /headers ") {
                        let expected =
                            format!("accept=*/*,connection=close,host=127.0.0.1:{port},user-agent=kube-probe/1.37");
                        let got = names.join(",");
                        let code = if got == expected { "200 OK" } else { "500 Internal Server Error" };
                        format!("HTTP/1.1 {code}\r\ncontent-length: {}\r\n\r\n{got}", got.len())
                    } else if head.starts_with("GET /ok ") {
                        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string()
                    } else if head.starts_with("GET /moved ") {
                        "HTTP/1.1 302 Found\r\nlocation: /ok\r\ncontent-length: 0\r\n\r\n".to_string()
                    } else if head.starts_with("GET /away ") {
                        "HTTP/1.1 302 Found\r\nlocation: http://10.255.255.1/x\r\ncontent-length: 4\r\n\r\naway"
                            .to_string()
                    } else {
                        "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nboom".to_string()
                    };
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        let target = Target { netns: None, pod_ip: "127.0.0.1".into() };
        let c = container();
        let runtime: Arc<dyn ContainerRuntime> = Arc::new(crate::pods::services::fake::FakeRuntime::default());
        let probe = |json: serde_json::Value| -> Probe { serde_json::from_value(json).unwrap() };
        let t = Duration::from_secs(2);
        let ok = probe(serde_json::json!({"httpGet": {"port": port, "path": "/ok"}}));
        assert_eq!(run(&ok, &c, "id", &target, &runtime, t).await, Outcome::Success);
        let headers = probe(serde_json::json!({"httpGet": {"port": port, "path": "/headers"}}));
        assert_eq!(run(&headers, &c, "id", &target, &runtime, t).await, Outcome::Success);
        let h2c = probe(serde_json::json!({"httpGet": {"port": port, "path": "/ok", "protocol": "HTTP2"}}));
        assert!(matches!(run(&h2c, &c, "id", &target, &runtime, t).await, Outcome::Failure(_)), "HTTP/2 to HTTP/1.1");
        let moved = probe(serde_json::json!({"httpGet": {"port": port, "path": "/moved"}}));
        assert_eq!(run(&moved, &c, "id", &target, &runtime, t).await, Outcome::Success);
        let away = probe(serde_json::json!({"httpGet": {"port": port, "path": "/away"}}));
        assert_eq!(
            run(&away, &c, "id", &target, &runtime, t).await,
            Outcome::Warning("Probe terminated redirects, Response body: away".into())
        );
        let bad = probe(serde_json::json!({"httpGet": {"port": port, "path": "/bad"}}));
        assert_eq!(
            run(&bad, &c, "id", &target, &runtime, t).await,
            Outcome::Failure("HTTP probe failed with statuscode: 500".into())
        );
        let tcp = probe(serde_json::json!({"tcpSocket": {"port": port}}));
        assert_eq!(run(&tcp, &c, "id", &target, &runtime, t).await, Outcome::Success);
        // A host name is resolved on the node (every address tried: localhost may be ::1 first, and the server
        // listens on IPv4 only); an empty host is the pod's IP.
        let named = probe(serde_json::json!({"tcpSocket": {"port": port, "host": "localhost"}}));
        assert_eq!(run(&named, &c, "id", &target, &runtime, t).await, Outcome::Success);
        let empty = probe(serde_json::json!({"tcpSocket": {"port": port, "host": ""}}));
        assert_eq!(run(&empty, &c, "id", &target, &runtime, t).await, Outcome::Success);
        let named = probe(serde_json::json!({"httpGet": {"port": port, "path": "/ok", "host": "localhost"}}));
        assert_eq!(run(&named, &c, "id", &target, &runtime, t).await, Outcome::Success);
        let unknown = probe(serde_json::json!({"tcpSocket": {"port": port, "host": "no-such-host.invalid"}}));
        assert!(
            matches!(run(&unknown, &c, "id", &target, &runtime, t).await, Outcome::Failure(m) if m.starts_with("dial tcp: lookup no-such-host.invalid"))
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let refused = probe(serde_json::json!({"tcpSocket": {"port": closed}}));
        assert_eq!(
            run(&refused, &c, "id", &target, &runtime, t).await,
            Outcome::Failure(format!("dial tcp 127.0.0.1:{closed}: connect: connection refused"))
        );
    }
}
