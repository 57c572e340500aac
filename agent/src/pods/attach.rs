//! What `kubectl attach` connects to, per running container: its output as it is logged (a broadcast every
//! attached client subscribes to), its stdin (the write end of its pipe, kept open while the container runs when
//! the spec has `stdin: true`; closed after the first attach with `stdinOnce`), and its terminal (`tty: true`).
//! Entries are added when a container starts and removed when its output ends.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use crate::logs::Tee;

/// Output kept for a client that reads slowly before it misses some (it then skips ahead).
const BACKLOG: usize = 256;

/// One running container's attach points.
pub struct Attachable {
    /// The log copier holds the only strong sender: when the output ends, subscribers see the end.
    output: tokio::sync::broadcast::WeakSender<(&'static str, bytes::Bytes)>,
    /// The container's stdin (pipe write end, or a duplicate of the terminal's master); `None` once closed.
    pub stdin: Mutex<Option<OwnedFd>>,
    pub stdin_once: bool,
    /// The terminal's master, for resizes.
    pub terminal: Option<OwnedFd>,
}

impl Attachable {
    /// The attach points of a container whose log copier gets the returned sender.
    pub fn new(stdin: Option<OwnedFd>, stdin_once: bool, terminal: Option<OwnedFd>) -> (Attachable, Tee) {
        let (tee, _) = tokio::sync::broadcast::channel(BACKLOG);
        (Attachable { output: tee.downgrade(), stdin: Mutex::new(stdin), stdin_once, terminal }, tee)
    }

    /// The output from now on; `None` once it ended.
    pub fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<(&'static str, bytes::Bytes)>> {
        self.output.upgrade().map(|s| s.subscribe())
    }

    /// A duplicate of the container's stdin for one client (`None`: the container has none, or it was closed).
    pub fn stdin(&self) -> Option<OwnedFd> {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|fd| fd.try_clone().ok())
    }

    /// Closes the container's stdin (after a `stdinOnce` client detached): the process reads EOF once every
    /// client's duplicate is closed too.
    pub fn close_stdin(&self) {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The attach points of every running container, by container ID.
#[derive(Clone, Default)]
pub struct Attachments(Arc<Mutex<HashMap<String, Arc<Attachable>>>>);

impl Attachments {
    pub fn insert(&self, id: &str, a: Arc<Attachable>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), a);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Attachable>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Forgets `id`: once its log copier also ends, attached clients see the end of the output.
    pub fn remove(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}
