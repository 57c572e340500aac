//! Copying between a process's pipes or terminal and a session's channels without a blocked thread per stream:
//! the descriptors are made non-blocking and polled by tokio, so a process that never closes its output (a
//! background child holding the pipe) costs nothing once the session stops reading.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

const CHUNK: usize = 32 * 1024;

fn nonblocking(fd: OwnedFd) -> std::io::Result<AsyncFd<File>> {
    nodelet_runtime::async_io::register(fd)
}

/// Reads `fd` into `tx` until EOF (or EIO: a terminal whose last process is gone) or until `tx` is dropped.
pub async fn copy_out(fd: OwnedFd, tx: mpsc::Sender<Bytes>) {
    let Ok(afd) = nonblocking(fd) else { return };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let Ok(mut guard) = afd.readable().await else { return };
        match guard.try_io(|f| f.get_ref().read(&mut buf)) {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                    return;
                }
            }
            Err(_would_block) => {}
        }
    }
}

/// Writes what arrives on `rx` to `fd`; closes `fd` (EOF for the process) when `rx` ends. Stops early when the
/// process closed its end (EPIPE).
pub async fn copy_in(mut rx: mpsc::Receiver<Bytes>, fd: OwnedFd) {
    let Ok(afd) = nonblocking(fd) else { return };
    while let Some(data) = rx.recv().await {
        let mut at = 0;
        while at < data.len() {
            let Ok(mut guard) = afd.writable().await else { return };
            match guard.try_io(|f| f.get_ref().write(&data[at..])) {
                Ok(Ok(n)) => at += n,
                Ok(Err(_)) => return,
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipes_are_copied_both_ways_and_eof_closes() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(4);
        let writer = tokio::spawn(copy_in(in_rx, w));
        let reader = tokio::spawn(copy_out(r, out_tx));
        in_tx.send(Bytes::from(vec![1u8; 100_000])).await.unwrap();
        drop(in_tx);
        let mut got = 0;
        while let Some(b) = out_rx.recv().await {
            got += b.len();
        }
        assert_eq!(got, 100_000, "everything, then EOF once the writer closed");
        writer.await.unwrap();
        reader.await.unwrap();
    }

    #[tokio::test]
    async fn a_reader_that_goes_away_stops_the_copy() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (out_tx, out_rx) = mpsc::channel(1);
        drop(out_rx);
        let reader = tokio::spawn(copy_out(r, out_tx));
        nix::unistd::write(&w, b"x").unwrap();
        // The write end stays open: only the dropped receiver can end the copy.
        tokio::time::timeout(std::time::Duration::from_secs(5), reader).await.unwrap().unwrap();
    }
}
