//! Subcommands that talk to a running agent on this node, through its local kubelet API socket
//! ([`crate::server::serve_local`], root only).

pub mod exec;
pub mod oom;
pub mod top;

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use tokio::net::UnixStream;

/// Column-aligned rows.
pub fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| rows.iter().map(|r| r.get(i).map_or(0, String::len)).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("   ").trim_end());
    }
    out
}

async fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {} (is nodelet running with this --root-dir?)", socket.display()))
}

/// `GET path` on the local API: the body of a 2xx answer, else an error with the status and body.
pub async fn get(socket: &Path, path: &str) -> Result<Bytes> {
    let stream = connect(socket).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.context("the local API")?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path).header(hyper::header::HOST, "localhost").body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await.context("the local API")?;
    let status = response.status();
    let body = response.into_body().collect().await.context("the local API")?.to_bytes();
    if !status.is_success() {
        bail!("{path}: {status}: {}", String::from_utf8_lossy(&body).trim_end());
    }
    Ok(body)
}
