//! Messages between the agent and the zygote: one JSON document per `SOCK_SEQPACKET` packet (message boundaries
//! for free), file descriptors alongside as `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest message: requests carry argv and env, never file contents.
const MAX_MESSAGE: usize = 256 * 1024;
const MAX_FDS: usize = 8;

/// Why a message could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed its end.
    #[error("peer closed the connection")]
    Closed,
    /// sendmsg/recvmsg failed.
    #[error("socket: {0}")]
    Io(#[from] nix::Error),
    /// Not a message we understand.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Sends `msg` with `fds` attached.
pub fn send<T: Serialize>(sock: BorrowedFd<'_>, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
    send_encoded(sock, &encode(msg)?, fds)
}

/// A message's bytes (encoded once: a non-blocking sender may try more than once).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| WireError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE {
        return Err(WireError::Malformed(format!("message of {} bytes exceeds {MAX_MESSAGE}", bytes.len())));
    }
    Ok(bytes)
}

/// Sends an [`encode`]d message with `fds` attached.
pub fn send_encoded(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(&raw)] };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(bytes)], &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::EPIPE) | Err(nix::Error::ECONNRESET) => return Err(WireError::Closed),
            other => return other.map(|_| ()).map_err(WireError::Io),
        }
    }
}

/// Receives one message and the descriptors that came with it (owned by the caller now).
pub fn recv<T: DeserializeOwned>(sock: BorrowedFd<'_>) -> Result<(T, Vec<OwnedFd>), WireError> {
    let (bytes, fds) = recv_raw(sock)?;
    let msg = serde_json::from_slice(&bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    Ok((msg, fds))
}

/// Receives one packet's bytes (not necessarily JSON) and its descriptors from a `SOCK_SEQPACKET` socket, in a
/// buffer of the packet's size (a zeroed buffer of the largest size, per message, cost more than the rest of an
/// exec's messaging).
pub fn recv_raw(sock: BorrowedFd<'_>) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    let len = loop {
        // MSG_TRUNC: the packet's real length, with nothing copied; MSG_PEEK: it stays queued.
        match nix::sys::socket::recv(sock.as_raw_fd(), &mut [], MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(WireError::Io(e)),
            Ok(n) => break n,
        }
    };
    if len > MAX_MESSAGE {
        // Read it (and drop it with its descriptors) so that the next message can be read.
        let _ = recv_into(sock, MAX_MESSAGE);
        return Err(WireError::Malformed(format!("message of {len} bytes exceeds {MAX_MESSAGE}")));
    }
    recv_into(sock, len)
}

/// Receives a short message and its descriptors from a stream socket (a terminal's master, sent with its name).
pub fn recv_short(sock: BorrowedFd<'_>) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    recv_into(sock, 4096)
}

fn recv_into(sock: BorrowedFd<'_>, size: usize) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    let mut buf = vec![0u8; size];
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg_space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::ECONNRESET) => return Err(WireError::Closed),
            Err(e) => return Err(WireError::Io(e)),
            Ok(msg) => {
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        // SAFETY: SCM_RIGHTS installed these descriptors in this process just now; nothing else
                        // refers to them, so each gets exactly one owner.
                        fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                break (msg.bytes, fds);
            }
        }
    };
    if len == 0 && fds.is_empty() {
        return Err(WireError::Closed);
    }
    buf.truncate(len);
    Ok((buf, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn messages_and_descriptors_cross_a_seqpacket_pair() {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        send(a.as_fd(), &vec!["hello".to_string(), "world".into()], &[w.as_fd()]).unwrap();
        drop(w);
        let (msg, mut fds): (Vec<String>, _) = recv(b.as_fd()).unwrap();
        assert_eq!(msg, ["hello", "world"]);
        assert_eq!(fds.len(), 1);
        let mut w2 = std::fs::File::from(fds.remove(0));
        w2.write_all(b"through the passed fd").unwrap();
        drop(w2);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert_eq!(out, "through the passed fd");

        // A large message arrives whole, in a buffer of its size.
        let big = "x".repeat(100_000);
        send(a.as_fd(), &big, &[]).unwrap();
        let (back, fds): (String, _) = recv(b.as_fd()).unwrap();
        assert_eq!((back.len(), fds.len()), (big.len(), 0));

        drop(a);
        assert!(matches!(recv::<String>(b.as_fd()), Err(WireError::Closed)));
    }
}
