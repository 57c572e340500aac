//! In-memory fakes of the node's services, for the pod worker's unit tests: no process, mount, cgroup or
//! network is touched. The fake runtime records what it was asked (`create main`, `stop proxy`...), and a test
//! scripts containers by name: exit right after start with a code, fail to be created or started, or exit when
//! told to.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use nodelet_cgroups::qos::{PodLimits, QosClass};
use nodelet_runtime::{
    Container, ContainerConfig, ContainerExit, ContainerIo, ExecProcess, Mount, ProcessUser, RuntimeError, Sandbox,
    SandboxConfig, SpecError, idmap::PodUserNamespace,
};
use tokio::sync::{mpsc, watch};

use super::{BoxFuture, ContainerRuntime, ExecResult, ImageService, PodCgroups, PodNetwork};
use crate::images::digest::Digest;
use crate::images::store::ImageRecord;
use crate::images::{ImageEvent, ImageFailure, PullPolicy, ReadyImage};

/// How a scripted container behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Exits with this code as soon as it started.
    ExitAtStart(i32),
    /// Its spec cannot be made (a `CreateContainerError`).
    FailCreate,
    /// The runtime fails to start it (`StartError`).
    FailStart,
    /// Its first create panics (a bug in the worker's path), later ones succeed.
    PanicOnce,
}

#[derive(Default)]
struct State {
    log: Vec<String>,
    exits: HashMap<String, watch::Sender<Option<ContainerExit>>>,
    scripts: HashMap<String, Script>,
    sandboxes: HashMap<String, Sandbox>,
    /// What an exec (probe) in a container exits with, by container name (default 0).
    exec_codes: HashMap<String, i32>,
    /// How long the next execs in a container take, by container name (then: at once).
    exec_delays: HashMap<String, std::collections::VecDeque<Duration>>,
    /// How long stopping a container takes (it drains first), by name.
    stop_delays: HashMap<String, Duration>,
    /// When each exec started (tokio's clock: paused in tests), by container name.
    exec_starts: HashMap<String, Vec<tokio::time::Instant>>,
    /// The command line of the latest create, by container name.
    commands: HashMap<String, Vec<String>>,
    /// The PID namespace of the latest create, by container name.
    pid_namespaces: HashMap<String, nodelet_runtime::Namespace>,
    /// Host processes started by `exec`, by PID.
    children: HashMap<i32, std::process::Child>,
}

/// Everything a pod worker needs, on fakes (standalone: no API server), with files under `root`; the status
/// manager's inbox.
pub fn ctx(
    root: &Path,
    runtime: Arc<FakeRuntime>,
    images: Arc<FakeImages>,
) -> (Arc<crate::pods::Ctx>, mpsc::UnboundedReceiver<crate::status::StatusMessage>) {
    let (status_tx, status) = mpsc::unbounded_channel();
    let config = crate::config::AgentConfig {
        kubeconfig: None,
        bootstrap_kubeconfig: None,
        cert_dir: root.join("pki"),
        node_name: "node".into(),
        node_ip: "10.0.0.1".into(),
        root_dir: root.to_path_buf(),
        log_dir: root.join("logs"),
        pod_manifest_path: None,
        node_labels: Vec::new(),
        register_with_taints: Vec::new(),
        insecure_registries: Vec::new(),
        image_credentials: None,
        cni_conf_dir: root.join("net.d"),
        cni_bin_dirs: Vec::new(),
        housekeeping_interval: std::time::Duration::from_secs(10),
        stall_thresholds: Vec::new(),
        eviction_memory_watch: None,
        kubelet: crate::config::KubeletConfiguration::default(),
    };
    let ctx = crate::pods::Ctx {
        runtime,
        images,
        hierarchy: Arc::new(FakeCgroups { dir: root.join("cgroups") }),
        config,
        client: None,
        events: crate::events::Recorder::new(None, "node".into()),
        status: status_tx,
        view: Default::default(),
        leftovers: Default::default(),
        states: crate::pods::restore::SavedStates::new(root),
        volumes: crate::volumes::VolumeManager::new(root, None, Default::default()),
        network: Arc::new(FakeNetwork),
        services: None,
        allocatable: (2000, 4 << 30),
        min_oom_score_adj: 0,
        attachments: Default::default(),
        oom: crate::oom::OomLog::open(root),
        admission: crate::pods::admission::Policy {
            sysctls: crate::pods::sysctls::Allowlist::new(&[]).expect("the safe sysctls are valid"),
            apparmor: false,
        },
        pressure: tokio::sync::watch::channel(Default::default()).1,
        user_namespaces: Arc::new(
            crate::pods::user_namespaces::UserNamespaces::new(
                &root.join("pods"),
                65536,
                (65536, u32::MAX - 65535),
                110,
                None,
            )
            .expect("the default ranges are valid"),
        ),
    };
    (Arc::new(ctx), status)
}

