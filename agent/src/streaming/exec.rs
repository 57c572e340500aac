//! A streaming exec (`kubectl exec`): a process started in a running container through the runtime, wired to a
//! [`Session`] (pipes per stream, or a terminal with resizes), waited for, and its exit code reported.
//!
//! The process's output is still read for [`DRAIN`] after it exited: a background child that keeps the pipe open
//! (`sh -c 'sleep 100 &'`) then does not keep the request open with it.

use std::os::fd::OwnedFd;
use std::time::Duration;

use nodelet_runtime::ContainerIo;
use tokio::task::JoinSet;

use super::fdio::{copy_in, copy_out};
use super::remotecommand::{Outcome, Session, TerminalSize};
use crate::pods::services::ContainerRuntime;

/// How long output is read after the process exited.
pub const DRAIN: Duration = Duration::from_secs(2);

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

/// How long a TTY exec waits for the client's first terminal size before starting the process.
const FIRST_SIZE: Duration = Duration::from_secs(1);

pub(crate) fn set_size(master: &OwnedFd, size: TerminalSize) {
    let ws = rustix::termios::Winsize { ws_row: size.height, ws_col: size.width, ws_xpixel: 0, ws_ypixel: 0 };
    if let Err(e) = rustix::termios::tcsetwinsize(master, ws) {
        tracing::debug!(error = %e, "resizing an exec terminal");
    }
}

/// Runs `command` in container `id` with `session`'s streams; returns how it ended.
pub async fn run(
    runtime: &dyn ContainerRuntime,
    id: &str,
    command: Vec<String>,
    tty: bool,
    session: Session,
) -> Outcome {
    let Session { stdin, stdout, stderr, resize } = session;
    let mut outputs = JoinSet::new();
    let mut inputs = JoinSet::new();
    let pid = if tty {
        // The client sends its terminal's size right after opening its streams: it is set as soon as the
        // terminal exists (the process may already be running by then, as with upstream's runtimes).
        let mut resize = resize;
        let first = match resize.as_mut() {
            Some(sizes) => tokio::time::timeout(FIRST_SIZE, sizes.recv()).await.ok().flatten(),
            None => None,
        };
        let io = ContainerIo { stdin: None, stdout: None, stderr: None };
        let process = match runtime.exec(id, &command, true, io).await {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let Some(master) = process.pty.map(OwnedFd::from) else {
            return Outcome::Failed("the runtime returned no terminal".into());
        };
        if let Some(size) = first {
            set_size(&master, size);
        }
        if let Some(mut sizes) = resize {
            let Ok(fd) = master.try_clone() else { return Outcome::Failed("duplicating the terminal".into()) };
            inputs.spawn(async move {
                while let Some(size) = sizes.recv().await {
                    set_size(&fd, size);
                }
            });
        }
        if let Some(rx) = stdin {
            let Ok(fd) = master.try_clone() else { return Outcome::Failed("duplicating the terminal".into()) };
            // A terminal has no half-close: the end of stdin is not passed on (the process sees it only on exit).
            inputs.spawn(async move {
                copy_in(rx, fd).await;
                std::future::pending::<()>().await;
            });
        }
        if let Some(tx) = stdout {
            outputs.spawn(copy_out(master, tx));
        }
        process.pid
    } else {
        let mut io = ContainerIo { stdin: None, stdout: None, stderr: None };
        let mut ours = (None, None, None);
        let made = (|| -> std::io::Result<()> {
            if stdin.is_some() {
                let (r, w) = pipe()?;
                io.stdin = Some(r);
                ours.0 = Some(w);
            }
            if stdout.is_some() {
                let (r, w) = pipe()?;
                io.stdout = Some(w);
                ours.1 = Some(r);
            }
            if stderr.is_some() {
                let (r, w) = pipe()?;
                io.stderr = Some(w);
                ours.2 = Some(r);
            }
            Ok(())
        })();
        if let Err(e) = made {
            return Outcome::Failed(format!("creating pipes: {e}"));
        }
        let process = match runtime.exec(id, &command, false, io).await {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        if let (Some(rx), Some(fd)) = (stdin, ours.0) {
            inputs.spawn(copy_in(rx, fd));
        }
        if let (Some(tx), Some(fd)) = (stdout, ours.1) {
            outputs.spawn(copy_out(fd, tx));
        }
        if let (Some(tx), Some(fd)) = (stderr, ours.2) {
            outputs.spawn(copy_out(fd, tx));
        }
        process.pid
    };
    let code = runtime.wait_exec(pid).await;
    let drained = tokio::time::timeout(DRAIN, async { while outputs.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::debug!(container = id, "exec: output still open after the process exited; not read further");
    }
    outputs.abort_all();
    inputs.abort_all();
    Outcome::Exited { code, command }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use tokio::sync::mpsc;

    use super::*;
    use crate::pods::services::fake::FakeRuntime;

    async fn collect(mut rx: mpsc::Receiver<Bytes>) -> String {
        let mut out = Vec::new();
        while let Some(b) = rx.recv().await {
            out.extend_from_slice(&b);
        }
        String::from_utf8(out).unwrap()
    }

    fn cmd(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn streams_are_wired_and_the_exit_code_reported() {
        let runtime = Arc::new(FakeRuntime::default());
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, out_rx) = mpsc::channel(4);
        let (err_tx, err_rx) = mpsc::channel(4);
        let session = Session { stdin: Some(in_rx), stdout: Some(out_tx), stderr: Some(err_tx), resize: None };
        let command = cmd(&["sh", "-c", "cat; echo to-stderr >&2; exit 3"]);
        let run = tokio::spawn({
            let runtime = runtime.clone();
            let command = command.clone();
            async move { run(runtime.as_ref(), "c1", command, false, session).await }
        });
        in_tx.send(Bytes::from_static(b"from stdin\n")).await.unwrap();
        drop(in_tx); // EOF: cat ends
        let (out, err) = tokio::join!(collect(out_rx), collect(err_rx));
        assert_eq!(out, "from stdin\n");
        assert_eq!(err, "to-stderr\n");
        assert_eq!(run.await.unwrap(), Outcome::Exited { code: 3, command });
    }

    #[tokio::test]
    async fn a_background_child_holding_the_output_does_not_hold_the_exec() {
        let runtime = FakeRuntime::default();
        let (out_tx, out_rx) = mpsc::channel(4);
        let session = Session { stdin: None, stdout: Some(out_tx), stderr: None, resize: None };
        let started = std::time::Instant::now();
        let outcome = run(&runtime, "c1", cmd(&["sh", "-c", "echo hi; sleep 30 & exit 0"]), false, session).await;
        assert!(matches!(outcome, Outcome::Exited { code: 0, .. }));
        assert!(started.elapsed() < DRAIN + Duration::from_secs(3), "{:?}", started.elapsed());
        assert_eq!(collect(out_rx).await, "hi\n");
    }

    #[tokio::test]
    async fn a_command_that_cannot_start_is_a_failure() {
        let runtime = FakeRuntime::default();
        let (out_tx, _out_rx) = mpsc::channel(4);
        let session = Session { stdin: None, stdout: Some(out_tx), stderr: None, resize: None };
        let outcome = run(&runtime, "c1", cmd(&["/nonexistent/binary"]), false, session).await;
        assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
    }
}
