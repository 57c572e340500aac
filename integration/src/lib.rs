//! nodelet's end-to-end test bed. Everything a test talks to is the real thing, started per fixture on loopback
//! and stopped by PID when the fixture is dropped (also when the test panics):
//!
//! - [`cluster::Cluster`]: etcd, kube-apiserver (`Node,RBAC` + `NodeRestriction`), kube-controller-manager and
//!   kube-scheduler built from the Go module proxy by `scripts/build-control-plane.sh`;
//! - [`registry::Registry`]: Debian's `docker-registry`, plain or with htpasswd basic auth, pre-loaded with the
//!   images that `scripts/build-images.sh` built (see [`images`]).
//!
//! - [`upstream::UpstreamNode`]: the upstream kubelet on containerd, the peer of the side-by-side benchmarks.
//!
//! Prerequisites are installed by `scripts/setup.sh` (the README's test command runs it). Tests call
//! [`testbed::ready`] first: it skips with a clear message on a machine without them, and fails under `CI=true`.
#![allow(clippy::expect_used)] // the test bed: a broken invariant here is a failed test

pub mod certs;
pub mod cluster;
pub mod images;
pub mod kubeconfig;
pub mod layers;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod registry;
pub mod testbed;
pub mod upstream;
