//! Connections opened from inside a pod's network namespace, for probes and port-forwarding: they reach the pod
//! whether or not the node can route to its IP (a loopback-only or an overlay network too), and a port-forward
//! reaches `localhost` of the pod as upstream's does.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

/// Connects to `addr` from inside `netns` (the host's when `None`). A socket belongs to the namespace it was
/// made in, so only its creation needs to be there: the socket thread makes it (see [`socket_in`]); the
/// connection itself is made asynchronously, and the stream stays on the reactor it connected on (taking it off
/// and back on would cost two more `epoll_ctl`s per probe).
pub async fn connect(
    netns: Option<PathBuf>,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = match netns {
        None => new_socket(addr)?,
        Some(ns) => socket_in(ns, addr).await?,
    };
    let socket = tokio::net::TcpSocket::from_std_stream(socket);
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(stream) => stream,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "i/o timeout")),
    }
}

/// A request to the socket thread.
struct MakeSocket {
    netns: PathBuf,
    addr: SocketAddr,
    reply: tokio::sync::oneshot::Sender<std::io::Result<TcpStream>>,
}

/// The socket thread's inbox (`None` before the first request or after the thread ended).
static SOCKET_THREAD: Mutex<Option<Sender<MakeSocket>>> = Mutex::new(None);

/// A socket of `addr`'s family made in the network namespace `netns`, by the socket thread: one long-lived thread
/// that joins the namespace, makes the socket and returns to the host's namespace for every request (a thread
/// per probe cost more than the probe). A thread that cannot return to the host's namespace ends (its requests
/// fail), so no agent thread stays in a pod's namespace; the next request starts a new one.
async fn socket_in(netns: PathBuf, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    send(MakeSocket { netns, addr, reply })?;
    answer.await.map_err(|_| ended())?
}

/// Queues a request for the socket thread, starting one when there is none (or it ended).
fn send(request: MakeSocket) -> std::io::Result<()> {
    let mut inbox = SOCKET_THREAD.lock().unwrap_or_else(|e| e.into_inner());
    let request = match inbox.as_ref() {
        Some(tx) => match tx.send(request) {
            Ok(()) => return Ok(()),
            Err(returned) => returned.0, // the thread ended
        },
        None => request,
    };
    let (tx, rx) = channel();
    std::thread::Builder::new().name("netns-socket".into()).spawn(move || socket_thread(&rx))?;
    tx.send(request).map_err(|_| ended())?;
    *inbox = Some(tx);
    Ok(())
}

fn ended() -> std::io::Error {
    std::io::Error::other("the namespace's thread ended")
}

/// The socket thread: serves requests until its inbox is gone or it cannot return to the host's namespace.
fn socket_thread(requests: &Receiver<MakeSocket>) {
    let home = match std::fs::File::open("/proc/thread-self/ns/net") {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "the namespace socket thread cannot open its own network namespace");
            return;
        }
    };
    let join = |file: &std::fs::File| {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
    };
    while let Ok(MakeSocket { netns, addr, reply }) = requests.recv() {
        let made = std::fs::File::open(&netns).and_then(|ns| {
            join(&ns)?;
            new_socket(addr)
        });
        if let Err(e) = join(&home) {
            tracing::error!(error = %e, "the namespace socket thread cannot return to the host's network namespace");
            return; // `reply` goes unanswered: its caller gets an error
        }
        let _ = reply.send(made);
    }
}

/// A non-blocking, close-on-exec TCP socket of `addr`'s family, in the calling thread's network namespace.
fn new_socket(addr: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    Ok(TcpStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A named network namespace with its loopback up (`ip netns`), removed on drop.
    struct TestNs(String);

    impl TestNs {
        fn new(suffix: &str) -> TestNs {
            let name = format!("nodelet-netns-test-{}-{suffix}", std::process::id());
            let ip = |args: &[&str]| {
                let status = std::process::Command::new("ip").args(args).status().expect("ip");
                assert!(status.success(), "ip {args:?}");
            };
            ip(&["netns", "add", &name]);
            ip(&["-n", &name, "link", "set", "lo", "up"]);
            TestNs(name)
        }

        fn path(&self) -> PathBuf {
            PathBuf::from("/run/netns").join(&self.0)
        }

        /// A listener on 127.0.0.1 inside the namespace (made by a thread that joins it and ends).
        fn listen(&self) -> TcpListener {
            let path = self.path();
            std::thread::spawn(move || {
                let ns = std::fs::File::open(path).expect("namespace file");
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                TcpListener::bind("127.0.0.1:0").expect("listen")
            })
            .join()
            .expect("listener thread")
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn net_ns(path: &str) -> String {
        std::fs::read_link(path).map(|p| p.display().to_string()).unwrap_or_default()
    }

    #[tokio::test]
    async fn sockets_are_made_in_the_pod_namespace_by_one_thread_that_returns_home() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: network namespaces need root");
            return;
        }
        let (a, b) = (TestNs::new("a"), TestNs::new("b"));
        let (la, lb) = (a.listen(), b.listen());
        let timeout = Duration::from_secs(5);
        for _ in 0..3 {
            for (ns, listener) in [(&a, &la), (&b, &lb)] {
                let addr = listener.local_addr().unwrap();
                let stream = connect(Some(ns.path()), addr, timeout).await.expect("connect inside the namespace");
                let (_, peer) = listener.accept().expect("accepted in the namespace");
                assert_eq!(peer, stream.local_addr().unwrap());
            }
        }
        // Each listener is only in its own namespace: not reachable from the host's.
        let addr = la.local_addr().unwrap();
        assert!(connect(None, addr, timeout).await.is_err(), "{addr} reached from the host's namespace");
        // One thread made every socket, and it is back in the host's namespace.
        let threads: Vec<String> = std::fs::read_dir("/proc/thread-self/..")
            .unwrap()
            .flatten()
            .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "netns-socket"))
            .map(|t| net_ns(&t.path().join("ns/net").display().to_string()))
            .collect();
        assert_eq!(threads, vec![net_ns("/proc/self/ns/net")]);
    }
}