/// The container name in an instance ID (`<uid>-<name>-<n>`; test pod UIDs have no `-`).
pub fn name_of(id: &str) -> &str {
    let rest = id.split_once('-').map_or(id, |(_, r)| r);
    rest.rsplit_once('-').map_or(rest, |(n, _)| n)
}

/// The fake container runtime.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

impl FakeRuntime {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn script(&self, name: &str, script: Script) {
        self.lock().scripts.insert(name.to_string(), script);
    }

    /// What was asked, in order (`create x`, `start x`, `stop x`, `delete x`, `sandbox`, `remove sandbox`).
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// The command line the latest instance of `name` was created with.
    pub fn command(&self, name: &str) -> Option<Vec<String>> {
        self.lock().commands.get(name).cloned()
    }

    /// The PID namespace the latest instance of `name` was created in.
    pub fn pid_namespace_of(&self, name: &str) -> Option<nodelet_runtime::Namespace> {
        self.lock().pid_namespaces.get(name).cloned()
    }

    /// Makes execs (probes) in `name` exit with `code` from now on.
    pub fn set_exec(&self, name: &str, code: i32) {
        self.lock().exec_codes.insert(name.to_string(), code);
    }

    /// Makes the next execs in `name` take these times, one each.
    pub fn delay_execs(&self, name: &str, delays: &[Duration]) {
        self.lock().exec_delays.entry(name.to_string()).or_default().extend(delays);
    }

    /// Makes stopping `name` take `delay` before it exits.
    pub fn delay_stops(&self, name: &str, delay: Duration) {
        self.lock().stop_delays.insert(name.to_string(), delay);
    }

    /// When the execs in `name` started.
    pub fn exec_starts(&self, name: &str) -> Vec<tokio::time::Instant> {
        self.lock().exec_starts.get(name).cloned().unwrap_or_default()
    }

    /// Makes the running instance of `name` exit with `code`.
    pub fn exit(&self, name: &str, code: i32) {
        let state = self.lock();
        for (id, tx) in &state.exits {
            if name_of(id) == name && tx.borrow().is_none() {
                tx.send_replace(Some(ContainerExit { code, signal: None, oom_killed: false, status_known: true }));
            }
        }
    }

    fn end(&self, id: &str, code: i32, signal: Option<i32>) -> ContainerExit {
        let state = self.lock();
        let Some(tx) = state.exits.get(id) else {
            return ContainerExit { code, signal, oom_killed: false, status_known: true };
        };
        if tx.borrow().is_none() {
            tx.send_replace(Some(ContainerExit { code, signal, oom_killed: false, status_known: true }));
        }
        (*tx.borrow()).unwrap_or(ContainerExit { code, signal, oom_killed: false, status_known: true })
    }
}

