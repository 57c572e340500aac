//! `kubectl attach`: a session joined to a running container's own streams: its output from now on (as it is
//! logged), its stdin (when the spec keeps one open), and its terminal's size. It ends when the container's output
//! ends (the container exited) or the client stops reading; with `stdinOnce`, the container's stdin is closed
//! when the client detaches.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;

use super::fdio::copy_in;
use super::remotecommand::{Outcome, Session};
use crate::pods::attach::Attachable;

/// Attaches `session` to the container behind `a`.
pub async fn run(a: Arc<Attachable>, tty: bool, session: Session) -> Outcome {
    let Session { stdin, stdout, stderr, resize } = session;
    let Some(mut output) = a.subscribe() else { return Outcome::Failed("the container is not running".into()) };
    let mut inputs = JoinSet::new();
    if let (Some(mut sizes), Some(fd)) = (resize, a.terminal.as_ref().and_then(|t| t.try_clone().ok())) {
        inputs.spawn(async move {
            while let Some(size) = sizes.recv().await {
                super::exec::set_size(&fd, size);
            }
        });
    }
    if let (Some(rx), Some(fd)) = (stdin, a.stdin()) {
        let once = a.stdin_once.then(|| a.clone());
        inputs.spawn(async move {
            copy_in(rx, fd).await;
            // The client closed its stdin: with stdinOnce, so does the container's.
            if let Some(a) = once {
                a.close_stdin();
            }
        });
    }
    loop {
        let (stream, data) = match output.recv().await {
            Ok(item) => item,
            Err(RecvError::Lagged(n)) => {
                tracing::debug!(skipped = n, "attach: a slow client skipped output");
                continue;
            }
            Err(RecvError::Closed) => break,
        };
        let to = if stream == "stderr" && !tty { &stderr } else { &stdout };
        if let Some(tx) = to
            && tx.send(data).await.is_err()
        {
            break;
        }
    }
    inputs.abort_all();
    if a.stdin_once {
        a.close_stdin();
    }
    Outcome::Detached
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tokio::sync::mpsc;

    use super::*;

    /// A container's stdin and output through a pipe and `cat` on the host: what a client types comes back on
    /// its stdout; with stdinOnce the container's stdin closes when the client leaves, and the session ends with
    /// the output.
    #[tokio::test]
    async fn a_client_types_into_the_container_and_reads_its_output() {
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let ((stdin_r, stdin_w), (out_r, out_w)) = (pipe(), pipe());
        let mut cat = std::process::Command::new("cat").stdin(stdin_r).stdout(out_w).spawn().unwrap();
        let (attachable, tee) = Attachable::new(Some(stdin_w), true, None);
        let a = Arc::new(attachable);
        let log = tempfile::tempdir().unwrap();
        let output: crate::logs::Output = Box::new(tokio::net::unix::pipe::Receiver::from_owned_fd(out_r).unwrap());
        let rotation = crate::logs::Rotation { max_bytes: 1 << 20, max_files: 2 };
        let copier = tokio::spawn(crate::logs::copy_outputs(
            vec![("stdout", output)],
            log.path().join("0.log"),
            rotation,
            Some(tee),
        ));
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, mut out_rx) = mpsc::channel(4);
        let session = Session { stdin: Some(in_rx), stdout: Some(out_tx), stderr: None, resize: None };
        let attached = tokio::spawn(run(a.clone(), false, session));
        in_tx.send(Bytes::from_static(b"hello\n")).await.unwrap();
        assert_eq!(out_rx.recv().await.unwrap(), Bytes::from_static(b"hello\n"));
        drop(in_tx); // the client detaches its stdin: stdinOnce closes the container's, cat exits
        assert_eq!(attached.await.unwrap(), Outcome::Detached);
        assert!(cat.wait().unwrap().success());
        copier.await.unwrap();
        assert!(a.subscribe().is_none(), "the output ended with the container");
        assert!(a.stdin().is_none(), "stdinOnce: closed for good");
    }
}
