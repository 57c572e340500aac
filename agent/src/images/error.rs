//! Errors of the image service, and how they map onto the kubelet's container-waiting reasons.

use std::path::PathBuf;

/// Everything that can go wrong while resolving, pulling, storing or unpacking an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("couldn't parse image name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("failed to resolve reference {reference:?}: {message}")]
    Resolve { reference: String, message: String },
    #[error("pull access denied for {reference}: {message}")]
    Unauthorized { reference: String, message: String },
    #[error("{reference}: not found")]
    NotFound { reference: String },
    #[error("failed to fetch {what} {digest}: {message}")]
    Fetch { what: &'static str, digest: String, message: String },
    #[error("{what} {expected} failed verification: got {actual}")]
    DigestMismatch { what: &'static str, expected: String, actual: String },
    #[error("{what} {digest} has size {actual}, the manifest says {expected}")]
    SizeMismatch { what: &'static str, digest: String, expected: u64, actual: u64 },
    #[error("unsupported {what}: {value}")]
    Unsupported { what: &'static str, value: String },
    #[error("no manifest for platform {platform} in the index of {reference}")]
    NoPlatform { reference: String, platform: String },
    #[error("malformed {what}: {message}")]
    Malformed { what: &'static str, message: String },
    #[error("unpacking layer {digest}: {source}")]
    Unpack { digest: String, source: UnpackError },
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("image {0} is not in the store")]
    NotPresent(String),
    #[error("mounting the rootfs of {container}: {message}")]
    Mount { container: String, message: String },
}

/// A layer that cannot be unpacked safely or correctly. The entry path is the one written in the archive.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("entry {path:?} is absolute")]
    AbsolutePath { path: String },
    #[error("entry {path:?} climbs out of the layer with '..'")]
    ParentTraversal { path: String },
    #[error("entry {path:?} goes through a symlink or a non-directory in the layer")]
    ThroughSymlink { path: String },
    #[error("hardlink {path:?} points at {target:?}, which is not a regular file earlier in the layer")]
    BadHardlink { path: String, target: String },
    #[error("entry {path:?} appears twice in the layer")]
    Duplicate { path: String },
    #[error("entry {path:?} of {size} bytes exceeds the layer bound of {limit} bytes")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("unsupported entry type {kind} for {path:?}")]
    EntryType { path: String, kind: String },
    #[error("uncompressed layer digest is {actual}, the image config says {expected}")]
    DiffId { expected: String, actual: String },
    #[error("{op} {path:?}: {source}")]
    Io { op: &'static str, path: String, source: std::io::Error },
}

impl UnpackError {
    pub(crate) fn io(op: &'static str, path: &str, source: impl Into<std::io::Error>) -> Self {
        UnpackError::Io { op, path: path.to_owned(), source: source.into() }
    }
}

impl ImageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImageError::Io { op, path: path.into(), source }
    }
}

/// Result alias of the image service.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;