impl ContainerRuntime for FakeRuntime {
    fn create_sandbox<'a>(&'a self, config: &'a SandboxConfig) -> BoxFuture<'a, Result<Sandbox, RuntimeError>> {
        let dir = PathBuf::from("/nonexistent/sandboxes").join(&config.id);
        let sandbox = Sandbox {
            id: config.id.clone(),
            net: Some(dir.join("net")),
            user: config.user.map(|_| dir.join("user")),
            dir,
            ipc: None,
            uts: None,
            pid: None,
        };
        let mut state = self.lock();
        state.log.push("sandbox".into());
        state.sandboxes.insert(config.id.clone(), sandbox.clone());
        Box::pin(async move { Ok(sandbox) })
    }

    fn remove_sandbox<'a>(&'a self, sandbox: &'a Sandbox) -> BoxFuture<'a, Result<(), RuntimeError>> {
        let mut state = self.lock();
        state.log.push("remove sandbox".into());
        state.sandboxes.remove(&sandbox.id);
        Box::pin(async { Ok(()) })
    }

    fn list_sandboxes(&self) -> Vec<Sandbox> {
        self.lock().sandboxes.values().cloned().collect()
    }

    fn create<'a>(
        &'a self,
        config: &'a ContainerConfig,
        io: ContainerIo,
    ) -> BoxFuture<'a, Result<Option<ProcessUser>, RuntimeError>> {
        drop(io); // nothing writes: the agent's log copier sees the end at once
        let name = name_of(&config.id).to_string();
        let mut state = self.lock();
        state.log.push(format!("create {name}"));
        match state.scripts.get(&name) {
            Some(Script::FailCreate) => return Box::pin(async { Err(RuntimeError::Spec(SpecError::NoCommand)) }),
            Some(Script::PanicOnce) => {
                state.scripts.remove(&name);
                drop(state);
                panic!("injected: creating {name}");
            }
            _ => {}
        }
        state.pid_namespaces.insert(name.clone(), config.namespaces.pid.clone());
        state.commands.insert(name, config.command.iter().chain(&config.args).cloned().collect());
        state.exits.insert(config.id.clone(), watch::channel(None).0);
        // The user as the runtime resolves it for an image without one.
        let security = &config.security;
        let gid = security.run_as_group.unwrap_or(0);
        let mut additional_gids = vec![gid];
        additional_gids.extend(security.supplemental_groups.iter().filter(|g| **g != gid));
        let user = ProcessUser { uid: security.run_as_user.unwrap_or(0), gid, additional_gids };
        Box::pin(async { Ok(Some(user)) })
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        let name = name_of(id).to_string();
        let script = {
            let mut state = self.lock();
            state.log.push(format!("start {name}"));
            state.scripts.get(&name).copied()
        };
        match script {
            Some(Script::FailStart) => {
                return Box::pin(async move {
                    Err(RuntimeError::Start { id: id.into(), message: "exec: no such file".into() })
                });
            }
            Some(Script::ExitAtStart(code)) => {
                self.end(id, code, None);
            }
            _ => {}
        }
        Box::pin(async { Ok(()) })
    }

    fn wait<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ContainerExit> {
        let rx = self.lock().exits.get(id).map(|tx| tx.subscribe());
        Box::pin(async move {
            let unknown = ContainerExit { code: 137, signal: None, oom_killed: false, status_known: false };
            let Some(mut rx) = rx else { return unknown };
            match rx.wait_for(Option::is_some).await {
                Ok(exit) => (*exit).unwrap_or(unknown),
                Err(_) => unknown,
            }
        })
    }

    fn stop<'a>(&'a self, id: &'a str, _grace: Duration) -> BoxFuture<'a, ContainerExit> {
        let delay = {
            let mut state = self.lock();
            state.log.push(format!("stop {}", name_of(id)));
            state.stop_delays.get(name_of(id)).copied()
        };
        Box::pin(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            self.end(id, 143, Some(15))
        })
    }

    fn kill(&self, id: &str) {
        self.end(id, 137, Some(9));
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        let mut state = self.lock();
        state.log.push(format!("delete {}", name_of(id)));
        if let Some(tx) = state.exits.remove(id)
            && tx.borrow().is_none()
        {
            tx.send_replace(Some(ContainerExit { code: 137, signal: Some(9), oom_killed: false, status_known: true }));
        }
        Box::pin(async {})
    }

    fn adopt(&self, container: Container) -> String {
        container.id
    }

    fn list_matching<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Vec<String>> {
        let ids = self.lock().exits.keys().filter(|id| id.starts_with(prefix)).cloned().collect();
        Box::pin(async move { ids })
    }

    fn reopen_output(&self, _: &str) -> Option<(File, File)> {
        None
    }

    /// Runs `args` on the host (no container) with `io`, so that streaming code is tested with real processes.
    fn exec<'a>(
        &'a self,
        id: &'a str,
        args: &'a [String],
        tty: bool,
        io: ContainerIo,
    ) -> BoxFuture<'a, Result<ExecProcess, RuntimeError>> {
        let fail = |message: &str| RuntimeError::Exec { id: id.into(), message: message.into() };
        let started = (|| {
            if tty {
                return Err(fail("the fake runtime has no terminals"));
            }
            let (program, rest) = args.split_first().ok_or_else(|| fail("no command"))?;
            let stdio = |fd: Option<std::os::fd::OwnedFd>| fd.map_or_else(std::process::Stdio::null, Into::into);
            let child = std::process::Command::new(program)
                .args(rest)
                .stdin(stdio(io.stdin))
                .stdout(stdio(io.stdout))
                .stderr(stdio(io.stderr))
                .spawn()
                .map_err(|e| fail(&e.to_string()))?;
            let pid = i32::try_from(child.id()).map_err(|_| fail("pid"))?;
            self.lock().log.push(format!("exec {}", name_of(id)));
            self.lock().children.insert(pid, child);
            Ok(ExecProcess { pid, pty: None })
        })();
        Box::pin(async move { started })
    }

    fn terminal(&self, _: &str) -> Option<std::os::fd::OwnedFd> {
        None
    }

    fn pid_namespace(&self, id: &str) -> Option<PathBuf> {
        let live = self.lock().exits.get(id).is_some_and(|tx| tx.borrow().is_none());
        live.then(|| PathBuf::from(format!("/nonexistent/containers/{id}/ns/pid")))
    }

    fn wait_exec(&self, pid: i32) -> BoxFuture<'_, i32> {
        let child = self.lock().children.remove(&pid);
        Box::pin(async move {
            let Some(mut child) = child else { return 137 };
            let status = tokio::task::spawn_blocking(move || child.wait()).await;
            match status {
                Ok(Ok(s)) => {
                    s.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(9))
                }
                _ => 137,
            }
        })
    }

    fn exec_sync<'a>(&'a self, id: &'a str, _: &'a [String], _: Duration) -> BoxFuture<'a, ExecResult> {
        let mut state = self.lock();
        state.log.push(format!("exec {}", name_of(id)));
        let code = state.exec_codes.get(name_of(id)).copied().unwrap_or(0);
        state.exec_starts.entry(name_of(id).to_string()).or_default().push(tokio::time::Instant::now());
        let delay = state.exec_delays.get_mut(name_of(id)).and_then(|d| d.pop_front()).unwrap_or_default();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Ok((Some(code), format!("exit {code}").into_bytes()))
        })
    }
}

