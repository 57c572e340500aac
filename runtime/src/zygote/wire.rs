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

/// Receives one packet's bytes (not necessarily JSON) and its descriptors from a `SOCK_SEQPACKET` socket, with
/// one `recvmsg` into a buffer of the largest size kept by the thread (made once, written only as far as a
/// packet reaches), then copied out at the packet's size. (A zeroed buffer of the largest size per message cost
/// more than the rest of an exec's messaging; learning the size first with a peek cost a system call per
/// message.) A packet over the limit is dropped whole, with its descriptors.
pub fn recv_raw(sock: BorrowedFd<'_>) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with_borrow_mut(|buf| {
        if buf.len() < MAX_MESSAGE + 1 {
            // One byte more than the largest message: a packet that fills it is too large.
            buf.resize(MAX_MESSAGE + 1, 0);
        }
        let (len, fds) = recv_once(sock, buf)?;
        if len > MAX_MESSAGE {
            return Err(WireError::Malformed(format!("message of more than {MAX_MESSAGE} bytes")));
        }
        Ok((buf[..len].to_vec(), fds))
    })
}

/// Receives a short message and its descriptors from a stream socket (a terminal's master, sent with its name).
pub fn recv_short(sock: BorrowedFd<'_>) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    recv_into(sock, 4096)
}

fn recv_into(sock: BorrowedFd<'_>, size: usize) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    let mut buf = vec![0u8; size];
    let (len, fds) = recv_once(sock, &mut buf)?;
    buf.truncate(len);
    Ok((buf, fds))
}

/// One `recvmsg` into `buf`: the bytes received (a `SOCK_SEQPACKET` packet longer than `buf` loses its rest) and
/// the descriptors that came with them.
fn recv_once(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), WireError> {
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, fds) = loop {
        let mut iov = [IoSliceMut::new(buf)];
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
    Ok((len, fds))
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

        // One over the limit is refused whole, descriptors and all, and the next one still arrives.
        let (r2, w2) = nix::unistd::pipe().unwrap();
        nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::SndBuf, &(MAX_MESSAGE + 4096)).unwrap();
        send_encoded(a.as_fd(), &vec![b'x'; MAX_MESSAGE + 10], &[w2.as_fd()]).unwrap();
        drop(w2);
        assert!(matches!(recv::<String>(b.as_fd()), Err(WireError::Malformed(_))));
        let mut rest = Vec::new();
        std::fs::File::from(r2).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the refused message's descriptor was closed");
        send(a.as_fd(), &"after".to_string(), &[]).unwrap();
        let (after, _): (String, _) = recv(b.as_fd()).unwrap();
        assert_eq!(after, "after");

        drop(a);
        assert!(matches!(recv::<String>(b.as_fd()), Err(WireError::Closed)));
    }
}
