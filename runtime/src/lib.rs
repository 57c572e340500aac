//! nodelet's embedded OCI runtime: containers on youki's `libcontainer`, driven in-process.
//!
//! Call [`Zygote::fork`] first thing in `main` (before any thread exists), then build a [`Runtime`] on it inside
//! tokio. The zygote does every clone; the runtime builds specs, keeps state for re-adoption, and turns the
//! zygote's exit events and the cgroup's OOM counter into [`ContainerExit`]s.
#![deny(missing_docs)]

pub mod async_io;
mod bundle;
pub mod cgroup;
mod cgroupfs;
pub mod config;
mod container;
pub mod destinations;
pub mod devices;
pub mod error;
pub mod exe;
pub mod idmap;
mod mount_attr;
pub mod sandbox;
pub mod seccomp;
pub mod spec;
pub mod state;
pub mod user;
pub mod zygote;

pub use config::{
    ContainerConfig, ExecConfig, ImageConfig, Mount, Namespace, Namespaces, Propagation, Resources, Seccomp, Security,
    parse_signal,
};
pub use container::{Container, ContainerExit, ContainerIo, EXEC_OUTPUT, ExecProcess, IoPipes, Runtime};
pub use error::{RuntimeError, SpecError};
pub use idmap::IdMapping;
pub use sandbox::{Sandbox, SandboxConfig};
pub use user::ProcessUser;
pub use zygote::Zygote;