/// Images that are always present (or, for names in `missing`, never pullable).
#[derive(Default)]
pub struct FakeImages {
    pub missing: Mutex<Vec<String>>,
    /// Images whose pull takes a second.
    pub slow: Mutex<Vec<String>>,
}

impl ImageService for FakeImages {
    fn ensure<'a>(
        &'a self,
        image: &'a str,
        _: PullPolicy,
        _: &'a [Vec<u8>],
        _: &'a str,
        _: &'a (dyn Fn(ImageEvent) + Send + Sync),
    ) -> BoxFuture<'a, Result<ReadyImage, ImageFailure>> {
        let missing = self.missing.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|m| m == image);
        let slow = self.slow.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|m| m == image);
        Box::pin(async move {
            if slow {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            if missing {
                return Err(ImageFailure {
                    reason: "ErrImagePull",
                    message: format!("failed to pull image {image:?}"),
                });
            }
            let digest = Digest::parse(&format!("sha256:{}", "0".repeat(64)))
                .map_err(|e| ImageFailure { reason: "ErrImagePull", message: e.to_string() })?;
            let record = ImageRecord {
                manifest: digest.clone(),
                config: digest.clone(),
                layers: Vec::new(),
                names: vec![image.to_string()],
                repo_digests: Vec::new(),
                size: 0,
                pulled_at: 0,
                last_used: 0,
            };
            Ok(ReadyImage { record, image: image.to_string(), image_id: format!("{image}@{}", digest.as_str()) })
        })
    }

    fn config_blob(&self, _: &ReadyImage) -> Result<Vec<u8>, String> {
        Ok(br#"{"config": {"Cmd": ["sh"]}}"#.to_vec())
    }

    fn prepare_rootfs(&self, id: &str, _: &ReadyImage, _: Option<&PodUserNamespace>) -> Result<PathBuf, String> {
        Ok(PathBuf::from("/nonexistent/rootfs").join(id))
    }

    fn remove_rootfs(&self, _: &str) {}

    fn rootfs_made_before(&self, _: std::time::SystemTime) -> Vec<String> {
        Vec::new()
    }
}

