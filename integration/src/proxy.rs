//! A TCP proxy on loopback in front of a fixture (e.g. a [`crate::registry::Registry`]) that counts the bytes
//! it passes to clients and can stall after a number of them: tests use it to prove downloads are shared and to
//! freeze a pull mid-blob before killing it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy; stops when dropped.
pub struct Proxy {
    addr: String,
    served: Arc<AtomicU64>,
    stall_after: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Proxies `127.0.0.1:<new port>` to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the proxy")?;
        let addr = listener.local_addr()?.to_string();
        let served = Arc::new(AtomicU64::new(0));
        let stall_after = Arc::new(AtomicU64::new(u64::MAX));
        let upstream = upstream.to_owned();
        let (s, limit) = (served.clone(), stall_after.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (s, limit, upstream) = (s.clone(), limit.clone(), upstream.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        let _ = relay(client, server, s, limit).await;
                    }
                });
            }
        });
        Ok(Proxy { addr, served, stall_after, task })
    }

    /// `127.0.0.1:<port>`: use it as the registry part of image references.
    pub fn host(&self) -> &str {
        &self.addr
    }

    /// Bytes passed from upstream to clients so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// Stops passing bytes to clients once `bytes` in total have been served (connections stay open).
    pub fn stall_after(&self, bytes: u64) {
        self.stall_after.store(bytes, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, served: Arc<AtomicU64>, limit: Arc<AtomicU64>) -> Result<()> {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = sr.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let before = served.fetch_add(n as u64, Ordering::SeqCst);
        let allowed = limit.load(Ordering::SeqCst).saturating_sub(before).min(n as u64).try_into().unwrap_or(n);
        cw.write_all(&buf[..allowed]).await?;
        if allowed < n {
            // Stalled: hold the connection open without passing anything more.
            std::future::pending::<()>().await;
        }
    }
    up.abort();
    Ok(())
}
