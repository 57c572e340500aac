//! What a pod worker asks of the node, behind small traits: the container runtime, the image service, the pod
//! network and the pod cgroups. The agent plugs in the real ones (below); unit tests plug in the in-memory fakes
//! of [`fake`], so that the worker's executor (start order, restarts and back-off, termination order, spec
//! changes, failures) is tested without root. Containers are named by ID: the real runtime keeps their handles.

#[cfg(test)]
pub mod fake;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use nix::sys::signal::Signal;
use nodelet_cgroups::hierarchy::Hierarchy;
use nodelet_cgroups::qos::{PodLimits, QosClass};
use nodelet_runtime::{
    Container, ContainerConfig, ContainerExit, ContainerIo, ExecProcess, Mount, ProcessUser, Runtime, RuntimeError,
    Sandbox, SandboxConfig, idmap::PodUserNamespace,
};

use crate::images::pull::Progress;
use crate::images::{ImageEvent, ImageFailure, ImageManager, PullPolicy, ReadyImage};

/// An exec's exit code (`None`: killed at its timeout) and its output (stdout, then stderr).
pub type ExecResult = Result<(Option<i32>, Vec<u8>), RuntimeError>;

/// A boxed future (the traits are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The container runtime: sandboxes and containers.
pub trait ContainerRuntime: Send + Sync {
    fn create_sandbox<'a>(&'a self, config: &'a SandboxConfig) -> BoxFuture<'a, Result<Sandbox, RuntimeError>>;
    fn remove_sandbox<'a>(&'a self, sandbox: &'a Sandbox) -> BoxFuture<'a, Result<(), RuntimeError>>;
    fn list_sandboxes(&self) -> Vec<Sandbox>;
    /// Creates a container (not started yet) whose output goes to `io`; the user its process runs as.
    fn create<'a>(
        &'a self,
        config: &'a ContainerConfig,
        io: ContainerIo,
    ) -> BoxFuture<'a, Result<Option<ProcessUser>, RuntimeError>>;
    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>>;
    /// The container's exit, once it comes.
    fn wait<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ContainerExit>;
    /// SIGTERM, then SIGKILL after `grace`; the exit.
    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> BoxFuture<'a, ContainerExit>;
    fn kill(&self, id: &str);
    /// Deletes the container (killing what is left of it).
    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;
    /// Takes over a container of the previous agent process; its ID.
    fn adopt(&self, container: Container) -> String;
    /// The live containers whose IDs start with `prefix` (adopted).
    fn list_matching<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<String>>;
    /// An adopted container's stdout and stderr, to relay them again.
    fn reopen_output(&self, id: &str) -> Option<(File, File)>;
    /// Runs `args` in the container, killed after `timeout`: (exit code, `None` on timeout; stdout then stderr).
    fn exec_sync<'a>(&'a self, id: &'a str, args: &'a [String], timeout: Duration) -> BoxFuture<'a, ExecResult>;
    /// Starts `args` in container `id` for a streaming exec (`kubectl exec`): on `io`, or on a new terminal
    /// (returned) when `tty`.
    fn exec<'a>(
        &'a self,
        id: &'a str,
        args: &'a [String],
        tty: bool,
        io: ContainerIo,
    ) -> BoxFuture<'a, Result<ExecProcess, RuntimeError>>;
    /// Waits for a process [`ContainerRuntime::exec`] started: its exit code (128 + signal when killed).
    fn wait_exec(&self, pid: i32) -> BoxFuture<'_, i32>;
    /// A duplicate of the master of container `id`'s terminal (`tty: true`).
    fn terminal(&self, id: &str) -> Option<std::os::fd::OwnedFd>;
    /// The PID namespace of running container `id` (an ephemeral container that targets it joins it).
    fn pid_namespace(&self, id: &str) -> Option<PathBuf>;
}

