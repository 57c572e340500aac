//! Images: what containerd's image service and snapshotter do for upstream kubelet — pull from registries,
//! verify, store content-addressed, unpack untrusted layers safely, mount an overlay rootfs per container,
//! apply pull policies and collect garbage. [`ImageManager`] is the entry point for pod workers.

pub mod credentials;
pub mod digest;
pub mod error;
pub mod gc;
pub mod import;
pub mod locks;
pub mod manager;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod rootfs;
pub mod store;
pub mod unpack;

pub use error::{ImageError, UnpackError};

/// The image store below `root_dir`: its filesystem is the node's `imagefs`.
pub fn store_dir(root_dir: &std::path::Path) -> std::path::PathBuf {
    root_dir.join("images")
}

/// The containers' root filesystems (their writable layers) below `root_dir`: the node's `containerfs`.
pub fn rootfs_dir(root_dir: &std::path::Path) -> std::path::PathBuf {
    root_dir.join("rootfs")
}
pub use manager::{ImageEvent, ImageFailure, ImageManager, ImagesConfig, ReadyImage};
pub use reference::PullPolicy;
