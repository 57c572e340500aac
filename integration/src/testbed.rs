//! Where the test bed's prebuilt parts live, and whether this machine can run privileged end-to-end tests.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// `integration/versions.env`, shared with the shell scripts so that the versions have one source of truth.
const VERSIONS: &str = include_str!("../versions.env");

/// The Kubernetes version of the control plane (e.g. `v1.37.2`).
pub fn k8s_version() -> &'static str {
    VERSIONS
        .lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .map(str::trim)
        .expect("integration/versions.env defines K8S_VERSION")
}

/// A binary built by `build-metrics-server.sh` (`metrics-server`, `promcheck`).
pub fn monitoring_bin(name: &str) -> Result<PathBuf> {
    let version = VERSIONS
        .lines()
        .find_map(|l| l.strip_prefix("METRICS_SERVER_VERSION="))
        .map(str::trim)
        .context("integration/versions.env defines METRICS_SERVER_VERSION")?;
    let path = cache_dir().join(format!("metrics-server-{version}")).join("bin").join(name);
    if !is_executable(&path) {
        bail!("{} is missing: run integration/scripts/setup.sh", path.display());
    }
    Ok(path)
}

/// Cache of everything expensive (control-plane binaries, Go caches, images), outside the checkout.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("NODELET_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/nodelet-test"))
}

/// The cgroup v2 guest's kernel and initramfs (`CGV2_CACHE`, as `setup.sh` sets it).
pub fn guest_cache() -> PathBuf {
    std::env::var_os("CGV2_CACHE").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("cgv2-vm"))
}

/// Path of a binary built by `build-control-plane.sh` (`kube-apiserver`, `etcd`, `agnhost`, ...).
pub fn control_plane_bin(name: &str) -> Result<PathBuf> {
    let path = cache_dir().join(format!("k8s-{}", k8s_version())).join("bin").join(name);
    if !is_executable(&path) {
        bail!("{} is missing: run integration/scripts/setup.sh", path.display());
    }
    Ok(path)
}

/// A program installed from Debian by `setup.sh` (e.g. `docker-registry`), looked up on `PATH`.
pub fn system_bin(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .with_context(|| format!("{name} is not on PATH: run integration/scripts/setup.sh"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Whether this process runs as root (the test bed binds no privileged ports, but later tests mount and create
/// cgroups, and `docker-registry`'s storage is written as the caller).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Checks that the prerequisites named in `needs` are present. Returns `false` (after printing why) when the test
/// should be skipped; panics instead when `CI` is set, because CI must run every test for real.
pub fn ready(test: &str, needs: &[Need]) -> bool {
    let missing: Vec<String> = needs.iter().filter_map(|n| n.check().err()).map(|e| format!("{e:#}")).collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: skipped: {}", missing.join("; "));
    if std::env::var_os("CI").is_some() {
        panic!("{msg} (CI=true: every end-to-end test must run)");
    }
    eprintln!("{msg}");
    false
}

/// A prerequisite of an end-to-end test.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    /// Running as root.
    Root,
    /// The control plane binaries from `build-control-plane.sh`.
    ControlPlane,
    /// `docker-registry`, `htpasswd` and the images from `build-images.sh`.
    Registry,
    /// metrics-server and promcheck from `build-metrics-server.sh`.
    Monitoring,
    /// The pure cgroup v2 QEMU guest (`cgv2-vm.sh setup`, run by `setup.sh`) and QEMU.
    Guest,
}

impl Need {
    fn check(self) -> Result<()> {
        match self {
            Need::Root => {
                if !is_root() {
                    bail!("needs root");
                }
            }
            Need::ControlPlane => {
                for b in ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"] {
                    control_plane_bin(b)?;
                }
            }
            Need::Monitoring => {
                monitoring_bin("metrics-server")?;
                monitoring_bin("promcheck")?;
            }
            Need::Guest => {
                system_bin("qemu-system-x86_64")?;
                for file in ["vmlinux", "initrd.gz"] {
                    let path = guest_cache().join(file);
                    if !path.is_file() {
                        bail!("{} is missing: run integration/scripts/setup.sh", path.display());
                    }
                }
            }
            Need::Registry => {
                system_bin("docker-registry")?;
                system_bin("htpasswd")?;
                crate::images::store()?;
            }
        }
        Ok(())
    }
}