/// The image service: images present per pull policy, and containers' root filesystems on them.
pub trait ImageService: Send + Sync {
    fn ensure<'a>(
        &'a self,
        image: &'a str,
        policy: PullPolicy,
        pull_secrets: &'a [Vec<u8>],
        backoff_key: &'a str,
        event: &'a (dyn Fn(ImageEvent) + Send + Sync),
    ) -> BoxFuture<'a, Result<ReadyImage, ImageFailure>>;
    /// The image's config blob (its process defaults).
    fn config_blob(&self, image: &ReadyImage) -> Result<Vec<u8>, String>;
    /// Mounts the container's root filesystem (blocking).
    /// With `userns`, the image's layers are idmapped into the pod's range.
    fn prepare_rootfs(
        &self,
        id: &str,
        image: &ReadyImage,
        userns: Option<&PodUserNamespace>,
    ) -> Result<PathBuf, String>;
    fn remove_rootfs(&self, id: &str);
    /// Containers with a root filesystem made before `before` (to find those of containers never created).
    fn rootfs_made_before(&self, before: std::time::SystemTime) -> Vec<String>;
}

/// The pod network and the pod's name files (resolv.conf, hosts, hostname).
pub trait PodNetwork: Send + Sync {
    /// Attaches the sandbox's network namespace; the pod's IPs.
    fn attach<'a>(
        &'a self,
        pod: &'a Pod,
        sandbox: &'a str,
        netns: &'a Path,
    ) -> BoxFuture<'a, Result<Vec<String>, String>>;
    fn detach<'a>(&'a self, sandbox: &'a str) -> BoxFuture<'a, Result<(), String>>;
    fn check<'a>(&'a self, sandbox: &'a str) -> BoxFuture<'a, Result<(), String>>;
    fn ips(&self, sandbox: &str) -> Vec<String>;
    /// Sandboxes with an attachment.
    fn attached(&self) -> Vec<String>;
    /// Writes the pod's name files; their bind mounts.
    fn write_files(&self, pod: &Pod, uid: &str, ips: &[String]) -> Result<Vec<Mount>, String>;
    fn file_mounts(&self, uid: &str) -> Vec<Mount>;
    fn remove_files(&self, uid: &str);
}

/// Pod-level cgroups (blocking calls).
pub trait PodCgroups: Send + Sync {
    fn ensure_pod(&self, qos: QosClass, uid: &str, limits: &PodLimits, pids: Option<u64>) -> io::Result<()>;
    fn remove_pod(&self, qos: QosClass, uid: &str, timeout: Duration) -> io::Result<()>;
    /// A container's cpu and memory, by its cgroup path relative to the hierarchy.
    fn update_cpu_memory(&self, rel: &str, shares: u64, quota: Option<u64>, memory: Option<u64>) -> io::Result<()>;
    fn update_burstable(&self, cpu_request_millis: u64) -> io::Result<()>;
    /// What a container's cgroup (`rel`) looks like right after an OOM kill, before it is removed.
    fn oom_record(&self, _rel: &str) -> Option<nodelet_cgroups::oom::OomRecord> {
        None
    }
    /// A watch of a container's memory cgroup (`rel`) for OOM kills (called in the async runtime: the watch
    /// registers with it); `None` where it cannot be watched.
    fn oom_watch(&self, _rel: &str) -> Option<nodelet_cgroups::oom::OomWatch> {
        None
    }
}

/// The embedded runtime, with the handles of the containers it runs for the pod workers.
pub struct RealRuntime {
    runtime: Runtime,
    live: Mutex<HashMap<String, Container>>,
    /// Stop signals other than SIGTERM, by container ID.
    stop_signals: Mutex<HashMap<String, Signal>>,
}

impl RealRuntime {
    pub fn new(runtime: Runtime) -> RealRuntime {
        RealRuntime { runtime, live: Mutex::new(HashMap::new()), stop_signals: Mutex::new(HashMap::new()) }
    }

