//! remotecommand: what `exec` and `attach` requests ask for and what they answer, independent of the transport
//! (SPDY streams or WebSocket channels). The transports turn their streams into a [`Session`] of channels; the
//! exec and attach code drives a process with it and returns an [`Outcome`], which the transport reports as
//! upstream does (v4+: a `Status` JSON on the error stream; older protocols: the message as text, nothing on
//! success).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The SPDY subprotocols for exec and attach, preferred first (upstream's `SupportedStreamingProtocols`).
pub const SPDY_PROTOCOLS: [&str; 4] = ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"];

/// What streams a request asks for (`input`, `output`, `error`, `tty` set to `1`, as the API server sends them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl Options {
    /// Upstream's `NewOptions`: a TTY has no separate stderr; at least one stream is needed.
    pub fn from_query(query: Option<&str>) -> Result<Options, String> {
        let mut o = Options::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let on = value == "1";
            match key.as_ref() {
                "input" => o.stdin = on,
                "output" => o.stdout = on,
                "error" => o.stderr = on,
                "tty" => o.tty = on,
                _ => {}
            }
        }
        if o.tty && o.stderr {
            o.stderr = false;
        }
        if !o.stdin && !o.stdout && !o.stderr {
            return Err("you must specify at least 1 of stdin, stdout, stderr".into());
        }
        Ok(o)
    }
}

/// The `command` parameters, in order.
pub fn command(query: Option<&str>) -> Vec<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// A terminal size as the resize stream carries it (JSON objects, one after another).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Parses the resize stream's bytes as they arrive: complete JSON objects come out, a partial one waits.
#[derive(Default)]
pub struct ResizeDecoder {
    pending: Vec<u8>,
}

impl ResizeDecoder {
    /// The most a single size message may take; more without a complete object ends the stream.
    const MAX_PENDING: usize = 4096;

    /// Feeds `data`; returns the sizes completed, or an error on a malformed stream.
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<TerminalSize>, String> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::new();
        let mut stream = serde_json::Deserializer::from_slice(&self.pending).into_iter::<TerminalSize>();
        let mut used = 0;
        loop {
            match stream.next() {
                Some(Ok(size)) => {
                    out.push(size);
                    used = stream.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => return Err(format!("bad terminal size: {e}")),
                None => break,
            }
        }
        self.pending.drain(..used);
        let blank = self.pending.iter().take_while(|b| b.is_ascii_whitespace()).count();
        self.pending.drain(..blank);
        if self.pending.len() > Self::MAX_PENDING {
            return Err("terminal size message too long".into());
        }
        Ok(out)
    }
}

/// A request's streams, as channels. `None` where the request did not ask for that stream.
pub struct Session {
    /// Client -> process; ends when the client closes stdin.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// Process -> client.
    pub stdout: Option<mpsc::Sender<Bytes>>,
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// Terminal sizes (TTY sessions).
    pub resize: Option<mpsc::Receiver<TerminalSize>>,
}

/// How an exec or attach ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The process exited with this code (0: success).
    Exited { code: i32, command: Vec<String> },
    /// Attach ended (the client left or the container stopped).
    Detached,
    /// It could not run: upstream reports an internal error.
    Failed(String),
}

/// The `Status` object upstream writes on the error stream (v4 and later).
pub fn status_json(outcome: &Outcome) -> serde_json::Value {
    match outcome {
        Outcome::Exited { code: 0, .. } | Outcome::Detached => serde_json::json!({"metadata": {}, "status": "Success"}),
        Outcome::Exited { code, command } => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command {}, exit code {code}",
                go_list(command)
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Failed(e) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("Internal error occurred: error executing command in container: {e}"),
            "reason": "InternalError",
            "code": 500,
        }),
    }
}

