//! Connections opened from inside a pod's network namespace, for probes and port-forwarding: they reach the pod
//! whether or not the node can route to its IP (a loopback-only or an overlay network too), and a port-forward
//! reaches `localhost` of the pod as upstream's does.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

/// Connects to `addr` from inside `netns` (the host's when `None`). A socket belongs to the namespace it was
/// made in, so only its creation needs to be there: a short-lived thread joins the namespace, makes the socket
/// and exits (no agent thread ever stays in a pod's namespace); the connection itself is made asynchronously.
/// The stream is returned non-blocking.
pub async fn connect(netns: Option<PathBuf>, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = match netns {
        None => new_socket(addr)?,
        Some(ns) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new().name("netns-socket".into()).spawn(move || {
                let result = (|| {
                    let file = std::fs::File::open(&ns)?;
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)?;
                    new_socket(addr)
                })();
                let _ = tx.send(result);
            })?;
            rx.await.map_err(|_| std::io::Error::other("the namespace's thread ended"))??
        }
    };
    let socket = tokio::net::TcpSocket::from_std_stream(socket);
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(stream) => stream?.into_std(),
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "i/o timeout")),
    }
}

/// A non-blocking, close-on-exec TCP socket of `addr`'s family, in the calling thread's network namespace.
fn new_socket(addr: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    Ok(TcpStream::from(fd))
}