/// A network that gives every pod 10.88.0.5.
#[derive(Default)]
pub struct FakeNetwork;

impl PodNetwork for FakeNetwork {
    fn attach<'a>(&'a self, _: &'a Pod, _: &'a str, _: &'a Path) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async { Ok(vec!["10.88.0.5".to_string()]) })
    }

    fn detach<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    fn check<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    fn ips(&self, _: &str) -> Vec<String> {
        Vec::new()
    }

    fn attached(&self) -> Vec<String> {
        Vec::new()
    }

    fn write_files(&self, _: &Pod, _: &str, _: &[String]) -> Result<Vec<Mount>, String> {
        Ok(Vec::new())
    }

    fn file_mounts(&self, _: &str) -> Vec<Mount> {
        Vec::new()
    }

    fn remove_files(&self, _: &str) {}
}

/// Cgroups that accept everything. A container's memory cgroup is a directory below `dir` with a
/// `memory.events` file (cgroup v2's), which a test writes OOM kills into.
#[derive(Default)]
pub struct FakeCgroups {
    pub dir: PathBuf,
}

impl PodCgroups for FakeCgroups {
    fn ensure_pod(&self, _: QosClass, _: &str, _: &PodLimits, _: Option<u64>) -> io::Result<()> {
        Ok(())
    }

    fn remove_pod(&self, _: QosClass, _: &str, _: Duration) -> io::Result<()> {
        Ok(())
    }

    fn update_cpu_memory(&self, _: &str, _: u64, _: Option<u64>, _: Option<u64>) -> io::Result<()> {
        Ok(())
    }

    fn update_burstable(&self, _: u64) -> io::Result<()> {
        Ok(())
    }

    fn oom_watch(&self, rel: &str) -> Option<nodelet_cgroups::oom::OomWatch> {
        let dir = self.dir.join(rel);
        std::fs::create_dir_all(&dir).ok()?;
        std::fs::write(dir.join("memory.events"), "oom 0\noom_kill 0\n").ok()?;
        nodelet_cgroups::oom::OomWatch::new(&dir, nodelet_cgroups::oom::MemoryController::V2).ok()
    }
}
