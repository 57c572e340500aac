//! Errors of the runtime, worded so that they can become a container's `waiting.message` as they are.

use std::path::PathBuf;

/// The spec cannot be built from the container description.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Neither the pod nor the image gives a command.
    #[error("no command specified")]
    NoCommand,
    /// The image's or pod's user name is not in the container's `/etc/passwd`.
    #[error("unable to find user {0}: no matching entries in passwd file")]
    UnknownUser(String),
    /// The image's group name is not in the container's `/etc/group`.
    #[error("unable to find group {0}: no matching entries in group file")]
    UnknownGroup(String),
    /// The image's `/etc/passwd` or `/etc/group` cannot be used (see [`crate::user`]'s threat model).
    #[error("reading {path} of the image: {reason}")]
    UserDatabase {
        /// The file, as the container sees it.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// A `Localhost` seccomp profile that cannot be read or used (containerd's words).
    #[error("failed to generate seccomp spec opts: cannot load seccomp profile {path:?}: {reason}")]
    SeccompProfile {
        /// The profile's path on the node.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// A volume mounted where no container may have one (see [`crate::destinations`]).
    #[error("mount destination {destination} is not allowed: {reason}")]
    ForbiddenMount {
        /// The destination as given.
        destination: String,
        /// Why.
        reason: String,
    },
    /// A capability name the kernel does not know.
    #[error("unknown capability {0:?}")]
    UnknownCapability(String),
    /// The generated spec does not parse (a bug, or an invalid value passed through, e.g. a sysctl).
    #[error("invalid runtime spec: {0}")]
    Invalid(String),
}

/// A runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The container description is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// libcontainer refused or failed to create the container (missing binary, bad mount, cgroup error...).
    #[error("failed to create container {id}: {message}")]
    Create {
        /// Container ID.
        id: String,
        /// libcontainer's error chain.
        message: String,
    },
    /// Starting the created container failed.
    #[error("failed to start container {id}: {message}")]
    Start {
        /// Container ID.
        id: String,
        /// libcontainer's error chain.
        message: String,
    },
    /// Running an extra process in the container failed.
    #[error("failed to exec in container {id}: {message}")]
    Exec {
        /// Container ID.
        id: String,
        /// libcontainer's error chain.
        message: String,
    },
    /// Deleting the container failed.
    #[error("failed to delete container {id}: {message}")]
    Delete {
        /// Container ID.
        id: String,
        /// libcontainer's error chain.
        message: String,
    },
    /// Creating or removing a pod sandbox failed.
    #[error("failed to set up sandbox {id}: {message}")]
    Sandbox {
        /// Sandbox ID.
        id: String,
        /// What failed.
        message: String,
    },
    /// No such container.
    #[error("container {0} not found")]
    NotFound(String),
    /// The zygote (the helper process that clones containers) is gone or answered garbage.
    #[error("runtime helper failed: {0}")]
    Zygote(String),
    /// A file under the runtime's state directory could not be read or written.
    #[error("{}: {source}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was attempted.
        what: &'static str,
        /// errno.
        source: nix::Error,
    },
}

impl RuntimeError {
    pub(crate) fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> Self {
        move |source| RuntimeError::Sys { what, source }
    }
}
