//! Connections opened from inside a pod's network namespace, for probes and port-forwarding: they reach the pod
//! whether or not the node can route to its IP (a loopback-only or an overlay network too), and a port-forward
//! reaches `localhost` of the pod as upstream's does.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

/// Connects to `addr` from inside `netns` (the host's when `None`). A thread of its own joins the namespace,
/// connects and exits: the connected socket stays in the namespace it was made in.
pub async fn connect(netns: Option<PathBuf>, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("netns-connect".into()).spawn(move || {
        let result = (|| {
            if let Some(ns) = netns {
                let file = std::fs::File::open(&ns)?;
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            }
            TcpStream::connect_timeout(&addr, timeout)
        })();
        let _ = tx.send(result);
    })?;
    rx.await.map_err(|_| std::io::Error::other("the connecting thread ended"))?
}