    /// A live container's handle (for exec and attach).
    pub fn container(&self, id: &str) -> Option<Container> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    fn keep(&self, c: Container) -> String {
        let id = c.id.clone();
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone(), c);
        id
    }
}

/// Times a runtime operation into `kubelet_runtime_operations_*`, under upstream's CRI method names.
async fn timed<T, E>(operation: &str, f: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let started = std::time::Instant::now();
    let result = f.await;
    crate::metrics::kubelet::METRICS.runtime_operation(operation, started.elapsed(), result.is_ok());
    result
}

/// The exit reported for a container the runtime does not know.
fn unknown_exit() -> ContainerExit {
    ContainerExit { code: 137, signal: None, oom_killed: false, status_known: false }
}

impl ContainerRuntime for RealRuntime {
    fn create_sandbox<'a>(&'a self, config: &'a SandboxConfig) -> BoxFuture<'a, Result<Sandbox, RuntimeError>> {
        Box::pin(timed("run_podsandbox", self.runtime.create_sandbox(config)))
    }

    fn remove_sandbox<'a>(&'a self, sandbox: &'a Sandbox) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(timed("remove_podsandbox", self.runtime.remove_sandbox(sandbox)))
    }

    fn list_sandboxes(&self) -> Vec<Sandbox> {
        self.runtime.list_sandboxes()
    }

    fn create<'a>(
        &'a self,
        config: &'a ContainerConfig,
        io: ContainerIo,
    ) -> BoxFuture<'a, Result<Option<ProcessUser>, RuntimeError>> {
        Box::pin(async move {
            let c = timed("create_container", self.runtime.create(config, io)).await?;
            let user = c.user.clone();
            let signal = config.stop_signal.as_deref().and_then(|s| {
                let parsed = nodelet_runtime::parse_signal(s);
                if parsed.is_none() {
                    tracing::warn!(container = %config.id, signal = %s, "unknown stop signal: SIGTERM stops it");
                }
                parsed
            });
            if let Some(signal) = signal.filter(|s| *s != Signal::SIGTERM) {
                self.stop_signals.lock().unwrap_or_else(|e| e.into_inner()).insert(config.id.clone(), signal);
            }
            self.keep(c);
            Ok(user)
        })
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let c = self
                .container(id)
                .ok_or_else(|| RuntimeError::Start { id: id.into(), message: "unknown container".into() })?;
            timed("start_container", self.runtime.start(&c)).await
        })
    }

    fn wait<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ContainerExit> {
        Box::pin(async move {
            match self.container(id) {
                Some(c) => self.runtime.wait(&c).await,
                None => unknown_exit(),
            }
        })
    }

    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> BoxFuture<'a, ContainerExit> {
        Box::pin(async move {
            match self.container(id) {
                Some(c) => {
                    let signal = self.stop_signals.lock().unwrap_or_else(|e| e.into_inner()).get(id).copied();
                    let stop = async {
                        Ok::<_, ()>(self.runtime.stop_with(&c, signal.unwrap_or(Signal::SIGTERM), grace).await)
                    };
                    timed("stop_container", stop).await.unwrap_or_else(|()| unknown_exit())
                }
                None => unknown_exit(),
            }
        })
    }

    fn kill(&self, id: &str) {
        if let Some(c) = self.container(id) {
            let _ = self.runtime.signal(&c, Signal::SIGKILL);
        }
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(c) = self.container(id) else { return };
            if let Err(e) = timed("remove_container", self.runtime.delete(&c)).await {
                tracing::warn!(container = %id, error = %e, "deleting a container");
            }
            self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
            self.stop_signals.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        })
    }

    fn adopt(&self, container: Container) -> String {
        self.keep(container)
    }

    fn list_matching<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            let found = self.runtime.list_matching(prefix).await;
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            // A handle this process already holds stays (it may be one it created itself, not an adopted one).
            for c in found {
                live.entry(c.id.clone()).or_insert(c);
            }
            live.keys().filter(|id| id.starts_with(prefix)).cloned().collect()
        })
    }

    fn reopen_output(&self, id: &str) -> Option<(File, File)> {
        self.runtime.reopen_output(&self.container(id)?)
    }

    fn exec_sync<'a>(&'a self, id: &'a str, args: &'a [String], timeout: Duration) -> BoxFuture<'a, ExecResult> {
        Box::pin(async move {
            let c = self
                .container(id)
                .ok_or_else(|| RuntimeError::Exec { id: id.into(), message: "the container is not running".into() })?;
            let exec = nodelet_runtime::ExecConfig { args: args.to_vec(), env: Vec::new(), tty: false };
            timed("exec_sync", self.runtime.exec_sync(&c, &exec, timeout)).await
        })
    }

    fn exec<'a>(
        &'a self,
        id: &'a str,
        args: &'a [String],
        tty: bool,
        io: ContainerIo,
    ) -> BoxFuture<'a, Result<ExecProcess, RuntimeError>> {
        Box::pin(async move {
            let c = self
                .container(id)
                .ok_or_else(|| RuntimeError::Exec { id: id.into(), message: "the container is not running".into() })?;
            let exec = nodelet_runtime::ExecConfig { args: args.to_vec(), env: Vec::new(), tty };
            timed("exec", self.runtime.exec(&c, &exec, io)).await
        })
    }

    fn wait_exec(&self, pid: i32) -> BoxFuture<'_, i32> {
        Box::pin(self.runtime.wait_exec(pid))
    }

    fn terminal(&self, id: &str) -> Option<std::os::fd::OwnedFd> {
        self.container(id)?.pty()?.try_clone().ok()
    }

    fn pid_namespace(&self, id: &str) -> Option<PathBuf> {
        let path = PathBuf::from(format!("/proc/{}/ns/pid", self.container(id)?.pid));
        path.exists().then_some(path)
    }
}