/// What the error stream carries for `protocol`: v4+ the status JSON, older ones the message text on failure
/// only (`None`: nothing to write).
pub fn error_stream_bytes(protocol: &str, outcome: &Outcome) -> Option<Vec<u8>> {
    let status = status_json(outcome);
    let v4_or_later = protocol.starts_with("v4.") || protocol.starts_with("v5.");
    if v4_or_later {
        return serde_json::to_vec(&status).ok();
    }
    let failed = status.get("status").and_then(|s| s.as_str()) == Some("Failure");
    failed.then(|| status.get("message").and_then(|m| m.as_str()).unwrap_or_default().as_bytes().to_vec())
}

/// A command as Go's `%v` prints a string slice: `[sh -c exit 3]`.
fn go_list(items: &[String]) -> String {
    format!("[{}]", items.join(" "))
}

/// The first of the client's protocols (comma-separated, in any number of header values) that the server speaks;
/// upstream's `httpstream.Handshake`.
pub fn negotiate<'a>(client: impl Iterator<Item = &'a str>, server: &[&'static str]) -> Option<&'static str> {
    client
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .find_map(|p| server.iter().copied().find(|s| *s == p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_follow_upstream() {
        let o = Options::from_query(Some("command=sh&input=1&output=1&error=1&tty=1")).unwrap();
        assert_eq!(o, Options { stdin: true, stdout: true, stderr: false, tty: true }, "a TTY has no stderr");
        assert_eq!(
            Options::from_query(Some("command=ls&tty=1")),
            Err("you must specify at least 1 of stdin, stdout, stderr".into())
        );
        assert!(!Options::from_query(Some("output=true&error=1")).unwrap().stdout, "only 1 means yes");
        assert_eq!(command(Some("command=sh&command=-c&command=echo+a%26b&output=1")), ["sh", "-c", "echo a&b"]);
    }

    #[test]
    fn negotiation_takes_the_clients_first_supported() {
        let client = ["v5.channel.k8s.io, v4.channel.k8s.io", "v3.channel.k8s.io"];
        assert_eq!(negotiate(client.iter().copied(), &SPDY_PROTOCOLS), Some("v4.channel.k8s.io"));
        assert_eq!(negotiate(["v2.channel.k8s.io"].into_iter(), &SPDY_PROTOCOLS), Some("v2.channel.k8s.io"));
        assert_eq!(negotiate(["x", " "].into_iter(), &SPDY_PROTOCOLS), None);
    }

    #[test]
    fn the_error_stream_says_the_exit_code_as_upstream() {
        let exited = Outcome::Exited { code: 3, command: vec!["sh".into(), "-c".into(), "exit 3".into()] };
        let v4: serde_json::Value =
            serde_json::from_slice(&error_stream_bytes("v4.channel.k8s.io", &exited).unwrap()).unwrap();
        assert_eq!(v4["reason"], "NonZeroExitCode");
        assert_eq!(v4["details"]["causes"][0], serde_json::json!({"reason": "ExitCode", "message": "3"}));
        assert_eq!(
            v4["message"],
            "command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3"
        );
        let ok = Outcome::Exited { code: 0, command: vec![] };
        assert_eq!(error_stream_bytes("v4.channel.k8s.io", &ok).unwrap(), br#"{"metadata":{},"status":"Success"}"#);
        assert_eq!(error_stream_bytes("v3.channel.k8s.io", &ok), None, "pre-v4: nothing on success");
        let failed = error_stream_bytes("channel.k8s.io", &Outcome::Failed("boom".into())).unwrap();
        assert_eq!(failed, b"Internal error occurred: error executing command in container: boom");
    }

    #[test]
    fn resize_messages_are_parsed_across_chunks() {
        let mut d = ResizeDecoder::default();
        assert_eq!(d.feed(br#"{"Width":80,"He"#).unwrap(), []);
        assert_eq!(
            d.feed(br#"ight":24}{"Width":100,"Height":40}"#).unwrap(),
            [TerminalSize { width: 80, height: 24 }, TerminalSize { width: 100, height: 40 }]
        );
        assert!(d.feed(b"not json").is_err());
        assert!(ResizeDecoder::default().feed(&[b' '; 5000]).is_ok(), "whitespace is not a message");
    }
}
