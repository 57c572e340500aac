//! Free loopback ports for the servers a fixture starts.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

use anyhow::{Context, Result};

/// Ports already handed out by this process: the kernel may offer a port again once its probe socket is closed,
/// and two fixtures starting at once must not both get it.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that nothing listens on now and that this process has not handed out before.
pub fn free_port() -> Result<u16> {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let used = guard.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("binding a probe socket on 127.0.0.1")?
            .port();
        if used.insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port found in 100 tries")
}