impl ImageService for ImageManager {
    fn ensure<'a>(
        &'a self,
        image: &'a str,
        policy: PullPolicy,
        pull_secrets: &'a [Vec<u8>],
        backoff_key: &'a str,
        event: &'a (dyn Fn(ImageEvent) + Send + Sync),
    ) -> BoxFuture<'a, Result<ReadyImage, ImageFailure>> {
        Box::pin(ImageManager::ensure(
            self,
            image,
            policy,
            pull_secrets,
            backoff_key,
            Arc::new(Progress::default()),
            event,
        ))
    }

    fn config_blob(&self, image: &ReadyImage) -> Result<Vec<u8>, String> {
        self.store().read_blob(&image.record.config).map_err(|e| e.to_string())
    }

    fn prepare_rootfs(
        &self,
        id: &str,
        image: &ReadyImage,
        userns: Option<&PodUserNamespace>,
    ) -> Result<PathBuf, String> {
        ImageManager::prepare_rootfs(self, id, image, userns).map_err(|e| e.to_string())
    }

    fn remove_rootfs(&self, id: &str) {
        if let Err(e) = self.rootfs().remove(id) {
            tracing::warn!(container = %id, error = %e, "removing a container's root filesystem");
        }
    }

    fn rootfs_made_before(&self, before: std::time::SystemTime) -> Vec<String> {
        self.rootfs().made_before(before)
    }
}

impl PodNetwork for crate::network::Network {
    fn attach<'a>(
        &'a self,
        pod: &'a Pod,
        sandbox: &'a str,
        netns: &'a Path,
    ) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(
            async move { crate::network::Network::attach(self, pod, sandbox, netns).await.map_err(|e| e.to_string()) },
        )
    }

    fn detach<'a>(&'a self, sandbox: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { crate::network::Network::detach(self, sandbox).await.map_err(|e| e.to_string()) })
    }

    fn check<'a>(&'a self, sandbox: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { crate::network::Network::check(self, sandbox).await.map_err(|e| e.to_string()) })
    }

    fn ips(&self, sandbox: &str) -> Vec<String> {
        crate::network::Network::ips(self, sandbox)
    }

    fn attached(&self) -> Vec<String> {
        crate::network::Network::attached(self)
    }

    fn write_files(&self, pod: &Pod, uid: &str, ips: &[String]) -> Result<Vec<Mount>, String> {
        crate::network::Network::write_files(self, pod, uid, ips)
    }

    fn file_mounts(&self, uid: &str) -> Vec<Mount> {
        crate::network::Network::file_mounts(self, uid)
    }

    fn remove_files(&self, uid: &str) {
        crate::network::Network::remove_files(self, uid)
    }
}

/// The memory cgroup directory of `rel` and its controller: v1's on hybrid hosts, else cgroup2.
fn memory_cgroup(hierarchy: &Hierarchy, rel: &str) -> (PathBuf, nodelet_cgroups::oom::MemoryController) {
    use nodelet_cgroups::oom::MemoryController;
    match hierarchy.v1(nodelet_cgroups::hierarchy::V1::Memory, rel) {
        Some(dir) => (dir, MemoryController::V1),
        None => (hierarchy.unified(rel), MemoryController::V2),
    }
}

impl PodCgroups for Hierarchy {
    fn ensure_pod(&self, qos: QosClass, uid: &str, limits: &PodLimits, pids: Option<u64>) -> io::Result<()> {
        Hierarchy::ensure_pod(self, qos, uid, limits, pids).map(drop)
    }

    fn remove_pod(&self, qos: QosClass, uid: &str, timeout: Duration) -> io::Result<()> {
        Hierarchy::remove_pod(self, qos, uid, timeout)
    }

    fn update_cpu_memory(&self, rel: &str, shares: u64, quota: Option<u64>, memory: Option<u64>) -> io::Result<()> {
        Hierarchy::update_cpu_memory(self, rel, shares, quota, memory)
    }

    fn update_burstable(&self, cpu_request_millis: u64) -> io::Result<()> {
        Hierarchy::update_burstable(self, cpu_request_millis)
    }

    fn oom_record(&self, rel: &str) -> Option<nodelet_cgroups::oom::OomRecord> {
        use nodelet_cgroups::oom::OomRecord;
        let (dir, controller) = memory_cgroup(self, rel);
        let mut record = dir.exists().then(|| OomRecord::capture(&dir, controller, Some(&self.unified(rel)), 0))?;
        // Both counter files name the kills `oom_kill`.
        record.kills = record.oom_counters.get("oom_kill").copied().unwrap_or(0);
        Some(record)
    }

    fn oom_watch(&self, rel: &str) -> Option<nodelet_cgroups::oom::OomWatch> {
        let (dir, controller) = memory_cgroup(self, rel);
        // A kill in a v2 group (`memory.oom.group`, upstream's default) takes the whole container, whose exit
        // records it: no watch needed.
        if std::fs::read_to_string(dir.join("memory.oom.group")).is_ok_and(|g| g.trim() == "1") {
            return None;
        }
        // On cgroup v2 each watch is an inotify instance, of which a user has `fs.inotify.max_user_instances`
        // (128 by default): past that, containers go unwatched. Said once, at warning level.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        nodelet_cgroups::oom::OomWatch::new(&dir, controller)
            .inspect_err(|e| {
                if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::debug!(cgroup = %dir.display(), "no OOM watch: {e}");
                } else {
                    tracing::warn!(
                        cgroup = %dir.display(),
                        "no OOM watch: {e}; OOM kills that a container survives go unrecorded where a watch cannot \
                         be made (on cgroup v2 each takes an inotify instance: fs.inotify.max_user_instances)"
                    );
                }
            })
            .ok()
    }
}
